"""Fault-injecting HTTP forwarder for tests, on 127.0.0.1 in front of a loopback server such as moto.

The proxy forwards every request unchanged. On a test's request, it returns an
error status for the next matching requests instead of forwarding them, or
delays the upstream response, so tests can check how a client retries and
what it reports once its retries run out.
"""

from __future__ import annotations

import dataclasses
import http.client
import logging
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlparse

log = logging.getLogger(__name__)

HOST = "127.0.0.1"
LOOPBACK_HOSTS = ("127.0.0.1", "localhost")
UPSTREAM_TIMEOUT_SECONDS = 30

#: Headers that apply to one connection only, so the proxy never forwards them. ``Expect: 100-continue``
#: is among them because the proxy sends the 100 Continue response itself and sends the upstream the whole body at once.
HOP_BY_HOP_HEADERS = frozenset(
    (
        "connection",
        "expect",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    )
)

#: S3 error codes sent with an injected status, as S3 itself names them.
S3_ERROR_CODES = {500: "InternalError", 502: "BadGateway", 503: "ServiceUnavailable", 504: "GatewayTimeout"}


@dataclasses.dataclass(frozen=True)
class ProxiedRequest:
    """One request the proxy handled: the status it returned and whether that status was injected."""

    method: str
    path: str
    status: int
    injected: bool
    delayed_seconds: float


@dataclasses.dataclass
class _FailureRule:
    method: str | None
    path_part: str | None
    status: int
    remaining: int
    skip: int


@dataclasses.dataclass
class _DelayRule:
    method: str | None
    path_part: str | None
    seconds: float
    remaining: int | None


class FaultProxy:
    """Threaded HTTP forwarder on 127.0.0.1 whose faults tests switch on and off while it runs.

    Only loopback upstreams are accepted, so a test cannot send traffic off the machine by mistake.
    """

    def __init__(self, upstream_url: str) -> None:
        parsed = urlparse(upstream_url)
        if parsed.scheme != "http" or parsed.hostname not in LOOPBACK_HOSTS or parsed.port is None:
            raise ValueError(
                f"Invalid upstream {upstream_url!r}: expected http://127.0.0.1:PORT, because the proxy "
                "forwards to loopback servers only."
            )
        self.upstream_host = parsed.hostname
        self.upstream_port = parsed.port
        self.port: int | None = None
        self.requests: list[ProxiedRequest] = []
        self._lock = threading.Lock()
        self._failure: _FailureRule | None = None
        self._delay: _DelayRule | None = None
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def endpoint_url(self) -> str:
        """Base URL of the proxy, ``http://127.0.0.1:PORT``. Available after ``start()``."""
        if self.port is None:
            raise RuntimeError("FaultProxy has no port yet. Call start() first.")
        return f"http://{HOST}:{self.port}"

    # -- lifecycle ---------------------------------------------------------

    def start(self) -> FaultProxy:
        """Bind a free port on 127.0.0.1 and serve in a background thread."""
        if self._server is not None:
            return self
        server = ThreadingHTTPServer((HOST, 0), _ForwardingHandler)
        server.daemon_threads = True
        server.proxy = self  # type: ignore[attr-defined]
        self._server = server
        self.port = server.server_address[1]
        self._thread = threading.Thread(target=server.serve_forever, name=f"fault-proxy-{self.port}", daemon=True)
        self._thread.start()
        log.info(
            "Started fault proxy at %s for upstream %s:%s", self.endpoint_url, self.upstream_host, self.upstream_port
        )
        return self

    def stop(self) -> None:
        """Stop serving and close the listening socket. Does nothing if the proxy is not running."""
        if self._server is None:
            return
        self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=10)
        self._server = None
        self._thread = None
        log.info("Stopped fault proxy at %s", self.endpoint_url)

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # -- faults ------------------------------------------------------------

    def fail(
        self, count: int, *, status: int = 503, method: str | None = "PUT", path_part: str | None = None, after: int = 0
    ) -> None:
        """Return ``status`` for ``count`` matching requests, after letting the next ``after`` ones through.

        A request matches when its method is ``method`` and its path contains
        ``path_part``, and ``None`` matches any. The failed requests never reach the upstream.
        """
        if status not in S3_ERROR_CODES:
            raise ValueError(f"Invalid status {status!r}: expected one of {', '.join(map(str, S3_ERROR_CODES))}.")
        with self._lock:
            self._failure = _FailureRule(method, path_part, status, count, after)

    def delay(
        self, seconds: float, *, count: int | None = None, method: str | None = None, path_part: str | None = None
    ) -> None:
        """Hold back the upstream responses of ``count`` matching requests (every one when ``None``) by ``seconds``.

        Requests match as in :meth:`fail`. The request itself reaches the upstream at
        once, so a client that gives up waiting and retries sends a request that
        the upstream already applied.
        """
        with self._lock:
            self._delay = _DelayRule(method, path_part, seconds, count)

    def clear(self) -> None:
        """Forward everything unchanged from now on."""
        with self._lock:
            self._failure = None
            self._delay = None

    def injected_errors(self) -> int:
        """Return how many requests got an injected error status so far."""
        with self._lock:
            return sum(1 for request in self.requests if request.injected)

    def count(self, method: str, path_part: str | None = None) -> int:
        """Return how many matching requests the proxy handled so far, failed ones included."""
        with self._lock:
            return sum(1 for request in self.requests if _matches(method, path_part, request.method, request.path))

    # -- used by the handler threads ----------------------------------------

    def _take_failure(self, method: str, path: str) -> int | None:
        with self._lock:
            rule = self._failure
            if rule is None or rule.remaining <= 0 or not _matches(rule.method, rule.path_part, method, path):
                return None
            if rule.skip > 0:
                rule.skip -= 1
                return None
            rule.remaining -= 1
            return rule.status

    def _take_delay(self, method: str, path: str) -> float:
        with self._lock:
            rule = self._delay
            if rule is None or not _matches(rule.method, rule.path_part, method, path):
                return 0.0
            if rule.remaining is not None:
                if rule.remaining <= 0:
                    return 0.0
                rule.remaining -= 1
            return rule.seconds

    def _record(self, request: ProxiedRequest) -> None:
        with self._lock:
            self.requests.append(request)


def _matches(method: str | None, path_part: str | None, request_method: str, request_path: str) -> bool:
    return method in (None, request_method) and (path_part is None or path_part in request_path)


class _ForwardingHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: ThreadingHTTPServer

    def do_GET(self) -> None:
        self._handle()

    def do_HEAD(self) -> None:
        self._handle()

    def do_PUT(self) -> None:
        self._handle()

    def do_POST(self) -> None:
        self._handle()

    def do_DELETE(self) -> None:
        self._handle()

    def log_message(self, format: str, *args) -> None:  # noqa: A002 - the name is fixed by BaseHTTPRequestHandler
        log.debug("fault proxy: " + format, *args)

    def _handle(self) -> None:
        proxy: FaultProxy = self.server.proxy  # type: ignore[attr-defined]
        body = self._read_body()
        try:
            status = proxy._take_failure(self.command, self.path)
            if status is not None:
                self._send_injected_error(status)
                proxy._record(ProxiedRequest(self.command, self.path, status, True, 0.0))
                return
            status, reason, headers, data = self._forward(proxy, body)
            delay = proxy._take_delay(self.command, self.path)
            # Recorded before the delay: a client that gives up may finish its work while this thread sleeps.
            proxy._record(ProxiedRequest(self.command, self.path, status, False, delay))
            if delay:
                time.sleep(delay)
            self._send_response(status, reason, headers, data)
        except (BrokenPipeError, ConnectionResetError) as err:
            # The client gave up waiting (its read timeout) and closed the connection.
            log.info(
                "Fault proxy: the client closed the connection before the response to %s %s (%s)",
                self.command,
                self.path,
                err,
            )
            self.close_connection = True

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";", 1)[0].strip(), 16)
                if size == 0:
                    # Skip trailer lines up to the blank line that ends the message.
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _forward(self, proxy: FaultProxy, body: bytes) -> tuple[int, str, list[tuple[str, str]], bytes]:
        headers = {name: value for name, value in self.headers.items() if name.lower() not in HOP_BY_HOP_HEADERS}
        if body or self.command in ("PUT", "POST"):
            headers["Content-Length"] = str(len(body))
        upstream = http.client.HTTPConnection(
            proxy.upstream_host, proxy.upstream_port, timeout=UPSTREAM_TIMEOUT_SECONDS
        )
        try:
            upstream.request(self.command, self.path, body=body or None, headers=headers)
            response = upstream.getresponse()
            data = response.read()
            return response.status, response.reason, response.getheaders(), data
        finally:
            upstream.close()

    def _send_response(self, status: int, reason: str, headers: list[tuple[str, str]], data: bytes) -> None:
        self.send_response(status, reason)
        for name, value in headers:
            lowered = name.lower()
            if lowered in HOP_BY_HOP_HEADERS:
                continue
            # A HEAD response keeps the upstream Content-Length: it describes the body a GET would return.
            if lowered == "content-length" and self.command != "HEAD":
                continue
            self.send_header(name, value)
        if self.command != "HEAD":
            self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def _send_injected_error(self, status: int) -> None:
        code = S3_ERROR_CODES[status]
        data = (
            '<?xml version="1.0" encoding="UTF-8"?>\n'
            f"<Error><Code>{code}</Code><Message>Fault injected by the test proxy</Message>"
            f"<Resource>{self.path}</Resource></Error>"
        ).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/xml")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)
