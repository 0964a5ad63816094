"""Trusted state: takes *bytes* (a keyring, a desired state) and returns verified objects.

It reads no files and no clock; the caller passes the stored state it holds and one reference
time taken at the start of a cycle. Rules, in the order they are applied:

Keyring (``{root}keyring``, retained)
  1. It is a signed envelope whose payload is an ``edgefleet.keyring/v1`` for our fleet.
  2. It carries a valid signature by the provisioned **root** key.
  3. Its ``version`` is not below the keyring already trusted (an old keyring cannot bring back
     a revoked key); the same version with different content is refused.

Desired state (``{root}devices/{device}/desired``, retained)
  1. A keyring has been verified (otherwise the state waits; it is not refused for good).
  2. At least ``threshold`` *distinct* keys of that keyring signed the payload (one key counts
     once); signatures by unknown keys are ignored, and if none is by a known key the refusal
     says ``unknown_key``, otherwise ``bad_signature``.
  3. The payload is an ``edgefleet.desired/v1`` naming this fleet and this device.
  4. ``seq`` is strictly above the last applied ``seq``. The very state already applied (same seq,
     same bytes) is recognised and yields ``None``: retained messages are redelivered on every
     reconnect. The same ``seq`` with other content is refused.
  5. ``expires_at`` lies after the reference time.
  6. Every model entry names a version, a 64-hex sha256, a positive size within the device's
     cap, and an http(s) URL, before any byte is downloaded.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from agent.envelope import Envelope, key_id, open_envelope, public_key_from_b64, valid_signers
from agent.errors import (
    BadSignature,
    Expired,
    IncompleteModel,
    MalformedMessage,
    StaleSequence,
    UnknownKey,
    WrongTarget,
)
from agent.wire import DesiredState, Keyring, format_time, parse_json_object

__all__ = ["NoKeyring", "TrustedState", "VerifiedDesired"]

SHA256_RE = re.compile(r"[0-9a-f]{64}")


class NoKeyring(UnknownKey):
    """A desired state came before any keyring: keep it and try again when one arrives."""

    reason = "no_keyring"


@dataclass(frozen=True)
class VerifiedDesired:
    state: DesiredState
    digest: str  # sha256 of the signed payload bytes
    raw: bytes


@dataclass
class TrustedState:
    """What a device trusts right now. The agent's store persists ``keyring_raw`` and ``last_*``."""

    root: Ed25519PublicKey
    fleet: str
    device: str
    max_blob_bytes: int | None = None
    keyring: Keyring | None = None
    keyring_raw: bytes | None = None
    last_seq: int = 0
    last_digest: str | None = None
    _keys: dict[str, Ed25519PublicKey] = field(default_factory=dict, repr=False)

    # -- keyring ---------------------------------------------------------------------------------

    def update_keyring(self, raw: bytes) -> Keyring | None:
        """Verify and adopt a keyring; ``None`` if it is the one already trusted."""
        env = open_envelope(raw)
        if not valid_signers(env, {key_id(self.root): self.root}):
            raise BadSignature(
                "keyring is not signed by this fleet's root key "
                f"(root key id {key_id(self.root)[:16]}…); a device trusts only keyrings "
                "signed by the root key it was provisioned with"
            )
        ring = Keyring.from_dict(parse_json_object(env.payload, "keyring payload"))
        if ring.fleet != self.fleet:
            raise WrongTarget(f"keyring is for fleet {ring.fleet!r}, this device is in {self.fleet!r}")
        if self.keyring is not None:
            if ring.version < self.keyring.version:
                raise StaleSequence(
                    f"keyring version {ring.version} is older than the trusted version "
                    f"{self.keyring.version}; an old keyring could bring back a revoked key",
                    reason="stale_keyring",
                )
            if ring.version == self.keyring.version:
                if self.keyring_raw is not None and env.payload == open_envelope(
                    self.keyring_raw
                ).payload:
                    return None
                raise StaleSequence(
                    f"keyring version {ring.version} is already trusted with other content; "
                    "a changed keyring needs a higher version",
                    reason="stale_keyring",
                )
        keys = {}
        for entry in ring.keys:
            pub = public_key_from_b64(entry.public)
            if key_id(pub) != entry.keyid:
                raise MalformedMessage(
                    f"keyring entry {entry.keyid[:16]}… does not match its public key "
                    f"(whose id is {key_id(pub)[:16]}…)"
                )
            keys[entry.keyid] = pub
        if ring.threshold > len(keys):
            raise MalformedMessage(
                f"keyring threshold {ring.threshold} exceeds its {len(keys)} distinct keys"
            )
        self.keyring, self.keyring_raw, self._keys = ring, raw, keys
        return ring

    # -- desired state ---------------------------------------------------------------------------

    def check_desired(self, raw: bytes, *, now: float) -> VerifiedDesired | None:
        """Verify a desired state against the trusted keyring at reference time ``now``.

        Returns ``None`` when ``raw`` is the state already applied (a redelivered retained
        message); raises a :class:`~agent.errors.Refused` subclass otherwise. Does not change
        ``last_seq``: call :meth:`mark_applied` once the state has been applied.
        """
        env = open_envelope(raw)
        if self.keyring is None:
            raise NoKeyring("no verified keyring yet; the desired state waits for one")
        self._check_signatures(env)
        state = DesiredState.from_dict(parse_json_object(env.payload, "desired payload"))
        if state.fleet != self.fleet or state.device != self.device:
            raise WrongTarget(
                f"desired state is for {state.fleet}/{state.device}, "
                f"this device is {self.fleet}/{self.device}"
            )
        digest = env.digest()
        if state.seq == self.last_seq and digest == self.last_digest:
            return None
        if state.seq <= self.last_seq:
            what = "the same seq with other content" if state.seq == self.last_seq else "older"
            raise StaleSequence(
                f"desired seq {state.seq} is not above the last applied seq {self.last_seq} "
                f"({what}); a replayed or rolled-back state is refused. To roll back, the hub "
                "issues a new state with a higher seq"
            )
        if state.expires_at <= now:
            raise Expired(
                f"desired state seq {state.seq} expired at {format_time(state.expires_at)}, "
                f"reference time is {format_time(now)}; the hub must re-sign it"
            )
        for name, entry in state.models.items():
            self._check_model(name, entry.version, entry.sha256, entry.size, entry.url)
        return VerifiedDesired(state=state, digest=digest, raw=raw)

    def mark_applied(self, verified: VerifiedDesired) -> None:
        self.last_seq = verified.state.seq
        self.last_digest = verified.digest

    def _check_signatures(self, env: Envelope) -> None:
        assert self.keyring is not None
        good = valid_signers(env, self._keys)
        if len(good) >= self.keyring.threshold:
            return
        known = [k for k, _ in env.signatures if k in self._keys]
        if not env.signatures:
            raise BadSignature("desired state carries no signature")
        if not known:
            ids = ", ".join(k[:16] + "…" for k, _ in env.signatures)
            raise UnknownKey(
                f"desired state is signed only by keys outside keyring v{self.keyring.version} "
                f"({ids}); was it signed by a revoked key or another fleet's hub?"
            )
        raise BadSignature(
            f"desired state has {len(good)} valid signature(s) by distinct keyring keys, "
            f"keyring v{self.keyring.version} requires {self.keyring.threshold}"
        )

    def _check_model(self, name: str, version: str, sha256: str, size: int, url: str) -> None:
        where = f"model {name!r} version {version!r}"
        if not version:
            raise IncompleteModel(f"model {name!r}: version is empty")
        if not SHA256_RE.fullmatch(sha256):
            raise IncompleteModel(f"{where}: sha256 must be 64 lowercase hex digits, got {sha256!r}")
        if size <= 0:
            raise IncompleteModel(f"{where}: size must be positive, got {size}")
        if self.max_blob_bytes is not None and size > self.max_blob_bytes:
            raise IncompleteModel(
                f"{where}: blob is {size} bytes, above this device's cap of "
                f"{self.max_blob_bytes} bytes (device profile max_blob_mb)",
                reason="blob_too_large",
            )
        if not url.startswith(("http://", "https://")):
            raise IncompleteModel(f"{where}: url must be http(s), got {url!r}")
