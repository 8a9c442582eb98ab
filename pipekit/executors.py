"""Worker pools for stages: threads, processes, and (with the ``dask`` extra) a cluster.

A stage never submits single items: it submits one task per micro-batch, and the
number of batches it keeps in flight is its worker count. Each pool here offers the
same small surface to the stage runner::

    submit(items, ctxs, attempts, progress) -> Future[BatchResult | None]
    resize(n)            # the stage's worker count changed
    rebuild()            # a worker process died: start a fresh pool
    shutdown(wait, timeout)

:class:`ThreadPool` is a small ``concurrent.futures.Executor`` of its own rather than
``ThreadPoolExecutor`` because a pipeline needs what the standard one lacks: threads
named ``pipekit-<stage>-<n>`` (so stack dumps and profiles show the stage), retiring
idle threads when a stage scales down, and daemon threads, so a call that hangs past
its timeout can never hold the interpreter open at exit.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import pickle
import threading
import time
import uuid
from collections.abc import Callable, Collection
from concurrent.futures import Executor, Future, ProcessPoolExecutor
from typing import Any

from pipekit._work import BatchResult, Progress, StageWork, install, make_runner, run_installed
from pipekit.errors import NotPicklableError

__all__ = ["ProcessPool", "StagePool", "ThreadPool", "make_pool"]

log = logging.getLogger("pipekit.executors")

_STOP = object()
# Pauses before each try of a process pool submit that failed to start a worker.
_SUBMIT_PAUSES = (0.0, 0.05, 0.1, 0.2, 0.4, 0.8)


class ThreadPool(Executor):
    """A resizable pool of named daemon threads.

    A thread is started only when no idle thread is waiting for work; ``retire_idle``
    asks idle threads to exit without touching busy ones.

    Args:
        name: thread name prefix; threads are called ``<name>-<n>``.
    """

    def __init__(self, name: str) -> None:
        import queue

        self._name = name
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._alive = 0
        self._idle = 0
        self._pending = 0
        self._counter = itertools.count()
        self._threads: set[threading.Thread] = set()
        self._shutdown = False

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future[Any]:
        """Run ``fn(*args, **kwargs)`` on a pool thread."""
        fut: Future[Any] = Future()
        with self._lock:
            if self._shutdown:
                raise RuntimeError("cannot submit to a pool that was shut down")
            self._pending += 1
            self._queue.put((fut, fn, args, kwargs))
            if self._idle < self._pending:
                self._start_thread()
        return fut

    def _start_thread(self) -> None:
        t = threading.Thread(target=self._work, name=f"{self._name}-{next(self._counter)}",
                             daemon=True)
        self._alive += 1
        self._threads.add(t)
        t.start()

    def _work(self) -> None:
        q, lock = self._queue, self._lock
        try:
            while True:
                with lock:
                    self._idle += 1
                job = q.get()
                with lock:
                    self._idle -= 1
                    self._pending -= 1
                if job is _STOP:
                    return
                fut, fn, args, kwargs = job
                if not fut.set_running_or_notify_cancel():
                    continue
                try:
                    result = fn(*args, **kwargs)
                except BaseException as exc:
                    fut.set_exception(exc)
                else:
                    fut.set_result(result)
                del job, fut, fn, args, kwargs
        finally:
            with lock:
                self._alive -= 1
                self._threads.discard(threading.current_thread())

    def retire_idle(self, n: int) -> int:
        """Ask up to ``n`` idle threads to exit; returns how many were asked."""
        with self._lock:
            k = max(0, min(n, self._idle - self._pending))
            for _ in range(k):
                self._pending += 1
                self._queue.put(_STOP)
            return k

    @property
    def threads(self) -> int:
        """Threads alive, busy or idle (stuck ones included)."""
        return self._alive

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False,
                 timeout: float | None = None,
                 leave: Collection[threading.Thread] = ()) -> None:
        """Stop every thread once its current job ends.

        Args:
            wait: join the threads.
            cancel_futures: cancel jobs not yet started.
            timeout: the longest to wait in all; threads stuck in a call are left
                behind (they are daemon threads and cannot block exit).
            leave: threads not to wait for (known to be stuck in an abandoned call).
        """
        import time

        with self._lock:
            if self._shutdown:
                return
            self._shutdown = True
            if cancel_futures:
                while True:
                    try:
                        job = self._queue.get_nowait()
                    except Exception:
                        break
                    if job is not _STOP:
                        self._pending -= 1
                        job[0].cancel()
            for _ in range(self._alive):
                self._pending += 1
                self._queue.put(_STOP)
            threads = [t for t in self._threads if t not in leave]
        if wait:
            deadline = None if timeout is None else time.monotonic() + timeout
            for t in threads:
                left = None if deadline is None else max(0.0, deadline - time.monotonic())
                t.join(left)


class StagePool:
    """The pool interface the stage runner uses (one implementation per executor kind)."""

    kind = "thread"
    #: True when the watchdog can abandon a stuck batch and read its progress.
    watch_progress = True
    #: About how long one batch should run: slow items make small batches. A pool whose
    #: hand-off costs milliseconds (a cluster) asks for longer batches.
    batch_seconds = 0.05

    def submit(self, items: list[Any], ctxs: list[Any] | None, attempts: list[int] | None,
               progress: Progress | None) -> Future[BatchResult | None]:
        """Run one batch."""
        raise NotImplementedError

    def resize(self, workers: int) -> None:
        """The stage's worker count is now ``workers``."""

    def rebuild(self, generation: int) -> None:
        """Replace a broken pool (only once per ``generation``)."""

    def is_worker_loss(self, exc: BaseException) -> bool:
        """Whether ``exc`` from a batch means its worker died."""
        return False

    def kill_stuck(self) -> None:
        """Terminate workers that run past every deadline (process pools)."""

    @property
    def generation(self) -> int:
        """Bumped each time the pool is rebuilt."""
        return 0

    def shutdown(self, wait: bool, timeout: float | None) -> None:
        """Stop the pool."""
        raise NotImplementedError


class _Threads(StagePool):
    kind = "thread"

    def __init__(self, stage: str, work: StageWork) -> None:
        self._pool = ThreadPool(f"pipekit-{stage}")
        self._run = make_runner(work, alarm=False)
        self._workers = 0
        # thread -> the progress of the batch it runs (stages with a timeout only)
        self._running: dict[threading.Thread, Progress] = {}

    def submit(self, items: list[Any], ctxs: list[Any] | None, attempts: list[int] | None,
               progress: Progress | None) -> Future[BatchResult | None]:
        if progress is None:
            return self._pool.submit(self._run, items, ctxs, attempts, None)
        return self._pool.submit(self._run_watched, items, ctxs, attempts, progress)

    def _run_watched(self, items: list[Any], ctxs: list[Any] | None,
                     attempts: list[int] | None, progress: Progress) -> BatchResult | None:
        me = threading.current_thread()
        self._running[me] = progress
        try:
            return self._run(items, ctxs, attempts, progress)
        finally:
            del self._running[me]

    def resize(self, workers: int) -> None:
        if workers < self._workers:
            self._pool.retire_idle(self._pool.threads - workers)
        self._workers = workers

    def shutdown(self, wait: bool, timeout: float | None) -> None:
        # A thread stuck in a call that timed out was abandoned: never wait for it.
        stuck = {t for t, p in list(self._running.items()) if p.abandoned}
        self._pool.shutdown(wait=wait, cancel_futures=True, timeout=timeout, leave=stuck)


class ProcessPool(StagePool):
    """A stage on worker processes; the stage function is pickled once per process.

    Args:
        stage: the stage name.
        work: the function and its policies; must pickle.
        max_workers: the most processes the pool starts (the top of the scaling range).
        mp_context: ``"forkserver"`` (default: safe with threads), ``"spawn"`` or
            ``"fork"``.

    Raises:
        NotPicklableError: the function or a policy cannot be pickled.
    """

    kind = "process"
    watch_progress = False

    def __init__(self, stage: str, work: StageWork, max_workers: int,
                 mp_context: str = "forkserver") -> None:
        try:
            self._payload = pickle.dumps(work)
        except Exception as err:
            raise NotPicklableError(
                f"stage {stage!r} runs on processes, so its function must pickle, but "
                f"{work.fn!r} cannot ({type(err).__name__}: {err}); define it at module "
                f"level (no lambda or closure), or use executor='thread'"
            ) from err
        self._stage = stage
        self._key = f"{stage}-{uuid.uuid4().hex[:8]}"
        self._max = max_workers
        self._ctx = mp_context
        self._gen = 0
        self._lock = threading.Lock()
        self._pool = self._new_pool()

    def _new_pool(self) -> ProcessPoolExecutor:
        import multiprocessing

        return ProcessPoolExecutor(
            max_workers=self._max,
            mp_context=multiprocessing.get_context(self._ctx),
            initializer=install,
            initargs=(self._key, self._payload),
        )

    def submit(self, items: list[Any], ctxs: list[Any] | None, attempts: list[int] | None,
               progress: Progress | None) -> Future[BatchResult | None]:
        from concurrent.futures.process import BrokenProcessPool

        error: BaseException | None = None
        for pause in _SUBMIT_PAUSES:
            if pause:
                time.sleep(pause)
            with self._lock:
                pool = self._pool
            try:
                return pool.submit(run_installed, self._key, items, ctxs, attempts)
            except BrokenProcessPool as exc:  # the dispatcher rebuilds it and re-runs
                error = exc
                break
            except Exception as exc:
                # The pool could not start a worker process for the batch: e.g. the
                # forkserver died (Python 3.11's dies when a client hangs up on it, which
                # a pool breaking under a spawn can cause), or a descriptor closed under
                # it. Not the items' fault: wait for the forkserver to come back.
                error = exc
                log.warning("stage %s: could not start a worker process (%s: %s); retrying",
                            self._stage, type(exc).__name__, exc)
        lost = error
        if not isinstance(error, BrokenProcessPool):
            lost = BrokenProcessPool(f"could not start a worker process for stage "
                                     f"{self._stage!r} ({type(error).__name__}: {error})")
            lost.__cause__ = error
        fut: Future[BatchResult | None] = Future()
        fut.set_exception(lost)  # a worker loss: the batch runs again on a rebuilt pool
        return fut

    def is_worker_loss(self, exc: BaseException) -> bool:
        from concurrent.futures.process import BrokenProcessPool

        return isinstance(exc, BrokenProcessPool)

    @property
    def generation(self) -> int:
        return self._gen

    def rebuild(self, generation: int) -> None:
        with self._lock:
            if generation != self._gen:
                return  # someone already rebuilt after that failure
            old = self._pool
            self._pool = self._new_pool()
            self._gen += 1
        log.warning("worker process lost; process pool rebuilt",
                    extra={"pipekit": {"event": "pool_rebuilt", "stage": self._stage,
                                       "generation": self._gen}})
        broken = bool(getattr(old, "_broken", False))
        procs = dict(getattr(old, "_processes", None) or {})
        pending = list((getattr(old, "_pending_work_items", None) or {}).values())
        # A pool that is not broken (a worker could not start) finishes what it holds.
        old.shutdown(wait=False, cancel_futures=broken)
        if broken:
            _reap_broken(self._stage, procs, pending)

    def kill_stuck(self) -> None:
        with self._lock:
            procs = dict(getattr(self._pool, "_processes", None) or {})
        for p in procs.values():
            with contextlib.suppress(Exception):  # already gone
                p.kill()

    def shutdown(self, wait: bool, timeout: float | None) -> None:
        with self._lock:
            pool = self._pool
        if not wait:
            self.kill_stuck()
        pool.shutdown(wait=wait, cancel_futures=True)


def _reap_broken(stage: str, procs: dict[Any, Any], pending: list[Any]) -> None:
    """Finish off a broken process pool.

    On Python 3.11 a pool breaking while ``submit`` starts a worker misses both: the
    late worker is never stopped (its manager thread, and the interpreter at exit, wait
    for it for ever) and the late batch's future never completes. Kill every worker
    the pool had and fail every batch it still held, so each runs again elsewhere.
    """
    from concurrent.futures.process import BrokenProcessPool

    for p in procs.values():
        with contextlib.suppress(Exception):  # already gone
            p.kill()
    for item in pending:
        fut = getattr(item, "future", None)
        if fut is not None and not fut.done():
            with contextlib.suppress(Exception):  # completed meanwhile
                fut.set_exception(BrokenProcessPool(
                    f"the process pool of stage {stage!r} broke before the batch ran"))


def make_pool(kind: str, stage: str, work: StageWork, max_workers: int,
              options: dict[str, Any] | None = None) -> StagePool:
    """Build the pool for a stage from its executor kind.

    Raises:
        NotPicklableError: a process or dask stage's function cannot be pickled.
    """
    options = options or {}
    if kind == "thread":
        return _Threads(stage, work)
    if kind == "process":
        return ProcessPool(stage, work, max_workers, options.get("mp_context", "forkserver"))
    if kind == "dask":
        from pipekit.dask import DaskPool  # the optional extra

        return DaskPool(stage, work, max_workers, options)
    raise ValueError(f"unknown executor {kind!r}")
