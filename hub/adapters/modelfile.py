"""Turning what an ML engineer has into a publishable, validated ONNX model.

* :func:`load_model_file` takes an ``.onnx`` file, or a pickled / joblib scikit-learn estimator
  which it converts with skl2onnx (ZipMap off, so every output is a plain tensor an edge device
  can serve over OIP v2).
* :func:`validate_onnx` is the gate before anything is stored: the agent's structural guard,
  ``onnx.checker``, a real ONNX Runtime session, and tensor-only inputs and outputs.
* :func:`read_data` reads training (or preflight) data: ``.npy``, ``.npz`` (one array per
  input), ``.csv`` or ``.parquet`` (named columns, numbers and text); :func:`match_inputs` lines
  it up with the model's inputs; :func:`compute_inputs_reference` turns it into the reference
  that telemetry and drift use.

Unpickling runs code: only pass model files you trust (your own training output).
"""

from __future__ import annotations

import csv
import hashlib
import io
import math
import pickle
import zipfile
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
    is_categorical,
)
from edgefleet.hub.errors import BadRequest

__all__ = [
    "as_numbers",
    "channel_axis",
    "compute_inputs_reference",
    "compute_reference",
    "compute_tensor_reference",
    "estimator_columns",
    "feeds_for",
    "is_categorical",
    "load_estimator",
    "load_model_file",
    "match_inputs",
    "model_inputs",
    "read_data",
    "run_outputs",
    "sklearn_to_onnx",
    "text_cells",
    "validate_onnx",
]

_ORT_DTYPES = {
    "tensor(float)": "float32", "tensor(double)": "float64", "tensor(int64)": "int64",
    "tensor(int32)": "int32", "tensor(string)": "str", "tensor(bool)": "bool",
}  # fmt: skip


def sklearn_to_onnx(estimator: Any, n_features: int, columns: dict[str, bool] | None = None) -> bytes:
    """Convert a fitted scikit-learn estimator to ONNX bytes: one float32 input ``input`` of
    ``[N, n_features]``, or with ``columns`` (name -> is text) one ``[N, 1]`` input per column, a
    string tensor for text and float32 for numbers, as a pipeline fitted on a DataFrame with
    string columns needs (its ``ColumnTransformer`` selects the columns by these names)."""
    from skl2onnx import to_onnx
    from skl2onnx.common.data_types import FloatTensorType, StringTensorType

    options: dict[Any, Any] = {}
    final = estimator.steps[-1][1] if hasattr(estimator, "steps") else estimator
    if hasattr(final, "predict_proba"):
        options = {id(final): {"zipmap": False}}
    initial: list[tuple[str, Any]] = [("input", FloatTensorType([None, n_features]))]
    if columns:
        initial = [(name, StringTensorType([None, 1]) if text else FloatTensorType([None, 1]))
                   for name, text in columns.items()]
    try:
        onx = to_onnx(estimator, initial_types=initial, options=options or None)
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


def load_model_file(path: Path, n_features: int | None = None, estimator: Any | None = None,
                    columns: dict[str, bool] | None = None) -> tuple[bytes, str]:
    """Return ``(onnx_bytes, source_description)`` for an .onnx or pickled model file
    (``estimator``: the one :func:`load_estimator` already read from ``path``). LightGBM and
    XGBoost models go through onnxmltools (:mod:`hub.adapters.gbm`), everything else through
    skl2onnx; ``columns`` (name -> is text) asks for one input per column (:func:`sklearn_to_onnx`)."""
    from edgefleet.hub.adapters.gbm import gbm_to_onnx

    est = estimator if estimator is not None else load_estimator(path)
    if est is None:
        try:
            return path.read_bytes(), "onnx"
        except OSError as exc:
            raise BadRequest(f"cannot read model file {path}: {exc}") from exc
    source = f"sklearn:{type(est).__module__}.{type(est).__name__}"
    if columns:
        converted = gbm_to_onnx(est, len(columns), columns)  # a Pipeline ending in LightGBM/XGBoost
        if converted is not None:
            return converted, f"onnxmltools:{type(est).__module__}.{type(est).__name__}"
        return sklearn_to_onnx(est, len(columns), columns), source
    n = n_features or getattr(est, "n_features_in_", None)
    if not n:
        raise BadRequest(f"cannot tell how many features {type(est).__name__} takes; pass --reference")
    converted = gbm_to_onnx(est, int(n))
    if converted is not None:
        return converted, f"onnxmltools:{type(est).__module__}.{type(est).__name__}"
    return sklearn_to_onnx(est, int(n)), source


def estimator_columns(estimator: Any, arrays: dict[str, npt.NDArray[Any]], named: bool,
                      fname: str) -> dict[str, bool] | None:
    """The columns to convert ``estimator`` with, one input each (name -> is text), when the
    columns it takes hold text (a column is text when some cell is not a number): the estimator's
    own ``feature_names_in_`` (a DataFrame's columns at fit) in their order, else the file's. None
    for all-numeric data (one float input, as before)."""
    if not named:
        return None
    fitted = getattr(estimator, "feature_names_in_", None)
    names = [str(n) for n in fitted] if fitted is not None else list(arrays)
    missing = [n for n in names if n not in arrays]
    if missing:
        raise BadRequest(f"{fname}: {type(estimator).__name__} was fitted on columns {names}; the file lacks {missing}")
    text = {n: as_numbers(arrays[n]) is None for n in names}
    return text if any(text.values()) else None


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


def read_data(path: Path) -> tuple[dict[str, npt.NDArray[Any]], str, bool]:
    """Training (or preflight) data as ``(arrays, sha256 of the file, named)``:

    * ``.npy``: one array, ``{"": array}`` (not named): a table, or N-D samples such as images;
    * ``.npz``: one array per model input, by name (numbers or strings);
    * ``.csv``: a header row of names makes named columns of text as written (an empty cell
      ``None``), numbers or categories as the model's inputs say (:func:`match_inputs`); without
      a header, a numeric table as one array;
    * ``.parquet`` (needs pyarrow): named columns, numbers as float64 (nulls NaN), everything else
      as text (nulls missing).

    Raises :class:`BadRequest` naming the file and what it expected."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise BadRequest(f"cannot read data file {path}: {exc}") from exc
    digest = hashlib.sha256(raw).hexdigest()
    suffix = path.suffix.lower()
    try:
        if suffix == ".npy":
            return {"": np.load(io.BytesIO(raw), allow_pickle=False)}, digest, False
        if suffix == ".npz":
            with np.load(io.BytesIO(raw), allow_pickle=False) as z:
                return {k: np.asarray(z[k]) for k in z.files}, digest, True
        if suffix == ".csv":
            columns, named = _read_csv(raw.decode("utf-8-sig"), path.name)
            return columns, digest, named
        if suffix == ".parquet":
            return _read_parquet(raw, path.name), digest, True
    except BadRequest:
        raise
    except (OSError, ValueError, UnicodeDecodeError, zipfile.BadZipFile, EOFError) as exc:
        raise BadRequest(f"cannot read {path.name} as {suffix} data: {exc}") from exc
    raise BadRequest(f"{path.name}: data must be .npy, .npz, .csv or .parquet, got {path.suffix!r}")
def _read_csv(text: str, fname: str) -> tuple[dict[str, npt.NDArray[Any]], bool]:
    """Named columns as text (``None`` for an empty cell), each cell as written: whether a column
    is numbers or categories is the model's to say (``"02134"`` is a postcode to a string input,
    2134.0 to a float one; see :func:`match_inputs`). Without a header, one numeric table."""
    rows = [r for r in csv.reader(io.StringIO(text)) if r]
    if not rows:
        raise BadRequest(f"{fname} is empty")
    width = len(rows[0])
    short = next((i for i, r in enumerate(rows) if len(r) != width), None)
    if short is not None:
        raise BadRequest(f"{fname}: line {short + 1} has {len(rows[short])} fields, the first line has {width}")
    header = not all(_number(x) is not None for x in rows[0])
    body = rows[1:] if header else rows
    if not header:
        return {"": np.asarray([[float(x) for x in r] for r in body], dtype=np.float64)}, False
    names = [h.strip() for h in rows[0]]
    if len(set(names)) != len(names) or not all(names):
        raise BadRequest(f"{fname}: the header row needs distinct, non-empty column names, got {names}")
    return {name: np.asarray([r[j] or None for r in body], dtype=object) for j, name in enumerate(names)}, True


def as_numbers(a: npt.NDArray[Any]) -> npt.NDArray[np.float64] | None:
    """A column as float64 (missing cells NaN), or None when some cell is not a number."""
    if not is_categorical(a):
        return np.asarray(a, dtype=np.float64)
    out = np.empty(a.shape, dtype=np.float64)
    flat = out.reshape(-1)
    for i, v in enumerate(np.asarray(a, dtype=object).reshape(-1).tolist()):
        if v is None or (isinstance(v, float) and math.isnan(v)):
            flat[i] = math.nan
            continue
        number = _number(v) if isinstance(v, str) else None
        if number is None:
            return None
        flat[i] = number
    return out


def _first_text(a: npt.NDArray[Any]) -> str:
    for v in np.asarray(a, dtype=object).reshape(-1).tolist():
        if v is not None and (not isinstance(v, str) or _number(v) is None):
            return repr(v)
    return "?"


def _number(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def _read_parquet(raw: bytes, fname: str) -> dict[str, npt.NDArray[Any]]:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError as exc:
        raise BadRequest(f"{fname}: reading .parquet needs pyarrow (pip install 'edgefleet[parquet]'), "
                         "or give the data as .csv") from exc
    table = pq.read_table(pa.BufferReader(raw))
    columns: dict[str, npt.NDArray[Any]] = {}
    for name, col in zip(table.column_names, table.columns, strict=True):
        kind = col.type
        if pa.types.is_integer(kind) or pa.types.is_floating(kind) or pa.types.is_boolean(kind):
            columns[name] = np.asarray(col.to_numpy(zero_copy_only=False), dtype=np.float64)
        else:
            columns[name] = np.asarray([None if v is None else str(v) for v in col.to_pylist()], dtype=object)
    return columns


def model_inputs(data: bytes) -> list[tuple[str, str, int | None]]:
    """The model's inputs as ``(name, ONNX Runtime type, width)`` in order; ``width`` is the
    fixed second dimension of a 2-D input (a table's column count), else None."""
    sess = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    return [(i.name, str(i.type), i.shape[1] if len(i.shape) == 2 and isinstance(i.shape[1], int) else None)
            for i in sess.get_inputs()]


def match_inputs(arrays: dict[str, npt.NDArray[Any]], named: bool, inputs: list[tuple[str, str, int | None]],
                 fname: str, order: list[str] | None = None) -> dict[str, npt.NDArray[Any]]:
    """The data as one array per model input, by name, in the type each input takes:

    * one unnamed array (``.npy``, a CSV without header) feeds a model with one input;
    * named arrays whose names include every model input feed them by name (a model converted
      from a DataFrame has one ``[N, 1]`` input per column; 1-D columns become ``[N, 1]``);
      an ``.npz`` must hold exactly the model's inputs;
    * named numeric columns feed a model with one input as a table: the columns ``order`` names
      (a scikit-learn estimator's ``feature_names_in_``) in that order, else every column of the
      file in its order, which must then be as many as the input's width.

    A string input takes the column's text; a numeric one its numbers (a CSV cell that is not a
    number is refused, naming the column and the cell). Every input needs the same number of
    samples, at least 2."""
    names = [n for n, _, _ in inputs]
    npz = fname.endswith(".npz")
    if not named:
        if len(names) != 1:
            raise BadRequest(f"{fname} holds one array; the model has inputs {names}: give an .npz with one "
                             "array per input, or a table with a column per input")
        out = {names[0]: arrays[""]}
    elif set(names) <= set(arrays) and (not npz or set(arrays) == set(names)):
        out = {n: arrays[n] for n in names}
    elif len(names) == 1 and not npz:
        cols = order if order is not None else list(arrays)
        missing = [c for c in cols if c not in arrays]
        if missing:
            raise BadRequest(f"{fname}: the model was fitted on columns {cols}; the file lacks {missing}")
        width = inputs[0][2]
        if width is not None and width != len(cols):
            raise BadRequest(f"{fname}: the model's input {names[0]!r} takes {width} columns, the file has "
                             f"{len(cols)}: {cols} (leave out the target and other columns)")
        numbers = {c: as_numbers(arrays[c]) for c in cols}
        text = [c for c, v in numbers.items() if v is None]
        if text:
            raise BadRequest(f"{fname}: the model's one input {names[0]!r} takes numbers; columns {text} hold text "
                             f"such as {_first_text(arrays[text[0]])}")
        out = {names[0]: np.column_stack([v for v in numbers.values() if v is not None])}
    else:
        raise BadRequest(f"{fname}: expected {'exactly ' if npz else ''}the model's inputs {names} by name"
                         f"{'' if npz else ', or numeric columns for its one input'}, got {sorted(arrays)}")
    out = {n: (a.reshape(-1, 1) if a.ndim == 1 else a) for n, a in out.items()}
    sizes = {n: len(a) for n, a in out.items()}
    if len(set(sizes.values())) != 1 or min(sizes.values()) < 2:
        raise BadRequest(f"{fname}: every input needs the same number of samples, at least 2, got {sizes}")
    for n, kind, _ in inputs:
        a = out[n]
        if kind == "tensor(string)":
            if not is_categorical(a):
                raise BadRequest(f"{fname}: input {n!r} is {kind}, the data for it is numbers")
            continue
        numeric = as_numbers(a)
        if numeric is None:
            raise BadRequest(f"{fname}: input {n!r} is {kind}, the data for it is text such as {_first_text(a)}")
        out[n] = numeric if is_categorical(a) else a
    return out


def text_cells(a: npt.ArrayLike) -> npt.NDArray[Any]:
    """Text cells as serving feeds them to a ``tensor(string)`` input: an object array of ``str``
    of the same shape, a missing cell (``None``, NaN) as ``""``."""
    flat = [("" if v is None or v != v else str(v)) for v in np.asarray(a, dtype=object).reshape(-1).tolist()]  # noqa: PLR0124 (NaN)
    return np.asarray(flat, dtype=object).reshape(np.shape(a))


def feeds_for(inputs: list[tuple[str, str, int | None]], data: dict[str, npt.NDArray[Any]]) -> dict[str, npt.NDArray[Any]]:
    """Data by input name in the dtype each input takes (strings as Python ``str`` objects, a
    missing value as ``""``)."""
    types = {"tensor(double)": np.float64, "tensor(int64)": np.int64, "tensor(int32)": np.int32,
             "tensor(bool)": np.bool_}
    feeds = {}
    for name, kind, _ in inputs:
        a = data[name]
        if kind == "tensor(string)":
            feeds[name] = text_cells(a)
        else:
            feeds[name] = np.asarray(a, dtype=types.get(kind, np.float32))
    return feeds


def run_outputs(data: bytes, inputs: dict[str, npt.NDArray[Any]]) -> dict[str, npt.NDArray[Any]]:
    """Every output of the model on ``inputs`` (by input name), by output name, in order."""
    sess = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    spec: list[tuple[str, str, int | None]] = [(i.name, str(i.type), None) for i in sess.get_inputs()]
    names = [o.name for o in sess.get_outputs()]
    return dict(zip(names, sess.run(None, feeds_for(spec, inputs)), strict=True))
