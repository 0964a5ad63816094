"""Enrolment with the root private key offline, and enrolment as all or nothing.

The hub (daemon and enrolment) needs only the root *public* key, ``keys/root.pub``; a failure at
any point of `device add` leaves nothing registered, issued or written: not in the database, not
in the device CA's index or the password files, not in the bundle folder.
"""

from __future__ import annotations

import json
import shutil
import signal
from pathlib import Path
from typing import Any

import pytest

from edgefleet.agent.contract.errors import ConfigError
from edgefleet.hub.adapters.client import HubClient
from edgefleet.hub.adapters.home import HubHome
from edgefleet.hub.adapters.pki import DevicePki
from edgefleet.hub.cli import bundle
from edgefleet.hub.cli.main import main as hub_main
from edgefleet.hub.daemon import Hub
from edgefleet.hub.errors import NotAuthorized
from tests.conftest import Broker, Procs, free_port, hub_up, run_cli, wait_for

NOW = 1_800_000_000.0


@pytest.fixture
def home(tmp_path: Path) -> HubHome:
    h = HubHome(tmp_path / "hub")
    h.init(fleet="f", broker_url="mqtt://127.0.0.1:1", http_listen="127.0.0.1:0")
    return h


def _offline(home: HubHome, tmp: Path) -> Path:
    """Move the root private key out of the hub home, as the docs tell operators to."""
    media = tmp / "usb"
    media.mkdir()
    shutil.move(home.keys / "root.pem", media / "root.pem")
    return media / "root.pem"


def _pki_of(home: HubHome, device: str) -> dict[str, Any]:
    index = DevicePki(home.pki_path, "f").index()
    return {
        "certs": [s for s, c in index["certs"].items() if c.get("device") == device],
        "password": device in index["passwords"],
        "passwd_line": any(line.startswith(f"{device}:") for line in
                           (home.pki_path / "passwd").read_text().splitlines())
        if (home.pki_path / "passwd").exists() else False,
    }


def test_enrolment_works_with_the_root_private_key_offline(home: HubHome, tmp_path: Path) -> None:
    root_pub = home.root_public_b64()
    hub = Hub(home, clock=lambda: NOW)
    try:
        _offline(home, tmp_path)
        res = hub.add_device({"device": "d1", "credentials": "password"}, "test")
        assert res["root_public_key"] == root_pub
        assert "d1" in hub.db.device_ids() and _pki_of(home, "d1")["password"]
    finally:
        hub.db.close()
    hub = Hub(home, clock=lambda: NOW)  # and the daemon starts without it
    hub.db.close()


def test_a_home_from_before_root_pub_gets_it_derived_once(home: HubHome, tmp_path: Path) -> None:
    root_pub = home.root_public_b64()
    home.root_pub_path.unlink()  # a home written before keys/root.pub existed
    Hub(home, clock=lambda: NOW).db.close()
    assert home.root_pub_path.read_text().strip() == root_pub
    _offline(home, tmp_path)
    assert home.root_public_b64() == root_pub


def test_without_root_pub_nor_root_pem_the_hub_says_what_to_copy(home: HubHome, tmp_path: Path) -> None:
    home.root_pub_path.unlink()
    _offline(home, tmp_path)
    with pytest.raises(ConfigError, match=r"no root public key at .*root\.pub.*root_public_key"):
        Hub(home, clock=lambda: NOW)


def test_a_failure_mid_enrolment_leaves_nothing_registered_or_issued(
    home: HubHome, monkeypatch: pytest.MonkeyPatch
) -> None:
    hub = Hub(home, clock=lambda: NOW)
    try:
        real = hub.db.insert_device

        def fail(*a: Any, **kw: Any) -> None:
            raise RuntimeError("disk I/O error (injected)")

        monkeypatch.setattr(hub.db, "insert_device", fail)  # after the certificate and password
        with pytest.raises(RuntimeError, match="injected"):
            hub.add_device({"device": "d1", "credentials": "password"}, "test")
        assert "d1" not in hub.db.device_ids()
        assert _pki_of(home, "d1") == {"certs": [], "password": False, "passwd_line": False}
        assert not [e for e in hub.db.audit_entries() if e["action"] == "device_add"]

        monkeypatch.setattr(hub.db, "insert_device", real)  # the id is free: enrolling again works
        hub.add_device({"device": "d1", "credentials": "password"}, "test")
        assert _pki_of(home, "d1")["password"] and "d1" in hub.db.device_ids()
    finally:
        hub.db.close()


def test_a_failure_after_the_certificate_is_issued_takes_it_back(
    home: HubHome, monkeypatch: pytest.MonkeyPatch
) -> None:
    home.update_config(device_broker_url="mqtts://127.0.0.1:8883")  # certificates need a TLS broker
    hub = Hub(home, clock=lambda: NOW)
    try:
        monkeypatch.setattr(hub.db, "audit", lambda *a, **kw: (_ for _ in ()).throw(RuntimeError("injected")))
        with pytest.raises(RuntimeError, match="injected"):
            hub.add_device({"device": "d1", "credentials": "both"}, "test")
        assert "d1" not in hub.db.device_ids()
        assert _pki_of(home, "d1") == {"certs": [], "password": False, "passwd_line": False}
    finally:
        hub.db.close()


def test_only_the_enrolling_call_can_cancel_and_only_an_unseen_device(home: HubHome) -> None:
    hub = Hub(home, clock=lambda: NOW)
    try:
        res = hub.add_device({"device": "d1", "credentials": "password"}, "test")
        with pytest.raises(NotAuthorized):
            hub.add_device({"device": "d1", "cancel": "not-the-secret"}, "test")
        assert "d1" in hub.db.device_ids()
        assert hub.add_device({"device": "d1", "cancel": res["enrolment"]}, "test") == {
            "device": "d1", "cancelled": True}
        assert "d1" not in hub.db.device_ids() and not _pki_of(home, "d1")["password"]
        assert [e["action"] for e in hub.db.audit_entries()][-2:] == ["device_add", "device_add_cancelled"]
        with pytest.raises(NotAuthorized):  # once
            hub.add_device({"device": "d1", "cancel": res["enrolment"]}, "test")
    finally:
        hub.db.close()


@pytest.mark.broker
def test_device_add_that_cannot_write_its_bundle_cancels_the_enrolment(
    tmp_path: Path, broker: Broker, procs: Procs, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The CLI side: the hub registered the device and issued a password, then writing the bundle
    fails. Nothing is left: no registration, no password, no bundle, no staging folder."""
    home_dir, port = tmp_path / "hub", free_port()
    run_cli("edgefleet.hub.cli.main", "init", "--home", str(home_dir), "--fleet", "f", "--broker", broker.url,
            "--http", f"127.0.0.1:{port}")
    hub = procs.start("hub", "edgefleet.hub.cli.main", "serve", "--home", str(home_dir))
    wait_for(lambda: hub_up(port), 20, "hub HTTP")
    _offline(HubHome(home_dir), tmp_path)  # and the root key is offline all along
    out = tmp_path / "bundles" / "d1"
    argv = ["device", "add", "d1", "--home", str(home_dir), "--out", str(out), "--credentials", "password"]

    def disk_full(*a: Any, **kw: Any) -> Path:
        raise OSError(28, "No space left on device (injected)")

    monkeypatch.setattr(bundle, "write_systemd_dropin", disk_full)
    with pytest.raises(OSError, match="injected"):
        hub_main(argv)
    assert not out.exists() and list(out.parent.iterdir()) == []
    client = HubClient.for_home(HubHome(home_dir))
    assert [d["device"] for d in client.devices()] == []
    assert not _pki_of(HubHome(home_dir), "d1")["password"]
    assert [e["action"] for e in client.audit()][-2:] == ["device_add", "device_add_cancelled"]

    monkeypatch.undo()
    assert hub_main([*argv, "--json"]) == 0
    assert {p.name for p in out.iterdir()} >= {"agent.toml", "profile.toml", "root.pub", "mqtt.password",
                                               "capture.token", "edgefleet-agent.service.d"}
    assert (out / "root.pub").read_text().strip() == HubHome(home_dir).root_public_b64()
    assert [d["device"] for d in client.devices()] == ["d1"]
    hub.send_signal(signal.SIGTERM)
    assert hub.wait(15) == 0
    assert json.loads((home_dir / "pki" / "index.json").read_text())["passwords"].get("d1")


def test_a_password_that_fails_after_the_certificate_takes_the_certificate_back(
    home: HubHome, monkeypatch: pytest.MonkeyPatch
) -> None:
    home.update_config(device_broker_url="mqtts://127.0.0.1:8883")
    hub = Hub(home, clock=lambda: NOW)
    try:
        def fail(*a: Any, **kw: Any) -> str:
            raise OSError(28, "No space left on device (injected)")

        monkeypatch.setattr(DevicePki, "set_password", fail)
        with pytest.raises(OSError, match="injected"):
            hub.add_device({"device": "d1", "credentials": "both"}, "test")
        assert "d1" not in hub.db.device_ids()
        assert _pki_of(home, "d1") == {"certs": [], "password": False, "passwd_line": False}
    finally:
        hub.db.close()
