"""Hand-written baselines pipekit is measured against, importable on their own.

Each pipeline function takes the items and the stage functions and returns an iterator of
outputs, so any workload can run on it::

    items --> [stage 0 thread(s)] --queue--> [stage 1 thread(s)] --queue--> ... --> caller

* :func:`serial`: a plain loop, the floor every concurrent design must beat on CPU or I/O.
* :func:`thread_pipeline`: one thread per stage (or ``workers[i]`` threads) and a bounded
  ``queue.Queue`` between stages, one item per hand-off, one stop marker that each worker
  passes on to its siblings and the last one forwards downstream.
* :func:`thread_batch_pipeline`: the same, handing off lists of ``batch_size`` items.
* :func:`chained_executor_pipeline`: one ``ThreadPoolExecutor`` per stage; each item's
  future, when done, submits its result to the next stage's executor.
* :func:`keyed_thread_pipeline`: the middle stage sharded by key over ``workers`` threads,
  each with its own queue, so one key's items keep their order.
* :func:`pool_map` / :func:`executor_map`: ``multiprocessing.Pool.map`` and
  ``ProcessPoolExecutor.map`` with a chunk size, for the CPU workload.

The baselines assume stage functions do not raise: they are the minimal code a careful
engineer would write for a benchmark, not production pipelines. The ``bench_*`` functions
at the bottom are the contenders the harness runs, one per workload and baseline.
"""

from __future__ import annotations

import multiprocessing
import queue
import threading
from collections import deque
from collections.abc import Callable, Hashable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor, ThreadPoolExecutor
from itertools import islice
from typing import Any

from _harness import (
    Params,
    Timed,
    add1,
    cpu_stage_for,
    io_stage_for,
    item_key,
    keyed_items,
    keyed_pass,
    keyed_work,
    timed,
)

Stage = Callable[[Any], Any]

_STOP = object()


# --------------------------------------------------------------------------- pipelines


def serial(items: Iterable[Any], stages: Sequence[Stage]) -> Iterator[Any]:
    """Apply the stages one after the other to each item, in the caller's thread.

    Args:
        items: the inputs.
        stages: functions applied in order.

    Yields:
        Each item's output, in input order.
    """
    for item in items:
        value = item
        for fn in stages:
            value = fn(value)
        yield value


def _worker(
    fn: Stage,
    inbox: queue.Queue[Any],
    outbox: queue.Queue[Any],
    remaining: list[int],
    lock: threading.Lock,
) -> None:
    get, put = inbox.get, outbox.put
    while True:
        item = get()
        if item is _STOP:
            inbox.put(_STOP)  # siblings reading the same inbox see it too
            with lock:
                remaining[0] -= 1
                last = remaining[0] == 0
            if last:
                put(_STOP)
            return
        put(fn(item))


def _batch_worker(fn: Stage, inbox: queue.Queue[Any], outbox: queue.Queue[Any]) -> None:
    get, put = inbox.get, outbox.put
    while True:
        batch = get()
        if batch is _STOP:
            put(_STOP)
            return
        put([fn(item) for item in batch])


def _feed(items: Iterable[Any], outbox: queue.Queue[Any]) -> None:
    put = outbox.put
    for item in items:
        put(item)
    put(_STOP)


def _drain(inbox: queue.Queue[Any], threads: list[threading.Thread]) -> Iterator[Any]:
    get = inbox.get
    try:
        while (item := get()) is not _STOP:
            yield item
    finally:
        for t in threads:
            t.join()


def _start(name: str, target: Callable[..., None], *args: Any) -> threading.Thread:
    thread = threading.Thread(target=target, args=args, name=name, daemon=True)
    thread.start()
    return thread


def thread_pipeline(
    items: Iterable[Any],
    stages: Sequence[Stage],
    *,
    workers: Sequence[int] | None = None,
    maxsize: int = 1024,
) -> Iterator[Any]:
    """A thread-and-queue pipeline handing off one item at a time.

    Args:
        items: the inputs, read by a feeder thread.
        stages: functions applied in order, each by its own thread(s).
        workers: threads per stage (default one each); with more than one, order is lost.
        maxsize: capacity of each bounded queue between stages (backpressure).

    Yields:
        The outputs as the last stage produces them.
    """
    counts = list(workers) if workers is not None else [1] * len(stages)
    queues: list[queue.Queue[Any]] = [queue.Queue(maxsize) for _ in range(len(stages) + 1)]
    threads = [_start("baseline-feed", _feed, items, queues[0])]
    for i, (fn, count) in enumerate(zip(stages, counts, strict=True)):
        remaining, lock = [count], threading.Lock()
        for w in range(count):
            threads.append(
                _start(f"baseline-s{i}-{w}", _worker, fn, queues[i], queues[i + 1], remaining, lock)
            )
    return _drain(queues[-1], threads)


def thread_batch_pipeline(
    items: Iterable[Any],
    stages: Sequence[Stage],
    *,
    batch_size: int = 100,
    maxsize: int = 16,
) -> Iterator[Any]:
    """The one-thread-per-stage pipeline handing off lists of ``batch_size`` items.

    Args:
        items: the inputs, cut into batches by the feeder thread.
        stages: functions applied in order to every item of each batch.
        batch_size: items per hand-off.
        maxsize: capacity of each queue, in batches.

    Yields:
        The outputs, in input order.
    """
    queues: list[queue.Queue[Any]] = [queue.Queue(maxsize) for _ in range(len(stages) + 1)]
    it = iter(items)
    batches = iter(lambda: list(islice(it, batch_size)), [])
    threads = [_start("baseline-feed", _feed, batches, queues[0])]
    for i, fn in enumerate(stages):
        threads.append(_start(f"baseline-s{i}", _batch_worker, fn, queues[i], queues[i + 1]))
    for batch in _drain(queues[-1], threads):
        yield from batch


def _chain(
    executors: Sequence[ThreadPoolExecutor],
    stages: Sequence[Stage],
    index: int,
    item: Any,
    done: Future[Any],
) -> None:
    future = executors[index].submit(stages[index], item)

    def forward(f: Future[Any]) -> None:
        try:
            value = f.result()
        except BaseException as err:
            done.set_exception(err)
            return
        if index + 1 == len(stages):
            done.set_result(value)
        else:
            _chain(executors, stages, index + 1, value, done)

    future.add_done_callback(forward)


def chained_executor_pipeline(
    items: Iterable[Any],
    stages: Sequence[Stage],
    *,
    workers: Sequence[int] | None = None,
    window: int = 1024,
) -> Iterator[Any]:
    """One ``ThreadPoolExecutor`` per stage, one ``submit`` per item per stage.

    Each stage's future, when done, submits its result to the next stage's executor. At
    most ``window`` items are in flight; outputs come back in input order.

    Args:
        items: the inputs.
        stages: functions applied in order.
        workers: threads of each stage's executor (default one each).
        window: items in flight before the caller waits for the oldest.

    Yields:
        The outputs, in input order.
    """
    counts = list(workers) if workers is not None else [1] * len(stages)
    executors = [
        ThreadPoolExecutor(max_workers=c, thread_name_prefix=f"baseline-tpe-s{i}")
        for i, c in enumerate(counts)
    ]
    pending: deque[Future[Any]] = deque()
    try:
        for item in items:
            done: Future[Any] = Future()
            _chain(executors, stages, 0, item, done)
            pending.append(done)
            if len(pending) >= window:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:
        for ex in executors:
            ex.shutdown(wait=True)


def _route(
    fn: Stage,
    key: Callable[[Any], Hashable],
    inbox: queue.Queue[Any],
    shards: Sequence[queue.Queue[Any]],
) -> None:
    get, n = inbox.get, len(shards)
    puts = [s.put for s in shards]
    while (item := get()) is not _STOP:
        out = fn(item)
        puts[hash(key(out)) % n](out)
    for put in puts:
        put(_STOP)


def keyed_thread_pipeline(
    items: Iterable[Any],
    before: Stage,
    work: Stage,
    after: Stage,
    *,
    key: Callable[[Any], Hashable],
    workers: int = 8,
    maxsize: int = 1024,
) -> Iterator[Any]:
    """Three stages whose middle one is sharded by key over ``workers`` threads.

    Every key maps to one shard thread with its own FIFO queue, so one key's items are
    worked on one at a time and leave in the order they came; different keys interleave.

    Args:
        items: the inputs.
        before: the first stage; its thread also routes each output to a shard.
        work: the keyed middle stage.
        after: the last stage.
        key: the key of an item (after ``before``).
        workers: shard threads of the middle stage.
        maxsize: capacity of each queue.

    Yields:
        The outputs, per-key order kept.
    """
    head: queue.Queue[Any] = queue.Queue(maxsize)
    shards: list[queue.Queue[Any]] = [queue.Queue(maxsize) for _ in range(workers)]
    merged: queue.Queue[Any] = queue.Queue(maxsize)
    out: queue.Queue[Any] = queue.Queue(maxsize)
    threads = [
        _start("baseline-feed", _feed, items, head),
        _start("baseline-route", _route, before, key, head, shards),
    ]
    remaining, lock = [workers], threading.Lock()
    for w, shard in enumerate(shards):
        threads.append(_start(f"baseline-shard-{w}", _worker, work, shard, merged, remaining, lock))
    threads.append(_start("baseline-after", _worker, after, merged, out, [1], threading.Lock()))
    return _drain(out, threads)


def default_chunksize(n: int, processes: int) -> int:
    """Chunks of about 1/16 of each process's share: few round trips, a short tail."""
    return max(1, n // (processes * 16))


def pool_map(
    items: Sequence[Any], fn: Stage, *, processes: int = 2, chunksize: int | None = None
) -> list[Any]:
    """``multiprocessing.Pool.map`` over the items (pool start-up included).

    Args:
        items: the inputs (a sequence, as ``Pool.map`` materialises it anyway).
        fn: a picklable function.
        processes: pool size.
        chunksize: items per task (default :func:`default_chunksize`).

    Returns:
        The outputs in input order.
    """
    size = chunksize or default_chunksize(len(items), processes)
    with multiprocessing.Pool(processes) as pool:
        return pool.map(fn, items, chunksize=size)


def executor_map(
    items: Sequence[Any], fn: Stage, *, processes: int = 2, chunksize: int | None = None
) -> list[Any]:
    """``ProcessPoolExecutor.map`` over the items (executor start-up included).

    Args:
        items: the inputs.
        fn: a picklable function.
        processes: worker processes.
        chunksize: items per task (default :func:`default_chunksize`).

    Returns:
        The outputs in input order.
    """
    size = chunksize or default_chunksize(len(items), processes)
    with ProcessPoolExecutor(max_workers=processes) as ex:
        return list(ex.map(fn, items, chunksize=size))


# --------------------------------------------------------------------------- contenders

_TRIVIAL: tuple[Stage, ...] = (add1, add1, add1)


def _io_stages(p: Params) -> tuple[Stage, ...]:
    return (add1, io_stage_for(p), add1)


_KEYED: tuple[Stage, ...] = (keyed_pass, keyed_work, keyed_pass)


def bench_trivial_serial(p: Params) -> Timed:
    """Trivial workload, plain loop."""
    return timed(lambda: sum(serial(range(p.n), _TRIVIAL)))


def bench_trivial_items(p: Params) -> Timed:
    """Trivial workload, thread per stage, ``queue.Queue``, one item per hand-off."""
    return timed(lambda: sum(thread_pipeline(range(p.n), _TRIVIAL)))


def bench_trivial_batches(p: Params) -> Timed:
    """Trivial workload, thread per stage, ``queue.Queue``, batches of ``p.batch_size``."""
    return timed(lambda: sum(thread_batch_pipeline(range(p.n), _TRIVIAL, batch_size=p.batch_size)))


def bench_trivial_tpe(p: Params) -> Timed:
    """Trivial workload, one ``ThreadPoolExecutor`` per stage, chained ``submit`` per item."""
    return timed(lambda: sum(chained_executor_pipeline(range(p.n), _TRIVIAL)))


def bench_io_threads(p: Params) -> Timed:
    """I/O workload, thread per stage with ``p.io_workers`` threads in the middle."""
    return timed(
        lambda: sum(thread_pipeline(range(p.n), _io_stages(p), workers=(1, p.io_workers, 1)))
    )


def bench_io_tpe(p: Params) -> Timed:
    """I/O workload, chained executors with ``p.io_workers`` threads in the middle."""
    return timed(
        lambda: sum(
            chained_executor_pipeline(range(p.n), _io_stages(p), workers=(1, p.io_workers, 1))
        )
    )


def bench_cpu_serial(p: Params) -> Timed:
    """CPU workload, plain loop."""
    fn = cpu_stage_for(p)
    return timed(lambda: sum(map(fn, range(p.n))))


def bench_cpu_pool(p: Params) -> Timed:
    """CPU workload, ``multiprocessing.Pool.map`` with a chunk size."""
    fn, items = cpu_stage_for(p), range(p.n)
    return timed(lambda: sum(pool_map(items, fn, processes=p.cpu_procs)))


def bench_cpu_executor(p: Params) -> Timed:
    """CPU workload, ``ProcessPoolExecutor.map`` with a chunk size."""
    fn, items = cpu_stage_for(p), range(p.n)
    return timed(lambda: sum(executor_map(items, fn, processes=p.cpu_procs)))


def bench_keyed_serial(p: Params) -> Timed:
    """Keyed workload, plain loop (order trivially kept)."""
    return timed(lambda: list(serial(keyed_items(p.n, p.keys), _KEYED)))


def bench_keyed_threads(p: Params) -> Timed:
    """Keyed workload, middle stage sharded by key over ``p.keyed_workers`` threads."""
    return timed(
        lambda: list(
            keyed_thread_pipeline(
                keyed_items(p.n, p.keys),
                keyed_pass,
                keyed_work,
                keyed_pass,
                key=item_key,
                workers=p.keyed_workers,
            )
        )
    )


def bench_keyed_unkeyed_threads(p: Params) -> Timed:
    """Keyed workload on the plain thread pipeline with shared-queue workers (no keys)."""
    return timed(
        lambda: list(
            thread_pipeline(keyed_items(p.n, p.keys), _KEYED, workers=(1, p.keyed_workers, 1))
        )
    )


def bench_keyed_tpe(p: Params) -> Timed:
    """Keyed workload, chained executors, results taken back in input order."""
    return timed(
        lambda: list(
            chained_executor_pipeline(
                keyed_items(p.n, p.keys), _KEYED, workers=(1, p.keyed_workers, 1)
            )
        )
    )
