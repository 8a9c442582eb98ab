"""Property tests: random pipelines keep pipekit's promises.

For random chains of 1 to 4 thread stages (random workers, batch sizes, buffer sizes,
failure rates, retries, ordered and keyed stages):

* every submitted item ends in exactly one place, and no output is duplicated;
* the outputs and dead letters are exactly the items that pass or fail;
* a pipeline whose stages are all ordered emits its outputs in input order;
* a keyed stage never runs two items of one key at once, and runs one key's items in
  the order they arrived (checked where every stage before it is ordered).
"""

from __future__ import annotations

import functools
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from _helpers import assert_accounted, make_pipe
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipekit import Retry


@dataclass(frozen=True)
class StagePlan:
    """One random stage."""

    workers: int
    batch_size: int
    fail_percent: int  # items that fail for good here
    flaky_percent: int  # items that fail once here, then succeed on retry
    ordered: bool
    keys: int  # 0: not keyed; else key = item % keys

    def fails(self, index: int, x: int) -> bool:
        return (x * 31 + index * 17) % 100 < self.fail_percent

    def flaky(self, index: int, x: int) -> bool:
        return (x * 53 + index * 29 + 7) % 100 < self.flaky_percent


stage_plans = st.builds(
    StagePlan,
    workers=st.integers(1, 4),
    batch_size=st.integers(1, 50),
    fail_percent=st.sampled_from([0, 0, 5, 30]),
    flaky_percent=st.sampled_from([0, 0, 10]),
    ordered=st.booleans(),
    keys=st.sampled_from([0, 0, 1, 3, 5]),
)


class Recorder:
    """What the stage functions saw: call order per stage and key, and overlaps."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.active: Counter[tuple[int, int]] = Counter()
        self.overlaps: list[tuple[int, int, int]] = []
        self.calls: dict[tuple[int, int], list[int]] = defaultdict(list)
        self.tries: Counter[tuple[int, int]] = Counter()

    def stage_fn(self, index: int, plan: StagePlan) -> Callable[[int], int]:
        def fn(x: int) -> int:
            k = x % plan.keys if plan.keys else -1
            slot = (index, k)
            with self.lock:
                self.active[slot] += 1
                if plan.keys and self.active[slot] > 1:
                    self.overlaps.append((index, k, x))
                self.calls[slot].append(x)
                self.tries[(index, x)] += 1
                tries = self.tries[(index, x)]
            if x % 7 == 0:
                time.sleep(0.0003)  # let other workers overtake
            with self.lock:
                self.active[slot] -= 1
            if plan.fails(index, x):
                raise ValueError(f"stage {index} rejects {x}")
            if plan.flaky(index, x) and tries == 1:
                raise OSError(f"stage {index} hiccup on {x}")
            return x

        return fn


def _expected(plans: list[StagePlan], items: list[int]) -> tuple[list[int], dict[int, int]]:
    """Outputs in input order, and the stage index where each failed item died."""
    outputs: list[int] = []
    died: dict[int, int] = {}
    for x in items:
        for i, plan in enumerate(plans):
            if plan.fails(i, x):
                died[x] = i
                break
        else:
            outputs.append(x)
    return outputs, died


@settings(max_examples=35, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(plans=st.lists(stage_plans, min_size=1, max_size=4),
       n=st.integers(0, 150),
       buffer_size=st.sampled_from([1, 4, 16, 1000]))
def test_random_pipelines_keep_their_promises(plans: list[StagePlan], n: int,
                                              buffer_size: int) -> None:
    recorder = Recorder()
    pipe = make_pipe("prop", buffer_size=buffer_size, batch_linger=0.0005)
    for i, plan in enumerate(plans):
        pipe.add_stage(
            f"s{i}", recorder.stage_fn(i, plan), workers=plan.workers,
            batch_size=plan.batch_size, ordered=plan.ordered,
            key=functools.partial(_mod, plan.keys) if plan.keys else None,
            retry=Retry(attempts=2, backoff=0, on=OSError),
        )
    items = list(range(n))
    got: list[int] = []
    report = pipe.run(items, sink=got.append, keep_dead_letters=True,
                      shutdown_timeout=30.0)

    assert report.reason == "completed"
    assert_accounted(report)
    assert not report.unprocessed
    assert len(got) == len(set(got)), "an output was duplicated"
    want, died = _expected(plans, items)
    assert sorted(got) == want
    assert {d.item: int(d.stage[1:]) for d in report.dead_letters} == died
    assert all(isinstance(d.error, ValueError) and d.attempts == 1
               for d in report.dead_letters)

    if all(p.ordered for p in plans):
        assert got == want, "an all-ordered pipeline reordered its outputs"

    assert not recorder.overlaps, f"two items of one key ran at once: {recorder.overlaps}"
    for i, plan in enumerate(plans):
        if not plan.keys or not all(p.ordered for p in plans[:i]):
            continue
        for (index, k), calls in recorder.calls.items():
            if index != i:
                continue
            firsts = list(dict.fromkeys(calls))  # a retry repeats the item in place
            assert firsts == sorted(firsts), f"stage {i} key {k} out of order: {firsts}"


def _mod(m: int, x: int) -> int:
    return x % m


def _identity(x: Any) -> Any:
    return x


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(sizes=st.lists(st.integers(1, 40), min_size=1, max_size=6),
       workers=st.integers(1, 4), batch_size=st.integers(1, 20))
def test_submitted_items_come_out_exactly_once_through_start_and_submit(
        sizes: list[int], workers: int, batch_size: int) -> None:
    pipe = make_pipe("prop-submit", buffer_size=8, batch_linger=0.0005)
    pipe.add_stage("a", _identity, workers=workers, batch_size=batch_size)
    pipe.add_stage("b", _identity, workers=workers, batch_size=batch_size, ordered=True)
    got: list[tuple[int, int]] = []
    with pipe.start(sink=got.append) as run:
        for burst, size in enumerate(sizes):
            for i in range(size):
                run.submit((burst, i))
    report = run.report
    assert report is not None
    assert_accounted(report)
    assert sorted(got) == [(b, i) for b, size in enumerate(sizes) for i in range(size)]
