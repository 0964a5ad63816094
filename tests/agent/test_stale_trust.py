"""An applied desired state past its expiry keeps serving, but the agent says so: one event, and
its status line, until a newer state arrives (a freeze attack or a hub cut off is visible)."""

from __future__ import annotations

import json
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edgefleet.agent.app.daemon import Agent
from edgefleet.agent.contract.envelope import public_key_to_b64
from tests.simulator import in_process_agent_config


def test_a_stale_trust_is_reported_once_and_shown_in_the_status(tmp_path: Path) -> None:
    root = public_key_to_b64(Ed25519PrivateKey.generate().public_key())
    now = [1_800_000_000.0]
    agent = Agent(in_process_agent_config(tmp_path, root), clock=lambda: now[0])
    sent: list[dict[str, object]] = []
    agent._publish = lambda channel, payload, retain=False: sent.append(json.loads(payload))  # type: ignore[method-assign]
    agent.trust.last_seq, agent.trust.applied_expires_at = 7, now[0] + 60
    agent._check_trust_fresh()
    assert sent == [] and "stale" not in agent.status_line()
    now[0] += 61
    agent._check_trust_fresh()
    agent._check_trust_fresh()
    assert [(e["type"], e["reason"], e["seq"]) for e in sent] == [("trust_stale", "expired", 7)]
    assert "keep serving" in str(sent[0]["message"])
    assert "trust stale: desired seq 7 expired" in agent.status_line()
    agent.trust.applied_expires_at = now[0] + 3600  # a newer state was applied
    agent._check_trust_fresh()
    assert "stale" not in agent.status_line() and len(sent) == 1


def test_a_keyring_past_its_expiry_is_reported_once_beside_a_stale_state(tmp_path: Path) -> None:
    """The same check reports a keyring nobody renewed: its own reason, its own event, once."""
    from edgefleet.agent.contract.envelope import key_id, sign_envelope
    from edgefleet.agent.contract.wire import KeyEntry, Keyring

    root, signer = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    now = [1_800_000_000.0]
    agent = Agent(in_process_agent_config(tmp_path, public_key_to_b64(root.public_key())), clock=lambda: now[0])
    sent: list[dict[str, object]] = []
    agent._publish = lambda channel, payload, retain=False: sent.append(json.loads(payload))  # type: ignore[method-assign]
    ring = Keyring(fleet="f", version=3, keys=(KeyEntry(keyid=key_id(signer.public_key()),
                                                         public=public_key_to_b64(signer.public_key())),),
                   issued_at=now[0] - 60, expires_at=now[0] + 600)
    assert agent.updater.handle_keyring(sign_envelope(ring.to_dict(), [root]), now=now[0]) == []
    agent.trust.last_seq, agent.trust.applied_expires_at = 7, now[0] + 60
    now[0] += 61
    agent._check_trust_fresh()
    now[0] += 600
    agent._check_trust_fresh()
    agent._check_trust_fresh()
    assert [(e["type"], e["reason"]) for e in sent] == [("trust_stale", "expired"), ("trust_stale", "keyring_expired")]
    assert "keyring (v3) expired" in str(sent[1]["message"]) and "renew-keyring" in str(sent[1]["message"])
    line = agent.status_line()
    assert "desired seq 7 expired" in line and "keyring v3 expired, no renewed keyring" in line
