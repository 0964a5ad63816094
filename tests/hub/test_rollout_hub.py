"""Rollouts in the hub daemon: real SQLite, real signing, real admin HTTP API and CLI; no broker
(the daemon object runs without its MQTT link, telemetry goes through its ingest path)."""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from edgefleet.agent.contract.envelope import open_envelope
from edgefleet.agent.contract.wire import DesiredState, Event, ModelWindow, TelemetryWindow
from edgefleet.hub.adapters.api import HubHttpServer
from edgefleet.hub.adapters.home import HubHome
from edgefleet.hub.daemon import Hub
from edgefleet.hub.errors import BadRequest, Conflict, NotFound
from tests.conftest import run_cli, use_db
from tests.simulator import tiny_model

LAT = {"p50": 1.0, "p95": 1.0, "p99": 1.0, "max": 1.0}


class Clock:
    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def hub(tmp_path: Path, db_target: str | Path) -> Iterator[tuple[Hub, Clock]]:
    home = HubHome(tmp_path / "hub")
    home.init(fleet="f", broker_url="mqtt://127.0.0.1:1", http_listen="127.0.0.1:0")
    use_db(home, db_target)
    (home.path / "rollout.toml").write_text(
        "evaluate_seconds = 0.2\n[policy]\nmin_inferences = 100\nmin_device_windows = 2\n"
        "step_deadline_seconds = 300\n")
    clock = Clock()
    h = Hub(home, clock=clock)
    h.controller.step()  # the only replica: the controller (a started hub elects itself)
    h.public_url = "http://hub.example"
    for version, scale in (("1", 1.0), ("2", 2.0)):
        h.publish({"name": "m", "version": version,
                   "model_b64": base64.b64encode(tiny_model(scale)).decode()}, "alice")
    for i in range(12):
        h.add_device({"device": f"d{i:02d}", "profile": "pi4" if i % 2 else "x86"}, "admin")
    h.deploy({"model": "m", "version": "1", "devices": [f"d{i:02d}" for i in range(11)]}, "alice")
    yield h, clock
    h.db.close()


def desired(h: Hub, device: str) -> DesiredState:
    row = h.db.query("SELECT envelope FROM desired WHERE device=?", (device,))[0]
    return DesiredState.from_dict(json.loads(open_envelope(row["envelope"]).payload))


def telemetry(h: Hub, device: str, seq: int, rollout: str, *, agreed: int, model_version: str = "1") -> None:
    canary = {"rollout": rollout, "mode": "shadow", "version": "2", "state": "running", "reason": None,
              "requests": 80, "errors": 0, "skipped": 0, "compared": 80, "agreed": agreed,
              "output_distance_sum": 3.0, "latency_ms": LAT, "stable_latency_ms": LAT}
    tw = TelemetryWindow(fleet="f", device=device, seq=seq, window_start=h.clock() - 10, window_end=h.clock(),
                         models={"m": ModelWindow(version=model_version, requests=100, errors=0, rows=100,
                                                  latency_ms=LAT, canary=canary)})
    h.ingest([(device, "telemetry", json.dumps(tw.to_dict()).encode())])


def test_rollout_cohort_gets_the_candidate_and_a_bad_one_is_rolled_back_everywhere(hub: tuple[Hub, Clock]) -> None:
    h, _ = hub
    seq0 = {f"d{i:02d}": desired(h, f"d{i:02d}").seq for i in range(11)}
    r = h.rollouts.start_rollout({"model": "m", "version": "2", "steps": [25, 100]}, "alice")
    members = set(r["members"])
    assert len(members) == 4 and {h.db.get_device(d)["profile"] for d in members} == {"pi4", "x86"}  # type: ignore[index]
    for i in range(11):
        d = f"d{i:02d}"
        entry = desired(h, d).models["m"]
        if d in members:
            assert (entry.version, entry.fallback) == ("2", "1")
            assert entry.canary is not None and entry.canary["rollout"] == r["id"]
            assert entry.canary["stable"]["version"] == "1" and entry.canary["mode"] == "shadow"
            assert desired(h, d).seq == seq0[d] + 1
        else:
            assert entry.version == "1" and entry.canary is None and desired(h, d).seq == seq0[d]
    with pytest.raises(Conflict, match="already running"):
        h.rollouts.start_rollout({"model": "m", "version": "2"}, "alice")

    # a device that gets the stable version during the rollout joins the targets
    h.deploy({"model": "m", "version": "1", "devices": ["d11"]}, "alice")
    joined = h.rollouts.get(r["id"])
    assert "d11" in joined.targets and joined.members == members | ({"d11"} & joined.members)
    assert desired(h, "d11").models["m"].version == ("2" if "d11" in joined.members else "1")

    # some cohort devices report shuffled-label agreement; one cohort device never reports
    silent = sorted(members)[-1]
    for d in sorted(members - {silent}):
        telemetry(h, d, 1, r["id"], agreed=30)
        telemetry(h, d, 2, "r-other", agreed=80)  # another rollout's canary: ignored
    (rid, decision), = h.rollouts.evaluate_all()
    assert decision.outcome == "rollback" and "agreement 0.375 < min 0.95 (99 % bounds" in decision.reason
    state = h.rollouts.get(rid)
    assert state.state == "rolled_back"
    for d in sorted(state.targets):
        ds = desired(h, d)
        assert ds.models["m"].version == "1" and ds.models["m"].canary is None, d
        assert ds.seq > seq0.get(d, 0) + (1 if d in members else 0), d
    assert desired(h, silent).seq == seq0[silent] + 2
    entry = [e for e in h.db.audit_entries() if e["action"] == "rollout_rollback"][-1]
    gates = {g["name"]: g for g in entry["details"]["gates"]}
    assert gates["agreement"]["value"] == pytest.approx(0.375) and gates["agreement"]["threshold"] == 0.95
    assert entry["actor"] == "rollout-gate" and entry["details"]["evidence"]["compared"] == 240
    assert set(entry["details"]["devices"]) == set(state.targets)
    assert h.db.verify_audit() == []


def test_promotion_through_the_steps_then_fleet_rollback(hub: tuple[Hub, Clock]) -> None:
    h, clock = hub
    r = h.rollouts.start_rollout({"model": "m", "version": "2", "steps": [25, 100]}, "alice")
    for d in r["members"]:
        telemetry(h, d, 1, r["id"], agreed=80)
    clock.now += 30
    (_, d1), = h.rollouts.evaluate_all()
    assert d1.outcome == "promote"
    ro = h.rollouts.get(r["id"])
    assert ro.step == 1 and len(ro.members) == 11
    assert desired(h, "d10").models["m"].canary is not None
    for d in sorted(ro.members):
        telemetry(h, d, 2, r["id"], agreed=80)
    h.rollouts.evaluate_all()
    assert h.rollouts.get(r["id"]).state == "promoted"
    for i in range(11):
        m = desired(h, f"d{i:02d}").models["m"]
        assert (m.version, m.fallback, m.canary) == ("2", "1", None)
    res = h.rollouts.fleet_rollback({"model": "m"}, "bob")
    assert set(res["devices"]) == {f"d{i:02d}" for i in range(11)} and res["rollout"] == r["id"]
    assert h.rollouts.get(r["id"]).state == "rolled_back"
    assert all(desired(h, f"d{i:02d}").models["m"].version == "1" for i in range(11))
    actions = [e["action"] for e in h.db.audit_entries()]
    assert actions[-4:] == ["rollout_start", "rollout_step", "rollout_promote", "rollback"]
    last = h.db.audit_entries()[-1]["details"]
    assert (last["model"], last["version"], len(last["devices"])) == ("m", "1", 11)


def test_failure_event_missing_evidence_and_human_actions(hub: tuple[Hub, Clock]) -> None:
    h, clock = hub
    r = h.rollouts.start_rollout({"model": "m", "version": "2", "steps": [50, 100]}, "alice")
    clock.now += 301
    (_, d), = h.rollouts.evaluate_all()
    assert d.outcome == "pause" and "not enough evidence by the step deadline" in d.reason
    assert h.rollouts.get(r["id"]).state == "paused"
    h.rollouts.act("resume", "m", "bob")
    member = r["members"][0]
    ev = Event(fleet="f", device=member, time=clock.now, type="canary_dropped", reason="nan_output",
               model="m", version="2", extra={"rollout": r["id"]})
    h.ingest([(member, "events", json.dumps(ev.to_dict()).encode())])
    (_, d), = h.rollouts.evaluate_all()
    assert d.outcome == "rollback" and f"{member}: canary_dropped (nan_output)" in d.reason
    with pytest.raises(BadRequest, match="it is rolled_back"):
        h.rollouts.act("pause", r["id"], "bob")
    with pytest.raises(NotFound, match="no version '9'"):
        h.rollouts.start_rollout({"model": "m", "version": "9"}, "alice")


def test_cli_over_the_admin_api(hub: tuple[Hub, Clock], tmp_path: Path) -> None:
    h, _ = hub
    http = HubHttpServer(h, "127.0.0.1", 0)
    http.start()
    try:
        url = f"http://127.0.0.1:{http.address[1]}"
        base = ("--home", str(h.home.path), "--hub", url)
        bad = tmp_path / "bad.toml"
        bad.write_text("min_agreement = 2\n")
        res = run_cli("edgefleet.hub.cli.main", "rollout", "start", "m", "2", "--policy", str(bad), *base, check=False)
        assert res.returncode == 2 and "min_agreement must be in [0, 1]" in res.stderr and "bad.toml" in res.stderr
        res = run_cli("edgefleet.hub.cli.main", "rollout", "start", "m", "7", *base, check=False)
        assert res.returncode == 2 and "no version '7'" in res.stderr
        out = run_cli("edgefleet.hub.cli.main", "rollout", "start", "m", "2", "--steps", "10,100", "--dry-run", *base).stdout
        assert "RUNNING" in out and "step 1/2 (10 %)" in out
        st: dict[str, Any] = json.loads(run_cli("edgefleet.hub.cli.main", "rollout", "status", "--json", *base).stdout)
        (ro,) = st["rollouts"]
        assert ro["decision"]["outcome"] == "wait" and ro["cohort_size"] == 2
        assert {g["name"] for g in ro["decision"]["gates"]} >= {"agreement", "latency_p95_ratio"}
        assert "pause" in run_cli("edgefleet.hub.cli.main", "rollout", "pause", *base).stdout.lower()
        metrics = {(f.name, s.labels.get("rollout")): s.value
                   for f in text_string_to_metric_families(
                       httpx.get(url + "/metrics", headers={"Authorization": f"Bearer {h.home.token()}"}).text) for s in f.samples}
        assert metrics[("edgefleet_rollout_state", ro["id"])] == 1  # paused
        assert metrics[("edgefleet_rollout_percent", ro["id"])] == 10
        assert metrics[("edgefleet_rollout_cohort_devices", ro["id"])] == 2
        assert "ABORTED" in run_cli("edgefleet.hub.cli.main", "rollout", "abort", "m", *base).stdout
        out = run_cli("edgefleet.hub.cli.main", "rollback", "m", "--to", "1", *base, check=False)
        assert out.returncode == 2 and "already runs 1" in out.stderr
        audit = json.loads(run_cli("edgefleet.hub.cli.main", "audit", "--json", *base).stdout)["entries"]
        acts = [e["action"] for e in audit]
        assert acts[-3:] == ["rollout_start", "rollout_pause", "rollout_abort"]
        # the actor is the CLI's token (admin.token: the token named admin), not the login name
        assert audit[-1]["details"]["gates"] and audit[-1]["actor"] == "admin"
    finally:
        http.stop()


def test_agreement_below_the_minimum_on_drifted_inputs_pauses_instead_of_rolling_back(tmp_path: Path) -> None:
    """The hub scores the stable's inputs in the step's own windows against the stable's
    reference: on drifted inputs a retrain agreeing 92 % pauses for an operator; on the reference's
    inputs the same agreement rolls back."""
    import numpy as np

    from edgefleet.agent.contract.wire import FeatureReference, Reference
    from edgefleet.agent.core.telemetry import feature_histogram

    edges = tuple(float(x) for x in np.linspace(-3, 3, 11))
    train = np.random.default_rng(0).normal(size=(20_000, 2))
    ref = Reference(features=tuple(
        FeatureReference(name=f"f{j}", edges=edges,
                         freqs=tuple(c / len(train) for c in feature_histogram(train[:, j], edges)["counts"]))
        for j in range(2)))
    outcomes = {}
    for shift in (0.0, 1.5):
        home = HubHome(tmp_path / f"hub{shift}")
        home.init(fleet="f", broker_url="mqtt://127.0.0.1:1", http_listen="127.0.0.1:0")
        (home.path / "rollout.toml").write_text("[policy]\nmin_inferences = 100\nmin_device_windows = 2\n")
        h = Hub(home, clock=Clock())
        h.controller.step()
        h.public_url = "http://hub.example"
        for version, scale in (("1", 1.0), ("2", 2.0)):
            h.publish({"name": "m", "version": version, "reference": ref.to_dict(),
                       "model_b64": base64.b64encode(tiny_model(scale)).decode()}, "alice")
        devices = [f"d{i}" for i in range(4)]
        for d in devices:
            h.add_device({"device": d, "profile": "x86"}, "admin")
        h.deploy({"model": "m", "version": "1", "devices": devices}, "alice")
        r = h.rollouts.start_rollout({"model": "m", "version": "2", "steps": [100]}, "alice")
        rng = np.random.default_rng(1)
        for seq in range(1, 6):
            for d in r["members"]:
                rows = rng.normal(size=(200, 2)) + np.array([shift, -shift])
                inputs = tuple({"name": f"f{j}", **feature_histogram(rows[:, j], edges)} for j in range(2))
                canary = {"rollout": r["id"], "mode": "shadow", "version": "2", "state": "running",
                          "reason": None, "requests": 200, "errors": 0, "skipped": 0, "compared": 200,
                          "agreed": 184, "output_distance_sum": 3.0, "latency_ms": LAT, "stable_latency_ms": LAT}
                tw = TelemetryWindow(fleet="f", device=d, seq=seq, window_start=h.clock() - 10, window_end=h.clock(),
                                     models={"m": ModelWindow(version="1", requests=200, errors=0, rows=200,
                                                              latency_ms=LAT, inputs=inputs, canary=canary)})
                h.ingest([(d, "telemetry", tw.to_json())])
        (_rid, decision), = h.rollouts.evaluate_all()
        outcomes[shift] = decision
        h.db.close()
    assert outcomes[0.0].outcome == "rollback", outcomes[0.0].reason
    assert "input_drift" not in outcomes[0.0].evidence
    held = outcomes[1.5]
    assert held.outcome == "pause" and "on drifted inputs (f" in held.reason, held.reason
    assert set(held.evidence["input_drift"]) == {"f0", "f1"}


def test_status_is_paged_by_device_id_and_the_client_follows_the_pages(hub: tuple[Hub, Clock]) -> None:
    from edgefleet.hub.adapters.client import HubClient

    h, _ = hub
    http = HubHttpServer(h, "127.0.0.1", 0)
    http.start()
    try:
        url = f"http://127.0.0.1:{http.address[1]}"
        auth = {"Authorization": f"Bearer {h.home.token()}"}
        first = httpx.get(f"{url}/api/v1/status", params={"limit": 5}, headers=auth).json()
        assert [d["device"] for d in first["devices"]] == [f"d{i:02d}" for i in range(5)]
        assert first["next"] == "d04" and first["total"] == 12
        last = httpx.get(f"{url}/api/v1/status", params={"limit": 5, "after": "d09"}, headers=auth).json()
        assert [d["device"] for d in last["devices"]] == ["d10", "d11"] and last["next"] is None
        for bad in ("0", "5001", "many"):
            r = httpx.get(f"{url}/api/v1/status", params={"limit": bad}, headers=auth)
            assert r.status_code == 400 and "limit" in r.json()["error"], (bad, r.text)
        whole = HubClient(url, h.home.token()).status(page=5)
        assert [d["device"] for d in whole["devices"]] == [f"d{i:02d}" for i in range(12)]
        assert whole["next"] is None and whole["total"] == 12
    finally:
        http.stop()
