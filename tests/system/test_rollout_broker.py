"""The hub daemon runs a rollout on its own: real Mosquitto, the hub as a process, the CLI.

Devices are simulated by publishing the contract's telemetry on their topics (the agent side of
issue 4 is tested with real agent processes elsewhere); one device never connects at all. A bad
candidate is rolled back by the hub's evaluator thread, and every device — including the one that
never connected — finds a retained desired state with a higher seq naming the previous version.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest

from edgefleet.agent.contract.envelope import open_envelope
from edgefleet.agent.contract.wire import DesiredState, ModelWindow, TelemetryWindow, Topics
from tests.conftest import Broker, Procs, free_port, hub_up, retained, run_cli, wait_for
from tests.simulator import tiny_model

pytestmark = [pytest.mark.broker]
LAT = {"p50": 0.1, "p95": 0.1, "p99": 0.1, "max": 0.1}


def desired(broker: Broker, topics: Topics, device: str) -> DesiredState:
    return DesiredState.from_dict(json.loads(open_envelope(retained(broker, topics.desired(device))).payload))


def test_hub_rolls_back_a_bad_candidate_on_its_own(broker: Broker, procs: Procs, fleet: str, tmp_path: Path) -> None:
    home, port = tmp_path / "hub", free_port()
    run_cli("edgefleet.hub.cli.main", "init", "--home", str(home), "--fleet", fleet, "--broker", broker.url,
            "--http", f"127.0.0.1:{port}")
    (home / "rollout.toml").write_text("evaluate_seconds = 0.3\n[policy]\nmin_inferences = 100\n"
                                       "min_device_windows = 2\nstep_deadline_seconds = 600\n")
    procs.start("hub", "edgefleet.hub.cli.main", "serve", "--home", str(home))
    wait_for(lambda: hub_up(port), 20, "hub HTTP")
    h = ("--home", str(home))
    devices = [f"dev-{i}" for i in range(6)]
    for d in devices:
        run_cli("edgefleet.hub.cli.main", "device", "add", d, *h, "--out", str(tmp_path / d))
    for version, scale in (("1", 1.0), ("2", 3.0)):
        (tmp_path / f"m{version}.onnx").write_bytes(tiny_model(scale))
        run_cli("edgefleet.hub.cli.main", "publish", str(tmp_path / f"m{version}.onnx"), "--name", "m", "--version", version, *h)
    run_cli("edgefleet.hub.cli.main", "deploy", "m", "1", *[a for d in devices for a in ("--device", d)], *h)
    topics = Topics(fleet)
    seq0 = {d: desired(broker, topics, d).seq for d in devices}

    ro = json.loads(run_cli("edgefleet.hub.cli.main", "rollout", "start", "m", "2", "--steps", "40,100", "--json", *h).stdout)
    cohort = ro["members"]
    assert len(cohort) == 3 and ro["state"] == "running"
    for d in cohort:
        entry = desired(broker, topics, d).models["m"]
        assert entry.version == "2" and entry.canary is not None and entry.canary["rollout"] == ro["id"]

    alerts: list[dict[str, Any]] = []
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv311)
    client.on_message = lambda cl, u, m: alerts.append(json.loads(m.payload))
    client.connect("127.0.0.1", broker.port)
    client.loop_start()
    client.subscribe(topics.alerts, 1)
    try:
        for seq, d in enumerate(cohort, start=1):
            canary = {"rollout": ro["id"], "mode": "shadow", "version": "2", "state": "running", "reason": None,
                      "requests": 60, "errors": 0, "skipped": 0, "compared": 60, "agreed": 12,
                      "output_distance_sum": 30.0, "latency_ms": LAT, "stable_latency_ms": LAT}
            now = time.time()
            tw = TelemetryWindow(fleet=fleet, device=d, seq=seq, window_start=now - 1, window_end=now,
                                 models={"m": ModelWindow(version="1", requests=60, errors=0, rows=60,
                                                          latency_ms=LAT, canary=canary)})
            client.publish(topics.device(d, "telemetry"), json.dumps(tw.to_dict()).encode(), qos=1).wait_for_publish(5)
        wait_for(lambda: alerts, 20, "a rollout alert on hub/alerts", interval=0.2)
    finally:
        client.disconnect()
        client.loop_stop()

    def state() -> dict[str, Any]:
        return dict(json.loads(run_cli("edgefleet.hub.cli.main", "rollout", "status", ro["id"], "--json", *h).stdout)["rollouts"][0])

    wait_for(lambda: state()["state"] == "rolled_back", 20, "the hub to roll the rollout back", interval=0.5)
    (alert,) = alerts
    assert (alert["kind"], alert["type"], alert["action"], alert["state"]) == (
        "edgefleet.alert/v1", "rollout", "rollout_rollback", "rolled_back")
    for d in devices:  # dev-* never connected: they find the retained rollback on connect
        ds = desired(broker, topics, d)
        assert ds.models["m"].version == "1" and ds.models["m"].canary is None, d
        assert ds.seq > seq0[d], d
    audit = json.loads(run_cli("edgefleet.hub.cli.main", "audit", "--json", *h).stdout)["entries"]
    (entry,) = [e for e in audit if e["action"] == "rollout_rollback"]
    # the gate may judge as soon as enough of the cohort's windows are in (2 or all 3 of 60 pairs)
    assert entry["actor"] == "rollout-gate"
    assert re.search(r"agreement 0\.200 < min 0\.95 \(99 % bounds [0-9.]+-[0-9.]+ over (120|180) compared pairs", entry["details"]["reason"]), \
        entry["details"]["reason"]
    assert set(entry["details"]["devices"]) == set(devices)
    assert run_cli("edgefleet.hub.cli.main", "audit", "verify", *h).returncode == 0
