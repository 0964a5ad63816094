"""The real agent daemon runs a canary: a real Mosquitto carries a hand-signed desired state whose
entry carries ``canary`` (no hub: the simulator signs and serves blobs), the agent runs as
``python -m agent.cli run`` with 0.5 s telemetry windows, answers over OIP HTTP naming the version
that answered, reports canary statistics in telemetry and canary events, and a rollback entry
ends the canary."""

from __future__ import annotations

import dataclasses
import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import paho.mqtt.client as mqtt
import pytest

from tests.conftest import Broker, Procs, wait_for
from tests.simulator import HubSimulator, tiny_model
from tests.system.test_crash_safety import Device, serving_device

pytestmark = [pytest.mark.broker, pytest.mark.slow]


class Listener:
    """Collects the device's telemetry windows and events."""

    def __init__(self, dev: Device) -> None:
        self.telemetry: list[dict[str, Any]] = []
        self.events: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        t = dev.topics
        self.topics = {t.device(dev.sim.device, "telemetry"): self.telemetry,
                       t.device(dev.sim.device, "events"): self.events}
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv311)
        self.client.on_connect = lambda c, *_: [c.subscribe(topic, 1) for topic in self.topics]
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", dev.broker.port)
        self.client.loop_start()

    def _on_message(self, _c: Any, _u: Any, msg: mqtt.MQTTMessage) -> None:
        with self._lock:
            self.topics[msg.topic].append(json.loads(msg.payload))

    def event(self, type_: str) -> dict[str, Any] | None:
        with self._lock:
            return next((e for e in self.events if e["type"] == type_), None)

    def canary_windows(self) -> list[dict[str, Any]]:
        with self._lock:
            return [w["models"]["m"]["canary"] for w in self.telemetry if "canary" in w["models"].get("m", {})]

    def stop(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


@pytest.fixture
def device(broker: Broker, procs: Procs, fleet: str, tmp_path: Path) -> Iterator[Device]:
    with serving_device(broker, procs, fleet, tmp_path, "\n[overrides.telemetry]\nwindow_seconds = 0.5\n") as dev:
        yield dev


def infer(dev: Device) -> tuple[str, float]:
    r = httpx.post(f"http://127.0.0.1:{dev.port}/v2/models/m/infer", timeout=5, json={
        "inputs": [{"name": "x", "shape": [1, 2], "datatype": "FP32", "data": [1.0, 1.0]}]})
    assert r.status_code == 200, r.text
    body = r.json()
    return str(body["model_version"]), float(body["outputs"][0]["data"][0])


def test_the_daemon_runs_a_split_canary_reports_it_and_ends_it_on_rollback(device: Device) -> None:
    sim: HubSimulator = device.sim
    listener = Listener(device)
    try:
        stable = sim.entry("1", tiny_model(1.0))
        cand = dataclasses.replace(sim.entry("2", tiny_model(2.0)), fallback="1", canary={
            "rollout": "r-42", "mode": "split", "fraction": 0.5, "stable": stable.to_dict(),
            "limits": {"min_samples": 10_000}})
        device.publish(device.topics.desired(sim.device), sim.desired({"m": cand}))
        started = wait_for(lambda: listener.event("canary_started"), 30, "canary_started")
        assert started["version"] == "2" and started["rollout"] == "r-42"  # type: ignore[index]
        answers = {infer(device) for _ in range(20)}
        assert answers == {("1", 1.0), ("2", 2.0)}  # each answer names the version that produced it

        def served() -> int:
            return sum(c["requests"] for c in listener.canary_windows() if c["rollout"] == "r-42")

        wait_for(lambda: served() >= 10, 30, "canary requests in telemetry")
        last = listener.canary_windows()[-1]
        assert (last["mode"], last["version"], last["state"]) == ("split", "2", "running")
        assert served() == 10  # split 0.5 of 20 requests, counted once across windows

        device.publish(device.topics.desired(sim.device), sim.desired({"m": stable}))
        ended = wait_for(lambda: listener.event("canary_ended"), 30, "canary_ended")
        assert ended["reason"] == "rollback"  # type: ignore[index]
        assert {infer(device) for _ in range(6)} == {("1", 1.0)}
    finally:
        listener.stop()


def test_the_daemon_drops_a_nan_shadow_candidate_at_once_and_reports_it(device: Device) -> None:
    sim: HubSimulator = device.sim
    listener = Listener(device)
    try:
        stable = sim.entry("1", tiny_model(1.0))
        cand = dataclasses.replace(sim.entry("2", tiny_model(float("nan"))), fallback="1", canary={
            "rollout": "r-43", "mode": "shadow", "fraction": 1.0, "stable": stable.to_dict()})
        device.publish(device.topics.desired(sim.device), sim.desired({"m": cand}))
        wait_for(lambda: listener.event("canary_started"), 30, "canary_started")
        assert {infer(device) for _ in range(5)} == {("1", 1.0)}  # shadow: the stable answers
        dropped = wait_for(lambda: listener.event("canary_dropped"), 30, "canary_dropped")
        assert (dropped["reason"], dropped["version"], dropped["rollout"]) == ("nan_output", "2", "r-43")  # type: ignore[index]
        wait_for(lambda: any(c["state"] == "dropped" and c["reason"] == "nan_output"
                             for c in listener.canary_windows()), 30, "the drop in telemetry")
        assert {infer(device) for _ in range(5)} == {("1", 1.0)}
    finally:
        listener.stop()
