"""Telemetry windows folded off the request path.

:func:`fold` turns a closed window's :class:`Snapshot` (what :class:`agent.app.recorder.Recorder`
collected on the request path) into the wire :class:`~agent.contract.wire.ModelWindow`:
percentiles, fixed latency buckets, per-feature histograms on the reference bins (table columns,
and for N-D inputs such as images the reference's tensor statistics). Pure: no lock,
no clock, no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from edgefleet.agent.contract.wire import FeatureReference, ModelWindow, Reference

__all__ = [
    "LATENCY_BUCKETS_MS", "Snapshot", "feature_histogram", "fold", "latency_summary", "tensor_stat",
]

# Upper bounds (ms) of the fixed latency buckets; one more count is kept for everything above.
LATENCY_BUCKETS_MS: tuple[float, ...] = (
    0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0,
)  # fmt: skip


@dataclass
class Snapshot:
    version: str
    requests: int
    errors: int
    rows: int
    latencies_s: npt.NDArray[np.float64]
    dropped_latencies: int
    inputs: list[npt.NDArray[Any]] = field(default_factory=list)
    outputs: list[npt.NDArray[Any]] = field(default_factory=list)


def feature_histogram(values: npt.NDArray[Any], edges: tuple[float, ...]) -> dict[str, Any]:
    """Counts of ``values`` on the bins ``[e0,e1), ..., [e_{n-1}, e_n]`` plus out-of-range and NaN."""
    v = np.asarray(values, dtype=np.float64)
    nan = np.isnan(v)
    v = v[~nan]
    e = np.asarray(edges, dtype=np.float64)
    below = int(np.count_nonzero(v < e[0]))
    above = int(np.count_nonzero(v > e[-1]))
    inside = v[(v >= e[0]) & (v <= e[-1])]
    idx = np.searchsorted(e, inside, side="right") - 1
    idx = np.clip(idx, 0, len(e) - 2)
    counts = np.bincount(idx, minlength=len(e) - 1)
    return {
        "counts": [int(c) for c in counts],
        "below": below,
        "above": above,
        "nan": int(np.count_nonzero(nan)),
    }


def latency_summary(ms: Any) -> dict[str, Any]:
    """p50/p95/p99/max/mean (ms) and counts on the fixed buckets: ``ModelWindow.latency_ms``."""
    a = np.asarray(ms, dtype=np.float64)
    counts = np.bincount(
        np.searchsorted(np.asarray(LATENCY_BUCKETS_MS), a, side="left"),
        minlength=len(LATENCY_BUCKETS_MS) + 1,
    )
    out: dict[str, Any] = {"buckets": list(LATENCY_BUCKETS_MS), "counts": [int(c) for c in counts]}
    if len(a):
        p50, p95, p99 = np.percentile(a, [50, 95, 99])
        out.update(
            p50=round(float(p50), 4),
            p95=round(float(p95), 4),
            p99=round(float(p99), 4),
            max=round(float(a.max()), 4),
            mean=round(float(a.mean()), 4),
        )
    return out


TENSOR_SAMPLES = 64  # images (samples) of a window folded into tensor statistics, at most
TENSOR_VALUES = 1 << 18  # values per channel histogram, at most (a stride through the samples)


def tensor_stat(x: npt.NDArray[Any], feat: FeatureReference) -> npt.NDArray[np.float64]:
    """The values a tensor feature bins, from samples ``x`` (``[N, ...]``, one sample per row):

    * ``channel``: every value of channel ``channel`` on axis ``axis`` (1: NCHW, -1: NHWC), strided
      down to :data:`TENSOR_VALUES`;
    * ``mean`` / ``std``: each sample's mean and standard deviation over all its values;
    * ``saturated``: each sample's share of values at or beyond the reference's range
      (``lo``/``hi``: the smallest and largest training values), i.e. clipped or blown-out pixels.

    Cheap on purpose (a few passes over at most :data:`TENSOR_SAMPLES` samples) and the same on
    the device and at publish (:func:`hub.adapters.modelfile.compute_tensor_reference`)."""
    x = np.asarray(x, dtype=np.float64)
    stat = feat.extra.get("stat")
    out: npt.NDArray[np.float64]
    if stat == "channel":
        axis = int(feat.extra.get("axis", 1))
        v = np.take(x, int(feat.extra["channel"]), axis=axis).reshape(-1)
        out = v[:: max(1, len(v) // TENSOR_VALUES)]
        return out
    flat = x.reshape(len(x), -1)
    if stat == "mean":
        out = flat.mean(axis=1)
        return out
    if stat == "std":
        out = flat.std(axis=1)
        return out
    if stat == "saturated":
        lo, hi = float(feat.extra.get("lo", 0.0)), float(feat.extra.get("hi", 1.0))
        out = ((flat <= lo) | (flat >= hi)).mean(axis=1)
        return out
    raise ValueError(f"unknown tensor statistic {stat!r}")


def _tensor_inputs(inputs: list[npt.NDArray[Any]], reference: Reference) -> list[dict[str, Any]]:
    batches = [np.asarray(x) for x in inputs if np.asarray(x).ndim >= 2]
    if not batches or not reference.tensors:
        return []
    shape = batches[0].shape[1:]
    x = np.concatenate([b for b in batches if b.shape[1:] == shape])  # samples of one shape only
    if len(x) > TENSOR_SAMPLES:
        x = x[np.linspace(0, len(x) - 1, TENSOR_SAMPLES).astype(np.int64)]
    out = []
    for feat in reference.tensors:
        try:
            values = tensor_stat(x, feat)
        except (IndexError, ValueError, KeyError):  # a reference for another shape: nothing to say
            continue
        out.append({"name": feat.name, **feature_histogram(values, feat.edges)})
    return out


def _latency(lat_s: npt.NDArray[np.float64]) -> dict[str, Any]:
    return latency_summary(lat_s * 1000.0)


def fold(snap: Snapshot, reference: Reference | None) -> ModelWindow:
    """Turn a closed window into its wire form. Runs off the request path."""
    inputs: list[dict[str, Any]] = []
    if reference is not None and reference.features and snap.inputs:
        rows = np.concatenate([np.asarray(x).reshape(len(x), -1) for x in snap.inputs])
        for i, feat in enumerate(reference.features):
            if i < rows.shape[1]:
                inputs.append({"name": feat.name, **feature_histogram(rows[:, i], feat.edges)})
    if reference is not None and reference.tensors and snap.inputs:
        inputs += _tensor_inputs(snap.inputs, reference)
    outputs: dict[str, Any] | None = None
    if snap.outputs:
        out = np.concatenate([np.asarray(o).reshape(-1) for o in snap.outputs])
        if out.dtype.kind in "iub":
            labels, counts = np.unique(out, return_counts=True)
            outputs = {"classes": {str(k): int(c) for k, c in zip(labels, counts, strict=True)}}
    return ModelWindow(
        version=snap.version,
        requests=snap.requests,
        errors=snap.errors,
        rows=snap.rows,
        latency_ms=_latency(snap.latencies_s),
        inputs=tuple(inputs),
        outputs=outputs,
    )
