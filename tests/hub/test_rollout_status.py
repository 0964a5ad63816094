"""``edgefleet-hub rollout status`` text: what a waiting step still needs, and when."""

from __future__ import annotations

from edgefleet.hub.cli.rollout import format_rollout
from edgefleet.hub.core.rollout import evaluate
from tests.core.test_rollout import ev, started, window


def test_rollout_status_prints_what_the_step_needs() -> None:
    r = started()
    d = evaluate(r, ev(window(requests=50, compared=50, agreed=50)), 50.0)
    desc = {**r.to_dict(), "step_number": 1, "percent": r.percent, "cohort_size": len(r.members),
            "target_count": len(r.targets), "step_started": "t0", "decision": d.to_dict()}
    text = format_rollout(desc)
    assert "to decide: 150 more inferences, 2 more windows (about 2.5 min at this step's rate)" in text
