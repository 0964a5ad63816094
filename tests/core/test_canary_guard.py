"""The device's local guard drops a candidate only on clear evidence (agent.core.canary), tested
with seeded synthetic latencies: identical models measured on different threads are never
dropped, grossly slow, erroring or SLO-breaking ones always are, at the stated 99 % confidence."""

from __future__ import annotations

import numpy as np
import pytest

from edgefleet.agent.core.canary import (
    WARMUP_SAMPLES,
    CanaryLimits,
    CanaryStats,
    Totals,
    local_verdict,
    quantile_bounds,
    wilson_bounds,
)

DEFAULT = CanaryLimits(latency_slo_ms=50.0)  # what a desired state without limits gets (5x, 5 %, 50)


def totals(cand: np.ndarray, stable: np.ndarray, *, errors: int = 0, requests: int | None = None) -> Totals:
    return Totals(requests=requests or len(cand), errors=errors, nonfinite=0, compared=0, agreed=0,
                  candidate_ms=cand, stable_ms=stable)


def shadow_like(rng: np.random.Generator, n: int, median_ms: float, sigma: float) -> np.ndarray:
    """Latencies of a small model: log-normal body and a few scheduler hiccups 20-50x the median."""
    x = rng.lognormal(np.log(median_ms), sigma, n)
    hiccups = rng.random(n) < 0.03
    x[hiccups] *= rng.uniform(20, 50, hiccups.sum())
    return x


def test_an_identical_model_timed_on_the_shadow_thread_is_never_dropped() -> None:
    """The figure from the field: stable 0.11 ms on the request path; the same model replayed on
    the shadow thread, twice as slow in the median with a much heavier tail (its p95 was 23x the
    stable's). 300 seeded runs, 50 to 2,000 samples each: no drop."""
    drops = []
    for seed in range(300):
        rng = np.random.default_rng(seed)
        n = int(rng.integers(50, 2000))
        stable = shadow_like(rng, n, 0.11, 0.25)
        cand = shadow_like(rng, n, 0.22, 0.9)
        v = local_verdict(totals(cand, stable), DEFAULT)
        if v is not None:
            drops.append((seed, v.message))
    assert drops == []


@pytest.mark.parametrize("n", [50, 200, 2000])
def test_a_model_ten_times_slower_is_always_dropped(n: int) -> None:
    for seed in range(50):
        rng = np.random.default_rng(seed)
        v = local_verdict(totals(shadow_like(rng, n, 1.1, 0.25), shadow_like(rng, n, 0.11, 0.25)), DEFAULT)
        assert v is not None and v.reason == "latency_ratio", seed
        assert v.numbers["latency_ratio_lower"] > 5.0 and v.numbers["confidence"] == 0.99


def test_errors_need_evidence_beyond_the_limit() -> None:
    cand = stable = np.full(1000, 0.1)
    assert local_verdict(totals(cand[:50], stable, errors=3), DEFAULT) is None, "6 % of 50 proves nothing"
    assert local_verdict(totals(cand, stable, errors=50), DEFAULT) is None, "5 % is the limit, not above it"
    v = local_verdict(totals(cand[:100], stable, errors=20), DEFAULT)
    assert v is not None and v.reason == "error_rate" and v.numbers["error_rate_lower"] > 0.05


def test_the_slo_is_breached_only_with_a_margin_and_enough_samples() -> None:
    rng = np.random.default_rng(7)
    stable = rng.lognormal(np.log(10), 0.2, 500)
    near = rng.lognormal(np.log(40), 0.15, 500)  # p95 ~ 51 ms: at the SLO, within the margin
    assert local_verdict(totals(near, stable), DEFAULT) is None
    far = rng.lognormal(np.log(60), 0.15, 500)  # p95 ~ 77 ms
    v = local_verdict(totals(far, stable), DEFAULT)
    assert v is not None and v.reason == "latency_slo" and v.numbers["candidate_p95_lower_ms"] > 60
    assert local_verdict(totals(far[:49], stable), DEFAULT) is None, "below min_samples"


def test_a_new_sessions_warm_up_is_not_judged() -> None:
    """The first answers of a new session are slow (allocation, lazy init): CanaryStats leaves
    them out of what the guard sees, so they cannot drop a good candidate."""
    st = CanaryStats(rollout="r", mode="split", version="2")
    for _ in range(WARMUP_SAMPLES):
        st.record_candidate(40.0, ok=True)
    for _ in range(60):
        st.record_candidate(0.2, ok=True)
        st.record_stable(0.1)
    t = st.totals()
    assert len(t.candidate_ms) == 60 and float(np.max(t.candidate_ms)) == 0.2
    assert local_verdict(t, CanaryLimits(latency_slo_ms=5.0)) is None


def test_quantile_and_rate_bounds_cover_the_truth_at_their_confidence() -> None:
    rng = np.random.default_rng(11)
    misses_q = misses_r = 0
    for _ in range(2000):
        x = rng.exponential(1.0, 200)
        lo, hi = quantile_bounds(x, 0.5)
        misses_q += not (lo <= np.log(2) <= hi)
        k = int(rng.binomial(200, 0.05))
        rlo, rhi = wilson_bounds(k, 200)
        misses_r += not (rlo <= 0.05 <= rhi)
    assert misses_q / 2000 < 0.02 and misses_r / 2000 < 0.02  # 99 % intervals: about 1 % misses


def test_a_cpu_starved_device_drops_nothing_on_latency_but_still_on_nan_and_errors() -> None:
    """While other work holds the device's CPUs its timings are no evidence: a 10x slower
    candidate is kept (the hub's gate leaves those windows out too); broken answers still drop."""
    rng = np.random.default_rng(0)
    slow = totals(shadow_like(rng, 500, 1.1, 0.25), shadow_like(rng, 500, 0.11, 0.25))
    assert local_verdict(slow, DEFAULT) is not None
    starved = Totals(**{**slow.__dict__, "starved": True})
    assert local_verdict(starved, DEFAULT) is None
    erroring = Totals(**{**starved.__dict__, "errors": 100})
    assert local_verdict(erroring, DEFAULT).reason == "error_rate"  # type: ignore[union-attr]
    nan = Totals(**{**starved.__dict__, "nonfinite": 1})
    assert local_verdict(nan, DEFAULT).reason == "nan_output"  # type: ignore[union-attr]


def test_the_window_says_whether_the_device_was_starved() -> None:
    stats = CanaryStats(rollout="r", mode="shadow", version="2")
    stats.note_cpu_wait(0.05)
    w = stats.window()
    assert (w["starved"], w["cpu_wait_share"]) == (False, 0.05)
    stats.note_cpu_wait(0.6)
    assert stats.window()["starved"] is True and stats.totals().starved is True
    stats.note_cpu_wait(None)  # the kernel does not say: not starved, no share reported
    assert stats.window()["starved"] is False
