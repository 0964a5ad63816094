"""The hub database on both engines: types that keep what SQLite kept, versioned migrations,
exclusive write transactions across processes, reconnecting, and `db migrate` from an SQLite home
into PostgreSQL that serves the same status, models and audit."""

from __future__ import annotations

import base64
import json
import sqlite3
import threading
from pathlib import Path

import pytest

from edgefleet.agent.contract.errors import ConfigError
from edgefleet.agent.contract.wire import Event, ModelWindow, TelemetryWindow
from edgefleet.agent.core.telemetry import LATENCY_BUCKETS_MS
from edgefleet.hub.adapters.home import HubHome
from edgefleet.hub.daemon import Hub
from edgefleet.hub.db import SCHEMA_1, SCHEMA_VERSION, Database, redact_url
from tests.conftest import run_cli, use_db
from tests.simulator import tiny_model

T = 1_800_000_000.123456  # a Unix time with microseconds: a 4-byte REAL would keep ~2 minutes of it


def _window(device: str, seq: int) -> TelemetryWindow:
    lat = {"counts": [1] + [0] * len(LATENCY_BUCKETS_MS)}
    return TelemetryWindow(fleet="f", device=device, seq=seq, window_start=T + seq, window_end=T + seq + 1,
                           models={"m": ModelWindow(version="1", requests=3, errors=1, rows=3, latency_ms=lat)})


def test_times_counts_and_duplicates_round_trip(db_target: Path | str) -> None:
    db = Database(db_target)
    try:
        with db.tx() as conn:
            db.insert_device(conn, "d1", "x86", T, "g", "0" * 64)
            assert db.insert_telemetry(conn, "d1", _window("d1", 1), T)
            assert not db.insert_telemetry(conn, "d1", _window("d1", 1), T)  # a QoS 1 duplicate
            db.insert_event(conn, "d1", Event(fleet="f", device="d1", time=T, type="installed", model="m", version="1"), T)
            db.audit(conn, T, "admin", "deploy", {"device": "d1"})
            new = db.insert_captures(conn, "d1", [{"request_id": "r", "model": "m", "version": "1", "sha256": "0" * 64,
                                                   "time": T, "inputs": {}, "outputs": {}}] * 2, T)
        assert new == 1
        assert db.get_device("d1")["created_at"] == T
        assert db.last_telemetry("d1")["window_start"] == T + 1
        assert db.events("d1", 5)[0]["time"] == T
        assert db.telemetry_totals("d1") == [{"model": "m", "version": "1", "requests": 3, "errors": 1, "windows": 1}]
        assert db.verify_audit() == []
        assert db.audit_entries()[0]["time"] == T
        # retention: the window goes, its counts stay in the totals
        assert db.prune_telemetry(T + 10, 100) == 1
        assert db.model_totals() == [{"device": "d1", "model": "m", "version": "1", "req": 3, "err": 1}]
        assert db.telemetry_counts() == []
        assert db.schema_version() == SCHEMA_VERSION
    finally:
        db.close()


def test_an_older_report_never_replaces_a_newer_one(db_target: Path | str) -> None:
    """Replicas may store a device's reports out of order: by (seq, device time), newest wins."""
    db = Database(db_target)
    try:
        with db.tx() as conn:
            db.insert_device(conn, "d1", "x86", T, None, "0" * 64)
            assert db.set_reported(conn, "d1", {"models": {"m": "3"}}, 5, T, T)
            assert not db.set_reported(conn, "d1", {"models": {"m": "2"}}, 4, T + 9, T + 10)
            assert not db.set_reported(conn, "d1", {"models": {"m": "x"}}, 5, T - 1, T + 10)
            assert db.set_reported(conn, "d1", {"models": {"m": "3b"}}, 5, T + 1, T + 10)
        assert json.loads(db.get_device("d1")["reported"])["models"] == {"m": "3b"}
    finally:
        db.close()


def test_rollouts_list_newest_first_even_at_the_same_time(db_target: Path | str) -> None:
    db = Database(db_target)
    try:
        for rid in ("a", "b", "c"):
            with db.tx() as conn:
                db.save_rollout(conn, rid, "m", "running", {"id": rid}, 5.0, 5.0)
        with db.tx() as conn:  # an update keeps its place
            db.save_rollout(conn, "a", "m", "promoted", {"id": "a", "v": 2}, 5.0, 6.0)
        assert [s["id"] for s in db.model_rollout_specs("m")] == ["c", "b", "a"]
        assert [s["id"] for s in db.recent_rollout_specs(2)] == ["c", "b"]
        assert [s["id"] for s in db.model_rollout_specs("m", 1)] == ["c"]
    finally:
        db.close()


def test_a_database_from_a_newer_edgefleet_is_refused(db_target: Path | str) -> None:
    Database(db_target).close()
    db = Database(db_target)
    with db.tx() as conn:
        conn.execute("UPDATE schema_version SET version = ?", (SCHEMA_VERSION + 1,))
    db.close()
    with pytest.raises(ConfigError, match=f"schema version {SCHEMA_VERSION + 1}; this edgefleet knows versions up to"):
        Database(db_target)


def test_an_unversioned_sqlite_home_is_migrated_in_place(tmp_path: Path) -> None:
    path = tmp_path / "hub.db"
    conn = sqlite3.connect(path)  # the shape of a hub.db before versions (and before groups)
    conn.executescript(SCHEMA_1.format(REAL="REAL", INT="INTEGER", SERIAL="INTEGER PRIMARY KEY AUTOINCREMENT")
                       .replace(", reported_at {REAL});".format(REAL="REAL"), ", reported_at REAL);"))
    conn.execute("INSERT INTO rollouts VALUES ('r1', 'm', 'promoted', '{\"id\": \"r1\"}', 1.0, 2.0)")
    conn.commit()
    conn.close()
    db = Database(path)
    try:
        assert db.schema_version() == SCHEMA_VERSION
        assert db.query("SELECT id, n FROM rollouts") == [{"id": "r1", "n": 1}]
    finally:
        db.close()


def test_replicas_migrating_and_writing_at_once_keep_one_audit_chain(pg_url: str) -> None:
    """Three processes' worth of connections open a new database at the same moment (each runs
    the migrations) and append to the audit log concurrently: one chain, every entry once."""
    dbs: list[Database] = []
    errors: list[BaseException] = []
    lock = threading.Lock()

    def replica(i: int) -> None:
        try:
            db = Database(pg_url)
            with lock:
                dbs.append(db)
            for k in range(40):
                with db.tx() as conn:
                    db.audit(conn, T + k, f"r{i}", "deploy", {"k": k})
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=replica, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == []
    try:
        entries = dbs[0].audit_entries()
        assert len(entries) == 120 and dbs[0].verify_audit() == []
        assert sorted((e["actor"], e["details"]["k"]) for e in entries) == sorted(
            (f"r{i}", k) for i in range(3) for k in range(40))
    finally:
        for db in dbs:
            db.close()


def test_a_lost_postgresql_connection_is_replaced(tmp_path: Path) -> None:
    from tests._postgres import PgCluster

    cluster = PgCluster()  # its own cluster: this test restarts it
    cluster.start()
    try:
        db = Database(cluster.url())
        with db.tx() as conn:
            db.audit(conn, T, "a", "x", {})
        cluster.stop()
        cluster.start()
        assert len(db.audit_entries()) == 1  # a read finds the connection dead and runs on a new one
        cluster.stop()
        cluster.start()
        with db.tx() as conn:  # so does a transaction's first statement
            db.audit(conn, T + 1, "a", "y", {})
        assert db.verify_audit() == [] and len(db.audit_entries()) == 2
        cluster.stop()
        with pytest.raises(Exception, match=r"connect|terminat|closed"):
            db.audit_entries()  # while the server is down: an error, not a hang
        cluster.start()
        assert len(db.audit_entries()) == 2
        db.close()
    finally:
        cluster.destroy()


def test_passwords_never_appear_in_what_is_shown() -> None:
    assert redact_url("postgresql://hub:s3cret@db:5432/edgefleet") == "postgresql://hub:***@db:5432/edgefleet"
    assert redact_url("postgresql://hub@db/edgefleet") == "postgresql://hub@db/edgefleet"
    with pytest.raises(ConfigError, match=r"must start with sqlite:/// or postgresql://, got 'mysql://u:\*\*\*@h/d'"):
        Database("mysql://u:pw@h/d")


def test_a_migrated_sqlite_home_serves_the_same_status_models_and_audit(tmp_path: Path, pg_url: str) -> None:
    home = HubHome(tmp_path / "hub")
    home.init(fleet="f", broker_url="mqtt://127.0.0.1:1", http_listen="127.0.0.1:0")
    hub = Hub(home, clock=lambda: T)
    for v in ("1", "2"):
        hub.publish({"name": "m", "version": v, "model_b64": base64.b64encode(tiny_model(float(v))).decode()}, "alice")
    for d in ("d1", "d2"):
        hub.add_device({"device": d}, "admin")
    hub.deploy({"model": "m", "version": "2", "devices": ["d1", "d2"]}, "alice")
    hub.ingest([("d1", "telemetry", _window("d1", 1).to_json()), ("d1", "events", Event(
        fleet="f", device="d1", time=T, type="installed", model="m", version="2").to_json())])
    def stored(h: Hub) -> tuple[object, ...]:  # what the database says (not this process's counters)
        status = {k: v for k, v in h.status().items() if k not in ("counters", "controller", "database")}
        return status, h.models(), h.audit_entries(), h.events(None, 10)

    before = stored(hub)
    hub.db.close()

    res = run_cli("edgefleet.hub.cli.main", "db", "migrate", "--home", str(home.path), "--to", pg_url, "--json")
    copied = json.loads(res.stdout)["rows"]
    assert copied["audit"] == len(before[2]) and copied["telemetry"] == 1 and copied["devices"] == 2
    assert home.config().db == pg_url
    hub = Hub(home, clock=lambda: T)
    try:
        assert hub.db.engine == "postgresql"
        assert stored(hub) == before
        assert hub.verify_audit() == []
        # and it goes on: new events get new ids, the chain continues
        hub.ingest([("d2", "events", Event(fleet="f", device="d2", time=T, type="installed", model="m", version="2").to_json())])
        hub.deploy({"model": "m", "version": "1", "devices": ["d1"]}, "alice")
        assert hub.verify_audit() == [] and len(hub.events(None, 10)) == 2
    finally:
        hub.db.close()
    info = json.loads(run_cli("edgefleet.hub.cli.main", "db", "info", "--home", str(home.path), "--json").stdout)
    assert info["engine"] == "postgresql" and info["rows"]["devices"] == 2
    # a second migration into the same (now full) database is refused, naming what is there
    other = HubHome(tmp_path / "other")
    other.init(fleet="f", broker_url="mqtt://127.0.0.1:1", http_listen="127.0.0.1:0")
    Hub(other).db.close()
    res = run_cli("edgefleet.hub.cli.main", "db", "migrate", "--home", str(other.path), "--to", pg_url, check=False)
    assert res.returncode != 0 and "is not empty (models: 2 rows" in res.stderr
    assert other.config().db == ""


def test_init_with_a_postgresql_url_and_a_hub_on_it(tmp_path: Path, pg_url: str) -> None:
    home = HubHome(tmp_path / "hub")
    run_cli("edgefleet.hub.cli.main", "init", "--home", str(home.path), "--db", pg_url, "--http", "127.0.0.1:0")
    assert home.config().db == pg_url and not home.db_path.exists()
    hub = Hub(home)
    try:
        hub.add_device({"device": "d1"}, "admin")
        assert hub.db.engine == "postgresql" and hub.db.device_ids() == {"d1"}
    finally:
        hub.db.close()
    res = run_cli("edgefleet.hub.cli.main", "init", "--home", str(tmp_path / "bad"), "--db",
                  "postgresql://nobody@127.0.0.1:1/x", check=False)
    assert res.returncode != 0 and "cannot connect to postgresql://nobody@127.0.0.1:1/x" in res.stderr
    assert not (tmp_path / "bad" / "hub.toml").exists()


def test_use_db_points_a_home_at_the_engine(tmp_path: Path, db_target: Path | str) -> None:
    home = HubHome(tmp_path / "h")
    home.init(fleet="f", broker_url="mqtt://127.0.0.1:1", http_listen="127.0.0.1:0")
    use_db(home, db_target)
    hub = Hub(home)
    try:
        assert hub.db.engine == ("sqlite" if isinstance(db_target, Path) else "postgresql")
    finally:
        hub.db.close()
