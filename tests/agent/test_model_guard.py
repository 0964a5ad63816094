"""Malformed and hostile models are refused with a clear reason before the agent serves them,
and the agent keeps serving what it had. The session guard runs in a real child process."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from edgefleet.agent.adapters.sandbox import SessionGuard
from edgefleet.agent.app.updater import Updater
from edgefleet.agent.contract.config import DeviceProfile
from tests.simulator import (
    HubSimulator,
    external_data_model,
    heavy_model,
    make_updater,
    serving,
    simulator,
    tiny_model,
)


def _bit_flipped() -> bytes:
    data = bytearray(tiny_model(2.0))
    for i in range(0, len(data), 7):
        data[i] ^= 0xFF
    return bytes(data)


@pytest.fixture
def sim() -> Iterator[HubSimulator]:
    with simulator() as s:
        yield s


def agent_with(sim: HubSimulator, state: Path, guard: SessionGuard) -> Updater:
    profile = DeviceProfile(name="guarded", max_blob_mb=64, memory_budget_mb=256)
    up = make_updater(sim, state, guard=guard, profile=profile)
    up.handle_keyring(sim.keyring(), now=sim.now)
    notes = up.offer(sim.desired({"m": sim.entry("1", tiny_model(1.0))}), now=sim.now)
    assert [n.type for n in notes] == ["update"], notes
    return up


def offer_bad(sim: HubSimulator, up: Updater, data: bytes) -> tuple[str, str]:
    notes = up.offer(sim.desired({"m": sim.entry("2", data)}), now=sim.now)
    assert [n.type for n in notes] == ["refused"], notes
    assert serving(up) == ("1", 1.0)
    assert up.model_state("m") == "failed"
    on_disk = {p.name for p in up.store.blobs.iterdir() if p.is_file()}
    assert on_disk == {up.models["m"]["entry"]["sha256"]}, "a refused blob is not kept"
    return notes[0].reason, notes[0].message


@pytest.mark.parametrize(
    ("data", "reason", "words"),
    [
        (tiny_model(2.0)[:60], "model_malformed", "not a parseable ONNX model"),
        (_bit_flipped(), "model_malformed", "not a parseable ONNX model"),
        (external_data_model(), "model_external_data", "external file"),
        (tiny_model(2.0, domain_op=("com.evil", "Evil")), "model_domain", "com.evil"),
        (tiny_model(2.0, opset=99), "model_opset", "opset 99"),
    ],
    ids=["truncated", "bit-flipped", "external-data", "custom-domain", "opset-too-new"],
)
def test_malformed_model_is_refused(
    sim: HubSimulator, tmp_path: Path, data: bytes, reason: str, words: str
) -> None:
    up = agent_with(sim, tmp_path / "s", SessionGuard(timeout=30))
    got, message = offer_bad(sim, up, data)
    assert got == reason
    assert words in message
    # The agent is still up and takes the next good state.
    assert [
        n.type for n in up.offer(sim.desired({"m": sim.entry("3", tiny_model(3.0))}), now=sim.now)
    ] == ["update"]
    assert serving(up) == ("3", 3.0)


def test_model_over_the_memory_budget_is_refused_in_the_child(
    sim: HubSimulator, tmp_path: Path
) -> None:
    up = agent_with(sim, tmp_path / "s", SessionGuard(budget_mb=8, timeout=30))
    reason, message = offer_bad(sim, up, heavy_model(16))
    assert reason == "guard_memory", message


def test_guard_child_that_hangs_is_a_timeout(sim: HubSimulator, tmp_path: Path) -> None:
    hang = [sys.executable, "-c", "import time; time.sleep(60)"]
    up = agent_with(sim, tmp_path / "s", SessionGuard(timeout=30))
    up.guard = SessionGuard(timeout=1.0, command=hang)
    reason, message = offer_bad(sim, up, tiny_model(2.0))
    assert reason == "guard_timeout"
    assert "1 s" in message


def test_guard_child_that_crashes_is_refused(sim: HubSimulator, tmp_path: Path) -> None:
    crash = [sys.executable, "-c", "import os, signal; os.kill(os.getpid(), signal.SIGSEGV)"]
    up = agent_with(sim, tmp_path / "s", SessionGuard(timeout=30))
    up.guard = SessionGuard(timeout=10, command=crash)
    reason, message = offer_bad(sim, up, tiny_model(2.0))
    assert reason == "guard_crash"
    assert "SIGSEGV" in message


def test_the_guard_child_runs_in_an_empty_working_directory(sim: HubSimulator, tmp_path: Path) -> None:
    """Defence in depth: a relative external-data path that got past the structural checks would be
    resolved against the child's working directory, which holds nothing."""
    (tmp_path / "secret").write_text("device file")
    probe = [sys.executable, "-c",
             "import json, os; here = os.listdir('.');"
             "print(json.dumps({'ok': False, 'reason': 'probe', 'message': f'{os.getcwd()} {here}'}))"]
    up = agent_with(sim, tmp_path / "s", SessionGuard(timeout=30))
    up.guard = SessionGuard(timeout=10, command=probe)
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        reason, message = offer_bad(sim, up, tiny_model(2.0))
    finally:
        os.chdir(cwd)
    where, listing = message.rsplit(" ", 1)
    assert reason == "probe" and listing == "[]" and Path(where) != tmp_path
