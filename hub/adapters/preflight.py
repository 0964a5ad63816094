"""Preflight sets: inputs with expected outputs that a candidate must reproduce before it serves.

Built at publish time on the publisher's machine (:func:`build_preflight`), checked again by the
hub before anything is stored (:func:`check_preflight`), and checked a third time by every device
on its own hardware before a candidate may serve or shadow. The blob is an ``.npz`` without
pickles or object arrays (the format :func:`edgefleet.agent.core.canary.load_preflight` reads):

* the inputs, in one of two forms, never both:

  * ``input``: float32, NxF, when the model's only input is a ``tensor(float)`` table and the
    data is 2-D: the form agents in the field have always read (fed to that input);
  * otherwise ``input:<onnx input name>``, one per model input: any rank, numbers in the model's
    input dtype (float32, float64, int64, ...), strings (``tensor(string)``) as unicode ``U``
    arrays; every input has the same number of rows N;

* ``output:<onnx output name>``: the expected values, one row per input row — labels as int64
  or, for string classes, as ``U`` arrays (they must agree on at least ``label_agreement`` of
  the rows), scores, probabilities and regression values as float32 (they must be
  ``numpy.allclose(actual, expected, rtol, atol)``).

Expected outputs come from the source scikit-learn estimator when one is given (so the set also
checks the conversion), else from ONNX Runtime on the hub (then it checks the device's runtime).
An estimator is called on the input table itself when the model has one input, and on a pandas
DataFrame of one column per model input (each ``[N, 1]``, as skl2onnx converts a pipeline trained
on a DataFrame) when it has several or was trained on a DataFrame with that input's name; without
pandas installed such a set takes its expected outputs from ONNX Runtime instead.
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt
import onnxruntime as ort

from edgefleet.agent.core.canary import (
    PREFLIGHT_DTYPES,
    PREFLIGHT_INPUT,
    PREFLIGHT_INPUT_PREFIX,
    PREFLIGHT_OUTPUT_PREFIX,
    PreflightMismatch,
    PreflightRejected,
    load_preflight,
    preflight_feeds,
    preflight_rows,
)
from edgefleet.hub.adapters.modelfile import text_cells
from edgefleet.hub.errors import BadRequest

__all__ = ["DEFAULT_TOLERANCE", "accept", "build_preflight", "check_preflight"]

DEFAULT_TOLERANCE = {"atol": 1e-4, "rtol": 1e-3, "label_agreement": 1.0}
MAX_ROWS = 4096

Array = npt.NDArray[Any]


def _session(model: bytes) -> ort.InferenceSession:
    return ort.InferenceSession(model, providers=["CPUExecutionProvider"])


def _describe(a: Array) -> str:
    return f"{a.dtype} {list(a.shape)}"


def _inputs(specs: Sequence[Any], data: Array | Mapping[str, npt.ArrayLike], rows: int) -> dict[str, Array]:
    """``data`` as the model's inputs (first ``rows`` rows), each in the dtype a set stores."""
    names = [str(s.name) for s in specs]
    if isinstance(data, Mapping):
        if sorted(map(str, data)) != sorted(names):
            raise BadRequest(f"preflight data has inputs {sorted(map(str, data))}; the model takes inputs {sorted(names)}")
        given = {str(k): np.asarray(v) for k, v in data.items()}
    elif len(names) == 1:
        given = {names[0]: np.asarray(data)}
    else:
        raise BadRequest(f"the model takes inputs {names}: pass the preflight data as a mapping of input name "
                         f"to array, got one array of shape {list(np.shape(data))}")
    out: dict[str, Array] = {}
    for spec in specs:
        name, kind = str(spec.name), str(spec.type)
        a = given[name]
        if a.ndim == 0:
            raise BadRequest(f"preflight input {name!r} must have one row per example, got a scalar")
        if a.ndim == 1 and len(spec.shape or ()) == 2:
            a = a.reshape(-1, 1)  # one table column for an [N, 1] input
        dtype = PREFLIGHT_DTYPES.get(kind)
        if dtype is None:
            raise BadRequest(f"preflight sets carry inputs of types {sorted(PREFLIGHT_DTYPES)}; "
                             f"input {name!r} is {kind}")
        try:
            # a missing text cell is what serving feeds for it (""), not the text "None"
            a = text_cells(a[:rows]).astype(np.str_) if dtype is np.str_ else a[:rows].astype(dtype)
        except (TypeError, ValueError) as exc:
            raise BadRequest(f"preflight input {name!r} ({_describe(a)}) does not convert to the model's {kind}: "
                             f"{exc}") from exc
        out[name] = np.ascontiguousarray(a)
    counts = {k: len(v) for k, v in out.items()}
    if len(set(counts.values())) != 1 or 0 in counts.values():
        raise BadRequest(f"preflight inputs must all have the same, non-zero number of rows, got {counts}")
    return out


def _legacy(specs: Sequence[Any], inputs: Mapping[str, Array]) -> bool:
    """The model's only input is a float table: write the ``input`` form every agent reads."""
    return len(specs) == 1 and str(specs[0].type) == "tensor(float)" and next(iter(inputs.values())).ndim == 2


def _run(sess: ort.InferenceSession, feeds: Mapping[str, Array]) -> list[Any]:
    """All rows in one call, else (a model with a fixed batch of 1) one row at a time, as devices run it.
    String inputs go to ONNX Runtime as object arrays of ``str``."""
    feed = {k: v.astype(object) if v.dtype.kind == "U" else v for k, v in feeds.items()}
    try:
        return list(sess.run(None, feed))
    except Exception as first:
        n = len(next(iter(feed.values())))
        if n < 2:
            raise BadRequest(f"preflight: the model cannot run on the preflight inputs "
                             f"{ {k: list(v.shape) for k, v in feeds.items()} }: {first}") from first
        try:
            parts = [sess.run(None, {k: v[i : i + 1] for k, v in feed.items()}) for i in range(n)]
        except Exception as exc:
            raise BadRequest(f"preflight: the model cannot run on the preflight inputs "
                             f"{ {k: list(v.shape) for k, v in feeds.items()} }: {exc}") from exc
        return [np.concatenate([np.asarray(p[j]) for p in parts]) for j in range(len(parts[0]))]


def _expected(value: Any, rows: int) -> Array | None:
    """An output as the set stores it: int64 labels, ``U`` string labels, float32 numbers; ``None``
    for what a set cannot carry (ZipMap dictionaries, values that are not one row per example)."""
    a = np.asarray(value)
    if a.ndim == 0 or a.shape[0] != rows:
        return None
    kind = a.dtype.kind
    if kind in "iub":
        return a.astype(np.int64)
    if kind == "f":
        return a.astype(np.float32)
    if kind in "US" or (kind == "O" and all(isinstance(v, str) for v in a.reshape(-1))):
        return a.astype(str)
    return None


def _estimator_input(estimator: Any, specs: Sequence[Any], inputs: Mapping[str, Array], legacy: bool) -> Any:
    """What ``estimator`` is called on: the table itself for a one-input model (unless it was
    trained on a DataFrame with that input's name), else a DataFrame of one column per input;
    ``None`` when that needs pandas and pandas is not installed."""
    names = [str(s.name) for s in specs]
    trained_on = [str(c) for c in getattr(estimator, "feature_names_in_", ())]
    if legacy or (len(names) == 1 and trained_on != names):
        return inputs[names[0]]
    wide = {k: _describe(v) for k, v in inputs.items() if not (v.ndim == 1 or (v.ndim == 2 and v.shape[1] == 1))}
    if wide:
        raise BadRequest(f"an estimator is called on a DataFrame of one column per model input ([N, 1] each); "
                         f"inputs {wide} are not columns: publish without the estimator to take the expected "
                         "outputs from ONNX Runtime")
    try:
        import pandas as pd
    except ImportError:
        return None
    order = trained_on if sorted(trained_on) == sorted(names) else names
    return pd.DataFrame({k: inputs[k].reshape(-1) for k in order})


def build_preflight(model: bytes, data: Array | Mapping[str, npt.ArrayLike], estimator: Any | None = None,
                    rows: int = 64) -> bytes:
    """The ``.npz`` preflight blob for ``model`` on the first ``rows`` rows of ``data``.

    ``data`` is a 2-D numeric array (a model with one input) or a mapping of the model's input
    names to arrays (any rank; 1-D arrays are taken as one column for an ``[N, 1]`` input; string
    columns for ``tensor(string)`` inputs), all with the same number of rows; each is converted
    to its input's dtype. Expected outputs come from ``estimator`` when given (see the module
    docstring: a one-input model calls it on the table, several inputs on a pandas DataFrame of
    one column per input; without pandas they come from ONNX Runtime), else from ONNX Runtime.
    Raises :class:`BadRequest` saying what was expected and what came."""
    if not 1 <= rows <= MAX_ROWS:
        raise BadRequest(f"preflight rows must be in 1..{MAX_ROWS}, got {rows}")
    sess = _session(model)
    specs = sess.get_inputs()
    inputs = _inputs(specs, data, rows)
    n = len(next(iter(inputs.values())))
    legacy = _legacy(specs, inputs)
    actual = _run(sess, inputs)
    names = [o.name for o in sess.get_outputs()]
    expected: dict[str, Array] = {}
    source = None if estimator is None else _estimator_input(estimator, specs, inputs, legacy)
    if estimator is None or source is None:
        for name, arr in zip(names, actual, strict=True):
            want = _expected(arr, n)
            if want is not None:
                expected[name] = want
    else:
        try:
            from_sklearn: list[Array] = [np.asarray(estimator.predict(source))]
            if hasattr(estimator, "predict_proba") and len(names) > 1:
                from_sklearn.append(np.asarray(estimator.predict_proba(source)))
        except Exception as exc:  # whatever the estimator raises: it does not take these inputs
            raise BadRequest(f"preflight: the estimator cannot predict on the preflight inputs: {exc}") from exc
        for name, want, got in zip(names, from_sklearn, actual, strict=False):
            shape = np.shape(got)
            want_arr = want.reshape(shape) if want.size == int(np.prod(shape)) else want
            stored = _expected(want_arr, n)
            if stored is not None:
                expected[name] = stored
    if not expected:
        raise BadRequest(f"the model has no output a preflight set could check (outputs {names})")
    arrays: dict[str, Any] = (
        {PREFLIGHT_INPUT: inputs[str(specs[0].name)]} if legacy
        else {f"{PREFLIGHT_INPUT_PREFIX}{k}": v for k, v in inputs.items()}
    )
    arrays.update({f"{PREFLIGHT_OUTPUT_PREFIX}{k}": v for k, v in expected.items()})
    buf = io.BytesIO()
    np.savez(buf, allow_pickle=False, **arrays)
    return buf.getvalue()


def _load(blob: bytes) -> dict[str, Array]:
    try:
        arrays = load_preflight(blob)
    except PreflightRejected as exc:  # zipfile, pickle refusal, bad headers, shapes: "not a preflight set"
        raise BadRequest(str(exc)) from exc
    if not any(k.startswith(PREFLIGHT_OUTPUT_PREFIX) for k in arrays):
        raise BadRequest(f"preflight blob needs at least one 'output:<name>' array, has {sorted(arrays)}")
    legacy = arrays.get(PREFLIGHT_INPUT)
    if legacy is not None and legacy.dtype != np.float32:
        raise BadRequest(f"preflight 'input' must be float32 NxF, got {_describe(legacy)}")
    return arrays


def _same(got: Array, want: Array) -> Array:
    if got.dtype.kind in "iub" and want.dtype.kind in "iub":
        return np.asarray(got.astype(np.int64) == want.astype(np.int64))
    return np.asarray(got.astype(str) == want.astype(str))


def check_preflight(model: bytes, blob: bytes, tolerance: Mapping[str, float] | None = None) -> dict[str, Any]:
    """Run ``model`` on the set (either input form); return a summary, or raise
    :class:`BadRequest` saying what differs."""
    tol = {**DEFAULT_TOLERANCE, **(tolerance or {})}
    arrays = _load(blob)
    sess = _session(model)
    try:
        feeds = preflight_feeds(arrays, sess.get_inputs())
    except PreflightMismatch as exc:
        raise BadRequest(f"preflight: {exc}") from exc
    n = preflight_rows(arrays)
    names = [o.name for o in sess.get_outputs()]
    actual = dict(zip(names, _run(sess, feeds), strict=True))
    checked = {}
    for key, want in arrays.items():
        if not key.startswith(PREFLIGHT_OUTPUT_PREFIX):
            continue
        name = key.removeprefix(PREFLIGHT_OUTPUT_PREFIX)
        if name not in actual:
            raise BadRequest(f"preflight names output {name!r}; the model's outputs are {names}")
        got = np.asarray(actual[name])
        if got.dtype.kind == "f" and not np.isfinite(got).all():
            raise BadRequest(f"preflight: output {name!r} has NaN or infinite values")
        if got.size != want.size:
            raise BadRequest(f"preflight: output {name!r} has {got.size} values, expected {want.size}")
        got = got.reshape(want.shape)
        if want.dtype.kind in "iubU":
            agree = float(_same(got, want).mean())
            if agree < tol["label_agreement"]:
                raise BadRequest(f"preflight: output {name!r} agrees with the expected labels on {agree:.1%} of "
                                 f"{len(want)} rows, below the required {tol['label_agreement']:.1%}")
            checked[name] = {"label_agreement": agree}
        else:
            if got.dtype.kind not in "fiub":
                raise BadRequest(f"preflight: output {name!r} is {_describe(got)}, the set expects numbers")
            diff = np.abs(got.astype(np.float64) - want.astype(np.float64))
            ok = np.isclose(got, want, rtol=tol["rtol"], atol=tol["atol"])
            if not ok.all():
                raise BadRequest(
                    f"preflight: output {name!r} differs from the expected values by up to {diff.max():.3g} on "
                    f"{int((~ok).reshape(len(want), -1).any(axis=1).sum())} of {len(want)} rows "
                    f"(rtol {tol['rtol']}, atol {tol['atol']}); the ONNX model does not reproduce its source")
            checked[name] = {"max_abs_diff": float(diff.max()) if diff.size else 0.0}
    return {"rows": n, "inputs": sorted(feeds), "outputs": checked, **tol}


def accept(value: object, model: bytes) -> tuple[bytes, dict[str, Any]] | None:
    """The publish request's ``preflight`` ({blob_b64, atol?, rtol?, label_agreement?}) checked
    against ``model``: the blob and the record the registry keeps (sha256, size, rows, tolerances)."""
    if value is None:
        return None
    import base64
    import binascii
    import hashlib

    if not isinstance(value, Mapping) or not isinstance(value.get("blob_b64"), str):
        raise BadRequest("preflight must be {blob_b64: base64 .npz, atol?, rtol?, label_agreement?}")
    try:
        blob = base64.b64decode(value["blob_b64"], validate=True)
    except binascii.Error as exc:
        raise BadRequest(f"preflight blob_b64 is not base64: {exc}") from exc
    tol: dict[str, float] = {}
    for k, default in DEFAULT_TOLERANCE.items():
        v = value.get(k, default)
        if not isinstance(v, int | float) or isinstance(v, bool) or not 0 <= v <= (1 if k == "label_agreement" else 1e6):
            raise BadRequest(f"preflight {k} must be a non-negative number"
                             f"{' at most 1' if k == 'label_agreement' else ''}, got {v!r}")
        tol[k] = float(v)
    summary = check_preflight(model, blob, tol)
    return blob, {"sha256": hashlib.sha256(blob).hexdigest(), "size": len(blob), "rows": summary["rows"], **tol}
