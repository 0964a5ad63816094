"""Drift statistics and alarm decisions: pure functions over binned histograms.

No I/O, no clock: histograms, references and policies in, scores and decisions out. The adapter
that feeds it from the database and acts on its decisions is :mod:`hub.services.drift_monitor`.

Histograms are the agent's window form (``agent.contract.histograms.feature_histogram``): ``counts`` on the
reference bins plus ``below``, ``above`` and ``nan``. They are *mergeable*: summing counts over
devices and windows gives the histogram of the union, so the fleet view, a device's view and any
time range come from the same stored aggregates.

Scores, per feature, against the version's signed training reference:

- **PSI** (population stability index) ``sum((a - e) * ln(a / e))`` over the bins, with the
  out-of-range and NaN counts as extra bins whose reference share is 0. Empty shares are floored at
  ``EPS`` so the index stays finite. The state is decided on PSI (Evidently's convention):
  ``< warn`` ok, ``< alarm`` warn, else alarm; fewer than ``min_rows`` observed rows is
  ``insufficient`` and never alarms.
- **Jensen-Shannon distance** (base 2, in [0, 1]) over the same bins.
- **KS statistic** from the bins: the largest gap between the two cumulative distributions over
  the ordered bins (below, bins..., above); NaN is left out. Binned, so it is a lower bound of the
  KS statistic of the raw values.

Output drift is scored the same way on class counts against the reference class shares, as a
pseudo-feature named ``output``.

Category features (string columns) are scored on their bins (the named training categories,
"other", and as extra bins with reference share 0 the unseen categories, ``above``, and missing
values, ``nan``) with PSI and JS as above, plus **Pearson's chi-square** test that the observed
counts and the training counts come from one distribution (:func:`chi_square_samples`, a 2 x k
table: the training reference is a sample too; references without their count fall back to a
goodness-of-fit test against the shares, :func:`chi_square`). Their state needs both: PSI past
the threshold (the size of the move) and a p-value below :data:`CHI2_ALPHA` (that it is not noise),
so a small sample never alarms on a category that came up a few times by chance. The score names
the bin that moved most (:attr:`FeatureScore.detail`): a category, "other", or the unseen
categories with the most frequent of them by name.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from edgefleet.agent.contract.histograms import UNSEEN_CHARS
from edgefleet.agent.contract.wire import FeatureReference, Reference

__all__ = [
    "CHI2_ALPHA",
    "EPS",
    "STATES",
    "AlarmTracker",
    "DriftReport",
    "FeatureScore",
    "Policy",
    "chi_square",
    "chi_square_samples",
    "js_distance",
    "ks_statistic",
    "merge_classes",
    "merge_feature_lists",
    "merge_histograms",
    "merge_unseen",
    "psi",
    "psi_bounds",
    "score_categories",
    "score_report",
]

EPS = 1e-4
CHI2_ALPHA = 0.01  # a category feature warns or alarms only when chi-square's p-value is below this
UNSEEN_KEPT = 16  # unseen categories a merged histogram names, at most (the most frequent)
STATES = ("insufficient", "ok", "warn", "alarm")
ACTIONS = ("alert", "rollback", "hook")


@dataclass(frozen=True)
class Policy:
    """Per-model drift policy (``drift.toml``: top level for all models, ``[models.NAME]`` each)."""

    warn: float = 0.1
    alarm: float = 0.25
    min_rows: int = 200
    on_drift: str = "alert"
    hook: str | None = None
    watch_seconds: float = 86400.0

    def __post_init__(self) -> None:
        if not 0 < self.warn <= self.alarm:
            raise ValueError(f"drift thresholds need 0 < warn <= alarm, got warn={self.warn} alarm={self.alarm}")
        if self.on_drift not in ACTIONS:
            raise ValueError(f"on_drift must be one of {ACTIONS}, got {self.on_drift!r}")
        if self.on_drift == "hook" and not self.hook:
            raise ValueError("on_drift = 'hook' needs a hook command (hook = \"...\")")

    def state(self, score: float, rows: int) -> str:
        if rows < self.min_rows:
            return "insufficient"
        if score >= self.alarm:
            return "alarm"
        return "warn" if score >= self.warn else "ok"


# -- merging -------------------------------------------------------------------------------------


def merge_histograms(hists: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """Sum histograms on the same bins. Raises ValueError if their bin counts differ."""
    out: dict[str, Any] = {"counts": [], "below": 0, "above": 0, "nan": 0}
    for h in hists:
        counts = [int(c) for c in h.get("counts", [])]
        if not out["counts"]:
            out["counts"] = counts
        elif len(counts) != len(out["counts"]):
            raise ValueError(f"cannot merge histograms with {len(out['counts'])} and {len(counts)} bins")
        else:
            out["counts"] = [a + b for a, b in zip(out["counts"], counts, strict=True)]
        for k in ("below", "above", "nan"):
            out[k] += int(h.get(k, 0))
        if h.get("unseen"):
            out["unseen"] = merge_unseen([out.get("unseen") or {}, h["unseen"]])
    return out


def merge_unseen(named: Iterable[Mapping[str, Any]]) -> dict[str, int]:
    """Sum the named unseen categories of several histograms; keep the :data:`UNSEEN_KEPT` most
    frequent (the total of unseen values is ``above``, which stays exact)."""
    out: dict[str, int] = {}
    for d in named:
        for k, v in d.items():
            key = str(k)[:UNSEEN_CHARS]  # a device's text: never longer than devices cut it
            out[key] = out.get(key, 0) + int(v)
    return dict(sorted(out.items(), key=lambda kv: (-kv[1], kv[0]))[:UNSEEN_KEPT])


def merge_feature_lists(windows: Iterable[Sequence[Mapping[str, Any]]]) -> dict[str, dict[str, Any]]:
    """Merge the ``inputs`` lists of many windows into one histogram per feature name."""
    by_name: dict[str, list[Mapping[str, Any]]] = {}
    for inputs in windows:
        for h in inputs:
            by_name.setdefault(str(h.get("name")), []).append(h)
    return {name: {**merge_histograms(hs), "name": name} for name, hs in by_name.items()}


def merge_classes(outputs: Iterable[Mapping[str, Any] | None]) -> dict[str, int]:
    out: dict[str, int] = {}
    for o in outputs:
        for k, v in ((o or {}).get("classes") or {}).items():
            out[str(k)] = out.get(str(k), 0) + int(v)
    return out


# -- statistics ----------------------------------------------------------------------------------


def _shares(values: Sequence[float]) -> list[float]:
    total = float(sum(values))
    return [v / total for v in values] if total > 0 else [0.0 for _ in values]


def psi(expected: Sequence[float], actual: Sequence[float]) -> float:
    """Population stability index of two distributions on the same bins (shares or counts)."""
    e = [max(x, EPS) for x in _shares(expected)]
    a = [max(x, EPS) for x in _shares(actual)]
    return float(sum((ai - ei) * math.log(ai / ei) for ai, ei in zip(a, e, strict=True)))


def psi_bounds(expected: Sequence[float], actual: Sequence[float], *, confidence: float = 0.99,
               rounds: int = 400) -> tuple[float, float]:
    """Percentile-bootstrap bounds of :func:`psi` between two samples of counts on the same bins:
    each side is redrawn ``rounds`` times from its own observed shares (multinomial, its own
    size), so a small sample gets wide bounds and a large one narrow. Seeded from the counts, so
    the same evidence always gives the same bounds."""
    e = np.asarray(expected, dtype=np.float64)
    a = np.asarray(actual, dtype=np.float64)
    ne, na = int(e.sum()), int(a.sum())
    if ne <= 0 or na <= 0:
        return 0.0, math.inf
    seed = int.from_bytes(hashlib.sha256(repr((e.tolist(), a.tolist())).encode()).digest()[:8], "big")
    rng = np.random.default_rng(seed)
    es = np.maximum(rng.multinomial(ne, e / ne, size=rounds) / ne, EPS)
    as_ = np.maximum(rng.multinomial(na, a / na, size=rounds) / na, EPS)
    scores = ((as_ - es) * np.log(as_ / es)).sum(axis=1)
    tail = (1 - confidence) / 2 * 100
    lo, hi = np.percentile(scores, [tail, 100 - tail])
    return float(lo), float(hi)


def js_distance(p: Sequence[float], q: Sequence[float]) -> float:
    """Jensen-Shannon distance, base 2: 0 for equal distributions, 1 for disjoint ones."""
    ps, qs = _shares(p), _shares(q)
    m = [(x + y) / 2 for x, y in zip(ps, qs, strict=True)]

    def kl(x: list[float]) -> float:
        return sum(xi * math.log2(xi / mi) for xi, mi in zip(x, m, strict=True) if xi > 0)

    return float(math.sqrt(max(0.0, (kl(ps) + kl(qs)) / 2)))


def ks_statistic(p: Sequence[float], q: Sequence[float]) -> float:
    """Largest gap between the cumulative distributions over ordered bins."""
    ps, qs = _shares(p), _shares(q)
    cp = cq = gap = 0.0
    for x, y in zip(ps, qs, strict=True):
        cp += x
        cq += y
        gap = max(gap, abs(cp - cq))
    return float(gap)


def _gamma_q(a: float, x: float) -> float:
    """The regularized upper incomplete gamma function Q(a, x): a series below ``a + 1``, Lentz's
    continued fraction above (Numerical Recipes' ``gammq``), to about 1e-14."""
    if x <= 0:
        return 1.0
    log_front = -x + a * math.log(x) - math.lgamma(a)
    if x < a + 1:
        ap, term = a, 1.0 / a
        total = term
        for _ in range(10_000):
            ap += 1
            term *= x / ap
            total += term
            if abs(term) < abs(total) * 1e-15:
                break
        return max(0.0, 1.0 - total * math.exp(log_front))
    tiny = 1e-300
    b = x + 1 - a
    c, d = 1 / tiny, 1 / b
    h = d
    for i in range(1, 10_000):
        an = -i * (i - a)
        b += 2
        d = an * d + b
        d = tiny if abs(d) < tiny else d
        c = b + an / c
        c = tiny if abs(c) < tiny else c
        d = 1 / d
        step = d * c
        h *= step
        if abs(step - 1) < 1e-15:
            break
    return min(1.0, h * math.exp(log_front))


def chi_square_samples(a: Sequence[float], b: Sequence[float]) -> tuple[float, int, float]:
    """Pearson's chi-square test of homogeneity of two samples of counts on the same bins (a 2 x k
    contingency table): ``(statistic, degrees of freedom, p-value)``. Both samples are noisy, so
    a training reference of a few hundred rows is not mistaken for the truth, as a goodness-of-fit
    test against its shares would. Bins empty on both sides are left out."""
    na, nb = float(sum(a)), float(sum(b))
    if na <= 0 or nb <= 0:
        return 0.0, 1, 1.0
    stat, used = 0.0, 0
    for x, y in zip(a, b, strict=True):
        pooled = (x + y) / (na + nb)
        if pooled <= 0:
            continue
        used += 1
        ea, eb = na * pooled, nb * pooled
        stat += (x - ea) ** 2 / ea + (y - eb) ** 2 / eb
    df = max(1, used - 1)
    return float(stat), df, _gamma_q(df / 2, stat / 2)


def chi_square(expected: Sequence[float], observed: Sequence[float]) -> tuple[float, int, float]:
    """Pearson's chi-square goodness-of-fit of ``observed`` counts against ``expected`` shares (or
    counts) on the same bins: ``(statistic, degrees of freedom, p-value)``. A bin the reference
    never saw gets the share :data:`EPS`, so a new category that comes up often is a huge
    statistic rather than a division by zero. The degrees of freedom are the bins either side
    uses, less one (at least 1)."""
    obs = [float(o) for o in observed]
    n = sum(obs)
    if n <= 0:
        return 0.0, 1, 1.0
    shares = [max(e, EPS) for e in _shares(expected)]
    total = sum(shares)
    stat = sum((o - n * e / total) ** 2 / (n * e / total) for o, e in zip(obs, shares, strict=True))
    used = sum(1 for o, e in zip(obs, _shares(expected), strict=True) if o > 0 or e > 0)
    df = max(1, used - 1)
    return float(stat), df, _gamma_q(df / 2, stat / 2)


@dataclass(frozen=True)
class FeatureScore:
    feature: str
    rows: int
    psi: float
    js: float
    ks: float
    state: str
    out_of_range: int = 0
    p_value: float | None = None  # chi-square's, for category features
    detail: str = ""  # what moved most, for category features

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"feature": self.feature, "rows": self.rows, "psi": round(self.psi, 6),
                               "js": round(self.js, 6), "ks": round(self.ks, 6), "state": self.state,
                               "out_of_range": self.out_of_range}
        if self.p_value is not None:
            out["p_value"] = float(f"{self.p_value:.4g}")
        if self.detail:
            out["detail"] = self.detail
        return out


def score_histogram(name: str, ref_freqs: Sequence[float], hist: Mapping[str, Any], policy: Policy,
                    missing: float = 0.0) -> FeatureScore:
    """Score one merged feature histogram against its reference bin shares; ``missing``:
    training's share of missing values (the reference's ``extra["missing"]``), the NaN bin's share."""
    counts = [int(c) for c in hist.get("counts", [])]
    if len(counts) != len(ref_freqs):
        raise ValueError(f"feature {name}: {len(counts)} observed bins, reference has {len(ref_freqs)}")
    below, above, nan = int(hist.get("below", 0)), int(hist.get("above", 0)), int(hist.get("nan", 0))
    rows = sum(counts) + below + above + nan
    ordered_obs = [below, *counts, above]
    m = _share(missing)
    ordered_ref = [0.0, *(f * (1 - m) for f in ref_freqs), 0.0]
    p = psi([*ordered_ref, m], [*ordered_obs, nan])
    return FeatureScore(
        feature=name, rows=rows, psi=p, js=js_distance([*ordered_ref, m], [*ordered_obs, nan]),
        ks=ks_statistic(ordered_ref, ordered_obs), state=policy.state(p, rows),
        out_of_range=below + above + nan,
    )


def _share(value: object) -> float:
    """A reference's ``missing`` share as a number in [0, 0.999] (0 when absent or malformed)."""
    if isinstance(value, int | float) and not isinstance(value, bool) and value == value:  # noqa: PLR0124
        return min(max(float(value), 0.0), 0.999)
    return 0.0


def score_categories(feat: FeatureReference, hist: Mapping[str, Any], policy: Policy) -> FeatureScore:
    """Score a category feature's merged histogram (``feat``: its
    :class:`~agent.contract.wire.FeatureReference`): PSI and JS on the category bins plus unseen
    and missing, chi-square's p-value, and the bin that moved most in ``detail``."""
    names = [str(c) for c in feat.extra.get("categories") or []]
    counts = [int(c) for c in hist.get("counts", [])]
    if len(counts) != len(feat.freqs):
        raise ValueError(f"feature {feat.name}: {len(counts)} observed bins, reference has {len(feat.freqs)}")
    unseen, missing = int(hist.get("above", 0)) + int(hist.get("below", 0)), int(hist.get("nan", 0))
    m = _share(feat.extra.get("missing"))
    ref = [*(f * (1 - m) for f in feat.freqs), 0.0, m]  # the bins, unseen (never in training), missing
    obs = [*counts, unseen, missing]
    rows = sum(obs)
    if not rows:  # nothing observed: no score to plot, no state to decide
        return FeatureScore(feature=feat.name, rows=0, psi=0.0, js=0.0, ks=0.0, state="insufficient")
    p = psi(ref, obs)
    trained = feat.extra.get("count")  # training values the shares come from (missing ones apart)
    if isinstance(trained, int) and not isinstance(trained, bool) and trained > 0:
        _, _, p_value = chi_square_samples([f * trained / (1 - m) for f in ref], obs)
    else:
        _, _, p_value = chi_square(ref, obs)
    state = policy.state(p, rows)
    if state in ("warn", "alarm") and p_value >= CHI2_ALPHA:
        state = "ok"  # a move this sample cannot tell from chance
    e = [max(x, EPS) for x in _shares(ref)]
    a = [max(x, EPS) for x in _shares(obs)]
    moved = max(range(len(obs)), key=lambda i: (a[i] - e[i]) * math.log(a[i] / e[i]))
    share = obs[moved] / rows
    was = ref[moved] / (sum(ref) or 1.0)
    if moved < len(names):
        detail = f"{feat.name} = {names[moved]!r}: {was:.1%} in training, {share:.1%} now"
    elif moved == len(names):
        detail = f"{feat.name}: other training categories {was:.1%} in training, {share:.1%} now"
    elif moved == len(names) + 1:
        top = ", ".join(repr(k) for k in list(hist.get("unseen") or {})[:3])
        detail = (f"{feat.name}: categories never seen in training {share:.1%} now"
                  + (f" (most often {top})" if top else ""))
    else:
        detail = f"{feat.name}: missing values {was:.1%} in training, {share:.1%} now"
    return FeatureScore(feature=feat.name, rows=rows, psi=p, js=js_distance(ref, obs), ks=ks_statistic(ref, obs),
                        state=state, out_of_range=unseen + missing, p_value=p_value, detail=detail)


def score_classes(ref_classes: Mapping[str, float], observed: Mapping[str, int], policy: Policy) -> FeatureScore:
    labels = sorted(set(ref_classes) | set(observed))
    ref = [float(ref_classes.get(k, 0.0)) for k in labels]
    obs = [float(observed.get(k, 0)) for k in labels]
    rows = int(sum(obs))
    p = psi(ref, obs)
    return FeatureScore(feature="output", rows=rows, psi=p, js=js_distance(ref, obs),
                        ks=ks_statistic(ref, obs), state=policy.state(p, rows))


@dataclass(frozen=True)
class DriftReport:
    """Scores of one model version over one scope (``fleet`` or ``device:<id>``) and time range."""

    model: str
    version: str
    scope: str
    window_start: float
    window_end: float
    windows: int
    features: tuple[FeatureScore, ...] = ()
    problems: tuple[str, ...] = field(default=())

    @property
    def state(self) -> str:
        states = [f.state for f in self.features]
        for s in ("alarm", "warn", "ok"):
            if s in states:
                return s
        return "insufficient"

    def named(self, state: str) -> list[str]:
        return [f.feature for f in self.features if f.state == state]

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model, "version": self.version, "scope": self.scope,
                "window_start": self.window_start, "window_end": self.window_end,
                "windows": self.windows, "state": self.state,
                "features": [f.to_dict() for f in self.features], "problems": list(self.problems)}


def score_report(
    *, model: str, version: str, scope: str, reference: Reference | None,
    inputs: Mapping[str, Mapping[str, Any]], classes: Mapping[str, int], policy: Policy,
    window_start: float, window_end: float, windows: int,
) -> DriftReport:
    """Score merged input histograms and output class counts against ``reference``."""
    scores: list[FeatureScore] = []
    problems: list[str] = []
    if reference is not None:
        for feat in reference.all_features:
            hist = inputs.get(feat.name)
            if hist is None:
                continue
            try:
                if "categories" in feat.extra:
                    scores.append(score_categories(feat, hist, policy))
                else:
                    scores.append(score_histogram(feat.name, feat.freqs, hist, policy,
                                                  missing=_share(feat.extra.get("missing"))))
            except ValueError as exc:
                problems.append(str(exc))
        ref_classes = (reference.output or {}).get("classes")
        if ref_classes and classes:
            scores.append(score_classes({str(k): float(v) for k, v in ref_classes.items()}, classes, policy))
    else:
        problems.append("version has no reference distribution: publish it with --reference")
    return DriftReport(model=model, version=version, scope=scope, window_start=window_start,
                       window_end=window_end, windows=windows, features=tuple(scores),
                       problems=tuple(problems))


class AlarmTracker:
    """Edge detection on a report's state per (model, version, scope).

    ``update`` returns the previous state when the state changed between ok/warn/alarm (an
    ``insufficient`` report changes nothing), else ``None``. An alarm is therefore raised once, when
    the state enters ``alarm``, and raised again only after it has left it.
    """

    def __init__(self) -> None:
        self._state: dict[tuple[str, str, str], str] = {}

    def update(self, report: DriftReport) -> str | None:
        new = report.state
        if new == "insufficient":
            return None
        key = (report.model, report.version, report.scope)
        old = self._state.get(key, "ok")
        self._state[key] = new
        return old if old != new else None

    def state(self, model: str, version: str, scope: str = "fleet") -> str:
        return self._state.get((model, version, scope), "ok")

    def load(self, states: Mapping[tuple[str, str, str], str]) -> None:
        """Start from stored states (what a previous controller last alerted)."""
        self._state = dict(states)
