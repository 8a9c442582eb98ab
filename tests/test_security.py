"""Hostile input against a real running pipeline, and its security defaults.

``tests/test_ops.py`` fuzzes the bare server with a fake backend; here the backend is a
live run (``Pipeline(..., ops_enabled=True)``) with a real profile store, so the
fuzzing reaches the profiler, the store's file look-ups and the run's stats. After the
storm the run must still process and account for every item, and no response may carry
a stack trace, the token, the profile folder or any other file path.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import logging
import random
import re
import socket
import string
import threading
import time
from collections import Counter
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from _chaos_helpers import identity
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import pipekit
from pipekit import telemetry
from pipekit.config import SETTINGS

TOKEN = "Sec-9f2c7d1b0e4a4b5c-ops"
STATUS_LINE = re.compile(rb"HTTP/1\.1 [1-5][0-9][0-9] [A-Za-z][A-Za-z -]*\r\n")
# things that only a leaked path or trace would put in a response
PATHISH = re.compile(rb"(/tmp/|/work/|/root/|/home/|/usr/|/etc/|/proc/|site-packages|"
                     rb"\.py\b|File \"|Traceback)")

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def _pipe(name: str, tmp_path: Path, **settings: Any) -> pipekit.Pipeline:
    settings.setdefault("ops_enabled", True)
    settings.setdefault("ops_port", 0)
    settings.setdefault("max_memory_mb", None)
    settings.setdefault("telemetry", False)
    settings.setdefault("profiling_dir", tmp_path / "secret-profile-folder")
    pipe = pipekit.Pipeline(name, **settings)
    pipe.add_stage("a", identity, workers=2)
    return pipe


def _port(run: pipekit.Run) -> int:
    assert run.ops_url is not None
    return int(run.ops_url.rsplit(":", 1)[1])


def _call(port: int, method: str, path: str, *, token: str | None = None,
          headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        hdrs = dict(headers or {})
        if token is not None:
            hdrs["Authorization"] = f"Bearer {token}"
        conn.request(method, path, headers=hdrs)
        resp = conn.getresponse()
        return resp.status, dict(resp.getheaders()), resp.read()
    finally:
        conn.close()


def _raw(port: int, data: bytes) -> bytes:
    """Send bytes on a fresh connection, half-close, and read until the server closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(data)
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_WR)
        chunks = []
        with contextlib.suppress(ConnectionResetError):
            while chunk := sock.recv(65536):
                chunks.append(chunk)
    return b"".join(chunks)


@contextlib.contextmanager
def _captured_logs() -> Iterator[list[str]]:
    """Every pipekit log record, formatted with its arguments, at DEBUG level."""
    lines: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(record.getMessage())
            if record.exc_info and record.exc_info[1] is not None:
                lines.append(repr(record.exc_info[1]))

    logger = logging.getLogger("pipekit")
    handler, level = Keep(logging.DEBUG), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    try:
        yield lines
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


# -- fuzzing a running pipeline ----------------------------------------------------------------

_ARTIFACTS = ["speedscope", "svg", "meta", "html", "bin", "summary", "x", ""]


def _paths(real_id: str) -> st.SearchStrategy[str]:
    fixed = [
        "/livez", "/readyz", "/metrics", "/debug", "/debug/", "/debug/pipeline",
        "/debug/profile/cpu", "/debug/profile/heap", "/debug/profile/", "/debug/profiles/",
        f"/debug/profiles/{real_id}/svg", f"/debug/profiles/{real_id}/meta",
        f"/debug/profiles/{real_id}/speedscope", f"/debug/profiles/{real_id}",
        f"/debug/profiles/{real_id}/../../../../etc/passwd",
        f"/debug/profiles/{real_id}/svg/../../secret",
        f"/debug/profiles/{real_id}%2f..%2f..%2fsecret/svg",
        "/debug/profiles/..%2f..%2f..%2fetc%2fpasswd/meta",
        "/debug/profiles/%2e%2e/%2e%2e/svg", "/debug/profiles/../svg",
        "/debug/profiles/~root/svg", "/debug/profiles/a\\..\\b/svg",
        "//etc/passwd", "/../../etc/passwd", "/%2e%2e/%2e%2e/etc/passwd",
        "http://127.0.0.1/debug/pipeline", "http://evil.example/debug/pipeline",
        "https://127.0.0.1:1/debug/profiles/x/svg", "*", "/" + TOKEN,
    ]
    odd = st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), max_size=30)
    artifact = st.tuples(st.sampled_from([real_id, "a" * 65, "x", "-", "_"]),
                         st.sampled_from(_ARTIFACTS)).map(
        lambda p: f"/debug/profiles/{p[0]}/{p[1]}")
    return st.one_of(st.sampled_from(fixed), artifact, odd.map(lambda t: "/" + t),
                     odd.map(lambda t: "/debug/" + t))


_QUERIES = st.one_of(
    st.sampled_from(["", "", "?seconds=0.05", "?seconds=0.05&rate=50", "?seconds=1",
                     "?seconds=1e9", "?seconds=-1", "?seconds=nan", "?seconds=inf",
                     "?seconds=0", "?rate=100000&seconds=0.05", "?seconds=0.05&seconds=0.05",
                     f"?token={TOKEN}", "?path=/etc/passwd", "?seconds=0.05&file=../../x",
                     "?%00=1", "?seconds=%30.05", "?&&&", "?seconds"]),
    st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), max_size=20).map(
        lambda t: "?" + t),
)
_TOKENS = st.one_of(
    st.sampled_from([TOKEN, TOKEN, TOKEN, TOKEN[:-1], TOKEN + "x", TOKEN.upper(), "",
                     " " + TOKEN, TOKEN + " junk"]),
    st.text(string.ascii_letters + string.digits + "-_.~+/=", max_size=40),
)
_AUTH = st.one_of(
    _TOKENS.map(lambda t: f"Bearer {t}"),
    _TOKENS.map(lambda t: f"bearer {t}"),
    _TOKENS.map(lambda t: f"Basic {t}"),
    _TOKENS,
)
_HOSTS = st.sampled_from(["localhost", "evil.example", "[::1]", "", "a b",
                          "127.0.0.1:1"])
_EXTRA = st.one_of(
    st.tuples(st.just("Content-Length"), st.sampled_from(["0", "3", "-1", "1e3", "2000",
                                                          "99999999999999999999", "1,2"])),
    st.tuples(st.sampled_from(["Transfer-Encoding", "Connection", "Expect", "Origin",
                               "Accept", "X-Forwarded-For", "Cookie"]),
              st.sampled_from(["chunked", "close", "keep-alive", "100-continue",
                               "http://evil.example", "application/openmetrics-text",
                               "127.0.0.1", f"token={TOKEN}"])),
)
_JUNK_HEADER = st.tuples(
    st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), max_size=12),
    st.text(max_size=20))
_METHODS = st.sampled_from(["GET", "GET", "GET", "HEAD", "POST", "POST", "POST", "PUT",
                            "DELETE", "OPTIONS", "TRACE", "CONNECT", "get", "PATCH"])


@st.composite
def _requests(draw: st.DrawFn, real_id: str) -> bytes:
    """Mostly well-formed requests (so they reach the routes and the backend), some not.

    The shape (version, which headers, mangling) is chosen with odds of our own from a
    drawn seed: Hypothesis favours the edges of every range, which would make almost
    every request malformed and stop it at the parser.
    """
    rng = random.Random(draw(st.integers(0, 2**32 - 1)))
    version = "HTTP/1.1" if rng.random() < 0.85 else rng.choice(
        ["HTTP/1.0", "HTTP/2.0", "HTTP/1.1 x", "HTTP/1.1\x00"])
    line = f"{draw(_METHODS)} {draw(_paths(real_id))}{draw(_QUERIES)} {version}"
    headers: list[tuple[str, str]] = []
    if rng.random() < 0.9:  # one Host header, hostile one time in ten
        headers.append(("Host", draw(_HOSTS) if rng.random() < 0.1 else "127.0.0.1"))
    roll = rng.random()
    if roll < 0.8:  # the right token most of the time, anything else sometimes, or none
        headers.append(("Authorization", draw(_AUTH) if roll < 0.2 else f"Bearer {TOKEN}"))
    if rng.random() < 0.4:
        headers += draw(st.lists(_EXTRA, min_size=1, max_size=2))
    if rng.random() < 0.1:
        headers.append(draw(_JUNK_HEADER))
    nl = "\r\n" if rng.random() < 0.9 else "\n"
    head = nl.join([line, *(f"{k}: {v}" for k, v in headers)]) + nl * 2
    data = bytearray(head.encode("utf-8") + draw(st.binary(max_size=40)))
    if rng.random() < 0.1:  # a few mangled requests
        for _ in range(rng.randint(1, 3)):
            at = rng.randint(0, len(data))
            data[at:at + rng.randint(0, 2)] = rng.randbytes(rng.randint(1, 6))
    return bytes(data)


def _is_debug(request: bytes) -> bool:
    """Whether the request line names a path under ``/debug``."""
    parts = request.split(b"\n", 1)[0].split(b" ")
    if len(parts) < 2:
        return False
    target = parts[1].decode("latin-1")
    path = target if target.startswith("/") else urlsplit(target).path
    return path.startswith("/debug")


def test_fuzzed_requests_never_crash_leak_or_stop_a_running_pipeline(tmp_path: Path) -> None:
    folder = tmp_path / "secret-profile-folder"
    pipe = _pipe("fuzzed", tmp_path, ops_token=TOKEN, profiling_max_seconds=0.1,
                 profiling_dir=folder)
    outs: list[int] = []
    submitted: list[int] = []
    secrets = [TOKEN.encode(), str(folder).encode(), str(folder.resolve()).encode(),
               str(tmp_path).encode()]
    statuses: Counter[int] = Counter()
    with _captured_logs() as logs:
        run = pipe.start(sink=outs.append, keep_dead_letters=True)
        try:
            port = _port(run)
            # a real profile, so downloads reach real files
            status, _, body = _call(port, "POST", "/debug/profile/cpu?seconds=0.05&rate=50",
                                    token=TOKEN)
            assert status == 200, body
            made = json.loads(body)
            assert not any(s in body for s in secrets) and b"/" not in json.dumps(
                made["files"]).encode()
            real_id = made["id"]
            for url in made["urls"].values():
                status, headers, body = _call(port, "GET", url, token=TOKEN)
                assert status == 200 and "attachment" in headers["Content-Disposition"]
                assert not any(s in body for s in secrets)

            @settings(max_examples=200, deadline=None, derandomize=True,
                      suppress_health_check=[HealthCheck.too_slow,
                                             HealthCheck.function_scoped_fixture])
            @given(request=_requests(real_id))
            @example(request=(f"POST /debug/profile/heap?seconds=0.05 HTTP/1.1\r\nHost: x\r\n"
                              f"Authorization: Bearer {TOKEN}\r\n\r\n").encode())
            @example(request=(f"GET /debug/profiles/{real_id}/svg%2f..%2f..%2fx HTTP/1.0\r\n"
                              f"Authorization: Bearer {TOKEN}\r\n\r\n").encode())
            def check(request: bytes) -> None:
                item = len(submitted)
                run.submit(item, timeout=5)  # the run keeps taking items during the storm
                submitted.append(item)
                reply = _raw(port, request)
                assert reply == b"" or STATUS_LINE.match(reply), reply[:200]
                for secret in secrets:
                    assert secret not in reply, (secret, reply[:300])
                download = b"Content-Disposition: attachment" in reply
                if not download:  # artifacts hold source paths by nature: not a leak
                    assert not PATHISH.search(reply), reply[:300]
                for code in re.findall(rb"HTTP/1\.1 (\d{3}) ", reply):
                    statuses[int(code)] += 1
                    assert int(code) < 500 or int(code) in (501, 503, 505), reply[:300]
                if reply.startswith(b"HTTP/1.1 200") and _is_debug(request):
                    assert TOKEN.encode() in request, request  # no way in without it

            check()
            # the pipeline is unharmed: healthy, ready, and processing
            assert _call(port, "GET", "/livez")[0] == 200
            assert _call(port, "GET", "/readyz")[0] == 200
            for k in range(len(submitted), len(submitted) + 50):
                run.submit(k, timeout=5)
                submitted.append(k)
        finally:
            report = run.shutdown(timeout=10)
    assert {200, 400, 401, 404, 405} <= set(statuses)  # the storm reached every branch
    assert Counter(outs) == Counter(submitted) and report.outputs == len(submitted)
    assert report.submitted == len(submitted) and not report.unprocessed
    assert report.reason == "shutdown"
    for line in logs:
        assert TOKEN not in line, line


# -- settings -----------------------------------------------------------------------------

_WILD = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**70), 2**70),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12),
    st.binary(max_size=6), st.lists(st.integers(-3, 3), max_size=3),
    st.tuples(st.integers(-1, 5), st.integers(-1, 5)),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
    st.sampled_from([timedelta(seconds=-1), timedelta(days=10**6), Path("/nonexistent/x"),
                     object(), float("nan"), "1e999", "nan", "-1", "0", "SIGKILL", "\x00",
                     "127.0.0.1", "0.0.0.0", "cpu,heap,cpu", ("cpu",), ()]),
)


@settings(max_examples=300, deadline=None, derandomize=True)
@given(values=st.dictionaries(st.sampled_from([s.name for s in SETTINGS]), _WILD,
                              min_size=1, max_size=3))
def test_fuzzed_pipeline_settings_raise_only_config_errors(values: dict[str, Any]) -> None:
    values = {**values, "ops_token": values.get("ops_token", TOKEN)}
    outcome: Any
    try:
        outcome = pipekit.Pipeline("fz", **values).config
    except pipekit.ConfigError as err:  # anything else fails the test
        outcome = err
    assert TOKEN not in str(outcome) and TOKEN not in repr(outcome)


@settings(max_examples=200, deadline=None, derandomize=True)
@given(name=_WILD, options=st.dictionaries(
    st.sampled_from(["workers", "executor", "batch_size", "ordered", "key", "retry",
                     "timeout", "on_shutdown", "fanout", "mp_context"]), _WILD, max_size=3))
def test_fuzzed_stage_options_raise_only_config_errors(name: Any,
                                                       options: dict[str, Any]) -> None:
    pipe = pipekit.Pipeline("fz", max_memory_mb=None, telemetry=False)
    with contextlib.suppress(pipekit.ConfigError):
        pipe.add_stage(name if name is not None else "s", identity, **options)


# -- security defaults, proven on a running pipeline ----------------------------------------


def _outside_address() -> str | None:
    """A non-loopback address of this machine, if it has one."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("192.0.2.1", 9))  # TEST-NET-1: nothing is sent for a UDP connect
        except OSError:
            return None
        addr: str = s.getsockname()[0]
    return None if addr.startswith("127.") or addr == "0.0.0.0" else addr


def test_the_ops_server_binds_loopback_unless_told_otherwise(tmp_path: Path) -> None:
    assert pipekit.Config().ops_host == "127.0.0.1"
    with _pipe("loop", tmp_path).start() as run:
        server = run._ext["ops"]
        assert server.address[0] == "127.0.0.1"
        assert run.ops_url == f"http://127.0.0.1:{server.address[1]}"
        assert _call(server.address[1], "GET", "/livez")[0] == 200
        outside = _outside_address()
        if outside is not None:  # not reachable from another interface
            with pytest.raises(OSError):
                socket.create_connection((outside, server.address[1]), timeout=2).close()


def test_debug_endpoints_refuse_a_missing_or_wrong_token(tmp_path: Path) -> None:
    with _pipe("tok", tmp_path, ops_token=TOKEN, profiling_max_seconds=5).start() as run:
        port = _port(run)
        real_id = run.profile_cpu(0.05, rate=50).id
        guarded = [("GET", "/debug/pipeline"), ("POST", "/debug/profile/cpu?seconds=0.05"),
                   ("POST", "/debug/profile/heap?seconds=0.05"),
                   ("GET", f"/debug/profiles/{real_id}/svg"), ("GET", "/debug/nothing")]
        for method, path in guarded:
            for token in (None, "", "wrong", TOKEN[:-1], TOKEN + "x", TOKEN.lower()):
                status, headers, body = _call(port, method, path, token=token)
                assert status == 401, (method, path, token, status)
                assert headers["WWW-Authenticate"].startswith("Bearer")
                assert TOKEN.encode() not in body
            # a token in the query string or a cookie is no token
            status, _, _ = _call(port, method, path + ("&" if "?" in path else "?")
                                 + f"token={TOKEN}", headers={"Cookie": f"token={TOKEN}"})
            assert status == 401
        assert _call(port, "GET", "/debug/pipeline", token=TOKEN)[0] == 200
        assert _call(port, "GET", f"/debug/profiles/{real_id}/svg", token=TOKEN)[0] == 200
        for open_path in ("/livez", "/readyz"):  # health needs no token
            assert _call(port, "GET", open_path)[0] == 200


def test_the_token_is_compared_in_constant_time(tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    import hmac

    from pipekit import ops

    seen: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest

    def spy(a: Any, b: Any) -> bool:
        seen.append((a, b))
        return real(a, b)

    assert ops.hmac is hmac  # type: ignore[attr-defined]  # the server looks it up per call
    monkeypatch.setattr(hmac, "compare_digest", spy)
    with _pipe("ct", tmp_path, ops_token=TOKEN).start() as run:
        port = _port(run)
        assert _call(port, "GET", "/debug/pipeline", token="guess")[0] == 401
        assert _call(port, "GET", "/debug/pipeline", token=TOKEN)[0] == 200
    assert seen == [(b"guess", TOKEN.encode()), (TOKEN.encode(), TOKEN.encode())]


def test_beyond_loopback_without_a_token_debug_is_refused(tmp_path: Path) -> None:
    with _pipe("wide", tmp_path, ops_host="0.0.0.0").start() as run:
        server = run._ext["ops"]
        assert server.address[0] == "0.0.0.0"
        port = server.address[1]
        for method, path in [("GET", "/debug/pipeline"),
                             ("POST", "/debug/profile/cpu?seconds=1"),
                             ("POST", "/debug/profile/heap?seconds=1"),
                             ("GET", "/debug/profiles/x/svg")]:
            status, _, body = _call(port, method, path)  # even from loopback
            assert status == 403 and b"ops_token" in body, (path, status)
        assert _call(port, "GET", "/livez")[0] == 200
        assert _call(port, "GET", "/readyz")[0] == 200
        assert not run._ext.get("profiler") or not run._ext["profiler"].records()


def test_without_a_token_only_loopback_hosts_and_origins_reach_debug(tmp_path: Path) -> None:
    with _pipe("rebind", tmp_path).start() as run:  # loopback, no token
        port = _port(run)
        ok = [{"Host": "127.0.0.1"}, {"Host": f"localhost:{port}"}, {"Host": "[::1]"},
              {"Host": "127.0.0.1", "Origin": f"http://127.0.0.1:{port}"}]
        for headers in ok:
            assert _call(port, "GET", "/debug/pipeline", headers=headers)[0] == 200, headers
        # DNS rebinding: a page from another site that resolves its name to 127.0.0.1
        bad = [{"Host": "attacker.example"}, {"Host": f"attacker.example:{port}"},
               {"Host": "127.0.0.1.attacker.example"}, {"Host": "0.0.0.0"},
               {"Host": "127.0.0.1", "Origin": "http://attacker.example"},
               {"Host": "127.0.0.1", "Origin": f"http://127.0.0.1:{port + 1}"},
               {"Host": "127.0.0.1", "Origin": "null"}]
        for headers in bad:
            assert _call(port, "GET", "/debug/pipeline", headers=headers)[0] == 403, headers


def test_profile_durations_and_rates_are_capped(tmp_path: Path) -> None:
    with _pipe("caps", tmp_path, ops_token=TOKEN, profiling_max_seconds=2).start() as run:
        port = _port(run)
        for query in ("seconds=3", "seconds=2.5", "seconds=2.0001", "seconds=1e9",
                      "seconds=0", "seconds=-1", "seconds=1&rate=1001", "seconds=1&rate=0",
                      "seconds=1&rate=99999999"):
            status, _, body = _call(port, "POST", f"/debug/profile/cpu?{query}", token=TOKEN)
            assert status == 400, (query, status, body)
        assert _call(port, "POST", "/debug/profile/heap?seconds=3", token=TOKEN)[0] == 400
        with pytest.raises(pipekit.ConfigError, match="profiling_max_seconds"):
            run.profile_cpu(3)
        with pytest.raises(pipekit.ConfigError, match="profiling_max_seconds"):
            run.profile_heap(2.5)
        with pytest.raises(pipekit.ConfigError, match="rate"):
            run.profile_cpu(1, rate=5000)
        assert not run._ext["profiler"].records()  # nothing ran


def test_one_profile_runs_at_a_time(tmp_path: Path) -> None:
    with _pipe("once", tmp_path, ops_token=TOKEN).start() as run:
        port = _port(run)
        prof = run._ext["profiler"]
        first: list[int] = []
        t = threading.Thread(target=lambda: first.append(
            _call(port, "POST", "/debug/profile/cpu?seconds=1", token=TOKEN)[0]))
        t.start()
        try:
            end = time.monotonic() + 10
            while not prof.busy("cpu") and time.monotonic() < end:
                time.sleep(0.005)
            assert prof.busy("cpu")
            assert _call(port, "POST", "/debug/profile/cpu?seconds=1", token=TOKEN)[0] == 409
            assert _call(port, "POST", "/debug/profile/heap?seconds=1", token=TOKEN)[0] == 409
            with pytest.raises(pipekit.ProfilerBusyError):
                run.profile_cpu(1)
        finally:
            t.join(20)
        assert first == [200]
        assert len(prof.records()) == 1


def test_no_request_can_name_a_file(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    secret = b"root:x:0:0:TOP-SECRET-CONTENT"
    (outside / "secret.txt").write_bytes(secret)
    fake = "20250101T000000Z-cpu-ops"
    with _pipe("files", tmp_path, ops_token=TOKEN).start() as run:
        port = _port(run)
        record = run.profile_cpu(0.05, rate=50)
        real_id = record.id
        folder = record.files["svg"].parent
        # a profile whose artifact is a symbolic link out of the store
        (folder / f"{fake}.meta.json").write_text("{}")
        (folder / f"{fake}.svg").symlink_to(outside / "secret.txt")
        # a whole pipeline folder that is a symbolic link out of the store
        (outside / f"{fake.replace('cpu', 'heap')}.meta.json").write_text("{}")
        (outside / f"{fake.replace('cpu', 'heap')}.bin").write_bytes(secret)
        (folder.parent / "evil").symlink_to(outside, target_is_directory=True)
        real_svg = record.files["svg"].read_bytes()
        attempts = [
            f"/debug/profiles/{fake}/svg",
            f"/debug/profiles/{fake.replace('cpu', 'heap')}/bin",
            f"/debug/profiles/{real_id}/../../../outside/secret.txt",
            f"/debug/profiles/{real_id}/svg/../../../outside/secret.txt",
            f"/debug/profiles/{real_id}%2f..%2f..%2foutside%2fsecret.txt/svg",
            "/debug/profiles/..%2f..%2foutside%2fsecret/svg",
            f"/debug/profiles/{outside}/secret.txt",
            f"/debug/profiles{outside / 'secret.txt'}",
            "/debug/profiles/secret/txt",
            f"/debug/profiles/{real_id}/secret.txt",
            f"/debug/profiles/{real_id}/..",
            "/debug/profiles/..%5c..%5coutside/svg",
            f"http://127.0.0.1/debug/profiles/{real_id}/../../outside/secret.txt",
            "/debug/profiles/%2Fetc%2Fpasswd/meta",
        ]
        for path in attempts:
            status, _, body = _call(port, "GET", path, token=TOKEN)
            assert status == 404, (path, status)
            assert secret not in body and b"root:" not in body
        # the query string names nothing: the real artifact comes back, nothing else
        status, _, body = _call(port, "GET", f"/debug/profiles/{real_id}/svg?path=/etc/passwd"
                                f"&file={outside / 'secret.txt'}", token=TOKEN)
        assert status == 200 and body == real_svg
        backend = run._ext["ops"]._backend
        for pid, artifact in [("..", "svg"), (f"../{real_id}", "svg"), (real_id, "../svg"),
                              (real_id, "/etc/passwd"), (fake, "svg")]:
            assert backend.profile_file(pid, artifact) is None


def test_a_failing_profile_names_no_path(tmp_path: Path) -> None:
    folder = tmp_path / "secret-profile-folder"
    with _pipe("broken", tmp_path, ops_token=TOKEN, profiling_dir=folder).start() as run:
        port = _port(run)
        # the pipeline's profile folder turns into a file: every profile now fails
        (folder / "broken").write_text("not a folder")
        for kind in ("cpu", "heap"):
            status, _, body = _call(port, "POST", f"/debug/profile/{kind}?seconds=0.05",
                                    token=TOKEN)
            assert status == 503, body
            assert b"not writable" in body  # the reason is still given
            assert str(folder).encode() not in body and b"/" not in body, body


def test_metric_series_stay_bounded_whatever_the_items(tmp_path: Path) -> None:
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader
    from opentelemetry.sdk.trace import TracerProvider

    reader = InMemoryMetricReader()
    mp = MeterProvider(metric_readers=[reader])
    tp = TracerProvider()
    n = 10_000
    kinds: dict[int, type[Exception]] = {}

    def hostile(item: dict[str, str]) -> dict[str, str]:
        i = int(item["n"])
        if i % 2:  # a distinct exception type and message for every other item
            kinds[i] = kinds.get(i) or type(f"Err{i}", (Exception,), {})
            raise kinds[i](f"payload {item['payload']} rejected")
        return item

    def also_hostile(item: dict[str, str]) -> dict[str, str]:
        if int(item["n"]) % 4 == 0:
            raise LookupError(item["payload"])
        return item

    pipe = pipekit.Pipeline("bounded", tracer_provider=tp, meter_provider=mp,
                            max_memory_mb=None, buffer_size=500)
    pipe.add_stage("parse", hostile, workers=2, key=lambda item: item["key"])
    pipe.add_stage("store", also_hostile, workers=2)
    items = [{"n": str(i), "key": f"user-{i}-k", "payload": f"secret-payload-{i}"}
             for i in range(n)]
    try:
        report = pipe.run(items, dead_letter=lambda d: None, handle_signals=False)
        data = reader.get_metrics_data()
    finally:
        mp.shutdown()
        tp.shutdown()
    assert report.outputs == n // 4 and report.dead_letter_count == n - n // 4
    stages, outcomes = 2 + 1, 3  # the two stages and the sink; ok, dropped, dead_letter
    bound = stages * outcomes * (telemetry.ERROR_TYPES_PER_STAGE + 1)
    series: dict[str, set[tuple[tuple[str, Any], ...]]] = {}
    assert data is not None
    for rm in data.resource_metrics:
        for sm in rm.scope_metrics:
            for metric in sm.metrics:
                for point in metric.data.data_points:
                    attrs = tuple(sorted((point.attributes or {}).items()))
                    series.setdefault(metric.name, set()).add(attrs)
                    for _, value in attrs:
                        assert "secret-payload" not in str(value)
                        assert "user-" not in str(value), value
    assert series, "no metrics were exported"
    for name, sets in series.items():
        assert len(sets) <= bound, (name, len(sets))
    error_types = {dict(a)["error.type"] for a in series["pipekit.stage.items"]
                   if "error.type" in dict(a) and dict(a)["stage"] == "parse"}
    assert len(error_types) == telemetry.ERROR_TYPES_PER_STAGE + 1 and "_other" in error_types
    total = sum(len(s) for s in series.values())
    assert total < 500, f"{total} series for a two-stage pipeline"
