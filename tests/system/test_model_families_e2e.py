"""Models beyond one float table, end to end on real parts: one hub and one real agent serving
three models through the OIP v2 API, each published with its reference.

* ``cnn``: a small CNN built with onnx.helper (``image`` [N, 3, 8, 8]) with 400 reference images;
  its reference holds per-channel histograms and per-image mean, std and saturated share;
* ``two``: a model with two inputs (``a`` [N, 3], ``b`` [N, 2]) and an .npz reference, one array
  per input, each input its own reference;
* ``reg``: a scikit-learn LinearRegression with a table reference; its continuous output is
  binned on reference bins (``output.value``);
* ``pipe``: a scikit-learn Pipeline (OneHotEncoder on a string column ``city``, a scaler on two
  numeric ones, LogisticRegression) fitted on a DataFrame, published from its pickle with a
  ``.csv`` reference of mixed types, so skl2onnx makes one input per column (``city`` a string
  tensor, served as OIP ``BYTES``); its reference counts categories, and its probabilities get a
  confidence histogram.

Training-like traffic to all four raises no drift alarm. Then each family's input moves in turn
(brighter images, one column of ``b``, the column the regression depends on, a city never seen in
training), and each alarm names the input, channel, column or category that moved."""

from __future__ import annotations

import contextlib
import pickle
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper
from sklearn.compose import ColumnTransformer
from sklearn.linear_model import LinearRegression, LogisticRegression
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import OneHotEncoder, StandardScaler

from tests._modelenv import ModelEnv, cnn_model, model_env
from tests.conftest import Procs, wait_for

pytestmark = [pytest.mark.broker, pytest.mark.slow]


def images(rng: np.random.Generator, n: int, brighter: float = 0.0) -> np.ndarray:
    return np.clip(rng.beta(2.0, 3.0, size=(n, 3, 8, 8)) + brighter, 0.0, 1.0).astype(np.float32)


def two_inputs() -> onnx.ModelProto:
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
    return model


CITIES = np.array(["lyon", "oslo", "rome", "kyiv", "lima"])
SHARES = np.array([0.4, 0.25, 0.15, 0.12, 0.08])


def city_rows(rng: np.random.Generator, n: int, new_city: float = 0.0) -> dict[str, np.ndarray]:
    """``n`` requests' worth of the pipeline's three inputs; ``new_city``: the share of rows from a
    city training never saw."""
    city = rng.choice(CITIES, size=n, p=SHARES).astype(object)
    city[rng.random(n) < new_city] = "paris"
    return {"city": city.reshape(-1, 1), "x": rng.normal(size=(n, 1)).astype(np.float32),
            "y": rng.normal(size=(n, 1)).astype(np.float32)}


def pipeline_files(tmp: Any, rng: np.random.Generator) -> None:
    """A Pipeline with a string column fitted on a DataFrame, pickled, and its training data as CSV."""
    import pandas as pd

    cols = city_rows(rng, 1000)
    df = pd.DataFrame({k: v.reshape(-1) for k, v in cols.items()})
    target = ((df["city"] == "lyon") | (df["x"] > 0.5)).astype(int)
    pipe = Pipeline([("cols", ColumnTransformer([("cat", OneHotEncoder(handle_unknown="ignore"), ["city"]),
                                                 ("num", StandardScaler(), ["x", "y"])])),
                     ("clf", LogisticRegression())]).fit(df, target)
    (tmp / "pipe.pkl").write_bytes(pickle.dumps(pipe))
    df.to_csv(tmp / "pipe.csv", index=False)


@pytest.fixture(scope="module")
def fam(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    tmp = tmp_path_factory.mktemp("families")
    rng = np.random.default_rng(1)
    onnx.save(cnn_model(8), tmp / "cnn.onnx")
    np.save(tmp / "imgs.npy", images(rng, 400))
    onnx.save(two_inputs(), tmp / "two.onnx")
    np.savez(tmp / "ref.npz", a=rng.normal(size=(600, 3)), b=rng.normal(size=(600, 2)))
    x = rng.normal(size=(800, 3)).astype(np.float32)
    (tmp / "reg.pkl").write_bytes(pickle.dumps(LinearRegression().fit(x, 3.0 * x[:, 1] + 0.1 * rng.normal(size=800))))
    np.save(tmp / "train.npy", x)
    pipeline_files(tmp, rng)
    procs = Procs(tmp)
    shift = {"cnn": 0.0, "two": 0.0, "reg": 0.0, "pipe": 0.0}
    stop = threading.Event()
    with model_env(tmp, procs, [("cnn", tmp / "cnn.onnx", tmp / "imgs.npy"), ("two", tmp / "two.onnx", tmp / "ref.npz"),
                                ("reg", tmp / "reg.pkl", tmp / "train.npy"),
                                ("pipe", tmp / "pipe.pkl", tmp / "pipe.csv")]) as env:
        def traffic() -> None:
            r = np.random.default_rng(2)
            with httpx.Client(timeout=5) as c:
                while not stop.is_set():
                    b, rows = r.normal(size=(8, 2)), r.normal(size=(8, 3))
                    b[:, 1] += shift["two"]
                    rows[:, 1] += shift["reg"]
                    with contextlib.suppress(httpx.HTTPError):
                        env.infer("cnn", {"image": images(r, 4, shift["cnn"])}, c)
                        env.infer("two", {"a": r.normal(size=(8, 3)), "b": b}, c)
                        env.infer("reg", {"input": rows}, c)
                        env.infer("pipe", city_rows(r, 8, shift["pipe"]), c)
                    stop.wait(0.02)

        pump = threading.Thread(target=traffic, daemon=True)
        pump.start()
        try:
            for m in shift:
                wait_for(lambda m=m: env.view(m).get("features") and all(sum(f["live"]) > 0 for f in env.view(m)["features"]),
                         40, f"windows with every statistic of {m} at the hub")
            time.sleep(7)  # a drift window (6 s) of training-like traffic to all three
            yield {"env": env, "shift": shift}
        except BaseException:
            print(procs.logs())
            raise
        finally:
            stop.set()
            pump.join(5)


def _in_alarm(env: ModelEnv, model: str) -> set[str]:
    return {f["name"] for f in env.view(model)["features"] if (f["score"] or {}).get("state") == "alarm"}


def test_training_like_traffic_raises_no_alarm_and_each_reference_fits_its_signature(fam: dict[str, Any]) -> None:
    env: ModelEnv = fam["env"]
    for m in ("cnn", "two", "reg", "pipe"):
        assert env.alarms(m) == [], (m, env.alarms(m))
        assert all(f["score"]["state"] == "ok" for f in env.view(m)["features"]), env.view(m)["features"]
    assert [t["name"] for t in env.reference("cnn")["tensors"]] == [
        "image[c0]", "image[c1]", "image[c2]", "image.mean", "image.std", "image.saturated"]
    assert [f["name"] for f in env.reference("two")["features"]] == ["a.f0", "a.f1", "a.f2", "b.f0", "b.f1"]
    assert [t["name"] for t in env.reference("reg")["tensors"]] == ["output.value"]
    pipe = env.reference("pipe")
    assert [f["name"] for f in pipe["features"]] == ["x", "y"]
    assert [(c["name"], c["categories"]) for c in pipe["categories"]] == [("city", list(CITIES))]
    assert [f["name"] for f in pipe["more_outputs"]] == ["output.probabilities.confidence"]
    city = next(f for f in env.view("pipe")["features"] if f["name"] == "city")
    assert city["labels"] == [*CITIES, "other"] and city["live"][0] > city["live"][4] > 0  # lyon > lima
    assert city["above"] == 0 and city["score"]["p_value"] > 0.001, (city["live"], city["reference"], city["score"])


def test_brighter_images_alarm_on_the_image_and_its_channels(fam: dict[str, Any]) -> None:
    env: ModelEnv = fam["env"]
    fam["shift"]["cnn"] = 0.3
    found = wait_for(lambda: env.alarms("cnn"), 30, "a drift alarm on brighter images")
    named = {n for n in found[0]["features"] if not n.startswith("output")}  # its answers may move too
    assert named and all(n.startswith("image") for n in named), found[0]  # the input that moved
    wait_for(lambda: {"image[c0]", "image[c1]", "image[c2]", "image.mean"} <= _in_alarm(env, "cnn"), 30,
             "every channel and the image mean in alarm")


def test_one_column_of_the_second_input_moves_and_the_alarm_names_it(fam: dict[str, Any]) -> None:
    env: ModelEnv = fam["env"]
    fam["shift"]["two"] = 3.0
    found = wait_for(lambda: env.alarms("two"), 30, "a drift alarm on the moved column")
    assert {n for n in found[0]["features"] if not n.startswith("output")} == {"b.f1"}, found[0]


def test_a_regressors_output_drifts_with_the_input_it_depends_on(fam: dict[str, Any]) -> None:
    env: ModelEnv = fam["env"]
    fam["shift"]["reg"] = 2.0
    found = wait_for(lambda: env.alarms("reg"), 30, "a drift alarm on the shifted input")
    assert set(found[0]["features"]) & {"f1", "output.value"}, found[0]
    wait_for(lambda: {"f1", "output.value"} <= _in_alarm(env, "reg"), 30, "the input column and the output in alarm")


def test_a_city_never_seen_in_training_alarms_and_the_alarm_names_it(fam: dict[str, Any]) -> None:
    env: ModelEnv = fam["env"]
    fam["shift"]["pipe"] = 0.3
    found = wait_for(lambda: env.alarms("pipe"), 30, "a drift alarm on the new city")
    assert "city" in found[0]["features"], found[0]
    assert not {"x", "y"} & set(found[0]["features"]), found[0]  # the numeric columns did not move
    city = found[0]["scores"]["city"]
    assert "never seen in training" in city["detail"] and "'paris'" in city["detail"], city
    assert city["p_value"] < 1e-6, city
    view = next(f for f in env.view("pipe")["features"] if f["name"] == "city")
    assert view["above"] > 0 and "paris" in view["unseen"], view


def test_the_drift_page_names_the_city_bars_and_the_new_city(fam: dict[str, Any]) -> None:
    """After the new city's alarm: the fleet page's drift view of the pipeline labels the city's
    bars with the training cities, adds unseen and missing bars, and names 'paris'."""
    from tests._browser import Page, browser

    env: ModelEnv = fam["env"]
    fam["shift"]["pipe"] = 0.3
    wait_for(lambda: "city" in _in_alarm(env, "pipe"), 30, "the city in alarm")
    driver = browser()
    try:
        p = Page(driver, env.base)
        p.login((env.home / "admin.token").read_text().strip())
        p.go("#/drift/pipe")
        panel = '#features .feature[data-feature="city"]'
        wait_for(lambda: "paris" in p.text_of(panel), 30, "the city's panel naming paris")
        def bars() -> list[str]:  # each bar's title: "<series> <label>: <share>"
            return list(p.d.execute_script(
                "return [...document.querySelectorAll(arguments[0] + ' svg[aria-label^=\"histogram\"] title')]"
                ".map(t => t.textContent)", panel))

        def unseen_live() -> float:
            return next((float(b.rsplit(":", 1)[1]) for b in bars() if b.startswith("live unseen")), 0.0)

        labels = {b.split(" ", 1)[1].rsplit(":", 1)[0] for b in bars()}
        assert {"lyon", "lima", "other", "unseen", "missing"} <= labels, labels
        # 30 % of the traffic is paris: the live bar grows to it as the 6 s window fills with it
        wait_for(lambda: unseen_live() > 0.15, 30, "the live unseen bar at the new city's share")
        assert "never seen in training" in p.text_of(panel) and "χ² p" in p.text_of(panel)
        p.shot("drift-categories")
    finally:
        driver.quit()
