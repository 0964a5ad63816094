"""A regressor end to end: a scikit-learn LinearRegression published with a table reference,
deployed to a real agent and served through OIP v2. Its continuous output gets a histogram on
reference bins (``output.value``); training-like traffic raises no alarm, and shifting the
input column the prediction depends on raises one naming that column and the output."""

from __future__ import annotations

import contextlib
import pickle
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from sklearn.linear_model import LinearRegression

from tests._modelenv import model_env
from tests.conftest import Procs, wait_for

pytestmark = [pytest.mark.broker, pytest.mark.slow]
CLI = "edgefleet.hub.cli.main"


def test_a_regressors_output_has_a_reference_and_drifts_with_its_input(tmp_path: Path, procs: Procs) -> None:
    rng = np.random.default_rng(1)
    x = rng.normal(size=(800, 3)).astype(np.float32)
    y = 3.0 * x[:, 1] + 0.1 * rng.normal(size=800)
    (tmp_path / "reg.pkl").write_bytes(pickle.dumps(LinearRegression().fit(x, y)))
    np.save(tmp_path / "train.npy", x)
    stop = threading.Event()
    shift = [0.0]
    with model_env(tmp_path, procs, model=tmp_path / "reg.pkl", reference=tmp_path / "train.npy", name="reg") as env:
        assert [t["name"] for t in env.reference()["tensors"]] == ["output.value"]
        agent_port = env.agent

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

        pump = threading.Thread(target=traffic, daemon=True)
        pump.start()
        wait_for(lambda: any(f["name"] == "output.value" and sum(f["live"]) > 300
                             for f in env.view().get("features", [])), 40, "the output's histogram at the hub")  # type: ignore[attr-defined]
        time.sleep(12)  # two drift windows of training-like traffic
        assert env.alarms() == [], env.alarms()
        shift[0] = 2.0
        found = wait_for(env.alarms, 30, "a drift alarm on the shifted input")
        wait_for(lambda: {"f1", "output.value"} <= {f["name"] for f in env.view()["features"]  # type: ignore[attr-defined]
                                                   if (f["score"] or {}).get("state") == "alarm"}, 30,
                 "the input column and the output in alarm")
        assert "f1" in found[0]["features"] or "output.value" in found[0]["features"], found[0]  # type: ignore[operator]
        stop.set()
        pump.join(5)
