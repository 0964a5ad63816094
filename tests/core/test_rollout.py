"""The rollout core without I/O: cohorts, policy parsing, gate outcomes, transitions."""

from __future__ import annotations

from pathlib import Path

import pytest

from edgefleet.hub.core.rollout import (
    Evidence,
    Policy,
    Rollout,
    RolloutError,
    abort,
    advance,
    apply,
    cohort,
    evaluate,
    load_policy,
    parse_steps,
    pause,
    resume,
)

PROFILES = ("pi4", "jetson", "x86")


def fleet(n: int) -> dict[str, str]:
    return {f"dev-{i:03d}": PROFILES[i % 3] for i in range(n)}


def test_cohort_is_reproducible_and_depends_on_the_rollout_id() -> None:
    devices = fleet(60)
    a = cohort(devices, "r-1", 25)
    assert a == cohort(dict(reversed(list(devices.items()))), "r-1", 25)
    assert a != cohort(devices, "r-2", 25)


def test_cohort_spans_every_profile_even_at_5_percent() -> None:
    devices = fleet(60)
    c = cohort(devices, "r-1", 5)
    assert {devices[d] for d in c} == set(PROFILES)
    assert len(c) == 3  # ceil(20 * 5 %) = 1 per profile
    assert len(cohort(devices, "r-1", 25)) == 15
    assert cohort(devices, "r-1", 100) == frozenset(devices)


def test_cohorts_are_nested() -> None:
    devices = fleet(47)
    previous: frozenset[str] = frozenset()
    for pct in (1, 5, 10, 25, 50, 75, 100):
        c = cohort(devices, "r-9", pct)
        assert previous <= c
        previous = c


def test_membership_is_sticky_when_devices_join() -> None:
    r = Rollout.start(id="r-1", model="m", from_version="1", to_version="2", targets=fleet(30), now=0.0,
                      steps=(10, 100))
    before = r.members
    for i in range(30, 60):
        r = r.add_target(f"dev-{i:03d}", PROFILES[i % 3])
    assert before <= r.members
    assert r.runs(sorted(before)[0]) == "candidate"


def test_policy_file_parses_with_defaults(tmp_path: Path) -> None:
    f = tmp_path / "p.toml"
    f.write_text('min_inferences = 50\nmin_agreement = 0.9\ndry_run = ["output_drift"]\n[limits]\nmin_samples = 10\n')
    p = load_policy(f)
    assert p.min_inferences == 50 and p.min_agreement == 0.9 and p.dry_run == ("output_drift",)
    assert p.max_error_rate == Policy().max_error_rate
    assert p.limits["min_samples"] == 10 and p.limits["max_latency_ratio"] == 5.0
    assert Policy.from_dict({"dry_run": True}).dry_run == ("failures", "error_rate", "latency_p95_ratio",
                                                           "agreement", "output_drift")


@pytest.mark.parametrize(("text", "says"), [
    ("min_agreement = 1.5", "min_agreement must be in [0, 1]"),
    ("min_agreement = 0.9\nmin_agreement_drifted = 0.95", "min_agreement_drifted must be in [0, min_agreement]"),
    ("min_agrement = 0.9", "unknown key 'min_agrement'"),
    ("min_inferences = 'many'", "min_inferences must be an integer"),
    ("dry_run = ['speed']", "unknown gate 'speed'"),
    ("dry_run = 3", "dry_run must be true, false or a list"),
    ("[limits]\nmax_memory = 3", "[limits] has unknown key 'max_memory'"),
    ("min_inferences = ", "not valid TOML"),
])
def test_policy_errors_say_what_was_expected(tmp_path: Path, text: str, says: str) -> None:
    f = tmp_path / "bad.toml"
    f.write_text(text + "\n")
    with pytest.raises(RolloutError) as exc:
        load_policy(f)
    assert says in str(exc.value) and str(f) in str(exc.value)


def test_steps_are_validated() -> None:
    assert parse_steps("5,25,100") == (5, 25, 100)
    for bad in ("25,5,100", "5,25", "0,100", "a,100", "5,5,100"):
        with pytest.raises(RolloutError):
            parse_steps(bad)


def window(**kw: object) -> dict[str, object]:
    base: dict[str, object] = {"rollout": "r-1", "mode": "shadow", "version": "2", "state": "running",
                               "reason": None, "requests": 100, "errors": 0, "skipped": 0, "compared": 100,
                               "agreed": 99, "output_distance_sum": 1.0, "latency_ms": {"p95": 1.0},
                               "stable_latency_ms": {"p95": 1.0}}
    return {**base, **kw}


def started(**policy: object) -> Rollout:
    pol = Policy.from_dict({"min_inferences": 200, "min_device_windows": 3, "step_deadline_seconds": 600,
                            **policy})
    return Rollout.start(id="r-1", model="m", from_version="1", to_version="2", targets=fleet(40), now=0.0,
                         policy=pol)


def ev(*wins: dict[str, object], events: tuple[tuple[str, str, str], ...] = ()) -> Evidence:
    return Evidence.collect([(f"dev-{i:03d}", w, None) for i, w in enumerate(wins)], events)


def test_good_evidence_promotes_step_by_step() -> None:
    r = started()
    d = evaluate(r, ev(window(), window(), window()), 60.0)
    assert d.outcome == "promote", d.reason
    r = apply(r, d, 60.0)
    assert (r.step, r.percent, r.step_started_at) == (1, 25, 60.0)
    r = apply(r, evaluate(r, ev(window(), window(), window()), 120.0), 120.0)
    r = apply(r, evaluate(r, ev(window(), window(), window()), 180.0), 180.0)
    assert r.state == "promoted" and r.runs("dev-000") == "promoted"


def test_low_agreement_rolls_back_with_the_numbers() -> None:
    d = evaluate(started(), ev(*[window(agreed=50)] * 3), 60.0)
    assert d.outcome == "rollback"
    assert "agreement 0.500 < min 0.95 (99 % bounds 0.426-0.574 over 300 compared pairs on 3 devices)" in d.reason
    g = {g.name: g for g in d.gates}["agreement"]
    assert (g.value, g.threshold, g.passed) == (0.5, 0.95, False)


def test_latency_and_error_rate_gates() -> None:
    d = evaluate(started(), ev(*[window(latency_ms={"p95": 9.0})] * 3), 60.0)
    assert d.outcome == "rollback" and "latency p95 ratio 9.00 > max 1.1" in d.reason
    d = evaluate(started(), ev(*[window(errors=5)] * 3), 60.0)
    assert d.outcome == "rollback" and "error rate 0.0500 > max 0.01" in d.reason


def test_output_drift_against_the_reference() -> None:
    ref = {"0": 0.5, "1": 0.5}
    skewed = window(outputs={"classes": {"0": 95, "1": 5}})
    d = evaluate(started(), ev(skewed, skewed, skewed), 60.0, ref)
    assert d.outcome == "rollback" and "output drift PSI" in d.reason
    fair = window(outputs={"classes": {"0": 50, "1": 50}})
    assert evaluate(started(), ev(fair, fair, fair), 60.0, ref).outcome == "promote"


def test_a_dropped_candidate_rolls_back_without_quorum() -> None:
    d = evaluate(started(), ev(window(requests=3, compared=3, agreed=3),
                               events=(("dev-007", "canary_dropped", "nan_output"),)), 10.0)
    assert d.outcome == "rollback" and "dev-007: canary_dropped (nan_output)" in d.reason
    d = evaluate(started(), ev(window(state="preflight_failed", reason="preflight_outputs", requests=0)), 10.0)
    assert d.outcome == "rollback" and "preflight_failed" in d.reason


def test_missing_evidence_waits_then_pauses_at_the_deadline_with_a_reason() -> None:
    r = started()
    d = evaluate(r, ev(window(requests=10, compared=10, agreed=10)), 100.0)
    assert d.outcome == "wait" and "10 of min 200 inferences" in d.reason
    d = evaluate(r, Evidence(), 600.0)
    assert d.outcome == "pause"
    assert "not enough evidence by the step deadline" in d.reason and "0 of min 200" in d.reason
    r = apply(r, d, 600.0)
    assert r.state == "paused" and r.runs(sorted(r.members)[0]) == "candidate"
    r = resume(r, 700.0)
    assert r.state == "running" and r.step_started_at == 700.0


def test_dry_run_gate_is_reported_not_enforced() -> None:
    d = evaluate(started(dry_run=["agreement"]), ev(*[window(agreed=50)] * 3), 60.0)
    assert d.outcome == "promote" and d.would == "rollback"
    assert "dry-run, not enforced: would roll back (agreement 0.500 < min 0.95" in d.reason
    assert {g.name: g.dry_run for g in d.gates}["agreement"] is True
    d = evaluate(started(dry_run=True), ev(*[window(errors=50)] * 3), 60.0)
    assert d.outcome == "promote" and d.would == "rollback"


def test_transitions_refuse_the_wrong_state() -> None:
    r = abort(started(), 1.0, "by hand")
    assert r.state == "aborted" and r.runs(sorted(r.members)[0]) == "stable"
    for t in (advance, pause, resume, abort):
        with pytest.raises(RolloutError, match="it is aborted"):
            t(r, 2.0)
    with pytest.raises(RolloutError, match="nothing to roll out"):
        Rollout.start(id="r-2", model="m", from_version="1", to_version="1", targets=fleet(3), now=0.0)
    assert pause(started(), 1.0).state == "paused"


def test_split_mode_judges_without_pairs_and_falls_back_to_the_stable_window_latency() -> None:
    r = Rollout.start(id="r-1", model="m", from_version="1", to_version="2", targets=fleet(12), now=0.0,
                      mode="split", policy=Policy.from_dict({"min_inferences": 100, "min_device_windows": 2}))
    split = window(mode="split", compared=0, agreed=0, latency_ms={"p95": 4.0})
    del split["stable_latency_ms"]
    ev = Evidence.collect([("dev-000", split, {"p95": 1.0}), ("dev-001", split, {"p95": 1.0})])
    d = evaluate(r, ev, 10.0)
    assert d.outcome == "rollback" and "latency p95 ratio 4.00 > max 1.1" in d.reason
    assert {g.name: g.value for g in d.gates}["agreement"] is None
    ok = Evidence.collect([("dev-000", split, {"p95": 3.8}), ("dev-001", split, {"p95": 3.8})])
    assert evaluate(r, ok, 10.0).outcome == "promote"


def test_a_drop_repeated_in_every_window_and_as_an_event_counts_once() -> None:
    dropped = window(state="dropped", reason="error_rate", requests=0, compared=0, agreed=0)
    ev = Evidence.collect([("dev-001", dropped, None)] * 3, [("dev-001", "canary_dropped", "error_rate"),
                                                           ("dev-002", "canary_ended", "rollback")])
    assert ev.failures == (("dev-001", "canary_dropped", "error_rate"),)
    d = evaluate(started(max_failures=1), ev, 10.0)
    assert d.outcome == "wait" and {g.name: g.passed for g in d.gates}["failures"] is True


# -- statistics of the gates (seeded synthetic windows) ---------------------------------------------


def _latency_windows(rng: object, k: int, ratio: float, spread: float) -> list[dict[str, object]]:
    import numpy as np

    assert isinstance(rng, np.random.Generator)
    out = []
    for _ in range(k):
        stable = float(rng.lognormal(np.log(1.0), 0.3))  # machine load moves both sides of a window
        noise = float(rng.lognormal(0.0, spread))
        out.append(window(latency_ms={"p95": stable * ratio * noise}, stable_latency_ms={"p95": stable}))
    return out


def test_a_slower_candidate_is_detected_and_an_equal_one_is_not_at_99_percent() -> None:
    """Per-window p95 ratios with 15 % spread (same-thread timing on a loaded machine), the default
    policy (limit 1.1x, 99 % bounds): a 1.2x regression rolls back once the bound clears the limit;
    a 1.0x candidate never rolls back; each within 60 windows."""
    import numpy as np

    assert Policy().max_latency_p95_ratio == 1.1
    pol: dict[str, object] = {}
    rolled_good = detected = promoted_bad = 0
    for seed in range(200):
        rng = np.random.default_rng(seed)
        good = evaluate(started(**pol), ev(*_latency_windows(rng, 60, 1.0, 0.15)), 60.0)
        rolled_good += good.outcome == "rollback"
        bad = evaluate(started(**pol), ev(*_latency_windows(rng, 60, 1.2, 0.15)), 60.0)
        detected += bad.outcome == "rollback"
        promoted_bad += bad.outcome == "promote"
    assert rolled_good == 0
    assert promoted_bad == 0, "a regression is never promoted: short of proof it waits"
    assert detected >= 190, f"{detected} of 200 1.2x regressions detected"  # 192 measured: 96 % power


def test_an_inconclusive_latency_ratio_waits_and_says_how_much_more_it_needs() -> None:
    import numpy as np

    rng = np.random.default_rng(3)
    wins = _latency_windows(rng, 4, 1.1, 0.3)
    d = evaluate(started(max_latency_p95_ratio=1.1), ev(*wins), 60.0)
    g = {g.name: g for g in d.gates}["latency_p95_ratio"]
    assert d.outcome == "wait" and not g.conclusive and g.passed
    assert "inconclusive" in d.reason and "more windows" in d.reason
    assert evaluate(started(max_latency_p95_ratio=1.1), ev(*wins), 600.0).outcome == "pause"


def test_the_output_gate_compares_with_the_stable_on_the_same_inputs_not_the_reference() -> None:
    """Drifted inputs shift both versions' outputs alike: the candidate is not blamed for them."""
    ref = {"0": 0.5, "1": 0.5}
    drifted = window(outputs={"classes": {"0": 90, "1": 10}}, stable_outputs={"0": 88, "1": 12})
    d = evaluate(started(), ev(drifted, drifted, drifted), 60.0, ref)
    assert d.outcome == "promote", d.reason
    assert "vs the reference" in {g.name: g for g in d.gates}["output_drift"].detail
    worse = window(outputs={"classes": {"0": 90, "1": 10}}, stable_outputs={"0": 50, "1": 50})
    d = evaluate(started(), ev(worse, worse, worse), 60.0, ref)
    assert d.outcome == "rollback" and "of the stable in the same windows" in d.reason


def test_a_waiting_step_says_what_it_needs_and_when_at_its_rate() -> None:
    """Time to decision: 100 of 200 inferences in the step's first 50 s -> 100 more, about 50 s."""
    d = evaluate(started(), ev(window(requests=50, compared=50, agreed=50), window(requests=50, compared=50,
                                                                                  agreed=50)), 50.0)
    assert d.outcome == "wait"
    assert d.needs == {"inferences": 100, "windows": 1} and d.eta_seconds == 50.0
    assert "expected in about 50 s at this step's rate" in d.reason
    assert evaluate(started(), Evidence(), 10.0).eta_seconds is None, "no rate before anything arrived"
    soak = evaluate(started(min_step_seconds=300), ev(window(), window(), window()), 60.0)
    assert soak.outcome == "wait" and soak.eta_seconds == 240.0



def _agreement_windows(rng: object, k: int, rate: float, pairs: int = 100) -> list[dict[str, object]]:
    import numpy as np

    assert isinstance(rng, np.random.Generator)
    return [window(compared=pairs, agreed=int(rng.binomial(pairs, rate))) for _ in range(k)]


def test_agreement_is_judged_on_its_99_percent_bounds() -> None:
    """Default min 0.95: a candidate agreeing 99 % of the time is never rolled back and promotes
    on 10 windows of 100 pairs; one agreeing 90 % is always rolled back; one at 95 % (on the limit)
    mostly waits, saying for how much longer: at 99 % two-sided, each wrong call is a 0.5 % risk
    (2 of 200 each, measured; at most 5 allowed)."""
    import numpy as np

    outcomes: dict[float, list[str]] = {0.99: [], 0.90: [], 0.95: []}
    for seed in range(200):
        rng = np.random.default_rng(seed)
        for rate, seen in outcomes.items():
            seen.append(evaluate(started(), ev(*_agreement_windows(rng, 10, rate)), 60.0).outcome)
    assert "rollback" not in outcomes[0.99] and outcomes[0.99].count("promote") >= 195
    assert set(outcomes[0.90]) == {"rollback"}
    assert outcomes[0.95].count("rollback") <= 5 and outcomes[0.95].count("promote") <= 5
    d = evaluate(started(), ev(*_agreement_windows(np.random.default_rng(0), 3, 0.96)), 60.0)
    g = {g.name: g for g in d.gates}["agreement"]
    assert d.outcome == "wait" and not g.conclusive and g.more_windows > 0, d.reason
    assert "inconclusive" in g.detail and "99 % bounds" in g.detail


def test_on_drifted_inputs_agreement_below_the_minimum_pauses_for_an_operator_above_the_floor() -> None:
    """Off the training distribution two sound models disagree more: a retrain agreeing 92 % with
    the stable on drifted inputs is proven below 0.95, yet that proves nothing about it, so the step
    pauses (the operator has labels), every seed; without drift the same evidence rolls back; a
    broken model (60 %) rolls back on drifted inputs too, below the 0.8 floor."""
    import numpy as np

    drift = {"f1": 0.61, "f2": 0.48}
    for seed in range(100):
        rng = np.random.default_rng(seed)
        wins = _agreement_windows(rng, 30, 0.92)
        held = evaluate(started(), ev(*wins), 60.0, input_drift=drift)
        assert held.outcome == "pause", held.reason
        assert evaluate(started(), ev(*wins), 60.0).outcome == "rollback"
        broken = evaluate(started(), ev(*_agreement_windows(rng, 10, 0.6)), 60.0, input_drift=drift)
        assert broken.outcome == "rollback" and "below the drifted-input floor 0.8" in broken.reason
    g = {g.name: g for g in held.gates}["agreement"]
    assert g.held and g.passed and "on drifted inputs (f1 PSI 0.61, f2 PSI 0.48" in g.detail
    assert held.evidence["input_drift"] == drift
    # a good candidate on drifted inputs still promotes
    assert evaluate(started(), ev(*_agreement_windows(np.random.default_rng(1), 10, 0.99)), 60.0,
                    input_drift=drift).outcome == "promote"


def test_the_output_gate_waits_on_too_few_outputs_and_decides_on_enough() -> None:
    few = window(outputs={"classes": {"0": 8, "1": 2}}, stable_outputs={"0": 5, "1": 5})
    d = evaluate(started(), ev(few, few, few), 60.0)
    g = {g.name: g for g in d.gates}["output_drift"]
    assert not g.conclusive and d.outcome == "wait", d.reason
    many = window(outputs={"classes": {"0": 800, "1": 200}}, stable_outputs={"0": 500, "1": 500})
    d = evaluate(started(), ev(many, many, many), 60.0)
    assert d.outcome == "rollback" and "99 % bounds" in d.reason
    same = window(outputs={"classes": {"0": 510, "1": 490}}, stable_outputs={"0": 500, "1": 500})
    assert evaluate(started(), ev(same, same, same), 60.0).outcome == "promote"


def test_windows_from_a_cpu_starved_device_are_no_evidence_about_latency() -> None:
    """A device whose CPU other work took says so in its windows; their timings (10x here) are left
    out of the latency gate, so nothing rolls back on them; the other gates still judge."""
    starved = window(latency_ms={"p95": 10.0}, starved=True)
    d = evaluate(started(), ev(starved, starved, starved), 60.0)
    g = {g.name: g for g in d.gates}["latency_p95_ratio"]
    assert d.outcome == "wait" and not g.conclusive, d.reason
    assert "CPU-starved" in d.reason and d.evidence["starved_windows"] == 3
    assert evaluate(started(), ev(starved, starved, starved), 600.0).outcome == "pause"
    mixed = ev(starved, window(), window(), window())
    d = evaluate(started(), mixed, 60.0)
    assert d.outcome == "promote" and "1 windows from CPU-starved devices left out" in d.reason
    broken = window(latency_ms={"p95": 10.0}, starved=True, agreed=20)
    assert evaluate(started(), ev(broken, broken, broken), 60.0).outcome == "rollback"


def test_paired_batch_ratios_decide_where_per_window_p95s_cannot() -> None:
    """The field figure: per-window p95 ratios of identical models spread ~0.8 in log terms (a p95
    over a few batches' shares), so 240 windows stayed inconclusive at 1.1x. The shadow's paired
    batches (both versions timed back to back on the same inputs) have a median per window that
    spreads ~0.05: 20 windows then decide, both ways."""
    import numpy as np

    def wins(rng: np.random.Generator, ratio: float, k: int = 20) -> list[dict[str, object]]:
        out = []
        for _ in range(k):
            stable = float(rng.lognormal(0.0, 0.3))
            p95 = stable * ratio * float(rng.lognormal(0.0, 0.8))
            out.append(window(latency_ms={"p95": p95}, stable_latency_ms={"p95": stable},
                              paired={"batches": 12, "median_log_ratio": float(np.log(ratio) + rng.normal(0, 0.05))}))
        return out

    for seed in range(50):
        rng = np.random.default_rng(seed)
        same = evaluate(started(), ev(*wins(rng, 1.0)), 60.0)
        assert same.outcome == "promote", same.reason
        assert "paired replays, 240 batches" in same.reason
        slower = evaluate(started(), ev(*wins(rng, 1.3)), 60.0)
        assert slower.outcome == "rollback", slower.reason
    p95_only = [{k: v for k, v in w.items() if k != "paired"} for w in wins(np.random.default_rng(1), 1.0, 240)]
    assert evaluate(started(), ev(*p95_only), 60.0).outcome == "wait"


def test_a_sub_millisecond_ratio_within_the_tolerance_is_not_a_regression() -> None:
    """The soak's false rollbacks: an identical graph in split mode, per-window p95 0.195 ms vs
    0.123 ms, proven 1.12-2.07x slower at 99 %. That is 0.06 ms: within latency_tolerance_ms (0.1)
    it passes, saying why; the same ratio on a 5 ms model still rolls back, tolerance 0 restores
    the bare ratio test, and paired replays are never tolerated."""
    import numpy as np

    def wins(scale: float) -> list[dict[str, object]]:
        rng = np.random.default_rng(5)
        out = []
        for _ in range(31):
            stable = scale * float(rng.lognormal(0.0, 0.2))
            out.append(window(latency_ms={"p95": stable * 1.55 * float(rng.lognormal(0.0, 0.2))},
                              stable_latency_ms={"p95": stable}))
        return out

    small = evaluate(started(), ev(*wins(0.123)), 60.0)
    g = {g.name: g for g in small.gates}["latency_p95_ratio"]
    assert g.passed and g.conclusive and "within latency_tolerance_ms = 0.1" in g.detail, g.detail
    assert small.outcome != "rollback"
    assert evaluate(started(), ev(*wins(5.0)), 60.0).outcome == "rollback"
    strict = evaluate(started(latency_tolerance_ms=0.0), ev(*wins(0.123)), 60.0)
    assert strict.outcome == "rollback" and "latency p95 ratio" in strict.reason
    # paired replays time both on the same batch: no tolerance (the matrix's slow graph, 3.7x at 26 µs)
    rng = np.random.default_rng(2)
    paired = [window(latency_ms={"p95": 0.026 * 3.7}, stable_latency_ms={"p95": 0.026},
                     paired={"batches": 12, "median_log_ratio": float(np.log(3.7) + rng.normal(0, 0.05))})
              for _ in range(12)]
    assert evaluate(started(), ev(*paired), 60.0).outcome == "rollback"
