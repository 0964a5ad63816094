"""Simulated agents come back after the broker does (the soak restarts it under them): each
reconnects with backoff, subscribes again and gets what was published while it was away."""

from __future__ import annotations

import time
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from bench.common import Mosquitto, wait_until
from edgefleet.agent.app.sim import BlobCache, SimAgent, SimFleet
from edgefleet.agent.contract.envelope import public_key_to_b64
from edgefleet.agent.contract.wire import Topics
from edgefleet.hub.core.desired import build_keyring
from tests.conftest import mosquitto_bin

pytestmark = [pytest.mark.broker]


def test_sim_agents_reconnect_after_a_broker_kill_and_receive_what_came_meanwhile(tmp_path: Path) -> None:
    assert mosquitto_bin(), "mosquitto is not installed (apt-get install -y mosquitto)"
    root, signer = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    cache = BlobCache(tmp_path / "cache")
    agents = [SimAgent(fleet="f", device=f"d{i}", root_public_key=public_key_to_b64(root.public_key()),
                       state_dir=tmp_path / f"d{i}", cache=cache) for i in range(5)]
    broker = Mosquitto(tmp_path / "broker")
    with broker:
        sim = SimFleet(agents, broker.url, workers=4, keepalive=5)
        sim.start()
        try:
            wait_until(lambda: sim.connected == 5, 20, "5 agents connected")
            assert broker.proc is not None
            broker.proc.kill()
            broker.proc.wait()
            wait_until(lambda: sim.connected == 0, 20, "the agents saw the broker go")
            time.sleep(1.5)  # a few refused reconnects: the backoff grows
            broker.__enter__()  # the same port, no persistence: retained messages are gone
            wait_until(lambda: sim.connected == 5, 30, "5 agents reconnected")
            assert sim.reconnects >= 5
            pub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="test-pub")  # type: ignore[attr-defined]
            pub.connect("127.0.0.1", broker.port)
            pub.loop_start()
            pub.publish(Topics("f").keyring, build_keyring("f", 1, [signer], root, time.time()), qos=1,
                        retain=True).wait_for_publish(10)
            wait_until(lambda: all(a.trust.keyring is not None for a in agents), 20, "the keyring on every agent")
            pub.loop_stop()
            pub.disconnect()
        finally:
            sim.stop(drain=2)
