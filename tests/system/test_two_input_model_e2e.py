"""A model with two inputs end to end: ``a`` [N, 3] and ``b`` [N, 2] (Concat → MatMul → ArgMax),
published with an .npz reference holding one array per input, deployed to a real agent and
served through OIP v2 with both inputs. Each input gets its own reference; training-like traffic
raises no alarm, and moving one column of ``b`` raises one that names ``b.f1``."""

from __future__ import annotations

import contextlib
import json
import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from tests.conftest import Broker, Procs, free_port, http_ok, run_cli, wait_for

pytestmark = [pytest.mark.broker, pytest.mark.slow]
CLI = "edgefleet.hub.cli.main"


def two_inputs(path: Path) -> None:
    w = np.random.default_rng(0).normal(size=(5, 2)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Concat", ["a", "b"], ["ab"], axis=1), helper.make_node("MatMul", ["ab", "w"], ["logits"]),
         helper.make_node("ArgMax", ["logits"], ["label"], axis=1, keepdims=0)],
        "two", [helper.make_tensor_value_info("a", TensorProto.FLOAT, [None, 3]),
                helper.make_tensor_value_info("b", TensorProto.FLOAT, [None, 2])],
        [helper.make_tensor_value_info("label", TensorProto.INT64, [None])],
        [helper.make_tensor("w", TensorProto.FLOAT, [5, 2], w.reshape(-1))])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, path)


@pytest.fixture
def env(tmp_path: Path, procs: Procs) -> Iterator[dict[str, Any]]:
    (tmp_path / "broker").mkdir()
    broker = Broker(tmp_path / "broker")
    broker.start()
    home, port = tmp_path / "hub", free_port()
    h = ("--home", str(home))
    run_cli(CLI, "init", *h, "--fleet", "two", "--broker", broker.url, "--http", f"127.0.0.1:{port}")
    (home / "drift.toml").write_text("window_seconds = 6\nbucket_seconds = 0.5\nevaluate_seconds = 0\nmin_rows = 300\n")
    try:
        procs.start("hub", CLI, "serve", *h)
        base = f"http://127.0.0.1:{port}"
        wait_for(lambda: http_ok(f"{base}/healthz"), 30, "hub HTTP")
        two_inputs(tmp_path / "two.onnx")
        rng = np.random.default_rng(1)
        np.savez(tmp_path / "ref.npz", a=rng.normal(size=(600, 3)), b=rng.normal(size=(600, 2)))
        run_cli(CLI, "publish", str(tmp_path / "two.onnx"), "--name", "two", "--version", "1",
                "--reference", str(tmp_path / "ref.npz"), *h)
        agent_port = free_port()
        run_cli(CLI, "device", "add", "box-1", *h, "--out", str(tmp_path / "box-1"), "--listen",
                f"127.0.0.1:{agent_port}", "--window", "0.5")
        procs.start("agent", "edgefleet.agent.app.cli", "run", "--config", str(tmp_path / "box-1" / "agent.toml"))
        run_cli(CLI, "deploy", "two", "1", "--device", "box-1", "--wait", "--timeout", "60", *h)
        yield {"base": base, "token": (home / "admin.token").read_text().strip(), "agent": agent_port, "home": home}
    finally:
        procs.stop_all()
        broker.stop()


def test_each_input_has_its_own_reference_and_the_alarm_names_the_column_that_moved(env: dict[str, Any]) -> None:
    auth = {"Authorization": f"Bearer {env['token']}"}
    ref = httpx.get(f"{env['base']}/api/v1/models/two", headers=auth, timeout=10).json()["reference"]
    assert [f["name"] for f in ref["features"]] == ["a.f0", "a.f1", "a.f2", "b.f0", "b.f1"]
    shift = [0.0]
    stop = threading.Event()

    def traffic() -> None:
        rng = np.random.default_rng(2)
        with httpx.Client(timeout=5) as c:
            while not stop.is_set():
                a, b = rng.normal(size=(8, 3)), rng.normal(size=(8, 2))
                b[:, 1] += shift[0]
                body = {"inputs": [{"name": "a", "shape": [8, 3], "datatype": "FP32", "data": a.reshape(-1).tolist()},
                                   {"name": "b", "shape": [8, 2], "datatype": "FP32", "data": b.reshape(-1).tolist()}]}
                with contextlib.suppress(httpx.HTTPError):
                    r = c.post(f"http://127.0.0.1:{env['agent']}/v2/models/two/infer", json=body)
                    assert r.status_code == 200, r.text
                stop.wait(0.02)

    def alarms() -> list[dict[str, Any]]:
        db = sqlite3.connect(f"file:{env['home'] / 'hub.db'}?mode=ro", uri=True, timeout=10)
        try:
            return [json.loads(r[0]) for r in db.execute(
                "SELECT details FROM audit WHERE action='drift_alarm' ORDER BY id").fetchall()]
        finally:
            db.close()

    def view() -> dict[str, Any]:
        r = httpx.get(f"{env['base']}/api/v1/drift/view?model=two", headers=auth, timeout=10)
        return dict(r.json()) if r.status_code == 200 else {}

    pump = threading.Thread(target=traffic, daemon=True)
    pump.start()
    try:
        wait_for(lambda: view().get("features") and all(sum(f["live"]) > 300 for f in view()["features"]), 40,
                 "windows with both inputs' histograms at the hub")
        time.sleep(12)  # two drift windows of training-like traffic
        assert alarms() == [], alarms()
        shift[0] = 3.0
        found = wait_for(alarms, 30, "a drift alarm on the moved column")
        assert set(found[0]["features"]) - {"output"} == {"b.f1"}, found[0]
    finally:
        stop.set()
        pump.join(5)
