"""Pure hub logic: building desired states and keyrings. No I/O, no clock (times are passed)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edgefleet.agent.contract.envelope import key_id, public_key_to_b64, sign_envelope
from edgefleet.agent.contract.wire import DesiredState, KeyEntry, Keyring, ModelEntry, Reference, TensorSpec

__all__ = ["build_desired", "build_keyring", "model_entry"]


def build_keyring(
    fleet: str, version: int, keys: list[Ed25519PrivateKey], root: Ed25519PrivateKey, now: float,
    threshold: int = 1,
) -> bytes:
    ring = Keyring(
        fleet=fleet,
        version=version,
        keys=tuple(
            KeyEntry(keyid=key_id(k.public_key()), public=public_key_to_b64(k.public_key()))
            for k in keys
        ),
        threshold=threshold,
        issued_at=now,
    )
    return sign_envelope(ring.to_dict(), [root])


def model_entry(model: Mapping[str, Any], blob_base: str, fallback: str | None) -> ModelEntry:
    """A desired-state entry for one registry row (``hub.db`` model dict)."""
    ref = model.get("reference")
    return ModelEntry(
        version=model["version"],
        sha256=model["sha256"],
        size=model["size"],
        url=f"{blob_base.rstrip('/')}/blobs/{model['sha256']}",
        inputs=tuple(TensorSpec.from_dict(t) for t in model["inputs"]),
        outputs=tuple(TensorSpec.from_dict(t) for t in model["outputs"]),
        reference=Reference.from_dict(ref) if ref else None,
        fallback=fallback,
    )


def build_desired(
    *,
    fleet: str,
    device: str,
    seq: int,
    now: float,
    ttl: float,
    models: Mapping[str, ModelEntry],
    signing_key: Ed25519PrivateKey,
) -> tuple[DesiredState, bytes]:
    state = DesiredState(
        fleet=fleet, device=device, seq=seq, issued_at=now, expires_at=now + ttl, models=models
    )
    return state, sign_envelope(state.to_dict(), [signing_key])
