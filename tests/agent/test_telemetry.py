"""The request path records; folding turns a window into histograms on the reference bins."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from edgefleet.agent.app.recorder import Recorder
from edgefleet.agent.contract.wire import FeatureReference, Reference
from edgefleet.agent.core.telemetry import LATENCY_BUCKETS_MS, feature_histogram, fold
from tests.conftest import REPO


def test_feature_histogram_counts_bins_out_of_range_and_nan() -> None:
    edges = (0.0, 1.0, 2.0, 3.0)
    values = np.array([-1.0, 0.0, 0.5, 1.0, 2.5, 3.0, 3.5, np.nan, np.nan])
    h = feature_histogram(values, edges)
    # [0,1): 0.0, 0.5   [1,2): 1.0   [2,3]: 2.5, 3.0 (the last bin is closed)
    assert h == {"counts": [2, 1, 2], "below": 1, "above": 1, "nan": 2}


def test_recorder_swap_starts_a_fresh_window() -> None:
    r = Recorder("1.0", capacity=4, max_rows=3)
    for i in range(6):
        r.record(0.001 * (i + 1), np.array([[float(i)]]), np.array([i % 2]), error=(i == 5))
    snap = r.swap()
    assert (snap.requests, snap.errors, snap.rows) == (6, 1, 6)
    assert len(snap.latencies_s) == 4 and snap.dropped_latencies == 2
    assert sum(len(x) for x in snap.inputs) == 3  # sampled rows are bounded
    empty = r.swap()
    assert (empty.requests, empty.errors, len(empty.latencies_s)) == (0, 0, 0)


def test_fold_builds_latency_percentiles_and_feature_histograms() -> None:
    ref = Reference(features=(FeatureReference(name="f0", edges=(0.0, 5.0, 10.0), freqs=(0.5, 0.5)),
                              FeatureReference(name="f1", edges=(0.0, 1.0), freqs=(1.0,))))
    r = Recorder("2.0")
    for i in range(100):
        r.record((i + 1) / 1000.0, np.array([[i % 10, 0.5]], dtype=np.float32), np.array([i % 3]))
    w = fold(r.swap(), ref)
    assert w.version == "2.0" and w.requests == 100 and w.rows == 100
    assert 49.0 <= w.latency_ms["p50"] <= 52.0
    assert 94.0 <= w.latency_ms["p95"] <= 96.5
    assert w.latency_ms["max"] == 100.0
    assert sum(w.latency_ms["counts"]) == 100
    assert len(w.latency_ms["counts"]) == len(LATENCY_BUCKETS_MS) + 1
    assert w.inputs[0]["counts"] == [50, 50] and w.inputs[1]["counts"] == [100]
    assert w.outputs == {"classes": {"0": 34, "1": 33, "2": 33}}


def test_fold_without_reference_or_traffic() -> None:
    w = fold(Recorder("1").swap(), None)
    assert w.requests == 0 and w.inputs == () and "p50" not in w.latency_ms


@pytest.mark.skipif(sys.platform != "linux", reason="malloc_trim is glibc's")
def test_release_free_heap_returns_freed_malloc_pages_to_the_kernel() -> None:
    """Freed blocks below the heap's top stay resident until trimmed (glibc only trims the top
    by itself); the agent trims once serving and after each window."""
    code = (
        "import psutil, sys\n"
        "from edgefleet.agent.adapters.sysstat import release_free_heap\n"
        "p = psutil.Process()\n"
        "blocks = [bytes(2000) + bytes([i % 256]) for i in range(40_000)]  # ~80 MB through malloc\n"
        "pin = bytes(3000) + b'pin'  # allocated after them: the top of the heap stays in use\n"
        "del blocks\n"
        "freed = p.memory_info().rss\n"
        "ok = release_free_heap() if sys.argv[1] == 'trim' else True\n"
        "print(ok, (freed - p.memory_info().rss) / 2**20)\n"
    )
    out = {arg: subprocess.run([sys.executable, "-c", code, arg], capture_output=True, text=True, check=True,
                               cwd=REPO).stdout.split() for arg in ("none", "trim")}
    assert out["none"][0] == "True" and float(out["none"][1]) < 5  # free() alone keeps them
    assert out["trim"][0] == "True" and float(out["trim"][1]) > 60
