"""The profiler a run owns: one CPU and one heap profile at a time, written to the store.

How the pieces meet::

    cpu(seconds) / heap(seconds)          blocking: start, wait, stop, return the record
    spawn(kind, seconds, trigger=...)     the same in a background thread that only logs
    start_cpu() / start_heap() -> handle  open-ended; handle.stop() writes the files
    start_run_profiles(kinds)             whole-run handles, ended by stop_run_profiles()
    close()                               ends everything early (each profile is kept)

    start:  check arguments -> take the kind's slot (else ProfilerBusyError) -> note
            trace id and stage stats -> reserve an id in the store, write metadata
            ("complete": false) -> start py-spy (wait until it samples) or the tracker
    stop:   SIGINT py-spy / close the tracker -> free the slot -> wait for py-spy's file,
            draw the SVG / summarise and draw memray's HTML -> final metadata ->
            retention -> record

A failure to produce the main file (speedscope JSON, memray capture) raises
:class:`ProfilerError`; a failure of a derived file (SVG, HTML, summary) is logged and
listed under ``warnings`` in the metadata, and the record is still returned.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import os
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Final

from pipekit.errors import ConfigError, ProfilerBusyError, ProfilerError
from pipekit.profiling.cpu import PySpySession, find_py_spy, write_cpu_outputs
from pipekit.profiling.heap import HeapSession, write_heap_outputs
from pipekit.profiling.limits import check_kind, check_rate, check_seconds
from pipekit.profiling.store import KINDS, ProfileRecord, ProfileStore, check_trigger

__all__ = ["ProfileHandle", "Profiler", "current_trace_id"]

_log = logging.getLogger("pipekit.profiling")

_ATTACH_TIMEOUT: Final = 15.0


def current_trace_id() -> str | None:
    """Return the 32-hex-digit id of the trace active in this context, or ``None``."""
    try:
        from opentelemetry import trace

        ctx = trace.get_current_span().get_span_context()
        return trace.format_trace_id(ctx.trace_id) if ctx.is_valid else None
    except Exception:  # telemetry never raises into the profiler
        _log.debug("could not read the current trace id", exc_info=True)
        return None


@dataclass(slots=True, kw_only=True)
class _Active:
    """Mutable state of one profile from start to record (guarded by its own lock)."""

    kind: str
    trigger: str
    profile_id: str
    folder: Path
    started_at: datetime
    t0: float
    metadata: dict[str, Any]
    session: PySpySession | HeapSession
    lock: threading.Lock = field(default_factory=threading.Lock)
    duration: float | None = None
    record: ProfileRecord | None = None


class ProfileHandle:
    """A running profile; :meth:`stop` ends it and returns its record.

    Handles come from :meth:`Profiler.start_cpu` and :meth:`Profiler.start_heap`. Stopping
    twice returns the same record.
    """

    __slots__ = ("_active", "_profiler")

    def __init__(self, profiler: Profiler, active: _Active) -> None:
        self._profiler = profiler
        self._active = active

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"<ProfileHandle {self.id} {state}>"

    @property
    def id(self) -> str:
        """The profile id."""
        return self._active.profile_id

    @property
    def kind(self) -> str:
        """``"cpu"`` or ``"heap"``."""
        return self._active.kind

    @property
    def started_at(self) -> datetime:
        """When the profile started (UTC)."""
        return self._active.started_at

    @property
    def running(self) -> bool:
        """True until the profile is stopped."""
        return self._active.duration is None

    def stop(self, timeout: float | None = 60.0) -> ProfileRecord:
        """Stop the profile, write its files and return its record.

        Args:
            timeout: seconds allowed for writing the files (``None``: no limit).

        Raises:
            ProfilerError: the main file could not be written.
        """
        return self._profiler._finish(self._active, timeout)


class Profiler:
    """Takes CPU (py-spy) and heap (memray) profiles of one pipeline into a store.

    Thread-safe. One CPU and one heap profile may run at once; another request for a
    busy kind raises :class:`ProfilerBusyError`.

    Args:
        store: where the files go.
        pipeline: the pipeline name (recorded as given; its folder name is sanitised).
        rate: default CPU sampling rate in samples per second (1 to 1000).
        max_seconds: the longest profile a caller may ask for (``profiling_max_seconds``).
        pid: the process to sample with py-spy (default: this one).
        subprocesses: sample the pid's child processes too (process-executor workers).
        idle: include waiting threads in CPU profiles (default: only running ones).
        stats_provider: returns the stage stats (plain data) recorded with each profile;
            it must not raise, and if it does the stats are recorded as ``None``.
        py_spy: the py-spy executable (default: :func:`find_py_spy` at each request).
        offline_html: embed memray's scripts in heap HTML (about 4.5 MB per file) so it
            opens without network access.
        finish_timeout: seconds a blocking profile allows for writing its files.

    Raises:
        ConfigError: ``rate`` or ``max_seconds`` is out of range.
    """

    def __init__(
        self,
        store: ProfileStore,
        *,
        pipeline: str,
        rate: int = 100,
        max_seconds: float = 300.0,
        pid: int | None = None,
        subprocesses: bool = True,
        idle: bool = False,
        stats_provider: Callable[[], Mapping[str, Any] | list[Any]] | None = None,
        py_spy: str | os.PathLike[str] | None = None,
        offline_html: bool = False,
        finish_timeout: float = 60.0,
    ) -> None:
        if (
            isinstance(max_seconds, bool)
            or not isinstance(max_seconds, int | float)
            or not math.isfinite(max_seconds)
            or max_seconds <= 0
        ):
            raise ConfigError(
                f"profiling_max_seconds must be a finite number > 0 (got {max_seconds!r})"
            )
        self._store = store
        self._pipeline = pipeline
        self._rate = check_rate(rate)
        self._max_seconds = float(max_seconds)
        self._pid = os.getpid() if pid is None else pid
        self._subprocesses = subprocesses
        self._idle = idle
        self._stats_provider = stats_provider
        self._py_spy = None if py_spy is None else Path(py_spy)
        self._offline_html = offline_html
        self._finish_timeout = finish_timeout
        # Re-entrant: a signal handler on the main thread may call stop_run_profiles()
        # while that thread is inside one of the short sections below.
        self._lock = threading.RLock()
        self._slots: dict[str, _Active | None] = {}
        self._run_handles: dict[str, ProfileHandle] = {}
        self._records: list[ProfileRecord] = []
        self._closing = threading.Event()

    def __repr__(self) -> str:
        return (
            f"Profiler(pipeline={self._pipeline!r}, rate={self._rate}, "
            f"max_seconds={self._max_seconds:g}, pid={self._pid}, store={self._store!r})"
        )

    @property
    def store(self) -> ProfileStore:
        """The store profiles are written to."""
        return self._store

    @property
    def max_seconds(self) -> float:
        """The longest profile a caller may ask for."""
        return self._max_seconds

    def busy(self, kind: str) -> bool:
        """Tell whether a profile of ``kind`` (``"cpu"`` or ``"heap"``) is running.

        Raises:
            ConfigError: ``kind`` is unknown.
        """
        check_kind(kind)
        with self._lock:
            return kind in self._slots

    def records(self) -> list[ProfileRecord]:
        """Return the profiles this profiler has written, oldest first."""
        with self._lock:
            return list(self._records)

    # -- blocking profiles -----------------------------------------------------------

    def cpu(
        self,
        seconds: float | timedelta,
        *,
        rate: int | None = None,
        trigger: str = "api",
        metadata: Mapping[str, Any] | None = None,
    ) -> ProfileRecord:
        """Sample the process with py-spy for ``seconds`` and return the record.

        Args:
            seconds: how long to sample, in ``(0, max_seconds]``.
            rate: samples per second (default: the profiler's rate).
            trigger: what asked: ``"api"``, ``"ops"``, ``"signal"``...
            metadata: extra JSON-ready data stored under ``extra`` in the metadata.

        Returns:
            The record, with ``speedscope``, ``svg`` and ``meta`` files.

        Raises:
            ConfigError: ``seconds``, ``rate`` or ``trigger`` is invalid.
            ProfilerBusyError: a CPU profile is already running.
            ProfilerError: py-spy is missing, may not attach, or failed.
        """
        wait = check_seconds(seconds, self._max_seconds)
        handle = self.start_cpu(rate=rate, trigger=trigger, metadata=metadata, _requested=wait)
        return self._wait_and_stop(handle, wait)

    def heap(
        self,
        seconds: float | timedelta,
        *,
        trigger: str = "api",
        metadata: Mapping[str, Any] | None = None,
    ) -> ProfileRecord:
        """Track allocations with memray for ``seconds`` and return the record.

        Args:
            seconds: how long to track, in ``(0, max_seconds]``.
            trigger: what asked: ``"api"``, ``"ops"``, ``"signal"``...
            metadata: extra JSON-ready data stored under ``extra`` in the metadata.

        Returns:
            The record, with ``bin``, ``html``, ``summary`` and ``meta`` files.

        Raises:
            ConfigError: ``seconds`` or ``trigger`` is invalid.
            ProfilerBusyError: a heap profile is already running.
            MissingExtraError: memray is not installed.
            ProfilerError: the capture could not be written.
        """
        wait = check_seconds(seconds, self._max_seconds)
        handle = self.start_heap(trigger=trigger, metadata=metadata, _requested=wait)
        return self._wait_and_stop(handle, wait)

    def spawn(
        self, kind: str, seconds: float | timedelta, *, trigger: str = "signal"
    ) -> threading.Thread:
        """Take a profile in a background thread that logs its outcome and never raises.

        Meant for a signal handler: it returns at once. Arguments are checked here; busy,
        missing-tool and attach failures are logged as warnings by the thread.

        Args:
            kind: ``"cpu"`` or ``"heap"``.
            seconds: how long to profile, in ``(0, max_seconds]``.
            trigger: what asked (default ``"signal"``).

        Returns:
            The started thread (named ``pipekit-profiler-<kind>``).

        Raises:
            ConfigError: ``kind``, ``seconds`` or ``trigger`` is invalid.
        """
        check_kind(kind)
        wait = check_seconds(seconds, self._max_seconds)
        check_trigger(trigger)
        take = self.cpu if kind == "cpu" else self.heap

        def run() -> None:
            try:
                record = take(wait, trigger=trigger)
            except Exception as err:  # background work: log, never raise
                _log.warning("%s profile (%s) not taken: %s", kind, trigger, err)
            else:
                _log.info("%s profile %s written: %s", kind, record.id,
                          ", ".join(str(p) for p in record.files.values()))

        thread = threading.Thread(target=run, name=f"pipekit-profiler-{kind}", daemon=True)
        thread.start()
        return thread

    # -- open-ended profiles ---------------------------------------------------------

    def start_cpu(
        self,
        *,
        rate: int | None = None,
        trigger: str = "run",
        metadata: Mapping[str, Any] | None = None,
        _requested: float | None = None,
    ) -> ProfileHandle:
        """Start py-spy and return once it samples; the handle's ``stop()`` ends it.

        Raises:
            ConfigError: ``rate`` or ``trigger`` is invalid.
            ProfilerBusyError: a CPU profile is already running.
            ProfilerError: py-spy is missing, may not attach, or failed.
        """
        use_rate = self._rate if rate is None else check_rate(rate)
        check_trigger(trigger)
        executable = self._py_spy
        extra = {"rate": use_rate, "subprocesses": self._subprocesses, "idle": self._idle}

        def session(folder: Path, profile_id: str) -> PySpySession:
            exe = find_py_spy() if executable is None else executable
            return PySpySession(
                exe, pid=self._pid, rate=use_rate, subprocesses=self._subprocesses,
                idle=self._idle, output=self._store.path(folder, profile_id, "speedscope"),
            )

        return self._start(kind="cpu", trigger=trigger, metadata=metadata, requested=_requested,
                           extra=extra, make_session=session)

    def start_heap(
        self,
        *,
        trigger: str = "run",
        metadata: Mapping[str, Any] | None = None,
        _requested: float | None = None,
    ) -> ProfileHandle:
        """Start a memray tracker; the handle's ``stop()`` ends it.

        Raises:
            ConfigError: ``trigger`` is invalid.
            ProfilerBusyError: a heap profile is already running (here or elsewhere in the
                process).
            MissingExtraError: memray is not installed.
            ProfilerError: the capture file could not be created.
        """
        check_trigger(trigger)

        def session(folder: Path, profile_id: str) -> HeapSession:
            return HeapSession(self._store.path(folder, profile_id, "bin"))

        return self._start(kind="heap", trigger=trigger, metadata=metadata, requested=_requested,
                           extra={"rate": None}, make_session=session)

    def start_run_profiles(self, kinds: Iterable[str], *, rate: int | None = None) -> None:
        """Start whole-run profiles (trigger ``"run"``), ended by :meth:`stop_run_profiles`.

        Each kind is tried even if another fails; the first failure is then raised and the
        rest are logged. Profiles that did start keep running.

        Args:
            kinds: any of ``"cpu"`` and ``"heap"`` (heap slows Python code about 4 times).
            rate: CPU sampling rate (default: the profiler's rate).

        Raises:
            ConfigError: an unknown kind or bad rate.
            ProfilerBusyError: a profile of that kind is already running.
            ProfilerError: py-spy is missing or may not attach.
            MissingExtraError: memray is not installed.
        """
        wanted = list(dict.fromkeys(check_kind(k) for k in kinds))
        if rate is not None:
            check_rate(rate)
        errors: list[Exception] = []
        for kind in wanted:
            try:
                if kind == "cpu":
                    handle = self.start_cpu(rate=rate, trigger="run")
                else:
                    handle = self.start_heap(trigger="run")
            except Exception as err:  # collected: the other kind still starts
                errors.append(err)
                continue
            with self._lock:
                self._run_handles[kind] = handle
        for later in errors[1:]:
            _log.warning("whole-run profile not started: %s", later)
        if errors:
            raise errors[0]

    def stop_run_profiles(self, timeout: float | None = 60.0) -> list[ProfileRecord]:
        """Stop the whole-run profiles and write their files.

        Both captures are stopped first, then their files are written within ``timeout``.
        Failures are logged, never raised, so this is safe at shutdown.

        Args:
            timeout: seconds for writing all files (``None``: no limit).

        Returns:
            The records written (none when no whole-run profile was running).
        """
        with self._lock:
            handles = list(self._run_handles.values())
            self._run_handles.clear()
        deadline = None if timeout is None else time.monotonic() + timeout
        for handle in handles:
            try:
                self._halt(handle._active)
            except Exception as err:  # shutdown path: log, never raise
                _log.warning("whole-run %s profile %s did not stop cleanly: %s",
                             handle.kind, handle.id, err)
        records: list[ProfileRecord] = []
        for handle in handles:
            left = None if deadline is None else max(deadline - time.monotonic(), 0.0)
            try:
                records.append(handle.stop(left))
            except Exception as err:  # shutdown path: log, never raise
                _log.warning("whole-run %s profile %s not written: %s",
                             handle.kind, handle.id, err)
        return records

    def close(self, timeout: float | None = 60.0) -> list[ProfileRecord]:
        """End every profile early and refuse new ones.

        Blocking profiles still running return early with what they sampled; whole-run
        profiles are stopped as by :meth:`stop_run_profiles`.

        Returns:
            The whole-run records written.
        """
        self._closing.set()
        return self.stop_run_profiles(timeout)

    # -- internals -------------------------------------------------------------------

    def _wait_and_stop(self, handle: ProfileHandle, seconds: float) -> ProfileRecord:
        try:
            self._closing.wait(max(seconds - (time.monotonic() - handle._active.t0), 0.0))
        finally:
            record = handle.stop(self._finish_timeout)
        return record

    def _start(
        self,
        *,
        kind: str,
        trigger: str,
        metadata: Mapping[str, Any] | None,
        requested: float | None,
        extra: dict[str, Any],
        make_session: Callable[[Path, str], PySpySession | HeapSession],
    ) -> ProfileHandle:
        trace_id = current_trace_id()
        with self._lock:
            if self._closing.is_set():
                raise ProfilerError(
                    f"the profiler of pipeline {self._pipeline!r} is closed; start a new run"
                )
            if kind in self._slots:
                raise ProfilerBusyError(
                    f"a {kind} profile is already running for pipeline {self._pipeline!r}; "
                    f"wait for it to finish (one {kind} profile at a time)"
                )
            self._slots[kind] = None
        folder: Path | None = None
        session: PySpySession | HeapSession | None = None
        profile_id = ""
        try:
            started_at = datetime.now(UTC)
            profile_id, folder = self._store.create(
                pipeline=self._pipeline, kind=kind, trigger=trigger, started_at=started_at
            )
            meta = {
                "id": profile_id, "pipeline": self._pipeline, "kind": kind,
                "trigger": trigger, "pid": self._pid, "trace_id": trace_id,
                "requested_seconds": requested, "max_seconds": self._max_seconds,
                "stages": self._stats(), "extra": dict(metadata or {}), **extra,
            }
            session = make_session(folder, profile_id)
            self._store.write_metadata(folder, profile_id, self._meta(meta, started_at))
            if isinstance(session, PySpySession):
                session.start(_ATTACH_TIMEOUT)
            else:
                session.start()
            started_at = datetime.now(UTC)
            active = _Active(
                kind=kind, trigger=trigger, profile_id=profile_id, folder=folder,
                started_at=started_at, t0=time.monotonic(), metadata=meta, session=session,
            )
            self._store.write_metadata(folder, profile_id, self._meta(meta, started_at))
        except BaseException:
            with self._lock:
                self._slots.pop(kind, None)
            if isinstance(session, PySpySession):
                session.kill()
            elif session is not None:
                with contextlib.suppress(ProfilerError):
                    session.stop()
            if folder is not None:
                self._remove(folder, profile_id)
            raise
        with self._lock:
            self._slots[kind] = active
        return ProfileHandle(self, active)

    def _halt(self, active: _Active) -> None:
        """Stop capturing (idempotent); the files are written by ``_finish``."""
        with self._lock:
            if active.duration is not None:
                return
            active.duration = time.monotonic() - active.t0
        if isinstance(active.session, PySpySession):
            active.session.request_stop()
            return
        try:
            active.session.stop()
        finally:
            self._release(active)

    def _finish(self, active: _Active, timeout: float | None) -> ProfileRecord:
        with active.lock:
            if active.record is not None:
                return active.record
            deadline = None if timeout is None else time.monotonic() + timeout
            warnings: list[str] = []
            meta = dict(active.metadata)
            try:
                self._halt(active)
                if isinstance(active.session, PySpySession):
                    self._finish_cpu(active, deadline, meta, warnings)
                else:
                    self._finish_heap(active, deadline, meta, warnings)
            except ProfilerError as err:
                meta.update(complete=False, error=str(err), duration=active.duration)
                with contextlib.suppress(ProfilerError):
                    self._store.write_metadata(
                        active.folder, active.profile_id, self._meta(meta, active.started_at)
                    )
                raise
            finally:
                self._release(active)
            for w in warnings:
                _log.warning("profile %s: %s", active.profile_id, w)
            meta.update(
                complete=True, duration=active.duration, warnings=warnings,
                stages_at_stop=self._stats(),
                finished_at=datetime.now(UTC).isoformat(),
            )
            self._store.write_metadata(
                active.folder, active.profile_id, self._meta(meta, active.started_at)
            )
            with self._lock:
                protect = {a.profile_id for a in self._slots.values() if a is not None}
            self._store.enforce_retention(protect | {active.profile_id})
            record = self._store.find(active.profile_id)
            if record is None:
                raise ProfilerError(
                    f"profile {active.profile_id} vanished from {str(active.folder)!r} "
                    f"while it was written; check what else cleans that folder"
                )
            active.record = record
            with self._lock:
                self._records.append(record)
            return record

    def _finish_cpu(
        self, active: _Active, deadline: float | None, meta: dict[str, Any], warnings: list[str]
    ) -> None:
        session = active.session
        assert isinstance(session, PySpySession)
        session.wait(_left(deadline, default=3600.0))
        self._release(active)
        found, problems = write_cpu_outputs(
            session.output, self._store.path(active.folder, active.profile_id, "svg"),
            title=f"{self._pipeline}: CPU profile {active.profile_id}",
        )
        meta.update(found)
        warnings.extend(problems)

    def _finish_heap(
        self, active: _Active, deadline: float | None, meta: dict[str, Any], warnings: list[str]
    ) -> None:
        path = functools.partial(self._store.path, active.folder, active.profile_id)
        found, problems = write_heap_outputs(
            path("bin"), summary=path("summary"), html=path("html"),
            duration=active.duration, timeout=_left(deadline, default=600.0),
            offline=self._offline_html,
        )
        meta.update(found)
        warnings.extend(problems)

    def _release(self, active: _Active) -> None:
        with self._lock:
            if self._slots.get(active.kind) is active:
                del self._slots[active.kind]

    def _stats(self) -> Any:
        if self._stats_provider is None:
            return None
        try:
            return self._stats_provider()
        except Exception:  # the caller's snapshot must never break a profile
            _log.warning("stats_provider raised; stage stats not recorded", exc_info=True)
            return None

    def _meta(self, meta: Mapping[str, Any], started_at: datetime) -> dict[str, Any]:
        out = {"complete": False, "duration": None, **meta}
        out["started_at"] = started_at.isoformat()
        return out

    def _remove(self, folder: Path, profile_id: str) -> None:
        for artifact in KINDS["cpu"] + KINDS["heap"]:
            with contextlib.suppress(OSError):
                self._store.path(folder, profile_id, artifact).unlink()


def _left(deadline: float | None, *, default: float) -> float:
    return default if deadline is None else max(deadline - time.monotonic(), 0.0)
