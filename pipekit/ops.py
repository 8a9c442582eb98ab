"""The ops HTTP server: health, metrics, debug snapshots and on-demand profiles.

An edge module: the core never imports it; the pipeline creates an :class:`OpsServer`
lazily when ``ops_enabled`` is set and hands it an :class:`OpsBackend`. Only the
standard library is used, and the HTTP/1.1 handling is written here on plain sockets
so every limit is enforced in one place::

    listener ──accept──▶ "pipekit-ops" thread ──over max_connections──▶ 503, close
                              │
                              ▼ one daemon thread per connection ("pipekit-ops-conn-<n>")
        read head (deadline = request_timeout, at most max_header_bytes, 100 fields)
          → parse and check framing (Host, Content-Length, no Transfer-Encoding)
          → read and discard the body (at most max_body_bytes)
          → /debug guard (beyond-loopback rule, bearer token, Host and Origin)
          → route → OpsBackend call → one response → keep-alive loop or close

Nothing from the request is echoed back, no backend error text reaches a client
(except a :class:`~pipekit.errors.ProfilerError`'s one line, which is safe by
contract), and the token is never logged.
"""

from __future__ import annotations

import contextlib
import hmac
import ipaddress
import json
import logging
import math
import os
import re
import selectors
import socket
import stat
import threading
import time
from dataclasses import dataclass
from email.utils import formatdate
from http import HTTPStatus
from pathlib import Path
from types import MappingProxyType
from typing import Any, BinaryIO, Final, Protocol
from urllib.parse import parse_qsl, urlsplit

from pipekit.errors import (
    ConfigError,
    MissingExtraError,
    PipelineStateError,
    ProfilerBusyError,
    ProfilerError,
)

__all__ = ["PROFILE_ARTIFACTS", "OpsBackend", "OpsServer", "is_loopback"]

_log = logging.getLogger("pipekit.ops")

#: Artifact names a profile may have, each with its download extension and default type.
_ARTIFACTS: Final = MappingProxyType(
    {
        "speedscope": (".speedscope.json", "application/json"),
        "svg": (".svg", "image/svg+xml"),
        "html": (".html", "text/html; charset=utf-8"),
        "bin": (".bin", "application/octet-stream"),
        "summary": (".summary.json", "application/json"),
        "meta": (".meta.json", "application/json"),
    }
)
#: The artifact names the download endpoint accepts; the backend maps them to files.
PROFILE_ARTIFACTS: Final[frozenset[str]] = frozenset(_ARTIFACTS)

_SAFE_TYPES: Final = frozenset(
    {
        "application/json",
        "application/octet-stream",
        "image/svg+xml",
        "text/html",
        "text/html; charset=utf-8",
        "text/plain",
        "text/plain; charset=utf-8",
    }
)
_TEXT: Final = "text/plain; charset=utf-8"
_JSON: Final = "application/json"
_MAX_HEADERS: Final = 100
_MINIMUM_SIZES: Final = {"max_connections": 1, "max_header_bytes": 256, "max_body_bytes": 0}
_READ_CHUNK: Final = 16384
_O_BINARY: Final[int] = getattr(os, "O_BINARY", 0)
_TCHAR_RE: Final = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_TARGET_RE: Final = re.compile(rb"[\x21-\x7e]+")
_VERSION_RE: Final = re.compile(rb"HTTP/([0-9])\.([0-9])")
_BAD_VALUE_RE: Final = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")
_PROFILE_ID_RE: Final = re.compile(r"[A-Za-z0-9_-]{1,64}")
_NUMBER_RE: Final = re.compile(r"[0-9]{1,9}(?:\.[0-9]{0,9})?|\.[0-9]{1,9}")
_CONTENT_TYPE_RE: Final = re.compile(r"[\x20-\x7e]{1,200}")
# a quoted string or a run of non-blanks holding a slash or a backslash: a file path
_PATH_RE: Final = re.compile(r"""'[^']*[/\\][^']*'|"[^"]*[/\\][^"]*"|[^\s'"()]*[/\\][^\s'"()]*""")
_BEYOND_LOOPBACK: Final = (
    "debug endpoints are disabled when the ops server listens beyond loopback "
    "without a token; set ops_token"
)
_NOT_LOCAL: Final = (
    "debug endpoints without ops_token accept only loopback Host and same-origin "
    "requests; use http://127.0.0.1 or set ops_token"
)


class OpsBackend(Protocol):
    """What the ops server asks of the running pipeline; every method may run concurrently."""

    def livez(self) -> tuple[bool, str]:
        """Return ``(ok, reason)``; fails only when work is pending and nothing completes."""
        ...

    def readyz(self) -> tuple[bool, str]:
        """Return ``(ok, reason)``; not ready while starting, draining or paused by a limit."""
        ...

    def metrics(self, openmetrics: bool) -> tuple[bytes, str]:
        """Return ``(body, content type)``; raise ``LookupError`` when there are no metrics."""
        ...

    def debug_pipeline(self) -> dict[str, Any]:
        """Return a JSON-ready snapshot of the pipeline and its stages."""
        ...

    def profile(self, kind: str, seconds: float, rate: int | None) -> dict[str, Any]:
        """Profile for ``seconds`` (blocking) and return ``{"id", "kind", "files", ...}``.

        ``files`` maps artifact names (:data:`PROFILE_ARTIFACTS`) to file names; the server
        keeps only their last path component. Every other key is shown to the client as
        it is (with NaN as null), so it must hold no file-system path or secret.

        Raises:
            ProfilerBusyError: another profile runs (answered 409).
            ProfilerError: the profile failed; its one-line message is shown (503).
            ConfigError: the request does not fit the configuration (400).
        """
        ...

    def profile_file(self, profile_id: str, artifact: str) -> tuple[Path, str] | None:
        """Return ``(path, content type)`` of one artifact of a profile, or ``None``."""
        ...


def is_loopback(host: str) -> bool:
    """Tell whether ``host`` names only this machine: ``localhost``, 127.0.0.0/8 or ``::1``.

    Args:
        host: a host name or IP address, optionally in brackets (``[::1]``).

    Returns:
        ``True`` for loopback; ``False`` for anything else, including ``""``, ``0.0.0.0``
        and host names other than ``localhost`` (they may resolve anywhere).
    """
    name = host.strip().lower()
    if name.startswith("[") and name.endswith("]"):
        name = name[1:-1]
    if name in ("localhost", "localhost."):
        return True
    try:
        addr = ipaddress.ip_address(name)
    except ValueError:
        return False
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped.is_loopback
    return addr.is_loopback


class _HttpError(Exception):
    """A request that is answered with an error status and a fixed, safe message."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        close: bool = False,
        headers: tuple[tuple[str, str], ...] = (),
    ) -> None:
        super().__init__(message)
        self.response = _text(status, message, close=close, headers=headers)


class _PeerGoneError(Exception):
    """The client closed the connection in the middle of a request."""


@dataclass(slots=True, kw_only=True)
class _Request:
    method: str
    target: str
    minor: int
    headers: dict[str, list[str]]
    keep_alive: bool = False


@dataclass(slots=True, kw_only=True)
class _Response:
    status: int
    body: bytes = b""
    content_type: str = _TEXT
    headers: tuple[tuple[str, str], ...] = ()
    file: BinaryIO | None = None
    file_size: int = 0
    close: bool = False


def _text(
    status: int, message: str, *, close: bool = False, headers: tuple[tuple[str, str], ...] = ()
) -> _Response:
    body = (message + "\n").encode("utf-8")
    return _Response(status=status, body=body, close=close, headers=headers)


def _finite(value: Any) -> Any:
    """Replace NaN and infinities (invalid in JSON) by ``None``, recursively."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(item) for item in value]
    return value


def _json(value: Any) -> _Response:
    body = json.dumps(_finite(value), indent=2, allow_nan=False).encode("utf-8") + b"\n"
    return _Response(status=200, body=body, content_type=_JSON)


def _one_line(text: str, limit: int = 300) -> str:
    line = text.strip().splitlines()[0] if text.strip() else ""
    return "".join(ch for ch in line if ch.isprintable())[:limit]


def _without_paths(text: str) -> str:
    """Replace every file-system path in ``text`` (anything with a slash) by ``<path>``."""
    return _PATH_RE.sub("<path>", text)


def _wants_openmetrics(values: list[str]) -> bool:
    """Tell whether an Accept header prefers OpenMetrics over the Prometheus text format."""
    best = {"application/openmetrics-text": 0.0, "text/plain": 0.0}
    for value in values:
        for item in value.split(","):
            media, *params = (part.strip() for part in item.split(";"))
            quality = 1.0
            for param in params:
                key, _, raw = param.partition("=")
                if key.strip().lower() == "q":
                    try:
                        quality = float(raw)
                    except ValueError:
                        quality = 0.0
            if media.lower() in best and 0.0 <= quality <= 1.0:
                best[media.lower()] = max(best[media.lower()], quality)
    return best["application/openmetrics-text"] > 0.0 and (
        best["application/openmetrics-text"] >= best["text/plain"]
    )


def _host_of(authority: str) -> str:
    """Return the host part of a Host header value (``[::1]:8080`` -> ``[::1]``)."""
    if authority.startswith("["):
        return authority.partition("]")[0] + "]"
    host, sep, port = authority.rpartition(":")
    return host if sep and port.isdigit() else authority


class _Conn:
    """One client socket with a read buffer and deadline-bound reads."""

    __slots__ = ("buf", "sock")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = bytearray()

    def _fill(self, deadline: float) -> bool:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError
        self.sock.settimeout(remaining)
        chunk = self.sock.recv(_READ_CHUNK)
        self.buf += chunk
        return bool(chunk)

    def read_head(self, deadline: float, limit: int) -> bytes | None:
        """Return the request line and headers, or ``None`` on a clean close before any."""
        while True:
            while self.buf[:2] == b"\r\n" or self.buf[:1] == b"\n":
                del self.buf[: 2 if self.buf[:1] == b"\r" else 1]
            ends = ((self.buf.find(b"\n\r\n"), 3), (self.buf.find(b"\n\n"), 2))
            found = [(i, n) for i, n in ends if i >= 0]
            if found:
                end, size = min(found)
                if end > limit:
                    raise self._too_large(limit)
                head = bytes(self.buf[:end])
                del self.buf[: end + size]
                return head
            if len(self.buf) > limit:
                raise self._too_large(limit)
            if not self._fill(deadline):
                if self.buf:
                    raise _HttpError(400, "incomplete request", close=True)
                return None

    def _too_large(self, limit: int) -> _HttpError:
        line_end = self.buf.find(b"\n")
        if line_end < 0 or line_end > limit:
            return _HttpError(414, "request line too long", close=True)
        return _HttpError(431, "request header fields too large", close=True)

    def skip_body(self, length: int, deadline: float) -> None:
        """Read and drop ``length`` bytes of request body."""
        while len(self.buf) < length:
            if not self._fill(deadline):
                raise _PeerGoneError
        del self.buf[:length]


def _parse_head(head: bytes) -> _Request:
    lines = [line[:-1] if line.endswith(b"\r") else line for line in head.split(b"\n")]
    parts = lines[0].split(b" ")
    if len(parts) != 3 or not _TCHAR_RE.fullmatch(parts[0]):
        raise _HttpError(400, "malformed request line", close=True)
    method, target, version = parts
    match = _VERSION_RE.fullmatch(version)
    if match is None or not _TARGET_RE.fullmatch(target):
        raise _HttpError(400, "malformed request line", close=True)
    if match[1] != b"1":
        raise _HttpError(505, "only HTTP/1.0 and HTTP/1.1 are supported", close=True)
    if len(lines) - 1 > _MAX_HEADERS:
        raise _HttpError(431, "too many header fields", close=True)
    headers: dict[str, list[str]] = {}
    for line in lines[1:]:
        name, sep, value = line.partition(b":")
        value = value.strip(b" \t")
        if not sep or not _TCHAR_RE.fullmatch(name) or _BAD_VALUE_RE.search(value):
            raise _HttpError(400, "malformed header field", close=True)
        headers.setdefault(name.decode("ascii").lower(), []).append(value.decode("latin-1"))
    return _Request(
        method=method.decode("ascii"),
        target=target.decode("ascii"),
        minor=min(int(match[2]), 1),
        headers=headers,
    )


def _body_length(req: _Request, max_body: int) -> int:
    """Check the framing headers and return the body length."""
    if req.minor == 1 and len(req.headers.get("host", [])) != 1:
        raise _HttpError(400, "an HTTP/1.1 request needs exactly one Host header", close=True)
    if "transfer-encoding" in req.headers:
        raise _HttpError(501, "transfer-encoding is not supported; send content-length", close=True)
    values = {v.strip() for raw in req.headers.get("content-length", []) for v in raw.split(",")}
    if not values:
        return 0
    if len(values) != 1 or not all(v.isdigit() and v.isascii() and len(v) < 19 for v in values):
        raise _HttpError(400, "malformed content-length", close=True)
    length = int(values.pop())
    if length > max_body:
        raise _HttpError(413, f"request body larger than {max_body} bytes", close=True)
    return length


class OpsServer:
    """A small, hardened HTTP server exposing a pipeline's health, metrics and debug data.

    Endpoints: ``GET /livez``, ``GET /readyz``, ``GET /metrics``, ``GET /debug/pipeline``,
    ``POST /debug/profile/{cpu,heap}?seconds=N[&rate=R]`` and
    ``GET /debug/profiles/<id>/<artifact>``. Everything under ``/debug`` needs
    ``Authorization: Bearer <token>`` when a token is set, and is refused when the server
    listens beyond loopback without one. See ``docs/ops-server.md``.

    Args:
        backend: the pipeline side of the server.
        host: the address to listen on; loopback by default.
        port: the TCP port; 0 picks a free one (read it from :attr:`address`).
        token: the bearer token for ``/debug``, or ``None``.
        max_profile_seconds: the longest profile a request may ask for.
        max_connections: connections served at once; more are answered 503 and closed.
        request_timeout: seconds a client has to send a whole request (and an idle
            keep-alive connection is kept); also the send timeout of each response.
        max_header_bytes: the request line and headers together, at most.
        max_body_bytes: the largest request body accepted (bodies are read and ignored).

    Raises:
        ConfigError: a setting is out of range or the token has invalid characters.
    """

    def __init__(
        self,
        backend: OpsBackend,
        *,
        host: str = "127.0.0.1",
        port: int = 8080,
        token: str | None = None,
        max_profile_seconds: float = 300.0,
        max_connections: int = 32,
        request_timeout: float = 10.0,
        max_header_bytes: int = 8192,
        max_body_bytes: int = 1024,
    ) -> None:
        _check_settings(
            host=host,
            port=port,
            token=token,
            max_profile_seconds=max_profile_seconds,
            max_connections=max_connections,
            request_timeout=request_timeout,
            max_header_bytes=max_header_bytes,
            max_body_bytes=max_body_bytes,
        )
        self._backend = backend
        self._host = host
        self._port = port
        self._token = None if token is None else token.encode("utf-8")
        self._max_profile_seconds = float(max_profile_seconds)
        self._max_connections = max_connections
        self._request_timeout = float(request_timeout)
        self._max_header_bytes = max_header_bytes
        self._max_body_bytes = max_body_bytes
        self._routes = {
            "/livez": (("GET", "HEAD"), self._livez),
            "/readyz": (("GET", "HEAD"), self._readyz),
            "/metrics": (("GET", "HEAD"), self._metrics),
            "/debug/pipeline": (("GET", "HEAD"), self._debug_pipeline),
            "/debug/profile/cpu": (("POST",), self._profile_cpu),
            "/debug/profile/heap": (("POST",), self._profile_heap),
        }
        self._lock = threading.Lock()
        self._profile_lock = threading.Lock()
        self._stopping = threading.Event()
        self._state = "new"
        self._conns: dict[int, socket.socket] = {}
        self._threads: set[threading.Thread] = set()
        self._next_conn = 0
        self._listener: socket.socket | None = None
        self._wake: tuple[socket.socket, socket.socket] | None = None
        self._thread: threading.Thread | None = None
        self._address: tuple[str, int] = (host, port)
        self._debug_allowed = False
        self._overloaded = (
            "HTTP/1.1 503 Service Unavailable\r\nServer: pipekit\r\n"
            "Content-Type: text/plain; charset=utf-8\r\nContent-Length: 21\r\n"
            "Cache-Control: no-store\r\nX-Content-Type-Options: nosniff\r\n"
            "Connection: close\r\n\r\ntoo many connections\n"
        ).encode("ascii")

    def __repr__(self) -> str:
        token = "set" if self._token is not None else "unset"
        return f"OpsServer(host={self._host!r}, port={self._port}, token={token}, {self._state})"

    def __enter__(self) -> OpsServer:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    @property
    def address(self) -> tuple[str, int]:
        """The ``(host, port)`` the server is bound to (the requested ones before start)."""
        return self._address

    @property
    def url(self) -> str:
        """The base URL for local clients, e.g. ``http://127.0.0.1:8080``.

        Raises:
            PipelineStateError: the server was never started.
        """
        if self._state == "new":
            raise PipelineStateError("the ops server is not started; call start() first")
        host = self._address[0]
        if host in ("0.0.0.0", ""):
            host = "127.0.0.1"
        elif host == "::":
            host = "::1"
        if ":" in host:
            host = f"[{host}]"
        return f"http://{host}:{self._address[1]}"

    def start(self) -> None:
        """Bind the listening socket and start serving on a daemon thread ``pipekit-ops``.

        Raises:
            PipelineStateError: the server was already started.
            OSError: the address cannot be bound (in use, or not on this machine).
        """
        with self._lock:
            if self._state != "new":
                raise PipelineStateError(
                    f"the ops server is already {self._state}; create a new OpsServer"
                )
            listener = self._bind()
            self._listener = listener
            sockname = listener.getsockname()
            self._address = (str(sockname[0]), int(sockname[1]))
            self._debug_allowed = self._token is not None or (
                is_loopback(self._host) and is_loopback(self._address[0])
            )
            self._wake = socket.socketpair()
            self._thread = threading.Thread(target=self._serve, name="pipekit-ops", daemon=True)
            try:
                self._thread.start()
            except BaseException:
                for sock in (listener, *self._wake):
                    sock.close()
                raise
            self._state = "running"
        _log.info("ops server listening on %s", self.url)

    def stop(self, timeout: float | None = 5.0) -> bool:
        """Close the listening socket and every connection, and join the server's threads.

        A connection running a profile keeps its thread until the backend returns; call
        ``stop()`` again to wait for it.

        Args:
            timeout: seconds to wait for the threads in all, or ``None`` to wait forever.

        Returns:
            ``True`` when every thread has ended (also when never started).
        """
        with self._lock:
            if self._state == "new":
                return True
            self._state = "stopped"
        deadline = None if timeout is None else time.monotonic() + timeout
        self._stopping.set()
        assert self._thread is not None
        assert self._wake is not None
        with contextlib.suppress(OSError):
            self._wake[1].send(b"x")
        self._thread.join(_remaining(deadline))
        with self._lock:
            socks, threads = list(self._conns.values()), list(self._threads)
        for sock in socks:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        for thread in threads:
            thread.join(_remaining(deadline))
        left = [t for t in (self._thread, *threads) if t.is_alive()]
        if left:
            _log.warning("ops server stopped with %d thread(s) still running", len(left))
        return not left

    # -- accepting -------------------------------------------------------------------

    def _bind(self) -> socket.socket:
        host = self._host.strip("[]") or None
        try:
            infos = socket.getaddrinfo(
                host, self._port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
            )
        except socket.gaierror as err:
            raise OSError(
                f"ops server cannot resolve ops_host={self._host!r} ({err.strerror}); "
                "set it to an address of this machine"
            ) from err
        last: OSError | None = None
        for family, kind, proto, _, addr in infos:
            sock = socket.socket(family, kind, proto)
            try:
                if os.name == "posix":
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                sock.bind(addr)
                sock.listen(128)
                sock.setblocking(False)
            except OSError as err:
                sock.close()
                last = err
                continue
            return sock
        reason = last.strerror if last is not None else "no address"
        raise OSError(
            f"ops server cannot listen on {self._host}:{self._port} ({reason}); "
            "set ops_port to a free port (or 0) or ops_host to an address of this machine"
        ) from last

    def _serve(self) -> None:
        assert self._listener is not None
        assert self._wake is not None
        try:
            with selectors.DefaultSelector() as selector:
                selector.register(self._listener, selectors.EVENT_READ)
                selector.register(self._wake[0], selectors.EVENT_READ)
                while not self._stopping.is_set():
                    for key, _ in selector.select():
                        if key.fileobj is self._listener and not self._stopping.is_set():
                            self._accept(self._listener)
        except Exception:
            _log.exception("ops server accept loop failed; the ops server stops accepting")
        finally:
            for sock in (self._listener, *self._wake):
                sock.close()

    def _accept(self, listener: socket.socket) -> None:
        try:
            sock, _ = listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        except OSError as err:
            _log.warning("ops server cannot accept a connection: %s", err.strerror)
            self._stopping.wait(0.1)  # e.g. out of file descriptors: do not spin
            return
        with self._lock:
            self._threads = {t for t in self._threads if t.is_alive()}
            if len(self._conns) >= self._max_connections:
                thread = None
            else:
                self._next_conn += 1
                conn_id = self._next_conn
                self._conns[conn_id] = sock
                thread = threading.Thread(
                    target=self._run_connection,
                    args=(conn_id, sock),
                    name=f"pipekit-ops-conn-{conn_id}",
                    daemon=True,
                )
                self._threads.add(thread)
        if thread is None:
            self._refuse(sock)
        else:
            thread.start()

    def _refuse(self, sock: socket.socket) -> None:
        """Answer 503 without blocking the accept loop, then close."""
        try:
            sock.setblocking(False)
            sock.send(self._overloaded)
            sock.shutdown(socket.SHUT_WR)
            sock.recv(65536)  # drain what already arrived so close() sends FIN, not RST
        except OSError:
            pass
        finally:
            sock.close()

    # -- one connection --------------------------------------------------------------

    def _run_connection(self, conn_id: int, sock: socket.socket) -> None:
        try:
            self._serve_connection(_Conn(sock))
        except Exception:
            _log.exception("ops server connection failed")
        finally:
            with self._lock:
                self._conns.pop(conn_id, None)
            sock.close()

    def _serve_connection(self, conn: _Conn) -> None:
        while not self._stopping.is_set():
            try:
                req = self._read_request(conn, time.monotonic() + self._request_timeout)
            except _HttpError as err:
                if self._send(conn.sock, err.response, head_only=False, keep_alive=False, minor=1):
                    self._linger(conn.sock)
                return
            except (TimeoutError, _PeerGoneError, OSError):
                return
            if req is None:
                return
            resp = self._respond(req)
            keep = req.keep_alive and not resp.close and not self._stopping.is_set()
            head_only = req.method == "HEAD"
            if not self._send(
                conn.sock, resp, head_only=head_only, keep_alive=keep, minor=req.minor
            ):
                return
            if not keep:
                self._linger(conn.sock)
                return

    def _linger(self, sock: socket.socket) -> None:
        """Half-close, then drain input briefly so close() does not reset the response away."""
        deadline = time.monotonic() + min(1.0, self._request_timeout)
        drained = 0
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_WR)
            while drained < (1 << 20) and (remaining := deadline - time.monotonic()) > 0:
                sock.settimeout(remaining)
                chunk = sock.recv(_READ_CHUNK)
                if not chunk:
                    return
                drained += len(chunk)

    def _read_request(self, conn: _Conn, deadline: float) -> _Request | None:
        try:
            head = conn.read_head(deadline, self._max_header_bytes)
        except TimeoutError:
            if conn.buf:
                raise _HttpError(408, "request timeout", close=True) from None
            raise
        if head is None:
            return None
        req = _parse_head(head)
        length = _body_length(req, self._max_body_bytes)
        expect = [v.lower() for v in req.headers.get("expect", [])]
        if expect and (expect != ["100-continue"] or req.minor == 0):
            raise _HttpError(417, "only expect: 100-continue is supported", close=True)
        if length:
            if expect:
                conn.sock.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
            try:
                conn.skip_body(length, deadline)
            except TimeoutError:
                raise _HttpError(408, "request timeout", close=True) from None
        tokens = {
            t.strip().lower() for v in req.headers.get("connection", []) for t in v.split(",")
        }
        req.keep_alive = "close" not in tokens and (req.minor == 1 or "keep-alive" in tokens)
        return req

    def _send(
        self, sock: socket.socket, resp: _Response, *, head_only: bool, keep_alive: bool, minor: int
    ) -> bool:
        """Write one response; return ``False`` when the connection must be closed."""
        length = resp.file_size if resp.file is not None else len(resp.body)
        lines = [
            f"HTTP/1.1 {resp.status} {HTTPStatus(resp.status).phrase}",
            "Server: pipekit",
            f"Date: {formatdate(usegmt=True)}",
            f"Content-Type: {resp.content_type}",
            f"Content-Length: {length}",
            "Cache-Control: no-store",
            "X-Content-Type-Options: nosniff",
            "Content-Security-Policy: default-src 'none'; frame-ancestors 'none'; sandbox",
            *(f"{name}: {value}" for name, value in resp.headers),
        ]
        if not keep_alive:
            lines.append("Connection: close")
        elif minor == 0:
            lines.append("Connection: keep-alive")
        head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
        try:
            sock.settimeout(self._request_timeout)
            if resp.file is None or head_only:
                sock.sendall(head if head_only else head + resp.body)
                return True
            sock.sendall(head)
            return sock.sendfile(resp.file, 0, length) == length
        except OSError:
            return False
        finally:
            if resp.file is not None:
                resp.file.close()

    # -- routing ---------------------------------------------------------------------

    def _respond(self, req: _Request) -> _Response:
        path = "?"
        try:
            path, query, authority = self._split_target(req.target)
            resp = self._dispatch(req, path, query, authority)
        except _HttpError as err:
            resp = err.response
        except Exception:
            _log.exception("ops endpoint %s %s failed", req.method, self._loggable(path))
            resp = _text(500, "internal error")
        _log.debug("%s %s -> %d", req.method, self._loggable(path), resp.status)
        return resp

    def _loggable(self, path: str) -> str:
        if self._token is not None and self._token.decode("utf-8") in path:
            return "[redacted]"
        return path[:200]

    @staticmethod
    def _split_target(target: str) -> tuple[str, str, str | None]:
        """Return the path, the query and, for an absolute-form target, its host."""
        if target.startswith("/"):
            path, _, query = target.partition("?")
            return path, query, None
        if target.lower().startswith(("http://", "https://")):
            parts = urlsplit(target)
            return parts.path or "/", parts.query, parts.hostname or ""
        raise _HttpError(400, "malformed request target", close=True)

    def _dispatch(self, req: _Request, path: str, query: str, authority: str | None) -> _Response:
        if path == "/debug" or path.startswith("/debug/"):
            self._guard_debug(req, authority)
        route = self._routes.get(path)
        if route is None:
            artifact = self._parse_download(path)
            methods: tuple[str, ...] = ("GET", "HEAD")
            if req.method not in methods:
                raise _HttpError(405, "method not allowed", headers=(("Allow", "GET, HEAD"),))
            return self._download(*artifact)
        methods, handler = route
        if req.method not in methods:
            allow = ", ".join(methods)
            raise _HttpError(405, "method not allowed", headers=(("Allow", allow),))
        return handler(req, query)

    def _guard_debug(self, req: _Request, authority: str | None) -> None:
        if not self._debug_allowed:
            raise _HttpError(403, _BEYOND_LOOPBACK)
        if self._token is None:
            hosts = [_host_of(h) for h in req.headers.get("host", [])]
            hosts += [] if authority is None else [authority]
            origins = req.headers.get("origin", [])
            if any(not is_loopback(h) for h in hosts) or any(
                not self._same_origin(o) for o in origins
            ):
                raise _HttpError(403, _NOT_LOCAL)
            return
        values = req.headers.get("authorization", [])
        scheme, _, credential = values[0].partition(" ") if len(values) == 1 else ("", "", "")
        credential = credential.strip(" \t")
        if scheme.lower() != "bearer" or not credential or " " in credential or "\t" in credential:
            raise _HttpError(
                401, "unauthorized", headers=(("WWW-Authenticate", 'Bearer realm="pipekit"'),)
            )
        if not hmac.compare_digest(credential.encode("latin-1"), self._token):
            challenge = 'Bearer realm="pipekit", error="invalid_token"'
            raise _HttpError(401, "unauthorized", headers=(("WWW-Authenticate", challenge),))

    def _same_origin(self, origin: str) -> bool:
        try:
            parts = urlsplit(origin)
            port = parts.port
        except ValueError:
            return False
        return (
            parts.scheme == "http"
            and is_loopback(parts.hostname or "")
            and port == self._address[1]
        )

    # -- endpoints -------------------------------------------------------------------

    def _livez(self, req: _Request, query: str) -> _Response:
        return self._health(self._backend.livez())

    def _readyz(self, req: _Request, query: str) -> _Response:
        return self._health(self._backend.readyz())

    @staticmethod
    def _health(result: tuple[bool, str]) -> _Response:
        ok, reason = result
        if ok:
            return _text(200, "ok")
        return _text(503, _one_line(str(reason)) or "not ok")

    def _metrics(self, req: _Request, query: str) -> _Response:
        openmetrics = _wants_openmetrics(req.headers.get("accept", []))
        try:
            body, content_type = self._backend.metrics(openmetrics)
        except LookupError:
            return _text(503, "metrics are not available")
        if not isinstance(body, bytes) or not _CONTENT_TYPE_RE.fullmatch(content_type):
            raise TypeError("OpsBackend.metrics() must return (bytes, a one-line content type)")
        return _Response(status=200, body=body, content_type=content_type)

    def _debug_pipeline(self, req: _Request, query: str) -> _Response:
        return _json(self._backend.debug_pipeline())

    def _profile_cpu(self, req: _Request, query: str) -> _Response:
        return self._profile("cpu", query)

    def _profile_heap(self, req: _Request, query: str) -> _Response:
        return self._profile("heap", query)

    def _profile(self, kind: str, query: str) -> _Response:
        seconds, rate = self._profile_params(kind, query)
        if not self._profile_lock.acquire(blocking=False):
            raise _HttpError(409, "another profile is running; retry when it finishes")
        try:
            result = self._backend.profile(kind, seconds, rate)
        except ProfilerBusyError:
            raise _HttpError(409, "another profile is running; retry when it finishes") from None
        except (ProfilerError, MissingExtraError) as err:
            # the profiler's messages name files (the profile folder, the capture, the
            # py-spy executable): the log keeps them, the client gets the line without
            _log.warning("ops %s profile failed: %s", kind, err)
            raise _HttpError(503, _without_paths(_one_line(str(err))) or "the profile failed") \
                from None
        except ConfigError as err:
            _log.warning("ops profile request rejected by the profiler: %s", err)
            raise _HttpError(
                400, "the profiler rejected the request; the ops server log says why"
            ) from None
        finally:
            self._profile_lock.release()
        return _json(self._profile_result(result))

    def _profile_params(self, kind: str, query: str) -> tuple[float, int | None]:
        allowed = ("seconds", "rate") if kind == "cpu" else ("seconds",)
        try:
            pairs = parse_qsl(query, keep_blank_values=True, strict_parsing=True, max_num_fields=4)
        except ValueError:
            raise _HttpError(400, "malformed query string; use ?seconds=N") from None
        params: dict[str, str] = {}
        for key, value in pairs:
            if key not in allowed:
                names = " and ".join(allowed)
                raise _HttpError(400, f"unknown query parameter; {kind} profiles take {names}")
            if key in params:
                raise _HttpError(400, f"{key} is given more than once; give it once")
            params[key] = value
        limit = f"{self._max_profile_seconds:g}"
        raw_seconds = params.get("seconds", "")
        if not _NUMBER_RE.fullmatch(raw_seconds):
            raise _HttpError(400, f"seconds must be a number > 0 and <= {limit}, e.g. seconds=30")
        seconds = float(raw_seconds)
        if not 0.0 < seconds <= self._max_profile_seconds:
            raise _HttpError(
                400, f"seconds must be > 0 and <= {limit} (the ops server's limit); got {seconds:g}"
            )
        if "rate" not in params:
            return seconds, None
        raw_rate = params["rate"]
        if not (raw_rate.isascii() and raw_rate.isdigit() and len(raw_rate) <= 4) or not (
            1 <= int(raw_rate) <= 1000
        ):
            raise _HttpError(400, "rate must be an integer from 1 to 1000 (samples per second)")
        return seconds, int(raw_rate)

    @staticmethod
    def _profile_result(result: dict[str, Any]) -> dict[str, Any]:
        """Pass the backend's answer on with file names (never paths) and download URLs."""
        answer = dict(result)
        profile_id = str(result["id"])
        files = {str(k): re.split(r"[\\/]", str(v))[-1] for k, v in result["files"].items()}
        answer["files"] = files
        if _PROFILE_ID_RE.fullmatch(profile_id):
            prefix = f"/debug/profiles/{profile_id}/"
            answer["urls"] = {k: prefix + k for k in files if k in _ARTIFACTS}
        return answer

    @staticmethod
    def _parse_download(path: str) -> tuple[str, str]:
        prefix = "/debug/profiles/"
        parts = path[len(prefix) :].split("/") if path.startswith(prefix) else []
        if len(parts) != 2 or not _PROFILE_ID_RE.fullmatch(parts[0]) or parts[1] not in _ARTIFACTS:
            raise _HttpError(404, "not found")
        return parts[0], parts[1]

    def _download(self, profile_id: str, artifact: str) -> _Response:
        found = self._backend.profile_file(profile_id, artifact)
        if found is None:
            raise _HttpError(404, "not found")
        path, content_type = found
        extension, default_type = _ARTIFACTS[artifact]
        content_type = str(content_type or default_type)
        if content_type.lower() not in _SAFE_TYPES:
            content_type = "application/octet-stream"
        try:  # O_NONBLOCK: a FIFO in place of the file must not block this thread forever
            fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | _O_BINARY)
        except OSError as err:
            reason = err.strerror
            _log.warning("profile %s %s cannot be opened: %s", profile_id, artifact, reason)
            raise _HttpError(404, "not found") from None
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            os.close(fd)
            raise _HttpError(404, "not found")
        file = os.fdopen(fd, "rb")
        filename = f"pipekit-profile-{profile_id}-{artifact}{extension}"
        return _Response(
            status=200,
            content_type=content_type,
            headers=(("Content-Disposition", f'attachment; filename="{filename}"'),),
            file=file,
            file_size=info.st_size,
        )


def _remaining(deadline: float | None) -> float | None:
    return None if deadline is None else max(0.0, deadline - time.monotonic())


def _check_settings(
    *,
    host: str,
    port: int,
    token: str | None,
    max_profile_seconds: float,
    max_connections: int,
    request_timeout: float,
    max_header_bytes: int,
    max_body_bytes: int,
) -> None:
    """Raise :class:`ConfigError` for the first invalid ops server setting."""
    if not isinstance(host, str) or not host.strip() or any(c.isspace() for c in host):
        raise ConfigError(f"ops_host must be a host name or address (got {host!r})")
    if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
        raise ConfigError(f"ops_port must be an integer from 0 to 65535 (got {port!r})")
    if token is not None and not (
        isinstance(token, str) and token and all(c.isprintable() and not c.isspace() for c in token)
    ):
        raise ConfigError(
            "ops_token must be a non-empty string of printable characters without spaces "
            "(e.g. from secrets.token_urlsafe(32)); the given token is not"
        )
    durations = {"max_profile_seconds": max_profile_seconds, "request_timeout": request_timeout}
    for name, value in durations.items():
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or not (math.isfinite(value) and value > 0)
        ):
            raise ConfigError(f"{name} must be a finite number > 0 (got {value!r})")
    sizes = {"max_connections": max_connections, "max_header_bytes": max_header_bytes}
    sizes["max_body_bytes"] = max_body_bytes
    for name, number in sizes.items():
        low = _MINIMUM_SIZES[name]
        if isinstance(number, bool) or not isinstance(number, int) or number < low:
            raise ConfigError(f"{name} must be an integer >= {low} (got {number!r})")
