"""Registry lineage: metrics and tags, comparing two versions, and finding the decision that put a
version on a device. Pure functions over the dicts the registry stores; no I/O, no clock.

* :func:`parse_pairs` / :func:`clean_lineage` check what a publisher sends (``--metric``,
  ``--tag``, ``--parent``, ``--source``) so the hub stores only well-formed lineage.
* :func:`reference_psi` compares two *training references* (not telemetry; live drift lives in
  :mod:`hub.core.drift`): B's binned distribution is re-binned onto A's edges, assuming values are spread
  evenly inside each bin, and PSI is summed over A's bins. Bins are floored at ``PSI_FLOOR`` so an
  empty bin gives a large but finite term.
* :func:`diff_versions` puts two versions side by side: signature, metrics, lineage, PSI.
* :func:`find_decision` picks, from audit entries, the latest one that assigned ``model version``
  to ``device`` at or before a given time.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from edgefleet.hub.errors import BadRequest

__all__ = [
    "DECISION_ACTIONS",
    "PSI_FLOOR",
    "clean_lineage",
    "diff_versions",
    "find_decision",
    "parse_pairs",
    "psi",
    "reference_psi",
]

PSI_FLOOR = 1e-4
MAX_KEY = 64
MAX_VALUE = 1024
MAX_ITEMS = 200
# Audit actions that change what a device runs; rollouts (another module) add theirs here.
DECISION_ACTIONS = ("deploy", "rollback", "rollout_step", "rollout_promote", "rollout_rollback",
                    "promote", "rollout_start", "rollout_join", "rollout_abort")


def _key(k: object, what: str) -> str:
    if not isinstance(k, str) or not k or len(k) > MAX_KEY or not k.isprintable():
        raise BadRequest(f"{what} name must be 1-{MAX_KEY} printable characters, got {k!r}")
    return k


def parse_pairs(items: Iterable[str], what: str, *, numeric: bool) -> dict[str, Any]:
    """``["auc=0.91", ...]`` -> ``{"auc": 0.91}``; numbers when ``numeric``, else strings."""
    out: dict[str, Any] = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep:
            raise BadRequest(f"--{what} {item!r}: expected NAME=VALUE")
        out[_key(name.strip(), what)] = value.strip()
    return _clean_map(out, what, numeric=numeric)


def _clean_map(obj: object, what: str, *, numeric: bool) -> dict[str, Any]:
    if not isinstance(obj, Mapping):
        raise BadRequest(f"{what}s must be an object of name -> value, got {type(obj).__name__}")
    if len(obj) > MAX_ITEMS:
        raise BadRequest(f"at most {MAX_ITEMS} {what}s, got {len(obj)}")
    out: dict[str, Any] = {}
    for raw_key, v in obj.items():
        k = _key(raw_key, what)
        if numeric:
            try:
                f = float(v) if not isinstance(v, bool) else math.nan
            except (TypeError, ValueError):
                f = math.nan
            if not math.isfinite(f):
                raise BadRequest(f"{what} {k}: expected a finite number, got {v!r}")
            out[k] = f
        else:
            if not isinstance(v, str) or len(v) > MAX_VALUE:
                raise BadRequest(f"{what} {k}: expected a string of at most {MAX_VALUE} characters, got {v!r}")
            out[k] = v
    return out


def clean_lineage(lineage: object) -> dict[str, Any]:
    """Check the lineage a publisher sent; return it with ``metrics`` and ``tags`` normalised."""
    if lineage is None:
        return {"metrics": {}, "tags": {}, "parent": None}
    if not isinstance(lineage, Mapping):
        raise BadRequest(f"lineage must be an object, got {type(lineage).__name__}")
    out = dict(lineage)
    out["metrics"] = _clean_map(lineage.get("metrics") or {}, "metric", numeric=True)
    out["tags"] = _clean_map(lineage.get("tags") or {}, "tag", numeric=False)
    parent = lineage.get("parent")
    if parent is not None and (not isinstance(parent, str) or not parent or len(parent) > 128):
        raise BadRequest(f"parent must be a version string, got {parent!r}")
    out["parent"] = parent
    for field in ("source", "author"):
        v = out.get(field)
        if v is not None and (not isinstance(v, str) or len(v) > MAX_VALUE):
            raise BadRequest(f"{field} must be a string of at most {MAX_VALUE} characters")
    return out


# -- PSI between training references ------------------------------------------------------------


def psi(p: Sequence[float], q: Sequence[float]) -> float:
    """Population stability index of ``q`` against ``p`` (same bins), each floored at PSI_FLOOR."""
    a = np.maximum(np.asarray(p, dtype=np.float64), PSI_FLOOR)
    b = np.maximum(np.asarray(q, dtype=np.float64), PSI_FLOOR)
    a, b = a / a.sum(), b / b.sum()
    return float(np.sum((a - b) * np.log(a / b)))


def _rebin(edges_b: Sequence[float], freqs_b: Sequence[float], edges_a: Sequence[float]) -> list[float]:
    """B's mass in each of A's bins; mass outside A's range goes to A's first and last bins."""
    xb = np.asarray(edges_b, dtype=np.float64)
    fb = np.asarray(freqs_b, dtype=np.float64)
    cdf_b = np.concatenate([[0.0], np.cumsum(fb) / max(fb.sum(), 1e-12)])
    at = np.interp(np.asarray(edges_a, dtype=np.float64), xb, cdf_b, left=0.0, right=1.0)
    mass = np.diff(at)
    mass[0] += at[0]
    mass[-1] += 1.0 - at[-1]
    return [float(m) for m in mass]


def reference_psi(ref_a: Mapping[str, Any] | None, ref_b: Mapping[str, Any] | None) -> dict[str, Any]:
    """Per-feature PSI of B's training reference against A's, and over output classes if both have
    them. Features are matched by position (names are shown); extra features are listed apart."""
    if not ref_a or not ref_b:
        return {"available": False, "reason": "both versions need a reference (publish with --reference)"}
    fa, fb = list(ref_a.get("features", [])), list(ref_b.get("features", []))
    features = []
    for a, b in zip(fa, fb, strict=False):
        q = _rebin(b["edges"], b["freqs"], a["edges"])
        features.append({"feature": a["name"], "feature_b": b["name"], "psi": round(psi(a["freqs"], q), 6),
                         "a_freqs": list(a["freqs"]), "b_on_a_bins": [round(x, 6) for x in q],
                         "edges": list(a["edges"])})
    out: dict[str, Any] = {
        "available": True,
        "rows": [ref_a.get("rows"), ref_b.get("rows")],
        "features": features,
        "max_psi": max((f["psi"] for f in features), default=0.0),
        "unmatched_features": [f["name"] for f in (fa[len(fb):] or fb[len(fa):])],
    }
    ca = (ref_a.get("output") or {}).get("classes")
    cb = (ref_b.get("output") or {}).get("classes")
    if ca and cb:
        labels = sorted(set(ca) | set(cb))
        out["output_psi"] = round(psi([ca.get(k, 0.0) for k in labels], [cb.get(k, 0.0) for k in labels]), 6)
    return out


def diff_versions(a: Mapping[str, Any], b: Mapping[str, Any]) -> dict[str, Any]:
    """Two registry rows (with ``reference``) side by side."""
    la, lb = a.get("lineage") or {}, b.get("lineage") or {}
    ma, mb = la.get("metrics") or {}, lb.get("metrics") or {}
    metrics = {}
    for k in sorted(set(ma) | set(mb)):
        va, vb = ma.get(k), mb.get(k)
        metrics[k] = {"a": va, "b": vb, "delta": (vb - va) if va is not None and vb is not None else None}
    lineage = {}
    for k in sorted((set(la) | set(lb)) - {"metrics"}):
        if la.get(k) != lb.get(k):
            lineage[k] = {"a": la.get(k), "b": lb.get(k)}
    return {
        "name": a["name"],
        "a": a["version"],
        "b": b["version"],
        "sha256": {"a": a["sha256"], "b": b["sha256"]},
        "signature": {
            "same": a["inputs"] == b["inputs"] and a["outputs"] == b["outputs"],
            "a": {"inputs": a["inputs"], "outputs": a["outputs"]},
            "b": {"inputs": b["inputs"], "outputs": b["outputs"]},
        },
        "metrics": metrics,
        "lineage": lineage,
        "reference": reference_psi(a.get("reference"), b.get("reference")),
    }


def find_decision(
    entries: Iterable[Mapping[str, Any]], device: str, model: str, version: str, at: float
) -> Mapping[str, Any] | None:
    """The latest audit entry at or before ``at`` that put ``model version`` on ``device``.

    An entry counts when its action is in :data:`DECISION_ACTIONS` and its details name the model,
    the version, and the device (``device`` or a ``devices`` list)."""
    best: Mapping[str, Any] | None = None
    for e in entries:
        d = e.get("details") or {}
        if e.get("action") not in DECISION_ACTIONS or e.get("time", math.inf) > at:
            continue
        if d.get("model") != model or d.get("version") != version:
            continue
        devices = d.get("devices")
        if d.get("device") != device and not (isinstance(devices, list) and device in devices):
            continue
        if best is None or (e["time"], e.get("id", 0)) >= (best["time"], best.get("id", 0)):
            best = e
    return best
