"""The run report: one self-contained ``report.html`` beside the run's profiles.

Plain HTML with inline CSS and an inline SVG chart: no script, no external reference,
and a Content-Security-Policy that forbids fetching anything, so it opens the same
offline or from an attachment. Every value from the run (stage names, errors, items)
is HTML-escaped. Profile links are relative, so the folder can be copied as a whole.
"""

from __future__ import annotations

import contextlib
import math
import os
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime
from html import escape
from pathlib import Path
from typing import Any, Final
from urllib.parse import quote

from pipekit.profiling.store import ProfileRecord

__all__ = ["render_report", "write_report"]

_MAX_ROWS: Final = 50
_DASH: Final = "\N{EN DASH}"
_STYLE: Final = """
body{font:14px/1.4 system-ui,sans-serif;margin:2em;color:#222;max-width:1400px}
h1{font-size:1.5em}h2{font-size:1.15em;margin-top:2em;border-bottom:1px solid #ddd}
table{border-collapse:collapse;margin:.5em 0}
th,td{padding:3px 8px;border-bottom:1px solid #eee;text-align:right;white-space:nowrap}
th:first-child,td:first-child,td.l{text-align:left}
th{background:#f4f4f4}tr.limit td{background:#fff3d6}
dl{display:grid;grid-template-columns:max-content auto;gap:2px 16px}dt{color:#666}
dd{margin:0}.note{color:#666;font-size:.9em}code{font-size:.95em}
"""


def _f(value: Any, spec: str = ".3g", scale: float = 1.0) -> str:
    """Format a number, or a dash when it is missing or not finite."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return _DASH
    scaled = value if scale == 1.0 else value * scale
    if not math.isfinite(scaled):
        return _DASH
    if spec.endswith("d") and isinstance(scaled, float):
        scaled = round(scaled)
    return format(scaled, spec)


def _num(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return 0.0
    return float(value) if math.isfinite(value) else 0.0


def _e(value: Any) -> str:
    return escape(str(value), quote=True)


def _bottleneck(report: Mapping[str, Any], stages: Sequence[Mapping[str, Any]]) -> tuple[str, str]:
    """Return (stage, why): the report's own answer, or the busiest stage per worker."""
    given = report.get("bottleneck")
    if isinstance(given, Mapping) and given.get("stage"):
        return str(given["stage"]), str(given.get("reason", "") or "reported by the run")
    if isinstance(given, str) and given:
        return given, str(report.get("bottleneck_reason", "") or "reported by the run")
    duration = _num(report.get("duration"))
    if duration <= 0 or not stages:
        return "", ""
    best = max(stages, key=lambda s: _utilisation(s, duration))
    if _utilisation(best, duration) <= 0:
        return "", ""
    return str(best.get("name", "")), "estimated: highest busy time per worker"


def _utilisation(stage: Mapping[str, Any], duration: float) -> float:
    workers = max(_num(stage.get("workers")) or _num(stage.get("max_workers")), 1.0)
    return _num(stage.get("busy_seconds")) / (workers * duration) if duration > 0 else 0.0


def _summary(report: Mapping[str, Any], limit: tuple[str, str]) -> str:
    rows = [
        ("pipeline", _e(report.get("pipeline", ""))),
        ("ended because", _e(report.get("reason", ""))),
        ("duration", f"{_f(report.get('duration'), '.3f')} s"),
        ("submitted", _f(report.get("submitted"), "d")),
        ("outputs", _f(report.get("outputs"), "d")),
        ("throughput", f"{_f(report.get('throughput'), ',.1f')} items/s"),
        ("dead letters", _f(report.get("dead_letter_count"), "d")),
        ("unprocessed", str(len(report.get("unprocessed") or []))),
        ("limiting stage", f"<strong>{_e(limit[0])}</strong> <span class=note>"
                           f"({_e(limit[1])})</span>" if limit[0] else _DASH),
    ]
    items = "".join(f"<dt>{k}</dt><dd>{v}</dd>" for k, v in rows)
    return f"<dl>{items}</dl>"


def _stage_table(stages: Sequence[Mapping[str, Any]], duration: float, limit: str) -> str:
    head = (
        "<tr><th>stage</th><th>executor</th><th>workers</th><th>received</th>"
        "<th>succeeded</th><th>failed</th><th>dropped</th><th>retried</th>"
        "<th>items/s</th><th>mean ms</th><th>p50 ms</th><th>p95 ms</th><th>p99 ms</th>"
        "<th>max ms</th><th>busy s</th><th>cpu s</th><th>cpu/busy</th><th>utilisation</th>"
        "<th>blocked s</th><th>queue peak</th></tr>"
    )
    rows = []
    for s in stages:
        raw = s.get("latency")
        lat: Mapping[str, Any] = raw if isinstance(raw, Mapping) else {}
        busy, cpu = _num(s.get("busy_seconds")), _num(s.get("cpu_seconds"))
        rate = _num(s.get("succeeded")) / duration if duration > 0 else math.nan
        ratio = cpu / busy if busy > 0 else math.nan
        cls = ' class="limit"' if limit and s.get("name") == limit else ""
        cells = [
            f'<td class="l">{_e(s.get("name", ""))}</td>',
            f'<td class="l">{_e(s.get("executor", ""))}</td>',
            f"<td>{_f(s.get('workers'), 'd')}</td>",
            *(f"<td>{_f(s.get(k), 'd')}</td>"
              for k in ("received", "succeeded", "failed", "dropped", "retried")),
            f"<td>{_f(rate, ',.1f')}</td>",
            *(f"<td>{_f(lat.get(q), '.3f', 1000.0)}</td>"
              for q in ("mean", "p50", "p95", "p99", "max")),
            f"<td>{_f(busy, '.3f')}</td><td>{_f(cpu, '.3f')}</td>",
            f"<td>{_f(ratio, '.0%')}</td><td>{_f(_utilisation(s, duration), '.0%')}</td>",
            f"<td>{_f(s.get('blocked_seconds'), '.3f')}</td>",
            f"<td>{_f(s.get('queue_peak'), 'd')}</td>",
        ]
        rows.append(f"<tr{cls}>{''.join(cells)}</tr>")
    return f"<table>{head}{''.join(rows)}</table>"


def _chart(stages: Sequence[Mapping[str, Any]]) -> str:
    """Inline SVG: a pair of bars per stage, busy (wall) and CPU seconds."""
    if not stages:
        return "<p>no stages</p>"
    label_w, bar_w, row = 180, 560, 34
    top = max(max(_num(s.get("busy_seconds")), _num(s.get("cpu_seconds"))) for s in stages)
    scale = bar_w / top if top > 0 else 0.0
    height = 30 + row * len(stages)
    parts = [
        f'<svg width="{label_w + bar_w + 90}" '
        f'height="{height}" font-size="12" font-family="sans-serif" role="img" '
        f'aria-label="busy and cpu seconds per stage">',
        '<rect x="0" y="2" width="12" height="10" fill="#7a9cc6"/>'
        '<text x="16" y="11">busy (wall) s</text>'
        '<rect x="120" y="2" width="12" height="10" fill="#e8833a"/>'
        '<text x="136" y="11">cpu s</text>',
    ]
    for i, s in enumerate(stages):
        y = 24 + i * row
        busy, cpu = _num(s.get("busy_seconds")), _num(s.get("cpu_seconds"))
        name = str(s.get("name", ""))
        shown = name if len(name) <= 26 else name[:24] + ".."
        parts.append(
            f'<text x="0" y="{y + 17}"><title>{_e(name)}</title>{_e(shown)}</text>'
            f'<rect x="{label_w}" y="{y}" width="{busy * scale:.1f}" height="12" '
            f'fill="#7a9cc6"/>'
            f'<text x="{label_w + busy * scale + 4:.1f}" y="{y + 10}">{busy:.3g}</text>'
            f'<rect x="{label_w}" y="{y + 13}" width="{cpu * scale:.1f}" height="12" '
            f'fill="#e8833a"/>'
            f'<text x="{label_w + cpu * scale + 4:.1f}" y="{y + 23}">{cpu:.3g}</text>'
        )
    parts.append("</svg>")
    return "".join(parts)


def _rows_table(title_cells: Sequence[str], rows: Iterable[Sequence[Any]], total: int) -> str:
    head = "".join(f"<th>{_e(t)}</th>" for t in title_cells)
    body = "".join(
        "<tr>" + "".join(f'<td class="l">{_e(c)}</td>' for c in r) + "</tr>" for r in rows
    )
    more = f"<p class=note>{total - _MAX_ROWS} more not shown</p>" if total > _MAX_ROWS else ""
    return f"<table><tr>{head}</tr>{body}</table>{more}"


def _link(target: Path, base: Path) -> str:
    rel = Path(os.path.relpath(target, base)).as_posix()
    return _e(quote(rel, safe="/._-"))


def _profiles(profiles: Sequence[ProfileRecord], base: Path) -> str:
    if not profiles:
        return "<p>no profiles were taken during this run</p>"
    rows = []
    for p in profiles:
        links = " ".join(
            f'<a href="{_link(path, base)}">{_e(name)}</a>'
            for name, path in sorted(p.files.items())
        )
        rows.append(
            f'<tr><td class="l"><code>{_e(p.id)}</code></td><td class="l">{_e(p.kind)}</td>'
            f'<td class="l">{_e(p.trigger)}</td>'
            f'<td class="l">{_e(p.started_at.isoformat(timespec="seconds"))}</td>'
            f"<td>{_f(p.duration, '.1f')}</td><td class=\"l\">{links}</td></tr>"
        )
    return (
        "<table><tr><th>id</th><th>kind</th><th>trigger</th><th>started (UTC)</th>"
        f"<th>seconds</th><th>files</th></tr>{''.join(rows)}</table>"
        "<p class=note>speedscope JSON opens in speedscope (drag the file in); SVG and HTML "
        "open in a browser.</p>"
    )


def render_report(
    report: Mapping[str, Any], profiles: Sequence[ProfileRecord], *, base: Path
) -> str:
    """Return the HTML of a run report.

    Args:
        report: ``RunReport.to_dict()``, optionally with ``bottleneck`` (a stage name, or
            a mapping with ``stage`` and ``reason``) and ``bottleneck_reason``.
        profiles: the profiles of the run, linked relative to ``base``.
        base: the folder the report will be written to.

    Returns:
        The document.
    """
    stages = [s for s in report.get("stages") or [] if isinstance(s, Mapping)]
    duration = _num(report.get("duration"))
    limit = _bottleneck(report, stages)
    dead = [d for d in report.get("dead_letters") or [] if isinstance(d, Mapping)]
    dead_total = max(int(_num(report.get("dead_letter_count"))), len(dead))
    unprocessed = [u for u in report.get("unprocessed") or [] if isinstance(u, Mapping)]
    hooks = [h for h in report.get("hook_errors") or [] if isinstance(h, Sequence)]
    events = [e for e in report.get("scale_events") or [] if isinstance(e, Mapping)]
    sections = [
        "<h2>Summary</h2>", _summary(report, limit),
        "<h2>Stages</h2>", _stage_table(stages, duration, limit[0]),
        "<p class=note>cpu/busy near 100 % means the stage is CPU-bound; far below, it waits "
        "(I/O, locks). utilisation is busy time per worker over the run.</p>",
        "<h2>Busy against CPU time</h2>", _chart(stages),
        f"<h2>Dead letters ({dead_total})</h2>",
        _rows_table(["stage", "error", "attempts", "item"],
                    ([d.get("stage", ""), d.get("error", ""), d.get("attempts", ""),
                      d.get("item", "")] for d in dead[:_MAX_ROWS]), len(dead))
        if dead else "<p>none kept</p>" if dead_total else "<p>none</p>",
    ]
    if unprocessed:
        sections += [f"<h2>Unprocessed ({len(unprocessed)})</h2>",
                     _rows_table(["stage", "where", "item"],
                                 ([u.get("stage", ""), u.get("where", ""), u.get("item", "")]
                                  for u in unprocessed[:_MAX_ROWS]), len(unprocessed))]
    if hooks:
        sections += ["<h2>Shutdown hook errors</h2>",
                     _rows_table(["stage", "error"], (list(h)[:2] for h in hooks), len(hooks))]
    if events:
        sections += [f"<h2>Scaling decisions ({len(events)})</h2>",
                     _rows_table(["at s", "stage", "direction", "from", "to", "reason"],
                                 ([_f(e.get("at"), ".1f"), e.get("stage", ""),
                                   e.get("direction", ""), e.get("current", ""),
                                   e.get("desired", ""), e.get("reason", "")]
                                  for e in events[:_MAX_ROWS]), len(events))]
    sections += ["<h2>Profiles</h2>", _profiles(profiles, base)]
    title = f"pipekit run report: {report.get('pipeline', '')}"
    generated = datetime.now(UTC).isoformat(timespec="seconds")
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        "<meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; "
        "style-src 'unsafe-inline'; img-src data:\">"
        f"<title>{_e(title)}</title><style>{_STYLE}</style></head><body>"
        f"<h1>{_e(title)}</h1>{''.join(sections)}"
        f"<p class=note>written by pipekit at {_e(generated)}</p></body></html>\n"
    )


def write_report(
    path: str | os.PathLike[str],
    report: Mapping[str, Any],
    profiles: Sequence[ProfileRecord] = (),
) -> Path:
    """Write the run report as one self-contained HTML file (0o600).

    Args:
        path: the file to write, or a folder to write ``report.html`` into (use
            ``ProfileStore.report_path(pipeline)`` to put it beside the profiles).
        report: ``RunReport.to_dict()`` (plus an optional ``bottleneck``).
        profiles: the profiles of the run, linked with relative paths.

    Returns:
        The path written.

    Raises:
        OSError: the file cannot be written.
    """
    target = Path(path)
    if target.is_dir():
        target = target / "report.html"
    target.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    text = render_report(report, list(profiles), base=target.parent.absolute())
    fd, tmp = tempfile.mkstemp(prefix=".report-", suffix=".html", dir=target.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return target
