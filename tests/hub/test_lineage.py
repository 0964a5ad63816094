"""hub.lineage: metric/tag checks, PSI between training references, diff, finding the decision."""

from __future__ import annotations

import numpy as np
import pytest

from edgefleet.hub.adapters.modelfile import compute_reference
from edgefleet.hub.core.lineage import clean_lineage, diff_versions, find_decision, parse_pairs, reference_psi
from edgefleet.hub.errors import BadRequest


def _ref(data: np.ndarray) -> dict:
    return compute_reference(data, bins=10).to_dict()


def test_metrics_parse_to_numbers_and_tags_to_strings() -> None:
    assert parse_pairs(["auc=0.91", "f1 = 0.8"], "metric", numeric=True) == {"auc": 0.91, "f1": 0.8}
    assert parse_pairs(["team=risk", "ticket=CR-1=2"], "tag", numeric=False) == {"team": "risk", "ticket": "CR-1=2"}


@pytest.mark.parametrize("item", ["auc", "auc=high", "auc=nan", "=0.5", "auc=inf"])
def test_bad_metric_is_refused_naming_it(item: str) -> None:
    with pytest.raises(BadRequest, match="metric"):
        parse_pairs([item], "metric", numeric=True)


def test_lineage_refuses_non_numeric_metric_from_a_json_file() -> None:
    with pytest.raises(BadRequest, match="auc: expected a finite number"):
        clean_lineage({"metrics": {"auc": "good"}})
    assert clean_lineage(None) == {"metrics": {}, "tags": {}, "parent": None}


def test_psi_of_identical_references_is_zero_and_of_a_shifted_one_is_large() -> None:
    rng = np.random.default_rng(1)
    a = rng.normal(size=(4000, 2))
    b = a.copy()
    b[:, 1] += 1.5
    same = reference_psi(_ref(a), _ref(a))
    assert same["available"] and all(f["psi"] < 1e-9 for f in same["features"])
    shifted = reference_psi(_ref(a), _ref(b))
    psi0, psi1 = (f["psi"] for f in shifted["features"])
    assert psi0 < 0.02  # another sample of the same distribution after re-binning
    assert psi1 > 0.25  # alarm level
    assert shifted["max_psi"] == psi1


def test_psi_needs_both_references() -> None:
    assert reference_psi(None, {"features": []})["available"] is False


def test_diff_reports_metrics_delta_signature_and_changed_lineage() -> None:
    sig = [{"name": "input", "dtype": "float32", "shape": [None, 2]}]
    a = {"name": "m", "version": "1", "sha256": "a" * 64, "inputs": sig, "outputs": sig, "reference": None,
         "lineage": {"metrics": {"auc": 0.8}, "source": "git:1", "parent": None}}
    b = {**a, "version": "2", "sha256": "b" * 64,
         "outputs": [{"name": "label", "dtype": "int64", "shape": [None]}],
         "lineage": {"metrics": {"auc": 0.85, "f1": 0.7}, "source": "git:2", "parent": "1"}}
    d = diff_versions(a, b)
    assert d["signature"]["same"] is False
    assert d["metrics"]["auc"]["delta"] == pytest.approx(0.05)
    assert d["metrics"]["f1"] == {"a": None, "b": 0.7, "delta": None}
    assert d["lineage"] == {"source": {"a": "git:1", "b": "git:2"}, "parent": {"a": None, "b": "1"}}


def test_decision_is_the_latest_deploy_of_that_version_to_that_device_before_the_request() -> None:
    def e(i: int, t: float, action: str, **details: object) -> dict:
        return {"id": i, "time": t, "action": action, "actor": "ops", "details": details}

    entries = [
        e(1, 10, "publish", model="m", version="1"),
        e(2, 20, "deploy", device="d1", model="m", version="1"),
        e(3, 30, "deploy", device="d2", model="m", version="1"),
        e(4, 40, "rollout_step", devices=["d1", "d3"], model="m", version="1"),
        e(5, 50, "deploy", device="d1", model="m", version="2"),
        e(6, 60, "deploy", device="d1", model="m", version="1"),
    ]
    assert find_decision(entries, "d1", "m", "1", at=45)["id"] == 4
    assert find_decision(entries, "d1", "m", "1", at=25)["id"] == 2
    assert find_decision(entries, "d1", "m", "2", at=55)["id"] == 5
    assert find_decision(entries, "d1", "m", "1", at=15) is None
    assert find_decision(entries, "d3", "m", "2", at=100) is None
