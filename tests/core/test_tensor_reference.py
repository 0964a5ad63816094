"""N-D inputs (images): the reference computed at publish and the window folded on the device
measure the same statistics, and the drift score moves only when the images do (seeded)."""

from __future__ import annotations

import numpy as np
import pytest

from edgefleet.agent.contract.errors import MalformedMessage
from edgefleet.agent.contract.wire import Reference
from edgefleet.agent.core.telemetry import TENSOR_SAMPLES, Snapshot, fold
from edgefleet.hub.core.drift import Policy, merge_feature_lists, score_report
from edgefleet.hub.core.reference import channel_axis, compute_reference


def _images(rng: np.random.Generator, n: int, shift: float = 0.0, channel: int | None = None) -> np.ndarray:
    x = rng.beta(2.0, 3.0, size=(n, 3, 8, 8)).astype(np.float32)
    if channel is None:
        x += shift
    else:
        x[:, channel] += shift
    return np.clip(x, 0.0, 1.0)


def _window(ref: Reference, batches: list[np.ndarray]) -> dict[str, dict[str, object]]:
    n = sum(len(b) for b in batches)
    snap = Snapshot(version="1", requests=len(batches), errors=0, rows=n, latencies_s=np.zeros(len(batches)),
                    dropped_latencies=0, inputs=batches, outputs=[])
    return {h["name"]: h for h in fold(snap, ref).inputs}


def _windows(ref: Reference, rng: np.random.Generator, k: int = 10, **shift: object) -> dict[str, dict[str, object]]:
    """``k`` windows of 64 images each, merged as the hub merges a drift window's buckets."""
    return merge_feature_lists(list(_window(ref, [_images(rng, 8, **shift) for _ in range(8)]).values())  # type: ignore[arg-type]
                               for _ in range(k))


def _scores(ref: Reference, window: dict[str, dict[str, object]]) -> dict[str, float]:
    rep = score_report(model="cnn", version="1", scope="fleet", reference=ref, inputs=window, classes={},
                       policy=Policy(), window_start=0, window_end=1, windows=1)
    return {f.feature: f.psi for f in rep.features}


def test_the_reference_names_the_input_its_channels_and_its_sample_statistics() -> None:
    ref = compute_reference(_images(np.random.default_rng(0), 400).astype(np.float64), input_name="image")
    names = [t.name for t in ref.tensors]
    assert names == ["image[c0]", "image[c1]", "image[c2]", "image.mean", "image.std", "image.saturated"]
    assert ref.features == () and ref.rows == 400
    again = Reference.from_dict(ref.to_dict())
    assert again.tensors == ref.tensors and again.to_dict() == ref.to_dict()
    assert channel_axis((10, 3, 32, 32)) == 1 and channel_axis((10, 32, 32, 3)) == -1


def test_same_images_score_low_and_brighter_images_or_one_channel_score_high() -> None:
    rng = np.random.default_rng(1)
    ref = compute_reference(_images(rng, 600).astype(np.float64), input_name="image")
    same = _scores(ref, _windows(ref, rng))
    assert max(same.values()) < 0.25, same  # below the alarm level (20 seeds here: at most 0.099)
    bright = _scores(ref, _windows(ref, rng, shift=0.25))
    assert bright["image.mean"] > 0.25 and min(bright[f"image[c{k}]"] for k in range(3)) > 0.25, bright
    red = _scores(ref, _windows(ref, rng, shift=0.3, channel=0))
    assert red["image[c0]"] > 0.25 and red["image[c1]"] < 0.1 and red["image[c2]"] < 0.1, red  # names the channel


def test_a_window_folds_at_most_a_bounded_sample_of_images() -> None:
    rng = np.random.default_rng(2)
    ref = compute_reference(_images(rng, 100).astype(np.float64), input_name="image")
    w = _window(ref, [_images(rng, 50) for _ in range(10)])
    def total(h: dict[str, object]) -> int:
        return sum(h["counts"]) + int(h["below"]) + int(h["above"])  # type: ignore[call-overload, arg-type]

    assert total(w["image.mean"]) == TENSOR_SAMPLES  # 500 images in the window, 64 folded
    assert total(w["image[c0]"]) == TENSOR_SAMPLES * 64  # every value of those, per channel


def test_a_table_reference_and_a_malformed_tensor_feature() -> None:
    ref = compute_reference(np.random.default_rng(3).normal(size=(50, 4)))
    assert len(ref.features) == 4 and ref.tensors == ()
    bad = ref.to_dict() | {"tensors": [{"name": "x", "edges": [0, 1], "freqs": [1.0], "stat": "median"}]}
    with pytest.raises(MalformedMessage, match="needs stat in"):
        Reference.from_dict(bad)


def _fold_outputs(ref: Reference, outputs: list[np.ndarray]) -> dict[str, dict[str, object]]:
    snap = Snapshot(version="1", requests=len(outputs), errors=0, rows=sum(len(o) for o in outputs),
                    latencies_s=np.zeros(len(outputs)), dropped_latencies=0,
                    inputs=[np.zeros((len(o), 2)) for o in outputs], outputs=outputs)
    return {h["name"]: h for h in fold(snap, ref).inputs}


def test_regression_values_and_class_confidence_have_a_reference_and_drift_when_they_move() -> None:
    rng = np.random.default_rng(4)
    table = rng.normal(size=(800, 2))
    reg = compute_reference(table, outputs=(table[:, :1] * 2.0).astype(np.float32))
    assert [t.name for t in reg.tensors] == ["output.value"] and reg.output is None
    same = _scores(reg, _fold_outputs(reg, [(rng.normal(size=(50, 1)) * 2).astype(np.float32) for _ in range(16)]))
    moved = _scores(reg, _fold_outputs(reg, [(rng.normal(size=(50, 1)) * 2 + 3).astype(np.float32) for _ in range(16)]))
    assert same["output.value"] < 0.1 < 0.25 < moved["output.value"], (same, moved)

    def probs(n: int, sharp: float) -> np.ndarray:
        z = rng.normal(size=(n, 3)) * sharp
        e = np.exp(z - z.max(axis=1, keepdims=True))
        return (e / e.sum(axis=1, keepdims=True)).astype(np.float32)

    clf = compute_reference(table, outputs=probs(800, 3.0))
    assert [t.name for t in clf.tensors] == ["output.confidence"]
    same = _scores(clf, _fold_outputs(clf, [probs(50, 3.0) for _ in range(16)]))
    unsure = _scores(clf, _fold_outputs(clf, [probs(50, 0.5) for _ in range(16)]))  # a model losing confidence
    assert same["output.confidence"] < 0.1 and unsure["output.confidence"] > 0.25, (same, unsure)
