"""Spans and metrics for a run, through the OpenTelemetry API only.

pipekit never installs providers: it uses the ``tracer_provider``/``meter_provider``
given to the pipeline, else the global ones, so an application that configured
OpenTelemetry gets pipekit's telemetry in its own pipeline, and one that did not pays
next to nothing (the API's no-op objects).

What costs what, and why it is shaped this way:

* Counters and gauges are *observable*: they read the stage counters that the runner
  keeps anyway, at collection time. Nothing is recorded per item or per batch, and
  the exported totals equal the :class:`~pipekit.RunReport` counts exactly.
* Duration and queue-wait histograms get one observation per micro-batch (the
  per-item mean of that batch), at most one per stage per ``histogram_interval``
  (1 ms), so their cost stays flat however fast items are.
* A span per batch (``pipekit.stage <stage>``) is made only for batches that carry a
  traced item (or failed), linked to those items' traces. The trace context active at
  ``submit()`` travels with each item through every stage, into process workers as a
  W3C ``traceparent``, and the stage function runs inside it; when the item's span is
  sampled, a child span ``pipekit.item <stage>`` wraps the call.

Telemetry never raises into the pipeline: callbacks log at debug level and go on.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from opentelemetry import context as otel_context
from opentelemetry import metrics, trace
from opentelemetry.metrics import CallbackOptions, Observation
from opentelemetry.trace import Link, SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

if TYPE_CHECKING:
    from pipekit._work import BatchResult
    from pipekit.pipeline import Run
    from pipekit.stage import StageRunner
    from pipekit.stats import DeadLetter, PipelineStats

__all__ = ["ERROR_TYPES_PER_STAGE", "INSTRUMENTS", "Telemetry", "capture", "enter"]

log = logging.getLogger("pipekit.telemetry")

#: Distinct ``error.type`` values kept per stage; later ones are counted as ``_other``.
ERROR_TYPES_PER_STAGE = 10
_MAX_LINKS = 32
_SPAN_QUEUE = 2048  # batch spans waiting for the span thread; beyond it they are dropped
_PROPAGATOR = TraceContextTextMapPropagator()

#: Every instrument pipekit creates: (name, kind, unit, description). docs/metrics.md
#: lists the same table and a test keeps the two in step.
INSTRUMENTS: tuple[tuple[str, str, str, str], ...] = (
    ("pipekit.stage.items", "counter", "{item}",
     "Items a stage finished, by outcome (ok, dropped, dead_letter) and error.type."),
    ("pipekit.stage.duration", "histogram", "s",
     "Per-item service time (mean of a micro-batch; at most one observation per ms)."),
    ("pipekit.stage.queue.wait", "histogram", "s",
     "Time a micro-batch's oldest item waited in the stage's channel."),
    ("pipekit.stage.queue.depth", "gauge", "{item}", "Items waiting in the stage's channel."),
    ("pipekit.stage.queue.capacity", "gauge", "{item}", "Capacity of the stage's channel."),
    ("pipekit.stage.in_flight", "gauge", "{item}", "Items handed to workers, not finished."),
    ("pipekit.stage.workers", "gauge", "{worker}", "Batches the stage may run at once."),
    ("pipekit.stage.workers.desired", "gauge", "{worker}", "What the autoscaler asked for."),
    ("pipekit.stage.workers.max", "gauge", "{worker}", "Top of the stage's scaling range."),
    ("pipekit.stage.workers.min", "gauge", "{worker}", "Bottom of the stage's scaling range."),
    ("pipekit.stage.retries", "counter", "{retry}", "Retry attempts made."),
    ("pipekit.stage.timeouts", "counter", "{call}", "Calls that ran past the timeout."),
    ("pipekit.stage.workers.lost", "counter", "{batch}", "Batches whose worker process died."),
    ("pipekit.stage.cpu.time", "counter", "s", "CPU time workers spent on the stage."),
    ("pipekit.stage.busy.time", "counter", "s", "Wall time workers spent on the stage."),
    ("pipekit.stage.blocked.time", "counter", "s",
     "Time the stage waited on a full downstream channel."),
    ("pipekit.stage.bottleneck", "gauge", "1",
     "1 for the stage that limits throughput now, with its reason."),
    ("pipekit.pipeline.state", "gauge", "1", "1 for the run's current state."),
    ("pipekit.pipeline.items.submitted", "counter", "{item}", "Items accepted by the run."),
    ("pipekit.pipeline.items.output", "counter", "{item}", "Items that left the last stage."),
    ("pipekit.autoscaler.decisions", "counter", "{decision}",
     "Autoscaler changes and reason changes, by direction and reason."),
    ("pipekit.intake.paused", "gauge", "1", "1 while a resource limit holds intake."),
    ("pipekit.intake.pauses", "counter", "{pause}", "Times a resource limit paused intake."),
    ("pipekit.memory.limit", "gauge", "By", "The max_memory_mb limit in bytes."),
    ("pipekit.cpu.limit", "gauge", "1",
     "max_cpu_percent as a fraction of all CPUs (compare with process.cpu.utilization)."),
    ("process.cpu.utilization", "gauge", "1",
     "Process CPU (children included) over available CPUs."),
    ("process.memory.usage", "gauge", "By", "Resident memory, children included."),
    ("process.unix.file_descriptor.count", "gauge", "{file_descriptor}", "Open descriptors."),
    ("process.thread.count", "gauge", "{thread}", "Threads of the process."),
    ("cpython.gc.collections", "counter", "{collection}", "GC runs by generation."),
)

_STATES = ("starting", "running", "paused", "draining", "stopped")


def _version() -> str:
    from pipekit import __version__

    return __version__


def capture() -> Any:
    """The current trace context if its span is sampled, else None (cheap).

    Only sampled traces travel with items: an unsampled context would make every item
    take the per-item path for spans that are never recorded.
    """
    ctx = otel_context.get_current()
    if trace.get_current_span(ctx).get_span_context().trace_flags.sampled:
        return ctx
    return None


def to_wire(ctxs: list[Any]) -> list[Any]:
    """Turn contexts into W3C ``traceparent`` carriers that pickle."""
    out: list[Any] = []
    for ctx in ctxs:
        if ctx is None or type(ctx) is dict:
            out.append(ctx)
            continue
        carrier: dict[str, str] = {}
        _PROPAGATOR.inject(carrier, context=ctx)
        out.append(carrier or None)
    return out


def from_wire(ctxs: list[Any] | None) -> list[Any] | None:
    """Turn carriers back into contexts."""
    if ctxs is None:
        return None
    return [_PROPAGATOR.extract(c) if type(c) is dict else c for c in ctxs]


@contextmanager
def enter(ctx: Any, stage: str = "", tracer: Any = None) -> Iterator[None]:
    """Run the stage call inside an item's context (a Context or a carrier dict).

    When the item's span is sampled, a ``pipekit.item <stage>`` span wraps the call so
    spans the function opens nest under it.
    """
    if type(ctx) is dict:
        ctx = _PROPAGATOR.extract(ctx)
    token = otel_context.attach(ctx)
    try:
        if trace.get_current_span(ctx).get_span_context().trace_flags.sampled:
            if tracer is None:
                tracer = trace.get_tracer("pipekit", _version())
            with tracer.start_as_current_span(f"pipekit.item {stage}",
                                              kind=SpanKind.INTERNAL):
                yield
        else:
            yield
    finally:
        otel_context.detach(token)


class _Enter:
    """A picklable ``enter`` bound to a stage (process workers get the global tracer)."""

    def __init__(self, stage: str, tracer: Any = None) -> None:
        self.stage = stage
        self.tracer = tracer

    def __call__(self, ctx: Any) -> Any:
        return enter(ctx, self.stage, self.tracer)

    def __getstate__(self) -> dict[str, Any]:
        return {"stage": self.stage, "tracer": None}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.stage = state["stage"]
        self.tracer = None


class Telemetry:
    """The instruments and spans of one run.

    Args:
        run: the run it watches.
        tracer_provider: a tracer provider, or None for the global one.
        meter_provider: a meter provider, or None for the global one.
        histogram_interval: the least time between two histogram observations of a stage.
    """

    def __init__(self, run: Run, *, tracer_provider: Any = None, meter_provider: Any = None,
                 histogram_interval: float = 0.001) -> None:
        self._run = run
        self.pipeline = run.name
        tp = tracer_provider or trace.get_tracer_provider()
        mp = meter_provider or metrics.get_meter_provider()
        self.tracer = tp.get_tracer("pipekit", _version())
        self.meter = mp.get_meter("pipekit", _version())
        self._interval = histogram_interval
        self._last_hist: dict[str, float] = {}
        self._errors: dict[str, dict[str, int]] = {}
        self._decisions: dict[tuple[str, str, str], int] = {}
        self._stats_cache: tuple[float, PipelineStats | None] = (0.0, None)
        self._base = {"pipeline": self.pipeline}
        self._stage_attrs: dict[str, dict[str, str]] = {}
        self._resources: Any = None  # a ResourceMonitor, when one runs
        self._gate: Any = None
        self._limits: dict[str, float] = {}
        self._spans: queue.Queue[Any] = queue.Queue(maxsize=_SPAN_QUEUE)
        self._span_thread: threading.Thread | None = None
        self._lock = threading.Lock()  # the span thread's start, and error-type counts
        #: Batch spans dropped because the span queue was full (an exporter too slow).
        self.spans_dropped = 0
        self._make_instruments()

    # -- wiring ------------------------------------------------------------------

    def enter_for(self, stage: str) -> Callable[[Any], Any]:
        """The ``enter`` function a stage's workers use."""
        return _Enter(stage, self.tracer)

    def watch_resources(self, monitor: Any, gate: Any, limits: dict[str, float]) -> None:
        """Export process metrics from a resource monitor and the memory gate."""
        self._resources = monitor
        self._gate = gate
        self._limits = limits

    def attrs(self, stage: str) -> dict[str, str]:
        """The attributes of a stage's series (built once)."""
        a = self._stage_attrs.get(stage)
        if a is None:
            a = self._stage_attrs[stage] = {"pipeline": self.pipeline, "stage": stage}
        return a

    # -- per batch (the dispatcher thread) -----------------------------------------

    def on_batch(self, runner: StageRunner, r: BatchResult, waited: float, started: float,
                 ctxs: list[Any] | None) -> None:
        """Record a finished micro-batch: histogram observations and (maybe) a span."""
        name = runner.name
        now = time.monotonic()
        if r.done and now - self._last_hist.get(name, 0.0) >= self._interval:
            self._last_hist[name] = now
            a = self.attrs(name)
            self._duration.record(r.busy / r.done, a)
            self._queue_wait.record(max(0.0, waited), a)
        if ctxs is not None or r.failures:
            # Spans are made and ended on a thread of their own: a span processor whose
            # exporter blocks (a synchronous one, say) can never stall a stage.
            end_ns = time.time_ns()
            start_ns = end_ns - int((time.monotonic() - started) * 1e9)
            try:
                self._spans.put_nowait((name, r, start_ns, end_ns, ctxs))
            except queue.Full:
                self.spans_dropped += 1
            else:
                self._ensure_span_thread()

    def _ensure_span_thread(self) -> None:
        if self._span_thread is None:
            with self._lock:
                if self._span_thread is None:
                    t = threading.Thread(target=self._span_loop,
                                         name=f"pipekit-{self.pipeline}-spans", daemon=True)
                    t.start()
                    self._span_thread = t

    def _span_loop(self) -> None:
        while True:
            job = self._spans.get()
            if job is None:
                return
            try:
                self._batch_span(*job)
            except Exception:  # telemetry never breaks the pipeline
                log.debug("batch span failed", exc_info=True)

    def close(self, timeout: float) -> None:
        """Finish the batch spans still queued (until ``timeout``), then stop the thread."""
        t = self._span_thread
        if t is None:
            return
        try:
            self._spans.put(None, timeout=max(0.0, timeout))
        except queue.Full:
            return
        t.join(max(0.0, timeout))

    def _batch_span(self, stage: str, r: BatchResult, start_ns: int, end_ns: int,
                    ctxs: list[Any] | None) -> None:
        links: list[Link] = []
        if ctxs is not None:
            seen: set[int] = set()
            for c in ctxs:
                if c is None:
                    continue
                ctx = _PROPAGATOR.extract(c) if type(c) is dict else c
                sc = trace.get_current_span(ctx).get_span_context()
                if sc.is_valid and sc.span_id not in seen:
                    seen.add(sc.span_id)
                    links.append(Link(sc))
                    if len(links) >= _MAX_LINKS:
                        break
        if not links and not r.failures:
            return
        parent = None
        if len(links) == 1:  # one trace: make the batch span part of it
            parent = trace.set_span_in_context(trace.NonRecordingSpan(links[0].context))
        span = self.tracer.start_span(
            f"pipekit.stage {stage}", context=parent, kind=SpanKind.INTERNAL,
            links=links, start_time=start_ns,
            attributes={"pipekit.pipeline": self.pipeline, "pipekit.stage": stage,
                        "pipekit.batch.size": r.done,
                        "pipekit.items.ok": r.succeeded - r.dropped,
                        "pipekit.items.dropped": r.dropped,
                        "pipekit.items.dead_letter": len(r.failures),
                        "pipekit.retries": r.retries})
        for _, _, err, attempts in r.failures[:10]:
            span.record_exception(err, attributes={"pipekit.attempts": attempts})
        if r.failures:
            span.set_status(Status(StatusCode.ERROR,
                                   f"{len(r.failures)} item(s) failed for good"))
        span.end(end_time=end_ns)

    def on_dead(self, letter: DeadLetter) -> None:
        """Count a dead letter by its (bounded) error type."""
        kind = type(letter.error).__qualname__
        with self._lock:  # failures only: stages call this from several threads
            per = self._errors.setdefault(letter.stage, {})
            if kind not in per and len(per) >= ERROR_TYPES_PER_STAGE:
                kind = "_other"
            per[kind] = per.get(kind, 0) + 1

    def on_decision(self, event: Any) -> None:
        """Count an autoscaler decision."""
        k = (event.stage, event.direction, event.reason)
        self._decisions[k] = self._decisions.get(k, 0) + 1

    # -- instruments -----------------------------------------------------------------

    def _make_instruments(self) -> None:
        shared = _Instruments.for_meter(self.meter)
        self._duration = shared.duration
        self._queue_wait = shared.queue_wait
        self.callbacks: dict[str, Callable[[CallbackOptions], Iterable[Observation]]] = {
            "pipekit.stage.items": self._obs_items,
            "pipekit.stage.queue.depth": self._stage_gauge("queue_depth"),
            "pipekit.stage.queue.capacity": self._stage_gauge("queue_capacity"),
            "pipekit.stage.in_flight": self._stage_gauge("in_flight"),
            "pipekit.stage.workers": self._stage_gauge("workers"),
            "pipekit.stage.workers.desired": self._stage_gauge("desired_workers"),
            "pipekit.stage.workers.max": self._stage_gauge("max_workers"),
            "pipekit.stage.workers.min": self._stage_gauge("min_workers"),
            "pipekit.stage.retries": self._stage_gauge("retried"),
            "pipekit.stage.timeouts": self._stage_gauge("timed_out"),
            "pipekit.stage.workers.lost": self._stage_gauge("workers_lost"),
            "pipekit.stage.cpu.time": self._stage_gauge("cpu_seconds"),
            "pipekit.stage.busy.time": self._stage_gauge("busy_seconds"),
            "pipekit.stage.blocked.time": self._stage_gauge("blocked_seconds"),
            "pipekit.stage.bottleneck": self._obs_bottleneck,
            "pipekit.pipeline.state": self._obs_state,
            "pipekit.pipeline.items.submitted": self._run_value("submitted"),
            "pipekit.pipeline.items.output": self._run_value("outputs"),
            "pipekit.autoscaler.decisions": self._obs_decisions,
            "pipekit.intake.paused": self._obs_paused,
            "pipekit.intake.pauses": self._obs_pauses,
            "pipekit.memory.limit": self._limit("memory"),
            "pipekit.cpu.limit": self._limit("cpu"),
            "process.cpu.utilization": self._sample("cpu_utilization"),
            "process.memory.usage": self._sample("rss_bytes"),
            "process.unix.file_descriptor.count": self._sample("open_fds"),
            "process.thread.count": self._sample("threads"),
            "cpython.gc.collections": self._obs_gc,
        }
        # The latest run of a pipeline is the one its series describe.
        shared.live[self.pipeline] = self

    def _stats(self) -> PipelineStats:
        at, cached = self._stats_cache
        now = time.monotonic()
        if cached is None or now - at > 0.2:
            cached = self._run.stats()
            self._stats_cache = (now, cached)
        return cached

    def _stage_gauge(self, field: str) -> Callable[[CallbackOptions], Iterable[Observation]]:
        def cb(_: CallbackOptions) -> Iterable[Observation]:
            for s in self._stats().stages:
                yield Observation(getattr(s, field), self.attrs(s.name))

        return cb

    def _run_value(self, field: str) -> Callable[[CallbackOptions], Iterable[Observation]]:
        def cb(_: CallbackOptions) -> Iterable[Observation]:
            yield Observation(getattr(self._stats(), field), self._base)

        return cb

    def _obs_items(self, _: CallbackOptions) -> Iterable[Observation]:
        for s in self._stats().stages:
            a = self.attrs(s.name)
            yield Observation(s.succeeded - s.dropped, {**a, "outcome": "ok"})
            yield Observation(s.dropped, {**a, "outcome": "dropped"})
            with self._lock:
                per = dict(self._errors.get(s.name, {}))
            counted = sum(per.values())
            if s.failed > counted:  # failures the dead-letter hook has not seen yet
                per["_other"] = per.get("_other", 0) + s.failed - counted
            if not per:
                yield Observation(0, {**a, "outcome": "dead_letter", "error.type": "_none"})
            for kind, n in per.items():
                yield Observation(n, {**a, "outcome": "dead_letter", "error.type": kind})
        sink = self._errors.get("sink")
        if sink:
            a = self.attrs("sink")
            for kind, n in sink.items():
                yield Observation(n, {**a, "outcome": "dead_letter", "error.type": kind})

    def _obs_bottleneck(self, _: CallbackOptions) -> Iterable[Observation]:
        st = self._stats()
        for s in st.stages:
            hit = s.name == st.bottleneck
            yield Observation(1 if hit else 0, {**self.attrs(s.name),
                                                "reason": st.bottleneck_reason if hit else ""})

    def _obs_state(self, _: CallbackOptions) -> Iterable[Observation]:
        state = self._run.state
        for s in _STATES:
            yield Observation(1 if s == state else 0, {**self._base, "state": s})

    def _obs_decisions(self, _: CallbackOptions) -> Iterable[Observation]:
        for (stage, direction, reason), n in list(self._decisions.items()):
            yield Observation(n, {**self.attrs(stage), "direction": direction,
                                  "reason": reason})

    def _obs_paused(self, _: CallbackOptions) -> Iterable[Observation]:
        gate = self._gate
        yield Observation(1 if (gate is not None and gate.paused) else 0, self._base)

    def _obs_pauses(self, _: CallbackOptions) -> Iterable[Observation]:
        gate = self._gate
        yield Observation(gate.pauses if gate is not None else 0, self._base)

    def _limit(self, kind: str) -> Callable[[CallbackOptions], Iterable[Observation]]:
        def cb(_: CallbackOptions) -> Iterable[Observation]:
            v = self._limits.get(kind)
            if v is not None:
                yield Observation(v, self._base)

        return cb

    def _sample(self, field: str) -> Callable[[CallbackOptions], Iterable[Observation]]:
        def cb(_: CallbackOptions) -> Iterable[Observation]:
            mon = self._resources
            s = mon.latest if mon is not None else None
            if s is not None:
                yield Observation(getattr(s, field), self._base)

        return cb

    def _obs_gc(self, _: CallbackOptions) -> Iterable[Observation]:
        mon = self._resources
        s = mon.latest if mon is not None else None
        if s is not None:
            for gen, n in enumerate(s.gc_collections):
                yield Observation(n, {**self._base, "cpython.gc.generation": gen})


class _Instruments:
    """The instruments of one meter, created once and shared by every run on it.

    The SDK keeps the callbacks of the first registration of a name, so observable
    instruments are registered once per meter with callbacks that ask each live run.
    """

    _by_meter: dict[int, tuple[Any, _Instruments]] = {}

    def __init__(self, meter: Any) -> None:
        self.live: dict[str, Telemetry] = {}
        self.duration = meter.create_histogram("pipekit.stage.duration", unit="s",
                                               description=INSTRUMENTS[1][3])
        self.queue_wait = meter.create_histogram("pipekit.stage.queue.wait", unit="s",
                                                 description=INSTRUMENTS[2][3])
        for name, kind, unit, desc in INSTRUMENTS:
            if kind == "histogram":
                continue
            cb = self._callback(name)
            if kind == "counter":
                meter.create_observable_counter(name, callbacks=[cb], unit=unit,
                                                description=desc)
            else:
                meter.create_observable_gauge(name, callbacks=[cb], unit=unit,
                                              description=desc)

    @classmethod
    def for_meter(cls, meter: Any) -> _Instruments:
        """The shared instruments of ``meter``, created on first use."""
        entry = cls._by_meter.get(id(meter))
        if entry is None or entry[0] is not meter:
            entry = (meter, cls(meter))
            cls._by_meter[id(meter)] = entry
        return entry[1]

    def _callback(self, name: str) -> Callable[[CallbackOptions], Iterable[Observation]]:
        def call(options: CallbackOptions) -> Iterable[Observation]:
            out: list[Observation] = []
            for tel in list(self.live.values()):
                try:
                    out.extend(tel.callbacks[name](options))
                except Exception:  # telemetry never breaks the pipeline
                    log.debug("metric callback %s failed", name, exc_info=True)
            return out

        return call
