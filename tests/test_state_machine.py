"""A stateful property test: random interleavings of a run's operations keep its promises.

Hypothesis drives one running pipeline per example through submits (blocking and not),
items that raise or fail once, stats snapshots, worker-count changes, waits for idle
and a shutdown with a generous or a tiny deadline, then checks:

* **accounting**: every item submitted before the shutdown is found exactly once among
  the outputs, the dead letters and the report's ``unprocessed`` list (only a deadline
  leaves any there), and only failing items are dead letters;
* **worker bounds**: every stage's worker count and desired count stay within its
  ``(min, max)`` range, whatever the test and the autoscaler ask for at the same time;
* **progress**: once idle, everything submitted so far has come out; after the
  shutdown, nothing is pending and intake refuses items.

Scale changes go through ``run._runners[i].set_workers(n)``: the one seam the
autoscaler itself uses (``AutoscaleController(apply=...)`` calls it), so the test races
the live autoscaler of the ``(1, 4)`` stage through the same door.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from typing import Any

from _helpers import make_pipe
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

import pipekit

KINDS = ("ok", "ok", "ok", "fail", "flaky", "slow")


class _Stage:
    """The first stage's function: raises for ``fail`` items, once for ``flaky`` ones."""

    def __init__(self) -> None:
        self._seen: set[Any] = set()
        self._lock = threading.Lock()

    def __call__(self, item: tuple[int, str]) -> tuple[int, str]:
        kind = item[1]
        if kind == "fail":
            raise ValueError(f"item {item[0]} fails for good")
        if kind == "flaky":
            with self._lock:
                first = item not in self._seen
                self._seen.add(item)
            if first:
                raise OSError(f"item {item[0]} fails once")
        elif kind == "slow":
            time.sleep(0.02)
        return item


class RunMachine(RuleBasedStateMachine):
    """One run of a two-stage pipeline: ``a`` autoscaled (1, 4), ``b`` ordered, fixed 2."""

    def __init__(self) -> None:
        super().__init__()
        self.run: pipekit.Run | None = None
        self.outs: list[Any] = []
        self.submitted: list[tuple[int, str]] = []
        self.report: pipekit.RunReport | None = None
        self.next_id = 0

    @initialize()
    def start(self) -> None:
        pipe = make_pipe("machine", buffer_size=8, batch_size=4, autoscale_interval=0.02)
        pipe.add_stage("a", _Stage(), workers=(1, 4),
                       retry=pipekit.Retry(attempts=2, backoff=0.001, on=(OSError,)))
        pipe.add_stage("b", lambda x: x, workers=2, ordered=True)
        self.run = pipe.start(sink=self.outs.append, keep_dead_letters=True)

    @property
    def running(self) -> bool:
        return self.report is None

    def _new(self, kind: str) -> tuple[int, str]:
        self.next_id += 1
        return (self.next_id, kind)

    # -- rules ---------------------------------------------------------------------------

    @precondition(lambda self: self.running)
    @rule(kinds=st.lists(st.sampled_from(KINDS), min_size=1, max_size=12))
    def submit(self, kinds: list[str]) -> None:
        assert self.run is not None
        for kind in kinds:
            item = self._new(kind)
            self.run.submit(item, timeout=10)  # blocks while the first channel is full
            self.submitted.append(item)

    @precondition(lambda self: self.running)
    @rule(kind=st.sampled_from(KINDS))
    def submit_nowait(self, kind: str) -> None:
        assert self.run is not None
        item = self._new(kind)
        try:
            self.run.submit_nowait(item)
        except pipekit.QueueFullError:
            return  # refused at once: not submitted, so not accounted
        self.submitted.append(item)

    @precondition(lambda self: self.running)
    @rule(stage=st.sampled_from([0, 1]), n=st.integers(-3, 10))
    def scale(self, stage: int, n: int) -> None:
        assert self.run is not None
        runner = self.run._runners[stage]
        runner.set_workers(n)
        lo, hi = runner.spec.min_workers, runner.spec.max_workers
        if lo == hi:
            assert runner.workers == lo  # a fixed stage cannot be scaled at all
        self._check_bounds()

    @precondition(lambda self: self.running)
    @rule()
    def stats(self) -> None:
        assert self.run is not None
        st_ = self.run.stats()
        assert st_.state in ("running", "paused")
        assert st_.submitted == len(self.submitted)
        assert st_.outputs + st_.dead_letters <= st_.submitted
        assert self.run.pending() >= 0
        for s in st_.stages:
            assert s.min_workers <= s.workers <= s.max_workers, s
            assert s.min_workers <= s.desired_workers <= s.max_workers, s
            assert 0 <= s.queue_depth <= s.queue_capacity, s
            assert s.in_flight >= 0, s
            assert s.succeeded + s.failed <= s.received, s

    @precondition(lambda self: self.running)
    @rule()
    def wait_idle(self) -> None:
        """Progress: with nothing more submitted, everything comes out."""
        assert self.run is not None
        run = self.run
        end = time.monotonic() + 10
        while run.pending() and time.monotonic() < end:
            time.sleep(0.002)
        assert run.pending() == 0, "the run made no progress for 10 s"
        dead = run.stats().dead_letters
        assert len(self.outs) + dead == len(self.submitted)
        assert Counter(self.outs) == Counter(i for i in self.submitted if i[1] != "fail")

    @precondition(lambda self: self.running)
    @rule(timeout=st.sampled_from([10.0, 10.0, 0.01]))
    def shutdown(self, timeout: float) -> None:
        assert self.run is not None
        self.report = self.run.shutdown(timeout=timeout)
        self._check_report(deadline=timeout < 1)

    @precondition(lambda self: not self.running)
    @rule()
    def after_shutdown(self) -> None:
        assert self.run is not None
        try:
            self.run.submit(self._new("ok"))
        except pipekit.PipelineClosedError:
            pass
        else:
            raise AssertionError("a stopped run accepted an item")
        assert self.run.shutdown() is self.report  # idempotent
        assert self.run.state == "stopped"

    # -- invariants ------------------------------------------------------------------------

    @invariant()
    def worker_bounds(self) -> None:
        if self.run is not None:
            self._check_bounds()

    def _check_bounds(self) -> None:
        assert self.run is not None
        for r in self.run._runners:
            assert r.spec.min_workers <= r.workers <= r.spec.max_workers, (r.name, r.workers)
            assert r.spec.min_workers <= r.desired_workers <= r.spec.max_workers

    def _check_report(self, *, deadline: bool) -> None:
        report = self.report
        assert report is not None
        outs = Counter(self.outs)
        dead = Counter(d.item for d in report.dead_letters)
        left = Counter(u.item for u in report.unprocessed)
        assert outs + dead + left == Counter(self.submitted), "an item was lost or doubled"
        assert report.submitted == len(self.submitted)
        assert report.submitted == report.outputs + report.dead_letter_count + len(
            report.unprocessed)
        assert all(d.item[1] == "fail" for d in report.dead_letters)
        assert all(isinstance(d.error, ValueError) for d in report.dead_letters)
        if not deadline:
            assert not report.unprocessed and report.reason == "shutdown", report.reason
            assert Counter(i for i in self.submitted if i[1] == "fail") == dead
        for s in report.stages:
            assert s.min_workers <= s.workers <= s.max_workers

    def teardown(self) -> None:
        if self.run is not None and self.running:
            self.report = self.run.shutdown(timeout=10)
            self._check_report(deadline=False)


RunMachine.TestCase.settings = settings(
    max_examples=30,
    stateful_step_count=20,
    deadline=None,
    derandomize=True,  # the same interleavings on every run (CI is reproducible)
    suppress_health_check=[HealthCheck.too_slow],
)
test_run_machine = RunMachine.TestCase
