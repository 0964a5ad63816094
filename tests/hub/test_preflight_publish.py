"""Preflight sets at publish: built from the sklearn source, checked by the hub before anything is
stored, carried on the candidate's desired-state entry. Real sklearn, skl2onnx, ONNX Runtime,
SQLite and (for the CLI) the real admin HTTP API."""

from __future__ import annotations

import base64
import io
import json
import pickle
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from sklearn.datasets import make_classification
from sklearn.ensemble import RandomForestClassifier

from edgefleet.agent.contract.envelope import open_envelope
from edgefleet.agent.contract.wire import DesiredState
from edgefleet.hub.adapters.api import HubHttpServer
from edgefleet.hub.adapters.home import HubHome
from edgefleet.hub.adapters.modelfile import sklearn_to_onnx
from edgefleet.hub.adapters.preflight import build_preflight, check_preflight
from edgefleet.hub.daemon import Hub
from edgefleet.hub.errors import BadRequest
from tests.conftest import run_cli

X, Y = make_classification(n_samples=400, n_features=4, n_informative=3, n_redundant=0, n_classes=3,
                           random_state=0)
X = X.astype(np.float32)


def forest(seed: int, labels: np.ndarray = Y) -> RandomForestClassifier:
    return RandomForestClassifier(n_estimators=8, max_depth=5, random_state=seed).fit(X, labels)


@pytest.fixture
def hub(tmp_path: Path) -> Iterator[Hub]:
    home = HubHome(tmp_path / "hub")
    home.init(fleet="f", broker_url="mqtt://127.0.0.1:1", http_listen="127.0.0.1:0")
    h = Hub(home)
    h.public_url = "http://hub.example"
    yield h
    h.db.close()


def test_the_set_holds_sklearn_expectations_and_the_converted_model_passes() -> None:
    est = forest(0)
    model = sklearn_to_onnx(est, 4)
    blob = build_preflight(model, X, est, rows=32)
    with np.load(io.BytesIO(blob), allow_pickle=False) as npz:
        assert sorted(npz.files) == ["input", "output:label", "output:probabilities"]
        assert npz["input"].dtype == np.float32 and npz["input"].shape == (32, 4)
        assert npz["output:label"].dtype == np.int64
        assert np.array_equal(npz["output:label"], est.predict(X[:32]))
        assert npz["output:probabilities"].dtype == np.float32
    summary = check_preflight(model, blob)
    assert summary["rows"] == 32 and summary["outputs"]["label"]["label_agreement"] == 1.0


def test_a_model_that_does_not_reproduce_the_set_is_refused_and_nothing_is_stored(hub: Hub) -> None:
    blob = build_preflight(sklearn_to_onnx(forest(0), 4), X, forest(0))
    other = sklearn_to_onnx(forest(0, np.random.default_rng(1).permutation(Y)), 4)
    with pytest.raises(BadRequest, match=r"output 'label' agrees with the expected labels on \d+\.\d% of 64 rows"):
        hub.publish({"name": "m", "version": "1", "model_b64": base64.b64encode(other).decode(),
                     "preflight": {"blob_b64": base64.b64encode(blob).decode()}}, "alice")
    assert hub.db.list_models() == [] and list(hub.home.blobs.iterdir()) == []
    with pytest.raises(BadRequest, match="differs from the expected values"):
        check_preflight(other, blob, {"label_agreement": 0.0})
    evil = io.BytesIO()
    np.savez(evil, input=np.array([object()], dtype=object), **{"output:label": np.zeros(1, np.int64)})
    with pytest.raises(BadRequest, match="without pickles"):
        check_preflight(other, evil.getvalue())


def test_cli_publish_with_preflight_and_the_candidate_entry_carries_it(hub: Hub, tmp_path: Path) -> None:
    est = forest(0)
    (tmp_path / "clf.pkl").write_bytes(pickle.dumps(est))
    np.save(tmp_path / "inputs.npy", X[:100])
    http = HubHttpServer(hub, "127.0.0.1", 0)
    http.start()
    try:
        base = ("--home", str(hub.home.path), "--hub", f"http://127.0.0.1:{http.address[1]}")
        res = json.loads(run_cli("edgefleet.hub.cli.main", "publish", str(tmp_path / "clf.pkl"), "--name", "m", "--version", "2",
                                 "--preflight", str(tmp_path / "inputs.npy"), "--preflight-rows", "50",
                                 "--json", *base).stdout)
    finally:
        http.stop()
    pf = res["preflight"]
    assert pf["rows"] == 50 and pf["atol"] == 1e-4 and (hub.home.blobs / pf["sha256"]).stat().st_size == pf["size"]
    hub.publish({"name": "m", "version": "1", "model_b64": base64.b64encode(sklearn_to_onnx(forest(3), 4)).decode()},
                "alice")
    hub.add_device({"device": "d1", "profile": "x86"}, "admin")
    hub.deploy({"model": "m", "version": "1", "devices": ["d1"]}, "alice")
    hub.rollouts.start_rollout({"model": "m", "version": "2", "steps": [100]}, "alice")
    env = hub.db.query("SELECT envelope FROM desired WHERE device='d1'")[0]["envelope"]
    entry = DesiredState.from_dict(json.loads(open_envelope(env).payload)).models["m"]
    assert entry.version == "2" and entry.preflight is not None
    assert entry.preflight["url"] == f"http://hub.example/blobs/{pf['sha256']}"
    assert {k: entry.preflight[k] for k in ("sha256", "size", "rows", "rtol", "label_agreement")} == {
        "sha256": pf["sha256"], "size": pf["size"], "rows": 50, "rtol": 1e-3, "label_agreement": 1.0}


# --- sets for other signatures: string columns (one input each), regressors -------------------------


def city_pipeline(seed: int = 0, *, shuffled: bool = False) -> tuple[bytes, Any, dict[str, np.ndarray]]:
    """A pipeline on a DataFrame with a string column (OneHotEncoder) and a number (passed
    through), string classes; converted with one [N, 1] input per column. Returns the model,
    the pipeline and 40 rows of inputs by input name."""
    import pandas as pd
    from skl2onnx import to_onnx
    from skl2onnx.common.data_types import FloatTensorType, StringTensorType
    from sklearn.compose import ColumnTransformer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import OneHotEncoder

    rng = np.random.default_rng(seed)
    df = pd.DataFrame({"city": rng.choice(["paris", "lyon", "saint-etienne"], 300),
                       "x": rng.normal(size=300).astype(np.float32)})
    score = df["x"].to_numpy() + 1.5 * (df["city"] == "paris").to_numpy()
    y = np.where(score > 0.75, "high", "low")
    if shuffled:
        y = rng.permutation(y)
    clf = LogisticRegression(max_iter=500)
    pipe = Pipeline([("pre", ColumnTransformer([("oh", OneHotEncoder(handle_unknown="ignore"), ["city"])],
                                               remainder="passthrough")), ("clf", clf)]).fit(df, y)
    onx = to_onnx(pipe, initial_types=[("city", StringTensorType([None, 1])), ("x", FloatTensorType([None, 1]))],
                  options={id(clf): {"zipmap": False}}, target_opset=17)
    inputs = {"city": df["city"].to_numpy(dtype=str)[:40].reshape(-1, 1), "x": df["x"].to_numpy()[:40].reshape(-1, 1)}
    return onx.SerializeToString(), pipe, inputs


def test_a_string_column_pipeline_publishes_with_a_named_set_and_a_retrained_one_is_refused(hub: Hub) -> None:
    model, pipe, inputs = city_pipeline()
    blob = build_preflight(model, inputs, pipe, rows=40)
    with np.load(io.BytesIO(blob), allow_pickle=False) as npz:
        assert sorted(npz.files) == ["input:city", "input:x", "output:label", "output:probabilities"]
        assert npz["input:city"].dtype.kind == "U" and npz["output:label"].dtype.kind == "U"
    res = hub.publish({"name": "m", "version": "1", "model_b64": base64.b64encode(model).decode(),
                       "preflight": {"blob_b64": base64.b64encode(blob).decode()}}, "alice")
    assert res["preflight"]["rows"] == 40 and (hub.home.blobs / res["preflight"]["sha256"]).exists()
    other = city_pipeline(shuffled=True)[0]
    with pytest.raises(BadRequest, match=r"output 'label' agrees with the expected labels on \d+\.\d% of 40 rows"):
        hub.publish({"name": "m", "version": "2", "model_b64": base64.b64encode(other).decode(),
                     "preflight": {"blob_b64": base64.b64encode(blob).decode()}}, "alice")
    assert [m["version"] for m in hub.db.list_models()] == ["1"]


def test_without_pandas_a_set_for_several_inputs_takes_onnx_runtime_outputs(monkeypatch: pytest.MonkeyPatch) -> None:
    import onnxruntime as ort

    model, pipe, inputs = city_pipeline()
    sess = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    label, proba = sess.run(None, {"city": inputs["city"].astype(object), "x": inputs["x"]})
    monkeypatch.setitem(sys.modules, "pandas", None)  # ``import pandas`` now raises ImportError
    blob = build_preflight(model, inputs, pipe, rows=40)
    with np.load(io.BytesIO(blob), allow_pickle=False) as npz:
        assert np.array_equal(npz["output:probabilities"], proba)  # bit for bit: ONNX Runtime's, not sklearn's
        assert np.array_equal(npz["output:label"], label.astype(str))
    assert check_preflight(model, blob)["outputs"]["label"]["label_agreement"] == 1.0


def test_a_regressor_set_keeps_the_legacy_input_and_holds_the_sklearn_values() -> None:
    from sklearn.linear_model import LinearRegression

    target = X @ np.array([1.0, -2.0, 0.5, 3.0]) + 0.1
    est = LinearRegression().fit(X, target)
    model = sklearn_to_onnx(est, 4)
    blob = build_preflight(model, X, est, rows=30)
    with np.load(io.BytesIO(blob), allow_pickle=False) as npz:
        (out,) = (k for k in npz.files if k.startswith("output:"))
        assert npz.files[0] == "input" and npz["input"].dtype == np.float32
        assert npz[out].dtype == np.float32 and npz[out].shape == (30, 1)  # [N] from sklearn, as ONNX answers
        assert np.allclose(npz[out].reshape(-1), est.predict(X[:30]), rtol=1e-6)
    assert check_preflight(model, blob)["rows"] == 30
    other = sklearn_to_onnx(LinearRegression().fit(X, target * 1.01), 4)
    with pytest.raises(BadRequest, match="differs from the expected values"):
        check_preflight(other, blob)


def test_a_set_with_both_input_forms_is_refused_by_the_hub() -> None:
    model = sklearn_to_onnx(forest(0), 4)
    buf = io.BytesIO()
    np.savez(buf, input=X[:4], **{"input:input": X[:4], "output:label": np.zeros(4, np.int64)})
    with pytest.raises(BadRequest, match="both 'input' and"):
        check_preflight(model, buf.getvalue())
