"""``edgefleet-hub broker-config``: a Mosquitto 2.x configuration that enforces the wire contract.

Three TLS listeners share one CA (the hub's device CA, :mod:`hub.adapters.pki`), each with its own
authentication settings (``per_listener_settings true``):

* the **device listener** (default 8883) requires a client certificate from the device CA,
  checks it against the CRL, and makes its CN the MQTT username (``use_identity_as_username``);
* the **password listener** (default 8884) takes username/password from ``passwd``: devices
  enrolled with a password;
* the **hub listener** (default 8885) takes only the hub's user, from ``hub-passwd``.

The device and password listeners force the client id to the username
(``use_username_as_clientid``), so one device cannot knock another off the broker by reusing its
client id. The hub listener does not: the hub opens several connections (replicas, ingest links),
each with its own persistent session, and a forced id would have them knock each other off in
turn. Its client ids start with the hub user, whose ``@`` no device id may contain, so no device
can take one over. Anonymous access is off. The ACL gives the
hub user the whole fleet root, and every other user, through ``pattern`` lines on ``%u``, read
access to its own ``desired``, the keyring and the root-rotation chain (``roots``: without it a
device never learns a new root, and refuses every keyring signed by it) and write access to its
own ``reported``, ``telemetry``, ``events`` and ``status`` — nothing else. Queue limits are raised so a slow or
briefly absent hub does not make the broker drop QoS 1 telemetry (Mosquitto's default keeps
only 1000 messages per client). Packets are capped just above the largest message either side
accepts (:data:`agent.contract.wire.MAX_MESSAGE_BYTES`, 4 MiB: desired states, keyrings, root
chains and telemetry windows alike): a client that sends more is disconnected before the broker
buffers it (``max_packet_size``), and a payload above the cap is never forwarded
(``message_size_limit``).

The text builders are pure functions; :func:`write_broker_config` does the files.
"""

from __future__ import annotations

import socket
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from edgefleet.agent.adapters.store import atomic_write
from edgefleet.agent.contract.wire import MAX_MESSAGE_BYTES, TOPIC_PREFIX, Topics
from edgefleet.hub.adapters.pki import DevicePki, hub_username
from edgefleet.hub.core.brokeracl import DEVICE_READS, DEVICE_WRITES

__all__ = ["MAX_PACKET_BYTES", "BrokerLayout", "acl_text", "mosquitto_conf_text", "write_broker_config"]

# A PUBLISH packet carries its payload plus a fixed header (at most 5 bytes), the topic (under
# 200 bytes for ours: check_name caps fleet and device ids at 64), a packet id and, in MQTT 5,
# properties: 64 KiB of headroom keeps every payload of MAX_MESSAGE_BYTES within the packet cap.
PACKET_HEADROOM = 64 * 1024
MAX_PACKET_BYTES = MAX_MESSAGE_BYTES + PACKET_HEADROOM



@dataclass(frozen=True)
class BrokerLayout:
    folder: Path
    bind: str = "0.0.0.0"  # noqa: S104 - a broker serves devices on the network
    device_port: int = 8883
    password_port: int = 8884
    hub_port: int = 8885
    run_as: str | None = None  # Mosquitto's `user`; None keeps its default ("mosquitto")
    persistence: bool = True


def acl_text(fleet: str, prefix: str = TOPIC_PREFIX) -> str:
    root = f"{prefix}{fleet}/"
    lines = [
        f"# edgefleet ACL for fleet {fleet}, written by `edgefleet-hub broker-config`.",
        "# %u is the MQTT username: the certificate CN on the device listener, the password",
        "# file's user on the password listener. Device ids never contain + # / or @.",
        "",
        "# The hub: the whole fleet root.",
        f"user {hub_username(fleet)}",
        f"topic readwrite {root}#",
        "",
        "# Every device: its own desired state, the keyring and the root rotations in, its own",
        "# reports out. (Mosquitto warns that the keyring and roots lines have no %u: they are",
        "# meant for every user.)",
    ]
    lines += [f"pattern read {root}devices/%u/{c}" for c in DEVICE_READS]
    # Fleet-wide topics every device subscribes to (agent.app.daemon): named by the wire contract,
    # so the ACL cannot drift from what agents read.
    topics = Topics(fleet, prefix)
    lines += [f"pattern read {t}" for t in (topics.keyring, topics.roots)]
    lines += [f"pattern write {root}devices/%u/{c}" for c in DEVICE_WRITES]
    return "\n".join(lines) + "\n"


def mosquitto_conf_text(layout: BrokerLayout, fleet: str) -> str:
    d = layout.folder.resolve()
    tls = [
        f"cafile {d / 'ca.pem'}",
        f"certfile {d / 'server.pem'}",
        f"keyfile {d / 'server.key'}",
        "allow_anonymous false",
        f"acl_file {d / 'acl'}",
    ]
    lines = [
        f"# Mosquitto 2.x configuration for edgefleet fleet {fleet}, written by",
        "# `edgefleet-hub broker-config`. Run: mosquitto -c THIS_FILE",
        "# `edgefleet-hub device revoke` rewrites passwd and crl.pem here: then send Mosquitto",
        "# SIGHUP (systemctl reload mosquitto) so it reloads them. Mosquitto's user must be able",
        "# to read server.key, passwd and crl.pem: chgrp mosquitto them once (the hub keeps the",
        "# group when it rewrites them) and let the hub's user write this folder.",
        "# Authentication per listener: the hub has a listener (and password file) of its own.",
        "per_listener_settings true",
        "",
        "# Do not drop QoS 1 telemetry while the hub is slow or away.",
        "max_queued_messages 1000000",
        "max_queued_bytes 0",
        "max_inflight_messages 100",
        "queue_qos0_messages false",
        "upgrade_outgoing_qos false",
        "",
        "# Connections: one per device plus the hub's links; no count cap here (each listener says",
        "# max_connections -1). The limit that bites is the broker's open files: one descriptor",
        "# per connection. Install mosquitto-limits.conf from this folder as a systemd drop-in",
        "# (/etc/systemd/system/mosquitto.service.d/edgefleet-limits.conf, then systemctl",
        "# daemon-reload and restart mosquitto): LimitNOFILE=1048576. docs/scale-out.md has the figures.",
        "",
        f"# No message is larger than {MAX_MESSAGE_BYTES} bytes: hub and agents refuse bigger payloads",
        "# (desired states, keyrings, root chains, telemetry windows). A client that sends a bigger",
        "# packet is disconnected before the broker buffers it; a bigger payload is not forwarded.",
        f"max_packet_size {MAX_PACKET_BYTES}",
        f"message_size_limit {MAX_MESSAGE_BYTES}",
        "",
    ]
    if layout.persistence:
        lines += [
            "persistence true",
            f"persistence_location {d / 'data'}/",
            "autosave_interval 60",
            "",
        ]
    else:
        lines += ["persistence false", ""]
    if layout.run_as:
        lines += [f"user {layout.run_as}", ""]
    lines += [
        "# Devices: a client certificate from the edgefleet device CA; its CN is the username.",
        f"listener {layout.device_port} {layout.bind}",
        "max_connections -1",
        *tls,
        "use_username_as_clientid true",
        f"crlfile {d / 'crl.pem'}",
        "require_certificate true",
        "use_identity_as_username true",
        "",
        "# Password-enrolled devices: TLS, username and password.",
        f"listener {layout.password_port} {layout.bind}",
        "max_connections -1",
        *tls,
        "use_username_as_clientid true",
        f"password_file {d / 'passwd'}",
        "require_certificate false",
        "",
        "# The hub only (hub-passwd holds its user alone). Client ids are not forced here: hub",
        "# replicas and ingest links each keep their own persistent session.",
        f"listener {layout.hub_port} {layout.bind}",
        "max_connections -1",
        *tls,
        f"password_file {d / 'hub-passwd'}",
        "require_certificate false",
        "",
    ]
    return "\n".join(lines)


MOSQUITTO_LIMITS = """\
# systemd drop-in for mosquitto.service, written by `edgefleet-hub broker-config`:
#   install -D -m 644 mosquitto-limits.conf /etc/systemd/system/mosquitto.service.d/edgefleet-limits.conf
#   systemctl daemon-reload && systemctl restart mosquitto
# The broker holds one open file per connected device; systemd's default soft limit is 1,024.
[Service]
LimitNOFILE=1048576
"""


def default_hostnames() -> list[str]:
    names = ["localhost", "127.0.0.1", "::1"]
    fqdn = socket.getfqdn()
    if fqdn and fqdn not in names:
        names.append(fqdn)
    return names


def write_broker_config(
    pki: DevicePki,
    layout: BrokerLayout,
    *,
    hostnames: Sequence[str],
    now: float,
    prefix: str = TOPIC_PREFIX,
) -> dict[str, str]:
    """Write everything Mosquitto needs into ``layout.folder``; return the paths written."""
    folder = layout.folder
    folder.mkdir(parents=True, exist_ok=True)
    pki.ensure_ca(now)
    pki.hub_password()  # the hub's user must be in the password file
    cert, key = pki.issue_server(hostnames, now)
    files = {
        "ca.pem": (pki.ca_pem(), 0o644),
        "server.pem": (cert, 0o644),
        "server.key": (key, 0o640),
        "acl": (acl_text(pki.fleet, prefix).encode(), 0o644),
        "mosquitto.conf": (mosquitto_conf_text(layout, pki.fleet).encode(), 0o644),
        "mosquitto-limits.conf": (MOSQUITTO_LIMITS.encode(), 0o644),
    }
    for name, (data, mode) in files.items():
        atomic_write(folder / name, data, mode=mode)
    if layout.persistence:
        (folder / "data").mkdir(exist_ok=True)
    pki.write_crl(now)
    pki.add_export(folder)  # writes crl.pem and passwd now and after every change
    return {name: str(folder / name) for name in [*files, "crl.pem", "passwd", "hub-passwd"]}
