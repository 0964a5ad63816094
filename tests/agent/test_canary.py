"""The canary's pure core and its thin adapters, without a broker: output comparison, per-window
statistics, the local guard's verdicts, preflight on real ONNX Runtime sessions of models trained
here, the shadow queue (the stable path never waits) and split serving through ModelServer."""

from __future__ import annotations

import io
import itertools
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest

from edgefleet.agent.adapters.capture import Capture
from edgefleet.agent.app.serving import ModelServer, load
from edgefleet.agent.app.shadow import CanaryRun, Shadow
from edgefleet.agent.contract.config import DeviceProfile
from edgefleet.agent.contract.errors import MalformedMessage
from edgefleet.agent.contract.wire import ModelEntry
from edgefleet.agent.core.canary import (
    CanaryLimits,
    CanarySpec,
    CanaryStats,
    PreflightParams,
    PreflightRejected,
    Totals,
    Verdict,
    compare_outputs,
    load_preflight,
    local_verdict,
    run_preflight,
)
from tests._skmodels import data, forest, logreg, preflight_npz
from tests.simulator import tiny_model

PROFILE = DeviceProfile(name="t", latency_slo_ms=1000.0, memory_budget_mb=256)
SHA = "ab" * 32


def session(blob: bytes) -> ort.InferenceSession:
    return ort.InferenceSession(blob, providers=["CPUExecutionProvider"])


def answer(blob: bytes, x: np.ndarray) -> dict[str, Any]:
    s = session(blob)
    return dict(zip([o.name for o in s.get_outputs()], s.run(None, {"x": x}), strict=True))


def ticking(step_s: float):  # type: ignore[no-untyped-def]
    """A fake clock advancing ``step_s`` per reading: latencies without sleeping."""
    counter = itertools.count()
    return lambda: next(counter) * step_s


# --- compare_outputs ------------------------------------------------------------------------------


def test_identical_models_agree_on_every_row_at_zero_distance() -> None:
    X = data()[0][:100]
    out = answer(logreg()[0], X)
    assert compare_outputs(out, out) == (100, 100, 0.0)


def test_a_model_trained_on_shuffled_labels_disagrees_on_many_rows() -> None:
    X = data()[0][:200]
    agreed, n, dist = compare_outputs(answer(logreg()[0], X), answer(logreg(shuffled=True)[0], X))
    assert n == 200
    assert agreed / n < 0.8
    assert dist / n > 0.1  # total variation between the probability rows


def test_a_close_variant_agrees_mostly_with_a_small_distance() -> None:
    X = data()[0][:200]
    agreed, n, dist = compare_outputs(answer(logreg()[0], X), answer(logreg(c=0.5)[0], X))
    assert agreed / n > 0.97
    assert 0 < dist / n < 0.05


def test_total_variation_on_probabilities_is_computed_per_row() -> None:
    s = {"label": np.array([0, 1]), "p": np.array([[0.9, 0.1], [0.2, 0.8]], dtype=np.float32)}
    c = {"label": np.array([0, 0]), "p": np.array([[0.7, 0.3], [0.6, 0.4]], dtype=np.float32)}
    agreed, n, dist = compare_outputs(s, c)
    assert (agreed, n) == (1, 2)
    assert dist == pytest.approx(0.2 + 0.4, abs=1e-6)


def test_regressors_compare_by_relative_distance() -> None:
    s = {"y": np.array([[1.0], [2.0], [0.0]], dtype=np.float32)}
    c = {"y": np.array([[1.0], [3.0], [0.0]], dtype=np.float32)}
    agreed, n, dist = compare_outputs(s, c)
    assert (agreed, n) == (2, 3)
    assert dist == pytest.approx(1 / 5)


def test_outputs_of_another_shape_disagree_on_every_row() -> None:
    s = {"label": np.array([0, 1, 1])}
    c = {"label": np.array([0, 1])}
    assert compare_outputs(s, c) == (0, 3, 3.0)


def test_zipmap_outputs_are_read_as_a_probability_matrix() -> None:
    s = {"label": np.array([1]), "p": [{0: 0.2, 1: 0.8}]}
    c = {"label": np.array([1]), "p": [{0: 0.4, 1: 0.6}]}
    assert compare_outputs(s, c) == (1, 1, pytest.approx(0.2))


# --- CanaryStats ----------------------------------------------------------------------------------


def test_stats_window_has_the_contract_fields_and_resets_counts() -> None:
    st = CanaryStats(rollout="r-1", mode="shadow", version="2")
    X = data()[0][:10]
    a, b = answer(logreg()[0], X), answer(logreg(shuffled=True)[0], X)
    st.record_pair(a, a, 1.0, 2.0)
    st.record_pair(a, b, 1.0, 4.0)
    st.record_candidate(3.0, ok=False)
    st.record_skipped()
    w = st.window()
    assert {k: w[k] for k in ("rollout", "mode", "version", "state", "reason")} == {
        "rollout": "r-1", "mode": "shadow", "version": "2", "state": "running", "reason": None}
    assert (w["requests"], w["errors"], w["skipped"], w["compared"]) == (3, 1, 1, 20)
    assert 10 <= w["agreed"] < 20
    assert w["output_distance_sum"] > 0
    assert w["latency_ms"]["max"] == 4.0 and w["stable_latency_ms"]["p50"] == 1.0
    assert sum(w["outputs"]["classes"].values()) == 20
    again = st.window()
    assert (again["requests"], again["compared"], again["skipped"]) == (0, 0, 0)
    assert "p95" not in again["latency_ms"]
    assert st.totals().requests == 3  # the guard's evidence is cumulative


def test_nan_from_the_candidate_counts_as_an_error_not_a_comparison() -> None:
    st = CanaryStats(rollout="r", mode="shadow", version="2")
    good = {"y": np.ones((1, 2), dtype=np.float32)}
    st.record_pair(good, {"y": np.array([[np.nan, 1]], dtype=np.float32)}, 1.0, 1.0)
    w = st.window()
    assert (w["requests"], w["errors"], w["compared"]) == (1, 1, 0)
    assert st.totals().nonfinite == 1


def test_the_guard_sees_the_last_latency_samples_after_the_history_wraps() -> None:
    from collections import deque

    from edgefleet.agent.core.canary import LATENCY_HISTORY, WARMUP_SAMPLES

    st = CanaryStats(rollout="r", mode="shadow", version="2")
    ever = 0
    a = {"y": np.ones((1, 2), dtype=np.float32)}
    seen_c: deque[float] = deque(maxlen=LATENCY_HISTORY)
    seen_s: deque[float] = deque(maxlen=LATENCY_HISTORY)
    rng = np.random.default_rng(1)
    for k in (1, 7, 300, LATENCY_HISTORY - 5, 1, LATENCY_HISTORY + 3, 2):  # batches that wrap the ring
        c, s = rng.random(k), rng.random(k)
        rows = {"y": np.ones((k, 2), dtype=np.float32)}
        st.record_pair(rows, rows, s, c)
        seen_c.extend(c.tolist())
        seen_s.extend(s.tolist())
        st.record_candidate(0.5, ok=True, outputs=a)
        st.record_stable(0.25)
        seen_c.append(0.5)
        seen_s.append(0.25)
        t = st.totals()
        ever += k + 1
        # The first WARMUP_SAMPLES candidate latencies of the session are left out while still kept.
        want_c = list(seen_c)[WARMUP_SAMPLES:] if ever <= LATENCY_HISTORY else list(seen_c)
        assert sorted(np.asarray(t.candidate_ms).tolist()) == sorted(want_c)
        assert sorted(np.asarray(t.stable_ms).tolist()) == sorted(seen_s)


@pytest.mark.parametrize("n", [2, 3, 20, 21, 50, 999, 2048])
def test_the_guard_p95_is_numpys_percentile_bit_for_bit(n: int) -> None:
    from edgefleet.agent.core.canary import _p95

    rng = np.random.default_rng(n)
    for values in (rng.lognormal(size=n), rng.integers(0, 4, size=n).astype(float), rng.random(n) * 1e-3):
        assert _p95(values) == float(np.percentile(values, 95))
        assert _p95(tuple(values.tolist())) == float(np.percentile(values, 95))


# --- local guard ----------------------------------------------------------------------------------


def totals(**kw: Any) -> Totals:
    base: dict[str, Any] = {"requests": 0, "errors": 0, "nonfinite": 0, "compared": 0, "agreed": 0,
                            "candidate_ms": (), "stable_ms": ()}
    return Totals(**{**base, **kw})


LIMITS = CanaryLimits(max_error_rate=0.05, max_latency_ratio=3.0, min_samples=20, latency_slo_ms=50.0)


def test_nan_drops_the_candidate_at_once() -> None:
    v = local_verdict(totals(requests=1, errors=1, nonfinite=1), LIMITS)
    assert v is not None and v.reason == "nan_output"


def test_error_rate_is_judged_only_after_min_samples() -> None:
    assert local_verdict(totals(requests=19, errors=5), LIMITS) is None
    v = local_verdict(totals(requests=20, errors=5), LIMITS)
    assert v is not None and v.reason == "error_rate" and v.numbers["error_rate"] == 0.25
    assert local_verdict(totals(requests=20, errors=1), LIMITS) is None


def test_latency_ratio_against_the_stable_on_the_same_inputs() -> None:
    fast, slow = (1.0,) * 30, (4.0,) * 30
    v = local_verdict(totals(requests=30, candidate_ms=slow, stable_ms=fast), LIMITS)
    assert v is not None and v.reason == "latency_ratio" and v.numbers["latency_ratio"] == 4.0
    assert local_verdict(totals(requests=30, candidate_ms=(2.0,) * 30, stable_ms=fast), LIMITS) is None
    assert local_verdict(totals(requests=10, candidate_ms=slow[:10], stable_ms=fast), LIMITS) is None


def test_the_profile_latency_slo_is_a_limit_too() -> None:
    assert local_verdict(totals(requests=30, candidate_ms=(58.0,) * 30, stable_ms=(40.0,) * 30), LIMITS) is None
    v = local_verdict(totals(requests=30, candidate_ms=(70.0,) * 30, stable_ms=(40.0,) * 30), LIMITS)
    assert v is not None and v.reason == "latency_slo"


def test_canary_limits_and_spec_are_read_strictly() -> None:
    lim = CanaryLimits.from_mapping({"max_error_rate": 0.1, "min_samples": 5}, latency_slo_ms=10.0)
    assert (lim.max_error_rate, lim.min_samples, lim.max_latency_ratio, lim.latency_slo_ms) == (0.1, 5, 5.0, 10.0)
    with pytest.raises(MalformedMessage, match="max_error_rate"):
        CanaryLimits.from_mapping({"max_error_rate": "high"})
    stable = {"version": "1", "sha256": SHA, "size": 1, "url": "http://x/b"}
    spec = CanarySpec.from_mapping({"rollout": "r-9", "mode": "split", "fraction": 0.3, "stable": stable})
    assert (spec.rollout, spec.mode, spec.fraction, spec.stable.version) == ("r-9", "split", 0.3, "1")
    for bad in ({"mode": "mirror"}, {"fraction": 0}, {"fraction": 1.5}, {"stable": None}, {"rollout": ""}):
        with pytest.raises(MalformedMessage):
            CanarySpec.from_mapping({"rollout": "r", "mode": "shadow", "fraction": 0.1, "stable": stable, **bad})


# --- preflight ------------------------------------------------------------------------------------


def preflight(blob: bytes, npz: bytes, profile: DeviceProfile = PROFILE, **kw: Any) -> Any:
    kw.setdefault("clock", time.perf_counter)
    return run_preflight(session(blob), load_preflight(npz), PreflightParams(), profile, **kw)


def test_preflight_passes_when_the_onnx_model_matches_its_sklearn_source() -> None:
    blob, est = forest()
    res = preflight(blob, preflight_npz(est))
    assert res.ok, res
    assert res.details["rows"] == 64 and res.details["agreement:label"] == 1.0
    assert res.details["max_abs_diff:probabilities"] < 1e-4


def test_preflight_fails_on_labels_when_the_candidate_is_another_model() -> None:
    res = preflight(logreg(shuffled=True)[0], preflight_npz(logreg()[1]))
    assert not res.ok and res.reason == "preflight_labels"
    assert res.details["agreement"] < 0.8


def test_preflight_fails_on_outputs_beyond_tolerance() -> None:
    # Same labels (a close variant), other probabilities: tolerances are on the numbers.
    _, est = logreg()
    buf = io.BytesIO()
    X = data()[0][:64]
    np.savez(buf, input=X, **{"output:probabilities": est.predict_proba(X).astype(np.float32)})
    res = preflight(logreg(c=0.01)[0], buf.getvalue())
    assert not res.ok and res.reason == "preflight_outputs" and res.details["max_abs_diff"] > 1e-3


def test_preflight_fails_on_nan() -> None:
    buf = io.BytesIO()
    np.savez(buf, input=np.ones((4, 2), dtype=np.float32))
    res = run_preflight(session(tiny_model(float("nan"))), load_preflight(buf.getvalue()), PreflightParams(), PROFILE,
                        clock=time.perf_counter)
    assert not res.ok and res.reason == "preflight_nan"


def test_preflight_fails_on_latency_above_the_slo() -> None:
    blob, est = logreg()
    slow_clock = ticking(0.2)  # every call "takes" 200 ms
    res = preflight(blob, preflight_npz(est), DeviceProfile(name="t", latency_slo_ms=100.0), clock=slow_clock)
    assert not res.ok and res.reason == "preflight_latency" and res.details["p95_ms"] == pytest.approx(200.0)


def test_preflight_fails_on_memory_above_the_budget() -> None:
    blob, est = logreg()
    res = preflight(blob, preflight_npz(est), DeviceProfile(name="t", memory_budget_mb=64), memory_mb=100.0)
    assert not res.ok and res.reason == "preflight_memory"


def test_preflight_fails_when_the_candidate_cannot_run_the_inputs() -> None:
    buf = io.BytesIO()
    np.savez(buf, input=np.ones((4, 7), dtype=np.float32))  # 7 features, the model takes 4
    res = preflight(logreg()[0], buf.getvalue())
    assert not res.ok and res.reason == "preflight_run"


def test_preflight_checking_an_output_the_candidate_lacks_fails() -> None:
    buf = io.BytesIO()
    np.savez(buf, input=data()[0][:4], **{"output:score": np.zeros(4, dtype=np.float32)})
    res = preflight(logreg()[0], buf.getvalue())
    assert not res.ok and res.reason == "preflight_outputs" and res.details["output"] == "score"


@pytest.mark.parametrize("make", ["garbage", "pickle", "no_input", "ragged", "stray", "bomb"])
def test_an_unusable_preflight_blob_is_refused(make: str) -> None:
    buf = io.BytesIO()
    if make == "garbage":
        buf.write(b"PK\x03\x04 not really a zip")
    elif make == "pickle":
        np.savez(buf, input=np.array([{"a": 1}], dtype=object))
    elif make == "no_input":
        np.savez(buf, **{"output:label": np.zeros(3, dtype=np.int64)})
    elif make == "ragged":
        np.savez(buf, input=np.zeros((4, 2), dtype=np.float32), **{"output:label": np.zeros(3, dtype=np.int64)})
    elif make == "stray":
        np.savez(buf, input=np.zeros((4, 2), dtype=np.float32), extra=np.zeros(4))
    else:  # 80 MiB of zeros compress to a few hundred KiB
        np.savez_compressed(buf, input=np.zeros((10 * 2**20, 2), dtype=np.float32))
    with pytest.raises(PreflightRejected) as exc:
        load_preflight(buf.getvalue())
    assert exc.value.reason == "preflight_blob"


# --- the shadow queue -------------------------------------------------------------------------------


def test_sampling_is_deterministic_and_exact() -> None:
    st = CanaryStats(rollout="r", mode="shadow", version="2")
    sh = Shadow(replay=lambda f: f, stats=st, fraction=0.25, capacity=100)
    picked = [sh.offer({"x": np.ones((1, 2))}, {}, 1.0) for _ in range(12)]
    assert picked == [False, False, False, True] * 3


def test_a_full_queue_skips_and_counts_and_the_stable_path_never_waits() -> None:
    release = threading.Event()
    entered = threading.Event()

    def stuck(feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        entered.set()
        release.wait(30)  # the candidate hangs: only the shadow thread may wait for it
        return {"y": feeds["x"]}

    st = CanaryStats(rollout="r", mode="shadow", version="2")
    sh = Shadow(replay=stuck, stats=st, fraction=1.0, capacity=4, max_batch=1)
    sh.start()
    try:
        x = {"x": np.ones((1, 2), dtype=np.float32)}
        sh.offer(x, {"y": x["x"]}, 1.0)
        assert entered.wait(10)  # the thread now sits inside the hung replay
        queued = [sh.offer(x, {"y": x["x"]}, 1.0) for _ in range(100)]  # returns: never blocks
        assert queued.count(True) == 4 and sh.pending() == 4
        assert st.window()["skipped"] == 96
    finally:
        release.set()
        sh.stop()


def test_queued_requests_are_replayed_in_one_batch() -> None:
    calls: list[int] = []

    def replay(feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        calls.append(len(feeds["x"]))
        return {"y": feeds["x"] * 2}

    st = CanaryStats(rollout="r", mode="shadow", version="2")
    sh = Shadow(replay=replay, stats=st, fraction=1.0, capacity=16, max_batch=8, clock=ticking(0.001))
    for i in range(5):
        x = np.full((i % 2 + 1, 2), float(i), dtype=np.float32)
        sh.offer({"x": x}, {"y": x * 2}, 1.0)
    assert sh.process() == 5
    assert calls == [7]  # 1+2+1+2+1 rows, one candidate call
    w = st.window()
    assert (w["requests"], w["compared"], w["agreed"]) == (5, 7, 7)


def test_a_batch_that_fails_on_one_input_counts_only_that_request_as_an_error() -> None:
    """A model that fails on some inputs fails the whole batched call; the replay then finds out
    which requests fail, so the error rate is the model's, not its batch size's."""

    def replay(feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if (feeds["x"] < 0).any():
            raise RuntimeError("indices element out of data bounds")
        return {"y": feeds["x"] * 2}

    st = CanaryStats(rollout="r", mode="shadow", version="2")
    sh = Shadow(replay=replay, stats=st, fraction=1.0, capacity=16, max_batch=16, clock=ticking(0.001))
    for i in range(10):
        x = np.full((1, 2), -1.0 if i == 3 else float(i), dtype=np.float32)
        sh.offer({"x": x}, {"y": x * 2}, 1.0)
    assert sh.process() == 10
    w = st.window()
    assert (w["requests"], w["errors"], w["compared"], w["agreed"]) == (10, 1, 9, 9)


def test_requests_that_do_not_concatenate_are_replayed_per_input_signature() -> None:
    """One candidate call per (trailing shape, dtype) group, every request compared once."""
    calls: list[tuple[tuple[int, ...], str]] = []

    def replay(feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        calls.append((feeds["x"].shape, feeds["x"].dtype.str))
        return {"y": feeds["x"].reshape(len(feeds["x"]), -1)[:, :1] * 2}

    st = CanaryStats(rollout="r", mode="shadow", version="2")
    sh = Shadow(replay=replay, stats=st, fraction=1.0, capacity=16, max_batch=8, clock=ticking(0.001))
    shapes = [(1, 2), (1, 3), (2, 2), (1, 3)]
    for i, shape in enumerate(shapes):
        x = np.full(shape, float(i), dtype=np.float32)
        sh.offer({"x": x}, {"y": x.reshape(len(x), -1)[:, :1] * 2}, 1.0)
    sh.offer({"x": np.ones((1, 2), dtype=np.float64)}, {"y": np.full((1, 1), 2.0)}, 1.0)
    assert sh.process() == 5
    assert sorted(calls) == [((1, 2), "<f8"), ((2, 3), "<f4"), ((3, 2), "<f4")]
    w = st.window()
    assert (w["requests"], w["compared"], w["agreed"]) == (5, 6, 6)  # 1+1+2+1+1 rows
    calls.clear()  # same shapes, other dtypes: numpy would upcast them all; the candidate gets each as sent
    for dtype in (np.float32, np.float64, np.float32):
        x = np.ones((1, 2), dtype=dtype)
        sh.offer({"x": x}, {"y": x[:, :1] * 2}, 1.0)
    assert sh.process() == 3
    assert sorted(calls) == [((1, 2), "<f8"), ((2, 2), "<f4")]


# --- CanaryRun in the model server -----------------------------------------------------------------


def loaded(tmp_path: Path, version: str, blob: bytes, name: str = "m") -> Any:
    p = tmp_path / f"{version}.onnx"
    p.write_bytes(blob)
    entry = ModelEntry(version=version, sha256=SHA, size=len(blob), url="http://x/b")
    return load(name, entry, p, PROFILE)


def spec(mode: str, fraction: float) -> CanarySpec:
    return CanarySpec(rollout="r-1", mode=mode, fraction=fraction,
                      stable=ModelEntry(version="1", sha256=SHA, size=1, url="http://x/b"))


def test_split_mode_serves_a_fraction_from_the_candidate_and_names_its_version(tmp_path: Path) -> None:
    server = ModelServer()
    server.install(loaded(tmp_path, "1", tiny_model(1.0)))
    run = CanaryRun(candidate=loaded(tmp_path, "2", tiny_model(2.0)), spec=spec("split", 0.5),
                    limits=CanaryLimits(), on_drop=lambda r, v: None)
    server.attach_canary("m", run)
    x = {"x": np.ones((1, 2), dtype=np.float32)}
    answers = [server.infer("m", x) for _ in range(6)]
    assert [(r.version, float(r.outputs["y"][0, 0])) for r in answers] == [("1", 1.0), ("2", 2.0)] * 3
    w = run.stats.window()
    assert (w["requests"], w["errors"], w["compared"]) == (3, 0, 0)
    assert len(server.models()["m"].recorder.swap().latencies_s) == 3  # the stable's own share


def test_split_answers_are_captured_under_the_version_that_made_them(tmp_path: Path) -> None:
    sent: list[list[dict[str, Any]]] = []
    server = ModelServer()
    server.capture = Capture(folder=tmp_path / "capture", sample_rate=1.0, budget_bytes=1 << 20,
                             send=sent.append, clock=lambda: 1000.0)
    server.install(loaded(tmp_path, "1", tiny_model(1.0)))
    run = CanaryRun(candidate=loaded(tmp_path, "2", tiny_model(2.0)), spec=spec("split", 0.5),
                    limits=CanaryLimits(), on_drop=lambda r, v: None)
    server.attach_canary("m", run)
    answers = [server.infer("m", {"x": np.ones((1, 2), dtype=np.float32)}, request_id=f"q{i}") for i in range(4)]
    server.capture.flush()
    assert server.capture.upload() == 4
    captured = {r["request_id"]: (r["version"], r["sha256"]) for batch in sent for r in batch}
    assert captured == {a.request_id: (a.version, a.sha256) for a in answers}
    assert {v for v, _ in captured.values()} == {"1", "2"}


def test_a_nan_candidate_is_dropped_at_once_and_the_stable_answers(tmp_path: Path) -> None:
    server = ModelServer()
    server.install(loaded(tmp_path, "1", tiny_model(1.0)))
    drops: list[Verdict] = []

    def on_drop(r: CanaryRun, v: Verdict) -> None:
        server.detach_canary("m", r)
        drops.append(v)

    run = CanaryRun(candidate=loaded(tmp_path, "2", tiny_model(float("nan"))), spec=spec("split", 1.0),
                    limits=CanaryLimits(), on_drop=on_drop)
    server.attach_canary("m", run)
    res = server.infer("m", {"x": np.ones((1, 2), dtype=np.float32)})
    assert res.version == "1" and float(res.outputs["y"][0, 0]) == 1.0
    assert [v.reason for v in drops] == ["nan_output"]
    assert server.canaries() == {} and run.stats.state == "dropped"
    assert server.infer("m", {"x": np.ones((1, 2), dtype=np.float32)}).version == "1"


def test_shadow_mode_answers_from_the_stable_and_compares_off_the_request_path(tmp_path: Path) -> None:
    server = ModelServer()
    server.install(loaded(tmp_path, "1", logreg()[0]))
    run = CanaryRun(candidate=loaded(tmp_path, "2", logreg(shuffled=True)[0]), spec=spec("shadow", 1.0),
                    limits=CanaryLimits(min_samples=10_000), on_drop=lambda r, v: None)
    server.attach_canary("m", run)
    X = data()[0]
    for i in range(40):
        assert server.infer("m", {"x": X[i : i + 1]}).version == "1"
    assert run.shadow is not None
    while run.shadow.process():  # the shadow thread's work, done here deterministically
        pass
    w = run.stats.window()
    assert (w["requests"], w["compared"], w["skipped"]) == (40, 40, 0)
    assert w["agreed"] / w["compared"] < 0.8
    assert w["stable_latency_ms"]["p50"] > 0


def test_labels_of_different_integer_or_bool_dtypes_compare_by_value() -> None:
    s = {"label": np.array([True, False, True])}
    c = {"label": np.array([1, 0, 0], dtype=np.int32)}
    assert compare_outputs(s, c)[:2] == (2, 3)


def test_a_shadow_times_the_stable_and_the_candidate_alike_on_the_same_batches(tmp_path: Path) -> None:
    """Issue 15: an identical candidate showed a 1.5x latency ratio because it was timed in batched
    replays on the shadow thread and the stable on the request path. With the stable bound, each
    batch runs on both sessions on the shadow thread, in alternating order."""
    server = ModelServer()
    forest_blob = forest(50, 8)[0]
    server.install(loaded(tmp_path, "1", forest_blob))
    run = CanaryRun(candidate=loaded(tmp_path, "2", forest_blob), spec=spec("shadow", 1.0),
                    limits=CanaryLimits(), on_drop=lambda r, v: None, linger_s=0.0)
    server.attach_canary("m", run)
    assert run.shadow is not None and run.shadow.stable_replay is not None
    X = data()[0][:1]
    for _ in range(30):
        for _ in range(8):
            server.infer("m", {"x": X})
        run.shadow.process()
    t = run.stats.totals()
    assert t.compared >= 200 and t.agreed == t.compared
    ratio = float(np.median(t.candidate_ms) / np.median(t.stable_ms))
    assert 0.6 < ratio < 1.6, f"identical models timed alike should be close to 1x, got {ratio:.2f}"
    server.install(loaded(tmp_path, "1b", forest_blob))  # a new stable is bound too
    assert run.shadow.stable_replay is not None
