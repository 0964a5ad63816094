"""Signed envelopes: ``{"payload": <base64 canonical JSON>, "signatures": [{keyid, sig}]}``.

The signature covers the payload *bytes*, so the verifier never re-serialises anything. A key's
id is the hex sha256 of its raw 32-byte Ed25519 public key. This module only signs, opens and
checks signatures; which keys to trust is :mod:`agent.core.trust`'s business.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from edgefleet.agent.contract.ed25519 import VerifyKey, verify
from edgefleet.agent.contract.errors import MalformedMessage
from edgefleet.agent.contract.wire import canonical_json, parse_json_object

if TYPE_CHECKING:  # the agent only verifies (agent.ed25519); cryptography's keys come from the hub
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

__all__ = [
    "Envelope",
    "key_id",
    "open_envelope",
    "public_key_from_b64",
    "public_key_to_b64",
    "sign_envelope",
    "valid_signers",
]


def public_raw(key: VerifyKey | Ed25519PublicKey) -> bytes:
    if isinstance(key, VerifyKey):
        return key.raw
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    return key.public_bytes(Encoding.Raw, PublicFormat.Raw)


def key_id(key: VerifyKey | Ed25519PublicKey) -> str:
    return hashlib.sha256(public_raw(key)).hexdigest()


def public_key_to_b64(key: VerifyKey | Ed25519PublicKey) -> str:
    return base64.b64encode(public_raw(key)).decode("ascii")


def public_key_from_b64(text: str) -> VerifyKey:
    try:
        raw = base64.b64decode(text, validate=True)
        return VerifyKey(raw)
    except (binascii.Error, ValueError) as exc:
        raise MalformedMessage(
            f"expected a base64 raw 32-byte Ed25519 public key, got {text!r:.60}"
        ) from exc


@dataclass(frozen=True)
class Envelope:
    payload: bytes
    signatures: tuple[tuple[str, bytes], ...]  # (keyid, signature)

    def digest(self) -> str:
        return hashlib.sha256(self.payload).hexdigest()


def sign_envelope(payload: Mapping[str, Any], keys: Iterable[Ed25519PrivateKey]) -> bytes:
    """Serialise ``payload`` canonically and sign it with every key given."""
    body = canonical_json(payload)
    sigs = [
        {
            "keyid": key_id(k.public_key()),
            "sig": base64.b64encode(k.sign(body)).decode("ascii"),
        }
        for k in keys
    ]
    return canonical_json({"payload": base64.b64encode(body).decode("ascii"), "signatures": sigs})


def open_envelope(data: bytes | str) -> Envelope:
    """Split raw bytes into payload and signatures; no signature is checked here."""
    obj = parse_json_object(data, "signed envelope")
    payload, sigs = obj.get("payload"), obj.get("signatures")
    if not isinstance(payload, str) or not isinstance(sigs, list):
        raise MalformedMessage(
            "signed envelope must be {'payload': base64 string, 'signatures': [...]}, "
            f"got keys {sorted(obj)}"
        )
    try:
        body = base64.b64decode(payload, validate=True)
    except binascii.Error as exc:
        raise MalformedMessage(f"envelope payload is not base64: {exc}") from exc
    out: list[tuple[str, bytes]] = []
    for i, s in enumerate(sigs):
        if not isinstance(s, dict) or not isinstance(s.get("keyid"), str):
            raise MalformedMessage(f"signature {i} must be an object with a string 'keyid'")
        try:
            out.append((s["keyid"], base64.b64decode(str(s.get("sig", "")), validate=True)))
        except binascii.Error as exc:
            raise MalformedMessage(f"signature {i} is not base64: {exc}") from exc
    return Envelope(payload=body, signatures=tuple(out))


def valid_signers(env: Envelope, trusted: Mapping[str, VerifyKey | Ed25519PublicKey]) -> set[str]:
    """The distinct trusted key ids whose signature over the payload verifies.

    A key listed twice counts once, so a threshold cannot be met by repeating one signature.
    """
    good: set[str] = set()
    for keyid, sig in env.signatures:
        key = trusted.get(keyid)
        if key is None or keyid in good:
            continue
        if verify(public_raw(key), sig, env.payload):
            good.add(keyid)
    return good
