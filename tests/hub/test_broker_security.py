"""Broker security end to end: a real Mosquitto started with the configuration that
`edgefleet-hub broker-config` writes, the hub and enrolled agents as processes.

One fleet per module: dev-a (client certificate, Jetson profile on a CPU-only machine) and dev-b
(password) run agents and get a model; dev-x holds a certificate and a password but runs no agent
(it plays the attacker); dev-r is enrolled and later revoked. The systemd notify test restarts
dev-a, so it comes last.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from edgefleet.agent.contract.wire import Event, Status, TelemetryWindow, Topics
from edgefleet.hub.adapters.pki import DevicePki
from tests._securebroker import TlsClient
from tests.conftest import Procs, free_port, hub_up, mosquitto_bin, run_cli, wait_for, wait_port

pytestmark = [pytest.mark.broker, pytest.mark.slow]


@dataclass
class Secure:
    tmp: Path
    home: Path
    fleet: str
    broker_dir: Path
    device_port: int
    password_port: int
    hub_port: int
    mosquitto: subprocess.Popen[bytes]
    procs: Procs
    bundles: dict[str, Path]
    agent_ports: dict[str, int]
    hub_notes: list[str] = field(default_factory=list)

    @property
    def ca(self) -> str:
        return str(self.broker_dir / "ca.pem")

    def status(self, dev: str) -> dict[str, Any]:
        st = json.loads(run_cli("edgefleet.hub.cli.main", "status", "--home", str(self.home), "--json").stdout)
        return dict(next(d for d in st["devices"] if d["device"] == dev))

    def events(self, dev: str) -> list[dict[str, Any]]:
        out = run_cli(
            "edgefleet.hub.cli.main", "events", "--home", str(self.home), "--device", dev, "--json"
        ).stdout
        return list(json.loads(out)["events"])

    def cert(self, dev: str) -> tuple[str, str]:
        return str(self.bundles[dev] / "client.pem"), str(self.bundles[dev] / "client.key")

    def password(self, dev: str) -> str:
        return (self.bundles[dev] / "mqtt.password").read_text().strip()


def probe(env: Secure, *, ca: str | None = None, **kw: Any) -> TlsClient:
    """A TLS client for one attempt on the generated broker: connect, then optionally subscribe / publish."""
    return TlsClient(ca or env.ca, **kw)


def attempt(env: Secure, **kw: Any) -> str:
    p = probe(env, **kw)
    try:
        return p.connect()
    finally:
        p.close()


def _tiny_model(path: Path, factor: float = 2.0) -> None:
    w = helper.make_tensor("w", TensorProto.FLOAT, [1, 3], [factor] * 3)
    graph = helper.make_graph(
        [helper.make_node("Mul", ["input", "w"], ["y"])],
        "double",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [None, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 3])],
        [w],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, path)


def _notify_socket() -> tuple[socket.socket, str]:
    folder = tempfile.mkdtemp(prefix="efn", dir="/tmp")  # AF_UNIX paths must stay short
    path = os.path.join(folder, "n.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    return sock, path


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Secure]:
    binary = mosquitto_bin()
    assert binary, "mosquitto is not installed (apt-get install -y mosquitto)"  # like every broker test
    tmp = tmp_path_factory.mktemp("secure")
    fleet = f"sec{int(time.time() * 1000) % 10**9}"
    home = tmp / "hub"
    http_port, device_port, password_port, hub_port = free_port(), free_port(), free_port(), free_port()
    run_cli(
        "edgefleet.hub.cli.main", "init", "--home", str(home), "--fleet", fleet, "--http", f"127.0.0.1:{http_port}"
    )
    broker_dir = tmp / "broker"
    run_cli(
        "edgefleet.hub.cli.main",
        "broker-config",
        "--home",
        str(home),
        "--out",
        str(broker_dir),
        "--hostname",
        "127.0.0.1",
        "--hostname",
        "localhost",
        "--bind",
        "127.0.0.1",
        "--port",
        str(device_port),
        "--password-port",
        str(password_port),
        "--hub-port",
        str(hub_port),
        "--run-as",
        os.environ.get("USER", "root") if os.geteuid() == 0 else "",
        "--no-persistence",
    )
    log = (tmp / "mosquitto.log").open("wb")
    mosq = subprocess.Popen(
        [binary, "-c", str(broker_dir / "mosquitto.conf")], stdout=log, stderr=subprocess.STDOUT
    )
    procs = Procs(tmp)
    hub_sock, hub_sock_path = _notify_socket()
    hub_sock.settimeout(30)
    bundles: dict[str, Path] = {}
    agent_ports: dict[str, int] = {}
    s = Secure(
        tmp, home, fleet, broker_dir, device_port, password_port, hub_port, mosq, procs, bundles,
        agent_ports,
    )
    try:
        wait_port(device_port)
        wait_port(password_port)
        wait_port(hub_port)
        procs.start(
            "hub", "edgefleet.hub.cli.main", "serve", "--home", str(home), env={"NOTIFY_SOCKET": hub_sock_path}
        )
        s.hub_notes.append(hub_sock.recv(4096).decode())  # READY=1 once it serves
        wait_for(lambda: hub_up(http_port), 20, "hub HTTP")
        enrol = {
            "dev-a": ["--profile", "jetson-orin-nano"],  # credentials: auto = certificate
            "dev-b": ["--credentials", "password"],
            "dev-x": ["--credentials", "both"],
            "dev-r": ["--credentials", "both"],
        }
        for dev, extra in enrol.items():
            agent_ports[dev] = free_port()
            bundles[dev] = tmp / dev
            run_cli(
                "edgefleet.hub.cli.main",
                "device",
                "add",
                dev,
                "--home",
                str(home),
                "--out",
                str(bundles[dev]),
                "--listen",
                f"127.0.0.1:{agent_ports[dev]}",
                "--window",
                "1",
                *extra,
            )
        mosq.send_signal(signal.SIGHUP)  # new passwords: the broker rereads its password file
        for dev in ("dev-a", "dev-b"):
            procs.start(
                f"agent-{dev}", "edgefleet.agent.app.cli", "run", "--config", str(bundles[dev] / "agent.toml")
            )
        _tiny_model(tmp / "double.onnx")
        run_cli(
            "edgefleet.hub.cli.main",
            "publish",
            "--home",
            str(home),
            "--name",
            "clf",
            "--version",
            "1.0.0",
            str(tmp / "double.onnx"),
        )
        run_cli(
            "edgefleet.hub.cli.main",
            "deploy",
            "--home",
            str(home),
            "clf",
            "1.0.0",
            "--device",
            "dev-a",
            "--device",
            "dev-b",
        )
        wait_for(
            lambda: all(s.status(d)["models"].get("clf") == "1.0.0" for d in ("dev-a", "dev-b")),
            40,
            "both agents to report clf 1.0.0 over TLS",
        )
        yield s
    except BaseException:
        print(procs.logs())
        print((tmp / "mosquitto.log").read_text(errors="replace")[-4000:])
        raise
    finally:
        procs.stop_all()
        mosq.terminate()
        mosq.wait(10)
        hub_sock.close()
        os.unlink(hub_sock_path)


def infer(port: int) -> dict[str, Any]:
    body = {
        "inputs": [{"name": "input", "shape": [1, 3], "datatype": "FP32", "data": [1.0, 2.0, 3.0]}]
    }
    r = httpx.post(f"http://127.0.0.1:{port}/v2/models/clf/infer", json=body, timeout=10)
    assert r.status_code == 200, r.text
    return dict(r.json())


def test_generated_config_is_tls_only_with_client_certificates_crl_and_no_anonymous(
    env: Secure,
) -> None:
    conf = (env.broker_dir / "mosquitto.conf").read_text()
    for line in (
        "allow_anonymous false",
        "require_certificate true",
        "use_identity_as_username true",
        f"crlfile {env.broker_dir.resolve() / 'crl.pem'}",
        "max_queued_messages 1000000",
    ):
        assert line in conf
    assert "listener" in conf and "certfile" in conf


def test_enrolled_agents_connect_over_tls_and_update(env: Secure) -> None:
    a = (env.bundles["dev-a"] / "agent.toml").read_text()
    assert "mqtts://" in a and 'cert_file = "client.pem"' in a and "password" not in a
    assert (env.bundles["dev-a"] / "client.key").stat().st_mode & 0o077 == 0
    b = (env.bundles["dev-b"] / "agent.toml").read_text()
    assert 'password_file = "mqtt.password"' in b and "cert_file" not in b
    assert f":{env.password_port}" in b and f":{env.device_port}" in a
    for dev in ("dev-a", "dev-b"):
        assert env.status(dev)["status"] == "online"
        res = infer(env.agent_ports[dev])
        assert res["model_version"] == "1.0.0"
        assert res["outputs"][0]["data"] == [2.0, 4.0, 6.0]
    assert env.hub_notes and env.hub_notes[0].startswith("READY=1\nSTATUS=fleet ")


def test_missing_execution_provider_falls_back_with_an_event(env: Secure) -> None:
    if "TensorrtExecutionProvider" in ort.get_available_providers():
        pytest.skip("this ONNX Runtime has TensorRT: nothing to fall back from")
    events = wait_for(
        lambda: [e for e in env.events("dev-a") if e["type"] == "provider_fallback"],
        15,
        "a provider_fallback event from dev-a (Jetson profile, no GPU here)",
    )
    assert "TensorrtExecutionProvider" in events[0]["message"]  # type: ignore[index]
    assert (
        infer(env.agent_ports["dev-a"])["model_version"] == "1.0.0"
    )  # served on the next provider


def test_device_cannot_subscribe_to_another_devices_desired_state(env: Secure) -> None:
    topics = Topics(env.fleet)
    for kw in (
        {"port": env.device_port, "cert": env.cert("dev-x")},
        {"port": env.password_port, "user": "dev-x", "password": env.password("dev-x")},
    ):
        p = probe(env, **kw)
        try:
            assert p.connect() == "connected"
            p.client.subscribe(
                [
                    (topics.desired("dev-a"), 1),
                    (topics.device("dev-b", "telemetry"), 1),
                    (topics.keyring, 1),
                ]
            )
            # The keyring is retained and readable by every device: it arriving proves the
            # subscription round trip is done, so a missing desired state is a real refusal.
            wait_for(
                lambda got=p.messages: any(t == topics.keyring for t, _ in got),
                10,
                "the retained keyring",
            )
            # Mosquitto 2.0 grants the SUBACK and applies read ACLs per message; what counts is
            # that nothing arrives. dev-b keeps publishing telemetry: wait until the hub has seen
            # two more windows, which the probe would have got too.
            seen = env.status("dev-b")["last_telemetry"]["seq"]
            wait_for(
                lambda s=seen: env.status("dev-b")["last_telemetry"]["seq"] >= s + 2,
                15,
                "two more telemetry windows from dev-b at the hub",
            )
            assert [t for t, _ in p.messages] == [topics.keyring]
        finally:
            p.close()


def test_device_cannot_publish_to_another_devices_telemetry(env: Secure) -> None:
    topics = Topics(env.fleet)
    forged_seq = 900_000
    forged = TelemetryWindow(
        fleet=env.fleet,
        device="dev-b",
        seq=forged_seq,
        window_start=time.time() - 1,
        window_end=time.time(),
        models={},
        system={},
        metrics={"requests": 1},
    ).to_json()
    for n, kw in enumerate(
        (
            {"port": env.device_port, "cert": env.cert("dev-x")},
            {"port": env.password_port, "user": "dev-x", "password": env.password("dev-x")},
        )
    ):
        p = probe(env, **kw)
        try:
            assert p.connect() == "connected"
            p.client.publish(topics.device("dev-b", "telemetry"), forged, qos=1).wait_for_publish(5)
            offline = Status(fleet=env.fleet, device="dev-b", state="offline").to_json()
            p.client.publish(topics.device("dev-b", "status"), offline, qos=1, retain=True)
            # A message dev-x may send, published after the forgery: once the hub has it, it
            # would have had the forgery too (one publisher, one subscriber: order is kept).
            marker = f"marker-{n}-{time.time()}"
            ev = Event(
                fleet=env.fleet, device="dev-x", time=time.time(), type="note", message=marker
            ).to_json()
            p.client.publish(topics.device("dev-x", "events"), ev, qos=1).wait_for_publish(5)
        finally:
            p.close()
        wait_for(
            lambda m=marker: any(e["message"] == m for e in env.events("dev-x")),
            15,
            "the hub to receive dev-x's own event",
        )
    b = env.status("dev-b")
    assert b["last_telemetry"]["seq"] < forged_seq
    assert b["status"] == "online"


def test_anonymous_and_wrong_password_clients_are_refused(env: Secure) -> None:
    assert attempt(env, port=env.password_port).startswith("refused")
    assert attempt(env, port=env.password_port, user="dev-x", password="not-it").startswith(
        "refused"
    )
    assert attempt(env, port=env.password_port, user="dev-a", password="").startswith("refused")
    assert attempt(env, port=env.device_port) != "connected"  # no client certificate at all
    assert (
        attempt(env, port=env.device_port, user="dev-x", password=env.password("dev-x"))
        != "connected"
    )
    assert (
        attempt(env, port=env.password_port, user="dev-x", password=env.password("dev-x"))
        == "connected"
    )


def test_the_hub_listener_takes_the_hub_user_alone_and_leaves_it_its_client_ids(
    env: Secure,
) -> None:
    """Hub replicas and ingest links are several connections of one user: on the hub listener
    each keeps its own client id (and persistent session). With the client id forced to the
    username, as on the device listeners, they would knock each other off in turn."""
    user = f"hub@{env.fleet}"
    hub_pw = (env.home / "pki" / "hub.password").read_text().strip()
    dev_pw = env.password("dev-x")
    assert attempt(env, port=env.hub_port, user="dev-x", password=dev_pw).startswith("refused")
    assert attempt(env, port=env.hub_port).startswith("refused")  # anonymous
    assert attempt(env, port=env.password_port, user=user, password=hub_pw).startswith("refused")
    topics = Topics(env.fleet)
    shared = f"$share/probe/{topics.all_devices('events')}"
    replicas = [
        probe(env, port=env.hub_port, user=user, password=hub_pw, client_id=f"{user}-p{i}")
        for i in range(2)
    ]
    dev = probe(env, port=env.password_port, user="dev-x", password=dev_pw)
    try:
        for r in replicas:
            assert r.connect() == "connected"
            r.client.subscribe(shared, 1)
        wait_for(lambda: all(r.suback == [1] or r.suback[0:1] == [1] for r in replicas), 10, "SUBACKs")
        assert dev.connect() == "connected"
        sent = [
            Event(fleet=env.fleet, device="dev-x", time=time.time(), type="note", message=f"share-{i}")
            for i in range(20)
        ]
        for ev in sent:
            dev.client.publish(topics.device("dev-x", "events"), ev.to_json(), qos=1).wait_for_publish(5)
        wait_for(lambda: sum(len(r.messages) for r in replicas) >= len(sent), 15, "the shared messages")
        time.sleep(1.0)  # a forced client id would have dropped one of them by now
        assert [r.disconnects for r in replicas] == [0, 0]
        assert all(r.messages for r in replicas), "a shared subscription splits the messages"
        assert sum(len(r.messages) for r in replicas) == len(sent)
    finally:
        for p in (*replicas, dev):
            p.close()


def test_certificate_from_another_ca_is_refused(env: Secure) -> None:
    other = DevicePki(env.tmp / "rogue-ca", env.fleet)
    other.ensure_ca(time.time())
    issued = other.issue_client("dev-x", time.time())
    (env.tmp / "rogue.pem").write_bytes(issued.cert_pem)
    (env.tmp / "rogue.key").write_bytes(issued.key_pem)
    rogue = (str(env.tmp / "rogue.pem"), str(env.tmp / "rogue.key"))
    assert attempt(env, port=env.device_port, cert=rogue) != "connected"
    assert attempt(env, port=env.device_port, cert=env.cert("dev-x")) == "connected"


def test_expired_certificate_from_the_device_ca_is_refused(env: Secure) -> None:
    pki = DevicePki(env.home / "pki", env.fleet)
    long_ago = time.time() - 10 * 86400
    issued = pki.issue_client("dev-old", long_ago, days=1)
    (env.tmp / "old.pem").write_bytes(issued.cert_pem)
    (env.tmp / "old.key").write_bytes(issued.key_pem)
    old = (str(env.tmp / "old.pem"), str(env.tmp / "old.key"))
    assert attempt(env, port=env.device_port, cert=old) != "connected"
    fresh = pki.issue_client("dev-old", time.time())
    (env.tmp / "fresh.pem").write_bytes(fresh.cert_pem)
    (env.tmp / "fresh.key").write_bytes(fresh.key_pem)
    fresh_pair = (str(env.tmp / "fresh.pem"), str(env.tmp / "fresh.key"))
    assert attempt(env, port=env.device_port, cert=fresh_pair) == "connected"


def test_revoked_device_is_refused(env: Secure) -> None:
    cert_kw = {"port": env.device_port, "cert": env.cert("dev-r")}
    pw_kw = {"port": env.password_port, "user": "dev-r", "password": env.password("dev-r")}
    assert attempt(env, **cert_kw) == "connected"
    assert attempt(env, **pw_kw) == "connected"

    out = run_cli("edgefleet.hub.cli.main", "device", "revoke", "dev-r", "--home", str(env.home)).stdout
    assert "1 certificate(s) on the CRL" in out and "password removed" in out
    env.mosquitto.send_signal(signal.SIGHUP)  # what `systemctl reload mosquitto` does

    wait_for(
        lambda: attempt(env, **cert_kw) != "connected", 10, "the revoked certificate to be refused"
    )
    wait_for(
        lambda: attempt(env, **pw_kw).startswith("refused"),
        10,
        "the revoked password to be refused",
    )
    assert (
        attempt(env, port=env.device_port, cert=env.cert("dev-x")) == "connected"
    )  # others unaffected
    listed = json.loads(
        run_cli("edgefleet.hub.cli.main", "device", "list", "--home", str(env.home), "--json").stdout
    )
    by_id = {d["device"]: d for d in listed["devices"]}
    assert by_id["dev-r"]["revoked"] and not by_id["dev-x"]["revoked"]
    assert by_id["dev-a"]["cert_not_after"] and by_id["dev-b"]["password"]
    text = run_cli("edgefleet.hub.cli.main", "device", "list", "--home", str(env.home)).stdout
    rows = {line.split()[0]: line for line in text.splitlines()[1:]}
    assert "REVOKED" in rows["dev-r"] and "cert+password" in rows["dev-x"]


def test_device_ids_with_mqtt_wildcards_are_refused_at_enrolment(env: Secure) -> None:
    for bad in ("a+b", "a#", "a/b"):
        res = run_cli(
            "edgefleet.hub.cli.main",
            "device",
            "add",
            bad,
            "--home",
            str(env.home),
            "--out",
            str(env.tmp / "bad"),
            check=False,
        )
        assert res.returncode == 2 and "device id" in res.stderr
    assert not (env.tmp / "bad").exists()


def test_agent_notifies_systemd_ready_watchdog_and_stopping(env: Secure) -> None:
    """Restart dev-a under a test NOTIFY_SOCKET: READY only once its model serves, WATCHDOG
    repeated at the pace WATCHDOG_USEC asks, STATUS after an update, STOPPING on SIGTERM."""
    old = next(p for p, log in env.procs.procs if "agent-dev-a" in log.name)
    old.send_signal(signal.SIGTERM)
    assert old.wait(15) == 0
    sock, path = _notify_socket()
    sock.settimeout(30)
    port = env.agent_ports["dev-a"]
    try:
        proc = env.procs.start(
            "agent-dev-a-notify",
            "edgefleet.agent.app.cli",
            "run",
            "--config",
            str(env.bundles["dev-a"] / "agent.toml"),
            env={"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "400000"},
        )
        first = sock.recv(4096).decode()
        assert first.startswith("READY=1\nSTATUS=")
        assert "clf 1.0.0" in first
        # At READY the installed model already answers.
        assert (
            httpx.get(f"http://127.0.0.1:{port}/v2/models/clf/ready", timeout=5).status_code == 200
        )
        got: list[str] = []
        while got.count("WATCHDOG=1") < 3:
            got.append(sock.recv(4096).decode())
        # An update changes what it runs: STATUS= says so.
        _tiny_model(env.tmp / "triple.onnx", 3.0)
        run_cli(
            "edgefleet.hub.cli.main",
            "publish",
            "--home",
            str(env.home),
            "--name",
            "clf",
            "--version",
            "1.1.0",
            str(env.tmp / "triple.onnx"),
        )
        run_cli("edgefleet.hub.cli.main", "deploy", "--home", str(env.home), "clf", "1.1.0", "--device", "dev-a")
        while "STATUS=clf 1.1.0" not in got:
            got.append(sock.recv(4096).decode())
        assert infer(port)["model_version"] == "1.1.0"
        proc.send_signal(signal.SIGTERM)
        while "STOPPING=1" not in got:
            got.append(sock.recv(4096).decode())
        assert proc.wait(15) == 0
    finally:
        sock.close()
        os.unlink(path)
    assert got[-1] == "STOPPING=1"
