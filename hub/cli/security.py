"""``edgefleet-hub device revoke|list``, ``edgefleet-hub broker-config`` and ``https-config``.

Kept apart from :mod:`hub.cli.main` (which calls :func:`add_security_commands` while it builds its
parser). ``device revoke`` and ``device list`` go through the admin API like every other client
command; ``broker-config`` works on the hub home directly, like ``init``: it creates the device CA
and the broker's files, and points hub.toml at the TLS broker.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from edgefleet.agent.adapters.store import atomic_write
from edgefleet.agent.contract.errors import ConfigError
from edgefleet.agent.contract.wire import check_name, format_time
from edgefleet.hub.adapters.brokerconf import BrokerLayout, default_hostnames, write_broker_config
from edgefleet.hub.adapters.client import HubClient
from edgefleet.hub.adapters.home import HubHome
from edgefleet.hub.adapters.natsconf import NatsLayout, write_nats_config
from edgefleet.hub.adapters.pki import hub_username
from edgefleet.hub.cli.commands import emit, safe
from edgefleet.hub.services.enrol import pki_for

__all__ = ["add_security_commands"]

RELOAD_HINT = "now reload the broker (kill -HUP <mosquitto pid>, or systemctl reload mosquitto)"


def cmd_device_revoke(args: argparse.Namespace) -> int:
    home = HubHome(Path(args.home))
    check_name(args.id, "device id")
    res = HubClient.for_home(home, args.hub).revoke_device(args.id)
    where = ", ".join(res["broker_folders"]) or (
        "no broker folder (copy pki/crl.pem and pki/passwd to the broker)"
    )
    password = "removed" if res["password_removed"] else "none"
    emit(
        args,
        res,
        f"device {args.id} revoked: {len(res['revoked_serials'])} certificate(s) on the CRL, "
        f"password {password}\nupdated crl.pem and passwd in {where}; {RELOAD_HINT}",
    )
    return 0


def cmd_device_list(args: argparse.Namespace) -> int:
    home = HubHome(Path(args.home))
    devs = HubClient.for_home(home, args.hub).devices()
    lines = [f"{'DEVICE':20} {'GROUP':12} {'PROFILE':18} {'STATUS':11} {'CREDENTIALS':16} CERT EXPIRES"]
    for d in devs:
        has = (("cert", d["cert_not_after"] is not None), ("password", d["password"]))
        cred = "REVOKED" if d["revoked"] else ("+".join(k for k, on in has if on) or "none")
        exp = format_time(d["cert_not_after"]) if d["cert_not_after"] else "-"
        group = d.get("group") or "-"
        lines.append(f"{safe(d['device']):20} {safe(group):12} {safe(d['profile']):18} {safe(d['status']):11} "
                     f"{cred:16} {exp}")
    emit(args, {"devices": devs}, "\n".join(lines) if devs else "no devices enrolled")
    return 0


def cmd_broker_config(args: argparse.Namespace) -> int:
    if args.kind == "nats":
        return _nats_config(args)
    if args.nodes != 1 or args.node_host:
        raise ConfigError(f"--nodes and --node-host are for --kind nats; Mosquitto is one node, got --nodes {args.nodes}")
    home = HubHome(Path(args.home))
    cfg = home.config()
    layout = BrokerLayout(
        folder=Path(args.out),
        bind=args.bind,
        device_port=args.port,
        password_port=args.password_port,
        hub_port=args.hub_port,
        run_as=args.run_as or None,
        persistence=not args.no_persistence,
    )
    hosts = args.hostname or default_hostnames()
    pki = pki_for(home, cfg.fleet)
    files = write_broker_config(pki, layout, hostnames=hosts, now=time.time())
    host = args.public_host or hosts[0]
    if ":" in host:
        host = f"[{host}]"  # an IPv6 literal in a URL
    hub_url = f"mqtts://{host}:{args.hub_port}"
    device_url = f"mqtts://{host}:{args.port}"
    password_url = f"mqtts://{host}:{args.password_port}"
    user = hub_username(cfg.fleet)
    if not args.no_hub_config:
        home.update_config(
            broker_url=hub_url,
            device_broker_url=device_url,
            device_password_broker_url=password_url,
            broker_ca_file="pki/ca.pem",
            broker_username=user,
            broker_password_file="pki/hub.password",  # noqa: S106 - a path, not a password
        )
    updated = "" if args.no_hub_config else f"  {home.config_path} updated: restart the hub\n"
    emit(
        args,
        {"files": files, "hub_broker_url": hub_url, "device_broker_url": device_url,
         "device_password_broker_url": password_url},
        f"broker configuration for fleet {cfg.fleet} in {layout.folder}\n"
        f"  start it:   mosquitto -c {files['mosquitto.conf']}\n"
        f"  devices:    {device_url} (client certificate, CN = device id)\n"
        f"              {password_url} (devices enrolled with --credentials password)\n"
        f"  hub:        {hub_url} as {user} (password in {pki.hub_password_path})\n"
        f"{updated}"
        "  enrol devices with: edgefleet-hub device add ID --out DIR (certificate by default)\n"
        "  blobs over HTTPS with the same CA: edgefleet-hub https-config",
    )
    return 0


def _nats_config(args: argparse.Namespace) -> int:
    home = HubHome(Path(args.home))
    cfg = home.config()
    pki = pki_for(home, cfg.fleet)
    node_hosts = tuple(args.node_host or [args.public_host or (args.hostname or ["127.0.0.1"])[0]])
    layout = NatsLayout(folder=Path(args.out), nodes=args.nodes, hosts=node_hosts, bind=args.bind,
                        mqtt_port=args.port, client_port=args.client_port, cluster_port=args.cluster_port,
                        monitor_port=args.monitor_port)
    now = time.time()
    hosts = args.hostname or default_hostnames()
    files = write_nats_config(pki, layout, hostnames=hosts, now=now)
    # the hub's own certificate: NATS's listeners take certificates only
    issued = pki.issue_hub_client(now)
    atomic_write(home.pki_path / "hub.pem", issued.cert_pem, mode=0o644)
    atomic_write(home.pki_path / "hub.key", issued.key_pem, mode=0o600)
    mqtt_urls, nats_urls = ",".join(layout.urls("mqtt")), ",".join(layout.urls("nats"))
    if not args.no_hub_config:
        home.update_config(broker_url=mqtt_urls, device_broker_url=mqtt_urls, device_password_broker_url="",
                           broker_ca_file="pki/ca.pem", broker_username="", broker_password_file="",
                           broker_cert_file="pki/hub.pem", broker_key_file="pki/hub.key", jetstream_url=nats_urls)
    updated = "" if args.no_hub_config else f"  {home.config_path} updated: restart the hub\n"
    starts = "\n".join(f"              nats-server -c {files[f'node-{i + 1}.conf']}" for i in range(layout.nodes))
    emit(
        args,
        {"files": files, "kind": "nats", "nodes": layout.nodes, "device_broker_url": mqtt_urls,
         "jetstream_url": nats_urls},
        f"NATS cluster configuration ({layout.nodes} nodes) for fleet {cfg.fleet} in {layout.folder}\n"
        f"  start it:\n{starts}\n"
        f"  devices:    {mqtt_urls} (MQTT, client certificate, subject = user)\n"
        f"  hub:        publishes there with {home.pki_path / 'hub.pem'}; reads devices from JetStream on {nats_urls}\n"
        f"{updated}"
        "  enrol devices with: edgefleet-hub device add ID --out DIR (certificates only on NATS),\n"
        "  then reload every node: nats-server --signal reload=PID (users.conf changed)",
    )
    return 0


def cmd_https_config(args: argparse.Namespace) -> int:
    from edgefleet.hub.adapters.tls import issue_http_certificate

    home = HubHome(Path(args.home))
    res = issue_http_certificate(home, extra_hostnames=args.hostname, now=time.time(),
                                 update_config=not args.no_hub_config)
    updated = "" if args.no_hub_config else f"  {home.config_path} updated: restart the hub\n"
    emit(
        args,
        res,
        f"HTTPS certificate for the hub's blob server and admin API: {res['cert_file']}\n"
        f"  names:      {', '.join(map(str, res['hostnames']))}\n"
        f"  issued by:  the device CA {res['ca_file']} (devices pin it: ca_file in agent.toml)\n"
        f"  blob URLs:  {res['public_url'] or 'https://<listen address>'}\n"
        f"{updated}"
        "  devices enrolled before this need ca.pem and `ca_file = \"ca.pem\"` in agent.toml",
    )
    return 0


Cmd = Callable[..., argparse.ArgumentParser]


def add_security_commands(sub: Any, dev: Any, cmd: Cmd, client: Callable[[Any], None]) -> None:
    """Register the commands on the parsers :func:`hub.cli.main.build_parser` made."""
    sp = cmd("revoke", cmd_device_revoke, "revoke a device's certificates (CRL) and password", dev)
    client(sp)
    sp.add_argument("id")
    client(cmd("list", cmd_device_list, "enrolled devices and the state of their credentials", dev))

    sp = cmd(
        "broker-config",
        cmd_broker_config,
        "write a broker config (TLS, client certificates, CRL, passwords, ACL) for this fleet: "
        "Mosquitto, or a NATS cluster with --kind nats",
        sub,
    )
    sp.add_argument("--kind", choices=("mosquitto", "nats"), default="mosquitto",
                    help="the broker: one Mosquitto (default) or a NATS cluster with JetStream")
    sp.add_argument("--nodes", type=int, default=1, help="NATS: cluster nodes (3 survives one node's loss)")
    sp.add_argument("--node-host", action="append",
                    help="NATS: each node's host, in order (repeatable; one host for all: ports step by node)")
    sp.add_argument("--client-port", type=int, default=4222, help="NATS: client (JetStream) port (4222)")
    sp.add_argument("--cluster-port", type=int, default=6222, help="NATS: route port between nodes (6222)")
    sp.add_argument("--monitor-port", type=int, default=8222, help="NATS: monitoring port on 127.0.0.1 (8222)")
    sp.add_argument(
        "--out", required=True, help="folder for mosquitto.conf, acl, certs, CRL, passwd"
    )
    sp.add_argument(
        "--hostname",
        action="append",
        help="name or IP devices reach the broker by (repeatable; default: localhost, FQDN)",
    )
    sp.add_argument("--public-host", help="host in the broker URLs (default: the first --hostname)")
    sp.add_argument("--bind", default="0.0.0.0", help="listen address (default 0.0.0.0)")  # noqa: S104
    sp.add_argument("--port", type=int, default=8883, help="device listener (default 8883)")
    sp.add_argument("--password-port", type=int, default=8884, help="password-device listener (8884)")
    sp.add_argument("--hub-port", type=int, default=8885, help="the hub's own listener (8885)")
    sp.add_argument("--run-as", help="Mosquitto's `user` option (default: its own, 'mosquitto')")
    sp.add_argument("--no-persistence", action="store_true", help="no on-disk broker persistence")
    sp.add_argument("--no-hub-config", action="store_true", help="leave hub.toml as it is")
    sp.add_argument("--json", action="store_true", help="machine-readable output")

    sp = cmd(
        "https-config",
        cmd_https_config,
        "serve blobs and the admin API over HTTPS with a certificate from the device CA",
        sub,
    )
    sp.add_argument(
        "--hostname",
        action="append",
        help="another name or IP devices reach the hub by (repeatable; the public URL's host, "
        "localhost and 127.0.0.1 are always included)",
    )
    sp.add_argument("--no-hub-config", action="store_true", help="leave hub.toml as it is")
    sp.add_argument("--json", action="store_true", help="machine-readable output")
