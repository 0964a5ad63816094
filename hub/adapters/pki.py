"""The hub's device CA: client certificates, the broker's server certificate, the CRL and the
Mosquitto password file.

Everything lives in ``HOME/pki/`` and is written only through :class:`DevicePki`::

    ca.key / ca.pem        the device CA (ECDSA P-256); ca.key never leaves the hub (0600)
    index.json             every certificate issued (serial, device, expiry, revoked_at) and the
                           password hashes; the CRL and the password file are derived from it
    crl.pem                the current CRL (re-signed on every revoke and by ``broker-config``)
    passwd                 Mosquitto password file (``user:$7$...``, PBKDF2-SHA512)
    hub.password           the hub's own MQTT password (0600)
    export.json            broker folders written by ``broker-config``: crl.pem, passwd (the
                           devices' users) and hub-passwd (the hub's user alone) are written
                           there on every change; the broker applies a revocation after a SIGHUP

Invariants: a certificate's subject CN is the device id (the broker's ``use_identity_as_username``
turns it into the MQTT username its ACL patterns use); a device id is checked with
:func:`agent.contract.wire.check_name` before anything is issued, so no CN or username can carry ``+``,
``#`` or ``/``; the hub's own MQTT user contains ``@``, which no device id can, so no device
can ever be issued the hub's identity. Processes (CLI and daemon) serialise on ``pki/lock``.
"""

from __future__ import annotations

import base64
import contextlib
import datetime as dt
import fcntl
import hashlib
import hmac
import ipaddress
import json
import os
import secrets
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from edgefleet.agent.adapters.store import atomic_write
from edgefleet.agent.contract.errors import ConfigError
from edgefleet.agent.contract.wire import check_name
from edgefleet.hub.core.brokeracl import admitted_devices, users_conf_text

__all__ = [
    "DevicePki",
    "IssuedCert",
    "hash_password",
    "hub_username",
    "verify_password",
]

CLIENT_DAYS = 825
SERVER_DAYS = 825
CA_DAYS = 3650
CRL_DAYS = 365
PBKDF2_ITERATIONS = 1000
SKEW = dt.timedelta(minutes=5)  # device clocks drift: certificates start a little in the past


def hub_username(fleet: str) -> str:
    """The hub's MQTT user; ``@`` keeps it out of the device-id namespace."""
    return f"hub@{fleet}"


def hash_password(
    password: str, *, salt: bytes | None = None, iterations: int = PBKDF2_ITERATIONS
) -> str:
    """Mosquitto 2.x password hash: ``$7$iterations$base64(salt)$base64(pbkdf2_sha512)``."""
    salt = salt if salt is not None else secrets.token_bytes(12)
    dk = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, iterations, 64)
    return f"$7${iterations}${base64.b64encode(salt).decode()}${base64.b64encode(dk).decode()}"


def verify_password(password: str, encoded: str) -> bool:
    """Check ``password`` against a ``$7$`` hash (ours or ``mosquitto_passwd``'s)."""
    parts = encoded.split("$")
    if len(parts) != 5 or parts[1] != "7":
        return False
    try:
        iterations = int(parts[2])
        salt = base64.b64decode(parts[3])
        want = base64.b64decode(parts[4])
    except ValueError:
        return False
    got = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, iterations, len(want))
    return hmac.compare_digest(got, want)


@dataclass(frozen=True)
class IssuedCert:
    device: str
    serial: int
    cert_pem: bytes
    key_pem: bytes
    not_after: float


def _utc(ts: float) -> dt.datetime:
    return dt.datetime.fromtimestamp(ts, tz=dt.UTC)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


class DevicePki:
    """The device CA in ``path`` (``HOME/pki``). Every method takes ``now`` (epoch seconds)."""

    def __init__(self, path: Path, fleet: str) -> None:
        self.path = path
        self.fleet = fleet
        self.ca_key_path = path / "ca.key"
        self.ca_path = path / "ca.pem"
        self.crl_path = path / "crl.pem"
        self.passwd_path = path / "passwd"
        self.index_path = path / "index.json"
        self.hub_password_path = path / "hub.password"
        self.export_path = path / "export.json"

    # -- locking and the index -------------------------------------------------------------------

    @contextlib.contextmanager
    def _locked(self) -> Iterator[dict[str, Any]]:
        """Hold the pki lock; yield the index; write it back (atomically) if the body succeeds."""
        self.path.mkdir(mode=0o700, parents=True, exist_ok=True)
        with (self.path / "lock").open("a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                index = self._read_index()
                before = json.dumps(index, sort_keys=True)
                yield index
                if json.dumps(index, sort_keys=True) != before:
                    atomic_write(
                        self.index_path,
                        json.dumps(index, indent=1, sort_keys=True).encode(),
                        mode=0o600,
                    )
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _read_index(self) -> dict[str, Any]:
        try:
            index: dict[str, Any] = json.loads(self.index_path.read_text())
        except FileNotFoundError:
            index = {}
        index.setdefault("certs", {})
        index.setdefault("passwords", {})
        index.setdefault("revoked_devices", {})
        return index

    def index(self) -> dict[str, Any]:
        return self._read_index()

    # -- the CA ----------------------------------------------------------------------------------

    def ensure_ca(self, now: float) -> None:
        """Create the CA (key, self-signed certificate, empty CRL) unless it exists."""
        with self._locked():
            if self.ca_key_path.exists():
                return
            key = ec.generate_private_key(ec.SECP256R1())
            name = x509.Name(
                [
                    x509.NameAttribute(NameOID.ORGANIZATION_NAME, "edgefleet"),
                    x509.NameAttribute(NameOID.COMMON_NAME, f"edgefleet device CA {self.fleet}"),
                ]
            )
            ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
            cert = (
                x509.CertificateBuilder()
                .subject_name(name)
                .issuer_name(name)
                .public_key(key.public_key())
                .serial_number(x509.random_serial_number())
                .not_valid_before(_utc(now) - SKEW)
                .not_valid_after(_utc(now) + dt.timedelta(days=CA_DAYS))
                .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
                .add_extension(
                    x509.KeyUsage(
                        digital_signature=False,
                        content_commitment=False,
                        key_encipherment=False,
                        data_encipherment=False,
                        key_agreement=False,
                        key_cert_sign=True,
                        crl_sign=True,
                        encipher_only=False,
                        decipher_only=False,
                    ),
                    critical=True,
                )
                .add_extension(ski, critical=False)
                .sign(key, hashes.SHA256())
            )
            atomic_write(self.ca_key_path, _key_pem(key), mode=0o600)
            atomic_write(self.ca_path, cert.public_bytes(serialization.Encoding.PEM), mode=0o644)
        self.write_crl(now)

    def _ca(self) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
        try:
            key = serialization.load_pem_private_key(self.ca_key_path.read_bytes(), None)
            cert = x509.load_pem_x509_certificate(self.ca_path.read_bytes())
        except FileNotFoundError as exc:
            raise ConfigError(
                f"no device CA in {self.path}; run `edgefleet-hub broker-config` "
                "(or enrol a device) to create it"
            ) from exc
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise ConfigError(f"{self.ca_key_path} is not an EC private key")
        return key, cert

    def ca_pem(self) -> bytes:
        return self.ca_path.read_bytes()

    def _issue(
        self, cn: str, now: float, days: int, *, server_names: Iterable[str] = (), both: bool = False
    ) -> tuple[x509.Certificate, bytes]:
        ca_key, ca_cert = self._ca()
        key = ec.generate_private_key(ec.SECP256R1())
        names = list(server_names)
        builder = (
            x509.CertificateBuilder()
            .subject_name(
                x509.Name(
                    [
                        x509.NameAttribute(NameOID.ORGANIZATION_NAME, f"edgefleet {self.fleet}"),
                        x509.NameAttribute(NameOID.COMMON_NAME, cn),
                    ]
                )
            )
            .issuer_name(ca_cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(_utc(now) - SKEW)
            .not_valid_after(min(_utc(now) + dt.timedelta(days=days), ca_cert.not_valid_after_utc))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=True,
                    key_cert_sign=False,
                    crl_sign=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(
                x509.ExtendedKeyUsage(
                    [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH] if both else
                    [ExtendedKeyUsageOID.SERVER_AUTH if names else ExtendedKeyUsageOID.CLIENT_AUTH]
                ),
                critical=False,
            )
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                critical=False,
            )
        )
        if names:
            alts: list[x509.GeneralName] = []
            for n in names:
                try:
                    alts.append(x509.IPAddress(ipaddress.ip_address(n)))
                except ValueError:
                    alts.append(x509.DNSName(n))
            builder = builder.add_extension(x509.SubjectAlternativeName(alts), critical=False)
        return builder.sign(ca_key, hashes.SHA256()), _key_pem(key)

    def issue_client(self, device: str, now: float, *, days: int = CLIENT_DAYS) -> IssuedCert:
        """A client certificate with CN = ``device`` (a checked device id)."""
        check_name(device, "device id")
        with self._locked() as index:
            if device in index["revoked_devices"]:
                raise ConfigError(f"device {device!r} was revoked; enrol it under a new id")
            cert, key_pem = self._issue(device, now, days)
            not_after = cert.not_valid_after_utc.timestamp()
            index["certs"][format(cert.serial_number, "x")] = {
                "device": device,
                "issued_at": now,
                "not_after": not_after,
                "revoked_at": None,
            }
        self._sync()  # a NATS cluster admits the device by name (natsconf.users_conf_text)
        return IssuedCert(
            device,
            cert.serial_number,
            cert.public_bytes(serialization.Encoding.PEM),
            key_pem,
            not_after,
        )

    def issue_server(
        self, hostnames: Iterable[str], now: float, *, days: int = SERVER_DAYS, cluster: bool = False
    ) -> tuple[bytes, bytes]:
        """The broker's certificate, valid for every name in ``hostnames`` (DNS names or IPs);
        ``cluster``: also a client certificate, for the TLS routes between the nodes of a cluster."""
        names = list(hostnames)
        if not names:
            raise ConfigError("the broker certificate needs at least one host name or IP address")
        with self._locked() as index:
            cert, key_pem = self._issue(names[0], now, days, server_names=names, both=cluster)
            index["certs"][format(cert.serial_number, "x")] = {
                "device": None,
                "server": names,
                "issued_at": now,
                "not_after": cert.not_valid_after_utc.timestamp(),
                "revoked_at": None,
            }
        return cert.public_bytes(serialization.Encoding.PEM), key_pem

    def issue_hub_client(self, now: float, *, days: int = SERVER_DAYS) -> IssuedCert:
        """The hub's own client certificate (CN = :func:`hub_username`), for a broker that takes
        certificates only (NATS maps every MQTT client of its one listener to a user that way)."""
        with self._locked() as index:
            user = hub_username(self.fleet)
            cert, key_pem = self._issue(user, now, days)
            not_after = cert.not_valid_after_utc.timestamp()
            index["certs"][format(cert.serial_number, "x")] = {
                "device": None, "hub": user, "issued_at": now, "not_after": not_after, "revoked_at": None,
            }
        return IssuedCert(user, cert.serial_number, cert.public_bytes(serialization.Encoding.PEM), key_pem, not_after)

    # -- passwords -------------------------------------------------------------------------------

    def set_password(self, user: str, password: str | None = None) -> str:
        """Store a hash for ``user`` (a device id, or the hub user); return the password."""
        if user != hub_username(self.fleet):
            check_name(user, "device id")
        password = password or secrets.token_urlsafe(24)
        with self._locked() as index:
            if user in index["revoked_devices"]:
                raise ConfigError(f"device {user!r} was revoked; enrol it under a new id")
            index["passwords"][user] = hash_password(password)
        self._sync()
        return password

    def hub_password(self) -> str:
        """The hub's MQTT password, created on first use."""
        if not self.hub_password_path.exists():
            password = self.set_password(hub_username(self.fleet))
            atomic_write(self.hub_password_path, (password + "\n").encode(), mode=0o600)
        return self.hub_password_path.read_text().strip()

    def password_file_text(self, *, hub: bool | None = None) -> str:
        """Mosquitto password file lines: every user, or (``hub`` true/false) the hub's user
        alone / every user but the hub's."""
        users = self.index()["passwords"]
        hub_user = hub_username(self.fleet)
        return "".join(f"{u}:{h}\n" for u, h in sorted(users.items()) if hub is None or (u == hub_user) == hub)

    def forget(self, device: str, serials: Iterable[str] = (), *, password: bool = False) -> None:
        """Undo an enrolment that did not complete: drop the certificates ``serials`` (hex) of
        ``device`` from the index, and its password if ``password``. The certificates were never
        delivered, so they are not revoked (the CRL does not grow); the device id stays free."""
        check_name(device, "device id")
        with self._locked() as index:
            for s in serials:
                if index["certs"].get(s, {}).get("device") == device:
                    del index["certs"][s]
            if password:
                index["passwords"].pop(device, None)
        self._sync()

    # -- revocation ------------------------------------------------------------------------------

    def revoke(self, device: str, now: float) -> dict[str, Any]:
        """Revoke every certificate of ``device`` and drop its password; rewrite CRL and exports."""
        check_name(device, "device id")
        with self._locked() as index:
            serials = [
                s
                for s, c in index["certs"].items()
                if c.get("device") == device and not c["revoked_at"]
            ]
            for s in serials:
                index["certs"][s]["revoked_at"] = now
            had_password = index["passwords"].pop(device, None) is not None
            index["revoked_devices"][device] = now
        self.write_crl(now)
        return {"device": device, "revoked_serials": serials, "password_removed": had_password}

    def write_crl(self, now: float) -> bytes:
        ca_key, ca_cert = self._ca()
        builder = (
            x509.CertificateRevocationListBuilder()
            .issuer_name(ca_cert.subject)
            .last_update(_utc(now) - SKEW)
            .next_update(_utc(now) + dt.timedelta(days=CRL_DAYS))
        )
        for serial, c in sorted(self.index()["certs"].items()):
            if c["revoked_at"]:
                builder = builder.add_revoked_certificate(
                    x509.RevokedCertificateBuilder()
                    .serial_number(int(serial, 16))
                    .revocation_date(_utc(c["revoked_at"]))
                    .build()
                )
        pem = builder.sign(ca_key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)
        atomic_write(self.crl_path, pem, mode=0o644)
        self._sync()
        return pem

    # -- the files the broker reads --------------------------------------------------------------

    def add_export(self, folder: Path) -> None:
        """Keep ``folder``'s crl.pem and passwd in step with this CA from now on."""
        targets = self.exports()
        if str(folder.resolve()) not in targets:
            targets.append(str(folder.resolve()))
            atomic_write(self.export_path, json.dumps(targets).encode(), mode=0o644)
        self._sync()

    def exports(self) -> list[str]:
        try:
            return list(json.loads(self.export_path.read_text()))
        except FileNotFoundError:
            return []

    def _sync(self) -> None:
        atomic_write(self.passwd_path, self.password_file_text().encode(), mode=0o600)
        # The broker's: devices on the password listener, the hub on its own (hub.brokerconf).
        devices, hub = self.password_file_text(hub=False).encode(), self.password_file_text(hub=True).encode()
        crl = self.crl_path.read_bytes() if self.crl_path.exists() else None
        users = None
        for target in self.exports():
            folder = Path(target)
            if not folder.is_dir():
                continue
            if (folder / "nats-cluster.json").exists():  # a NATS cluster's folder: its users file
                users = users or users_conf_text(self.fleet, admitted_devices(self.device_credentials()),
                                                 hub_username(self.fleet)).encode()
                _write_keeping_group(folder / "users.conf", users, 0o640)
                continue
            _write_keeping_group(folder / "passwd", devices, 0o640)
            _write_keeping_group(folder / "hub-passwd", hub, 0o640)
            if crl is not None:
                _write_keeping_group(folder / "crl.pem", crl, 0o644)

    def device_credentials(self) -> dict[str, dict[str, Any]]:
        """Per device: certificate serials (expiry, revocation) and whether it has a password."""
        index = self.index()
        out: dict[str, dict[str, Any]] = {}
        for serial, c in index["certs"].items():
            if c.get("device"):
                d = out.setdefault(
                    c["device"], {"certs": [], "password": False, "revoked_at": None}
                )
                d["certs"].append(
                    {
                        "serial": serial,
                        **{k: c[k] for k in ("issued_at", "not_after", "revoked_at")},
                    }
                )
        for user in index["passwords"]:
            if "@" not in user:
                out.setdefault(user, {"certs": [], "password": False, "revoked_at": None})[
                    "password"
                ] = True
        for device, when in index["revoked_devices"].items():
            out.setdefault(device, {"certs": [], "password": False, "revoked_at": None})[
                "revoked_at"
            ] = when
        return out


def _write_keeping_group(path: Path, data: bytes, mode: int) -> None:
    """Replace ``path`` atomically, keeping its group: the broker (user ``mosquitto``) reads
    these files through their group, and the replacement is created by the hub's user."""
    try:
        gid = path.stat().st_gid
    except FileNotFoundError:
        gid = None
    atomic_write(path, data, mode=mode)
    if gid is not None and gid != path.stat().st_gid:
        with contextlib.suppress(PermissionError):
            os.chown(path, -1, gid)
