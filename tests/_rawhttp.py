"""Raw-socket HTTP for tests of what a hostile client sends: half requests, bodies the server must
not read, more connections than it serves. Used against the agent's and the hub's servers alike."""

from __future__ import annotations

import socket
import time


def connect(address: tuple[str, int]) -> socket.socket:
    return socket.create_connection(address, timeout=5)


def response(sock: socket.socket, quiet: float = 1.0) -> bytes:
    """Everything the server sends until it closes or goes quiet for ``quiet`` seconds."""
    sock.settimeout(quiet)
    out = b""
    try:
        while chunk := sock.recv(65536):
            out += chunk
    except (TimeoutError, ConnectionResetError):
        pass
    return out


def status(raw: bytes) -> int:
    """The status code of a raw response, or -1 when nothing that looks like one came."""
    return int(raw.split(b" ", 2)[1]) if raw.startswith(b"HTTP/1.") else -1


def push(sock: socket.socket, seconds: float = 0.5) -> int:
    """Keep sending body bytes for ``seconds``; return how many the server took."""
    sent, t0 = 0, time.monotonic()
    sock.settimeout(0.05)
    while time.monotonic() - t0 < seconds:
        try:
            sent += sock.send(b"\0" * 65536)
        except (TimeoutError, BrokenPipeError, ConnectionResetError):
            break
    return sent
