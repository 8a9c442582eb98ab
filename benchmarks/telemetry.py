"""What pipekit's telemetry costs: the same pipeline with telemetry off and on.

    python benchmarks/telemetry.py [--items N] [--rounds R]

A 3-stage pipeline (work, then x+1, x+1) is fed through ``run.submit()`` from a
producer that opens a request span around each item, exactly as a service would; only
pipekit's own telemetry changes between contenders, so the producer's cost is the
same in every row. Contenders, measured in interleaved rounds (median of R):

* ``off``: ``telemetry=False``.
* ``api``: telemetry on, no SDK (the OpenTelemetry API's no-op providers).
* ``sdk 0%``: the SDK for metrics and traces, nothing sampled.
* ``sdk 1%``: SDK tracer provider with parent-based 1 % sampling and a batch span
  processor into an in-memory exporter; SDK meter provider with a periodic reader;
  metrics on.
* ``sdk 100%``: the same with every trace sampled (one item span per stage per item).

Work per item: 0 (trivial), 100 µs and 1 ms of pure-Python CPU in the first stage.
Prints items/s and the ratio to ``off`` measured in the same run. Never asserts.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import pipekit


def spin_for(seconds: float) -> Callable[[int], int]:
    """A stage function that burns about ``seconds`` of CPU per item."""
    if seconds <= 0:
        return lambda x: x
    loops = 1000
    t = time.perf_counter()
    for _ in range(20):
        sum(range(loops))
    per = (time.perf_counter() - t) / 20 / loops
    n = max(1, int(seconds / per))

    def work(x: int) -> int:
        sum(range(n))
        return x

    return work


def providers(ratio: float | None) -> tuple[Any, Any, Any]:
    """(tracer provider, meter provider, request tracer) for a contender."""
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader
    from opentelemetry.sdk.trace import TracerProvider, sampling
    from opentelemetry.sdk.trace.export import BatchSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    sampler = sampling.ParentBased(sampling.TraceIdRatioBased(0.01 if ratio is None else ratio))
    tp = TracerProvider(sampler=sampler)
    tp.add_span_processor(BatchSpanProcessor(InMemorySpanExporter(), max_queue_size=8192))
    mp = MeterProvider(metric_readers=[InMemoryMetricReader()])
    return tp, mp, tp.get_tracer("producer")


def measure(kind: str, work: Callable[[int], int], n: int) -> float:
    """Items/s of one run of contender ``kind``."""
    ratio = {"sdk 100%": 1.0, "sdk 0%": 0.0}.get(kind, 0.01)
    tp, mp, tracer = providers(ratio)
    if kind == "off":
        pipe = pipekit.Pipeline("bench", telemetry=False, max_memory_mb=0)
    elif kind == "api":
        pipe = pipekit.Pipeline("bench", telemetry=True, max_memory_mb=0)
    else:
        pipe = pipekit.Pipeline("bench", telemetry=True, tracer_provider=tp,
                                meter_provider=mp, max_memory_mb=0)
    pipe.add_stage("work", work, workers=2)
    pipe.add_stage("b", lambda x: x + 1, workers=2)
    pipe.add_stage("c", lambda x: x + 1, workers=2)
    count = [0]

    def sink(_: int) -> None:
        count[0] += 1

    start = time.perf_counter()
    with pipe.start(sink=sink) as run:
        submit = run.submit
        span = tracer.start_as_current_span
        for i in range(n):
            with span("request"):
                submit(i)
    elapsed = time.perf_counter() - start
    assert count[0] == n, (kind, count[0])
    tp.shutdown()
    mp.shutdown()
    return n / elapsed


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print the table."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--items", type=int, default=0, help="items per run (default per work)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--quick", action="store_true", help="small runs, 2 rounds")
    args = ap.parse_args(argv)
    print(f"command: python {' '.join(sys.argv)}")
    print(f"machine: {os.cpu_count()} CPUs, Python {platform.python_version()}, "
          f"{platform.platform()}")
    kinds = ("off", "api", "sdk 0%", "sdk 1%", "sdk 100%")
    rounds = 2 if args.quick else args.rounds
    for label, seconds, default_n, target in (("trivial", 0.0, 100_000, 0.90),
                                              ("100 µs/item", 1e-4, 6_000, 0.98),
                                              ("1 ms/item", 1e-3, 1_200, 0.99)):
        n = args.items or (default_n // 5 if args.quick else default_n)
        work = spin_for(seconds)
        results: dict[str, list[float]] = {k: [] for k in kinds}
        for r in range(rounds):
            order = kinds[r % len(kinds):] + kinds[:r % len(kinds)]
            for k in order:
                results[k].append(measure(k, work, n))
        base = statistics.median(results["off"])
        print(f"\n{label}: {n} items, {rounds} rounds (target: sdk 1% >= {target:.2f}x off)")
        print(f"  {'contender':<10} {'items/s':>10} {'vs off':>8}")
        for k in kinds:
            med = statistics.median(results[k])
            print(f"  {k:<10} {med:>10,.0f} {med / base:>7.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
