"""The hub's home folder: keys, configuration, admin token, database and blobs.

    DIR/hub.toml          fleet, broker URL, HTTP listen address, public blob URL, TTLs
    DIR/admin.token       bearer token of the admin API (0600)
    DIR/tokens.json       named API tokens: name, role, sha256 (0600; hub.adapters.tokens)
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

Only the hub's user may read any of it: ``init`` makes the folder and its sub-folders 0700 and
every file 0600 (the database too, whose WAL files SQLite gives the same mode), and the hub
writes what it adds (blobs, keyring, tokens, hub.run.json) 0600. A home made before that keeps
its modes; the hub warns at start while the home or a secret in it is open to other users.
"""

from __future__ import annotations

import contextlib
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
from edgefleet.agent.contract.config import toml_string
from edgefleet.agent.contract.envelope import key_id, public_key_from_b64, public_key_to_b64
from edgefleet.agent.contract.errors import ConfigError, MalformedMessage
from edgefleet.agent.contract.wire import check_name
from edgefleet.hub.adapters.objectstore import BlobStore, FolderStore, S3Store, read_credentials
from edgefleet.hub.core.desired import build_keyring

__all__ = ["HubConfig", "HubHome", "create_private", "keyring_path", "load_private_key", "private_pem",
           "read_optional_toml"]

_SECURITY_KEYS = ("device_broker_url", "device_password_broker_url", "broker_ca_file", "broker_username",
                  "broker_password_file", "broker_cert_file", "broker_key_file", "jetstream_url",
                  "http_cert_file", "http_key_file")



def create_private(path: Path) -> None:
    """Create an empty file readable by its owner alone, unless it exists (for files another
    library fills, such as the SQLite database)."""
    with contextlib.suppress(FileExistsError):
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))


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
    # A broker that takes certificates only (NATS): the hub's own client certificate and key
    broker_cert_file: str = ""
    broker_key_file: str = ""
    # NATS: the cluster's client URLs (tls://HOST:PORT, comma-separated); set, the hub reads device
    # channels from a JetStream stream (hub.adapters.jetstream) instead of MQTT subscriptions
    jetstream_url: str = ""
    # HTTPS for the blob server and admin API, written by `edgefleet-hub https-config` (hub.tls):
    # a server certificate from the device CA and its key; empty = plain HTTP
    http_cert_file: str = ""
    http_key_file: str = ""
    # The HTTP server's bounds (hub.adapters.api): connections open at once (one more is answered
    # 503 at once; agents retry downloads with backoff) and the socket timeout of each
    http_max_connections: int = 256
    http_timeout_seconds: float = 30.0
    # HOST:PORT of a second, unauthenticated listener serving GET /metrics alone (Prometheus);
    # empty = none (then /metrics is on http_listen, with a token like every admin call)
    metrics_listen: str = ""
    # Telemetry windows (and drift buckets) older than this many days are deleted; 0 keeps all
    telemetry_retention_days: float = 30.0
    # The database (hub.db): "sqlite:///PATH" (relative to the home) or "postgresql://..." (hub
    # replicas share one); empty = the home's hub.db
    db: str = ""
    # How long the elected controller may go without stamping its heartbeat before another
    # replica ends its database sessions and takes over (hub.services.controller)
    controller_lease_seconds: float = 10.0
    # Blobs: empty = HOME/blobs; "s3://BUCKET/PREFIX" = an S3-compatible object store replicas
    # share (hub.adapters.objectstore), reached at s3_endpoint with the keys in s3_credentials_file
    blob_store: str = ""
    s3_endpoint: str = ""
    s3_region: str = "us-east-1"
    s3_credentials_file: str = ""
    blob_url_ttl_seconds: float = 300.0
    # Where the online signing key is; empty = HOME/keys/signing.pem (docs/scale-out.md)
    signing_key_file: str = ""

    @property
    def http_tls(self) -> bool:
        return bool(self.http_cert_file)


class HubHome:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.config_path = path / "hub.toml"
        self.token_path = path / "admin.token"
        self.tokens_path = path / "tokens.json"
        self.keys = path / "keys"
        self.root_key_path = self.keys / "root.pem"  # the default place; ceremonies take --root-key
        self.root_pub_path = self.keys / "root.pub"
        self.db_path = path / "hub.db"
        self.blobs = path / "blobs"
        self.run_path = path / "hub.run.json"

    def exists(self) -> bool:
        return self.config_path.exists()

    def init(self, *, fleet: str, broker_url: str, http_listen: str, public_url: str = "", db: str = "") -> None:
        """Create keys, config and token. Refuses to overwrite an existing home. *db*: hub.toml's
        ``db`` (empty: the home's own hub.db)."""
        check_name(fleet, "fleet")
        if self.exists():
            raise ConfigError(f"{self.path} is already a hub home (found {self.config_path}); "
                              "choose another --home or remove it")
        self.path.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.path.chmod(0o700)  # also a folder that existed, empty, before init
        self.keys.mkdir(mode=0o700, exist_ok=True)
        self.blobs.mkdir(mode=0o700, exist_ok=True)
        if not db:
            create_private(self.db_path)
        keys = {}
        for name in ("root", "signing"):
            keys[name] = key = Ed25519PrivateKey.generate()
            atomic_write(self.keys / f"{name}.pem", private_pem(key), mode=0o600)
        self._write_root_public(keys["root"].public_key())
        # The first keyring is signed now, while the root key is here for the last time if the
        # operator moves it offline: the daemon never needs the root private key.
        atomic_write(keyring_path(self), build_keyring(fleet, 1, [keys["signing"]], keys["root"], time.time()),
                     mode=0o600)
        atomic_write(self.token_path, (secrets.token_urlsafe(32) + "\n").encode(), mode=0o600)
        text = (
            "# edgefleet hub configuration\n"
            f"fleet = {toml_string(fleet)}\n"
            f"broker_url = {toml_string(broker_url)}\n"
            f"http_listen = {toml_string(http_listen)}\n"
            "# URL agents use to reach this hub's HTTP server (blobs); empty = http://<http_listen>\n"
            f"public_url = {toml_string(public_url)}\n"
            "# desired states are re-signed before they expire\n"
            "desired_ttl_seconds = 2592000\n"
            + ("# the database hub replicas share (docs/scale-out.md)\n"
               f"db = {toml_string(db)}\n" if db else "")
        )
        atomic_write(self.config_path, text.encode(), mode=0o600)

    def config(self) -> HubConfig:
        try:
            doc = tomllib.loads(self.config_path.read_text(encoding="utf-8"))
        except FileNotFoundError as exc:
            raise ConfigError(
                f"{self.path} is not a hub home (no hub.toml); run `edgefleet-hub init --home {self.path}`"
            ) from exc
        known = {"fleet", "broker_url", "http_listen", "public_url", "desired_ttl_seconds",
                 "http_max_connections", "http_timeout_seconds", "metrics_listen", "telemetry_retention_days",
                 "db", "controller_lease_seconds", "blob_store", "s3_endpoint", "s3_region", "s3_credentials_file",
                 "blob_url_ttl_seconds", "signing_key_file", *_SECURITY_KEYS}
        unknown = sorted(set(doc) - known)
        if unknown:
            raise ConfigError(f"{self.config_path}: unknown key {unknown[0]!r}; allowed: {sorted(known)}")
        return HubConfig(
            fleet=check_name(doc["fleet"], "fleet"),
            broker_url=str(doc["broker_url"]),
            http_listen=str(doc["http_listen"]),
            public_url=str(doc.get("public_url", "")),
            desired_ttl_seconds=int(doc.get("desired_ttl_seconds", 30 * 86400)),
            http_max_connections=int(self._positive(doc, "http_max_connections", 256)),
            http_timeout_seconds=float(self._positive(doc, "http_timeout_seconds", 30.0)),
            metrics_listen=self._path_or_str("metrics_listen", doc.get("metrics_listen", "")),
            telemetry_retention_days=self._retention(doc),
            db=self._db(doc.get("db", "")),
            controller_lease_seconds=float(self._positive(doc, "controller_lease_seconds", 10.0)),
            blob_store=self._path_or_str("blob_store", doc.get("blob_store", "")),
            s3_endpoint=self._path_or_str("s3_endpoint", doc.get("s3_endpoint", "")),
            s3_region=self._path_or_str("s3_region", doc.get("s3_region", "us-east-1")),
            s3_credentials_file=self._path_or_str("s3_credentials_file", doc.get("s3_credentials_file", "")),
            blob_url_ttl_seconds=float(self._positive(doc, "blob_url_ttl_seconds", 300.0)),
            signing_key_file=self._path_or_str("signing_key_file", doc.get("signing_key_file", "")),
            **{k: self._path_or_str(k, doc.get(k, "")) for k in _SECURITY_KEYS},
        )

    def _db(self, value: object) -> str:
        if not isinstance(value, str):
            raise ConfigError(f"{self.config_path}: db must be a URL string, got {value!r}")
        if not value:
            return ""
        if value.startswith("sqlite:///"):
            path = Path(value[len("sqlite:///"):])
            return f"sqlite:///{path if path.is_absolute() else self.path / path}"
        if value.startswith(("postgresql://", "postgres://")):
            return value
        raise ConfigError(f"{self.config_path}: db must be sqlite:///PATH or postgresql://..., got {value!r}")

    def blob_store(self) -> BlobStore:
        """Where this home's blobs are (hub.toml ``blob_store``; default ``HOME/blobs``)."""
        cfg = self.config()
        if not cfg.blob_store:
            return FolderStore(self.blobs)
        key, secret = read_credentials(cfg.s3_credentials_file)
        endpoint = cfg.s3_endpoint or f"https://s3.{cfg.s3_region}.amazonaws.com"
        return S3Store(url=cfg.blob_store, endpoint=endpoint, region=cfg.s3_region, access_key=key,
                       secret_key=secret, url_ttl_seconds=int(cfg.blob_url_ttl_seconds))

    @property
    def db_url(self) -> str:
        """Where this home's database is (hub.toml ``db``; default ``HOME/hub.db``)."""
        return self.config().db or f"sqlite:///{self.db_path.resolve()}"

    def _retention(self, doc: dict[str, Any]) -> float:
        value = doc.get("telemetry_retention_days", 30.0)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
            raise ConfigError(f"{self.config_path}: telemetry_retention_days must be a number of days >= 0 "
                              f"(0 keeps every window), got {value!r}")
        return float(value)

    def _positive(self, doc: dict[str, Any], key: str, default: float) -> float:
        value = doc.get(key, default)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
            raise ConfigError(f"{self.config_path}: {key} must be a positive number, got {value!r}")
        return float(value)

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
            new = f"{key} = {toml_string(value)}"
            for i, line in enumerate(lines):
                if line.split("=", 1)[0].strip() == key:
                    lines[i] = new
                    break
            else:
                lines.append(new)
        atomic_write(self.config_path, ("\n".join(lines) + "\n").encode(), mode=0o600)
        self.config()  # refuse to leave a file we cannot read back

    def open_to_others(self) -> list[str]:
        """The home and the secrets in it that users other than the owner may read or enter
        (``path mode``), for the warning at start."""
        out = []
        for p in (self.path, self.keys, self.pki_path, self.config_path, self.token_path, self.tokens_path,
                  self.db_path, self.keys / "root.pem", self.keys / "signing.pem", self.pki_path / "ca.key"):
            try:
                mode = p.stat().st_mode & 0o777
            except FileNotFoundError:
                continue
            if mode & 0o077:
                out.append(f"{p} {mode:04o}")
        return out

    @property
    def pki_path(self) -> Path:
        return self.path / "pki"

    def token(self) -> str:
        try:
            return self.token_path.read_text().strip()
        except FileNotFoundError as exc:
            raise ConfigError(f"no admin token at {self.token_path}; is {self.path} a hub home? (from "
                              "another machine: --hub URL with $EDGEFLEET_TOKEN set to your token)") from exc

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

    @property
    def signing_key_path(self) -> Path:
        """hub.toml ``signing_key_file`` (a secret mounted where the site's secret store puts it:
        a systemd credential, a Kubernetes secret), else ``HOME/keys/signing.pem``."""
        configured = self.config().signing_key_file if self.config_path.exists() else ""
        return Path(configured) if configured else self.keys / "signing.pem"

    def signing_key(self) -> Ed25519PrivateKey:
        return load_private_key(self.signing_key_path)

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
        atomic_write(self.root_pub_path, (public_key_to_b64(public) + "\n").encode(), mode=0o600)

    # -- where the daemon answers ----------------------------------------------------------------

    def write_run(self, info: dict[str, Any]) -> None:
        atomic_write(self.run_path, json.dumps({**info, "pid": os.getpid()}).encode(), mode=0o600)

    def clear_run(self) -> None:
        self.run_path.unlink(missing_ok=True)

    def running_hub(self) -> str | None:
        """``pid N`` of the hub serving from this home, when its run file names a live process
        (a hub killed -9 leaves the file behind)."""
        try:
            pid = int(json.loads(self.run_path.read_text())["pid"])
        except (FileNotFoundError, ValueError, KeyError, TypeError):
            return None
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        except PermissionError:
            pass  # alive, another user's
        return f"pid {pid}"

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
