"""The statistics benchmarks (image and category: sections 11 and 12 of BENCHMARKS.md) run in smoke
mode and produce a row per case; no timing asserted."""

from __future__ import annotations

import importlib

import pytest


@pytest.mark.parametrize("name", ["image_stats", "category_stats"])
def test_the_statistics_benchmark_runs_in_smoke_mode(name: str) -> None:
    res = importlib.import_module(f"bench.{name}").run(smoke=True)
    assert len(res.rows) >= 4
    assert all(r.edgefleet and r.baseline for r in res.rows)
