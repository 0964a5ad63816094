"""The hub's rollout adapter: stores rollouts, gathers their evidence, acts on gate decisions.

Decisions are made by the pure core :mod:`hub.core.rollout`; this module does the I/O around it:

* **Storage**: table ``rollouts`` (the rollout as JSON in ``spec``), ``rollout_windows`` (every
  canary dict a cohort device reported for the rollout, tagged with the step it arrived in) and
  ``rollout_events`` (``canary_started`` / ``canary_dropped`` / ``preflight_failed``).
* **Desired states**: :meth:`RolloutManager.adjust` is called by the hub whenever it signs a
  device's desired state. For a model under an active rollout (running or paused), a cohort device
  gets the candidate entry with ``canary`` (rollout id, mode, fraction, the full stable entry,
  local limits) and ``preflight``; everyone else keeps its ordinary (stable) entry. A device that
  gets the from-version assigned during a rollout joins its targets (and, by its hash rank, maybe
  the cohort). Promotion at the end writes the to-version into ``assignments`` (previous =
  from-version) for every target; rollback and abort write the from-version; in both cases every
  target device is re-signed with a higher ``seq`` — offline devices get the retained state on
  reconnect.
* **Evaluation**: thread ``hub-rollouts`` judges every running rollout each ``evaluate_seconds``
  (``DIR/rollout.toml``) on the evidence of its current step. Every decision that changes
  something, by a gate or a human, and every first dry-run "would roll back" of a step, is
  appended to the hash-chained audit log with its gates (value, threshold, passed, dry-run) and
  evidence; and published as an ``edgefleet.alert/v1`` of ``type: "rollout"`` on
  ``{root}hub/alerts``.

``DIR/rollout.toml`` (optional)::

    evaluate_seconds = 5.0
    [policy]                 # the fleet's default gate policy (docs/rollouts.md)
    min_inferences = 200
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from edgefleet.agent.contract.errors import ConfigError
from edgefleet.agent.contract.wire import Event, ModelEntry, Reference, TelemetryWindow, format_time
from edgefleet.hub.adapters.home import read_optional_toml
from edgefleet.hub.core.desired import model_entry
from edgefleet.hub.core.drift import Policy as DriftPolicy
from edgefleet.hub.core.drift import merge_feature_lists, score_report
from edgefleet.hub.core.rollout import (
    FAILURE_EVENTS,
    MODES,
    Decision,
    Evidence,
    Policy,
    Rollout,
    RolloutError,
    abort,
    apply,
    evaluate,
    parse_steps,
    pause,
    promote_now,
    resume,
    rollback,
)
from edgefleet.hub.errors import BadRequest, Conflict, NotFound
from edgefleet.hub.services.drift_monitor import ALERT_KIND

if TYPE_CHECKING:
    from edgefleet.hub.db import Conn, Database

__all__ = ["RolloutConfig", "RolloutManager", "load_rollout_config"]

log = logging.getLogger("edgefleet.hub.services.rollout_manager")
CANARY_EVENTS = ("canary_started", *FAILURE_EVENTS)


@dataclass(frozen=True)
class RolloutConfig:
    evaluate_seconds: float = 5.0
    policy: Policy = field(default_factory=Policy)


def load_rollout_config(path: Path) -> RolloutConfig:
    doc = read_optional_toml(path)
    if doc is None:
        return RolloutConfig()
    unknown = sorted(set(doc) - {"evaluate_seconds", "policy"})
    if unknown:
        raise ConfigError(f"{path}: unknown key {unknown[0]!r}; allowed: evaluate_seconds, [policy]")
    every = doc.get("evaluate_seconds", 5.0)
    if not isinstance(every, int | float) or every <= 0:
        raise ConfigError(f"{path}: evaluate_seconds must be a positive number, got {every!r}")
    try:
        policy = Policy.from_dict(doc.get("policy") or {}, f"{path} [policy]")
    except RolloutError as exc:
        raise ConfigError(str(exc)) from exc
    return RolloutConfig(evaluate_seconds=float(every), policy=policy)


class DesiredStates(Protocol):
    """The rollout service's port onto the rest of the hub: the database, the signer of desired
    states, the publisher and the clock. :class:`edgefleet.hub.daemon.Hub` provides it; the service
    never reaches past it."""

    db: Database
    public_url: str

    @property
    def fleet(self) -> str: ...

    def clock(self) -> float: ...

    def sign_and_store(self, conn: Conn, device: str, now: float) -> int: ...

    def publish_desired(self, device: str) -> None: ...

    def publish_alert(self, alert: dict[str, Any]) -> None: ...

    @property
    def leading(self) -> bool:
        """Whether this replica is the elected controller (judges rollouts)."""

    def fence(self, conn: Conn) -> None:
        """Raise unless this replica still leads, inside the open write transaction."""

    def drift_policy(self, model: str) -> DriftPolicy: ...


class RolloutManager:
    def __init__(self, hub: DesiredStates, config: RolloutConfig) -> None:
        self.hub = hub
        self.db = hub.db
        self.config = config
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.RLock()  # one decision at a time (evaluator thread vs admin API)
        self._dry_noted: set[tuple[str, int]] = set()
        self._active: dict[str, Rollout] = {}  # model -> active rollout (cache for ingest)
        self._revs: dict[str, int] = {}  # rollout id -> the rev its cached copy was read at
        self._synced_tx = -1  # the database's tx_serial at the last sync inside a transaction
        self._reload_active()

    @classmethod
    def attach(cls, hub: DesiredStates, config_path: Path) -> RolloutManager:
        return cls(hub, load_rollout_config(config_path))

    # -- lifecycle -------------------------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="hub-rollouts", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)

    def _loop(self) -> None:
        while not self._stop.wait(self.config.evaluate_seconds):
            if not self.hub.leading:  # another replica judges the rollouts
                continue
            try:
                self.evaluate_all()
            except Exception:
                log.exception("rollout evaluation failed")

    # -- storage ---------------------------------------------------------------------------------
    # Hub replicas share the rollouts table; each keeps the active ones in memory (ingest looks
    # every window up in it). sync() compares the cached revisions with the stored ones (one
    # small query) and re-reads the rollouts when another replica changed one; every path that
    # reads the cache syncs first, inside its write transaction when it has one. An exclusive
    # transaction (signing, transitions) sees an exact cache until it commits; ingest's is not
    # exclusive, so a window arriving as the controller moves a step may be tagged with the old one.

    def _reload_active(self, conn: Conn | None = None) -> None:
        active = [(rev, Rollout.from_dict(x)) for rev, x in self.db.active_rollouts(conn)]
        self._active = {r.model: r for _, r in active}
        self._revs = {r.id: rev for rev, r in active}

    def sync(self, conn: Conn | None = None) -> None:
        """Re-read the active rollouts if another replica changed them (in *conn*'s
        transaction: once per transaction).

        Inside a transaction it takes no lock of its own: the caller holds the database's, and
        taking this manager's after it would invert the order the evaluator and the admin API
        take them in (this lock, then the database's). The cache is swapped whole, never
        mutated in place, so a reader sees the old or the new one."""
        if conn is not None:
            if self._synced_tx == self.db.tx_serial:
                return
            self._synced_tx = self.db.tx_serial
            if self.db.active_rollout_revs(conn) != self._revs:
                self._reload_active(conn)
            return
        with self._lock:
            if self.db.active_rollout_revs() != self._revs:
                self._reload_active()

    def _save(self, conn: Conn, r: Rollout, now: float) -> None:
        rev = self.db.save_rollout(conn, r.id, r.model, r.state, r.to_dict(), r.created_at, now)
        active, revs = dict(self._active), dict(self._revs)  # copied, then swapped: see sync()
        if r.active:
            active[r.model] = r
            revs[r.id] = rev
        else:
            if active.get(r.model, r).id == r.id:
                active.pop(r.model, None)
            revs.pop(r.id, None)
        self._active, self._revs = active, revs

    def get(self, key: str) -> Rollout:
        """A rollout by id, or the newest rollout of a model name."""
        spec = self.db.rollout_spec(key) or next(iter(self.db.model_rollout_specs(key, limit=1)), None)
        if spec is None:
            raise NotFound(f"no rollout with id or model name {key!r}; see `edgefleet-hub rollout status`")
        return Rollout.from_dict(spec)

    def _find(self, key: str | None) -> Rollout:
        if key:
            return self.get(key)
        active = list(self._active.values())
        if len(active) != 1:
            raise BadRequest(f"{len(active)} rollouts are active ({', '.join(r.id for r in active) or 'none'}); "
                             "name the rollout id or model")
        return active[0]

    # -- desired states (called inside the hub's signing transaction) ----------------------------

    def adjust(self, conn: Conn, device: str, entries: Mapping[str, ModelEntry], now: float) -> dict[str, ModelEntry]:
        self.sync(conn)
        out = dict(entries)
        for name, entry in entries.items():
            r = self._active.get(name)
            if r is None or entry.version != r.from_version:
                continue
            if device not in r.targets:
                r = r.add_target(device, self.db.device_profile(conn, device) or "")
                self._save(conn, r, now)
                runs = r.runs(device)
                self.db.audit(conn, now, "rollout", "rollout_join", {
                    "rollout": r.id, "model": r.model, "device": device, "runs": runs,
                    "version": r.to_version if runs == "candidate" else r.from_version})
            if r.runs(device) == "candidate":
                out[name] = self._candidate_entry(r, entry)
        return out

    def _candidate_entry(self, r: Rollout, stable: ModelEntry) -> ModelEntry:
        m = self.db.get_model(r.model, r.to_version)
        if m is None:  # the registry is immutable; a vanished version is a broken database
            raise NotFound(f"rollout {r.id}: {r.model} {r.to_version} is not in the registry")
        cand = model_entry(m, self.hub.public_url, r.from_version)
        canary = {"rollout": r.id, "mode": r.mode, "fraction": r.fraction, "stable": stable.to_dict(),
                  "limits": dict(r.policy.limits)}
        return replace(cand, canary=canary, preflight=self.preflight_entry(r.model, r.to_version))

    def preflight_entry(self, name: str, version: str) -> dict[str, Any] | None:
        pf = self.db.get_preflight(name, version)
        if pf is None:
            return None
        return {**pf, "url": f"{self.hub.public_url.rstrip('/')}/blobs/{pf['sha256']}"}

    # -- evidence (called inside the ingest transaction) -----------------------------------------

    def add_window(self, conn: Conn, device: str, tw: TelemetryWindow, now: float) -> None:
        self.sync(conn)
        for name, w in tw.models.items():
            r = self._active.get(name)
            if r is None or device not in r.members:
                continue
            canary = w.canary
            if not isinstance(canary, Mapping) or canary.get("rollout") != r.id:
                continue
            # The stable's output classes of the same window go with the candidate's, so the output
            # gate compares the two on the same inputs (hub.core.rollout, "output_drift").
            theirs = (w.outputs or {}).get("classes") if isinstance(w.outputs, Mapping) else None
            stored = {**canary, "stable_outputs": dict(theirs)} if isinstance(theirs, Mapping) else canary
            self.db.insert_rollout_window(conn, r.id, r.step, device, tw.seq, now, stored, w.latency_ms)

    def add_event(self, conn: Conn, device: str, ev: Event, now: float) -> None:
        if ev.type not in CANARY_EVENTS or ev.model is None:
            return
        self.sync(conn)
        r = self._active.get(ev.model)
        if r is None or device not in r.members or ev.extra.get("rollout", r.id) != r.id:
            return
        self.db.insert_rollout_event(conn, r.id, r.step, device, ev.time, ev.type, ev.reason, ev.to_dict())

    def evidence(self, r: Rollout) -> Evidence:
        return Evidence.collect(self.db.rollout_windows(r.id, r.step), self.db.rollout_events(r.id, r.step))

    def _reference_classes(self, r: Rollout) -> dict[str, float] | None:
        m = self.db.get_model(r.model, r.to_version)
        classes = ((m or {}).get("reference") or {}).get("output", {}) or {}
        c = classes.get("classes") if isinstance(classes, dict) else None
        return {str(k): float(v) for k, v in c.items()} if isinstance(c, dict) and c else None

    def input_drift(self, r: Rollout) -> dict[str, float]:
        """Features whose PSI against the stable's training reference, over the stable's inputs in
        the step's windows, is at the fleet's drift alarm level (``drift.toml``): name -> PSI."""
        m = self.db.get_model(r.model, r.from_version)
        ref = Reference.from_dict(m["reference"]) if m and m.get("reference") else None
        if ref is None or not ref.all_features:
            return {}
        merged = merge_feature_lists(self.db.rollout_stable_inputs(r.id, r.step, r.model, r.from_version))
        report = score_report(model=r.model, version=r.from_version, scope="rollout", reference=ref, inputs=merged,
                              classes={}, policy=self.hub.drift_policy(r.model), window_start=0.0,
                              window_end=0.0, windows=0)
        return {f.feature: f.psi for f in report.features if f.state == "alarm"}

    def decide(self, r: Rollout, now: float) -> Decision:
        return evaluate(r, self.evidence(r), now, self._reference_classes(r), self.input_drift(r))

    # -- acting ----------------------------------------------------------------------------------

    def evaluate_all(self) -> list[tuple[str, Decision]]:
        """Judge every running rollout once; act on and audit what changes something."""
        out = []
        with self._lock:
            self.sync()
            for r in list(self._active.values()):
                if r.state != "running":
                    continue
                now = self.hub.clock()
                d = self.decide(r, now)
                out.append((r.id, d))
                if d.outcome == "wait":
                    key = (r.id, r.step)
                    if d.would == "rollback" and key not in self._dry_noted:
                        with self.db.tx() as conn:
                            self.hub.fence(conn)
                            self.db.audit(conn, now, "rollout-gate", "rollout_dry_run", self._details(r, d))
                        self._dry_noted.add(key)
                    continue
                new = apply(r, d, now)
                action = {"promote": "rollout_step" if new.state == "running" else "rollout_promote",
                          "rollback": "rollout_rollback", "pause": "rollout_pause"}[d.outcome]
                self._transition(r, new, now, "rollout-gate", action, d, fenced=True)
        return out

    def _details(self, r: Rollout, d: Decision | None, **extra: Any) -> dict[str, Any]:
        out: dict[str, Any] = {"rollout": r.id, "model": r.model, "from_version": r.from_version,
                               "to_version": r.to_version, "step": r.step + 1, "steps": list(r.steps),
                               "percent": r.percent, "cohort": len(r.members), "targets": len(r.targets), **extra}
        if d is not None:
            out.update(outcome=d.outcome, would=d.would, reason=d.reason, gates=[g.to_dict() for g in d.gates],
                       evidence=dict(d.evidence))
        return out

    def _transition(self, old: Rollout, new: Rollout, now: float, actor: str, action: str,
                    d: Decision | None, fenced: bool = False, **extra: Any) -> dict[str, int]:
        """Persist ``new``, audit, re-sign the devices whose desired state changed, publish them.
        *fenced*: the controller's own decision (written only while this replica still leads).
        Refused (Conflict) when another replica changed the rollout since this one read it."""
        if new.state == "promoted":
            changed, version, previous = sorted(new.targets), new.to_version, new.from_version
        elif new.state in ("rolled_back", "aborted"):
            changed, version, previous = sorted(new.targets), new.from_version, None
        else:
            changed, version, previous = sorted(new.members - old.members), None, None
        seqs: dict[str, int] = {}
        try:
            self._write(new, old, now, actor, action, d, changed, version, previous, seqs, extra, fenced)
        except BaseException:
            self._reload_active()  # the transaction rolled back: so does the cache
            raise
        for device in changed:
            self.hub.publish_desired(device)
        self._alert(new, old, now, actor, action, d)
        log.info("rollout %s (%s %s -> %s): %s by %s; %s", new.id, new.model, new.from_version, new.to_version,
                 action, actor, d.reason if d else new.reason)
        return seqs

    def _alert(self, new: Rollout, old: Rollout, now: float, actor: str, action: str, d: Decision | None) -> None:
        """Publish the decision on ``{root}hub/alerts`` (the stream; not retained)."""
        alert = {"kind": ALERT_KIND, "fleet": self.hub.fleet, "time": format_time(now), "type": "rollout",
                 "action": action, "actor": actor, "rollout": new.id, "model": new.model,
                 "from_version": new.from_version, "to_version": new.to_version, "state": new.state,
                 "previous_state": old.state, "step": new.step + 1, "percent": new.percent,
                 "reason": d.reason if d else new.reason,
                 "gates": [g.to_dict() for g in d.gates] if d else []}
        self.hub.publish_alert(alert)

    def _write(self, new: Rollout, old: Rollout, now: float, actor: str, action: str, d: Decision | None,
               changed: list[str], version: str | None, previous: str | None, seqs: dict[str, int],
               extra: Mapping[str, Any], fenced: bool) -> None:
        with self.db.tx() as conn:
            if fenced:
                self.hub.fence(conn)
            stored = self.db.rollout_rev(conn, new.id)
            if stored != self._revs.get(new.id):
                what = "exists already" if action == "rollout_start" else "was changed by another hub replica"
                raise Conflict(f"rollout {new.id} {what} since this replica read it; look again "
                               f"(`edgefleet-hub rollout status {new.id}`) and retry")
            self._save(conn, new, now)
            if version is not None:
                for device in changed:
                    row = self.db.assignment(conn, device, new.model)
                    prev = previous if previous is not None else (row["previous"] if row else None)
                    if row is not None and row["version"] == version:
                        prev = row["previous"]
                    self.db.set_assignment(conn, device, new.model, version, prev)
            for device in changed:
                seqs[device] = self.hub.sign_and_store(conn, device, now)
            details = self._details(new, d, state=new.state, previous_state=old.state, **extra)
            # what lineage (hub.lineage.find_decision) looks for: the version put on these devices
            details["version"] = new.from_version if new.state in ("rolled_back", "aborted") else new.to_version
            details["devices"] = sorted(seqs)
            details["seqs"] = seqs
            self.db.audit(conn, now, actor, action, details)

    # -- operations (admin API) ------------------------------------------------------------------

    def start_rollout(self, req: Mapping[str, Any], actor: str) -> dict[str, Any]:
        name = req.get("model")
        version = req.get("version")
        if not isinstance(name, str) or not isinstance(version, str):
            raise BadRequest("a rollout needs model and version (strings)")
        if self.db.get_model(name, version) is None:
            versions = [m["version"] for m in self.db.list_models() if m["name"] == name]
            raise NotFound(f"model {name} has no version {version!r}; published: {versions or 'none'}")
        mode = req.get("mode", "shadow")
        if mode not in MODES:
            raise BadRequest(f"mode must be one of {list(MODES)}, got {mode!r}")
        try:
            fraction = float(req.get("fraction", 0.2))
        except (TypeError, ValueError):
            raise BadRequest(f"fraction must be a number in (0, 1], got {req.get('fraction')!r}") from None
        steps = parse_steps(req.get("steps") or [5, 25, 100])
        pol_doc = req.get("policy")
        base = self.config.policy.to_dict()
        policy = Policy.from_dict({**base, **(pol_doc if isinstance(pol_doc, dict) else {})}, "policy")
        if req.get("dry_run"):
            policy = replace(policy, dry_run=Policy.from_dict({"dry_run": True}).dry_run)
        with self._lock:
            self.sync()
            if name in self._active:
                a = self._active[name]
                raise Conflict(f"rollout {a.id} of {name} ({a.from_version} -> {a.to_version}) is already {a.state}; "
                               f"abort or finish it first (`edgefleet-hub rollout abort {a.id}`)")
            assigned = {r["device"]: r["version"] for r in self.db.model_assignments(name)}
            devices = req.get("devices") or sorted(assigned)
            if not isinstance(devices, list) or not devices:
                raise BadRequest(f"no device runs {name}: deploy a version first (`edgefleet-hub deploy`)")
            missing = [d for d in devices if d not in assigned]
            if missing:
                raise BadRequest(f"device(s) {missing} do not run {name}; deploy the stable version to them first")
            froms = sorted({assigned[d] for d in devices})
            if len(froms) != 1:
                by = {v: [d for d in devices if assigned[d] == v] for v in froms}
                raise BadRequest(f"the target devices run different versions of {name}: {by}; "
                                 "pick devices that run one version (--devices)")
            profiles = self.db.device_profiles()
            now = self.hub.clock()
            n = self.db.rollout_count() + 1
            r = Rollout.start(id=f"r-{n}", model=name, from_version=froms[0], to_version=version,
                              targets={d: profiles.get(d, "") for d in devices}, now=now, steps=steps,
                              mode=str(mode), fraction=fraction, policy=policy)
            empty = replace(r, members=frozenset())
            self._transition(empty, r, now, actor, "rollout_start", None, policy=policy.to_dict(),
                             mode=r.mode, fraction=r.fraction, members=sorted(r.members))
        return self.describe(r)

    def act(self, action: str, key: str | None, actor: str, reason: str = "") -> dict[str, Any]:
        """pause | resume | abort | promote, by a human."""
        fn = {"pause": pause, "resume": resume, "abort": abort, "promote": promote_now}.get(action)
        if fn is None:
            raise BadRequest(f"action must be pause, resume, abort or promote, got {action!r}")
        with self._lock:
            self.sync()
            r = self._find(key)
            now = self.hub.clock()
            new = fn(r, now, reason or f"{action} by {actor}")
            d = self.decide(r, now) if r.active else None
            self._transition(r, new, now, actor, f"rollout_{action}", d, by="human")
        return self.describe(new)

    def fleet_rollback(self, req: Mapping[str, Any], actor: str) -> dict[str, Any]:
        """New desired states naming the previous (or ``to``) version on every device running the model."""
        name = req.get("model")
        to = req.get("to")
        if not isinstance(name, str):
            raise BadRequest("rollback needs the model name")
        if to is not None and (not isinstance(to, str) or self.db.get_model(name, to) is None):
            versions = [m["version"] for m in self.db.list_models() if m["name"] == name]
            raise NotFound(f"model {name} has no version {to!r}; published: {versions or 'none'}")
        with self._lock:
            self.sync()
            now = self.hub.clock()
            r = self._active.get(name)
            if r is not None and (to is None or to == r.from_version):
                new = rollback(r, now, f"fleet rollback by {actor}")
                seqs = self._transition(r, new, now, actor, "rollback", self.decide(r, now), by="human")
                return {"model": name, "to": r.from_version, "rollout": r.id, "skipped": {},
                        "devices": {d: {"from": r.to_version if d in r.members else r.from_version,
                                        "to": r.from_version, "seq": s} for d, s in seqs.items()}}
            rows = self.db.model_assignments(name)
            if not rows:
                raise NotFound(f"no device runs {name}")
            devices: dict[str, dict[str, Any]] = {}
            skipped: dict[str, str] = {}
            for row in rows:
                target = to or row["previous"]
                if not target:
                    skipped[row["device"]] = f"runs {row['version']} and has no previous version; pass --to"
                elif target == row["version"]:
                    skipped[row["device"]] = f"already runs {target}"
                else:
                    devices[row["device"]] = {"from": row["version"], "to": target}
            if not devices:
                raise BadRequest(f"nothing to roll back for {name}: "
                                 + "; ".join(f"{d} {why}" for d, why in sorted(skipped.items())))
            # the rollout that promoted what the devices run now is rolled back with them
            done = next((x for x in self.status_rows(name) if x.state == "promoted"), None)
            if done is not None and not any(c["from"] == done.to_version for c in devices.values()):
                done = None
            with self.db.tx() as conn:
                for device, change in devices.items():
                    self.db.set_assignment(conn, device, name, change["to"], change["from"])
                    change["seq"] = self.hub.sign_and_store(conn, device, now)
                if done is not None:
                    self._save(conn, rollback(done, now, f"fleet rollback by {actor}"), now)
                for target in sorted({c["to"] for c in devices.values()}):  # one entry per version put
                    group = {dev: c for dev, c in devices.items() if c["to"] == target}
                    self.db.audit(conn, now, actor, "rollback", {
                        "model": name, "version": target, "devices": sorted(group), "changes": group,
                        "skipped": skipped, "by": "human", "rollout": done.id if done else None})
            for device in devices:
                self.hub.publish_desired(device)
        return {"model": name, "to": to, "devices": devices, "skipped": skipped,
                "rollout": done.id if done else None}

    def status_rows(self, model: str) -> list[Rollout]:
        """The model's rollouts, newest first."""
        return [Rollout.from_dict(x) for x in self.db.model_rollout_specs(model)]

    # -- views -----------------------------------------------------------------------------------

    def describe(self, r: Rollout) -> dict[str, Any]:
        out = r.to_dict()
        out["step_number"] = r.step + 1
        out["percent"] = r.percent
        out["cohort_size"] = len(r.members)
        out["target_count"] = len(r.targets)
        out["created"] = format_time(r.created_at)
        out["step_started"] = format_time(r.step_started_at)
        if r.active:
            d = self.decide(r, self.hub.clock())
            out["decision"] = d.to_dict()
        return out

    def status(self, key: str | None = None) -> list[dict[str, Any]]:
        if key:
            return [self.describe(self.get(key))]
        return [self.describe(Rollout.from_dict(x)) for x in self.db.recent_rollout_specs(50)]
