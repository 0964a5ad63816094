"""A real hub (SQLite, signing; no broker) behind its real HTTP server, for the HTTP tests."""

from __future__ import annotations

import base64
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx

from edgefleet.hub.adapters.api import HubHttpServer
from edgefleet.hub.adapters.home import HubHome
from edgefleet.hub.daemon import Hub
from tests.simulator import tiny_model


@dataclass
class Served:
    hub: Hub
    http: HubHttpServer
    token: str  # the admin token of the home (admin.token)
    capture_token: str  # device d1's

    @property
    def url(self) -> str:
        return self.http.url

    def auth(self, token: str | None = None) -> str:
        """The header line, for raw-socket requests."""
        return f"Authorization: Bearer {token or self.token}\r\n"

    def get(self, path: str, token: str | None = "") -> httpx.Response:
        """GET with ``token`` (default: the admin token; None: no Authorization header)."""
        headers = {} if token is None else {"Authorization": f"Bearer {token or self.token}"}
        return httpx.get(self.url + path, headers=headers, timeout=10)

    def post(self, path: str, body: object, token: str | None = "") -> httpx.Response:
        headers = {} if token is None else {"Authorization": f"Bearer {token or self.token}"}
        return httpx.post(self.url + path, json=body, headers=headers, timeout=30)


@contextmanager
def serve(tmp: Path, *, max_connections: int | None = None, timeout: float | None = None) -> Iterator[Served]:
    """A hub home in ``tmp`` with model m 1 published and device d1 enrolled, its HTTP server
    started."""
    home = HubHome(tmp / "hub")
    home.init(fleet="f", broker_url="mqtt://127.0.0.1:1", http_listen="127.0.0.1:0")
    hub = Hub(home)
    hub.public_url = "http://hub.example"
    hub.publish({"name": "m", "version": "1", "model_b64": base64.b64encode(tiny_model(1.0)).decode()}, "admin")
    creds = hub.add_device({"device": "d1", "profile": "generic-x86_64"}, "admin")["credentials"]
    http = HubHttpServer(hub, "127.0.0.1", 0, max_connections=max_connections, timeout=timeout)
    http.start()
    try:
        yield Served(hub, http, home.token(), creds["capture_token"])
    finally:
        http.stop()
        hub.db.close()
