"""A hub home holds the fleet's root and signing keys, the admin token and the database: no other
user of the machine may read any of it, whatever the umask."""

from __future__ import annotations

import base64
import logging
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from edgefleet.hub.adapters.home import HubHome
from edgefleet.hub.daemon import Hub
from tests.conftest import run_cli
from tests.simulator import tiny_model


@pytest.fixture
def umask_022() -> Iterator[None]:
    old = os.umask(0o022)  # a typical login shell's: what `init` ran under when it left 0755/0644
    try:
        yield
    finally:
        os.umask(old)


def modes(home: Path) -> dict[str, str]:
    """Every entry under ``home`` (itself included) whose mode lets another user in."""
    out = {}
    for p in [home, *home.rglob("*")]:
        mode = stat.S_IMODE(p.lstat().st_mode)
        want = 0o700 if p.is_dir() else 0o600
        if mode != want:
            out[str(p.relative_to(home.parent))] = f"{mode:04o} (expected {want:04o})"
    return out


def test_init_makes_the_home_0700_and_its_files_0600(tmp_path: Path, umask_022: None) -> None:
    home = tmp_path / "hub"
    run_cli("edgefleet.hub.cli.main", "init", "--home", str(home), "--fleet", "f")
    assert modes(home) == {}
    assert (home / "hub.db").is_file(), "init creates the database file, so SQLite never picks its mode"


def test_what_the_hub_adds_to_its_home_is_0600_too(tmp_path: Path, umask_022: None) -> None:
    home = HubHome(tmp_path / "hub")
    home.init(fleet="f", broker_url="mqtt://127.0.0.1:1", http_listen="127.0.0.1:0")
    hub = Hub(home)  # keyring, tokens.json, the database with its WAL files
    try:
        hub.publish({"name": "m", "version": "1", "model_b64": base64.b64encode(tiny_model(1.0)).decode()}, "admin")
        hub.add_device({"device": "d1"}, "admin")
        home.write_run({"http": "http://127.0.0.1:1"})
        home.update_config(public_url="http://hub.lan:8400")
        assert {p.name for p in home.path.iterdir()} >= {"hub.db", "hub.db-wal", "tokens.json", "hub.run.json"}
        assert modes(home.path) == {}
    finally:
        hub.db.close()


def test_a_home_open_to_other_users_is_named_at_start(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    home = HubHome(tmp_path / "hub")
    home.init(fleet="f", broker_url="mqtt://127.0.0.1:1", http_listen="127.0.0.1:0")
    home.path.chmod(0o755)
    home.token_path.chmod(0o644)  # what an older init left
    with caplog.at_level(logging.WARNING, logger="edgefleet.hub"):
        Hub(home).db.close()
    (msg,) = [r.getMessage() for r in caplog.records if "open to other users" in r.getMessage()]
    assert f"{home.path} 0755" in msg and f"{home.token_path} 0644" in msg and "chmod -R go=" in msg
