"""Tests for pipekit.resources: sampling from (fake and real) /proc, the memory gate,
the open-files limit and the monitor thread."""

from __future__ import annotations

import gc
import logging
import os
import resource
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import FrozenInstanceError, replace
from datetime import timedelta
from pathlib import Path

import pytest

from pipekit import resources
from pipekit.errors import ConfigError, PipelineStateError
from pipekit.resources import (
    MemoryGate,
    ResourceMonitor,
    ResourceSample,
    ResourceSampler,
    apply_open_files_limit,
    restore_open_files_limit,
)

TICK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")
MIB = 1024 * 1024
GIB = 1024 * MIB

linux_only = pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="needs Linux /proc")


@pytest.fixture(autouse=True)
def _no_leaked_threads() -> Iterator[None]:
    before = set(threading.enumerate())
    yield
    leaked = [t for t in threading.enumerate() if t not in before and t.is_alive()]
    assert not leaked, f"test leaked threads: {leaked}"


class FakeClock:
    """A clock that moves only when told to."""

    def __init__(self, now: float = 0.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def write_proc(
    root: Path,
    pid: int,
    *,
    ppid: int = 1,
    comm: str = "python",
    utime: int = 0,
    stime: int = 0,
    starttime: int = 1000,
    rss_pages: int = 0,
    threads: int = 1,
    vmrss_kb: int | None = None,
    fds: int = 0,
    children: dict[int, list[int]] | None = None,
) -> None:
    """Write a minimal procfs entry; ``children`` maps a thread id to the pids it forked."""
    d = root / str(pid)
    d.mkdir(parents=True, exist_ok=True)
    # Fields 3.. of proc(5): state ppid pgrp session tty tpgid flags minflt cminflt majflt
    # cmajflt utime stime cutime cstime priority nice num_threads itrealvalue starttime
    # vsize rss ...
    rest = [
        "S", ppid, pid, pid, 0, -1, 4194560, 10, 0, 0, 0, utime, stime, 7, 9, 20, 0,
        threads, 0, starttime, 123456789, rss_pages, 18446744073709551615,
    ]
    (d / "stat").write_text(f"{pid} ({comm}) " + " ".join(map(str, rest)) + "\n")
    status = [f"Name:\t{comm}", "State:\tS (sleeping)", f"PPid:\t{ppid}"]
    if vmrss_kb is not None:
        status += ["VmPeak:\t  999999 kB", f"VmRSS:\t  {vmrss_kb} kB"]
    status += [f"Threads:\t{threads}", "SigQ:\t0/1000"]
    (d / "status").write_text("\n".join(status) + "\n")
    fd_dir = d / "fd"
    fd_dir.mkdir(exist_ok=True)
    for i in range(fds):
        (fd_dir / str(i)).touch()
    if children is not None:
        for tid, kids in children.items():
            task = d / "task" / str(tid)
            task.mkdir(parents=True, exist_ok=True)
            (task / "children").write_text("".join(f"{k} " for k in kids))


def fake_tree(root: Path) -> None:
    """Process 100 with children 101 and 102 (from two threads) and grandchild 103."""
    write_proc(root, 100, comm="my (odd) name", utime=300, stime=100, vmrss_kb=2048,
               threads=7, fds=5, children={100: [101], 150: [102]})
    write_proc(root, 101, ppid=100, utime=50, stime=50, rss_pages=10, children={101: [103]})
    write_proc(root, 102, ppid=100, utime=20, stime=0, rss_pages=20, children={102: []})
    write_proc(root, 103, ppid=101, utime=5, stime=5, rss_pages=5, children={103: []})
    write_proc(root, 200, ppid=1, utime=999, stime=999, rss_pages=999, children={200: []})


# -- sampling from a fake /proc ------------------------------------------------------


def test_fake_proc_sample_reads_exact_values(tmp_path: Path) -> None:
    fake_tree(tmp_path)
    sampler = ResourceSampler(100, proc_root=tmp_path, clock=FakeClock(), cpu_count=4)
    s = sampler.sample()
    children_rss = (10 + 20 + 5) * PAGE
    assert s.children_rss_bytes == children_rss
    assert s.rss_bytes == 2048 * 1024 + children_rss
    assert s.open_fds == 5
    assert s.threads == 7
    assert s.children == 3
    assert len(s.gc_counts) == 3
    assert len(s.gc_collections) == len(gc.get_stats())
    assert sampler.last is s


def test_sample_is_frozen(tmp_path: Path) -> None:
    fake_tree(tmp_path)
    s = ResourceSampler(100, proc_root=tmp_path).sample()
    with pytest.raises(FrozenInstanceError):
        s.rss_bytes = 0  # type: ignore[misc]


def test_cpu_percent_from_two_samples_with_fake_clock(tmp_path: Path) -> None:
    fake_tree(tmp_path)
    clock = FakeClock(10.0)
    sampler = ResourceSampler(100, proc_root=tmp_path, clock=clock, cpu_count=4)
    # Over 2 s of wall time: the process uses 1 s of CPU, child 101 0.5 s, 103 0.25 s.
    write_proc(tmp_path, 100, comm="my (odd) name", utime=300 + TICK // 2,
               stime=100 + TICK // 2, vmrss_kb=2048, threads=7, fds=5)
    write_proc(tmp_path, 101, ppid=100, utime=50 + TICK // 2, stime=50, rss_pages=10)
    write_proc(tmp_path, 103, ppid=101, utime=5 + TICK // 4, stime=5, rss_pages=5)
    clock.now = 12.0
    s = sampler.sample()
    assert s.at == 12.0
    assert s.cpu_percent == pytest.approx(1.75 / 2 * 100)
    assert s.cpu_utilization == pytest.approx(1.75 / 2 / 4)
    # Nothing used since: 0 %.
    clock.now = 13.0
    assert sampler.sample().cpu_percent == 0.0


def test_first_sample_reports_cpu_since_construction(tmp_path: Path) -> None:
    fake_tree(tmp_path)
    clock = FakeClock(0.0)
    sampler = ResourceSampler(100, proc_root=tmp_path, clock=clock, include_children=False,
                              cpu_count=1)
    write_proc(tmp_path, 100, utime=300 + TICK, stime=100, vmrss_kb=2048, threads=7)
    clock.now = 4.0
    assert sampler.sample().cpu_percent == pytest.approx(25.0)


def test_new_child_counts_whole_and_exited_child_never_goes_negative(tmp_path: Path) -> None:
    fake_tree(tmp_path)
    clock = FakeClock(0.0)
    sampler = ResourceSampler(100, proc_root=tmp_path, clock=clock, cpu_count=1)
    # Child 102 exits; child 104 is born having used 1 s of CPU.
    write_proc(tmp_path, 100, utime=300, stime=100, vmrss_kb=2048, threads=7,
               children={100: [101], 150: [104]})
    write_proc(tmp_path, 104, ppid=100, utime=TICK, stime=0, rss_pages=1, starttime=5000,
               children={104: []})
    clock.now = 1.0
    s = sampler.sample()
    assert s.children == 3
    assert s.cpu_percent == pytest.approx(100.0)


def test_recycled_child_pid_is_a_new_child(tmp_path: Path) -> None:
    fake_tree(tmp_path)
    clock = FakeClock(0.0)
    sampler = ResourceSampler(100, proc_root=tmp_path, clock=clock, cpu_count=1)
    # pid 102 now belongs to a new process (new start time) with less CPU than the old one.
    write_proc(tmp_path, 102, ppid=100, utime=TICK // 2, stime=0, starttime=9999)
    clock.now = 1.0
    assert sampler.sample().cpu_percent == pytest.approx(50.0)


def test_children_found_by_ppid_scan_without_children_files(tmp_path: Path) -> None:
    write_proc(tmp_path, 100, vmrss_kb=100, threads=2, fds=3)
    write_proc(tmp_path, 101, ppid=100, rss_pages=4)
    write_proc(tmp_path, 102, ppid=101, rss_pages=8)
    write_proc(tmp_path, 300, ppid=1, rss_pages=1000)
    (tmp_path / "self").mkdir()  # non-numeric entries are skipped
    s = ResourceSampler(100, proc_root=tmp_path).sample()
    assert s.children == 2
    assert s.children_rss_bytes == 12 * PAGE
    assert s.rss_bytes == 100 * 1024 + 12 * PAGE


def test_include_children_false_reads_only_the_process(tmp_path: Path) -> None:
    fake_tree(tmp_path)
    s = ResourceSampler(100, proc_root=tmp_path, include_children=False).sample()
    assert (s.children, s.children_rss_bytes, s.rss_bytes) == (0, 0, 2048 * 1024)


def test_missing_process_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="process 4242 has no directory"):
        ResourceSampler(4242, proc_root=tmp_path)
    with pytest.raises(ConfigError, match="pid must be a positive"):
        ResourceSampler(0, proc_root=tmp_path)


def test_process_that_vanishes_raises_process_lookup_error(tmp_path: Path) -> None:
    fake_tree(tmp_path)
    sampler = ResourceSampler(100, proc_root=tmp_path)
    for name in ("stat", "status"):
        (tmp_path / "100" / name).unlink()
    with pytest.raises(ProcessLookupError, match="process 100 is gone"):
        sampler.sample()


# -- sampling the real /proc ---------------------------------------------------------


@linux_only
def test_real_proc_sample_of_the_current_process() -> None:
    sampler = ResourceSampler()
    before = sampler.sample()
    files = [open(os.devnull) for _ in range(4)]  # noqa: SIM115
    try:
        after = sampler.sample()
    finally:
        for f in files:
            f.close()
    assert after.open_fds == before.open_fds + 4
    assert before.open_fds == len(os.listdir("/proc/self/fd")) - 1  # minus the listing's own
    assert after.threads >= threading.active_count()
    status = Path(f"/proc/{os.getpid()}/status").read_text()
    vmrss = int(status.split("VmRSS:")[1].split()[0]) * 1024
    assert abs(after.rss_bytes - after.children_rss_bytes - vmrss) < 16 * MIB
    gc.collect()
    assert sampler.sample().gc_collections[2] >= before.gc_collections[2] + 1


@linux_only
def test_real_proc_counts_a_child_process_and_its_memory() -> None:
    sampler = ResourceSampler()
    before = sampler.sample()
    code = ("import sys, time; x = bytearray(50_000_000); "
            "print('ready', flush=True); time.sleep(5)")
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None
        assert child.stdout.readline().strip() == "ready"
        during = sampler.sample()
        assert during.children == before.children + 1
        assert during.children_rss_bytes >= before.children_rss_bytes + 45_000_000
        assert during.rss_bytes >= during.children_rss_bytes + 1
    finally:
        child.kill()
        child.wait()
        if child.stdout is not None:
            child.stdout.close()
    after = sampler.sample()
    assert after.children == before.children
    assert after.children_rss_bytes < during.children_rss_bytes - 45_000_000


@linux_only
def test_psutil_fallback_without_proc(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    missing = str(tmp_path / "no-proc")
    monkeypatch.setattr(resources, "_DEFAULT_PROC_ROOT", missing)
    sampler = ResourceSampler(proc_root=missing)
    assert "_PsutilReader" in repr(sampler)
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(5)"])
    try:
        s = sampler.sample()
        assert s.children >= 1
        assert s.rss_bytes > s.children_rss_bytes > 0
        assert s.open_fds == len(os.listdir("/proc/self/fd")) - 1
        assert s.threads >= threading.active_count()
    finally:
        child.kill()
        child.wait()


def test_import_pipekit_resources_does_not_import_psutil() -> None:
    code = "import sys, pipekit, pipekit.resources; print('psutil' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "False"


# -- the memory gate -----------------------------------------------------------------


def test_memory_gate_hysteresis_counters_and_callbacks() -> None:
    clock = FakeClock(100.0)
    gate = MemoryGate(1000 * MIB, 0.9, clock=clock)
    changes: list[tuple[bool, str]] = []
    gate.on_change(lambda paused, reason: changes.append((paused, reason)))
    assert gate.update(500 * MIB) is False
    assert gate.update(1000 * MIB) is False  # at the limit is not above it
    assert (gate.pauses, gate.reason) == (0, "")

    assert gate.update(1200 * MIB) is True
    assert gate.paused is True
    assert gate.pauses == 1
    assert gate.reason == "resident memory 1.2 GiB is above max_memory_mb=1000"
    clock.now = 103.0
    assert gate.paused_seconds == pytest.approx(3.0)
    assert gate.update(950 * MIB) is True  # between the resume mark (900) and the limit
    assert gate.update(900 * MIB) is True  # at the resume mark is not below it
    clock.now = 105.0
    assert gate.update(899 * MIB) is False
    assert (gate.paused, gate.reason, gate.pauses) == (False, "", 1)
    clock.now = 200.0
    assert gate.paused_seconds == pytest.approx(5.0)

    gate.update(2 * GIB)
    clock.now = 201.0
    gate.update(0)
    assert gate.pauses == 2
    assert gate.paused_seconds == pytest.approx(6.0)
    assert [p for p, _ in changes] == [True, False, True, False]
    assert changes[0][1] == "resident memory 1.2 GiB is above max_memory_mb=1000"
    assert changes[1][1] == ""


def test_memory_gate_logs_structured_pause_and_resume(caplog: pytest.LogCaptureFixture) -> None:
    gate = MemoryGate.from_megabytes(1024)
    with caplog.at_level(logging.INFO, logger="pipekit.resources"):
        gate.update(int(1.2 * GIB))
        gate.update(100 * MIB)
    paused, resumed = caplog.records
    assert paused.levelno == logging.WARNING
    assert "resident memory 1.2 GiB is above max_memory_mb=1024" in paused.getMessage()
    assert paused.pipekit == {  # type: ignore[attr-defined]
        "event": "intake_paused", "rss_bytes": int(1.2 * GIB), "limit_bytes": GIB,
        "resume_bytes": 0.9 * GIB,
    }
    assert resumed.levelno == logging.INFO
    assert resumed.pipekit["event"] == "intake_resumed"  # type: ignore[attr-defined]
    assert resumed.pipekit["rss_bytes"] == 100 * MIB  # type: ignore[attr-defined]


def test_memory_gate_without_limit_never_pauses() -> None:
    gate = MemoryGate(None)
    assert gate.update(10**15) is False
    assert gate.paused is False
    assert gate.wait_open(0) is True


def test_memory_gate_rejects_bad_settings() -> None:
    with pytest.raises(ConfigError, match="max_memory_mb must be > 0"):
        MemoryGate(0)
    with pytest.raises(ConfigError, match="max_memory_mb must be > 0"):
        MemoryGate.from_megabytes(-5)
    for ratio in (0.0, 1.5):
        with pytest.raises(ConfigError, match="memory_resume_ratio"):
            MemoryGate(1000, ratio)


def test_memory_gate_callback_error_does_not_break_update() -> None:
    gate = MemoryGate(100)
    seen: list[bool] = []

    def broken(paused: bool, reason: str) -> None:
        raise RuntimeError("boom")

    gate.on_change(broken)
    gate.on_change(lambda paused, reason: seen.append(paused))
    assert gate.update(200) is True
    assert seen == [True]


def test_wait_open_times_out_while_paused() -> None:
    gate = MemoryGate(100)
    assert gate.wait_open(0) is True
    gate.update(101)
    assert gate.wait_open(0.01) is False


def test_wait_open_blocks_until_another_thread_resumes() -> None:
    gate = MemoryGate(100)
    gate.update(200)
    results: list[bool] = []
    waiter = threading.Thread(target=lambda: results.append(gate.wait_open(timeout=30)))
    waiter.start()
    waiter.join(0.05)
    assert waiter.is_alive()  # still blocked: the gate is paused
    gate.update(95)  # above the resume mark (90): still paused
    waiter.join(0.05)
    assert waiter.is_alive()
    gate.update(10)
    waiter.join(10)
    assert not waiter.is_alive()
    assert results == [True]


def test_close_releases_waiters_and_stops_gating() -> None:
    gate = MemoryGate(100)
    changes: list[bool] = []
    gate.on_change(lambda paused, reason: changes.append(paused))
    gate.update(200)
    results: list[bool] = []
    waiter = threading.Thread(target=lambda: results.append(gate.wait_open(timeout=30)))
    waiter.start()
    gate.close()
    waiter.join(10)
    assert results == [True]
    assert gate.update(10**9) is False
    assert changes == [True, False]


# -- the open-files limit ------------------------------------------------------------


@linux_only
def test_apply_open_files_limit_lowers_and_restores_the_soft_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = len(os.listdir("/proc/self/fd")) + 100
    if target >= soft:
        pytest.skip(f"soft limit {soft} is already too low to lower")
    previous = apply_open_files_limit(target)
    try:
        assert previous == (soft, hard)
        assert resource.getrlimit(resource.RLIMIT_NOFILE) == (target, hard)
    finally:
        assert restore_open_files_limit(previous) is True
    assert resource.getrlimit(resource.RLIMIT_NOFILE) == (soft, hard)


def test_apply_open_files_limit_none_changes_nothing() -> None:
    before = resource.getrlimit(resource.RLIMIT_NOFILE)
    assert apply_open_files_limit(None) is None
    assert restore_open_files_limit(None) is True
    assert resource.getrlimit(resource.RLIMIT_NOFILE) == before


def test_apply_open_files_limit_above_hard_limit_names_value_limit_and_fix() -> None:
    before = resource.getrlimit(resource.RLIMIT_NOFILE)
    hard = before[1]
    if hard == resource.RLIM_INFINITY:
        pytest.skip("no hard limit on RLIMIT_NOFILE here")
    with pytest.raises(ConfigError) as info:
        apply_open_files_limit(hard + 1)
    message = str(info.value)
    assert f"max_open_files={hard + 1}" in message
    assert f"hard RLIMIT_NOFILE limit {hard}" in message
    assert "ulimit -Hn" in message
    assert resource.getrlimit(resource.RLIMIT_NOFILE) == before


def test_apply_open_files_limit_refuses_too_few_free_descriptors() -> None:
    before = resource.getrlimit(resource.RLIMIT_NOFILE)
    with pytest.raises(ConfigError, match="leaves fewer than 32 free file descriptors"):
        apply_open_files_limit(3)
    for bad in (0, -1, True, 2.5):
        with pytest.raises(ConfigError, match="must be a positive integer"):
            apply_open_files_limit(bad)  # type: ignore[arg-type]
    assert resource.getrlimit(resource.RLIMIT_NOFILE) == before


# -- the monitor ---------------------------------------------------------------------


def make_sample(**changes: object) -> ResourceSample:
    base = ResourceSample(at=0.0, cpu_percent=10.0, cpu_utilization=0.05, rss_bytes=100,
                          children_rss_bytes=0, open_fds=3, threads=1, children=0,
                          gc_counts=(0, 0, 0), gc_collections=(0, 0, 0))
    return replace(base, **changes)  # type: ignore[arg-type]


class ScriptedSampler:
    """Returns the queued samples (repeating the last); raises queued exceptions."""

    def __init__(self, *script: ResourceSample | Exception) -> None:
        self.script = list(script)
        self.calls = 0

    def sample(self) -> ResourceSample:
        self.calls += 1
        item = self.script.pop(0) if len(self.script) > 1 else self.script[0]
        if isinstance(item, Exception):
            raise item
        return item


def test_tick_updates_gate_latest_cpu_flag_and_callback() -> None:
    gate = MemoryGate(1000, 0.5)
    seen: list[ResourceSample] = []
    s1 = make_sample(rss_bytes=2000, cpu_percent=150.0)
    s2 = make_sample(rss_bytes=400, cpu_percent=50.0)
    monitor = ResourceMonitor(ScriptedSampler(s1, s2), gate, 1.0, on_sample=seen.append,
                              cpu_limit_percent=100.0)
    assert monitor.latest is None
    assert monitor.tick() is s1
    assert (gate.paused, monitor.cpu_over_limit) == (True, True)
    assert monitor.tick() is s2
    assert (gate.paused, monitor.cpu_over_limit) == (False, False)
    assert monitor.latest is s2
    assert seen == [s1, s2]
    assert monitor.errors == 0


def test_tick_survives_a_failing_sampler_and_callback(caplog: pytest.LogCaptureFixture) -> None:
    good = make_sample()
    sampler = ScriptedSampler(OSError("no /proc"), OSError("still"), good)

    def bad_callback(sample: ResourceSample) -> None:
        raise ValueError("exporter down")

    monitor = ResourceMonitor(sampler, None, 1.0)
    with caplog.at_level(logging.DEBUG, logger="pipekit.resources"):
        assert monitor.tick() is None
        assert monitor.tick() is None
        assert monitor.tick() is good
    assert monitor.errors == 2
    assert monitor.latest is good
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1  # one traceback per streak
    assert any("recovered" in r.getMessage() for r in caplog.records)

    monitor = ResourceMonitor(ScriptedSampler(good), on_sample=bad_callback)
    assert monitor.tick() is good
    assert monitor.errors == 1


def test_monitor_thread_starts_samples_and_stops_without_leaking() -> None:
    sampled = threading.Event()
    names: list[str] = []

    def on_sample(sample: ResourceSample) -> None:
        names.append(threading.current_thread().name)
        sampled.set()

    gate = MemoryGate(50)
    monitor = ResourceMonitor(ScriptedSampler(make_sample(rss_bytes=100)), gate,
                              timedelta(milliseconds=10), on_sample=on_sample)
    monitor.start()
    try:
        assert sampled.wait(10)
        assert monitor.running
        with pytest.raises(PipelineStateError, match="already running"):
            monitor.start()
    finally:
        assert monitor.stop(timeout=10) is True
    assert not monitor.running
    assert set(names) == {"pipekit-resources"}
    assert gate.paused is True
    assert not any(t.name == "pipekit-resources" for t in threading.enumerate())


def test_monitor_thread_survives_a_sampler_that_raises() -> None:
    sampler = ScriptedSampler(RuntimeError("broken"))
    with ResourceMonitor(sampler, None, 0.005) as monitor:
        deadline = time.monotonic() + 10
        while monitor.errors < 3 and time.monotonic() < deadline:
            time.sleep(0.005)
        assert monitor.errors >= 3
        assert monitor.running
    assert not monitor.running


@linux_only
def test_monitor_with_real_sampler_round_trip() -> None:
    with ResourceMonitor(ResourceSampler(), MemoryGate(None), 0.01) as monitor:
        deadline = time.monotonic() + 10
        while monitor.latest is None and time.monotonic() < deadline:
            time.sleep(0.005)
    assert monitor.latest is not None
    assert monitor.latest.rss_bytes > 0


def test_monitor_rejects_bad_settings() -> None:
    sampler = ScriptedSampler(make_sample())
    with pytest.raises(ConfigError, match="interval must be > 0"):
        ResourceMonitor(sampler, None, 0)
    with pytest.raises(ConfigError, match="interval must be > 0"):
        ResourceMonitor(sampler, None, timedelta(0))
    with pytest.raises(ConfigError, match="max_cpu_percent must be > 0"):
        ResourceMonitor(sampler, None, 1.0, cpu_limit_percent=0)
    assert ResourceMonitor(sampler, None, timedelta(seconds=2)).interval == 2.0
    assert ResourceMonitor(sampler).stop() is True  # never started
