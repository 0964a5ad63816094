"""LightGBM and XGBoost models publish as plain-tensor ONNX: real lightgbm, xgboost, onnxmltools
and ONNX Runtime, models trained here, saved with pickle/joblib and read back the way the CLI reads
them (modelfile.load_estimator).

Tolerances. ONNX Runtime runs the trees on float32 inputs against float32 thresholds and sums leaf
values in float32; LightGBM and XGBoost compare and sum in float64. Two effects follow:

* rounding of the sums: ~1e-7 relative per tree, so over <= 30 trees probabilities agree to 1e-5
  and regression values (magnitude ~10) to rtol 1e-5 / atol 1e-4;
* threshold flips: a float64 feature within float32 rounding of a split threshold can take the other
  branch and change the value by a whole leaf. Data here is float64, like most training data, so a
  few rows may flip: labels must agree on >= 99% of rows, and values be within tolerance on >= 99%.

Comparisons use held-out rows. On training rows XGBoost's ``hist`` cut points are the training
values themselves, and a preprocessing step that rounds differently in ONNX (StandardScaler computes
``(x - mean) * (1/std)`` there, ``(x - mean) / std`` in scikit-learn) puts several percent of them
on the other side of a split.
"""

from __future__ import annotations

import functools
import pickle
import subprocess
import sys
from pathlib import Path
from typing import Any

import joblib
import lightgbm
import numpy as np
import onnxruntime as ort
import pytest
import xgboost
from sklearn.datasets import make_classification, make_regression
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from edgefleet.hub.adapters.gbm import gbm_to_onnx
from edgefleet.hub.adapters.modelfile import load_estimator, validate_onnx
from edgefleet.hub.errors import BadRequest

N_FEATURES = 8
TREES = 30
LABEL_AGREEMENT = 0.99
PROBA_TOL = {"rtol": 1e-5, "atol": 1e-5}
VALUE_TOL = {"rtol": 1e-5, "atol": 1e-4}


@functools.cache
def classification() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Three classes, float64 like most training data: (train X, train y, held-out X)."""
    X, y = make_classification(n_samples=900, n_features=N_FEATURES, n_informative=5, n_redundant=1,
                               n_classes=3, random_state=0)
    return X[:600], y[:600], X[600:]


@functools.cache
def regression() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    X, y = make_regression(n_samples=900, n_features=N_FEATURES, n_informative=5, noise=5.0, random_state=0)
    y = y / np.abs(y).max() * 10  # values of magnitude ~10: the tolerance above is for that scale
    return X[:600], y[:600], X[600:]


def classifiers() -> dict[str, Any]:
    return {
        "LGBMClassifier": lightgbm.LGBMClassifier(n_estimators=TREES, num_leaves=15, random_state=0, verbose=-1),
        "XGBClassifier": xgboost.XGBClassifier(n_estimators=TREES, max_depth=4, random_state=0, n_jobs=1),
    }


def regressors() -> dict[str, Any]:
    return {
        "LGBMRegressor": lightgbm.LGBMRegressor(n_estimators=TREES, num_leaves=15, random_state=0, verbose=-1),
        "XGBRegressor": xgboost.XGBRegressor(n_estimators=TREES, max_depth=4, random_state=0, n_jobs=1),
    }


def saved_and_loaded(est: Any, path: Path) -> Any:
    """Through a file, as `edgefleet-hub publish` gets it."""
    if path.suffix == ".joblib":
        joblib.dump(est, path)
    else:
        path.write_bytes(pickle.dumps(est))
    return load_estimator(path)


def run(onnx_bytes: bytes, rows: np.ndarray) -> dict[str, np.ndarray]:
    sess = ort.InferenceSession(onnx_bytes, providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    return dict(zip(names, sess.run(None, {"input": rows.astype(np.float32)}), strict=True))


def share_close(got: np.ndarray, want: np.ndarray, tol: dict[str, float]) -> float:
    """The share of rows whose every value is within ``tol``."""
    ok = np.isclose(got.reshape(len(want), -1), want.reshape(len(want), -1), **tol)
    return float(ok.all(axis=1).mean())


def assert_classifier_matches(onnx_bytes: bytes, est: Any, rows: np.ndarray) -> None:
    inputs, outputs = validate_onnx(onnx_bytes)
    assert [(t.name, t.dtype, t.shape) for t in inputs] == [("input", "float32", (None, N_FEATURES))]
    assert [(t.name, t.dtype, t.shape) for t in outputs] == [
        ("label", "int64", (None,)), ("probabilities", "float32", (None, 3))]
    out = run(onnx_bytes, rows)
    assert np.mean(out["label"] == est.predict(rows)) >= LABEL_AGREEMENT
    assert share_close(out["probabilities"], est.predict_proba(rows), PROBA_TOL) >= LABEL_AGREEMENT


def assert_regressor_matches(onnx_bytes: bytes, want: np.ndarray, rows: np.ndarray) -> None:
    _, outputs = validate_onnx(onnx_bytes)
    assert [(t.name, t.dtype, t.shape) for t in outputs] == [("variable", "float32", (None, 1))]
    assert share_close(run(onnx_bytes, rows)["variable"], want, VALUE_TOL) >= LABEL_AGREEMENT


@pytest.mark.parametrize(("name", "suffix"), [("LGBMClassifier", ".pkl"), ("XGBClassifier", ".joblib")])
def test_a_gbm_classifier_converts_to_label_and_probability_tensors(name: str, suffix: str,
                                                                    tmp_path: Path) -> None:
    X, y, held_out = classification()
    est = saved_and_loaded(classifiers()[name].fit(X, y), tmp_path / f"model{suffix}")
    onnx_bytes = gbm_to_onnx(est, N_FEATURES)
    assert onnx_bytes is not None
    assert_classifier_matches(onnx_bytes, est, held_out)


@pytest.mark.parametrize(("name", "suffix"), [("LGBMRegressor", ".joblib"), ("XGBRegressor", ".pkl")])
def test_a_gbm_regressor_converts_to_one_value_tensor(name: str, suffix: str, tmp_path: Path) -> None:
    X, y, held_out = regression()
    est = saved_and_loaded(regressors()[name].fit(X, y), tmp_path / f"model{suffix}")
    onnx_bytes = gbm_to_onnx(est, N_FEATURES)
    assert onnx_bytes is not None
    assert_regressor_matches(onnx_bytes, est.predict(held_out), held_out)


def test_raw_boosters_convert_too(tmp_path: Path) -> None:
    X, y, held_out = regression()
    lgb = lightgbm.train({"objective": "regression", "num_leaves": 15, "verbose": -1, "seed": 0},
                         lightgbm.Dataset(X, y), num_boost_round=TREES)
    xgb = xgboost.train({"max_depth": 4, "seed": 0, "nthread": 1}, xgboost.DMatrix(X, y), num_boost_round=TREES)
    for booster, want in ((lgb, lgb.predict(held_out)), (xgb, xgb.predict(xgboost.DMatrix(held_out)))):
        onnx_bytes = gbm_to_onnx(saved_and_loaded(booster, tmp_path / "booster.pkl"), N_FEATURES)
        assert onnx_bytes is not None
        assert_regressor_matches(onnx_bytes, want, held_out)


@pytest.mark.parametrize("name", ["LGBMClassifier", "XGBClassifier"])
def test_a_pipeline_ending_in_a_gbm_converts_with_its_preprocessing(name: str, tmp_path: Path) -> None:
    X, y, held_out = classification()
    pipe = make_pipeline(StandardScaler(), classifiers()[name]).fit(X, y)
    est = saved_and_loaded(pipe, tmp_path / "pipeline.joblib")
    onnx_bytes = gbm_to_onnx(est, N_FEATURES)
    assert onnx_bytes is not None
    assert_classifier_matches(onnx_bytes, est, held_out)


def test_anything_else_is_left_to_skl2onnx() -> None:
    X, y, _ = classification()
    assert gbm_to_onnx(object(), N_FEATURES) is None
    assert gbm_to_onnx(LogisticRegression(max_iter=200).fit(X, y), N_FEATURES) is None
    assert gbm_to_onnx(make_pipeline(StandardScaler(), LogisticRegression()), N_FEATURES) is None


def test_recognising_a_model_imports_no_gbm_library() -> None:
    code = ("import sys\nfrom edgefleet.hub.adapters.gbm import gbm_to_onnx\n"
            "assert gbm_to_onnx(object(), 3) is None\n"
            "print(sorted(m for m in ('lightgbm', 'xgboost', 'onnxmltools') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "[]"


def test_a_model_the_converter_refuses_is_a_bad_request_naming_it() -> None:
    with pytest.raises(BadRequest, match=r"onnxmltools cannot convert lightgbm\.sklearn\.LGBMClassifier: \S"):
        gbm_to_onnx(lightgbm.LGBMClassifier(), N_FEATURES)  # never fitted


def test_without_onnxmltools_the_error_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    X, y, _ = classification()
    est = lightgbm.LGBMClassifier(n_estimators=2, verbose=-1).fit(X, y)
    monkeypatch.setitem(sys.modules, "onnxmltools", None)  # what `import onnxmltools` meets when absent
    with pytest.raises(BadRequest, match=r"LGBMClassifier .*onnxmltools.*pip install 'edgefleet\[hub\]'"):
        gbm_to_onnx(est, N_FEATURES)
