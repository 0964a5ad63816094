"""More than 1,024 simulated agents in one process connect, converge and report (issue 22).

A real hub process and a real Mosquitto; 1,100 :class:`~agent.app.sim.SimAgent` over one epoll
loop in this process, so their sockets have descriptors above 1,023 (where ``select()`` stops).
Each agent gets the keyring, installs v1 from the hub's deploy, and sends telemetry windows that
the hub stores, each exactly once.
"""

from __future__ import annotations

import base64
import resource
import subprocess
import sys
from pathlib import Path

import pytest

from edgefleet.agent.app.sim import BlobCache, SimAgent, SimFleet
from edgefleet.hub.adapters.client import HubClient
from edgefleet.hub.adapters.home import HubHome
from tests.conftest import REPO, Broker, free_port, hub_up, wait_for
from tests.simulator import tiny_model

pytestmark = [pytest.mark.broker]

N = 1100


@pytest.mark.timeout(300)
def test_more_than_1024_agents_in_one_process_connect_converge_and_report(tmp_path: Path) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 2 * N + 256:
        pytest.fail(f"RLIMIT_NOFILE hard limit {hard} is below {2 * N + 256}: raise it (ulimit -Hn)")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, 2 * N + 256), hard))  # the broker inherits it
    (tmp_path / "broker").mkdir()
    broker = Broker(tmp_path / "broker")
    broker.start()
    url = broker.url
    home_dir, port = tmp_path / "hub", free_port()
    HubHome(home_dir).init(fleet="big", broker_url=url, http_listen=f"127.0.0.1:{port}")
    with (tmp_path / "hub.log").open("wb") as log:
        hub = subprocess.Popen([sys.executable, "-m", "edgefleet.hub.cli.main", "serve", "--home", str(home_dir)],
                               cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    sim: SimFleet | None = None
    try:
        wait_for(lambda: hub_up(port), 30, "hub HTTP")
        home = HubHome(home_dir)
        client = HubClient(f"http://127.0.0.1:{port}", home.token())
        client.publish({"name": "clf", "version": "1", "model_b64": base64.b64encode(tiny_model(1.0)).decode(),
                        "lineage": {}, "actor": "test"})
        devices = [f"sim{i:05d}" for i in range(N)]
        for d in devices:
            client.add_device(d, "generic-x86_64")
        cache = BlobCache(tmp_path / "cache")
        agents = [SimAgent(fleet="big", device=d, root_public_key=home.root_public_b64(),
                           state_dir=tmp_path / "agents" / d, cache=cache) for d in devices]
        sim = SimFleet(agents, url, telemetry_every=3.0)
        sim.start()
        wait_for(lambda: sim is not None and sim.connected == N, 60, f"{N} agents connected")
        fds = [a.client.socket().fileno() for a in agents if a.client is not None and a.client.socket()]
        assert max(fds) > 1024, max(fds)  # the point of the test: past select()'s reach
        wait_for(lambda: all(a.trust.keyring is not None for a in agents), 60, "keyring on every agent")
        client.deploy("clf", "1", devices)
        wait_for(lambda: all((e := a.active.get("clf")) is not None and e.version == "1" for a in agents),
                 90, "v1 active on every agent")
        assert cache.downloads == 1 and not [a.refusals for a in agents if a.refusals]
        # every agent closes at least two windows (3 s apart, spread over the period)
        wait_for(lambda: all(a.windows_sent >= 2 for a in agents), 60, "two windows from every agent")
        sim.stop()
        sent = {a.device: a.windows_sent for a in agents}
        sim = None

        def stored() -> dict[str, int]:
            status = client.status()
            return {d["device"]: sum(t["windows"] for t in d["telemetry_totals"]) for d in status["devices"]
                    if d.get("telemetry_totals")}

        wait_for(lambda: stored() == sent, 60, "every window sent stored at the hub")
        counters = client.status()["counters"]
        assert counters["ingested"] == sum(sent.values()), counters  # QoS 1 redeliveries count as duplicates
        assert all(d["models"] == {"clf": "1"} for d in client.status()["devices"])
    finally:
        if sim is not None:
            sim.stop()
        hub.terminate()
        hub.wait(20)
        broker.stop()
