"""Three hub replicas, each with its own home and none shared, on one PostgreSQL, one object store
(moto_server), one Mosquitto, behind a failover load balancer, driving three real agents.

A rollout in progress continues when the controller is SIGKILLed (another replica takes over:
the time is measured and printed), and again when it is SIGSTOPped and resumed later: it then
finds itself deposed and steps down instead of writing. Across both failovers no telemetry
window is lost or counted twice, every decision is in the audit log exactly once, and the chain
verifies."""

from __future__ import annotations

import json
import os
import pickle
import signal
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import psycopg
import pytest
from sklearn.datasets import make_classification
from sklearn.ensemble import RandomForestClassifier

from tests._lb import FailoverLB
from tests.conftest import (
    REPO,
    S3_KEY,
    S3_SECRET,
    Broker,
    Procs,
    free_port,
    http_ok,
    infer_load,
    run_cli,
    wait_for,
)

pytestmark = [pytest.mark.broker, pytest.mark.slow]
CLI = "edgefleet.hub.cli.main"


class Replicas:
    def __init__(self, procs: Procs, homes: list[Path], ports: list[int]) -> None:
        self.procs, self.homes, self.ports = procs, homes, ports
        self.p: list[Any] = [None] * len(homes)
        self.stopped: set[int] = set()

    def start(self, i: int) -> None:
        self.p[i] = self.procs.start(f"hub{i}", CLI, "serve", "--home", str(self.homes[i]), "--replica", f"hub{i}",
                                     "--share", "edgefleet-hub")
        wait_for(lambda: http_ok(f"http://127.0.0.1:{self.ports[i]}/healthz"), 30, f"hub replica {i}")

    def url(self, i: int) -> str:
        return f"http://127.0.0.1:{self.ports[i]}"

    def live(self) -> list[int]:
        return [i for i, p in enumerate(self.p) if p is not None and p.poll() is None and i not in self.stopped]

    def cli(self, *argv: str) -> dict[str, Any]:
        """A CLI call against every live replica at once (--hub URL1,URL2,...)."""
        hubs = ",".join(self.url(i) for i in self.live())
        return dict(json.loads(run_cli(CLI, *argv, "--home", str(self.homes[0]), "--hub", hubs, "--json").stdout))

    def controller(self) -> dict[str, Any]:
        return dict(self.cli("status")["controller"])

    def leader(self) -> int | None:
        """The index of the live replica that says it leads (asked directly)."""
        for i in self.live():
            try:
                st = httpx.get(f"{self.url(i)}/api/v1/status", params={"limit": 1}, timeout=2,
                               headers={"Authorization": f"Bearer {(self.homes[0] / 'admin.token').read_text().strip()}"})
            except httpx.HTTPError:
                continue
            if st.status_code == 200 and st.json()["controller"]["leading"]:
                return i
        return None


def test_a_rollout_survives_the_controller_killed_and_paused(broker: Broker, procs: Procs, fleet: str,
                                                            tmp_path: Path, pg_url: str, s3: str) -> None:
    ports = [free_port() for _ in range(3)]
    lb = FailoverLB(ports)
    primary = tmp_path / "hub0"
    run_cli(CLI, "init", "--home", str(primary), "--fleet", fleet, "--broker", broker.url, "--http",
            f"127.0.0.1:{ports[0]}", "--public-url", lb.url, "--db", pg_url)
    (primary / "s3.env").write_text(f"AWS_ACCESS_KEY_ID={S3_KEY}\nAWS_SECRET_ACCESS_KEY={S3_SECRET}\n")
    with (primary / "hub.toml").open("a") as f:
        f.write(f'blob_store = "s3://fleet/blobs"\ns3_endpoint = "{s3}"\ns3_credentials_file = "s3.env"\n'
                "controller_lease_seconds = 3\n")
    (primary / "rollout.toml").write_text(
        "evaluate_seconds = 0.3\n[policy]\nmin_inferences = 20\nmin_device_windows = 2\nmin_agreement = 0.8\n"
        "step_deadline_seconds = 120\n")
    homes = [primary]
    for i in (1, 2):
        homes.append(tmp_path / f"hub{i}")
        run_cli(CLI, "replica", "init", "--home", str(primary), "--out", str(homes[i]), "--http", f"127.0.0.1:{ports[i]}")
        assert not (homes[i] / "keys" / "root.pem").exists() and not (homes[i] / "hub.db").exists()
    hubs = Replicas(procs, homes, ports)
    for i in range(3):
        hubs.start(i)
    assert hubs.controller()["leader"] is not None

    # unacknowledged windows (those a dead or paused replica took) are re-sent after 5 s, not 30
    profiles = tmp_path / "profiles"
    profiles.mkdir()
    generic = (REPO / "device-profiles" / "generic-x86_64.toml").read_text()
    (profiles / "generic-x86_64.toml").write_text(generic.replace("[telemetry]\n", "[telemetry]\nresend_seconds = 5\n"))
    agents: dict[str, int] = {}
    for dev in ("dev-a", "dev-b", "dev-c"):
        agents[dev] = free_port()
        run_cli(CLI, "device", "add", dev, "--home", str(primary), "--hub", lb.url, "--out", str(tmp_path / dev),
                "--listen", f"127.0.0.1:{agents[dev]}", "--window", "0.5", "--profiles-dir", str(profiles))
        procs.start(f"agent-{dev}", "edgefleet.agent.app.cli", "run", "--config", str(tmp_path / dev / "agent.toml"))

    x, y = make_classification(n_samples=600, n_features=6, n_informative=4, n_redundant=0, n_classes=3,
                               class_sep=2.0, random_state=3)
    x = x.astype(np.float32)
    np.save(tmp_path / "train.npy", x)
    for version, seed in (("1", 0), ("2", 1), ("3", 2)):  # retrained: each agrees with the last
        est = RandomForestClassifier(n_estimators=20, max_depth=8, random_state=seed).fit(x, y)
        (tmp_path / f"v{version}.pkl").write_bytes(pickle.dumps(est))
        run_cli(CLI, "publish", str(tmp_path / f"v{version}.pkl"), "--name", "clf", "--version", version,
                "--reference", str(tmp_path / "train.npy"), "--home", str(primary), "--hub", lb.url)
    hubs.cli("deploy", "clf", "1", *[a for d in agents for a in ("--device", d)])

    def runs(version: str) -> bool:
        return all(d["models"].get("clf") == version for d in hubs.cli("status")["devices"])

    wait_for(lambda: runs("1"), 60, "every agent on clf 1 (blobs through the load balancer and the object store)")

    stop_load = threading.Event()
    loader = infer_load(agents.values, x, stop_load, rows=2, seed=5)  # ~20 requests/s per agent

    def rollout(rid: str) -> dict[str, Any]:
        return dict(hubs.cli("rollout", "status", rid)["rollouts"][0])

    def failover(version: str, how: str) -> float:
        """Start a rollout, wait for its first promotion, take the controller away *how*; the
        seconds until another replica leads."""
        ro = hubs.cli("rollout", "start", "clf", version, "--steps", "34,67,100", "--fraction", "1.0")
        wait_for(lambda: rollout(ro["id"])["step"] >= 1, 90, f"rollout of {version} to pass its first step",
                 interval=0.3)
        old = hubs.leader()
        assert old is not None
        t0 = time.monotonic()
        if how == "kill":
            hubs.p[old].send_signal(signal.SIGKILL)
            hubs.p[old].wait(10)
        else:
            os.kill(hubs.p[old].pid, signal.SIGSTOP)
            hubs.stopped.add(old)

        def other_leads() -> list[int] | None:
            i = hubs.leader()
            return [i] if i is not None and i != old else None  # a list: replica 0 is falsy

        new = wait_for(other_leads, 30, f"another replica to lead after {how}", interval=0.1)[0]  # type: ignore[index]
        took = time.monotonic() - t0
        print(f"controller {how}: replica {new} leads {took:.2f} s after replica {old} was {how}ed")
        if how == "kill":  # systemd restarts it (Restart=always): its queued share of telemetry is delivered
            hubs.start(old)
        try:
            wait_for(lambda: rollout(ro["id"])["state"] == "promoted", 120, f"rollout of {version} to finish",
                     interval=0.3)
        except AssertionError as exc:
            r = rollout(ro["id"])
            raise AssertionError(f"{exc}: {r['state']} at step {r['step']}, {(r.get('decision') or {}).get('reason')}; "
                                 f"controller {hubs.controller()}") from None
        if how == "stop":
            os.kill(hubs.p[old].pid, signal.SIGCONT)
            hubs.stopped.discard(old)
            log = procs.tmp / f"hub{old}.{[p for p, _ in procs.procs].index(hubs.p[old])}.log"
            wait_for(lambda: "is no longer the controller" in log.read_text(), 20,
                     "the paused replica to find itself deposed")
        try:
            wait_for(lambda: runs(version), 60, f"every agent on clf {version}")
        except AssertionError as exc:
            seen = {i: httpx.get(f"{hubs.url(i)}/api/v1/status", timeout=5, headers={
                "Authorization": f"Bearer {(homes[0] / 'admin.token').read_text().strip()}"}).json()
                for i in hubs.live()}
            raise AssertionError(f"{exc}; devices: {[(d['device'], d['models'], d['reported_seq'], d['desired_seq']) for d in seen[hubs.live()[0]]['devices']]}; "
                                 f"counters: {[(i, st['counters']) for i, st in seen.items()]}") from None
        return took

    killed = failover("2", "kill")
    paused = failover("3", "stop")
    assert killed < 5.0, f"takeover after SIGKILL took {killed:.1f} s"
    assert paused < 3 + 5.0, f"takeover after SIGSTOP took {paused:.1f} s (lease 3 s)"
    stop_load.set()
    loader.join(10)

    with psycopg.connect(pg_url) as db:
        def gaps() -> dict[str, tuple[int, int]]:
            rows = db.execute("SELECT device, COUNT(*), MAX(seq) FROM telemetry GROUP BY device").fetchall()
            return {d: (n, m) for d, n, m in rows if n != m}

        # windows a dead or paused replica had taken are re-sent by the agents or delivered on its restart
        wait_for(lambda: not gaps(), 60, "every device's windows 1..last stored, none missing")
        stored = dict(db.execute("SELECT device, COUNT(*) FROM telemetry GROUP BY device").fetchall())
        summed = dict(db.execute("SELECT device, SUM(windows) FROM telemetry_agg WHERE model = 'clf' "
                                 "GROUP BY device").fetchall())
        assert set(stored) == set(agents) and all(stored[d] > 20 for d in agents), stored
        assert all(summed.get(d, 0) <= stored[d] for d in agents), (summed, stored)  # none counted twice
        actions = [(a, json.loads(det).get("rollout"), json.loads(det).get("step")) for a, det in
                   db.execute("SELECT action, details FROM audit WHERE action LIKE 'rollout%' ORDER BY id").fetchall()]
    decisions = [a for a in actions if a[0] in ("rollout_step", "rollout_promote", "rollout_rollback")]
    assert len(decisions) == len(set(decisions)), f"a decision audited twice: {decisions}"
    assert [a[0] for a in decisions].count("rollout_promote") == 2
    assert not any(a[0] == "rollout_rollback" for a in decisions)
    assert hubs.cli("audit", "verify")["ok"] is True
    lb.close()
