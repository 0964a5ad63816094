"""A regressor end to end: a scikit-learn LinearRegression published with a table reference,
deployed to a real agent and served through OIP v2. Its continuous output gets a histogram on
reference bins (``output.value``); training-like traffic raises no alarm, and shifting the
input column the prediction depends on raises one naming that column and the output."""

from __future__ import annotations

import contextlib
import json
import pickle
import sqlite3
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from sklearn.linear_model import LinearRegression

from tests.conftest import Broker, Procs, free_port, http_ok, run_cli, wait_for

pytestmark = [pytest.mark.broker, pytest.mark.slow]
CLI = "edgefleet.hub.cli.main"


def test_a_regressors_output_has_a_reference_and_drifts_with_its_input(tmp_path: Path, procs: Procs) -> None:
    (tmp_path / "broker").mkdir()
    broker = Broker(tmp_path / "broker")
    broker.start()
    home, port = tmp_path / "hub", free_port()
    h = ("--home", str(home))
    run_cli(CLI, "init", *h, "--fleet", "reg", "--broker", broker.url, "--http", f"127.0.0.1:{port}")
    (home / "drift.toml").write_text("window_seconds = 6\nbucket_seconds = 0.5\nevaluate_seconds = 0\nmin_rows = 300\n")
    stop = threading.Event()
    shift = [0.0]
    try:
        procs.start("hub", CLI, "serve", *h)
        base = f"http://127.0.0.1:{port}"
        wait_for(lambda: http_ok(f"{base}/healthz"), 30, "hub HTTP")
        rng = np.random.default_rng(1)
        x = rng.normal(size=(800, 3)).astype(np.float32)
        y = 3.0 * x[:, 1] + 0.1 * rng.normal(size=800)
        (tmp_path / "reg.pkl").write_bytes(pickle.dumps(LinearRegression().fit(x, y)))
        np.save(tmp_path / "train.npy", x)
        run_cli(CLI, "publish", str(tmp_path / "reg.pkl"), "--name", "reg", "--version", "1",
                "--reference", str(tmp_path / "train.npy"), *h)
        auth = {"Authorization": f"Bearer {(home / 'admin.token').read_text().strip()}"}
        ref = httpx.get(f"{base}/api/v1/models/reg", headers=auth, timeout=10).json()["reference"]
        assert [t["name"] for t in ref["tensors"]] == ["output.value"]
        agent_port = free_port()
        run_cli(CLI, "device", "add", "pump-1", *h, "--out", str(tmp_path / "pump-1"), "--listen",
                f"127.0.0.1:{agent_port}", "--window", "0.5")
        procs.start("agent", "edgefleet.agent.app.cli", "run", "--config", str(tmp_path / "pump-1" / "agent.toml"))
        run_cli(CLI, "deploy", "reg", "1", "--device", "pump-1", "--wait", "--timeout", "60", *h)

        def traffic() -> None:
            r = np.random.default_rng(2)
            with httpx.Client(timeout=5) as c:
                while not stop.is_set():
                    rows = r.normal(size=(8, 3))
                    rows[:, 1] += shift[0]
                    body = {"inputs": [{"name": "input", "shape": [8, 3], "datatype": "FP32",
                                        "data": rows.reshape(-1).tolist()}]}
                    with contextlib.suppress(httpx.HTTPError):
                        c.post(f"http://127.0.0.1:{agent_port}/v2/models/reg/infer", json=body)
                    stop.wait(0.02)

        def alarms() -> list[dict[str, object]]:
            db = sqlite3.connect(f"file:{home / 'hub.db'}?mode=ro", uri=True, timeout=10)
            try:
                return [json.loads(r[0]) for r in db.execute(
                    "SELECT details FROM audit WHERE action='drift_alarm' ORDER BY id").fetchall()]
            finally:
                db.close()

        def view() -> dict[str, object]:
            r = httpx.get(f"{base}/api/v1/drift/view?model=reg", headers=auth, timeout=10)
            return dict(r.json()) if r.status_code == 200 else {}

        pump = threading.Thread(target=traffic, daemon=True)
        pump.start()
        wait_for(lambda: any(f["name"] == "output.value" and sum(f["live"]) > 300
                             for f in view().get("features", [])), 40, "the output's histogram at the hub")  # type: ignore[attr-defined]
        time.sleep(12)  # two drift windows of training-like traffic
        assert alarms() == [], alarms()
        shift[0] = 2.0
        found = wait_for(alarms, 30, "a drift alarm on the shifted input")
        wait_for(lambda: {"f1", "output.value"} <= {f["name"] for f in view()["features"]  # type: ignore[attr-defined]
                                                   if (f["score"] or {}).get("state") == "alarm"}, 30,
                 "the input column and the output in alarm")
        assert "f1" in found[0]["features"] or "output.value" in found[0]["features"], found[0]  # type: ignore[operator]
    finally:
        stop.set()
        procs.stop_all()
        broker.stop()
