"""What the fleet page is served with and the read endpoints added for it, on a real hub's HTTP
server (the page itself in a browser: tests/system/test_fleet_page.py)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from edgefleet.agent.contract.wire import ModelWindow, TelemetryWindow
from tests.hub._served import Served, serve

LAT = {"p50": 0.2, "p95": 0.4, "p99": 0.5, "max": 0.6, "buckets": [0.5, 1.0], "counts": [9, 1, 0]}


@pytest.fixture
def served(tmp_path: Path) -> Iterator[Served]:
    with serve(tmp_path) as s:
        yield s


def test_the_page_is_static_needs_no_token_and_is_locked_down(served: Served) -> None:
    for path, kind in (("/ui", "text/html"), ("/ui/app.js", "text/javascript"), ("/ui/app.css", "text/css")):
        r = served.get(path, token=None)
        assert r.status_code == 200 and r.headers["content-type"].startswith(kind), path
        csp = r.headers["content-security-policy"]
        assert "script-src 'self'" in csp and "frame-ancestors 'none'" in csp and "unsafe-inline" not in csp
        assert r.headers["x-content-type-options"] == "nosniff"
        assert "d1" not in r.text and served.token not in r.text  # no data, no secret in the files
    assert served.get("/ui/../hub.toml", token=None).status_code in (401, 404)  # never a file of the home
    assert served.get("/ui/secret.json", token=None).status_code == 404
    js = served.get("/ui/app.js", token=None).text
    assert "innerHTML" not in js and "sessionStorage" in js and "localStorage" not in js


def test_whoami_tells_the_page_what_the_token_may_do(served: Served) -> None:
    me = served.get("/api/v1/whoami").json()
    assert me == {"name": "admin", "role": "admin", "fleet": "f", "can_operate": True}
    viewer = served.post("/api/v1/tokens", {"name": "v", "role": "viewer"}).json()["token"]
    assert served.get("/api/v1/whoami", token=viewer).json()["can_operate"] is False


def test_a_devices_recent_windows(served: Served) -> None:
    now = time.time()
    msgs = [("d1", "telemetry", TelemetryWindow(
        fleet="f", device="d1", seq=seq, window_start=now - 10 + seq, window_end=now - 9 + seq,
        models={"m": ModelWindow(version="1", requests=10, errors=0, rows=10, latency_ms=LAT)},
        system={"rss_bytes": 5e7, "process_cpu_percent": 3.0}).to_json()) for seq in range(1, 6)]
    served.hub.ingest(msgs)
    r = served.get("/api/v1/devices/d1/telemetry?limit=3").json()
    assert [w["seq"] for w in r["windows"]] == [3, 4, 5]  # the newest three, oldest first
    w = r["windows"][-1]
    assert w["models"]["m"]["latency"]["p95"] == 0.4 and w["system"]["rss_bytes"] == 5e7
    assert served.get("/api/v1/devices/nope/telemetry").status_code == 404
    bad = served.get("/api/v1/devices/d1/telemetry?limit=0")
    assert bad.status_code == 400 and "limit must be 1-1000" in bad.json()["error"]


def test_the_drift_view_says_when_there_is_nothing_yet(served: Served) -> None:
    r = served.get("/api/v1/drift/view?model=m")
    assert r.status_code == 404 and "no telemetry for model 'm' yet" in r.json()["error"]


def test_the_newest_audit_entries(served: Served) -> None:
    every = served.get("/api/v1/audit").json()["entries"]
    newest = served.get("/api/v1/audit?limit=1").json()["entries"]
    assert len(every) >= 2 and newest == every[-1:]
