"""The update state machine: what an update does to the agent's state, with no I/O.

One :class:`UpdateCore` holds the part of the state file the update path owns (``models``,
``canaries``, ``update``, ``failed``) and decides; the caller executes. Two callers run it:
:class:`agent.app.updater.Updater` (the real agent: downloads, the guard process, ONNX Runtime
sessions, a state-file write after every transition) and :class:`agent.app.sim.SimAgent` (the
simulated fleet: hard links from a shared blob cache, no sessions, one write per update). Both
therefore write the same state file and make the same decisions.

Per model, :data:`TRANSITIONS` is the whole table (phase, step) -> next phase; a step the table
does not name from the current phase raises :class:`BadTransition`::

    idle/active/rolled-back/failed --fetch--> downloading --verify--> verifying
    idle/active/rolled-back/failed --local--> verifying          (blob already on disk: rollback, promotion)
    verifying --stage--> staged --commit--> active
    downloading/verifying/staged --fail--> failed                (the stable keeps serving)
    downloading/verifying/staged --abort--> active               (another model of the update failed)
    downloading/verifying/staged --restart--> active             (the agent died mid-update)
    active/rolled-back/failed --rollback--> rolled-back          (local, instant: the fallback is on disk)

A record with no installed ``entry`` (a first install) reads ``idle`` instead of ``active`` after
``abort`` and ``restart``, and disappears after ``fail``: there is nothing of it to serve.

Pure: no files, threads, clock or ONNX Runtime. Time, bytes and verified states come in as
arguments; the state file's dict goes out (:meth:`UpdateCore.state_fields`).
"""

from __future__ import annotations

import base64
import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from edgefleet.agent.contract.errors import EdgefleetError
from edgefleet.agent.contract.wire import ModelEntry

__all__ = [
    "STATE_FIELDS",
    "TRANSITIONS",
    "BadTransition",
    "CanaryIntent",
    "Note",
    "Phase",
    "Plan",
    "Step",
    "UpdateCore",
    "canary_end_reason",
]


class Phase(enum.StrEnum):
    """A model's update phase, as the state file spells it."""

    IDLE = "idle"
    DOWNLOADING = "downloading"
    VERIFYING = "verifying"
    STAGED = "staged"
    ACTIVE = "active"
    FAILED = "failed"
    ROLLED_BACK = "rolled-back"


class Step(enum.StrEnum):
    FETCH = "fetch"
    LOCAL = "local"
    VERIFY = "verify"
    STAGE = "stage"
    COMMIT = "commit"
    FAIL = "fail"
    ABORT = "abort"
    RESTART = "restart"
    ROLLBACK = "rollback"


_SETTLED = (Phase.IDLE, Phase.ACTIVE, Phase.ROLLED_BACK, Phase.FAILED)
_IN_FLIGHT = (Phase.DOWNLOADING, Phase.VERIFYING, Phase.STAGED)

TRANSITIONS: dict[tuple[Phase, Step], Phase] = {
    **{(p, Step.FETCH): Phase.DOWNLOADING for p in _SETTLED},
    **{(p, Step.LOCAL): Phase.VERIFYING for p in _SETTLED},
    (Phase.DOWNLOADING, Step.VERIFY): Phase.VERIFYING,
    (Phase.VERIFYING, Step.STAGE): Phase.STAGED,
    (Phase.STAGED, Step.COMMIT): Phase.ACTIVE,
    # A refusal can come before the model's first transition (a malformed canary entry), so a
    # settled model can fail too; its installed entry keeps serving.
    **{(p, Step.FAIL): Phase.FAILED for p in (*_IN_FLIGHT, *_SETTLED)},
    **{(p, Step.ABORT): Phase.ACTIVE for p in _IN_FLIGHT},
    **{(p, Step.RESTART): Phase.ACTIVE for p in _IN_FLIGHT},
    **{(p, Step.ROLLBACK): Phase.ROLLED_BACK for p in (Phase.ACTIVE, Phase.ROLLED_BACK, Phase.FAILED)},
}

# The state-file fields the update path owns; others (``telemetry_seq``, ...) belong to the daemon.
STATE_FIELDS = ("models", "update", "failed", "canaries")


class BadTransition(EdgefleetError):
    """A step the table does not allow from the model's phase: a bug in the caller, never input."""

    reason = "bad_transition"


@dataclass(frozen=True)
class Note:
    """Something the operator should hear about; the daemon turns it into an ``Event``."""

    type: str  # update | refused | update_failed | noop | rollback | removed | restored | canary_*
    reason: str = ""
    message: str = ""
    model: str | None = None
    version: str | None = None
    seq: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def of(cls, type_: str, exc: EdgefleetError, **kw: Any) -> Note:
        return cls(type=type_, reason=exc.reason, message=str(exc), **kw)


class CanaryIntent(Protocol):
    """What a desired entry's ``canary`` asks for, as far as the state machine needs it
    (:class:`agent.core.canary.CanarySpec` is one; the state machine does not import it, so an
    agent that never runs a canary never loads numpy's canary statistics)."""

    @property
    def rollout(self) -> str: ...
    @property
    def mode(self) -> str: ...
    @property
    def fraction(self) -> float: ...
    @property
    def limits(self) -> Mapping[str, Any]: ...
    @property
    def stable(self) -> ModelEntry: ...


@dataclass(frozen=True)
class Plan:
    """What one verified desired state changes, against what is installed.

    ``view`` is the model each name serves as its stable (a canary entry's ``canary.stable``);
    ``changed`` the names whose stable blob changes; ``removed`` the installed names the state
    no longer lists; ``starting`` the canaries to prepare (new rollout or candidate), ``ending``
    the recorded canaries that stop, ``retuned`` the running ones whose mode, fraction or limits
    change (no new preflight)."""

    seq: int
    view: dict[str, ModelEntry]
    changed: dict[str, ModelEntry]
    removed: list[str]
    starting: list[str]
    ending: list[str]
    retuned: list[str]
    reusable: frozenset[str]  # changed names whose blob is a verified fallback or candidate

    @property
    def noop(self) -> bool:
        return not (self.changed or self.removed or self.starting or self.ending or self.retuned)


def canary_end_reason(entry: ModelEntry | None, candidate_sha256: str) -> str:
    """Why a running canary ends, from the entry the new desired state gives its model."""
    if entry is None:
        return "removed"
    if entry.canary is None:
        return "promoted" if entry.sha256 == candidate_sha256 else "rollback"
    return "replaced"


def _phase(rec: Mapping[str, Any]) -> Phase:
    """A record's phase. A record without one is what it serves; a phase this version does not
    know (a state file from a newer agent) counts as an update in flight, which a restart resets."""
    value = rec.get("state")
    if not value:
        return Phase.ACTIVE if rec.get("entry") else Phase.IDLE
    try:
        return Phase(value)
    except ValueError:
        return Phase.DOWNLOADING


def _same_install(rec: Mapping[str, Any] | None, entry: ModelEntry) -> bool:
    """Installed already: the same bytes *and* the same version label. The same bytes under a new
    label (a retrain that converged to the stable, a re-tag) is a change: it is installed as a
    relabel from the blob on disk, so the device serves and reports the version the hub desires."""
    installed = (rec or {}).get("entry") or {}
    return installed.get("sha256") == entry.sha256 and installed.get("version") == entry.version


def _next(name: str, rec: Mapping[str, Any], step: Step) -> Phase:
    current = _phase(rec)
    target = TRANSITIONS.get((current, step))
    if target is None:
        allowed = sorted(s.value for (p, s) in TRANSITIONS if p is current)
        raise BadTransition(f"{name}: step {step.value!r} is not allowed from {current.value!r} "
                            f"(allowed: {', '.join(allowed)})")
    return target


class UpdateCore:
    """The update path's share of the state file, and every decision made on it."""

    def __init__(self, *, max_restarts: int = 3) -> None:
        self.max_restarts = max_restarts
        self.models: dict[str, dict[str, Any]] = {}
        self.canaries: dict[str, dict[str, Any]] = {}
        self.update: dict[str, Any] | None = None
        self.failed: dict[str, Any] | None = None

    # -- the state file ---------------------------------------------------------------------------

    def state_fields(self) -> dict[str, Any]:
        return {"models": self.models, "update": self.update, "failed": self.failed, "canaries": self.canaries}

    def load(self, state: Mapping[str, Any]) -> None:
        self.models = dict(state.get("models") or {})
        self.update = state.get("update")
        self.failed = state.get("failed")
        self.canaries = dict(state.get("canaries") or {})

    def snapshot(self) -> tuple[Any, ...]:
        """Everything :meth:`revert` needs to undo a commit whose state-file write failed."""
        return self.models, self.update, self.failed, self.canaries

    def revert(self, snap: tuple[Any, ...]) -> None:
        self.models, self.update, self.failed, self.canaries = snap

    def keep(self) -> set[str]:
        """The blobs (sha256) the state refers to: everything else in the store may go."""
        keep = {rec[which]["sha256"] for rec in self.models.values()
                for which in ("entry", "fallback", "candidate") if rec.get(which)}
        keep |= {rec["entry"]["sha256"] for rec in self.canaries.values() if rec.get("state") == "running"}
        return keep

    def phase(self, name: str) -> Phase:
        rec = self.models.get(name)
        return _phase(rec) if rec else Phase.ACTIVE

    # -- transitions ------------------------------------------------------------------------------

    def transition(self, name: str, step: Step, candidate: ModelEntry | None = None, reason: str = "") -> Phase:
        """Apply one step of the table to ``name``; returns the new phase.

        ``fetch`` and ``local`` record the candidate being installed; ``restart`` keeps it (its
        verified blob is not collected before the update resumes); every other step that lands
        outside the update clears it."""
        rec = self.models.get(name) or {"entry": None, "fallback": None}
        target = _next(name, rec, step)
        if target is Phase.ACTIVE and rec.get("entry") is None:
            target = Phase.IDLE
        if target is Phase.FAILED and rec.get("entry") is None:
            self.models.pop(name, None)  # a first install that failed: nothing of it stays
            return target
        rec["state"], rec["reason"] = target.value, reason
        if candidate is not None and target in _IN_FLIGHT:
            rec["candidate"] = candidate.to_dict()
        elif step is not Step.RESTART and target not in _IN_FLIGHT:
            rec["candidate"] = None
        self.models[name] = rec
        return target

    # -- restart ----------------------------------------------------------------------------------

    def restart(self) -> tuple[bytes | None, list[Note]]:
        """After :meth:`load` at start-up: models caught mid-update go back to what they serve;
        an update in progress is resumed (its raw desired state is returned) or, after more than
        ``max_restarts`` interrupted starts, abandoned as ``crash_loop``."""
        caught = self._restart_in_flight()
        if self.update is None:
            return None, []
        # Not a sign of a crash loop: a restart while the update waited for the network, or one
        # that caught it downloading (no byte of the new model had been parsed yet; a slow mirror
        # and a watchdog or an operator's restart are the usual causes). Restarts during the
        # checks, the guard, staging or the switch count.
        downloading = bool(caught) and all(p is Phase.DOWNLOADING for p in caught)
        if not self.update.pop("waiting", False) and not downloading:
            self.update["restarts"] = int(self.update.get("restarts", 0)) + 1
        if self.update["restarts"] > self.max_restarts:
            return None, [self._abandon_crash_loop()]
        return base64.b64decode(self.update["raw"]), []

    def _restart_in_flight(self) -> list[Phase]:
        """Every model caught mid-update goes back to what it serves (``restart`` keeps its
        candidate: a partial download continues with Range, a verified blob is reused); returns
        the phases they were caught in."""
        caught = []
        for name, rec in list(self.models.items()):
            phase = _phase(rec)
            if phase in _IN_FLIGHT:
                caught.append(phase)
                self.transition(name, Step.RESTART)
        return caught

    def _abandon_crash_loop(self) -> Note:
        assert self.update is not None
        up, self.update = self.update, None
        self.failed = {"digest": up["digest"], "seq": up["seq"], "reason": "crash_loop"}
        for rec in self.models.values():
            if rec.get("candidate") is not None:
                rec["state"], rec["reason"], rec["candidate"] = Phase.FAILED.value, "crash_loop", None
        return Note("update_failed", "crash_loop",
                    f"the update to seq {up['seq']} was interrupted by {up['restarts'] - 1} restarts; "
                    "it is abandoned and the previous models keep serving. Publish a new desired "
                    "state (higher seq) after fixing the cause", seq=up["seq"])

    # -- a desired state --------------------------------------------------------------------------

    def reported_failed(self, digest: str) -> bool:
        """True if this exact desired state failed here before: only a new one is tried again."""
        return self.failed is not None and self.failed.get("digest") == digest

    def begin(self, *, seq: int, digest: str, raw: bytes) -> None:
        """An update to this verified state starts (or continues, if it is the one in progress)."""
        if self.update is None or self.update.get("digest") != digest:
            self.update = {"seq": seq, "digest": digest, "restarts": 0, "raw": base64.b64encode(raw).decode()}
        self.update["waiting"] = False

    def wait_for_network(self) -> None:
        """The update stopped on an ``Unavailable`` and retries later: the models it had in flight
        go back to what they serve (``restart`` keeps their candidates, so blobs already verified
        are reused), and a restart while it waits is no sign of a crash loop."""
        self._restart_in_flight()
        if self.update is not None:
            self.update["waiting"] = True

    def forget(self, raw: bytes) -> bool:
        """A redelivered state is refused now (expired, revoked key): drop it if it was in progress."""
        if self.update is not None and self.update["raw"] == base64.b64encode(raw).decode():
            self.update = None
            return True
        return False

    def plan(self, seq: int, models: Mapping[str, ModelEntry], intents: Mapping[str, CanaryIntent]) -> Plan:
        view = {n: intents[n].stable if n in intents else e for n, e in models.items()}
        changed = {n: e for n, e in view.items() if not _same_install(self.models.get(n), e)}
        removed = [n for n in self.models if n not in models]
        starting = [n for n, i in intents.items() if not self._same_canary(n, models[n], i)]
        ending = [n for n in self.canaries if n not in intents or n in starting]
        retuned = [n for n, i in intents.items() if n not in starting and self._retuned(n, i)]
        reusable = frozenset(n for n, e in changed.items() if e.sha256 in self._local_blobs(n))
        return Plan(seq, view, changed, removed, starting, ending, retuned, reusable)

    def _local_blobs(self, name: str) -> set[str]:
        rec = self.models.get(name) or {}
        running = self.canaries.get(name) or {}
        candidate = running.get("entry") if running.get("state") == "running" else None
        # The stable's own blob too: a new version label on the same bytes is a relabel.
        return {e["sha256"] for e in (rec.get("entry"), rec.get("fallback"), candidate) if e}

    def _same_canary(self, name: str, entry: ModelEntry, intent: CanaryIntent) -> bool:
        """True if this rollout's candidate is already attached, or was dropped here before."""
        rec = self.canaries.get(name)
        return bool(rec and rec.get("rollout") == intent.rollout and rec["entry"]["sha256"] == entry.sha256)

    def _retuned(self, name: str, intent: CanaryIntent) -> bool:
        rec = self.canaries.get(name) or {}
        limits = ((rec.get("entry") or {}).get("canary") or {}).get("limits") or {}
        return rec.get("state") == "running" and (rec.get("mode"), rec.get("fraction"), limits) != (
            intent.mode, intent.fraction, dict(intent.limits))

    def noop(self, seq: int) -> Note:
        self.update = None
        return Note("noop", "already_installed",
                    f"seq {seq}: every model is already installed at the desired version", seq=seq)

    def refuse(self, name: str, entry: ModelEntry, *, seq: int, digest: str, reason: str) -> None:
        """``name`` was refused: the whole update is dropped and remembered by digest; models
        staged before it go back to what they serve."""
        self.transition(name, Step.FAIL, entry, reason=reason)
        for other, rec in list(self.models.items()):
            if other == name or rec.get("candidate") is None:
                continue
            if _phase(rec) in _IN_FLIGHT:
                self.transition(other, Step.ABORT)
            else:
                rec["candidate"] = None  # left over from an interrupted start
        self.update = None
        self.failed = {"digest": digest, "seq": seq, "reason": reason}

    def commit(self, plan: Plan, staged: set[str], canaries: dict[str, dict[str, Any]] | None) -> None:
        """One state: the staged models become the stable (the old stable their fallback), the
        removed ones go, the canary records are replaced. The caller writes it in one atomic write,
        and calls :meth:`revert` with a :meth:`snapshot` taken before if that write fails."""
        for name in staged:
            _next(name, self.models.get(name) or {}, Step.COMMIT)
        models: dict[str, dict[str, Any]] = {}
        for name, entry in plan.view.items():
            prev = self.models.get(name) or {}
            if name in staged:
                models[name] = {"entry": entry.to_dict(), "fallback": prev.get("entry"),
                                "state": Phase.ACTIVE.value, "candidate": None, "reason": ""}
            else:
                models[name] = {**prev, "entry": entry.to_dict()}
        self.models = models
        if canaries is not None:
            self.canaries = canaries
        self.update, self.failed = None, None

    # -- canary records ---------------------------------------------------------------------------

    def canary_record(self, name: str, entry: ModelEntry, intent: CanaryIntent, seq: int) -> dict[str, Any]:
        return {"rollout": intent.rollout, "mode": intent.mode, "fraction": intent.fraction,
                "entry": entry.to_dict(), "seq": seq, "state": "running", "reason": None}

    def retune(self, records: dict[str, dict[str, Any]], name: str, entry: ModelEntry,
               intent: CanaryIntent, seq: int) -> None:
        records[name] = {**records[name], "mode": intent.mode, "fraction": intent.fraction,
                         "entry": entry.to_dict(), "seq": seq}

    def canary_dropped(self, name: str, reason: str, numbers: Mapping[str, Any] | None = None) -> None:
        rec = self.canaries.get(name)
        if rec is not None:
            rec.update(state="dropped", reason=reason)
            if numbers is not None:
                rec["numbers"] = dict(numbers)

    # -- local rollback ---------------------------------------------------------------------------

    def fallback(self, name: str) -> ModelEntry | None:
        rec = self.models.get(name)
        return ModelEntry.from_dict(rec["fallback"]) if rec and rec.get("fallback") else None

    def rolled_back(self, name: str, reason: str) -> None:
        """The fallback of ``name`` now serves: it becomes the entry, the old entry its fallback."""
        self.transition(name, Step.ROLLBACK, reason=reason)
        rec = self.models[name]
        rec["entry"], rec["fallback"] = rec["fallback"], rec["entry"]

    def serving_fallback(self, name: str) -> None:
        """At start-up the stable's blob was unusable and the fallback serves instead."""
        rec = self.models[name]
        rec["entry"], rec["fallback"], rec["state"] = rec["fallback"], None, Phase.ROLLED_BACK.value
