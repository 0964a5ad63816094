"""Whole rollouts in memory: the hub's rollout core and dozens of agent cores, injected clock, no
broker. Agent cores run REAL ONNX Runtime sessions of models trained here and report the
contract's canary dicts; the hub core sums them into evidence, decides, and moves the rollout.

Models (scikit-learn random forests, converted with skl2onnx): ``stable``; ``good`` (same recipe,
another seed); ``bad`` (trained on shuffled labels); ``slow`` (far more and deeper trees).

The agent cores use the agent's own canary accumulator, ``agent.core.canary.CanaryStats``.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import onnxruntime as ort
import pytest
from sklearn.datasets import make_classification
from sklearn.ensemble import RandomForestClassifier

from edgefleet.agent.core.canary import CanaryStats
from edgefleet.hub.adapters.modelfile import sklearn_to_onnx
from edgefleet.hub.core.rollout import Decision, Evidence, Policy, Rollout, apply, evaluate

# -- models trained here -------------------------------------------------------------------------

N_FEATURES = 6


@dataclass(frozen=True)
class Models:
    x: npt.NDArray[np.float32]
    sessions: Mapping[str, ort.InferenceSession]
    reference_classes: Mapping[str, float]


@pytest.fixture(scope="module")
def models() -> Models:
    x, y = make_classification(n_samples=1500, n_features=N_FEATURES, n_informative=4, n_redundant=0,
                               n_classes=3, class_sep=2.0, random_state=0)
    x = x.astype(np.float32)

    def rf(n: int, depth: int | None, seed: int, labels: npt.NDArray[Any] = y) -> bytes:
        est = RandomForestClassifier(n_estimators=n, max_depth=depth, random_state=seed).fit(x, labels)
        return sklearn_to_onnx(est, N_FEATURES)

    onnx_models = {"stable": rf(20, 8, 0), "good": rf(20, 8, 1),
                   "bad": rf(20, 8, 0, np.random.default_rng(0).permutation(y)), "slow": rf(400, None, 0)}
    sessions = {k: ort.InferenceSession(m, providers=["CPUExecutionProvider"]) for k, m in onnx_models.items()}
    labels = sessions["stable"].run(None, {"input": x})[0]
    values, counts = np.unique(labels, return_counts=True)
    ref = {str(int(v)): float(c) / len(labels) for v, c in zip(values, counts, strict=True)}
    return Models(x=x, sessions=sessions, reference_classes=ref)


# -- the in-memory fleet -------------------------------------------------------------------------

PROFILES = ("pi4", "jetson", "x86")


class AgentCore:
    """One device: serves the stable session, shadows the candidate when its cohort says so."""

    def __init__(self, device: str, models: Models, seed: int) -> None:
        self.device = device
        self.models = models
        self.rng = np.random.default_rng(seed)
        self.stats: Any = None
        self.online = True

    def window(self, runs: str, rollout: Rollout, candidate: str, requests: int = 40) -> dict[str, Any] | None:
        """Serve ``requests`` live requests; return the window's canary dict (or None)."""
        if runs != "candidate" or not self.online:
            self.stats = None
            return None
        if self.stats is None or self.stats.rollout != rollout.id:
            self.stats = CanaryStats(rollout=rollout.id, mode=rollout.mode, version=rollout.to_version)
        stable, cand = self.models.sessions["stable"], self.models.sessions[candidate]
        for _ in range(requests):
            idx = self.rng.integers(0, len(self.models.x), size=8)
            batch = {"input": self.models.x[idx]}
            t0 = time.perf_counter()
            s_out = dict(zip(("label", "probabilities"), stable.run(None, batch), strict=True))
            t1 = time.perf_counter()
            if self.rng.random() >= rollout.fraction:
                continue
            c_out = dict(zip(("label", "probabilities"), cand.run(None, batch), strict=True))
            t2 = time.perf_counter()
            self.stats.record_pair(s_out, c_out, (t1 - t0) * 1000, (t2 - t1) * 1000)
        return self.stats.window()


class Fleet:
    """Hub rollout core + agent cores; ``audit`` collects every acted (or dry-run) decision."""

    def __init__(self, models: Models, n: int = 30, **policy: Any) -> None:
        self.now = 1000.0
        self.models = models
        self.agents = {f"dev-{i:02d}": AgentCore(f"dev-{i:02d}", models, i) for i in range(n)}
        profiles = {d: PROFILES[i % 3] for i, d in enumerate(self.agents)}
        pol = Policy.from_dict({"min_inferences": 200, "min_device_windows": 3, "min_agreement": 0.9,
                                "max_latency_p95_ratio": 3.0, "step_deadline_seconds": 300, **policy})
        self.rollout = Rollout.start(id="r-1", model="clf", from_version="1", to_version="2", targets=profiles,
                                     now=self.now, steps=(10, 50, 100), fraction=1.0, policy=pol)
        self.audit: list[dict[str, Any]] = []
        self.windows: list[tuple[int, str, dict[str, Any]]] = []
        self.history: list[tuple[int, int]] = [(self.rollout.step, len(self.rollout.members))]

    def tick(self, candidate: str) -> Decision:
        """Every device serves one 10 s window; the hub ingests and evaluates."""
        self.now += 10
        r = self.rollout
        for device, agent in self.agents.items():
            c = agent.window(r.runs(device), r, candidate)
            if c is not None and c["rollout"] == r.id and device in r.members:
                self.windows.append((r.step, device, c))
        ev = Evidence.collect([(d, c, None) for step, d, c in self.windows if step == r.step])
        d = evaluate(r, ev, self.now, self.models.reference_classes)
        if d.outcome != "wait" or d.would == "rollback":
            self.audit.append({"time": self.now, "actor": "rollout-gate", "rollout": r.id, "step": r.step + 1,
                               **d.to_dict()})
        self.rollout = apply(r, d, self.now)
        if self.rollout.step != r.step:
            self.history.append((self.rollout.step, len(self.rollout.members)))
        return d

    def run(self, candidate: str, ticks: int = 40) -> Rollout:
        for _ in range(ticks):
            self.tick(candidate)
            if self.rollout.state != "running":
                break
        return self.rollout


def gates(entry: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    return {g["name"]: g for g in entry["gates"]}


def test_good_version_promotes_step_by_step_to_every_device(models: Models) -> None:
    fleet = Fleet(models)
    r = fleet.run("good")
    assert r.state == "promoted", fleet.audit[-1:]
    assert fleet.history == [(0, 3), (1, 15), (2, 30)]  # 10 % spans all 3 profiles, cohorts nested
    assert all(r.runs(d) == "promoted" for d in fleet.agents)
    assert [e["outcome"] for e in fleet.audit] == ["promote", "promote", "promote"]
    for entry in fleet.audit:
        g = gates(entry)
        assert g["agreement"]["value"] >= 0.9 and g["agreement"]["threshold"] == 0.9
        assert g["latency_p95_ratio"]["value"] < 3.0 and g["output_drift"]["value"] < 0.25
        assert entry["evidence"]["requests"] >= 200


def test_shuffled_labels_are_rolled_back_at_the_first_step_on_agreement(models: Models) -> None:
    fleet = Fleet(models)
    r = fleet.run("bad")
    assert r.state == "rolled_back" and r.step == 0
    assert all(r.runs(d) == "stable" for d in fleet.agents)
    (entry,) = fleet.audit
    assert entry["outcome"] == "rollback" and "agreement" in entry["reason"]
    g = gates(entry)["agreement"]
    assert g["value"] < 0.6 and g["threshold"] == 0.9 and g["passed"] is False
    assert "compared pairs on 3 devices" in entry["reason"]


def test_slow_version_is_rolled_back_on_latency(models: Models) -> None:
    fleet = Fleet(models)
    r = fleet.run("slow")
    assert r.state == "rolled_back" and r.step == 0
    (entry,) = fleet.audit
    g = gates(entry)["latency_p95_ratio"]
    assert g["passed"] is False and g["value"] > 3.0, entry["reason"]
    assert "latency p95 ratio" in entry["reason"] and gates(entry)["agreement"]["passed"] is True


def test_missing_telemetry_pauses_with_a_reason_at_the_deadline(models: Models) -> None:
    fleet = Fleet(models)
    for device in fleet.rollout.members:
        fleet.agents[device].online = False
    r = fleet.run("good")
    assert r.state == "paused" and fleet.now - 1000.0 >= 300
    (entry,) = fleet.audit
    assert entry["outcome"] == "pause"
    assert "not enough evidence by the step deadline" in entry["reason"]
    assert "0 of min 200 inferences" in entry["reason"] and "0 of 3 cohort devices" in entry["reason"]


def test_dry_run_gate_logs_and_does_not_act(models: Models) -> None:
    fleet = Fleet(models, dry_run=["agreement"])
    d = fleet.tick("bad")
    while d.outcome == "wait":
        d = fleet.tick("bad")
    assert d.outcome == "promote" and d.would == "rollback"
    assert fleet.rollout.state == "running" and fleet.rollout.step == 1
    entry = fleet.audit[-1]
    g = gates(entry)["agreement"]
    assert g["dry_run"] is True and g["passed"] is False and g["value"] < 0.6
    assert "dry-run, not enforced: would roll back (agreement" in entry["reason"]
