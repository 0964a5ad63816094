"""The simulated agent applies keyrings and desired states with the real trust and store rules.

No broker: bytes signed by the hub's own code go straight into ``SimAgent.handle``; blobs come
from a fetcher that is a small class serving bytes from a dict (and counting fetches).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edgefleet.agent.adapters.store import Store
from edgefleet.agent.app.sim import BlobCache, SimAgent
from edgefleet.agent.contract.envelope import public_key_to_b64
from edgefleet.agent.contract.wire import ModelEntry
from edgefleet.hub.core.desired import build_desired, build_keyring

NOW = 1_800_000_000.0


class DictFetcher:
    def __init__(self, blobs: dict[str, bytes]) -> None:
        self.blobs = blobs
        self.fetched: list[str] = []

    def fetch(self, url: str, dest: Path, *, size: int) -> None:
        self.fetched.append(url)
        dest.write_bytes(self.blobs[url])


def entry(data: bytes, version: str) -> ModelEntry:
    sha = hashlib.sha256(data).hexdigest()
    return ModelEntry(version=version, sha256=sha, size=len(data), url=f"http://blobs/{sha}")


def test_sim_agents_apply_update_and_rollback_sharing_one_download_per_blob(tmp_path: Path) -> None:
    root, signer = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    v1, v2 = entry(b"model one", "1"), entry(b"model two", "2")
    fetcher = DictFetcher({v1.url: b"model one", v2.url: b"model two"})
    cache = BlobCache(tmp_path / "cache", fetcher)
    sent: list[tuple[str, bytes, bool]] = []
    agents = [SimAgent(fleet="f", device=f"d{i}", root_public_key=public_key_to_b64(root.public_key()),
                       state_dir=tmp_path / f"d{i}", cache=cache, clock=lambda: NOW) for i in range(3)]
    ring = build_keyring("f", 1, [signer], root, NOW)

    def desired(device: str, seq: int, e: ModelEntry) -> bytes:
        return build_desired(fleet="f", device=device, seq=seq, now=NOW, ttl=3600, models={"clf": e},
                             signing_key=signer)[1]

    for a in agents:
        a.outbox = lambda t, p, r: sent.append((t, p, r))
        a.handle("desired", desired(a.device, 1, v1))  # before the keyring: waits, not refused
        assert a.active == {}
        a.handle("keyring", ring)
        assert a.active["clf"].version == "1"
        a.handle("desired", desired(a.device, 2, v2))
        a.handle("desired", desired(a.device, 2, v2))  # retained redelivery: no-op
        assert a.active["clf"].version == "2"
        a.handle("desired", desired(a.device, 1, v1))  # an old seq replayed: refused
        assert a.active["clf"].version == "2" and "stale" in a.refusals[-1]
        a.handle("desired", desired(a.device, 3, v1))  # rollback = newer seq naming v1
        assert a.active["clf"].version == "1"
        assert a.refusals == [a.refusals[-1]]

    assert sorted(fetcher.fetched) == sorted([v1.url, v2.url])  # once each for the whole fleet
    state = Store(tmp_path / "d0").read_state()  # the real agent's format
    assert state["last_seq"] == 3
    assert state["models"]["clf"]["entry"]["version"] == "1"
    assert state["models"]["clf"]["fallback"]["version"] == "2"
    assert sorted(p.name for p in (tmp_path / "d0" / "blobs").iterdir() if p.is_file()) == sorted(
        [v1.sha256, v2.sha256])
    assert any(t.endswith("/d2/reported") and r for t, _p, r in sent)


def test_sim_agent_refuses_a_state_signed_by_a_key_outside_the_keyring(tmp_path: Path) -> None:
    root, signer, rogue = (Ed25519PrivateKey.generate() for _ in range(3))
    v1 = entry(b"model one", "1")
    a = SimAgent(fleet="f", device="d0", root_public_key=public_key_to_b64(root.public_key()),
                 state_dir=tmp_path / "d0", cache=BlobCache(tmp_path / "c", DictFetcher({})),
                 clock=lambda: NOW)
    a.handle("keyring", build_keyring("f", 1, [signer], root, NOW))
    raw = build_desired(fleet="f", device="d0", seq=1, now=NOW, ttl=3600, models={"clf": v1},
                        signing_key=rogue)[1]
    a.handle("desired", raw)
    assert a.active == {} and a.refusals and "unknown_key" in a.refusals[0]


def test_a_sim_agent_and_the_real_updater_leave_the_same_state_file(tmp_path: Path) -> None:
    """Both run agent.core.update: the same desired states (an update, a rollback, a refused blob,
    a removal) leave the same models, update, failed and canaries in their state files."""
    from tests.simulator import make_updater, simulator, tiny_model

    with simulator() as hub:
        real = make_updater(hub, tmp_path / "real")
        fake = SimAgent(fleet=hub.fleet, device=hub.device, root_public_key=hub.provisioned_root,
                        state_dir=tmp_path / "sim", cache=BlobCache(tmp_path / "cache"), clock=lambda: hub.now,
                        max_blob_bytes=real.trust.max_blob_bytes)
        v1, v2 = hub.entry("1", tiny_model(1.0)), hub.entry("2", tiny_model(2.0))
        other = hub.entry("o1", tiny_model(3.0))
        liar = ModelEntry(version="3", sha256="0" * 64, size=v2.size, url=v2.url)  # wrong digest
        ring = hub.keyring()
        real.handle_keyring(ring, now=hub.now)
        fake.handle("keyring", ring)
        for models in ({"m": v1, "o": other}, {"m": v2, "o": other}, {"m": v1, "o": other},
                       {"m": liar, "o": other}, {"m": v1}):
            raw = hub.desired(models)
            real.offer(raw, now=hub.now)
            fake.handle("desired", raw)
            got = {k: v for k, v in Store(tmp_path / "sim").read_state().items() if k in STATE_KEYS}
            want = {k: v for k, v in Store(tmp_path / "real").read_state().items() if k in STATE_KEYS}
            assert got == want, f"after {sorted((n, e.version) for n, e in models.items())}"
        assert want["models"]["m"]["entry"]["version"] == "1" and "o" not in want["models"]
        assert want["failed"] is None and fake.refusals and "blob" in fake.refusals[0]


STATE_KEYS = ("models", "update", "failed", "canaries", "last_seq", "last_digest", "time_floor",
              "applied_expires_at")


def test_sim_telemetry_is_kept_until_the_hub_acknowledges_it_and_resent(tmp_path: Path) -> None:
    """As the real agent's spool: a window stays until a TelemetryAck names it, goes out again
    once older than RESEND_SECONDS, and past MAX_UNACKED the oldest is dropped and counted."""
    from edgefleet.agent.contract.wire import TelemetryAck

    root = Ed25519PrivateKey.generate()
    a = SimAgent(fleet="f", device="d0", root_public_key=public_key_to_b64(root.public_key()),
                 state_dir=tmp_path / "d0", cache=BlobCache(tmp_path / "cache", DictFetcher({})), clock=lambda: NOW)
    sent: list[str] = []
    a.outbox = lambda t, p, r: sent.append(t)
    for _ in range(3):
        a.close_window()
    assert sorted(a.unacked) == [1, 2, 3] and len(sent) == 3
    a.handle("acked", TelemetryAck(fleet="f", device="d0", seqs=(1, 3)).to_json())
    a.handle("acked", TelemetryAck(fleet="f", device="other", seqs=(2,)).to_json())  # not ours: ignored
    assert sorted(a.unacked) == [2]
    a.resend()  # not old enough yet
    assert len(sent) == 3
    a.resend(0.0)
    assert len(sent) == 4 and sent[-1].endswith("/d0/telemetry")
    a.MAX_UNACKED = 2
    a.close_window()
    a.close_window()
    assert sorted(a.unacked) == [4, 5] and a.dropped == 1
