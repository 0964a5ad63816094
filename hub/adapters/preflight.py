"""Preflight sets: inputs with expected outputs that a candidate must reproduce before it serves.

Built at publish time on the publisher's machine (:func:`build_preflight`), checked again by the
hub before anything is stored (:func:`check_preflight`), and checked a third time by every device
on its own hardware before a candidate may serve or shadow. The blob is an ``.npz`` (no pickles):

* ``input``: float32, NxF, fed to the model's first input;
* ``output:<onnx output name>``: the expected values — integer labels as int64 (they must agree on
  at least ``label_agreement`` of the rows), scores and probabilities as float32 (they must be
  ``numpy.allclose(actual, expected, rtol, atol)``).

Expected outputs come from the source scikit-learn estimator when one is given (so the set also
checks the conversion), else from ONNX Runtime on the hub (then it checks the device's runtime).
"""

from __future__ import annotations

import io
from collections.abc import Mapping
from typing import Any

import numpy as np
import numpy.typing as npt
import onnxruntime as ort

from edgefleet.hub.errors import BadRequest

__all__ = ["DEFAULT_TOLERANCE", "build_preflight", "check_preflight"]

DEFAULT_TOLERANCE = {"atol": 1e-4, "rtol": 1e-3, "label_agreement": 1.0}
MAX_ROWS = 4096


def _session(model: bytes) -> ort.InferenceSession:
    return ort.InferenceSession(model, providers=["CPUExecutionProvider"])


def build_preflight(model: bytes, data: npt.NDArray[Any], estimator: Any | None = None, rows: int = 64) -> bytes:
    """The ``.npz`` preflight blob for ``model`` on the first ``rows`` rows of ``data``."""
    if not 1 <= rows <= MAX_ROWS:
        raise BadRequest(f"preflight rows must be in 1..{MAX_ROWS}, got {rows}")
    x = np.ascontiguousarray(np.asarray(data, dtype=np.float32)[:rows])
    if x.ndim != 2 or len(x) == 0:
        raise BadRequest(f"preflight data must be a 2-D table with rows, got shape {x.shape}")
    sess = _session(model)
    actual = sess.run(None, {sess.get_inputs()[0].name: x})
    names = [o.name for o in sess.get_outputs()]
    expected: dict[str, npt.NDArray[Any]] = {}
    if estimator is None:
        for name, arr in zip(names, actual, strict=True):
            a = np.asarray(arr)
            if a.dtype.kind in "iub":
                expected[name] = a.astype(np.int64)
            elif a.dtype.kind == "f":
                expected[name] = a.astype(np.float32)
    else:
        from_sklearn: list[npt.NDArray[Any]] = [np.asarray(estimator.predict(x))]
        if hasattr(estimator, "predict_proba") and len(names) > 1:
            from_sklearn.append(np.asarray(estimator.predict_proba(x)))
        for name, want, got in zip(names, from_sklearn, actual, strict=False):
            want_arr = want.reshape(np.asarray(got).shape) if want.size == np.asarray(got).size else want
            if want_arr.dtype.kind in "iub":
                expected[name] = want_arr.astype(np.int64)
            elif want_arr.dtype.kind == "f":
                expected[name] = want_arr.astype(np.float32)
            # string class labels are left out: the contract carries numbers only
    if not expected:
        raise BadRequest("the model has no numeric output a preflight set could check")
    buf = io.BytesIO()
    arrays: dict[str, Any] = {"input": x, **{f"output:{k}": v for k, v in expected.items()}}
    np.savez(buf, **arrays)
    return buf.getvalue()


def _load(blob: bytes) -> dict[str, npt.NDArray[Any]]:
    try:
        with np.load(io.BytesIO(blob), allow_pickle=False) as npz:
            arrays = {k: np.asarray(npz[k]) for k in npz.files}
    except Exception as exc:  # zipfile, pickle refusal, bad headers: all "not a preflight set"
        raise BadRequest(f"preflight blob is not a readable .npz without pickles: {exc}") from exc
    if "input" not in arrays or not any(k.startswith("output:") for k in arrays):
        raise BadRequest(f"preflight blob needs 'input' and at least one 'output:<name>', has {sorted(arrays)}")
    return arrays


def check_preflight(model: bytes, blob: bytes, tolerance: Mapping[str, float] | None = None) -> dict[str, Any]:
    """Run ``model`` on the set; return a summary, or raise :class:`BadRequest` saying what differs."""
    tol = {**DEFAULT_TOLERANCE, **(tolerance or {})}
    arrays = _load(blob)
    x = arrays["input"]
    if x.dtype != np.float32 or x.ndim != 2:
        raise BadRequest(f"preflight input must be float32 NxF, got {x.dtype} {x.shape}")
    sess = _session(model)
    names = [o.name for o in sess.get_outputs()]
    try:
        actual = dict(zip(names, sess.run(None, {sess.get_inputs()[0].name: x}), strict=True))
    except Exception as exc:
        raise BadRequest(f"preflight: the model cannot run on the preflight inputs {x.shape}: {exc}") from exc
    checked = {}
    for key, want in arrays.items():
        if not key.startswith("output:"):
            continue
        name = key.removeprefix("output:")
        if name not in actual:
            raise BadRequest(f"preflight names output {name!r}; the model's outputs are {names}")
        got = np.asarray(actual[name])
        if got.dtype.kind == "f" and not np.isfinite(got).all():
            raise BadRequest(f"preflight: output {name!r} has NaN or infinite values")
        if got.size != want.size:
            raise BadRequest(f"preflight: output {name!r} has {got.size} values, expected {want.size}")
        got = got.reshape(want.shape)
        if want.dtype.kind in "iub":
            agree = float((got == want).mean())
            if agree < tol["label_agreement"]:
                raise BadRequest(f"preflight: output {name!r} agrees with the expected labels on {agree:.1%} of "
                                 f"{len(want)} rows, below the required {tol['label_agreement']:.1%}")
            checked[name] = {"label_agreement": agree}
        else:
            diff = np.abs(got.astype(np.float64) - want.astype(np.float64))
            ok = np.isclose(got, want, rtol=tol["rtol"], atol=tol["atol"])
            if not ok.all():
                raise BadRequest(
                    f"preflight: output {name!r} differs from the expected values by up to {diff.max():.3g} on "
                    f"{int((~ok).reshape(len(want), -1).any(axis=1).sum())} of {len(want)} rows "
                    f"(rtol {tol['rtol']}, atol {tol['atol']}); the ONNX model does not reproduce its source")
            checked[name] = {"max_abs_diff": float(diff.max()) if diff.size else 0.0}
    return {"rows": len(x), "outputs": checked, **tol}


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
