"""pipekit's core benchmark: the pipeline engine against hand-written baselines.

Run ``python benchmarks/core.py`` (a few minutes) or ``--quick`` (under a minute, for a
smoke test); ``--json PATH`` also writes the measurements. It prints, for each workload,
items/s, the ratio to the workload's base measured in the same run, the peak RSS of the
process that ran it and of its worker processes, and the output check. It never asserts.

Workloads and what pipekit must reach (from the "core benchmark" issue):

* trivial: ``x + 1`` three times over ``range(N)``; pipekit >= 5x the hand-written
  per-item thread pipeline and >= 0.5x the hand-written batch-100 one.
* I/O: three stages, the middle one sleeping 1 ms on 16 workers; pipekit >= 90 % of the
  ideal ``N * 1 ms / 16``.
* CPU: a pure-Python function of ~1.5 ms on 2 processes; pipekit >= 1.8x serial.
* telemetry: the cost of pipekit's telemetry; see :func:`telemetry_rows`.

The pipekit contenders here are also run by ``benchmarks/peers.py``.
"""

from __future__ import annotations

import sys
from typing import Any

from _harness import (
    CPU,
    IO,
    KEYED,
    TRIVIAL,
    Contender,
    Params,
    TargetCheck,
    Timed,
    Unavailable,
    WorkloadSpec,
    add1,
    cpu_stage_for,
    io_stage_for,
    item_key,
    keyed_items,
    keyed_pass,
    keyed_work,
    parse_args,
    run_suite,
    timed,
)

# How pipekit is configured for each workload: one place for the lead to tune.
TRIVIAL_BATCH = 100
KEYED_BATCH = 16


def _pipekit() -> Any:
    """Import pipekit, or raise :class:`Unavailable` saying why not (yet)."""
    try:
        import pipekit

        pipekit.Pipeline  # noqa: B018 - fail here, not mid-run, when the core is missing
    except (ImportError, AttributeError) as err:
        msg = f"pipekit: not available yet ({type(err).__name__}: {err})"
        raise Unavailable(msg) from err
    return pipekit


_TELEMETRY = False  # set by the *_telemetry contenders, each in a child of its own


def _new_pipeline(name: str) -> Any:
    """A pipeline with telemetry off, or fully on for the ``*_telemetry`` contenders.

    "On" is what an application gets from ``pipekit.otel_setup.configure()``: the SDK
    meter provider with a Prometheus reader (collected once at the end, as a scrape
    would), a tracer provider sampling 1 % of new traces, and the resource monitor.
    """
    pipekit = _pipekit()
    if _TELEMETRY:
        from pipekit import otel_setup

        otel_setup.configure(sample_ratio=0.01)
        return pipekit.Pipeline(name, telemetry=True)
    return pipekit.Pipeline(name, telemetry=False)


def _with_telemetry(bench: Any) -> Any:
    def run(p: Params) -> Timed:
        global _TELEMETRY
        _TELEMETRY = True
        result = bench(p)
        from pipekit import otel_setup

        otel_setup.render_metrics()  # one scrape: the collection cost is part of the run
        return result

    run.__doc__ = f"{bench.__doc__} With telemetry on."
    return run


def bench_pipekit_trivial(p: Params) -> Timed:
    """Trivial workload on pipekit with default settings (workers, batch size, buffer)."""
    pipe = _new_pipeline("bench-trivial")
    for name in ("a", "b", "c"):
        pipe.add_stage(name, add1)
    return timed(lambda: sum(pipe.map(range(p.n))))


def bench_pipekit_io(p: Params) -> Timed:
    """I/O workload on pipekit: the sleeping middle stage on ``p.io_workers`` threads."""
    pipe = _new_pipeline("bench-io")
    pipe.add_stage("a", add1)
    pipe.add_stage("sleep", io_stage_for(p), workers=p.io_workers)  # default batch sizing
    pipe.add_stage("c", add1)
    return timed(lambda: sum(pipe.map(range(p.n))))


def bench_pipekit_cpu(p: Params) -> Timed:
    """CPU workload on pipekit: one process stage with ``p.cpu_procs`` workers."""
    pipe = _new_pipeline("bench-cpu")
    pipe.add_stage("spin", cpu_stage_for(p), workers=p.cpu_procs, executor="process")
    return timed(lambda: sum(pipe.map(range(p.n))))


def bench_pipekit_keyed(p: Params) -> Timed:
    """Keyed workload on pipekit: the middle stage keyed, on ``p.keyed_workers`` threads."""
    pipe = _new_pipeline("bench-keyed")
    pipe.add_stage("a", keyed_pass, workers=1, executor="thread", batch_size=TRIVIAL_BATCH)
    pipe.add_stage(
        "work",
        keyed_work,
        workers=p.keyed_workers,
        executor="thread",
        batch_size=KEYED_BATCH,
        key=item_key,
    )
    pipe.add_stage("c", keyed_pass, workers=1, executor="thread", batch_size=TRIVIAL_BATCH)
    return timed(lambda: list(pipe.map(keyed_items(p.n, p.keys))))


# Row names shared with peers.py so its target checks can name them.
SERIAL = "serial loop"
PER_ITEM = "hand-written threads+Queue, per item"
BATCH_100 = "hand-written threads+Queue, batch 100"
TPE_CHAIN = "chained ThreadPoolExecutor.submit"
IO_THREADS = "hand-written threads, 16 in the middle"
POOL_MAP = "multiprocessing.Pool.map, chunked"
KEYED_THREADS = "hand-written threads, sharded by key"
PIPEKIT = "pipekit"

bench_pipekit_trivial_telemetry = _with_telemetry(bench_pipekit_trivial)
bench_pipekit_io_telemetry = _with_telemetry(bench_pipekit_io)
bench_pipekit_cpu_telemetry = _with_telemetry(bench_pipekit_cpu)
bench_pipekit_keyed_telemetry = _with_telemetry(bench_pipekit_keyed)

PIPEKIT_TELEMETRY_ROWS = {
    w: Contender(name=f"{PIPEKIT}, telemetry on (SDK, 1% traces)",
                 target=f"core:bench_pipekit_{w}_telemetry")
    for w in ("trivial", "io", "cpu", "keyed")
}

PIPEKIT_ROWS = {
    TRIVIAL: Contender(
        name=f"{PIPEKIT} (3 thread stages, defaults)",
        target="core:bench_pipekit_trivial",
        goal=">=5x, >=.5 b100",
    ),
    IO: Contender(
        name=f"{PIPEKIT} (16 thread workers, defaults)",
        target="core:bench_pipekit_io",
        goal=">=0.90x ideal",
    ),
    CPU: Contender(
        name=f"{PIPEKIT} (process stage, 2 workers)",
        target="core:bench_pipekit_cpu",
        goal=">=1.8x serial",
    ),
    KEYED: Contender(
        name=f"{PIPEKIT} (key=, 8 thread workers)",
        target="core:bench_pipekit_keyed",
    ),
}

SPECS = (
    WorkloadSpec(
        workload=TRIVIAL,
        title="1. trivial 3-stage pipeline (x+1 three times)",
        n_full=200_000,
        n_quick=20_000,
        base=PER_ITEM,
        contenders=(
            Contender(name=SERIAL, target="baselines:bench_trivial_serial"),
            Contender(name=PER_ITEM, target="baselines:bench_trivial_items", goal="~60k/s"),
            Contender(name=BATCH_100, target="baselines:bench_trivial_batches", goal="~1.4M/s"),
            Contender(
                name=TPE_CHAIN, target="baselines:bench_trivial_tpe", scale=0.2, goal="~9k/s"
            ),
            PIPEKIT_ROWS[TRIVIAL],
            PIPEKIT_TELEMETRY_ROWS[TRIVIAL],
        ),
    ),
    WorkloadSpec(
        workload=IO,
        title="2. I/O-bound: middle stage time.sleep(1 ms) on 16 workers",
        n_full=8_000,
        n_quick=1_600,
        base="ideal",
        contenders=(
            Contender(name=IO_THREADS, target="baselines:bench_io_threads"),
            PIPEKIT_ROWS[IO],
            PIPEKIT_TELEMETRY_ROWS[IO],
        ),
    ),
    WorkloadSpec(
        workload=CPU,
        title="3. CPU-bound: ~1.5 ms pure-Python per item on 2 processes",
        n_full=2_000,
        n_quick=400,
        base=SERIAL,
        contenders=(
            Contender(name=SERIAL, target="baselines:bench_cpu_serial"),
            Contender(name=POOL_MAP, target="baselines:bench_cpu_pool"),
            PIPEKIT_ROWS[CPU],
            PIPEKIT_TELEMETRY_ROWS[CPU],
        ),
    ),
)

CHECKS = (
    TargetCheck(
        workload=TRIVIAL, contender=PIPEKIT_ROWS[TRIVIAL].name, reference=PER_ITEM, minimum=5.0
    ),
    TargetCheck(
        workload=TRIVIAL, contender=PIPEKIT_ROWS[TRIVIAL].name, reference=BATCH_100, minimum=0.5
    ),
    TargetCheck(workload=IO, contender=PIPEKIT_ROWS[IO].name, reference="ideal", minimum=0.9),
    TargetCheck(workload=IO, contender=IO_THREADS, reference="ideal", minimum=0.9),
    TargetCheck(workload=CPU, contender=PIPEKIT_ROWS[CPU].name, reference=SERIAL, minimum=1.8),
    TargetCheck(workload=CPU, contender=POOL_MAP, reference=SERIAL, minimum=1.8),
)


def telemetry_rows() -> list[str]:
    """The telemetry section: where its cost is measured.

    Telemetry needs providers built in the measuring process and a producer that opens
    request spans, which this harness's one-contender-per-subprocess layout does not
    give; ``benchmarks/telemetry.py`` measures it side by side instead.

    Returns:
        The lines of the section.
    """
    return [
        "4. telemetry overhead (trivial pipeline, telemetry off vs on)",
        "   measured by: python benchmarks/telemetry.py (off / API only / SDK 0%, 1%, 100%)",
    ]


def main(argv: list[str] | None = None) -> int:
    """Run the core benchmark; the command line is described by ``--help``."""
    config = parse_args(__doc__.splitlines()[0] if __doc__ else "core benchmark", argv)
    run_suite(
        "pipekit core benchmark",
        SPECS,
        config,
        checks=CHECKS,
        extra_sections=(telemetry_rows,),
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
