"""Tests of the ops HTTP server over real sockets, against a fake backend."""

from __future__ import annotations

import contextlib
import http.client
import json
import logging
import os
import re
import select
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from pipekit.errors import (
    ConfigError,
    PipelineStateError,
    ProfilerBusyError,
    ProfilerError,
)
from pipekit.ops import PROFILE_ARTIFACTS, OpsServer, is_loopback

TOKEN = "s3cr3t-Token_0123456789abcdefXYZ"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
PROMETHEUS_ACCEPT = (
    "application/openmetrics-text;version=1.0.0,application/openmetrics-text;"
    "version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1"
)
STATUS_LINE = re.compile(rb"HTTP/1\.1 [1-5][0-9][0-9] [A-Za-z][A-Za-z -]*\r\n")


class FakeBackend:
    """An OpsBackend whose answers and failures the tests set, recording every call."""

    def __init__(self) -> None:
        self.live: tuple[bool, str] = (True, "")
        self.ready: tuple[bool, str] = (True, "")
        self.snapshot: dict[str, Any] = {"pipeline": "demo", "stages": [{"name": "parse"}]}
        self.failure: BaseException | None = None  # raised by every method when set
        self.metrics_error: BaseException | None = None
        self.metrics_type: str | None = None
        self.profile_error: BaseException | None = None
        self.profile_gate: threading.Event | None = None
        self.profile_entered = threading.Event()
        self.files: dict[tuple[str, str], tuple[Path, str]] = {}
        self.calls: list[tuple[Any, ...]] = []
        self._lock = threading.Lock()

    def _call(self, *call: Any) -> None:
        with self._lock:
            self.calls.append(call)
        if self.failure is not None:
            raise self.failure

    def names(self) -> list[str]:
        with self._lock:
            return [call[0] for call in self.calls]

    def livez(self) -> tuple[bool, str]:
        self._call("livez")
        return self.live

    def readyz(self) -> tuple[bool, str]:
        self._call("readyz")
        return self.ready

    def metrics(self, openmetrics: bool) -> tuple[bytes, str]:
        self._call("metrics", openmetrics)
        if self.metrics_error is not None:
            raise self.metrics_error
        if self.metrics_type is not None:
            return b"m 1\n", self.metrics_type
        if openmetrics:
            return b"m_total 1\n# EOF\n", "application/openmetrics-text; version=1.0.0"
        return b"m_total 1\n", "text/plain; version=0.0.4; charset=utf-8"

    def debug_pipeline(self) -> dict[str, Any]:
        self._call("debug_pipeline")
        return self.snapshot

    def profile(self, kind: str, seconds: float, rate: int | None) -> dict[str, Any]:
        self._call("profile", kind, seconds, rate)
        self.profile_entered.set()
        if self.profile_gate is not None:
            assert self.profile_gate.wait(10)
        if self.profile_error is not None:
            raise self.profile_error
        files = {"speedscope": "/srv/secret/p1.speedscope.json", "svg": "C:\\secret\\p1.svg"}
        return {"id": "p1", "kind": kind, "files": files, "metadata": {"rate": rate}}

    def profile_file(self, profile_id: str, artifact: str) -> tuple[Path, str] | None:
        self._call("profile_file", profile_id, artifact)
        return self.files.get((profile_id, artifact))


# -- fixtures and helpers ---------------------------------------------------------------


@pytest.fixture
def no_thread_leak() -> Iterator[None]:
    before = set(threading.enumerate())
    yield
    leaked = [t for t in threading.enumerate() if t not in before]
    assert not leaked, f"threads left behind: {leaked}"


@pytest.fixture
def backend() -> FakeBackend:
    return FakeBackend()


@pytest.fixture
def serve(no_thread_leak: None, backend: FakeBackend) -> Iterator[Callable[..., OpsServer]]:
    servers: list[OpsServer] = []

    def start(**kwargs: Any) -> OpsServer:
        kwargs.setdefault("port", 0)
        kwargs.setdefault("request_timeout", 5.0)
        server = OpsServer(kwargs.pop("backend", backend), **kwargs)
        server.start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        assert server.stop(timeout=5.0)


def endpoint(server: OpsServer) -> tuple[str, int]:
    """Where a local client connects: 127.0.0.1 even when the server binds 0.0.0.0."""
    parts = urlsplit(server.url)
    assert parts.hostname is not None
    assert parts.port is not None
    return parts.hostname, parts.port


def call(
    server: OpsServer,
    method: str,
    path: str,
    headers: dict[str, str] | None = None,
    body: bytes | None = None,
) -> tuple[int, http.client.HTTPMessage, bytes]:
    conn = http.client.HTTPConnection(*endpoint(server), timeout=5)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, resp.headers, resp.read()
    finally:
        conn.close()


def raw(server: OpsServer, data: bytes, *, close_write: bool = True) -> bytes:
    """Send bytes on a fresh connection and return everything until the server closes."""
    with socket.create_connection(endpoint(server), timeout=5) as sock:
        sock.sendall(data)
        if close_write:
            sock.shutdown(socket.SHUT_WR)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def read_response(sock: socket.socket) -> http.client.HTTPResponse:
    resp = http.client.HTTPResponse(sock)
    resp.begin()
    resp.read()
    return resp


def status_of(reply: bytes) -> int:
    assert STATUS_LINE.match(reply), reply[:100]
    return int(reply[9:12])


# -- health and metrics ----------------------------------------------------------------


def test_livez_and_readyz_answer_ok(serve: Callable[..., OpsServer]) -> None:
    server = serve()
    for path in ("/livez", "/readyz"):
        status, headers, body = call(server, "GET", path)
        assert (status, body) == (200, b"ok\n")
        assert headers["Content-Type"] == "text/plain; charset=utf-8"


def test_failing_health_checks_answer_503_with_the_reason(
    serve: Callable[..., OpsServer], backend: FakeBackend
) -> None:
    server = serve()
    backend.live = (False, "no item completed for 30s with 12 pending\nsecond line")
    backend.ready = (False, "draining")
    assert call(server, "GET", "/livez")[::2] == (
        503,
        b"no item completed for 30s with 12 pending\n",
    )
    assert call(server, "GET", "/readyz")[::2] == (503, b"draining\n")


def test_every_response_carries_the_hardening_headers(serve: Callable[..., OpsServer]) -> None:
    server = serve()
    for method, path in (("GET", "/livez"), ("GET", "/nope"), ("GET", "/debug/pipeline")):
        _, headers, _ = call(server, method, path)
        assert headers["Server"] == "pipekit"
        assert headers["X-Content-Type-Options"] == "nosniff"
        assert headers["Cache-Control"] == "no-store"
        assert "python" not in str(headers).lower()


def test_metrics_serves_prometheus_text_by_default(
    serve: Callable[..., OpsServer], backend: FakeBackend
) -> None:
    server = serve()
    status, headers, body = call(server, "GET", "/metrics")
    assert (status, body) == (200, b"m_total 1\n")
    assert headers["Content-Type"] == "text/plain; version=0.0.4; charset=utf-8"
    assert backend.calls == [("metrics", False)]


@pytest.mark.parametrize(
    ("accept", "openmetrics"),
    [
        ("application/openmetrics-text; version=1.0.0", True),
        (PROMETHEUS_ACCEPT, True),
        ("text/plain", False),
        ("*/*", False),
        ("application/openmetrics-text;q=0", False),
        ("text/plain;q=1, application/openmetrics-text;q=0.5", False),
        ("application/openmetrics-text;q=nonsense", False),
    ],
)
def test_metrics_negotiates_openmetrics_from_accept(
    serve: Callable[..., OpsServer], backend: FakeBackend, accept: str, openmetrics: bool
) -> None:
    server = serve()
    status, headers, _ = call(server, "GET", "/metrics", {"Accept": accept})
    assert status == 200
    assert backend.calls == [("metrics", openmetrics)]
    assert headers["Content-Type"].startswith("application/openmetrics-text") == openmetrics


def test_metrics_without_metrics_answers_503(
    serve: Callable[..., OpsServer], backend: FakeBackend
) -> None:
    backend.metrics_error = LookupError("no /var/secret reader")
    status, _, body = call(serve(), "GET", "/metrics")
    assert (status, body) == (503, b"metrics are not available\n")


def test_metrics_with_an_unsafe_content_type_from_the_backend_is_an_internal_error(
    serve: Callable[..., OpsServer], backend: FakeBackend
) -> None:
    backend.metrics_type = "text/plain\r\nSet-Cookie: x=1"
    status, headers, body = call(serve(), "GET", "/metrics")
    assert (status, body) == (500, b"internal error\n")
    assert "Set-Cookie" not in headers


def test_health_and_metrics_need_no_token(serve: Callable[..., OpsServer]) -> None:
    server = serve(token=TOKEN, host="0.0.0.0")
    for path in ("/livez", "/readyz", "/metrics"):
        assert call(server, "GET", path)[0] == 200


# -- debug and the security model ----------------------------------------------------------


def test_debug_pipeline_answers_json_without_nan(
    serve: Callable[..., OpsServer], backend: FakeBackend
) -> None:
    backend.snapshot = {"stages": [{"name": "parse", "rate": float("nan")}], "p": float("inf")}
    status, headers, body = call(serve(), "GET", "/debug/pipeline")
    assert status == 200
    assert headers["Content-Type"] == "application/json"
    assert headers["Cache-Control"] == "no-store"
    assert json.loads(body) == {"stages": [{"name": "parse", "rate": None}], "p": None}


@pytest.mark.parametrize(
    "authorization",
    [
        None,
        "Bearer wrong-token",
        f"Bearer {TOKEN}x",
        f"Basic {TOKEN}",
        "Bearer",
        f"Bearer {TOKEN} extra",
        f"Bearer{TOKEN}",
        "Bearer \u00e9t\u00e9",
    ],
)
def test_debug_needs_the_right_bearer_token(
    serve: Callable[..., OpsServer], backend: FakeBackend, authorization: str | None
) -> None:
    server = serve(token=TOKEN)
    headers = {} if authorization is None else {"Authorization": authorization}
    for method, path in (("GET", "/debug/pipeline"), ("POST", "/debug/profile/cpu?seconds=1")):
        status, reply_headers, body = call(server, method, path, headers)
        assert status == 401
        assert reply_headers["WWW-Authenticate"].startswith("Bearer")
        assert TOKEN.encode() not in body
    assert backend.calls == []


def test_a_unicode_token_is_compared_as_utf8(serve: Callable[..., OpsServer]) -> None:
    token = "t\u00f6ken!#"
    server = serve(token=token)
    request = "GET /debug/pipeline HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\n\r\n"
    assert status_of(raw(server, request.format(token).encode("utf-8"))) == 200
    assert status_of(raw(server, request.format(token).encode("latin-1"))) == 401


def test_two_authorization_headers_are_refused(
    serve: Callable[..., OpsServer], backend: FakeBackend
) -> None:
    server = serve(token=TOKEN)
    request = (
        f"GET /debug/pipeline HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n"
        "Authorization: Bearer other\r\n\r\n"
    ).encode()
    assert status_of(raw(server, request)) == 401
    assert backend.calls == []


def test_debug_accepts_the_right_token_with_any_scheme_case(
    serve: Callable[..., OpsServer], backend: FakeBackend
) -> None:
    server = serve(token=TOKEN)
    assert call(server, "GET", "/debug/pipeline", AUTH)[0] == 200
    assert call(server, "GET", "/debug/pipeline", {"Authorization": f"bearer {TOKEN}"})[0] == 200
    status, _, body = call(server, "POST", "/debug/profile/cpu?seconds=1", AUTH)
    assert status == 200
    assert json.loads(body)["id"] == "p1"


def test_beyond_loopback_without_token_refuses_debug_but_serves_health(
    serve: Callable[..., OpsServer], backend: FakeBackend
) -> None:
    server = serve(host="0.0.0.0")
    assert server.url == f"http://127.0.0.1:{server.address[1]}"
    for method, path in (
        ("GET", "/debug/pipeline"),
        ("POST", "/debug/profile/cpu?seconds=1"),
        ("GET", "/debug/profiles/p1/svg"),
        ("GET", "/debug/unknown"),
    ):
        status, _, body = call(server, method, path, AUTH)  # connecting via 127.0.0.1
        assert status == 403
        assert b"set ops_token" in body
    assert backend.calls == []
    assert call(server, "GET", "/livez")[0] == 200


def test_beyond_loopback_with_token_serves_debug(serve: Callable[..., OpsServer]) -> None:
    server = serve(host="0.0.0.0", token=TOKEN)
    assert call(server, "GET", "/debug/pipeline")[0] == 401
    assert call(server, "GET", "/debug/pipeline", AUTH)[0] == 200


@pytest.mark.parametrize(
    "headers",
    [
        {"Host": "evil.example:8080"},
        {"Origin": "http://evil.example"},
        {"Origin": "null"},
        {"Origin": "http://127.0.0.1:1"},
    ],
)
def test_debug_without_token_refuses_foreign_host_and_origin(
    serve: Callable[..., OpsServer], backend: FakeBackend, headers: dict[str, str]
) -> None:
    server = serve()
    assert call(server, "POST", "/debug/profile/cpu?seconds=1", headers)[0] == 403
    assert backend.calls == []


def test_debug_without_token_accepts_its_own_origin(serve: Callable[..., OpsServer]) -> None:
    server = serve()
    origin = {"Origin": server.url, "Host": f"localhost:{server.address[1]}"}
    assert call(server, "GET", "/debug/pipeline", origin)[0] == 200


@pytest.mark.parametrize(
    ("host", "expected"),
    [
        ("127.0.0.1", True),
        ("127.10.20.30", True),
        ("::1", True),
        ("[::1]", True),
        ("localhost", True),
        ("LocalHost", True),
        ("::ffff:127.0.0.1", True),
        ("0.0.0.0", False),
        ("::", False),
        ("", False),
        ("10.0.0.1", False),
        ("192.168.1.10", False),
        ("128.0.0.1", False),
        ("localhost.example.com", False),
        ("example.com", False),
    ],
)
def test_is_loopback(host: str, expected: bool) -> None:
    assert is_loopback(host) is expected


def test_token_is_never_logged(
    serve: Callable[..., OpsServer], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="pipekit.ops")
    server = serve(token=TOKEN)
    call(server, "GET", "/debug/pipeline", AUTH)
    call(server, "GET", "/debug/pipeline", {"Authorization": f"Bearer {TOKEN}0"})
    call(server, "GET", f"/debug/{TOKEN}?token={TOKEN}", AUTH)
    call(server, "GET", f"/{TOKEN}")
    assert TOKEN not in caplog.text
    assert TOKEN not in repr(server)
    assert caplog.records  # the requests were logged, only without the token


# -- profiles ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("/debug/profile/cpu?seconds=0.5", ("profile", "cpu", 0.5, None)),
        ("/debug/profile/cpu?seconds=2&rate=250", ("profile", "cpu", 2.0, 250)),
        ("/debug/profile/cpu?rate=1000&seconds=300", ("profile", "cpu", 300.0, 1000)),
        ("/debug/profile/heap?seconds=3", ("profile", "heap", 3.0, None)),
    ],
)
def test_profile_passes_validated_parameters_to_the_backend(
    serve: Callable[..., OpsServer],
    backend: FakeBackend,
    path: str,
    expected: tuple[Any, ...],
) -> None:
    status, headers, body = call(serve(), "POST", path)
    assert status == 200
    assert headers["Cache-Control"] == "no-store"
    assert backend.calls == [expected]
    assert json.loads(body) == {
        "id": "p1",
        "kind": expected[1],
        "metadata": {"rate": expected[3]},
        "files": {"speedscope": "p1.speedscope.json", "svg": "p1.svg"},
        "urls": {"speedscope": "/debug/profiles/p1/speedscope", "svg": "/debug/profiles/p1/svg"},
    }


@pytest.mark.parametrize(
    "query",
    [
        "",
        "?seconds=",
        "?seconds=0",
        "?seconds=-1",
        "?seconds=abc",
        "?seconds=nan",
        "?seconds=inf",
        "?seconds=1e2",
        "?seconds=300.001",
        "?seconds=1&seconds=2",
        "?seconds=1&foo=2",
        "?seconds=1&rate=0",
        "?seconds=1&rate=1001",
        "?seconds=1&rate=1.5",
        "?seconds=1&rate=-5",
        "?seconds=1&rate=00001000000",
        "?seconds=1&rate=",
        "?seconds=%ff",
        "?seconds",
        "?a=1&b=2&c=3&d=4&e=5",
    ],
)
def test_profile_rejects_bad_parameters_before_calling_the_backend(
    serve: Callable[..., OpsServer], backend: FakeBackend, query: str
) -> None:
    status, _, body = call(serve(), "POST", "/debug/profile/cpu" + query)
    assert status == 400
    assert body.endswith(b"\n")
    assert backend.calls == []


def test_profile_seconds_error_names_the_limit(serve: Callable[..., OpsServer]) -> None:
    server = serve(max_profile_seconds=60)
    status, _, body = call(server, "POST", "/debug/profile/cpu?seconds=61")
    assert status == 400
    assert b"<= 60" in body


def test_heap_profile_takes_no_rate(serve: Callable[..., OpsServer], backend: FakeBackend) -> None:
    status, _, _ = call(serve(), "POST", "/debug/profile/heap?seconds=1&rate=10")
    assert status == 400
    assert backend.calls == []


@pytest.mark.parametrize(
    ("error", "status", "shown"),
    [
        (ProfilerBusyError("py-spy runs"), 409, b"another profile is running"),
        (ProfilerError("py-spy is not installed; install pipekit[profiling]"), 503,
         b"py-spy is not installed; install pipekit[profiling]\n"),
        (ConfigError("profiling_dir /srv/secret is not writable"), 400, b"profiler rejected"),
        (RuntimeError("boom at /srv/secret"), 500, b"internal error\n"),
    ],
)  # fmt: skip
def test_profile_maps_backend_errors_to_statuses(
    serve: Callable[..., OpsServer],
    backend: FakeBackend,
    error: BaseException,
    status: int,
    shown: bytes,
) -> None:
    backend.profile_error = error
    got, _, body = call(serve(), "POST", "/debug/profile/cpu?seconds=1")
    assert got == status
    assert shown in body
    assert b"/srv/secret" not in body
    assert b"Traceback" not in body


def test_a_second_concurrent_profile_gets_409_without_reaching_the_backend(
    serve: Callable[..., OpsServer], backend: FakeBackend
) -> None:
    server = serve()
    backend.profile_gate = threading.Event()
    first: list[int] = []
    thread = threading.Thread(
        target=lambda: first.append(call(server, "POST", "/debug/profile/cpu?seconds=5")[0])
    )
    thread.start()
    try:
        assert backend.profile_entered.wait(5)
        assert call(server, "POST", "/debug/profile/heap?seconds=1")[0] == 409
        assert call(server, "POST", "/debug/profile/cpu?seconds=1")[0] == 409
        assert backend.names() == ["profile"]
    finally:
        backend.profile_gate.set()
        thread.join(10)
    assert first == [200]
    assert call(server, "POST", "/debug/profile/heap?seconds=1")[0] == 200


def test_profile_endpoint_is_not_bound_by_the_request_timeout(
    serve: Callable[..., OpsServer], backend: FakeBackend
) -> None:
    server = serve(request_timeout=0.2)
    backend.profile_gate = threading.Event()
    timer = threading.Timer(0.6, backend.profile_gate.set)  # the profile outlasts the timeout
    timer.start()
    try:
        assert call(server, "POST", "/debug/profile/cpu?seconds=1")[0] == 200
    finally:
        timer.join(5)


# -- downloads --------------------------------------------------------------------------


def test_download_serves_the_file_as_an_attachment(
    serve: Callable[..., OpsServer], backend: FakeBackend, tmp_path: Path
) -> None:
    path = tmp_path / "p1.svg"
    path.write_bytes(b"<svg>" + b"x" * 100_000 + b"</svg>")
    backend.files[("p1", "svg")] = (path, "image/svg+xml")
    status, headers, body = call(serve(), "GET", "/debug/profiles/p1/svg")
    assert status == 200
    assert body == path.read_bytes()
    assert headers["Content-Type"] == "image/svg+xml"
    assert headers["Content-Disposition"] == 'attachment; filename="pipekit-profile-p1-svg.svg"'
    assert str(tmp_path) not in str(headers)


def test_download_head_gives_the_size_without_the_body(
    serve: Callable[..., OpsServer], backend: FakeBackend, tmp_path: Path
) -> None:
    path = tmp_path / "p1.bin"
    path.write_bytes(b"\x00" * 1234)
    backend.files[("p1", "bin")] = (path, "application/octet-stream")
    status, headers, body = call(serve(), "HEAD", "/debug/profiles/p1/bin")
    assert (status, headers["Content-Length"], body) == (200, "1234", b"")


def test_download_replaces_an_unsafe_content_type(
    serve: Callable[..., OpsServer], backend: FakeBackend, tmp_path: Path
) -> None:
    path = tmp_path / "p1.html"
    path.write_text("<script>alert(1)</script>")
    backend.files[("p1", "html")] = (path, "text/javascript")
    status, headers, _ = call(serve(), "GET", "/debug/profiles/p1/html")
    assert (status, headers["Content-Type"]) == (200, "application/octet-stream")


@pytest.mark.parametrize("found", ["missing", "directory", "gone", "fifo"])
def test_download_of_an_unknown_profile_is_404(
    serve: Callable[..., OpsServer], backend: FakeBackend, tmp_path: Path, found: str
) -> None:
    if found == "directory":
        backend.files[("p1", "svg")] = (tmp_path, "image/svg+xml")
    elif found == "gone":
        backend.files[("p1", "svg")] = (tmp_path / "deleted.svg", "image/svg+xml")
    elif found == "fifo":
        if not hasattr(os, "mkfifo"):
            pytest.skip("no FIFOs here")
        os.mkfifo(tmp_path / "fifo.svg")  # opening it for reading must not block
        backend.files[("p1", "svg")] = (tmp_path / "fifo.svg", "image/svg+xml")
    status, _, body = call(serve(), "GET", "/debug/profiles/p1/svg")
    assert (status, body) == (404, b"not found\n")
    assert backend.calls == [("profile_file", "p1", "svg")]


@pytest.mark.parametrize(
    "path",
    [
        "/debug/profiles/../../etc/passwd",
        "/debug/profiles/p1/../../../etc/passwd",
        "/debug/profiles/..%2f..%2fetc%2fpasswd/svg",
        "/debug/profiles/%2e%2e/svg",
        "/debug/profiles/%2e%2e%2f%2e%2e/svg",
        "/debug/profiles/..%252f..%252fetc/svg",
        "/debug/profiles/p1/svg%2f..%2f..%2fetc%2fpasswd",
        "/debug/profiles/p1%00/svg",
        "/debug/profiles//etc/svg",
        "/debug/profiles/..\\..\\etc/svg",
        "/debug/profiles/p1/svg/extra",
        "/debug/profiles/p1/passwd",
        "/debug/profiles/" + "a" * 65 + "/svg",
        "/debug/profiles/p1.svg/svg",
        "/debug/profiles/p1/",
        "/debug/profiles/",
        "/debug/profiles",
    ],
)
def test_download_path_traversal_is_404_without_touching_the_backend(
    serve: Callable[..., OpsServer], backend: FakeBackend, path: str
) -> None:
    server = serve(token=TOKEN)
    assert call(server, "GET", path, AUTH)[0] == 404
    assert backend.calls == []


def test_profile_artifacts_are_the_documented_set() -> None:
    assert {"speedscope", "svg", "html", "bin", "summary", "meta"} == PROFILE_ARTIFACTS


# -- routing --------------------------------------------------------------------------


def test_unknown_paths_are_404(serve: Callable[..., OpsServer], backend: FakeBackend) -> None:
    server = serve()
    for path in (
        "/",
        "/livez/",
        "/LIVEZ",
        "/%6civez",
        "/debug",
        "/debug/pipeline/x",
        "/x/../livez",
    ):
        assert call(server, "GET", path)[0] == 404, path
    assert backend.calls == []


@pytest.mark.parametrize(
    ("method", "path", "allow"),
    [
        ("POST", "/livez", "GET, HEAD"),
        ("DELETE", "/metrics", "GET, HEAD"),
        ("PUT", "/debug/pipeline", "GET, HEAD"),
        ("GET", "/debug/profile/cpu?seconds=1", "POST"),
        ("HEAD", "/debug/profile/heap?seconds=1", "POST"),
        ("POST", "/debug/profiles/p1/svg", "GET, HEAD"),
        ("OPTIONS", "/readyz", "GET, HEAD"),
    ],
)
def test_wrong_method_is_405_with_allow(
    serve: Callable[..., OpsServer], backend: FakeBackend, method: str, path: str, allow: str
) -> None:
    status, headers, _ = call(serve(), method, path)
    assert (status, headers["Allow"]) == (405, allow)
    assert backend.calls == []


def test_head_answers_the_get_headers_without_a_body(serve: Callable[..., OpsServer]) -> None:
    server = serve()
    status, headers, body = call(server, "HEAD", "/livez")
    assert (status, headers["Content-Length"], body) == (200, "3", b"")
    status, headers, body = call(server, "HEAD", "/metrics")
    assert (status, headers["Content-Length"], body) == (200, "10", b"")


def test_absolute_form_target_and_leading_blank_lines_are_accepted(
    serve: Callable[..., OpsServer],
) -> None:
    server = serve()
    reply = raw(server, b"\r\nGET http://127.0.0.1/livez HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    assert status_of(reply) == 200
    request = b"GET http://%s/debug/pipeline HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
    assert status_of(raw(server, request % b"localhost:1")) == 200
    assert status_of(raw(server, request % b"evil.example")) == 403  # DNS rebinding


def test_backend_errors_are_500_without_detail_and_logged(
    serve: Callable[..., OpsServer], backend: FakeBackend, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR, logger="pipekit.ops")
    backend.failure = RuntimeError("secret detail in /srv/secret")
    server = serve()
    for method, path in (
        ("GET", "/livez"),
        ("GET", "/readyz"),
        ("GET", "/metrics"),
        ("GET", "/debug/pipeline"),
        ("POST", "/debug/profile/cpu?seconds=1"),
        ("GET", "/debug/profiles/p1/svg"),
    ):
        status, _, body = call(server, method, path)
        assert (status, body) == (500, b"internal error\n")
    errors = [r for r in caplog.records if r.name == "pipekit.ops" and r.exc_info]
    assert len(errors) == 6
    assert call(server, "GET", "/nope")[0] == 404  # still serving


def test_unserializable_snapshot_is_an_internal_error(
    serve: Callable[..., OpsServer], backend: FakeBackend
) -> None:
    backend.snapshot = {"lock": threading.Lock()}
    assert call(serve(), "GET", "/debug/pipeline")[::2] == (500, b"internal error\n")


# -- the HTTP layer ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("request_bytes", "status"),
    [
        (b"GARBAGE\r\n\r\n", 400),
        (b"GET /livez\r\n\r\n", 400),
        (b"GET  /livez HTTP/1.1\r\nHost: x\r\n\r\n", 400),
        (b"GET livez HTTP/1.1\r\nHost: x\r\n\r\n", 400),
        (b"GET /livez HTTP/1.1\r\n\r\n", 400),
        (b"GET /livez HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400),
        (b"GET /livez HTTP/2.0\r\nHost: x\r\n\r\n", 505),
        (b"GET /livez HTTP/0.9\r\nHost: x\r\n\r\n", 505),
        (b"GET /livez HTTPS/1.1\r\nHost: x\r\n\r\n", 400),
        (b"GET /livez HTTP/1.1\r\nHost : x\r\n\r\n", 400),
        (b"GET /livez HTTP/1.1\r\nHost: x\r\nNo-Colon\r\n\r\n", 400),
        (b"GET /livez HTTP/1.1\r\nHost: x\r\nX-A: 1\r\n  folded\r\n\r\n", 400),
        (b"GET /livez HTTP/1.1\r\nHost: x\r\nX-A: a\x01b\r\n\r\n", 400),
        (b"GET /livez HTTP/1.1\r\nHost: x\r\nX-A: a\rb\r\n\r\n", 400),
        (b"GET /li\xffvez HTTP/1.1\r\nHost: x\r\n\r\n", 400),
        (b"GET /livez HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n", 400),
        (b"GET /livez HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n", 400),
        (
            b"GET /livez HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab",
            400,
        ),
        (b"POST /livez HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 501),
        (b"GET /livez HTTP/1.1\r\nHost: x\r\nExpect: magic\r\n\r\n", 417),
        (b"GET /livez HTTP/1.1\r\nHost: x\r\n", 400),
        (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n", 400),
    ],
)
def test_malformed_requests_get_an_error_and_the_connection_closes(
    serve: Callable[..., OpsServer], backend: FakeBackend, request_bytes: bytes, status: int
) -> None:
    reply = raw(serve(), request_bytes)  # raw() returns only once the server closes
    assert status_of(reply) == status
    assert b"Connection: close\r\n" in reply
    assert backend.calls == []


def test_oversized_headers_are_431(serve: Callable[..., OpsServer]) -> None:
    server = serve()
    big = b"GET /livez HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 9000 + b"\r\n\r\n"
    assert status_of(raw(server, big)) == 431
    endless = b"GET /livez HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 20000
    assert status_of(raw(server, endless, close_write=False)) == 431


def test_too_many_headers_are_431(serve: Callable[..., OpsServer]) -> None:
    server = serve(max_header_bytes=65536)
    many = b"".join(b"X-%d: 1\r\n" % i for i in range(101))
    assert status_of(raw(server, b"GET /livez HTTP/1.1\r\nHost: x\r\n" + many + b"\r\n")) == 431


def test_a_too_long_request_line_is_414(serve: Callable[..., OpsServer]) -> None:
    assert status_of(raw(serve(), b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\n\r\n")) == 414


def test_a_body_over_the_limit_is_413_and_a_small_one_is_read(
    serve: Callable[..., OpsServer], backend: FakeBackend
) -> None:
    server = serve(max_body_bytes=100)
    assert call(server, "POST", "/debug/profile/cpu?seconds=1", body=b"x" * 101)[0] == 413
    assert backend.calls == []
    assert call(server, "POST", "/debug/profile/cpu?seconds=1", body=b"x" * 100)[0] == 200


def test_a_large_body_over_the_limit_still_gets_its_413(serve: Callable[..., OpsServer]) -> None:
    head = b"POST /livez HTTP/1.1\r\nHost: x\r\nContent-Length: 200000\r\n\r\n"
    reply = raw(serve(), head + b"x" * 200_000)  # unread input must not reset the reply away
    assert status_of(reply) == 413


def test_expect_100_continue_gets_an_interim_response(serve: Callable[..., OpsServer]) -> None:
    server = serve()
    with socket.create_connection(endpoint(server), timeout=5) as sock:
        sock.sendall(
            b"POST /debug/profile/cpu?seconds=1 HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            b"Expect: 100-continue\r\nContent-Length: 5\r\n\r\n"
        )
        assert sock.recv(100) == b"HTTP/1.1 100 Continue\r\n\r\n"
        sock.sendall(b"hello")
        assert read_response(sock).status == 200


def test_http11_keeps_the_connection_alive(serve: Callable[..., OpsServer]) -> None:
    server = serve()
    conn = http.client.HTTPConnection(*endpoint(server), timeout=5)
    try:
        conn.request("GET", "/livez")
        assert conn.getresponse().read() == b"ok\n"
        first = conn.sock
        conn.request("GET", "/readyz")
        assert conn.getresponse().read() == b"ok\n"
        assert conn.sock is first
        conn.request("GET", "/livez", headers={"Connection": "close"})
        resp = conn.getresponse()
        assert resp.getheader("Connection") == "close"
        resp.read()
    finally:
        conn.close()


def test_http11_pipelined_requests_are_answered_in_order(serve: Callable[..., OpsServer]) -> None:
    server = serve()
    reply = raw(
        server,
        b"GET /livez HTTP/1.1\r\nHost: x\r\n\r\nGET /nope HTTP/1.1\r\nHost: x\r\n\r\n"
        b"GET /readyz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    assert re.findall(rb"HTTP/1\.1 (\d+)", reply) == [b"200", b"404", b"200"]


def test_input_after_a_closing_request_does_not_reset_the_reply(
    serve: Callable[..., OpsServer],
) -> None:
    request = b"GET /livez HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    assert status_of(raw(serve(), request + b"junk" * 50_000)) == 200


def test_http10_closes_unless_keep_alive_is_asked(serve: Callable[..., OpsServer]) -> None:
    server = serve()
    reply = raw(server, b"GET /livez HTTP/1.0\r\n\r\n", close_write=False)
    assert status_of(reply) == 200
    assert b"Connection: close\r\n" in reply
    with socket.create_connection(endpoint(server), timeout=5) as sock:
        for _ in range(2):
            sock.sendall(b"GET /livez HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
            resp = read_response(sock)
            assert (resp.status, resp.getheader("Connection")) == (200, "keep-alive")


def test_an_idle_client_is_dropped_after_the_request_timeout(
    serve: Callable[..., OpsServer],
) -> None:
    server = serve(request_timeout=0.3, max_connections=1)
    with socket.create_connection(endpoint(server), timeout=5) as idle:
        assert idle.recv(100) == b""  # closed by the server, well before our 5 s
    assert call(server, "GET", "/livez")[0] == 200  # the only worker slot is free again


def test_a_slow_header_sender_is_dropped_after_the_request_timeout(
    serve: Callable[..., OpsServer],
) -> None:
    server = serve(request_timeout=0.5)
    reply = b""
    with socket.create_connection(endpoint(server), timeout=5) as sock:
        sock.sendall(b"GET /livez HTTP/1.1\r\nHost: x\r\n")
        for _ in range(50):  # one byte every 0.1 s would never end a per-read timeout
            try:
                sock.sendall(b"X")
            except OSError:
                break
            readable, _, _ = select.select([sock], [], [], 0.1)
            if readable:
                with contextlib.suppress(OSError):
                    reply = sock.recv(4096)
                break
        else:
            pytest.fail("the server kept a slow client beyond 5 s")
    assert reply == b"" or status_of(reply) == 408


def test_connections_over_the_limit_get_503(serve: Callable[..., OpsServer]) -> None:
    server = serve(max_connections=2)
    held = [http.client.HTTPConnection(*endpoint(server), timeout=5) for _ in range(2)]
    try:
        for conn in held:  # each connection now holds a worker, waiting for its next request
            conn.request("GET", "/livez")
            assert conn.getresponse().read() == b"ok\n"
        with socket.create_connection(endpoint(server), timeout=5) as extra:
            reply = b"".join(iter(lambda: extra.recv(4096), b""))
        assert status_of(reply) == 503
        assert reply.endswith(b"too many connections\n")
    finally:
        for conn in held:
            conn.close()
    for _ in range(100):  # the freed slots are taken again (bounded wait for the close)
        with contextlib.suppress(OSError):
            if call(server, "GET", "/livez")[0] == 200:
                break
        time.sleep(0.02)
    else:
        pytest.fail("the server did not free its connection slots")


# -- lifecycle --------------------------------------------------------------------------


def test_stop_closes_connections_and_leaves_no_thread(backend: FakeBackend) -> None:
    before = set(threading.enumerate())
    server = OpsServer(backend, port=0)
    server.start()
    names = {t.name for t in threading.enumerate()}
    assert "pipekit-ops" in names
    conn = http.client.HTTPConnection(*endpoint(server), timeout=5)
    conn.request("GET", "/livez")
    conn.getresponse().read()  # a keep-alive connection with its own thread
    assert any(
        name.startswith("pipekit-ops-conn-") for t in threading.enumerate() for name in [t.name]
    )
    assert server.stop(timeout=5)
    assert set(threading.enumerate()) == before
    conn.close()
    with pytest.raises(OSError):
        socket.create_connection(server.address, timeout=1).close()
    assert server.stop()  # idempotent


def test_stop_reports_a_profile_still_running_and_can_wait_again(
    backend: FakeBackend, no_thread_leak: None
) -> None:
    server = OpsServer(backend, port=0)
    server.start()
    backend.profile_gate = threading.Event()
    outcome: list[object] = []

    def ask() -> None:
        try:
            outcome.append(call(server, "POST", "/debug/profile/cpu?seconds=5")[0])
        except (OSError, http.client.HTTPException) as err:
            outcome.append(type(err))

    client = threading.Thread(target=ask)
    client.start()
    try:
        assert backend.profile_entered.wait(5)
        assert server.stop(timeout=0.1) is False  # the profile holds its thread
    finally:
        backend.profile_gate.set()
    assert server.stop(timeout=5) is True
    client.join(5)
    assert outcome  # the client got an answer or saw the connection close


def test_lifecycle_errors(backend: FakeBackend, no_thread_leak: None) -> None:
    server = OpsServer(backend, port=0)
    with pytest.raises(PipelineStateError):
        _ = server.url
    assert server.stop()  # never started
    with server:
        assert server.url == f"http://127.0.0.1:{server.address[1]}"
        assert server.address[1] != 0
        with pytest.raises(PipelineStateError):
            server.start()
    with pytest.raises(PipelineStateError):
        server.start()


def test_a_port_in_use_raises_oserror(backend: FakeBackend, no_thread_leak: None) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        server = OpsServer(backend, port=taken.getsockname()[1])
        with pytest.raises(OSError, match="ops_port"):
            server.start()


def test_ipv6_loopback_url(serve: Callable[..., OpsServer]) -> None:
    try:
        server = serve(host="::1")
    except OSError:
        pytest.skip("no IPv6 loopback here")
    assert server.url == f"http://[::1]:{server.address[1]}"
    assert call(server, "GET", "/debug/pipeline")[0] == 200


@pytest.mark.parametrize(
    "kwargs",
    [
        {"port": -1},
        {"port": 65536},
        {"port": True},
        {"host": ""},
        {"host": "local host"},
        {"token": ""},
        {"token": "has space"},
        {"token": "tab\there"},
        {"token": "bell\x07"},
        {"token": b"bytes"},
        {"max_profile_seconds": 0},
        {"max_profile_seconds": float("nan")},
        {"request_timeout": -1.0},
        {"request_timeout": float("inf")},
        {"max_connections": 0},
        {"max_header_bytes": 10},
        {"max_body_bytes": -1},
    ],
)
def test_invalid_settings_raise_config_error(backend: FakeBackend, kwargs: dict[str, Any]) -> None:
    with pytest.raises(ConfigError) as info:
        OpsServer(backend, **kwargs)
    assert "has space" not in str(info.value)  # a bad token is never echoed


# -- fuzzing ------------------------------------------------------------------------------

_TEXT = st.text(st.characters(codec="utf-8", exclude_categories=["Cs"]), max_size=24)
_ASCII = st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), max_size=16)
_METHODS = st.sampled_from(["GET", "GET", "HEAD", "POST", "POST", "PUT", "OPTIONS", "get", "G\tT"])
_KNOWN_PATHS = st.sampled_from(
    [
        "/livez",
        "/readyz",
        "/metrics",
        "/debug/pipeline",
        "/debug/profile/cpu",
        "/debug/profile/heap",
        "/debug/profiles/p1/svg",
        "/debug/profiles/p1/meta",
        "/debug/profiles/../../etc/passwd",
        "/debug/profiles/%2e%2e/svg",
        "/debug/",
        f"/{TOKEN}",
        "*",
        "http://127.0.0.1/debug/pipeline",
    ]
)
_ODD_PATHS = st.one_of(_ASCII.map(lambda text: "/" + text), _TEXT.map(lambda text: "/" + text))
_QUERIES = st.one_of(
    st.sampled_from(
        ["", "?seconds=0.001", "?seconds=1&rate=5", f"?token={TOKEN}", "?seconds=1e9", "?rate=9"]
    ),
    _ASCII.map(lambda text: "?" + text),
)
_HEADER_NAMES = st.sampled_from(
    ["Host", "Authorization", "Authorization", "Content-Length", "Transfer-Encoding",
     "Connection", "Expect", "Accept", "Origin", "X-Any", "Bad Name", ""]
)  # fmt: skip
_HEADER_VALUES = st.one_of(
    st.sampled_from(
        [f"Bearer {TOKEN}", f"Bearer {TOKEN}", "Bearer nope", f"Basic {TOKEN}", "127.0.0.1",
         "0", "3", "-1", "99999999999999999999", "chunked", "close", "keep-alive",
         "100-continue", "application/openmetrics-text", "http://evil.example"]
    ),
    _ASCII,
    _TEXT,
)  # fmt: skip


@st.composite
def _plausible_requests(draw: st.DrawFn) -> bytes:
    """Mostly well-formed requests, so the fuzzing reaches the routes and the backend."""
    path = draw(_KNOWN_PATHS) if draw(st.integers(0, 3)) else draw(_ODD_PATHS)
    line = f"{draw(_METHODS)} {path}{draw(_QUERIES)} "
    line += draw(
        st.sampled_from(["HTTP/1.1", "HTTP/1.1", "HTTP/1.1", "HTTP/1.0", "HTTP/2.0", "HTTP/1.1 x"])
    )
    headers = [("Host", "127.0.0.1")] if draw(st.integers(0, 3)) < 3 else []
    if draw(st.integers(0, 2)) < 2:
        headers.append(("Authorization", f"Bearer {TOKEN}"))
    headers += draw(st.lists(st.tuples(_HEADER_NAMES, _HEADER_VALUES), max_size=5))
    newline = draw(st.sampled_from(["\r\n", "\r\n", "\r\n", "\n", "\r"]))
    head = newline.join([line, *(f"{name}: {value}" for name, value in headers)])
    return (head + newline * 2).encode("utf-8") + draw(st.binary(max_size=40))


@st.composite
def _mutated_requests(draw: st.DrawFn) -> bytes:
    """A plausible request with a few bytes replaced or inserted anywhere."""
    data = bytearray(draw(_plausible_requests()))
    for _ in range(draw(st.integers(1, 3))):
        at = draw(st.integers(0, len(data)))
        junk = draw(st.binary(min_size=1, max_size=6))
        data[at : at + draw(st.integers(0, 2))] = junk
    return bytes(data)


@st.composite
def _requests(draw: st.DrawFn) -> bytes:
    """Plausible requests two times in three, then mutated ones, then random bytes."""
    kind = draw(st.integers(0, 5))
    if kind < 4:
        return draw(_plausible_requests())
    return draw(_mutated_requests() if kind == 4 else st.binary(max_size=200))


_REQUESTS = _requests()


_PROFILE_REQUEST = (
    f"POST /debug/profile/cpu?seconds=0.01&rate=9 HTTP/1.1\r\nHost: 127.0.0.1\r\n"
    f"Authorization: Bearer {TOKEN}\r\nContent-Length: 4\r\n\r\nbody"
).encode()
_DOWNLOAD_REQUEST = (
    f"GET /debug/profiles/p1/svg HTTP/1.0\r\nAuthorization: Bearer {TOKEN}\r\n\r\n"
).encode()


def test_fuzzed_requests_never_crash_leak_or_stop_the_server(
    serve: Callable[..., OpsServer], backend: FakeBackend, tmp_path: Path
) -> None:
    server = serve(token=TOKEN, request_timeout=2.0)
    artifact = tmp_path / "p1.svg"
    artifact.write_bytes(b"<svg/>")
    backend.files[("p1", "svg")] = (artifact, "image/svg+xml")

    @settings(
        max_examples=200,
        deadline=None,
        derandomize=True,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
    )
    @given(request_bytes=_REQUESTS)
    @example(request_bytes=_PROFILE_REQUEST)
    @example(request_bytes=_DOWNLOAD_REQUEST)
    @example(request_bytes=_DOWNLOAD_REQUEST.replace(b"p1/svg", b"p1/svg%2f..%2f..%2fx"))
    def check(request_bytes: bytes) -> None:
        reply = raw(server, request_bytes)
        assert reply == b"" or STATUS_LINE.match(reply), reply[:200]
        assert TOKEN.encode() not in reply
        assert b"Traceback" not in reply
        assert str(tmp_path).encode() not in reply
        for line in re.findall(rb"HTTP/1\.1 (\d{3}) ", reply):
            assert int(line) < 500 or int(line) in (501, 503, 505)

    check()
    assert {"profile", "profile_file"} <= set(backend.names())  # the backend was reached
    assert call(server, "GET", "/livez")[0] == 200
