"""CPU profiles with py-spy, sampling this process from outside.

``py-spy record`` runs as a child process, attached to the pipeline's pid, with
``--threads`` (a root frame per thread, named ``pipekit-<stage>-<n>`` for stage workers),
``--subprocesses`` (process-executor children too) and ``--nonblocking`` (the target is
not paused for each sample: about 4 % throughput lost at 100 Hz, against about 9 % when
it is). It runs without ``--duration``: pipekit sends SIGINT when the profile should end,
and py-spy then writes its speedscope file and exits. The same path serves a blocking
profile of N seconds and a whole-run profile stopped at shutdown; py-spy also writes its
file on its own if the pipeline process dies first.

py-spy runs in its own session so that a Ctrl-C on the terminal reaches only pipekit,
which then stops it in order. Under Yama ``ptrace_scope`` 1 a child may not read its
parent's memory; :func:`allow_profiler_attach` declares this process traceable by its own
descendants (``PR_SET_PTRACER``), which is exactly the py-spy child.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Final

from pipekit.errors import ProfilerError
from pipekit.profiling.flamegraph import render_svg

__all__ = ["PySpySession", "allow_profiler_attach", "find_py_spy", "write_cpu_outputs"]

_log = logging.getLogger("pipekit.profiling")

_SAMPLING_MARK: Final = "Sampling process"
_PERMISSION_RE: Final = re.compile(
    r"permission denied|operation not permitted|os error 1\b|os error 13\b|sys_ptrace",
    re.IGNORECASE,
)
_NOT_FOUND_RE: Final = re.compile(
    r"no such process|failed to get process executable|os error 3\b", re.IGNORECASE
)
_PR_SET_PTRACER: Final = 0x59616D61
_YAMA_SCOPE: Final = Path("/proc/sys/kernel/yama/ptrace_scope")
_PTRACE_FIX: Final = (
    "allow ptrace: in a container run it with --cap-add SYS_PTRACE (Kubernetes: "
    "securityContext.capabilities.add: [SYS_PTRACE]); on the host set "
    "/proc/sys/kernel/yama/ptrace_scope to 1 or 0 (echo 1 | sudo tee "
    "/proc/sys/kernel/yama/ptrace_scope), or run as root"
)


def find_py_spy(*, python: str | None = None, path: str | None = None) -> Path:
    """Locate the py-spy executable.

    The ``py-spy`` wheel installs it beside the interpreter, so that is looked at first
    (a virtualenv need not be activated), then ``PATH``.

    Args:
        python: the interpreter whose folder is searched (default :data:`sys.executable`).
        path: the search path for the fallback (default the ``PATH`` variable).

    Returns:
        The path of the executable.

    Raises:
        ProfilerError: py-spy is in neither place; the message says how to install it.
    """
    interpreter = sys.executable if python is None else python
    if interpreter:
        beside = Path(interpreter).parent / "py-spy"
        if beside.is_file() and os.access(beside, os.X_OK):
            return beside
    found = shutil.which("py-spy", path=path)
    if found:
        return Path(found)
    where = f"next to {interpreter}" if interpreter else "next to the interpreter"
    raise ProfilerError(
        f"cpu profiling needs the py-spy executable, found neither {where} nor on PATH; "
        f"install it with: pip install 'pipekit[profiling]' (or pip install py-spy)"
    )


def allow_profiler_attach(ancestor_pid: int | None = None) -> bool:
    """Let descendants of ``ancestor_pid`` read this process's memory under Yama scope 1.

    With ``/proc/sys/kernel/yama/ptrace_scope`` at 1 (the default on many distributions)
    a process may trace only its own descendants, so py-spy started by the pipeline could
    not read the pipeline. This calls ``prctl(PR_SET_PTRACER, ancestor_pid)``, which allows
    tracing by ``ancestor_pid`` and its descendants only. A process-executor worker can call
    it with its parent's pid (``os.getppid()``) so that ``--subprocesses`` reaches it too.
    Nothing is done when Yama is absent or its scope is not 1.

    Args:
        ancestor_pid: the process whose descendants may attach (default: this process).

    Returns:
        True when the permission was set, False when it was not needed or not possible.
    """
    try:
        scope = _YAMA_SCOPE.read_text().strip()
    except OSError:
        return False
    if scope != "1" or not sys.platform.startswith("linux"):
        return False
    import ctypes

    pid = os.getpid() if ancestor_pid is None else ancestor_pid
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        ok = int(libc.prctl(_PR_SET_PTRACER, ctypes.c_ulong(pid), 0, 0, 0)) == 0
    except (OSError, AttributeError):
        ok = False
    if not ok:
        _log.debug("prctl(PR_SET_PTRACER, %d) failed; py-spy may not be able to attach", pid)
    return ok


def explain_failure(output: str, pid: int, returncode: int | None) -> str:
    """Turn py-spy's output into one lower-case sentence naming the cause and the fix."""
    lines = [ln.strip() for ln in output.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.lower().startswith(("error", "permission"))]
    detail = (errors or lines or [f"exit status {returncode}"])[0]
    detail = detail.removeprefix("py-spy> ")[:200]
    if _PERMISSION_RE.search(output):
        return f"py-spy is not allowed to attach to process {pid} ({detail}); {_PTRACE_FIX}"
    if _NOT_FOUND_RE.search(output):
        return f"py-spy could not find process {pid} ({detail}); check that it is running"
    return (
        f"py-spy failed on process {pid} ({detail}); if this is a permission problem, "
        f"{_PTRACE_FIX}"
    )


class PySpySession:
    """One ``py-spy record`` child writing a speedscope file until it is stopped.

    Args:
        executable: the py-spy executable.
        pid: the process to sample.
        rate: samples per second.
        output: the speedscope file to write.
        subprocesses: sample the target's child processes too.
        idle: include threads that are waiting (off: a CPU profile shows where time burns).
    """

    def __init__(
        self,
        executable: Path,
        *,
        pid: int,
        rate: int,
        output: Path,
        subprocesses: bool = True,
        idle: bool = False,
    ) -> None:
        self.pid = pid
        self.output = output
        self._argv = [
            str(executable), "record", "--pid", str(pid), "--rate", str(rate),
            "--format", "speedscope", "--output", str(output), "--threads", "--nonblocking",
        ]
        if subprocesses:
            self._argv.append("--subprocesses")
        if idle:
            self._argv.append("--idle")
        self._lines: list[str] = []
        self._sampling = threading.Event()
        self._eof = threading.Event()
        self._proc: subprocess.Popen[str] | None = None
        self._reader: threading.Thread | None = None

    @property
    def output_text(self) -> str:
        """What py-spy printed so far (stdout and stderr together)."""
        return "".join(self._lines)

    def start(self, attach_timeout: float = 15.0) -> None:
        """Start py-spy and return once it samples.

        Raises:
            ProfilerError: py-spy could not start or attach; the message names the fix.
        """
        if self.pid == os.getpid():
            allow_profiler_attach()
        try:
            self._proc = subprocess.Popen(
                self._argv,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                errors="replace",
                start_new_session=True,
            )
        except OSError as err:
            raise ProfilerError(
                f"could not run py-spy at {self._argv[0]!r} ({err.strerror or err}); "
                f"reinstall it with: pip install 'pipekit[profiling]'"
            ) from err
        self._reader = threading.Thread(
            target=self._read, name="pipekit-profiler-pyspy", daemon=True
        )
        self._reader.start()
        deadline = time.monotonic() + attach_timeout
        while not self._sampling.is_set():
            if self._eof.is_set() or self._proc.poll() is not None:
                self._proc.wait()
                self._eof.wait(5.0)
                raise ProfilerError(
                    explain_failure(self.output_text, self.pid, self._proc.returncode)
                )
            if time.monotonic() >= deadline:
                self.kill()
                raise ProfilerError(
                    f"py-spy did not start sampling process {self.pid} within "
                    f"{attach_timeout:g} s; check that the process is a Python process "
                    f"and that py-spy may attach to it"
                )
            self._sampling.wait(0.02)

    def request_stop(self) -> None:
        """Ask py-spy to stop sampling and write its file (SIGINT); returns at once."""
        proc = self._proc
        if proc is not None and proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGINT)

    def wait(self, timeout: float) -> None:
        """Wait for py-spy to exit after :meth:`request_stop` and check its file.

        Raises:
            ProfilerError: py-spy did not exit in time (it is killed) or wrote no file.
        """
        proc = self._proc
        if proc is None:
            raise ProfilerError("py-spy was never started; call start() first")
        try:
            proc.wait(timeout=max(timeout, 0.0))
        except subprocess.TimeoutExpired:
            self.kill()
            raise ProfilerError(
                f"py-spy did not write {self.output.name} within {timeout:.1f} s of being "
                f"stopped; it was killed, give the shutdown more time"
            ) from None
        self._eof.wait(5.0)
        if not self.output.is_file():
            raise ProfilerError(explain_failure(self.output_text, self.pid, proc.returncode))

    def kill(self) -> None:
        """Kill py-spy without waiting for its output."""
        proc = self._proc
        if proc is not None and proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=5.0)

    def _read(self) -> None:
        proc = self._proc
        assert proc is not None
        assert proc.stdout is not None
        try:
            for line in proc.stdout:
                self._lines.append(line)
                if _SAMPLING_MARK in line:
                    self._sampling.set()
        finally:
            proc.stdout.close()
            self._eof.set()


def write_cpu_outputs(
    speedscope: Path, svg: Path, *, title: str
) -> tuple[dict[str, Any], list[str]]:
    """Make py-spy's file private, draw its SVG flame graph and count what it holds.

    Args:
        speedscope: the speedscope file py-spy wrote.
        svg: the flame graph to write (0o600).
        title: the flame graph's heading.

    Returns:
        Metadata (``samples``, ``threads``) and warnings for what could not be done.
    """
    with contextlib.suppress(OSError):
        os.chmod(speedscope, 0o600)
    try:
        data = json.loads(speedscope.read_text(encoding="utf-8"))
        profiles = data.get("profiles") or []
        found = {
            "samples": sum(len(p.get("samples") or []) for p in profiles),
            "threads": [str(p.get("name", "")) for p in profiles],
        }
        fd = os.open(svg, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(render_svg(data, title=title))
    except (OSError, ValueError, TypeError, AttributeError) as err:
        return {}, [f"no SVG flame graph: {err}"]
    return found, []
