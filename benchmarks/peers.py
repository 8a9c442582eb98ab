"""pipekit against its peers: every contender on every workload, side by side.

Run ``python benchmarks/peers.py`` (a few minutes) or ``--quick`` (under a minute);
``--json PATH`` also writes the measurements. Contenders:

* the hand-written baselines of :mod:`baselines` and plain ``concurrent.futures``;
* pypeln (thread and process stages), mpire (``WorkerPool.map``), Bytewax (a dataflow run
  in-process with ``bytewax.testing.run_main`` / ``cluster_main``), Dask (a
  ``distributed.LocalCluster`` of processes: chunked ``client.map`` and ``dask.bag``);
* pipekit, with the configurations of ``benchmarks/core.py``.

Each contender gets the configuration its documentation suggests for the workload and says
it in its row name. A contender whose package is missing prints "unavailable: <reason>";
a cell a contender cannot do prints "n/a: <why>". Dask's cluster start-up is excluded from
the timing (a cluster is long-lived); pool start-up is included everywhere else, as in
pipekit's ``map``. Nothing here asserts.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import sys
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import core
from _harness import (
    CPU,
    IO,
    KEYED,
    TRIVIAL,
    Contender,
    Params,
    Timed,
    Unavailable,
    WorkloadSpec,
    add1,
    chunks,
    cpu_chunk,
    cpu_stage_for,
    io_chunk,
    io_stage,
    io_stage_for,
    keyed_chunk,
    keyed_items,
    keyed_pass,
    keyed_work,
    parse_args,
    run_suite,
    timed,
    trivial_chunk,
)


def _require(module: str) -> Any:
    """Import a peer's package, or raise :class:`Unavailable` with the reason."""
    try:
        return __import__(module, fromlist=["_"])
    except Exception as err:
        msg = f"unavailable: {module} cannot be imported ({type(err).__name__}: {err})"
        raise Unavailable(msg) from err


# --------------------------------------------------------------------------- item functions
# Composed per-item functions for the map-only libraries (mpire): module level, picklable.


def trivial_item(x: int) -> int:
    """The trivial workload's three stages on one item."""
    return add1(add1(add1(x)))


def io_item(x: int, delay: float) -> int:
    """The I/O workload's three stages on one item."""
    return add1(io_stage(add1(x), delay))


def keyed_item(key: int, seq: int) -> tuple[int, int]:
    """The keyed workload's three stages on one item (mpire unpacks the tuple)."""
    return keyed_pass(keyed_work(keyed_pass((key, seq))))


# --------------------------------------------------------------------------- pypeln


def bench_pypeln_thread_trivial(p: Params) -> Timed:
    """pypeln: three ``pl.thread.map`` stages, one worker each."""
    pl = _require("pypeln")

    def run() -> int:
        stage = pl.thread.map(add1, range(p.n), workers=1)
        stage = pl.thread.map(add1, stage, workers=1)
        return sum(pl.thread.map(add1, stage, workers=1))

    return timed(run)


def bench_pypeln_process_trivial(p: Params) -> Timed:
    """pypeln: three ``pl.process.map`` stages, one process each."""
    pl = _require("pypeln")

    def run() -> int:
        stage = pl.process.map(add1, range(p.n), workers=1)
        stage = pl.process.map(add1, stage, workers=1)
        return sum(pl.process.map(add1, stage, workers=1))

    return timed(run)


def bench_pypeln_io(p: Params) -> Timed:
    """pypeln: thread stages, ``p.io_workers`` workers on the sleeping one."""
    pl = _require("pypeln")
    sleep = io_stage_for(p)

    def run() -> int:
        stage = pl.thread.map(add1, range(p.n), workers=1)
        stage = pl.thread.map(sleep, stage, workers=p.io_workers)
        return sum(pl.thread.map(add1, stage, workers=1))

    return timed(run)


def bench_pypeln_cpu(p: Params) -> Timed:
    """pypeln: one ``pl.process.map`` stage with ``p.cpu_procs`` processes."""
    pl = _require("pypeln")
    fn = cpu_stage_for(p)
    return timed(lambda: sum(pl.process.map(fn, range(p.n), workers=p.cpu_procs)))


def bench_pypeln_keyed(p: Params) -> Timed:
    """pypeln: thread stages, ``p.keyed_workers`` on the middle one (pypeln has no keys)."""
    pl = _require("pypeln")

    def run() -> list[tuple[int, int]]:
        stage = pl.thread.map(keyed_pass, keyed_items(p.n, p.keys), workers=1)
        stage = pl.thread.map(keyed_work, stage, workers=p.keyed_workers)
        return list(pl.thread.map(keyed_pass, stage, workers=1))

    return timed(run)


def bench_pypeln_keyed_ordered(p: Params) -> Timed:
    """pypeln: as :func:`bench_pypeln_keyed` then ``pl.thread.ordered`` (global order)."""
    pl = _require("pypeln")

    def run() -> list[tuple[int, int]]:
        stage = pl.thread.map(keyed_pass, keyed_items(p.n, p.keys), workers=1)
        stage = pl.thread.map(keyed_work, stage, workers=p.keyed_workers)
        stage = pl.thread.map(keyed_pass, stage, workers=1)
        return list(pl.thread.ordered(stage))

    return timed(run)


# --------------------------------------------------------------------------- mpire


def _mpire_map(
    p: Params, fn: Callable[..., Any], items: Iterable[Any], n_jobs: int, start_method: str
) -> list[Any]:
    mpire = _require("mpire")
    with mpire.WorkerPool(n_jobs=n_jobs, start_method=start_method) as pool:
        out: list[Any] = pool.map(fn, items, iterable_len=p.n)
        return out


def bench_mpire_trivial(p: Params) -> Timed:
    """mpire: ``WorkerPool(2 processes).map`` of the composed stages, default chunks."""
    _require("mpire")
    return timed(lambda: sum(_mpire_map(p, trivial_item, range(p.n), p.cpu_procs, "fork")))


def bench_mpire_io(p: Params) -> Timed:
    """mpire: ``WorkerPool(16 threads).map`` of the composed stages, default chunks."""
    _require("mpire")
    fn = functools.partial(io_item, delay=p.io_sleep)
    return timed(lambda: sum(_mpire_map(p, fn, range(p.n), p.io_workers, "threading")))


def bench_mpire_cpu(p: Params) -> Timed:
    """mpire: ``WorkerPool(2 processes).map``, default chunks."""
    _require("mpire")
    fn = cpu_stage_for(p)
    return timed(lambda: sum(_mpire_map(p, fn, range(p.n), p.cpu_procs, "fork")))


def bench_mpire_keyed(p: Params) -> Timed:
    """mpire: ``WorkerPool(8 threads).map`` (results in input order), default chunks."""
    _require("mpire")
    items = keyed_items(p.n, p.keys)
    return timed(lambda: _mpire_map(p, keyed_item, items, p.keyed_workers, "threading"))


# --------------------------------------------------------------------------- Bytewax


def _bytewax() -> tuple[Any, Any, Any]:
    dataflow = _require("bytewax.dataflow")
    op = _require("bytewax.operators")
    testing = _require("bytewax.testing")
    return dataflow, op, testing


def bench_bytewax_trivial(p: Params) -> Timed:
    """Bytewax: three ``op.map`` steps, ``run_main`` (one worker), default source batch."""
    dataflow, op, testing = _bytewax()
    out: list[int] = []
    flow = dataflow.Dataflow("bench_trivial")
    s = op.input("in", flow, testing.TestingSource(range(p.n)))
    for name in ("a", "b", "c"):
        s = op.map(name, s, add1)
    op.output("out", s, testing.TestingSink(out))

    def run() -> int:
        testing.run_main(flow)
        return sum(out)

    return timed(run)


def bench_bytewax_io(p: Params) -> Timed:
    """Bytewax: ``redistribute`` then the sleep, ``cluster_main`` with 16 worker threads."""
    dataflow, op, testing = _bytewax()
    out: list[int] = []
    flow = dataflow.Dataflow("bench_io")
    s = op.input("in", flow, testing.TestingSource(range(p.n)))
    s = op.map("a", s, add1)
    s = op.redistribute("spread", s)
    s = op.map("sleep", s, io_stage_for(p))
    s = op.map("c", s, add1)
    op.output("out", s, testing.TestingSink(out))

    def run() -> int:
        testing.cluster_main(flow, [], 0, worker_count_per_proc=p.io_workers)
        return sum(out)

    return timed(run)


def _keyed_step(state: None, item: tuple[int, int]) -> tuple[None, tuple[int, int]]:
    return (None, keyed_work(item))


def _bytewax_key(item: tuple[int, int]) -> str:
    return str(item[0])


def _drop_key(kv: tuple[str, tuple[int, int]]) -> tuple[int, int]:
    return kv[1]


def bench_bytewax_keyed(p: Params) -> Timed:
    """Bytewax: ``key_on`` + ``stateful_map`` over ``cluster_main`` with 8 worker threads."""
    dataflow, op, testing = _bytewax()
    out: list[tuple[int, int]] = []
    flow = dataflow.Dataflow("bench_keyed")
    s = op.input("in", flow, testing.TestingSource(list(keyed_items(p.n, p.keys))))
    s = op.map("a", s, keyed_pass)
    keyed = op.key_on("key", s, _bytewax_key)
    s = op.map("unkey", op.stateful_map("work", keyed, _keyed_step), _drop_key)
    s = op.map("c", s, keyed_pass)
    op.output("out", s, testing.TestingSink(out))

    def run() -> list[tuple[int, int]]:
        testing.cluster_main(flow, [], 0, worker_count_per_proc=p.keyed_workers)
        return out

    return timed(run)


# --------------------------------------------------------------------------- Dask


@contextlib.contextmanager
def _dask_client(processes: int, threads: int) -> Iterator[Any]:
    """A ``LocalCluster`` of ``processes`` worker processes and a client; start-up untimed."""
    distributed = _require("distributed")
    cluster = distributed.LocalCluster(
        n_workers=processes,
        threads_per_worker=threads,
        processes=True,
        dashboard_address=None,
        silence_logs=logging.ERROR,
    )
    client = distributed.Client(cluster)
    try:
        yield client
    finally:
        client.close()
        cluster.close()


def _client_map(client: Any, fn: Callable[..., list[Any]], parts: list[Any]) -> list[Any]:
    futures = client.map(fn, parts, pure=False)
    out: list[Any] = []
    for part in client.gather(futures):
        out.extend(part)
    return out


def _dask_map(p: Params, fn: Callable[..., list[Any]], parts: list[Any], threads: int) -> Timed:
    with _dask_client(p.cpu_procs, threads) as client:
        client.submit(len, [0]).result()  # workers up and connected before the clock starts
        return timed(lambda: _client_map(client, fn, parts))


def _summed(run: Timed) -> Timed:
    return Timed(elapsed=run.elapsed, result=sum(run.result), note=run.note)


def bench_dask_map_trivial(p: Params) -> Timed:
    """Dask: ``client.map`` over 1000-item chunks, 2 processes x 1 thread."""
    return _summed(_dask_map(p, trivial_chunk, chunks(p.n, p.chunk), threads=1))


def bench_dask_map_io(p: Params) -> Timed:
    """Dask: ``client.map`` over 64 chunks, 2 processes x 8 threads."""
    size = max(1, p.n // 64)
    fn = functools.partial(io_chunk, delay=p.io_sleep)
    threads = p.io_workers // p.cpu_procs
    return _summed(_dask_map(p, fn, chunks(p.n, size), threads=threads))


def bench_dask_map_cpu(p: Params) -> Timed:
    """Dask: ``client.map`` over 16 chunks, 2 processes x 1 thread."""
    size = max(1, p.n // 16)
    fn = functools.partial(cpu_chunk, loops=p.cpu_loops)
    return _summed(_dask_map(p, fn, chunks(p.n, size), threads=1))


def bench_dask_map_keyed(p: Params) -> Timed:
    """Dask: ``client.map`` over 64 chunks gathered in order, 2 processes x 4 threads."""
    items = list(keyed_items(p.n, p.keys))
    size = max(1, p.n // 64)
    parts = [items[i : i + size] for i in range(0, p.n, size)]
    return _dask_map(p, keyed_chunk, parts, threads=p.keyed_workers // p.cpu_procs)


def _dask_bag(
    p: Params,
    items: list[Any] | range,
    stages: tuple[Callable[[Any], Any], ...],
    *,
    npartitions: int,
    threads: int,
) -> Timed:
    bag_mod = _require("dask.bag")
    with _dask_client(p.cpu_procs, threads) as client:
        client.submit(len, [0]).result()

        def run() -> list[Any]:
            bag = bag_mod.from_sequence(items, npartitions=npartitions)
            for fn in stages:
                bag = bag.map(fn)
            out: list[Any] = bag.compute()
            return out

        return timed(run)


def bench_dask_bag_trivial(p: Params) -> Timed:
    """dask.bag: three ``.map`` over 1000-item partitions on the cluster."""
    parts = max(1, p.n // p.chunk)
    return _summed(_dask_bag(p, range(p.n), (add1, add1, add1), npartitions=parts, threads=1))


def bench_dask_bag_io(p: Params) -> Timed:
    """dask.bag: three ``.map`` over 64 partitions, 2 processes x 8 threads."""
    stages = (add1, io_stage_for(p), add1)
    threads = p.io_workers // p.cpu_procs
    return _summed(_dask_bag(p, range(p.n), stages, npartitions=64, threads=threads))


def bench_dask_bag_cpu(p: Params) -> Timed:
    """dask.bag: ``.map`` over 16 partitions, 2 processes x 1 thread."""
    return _summed(_dask_bag(p, range(p.n), (cpu_stage_for(p),), npartitions=16, threads=1))


def bench_dask_bag_keyed(p: Params) -> Timed:
    """dask.bag: three ``.map`` over 64 partitions (bags keep order), 2 x 4 threads."""
    items = list(keyed_items(p.n, p.keys))
    stages = (keyed_pass, keyed_work, keyed_pass)
    threads = p.keyed_workers // p.cpu_procs
    return _dask_bag(p, items, stages, npartitions=64, threads=threads)


# --------------------------------------------------------------------------- the table

PYPELN_T = "pypeln thread stages"
MPIRE = "mpire WorkerPool.map"
BYTEWAX = "Bytewax dataflow"
DASK_MAP = "Dask LocalCluster client.map"
DASK_BAG = "dask.bag on LocalCluster"
PROC_EXEC = "ProcessPoolExecutor.map, chunked"
KEYED_UNKEYED = "hand-written threads, shared queue (no key)"

_BYTEWAX_CPU_NA = (
    "in-process Bytewax workers are threads sharing the GIL; using 2 cores needs "
    "`python -m bytewax.run -p 2` over TCP"
)

SPECS = (
    WorkloadSpec(
        workload=TRIVIAL,
        title="1. trivial 3-stage pipeline (x+1 three times)",
        n_full=200_000,
        n_quick=20_000,
        base=core.PER_ITEM,
        contenders=(
            Contender(name=core.SERIAL, target="baselines:bench_trivial_serial"),
            Contender(name=core.PER_ITEM, target="baselines:bench_trivial_items", goal="~60k/s"),
            Contender(
                name=core.BATCH_100, target="baselines:bench_trivial_batches", goal="~1.4M/s"
            ),
            Contender(
                name=core.TPE_CHAIN,
                target="baselines:bench_trivial_tpe",
                scale=0.2,
                goal="~9k/s",
            ),
            Contender(
                name=f"{PYPELN_T}, 1 worker each",
                target="peers:bench_pypeln_thread_trivial",
                scale=0.2,
                goal="~14k/s",
            ),
            Contender(
                name="pypeln process stages, 1 process each",
                target="peers:bench_pypeln_process_trivial",
                scale=0.02,
                goal="~14k/s",
            ),
            Contender(
                name=f"{MPIRE}, 2 procs, composed",
                target="peers:bench_mpire_trivial",
                goal="~14k/s",
            ),
            Contender(
                name=f"{BYTEWAX}, run_main, 1 worker",
                target="peers:bench_bytewax_trivial",
                goal="~80k/s",
            ),
            Contender(
                name=f"{DASK_MAP}, 1000-item chunks",
                target="peers:bench_dask_map_trivial",
                scale=0.2,
                goal="~125k/s",
            ),
            Contender(
                name=f"{DASK_BAG}, 1000/partition",
                target="peers:bench_dask_bag_trivial",
                scale=0.2,
            ),
            core.PIPEKIT_ROWS[TRIVIAL],
            core.PIPEKIT_TELEMETRY_ROWS[TRIVIAL],
        ),
    ),
    WorkloadSpec(
        workload=IO,
        title="2. I/O-bound: middle stage time.sleep(1 ms) on 16 workers",
        n_full=8_000,
        n_quick=1_600,
        base="ideal",
        contenders=(
            Contender(name=core.IO_THREADS, target="baselines:bench_io_threads"),
            Contender(name=f"{core.TPE_CHAIN}, 16 in the middle", target="baselines:bench_io_tpe"),
            Contender(name=f"{PYPELN_T}, 16 in the middle", target="peers:bench_pypeln_io"),
            Contender(name=f"{MPIRE}, 16 threads, composed", target="peers:bench_mpire_io"),
            Contender(name=f"{BYTEWAX}, cluster_main, 16 workers", target="peers:bench_bytewax_io"),
            Contender(name=f"{DASK_MAP}, 2x8 threads, 64 chunks", target="peers:bench_dask_map_io"),
            Contender(name=f"{DASK_BAG}, 2x8 threads, 64 parts", target="peers:bench_dask_bag_io"),
            core.PIPEKIT_ROWS[IO],
            core.PIPEKIT_TELEMETRY_ROWS[IO],
        ),
    ),
    WorkloadSpec(
        workload=CPU,
        title="3. CPU-bound: ~1.5 ms pure-Python per item on 2 processes",
        n_full=2_000,
        n_quick=400,
        base=core.SERIAL,
        contenders=(
            Contender(name=core.SERIAL, target="baselines:bench_cpu_serial"),
            Contender(name=core.POOL_MAP, target="baselines:bench_cpu_pool"),
            Contender(name=PROC_EXEC, target="baselines:bench_cpu_executor"),
            Contender(name="pypeln process stage, 2 workers", target="peers:bench_pypeln_cpu"),
            Contender(name=f"{MPIRE}, 2 procs", target="peers:bench_mpire_cpu"),
            Contender(name=BYTEWAX, na=_BYTEWAX_CPU_NA),
            Contender(name=f"{DASK_MAP}, 2x1, 16 chunks", target="peers:bench_dask_map_cpu"),
            Contender(name=f"{DASK_BAG}, 2x1, 16 parts", target="peers:bench_dask_bag_cpu"),
            core.PIPEKIT_ROWS[CPU],
            core.PIPEKIT_TELEMETRY_ROWS[CPU],
        ),
    ),
    WorkloadSpec(
        workload=KEYED,
        title="4. keyed: (key, seq) over 100 keys, per-key order checked at the output",
        n_full=10_000,
        n_quick=2_000,
        base=core.SERIAL,
        contenders=(
            Contender(name=core.SERIAL, target="baselines:bench_keyed_serial"),
            Contender(name=core.KEYED_THREADS, target="baselines:bench_keyed_threads"),
            Contender(name=KEYED_UNKEYED, target="baselines:bench_keyed_unkeyed_threads"),
            Contender(
                name=f"{core.TPE_CHAIN}, 8 mid, in-order", target="baselines:bench_keyed_tpe"
            ),
            Contender(name=f"{PYPELN_T}, 8 in the middle", target="peers:bench_pypeln_keyed"),
            Contender(
                name=f"{PYPELN_T}, 8 mid, + ordered()",
                target="peers:bench_pypeln_keyed_ordered",
            ),
            Contender(name=f"{MPIRE}, 8 threads (ordered)", target="peers:bench_mpire_keyed"),
            Contender(
                name=f"{BYTEWAX}, key_on+stateful_map, 8 wrk", target="peers:bench_bytewax_keyed"
            ),
            Contender(name=f"{DASK_MAP}, 2x4, 64 chunks", target="peers:bench_dask_map_keyed"),
            Contender(name=f"{DASK_BAG}, 2x4, 64 parts", target="peers:bench_dask_bag_keyed"),
            core.PIPEKIT_ROWS[KEYED],
            core.PIPEKIT_TELEMETRY_ROWS[KEYED],
        ),
    ),
)

CHECKS = core.CHECKS


def main(argv: list[str] | None = None) -> int:
    """Run every contender on every workload; the command line is described by ``--help``."""
    config = parse_args(__doc__.splitlines()[0] if __doc__ else "peers benchmark", argv)
    run_suite("pipekit against its peers", SPECS, config, checks=CHECKS)
    return 0


if __name__ == "__main__":
    sys.exit(main())
