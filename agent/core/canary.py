"""Canary on the device: preflight, paired shadow comparison, split serving and the local guard.

Pure core (no threads, no wall clock; a clock is passed in where time is measured):

* :func:`compare_outputs` - agreement and distance between the stable's and the candidate's
  outputs on the same input rows.
* :class:`CanaryStats` - per-window counters (reset by :meth:`CanaryStats.window`) and bounded
  cumulative totals the local guard judges (:func:`local_verdict`).
* :func:`load_preflight` / :func:`run_preflight` - the signed preflight set (an untrusted ``.npz``)
  and the checks a candidate passes before it may shadow or serve.

Thin adapters around it (threads live only here):

* :class:`Sampler` - deterministic, lock-free choice of every ``1/fraction``-th request.
* :class:`Shadow` - a bounded queue and one daemon thread replaying sampled requests on the
  candidate. The request path only copies and appends: when the queue is full the sample is
  skipped and counted, so the stable path never waits. Queued items are replayed in batches.
* :class:`CanaryRun` - one attached candidate: the hook :class:`agent.app.serving.ModelServer` calls
  on every request of the model (split choice, shadow offer) and the guard that drops the
  candidate at once when it errors, returns NaN/inf or breaks its limits.

Machine reasons: preflight ``preflight_blob``, ``preflight_run``, ``preflight_nan``,
``preflight_outputs``, ``preflight_labels``, ``preflight_latency``, ``preflight_memory``; local
guard ``nan_output``, ``error_rate``, ``latency_ratio``, ``latency_slo``.
"""

from __future__ import annotations

import io
import itertools
import math
import zipfile
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from edgefleet.agent.contract.config import DeviceProfile
from edgefleet.agent.contract.errors import MalformedMessage, Refused
from edgefleet.agent.contract.stats import Z99, wilson_bounds
from edgefleet.agent.contract.wire import ModelEntry
from edgefleet.agent.core.telemetry import latency_summary

__all__ = [
    "MODES",
    "CanaryLimits",
    "CanarySpec",
    "CanaryStats",
    "PreflightFailed",
    "PreflightParams",
    "PreflightRejected",
    "PreflightResult",
    "Sampler",
    "Verdict",
    "compare_outputs",
    "has_nonfinite",
    "latency_summary",
    "load_preflight",
    "local_verdict",
    "quantile_bounds",
    "row_count",
    "run_preflight",
    "wilson_bounds",
]

MODES = ("shadow", "split")
# A regressor's pair "agrees" when the rows differ by at most this relative distance.
REGRESSION_AGREEMENT = 0.01
LATENCY_HISTORY = 2048  # cumulative latency samples kept per side for the guard
# The local guard drops a candidate only on clear evidence (docs/rollouts.md, "The device's guard"):
WARMUP_SAMPLES = 20  # a new session's first answers (allocation, caches, lazy init) are not timed
GUARD_Z = Z99  # the guard's confidence bounds are 99 % two-sided (99.5 % one-sided)
SLO_MARGIN = 0.2  # the candidate's p95 must be above the SLO by this fraction, at that confidence
# A device is CPU-starved when its threads waited for a CPU at least this share of the time they
# wanted one (other work on the machine): its timings then say nothing about the model.
STARVED_WAIT_SHARE = 0.4
MAX_PREFLIGHT_ROWS = 4096
MAX_PREFLIGHT_BYTES = 64 * 2**20  # uncompressed: a small compressed .npz must not expand without bound

Outputs = Mapping[str, Any]
Array = npt.NDArray[Any]
_ndarray = np.ndarray


# --- the canary policy from the desired state ---------------------------------------------------


@dataclass(frozen=True)
class CanaryLimits:
    """The local guard's limits (``canary.limits``); ``latency_slo_ms`` comes from the profile."""

    max_error_rate: float = 0.05
    max_latency_ratio: float = 5.0
    min_samples: int = 50
    latency_slo_ms: float | None = None

    @classmethod
    def from_mapping(cls, d: Mapping[str, Any] | None, *, latency_slo_ms: float | None = None) -> CanaryLimits:
        d = d or {}
        out: dict[str, Any] = {}
        for key, kind in (("max_error_rate", float), ("max_latency_ratio", float), ("min_samples", int)):
            if d.get(key) is None:
                continue
            value = d[key]
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
                raise MalformedMessage(f"canary.limits.{key} must be a non-negative number, got {value!r}")
            out[key] = kind(value)
        return cls(**out, latency_slo_ms=latency_slo_ms)


@dataclass(frozen=True)
class CanarySpec:
    """``ModelEntry.canary`` parsed: rollout id, mode, fraction, the stable entry and limits."""

    rollout: str
    mode: str
    fraction: float
    stable: ModelEntry
    limits: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def from_mapping(cls, d: Mapping[str, Any], ctx: str = "canary") -> CanarySpec:
        rollout, mode, fraction = d.get("rollout"), d.get("mode"), d.get("fraction", 0.1)
        if not isinstance(rollout, str) or not rollout:
            raise MalformedMessage(f"{ctx}.rollout must be a non-empty string, got {rollout!r}")
        if mode not in MODES:
            raise MalformedMessage(f"{ctx}.mode must be one of {MODES}, got {mode!r}")
        if isinstance(fraction, bool) or not isinstance(fraction, int | float) or not 0 < fraction <= 1:
            raise MalformedMessage(f"{ctx}.fraction must be a number in (0, 1], got {fraction!r}")
        stable = d.get("stable")
        if not isinstance(stable, dict):
            raise MalformedMessage(f"{ctx}.stable must be the stable version's model entry (an object)")
        limits = d.get("limits") or {}
        if not isinstance(limits, dict):
            raise MalformedMessage(f"{ctx}.limits must be an object, got {limits!r}")
        CanaryLimits.from_mapping(limits)  # refuse bad limits now, not when the guard first judges
        return cls(
            rollout=rollout,
            mode=str(mode),
            fraction=float(fraction),
            stable=ModelEntry.from_dict(stable, f"{ctx}.stable"),
            limits=limits,
        )


# --- comparing outputs --------------------------------------------------------------------------


def _as_array(value: Any) -> Array:
    """ONNX outputs as arrays; skl2onnx's ZipMap (a list of {class: prob}) becomes N x K."""
    if isinstance(value, list) and value and isinstance(value[0], Mapping):
        keys = sorted(value[0])
        return np.asarray([[row[k] for k in keys] for row in value], dtype=np.float64)
    return np.asarray(value)


def row_count(a: Array) -> int:
    return int(a.shape[0]) if a.ndim else 1


def _pick(outputs: Outputs) -> tuple[Array | None, Array | None]:
    """The label output (integers or strings, one per row) and the score output (floats)."""
    label = score = None
    for value in outputs.values():
        a = _as_array(value)
        if label is None and a.dtype.kind in "iuUSOb" and (a.ndim == 1 or (a.ndim == 2 and a.shape[1] == 1)):
            label = a.reshape(-1)
        elif score is None and a.dtype.kind == "f":
            score = a.reshape(row_count(a), -1) if a.ndim else a.reshape(1, 1)
    return label, score


def _is_distribution(a: Array) -> bool:
    """Rows of probabilities: within [0, 1] and summing to 1 (``np.allclose``'s test, atol 1e-3,
    written out: allclose alone cost the shadow thread 15 µs per call). NaN makes it False."""
    if a.ndim != 2 or a.shape[1] < 2 or a.size == 0:
        return False
    if not (a.min() >= -1e-6 and a.max() <= 1 + 1e-6):
        return False
    return bool(np.abs(a.sum(axis=1) - 1.0).max() <= 1e-3 + 1e-5)


def _equal(a: Array, b: Array) -> Array:
    """Row-wise label equality across dtypes (int32 vs int64, bool vs int, str vs str)."""
    if a.dtype == b.dtype:
        return np.asarray(a == b)
    if a.dtype.kind in "iub" and b.dtype.kind in "iub":
        return np.asarray(a.astype(np.int64) == b.astype(np.int64))
    return np.asarray(a.astype(str) == b.astype(str))


def has_nonfinite(outputs: Outputs) -> bool:
    """True if any floating output holds NaN or infinity."""
    for value in outputs.values():
        a = _as_array(value)
        if a.dtype.kind in "fc" and not np.all(np.isfinite(a)):
            return True
    return False


def compare_outputs(stable: Outputs, cand: Outputs) -> tuple[int, int, float]:
    """Compare two answers on the same ``n`` input rows; return ``(agreed, n, distance_sum)``.

    Agreement per row: equal labels when both have a label output, else equal argmax of a score
    matrix with several columns, else (regressors) a relative distance of at most
    :data:`REGRESSION_AGREEMENT`. Distance per row: total variation between probability rows,
    ``|a-b| / (|a|+|b|)`` (L1) between other score rows, or 1 per disagreeing label when only
    labels exist. Outputs of different shape count as n disagreeing rows at distance 1.
    """
    agreed, n, dist, _ = _compare(stable, cand)
    return agreed, n, dist


def _compare(stable: Outputs, cand: Outputs) -> tuple[int, int, float, Array | None]:
    """:func:`compare_outputs`, and the candidate's label output (kept for the window's class
    counts) so that the shadow thread picks the outputs apart once."""
    s_label, s_score = _pick(stable)
    c_label, c_score = _pick(cand)
    n = len(s_label) if s_label is not None else (row_count(s_score) if s_score is not None else 0)
    if n == 0:
        return 0, 0, 0.0, c_label
    agree: Array | None = None
    if s_label is not None and c_label is not None:
        if s_label.shape != c_label.shape:
            return 0, n, float(n), c_label
        agree = _equal(s_label, c_label)
    dist: Array | None = None
    if s_score is not None and c_score is not None:
        if s_score.shape != c_score.shape:
            return 0, n, float(n), c_label
        a, b = s_score.astype(np.float64), c_score.astype(np.float64)
        if _is_distribution(a) and _is_distribution(b):
            dist = 0.5 * np.abs(a - b).sum(axis=1)
        else:
            denom = np.abs(a).sum(axis=1) + np.abs(b).sum(axis=1)
            diff = np.abs(a - b).sum(axis=1)
            dist = np.divide(diff, denom, out=np.zeros_like(diff), where=denom > 0)
        if agree is None:
            agree = a.argmax(axis=1) == b.argmax(axis=1) if a.shape[1] > 1 else dist <= REGRESSION_AGREEMENT
    if agree is None:
        return 0, n, float(n), c_label  # nothing comparable: the candidate answers in another shape
    if dist is None:
        dist = (~agree).astype(np.float64)
    total = float(dist.sum())
    if math.isnan(total):  # NaN rows (a NaN stable answer) count as no distance
        total = float(np.nansum(dist))
    return int(np.count_nonzero(agree)), n, total, c_label


# --- statistics -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Totals:
    """Cumulative evidence since the candidate was attached (what the local guard judges)."""

    requests: int
    errors: int
    nonfinite: int
    compared: int
    agreed: int
    candidate_ms: Sequence[float] | Array  # the last LATENCY_HISTORY samples, in any order
    stable_ms: Sequence[float] | Array
    starved: bool = False  # the device is CPU-starved now: its timings are not evidence



class _Ring:
    """The last ``size`` latency samples in a preallocated float64 array. The guard takes
    percentiles of them, which do not depend on order, so :meth:`values` returns them unordered:
    one C copy instead of converting ``size`` Python floats (a deque cost the shadow thread
    about 100 µs of GIL per guard check)."""

    __slots__ = ("_buf", "_n")

    def __init__(self, size: int) -> None:
        self._buf = np.zeros(size, dtype=np.float64)
        self._n = 0  # samples ever added; the next goes to _n % size

    def append(self, value: float) -> None:
        n = self._n
        self._buf[n % len(self._buf)] = value
        self._n = n + 1

    def extend(self, values: Array) -> None:
        size, k = len(self._buf), len(values)
        if k > size:  # only the last ``size`` stay: as if the others had been written and overwritten
            self._n += k - size
            values, k = values[k - size:], size
        i = self._n % size
        head = min(k, size - i)
        self._buf[i:i + head] = values[:head]
        self._buf[:k - head] = values[head:]
        self._n += k

    def values(self, skip_first: int = 0) -> Array:
        """The samples kept; ``skip_first`` leaves out the very first ones ever added while they
        are still here (a new session's warm-up), once the ring wrapped they are gone anyway."""
        if self._n <= len(self._buf):
            return self._buf[min(skip_first, self._n):self._n].copy()
        return self._buf.copy()


class CanaryStats:
    """Counters for one candidate. ``window()`` returns the contract's ``canary`` dict and resets
    the per-window counts; cumulative totals (for the guard) are kept. A lock makes it safe to
    record from the request path and the shadow thread while the main loop closes a window: the
    caller passes it (``threading.Lock()``; none where one thread does everything), so this core
    module starts no threads and imports no threading."""

    def __init__(self, *, rollout: str, mode: str, version: str,
                 lock: AbstractContextManager[Any] | None = None) -> None:
        self.rollout, self.mode, self.version = rollout, mode, version
        self.state: str = "running"
        self.reason: str | None = None
        self._lock: AbstractContextManager[Any] = lock if lock is not None else nullcontext()
        self._reset()
        self._t_requests = self._t_errors = self._t_nonfinite = self._t_compared = self._t_agreed = 0
        self._t_cand = _Ring(LATENCY_HISTORY)
        self._t_stable = _Ring(LATENCY_HISTORY)
        self._cpu_wait: float | None = None
        self.starved = False

    def note_cpu_wait(self, share: float | None) -> None:
        """The device's CPU wait share over the window now closing (``SystemProbe.cpu_wait_share``):
        at ``STARVED_WAIT_SHARE`` or more the window is marked starved, for the hub's latency gate
        and this device's guard alike."""
        with self._lock:
            self._cpu_wait = share
            self.starved = share is not None and share >= STARVED_WAIT_SHARE

    def _reset(self) -> None:
        self._requests = self._errors = self._skipped = self._compared = self._agreed = 0
        self._distance = 0.0
        self._cand_ms: list[float] = []  # one at a time (split mode)
        self._stable_ms: list[float] = []
        self._cand_chunks: list[Array] = []  # a batch's worth at a time (shadow replays)
        self._stable_chunks: list[Array] = []
        self._labels: list[Array] = []  # counted when the window closes, off the replay path
        self._pair_logs: list[float] = []  # log(candidate / stable) per paired batch

    def _keep_labels(self, outputs: Outputs) -> None:
        label, _ = _pick(outputs)
        if label is not None and len(self._labels) < 4096:
            self._labels.append(label)

    def record_pair(
        self,
        stable_out: Outputs,
        cand_out: Outputs,
        stable_ms: float | Sequence[float] | Array,
        cand_ms: float | Sequence[float] | Array,
        paired: bool = False,
    ) -> None:
        """A shadow replay: both answers on the same input, and both latencies (ms). A batched
        replay of k requests passes their outputs concatenated and k latencies on each side.
        ``paired``: both versions were timed the same way on this very batch, back to back (the
        shadow's like-for-like timing); its ratio is then one paired sample for the hub's gate."""
        s_ms = np.atleast_1d(np.asarray(stable_ms, dtype=np.float64))
        c_ms = np.atleast_1d(np.asarray(cand_ms, dtype=np.float64))
        k = len(c_ms)
        s_total, c_total = float(s_ms.sum()), float(c_ms.sum())
        log_ratio = math.log(c_total / s_total) if paired and s_total > 0 and c_total > 0 else None
        bad = has_nonfinite(cand_out)
        agreed, n, dist, label = (0, 0, 0.0, None) if bad else _compare(stable_out, cand_out)
        with self._lock:
            self._requests += k
            self._t_requests += k
            self._cand_chunks.append(c_ms)
            self._stable_chunks.append(s_ms)
            if log_ratio is not None and len(self._pair_logs) < 4096:
                self._pair_logs.append(log_ratio)
            self._t_cand.extend(c_ms)
            self._t_stable.extend(s_ms)
            if bad:
                self._errors += k
                self._t_errors += k
                self._t_nonfinite += k
                return
            self._compared += n
            self._agreed += agreed
            self._distance += dist
            self._t_compared += n
            self._t_agreed += agreed
            if label is not None and len(self._labels) < 4096:
                self._labels.append(label)

    def record_candidate(self, ms: float, ok: bool, outputs: Outputs | None = None) -> None:
        """The candidate answered alone (split) or failed (either mode)."""
        bad = ok and outputs is not None and has_nonfinite(outputs)
        with self._lock:
            self._requests += 1
            self._t_requests += 1
            if ok:
                self._cand_ms.append(ms)
                self._t_cand.append(ms)
            if not ok or bad:
                self._errors += 1
                self._t_errors += 1
            if bad:
                self._t_nonfinite += 1
            elif ok and outputs is not None:
                self._keep_labels(outputs)

    def record_stable(self, ms: float) -> None:
        """Split mode: the stable's latency on the requests it served (the guard's baseline)."""
        with self._lock:
            self._stable_ms.append(ms)
            self._t_stable.append(ms)

    def record_skipped(self, n: int = 1) -> None:
        with self._lock:
            self._skipped += n

    def counts(self) -> tuple[int, int]:
        """(requests, NaN/inf answers) since attach: the guard's cheap first look."""
        return self._t_requests, self._t_nonfinite

    def totals(self) -> Totals:
        with self._lock:
            return Totals(
                requests=self._t_requests,
                errors=self._t_errors,
                nonfinite=self._t_nonfinite,
                compared=self._t_compared,
                agreed=self._t_agreed,
                candidate_ms=self._t_cand.values(skip_first=WARMUP_SAMPLES),
                stable_ms=self._t_stable.values(),
                starved=self.starved,
            )

    def window(self) -> dict[str, Any]:
        """The ``canary`` field of the stable's ModelWindow for the window now closing."""
        with self._lock:
            cand = np.concatenate([np.asarray(self._cand_ms, dtype=np.float64), *self._cand_chunks])
            stable = np.concatenate([np.asarray(self._stable_ms, dtype=np.float64), *self._stable_chunks])
            out: dict[str, Any] = {
                "rollout": self.rollout,
                "mode": self.mode,
                "version": self.version,
                "state": self.state,
                "reason": self.reason,
                "requests": self._requests,
                "errors": self._errors,
                "skipped": self._skipped,
                "compared": self._compared,
                "agreed": self._agreed,
                "output_distance_sum": round(self._distance, 6),
                "starved": self.starved,
            }
            if self._cpu_wait is not None:
                out["cpu_wait_share"] = self._cpu_wait
            labels, logs = self._labels, self._pair_logs
            self._reset()
        if logs:
            # The median of the window's paired batch ratios: one batch the scheduler preempted
            # moves it little, unlike a p95 over a few dozen shares of batches.
            out["paired"] = {"batches": len(logs), "median_log_ratio": round(float(np.median(logs)), 6)}
        classes: dict[str, int] = {}
        if labels:
            values, counts = np.unique(np.concatenate([lab.astype(str) for lab in labels]), return_counts=True)
            classes = {str(v): int(c) for v, c in zip(values, counts, strict=True)}
        out["latency_ms"] = latency_summary(cand)
        out["stable_latency_ms"] = latency_summary(stable)
        if classes:
            out["outputs"] = {"classes": classes}
        return out


# --- the local guard ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Verdict:
    """Why the candidate is dropped, with the numbers the decision saw."""

    reason: str
    message: str
    numbers: Mapping[str, Any] = field(default_factory=dict)


def _p95(values: Sequence[float] | Array) -> float:
    """``np.percentile(values, 95)`` (linear interpolation), bit for bit: its index arithmetic
    and interpolation written out around one ``np.partition``, because the general function
    cost the shadow thread 35 µs of GIL per call on the guard's 2048 samples."""
    a = np.asarray(values, dtype=np.float64)
    n = len(a)
    if n < 2 or np.isnan(a).any():
        return float(np.percentile(a, 95))
    q = 95 / 100
    index = (n - 1) * q  # numpy's virtual index for method='linear'
    lo = math.floor(index)
    if lo >= n - 1:
        return float(a.max())
    part = np.partition(a, (lo, lo + 1))
    below, above, gamma = float(part[lo]), float(part[lo + 1]), index - lo
    diff = above - below  # numpy's _lerp
    return above - diff * (1 - gamma) if gamma >= 0.5 else below + diff * gamma


def quantile_bounds(values: Sequence[float] | Array, q: float, z: float = GUARD_Z) -> tuple[float, float]:
    """Distribution-free confidence bounds of the ``q``-quantile: order statistics whose ranks are
    the binomial's normal approximation ``nq -+ z sqrt(nq(1-q))``. Any latency distribution, no
    assumption of normality; with few samples the bounds are wide, as they should be."""
    a = np.sort(np.asarray(values, dtype=np.float64))
    n = len(a)
    if n == 0:
        return math.nan, math.nan
    half = z * math.sqrt(n * q * (1 - q))
    lo = min(n - 1, max(0, math.floor(n * q - half) - 1))
    hi = min(n - 1, max(0, math.ceil(n * q + half)))
    return float(a[lo]), float(a[hi])


def local_verdict(t: Totals, limits: CanaryLimits) -> Verdict | None:
    """Drop the candidate? Only on clear evidence that it is broken; returns ``None`` while it may
    keep running. The hub's gate, not this guard, judges "worse than the stable".

    * NaN/inf outputs drop it at once.
    * Errors: once ``min_samples`` requests were seen, when the Wilson lower bound of the error
      rate is above ``max_error_rate`` (3 errors in 50 requests is not proof of 5 %).
    * The profile's latency SLO: when the lower bound of the candidate's p95 is above the SLO by
      ``SLO_MARGIN``.
    * Latency against the stable: when the lower bound of the candidate's median is above
      ``max_latency_ratio`` times the upper bound of the stable's median: a gross slowdown, not a
      noisy tail (a shadow replay runs on another thread than the request, so tails differ even
      for identical models).

    Latency is judged on at least ``min_samples`` candidate samples after the first
    ``WARMUP_SAMPLES`` of its session, and not at all while the device is CPU-starved (other work
    holds its CPUs: slow answers then say nothing about the model); every bound is at 99 %
    (``GUARD_Z``)."""
    numbers: dict[str, Any] = {"requests": t.requests, "errors": t.errors, "min_samples": limits.min_samples,
                               "confidence": 0.99}
    if t.nonfinite:
        return Verdict("nan_output", f"the candidate returned NaN/inf on {t.nonfinite} request(s)",
                       {**numbers, "nonfinite": t.nonfinite})
    if t.requests < max(1, limits.min_samples):
        return None
    rate = t.errors / t.requests
    rate_lo, _ = wilson_bounds(t.errors, t.requests)
    if rate_lo > limits.max_error_rate:
        return Verdict("error_rate", f"candidate error rate {rate:.3f} ({t.errors} of {t.requests}; at 99 % "
                       f"confidence at least {rate_lo:.3f}) above {limits.max_error_rate:g}",
                       {**numbers, "error_rate": round(rate, 4), "error_rate_lower": round(rate_lo, 4),
                        "max_error_rate": limits.max_error_rate})
    n = len(t.candidate_ms)
    if n < max(1, limits.min_samples) or t.starved:
        return None
    numbers["latency_samples"] = n
    if limits.latency_slo_ms is not None:
        p95_lo, _ = quantile_bounds(t.candidate_ms, 0.95)
        if p95_lo > limits.latency_slo_ms * (1 + SLO_MARGIN):
            cand = _p95(t.candidate_ms)
            return Verdict("latency_slo", f"candidate p95 {cand:.3f} ms (at 99 % confidence at least "
                           f"{p95_lo:.3f} ms) above the profile's SLO {limits.latency_slo_ms:g} ms "
                           f"by more than {SLO_MARGIN:.0%}",
                           {**numbers, "candidate_p95_ms": round(cand, 4), "candidate_p95_lower_ms": round(p95_lo, 4),
                            "latency_slo_ms": limits.latency_slo_ms})
    if len(t.stable_ms) >= max(1, limits.min_samples):
        cand_lo, _ = quantile_bounds(t.candidate_ms, 0.5)
        _, stable_hi = quantile_bounds(t.stable_ms, 0.5)
        ratio_lo = cand_lo / stable_hi if stable_hi > 0 else math.inf
        if ratio_lo > limits.max_latency_ratio:
            cand, stable = float(np.median(t.candidate_ms)), float(np.median(t.stable_ms))
            return Verdict("latency_ratio", f"candidate median {cand:.3f} ms is {cand / stable:.1f}x the stable's "
                           f"{stable:.3f} ms; at 99 % confidence at least {ratio_lo:.1f}x "
                           f"(limit {limits.max_latency_ratio:g}x)",
                           {**numbers, "candidate_median_ms": round(cand, 4), "stable_median_ms": round(stable, 4),
                            "latency_ratio": round(cand / stable, 3) if stable > 0 else None,
                            "latency_ratio_lower": round(ratio_lo, 3), "max_latency_ratio": limits.max_latency_ratio})
    return None


# --- preflight ----------------------------------------------------------------------------------


class PreflightRejected(Refused):
    """The preflight blob is not a usable preflight set."""

    reason = "preflight_blob"


class PreflightFailed(Refused):
    """An ordinary entry's model failed its preflight set (``reason`` is the preflight reason)."""

    reason = "preflight_failed"


@dataclass(frozen=True)
class PreflightParams:
    rows: int | None = None
    atol: float = 1e-4
    rtol: float = 1e-3
    label_agreement: float = 1.0

    @classmethod
    def from_mapping(cls, d: Mapping[str, Any]) -> PreflightParams:
        def num(key: str, default: float) -> float:
            v = d.get(key, default)
            if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v) or v < 0:
                raise MalformedMessage(f"preflight.{key} must be a non-negative number, got {v!r}")
            return float(v)

        rows = d.get("rows")
        if rows is not None and (isinstance(rows, bool) or not isinstance(rows, int) or rows < 1):
            raise MalformedMessage(f"preflight.rows must be a positive integer, got {rows!r}")
        return cls(rows=rows, atol=num("atol", 1e-4), rtol=num("rtol", 1e-3),
                   label_agreement=num("label_agreement", 1.0))


@dataclass(frozen=True)
class PreflightResult:
    ok: bool
    reason: str = ""
    message: str = ""
    details: Mapping[str, Any] = field(default_factory=dict)


class Session(Protocol):
    """What preflight needs of an ``onnxruntime.InferenceSession``."""

    def get_inputs(self) -> Any: ...
    def get_outputs(self) -> Any: ...
    def run(self, output_names: Any, input_feed: Any) -> Any: ...


def load_preflight(data: bytes) -> dict[str, Array]:
    """Read a preflight ``.npz`` (untrusted even though its hash is signed: no pickles).

    Returns ``input`` (2-D numeric) and every ``output:<name>`` array; raises
    :class:`PreflightRejected` otherwise."""
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as zf:
            expanded = sum(info.file_size for info in zf.infolist())
    except (zipfile.BadZipFile, ValueError, OSError) as exc:
        raise PreflightRejected(f"the preflight blob is not an .npz (zip) archive: {exc}") from exc
    if expanded > MAX_PREFLIGHT_BYTES:
        raise PreflightRejected(f"the preflight set expands to {expanded} bytes, more than the "
                                f"{MAX_PREFLIGHT_BYTES} allowed")
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as z:
            arrays = {k: np.asarray(z[k]) for k in z.files}
    except (OSError, ValueError, zipfile.BadZipFile, KeyError, EOFError) as exc:
        raise PreflightRejected(f"the preflight blob is not a readable .npz without pickles: {exc}") from exc
    x = arrays.get("input")
    if x is None:
        raise PreflightRejected(f"the preflight set has no 'input' array (has {sorted(arrays)})")
    if x.ndim != 2 or x.dtype.kind not in "fiu" or x.shape[0] < 1:
        raise PreflightRejected(f"preflight 'input' must be a non-empty numeric N x F array, got {x.dtype} {x.shape}")
    for k, v in arrays.items():
        if k != "input" and not k.startswith("output:"):
            raise PreflightRejected(f"unexpected array {k!r} in the preflight set (expected input, output:<name>)")
        if k != "input" and (v.shape[:1] != x.shape[:1] or v.dtype.kind not in "fiubU"):
            raise PreflightRejected(f"preflight {k!r} must have one numeric row per input row, got {v.dtype} {v.shape}")
    return arrays


def run_preflight(
    session: Session,
    arrays: Mapping[str, Array],
    params: PreflightParams,
    profile: DeviceProfile,
    *,
    clock: Callable[[], float],
    memory_mb: float | None = None,
) -> PreflightResult:
    """Run the candidate on the preflight set one row at a time and check, in order: it runs
    (``preflight_run``), no NaN/inf (``preflight_nan``), expected outputs within tolerance
    (``preflight_outputs``) and label agreement (``preflight_labels``), p95 latency per call within
    the profile's SLO (``preflight_latency``), and ``memory_mb`` (the session's measured footprint,
    if the caller measured it) within the profile's budget (``preflight_memory``)."""
    x = np.asarray(arrays["input"])
    n = min(len(x), params.rows or len(x), MAX_PREFLIGHT_ROWS)
    x = x[:n].astype(np.float32)
    inputs = session.get_inputs()
    out_names = [o.name for o in session.get_outputs()]
    collected: list[list[Array]] = [[] for _ in out_names]
    lat_ms: list[float] = []
    try:
        for i in range(n):
            t0 = clock()
            values = session.run(None, {inputs[0].name: x[i : i + 1]})
            lat_ms.append((clock() - t0) * 1000.0)
            for j, v in enumerate(values):
                collected[j].append(_as_array(v))
    except Exception as exc:  # onnxruntime raises its own types for shape/type errors
        return PreflightResult(False, "preflight_run", f"the candidate failed on preflight row {len(lat_ms)}: {exc}",
                               {"row": len(lat_ms)})
    actual = {name: np.concatenate(parts) for name, parts in zip(out_names, collected, strict=True)}
    if has_nonfinite(actual):
        return PreflightResult(False, "preflight_nan", "the candidate returned NaN/inf on the preflight set",
                               {"rows": n})
    details: dict[str, Any] = {"rows": n}
    for key, expected in arrays.items():
        if not key.startswith("output:"):
            continue
        name, want = key[len("output:") :], np.asarray(expected)[:n]
        if name not in actual:
            return PreflightResult(False, "preflight_outputs",
                                   f"the preflight set checks output {name!r}, the candidate has {out_names}",
                                   {"output": name})
        got = actual[name]
        if want.dtype.kind in "iubU":
            got, want = got.reshape(-1), want.reshape(-1)
            if got.shape != want.shape:
                return PreflightResult(False, "preflight_outputs",
                                       f"output {name!r} has shape {got.shape}, expected {want.shape}", {"output": name})
            same = _equal(got, want)
            agreement = float(np.count_nonzero(same)) / len(want)
            details[f"agreement:{name}"] = round(agreement, 4)
            if agreement < params.label_agreement:
                return PreflightResult(False, "preflight_labels",
                                       f"output {name!r} agrees with the expected labels on {agreement:.3f} of rows, "
                                       f"at least {params.label_agreement:g} required",
                                       {**details, "output": name, "agreement": round(agreement, 4),
                                        "label_agreement": params.label_agreement})
        else:
            got = got.reshape(want.shape) if got.size == want.size else got
            if got.shape != want.shape:
                return PreflightResult(False, "preflight_outputs",
                                       f"output {name!r} has shape {got.shape}, expected {want.shape}", {"output": name})
            diff = float(np.max(np.abs(got.astype(np.float64) - want.astype(np.float64)))) if want.size else 0.0
            details[f"max_abs_diff:{name}"] = diff
            if not np.allclose(got, want, rtol=params.rtol, atol=params.atol):
                return PreflightResult(False, "preflight_outputs",
                                       f"output {name!r} differs from the expected values by up to {diff:.3g} "
                                       f"(rtol {params.rtol:g}, atol {params.atol:g})",
                                       {**details, "output": name, "max_abs_diff": diff,
                                        "rtol": params.rtol, "atol": params.atol})
    p95 = _p95(lat_ms)
    details["p95_ms"] = round(p95, 4)
    if p95 > profile.latency_slo_ms:
        return PreflightResult(False, "preflight_latency",
                               f"preflight p95 latency {p95:.3f} ms is above the profile's SLO {profile.latency_slo_ms:g} ms",
                               {**details, "latency_slo_ms": profile.latency_slo_ms})
    if memory_mb is not None:
        details["memory_mb"] = round(memory_mb, 2)
        if memory_mb > profile.memory_budget_mb:
            return PreflightResult(False, "preflight_memory",
                                   f"the candidate's session needs {memory_mb:.1f} MiB, the profile allows "
                                   f"{profile.memory_budget_mb} MiB",
                                   {**details, "memory_budget_mb": profile.memory_budget_mb})
    return PreflightResult(True, "", f"preflight passed on {n} rows", details)


# --- sampling ----------------------------------------------------------------------------------


class Sampler:
    """Picks requests ``n`` where ``floor((n+1)f) > floor(n f)``: exactly ``fraction`` of them,
    evenly spread, reproducible, and lock-free (``next`` on ``itertools.count`` is atomic)."""

    def __init__(self, fraction: float) -> None:
        self.fraction = fraction
        self._n = itertools.count()

    def pick(self) -> bool:
        n = next(self._n)
        return math.floor((n + 1) * self.fraction) > math.floor(n * self.fraction)
