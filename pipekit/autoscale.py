"""Autoscaling: a pure policy that sizes a stage's worker pool, and the loop that applies it.

Data flow, once per tick (1 s by default)::

    runner counters ──StageSample──► observe() ──Observation──► decide() ──ScaleDecision
     (cumulative)                  (EWMA rates)                  (pure)        │
                                                         apply(stage, n) ◄─────┤
                      ScaleEvent: deque, log record, on_decision(event) ◄──────┤
                                                 ScaleState for the next tick ◄┘

The sizing rule (``docs/autoscaling.md`` explains each setting and its default)::

    demand      = arrival_rate + backlog / backlog_drain_seconds          items/s
    recommended = demand * service_time / target_utilisation             workers (Little's law)

When the input channel stays full, arrivals wait upstream unseen, and the recommendation
is at least double the current count until it has room.

A recommendation above the current count by more than ``tolerance`` scales up at once, by
at most ``max_scale_up_factor``, unless a guard holds it: workers still starting, the
output channel full (the bottleneck is downstream), intake paused by the memory limit,
or process CPU at ``max_cpu_percent``. A scale-down goes only to the highest
recommendation of the last ``scale_down_stabilisation`` seconds, and only
``scale_down_delay`` seconds after the last scale-up. Lowering the target never stops a
worker mid-item: the runner retires workers as their batches finish.

:func:`observe`, :func:`decide` and :func:`find_bottleneck` are pure and take well under
a millisecond; :class:`AutoscaleController` owns the per-stage state, applies decisions
through a callback, and records them, driven by :meth:`~AutoscaleController.tick` (tests
pass a fake clock's time) or by its ``pipekit-autoscaler`` thread.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import timedelta
from typing import Any, Literal, NamedTuple

from pipekit.errors import ConfigError, PipelineStateError
from pipekit.stats import ScaleEvent

__all__ = [
    "REASONS",
    "AutoscaleController",
    "AutoscalePolicy",
    "Bottleneck",
    "Direction",
    "Observation",
    "ScaleDecision",
    "ScaleState",
    "StageSample",
    "decide",
    "find_bottleneck",
    "observe",
]

logger = logging.getLogger("pipekit.autoscale")

Direction = Literal["up", "down", "hold"]

#: Every reason code a decision can carry: a small fixed set, safe as a metric attribute.
REASONS: frozenset[str] = frozenset({
    "arrival",           # up: arrivals need more workers (Little's law)
    "backlog",           # up: the queued items need more workers to drain in time
    "idle",              # down: demand has stayed lower for the whole stabilisation window
    "cpu_limit",         # hold: process CPU is at max_cpu_percent
    "memory_paused",     # hold: intake is paused by the memory limit
    "downstream_full",   # hold: the output channel is full, the bottleneck is downstream
    "starting",          # hold: workers added by the last scale-up have not started yet
    "stabilising",       # hold: demand fell, but not for long enough to scale down
    "at_max",            # hold (or clamp down): the stage is at max_workers
    "at_min",            # hold (or clamp up): the stage is at min_workers
    "within_tolerance",  # hold: the recommendation is close enough to the current count
    "warming_up",        # hold: no rates or service time measured yet
})

_EPS = 1e-9
# Two arrival measurements in a row this many deviations from the estimate start to pull
# it faster, and at _JUMP_AT replace it: 4 mean absolute deviations are about 3.2 standard
# ones, which Poisson noise reaches twice in a row about once a month of 1 s ticks.
_JUMP_FROM, _JUMP_AT = 4.0, 8.0
# The rate EWMAs remember at least about this many items: 100 keeps Poisson noise near 7 %.
_MEMORY_ITEMS = 100.0
# After this many ticks in a row with the input channel full, arrivals are known to wait
# upstream (their rate is unseen), and the recommendation is at least double the count.
_FULL_STREAK = 2
# A stage counts as busy for find_bottleneck when its workers are this utilised.
_BUSY_UTILISATION = 0.9


def _check_number(name: str, value: object, low: float, high: float | None = None, *,
                  low_open: bool = False, hint: str = "") -> float:
    """Return ``value`` as a float, or raise ConfigError naming it and the allowed range."""
    if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
        number = float(value)
        if (number > low if low_open else number >= low) and (high is None or number <= high):
            return number
    bound = f"> {low:g}" if low_open else f">= {low:g}"
    if high is not None:
        bound = f"in ({low:g}, {high:g}]" if low_open else f"in [{low:g}, {high:g}]"
    raise ConfigError(f"{name} must be a number {bound} (got {value!r}){hint}")


def _check_count(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{name} must be an int (got {value!r}); pass a whole number of workers")
    if value < 1:
        raise ConfigError(f"{name} must be >= 1 (got {value}); a stage needs a worker to progress")
    return value


@dataclass(frozen=True, slots=True, kw_only=True)
class AutoscalePolicy:
    """How an autoscaled stage sizes its worker pool; immutable and safe to share.

    ``workers=(1, 16)`` on a stage becomes ``AutoscalePolicy(min_workers=1, max_workers=16)``;
    vary the rest with ``dataclasses.replace``. ``docs/autoscaling.md`` justifies each default.

    Attributes:
        min_workers: the fewest workers (at least 1).
        max_workers: the most workers.
        target_utilisation: the busy fraction to size for (0.7 keeps 30 % headroom).
        backlog_drain_seconds: size so that queued items drain within this many seconds.
        tolerance: ignore recommendations within this fraction of the current count.
        max_scale_up_factor: one decision at most multiplies the count by this (and
            always allows one more worker).
        scale_down_stabilisation: seconds of recommendations whose highest a scale-down
            goes to.
        scale_down_delay: seconds after a scale-up before any scale-down.
        startup_grace: the longest wait, in seconds, for workers still starting before
            deciding again.
        smoothing: EWMA weight of a one-second measurement of the rates; lower at low
            rates, so that the rates always remember about 100 items.
        max_cpu_percent: hold scale-ups while process CPU is at or above this, in percent
            of one core (200 = two cores busy); ``None`` takes the pipeline's setting.

    Raises:
        ConfigError: a value is out of range; the message names it and the fix.
    """

    min_workers: int = 1
    max_workers: int
    target_utilisation: float = 0.7
    backlog_drain_seconds: float = 10.0
    tolerance: float = 0.1
    max_scale_up_factor: float = 4.0
    scale_down_stabilisation: float = 60.0
    scale_down_delay: float = 30.0
    startup_grace: float = 30.0
    smoothing: float = 0.2
    max_cpu_percent: float | None = None

    def __post_init__(self) -> None:
        _check_count("min_workers", self.min_workers)
        _check_count("max_workers", self.max_workers)
        if self.max_workers < self.min_workers:
            raise ConfigError(
                f"max_workers must be >= min_workers (got max_workers={self.max_workers}, "
                f"min_workers={self.min_workers})")
        _check_number("target_utilisation", self.target_utilisation, 0.0, 1.0, low_open=True,
                      hint="; 0.7 keeps 30 % headroom")
        _check_number("backlog_drain_seconds", self.backlog_drain_seconds, 0.0, low_open=True)
        _check_number("tolerance", self.tolerance, 0.0, 0.5, hint="; 0.1 ignores changes of 10 %")
        _check_number("max_scale_up_factor", self.max_scale_up_factor, 1.0,
                      hint="; 1.0 adds one worker at a time")
        _check_number("scale_down_stabilisation", self.scale_down_stabilisation, 0.0)
        _check_number("scale_down_delay", self.scale_down_delay, 0.0)
        _check_number("startup_grace", self.startup_grace, 0.0)
        _check_number("smoothing", self.smoothing, 0.0, 1.0, low_open=True,
                      hint="; 0.2 smooths over about five seconds")
        if self.max_cpu_percent is not None:
            _check_number("max_cpu_percent", self.max_cpu_percent, 0.0, low_open=True,
                          hint="; 100 means one core, None takes the pipeline's setting")

    @property
    def fixed(self) -> bool:
        """True when ``min_workers == max_workers``: there is nothing to scale."""
        return self.min_workers == self.max_workers

    @classmethod
    def from_workers(cls, value: object) -> AutoscalePolicy:
        """Build a policy from a stage's ``workers=`` argument.

        Args:
            value: an int (a fixed count), a ``(min, max)`` pair of ints, or a policy.

        Returns:
            The policy (``value`` itself when it already is one).

        Raises:
            ConfigError: ``value`` is a bool, not an int or pair, below 1, or reversed.
        """
        if isinstance(value, AutoscalePolicy):
            return value
        if isinstance(value, bool) or not isinstance(value, int | tuple | list):
            raise ConfigError(
                f"workers must be an int, a (min, max) tuple of ints or an AutoscalePolicy "
                f"(got {value!r}); for example workers=4 or workers=(1, 16)")
        if isinstance(value, int):
            n = _check_count("workers", value)
            return cls(min_workers=n, max_workers=n)
        pair = tuple(value)
        if len(pair) != 2 or not all(isinstance(v, int) and not isinstance(v, bool)
                                     for v in pair):
            raise ConfigError(f"workers must be a (min, max) pair of ints (got {pair!r}); "
                              "for example workers=(1, 16)")
        low, high = pair
        if low < 1:
            raise ConfigError(f"workers min must be >= 1 (got workers={pair!r}); "
                              "a stage needs a worker to progress")
        return cls(min_workers=low, max_workers=high)


@dataclass(frozen=True, slots=True, kw_only=True)
class StageSample:
    """What the runner reports for one stage at a tick: cumulative counters and gauges.

    Attributes:
        stage: the stage name.
        now: monotonic seconds when the sample was taken.
        received: items put into the stage's input channel, ever (the channel's
            ``put_total``, not the items dispatched: arrivals must include queued items).
        completed: items finished, succeeded or failed, ever.
        busy_seconds: wall seconds workers spent running batches, ever. Adding a batch's
            time when it finishes is fine: what exceeds ``workers`` seconds per second is
            carried to the next tick.
        queue_depth: items waiting in the input channel (and held for busy keys).
        queue_capacity: the input channel's capacity.
        in_flight: items handed to workers and not yet finished.
        workers: workers that can run a batch now. Report only started workers while
            new ones are still starting, so the autoscaler waits for them.
        downstream_full: the next stage's channel is full, or the sink is blocking.
    """

    stage: str
    now: float
    received: int
    completed: int
    busy_seconds: float
    queue_depth: int
    queue_capacity: int
    in_flight: int
    workers: int
    downstream_full: bool


@dataclass(frozen=True, slots=True, kw_only=True)
class Observation:
    """The smoothed view of one stage that :func:`decide` reads.

    Attributes:
        stage: the stage name.
        now: monotonic seconds of the sample.
        arrival_rate: items entering the stage per second (EWMA that follows a jump
            beyond the noise at once, see :func:`observe`).
        arrival_noise: mean absolute deviation of the per-interval arrival rate (EWMA).
        arrival_shift: the last interval's arrival rate minus the estimate before it, in
            units of ``arrival_noise`` (signed).
        completion_rate: items finished per second (EWMA).
        busy_workers: workers busy on average (EWMA of busy seconds per second).
        busy_carry: busy seconds reported beyond ``workers * dt``, counted next interval.
        service_time: worker-seconds per item (``busy_workers / completion_rate``), or
            ``None`` before the first completion.
        utilisation: ``busy_workers / workers``, 0..1.
        backlog: items waiting in the input channel.
        queue_capacity: the input channel's capacity.
        in_flight: items being worked on.
        workers: workers that can run now.
        downstream_full: the output channel is full (or the sink is blocking).
        cpu_percent: process CPU in percent of one core, or ``None`` when unknown.
        intake_paused: pipeline intake is paused by the memory limit.
        intervals: how many sample-to-sample intervals the rates are built from.
        full_streak: consecutive samples that found the input channel full.
        sample: the raw sample, kept so the next :func:`observe` can take deltas.
    """

    stage: str
    now: float
    arrival_rate: float = 0.0
    arrival_noise: float = 0.0
    arrival_shift: float = 0.0
    completion_rate: float = 0.0
    busy_workers: float = 0.0
    busy_carry: float = 0.0
    service_time: float | None = None
    utilisation: float = 0.0
    backlog: int = 0
    queue_capacity: int = 0
    in_flight: int = 0
    workers: int = 0
    downstream_full: bool = False
    cpu_percent: float | None = None
    intake_paused: bool = False
    intervals: int = 0
    full_streak: int = 0
    sample: StageSample | None = None


def observe(sample: StageSample, previous: Observation | None = None, *,
            smoothing: float = 0.2, cpu_percent: float | None = None,
            intake_paused: bool = False) -> Observation:
    """Turn a sample into an :class:`Observation`, smoothing rates from the previous one.

    Rates come from counter deltas between the two samples. Each is an EWMA whose weight
    for an interval of ``dt`` seconds is ``w = 1 - (1 - smoothing) ** dt``, so behaviour
    does not depend on the tick interval; the first interval is taken as it is. The
    arrival rate's weight rises from ``w`` to 1 as two measurements in a row move from 4
    to 8 times the usual deviation away from the estimate, on the same side: a load step
    is followed in two ticks, while noise and one-tick bursts stay smoothed. Busy seconds
    are clamped to ``workers * dt``: a runner that adds them when a batch finishes would
    otherwise report a long batch as a burst of impossible utilisation.

    Args:
        sample: the stage's counters now.
        previous: the observation of the previous tick, or ``None`` on the first.
        smoothing: the EWMA weight of one second of measurement, in (0, 1].
        cpu_percent: process CPU in percent of one core, or ``None``.
        intake_paused: whether intake is paused by the memory limit.

    Returns:
        The new observation (rates at zero and ``intervals == 0`` on the first sample or
        after the counters went backwards).
    """
    prev = previous.sample if previous is not None else None
    full = 0 < sample.queue_capacity <= sample.queue_depth
    fresh = Observation(
        stage=sample.stage, now=sample.now, backlog=sample.queue_depth,
        queue_capacity=sample.queue_capacity, in_flight=sample.in_flight,
        workers=sample.workers, downstream_full=sample.downstream_full,
        cpu_percent=cpu_percent, intake_paused=intake_paused, sample=sample,
        full_streak=previous.full_streak + 1 if full and previous is not None else int(full))
    if previous is None or prev is None or (
            sample.received < prev.received or sample.completed < prev.completed):
        return fresh
    dt = sample.now - prev.now
    if dt <= 0:  # the same instant twice: keep the rates and the older sample for deltas
        return replace(previous, now=sample.now, backlog=fresh.backlog,
                       in_flight=fresh.in_flight, workers=fresh.workers,
                       downstream_full=fresh.downstream_full, cpu_percent=cpu_percent,
                       intake_paused=intake_paused, full_streak=previous.full_streak)
    # Busy seconds beyond workers * dt (a runner adds a batch's time when it finishes)
    # are carried into the next interval, at most one interval's worth.
    cap = max(sample.workers, prev.workers) * dt
    reported = max(sample.busy_seconds - prev.busy_seconds, 0.0) + previous.busy_carry
    busy, carry = min(reported, cap) / dt, min(max(reported - cap, 0.0), cap)
    arrival = (sample.received - prev.received) / dt
    done = (sample.completed - prev.completed) / dt
    noise = shift = 0.0
    if previous.intervals:
        w = 1.0 - (1.0 - smoothing) ** dt
        # Low rates are noisy: let the expected count, never the measured one (that would
        # bias the mean up), cap the weight so that the memory spans _MEMORY_ITEMS items.
        wa = min(w, max(previous.arrival_rate * dt, 1.0) / _MEMORY_ITEMS)
        wd = min(w, max(previous.completion_rate * dt, 1.0) / _MEMORY_ITEMS)
        arrival, noise, shift = _track(previous, arrival, wa, dt)
        done = previous.completion_rate + wd * (done - previous.completion_rate)
        busy = previous.busy_workers + wd * (busy - previous.busy_workers)
    service = busy / done if done > _EPS else previous.service_time
    return replace(fresh, arrival_rate=arrival, arrival_noise=noise, arrival_shift=shift,
                   completion_rate=done, busy_workers=busy, busy_carry=carry,
                   service_time=service,
                   utilisation=min(1.0, busy / sample.workers) if sample.workers else 0.0,
                   intervals=previous.intervals + 1)


def _track(previous: Observation, rate: float, w: float,
           dt: float) -> tuple[float, float, float]:
    """Return the next arrival estimate, noise and shift: an EWMA that follows a clear step."""
    mean, noise = previous.arrival_rate, previous.arrival_noise
    deviation = abs(rate - mean)
    if previous.intervals < 2:  # no noise measured yet: plain EWMA, and start measuring
        return mean + w * (rate - mean), deviation, 0.0
    # At least the Poisson deviation of the count: low rates are skewed, and a noise
    # estimate from a quiet spell must not make the next ordinary burst look like a step.
    scale = max(noise, math.sqrt(max(mean, 1.0 / dt) / dt))
    shift = (rate - mean) / scale
    confirmed = min(abs(shift), abs(previous.arrival_shift))
    if shift * previous.arrival_shift <= 0:  # a one-interval burst or dip is noise
        confirmed = 0.0
    jump = min(max((confirmed - _JUMP_FROM) / (_JUMP_AT - _JUMP_FROM), 0.0), 1.0)
    gain = w + (1.0 - w) * jump
    return (mean + gain * (rate - mean),
            noise + w * (min(deviation, _JUMP_AT * scale) - noise), shift)


@dataclass(frozen=True, slots=True, kw_only=True)
class ScaleState:
    """What :func:`decide` remembers about one stage between ticks.

    Attributes:
        policy: the stage's policy.
        target: the worker count last decided (0 before the first decision: the observed
            count is taken).
        last_up_at: monotonic seconds of the last scale-up, or ``None``.
        last_down_at: monotonic seconds of the last scale-down, or ``None``.
        window: ``(time, recommendation)`` pairs of the stabilisation window, kept as a
            decreasing sequence so that the first one is the highest.
    """

    policy: AutoscalePolicy
    target: int = 0
    last_up_at: float | None = None
    last_down_at: float | None = None
    window: tuple[tuple[float, float], ...] = ()


@dataclass(frozen=True, slots=True, kw_only=True)
class ScaleDecision:
    """What :func:`decide` concluded for one stage, and why.

    Attributes:
        stage: the stage name.
        current: the worker count before the decision.
        desired: the worker count to apply (equal to ``current`` for a hold).
        direction: ``"up"``, ``"down"`` or ``"hold"``.
        reason: a code from :data:`REASONS`.
        detail: one human sentence explaining the decision.
        inputs: the numbers the decision was made from.
        state: the stage's state for the next tick, assuming the decision is applied.
    """

    stage: str
    current: int
    desired: int
    direction: Direction
    reason: str
    detail: str
    inputs: dict[str, float]
    state: ScaleState

    @property
    def changed(self) -> bool:
        """True when the decision changes the worker count."""
        return self.direction != "hold"

    def to_event(self, at: float) -> ScaleEvent:
        """Return the decision as a :class:`~pipekit.stats.ScaleEvent` at ``at`` seconds."""
        return ScaleEvent(at=at, stage=self.stage, direction=self.direction,
                          current=self.current, desired=self.desired, reason=self.reason,
                          inputs=dict(self.inputs))


def _push(window: tuple[tuple[float, float], ...], now: float, value: float,
          span: float) -> tuple[tuple[float, float], ...]:
    """Add ``value`` to a decreasing max-window, dropping entries older than ``span``."""
    kept = [(t, v) for t, v in window if t >= now - span - _EPS and v > value]
    kept.append((now, value))
    return tuple(kept)


def decide(observation: Observation, state: ScaleState) -> ScaleDecision:
    """Decide the worker count of one stage: pure, cheap, and explained.

    Args:
        observation: the stage's smoothed view now (see :func:`observe`).
        state: what was decided before, with the policy (``ScaleState(policy=...)`` at first).

    Returns:
        The decision; ``decision.state`` is the state to pass next time.
    """
    p, o = state.policy, observation
    current = _current(o, state)
    service = o.service_time or 0.0
    load = o.arrival_rate * service
    drain = o.backlog * service / p.backlog_drain_seconds
    raw = (load + drain) / p.target_utilisation
    if o.full_streak >= _FULL_STREAK:  # arrivals wait upstream, unseen: probe by doubling
        raw = max(raw, 2.0 * current)
    clamped = min(max(raw, p.min_workers), p.max_workers)
    window = _push(state.window, o.now, clamped, p.scale_down_stabilisation)
    inputs = {
        "arrival_rate": o.arrival_rate, "arrival_noise": o.arrival_noise,
        "completion_rate": o.completion_rate,
        "service_time": service, "backlog": float(o.backlog), "utilisation": o.utilisation,
        "workers": float(o.workers), "load_workers": load, "drain_workers": drain,
        "recommended": raw, "window_max": window[0][1],
        "downstream_full": float(o.downstream_full), "intake_paused": float(o.intake_paused),
    }
    if o.cpu_percent is not None:
        inputs["cpu_percent"] = o.cpu_percent
    nxt = replace(state, target=current, window=window)
    made = _Maker(o.stage, current, inputs, nxt, o.now)
    if current < p.min_workers or current > p.max_workers:
        to = p.min_workers if current < p.min_workers else p.max_workers
        return made.change(to, "at_min" if to == p.min_workers else "at_max",
                           f"{current} workers is outside [{p.min_workers}, {p.max_workers}]")
    if o.intervals == 0 or (o.service_time is None and (o.arrival_rate or o.backlog
                                                         or o.in_flight)):
        return made.hold("warming_up", "no rates or service time measured yet")
    rec = math.ceil(clamped - _EPS)
    if rec > current and raw > current * (1.0 + p.tolerance):
        return _decide_up(made, o, state, rec)
    if rec < current and raw < current * (1.0 - p.tolerance):
        return _decide_down(made, o, state, window[0][1])
    if raw > current * (1.0 + p.tolerance) and current == p.max_workers:
        return made.hold("at_max", f"{raw:.1f} workers recommended; max_workers is {current}")
    if raw < current * (1.0 - p.tolerance) and current == p.min_workers:
        return made.hold("at_min", f"{raw:.1f} workers recommended; min_workers is {current}")
    return made.hold("within_tolerance", f"{raw:.1f} workers recommended for {current}")


def _current(o: Observation, state: ScaleState) -> int:
    """The count to decide from: the last target, unless the runner settled elsewhere.

    A count the runner reports for longer than ``startup_grace`` after the last change
    (someone else set it, or new workers never started) is taken as the truth.
    """
    if not state.target or o.workers == state.target:
        return state.target or o.workers
    changes = [t for t in (state.last_up_at, state.last_down_at) if t is not None]
    if changes and o.now - max(changes) < state.policy.startup_grace:
        return state.target
    return o.workers


class _Maker:
    """Builds the decisions of one :func:`decide` call (shared fields set once)."""

    __slots__ = ("current", "inputs", "now", "stage", "state")

    def __init__(self, stage: str, current: int, inputs: dict[str, float], state: ScaleState,
                 now: float) -> None:
        self.stage, self.current, self.inputs, self.state, self.now = (
            stage, current, inputs, state, now)

    def hold(self, reason: str, detail: str) -> ScaleDecision:
        return ScaleDecision(stage=self.stage, current=self.current, desired=self.current,
                             direction="hold", reason=reason, detail=detail,
                             inputs=self.inputs, state=self.state)

    def change(self, desired: int, reason: str, detail: str) -> ScaleDecision:
        up = desired > self.current
        state = replace(self.state, target=desired,
                        last_up_at=self.now if up else self.state.last_up_at,
                        last_down_at=self.state.last_down_at if up else self.now)
        return ScaleDecision(stage=self.stage, current=self.current, desired=desired,
                             direction="up" if up else "down", reason=reason, detail=detail,
                             inputs=self.inputs, state=state)


def _starting(o: Observation, state: ScaleState) -> bool:
    """True while workers added by the last scale-up are not all running, within grace."""
    return (state.last_up_at is not None and o.workers < state.target
            and o.now - state.last_up_at < state.policy.startup_grace)


def _decide_up(made: _Maker, o: Observation, state: ScaleState, rec: int) -> ScaleDecision:
    p, current = state.policy, made.current
    if _starting(o, state):
        return made.hold("starting", f"{state.target - o.workers} workers are still starting")
    if o.downstream_full:
        return made.hold("downstream_full", "the output channel is full: the bottleneck is "
                         "downstream, more workers here would only wait")
    if o.intake_paused:
        return made.hold("memory_paused", "intake is paused by the memory limit")
    if (p.max_cpu_percent is not None and o.cpu_percent is not None
            and o.cpu_percent >= p.max_cpu_percent):
        return made.hold("cpu_limit", f"process CPU {o.cpu_percent:.0f} % is at the limit "
                         f"max_cpu_percent={p.max_cpu_percent:g}")
    step = max(current + 1, math.floor(current * p.max_scale_up_factor + _EPS))
    desired = min(rec, step)
    service = o.service_time or 0.0
    if o.full_streak >= _FULL_STREAK:
        return made.change(desired, "backlog", f"the input channel has been full for "
                           f"{o.full_streak} ticks: demand held upstream is unseen, so the "
                           f"workers double until it has room")
    if made.inputs["drain_workers"] > made.inputs["load_workers"]:
        return made.change(desired, "backlog", f"{o.backlog} queued items at "
                           f"{service * 1e3:.1f} ms each need {rec} workers to drain within "
                           f"{p.backlog_drain_seconds:g} s")
    return made.change(desired, "arrival", f"{o.arrival_rate:.1f} items/s at "
                       f"{service * 1e3:.1f} ms each need {rec} workers at "
                       f"{p.target_utilisation:.0%} utilisation")


def _decide_down(made: _Maker, o: Observation, state: ScaleState,
                 window_max: float) -> ScaleDecision:
    p, current = state.policy, made.current
    if _starting(o, state):
        return made.hold("starting", f"{state.target - o.workers} workers are still starting")
    if state.last_up_at is not None and o.now - state.last_up_at < p.scale_down_delay:
        return made.hold("stabilising", f"scaled up {o.now - state.last_up_at:.0f} s ago; "
                         f"scale-downs wait {p.scale_down_delay:g} s")
    to = math.ceil(window_max - _EPS)
    if to >= current or window_max >= current * (1.0 - p.tolerance):
        return made.hold("stabilising", f"{window_max:.1f} workers were needed within the "
                         f"last {p.scale_down_stabilisation:g} s")
    return made.change(to, "idle", f"at most {window_max:.1f} workers were needed over the "
                       f"last {p.scale_down_stabilisation:g} s")


class Bottleneck(NamedTuple):
    """The stage that limits a pipeline's throughput now.

    Attributes:
        stage: the stage name (``""`` when there are no stages).
        reason: ``"busy"`` (all workers busy while items wait), ``"blocked downstream"``
            (its output channel or the sink is full) or ``"starved"`` (nothing waits
            anywhere: the input limits throughput), or ``""``.
        estimate: items/s that one more worker at that stage would add (0.0 when it
            would not help).
    """

    stage: str
    reason: str
    estimate: float


def find_bottleneck(stage_observations: Sequence[Observation]) -> Bottleneck:
    """Name the stage that limits throughput, and what one more worker there would give.

    Upstream of a slow stage, channels fill and stages block, so the limiting stage is the
    most downstream one under pressure: all workers busy with items waiting (``"busy"``),
    or items waiting behind a full output (``"blocked downstream"``: the sink, or a
    stage that cannot take more without being busy itself, limits it). With no stage under
    pressure, the pipeline is ``"starved"`` and the first stage is named.

    Args:
        stage_observations: one observation per stage, in pipeline order.

    Returns:
        The bottleneck; ``estimate`` is one worker's throughput at that stage, capped by
        the spare capacity of every other stage (fan-out and drops are ignored).
    """
    if not stage_observations:
        return Bottleneck("", "", 0.0)
    chosen = -1
    for i, o in enumerate(stage_observations):
        # utilisation, not items in flight: with micro-batches, items outnumber workers
        if o.backlog > 0 and (o.utilisation >= _BUSY_UTILISATION or o.downstream_full):
            chosen = i
    if chosen < 0:
        return Bottleneck(stage_observations[0].stage, "starved", 0.0)
    o = stage_observations[chosen]
    if o.downstream_full:
        return Bottleneck(o.stage, "blocked downstream", 0.0)
    if not o.service_time:
        return Bottleneck(o.stage, "busy", 0.0)
    gain = 1.0 / o.service_time
    for j, other in enumerate(stage_observations):
        if j != chosen and other.service_time:
            spare = other.workers / other.service_time - other.completion_rate
            gain = min(gain, max(spare, 0.0))
    return Bottleneck(o.stage, "busy", gain)


class AutoscaleController:
    """Applies :func:`decide` to every autoscaled stage once per tick, and records why.

    Each tick reads a :class:`StageSample` per stage from ``sample``, updates the stage's
    :class:`Observation`, calls :func:`decide` for stages with a non-fixed policy, calls
    ``apply(stage, desired)`` when the count changes, and records a
    :class:`~pipekit.stats.ScaleEvent` for every change and for every hold whose reason
    differs from the stage's previous decision. Each event is logged on
    ``pipekit.autoscale`` (``extra={"pipekit": {...}}``), kept in a bounded deque, and
    passed to ``on_decision`` (where telemetry counts ``pipekit.autoscaler.decisions``).

    Drive it with :meth:`tick` (tests pass the fake clock's time), or :meth:`start` a
    daemon thread ``pipekit-autoscaler`` that ticks every ``interval`` seconds until
    :meth:`stop`. Errors from ``apply`` and ``on_decision`` are logged, never raised.

    Args:
        policies: stage name to policy (or a ``workers=`` value such as ``(1, 16)``).
        sample: returns one sample per stage, in pipeline order (stages without a policy
            are observed for :meth:`bottleneck` only).
        apply: sets a stage's worker target; must not block (workers retire as their
            batches finish).
        pipeline: the pipeline name, for log records.
        interval: seconds (or a ``timedelta``) between ticks of the thread.
        clock: monotonic clock in seconds.
        cpu_percent: returns process CPU in percent of one core, or ``None`` if unknown.
        intake_paused: returns whether intake is paused by the memory limit.
        max_cpu_percent: the pipeline's CPU limit, used by policies that leave theirs unset.
        on_decision: called with each recorded event.
        max_events: how many recent events :meth:`events` keeps.
        started_at: clock time of the run's start, for ``ScaleEvent.at`` (default: now).

    Raises:
        ConfigError: ``interval`` or ``max_events`` is out of range, or a policy is invalid.
    """

    def __init__(
        self,
        policies: Mapping[str, AutoscalePolicy | int | tuple[int, int]],
        *,
        sample: Callable[[], Iterable[StageSample]],
        apply: Callable[[str, int], object],
        pipeline: str = "",
        interval: float | timedelta = 1.0,
        clock: Callable[[], float] = time.monotonic,
        cpu_percent: Callable[[], float | None] | None = None,
        intake_paused: Callable[[], bool] | None = None,
        max_cpu_percent: float | None = None,
        on_decision: Callable[[ScaleEvent], object] | None = None,
        max_events: int = 256,
        started_at: float | None = None,
    ) -> None:
        seconds = interval.total_seconds() if isinstance(interval, timedelta) else interval
        self._interval = _check_number("autoscale interval", seconds, 0.0, low_open=True,
                                       hint="; use a value such as 1.0")
        if isinstance(max_events, bool) or not isinstance(max_events, int) or max_events < 1:
            raise ConfigError(f"max_events must be an int >= 1 (got {max_events!r})")
        self._policies: dict[str, AutoscalePolicy] = {}
        for name, value in policies.items():
            policy = AutoscalePolicy.from_workers(value)
            if policy.max_cpu_percent is None and max_cpu_percent is not None:
                policy = replace(policy, max_cpu_percent=max_cpu_percent)
            self._policies[name] = policy
        self.pipeline = pipeline
        self._sample, self._apply, self._clock = sample, apply, clock
        self._cpu, self._paused, self._on_decision = cpu_percent, intake_paused, on_decision
        self._started_at = clock() if started_at is None else started_at
        self._states: dict[str, ScaleState] = {}
        self._observations: dict[str, Observation] = {}
        self._last_reason: dict[str, str] = {}
        self._failing: set[str] = set()  # stages whose apply() is failing
        self._events: deque[ScaleEvent] = deque(maxlen=max_events)
        self._changes: deque[ScaleEvent] = deque(maxlen=10_000)
        self._bottleneck = Bottleneck("", "", 0.0)
        self._lock = threading.Lock()       # guards the deques and the thread handle
        self._tick_lock = threading.Lock()  # one tick at a time
        self._stop_event = threading.Event()
        self._thread: threading.Thread | None = None

    def __repr__(self) -> str:
        return (f"AutoscaleController(pipeline={self.pipeline!r}, "
                f"stages={sorted(self._policies)}, interval={self._interval}, "
                f"running={self.running})")

    @property
    def interval(self) -> float:
        """Seconds between ticks of the thread."""
        return self._interval

    @property
    def policies(self) -> Mapping[str, AutoscalePolicy]:
        """The policy of each autoscaled stage (the pipeline's CPU limit filled in)."""
        return dict(self._policies)

    @property
    def running(self) -> bool:
        """True while the ``pipekit-autoscaler`` thread is alive."""
        thread = self._thread
        return thread is not None and thread.is_alive()

    def tick(self, now: float | None = None) -> tuple[ScaleEvent, ...]:
        """Observe every stage, decide and apply once, and record the events.

        Args:
            now: the clock's time; ``None`` reads the clock. Events are stamped with
                ``now - started_at``; rates use the samples' own ``now``.

        Returns:
            The events recorded by this tick.
        """
        with self._tick_lock:
            now = self._clock() if now is None else now
            cpu = self._cpu() if self._cpu is not None else None
            paused = self._paused() if self._paused is not None else False
            observations: dict[str, Observation] = {}
            events: list[ScaleEvent] = []
            for s in self._sample():
                policy = self._policies.get(s.stage)
                obs = observe(s, self._observations.get(s.stage),
                              smoothing=policy.smoothing if policy else 0.2,
                              cpu_percent=cpu, intake_paused=paused)
                observations[s.stage] = obs
                if policy is not None and not policy.fixed:
                    event = self._decide_one(obs, policy, now)
                    if event is not None:
                        events.append(event)
            self._observations = observations
            self._bottleneck = find_bottleneck(list(observations.values()))
        for event in events:
            self._publish(event)
        return tuple(events)

    def _decide_one(self, obs: Observation, policy: AutoscalePolicy,
                    now: float) -> ScaleEvent | None:
        state = self._states.get(obs.stage) or ScaleState(policy=policy)
        decision = decide(obs, state)
        next_state = decision.state
        if decision.changed:
            try:
                self._apply(obs.stage, decision.desired)
            except Exception:
                # one traceback per streak of failures, not one per tick
                log = logger.debug if obs.stage in self._failing else logger.exception
                self._failing.add(obs.stage)
                log("autoscale could not set stage %r to %d workers; keeping %d", obs.stage,
                    decision.desired, decision.current, exc_info=True,
                    extra={"pipekit": {"event": "autoscale.apply_failed",
                                       "pipeline": self.pipeline, "stage": obs.stage}})
                self._states[obs.stage] = replace(next_state, target=decision.current,
                                                  last_up_at=state.last_up_at,
                                                  last_down_at=state.last_down_at)
                return None
            self._failing.discard(obs.stage)
        self._states[obs.stage] = next_state
        if not decision.changed and self._last_reason.get(obs.stage) == decision.reason:
            return None
        self._last_reason[obs.stage] = decision.reason
        event = decision.to_event(now - self._started_at)
        with self._lock:
            self._events.append(event)
            if decision.changed:
                self._changes.append(event)
        if logger.isEnabledFor(logging.INFO):
            self._log(decision)
        return event

    def _log(self, decision: ScaleDecision) -> None:
        logger.info("autoscale decision", extra={"pipekit": {
            "event": "autoscale.decision", "pipeline": self.pipeline,
            "stage": decision.stage, "direction": decision.direction,
            "current": decision.current, "desired": decision.desired,
            "reason": decision.reason, "detail": decision.detail,
            "inputs": dict(decision.inputs)}})

    def _publish(self, event: ScaleEvent) -> None:
        if self._on_decision is None:
            return
        try:
            self._on_decision(event)
        except Exception:  # telemetry never breaks the pipeline
            logger.warning("autoscale on_decision callback %r raised", self._on_decision,
                           exc_info=True)

    def events(self) -> tuple[ScaleEvent, ...]:
        """The most recent events (changes and holds whose reason changed), oldest first."""
        with self._lock:
            return tuple(self._events)

    def changes(self) -> tuple[ScaleEvent, ...]:
        """Every decision that changed a worker count (the last 10,000), oldest first."""
        with self._lock:
            return tuple(self._changes)

    def observations(self) -> Mapping[str, Observation]:
        """The latest observation of every stage, by name."""
        return dict(self._observations)

    def bottleneck(self) -> Bottleneck:
        """The bottleneck found at the latest tick."""
        return self._bottleneck

    def desired(self, stage: str) -> int | None:
        """The worker count last decided for ``stage``, or ``None`` before its first tick."""
        state = self._states.get(stage)
        return state.target if state is not None and state.target else None

    def start(self) -> None:
        """Start ticking every ``interval`` seconds on the daemon thread ``pipekit-autoscaler``.

        Raises:
            PipelineStateError: the thread is already running.
        """
        with self._lock:
            if self.running:
                raise PipelineStateError("the autoscaler is already running; "
                                         "call stop() before start()")
            self._stop_event = threading.Event()
            self._thread = threading.Thread(target=self._run, args=(self._stop_event,),
                                            name="pipekit-autoscaler", daemon=True)
            self._thread.start()

    def stop(self, timeout: float | None = None) -> None:
        """Stop the thread and wait for it (at most ``timeout`` seconds); idempotent."""
        with self._lock:
            thread, self._thread = self._thread, None
            self._stop_event.set()
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)

    def __enter__(self) -> AutoscaleController:
        self.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def _run(self, stop: threading.Event) -> None:
        failing = False
        while not stop.wait(self._interval):
            try:
                self.tick()
            except Exception:
                log = logger.debug if failing else logger.exception
                log("autoscale tick failed; the next tick retries", exc_info=True,
                    extra={"pipekit": {"event": "autoscale.tick_failed",
                                       "pipeline": self.pipeline}})
                failing = True
            else:
                failing = False
