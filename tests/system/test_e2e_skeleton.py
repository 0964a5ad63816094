"""End to end on real parts: Mosquitto, hub and agents as processes, ONNX Runtime, HTTP, files.

One fleet is set up per module (hub + two agents, a model trained here, published and deployed);
the tests then check serving, telemetry, refusals and restart against it, in file order. The
restart test stops the broker, so it comes last.
"""

from __future__ import annotations

import json
import pickle
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import paho.mqtt.client as mqtt
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from sklearn.datasets import make_classification
from sklearn.linear_model import LogisticRegression

from edgefleet.agent.contract.envelope import open_envelope, sign_envelope
from edgefleet.agent.contract.wire import Topics, parse_json_object
from tests.conftest import Broker, Procs, free_port, hub_up, retained, run_cli, wait_for

pytestmark = [pytest.mark.broker, pytest.mark.slow]


@dataclass
class Fleet:
    home: Path
    fleet: str
    broker: Broker
    procs: Procs
    agents: dict[str, dict[str, Any]]  # device -> {"port", "config", "proc"}
    X: np.ndarray
    expected: np.ndarray
    sent: dict[str, int]

    def status(self) -> dict[str, Any]:
        return json.loads(run_cli("edgefleet.hub.cli.main", "status", "--home", str(self.home), "--json").stdout)

    def device(self, dev: str) -> dict[str, Any]:
        return next(d for d in self.status()["devices"] if d["device"] == dev)

    def infer(self, dev: str, rows: np.ndarray) -> dict[str, Any]:
        body = {"inputs": [{"name": "input", "shape": list(rows.shape), "datatype": "FP32",
                            "data": rows.reshape(-1).tolist()}]}
        r = httpx.post(f"http://127.0.0.1:{self.agents[dev]['port']}/v2/models/clf/infer", json=body, timeout=10)
        assert r.status_code == 200, r.text
        self.sent[dev] = self.sent.get(dev, 0) + 1
        return dict(r.json())

    def events(self, dev: str) -> list[dict[str, Any]]:
        out = run_cli("edgefleet.hub.cli.main", "events", "--home", str(self.home), "--device", dev, "--json").stdout
        return list(json.loads(out)["events"])

    def start_agent(self, dev: str) -> subprocess.Popen[bytes]:
        p = self.procs.start(f"agent-{dev}", "edgefleet.agent.app.cli", "run", "--config", str(self.agents[dev]["config"]))
        self.agents[dev]["proc"] = p
        return p


def publish_raw(broker: Broker, topic: str, payload: bytes, retain: bool = False) -> None:
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv311)
    c.connect("127.0.0.1", broker.port)
    c.loop_start()
    c.publish(topic, payload, qos=1, retain=retain).wait_for_publish(5)
    c.disconnect()
    c.loop_stop()


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    tmp = tmp_path_factory.mktemp("e2e")
    broker = Broker(tmp)
    broker.start()
    procs = Procs(tmp)
    fleet = f"e2e{int(time.time() * 1000) % 10**9}"
    home = tmp / "hub"
    http_port = free_port()
    run_cli("edgefleet.hub.cli.main", "init", "--home", str(home), "--fleet", fleet, "--broker", broker.url,
            "--http", f"127.0.0.1:{http_port}")
    procs.start("hub", "edgefleet.hub.cli.main", "serve", "--home", str(home))
    wait_for(lambda: hub_up(http_port), 20, "hub HTTP")

    agents: dict[str, dict[str, Any]] = {}
    for dev in ("dev-a", "dev-b"):
        port = free_port()
        out = tmp / dev
        run_cli("edgefleet.hub.cli.main", "device", "add", dev, "--home", str(home), "--out", str(out),
                "--listen", f"127.0.0.1:{port}", "--window", "1")
        agents[dev] = {"port": port, "config": out / "agent.toml"}

    X, y = make_classification(n_samples=400, n_features=6, n_informative=4, random_state=7)
    X = X.astype(np.float32)
    clf = LogisticRegression(max_iter=500).fit(X, y)
    (tmp / "model.pkl").write_bytes(pickle.dumps(clf))
    np.save(tmp / "train.npy", X)

    f = Fleet(home=home, fleet=fleet, broker=broker, procs=procs, agents=agents, X=X,
              expected=clf.predict(X), sent={})
    for dev in agents:
        f.start_agent(dev)
    try:
        run_cli("edgefleet.hub.cli.main", "publish", "--home", str(home), "--name", "clf", "--version", "1.0.0",
                str(tmp / "model.pkl"), "--reference", str(tmp / "train.npy"), "--source", "test")
        run_cli("edgefleet.hub.cli.main", "deploy", "--home", str(home), "clf", "1.0.0", "--device", "dev-a",
                "--device", "dev-b")
        wait_for(lambda: all(f.device(d)["models"].get("clf") == "1.0.0" for d in agents), 30,
                 "both agents to report clf 1.0.0 active")
        yield f
    except BaseException:
        print(procs.logs())
        raise
    finally:
        procs.stop_all()
        broker.stop()


def test_both_agents_serve_exactly_sklearns_predictions(env: Fleet) -> None:
    for dev in env.agents:
        res = env.infer(dev, env.X[:50])
        assert res["model_name"] == "clf"
        assert res["model_version"] == "1.0.0"
        label = next(o for o in res["outputs"] if o["name"] == "label")
        assert label["data"] == env.expected[:50].tolist()
        meta = httpx.get(f"http://127.0.0.1:{env.agents[dev]['port']}/v2/models/clf").json()
        assert meta["versions"] == ["1.0.0"]
        assert httpx.get(f"http://127.0.0.1:{env.agents[dev]['port']}/v2/health/ready").status_code == 200


def test_status_shows_version_and_telemetry_request_count(env: Fleet) -> None:
    for _ in range(7):
        env.infer("dev-b", env.X[:3])

    def counted() -> bool:
        d = env.device("dev-b")
        total = sum(t["requests"] for t in d["telemetry_totals"] if t["version"] == "1.0.0")
        return d["status"] == "online" and total == env.sent["dev-b"]

    wait_for(counted, 15, "dev-b's telemetry to count every request sent")
    d = env.device("dev-b")
    assert d["models"] == {"clf": "1.0.0"}
    assert d["last_telemetry"]["metrics"]["rss_mb"] > 0


def test_state_signed_by_unknown_key_is_refused_and_model_keeps_serving(env: Fleet) -> None:
    topics = Topics(env.fleet)
    genuine = open_envelope(retained(env.broker, topics.desired("dev-a")))
    payload = parse_json_object(genuine.payload)
    payload["seq"] += 100
    forged = sign_envelope(payload, [Ed25519PrivateKey.generate()])
    publish_raw(env.broker, topics.desired("dev-a"), forged)
    wait_for(lambda: any(e["reason"] == "unknown_key" for e in env.events("dev-a")), 15,
             "an unknown_key refusal event from dev-a")
    assert env.infer("dev-a", env.X[:5])["model_version"] == "1.0.0"


def test_replayed_older_seq_is_refused_and_model_keeps_serving(env: Fleet) -> None:
    topics = Topics(env.fleet)
    old = retained(env.broker, topics.desired("dev-b"))
    old_seq = parse_json_object(open_envelope(old).payload)["seq"]
    run_cli("edgefleet.hub.cli.main", "deploy", "--home", str(env.home), "clf", "1.0.0", "--device", "dev-b")
    wait_for(lambda: env.device("dev-b")["reported_seq"] == old_seq + 1, 15, "dev-b to apply the new seq")
    publish_raw(env.broker, topics.desired("dev-b"), old)
    wait_for(lambda: any(e["reason"] == "stale_seq" for e in env.events("dev-b")), 15,
             "a stale_seq refusal event from dev-b")
    assert env.infer("dev-b", env.X[:5])["model_version"] == "1.0.0"


def test_killed_agent_serves_installed_model_again_without_broker(env: Fleet) -> None:
    proc = env.agents["dev-a"]["proc"]
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)
    env.broker.stop()
    env.start_agent("dev-a")
    port = env.agents["dev-a"]["port"]

    def ready() -> bool:
        try:
            return httpx.get(f"http://127.0.0.1:{port}/v2/health/ready", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    wait_for(ready, 20, "the restarted agent to serve")
    res = env.infer("dev-a", env.X[:20])
    assert res["model_version"] == "1.0.0"
    label = next(o for o in res["outputs"] if o["name"] == "label")
    assert label["data"] == env.expected[:20].tolist()
