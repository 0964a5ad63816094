"""A full state folder (found by the soak's disk_full fault): the agent could not persist its
state after a telemetry window and logged a traceback at every window. Now it says so once (one
``store_failed`` event), keeps going, and says so again only after the disk has recovered and
failed anew; the window itself stays spooled when the spool can still be written."""

from __future__ import annotations

import json
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edgefleet.agent.app.daemon import Agent
from edgefleet.agent.contract.envelope import public_key_to_b64
from edgefleet.agent.contract.errors import StoreFailed
from tests.simulator import in_process_agent_config


def test_a_state_folder_that_cannot_be_written_is_reported_once_per_episode(tmp_path: Path) -> None:
    root = public_key_to_b64(Ed25519PrivateKey.generate().public_key())
    agent = Agent(in_process_agent_config(tmp_path, root))
    sent: list[dict[str, object]] = []
    agent._publish = lambda channel, payload, retain=False: sent.append(json.loads(payload))  # type: ignore[method-assign]
    real_persist = agent.updater.persist

    def full() -> None:
        raise StoreFailed("could not write state.json: [Errno 28] No space left on device")

    agent.updater.persist = full  # type: ignore[method-assign]
    for _ in range(3):
        agent._close_window()
    events = [e for e in sent if e.get("type") == "store_failed"]
    assert len(events) == 1 and "No space left" in str(events[0]["message"])
    assert len(agent.spool) == 3  # every window kept for the hub
    agent.updater.persist = real_persist  # type: ignore[method-assign]
    agent._close_window()
    assert json.loads((agent.config.state_dir / "state.json").read_text())["telemetry_seq"] == 4
    agent.updater.persist = full  # type: ignore[method-assign]
    agent._close_window()
    assert len([e for e in sent if e.get("type") == "store_failed"]) == 2
