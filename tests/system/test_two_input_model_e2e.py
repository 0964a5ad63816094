"""A model with two inputs end to end: ``a`` [N, 3] and ``b`` [N, 2] (Concat → MatMul → ArgMax),
published with an .npz reference holding one array per input, deployed to a real agent and
served through OIP v2 with both inputs. Each input gets its own reference; training-like traffic
raises no alarm, and moving one column of ``b`` raises one that names ``b.f1``."""

from __future__ import annotations

import contextlib
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from tests._modelenv import ModelEnv, model_env
from tests.conftest import Procs, wait_for

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


def test_each_input_has_its_own_reference_and_the_alarm_names_the_column_that_moved(tmp_path: Path,
                                                                                   procs: Procs) -> None:
    two_inputs(tmp_path / "two.onnx")
    rng = np.random.default_rng(1)
    np.savez(tmp_path / "ref.npz", a=rng.normal(size=(600, 3)), b=rng.normal(size=(600, 2)))
    with model_env(tmp_path, procs, model=tmp_path / "two.onnx", reference=tmp_path / "ref.npz", name="two") as env:
        _run(env)


def _run(env: ModelEnv) -> None:
    assert [f["name"] for f in env.reference()["features"]] == ["a.f0", "a.f1", "a.f2", "b.f0", "b.f1"]
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
                    r = c.post(f"http://127.0.0.1:{env.agent}/v2/models/two/infer", json=body)
                    assert r.status_code == 200, r.text
                stop.wait(0.02)

    pump = threading.Thread(target=traffic, daemon=True)
    pump.start()
    try:
        wait_for(lambda: env.view().get("features") and all(sum(f["live"]) > 300 for f in env.view()["features"]), 40,
                 "windows with both inputs' histograms at the hub")
        time.sleep(12)  # two drift windows of training-like traffic
        assert env.alarms() == [], env.alarms()
        shift[0] = 3.0
        found = wait_for(env.alarms, 30, "a drift alarm on the moved column")
        assert set(found[0]["features"]) - {"output"} == {"b.f1"}, found[0]
    finally:
        stop.set()
        pump.join(5)
