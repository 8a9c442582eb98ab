"""Signal handling, tested in child interpreters (a signal to pytest itself would be rude).

The child runs a small pipeline over an endless source, prints ``READY`` once items
flow, and prints its report as one ``REPORT {json}`` line; the parent sends signals
and checks the accounting, the reason, the hook order and the restored handlers.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
from pathlib import Path
from typing import Any

import pytest
from _helpers import inc, make_pipe

TESTS_DIR = Path(__file__).resolve().parent

CHILD = textwrap.dedent("""
    import itertools, json, logging, signal, sys, threading, time
    sys.path.insert(0, sys.argv[1])
    from _helpers import make_pipe

    mode = sys.argv[2]
    logging.basicConfig(stream=sys.stdout, level=logging.WARNING, format="LOG %(message)s")
    order = []
    release = threading.Event()

    def work(x):
        if mode == "stuck" and x >= 40:
            if x == 40:
                print("STUCK", flush=True)
            release.wait()  # never released: the drain cannot finish
        time.sleep(0.002 if mode != "slow" else 0.2)
        return x

    def source():
        for i in itertools.count():
            if i == 30:
                print("READY", flush=True)
            yield i

    def mine(signum, frame):
        pass

    signal.signal(signal.SIGTERM, mine)
    int_before = signal.getsignal(signal.SIGINT)  # SIG_IGN when started in the background
    pipe = make_pipe("sig", buffer_size=20)
    pipe.add_stage("a", work, workers=2, batch_size=5,
                   on_shutdown=lambda: order.append("a"))
    pipe.add_stage("b", lambda x: x + 1, on_shutdown=lambda: order.append("b"))

    if mode == "start":
        run = pipe.start(sink=lambda x: None, handle_signals=True)
        refused = None
        for i in itertools.count():
            if i == 30:
                print("READY", flush=True)
            try:
                run.submit(i, timeout=10)
            except Exception as exc:
                refused = type(exc).__name__
                break
        report = run.shutdown()
    else:
        refused = None
        report = pipe.run(source(), shutdown_timeout=float(sys.argv[3]))
    print("REPORT " + json.dumps({
        "reason": report.reason,
        "submitted": report.submitted,
        "outputs": report.outputs,
        "dead": report.dead_letter_count,
        "unprocessed": len(report.unprocessed),
        "unprocessed_where": sorted({u.where for u in report.unprocessed}),
        "hooks": order,
        "hook_errors": [list(h) for h in report.hook_errors],
        "term_restored": signal.getsignal(signal.SIGTERM) is mine,
        "int_restored": signal.getsignal(signal.SIGINT) is int_before,
        "refused": refused,
    }), flush=True)
    release.set()
""")


class Child:
    """A child interpreter running :data:`CHILD`."""

    def __init__(self, tmp_path: Path, mode: str, shutdown_timeout: float = 10.0) -> None:
        script = tmp_path / "child.py"
        script.write_text(CHILD)
        self.lines: list[str] = []
        self.proc = subprocess.Popen(
            [sys.executable, str(script), str(TESTS_DIR), mode, str(shutdown_timeout)],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )

    def wait_for(self, text: str) -> None:
        """Read output lines until one contains ``text``."""
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))
            if text in line:
                return
        raise AssertionError(f"child ended before printing {text!r}: {self.lines}")

    def signal(self, signum: int) -> None:
        self.proc.send_signal(signum)

    def report(self, timeout: float) -> dict[str, Any]:
        """Wait for the child to exit (failing if it overruns) and return its report."""
        try:
            out, _ = self.proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired as err:
            self.proc.kill()
            self.proc.communicate()
            raise AssertionError(f"child did not exit within {timeout} s: {self.lines}") from err
        self.lines += out.splitlines()
        assert self.proc.returncode == 0, self.lines
        (line,) = [ln for ln in self.lines if ln.startswith("REPORT ")]
        report: dict[str, Any] = json.loads(line[len("REPORT "):])
        return report

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.communicate()


@pytest.fixture
def child(tmp_path: Path) -> Any:
    made: list[Child] = []

    def start(mode: str, shutdown_timeout: float = 10.0) -> Child:
        c = Child(tmp_path, mode, shutdown_timeout)
        made.append(c)
        return c

    yield start
    for c in made:
        c.kill()


def _accounted(report: dict[str, Any]) -> None:
    assert report["submitted"] > 0
    assert report["submitted"] == report["outputs"] + report["dead"] + report["unprocessed"]


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_drains_the_run_and_reports_it(child: Any, signum: int) -> None:
    c = child("drain")
    c.wait_for("READY")
    c.signal(signum)
    report = c.report(timeout=30)
    assert report["reason"] == "signal"
    _accounted(report)
    # the drain finished in time: all that is left is what the source had already
    # yielded when intake closed (read from the iterator, never admitted)
    assert report["unprocessed_where"] in ([], ["intake"])
    assert report["hooks"] == ["b", "a"]  # reverse stage order
    assert report["hook_errors"] == []
    assert report["term_restored"]
    assert report["int_restored"]


def test_a_drain_that_overruns_its_deadline_stops_there(child: Any) -> None:
    c = child("stuck", shutdown_timeout=1.0)
    c.wait_for("STUCK")
    c.signal(signal.SIGTERM)
    report = c.report(timeout=20)  # the deadline is 1 s; a hang would show here
    assert report["reason"] == "deadline"
    assert "in_flight" in report["unprocessed_where"]
    _accounted(report)
    assert report["hooks"] == ["b", "a"]
    assert report["term_restored"]


def test_a_second_signal_stops_at_once(child: Any) -> None:
    c = child("slow", shutdown_timeout=60.0)  # draining the backlog would take long
    c.wait_for("READY")
    c.signal(signal.SIGTERM)
    c.wait_for("draining")  # the first signal was handled
    c.signal(signal.SIGTERM)
    report = c.report(timeout=20)  # far below the 60 s drain deadline
    assert report["reason"] == "aborted"
    assert set(report["unprocessed_where"]) & {"queued", "in_flight"}
    _accounted(report)
    assert report["hooks"] == ["b", "a"]
    assert report["term_restored"]


def test_start_with_handle_signals_shuts_the_run_down_on_sigterm(child: Any) -> None:
    c = child("start")
    c.wait_for("READY")
    c.signal(signal.SIGTERM)
    report = c.report(timeout=30)
    assert report["refused"] == "PipelineClosedError"  # intake closed by the signal
    assert report["reason"] == "signal"
    _accounted(report)
    assert report["term_restored"]


# -- in this process: only handler bookkeeping, no signal is sent ---------------------------


def test_start_leaves_signal_handlers_alone_unless_asked() -> None:
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    pipe = make_pipe().add_stage("a", inc)
    run = pipe.start()
    assert {s: signal.getsignal(s) for s in before} == before
    run.shutdown()
    run = pipe.start(handle_signals=True)
    try:
        assert all(signal.getsignal(s) is not h for s, h in before.items())
    finally:
        run.shutdown()
    assert {s: signal.getsignal(s) for s in before} == before


def test_run_restores_the_previous_handlers() -> None:
    def mine(signum: int, frame: Any) -> None:
        pass

    old = signal.signal(signal.SIGTERM, mine)
    try:
        make_pipe().add_stage("a", inc).run(range(10))
        assert signal.getsignal(signal.SIGTERM) is mine
        make_pipe().add_stage("a", inc).run(range(10), handle_signals=False)
        assert signal.getsignal(signal.SIGTERM) is mine
    finally:
        signal.signal(signal.SIGTERM, old)


def test_run_outside_the_main_thread_installs_no_handlers() -> None:
    before = signal.getsignal(signal.SIGTERM)
    results: list[Any] = []
    t = threading.Thread(
        target=lambda: results.append(make_pipe().add_stage("a", inc).run(range(10))))
    t.start()
    t.join(30)
    assert results
    assert results[0].outputs == 10
    assert signal.getsignal(signal.SIGTERM) is before
