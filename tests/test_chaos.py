"""The chaos matrix: faults, stalls, kills and signals at bad moments, with nothing lost.

Every run ends with :func:`_chaos_helpers.check_ledger`: each submitted item is found
exactly once among the outputs, the dead letters and the report's ``unprocessed`` list.
Thread stages call each item once; process stages may call an item again after its
worker died (at least once), yet pass each result on once, so the ledger stays exact
there too. Signal scenarios run in a child interpreter (``_chaos_helpers`` as a
script). Sizes are small and randomness is seeded: the long version of this file is
``benchmarks/soak.py``.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from _chaos_helpers import (
    KILL_ALWAYS,
    KILL_ONCE,
    LATENCY,
    PERMANENT,
    POISON,
    STALL_ONCE,
    TRANSIENT,
    Tracked,
    calls_recorded,
    chaos,
    check_ledger,
    identity,
    key_mod5,
    make_items,
    record_calls,
    tracked_alive,
)
from _helpers import make_pipe

import pipekit

SEED = 20240607
TESTS_DIR = Path(__file__).resolve().parent


def _run(pipe: pipekit.Pipeline, items: list[Any]) -> tuple[list[Any], pipekit.RunReport]:
    outs: list[Any] = []
    report = pipe.run(items, sink=outs.append, keep_dead_letters=True, handle_signals=False)
    return outs, report


# -- errors, latency, kills ----------------------------------------------------------------


def test_transient_and_permanent_errors_together_end_in_the_right_place(executor: str) -> None:
    items = make_items(300, seed=SEED, mix={TRANSIENT: 0.1, PERMANENT: 0.05})
    transient = [it for it in items if it[2] == TRANSIENT]
    permanent = [it for it in items if it[2] == PERMANENT]
    assert transient and permanent
    pipe = make_pipe("retries", buffer_size=40)
    pipe.add_stage("flaky", chaos, executor=executor, workers=2, batch_size=10,
                   retry=pipekit.Retry(attempts=3, backoff=0.001, on=(OSError,)))
    pipe.add_stage("pass", identity, workers=2)
    outs, report = _run(pipe, items)
    check_ledger(items, outs, report)
    assert report.reason == "completed" and not report.unprocessed
    assert sorted(d.item for d in report.dead_letters) == sorted(permanent)
    for d in report.dead_letters:  # not retried: ValueError is outside the policy's `on`
        assert d.stage == "flaky" and isinstance(d.error, ValueError) and d.attempts == 1
    assert sorted(outs) == sorted(it for it in items if it[2] != PERMANENT)
    assert report.stage("flaky").retried == 2 * len(transient)


def test_heavy_tailed_latency_with_stalls_keeps_order_and_accounting() -> None:
    items = make_items(300, seed=SEED + 1,
                       mix={LATENCY: 0.5, STALL_ONCE: 0.02, PERMANENT: 0.02},
                       arg={STALL_ONCE: 0.6})
    stalls = [it for it in items if it[2] == STALL_ONCE]
    assert stalls
    pipe = make_pipe("tail", ordered=True, buffer_size=40)
    # a stalled call outlives its timeout: its thread is left behind, the item retried
    pipe.add_stage("slow", chaos, workers=4, batch_size=8, timeout=0.25,
                   retry=pipekit.Retry(attempts=2, backoff=0.001, on=(TimeoutError,)))
    pipe.add_stage("pass", identity, workers=2)
    outs, report = _run(pipe, items)
    check_ledger(items, outs, report)
    dead = {d.item for d in report.dead_letters}
    assert dead == {it for it in items if it[2] == PERMANENT}
    assert outs == [it for it in items if it not in dead]  # ordered end to end, no dupes
    slow = report.stage("slow")
    assert slow.timed_out >= len(stalls)  # (a loaded machine may stretch another call)
    assert slow.retried >= len(stalls)


@pytest.mark.parametrize("keyed", [False, True], ids=["plain", "keyed-ordered"])
def test_process_workers_killed_repeatedly_lose_nothing(tmp_path: Path, keyed: bool) -> None:
    items = make_items(240, seed=SEED + 2, mix={KILL_ONCE: 0.025},
                       arg={KILL_ONCE: str(tmp_path)})
    killers = [it for it in items if it[2] == KILL_ONCE]
    assert len(killers) >= 3
    pipe = make_pipe("kills", buffer_size=40)
    pipe.add_stage("fragile", record_calls, executor="process", workers=2, batch_size=6,
                   key=key_mod5 if keyed else None, ordered=keyed)
    pipe.add_stage("pass", identity, workers=2, ordered=keyed)
    outs, report = _run(pipe, items)
    if keyed:  # re-runs and splits keep the order the batches came in
        assert [it[1] for it in outs] == sorted(it[1] for it in outs)
    check_ledger(items, outs, report)  # outputs exactly once, though calls were repeated
    assert report.dead_letter_count == 0 and not report.unprocessed
    tag = items[0][0]
    assert len(list(tmp_path.glob(f"{tag}-*"))) == len(killers)  # each killed one worker
    # two workers that die together break the pool once: losses are counted per break
    assert 1 <= report.stage("fragile").workers_lost <= len(killers)
    calls = calls_recorded(tmp_path, tag)
    assert all(calls[it[1]] >= 2 for it in killers)  # at least once: called again


def test_a_worker_process_that_cannot_start_is_not_the_items_fault(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from concurrent.futures import ProcessPoolExecutor

    real = ProcessPoolExecutor.submit
    # what a pool says when the forkserver is gone, or a descriptor closed under it
    failures = [ConnectionRefusedError(111, "Connection refused"),
                OSError(9, "Bad file descriptor")]

    def flaky(self: Any, *args: Any, **kwargs: Any) -> Any:
        if failures:
            raise failures.pop(0)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(ProcessPoolExecutor, "submit", flaky)
    items = make_items(60, seed=SEED + 8)
    pipe = make_pipe("nostart", buffer_size=20)
    pipe.add_stage("p", chaos, executor="process", workers=2, batch_size=5)
    outs, report = _run(pipe, items)
    assert not failures  # both were raised
    check_ledger(items, outs, report)
    assert report.dead_letter_count == 0 and sorted(outs) == sorted(items)


def test_a_poison_item_is_dead_lettered_while_the_rest_flow(executor: str) -> None:
    n, batch = 200, 4
    items = make_items(n, seed=SEED + 3)
    poison_kind = POISON if executor == "thread" else KILL_ALWAYS
    tag, index, _, _ = items[37]
    items[37] = (tag, index, poison_kind, None)
    events: list[tuple[str, Any]] = []
    pipe = make_pipe("poison", buffer_size=40)
    pipe.add_stage("p", chaos, executor=executor, workers=2, batch_size=batch,
                   retry=pipekit.Retry(attempts=4, backoff=0.05, on=(RuntimeError,)))
    report = pipe.run(items, sink=lambda x: events.append(("out", x)),
                      dead_letter=lambda d: events.append(("dead", d.item)),
                      keep_dead_letters=True, handle_signals=False)
    check_ledger(items, [x for kind, x in events if kind == "out"], report)
    (letter,) = report.dead_letters
    assert letter.item == items[37]
    if executor == "thread":
        assert isinstance(letter.error, RuntimeError) and letter.attempts == 4
        # the other worker kept going while the poison item was retried: only the items
        # behind it in its own micro-batch waited for its retries
        first_dead = events.index(("dead", items[37]))
        assert first_dead >= n - batch
    else:
        assert isinstance(letter.error, pipekit.WorkerLostError) and letter.attempts >= 2
        assert report.stage("p").workers_lost >= 2


# -- a slow sink behind a fast source --------------------------------------------------------


@pytest.mark.parametrize("ordered", [False, True], ids=["pull", "dispatcher"])
def test_a_slow_sink_behind_a_fast_source_keeps_memory_flat(ordered: bool) -> None:
    buffer, batch, workers, n = 20, 5, 2, 2000
    # plain thread stages take the pull path; ordered ones go through a dispatcher
    pipe = make_pipe("flat", buffer_size=buffer, batch_size=batch, ordered=ordered)
    pipe.add_stage("a", identity, workers=workers)
    pipe.add_stage("b", identity, workers=workers)
    stages = 2
    # channels (each stage's and the output's), batches in flight and completed ones
    # waiting for a full channel, and the chunk the sink thread holds
    bound = (stages + 1) * buffer + stages * workers * batch * 2 + buffer
    base = tracked_alive()
    peak = [0]
    seen: list[int] = []

    def sink(x: Tracked) -> None:
        time.sleep(0.0002)
        seen.append(x.index)
        peak[0] = max(peak[0], tracked_alive() - base)

    with pipe.start(sink=sink) as run:
        for i in range(n):
            run.submit(Tracked(i))  # blocks while the first channel is full
            peak[0] = max(peak[0], tracked_alive() - base)
            if i % 100 == 0:
                for s in run.stats().stages:
                    assert s.queue_depth <= s.queue_capacity
    report = run.report
    assert report is not None and report.outputs == n and len(seen) == n
    assert peak[0] <= bound, f"{peak[0]} items alive at once, more than the {bound} " \
                             f"the buffers can hold: something buffers without bound"
    assert tracked_alive() - base <= 1  # nothing kept after the run (`x` of the loop)


def test_an_ordered_stage_behind_a_slow_item_holds_back_instead_of_buffering() -> None:
    release = threading.Event()

    def head_is_slow(x: Tracked) -> Tracked:
        if x.index == 0:
            release.wait(10)
        return x

    buffer, batch, workers = 20, 5, 4
    pipe = make_pipe("hol", buffer_size=buffer, batch_size=batch, ordered=True)
    pipe.add_stage("a", head_is_slow, workers=workers)
    base = tracked_alive()
    accepted = 0
    with pipe.start(sink=lambda x: None) as run:
        try:
            for i in range(2000):  # outputs must wait for item 0: where do they go?
                run.submit(Tracked(i), timeout=0.5)
                accepted += 1
        except pipekit.SubmitTimeoutError:
            pass  # backpressure reached the producer
        alive = tracked_alive() - base
        release.set()
    report = run.report
    assert report is not None and report.outputs == accepted
    # the channel, and up to two batches per worker finished or running behind item 0
    assert accepted <= buffer + 2 * workers * batch, accepted
    assert alive <= buffer + 2 * workers * batch + 1


# -- hung telemetry --------------------------------------------------------------------------


class _BlockingSpanExporter:
    """A span exporter whose export blocks until released (a collector that hangs)."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.calls = 0

    def export(self, spans: Any) -> Any:
        from opentelemetry.sdk.trace.export import SpanExportResult

        self.calls += 1
        self.release.wait(60)
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        self.release.set()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return True


def _blocking_metric_exporter() -> Any:
    from opentelemetry.sdk.metrics.export import MetricExporter, MetricExportResult

    class Blocking(MetricExporter):
        def __init__(self) -> None:
            super().__init__()
            self.release = threading.Event()
            self.calls = 0

        def export(self, metrics_data: Any, timeout_millis: float = 10_000,
                   **kwargs: Any) -> MetricExportResult:
            self.calls += 1
            self.release.wait(60)
            return MetricExportResult.SUCCESS

        def force_flush(self, timeout_millis: float = 10_000) -> bool:
            return True

        def shutdown(self, timeout_millis: float = 30_000, **kwargs: Any) -> None:
            self.release.set()

    return Blocking()


def _slow_reader() -> Any:
    from opentelemetry.sdk.metrics.export import MetricReader

    class Slow(MetricReader):
        """A pull reader whose collection takes long (a slow scrape)."""

        def __init__(self) -> None:
            super().__init__()
            self.collections = 0

        def _receive_metrics(self, metrics_data: Any, timeout_millis: float = 10_000,
                             **kwargs: Any) -> None:
            self.collections += 1
            time.sleep(0.2)

        def shutdown(self, timeout_millis: float = 30_000, **kwargs: Any) -> None:
            pass

    return Slow()


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_hung_exporters_and_a_slow_reader_do_not_stall_the_pipeline() -> None:
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    spans = _BlockingSpanExporter()
    tp = TracerProvider()
    tp.add_span_processor(BatchSpanProcessor(spans, max_queue_size=64,  # type: ignore[arg-type]
                                             max_export_batch_size=16,
                                             schedule_delay_millis=5))
    metrics_out = _blocking_metric_exporter()
    periodic = PeriodicExportingMetricReader(metrics_out, export_interval_millis=20)
    slow = _slow_reader()
    mp = MeterProvider(metric_readers=[periodic, slow])
    stop = threading.Event()

    def scrape() -> None:
        while not stop.is_set():
            slow.collect()

    scraper = threading.Thread(target=scrape, name="test-scraper")
    scraper.start()
    items = make_items(3000, seed=SEED + 4, mix={PERMANENT: 0.02})
    tracer = tp.get_tracer("test")
    outs: list[Any] = []
    pipe = pipekit.Pipeline("hungtel", tracer_provider=tp, meter_provider=mp,
                            max_memory_mb=None, buffer_size=100)
    pipe.add_stage("a", chaos, workers=2)
    pipe.add_stage("b", identity, workers=2)
    started = time.monotonic()
    try:
        with pipe.start(sink=outs.append, keep_dead_letters=True, shutdown_timeout=20) as run:
            for k, it in enumerate(items):
                if k % 2:  # half the items carry a sampled trace: spans per batch
                    with tracer.start_as_current_span("req"):
                        run.submit(it, timeout=10)
                else:
                    run.submit(it, timeout=10)
        elapsed = time.monotonic() - started
    finally:
        stop.set()
        scraper.join(5)
        spans.release.set()
        metrics_out.release.set()
        tp.shutdown()
        mp.shutdown()
    report = run.report
    assert report is not None
    check_ledger(items, outs, report)
    assert report.reason == "shutdown" and not report.unprocessed
    # the exporters were reached and hung (for up to 60 s) while the items went through
    assert spans.calls >= 1 and metrics_out.calls >= 1 and slow.collections >= 1
    assert elapsed < 20, f"3000 items took {elapsed:.1f} s behind hung exporters"


@pytest.mark.leaks_threads("the stage's threads stay blocked in the hung exporter until the "
                           "test releases it at its end")
@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_a_synchronous_span_processor_with_a_hung_exporter_does_not_stall() -> None:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor

    spans = _BlockingSpanExporter()
    tp = TracerProvider()
    tp.add_span_processor(SimpleSpanProcessor(spans))  # type: ignore[arg-type]
    items = make_items(200, seed=SEED + 5, mix={PERMANENT: 0.1})
    outs: list[Any] = []
    pipe = pipekit.Pipeline("synctel", tracer_provider=tp, max_memory_mb=None,
                            buffer_size=50)
    pipe.add_stage("a", chaos, workers=2)
    try:
        run = pipe.start(sink=outs.append, keep_dead_letters=True)
        stalled = False
        try:
            for it in items:
                run.submit(it, timeout=1)
        except pipekit.SubmitTimeoutError:
            stalled = True
        finally:
            report = run.shutdown(timeout=1)
        assert not stalled, "the stage stalled behind the hung exporter"
        check_ledger(items, outs, report)
        assert report.reason == "shutdown", report.reason
    finally:
        spans.release.set()
        tp.shutdown()


# -- user callbacks stuck past the deadline ---------------------------------------------------


@pytest.mark.leaks_threads("the stuck dead_letter callback holds a stage thread until the "
                           "test releases it")
@pytest.mark.parametrize("ordered", [False, True], ids=["pull", "dispatcher"])
def test_a_dead_letter_callback_stuck_past_the_deadline_loses_no_item(ordered: bool) -> None:
    release = threading.Event()
    items = make_items(60, seed=SEED + 6)
    tag, index, _, _ = items[5]
    items[5] = (tag, index, PERMANENT, None)
    letters: list[Any] = []

    def stuck(letter: pipekit.DeadLetter) -> None:
        letters.append(letter)
        release.wait(30)

    outs: list[Any] = []
    pipe = make_pipe("stuckdead", buffer_size=20, ordered=ordered)
    pipe.add_stage("a", chaos, workers=2, batch_size=4)
    run = pipe.start(sink=outs.append, dead_letter=stuck, keep_dead_letters=True)
    submitted: list[Any] = []
    try:
        for it in items:
            try:
                run.submit(it, timeout=0.3)
            except pipekit.SubmitTimeoutError:
                break  # the stage is stuck: intake is full
            submitted.append(it)
        report = run.shutdown(timeout=1.0)
    finally:
        release.set()
    check_ledger(submitted, outs, report)


@pytest.mark.leaks_threads("the stuck call is released at the end of the test")
def test_shutdown_with_a_stuck_thread_stage_keeps_its_deadline() -> None:
    release = threading.Event()

    def stuck(x: Any) -> Any:
        release.wait(30)
        return x

    pipe = make_pipe("stuckdeadline", buffer_size=10)
    pipe.add_stage("a", stuck, workers=2)
    run = pipe.start(keep_dead_letters=True)
    try:
        for i in range(5):
            run.submit(i)
        started = time.monotonic()
        report = run.shutdown(timeout=1.0)
        took = time.monotonic() - started
    finally:
        release.set()
    assert report.reason == "deadline"
    assert took < 1.5, f"shutdown(timeout=1.0) took {took:.2f} s"


@pytest.mark.leaks_threads("the stuck sink thread is released at the end of the test")
def test_a_sink_stuck_past_the_deadline_loses_no_item() -> None:
    release = threading.Event()
    items = make_items(100, seed=SEED + 7)
    outs: list[Any] = []

    def sink(x: Any) -> None:
        if x[1] == 30:
            release.wait(30)
        outs.append(x)

    pipe = make_pipe("stucksink", buffer_size=50)
    pipe.add_stage("a", identity, workers=2, batch_size=4)
    run = pipe.start(sink=sink, keep_dead_letters=True)
    submitted: list[Any] = []
    try:
        for it in items:
            try:
                run.submit(it, timeout=0.3)
            except pipekit.SubmitTimeoutError:
                break
            submitted.append(it)
        report = run.shutdown(timeout=1.0)
        snapshot = list(outs)
    finally:
        release.set()
    check_ledger(submitted, snapshot, report)


# -- signals, in a child interpreter --------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _ready_status(port: int) -> int:
    """The /readyz status, or 0 when nothing answers (the server has stopped)."""
    try:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=1)
        conn.request("GET", "/readyz")
        status = conn.getresponse().status
        conn.close()
    except OSError:
        return 0
    return status


class Child:
    """``_chaos_helpers.py`` run as a script: a pipeline that a signal will stop."""

    def __init__(self, tmp_path: Path, mode: str, timeout: float, executor: str) -> None:
        self.port = _free_port()
        self.timeout = timeout
        self.lines: list[str] = []
        self.proc = subprocess.Popen(
            [sys.executable, str(TESTS_DIR / "_chaos_helpers.py"), mode, str(timeout),
             executor, str(self.port), str(tmp_path / "profiles")],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
            start_new_session=True,  # its worker processes die with it (close())
        )
        self._cond = threading.Condition()
        self._reader = threading.Thread(target=self._read, name="test-child-reader")
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with self._cond:
                self.lines.append(line.rstrip("\n"))
                self._cond.notify_all()
        with self._cond:
            self._cond.notify_all()

    def wait_for(self, text: str, timeout: float = 30.0) -> None:
        """Wait until an output line contains ``text``."""
        end = time.monotonic() + timeout
        with self._cond:
            while not any(text in ln for ln in self.lines):
                left = end - time.monotonic()
                if left <= 0 or (self.proc.poll() is not None and not self._reader.is_alive()):
                    raise AssertionError(f"child never printed {text!r}: {self.lines}")
                self._cond.wait(min(left, 0.1))

    def report(self) -> dict[str, Any]:
        self.proc.wait(10)
        self._reader.join(5)
        assert self.proc.returncode == 0, self.lines
        # the pipe closes only when every process holding it has exited: no worker
        # process, forkserver or resource tracker of the child outlives it
        assert not self._reader.is_alive(), "a process of the child outlived it"
        (line,) = [ln for ln in self.lines if ln.startswith("REPORT ")]
        data: dict[str, Any] = json.loads(line[len("REPORT "):])
        return data

    def close(self) -> None:
        """Kill the child and anything it left in its session (e.g. a process worker)."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)
        self._reader.join(10)


@pytest.fixture
def child(tmp_path: Path) -> Iterator[Any]:
    made: list[Child] = []

    def start(mode: str, timeout: float, executor: str = "thread") -> Child:
        c = Child(tmp_path, mode, timeout, executor)
        made.append(c)
        return c

    yield start
    for c in made:
        c.close()


def _watch_until_exit(c: Child, limit: float) -> tuple[list[tuple[float, int]], float]:
    """Poll readiness every 10 ms until the child exits; return the polls and exit time."""
    polls: list[tuple[float, int]] = []
    end = time.monotonic() + limit
    while c.proc.poll() is None:
        if time.monotonic() > end:
            c.proc.kill()
            raise AssertionError(f"child still running {limit:.1f} s after the signal: "
                                 f"{c.lines[-5:]}")
        polls.append((time.monotonic(), _ready_status(c.port)))
        time.sleep(0.01)
    return polls, time.monotonic()


def _assert_accounted(report: dict[str, Any]) -> None:
    assert report["lost"] == 0 and report["extra"] == 0, report
    # what the source yielded after intake closed is counted, then reported as `intake`
    assert report["submitted"] == report["yielded"], report
    assert report["submitted"] == report["outputs"] + report["dead"] + report["unprocessed"], \
        report


def test_sigterm_at_a_random_moment_drains_and_reports_everything(
        child: Any, executor: str) -> None:
    timeout = 3.0
    c = child("drain", timeout, executor)
    c.wait_for("READY")
    assert _ready_status(c.port) == 200
    time.sleep(random.Random(f"{SEED}-{executor}").uniform(0.0, 0.5))  # a random moment
    signalled = time.monotonic()
    c.proc.send_signal(signal.SIGTERM)
    polls, exited = _watch_until_exit(c, timeout + 3.0)
    report = c.report()
    assert exited - signalled < timeout + 3.0
    # readiness fails at once and never comes back
    failed = [t for t, status in polls if status != 200]
    assert failed and failed[0] - signalled < 1.0, polls[:5]
    assert all(status != 200 for t, status in polls if t >= failed[0])
    # intake stopped: the source was read no further than the chunk it was reading and
    # the one it was putting (30 items each); an open intake would have read on for
    # the whole drain, or for ever
    after = [t for t in report["last_yields"] if t > signalled]
    assert len(after) <= 60, f"{len(after)} items read from the source after the signal"
    assert report["reason"] in ("signal", "deadline")
    _assert_accounted(report)


def test_sigterm_with_a_stuck_stage_stops_at_the_deadline(child: Any, executor: str) -> None:
    timeout = 1.5
    c = child("stuck", timeout, executor)
    c.wait_for("READY")
    time.sleep(0.3)  # the stage's workers are stuck in calls that never return
    signalled = time.monotonic()
    c.proc.send_signal(signal.SIGTERM)
    _, exited = _watch_until_exit(c, timeout + 3.0)
    report = c.report()
    assert exited - signalled < timeout + 3.0
    assert report["reason"] == "deadline"
    assert "in_flight" in report["where"] and "queued" in report["where"]
    _assert_accounted(report)


def test_a_second_signal_stops_a_long_drain_at_once(child: Any) -> None:
    c = child("second", 60.0)  # the backlog would take far longer than 3 s to drain
    c.wait_for("READY")
    c.proc.send_signal(signal.SIGTERM)
    c.wait_for("draining")
    signalled = time.monotonic()
    c.proc.send_signal(signal.SIGTERM)
    _, exited = _watch_until_exit(c, 3.0)
    report = c.report()
    assert exited - signalled < 3.0
    assert report["reason"] == "aborted"
    assert {"queued", "in_flight"} & set(report["where"])
    _assert_accounted(report)
