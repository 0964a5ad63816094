"""The hub's home folder: keys, configuration, admin token, database and blobs.

    DIR/hub.toml          fleet, broker URL, HTTP listen address, public blob URL, TTLs
    DIR/admin.token       bearer token of the admin API (0600)
    DIR/keys/root.pub     fleet root public key (base64 Ed25519): what the daemon and enrolment use
    DIR/keys/root.pem     fleet root private key: signs keyrings and root rotations, nothing else.
                          Move it offline after `init`; key ceremonies take it with --root-key
    DIR/keys/signing.pem  signing key (signs desired states; listed in the keyring)
    DIR/keys/keyring.json the root-signed keyring the daemon publishes (written by init and the
                          key ceremonies, :mod:`hub.services.keys`)
    DIR/hub.db            SQLite, owned by the running daemon (hub.db module)
    DIR/blobs/<sha256>    published model blobs
    DIR/hub.run.json      written by `serve`: where the running daemon answers
    DIR/pki/              device CA, CRL, password file (hub.pki); http.pem/http.key (hub.tls)
"""

from __future__ import annotations

import json
import os
import secrets
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from edgefleet.agent.adapters.store import atomic_write
from edgefleet.agent.contract.envelope import key_id, public_key_from_b64, public_key_to_b64
from edgefleet.agent.contract.errors import ConfigError, MalformedMessage
from edgefleet.agent.contract.wire import check_name
from edgefleet.hub.core.desired import build_keyring

__all__ = ["HubConfig", "HubHome", "keyring_path", "load_private_key", "private_pem", "read_optional_toml"]

_SECURITY_KEYS = ("device_broker_url", "device_password_broker_url", "broker_ca_file", "broker_username",
                  "broker_password_file", "http_cert_file", "http_key_file")



def read_optional_toml(path: Path) -> dict[str, Any] | None:
    """The TOML file at ``path``, or None when there is none (its defaults apply)."""
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path} is not valid TOML: {exc}") from exc

@dataclass(frozen=True)
class HubConfig:
    fleet: str
    broker_url: str
    http_listen: str
    public_url: str
    desired_ttl_seconds: int
    # Broker security, written by `edgefleet-hub broker-config` (empty: plain MQTT, broker_url)
    device_broker_url: str = ""  # what certificate-enrolled agents connect to; empty = broker_url
    # ... and password-enrolled ones; empty = broker_url (a broker folder written before the hub
    # had a listener of its own: the hub then shared the password listener)
    device_password_broker_url: str = ""
    broker_ca_file: str = ""  # CA the hub pins for the broker's certificate
    broker_username: str = ""
    broker_password_file: str = ""
    # HTTPS for the blob server and admin API, written by `edgefleet-hub https-config` (hub.tls):
    # a server certificate from the device CA and its key; empty = plain HTTP
    http_cert_file: str = ""
    http_key_file: str = ""

    @property
    def http_tls(self) -> bool:
        return bool(self.http_cert_file)


class HubHome:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.config_path = path / "hub.toml"
        self.token_path = path / "admin.token"
        self.keys = path / "keys"
        self.root_key_path = self.keys / "root.pem"  # the default place; ceremonies take --root-key
        self.root_pub_path = self.keys / "root.pub"
        self.db_path = path / "hub.db"
        self.blobs = path / "blobs"
        self.run_path = path / "hub.run.json"

    def exists(self) -> bool:
        return self.config_path.exists()

    def init(self, *, fleet: str, broker_url: str, http_listen: str, public_url: str = "") -> None:
        """Create keys, config and token. Refuses to overwrite an existing home."""
        check_name(fleet, "fleet")
        if self.exists():
            raise ConfigError(f"{self.path} is already a hub home (found {self.config_path}); "
                              "choose another --home or remove it")
        self.path.mkdir(parents=True, exist_ok=True)
        self.keys.mkdir(mode=0o700, exist_ok=True)
        self.blobs.mkdir(exist_ok=True)
        keys = {}
        for name in ("root", "signing"):
            keys[name] = key = Ed25519PrivateKey.generate()
            atomic_write(self.keys / f"{name}.pem", private_pem(key), mode=0o600)
        self._write_root_public(keys["root"].public_key())
        # The first keyring is signed now, while the root key is here for the last time if the
        # operator moves it offline: the daemon never needs the root private key.
        atomic_write(keyring_path(self), build_keyring(fleet, 1, [keys["signing"]], keys["root"], time.time()),
                     mode=0o644)
        atomic_write(self.token_path, (secrets.token_urlsafe(32) + "\n").encode(), mode=0o600)
        text = (
            "# edgefleet hub configuration\n"
            f'fleet = "{fleet}"\n'
            f'broker_url = "{broker_url}"\n'
            f'http_listen = "{http_listen}"\n'
            "# URL agents use to reach this hub's HTTP server (blobs); empty = http://<http_listen>\n"
            f'public_url = "{public_url}"\n'
            "# desired states are re-signed before they expire\n"
            "desired_ttl_seconds = 2592000\n"
        )
        atomic_write(self.config_path, text.encode(), mode=0o644)

    def config(self) -> HubConfig:
        try:
            doc = tomllib.loads(self.config_path.read_text(encoding="utf-8"))
        except FileNotFoundError as exc:
            raise ConfigError(
                f"{self.path} is not a hub home (no hub.toml); run `edgefleet-hub init --home {self.path}`"
            ) from exc
        known = {"fleet", "broker_url", "http_listen", "public_url", "desired_ttl_seconds",
                 *_SECURITY_KEYS}
        unknown = sorted(set(doc) - known)
        if unknown:
            raise ConfigError(f"{self.config_path}: unknown key {unknown[0]!r}; allowed: {sorted(known)}")
        return HubConfig(
            fleet=check_name(doc["fleet"], "fleet"),
            broker_url=str(doc["broker_url"]),
            http_listen=str(doc["http_listen"]),
            public_url=str(doc.get("public_url", "")),
            desired_ttl_seconds=int(doc.get("desired_ttl_seconds", 30 * 86400)),
            **{k: self._path_or_str(k, doc.get(k, "")) for k in _SECURITY_KEYS},
        )

    def _path_or_str(self, key: str, value: object) -> str:
        if not isinstance(value, str):
            raise ConfigError(f"{self.config_path}: {key} must be a string, got {value!r}")
        if key.endswith("_file") and value and not Path(value).is_absolute():
            return str(self.path / value)  # relative to the hub home
        return value

    def update_config(self, **changes: str) -> None:
        """Set top-level string keys of hub.toml, keeping every other line (and comment) as is."""
        lines = self.config_path.read_text(encoding="utf-8").splitlines()
        for key, value in changes.items():
            new = f"{key} = {json.dumps(value)}"
            for i, line in enumerate(lines):
                if line.split("=", 1)[0].strip() == key:
                    lines[i] = new
                    break
            else:
                lines.append(new)
        atomic_write(self.config_path, ("\n".join(lines) + "\n").encode(), mode=0o644)
        self.config()  # refuse to leave a file we cannot read back

    @property
    def pki_path(self) -> Path:
        return self.path / "pki"

    def token(self) -> str:
        try:
            return self.token_path.read_text().strip()
        except FileNotFoundError as exc:
            raise ConfigError(f"no admin token at {self.token_path}; is {self.path} a hub home?") from exc

    def root_key(self, path: Path | None = None) -> Ed25519PrivateKey:
        """The root private key, from ``path`` (a ceremony's ``--root-key``, e.g. on removable
        media) or ``DIR/keys/root.pem``. Only key ceremonies call this; it must be the key whose
        public half is ``DIR/keys/root.pub``."""
        where = path or self.root_key_path
        try:
            key = load_private_key(where)
        except FileNotFoundError as exc:
            raise ConfigError(
                f"no root private key at {where}: this ceremony signs with the fleet root key; if it "
                "is kept offline, bring it and pass its path with --root-key PATH"
            ) from exc
        if self.root_pub_path.exists() and public_key_to_b64(key.public_key()) != self.root_public_b64():
            raise ConfigError(
                f"{where} is not this fleet's current root key: its key id is "
                f"{key_id(key.public_key())[:16]}…, {self.root_pub_path} names "
                f"{key_id(public_key_from_b64(self.root_public_b64()))[:16]}… (an older root, or another "
                "fleet's?)"
            )
        return key

    def signing_key(self) -> Ed25519PrivateKey:
        return load_private_key(self.keys / "signing.pem")

    def root_public_b64(self) -> str:
        """The fleet root public key (base64), from ``DIR/keys/root.pub``. A home from before
        root.pub existed gets it derived, once, from ``DIR/keys/root.pem``."""
        try:
            text = self.root_pub_path.read_text().strip()
        except FileNotFoundError:
            if not self.root_key_path.exists():
                raise ConfigError(
                    f"no root public key at {self.root_pub_path} (and no root.pem to derive it from); "
                    "copy the fleet's root.pub there (`root_public_key` of any device's agent.toml)"
                ) from None
            key = load_private_key(self.root_key_path)
            self._write_root_public(key.public_key())
            return public_key_to_b64(key.public_key())
        try:
            public_key_from_b64(text)
        except MalformedMessage as exc:
            raise ConfigError(f"{self.root_pub_path} is not a base64 Ed25519 public key: {exc}") from exc
        return text

    def set_root_public(self, public: Ed25519PublicKey) -> None:
        """A root rotation's new public key (:mod:`hub.services.keys`)."""
        self._write_root_public(public)

    def _write_root_public(self, public: Ed25519PublicKey) -> None:
        atomic_write(self.root_pub_path, (public_key_to_b64(public) + "\n").encode(), mode=0o644)

    # -- where the daemon answers ----------------------------------------------------------------

    def write_run(self, info: dict[str, Any]) -> None:
        atomic_write(self.run_path, json.dumps({**info, "pid": os.getpid()}).encode(), mode=0o644)

    def clear_run(self) -> None:
        self.run_path.unlink(missing_ok=True)

    def api_url(self) -> str:
        try:
            return str(json.loads(self.run_path.read_text())["http"])
        except (FileNotFoundError, ValueError, KeyError):
            return ("https://" if self.config().http_tls else "http://") + self.config().http_listen


def keyring_path(home: HubHome) -> Path:
    return home.keys / "keyring.json"


def private_pem(key: Ed25519PrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def load_private_key(path: Path) -> Ed25519PrivateKey:
    """An Ed25519 private key from a PEM file (raises FileNotFoundError when there is none)."""
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), None)
    except ValueError as exc:
        raise ConfigError(f"{path} is not a PEM private key: {exc}") from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise ConfigError(f"{path} is not an Ed25519 key")
    return key
