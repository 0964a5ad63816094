"""Keyring expiry in :class:`agent.core.trust.TrustedState`: an expired keyring is refused when it
arrives, the trusted one past its expiry is reported stale (and still verifies states), keyrings
without ``expires_at`` (signed before keyrings expired) are accepted as before. Pure: one explicit
reference time, no clock."""

from __future__ import annotations

import pytest

from edgefleet.agent.contract.errors import Expired, MalformedMessage
from edgefleet.agent.contract.wire import Keyring
from edgefleet.agent.core.trust import TrustedState
from tests._signing import DEVICE, FLEET, NOW, desired, key_entry, keyring, new_key


class Device:
    def __init__(self) -> None:
        self.root = new_key()
        self.signer = new_key()
        self.trust = TrustedState(root=self.root.public_key(), fleet=FLEET, device=DEVICE)

    def ring(self, version: int = 1, **kw: float | None) -> bytes:
        return keyring(self.root, [self.signer], version=version, **kw)  # type: ignore[arg-type]

    def apply(self, seq: int, *, now: float, issued_at: float | None = None, expires_at: float | None = None) -> None:
        issued = now if issued_at is None else issued_at
        v = self.trust.check_desired(
            desired([self.signer], seq=seq, issued_at=issued, expires_at=expires_at or issued + 3600), now=now)
        assert v is not None
        self.trust.mark_applied(v)


def _expired(call: object, *args: object, **kw: object) -> str:
    with pytest.raises(Expired) as info:
        call(*args, **kw)  # type: ignore[operator]
    assert info.value.reason == "keyring_expired"
    return str(info.value)


def test_an_expired_keyring_is_refused_when_it_arrives() -> None:
    d = Device()
    msg = _expired(d.trust.update_keyring, d.ring(expires_at=NOW), now=NOW)
    assert "keyring version 1 expired at" in msg and "renew" in msg
    assert d.trust.keyring is None
    assert d.trust.update_keyring(d.ring(expires_at=NOW + 1), now=NOW) is not None


def test_a_keyring_without_expires_at_is_accepted_and_never_stale() -> None:
    d = Device()
    raw = d.ring()
    assert b"expires_at" not in raw and Keyring.from_dict(Keyring(
        fleet=FLEET, version=1, keys=(key_entry(d.signer),)).to_dict()).expires_at is None
    far = NOW + 100 * 365 * 86400
    ring = d.trust.update_keyring(raw, now=far)
    assert ring is not None and ring.expires_at is None
    assert d.trust.stale_reasons(far) == ()


def test_the_time_floor_keeps_a_clock_at_1970_from_accepting_an_expired_keyring() -> None:
    d = Device()
    d.trust.update_keyring(d.ring(expires_at=NOW + 86400), now=NOW)
    d.apply(1, now=NOW)  # the floor is now NOW
    msg = _expired(d.trust.update_keyring, d.ring(version=2, issued_at=NOW - 7200, expires_at=NOW - 60), now=0.0)
    assert "device clock says 1970" in msg
    assert d.trust.keyring is not None and d.trust.keyring.version == 1


def test_the_trusted_keyring_past_its_expiry_is_stale_keeps_verifying_and_is_renewed() -> None:
    d = Device()
    raw = d.ring(expires_at=NOW + 60)
    d.trust.update_keyring(raw, now=NOW)
    assert d.trust.stale_reasons(NOW + 59) == ()
    assert d.trust.stale_reasons(NOW + 60) == ("keyring_expired",) and d.trust.stale(NOW + 60)
    # The retained keyring is redelivered on every reconnect: the trusted one, not a refusal.
    assert d.trust.update_keyring(raw, now=NOW + 61) is None
    # States its keys sign are still accepted (a late renewal must not stop every update).
    d.apply(1, now=NOW + 61)
    renewed = d.trust.update_keyring(d.ring(version=2, issued_at=NOW + 62, expires_at=NOW + 86400), now=NOW + 62)
    assert renewed is not None and renewed.version == 2
    assert d.trust.stale_reasons(NOW + 62) == ()


def test_a_stale_state_and_a_stale_keyring_are_both_named() -> None:
    d = Device()
    d.trust.update_keyring(d.ring(expires_at=NOW + 600), now=NOW)
    d.apply(1, now=NOW, expires_at=NOW + 300)
    assert d.trust.stale_reasons(NOW + 300) == ("expired",)
    assert d.trust.stale_reasons(NOW + 600) == ("expired", "keyring_expired")


def test_a_keyring_restored_from_the_devices_own_store_is_not_refused_again() -> None:
    """The agent restores the keyring it accepted earlier without a reference time: past its
    expiry it is reported stale, not dropped (the device would otherwise wait for a keyring)."""
    d = Device()
    assert d.trust.update_keyring(d.ring(issued_at=NOW - 7200, expires_at=NOW - 60)) is not None
    assert d.trust.stale_reasons(NOW) == ("keyring_expired",)


def test_a_keyring_expiring_before_it_was_issued_is_malformed() -> None:
    d = Device()
    with pytest.raises(MalformedMessage, match="not after its issued_at"):
        d.trust.update_keyring(d.ring(issued_at=NOW, expires_at=NOW), now=NOW - 3600)
