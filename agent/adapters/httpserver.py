"""The stdlib HTTP server made safe to face clients we do not control.

``http.server`` trusts its clients: it reads as many bytes as a ``Content-Length`` says (a
negative one reads until the client closes), waits forever on a client that sends half a
request, and starts a thread for every connection. Both the agent's local inference API and the
hub's admin API are built on it, so both use these two pieces:

* :func:`read_body` - the request body, or an :class:`HttpError` with the status to answer:
  ``Content-Length`` must be a plain decimal (411 when absent on a request that needs a body,
  400 when malformed or negative), at most ``limit`` bytes (413, checked before anything is
  read), and no ``Transfer-Encoding`` (501: a chunked body has no size known in advance).
* :class:`BoundedHTTPServer` - a threading server with a cap on open connections (one past it
  gets ``503`` and is closed at once) and a per-connection socket timeout, so a client that
  drips a request or sits idle on a keep-alive connection is let go.
"""

from __future__ import annotations

import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

__all__ = ["BoundedHTTPServer", "HttpError", "QuietHandler", "read_body"]


class QuietHandler(BaseHTTPRequestHandler):
    """The handler settings both servers want: HTTP/1.1 keep-alive, and each response sent at once.

    Unbuffered, the stdlib handler writes headers and body in two sends; on a keep-alive connection
    Nagle's algorithm then holds the body until the client's delayed ACK, about 40 ms a request
    (enrolling 1,000 devices took 44 s). The response is buffered (http.server flushes it after each
    request) and TCP_NODELAY set. Access lines are not logged: the callers log what matters."""

    protocol_version = "HTTP/1.1"
    wbufsize = -1
    disable_nagle_algorithm = True

    def log_message(self, format: str, *args: Any) -> None:
        pass


class HttpError(Exception):
    """A request refused before it reached the application; ``status`` is the HTTP answer."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def read_body(handler: BaseHTTPRequestHandler, limit: int, *, required: bool = True) -> bytes:
    """Read exactly the declared body of the current request, refusing what cannot be bounded."""
    if handler.headers.get("Transfer-Encoding"):
        handler.close_connection = True
        raise HttpError(501, "Transfer-Encoding is not supported here; send the body with a "
                             "Content-Length")
    raw = handler.headers.get("Content-Length")
    if raw is None:
        if required:
            handler.close_connection = True
            raise HttpError(411, "this request needs a body with a Content-Length header")
        return b""
    raw = raw.strip()
    if not raw.isdigit():  # also refuses "-1", "+5", "1e9" and whitespace inside
        handler.close_connection = True
        raise HttpError(400, f"Content-Length must be a non-negative decimal integer, got {raw[:32]!r}")
    length = int(raw)
    if length > limit:
        handler.close_connection = True  # the unread body must not be parsed as the next request
        raise HttpError(413, f"request body of {length} bytes exceeds the limit of {limit} bytes")
    body = handler.rfile.read(length)
    if len(body) < length:
        handler.close_connection = True
        raise HttpError(400, f"request body ended after {len(body)} of {length} bytes")
    return body


class BoundedHTTPServer(ThreadingHTTPServer):
    """``ThreadingHTTPServer`` with at most ``max_connections`` open at once and a socket
    timeout of ``timeout`` seconds on each (idle keep-alive connections included)."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], handler: type[BaseHTTPRequestHandler], *,
                 max_connections: int = 64, timeout: float = 10.0, **kw: Any) -> None:
        super().__init__(address, handler, **kw)
        self.max_connections = max_connections
        self.connection_timeout = timeout
        self._slots = threading.BoundedSemaphore(max_connections)
        self.refused_connections = 0

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):
            self.refused_connections += 1
            try:
                request.settimeout(1.0)
                request.sendall(b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n"
                                b"Connection: close\r\nRetry-After: 1\r\n\r\n")
            except OSError:
                pass
            self.shutdown_request(request)
            return
        try:
            request.settimeout(self.connection_timeout)
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client that timed out or went away is not an error worth a traceback.
        import sys

        if isinstance(sys.exc_info()[1], (TimeoutError, socket.timeout, ConnectionError)):
            return
        super().handle_error(request, client_address)
