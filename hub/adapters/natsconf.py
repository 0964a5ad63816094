"""``edgefleet-hub broker-config --kind nats``: a NATS cluster that enforces the wire contract.

Devices speak MQTT 3.1.1 to NATS's MQTT listener on any node; the hub publishes there too (retained
desired states, keyring, roots: only an MQTT publish makes a retained message) and reads what
devices send from a replicated JetStream stream (:mod:`hub.adapters.jetstream`), which keeps what
arrives while no hub replica runs.

What each node's file says, and why:

* ``server_name`` (NATS's MQTT refuses to start in a cluster without one) and ``cluster`` routes to
  every node, over TLS with the node certificate from the fleet's device CA (``verify``: a node
  must present one too);
* ``jetstream`` with a store of its own: MQTT sessions, retained messages and the hub's ingest
  stream all live in JetStream, replicated over three nodes (NATS picks ``min(3, nodes)`` for its
  MQTT streams; the hub asks the same for its own);
* ``max_payload`` just above the largest message either side accepts
  (:data:`agent.contract.wire.MAX_MESSAGE_BYTES`, 4 MiB): NATS's default of 1 MiB disconnects a
  device that sends a bigger telemetry window, and refuses a big desired state from the hub;
* one ``mqtt`` listener and the NATS client listener, both TLS with ``verify_and_map``: a client
  must show a certificate from the device CA, and its subject names its user (``CN=<device>,O=...``).
  NATS has one MQTT listener and one authentication method per listener, so there is no password
  enrolment on NATS: devices and the hub alike use certificates;
* ``users.conf`` (included): one user per enrolled device with an unrevoked certificate, and the
  hub's. The hub rewrites it whenever a device is enrolled or revoked (as it does Mosquitto's
  ``passwd``); then reload every node (``nats-server --signal reload=PID`` or SIGHUP): a revoked
  device is cut off at once, a new one admitted. ``nats-reload.path`` (written beside) makes
  systemd do that reload whenever the file changes. The permissions are today's Mosquitto ACL in
  NATS subjects: a device subscribes to its own ``desired`` and ``acked``, the keyring and the
  roots, and publishes only its own ``reported``, ``telemetry``, ``events`` and ``status``. NATS
  answers a refused subscription with SUBACK 0x80 and drops a refused publish (after a PUBACK).

Topic levels map to subjects: ``/`` becomes ``.``, a ``.`` inside a level becomes ``//``
(device ids may contain dots), see :func:`hub.core.brokeracl.topic_to_subject` and its inverse.

The text builders are pure; :func:`write_nats_config` does the files.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from edgefleet.agent.adapters.store import atomic_write
from edgefleet.agent.contract.wire import MAX_MESSAGE_BYTES, TOPIC_PREFIX
from edgefleet.hub.adapters.brokerconf import MAX_PACKET_BYTES
from edgefleet.hub.adapters.pki import DevicePki, hub_username
from edgefleet.hub.core.brokeracl import admitted_devices, users_conf_text
from edgefleet.hub.core.brokeracl import nats_quote as _q

__all__ = ["NatsLayout", "node_conf_text", "reload_units", "write_nats_config"]

CLUSTER_FILE = "nats-cluster.json"  # what the hub and the tests read back: nodes and their URLs


@dataclass(frozen=True)
class NatsLayout:
    folder: Path
    nodes: int = 3
    hosts: tuple[str, ...] = ("127.0.0.1",)  # one per node, or one for all (then ports step by node)
    bind: str = "0.0.0.0"  # noqa: S104 - a broker serves devices on the network
    mqtt_port: int = 8883
    client_port: int = 4222
    cluster_port: int = 6222
    monitor_port: int = 8222
    cluster_name: str = "edgefleet"
    tls: bool = True  # False only for tests: no certificates, no users, anyone may do anything

    def __post_init__(self) -> None:
        if self.nodes < 1:
            raise ValueError(f"a NATS cluster needs at least one node, got --nodes {self.nodes}")
        if len(self.hosts) not in (1, self.nodes):
            raise ValueError(f"give one host for all {self.nodes} nodes or one per node, got {list(self.hosts)}")

    def host(self, i: int) -> str:
        return self.hosts[i] if len(self.hosts) > 1 else self.hosts[0]

    def port(self, base: int, i: int) -> int:
        """Nodes on one host step their ports by one; nodes on hosts of their own share them."""
        return base + i if len(set(self.hosts)) == 1 and self.nodes > 1 else base

    def urls(self, kind: str) -> list[str]:
        scheme = {"mqtt": "mqtts" if self.tls else "mqtt", "nats": "tls" if self.tls else "nats"}[kind]
        base = self.mqtt_port if kind == "mqtt" else self.client_port
        return [f"{scheme}://{self.host(i)}:{self.port(base, i)}" for i in range(self.nodes)]

    def replicas(self) -> int:
        return min(3, self.nodes)


def node_conf_text(layout: NatsLayout, fleet: str, i: int) -> str:
    d = layout.folder.resolve()
    name = f"edgefleet-{i + 1}"
    tls = (f"cert_file: {_q(str(d / 'server.pem'))}, key_file: {_q(str(d / 'server.key'))}, "
           f"ca_file: {_q(str(d / 'ca.pem'))}")
    routes = ", ".join(_q(f"nats-route://{layout.host(j)}:{layout.port(layout.cluster_port, j)}")
                       for j in range(layout.nodes))
    lines = [
        f"# NATS server configuration for edgefleet fleet {fleet}: node {i + 1} of {layout.nodes}, written",
        "# by `edgefleet-hub broker-config --kind nats`. Run: nats-server -c THIS_FILE",
        "# After `edgefleet-hub device enrol|revoke` rewrote users.conf: nats-server --signal reload=PID",
        "# (or kill -HUP) on every node. docs/scale-out.md explains the cluster.",
        f"server_name: {_q(name)}",
        f"listen: {_q(f'{layout.bind}:{layout.port(layout.client_port, i)}')}",
        f"http: {_q(f'127.0.0.1:{layout.port(layout.monitor_port, i)}')}  # monitoring, this machine only",
        f"pid_file: {_q(str(d / f'node-{i + 1}.pid'))}  # nats-server --signal reload=THIS (nats-reload.service)",
        "",
        f"# No message is larger than {MAX_MESSAGE_BYTES} bytes (telemetry windows, desired states, keyrings);",
        "# NATS's default of 1 MiB would disconnect a device that sends a bigger one.",
        f"max_payload: {MAX_PACKET_BYTES}",
        "",
        "# MQTT sessions, retained messages and the hub's ingest stream live here, replicated.",
        f"jetstream {{ store_dir: {_q(str(d / 'data' / name))} }}",
        "",
        "cluster {",
        f"  name: {_q(layout.cluster_name)}",
        f"  listen: {_q(f'{layout.bind}:{layout.port(layout.cluster_port, i)}')}",
        f"  routes: [{routes}]",
    ]
    if layout.tls:
        lines += [f"  tls {{ {tls}, verify: true }}  # nodes show a certificate from the device CA"]
    lines += ["}", ""]
    if layout.tls:
        lines += [
            "# The NATS protocol (the hub's JetStream ingest, operators' tools): certificates only.",
            f"tls {{ {tls}, verify_and_map: true }}",
            "",
            "# Who may do what: the hub and every enrolled device (rewritten by the hub).",
            f"include {_q('users.conf')}",
            "",
        ]
    lines += [
        "# Devices (and the hub's publisher): MQTT 3.1.1.",
        "mqtt {",
        f"  listen: {_q(f'{layout.bind}:{layout.port(layout.mqtt_port, i)}')}",
    ]
    if layout.tls:
        lines += [f"  tls {{ {tls}, verify_and_map: true }}  # the certificate's subject is the user"]
    lines += ["}", ""]
    return "\n".join(lines)


def reload_units(layout: NatsLayout) -> dict[str, str]:
    """systemd units that reload the nodes of this host whenever the hub rewrites users.conf (an
    enrolment admits a device, a revocation cuts it off): install both, enable the path unit."""
    d = layout.folder.resolve()
    path = "\n".join([
        "# Written by `edgefleet-hub broker-config --kind nats`: reload the NATS nodes of this host when",
        "# the hub rewrites users.conf. install -m 644 nats-reload.path nats-reload.service /etc/systemd/system/",
        "#   systemctl daemon-reload && systemctl enable --now nats-reload.path",
        "[Unit]",
        "Description=Reload the edgefleet NATS nodes when their users change",
        "",
        "[Path]",
        f"PathChanged={d / 'users.conf'}",
        "",
        "[Install]",
        "WantedBy=multi-user.target",
        "",
    ])
    service = "\n".join([
        "# Written by `edgefleet-hub broker-config --kind nats` (started by nats-reload.path).",
        "[Unit]",
        "Description=Reload the edgefleet NATS nodes of this host (users.conf changed)",
        "",
        "[Service]",
        "Type=oneshot",
        # every node of this host that runs: its pid file names it (a node that is down reads the
        # new file when it starts)
        f"ExecStart=/bin/sh -c 'for p in {d}/node-*.pid; do [ -e \"$p\" ] && nats-server --signal reload=\"$p\"; done; true'",
        "",
    ])
    return {"nats-reload.path": path, "nats-reload.service": service}


def write_nats_config(
    pki: DevicePki,
    layout: NatsLayout,
    *,
    hostnames: Sequence[str],
    now: float,
    prefix: str = TOPIC_PREFIX,
) -> dict[str, str]:
    """Write every node's configuration, the TLS files and ``users.conf`` into ``layout.folder``
    (and keep ``users.conf`` in step with enrolments from now on); return the paths written."""
    folder = layout.folder
    folder.mkdir(parents=True, exist_ok=True)
    files: dict[str, tuple[bytes, int]] = {}
    if layout.tls:
        pki.ensure_ca(now)
        hosts = list(dict.fromkeys([*hostnames, *layout.hosts]))
        cert, key = pki.issue_server(hosts, now, cluster=True)
        files |= {"ca.pem": (pki.ca_pem(), 0o644), "server.pem": (cert, 0o644), "server.key": (key, 0o640)}
    for i in range(layout.nodes):
        files[f"node-{i + 1}.conf"] = (node_conf_text(layout, pki.fleet, i).encode(), 0o644)
    cluster = {"kind": "nats", "fleet": pki.fleet, "nodes": layout.nodes, "replicas": layout.replicas(),
               "mqtt": layout.urls("mqtt"), "nats": layout.urls("nats"),
               "monitor": [f"http://127.0.0.1:{layout.port(layout.monitor_port, i)}" for i in range(layout.nodes)]}
    files[CLUSTER_FILE] = (json.dumps(cluster, indent=2).encode(), 0o644)
    if layout.tls:
        files |= {name: (text.encode(), 0o644) for name, text in reload_units(layout).items()}
    for name, (data, mode) in files.items():
        atomic_write(folder / name, data, mode=mode)
    (folder / "data").mkdir(exist_ok=True)
    if layout.tls:
        atomic_write(folder / "users.conf", users_conf_text(pki.fleet, admitted_devices(pki.device_credentials()), hub_username(pki.fleet), prefix).encode(),
                     mode=0o640)
        pki.add_export(folder)  # rewrites users.conf after every enrolment and revocation
    return {name: str(folder / name) for name in [*files, *(["users.conf"] if layout.tls else [])]}
