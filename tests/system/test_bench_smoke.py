"""Every benchmark runs in smoke mode (tiny sizes) and produces its figures; no timing asserted.

The benchmarks start their own Mosquitto and hub processes, so this is a broker test.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, mosquitto_bin

pytestmark = [pytest.mark.broker, pytest.mark.slow]


def test_every_benchmark_runs_in_smoke_mode_and_writes_its_figures(tmp_path: Path) -> None:
    assert mosquitto_bin(), "mosquitto is not installed (apt-get install -y mosquitto)"
    out, figures = tmp_path / "BENCHMARKS.md", tmp_path / "figures.json"
    res = subprocess.run(
        [sys.executable, "-m", "bench.run_all", "--smoke", "--out", str(out), "--json", str(figures)],
        cwd=REPO, capture_output=True, text=True, timeout=180, check=False,
    )
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    got = json.loads(figures.read_text())
    assert set(got) == {"serving_inproc", "oip_http", "canary", "ingest", "fleet", "footprint"}
    for case in ("logistic_regression_b1", "gradient_boosting_b64", "random_forest_b64"):
        assert got["serving_inproc"][case]["raw_s"] > 0 and got["serving_inproc"][case]["edgefleet_s"] > 0
    assert got["oip_http"]["b1"]["edgefleet"]["rps"] > 0 and got["oip_http"]["b1"]["transport"]["p50_s"] > 0
    assert got["canary"]["100 %"]["compared"] + got["canary"]["100 %"]["skipped"] > 0
    assert got["ingest"]["hub x1"]["rate"] > 0 and got["ingest"]["hub x2"]["rate"] > 0
    assert got["ingest"]["bare"]["rate"] > 0
    for drain in ("bare drain", "hub x1 drain", "hub 2 processes drain"):  # every unique window stored
        assert got["ingest"][drain]["rate"] > 0, drain
    assert got["fleet"]["agents"] == 20 and got["fleet"]["downloads"] == 3  # v1, v2 and v3, once each for the whole fleet
    assert got["fleet"]["deploy_s"] > 0 and got["fleet"]["rollback_s"] > 0
    assert got["footprint"]["agent_rss"] > got["footprint"]["bare_rss"] > 0
    text = out.read_text()
    assert "Smoke run" in text and "onnxruntime" in text
    for title in ("1. Serving overhead", "2. Serving overhead", "3. Shadow", "4. Hub ingest",
                  "5. Fleet convergence", "6. Footprint"):
        assert title in text


@pytest.mark.parametrize("bench", ["hub_ingest", "telemetry_hot_path", "replicas"])
def test_the_standalone_benchmarks_run_in_smoke_mode(bench: str) -> None:
    """The issue 5 benchmarks run outside run_all; this keeps them from rotting (hub_ingest had)."""
    res = subprocess.run([sys.executable, "-m", f"bench.{bench}", "--smoke"], cwd=REPO, capture_output=True,
                         text=True, timeout=120, check=False)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    assert ("ns" if bench == "telemetry_hot_path" else "windows/s") in res.stdout
