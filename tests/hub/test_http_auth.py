"""Who may read what on the hub's HTTP server: a token for everything but blob downloads and the
health check; Prometheus without a token only on the separate ``metrics_listen`` port."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from edgefleet.hub.adapters.api import MetricsHttpServer
from edgefleet.hub.adapters.home import HubHome
from edgefleet.hub.daemon import Hub
from tests.conftest import Broker, free_port, wait_for
from tests.hub._served import Served, serve
from tests.simulator import tiny_model

READ_ENDPOINTS = [
    "/metrics", "/api/v1/status", "/api/v1/events", "/api/v1/events?device=d1&limit=5", "/api/v1/models",
    "/api/v1/models/m", "/api/v1/models/m/versions/1", "/api/v1/models/m/diff?a=1&b=1",
    "/api/v1/trace?device=d1&request=r1", "/api/v1/audit", "/api/v1/audit/verify", "/api/v1/drift",
    "/api/v1/devices", "/api/v1/rollouts", "/api/v1/no-such-endpoint", "/api/v1/whoami",
    "/api/v1/devices/d1/telemetry", "/api/v1/drift/view?model=m", "/api/v1/audit?limit=5",
]


@pytest.fixture
def served(tmp_path: Path) -> Iterator[Served]:
    with serve(tmp_path) as s:
        yield s


@pytest.mark.parametrize("path", READ_ENDPOINTS)
def test_every_read_endpoint_needs_a_token(served: Served, path: str) -> None:
    for token in (None, "guess"):
        r = served.get(path, token=token)
        assert r.status_code == 401, f"GET {path} with token {token!r} answered {r.status_code}: {r.text[:200]}"
        assert r.json()["reason"] == "not_authorized" and "token" in r.json()["error"]
        assert "d1" not in r.text
    r = served.get(path)
    assert r.status_code != 401, f"GET {path} with the admin token: {r.status_code} {r.text[:200]}"


def test_blobs_and_the_health_check_need_no_token(served: Served) -> None:
    sha = hashlib.sha256(tiny_model(1.0)).hexdigest()
    r = served.get(f"/blobs/{sha}", token=None)
    assert r.status_code == 200 and hashlib.sha256(r.content).hexdigest() == sha
    r = served.get("/healthz", token=None)
    assert r.status_code == 200 and r.json() == {"ok": True, "fleet": "f"}


def test_the_metrics_listener_serves_metrics_alone_without_a_token(served: Served) -> None:
    listener = MetricsHttpServer(served.hub.metrics, "127.0.0.1", 0)
    listener.start()
    try:
        r = httpx.get(listener.url, timeout=10)
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
        devices = {s.value for f in text_string_to_metric_families(r.text) if f.name == "edgefleet_devices"
                   for s in f.samples}
        assert devices == {1.0}
        base = listener.url.removesuffix("/metrics")
        for path in ("/api/v1/status", "/api/v1/devices", f"/blobs/{'0' * 64}", "/healthz"):
            r = httpx.get(base + path, headers={"Authorization": f"Bearer {served.token}"}, timeout=10)
            assert r.status_code == 404 and "GET /metrics only" in r.text, (path, r.status_code, r.text)
        assert httpx.post(base + "/api/v1/deploy", json={}, timeout=10).status_code == 501
    finally:
        listener.stop()


def test_the_hub_opens_the_metrics_listener_named_in_hub_toml(tmp_path: Path, broker: Broker) -> None:
    home = HubHome(tmp_path / "hub")
    home.init(fleet="f", broker_url=broker.url, http_listen="127.0.0.1:0")
    port = free_port()
    home.update_config(metrics_listen=f"127.0.0.1:{port}")
    hub = Hub(home)
    hub.start()
    try:
        run = json.loads(home.run_path.read_text())
        assert run["metrics"] == f"http://127.0.0.1:{port}/metrics"
        wait_for(lambda: httpx.get(run["metrics"], timeout=2).status_code == 200, 10, "the metrics listener")
        assert "edgefleet_devices" in httpx.get(run["metrics"], timeout=10).text
        assert httpx.get(run["http"] + "/metrics", timeout=10).status_code == 401  # the admin port still asks
    finally:
        hub.stop()
