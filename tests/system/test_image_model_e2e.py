"""An image model end to end on real parts: a small CNN built with onnx.helper (Conv → Relu →
GlobalAveragePool → MatMul → Softmax / ArgMax, input ``image`` of shape [N, 3, 8, 8]) is
published with a reference of 400 images, deployed to a real agent and served through the OIP
v2 API. The hub gets windows with each channel's histogram and each image's mean, std and
saturated share. Training-like images raise no drift alarm. Brighter images do, and the alarm
names the input and the channels that moved."""

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


def cnn(path: Path) -> None:
    rng = np.random.default_rng(0)
    init = [helper.make_tensor("w1", TensorProto.FLOAT, [4, 3, 3, 3], rng.normal(size=108).astype(np.float32)),
            helper.make_tensor("b1", TensorProto.FLOAT, [4], np.zeros(4, np.float32)),
            helper.make_tensor("w2", TensorProto.FLOAT, [4, 3], rng.normal(size=12).astype(np.float32))]
    nodes = [helper.make_node("Conv", ["image", "w1", "b1"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["r"]),
             helper.make_node("GlobalAveragePool", ["r"], ["g"]),
             helper.make_node("Flatten", ["g"], ["f"]),
             helper.make_node("MatMul", ["f", "w2"], ["logits"]),
             helper.make_node("Softmax", ["logits"], ["probs"], axis=1),
             helper.make_node("ArgMax", ["probs"], ["label"], axis=1, keepdims=0)]
    graph = helper.make_graph(nodes, "cnn", [helper.make_tensor_value_info("image", TensorProto.FLOAT, [None, 3, 8, 8])],
                              [helper.make_tensor_value_info("label", TensorProto.INT64, [None]),
                               helper.make_tensor_value_info("probs", TensorProto.FLOAT, [None, 3])], init)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, path)


def images(rng: np.random.Generator, n: int, brighter: float = 0.0) -> np.ndarray:
    return np.clip(rng.beta(2.0, 3.0, size=(n, 3, 8, 8)) + brighter, 0.0, 1.0).astype(np.float32)


@pytest.fixture
def env(tmp_path: Path, procs: Procs) -> Iterator[dict[str, Any]]:
    (tmp_path / "broker").mkdir()
    broker = Broker(tmp_path / "broker")
    broker.start()
    home, port = tmp_path / "hub", free_port()
    h = ("--home", str(home))
    run_cli(CLI, "init", *h, "--fleet", "vision", "--broker", broker.url, "--http", f"127.0.0.1:{port}")
    (home / "drift.toml").write_text("window_seconds = 6\nbucket_seconds = 0.5\nevaluate_seconds = 0\nmin_rows = 300\n")
    try:
        procs.start("hub", CLI, "serve", *h)
        base = f"http://127.0.0.1:{port}"
        wait_for(lambda: http_ok(f"{base}/healthz"), 30, "hub HTTP")
        cnn(tmp_path / "cnn.onnx")
        np.save(tmp_path / "imgs.npy", images(np.random.default_rng(1), 400))
        run_cli(CLI, "publish", str(tmp_path / "cnn.onnx"), "--name", "cnn", "--version", "1",
                "--reference", str(tmp_path / "imgs.npy"), *h)
        agent_port = free_port()
        run_cli(CLI, "device", "add", "cam-1", *h, "--out", str(tmp_path / "cam-1"), "--listen",
                f"127.0.0.1:{agent_port}", "--window", "0.5")
        procs.start("agent", "edgefleet.agent.app.cli", "run", "--config", str(tmp_path / "cam-1" / "agent.toml"))
        run_cli(CLI, "deploy", "cnn", "1", "--device", "cam-1", "--wait", "--timeout", "60", *h)
        yield {"base": base, "token": (home / "admin.token").read_text().strip(), "agent": agent_port, "home": home}
    finally:
        procs.stop_all()
        broker.stop()


def test_an_image_model_reports_channel_statistics_and_brighter_images_raise_the_alarm(env: dict[str, Any]) -> None:
    auth = {"Authorization": f"Bearer {env['token']}"}
    model = httpx.get(f"{env['base']}/api/v1/models/cnn", headers=auth, timeout=10).json()
    names = [t["name"] for t in model["reference"]["tensors"]]
    assert names == ["image[c0]", "image[c1]", "image[c2]", "image.mean", "image.std", "image.saturated"]

    brighter = [0.0]
    stop = threading.Event()

    def traffic() -> None:
        rng = np.random.default_rng(2)
        with httpx.Client(timeout=5) as c:
            while not stop.is_set():
                x = images(rng, 4, brighter[0])
                body = {"inputs": [{"name": "image", "shape": list(x.shape), "datatype": "FP32",
                                    "data": x.reshape(-1).tolist()}]}
                with contextlib.suppress(httpx.HTTPError):
                    r = c.post(f"http://127.0.0.1:{env['agent']}/v2/models/cnn/infer", json=body)
                    assert r.status_code == 200, r.text
                stop.wait(0.02)

    pump = threading.Thread(target=traffic, daemon=True)
    pump.start()
    try:
        def view() -> dict[str, Any]:
            r = httpx.get(f"{env['base']}/api/v1/drift/view?model=cnn", headers=auth, timeout=10)
            return dict(r.json()) if r.status_code == 200 else {}

        wait_for(lambda: view().get("features") and all(sum(f["live"]) > 0 for f in view()["features"]), 40,
                 "windows with every tensor statistic at the hub")
        time.sleep(12)  # two drift windows of training-like images
        def alarms() -> list[dict[str, Any]]:
            db = sqlite3.connect(f"file:{env['home'] / 'hub.db'}?mode=ro", uri=True, timeout=10)
            try:
                rows = db.execute("SELECT details FROM audit WHERE action='drift_alarm' ORDER BY id").fetchall()
            finally:
                db.close()
            return [json.loads(r[0]) for r in rows]

        assert alarms() == [], alarms()
        assert all(f["score"]["state"] == "ok" for f in view()["features"]), view()["features"]
        brighter[0] = 0.3
        found = wait_for(alarms, 30, "a drift alarm on brighter images")
        named = set(found[0]["features"]) - {"output"}
        assert named and all(n.startswith("image") for n in named), found[0]  # the input that moved
        # as the window fills with brighter images every channel follows, each named
        wait_for(lambda: all(f["score"]["state"] == "alarm" for f in view()["features"]
                             if f["name"] in ("image[c0]", "image[c1]", "image[c2]", "image.mean")), 30,
                 "every channel and the image mean in alarm")
    finally:
        stop.set()
        pump.join(5)
