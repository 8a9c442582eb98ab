"""A running pipeline seen from outside: the ops server, readiness, liveness, limits."""

from __future__ import annotations

import dataclasses
import http.client
import json
import threading
import time
from typing import Any
from urllib.parse import urlsplit

import pytest

import pipekit
from pipekit import resources
from pipekit._ops_backend import RunBackend


def _get(url: str, path: str, token: str | None = None,
         method: str = "GET") -> tuple[int, bytes]:
    u = urlsplit(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=10)
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    conn.request(method, path, headers=headers)
    resp = conn.getresponse()
    body = resp.read()
    conn.close()
    return resp.status, body


def _wait(cond: Any, timeout: float = 5.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(0.02)
    return cond()


def test_ops_server_serves_health_debug_and_refuses_without_token(tmp_path: Any) -> None:
    pipe = pipekit.Pipeline("served", ops_enabled=True, ops_port=0, ops_token="t0ken",
                            profiling_dir=tmp_path, max_memory_mb=0)
    pipe.add_stage("a", lambda x: x * 2)
    outs: list[int] = []
    with pipe.start(sink=outs.append) as run:
        assert run.ops_url is not None and run.ops_url.startswith("http://127.0.0.1:")
        for i in range(20):
            run.submit(i)
        assert _get(run.ops_url, "/livez")[0] == 200
        assert _get(run.ops_url, "/readyz")[0] == 200
        assert _get(run.ops_url, "/debug/pipeline")[0] == 401
        assert _get(run.ops_url, "/debug/pipeline", "wrong")[0] == 401
        status, body = _get(run.ops_url, "/debug/pipeline", "t0ken")
        assert status == 200
        data = json.loads(body)
        assert data["pipeline"] == "served" and data["stages"][0]["name"] == "a"
        assert "t0ken" not in body.decode()
        url = run.ops_url
    # stopped with the run
    with pytest.raises(OSError):
        _get(url, "/livez")


def test_metrics_endpoint_answers_503_until_metrics_are_set_up(tmp_path: Any) -> None:
    from pipekit import otel_setup

    if otel_setup.current() is not None:
        pytest.skip("another test configured the SDK in this process")
    pipe = pipekit.Pipeline("nometrics", ops_enabled=True, ops_port=0, max_memory_mb=0,
                            profiling_dir=tmp_path)
    pipe.add_stage("a", lambda x: x)
    with pipe.start() as run:
        status, body = _get(run.ops_url or "", "/metrics")
    assert status == 503
    assert b"Traceback" not in body


def test_readiness_fails_while_draining() -> None:
    release = threading.Event()
    pipe = pipekit.Pipeline("drain", max_memory_mb=0)
    pipe.add_stage("slow", lambda x: release.wait(10) and x)
    run = pipe.start(sink=lambda x: None)
    backend = RunBackend(run, liveness_timeout=60)
    run.submit(1)
    assert backend.readyz() == (True, "ok")
    done = threading.Thread(target=run.shutdown, args=(10,))
    done.start()
    assert _wait(lambda: run.state == "draining")
    ok, reason = backend.readyz()
    assert not ok and reason == "draining"
    release.set()
    done.join(10)
    assert run.report is not None and run.report.outputs == 1
    assert backend.readyz() == (False, "stopped")


def test_liveness_fails_only_when_work_is_pending_and_nothing_completes() -> None:
    release = threading.Event()
    clock = [0.0]
    pipe = pipekit.Pipeline("wedge", max_memory_mb=0)
    pipe.add_stage("stuck", lambda x: release.wait(10) and x)
    with pipe.start() as run:
        backend = RunBackend(run, liveness_timeout=30, clock=lambda: clock[0])
        assert backend.livez() == (True, "ok")  # idle is alive
        run.submit(1)
        assert backend.livez() == (True, "ok")
        clock[0] = 31.0
        ok, reason = backend.livez()
        assert not ok and "wedged" in reason and "1 item" in reason
        release.set()
        assert _wait(lambda: run.stats().stage("stuck").succeeded == 1)
        assert backend.livez() == (True, "ok")
        for _ in run.results(timeout=1):
            break


def test_memory_limit_pauses_and_resumes_intake_without_losing_items(
        monkeypatch: pytest.MonkeyPatch) -> None:
    rss = [10 * 2**20]
    real = resources.ResourceSampler.sample

    def fake_sample(self: resources.ResourceSampler) -> resources.ResourceSample:
        s = real(self)
        return dataclasses.replace(s, rss_bytes=rss[0])

    monkeypatch.setattr(resources.ResourceSampler, "sample", fake_sample)
    pipe = pipekit.Pipeline("limited", max_memory_mb=100, metrics_interval=0.05)
    pipe.add_stage("a", lambda x: x + 1, workers=2)
    outs: list[int] = []
    with pipe.start(sink=outs.append) as run:
        backend = RunBackend(run, liveness_timeout=60)
        for i in range(100):
            run.submit(i)
        rss[0] = 200 * 2**20  # above the limit
        assert _wait(lambda: run.state == "paused")
        ok, reason = backend.readyz()
        assert not ok and reason.startswith("paused") and "max_memory_mb" in reason
        assert run.stats().paused_reason
        with pytest.raises(pipekit.SubmitTimeoutError, match="paused"):
            run.submit(-1, timeout=0.1)
        with pytest.raises(pipekit.QueueFullError, match="paused"):
            run.submit_nowait(-1)
        blocked = threading.Thread(target=lambda: [run.submit(i) for i in range(100, 200)])
        blocked.start()
        time.sleep(0.2)
        assert blocked.is_alive()  # producers wait while paused
        rss[0] = 95 * 2**20  # between the resume mark (90) and the limit: still paused
        time.sleep(0.2)
        assert run.state == "paused"
        rss[0] = 50 * 2**20
        assert _wait(lambda: run.state == "running")
        blocked.join(5)
        assert not blocked.is_alive()
    report = run.report
    assert report is not None
    assert report.submitted == 200 and report.outputs == 200 and not report.unprocessed
    assert sorted(outs) == [i + 1 for i in range(200)]


def test_unwritable_profile_folder_is_reported_at_start(tmp_path: Any) -> None:
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o500)
    pipe = pipekit.Pipeline("ro", profiling_enabled=True, profiling_dir=folder / "sub",
                            max_memory_mb=0, telemetry=False)
    pipe.add_stage("a", lambda x: x)
    import os

    if os.geteuid() == 0:
        # root writes anywhere: use a path below a regular file instead
        blocker = tmp_path / "file"
        blocker.write_text("x")
        pipe = pipekit.Pipeline("ro", profiling_enabled=True, profiling_dir=blocker / "sub",
                                max_memory_mb=0, telemetry=False)
        pipe.add_stage("a", lambda x: x)
    with pytest.raises(pipekit.ProfilerError):
        pipe.start()


def test_ops_port_in_use_fails_start_and_leaves_nothing_running(tmp_path: Any) -> None:
    import socket

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    port = sock.getsockname()[1]
    try:
        pipe = pipekit.Pipeline("busyport", ops_enabled=True, ops_port=port, max_memory_mb=0,
                                profiling_dir=tmp_path)
        pipe.add_stage("a", lambda x: x)
        before = {t.name for t in threading.enumerate()}
        with pytest.raises(OSError, match="ops_port"):
            pipe.start()
        assert _wait(lambda: not ({t.name for t in threading.enumerate()
                                   if t.name.startswith("pipekit-")} - before))
    finally:
        sock.close()
