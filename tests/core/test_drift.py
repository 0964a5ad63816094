"""Drift statistics and alarm decisions (hub.drift), without a broker or a database."""

from __future__ import annotations

import math

import numpy as np
import pytest

from edgefleet.agent.contract.wire import FeatureReference, Reference
from edgefleet.agent.core.telemetry import feature_histogram
from edgefleet.hub.core.drift import (
    AlarmTracker,
    Policy,
    js_distance,
    ks_statistic,
    merge_classes,
    merge_feature_lists,
    merge_histograms,
    psi,
    score_report,
)


def _reference(train: np.ndarray) -> Reference:
    feats = []
    for j in range(train.shape[1]):
        edges = np.unique(np.quantile(train[:, j], np.linspace(0, 1, 11)))
        h = feature_histogram(train[:, j], tuple(edges))
        freqs = np.array(h["counts"]) / len(train)
        feats.append(FeatureReference(name=f"f{j}", edges=tuple(map(float, edges)), freqs=tuple(map(float, freqs))))
    return Reference(features=tuple(feats), rows=len(train), output={"classes": {"0": 0.5, "1": 0.5}})


def _inputs(ref: Reference, rows: np.ndarray) -> list[dict[str, object]]:
    return [{"name": f.name, **feature_histogram(rows[:, j], f.edges)} for j, f in enumerate(ref.features)]


def test_identical_distributions_score_zero_and_disjoint_ones_high() -> None:
    p = [0.25, 0.25, 0.5]
    assert psi(p, p) == pytest.approx(0.0)
    assert js_distance(p, p) == pytest.approx(0.0)
    assert ks_statistic(p, p) == pytest.approx(0.0)
    assert js_distance([1, 0], [0, 1]) == pytest.approx(1.0)
    assert ks_statistic([1, 0], [0, 1]) == pytest.approx(1.0)
    assert psi([1, 0], [0, 1]) > 10


def test_psi_matches_the_textbook_formula() -> None:
    e, a = [0.2, 0.3, 0.5], [0.3, 0.3, 0.4]
    want = sum((ai - ei) * math.log(ai / ei) for ai, ei in zip(a, e, strict=True))
    assert psi(e, a) == pytest.approx(want)
    assert psi([20, 30, 50], [3, 3, 4]) == pytest.approx(want)  # counts work as well as shares


def test_histograms_merge_by_summing_and_refuse_other_bins() -> None:
    a = {"counts": [1, 2], "below": 1, "above": 0, "nan": 2}
    b = {"counts": [3, 4], "below": 0, "above": 5, "nan": 0}
    assert merge_histograms([a, b]) == {"counts": [4, 6], "below": 1, "above": 5, "nan": 2}
    with pytest.raises(ValueError, match="bins"):
        merge_histograms([a, {"counts": [1, 2, 3]}])
    merged = merge_feature_lists([[{"name": "x", **a}], [{"name": "x", **b}]])
    assert merged["x"]["counts"] == [4, 6]
    assert merge_classes([{"classes": {"0": 2}}, None, {"classes": {"0": 1, "1": 3}}]) == {"0": 3, "1": 3}


def test_training_traffic_stays_ok_and_one_shifted_feature_alarms_alone() -> None:
    rng = np.random.default_rng(3)
    train = rng.normal(size=(5000, 4))
    ref = _reference(train)
    policy = Policy(min_rows=100)
    for i in range(20):
        rows = train[rng.integers(0, len(train), 400)]
        rep = score_report(model="m", version="1", scope="fleet", reference=ref,
                           inputs=merge_feature_lists([_inputs(ref, rows)]), classes={"0": 200, "1": 200},
                           policy=policy, window_start=i, window_end=i + 1, windows=1)
        assert rep.state == "ok", rep.to_dict()
    shifted = train[rng.integers(0, len(train), 400)].copy()
    shifted[:, 2] += 2.0
    rep = score_report(model="m", version="1", scope="fleet", reference=ref,
                       inputs=merge_feature_lists([_inputs(ref, shifted)]), classes={},
                       policy=policy, window_start=0, window_end=1, windows=1)
    assert rep.state == "alarm"
    assert rep.named("alarm") == ["f2"]
    f2 = next(f for f in rep.features if f.feature == "f2")
    assert f2.js > 0.3 and f2.ks > 0.3


def test_too_few_rows_is_insufficient_never_alarm() -> None:
    ref = Reference(features=(FeatureReference(name="x", edges=(0.0, 1.0, 2.0), freqs=(0.5, 0.5)),))
    rep = score_report(model="m", version="1", scope="fleet", reference=ref,
                       inputs={"x": {"counts": [0, 0], "above": 10}}, classes={},
                       policy=Policy(min_rows=50), window_start=0, window_end=1, windows=1)
    assert rep.state == "insufficient"


def test_output_class_shift_is_scored_as_output() -> None:
    ref = Reference(features=(), output={"classes": {"0": 0.5, "1": 0.5}})
    rep = score_report(model="m", version="1", scope="fleet", reference=ref, inputs={},
                       classes={"0": 950, "1": 50}, policy=Policy(), window_start=0, window_end=1, windows=1)
    assert rep.named("alarm") == ["output"]


def test_alarm_is_raised_once_until_the_state_leaves_alarm() -> None:
    ref = Reference(features=(FeatureReference(name="x", edges=(0.0, 1.0, 2.0), freqs=(0.5, 0.5)),))
    tracker = AlarmTracker()

    def rep(counts: list[int], above: int = 0):
        return score_report(model="m", version="1", scope="fleet", reference=ref,
                            inputs={"x": {"counts": counts, "above": above}}, classes={},
                            policy=Policy(min_rows=10), window_start=0, window_end=1, windows=1)

    assert tracker.update(rep([50, 50])) is None
    assert tracker.update(rep([10, 10], above=80)) == "ok"
    assert tracker.update(rep([10, 10], above=80)) is None
    assert tracker.update(rep([50, 50])) == "alarm"
    assert tracker.update(rep([10, 10], above=80)) == "ok"


def test_policy_refuses_nonsense() -> None:
    with pytest.raises(ValueError, match="warn"):
        Policy(warn=0.3, alarm=0.2)
    with pytest.raises(ValueError, match="on_drift"):
        Policy(on_drift="panic")
    with pytest.raises(ValueError, match="hook"):
        Policy(on_drift="hook")
