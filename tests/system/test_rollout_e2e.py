"""Issue 4 end to end on real parts: Mosquitto, the hub and three agents as processes, models
trained here. A version trained on shuffled labels starts rolling out in shadow mode; the hub's
gate sees the low agreement the cohort reports and rolls it back on its own; every agent ends on
the previous version, serving it, with the rollback in the audit log — including a cohort device
that was offline during the rollback and gets it on reconnect."""

from __future__ import annotations

import json
import pickle
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from sklearn.datasets import make_classification
from sklearn.ensemble import RandomForestClassifier

from tests.conftest import Broker, Procs, free_port, http_ok, run_cli, wait_for

pytestmark = [pytest.mark.broker, pytest.mark.slow]


def test_bad_version_is_rolled_back_automatically_everywhere(
    broker: Broker, procs: Procs, fleet: str, tmp_path: Path
) -> None:
    home, port = tmp_path / "hub", free_port()
    h = ("--home", str(home))
    run_cli("edgefleet.hub.cli.main", "init", *h, "--fleet", fleet, "--broker", broker.url, "--http", f"127.0.0.1:{port}")
    (home / "rollout.toml").write_text(
        "evaluate_seconds = 0.3\n[policy]\nmin_inferences = 30\nmin_device_windows = 2\n"
        "step_deadline_seconds = 120\n")
    procs.start("hub", "edgefleet.hub.cli.main", "serve", *h)
    wait_for(lambda: http_ok(f"http://127.0.0.1:{port}/healthz"), 20, "hub HTTP")

    agents: dict[str, dict[str, Any]] = {}
    for dev in ("dev-a", "dev-b", "dev-c"):
        aport = free_port()
        run_cli("edgefleet.hub.cli.main", "device", "add", dev, *h, "--out", str(tmp_path / dev),
                "--listen", f"127.0.0.1:{aport}", "--window", "0.5")
        agents[dev] = {"port": aport, "config": tmp_path / dev / "agent.toml"}

    def start(dev: str) -> None:
        agents[dev]["proc"] = procs.start(f"agent-{dev}", "edgefleet.agent.app.cli", "run", "--config", str(agents[dev]["config"]))

    x, y = make_classification(n_samples=600, n_features=6, n_informative=4, n_redundant=0, n_classes=3,
                               class_sep=2.0, random_state=3)
    x = x.astype(np.float32)
    np.save(tmp_path / "train.npy", x)
    for version, labels in (("1", y), ("2", np.random.default_rng(0).permutation(y))):
        est = RandomForestClassifier(n_estimators=10, max_depth=6, random_state=0).fit(x, labels)
        (tmp_path / f"v{version}.pkl").write_bytes(pickle.dumps(est))
        run_cli("edgefleet.hub.cli.main", "publish", str(tmp_path / f"v{version}.pkl"), "--name", "clf", "--version", version,
                "--reference", str(tmp_path / "train.npy"), "--preflight", str(tmp_path / "train.npy"), *h)
    for dev in agents:
        start(dev)
    run_cli("edgefleet.hub.cli.main", "deploy", "clf", "1", *[a for d in agents for a in ("--device", d)], *h)

    def status() -> dict[str, Any]:
        return {d["device"]: d for d in json.loads(run_cli("edgefleet.hub.cli.main", "status", "--json", *h).stdout)["devices"]}

    wait_for(lambda: all(d["models"].get("clf") == "1" for d in status().values()), 60, "every agent on clf 1")

    ro = json.loads(run_cli("edgefleet.hub.cli.main", "rollout", "start", "clf", "2", "--steps", "50,100", "--fraction", "1.0",
                            "--json", *h).stdout)
    cohort = sorted(ro["members"])
    assert len(cohort) == 2
    live, offline = cohort

    def infer(dev: str, rows: np.ndarray) -> dict[str, Any]:
        body = {"inputs": [{"name": "input", "shape": list(rows.shape), "datatype": "FP32",
                            "data": rows.reshape(-1).tolist()}]}
        r = httpx.post(f"http://127.0.0.1:{agents[dev]['port']}/v2/models/clf/infer", json=body, timeout=10)
        assert r.status_code == 200, r.text
        return dict(r.json())

    def events(dev: str) -> list[dict[str, Any]]:
        return list(json.loads(run_cli("edgefleet.hub.cli.main", "events", "--device", dev, "--json", *h).stdout)["events"])

    wait_for(lambda: any(e["type"] == "canary_started" for e in events(offline)), 60, f"{offline} to start the canary")
    agents[offline]["proc"].terminate()  # offline from here until after the rollback
    agents[offline]["proc"].wait(10)
    wait_for(lambda: any(e["type"] == "canary_started" for e in events(live)), 60, f"{live} to start the canary")
    # status names the candidate the cohort device runs beside the stable version
    wait_for(lambda: status()[live].get("candidates", {}).get("clf", {}).get("version") == "2", 30,
             f"{live} to report its candidate")
    assert status()[live]["candidates"]["clf"]["mode"] == "shadow" and status()[live]["models"]["clf"] == "1"

    rng = np.random.default_rng(1)

    def state() -> str:
        for _ in range(10):
            infer(live, x[rng.integers(0, len(x), 1)])
        return str(json.loads(run_cli("edgefleet.hub.cli.main", "rollout", "status", ro["id"], "--json", *h).stdout)
                   ["rollouts"][0]["state"])

    wait_for(lambda: state() == "rolled_back", 90, "the hub to roll the bad version back", interval=0.3)
    start(offline)
    wait_for(lambda: all(d["models"].get("clf") == "1" for d in status().values()), 60, "every agent on clf 1")
    for dev in cohort:  # the offline one ends its canary when it reconnects and reads the retained rollback
        wait_for(lambda dev=dev: any(e["type"] == "canary_ended" and e["reason"] == "rollback" for e in events(dev)),
                 60, f"{dev} to end the canary on the rollback")
    for dev in agents:
        assert infer(dev, x[:5])["model_version"] == "1"
    # every device reports the seq of the state it applied, canary start and end included
    wait_for(lambda: all(d["reported_seq"] == d["desired_seq"] for d in status().values()), 30,
             "every agent to report the last desired seq")
    audit = json.loads(run_cli("edgefleet.hub.cli.main", "audit", "--json", *h).stdout)["entries"]
    (entry,) = [e for e in audit if e["action"] == "rollout_rollback"]
    assert entry["actor"] == "rollout-gate" and "agreement" in entry["details"]["reason"]
    assert sorted(entry["details"]["devices"]) == sorted(agents)
    agreement = next(g for g in entry["details"]["gates"] if g["name"] == "agreement")
    assert agreement["passed"] is False and agreement["value"] < 0.95
