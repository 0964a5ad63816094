"""Hub ingest on real SQLite and PostgreSQL, no broker: a message that breaks the hub loses only itself, and
numbers outside 64 bits are refused as malformed instead of failing the batch."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from edgefleet.agent.contract.wire import ModelWindow, TelemetryWindow
from edgefleet.agent.core.telemetry import LATENCY_BUCKETS_MS
from edgefleet.hub.adapters.home import HubHome
from edgefleet.hub.daemon import Hub
from tests.conftest import use_db


@pytest.fixture
def hub(tmp_path: Path, db_target: str | Path) -> Iterator[Hub]:
    home = HubHome(tmp_path / "hub")
    home.init(fleet="f", broker_url="mqtt://127.0.0.1:1", http_listen="127.0.0.1:0")
    use_db(home, db_target)
    h = Hub(home, clock=lambda: 1_800_000_000.0)
    h.controller.step()  # the only replica: the controller (a started hub elects itself)
    for d in ("d1", "d2", "d3", "d4"):
        h.add_device({"device": d}, "test")
    try:
        yield h
    finally:
        h.db.close()


def _window(device: str, seq: int, counts: list[Any] | None = None) -> tuple[str, str, bytes]:
    latency = {"counts": counts if counts is not None else [1] + [0] * len(LATENCY_BUCKETS_MS)}
    tw = TelemetryWindow(fleet="f", device=device, seq=seq, window_start=1_800_000_000.0 + seq,
                         window_end=1_800_000_001.0 + seq,
                         models={"m": ModelWindow(version="1", requests=1, errors=0, rows=1, latency_ms=latency)})
    return device, "telemetry", tw.to_json()


def _stored(h: Hub) -> set[tuple[str, int]]:
    return {(r["device"], r["seq"]) for r in h.db.query("SELECT device, seq FROM telemetry")}


def test_a_message_that_breaks_ingest_loses_only_itself(hub: Hub) -> None:
    # Latency counts that are not numbers pass the wire check but break the drift sums.
    bad = _window("d2", 1, counts=["x"] * (len(LATENCY_BUCKETS_MS) + 1))
    batch = [_window("d1", 1), bad, _window("d3", 1), _window("d4", 1)]
    hub._ingest_safely(batch)
    assert _stored(hub) == {("d1", 1), ("d3", 1), ("d4", 1)}
    assert hub.counters["ingested"] == 3 and hub.counters["failed"] == 1
    # nothing counted twice by the retry: the drift sums hold each good window once
    with hub.db.tx() as conn:
        hub.drift.flush(conn, force=True)
    rows = hub.db.query("SELECT device, windows FROM telemetry_agg ORDER BY device")
    assert [(r["device"], r["windows"]) for r in rows] == [("d1", 1), ("d3", 1), ("d4", 1)]


def test_integers_beyond_64_bits_are_malformed_not_fatal(hub: Hub) -> None:
    device, channel, payload = _window("d2", 1)
    obj = json.loads(payload)
    obj["seq"] = 2**70
    hub._ingest_safely([_window("d1", 1), (device, channel, json.dumps(obj).encode()), _window("d3", 1)])
    assert _stored(hub) == {("d1", 1), ("d3", 1)}
    assert hub.counters["malformed"] == 1 and hub.counters["failed"] == 0


def test_duplicates_are_counted_once_and_not_stored_twice(hub: Hub) -> None:
    hub._ingest_safely([_window("d1", 1), _window("d1", 1), _window("d1", 2)])
    assert _stored(hub) == {("d1", 1), ("d1", 2)}
    assert hub.counters["ingested"] == 2 and hub.counters["duplicates"] == 1


@pytest.mark.parametrize("bad", [
    b'{"kind":"edgefleet.telemetry/v1","device":"d2","fleet":"f","seq":NaN}',
    b'{"kind":"edgefleet.telemetry/v1","device":"d2","fleet":"f","seq":1,"system":{"x":Infinity}}',
    b'{"kind":"edgefleet.telemetry/v1","device":"d2","fleet":"f","seq":1,"system":{"x":1e400}}',
    b'["not", "an", "object"]',
    b'{"device":"d2","fleet":"f","note":"\xff\xfe"}',
    b'\xef\xbb\xbf{"device":"d2","fleet":"f"}',
    b'{"device":"d2","fleet":"f","x":"' + b"a" * (4 * 1024 * 1024) + b'"}',
])
def test_payloads_that_are_not_one_strict_json_object_are_malformed_not_fatal(hub: Hub, bad: bytes) -> None:
    hub._ingest_safely([_window("d1", 1), ("d2", "telemetry", bad), _window("d3", 1)])
    assert _stored(hub) == {("d1", 1), ("d3", 1)}
    assert hub.counters["malformed"] == 1 and hub.counters["failed"] == 0


def test_a_stored_window_reads_back_as_it_was_sent(hub: Hub) -> None:
    inputs = ({"name": "f0", "counts": [1, 2, 3], "below": 0, "above": 1, "nan": 0, "note": "größe"},)
    tw = TelemetryWindow(fleet="f", device="d1", seq=7, window_start=1_800_000_000.0, window_end=1_800_000_010.5,
                         models={"m": ModelWindow(version="1", requests=5, errors=1, rows=9,
                                                  latency_ms={"p50": 0.125, "counts": [5] + [0] * len(LATENCY_BUCKETS_MS)},
                                                  inputs=inputs, outputs={"classes": {"0": 4, "1": 5}})},
                         system={"rss_bytes": 5e7, "cpu": 3.5}, metrics={"requests": 5, "latency_p95_ms": 0.02})
    hub._ingest_safely([("d1", "telemetry", tw.to_json())])
    row = hub.db.query("SELECT * FROM telemetry WHERE device='d1' AND seq=7")[0]
    assert (row["window_start"], row["window_end"]) == (tw.window_start, tw.window_end)
    assert json.loads(row["metrics"]) == tw.metrics and json.loads(row["system"]) == tw.system
    m = hub.db.query("SELECT * FROM telemetry_models WHERE device='d1' AND seq=7")[0]
    assert (m["model"], m["version"], m["requests"], m["errors"], m["rows"]) == ("m", "1", 5, 1, 9)
    assert json.loads(m["latency"]) == tw.models["m"].latency_ms
    assert json.loads(m["inputs"]) == [dict(x) for x in inputs]
    assert json.loads(m["outputs"]) == {"classes": {"0": 4, "1": 5}}
    assert all(isinstance(m[c], str) for c in ("latency", "inputs", "outputs"))  # TEXT, as before


def test_a_replica_name_must_be_a_plain_name(tmp_path: Path) -> None:
    """It becomes part of the MQTT client id (edgefleet-hub-FLEET-NAME): no wildcards or '/'."""
    from edgefleet.agent.contract.errors import MalformedMessage

    home = HubHome(tmp_path / "hub")
    home.init(fleet="f", broker_url="mqtt://127.0.0.1:1", http_listen="127.0.0.1:0")
    with pytest.raises(MalformedMessage, match="replica name"):
        Hub(home, replica="r/1")
    h = Hub(home, replica="r1", share_group="g")
    h.db.close()
    assert h._client_id == "edgefleet-hub-f-r1"
    # On a broker-config broker the ids start with the hub's user: '@' is in no device id, so
    # no device can take the id (hub.brokerconf's hub listener does not force client ids).
    home.update_config(broker_username="hub@f")
    h = Hub(home, replica="r1", share_group="g")
    h.db.close()
    assert h._client_id == "hub@f-r1"


def test_retention_deletes_old_windows_in_chunks_and_the_window_counter_never_goes_down(tmp_path: Path) -> None:
    """Windows received more than telemetry_retention_days ago go (with their per-model rows and
    old drift buckets); recent ones stay; /metrics' per-device window counter keeps counting them."""
    from edgefleet.hub import daemon as hub_daemon

    home = HubHome(tmp_path / "hub")
    home.init(fleet="f", broker_url="mqtt://127.0.0.1:1", http_listen="127.0.0.1:0")
    with (home.path / "hub.toml").open("a") as f:
        f.write("telemetry_retention_days = 1\n")
    now = [1_800_000_000.0]
    h = Hub(home, clock=lambda: now[0])
    h.controller.step()  # retention is the controller's work
    h.add_device({"device": "d1", "profile": "x86"}, "admin")

    def window(seq: int) -> bytes:
        return TelemetryWindow(fleet="f", device="d1", seq=seq, window_start=now[0] - 10, window_end=now[0],
                               models={"m": ModelWindow(version="1", requests=5, errors=0, rows=5,
                                                        latency_ms={"p95": 1.0})}).to_json()

    for seq in range(1, 8):  # received two days ago
        h.ingest([("d1", "telemetry", window(seq))])
    now[0] += 2 * 86400
    for seq in range(8, 11):  # received now
        h.ingest([("d1", "telemetry", window(seq))])
    hub_daemon.PRUNE_CHUNK, chunk = 3, hub_daemon.PRUNE_CHUNK  # several transactions
    try:
        assert h.prune_telemetry() == 7
    finally:
        hub_daemon.PRUNE_CHUNK = chunk
    assert [r["seq"] for r in h.db.query("SELECT seq FROM telemetry ORDER BY seq")] == [8, 9, 10]
    assert h.db.query("SELECT COUNT(*) AS n FROM telemetry_models")[0]["n"] == 3
    assert h.db.telemetry_counts() == [{"device": "d1", "n": 10, "last": 10}]
    page = h.metrics()
    assert 'edgefleet_device_windows_total{fleet="f",device="d1"} 10' in page
    assert 'edgefleet_model_requests_total{fleet="f",device="d1",model="m",version="1"} 50' in page
    assert h.prune_telemetry() == 0
    h.db.close()


def test_retention_days_must_be_a_number_of_days(tmp_path: Path) -> None:
    from edgefleet.agent.contract.errors import ConfigError

    home = HubHome(tmp_path / "hub")
    home.init(fleet="f", broker_url="mqtt://127.0.0.1:1", http_listen="127.0.0.1:0")
    with (home.path / "hub.toml").open("a") as f:
        f.write("telemetry_retention_days = -3\n")
    with pytest.raises(ConfigError, match="telemetry_retention_days must be a number of days >= 0"):
        home.config()


def test_an_existing_database_gets_the_retention_index(tmp_path: Path) -> None:
    """Homes created before retention open with the index on telemetry.received_at too."""
    import sqlite3

    from edgefleet.hub.db import SCHEMA_1, Database

    conn = sqlite3.connect(tmp_path / "hub.db")  # as a database from before retention (and versions)
    conn.executescript(SCHEMA_1.format(REAL="REAL", INT="INTEGER", SERIAL="INTEGER PRIMARY KEY AUTOINCREMENT")
                       .replace("CREATE INDEX IF NOT EXISTS telemetry_received ON telemetry (received_at);", ""))
    conn.close()
    db = Database(tmp_path / "hub.db")
    names = {r["name"] for r in db.query("SELECT name FROM sqlite_master WHERE type='index'")}
    db.close()
    assert "telemetry_received" in names
