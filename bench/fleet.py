"""5. Fleet convergence and ingest: a curve of fleet sizes against a real hub and Mosquitto.

For each size (default 1,000 / 2,000 / 5,000 / 10,000) a fresh hub process (``hub.cli.main
serve``), a fresh Mosquitto and simulated agents split over ``--procs`` simulator processes
(:mod:`bench.simproc`, each a :class:`agent.app.sim.SimFleet` over epoll): each agent its own MQTT
connection, state directory and trust state, the blob cache shared per process. Measured:

* **deploy**: from the admin API ``deploy`` call (v2 to every device, which runs v1) until every
  agent has verified, stored and activated v2;
* **rollback**: from the fleet rollback (``POST /api/v1/rollback`` to v1, the fallback every
  device keeps) until every agent runs v1 again;
* the first install (v1, blob downloaded once per simulator process) for reference;
* **ingest**: every agent closes a telemetry window every 10 s for ``--ingest-seconds``; windows
  stored by the hub (read from its database) beside a bare subscriber on the same stream;
* the admin API's answer times (a status page, every page, devices, ``/metrics``), the hub's and
  the broker's RSS, the database's bytes per window.

Baselines: signed desired states published straight to the broker by one client (no hub database,
no signing) and received by the same simulated fleet, i.e. the floor set by the broker and the
agents' own verify + store work: for the deploy a version no device has seen (as v2 was for the
hub's deploy), for the rollback the return to v1; for ingest, the bare subscriber.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import selectors
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
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
from bench.simproc import SimProcs
from edgefleet.agent.contract.wire import Topics
from edgefleet.hub.adapters.client import HubClient
from edgefleet.hub.adapters.home import HubHome


def _timed(sims: SimProcs, version: str, action: Callable[[], object], timeout: float) -> tuple[float, float]:
    """(seconds until every agent runs ``version``, seconds the action itself took)."""
    t0 = time.perf_counter()
    action()
    t_call = time.perf_counter() - t0
    sims.wait(lambda s: s.on_version(version) == s.n, timeout, f"every agent on {version}")
    return time.perf_counter() - t0, t_call


SIZES = (1000, 2000, 5000, 10000)
WINDOW_EVERY = 10.0  # seconds between one device's telemetry windows


@dataclass
class Size:
    """The figures of one fleet size."""

    n: int
    enrol_s: float = 0.0
    connect_s: float = 0.0
    first_s: float = 0.0
    deploy_s: float = 0.0
    deploy_call_s: float = 0.0
    rollback_s: float = 0.0
    rollback_call_s: float = 0.0
    base_deploy_s: float = 0.0
    base_rollback_s: float = 0.0
    downloads: int = 0
    refused: int = 0
    ingest: dict[str, float] = field(default_factory=dict)
    api: dict[str, float] = field(default_factory=dict)
    hub_rss_mb: float = 0.0
    broker_rss_mb: float = 0.0
    db_bytes_per_window: float = 0.0


def run(smoke: bool = False, n_agents: int | None = None, sizes: tuple[int, ...] | None = None,
        ingest_seconds: float | None = None, procs: int | None = None) -> Result:
    sizes = sizes or ((n_agents,) if n_agents else ((20,) if smoke else SIZES))
    procs = procs or (1 if smoke else 2)
    phase = ingest_seconds or (6.0 if smoke else 40.0)
    label = " / ".join(f"{n:,}" for n in sizes)
    res = Result(
        "fleet", f"5. Fleet convergence and ingest ({label} simulated agents in {procs} process"
                 f"{'es' if procs > 1 else ''}, loopback)",
        "signed desired states published straight to Mosquitto by one MQTT client (no hub: no database, "
        "no signing), received and applied by the same simulated fleet: for the deploy a version no device "
        "has seen yet (as v2 was for the hub's deploy), for the rollback the return to v1, the fallback "
        "every device keeps; for ingest, a "
        "bare subscriber (its own process, `json.loads` only) on the same telemetry stream at the same time.",
    )
    raise_nofile(2 * max(sizes) + 1024)
    data, _x = train_models(small=True)["logistic_regression"]
    curve = [_one(n, data, phase, procs) for n in sizes]
    for z in curve:
        res.add(Row(f"{z.n:,} devices: deploy v1→v2, until all active", f"{z.deploy_s:.2f} s (API call {z.deploy_call_s:.2f} s)",
                    f"{z.base_deploy_s:.2f} s (a never-seen v3)", f"{z.deploy_s / z.base_deploy_s:.2f}×",
                    "≤ 20 s at 10,000" if z.n >= 10_000 else "", None if z.n < 10_000 else z.deploy_s <= 20))
        res.add(Row(f"{z.n:,} devices: fleet rollback v2→v1, until all reverted",
                    f"{z.rollback_s:.2f} s (API call {z.rollback_call_s:.2f} s)", f"{z.base_rollback_s:.2f} s",
                    f"{z.rollback_s / z.base_rollback_s:.2f}×", "", None))
        res.add(Row(f"{z.n:,} devices: first install v1 (blob downloaded once per simulator)", f"{z.first_s:.2f} s",
                    "", "", ""))
        i = z.ingest
        keeps = i["backlog_end"] <= max(0.02 * i["sent"], 2 * i["offered_rate"])
        res.add(Row(f"{z.n:,} devices: telemetry, 1 window / device / {WINDOW_EVERY:.0f} s",
                    f"{i['hub_rate']:,.0f} windows/s stored (offered {i['offered_rate']:,.0f}/s); backlog at the end "
                    f"{i['backlog_end']:,.0f}, drained in {i['drain_s']:.1f} s",
                    f"{i['bare_rate']:,.0f} msgs/s parsed", f"{i['hub_rate'] / max(i['bare_rate'], 1e-9):.2f}× bare",
                    "keeps up with 1,000/s" if z.n >= 10_000 else "", None if z.n < 10_000 else keeps))
    for z in curve:
        a = z.api
        res.notes.append(
            f"{z.n:,} devices: enrolled through the admin API (4 clients at a time) in {z.enrol_s:.1f} s, connected and trusted the "
            f"keyring in {z.connect_s:.2f} s; blob downloads into the shared cache {z.downloads}; refusals "
            f"{z.refused}; windows sent {z.ingest['sent']:,.0f}, stored {z.ingest['stored']:,.0f}; admin API: `status` first page ({a['page_devices']:.0f} devices) "
            f"{a['status_page_s'] * 1000:.0f} ms, every page {a['status_all_s']:.2f} s, `devices` {a['devices_s']:.2f} s, "
            f"`/metrics` {a['metrics_s']:.2f} s ({a['metrics_kb']:,.0f} kB); hub RSS {z.hub_rss_mb:.0f} MiB, Mosquitto RSS "
            f"{z.broker_rss_mb:.0f} MiB; hub database {z.db_bytes_per_window / 1024:.1f} kB per stored window (all tables).")
    res.notes.append("Rollback is `POST /api/v1/rollback` (the fleet rollback): new desired states (higher seq) "
                     "naming v1, which each device keeps as its fallback blob, so no download is involved.")
    res.notes.append(f"Ingest: each agent closes a window every {WINDOW_EVERY:.0f} s (phases spread over the "
                     f"period) for {phase:.0f} s, folded by the real agent code; 'stored' counts windows committed "
                     "to the hub's SQLite (read from its database), 'backlog' what was sent and not yet stored.")
    last = curve[-1]
    res.figures = {"agents": last.n, "deploy_s": last.deploy_s, "rollback_s": last.rollback_s,
                   "first_install_s": last.first_s, "baseline_deploy_s": last.base_deploy_s,
                   "baseline_rollback_s": last.base_rollback_s, "connect_s": last.connect_s,
                   "enrol_s": last.enrol_s, "downloads": last.downloads,
                   "curve": [asdict(z) for z in curve]}
    return res


def _one(n: int, data: bytes, phase: float, procs: int) -> Size:
    z = Size(n)
    print(f"  fleet of {n:,}:", flush=True)
    with tempfile.TemporaryDirectory() as tmp_s, Mosquitto(Path(tmp_s) / "broker") as broker:
        tmp = Path(tmp_s)
        home_dir = tmp / "hub"
        http_port = free_port()
        fleet = "simfleet"
        HubHome(home_dir).init(fleet=fleet, broker_url=broker.url, http_listen=f"127.0.0.1:{http_port}")
        hub_log = (tmp / "hub.log").open("wb")
        hub = subprocess.Popen([sys.executable, "-m", "edgefleet.hub.cli.main", "serve", "--home", str(home_dir)],
                               cwd=REPO, stdout=hub_log, stderr=subprocess.STDOUT)
        sims: SimProcs | None = None
        try:
            home = HubHome(home_dir)
            client = HubClient(f"http://127.0.0.1:{http_port}", home.token(), timeout=600)

            def healthy() -> bool:
                try:
                    client.request("GET", "/healthz")
                    return True
                except Exception:
                    return False

            wait_until(healthy, 30, "hub HTTP", 0.1)
            for v in ("1", "2", "3"):
                blob = data if v == "1" else relabelled(data, f"edgefleet bench v{v}")
                client.publish({"name": "clf", "version": v, "model_b64": base64.b64encode(blob).decode(),
                                "lineage": {}, "actor": "bench"})
            t0 = time.perf_counter()
            devices = [f"sim{i:05d}" for i in range(n)]
            with ThreadPoolExecutor(4) as pool:  # as an operator's script would: a few at a time
                list(pool.map(lambda d: client.add_device(d, "generic-x86_64"), devices))
            z.enrol_s = time.perf_counter() - t0
            sims = SimProcs(devices, fleet=fleet, broker_url=broker.url, root_public_key=home.root_public_b64(),
                            state_dir=tmp / "agents", procs=procs)
            t0 = time.perf_counter()
            sims.start()
            slack = 60 + n / 50
            try:
                sims.wait(lambda s: s.total("keyring") == n, slack, "keyring on every agent")
            except TimeoutError:
                print("refusals:", sims.refusal_samples(), "connected:", sims.total("connected"))
                print((tmp / "hub.log").read_text()[-3000:])
                raise
            z.connect_s = time.perf_counter() - t0

            def deploy(v: str) -> object:
                return lambda: client.deploy("clf", v, devices)

            z.first_s = _timed(sims, "1", deploy("1"), slack * 5)[0]
            z.deploy_s, z.deploy_call_s = _timed(sims, "2", deploy("2"), slack * 5)
            z.rollback_s, z.rollback_call_s = _timed(sims, "1", lambda: client.rollback("clf", "1"), slack * 5)
            print(f"    deploy {z.deploy_s:.2f} s, rollback {z.rollback_s:.2f} s", flush=True)

            # Baseline: the hub's latest signed states for v2, then v1, re-sent by a bare client.
            # Like for like: the hub's deploy brought v2, a blob no device had (each links it from
            # its simulator's cache, checks and commits it); its baseline brings v3, never seen
            # either. (v2 would be unfair: every device keeps it as its fallback by now.) The
            # rollback's baseline returns to v1, kept as the fallback, as the hub's did.
            envs_v3, envs_v1 = _signed_states(home_dir, fleet, devices, [("3", "1"), ("1", "3")])
            z.base_deploy_s = _timed(sims, "3", lambda: _raw_publish(broker.port, envs_v3), slack * 5)[0]
            z.base_rollback_s = _timed(sims, "1", lambda: _raw_publish(broker.port, envs_v1), slack * 5)[0]
            z.refused = sims.total("refused")
            z.downloads = sims.total("downloads")
            z.ingest = _ingest_phase(sims, broker.port, home_dir, Topics(fleet), phase)
            z.api = _api_times(client)
            z.hub_rss_mb = _rss_mb(hub.pid)
            assert broker.proc is not None
            z.broker_rss_mb = _rss_mb(broker.proc.pid)
            db_bytes = sum(f.stat().st_size for f in home_dir.glob("hub.db*"))
            z.db_bytes_per_window = db_bytes / max(1, _stored(home_dir))
        finally:
            if sims is not None:
                sims.stop()
            hub.terminate()
            hub.wait(30)
            hub_log.close()
    return z


def _stored(home_dir: Path) -> int:
    """Telemetry windows stored, as the hub's database says (duplicates are never stored)."""
    import sqlite3

    conn = sqlite3.connect(f"file:{home_dir / 'hub.db'}?mode=ro", uri=True, timeout=30)
    try:
        return int(conn.execute("SELECT COUNT(*) FROM telemetry").fetchone()[0])
    finally:
        conn.close()


def _ingest_phase(sims: SimProcs, port: int, home_dir: Path, topics: Topics, phase: float) -> dict[str, float]:
    before = _stored(home_dir)
    bare = subprocess.Popen([sys.executable, "-m", "bench.fleet", "--bare-subscriber", str(port),
                             topics.all_devices("telemetry"), str(phase)],
                            cwd=REPO, stdout=subprocess.PIPE, text=True)
    assert bare.stdout is not None
    bare.stdout.readline()  # "subscribed"
    sent0 = sims.total("windows")
    sims.command(f"telemetry {WINDOW_EVERY}")
    t0 = time.perf_counter()
    time.sleep(phase)
    sims.command("telemetry off")
    stored_end = _stored(home_dir) - before
    bare_count = float(bare.communicate(timeout=60)[0].split()[-1])
    time.sleep(0.5)  # the simulators' counts of windows are refreshed every 0.25 s
    sent = sims.total("windows") - sent0
    t_end = time.perf_counter()
    stored = stored_end
    while stored < sent and time.perf_counter() < t_end + 120:
        time.sleep(0.2)
        stored = _stored(home_dir) - before
    return {"sent": float(sent), "stored": float(stored), "stored_end": float(stored_end),
            "backlog_end": float(max(0, sent - stored_end)), "drain_s": time.perf_counter() - t_end,
            "seconds": t_end - t0, "offered_rate": sent / phase, "hub_rate": stored_end / phase,
            "bare_rate": bare_count / phase}


def _api_times(client: HubClient) -> dict[str, float]:
    out: dict[str, float] = {}
    t0 = time.perf_counter()
    page = client.request("GET", "/api/v1/status", params={"limit": 100})
    out["status_page_s"] = time.perf_counter() - t0
    out["page_devices"] = float(len(page["devices"]))
    t0 = time.perf_counter()
    client.status()
    out["status_all_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    client.devices()
    out["devices_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    text = client.metrics()
    out["metrics_s"] = time.perf_counter() - t0
    out["metrics_kb"] = len(text) / 1024
    return out


def _rss_mb(pid: int) -> float:
    import psutil

    return float(psutil.Process(pid).memory_info().rss / 2**20)


def _signed_states(home_dir: Path, fleet: str, devices: list[str],
                   plan: list[tuple[str, str]]) -> list[list[tuple[str, bytes]]]:
    """For each ``(version, fallback)`` of ``plan``, in order, a fresh desired state per device
    naming that version, signed with the hub's key, with seqs above the hub's last."""
    import json
    import sqlite3

    from edgefleet.agent.contract.wire import ModelEntry
    from edgefleet.hub.core.desired import build_desired

    key = HubHome(home_dir).signing_key()
    conn = sqlite3.connect(home_dir / "hub.db")
    conn.row_factory = sqlite3.Row
    try:
        models = {r["version"]: r for r in conn.execute("SELECT * FROM models WHERE name='clf'")}
        rows = {r["device"]: (r["seq"], json.loads(r["envelope"]))
                for r in conn.execute("SELECT device, seq, envelope FROM desired")}
    finally:
        conn.close()
    topics = Topics(fleet)
    out: list[list[tuple[str, bytes]]] = [[] for _ in plan]
    now = time.time()
    for d in devices:
        seq, env = rows[d]
        current = ModelEntry.from_dict(json.loads(base64.b64decode(env["payload"]))["models"]["clf"])
        base_url = current.url.rsplit("/", 1)[0]
        for i, (version, fallback) in enumerate(plan):
            m = models[version]
            entry = ModelEntry(version=version, sha256=m["sha256"], size=m["size"],
                               url=f"{base_url}/{m['sha256']}", fallback=fallback)
            _s, raw = build_desired(fleet=fleet, device=d, seq=seq + 1 + i, now=now, ttl=3600,
                                    models={"clf": entry}, signing_key=key)
            out[i].append((topics.desired(d), raw))
    return out


def _raw_publish(port: int, msgs: list[tuple[str, bytes]], timeout: float = 120) -> None:
    """Publish ``msgs`` (QoS 1, retained) from one client and return once the broker acked all.

    Driven by an epoll selector, not paho's ``loop_start``: that loop uses ``select()``, which
    fails on descriptors above 1,023, and this process holds one socket per simulated agent (the
    cliff above 1,000 agents of issue 22 was this baseline client's thread dying on it)."""
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv311)
    c.max_inflight_messages_set(1000)
    c.max_queued_messages_set(0)
    acked = [0]

    def on_publish(*_a: object) -> None:
        acked[0] += 1

    c.on_publish = on_publish
    c.connect("127.0.0.1", port)
    sel = selectors.DefaultSelector()
    sock = c.socket()
    assert sock is not None
    sel.register(sock, selectors.EVENT_READ)
    for t, p in msgs:
        c.publish(t, p, qos=1, retain=True)
    deadline = time.monotonic() + timeout
    try:
        while acked[0] < len(msgs):
            if time.monotonic() > deadline:
                raise TimeoutError(f"{acked[0]}/{len(msgs)} publishes acknowledged in {timeout}s")
            if sel.select(timeout=0.01):
                c.loop_read(100)
            if c.want_write():
                c.loop_write()
            c.loop_misc()
        c.disconnect()
        c.loop_write()
    finally:
        sel.close()
        with contextlib.suppress(Exception):
            sock.close()


def _bare_subscriber(port: int, topic: str, seconds: float) -> None:
    """Its own process (few descriptors: paho's own loop is fine here): count and parse every
    message on ``topic`` for ``seconds``, print the count."""
    import json

    count = [0]

    def on_message(_c: object, _u: object, msg: mqtt.MQTTMessage) -> None:
        json.loads(msg.payload)
        count[0] += 1

    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv311)
    c.on_message = on_message
    c.connect("127.0.0.1", port)
    c.subscribe(topic, qos=1)
    c.loop_start()
    time.sleep(0.5)
    print("subscribed", flush=True)
    time.sleep(seconds)
    c.loop_stop()
    print(count[0], flush=True)


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--agents", type=int, help="one fleet size")
    ap.add_argument("--sizes", help=f"comma-separated fleet sizes (default {','.join(map(str, SIZES))})")
    ap.add_argument("--ingest-seconds", type=float)
    ap.add_argument("--procs", type=int, help="simulator processes (default 2; 1 with --smoke)")
    ap.add_argument("--bare-subscriber", nargs=3, metavar=("PORT", "TOPIC", "SECONDS"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.bare_subscriber:
        _bare_subscriber(int(a.bare_subscriber[0]), a.bare_subscriber[1], float(a.bare_subscriber[2]))
    else:
        r = run(a.smoke, a.agents, tuple(int(x) for x in a.sizes.split(",")) if a.sizes else None, a.ingest_seconds,
                a.procs)
        print(r.markdown())
