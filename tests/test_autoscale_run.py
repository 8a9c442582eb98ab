"""The autoscaler on a real run: an I/O-bound stage under a step load."""

from __future__ import annotations

import threading
import time
from collections import Counter
from typing import Any

import pytest

import pipekit
from pipekit.autoscale import AutoscalePolicy


def _slow(x: int) -> int:
    time.sleep(0.004)
    return x


@pytest.mark.parametrize("ordered", [False, True])
def test_an_io_stage_scales_up_under_a_step_and_back_down_losing_nothing(
        ordered: bool) -> None:
    policy = AutoscalePolicy(min_workers=1, max_workers=12, scale_down_stabilisation=1.0,
                             scale_down_delay=0.5, startup_grace=0.2)
    pipe = pipekit.Pipeline("step", autoscale_interval=0.1, max_memory_mb=0, buffer_size=200,
                            ordered=ordered)
    pipe.add_stage("io", _slow, workers=policy)
    pipe.add_stage("after", lambda x: x)
    seen: Counter[int] = Counter()
    lock = threading.Lock()
    peak = 1

    def sink(x: int) -> None:
        with lock:
            seen[x] += 1

    with pipe.start(sink=sink) as run:
        n = 0
        end = time.monotonic() + 2.5  # a step: ~1000 items/s for 2.5 s
        while time.monotonic() < end:
            for _ in range(10):
                run.submit(n)
                n += 1
            time.sleep(0.01)
            peak = max(peak, run.stats().stage("io").workers)
        assert peak >= 3, f"the stage never scaled up (peak {peak})"
        deadline = time.monotonic() + 15  # then idle: it comes back down
        while time.monotonic() < deadline and run.stats().stage("io").workers > 1:
            time.sleep(0.1)
        final = run.stats().stage("io").workers
        events = run.stats().last_decisions
    report = run.report
    assert report is not None
    assert final == 1, f"still {final} workers after the load went away"
    assert report.submitted == n == report.outputs
    assert not report.unprocessed and report.dead_letter_count == 0
    assert all(c == 1 for c in seen.values()) and len(seen) == n  # none lost, none twice
    ups = [e for e in report.scale_events if e.direction == "up"]
    downs = [e for e in report.scale_events if e.direction == "down"]
    assert ups and downs
    assert all(e.reason for e in report.scale_events)
    assert any(e.direction in ("up", "down", "hold") for e in events)


def test_bottleneck_is_named_in_stats() -> None:
    pipe = pipekit.Pipeline("neck", autoscale_interval=0.1, max_memory_mb=0, buffer_size=50)
    pipe.add_stage("fast", lambda x: x, workers=2)
    pipe.add_stage("slow", _slow, workers=1)
    got: list[Any] = []

    def feed(run: pipekit.Run) -> None:
        for i in range(400):
            run.submit(i)

    with pipe.start(sink=got.append) as run:
        t = threading.Thread(target=feed, args=(run,))
        t.start()
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and run.stats().bottleneck != "slow":
            time.sleep(0.05)
        stats = run.stats()
        t.join(10)
    assert stats.bottleneck == "slow"
    assert stats.bottleneck_reason == "busy"
    assert stats.bottleneck_gain > 0
