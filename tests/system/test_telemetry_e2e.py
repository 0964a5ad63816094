"""Telemetry end to end on real parts: store-and-forward through a broker outage, a kill -9 while
offline, spool overflow accounting, drift alarms with the on_drift hook, and /metrics.

One hub and one persistent Mosquitto per module; agents use 0.5 s windows. Two model names on the
same ONNX bytes keep the drift device's fleet-wide scores apart from the outage devices' traffic.
Tests run in file order: drift first (needs a steady broker), then the outage, then /metrics.
"""

from __future__ import annotations

import contextlib
import getpass
import json
import pickle
import signal
import sqlite3
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families
from sklearn.datasets import make_classification
from sklearn.linear_model import LogisticRegression

from edgefleet.agent.contract.wire import Topics, parse_time
from tests.conftest import Broker, Procs, free_port, http_ok, retained, run_cli, wait_for

pytestmark = [pytest.mark.broker, pytest.mark.slow]

WINDOW = 0.5
HOOK = """
import json, os, sys
keys = ("EDGEFLEET_MODEL", "EDGEFLEET_VERSION", "EDGEFLEET_FEATURES", "EDGEFLEET_SCORES", "EDGEFLEET_FLEET")
with open(sys.argv[1], "a") as f:
    f.write(json.dumps({k: os.environ.get(k) for k in keys}) + "\\n")
"""


class PersistentBroker(Broker):
    """Mosquitto that keeps sessions and queued messages across a restart, as deploy/ configures."""

    def __init__(self, workdir: Path) -> None:
        super().__init__(workdir)
        data = workdir / "mosquitto-data"
        data.mkdir()
        self.conf.write_text(
            f"listener {self.port} 127.0.0.1\nallow_anonymous true\npersistence true\n"
            f"persistence_location {data}/\nautosave_interval 1\nmax_queued_messages 100000\n"
            # mosquitto started as root drops to user "mosquitto", which cannot write our tmp dir
            f"user {getpass.getuser()}\n"
            "max_inflight_messages 0\n"
        )


@dataclass
class Env:
    tmp: Path
    home: Path
    fleet: str
    http: str
    broker: PersistentBroker
    procs: Procs
    X: np.ndarray
    hook_out: Path
    metrics: str  # the metrics_listen URL
    hub_proc: Any = None
    agents: dict[str, dict[str, Any]] = field(default_factory=dict)
    shift: dict[str, float] = field(default_factory=dict)  # device -> shift added to feature 2
    traffic: set[str] = field(default_factory=set)

    def add_agent(self, dev: str, model: str, spool_mb: float | None = None, resend_seconds: float | None = None) -> None:
        port = free_port()
        out = self.tmp / dev
        run_cli("edgefleet.hub.cli.main", "device", "add", dev, "--home", str(self.home), "--out", str(out),
                "--listen", f"127.0.0.1:{port}", "--window", str(WINDOW))
        if spool_mb is not None:
            with (out / "agent.toml").open("a") as f:
                f.write(f"spool_mb = {spool_mb}\n")  # lands in [overrides.telemetry]
        if resend_seconds is not None:
            with (out / "agent.toml").open("a") as f:
                f.write(f"resend_seconds = {resend_seconds}\n")
        self.agents[dev] = {"port": port, "config": out / "agent.toml", "spool": out / "state" / "spool",
                            "model": model}
        self.start_agent(dev)

    def start_agent(self, dev: str) -> None:
        self.agents[dev]["proc"] = self.procs.start(f"agent-{dev}", "edgefleet.agent.app.cli", "run", "--config",
                                                    str(self.agents[dev]["config"]))

    def api(self, path: str) -> Any:
        token = (self.home / "admin.token").read_text().strip()
        r = httpx.get(self.http + path, headers={"Authorization": f"Bearer {token}"}, timeout=10)
        assert r.status_code == 200, r.text
        return r.json() if path.startswith("/api") else r.text

    def db(self, sql: str, *args: Any) -> list[tuple[Any, ...]]:
        conn = sqlite3.connect(f"file:{self.home / 'hub.db'}?mode=ro", uri=True, timeout=5)
        try:
            return list(conn.execute(sql, args).fetchall())
        finally:
            conn.close()

    def seqs(self, dev: str) -> list[int]:
        return [r[0] for r in self.db("SELECT seq FROM telemetry WHERE device=? ORDER BY seq", dev)]

    def last_metrics(self, dev: str) -> dict[str, Any]:
        rows = self.db("SELECT metrics FROM telemetry WHERE device=? ORDER BY seq DESC LIMIT 1", dev)
        return json.loads(rows[0][0]) if rows else {}

    def active(self, dev: str) -> bool:
        for d in self.api("/api/v1/status")["devices"]:
            if d["device"] == dev:
                return bool(d["models"].get(self.agents[dev]["model"]) == "1.0.0")
        return False


def _traffic(env: Env, stop: threading.Event) -> None:
    rng = np.random.default_rng(11)
    with httpx.Client(timeout=5) as client:
        while not stop.is_set():
            for dev in sorted(env.traffic):
                a = env.agents[dev]
                rows = env.X[rng.integers(0, len(env.X), 20)].copy()
                rows[:, 2] += env.shift.get(dev, 0.0)
                body = {"inputs": [{"name": "input", "shape": list(rows.shape), "datatype": "FP32",
                                    "data": rows.reshape(-1).tolist()}]}
                with contextlib.suppress(httpx.HTTPError):  # an agent being killed and restarted
                    client.post(f"http://127.0.0.1:{a['port']}/v2/models/{a['model']}/infer", json=body)
            stop.wait(0.04)


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    tmp = tmp_path_factory.mktemp("telemetry")
    broker = PersistentBroker(tmp)
    broker.start()
    procs = Procs(tmp)
    fleet = f"tel{int(time.time() * 1000) % 10**9}"
    home = tmp / "hub"
    http_port = free_port()
    run_cli("edgefleet.hub.cli.main", "init", "--home", str(home), "--fleet", fleet, "--broker", broker.url,
            "--http", f"127.0.0.1:{http_port}")
    metrics_port = free_port()
    with (home / "hub.toml").open("a") as f:
        f.write(f'metrics_listen = "127.0.0.1:{metrics_port}"\n')  # Prometheus without a token
    (tmp / "hook.py").write_text(HOOK)
    hook_out = tmp / "hook.jsonl"
    hook_cmd = f"{sys.executable} {tmp / 'hook.py'} {hook_out}"
    (home / "drift.toml").write_text(
        f"window_seconds = 1.5\nbucket_seconds = {WINDOW}\nevaluate_seconds = 0\nmin_rows = 100\n\n[models.drift]\n"
        f"on_drift = \"hook\"\nhook = {json.dumps(hook_cmd)}\n")
    hub_proc = procs.start("hub", "edgefleet.hub.cli.main", "serve", "--home", str(home))
    X, y = make_classification(n_samples=2000, n_features=6, n_informative=4, random_state=5)
    X = X.astype(np.float32)
    (tmp / "model.pkl").write_bytes(pickle.dumps(LogisticRegression(max_iter=500).fit(X, y)))
    np.save(tmp / "train.npy", X)
    e = Env(tmp=tmp, home=home, fleet=fleet, http=f"http://127.0.0.1:{http_port}", broker=broker,
            procs=procs, X=X, hook_out=hook_out, metrics=f"http://127.0.0.1:{metrics_port}/metrics",
            hub_proc=hub_proc)
    stop = threading.Event()
    pump = threading.Thread(target=_traffic, args=(e, stop), daemon=True)
    try:
        wait_for(lambda: http_ok(e.http + "/healthz"), 20, "hub HTTP")
        for model in ("clf", "drift"):
            run_cli("edgefleet.hub.cli.main", "publish", "--home", str(home), "--name", model, "--version", "1.0.0",
                    str(tmp / "model.pkl"), "--reference", str(tmp / "train.npy"))
        pump.start()
        yield e
    except BaseException:
        print(procs.logs())
        raise
    finally:
        stop.set()
        pump.join(5)
        procs.stop_all()
        broker.stop()


def _deploy(env: Env, model: str, *devs: str) -> None:
    argv = ["edgefleet.hub.cli.main", "deploy", "--home", str(env.home), model, "1.0.0"]
    for d in devs:
        argv += ["--device", d]
    run_cli(*argv)
    wait_for(lambda: all(env.active(d) for d in devs), 40, f"{devs} to run {model} 1.0.0")


def _drift_alarms(env: Env) -> list[dict[str, Any]]:
    rows = env.db("SELECT details FROM audit WHERE action='drift_alarm' ORDER BY id")
    return [json.loads(r[0]) for r in rows]


def test_training_traffic_never_alarms_and_a_shifted_feature_alarms_within_two_windows(env: Env) -> None:
    env.add_agent("d-drift", "drift")
    _deploy(env, "drift", "d-drift")
    env.traffic.add("d-drift")
    start = len(env.seqs("d-drift"))
    wait_for(lambda: len(env.seqs("d-drift")) >= start + 20, 40, "20 windows of training-like traffic")
    assert _drift_alarms(env) == []
    assert not env.hook_out.exists()
    fleet = next(r for r in env.api("/api/v1/drift?model=drift")["reports"] if r["scope"] == "fleet")
    assert fleet["state"] == "ok", fleet

    switched = time.time()
    env.shift["d-drift"] = 6.0
    alarms = wait_for(lambda: _drift_alarms(env), 20, "a drift alarm")
    alarm = alarms[0]
    assert alarm["model"] == "drift"
    inputs_named = [f for f in alarm["features"] if f != "output"]
    assert inputs_named == ["f2"], alarm
    # Windows ending after the switch, up to the data the alarm was computed on: the one that
    # straddles the switch plus at most two full ones.
    alarm_end = parse_time(alarm["window_end"])
    late = env.db("SELECT COUNT(*) FROM telemetry WHERE device='d-drift' AND window_end > ? AND window_end <= ?",
                  switched, alarm_end)[0][0]
    assert late <= 3, f"alarm came after {late} windows with shifted data"

    wait_for(env.hook_out.exists, 15, "the on_drift hook to run")
    table = run_cli("edgefleet.hub.cli.main", "drift", "--home", str(env.home), "--model", "drift").stdout
    f2_row = next(line for line in table.splitlines() if " f2 " in line and "fleet" in line)
    assert f2_row.split()[-1] == "alarm", table
    n = len(env.seqs("d-drift"))
    wait_for(lambda: len(env.seqs("d-drift")) >= n + 4, 20, "more shifted windows")
    lines = env.hook_out.read_text().splitlines()
    assert len(lines) == 1, lines  # once per alarm, not once per window
    hook_env = json.loads(lines[0])
    assert hook_env["EDGEFLEET_MODEL"] == "drift"
    assert hook_env["EDGEFLEET_VERSION"] == "1.0.0"
    assert hook_env["EDGEFLEET_FLEET"] == env.fleet
    assert "f2" in hook_env["EDGEFLEET_FEATURES"].split(",")
    assert json.loads(hook_env["EDGEFLEET_SCORES"])["f2"] >= 0.25
    assert len(_drift_alarms(env)) == 1
    last = json.loads(retained(env.broker, f"{Topics(env.fleet).alerts}/drift"))
    assert last["kind"] == "edgefleet.alert/v1"
    assert last["state"] == "alarm" and "f2" in last["features"]
    env.traffic.discard("d-drift")


def test_outage_kill_and_overflow_every_window_once_or_counted_as_dropped(env: Env) -> None:
    env.add_agent("d-out", "clf")
    env.add_agent("d-kill", "clf")
    env.add_agent("d-small", "clf", spool_mb=0.004)  # ~4 KiB: two or three windows
    _deploy(env, "clf", "d-out", "d-kill", "d-small")
    env.traffic |= {"d-out", "d-kill", "d-small"}
    wait_for(lambda: all(len(env.seqs(d)) >= 2 for d in ("d-out", "d-kill", "d-small")), 20, "windows before the outage")

    env.broker.stop()
    spool = env.agents["d-kill"]["spool"]
    wait_for(lambda: len(list(spool.glob("*.json"))) >= 3, 10, "d-kill to spool windows while offline")
    proc = env.agents["d-kill"]["proc"]
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)
    spooled_at_kill = sorted(int(p.stem) for p in spool.glob("*.json"))
    env.start_agent("d-kill")
    small = env.agents["d-small"]["spool"] / "dropped"
    wait_for(lambda: small.exists() and int(small.read_text()) >= 3, 20, "d-small's spool to overflow")
    time.sleep(WINDOW * 2)  # let d-kill, restarted, add windows of its own to the spool
    env.broker.start()

    for dev in ("d-out", "d-kill"):
        def complete(dev: str = dev) -> bool | str:
            s = env.seqs(dev)
            if s and s == list(range(1, s[-1] + 1)) and s[-1] >= spooled_at_kill[-1] + 3:
                return True
            print(dev, "missing", sorted(set(range(1, (s or [0])[-1] + 1)) - set(s)), "last", s[-1:], spooled_at_kill)
            return False
        wait_for(complete, 45, f"{dev}'s windows, all of them, after the outage")
        count, distinct, top = env.db("SELECT COUNT(*), COUNT(DISTINCT seq), MAX(seq) FROM telemetry "
                                      "WHERE device=?", dev)[0]
        assert count == distinct == top
    assert set(spooled_at_kill) <= set(env.seqs("d-kill"))

    def settled() -> tuple[int, int] | None:
        s = env.seqs("d-small")
        missing = len(set(range(1, s[-1] + 1)) - set(s))
        reported = int(env.last_metrics("d-small").get("spool_dropped_total", -1))
        return (missing, reported) if missing == reported and reported > 0 else None

    missing, reported = wait_for(settled, 30, "d-small's drop counter to match its lost windows")  # type: ignore[misc]
    assert missing == reported == int(small.read_text())


def test_metrics_endpoint_parses_as_prometheus_text(env: Env) -> None:
    assert httpx.get(env.http + "/metrics", timeout=10).status_code == 401  # the admin port needs a token
    assert "edgefleet_devices" in env.api("/metrics")  # with a token it does
    text = httpx.get(env.metrics, timeout=10).text  # metrics_listen: no token
    families = {f.name: f for f in text_string_to_metric_families(text)}
    windows = {s.labels["device"]: s.value for s in families["edgefleet_device_windows"].samples
               if s.name == "edgefleet_device_windows_total"}
    for dev in ("d-out", "d-kill"):
        assert windows[dev] >= len(env.seqs(dev)) - 2  # windows keep coming in
    psi = [s for s in families["edgefleet_drift_psi"].samples if s.labels["model"] == "clf"]
    assert {s.labels["feature"] for s in psi} >= {"f0", "f5"}  # outage devices still serve traffic
    assert {s.labels["scope"] for s in psi} >= {"fleet", "device:d-out"}
    online = {s.labels["device"]: s.value for s in families["edgefleet_device_online"].samples}
    assert online["d-out"] == 1.0



# Last in the module: it kills the broker under every agent of the shared env, and the others'
# windows then wait for their reconnect and re-send (30 s) before the drift sums see them.
def test_windows_the_broker_lost_after_acknowledging_them_are_sent_again_until_the_hub_has_them(env: Env) -> None:
    """The broker's PUBACK is not delivery: with the hub stopped, the broker takes windows and then
    dies with them (kill -9, its persistence wiped). The agent keeps them spooled until the hub's
    own acknowledgement (wire.TelemetryAck) and sends them again; every one is stored, once."""
    env.add_agent("d-ack", "clf", resend_seconds=1.0)
    _deploy(env, "clf", "d-ack")
    env.traffic |= {"d-ack"}
    spool = env.agents["d-ack"]["spool"]
    wait_for(lambda: len(env.seqs("d-ack")) >= 2 and not list(spool.glob("*.json")), 20,
             "d-ack's first windows stored and acknowledged by the hub")
    before = env.seqs("d-ack")[-1]
    env.hub_proc.send_signal(signal.SIGSTOP)  # the broker queues for the hub's session
    try:
        time.sleep(WINDOW * 6)
        wait_for(lambda: len(list(spool.glob("*.json"))) >= 3, 10, "windows the hub has not acknowledged")
        assert env.broker.proc is not None
        env.broker.proc.kill()
        env.broker.proc.wait(10)
        for f in (env.tmp / "mosquitto-data").iterdir():
            f.unlink()  # the crash took what the broker had not saved
        env.broker.start()
    finally:
        env.hub_proc.send_signal(signal.SIGCONT)
    sent = max(int(p.stem) for p in spool.glob("*.json"))
    assert sent > before + 2

    def complete() -> bool:
        s = env.seqs("d-ack")
        return s[-1] >= sent and s == list(range(1, s[-1] + 1))

    wait_for(complete, 40, "every d-ack window stored after the broker lost some")
    count, distinct = env.db("SELECT COUNT(*), COUNT(DISTINCT seq) FROM telemetry WHERE device='d-ack'")[0]
    assert count == distinct
    wait_for(lambda: len(list(spool.glob("*.json"))) <= 2, 20, "d-ack's spool to drain on the hub's acks")
