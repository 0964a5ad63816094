"""The hub's device CA (hub.pki): ids, certificates, revocation, Mosquitto-compatible passwords."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from edgefleet.agent.contract.errors import ConfigError, MalformedMessage
from edgefleet.agent.contract.wire import check_name
from edgefleet.hub.adapters.brokerconf import acl_text
from edgefleet.hub.adapters.home import HubHome
from edgefleet.hub.adapters.pki import DevicePki, hash_password, hub_username, verify_password
from edgefleet.hub.daemon import Hub
from edgefleet.hub.errors import BadRequest

NOW = 1_790_000_000.0


@pytest.fixture
def pki(tmp_path: Path) -> DevicePki:
    p = DevicePki(tmp_path / "pki", "plant1")
    p.ensure_ca(NOW)
    return p


@pytest.mark.parametrize("bad", ["a+b", "a#", "a/b", "+", "#", "", "x" * 65, "dév", "a b"])
def test_device_ids_with_wildcards_slashes_or_odd_characters_are_refused(
    pki: DevicePki, bad: str
) -> None:
    with pytest.raises(MalformedMessage, match="device id"):
        pki.issue_client(bad, NOW)
    with pytest.raises(MalformedMessage, match="device id"):
        pki.set_password(bad)
    assert pki.index()["certs"] == {}


def test_client_certificate_names_the_device_and_chains_to_the_ca(pki: DevicePki) -> None:
    issued = pki.issue_client("pump-7", NOW)
    cert = x509.load_pem_x509_certificate(issued.cert_pem)
    ca = x509.load_pem_x509_certificate(pki.ca_pem())
    cert.verify_directly_issued_by(ca)
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "pump-7"
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    assert cert.not_valid_before_utc.timestamp() < NOW < cert.not_valid_after_utc.timestamp()
    assert (pki.path / "ca.key").stat().st_mode & 0o077 == 0


def test_certificate_from_another_ca_does_not_chain(pki: DevicePki, tmp_path: Path) -> None:
    other = DevicePki(tmp_path / "other", "plant1")
    other.ensure_ca(NOW)
    forged = x509.load_pem_x509_certificate(other.issue_client("pump-7", NOW).cert_pem)
    with pytest.raises(InvalidSignature):
        forged.verify_directly_issued_by(x509.load_pem_x509_certificate(pki.ca_pem()))


def test_revoke_lists_every_certificate_on_the_crl_and_drops_the_password(
    pki: DevicePki, tmp_path: Path
) -> None:
    broker = tmp_path / "broker"
    broker.mkdir()
    pki.add_export(broker)
    first = pki.issue_client("pump-7", NOW)
    second = pki.issue_client("pump-7", NOW)
    keep = pki.issue_client("pump-8", NOW)
    pki.set_password("pump-7", "pw7")
    pki.set_password("pump-8", "pw8")
    assert "pump-7:" in (broker / "passwd").read_text()

    res = pki.revoke("pump-7", NOW + 60)

    assert res["password_removed"] is True and len(res["revoked_serials"]) == 2
    ca = x509.load_pem_x509_certificate(pki.ca_pem())
    for folder in (pki.path, broker):
        crl = x509.load_pem_x509_crl((folder / "crl.pem").read_bytes())
        assert crl.is_signature_valid(ca.public_key())
        assert crl.get_revoked_certificate_by_serial_number(first.serial) is not None
        assert crl.get_revoked_certificate_by_serial_number(second.serial) is not None
        assert crl.get_revoked_certificate_by_serial_number(keep.serial) is None
        users = [line.split(":", 1)[0] for line in (folder / "passwd").read_text().splitlines()]
        assert "pump-7" not in users and "pump-8" in users
    with pytest.raises(ConfigError, match="revoked"):
        pki.issue_client("pump-7", NOW)
    with pytest.raises(ConfigError, match="revoked"):
        pki.set_password("pump-7")
    assert pki.device_credentials()["pump-7"]["revoked_at"] == NOW + 60


def test_password_hashes_are_mosquitto_pbkdf2_sha512() -> None:
    ours = hash_password("s3cret", salt=b"0123456789ab", iterations=101)
    assert ours.startswith("$7$101$")
    assert verify_password("s3cret", ours) and not verify_password("s3cret!", ours)
    assert not verify_password("s3cret", "$6$not-a-mosquitto-hash")


@pytest.mark.skipif(
    shutil.which("mosquitto_passwd") is None, reason="mosquitto_passwd is not installed"
)
def test_hashes_written_by_mosquitto_passwd_verify_with_ours(tmp_path: Path) -> None:
    f = tmp_path / "pw"
    subprocess.run(
        ["mosquitto_passwd", "-c", "-b", str(f), "alice", "s3cret"], check=True, capture_output=True
    )
    user, encoded = f.read_text().strip().split(":", 1)
    assert user == "alice"
    assert verify_password("s3cret", encoded) and not verify_password("wrong", encoded)


def test_hub_user_is_outside_the_device_id_namespace_and_owns_the_fleet_root(
    pki: DevicePki,
) -> None:
    with pytest.raises(MalformedMessage):
        check_name(hub_username("plant1"), "device id")
    with pytest.raises(MalformedMessage):
        pki.issue_client(
            hub_username("plant1"), NOW
        )  # no device certificate can carry the hub's name
    acl = acl_text("plant1")
    assert f"user {hub_username('plant1')}\ntopic readwrite edgefleet/v1/plant1/#" in acl
    patterns = [line for line in acl.splitlines() if line.startswith("pattern")]
    assert sorted(patterns) == sorted(
        [
            "pattern read edgefleet/v1/plant1/devices/%u/desired",
            "pattern read edgefleet/v1/plant1/devices/%u/acked",
            "pattern read edgefleet/v1/plant1/keyring",
            "pattern read edgefleet/v1/plant1/roots",
            "pattern write edgefleet/v1/plant1/devices/%u/reported",
            "pattern write edgefleet/v1/plant1/devices/%u/telemetry",
            "pattern write edgefleet/v1/plant1/devices/%u/events",
            "pattern write edgefleet/v1/plant1/devices/%u/status",
        ]
    )


def test_certificate_enrolment_is_refused_until_the_broker_speaks_tls(tmp_path: Path) -> None:
    """Without broker-config the hub's broker is plain MQTT: a certificate would be useless
    there, so the hub refuses it (and names the fix) instead of writing a bundle that fails."""
    home = HubHome(tmp_path / "hub")
    home.init(fleet="f1", broker_url="mqtt://127.0.0.1:1883", http_listen="127.0.0.1:0")
    hub = Hub(home, clock=lambda: NOW)
    try:
        with pytest.raises(BadRequest, match="broker-config"):
            hub.add_device({"device": "d1", "credentials": "cert"}, "test")
        assert hub.db.device_ids() == set()
        res = hub.add_device({"device": "d2", "credentials": "auto"}, "test")
        assert res["credentials"]["kind"] == "none" and set(res["credentials"]) == {"kind", "capture_token"}
        res = hub.add_device({"device": "d3", "credentials": "password"}, "test")
        assert res["credentials"]["username"] == "d3" and len(res["credentials"]["password"]) >= 24
    finally:
        hub.db.close()


def test_rewritten_broker_files_keep_the_group_the_broker_reads_them_by(
    pki: DevicePki, tmp_path: Path
) -> None:
    if os.geteuid() != 0:
        pytest.skip("changing a file's group to another group needs root here")
    broker = tmp_path / "broker"
    broker.mkdir()
    pki.add_export(broker)
    os.chown(broker / "passwd", -1, 12345)
    os.chown(broker / "crl.pem", -1, 12345)
    pki.set_password("pump-9")
    pki.revoke("pump-9", NOW)
    assert (broker / "passwd").stat().st_gid == 12345
    assert (broker / "crl.pem").stat().st_gid == 12345
    assert "pump-9" not in (broker / "passwd").read_text()
