"""Soak: the chaos matrix for minutes, printing what drifts.

    python benchmarks/soak.py [--minutes N] [--interval S] [--rate R] [--seed S]

A four-stage pipeline runs under a steady stream of items (``--rate`` per second, from
a producer thread through ``run.submit``) while everything the short chaos tests do
happens at once, over and over:

* ``parse`` (threads, pull path): transient errors retried, malformed items dead-lettered;
* ``enrich`` (2 worker processes): heavy-tailed latency, and now and then an item whose
  worker process SIGKILLs itself the first time it runs (the pool is rebuilt, the batch
  split and re-run);
* ``score`` (threads, 0.2 s timeout, ordered): calls that stall past the timeout once
  and are retried on a fresh thread, leaving the stuck one behind until it returns;
* ``store`` (threads, keyed by account): one key at a time, a poison item now and then.

The ops server answers a scraper (``/livez``, ``/readyz``, ``/debug/pipeline`` and a
hostile request or two) every half second, and the OpenTelemetry SDK collects metrics
and spans in memory.

Every ``--interval`` seconds a row shows throughput, end-to-end latency (p50, p99 of
the items that left in that interval), what is pending, resident memory (with the worker
processes), threads, open descriptors, worker processes and worker losses. At the end:
the run report's ledger (every item an output, a dead letter or unprocessed, exactly
once) and the drift of memory, threads, descriptors and p99 latency from the first
interval to the last. Nothing is asserted: read the drift.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import math
import os
import random
import signal
import statistics
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pipekit
from pipekit.resources import ResourceSampler

Item = tuple[int, str, Any, float]  # (index, kind, arg, submitted at)
TOKEN = "soak-token-0c1d"


# -- stage functions (module level: process workers import them) ------------------------

_transient: Counter[int] = Counter()
_stalled: set[int] = set()
_lock = threading.Lock()


def parse(item: Item) -> Item:
    """Fail twice for ``transient`` items (retried), for good for ``malformed`` ones."""
    index, kind, _, _ = item
    if kind == "transient":
        with _lock:
            _transient[index] += 1
            n = _transient[index]
            if n > 2:
                del _transient[index]  # keep the counter small over hours
        if n <= 2:
            raise OSError(f"transient failure {n} of item {index}")
    elif kind == "malformed":
        raise ValueError(f"item {index} is malformed")
    return item


def enrich(item: Item) -> Item:
    """Heavy-tailed work; ``kill`` items SIGKILL their worker process the first time."""
    index, kind, arg, _ = item
    if kind == "kill":
        marker = Path(arg) / str(index)
        if not marker.exists():
            marker.write_text("")
            os.kill(os.getpid(), signal.SIGKILL)
        marker.unlink(missing_ok=True)
    elif kind == "slow":
        time.sleep(arg)
    return item


def score(item: Item) -> Item:
    """``stall`` items hang past the stage's timeout on their first call."""
    index, kind, _, _ = item
    if kind == "stall":
        with _lock:
            first = index not in _stalled
            _stalled.add(index)
        if first:
            time.sleep(0.5)
        else:
            with _lock:
                _stalled.discard(index)
    return item


def account(item: Item) -> int:
    """The key of ``store``: one of 50 accounts."""
    return item[0] % 50


def store(item: Item) -> Item:
    """A poison item always fails here."""
    if item[1] == "poison":
        raise RuntimeError(f"item {item[0]} cannot be stored")
    return item


# -- the run -----------------------------------------------------------------------------

KINDS = (("transient", 0.02), ("malformed", 0.005), ("kill", 0.0005), ("slow", 0.3),
         ("stall", 0.001), ("poison", 0.001))


def make_item(rng: random.Random, index: int, markers: str) -> Item:
    """One item, its kind drawn with the soak's odds."""
    roll, kind = rng.random(), "ok"
    arg: Any = None
    for name, p in KINDS:
        if roll < p:
            kind = name
            break
        roll -= p
    if kind == "kill":
        arg = markers
    elif kind == "slow":
        arg = min(0.05, 0.0002 * rng.paretovariate(1.2))
    return (index, kind, arg, time.monotonic())


def build(ops_dir: Path, tracer_provider: Any, meter_provider: Any) -> pipekit.Pipeline:
    """The soak pipeline."""
    pipe = pipekit.Pipeline("soak", buffer_size=200, max_memory_mb=None,
                            ops_enabled=True, ops_port=0, ops_token=TOKEN,
                            profiling_dir=ops_dir, tracer_provider=tracer_provider,
                            meter_provider=meter_provider)
    pipe.add_stage("parse", parse, workers=2,
                   retry=pipekit.Retry(attempts=3, backoff=0.001, on=(OSError,)))
    pipe.add_stage("enrich", enrich, executor="process", workers=2, batch_size=20)
    pipe.add_stage("score", score, workers=(1, 4), timeout=0.2, ordered=True,
                   retry=pipekit.Retry(attempts=2, backoff=0.001, on=(TimeoutError,)))
    pipe.add_stage("store", store, workers=3, key=account)
    return pipe


class Ledger:
    """Items submitted and not yet seen again: bounded by what is in the pipeline.

    Keeping every index ever submitted would grow the soak's own memory and hide
    pipekit's; this keeps only the outstanding ones, and counts the rest.
    """

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.outstanding: set[int] = set()
        self.submitted = self.outputs = self.dead = self.duplicates = 0
        self.latencies: list[float] = []

    def add(self, index: int) -> None:
        with self.lock:
            self.outstanding.add(index)
            self.submitted += 1

    def forget(self, index: int) -> None:
        """An item that was not accepted after all."""
        with self.lock:
            self.outstanding.discard(index)
            self.submitted -= 1

    def settle(self, index: int) -> None:
        try:
            self.outstanding.remove(index)
        except KeyError:
            self.duplicates += 1

    def output(self, item: Item) -> None:
        now = time.monotonic()
        with self.lock:
            self.settle(item[0])
            self.outputs += 1
            self.latencies.append(now - item[3])

    def dead_letter(self, letter: pipekit.DeadLetter) -> None:
        with self.lock:
            self.settle(letter.item[0])
            self.dead += 1


class Producer(threading.Thread):
    """Submits items at a steady rate until stopped."""

    def __init__(self, run: pipekit.Run, ledger: Ledger, rate: float, seed: int,
                 markers: str) -> None:
        super().__init__(name="soak-producer", daemon=True)
        self.run_ = run
        self.ledger = ledger
        self.rate = rate
        self.rng = random.Random(seed)
        self.markers = markers
        self.stop = threading.Event()

    def run(self) -> None:
        start, n = time.monotonic(), 0
        while not self.stop.is_set():
            wait = start + n / self.rate - time.monotonic()
            if wait > 0:
                time.sleep(min(0.05, wait))
                continue
            item = make_item(self.rng, n, self.markers)
            self.ledger.add(n)  # before it can come out
            try:
                self.run_.submit(item, timeout=1.0)
            except pipekit.SubmitTimeoutError:
                self.ledger.forget(n)
                continue  # backpressure: try the same index again
            except pipekit.PipelineClosedError:
                self.ledger.forget(n)
                return
            n += 1


class Scraper(threading.Thread):
    """Polls the ops endpoints (and sends the odd hostile request) twice a second."""

    def __init__(self, port: int) -> None:
        super().__init__(name="soak-scraper", daemon=True)
        self.port = port
        self.stop = threading.Event()
        self.statuses: Counter[int] = Counter()

    def run(self) -> None:
        requests = [("GET", "/livez", None), ("GET", "/readyz", None),
                    ("GET", "/debug/pipeline", TOKEN), ("GET", "/debug/pipeline", "wrong"),
                    ("GET", "/debug/profiles/../../etc/passwd/svg", TOKEN),
                    ("POST", "/debug/profile/cpu?seconds=1e9", TOKEN)]
        k = 0
        while not self.stop.wait(0.5):
            method, path, token = requests[k % len(requests)]
            k += 1
            try:
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
                headers = {"Authorization": f"Bearer {token}"} if token else {}
                conn.request(method, path, headers=headers)
                self.statuses[conn.getresponse().status] += 1
                conn.close()
            except OSError:
                self.statuses[0] += 1


def quantiles(values: list[float]) -> tuple[float, float]:
    """(p50, p99) in milliseconds, or NaN when there are too few values."""
    if len(values) < 2:
        return float("nan"), float("nan")
    cuts = statistics.quantiles(values, n=100)
    return cuts[49] * 1000, cuts[98] * 1000


def main(argv: list[str] | None = None) -> int:
    """Run the soak and print its table; never fails on what it measures."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--minutes", type=float, default=5.0, help="how long to run (5)")
    ap.add_argument("--interval", type=float, default=10.0, help="seconds per row (10)")
    ap.add_argument("--rate", type=float, default=1000.0,
                    help="items offered per second (1000)")
    ap.add_argument("--seed", type=int, default=1, help="seed of the item kinds (1)")
    args = ap.parse_args(argv)

    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    reader = InMemoryMetricReader()
    meter_provider = MeterProvider(metric_readers=[reader])
    spans = CountingSpanExporter()
    tracer_provider = TracerProvider()
    tracer_provider.add_span_processor(BatchSpanProcessor(spans))  # type: ignore[arg-type]
    work = Path(tempfile.mkdtemp(prefix="pipekit-soak-"))
    markers = work / "markers"
    markers.mkdir()

    ledger = Ledger()
    pipe = build(work / "profiles", tracer_provider, meter_provider)
    sampler = ResourceSampler()
    run = pipe.start(sink=ledger.output, dead_letter=ledger.dead_letter, shutdown_timeout=30)
    assert run.ops_url is not None
    producer = Producer(run, ledger, args.rate, args.seed, str(markers))
    scraper = Scraper(int(run.ops_url.rsplit(":", 1)[1]))
    producer.start()
    scraper.start()
    print(f"soak: {args.minutes:g} min, {args.rate:g} items/s offered, rows every "
          f"{args.interval:g} s; python {sys.version.split()[0]}, {os.cpu_count()} CPUs")
    head = (f"{'t s':>6} {'items/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'pending':>8} "
            f"{'dead':>6} {'RSS MB':>7} {'threads':>7} {'fds':>5} {'procs':>5} "
            f"{'lost':>5} {'stuck':>5} {'series':>6}")
    print(head)
    rows: list[dict[str, float]] = []
    started = time.monotonic()
    end = started + args.minutes * 60
    last_out = 0
    try:
        while time.monotonic() < end:
            time.sleep(min(args.interval, max(0.0, end - time.monotonic())))
            with ledger.lock:
                window, ledger.latencies = ledger.latencies, []
                done = ledger.outputs
            st = run.stats()
            res = sampler.sample()
            series = count_series(reader)
            p50, p99 = quantiles(window)
            row = {"t": time.monotonic() - started, "rate": (done - last_out) / args.interval,
                   "p50": p50, "p99": p99, "pending": run.pending(), "dead": st.dead_letters,
                   "rss": res.rss_bytes / 2**20, "threads": res.threads,
                   "fds": res.open_fds, "procs": res.children,
                   "lost": sum(s.workers_lost for s in st.stages),
                   "stuck": sum(s.stuck_workers for s in st.stages), "series": series}
            last_out = done
            rows.append(row)
            print(f"{row['t']:6.0f} {row['rate']:8.0f} {row['p50']:8.1f} {row['p99']:8.1f} "
                  f"{row['pending']:8.0f} {row['dead']:6.0f} {row['rss']:7.1f} "
                  f"{row['threads']:7.0f} {row['fds']:5.0f} {row['procs']:5.0f} "
                  f"{row['lost']:5.0f} {row['stuck']:5.0f} {row['series']:6.0f}", flush=True)
    except KeyboardInterrupt:
        print("interrupted: shutting down")
    finally:
        producer.stop.set()
        producer.join(5)
        scraper.stop.set()
        scraper.join(5)
        report = run.shutdown(timeout=30)
        tracer_provider.shutdown()
        meter_provider.shutdown()
    summarize(report, ledger, rows, scraper.statuses, spans.count)
    return 0


class CountingSpanExporter:
    """Counts the spans it is given and keeps none (an exporter that costs no memory)."""

    def __init__(self) -> None:
        self.count = 0

    def export(self, spans: Any) -> Any:
        from opentelemetry.sdk.trace.export import SpanExportResult

        self.count += len(spans)
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        pass

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return True


def count_series(reader: Any) -> int:
    """Distinct (metric, attributes) series collected now."""
    data = reader.get_metrics_data()
    if data is None:
        return 0
    return sum(len(m.data.data_points) for rm in data.resource_metrics
               for sm in rm.scope_metrics for m in sm.metrics)


def summarize(report: pipekit.RunReport, ledger: Ledger, rows: list[dict[str, float]],
              statuses: Counter[int], spans: int) -> None:
    """Print the ledger and the drift between the first and the last interval."""
    with ledger.lock:
        for u in report.unprocessed:
            ledger.settle(u.item[0])
        lost, duplicates = len(ledger.outstanding), ledger.duplicates
    print()
    print(f"report: reason={report.reason} submitted={report.submitted} "
          f"outputs={report.outputs} dead={report.dead_letter_count} "
          f"unprocessed={len(report.unprocessed)} in {report.duration:.0f} s; "
          f"{spans} spans exported")
    if not lost and not duplicates and report.submitted == ledger.submitted:
        print("ledger: OK (every item exactly once: output, dead letter or unprocessed)")
    else:
        print(f"ledger: BROKEN: {lost} lost, {duplicates} seen twice, "
              f"{report.submitted} reported submitted of {ledger.submitted}")
    print(f"ops scraper statuses: {dict(sorted(statuses.items()))}")
    if len(rows) < 2:
        return
    first, last = rows[0], rows[-1]

    def drift(key: str, unit: str) -> str:
        a, b = first[key], last[key]
        ratio = f" ({b / a:.2f}x)" if a and not (math.isnan(a) or math.isnan(b)) else ""
        return f"{key} {a:.1f} -> {b:.1f} {unit}{ratio}"

    print("drift, first interval -> last: " + "; ".join([
        drift("rss", "MB"), drift("threads", ""), drift("fds", ""), drift("procs", ""),
        drift("p99", "ms"), drift("rate", "items/s")]))
    mid = rows[len(rows) // 2:]
    with contextlib.suppress(statistics.StatisticsError):
        growth = statistics.linear_regression([r["t"] for r in mid], [r["rss"] for r in mid])
        print(f"RSS slope over the second half: {growth.slope * 60:+.2f} MB/min")


if __name__ == "__main__":
    sys.exit(main())
