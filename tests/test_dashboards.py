"""Tests for the Grafana dashboard, the Prometheus alerting rules and the metric reference.

One source of truth: ``pipekit.telemetry.INSTRUMENTS``. From it this module derives the
Prometheus names the OpenTelemetry exporter gives each instrument, checks them against a
real render of a real pipeline's metrics, and then checks that every PromQL expression
of the dashboard (panels, annotations, variables) and of the alerting rules names only
those metrics and their labels, and that ``docs/metrics.md`` lists exactly the same
instruments. ``promtool`` (from Debian's ``prometheus`` package, installed by
``scripts/ensure_prometheus.sh``) checks and unit-tests the rules, the scrape-config
examples and the real exposition.

tests/test_prometheus_live.py imports the helpers below (by path) to run every query
on a real Prometheus server.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import subprocess
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from pipekit.telemetry import INSTRUMENTS

ROOT = Path(__file__).resolve().parents[1]
DASHBOARDS = ROOT / "dashboards"
OVERVIEW = DASHBOARDS / "pipekit-overview.json"
ALERTS = DASHBOARDS / "alerts"
RULES = ALERTS / "pipekit.rules.yml"
RULE_TESTS = ALERTS / "pipekit.rules.test.yml"
PROVISIONING = DASHBOARDS / "provisioning"
METRICS_DOC = ROOT / "docs" / "metrics.md"
OPERATIONS_DOC = ROOT / "docs" / "operations.md"

DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}

#: Labels Prometheus itself puts on every scraped series, and the histogram bucket label.
TARGET_LABELS = frozenset({"job", "instance"})
#: Labels the exporter adds to every series (the instrumentation scope).
SCOPE_LABELS = frozenset({"otel_scope_name", "otel_scope_version", "otel_scope_schema_url"})

#: Instruments that have no series until something happens that a short test run does
#: not cause, with what that is.
CONDITIONAL = {
    "pipekit.autoscaler.decisions": "the autoscaler made a decision",
}

#: ``promtool check metrics`` problems that come from pipekit's instrument names (the
#: OpenTelemetry process conventions), not from the dashboards; reported to the lead.
#: Keep this in step: the test fails when one disappears, so the list never hides a fix.
KNOWN_PIPEKIT_LINTS = frozenset({
    ("process_thread_count",
     'non-histogram and non-summary metrics should not have "_count" suffix'),
    ("process_unix_file_descriptor_count",
     'non-histogram and non-summary metrics should not have "_count" suffix'),
})

# -- the exporter's naming rules -------------------------------------------------------

# The OpenTelemetry Prometheus exporter's unit table (the OpenTelemetry specification's
# "Prometheus and OpenMetrics compatibility"); "1" maps to no suffix in the exporter this
# project uses (the specification's "_ratio" is not applied).
_UNIT_SUFFIX = {
    "s": "seconds", "ms": "milliseconds", "us": "microseconds", "ns": "nanoseconds",
    "min": "minutes", "h": "hours", "d": "days", "By": "bytes", "KiBy": "kibibytes",
    "MiBy": "mebibytes", "GiBy": "gibibytes", "KBy": "kilobytes", "MBy": "megabytes",
    "GBy": "gigabytes", "1": "", "%": "percent", "Hz": "hertz",
}


def prometheus_name(name: str, unit: str) -> str:
    """The metric family name the exporter renders for an OpenTelemetry instrument.

    Dots and other invalid characters become ``_``; the unit, with ``{annotations}``
    removed and mapped through the exporter's table, is appended unless the name already
    ends with it.
    """
    base = re.sub(r"[^a-zA-Z0-9:]+", "_", name)
    unit = re.sub(r"\{.*\}", "", unit)
    suffix = _UNIT_SUFFIX.get(unit, re.sub(r"[^a-zA-Z0-9:]+", "_", unit).strip("_"))
    if suffix and not base.endswith("_" + suffix):
        base += "_" + suffix
    return base


def series_names(name: str, kind: str, unit: str) -> tuple[str, ...]:
    """The sample names of one instrument: ``_total`` for counters, histogram series."""
    base = prometheus_name(name, unit)
    if kind == "counter":
        return (base if base.endswith("_total") else base + "_total",)
    if kind == "histogram":
        return (base + "_bucket", base + "_sum", base + "_count")
    return (base,)


def prometheus_label(attribute: str) -> str:
    """The label name the exporter renders for an attribute (``error.type`` -> ``error_type``)."""
    return re.sub(r"[^a-zA-Z0-9]+", "_", attribute)


EXPORTED: dict[str, tuple[str, ...]] = {
    name: series_names(name, kind, unit) for name, kind, unit, _ in INSTRUMENTS
}
#: Every sample name pipekit exports.
EXPORTED_SERIES: frozenset[str] = frozenset(s for names in EXPORTED.values() for s in names)
#: Which instrument a sample name belongs to.
INSTRUMENT_OF: dict[str, str] = {s: n for n, names in EXPORTED.items() for s in names}

# -- PromQL scanning -------------------------------------------------------------------

_STRING = r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`'
_STRING_RE = re.compile(_STRING)
_SELECTOR_RE = re.compile(
    r"(?<![\w:])([a-zA-Z_:][\w:]*)\s*\{((?:[^}\"'`]|" + _STRING + r")*)\}")
_MATCHER_RE = re.compile(r"([a-zA-Z_]\w*)\s*(=~|!~|!=|=)\s*(" + _STRING + ")")
_GROUPING_RE = re.compile(
    r"\b(by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)")
_IDENT_RE = re.compile(r"(?<![\w:.$])[a-zA-Z_:][\w:]*")
_KEYWORDS = frozenset({
    "and", "or", "unless", "by", "without", "on", "ignoring", "group_left", "group_right",
    "bool", "offset", "inf", "nan",
})
_VARIABLE_RE = re.compile(r"\$\{(\w+)(?::\w+)?\}|\$(\w+)")


def _strip(expr: str) -> str:
    """The expression with strings, label matchers, ranges and grouping lists removed."""
    out = _STRING_RE.sub('""', expr)
    out = re.sub(r"\{[^}]*\}", " ", out)
    out = re.sub(r"\[[^\]]*\]", " ", out)
    return _GROUPING_RE.sub(" ", out)


def metric_names(expr: str) -> set[str]:
    """The metric names an expression selects (identifiers that are not functions)."""
    if "__name__" in expr:
        raise AssertionError(f"select metrics by name, not by __name__: {expr}")
    stripped = _strip(expr)
    names: set[str] = set()
    for m in _IDENT_RE.finditer(stripped):
        word = m.group(0)
        rest = stripped[m.end():].lstrip()
        if word.lower() in _KEYWORDS or rest.startswith("("):
            continue
        names.add(word)
    return names


def selectors(expr: str) -> list[tuple[str, dict[str, tuple[str, str]]]]:
    """Each ``metric{matchers}`` of an expression: (metric, {label: (operator, value)})."""
    out = []
    for m in _SELECTOR_RE.finditer(expr):
        matchers = {lm.group(1): (lm.group(2), lm.group(3)[1:-1])
                    for lm in _MATCHER_RE.finditer(m.group(2))}
        out.append((m.group(1), matchers))
    return out


def grouping_labels(expr: str) -> set[str]:
    """Labels named in ``by``/``without``/``on``/``ignoring``/``group_*`` lists."""
    cleaned = _STRING_RE.sub('""', expr)
    return {label.strip() for m in _GROUPING_RE.finditer(cleaned)
            for label in m.group(2).split(",") if label.strip()}


def fill_template(expr: str, values: dict[str, str]) -> str:
    """Replace Grafana variables (``$name``, ``${name}``) the way Grafana would.

    Raises:
        KeyError: a variable has no value in ``values``.
    """
    def sub(m: re.Match[str]) -> str:
        name = m.group(1) or m.group(2)
        return values[name]

    return _VARIABLE_RE.sub(sub, expr)


# -- the dashboard and the rules -------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class Query:
    """One PromQL expression of the dashboard or the rules, with where it comes from."""

    where: str
    expr: str
    kind: str  # "panel", "annotation" or "rule"


def load_dashboard() -> dict[str, Any]:
    """The overview dashboard as parsed JSON."""
    with OVERVIEW.open(encoding="utf-8") as f:
        data: dict[str, Any] = json.load(f)
    return data


def load_rules() -> dict[str, Any]:
    """The alerting rules file as parsed YAML."""
    yaml = pytest.importorskip("yaml", reason="PyYAML is needed to read the rule files")
    with RULES.open(encoding="utf-8") as f:
        data: dict[str, Any] = yaml.safe_load(f)
    return data


def all_panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Every panel, including those inside collapsed rows."""
    for panel in dashboard.get("panels", []):
        yield panel
        yield from panel.get("panels", [])


def panel_queries(dashboard: dict[str, Any]) -> list[Query]:
    """The PromQL of every panel target and every Prometheus annotation."""
    out = []
    for panel in all_panels(dashboard):
        for target in panel.get("targets", []):
            out.append(Query(where=f"panel {panel['title']!r} {target['refId']}",
                             expr=target["expr"], kind="panel"))
    for anno in dashboard["annotations"]["list"]:
        if anno.get("datasource", {}).get("type") == "prometheus":
            exprs = {anno.get("expr"), anno.get("target", {}).get("expr")} - {None}
            out.extend(Query(where=f"annotation {anno['name']!r}", expr=e, kind="annotation")
                       for e in sorted(exprs))
    return out


def variable_queries(dashboard: dict[str, Any]) -> dict[str, str]:
    """The ``label_values(...)`` query of each query variable, by variable name."""
    out = {}
    for var in dashboard["templating"]["list"]:
        if var["type"] == "query":
            query = var["query"]
            out[var["name"]] = query["query"] if isinstance(query, dict) else query
    return out


def rule_queries(rules: dict[str, Any]) -> list[Query]:
    """The expression of every alerting and recording rule."""
    return [Query(where=f"rule {rule.get('alert') or rule.get('record')}",
                  expr=rule["expr"], kind="rule")
            for group in rules["groups"] for rule in group["rules"]]


def label_values_parts(query: str) -> tuple[str, str]:
    """``label_values(metric{...}, label)`` -> (selector, label)."""
    m = re.fullmatch(r"\s*label_values\(\s*(.+?)\s*,\s*(\w+)\s*\)\s*", query)
    assert m, f"variable query is not label_values(selector, label): {query}"
    return m.group(1), m.group(2)


# -- the metric reference (docs/metrics.md) ---------------------------------------------

_DOC_HEADER = ["OTel name", "kind", "unit", "Prometheus name", "attributes", "meaning"]


@dataclass(frozen=True, slots=True, kw_only=True)
class DocRow:
    """One row of the instrument table in docs/metrics.md."""

    name: str
    kind: str
    unit: str
    series: tuple[str, ...]
    attributes: tuple[str, ...]
    meaning: str


def _cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("|").split("|")]


def _ticked(cell: str) -> list[str]:
    return re.findall(r"`([^`]+)`", cell)


def doc_rows() -> list[DocRow]:
    """The rows of the instrument table (the one whose header is ``_DOC_HEADER``)."""
    lines = METRICS_DOC.read_text(encoding="utf-8").splitlines()
    starts = [i for i, line in enumerate(lines)
              if line.startswith("|") and _cells(line) == _DOC_HEADER]
    assert starts, f"docs/metrics.md has no table with header {_DOC_HEADER}"
    rows = []
    for line in lines[starts[0] + 2:]:
        if not line.startswith("|"):
            break
        c = _cells(line)
        assert len(c) == len(_DOC_HEADER), f"docs/metrics.md: bad row {line!r}"
        rows.append(DocRow(name=_ticked(c[0])[0], kind=c[1], unit=_ticked(c[2])[0],
                           series=tuple(_ticked(c[3])), attributes=tuple(_ticked(c[4])),
                           meaning=c[5]))
    return rows


def doc_row_for(name: str, kind: str, unit: str, description: str,
                attributes: tuple[str, ...]) -> str:
    """The table row docs/metrics.md should have for an instrument (for error messages)."""
    series = ", ".join(f"`{s}`" for s in series_names(name, kind, unit))
    attrs = ", ".join(f"`{a}`" for a in attributes)
    return f"| `{name}` | {kind} | `{unit}` | {series} | {attrs} | {description} |"


# -- a real render ------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class Exposition:
    """A parsed Prometheus text exposition."""

    text: str
    types: dict[str, str]  # family name in "# TYPE" -> type
    samples: dict[str, set[str]]  # sample name -> label names (scope labels removed)


def parse_exposition(text: str) -> Exposition:
    """Sample names, their label names and the ``# TYPE`` lines of an exposition."""
    types: dict[str, str] = {}
    samples: dict[str, set[str]] = {}
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, family, kind = line.split(" ", 3)
            types[family] = kind
        elif line and not line.startswith("#"):
            m = re.match(r"([a-zA-Z_:][\w:]*)(\{(.*)\})?\s", line)
            assert m, f"unparsable sample line: {line!r}"
            labels = set(re.findall(r'([a-zA-Z_]\w*)="', m.group(3) or ""))
            samples.setdefault(m.group(1), set()).update(labels - SCOPE_LABELS)
    return Exposition(text=text, types=types, samples=samples)


def transient_then_ok() -> Any:
    """A stage function: some items fail once (retried), some for good, some are dropped."""
    import pipekit

    seen: set[int] = set()
    lock = threading.Lock()

    def parse(x: int) -> Any:
        if x % 50 == 0:
            raise ValueError(f"item {x} is malformed")
        if x % 7 == 0:
            with lock:
                first = x not in seen
                seen.add(x)
            if first:
                raise ConnectionError(f"item {x}: transient failure")
        if x % 11 == 0:
            return pipekit.DROP
        return x

    return parse


@pytest.fixture(scope="module")
def real_render() -> Iterator[Exposition]:
    """Metrics of a finished 2-stage pipeline with retries, drops and dead letters."""
    pytest.importorskip("opentelemetry.sdk", reason="the otel extra is not installed")
    pytest.importorskip("opentelemetry.exporter.prometheus",
                        reason="the otel extra is not installed")
    import pipekit
    from pipekit import otel_setup

    before = otel_setup.current()
    setup = otel_setup.configure(service_name="pipekit-dashboard-test", set_global=False)
    try:
        pipe = pipekit.Pipeline("dashtest", meter_provider=setup.meter_provider,
                                max_memory_mb=8192, batch_size=20)
        pipe.add_stage("parse", transient_then_ok(), workers=2,
                       retry=pipekit.Retry(attempts=3, backoff=0, on=ConnectionError))
        pipe.add_stage("store", lambda x: x * 2, workers=(1, 2))
        report = pipe.run(range(2000), dead_letter=lambda letter: None)
        assert report.reason == "completed", report
        body, _ = setup.render()
        yield parse_exposition(body.decode("utf-8"))
    finally:
        if before is None:
            setup.shutdown()


# -- the exported names ---------------------------------------------------------------


def test_prometheus_name_follows_the_exporter_rules() -> None:
    assert series_names("pipekit.stage.items", "counter", "{item}") == (
        "pipekit_stage_items_total",)
    assert series_names("pipekit.stage.duration", "histogram", "s") == (
        "pipekit_stage_duration_seconds_bucket", "pipekit_stage_duration_seconds_sum",
        "pipekit_stage_duration_seconds_count")
    assert series_names("pipekit.stage.cpu.time", "counter", "s") == (
        "pipekit_stage_cpu_time_seconds_total",)
    assert series_names("process.memory.usage", "gauge", "By") == (
        "process_memory_usage_bytes",)
    assert series_names("pipekit.stage.bottleneck", "gauge", "1") == (
        "pipekit_stage_bottleneck",)
    assert prometheus_name("x.size_bytes", "By") == "x_size_bytes"
    assert prometheus_label("cpython.gc.generation") == "cpython_gc_generation"


def test_derived_names_match_a_real_render(real_render: Exposition) -> None:
    for name, kind, _, _ in INSTRUMENTS:
        expected = EXPORTED[name]
        present = [s for s in expected if s in real_render.samples]
        if name in CONDITIONAL and not present:
            continue
        assert present == list(expected), (
            f"{name} ({kind}) should render as {expected}; the render has "
            f"{sorted(s for s in real_render.samples if s.startswith(expected[0][:12]))}")
        family = expected[0].removesuffix("_bucket") if kind == "histogram" else expected[0]
        assert real_render.types.get(family) == kind, (
            f"{family} is typed {real_render.types.get(family)!r}, expected {kind!r}")


def test_render_has_no_metric_missing_from_instruments(real_render: Exposition) -> None:
    unknown = sorted(set(real_render.samples) - EXPORTED_SERIES - {"target_info"})
    assert not unknown, f"pipekit exports metrics that telemetry.INSTRUMENTS lacks: {unknown}"


def test_histograms_use_the_duration_buckets(real_render: Exposition) -> None:
    from pipekit.otel_setup import DURATION_BUCKETS

    les = set(re.findall(r'pipekit_stage_duration_seconds_bucket\{le="([^"]+)"',
                         real_render.text))
    assert {float(v) for v in les} == {*DURATION_BUCKETS, math.inf}


# -- the metric reference -----------------------------------------------------------


def test_metrics_doc_lists_exactly_the_instruments() -> None:
    rows = {r.name: r for r in doc_rows()}
    names = [n for n, *_ in INSTRUMENTS]
    assert len(rows) == len(doc_rows()), "docs/metrics.md lists an instrument twice"
    missing = [n for n in names if n not in rows]
    extra = sorted(set(rows) - set(names))
    assert not missing, f"docs/metrics.md lacks instruments pipekit exports: {missing}"
    assert not extra, f"docs/metrics.md lists instruments pipekit does not export: {extra}"
    assert list(rows) == names, "docs/metrics.md should list instruments in INSTRUMENTS order"
    for name, kind, unit, description in INSTRUMENTS:
        row = rows[name]
        want = doc_row_for(name, kind, unit, description, row.attributes)
        assert (row.kind, row.unit, row.meaning) == (kind, unit, description), (
            f"docs/metrics.md row of {name} disagrees with INSTRUMENTS; it should read\n{want}")
        assert row.series == EXPORTED[name], (
            f"docs/metrics.md gives {row.series} as the Prometheus names of {name}; "
            f"it should read\n{want}")


def test_metrics_doc_attributes_match_the_render(real_render: Exposition) -> None:
    for row in doc_rows():
        labels = {prometheus_label(a) for a in row.attributes}
        for series in EXPORTED[row.name]:
            if series not in real_render.samples:
                assert row.name in CONDITIONAL, f"{series} is missing from the render"
                continue
            seen = real_render.samples[series] - ({"le"} if series.endswith("_bucket")
                                                  else set())
            assert seen == labels, (
                f"docs/metrics.md gives {sorted(labels)} as the attributes of {row.name}; "
                f"the render of {series} has {sorted(seen)}")


def documented_labels() -> dict[str, frozenset[str]]:
    """Label names each sample name may carry: its attributes plus the target labels."""
    out = {}
    for row in doc_rows():
        labels = {prometheus_label(a) for a in row.attributes} | TARGET_LABELS
        for series in EXPORTED[row.name]:
            out[series] = frozenset(labels | ({"le"} if series.endswith("_bucket") else set()))
    return out


# -- PromQL scanning works -----------------------------------------------------------


def test_metric_names_finds_selectors_and_skips_functions_and_keywords() -> None:
    expr = ('histogram_quantile(0.95, sum by (stage, le) (rate(a_bucket{stage=~"$stage", '
            'x="rate(b)"}[$__rate_interval]))) / on (stage) group_left(reason) c '
            'and d offset 5m unless bool_thing > 1e3')
    assert metric_names(expr) == {"a_bucket", "c", "d", "bool_thing"}
    assert selectors('a{x="1", y=~"b|c"} + b') == [("a", {"x": ("=", "1"), "y": ("=~", "b|c")})]
    assert grouping_labels(expr) == {"stage", "le", "reason"}
    assert fill_template('a{p=~"$pipeline"}[${__rate_interval}]',
                         {"pipeline": "x", "__rate_interval": "5s"}) == 'a{p=~"x"}[5s]'


# -- the dashboard ------------------------------------------------------------------


def test_dashboard_is_current_grafana_json_with_a_stable_uid() -> None:
    dash = load_dashboard()
    assert dash["uid"] == "pipekit-overview"
    assert dash["schemaVersion"] >= 36
    assert dash.get("id") is None, "an exported dashboard must not carry a database id"
    assert dash["title"]
    assert dash["tags"] == ["pipekit"]
    ids = [p["id"] for p in all_panels(dash)]
    assert len(ids) == len(set(ids)), "panel ids must be unique"


def test_dashboard_panels_do_not_overlap() -> None:
    taken: dict[tuple[int, int], str] = {}
    for panel in all_panels(load_dashboard()):
        g = panel["gridPos"]
        assert g["x"] + g["w"] <= 24, f"{panel['title']!r} is wider than the grid"
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in taken, f"{panel['title']!r} overlaps {taken[(x, y)]!r}"
                taken[(x, y)] = panel["title"]


def test_dashboard_uses_a_datasource_variable_everywhere() -> None:
    dash = load_dashboard()
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    ds = variables["datasource"]
    assert (ds["type"], ds["query"]) == ("datasource", "prometheus")
    for panel in all_panels(dash):
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == DATASOURCE, panel["title"]
        assert panel["targets"], f"panel {panel['title']!r} has no query"
        for target in panel["targets"]:
            assert target["datasource"] == DATASOURCE, panel["title"]
    for var in variables.values():
        if var["type"] == "query":
            assert var["datasource"] == DATASOURCE, var["name"]
    for anno in dash["annotations"]["list"]:
        if not anno.get("builtIn"):
            assert anno["datasource"] == DATASOURCE, anno["name"]
    uids = set(re.findall(r'"uid":\s*"([^"]*)"', OVERVIEW.read_text(encoding="utf-8")))
    assert uids == {"pipekit-overview", "${datasource}", "-- Grafana --"}, (
        f"the dashboard names a fixed data source: {uids}")


def test_dashboard_has_pipeline_stage_and_instance_variables() -> None:
    dash = load_dashboard()
    queries = variable_queries(dash)
    assert set(queries) == {"pipeline", "stage", "instance"}
    assert label_values_parts(queries["pipeline"])[1] == "pipeline"
    assert label_values_parts(queries["stage"])[1] == "stage"
    assert label_values_parts(queries["instance"])[1] == "instance"
    for var in dash["templating"]["list"]:
        if var["type"] == "query":
            assert var["multi"], var["name"]
            assert var["includeAll"], var["name"]
            assert var["allValue"] == ".*", var["name"]


def test_variables_are_matched_as_regexes() -> None:
    # Multi-value and "All" render as a regex, so `label="$var"` would match nothing.
    exprs = [q.expr for q in panel_queries(load_dashboard())]
    exprs += list(variable_queries(load_dashboard()).values())
    for expr in exprs:
        for _, matchers in selectors(expr):
            for label, (op, value) in matchers.items():
                if "$" in value:
                    assert op == "=~", f"{label}{op}{value!r} should use =~ in {expr}"
                    assert value == f"${label}", f"label {label} matched to {value} in {expr}"


def test_every_panel_filters_on_pipeline() -> None:
    for q in panel_queries(load_dashboard()):
        for metric, matchers in selectors(q.expr):
            assert matchers.get("pipeline") == ("=~", "$pipeline"), f"{q.where}: {metric}"
            assert matchers.get("instance") == ("=~", "$instance"), f"{q.where}: {metric}"
            if INSTRUMENT_OF.get(metric, "").startswith("pipekit.stage."):
                assert matchers.get("stage") == ("=~", "$stage"), f"{q.where}: {metric}"


def all_queries() -> list[Query]:
    """Every dashboard and rule expression."""
    return panel_queries(load_dashboard()) + rule_queries(load_rules())


def test_every_query_uses_only_exported_metrics() -> None:
    for q in all_queries():
        unknown = metric_names(q.expr) - EXPORTED_SERIES
        assert not unknown, f"{q.where} uses metrics pipekit does not export: {unknown}"
        assert metric_names(q.expr), f"{q.where} selects no metric"
    for name, query in variable_queries(load_dashboard()).items():
        selector, _ = label_values_parts(query)
        assert metric_names(selector) <= EXPORTED_SERIES, f"variable {name}: {query}"


def test_every_query_uses_only_labels_its_metrics_have() -> None:
    labels = documented_labels()
    known = frozenset().union(*labels.values())
    for q in all_queries():
        for metric, matchers in selectors(q.expr):
            bad = set(matchers) - labels[metric]
            assert not bad, f"{q.where}: {metric} has no label {bad}"
        unknown = grouping_labels(q.expr) - known
        assert not unknown, f"{q.where} groups by labels no metric has: {unknown}"
    dash = load_dashboard()
    for anno in dash["annotations"]["list"]:
        for field in ("titleFormat", "textFormat"):
            used = set(re.findall(r"\{\{\s*(\w+)\s*\}\}", anno.get(field, "")))
            assert used <= known, f"annotation {anno['name']}: {used - known}"
    for panel in all_panels(dash):
        for target in panel.get("targets", []):
            used = set(re.findall(r"\{\{\s*(\w+)\s*\}\}", target.get("legendFormat", "")))
            assert used <= grouping_labels(target["expr"]) | {"__name__"}, (
                f"panel {panel['title']!r} legend uses labels its query drops: {used}")


def test_dashboard_shows_every_instrument() -> None:
    used = set().union(*(metric_names(q.expr) for q in panel_queries(load_dashboard())))
    missing = [n for n, names in EXPORTED.items() if not set(names) & used]
    assert not missing, f"instruments not on the dashboard: {missing}"


def test_latency_panel_has_percentiles_and_exemplars() -> None:
    dash = load_dashboard()
    panel = next(p for p in all_panels(dash) if "p50, p95, p99" in p["title"])
    quantiles = sorted(float(q) for t in panel["targets"]
                       for q in re.findall(r"^histogram_quantile\(([\d.]+)", t["expr"]))
    assert quantiles == [0.5, 0.95, 0.99]
    assert all(t.get("exemplar") is True for t in panel["targets"])
    assert all("pipekit_stage_duration_seconds_bucket" in t["expr"] for t in panel["targets"])


def test_autoscaler_decisions_are_annotated() -> None:
    annos = [q for q in panel_queries(load_dashboard()) if q.kind == "annotation"]
    assert any("pipekit_autoscaler_decisions_total" in q.expr for q in annos)


# -- the rules ----------------------------------------------------------------------

_REQUIRED_ALERTS = {
    "PipekitPipelineWedged", "PipekitHighErrorRatio", "PipekitDeadLetters",
    "PipekitQueueSaturated", "PipekitMemoryNearLimit", "PipekitAutoscalerPinnedAtMax",
}


def _anchors(markdown: str) -> set[str]:
    anchors = set()
    for line in markdown.splitlines():
        m = re.match(r"#+\s+(.*)", line)
        if m:
            text = re.sub(r"[^\w\- ]", "", m.group(1).strip().lower())
            anchors.add(text.replace(" ", "-"))
    return anchors


def test_rules_cover_the_required_alerts_and_link_their_runbook() -> None:
    rules = [r for g in load_rules()["groups"] for r in g["rules"]]
    names = {r["alert"] for r in rules}
    assert names >= _REQUIRED_ALERTS, _REQUIRED_ALERTS - names
    anchors = _anchors(OPERATIONS_DOC.read_text(encoding="utf-8"))
    for rule in rules:
        assert rule["labels"]["severity"] in {"critical", "warning", "info"}, rule["alert"]
        ann = rule["annotations"]
        assert ann["summary"], rule["alert"]
        assert ann["description"], rule["alert"]
        page, _, anchor = ann["runbook"].partition("#")
        assert page == "docs/operations.md", rule["alert"]
        assert anchor in anchors, (
            f"{rule['alert']}: runbook {ann['runbook']} has no heading in docs/operations.md")


def test_rule_unit_tests_cover_every_alert() -> None:
    yaml = pytest.importorskip("yaml")
    tests = yaml.safe_load(RULE_TESTS.read_text(encoding="utf-8"))
    tested = {case["alertname"] for t in tests["tests"] for case in t["alert_rule_test"]}
    names = {r["alert"] for g in load_rules()["groups"] for r in g["rules"]}
    assert tested == names


# -- promtool ------------------------------------------------------------------------


def promtool(*args: str, stdin: str | None = None, cwd: Path | None = None
             ) -> subprocess.CompletedProcess[str]:
    """Run promtool (skipping the test when it is not installed)."""
    exe = shutil.which("promtool")
    if exe is None:
        pytest.skip("promtool is not on PATH; scripts/ensure_prometheus.sh installs Debian's "
                    "prometheus package")
    return subprocess.run([exe, *args], input=stdin, capture_output=True, text=True,
                          cwd=cwd, timeout=60, check=False)


def test_promtool_check_rules_passes() -> None:
    r = promtool("check", "rules", str(RULES))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "SUCCESS" in r.stdout


def test_promtool_rule_unit_tests_pass() -> None:
    r = promtool("test", "rules", RULE_TESTS.name, cwd=ALERTS)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "SUCCESS" in r.stdout


@pytest.mark.parametrize("name", ["prometheus.yml", "prometheus-kubernetes.yml"])
def test_promtool_check_config_examples(name: str) -> None:
    r = promtool("check", "config", "--syntax-only", str(PROVISIONING / "prometheus" / name))
    out = r.stdout + r.stderr
    if r.returncode != 0 and "field kubernetes_sd_configs not found" in out:
        pytest.skip("this promtool is built without Kubernetes discovery (Debian's is)")
    assert r.returncode == 0, out


def test_promtool_check_metrics_on_a_real_render(real_render: Exposition) -> None:
    r = promtool("check", "metrics", stdin=real_render.text)
    problems = set()
    for line in (r.stdout + r.stderr).splitlines():
        name, _, problem = line.strip().partition(" ")
        if name:
            problems.add((name, problem))
    # Exit code 3 means "lint problems", 1 "cannot parse".
    assert r.returncode in (0, 3), r.stdout + r.stderr
    unexpected = problems - KNOWN_PIPEKIT_LINTS
    assert not unexpected, f"promtool check metrics found new problems: {sorted(unexpected)}"
    fixed = KNOWN_PIPEKIT_LINTS - problems
    assert not fixed, (f"these promtool lints are gone, remove them from KNOWN_PIPEKIT_LINTS: "
                       f"{sorted(fixed)}")
    assert r.returncode == (3 if problems else 0)


# -- provisioning ----------------------------------------------------------------------


def test_grafana_provisioning_examples() -> None:
    yaml = pytest.importorskip("yaml")
    provider = yaml.safe_load((PROVISIONING / "dashboards" / "pipekit.yml").read_text())
    assert provider["apiVersion"] == 1
    (p,) = provider["providers"]
    assert p["type"] == "file"
    assert p["options"]["path"].startswith("/")
    sources = yaml.safe_load((PROVISIONING / "datasources" / "prometheus.yml").read_text())
    (ds,) = sources["datasources"]
    assert ds["type"] == "prometheus"
    assert ds["access"] == "proxy"
    scrape = yaml.safe_load((PROVISIONING / "prometheus" / "prometheus.yml").read_text())
    # $__rate_interval is right only when Grafana knows the scrape interval.
    assert ds["jsonData"]["timeInterval"] == scrape["global"]["scrape_interval"]
