"""Device enrolment on the hub's side: MQTT credentials, revocation, the device list, and the
hub's own broker credentials.

Called by the daemon (which owns the database); each function takes what it uses (the database,
the hub home, its config, the hub's own broker URL, the time), not the daemon. The certificate
authority itself is :mod:`hub.adapters.pki`. Credential kinds a device can be enrolled with:

    cert       a client certificate + key from the device CA (CN = device id)   [default]
    password   a random password, stored hashed in the Mosquitto password file
    both       both of the above
    none       no broker credentials (a broker with anonymous access, e.g. the demo)
    auto       ``cert`` once ``broker-config`` has set the broker up, else ``none``
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgefleet.agent.contract.errors import ConfigError
from edgefleet.hub.adapters.home import HubConfig, HubHome
from edgefleet.hub.adapters.pki import DevicePki
from edgefleet.hub.errors import BadRequest, NotFound

if TYPE_CHECKING:
    from edgefleet.hub.db import Database

__all__ = [
    "CREDENTIAL_KINDS",
    "device_broker_url",
    "hub_link_options",
    "issue_credentials",
    "list_devices",
    "pki_for",
    "revoke_device",
    "undo_credentials",
]

CREDENTIAL_KINDS = ("cert", "password", "both", "none", "auto")


def pki_for(home: HubHome, fleet: str) -> DevicePki:
    return DevicePki(home.pki_path, fleet)


def hub_link_options(home: HubHome, config: HubConfig) -> dict[str, Any]:
    """Keyword arguments for the hub's :class:`~agent.adapters.mqttlink.MqttLink`: CA, user, password."""
    opts: dict[str, Any] = {}
    if config.broker_ca_file:
        opts["ca_file"] = config.broker_ca_file
    if config.broker_cert_file:
        opts["cert_file"], opts["key_file"] = config.broker_cert_file, config.broker_key_file
    if config.broker_username:
        opts["username"] = config.broker_username
        if config.broker_password_file:
            try:
                opts["password"] = Path(config.broker_password_file).read_text().strip()
            except OSError as exc:
                raise ConfigError(
                    f"hub.toml: broker_password_file {config.broker_password_file} cannot be read "
                    f"({exc}); rerun `edgefleet-hub broker-config` or fix the path"
                ) from exc
    return opts


def issue_credentials(home: HubHome, config: HubConfig, broker_url: str, device: str, kind: object,
                      now: float) -> dict[str, Any]:
    """Issue what ``kind`` asks for; the result goes back to the enrolling CLI once. ``broker_url``
    is the hub's own (see :func:`device_broker_url`)."""
    if kind not in CREDENTIAL_KINDS:
        raise BadRequest(f"credentials must be one of {CREDENTIAL_KINDS}, got {kind!r}")
    pki = pki_for(home, config.fleet)
    if kind == "auto":
        kind = "cert" if config.device_broker_url and pki.ca_path.exists() else "none"
    out: dict[str, Any] = {"kind": kind}
    if kind in ("password", "both") and config.jetstream_url:
        raise BadRequest(f"this fleet's broker is a NATS cluster, which takes client certificates only "
                         f"(one MQTT listener, verify_and_map); enrol with --credentials cert, got {kind!r}")
    if kind == "none":
        if config.http_tls and pki.ca_path.exists():
            out["ca_pem"] = pki.ca_pem().decode()  # https blobs: the device pins the CA (hub.tls)
        return out
    if kind in ("cert", "both") and not device_broker_url(config, broker_url, kind).startswith("mqtts://"):
        raise BadRequest(
            f"a client certificate needs a TLS broker, but devices would connect to "
            f"{device_broker_url(config, broker_url, kind)!r}; run `edgefleet-hub broker-config` first "
            "(or enrol with --credentials password / none)"
        )
    pki.ensure_ca(now)
    out["ca_pem"] = pki.ca_pem().decode()
    try:
        if kind in ("cert", "both"):
            issued = pki.issue_client(device, now)
            out.update(
                cert_pem=issued.cert_pem.decode(),
                key_pem=issued.key_pem.decode(),
                serial=format(issued.serial, "x"),
                not_after=issued.not_after,
            )
        if kind in ("password", "both"):
            out.update(username=device, password=pki.set_password(device))
    except BaseException:  # "both": the certificate is issued, the password fails: take it back
        undo_credentials(home, config, device, serial=out.get("serial"), password=False)
        raise
    return out


def undo_credentials(home: HubHome, config: HubConfig, device: str, *, serial: str | None,
                     password: bool) -> None:
    """Take back what :func:`issue_credentials` issued for an enrolment that failed or was
    cancelled: the certificate ``serial`` leaves the index, the password (if ``password``) the
    password files."""
    if serial is None and not password:
        return
    pki_for(home, config.fleet).forget(device, [serial] if serial else [], password=password)


def device_broker_url(config: HubConfig, broker_url: str, kind: str) -> str:
    """Where a device enrolled with credentials ``kind`` connects (hub.brokerconf's listeners);
    ``broker_url`` (the hub's own) when hub.toml names no device listener for it."""
    if kind in ("cert", "both") and config.device_broker_url:
        return config.device_broker_url
    if kind == "password" and config.device_password_broker_url:
        return config.device_password_broker_url
    return broker_url


def revoke_device(db: Database, home: HubHome, config: HubConfig, device: str, actor: str,
                  clock: Callable[[], float]) -> dict[str, Any]:
    if device not in db.device_ids():
        raise NotFound(f"no device {device!r}; `edgefleet-hub device list` shows the enrolled ones")
    now = clock()
    pki = pki_for(home, config.fleet)
    if pki.ca_path.exists():
        res = pki.revoke(device, now)
    else:  # a plain-MQTT hub that never made a device CA: no certificate or password to revoke
        res = {"device": device, "revoked_serials": [], "password_removed": False}
    with db.tx() as conn:
        db.clear_capture_token(conn, device)
        db.audit(conn, now, actor, "device_revoke", {**res, "capture_token_removed": True})
    return {**res, "capture_token_removed": True, "broker_folders": pki.exports()}


def list_devices(db: Database, home: HubHome, config: HubConfig) -> list[dict[str, Any]]:
    creds = pki_for(home, config.fleet).device_credentials()
    out = []
    for d in db.device_summaries():
        c = creds.get(d["id"], {"certs": [], "password": False, "revoked_at": None})
        live = [x for x in c["certs"] if not x["revoked_at"]]
        out.append(
            {
                "device": d["id"],
                "profile": d["profile"],
                "group": d["device_group"],
                "created_at": d["created_at"],
                "status": d["status"] or "never seen",
                "revoked": c["revoked_at"] is not None,
                "revoked_at": c["revoked_at"],
                "certificates": c["certs"],
                "cert_not_after": max((x["not_after"] for x in live), default=None),
                "password": c["password"],
            }
        )
    return out
