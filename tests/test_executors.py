"""Tests for pipekit.executors (thread and process pools) and pipekit._work (the batch
loop that runs inside a worker)."""

from __future__ import annotations

import os
import threading
from typing import Any

import pytest
from _helpers import always_fail, double, flaky_twice, pid_of, wait_until

import pipekit
from pipekit._work import DROP, Progress, StageWork, make_runner
from pipekit.errors import NotPicklableError
from pipekit.executors import ProcessPool, ThreadPool, make_pool
from pipekit.retry import NO_RETRY, Retry

# -- ThreadPool ------------------------------------------------------------------------


def test_thread_pool_names_daemon_threads_after_the_stage() -> None:
    pool = ThreadPool("pipekit-parse")
    try:
        name, daemon = pool.submit(
            lambda: (threading.current_thread().name, threading.current_thread().daemon)
        ).result(5)
        assert name == "pipekit-parse-0"
        assert daemon
    finally:
        pool.shutdown()


def test_thread_pool_starts_a_thread_only_when_none_is_idle() -> None:
    pool = ThreadPool("pipekit-t")
    try:
        for i in range(20):
            assert pool.submit(double, i).result(5) == 2 * i
            wait_until(lambda: pool._idle == 1)  # the worker is back waiting
        assert pool.threads == 1
        gate = threading.Event()
        futures = [pool.submit(gate.wait, 10) for _ in range(3)]
        wait_until(lambda: pool.threads == 3)
        gate.set()
        assert all(f.result(5) for f in futures)
    finally:
        pool.shutdown()
    assert pool.threads == 0


def test_a_job_error_lands_on_its_future_and_the_thread_lives_on() -> None:
    pool = ThreadPool("pipekit-t")
    try:
        fut = pool.submit(always_fail, "x")
        with pytest.raises(OSError, match="cannot process 'x'"):
            fut.result(5)
        assert pool.submit(double, 4).result(5) == 8
        assert pool.threads == 1
    finally:
        pool.shutdown()


def test_retire_idle_stops_only_idle_threads() -> None:
    pool = ThreadPool("pipekit-t")
    try:
        gates = [threading.Event() for _ in range(3)]
        futures = [pool.submit(g.wait, 10) for g in gates]
        wait_until(lambda: pool.threads == 3)
        gates[0].set()
        gates[1].set()
        futures[0].result(5)
        futures[1].result(5)
        wait_until(lambda: pool._idle == 2)
        assert pool.retire_idle(5) == 2
        wait_until(lambda: pool.threads == 1)
        assert not futures[2].done()  # the busy thread was not touched
        gates[2].set()
        assert futures[2].result(5)
    finally:
        pool.shutdown()


def test_shutdown_joins_threads_and_refuses_later_submits() -> None:
    pool = ThreadPool("pipekit-t")
    pool.submit(double, 1).result(5)
    threads = list(pool._threads)
    pool.shutdown(wait=True)
    assert all(not t.is_alive() for t in threads)
    with pytest.raises(RuntimeError, match="shut down"):
        pool.submit(double, 2)
    pool.shutdown()  # a second call is harmless


def test_shutdown_with_a_timeout_leaves_a_stuck_thread_behind() -> None:
    pool = ThreadPool("pipekit-t")
    release = threading.Event()
    stuck = pool.submit(release.wait, 30)
    wait_until(lambda: pool._idle == 0 and pool.threads == 1)
    pool.shutdown(wait=True, timeout=0.05)  # returns although the job still runs
    assert not stuck.done()
    assert pool.threads == 1
    release.set()
    assert stuck.result(5)
    wait_until(lambda: pool.threads == 0)


def test_shutdown_does_not_wait_for_threads_it_is_told_to_leave() -> None:
    pool = ThreadPool("pipekit-t")
    release = threading.Event()
    stuck = pool.submit(release.wait, 30)
    wait_until(lambda: pool.threads == 1 and pool._idle == 0)
    (thread,) = list(pool._threads)
    pool.shutdown(wait=True, timeout=None, leave={thread})  # would block forever otherwise
    assert not stuck.done()
    release.set()
    stuck.result(5)
    thread.join(5)


# -- ProcessPool ----------------------------------------------------------------------------


def _work(fn: Any, **kw: Any) -> StageWork:
    return StageWork(fn=fn, retry=kw.pop("retry", NO_RETRY), timeout=kw.pop("timeout", None),
                     fanout=kw.pop("fanout", False))


def test_process_pool_refuses_a_function_that_does_not_pickle() -> None:
    with pytest.raises(NotPicklableError, match=r"stage 'score' runs on processes") as info:
        ProcessPool("score", _work(lambda x: x), max_workers=1)
    assert "executor='thread'" in str(info.value)
    assert isinstance(info.value, TypeError)


def test_process_pool_runs_batches_in_worker_processes() -> None:
    pool = make_pool("process", "pids", _work(pid_of), 2)
    try:
        result = pool.submit([1, 2, 3], None, None, None).result(30)
        assert result is not None
        assert result.succeeded == 3
        assert len(set(result.outputs)) == 1
        assert result.outputs[0] != os.getpid()
    finally:
        pool.shutdown(wait=True, timeout=10)


def test_process_pool_rebuilds_once_per_generation() -> None:
    pool = ProcessPool("p", _work(double), max_workers=1)
    try:
        assert pool.generation == 0
        pool.rebuild(0)
        pool.rebuild(0)  # a second report of the same loss does nothing
        assert pool.generation == 1
        result = pool.submit([4], None, None, None).result(30)
        assert result is not None
        assert result.outputs == [8]
    finally:
        pool.shutdown(wait=True, timeout=10)


def test_make_pool_refuses_an_unknown_kind() -> None:
    with pytest.raises(ValueError, match="unknown executor 'gpu'"):
        make_pool("gpu", "s", _work(double), 1)


# -- the batch loop -------------------------------------------------------------------------


@pytest.mark.parametrize("timeout", [None, 30.0], ids=["fast", "careful"])
def test_runner_outputs_drops_and_failures(timeout: float | None) -> None:
    def fn(x: int) -> Any:
        if x == 3:
            raise ValueError("three")
        return DROP if x == 4 else x * 10

    run = make_runner(_work(fn, timeout=timeout), alarm=False)
    progress = Progress() if timeout else None
    r = run([1, 2, 3, 4, 5], None, None, progress)
    assert r is not None
    assert r.outputs == [10, 20, 50]
    assert r.succeeded == 4
    assert r.dropped == 1
    assert r.done == 5
    assert [(i, item, type(e).__name__, a) for i, item, e, a in r.failures] == [
        (2, 3, "ValueError", 1)]


@pytest.mark.parametrize("timeout", [None, 30.0], ids=["fast", "careful"])
def test_runner_fanout_keeps_only_whole_outputs_of_an_item(timeout: float | None) -> None:
    def fn(x: int) -> Any:
        for i in range(x):
            if x == 3 and i == 2:
                raise ValueError("half done")
            yield (x, i)

    run = make_runner(_work(fn, timeout=timeout, fanout=True), alarm=False)
    r = run([0, 1, 2, 3, 4], None, None, Progress() if timeout else None)
    assert r is not None
    assert r.outputs == [(1, 0), (2, 0), (2, 1), (4, 0), (4, 1), (4, 2), (4, 3)]
    assert r.dropped == 1  # item 0 fanned out to nothing
    assert [f[1] for f in r.failures] == [3]


@pytest.mark.parametrize("timeout", [None, 30.0], ids=["fast", "careful"])
def test_runner_retries_count_prior_attempts(timeout: float | None) -> None:
    calls: dict[Any, int] = {}

    def fn(x: Any) -> Any:
        calls[x] = calls.get(x, 0) + 1
        raise OSError(x)

    policy = Retry(attempts=4, backoff=0)
    run = make_runner(_work(fn, timeout=timeout, retry=policy), alarm=False)
    r = run(["a", "b"], None, [0, 2], Progress() if timeout else None)
    assert r is not None
    # "a" had no attempt before: 4 calls; "b" had 2 already (e.g. on a lost worker): 2
    assert calls == {"a": 4, "b": 2}
    assert [(f[1], f[3]) for f in r.failures] == [("a", 4), ("b", 4)]
    assert r.retries == 3 + 1


def test_runner_recovers_an_item_by_retrying() -> None:
    run = make_runner(_work(flaky_twice, retry=Retry(attempts=3, backoff=0)), alarm=False)
    r = run(["runner-flaky"], None, None, None)
    assert r is not None
    assert r.outputs == ["runner-flaky"]
    assert r.retries == 2
    assert not r.failures


def test_careful_runner_returns_nothing_once_abandoned() -> None:
    entered = threading.Event()
    release = threading.Event()

    def fn(x: int) -> int:
        if x == 2:
            entered.set()
            release.wait(10)
        return x

    run = make_runner(_work(fn, timeout=0.01), alarm=False)
    progress = Progress()
    out: list[Any] = []
    t = threading.Thread(target=lambda: out.append(run([1, 2, 3], None, None, progress)))
    t.start()
    entered.wait(5)
    with progress.lock:  # what the watchdog does when the call runs too long
        progress.abandoned = True
        assert progress.done == 1
        assert progress.out == [1]
        assert progress.attempt == 1  # attempts of the stuck item, not of the batch
    release.set()
    t.join(5)
    assert out == [None]


def test_drop_is_a_picklable_singleton() -> None:
    import pickle

    assert pickle.loads(pickle.dumps(DROP)) is DROP
    assert pipekit.DROP is DROP
    assert repr(DROP) == "pipekit.DROP"
