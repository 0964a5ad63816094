"""The update state machine in-process: transitions persisted at each step, crash at any step
(simulated by an exception the core does not catch), crash loop, no-op redeploy, instant
rollback and garbage collection. Real files, real HTTP (simulator), real ONNX Runtime."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from edgefleet.agent.app.updater import STEPS, Updater
from tests.simulator import HubSimulator, make_updater, reasons, serving, simulator, tiny_model


class Crash(BaseException):
    """Stands for SIGKILL: nothing in the agent catches a BaseException like this."""


@pytest.fixture
def sim() -> Iterator[HubSimulator]:
    with simulator() as s:
        yield s


def installed(sim: HubSimulator, state: Path, **kw: object) -> Updater:
    up = make_updater(sim, state, **kw)
    up.handle_keyring(sim.keyring(), now=sim.now)
    up.offer(sim.desired({"m": sim.entry("1", tiny_model(1.0))}), now=sim.now)
    assert serving(up) == ("1", 1.0)
    return up


def crash_at(step: str):  # type: ignore[no-untyped-def]
    def hook(at: str) -> None:
        if at == step:
            raise Crash(step)

    return hook


def assert_store_sound(state: Path) -> dict[str, object]:
    doc = json.loads((state / "state.json").read_text())
    for blob in (state / "blobs").iterdir():
        if blob.is_file():
            assert hashlib.sha256(blob.read_bytes()).hexdigest() == blob.name
    return dict(doc)


def test_each_transition_is_persisted_before_its_step(sim: HubSimulator, tmp_path: Path) -> None:
    seen: list[tuple[str, str]] = []
    up = installed(sim, tmp_path / "s")
    up.on_step = lambda step: seen.append(
        (step, json.loads(up.store.state_path.read_text())["models"]["m"]["state"])
    )
    up.offer(sim.desired({"m": sim.entry("2", tiny_model(2.0))}), now=sim.now)
    assert seen == [
        ("download", "downloading"),
        ("verify", "verifying"),
        ("guard", "verifying"),
        ("stage", "staged"),
        ("switch", "staged"),
        ("commit", "staged"),
    ]
    assert up.model_state("m") == "active"
    doc = json.loads(up.store.state_path.read_text())
    assert doc["models"]["m"]["entry"]["version"] == "2"
    assert doc["models"]["m"]["fallback"]["version"] == "1"
    assert doc["update"] is None


@pytest.mark.parametrize("step", STEPS)
def test_crash_at_any_step_serves_a_verified_model(
    sim: HubSimulator, tmp_path: Path, step: str
) -> None:
    state = tmp_path / "s"
    up = installed(sim, state)
    up.on_step = crash_at(step)
    desired = sim.desired({"m": sim.entry("2", tiny_model(2.0))})
    with pytest.raises(Crash):
        up.offer(desired, now=sim.now)
    assert_store_sound(state)
    again = make_updater(sim, state)  # restart
    assert serving(again) == ("1", 1.0)  # nothing was committed: the old model serves
    assert again.pending == desired  # and the update resumes by itself
    assert [n.type for n in again.retry(now=sim.now)] == ["update"]
    assert serving(again) == ("2", 2.0)
    doc = assert_store_sound(state)
    assert doc["update"] is None and doc["last_seq"] == sim.seq


def test_crash_loop_ends_in_a_reported_failure(sim: HubSimulator, tmp_path: Path) -> None:
    state = tmp_path / "s"
    up = installed(sim, state)
    desired = sim.desired({"m": sim.entry("2", tiny_model(2.0))})
    up.on_step = crash_at("guard")
    with pytest.raises(Crash):
        up.offer(desired, now=sim.now)
    for _ in range(3):  # three restarts, each dying at the same step
        up = make_updater(sim, state, on_step=crash_at("guard"))
        with pytest.raises(Crash):
            up.retry(now=sim.now)
    up2 = make_updater(sim, state, restore=False)
    notes = up2.restore()
    assert reasons(notes) == ["crash_loop"], notes
    assert up2.pending is None
    assert serving(up2) == ("1", 1.0)
    assert up2.offer(desired, now=sim.now) == []  # the retained redelivery is not retried
    assert [
        n.type for n in up2.offer(sim.desired({"m": sim.entry("3", tiny_model(3.0))}), now=sim.now)
    ] == ["update"]


def test_redeploying_the_installed_version_is_a_noop(sim: HubSimulator, tmp_path: Path) -> None:
    up = installed(sim, tmp_path / "s")
    fetched = len(sim.server.requests)
    notes = up.offer(sim.desired({"m": sim.entry("1", tiny_model(1.0))}), now=sim.now)
    assert [(n.type, n.reason) for n in notes] == [("noop", "already_installed")]
    assert len(sim.server.requests) == fetched
    assert up.trust.last_seq == sim.seq


def test_rollback_to_the_fallback_needs_no_download(sim: HubSimulator, tmp_path: Path) -> None:
    up = installed(sim, tmp_path / "s")
    up.offer(sim.desired({"m": sim.entry("2", tiny_model(2.0))}), now=sim.now)
    fetched = len(sim.server.requests)
    sim.server.blobs.clear()  # the blob server is gone: the fallback must come from disk
    notes = up.offer(sim.desired({"m": sim.entry("1", tiny_model(1.0))}), now=sim.now)
    assert [n.type for n in notes] == ["update"]
    assert len(sim.server.requests) == fetched
    assert serving(up) == ("1", 1.0)


def test_local_rollback_is_instant_and_persisted(sim: HubSimulator, tmp_path: Path) -> None:
    up = installed(sim, tmp_path / "s")
    up.offer(sim.desired({"m": sim.entry("2", tiny_model(2.0))}), now=sim.now)
    notes = up.rollback("m", "canary_failed")
    assert [(n.type, n.reason) for n in notes] == [("rollback", "canary_failed")]
    assert serving(up) == ("1", 1.0)
    again = make_updater(sim, tmp_path / "s")
    assert serving(again) == ("1", 1.0) and again.model_state("m") == "rolled-back"


def test_unreferenced_blobs_are_collected(sim: HubSimulator, tmp_path: Path) -> None:
    up = installed(sim, tmp_path / "s")
    for i in (2, 3):
        up.offer(sim.desired({"m": sim.entry(str(i), tiny_model(float(i)))}), now=sim.now)
    kept = {p.name for p in up.store.blobs.iterdir() if p.is_file()}
    want = {hashlib.sha256(tiny_model(float(i))).hexdigest() for i in (2, 3)}
    assert kept == want  # stable (3) and fallback (2); version 1 is gone
    up.offer(sim.desired({}), now=sim.now)
    assert "m" not in up.server.models()
    assert [p for p in up.store.blobs.iterdir() if p.is_file()] == []


def test_restarts_while_waiting_for_the_network_are_not_a_crash_loop(
    sim: HubSimulator, tmp_path: Path
) -> None:
    state = tmp_path / "s"
    up = installed(sim, state)
    entry = sim.entry("2", tiny_model(2.0), mode="error")
    notes = up.offer(sim.desired({"m": entry}), now=sim.now)
    assert [(n.type, n.reason) for n in notes] == [("update_failed", "fetch_failed")]
    for _ in range(5):  # the device reboots again and again while the blob server is down
        up = make_updater(sim, state, restore=False)
        assert reasons(up.restore()) == []
        assert reasons(up.retry(now=sim.now)) == ["fetch_failed"]
    sim.server.blobs[entry.url.split(str(sim.server.port))[1]].mode = "ok"
    assert [n.type for n in up.retry(now=sim.now)] == ["update"]
    assert serving(up) == ("2", 2.0)


def test_retries_back_off_from_5_s_to_15_min_with_jitter() -> None:
    import random

    from edgefleet.agent.app.daemon import RETRY_MAX_SECONDS, retry_delay

    rng = random.Random(1)
    delays = [retry_delay(n, rng) for n in range(1, 12)]
    assert 3.75 <= delays[0] <= 6.25 and 7.5 <= delays[1] <= 12.5
    assert all(0.75 * RETRY_MAX_SECONDS <= d <= 1.25 * RETRY_MAX_SECONDS for d in delays[-2:])
    assert delays == sorted(delays[:8]) + delays[8:], "the first steps grow"


def test_the_same_bytes_under_a_new_version_are_served_and_reported_as_that_version(
    sim: HubSimulator, tmp_path: Path
) -> None:
    """Issue 15's desync: the hub promoted 1.0.1, published from the stable's bytes, and devices
    kept reporting 1.0.0. Now the relabel is installed from the blob on disk."""
    up = installed(sim, tmp_path / "s")
    fetched = len(sim.server.requests)
    relabel = sim.entry("1.0.1", tiny_model(1.0))
    notes = up.offer(sim.desired({"m": relabel}), now=sim.now)
    assert [(n.type, n.version) for n in notes] == [("update", "1.0.1")]
    assert serving(up) == ("1.0.1", 1.0)
    assert len(sim.server.requests) == fetched, "no download: the blob is the stable's"
    assert up.models["m"]["entry"]["version"] == "1.0.1"
