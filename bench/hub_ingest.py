"""Hub ingest throughput: telemetry windows per second through Hub.ingest (real SQLite), with the
drift aggregation and scoring of hub.drift_monitor, beside the same ingest without it (baseline).

Run: python -m bench.hub_ingest [--smoke]   (50 devices, batches of 500 windows, 6 features x 10 bins)
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from edgefleet.agent.contract.wire import FeatureReference, ModelWindow, Reference, TelemetryWindow
from edgefleet.agent.core.telemetry import feature_histogram
from edgefleet.hub.adapters.home import HubHome
from edgefleet.hub.daemon import Hub

DEVICES, BATCH, BATCHES = 50, 500, 6
EDGES = tuple(float(x) for x in np.linspace(-3, 3, 11))
_TRAIN = feature_histogram(np.random.default_rng(1).normal(size=100_000), EDGES)["counts"]
_FREQS = tuple(c / sum(_TRAIN) for c in _TRAIN)
REF = Reference(features=tuple(FeatureReference(name=f"f{i}", edges=EDGES, freqs=_FREQS) for i in range(6)))


class NoDrift:
    def add_all(self, *a: Any) -> None: ...
    def stage(self, *a: Any) -> None: ...
    def take(self, *a: Any) -> None: ...
    def flush(self, *a: Any) -> None: ...
    def flush_due(self) -> bool:
        return False
    def after_batch(self) -> None: ...


def batches(rng: np.random.Generator) -> list[list[tuple[str, str, bytes]]]:
    out, seq = [], {f"d{i}": 0 for i in range(DEVICES)}
    t = 1_800_000_000.0
    for _ in range(BATCHES):
        batch = []
        for k in range(BATCH):
            dev = f"d{k % DEVICES}"
            seq[dev] += 1
            rows = rng.normal(size=(200, 6))
            inputs = tuple({"name": f"f{j}", **feature_histogram(rows[:, j], EDGES)} for j in range(6))
            tw = TelemetryWindow(fleet="bench", device=dev, seq=seq[dev], window_start=t + seq[dev] * 10,
                                 window_end=t + seq[dev] * 10 + 10,
                                 models={"m": ModelWindow(version="1", requests=50, errors=0, rows=200,
                                                          latency_ms={"counts": [1] * 16}, inputs=inputs,
                                                          outputs={"classes": {"0": 100, "1": 100}})})
            batch.append((dev, "telemetry", tw.to_json()))
        out.append(batch)
    return out


def run(with_drift: bool, data: list[list[tuple[str, str, bytes]]]) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        home = HubHome(Path(tmp))
        home.init(fleet="bench", broker_url="mqtt://127.0.0.1:1", http_listen="127.0.0.1:0")
        hub = Hub(home)
        if not with_drift:
            hub.drift = NoDrift()  # type: ignore[assignment]
        with hub.db.tx() as conn:
            for i in range(DEVICES):
                conn.execute("INSERT INTO devices (id, profile, created_at) VALUES (?,?,?)", (f"d{i}", "p", 0.0))
            hub.db.insert_model(conn, {"name": "m", "version": "1", "sha256": "0" * 64, "size": 1, "inputs": [],
                                       "outputs": [], "reference": REF.to_dict(), "lineage": {}, "created_at": 0.0})
        t0 = time.perf_counter()
        for b in data:
            hub.ingest(b)
        elapsed = time.perf_counter() - t0
        assert hub.counters["ingested"] == BATCH * BATCHES
        hub.db.close()
    return BATCH * BATCHES / elapsed


def main() -> None:
    data = batches(np.random.default_rng(0))
    base = run(False, data)
    ours = run(True, data)
    print(f"hub ingest, {DEVICES} devices, batches of {BATCH} windows:")
    print(f"  with aggregation + drift scoring  {ours:8.0f} windows/s")
    print(f"  baseline: ingest without drift    {base:8.0f} windows/s")
    print("  a fleet of 10,000 devices at 10 s windows sends 1,000 windows/s")


if __name__ == "__main__":
    if "--smoke" in sys.argv[1:]:  # tiny sizes, for CI: the figures mean nothing
        BATCH, BATCHES = 50, 2
    main()
