"""The hub database: the one module that writes it.

SQLite in WAL mode, one connection shared under a lock by the daemon's threads (HTTP handlers and
the ingest thread). Only the running daemon opens it; the CLI goes through the admin API.

Tables: ``models`` (immutable versions with signature, reference and lineage), ``devices``,
``assignments`` (what each device should run), ``desired`` (the last signed state per device,
with its ``seq``), ``telemetry`` and ``telemetry_models`` (windows, unique per device and seq),
``events``, ``audit``, ``telemetry_agg`` (mergeable sums per model version, device and time
bucket; its rows are written by :mod:`hub.services.drift_monitor` inside the ingest transaction) and
``captures`` (sampled inference records uploaded by devices, unique per device, request id and
model).
Rollouts (:mod:`hub.services.rollout_manager`): ``rollouts`` (one row per rollout, the :class:`hub.core.rollout.Rollout`
as JSON in ``spec``), ``rollout_windows`` (the canary dict of every cohort window, tagged with the
step it arrived in), ``rollout_events`` (canary events of cohort devices), and
``model_preflight`` (the preflight blob of a model version: sha256, size, tolerances).
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

__all__ = ["Database"]

GROUP_COLUMN = "device_group"


def ensure_group_column(conn: sqlite3.Connection) -> None:
    """Add ``devices.device_group`` if the table predates groups (idempotent)."""
    cols = {r[1] for r in conn.execute("PRAGMA table_info(devices)").fetchall()}
    if GROUP_COLUMN not in cols:
        conn.execute(f"ALTER TABLE devices ADD COLUMN {GROUP_COLUMN} TEXT")
        conn.execute(f"CREATE INDEX IF NOT EXISTS devices_group ON devices ({GROUP_COLUMN})")


SCHEMA = """
CREATE TABLE IF NOT EXISTS models (
    name TEXT NOT NULL, version TEXT NOT NULL, sha256 TEXT NOT NULL, size INTEGER NOT NULL,
    inputs TEXT NOT NULL, outputs TEXT NOT NULL, reference TEXT, lineage TEXT NOT NULL,
    created_at REAL NOT NULL, PRIMARY KEY (name, version));
CREATE TABLE IF NOT EXISTS devices (
    id TEXT PRIMARY KEY, profile TEXT NOT NULL, created_at REAL NOT NULL,
    status TEXT, status_at REAL, reported TEXT, reported_at REAL);
CREATE TABLE IF NOT EXISTS assignments (
    device TEXT NOT NULL, model TEXT NOT NULL, version TEXT NOT NULL, previous TEXT,
    PRIMARY KEY (device, model));
CREATE TABLE IF NOT EXISTS desired (
    device TEXT PRIMARY KEY, seq INTEGER NOT NULL, envelope TEXT NOT NULL,
    issued_at REAL NOT NULL, expires_at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS telemetry (
    device TEXT NOT NULL, seq INTEGER NOT NULL, window_start REAL NOT NULL,
    window_end REAL NOT NULL, received_at REAL NOT NULL, metrics TEXT NOT NULL,
    system TEXT NOT NULL, PRIMARY KEY (device, seq));
CREATE TABLE IF NOT EXISTS telemetry_models (
    device TEXT NOT NULL, seq INTEGER NOT NULL, model TEXT NOT NULL, version TEXT NOT NULL,
    requests INTEGER NOT NULL, errors INTEGER NOT NULL, rows INTEGER NOT NULL,
    latency TEXT NOT NULL, inputs TEXT NOT NULL, outputs TEXT,
    PRIMARY KEY (device, seq, model));
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY AUTOINCREMENT, device TEXT NOT NULL, time REAL NOT NULL,
    type TEXT NOT NULL, reason TEXT, message TEXT, model TEXT, version TEXT, seq INTEGER,
    received_at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS telemetry_agg (
    model TEXT NOT NULL, version TEXT NOT NULL, device TEXT NOT NULL, bucket REAL NOT NULL,
    windows INTEGER NOT NULL, requests INTEGER NOT NULL, errors INTEGER NOT NULL,
    rows INTEGER NOT NULL, latency TEXT NOT NULL, inputs TEXT NOT NULL, classes TEXT NOT NULL,
    last_end REAL NOT NULL, PRIMARY KEY (model, version, device, bucket));
CREATE TABLE IF NOT EXISTS rollouts (
    id TEXT PRIMARY KEY, model TEXT NOT NULL, state TEXT NOT NULL, spec TEXT NOT NULL,
    created_at REAL NOT NULL, updated_at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS rollout_windows (
    rollout TEXT NOT NULL, step INTEGER NOT NULL, device TEXT NOT NULL, seq INTEGER NOT NULL,
    received_at REAL NOT NULL, canary TEXT NOT NULL, stable_latency TEXT,
    PRIMARY KEY (rollout, device, seq));
CREATE TABLE IF NOT EXISTS rollout_events (
    id INTEGER PRIMARY KEY AUTOINCREMENT, rollout TEXT NOT NULL, step INTEGER NOT NULL,
    device TEXT NOT NULL, time REAL NOT NULL, type TEXT NOT NULL, reason TEXT, details TEXT);
CREATE TABLE IF NOT EXISTS model_preflight (
    name TEXT NOT NULL, version TEXT NOT NULL, preflight TEXT NOT NULL, PRIMARY KEY (name, version));
CREATE TABLE IF NOT EXISTS audit (
    id INTEGER PRIMARY KEY AUTOINCREMENT, time REAL NOT NULL, actor TEXT NOT NULL,
    action TEXT NOT NULL, details TEXT NOT NULL, prev_hash TEXT NOT NULL, hash TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS captures (
    device TEXT NOT NULL, request_id TEXT NOT NULL, model TEXT NOT NULL, version TEXT NOT NULL,
    sha256 TEXT NOT NULL, time REAL NOT NULL, inputs TEXT NOT NULL, outputs TEXT NOT NULL,
    received_at REAL NOT NULL, PRIMARY KEY (device, request_id, model));
"""


class Database:
    def __init__(self, path: Path) -> None:
        # timeout: how long BEGIN IMMEDIATE waits for another writer (a hub replica sharing this
        # file through --share) before "database is locked"; an ingest batch that fails is lost.
        self._conn = sqlite3.connect(path, timeout=30.0, check_same_thread=False, isolation_level=None)
        self._conn.row_factory = sqlite3.Row
        self._lock = threading.RLock()
        with self._lock:
            self._conn.execute("PRAGMA journal_mode=WAL")
            self._conn.execute("PRAGMA synchronous=NORMAL")
            self._conn.executescript(SCHEMA)
            ensure_group_column(self._conn)  # devices.device_group (groups were added after the first schema)
            # devices.capture_token_sha256: the device's data-capture upload token, hashed
            if "capture_token_sha256" not in {r[1] for r in self._conn.execute("PRAGMA table_info(devices)")}:
                self._conn.execute("ALTER TABLE devices ADD COLUMN capture_token_sha256 TEXT")

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    @contextmanager
    def tx(self) -> Iterator[sqlite3.Connection]:
        """One transaction; commits on success, rolls back on any error."""
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                yield self._conn
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            self._conn.execute("COMMIT")

    def query(self, sql: str, args: Iterable[Any] = ()) -> list[dict[str, Any]]:
        with self._lock:
            return [dict(r) for r in self._conn.execute(sql, tuple(args)).fetchall()]

    # -- models ----------------------------------------------------------------------------------

    def get_model(self, name: str, version: str) -> dict[str, Any] | None:
        rows = self.query("SELECT * FROM models WHERE name=? AND version=?", (name, version))
        return _decode_model(rows[0]) if rows else None

    def list_models(self) -> list[dict[str, Any]]:
        return [_decode_model(r) for r in self.query("SELECT * FROM models ORDER BY name, created_at")]

    def insert_model(self, conn: sqlite3.Connection, m: dict[str, Any]) -> None:
        conn.execute(
            "INSERT INTO models VALUES (?,?,?,?,?,?,?,?,?)",
            (m["name"], m["version"], m["sha256"], m["size"], json.dumps(m["inputs"]),
             json.dumps(m["outputs"]), json.dumps(m["reference"]) if m.get("reference") else None,
             json.dumps(m["lineage"]), m["created_at"]),
        )

    # -- devices ---------------------------------------------------------------------------------

    def get_device(self, device: str) -> dict[str, Any] | None:
        rows = self.query("SELECT * FROM devices WHERE id=?", (device,))
        return rows[0] if rows else None

    def device_ids(self) -> set[str]:
        return {r["id"] for r in self.query("SELECT id FROM devices")}

    # -- data capture ----------------------------------------------------------------------------

    def insert_captures(self, conn: sqlite3.Connection, device: str, records: Iterable[dict[str, Any]],
                        now: float) -> int:
        """Store checked capture records; a record seen before (a retried upload) is skipped.
        Returns how many were new."""
        cur = conn.executemany(
            "INSERT OR IGNORE INTO captures VALUES (?,?,?,?,?,?,?,?,?)",
            [(device, r["request_id"], r["model"], r["version"], r["sha256"], r["time"],
              json.dumps(r["inputs"]), json.dumps(r["outputs"]), now) for r in records],
        )
        return int(cur.rowcount)

    def get_captures(self, device: str, request_id: str) -> list[dict[str, Any]]:
        rows = self.query("SELECT * FROM captures WHERE device=? AND request_id=? ORDER BY model",
                          (device, request_id))
        for r in rows:
            r["inputs"] = json.loads(r["inputs"])
            r["outputs"] = json.loads(r["outputs"])
        return rows

    # -- audit (append-only, hash-chained) -------------------------------------------------------

    def audit(self, conn: sqlite3.Connection, now: float, actor: str, action: str, details: dict[str, Any]) -> int:
        """Append one audit entry inside the caller's transaction; return its id.

        Each entry stores the hash of the previous one, so editing or deleting any row breaks the
        chain at that row (:func:`verify_audit`).
        """
        last = conn.execute("SELECT id, hash FROM audit ORDER BY id DESC LIMIT 1").fetchone()
        prev_hash = last["hash"] if last else GENESIS
        entry_id = (last["id"] if last else 0) + 1
        text = json.dumps(details, sort_keys=True, separators=(",", ":"))
        digest = audit_hash(prev_hash, entry_id, now, actor, action, text)
        conn.execute(
            "INSERT INTO audit (id, time, actor, action, details, prev_hash, hash) VALUES (?,?,?,?,?,?,?)",
            (entry_id, now, actor, action, text, prev_hash, digest),
        )
        return entry_id

    def audit_entries(self, since: float | None = None) -> list[dict[str, Any]]:
        sql, args = "SELECT * FROM audit", []
        if since is not None:
            sql += " WHERE time >= ?"
            args.append(since)
        rows = self.query(sql + " ORDER BY id", args)
        for r in rows:
            r["details"] = json.loads(r["details"])
        return rows

    def verify_audit(self) -> list[str]:
        """Problems found walking the chain (empty when intact), each naming the row."""
        problems: list[str] = []
        prev_hash, expected_id = GENESIS, 1
        for r in self.query("SELECT * FROM audit ORDER BY id"):
            if r["id"] != expected_id:
                problems.append(f"row {expected_id}..{r['id'] - 1} missing (deleted)")
            if r["prev_hash"] != prev_hash:
                problems.append(f"row {r['id']}: does not follow the previous entry (a row before it was changed or deleted)")
            if audit_hash(r["prev_hash"], r["id"], r["time"], r["actor"], r["action"], r["details"]) != r["hash"]:
                problems.append(f"row {r['id']} ({r['action']}): content does not match its hash (modified)")
            prev_hash, expected_id = r["hash"], r["id"] + 1
        return problems


GENESIS = "0" * 64


def audit_hash(prev_hash: str, entry_id: int, time: float, actor: str, action: str, details: str) -> str:
    body = json.dumps([prev_hash, entry_id, repr(float(time)), actor, action, details], separators=(",", ":"))
    return hashlib.sha256(body.encode()).hexdigest()


def _decode_model(r: dict[str, Any]) -> dict[str, Any]:
    return {
        **r,
        "inputs": json.loads(r["inputs"]),
        "outputs": json.loads(r["outputs"]),
        "reference": json.loads(r["reference"]) if r["reference"] else None,
        "lineage": json.loads(r["lineage"]),
    }
