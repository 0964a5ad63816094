"""Issue 15's scenario matrix, a representative subset in CI: real Mosquitto, hub and three agent
processes under live request load, default gate policy; each rollout must end in the decision
written down for its scenario (bench/canary_matrix.py: EXPECTED). The full matrix (every scenario
under plain and drifted inputs and a CPU hog, repeated) is `python -m bench.canary_matrix`."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from bench.canary_matrix import GOOD
from tests.conftest import REPO, mosquitto_bin

pytestmark = [pytest.mark.broker, pytest.mark.slow]

SUBSET = ("identical:plain", "retrained:plain", "shuffled:drifted", "slow:plain", "nan:plain", "crash:drifted")


@pytest.mark.timeout(900)
def test_each_scenario_of_the_subset_ends_in_its_expected_decision(tmp_path: Path) -> None:
    assert mosquitto_bin(), "mosquitto is not installed (apt-get install -y mosquitto)"
    out = tmp_path / "matrix.json"
    res = subprocess.run(
        [sys.executable, "-m", "bench.canary_matrix", "--repeat", "1", "--hog-repeat", "0", "--only", *SUBSET,
         "--json", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=840, check=False,
    )
    assert out.exists(), res.stdout[-4000:] + res.stderr[-4000:]
    got = json.loads(out.read_text())["outcomes"]
    assert sorted(f"{o['scenario']}:{o['condition']}" for o in got) == sorted(SUBSET)
    # A good candidate on a machine whose host starves it (most windows CPU-starved: their timings
    # are no evidence, docs/rollouts.md) pauses instead of promoting: the documented behaviour,
    # not a wrong verdict. It must never roll back.
    def starved_pause(o: dict[str, Any]) -> bool:
        return (o["scenario"] in GOOD and o["decision"] == "pause"
                and int(o["starved_windows"]) * 2 >= int(o["windows"]))

    wrong = [o for o in got if not o["ok"] and not starved_pause(o)]
    assert wrong == [], json.dumps(wrong, indent=1) + res.stdout[-3000:]
    # the bench's exit code says whether every decision was the one written down for it
    assert res.returncode == (0 if all(o["ok"] for o in got) else 1), res.stdout[-3000:] + res.stderr[-3000:]
    for o in got:  # every decision states its evidence: the gates' counts, or a device's drop
        # (a NaN candidate is dropped on its first answers, often before the bench's first look)
        assert o["reason"], o
        assert (o["requests"] > 0 and o["windows"] > 0) or "dropped the candidate" in o["reason"], o
