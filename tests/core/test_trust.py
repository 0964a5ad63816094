"""Every refusal of :class:`agent.core.trust.TrustedState`, each with its exception type and reason,
plus the states it must accept. Real Ed25519 keys, one explicit reference time, no clock."""

from __future__ import annotations

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edgefleet.agent.contract.errors import (
    BadSignature,
    Expired,
    IncompleteModel,
    StaleSequence,
    UnknownKey,
    WrongTarget,
)
from edgefleet.agent.contract.wire import Keyring
from edgefleet.agent.core.trust import NoKeyring, TrustedState
from tests._signing import (
    DEVICE,
    FLEET,
    NOW,
    desired,
    keyring,
    kid,
    model,
    new_key,
    tamper_payload,
)


class Fleet:
    """One root key, its signing keys and a device that trusts the root."""

    def __init__(self, *, signers: int = 1, threshold: int = 1, max_blob_bytes: int | None = None):
        self.root = new_key()
        self.signers = [new_key() for _ in range(signers)]
        self.threshold = threshold
        self.trusted = TrustedState(
            root=self.root.public_key(), fleet=FLEET, device=DEVICE, max_blob_bytes=max_blob_bytes
        )

    def adopt_keyring(self) -> Keyring:
        ring = self.trusted.update_keyring(
            keyring(self.root, self.signers, threshold=self.threshold)
        )
        assert ring is not None
        return ring


@pytest.fixture
def fleet() -> Fleet:
    f = Fleet()
    f.adopt_keyring()
    return f


def _refusal(exc: type[Exception], reason: str, call: object, *args: object, **kw: object) -> str:
    with pytest.raises(exc) as info:
        call(*args, **kw)  # type: ignore[operator]
    assert type(info.value) is exc, f"expected exactly {exc.__name__}, got {type(info.value)}"
    assert info.value.reason == reason  # type: ignore[attr-defined]
    return str(info.value)


# --- keyring ------------------------------------------------------------------------------------


def test_keyring_not_signed_by_root_is_refused() -> None:
    f = Fleet()
    impostor = new_key()
    msg = _refusal(
        BadSignature, "bad_signature", f.trusted.update_keyring, keyring(impostor, f.signers)
    )
    assert "root key" in msg
    assert f.trusted.keyring is None


def test_keyring_signed_by_a_signing_key_instead_of_root_is_refused(fleet: Fleet) -> None:
    raw = keyring(fleet.signers[0], fleet.signers, version=2)
    _refusal(BadSignature, "bad_signature", fleet.trusted.update_keyring, raw)
    assert fleet.trusted.keyring is not None
    assert fleet.trusted.keyring.version == 1


def test_keyring_for_another_fleet_is_refused() -> None:
    f = Fleet()
    msg = _refusal(
        WrongTarget, "wrong_target", f.trusted.update_keyring,
        keyring(f.root, f.signers, fleet="fleet-b"),
    )
    assert "fleet-b" in msg
    assert f.trusted.keyring is None


def test_older_keyring_version_is_refused() -> None:
    f = Fleet()
    assert f.trusted.update_keyring(keyring(f.root, f.signers, version=5)) is not None
    _refusal(
        StaleSequence, "stale_keyring", f.trusted.update_keyring,
        keyring(f.root, f.signers, version=4),
    )
    assert f.trusted.keyring is not None
    assert f.trusted.keyring.version == 5


def test_same_keyring_version_with_other_content_is_refused(fleet: Fleet) -> None:
    other = keyring(fleet.root, [*fleet.signers, new_key()], version=1)
    _refusal(StaleSequence, "stale_keyring", fleet.trusted.update_keyring, other)
    assert fleet.trusted.keyring is not None
    assert len(fleet.trusted.keyring.keys) == 1


def test_same_keyring_redelivered_returns_none(fleet: Fleet) -> None:
    assert fleet.trusted.update_keyring(keyring(fleet.root, fleet.signers, version=1)) is None


# --- desired state: keys and signatures ---------------------------------------------------------


def test_desired_before_any_keyring_waits() -> None:
    f = Fleet()
    _refusal(NoKeyring, "no_keyring", f.trusted.check_desired, desired(f.signers), now=NOW)


def test_desired_with_no_signature_is_refused(fleet: Fleet) -> None:
    _refusal(BadSignature, "unsigned", fleet.trusted.check_desired, desired([]), now=NOW)


def test_desired_signed_by_key_outside_keyring_is_refused(fleet: Fleet) -> None:
    stranger = new_key()
    msg = _refusal(
        UnknownKey, "unknown_key", fleet.trusted.check_desired, desired([stranger]), now=NOW
    )
    assert kid(stranger)[:16] in msg


def test_desired_with_tampered_payload_is_refused_as_bad_signature(fleet: Fleet) -> None:
    raw = tamper_payload(desired(fleet.signers, seq=1), seq=99)
    _refusal(BadSignature, "bad_signature", fleet.trusted.check_desired, raw, now=NOW)


def test_same_key_signing_twice_counts_once_against_threshold_two() -> None:
    f = Fleet(signers=2, threshold=2)
    f.adopt_keyring()
    a, b = f.signers
    msg = _refusal(
        BadSignature, "below_threshold", f.trusted.check_desired, desired([a, a]), now=NOW
    )
    assert "counts once" in msg
    assert f.trusted.check_desired(desired([a, b]), now=NOW) is not None


def test_one_of_two_required_signatures_is_below_threshold() -> None:
    f = Fleet(signers=2, threshold=2)
    f.adopt_keyring()
    _refusal(
        BadSignature, "below_threshold", f.trusted.check_desired,
        desired([f.signers[0], new_key()]), now=NOW,
    )


# --- desired state: target, seq, expiry ---------------------------------------------------------


def test_desired_for_another_device_is_refused(fleet: Fleet) -> None:
    raw = desired(fleet.signers, device="dev-2")
    msg = _refusal(WrongTarget, "wrong_target", fleet.trusted.check_desired, raw, now=NOW)
    assert "dev-2" in msg


def test_desired_for_another_fleet_is_refused(fleet: Fleet) -> None:
    raw = desired(fleet.signers, fleet="fleet-b")
    msg = _refusal(WrongTarget, "wrong_target", fleet.trusted.check_desired, raw, now=NOW)
    assert "fleet-b" in msg


def test_older_seq_after_apply_is_refused_as_replay(fleet: Fleet) -> None:
    old = desired(fleet.signers, seq=4)
    v = fleet.trusted.check_desired(desired(fleet.signers, seq=5), now=NOW)
    assert v is not None
    fleet.trusted.mark_applied(v)
    _refusal(StaleSequence, "stale_seq", fleet.trusted.check_desired, old, now=NOW)


def test_replay_is_refused_as_stale_even_when_also_expired(fleet: Fleet) -> None:
    v = fleet.trusted.check_desired(desired(fleet.signers, seq=5), now=NOW)
    assert v is not None
    fleet.trusted.mark_applied(v)
    old = desired(fleet.signers, seq=4, expires_at=NOW - 1)
    _refusal(StaleSequence, "stale_seq", fleet.trusted.check_desired, old, now=NOW)


def test_same_seq_with_other_content_is_refused(fleet: Fleet) -> None:
    v = fleet.trusted.check_desired(desired(fleet.signers, seq=5), now=NOW)
    assert v is not None
    fleet.trusted.mark_applied(v)
    other = desired(fleet.signers, seq=5, models={"m": model(version="1.0.1")})
    _refusal(StaleSequence, "seq_conflict", fleet.trusted.check_desired, other, now=NOW)
    assert fleet.trusted.last_digest == v.digest


def test_same_seq_same_bytes_returns_none(fleet: Fleet) -> None:
    raw = desired(fleet.signers, seq=5)
    v = fleet.trusted.check_desired(raw, now=NOW)
    assert v is not None
    fleet.trusted.mark_applied(v)
    assert fleet.trusted.check_desired(raw, now=NOW) is None


def test_expired_state_is_refused(fleet: Fleet) -> None:
    raw = desired(fleet.signers, expires_at=NOW + 60)
    assert fleet.trusted.check_desired(raw, now=NOW) is not None
    msg = _refusal(Expired, "expired", fleet.trusted.check_desired, raw, now=NOW + 61)
    assert "expired" in msg
    _refusal(Expired, "expired", fleet.trusted.check_desired, raw, now=NOW + 60)


# --- desired state: model entries ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("entry", "reason"),
    [
        (model(sha256="AB" * 32), "incomplete_model"),  # upper case
        (model(sha256="ab" * 31), "incomplete_model"),  # too short
        (model(sha256="zz" * 32), "incomplete_model"),
        (model(size=0), "incomplete_model"),
        (model(url="ftp://blobs.example/m"), "incomplete_model"),
        (model(url="file:///etc/passwd"), "incomplete_model"),
        (model(version=""), "incomplete_model"),
        (model(size=2049), "blob_too_large"),
    ],
    ids=["sha_upper", "sha_short", "sha_nonhex", "size_zero", "url_ftp", "url_file",
         "version_empty", "too_large"],
)
def test_bad_model_entry_is_refused(entry: object, reason: str) -> None:
    f = Fleet(max_blob_bytes=2048)
    f.adopt_keyring()
    raw = desired(f.signers, models={"m": entry})  # type: ignore[dict-item]
    _refusal(IncompleteModel, reason, f.trusted.check_desired, raw, now=NOW)


def test_model_at_exactly_the_cap_is_accepted() -> None:
    f = Fleet(max_blob_bytes=2048)
    f.adopt_keyring()
    assert f.trusted.check_desired(desired(f.signers, models={"m": model(size=2048)}), now=NOW)


# --- accepted -----------------------------------------------------------------------------------


def test_valid_state_is_accepted(fleet: Fleet) -> None:
    raw = desired(fleet.signers, seq=3)
    v = fleet.trusted.check_desired(raw, now=NOW)
    assert v is not None
    assert v.raw == raw
    assert v.state.seq == 3
    assert v.state.models["m"].version == "1.0.0"
    assert fleet.trusted.last_seq == 0  # check_desired does not apply
    fleet.trusted.mark_applied(v)
    assert (fleet.trusted.last_seq, fleet.trusted.last_digest) == (3, v.digest)
    nxt = fleet.trusted.check_desired(desired(fleet.signers, seq=4), now=NOW)
    assert nxt is not None


def test_signature_by_unknown_key_beside_a_valid_one_is_ignored(fleet: Fleet) -> None:
    raw = desired([new_key(), *fleet.signers])
    assert fleet.trusted.check_desired(raw, now=NOW) is not None


def test_signing_key_rotation() -> None:
    f = Fleet()
    f.adopt_keyring()
    old: Ed25519PrivateKey = f.signers[0]
    applied = f.trusted.check_desired(desired([old], seq=1), now=NOW)
    assert applied is not None
    f.trusted.mark_applied(applied)

    new = new_key()
    ring = f.trusted.update_keyring(keyring(f.root, [new], version=2))
    assert ring is not None
    assert ring.version == 2

    assert f.trusted.check_desired(desired([new], seq=2), now=NOW) is not None
    msg = _refusal(
        UnknownKey, "unknown_key", f.trusted.check_desired, desired([old], seq=3), now=NOW
    )
    assert kid(old)[:16] in msg
    # the state already applied, signed by the rotated-out key, is a redelivery, not a refusal
    assert f.trusted.check_desired(desired([old], seq=1), now=NOW) is None


def test_rotated_key_listed_as_revoked_is_named_revoked() -> None:
    f = Fleet()
    f.adopt_keyring()
    old, new = f.signers[0], new_key()
    f.trusted.update_keyring(keyring(f.root, [new], version=2, extra={"revoked": [kid(old)]}))
    _refusal(UnknownKey, "revoked_key", f.trusted.check_desired, desired([old]), now=NOW)


# --- the clock ----------------------------------------------------------------------------------


def test_a_device_clock_at_1970_cannot_revive_states_that_expired_long_ago(fleet: Fleet) -> None:
    from edgefleet.agent.core.trust import MIN_PLAUSIBLE_TIME

    old = desired(fleet.signers, issued_at=MIN_PLAUSIBLE_TIME - 7200, expires_at=MIN_PLAUSIBLE_TIME - 3600)
    msg = _refusal(Expired, "expired", fleet.trusted.check_desired, old, now=3600.0)
    assert "the device clock says 1970" in msg


def test_the_floor_is_the_latest_issued_at_this_device_applied(fleet: Fleet) -> None:
    t = fleet.trusted
    v = t.check_desired(desired(fleet.signers, seq=1, issued_at=NOW, expires_at=NOW + 3600), now=NOW)
    assert v is not None
    t.mark_applied(v)
    assert t.time_floor == NOW and t.applied_expires_at == NOW + 3600
    # The clock jumps back a day (RTC battery, a bad NTP answer): a state that expired before the
    # last one was issued is still refused.
    stale = desired(fleet.signers, seq=2, issued_at=NOW - 7200, expires_at=NOW - 1)
    _refusal(Expired, "expired", t.check_desired, stale, now=NOW - 86400)
    fresh = desired(fleet.signers, seq=3, issued_at=NOW + 60, expires_at=NOW + 7200)
    assert t.check_desired(fresh, now=NOW - 86400) is not None, "behind its floor, the clock cannot judge the future"


def test_a_state_issued_far_ahead_of_a_plausible_clock_is_refused(fleet: Fleet) -> None:
    ahead = desired(fleet.signers, issued_at=NOW + 2 * 86400, expires_at=NOW + 3 * 86400)
    msg = _refusal(Expired, "issued_in_future", fleet.trusted.check_desired, ahead, now=NOW)
    assert "check the hub's clock" in msg
    assert fleet.trusted.time_floor == 0.0
    near = desired(fleet.signers, issued_at=NOW + 3600, expires_at=NOW + 7200)
    assert fleet.trusted.check_desired(near, now=NOW) is not None, "an hour of skew is normal"


def test_an_applied_state_past_its_expiry_is_stale_until_a_newer_one_comes(fleet: Fleet) -> None:
    t = fleet.trusted
    assert not t.stale(NOW)
    v = t.check_desired(desired(fleet.signers, seq=1, expires_at=NOW + 60), now=NOW)
    assert v is not None
    t.mark_applied(v)
    assert not t.stale(NOW + 59) and t.stale(NOW + 60)
    v2 = t.check_desired(desired(fleet.signers, seq=2, expires_at=NOW + 3600), now=NOW + 61)
    assert v2 is not None
    t.mark_applied(v2)
    assert not t.stale(NOW + 61)
