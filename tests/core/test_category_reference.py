"""String (categorical) columns: the reference computed at publish and the window folded on the
device count the same categories; the hub scores them with PSI and a chi-square test and names the
category that moved (seeded synthetic samples)."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from edgefleet.agent.contract.errors import MalformedMessage
from edgefleet.agent.contract.histograms import category_histogram
from edgefleet.agent.contract.wire import Reference
from edgefleet.agent.core.telemetry import Snapshot, fold
from edgefleet.hub.core.drift import Policy, chi_square, chi_square_samples, merge_feature_lists, score_report
from edgefleet.hub.core.reference import compute_category_reference, compute_inputs_reference

CITIES = np.array(["lyon", "oslo", "rome", "kyiv", "lima", "nara"])
SHARES = np.array([0.35, 0.25, 0.15, 0.12, 0.08, 0.05])


def _cities(rng: np.random.Generator, n: int, shares: np.ndarray = SHARES, extra: str | None = None,
            extra_share: float = 0.0) -> np.ndarray:
    col = rng.choice(CITIES, size=n, p=shares).astype(object)
    if extra is not None:
        col[rng.random(n) < extra_share] = extra
    return col.reshape(-1, 1)


def _reference(rng: np.random.Generator, top: int = 20) -> Reference:
    x = rng.normal(size=(2000, 1)).astype(np.float32)
    ref = compute_inputs_reference({"city": _cities(rng, 2000), "x": x}, top=top)
    return Reference.from_dict(ref.to_dict())  # what the device and the hub read back


def _snapshot(batches: list[np.ndarray], others: dict[str, list[np.ndarray]] | None = None) -> Snapshot:
    """A closed window as the device's recorder hands it to the fold (agent.app.recorder)."""
    n = sum(len(b) for b in batches)
    return Snapshot(version="1", requests=len(batches), errors=0, rows=n, latencies_s=np.zeros(len(batches)),
                    dropped_latencies=0, inputs=batches, outputs=[np.zeros(len(b), np.int64) for b in batches],
                    others=others or {})


def _served(ref: Reference, batches: list[np.ndarray]) -> dict[str, dict[str, object]]:
    """The device's fold of a window of ``batches`` of cities (and zeros for ``x``)."""
    snap = _snapshot(batches, {"x": [np.zeros((len(b), 1), np.float32) for b in batches]})
    return {h["name"]: h for h in fold(snap, ref).inputs}


def _served_one(ref: Reference, batches: list[np.ndarray]) -> dict[str, dict[str, object]]:
    """The device's fold for a model whose only input is ``batches``' (the reference's first)."""
    return {h["name"]: h for h in fold(_snapshot(batches), ref).inputs}


def _score(ref: Reference, window: dict[str, dict[str, object]], policy: Policy | None = None) -> dict[str, object]:
    rep = score_report(model="m", version="1", scope="fleet", reference=ref, inputs=window, classes={},
                       policy=policy or Policy(), window_start=0, window_end=1, windows=1)
    return next(f.to_dict() for f in rep.features if f.feature == "city")


def test_the_reference_names_the_top_categories_and_round_trips() -> None:
    ref = _reference(np.random.default_rng(1), top=4)
    (city,) = ref.categories
    assert city.name == "city" and city.extra["input"] == "city" and city.extra["column"] == 0
    assert city.extra["categories"] == ["lyon", "oslo", "rome", "kyiv"]
    assert sorted(city.extra["known"]) == ["lima", "nara"] and city.extra["complete"] is True
    assert len(city.freqs) == 5 and abs(sum(city.freqs) - 1) < 1e-5
    assert abs(city.freqs[-1] - 0.13) < 0.03  # lima + nara share "other"
    assert [f.name for f in ref.features] == ["x"]  # a one-column input is named as the input


def test_device_counts_known_other_unseen_and_missing_values() -> None:
    ref = _reference(np.random.default_rng(2), top=2)
    (city,) = ref.categories
    values = np.array(["lyon", b"oslo", "nara", "paris", "paris", "", None, "berlin"], dtype=object)
    h = category_histogram(values, city)
    assert h["counts"] == [1, 1, 1]  # lyon, oslo, other (nara is a training category)
    assert h["above"] == 3 and h["nan"] == 2
    assert h["unseen"] == {"paris": 2, "berlin": 1}


def test_an_incomplete_reference_counts_unlisted_values_as_other() -> None:
    ref = _reference(np.random.default_rng(3), top=2)
    city = ref.categories[0]
    city = type(city)(name=city.name, edges=city.edges, freqs=city.freqs,
                      extra={**city.extra, "known": [], "complete": False})
    assert category_histogram(np.array(["paris"], dtype=object), city)["counts"][-1] == 1


@pytest.mark.parametrize("seed", range(20))
def test_training_like_traffic_never_warns(seed: int) -> None:
    rng = np.random.default_rng(100 + seed)
    ref = _reference(rng)
    score = _score(ref, _served(ref, [_cities(rng, 20) for _ in range(50)]))
    assert score["state"] == "ok", score
    assert float(score["psi"]) < 0.05  # type: ignore[arg-type]


def test_a_category_that_grows_alarms_and_is_named() -> None:
    rng = np.random.default_rng(7)
    ref = _reference(rng)
    moved = np.array([0.10, 0.25, 0.15, 0.12, 0.08, 0.30])  # nara from 5 % to 30 %, lyon down
    score = _score(ref, _served(ref, [_cities(rng, 20, moved) for _ in range(50)]))
    assert score["state"] == "alarm", score
    assert float(score["p_value"]) < 1e-6  # type: ignore[arg-type]
    assert "'nara'" in str(score["detail"]) or "'lyon'" in str(score["detail"]), score


def test_a_category_never_seen_in_training_alarms_and_is_named() -> None:
    rng = np.random.default_rng(8)
    ref = _reference(rng)
    window = merge_feature_lists(
        list(_served(ref, [_cities(rng, 20, extra="paris", extra_share=0.3) for _ in range(10)]).values())
        for _ in range(5))
    assert window["city"]["unseen"]["paris"] > 200  # merged across windows, by name
    score = _score(ref, window)
    assert score["state"] == "alarm", score
    assert "never seen" in str(score["detail"]) and "'paris'" in str(score["detail"]), score


def test_a_small_sample_does_not_alarm_on_chance() -> None:
    """Twelve training-like rows spread unevenly: PSI is past the alarm level, but the chi-square
    test cannot tell them from chance (p ~ 0.3), so the feature stays ok. ``min_rows`` is lowered
    so that the test reaches the chi-square gate at all (the default keeps such a window
    ``insufficient``)."""
    ref = _reference(np.random.default_rng(9))
    rows = ["lyon"] * 2 + ["oslo"] * 3 + ["rome"] + ["kyiv"] * 2 + ["lima"] * 2 + ["nara"] * 2
    score = _score(ref, _served(ref, [np.array(rows, dtype=object).reshape(-1, 1)]), Policy(min_rows=5))
    assert float(score["psi"]) >= Policy().alarm, score  # type: ignore[arg-type]
    assert float(score["p_value"]) > 0.05 and score["state"] == "ok", score  # type: ignore[arg-type]


def test_missing_values_at_the_training_share_are_no_drift_and_more_of_them_alarm() -> None:
    rng = np.random.default_rng(11)

    def with_missing(n: int, share: float) -> np.ndarray:
        col = _cities(rng, n)
        col[rng.random(n) < share] = None
        return col

    ref = Reference.from_dict(compute_inputs_reference({"city": with_missing(2000, 0.1)}).to_dict())
    assert abs(ref.categories[0].extra["missing"] - 0.1) < 0.02
    same = _score(ref, _served_one(ref, [with_missing(20, 0.1) for _ in range(50)]))
    assert same["state"] == "ok", same
    more = _score(ref, _served_one(ref, [with_missing(20, 0.4) for _ in range(50)]))
    assert more["state"] == "alarm" and "city: missing values" in str(more["detail"]), more


def test_numeric_columns_keep_their_training_share_of_missing_values() -> None:
    rng = np.random.default_rng(12)
    train = rng.normal(size=(2000, 1))
    train[rng.random(2000) < 0.2] = np.nan
    ref = Reference.from_dict(compute_inputs_reference({"x": train}).to_dict())
    (x,) = ref.features
    assert abs(x.extra["missing"] - 0.2) < 0.03

    def score(share: float) -> str:
        live = rng.normal(size=(1000, 1))
        live[rng.random(1000) < share] = np.nan
        rep = score_report(model="m", version="1", scope="fleet", reference=ref, classes={}, policy=Policy(),
                           inputs=_served_one(ref, [live]), window_start=0, window_end=1, windows=1)
        return rep.features[0].state

    assert score(0.2) == "ok"
    assert score(0.6) == "alarm"


@pytest.mark.parametrize("seed", range(5))
def test_chi_square_matches_scipy(seed: int) -> None:
    rng = np.random.default_rng(seed)
    k = int(rng.integers(2, 30))
    expected = rng.dirichlet(np.ones(k)) + 0.01  # no share below EPS, where ours floors and scipy does not
    observed = rng.multinomial(int(rng.integers(50, 5000)), rng.dirichlet(np.ones(k) * 5))
    stat, df, p = chi_square(expected.tolist(), observed.tolist())
    want = stats.chisquare(observed, expected / expected.sum() * observed.sum())
    assert stat == pytest.approx(want.statistic, rel=1e-6)
    assert df == k - 1
    assert p == pytest.approx(want.pvalue, rel=1e-6, abs=1e-300)


@pytest.mark.parametrize("seed", range(5))
def test_the_two_sample_chi_square_matches_scipy(seed: int) -> None:
    rng = np.random.default_rng(seed)
    k = int(rng.integers(2, 30))
    a = rng.multinomial(int(rng.integers(50, 5000)), rng.dirichlet(np.ones(k) * 5))
    b = rng.multinomial(int(rng.integers(50, 5000)), rng.dirichlet(np.ones(k) * 5))
    a[0] = b[0] = 0  # a bin empty on both sides is left out, as scipy needs
    stat, df, p = chi_square_samples(a.tolist(), b.tolist())
    want = stats.chi2_contingency(np.vstack([a[1:], b[1:]]), correction=False)
    assert stat == pytest.approx(want.statistic, rel=1e-6)
    assert df == want.dof
    assert p == pytest.approx(want.pvalue, rel=1e-6, abs=1e-300)


def test_a_reference_from_few_rows_does_not_make_sampling_noise_significant() -> None:
    """A goodness-of-fit test would take a 300-row reference's shares as exact; the two-sample test
    knows they are a sample. Over 200 seeds of training-like traffic its p-value stays uniform:
    below 0.01 about 1 % of the time (at most 3 % here), where goodness-of-fit is far more often."""
    low_two = low_fit = 0
    for seed in range(200):
        rng = np.random.default_rng(1000 + seed)
        feat = compute_category_reference(_cities(rng, 300), name="city", input_name="city", column=0)
        h = category_histogram(_cities(rng, 3000), feat)
        obs = [*h["counts"], h["above"], h["nan"]]
        ref = [*feat.freqs, 0.0, 0.0]
        low_two += chi_square_samples([f * feat.extra["count"] for f in ref], obs)[2] < 0.01
        low_fit += chi_square(ref, obs)[2] < 0.01
    assert low_two <= 6, low_two
    assert low_fit > 3 * max(low_two, 1), (low_fit, low_two)


def test_string_labels_get_class_shares() -> None:
    ref = compute_inputs_reference({"x": np.arange(10.0).reshape(-1, 1)},
                                   outputs={"label": np.array(["a", "b"] * 5), "p": np.full((10, 2), 0.5)})
    assert ref.output == {"classes": {"a": 0.5, "b": 0.5}}


@pytest.mark.parametrize("bad", [
    {"categories": "lyon"},
    {"categories": ["lyon", 3]},
    {"categories": ["lyon"], "known": "oslo"},
])
def test_malformed_category_references_are_refused(bad: dict[str, object]) -> None:
    feat = {"name": "city", "edges": [0, 1, 2], "freqs": [0.5, 0.5], **bad}
    with pytest.raises(MalformedMessage, match="categor"):
        Reference.from_dict({"features": [], "categories": [feat]})


def test_a_reference_with_one_share_too_few_is_refused() -> None:
    feat = {"name": "city", "edges": [0, 1], "freqs": [1.0], "categories": ["lyon"]}
    with pytest.raises(MalformedMessage, match="one share per category"):
        Reference.from_dict({"features": [], "categories": [feat]})


def test_top_must_be_in_range() -> None:
    with pytest.raises(ValueError, match="top categories"):
        compute_category_reference(np.array(["a"]), name="c", input_name="c", column=0, top=0)
