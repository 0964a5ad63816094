"""The hub's telemetry aggregation and drift adapter: feeds :mod:`hub.core.drift` and acts on it.

Aggregation: every *new* telemetry window (duplicates were already dropped by ingest) is added to
``telemetry_agg``, one row per (model, version, device, time bucket); the bucket is the one the
window's own ``window_start`` falls in, so windows that arrive late after an outage merge into
their own bucket, not into the bucket of their arrival. Rows hold mergeable sums (counts,
latency bucket counts, per-feature histograms, output class counts). The ingest thread calls
:meth:`DriftMonitor.add` per window and :meth:`DriftMonitor.flush` once per batch inside the
batch's transaction, so a batch costs one read-modify-write per touched row.

Drift: after each batch, every touched model version is scored over the newest
``window_seconds`` of *data* time (buckets newer than the newest bucket minus the window), for the
fleet and per device. When the fleet state of a version changes (ok / warn / alarm), the monitor

- publishes an ``edgefleet.alert/v1`` message on ``{root}hub/alerts`` (QoS 1, the stream) and,
  retained, on ``{root}hub/alerts/{model}`` (the latest alert per model: a retained message is per
  topic, so "retained latest per model" needs a topic per model);
- appends it to the audit log (``drift_alarm`` / ``drift_warn`` / ``drift_ok``);
- on entering alarm, by the model's policy: ``hook`` runs the hook command with the evidence in its
  environment, ``rollback`` rolls the version back to its predecessor on every device that runs it
  (new desired states with higher seqs through the hub's normal assignment path) if it was deployed
  within ``watch_seconds``, and runs the hook too when one is set.

Configuration: ``DIR/drift.toml`` (optional; defaults apply without it)::

    window_seconds = 300      # data time merged into one score
    bucket_seconds = 60       # aggregation bucket
    warn = 0.1                # PSI thresholds
    alarm = 0.25
    min_rows = 200            # fewer rows observed: state "insufficient", never alarms
    on_drift = "alert"        # alert | hook | rollback
    hook = "/usr/local/bin/retrain"   # command; gets EDGEFLEET_* variables (docs/telemetry.md)
    watch_seconds = 86400     # rollback only versions deployed this recently

    [models.clf]              # per model, any of warn, alarm, min_rows, on_drift, hook, watch_seconds
    alarm = 0.2
    on_drift = "rollback"

Alarm state lives in memory: after a hub restart the first evaluation of a drifting version raises
its alarm again (once).
"""

from __future__ import annotations

import json
import logging
import math
import operator
import os
import shlex
import subprocess
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import orjson

from edgefleet.agent.contract.errors import ConfigError
from edgefleet.agent.contract.histograms import UNSEEN_CHARS, UNSEEN_NAMES
from edgefleet.agent.contract.wire import (
    Reference,
    TelemetryWindow,
    Topics,
    canonical_json,
    check_name,
    format_time,
)
from edgefleet.agent.core.telemetry import LATENCY_BUCKETS_MS
from edgefleet.hub.adapters.home import read_optional_toml
from edgefleet.hub.core.drift import (
    AlarmTracker,
    DriftReport,
    Policy,
    merge_classes,
    merge_feature_lists,
    merge_unseen,
    score_report,
)
from edgefleet.hub.db import Database
from edgefleet.hub.errors import NotFound

__all__ = ["ALERT_KIND", "DriftConfig", "DriftMonitor", "Staged", "load_drift_config"]

log = logging.getLogger("edgefleet.hub.core.drift")
ALERT_KIND = "edgefleet.alert/v1"
HOOK_TIMEOUT = 600.0
_POLICY_KEYS = {f.name for f in fields(Policy)}


@dataclass(frozen=True)
class DriftConfig:
    window_seconds: float = 300.0
    bucket_seconds: float = 60.0
    # Scoring re-reads and merges the window's buckets (fleet and per device): under load it is
    # done at most this often, not after every ingest batch (3x the ingest cost when it was).
    evaluate_seconds: float = 1.0
    default: Policy = field(default_factory=Policy)
    models: Mapping[str, Policy] = field(default_factory=dict)

    def policy(self, model: str) -> Policy:
        return self.models.get(model, self.default)

    @classmethod
    def from_dict(cls, doc: Mapping[str, Any], where: str = "drift.toml") -> DriftConfig:
        allowed = {"window_seconds", "bucket_seconds", "evaluate_seconds", "models"} | _POLICY_KEYS
        unknown = sorted(set(doc) - allowed)
        if unknown:
            raise ConfigError(f"{where}: unknown key {unknown[0]!r}; allowed: {sorted(allowed)}")
        try:
            base = {k: doc[k] for k in _POLICY_KEYS if k in doc}
            default = Policy(**base)
            models: dict[str, Policy] = {}
            for name, table in (doc.get("models") or {}).items():
                check_name(name, "model name")
                if not isinstance(table, dict) or set(table) - _POLICY_KEYS:
                    raise ConfigError(f"{where}: [models.{name}] may set only {sorted(_POLICY_KEYS)}")
                models[name] = Policy(**{**base, **table})
            cfg = cls(window_seconds=float(doc.get("window_seconds", 300.0)),
                      bucket_seconds=float(doc.get("bucket_seconds", 60.0)),
                      evaluate_seconds=float(doc.get("evaluate_seconds", 1.0)), default=default, models=models)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"{where}: {exc}") from exc
        if cfg.window_seconds <= 0 or cfg.bucket_seconds <= 0:
            raise ConfigError(f"{where}: window_seconds and bucket_seconds must be positive")
        if cfg.evaluate_seconds < 0:
            raise ConfigError(f"{where}: evaluate_seconds must be 0 (after every batch) or more, "
                              f"got {cfg.evaluate_seconds}")
        return cfg


def load_drift_config(path: Path) -> DriftConfig:
    """Read ``drift.toml``; a missing file means the defaults."""
    doc = read_optional_toml(path)
    return DriftConfig() if doc is None else DriftConfig.from_dict(doc, str(path))


_Hist = tuple[tuple[int, ...], int, int, int]  # counts, below, above, nan


@dataclass(slots=True)
class _Acc:
    """Running sums of one (model, version, device, bucket) until the next flush.

    Histograms are added up as windows arrive, so a parsed window is garbage once stored, and a
    histogram that is not numbers fails its own ingest batch (retried per message) instead of
    the flush of every window of the interval. The sums are tuples of ints: CPython stops
    tracking those in the cyclic GC, which otherwise walked every pending window's lists and
    dicts in full collections (most of the ingest thread's time at 10k windows/s)."""

    windows: int = 0
    requests: int = 0
    errors: int = 0
    rows: int = 0
    latency: tuple[int, ...] = (0,) * (len(LATENCY_BUCKETS_MS) + 1)
    inputs: dict[str, _Hist] = field(default_factory=dict)
    classes: dict[str, int] = field(default_factory=dict)
    last_end: float = 0.0
    unseen: dict[str, dict[str, int]] = field(default_factory=dict)  # category features' unseen names

    def add_inputs(self, hists: Iterable[Mapping[str, Any]]) -> None:
        """Add feature histograms by name; a feature whose bin count changed (a new reference
        under the same version) restarts from the newest histogram, as the flush does.

        On the ingest thread for every feature of every window: ``map`` over C functions, not
        comprehensions (with :meth:`DriftMonitor.stage`'s, 17.4 -> 12.5 µs per window of 6
        features; ``bench.hub_ingest``)."""
        inputs = self.inputs
        for h in hists:
            get = h.get
            name = str(get("name"))
            counts = tuple(map(int, get("counts", ())))
            below, above, nan = int(get("below", 0)), int(get("above", 0)), int(get("nan", 0))
            cur = inputs.get(name)
            if cur is not None and cur[0] and len(cur[0]) != len(counts):
                log.warning("feature %s: %d bins after %d; keeping the newest only", name, len(counts), len(cur[0]))
                cur = None
                self.unseen.pop(name, None)  # new bins (a new reference): the names restart with them
            named = get("unseen")
            if named and _unseen_ok(named, above):  # category features only: unseen categories by name
                self.unseen[name] = merge_unseen([self.unseen.get(name, {}), named])
            if cur is None:
                inputs[name] = (counts, below, above, nan)
            else:  # same length (checked above), so map stops at neither's end early
                summed = tuple(map(operator.add, cur[0], counts)) if cur[0] else counts
                inputs[name] = (summed, cur[1] + below, cur[2] + above, cur[3] + nan)

    def add_classes(self, outputs: Mapping[str, Any] | None) -> None:
        for k, v in ((outputs or {}).get("classes") or {}).items():
            self.classes[str(k)] = self.classes.get(str(k), 0) + int(v)

    def merge(self, other: _Acc) -> None:
        self.windows += other.windows
        self.requests += other.requests
        self.errors += other.errors
        self.rows += other.rows
        self.latency = tuple([a + b for a, b in zip(self.latency, other.latency, strict=True)])
        self.add_inputs({"name": n, "counts": c, "below": b, "above": a, "nan": x,
                         "unseen": other.unseen.get(n)} for n, (c, b, a, x) in other.inputs.items())
        self.add_classes({"classes": other.classes})
        self.last_end = max(self.last_end, other.last_end)

    def histograms(self) -> dict[str, dict[str, Any]]:
        """The input sums in :func:`hub.core.drift.merge_feature_lists`' shape."""
        out: dict[str, dict[str, Any]] = {n: {"counts": list(c), "below": b, "above": a, "nan": x, "name": n}
                                          for n, (c, b, a, x) in self.inputs.items() if _counts_ok(n, c, b, a, x)}
        for n, named in self.unseen.items():
            if n in out:
                out[n]["unseen"] = named
        return out


MAX_COUNT = 2**53  # a histogram count above this is no window's (and would overflow the scores' floats)


def _counts_ok(name: str, counts: tuple[int, ...], below: int, above: int, nan: int) -> bool:
    """Whether one feature's sums are counts (0..MAX_COUNT): a device that sent negative or absurd
    ones loses that feature's sums of its own bucket, nothing else. Checked once per flush of a
    (model, version, device, bucket), not per window: the ingest thread adds up every window."""
    if min(below, above, nan, *counts) < 0 or max(below, above, nan, *counts) > MAX_COUNT:
        log.warning("feature %s: counts outside 0..%d from one device; its sums of this bucket are dropped",
                    name, MAX_COUNT)
        return False
    return True


def _unseen_ok(named: object, above: int) -> bool:
    """Whether a device's ``unseen`` names are what devices send (:func:`agent.contract.histograms.
    category_histogram`): at most UNSEEN_NAMES texts of at most UNSEEN_CHARS characters, counts
    that are non-negative integers adding up to at most ``above``. Anything else is dropped (the
    window's counts still count; only the names are informational)."""
    if not isinstance(named, dict) or len(named) > UNSEEN_NAMES:
        return False
    total = 0
    for k, v in named.items():
        if not isinstance(k, str) or len(k) > UNSEEN_CHARS or type(v) is not int or v < 0:
            return False
        total += v
    return total <= above


Staged = dict[tuple[str, str, str, float], _Acc]  # (model, version, device, bucket) -> sums


class DriftMonitor:
    def __init__(
        self, *, db: Database, config: DriftConfig, topics: Topics, clock: Callable[[], float],
        publish: Callable[[str, bytes, bool], None],
        assign: Callable[..., Any] | None = None,
        leading: Callable[[], bool] = lambda: True,
        fence: Callable[[Any], None] = lambda conn: None,
    ) -> None:
        """Its ports are these arguments: the database, the clock, ``publish(topic, payload,
        retain)`` (QoS 1 on the hub's broker link), ``assign(device, model, version, actor,
        fenced=True)``, the hub's assignment path that a ``rollback`` policy rolls devices back
        through (None: no rollbacks), ``leading()``, whether this replica is the elected controller
        (only it scores, alerts and rolls back; every replica merges the sums of what it ingests),
        and ``fence(conn)``, which raises inside a write transaction once it no longer leads. The
        hub daemon builds it with :func:`load_drift_config` of ``DIR/drift.toml``."""
        self.db = db
        self.config = config
        self.topics = topics
        self.clock = clock
        self._publish = publish
        self._assign = assign
        self.tracker = AlarmTracker()
        self._last: dict[tuple[str, str], list[DriftReport]] = {}  # the newest reports per version
        self.hooks_started = 0
        self._pending: dict[tuple[str, str, str, float], _Acc] = {}
        self._touched: set[tuple[str, str]] = set()
        self._next_evaluation = 0.0  # time.monotonic() of the next due scoring
        self._next_flush = 0.0  # ... and of the next write of pending sums to telemetry_agg
        self._refs: dict[tuple[str, str], Reference | None] = {}
        self._lock = threading.Lock()
        self._leading = leading
        self._fence = fence
        self._scored_at: float | None = None  # hub clock of the last scoring (versions merged since are due)

    def take_over(self) -> None:
        """This replica became the controller: take the alarm state its predecessor stored, and
        score every version merged since a little before the predecessor's last scoring could be."""
        self.tracker.load(self.db.drift_alarms())
        self._scored_at = self.clock() - 2 * self.config.evaluate_seconds - self.config.window_seconds
        self._next_evaluation = 0.0

    # -- aggregation (ingest thread) -------------------------------------------------------------

    def add_all(self, windows: list[tuple[str, TelemetryWindow]]) -> None:
        """Take in the windows of one ingest batch, all or none: a window whose numbers do not
        add up raises before anything is counted (the hub then retries the batch per message)."""
        staged: Staged = {}
        for device, tw in windows:
            self.stage(staged, device, tw)
        self.take(staged)

    def take(self, staged: Staged) -> None:
        """Add a batch's sums (built by :meth:`stage`) to the pending ones; cannot fail."""
        for key, acc in staged.items():
            into = self._pending.get(key)
            if into is None:
                self._pending[key] = acc
            else:
                into.merge(acc)

    def stage(self, staged: Staged, device: str, tw: TelemetryWindow) -> None:
        """Add one window to a batch's sums; raises (ValueError, TypeError) if its numbers do
        not add up, leaving the pending sums untouched. The ingest thread stages each window as
        it is stored, so the window is garbage at once instead of living to the batch's end."""
        size = self.config.bucket_seconds
        bucket = math.floor(tw.window_start / size) * size
        for name, w in tw.models.items():
            key = (name, w.version, device, bucket)
            acc = staged.get(key)
            if acc is None:  # not setdefault: that would build an _Acc for every window
                acc = staged[key] = _Acc()
            acc.windows += 1
            acc.requests += w.requests
            acc.errors += w.errors
            acc.rows += w.rows
            counts = w.latency_ms.get("counts") or []
            if len(counts) == len(acc.latency):
                acc.latency = tuple(map(operator.add, acc.latency, map(int, counts)))  # lengths equal
            acc.add_inputs(w.inputs)
            acc.add_classes(w.outputs)
            acc.last_end = max(acc.last_end, tw.window_end)

    def has_pending(self) -> bool:
        return bool(self._pending)

    def flush_due(self) -> bool:
        """Whether :meth:`flush` (without ``force``) would write now."""
        return bool(self._pending) and time.monotonic() >= self._next_flush

    def flush(self, conn: Any, force: bool = False) -> None:
        """Merge the pending windows into ``telemetry_agg`` inside the caller's transaction.

        Under load this runs at most every ``evaluate_seconds`` (or when ``force``): pending sums
        merge in memory, so each (model, version, device, bucket) row is read and rewritten once
        per interval instead of once per ingest batch. Windows are stored in ``telemetry`` as they
        arrive either way; what a hub crash can lose is at most one interval of these sums.
        """
        if not self._pending:
            return
        mono = time.monotonic()
        if not force and mono < self._next_flush:
            return
        self._next_flush = mono + self.config.evaluate_seconds
        pending, self._pending = self._pending, {}
        stored = self.db.telemetry_agg_rows(conn, sorted(pending))  # one order: see Database.tx
        out = []
        for key in sorted(pending):
            model, version, device, bucket = key
            acc, row = pending[key], stored.get(key)
            windows, requests, errors, rows, last_end = acc.windows, acc.requests, acc.errors, acc.rows, acc.last_end
            merged_inputs, merged_classes, latency = acc.histograms(), acc.classes, list(acc.latency)
            if row is not None:
                latency = [a + b for a, b in zip(orjson.loads(row["latency"]), latency, strict=True)]
                merged_classes = merge_classes([{"classes": orjson.loads(row["classes"])}, {"classes": acc.classes}])
                windows += row["windows"]
                requests += row["requests"]
                errors += row["errors"]
                rows += row["rows"]
                last_end = max(last_end, row["last_end"])
                try:
                    merged_inputs = merge_feature_lists([list(orjson.loads(row["inputs"]).values()),
                                                         list(merged_inputs.values())])
                except ValueError as exc:  # bins changed under the same version: keep the newest only
                    log.warning("%s %s from %s: %s", model, version, device, exc)
            out.append({"model": model, "version": version, "device": device, "bucket": bucket, "windows": windows,
                        "requests": requests, "errors": errors, "rows": rows, "latency": latency,
                        "inputs": merged_inputs, "classes": merged_classes, "last_end": last_end})
            self._touched.add((model, version))
        self.db.put_telemetry_aggs(conn, out, self.clock())

    def after_batch(self, force: bool = False) -> None:
        """Score the model versions that got data, if ``evaluate_seconds`` passed since the last
        scoring (or ``force``). The ingest thread also calls this when it is idle, so data that
        arrived just after a scoring is scored within ``evaluate_seconds``."""
        if not self._leading():
            self._touched.clear()  # the controller finds them through telemetry_agg.updated_at
            return
        mono = time.monotonic()
        if not force and mono < self._next_evaluation:
            return
        if not self._touched and self._scored_at is None:
            return
        self._next_evaluation = mono + self.config.evaluate_seconds
        touched, self._touched = self._touched, set()
        if self._scored_at is not None:  # the controller: and what any replica merged since its last scoring
            now = self.clock()
            touched |= set(self.db.telemetry_agg_updated(self._scored_at - self.config.evaluate_seconds))
            self._scored_at = now
        for model, version in sorted(touched):
            try:
                self.evaluate(model, version)
            except Exception:
                log.exception("drift evaluation of %s %s failed", model, version)

    # -- scoring ---------------------------------------------------------------------------------

    def _reference(self, model: str, version: str) -> Reference | None:
        key = (model, version)
        if key not in self._refs:
            m = self.db.get_model(model, version)
            self._refs[key] = Reference.from_dict(m["reference"]) if m and m.get("reference") else None
        return self._refs[key]

    def reports(self, model: str, version: str) -> list[DriftReport]:
        """Fleet report first, then one per device, over the newest ``window_seconds`` of data."""
        rows = self.db.telemetry_agg_window(model, version, self.config.window_seconds)
        if not rows:
            return []
        policy = self.config.policy(model)
        ref = self._reference(model, version)
        groups: dict[str, list[dict[str, Any]]] = {"fleet": rows}
        for r in rows:
            groups.setdefault(f"device:{r['device']}", []).append(r)
        out = []
        for scope, rs in groups.items():
            out.append(score_report(
                model=model, version=version, scope=scope, reference=ref,
                inputs=merge_feature_lists(list(json.loads(r["inputs"]).values()) for r in rs),
                classes=merge_classes({"classes": json.loads(r["classes"])} for r in rs),
                policy=policy, window_start=min(r["bucket"] for r in rs),
                window_end=max(r["last_end"] for r in rs), windows=sum(r["windows"] for r in rs)))
        return out

    def evaluate(self, model: str, version: str) -> DriftReport | None:
        reports = self.reports(model, version)
        if not reports:
            return None
        with self._lock:
            self._last[(model, version)] = reports
        fleet = reports[0]
        previous = self.tracker.update(fleet)
        if previous is not None:
            self._changed(fleet, previous)
        return fleet

    def last_reports(self) -> list[DriftReport]:
        """The reports of the latest scoring of every model version scored since the hub started
        (fleet first, then per device, for each version), as ``GET /metrics`` shows them. Taken
        under the lock the ingest thread stores them under, so an HTTP thread may call it."""
        with self._lock:
            return [rep for reps in self._last.values() for rep in reps]

    def snapshot(self, model: str | None = None) -> dict[str, Any]:
        """Fresh reports of every model version with telemetry (optionally one model's)."""
        out = []
        for name, version in self.db.telemetry_agg_versions():
            if model and name != model:
                continue
            for rep in self.reports(name, version):
                d = rep.to_dict()
                d["window_start"], d["window_end"] = format_time(rep.window_start), format_time(rep.window_end)
                d["alarm_state"] = self.tracker.state(rep.model, rep.version) if rep.scope == "fleet" else None
                out.append(d)
        return {"reports": out, "config": {"window_seconds": self.config.window_seconds,
                                           "bucket_seconds": self.config.bucket_seconds}}

    def view(self, model: str, version: str | None = None, *, history_buckets: int = 60) -> dict[str, Any]:
        """What the fleet page's drift view draws for one model version (the newest with telemetry
        unless ``version``): per reference feature the live histogram (the fleet's newest
        ``window_seconds``) beside the reference, its scores, their history per bucket (each
        bucket scored on its own, newest ``history_buckets``), and the devices that drift most."""
        versions = [v for n, v in self.db.telemetry_agg_versions() if n == model]
        if not versions:
            raise NotFound(f"no telemetry for model {model!r} yet; `edgefleet-hub status` shows what devices run")
        if version is None:
            version = max(versions, key=lambda v: max(
                (r["last_end"] for r in self.db.telemetry_agg_window(model, v, self.config.bucket_seconds)), default=0.0))
        elif version not in versions:
            raise NotFound(f"no telemetry for {model} {version}; versions with telemetry: {', '.join(versions)}")
        ref = self._reference(model, version)
        policy = self.config.policy(model)
        reports = self.reports(model, version)
        rows = self.db.telemetry_agg_window(model, version, self.config.window_seconds)
        live = merge_feature_lists(list(json.loads(r["inputs"]).values()) for r in rows)
        history_rows = self.db.telemetry_agg_window(model, version, self.config.bucket_seconds * history_buckets)
        buckets: dict[float, list[dict[str, Any]]] = {}
        for r in history_rows:
            buckets.setdefault(r["bucket"], []).append(r)
        history = []
        for bucket in sorted(buckets)[-history_buckets:]:
            rs = buckets[bucket]
            rep = score_report(model=model, version=version, scope="fleet", reference=ref,
                               inputs=merge_feature_lists(list(json.loads(r["inputs"]).values()) for r in rs),
                               classes={}, policy=policy, window_start=bucket,
                               window_end=max(r["last_end"] for r in rs), windows=sum(r["windows"] for r in rs))
            history.append({"time": format_time(bucket), "features": {f.feature: {"psi": f.psi, "js": f.js, "ks": f.ks}
                                                                     for f in rep.features}})
        fleet = reports[0] if reports else None
        scores = {f.feature: f.to_dict() for f in fleet.features} if fleet else {}
        worst = sorted(((max(rep.features, key=lambda f: f.psi), rep) for rep in reports[1:] if rep.features),
                       key=lambda fr: -fr[0].psi)[:10]
        devices = [{"device": rep.scope.split(":", 1)[1], "psi": f.psi, "feature": f.feature, "state": rep.state}
                   for f, rep in worst]
        features = []
        for feat in ref.all_features if ref is not None else ():
            h = live.get(feat.name, {})
            features.append({"name": feat.name, "edges": list(feat.edges), "reference": list(feat.freqs),
                             "live": h.get("counts", []), "below": h.get("below", 0), "above": h.get("above", 0),
                             "nan": h.get("nan", 0), "score": scores.get(feat.name),
                             **({"labels": [*feat.extra["categories"], "other"], "unseen": h.get("unseen") or {},
                                 "missing": feat.extra.get("missing", 0.0)} if "categories" in feat.extra else {})})
        return {"model": model, "version": version, "versions": versions,
                "state": self.tracker.state(model, version), "thresholds": {"warn": policy.warn, "alarm": policy.alarm},
                "window_seconds": self.config.window_seconds, "features": features, "history": history,
                "devices": devices}

    # -- acting ----------------------------------------------------------------------------------

    def _changed(self, report: DriftReport, previous: str) -> None:
        now = self.clock()
        policy = self.config.policy(report.model)
        state = report.state
        alert: dict[str, Any] = {
            "kind": ALERT_KIND, "fleet": self.topics.fleet, "time": format_time(now), "type": "drift",
            "state": state, "previous_state": previous, "model": report.model, "version": report.version,
            "scope": report.scope, "features": report.named("alarm") if state == "alarm" else report.named(state),
            "scores": {f.feature: f.to_dict() for f in report.features},
            "window_start": format_time(report.window_start), "window_end": format_time(report.window_end),
            "windows": report.windows, "policy": policy.on_drift,
            "thresholds": {"warn": policy.warn, "alarm": policy.alarm},
        }
        log.warning("drift %s -> %s for %s %s: %s", previous, state, report.model, report.version,
                    ", ".join(f"{f.feature} psi={f.psi:.3f}" for f in report.features if f.state in ("warn", "alarm")))
        if state == "alarm" and policy.on_drift == "rollback":
            alert["rollback"] = self._rollback(report, now, policy)
        with self.db.tx() as conn:
            self._fence(conn)
            self.db.set_drift_alarm(conn, report.model, report.version, report.scope, state)
            self.db.audit(conn, now, "drift", f"drift_{state}", alert)
        payload = canonical_json(alert)
        self._publish(self.topics.alerts, payload, False)
        self._publish(f"{self.topics.alerts}/{report.model}", payload, True)
        if state == "alarm" and policy.hook and policy.on_drift in ("hook", "rollback"):
            self._run_hook(policy.hook, alert)

    def _run_hook(self, command: str, alert: Mapping[str, Any]) -> None:
        env = {
            **os.environ,
            "EDGEFLEET_FLEET": str(alert["fleet"]),
            "EDGEFLEET_MODEL": str(alert["model"]),
            "EDGEFLEET_VERSION": str(alert["version"]),
            "EDGEFLEET_STATE": str(alert["state"]),
            "EDGEFLEET_FEATURES": ",".join(alert["features"]),
            "EDGEFLEET_SCORES": json.dumps({k: v["psi"] for k, v in alert["scores"].items()}, sort_keys=True),
            "EDGEFLEET_ALERT": json.dumps(alert, sort_keys=True),
        }
        self.hooks_started += 1

        def run() -> None:
            try:
                res = subprocess.run(shlex.split(command), env=env, timeout=HOOK_TIMEOUT,
                                     capture_output=True, text=True, check=False)
            except (OSError, subprocess.TimeoutExpired) as exc:
                log.error("on_drift hook %r failed to run: %s", command, exc)
                return
            (log.info if res.returncode == 0 else log.error)(
                "on_drift hook %r exited %d: %s", command, res.returncode, (res.stderr or res.stdout)[-500:])

        threading.Thread(target=run, name="hub-drift-hook", daemon=True).start()

    def _rollback(self, report: DriftReport, now: float, policy: Policy) -> dict[str, Any]:
        """Roll ``report.version`` back to its predecessor on every device assigned it."""
        if self._assign is None:
            return {"done": False, "why": "no assignment path"}
        deployed = [e["time"] for e in self.db.audit_entries() if e["action"] == "deploy"
                    and e["details"].get("model") == report.model and e["details"].get("version") == report.version]
        if not deployed:
            return {"done": False, "why": f"no deploy of {report.model} {report.version} in the audit log"}
        age = now - max(deployed)
        if age > policy.watch_seconds:
            return {"done": False, "why": f"deployed {age:.0f}s ago, outside the {policy.watch_seconds:.0f}s watch period"}
        rows = self.db.version_assignments(report.model, report.version)
        devices: dict[str, Any] = {}
        for r in rows:
            if r["previous"] and r["previous"] != report.version:
                self._assign(r["device"], report.model, r["previous"], "drift-rollback", fenced=True)
                devices[r["device"]] = r["previous"]
        with self.db.tx() as conn:
            self._fence(conn)
            self.db.audit(conn, now, "drift-rollback", "drift_rollback", {
                "model": report.model, "version": report.version, "devices": devices,
                "evidence": report.to_dict()})
        return {"done": bool(devices), "devices": devices,
                **({} if devices else {"why": "no device has a predecessor version to return to"})}
