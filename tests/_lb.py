"""A failover TCP load balancer on a free 127.0.0.1 port, as an operator puts one in front of hub
replicas: each connection goes to the next healthy upstream that accepts it (round robin). Health
is ``GET /healthz`` answered within 0.5 s, checked every 0.5 s, so a stopped replica (which the
kernel still accepts connections for) is left out within a second, as a real balancer does."""

from __future__ import annotations

import contextlib
import itertools
import socket
import threading
import time

import httpx

from tests.conftest import free_port


class FailoverLB:
    def __init__(self, upstreams: list[int], connect_timeout: float = 0.5) -> None:
        self.upstreams = upstreams
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.connect_timeout = connect_timeout
        self._next = itertools.count()
        self._sock = socket.create_server(("127.0.0.1", self.port))
        self._stop = threading.Event()
        self.healthy = set(upstreams)
        threading.Thread(target=self._accept, name="lb", daemon=True).start()
        threading.Thread(target=self._check, name="lb-health", daemon=True).start()

    def _check(self) -> None:
        while not self._stop.is_set():
            for port in self.upstreams:
                try:
                    ok = httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=0.5).status_code == 200
                except httpx.HTTPError:
                    ok = False
                (self.healthy.add if ok else self.healthy.discard)(port)
            time.sleep(0.5)

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self._sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        start = next(self._next)
        for i in range(len(self.upstreams)):
            port = self.upstreams[(start + i) % len(self.upstreams)]
            if port not in self.healthy:
                continue
            try:
                upstream = socket.create_connection(("127.0.0.1", port), timeout=self.connect_timeout)
            except OSError:
                continue
            upstream.settimeout(None)
            threading.Thread(target=_pump, args=(upstream, client), daemon=True).start()
            _pump(client, upstream)
            return
        client.close()

    def close(self) -> None:
        self._stop.set()
        self._sock.close()


def _pump(src: socket.socket, dst: socket.socket) -> None:
    try:
        while data := src.recv(65536):
            dst.sendall(data)
    except OSError:
        pass
    finally:
        for s in (src, dst):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
