"""Canary on the device: preflight, paired shadow comparison, split serving and the local guard.

Pure core (no threads, no wall clock; a clock is passed in where time is measured):

* :func:`compare_outputs` - agreement and distance between the stable's and the candidate's
  outputs on the same input rows, per output family: labels by agreement, probability rows by
  total variation, other floats (regression values, N-D outputs) by relative L1.
* :class:`CanaryStats` - per-window counters (reset by :meth:`CanaryStats.window`) and bounded
  cumulative totals the local guard judges (:func:`local_verdict`).
* :func:`load_preflight` / :func:`run_preflight` - the signed preflight set (an untrusted ``.npz``)
  and the checks a candidate passes before it may shadow or serve. The set holds its inputs as
  one ``input`` table (float32 N x F, for a model whose only input is that table: what every
  agent reads) or as one ``input:<onnx input name>`` array per model input (any rank; numbers in
  the model's dtype, strings as unicode ``U`` arrays; the same N rows each), never both; and
  its expected values as ``output:<onnx output name>`` arrays: labels (integers or strings) must
  agree, floats must be ``allclose``. No object arrays, no pickles.

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
    "PREFLIGHT_DTYPES",
    "PREFLIGHT_INPUT",
    "PREFLIGHT_INPUT_PREFIX",
    "PREFLIGHT_OUTPUT_PREFIX",
    "CanaryLimits",
    "CanarySpec",
    "CanaryStats",
    "PreflightFailed",
    "PreflightMismatch",
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
    "preflight_feeds",
    "preflight_rows",
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


_LABEL_KINDS = "iuUSOb"  # integers, bools and strings (ONNX Runtime returns strings as objects)


def _pick(outputs: Outputs) -> tuple[list[Array], list[Array]]:
    """Every output as per-row arrays, by family, in the outputs' order: labels (integers, bools
    or strings: 1-D with one per row, or N x k when a row has several) and floats (N x k: ``[N]``
    becomes N x 1 and an N-D output such as N x C x H x W is reshaped per row). Outputs of other
    dtypes are left out."""
    labels: list[Array] = []
    floats: list[Array] = []
    for value in outputs.values():
        a = _as_array(value)
        kind = a.dtype.kind
        if kind == "f":
            floats.append(a.reshape(row_count(a), -1) if a.ndim != 2 else a)
        elif kind in _LABEL_KINDS:
            if a.ndim != 1:
                a = a.reshape(row_count(a), -1)
                if a.shape[1] == 1:
                    a = a.reshape(-1)
            labels.append(a)
    return labels, floats


def _scores(outputs: Outputs, picked: Array) -> bool:
    """Whether ``picked`` (a float output read per row) is an ``[N, K]`` output as the model gave
    it: class scores or logits (a classifier exported without a label output), judged by the
    class they pick, not by their values. ``[N]``, ``[N, 1]`` and N-D outputs are values."""
    for value in outputs.values():
        a = value if isinstance(value, np.ndarray) else None
        if a is not None and a.shape == picked.shape:
            return a.ndim == 2
    return False  # reshaped from N-D (or [N]): values


def _class_label(labels: list[Array]) -> Array | None:
    """The first output with one label per row: what the window counts classes of."""
    for a in labels:
        if a.ndim == 1:
            return a
    return None


def _is_distribution(a: Array) -> bool:
    """Rows of probabilities: within [0, 1] and summing to 1 (``np.allclose``'s test, atol 1e-3,
    written out: allclose alone cost the shadow thread 15 µs per call). NaN makes it False."""
    if a.ndim != 2 or a.shape[1] < 2 or a.size == 0:
        return False
    if not (a.min() >= -1e-6 and a.max() <= 1 + 1e-6):
        return False
    return bool(np.abs(a.sum(axis=1) - 1.0).max() <= 1e-3 + 1e-5)


def _equal(a: Array, b: Array) -> Array:
    """Element-wise label equality across dtypes (int32 vs int64, bool vs int, str vs str)."""
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

    Outputs are paired by name when both answers have the same output names, else by family and
    order (the i-th label output with the i-th label output, the i-th float with the i-th float).
    Each output is read per row (:func:`_pick`) and judged by its family:

    * labels (integers, bools, strings; several per row too): a row agrees when every value is equal;
    * probability rows (floats in [0, 1] summing to 1, on both sides): distance is the total
      variation ``sum|a-b| / 2``, a row agrees when the argmax is the same;
    * any other float output (regression values ``[N]`` or ``[N, 1]``, N-D outputs reshaped per
      row, scores that are not distributions): distance is the relative L1
      ``sum|a-b| / (sum|a| + sum|b|)``, a row agrees when that is at most
      :data:`REGRESSION_AGREEMENT` - except an ``[N, K]`` output (K > 1) of a model without
      labels, class scores or logits (a classifier exported with no label output), whose row
      agrees when the argmax is the same, as for probabilities: a retrained classifier's logits
      always differ, its classes should not.

    A row agrees when all its label outputs agree; a model without labels agrees when every float
    output agrees. A row's distance is the largest over its float outputs (NaN distances are
    ignored), or 1 per disagreeing row when there are only labels. Outputs whose row count is not
    ``n`` (taken from the first label output, else the first float output) are left out. An output
    whose shape differs between the two, or nothing comparable at all, counts as ``n``
    disagreeing rows at distance 1.
    """
    agreed, n, dist, _ = _compare(stable, cand)
    return agreed, n, dist


def _compare(stable: Outputs, cand: Outputs) -> tuple[int, int, float, Array | None]:
    """:func:`compare_outputs`, and the candidate's label output (kept for the window's class
    counts) so that the shadow thread picks the outputs apart once."""
    if len(stable) > 1 and stable.keys() == cand.keys() and list(stable) != list(cand):
        cand = {k: cand[k] for k in stable}  # same names in another order: pair them by name
    s_labels, s_floats = _pick(stable)
    c_labels, c_floats = _pick(cand)
    c_label = _class_label(c_labels) if c_labels else None
    n = len(s_labels[0]) if s_labels else (len(s_floats[0]) if s_floats else 0)
    if n == 0:
        return 0, 0, 0.0, c_label
    agree: Array | None = None
    if s_labels and c_labels:
        for s, c in zip(s_labels, c_labels, strict=False):
            if len(s) != n:
                continue
            if s.shape != c.shape:
                return 0, n, float(n), c_label
            eq = _equal(s, c)
            if eq.ndim > 1:
                eq = np.asarray(eq.all(axis=1))
            agree = eq if agree is None else agree & eq
    dist: Array | None = None
    if s_floats and c_floats:
        labelled = agree is not None
        for s, c in zip(s_floats, c_floats, strict=False):
            if len(s) != n:
                continue
            if s.shape != c.shape:
                return 0, n, float(n), c_label
            a, b = s.astype(np.float64), c.astype(np.float64)
            if _is_distribution(a) and _is_distribution(b):
                d = 0.5 * np.abs(a - b).sum(axis=1)
                ok = None if labelled else a.argmax(axis=1) == b.argmax(axis=1)
            else:
                denom = np.abs(a).sum(axis=1) + np.abs(b).sum(axis=1)
                diff = np.abs(a - b).sum(axis=1)
                d = np.divide(diff, denom, out=np.zeros_like(diff), where=denom > 0)
                if labelled:
                    ok = None
                elif a.shape[1] > 1 and _scores(stable, s):  # logits or scores of classes: the class
                    ok = a.argmax(axis=1) == b.argmax(axis=1)
                else:
                    ok = d <= REGRESSION_AGREEMENT
            dist = d if dist is None else np.fmax(dist, d)
            if ok is not None:
                agree = ok if agree is None else agree & ok
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
        label = _class_label(_pick(outputs)[0])
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


# The preflight set's arrays (the .npz's names; see :func:`load_preflight`).
PREFLIGHT_INPUT = "input"  # the legacy form: float32 N x F, fed to the model's only input
PREFLIGHT_INPUT_PREFIX = "input:"  # one per model input: ``input:<onnx input name>``
PREFLIGHT_OUTPUT_PREFIX = "output:"  # expected values: ``output:<onnx output name>``

# How a preflight set stores each ONNX Runtime input type (numpy dtypes; strings as unicode ``U``
# arrays, which ``np.savez`` writes without pickles). :func:`preflight_feeds` feeds strings to
# ONNX Runtime as object arrays of ``str``.
PREFLIGHT_DTYPES: Mapping[str, Any] = {
    "tensor(float)": np.float32,
    "tensor(double)": np.float64,
    "tensor(float16)": np.float16,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
    "tensor(int16)": np.int16,
    "tensor(int8)": np.int8,
    "tensor(uint64)": np.uint64,
    "tensor(uint32)": np.uint32,
    "tensor(uint16)": np.uint16,
    "tensor(uint8)": np.uint8,
    "tensor(bool)": np.bool_,
    "tensor(string)": np.str_,
}


class PreflightRejected(Refused):
    """The preflight blob is not a usable preflight set."""

    reason = "preflight_blob"


class PreflightMismatch(Refused):
    """The preflight set's inputs do not fit the model's: other names, or values that do not
    convert to the model's input types."""

    reason = "preflight_run"


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


def _describe(a: Array) -> str:
    return f"{a.dtype} {list(a.shape)}"


def load_preflight(data: bytes) -> dict[str, Array]:
    """Read a preflight ``.npz`` (untrusted even though its hash is signed: no pickles, and at
    most :data:`MAX_PREFLIGHT_BYTES` once expanded).

    A set holds its inputs in one of two forms, never both:

    * ``input``: a non-empty numeric N x F table for a model whose only input is that table (the
      form every agent reads; it goes to the model's only input);
    * ``input:<onnx input name>``, one per model input: any rank, numeric (integers, floats,
      bools) or strings (unicode ``U`` arrays), all with the same number of rows N.

    and its expected values as ``output:<onnx output name>`` arrays: one row per input row,
    numbers, bools or strings. Returns the arrays by name; raises :class:`PreflightRejected`
    saying what was expected and what came."""
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
    named = {k: v for k, v in arrays.items() if k.startswith(PREFLIGHT_INPUT_PREFIX)}
    legacy = arrays.get(PREFLIGHT_INPUT)
    if legacy is not None and named:
        raise PreflightRejected(f"the preflight set has both 'input' and {sorted(named)}: expected either one "
                                "'input' table or one 'input:<name>' array per model input")
    if legacy is not None:
        if legacy.ndim != 2 or legacy.dtype.kind not in "fiu" or legacy.shape[0] < 1:
            raise PreflightRejected(f"preflight 'input' must be a non-empty numeric N x F array, "
                                    f"got {_describe(legacy)}")
        rows = legacy.shape[0]
    elif named:
        for k, v in named.items():
            if k == PREFLIGHT_INPUT_PREFIX:
                raise PreflightRejected("preflight input array 'input:' names no model input")
            if v.ndim < 1 or v.shape[0] < 1 or v.dtype.kind not in "fiubU":
                raise PreflightRejected(f"preflight {k!r} must be a non-empty array of numbers, bools or strings "
                                        f"with one row per example, got {_describe(v)}")
        counts = {k: int(v.shape[0]) for k, v in named.items()}
        if len(set(counts.values())) > 1:
            raise PreflightRejected(f"preflight inputs must all have the same number of rows, got {counts}")
        rows = next(iter(counts.values()))
    else:
        raise PreflightRejected(f"the preflight set has no 'input' or 'input:<name>' array (has {sorted(arrays)})")
    for k, v in arrays.items():
        if k == PREFLIGHT_INPUT or k in named:
            continue
        if not k.startswith(PREFLIGHT_OUTPUT_PREFIX) or k == PREFLIGHT_OUTPUT_PREFIX:
            raise PreflightRejected(f"unexpected array {k!r} in the preflight set "
                                    "(expected input or input:<name>, and output:<name>)")
        if v.shape[:1] != (rows,) or v.dtype.kind not in "fiubU":
            raise PreflightRejected(f"preflight {k!r} must have one row of numbers, bools or strings per input "
                                    f"row ({rows}), got {_describe(v)}")
    return arrays


def preflight_rows(arrays: Mapping[str, Array]) -> int:
    """The number of input rows in a set :func:`load_preflight` accepted."""
    for k, v in arrays.items():
        if k == PREFLIGHT_INPUT or k.startswith(PREFLIGHT_INPUT_PREFIX):
            return row_count(np.asarray(v))
    return 0


def preflight_feeds(arrays: Mapping[str, Array], inputs: Sequence[Any], rows: int | None = None) -> dict[str, Array]:
    """The set's inputs (first ``rows`` rows) by the model's input names, each converted to its
    input's type. ``inputs`` is ``session.get_inputs()`` (objects with ``name`` and ``type``).
    The legacy ``input`` table goes to the model's only input; ``input:<name>`` arrays must name
    exactly the model's inputs. Strings are fed as object arrays of ``str`` (what ONNX Runtime
    takes for ``tensor(string)``). Raises :class:`PreflightMismatch` saying what differs."""
    wanted = [str(i.name) for i in inputs]
    if PREFLIGHT_INPUT in arrays:
        if len(wanted) != 1:
            raise PreflightMismatch(f"the preflight set has one input table 'input' for a model with one input; "
                                    f"the candidate takes inputs {wanted}")
        given = {wanted[0]: np.asarray(arrays[PREFLIGHT_INPUT])}
    else:
        given = {k[len(PREFLIGHT_INPUT_PREFIX):]: np.asarray(v) for k, v in arrays.items()
                 if k.startswith(PREFLIGHT_INPUT_PREFIX)}
        if sorted(given) != sorted(wanted):
            raise PreflightMismatch(f"the preflight set has inputs {sorted(given)}; the candidate takes inputs "
                                    f"{sorted(wanted)}")
    feeds: dict[str, Array] = {}
    for spec in inputs:
        name, kind = str(spec.name), str(spec.type)
        value = given[name][:rows] if rows is not None else given[name]
        dtype = PREFLIGHT_DTYPES.get(kind)
        if dtype is np.str_:
            if value.dtype.kind != "U":
                raise PreflightMismatch(f"input {name!r} is {kind}; the preflight set has {_describe(value)}, "
                                        "expected strings")
            feeds[name] = value.astype(object)
        elif dtype is None or value.dtype == dtype:
            feeds[name] = value  # a type preflight sets do not convert: ONNX Runtime judges it
        else:
            if value.dtype.kind not in "fiub":
                raise PreflightMismatch(f"input {name!r} is {kind}; the preflight set has {_describe(value)}, "
                                        "expected numbers")
            feeds[name] = value.astype(dtype)
    return feeds


def run_preflight(
    session: Session,
    arrays: Mapping[str, Array],
    params: PreflightParams,
    profile: DeviceProfile,
    *,
    clock: Callable[[], float],
    memory_mb: float | None = None,
) -> PreflightResult:
    """Run the candidate on the preflight set one row at a time, every input fed by name
    (:func:`preflight_feeds`), and check, in order: its inputs fit and it runs
    (``preflight_run``), no NaN/inf (``preflight_nan``), expected float outputs within tolerance
    (``preflight_outputs``) and label agreement, numbers or strings (``preflight_labels``), p95
    latency per call within the profile's SLO (``preflight_latency``), and ``memory_mb`` (the
    session's measured footprint, if the caller measured it) within the profile's budget
    (``preflight_memory``)."""
    n = min(preflight_rows(arrays), params.rows or MAX_PREFLIGHT_ROWS, MAX_PREFLIGHT_ROWS)
    inputs = session.get_inputs()
    try:
        feeds = preflight_feeds(arrays, inputs, n)
    except PreflightMismatch as exc:
        return PreflightResult(False, "preflight_run", f"the candidate cannot take the preflight inputs: {exc}",
                               {"inputs": [str(i.name) for i in inputs]})
    out_names = [o.name for o in session.get_outputs()]
    collected: list[list[Array]] = [[] for _ in out_names]
    lat_ms: list[float] = []
    try:
        for i in range(n):
            row = {k: v[i : i + 1] for k, v in feeds.items()}
            t0 = clock()
            values = session.run(None, row)
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
        if not key.startswith(PREFLIGHT_OUTPUT_PREFIX):
            continue
        name, want = key[len(PREFLIGHT_OUTPUT_PREFIX) :], np.asarray(expected)[:n]
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
            if got.shape != want.shape or got.dtype.kind not in "fiub":
                return PreflightResult(False, "preflight_outputs",
                                       f"output {name!r} is {_describe(got)}, expected numbers of shape "
                                       f"{list(want.shape)}", {"output": name})
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
