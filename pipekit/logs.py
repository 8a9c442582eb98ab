"""Opt-in structured logging: a JSON formatter that adds trace and span ids.

pipekit itself only ever logs to the ``pipekit`` logger, which carries a
``NullHandler``: it never configures the root logger or adds handlers. Its lifecycle
events (start, drain, stop, dead letters, limit pauses, scaling decisions) put their
fields under ``extra={"pipekit": {...}}``; this formatter lifts them into the JSON
object. Use it on a handler of your own::

    import logging, pipekit.logs
    handler = logging.StreamHandler()
    handler.setFormatter(pipekit.logs.JsonFormatter())
    logging.getLogger("pipekit").addHandler(handler)
"""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime
from typing import Any

__all__ = ["JsonFormatter"]

_SKIP = frozenset(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {"message",
                                                                                "asctime"}


class JsonFormatter(logging.Formatter):
    """Format records as one JSON object per line.

    Fields: ``time`` (UTC, ISO 8601), ``level``, ``logger``, ``message``, ``trace_id``
    and ``span_id`` of the active span (when there is a valid one), the ``pipekit``
    event fields, other ``extra`` fields, and ``exception`` when one is attached.

    Args:
        static: fields added to every record (e.g. ``{"service": "billing"}``).
    """

    def __init__(self, *, static: dict[str, Any] | None = None) -> None:
        super().__init__()
        self._static = dict(static or {})

    def format(self, record: logging.LogRecord) -> str:
        """Return the record as a JSON line."""
        out: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        out.update(self._static)
        _trace_ids(out)
        for key, value in record.__dict__.items():
            if key in _SKIP:
                continue
            if key == "pipekit" and isinstance(value, dict):
                out.update(value)
            else:
                out[key] = value
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, default=repr, separators=(",", ":"))


def _trace_ids(out: dict[str, Any]) -> None:
    try:
        from opentelemetry import trace
    except ImportError:  # pragma: no cover - opentelemetry-api is a core dependency
        return
    ctx = trace.get_current_span().get_span_context()
    if ctx.is_valid:
        out["trace_id"] = format(ctx.trace_id, "032x")
        out["span_id"] = format(ctx.span_id, "016x")
