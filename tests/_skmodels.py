"""Tiny scikit-learn models converted to ONNX for the canary tests (tests may import sklearn;
the agent package may not). Cached: each is trained and converted once per test session."""

from __future__ import annotations

import functools
import io

import numpy as np
from skl2onnx import to_onnx
from skl2onnx.common.data_types import FloatTensorType
from sklearn.datasets import make_classification
from sklearn.ensemble import RandomForestClassifier
from sklearn.linear_model import LogisticRegression

N_FEATURES = 4


@functools.cache
def data() -> tuple[np.ndarray, np.ndarray]:
    X, y = make_classification(n_samples=400, n_features=N_FEATURES, n_informative=3, n_redundant=0,
                               class_sep=2.0, random_state=0)
    return X.astype(np.float32), y


def convert(est: object) -> bytes:
    onx = to_onnx(est, initial_types=[("x", FloatTensorType([None, N_FEATURES]))],
                  options={id(est): {"zipmap": False}}, target_opset=17)
    return onx.SerializeToString()


@functools.cache
def logreg(c: float = 1.0, *, shuffled: bool = False) -> tuple[bytes, LogisticRegression]:
    """``shuffled`` trains on permuted labels: a model that runs fine and predicts badly."""
    X, y = data()
    if shuffled:
        y = np.random.default_rng(1).permutation(y)
    est = LogisticRegression(C=c, max_iter=500).fit(X, y)
    return convert(est), est


@functools.cache
def forest(trees: int = 5, depth: int = 4) -> tuple[bytes, RandomForestClassifier]:
    X, y = data()
    est = RandomForestClassifier(n_estimators=trees, max_depth=depth, random_state=0).fit(X, y)
    return convert(est), est


def preflight_npz(est: object, rows: int = 64, *, x: np.ndarray | None = None) -> bytes:
    """The preflight set the hub would build: inputs and the estimator's own outputs."""
    X = data()[0][:rows] if x is None else x
    buf = io.BytesIO()
    np.savez(buf, input=X, **{
        "output:label": est.predict(X).astype(np.int64),  # type: ignore[attr-defined]
        "output:probabilities": est.predict_proba(X).astype(np.float32),  # type: ignore[attr-defined]
    })
    return buf.getvalue()
