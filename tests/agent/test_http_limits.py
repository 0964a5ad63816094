"""The agent's local inference API against hostile clients, over real sockets: bodies it cannot
bound, bodies past the limit, half-sent requests, and more connections than it serves."""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from edgefleet.agent.adapters.oip import MAX_BODY, OipServer
from edgefleet.agent.app.serving import ModelServer, load
from edgefleet.agent.contract.config import DeviceProfile
from edgefleet.agent.contract.wire import ModelEntry
from tests._rawhttp import connect, push, response, status
from tests.simulator import tiny_model

INFER = "/v2/models/m/infer"
GOOD = b'{"inputs": [{"name": "x", "shape": [1, 2], "datatype": "FP32", "data": [1.0, 1.0]}]}'


@pytest.fixture
def server(tmp_path: Path) -> Iterator[OipServer]:
    data = tiny_model(1.0)
    (tmp_path / "m.onnx").write_bytes(data)
    entry = ModelEntry(version="1", sha256=hashlib.sha256(data).hexdigest(), size=len(data), url="http://x/")
    models = ModelServer()
    models.install(load("m", entry, tmp_path / "m.onnx", DeviceProfile(name="t")))
    srv = OipServer(models, port=0, max_connections=4, timeout=1.0)
    srv.start()
    try:
        yield srv
    finally:
        srv.stop()


@pytest.mark.parametrize(("header", "code", "words"), [
    ("Content-Length: -1", 400, b"non-negative decimal"),
    ("Content-Length: 1e9", 400, b"non-negative decimal"),
    ("Content-Length: 99999999999999", 413, b"exceeds the limit"),
    (f"Content-Length: {MAX_BODY + 1}", 413, b"exceeds the limit"),
    ("Transfer-Encoding: chunked", 501, b"Transfer-Encoding"),
    ("X-Nothing: 1", 411, b"Content-Length"),
], ids=["negative", "float", "absurd", "one-past", "chunked", "missing"])
def test_a_body_that_cannot_be_bounded_is_refused_before_it_is_read(
    server: OipServer, header: str, code: int, words: bytes
) -> None:
    s = connect(server.address)
    s.sendall(f"POST {INFER} HTTP/1.1\r\nHost: x\r\n{header}\r\n\r\n".encode())
    sent = push(s)  # keep pushing body bytes: the answer must not wait for them
    raw = response(s)
    s.close()
    assert status(raw) == code, raw[:200]
    assert words in raw
    assert sent < 64 * 2**20, "the server kept reading a body it had refused"
    assert httpx.post(f"http://{server.address[0]}:{server.address[1]}{INFER}", content=GOOD).status_code == 200


def test_a_client_that_sends_half_a_request_is_let_go(server: OipServer) -> None:
    s = connect(server.address)
    s.sendall(b"POST " + INFER.encode() + b" HTTP/1.1\r\nContent-Length: 100\r\n")  # never finishes
    t0 = time.monotonic()
    s.settimeout(5)
    assert s.recv(100) == b"", "the server should close the connection"
    assert time.monotonic() - t0 < 3
    s.close()


def test_connections_past_the_cap_get_503_and_the_rest_are_served(server: OipServer) -> None:
    idle = [connect(server.address) for _ in range(4)]
    time.sleep(0.2)
    extra = connect(server.address)
    assert status(response(extra)) == 503
    extra.close()
    for s in idle:
        s.close()
    time.sleep(1.2)  # the idle ones time out server-side too
    assert httpx.post(f"http://{server.address[0]}:{server.address[1]}{INFER}", content=GOOD).status_code == 200
