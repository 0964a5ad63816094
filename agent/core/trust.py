"""Trusted state: takes *bytes* (a keyring, a desired state) and returns verified objects.

It reads no files and no clock; the caller passes the stored state it holds and one reference
time taken at the start of a cycle. Rules, in the order they are applied:

Root (provisioned, then ``{root}roots``, retained)
  1. The device starts from the root key it was provisioned with: root version 1.
  2. A rotation is an ``edgefleet.root/v1`` payload (``fleet``, ``version``, ``public``) signed
     by the **current** root key *and* the **new** one; only version N -> N+1 is accepted, so a
     device offline through several rotations walks the chain one link at a time. Links at or
     below the trusted version are skipped; a gap is refused (``root_gap``).
  3. After a rotation the trusted keyring must verify under the new root, or it is dropped and
     the device waits for one that does.
  4. A rotation with ``reset_seq: true`` is the only way to recover from a fast-forward attack
     (a stolen signing key that pushed ``seq`` sky-high): it resets the stored ``seq`` to 0 *and*
     drops the keyring, so states signed by the old signing keys stop verifying once the hub
     publishes a keyring of fresh keys under the new root.
  5. The accepted chain is persisted by the caller (:attr:`TrustedState.root_chain`) and replayed
     from the provisioned key on restart, so a rebooted device trusts the new root.

Keyring (``{root}keyring``, retained)
  1. It is a signed envelope whose payload is an ``edgefleet.keyring/v1`` for our fleet.
  2. It carries a valid signature by the currently trusted **root** key.
  3. Its ``version`` is not below the keyring already trusted (an old keyring cannot bring back
     a revoked key); the same version with different content is refused.
  4. Signing keys rotate by a new keyring version. A key dropped from the keyring no longer
     counts; a key listed in the keyring's ``revoked`` ids is named as revoked in the refusal
     (``revoked_key``) and may not also be listed as a valid key.
  5. Its ``expires_at``, when it has one, lies after the reference time (the same as for desired
     states, rule 5 below: the device clock, never earlier than the time floor); otherwise it is
     refused when it arrives (``keyring_expired``), so an old keyring kept back by a broker cannot
     be fed to a device. The keyring already trusted, redelivered, is recognised before this
     check (as in rule 3) and yields ``None``, and a keyring restored from the device's own store
     (``now`` not given) is not checked again. A keyring without ``expires_at`` (signed before
     keyrings had one) never expires: the wire stays backwards compatible both ways (an older
     agent reads ``expires_at`` as an unknown field and ignores it).
  6. The trusted keyring past its expiry keeps verifying desired states (refusing them would
     turn a late renewal, a ceremony with the offline root key, into a fleet-wide stop of
     updates, rollbacks included); :meth:`TrustedState.stale_reasons` names it
     (``keyring_expired``) so the agent reports it, as it reports an expired desired state.

Desired state (``{root}devices/{device}/desired``, retained)
  1. A keyring has been verified (otherwise the state waits; it is not refused for good).
  2. At least ``threshold`` *distinct* keys of that keyring signed the payload (one key counts
     once, however often it appears); signatures by unknown keys are ignored. Refusal reasons:
     ``unsigned`` (no signature at all), ``revoked_key`` (signed by a revoked key),
     ``unknown_key`` (no signature by a keyring key), ``below_threshold`` (fewer valid distinct
     keyring signatures than the threshold, including one key repeated), ``bad_signature``.
  3. The payload is an ``edgefleet.desired/v1`` naming this fleet and this device.
  4. ``seq`` is strictly above the last applied ``seq``, checked *before* expiry, so an old state
     is refused as ``stale_seq`` even when the stored one has expired. The very payload already
     applied (same bytes) is recognised first and yields ``None``: retained messages are
     redelivered on every reconnect, and a signing-key rotation must not turn that redelivery
     into a refusal. The same ``seq`` with other content is refused
     (``seq_conflict``) and nothing is stored.
  5. ``expires_at`` lies after the reference time: the device clock ``now`` (one value the caller
     takes at the start of a cycle and passes to every check of that cycle), but never earlier
     than the *time floor*: the latest ``issued_at`` of a state this device applied, and at least
     :data:`MIN_PLAUSIBLE_TIME` (before this agent was released nothing can have been signed for
     it). A device without a real-time clock that boots at 1970 therefore refuses states that
     expired long ago. When the clock is plausible (not behind the floor), a state issued more
     than :data:`MAX_FUTURE_SKEW` after it is refused (``issued_in_future``): otherwise one state
     from a hub with a wrong clock, or from a stolen key, would push the floor past every honest
     state's expiry. A root rotation with ``reset_seq`` also resets the floor.
  6. Every model entry names a version, a 64-hex sha256, a positive size within the device's
     cap, and an http(s) URL, before any byte is downloaded.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from edgefleet.agent.contract.ed25519 import VerifyKey
from edgefleet.agent.contract.envelope import (
    Envelope,
    key_id,
    open_envelope,
    public_key_from_b64,
    valid_signers,
)
from edgefleet.agent.contract.errors import (
    BadSignature,
    Expired,
    IncompleteModel,
    MalformedMessage,
    StaleSequence,
    UnknownKey,
    WrongTarget,
)
from edgefleet.agent.contract.wire import DesiredState, Keyring, check_name, format_time, parse_json_object

# The earliest moment anything can have been signed for this agent version (2026-01-01T00:00Z):
# raised with releases. A device clock earlier than this is known to be wrong.
MIN_PLAUSIBLE_TIME = 1_767_225_600.0
# How far ahead of a plausible device clock a state's issued_at may be (clock drift between hub
# and device, and devices whose NTP has not settled yet).
MAX_FUTURE_SKEW = 24 * 3600.0

# The state-file keys TrustedState.state_fields writes.
TRUST_FIELDS = ("keyring", "roots", "last_seq", "last_digest", "time_floor", "applied_expires_at")

__all__ = [
    "MAX_FUTURE_SKEW",
    "MIN_PLAUSIBLE_TIME",
    "ROOTS_KIND",
    "ROOT_KIND",
    "TRUST_FIELDS",
    "NoKeyring",
    "RootRotation",
    "TrustedState",
    "VerifiedDesired",
    "roots_message",
]

SHA256_RE = re.compile(r"[0-9a-f]{64}")
ROOT_KIND = "edgefleet.root/v1"
ROOTS_KIND = "edgefleet.roots/v1"


@dataclass(frozen=True)
class RootRotation:
    """One link of the root chain: root ``version`` is the key ``public`` (base64 Ed25519)."""

    fleet: str
    version: int
    public: str
    reset_seq: bool = False

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> RootRotation:
        if d.get("kind") != ROOT_KIND:
            raise MalformedMessage(f"expected kind {ROOT_KIND!r}, got {d.get('kind')!r}")
        version, public, reset = d.get("version"), d.get("public"), d.get("reset_seq", False)
        if isinstance(version, bool) or not isinstance(version, int) or version < 2:
            raise MalformedMessage(f"root.version must be an integer >= 2, got {version!r}")
        if not isinstance(public, str) or not isinstance(reset, bool):
            raise MalformedMessage("root.public must be a string and root.reset_seq a boolean")
        return cls(fleet=check_name(d.get("fleet"), "fleet"), version=version, public=public,
                   reset_seq=reset)

    def to_dict(self) -> dict[str, Any]:
        return {"kind": ROOT_KIND, "fleet": self.fleet, "version": self.version,
                "public": self.public, "reset_seq": self.reset_seq}


def roots_message(chain: list[bytes]) -> bytes:
    """The retained ``{root}roots`` payload: every rotation envelope, oldest first."""
    return json.dumps({"kind": ROOTS_KIND, "chain": [c.decode() for c in chain]}).encode()


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

    root: VerifyKey
    fleet: str
    device: str
    max_blob_bytes: int | None = None
    keyring: Keyring | None = None
    keyring_raw: bytes | None = None
    last_seq: int = 0
    last_digest: str | None = None
    root_version: int = 1
    root_chain: list[bytes] = field(default_factory=list)  # accepted rotations, oldest first
    # Latest issued_at among applied states, and the applied state's expiry (both persisted).
    time_floor: float = 0.0
    applied_expires_at: float | None = None
    _keys: dict[str, VerifyKey] = field(default_factory=dict, repr=False)
    _revoked: frozenset[str] = field(default_factory=frozenset, repr=False)

    # -- root ------------------------------------------------------------------------------------

    def update_root(self, raw: bytes) -> RootRotation | None:
        """Adopt one root rotation (N -> N+1); ``None`` if it is at or below the trusted version."""
        env = open_envelope(raw)
        rot = RootRotation.from_dict(parse_json_object(env.payload, "root payload"))
        if rot.fleet != self.fleet:
            raise WrongTarget(
                f"root rotation is for fleet {rot.fleet!r}, this device is in {self.fleet!r}"
            )
        if rot.version <= self.root_version:
            return None
        if rot.version != self.root_version + 1:
            raise StaleSequence(
                f"root rotation to version {rot.version} skips from trusted version "
                f"{self.root_version}; rotations are accepted one step at a time (N -> N+1), "
                "publish the whole chain",
                reason="root_gap",
            )
        new = public_key_from_b64(rot.public)
        old_id, new_id = key_id(self.root), key_id(new)
        good = valid_signers(env, {old_id: self.root, new_id: new})
        missing = [n for n, k in (("current", old_id), ("new", new_id)) if k not in good]
        if missing:
            raise BadSignature(
                f"root rotation to version {rot.version} lacks a valid signature by the "
                f"{' and the '.join(missing)} root key; a rotation must be signed by both",
                reason="root_signature",
            )
        self.root, self.root_version = new, rot.version
        self.root_chain = [*self.root_chain, raw]
        if rot.reset_seq:
            self.last_seq, self.last_digest = 0, None
            self.time_floor, self.applied_expires_at = 0.0, None
            self._drop_keyring()
        elif self.keyring_raw is not None and not valid_signers(
            open_envelope(self.keyring_raw), {new_id: new}
        ):
            self._drop_keyring()
        return rot

    def update_roots(self, raw: bytes) -> list[RootRotation]:
        """Walk an ``edgefleet.roots/v1`` chain; return the rotations newly adopted."""
        msg = parse_json_object(raw, "root chain")
        chain = msg.get("chain")
        if msg.get("kind") != ROOTS_KIND or not isinstance(chain, list):
            raise MalformedMessage(f"expected a {ROOTS_KIND} object with a 'chain' list")
        adopted = []
        for link in chain:
            if not isinstance(link, str):
                raise MalformedMessage("root chain entries must be envelope strings")
            rot = self.update_root(link.encode())
            if rot is not None:
                adopted.append(rot)
        return adopted

    def _drop_keyring(self) -> None:
        self.keyring, self.keyring_raw = None, None
        self._keys, self._revoked = {}, frozenset()

    # -- keyring ---------------------------------------------------------------------------------

    def update_keyring(self, raw: bytes, *, now: float | None = None) -> Keyring | None:
        """Verify and adopt a keyring; ``None`` if it is the one already trusted. ``now`` is the
        cycle's reference time for the expiry check; ``None`` only to restore the keyring this
        device already accepted (from its own store)."""
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
        if now is not None and ring.expires_at is not None:
            ref = max(now, self.floor())
            if ring.expires_at <= ref:
                why = "" if ref == now else (f" (the device clock says {format_time(now)}, but this device "
                                             f"has verified a state issued at {format_time(ref)})")
                raise Expired(
                    f"keyring version {ring.version} expired at {format_time(ring.expires_at)}, reference "
                    f"time is {format_time(ref)}{why}; the root key holder must renew it "
                    "(edgefleet-hub keys renew-keyring)",
                    reason="keyring_expired",
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
        revoked = ring.extra.get("revoked", [])
        if not isinstance(revoked, list) or not all(isinstance(r, str) for r in revoked):
            raise MalformedMessage("keyring 'revoked' must be a list of key ids")
        if set(revoked) & set(keys):
            raise MalformedMessage("keyring lists a key both as valid and as revoked")
        self.keyring, self.keyring_raw, self._keys = ring, raw, keys
        self._revoked = frozenset(revoked)
        return ring

    # -- desired state ---------------------------------------------------------------------------

    def check_desired(self, raw: bytes, *, now: float) -> VerifiedDesired | None:
        """Verify a desired state against the trusted keyring at reference time ``now``.

        Returns ``None`` when ``raw`` is the state already applied (a redelivered retained
        message); raises a :class:`~agent.contract.errors.Refused` subclass otherwise. Does not change
        ``last_seq``: call :meth:`mark_applied` once the state has been applied.
        """
        env = open_envelope(raw)
        if self.last_digest is not None and env.digest() == self.last_digest:
            # The very payload already verified and applied (a retained redelivery): nothing to
            # do, even if the key that signed it has since been rotated out.
            return None
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
        if state.seq <= self.last_seq:
            same = state.seq == self.last_seq
            what = "the same seq with other content" if same else "older"
            raise StaleSequence(
                f"desired seq {state.seq} is not above the last applied seq {self.last_seq} "
                f"({what}); a replayed or rolled-back state is refused. To roll back, the hub "
                "issues a new state with a higher seq",
                reason="seq_conflict" if same else "stale_seq",
            )
        floor = self.floor()
        if now >= floor and state.issued_at > now + MAX_FUTURE_SKEW:
            raise Expired(
                f"desired state seq {state.seq} is issued at {format_time(state.issued_at)}, more than "
                f"{MAX_FUTURE_SKEW / 3600:g} h after this device's clock ({format_time(now)}); check the "
                "hub's clock (a state from the future would make every later honest one look expired)",
                reason="issued_in_future",
            )
        ref = max(now, floor)
        if state.expires_at <= ref:
            why = "" if ref == now else (f" (the device clock says {format_time(now)}, but this device "
                                         f"has verified a state issued at {format_time(floor)})")
            raise Expired(
                f"desired state seq {state.seq} expired at {format_time(state.expires_at)}, "
                f"reference time is {format_time(ref)}{why}; the hub must re-sign it"
            )
        for name, entry in state.models.items():
            self._check_model(name, entry.version, entry.sha256, entry.size, entry.url)
        return VerifiedDesired(state=state, digest=digest, raw=raw)

    def state_fields(self) -> dict[str, Any]:
        """What the agent's state file keeps of this (the keys ``TRUST_FIELDS`` names)."""
        return {
            "keyring": self.keyring_raw.decode() if self.keyring_raw else None,
            "roots": [r.decode() for r in self.root_chain],
            "last_seq": self.last_seq,
            "last_digest": self.last_digest,
            "time_floor": self.time_floor,
            "applied_expires_at": self.applied_expires_at,
        }

    def mark_applied(self, verified: VerifiedDesired) -> None:
        self.last_seq = verified.state.seq
        self.last_digest = verified.digest
        self.time_floor = max(self.time_floor, verified.state.issued_at)
        self.applied_expires_at = verified.state.expires_at

    def floor(self) -> float:
        """The earliest time it can be: nothing verified here was issued later than now."""
        return max(MIN_PLAUSIBLE_TIME, self.time_floor)

    def stale(self, now: float) -> bool:
        """Something trusted has expired and nothing newer came (:meth:`stale_reasons`)."""
        return bool(self.stale_reasons(now))

    def stale_reasons(self, now: float) -> tuple[str, ...]:
        """What has expired at reference time ``now`` with nothing newer to replace it:

        ``expired``          the applied desired state: the hub is down, cut off, or someone is
                             withholding updates (a freeze);
        ``keyring_expired``  the trusted keyring: nobody renewed it (a ceremony with the root key),
                             or a renewed one is withheld.

        The device keeps serving (and keeps accepting states its keyring verifies) and says so."""
        ref = max(now, self.floor())
        reasons = []
        if self.applied_expires_at is not None and self.applied_expires_at <= ref:
            reasons.append("expired")
        if self.keyring is not None and self.keyring.expires_at is not None and self.keyring.expires_at <= ref:
            reasons.append("keyring_expired")
        return tuple(reasons)

    def _check_signatures(self, env: Envelope) -> None:
        assert self.keyring is not None
        good = valid_signers(env, self._keys)
        if len(good) >= self.keyring.threshold:
            return
        known = [k for k, _ in env.signatures if k in self._keys]
        if not env.signatures:
            raise BadSignature("desired state carries no signature", reason="unsigned")
        revoked = sorted({k for k, _ in env.signatures if k in self._revoked})
        if revoked:
            names = ", ".join(k[:16] + "…" for k in revoked)
            raise UnknownKey(
                f"desired state is signed by revoked key(s) {names} "
                f"(keyring v{self.keyring.version}) and lacks {self.keyring.threshold} valid "
                "signature(s) by current keys; re-sign it with a current key",
                reason="revoked_key",
            )
        if not known:
            ids = ", ".join(k[:16] + "…" for k, _ in env.signatures)
            raise UnknownKey(
                f"desired state is signed only by keys outside keyring v{self.keyring.version} "
                f"({ids}); was it signed by a revoked key or another fleet's hub?"
            )
        dup = len(known) > len(set(known))
        raise BadSignature(
            f"desired state has {len(good)} valid signature(s) by distinct keyring keys, "
            f"keyring v{self.keyring.version} requires {self.keyring.threshold}"
            + ("; a key listed more than once counts once" if dup else ""),
            reason=(
                "below_threshold" if good or dup or self.keyring.threshold > 1 else "bad_signature"
            ),
        )

    def check_blob(self, name: str, version: str, sha256: str, size: int, url: str) -> None:
        """The checks every model entry of a desired state passes, for blobs named inside an
        entry (a canary's stable version, a preflight set); raises IncompleteModel."""
        self._check_model(name, version, sha256, size, url)

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
