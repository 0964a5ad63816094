"""5. Fleet convergence: 1,000 simulated agents in one process against a real hub and Mosquitto.

The hub runs as its own process (``hub.cli.main serve``), the agents as :class:`agent.app.sim.SimFleet` in
this one: each agent its own MQTT connection, state directory and trust state, all sharing one
blob cache (see :mod:`agent.app.sim`). Measured:

* **deploy**: from the admin API ``deploy`` call (v2 to every device, which runs v1) until every
  agent has verified, stored and activated v2 and published its ``reported`` state;
* **rollback**: from the rollback decision (a deploy of v1, the fallback every device keeps) until
  every agent runs v1 again;
* the first install (v1, blob downloaded once into the shared cache) for reference.

Baseline: the same number of signed desired states published straight to the broker by one paho
client (no hub database, no signing) and received by the same simulated fleet, i.e. the floor
set by the broker and the agents' own verify + store work.
"""

from __future__ import annotations

import argparse
import base64
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import paho.mqtt.client as mqtt

from bench.common import (
    REPO,
    Mosquitto,
    Result,
    Row,
    free_port,
    raise_nofile,
    relabelled,
    train_models,
    wait_until,
)
from edgefleet.agent.app.sim import BlobCache, SimAgent, SimFleet
from edgefleet.hub.adapters.client import HubClient
from edgefleet.hub.adapters.home import HubHome


class _Watch:
    """Counts agents whose active version of ``clf`` equals the awaited one."""

    def __init__(self, agents: list[SimAgent]) -> None:
        self.agents = agents
        self.want = ""
        self.done: set[str] = set()
        self.lock = threading.Lock()
        self.all = threading.Event()
        for a in agents:
            a.on_change = self.changed

    def expect(self, version: str) -> None:
        with self.lock:
            self.want = version
            self.all.clear()
            self.done = {a.device for a in self.agents if (e := a.active.get("clf")) and e.version == version}
            if len(self.done) == len(self.agents):
                self.all.set()

    def changed(self, a: SimAgent) -> None:
        e = a.active.get("clf")
        if e is not None and e.version == self.want:
            with self.lock:
                self.done.add(a.device)
                if len(self.done) == len(self.agents):
                    self.all.set()


def _timed(watch: _Watch, version: str, action: object, timeout: float) -> tuple[float, float]:
    """(seconds until all converged, seconds the action itself took)."""
    watch.expect(version)
    t0 = time.perf_counter()
    action()  # type: ignore[operator]
    t_call = time.perf_counter() - t0
    if not watch.all.wait(timeout):
        raise TimeoutError(f"{len(watch.done)}/{len(watch.agents)} agents reached {version} in {timeout}s")
    return time.perf_counter() - t0, t_call


def run(smoke: bool = False, n_agents: int | None = None) -> Result:
    n = n_agents or (20 if smoke else 1000)
    res = Result(
        "fleet", f"5. Fleet convergence ({n} simulated agents, one process, loopback)",
        "the same signed desired states published straight to Mosquitto by one paho client "
        "(no hub: no database, no signing), received and applied by the same simulated fleet.",
    )
    raise_nofile(4 * n + 1024)
    data, _x = train_models(small=True)["logistic_regression"]
    with tempfile.TemporaryDirectory() as tmp_s, Mosquitto(Path(tmp_s) / "broker") as broker:
        tmp = Path(tmp_s)
        home_dir = tmp / "hub"
        http_port = free_port()
        fleet = "simfleet"
        HubHome(home_dir).init(fleet=fleet, broker_url=broker.url, http_listen=f"127.0.0.1:{http_port}")
        hub_log = (tmp / "hub.log").open("wb")
        hub = subprocess.Popen([sys.executable, "-m", "edgefleet.hub.cli.main", "serve", "--home", str(home_dir)],
                               cwd=REPO, stdout=hub_log, stderr=subprocess.STDOUT)
        fleet_sim: SimFleet | None = None
        try:
            home = HubHome(home_dir)
            client = HubClient(f"http://127.0.0.1:{http_port}", home.token())

            def healthy() -> bool:
                try:
                    client.request("GET", "/healthz")
                    return True
                except Exception:
                    return False

            wait_until(healthy, 30, "hub HTTP", 0.1)
            for v in ("1", "2"):
                client.publish({"name": "clf", "version": v, "model_b64": base64.b64encode(data + b"" if v == "1" else relabelled(data, "edgefleet bench v2")).decode(),
                                "lineage": {}, "actor": "bench"})
            t0 = time.perf_counter()
            devices = [f"sim{i:05d}" for i in range(n)]
            for d in devices:
                client.add_device(d, "generic-x86_64")
            t_enrol = time.perf_counter() - t0
            cache = BlobCache(tmp / "cache")
            root = home.root_public_b64()
            agents = [SimAgent(fleet=fleet, device=d, root_public_key=root, state_dir=tmp / "agents" / d,
                               cache=cache) for d in devices]
            watch = _Watch(agents)
            fleet_sim = SimFleet(agents, broker.url)
            t0 = time.perf_counter()
            fleet_sim.start()
            try:
                wait_until(lambda: all(a.trust.keyring is not None for a in agents), 120,
                           "keyring on every agent", 0.05)
            except TimeoutError:
                print("refusals:", [a.refusals for a in agents][:3], "connected:", fleet_sim.connected)
                print((tmp / "hub.log").read_text()[-3000:])
                raise
            t_connect = time.perf_counter() - t0

            def deploy(v: str) -> object:
                return lambda: client.deploy("clf", v, devices)

            first, first_call = _timed(watch, "1", deploy("1"), 300)
            upd, upd_call = _timed(watch, "2", deploy("2"), 300)
            rb, rb_call = _timed(watch, "1", deploy("1"), 300)

            # Baseline: the hub's latest signed states for v2, then v1, re-sent by a bare client.
            envs_v2, envs_v1 = _signed_states(home_dir, fleet, devices)
            base_upd = _timed(watch, "2", lambda: _raw_publish(broker.port, envs_v2), 300)[0]
            base_rb = _timed(watch, "1", lambda: _raw_publish(broker.port, envs_v1), 300)[0]
            refused = sum(len(a.refusals) for a in agents)
        finally:
            if fleet_sim is not None:
                fleet_sim.stop()
            hub.terminate()
            hub.wait(20)
    res.figures = {"agents": n, "deploy_s": upd, "rollback_s": rb, "first_install_s": first,
                   "baseline_deploy_s": base_upd, "baseline_rollback_s": base_rb,
                   "connect_s": t_connect, "enrol_s": t_enrol, "downloads": cache.downloads}
    res.add(Row(f"deploy v1→v2 to {n} devices, until all active", f"{upd:.2f} s (API call {upd_call:.2f} s)",
                f"{base_upd:.2f} s", f"{upd / base_upd:.2f}×", "≤ 10 s", None if smoke else upd <= 10))
    res.add(Row(f"rollback v2→v1 on {n} devices, until all reverted", f"{rb:.2f} s (API call {rb_call:.2f} s)",
                f"{base_rb:.2f} s", f"{rb / base_rb:.2f}×", "≤ 5 s", None if smoke else rb <= 5))
    res.add(Row("first install v1 (blob downloaded once)", f"{first:.2f} s (API call {first_call:.2f} s)", "", "", ""))
    res.notes.append(f"{n} agents connected and trusted the keyring in {t_connect:.2f} s; enrolling them "
                     f"through the admin API took {t_enrol:.2f} s; blob downloads into the shared cache: "
                     f"{cache.downloads}; refusals: {refused}.")
    res.notes.append("The rollback is a new desired state (higher seq) naming v1, which each device "
                     "keeps as its fallback blob, so no download is involved.")
    return res


def _signed_states(home_dir: Path, fleet: str, devices: list[str]) -> tuple[list[tuple[str, bytes]], list[tuple[str, bytes]]]:
    """Fresh desired states for v2 and v1 signed with the hub's key (higher seqs than the hub's)."""
    import json
    import sqlite3

    from edgefleet.agent.contract.wire import ModelEntry, Topics
    from edgefleet.hub.core.desired import build_desired

    home = HubHome(home_dir)
    key = home.signing_key()
    conn = sqlite3.connect(home_dir / "hub.db")
    conn.row_factory = sqlite3.Row
    topics = Topics(fleet)
    out: list[list[tuple[str, bytes]]] = [[], []]
    rows = {r["device"]: (r["seq"], json.loads(r["envelope"])) for r in conn.execute("SELECT device, seq, envelope FROM desired")}
    from edgefleet.agent.contract.envelope import open_envelope

    for d in devices:
        seq, env = rows[d]
        payload = json.loads(base64.b64decode(env["payload"]))
        entry_v1 = ModelEntry.from_dict(payload["models"]["clf"])
        v2 = conn.execute("SELECT * FROM models WHERE name='clf' AND version='2'").fetchone()
        entry_v2 = ModelEntry(version="2", sha256=v2["sha256"], size=v2["size"],
                              url=entry_v1.url.rsplit("/", 1)[0] + "/" + v2["sha256"], fallback="1")
        now = time.time()
        for i, entry in enumerate((entry_v2, entry_v1)):
            _s, raw = build_desired(fleet=fleet, device=d, seq=seq + 1 + i, now=now, ttl=3600,
                                    models={"clf": entry}, signing_key=key)
            out[i].append((topics.desired(d), raw))
    conn.close()
    del open_envelope
    return out[0], out[1]


def _raw_publish(port: int, msgs: list[tuple[str, bytes]]) -> None:
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv311)
    c.max_inflight_messages_set(1000)
    c.connect("127.0.0.1", port)
    c.loop_start()
    try:
        infos = [c.publish(t, p, qos=1, retain=True) for t, p in msgs]
        for i in infos:
            i.wait_for_publish(60)
    finally:
        c.disconnect()
        c.loop_stop()


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--agents", type=int)
    a = ap.parse_args()
    run(a.smoke, a.agents)
