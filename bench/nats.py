"""10. The same fleet through a 3-node NATS cluster and through one Mosquitto.

Two measurements, each on both brokers in the same run:

* **convergence**: 1,000 simulated agents (:mod:`bench.simproc`, two processes) connected to the
  broker (on NATS: each given the three nodes' URLs and starting on one of its own drawing), a
  real hub process; from the ``deploy`` call for v2 (every device runs v1) until every agent has
  verified, stored and activated v2, then the fleet rollback to v1 likewise;
* **ingest**: a backlog of real telemetry windows (section 4's payloads, 5 % duplicates) published
  while no hub runs, then drained by 1 and 2 hub replicas on one PostgreSQL (``fsync=off``): on
  Mosquitto through ``$share`` and persistent sessions, on NATS from the JetStream stream (R3)
  through the shared durable consumer. The clock runs from the first replica up to the last unique
  window stored.

Everything shares this machine's two cores: the three NATS nodes, PostgreSQL, the replicas and
the simulators. Run: ``python -m bench.nats [--smoke]``.
"""

from __future__ import annotations

import argparse
import base64
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psycopg

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
from bench.ingest import _payloads, _replica_home
from bench.replicas import _drain, _homes
from bench.simproc import SimProcs
from edgefleet.hub.adapters.client import HubClient
from edgefleet.hub.adapters.home import HubHome
from edgefleet.hub.adapters.natsconf import NatsLayout, write_nats_config
from edgefleet.hub.adapters.pki import DevicePki
from tests._nats import NatsCluster, free_port_block
from tests._postgres import PgCluster


class Broker:
    """One Mosquitto or a 3-node NATS cluster: ``urls`` for agents and hub, ``extra`` for hub.toml."""

    def __init__(self, kind: str, folder: Path, fleet: str) -> None:
        self.kind, self.folder, self.fleet = kind, folder, fleet
        self._m: Mosquitto | None = None
        self._n: NatsCluster | None = None

    def __enter__(self) -> Broker:
        if self.kind == "mosquitto":
            self._m = Mosquitto(self.folder).__enter__()
        else:
            mqtt, client, cluster, monitor = free_port_block(3)
            layout = NatsLayout(folder=self.folder, nodes=3, bind="127.0.0.1", mqtt_port=mqtt, client_port=client,
                                cluster_port=cluster, monitor_port=monitor, tls=False)
            write_nats_config(DevicePki(self.folder / "pki", self.fleet), layout, hostnames=["127.0.0.1"],
                              now=time.time())
            self._n = NatsCluster(self.folder)
            self._n.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._m is not None:
            self._m.__exit__(None, None, None)
        if self._n is not None:
            self._n.stop()

    @property
    def urls(self) -> str:
        return self._m.url if self._m is not None else ",".join(self._n.mqtt_urls)  # type: ignore[union-attr]

    @property
    def first(self) -> str:
        return self.urls.split(",")[0]

    def hub_config(self) -> dict[str, str]:
        return {"jetstream_url": ",".join(self._n.nats_urls)} if self._n is not None else {}


def _convergence(kind: str, n: int, data: bytes, tmp: Path) -> dict[str, float]:
    fleet = "natsbench"
    with Broker(kind, tmp / f"{kind}-broker", fleet) as broker:
        home_dir, http_port = tmp / f"{kind}-hub", free_port()
        home = HubHome(home_dir)
        home.init(fleet=fleet, broker_url=broker.urls, http_listen=f"127.0.0.1:{http_port}")
        if broker.hub_config():
            home.update_config(**broker.hub_config())
        log = (tmp / f"{kind}-hub.log").open("wb")
        hub = subprocess.Popen([sys.executable, "-m", "edgefleet.hub.cli.main", "serve", "--home", str(home_dir)],
                               cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
        sims: SimProcs | None = None
        try:
            client = HubClient(f"http://127.0.0.1:{http_port}", home.token(), timeout=600)
            wait_until(lambda: (tmp / f"{kind}-hub.log").read_text().count("hub for fleet") > 0, 60, "hub up", 0.1)
            for v in ("1", "2"):
                blob = data if v == "1" else relabelled(data, f"edgefleet bench v{v}")
                client.publish({"name": "clf", "version": v, "model_b64": base64.b64encode(blob).decode(),
                                "lineage": {}, "actor": "bench"})
            devices = [f"sim{i:05d}" for i in range(n)]
            for d in devices:
                client.add_device(d, "generic-x86_64")
            sims = SimProcs(devices, fleet=fleet, broker_url=broker.urls, root_public_key=home.root_public_b64(),
                            state_dir=tmp / f"{kind}-agents", procs=2)
            t0 = time.perf_counter()
            sims.start()
            sims.wait(lambda s: s.total("keyring") == n, 120, "keyring on every agent")
            out = {"connect_s": time.perf_counter() - t0}

            def timed(version: str, action: Any) -> float:
                t = time.perf_counter()
                action()
                sims.wait(lambda s: s.on_version(version) == n, 300, f"every agent on {version}")  # type: ignore[union-attr]
                return time.perf_counter() - t

            out["first_s"] = timed("1", lambda: client.deploy("clf", "1", devices))
            out["deploy_s"] = timed("2", lambda: client.deploy("clf", "2", devices))
            out["rollback_s"] = timed("1", lambda: client.rollback("clf", "1"))
            print(f"  {kind}: {n} agents, deploy {out['deploy_s']:.2f} s, rollback {out['rollback_s']:.2f} s", flush=True)
            return out
        finally:
            if sims is not None:
                sims.stop()
            hub.terminate()
            hub.wait(30)
            log.close()


def _ingest(kind: str, replicas: int, n: int, devices: int, cluster: PgCluster, tmp: Path, path: Path) -> float:
    fleet = "benchfleet"
    tag = f"{kind}{replicas}"
    with Broker(kind, tmp / f"broker-{tag}", fleet) as broker:
        db = cluster.new_database()
        primary = _replica_home(tmp / f"{tag}-primary", broker.urls, fleet, 0)
        primary.update_config(db=db, **broker.hub_config())
        from edgefleet.hub.daemon import Hub

        setup = Hub(primary)  # devices registered in PostgreSQL
        for d in range(devices):
            setup.add_device({"device": f"d{d}"}, "bench")
        setup.db.close()
        homes = _homes(primary, replicas, tmp / tag, db)
        unique = n - n // 20
        with psycopg.connect(db, autocommit=True) as conn:
            def stored() -> int:
                return int(conn.execute("SELECT COUNT(*) FROM telemetry").fetchone()[0])  # type: ignore[index]

            t0, done = _drain(homes, broker.first, path, tmp, unique, stored, tag)
            dup = conn.execute("SELECT COUNT(*) FROM (SELECT device, seq FROM telemetry GROUP BY device, seq "
                               "HAVING COUNT(*) > 1) d").fetchone()[0]  # type: ignore[index]
            assert dup == 0, f"{dup} windows stored twice"
    rate = n / (done - t0)
    print(f"  {kind}: {replicas} replica(s) drained {n} windows at {rate:,.0f} windows/s", flush=True)
    return rate


def run(smoke: bool = False, agents: int | None = None, windows: int | None = None) -> Result:
    n = agents or (20 if smoke else 1000)
    w, devices = (400, 20) if smoke else (windows or 20000, 500)
    res = Result("nats", f"10. A 3-node NATS cluster beside one Mosquitto ({n:,} simulated agents; ingest backlog)",
                 "the same fleet, hub and payloads through one Mosquitto, measured in the same run.")
    raise_nofile(4 * n + 1024)
    data, _x = train_models(small=True)["logistic_regression"]
    conv: dict[str, dict[str, float]] = {}
    rates: dict[tuple[str, int], float] = {}
    cluster = PgCluster()
    cluster.start()
    try:
        with tempfile.TemporaryDirectory() as tmp_s:
            tmp = Path(tmp_s)
            for kind in ("mosquitto", "nats"):
                conv[kind] = _convergence(kind, n, data, tmp)
            path = tmp / "msgs.json"
            path.write_text(json.dumps([(t, p.decode()) for t, p in _payloads("benchfleet", devices, w)]))
            for k in (1, 2):
                for kind in ("mosquitto", "nats"):
                    rates[(kind, k)] = _ingest(kind, k, w, devices, cluster, tmp, path)
    finally:
        cluster.destroy()
    m, s = conv["mosquitto"], conv["nats"]
    for label, key in (("connect, keyring on every agent", "connect_s"), ("first install v1", "first_s"),
                       ("deploy v1→v2 until all active", "deploy_s"), ("fleet rollback v2→v1", "rollback_s")):
        res.add(Row(f"{n:,} devices: {label}", f"{s[key]:.2f} s (NATS, 3 nodes)", f"{m[key]:.2f} s (Mosquitto)",
                    f"{s[key] / m[key]:.2f}×", "", None))
    for k in (1, 2):
        r, b = rates[("nats", k)], rates[("mosquitto", k)]
        res.add(Row(f"ingest, {k} hub replica{'s' if k > 1 else ''} on PostgreSQL", f"{r:,.0f} windows/s (JetStream)",
                    f"{b:,.0f} windows/s (Mosquitto $share)", f"{r / b:.2f}×", "", None))
    res.notes.append(f"Ingest: {w} windows ({w // 20} duplicates) from {devices} devices, published to one node "
                     "while no hub ran; every unique window stored once (a duplicate fails the run).")
    res.figures = {"convergence": conv, "ingest": {f"{kind} x{k}": v for (kind, k), v in rates.items()}}
    return res


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--agents", type=int)
    ap.add_argument("--windows", type=int)
    a = ap.parse_args()
    print(run(a.smoke, a.agents, a.windows).markdown())
