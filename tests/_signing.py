"""Tiny signing helpers for the pure-core tests: real Ed25519 keys, no HTTP, no ONNX.

``tests/simulator.py`` does the same for the update core but starts a blob server and imports
onnx; the wire and trust tests need only bytes, so they build them here.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterable, Mapping
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edgefleet.agent.contract.envelope import key_id, public_key_to_b64, sign_envelope
from edgefleet.agent.contract.wire import DesiredState, KeyEntry, Keyring, ModelEntry

FLEET = "fleet-a"
DEVICE = "dev-1"
NOW = 1_800_000_000.0  # the reference time every trust test passes explicitly
SHA = "ab" * 32


def new_key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


def kid(key: Ed25519PrivateKey) -> str:
    return key_id(key.public_key())


def key_entry(key: Ed25519PrivateKey) -> KeyEntry:
    return KeyEntry(keyid=kid(key), public=public_key_to_b64(key.public_key()))


def keyring(
    root: Ed25519PrivateKey | Iterable[Ed25519PrivateKey],
    signers: Iterable[Ed25519PrivateKey],
    *,
    version: int = 1,
    threshold: int = 1,
    fleet: str = FLEET,
    extra: Mapping[str, Any] | None = None,
    issued_at: float = NOW - 60,
    expires_at: float | None = None,
) -> bytes:
    """A keyring envelope listing ``signers``, signed by ``root`` (one key or several); without
    ``expires_at`` it is a keyring of the kind signed before keyrings expired."""
    ring = Keyring(
        fleet=fleet,
        version=version,
        keys=tuple(key_entry(k) for k in signers),
        threshold=threshold,
        issued_at=issued_at,
        extra=dict(extra or {}),
        expires_at=expires_at,
    )
    roots = [root] if isinstance(root, Ed25519PrivateKey) else list(root)
    return sign_envelope(ring.to_dict(), roots)


def model(**overrides: Any) -> ModelEntry:
    fields: dict[str, Any] = {
        "version": "1.0.0",
        "sha256": SHA,
        "size": 1024,
        "url": "https://blobs.example/sha256/" + SHA,
        "fallback": "0.9.0",
    }
    fields.update(overrides)
    return ModelEntry(**fields)


def desired_state(
    *,
    seq: int = 1,
    fleet: str = FLEET,
    device: str = DEVICE,
    expires_at: float = NOW + 3600,
    issued_at: float = NOW - 10,
    models: Mapping[str, ModelEntry] | None = None,
    extra: Mapping[str, Any] | None = None,
) -> DesiredState:
    return DesiredState(
        fleet=fleet,
        device=device,
        seq=seq,
        issued_at=issued_at,
        expires_at=expires_at,
        models=dict(models if models is not None else {"m": model()}),
        extra=dict(extra or {}),
    )


def desired(keys: Iterable[Ed25519PrivateKey], **kw: Any) -> bytes:
    """A desired-state envelope signed by every key in ``keys`` (in order, repeats kept)."""
    return sign_envelope(desired_state(**kw).to_dict(), list(keys))


def tamper_payload(raw: bytes, **changes: Any) -> bytes:
    """Change fields of a signed payload but keep the original signatures."""
    env = json.loads(raw)
    payload = json.loads(base64.b64decode(env["payload"]))
    payload.update(changes)
    body = json.dumps(payload, sort_keys=True, separators=(",", ":")).encode()
    env["payload"] = base64.b64encode(body).decode("ascii")
    return json.dumps(env).encode()
