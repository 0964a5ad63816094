"""The request path's telemetry recorder.

:class:`Recorder` is what the request path touches: it writes one latency into a preallocated
array and keeps a bounded sample of input rows, under a lock held for a few hundred
nanoseconds. ``swap`` hands the closed window to :func:`agent.core.telemetry.fold` as a
:class:`~agent.core.telemetry.Snapshot`.
"""

from __future__ import annotations

import threading
from typing import Any

import numpy as np
import numpy.typing as npt

from edgefleet.agent.core.telemetry import Snapshot

__all__ = ["Recorder"]


class Recorder:
    """Per model version. ``record`` is the hot path; ``swap`` closes the window."""

    def __init__(self, version: str, *, capacity: int = 65536, max_rows: int = 4096,
                 max_bytes: int = 16 << 20, output_names: tuple[str, ...] = ()) -> None:
        """``max_rows`` and ``max_bytes`` bound the inputs kept per window (references to the
        request's arrays, no copy): an image model's 4,096 rows could be gigabytes.
        ``output_names``: the model's outputs in order, naming what ``record(outputs=...)`` keeps."""
        self.version = version
        self._output_names = output_names
        self._capacity = capacity
        self._max_rows = max_rows
        self._max_bytes = max_bytes
        self._lock = threading.Lock()
        self._reset()

    def _reset(self) -> None:
        self._lat = np.empty(self._capacity, dtype=np.float64)
        self._n = 0
        self._requests = 0
        self._errors = 0
        self._rows = 0
        self._sampled_rows = 0
        self._sampled_bytes = 0
        self._inputs: list[npt.NDArray[Any]] = []
        self._others: dict[str, list[npt.NDArray[Any]]] = {}
        self._outputs: list[npt.NDArray[Any]] = []
        self._more: list[list[Any]] = []  # every output of a sampled request, when it has several

    def record(
        self,
        latency_s: float,
        rows: npt.NDArray[Any] | None = None,
        output: npt.NDArray[Any] | None = None,
        *,
        error: bool = False,
        others: dict[str, npt.NDArray[Any]] | None = None,
        outputs: list[Any] | None = None,
    ) -> None:
        """``rows``: the model's first input; ``others``: its other inputs by name; ``outputs``:
        all its outputs when it has more than one (references to the request's arrays, kept with
        ``rows`` while the window samples)."""
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
                if self._sampled_rows < self._max_rows and self._sampled_bytes < self._max_bytes:
                    self._inputs.append(rows)
                    if output is not None:
                        self._outputs.append(output)
                    if outputs is not None:
                        self._more.append(outputs)
                        self._sampled_bytes += sum(getattr(o, "nbytes", 0) for o in outputs)
                    self._sampled_rows += n
                    self._sampled_bytes += rows.nbytes
                    for iname, value in (others or {}).items():
                        self._others.setdefault(iname, []).append(value)
                        self._sampled_bytes += value.nbytes

    def swap(self) -> Snapshot:
        with self._lock:
            kept = min(self._n, self._capacity)
            sampled = self._more
            snap = Snapshot(
                version=self.version,
                requests=self._requests,
                errors=self._errors,
                rows=self._rows,
                latencies_s=self._lat[:kept],
                dropped_latencies=self._n - kept,
                inputs=self._inputs,
                outputs=self._outputs,
                others=self._others,
            )
            self._reset()
        for values in sampled:  # by output name, outside the lock the request path takes
            for oname, value in zip(self._output_names[1:], values[1:], strict=False):
                snap.more_outputs.setdefault(oname, []).append(value)
        return snap
