"""The ``pipekit`` command, driven through real child interpreters.

Every command runs as ``python -m pipekit ...`` with ``cwd=tmp_path`` and ``tests/`` on
``PYTHONPATH`` (for the example module ``cli_app``), so signals, exit codes, stdout and
stderr are the ones a supervisor sees. A few pure helpers (exit codes, durations,
settings flags) are also checked in-process.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from pipekit import cli
from pipekit.stats import RunReport, Unprocessed

TESTS = Path(__file__).resolve().parent
TOKEN = "test-token-42"


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PIPEKIT_", "OTEL_"))}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(TESTS), env.get("PYTHONPATH")]))
    env.update(extra)
    return env


def pipekit(*args: str, cwd: Path, timeout: float = 60,
            **env: str) -> subprocess.CompletedProcess[str]:
    """Run ``python -m pipekit *args`` to completion."""
    return subprocess.run([sys.executable, "-m", "pipekit", *args], cwd=cwd, env=_env(**env),
                          capture_output=True, text=True, timeout=timeout, check=False)


class Child:
    """``python -m pipekit *args`` running in its own process group, its output collected.

    Threads read stdout and stderr as they come (a ``select`` on a buffered pipe would
    miss lines already read ahead), so a test can wait for one line while the command
    keeps running.
    """

    def __init__(self, *args: str, cwd: Path, **env: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "pipekit", *args], cwd=cwd, env=_env(**env),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            start_new_session=True)  # process workers die with it: see kill()
        self.out: list[str] = []
        self.err: list[str] = []
        self._cond = threading.Condition()
        self._readers = [threading.Thread(target=self._read, args=(stream, lines), daemon=True)
                         for stream, lines in ((self.proc.stdout, self.out),
                                               (self.proc.stderr, self.err))]
        for reader in self._readers:
            reader.start()

    def _read(self, stream: Any, lines: list[str]) -> None:
        for line in stream:
            with self._cond:
                lines.append(line)
                self._cond.notify_all()
        with self._cond:
            self._cond.notify_all()

    def wait_for(self, pattern: str, timeout: float = 30) -> str:
        """Wait for a stdout line matching ``pattern``; return stdout so far."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while not any(re.search(pattern, line) for line in self.out):
                left = deadline - time.monotonic()
                if left <= 0 or (self.proc.poll() is not None
                                 and not self._readers[0].is_alive()):
                    self.kill()
                    pytest.fail(f"no line matched {pattern!r}; stdout: {''.join(self.out)}\n"
                                f"stderr: {''.join(self.err)}")
                self._cond.wait(min(left, 0.2))
            return "".join(self.out)

    def signal(self, signum: int) -> None:
        """Send ``signum`` to the command (not to its process workers)."""
        self.proc.send_signal(signum)

    def finish(self, timeout: float) -> tuple[int, str, str]:
        """Wait for the command to exit; return its exit code, stdout and stderr."""
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            pytest.fail(f"the command did not exit within {timeout} s; stdout: "
                        f"{''.join(self.out)}\nstderr: {''.join(self.err)}")
        for reader in self._readers:
            reader.join(10)
        return code, "".join(self.out), "".join(self.err)

    def kill(self) -> None:
        """Kill the command and its process workers (they share its process group)."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)


def stage_workers(stdout: str, stage: str) -> int:
    """The worker count of ``stage`` in a summary's stage table."""
    found = re.search(rf"^\s+{re.escape(stage)}\s+\w+\s+(\d+)\s", stdout, re.MULTILINE)
    assert found, stdout
    return int(found.group(1))


def assert_one_line_error(result: subprocess.CompletedProcess[str]) -> None:
    assert result.returncode == cli.EXIT_USAGE, (result.stdout, result.stderr)
    assert result.stderr.count("\n") == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert "error:" in result.stderr


# -- pipekit run --------------------------------------------------------------------------


def test_run_of_a_finite_source_exits_0_with_a_summary(tmp_path: Path) -> None:
    result = pipekit("run", "cli_app:finite", "--report-json", "report.json", cwd=tmp_path)

    assert result.returncode == cli.EXIT_OK, result.stderr
    out = result.stdout
    assert "'finite' completed" in out
    assert "500 in, 500 out, 0 dead letters, 0 unprocessed" in out
    for stage in ("double", "inc", "store"):
        assert re.search(rf"^\s+{stage}\s+thread\s+\d+\s+500\s+500\s", out, re.MULTILINE), out
    assert re.search(r"^\s+exit\s+0$", out, re.MULTILINE)
    assert (tmp_path / "hook-ran.txt").read_text() == "closed\n"  # on_shutdown hooks ran
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["outputs"] == 500
    assert report["exit_code"] == 0
    assert "item/s" not in result.stderr  # no progress bar when stderr is not a terminal


def test_run_calls_a_factory_and_flags_reach_the_stage_defaults(tmp_path: Path) -> None:
    # `work` takes its worker count from the `workers` setting, read when the module
    # built the pipeline; the flag must be in place by then
    result = pipekit("run", "cli_app:make_pipe", "--workers", "3", cwd=tmp_path)

    assert result.returncode == cli.EXIT_OK, result.stderr
    assert "'made' completed" in result.stdout
    assert stage_workers(result.stdout, "work") == 3


def test_run_with_dead_letters_exits_3_and_names_them(tmp_path: Path) -> None:
    result = pipekit("run", "cli_app:with_dead", "--log-format", "json", cwd=tmp_path)

    assert result.returncode == cli.EXIT_DEAD_LETTERS
    assert "100 in, 90 out, 10 dead letters" in result.stdout
    assert re.search(r"10 at check: ValueError: item \d*0 is a multiple of ten", result.stdout)
    # the first few are logged (one JSON object a line), the rest only counted
    logged = [json.loads(line) for line in result.stderr.splitlines()]
    messages = [r["message"] for r in logged if r["logger"] == "pipekit.cli"]
    assert sum(m.startswith("dead letter at stage check") for m in messages) == 3
    assert any("are counted, not logged" in m for m in messages)


def test_run_of_an_example_from_the_examples_folder(tmp_path: Path) -> None:
    (tmp_path / "book.txt").write_text("the cat and the hat\nthe end\n")

    result = pipekit("run", "examples.wordcount:pipe", cwd=tmp_path,
                     PYTHONPATH=str(TESTS.parent), WORDCOUNT_PATH=str(tmp_path / "book.txt"))

    assert result.returncode == cli.EXIT_OK, result.stderr
    assert "7 words, 5 distinct; top: the 3," in result.stdout
    assert "2 in, 7 out" in result.stdout


def test_run_whose_source_raises_exits_1(tmp_path: Path) -> None:
    result = pipekit("run", "cli_app:bad_source", cwd=tmp_path)

    assert result.returncode == cli.EXIT_FAILED
    assert "source      raised RuntimeError: the source lost its connection" in result.stdout


def test_sigterm_drains_and_exits_143_within_the_shutdown_timeout(tmp_path: Path) -> None:
    child = Child("run", "cli_app:endless", "--shutdown-timeout", "5", cwd=tmp_path)
    child.wait_for(r"running 'endless'")
    time.sleep(1.5)

    child.signal(signal.SIGTERM)
    code, out, err = child.finish(timeout=5 + 10)  # the drain deadline plus slack

    assert code == 128 + signal.SIGTERM, err
    assert "received SIGTERM: draining" in err
    assert "'endless' drained after SIGTERM" in out
    assert re.search(r"^\s+exit\s+143$", out, re.MULTILINE)
    assert "unprocessed at" not in out  # whatever had entered the pipeline finished


def test_a_second_sigint_stops_at_once_and_exits_4(tmp_path: Path) -> None:
    # `stuck` holds 200 items of 0.1 s each: a graceful drain would take about 20 s
    child = Child("run", "cli_app:stuck", cwd=tmp_path)
    child.wait_for(r"running 'stuck'")
    time.sleep(1.0)

    child.signal(signal.SIGINT)
    time.sleep(0.5)
    child.signal(signal.SIGINT)
    code, out, err = child.finish(timeout=10)

    assert code == cli.EXIT_UNPROCESSED, err
    assert "received SIGINT again: stopping now" in err
    assert "stopped at once by a second signal" in out
    assert re.search(r"unprocessed \d+ queued at work", out), out


def test_profile_flag_writes_whole_run_profiles_at_shutdown(tmp_path: Path) -> None:
    result = pipekit("run", "cli_app:endless", "--duration", "1.5", "--profile", "cpu",
                     cwd=tmp_path)

    assert result.returncode == cli.EXIT_OK, result.stderr
    paths = re.findall(r"^\s+profile\s+(\S+)$", result.stdout, re.MULTILINE)
    if not paths:
        pytest.skip("the report lists no profiles: whole-run profiling is not available "
                    f"here (stderr: {result.stderr.strip()[-300:]})")
    speedscope = [Path(p) for p in paths if p.endswith(".speedscope.json")]
    assert len(speedscope) == 1, paths
    assert speedscope[0].is_relative_to(tmp_path / "profiles" / "endless")
    data = json.loads(speedscope[0].read_text())
    assert "speedscope" in data["$schema"]
    assert data["profiles"]


# -- pipekit demo -------------------------------------------------------------------------


def test_demo_runs_for_a_duration_and_exits_0_with_its_summary(tmp_path: Path) -> None:
    with socket.socket() as taken:  # the port the demo is asked for is busy
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = pipekit("demo", "--duration", "3", "--ops-port", str(port), cwd=tmp_path)

    assert result.returncode == cli.EXIT_OK, result.stderr
    out = result.stdout
    assert f"port {port} is taken; the ops server uses a free port instead" in out
    ops = re.search(r"^\s+ops\s+http://127\.0\.0\.1:(\d+)$", out, re.MULTILINE)
    assert ops, out
    assert int(ops.group(1)) != port
    assert "'transactions' stopped after --duration and drained" in out
    for stage in ("parse", "enrich", "score", "aggregate", "store"):
        assert re.search(rf"^\s+{stage}\s+(thread|process)\s+\d+\s+[\d,]+\s", out,
                         re.MULTILINE), out
    assert re.search(r"^\s+score\s+process\s", out, re.MULTILINE)
    assert re.search(r"^\s+store\s+.*\s[1-9][\d,]*\s+\S+\s+\S+$", out, re.MULTILINE), \
        "the flaky store retried nothing"
    assert "bottleneck" in out
    assert re.search(r"^\s+exit\s+0$", out, re.MULTILINE)


def test_demo_without_the_otel_extra_runs_with_metrics_off(tmp_path: Path) -> None:
    blocked = ("import sys; sys.modules['opentelemetry.sdk'] = None; "  # import fails
               "from pipekit.cli import main; sys.exit(main())")
    result = subprocess.run(
        [sys.executable, "-c", blocked, "demo", "--items", "300", "--ops-port", "0"],
        cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=60, check=False)

    assert result.returncode == cli.EXIT_OK, result.stderr
    assert "'transactions' completed" in result.stdout
    assert len(re.findall(r"metrics\s+off: install 'pipekit\[otel\]'", result.stdout)) == 2


def test_profile_command_saves_a_speedscope_file_from_a_running_demo(tmp_path: Path) -> None:
    child = Child("demo", "--duration", "60", "--ops-port", "0", cwd=tmp_path,
                  PIPEKIT_OPS_TOKEN=TOKEN)
    try:
        banner = child.wait_for(r"^\s+(ops\s+http|profiles\s)")
        found = re.search(r"^\s+ops\s+(http://\S+)$", banner, re.MULTILINE)
        if found is None:
            pytest.skip("the demo started no ops server: it is not wired into Run yet")
        url = found.group(1)

        refused = pipekit("profile", url, "--cpu", "1", "--token", "wrong", cwd=tmp_path)
        result = pipekit("profile", url, "--cpu", "1", "-o", "out", cwd=tmp_path,
                         PIPEKIT_OPS_TOKEN=TOKEN)
    finally:
        child.signal(signal.SIGINT)
        code, out, err = child.finish(timeout=30)

    assert_one_line_error(refused)
    assert "refused the token: set --token or PIPEKIT_OPS_TOKEN" in refused.stderr
    assert result.returncode == cli.EXIT_OK, result.stderr
    saved = [Path(line) for line in result.stdout.split()]
    assert all(p.parent == Path("out") and (tmp_path / p).is_file() for p in saved), saved
    speedscope = [p for p in saved if p.name.endswith(".speedscope.json")]
    assert len(speedscope) == 1, saved
    data = json.loads((tmp_path / speedscope[0]).read_text())
    assert "speedscope" in data["$schema"]
    assert data["profiles"]
    # Ctrl-C is how the demo ends: it drains and exits 0
    assert code == cli.EXIT_OK, err
    assert "drained after SIGINT" in out


def test_profile_command_reports_a_server_that_is_not_there(tmp_path: Path) -> None:
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    result = pipekit("profile", f"http://127.0.0.1:{port}", "--cpu", "1", cwd=tmp_path)

    assert result.returncode == cli.EXIT_FAILED
    assert "connection refused" in result.stderr
    assert result.stderr.count("\n") == 1


# -- pipekit config -----------------------------------------------------------------------


def test_config_shows_each_value_and_where_it_came_from(tmp_path: Path) -> None:
    (tmp_path / "pipekit.toml").write_text("batch_size = 7\n")

    result = pipekit("config", "--set", "workers=3", "--ops-port", "9000", cwd=tmp_path,
                     PIPEKIT_BUFFER_SIZE="50", PIPEKIT_OPS_TOKEN="very-secret")

    assert result.returncode == cli.EXIT_OK, result.stderr
    rows = {line.split()[0]: line.split(None, 2)[1:] for line in result.stdout.splitlines()}
    assert rows["workers"] == ["3", "flag --set workers"]
    assert rows["batch_size"] == ["7", f"file {tmp_path / 'pipekit.toml'}"]
    assert rows["buffer_size"] == ["50", "environment PIPEKIT_BUFFER_SIZE"]
    assert rows["ops_port"] == ["9000", "flag --ops-port"]
    assert rows["ops_enabled"] == ["true", "flag --ops-port"]
    assert rows["ordered"] == ["false", "default"]
    assert rows["ops_token"] == ["***", "environment PIPEKIT_OPS_TOKEN"]
    assert "very-secret" not in result.stdout


def test_config_json_lists_every_setting(tmp_path: Path) -> None:
    result = pipekit("config", "--json", cwd=tmp_path)

    rows = json.loads(result.stdout)
    assert [r["setting"] for r in rows] == [s.name for s in cli.SETTINGS]
    assert {r["source"] for r in rows} == {"default"}


# -- bad input: one line, exit 2, no traceback --------------------------------------------


@pytest.mark.parametrize(("args", "env", "message"), [
    (["run", "nosuch:pipe"], {}, "no module named 'nosuch'"),
    (["run", "cli_app:nope"], {}, "module 'cli_app' has no attribute 'nope'; pipelines there"),
    (["run", "cli_app:not_a_pipe"], {}, "is an int, not a pipekit.Pipeline"),
    (["run", "cli_app:make_nothing"], {}, "returned an int, not a pipekit.Pipeline"),
    (["run", "cli_app"], {}, "the target must be module:attribute"),
    (["run", "cli_app:finite", "--set", "workers=zero"], {},
     "workers must be an integer >= 1 (got 'zero' from --set workers)"),
    (["run", "cli_app:finite", "--set", "wrkers=2"], {}, "did you mean 'workers'?"),
    (["run", "cli_app:finite", "--set", "workers"], {}, "--set takes name=value"),
    (["run", "cli_app:finite", "--duration", "soon"], {}, "a duration must be a positive"),
    (["run", "cli_app:finite", "--duration", "0"], {}, "a duration must be a positive"),
    (["run", "cli_app:finite"], {"PIPEKIT_WORKERS": "many"},
     "from environment variable PIPEKIT_WORKERS"),
    (["config", "--profile", "gpu"], {}, "profiling_kinds must be"),
    (["demo", "--items", "0"], {}, "must be a whole number >= 1"),
    (["profile", "127.0.0.1:8080", "--cpu", "1"], {}, "must start with http://"),
    (["profile", "http://127.0.0.1:8080", "--heap", "1", "--rate", "50"], {},
     "--rate applies to --cpu profiles"),
])
def test_bad_input_exits_2_with_one_line_and_no_traceback(
        tmp_path: Path, args: list[str], env: dict[str, str], message: str) -> None:
    result = pipekit(*args, cwd=tmp_path, **env)

    assert_one_line_error(result)
    assert message in result.stderr
    assert result.stdout == ""


def test_run_with_a_busy_ops_port_exits_2_with_one_line(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = pipekit("run", "cli_app:finite", "--ops-port", str(port), cwd=tmp_path)

    assert_one_line_error(result)
    assert f"'finite' could not start: ops server cannot listen on 127.0.0.1:{port}" \
        in result.stderr


# -- the entry points ---------------------------------------------------------------------


def test_version_from_python_m_and_the_console_script(tmp_path: Path) -> None:
    import pipekit as pk

    assert pipekit("--version", cwd=tmp_path).stdout.strip() == f"pipekit {pk.__version__}"
    script = Path(sys.executable).parent / "pipekit"
    if not script.exists():
        pytest.skip("the pipekit console script is not installed next to this interpreter")
    result = subprocess.run([str(script), "--version"], capture_output=True, text=True,
                            check=False, cwd=tmp_path)
    assert result.stdout.strip() == f"pipekit {pk.__version__}"


def test_progress_bar_on_a_terminal(tmp_path: Path) -> None:
    import fcntl
    import pty
    import struct
    import termios

    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))
    proc = subprocess.Popen([sys.executable, "-m", "pipekit", "run", "cli_app:finite"],
                            cwd=tmp_path, env=_env(), stdout=subprocess.PIPE,
                            stderr=follower, stdin=subprocess.DEVNULL)
    os.close(follower)
    seen = b""
    try:
        while select.select([leader], [], [], 30)[0]:
            try:
                chunk = os.read(leader, 4096)
            except OSError:  # the child closed the terminal
                break
            if not chunk:
                break
            seen += chunk
    finally:
        os.close(leader)
        proc.communicate(timeout=30)

    assert proc.returncode == cli.EXIT_OK
    assert b"/500 [" in seen, seen  # tqdm's "n/500 [elapsed<remaining, rate]"


# -- pure helpers, in-process -------------------------------------------------------------


def _report(**fields: Any) -> RunReport:
    base: dict[str, Any] = {
        "pipeline": "p", "submitted": 10, "outputs": 10, "dead_letters": (),
        "dead_letter_count": 0, "unprocessed": (), "duration": 1.0, "stages": (),
        "reason": "completed"}
    return RunReport(**(base | fields))


@pytest.mark.parametrize(("fields", "signum", "failed", "code"), [
    ({}, None, False, 0),
    ({"reason": "duration"}, None, False, 0),
    ({"dead_letter_count": 2}, None, False, 3),
    ({"reason": "signal"}, signal.SIGINT, False, 130),
    ({"reason": "signal", "dead_letter_count": 2}, signal.SIGTERM, False, 143),
    ({"reason": "signal", "unprocessed": (Unprocessed("a", 1, "intake"),)}, signal.SIGTERM,
     False, 143),
    ({"reason": "signal", "unprocessed": (Unprocessed("a", 1, "queued"),)}, signal.SIGTERM,
     False, 4),
    ({"reason": "deadline"}, signal.SIGTERM, False, 4),
    ({"reason": "aborted", "unprocessed": (Unprocessed("a", 1, "intake"),)}, signal.SIGINT,
     False, 4),
    ({"reason": "signal", "unprocessed": (Unprocessed("a", 1, "queued"),)}, None, True, 1),
    ({"hook_errors": (("store", "OSError: disk full"),)}, None, False, 1),
    ({"reason": "source_error", "source_error": "RuntimeError('gone')"}, None, False, 1),
])
def test_exit_codes_follow_the_documented_precedence(
        fields: dict[str, Any], signum: int | None, failed: bool, code: int) -> None:
    assert cli.exit_code(_report(**fields), signum=signum, failed=failed) == code


def test_the_demo_ends_normally_with_dead_letters_and_ctrl_c() -> None:
    assert cli.exit_code(_report(dead_letter_count=3, reason="signal"),
                         signum=signal.SIGINT, demo=True) == 0
    assert cli.exit_code(_report(reason="deadline"), demo=True) == 4


@pytest.mark.parametrize(("text", "seconds"), [
    ("30", 30.0), ("1.5", 1.5), ("500ms", 0.5), ("30s", 30.0), ("2m", 120.0), ("1h", 3600.0)])
def test_parse_duration_accepts_units(text: str, seconds: float) -> None:
    assert cli.parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["", "soon", "-1", "0", "inf", "nan", "5 parsecs"])
def test_parse_duration_refuses_nonsense(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError, match="positive number of seconds"):
        cli.parse_duration(text)


def test_convenience_flags_win_over_set_and_imply_their_switches() -> None:
    args = cli.build_parser().parse_args(
        ["run", "m:p", "--set", "workers=2", "--workers", "5", "--ops-host", "0.0.0.0",
         "--profile", "heap,cpu", "--shutdown-timeout", "2m", "--no-telemetry"])

    values, origins = cli.setting_overrides(args)

    assert values == {"workers": 5, "ops_host": "0.0.0.0", "ops_enabled": True,
                      "profiling_kinds": ("cpu", "heap"), "profiling_enabled": True,
                      "shutdown_timeout": 120.0, "telemetry_enabled": False}
    assert origins["workers"] == "--workers"
    assert origins["ops_enabled"] == "--ops-host"
