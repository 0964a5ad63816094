"""The update state machine (agent.core.update) without a disk, a broker or ONNX Runtime."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any

import pytest

from edgefleet.agent.contract.wire import ModelEntry
from edgefleet.agent.core.update import (
    TRANSITIONS,
    BadTransition,
    Phase,
    Step,
    UpdateCore,
    canary_end_reason,
)


def entry(version: str, **kw: Any) -> ModelEntry:
    sha = (version.encode().hex() * 64)[:64]
    return ModelEntry(version=version, sha256=sha, size=10, url=f"http://blobs/{sha}", **kw)


@dataclass(frozen=True)
class Intent:
    rollout: str
    mode: str
    fraction: float
    stable: ModelEntry
    limits: dict[str, Any] = field(default_factory=dict)


def install(core: UpdateCore, seq: int, **models: ModelEntry) -> None:
    """Drive one whole update the way the updater does, every model fetched."""
    core.begin(seq=seq, digest=f"d{seq}", raw=b"raw%d" % seq)
    plan = core.plan(seq, models, {})
    for name, e in plan.changed.items():
        core.transition(name, Step.LOCAL if name in plan.reusable else Step.FETCH, e)
        if name not in plan.reusable:
            core.transition(name, Step.VERIFY, e)
        core.transition(name, Step.STAGE, e)
    core.commit(plan, set(plan.changed), None)


# -- the table --------------------------------------------------------------------------------


def test_every_phase_is_reachable_from_idle_and_every_phase_can_be_left() -> None:
    reach, todo = {Phase.IDLE}, [Phase.IDLE]
    while todo:
        p = todo.pop()
        for (src, _), dst in TRANSITIONS.items():
            if src is p and dst not in reach:
                reach.add(dst)
                todo.append(dst)
    assert reach == set(Phase)
    assert {src for src, _ in TRANSITIONS} == set(Phase)


@pytest.mark.parametrize(("phase", "step"), [(p, s) for p, s in itertools.product(Phase, Step)
                                             if (p, s) not in TRANSITIONS])
def test_a_step_the_table_does_not_name_is_refused_and_changes_nothing(phase: Phase, step: Step) -> None:
    core = UpdateCore()
    core.models["m"] = {"entry": entry("1").to_dict(), "fallback": None, "state": phase.value}
    before = dict(core.models["m"])
    with pytest.raises(BadTransition, match=f"step '{step.value}' is not allowed from '{phase.value}'"):
        core.transition("m", step, entry("2"))
    assert core.models["m"] == before


def test_an_update_walks_the_table_and_commit_keeps_the_old_stable_as_fallback() -> None:
    core = UpdateCore()
    install(core, 1, m=entry("1"))
    assert core.models["m"]["state"] == "active" and core.models["m"]["fallback"] is None
    core.begin(seq=2, digest="d2", raw=b"r2")
    plan = core.plan(2, {"m": entry("2")}, {})
    seen = [core.transition("m", Step.FETCH, entry("2"))]
    assert core.models["m"]["candidate"]["version"] == "2"
    seen += [core.transition("m", Step.VERIFY, entry("2")), core.transition("m", Step.STAGE, entry("2"))]
    assert seen == [Phase.DOWNLOADING, Phase.VERIFYING, Phase.STAGED]
    core.commit(plan, {"m"}, None)
    rec = core.models["m"]
    assert (rec["entry"]["version"], rec["fallback"]["version"], rec["state"], rec["candidate"]) == (
        "2", "1", "active", None)
    assert core.update is None and core.failed is None


def test_commit_of_a_model_that_was_not_staged_is_a_bad_transition() -> None:
    core = UpdateCore()
    install(core, 1, m=entry("1"))
    plan = core.plan(2, {"m": entry("2")}, {})
    core.transition("m", Step.FETCH, entry("2"))
    with pytest.raises(BadTransition, match="'commit' is not allowed from 'downloading'"):
        core.commit(plan, {"m"}, None)


# -- plans ------------------------------------------------------------------------------------


def test_the_plan_names_what_changes_and_a_rollback_to_the_fallback_is_local() -> None:
    core = UpdateCore()
    install(core, 1, a=entry("1"), b=entry("b1"))
    install(core, 2, a=entry("2"), b=entry("b1"))
    plan = core.plan(3, {"a": entry("1")}, {})
    assert list(plan.changed) == ["a"] and plan.removed == ["b"] and plan.reusable == {"a"}
    assert not plan.noop
    assert core.plan(3, {"a": entry("2"), "b": entry("b1")}, {}).noop


def test_a_canary_entry_serves_its_stable_and_starts_once_per_rollout_and_candidate() -> None:
    core = UpdateCore()
    install(core, 1, m=entry("1"))
    cand = entry("2", canary={"rollout": "r1"})
    intent = Intent("r1", "shadow", 0.1, entry("1"))
    plan = core.plan(2, {"m": cand}, {"m": intent})
    assert plan.view == {"m": entry("1")} and plan.changed == {} and plan.starting == ["m"]
    core.canaries["m"] = core.canary_record("m", cand, intent, 2)
    again = core.plan(3, {"m": cand}, {"m": intent})
    assert again.noop
    retuned = core.plan(4, {"m": cand}, {"m": Intent("r1", "split", 0.5, entry("1"))})
    assert retuned.retuned == ["m"] and retuned.starting == []
    core.canary_dropped("m", "latency_ratio", {"ratio": 2.0})
    assert core.plan(5, {"m": cand}, {"m": intent}).noop, "a dropped candidate is not attached again"
    ended = core.plan(6, {"m": entry("2")}, {})
    assert ended.ending == ["m"] and ended.reusable == frozenset(), "a dropped candidate's blob is not reused"


@pytest.mark.parametrize(("new", "why"), [(None, "removed"), (entry("2"), "promoted"), (entry("1"), "rollback"),
                                          (entry("3", canary={"rollout": "r2"}), "replaced")])
def test_why_a_canary_ends(new: ModelEntry | None, why: str) -> None:
    assert canary_end_reason(new, entry("2").sha256) == why


# -- refusals, interruptions, restarts ----------------------------------------------------------


def test_a_refusal_drops_the_whole_update_and_is_remembered_by_digest() -> None:
    core = UpdateCore()
    install(core, 1, a=entry("1"), b=entry("b1"))
    core.begin(seq=2, digest="d2", raw=b"r2")
    core.plan(2, {"a": entry("2"), "b": entry("b2"), "c": entry("c1")}, {})
    for step in (Step.FETCH, Step.VERIFY, Step.STAGE):
        core.transition("a", step, entry("2"))
    core.transition("c", Step.FETCH, entry("c1"))
    core.refuse("c", entry("c1"), seq=2, digest="d2", reason="blob_rejected")
    assert core.models["a"]["state"] == "active" and core.models["a"]["entry"]["version"] == "1"
    assert core.models["a"]["candidate"] is None
    assert "c" not in core.models, "a first install that is refused leaves nothing behind"
    assert core.failed == {"digest": "d2", "seq": 2, "reason": "blob_rejected"} and core.update is None
    assert core.reported_failed("d2") and not core.reported_failed("d3")
    assert core.keep() == {entry("1").sha256, entry("b1").sha256}


def test_waiting_for_the_network_keeps_verified_candidates_and_the_retry_walks_the_table_again() -> None:
    core = UpdateCore()
    install(core, 1, a=entry("1"), b=entry("b1"))
    core.begin(seq=2, digest="d2", raw=b"r2")
    for step in (Step.FETCH, Step.VERIFY, Step.STAGE):
        core.transition("a", step, entry("2"))
    core.transition("b", Step.FETCH, entry("b2"))
    core.transition("b", Step.FAIL, entry("b2"), reason="fetch_failed")
    core.wait_for_network()
    assert core.models["a"]["state"] == "active" and core.models["a"]["candidate"]["version"] == "2"
    assert entry("2").sha256 in core.keep()
    assert core.update is not None and core.update["waiting"] is True
    install(core, 2, a=entry("2"), b=entry("b2"))  # the retry: no BadTransition from a stale phase
    assert core.models["b"]["entry"]["version"] == "b2"


def test_a_restart_resets_models_in_flight_and_resumes_the_update() -> None:
    core = UpdateCore(max_restarts=2)
    install(core, 1, m=entry("1"))
    core.begin(seq=2, digest="d2", raw=b"raw-2")
    core.transition("m", Step.FETCH, entry("2"))
    core.models["n"] = {"entry": None, "fallback": None, "state": "verifying", "candidate": entry("n1").to_dict()}
    state = core.state_fields()
    for restart in (1, 2):
        core = UpdateCore(max_restarts=2)
        core.load(state)
        raw, notes = core.restart()
        assert (raw, notes) == (b"raw-2", [])
        assert core.update is not None and core.update["restarts"] == restart
        assert core.models["m"]["state"] == "active" and core.models["n"]["state"] == "idle"
        assert core.models["m"]["candidate"]["version"] == "2", "the candidate's blob is kept for the resume"
        core.transition("m", Step.FETCH, entry("2"))
        core.transition("m", Step.VERIFY, entry("2"))  # killed while checking: a restart that counts
        state = core.state_fields()
    core = UpdateCore(max_restarts=2)
    core.load(state)
    raw, notes = core.restart()
    assert raw is None and [(n.type, n.reason, n.seq) for n in notes] == [("update_failed", "crash_loop", 2)]
    assert core.failed == {"digest": "d2", "seq": 2, "reason": "crash_loop"}
    assert core.models["m"]["state"] == "failed" and core.models["m"]["entry"]["version"] == "1"


def test_a_restart_while_waiting_for_the_network_is_not_counted() -> None:
    core = UpdateCore(max_restarts=1)
    core.begin(seq=1, digest="d1", raw=b"r1")
    core.wait_for_network()
    for _ in range(5):
        state = core.state_fields()
        core = UpdateCore(max_restarts=1)
        core.load(state)
        raw, notes = core.restart()
        assert raw == b"r1" and notes == []
        core.wait_for_network()
    assert core.update is not None and core.update["restarts"] == 0


def test_an_unknown_phase_from_a_newer_agent_is_reset_like_an_update_in_flight() -> None:
    core = UpdateCore()
    core.load({"models": {"m": {"entry": entry("1").to_dict(), "fallback": None, "state": "quantising"}}})
    core.restart()
    assert core.phase("m") is Phase.ACTIVE


def test_forgetting_a_refused_redelivery_drops_only_that_update() -> None:
    core = UpdateCore()
    core.begin(seq=1, digest="d1", raw=b"r1")
    assert not core.forget(b"other") and core.update is not None
    assert core.forget(b"r1") and core.update is None


# -- local rollback -----------------------------------------------------------------------------


def test_a_local_rollback_swaps_entry_and_fallback_and_may_be_undone() -> None:
    core = UpdateCore()
    install(core, 1, m=entry("1"))
    install(core, 2, m=entry("2"))
    assert core.fallback("m") == entry("1")
    core.rolled_back("m", "latency")
    rec = core.models["m"]
    assert (rec["entry"]["version"], rec["fallback"]["version"], rec["state"], rec["reason"]) == (
        "1", "2", "rolled-back", "latency")
    core.rolled_back("m", "operator")
    assert core.models["m"]["entry"]["version"] == "2"
    assert UpdateCore().fallback("m") is None


def test_a_failed_commit_write_is_reverted_to_the_snapshot() -> None:
    core = UpdateCore()
    install(core, 1, m=entry("1"))
    core.begin(seq=2, digest="d2", raw=b"r2")
    plan = core.plan(2, {"m": entry("2")}, {})
    for step in (Step.FETCH, Step.VERIFY, Step.STAGE):
        core.transition("m", step, entry("2"))
    snap = core.snapshot()
    core.commit(plan, {"m"}, {})
    core.revert(snap)
    assert core.models["m"]["state"] == "staged" and core.update is not None


@pytest.mark.parametrize("phase", ["downloading", "verifying", "staged"])
@pytest.mark.parametrize("fallback", [None, "0"])
def test_a_first_install_interrupted_at_any_phase_installs_on_the_next_start(phase: str, fallback: str | None) -> None:
    """A kill during the first install of a model (nothing, or only a fallback, installed) leaves a
    record with no entry: the next start must plan it as a change like any other."""
    core = UpdateCore()
    core.begin(seq=1, digest="d1", raw=b"r1")
    core.models["m"] = {"entry": None, "fallback": entry(fallback).to_dict() if fallback else None,
                        "state": phase, "candidate": entry("1").to_dict()}
    state = core.state_fields()
    core = UpdateCore()
    core.load(state)
    assert core.restart() == (b"r1", [])
    assert core.phase("m") is Phase.IDLE
    install(core, 1, m=entry("1"))
    assert core.models["m"]["entry"]["version"] == "1" and core.models["m"]["state"] == "active"


def test_a_restart_that_catches_the_update_downloading_is_not_a_crash() -> None:
    core = UpdateCore(max_restarts=1)
    install(core, 1, m=entry("1"))
    core.begin(seq=2, digest="d2", raw=b"r2")
    for _ in range(5):
        core.transition("m", Step.FETCH, entry("2"))
        state = core.state_fields()
        core = UpdateCore(max_restarts=1)
        core.load(state)
        assert core.restart() == (b"r2", [])
    assert core.update is not None and core.update["restarts"] == 0
    core.transition("m", Step.FETCH, entry("2"))
    core.transition("m", Step.VERIFY, entry("2"))  # parsing starts: from here a restart counts
    state = core.state_fields()
    core = UpdateCore(max_restarts=1)
    core.load(state)
    core.restart()
    assert core.update is not None and core.update["restarts"] == 1


def test_a_new_version_label_on_the_stables_bytes_is_installed_as_a_relabel() -> None:
    """Hub and device must agree after a promotion of a version published from the stable's very
    bytes: the device serves and reports the new label, from the blob it has (no download)."""
    core = UpdateCore()
    install(core, 1, m=entry("1"))
    relabel = ModelEntry(version="1.0.1", sha256=entry("1").sha256, size=10, url="http://blobs/other")
    plan = core.plan(2, {"m": relabel}, {})
    assert list(plan.changed) == ["m"] and plan.reusable == {"m"}
    install(core, 2, m=relabel)
    assert core.models["m"]["entry"]["version"] == "1.0.1" and core.models["m"]["fallback"]["version"] == "1"
    assert core.keep() == {entry("1").sha256}
    assert core.plan(3, {"m": relabel}, {}).noop
