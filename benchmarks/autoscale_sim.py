"""The autoscaler on a simulated stage: the issue's targets against measured values.

Run ``python benchmarks/autoscale_sim.py`` (a few seconds). For each scenario it prints
the target from the autoscaling issue and what the real :class:`AutoscaleController`,
ticking on a simulated clock, achieved; then the median cost of one controller tick per
stage. It never asserts: ``tests/test_autoscale.py`` imports this module and checks the
same scenarios.

The simulator is a discrete-event model of one stage: arrivals from a load trace
(evenly spaced, or a Poisson process from a seeded RNG) enter a bounded queue (a full
queue holds them upstream, as backpressure does), ``workers`` servers take items in
order, each for a service time (fixed, or log-normal around the mean), and report busy
time when an item finishes, as the runner does per batch. A scale-up adds workers after
``startup_delay`` seconds; a scale-down retires idle workers at once and busy ones when
their item finishes. The oracle knows the load: at every tick it has exactly
``ceil(rate * service_time / target_utilisation)`` workers, clamped to the policy.
"""

from __future__ import annotations

import heapq
import itertools
import math
import random
import statistics
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from pipekit.autoscale import AutoscaleController, AutoscalePolicy, StageSample
from pipekit.stats import ScaleEvent

Trace = Callable[[float], float]


def constant(rate: float) -> Trace:
    """A steady load of ``rate`` items/s."""
    return lambda t: rate


def step(before: float, after: float, at: float) -> Trace:
    """``before`` items/s until ``at`` seconds, then ``after``."""
    return lambda t: before if t < at else after


def square(low: float, high: float, period: float) -> Trace:
    """``high`` for the first half of every ``period`` seconds, ``low`` for the second."""
    return lambda t: high if (t % period) < period / 2 else low


def mixed() -> Trace:
    """Fifteen minutes of a service's day: quiet, a surge, a slow decline, a spike, quiet.

    0-120 s 20/s; 120-300 s 100/s; 300-420 s falling linearly to 40/s; 420-600 s 40/s;
    600-780 s 150/s; 780-900 s 10/s.
    """
    def rate(t: float) -> float:
        if t < 120:
            return 20.0
        if t < 300:
            return 100.0
        if t < 420:
            return 100.0 - 60.0 * (t - 300) / 120
        if t < 600:
            return 40.0
        if t < 780:
            return 150.0
        return 10.0
    return rate


class StageSim:
    """A discrete-event model of one stage's queue and workers.

    Args:
        service_time: mean seconds per item per worker.
        workers: the starting worker count.
        rng: the random source for Poisson arrivals and service-time jitter.
        service_cv: coefficient of variation of the service time (0: fixed).
        queue_capacity: the input channel's capacity; arrivals beyond it wait upstream.
        startup_delay: seconds before an added worker can take items.
        stage: the stage name in samples.
    """

    def __init__(self, *, service_time: float, workers: int, rng: random.Random,
                 service_cv: float = 0.0, queue_capacity: int = 10_000,
                 startup_delay: float = 0.0, stage: str = "stage") -> None:
        self.stage = stage
        self.now = 0.0
        self._mean = service_time
        self._rng = rng
        self._sigma = math.sqrt(math.log1p(service_cv ** 2)) if service_cv > 0 else 0.0
        self._capacity = queue_capacity
        self._startup = startup_delay
        self._queue: deque[float] = deque()
        self._upstream: deque[float] = deque()
        self._running: list[tuple[float, float]] = []  # heap of (finish time, service time)
        self._starting: list[float] = []               # heap of ready times
        self._idle = workers
        self._retiring = 0  # busy workers to retire when their item finishes
        self.received = self.completed = 0
        self.busy_seconds = 0.0
        self.worker_seconds = 0.0
        self.waits: list[float] = []
        self.downstream_full = False

    @property
    def allocated(self) -> int:
        """Workers that cost resources: idle, busy (retiring ones too) and starting."""
        return self._idle + len(self._running) + len(self._starting)

    @property
    def ready(self) -> int:
        """Workers that can take items and are not retiring."""
        return self._idle + len(self._running) - self._retiring

    def sample(self) -> StageSample:
        """The stage's counters and gauges now, as the runner would report them."""
        return StageSample(stage=self.stage, now=self.now, received=self.received,
                           completed=self.completed, busy_seconds=self.busy_seconds,
                           queue_depth=len(self._queue), queue_capacity=self._capacity,
                           in_flight=len(self._running), workers=self.ready,
                           downstream_full=self.downstream_full)

    def set_workers(self, n: int) -> None:
        """Set the worker target: start workers, or retire idle then busy ones."""
        change = n - (self.allocated - self._retiring)
        if change > 0:
            keep = min(change, self._retiring)  # a retiring worker simply stays
            self._retiring -= keep
            for _ in range(change - keep):
                if self._startup > 0:
                    heapq.heappush(self._starting, self.now + self._startup)
                else:
                    self._idle += 1
        elif change < 0:
            drop = -change
            while drop and self._starting:
                heapq.heappop(self._starting)
                drop -= 1
            idle = min(drop, self._idle)
            self._idle -= idle
            self._retiring += drop - idle
        self._dispatch(self.now)

    def advance(self, until: float, arrivals: list[float]) -> None:
        """Run the stage to ``until`` with ``arrivals`` (sorted times before ``until``)."""
        i = 0
        while True:
            t_arrive = arrivals[i] if i < len(arrivals) else math.inf
            t_done = self._running[0][0] if self._running else math.inf
            t_ready = self._starting[0] if self._starting else math.inf
            t = min(t_arrive, t_done, t_ready)
            if t >= until:
                break
            self._account(t)
            if t == t_done:
                _, took = heapq.heappop(self._running)
                self.completed += 1
                self.busy_seconds += took
                if self._retiring:
                    self._retiring -= 1
                else:
                    self._idle += 1
            elif t == t_ready:
                heapq.heappop(self._starting)
                self._idle += 1
            else:
                self._upstream.append(t)
                i += 1
            self._dispatch(t)
        self._account(until)

    def _account(self, t: float) -> None:
        self.worker_seconds += self.allocated * (t - self.now)
        self.now = t

    def _dispatch(self, t: float) -> None:
        while self._upstream and len(self._queue) < self._capacity:
            self._queue.append(self._upstream.popleft())
            self.received += 1
        while self._idle and self._queue:
            arrived = self._queue.popleft()
            self.waits.append(t - arrived)
            took = self._service()
            heapq.heappush(self._running, (t + took, took))
            self._idle -= 1
            if self._upstream:
                self._queue.append(self._upstream.popleft())
                self.received += 1

    def _service(self) -> float:
        if not self._sigma:
            return self._mean
        mu = math.log(self._mean) - self._sigma ** 2 / 2
        return self._rng.lognormvariate(mu, self._sigma)


def _arrivals(rng: random.Random, t0: float, dt: float, rate: float, *, poisson: bool,
              carry: float) -> tuple[list[float], float]:
    """Arrival times in ``[t0, t0 + dt)`` and the fractional item carried to the next."""
    if rate <= 0:
        return [], carry
    if poisson:
        times, t = [], t0 + rng.expovariate(rate)
        while t < t0 + dt:
            times.append(t)
            t += rng.expovariate(rate)
        return times, carry
    expected = rate * dt + carry
    n = int(expected)
    return [t0 + dt * (k + 0.5) / n for k in range(n)] if n else [], expected - n


@dataclass(slots=True)
class SimResult:
    """What one simulation produced.

    Attributes:
        times: tick times in seconds.
        workers: the worker target after each tick.
        oracle: the oracle's worker count for each tick interval.
        events: every recorded :class:`ScaleEvent` (changes and holds whose reason changed).
        worker_seconds: workers allocated, integrated over the run.
        oracle_worker_seconds: the oracle's worker-seconds.
        waits: each item's queue wait in seconds.
    """

    times: list[float] = field(default_factory=list)
    workers: list[int] = field(default_factory=list)
    oracle: list[int] = field(default_factory=list)
    events: tuple[ScaleEvent, ...] = ()
    worker_seconds: float = 0.0
    oracle_worker_seconds: float = 0.0
    waits: list[float] = field(default_factory=list)

    def changes(self, start: float = 0.0, end: float = math.inf) -> list[ScaleEvent]:
        """Events that changed the worker count with ``start <= at < end``."""
        return [e for e in self.events if e.direction != "hold" and start <= e.at < end]

    def reversals(self, start: float = 0.0, end: float = math.inf) -> int:
        """Changes in ``[start, end)`` whose direction differs from the change before."""
        changes = self.changes(0.0, end)
        return sum(1 for a, b in itertools.pairwise(changes)
                   if b.at >= start and a.direction != b.direction)

    def first_change_after(self, t: float, direction: str = "up") -> float | None:
        """Seconds from ``t`` to the first change in ``direction``, or ``None``."""
        for e in self.changes(t):
            if e.direction == direction:
                return e.at - t
        return None

    def time_to_reach(self, n: int, after: float) -> float | None:
        """Seconds from ``after`` until the worker target first reaches ``n``, or ``None``."""
        for t, w in zip(self.times, self.workers, strict=True):
            if t > after and w >= n:
                return t - after
        return None

    def ratio(self) -> float:
        """Worker-seconds against the oracle's."""
        return self.worker_seconds / self.oracle_worker_seconds

    def wait_p95(self) -> float:
        """95th percentile of queue waits, in seconds."""
        return statistics.quantiles(self.waits, n=20)[-1] if len(self.waits) > 1 else 0.0


def oracle_workers(rate: float, service_time: float, policy: AutoscalePolicy) -> int:
    """The worker count that knows the load: ``ceil(rate * S / target)`` within bounds."""
    need = math.ceil(rate * service_time / policy.target_utilisation - 1e-9)
    return min(max(need, policy.min_workers), policy.max_workers)


def simulate(trace: Trace, *, policy: AutoscalePolicy, duration: float,
             service_time: float = 0.1, service_cv: float = 0.0, poisson: bool = False,
             seed: int = 0, tick: float = 1.0, workers: int | None = None,
             queue_capacity: int = 10_000, startup_delay: float = 0.0,
             downstream_full: Callable[[float], bool] | None = None) -> SimResult:
    """Run one stage under ``trace`` with the real controller ticking every ``tick`` seconds.

    Args:
        trace: arrival rate (items/s) as a function of time, read once per tick.
        policy: the stage's autoscaling policy.
        duration: simulated seconds.
        service_time: mean seconds per item per worker.
        service_cv: coefficient of variation of the service time.
        poisson: Poisson arrivals instead of evenly spaced ones.
        seed: the RNG seed.
        tick: seconds between controller ticks.
        workers: the starting worker count (default: the oracle's count at time 0).
        queue_capacity: the input channel's capacity.
        startup_delay: seconds before an added worker can take items.
        downstream_full: whether the output is full at a time (default: never).

    Returns:
        The per-tick worker counts, the events and the worker-seconds against the oracle.
    """
    rng = random.Random(seed)
    start = oracle_workers(trace(0.0), service_time, policy) if workers is None else workers
    sim = StageSim(service_time=service_time, workers=start, rng=rng, service_cv=service_cv,
                   queue_capacity=queue_capacity, startup_delay=startup_delay)
    events: list[ScaleEvent] = []
    controller = AutoscaleController({sim.stage: policy}, sample=lambda: [sim.sample()],
                                     apply=lambda _, n: sim.set_workers(n),
                                     clock=lambda: sim.now, interval=tick, started_at=0.0,
                                     on_decision=events.append)
    result = SimResult()
    controller.tick(0.0)
    t, carry = 0.0, 0.0
    while t < duration - 1e-9:
        rate = trace(t)
        arrivals, carry = _arrivals(rng, t, tick, rate, poisson=poisson, carry=carry)
        result.oracle.append(oracle_workers(rate, service_time, policy))
        result.oracle_worker_seconds += result.oracle[-1] * tick
        sim.advance(t + tick, arrivals)
        t += tick
        sim.downstream_full = downstream_full(t) if downstream_full is not None else False
        controller.tick(t)
        result.times.append(t)
        result.workers.append(controller.desired(sim.stage) or sim.ready)
    result.events = tuple(events)
    result.worker_seconds = sim.worker_seconds
    result.waits = sim.waits
    return result


# -- the scenarios of the issue ------------------------------------------------------

POLICY = AutoscalePolicy(min_workers=1, max_workers=64)
SERVICE = 0.1
WARM_UP = 120.0  # twice the stabilisation window: the ramp from 1 worker settles


def step_scenario(policy: AutoscalePolicy = POLICY) -> tuple[SimResult, int]:
    """A 10x step (20 -> 200 items/s at 60 s); returns the result and the ideal count."""
    result = simulate(step(20.0, 200.0, 60.0), policy=policy, duration=180.0,
                      service_time=SERVICE)
    return result, oracle_workers(200.0, SERVICE, policy)


def steady_scenario(policy: AutoscalePolicy = POLICY) -> SimResult:
    """50 items/s, evenly spaced, fixed service time, for 10 minutes after warm-up."""
    return simulate(constant(50.0), policy=policy, duration=WARM_UP + 600.0,
                    service_time=SERVICE, workers=policy.min_workers)


def poisson_scenario(policy: AutoscalePolicy = POLICY, seed: int = 1) -> SimResult:
    """50 items/s as a Poisson process, log-normal service (cv 0.5), 10 minutes."""
    return simulate(constant(50.0), policy=policy, duration=WARM_UP + 600.0,
                    service_time=SERVICE, service_cv=0.5, poisson=True, seed=seed,
                    workers=policy.min_workers)


def square_scenario(policy: AutoscalePolicy = POLICY) -> SimResult:
    """10 s at 100 items/s, 10 s at 10 items/s (a 20 s period), 10 minutes."""
    return simulate(square(10.0, 100.0, 20.0), policy=policy, duration=WARM_UP + 600.0,
                    service_time=SERVICE, workers=policy.min_workers)


def mixed_scenario(policy: AutoscalePolicy = POLICY, seed: int = 2) -> SimResult:
    """The :func:`mixed` trace with Poisson arrivals and log-normal service (cv 0.5)."""
    return simulate(mixed(), policy=policy, duration=900.0, service_time=SERVICE,
                    service_cv=0.5, poisson=True, seed=seed)


def tick_cost_us(stages: int = 10, ticks: int = 2000) -> float:
    """Median microseconds of one controller tick per stage (samples prebuilt)."""
    names = [f"s{i}" for i in range(stages)]
    rng = random.Random(3)
    state = {"t": 0.0, "n": 0}

    def sample() -> list[StageSample]:
        t, n = state["t"], int(state["n"])
        return [StageSample(stage=s, now=t, received=n * 50 + rng.randrange(10),
                            completed=n * 50, busy_seconds=n * 4.0, queue_depth=rng.randrange(20),
                            queue_capacity=1000, in_flight=4, workers=8, downstream_full=False)
                for s in names]

    controller = AutoscaleController(dict.fromkeys(names, POLICY), sample=sample,
                                     apply=lambda s, n: None, clock=lambda: state["t"])
    costs = []
    for i in range(ticks):
        state["t"], state["n"] = float(i), i
        t0 = time.perf_counter()
        controller.tick(float(i))
        costs.append(time.perf_counter() - t0)
    return statistics.median(costs) / stages * 1e6


def _fmt(value: float | None, unit: str = "") -> str:
    return "never" if value is None else f"{value:g}{unit}"


Row = tuple[str, str, str]


def _step_rows() -> list[Row]:
    result, ideal = step_scenario()
    need = math.ceil(0.9 * ideal)
    rows = [("10x step: first scale-up", "<= 1 tick", _fmt(result.first_change_after(60.0), " s")),
            (f"10x step: >= 90 % of ideal ({need} of {ideal})", "<= 3 ticks",
             _fmt(result.time_to_reach(need, 60.0), " s")),
            ("10x step: peak workers, worker-seconds / oracle", "(info)",
             f"{max(result.workers)}, {result.ratio():.2f}")]
    behind = simulate(step(20.0, 200.0, 60.0), policy=POLICY, duration=180.0,
                      service_time=SERVICE, queue_capacity=100)
    rows.append(("10x step behind a 100-item channel: to 90 %, peak", "(info)",
                 f"{_fmt(behind.time_to_reach(need, 60.0), ' s')}, {max(behind.workers)}"))
    slow = simulate(step(20.0, 200.0, 60.0), policy=POLICY, duration=180.0,
                    service_time=SERVICE, startup_delay=2.0)
    rows.append(("10x step, workers start in 2 s: to 90 %, peak", "(info)",
                 f"{_fmt(slow.time_to_reach(need, 60.0), ' s')}, {max(slow.workers)}"))
    return rows


def _steady_rows() -> list[Row]:
    rows = [("steady load: changes after warm-up", "0",
             str(len(steady_scenario().changes(WARM_UP))))]
    for seed in (1, 2, 3):
        rows.append((f"Poisson 50/s (seed {seed}): changes per 10 min", "<= 2",
                     str(len(poisson_scenario(seed=seed).changes(WARM_UP)))))
    low = simulate(constant(3.0), policy=POLICY, duration=WARM_UP + 600.0, service_time=2.0,
                   service_cv=0.5, poisson=True, seed=1, workers=1)
    rows.append(("Poisson 3/s of 2 s items: changes per 10 min, ratio", "(info)",
                 f"{len(low.changes(WARM_UP))}, {low.ratio():.2f}"))
    wave = square_scenario()
    rows.append(("square wave 20 s: reversals per 5 min", "<= 1",
                 f"{wave.reversals(WARM_UP) / 2:g}"))
    rows.append(("square wave 20 s: worker-seconds / oracle", "(info)", f"{wave.ratio():.2f}"))
    return rows


def _mixed_rows() -> list[Row]:
    rows = []
    for seed in (2, 4):
        mix = mixed_scenario(seed=seed)
        rows.append((f"mixed trace (seed {seed}): worker-seconds / oracle", "<= 1.3",
                     f"{mix.ratio():.2f}"))
        rows.append((f"mixed trace (seed {seed}): changes, p95 queue wait", "(info)",
                     f"{len(mix.changes())}, {mix.wait_p95() * 1e3:.0f} ms"))
    return rows


def main() -> None:
    """Print every scenario's target and measured value."""
    started = time.perf_counter()
    rows = [*_step_rows(), *_steady_rows(), *_mixed_rows(),
            ("controller tick per stage (median)", "< 1000 us", f"{tick_cost_us():.1f} us")]
    width = max(len(r[0]) for r in rows)
    print(f"{'scenario':<{width}}  {'target':>10}  measured")
    for name, target, measured in rows:
        print(f"{name:<{width}}  {target:>10}  {measured}")
    print(f"\n(simulated in {time.perf_counter() - started:.1f} s of wall time)")


if __name__ == "__main__":
    main()
