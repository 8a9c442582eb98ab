"""Tests of pipekit.profiling: real py-spy and memray runs, the store, and the run report."""

from __future__ import annotations

import json
import logging
import math
import os
import re
import signal
import stat
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

import pipekit.profiling
from pipekit.errors import ConfigError, MissingExtraError, ProfilerBusyError, ProfilerError
from pipekit.profiling import (
    ARTIFACTS,
    Profiler,
    ProfileRecord,
    ProfileStore,
    find_py_spy,
    sanitize_name,
    write_report,
)
from pipekit.profiling.flamegraph import render_svg
from pipekit.stats import DeadLetter, LatencySummary, RunReport, StageStats

PYTHON = sys.executable


# -- fixtures and workloads --------------------------------------------------------------


@pytest.fixture(autouse=True)
def no_leaked_threads() -> Iterator[None]:
    """Fail a test that leaves threads behind (py-spy reader threads end with py-spy)."""
    before = set(threading.enumerate())
    yield
    deadline = time.monotonic() + 10.0
    while time.monotonic() < deadline:
        extra = [t for t in threading.enumerate() if t not in before and t.is_alive()]
        if not extra:
            return
        time.sleep(0.05)
    pytest.fail(f"threads leaked: {[t.name for t in extra]}")


def crunch_numbers_for_profile(stop: threading.Event) -> None:
    """A CPU-bound loop the CPU profile must name."""
    x = 0
    while not stop.is_set():
        for i in range(5000):
            x += i * i


def allocate_blocks_for_profile(stop: threading.Event) -> None:
    """Allocates and frees lists, so the peak holds memory allocated here."""
    while not stop.is_set():
        blocks = [[0] * 1000 for _ in range(500)]
        time.sleep(0.005)
        del blocks


def _run_thread(target: Any, name: str) -> Iterator[None]:
    stop = threading.Event()
    thread = threading.Thread(target=target, args=(stop,), name=name)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


@pytest.fixture
def busy_thread() -> Iterator[None]:
    """A stage-like worker thread named pipekit-crunch-0 burning CPU."""
    yield from _run_thread(crunch_numbers_for_profile, "pipekit-crunch-0")


@pytest.fixture
def allocating_thread() -> Iterator[None]:
    """A stage-like worker thread named pipekit-alloc-0 allocating memory."""
    yield from _run_thread(allocate_blocks_for_profile, "pipekit-alloc-0")


@pytest.fixture
def store(tmp_path: Path) -> ProfileStore:
    return ProfileStore(tmp_path / "profiles")


def _stats() -> dict[str, Any]:
    return {"crunch": {"received": 10, "succeeded": 9}}


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _inside(path: Path, root: Path) -> bool:
    return path.resolve().is_relative_to(root.resolve())


# -- CPU profiles --------------------------------------------------------------------------


def test_cpu_profile_names_the_busy_stage_thread_and_records_trace_and_stats(
    store: ProfileStore, busy_thread: None
) -> None:
    from opentelemetry import trace
    from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags

    profiler = Profiler(store, pipeline="orders", stats_provider=_stats)
    trace_id = 0x0AF7651916CD43DD8448EB211C80319C
    ctx = SpanContext(trace_id=trace_id, span_id=0xB7AD6B7169203331, is_remote=False,
                      trace_flags=TraceFlags(TraceFlags.SAMPLED))
    result: list[ProfileRecord] = []

    def take() -> None:
        with trace.use_span(NonRecordingSpan(ctx)):
            result.append(profiler.cpu(1, rate=200))

    taker = threading.Thread(target=take, name="test-taker")
    taker.start()
    deadline = time.monotonic() + 10
    while not profiler.busy("cpu") and taker.is_alive() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert profiler.busy("cpu")
    with pytest.raises(ProfilerBusyError, match="already running"):
        profiler.cpu(1)
    taker.join()
    assert not profiler.busy("cpu")

    (record,) = result
    assert re.fullmatch(r"\d{8}T\d{6}Z-cpu-api", record.id)
    assert set(record.files) == {"speedscope", "svg", "meta"}
    for path in record.files.values():
        assert _inside(path, store.root / "orders")
        assert _mode(path) == 0o600
    data = json.loads(record.files["speedscope"].read_text())
    assert {"$schema", "profiles", "shared"} <= data.keys()
    names = [f["name"] for f in data["shared"]["frames"]]
    assert "crunch_numbers_for_profile" in names
    assert any("pipekit-crunch-0" in p["name"] for p in data["profiles"])
    svg = record.files["svg"].read_text()
    assert svg.startswith("<svg")
    assert "crunch_numbers_for_profile" in svg
    assert "pipekit-crunch-0" in svg
    assert "<script" not in svg

    meta = json.loads(record.files["meta"].read_text())
    assert meta["pipeline"] == "orders"
    assert meta["kind"] == "cpu"
    assert meta["trigger"] == "api"
    assert meta["rate"] == 200
    assert meta["pid"] == os.getpid()
    assert meta["complete"] is True
    assert meta["duration"] >= 1.0
    assert meta["trace_id"] == f"{trace_id:032x}"
    assert meta["stages"] == _stats()
    assert meta["samples"] > 0
    assert profiler.records() == [record]
    assert store.find(record.id) == record


# -- heap profiles -------------------------------------------------------------------------


def test_heap_profile_writes_capture_html_and_summary(
    store: ProfileStore, allocating_thread: None
) -> None:
    profiler = Profiler(store, pipeline="orders")
    record = profiler.heap(timedelta(seconds=1), metadata={"ticket": "OPS-1"})

    assert set(record.files) == {"bin", "html", "summary", "meta"}
    stats = subprocess.run([PYTHON, "-m", "memray", "stats", str(record.files["bin"])],
                           capture_output=True, check=False)
    assert stats.returncode == 0, stats.stderr
    summary = json.loads(record.files["summary"].read_text())
    assert summary["peak_memory_bytes"] > 0
    assert summary["total_allocations"] > 0
    assert summary["top_sites"]
    assert {"function", "file", "line", "bytes", "allocations"} <= summary["top_sites"][0].keys()
    stacks = [" ".join(s["stack"]) for s in summary["top_sites"]]
    assert "allocate_blocks_for_profile" in stacks[0], stacks
    meta = record.metadata
    assert meta["kind"] == "heap"
    assert meta["trace_id"] is None
    assert meta["extra"] == {"ticket": "OPS-1"}
    assert meta["peak_memory_bytes"] == summary["peak_memory_bytes"]
    assert "<html" in record.files["html"].read_text().lower()


def test_close_ends_a_blocking_profile_early_and_keeps_it(store: ProfileStore) -> None:
    profiler = Profiler(store, pipeline="p", max_seconds=600)
    result: list[ProfileRecord] = []
    taker = threading.Thread(target=lambda: result.append(profiler.heap(600)), name="taker")
    taker.start()
    while not profiler.busy("heap") and taker.is_alive():
        time.sleep(0.01)
    profiler.close(timeout=30)
    taker.join(timeout=60)
    assert not taker.is_alive()
    (record,) = result
    assert record.complete
    assert "bin" in record.files
    with pytest.raises(ProfilerError, match="closed"):
        profiler.heap(1)


# -- whole-run profiles, busy, background ---------------------------------------------------


def test_whole_run_profiles_start_stop_and_block_other_requests(
    store: ProfileStore, busy_thread: None, caplog: pytest.LogCaptureFixture
) -> None:
    def broken_stats() -> dict[str, Any]:
        raise RuntimeError("stats are broken")

    profiler = Profiler(store, pipeline="orders", stats_provider=broken_stats)
    profiler.start_run_profiles(["cpu", "heap", "cpu"])
    try:
        assert profiler.busy("cpu")
        assert profiler.busy("heap")
        with pytest.raises(ProfilerBusyError):
            profiler.cpu(1)
        with pytest.raises(ProfilerBusyError):
            profiler.heap(1)
        with pytest.raises(ProfilerBusyError):
            profiler.start_run_profiles(["heap"])
        with caplog.at_level(logging.WARNING, logger="pipekit.profiling"):
            profiler.spawn("heap", 1).join()
        assert "not taken" in caplog.text
        time.sleep(0.5)  # let py-spy collect some samples of the busy thread
    finally:
        records = profiler.stop_run_profiles(timeout=60)
    assert not profiler.busy("cpu")
    assert not profiler.busy("heap")
    assert sorted(r.kind for r in records) == ["cpu", "heap"]
    for r in records:
        assert r.trigger == "run"
        assert r.complete
        assert r.id.endswith(f"-{r.kind}-run")
        assert r.metadata["stages"] is None
        assert r.metadata["requested_seconds"] is None
    cpu = next(r for r in records if r.kind == "cpu")
    assert "crunch_numbers_for_profile" in cpu.files["speedscope"].read_text()
    heap = next(r for r in records if r.kind == "heap")
    assert {"bin", "html", "summary"} <= heap.files.keys()
    assert profiler.stop_run_profiles() == []


CHILD = textwrap.dedent(
    """
    import signal, sys, threading, time
    from pipekit.profiling import Profiler, ProfileStore

    def crunch_in_child():
        x = 0
        while True:
            for i in range(5000):
                x += i * i

    threading.Thread(target=crunch_in_child, name="pipekit-crunch-0", daemon=True).start()
    profiler = Profiler(ProfileStore(sys.argv[1]), pipeline="child-run")

    def on_sigterm(signum, frame):
        records = profiler.stop_run_profiles(timeout=60)
        print(" ".join(r.id for r in records), flush=True)
        sys.exit(0)

    signal.signal(signal.SIGTERM, on_sigterm)
    profiler.start_run_profiles(["cpu", "heap"])
    print("ready", flush=True)
    while True:
        time.sleep(0.05)
    """
)


def test_sigterm_in_child_writes_whole_run_profiles(tmp_path: Path) -> None:
    root = tmp_path / "profiles"
    child = subprocess.Popen([PYTHON, "-c", CHILD, str(root)], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None
        assert child.stdout.readline().strip() == "ready"
        time.sleep(0.3)  # some samples
        child.send_signal(signal.SIGTERM)
        out, err = child.communicate(timeout=60)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    assert child.returncode == 0, err
    ids = out.split()
    assert len(ids) == 2
    records = ProfileStore(root).records("child-run")
    assert sorted(r.id for r in records) == sorted(ids)
    for r in records:
        assert r.complete, r.metadata
    cpu = next(r for r in records if r.kind == "cpu")
    assert {"speedscope", "svg", "meta"} <= cpu.files.keys()
    assert "crunch_in_child" in cpu.files["speedscope"].read_text()
    heap = next(r for r in records if r.kind == "heap")
    assert {"bin", "html", "summary", "meta"} <= heap.files.keys()


# -- argument checks -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("seconds", "needle"),
    [(301, "300"), (0, "> 0"), (-1, "> 0"), (math.nan, "nan"), (math.inf, "inf"),
     ("5", "'5'"), (True, "True"), (timedelta(minutes=6), "300")],
)
def test_bad_durations_raise_config_error_naming_value(
    store: ProfileStore, seconds: Any, needle: str
) -> None:
    profiler = Profiler(store, pipeline="p", max_seconds=300)
    for take in (profiler.cpu, profiler.heap):
        with pytest.raises(ConfigError, match=re.escape(needle)):
            take(seconds)
    with pytest.raises(ConfigError):
        profiler.spawn("cpu", seconds)
    assert not profiler.busy("cpu")
    assert not profiler.busy("heap")
    assert store.records() == []


@pytest.mark.parametrize("rate", [0, -5, 1001, 2.5, True, "100"])
def test_bad_rates_raise_config_error_naming_limit(store: ProfileStore, rate: Any) -> None:
    with pytest.raises(ConfigError, match="1 to 1000"):
        Profiler(store, pipeline="p", rate=rate)
    profiler = Profiler(store, pipeline="p")
    with pytest.raises(ConfigError, match=re.escape(repr(rate))):
        profiler.cpu(1, rate=rate)
    with pytest.raises(ConfigError):
        profiler.start_run_profiles(["cpu"], rate=rate)
    assert not profiler.busy("cpu")


def test_bad_kind_trigger_and_limits_raise_config_error(store: ProfileStore) -> None:
    profiler = Profiler(store, pipeline="p")
    with pytest.raises(ConfigError, match="'wall'"):
        profiler.start_run_profiles(["wall"])
    with pytest.raises(ConfigError, match="'wall'"):
        profiler.busy("wall")
    with pytest.raises(ConfigError, match="trigger"):
        profiler.cpu(1, trigger="../x")
    with pytest.raises(ConfigError, match="profiling_max_seconds"):
        Profiler(store, pipeline="p", max_seconds=math.nan)
    with pytest.raises(ConfigError, match="profiling_retain_count"):
        ProfileStore("x", retain_count=0)
    with pytest.raises(ConfigError, match="profiling_retain_mb"):
        ProfileStore("x", retain_mb=-1)


# -- failure modes -------------------------------------------------------------------------


def test_missing_py_spy_names_the_install_fix(
    store: ProfileStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    empty = tmp_path / "empty-bin"
    empty.mkdir()
    with pytest.raises(ProfilerError, match=re.escape("pip install 'pipekit[profiling]'")):
        find_py_spy(python=str(empty / "python"), path=str(empty))

    monkeypatch.setattr(sys, "executable", str(empty / "python"))
    monkeypatch.setenv("PATH", str(empty))
    profiler = Profiler(store, pipeline="p")
    with pytest.raises(ProfilerError, match="py-spy"):
        profiler.cpu(1)
    with pytest.raises(ProfilerError, match="py-spy"):
        profiler.start_run_profiles(["cpu"])
    assert not profiler.busy("cpu")
    assert store.records() == []


def test_py_spy_denied_ptrace_names_sys_ptrace_and_ptrace_scope(
    store: ProfileStore, tmp_path: Path
) -> None:
    fake = tmp_path / "py-spy"
    fake.write_text("#!/bin/sh\necho 'Error: Operation not permitted (os error 1)'\nexit 1\n")
    fake.chmod(0o755)
    profiler = Profiler(store, pipeline="p", py_spy=fake)
    with pytest.raises(ProfilerError) as info:
        profiler.cpu(1)
    message = str(info.value)
    assert "--cap-add SYS_PTRACE" in message
    assert "/proc/sys/kernel/yama/ptrace_scope" in message
    assert "operation not permitted" in message.lower()
    assert not profiler.busy("cpu")
    assert store.records() == []


def test_py_spy_exiting_without_sampling_is_reported(store: ProfileStore, tmp_path: Path) -> None:
    fake = tmp_path / "py-spy"
    fake.write_text("#!/bin/sh\necho 'Error: Failed to get process executable name.'\nexit 1\n")
    fake.chmod(0o755)
    profiler = Profiler(store, pipeline="p", py_spy=fake, pid=999_999)
    with pytest.raises(ProfilerError, match="could not find process 999999"):
        profiler.start_cpu()


def test_missing_memray_raises_missing_extra(
    store: ProfileStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "memray", None)
    profiler = Profiler(store, pipeline="p")
    with pytest.raises(MissingExtraError, match=re.escape("pipekit[profiling]")) as info:
        profiler.heap(1)
    assert isinstance(info.value, ImportError)
    assert info.value.package == "memray"
    with pytest.raises(MissingExtraError):
        profiler.start_run_profiles(["heap"])
    assert not profiler.busy("heap")
    assert store.records() == []


def test_import_does_not_load_memray_or_http() -> None:
    code = ("import sys, pipekit.profiling; "
            "print(sorted(m for m in ('memray', 'http.server', 'opentelemetry.sdk') "
            "if m in sys.modules))")
    out = subprocess.run([PYTHON, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_public_surface_is_exactly_all() -> None:
    public = {n for n in dir(pipekit.profiling)
              if not n.startswith("_") and n not in {"annotations", "cpu", "flamegraph",
                                                     "heap", "limits", "profiler", "report",
                                                     "store"}}
    assert public == set(pipekit.profiling.__all__)
    assert list(pipekit.profiling.__all__) == sorted(pipekit.profiling.__all__)


# -- the store -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    ["../../etc", "a/b", "", "données", "..", ".", "/abs/path", "a\\b", "x" * 300,
     "nul\x00byte", ".hidden", "...", "流水线"],
)
def test_hostile_pipeline_names_stay_inside_the_store(store: ProfileStore, name: str) -> None:
    folder = store.pipeline_dir(name)
    assert folder.parent == store.root
    assert re.fullmatch(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,63}", folder.name)
    assert ".." not in folder.name
    profile_id, where = store.create(pipeline=name, kind="cpu", trigger="api",
                                     started_at=datetime.now(UTC))
    assert where == folder
    record = store.find(profile_id)
    assert record is not None
    assert _inside(record.files["meta"], store.root)


@given(st.text())
def test_sanitized_names_are_always_safe(name: str) -> None:
    safe = sanitize_name(name)
    assert re.fullmatch(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,63}", safe)
    assert ".." not in safe
    assert "/" not in safe


def _add(store: ProfileStore, pipeline: str, when: datetime, size: int = 10,
         kind: str = "cpu") -> str:
    profile_id, folder = store.create(pipeline=pipeline, kind=kind, trigger="api",
                                      started_at=when)
    store.write_metadata(folder, profile_id, {"pipeline": pipeline, "kind": kind,
                                              "trigger": "api", "complete": True,
                                              "started_at": when.isoformat(), "duration": 1.0})
    artifact = "speedscope" if kind == "cpu" else "bin"
    store.path(folder, profile_id, artifact).write_bytes(b"x" * size)
    return profile_id


def test_artifact_lookup_resolves_only_known_files_inside_the_store(
    store: ProfileStore, tmp_path: Path
) -> None:
    t0 = datetime(2026, 12, 3, 16, 25, 1, tzinfo=UTC)
    profile_id = _add(store, "orders", t0)
    assert profile_id == "20261203T162501Z-cpu-api"
    assert _add(store, "other", t0) == "20261203T162501Z-cpu-api-2"  # unique store-wide
    path = store.artifact_path(profile_id, "speedscope")
    assert path == store.root / "orders" / f"{profile_id}.speedscope.json"
    assert store.artifact_path(profile_id, "svg") is None  # not written

    secret = tmp_path / "secret.meta.json"
    secret.write_text("{}")
    hostile_ids = ["../secret", "../../etc/passwd", "a/b", "", "x" * 65, ".", "..",
                   "%2e%2e", f"{profile_id}/..", "orders/" + profile_id, None, 42]
    for bad in hostile_ids:
        assert store.find(bad) is None  # type: ignore[arg-type]
        assert store.artifact_path(bad, "meta") is None  # type: ignore[arg-type]
    for bad_artifact in ["../meta", "passwd", "", "meta/../bin", ".meta.json", None]:
        assert store.artifact_path(profile_id, bad_artifact) is None  # type: ignore[arg-type]

    # a symlink planted in the store never resolves to a file outside it
    link_id = "20261203T000000Z-cpu-api"
    (store.root / "orders" / f"{link_id}.meta.json").symlink_to(secret)
    assert store.find(link_id) is None
    assert store.artifact_path(link_id, "meta") is None
    (store.root / "evil").symlink_to(tmp_path)
    assert store.find("secret") is None
    assert set(ARTIFACTS) == {"speedscope", "svg", "bin", "html", "summary", "meta"}


def test_retention_by_count_removes_oldest_first(tmp_path: Path) -> None:
    store = ProfileStore(tmp_path / "p", retain_count=3)
    t0 = datetime(2026, 1, 1, tzinfo=UTC)
    ids = [_add(store, "a" if i % 2 else "b", t0 + timedelta(minutes=i)) for i in range(5)]
    assert store.enforce_retention() == ids[:2]
    assert [r.id for r in store.records()] == ids[2:]
    assert not list((tmp_path / "p").glob(f"*/{ids[0]}*"))


def test_retention_by_size_keeps_protected_profiles(tmp_path: Path) -> None:
    store = ProfileStore(tmp_path / "p", retain_mb=3000 / (1024 * 1024))
    t0 = datetime(2026, 1, 1, tzinfo=UTC)
    ids = [_add(store, "a", t0 + timedelta(minutes=i), size=1000, kind="heap")
           for i in range(5)]
    removed = store.enforce_retention(protect={ids[0]})
    assert removed == ids[1:4]
    assert [r.id for r in store.records()] == [ids[0], ids[4]]


def test_folders_are_owner_only(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        store = ProfileStore(tmp_path / "new" / "profiles")
        (tmp_path / "new").mkdir()
        store.check_writable()
        assert _mode(store.root) == 0o700
        assert _mode(store.pipeline_dir("orders")) == 0o700
        assert list(store.root.iterdir()) == [store.root / "orders"]  # probe file removed
    finally:
        os.umask(old)


def test_unwritable_folder_is_reported_at_check_time(tmp_path: Path) -> None:
    blocker = tmp_path / "profiles"
    blocker.write_text("a file where the folder should be")
    with pytest.raises(ProfilerError, match="profiling_dir") as info:
        ProfileStore(blocker).check_writable()
    assert str(blocker) in str(info.value)
    with pytest.raises(ProfilerError, match="not writable"):
        ProfileStore(blocker / "sub").check_writable()


def test_interrupted_profile_is_listed_as_incomplete(store: ProfileStore) -> None:
    when = datetime(2026, 5, 1, 12, 0, tzinfo=UTC)
    profile_id, _ = store.create(pipeline="p", kind="heap", trigger="run", started_at=when)
    record = store.find(profile_id)
    assert record is not None
    assert not record.complete
    assert record.duration is None
    assert (record.kind, record.trigger, record.started_at) == ("heap", "run", when)


# -- flame graph and run report ------------------------------------------------------------


def test_flamegraph_svg_escapes_names_and_handles_no_samples() -> None:
    data = {
        "shared": {"frames": [{"name": "<script>alert(1)</script>", "file": "a.py", "line": 3},
                              {"name": "thread (1): pipekit-x-0", "file": "", "line": 0}]},
        "profiles": [{"type": "sampled", "unit": "seconds", "samples": [[1, 0], [1]],
                      "weights": [0.01, 0.01]}],
    }
    svg = render_svg(data, title="t<1>")
    assert "<script" not in svg
    assert "&lt;script&gt;" in svg
    assert "t&lt;1&gt;" in svg
    assert "pipekit-x-0" in svg
    assert "no samples" in render_svg({"profiles": [], "shared": {"frames": []}})


def _run_report() -> RunReport:
    lat = LatencySummary(count=90, mean=0.002, p50=0.0015, p95=0.004, p99=0.006, max=0.01)
    stages = (
        StageStats(name="parse", received=100, succeeded=100, emitted=100, workers=2,
                   busy_seconds=0.4, cpu_seconds=0.35, latency=lat),
        StageStats(name="<script>alert('x')</script>", received=100, succeeded=90, failed=10,
                   workers=1, busy_seconds=1.8, cpu_seconds=0.1, latency=lat),
    )
    dead = tuple(DeadLetter("<script>alert('x')</script>", i, ValueError("<b>bad</b>"), 3)
                 for i in range(10))
    return RunReport(pipeline="orders", submitted=100, outputs=90, dead_letters=dead,
                     dead_letter_count=10, unprocessed=(), duration=2.0, stages=stages,
                     reason="completed")


def test_report_renders_stages_escapes_names_and_links_profiles_relatively(
    store: ProfileStore,
) -> None:
    profile_id = _add(store, "orders", datetime(2026, 1, 1, tzinfo=UTC))
    record = store.find(profile_id)
    assert record is not None
    path = write_report(store.report_path("orders"), _run_report().to_dict(), [record])
    assert path == store.root / "orders" / "report.html"
    html = path.read_text()

    assert "<script" not in html.lower()
    assert "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt;" in html
    assert "&lt;b&gt;bad&lt;/b&gt;" in html
    assert "http://" not in html
    assert "https://" not in html
    assert "<svg" in html
    assert ">parse<" in html
    assert "Dead letters (10)" in html
    assert "estimated" in html  # no bottleneck key: estimated from busy time per worker
    hrefs = re.findall(r'href="([^"]+)"', html)
    assert hrefs
    assert all(not h.startswith(("/", "http")) for h in hrefs)
    assert {(path.parent / h).resolve() for h in hrefs} == {
        p.resolve() for p in record.files.values()}


def test_report_uses_the_runs_own_bottleneck_and_accepts_a_folder(tmp_path: Path) -> None:
    data = _run_report().to_dict()
    data["bottleneck"] = {"stage": "parse", "reason": "busy"}
    path = write_report(tmp_path, data, [])
    html = path.read_text()
    assert path == tmp_path / "report.html"
    assert '<tr class="limit"><td class="l">parse</td>' in html
    assert "no profiles were taken" in html
    empty = write_report(tmp_path / "empty.html", {"pipeline": "x"}, [])
    assert "no stages" in empty.read_text()
