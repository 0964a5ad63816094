"""The hub database: the one module of the hub that talks SQL.

SQLite in WAL mode, one connection shared under a lock by the daemon's threads (HTTP handlers and
the ingest thread). Only the running daemon opens it; the CLI goes through the admin API.

Every statement the hub runs is a named method of :class:`Database` (``tests/test_sql_in_db.py``
fails on SQL text or ``execute`` calls anywhere else in ``edgefleet.hub``). A method that takes
``conn`` runs inside the caller's transaction (:meth:`Database.tx`), so several of them commit or
roll back together; one without ``conn`` reads on its own.

Tables: ``models`` (immutable versions with signature, reference and lineage), ``devices``,
``assignments`` (what each device should run), ``desired`` (the last signed state per device,
with its ``seq``), ``telemetry`` and ``telemetry_models`` (windows, unique per device and seq;
retention deletes those older than ``telemetry_retention_days`` and counts them per device in
``telemetry_pruned``), ``events``, ``audit``, ``telemetry_agg`` (mergeable sums per model version, device and time
bucket; :mod:`hub.services.drift_monitor` writes them inside the ingest transaction) and
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
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson

if TYPE_CHECKING:
    from edgefleet.agent.contract.wire import Event, TelemetryWindow

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
CREATE INDEX IF NOT EXISTS telemetry_received ON telemetry (received_at);
CREATE TABLE IF NOT EXISTS telemetry_pruned (
    device TEXT PRIMARY KEY, windows INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS telemetry_models_pruned (
    device TEXT NOT NULL, model TEXT NOT NULL, version TEXT NOT NULL, requests INTEGER NOT NULL,
    errors INTEGER NOT NULL, PRIMARY KEY (device, model, version));
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
        """Rows of one read, as dicts. The hub's own modules call the named methods below; this is
        what they are built on (and what tests and benchmarks inspect the database with)."""
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

    def insert_preflight(self, conn: sqlite3.Connection, name: str, version: str, preflight: Mapping[str, Any]) -> None:
        """The preflight blob's description (sha256, size, tolerances) of a version being published."""
        conn.execute("INSERT INTO model_preflight VALUES (?,?,?)", (name, version, json.dumps(preflight)))

    def get_preflight(self, name: str, version: str) -> dict[str, Any] | None:
        rows = self.query("SELECT preflight FROM model_preflight WHERE name=? AND version=?", (name, version))
        return dict(json.loads(rows[0]["preflight"])) if rows else None

    # -- devices ---------------------------------------------------------------------------------

    def get_device(self, device: str) -> dict[str, Any] | None:
        rows = self.query("SELECT * FROM devices WHERE id=?", (device,))
        return rows[0] if rows else None

    def device_by_capture_token(self, sha256: str) -> str | None:
        """The device whose data-capture token hashes to ``sha256`` (None: no such device, or
        revoked: revocation clears the hash)."""
        rows = self.query("SELECT id FROM devices WHERE capture_token_sha256=?", (sha256,))
        return str(rows[0]["id"]) if rows else None

    def device_ids(self) -> set[str]:
        return {r["id"] for r in self.query("SELECT id FROM devices")}

    def devices(self) -> list[dict[str, Any]]:
        """Every device row (all columns), by id."""
        return self.query("SELECT * FROM devices ORDER BY id")

    def devices_page(self, after: str, limit: int) -> list[dict[str, Any]]:
        """Up to *limit* device rows (all columns) with ids after *after*, by id."""
        return self.query("SELECT * FROM devices WHERE id > ? ORDER BY id LIMIT ?", (after, limit))

    def device_count(self) -> int:
        return int(self.query("SELECT COUNT(*) AS n FROM devices")[0]["n"])

    def device_summaries(self) -> list[dict[str, Any]]:
        """``id, profile, created_at, status, device_group`` of every device, by id."""
        return self.query("SELECT id, profile, created_at, status, device_group FROM devices ORDER BY id")

    def device_profiles(self) -> dict[str, str]:
        return {r["id"]: r["profile"] for r in self.query("SELECT id, profile FROM devices")}

    def device_registered(self, conn: sqlite3.Connection, device: str) -> bool:
        return conn.execute("SELECT 1 FROM devices WHERE id=?", (device,)).fetchone() is not None

    def device_profile(self, conn: sqlite3.Connection, device: str) -> str | None:
        row = conn.execute("SELECT profile FROM devices WHERE id=?", (device,)).fetchone()
        return str(row["profile"]) if row else None

    def insert_device(self, conn: sqlite3.Connection, device: str, profile: str, now: float, group: str | None,
                      capture_token_sha256: str) -> None:
        conn.execute("INSERT INTO devices (id, profile, created_at, device_group, capture_token_sha256) "
                     "VALUES (?,?,?,?,?)", (device, profile, now, group, capture_token_sha256))

    def delete_unseen_device(self, conn: sqlite3.Connection, device: str) -> bool:
        """Cancel an enrolment: remove *device* if it has never said anything (no status, no
        report, no desired state); return whether it was removed."""
        if conn.execute("SELECT 1 FROM desired WHERE device=?", (device,)).fetchone() is not None:
            return False
        cur = conn.execute("DELETE FROM devices WHERE id=? AND status IS NULL AND reported IS NULL", (device,))
        return cur.rowcount == 1

    def clear_capture_token(self, conn: sqlite3.Connection, device: str) -> None:
        """Revocation: the device's capture uploads are refused from now on."""
        conn.execute("UPDATE devices SET capture_token_sha256=NULL WHERE id=?", (device,))

    def set_reported(self, conn: sqlite3.Connection, device: str, reported: Mapping[str, Any], now: float) -> None:
        conn.execute("UPDATE devices SET reported=?, reported_at=? WHERE id=?", (_compact(reported), now, device))

    def set_status(self, conn: sqlite3.Connection, device: str, state: str, now: float) -> None:
        conn.execute("UPDATE devices SET status=?, status_at=? WHERE id=?", (state, now, device))

    # -- device groups (hub.services.groups) -----------------------------------------------------

    def group_ids(self) -> list[str]:
        """Every group some device is in, sorted."""
        rows = self.query("SELECT DISTINCT device_group AS g FROM devices WHERE device_group IS NOT NULL ORDER BY g")
        return [r["g"] for r in rows]

    def group_members(self, group: str | None) -> list[str]:
        return [r["id"] for r in self.query("SELECT id FROM devices WHERE device_group=? ORDER BY id", (group,))]

    # -- assignments (what each device should run) -----------------------------------------------

    def assignment(self, conn: sqlite3.Connection, device: str, model: str) -> dict[str, Any] | None:
        """``version`` and ``previous`` of *device*'s assignment of *model*, or None."""
        row = conn.execute("SELECT version, previous FROM assignments WHERE device=? AND model=?",
                           (device, model)).fetchone()
        return dict(row) if row else None

    def set_assignment(self, conn: sqlite3.Connection, device: str, model: str, version: str,
                       previous: str | None) -> None:
        """The one writer of ``assignments``: *device* should run *version* of *model*, falling back
        to *previous*. Deploys, drift rollbacks, rollout promotions and rollbacks and fleet
        rollbacks all come through here, inside the transaction that re-signs the device."""
        conn.execute(
            "INSERT INTO assignments VALUES (?,?,?,?) ON CONFLICT(device, model) DO UPDATE "
            "SET version=excluded.version, previous=excluded.previous",
            (device, model, version, previous),
        )

    def model_assignments(self, model: str) -> list[dict[str, Any]]:
        """``device, version, previous`` of every device assigned *model*."""
        return self.query("SELECT device, version, previous FROM assignments WHERE model=?", (model,))

    def version_assignments(self, model: str, version: str) -> list[dict[str, Any]]:
        """``device, previous`` of every device assigned *version* of *model*."""
        return self.query("SELECT device, previous FROM assignments WHERE model=? AND version=?", (model, version))

    def device_assignments(self, device: str) -> list[dict[str, Any]]:
        """``model, version`` of every model assigned to *device*."""
        return self.query("SELECT model, version FROM assignments WHERE device=?", (device,))

    def assigned_models(self, conn: sqlite3.Connection, device: str) -> list[dict[str, Any]]:
        """The registry rows of the versions assigned to *device* (inputs, outputs and reference
        decoded), each with its assignment's ``model`` and ``previous``."""
        rows = conn.execute(
            "SELECT a.model, a.previous, m.* FROM assignments a JOIN models m "
            "ON m.name = a.model AND m.version = a.version WHERE a.device=?", (device,)
        ).fetchall()
        return [{**dict(r), "inputs": json.loads(r["inputs"]), "outputs": json.loads(r["outputs"]),
                 "reference": json.loads(r["reference"]) if r["reference"] else None} for r in rows]

    # -- desired states (the last signed state per device) ---------------------------------------

    def next_desired_seq(self, conn: sqlite3.Connection, device: str) -> int:
        """The seq *device*'s next desired state gets: the stored one + 1 (1 for the first)."""
        cur = conn.execute("SELECT seq FROM desired WHERE device=?", (device,)).fetchone()
        return int(cur["seq"] if cur else 0) + 1

    def store_desired(self, conn: sqlite3.Connection, device: str, seq: int, envelope: str, issued_at: float,
                      expires_at: float) -> None:
        conn.execute(
            "INSERT INTO desired VALUES (?,?,?,?,?) ON CONFLICT(device) DO UPDATE SET "
            "seq=excluded.seq, envelope=excluded.envelope, issued_at=excluded.issued_at, "
            "expires_at=excluded.expires_at",
            (device, seq, envelope, issued_at, expires_at),
        )

    def desired_envelope(self, device: str) -> str | None:
        rows = self.query("SELECT envelope FROM desired WHERE device=?", (device,))
        return str(rows[0]["envelope"]) if rows else None

    def desired_envelopes(self) -> list[tuple[str, str]]:
        """``(device, envelope)`` of every stored desired state."""
        return [(r["device"], r["envelope"]) for r in self.query("SELECT device, envelope FROM desired")]

    def desired_seq(self, device: str) -> int:
        """The seq of *device*'s stored desired state; 0 when it has none."""
        rows = self.query("SELECT seq FROM desired WHERE device=?", (device,))
        return int(rows[0]["seq"]) if rows else 0

    def expiring_desired(self, now: float, within: float) -> list[str]:
        """Devices whose desired state expires less than *within* seconds after *now*."""
        return [r["device"] for r in self.query("SELECT device FROM desired WHERE expires_at - ? < ?", (now, within))]

    # -- telemetry and events (written by the ingest transaction) --------------------------------

    def insert_telemetry(self, conn: sqlite3.Connection, device: str, tw: TelemetryWindow, now: float) -> bool:
        """Store a window and its per-model rows; False (nothing written) if *device* already sent
        this seq (a QoS 1 duplicate)."""
        cur = conn.execute(
            "INSERT OR IGNORE INTO telemetry VALUES (?,?,?,?,?,?,?)",
            (device, tw.seq, tw.window_start, tw.window_end, now, _compact(dict(tw.metrics)),
             _compact(dict(tw.system))),
        )
        if cur.rowcount == 0:
            return False
        conn.executemany(
            "INSERT INTO telemetry_models VALUES (?,?,?,?,?,?,?,?,?,?)",
            [(device, tw.seq, name, w.version, w.requests, w.errors, w.rows,
              _compact(dict(w.latency_ms)), _compact([dict(x) for x in w.inputs]),
              _compact(dict(w.outputs)) if w.outputs is not None else None)
             for name, w in tw.models.items()],
        )
        return True

    def prune_telemetry(self, before: float, limit: int) -> int:
        """Delete up to *limit* of the oldest windows received before *before* (their per-model
        rows too) and the drift buckets older than it, in one transaction; the windows deleted.
        Each device's deleted windows are counted in ``telemetry_pruned`` and their requests and
        errors per model version in ``telemetry_models_pruned``, so that the totals the metrics
        page shows as counters (:meth:`telemetry_counts`, :meth:`model_totals`) never go down."""
        with self.tx() as conn:
            keys = [(r[0], r[1]) for r in conn.execute(
                "SELECT device, seq FROM telemetry WHERE received_at < ? ORDER BY received_at LIMIT ?",
                (before, limit))]
            # the same windows' requests and errors per model version (an upsert's SELECT needs its
            # WHERE, even WHERE true, to parse unambiguously)
            conn.execute(
                "INSERT INTO telemetry_models_pruned SELECT tm.device, tm.model, tm.version, SUM(tm.requests), "
                "SUM(tm.errors) FROM telemetry_models tm JOIN (SELECT device, seq FROM telemetry WHERE "
                "received_at < ? ORDER BY received_at LIMIT ?) o ON o.device = tm.device AND o.seq = tm.seq "
                "WHERE true GROUP BY tm.device, tm.model, tm.version ON CONFLICT(device, model, version) "
                "DO UPDATE SET requests = requests + excluded.requests, errors = errors + excluded.errors",
                (before, limit))
            conn.executemany("DELETE FROM telemetry_models WHERE device=? AND seq=?", keys)
            conn.executemany("DELETE FROM telemetry WHERE device=? AND seq=?", keys)
            per = Counter(d for d, _ in keys)
            conn.executemany("INSERT INTO telemetry_pruned VALUES (?, ?) ON CONFLICT(device) DO UPDATE "
                             "SET windows = windows + excluded.windows", sorted(per.items()))
            conn.execute("DELETE FROM telemetry_agg WHERE last_end < ?", (before,))
        return len(keys)

    def insert_event(self, conn: sqlite3.Connection, device: str, ev: Event, now: float) -> None:
        conn.execute(
            "INSERT INTO events (device, time, type, reason, message, model, version, seq, received_at)"
            " VALUES (?,?,?,?,?,?,?,?,?)",
            (device, ev.time, ev.type, ev.reason, ev.message, ev.model, ev.version, ev.seq, now),
        )

    def events(self, device: str | None, limit: int) -> list[dict[str, Any]]:
        """The newest *limit* events, of one device or of all; newest first."""
        sql = "SELECT * FROM events"
        args: list[Any] = []
        if device:
            sql += " WHERE device=?"
            args.append(device)
        sql += " ORDER BY id DESC LIMIT ?"
        args.append(limit)
        return self.query(sql, args)

    def last_telemetry(self, device: str) -> dict[str, Any] | None:
        """``seq, window_start, window_end, received_at, metrics`` (decoded) of *device*'s newest window."""
        rows = self.query("SELECT seq, window_start, window_end, received_at, metrics FROM telemetry "
                          "WHERE device=? ORDER BY seq DESC LIMIT 1", (device,))
        return {**rows[0], "metrics": json.loads(rows[0]["metrics"])} if rows else None

    def telemetry_totals(self, device: str) -> list[dict[str, Any]]:
        """``model, version, requests, errors, windows`` summed over *device*'s stored windows."""
        return self.query(
            "SELECT model, version, SUM(requests) AS requests, SUM(errors) AS errors, COUNT(*) AS windows "
            "FROM telemetry_models WHERE device=? GROUP BY model, version ORDER BY model, version", (device,))

    def telemetry_counts(self) -> list[dict[str, Any]]:
        """``device, n`` (windows stored, those retention deleted included: it only grows) and
        ``last`` (highest seq held) per device, by device."""
        return self.query(
            "SELECT t.device AS device, COUNT(*) + COALESCE(MAX(p.windows), 0) AS n, MAX(t.seq) AS last "
            "FROM telemetry t LEFT JOIN telemetry_pruned p ON p.device = t.device GROUP BY t.device ORDER BY t.device")

    def last_window_metrics(self) -> list[tuple[str, dict[str, Any]]]:
        """``(device, metrics)`` of every device's newest window, by device."""
        rows = self.query(
            "SELECT t.device, t.metrics FROM telemetry t JOIN (SELECT device, MAX(seq) AS seq FROM telemetry "
            "GROUP BY device) m ON m.device = t.device AND m.seq = t.seq ORDER BY t.device")
        return [(r["device"], json.loads(r["metrics"])) for r in rows]

    def model_totals(self) -> list[dict[str, Any]]:
        """``device, model, version, req, err`` summed over all stored windows, those retention
        deleted included."""
        return self.query(
            "SELECT device, model, version, SUM(req) AS req, SUM(err) AS err FROM ("
            "SELECT device, model, version, requests AS req, errors AS err FROM telemetry_models "
            "UNION ALL SELECT device, model, version, requests, errors FROM telemetry_models_pruned) "
            "GROUP BY device, model, version ORDER BY device, model, version")

    # -- telemetry aggregates (hub.services.drift_monitor) ---------------------------------------

    def telemetry_agg_row(self, conn: sqlite3.Connection, model: str, version: str, device: str,
                          bucket: float) -> sqlite3.Row | None:
        row: sqlite3.Row | None = conn.execute(
            "SELECT * FROM telemetry_agg WHERE model=? AND version=? AND device=? AND bucket=?",
            (model, version, device, bucket)).fetchone()
        return row

    def put_telemetry_agg(self, conn: sqlite3.Connection, model: str, version: str, device: str, bucket: float, *,
                          windows: int, requests: int, errors: int, rows: int, latency: list[int],
                          inputs: Mapping[str, Any], classes: Mapping[str, int], last_end: float) -> None:
        """Write (or replace) one bucket's sums."""
        conn.execute(
            "INSERT OR REPLACE INTO telemetry_agg VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
            (model, version, device, bucket, windows, requests, errors, rows, _compact(latency),
             _compact(inputs), _compact(classes), last_end))

    def telemetry_agg_window(self, model: str, version: str, seconds: float) -> list[dict[str, Any]]:
        """The buckets of *model* *version* newer than its newest bucket minus *seconds*, by device."""
        return self.query(
            "SELECT * FROM telemetry_agg WHERE model=? AND version=? AND bucket > "
            "(SELECT MAX(bucket) FROM telemetry_agg WHERE model=? AND version=?) - ? ORDER BY device",
            (model, version, model, version, seconds))

    def telemetry_agg_versions(self) -> list[tuple[str, str]]:
        """Every ``(model, version)`` with aggregated telemetry, sorted."""
        rows = self.query("SELECT DISTINCT model, version FROM telemetry_agg ORDER BY model, version")
        return [(r["model"], r["version"]) for r in rows]

    # -- rollouts (hub.services.rollout_manager) -------------------------------------------------

    def save_rollout(self, conn: sqlite3.Connection, rollout: str, model: str, state: str, spec: Mapping[str, Any],
                     created_at: float, now: float) -> None:
        conn.execute(
            "INSERT INTO rollouts (id, model, state, spec, created_at, updated_at) VALUES (?,?,?,?,?,?) "
            "ON CONFLICT(id) DO UPDATE SET state=excluded.state, spec=excluded.spec, updated_at=excluded.updated_at",
            (rollout, model, state, json.dumps(spec), created_at, now))

    def active_rollout_specs(self) -> list[dict[str, Any]]:
        """The specs of the running and paused rollouts."""
        return _specs(self.query("SELECT spec FROM rollouts WHERE state IN ('running','paused')"))

    def rollout_spec(self, rollout: str) -> dict[str, Any] | None:
        specs = _specs(self.query("SELECT spec FROM rollouts WHERE id=?", (rollout,)))
        return specs[0] if specs else None

    def model_rollout_specs(self, model: str, limit: int = -1) -> list[dict[str, Any]]:
        """The specs of *model*'s rollouts, newest first (at most *limit*; -1: all)."""
        return _specs(self.query("SELECT spec FROM rollouts WHERE model=? ORDER BY created_at DESC, rowid DESC LIMIT ?",
                                 (model, limit)))

    def recent_rollout_specs(self, limit: int) -> list[dict[str, Any]]:
        """The specs of the newest *limit* rollouts, newest first."""
        return _specs(self.query("SELECT spec FROM rollouts ORDER BY created_at DESC, rowid DESC LIMIT ?", (limit,)))

    def rollout_count(self) -> int:
        return int(self.query("SELECT COUNT(*) AS n FROM rollouts")[0]["n"])

    def insert_rollout_window(self, conn: sqlite3.Connection, rollout: str, step: int, device: str, seq: int,
                              now: float, canary: Mapping[str, Any], stable_latency: Mapping[str, Any]) -> None:
        """A cohort device's canary dict for the rollout's current step (a repeated seq is skipped)."""
        conn.execute("INSERT OR IGNORE INTO rollout_windows VALUES (?,?,?,?,?,?,?)",
                     (rollout, step, device, seq, now, json.dumps(dict(canary)), json.dumps(dict(stable_latency))))

    def insert_rollout_event(self, conn: sqlite3.Connection, rollout: str, step: int, device: str, time: float,
                             type_: str, reason: str, details: Mapping[str, Any]) -> None:
        conn.execute("INSERT INTO rollout_events (rollout, step, device, time, type, reason, details)"
                     " VALUES (?,?,?,?,?,?,?)",
                     (rollout, step, device, time, type_, reason, json.dumps(details)))

    def rollout_windows(self, rollout: str, step: int) -> list[tuple[str, Any, Any]]:
        """``(device, canary, stable_latency or None)`` of a rollout step's windows, decoded."""
        rows = self.query("SELECT device, canary, stable_latency FROM rollout_windows WHERE rollout=? AND step=?",
                          (rollout, step))
        return [(w["device"], json.loads(w["canary"]), json.loads(w["stable_latency"]) if w["stable_latency"] else None)
                for w in rows]

    def rollout_stable_inputs(self, rollout: str, step: int, model: str, version: str) -> list[Any]:
        """The stable *version*'s input histograms (decoded ``inputs`` lists) in the windows of a
        rollout step: the same windows the step's canary evidence comes from."""
        rows = self.query(
            "SELECT tm.inputs FROM rollout_windows rw JOIN telemetry_models tm ON tm.device=rw.device "
            "AND tm.seq=rw.seq AND tm.model=? AND tm.version=? WHERE rw.rollout=? AND rw.step=?",
            (model, version, rollout, step))
        return [json.loads(r["inputs"]) for r in rows]

    def rollout_events(self, rollout: str, step: int) -> list[tuple[str, str, str]]:
        """``(device, type, reason)`` of a rollout step's canary events."""
        rows = self.query("SELECT device, type, reason FROM rollout_events WHERE rollout=? AND step=?", (rollout, step))
        return [(e["device"], e["type"], e["reason"] or "") for e in rows]

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


def _compact(obj: Any) -> str:
    """What the ingest path stores of device messages (``telemetry``, ``telemetry_models``,
    ``devices.reported``, ``telemetry_agg``): compact JSON text (SQLite TEXT) of data that came from
    JSON (str keys, finite numbers), by orjson (the hot path), non-ASCII as UTF-8 instead of
    ``\\uXXXX`` escapes; both read back the same with any JSON parser."""
    return orjson.dumps(obj).decode()


def _specs(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [dict(json.loads(r["spec"])) for r in rows]


def _decode_model(r: dict[str, Any]) -> dict[str, Any]:
    return {
        **r,
        "inputs": json.loads(r["inputs"]),
        "outputs": json.loads(r["outputs"]),
        "reference": json.loads(r["reference"]) if r["reference"] else None,
        "lineage": json.loads(r["lineage"]),
    }
