"""``edgefleet-hub demo``: the whole loop on one machine, nothing to install beyond the package.

An embedded MQTT broker (unless ``--broker`` names one), a hub, and two agents, all in this
process with their own folders under a temporary home; a scikit-learn classifier is trained on
the iris data that scikit-learn ships, published with its reference distribution, deployed to
both agents, and queried over the agents' local OIP v2 HTTP endpoints. Then a bad version (trained
on shuffled labels) is rolled out in shadow mode and the hub's gate rolls it back on its own;
the decision and the fleet status are printed.
"""

from __future__ import annotations

import argparse
import logging
import pickle
import signal
import socket
import tempfile
import threading
import time
from pathlib import Path
from types import FrameType
from typing import Any

import httpx
import numpy as np

from edgefleet.agent.app.daemon import Agent
from edgefleet.agent.contract.config import load_agent_config
from edgefleet.hub.adapters.client import HubClient
from edgefleet.hub.adapters.home import HubHome
from edgefleet.hub.daemon import Hub

__all__ = ["run_demo"]

log = logging.getLogger("edgefleet.demo")
DEVICES = ("demo-pi-1", "demo-gw-2")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait(pred: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(0.2)
    raise TimeoutError(f"demo: timed out after {timeout}s waiting for {what}")


def run_demo(*, seconds: float | None, broker_url: str | None, home: str | None = None) -> int:
    from sklearn.datasets import load_iris
    from sklearn.linear_model import LogisticRegression

    from edgefleet.hub.adapters.resources import profile_path as shipped_profile
    from edgefleet.hub.cli.commands import build_publish_request, cmd_status, write_agent_bundle

    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)

    tmp = tempfile.TemporaryDirectory(prefix="edgefleet-demo-")
    root = Path(tmp.name)
    broker = None
    if broker_url is None:
        from edgefleet.hub.adapters.broker import EmbeddedBroker

        broker = EmbeddedBroker()
        broker.start()
        broker_url = broker.url
        print(f"[demo] embedded MQTT broker on {broker_url}")
    hub_home = HubHome(root / "hub")
    hub_home.init(fleet="demo", broker_url=broker_url, http_listen="127.0.0.1:0")
    (hub_home.path / "rollout.toml").write_text("evaluate_seconds = 0.5  # judge rollouts often: a demo is short\n")
    hub = Hub(hub_home)
    agents: list[Agent] = []
    try:
        hub.start()
        print(f"[demo] hub serving on {hub.public_url}, home {hub_home.path}")
        client = HubClient.for_home(hub_home)
        # The demo's hub lives in a temporary folder that goes when the demo stops: its token may be
        # printed. An operator token, so the page's pause / resume / abort / promote buttons work.
        login = client.add_token("demo-operator", "operator")["token"]
        print(f"[demo] fleet page: {hub.public_url}/ui  (log in with the token {login})")

        ports = {}
        for dev in DEVICES:
            ports[dev] = _free_port()
            info = client.add_device(dev, "generic-x86_64")
            cfg_path = write_agent_bundle(
                root / dev, info, profile_path=shipped_profile("generic-x86_64"),
                listen=f"127.0.0.1:{ports[dev]}", state_dir="state",
                overrides={"telemetry": {"window_seconds": 1}},
            )
            agent = Agent(load_agent_config(cfg_path))
            agent.start()
            agents.append(agent)
            print(f"[demo] agent {dev} up, inference API on http://127.0.0.1:{ports[dev]}/v2")

        X, y = load_iris(return_X_y=True)
        X = X.astype(np.float32)
        clf = LogisticRegression(max_iter=1000).fit(X, y)
        (root / "iris.pkl").write_bytes(pickle.dumps(clf))
        np.save(root / "iris-train.npy", X)
        args = argparse.Namespace(
            name="iris", version="1.0.0", model=str(root / "iris.pkl"),
            reference=str(root / "iris-train.npy"), bins=10, source="edgefleet demo", author="demo",
        )
        res = client.publish(build_publish_request(args))
        print(f"[demo] published iris 1.0.0 (sha256 {res['sha256'][:16]}…, {res['size']} bytes)")
        client.deploy("iris", "1.0.0", list(DEVICES))
        print("[demo] deployed iris 1.0.0 to both devices; waiting for them to report it active")

        def all_active() -> bool:
            return all(d["models"].get("iris") == "1.0.0" for d in client.status()["devices"])

        _wait(all_active, 60, "both agents to run iris 1.0.0")
        print("[demo] both agents serve iris 1.0.0")

        rng = np.random.default_rng(0)
        http = httpx.Client(timeout=5)
        sent = 0

        def traffic_round(quiet: bool = False) -> None:
            nonlocal sent
            for dev in DEVICES:
                rows = X[rng.integers(0, len(X), size=4)]
                body = {"inputs": [{"name": "input", "shape": list(rows.shape), "datatype": "FP32",
                                    "data": rows.reshape(-1).tolist()}]}
                r = http.post(f"http://127.0.0.1:{ports[dev]}/v2/models/iris/infer", json=body).json()
                label = next(o for o in r["outputs"] if o["name"] == "label")["data"]
                sent += 1
                if not quiet and (sent <= 4 or sent % 20 == 0):
                    print(f"[demo] {dev} -> iris {r['model_version']} labels {label} (request {r['id'][:8]})")

        started = time.monotonic()
        first_phase = seconds if seconds is not None else 10.0  # then the rollout
        while not stop.is_set():
            traffic_round()
            if time.monotonic() - started >= first_phase:
                break
            stop.wait(0.5)

        if not stop.is_set():
            # A bad version (trained on shuffled labels) reaches the fleet only through a rollout:
            # it passes its preflight (it is a faithful conversion of a bad model), then shadows
            # 1.0.0 on the first cohort, and the hub's gate rolls it back on the agreement it sees.
            bad = LogisticRegression(max_iter=1000).fit(X, rng.permutation(y))
            (root / "iris-bad.pkl").write_bytes(pickle.dumps(bad))
            args.version, args.model, args.parent = "1.1.0", str(root / "iris-bad.pkl"), "1.0.0"
            args.preflight, args.preflight_rows = str(root / "iris-train.npy"), 32
            args.atol, args.rtol, args.label_agreement = 1e-4, 1e-3, 1.0
            client.publish(build_publish_request(args))
            ro = client.rollout_start({"model": "iris", "version": "1.1.0", "steps": [50, 100], "mode": "shadow",
                                       "fraction": 1.0,
                                       "policy": {"min_inferences": 30, "min_device_windows": 1,
                                                  "step_deadline_seconds": 120}})
            print(f"[demo] published iris 1.1.0 (trained on shuffled labels) and started rollout {ro['id']}: "
                  f"step 1 = {', '.join(ro['members'])} shadowing 1.0.0")
            deadline = time.monotonic() + 90
            state = ro["state"]
            while not stop.is_set() and state == "running" and time.monotonic() < deadline:
                traffic_round(quiet=True)
                stop.wait(0.2)
                state = client.rollouts(ro["id"])[0]["state"]
            final = client.rollouts(ro["id"])[0]
            print(f"[demo] rollout {ro['id']} {final['state'].upper()}: {final.get('reason') or 'no decision yet'}")
            decision = [e for e in client.audit() if e["action"] in ("rollout_rollback", "rollout_promote")]
            if decision:
                e = decision[-1]
                print(f"[demo] audit #{e['id']}: {e['action']} by {e['actor']}, devices {e['details'].get('devices')}")
            if seconds is not None:  # as long again, so a fleet page left open shows the outcome
                linger = time.monotonic() + seconds
                while not stop.is_set() and time.monotonic() < linger:
                    traffic_round(quiet=True)
                    stop.wait(0.5)
        if seconds is None and not stop.is_set():
            print("[demo] serving on; Ctrl-C stops")
            while not stop.is_set():
                traffic_round()
                stop.wait(0.5)
        http.close()
        time.sleep(min(2.5, max(0.0, (seconds or 0))))  # let one more telemetry window land
        print(f"[demo] sent {sent} requests; fleet status:")
        cmd_status(argparse.Namespace(home=str(hub_home.path), hub=None, json=False))
        return 0
    finally:
        for agent in agents:
            agent.stop()
        hub.stop()
        if broker is not None:
            broker.stop()
        tmp.cleanup()
        print("[demo] stopped cleanly")
