"""Tests of pipekit.autoscale: the pure policy, the controller, and simulated load traces.

Everything runs on simulated time: the controller is driven by ``tick(now)`` and the
load scenarios by the discrete-event simulator in ``benchmarks/autoscale_sim.py``.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import logging
import math
import sys
import threading
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipekit.autoscale import (
    REASONS,
    AutoscaleController,
    AutoscalePolicy,
    Bottleneck,
    Observation,
    ScaleDecision,
    ScaleState,
    StageSample,
    decide,
    find_bottleneck,
    observe,
)
from pipekit.errors import ConfigError, PipelineStateError
from pipekit.stats import ScaleEvent


def _load_sim() -> ModuleType:
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "autoscale_sim.py"
    spec = importlib.util.spec_from_file_location("autoscale_sim", path)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("autoscale_sim", module)
    spec.loader.exec_module(module)
    return module


sim = _load_sim()

POLICY = AutoscalePolicy(min_workers=1, max_workers=32)


def obs(**kw: Any) -> Observation:
    """An observation with enough history to decide on, overridable field by field."""
    base: dict[str, Any] = {"stage": "s", "now": 100.0, "arrival_rate": 0.0,
                            "service_time": 0.1, "workers": 4, "intervals": 10}
    base.update(kw)
    return Observation(**base)


def run(policy: AutoscalePolicy, observations: list[Observation],
        target: int = 0) -> list[ScaleDecision]:
    """Feed observations through decide(), threading the state as the controller does.

    The runner is taken to apply each decision at once: each observation reports the
    worker count decided before it.
    """
    state = ScaleState(policy=policy, target=target)
    out = []
    for o in observations:
        d = decide(dataclasses.replace(o, workers=state.target or o.workers), state)
        out.append(d)
        state = d.state
    return out


# -- policy settings -------------------------------------------------------------------


def test_policy_defaults_are_documented_values() -> None:
    p = AutoscalePolicy(max_workers=8)
    assert (p.min_workers, p.max_workers, p.target_utilisation, p.tolerance) == (1, 8, 0.7, 0.1)
    assert p.scale_down_stabilisation == 60.0
    assert p.scale_down_delay == 30.0
    assert p.max_cpu_percent is None
    assert not p.fixed


def test_reversed_bounds_name_both_values() -> None:
    with pytest.raises(ConfigError, match=r"max_workers must be >= min_workers "
                       r"\(got max_workers=2, min_workers=4\)"):
        AutoscalePolicy(min_workers=4, max_workers=2)


@pytest.mark.parametrize(("field", "value", "message"), [
    ("min_workers", 0, "min_workers must be >= 1"),
    ("min_workers", True, "min_workers must be an int"),
    ("max_workers", 2.5, "max_workers must be an int"),
    ("target_utilisation", 0.0, "target_utilisation must be a number in"),
    ("target_utilisation", 1.5, "target_utilisation must be a number in"),
    ("backlog_drain_seconds", 0, "backlog_drain_seconds must be a number > 0"),
    ("tolerance", -0.1, "tolerance must be a number in"),
    ("max_scale_up_factor", 0.5, "max_scale_up_factor must be a number >= 1"),
    ("scale_down_stabilisation", -1, "scale_down_stabilisation must be a number >= 0"),
    ("scale_down_delay", math.nan, "scale_down_delay must be a number >= 0"),
    ("startup_grace", "5", "startup_grace must be a number >= 0"),
    ("smoothing", 0.0, "smoothing must be a number in"),
    ("max_cpu_percent", 0, "max_cpu_percent must be a number > 0"),
])
def test_bad_policy_values_raise_config_error(field: str, value: object, message: str) -> None:
    kw: dict[str, Any] = {"min_workers": 1, "max_workers": 4, field: value}
    with pytest.raises(ConfigError, match=message) as info:
        AutoscalePolicy(**kw)
    assert repr(value) in str(info.value) or str(value) in str(info.value)
    assert isinstance(info.value, ValueError)


def test_from_workers_accepts_int_pair_and_policy() -> None:
    assert AutoscalePolicy.from_workers(3) == AutoscalePolicy(min_workers=3, max_workers=3)
    assert AutoscalePolicy.from_workers(3).fixed
    assert AutoscalePolicy.from_workers((1, 16)) == AutoscalePolicy(min_workers=1,
                                                                    max_workers=16)
    p = AutoscalePolicy(max_workers=4, tolerance=0.2)
    assert AutoscalePolicy.from_workers(p) is p


@pytest.mark.parametrize(("value", "message"), [
    (True, "workers must be an int, a \\(min, max\\) tuple"),
    (-2, "workers must be >= 1 \\(got -2\\)"),
    (0, "workers must be >= 1"),
    ((1, 2, 3), "workers must be a \\(min, max\\) pair of ints \\(got \\(1, 2, 3\\)\\)"),
    ((1, 2.5), "pair of ints"),
    ((True, 4), "pair of ints"),
    ((0, 4), "workers min must be >= 1"),
    ((8, 2), "max_workers must be >= min_workers \\(got max_workers=2, min_workers=8\\)"),
    ("4", "workers must be an int"),
    (None, "workers must be an int"),
])
def test_from_workers_rejects_bad_values(value: object, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        AutoscalePolicy.from_workers(value)


# -- observe ---------------------------------------------------------------------------


def sample(now: float, received: int, completed: int, busy: float, *, workers: int = 4,
           depth: int = 0, capacity: int = 100, in_flight: int = 0,
           downstream_full: bool = False, stage: str = "s") -> StageSample:
    return StageSample(stage=stage, now=now, received=received, completed=completed,
                       busy_seconds=busy, queue_depth=depth, queue_capacity=capacity,
                       in_flight=in_flight, workers=workers, downstream_full=downstream_full)


def test_first_observation_has_no_rates() -> None:
    o = observe(sample(0.0, 10, 5, 1.0, depth=3), cpu_percent=50.0, intake_paused=True)
    assert o.intervals == 0
    assert o.arrival_rate == 0.0
    assert o.service_time is None
    assert (o.backlog, o.cpu_percent, o.intake_paused) == (3, 50.0, True)


def test_observe_derives_rates_service_time_and_utilisation() -> None:
    o = observe(sample(0.0, 0, 0, 0.0))
    o = observe(sample(2.0, 100, 80, 4.0, workers=4), o)
    assert o.arrival_rate == pytest.approx(50.0)
    assert o.completion_rate == pytest.approx(40.0)
    assert o.busy_workers == pytest.approx(2.0)
    assert o.service_time == pytest.approx(0.05)
    assert o.utilisation == pytest.approx(0.5)


def test_observe_smooths_noise_with_the_ewma_weight() -> None:
    o = observe(sample(0.0, 0, 0, 0.0))
    received = 0
    for t in range(1, 20):  # steady 50/s
        received += 50
        o = observe(sample(float(t), received, received, received * 0.01), o, smoothing=0.2)
    o = observe(sample(20.0, received + 60, received + 50, 0.0), o, smoothing=0.2)
    # one 60/s interval moves a 0.2-weight EWMA by a fifth of the difference
    assert o.arrival_rate == pytest.approx(52.0)


def test_a_sustained_step_in_arrivals_is_followed_within_two_intervals() -> None:
    o = observe(sample(0.0, 0, 0, 0.0))
    received = 0
    for t in range(1, 20):
        received += 20
        o = observe(sample(float(t), received, received, 0.0), o)
    received += 200
    o = observe(sample(20.0, received, received, 0.0), o)
    assert o.arrival_rate < 100  # one surprising interval is not trusted yet
    received += 200
    o = observe(sample(21.0, received, received, 0.0), o)
    assert o.arrival_rate == pytest.approx(200.0)


def test_a_one_interval_burst_is_smoothed() -> None:
    o = observe(sample(0.0, 0, 0, 0.0))
    received = 0
    for t in range(1, 11):
        received += 20 if t != 10 else 400
        o = observe(sample(float(t), received, received, 0.0), o)
    assert o.arrival_rate == pytest.approx(20.0 + 0.2 * 380.0)  # the plain EWMA step
    received += 20
    o = observe(sample(11.0, received, received, 0.0), o)
    assert o.arrival_rate == pytest.approx(96.0 + 0.2 * (20.0 - 96.0))  # no jump back


def test_busy_seconds_beyond_workers_are_carried_not_lost() -> None:
    o = observe(sample(0.0, 0, 0, 0.0, workers=2))
    o = observe(sample(1.0, 200, 200, 3.0, workers=2), o)  # a batch reported 3 s at once
    assert o.busy_workers == pytest.approx(2.0)
    assert o.busy_carry == pytest.approx(1.0)
    o = observe(sample(2.0, 400, 400, 3.0, workers=2), o, smoothing=1.0)
    assert o.busy_workers == pytest.approx(1.0)
    assert o.busy_carry == 0.0


def test_low_rates_are_smoothed_over_about_a_hundred_items() -> None:
    o = observe(sample(0.0, 0, 0, 0.0))
    o = observe(sample(1.0, 10, 10, 1.0), o)
    o = observe(sample(2.0, 30, 30, 3.0), o, smoothing=1.0)
    # 10 items expected per interval: a weight of 10 / 100, whatever the smoothing
    assert o.arrival_rate == pytest.approx(10.0 + 0.1 * 10.0)


def test_counters_going_backwards_restart_the_rates() -> None:
    o = observe(sample(0.0, 0, 0, 0.0))
    o = observe(sample(1.0, 100, 100, 1.0), o)
    o = observe(sample(2.0, 5, 5, 0.1), o)
    assert o.intervals == 0
    assert o.arrival_rate == 0.0


def test_a_repeated_instant_keeps_rates_and_refreshes_gauges() -> None:
    o = observe(sample(0.0, 0, 0, 0.0))
    o = observe(sample(1.0, 100, 100, 1.0), o)
    again = observe(sample(1.0, 100, 100, 1.0, depth=7), o)
    assert again.arrival_rate == o.arrival_rate
    assert again.backlog == 7
    nxt = observe(sample(2.0, 200, 200, 2.0), again, smoothing=1.0)
    assert nxt.arrival_rate == pytest.approx(100.0)


def test_full_input_channel_streak_is_counted() -> None:
    o = observe(sample(0.0, 0, 0, 0.0, depth=100, capacity=100))
    o = observe(sample(1.0, 10, 10, 0.4, depth=100, capacity=100), o)
    assert o.full_streak == 2
    o = observe(sample(2.0, 20, 20, 0.8, depth=99, capacity=100), o)
    assert o.full_streak == 0


# -- decide: sizing --------------------------------------------------------------------


def test_little_law_sizes_for_the_target_utilisation() -> None:
    # 100 items/s x 0.1 s = 10 busy workers; / 0.7 -> 14.3 -> 15
    d = decide(obs(arrival_rate=100.0, workers=4), ScaleState(policy=POLICY, target=4))
    assert (d.direction, d.desired, d.reason) == ("up", 15, "arrival")
    assert d.inputs["load_workers"] == pytest.approx(10.0)
    assert d.inputs["recommended"] == pytest.approx(10.0 / 0.7)
    assert {"arrival_rate", "service_time", "backlog", "utilisation"} <= set(d.inputs)
    assert d.state.target == 15
    assert d.state.last_up_at == 100.0


def test_backlog_is_drained_within_the_target_time() -> None:
    # 500 queued x 0.1 s over 10 s = 5 workers, / 0.7 -> 7.1 -> 8; no arrivals
    d = decide(obs(backlog=500, workers=2), ScaleState(policy=POLICY, target=2))
    assert (d.direction, d.desired, d.reason) == ("up", 8, "backlog")


def test_scale_up_is_bounded_per_decision() -> None:
    d = decide(obs(arrival_rate=1000.0, workers=2), ScaleState(policy=POLICY, target=2))
    assert d.desired == 8  # max_scale_up_factor 4
    slow = dataclasses.replace(POLICY, max_scale_up_factor=1.0)
    assert decide(obs(arrival_rate=1000.0, workers=2),
                  ScaleState(policy=slow, target=2)).desired == 3


def test_small_changes_are_within_tolerance() -> None:
    # 30/s x 0.1 / 0.7 = 4.29: above 4 but by less than 10 %
    d = decide(obs(arrival_rate=30.0), ScaleState(policy=POLICY, target=4))
    assert (d.direction, d.reason, d.desired) == ("hold", "within_tolerance", 4)


def test_clamped_to_max_then_holds_at_max() -> None:
    policy = AutoscalePolicy(min_workers=1, max_workers=10)
    ds = run(policy, [obs(arrival_rate=1000.0, now=float(t)) for t in range(3)], target=8)
    assert (ds[0].direction, ds[0].desired) == ("up", 10)
    assert (ds[1].direction, ds[1].reason, ds[1].desired) == ("hold", "at_max", 10)


def test_clamped_to_min_then_holds_at_min() -> None:
    policy = AutoscalePolicy(min_workers=2, max_workers=10, scale_down_stabilisation=0.0,
                             scale_down_delay=0.0)
    ds = run(policy, [obs(now=float(t), workers=6) for t in range(3)], target=6)
    assert (ds[0].direction, ds[0].desired, ds[0].reason) == ("down", 2, "idle")
    assert (ds[1].direction, ds[1].reason) == ("hold", "at_min")


def test_a_count_outside_the_bounds_is_brought_inside() -> None:
    policy = AutoscalePolicy(min_workers=2, max_workers=10)
    up = decide(obs(workers=1), ScaleState(policy=policy))
    assert (up.direction, up.desired, up.reason) == ("up", 2, "at_min")
    down = decide(obs(workers=40, arrival_rate=1000.0), ScaleState(policy=policy))
    assert (down.direction, down.desired, down.reason) == ("down", 10, "at_max")


def test_no_decision_before_rates_are_measured() -> None:
    first = decide(obs(intervals=0, arrival_rate=100.0), ScaleState(policy=POLICY))
    assert (first.direction, first.reason) == ("hold", "warming_up")
    unknown = decide(obs(service_time=None, backlog=50), ScaleState(policy=POLICY))
    assert (unknown.direction, unknown.reason) == ("hold", "warming_up")


def test_an_idle_stage_without_service_time_can_still_scale_down() -> None:
    policy = dataclasses.replace(POLICY, scale_down_stabilisation=0.0)
    d = decide(obs(service_time=None, workers=4), ScaleState(policy=policy, target=4))
    assert (d.direction, d.desired, d.reason) == ("down", 1, "idle")


def test_a_channel_full_for_two_ticks_doubles_the_workers() -> None:
    state = ScaleState(policy=POLICY, target=4)
    # 20/s x 0.1 s + 100 queued x 0.1 s / 10 s = 3 busy workers / 0.7 = 4.3: hold at 4
    once = decide(obs(arrival_rate=20.0, backlog=100, queue_capacity=100, full_streak=1), state)
    assert once.direction == "hold"
    twice = decide(obs(arrival_rate=20.0, backlog=100, queue_capacity=100, full_streak=2), state)
    assert (twice.direction, twice.desired, twice.reason) == ("up", 8, "backlog")
    assert "full" in twice.detail


# -- decide: scale-down ----------------------------------------------------------------


def test_scale_down_waits_for_the_stabilisation_window() -> None:
    policy = AutoscalePolicy(min_workers=1, max_workers=32, scale_down_delay=0.0)
    high = [obs(now=float(t), arrival_rate=100.0) for t in range(10)]      # needs 15
    low = [obs(now=float(t), arrival_rate=20.0) for t in range(10, 100)]   # needs 3
    ds = run(policy, high + low, target=15)
    downs = [(d.state.window[0][0], d) for d in ds if d.direction == "down"]
    assert len(downs) == 1
    first_down = next(i for i, d in enumerate(ds) if d.direction == "down")
    # the last high recommendation was at t=9: the window holds it for 60 s
    assert first_down == 70
    assert ds[first_down].desired == 3
    assert {d.reason for d in ds[10:first_down]} == {"stabilising"}


def test_scale_down_goes_to_the_highest_recommendation_in_the_window() -> None:
    policy = AutoscalePolicy(min_workers=1, max_workers=32, scale_down_stabilisation=5.0,
                             scale_down_delay=0.0)
    rates = [100.0, 60.0, 50.0, 10.0, 10.0, 10.0, 10.0, 10.0, 10.0]
    ds = run(policy, [obs(now=float(t), arrival_rate=r) for t, r in enumerate(rates)],
             target=15)
    downs = [(i, d.desired) for i, d in enumerate(ds) if d.direction == "down"]
    # at t=6 the window [1, 6] still holds 60/s (9 workers); at t=7 it holds 50/s (8)
    assert downs[0] == (6, 9)


def test_scale_down_waits_after_a_scale_up() -> None:
    policy = AutoscalePolicy(min_workers=1, max_workers=32, scale_down_stabilisation=0.0,
                             scale_down_delay=30.0)
    seq = [obs(now=0.0, arrival_rate=100.0)] + [
        obs(now=float(t), arrival_rate=10.0) for t in range(1, 40)]
    ds = run(policy, seq, target=4)
    assert ds[0].direction == "up"
    first_down = next(i for i, d in enumerate(ds) if d.direction == "down")
    assert first_down == 30
    assert "scale-downs wait" in ds[1].detail


# -- decide: guards --------------------------------------------------------------------


def test_cpu_at_the_limit_holds_scale_up_with_the_reason() -> None:
    policy = dataclasses.replace(POLICY, max_cpu_percent=80.0)
    d = decide(obs(arrival_rate=100.0, cpu_percent=85.0), ScaleState(policy=policy, target=4))
    # obs() reports 4 workers, the target
    assert (d.direction, d.reason, d.desired) == ("hold", "cpu_limit", 4)
    assert "80" in d.detail
    assert d.inputs["cpu_percent"] == 85.0
    below = decide(obs(arrival_rate=100.0, cpu_percent=50.0), ScaleState(policy=policy,
                                                                         target=4))
    assert below.direction == "up"


def test_paused_intake_holds_scale_up() -> None:
    d = decide(obs(arrival_rate=100.0, intake_paused=True), ScaleState(policy=POLICY, target=4))
    assert (d.direction, d.reason) == ("hold", "memory_paused")


def test_full_output_holds_scale_up_and_names_downstream() -> None:
    d = decide(obs(arrival_rate=100.0, backlog=90, downstream_full=True),
               ScaleState(policy=POLICY, target=4))
    assert (d.direction, d.reason) == ("hold", "downstream_full")
    assert "downstream" in d.detail


def test_guards_do_not_block_scale_down() -> None:
    policy = dataclasses.replace(POLICY, max_cpu_percent=50.0, scale_down_stabilisation=0.0)
    d = decide(obs(arrival_rate=1.0, cpu_percent=99.0, downstream_full=True,
                   intake_paused=True, workers=8), ScaleState(policy=policy, target=8))
    assert (d.direction, d.desired) == ("down", 1)


def test_no_scaling_while_new_workers_are_starting() -> None:
    policy = dataclasses.replace(POLICY, startup_grace=10.0)
    up = decide(obs(now=0.0, arrival_rate=100.0), ScaleState(policy=policy, target=4))
    assert up.desired == 15
    # the runner reports 4 running workers: 11 are still starting
    held = decide(obs(now=1.0, arrival_rate=400.0, workers=4), up.state)
    assert (held.direction, held.reason, held.current) == ("hold", "starting", 15)
    ready = decide(obs(now=2.0, arrival_rate=400.0, workers=15), up.state)
    assert ready.direction == "up"


def test_startup_grace_bounds_the_wait_for_workers_that_never_start() -> None:
    policy = dataclasses.replace(POLICY, startup_grace=10.0)
    up = decide(obs(now=0.0, arrival_rate=100.0), ScaleState(policy=policy, target=4))
    late = decide(obs(now=11.0, arrival_rate=100.0, workers=4), up.state)
    # after the grace, the runner's count is the truth, and the decision is made again
    assert (late.direction, late.current, late.desired) == ("up", 4, 15)


def test_decide_is_pure() -> None:
    state = ScaleState(policy=POLICY, target=4)
    o = obs(arrival_rate=100.0)
    assert decide(o, state) == decide(o, state)
    assert state == ScaleState(policy=POLICY, target=4)


@settings(max_examples=300, deadline=None)
@given(arrival=st.floats(0, 1e5), service=st.one_of(st.none(), st.floats(0, 100)),
       backlog=st.integers(0, 10**6), workers=st.integers(0, 200),
       target=st.integers(0, 200), cpu=st.one_of(st.none(), st.floats(0, 800)),
       paused=st.booleans(), full=st.booleans(), streak=st.integers(0, 3),
       low=st.integers(1, 20), span=st.integers(0, 50))
def test_decisions_are_always_valid(*, arrival: float, service: float | None, backlog: int,
                                    workers: int, target: int, cpu: float | None,
                                    paused: bool, full: bool, streak: int, low: int,
                                    span: int) -> None:
    policy = AutoscalePolicy(min_workers=low, max_workers=low + span, max_cpu_percent=90.0)
    d = decide(obs(arrival_rate=arrival, service_time=service, backlog=backlog,
                   workers=workers, cpu_percent=cpu, intake_paused=paused,
                   downstream_full=full, full_streak=streak, queue_capacity=backlog),
               ScaleState(policy=policy, target=target))
    assert d.reason in REASONS
    assert policy.min_workers <= d.desired <= policy.max_workers or d.direction == "hold"
    assert (d.direction == "up") == (d.desired > d.current)
    assert (d.direction == "down") == (d.desired < d.current)
    if d.reason in {"at_min", "at_max"} and d.direction != "hold":  # into the bounds
        assert d.desired in {policy.min_workers, policy.max_workers}
    elif d.direction == "up":
        assert not full
        assert not paused
        assert (cpu is None or cpu < 90.0)
        assert d.desired <= max(d.current + 1, d.current * policy.max_scale_up_factor)
    assert d.state.target == d.desired


# -- find_bottleneck -------------------------------------------------------------------


def stage_obs(name: str, **kw: Any) -> Observation:
    base: dict[str, Any] = {"stage": name, "now": 1.0, "workers": 4, "service_time": 0.1,
                            "intervals": 5}
    base.update(kw)
    return Observation(**base)


def test_no_stages_no_bottleneck() -> None:
    assert find_bottleneck([]) == Bottleneck("", "", 0.0)


def test_an_idle_pipeline_is_starved_at_its_input() -> None:
    b = find_bottleneck([stage_obs("a", utilisation=0.2), stage_obs("b", utilisation=0.1)])
    assert b == ("a", "starved", 0.0)


def test_the_most_downstream_busy_stage_limits_throughput() -> None:
    stages = [
        # a is blocked by b's full channel: pressure, but not the cause
        stage_obs("a", backlog=100, utilisation=0.3, downstream_full=True,
                  completion_rate=20.0),
        stage_obs("b", backlog=100, utilisation=0.97, completion_rate=20.0,
                  service_time=0.2, workers=4),
        stage_obs("c", utilisation=0.1, completion_rate=20.0, service_time=0.01),
    ]
    name, reason, estimate = find_bottleneck(stages)
    assert (name, reason) == ("b", "busy")
    assert estimate == pytest.approx(5.0)  # one more 0.2 s worker: 5 items/s


def test_the_gain_is_capped_by_the_next_slowest_stage() -> None:
    stages = [
        stage_obs("a", backlog=10, utilisation=0.95, service_time=0.1, workers=2,
                  completion_rate=20.0),
        stage_obs("b", utilisation=0.9, service_time=0.1, workers=3, completion_rate=20.0),
    ]
    b = find_bottleneck(stages)
    assert (b.stage, b.reason) == ("a", "busy")
    assert b.estimate == pytest.approx(10.0)  # b has 30/s of capacity, 20/s used


def test_a_stage_blocked_by_the_sink_is_blocked_downstream() -> None:
    stages = [stage_obs("a", utilisation=0.5, completion_rate=10.0),
              stage_obs("b", backlog=50, utilisation=0.2, downstream_full=True)]
    assert find_bottleneck(stages) == ("b", "blocked downstream", 0.0)


# -- the controller ----------------------------------------------------------------------


class FakeStage:
    """A stage whose counters the test advances by hand."""

    def __init__(self, name: str, workers: int = 2) -> None:
        self.name = name
        self.workers = workers
        self.received = self.completed = 0
        self.busy = 0.0
        self.depth = 0
        self.downstream_full = False

    def run(self, seconds: float, rate: float, service: float) -> None:
        """Items arrive at ``rate``; the workers finish what their capacity allows."""
        n = int(rate * seconds)
        done = min(self.depth + n, int(self.workers * seconds / service))
        self.received += n
        self.depth += n - done
        self.completed += done
        self.busy += done * service

    def sample(self, now: float) -> StageSample:
        return StageSample(stage=self.name, now=now, received=self.received,
                           completed=self.completed, busy_seconds=self.busy,
                           queue_depth=self.depth, queue_capacity=1000, in_flight=0,
                           workers=self.workers, downstream_full=self.downstream_full)


class Harness:
    def __init__(self, policies: dict[str, Any], stages: list[FakeStage], **kw: Any) -> None:
        self.t = 0.0
        self.stages = {s.name: s for s in stages}
        self.applied: list[tuple[str, int]] = []
        self.seen: list[ScaleEvent] = []
        self.apply_fails = False
        kw.setdefault("on_decision", self.seen.append)
        self.controller = AutoscaleController(
            policies, sample=lambda: [s.sample(self.t) for s in stages], apply=self.apply,
            clock=lambda: self.t, started_at=0.0, pipeline="p", **kw)

    def apply(self, stage: str, n: int) -> None:
        if self.apply_fails:
            raise RuntimeError("pool is gone")
        self.applied.append((stage, n))
        self.stages[stage].workers = n

    def step(self, rate: float, service: float = 0.1) -> tuple[ScaleEvent, ...]:
        for s in self.stages.values():
            s.run(1.0, rate, service)
        self.t += 1.0
        return self.controller.tick(self.t)


def test_tick_applies_decisions_and_records_events() -> None:
    h = Harness({"enrich": (1, 32)}, [FakeStage("enrich")])
    h.controller.tick(0.0)
    for _ in range(3):
        h.step(10.0)
    events = h.step(100.0)
    h.step(100.0)  # the step is confirmed: 100/s x 0.1 s / 0.7 -> 15, plus the backlog
    ups = [e for e in h.controller.events() if e.direction == "up"]
    assert ups
    assert ups[-1].at == 5.0
    assert ups[-1].reason == "arrival"
    assert ups[-1].inputs["arrival_rate"] == pytest.approx(100.0)
    assert ups[-1].inputs["service_time"] == pytest.approx(0.1)
    e = ups[-1]  # sized for the arrivals, within one step of at most 4x
    assert e.desired == min(math.ceil(e.inputs["recommended"]), 4 * e.current) >= 15
    assert h.applied[-1] == ("enrich", ups[-1].desired)
    assert h.controller.desired("enrich") == ups[-1].desired
    assert h.controller.changes() == tuple(ups)
    assert h.seen == list(h.controller.events())
    assert all(isinstance(e, ScaleEvent) for e in events)


def test_holds_are_recorded_only_when_their_reason_changes() -> None:
    h = Harness({"s": (1, 8)}, [FakeStage("s", workers=2)])
    h.controller.tick(0.0)
    for _ in range(20):
        h.step(12.0)  # 12/s x 0.1 / 0.7 = 1.7 -> 2 workers: nothing to do
    reasons = [(e.direction, e.reason) for e in h.controller.events()]
    assert reasons == [("hold", "warming_up"), ("hold", "within_tolerance")]
    h.stages["s"].downstream_full = True
    for _ in range(5):
        h.step(100.0)
    reasons = [(e.direction, e.reason) for e in h.controller.events()]
    assert reasons[-1] == ("hold", "downstream_full")
    assert reasons.count(("hold", "downstream_full")) == 1
    assert h.applied == []


def test_decisions_are_logged_as_structured_records(caplog: pytest.LogCaptureFixture) -> None:
    h = Harness({"s": (1, 32)}, [FakeStage("s")])
    caplog.set_level(logging.INFO, logger="pipekit.autoscale")
    h.controller.tick(0.0)
    h.step(10.0)
    h.step(10.0)
    h.stages["s"].depth = 900
    h.step(10.0)
    records = [r for r in caplog.records if r.name == "pipekit.autoscale"]
    assert records
    assert all(r.getMessage() == "autoscale decision" for r in records)
    info = records[-1].pipekit  # type: ignore[attr-defined]
    assert info["event"] == "autoscale.decision"
    assert info["pipeline"] == "p"
    assert (info["stage"], info["direction"], info["reason"]) == ("s", "up", "backlog")
    assert info["inputs"]["backlog"] == h.stages["s"].depth > 800
    assert info["detail"]


def test_stages_without_policy_or_fixed_are_observed_not_scaled() -> None:
    stages = [FakeStage("fixed", workers=3), FakeStage("free", workers=3)]
    h = Harness({"fixed": 3}, stages)
    h.controller.tick(0.0)
    for _ in range(5):
        h.step(300.0)
    assert h.applied == []
    assert h.controller.events() == ()
    assert set(h.controller.observations()) == {"fixed", "free"}
    assert h.controller.desired("fixed") is None
    assert h.controller.bottleneck().reason in {"busy", "starved"}


def test_pipeline_cpu_limit_fills_policies_without_their_own() -> None:
    h = Harness({"a": (1, 8), "b": AutoscalePolicy(max_workers=8, max_cpu_percent=300.0)},
                [FakeStage("a"), FakeStage("b")], max_cpu_percent=150.0,
                cpu_percent=lambda: 200.0)
    policies = h.controller.policies
    assert policies["a"].max_cpu_percent == 150.0
    assert policies["b"].max_cpu_percent == 300.0
    h.controller.tick(0.0)
    h.step(10.0)
    h.stages["a"].depth = h.stages["b"].depth = 900
    h.step(10.0)
    assert h.applied == [("b", 8)]
    assert [e.reason for e in h.controller.events() if e.stage == "a"][-1] == "cpu_limit"


def test_paused_intake_is_read_from_the_callback() -> None:
    h = Harness({"s": (1, 8)}, [FakeStage("s")], intake_paused=lambda: True)
    h.controller.tick(0.0)
    h.step(10.0)
    h.stages["s"].depth = 900
    h.step(10.0)
    assert h.applied == []
    assert h.controller.events()[-1].reason == "memory_paused"


def test_a_failing_apply_is_logged_once_and_the_target_kept(
        caplog: pytest.LogCaptureFixture) -> None:
    h = Harness({"s": (1, 8)}, [FakeStage("s")])
    h.apply_fails = True
    h.controller.tick(0.0)
    h.step(10.0)
    h.stages["s"].depth = 900
    with caplog.at_level(logging.ERROR, logger="pipekit.autoscale"):
        for _ in range(3):
            assert h.step(10.0) == ()
            assert h.controller.desired("s") == 2
    failures = [r for r in caplog.records if "could not set stage 's'" in r.getMessage()]
    assert len(failures) == 1  # one traceback per streak, not one per tick
    assert failures[0].exc_info is not None
    h.apply_fails = False
    assert h.step(10.0)[-1].direction == "up"


def test_a_failing_on_decision_callback_never_breaks_the_tick() -> None:
    def boom(event: ScaleEvent) -> None:
        raise ValueError("exporter down")

    h = Harness({"s": (1, 8)}, [FakeStage("s")], on_decision=boom)
    h.controller.tick(0.0)
    h.step(10.0)
    h.stages["s"].depth = 900
    assert h.step(10.0)[-1].direction == "up"


def test_recent_events_are_bounded() -> None:
    h = Harness({"s": (1, 8)}, [FakeStage("s")], max_events=2)
    h.controller.tick(0.0)
    for i in range(10):
        h.stages["s"].downstream_full = bool(i % 2)
        h.stages["s"].depth = 900
        h.step(10.0)
    assert len(h.controller.events()) == 2
    assert len(h.seen) > 2


@pytest.mark.parametrize(("kw", "message"), [
    ({"interval": 0}, "autoscale interval must be a number > 0"),
    ({"max_events": 0}, "max_events must be an int >= 1"),
])
def test_bad_controller_settings_raise(kw: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        AutoscaleController({}, sample=list, apply=lambda s, n: None, **kw)


def _autoscaler_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "pipekit-autoscaler"]


def test_start_ticks_on_a_daemon_thread_and_stop_leaves_none() -> None:
    ticked = threading.Event()

    def sample() -> list[StageSample]:
        ticked.set()
        return []

    controller = AutoscaleController({"s": (1, 4)}, sample=sample, apply=lambda s, n: None,
                                     interval=0.01)
    controller.start()
    try:
        threads = _autoscaler_threads()
        assert len(threads) == 1
        assert threads[0].daemon
        assert controller.running
        with pytest.raises(PipelineStateError, match="already running"):
            controller.start()
        assert ticked.wait(10.0)
    finally:
        controller.stop()
    assert not controller.running
    assert _autoscaler_threads() == []
    controller.stop()  # idempotent
    with controller:  # and restartable, as a context manager
        assert controller.running
    assert _autoscaler_threads() == []


def test_a_tick_that_raises_is_logged_and_the_thread_goes_on(
        caplog: pytest.LogCaptureFixture) -> None:
    calls = []
    again = threading.Event()

    def sample() -> list[StageSample]:
        calls.append(1)
        if len(calls) == 1:
            raise OSError("counters unavailable")
        again.set()
        return []

    controller = AutoscaleController({}, sample=sample, apply=lambda s, n: None,
                                     interval=0.01)
    with caplog.at_level(logging.ERROR, logger="pipekit.autoscale"), controller:
        assert again.wait(10.0)
    assert any("tick failed" in r.getMessage() for r in caplog.records)
    assert _autoscaler_threads() == []


# -- simulated load traces ----------------------------------------------------------------


def test_ten_fold_step_is_followed_within_three_ticks() -> None:
    result, ideal = sim.step_scenario()
    assert result.first_change_after(60.0) <= 1.0
    assert result.time_to_reach(math.ceil(0.9 * ideal), 60.0) <= 3.0


def test_ten_fold_step_behind_a_small_full_channel_is_followed_within_three_ticks() -> None:
    # arrivals wait upstream and are unseen: the full channel makes the workers double
    result = sim.simulate(sim.step(20.0, 200.0, 60.0), policy=sim.POLICY, duration=90.0,
                          queue_capacity=100)
    ideal = sim.oracle_workers(200.0, sim.SERVICE, sim.POLICY)
    assert result.time_to_reach(math.ceil(0.9 * ideal), 60.0) <= 3.0


def test_steady_load_makes_no_change_after_warm_up() -> None:
    result = sim.steady_scenario()
    assert result.changes(sim.WARM_UP) == []
    assert result.workers[-1] == sim.oracle_workers(50.0, sim.SERVICE, sim.POLICY)


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_poisson_load_changes_at_most_twice_in_ten_minutes(seed: int) -> None:
    result = sim.poisson_scenario(seed=seed)
    assert result.times[-1] - sim.WARM_UP >= 600.0
    assert len(result.changes(sim.WARM_UP)) <= 2


def test_square_wave_reverses_at_most_once_in_five_minutes() -> None:
    result = sim.square_scenario()
    minutes = (result.times[-1] - sim.WARM_UP) / 60.0
    assert result.reversals(sim.WARM_UP) <= minutes / 5.0
    assert result.wait_p95() < 1.0  # and it keeps up with the high half


@pytest.mark.parametrize("seed", [2, 4])
def test_mixed_trace_costs_at_most_1_3x_the_oracle_and_keeps_up(seed: int) -> None:
    result = sim.mixed_scenario(seed=seed)
    assert 0.9 <= result.ratio() <= 1.3
    assert result.wait_p95() < 0.5
    assert len(result.changes()) <= 40  # bounded: no flapping across 15 minutes


def test_slow_starting_workers_are_waited_for() -> None:
    result = sim.simulate(sim.step(20.0, 200.0, 10.0), policy=sim.POLICY, duration=40.0,
                          startup_delay=3.0)
    assert any(e.reason == "starting" for e in result.events)
    first_up = next(e for e in result.changes() if e.direction == "up")
    second_up = [e for e in result.changes() if e.direction == "up"][1]
    assert second_up.at - first_up.at >= 3.0


def test_a_full_output_stops_scale_up_in_simulation() -> None:
    result = sim.simulate(sim.step(20.0, 200.0, 30.0), policy=sim.POLICY, duration=60.0,
                          downstream_full=lambda t: t >= 30.0)
    assert [e for e in result.changes() if e.at >= 30.0] == []
    assert any(e.reason == "downstream_full" for e in result.events)
