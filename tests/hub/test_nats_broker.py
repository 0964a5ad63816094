"""Broker security on a NATS cluster: three real nats-server nodes started with what
`edgefleet-hub broker-config --kind nats --nodes 3` writes, the hub and two enrolled agents as
processes, the hub reading device channels from JetStream.

dev-a and dev.b (a dot: it becomes ``//`` in NATS subjects, and back) run agents on different
nodes and get a model over TLS; dev-x holds a certificate but runs no agent (it plays the
attacker with its own credentials); dev-r is enrolled and later revoked.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from edgefleet.agent.contract.wire import TelemetryWindow, Topics
from tests._nats import NatsCluster, free_port_block, nats_bin
from tests._securebroker import TlsClient
from tests.conftest import Procs, free_port, hub_up, run_cli, wait_for
from tests.hub.test_broker_security import _tiny_model

pytestmark = [pytest.mark.broker, pytest.mark.slow]
CLI = "edgefleet.hub.cli.main"


@dataclass
class Env:
    tmp: Path
    home: Path
    fleet: str
    cluster: NatsCluster
    procs: Procs
    bundles: dict[str, Path]

    @property
    def ca(self) -> str:
        return str(self.cluster.folder / "ca.pem")

    def status(self, dev: str) -> dict[str, Any]:
        st = json.loads(run_cli(CLI, "status", "--home", str(self.home), "--json").stdout)
        return dict(next(d for d in st["devices"] if d["device"] == dev))

    def cert(self, dev: str) -> tuple[str, str]:
        return str(self.bundles[dev] / "client.pem"), str(self.bundles[dev] / "client.key")

    def client(self, dev: str, node: int = 0) -> TlsClient:
        return TlsClient(self.ca, port=self.cluster.mqtt_port(node), cert=self.cert(dev))

    def enrol(self, dev: str, *extra: str) -> None:
        self.bundles[dev] = self.tmp / dev
        run_cli(CLI, "device", "add", dev, "--home", str(self.home), "--out", str(self.bundles[dev]),
                "--listen", f"127.0.0.1:{free_port()}", "--window", "1", *extra)


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    tmp = tmp_path_factory.mktemp("nats")
    fleet = f"nats{int(time.time() * 1000) % 10**9}"
    home, http_port = tmp / "hub", free_port()
    run_cli(CLI, "init", "--home", str(home), "--fleet", fleet, "--http", f"127.0.0.1:{http_port}")
    mqtt, client, cluster_port, monitor = free_port_block(3)
    run_cli(CLI, "broker-config", "--kind", "nats", "--nodes", "3", "--home", str(home), "--out", str(tmp / "nats"),
            "--hostname", "127.0.0.1", "--bind", "127.0.0.1", "--port", str(mqtt), "--client-port", str(client),
            "--cluster-port", str(cluster_port), "--monitor-port", str(monitor))
    cluster = NatsCluster(tmp / "nats")
    procs = Procs(tmp)
    e = Env(tmp, home, fleet, cluster, procs, {})
    try:
        cluster.start()
        procs.start("hub", CLI, "serve", "--home", str(home))
        wait_for(lambda: hub_up(http_port), 30, "hub HTTP")
        for dev in ("dev-a", "dev.b", "dev-x", "dev-r"):
            e.enrol(dev)
        cluster.reload()  # users.conf now admits them
        for dev in ("dev-a", "dev.b"):
            # each agent's list starts on a node of its own drawing; whatever it drew, it gets there
            procs.start(f"agent-{dev}", "edgefleet.agent.app.cli", "run", "--config",
                        str(e.bundles[dev] / "agent.toml"))
        _tiny_model(tmp / "double.onnx")
        run_cli(CLI, "publish", "--home", str(home), "--name", "clf", "--version", "1.0.0", str(tmp / "double.onnx"))
        run_cli(CLI, "deploy", "--home", str(home), "clf", "1.0.0", "--device", "dev-a", "--device", "dev.b")
        wait_for(lambda: all(e.status(d)["models"].get("clf") == "1.0.0" for d in ("dev-a", "dev.b")), 60,
                 "both agents to report clf 1.0.0 through the NATS cluster")
        yield e
    except BaseException:
        print(procs.logs())
        print(cluster.logs())
        raise
    finally:
        procs.stop_all()
        cluster.stop()


def test_generated_cluster_is_tls_only_with_certificate_users_and_a_large_enough_payload(env: Env) -> None:
    folder = env.cluster.folder
    for i in range(3):
        conf = (folder / f"node-{i + 1}.conf").read_text()
        assert conf.count("verify_and_map: true") == 2  # the MQTT listener and the NATS protocol
        assert "max_payload: 4259840" in conf and "jetstream" in conf and "verify: true" in conf  # routes: TLS
    users = (folder / "users.conf").read_text()
    assert "password" not in users  # certificates only
    assert f'"CN=dev.b,O=edgefleet {env.fleet}"' in users and "devices.dev//b.telemetry" in users
    cfg = (env.home / "hub.toml").read_text()
    assert "jetstream_url" in cfg and cfg.count("mqtts://127.0.0.1:") >= 6
    assert f"PathChanged={folder.resolve() / 'users.conf'}" in (folder / "nats-reload.path").read_text()


def test_agents_get_the_model_and_their_telemetry_reaches_the_hub_through_jetstream(env: Env) -> None:
    for dev in ("dev-a", "dev.b"):  # the dotted id maps to a subject and back exactly
        seq = (env.status(dev).get("last_telemetry") or {}).get("seq", 0)
        wait_for(lambda d=dev, s=seq: (env.status(d).get("last_telemetry") or {}).get("seq", 0) >= s + 2, 20,
                 f"two more windows from {dev} at the hub")
        assert env.status(dev)["status"] == "online"


def test_device_cannot_read_another_devices_desired_state_or_telemetry(env: Env) -> None:
    topics = Topics(env.fleet)
    p = env.client("dev-x", node=1)
    try:
        assert p.connect() == "connected"
        p.client.subscribe([(topics.desired("dev-a"), 0), (topics.device("dev.b", "telemetry"), 0),
                            (topics.keyring, 0)])
        wait_for(lambda: len(p.suback) == 3, 15, "the SUBACK")
        codes = [int(getattr(c, "value", c)) for c in p.suback]
        assert codes[0] == 0x80 and codes[1] == 0x80 and codes[2] == 0, codes  # NATS refuses in the SUBACK
        wait_for(lambda: any(t == topics.keyring for t, _ in p.received()), 10, "the retained keyring")
        time.sleep(2.5)  # dev.b publishes a window a second: none may arrive
        assert [t for t, _ in p.received()] == [topics.keyring]
    finally:
        p.close()


def test_device_cannot_publish_as_another_device(env: Env) -> None:
    topics = Topics(env.fleet)
    forged_seq = 900_000
    now = time.time()
    forged = TelemetryWindow(fleet=env.fleet, device="dev-a", seq=forged_seq, window_start=now - 1, window_end=now,
                             models={})
    own = TelemetryWindow(fleet=env.fleet, device="dev-x", seq=1, window_start=now - 1, window_end=now, models={})
    p = env.client("dev-x", node=2)
    try:
        assert p.connect() == "connected"
        p.client.publish(topics.device("dev-a", "telemetry"), forged.to_json(), qos=1).wait_for_publish(10)
        p.client.publish(topics.device("dev-x", "telemetry"), own.to_json(), qos=1).wait_for_publish(10)
        # its own window arrives: the forged one, published first on the same connection, would have too
        wait_for(lambda: (env.status("dev-x").get("last_telemetry") or {}).get("seq") == 1, 20,
                 "dev-x's own window at the hub")
        assert (env.status("dev-a").get("last_telemetry") or {}).get("seq", 0) < forged_seq
    finally:
        p.close()


def test_password_enrolment_is_refused_on_nats(env: Env) -> None:
    r = run_cli(CLI, "device", "add", "dev-p", "--home", str(env.home), "--out", str(env.tmp / "dev-p"),
                "--credentials", "password", check=False)
    assert r.returncode != 0 and "NATS cluster, which takes client certificates only" in r.stderr + r.stdout


def test_revoked_device_is_cut_off_at_the_reload(env: Env) -> None:
    p = env.client("dev-r")
    try:
        assert p.connect() == "connected"
        run_cli(CLI, "device", "revoke", "dev-r", "--home", str(env.home))
        assert '"CN=dev-r,' not in (env.cluster.folder / "users.conf").read_text()
        # what systemd runs when users.conf changes (nats-reload.path): the generated command itself
        unit = (env.cluster.folder / "nats-reload.service").read_text()
        command = next(x for x in unit.splitlines() if x.startswith("ExecStart="))[len("ExecStart="):]
        subprocess.run(shlex.split(command), check=True, timeout=30,
                       env={**os.environ, "PATH": f"{Path(nats_bin()).parent}:{os.environ['PATH']}"})
        wait_for(lambda: not p.client.is_connected(), 10, "the revoked device's connection cut")
    finally:
        p.close()
    again = env.client("dev-r", node=1)
    try:
        assert again.connect() != "connected"
    finally:
        again.close()


def test_a_message_above_natss_default_1_mib_passes(env: Env) -> None:
    """NATS's default max_payload (1 MiB) would disconnect a device sending a bigger telemetry
    window; the generated cluster takes up to the contract's 4 MiB."""
    topics = Topics(env.fleet)
    p = env.client("dev-x", node=0)
    try:
        assert p.connect() == "connected"
        info = p.client.publish(topics.device("dev-x", "events"), b"x" * (3 << 20), qos=1)
        info.wait_for_publish(20)
        assert info.is_published() and p.client.is_connected()
    finally:
        p.close()
