"""Canary entries through the agent's update core, no broker: the hub simulator signs desired
states and serves blobs over real HTTP; models are scikit-learn estimators converted in the test
and run in real ONNX Runtime sessions; the state file is real."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edgefleet.agent.app.updater import Updater
from edgefleet.agent.contract.wire import ModelEntry
from tests._skmodels import data, logreg, preflight_npz
from tests.conftest import wait_for
from tests.simulator import HubSimulator, make_updater, simulator, tiny_model

STABLE, STABLE_EST = logreg()
GOOD, GOOD_EST = logreg(c=0.5)
BAD, BAD_EST = logreg(shuffled=True)


@pytest.fixture
def sim() -> Iterator[HubSimulator]:
    with simulator() as s:
        yield s


def entry(sim: HubSimulator, version: str, blob: bytes, **kw: Any) -> ModelEntry:
    return dataclasses.replace(sim.entry(version, blob), **kw)


def preflight_ref(sim: HubSimulator, npz: bytes, **params: Any) -> dict[str, Any]:
    path = sim.server.put(npz)
    return {"url": sim.server.url(path), "sha256": hashlib.sha256(npz).hexdigest(), "size": len(npz),
            "rows": 64, **params}


def canary_entry(sim: HubSimulator, version: str, blob: bytes, *, mode: str = "shadow", fraction: float = 1.0,
                 rollout: str = "r-1", preflight: dict[str, Any] | None = None,
                 limits: dict[str, Any] | None = None) -> ModelEntry:
    stable = entry(sim, "1", STABLE)
    return entry(sim, version, blob, fallback="1", preflight=preflight, canary={
        "rollout": rollout, "mode": mode, "fraction": fraction, "stable": stable.to_dict(),
        "limits": limits or {"min_samples": 10_000},
    })


def installed(sim: HubSimulator, state: Path) -> Updater:
    up = make_updater(sim, state)
    up.handle_keyring(sim.keyring(), now=sim.now)
    up.offer(sim.desired({"m": entry(sim, "1", STABLE)}), now=sim.now)
    assert up.server.get("m").version == "1"
    return up


def kinds(notes: list[Any]) -> list[tuple[str, str]]:
    return [(n.type, n.reason) for n in notes]


def infer(up: Updater, rows: int = 30) -> list[str]:
    X = data()[0]
    return [up.server.infer("m", {"x": X[i : i + 1]}).version for i in range(rows)]


def replayed(up: Updater, n: int) -> dict[str, Any]:
    """Wait until the shadow thread compared ``n`` requests; return the closing window."""
    run = up.canary("m")
    assert run is not None
    wait_for(lambda: run.stats.totals().requests >= n, 20, f"{n} shadow replays")
    return up.canary_windows()["m"]


def state_doc(up: Updater) -> dict[str, Any]:
    return dict(json.loads(up.store.state_path.read_text()))


def test_a_canary_entry_attaches_the_candidate_beside_the_stable(sim: HubSimulator, tmp_path: Path) -> None:
    up = installed(sim, tmp_path / "s")
    npz = preflight_npz(GOOD_EST)
    notes = up.offer(sim.desired({"m": canary_entry(sim, "2", GOOD, preflight=preflight_ref(sim, npz))}), now=sim.now)
    assert kinds(notes) == [("canary_started", "")]
    assert notes[0].extra["rollout"] == "r-1" and notes[0].extra["preflight"]["agreement:label"] == 1.0
    assert set(up.server.canaries()) == {"m"}
    assert infer(up) == ["1"] * 30  # shadow: the stable answers every request
    w = replayed(up, 30)
    assert (w["version"], w["state"], w["requests"], w["compared"]) == ("2", "running", 30, 30)
    assert w["agreed"] >= 28
    doc = state_doc(up)
    assert doc["models"]["m"]["entry"]["version"] == "1"  # the stable stays the stable
    assert doc["canaries"]["m"]["state"] == "running" and doc["canaries"]["m"]["rollout"] == "r-1"
    up.stop_canaries()


def test_a_shuffled_labels_candidate_shows_low_agreement(sim: HubSimulator, tmp_path: Path) -> None:
    up = installed(sim, tmp_path / "s")
    notes = up.offer(sim.desired({"m": canary_entry(sim, "2", BAD)}), now=sim.now)
    assert kinds(notes) == [("canary_started", "")]
    infer(up, 60)
    w = replayed(up, 60)
    assert w["compared"] == 60 and w["agreed"] / w["compared"] < 0.8
    up.stop_canaries()


def test_a_failed_preflight_drops_the_candidate_with_its_reason_for_good(sim: HubSimulator, tmp_path: Path) -> None:
    up = installed(sim, tmp_path / "s")
    ref = preflight_ref(sim, preflight_npz(STABLE_EST))  # expected outputs of another estimator
    cand = canary_entry(sim, "2", BAD, preflight=ref)
    notes = up.offer(sim.desired({"m": cand}), now=sim.now)
    assert kinds(notes) == [("preflight_failed", "preflight_labels")]
    assert notes[0].extra["rollout"] == "r-1" and notes[0].extra["details"]["agreement"] < 0.8
    assert up.server.canaries() == {} and infer(up, 3) == ["1"] * 3
    w = up.canary_windows()["m"]
    assert (w["state"], w["reason"], w["requests"]) == ("preflight_failed", "preflight_labels", 0)
    fetched = len(sim.server.requests)
    again = up.offer(sim.desired({"m": cand}), now=sim.now)  # a new seq with the same canary
    assert kinds(again) == [("noop", "already_installed")]
    assert up.server.canaries() == {} and len(sim.server.requests) == fetched
    assert not (up.store.blobs / cand.sha256).exists()  # the refused candidate is not kept


def test_a_tampered_preflight_blob_is_retried_not_judged(sim: HubSimulator, tmp_path: Path) -> None:
    """Other bytes than signed for the preflight set say nothing about the candidate: the update
    waits and retries (a mirror fixed later serves it), and no verdict is recorded."""
    up = installed(sim, tmp_path / "s")
    ref = preflight_ref(sim, preflight_npz(GOOD_EST))
    sim.server.blobs["/blobs/" + ref["sha256"]].mode = "wrong"
    notes = up.offer(sim.desired({"m": canary_entry(sim, "2", GOOD, preflight=ref)}), now=sim.now)
    assert kinds(notes) == [("update_failed", "hash_mismatch")] and notes[0].extra["retrying"]
    assert up.canaries == {}
    sim.server.blobs["/blobs/" + ref["sha256"]].mode = "ok"
    assert ("canary_started", "") in kinds(up.retry(now=sim.now))


def test_the_local_guard_drops_a_nan_candidate_once_and_redelivery_does_not_reattach(
    sim: HubSimulator, tmp_path: Path
) -> None:
    up = make_updater(sim, tmp_path / "s")
    up.handle_keyring(sim.keyring(), now=sim.now)
    stable = sim.entry("1", tiny_model(1.0))
    cand = dataclasses.replace(sim.entry("2", tiny_model(float("nan"))), canary={
        "rollout": "r-7", "mode": "split", "fraction": 1.0, "stable": stable.to_dict()})
    notes = up.offer(sim.desired({"m": cand}), now=sim.now)  # a fresh device: stable installed too
    assert kinds(notes) == [("update", ""), ("canary_started", "")]
    x = {"x": np.ones((1, 2), dtype=np.float32)}
    res = up.server.infer("m", x)
    assert (res.version, float(res.outputs["y"][0, 0])) == ("1", 1.0)  # the candidate failed: stable answered
    assert up.server.canaries() == {}  # detached at once, before the main loop heard of it
    dropped = up.poll_canary()
    assert kinds(dropped) == [("canary_dropped", "nan_output")]
    assert dropped[0].extra["rollout"] == "r-7" and dropped[0].extra["nonfinite"] == 1
    w = up.canary_windows()["m"]
    assert (w["state"], w["reason"], w["requests"], w["errors"]) == ("dropped", "nan_output", 1, 1)
    assert state_doc(up)["canaries"]["m"]["state"] == "dropped"
    assert kinds(up.offer(sim.desired({"m": cand}), now=sim.now)) == [("noop", "already_installed")]
    assert up.server.canaries() == {}
    restarted = make_updater(sim, tmp_path / "s")
    assert restarted.server.canaries() == {} and restarted.server.get("m").version == "1"


def test_a_promotion_makes_the_candidate_stable_without_downloading_it_again(
    sim: HubSimulator, tmp_path: Path
) -> None:
    up = installed(sim, tmp_path / "s")
    cand = canary_entry(sim, "2", GOOD)
    up.offer(sim.desired({"m": cand}), now=sim.now)
    fetched = len(sim.server.requests)
    promote = entry(sim, "2", GOOD, fallback="1")
    notes = up.offer(sim.desired({"m": promote}), now=sim.now)
    assert kinds(notes) == [("update", ""), ("canary_ended", "promoted")]
    assert len(sim.server.requests) == fetched  # the verified candidate blob was reused
    assert up.server.canaries() == {} and up.canary("m") is None
    assert infer(up, 3) == ["2"] * 3
    doc = state_doc(up)
    assert doc["models"]["m"]["entry"]["version"] == "2" and doc["models"]["m"]["fallback"]["version"] == "1"
    assert doc["canaries"] == {}


def test_a_rollback_entry_detaches_the_candidate(sim: HubSimulator, tmp_path: Path) -> None:
    up = installed(sim, tmp_path / "s")
    cand = canary_entry(sim, "2", GOOD)
    up.offer(sim.desired({"m": cand}), now=sim.now)
    notes = up.offer(sim.desired({"m": entry(sim, "1", STABLE)}), now=sim.now)
    assert kinds(notes) == [("canary_ended", "rollback")]
    assert up.server.canaries() == {} and infer(up, 3) == ["1"] * 3
    assert "m" not in up.canary_windows()
    assert not (up.store.blobs / cand.sha256).exists()


def test_a_restart_resumes_a_running_canary(sim: HubSimulator, tmp_path: Path) -> None:
    up = installed(sim, tmp_path / "s")
    up.offer(sim.desired({"m": canary_entry(sim, "2", GOOD, mode="split", fraction=0.5)}), now=sim.now)
    up.stop_canaries()
    again = make_updater(sim, tmp_path / "s")
    assert set(again.server.canaries()) == {"m"}
    assert sorted(set(infer(again, 4))) == ["1", "2"]  # split: both versions answer, each named
    w = again.canary_windows()["m"]
    assert (w["mode"], w["requests"], w["state"]) == ("split", 2, "running")


def test_a_malformed_canary_refuses_the_desired_state(sim: HubSimulator, tmp_path: Path) -> None:
    up = installed(sim, tmp_path / "s")
    bad = entry(sim, "2", GOOD, canary={"rollout": "r-1", "mode": "mirror", "fraction": 0.1,
                                        "stable": entry(sim, "1", STABLE).to_dict()})
    notes = up.offer(sim.desired({"m": bad}), now=sim.now)
    assert kinds(notes) == [("refused", "malformed")]
    assert up.server.canaries() == {} and up.server.get("m").version == "1"


def test_a_new_fraction_for_the_same_rollout_retunes_without_a_new_preflight(
    sim: HubSimulator, tmp_path: Path
) -> None:
    up = installed(sim, tmp_path / "s")
    ref = preflight_ref(sim, preflight_npz(GOOD_EST))
    up.offer(sim.desired({"m": canary_entry(sim, "2", GOOD, mode="shadow", preflight=ref)}), now=sim.now)
    first = up.canary("m")
    fetched = len(sim.server.requests)
    notes = up.offer(sim.desired({"m": canary_entry(sim, "2", GOOD, mode="split", fraction=0.5, preflight=ref)}),
                     now=sim.now)
    assert kinds(notes) == [("canary_started", "retuned")]
    assert len(sim.server.requests) == fetched  # neither the candidate nor the preflight set again
    run = up.canary("m")
    assert run is not None and run is not first and run.mode == "split"
    assert first is not None and first.candidate is run.candidate  # the loaded session is reused
    assert sorted(set(infer(up, 4))) == ["1", "2"]
    assert state_doc(up)["canaries"]["m"]["mode"] == "split"
    up.stop_canaries()


def test_an_ordinary_entry_failing_its_preflight_is_refused_and_the_stable_keeps_serving(
    sim: HubSimulator, tmp_path: Path
) -> None:
    up = installed(sim, tmp_path / "s")
    bad = entry(sim, "2", BAD, preflight=preflight_ref(sim, preflight_npz(STABLE_EST)))
    notes = up.offer(sim.desired({"m": bad}), now=sim.now)
    assert kinds(notes) == [("refused", "preflight_labels")]
    assert infer(up, 3) == ["1"] * 3
    good = entry(sim, "3", GOOD, preflight=preflight_ref(sim, preflight_npz(GOOD_EST)))
    assert kinds(up.offer(sim.desired({"m": good}), now=sim.now)) == [("update", "")]
    assert infer(up, 3) == ["3"] * 3
