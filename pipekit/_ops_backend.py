"""The running pipeline as the ops server sees it (``pipekit.ops.OpsBackend``)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pipekit.pipeline import Run

__all__ = ["RunBackend"]

_CONTENT_TYPES = {
    "speedscope": "application/json",
    "summary": "application/json",
    "meta": "application/json",
    "svg": "image/svg+xml",
    "html": "text/html; charset=utf-8",
    "bin": "application/octet-stream",
}


class RunBackend:
    """Health, readiness, metrics, debug state and profiles of one run.

    Every method may be called from several server threads at once; each reads plain
    counters or delegates to a thread-safe object.
    """

    def __init__(self, run: Run, *, liveness_timeout: float,
                 clock: Any = time.monotonic) -> None:
        self._run = run
        self._timeout = liveness_timeout
        self._clock = clock
        self._last_done = -1
        self._last_change = clock()

    def _completed(self) -> int:
        return sum(s.succeeded + s.failed for s in self._run.stats().stages) \
            + self._run._outputs

    def livez(self) -> tuple[bool, str]:
        """Fail only when work is pending and nothing completed for ``liveness_timeout``."""
        now = self._clock()
        done = self._completed()
        if done != self._last_done:
            self._last_done = done
            self._last_change = now
        pending = self._run.pending()
        if pending <= 0 or self._run.state in ("stopped", "paused"):
            return True, "ok"
        stalled = now - self._last_change
        if stalled > self._timeout:
            return False, (f"wedged: {pending} item(s) pending and nothing completed for "
                           f"{stalled:.0f} s")
        return True, "ok"

    def readyz(self) -> tuple[bool, str]:
        """Ready only while running and accepting items."""
        state = self._run.state
        if state == "running":
            return True, "ok"
        if state == "paused":
            gate = self._run._gate
            return False, f"paused: {gate.reason if gate is not None else 'resource limit'}"
        return False, state

    def metrics(self, openmetrics: bool) -> tuple[bytes, str]:
        """Prometheus text from :mod:`pipekit.otel_setup`, when it was configured."""
        try:
            from pipekit import otel_setup
        except ImportError as err:  # pragma: no cover - otel_setup ships with pipekit
            raise LookupError("metrics are not set up") from err
        return otel_setup.render_metrics(openmetrics)

    def debug_pipeline(self) -> dict[str, Any]:
        """The run's stats, as JSON-ready data (no settings values, no paths)."""
        st = self._run.stats()
        data = st.to_dict()
        data["reason"] = self._run._reason or ""
        return data

    def profile(self, kind: str, seconds: float, rate: int | None) -> dict[str, Any]:
        """Take a profile (blocking) and name its files by artifact."""
        from pipekit import _extensions

        prof = _extensions.profiler(self._run)
        if kind == "cpu":
            rec = prof.cpu(seconds, rate=rate, trigger="ops")
        else:
            rec = prof.heap(seconds, trigger="ops")
        return {"id": rec.id, "kind": rec.kind,
                "files": {name: Path(p).name for name, p in rec.files.items()}}

    def profile_file(self, profile_id: str, artifact: str) -> tuple[Path, str] | None:
        """The path of one artifact of a stored profile, or None."""
        prof = self._run._ext.get("profiler")
        if prof is None:
            return None
        path = prof.store.artifact_path(profile_id, artifact)
        if path is None:
            return None
        return path, _CONTENT_TYPES.get(artifact, "application/octet-stream")
