"""Telemetry through the OpenTelemetry SDK's in-memory exporter and reader."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest
from _tel_helpers import inc_traced, record_trace
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

import pipekit
from pipekit import telemetry

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


@pytest.fixture
def providers() -> Any:
    exporter = InMemorySpanExporter()
    tp = TracerProvider()
    tp.add_span_processor(SimpleSpanProcessor(exporter))
    reader = InMemoryMetricReader()
    mp = MeterProvider(metric_readers=[reader])
    yield tp, exporter, mp, reader
    tp.shutdown()
    mp.shutdown()


def _points(reader: InMemoryMetricReader) -> dict[str, list[Any]]:
    out: dict[str, list[Any]] = {}
    data = reader.get_metrics_data()
    assert data is not None
    for rm in data.resource_metrics:
        for sm in rm.scope_metrics:
            assert sm.scope.name == "pipekit"
            assert sm.scope.version == pipekit.__version__
            for m in sm.metrics:
                out.setdefault(m.name, []).extend(
                    (m.unit, dict(p.attributes), p) for p in m.data.data_points)
    return out


def test_trace_context_crosses_three_stages_including_a_process_stage(providers: Any) -> None:
    tp, exporter, mp, _ = providers
    pipe = pipekit.Pipeline("traced", tracer_provider=tp, meter_provider=mp, max_memory_mb=0)
    pipe.add_stage("inc", inc_traced, workers=2)
    pipe.add_stage("record", record_trace, executor="process", workers=2)
    pipe.add_stage("inc2", inc_traced, workers=2)
    tracer = tp.get_tracer("test")
    outs: list[Any] = []
    expected: dict[int, str] = {}
    with pipe.start(sink=outs.append) as run:
        for i in range(12):
            with tracer.start_as_current_span("request") as span:
                expected[i] = format(span.get_span_context().trace_id, "032x")
                run.submit({"n": i})
        run.submit({"n": 100})  # outside any span: carries no context
    assert run.report is not None and run.report.outputs == 13
    for out in outs:
        if out["n"] == 102:
            assert out["trace"] == "0" * 32
            continue
        assert out["trace"] == expected[out["n"] - 2], "the process worker saw another trace"
    spans = exporter.get_finished_spans()
    names = {s.name for s in spans}
    assert {"pipekit.stage inc", "pipekit.stage record", "pipekit.stage inc2",
            "pipekit.item inc", "pipekit.item inc2"} <= names
    request_traces = {s.context.trace_id for s in spans if s.name == "request"}
    for s in spans:
        if s.name.startswith("pipekit.item"):
            assert s.context.trace_id in request_traces  # item spans nest in the request
        if s.name.startswith("pipekit.stage"):
            linked = {link.context.trace_id for link in s.links}
            assert linked and linked <= request_traces
            assert s.attributes["pipekit.pipeline"] == "traced"
            assert s.attributes["pipekit.batch.size"] >= 1


def test_metric_totals_equal_the_report(providers: Any) -> None:
    tp, _, mp, reader = providers

    def flaky(x: int) -> int:
        if x % 10 == 0:
            raise ValueError("bad")
        if x % 7 == 0:
            raise KeyError("also bad")
        return x

    pipe = pipekit.Pipeline("totals", tracer_provider=tp, meter_provider=mp, max_memory_mb=0)
    pipe.add_stage("a", flaky, retry=pipekit.Retry(attempts=2, backoff=0))
    pipe.add_stage("b", lambda x: pipekit.DROP if x % 3 == 0 else x)
    report = pipe.run(range(500))
    pts = _points(reader)
    items = pts["pipekit.stage.items"]
    for stage in report.stages:
        got = {(p[1]["outcome"], p[1].get("error.type")): p[2].value for p in items
               if p[1]["stage"] == stage.name}
        ok = sum(v for (o, _), v in got.items() if o == "ok")
        dead = sum(v for (o, _), v in got.items() if o == "dead_letter")
        dropped = sum(v for (o, _), v in got.items() if o == "dropped")
        assert ok == stage.succeeded - stage.dropped
        assert dropped == stage.dropped
        assert dead == stage.failed
    a_errors = {p[1].get("error.type"): p[2].value for p in items
                if p[1]["stage"] == "a" and p[1]["outcome"] == "dead_letter"}
    assert a_errors == {"ValueError": 50, "KeyError": 64}
    retries = {p[1]["stage"]: p[2].value for p in pts["pipekit.stage.retries"]}
    assert retries["a"] == report.stage("a").retried == 114
    submitted = pts["pipekit.pipeline.items.submitted"][0][2].value
    assert submitted == report.submitted == 500
    assert pts["pipekit.pipeline.items.output"][0][2].value == report.outputs


def test_instrument_names_and_units_are_exactly_the_documented_ones(providers: Any) -> None:
    tp, _, mp, reader = providers
    pipe = pipekit.Pipeline("names", tracer_provider=tp, meter_provider=mp, max_memory_mb=0,
                            metrics_interval=0.05)
    pipe.add_stage("a", lambda x: x)
    with pipe.start() as run:
        for i in range(50):
            run.submit(i)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and (run._ext["monitor"].latest is None
                                               or run.stats().stage("a").succeeded < 50):
            time.sleep(0.02)
        pts = _points(reader)
    expected = {name: unit for name, _kind, unit, _ in telemetry.INSTRUMENTS}
    seen = {name: pts[name][0][0] for name in pts}
    # every instrument that has data has the documented unit, and nothing else appears
    assert set(seen) <= set(expected)
    for name, unit in seen.items():
        assert unit == expected[name], name
    must = {"pipekit.stage.items", "pipekit.stage.queue.depth", "pipekit.stage.workers",
            "pipekit.stage.cpu.time", "pipekit.pipeline.state", "process.memory.usage",
            "process.thread.count", "pipekit.stage.duration"}
    assert must <= set(seen)
    for _, attrs, _p in pts["pipekit.stage.queue.depth"]:
        assert set(attrs) == {"pipeline", "stage"}


def test_error_types_are_capped_per_stage(providers: Any) -> None:
    tp, _, mp, reader = providers
    kinds = [type(f"E{i}", (Exception,), {}) for i in range(15)]

    def boom(x: int) -> int:
        raise kinds[x]()

    pipe = pipekit.Pipeline("capped", tracer_provider=tp, meter_provider=mp, max_memory_mb=0)
    pipe.add_stage("a", boom)
    pipe.run(range(15), dead_letter=lambda d: None)
    items = _points(reader)["pipekit.stage.items"]
    types = {p[1]["error.type"] for p in items if p[1]["outcome"] == "dead_letter"}
    assert len(types) == telemetry.ERROR_TYPES_PER_STAGE + 1
    assert "_other" in types
    assert sum(p[2].value for p in items if p[1]["outcome"] == "dead_letter") == 15


class _HangingExporter(SpanExporter):
    def __init__(self) -> None:
        self.release = threading.Event()

    def export(self, spans: Any) -> SpanExportResult:
        self.release.wait(30)
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        self.release.set()


def test_a_hanging_exporter_does_not_stall_the_pipeline() -> None:
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    exporter = _HangingExporter()
    tp = TracerProvider()
    tp.add_span_processor(BatchSpanProcessor(exporter, max_queue_size=64,
                                             max_export_batch_size=32,
                                             schedule_delay_millis=10))
    pipe = pipekit.Pipeline("hung", tracer_provider=tp, max_memory_mb=0)
    pipe.add_stage("a", lambda x: x + 1, workers=2)
    tracer = tp.get_tracer("t")
    try:
        outs: list[int] = []
        with pipe.start(sink=outs.append, shutdown_timeout=10) as run:
            for i in range(3000):
                with tracer.start_as_current_span("req"):
                    run.submit(i, timeout=5)
        assert run.report is not None
        assert run.report.outputs == 3000 and run.report.reason == "shutdown"
    finally:
        exporter.release.set()
        tp.shutdown()


def test_telemetry_off_creates_no_instruments(providers: Any) -> None:
    tp, exporter, mp, reader = providers
    pipe = pipekit.Pipeline("off", tracer_provider=tp, meter_provider=mp, telemetry=False,
                            max_memory_mb=0)
    pipe.add_stage("a", lambda x: x)
    tracer = tp.get_tracer("t")
    with pipe.start() as run, tracer.start_as_current_span("req"):
        run.submit(1)
    assert not [s for s in exporter.get_finished_spans() if s.name.startswith("pipekit")]
    data = reader.get_metrics_data()
    assert data is None or "pipekit.stage.items" not in _points(reader)


def test_a_second_run_of_the_same_pipeline_is_observed(providers: Any) -> None:
    tp, _, mp, reader = providers
    pipe = pipekit.Pipeline("again", tracer_provider=tp, meter_provider=mp, max_memory_mb=0)
    pipe.add_stage("a", lambda x: x)
    pipe.run(range(10))
    pipe.run(range(25))
    items = _points(reader)["pipekit.stage.items"]
    ok = [p[2].value for p in items if p[1]["outcome"] == "ok"]
    assert ok == [25]  # the latest run's series
