"""An image model end to end on real parts: a small CNN built with onnx.helper (Conv → Relu →
GlobalAveragePool → MatMul → Softmax / ArgMax, input ``image`` of shape [N, 3, 8, 8]) is
published with a reference of 400 images, deployed to a real agent and served through the OIP
v2 API. The hub gets windows with each channel's histogram and each image's mean, std and
saturated share. Training-like images raise no drift alarm. Brighter images do, and the alarm
names the input and the channels that moved."""

from __future__ import annotations

import contextlib
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import onnx
import pytest

from tests._modelenv import cnn_model, model_env
from tests.conftest import Procs, wait_for

pytestmark = [pytest.mark.broker, pytest.mark.slow]


def images(rng: np.random.Generator, n: int, brighter: float = 0.0) -> np.ndarray:
    return np.clip(rng.beta(2.0, 3.0, size=(n, 3, 8, 8)) + brighter, 0.0, 1.0).astype(np.float32)


def test_an_image_model_reports_channel_statistics_and_brighter_images_raise_the_alarm(tmp_path: Path,
                                                                                       procs: Procs) -> None:
    onnx.save(cnn_model(8), tmp_path / "cnn.onnx")
    np.save(tmp_path / "imgs.npy", images(np.random.default_rng(1), 400))
    with model_env(tmp_path, procs, model=tmp_path / "cnn.onnx", reference=tmp_path / "imgs.npy", name="cnn") as env:
        names = [t["name"] for t in env.reference()["tensors"]]
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
                        r = c.post(f"http://127.0.0.1:{env.agent}/v2/models/cnn/infer", json=body)
                        assert r.status_code == 200, r.text
                    stop.wait(0.02)

        pump = threading.Thread(target=traffic, daemon=True)
        pump.start()
        try:
            wait_for(lambda: env.view().get("features") and all(sum(f["live"]) > 0 for f in env.view()["features"]),
                     40, "windows with every tensor statistic at the hub")
            time.sleep(12)  # two drift windows of training-like images
            assert env.alarms() == [], env.alarms()
            assert all(f["score"]["state"] == "ok" for f in env.view()["features"]), env.view()["features"]
            brighter[0] = 0.3
            found = wait_for(env.alarms, 30, "a drift alarm on brighter images")
            named = set(found[0]["features"]) - {"output"}
            assert named and all(n.startswith("image") for n in named), found[0]  # the input that moved
            # as the window fills with brighter images every channel follows, each named
            wait_for(lambda: all(f["score"]["state"] == "alarm" for f in env.view()["features"]
                                 if f["name"] in ("image[c0]", "image[c1]", "image[c2]", "image.mean")), 30,
                     "every channel and the image mean in alarm")
        finally:
            stop.set()
            pump.join(5)
