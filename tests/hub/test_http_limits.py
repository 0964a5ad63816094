"""The hub's HTTP server (admin API, blobs) against hostile clients, over real sockets: bodies it
cannot bound, bodies sent without a credential, half-sent requests, more connections than it
serves. A real ``Hub`` (SQLite, signing) behind the real ``HubHttpServer``; no broker."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from edgefleet.hub.adapters.api import MAX_CAPTURE_BODY
from tests._rawhttp import connect, push, response, status
from tests.hub._served import Served, serve

MAX_LIST_BODY = 4 * 2**20  # hub.adapters.api's limit for deploys and rollouts


@pytest.fixture
def served(tmp_path: Path) -> Iterator[Served]:
    with serve(tmp_path, max_connections=4, timeout=1.0) as s:
        yield s


def still_serves(s: Served) -> None:
    r = s.get("/api/v1/status")
    assert r.status_code == 200, f"after the attack the hub answered {r.status_code}: {r.text[:200]}"


@pytest.mark.parametrize(("path", "header", "code", "words"), [
    ("/api/v1/deploy", "Content-Length: -1", 400, b"non-negative decimal"),
    ("/api/v1/deploy", "Content-Length: 1e9", 400, b"non-negative decimal"),
    ("/api/v1/deploy", "Content-Length: lots", 400, b"non-negative decimal"),
    ("/api/v1/deploy", "Content-Length: 99999999999999", 413, b"exceeds the limit"),
    ("/api/v1/deploy", f"Content-Length: {MAX_LIST_BODY + 1}", 413, b"exceeds the limit"),
    ("/api/v1/rollouts/action", "Content-Length: 1000000", 413, b"exceeds the limit"),
    ("/api/v1/deploy", "Transfer-Encoding: chunked", 501, b"Transfer-Encoding"),
    ("/api/v1/deploy", "X-Nothing: 1", 411, b"Content-Length"),
], ids=["negative", "float", "non-numeric", "absurd", "one-past", "small-endpoint", "chunked", "missing"])
def test_a_body_that_cannot_be_bounded_is_refused_before_it_is_read(
    served: Served, path: str, header: str, code: int, words: bytes
) -> None:
    sock = connect(served.http.address)
    sock.sendall(f"POST {path} HTTP/1.1\r\nHost: x\r\n{served.auth()}{header}\r\n\r\n".encode())
    sent = push(sock)  # the answer must not wait for these bytes
    raw = response(sock)
    sock.close()
    assert status(raw) == code, f"expected HTTP {code} for {header!r}, got: {raw[:300]!r}"
    assert words in raw, raw[:300]
    assert b'"reason": "body_refused"' in raw
    assert sent < 64 * 2**20, f"the hub kept reading a body it had refused ({sent} bytes)"
    still_serves(served)


@pytest.mark.parametrize(("path", "length"), [
    ("/api/v1/capture", MAX_CAPTURE_BODY),  # within its limit: only the missing token refuses it
    ("/api/v1/capture", -1),  # the reviewer's case: read until the client closes
    ("/api/v1/models", 300 * 2**20),
    ("/api/v1/deploy", 1000),
    ("/api/v1/no-such-endpoint", 300 * 2**20),
], ids=["capture", "capture-negative", "publish", "deploy", "unknown-endpoint"])
@pytest.mark.parametrize("auth", ["", "Authorization: Bearer guess\r\n"], ids=["no-token", "wrong-token"])
def test_a_body_sent_without_a_valid_token_is_refused_without_reading_it(
    served: Served, path: str, length: int, auth: str
) -> None:
    sock = connect(served.http.address)
    sock.sendall(f"POST {path} HTTP/1.1\r\nHost: x\r\n{auth}Content-Length: {length}\r\n\r\n".encode()
                 + b"\0" * 1000)  # a little of the body, then wait: the answer must come without the rest
    raw = response(sock, quiet=2.0)
    sock.close()
    assert status(raw) == 401, f"expected HTTP 401 before the body of POST {path} was read, got: {raw[:300]!r}"
    assert b"token" in raw, raw[:300]
    still_serves(served)


def test_a_refused_body_is_never_parsed_as_the_next_request(served: Served) -> None:
    smuggled = b"GET /api/v1/status HTTP/1.1\r\nHost: x\r\n" + served.auth().encode() + b"\r\n"
    sock = connect(served.http.address)
    sock.sendall(b"POST /api/v1/deploy HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(smuggled) + smuggled)
    raw = response(sock)
    sock.close()
    assert status(raw) == 401, raw[:300]
    assert raw.count(b"HTTP/1.1 ") == 1, f"the unread body was served as a request: {raw!r}"


def test_the_capture_token_is_checked_before_the_body_and_then_the_body_is_bounded(served: Served) -> None:
    sock = connect(served.http.address)
    sock.sendall(f"POST /api/v1/capture HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {served.capture_token}\r\n"
                 f"Content-Length: {MAX_CAPTURE_BODY + 1}\r\n\r\n".encode())
    raw = response(sock)
    sock.close()
    assert status(raw) == 413 and b"exceeds the limit" in raw, raw[:300]


def test_a_client_that_sends_half_a_request_is_let_go(served: Served) -> None:
    for partial in (b"POST /api/v1/deploy HTTP/1.1\r\nContent-Length: 100\r\n",  # headers never end
                    f"POST /api/v1/deploy HTTP/1.1\r\n{served.auth()}Content-Length: 100\r\n\r\n{{".encode()):
        sock = connect(served.http.address)
        sock.sendall(partial)
        t0 = time.monotonic()
        sock.settimeout(5)
        try:
            got = sock.recv(65536)
        except ConnectionResetError:
            got = b""
        waited = time.monotonic() - t0
        sock.close()
        assert b"HTTP/1.1 2" not in got, got
        assert waited < 3, f"the hub held a half-sent request for {waited:.1f}s (timeout 1 s)"
    still_serves(served)


def test_connections_past_the_cap_get_503_and_the_rest_are_served(served: Served) -> None:
    idle = [connect(served.http.address) for _ in range(4)]
    time.sleep(0.2)
    extra = connect(served.http.address)
    raw = response(extra)
    extra.close()
    assert status(raw) == 503, f"the 5th connection (cap 4) got: {raw[:200]!r}"
    for sock in idle:
        sock.close()
    time.sleep(1.2)  # the idle ones time out server-side too
    still_serves(served)
