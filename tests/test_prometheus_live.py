"""The dashboard and the alerting rules against a real Prometheus server.

A real pipekit pipeline (retries, drops, dead letters of two kinds, a slow autoscaled
stage that builds a backlog, a memory limit) runs while a Prometheus server started
here scrapes its ``/metrics`` every second, with ``dashboards/alerts/pipekit.rules.yml``
loaded. After several scrapes every panel query, annotation and variable of the
dashboard, and every alert expression, is run through Prometheus's HTTP API with the
template variables filled in as Grafana would. Each panel query must return data.
The fixture records every answer and tears everything down before the tests read them.

The server is the ``prometheus`` binary on PATH (``scripts/ensure_prometheus.sh``
installs Debian's package); the module skips when it is missing. It listens on a free
loopback port with its storage in the test's temporary directory and is terminated and
waited for at the end; the pipeline and its servers are shut down too.
"""

from __future__ import annotations

import importlib.util
import json
import math
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

PROMETHEUS = shutil.which("prometheus")
pytestmark = pytest.mark.skipif(
    PROMETHEUS is None,
    reason="the prometheus binary is not on PATH; scripts/ensure_prometheus.sh installs "
           "Debian's prometheus package")

PIPELINE = "livetest"
STAGES = ("parse", "enrich", "score")
#: Scrapes to wait for before querying (one a second).
SCRAPES = 8
#: What Grafana would put for $__rate_interval and $__interval with a 1 s scrape interval.
RATE_INTERVAL = "5s"


def _load_dashboard_helpers() -> ModuleType:
    # By path, so it works whatever pytest's import mode is.
    path = Path(__file__).with_name("test_dashboards.py")
    spec = importlib.util.spec_from_file_location("_pipekit_dashboard_helpers", path)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


dash = _load_dashboard_helpers()

TEMPLATE = {
    "pipeline": PIPELINE,
    # A multi-value selection renders as a regex group, as Grafana does.
    "stage": "(" + "|".join(STAGES) + ")",
    "instance": ".*",  # the "All" value
    "__rate_interval": RATE_INTERVAL,
    "__interval": RATE_INTERVAL,
}


def _panel_queries() -> list[Any]:
    queries: list[Any] = dash.panel_queries(dash.load_dashboard())
    return queries


def _rule_queries() -> list[Any]:
    queries: list[Any] = dash.rule_queries(dash.load_rules())
    return queries


# -- the pipeline under load -----------------------------------------------------------


def _enrich(x: int) -> int:
    time.sleep(0.002)  # an I/O-bound stage: busy time well above CPU time
    return x + 1


def _score(x: int) -> int:
    if x % 10 == 3:
        raise KeyError(x)  # 10 % dead letters: above the high-error-ratio threshold
    return sum(range(300)) + x  # a little CPU


@dataclass
class Load:
    """A running pipeline fed at a steady rate until stopped."""

    run: Any
    stop: threading.Event = field(default_factory=threading.Event)
    thread: threading.Thread | None = None
    submitted: int = 0
    error: BaseException | None = None

    def feed(self, rate_per_s: float) -> None:
        """Submit items at about ``rate_per_s`` until :attr:`stop` is set."""
        step = 10
        i = 0
        t0 = time.monotonic()
        try:
            while not self.stop.is_set():
                for _ in range(step):
                    self.run.submit(i, timeout=5.0)
                    i += 1
                    self.submitted = i
                ahead = t0 + i / rate_per_s - time.monotonic()
                if ahead > 0:
                    self.stop.wait(ahead)
        except BaseException as err:  # reported by the fixture
            self.error = err


class _MetricsHandler(BaseHTTPRequestHandler):
    render: Callable[[], tuple[bytes, str]]

    def do_GET(self) -> None:
        if self.path != "/metrics":
            self.send_error(404)
            return
        body, content_type = type(self).render()
        self.send_response(200)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


class _FallbackServer:
    """``/metrics`` on a loopback port, for when the run has no ops server."""

    def __init__(self, render: Callable[[], tuple[bytes, str]]) -> None:
        handler = type("Handler", (_MetricsHandler,), {"render": staticmethod(render)})
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.thread = threading.Thread(target=self.server.serve_forever,
                                       name="test-metrics-http", daemon=True)
        self.thread.start()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.server.server_address[1]}"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)


# -- the Prometheus server -------------------------------------------------------------


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@dataclass
class Prometheus:
    """A Prometheus server process of this test and how to query it."""

    proc: subprocess.Popen[bytes]
    url: str
    log: Path

    def get(self, path: str, **params: str) -> Any:
        """GET an API path and return the decoded ``data`` (raising on an API error)."""
        query = urllib.parse.urlencode(params)
        with urllib.request.urlopen(f"{self.url}{path}?{query}", timeout=10) as resp:
            payload = json.load(resp)
        assert payload["status"] == "success", payload
        return payload["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        """An instant query at now; the result as a list of series."""
        try:
            data = self.get("/api/v1/query", query=expr)
        except urllib.error.HTTPError as err:
            raise AssertionError(f"Prometheus rejected {expr!r}: {err.read().decode()}") from err
        if data["resultType"] == "scalar":
            return [{"metric": {}, "value": data["result"]}]
        result: list[dict[str, Any]] = data["result"]
        return result

    def query_range(self, expr: str, seconds: float) -> list[dict[str, Any]]:
        """A range query over the last ``seconds`` at 1 s steps, as Grafana runs panels."""
        end = time.time()
        try:
            data = self.get("/api/v1/query_range", query=expr, start=f"{end - seconds:.3f}",
                            end=f"{end:.3f}", step="1")
        except urllib.error.HTTPError as err:
            raise AssertionError(f"Prometheus rejected {expr!r}: {err.read().decode()}") from err
        result: list[dict[str, Any]] = data["result"]
        return result

    def stop(self) -> None:
        """Terminate the server and wait for it (kill if it does not exit)."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


def _start_prometheus(tmp: Path, target: str, metrics_path: str) -> Prometheus:
    assert PROMETHEUS is not None
    config = tmp / "prometheus.yml"
    config.write_text(json.dumps({  # JSON is YAML
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(dash.RULES)],
        "scrape_configs": [{
            "job_name": "pipekit", "scrape_interval": "1s", "scrape_timeout": "1s",
            "metrics_path": metrics_path, "static_configs": [{"targets": [target]}],
        }],
    }))
    log = tmp / "prometheus.log"
    for _ in range(3):  # a free port can be taken between the probe and the bind
        port = _free_port()
        with log.open("wb") as out:
            proc = subprocess.Popen(
                [PROMETHEUS, f"--config.file={config}", f"--storage.tsdb.path={tmp / 'data'}",
                 f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"],
                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        prom = Prometheus(proc=proc, url=f"http://127.0.0.1:{port}", log=log)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                with urllib.request.urlopen(f"{prom.url}/-/ready", timeout=1) as resp:
                    if resp.status == 200:
                        return prom
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(0.1)
        prom.stop()
        if "address already in use" not in log.read_text(errors="replace"):
            break
    raise AssertionError(f"prometheus did not become ready:\n{log.read_text(errors='replace')}")


def _wait_for_scrapes(prom: Prometheus, n: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    seen = 0.0
    while time.monotonic() < deadline:
        result = prom.query('count_over_time(up{job="pipekit"}[1m])')
        seen = float(result[0]["value"][1]) if result else 0.0
        if seen >= n:
            return
        time.sleep(0.5)
    targets = prom.get("/api/v1/targets")
    raise AssertionError(f"only {seen:.0f} scrapes in {timeout} s; targets: {targets}")


# -- the session: run everything, record the answers, tear down ----------------------


@dataclass
class Answers:
    """What Prometheus answered during the session (recorded before the teardown).

    The tests only read these, so no server, pipeline or thread of the session is alive
    while they run.
    """

    target: str
    via_ops_server: bool
    submitted: int
    up: list[dict[str, Any]]
    running: list[dict[str, Any]]
    items_submitted: list[dict[str, Any]]
    panels: dict[str, tuple[str, list[dict[str, Any]]]]  # where -> (expr, range result)
    present: dict[str, bool]  # conditional sample name -> had series during the run
    variables: dict[str, list[str]]
    alerts: dict[str, list[dict[str, Any]]]  # alert -> instant result of its expression
    rules: list[dict[str, Any]]


def _session_threads() -> set[threading.Thread]:
    return {t for t in threading.enumerate()
            if t.name.startswith(("pipekit", "test-")) and t.is_alive()}


def _ask(prom: Prometheus, since: float) -> dict[str, Any]:
    """Run every dashboard and rule query; the fields of :class:`Answers` they fill."""
    seconds = time.time() - since
    panels = {q.where: (expr, prom.query_range(expr, seconds))
              for q in _panel_queries()
              for expr in [dash.fill_template(q.expr, TEMPLATE)]}
    conditional = [s for s, i in dash.INSTRUMENT_OF.items() if i in dash.CONDITIONAL]
    present = {s: bool(prom.query(f'count({s}{{pipeline="{PIPELINE}"}})')) for s in conditional}
    variables = {}
    for name, query in dash.variable_queries(dash.load_dashboard()).items():
        selector, label = dash.label_values_parts(query)
        variables[name] = prom.get(f"/api/v1/label/{label}/values",
                                   **{"match[]": dash.fill_template(selector, TEMPLATE)})
    return {
        "up": prom.query('up{job="pipekit"}'),
        "running": prom.query(
            f'pipekit_pipeline_state{{pipeline="{PIPELINE}", state="running"}}'),
        "items_submitted": prom.query("pipekit_pipeline_items_submitted_total"),
        "panels": panels,
        "present": present,
        "variables": variables,
        "alerts": {q.where.removeprefix("rule "): prom.query(q.expr) for q in _rule_queries()},
        "rules": [r for g in prom.get("/api/v1/rules")["groups"] for r in g["rules"]],
    }


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Answers:
    """Run a pipeline under load, scraped by a real Prometheus with pipekit's rules."""
    pytest.importorskip("opentelemetry.sdk", reason="the otel extra is not installed")
    pytest.importorskip("opentelemetry.exporter.prometheus",
                        reason="the otel extra is not installed")
    import pipekit
    from pipekit import otel_setup

    tmp = tmp_path_factory.mktemp("prometheus")
    threads_before = _session_threads()
    before = otel_setup.current()
    setup = otel_setup.configure(service_name="pipekit-live-test", set_global=False)
    pipe = pipekit.Pipeline(PIPELINE, meter_provider=setup.meter_provider,
                            max_memory_mb=8192, buffer_size=200, batch_size=20,
                            ops_enabled=True, ops_host="127.0.0.1", ops_port=0)
    pipe.add_stage("parse", dash.transient_then_ok(), workers=2,
                   retry=pipekit.Retry(attempts=3, backoff=0, on=ConnectionError))
    pipe.add_stage("enrich", _enrich, workers=(1, 4))
    pipe.add_stage("score", _score, workers=1)
    run = pipe.start(sink=lambda _: None, dead_letter=lambda _: None)
    load = Load(run=run)
    fallback: _FallbackServer | None = None
    prom: Prometheus | None = None
    try:
        if run.ops_url:
            target = urllib.parse.urlsplit(run.ops_url).netloc
        else:
            fallback = _FallbackServer(setup.render)
            target = fallback.address
        with urllib.request.urlopen(f"http://{target}/metrics", timeout=5) as resp:
            assert b"pipekit_stage_items_total" in resp.read(), "/metrics has no pipekit data"
        load.thread = threading.Thread(target=load.feed, args=(800.0,), name="test-feeder",
                                       daemon=True)
        load.thread.start()
        since = time.time()
        prom = _start_prometheus(tmp, target, "/metrics")
        _wait_for_scrapes(prom, SCRAPES, timeout=30)
        answers = Answers(target=target, via_ops_server=fallback is None, submitted=0,
                          **_ask(prom, since))
        answers.submitted = load.submitted
    finally:
        load.stop.set()
        if load.thread is not None:
            load.thread.join(10)
        if prom is not None:
            prom.stop()
        report = run.shutdown(timeout=10)
        if fallback is not None:
            fallback.close()
        if before is None:
            setup.shutdown()
    assert load.error is None, f"the feeder failed: {load.error!r}"
    assert report.reason in ("shutdown", "completed"), report
    assert prom.proc.returncode is not None, "prometheus is still running"
    deadline = time.monotonic() + 5
    while _session_threads() - threads_before and time.monotonic() < deadline:
        time.sleep(0.05)
    leaked = _session_threads() - threads_before
    assert not leaked, f"threads left behind: {leaked}"
    return answers


# -- the tests -------------------------------------------------------------------------


def test_prometheus_scraped_pipekit(live: Answers) -> None:
    (up,) = live.up
    assert up["value"][1] == "1"
    assert up["metric"]["instance"] == live.target
    assert [r["value"][1] for r in live.running] == ["1"]
    (submitted,) = live.items_submitted
    assert 0 < float(submitted["value"][1]) <= live.submitted


def _finite(series: list[dict[str, Any]]) -> list[float]:
    values = [float(v) for s in series for _, v in s["values"]]
    return [v for v in values if math.isfinite(v)]


def _why_empty(expr: str, live: Answers) -> str | None:
    """Why an empty result is expected: the query reads only metrics the run never had."""
    names = dash.metric_names(expr)
    instruments = {dash.INSTRUMENT_OF[n] for n in names}
    if not instruments <= set(dash.CONDITIONAL) or any(live.present[n] for n in names):
        return None
    reasons = "; ".join(f"{i} has series only once {dash.CONDITIONAL[i]}"
                        for i in sorted(instruments))
    return f"pipekit exported no {sorted(names)} during this run ({reasons})"


@pytest.mark.parametrize("query", _panel_queries(), ids=lambda q: q.where)
def test_panel_query_returns_data(live: Answers, query: Any) -> None:
    expr, result = live.panels[query.where]
    if not result:
        why = _why_empty(query.expr, live)
        if why:
            pytest.skip(f"{query.where}: {why}")
    assert result, f"{query.where} returned no data: {expr}"
    assert _finite(result), f"{query.where} returned only NaN or Inf: {expr} -> {result}"


@pytest.mark.parametrize("name", ["pipeline", "stage", "instance"])
def test_variable_query_lists_the_running_pipeline(live: Answers, name: str) -> None:
    expected = {"pipeline": {PIPELINE}, "stage": set(STAGES), "instance": {live.target}}
    assert expected[name] <= set(live.variables[name]), live.variables[name]


@pytest.mark.parametrize("query", _rule_queries(), ids=lambda q: q.where)
def test_alert_expression_evaluates(live: Answers, query: Any) -> None:
    alert = query.where.removeprefix("rule ")
    result = live.alerts[alert]
    fired = {(r["metric"].get("pipeline"), r["metric"].get("stage")) for r in result}
    # The run dead-letters in two stages, 10 % of the items in "score", and keeps
    # finishing items; memory is far below its 8 GiB limit.
    expected: dict[str, set[tuple[str | None, str | None]]] = {
        "PipekitDeadLetters": {(PIPELINE, "parse"), (PIPELINE, "score")},
        "PipekitHighErrorRatio": {(PIPELINE, "score")},
        "PipekitPipelineWedged": set(),
        "PipekitMemoryNearLimit": set(),
        "PipekitIntakePaused": set(),
    }
    if alert in expected:
        assert fired == expected[alert], f"{alert}: {query.expr} -> {result}"


def test_rules_loaded_and_evaluated_without_errors(live: Answers) -> None:
    assert {r["name"] for r in live.rules} == set(live.alerts)
    for rule in live.rules:
        assert rule["health"] == "ok", (rule["name"], rule.get("lastError"))
    firing = {(a["labels"]["alertname"], a["labels"].get("stage"))
              for r in live.rules for a in r.get("alerts", [])}
    # PipekitDeadLetters has no "for": Prometheus had it firing during the run.
    assert ("PipekitDeadLetters", "score") in firing
