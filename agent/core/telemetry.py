"""Telemetry windows folded off the request path.

:func:`fold` turns a closed window's :class:`Snapshot` (what :class:`agent.app.recorder.Recorder`
collected on the request path) into the wire :class:`~agent.contract.wire.ModelWindow`:
percentiles, fixed latency buckets, per-feature histograms on the reference bins. Pure: no lock,
no clock, no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from edgefleet.agent.contract.wire import ModelWindow, Reference

__all__ = [
    "LATENCY_BUCKETS_MS", "Snapshot", "feature_histogram", "fold", "latency_summary",
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
