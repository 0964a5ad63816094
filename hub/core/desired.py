"""Pure hub logic: building desired states and keyrings. No I/O, no clock (times are passed)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edgefleet.agent.contract.envelope import key_id, public_key_to_b64, sign_envelope
from edgefleet.agent.contract.wire import (
    DesiredState,
    KeyEntry,
    Keyring,
    ModelEntry,
    Reference,
    TensorSpec,
    format_time,
)

__all__ = [
    "KEYRING_LIFETIME_DAYS",
    "KEYRING_RENEW_DAYS",
    "build_desired",
    "build_keyring",
    "keyring_expiry",
    "model_entry",
]

# A keyring is signed by the root key, which is kept offline: renewing it is a ceremony, done by
# a person. A year makes that a yearly routine (like the CRL's 365 days) and bounds how long a
# device can be kept on an old keyring (one a broker replays, or a revocation withheld) without
# saying so; the hub warns 30 days ahead, time to fetch the root key from its safe.
KEYRING_LIFETIME_DAYS = 365
KEYRING_RENEW_DAYS = 30


def build_keyring(
    fleet: str, version: int, keys: list[Ed25519PrivateKey], root: Ed25519PrivateKey, now: float,
    threshold: int = 1, *, lifetime_days: float | None = KEYRING_LIFETIME_DAYS,
) -> bytes:
    """A root-signed keyring listing ``keys``, expiring ``lifetime_days`` after ``now`` (``None``:
    never, as keyrings did before they had an expiry)."""
    ring = Keyring(
        fleet=fleet,
        version=version,
        keys=tuple(
            KeyEntry(keyid=key_id(k.public_key()), public=public_key_to_b64(k.public_key()))
            for k in keys
        ),
        threshold=threshold,
        issued_at=now,
        expires_at=None if lifetime_days is None else now + lifetime_days * 86400,
    )
    return sign_envelope(ring.to_dict(), [root])


def keyring_expiry(ring: Keyring, now: float, renew_days: float = KEYRING_RENEW_DAYS) -> dict[str, Any]:
    """How the hub's keyring stands at ``now``: ``state`` is ``ok``, ``renew`` (it expires within
    ``renew_days``), ``expired``, or ``no_expiry`` (signed before keyrings expired); ``message``
    says what to do when it is not ``ok``."""
    out: dict[str, Any] = {"version": ring.version, "expires_at": ring.expires_at, "days_left": None,
                           "state": "ok", "message": ""}
    renew = ("renew it with the root key: edgefleet-hub keys renew-keyring --root-key PATH "
             "(hub stopped; docs/update-path.md, Key ceremonies)")
    if ring.expires_at is None:
        out.update(state="no_expiry", message=f"keyring v{ring.version} has no expiry (signed before keyrings "
                                              f"had one); {renew} to give it one")
        return out
    left = (ring.expires_at - now) / 86400
    out["days_left"] = round(left, 1)
    when = format_time(ring.expires_at)
    if left <= 0:
        out.update(state="expired", message=f"keyring v{ring.version} expired at {when}: devices enrolled "
                                            f"from now on refuse it, the others report it stale; {renew}")
    elif left <= renew_days:
        out.update(state="renew", message=f"keyring v{ring.version} expires at {when}, in {left:.1f} days: "
                                          f"{renew}")
    return out


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
