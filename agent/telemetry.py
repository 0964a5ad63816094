"""Telemetry windows: cheap recording on the request path, folding off it.

:class:`Recorder` is what the request path touches: it writes one latency into a preallocated
array and keeps a bounded sample of input rows, under a lock held for a few hundred
nanoseconds. :func:`fold` turns a closed window's :class:`Snapshot` into the wire
:class:`~agent.wire.ModelWindow` (percentiles, fixed latency buckets, per-feature histograms on the
reference bins). Pure apart from the lock: no clock, no I/O.
"""

from __future__ import annotations

import functools
import threading
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from edgefleet.agent.wire import ModelWindow, Reference

__all__ = [
    "LATENCY_BUCKETS_MS", "Recorder", "Snapshot", "feature_histogram", "fold", "latency_summary",
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


class Recorder:
    """Per model version. ``record`` is the hot path; ``swap`` closes the window."""

    def __init__(self, version: str, *, capacity: int = 65536, max_rows: int = 4096) -> None:
        self.version = version
        self._capacity = capacity
        self._max_rows = max_rows
        self._lock = threading.Lock()
        self._reset()

    def _reset(self) -> None:
        self._lat = np.empty(self._capacity, dtype=np.float64)
        self._n = 0
        self._requests = 0
        self._errors = 0
        self._rows = 0
        self._sampled_rows = 0
        self._inputs: list[npt.NDArray[Any]] = []
        self._outputs: list[npt.NDArray[Any]] = []

    def record(
        self,
        latency_s: float,
        rows: npt.NDArray[Any] | None = None,
        output: npt.NDArray[Any] | None = None,
        *,
        error: bool = False,
    ) -> None:
        with self._lock:
            self._requests += 1
            if error:
                self._errors += 1
            if self._n < self._capacity:
                self._lat[self._n] = latency_s
            self._n += 1
            if rows is not None:
                n = len(rows)
                self._rows += n
                if self._sampled_rows < self._max_rows:
                    self._inputs.append(rows)
                    if output is not None:
                        self._outputs.append(output)
                    self._sampled_rows += n

    def swap(self) -> Snapshot:
        with self._lock:
            kept = min(self._n, self._capacity)
            snap = Snapshot(
                version=self.version,
                requests=self._requests,
                errors=self._errors,
                rows=self._rows,
                latencies_s=self._lat[:kept],
                dropped_latencies=self._n - kept,
                inputs=self._inputs,
                outputs=self._outputs,
            )
            self._reset()
        return snap


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


def release_free_heap() -> bool:
    """Hand memory that the C heap has freed back to the kernel (glibc ``malloc_trim``).

    glibc keeps freed heap pages mapped for reuse; importing the agent and loading models free
    about 2 MiB that would otherwise stay in the service's resident set for good. The agent
    calls this once it serves and after each telemetry window (about 1 ms). ``False`` where the
    C library is not glibc (musl, macOS): nothing to do there.
    """
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True


@functools.cache
def _malloc_trim() -> Any:
    import ctypes

    try:
        trim = ctypes.CDLL(None).malloc_trim  # the process's own symbols: libc is among them
    except (OSError, AttributeError):
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return trim
