"""A CPU-bound stage on a local Dask cluster: against a serial loop, and against Dask's own
chunked ``client.map`` with the same chunking (issue 8). Prints; never asserts.

One command: ``.venv/bin/python benchmarks/dask_stage.py`` (about 20 s; ``--quick``: 5 s).

What is measured, in one process, interleaved over rounds (A B C, B C A, C A B):

* **serial**: ``[cpu_stage(x) for x in items]`` in this process (the base).
* **pipekit**: ``Pipeline.run(items)`` with one ``executor="dask"`` stage of 2 workers,
  pointed at the cluster (``dask_address``). The client connection, the worker plugin
  and the disconnect happen in every run and are inside the timed region, as they are
  for a user; the table also shows that fixed cost, measured on its own.
* **dask map**: ``client.map(cpu_chunk, chunks)`` + ``gather`` over chunks of the mean
  batch size pipekit used in the same round, on the same cluster and client.

The cluster (2 worker processes x 1 thread, started once, outside every timed region)
is what ``executor="dask"`` starts when no address is configured. A second table
compares the two ways to ship a stage function: once per worker (the plugin pipekit
uses) or pickled into every batch, for a function that carries 1 MB of state.
"""

from __future__ import annotations

import argparse
import logging
import os
import pickle
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _harness

import pipekit


class _Table:
    """A stage function that carries state (a lookup table) pickled with it."""

    def __init__(self, size: int) -> None:
        self.table = bytes(size)

    def __call__(self, x: int) -> int:
        return x + self.table[x % len(self.table)]


def _run_payload(payload: bytes, items: list[int]) -> list[int]:
    """The per-batch way: unpickle the function with every batch, then run it."""
    fn = pickle.loads(payload)
    return [fn(x) for x in items]


def _serial(fn: Callable[[int], int], n: int) -> tuple[float, int]:
    t0 = time.perf_counter()
    total = sum(fn(x) for x in range(n))
    return time.perf_counter() - t0, total


def _pipekit(fn: Callable[[int], int], n: int, address: str,
            workers: int = 2) -> tuple[float, int, float]:
    total = 0

    def add(x: int) -> None:
        nonlocal total
        total += x

    pipe = pipekit.Pipeline("bench", telemetry=False, max_memory_mb=None,
                            dask_address=address)
    pipe.add_stage("cpu", fn, executor="dask", workers=workers)
    t0 = time.perf_counter()
    report = pipe.run(range(n), sink=add, handle_signals=False)
    elapsed = time.perf_counter() - t0
    st = report.stage("cpu")
    return elapsed, total, n / max(1, st.batches)


def _dask_map(client: Any, loops: int, n: int, chunk: int) -> tuple[float, int]:
    import functools

    fn = functools.partial(_harness.cpu_chunk, loops=loops)
    t0 = time.perf_counter()
    futures = client.map(fn, _harness.chunks(n, chunk), pure=False)
    total = sum(sum(part) for part in client.gather(futures))
    return time.perf_counter() - t0, total


def _fixed_cost(address: str, rounds: int) -> float:
    """Seconds to connect a stage's pool to the cluster, install it and close it."""
    from pipekit._work import StageWork
    from pipekit.executors import make_pool

    work = StageWork(fn=_harness.add1, retry=pipekit.Retry(attempts=1), timeout=None,
                     fanout=False)
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        pool = make_pool("dask", "fixed", work, 2, {"dask_address": address})
        pool.submit([1], None, None, None).result(timeout=30)
        pool.shutdown(wait=True, timeout=10)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _shipping(client: Any, address: str, batches: int) -> None:
    """Per-batch cost of a trivial 100-item batch: the function installed once per worker
    (pipekit's plugin) against the function pickled into each batch (1 MB of state)."""
    from pipekit._work import StageWork
    from pipekit.executors import make_pool

    fn = _Table(1 << 20)
    items = list(range(100))
    work = StageWork(fn=fn, retry=pipekit.Retry(attempts=1), timeout=None, fanout=False)
    payload = pickle.dumps(work.fn)
    pool = make_pool("dask", "ship", work, 2, {"dask_address": address})
    try:
        pool.submit(items, None, None, None).result(timeout=30)
        rows = []
        for name in ("once per worker (plugin)", "pickled into each batch"):
            t0 = time.perf_counter()
            if name.startswith("once"):
                futs = [pool.submit(items, None, None, None) for _ in range(batches)]
                for f in futs:
                    f.result(timeout=60)
            else:
                dfs = [client.submit(_run_payload, payload, items, pure=False)
                       for _ in range(batches)]
                client.gather(dfs)
            rows.append((name, (time.perf_counter() - t0) / batches))
    finally:
        pool.shutdown(wait=True, timeout=10)
    print(f"\nshipping a stage function with 1 MiB of state ({batches} batches of 100)")
    base = rows[0][1]
    for name, per in rows:
        print(f"  {name:<28} {per * 1e3:8.2f} ms/batch   x{per / base:5.2f}")


def main(argv: list[str] | None = None) -> None:
    """Run the benchmark and print the table."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small N, one round")
    ap.add_argument("--rounds", type=int, default=None)
    ap.add_argument("-n", type=int, default=None, help="items per run")
    args = ap.parse_args(argv)
    rounds = args.rounds or (1 if args.quick else 3)
    n = args.n or (300 if args.quick else 1000)

    import distributed

    loops, per_item = _harness.calibrate_cpu()
    import functools

    fn = functools.partial(_harness.cpu_stage, loops=loops)
    print(f"cpu stage: {loops} loops, {per_item * 1e3:.2f} ms per item; n={n}, "
          f"rounds={rounds}; cores={os.cpu_count()}")
    cluster = distributed.LocalCluster(
        n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
        dashboard_address=None, scheduler_kwargs={"dashboard_address": "127.0.0.1:0"},
        silence_logs=logging.CRITICAL)
    client = distributed.Client(cluster, set_as_default=False)
    try:
        client.submit(len, [0]).result()
        address = cluster.scheduler_address
        names = ["serial", "pipekit", "pipekit w=4", "dask map"]
        times: dict[str, list[float]] = {k: [] for k in names}
        chunk_used: list[float] = []
        expected: int | None = None
        for r in range(rounds):
            order = names[r % len(names):] + names[:r % len(names)]
            chunk = round(chunk_used[-1]) if chunk_used else 100
            for who in order:
                if who == "serial":
                    t, total = _serial(fn, n)
                elif who.startswith("pipekit"):
                    t, total, mean_batch = _pipekit(fn, n, address, 4 if "4" in who else 2)
                    if who == "pipekit":
                        chunk_used.append(mean_batch)
                else:
                    t, total = _dask_map(client, loops, n, chunk)
                expected = total if expected is None else expected
                times[who].append(t)
                if total != expected:
                    print(f"  round {r}: {who} OUTPUT MISMATCH")
        fixed = _fixed_cost(address, rounds)
        med = {k: statistics.median(v) for k, v in times.items()}
        print(f"\n{'contender':<12} {'median s':>9} {'spread':>7} {'items/s':>9} "
              f"{'vs serial':>10}")
        for who, t in med.items():
            spread = (max(times[who]) - min(times[who])) / t
            print(f"{who:<12} {t:9.3f} {spread:6.0%} {n / t:9.0f} {med['serial'] / t:9.2f}x")
        print(f"\nmean batch pipekit used: {statistics.mean(chunk_used):.1f} items "
              f"(dask map used the same chunk size, from the latest pipekit run)")
        print(f"pipekit / dask map time: {med['pipekit'] / med['dask map']:.2f}x")
        print(f"pipekit's fixed cost per run (connect, install, close): {fixed * 1e3:.0f} ms")
        over = (med["pipekit"] - med["dask map"]) / n
        steady = (med["pipekit"] - fixed - med["dask map"]) / n
        print(f"pipekit overhead per item over dask map: {over * 1e6:.0f} us "
              f"(without the fixed cost: {steady * 1e6:.0f} us; within the spread above "
              f"when small or negative)")
        _shipping(client, address, 20 if args.quick else 60)
    finally:
        client.close()
        cluster.close()


if __name__ == "__main__":
    main()
