"""A fleet on a 3-node NATS cluster loses a node in the middle of a rollout, and does not notice.

Real parts: three nats-server processes (the node files ``broker-config --kind nats`` writes, here
without TLS so the simulated fleet can join: the TLS cluster is tests/hub/test_nats_broker.py),
the hub as a process reading device channels from its JetStream stream, two real agents (their
own device profile, so each step's cohort holds one) and 24 simulated agents, every one given the
list of the three nodes and starting on one of its own drawing. A rollout of a retrained model
starts in shadow mode; two seconds into its first step the node holding the most device
connections is SIGKILLed. Then:

* every agent reconnects, to another node;
* the rollout is promoted and every device ends on the new version;
* every telemetry window a device sent is stored once: the hub's seqs per device are exactly the
  ones it sent, none twice;
* a real agent that connects only after the node died still gets the keyring and its retained
  desired state (QoS 0 subscriptions: wire.SUBSCRIBE_QOS explains the NATS behaviour this avoids).
"""

from __future__ import annotations

import asyncio
import json
import pickle
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import nats
import numpy as np
import pytest
from sklearn.datasets import make_classification
from sklearn.linear_model import LogisticRegression

from edgefleet.agent.app.sim import BlobCache, SimAgent, SimFleet
from edgefleet.hub.adapters.client import HubClient
from edgefleet.hub.adapters.home import HubHome
from edgefleet.hub.adapters.jetstream import stream_name
from edgefleet.hub.adapters.natsconf import NatsLayout, write_nats_config
from edgefleet.hub.adapters.pki import DevicePki
from tests._nats import NatsCluster, free_port_block
from tests.conftest import Procs, free_port, http_ok, infer_load, run_cli, wait_for

pytestmark = [pytest.mark.broker, pytest.mark.slow]
CLI = "edgefleet.hub.cli.main"
SIMS = 24
REAL = ("dev-a", "dev-b")


def _stream_leader(cluster: NatsCluster, fleet: str) -> int | None:
    """The node leading the hub's ingest stream (its Raft group), from any live node."""
    async def ask() -> str | None:
        nc = await nats.connect(servers=[cluster.nats_urls[j] for j in cluster.live()], connect_timeout=5)
        try:
            info = await nc.jetstream(timeout=5).stream_info(stream_name(fleet))
            return info.cluster.leader if info.cluster else None
        finally:
            await nc.close()
    leader = asyncio.run(ask())
    return int(leader.rsplit("-", 1)[1]) - 1 if leader else None  # server_name edgefleet-N


def _connections(cluster: NatsCluster) -> dict[int, int]:
    """MQTT client connections per live node (its monitoring endpoint)."""
    out = {}
    for j in cluster.live():
        r = httpx.get(f"{cluster.info['monitor'][j]}/connz", params={"limit": 1024}, timeout=5)
        out[j] = sum(1 for c in r.json().get("connections") or [] if c.get("mqtt_client"))
    return out


@pytest.mark.timeout(300)
def test_a_node_killed_mid_rollout_every_agent_moves_the_rollout_finishes_nothing_lost(
        procs: Procs, tmp_path: Path) -> None:
    fleet = f"nf{int(time.time() * 1000) % 10**9}"
    mqtt, client_port, cluster_port, monitor = free_port_block(3)
    layout = NatsLayout(folder=tmp_path / "nats", nodes=3, hosts=("127.0.0.1",), bind="127.0.0.1", mqtt_port=mqtt,
                        client_port=client_port, cluster_port=cluster_port, monitor_port=monitor, tls=False)
    write_nats_config(DevicePki(tmp_path / "pki", fleet), layout, hostnames=["127.0.0.1"], now=time.time())
    cluster = NatsCluster(layout.folder)
    cluster.start()
    home_dir, http_port = tmp_path / "hub", free_port()
    h = ("--home", str(home_dir))
    run_cli(CLI, "init", *h, "--fleet", fleet, "--broker", ",".join(cluster.mqtt_urls), "--http",
            f"127.0.0.1:{http_port}")
    home = HubHome(home_dir)
    home.update_config(jetstream_url=",".join(cluster.nats_urls))
    (home_dir / "rollout.toml").write_text(
        "evaluate_seconds = 0.3\n[policy]\nmin_inferences = 30\nmin_device_windows = 2\n"
        "min_step_seconds = 6\nstep_deadline_seconds = 120\n")
    sim: SimFleet | None = None
    stop = threading.Event()
    try:
        procs.start("hub", CLI, "serve", *h)
        wait_for(lambda: http_ok(f"http://127.0.0.1:{http_port}/healthz"), 30, "hub HTTP")
        api = HubClient(f"http://127.0.0.1:{http_port}", home.token())

        x, y = make_classification(n_samples=600, n_features=4, n_informative=3, n_redundant=0, random_state=3)
        x = x.astype(np.float32)
        np.save(tmp_path / "train.npy", x)
        for version, c in (("1", 1.0), ("2", 0.5)):  # a retrained model: the same answers nearly always
            (tmp_path / f"v{version}.pkl").write_bytes(pickle.dumps(LogisticRegression(C=c, max_iter=500).fit(x, y)))
            run_cli(CLI, "publish", str(tmp_path / f"v{version}.pkl"), "--name", "clf", "--version", version,
                    "--reference", str(tmp_path / "train.npy"), *h)

        agents: dict[str, dict[str, Any]] = {}
        for dev in (*REAL, "dev-late"):
            port = free_port()
            run_cli(CLI, "device", "add", dev, *h, "--out", str(tmp_path / dev), "--listen", f"127.0.0.1:{port}",
                    "--window", "0.5", "--profile", "raspberry-pi-4")
            with (tmp_path / dev / "agent.toml").open("a") as f:
                f.write("resend_seconds = 3\n")  # lands in [overrides.telemetry]
            agents[dev] = {"port": port, "config": tmp_path / dev / "agent.toml"}
        names = [f"sim{i:02d}" for i in range(SIMS)]
        for d in names:
            api.add_device(d, "generic-x86_64")
        for dev in REAL:
            agents[dev]["proc"] = procs.start(f"agent-{dev}", "edgefleet.agent.app.cli", "run", "--config",
                                              str(agents[dev]["config"]))
        cache = BlobCache(tmp_path / "cache")
        sims = [SimAgent(fleet=fleet, device=d, root_public_key=home.root_public_b64(),
                         state_dir=tmp_path / "sims" / d, cache=cache) for d in names]
        for a in sims:
            a.RESEND_SECONDS = 3.0
        sim = SimFleet(sims, ",".join(cluster.mqtt_urls), workers=4, keepalive=10, telemetry_every=1.0)
        sim.start()
        wait_for(lambda: sim is not None and sim.connected == SIMS, 30, "every simulated agent connected")
        run_cli(CLI, "deploy", "clf", "1", *[a for d in (*REAL, "dev-late", *names) for a in ("--device", d)], *h)

        def versions() -> dict[str, str | None]:
            return {d["device"]: d["models"].get("clf") for d in api.status()["devices"]}

        everyone = (*REAL, *names)
        wait_for(lambda: all(versions().get(d) == "1" for d in everyone), 60, "every device on clf 1")
        spread = _connections(cluster)
        assert sum(v > 0 for v in spread.values()) >= 2, spread  # the fleet is spread over the nodes

        pump = infer_load(lambda: [agents[d]["port"] for d in REAL], x, stop, rows=10, seed=1)
        ro = json.loads(run_cli(CLI, "rollout", "start", "clf", "2", "--steps", "50,100", "--fraction", "1.0",
                                "--json", *h).stdout)
        assert any(d in ro["members"] for d in REAL) and any(d in ro["members"] for d in names), ro["members"]
        time.sleep(2)
        # the node leading the ingest stream (a new leader must be elected under the hub), if agents are on
        # it too; else the node with the most agents
        spread = _connections(cluster)
        leader = _stream_leader(cluster, fleet)
        victim = leader if leader is not None and spread.get(leader, 0) >= 2 else max(spread, key=lambda j: spread[j])
        reconnects0 = sim.reconnects
        cluster.kill(victim)
        t_kill = time.monotonic()
        print(f"killed node {victim + 1} holding {spread[victim]} of {sum(spread.values())} MQTT connections"
              f"{' and the ingest stream leader' if victim == leader else ''}")

        wait_for(lambda: sim is not None and sim.connected == SIMS, 30, "every simulated agent reconnected")
        t_back = time.monotonic() - t_kill
        moved = sim.reconnects - reconnects0
        # the real agents and the hub's publisher too (+ 1)
        wait_for(lambda: sum(_connections(cluster).values()) >= SIMS + len(REAL) + 1, 30,
                 "every MQTT client back on the surviving nodes")
        t_all = time.monotonic() - t_kill
        after = _connections(cluster)
        assert victim not in after, after
        print(f"{moved} simulated agents reconnected to the surviving nodes within {t_back:.1f} s, "
              f"every client within {t_all:.1f} s: {after}")
        assert moved >= 1

        # a device that connects only after the node died: keyring and retained desired state arrive
        agents["dev-late"]["proc"] = procs.start("agent-dev-late", "edgefleet.agent.app.cli", "run", "--config",
                                                 str(agents["dev-late"]["config"]))

        def state() -> str:
            return str(api.rollouts(ro["id"])[0]["state"])

        wait_for(lambda: state() in ("promoted", "rolled_back", "aborted", "paused"), 120,
                 "the rollout to finish", interval=0.5)
        assert state() == "promoted", api.rollouts(ro["id"])[0]
        wait_for(lambda: all(v == "2" for d, v in versions().items() if d != "dev-late"), 60,
                 "every device on clf 2")
        wait_for(lambda: versions().get("dev-late") == "2", 60, "the late device on its retained desired state")
        stop.set()
        pump.join(5)
        for dev in REAL:
            r = httpx.post(f"http://127.0.0.1:{agents[dev]['port']}/v2/models/clf/infer", timeout=10, json={
                "inputs": [{"name": "input", "shape": [1, 4], "datatype": "FP32", "data": x[0].tolist()}]})
            assert r.status_code == 200 and r.json()["model_version"] == "2", r.text

        # telemetry: stop the windows, let every agent's re-sends land, then compare seqs
        sim.start_telemetry(None)
        wait_for(lambda: all(not a.unacked for a in sims), 60, "every simulated window acknowledged")
        assert sum(a.dropped for a in sims) == 0
        db = sqlite3.connect(f"file:{home_dir / 'hub.db'}?mode=ro", uri=True, timeout=10)
        try:
            for a in sims:
                seqs = [r[0] for r in db.execute("SELECT seq FROM telemetry WHERE device=? ORDER BY seq", (a.device,))]
                assert seqs == list(range(1, a.telemetry_seq + 1)), (a.device, a.telemetry_seq, seqs)
            for dev in REAL:
                seqs = [r[0] for r in db.execute("SELECT seq FROM telemetry WHERE device=? ORDER BY seq", (dev,))]
                assert seqs and seqs == list(range(seqs[0], seqs[-1] + 1)), (dev, seqs)  # no gap, none twice
        finally:
            db.close()
        print(f"windows: {sum(a.telemetry_seq for a in sims)} simulated, each stored once")
    except BaseException:
        print(procs.logs())
        print(cluster.logs())
        raise
    finally:
        stop.set()
        if sim is not None:
            sim.stop(drain=2)
        procs.stop_all()
        cluster.stop()
