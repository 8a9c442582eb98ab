"""Resource sampling and limits: CPU, memory, file descriptors, threads and GC.

Data flow::

    ResourceMonitor thread "pipekit-resources", every `interval` seconds
        │
        ├─ ResourceSampler.sample() ── reads <proc_root>/<pid>/{stat,status,fd}
        │                               and the stat of every descendant process
        │                               (psutil only where there is no /proc)
        │        └─> ResourceSample (frozen)
        ├─ MemoryGate.update(rss_bytes) ── pauses intake above the limit, resumes
        │                                  below the hysteresis mark; producers check
        │                                  the plain bool `gate.paused` and block in
        │                                  `gate.wait_open()`
        ├─ cpu_over_limit = cpu_percent > max_cpu_percent   (read by the autoscaler)
        └─ on_sample(sample)  ── telemetry observes `monitor.latest`

Nothing here touches the hot path except ``gate.paused`` (an attribute read). psutil is
imported lazily, only on platforms without ``/proc``, so ``import pipekit`` stays light.
"""

from __future__ import annotations

import gc
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, NamedTuple, Protocol

from pipekit.errors import ConfigError, PipelineStateError, missing_extra

__all__ = [
    "MemoryGate",
    "ResourceMonitor",
    "ResourceSample",
    "ResourceSampler",
    "apply_open_files_limit",
    "restore_open_files_limit",
]

logger = logging.getLogger("pipekit.resources")

_DEFAULT_PROC_ROOT = "/proc"
_FD_HEADROOM = 32  # free descriptors max_open_files must leave above those already open
_MIB = 1024 * 1024

# A child process is identified by (pid, start time) so a recycled pid is a new child.
_ChildKey = tuple[int, int]
# Per child: (CPU seconds, resident bytes).
_ChildReading = tuple[float, int]


@dataclass(frozen=True, slots=True, kw_only=True)
class ResourceSample:
    """One reading of the process's resources.

    Attributes:
        at: the sampler's clock (``time.monotonic`` by default) when the reading began.
        cpu_percent: CPU time used since the previous sample over wall time, summed over
            the process and its descendants, in percent of one core (200 = two cores
            busy). 0.0 when there is no earlier reading.
        cpu_utilization: ``cpu_percent / 100`` divided by the CPUs available to the
            process: 0..1, the OpenTelemetry ``process.cpu.utilization`` convention.
        rss_bytes: resident memory of the process plus its descendants.
        children_rss_bytes: the descendants' share of ``rss_bytes``.
        open_fds: file descriptors open in the process itself (``RLIMIT_NOFILE`` is a
            per-process limit, so descendants are not added).
        threads: native threads of the process itself.
        children: live descendant processes (process-executor workers and their own
            children).
        gc_counts: ``gc.get_count()``: objects tracked per generation since its last
            collection, for this interpreter.
        gc_collections: collections so far per generation, from ``gc.get_stats()``.
    """

    at: float
    cpu_percent: float
    cpu_utilization: float
    rss_bytes: int
    children_rss_bytes: int
    open_fds: int
    threads: int
    children: int
    gc_counts: tuple[int, int, int]
    gc_collections: tuple[int, ...]


class _Reading(NamedTuple):
    cpu_seconds: float
    rss_bytes: int
    open_fds: int
    threads: int
    children: dict[_ChildKey, _ChildReading]


class _Baseline(NamedTuple):
    pid: int
    at: float
    cpu_seconds: float
    children: dict[_ChildKey, _ChildReading]


def _read(path: str) -> bytes:
    """Read a small procfs file with one or a few raw reads (no buffered file object)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        data = os.read(fd, 16384)
        if len(data) < 16384:
            return data
        parts = [data]
        while chunk := os.read(fd, 65536):
            parts.append(chunk)
        return b"".join(parts)
    finally:
        os.close(fd)


def _stat_fields(data: bytes) -> list[bytes]:
    """Split ``/proc/<pid>/stat`` after the command name (which may hold spaces and ')').

    Index 0 is field 3 of proc(5) (state): ppid is 1, utime 11, stime 12, num_threads
    17, starttime 19 and rss (pages) 21.
    """
    return data[data.rindex(b")") + 2 :].split()


def _status_int(data: bytes, key: bytes) -> int | None:
    start = data.find(key)
    if start < 0:
        return None
    end = data.find(b"\n", start)
    return int(data[start + len(key) : end if end >= 0 else None].split()[0])


class _ProcReader:
    """Reads a process and its descendants from a procfs tree rooted anywhere."""

    __slots__ = ("_children_files", "_include_children", "_page", "_real", "_root", "_tick")

    def __init__(self, root: str, probe_pid: int, include_children: bool) -> None:
        self._root = root
        self._tick = 1.0 / os.sysconf("SC_CLK_TCK")
        self._page = os.sysconf("SC_PAGE_SIZE")
        self._include_children = include_children
        # Listing our own fd directory opens one descriptor, which must not be counted.
        self._real = os.path.realpath(root) == _DEFAULT_PROC_ROOT
        # Kernels without CONFIG_PROC_CHILDREN lack task/<tid>/children: scan ppids then.
        self._children_files = os.path.exists(f"{root}/{probe_pid}/task/{probe_pid}/children")

    def read(self, pid: int) -> _Reading:
        base = f"{self._root}/{pid}"
        try:
            fields = _stat_fields(_read(base + "/stat"))
            status = _read(base + "/status")
            open_fds = len(os.listdir(base + "/fd"))
        except (FileNotFoundError, ProcessLookupError) as err:
            raise ProcessLookupError(f"process {pid} is gone ({base} cannot be read)") from err
        if self._real and pid == os.getpid():
            open_fds -= 1
        rss_kb = _status_int(status, b"VmRSS:")
        threads = _status_int(status, b"Threads:")
        if self._include_children:
            children = self._children(pid) if self._children_files else self._scan(pid)
        else:
            children = {}
        return _Reading(
            cpu_seconds=(int(fields[11]) + int(fields[12])) * self._tick,
            rss_bytes=(rss_kb or 0) * 1024,
            open_fds=open_fds,
            threads=threads if threads is not None else int(fields[17]),
            children=children,
        )

    def _entry(self, fields: list[bytes]) -> _ChildReading:
        return (int(fields[11]) + int(fields[12])) * self._tick, int(fields[21]) * self._page

    def _child_pids(self, pid: int) -> list[int]:
        task = f"{self._root}/{pid}/task"
        try:
            tids = os.listdir(task)
        except OSError:  # the process exited meanwhile
            return []
        pids: list[int] = []
        for tid in tids:
            try:
                pids.extend(int(p) for p in _read(f"{task}/{tid}/children").split())
            except OSError:
                continue
        return pids

    def _children(self, pid: int) -> dict[_ChildKey, _ChildReading]:
        found: dict[_ChildKey, _ChildReading] = {}
        seen = {pid}
        pending = self._child_pids(pid)
        while pending:
            child = pending.pop()
            if child in seen:
                continue
            seen.add(child)
            try:
                fields = _stat_fields(_read(f"{self._root}/{child}/stat"))
            except (OSError, ValueError):  # exited between the listing and the read
                continue
            found[(child, int(fields[19]))] = self._entry(fields)
            pending.extend(self._child_pids(child))
        return found

    def _scan(self, pid: int) -> dict[_ChildKey, _ChildReading]:
        """Find descendants by reading every process's ppid (slow; old kernels only)."""
        by_parent: dict[int, list[tuple[int, list[bytes]]]] = {}
        for name in os.listdir(self._root):
            if not name.isdigit():
                continue
            try:
                fields = _stat_fields(_read(f"{self._root}/{name}/stat"))
            except (OSError, ValueError):
                continue
            by_parent.setdefault(int(fields[1]), []).append((int(name), fields))
        found: dict[_ChildKey, _ChildReading] = {}
        seen = {pid}
        pending = [pid]
        while pending:
            for child, fields in by_parent.get(pending.pop(), ()):
                if child not in seen:
                    seen.add(child)
                    found[(child, int(fields[19]))] = self._entry(fields)
                    pending.append(child)
        return found


class _PsutilReader:
    """The same readings through psutil, for platforms without procfs."""

    __slots__ = ("_include_children", "_proc", "_psutil")

    def __init__(self, include_children: bool) -> None:
        try:
            import psutil
        except ImportError as err:
            raise missing_extra("resource sampling without /proc", "all", "psutil", err) from err
        self._psutil: Any = psutil
        self._include_children = include_children
        self._proc: Any = None

    def read(self, pid: int) -> _Reading:
        psutil = self._psutil
        try:
            if self._proc is None or self._proc.pid != pid:
                self._proc = psutil.Process(pid)
            proc = self._proc
            with proc.oneshot():
                times = proc.cpu_times()
                rss = proc.memory_info().rss
                if not hasattr(proc, "num_fds"):  # Windows
                    fds = proc.num_handles()
                elif pid == os.getpid() and os.path.isdir("/proc/self/fd"):
                    fds = proc.num_fds() - 1  # psutil lists /proc/self/fd with one more
                else:
                    fds = proc.num_fds()
                threads = proc.num_threads()
            kids = proc.children(recursive=True) if self._include_children else []
        except psutil.NoSuchProcess as err:
            raise ProcessLookupError(f"process {pid} is gone") from err
        except psutil.Error as err:
            raise PermissionError(f"cannot read process {pid}: {err}") from err
        children: dict[_ChildKey, _ChildReading] = {}
        for kid in kids:
            try:
                with kid.oneshot():
                    kt = kid.cpu_times()
                    key = (kid.pid, int(kid.create_time() * 1000))
                    children[key] = (kt.user + kt.system, kid.memory_info().rss)
            except psutil.Error:  # exited or not ours to read
                continue
        return _Reading(float(times.user + times.system), int(rss), int(fds), int(threads),
                        children)


class _Reader(Protocol):
    def read(self, pid: int) -> _Reading: ...


def _available_cpus() -> int:
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return os.cpu_count() or 1


#: Below this many seconds between samples, CPU use is not measured (10 ms ticks).
_MIN_CPU_INTERVAL = 0.2


class ResourceSampler:
    """Samples CPU, memory, descriptors, threads and GC of a process and its descendants.

    On Linux it reads procfs directly (about 65 µs a sample, see ``docs/resources.md``);
    tests point ``proc_root`` at a fake tree, like prometheus client_python's
    ``ProcessCollector``. Where there is no ``/proc`` it falls back to psutil.

    Args:
        pid: the process to sample; ``None`` means the calling process, looked up at
            each sample so a forked child samples itself.
        proc_root: where procfs is mounted.
        clock: monotonic clock in seconds; the CPU percentage divides by its deltas.
        include_children: also read descendant processes (CPU and resident memory).
        cpu_count: CPUs available to the process, for ``cpu_utilization``; defaults to
            the CPU affinity mask's size.

    Raises:
        ConfigError: ``pid`` has no directory under ``proc_root``, or a bad argument.
    """

    def __init__(
        self,
        pid: int | None = None,
        *,
        proc_root: str | Path = _DEFAULT_PROC_ROOT,
        clock: Callable[[], float] = time.monotonic,
        include_children: bool = True,
        cpu_count: int | None = None,
    ) -> None:
        if pid is not None and pid <= 0:
            raise ConfigError(f"pid must be a positive process id (got pid={pid}); "
                              "pass None to sample the current process")
        if cpu_count is not None and cpu_count < 1:
            raise ConfigError(f"cpu_count must be >= 1 (got cpu_count={cpu_count}); "
                              "pass None to use the CPU affinity mask")
        root = os.fspath(proc_root)
        probe = pid if pid is not None else os.getpid()
        self._reader: _Reader
        if os.path.isdir(f"{root}/{probe}"):
            self._reader = _ProcReader(root, probe, include_children)
        elif root == _DEFAULT_PROC_ROOT and not os.path.isdir(root):
            self._reader = _PsutilReader(include_children)
        else:
            raise ConfigError(f"process {probe} has no directory under proc_root={root!r}; "
                              "pass the pid of a running process and the procfs mount point")
        self._pid = pid
        self._clock = clock
        self._cpus = cpu_count if cpu_count is not None else _available_cpus()
        self._lock = threading.Lock()
        self._last: ResourceSample | None = None
        # A baseline now, so the first sample() reports CPU used since construction.
        at = clock()
        first = self._reader.read(probe)
        self._cpu_last = 0.0
        self._prev = _Baseline(probe, at, first.cpu_seconds, first.children)

    def __repr__(self) -> str:
        return (f"ResourceSampler(pid={self._pid}, reader={type(self._reader).__name__}, "
                f"cpu_count={self._cpus})")

    @property
    def last(self) -> ResourceSample | None:
        """The most recent sample, or ``None`` before the first."""
        return self._last

    def sample(self) -> ResourceSample:
        """Read the process now and return a frozen sample.

        Returns:
            The sample; ``cpu_percent`` covers the time since the previous sample (or
            since construction).

        Raises:
            ProcessLookupError: the sampled process no longer exists.
            PermissionError: the process may not be read by this user.
        """
        pid = self._pid if self._pid is not None else os.getpid()
        at = self._clock()
        reading = self._reader.read(pid)
        gc_counts = gc.get_count()
        gc_collections = tuple(gen["collections"] for gen in gc.get_stats())
        children_rss = 0
        for _, rss in reading.children.values():
            children_rss += rss
        with self._lock:
            prev = self._prev
            cpu_percent = self._cpu_last
            short = prev.pid == pid and at - prev.at < _MIN_CPU_INTERVAL
            if prev.pid == pid and at > prev.at and not short:
                used = max(0.0, reading.cpu_seconds - prev.cpu_seconds)
                before = prev.children
                for key, (cpu, _) in reading.children.items():
                    # A child born since the previous sample counts whole; one that exited
                    # takes its last interval with it (never a negative delta).
                    earlier = before.get(key)
                    used += cpu if earlier is None else max(0.0, cpu - earlier[0])
                # /proc counts CPU in clock ticks (10 ms) and a new child counts whole, so
                # a short interval can read above what the CPUs could do: clamp to that.
                cpu_percent = min(used / (at - prev.at) * 100.0, 100.0 * self._cpus)
                self._cpu_last = cpu_percent
            if not short:  # too short to measure CPU in 10 ms ticks: keep the baseline
                self._prev = _Baseline(pid, at, reading.cpu_seconds, reading.children)
            sample = ResourceSample(
                at=at,
                cpu_percent=cpu_percent,
                cpu_utilization=cpu_percent / 100.0 / self._cpus,
                rss_bytes=reading.rss_bytes + children_rss,
                children_rss_bytes=children_rss,
                open_fds=reading.open_fds,
                threads=reading.threads,
                children=len(reading.children),
                gc_counts=gc_counts,
                gc_collections=gc_collections,
            )
            self._last = sample
        return sample


def _format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


class MemoryGate:
    """Pauses intake while resident memory is above a limit, with hysteresis.

    The gate pauses when ``rss_bytes > limit_bytes`` and resumes once
    ``rss_bytes < limit_bytes * resume_ratio``; between the two marks it keeps its state,
    so intake does not flap around the limit. Producers read :attr:`paused` (a plain
    attribute, no lock) on their hot path and call :meth:`wait_open` only when it is
    true. Pauses are logged on ``pipekit.resources`` as ``intake_paused`` (warning) and
    ``intake_resumed`` (info) events, with the numbers in ``extra={"pipekit": {...}}``.

    Attributes:
        paused: True while intake is paused. Read freely from any thread; only the gate
            writes it.
        limit_bytes: the limit, or ``None`` for a gate that never pauses.
        resume_bytes: the mark below which a paused gate resumes (``None`` without limit).
        resume_ratio: the hysteresis ratio.

    Args:
        limit_bytes: pause above this many resident bytes; ``None`` disables the gate.
        resume_ratio: resume below ``limit_bytes * resume_ratio``; in (0, 1].
        clock: monotonic clock in seconds, for ``paused_seconds``.

    Raises:
        ConfigError: ``limit_bytes`` is not positive or ``resume_ratio`` is outside (0, 1].
    """

    def __init__(
        self,
        limit_bytes: int | None,
        resume_ratio: float = 0.9,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if limit_bytes is not None and limit_bytes <= 0:
            raise ConfigError(f"max_memory_mb must be > 0 (got limit_bytes={limit_bytes}); "
                              "leave it unset for no memory limit")
        if not 0.0 < resume_ratio <= 1.0:
            raise ConfigError(f"memory_resume_ratio must be > 0 and <= 1 (got {resume_ratio}); "
                              "use a value such as 0.9")
        self.paused = False
        self.limit_bytes = limit_bytes
        self.resume_ratio = resume_ratio
        self.resume_bytes = None if limit_bytes is None else limit_bytes * resume_ratio
        self._clock = clock
        self._cond = threading.Condition()
        self._callbacks: list[Callable[[bool, str], None]] = []
        self._reason = ""
        self._pauses = 0
        self._paused_total = 0.0
        self._paused_at = 0.0
        self._closed = False

    @classmethod
    def from_megabytes(
        cls,
        max_memory_mb: float | None,
        resume_ratio: float = 0.9,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> MemoryGate:
        """Build a gate from the ``max_memory_mb`` setting (MiB; ``None`` disables it)."""
        if max_memory_mb is not None and max_memory_mb <= 0:
            raise ConfigError(f"max_memory_mb must be > 0 (got max_memory_mb={max_memory_mb}); "
                              "leave it unset for no memory limit")
        limit = None if max_memory_mb is None else int(max_memory_mb * _MIB)
        return cls(limit, resume_ratio, clock=clock)

    def __repr__(self) -> str:
        return (f"MemoryGate(limit_bytes={self.limit_bytes}, resume_ratio={self.resume_ratio}, "
                f"paused={self.paused})")

    @property
    def reason(self) -> str:
        """Why intake is paused (``"resident memory 1.2 GiB is above max_memory_mb=1024"``),
        or ``""`` when it is not."""
        return self._reason

    @property
    def pauses(self) -> int:
        """How many times the gate has paused intake."""
        return self._pauses

    @property
    def paused_seconds(self) -> float:
        """Total seconds spent paused, the current pause included."""
        with self._cond:
            total = self._paused_total
            if self.paused:
                total += self._clock() - self._paused_at
            return total

    def on_change(self, callback: Callable[[bool, str], None]) -> None:
        """Call ``callback(paused, reason)`` after each pause and resume.

        Callbacks run on the thread that called :meth:`update` (the monitor thread),
        outside the gate's lock; an exception from one is logged and ignored.
        """
        with self._cond:
            self._callbacks.append(callback)

    def update(self, rss_bytes: int) -> bool:
        """Feed a resident-memory reading; pause or resume intake as the marks say.

        Args:
            rss_bytes: resident bytes of the process and its descendants.

        Returns:
            Whether intake is paused after this reading.
        """
        limit = self.limit_bytes
        if limit is None or self._closed:
            return False
        with self._cond:
            changed = False
            if not self.paused and rss_bytes > limit:
                self._paused_at = self._clock()
                self._pauses += 1
                self.paused = changed = True
            elif self.paused and self.resume_bytes is not None and rss_bytes < self.resume_bytes:
                self._paused_total += self._clock() - self._paused_at
                self.paused = False
                changed = True
                self._cond.notify_all()
            self._reason = (f"resident memory {_format_bytes(rss_bytes)} is above "
                            f"max_memory_mb={limit / _MIB:g}") if self.paused else ""
            paused, reason = self.paused, self._reason
        if changed:
            self._announce(paused, reason, rss_bytes)
        return paused

    def wait_open(self, timeout: float | None = None) -> bool:
        """Block while intake is paused.

        Args:
            timeout: seconds to wait at most; ``None`` waits until the gate opens.

        Returns:
            True when intake is open, False when the timeout passed first.
        """
        if not self.paused:
            return True
        with self._cond:
            return self._cond.wait_for(lambda: not self.paused, timeout)

    def close(self) -> None:
        """Stop gating for good: open the gate and wake every waiting producer.

        The pipeline calls this at shutdown so blocked producers return and see that
        intake is closed; later :meth:`update` calls do nothing.
        """
        with self._cond:
            self._closed = True
            was_paused = self.paused
            if was_paused:
                self._paused_total += self._clock() - self._paused_at
                self.paused = False
                self._reason = ""
            self._cond.notify_all()
        if was_paused:
            self._notify(False, "")

    def _announce(self, paused: bool, reason: str, rss_bytes: int) -> None:
        info = {"rss_bytes": rss_bytes, "limit_bytes": self.limit_bytes,
                "resume_bytes": self.resume_bytes}
        if paused:
            logger.warning("intake paused: %s", reason,
                           extra={"pipekit": {"event": "intake_paused", **info}})
        else:
            logger.info("intake resumed: resident memory %s is below %s "
                        "(memory_resume_ratio=%g of max_memory_mb)",
                        _format_bytes(rss_bytes), _format_bytes(self.resume_bytes or 0),
                        self.resume_ratio,
                        extra={"pipekit": {"event": "intake_resumed", **info}})
        self._notify(paused, reason)

    def _notify(self, paused: bool, reason: str) -> None:
        with self._cond:
            callbacks = list(self._callbacks)
        for callback in callbacks:
            try:
                callback(paused, reason)
            except Exception:
                logger.exception("memory gate callback %r raised", callback)


def _count_open_fds() -> int | None:
    for directory in ("/proc/self/fd", "/dev/fd"):
        try:
            return len(os.listdir(directory)) - 1  # minus the listing's own descriptor
        except OSError:
            continue
    return None


def apply_open_files_limit(n: int | None) -> tuple[int, int] | None:
    """Set the soft ``RLIMIT_NOFILE`` to ``max_open_files``; the hard limit is never touched.

    Lowering is allowed as long as ``n`` leaves at least 32 descriptors free above those
    open now (a lower value would make the next ``open()`` fail with ``EMFILE``); a
    value above the hard limit is an error rather than an attempt to raise the hard limit.

    Args:
        n: the new soft limit, or ``None`` to leave the limit alone.

    Returns:
        The previous ``(soft, hard)`` limits, for :func:`restore_open_files_limit` at
        shutdown, or ``None`` when ``n`` is ``None``.

    Raises:
        ConfigError: ``n`` is not a positive integer, is above the hard limit, leaves too
            few free descriptors, or the platform has no ``RLIMIT_NOFILE``.
    """
    if n is None:
        return None
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ConfigError(f"max_open_files must be a positive integer (got {n!r}); "
                          "leave it unset to keep the current limit")
    try:
        import resource
    except ImportError as err:
        raise ConfigError(f"max_open_files={n} is not supported on this platform "
                          "(no RLIMIT_NOFILE); leave it unset") from err
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and n > hard:
        raise ConfigError(
            f"max_open_files={n} is above the hard RLIMIT_NOFILE limit {hard}; set "
            f"max_open_files <= {hard}, or raise the hard limit before starting "
            "(ulimit -Hn, LimitNOFILE= in systemd, --ulimit nofile= in docker)")
    in_use = _count_open_fds()
    if in_use is not None and n < in_use + _FD_HEADROOM:
        raise ConfigError(
            f"max_open_files={n} leaves fewer than {_FD_HEADROOM} free file descriptors "
            f"({in_use} are open now); set max_open_files >= {in_use + _FD_HEADROOM}")
    if n != soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (n, hard))
        except (ValueError, OSError) as err:
            raise ConfigError(f"max_open_files={n} was refused by the system ({err}); "
                              f"set a value <= the hard limit {hard}") from err
    return soft, hard


def restore_open_files_limit(previous: tuple[int, int] | None) -> bool:
    """Put back the soft ``RLIMIT_NOFILE`` returned by :func:`apply_open_files_limit`.

    Meant for shutdown, so it logs instead of raising.

    Args:
        previous: the ``(soft, hard)`` pair to restore, or ``None`` (nothing to do).

    Returns:
        True when the limit is restored (or there was nothing to do).
    """
    if previous is None:
        return True
    try:
        import resource

        hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
        soft = previous[0] if hard == resource.RLIM_INFINITY else min(previous[0], hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    except (ImportError, ValueError, OSError) as err:
        logger.warning("could not restore RLIMIT_NOFILE to %s: %s", previous, err)
        return False
    return True


class _SupportsSample(Protocol):
    def sample(self) -> ResourceSample: ...


class ResourceMonitor:
    """Samples on a timer in a daemon thread, drives the memory gate, flags CPU overuse.

    Args:
        sampler: anything with ``sample() -> ResourceSample``, usually a
            :class:`ResourceSampler`.
        gate: the memory gate to update with each sample's ``rss_bytes``, or ``None``.
        interval: seconds (or a ``timedelta``) between samples.
        on_sample: called with each sample on the monitor thread; errors are logged.
        clock: monotonic clock in seconds, used to keep the timer from drifting.
        cpu_limit_percent: ``max_cpu_percent``, in the units of
            :attr:`ResourceSample.cpu_percent` (100 = one core); published for the
            autoscaler as :attr:`cpu_over_limit`. ``None`` for no limit.

    Raises:
        ConfigError: ``interval`` or ``cpu_limit_percent`` is not positive.
    """

    def __init__(
        self,
        sampler: _SupportsSample,
        gate: MemoryGate | None = None,
        interval: float | timedelta = 1.0,
        *,
        on_sample: Callable[[ResourceSample], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
        cpu_limit_percent: float | None = None,
    ) -> None:
        seconds = interval.total_seconds() if isinstance(interval, timedelta) else interval
        if not seconds > 0:
            raise ConfigError(f"metrics interval must be > 0 seconds (got {interval!r}); "
                              "use a value such as 1.0")
        if cpu_limit_percent is not None and not cpu_limit_percent > 0:
            raise ConfigError(f"max_cpu_percent must be > 0 (got {cpu_limit_percent}); "
                              "100 means one core, leave it unset for no limit")
        self._sampler = sampler
        self._gate = gate
        self._interval = float(seconds)
        self._on_sample = on_sample
        self._clock = clock
        self._cpu_limit = cpu_limit_percent
        self._latest: ResourceSample | None = None
        self._cpu_over = False
        self._errors = 0
        self._failing = False
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __repr__(self) -> str:
        return (f"ResourceMonitor(interval={self._interval}, "
                f"cpu_limit_percent={self._cpu_limit}, running={self.running})")

    @property
    def latest(self) -> ResourceSample | None:
        """The most recent successful sample, or ``None`` before the first."""
        return self._latest

    @property
    def cpu_over_limit(self) -> bool:
        """True when the latest sample's ``cpu_percent`` is above ``cpu_limit_percent``."""
        return self._cpu_over

    @property
    def cpu_limit_percent(self) -> float | None:
        """The ``max_cpu_percent`` published for the autoscaler (100 = one core)."""
        return self._cpu_limit

    @property
    def interval(self) -> float:
        """Seconds between samples."""
        return self._interval

    @property
    def errors(self) -> int:
        """Rounds in which the sampler or ``on_sample`` raised."""
        return self._errors

    @property
    def running(self) -> bool:
        """True while the monitor thread is alive."""
        thread = self._thread
        return thread is not None and thread.is_alive()

    def tick(self) -> ResourceSample | None:
        """Do one round now, on the calling thread: sample, update the gate, report.

        Returns:
            The new sample, or ``None`` when the sampler raised (the error is logged and
            counted in :attr:`errors`; the gate keeps its state).
        """
        try:
            sample = self._sampler.sample()
        except Exception:
            self._failed("sampling resources failed")
            return None
        if self._gate is not None:
            self._gate.update(sample.rss_bytes)
        self._cpu_over = self._cpu_limit is not None and sample.cpu_percent > self._cpu_limit
        self._latest = sample
        if self._on_sample is not None:
            try:
                self._on_sample(sample)
            except Exception:
                self._failed(f"resource on_sample callback {self._on_sample!r} raised")
                return sample
        if self._failing:
            self._failing = False
            logger.info("resource sampling recovered after %d errors", self._errors)
        return sample

    def _failed(self, message: str) -> None:
        self._errors += 1
        if self._failing:  # one traceback per streak of failures, not one per interval
            logger.debug(message, exc_info=True)
        else:
            self._failing = True
            logger.warning(message, exc_info=True)

    def start(self) -> None:
        """Start the ``pipekit-resources`` daemon thread; it samples at once, then every
        ``interval`` seconds.

        Raises:
            PipelineStateError: the monitor is already running.
        """
        with self._lock:
            if self.running:
                raise PipelineStateError("resource monitor is already running; "
                                         "call stop() before start()")
            self._stop = threading.Event()
            self._thread = threading.Thread(target=self._run, args=(self._stop,),
                                            name="pipekit-resources", daemon=True)
            self._thread.start()

    def stop(self, timeout: float | None = None) -> bool:
        """Stop the thread and join it.

        Args:
            timeout: seconds to wait for the thread; ``None`` waits until it ends.

        Returns:
            True when the thread has ended (or never ran).
        """
        with self._lock:
            self._stop.set()
            thread = self._thread
        if thread is None:
            return True
        if thread is not threading.current_thread():
            thread.join(timeout)
        return not thread.is_alive()

    def __enter__(self) -> ResourceMonitor:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def _run(self, stop: threading.Event) -> None:
        clock, interval = self._clock, self._interval
        next_at = clock()
        while True:
            try:
                self.tick()
            except Exception:  # tick() already guards; this keeps the thread alive regardless
                self._failed("resource monitor round failed")
            next_at += interval
            delay = next_at - clock()
            if delay < 0:  # a round overran: skip the missed slots instead of bursting
                next_at = clock() + interval
                delay = interval
            if stop.wait(delay):
                return
