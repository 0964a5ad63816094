"""What telemetry costs the request path, and what folding a window costs off it.

Run: python -m bench.telemetry_hot_path [--smoke]
Prints ns per Recorder.record call beside two baselines: an empty call with the same arguments
(the floor) and a naive recorder that bins every request's rows on the request path (what folding
in batches avoids). Then the time to fold one full window (max_sampled_rows rows, 8 features).
"""

from __future__ import annotations

import sys
import time

import numpy as np

from edgefleet.agent.app.recorder import Recorder
from edgefleet.agent.contract.wire import FeatureReference, Reference
from edgefleet.agent.core.telemetry import feature_histogram, fold

N = 200_000
FEATURES = 8
EDGES = tuple(float(x) for x in np.linspace(-3, 3, 11))
REF = Reference(features=tuple(FeatureReference(name=f"f{i}", edges=EDGES, freqs=(0.1,) * 10) for i in range(FEATURES)))


def per_call(fn, *args) -> float:
    t0 = time.perf_counter_ns()
    for _ in range(N):
        fn(*args)
    return (time.perf_counter_ns() - t0) / N


def main() -> None:
    rows = np.random.default_rng(0).normal(size=(4, FEATURES)).astype(np.float32)
    out = np.array([1, 0, 1, 1])

    def empty(latency: float, r: object, o: object) -> None:
        return None

    def naive(latency: float, r: np.ndarray, o: object) -> None:
        for j, f in enumerate(REF.features):
            feature_histogram(r[:, j], f.edges)

    rec = Recorder("1", capacity=N + 1, max_rows=4096)
    floor = per_call(empty, 0.001, rows, out)
    ours = per_call(rec.record, 0.001, rows, out)
    naive_ns = per_call(naive, 0.001, rows, out)
    print(f"request path, per call ({N} calls, batch of 4 rows x {FEATURES} features):")
    print(f"  Recorder.record              {ours:8.0f} ns")
    print(f"  baseline: empty call         {floor:8.0f} ns")
    print(f"  baseline: bin on the request {naive_ns:8.0f} ns  ({naive_ns / ours:.0f}x ours)")

    rec = Recorder("1", capacity=65536, max_rows=4096)
    for _ in range(5000):
        rec.record(0.001, rows, out)
    t0 = time.perf_counter()
    win = fold(rec.swap(), REF)
    ms = (time.perf_counter() - t0) * 1000
    print(f"fold of one window (5000 requests, {sum(sum(i['counts']) for i in win.inputs) // FEATURES} sampled rows): {ms:.2f} ms, off the request path")


if __name__ == "__main__":
    if "--smoke" in sys.argv[1:]:  # tiny sizes, for CI: the figures mean nothing
        N = 2_000
    main()
