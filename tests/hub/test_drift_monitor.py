"""The hub's aggregation and drift adapter on a real SQLite database, with functions as the MQTT
publisher and the assignment path (no broker)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edgefleet.agent.contract.errors import ConfigError
from edgefleet.agent.contract.wire import FeatureReference, ModelWindow, Reference, TelemetryWindow, Topics
from edgefleet.agent.core.telemetry import feature_histogram
from edgefleet.hub.db import Database
from edgefleet.hub.services.drift_monitor import DriftConfig, DriftMonitor, _Acc

EDGES = (0.0, 1.0, 2.0, 3.0, 4.0)
REF = Reference(features=(FeatureReference(name="x", edges=EDGES, freqs=(0.25, 0.25, 0.25, 0.25)),
                          FeatureReference(name="y", edges=EDGES, freqs=(0.25, 0.25, 0.25, 0.25))))


class World:
    def __init__(self, db: Path | str, config: DriftConfig) -> None:
        """*db*: the ``db_target`` fixture (SQLite file or a fresh PostgreSQL database)."""
        self.db = Database(db)
        self.now = 1000.0
        self.published: list[tuple[str, dict[str, Any], bool]] = []
        self.assigned: list[tuple[str, str, str, str]] = []
        for version in ("1", "2"):
            with self.db.tx() as conn:
                self.db.insert_model(conn, {"name": "m", "version": version, "sha256": "0" * 64, "size": 1,
                                            "inputs": [], "outputs": [], "reference": REF.to_dict(),
                                            "lineage": {}, "created_at": 0.0})
        with self.db.tx() as conn:
            conn.execute("INSERT INTO assignments VALUES ('dev', 'm', '2', '1')")
            self.db.audit(conn, 990.0, "admin", "deploy", {"device": "dev", "model": "m", "version": "2"})
        self.mon = DriftMonitor(db=self.db, config=config, topics=Topics("f"), clock=lambda: self.now,
                                publish=lambda t, p, r: self.published.append((t, json.loads(p), r)),
                                assign=lambda *a, **k: self.assigned.append(a))
        self.seq = 0

    def window(self, start: float, x: np.ndarray, y: np.ndarray, device: str = "dev") -> None:
        self.seq += 1
        inputs = ({"name": "x", **feature_histogram(x, EDGES)}, {"name": "y", **feature_histogram(y, EDGES)})
        tw = TelemetryWindow(fleet="f", device=device, seq=self.seq, window_start=start, window_end=start + 1,
                             models={"m": ModelWindow(version="2", requests=1, errors=0, rows=len(x),
                                                      latency_ms={}, inputs=inputs)})
        self.mon.add_all([(device, tw)])
        with self.db.tx() as conn:
            self.mon.flush(conn, force=True)
        self.mon.after_batch(force=True)


def _uniform(rng: np.random.Generator, n: int = 400) -> np.ndarray:
    return rng.uniform(0, 4, n)


def test_late_windows_merge_into_their_own_time_bucket(db_target: Path | str) -> None:
    w = World(db_target, DriftConfig(window_seconds=10, bucket_seconds=10))
    rng = np.random.default_rng(1)
    w.window(100.0, _uniform(rng), _uniform(rng))
    w.window(125.0, _uniform(rng), _uniform(rng))
    w.window(103.0, _uniform(rng), _uniform(rng))  # arrives late, after an outage
    rows = w.db.query("SELECT bucket, windows, rows FROM telemetry_agg ORDER BY bucket")
    assert [(r["bucket"], r["windows"], r["rows"]) for r in rows] == [(100.0, 2, 800), (120.0, 1, 400)]
    merged = json.loads(w.db.query("SELECT inputs FROM telemetry_agg WHERE bucket=100")[0]["inputs"])
    assert sum(merged["x"]["counts"]) == 800


def test_alarm_publishes_retained_per_model_audits_and_rolls_back_to_predecessor(db_target: Path | str) -> None:
    cfg = DriftConfig.from_dict({"window_seconds": 5, "bucket_seconds": 1, "min_rows": 100,
                                 "models": {"m": {"on_drift": "rollback", "watch_seconds": 60}}})
    w = World(db_target, cfg)
    rng = np.random.default_rng(2)
    for t in range(5):
        w.window(100.0 + t, _uniform(rng), _uniform(rng))
    assert w.published == []
    w.window(106.0, _uniform(rng), _uniform(rng) + 10)  # y out of range entirely
    topics = [(t, r) for t, _, r in w.published]
    assert topics == [("edgefleet/v1/f/hub/alerts", False), ("edgefleet/v1/f/hub/alerts/m", True)]
    alert = w.published[0][1]
    assert alert["state"] == "alarm" and alert["features"] == ["y"]
    assert w.assigned == [("dev", "m", "1", "drift-rollback")]
    assert alert["rollback"]["devices"] == {"dev": "1"}
    actions = [e["action"] for e in w.db.audit_entries()]
    assert actions[-2:] == ["drift_rollback", "drift_alarm"]
    assert w.db.verify_audit() == []
    w.window(107.0, _uniform(rng), _uniform(rng) + 10)
    assert len(w.published) == 2  # still in alarm: nothing new


def test_rollback_outside_the_watch_period_only_alerts(db_target: Path | str) -> None:
    cfg = DriftConfig.from_dict({"window_seconds": 5, "bucket_seconds": 1, "min_rows": 100,
                                 "on_drift": "rollback", "watch_seconds": 5})
    w = World(db_target, cfg)  # deployed at 990, now 1000: 10 s ago
    rng = np.random.default_rng(3)
    w.window(100.0, _uniform(rng), _uniform(rng) + 10)
    assert w.assigned == []
    assert w.published[0][1]["rollback"]["done"] is False
    assert "watch period" in w.published[0][1]["rollback"]["why"]


def test_config_is_checked_and_per_model_values_inherit_the_top_level() -> None:
    cfg = DriftConfig.from_dict({"warn": 0.05, "alarm": 0.5, "models": {"m": {"alarm": 0.3}}})
    assert cfg.policy("m").warn == 0.05 and cfg.policy("m").alarm == 0.3
    assert cfg.policy("other").alarm == 0.5
    with pytest.raises(ConfigError, match="unknown key"):
        DriftConfig.from_dict({"alarms": 1})
    with pytest.raises(ConfigError, match="hook"):
        DriftConfig.from_dict({"models": {"m": {"on_drift": "hook"}}})


def _tw(seq: int, start: float, inputs: tuple[dict[str, Any], ...], classes: dict[str, int]) -> TelemetryWindow:
    return TelemetryWindow(fleet="f", device="dev", seq=seq, window_start=start, window_end=start + 1,
                           models={"m": ModelWindow(version="2", requests=2, errors=1, rows=10,
                                                    latency_ms={"counts": [seq] * 16}, inputs=inputs,
                                                    outputs={"classes": classes})})


def _agg(w: World) -> list[tuple[Any, ...]]:
    return [(r["bucket"], r["windows"], r["requests"], r["errors"], r["rows"], json.loads(r["latency"]),
             json.loads(r["inputs"]), json.loads(r["classes"]), r["last_end"])
            for r in w.db.query("SELECT * FROM telemetry_agg ORDER BY bucket")]


def test_windows_summed_between_flushes_store_what_one_flush_per_window_stores(tmp_path: Path) -> None:
    rng = np.random.default_rng(5)
    wins = [_tw(i + 1, 100.0 + 3 * i, ({"name": "x", **feature_histogram(_uniform(rng), EDGES)},
                                       {"name": "y", **feature_histogram(_uniform(rng) * 1.5, EDGES)}),
                {"0": i, str(i % 3): 2}) for i in range(8)]
    (tmp_path / "one").mkdir()
    (tmp_path / "batched").mkdir()
    one = World(tmp_path / "one" / "hub.db", DriftConfig(bucket_seconds=10))
    for tw in wins:
        one.mon.add_all([("dev", tw)])
        with one.db.tx() as conn:
            one.mon.flush(conn, force=True)
    batched = World(tmp_path / "batched" / "hub.db", DriftConfig(bucket_seconds=10))
    batched.mon.add_all([("dev", tw) for tw in wins[:3]])
    batched.mon.add_all([("dev", tw) for tw in wins[3:6]])
    with batched.db.tx() as conn:
        batched.mon.flush(conn, force=True)
    batched.mon.add_all([("dev", tw) for tw in wins[6:]])
    with batched.db.tx() as conn:
        batched.mon.flush(conn, force=True)
    assert _agg(batched) == _agg(one)
    assert [r[1] for r in _agg(one)] == [4, 3, 1]  # buckets 100, 110, 120 (8 windows 3 s apart)


def test_a_feature_whose_bins_change_between_flushes_keeps_the_newest_bins(db_target: Path | str) -> None:
    w = World(db_target, DriftConfig(bucket_seconds=10))
    old = {"name": "x", "counts": [1, 1, 1, 1], "below": 1, "above": 0, "nan": 0}
    new = {"name": "x", "counts": [2, 2, 2, 2, 2, 2], "below": 0, "above": 3, "nan": 0}
    w.mon.add_all([("dev", _tw(1, 100.0, (old,), {"0": 1})), ("dev", _tw(2, 101.0, (new,), {"0": 1}))])
    w.mon.add_all([("dev", _tw(3, 102.0, (new,), {"1": 1}))])
    with w.db.tx() as conn:
        w.mon.flush(conn, force=True)
    (row,) = _agg(w)
    assert row[6] == {"x": {"counts": [4] * 6, "below": 0, "above": 6, "nan": 0, "name": "x"}}
    assert row[7] == {"0": 2, "1": 1} and row[1] == 3


def test_a_window_with_histogram_counts_that_are_not_numbers_is_refused_alone(db_target: Path | str) -> None:
    """It raises while its batch is taken in (the hub then retries message by message), not at a
    later flush where it would take every other window of the interval with it."""
    w = World(db_target, DriftConfig(bucket_seconds=10))
    good = {"name": "x", "counts": [1, 1, 1, 1], "below": 0, "above": 0, "nan": 0}
    bad = {"name": "x", "counts": [1, "many", 1, 1], "below": 0, "above": 0, "nan": 0}
    w.mon.add_all([("dev", _tw(1, 100.0, (good,), {}))])
    with pytest.raises(ValueError, match="many"):
        w.mon.add_all([("dev", _tw(2, 101.0, (good,), {})), ("dev", _tw(3, 102.0, (bad,), {}))])
    with w.db.tx() as conn:
        w.mon.flush(conn, force=True)
    (row,) = _agg(w)
    assert row[1] == 1 and row[6]["x"]["counts"] == [1, 1, 1, 1]


def test_the_hub_keeps_the_names_devices_send_and_drops_malformed_ones() -> None:
    """The ingest sums (drift_monitor._Acc): a first window's unseen names are kept; names that are
    not what devices send are dropped while the window's counts still count; a feature whose sums
    are negative or huge is left out of its bucket when the sums are written."""
    acc = _Acc()
    acc.add_inputs([{"name": "city", "counts": [3, 1], "above": 2, "nan": 0, "unseen": {"paris": 2}}])
    acc.add_inputs([{"name": "city", "counts": [1, 1], "above": 5, "nan": 0, "unseen": ["paris"]}])
    acc.add_inputs([{"name": "city", "counts": [1, 1], "above": 1, "nan": 0, "unseen": {"x" * 65: 1}}])
    acc.add_inputs([{"name": "city", "counts": [1, 1], "above": 1, "nan": 0, "unseen": {"berlin": 9}}])
    acc.add_inputs([{"name": "city", "counts": [1, 1], "above": 1, "nan": 0, "unseen": {"rome": True}}])
    h = acc.histograms()["city"]
    assert h["counts"] == [7, 5] and h["above"] == 10 and h["unseen"] == {"paris": 2}
    for bad in ({"counts": [-1, 0]}, {"counts": [2**60, 0]}, {"counts": [0, 0], "nan": -3}):
        acc = _Acc()  # one device's bucket: the feature with counts that are no counts is left out
        acc.add_inputs([{"name": "city", "above": 0, **bad}, {"name": "x", "counts": [1, 2]}])
        assert list(acc.histograms()) == ["x"], bad
