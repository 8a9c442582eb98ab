"""Heap profiles with memray: a Tracker in this process, then a summary and a flame graph.

memray allows one active ``Tracker`` per process, and an active tracker slows Python code
about 3.9 times, so pipekit runs one heap profile at a time and whole-run heap profiling is
opt-in. The tracker covers every thread of this process (not process-executor children).

After the capture is closed, :func:`summarize` reads it with memray's ``FileReader`` (peak
memory, allocation count, the allocation sites that held the most memory at the peak) and
:func:`render_html` runs ``python -m memray flamegraph`` in a child interpreter, so the
reporter's imports and memory stay out of the pipeline process.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pipekit.errors import ProfilerBusyError, ProfilerError, missing_extra

__all__ = [
    "HeapSession",
    "import_memray",
    "render_html",
    "summarize",
    "write_heap_outputs",
    "write_summary",
]

_TOP_SITES = 10
_STACK_DEPTH = 5


def import_memray() -> Any:
    """Import memray, or raise the missing-extra error that names ``pipekit[profiling]``.

    Raises:
        MissingExtraError: memray is not installed.
    """
    try:
        import memray
    except ImportError as err:
        raise missing_extra("heap profiling", "profiling", "memray", err) from err
    return memray


class HeapSession:
    """A memray tracker writing one capture file until it is stopped.

    Args:
        capture: the capture file to create (it must not exist).
    """

    def __init__(self, capture: Path) -> None:
        self.capture = capture
        self._memray = import_memray()
        self._tracker: Any = None

    def start(self) -> None:
        """Activate the tracker.

        Raises:
            ProfilerBusyError: another memray tracker is active in this process.
            ProfilerError: the capture file cannot be created.
        """
        tracker = self._memray.Tracker(
            str(self.capture), native_traces=False, follow_fork=False
        )
        try:
            tracker.__enter__()
        except RuntimeError as err:
            _discard(self.capture)
            raise ProfilerBusyError(
                f"another memray tracker is already active in process {os.getpid()} "
                f"({err}); stop it (or the 'memray run' wrapping this process) first"
            ) from err
        except OSError as err:
            _discard(self.capture)
            raise ProfilerError(
                f"memray could not create {str(self.capture)!r} ({err.strerror or err}); "
                f"check the profile folder"
            ) from err
        self._tracker = tracker

    def stop(self) -> None:
        """Deactivate the tracker and close the capture file (idempotent)."""
        tracker, self._tracker = self._tracker, None
        if tracker is None:
            return
        try:
            tracker.__exit__(None, None, None)
        except (RuntimeError, OSError) as err:
            raise ProfilerError(
                f"memray could not close {str(self.capture)!r} ({err}); the capture may be "
                f"incomplete"
            ) from err
        with contextlib.suppress(OSError):
            os.chmod(self.capture, 0o600)


def summarize(capture: Path, *, top: int = _TOP_SITES) -> dict[str, Any]:
    """Read a capture and return its summary.

    Args:
        capture: a memray capture file.
        top: how many allocation sites to list.

    Returns:
        ``peak_memory_bytes``, ``total_allocations``, ``start_time``, ``end_time`` and
        ``top_sites``: the sites (innermost Python frame) holding the most memory at the
        peak, each with ``function``, ``file``, ``line``, ``bytes``, ``allocations`` and
        ``stack`` (the heaviest call path to it, innermost first, up to 5 frames).

    Raises:
        MissingExtraError: memray is not installed.
        ProfilerError: the capture cannot be read.
    """
    memray = import_memray()
    try:
        reader = memray.FileReader(str(capture))
        meta = reader.metadata
        sites: dict[tuple[str, str, int], _Site] = {}
        for record in reader.get_high_watermark_allocation_records(merge_threads=True):
            stack = [(str(f), str(file), int(line))
                     for f, file, line in record.stack_trace(max_stacks=_STACK_DEPTH)]
            key = stack[0] if stack else ("<no python frame>", "", 0)
            site = sites.get(key)
            if site is None:
                site = sites[key] = _Site()
            site.add(int(record.size), int(record.n_allocations), stack)
        reader.close()
    except (OSError, RuntimeError, ValueError) as err:
        raise ProfilerError(
            f"could not read the memray capture {str(capture)!r} ({err}); the file may be "
            f"truncated, take a new heap profile"
        ) from err
    ranked = sorted(sites.items(), key=lambda kv: kv[1].bytes, reverse=True)[:top]
    return {
        "peak_memory_bytes": int(meta.peak_memory),
        "total_allocations": int(meta.total_allocations),
        "start_time": meta.start_time.isoformat(),
        "end_time": meta.end_time.isoformat(),
        "python_allocator": str(meta.python_allocator),
        "top_sites": [
            {"function": f, "file": file, "line": line, "bytes": site.bytes,
             "allocations": site.allocations,
             "stack": [f"{fn} ({fl}:{ln})" for fn, fl, ln in site.stack]}
            for (f, file, line), site in ranked
        ],
    }


class _Site:
    """Memory held at the peak by one allocation site (innermost Python frame)."""

    __slots__ = ("allocations", "bytes", "heaviest", "stack")

    def __init__(self) -> None:
        self.bytes = 0
        self.allocations = 0
        self.heaviest = -1
        self.stack: list[tuple[str, str, int]] = []

    def add(self, size: int, count: int, stack: list[tuple[str, str, int]]) -> None:
        self.bytes += size
        self.allocations += count
        if size > self.heaviest:  # keep the call path that holds the most
            self.heaviest = size
            self.stack = stack


def write_summary(summary: Mapping[str, Any], target: Path) -> None:
    """Write a summary as JSON (0o600)."""
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        json.dump(dict(summary), fh, indent=2)


def render_html(capture: Path, target: Path, *, timeout: float, offline: bool = False) -> None:
    """Write memray's HTML flame graph of the peak of ``capture``.

    Args:
        capture: the capture file.
        target: the HTML file to write.
        timeout: seconds to allow the reporter.
        offline: embed memray's scripts (about 4.5 MB) instead of loading them from a CDN.

    Raises:
        ProfilerError: the reporter failed or ran out of time.
    """
    argv = [sys.executable, "-m", "memray", "flamegraph", "--force", "--output", str(target)]
    if offline:
        argv.append("--no-web")
    argv.append(str(capture))
    try:
        done = subprocess.run(
            argv, capture_output=True, text=True, errors="replace",
            timeout=max(timeout, 0.1), check=False,
        )
    except subprocess.TimeoutExpired as err:
        _discard(target)
        raise ProfilerError(
            f"memray flamegraph did not finish within {timeout:.1f} s; run "
            f"'python -m memray flamegraph {capture}' later"
        ) from err
    except OSError as err:
        raise ProfilerError(f"could not run {sys.executable!r} for memray ({err})") from err
    if done.returncode != 0 or not target.is_file():
        tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
        raise ProfilerError(
            f"memray flamegraph failed with exit status {done.returncode} ({tail[0][:200]}); "
            f"run 'python -m memray flamegraph {capture}' to see why"
        )
    os.chmod(target, 0o600)


def write_heap_outputs(
    capture: Path, *, summary: Path, html: Path, duration: float | None, timeout: float,
    offline: bool = False,
) -> tuple[dict[str, Any], list[str]]:
    """Write the summary and the HTML flame graph of a closed capture.

    Args:
        capture: the capture file.
        summary: the summary JSON to write.
        html: the HTML flame graph to write.
        duration: seconds tracked, stored in the summary.
        timeout: seconds allowed for the HTML reporter.
        offline: embed memray's scripts in the HTML.

    Returns:
        Metadata (``peak_memory_bytes``, ``total_allocations``) and warnings for what
        could not be done.

    Raises:
        ProfilerError: there is no capture file.
    """
    if not capture.is_file():
        raise ProfilerError(
            f"memray wrote no capture at {str(capture)!r}; check the profile folder"
        )
    found: dict[str, Any] = {}
    warnings: list[str] = []
    try:
        data = summarize(capture)
        data["duration"] = duration
        write_summary(data, summary)
        found = {"peak_memory_bytes": data["peak_memory_bytes"],
                 "total_allocations": data["total_allocations"]}
    except (ProfilerError, OSError) as err:
        warnings.append(f"no summary: {err}")
    try:
        render_html(capture, html, timeout=timeout, offline=offline)
    except ProfilerError as err:
        warnings.append(f"no HTML flame graph: {err}")
    return found, warnings


def _discard(path: Path) -> None:
    with contextlib.suppress(OSError):
        path.unlink()
