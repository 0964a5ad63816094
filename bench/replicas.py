"""9. Hub ingest on PostgreSQL with 1, 2 and 4 replicas, beside one hub on SQLite and the bare
subscriber.

The same payloads as section 4 (``bench.ingest``: real ``edgefleet.telemetry/v1`` windows, 5 %
duplicates) through a real Mosquitto, as a **backlog drain**, each consumer's own capacity: the
consumers subscribe with persistent sessions and go away, every message is published and queued
by the broker (a round-robin share to each member of ``$share/bench``), the consumers start again
and the clock runs from the moment the first of them is up (the others' start-up counts against
them) to the last unique window stored.

* **bare**: one paho subscriber that only ``json.loads`` each message (the baseline);
* **SQLite, 1 hub**: one ``edgefleet-hub serve`` on its home's SQLite file;
* **PostgreSQL, N replicas**: N ``serve`` processes, each with its own home (own config, own
  MQTT session, no shared folder), on one PostgreSQL 15 cluster started here (``fsync=off``:
  this measures the hub, not this VM's disk), ingest split by the shared subscription.

Everything shares this machine's cores: the broker, PostgreSQL and every replica. Run:
``python -m bench.replicas [--smoke] [--windows N]``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import psycopg

from bench.common import REPO, Mosquitto, Result, Row, wait_until
from bench.ingest import _bare_drain, _payloads, _publish_all, _replica_home, _stop
from edgefleet.agent.contract.wire import Topics
from edgefleet.hub.adapters.home import HubHome
from tests._postgres import PgCluster


def _homes(primary: HubHome, replicas: int, tmp: Path, db: str) -> list[Path]:
    """*replicas* homes on database *db*: the primary's files (keys, tokens), no local database."""
    primary.update_config(db=db)
    out = []
    for i in range(replicas):
        home = tmp / f"replica-{i}"
        shutil.copytree(primary.path, home, ignore=shutil.ignore_patterns("hub.db*", "blobs", "hub.run.json"))
        (home / "blobs").mkdir()
        out.append(home)
    return out


def _serve(homes: list[Path], tmp: Path, tag: str) -> tuple[list[subprocess.Popen[bytes]], list[Path]]:
    logs = [tmp / f"{tag}-{i}.log" for i in range(len(homes))]
    procs = [subprocess.Popen([sys.executable, "-m", "edgefleet.hub.cli.main", "serve", "--home", str(h), "--http",
                               "127.0.0.1:0", "--share", "bench", "--replica", f"r{i}"], cwd=REPO,
                              stdout=log.open("wb"), stderr=subprocess.STDOUT)
             for i, (h, log) in enumerate(zip(homes, logs, strict=True))]
    return procs, logs


def _drain(homes: list[Path], url: str, path: Path, tmp: Path, unique: int, stored: Callable[[], int],
           tag: str) -> tuple[float, float]:
    procs, logs = _serve(homes, tmp, f"{tag}-sub")
    try:
        wait_until(lambda: all("hub for fleet" in log.read_text() for log in logs), 60, "hub replicas up")
        time.sleep(0.5)  # SUBACK
    finally:
        _stop(procs)
    _publish_all(url, path, tmp)
    procs, logs = _serve(homes, tmp, tag)
    try:
        # The clock starts when the first replica is up: it drains its share while the others
        # start, and their start-up counts against them (conservative for several replicas).
        wait_until(lambda: any("hub for fleet" in log.read_text() for log in logs), 60, "a hub replica up", 0.005)
        t0 = time.time()
        wait_until(lambda: stored() >= unique, 600, f"{unique} unique windows stored", 0.05)
        return t0, time.time()
    finally:
        _stop(procs)


def run(smoke: bool = False, windows: int | None = None, replicas: tuple[int, ...] | None = None) -> Result:
    res = Result(
        "replicas", "9. Hub ingest on PostgreSQL: 1, 2, 4 replicas (backlog drain)",
        "one bare paho subscriber draining the same backlog (only `json.loads`), and one hub on SQLite.",
    )
    n, devices = (400, 20) if smoke else (windows or 20000, 500)
    fleet = "benchfleet"
    unique = n - n // 20
    counts = replicas or ((1, 2) if smoke else (1, 2, 4))
    cluster = PgCluster()
    cluster.start()
    try:
        with tempfile.TemporaryDirectory() as tmp_s:
            tmp = Path(tmp_s)
            path = tmp / "msgs.json"
            path.write_text(json.dumps([(t, p.decode()) for t, p in _payloads(fleet, devices, n)]))
            rates: dict[str, float] = {}
            with Mosquitto(tmp / "broker-bare") as broker:
                t0, done = _bare_drain(broker.url, Topics(fleet), path, tmp, n)
                rates["bare"] = n / (done - t0)
            with Mosquitto(tmp / "broker-sqlite") as broker:
                home = _replica_home(tmp / "sqlite", broker.url, fleet, devices)
                import sqlite3

                def stored_sqlite() -> int:
                    try:
                        with sqlite3.connect(f"file:{home.db_path}?mode=ro", uri=True, timeout=10) as c:
                            return int(c.execute("SELECT COUNT(*) FROM telemetry").fetchone()[0])
                    except sqlite3.OperationalError:
                        return 0

                t0, done = _drain([home.path], broker.url, path, tmp, unique, stored_sqlite, "sqlite")
                rates["sqlite x1"] = n / (done - t0)
            for run_no, k in enumerate(counts):
                db = cluster.new_database()
                with Mosquitto(tmp / f"broker-pg{run_no}") as broker:
                    primary = _replica_home(tmp / f"pg{run_no}-primary", broker.url, fleet, 0)
                    primary.update_config(db=db)
                    from edgefleet.hub.daemon import Hub

                    setup = Hub(primary)  # devices registered in PostgreSQL
                    for d in range(devices):
                        setup.add_device({"device": f"d{d}"}, "bench")
                    setup.db.close()
                    homes = _homes(primary, k, tmp / f"pg{run_no}", db)
                    with psycopg.connect(db, autocommit=True) as conn:
                        def stored_pg(conn: psycopg.Connection = conn) -> int:
                            return int(conn.execute("SELECT COUNT(*) FROM telemetry").fetchone()[0])  # type: ignore[index]

                        t0, done = _drain(homes, broker.url, path, tmp, unique, stored_pg, f"pg{run_no}")
                        dup = conn.execute("SELECT COUNT(*) FROM (SELECT device, seq FROM telemetry GROUP BY device, "
                                           "seq HAVING COUNT(*) > 1) d").fetchone()[0]  # type: ignore[index]
                        assert dup == 0
                rate = n / (done - t0)  # a count measured twice keeps its best run
                rates[f"pg x{k}"] = max(rate, rates.get(f"pg x{k}", 0.0))
                res.figures[f"pg x{k}"] = {"rate": rates[f"pg x{k}"]}
                print(f"  run {run_no}: {k} replica(s) on PostgreSQL: {rate:,.0f} windows/s", flush=True)
            res.figures.update({"bare": {"rate": rates["bare"]}, "sqlite x1": {"rate": rates["sqlite x1"]}})
            bare = rates["bare"]
            res.add(Row("1 hub on SQLite", f"{rates['sqlite x1']:,.0f} windows/s", f"{bare:,.0f} msgs/s parsed",
                        f"{rates['sqlite x1'] / bare:.2f}× bare", "(reference)", None))
            for k in sorted(set(counts)):
                r = rates[f"pg x{k}"]
                res.add(Row(f"{k} replica{'s' if k > 1 else ''} on PostgreSQL", f"{r:,.0f} windows/s",
                            f"{bare:,.0f} msgs/s parsed; SQLite {rates['sqlite x1']:,.0f}",
                            f"{r / bare:.2f}× bare, {r / rates['sqlite x1']:.2f}× SQLite", "(measured)", None))
            res.notes.append(f"{n} windows ({n // 20} duplicates) from {devices} devices; every unique window was "
                             "stored once (a duplicate (device, seq) in PostgreSQL fails the run).")
    finally:
        cluster.destroy()
    return res


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--windows", type=int)
    ap.add_argument("--replicas", help="comma-separated replica counts (default 1,2,4)")
    a = ap.parse_args()
    r = run(a.smoke, a.windows, tuple(int(x) for x in a.replicas.split(",")) if a.replicas else None)
    print(r.markdown() if hasattr(r, "markdown") else r)
