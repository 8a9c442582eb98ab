"""Module-level stage functions for telemetry tests (process workers must pickle them)."""

from __future__ import annotations

from typing import Any

from opentelemetry import trace


def inc_traced(x: dict[str, Any]) -> dict[str, Any]:
    return {**x, "n": x["n"] + 1}


def record_trace(x: dict[str, Any]) -> dict[str, Any]:
    sc = trace.get_current_span().get_span_context()
    return {**x, "trace": format(sc.trace_id, "032x")}
