"""Device enrolment on the hub's side: MQTT credentials, revocation, the device list, and the
hub's own broker credentials.

Called by the daemon (which owns the database) through small hooks; the certificate authority
itself is :mod:`hub.adapters.pki`. Credential kinds a device can be enrolled with:

    cert       a client certificate + key from the device CA (CN = device id)   [default]
    password   a random password, stored hashed in the Mosquitto password file
    both       both of the above
    none       no broker credentials (a broker with anonymous access, e.g. the demo)
    auto       ``cert`` once ``broker-config`` has set the broker up, else ``none``
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgefleet.agent.contract.errors import ConfigError
from edgefleet.hub.adapters.home import HubConfig, HubHome
from edgefleet.hub.adapters.pki import DevicePki
from edgefleet.hub.errors import BadRequest, NotFound

if TYPE_CHECKING:
    from edgefleet.hub.daemon import Hub

__all__ = [
    "CREDENTIAL_KINDS",
    "hub_link_options",
    "issue_credentials",
    "list_devices",
    "pki_for",
    "revoke_device",
]

CREDENTIAL_KINDS = ("cert", "password", "both", "none", "auto")


def pki_for(home: HubHome, fleet: str) -> DevicePki:
    return DevicePki(home.pki_path, fleet)


def hub_link_options(home: HubHome, config: HubConfig) -> dict[str, Any]:
    """Keyword arguments for the hub's :class:`~agent.adapters.mqttlink.MqttLink`: CA, user, password."""
    opts: dict[str, Any] = {}
    if config.broker_ca_file:
        opts["ca_file"] = config.broker_ca_file
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


def issue_credentials(hub: Hub, device: str, kind: object, now: float) -> dict[str, Any]:
    """Issue what ``kind`` asks for; the result goes back to the enrolling CLI once."""
    if kind not in CREDENTIAL_KINDS:
        raise BadRequest(f"credentials must be one of {CREDENTIAL_KINDS}, got {kind!r}")
    pki = pki_for(hub.home, hub.config.fleet)
    if kind == "auto":
        kind = "cert" if hub.config.device_broker_url and pki.ca_path.exists() else "none"
    out: dict[str, Any] = {"kind": kind}
    if kind == "none":
        if hub.config.http_tls and pki.ca_path.exists():
            out["ca_pem"] = pki.ca_pem().decode()  # https blobs: the device pins the CA (hub.tls)
        return out
    if kind in ("cert", "both") and not device_broker_url(hub, kind).startswith("mqtts://"):
        raise BadRequest(
            f"a client certificate needs a TLS broker, but devices would connect to "
            f"{device_broker_url(hub, kind)!r}; run `edgefleet-hub broker-config` first "
            "(or enrol with --credentials password / none)"
        )
    pki.ensure_ca(now)
    out["ca_pem"] = pki.ca_pem().decode()
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
    return out


def device_broker_url(hub: Hub, kind: str) -> str:
    """Where a device enrolled with credentials ``kind`` connects (hub.brokerconf's listeners)."""
    if kind in ("cert", "both") and hub.config.device_broker_url:
        return hub.config.device_broker_url
    if kind == "password" and hub.config.device_password_broker_url:
        return hub.config.device_password_broker_url
    return hub.broker_url


def revoke_device(hub: Hub, device: str, actor: str) -> dict[str, Any]:
    if device not in hub.db.device_ids():
        raise NotFound(f"no device {device!r}; `edgefleet-hub device list` shows the enrolled ones")
    now = hub.clock()
    pki = pki_for(hub.home, hub.config.fleet)
    if pki.ca_path.exists():
        res = pki.revoke(device, now)
    else:  # a plain-MQTT hub that never made a device CA: no certificate or password to revoke
        res = {"device": device, "revoked_serials": [], "password_removed": False}
    with hub.db.tx() as conn:
        hub.db.clear_capture_token(conn, device)
        hub.db.audit(conn, now, actor, "device_revoke", {**res, "capture_token_removed": True})
    return {**res, "capture_token_removed": True, "broker_folders": pki.exports()}


def list_devices(hub: Hub) -> list[dict[str, Any]]:
    creds = pki_for(hub.home, hub.config.fleet).device_credentials()
    out = []
    for d in hub.db.device_summaries():
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
