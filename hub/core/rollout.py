"""Staged rollouts: cohorts, gate policy, evidence, decisions and transitions. Pure: no I/O.

A :class:`Rollout` moves one model from ``from_version`` to ``to_version`` over its target
devices through ``steps`` (percentages, e.g. 5, 25, 100). At step *k* the devices of the cohort
:func:`cohort` (``targets``, ``percent = steps[k]``) run the candidate beside the stable version
(shadow or split); everyone else runs the stable one. The clock is passed in everywhere.

Invariants:

* Cohorts are reproducible and nested: a device's rank is ``sha256(rollout_id + ":" + device)``
  within its device profile; each profile contributes ``ceil(n_profile * percent / 100)`` of its
  lowest-ranked devices, so every hardware class is in every step's cohort and step *k*'s cohort
  is a subset of step *k+1*'s. Membership is sticky (``Rollout.members``): a device that joins
  the targets later never pushes a device out of the cohort it is already in.
* A gate judges only on evidence gathered during the current step (:class:`Evidence`). Below
  ``min_inferences`` or ``min_device_windows`` it never passes: before the step deadline the
  outcome is ``wait``, at the deadline ``pause`` with the reason — never a silent pass.
* Any enforced gate failing means ``rollback``; every enforced gate passing (and the step older
  than ``min_step_seconds``) means ``promote`` (the next step, or the end: ``promoted``). A gate in
  dry-run is evaluated and reported but cannot cause a rollback (:attr:`Decision.would`).
* Transitions (:func:`advance`, :func:`pause`, :func:`resume`, :func:`abort`, :func:`rollback`,
  :func:`promote_now`) return a new :class:`Rollout`; they raise :class:`RolloutError` when the
  state does not allow them. Terminal states: ``promoted``, ``rolled_back``, ``aborted``.

The adapter that stores rollouts, feeds evidence from telemetry and signs desired states is
:mod:`hub.services.rollout_manager`.
"""

from __future__ import annotations

import hashlib
import math
import statistics
import tomllib
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from edgefleet.agent.contract.stats import Z99, wilson_bounds
from edgefleet.hub.core.drift import psi, psi_bounds
from edgefleet.hub.errors import BadRequest

__all__ = [
    "GATES",
    "MODES",
    "STATES",
    "Decision",
    "Evidence",
    "GateResult",
    "Policy",
    "Rollout",
    "RolloutError",
    "abort",
    "advance",
    "cohort",
    "evaluate",
    "load_policy",
    "parse_steps",
    "pause",
    "promote_now",
    "resume",
    "rollback",
    "time_to_decision",
]

STATES = ("running", "paused", "promoted", "rolled_back", "aborted")
ACTIVE = ("running", "paused")
MODES = ("shadow", "split")
GATES = ("failures", "error_rate", "latency_p95_ratio", "agreement", "output_drift")
FAILURE_STATES = ("dropped", "preflight_failed")
FAILURE_EVENTS = ("canary_dropped", "preflight_failed")


class RolloutError(BadRequest):
    """A rollout request or transition that cannot be done as asked (bad policy, wrong state)."""

    reason = "rollout"


# -- policy --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Policy:
    """What a step must show before it is promoted. Defaults are what ``rollout.toml`` omits."""

    min_inferences: int = 200
    min_device_windows: int = 3
    max_latency_p95_ratio: float = 1.1
    # On unpaired latency evidence (split mode), a slowdown of at most this many ms never fails
    # the latency gate: the soak saw an identical graph in split mode proven 1.12-2.07x slower on
    # per-window p95s of 0.195 ms vs 0.123 ms (a colder second session, the scheduler).
    latency_tolerance_ms: float = 0.1
    max_error_rate: float = 0.01
    min_agreement: float = 0.95
    # On a step whose inputs drifted from the stable's training reference, agreement proven below
    # min_agreement rolls back only below this floor; above it the step pauses for an operator:
    # off the training distribution two sound models disagree more.
    min_agreement_drifted: float = 0.8
    max_output_drift: float = 0.25
    max_failures: int = 0
    min_step_seconds: float = 0.0
    step_deadline_seconds: float = 1800.0
    dry_run: tuple[str, ...] = ()
    limits: Mapping[str, float] = field(default_factory=lambda: {
        "max_error_rate": 0.05, "max_latency_ratio": 5.0, "min_samples": 50})

    def __post_init__(self) -> None:
        checks = [
            (self.min_inferences >= 0, "min_inferences must be >= 0"),
            (self.min_device_windows >= 0, "min_device_windows must be >= 0"),
            (self.max_latency_p95_ratio > 0, "max_latency_p95_ratio must be > 0 (candidate p95 / stable p95)"),
            (self.latency_tolerance_ms >= 0, "latency_tolerance_ms must be >= 0 (milliseconds)"),
            (0 <= self.max_error_rate <= 1, "max_error_rate must be in [0, 1]"),
            (0 <= self.min_agreement <= 1, "min_agreement must be in [0, 1]"),
            (0 <= self.min_agreement_drifted <= self.min_agreement,
             "min_agreement_drifted must be in [0, min_agreement]"),
            (self.max_output_drift > 0, "max_output_drift must be > 0 (PSI)"),
            (self.max_failures >= 0, "max_failures must be >= 0"),
            (self.min_step_seconds >= 0, "min_step_seconds must be >= 0"),
            (self.step_deadline_seconds > 0, "step_deadline_seconds must be > 0"),
        ]
        for ok, msg in checks:
            if not ok:
                raise RolloutError(f"rollout policy: {msg}")
        bad = [g for g in self.dry_run if g not in GATES]
        if bad:
            raise RolloutError(f"rollout policy: dry_run names unknown gate {bad[0]!r}; gates: {list(GATES)}")
        unknown = sorted(set(self.limits) - {"max_error_rate", "max_latency_ratio", "min_samples"})
        if unknown:
            raise RolloutError(f"rollout policy: [limits] has unknown key {unknown[0]!r}; "
                               "allowed: max_error_rate, max_latency_ratio, min_samples")

    @classmethod
    def from_dict(cls, doc: Mapping[str, Any], where: str = "policy") -> Policy:
        """Build from a TOML/JSON object; ``dry_run`` is ``true`` (every gate) or a list of gates."""
        allowed = {f.name for f in fields(cls)}
        unknown = sorted(set(doc) - allowed)
        if unknown:
            raise RolloutError(f"{where}: unknown key {unknown[0]!r}; expected some of {sorted(allowed)}")
        kw: dict[str, Any] = {}
        for f in fields(cls):
            if f.name not in doc:
                continue
            v = doc[f.name]
            if f.name == "dry_run":
                if v is True:
                    v = GATES
                elif v is False:
                    v = ()
                elif isinstance(v, list | tuple) and all(isinstance(x, str) for x in v):
                    v = tuple(v)
                else:
                    raise RolloutError(f"{where}: dry_run must be true, false or a list of gate names "
                                       f"from {list(GATES)}, got {v!r}")
            elif f.name == "limits":
                if not isinstance(v, Mapping) or not all(
                        isinstance(x, int | float) and not isinstance(x, bool) for x in v.values()):
                    raise RolloutError(f"{where}: [limits] must be a table of numbers, got {v!r}")
                v = {**cls().limits, **{str(k): int(x) if k == "min_samples" else float(x) for k, x in v.items()}}
            elif f.name in ("min_inferences", "min_device_windows", "max_failures"):
                if not isinstance(v, int) or isinstance(v, bool):
                    raise RolloutError(f"{where}: {f.name} must be an integer, got {v!r}")
            elif not isinstance(v, int | float) or isinstance(v, bool):
                raise RolloutError(f"{where}: {f.name} must be a number, got {v!r}")
            else:
                v = float(v)
            kw[f.name] = v
        try:
            return cls(**kw)
        except RolloutError as exc:
            raise RolloutError(f"{where}: {str(exc).removeprefix('rollout policy: ')}") from None

    def to_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out["dry_run"] = list(self.dry_run)
        out["limits"] = dict(self.limits)
        return out

    def threshold(self, gate: str) -> float:
        return float({
            "failures": self.max_failures, "error_rate": self.max_error_rate,
            "latency_p95_ratio": self.max_latency_p95_ratio, "agreement": self.min_agreement,
            "output_drift": self.max_output_drift,
        }[gate])


def load_policy(path: Path) -> Policy:
    """Read a policy TOML file (see docs/rollouts.md); errors name the file and what was expected."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise RolloutError(f"cannot read policy file {path}: {exc}") from exc
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise RolloutError(f"policy file {path} is not valid TOML: {exc}") from exc
    return Policy.from_dict(doc, str(path))


def parse_steps(value: str | Sequence[Any]) -> tuple[int, ...]:
    """``"5,25,100"`` or ``[5, 25, 100]`` → ``(5, 25, 100)``: increasing percentages ending at 100."""
    items = value.split(",") if isinstance(value, str) else list(value)
    try:
        steps = tuple(int(str(x).strip().rstrip("%")) for x in items)
    except ValueError:
        raise RolloutError(f"steps must be percentages like 5,25,100, got {value!r}") from None
    if not steps or any(not 0 < s <= 100 for s in steps) or list(steps) != sorted(set(steps)) or steps[-1] != 100:
        raise RolloutError(f"steps must be strictly increasing percentages in 1..100 ending at 100, got {value!r}")
    return steps


# -- cohorts -------------------------------------------------------------------------------------


def rank(rollout_id: str, device: str) -> str:
    return hashlib.sha256(f"{rollout_id}:{device}".encode()).hexdigest()


def cohort(devices: Mapping[str, str], rollout_id: str, percent: float) -> frozenset[str]:
    """The devices (id → profile) in a ``percent`` cohort: stable, stratified by profile, nested."""
    if percent >= 100:
        return frozenset(devices)
    by_profile: dict[str, list[str]] = {}
    for device, profile in devices.items():
        by_profile.setdefault(profile, []).append(device)
    out: set[str] = set()
    for group in by_profile.values():
        n = math.ceil(len(group) * percent / 100) if percent > 0 else 0
        out.update(sorted(group, key=lambda d: rank(rollout_id, d))[:n])
    return frozenset(out)


# -- the rollout ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Rollout:
    id: str
    model: str
    from_version: str
    to_version: str
    targets: Mapping[str, str]  # device -> profile
    steps: tuple[int, ...] = (5, 25, 100)
    mode: str = "shadow"
    fraction: float = 0.2
    policy: Policy = field(default_factory=Policy)
    state: str = "running"
    step: int = 0
    step_started_at: float = 0.0
    created_at: float = 0.0
    members: frozenset[str] = frozenset()
    reason: str = ""

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise RolloutError(f"mode must be one of {list(MODES)}, got {self.mode!r}")
        if not 0 < self.fraction <= 1:
            raise RolloutError(f"fraction must be in (0, 1], got {self.fraction!r}")
        if self.state not in STATES:
            raise RolloutError(f"state must be one of {list(STATES)}, got {self.state!r}")
        if not self.targets:
            raise RolloutError("a rollout needs at least one target device")
        if self.from_version == self.to_version:
            raise RolloutError(f"{self.model} already runs {self.to_version}: nothing to roll out")

    @property
    def active(self) -> bool:
        return self.state in ACTIVE

    @property
    def percent(self) -> int:
        return self.steps[min(self.step, len(self.steps) - 1)]

    def with_cohort(self) -> Rollout:
        """Members updated for the current step and targets (sticky union)."""
        return replace(self, members=self.members | (cohort(self.targets, self.id, self.percent) & set(self.targets)))

    def runs(self, device: str) -> str:
        """What ``device`` should run now: ``candidate`` or ``stable`` (or ``promoted`` at the end)."""
        if self.state == "promoted":
            return "promoted"
        if self.active and device in self.members:
            return "candidate"
        return "stable"

    def add_target(self, device: str, profile: str) -> Rollout:
        r = replace(self, targets={**self.targets, device: profile})
        return r.with_cohort() if r.active else r

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id, "model": self.model, "from_version": self.from_version,
            "to_version": self.to_version, "targets": dict(self.targets), "steps": list(self.steps),
            "mode": self.mode, "fraction": self.fraction, "policy": self.policy.to_dict(),
            "state": self.state, "step": self.step, "step_started_at": self.step_started_at,
            "created_at": self.created_at, "members": sorted(self.members), "reason": self.reason,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Rollout:
        return cls(
            id=d["id"], model=d["model"], from_version=d["from_version"], to_version=d["to_version"],
            targets=dict(d["targets"]), steps=tuple(d["steps"]), mode=d["mode"], fraction=float(d["fraction"]),
            policy=Policy.from_dict(d["policy"]), state=d["state"], step=int(d["step"]),
            step_started_at=float(d["step_started_at"]), created_at=float(d["created_at"]),
            members=frozenset(d["members"]), reason=d.get("reason", ""),
        )

    @classmethod
    def start(cls, *, id: str, model: str, from_version: str, to_version: str, targets: Mapping[str, str],
              now: float, steps: Sequence[int] = (5, 25, 100), mode: str = "shadow", fraction: float = 0.2,
              policy: Policy | None = None) -> Rollout:
        r = cls(id=id, model=model, from_version=from_version, to_version=to_version, targets=dict(targets),
                steps=parse_steps(list(steps)), mode=mode, fraction=fraction, policy=policy or Policy(),
                step_started_at=now, created_at=now)
        return r.with_cohort()


# -- evidence ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Evidence:
    """Sums over a step's canary windows (contract "Telemetry") and failure events."""

    windows: int = 0
    devices: frozenset[str] = frozenset()
    requests: int = 0
    errors: int = 0
    skipped: int = 0
    compared: int = 0
    agreed: int = 0
    distance_sum: float = 0.0
    cand_p95_sum: float = 0.0  # sum of per-window candidate p95 weighted by the window's requests
    stable_p95_sum: float = 0.0
    latency_weight: int = 0
    # (candidate p95, stable p95) per window that measured both: the latency gate's samples.
    latency_pairs: tuple[tuple[float, float], ...] = ()
    # Shadow windows' median log(candidate / stable) over batches timed back to back on the same
    # inputs (``canary.paired``): the latency gate's samples when there are any.
    latency_logs: tuple[float, ...] = ()
    paired_batches: int = 0
    classes: Mapping[str, int] = field(default_factory=dict)
    stable_classes: Mapping[str, int] = field(default_factory=dict)  # the stable's, same windows
    failures: tuple[tuple[str, str, str], ...] = ()  # (device, kind, reason)
    # Windows whose device was CPU-starved (``canary.starved``): its threads waited for a CPU 40 %
    # or more of the time they wanted one, so its timings say nothing about the model. They
    # count for every gate but latency.
    starved_windows: int = 0
    starved_devices: frozenset[str] = frozenset()
    cpu_wait_median: float | None = None  # the windows' median CPU wait share (None: not reported)

    @classmethod
    def collect(
        cls, windows: Iterable[tuple[str, Mapping[str, Any], Mapping[str, Any] | None]],
        events: Iterable[tuple[str, str, str]] = (),
    ) -> Evidence:
        """``windows``: (device, canary dict, the stable ModelWindow's ``latency_ms`` or None);
        ``events``: (device, event type, reason) of ``canary_dropped`` / ``preflight_failed``."""
        n = req = err = skip = comp = agr = lw = starved = 0
        starved_devices: set[str] = set()
        dist = cp95 = sp95 = 0.0
        devices: set[str] = set()
        classes: dict[str, int] = {}
        stable_classes: dict[str, int] = {}
        pairs: list[tuple[float, float]] = []
        logs: list[float] = []
        waits: list[float] = []
        batches = 0
        failures: list[tuple[str, str, str]] = []
        for device, c, stable_latency in windows:
            n += 1
            devices.add(device)
            r = _count(c.get("requests"))
            req += r
            err += _count(c.get("errors"))
            skip += _count(c.get("skipped"))
            comp += _count(c.get("compared"))
            agr += _count(c.get("agreed"))
            dist += _number(c.get("output_distance_sum"))
            cand = _p95(c.get("latency_ms"))
            stab = _p95(c.get("stable_latency_ms")) or _p95(stable_latency)
            wait = _finite(c.get("cpu_wait_share"))
            if wait is not None and 0 <= wait <= 1:
                waits.append(wait)
            is_starved = c.get("starved") is True
            if is_starved:
                starved += 1
                starved_devices.add(device)
            elif r > 0 and cand is not None and stab is not None:
                cp95 += cand * r
                sp95 += stab * r
                lw += r
                if cand > 0 and stab > 0:
                    pairs.append((cand, stab))
            paired = c.get("paired")
            if not is_starved and isinstance(paired, Mapping):
                m, k = _finite(paired.get("median_log_ratio")), _count(paired.get("batches"))
                if k and m is not None:
                    logs.append(m)
                    batches += k
            outs = c.get("outputs")
            for k, v in ((outs.get("classes") if isinstance(outs, Mapping) else None) or {}).items():
                classes[str(k)] = classes.get(str(k), 0) + _count(v)
            theirs = c.get("stable_outputs")
            for k, v in (theirs if isinstance(theirs, Mapping) else {}).items():
                stable_classes[str(k)] = stable_classes.get(str(k), 0) + _count(v)
            if c.get("state") in FAILURE_STATES:
                failures.append((device, f"canary_{c['state']}" if c["state"] == "dropped" else str(c["state"]),
                                 str(c.get("reason") or "")))
        for device, kind, reason in events:
            if kind in FAILURE_EVENTS:
                failures.append((device, kind, reason))
        # a device reporting the same drop in telemetry and as an event counts once
        uniq = tuple(sorted(set(failures)))
        return cls(windows=n, devices=frozenset(devices), requests=req, errors=err, skipped=skip,
                   compared=comp, agreed=agr, distance_sum=dist, cand_p95_sum=cp95, stable_p95_sum=sp95,
                   latency_weight=lw, latency_pairs=tuple(pairs), latency_logs=tuple(logs),
                   paired_batches=batches, classes=classes,
                   stable_classes=stable_classes, failures=uniq, starved_windows=starved,
                   starved_devices=frozenset(starved_devices),
                   cpu_wait_median=statistics.median(waits) if waits else None)

    @property
    def failed_devices(self) -> frozenset[str]:
        return frozenset(d for d, _, _ in self.failures)

    def to_dict(self) -> dict[str, Any]:
        return {
            "windows": self.windows, "devices": len(self.devices), "requests": self.requests,
            "errors": self.errors, "skipped": self.skipped, "compared": self.compared, "agreed": self.agreed,
            "mean_output_distance": round(self.distance_sum / self.compared, 6) if self.compared else None,
            "candidate_p95_ms": round(self.cand_p95_sum / self.latency_weight, 4) if self.latency_weight else None,
            "stable_p95_ms": round(self.stable_p95_sum / self.latency_weight, 4) if self.latency_weight else None,
            "classes": dict(self.classes),
            "stable_classes": dict(self.stable_classes),
            "latency_windows": len(self.latency_logs) or len(self.latency_pairs),
            "paired_batches": self.paired_batches,
            "starved_windows": self.starved_windows,
            "starved_devices": sorted(self.starved_devices),
            "cpu_wait_median": self.cpu_wait_median,
            "failures": [{"device": d, "kind": k, "reason": r} for d, k, r in self.failures],
        }


def _count(v: object) -> int:
    return int(v) if isinstance(v, int | float) and not isinstance(v, bool) and v > 0 else 0


def _finite(v: object) -> float | None:
    """``v`` as a float if it is a finite JSON number (not a bool), else ``None``."""
    return float(v) if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) else None


def _number(v: object) -> float:
    return _finite(v) or 0.0


def _p95(lat: object) -> float | None:
    v = _finite(lat.get("p95")) if isinstance(lat, Mapping) else None
    return v if v is not None and v >= 0 else None


# -- decisions -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class GateResult:
    name: str
    value: float | None  # None: not measurable in this mode / without a reference (passes, noted)
    threshold: float
    passed: bool
    dry_run: bool
    detail: str
    # False: the evidence is compatible with both pass and fail at the gate's confidence; the step
    # waits for more (and pauses at its deadline) rather than promote on a point estimate.
    conclusive: bool = True
    more_windows: int = 0  # an inconclusive gate's estimate of the windows it still needs
    # True: the evidence is clear but not the gate's to judge (agreement on drifted inputs): the
    # step pauses now for an operator, neither promoted nor rolled back.
    held: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "value": None if self.value is None else round(self.value, 6),
                "threshold": self.threshold, "passed": self.passed, "dry_run": self.dry_run,
                "detail": self.detail, "conclusive": self.conclusive, "more_windows": self.more_windows,
                "held": self.held}


@dataclass(frozen=True)
class Decision:
    """``outcome`` is what is enforced; ``would`` what it would be with every gate enforced."""

    outcome: str  # promote | rollback | pause | wait
    would: str
    reason: str
    gates: tuple[GateResult, ...] = ()
    evidence: Mapping[str, Any] = field(default_factory=dict)
    # While waiting: what more the step needs, and when that is expected at the step's rate so far.
    needs: Mapping[str, float] = field(default_factory=dict)
    eta_seconds: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"outcome": self.outcome, "would": self.would, "reason": self.reason,
                "gates": [g.to_dict() for g in self.gates], "evidence": dict(self.evidence),
                "needs": dict(self.needs), "eta_seconds": self.eta_seconds}


def _n(x: float) -> str:
    return f"{x:,.0f}" if float(x).is_integer() else f"{x:,.4g}"


def gate_results(r: Rollout, ev: Evidence, reference_classes: Mapping[str, float] | None,
                 input_drift: Mapping[str, float] | None = None) -> tuple[GateResult, ...]:
    """``input_drift``: the features whose PSI against the stable's training reference, over the
    stable's inputs in this step's windows, is at the drift alarm level (name -> PSI)."""
    p = r.policy
    devs = f"{len(ev.devices)} device{'s' if len(ev.devices) != 1 else ''}"

    def gate(name: str, value: float | None, passed: bool, detail: str, conclusive: bool = True,
             more_windows: int = 0, held: bool = False) -> GateResult:
        return GateResult(name, value, p.threshold(name), passed, name in p.dry_run, detail, conclusive,
                          more_windows, held)

    out = []
    nf = len(ev.failed_devices)
    what = ", ".join(sorted({f"{d}: {k}{' (' + rs + ')' if rs else ''}" for d, k, rs in ev.failures})[:5])
    out.append(gate("failures", float(nf), nf <= p.max_failures,
                    f"{nf} cohort device(s) dropped the candidate (max {p.max_failures})" + (f": {what}" if what else "")))
    out.append(_error_gate(gate, ev, p.max_error_rate, devs))
    if ev.latency_weight and ev.stable_p95_sum > 0:
        out.append(_latency_gate(gate, ev, p.max_latency_p95_ratio, devs, p.latency_tolerance_ms))
    elif ev.starved_windows:
        who = ", ".join(sorted(ev.starved_devices)[:5])
        out.append(gate("latency_p95_ratio", None, True,
                        f"latency not judged: all {ev.starved_windows} windows with timings came from CPU-starved "
                        f"devices ({who}: other work kept their threads waiting for a CPU), which says nothing "
                        "about the model", conclusive=False))
    else:
        out.append(gate("latency_p95_ratio", None, True, "no latency measured on both versions yet"))
    if r.mode == "shadow" and ev.compared:
        out.append(_agreement_gate(gate, ev, p.min_agreement, devs, p.min_agreement_drifted, input_drift or {}))
    else:
        why = "split mode compares no pairs" if r.mode == "split" else "no compared pairs"
        out.append(gate("agreement", None, r.mode == "split", why))
    against_ref = None
    if reference_classes and ev.classes:
        labels = sorted(set(reference_classes) | set(ev.classes))
        against_ref = psi([float(reference_classes.get(k, 0.0)) for k in labels],
                          [float(ev.classes.get(k, 0)) for k in labels])
    if ev.stable_classes and ev.classes:
        # Judged against the stable's outputs over the same windows and inputs: drifted inputs
        # shift both alike, so they are no reason to blame the candidate (issue 15). The PSI
        # against the training reference stays in the detail, as information.
        ref_note = f"; vs the reference {against_ref:.3f}, information only" if against_ref is not None else ""
        out.append(_output_gate(gate, ev, p.max_output_drift, ref_note))
    elif against_ref is not None:
        score = against_ref
        ok = score <= p.max_output_drift
        out.append(gate("output_drift", score, ok,
                        f"output drift PSI {score:.3f} {'<=' if ok else '>'} max {p.max_output_drift} over "
                        f"{_n(sum(ev.classes.values()))} candidate outputs vs the reference (the stable reported "
                        "no outputs to compare with)"))
    else:
        why = "no reference output distribution for the version" if not reference_classes else "no candidate outputs reported"
        out.append(gate("output_drift", None, True, why))
    return tuple(out)


# Two-sided 99 % quantiles of Student's t by degrees of freedom (1-30), then by 1/df to the normal.
_T99 = (63.657, 9.925, 5.841, 4.604, 4.032, 3.707, 3.499, 3.355, 3.250, 3.169, 3.106, 3.055, 3.012, 2.977,
        2.947, 2.921, 2.898, 2.878, 2.861, 2.845, 2.831, 2.819, 2.807, 2.797, 2.787, 2.779, 2.771, 2.763,
        2.756, 2.750)


def t99(df: int) -> float:
    if df < 1:
        return math.inf
    if df <= len(_T99):
        return _T99[df - 1]
    return 2.576 + (2.750 - 2.576) * 30 / df  # within 0.01 of the table's 40, 60 and 120


@dataclass(frozen=True)
class RatioBounds:
    """Geometric mean of candidate/stable over ``windows`` paired windows, its 99 % bounds and the
    spread (standard deviation) of the per-window log ratios."""

    ratio: float
    lower: float
    upper: float
    windows: int
    spread: float

    def windows_to_decide(self, limit: float) -> int:
        """About how many more windows make the bounds clear ``limit`` at this spread (0: none can,
        the estimate sits on the limit, or too few windows to know the spread)."""
        gap = abs(math.log(self.ratio) - math.log(limit))
        if self.windows < 2 or gap == 0:
            return 0
        return max(1, math.ceil((2.576 * self.spread / gap) ** 2) - self.windows)


def ratio_bounds(pairs: Sequence[tuple[float, float]]) -> RatioBounds:
    """Geometric mean of candidate/stable over windows, and its 99 % bounds (t interval on the
    log ratios: each window is one paired measurement, and logs make 2x and 0.5x symmetric)."""
    return log_ratio_bounds([math.log(c / s) for c, s in pairs])


def log_ratio_bounds(logs: Sequence[float]) -> RatioBounds:
    """:func:`ratio_bounds` of per-window log ratios."""
    k = len(logs)
    mean = sum(logs) / k
    if k < 2:
        return RatioBounds(math.exp(mean), 0.0, math.inf, k, math.nan)
    sd = math.sqrt(sum((x - mean) ** 2 for x in logs) / (k - 1))
    half = t99(k - 1) * sd / math.sqrt(k)
    return RatioBounds(math.exp(mean), math.exp(mean - half), math.exp(mean + half), k, sd)


def _more_windows(ev: Evidence, half: float, gap: float) -> int:
    """Windows still needed for a bound of half-width ``half`` (which shrinks as 1/sqrt(n)) to
    clear a limit ``gap`` away from the estimate (0 when the estimate sits on the limit)."""
    if gap <= 0 or not math.isfinite(half) or ev.windows == 0:
        return 0
    return max(1, math.ceil(ev.windows * ((half / gap) ** 2 - 1)))


def _error_gate(gate: Callable[..., GateResult], ev: Evidence, most: float, devs: str) -> GateResult:
    """Roll back when the error rate's lower 99 % Wilson bound is above the maximum (proof of a
    broken candidate); pass while the rate itself is at or below it (a candidate without errors
    need not prove < 1 %, which takes ~650 error-free requests); in between, wait for more."""
    rate = ev.errors / ev.requests if ev.requests else 0.0
    lo, hi = wilson_bounds(ev.errors, ev.requests)
    where = f"over {_n(ev.requests)} candidate requests on {devs}"
    if ev.requests and lo > most:
        return gate("error_rate", rate, False, f"error rate {rate:.4f} > max {most} (99 % bounds "
                    f"{lo:.4f}-{hi:.4f}) {where}")
    if rate <= most:
        return gate("error_rate", rate, True, f"error rate {rate:.4f} <= max {most} {where}")
    more = _more_windows(ev, Z99 * math.sqrt(rate * (1 - rate) / ev.requests), rate - most)
    return gate("error_rate", rate, True, f"error rate {rate:.4f} vs max {most} is inconclusive (99 % bounds "
                f"{lo:.4f}-{hi:.4f}) {where}", conclusive=False, more_windows=more)


def _agreement_gate(gate: Callable[..., GateResult], ev: Evidence, least: float, devs: str,
                    floor: float, input_drift: Mapping[str, float]) -> GateResult:
    """Roll back only when the agreement's upper 99 % Wilson bound is below the minimum; pass
    only when its lower bound is at or above it; in between, wait for more pairs.

    On drifted inputs (``input_drift`` names features) a proof below the minimum is a rollback
    only below ``floor``: off the training distribution two models of the same quality disagree
    more, so agreement with the stable is no measure of the candidate there; the gate is held and
    the step pauses at once for an operator (who has labels) to decide."""
    agree = ev.agreed / ev.compared
    lo, hi = wilson_bounds(ev.agreed, ev.compared)
    where = f"(99 % bounds {lo:.3f}-{hi:.3f} over {_n(ev.compared)} compared pairs on {devs})"
    if hi < least and input_drift and hi >= floor:
        moved = ", ".join(f"{k} PSI {v:.2f}" for k, v in sorted(input_drift.items(), key=lambda kv: -kv[1])[:3])
        return gate("agreement", agree, True,
                    f"agreement {agree:.3f} < min {least} {where}, but on drifted inputs ({moved} against "
                    f"the stable's reference), where disagreeing with the stable proves nothing about the "
                    f"candidate; not below the floor min_agreement_drifted {floor}: left to an operator",
                    held=True)
    if hi < least:
        floor_note = f" (and below the drifted-input floor {floor})" if input_drift else ""
        return gate("agreement", agree, False, f"agreement {agree:.3f} < min {least}{floor_note} {where}")
    if lo >= least:
        return gate("agreement", agree, True, f"agreement {agree:.3f} >= min {least} {where}")
    more = _more_windows(ev, Z99 * math.sqrt(max(agree * (1 - agree), 1e-6) / ev.compared), abs(agree - least))
    hint = f"; about {more} more windows at this rate" if more else ""
    return gate("agreement", agree, True, f"agreement {agree:.3f} vs min {least} is inconclusive {where}{hint}",
                conclusive=False, more_windows=more)


def _output_gate(gate: Callable[..., GateResult], ev: Evidence, limit: float, ref_note: str) -> GateResult:
    """PSI of the candidate's classes against the stable's in the same windows, with 99 %
    bootstrap bounds: roll back only when the lower bound is above the limit, pass only when the
    upper bound is at or below it."""
    labels = sorted(set(ev.stable_classes) | set(ev.classes))
    stable = [float(ev.stable_classes.get(k, 0)) for k in labels]
    cand = [float(ev.classes.get(k, 0)) for k in labels]
    score = psi(stable, cand)
    lo, hi = psi_bounds(stable, cand)
    where = (f"({_n(sum(cand))} candidate outputs vs {_n(sum(stable))} of the stable in the same windows; "
             f"99 % bounds {lo:.3f}-{hi:.3f}{ref_note})")
    if lo > limit:
        return gate("output_drift", score, False, f"output PSI {score:.3f} > max {limit} {where}")
    if hi <= limit:
        return gate("output_drift", score, True, f"output PSI {score:.3f} <= max {limit} {where}")
    more = _more_windows(ev, (hi - lo) / 2, abs(score - limit))
    hint = f"; about {more} more windows" if more else ""
    return gate("output_drift", score, True, f"output PSI {score:.3f} vs max {limit} is inconclusive {where}{hint}",
                conclusive=False, more_windows=more)


def _latency_gate(gate: Callable[..., GateResult], ev: Evidence, limit: float, devs: str,
                  tolerance_ms: float = 0.0) -> GateResult:
    """Roll back only when the ratio's lower 99 % bound is above the limit; pass only when its upper
    bound is at or below it; between the two, wait for more windows (and say how many).

    Unpaired evidence (per-window p95s of different requests: split mode, or agents without paired
    replays) also passes when the slowdown it estimates, stable p95 x (ratio - 1), is at most
    ``tolerance_ms``: there a colder second session and the scheduler move sub-millisecond p95s by
    tens of µs. Paired replays time both versions on the same batch and are judged on the ratio
    alone (a graph 3.7x slower at 26 µs is still 3.7x slower)."""
    cand, stab = ev.cand_p95_sum / ev.latency_weight, ev.stable_p95_sum / ev.latency_weight

    def tolerated(ratio: float) -> GateResult | None:
        excess = stab * (ratio - 1)
        if ev.latency_logs or ratio <= limit or excess > tolerance_ms:
            return None
        return gate("latency_p95_ratio", ratio, True, f"latency p95 ratio {ratio:.2f} > max {limit}, but that is "
                    f"{excess:.3f} ms on a stable p95 of {stab:.3f} ms (candidate {cand:.3f} ms), within "
                    f"latency_tolerance_ms = {tolerance_ms}: not a slowdown an application can feel "
                    f"({_n(ev.latency_weight)} requests on {devs})")
    pairs = ev.latency_pairs
    if ev.latency_logs:
        b = log_ratio_bounds(ev.latency_logs)
        how = f"paired replays, {_n(ev.paired_batches)} batches"
    elif pairs:
        b = ratio_bounds(pairs)
        how = "per-window p95"
    else:  # windows without usable per-window pairs: the weighted point estimate alone
        ratio = cand / stab
        if (t := tolerated(ratio)) is not None:
            return t
        ok = ratio <= limit
        return gate("latency_p95_ratio", ratio, ok, f"latency p95 ratio {ratio:.2f} {'<=' if ok else '>'} max "
                    f"{limit} (candidate {cand:.3f} ms vs stable {stab:.3f} ms) over {_n(ev.latency_weight)} "
                    f"requests on {devs}")
    span = f"99 % bounds {b.lower:.2f}-{b.upper:.2f}" if math.isfinite(b.upper) else "bounds need 2 windows"
    left_out = (f"; {ev.starved_windows} windows from CPU-starved devices left out" if ev.starved_windows
                else "")
    where = (f"(p95 candidate {cand:.3f} ms vs stable {stab:.3f} ms; {how}; {span} over {b.windows} windows, "
             f"{_n(ev.latency_weight)} requests on {devs}{left_out})")
    if (t := tolerated(b.ratio)) is not None:
        return t
    if b.lower > limit:
        return gate("latency_p95_ratio", b.ratio, False, f"latency p95 ratio {b.ratio:.2f} > max {limit} {where}")
    if b.upper <= limit:
        return gate("latency_p95_ratio", b.ratio, True, f"latency p95 ratio {b.ratio:.2f} <= max {limit} {where}")
    more = b.windows_to_decide(limit)
    hint = f"; about {more} more windows at this spread" if more else ""
    return gate("latency_p95_ratio", b.ratio, True, f"latency p95 ratio {b.ratio:.2f} vs max {limit} is "
                f"inconclusive {where}{hint}", conclusive=False, more_windows=more)


def time_to_decision(r: Rollout, ev: Evidence, now: float, gates: Sequence[GateResult]) -> tuple[dict[str, float], float | None]:
    """What the current step still needs (inferences, device-windows, compared pairs, windows an
    inconclusive gate asks for) and the seconds that takes at the rate seen since the step began
    (``None`` while some need has no rate yet)."""
    p = r.policy
    age = max(0.0, now - r.step_started_at)
    needs: dict[str, float] = {}
    if ev.requests < p.min_inferences:
        needs["inferences"] = p.min_inferences - ev.requests
    windows = max([p.min_device_windows - ev.windows, *(g.more_windows for g in gates if not g.conclusive)],
                  default=0)
    if windows > 0:
        needs["windows"] = windows
    if r.mode == "shadow" and ev.compared == 0:
        needs["compared"] = 1
    seen = {"inferences": ev.requests, "windows": ev.windows}
    timed = [k for k in needs if k in seen]
    if age <= 0 or not timed or len(timed) < len(needs) or not all(seen[k] for k in timed):
        return needs, None
    return needs, max(needs[k] / (seen[k] / age) for k in timed)


def _eta_text(eta: float | None) -> str:
    if eta is None:
        return ""
    return f"; expected in about {eta / 60:.0f} min at this step's rate" if eta >= 90 else \
        f"; expected in about {eta:.0f} s at this step's rate"


def evaluate(r: Rollout, ev: Evidence, now: float, reference_classes: Mapping[str, float] | None = None,
             input_drift: Mapping[str, float] | None = None) -> Decision:
    """Judge the current step of a running rollout on ``ev`` at time ``now`` (``input_drift``:
    see :func:`gate_results`)."""
    evd = ev.to_dict()
    if input_drift:
        evd["input_drift"] = {k: round(v, 4) for k, v in sorted(input_drift.items())}
    p = r.policy
    gates = gate_results(r, ev, reference_classes, input_drift)
    if r.state != "running":
        return Decision("wait", "wait", f"rollout is {r.state}", gates, evd)
    failed = [g for g in gates if not g.passed and g.value is not None]
    age = now - r.step_started_at
    enough = (ev.requests >= p.min_inferences and ev.windows >= p.min_device_windows
              and (r.mode != "shadow" or ev.compared > 0))
    # A dropped candidate needs no quorum; the other gates judge only on enough evidence.
    judged = failed if enough else [g for g in failed if g.name == "failures"]
    enforced = [g for g in judged if not g.dry_run]
    if enforced:
        return Decision("rollback", "rollback", "; ".join(g.detail for g in enforced), gates, evd)
    note = f"; dry-run, not enforced: would roll back ({'; '.join(g.detail for g in judged)})" if judged else ""
    would = "rollback" if judged else None
    if not enough:
        short = (f"{_n(ev.requests)} of min {_n(p.min_inferences)} inferences"
                 f"{' (' + _n(ev.compared) + ' compared)' if r.mode == 'shadow' else ''} and {ev.windows} of min "
                 f"{p.min_device_windows} device-windows from {len(ev.devices)} of {len(r.members)} cohort devices")
        if age >= p.step_deadline_seconds:
            return Decision("pause", would or "pause", f"not enough evidence by the step deadline ({age:.0f}s >= "
                            f"{p.step_deadline_seconds:.0f}s): {short}{note}", gates, evd)
        needs, eta = time_to_decision(r, ev, now, gates)
        return Decision("wait", would or "wait", f"gathering evidence: {short}{_eta_text(eta)}{note}", gates, evd,
                        needs, eta)
    held = [g for g in gates if g.held and not g.dry_run]
    if held:
        return Decision("pause", would or "pause", "; ".join(g.detail for g in held) + note, gates, evd)
    open_ = [g for g in gates if not g.conclusive and not g.dry_run]
    if open_:
        why = "; ".join(g.detail for g in open_)
        if age >= p.step_deadline_seconds:
            return Decision("pause", would or "pause", f"no conclusive evidence by the step deadline ({age:.0f}s >= "
                            f"{p.step_deadline_seconds:.0f}s): {why}{note}", gates, evd)
        needs, eta = time_to_decision(r, ev, now, gates)
        return Decision("wait", would or "wait", f"gathering evidence: {why}{_eta_text(eta)}{note}", gates, evd,
                        needs, eta)
    if age < p.min_step_seconds:
        return Decision("wait", would or "wait", f"gates pass; the step soaks {p.min_step_seconds:.0f}s, "
                        f"{age:.0f}s so far{note}", gates, evd, {"seconds": p.min_step_seconds - age},
                        p.min_step_seconds - age)
    nxt = f"step {r.step + 2} ({r.steps[r.step + 1]} %)" if r.step + 1 < len(r.steps) else "all targets"
    passed = "; ".join(g.detail for g in gates if g.value is not None and g.passed)
    return Decision("promote", would or "promote",
                    f"gates pass at {r.percent} % ({passed}); promote to {nxt}{note}", gates, evd)


# -- transitions ---------------------------------------------------------------------------------


def _need(r: Rollout, states: Sequence[str], action: str) -> None:
    if r.state not in states:
        raise RolloutError(f"cannot {action} rollout {r.id} ({r.model} {r.from_version} -> {r.to_version}): "
                           f"it is {r.state}; {action} needs it {' or '.join(states)}")


def advance(r: Rollout, now: float, reason: str = "") -> Rollout:
    """Promote to the next step (new cohort, step clock restarts) or, after the last, to ``promoted``."""
    _need(r, ("running",), "promote")
    if r.step + 1 >= len(r.steps):
        return replace(r, state="promoted", members=frozenset(r.targets), reason=reason)
    return replace(r, step=r.step + 1, step_started_at=now, reason=reason).with_cohort()


def promote_now(r: Rollout, now: float, reason: str = "") -> Rollout:
    """Human promotion: straight to ``promoted`` (every target runs the to-version)."""
    _need(r, ACTIVE, "promote")
    return replace(r, state="promoted", step=len(r.steps) - 1, members=frozenset(r.targets), reason=reason)


def pause(r: Rollout, now: float, reason: str = "") -> Rollout:
    _need(r, ("running",), "pause")
    return replace(r, state="paused", reason=reason)


def resume(r: Rollout, now: float, reason: str = "") -> Rollout:
    """Resume a paused rollout; the step's deadline starts again."""
    _need(r, ("paused",), "resume")
    return replace(r, state="running", step_started_at=now, reason=reason)


def rollback(r: Rollout, now: float, reason: str = "") -> Rollout:
    _need(r, (*ACTIVE, "promoted"), "roll back")
    return replace(r, state="rolled_back", reason=reason)


def abort(r: Rollout, now: float, reason: str = "") -> Rollout:
    _need(r, ACTIVE, "abort")
    return replace(r, state="aborted", reason=reason)


def apply(r: Rollout, d: Decision, now: float) -> Rollout:
    """The transition a gate decision asks for (``wait`` leaves the rollout as it is)."""
    if d.outcome == "promote":
        return advance(r, now, d.reason)
    if d.outcome == "rollback":
        return rollback(r, now, d.reason)
    if d.outcome == "pause":
        return pause(r, now, d.reason)
    return r
