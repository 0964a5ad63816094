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
from edgefleet.agent.contract.wire import TensorSpec
from edgefleet.hub.core.reference import (  # re-exported: the publish path's names
    channel_axis,
    compute_inputs_reference,
    compute_reference,
    compute_tensor_reference,
)
from edgefleet.hub.errors import BadRequest

__all__ = [
    "channel_axis",
    "compute_inputs_reference",
    "compute_reference",
    "compute_tensor_reference",
    "first_input_name",
    "input_names",
    "load_estimator",
    "load_model_file",
    "load_reference_data",
    "load_reference_inputs",
    "run_outputs",
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


def load_reference_inputs(path: Path, input_names: list[str]) -> tuple[dict[str, npt.NDArray[np.float64]], str]:
    """Training inputs of a model with several inputs: an ``.npz`` with one array per input, named
    as the model names them (each a table or N-D samples, all with the same number of samples)."""
    try:
        raw = path.read_bytes()
        with np.load(io.BytesIO(raw), allow_pickle=False) as z:
            arrays = {k: np.asarray(z[k], dtype=np.float64) for k in z.files}
    except (OSError, ValueError) as exc:
        raise BadRequest(f"cannot read {path.name} as .npz (one array per model input): {exc}") from exc
    missing = [n for n in input_names if n not in arrays]
    if missing or set(arrays) - set(input_names):
        raise BadRequest(f"{path.name}: expected one array per model input {input_names}, got {sorted(arrays)}")
    sizes = {k: len(v) for k, v in arrays.items()}
    if len(set(sizes.values())) != 1 or min(sizes.values()) < 2:
        raise BadRequest(f"{path.name}: every input needs the same number of samples (at least 2), got {sizes}")
    return {n: (arrays[n].reshape(-1, 1) if arrays[n].ndim == 1 else arrays[n]) for n in input_names}, \
        hashlib.sha256(raw).hexdigest()


def input_names(data: bytes) -> list[str]:
    return [i.name for i in ort.InferenceSession(data, providers=["CPUExecutionProvider"]).get_inputs()]


def run_outputs(data: bytes, inputs: dict[str, npt.NDArray[np.float64]]) -> npt.NDArray[Any]:
    """The first output for a model with several inputs."""
    sess = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    feeds = {i.name: inputs[i.name].astype(np.float64 if i.type == "tensor(double)" else np.float32)
             for i in sess.get_inputs()}
    result: npt.NDArray[Any] = sess.run(None, feeds)[0]
    return result


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
    if arr.ndim < 2 or arr.shape[0] < 2:
        raise BadRequest(f"{path.name}: expected a 2-D table with at least 2 rows, or at least 2 samples of an "
                         f"N-D input ([N, C, H, W] images and the like), got shape {arr.shape}")
    return arr, hashlib.sha256(raw).hexdigest()


def first_input_name(data: bytes) -> str:
    """The model's first input, whose name the tensor statistics carry (``image[c0]``)."""
    return str(ort.InferenceSession(data, providers=["CPUExecutionProvider"]).get_inputs()[0].name)


def run_first_output(data: bytes, rows: npt.NDArray[np.float64]) -> npt.NDArray[Any]:
    sess = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    inp = sess.get_inputs()[0]
    dtype = np.float64 if inp.type == "tensor(double)" else np.float32
    result: npt.NDArray[Any] = sess.run(None, {inp.name: rows.astype(dtype)})[0]
    return result
