"""The preflight set's two input forms and the canary's comparison per output family, in the pure
core (agent.core.canary) without ONNX Runtime: seeded synthetic outputs, blobs written here, and
sessions that are small classes answering from numpy."""

from __future__ import annotations

import io
import itertools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest

from edgefleet.agent.contract.config import DeviceProfile
from edgefleet.agent.core.canary import (
    MAX_PREFLIGHT_BYTES,
    REGRESSION_AGREEMENT,
    PreflightMismatch,
    PreflightParams,
    PreflightRejected,
    compare_outputs,
    load_preflight,
    preflight_feeds,
    preflight_rows,
    run_preflight,
)

PROFILE = DeviceProfile(name="t", latency_slo_ms=1000.0, memory_budget_mb=256)
RNG_SEED = 20240611


def rng(k: int = 0) -> np.random.Generator:
    return np.random.default_rng(RNG_SEED + k)


def _clock() -> Callable[[], float]:
    """A clock that moves 0.1 ms a reading: every preflight call takes 0.1 ms, far within any SLO."""
    ticks = itertools.count()
    return lambda: next(ticks) * 1e-4


def npz(**arrays: Any) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def probs(n: int, k: int, seed: int) -> np.ndarray:
    return rng(seed).dirichlet(np.ones(k), size=n).astype(np.float32)


# --- compare_outputs per family ------------------------------------------------------------------


def test_string_labels_agree_across_object_and_unicode_arrays() -> None:
    classes = np.array(["yes", "no", "maybe"])
    s = classes[rng(1).integers(0, 3, 50)]
    c = s.copy()
    flip = rng(2).random(50) < 0.3
    c[flip] = np.where(c[flip] == "yes", "no", "yes")
    # ONNX Runtime answers tensor(string) as object arrays; a stored answer may be unicode
    agreed, n, dist = compare_outputs({"label": s.astype(object)}, {"label": c})
    assert (agreed, n) == (int((s == c).sum()), 50) and agreed < 50
    assert dist == n - agreed  # only labels: 1 per disagreeing row


def test_several_labels_per_row_agree_only_when_all_do() -> None:
    s = rng(3).integers(0, 10, size=(40, 5))
    c = s.copy()
    c[::4, 2] += 1
    assert compare_outputs({"top5": s}, {"top5": c}) == (30, 40, 10.0)


def test_probability_rows_without_labels_compare_by_argmax_and_total_variation() -> None:
    p, q = probs(64, 4, 4), probs(64, 4, 5)
    agreed, n, dist = compare_outputs({"p": p}, {"p": q})
    assert agreed == int((p.argmax(1) == q.argmax(1)).sum()) and n == 64
    assert dist == pytest.approx(float(0.5 * np.abs(p.astype(np.float64) - q).sum()), rel=1e-9)


@pytest.mark.parametrize("shape", [(60,), (60, 1), (60, 2, 4, 4)], ids=["N", "Nx1", "NxCxHxW"])
def test_regression_values_of_any_rank_compare_by_relative_l1_per_row(shape: tuple[int, ...]) -> None:
    a = rng(6).normal(size=shape).astype(np.float32) + 3  # positive sums: no row is a distribution
    scale = np.where(rng(7).random(60) < 0.5, 1.001, 1.2).reshape((60,) + (1,) * (len(shape) - 1))
    b = (a * scale).astype(np.float32)
    fa, fb = a.reshape(60, -1).astype(np.float64), b.reshape(60, -1).astype(np.float64)
    want = np.abs(fa - fb).sum(1) / (np.abs(fa).sum(1) + np.abs(fb).sum(1))
    agreed, n, dist = compare_outputs({"y": a}, {"y": b})
    assert n == 60 and agreed == int((want <= REGRESSION_AGREEMENT).sum()) == int((scale.reshape(-1) < 1.1).sum())
    assert dist == pytest.approx(float(want.sum()), rel=1e-9)


def test_class_scores_without_labels_compare_by_argmax_and_relative_l1() -> None:
    """An [N, K] float output that is not a distribution (logits: a classifier exported without a
    label output) agrees on its argmax: a retrained classifier's logits always differ."""
    a = rng(6).normal(size=(60, 3)).astype(np.float32) + 3
    b = (a + rng(7).normal(scale=0.3, size=(60, 3))).astype(np.float32)
    fa, fb = a.astype(np.float64), b.astype(np.float64)
    want = np.abs(fa - fb).sum(1) / (np.abs(fa).sum(1) + np.abs(fb).sum(1))
    agreed, n, dist = compare_outputs({"logits": a}, {"logits": b})
    assert n == 60 and agreed == int((a.argmax(1) == b.argmax(1)).sum()) < 60
    assert agreed > int((want <= REGRESSION_AGREEMENT).sum())
    assert dist == pytest.approx(float(want.sum()), rel=1e-9)


def test_a_rows_distance_is_the_largest_over_its_float_outputs() -> None:
    p, q = probs(30, 3, 8), probs(30, 3, 9)
    y = rng(10).normal(size=(30, 1)).astype(np.float32) + 5
    y2 = y.copy()
    y2[:10] *= 1.5  # the first 10 rows also move in the regression output
    tv = 0.5 * np.abs(p.astype(np.float64) - q).sum(1)
    rel = np.abs(y.astype(np.float64) - y2).sum(1) / (np.abs(y).sum(1) + np.abs(y2).sum(1))
    agreed, n, dist = compare_outputs({"p": p, "y": y}, {"p": q, "y": y2})
    assert n == 30 and dist == pytest.approx(float(np.maximum(tv, rel).sum()), rel=1e-9)
    # without labels a row agrees when every float output does
    assert agreed == int(((p.argmax(1) == q.argmax(1)) & (rel <= REGRESSION_AGREEMENT)).sum())
    # with labels, the labels decide agreement; the distance is still the largest of the floats
    labels = p.argmax(1)
    agreed, n, dist = compare_outputs({"label": labels, "p": p, "y": y}, {"label": labels, "p": q, "y": y2})
    assert (agreed, n) == (30, 30) and dist == pytest.approx(float(np.maximum(tv, rel).sum()), rel=1e-9)


def test_outputs_with_the_same_names_pair_by_name_in_any_order() -> None:
    p, y = probs(20, 3, 11), rng(12).normal(size=(20, 3)).astype(np.float32)
    assert compare_outputs({"p": p, "y": y}, {"y": y.copy(), "p": p.copy()}) == (20, 20, 0.0)


def test_any_output_of_another_shape_makes_every_row_disagree() -> None:
    p = probs(20, 3, 13)
    y = np.ones((20, 2), np.float32)
    assert compare_outputs({"p": p, "y": y}, {"p": p, "y": np.ones((20, 3), np.float32)}) == (0, 20, 20.0)
    assert compare_outputs({"label": np.array(["a", "b"])}, {"label": np.array(["a", "b", "c"])}) == (0, 2, 2.0)


def test_a_nan_distance_in_one_output_does_not_hide_the_others() -> None:
    y = np.array([[1.0], [2.0]], np.float32)
    z = np.array([[np.nan], [1.0]], np.float32)
    _, n, dist = compare_outputs({"y": y, "z": z}, {"y": y * 1.5, "z": z})
    assert n == 2 and dist == pytest.approx(2 * 0.5 / 2.5)


# --- load_preflight: the two forms ------------------------------------------------------------------


def test_the_legacy_table_and_named_inputs_both_load() -> None:
    x = rng(14).normal(size=(8, 4)).astype(np.float32)
    legacy = load_preflight(npz(input=x, **{"output:label": np.zeros(8, np.int64)}))
    assert preflight_rows(legacy) == 8 and np.array_equal(legacy["input"], x)
    named = load_preflight(npz(**{
        "input:image": rng(15).normal(size=(8, 3, 4, 4)).astype(np.float32),
        "input:city": np.array([["paris"], ["saint-etienne"]] * 4),
        "input:n": np.arange(8, dtype=np.int64),
        "output:label": np.array(["yes", "no"] * 4),
        "output:y": np.zeros((8, 2, 2), np.float32),
    }))
    assert preflight_rows(named) == 8 and named["input:city"].dtype.kind == "U"


@pytest.mark.parametrize(("arrays", "why"), [
    ({"input": np.zeros((4, 2), np.float32), "input:x": np.zeros((4, 2), np.float32)}, "both 'input' and"),
    ({"input:a": np.zeros((4, 2), np.float32), "input:b": np.zeros((3, 2), np.float32)},
     r"same number of rows, got \{'input:a': 4, 'input:b': 3\}"),
    ({"input:a": np.zeros((0, 2), np.float32)}, r"non-empty array .* got float32 \[0, 2\]"),
    ({"input:a": np.float32(1.0)}, r"one row per example, got float32 \[\]"),
    ({"input:": np.zeros((4, 2), np.float32)}, "names no model input"),
    ({"input:a": np.zeros((4, 2), np.complex64)}, "numbers, bools or strings"),
    ({"input:a": np.zeros((4, 2), np.float32), "output:y": np.zeros((3,), np.float32)},
     r"one row of numbers, bools or strings per input row \(4\), got float32 \[3\]"),
    ({"input:a": np.zeros((4, 2), np.float32), "labels": np.zeros(4)}, "unexpected array 'labels'"),
    ({"output:y": np.zeros(4, np.float32)}, "no 'input' or 'input:<name>' array"),
    ({"input": np.zeros((4, 2, 2), np.float32)}, r"'input' must be a non-empty numeric N x F array"),
], ids=["both_forms", "ragged", "empty", "scalar", "no_name", "complex", "output_rows", "stray", "no_input",
        "legacy_nd"])
def test_a_malformed_set_is_refused_saying_what_was_expected(arrays: dict[str, Any], why: str) -> None:
    with pytest.raises(PreflightRejected, match=why) as exc:
        load_preflight(npz(**arrays))
    assert exc.value.reason == "preflight_blob"


def test_object_arrays_are_refused_even_when_they_hold_only_strings() -> None:
    with pytest.raises(PreflightRejected, match="without pickles"):
        load_preflight(npz(**{"input:city": np.array([["paris"]], dtype=object)}))


def test_a_named_set_that_expands_without_bound_is_refused() -> None:
    buf = io.BytesIO()
    np.savez_compressed(buf, **{"input:a": np.zeros((MAX_PREFLIGHT_BYTES // 4 + 1, 1), np.float32)})
    with pytest.raises(PreflightRejected, match="expands to"):
        load_preflight(buf.getvalue())


# --- preflight_feeds and run_preflight against sessions written here -------------------------------


@dataclass(frozen=True)
class Node:
    name: str
    type: str = "tensor(float)"


@dataclass
class FakeSession:
    """An ONNX Runtime session as preflight sees it: declared inputs and outputs and a numpy function."""

    inputs: list[Node]
    outputs: list[str]
    fn: Callable[[dict[str, Any]], list[Any]]
    fed: list[dict[str, Any]]

    def get_inputs(self) -> list[Node]:
        return self.inputs

    def get_outputs(self) -> list[Node]:
        return [Node(o) for o in self.outputs]

    def run(self, output_names: Any, input_feed: dict[str, Any]) -> list[Any]:
        self.fed.append(input_feed)
        return self.fn(input_feed)


def city_session(threshold: float = 0.0) -> FakeSession:
    """``city`` (string [N, 1]) and ``x`` (float [N, 1]) -> label (strings), score (float [N, 1])."""

    def fn(feed: dict[str, Any]) -> list[Any]:
        city, x = feed["city"], feed["x"]
        assert city.dtype == object and all(isinstance(v, str) for v in city.reshape(-1))
        assert x.dtype == np.float32
        score = x + np.array([[len(c)] for c in city.reshape(-1)], np.float32)
        label = np.where(score.reshape(-1) > 5 + threshold, "long", "short").astype(object)
        return [label, score]

    return FakeSession([Node("city", "tensor(string)"), Node("x")], ["label", "score"], fn, [])


def city_set(rows: int = 12) -> dict[str, Any]:
    city = np.array(["nice", "paris", "saint-etienne"])[rng(16).integers(0, 3, rows)].reshape(-1, 1)
    x = rng(17).normal(size=(rows, 1))  # float64 here: converted to the input's float32
    score = (x + np.array([[len(c)] for c in city.reshape(-1)])).astype(np.float32)
    return {"input:city": city, "input:x": x, "output:label": np.where(score.reshape(-1) > 5, "long", "short"),
            "output:score": score}


def preflight(sess: FakeSession, arrays: dict[str, Any], **kw: Any) -> Any:
    return run_preflight(sess, load_preflight(npz(**arrays)), PreflightParams(**kw), PROFILE, clock=_clock())


def test_every_input_is_fed_by_name_one_row_at_a_time_in_the_sessions_dtypes() -> None:
    sess = city_session()
    res = preflight(sess, city_set())
    assert res.ok, res
    assert res.details["agreement:label"] == 1.0 and res.details["max_abs_diff:score"] < 1e-6
    assert len(sess.fed) == 12 and all(set(f) == {"city", "x"} and len(f["city"]) == 1 for f in sess.fed)


def test_string_labels_that_differ_fail_on_agreement() -> None:
    res = preflight(city_session(threshold=1.0), city_set())
    assert not res.ok and res.reason == "preflight_labels" and 0 < res.details["agreement"] < 1


def test_a_set_for_other_input_names_is_refused_before_the_session_runs() -> None:
    sess = city_session()
    arrays = city_set()
    arrays["input:town"] = arrays.pop("input:city")
    res = preflight(sess, arrays)
    assert not res.ok and res.reason == "preflight_run" and sess.fed == []
    assert res.message.endswith("the preflight set has inputs ['town', 'x']; the candidate takes inputs ['city', 'x']")


def test_numbers_for_a_string_input_or_strings_for_a_number_are_refused() -> None:
    arrays = load_preflight(npz(**{"input:city": np.zeros((2, 1)), "input:x": np.zeros((2, 1))}))
    with pytest.raises(PreflightMismatch, match=r"input 'city' is tensor\(string\); .* float64 \[2, 1\], expected strings"):
        preflight_feeds(arrays, [Node("city", "tensor(string)"), Node("x")])
    arrays = load_preflight(npz(**{"input:x": np.array([["a"], ["b"]])}))
    with pytest.raises(PreflightMismatch, match=r"input 'x' is tensor\(float\); .*<U1 \[2, 1\], expected numbers"):
        preflight_feeds(arrays, [Node("x")])


def test_the_legacy_table_goes_to_a_models_only_input_in_its_dtype() -> None:
    arrays = load_preflight(npz(input=np.ones((3, 2), np.float32)))
    feeds = preflight_feeds(arrays, [Node("features", "tensor(double)")], rows=2)
    assert list(feeds) == ["features"] and feeds["features"].dtype == np.float64 and feeds["features"].shape == (2, 2)
    with pytest.raises(PreflightMismatch, match=r"one input table 'input' .* the candidate takes inputs \['a', 'b'\]"):
        preflight_feeds(arrays, [Node("a"), Node("b")])


def test_a_regression_output_of_rank_one_is_checked_by_allclose() -> None:
    x = rng(18).normal(size=(10, 3, 2, 2)).astype(np.float32)

    def fn(feed: dict[str, Any]) -> list[Any]:
        return [feed["image"].reshape(len(feed["image"]), -1).sum(axis=1)]

    sess = FakeSession([Node("image")], ["y"], fn, [])
    want = x.reshape(10, -1).sum(axis=1)
    assert preflight(sess, {"input:image": x, "output:y": want}).ok
    res = preflight(sess, {"input:image": x, "output:y": want + 0.01})
    assert not res.ok and res.reason == "preflight_outputs" and res.details["max_abs_diff"] == pytest.approx(0.01, rel=1e-3)
