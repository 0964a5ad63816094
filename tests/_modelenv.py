"""Model families end to end: Mosquitto, the hub and one agent as processes, models published with
their references and deployed to the agent, quick drift windows; and what the family tests read
back (drift alarms from the audit log, the drift view)."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import onnx
from onnx import TensorProto, helper

from tests.conftest import Broker, Procs, free_port, http_ok, run_cli, wait_for

CLI = "edgefleet.hub.cli.main"
DRIFT = "window_seconds = 6\nbucket_seconds = 0.5\nevaluate_seconds = 0\nmin_rows = 300\n"


@dataclass
class ModelEnv:
    base: str
    home: Path
    agent: int  # the agent's OIP port

    @property
    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {(self.home / 'admin.token').read_text().strip()}"}

    def reference(self, model: str) -> dict[str, Any]:
        return dict(httpx.get(f"{self.base}/api/v1/models/{model}", headers=self.auth, timeout=10).json()["reference"])

    def view(self, model: str) -> dict[str, Any]:
        r = httpx.get(f"{self.base}/api/v1/drift/view?model={model}", headers=self.auth, timeout=10)
        return dict(r.json()) if r.status_code == 200 else {}

    def alarms(self, model: str) -> list[dict[str, Any]]:
        db = sqlite3.connect(f"file:{self.home / 'hub.db'}?mode=ro", uri=True, timeout=10)
        try:
            return [d for d in (json.loads(r[0]) for r in db.execute(
                "SELECT details FROM audit WHERE action='drift_alarm' ORDER BY id").fetchall()) if d["model"] == model]
        finally:
            db.close()

    def infer(self, model: str, inputs: dict[str, np.ndarray], client: httpx.Client) -> None:
        body = {"inputs": [{"name": n, "shape": list(x.shape), "datatype": "BYTES" if x.dtype.kind in "OUS" else "FP32",
                            "data": [str(v) for v in x.reshape(-1)] if x.dtype.kind in "OUS" else x.reshape(-1).tolist()}
                           for n, x in inputs.items()]}
        r = client.post(f"http://127.0.0.1:{self.agent}/v2/models/{model}/infer", json=body)
        assert r.status_code == 200, r.text


@contextmanager
def model_env(tmp: Path, procs: Procs, models: list[tuple[str, Path, Path]]) -> Iterator[ModelEnv]:
    """Publish each ``(name, model file, reference)`` as ``name`` 1 with the reference as its
    preflight set too, deploy them all to one real agent, wait until it runs them (after their
    preflight on the agent)."""
    (tmp / "broker").mkdir()
    broker = Broker(tmp / "broker")
    broker.start()
    home, port = tmp / "hub", free_port()
    h = ("--home", str(home))
    try:
        run_cli(CLI, "init", *h, "--fleet", "families", "--broker", broker.url, "--http", f"127.0.0.1:{port}")
        (home / "drift.toml").write_text(DRIFT)
        procs.start("hub", CLI, "serve", *h)
        base = f"http://127.0.0.1:{port}"
        wait_for(lambda: http_ok(f"{base}/healthz"), 30, "hub HTTP")
        for name, model, reference in models:
            # the reference doubles as the preflight set: each agent runs it before it serves the model
            run_cli(CLI, "publish", str(model), "--name", name, "--version", "1", "--reference", str(reference),
                    "--preflight", str(reference), *h)
        agent = free_port()
        run_cli(CLI, "device", "add", "dev-1", *h, "--out", str(tmp / "dev-1"), "--listen", f"127.0.0.1:{agent}",
                "--window", "0.5")
        procs.start("agent", "edgefleet.agent.app.cli", "run", "--config", str(tmp / "dev-1" / "agent.toml"))
        for name, _, _ in models:
            run_cli(CLI, "deploy", name, "1", "--device", "dev-1", "--wait", "--timeout", "60", *h)
        yield ModelEnv(base, home, agent)
    finally:
        procs.stop_all()
        broker.stop()


def cnn_model(size: int = 8) -> onnx.ModelProto:
    """A small CNN: Conv 3→4 3x3, Relu, GlobalAveragePool, MatMul, Softmax / ArgMax; input
    ``image`` [N, 3, size, size], outputs ``label`` then ``probs``."""
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
    graph = helper.make_graph(nodes, "cnn", [helper.make_tensor_value_info("image", TensorProto.FLOAT,
                                                                           [None, 3, size, size])],
                              [helper.make_tensor_value_info("label", TensorProto.INT64, [None]),
                               helper.make_tensor_value_info("probs", TensorProto.FLOAT, [None, 3])], init)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model
