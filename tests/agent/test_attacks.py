"""Every attack of TUF's list (spec §1.5.2) against the real update core, driven by the hub
simulator over real HTTP. Each test asserts the refusal reason and that the model already
serving keeps serving (a real ONNX Runtime inference answers with the old version)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edgefleet.agent.adapters.fetch import HttpFetcher
from edgefleet.agent.app.updater import Updater
from tests.simulator import HubSimulator, make_updater, reasons, serving, simulator, tiny_model

V1 = ("1", 1.0)


@pytest.fixture
def sim() -> Iterator[HubSimulator]:
    with simulator() as s:
        yield s


@pytest.fixture
def up(sim: HubSimulator, tmp_path: Path) -> Updater:
    """An agent core that trusts the simulator's keyring and serves model ``m`` version 1."""
    u = make_updater(sim, tmp_path / "state")
    assert u.handle_keyring(sim.keyring(), now=sim.now) == []
    notes = u.offer(sim.desired({"m": sim.entry("1", tiny_model(1.0))}), now=sim.now)
    assert [n.type for n in notes] == ["update"]
    assert serving(u) == V1
    return u


def refused(up: Updater, raw: bytes, now: float) -> str:
    notes = up.offer(raw, now=now)
    assert [n.type for n in notes] == ["refused"], notes
    assert serving(up) == V1, "the model already serving must keep serving"
    return notes[0].reason


def v2(sim: HubSimulator, **behaviour: object) -> dict[str, object]:
    return {"m": sim.entry("2", tiny_model(2.0), **behaviour)}


def blobs(up: Updater) -> list[str]:
    return sorted(p.name for p in up.store.blobs.iterdir() if p.is_file())


# -- signatures and keys ----------------------------------------------------------------------


def test_unsigned_state_is_refused(sim: HubSimulator, up: Updater) -> None:
    assert refused(up, sim.desired(v2(sim), keys=[]), sim.now) == "unsigned"


def test_unknown_key_is_refused(sim: HubSimulator, up: Updater) -> None:
    raw = sim.desired(v2(sim), keys=[Ed25519PrivateKey.generate()])
    assert refused(up, raw, sim.now) == "unknown_key"


def test_revoked_key_is_refused(sim: HubSimulator, up: Updater) -> None:
    stolen = sim.signers[0]
    sim.rotate_signing(revoke_old=True)
    up.handle_keyring(sim.keyring(), now=sim.now)
    assert refused(up, sim.desired(v2(sim), keys=[stolen]), sim.now) == "revoked_key"


def test_below_threshold_is_refused(sim: HubSimulator, up: Updater) -> None:
    k1, k2 = sim.signers[0], Ed25519PrivateKey.generate()
    sim.signers, sim.threshold, sim.keyring_version = [k1, k2], 2, 2
    up.handle_keyring(sim.keyring(), now=sim.now)
    assert refused(up, sim.desired(v2(sim), keys=[k1]), sim.now) == "below_threshold"
    assert [n.type for n in up.offer(sim.desired(v2(sim), keys=[k1, k2]), now=sim.now)] == [
        "update"
    ]


def test_same_key_twice_counts_once(sim: HubSimulator, up: Updater) -> None:
    k1 = sim.signers[0]
    sim.signers, sim.threshold, sim.keyring_version = [k1, Ed25519PrivateKey.generate()], 2, 2
    up.handle_keyring(sim.keyring(), now=sim.now)
    assert refused(up, sim.desired(v2(sim), keys=[k1, k1]), sim.now) == "below_threshold"


def test_keyring_not_signed_by_root_is_refused(sim: HubSimulator, up: Updater) -> None:
    sim.keyring_version = 2
    notes = up.handle_keyring(sim.keyring(sign_with=sim.signers[0]), now=sim.now)
    assert reasons(notes) == ["bad_signature"]
    assert up.trust.keyring is not None and up.trust.keyring.version == 1


# -- sequence, expiry, target -----------------------------------------------------------------


def test_rollback_of_seq_is_refused(sim: HubSimulator, up: Updater) -> None:
    old = sim.desired({"m": sim.entry("1", tiny_model(1.0))}, seq=1)
    up.offer(sim.desired(v2(sim)), now=sim.now)
    assert serving(up) == ("2", 2.0)
    notes = up.offer(old, now=sim.now)
    assert reasons(notes) in (["stale_seq"], ["seq_conflict"])
    assert serving(up) == ("2", 2.0)


def test_rollback_after_expiry_is_refused_as_stale(sim: HubSimulator, up: Updater) -> None:
    """Once every state has expired, an older one is still refused for its seq, not its age."""
    older = sim.desired({"m": sim.entry("0", tiny_model(0.5))}, seq=1)
    sim.seq = 5
    up.offer(sim.desired({"m": sim.entry("1", tiny_model(1.0))}), now=sim.now)
    assert up.trust.last_seq == 6
    later = sim.now + 10 * sim.ttl  # the stored state (seq 6) has long expired too
    assert refused(up, older, later) == "stale_seq"


def test_same_seq_other_content_is_refused_and_not_stored(sim: HubSimulator, up: Updater) -> None:
    applied_digest = up.trust.last_digest
    assert refused(up, sim.desired(v2(sim), seq=sim.seq), sim.now) == "seq_conflict"
    assert up.trust.last_digest == applied_digest
    state = json.loads(up.store.state_path.read_text())
    assert state["last_digest"] == applied_digest and state["last_seq"] == sim.seq


def test_expired_state_is_refused(sim: HubSimulator, up: Updater) -> None:
    assert refused(up, sim.desired(v2(sim), expires_at=sim.now - 1), sim.now) == "expired"


def test_state_for_another_device_is_refused(sim: HubSimulator, up: Updater) -> None:
    assert refused(up, sim.desired(v2(sim), device="dev2"), sim.now) == "wrong_target"


def test_fast_forward_is_recovered_only_by_root_rotation(sim: HubSimulator, up: Updater) -> None:
    stolen = sim.signers[0]
    # The attacker, holding a signing key, pushes seq sky-high with the model we already run.
    attack = sim.desired({"m": sim.entry("1", tiny_model(1.0))}, seq=10**12, keys=[stolen])
    assert reasons(up.offer(attack, now=sim.now)) == ["already_installed"]
    # Rotating the signing key alone does not bring the legitimate seq back.
    sim.rotate_signing(revoke_old=True)
    up.handle_keyring(sim.keyring(), now=sim.now)
    assert refused(up, sim.desired(v2(sim)), sim.now) == "stale_seq"
    # A root rotation with reset_seq does, and states by the old keys stay refused.
    sim.rotate_root(reset_seq=True)
    sim.keyring_version += 1
    notes = up.handle_roots(sim.roots(), now=sim.now)
    assert [n.type for n in notes] == ["root_rotated"]
    assert up.trust.last_seq == 0 and up.trust.keyring is None
    up.handle_keyring(sim.keyring(), now=sim.now)
    assert (
        refused(up, sim.desired(v2(sim), keys=[stolen], seq=10**12 + 1), sim.now) == "revoked_key"
    )
    assert [n.type for n in up.offer(sim.desired(v2(sim)), now=sim.now)] == ["update"]
    assert serving(up) == ("2", 2.0)


# -- blobs --------------------------------------------------------------------------------------


def retried(up: Updater, raw: bytes, now: float) -> str:
    """Offer a state whose download fails in a way a retry may fix: the stable keeps serving,
    nothing of the bad bytes is kept, and the state stays pending (not refused for good)."""
    notes = up.offer(raw, now=now)
    assert [(n.type, n.extra.get("retrying")) for n in notes] == [("update_failed", True)], notes
    assert serving(up) == ("1", 1.0)
    assert up.core.failed is None and up.core.update is not None and up.pending is not None
    return notes[0].reason


def test_endless_blob_is_cut_off_and_retried(sim: HubSimulator, up: Updater) -> None:
    before = blobs(up)
    assert retried(up, sim.desired(v2(sim, mode="endless")), sim.now) == "size_mismatch"
    assert blobs(up) == before
    assert list(up.store.partial.iterdir()) == []


def test_a_compressed_blob_is_never_inflated(sim: HubSimulator, up: Updater) -> None:
    """A server that answers gzip (here a bomb: ~64 KiB inflating to 64 MiB) is refused on the
    header: the size cap holds on the bytes received because nothing is decoded."""
    before = blobs(up)
    notes = up.offer(sim.desired(v2(sim, mode="gzip-bomb")), now=sim.now)
    assert [(n.type, n.reason) for n in notes] == [("update_failed", "content_encoding")], notes
    assert "Content-Encoding 'gzip'" in notes[0].message
    assert serving(up) == ("1", 1.0) and blobs(up) == before
    assert sum(p.stat().st_size for p in up.store.partial.iterdir()) == 0
    assert sim.server.encodings and set(sim.server.encodings) == {"identity"}


def test_blob_hash_mismatch_is_retried_and_installs_once_the_mirror_is_fixed(sim: HubSimulator, up: Updater) -> None:
    """A mirror serving other bytes than signed is no reason to drop the signed state: once it is
    fixed, the retry installs the update with no new seq from the hub."""
    before = blobs(up)
    state = v2(sim, mode="wrong")
    assert retried(up, sim.desired(state), sim.now) == "hash_mismatch"
    assert blobs(up) == before
    assert list(up.store.partial.iterdir()) == []
    assert retried(up, up.pending or b"", sim.now) == "hash_mismatch"  # still broken: still pending
    for blob in sim.server.blobs.values():
        blob.mode = "ok"
    assert [n.type for n in up.retry(now=sim.now)] == ["update"]
    assert serving(up) == ("2", 2.0)


def test_blob_over_profile_cap_is_refused_before_download(sim: HubSimulator, up: Updater) -> None:
    fetched = len(sim.server.requests)
    big = {"m": sim.entry("2", tiny_model(2.0), size=2 * 2**20)}
    assert refused(up, sim.desired(big), sim.now) == "blob_too_large"
    assert len(sim.server.requests) == fetched


def test_slow_retrieval_is_abandoned(sim: HubSimulator, tmp_path: Path) -> None:
    fetcher = HttpFetcher(
        attempts=1,
        read_timeout=2.0,
        min_bytes_per_second=1024.0,
        grace_seconds=0.3,
        total_timeout=1.5,
    )
    up = make_updater(sim, tmp_path / "slow", fetcher=fetcher)
    up.handle_keyring(sim.keyring(), now=sim.now)
    up.offer(sim.desired({"m": sim.entry("1", tiny_model(1.0))}), now=sim.now)
    notes = up.offer(sim.desired(v2(sim, mode="drip", drip_delay=0.1)), now=sim.now)
    assert [(n.type, n.reason) for n in notes] == [("update_failed", "slow_retrieval")]
    assert notes[0].extra == {"retrying": True}
    assert serving(up) == V1
    assert up.model_state("m") == "failed"


def test_interrupted_download_resumes_with_range(sim: HubSimulator, up: Updater) -> None:
    data = tiny_model(2.0)
    entry = sim.entry("2", data, mode="cut", cut_at=len(data) // 2)
    assert [n.type for n in up.offer(sim.desired({"m": entry}), now=sim.now)] == ["update"]
    path = entry.url.split(str(sim.server.port))[1]
    ranges = [r for p, r in sim.server.requests if p == path]
    assert ranges == [None, f"bytes={len(data) // 2}-"]
    assert serving(up) == ("2", 2.0)


# -- rotations done right ---------------------------------------------------------------------


def test_root_rotation_is_accepted_and_survives_restart(
    sim: HubSimulator, up: Updater, tmp_path: Path
) -> None:
    sim.rotate_root()
    sim.rotate_root()  # the device walks 1 -> 2 -> 3
    sim.keyring_version += 1
    notes = up.handle_roots(sim.roots(), now=sim.now)
    assert [n.extra["root_version"] for n in notes] == [2, 3]
    assert up.trust.keyring is None  # the old keyring was signed by root 1
    up.handle_keyring(sim.keyring(), now=sim.now)
    assert [n.type for n in up.offer(sim.desired(v2(sim)), now=sim.now)] == ["update"]
    again = make_updater(sim, tmp_path / "state")  # a restart
    assert again.trust.root_version == 3 and again.trust.keyring is not None
    assert serving(again) == ("2", 2.0)
    sim.keyring_version += 1
    assert again.handle_keyring(sim.keyring(), now=sim.now) == []
    assert again.trust.keyring.version == sim.keyring_version


def test_bad_root_rotations_are_refused(sim: HubSimulator, up: Updater) -> None:
    only_new = sim.rotate_root(sign_old=False)
    only_old = sim.rotate_root(sign_new=False)
    gap = sim.rotate_root(version=3)
    for raw, reason in (
        (only_new, "root_signature"),
        (only_old, "root_signature"),
        (gap, "root_gap"),
    ):
        notes = up.handle_roots(
            json.dumps({"kind": "edgefleet.roots/v1", "chain": [raw.decode()]}).encode(),
            now=sim.now,
        )
        assert reasons(notes) == [reason]
    assert up.trust.root_version == 1 and up.trust.keyring is not None
    assert serving(up) == V1


def test_signing_key_rotation_keeps_the_device_updating(sim: HubSimulator, up: Updater) -> None:
    sim.rotate_signing(revoke_old=True)
    up.handle_keyring(sim.keyring(), now=sim.now)
    assert [n.type for n in up.offer(sim.desired(v2(sim)), now=sim.now)] == ["update"]
    assert serving(up) == ("2", 2.0)
