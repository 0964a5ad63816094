"""Device groups on a real SQLite file: the column is added to a database from before groups,
deploy targets are the union of devices and group members, bad or unknown groups are refused."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from edgefleet.hub.db import Database
from edgefleet.hub.errors import BadRequest, NotFound
from edgefleet.hub.services.groups import check_group, deploy_targets, known_groups

OLD_DEVICES = (
    "CREATE TABLE devices (id TEXT PRIMARY KEY, profile TEXT NOT NULL, created_at REAL NOT NULL, "
    "status TEXT, status_at REAL, reported TEXT, reported_at REAL)"
)


def _db(target: Path | str, devices: dict[str, str | None]) -> Database:
    db = Database(target)
    with db.tx() as conn:
        for dev, group in devices.items():
            conn.execute("INSERT INTO devices (id, profile, created_at, device_group) VALUES (?,?,?,?)",
                         (dev, "generic-x86_64", 1.0, group))
    return db


def test_database_from_before_groups_gets_the_column_and_keeps_its_devices(tmp_path: Path) -> None:
    path = tmp_path / "hub.db"
    conn = sqlite3.connect(path)
    conn.execute(OLD_DEVICES)
    conn.execute("INSERT INTO devices (id, profile, created_at, status) VALUES ('old-1', 'rpi', 5.0, 'online')")
    conn.commit()
    conn.close()
    db = Database(path)
    rows = db.query("SELECT * FROM devices")
    assert rows == [{"id": "old-1", "profile": "rpi", "created_at": 5.0, "status": "online", "status_at": None,
                     "reported": None, "reported_at": None, "device_group": None,
                     "capture_token_sha256": None,  # enrolled before capture tokens: none
                     "reported_seq": None, "reported_time": None}]
    db.close()
    Database(path).close()  # opening again is a no-op, not a "duplicate column" error


def test_deploy_targets_are_the_union_of_devices_and_groups(db_target: Path | str) -> None:
    db = _db(db_target, {"a1": "line-a", "a2": "line-a", "b1": "line-b", "lone": None})
    assert deploy_targets(db, {"groups": ["line-a"]}) == ["a1", "a2"]
    assert deploy_targets(db, {"devices": ["b1", "a2"], "groups": ["line-a"]}) == ["b1", "a2", "a1"]
    assert deploy_targets(db, {"devices": ["lone"]}) == ["lone"]
    assert known_groups(db) == ["line-a", "line-b"]


def test_a_group_without_devices_is_refused_naming_the_known_groups(db_target: Path | str) -> None:
    db = _db(db_target, {"a1": "line-a", "b1": "line-b"})
    with pytest.raises(NotFound, match=r"group 'line-c' has no device; known groups: line-a, line-b"):
        deploy_targets(db, {"groups": ["line-c"]})
    with pytest.raises(BadRequest, match="at least one device"):
        deploy_targets(db, {"devices": [], "groups": []})


@pytest.mark.parametrize("bad", ["a/b", "line+", "#", "", "x" * 65, "sp ace"])
def test_group_ids_follow_the_device_id_rules(tmp_path: Path, bad: str) -> None:
    if bad == "":
        assert check_group(bad) is None  # empty = no group
        return
    with pytest.raises(BadRequest, match=r"group id must be 1-64 characters of A-Z a-z 0-9 _ \. -"):
        check_group(bad)
    db = _db(tmp_path / "hub.db", {"a1": "line-a"})
    with pytest.raises(BadRequest, match="group id must be"):
        deploy_targets(db, {"groups": [bad]})
