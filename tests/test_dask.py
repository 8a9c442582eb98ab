"""Stages on a Dask cluster (``executor="dask"``), against a real ``distributed`` cluster.

One ``LocalCluster`` of two single-threaded worker processes serves the module (its
address is given to each pipeline, as an operator's ``dask_address`` would be); one
test lets the pool start and close a cluster of its own. Stage functions live at
module level (or in ``_helpers``) because cluster workers import them by name.

The shared cluster keeps ``distributed``'s default ``allowed-failures`` (3), so a
worker killed there exercises the pool's ``remove-worker`` watch; the pool's own
cluster runs with ``allowed-failures`` 0, so a kill there surfaces as ``KilledWorker``.
"""

from __future__ import annotations

import itertools
import logging
import os
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

pytest.importorskip("distributed")

import distributed
import psutil
from _helpers import (
    POISON,
    assert_accounted,
    assert_stages_accounted,
    double,
    fail_on_multiple_of_5,
    first_of,
    inc,
    jittery_identity,
    keyed_interval,
    kill_on_poison,
    make_pipe,
    wait_until,
)

import pipekit
from pipekit._work import StageWork
from pipekit.errors import (
    ItemTimeoutError,
    MissingExtraError,
    NotPicklableError,
    WorkerLostError,
)
from pipekit.executors import make_pool
from pipekit.retry import Retry

# -- stage functions (module level: cluster workers import them by name) ----------------

_seen: dict[Any, int] = {}


def fail_first_two(x: Any) -> Any:
    """Fail the first two calls for each item in this worker process, then return it."""
    _seen[x] = _seen.get(x, 0) + 1
    if _seen[x] <= 2:
        raise OSError(f"transient failure for {x!r}")
    return x


def trace_id_seen(x: tuple[int, str]) -> tuple[int, str, str]:
    """Return the item with the trace id current inside the stage call."""
    from opentelemetry import trace

    sc = trace.get_current_span().get_span_context()
    return (x[0], x[1], format(sc.trace_id, "032x"))


def interval(x: int) -> tuple[int, int, float, float]:
    """Return ``(x, pid, start, end)`` of a short call, on the system-wide clock."""
    start = time.monotonic()
    time.sleep(0.002)
    return (x, os.getpid(), start, time.monotonic())


def hang_on_3(x: int) -> int:
    """Sleep well past the tests' timeout on item 3."""
    if x == 3:
        time.sleep(3)
    return x


def slow(x: int) -> int:
    """Take a second per item (a batch still running at a short shutdown deadline)."""
    time.sleep(1.0)
    return x


def _allowed_failures(dask_scheduler: Any) -> int:
    """On the scheduler: how many worker deaths a task may cause before it fails."""
    n: int = dask_scheduler.allowed_failures
    return n


# -- fixtures ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cluster() -> Iterator[Any]:
    """A two-worker cluster of processes, shared by the module's tests."""
    lc = distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                  host="127.0.0.1", dashboard_address=None,
                                  scheduler_kwargs={"dashboard_address": "127.0.0.1:0"},
                                  silence_logs=logging.CRITICAL)
    try:
        yield lc
    finally:
        lc.close()


@pytest.fixture
def address(cluster: Any) -> str:
    """The shared cluster's scheduler address."""
    addr: str = cluster.scheduler_address
    return addr


def _worker_pids(cluster: Any) -> set[int]:
    with distributed.Client(cluster, set_as_default=False) as c:
        return set(c.run(os.getpid).values())


def _pipe(address: str | None, name: str = "t", **settings: Any) -> pipekit.Pipeline:
    return make_pipe(name, dask_address=address, **settings)


def _uid() -> str:
    return uuid.uuid4().hex[:8]


# -- behaviour -------------------------------------------------------------------------


def test_dask_stage_between_thread_stages_gives_the_thread_result(address: str) -> None:
    def build(executor: str, addr: str | None) -> pipekit.Pipeline:
        pipe = _pipe(addr)
        pipe.add_stage("inc", inc, workers=2)
        pipe.add_stage("double", double, executor=executor, workers=2, batch_size=16)
        pipe.add_stage("inc2", inc, workers=2)
        return pipe

    want: list[int] = []
    build("thread", None).run(range(300), sink=want.append)
    got: list[int] = []
    report = build("dask", address).run(range(300), sink=got.append)
    assert sorted(got) == sorted(want) == [2 * (x + 1) + 1 for x in range(300)]
    assert_stages_accounted(report)
    assert report.stage("double").executor == "dask"
    assert report.stage("double").batches >= 300 // 16


def test_batches_run_on_the_cluster_workers_one_at_a_time_per_worker_slot(
        cluster: Any, address: str) -> None:
    pipe = _pipe(address)
    pipe.add_stage("interval", interval, executor="dask", workers=1, batch_size=5)
    outs: list[tuple[int, int, float, float]] = []
    report = pipe.run(range(40), sink=outs.append)
    assert sorted(o[0] for o in outs) == list(range(40))
    assert {o[1] for o in outs} <= _worker_pids(cluster)  # ran on the cluster
    # one worker slot: batches never overlap, though the cluster has two workers
    spans = sorted((o[2], o[3]) for o in outs)
    assert all(a[1] <= b[0] for a, b in itertools.pairwise(spans))
    assert report.stage("interval").batches >= 8


def test_ordered_dask_stage_emits_in_input_order(address: str) -> None:
    pipe = _pipe(address, ordered=True)
    pipe.add_stage("jitter", jittery_identity, executor="dask", workers=2, batch_size=4)
    outs: list[int] = []
    pipe.run(range(120), sink=outs.append)
    assert outs == list(range(120))


def test_keyed_dask_stage_runs_one_key_at_a_time_in_order(address: str) -> None:
    pipe = _pipe(address)
    pipe.add_stage("keyed", keyed_interval, executor="dask", workers=2, batch_size=3,
                   key=first_of)
    items = [(k, i) for i in range(12) for k in "abcd"]
    outs: list[tuple[str, int, float, float]] = []
    report = pipe.run(items, sink=outs.append)
    assert_accounted(report)
    for k in "abcd":
        mine = [o for o in outs if o[0] == k]
        assert [o[1] for o in mine] == list(range(12))
        assert all(a[3] <= b[2] for a, b in itertools.pairwise(mine))


def test_retries_and_dead_letters_on_the_cluster(address: str) -> None:
    tag = _uid()  # worker processes outlive tests: fresh items for fail_first_two
    items = [(tag, i) for i in range(30)]
    flaky = _pipe(address)
    flaky.add_stage("flaky", fail_first_two, executor="dask", workers=2, batch_size=8,
                    retry=Retry(attempts=3, backoff=0.0))
    outs: list[Any] = []
    report = flaky.run(items, sink=outs.append)
    assert sorted(outs) == sorted(items)
    assert report.stage("flaky").retried == 2 * len(items)
    assert report.dead_letter_count == 0

    picky = _pipe(address)
    picky.add_stage("picky", fail_on_multiple_of_5, executor="dask", workers=2,
                    retry=Retry(attempts=2, backoff=0.0))
    outs = []
    report = picky.run(range(20), sink=outs.append, keep_dead_letters=True)
    assert sorted(outs) == [x for x in range(20) if x % 5]
    assert sorted(d.item for d in report.dead_letters) == [0, 5, 10, 15]
    assert all(isinstance(d.error, ValueError) and d.attempts == 2
               for d in report.dead_letters)
    assert report.stage("picky").retried == 4
    assert_accounted(report)


def test_trace_context_crosses_into_cluster_workers(address: str) -> None:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    pipe = pipekit.Pipeline("traced", tracer_provider=provider, max_memory_mb=None,
                            dask_address=address)
    pipe.add_stage("seen", trace_id_seen, executor="dask", workers=2, batch_size=4)
    tracer = provider.get_tracer("test")
    outs: list[tuple[int, str, str]] = []
    with pipe.start(sink=outs.append) as run:
        for i in range(12):
            with tracer.start_as_current_span("request") as span:
                run.submit((i, format(span.get_span_context().trace_id, "032x")))
    assert len(outs) == 12
    assert all(o[1] == o[2] for o in outs), outs
    wanted = {o[1] for o in outs}
    linked = {format(link.context.trace_id, "032x")
              for s in exporter.get_finished_spans() if s.name == "pipekit.stage seen"
              for link in s.links}
    assert linked == wanted
    provider.shutdown()


def test_a_worker_killed_mid_run_loses_no_item(address: str) -> None:
    pipe = _pipe(address)
    pipe.add_stage("inc", inc, workers=2)
    # Four losses before an item is blamed: on a loaded machine a restarted worker's
    # loss can reach a batch that runs alone just after the poison's (seen once in CI).
    pipe.add_stage("killer", kill_on_poison, executor="dask", workers=2, batch_size=6,
                   retry=Retry(attempts=4, backoff=0.0))
    items = [x for x in range(60) if x != POISON + 1]  # inc turns POISON-1 into POISON
    outs: list[int] = []
    report = pipe.run(items, sink=outs.append, keep_dead_letters=True)
    assert sorted(outs) == sorted(x + 1 for x in items if x + 1 != POISON)
    [letter] = report.dead_letters
    assert letter.item == POISON
    assert letter.stage == "killer"
    assert isinstance(letter.error, WorkerLostError)
    assert letter.attempts >= 2
    assert report.stage("killer").workers_lost >= 1
    assert_accounted(report)
    assert_stages_accounted(report)


@pytest.mark.parametrize("attempts", [1, 2])
def test_a_timed_out_call_is_abandoned_on_the_worker(address: str, attempts: int) -> None:
    pipe = _pipe(address)
    pipe.add_stage("hang", hang_on_3, executor="dask", workers=2, batch_size=10,
                   timeout=0.3, retry=Retry(attempts=attempts, backoff=0.0))
    outs: list[int] = []
    report = pipe.run(range(10), sink=outs.append, keep_dead_letters=True)
    # the items after the stuck one still run, on a fresh thread of the same worker
    assert sorted(outs) == [x for x in range(10) if x != 3]
    [letter] = report.dead_letters
    assert letter.item == 3
    assert isinstance(letter.error, ItemTimeoutError)
    assert letter.attempts == attempts
    assert report.stage("hang").timed_out == attempts
    assert report.stage("hang").retried == attempts - 1
    assert_accounted(report)


def test_an_item_that_does_not_pickle_is_dead_lettered_alone(address: str) -> None:
    pipe = _pipe(address)
    pipe.add_stage("ident", inc, executor="dask", workers=1, batch_size=8)
    items: list[Any] = list(range(7))
    items.insert(3, threading.Lock())
    outs: list[Any] = []
    report = pipe.run(items, sink=outs.append, keep_dead_letters=True)
    assert sorted(outs) == [x + 1 for x in range(7)]
    [letter] = report.dead_letters
    assert isinstance(letter.error, NotPicklableError)
    assert_accounted(report)


def test_a_short_shutdown_deadline_reports_in_flight_items(address: str) -> None:
    pipe = _pipe(address)
    pipe.add_stage("slow", slow, executor="dask", workers=1, batch_size=4)
    run = pipe.start()
    for i in range(4):
        run.submit(i)
    wait_until(lambda: run.stats().stages[0].in_flight == 4)  # the batch is out
    report = run.shutdown(timeout=0.2)
    assert report.outputs == 0
    assert sorted(u.item for u in report.unprocessed) == [0, 1, 2, 3]
    assert {u.where for u in report.unprocessed} == {"in_flight"}
    assert_accounted(report)


def test_without_an_address_a_local_cluster_runs_and_closes_with_the_pipeline() -> None:
    me = psutil.Process()
    before = {p.pid for p in me.children(recursive=True)}
    pipe = _pipe(None)
    pipe.add_stage("killer", kill_on_poison, executor="dask", workers=2, batch_size=5)
    outs: list[int] = []
    with pipe.start(sink=outs.append, keep_dead_letters=True) as run:
        started = {p.pid for p in me.children(recursive=True)} - before
        assert len(started) >= 2  # its worker processes (and their nannies)
        for x in range(30):
            run.submit(x)
        pool = run._runners[0].pool
        with distributed.Client(pool.address, set_as_default=False) as c:
            # a batch that kills its worker fails at once, not after 3 more deaths
            assert c.run_on_scheduler(_allowed_failures) == 0
    report = run.report
    assert sorted(outs) == [x for x in range(30) if x != POISON]
    [letter] = report.dead_letters
    assert isinstance(letter.error, WorkerLostError)
    assert report.stage("killer").workers_lost >= 1
    assert_accounted(report)
    deadline = time.monotonic() + 10
    while {p.pid for p in me.children(recursive=True)} - before:
        assert time.monotonic() < deadline, "the local cluster left processes behind"
        time.sleep(0.05)


# -- the pool's edges --------------------------------------------------------------------


def test_a_function_that_does_not_pickle_is_refused_at_add_stage() -> None:
    pipe = make_pipe()
    with pytest.raises(NotPicklableError, match="executor='dask'"):
        pipe.add_stage("lam", lambda x: x, executor="dask")


def test_the_pool_refuses_a_work_that_does_not_pickle() -> None:
    work = StageWork(fn=lambda x: x, retry=Retry(attempts=1), timeout=None, fanout=False)
    with pytest.raises(NotPicklableError, match="Dask cluster"):
        make_pool("dask", "lam", work, 2, {"dask_address": "tcp://127.0.0.1:9"})


def test_a_function_the_workers_cannot_import_is_refused(
        address: str, tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib

    name = f"only_here_{_uid()}"
    (tmp_path / f"{name}.py").write_text("def f(x):\n    return x\n")
    monkeypatch.syspath_prepend(str(tmp_path))  # here, not in the running workers
    mod = importlib.import_module(name)
    try:
        work = StageWork(fn=mod.f, retry=Retry(attempts=1), timeout=None, fanout=False)
        with pytest.raises(NotPicklableError, match="importable on every worker"):
            make_pool("dask", "f", work, 2, {"dask_address": address})
    finally:
        sys.modules.pop(name, None)


def test_missing_distributed_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "distributed", None)
    monkeypatch.delitem(sys.modules, "pipekit.dask", raising=False)
    work = StageWork(fn=double, retry=Retry(attempts=1), timeout=None, fanout=False)
    with pytest.raises(MissingExtraError, match=r"pipekit\[dask\]") as info:
        make_pool("dask", "d", work, 2, {})
    assert info.value.extra == "dask"
    assert isinstance(info.value.__cause__, ImportError)
    pipe = make_pipe()
    with pytest.raises(MissingExtraError, match=r"pip install 'pipekit\[dask\]'"):
        pipe.add_stage("d", double, executor="dask")  # reported when the stage is added


def installed_stages() -> list[str]:
    """On a cluster worker: the stages installed in this worker process."""
    import pipekit.dask

    return sorted(pipekit.dask._runners)


def test_the_function_is_installed_once_per_worker_and_removed_at_shutdown(
        cluster: Any, address: str) -> None:
    work = StageWork(fn=double, retry=Retry(attempts=1), timeout=None, fanout=False)
    with distributed.Client(cluster, set_as_default=False) as c:
        pool = make_pool("dask", "once", work, 2, {"dask_address": address})
        try:
            per_worker = c.run(installed_stages)
            assert len(per_worker) == 2
            assert all(len([k for k in keys if k.startswith("pipekit-once-")]) == 1
                       for keys in per_worker.values()), per_worker
            # a worker that restarts gets the stage again before it runs a batch
            c.restart_workers([next(iter(per_worker))])
            c.wait_for_workers(2)
            assert all(any(k.startswith("pipekit-once-") for k in keys)
                       for keys in c.run(installed_stages).values())
            assert pool.submit([3], None, None, None).result(timeout=30).outputs == [6]
        finally:
            pool.shutdown(wait=True, timeout=5)
        assert not any(k.startswith("pipekit-once-")
                       for keys in c.run(installed_stages).values() for k in keys)


def test_a_batch_the_scheduler_would_rerun_fails_at_the_first_worker_death(
        address: str) -> None:
    # the shared cluster allows 3 failures: without the pool's watch on remove-worker
    # events the batch would kill four workers and end as KilledWorker
    work = StageWork(fn=kill_on_poison, retry=Retry(attempts=1), timeout=None,
                     fanout=False)
    pool = make_pool("dask", "watch", work, 2, {"dask_address": address})
    try:
        exc = pool.submit([POISON], None, None, None).exception(timeout=60)
        assert isinstance(exc, WorkerLostError), repr(exc)
        assert pool.is_worker_loss(exc)
    finally:
        pool.shutdown(wait=True, timeout=5)


def test_is_worker_loss_knows_distributed_errors(address: str) -> None:
    from distributed.client import FutureCancelledError
    from distributed.comm.core import CommClosedError
    from distributed.scheduler import KilledWorker

    work = StageWork(fn=double, retry=Retry(attempts=1), timeout=None, fanout=False)
    pool = make_pool("dask", "d", work, 2, {"dask_address": address})
    try:
        killed = KilledWorker("k", None, 0)  # type: ignore[arg-type]
        assert pool.is_worker_loss(killed)
        assert pool.is_worker_loss(CommClosedError("gone"))
        assert pool.is_worker_loss(WorkerLostError("gone"))
        assert pool.is_worker_loss(FutureCancelledError("k", "scheduler-connection-lost"))
        assert not pool.is_worker_loss(ValueError("bad item"))
        assert pool.submit([1, 2], None, None, None).result(timeout=30).outputs == [2, 4]
    finally:
        pool.shutdown(wait=True, timeout=5)
    # after shutdown a batch is refused as cancelled, which is not a loss
    fut = pool.submit([1], None, None, None)
    exc = fut.exception(timeout=1)
    assert exc is not None
    assert not pool.is_worker_loss(exc)


def test_an_unreachable_scheduler_is_a_config_error() -> None:
    work = StageWork(fn=double, retry=Retry(attempts=1), timeout=None, fanout=False)
    import dask

    with dask.config.set({"distributed.comm.timeouts.connect": "1s"}), \
            pytest.raises(pipekit.ConfigError, match="dask_address"):
        make_pool("dask", "d", work, 2, {"dask_address": "tcp://127.0.0.1:9"})
