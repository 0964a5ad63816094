"""`edgefleet-hub demo --seconds N` runs the whole loop on the embedded broker and stops cleanly."""

from __future__ import annotations

import re

import pytest

from tests.conftest import run_cli

pytestmark = pytest.mark.slow


def test_demo_runs_to_completion_on_the_embedded_broker() -> None:
    res = run_cli("edgefleet.hub.cli.main", "demo", "--seconds", "3", timeout=180)
    out = res.stdout
    assert "embedded MQTT broker" in out
    assert "both agents serve iris 1.0.0" in out
    rows = re.findall(r"^(demo-\S+)\s+online\s+iris 1\.0\.0\s+iris 1\.0\.0\s+(\d+)", out, re.M)
    assert len(rows) == 2, out
    assert all(int(n) > 0 for _, n in rows), out
    # the bad version shadows 1.0.0 on the first cohort and the hub's gate takes it back
    assert re.search(r"rollout r-1 ROLLED_BACK: agreement 0\.\d+ < min 0\.95", out), out
    assert "rollout_rollback by rollout-gate" in out
    assert out.rstrip().endswith("[demo] stopped cleanly")
