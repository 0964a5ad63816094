"""The elected controller on both engines, rounds driven by the test (no threads): one leader at a
time, a fencing epoch that refuses a deposed leader's writes, takeover when the leader's
sessions end or its heartbeat outlives the lease, and rollouts that two replicas share."""

from __future__ import annotations

import base64
import time
from pathlib import Path

import pytest

from edgefleet.hub.adapters.home import HubHome
from edgefleet.hub.daemon import Hub
from edgefleet.hub.db import Database
from edgefleet.hub.errors import Conflict, NotAuthorized
from edgefleet.hub.services.controller import Controller, Fenced
from tests.conftest import use_db
from tests.simulator import tiny_model


def _pair(target: Path | str, lease: float = 3.0) -> tuple[Database, Database, Controller, Controller]:
    """Two replicas' controllers on one database. ``lease``: 3 s for the tests that wait one out;
    the others take a long one, so a loaded machine's pause between two steps never reads as a
    dead leader (seen once in CI: the second replica ended the first one's sessions)."""
    a_db, b_db = Database(target, name="edgefleet-hub a:1"), Database(target, name="edgefleet-hub b:2")
    a = Controller(a_db, "edgefleet-hub a:1", lease_seconds=lease, interval=1.0)
    b = Controller(b_db, "edgefleet-hub b:2", lease_seconds=lease, interval=1.0)
    return a_db, b_db, a, b


def test_one_leader_and_a_deposed_leader_cannot_write(db_target: Path | str) -> None:
    a_db, b_db, a, b = _pair(db_target, lease=120.0)
    try:
        a.step()
        b.step()
        assert a.leading and not b.leading and a.epoch == 1
        with a_db.tx() as conn:
            a.fence(conn)  # passes: a leads
        with pytest.raises(Fenced, match="is not the controller"), b_db.tx() as conn:
            b.fence(conn)
        # a's lock goes (its process would have died); b takes over with a new epoch
        a._lock.release()
        b.step()
        assert b.leading and b.epoch == 2
        # a, still believing it leads (paused, say), tries a controller write: refused, and rolled back
        assert a.epoch == 1
        with pytest.raises(Fenced, match="epoch 2 in the database, ours 1"), a_db.tx() as conn:
            a_db.audit(conn, 1.0, "rollout-gate", "rollout_step", {})
            a.fence(conn)
        assert not a.leading and a_db.audit_entries() == []
        a.step()
        assert not a.leading  # b holds the lock
        assert b.describe()["leader"] == "edgefleet-hub b:2" and b.describe()["leader_epoch"] == 2
    finally:
        for c in (a, b):
            c.stop()
        a_db.close()
        b_db.close()


def test_a_leader_whose_heartbeat_outlives_the_lease_is_ended(pg_url: str) -> None:
    """The SIGSTOP case on PostgreSQL: the leader's sessions stay open and keep its lock, so
    the lock alone would never move; its heartbeat stops, and past the lease another replica
    ends its sessions and takes the role."""
    a_db, b_db, a, b = _pair(pg_url)
    try:
        a.step()
        assert a.leading
        b.step()
        assert not b.leading and b.takeovers == 0  # heartbeat fresh: nothing done
        time.sleep(3.3)  # a "paused": no rounds
        b.step()  # stale: b ends a's sessions (its lock connection too)
        assert b.takeovers == 1
        b.step()
        assert b.leading and b.epoch == 2
        a.step()  # a wakes: its lock connection is gone, it steps down
        assert not a.leading
        with pytest.raises(Fenced), a_db.tx() as conn:  # a's own connection was ended too: reconnects
            a.fence(conn)
    finally:
        for c in (a, b):
            c.stop()
        a_db.close()
        b_db.close()


def _home(tmp: Path, name: str, target: Path | str) -> HubHome:
    home = HubHome(tmp / name)
    home.init(fleet="f", broker_url="mqtt://127.0.0.1:1", http_listen="127.0.0.1:0")
    use_db(home, target)
    return home


def test_two_replicas_share_rollouts_and_only_the_controller_judges(tmp_path: Path, pg_url: str) -> None:
    """Two hubs on one PostgreSQL, each with its own home: a rollout started on one is seen,
    paused and judged consistently on the other; a replica acting on an old copy is refused."""
    h1 = Hub(_home(tmp_path, "h1", pg_url), replica="one")
    h2_home = _home(tmp_path, "h2", pg_url)
    # the second replica gets the first one's keyring and root public key, and the signing key as a
    # secret mounted outside its home (signing_key_file)
    for f in ("keys/root.pub", "keys/keyring.json"):
        (h2_home.path / f).write_bytes((h1.home.path / f).read_bytes())
    (tmp_path / "secrets").mkdir()
    (tmp_path / "secrets" / "signing.pem").write_bytes((h1.home.path / "keys/signing.pem").read_bytes())
    (h2_home.path / "keys/signing.pem").unlink()
    h2_home.update_config(signing_key_file=str(tmp_path / "secrets" / "signing.pem"))
    h2 = Hub(h2_home, replica="two")
    assert h2.signing_key.public_key() == h1.signing_key.public_key()
    try:
        h1.controller.step()
        h2.controller.step()
        assert h1.leading and not h2.leading
        for v in ("1", "2"):
            h1.publish({"name": "m", "version": v, "model_b64": base64.b64encode(tiny_model(float(v))).decode()},
                       "alice")
        for i in range(4):
            h1.add_device({"device": f"d{i}"}, "admin")
        h1.deploy({"model": "m", "version": "1", "devices": [f"d{i}" for i in range(4)]}, "alice")
        r = h2.rollouts.start_rollout({"model": "m", "version": "2", "steps": [50, 100]}, "bob")  # on the other
        assert h1.rollout_status(r["id"])[0]["state"] == "running"
        h1.rollouts.sync()
        assert h1.rollouts._active["m"].id == r["id"]  # the controller's cache has it
        h1.rollout_action("pause", r["id"], "carol")
        with pytest.raises(Conflict, match=f"rollout {r['id']} of m"):  # h2 synced: one active per model
            h2.rollouts.start_rollout({"model": "m", "version": "2"}, "bob")
        h2.rollout_action("resume", r["id"], "dave")  # h2 sees the pause made on h1
        assert h1.rollout_status(r["id"])[0]["state"] == "running"
        # tokens are shared through the database: made on one replica, they hold (and go) on the other
        made = h1.add_token({"name": "ci", "role": "viewer"}, "admin")
        assert h2.tokens.authenticate(f"Bearer {made['token']}").name == "ci"
        h2.revoke_token("ci", "admin")
        with pytest.raises(NotAuthorized, match="token 'ci' was revoked"):
            h1.tokens.authenticate(f"Bearer {made['token']}")
        assert h2.tokens.authenticate(f"Bearer {h1.home.token()}").role == "admin"  # seeded from tokens.json
        actions = [e["action"] for e in h1.audit_entries() if e["action"].startswith("rollout")]
        assert actions == ["rollout_start", "rollout_pause", "rollout_resume"]
        assert h1.verify_audit() == []
    finally:
        h1.db.close()
        h2.db.close()
