"""Profiling: CPU profiles with py-spy, heap profiles with memray, the store and report.

An edge module: the core never imports it, and importing it loads neither memray nor
any HTTP machinery (memray is imported when a heap profile starts). A run uses it as::

    store = ProfileStore(settings.profiling_dir, retain_count=50, retain_mb=500)
    store.check_writable()                              # at start: a bad folder fails early
    profiler = Profiler(store, pipeline="orders", stats_provider=stage_stats)
    profiler.start_run_profiles(["cpu"])                # optional whole-run profiles
    record = profiler.cpu(10)                           # blocking; record.files["svg"]
    records = profiler.close(timeout=remaining)         # at shutdown
    write_report(store.report_path("orders"), run_report.to_dict(), profiler.records())

See ``docs/profiling.md``.
"""

from __future__ import annotations

from pipekit.profiling.cpu import allow_profiler_attach, find_py_spy
from pipekit.profiling.limits import MAX_RATE
from pipekit.profiling.profiler import ProfileHandle, Profiler, current_trace_id
from pipekit.profiling.report import render_report, write_report
from pipekit.profiling.store import ARTIFACTS, KINDS, ProfileRecord, ProfileStore, sanitize_name

__all__ = [
    "ARTIFACTS",
    "KINDS",
    "MAX_RATE",
    "ProfileHandle",
    "ProfileRecord",
    "ProfileStore",
    "Profiler",
    "allow_profiler_attach",
    "current_trace_id",
    "find_py_spy",
    "render_report",
    "sanitize_name",
    "write_report",
]
