"""Frozen snapshots of a running pipeline and the report of a finished run.

These are plain data: the stage runner fills them, and metrics, the ops server, the
autoscaler and the profiler read them. Nothing here holds a lock or a reference to a
live object.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = [
    "DeadLetter",
    "LatencySummary",
    "PipelineStats",
    "RunReport",
    "ScaleEvent",
    "StageStats",
    "Unprocessed",
]


@dataclass(frozen=True, slots=True, kw_only=True)
class LatencySummary:
    """Per-item service-time quantiles of a stage, in seconds (0.0 when nothing ran)."""

    count: int = 0
    mean: float = 0.0
    p50: float = 0.0
    p95: float = 0.0
    p99: float = 0.0
    max: float = 0.0


@dataclass(frozen=True, slots=True, kw_only=True)
class ScaleEvent:
    """One autoscaler decision that changed a worker count, or a hold whose reason changed."""

    at: float  # seconds since the run started
    stage: str
    direction: str  # "up", "down" or "hold"
    current: int
    desired: int
    reason: str
    inputs: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True, slots=True, kw_only=True)
class StageStats:
    """A snapshot of one stage.

    Attributes:
        name: the stage name.
        executor: ``"thread"``, ``"process"`` or ``"dask"``.
        queue_depth: items waiting in the stage's input channel (and held for busy keys).
        queue_capacity: the channel's capacity in items.
        queue_peak: the largest depth seen so far.
        in_flight: items handed to workers and not yet finished.
        workers: batches the stage may run at once (its current worker count).
        desired_workers: what the autoscaler asked for (equal to ``workers`` when fixed).
        min_workers: lower bound of the worker count.
        max_workers: upper bound of the worker count.
        received: items that entered the stage.
        succeeded: items whose call returned (their outputs went downstream).
        emitted: outputs sent downstream (differs from ``succeeded`` with drops and fan-out).
        dropped: items whose call returned :data:`pipekit.DROP` or an empty fan-out.
        failed: items that ended on the dead-letter path at this stage.
        retried: retry attempts made (an item retried twice counts 2).
        timed_out: calls that exceeded the stage's ``timeout``.
        workers_lost: batches whose worker process died.
        stuck_workers: threads still running a call that timed out (not counted as capacity).
        batches: micro-batches run.
        busy_seconds: wall time workers spent running batches.
        cpu_seconds: CPU time workers spent running batches.
        blocked_seconds: time the stage waited on a full downstream channel.
        latency: per-item service time.
        state: ``"running"``, ``"draining"`` or ``"stopped"``.
    """

    name: str
    executor: str = "thread"
    queue_depth: int = 0
    queue_capacity: int = 0
    queue_peak: int = 0
    in_flight: int = 0
    workers: int = 0
    desired_workers: int = 0
    min_workers: int = 0
    max_workers: int = 0
    received: int = 0
    succeeded: int = 0
    emitted: int = 0
    dropped: int = 0
    failed: int = 0
    retried: int = 0
    timed_out: int = 0
    workers_lost: int = 0
    stuck_workers: int = 0
    batches: int = 0
    busy_seconds: float = 0.0
    cpu_seconds: float = 0.0
    blocked_seconds: float = 0.0
    latency: LatencySummary = field(default_factory=LatencySummary)
    state: str = "running"


@dataclass(frozen=True, slots=True, kw_only=True)
class PipelineStats:
    """A snapshot of a whole run.

    Attributes:
        pipeline: the pipeline name.
        state: ``"starting"``, ``"running"``, ``"paused"`` (intake held by a resource
            limit), ``"draining"`` or ``"stopped"``.
        uptime: seconds since the run started.
        submitted: items accepted by ``submit()`` or read from the source.
        outputs: items that left the last stage (to the sink or ``results()``).
        dead_letters: items that ended on the dead-letter path.
        stages: one :class:`StageStats` per stage, in pipeline order.
        paused_reason: why intake is paused, or ``""``.
        bottleneck: the stage that limits throughput now, or ``""``.
        bottleneck_reason: ``"busy"``, ``"starved"`` or ``"blocked downstream"``, or ``""``.
        bottleneck_gain: items/s one more worker at the bottleneck would add (estimate).
        last_decisions: the most recent autoscaler decisions.
    """

    pipeline: str
    state: str
    uptime: float
    submitted: int
    outputs: int
    dead_letters: int
    stages: tuple[StageStats, ...]
    paused_reason: str = ""
    bottleneck: str = ""
    bottleneck_reason: str = ""
    bottleneck_gain: float = 0.0
    last_decisions: tuple[ScaleEvent, ...] = ()

    def stage(self, name: str) -> StageStats:
        """Return the snapshot of the stage called ``name``.

        Raises:
            KeyError: no stage has that name.
        """
        for s in self.stages:
            if s.name == name:
                return s
        raise KeyError(f"no stage named {name!r} (stages: {[s.name for s in self.stages]})")

    def to_dict(self) -> dict[str, Any]:
        """Return the snapshot as JSON-ready plain data."""
        return asdict(self)


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """An item that failed for good at a stage.

    Attributes:
        stage: the stage where it failed (``"sink"`` when the sink itself raised).
        item: the item as that stage received it.
        error: the last exception.
        attempts: calls made, retries included.
    """

    stage: str
    item: Any
    error: BaseException
    attempts: int


@dataclass(frozen=True, slots=True)
class Unprocessed:
    """An item that the run could not finish before its shutdown deadline.

    Attributes:
        stage: the stage it was waiting for or running in.
        item: the item as that stage would have received it.
        where: ``"queued"`` (waiting in the stage's channel) or ``"in_flight"``.
    """

    stage: str
    item: Any
    where: str


@dataclass(frozen=True, slots=True, kw_only=True)
class RunReport:
    """What happened to every item of a run.

    The invariant pipekit keeps: for a pipeline whose stages neither drop nor fan out,
    ``submitted == outputs + len(dead_letters) + len(unprocessed)``. With drops and
    fan-out, the same holds per stage: ``received == succeeded + failed + unprocessed``.

    Attributes:
        pipeline: the pipeline name.
        submitted: items accepted into the first stage.
        outputs: items that left the last stage.
        dead_letters: every item that failed for good (only a count is kept, in
            ``dead_letter_count``, when a ``dead_letter`` callable received them and
            ``keep_dead_letters`` was not asked for).
        dead_letter_count: how many items failed for good.
        unprocessed: items left when the shutdown deadline passed, with where they were.
        duration: seconds from start to the end of shutdown.
        stages: final per-stage snapshots, in pipeline order.
        reason: why the run ended: ``"completed"``, ``"shutdown"``, ``"signal"``,
            ``"deadline"`` (the drain did not finish in time), ``"aborted"`` (a second
            signal), ``"duration"`` (a timed run ended) or ``"source_error"`` (the source
            raised; what it yielded before was processed).
        hook_errors: stage names whose ``on_shutdown`` hook raised, with the error text.
        scale_events: every autoscaler decision that changed a worker count.
        profiles: paths of profiles written for this run.
        source_error: ``repr`` of the exception the source raised, or ``""``.
        signal: the name of the signal that started the shutdown (``"SIGTERM"``), or ``""``.
    """

    pipeline: str
    submitted: int
    outputs: int
    dead_letters: tuple[DeadLetter, ...]
    dead_letter_count: int
    unprocessed: tuple[Unprocessed, ...]
    duration: float
    stages: tuple[StageStats, ...]
    reason: str
    hook_errors: tuple[tuple[str, str], ...] = ()
    scale_events: tuple[ScaleEvent, ...] = ()
    profiles: tuple[str, ...] = ()
    source_error: str = ""
    signal: str = ""

    @property
    def ok(self) -> bool:
        """True when every item reached an output or was deliberately dropped."""
        return self.dead_letter_count == 0 and not self.unprocessed and not self.source_error

    @property
    def throughput(self) -> float:
        """Items per second that left the pipeline over the whole run."""
        return self.outputs / self.duration if self.duration > 0 else 0.0

    def stage(self, name: str) -> StageStats:
        """Return the final snapshot of the stage called ``name``.

        Raises:
            KeyError: no stage has that name.
        """
        for s in self.stages:
            if s.name == name:
                return s
        raise KeyError(f"no stage named {name!r} (stages: {[s.name for s in self.stages]})")

    def to_dict(self) -> dict[str, Any]:
        """Return the report as JSON-ready plain data (items and errors as ``repr``)."""
        return {
            "pipeline": self.pipeline,
            "submitted": self.submitted,
            "outputs": self.outputs,
            "dead_letter_count": self.dead_letter_count,
            "dead_letters": [
                {"stage": d.stage, "item": repr(d.item), "error": repr(d.error),
                 "attempts": d.attempts}
                for d in self.dead_letters
            ],
            "unprocessed": [
                {"stage": u.stage, "item": repr(u.item), "where": u.where}
                for u in self.unprocessed
            ],
            "duration": self.duration,
            "throughput": self.throughput,
            "reason": self.reason,
            "stages": [asdict(s) for s in self.stages],
            "hook_errors": [list(h) for h in self.hook_errors],
            "scale_events": [asdict(e) for e in self.scale_events],
            "profiles": list(self.profiles),
            "source_error": self.source_error,
            "signal": self.signal,
        }
