"""Telemetry windows folded off the request path.

:func:`fold` turns a closed window's :class:`Snapshot` (what :class:`agent.app.recorder.Recorder`
collected on the request path) into the wire :class:`~agent.contract.wire.ModelWindow`:
percentiles, fixed latency buckets, per-feature histograms on the reference bins (table columns,
for N-D inputs such as images the reference's tensor statistics, for string columns the category
counts with unseen categories named, and for float outputs their confidence or values). Pure: no
lock, no clock, no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from edgefleet.agent.contract.histograms import category_histogram, feature_histogram, tensor_stat
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
    inputs: list[npt.NDArray[Any]] = field(default_factory=list)  # the model's first input
    outputs: list[npt.NDArray[Any]] = field(default_factory=list)
    others: dict[str, list[npt.NDArray[Any]]] = field(default_factory=dict)  # its other inputs, by name
    more_outputs: dict[str, list[npt.NDArray[Any]]] = field(default_factory=dict)  # outputs after the first, by name


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
def _tensor_inputs(inputs: list[npt.NDArray[Any]], feats: list[FeatureReference], *,
                   cap: int | None = TENSOR_SAMPLES) -> list[dict[str, Any]]:
    batches = [np.asarray(x) for x in inputs if np.asarray(x).ndim >= 1 and np.asarray(x).dtype.kind in "fiub"]
    if not batches or not feats:
        return []
    shape = batches[0].shape[1:]
    x = np.concatenate([b for b in batches if b.shape[1:] == shape])  # samples of one shape only
    if cap is not None and len(x) > cap:  # images: a bounded sample; outputs are small, all of them count
        x = x[np.linspace(0, len(x) - 1, cap).astype(np.int64)]
    out = []
    for feat in feats:
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
    if reference is not None and snap.inputs:
        first = reference.first_input
        tables: dict[str, npt.NDArray[Any] | None] = {}

        def column(feat: FeatureReference, i: int) -> npt.NDArray[Any] | None:
            name = str(feat.extra.get("input", first))
            if name not in tables:
                batches = snap.inputs if name == first else snap.others.get(name, [])
                tables[name] = np.concatenate([np.asarray(x).reshape(len(x), -1) for x in batches]) if batches else None
            table, j = tables[name], int(feat.extra.get("column", i))
            return table[:, j] if table is not None and j < table.shape[1] else None

        for i, feat in enumerate(reference.features):
            values = column(feat, i)
            if values is not None and values.dtype.kind in "fiub":
                inputs.append({"name": feat.name, **feature_histogram(values, feat.edges)})
        for i, feat in enumerate(reference.categories):
            values = column(feat, i)
            if values is not None:
                inputs.append({"name": feat.name, **category_histogram(values, feat)})
        by_input: dict[str, list[FeatureReference]] = {}
        for feat in reference.tensors:
            if not feat.extra.get("output"):
                by_input.setdefault(str(feat.extra.get("input", first)), []).append(feat)
        for name, feats in by_input.items():
            batches = snap.inputs if name == first else snap.others.get(name, [])
            inputs += _tensor_inputs(batches, feats)
    if reference is not None and snap.outputs:
        by_output: dict[str, list[FeatureReference]] = {}
        for feat in (*reference.tensors, *reference.more_outputs):
            which = feat.extra.get("output")
            if which:  # True: the first output (references from before several outputs)
                by_output.setdefault("" if which is True else str(which), []).append(feat)
        for oname, feats in by_output.items():
            batches = snap.outputs if not oname else snap.more_outputs.get(oname, [])
            inputs += _tensor_inputs(batches, feats, cap=None)
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
