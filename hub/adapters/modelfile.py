"""Turning what an ML engineer has into a publishable, validated ONNX model.

* :func:`load_model_file` takes an ``.onnx`` file, or a pickled / joblib scikit-learn estimator
  which it converts with skl2onnx (ZipMap off, so every output is a plain tensor an edge device
  can serve over OIP v2).
* :func:`validate_onnx` is the gate before anything is stored: the agent's structural guard,
  ``onnx.checker``, a real ONNX Runtime session, and tensor-only inputs and outputs.
* :func:`load_reference_data` and :func:`compute_reference` turn training inputs (``.npy`` or
  ``.csv``) into the per-feature bins and frequencies that telemetry and drift use.

Unpickling runs code: only pass model files you trust (your own training output).
"""

from __future__ import annotations

import hashlib
import io
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import onnxruntime as ort

from edgefleet.agent.adapters.modelcheck import check_model_bytes
from edgefleet.agent.contract.errors import ModelRejected
from edgefleet.agent.contract.wire import FeatureReference, Reference, TensorSpec
from edgefleet.hub.errors import BadRequest

__all__ = [
    "compute_reference",
    "load_estimator",
    "load_model_file",
    "load_reference_data",
    "sklearn_to_onnx",
    "validate_onnx",
]

_ORT_DTYPES = {
    "tensor(float)": "float32", "tensor(double)": "float64", "tensor(int64)": "int64",
    "tensor(int32)": "int32", "tensor(string)": "str", "tensor(bool)": "bool",
}  # fmt: skip


def sklearn_to_onnx(estimator: Any, n_features: int) -> bytes:
    """Convert a fitted scikit-learn estimator to ONNX bytes (float32 input ``input``)."""
    from skl2onnx import to_onnx
    from skl2onnx.common.data_types import FloatTensorType

    options: dict[Any, Any] = {}
    if hasattr(estimator, "predict_proba"):
        options = {id(estimator): {"zipmap": False}}
    try:
        onx = to_onnx(
            estimator,
            initial_types=[("input", FloatTensorType([None, n_features]))],
            options=options or None,
        )
    except Exception as exc:
        raise BadRequest(
            f"skl2onnx cannot convert {type(estimator).__name__}: {exc}. Convert it yourself "
            "and publish the .onnx file"
        ) from exc
    data: bytes = onx.SerializeToString()
    return data


def load_estimator(path: Path) -> Any | None:
    """The fitted scikit-learn estimator in a .pkl/.pickle/.joblib file; None for an .onnx file."""
    if path.suffix == ".onnx":
        return None
    if path.suffix not in (".pkl", ".pickle", ".joblib"):
        raise BadRequest(
            f"{path.name}: expected an .onnx file or a scikit-learn estimator saved as "
            f".pkl/.pickle/.joblib, got suffix {path.suffix!r}"
        )
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise BadRequest(f"cannot read model file {path}: {exc}") from exc
    try:
        if path.suffix == ".joblib":
            import joblib

            est = joblib.load(io.BytesIO(raw))
        else:
            est = pickle.loads(raw)  # noqa: S301 - the publisher's own training output
    except Exception as exc:
        raise BadRequest(f"{path.name} does not unpickle: {exc}") from exc
    if not hasattr(est, "predict"):
        raise BadRequest(f"{path.name} holds a {type(est).__name__}, not a fitted estimator")
    return est


def load_model_file(path: Path, n_features: int | None = None, estimator: Any | None = None) -> tuple[bytes, str]:
    """Return ``(onnx_bytes, source_description)`` for an .onnx or pickled sklearn file
    (``estimator``: the one :func:`load_estimator` already read from ``path``)."""
    est = estimator if estimator is not None else load_estimator(path)
    if est is None:
        try:
            return path.read_bytes(), "onnx"
        except OSError as exc:
            raise BadRequest(f"cannot read model file {path}: {exc}") from exc
    n = n_features or getattr(est, "n_features_in_", None)
    if not n:
        raise BadRequest(f"cannot tell how many features {type(est).__name__} takes; pass --reference")
    return sklearn_to_onnx(est, int(n)), f"sklearn:{type(est).__module__}.{type(est).__name__}"


def validate_onnx(data: bytes) -> tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...]]:
    """Refuse a model an agent could not load or serve; return its input/output signature."""
    check_model_bytes(data)
    try:
        sess = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise ModelRejected(f"ONNX Runtime cannot load the model: {exc}", reason="model_load") from exc

    def specs(items: Any, what: str) -> tuple[TensorSpec, ...]:
        out = []
        for t in items:
            if t.type not in _ORT_DTYPES:
                raise ModelRejected(
                    f"{what} {t.name!r} has type {t.type}; edgefleet serves tensors only "
                    "(for skl2onnx classifiers, convert with options={'zipmap': False})",
                    reason="model_signature",
                )
            out.append(TensorSpec(name=t.name, dtype=_ORT_DTYPES[t.type], shape=tuple(
                d if isinstance(d, int) else None for d in t.shape)))
        return tuple(out)

    return specs(sess.get_inputs(), "input"), specs(sess.get_outputs(), "output")


def load_reference_data(path: Path) -> tuple[npt.NDArray[np.float64], str]:
    """Training inputs as a 2-D float array, and the sha256 of the file."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise BadRequest(f"cannot read reference data {path}: {exc}") from exc
    try:
        if path.suffix == ".npy":
            arr = np.load(io.BytesIO(raw), allow_pickle=False)
        elif path.suffix == ".csv":
            text = raw.decode("utf-8").splitlines()
            first = text[0].split(",") if text else []
            try:
                [float(x) for x in first]
                skip = 0
            except ValueError:
                skip = 1  # a header row
            arr = np.loadtxt(io.StringIO("\n".join(text)), delimiter=",", skiprows=skip, ndmin=2)
        else:
            raise BadRequest(f"{path.name}: reference data must be .npy or .csv, got {path.suffix!r}")
    except BadRequest:
        raise
    except (ValueError, UnicodeDecodeError) as exc:
        raise BadRequest(f"{path.name} is not a numeric table: {exc}") from exc
    arr = np.asarray(arr, dtype=np.float64)
    if arr.ndim == 1:
        arr = arr.reshape(-1, 1)
    if arr.ndim != 2 or arr.shape[0] < 2:
        raise BadRequest(f"{path.name}: expected a 2-D table with at least 2 rows, got shape {arr.shape}")
    return arr, hashlib.sha256(raw).hexdigest()


def compute_reference(
    data: npt.NDArray[np.float64],
    *,
    bins: int = 10,
    names: list[str] | None = None,
    outputs: npt.NDArray[Any] | None = None,
) -> Reference:
    """Quantile bins per feature (deduplicated for discrete features) and their frequencies."""
    feats = []
    for j in range(data.shape[1]):
        col = data[:, j]
        col = col[~np.isnan(col)]
        edges = np.unique(np.quantile(col, np.linspace(0, 1, bins + 1)))
        if len(edges) < 2:
            edges = np.array([edges[0] - 0.5, edges[0] + 0.5])
        idx = np.clip(np.searchsorted(edges, col, side="right") - 1, 0, len(edges) - 2)
        counts = np.bincount(idx, minlength=len(edges) - 1)
        freqs = counts / max(1, counts.sum())
        feats.append(FeatureReference(
            name=names[j] if names else f"f{j}",
            edges=tuple(float(e) for e in edges),
            freqs=tuple(round(float(f), 6) for f in freqs),
        ))
    output = None
    if outputs is not None:
        out = np.asarray(outputs).reshape(-1)
        if out.dtype.kind in "iub":
            labels, counts = np.unique(out, return_counts=True)
            output = {"classes": {str(k): round(float(c) / len(out), 6) for k, c in zip(labels, counts, strict=True)}}
    return Reference(features=tuple(feats), rows=int(data.shape[0]), output=output)


def run_first_output(data: bytes, rows: npt.NDArray[np.float64]) -> npt.NDArray[Any]:
    sess = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    inp = sess.get_inputs()[0]
    dtype = np.float64 if inp.type == "tensor(double)" else np.float32
    result: npt.NDArray[Any] = sess.run(None, {inp.name: rows.astype(dtype)})[0]
    return result
