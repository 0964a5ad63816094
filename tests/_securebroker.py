"""The broker configuration operators are given, started for a test: `edgefleet-hub
broker-config` writes mosquitto.conf, the ACL, TLS certificates and password files into a folder,
and a real Mosquitto runs on them on free 127.0.0.1 ports (as in tests/hub/test_broker_security.py).

Also a small TLS MQTT client (:class:`TlsClient`) that connects with a device certificate or a
username and password, as a device or the hub would.
"""

from __future__ import annotations

import os
import ssl
import subprocess
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt

from tests.conftest import free_port, mosquitto_bin, run_cli, wait_port

__all__ = ["GeneratedBroker", "TlsClient", "start_generated_broker"]


@dataclass
class GeneratedBroker:
    home: Path
    fleet: str
    folder: Path
    device_port: int
    password_port: int
    hub_port: int
    proc: subprocess.Popen[bytes]
    log: Path

    @property
    def ca(self) -> str:
        return str(self.folder / "ca.pem")

    @property
    def hub_user(self) -> str:
        return f"hub@{self.fleet}"

    @property
    def hub_password(self) -> str:
        return (self.home / "pki" / "hub.password").read_text().strip()

    def logs(self) -> str:
        return self.log.read_text(errors="replace")[-4000:]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)


def start_generated_broker(home: Path, fleet: str, tmp: Path) -> GeneratedBroker:
    """Run `broker-config` for the hub home ``home`` of ``fleet`` (it points hub.toml at the new
    broker) and start Mosquitto on what it wrote."""
    binary = mosquitto_bin()
    assert binary, "mosquitto is not installed (apt-get install -y mosquitto)"
    folder = tmp / "broker"
    device_port, password_port, hub_port = free_port(), free_port(), free_port()
    run_cli(
        "edgefleet.hub.cli.main", "broker-config", "--home", str(home), "--out", str(folder),
        "--hostname", "127.0.0.1", "--hostname", "localhost", "--bind", "127.0.0.1",
        "--port", str(device_port), "--password-port", str(password_port), "--hub-port", str(hub_port),
        "--run-as", os.environ.get("USER", "root") if os.geteuid() == 0 else "", "--no-persistence",
    )
    log = tmp / "mosquitto.log"
    proc = subprocess.Popen([binary, "-c", str(folder / "mosquitto.conf")], stdout=log.open("wb"),
                            stderr=subprocess.STDOUT)
    broker = GeneratedBroker(home, fleet, folder, device_port, password_port, hub_port, proc, log)
    try:
        for port in (device_port, password_port, hub_port):
            wait_port(port)
    except BaseException:
        broker.stop()
        print(broker.logs())
        raise
    return broker


class TlsClient:
    """One MQTT 3.1.1 connection over TLS to a broker (``ca``: the CA file it is checked against),
    with a device certificate or a username and password; collects what it receives.

    ``connect`` returns ``"connected"``, ``"refused: <reason>"``, ``"dropped: <reason>"`` (the
    broker closed before CONNACK), ``"tls/socket error: ..."`` or ``"no answer"``."""

    def __init__(self, ca: str, *, port: int, cert: tuple[str, str] | None = None,
                 user: str | None = None, password: str | None = None, client_id: str | None = None) -> None:
        self.connected = threading.Event()
        self.disconnected = threading.Event()
        self.disconnects = 0
        self.result = "no answer"
        self.suback: list[Any] = []
        self.messages: list[tuple[str, bytes]] = []
        self._lock = threading.Lock()
        c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id or f"probe-{os.getpid()}",
                        protocol=mqtt.MQTTv311)
        c.tls_set(ca_certs=ca, certfile=cert[0] if cert else None, keyfile=cert[1] if cert else None,
                  tls_version=ssl.PROTOCOL_TLS_CLIENT)
        if user:
            c.username_pw_set(user, password)
        c.on_connect = self._on_connect
        c.on_disconnect = self._on_disconnect
        c.on_subscribe = lambda cl, u, mid, codes, props: self.suback.extend(codes)
        c.on_message = self._on_message
        self.client = c
        self.port = port

    def _on_connect(self, client: mqtt.Client, u: object, f: object, rc: Any, p: object) -> None:
        self.result = "connected" if not rc.is_failure else f"refused: {rc}"
        self.connected.set()

    def _on_disconnect(self, client: mqtt.Client, u: object, f: object, rc: Any, p: object) -> None:
        self.disconnects += 1
        if not self.connected.is_set():
            self.result = f"dropped: {rc}"
            self.connected.set()
        self.disconnected.set()

    def _on_message(self, client: mqtt.Client, u: object, m: mqtt.MQTTMessage) -> None:
        with self._lock:
            self.messages.append((m.topic, m.payload))

    def received(self) -> list[tuple[str, bytes]]:
        with self._lock:
            return list(self.messages)

    def connect(self, timeout: float = 10.0) -> str:
        try:
            self.client.connect("127.0.0.1", self.port, keepalive=20)
        except (OSError, ssl.SSLError) as exc:
            return f"tls/socket error: {exc}"
        self.client.loop_start()
        self.connected.wait(timeout)
        return self.result

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()
