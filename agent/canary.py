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
* :class:`CanaryRun` - one attached candidate: the hook :class:`agent.serving.ModelServer` calls
  on every request of the model (split choice, shadow offer) and the guard that drops the
  candidate at once when it errors, returns NaN/inf or breaks its limits.

Machine reasons: preflight ``preflight_blob``, ``preflight_run``, ``preflight_nan``,
``preflight_outputs``, ``preflight_labels``, ``preflight_latency``, ``preflight_memory``; local
guard ``nan_output``, ``error_rate``, ``latency_ratio``, ``latency_slo``.
"""

from __future__ import annotations

import io
import itertools
import logging
import math
import threading
import time
import zipfile
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from edgefleet.agent.config import DeviceProfile
from edgefleet.agent.errors import MalformedMessage, Refused
from edgefleet.agent.telemetry import latency_summary
from edgefleet.agent.wire import ModelEntry

__all__ = [
    "MODES",
    "CanaryLimits",
    "CanaryRun",
    "CanarySpec",
    "CanaryStats",
    "CandidateModel",
    "PreflightFailed",
    "PreflightParams",
    "PreflightRejected",
    "PreflightResult",
    "Sampler",
    "Shadow",
    "Verdict",
    "compare_outputs",
    "has_nonfinite",
    "latency_summary",
    "load_preflight",
    "local_verdict",
    "run_preflight",
]

log = logging.getLogger("edgefleet.agent.canary")

MODES = ("shadow", "split")
# A regressor's pair "agrees" when the rows differ by at most this relative distance.
REGRESSION_AGREEMENT = 0.01
LATENCY_HISTORY = 2048  # cumulative latency samples kept per side for the guard
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


def _rows(a: Array) -> int:
    return int(a.shape[0]) if a.ndim else 1


def _pick(outputs: Outputs) -> tuple[Array | None, Array | None]:
    """The label output (integers or strings, one per row) and the score output (floats)."""
    label = score = None
    for value in outputs.values():
        a = _as_array(value)
        if label is None and a.dtype.kind in "iuUSOb" and (a.ndim == 1 or (a.ndim == 2 and a.shape[1] == 1)):
            label = a.reshape(-1)
        elif score is None and a.dtype.kind == "f":
            score = a.reshape(_rows(a), -1) if a.ndim else a.reshape(1, 1)
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
    n = len(s_label) if s_label is not None else (_rows(s_score) if s_score is not None else 0)
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

    def values(self) -> Array:
        return self._buf[:min(self._n, len(self._buf))].copy()


class CanaryStats:
    """Counters for one candidate. ``window()`` returns the contract's ``canary`` dict and resets
    the per-window counts; cumulative totals (for the guard) are kept. A lock makes it safe to
    record from the request path and the shadow thread while the main loop closes a window."""

    def __init__(self, *, rollout: str, mode: str, version: str) -> None:
        self.rollout, self.mode, self.version = rollout, mode, version
        self.state: str = "running"
        self.reason: str | None = None
        self._lock = threading.Lock()
        self._reset()
        self._t_requests = self._t_errors = self._t_nonfinite = self._t_compared = self._t_agreed = 0
        self._t_cand = _Ring(LATENCY_HISTORY)
        self._t_stable = _Ring(LATENCY_HISTORY)

    def _reset(self) -> None:
        self._requests = self._errors = self._skipped = self._compared = self._agreed = 0
        self._distance = 0.0
        self._cand_ms: list[float] = []  # one at a time (split mode)
        self._stable_ms: list[float] = []
        self._cand_chunks: list[Array] = []  # a batch's worth at a time (shadow replays)
        self._stable_chunks: list[Array] = []
        self._labels: list[Array] = []  # counted when the window closes, off the replay path

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
    ) -> None:
        """A shadow replay: both answers on the same input, and both latencies (ms). A batched
        replay of k requests passes their outputs concatenated and k latencies on each side."""
        s_ms = np.atleast_1d(np.asarray(stable_ms, dtype=np.float64))
        c_ms = np.atleast_1d(np.asarray(cand_ms, dtype=np.float64))
        k = len(c_ms)
        bad = has_nonfinite(cand_out)
        agreed, n, dist, label = (0, 0, 0.0, None) if bad else _compare(stable_out, cand_out)
        with self._lock:
            self._requests += k
            self._t_requests += k
            self._cand_chunks.append(c_ms)
            self._stable_chunks.append(s_ms)
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
                candidate_ms=self._t_cand.values(),
                stable_ms=self._t_stable.values(),
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
            }
            labels = self._labels
            self._reset()
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


def local_verdict(t: Totals, limits: CanaryLimits) -> Verdict | None:
    """Drop the candidate? NaN/inf outputs drop it at once; error rate, latency ratio (candidate
    p95 / stable p95) and the profile's latency SLO are judged once ``min_samples`` requests have
    been seen. Returns ``None`` while it may keep running."""
    numbers: dict[str, Any] = {"requests": t.requests, "errors": t.errors, "min_samples": limits.min_samples}
    if t.nonfinite:
        return Verdict("nan_output", f"the candidate returned NaN/inf on {t.nonfinite} request(s)",
                       {**numbers, "nonfinite": t.nonfinite})
    if t.requests < max(1, limits.min_samples):
        return None
    rate = t.errors / t.requests
    if rate > limits.max_error_rate:
        return Verdict("error_rate", f"candidate error rate {rate:.3f} above {limits.max_error_rate:g}",
                       {**numbers, "error_rate": round(rate, 4), "max_error_rate": limits.max_error_rate})
    if len(t.candidate_ms) >= limits.min_samples:
        cand = _p95(t.candidate_ms)
        if limits.latency_slo_ms is not None and cand > limits.latency_slo_ms:
            return Verdict("latency_slo", f"candidate p95 {cand:.3f} ms above the profile's SLO "
                           f"{limits.latency_slo_ms:g} ms",
                           {**numbers, "candidate_p95_ms": round(cand, 4), "latency_slo_ms": limits.latency_slo_ms})
        if len(t.stable_ms):
            stable = _p95(t.stable_ms)
            ratio = cand / stable if stable > 0 else math.inf
            if ratio > limits.max_latency_ratio:
                return Verdict("latency_ratio", f"candidate p95 {cand:.3f} ms is {ratio:.1f}x the stable's "
                               f"{stable:.3f} ms (limit {limits.max_latency_ratio:g}x)",
                               {**numbers, "candidate_p95_ms": round(cand, 4), "stable_p95_ms": round(stable, 4),
                                "latency_ratio": round(ratio, 3), "max_latency_ratio": limits.max_latency_ratio})
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
    clock: Callable[[], float] = time.perf_counter,
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


# --- adapters: sampling, the shadow thread, one attached candidate ---------------------------------


class Sampler:
    """Picks requests ``n`` where ``floor((n+1)f) > floor(n f)``: exactly ``fraction`` of them,
    evenly spread, reproducible, and lock-free (``next`` on ``itertools.count`` is atomic)."""

    def __init__(self, fraction: float) -> None:
        self.fraction = fraction
        self._n = itertools.count()

    def pick(self) -> bool:
        n = next(self._n)
        return math.floor((n + 1) * self.fraction) > math.floor(n * self.fraction)


Replay = Callable[[dict[str, Array]], dict[str, Any]]


# A queued request: (a copy of its inputs, a copy of the stable's outputs, the stable's latency
# in ms). A plain tuple, not an object: the request path builds it without a Python call, and the
# garbage collector stops tracking it at its first pass (it holds only arrays, strings and a float),
# so a full queue does not pile objects into the oldest generation and set off full collections.
_Item = tuple[dict[str, Array], Outputs, float]


class Shadow:
    """Replays sampled requests on the candidate off the request path.

    ``offer`` (request path) samples, copies and appends to a bounded deque; a full one means
    skip and count. ``process`` (the shadow thread, or a test) takes what is queued, up to
    ``max_batch`` items with the same input signature in one candidate call, and records each
    pair in ``stats``.

    The request path pays for a sampled request only the copies and a ``deque.append`` (atomic
    under the GIL); the shadow thread is woken by an event that only the first item after it
    drained sets. A ``queue.Queue`` cost three times as much per sampled request (its locks and
    condition), and at 10 % sampling the sampled requests set the stable path's p99. With
    several request threads the bound may be passed by one item per thread (the length check
    and the append are not one step); that is the whole slack.
    """

    def __init__(
        self,
        *,
        replay: Replay,
        stats: CanaryStats,
        fraction: float,
        capacity: int = 64,
        max_batch: int = 16,
        clock: Callable[[], float] = time.perf_counter,
        after: Callable[[], None] | None = None,
        name: str = "canary-shadow",
        linger_s: float = 0.0,
    ) -> None:
        self.replay = replay
        # The shadow thread waits this long before each batch so that more queue up and go in
        # one candidate call: fewer wake-ups and GIL hand-overs competing with the request thread.
        # Each replay takes the GIL twice, and every time it may keep one request waiting;
        # at most 1/linger_s replays a second keep that a small share of requests (see
        # BENCHMARKS.md §3). Throughput is then capped at max_batch/linger_s replays a second:
        # samples beyond it are skipped and counted, never waited for.
        self.linger_s = linger_s
        self.stats = stats
        self.sampler = Sampler(fraction)
        self.max_batch = max_batch
        self.clock = clock
        self.after = after or (lambda: None)
        self.name = name
        self.capacity = capacity
        self._items: deque[_Item] = deque()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def offer(self, feeds: dict[str, Array], stable: Outputs, stable_ms: float) -> bool:
        """Request path: never blocks. Returns True if the request was queued for replay."""
        if not self.sampler.pick():
            return False
        items = self._items
        if len(items) >= self.capacity:
            self.stats.record_skipped()
            return False
        # Copies: the caller owns its input and output arrays once the request returns. Plain
        # loops, not comprehensions: a comprehension is a function call (0.3 µs of 2 per sample).
        f: dict[str, Array] = {}
        for k, v in feeds.items():
            f[k] = v.copy()
        s: dict[str, Any] = {}
        for k, v in stable.items():
            s[k] = v.copy() if isinstance(v, _ndarray) else v
        items.append((f, s, stable_ms))
        if not self._wake.is_set():
            self._wake.set()
        return True

    def pending(self) -> int:
        return len(self._items)

    def process(self, timeout: float | None = None, linger_s: float = 0.0) -> int:
        """Replay what is queued (waiting up to ``timeout`` for a first item, then ``linger_s``
        for more); return the number of items done."""
        self._wake.clear()  # before looking: an item appended after this sets it again
        if not self._items and (not timeout or not self._wake.wait(timeout) or not self._items):
            return 0
        if linger_s > 0 and self.max_batch > 1:
            self._stop.wait(linger_s)
        items = self._items
        batch = [items.popleft() for _ in range(min(len(items), self.max_batch))]  # only this thread pops
        # Usually every queued request has the same input names, dtypes and trailing shapes
        # (the model server converted them to the model's types), so the whole batch goes to the
        # candidate at once; only when it does not concatenate is it split by input signature.
        feeds = _stack(batch)
        if feeds is not None:
            self._replay_group(batch, feeds)
        else:
            for group in _groups(batch):
                self._replay_group(group, _stack(group) or group[0][0])
        self.after()
        return len(batch)

    def _replay_group(self, group: list[_Item], feeds: dict[str, Array]) -> None:
        # No ``time.sleep(0)`` between the steps: every time this thread gives up the GIL it takes
        # it back in the middle of a request (the request thread lets go of it in ONNX Runtime)
        # and keeps that request waiting until its next hand-over. For the stable path's p99
        # what counts is how many requests wait, not how long one does, so a replay takes the
        # GIL twice (before and after the candidate's run) and does everything else in one go,
        # with numpy calls on whole batches (about 0.3 ms for 256 requests on the bench machine).
        t0 = self.clock()
        try:
            out = self.replay(feeds)
        except Exception as exc:
            ms = (self.clock() - t0) * 1000.0
            log.info("candidate failed on a shadow replay: %s", exc)
            for _ in group:
                self.stats.record_candidate(ms / len(group), ok=False)
            return
        ms = (self.clock() - t0) * 1000.0
        if len(group) == 1:
            self.stats.record_pair(group[0][1], out, group[0][2], ms)
            return
        # One comparison for the whole batch; its time is shared by rows (the per-request cost
        # a batch amortises: see docs/update-path.md on what that means for the latency ratio).
        first = next(iter(feeds), None)
        total = _rows(feeds[first]) if first is not None else len(group)
        if total == len(group):  # one row per request (the usual case): an equal share each
            cand_ms = np.full(total, ms / total)
        elif first is not None:
            cand_ms = np.array([_rows(f[first]) for f, _, _ in group], dtype=np.float64) * (ms / total)
        else:
            cand_ms = np.full(len(group), ms / len(group))
        stable = {k: _concat([s[k] for _, s, _ in group]) for k in group[0][1]}
        self.stats.record_pair(stable, out, np.array([s_ms for _, _, s_ms in group], dtype=np.float64), cand_ms)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name=self.name, daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.process(timeout=0.2, linger_s=self.linger_s)
            except Exception:  # the shadow must never take the agent down
                log.exception("shadow replay failed")


def _concat(values: list[Any]) -> Any:
    if isinstance(values[0], list):  # ZipMap rows
        return [row for v in values for row in v]
    try:
        return np.concatenate(values)
    except ValueError:  # 0-d outputs: one value per request
        return np.concatenate([np.atleast_1d(np.asarray(v)) for v in values])


def _stack(group: list[_Item]) -> dict[str, Array] | None:
    """The group's inputs concatenated along the batch axis (one C call per input), or ``None``
    when they do not concatenate as they are (other names or trailing shapes, or dtypes that
    numpy would have to convert)."""
    first = group[0][0]
    if len(group) == 1:
        return first
    try:
        feeds = {k: np.concatenate([f[k] for f, _, _ in group]) for k in first}
    except (KeyError, ValueError, TypeError):
        return None
    if any(feeds[k].dtype != v.dtype for k, v in first.items()):
        return None
    return feeds


def _signature(it: _Item) -> tuple[Any, ...]:
    return tuple((k, np.asarray(v).dtype.str, np.asarray(v).shape[1:]) for k, v in sorted(it[0].items()))


def _groups(items: list[_Item]) -> list[list[_Item]]:
    groups: dict[tuple[Any, ...], list[_Item]] = {}
    for it in items:
        groups.setdefault(_signature(it), []).append(it)
    return list(groups.values())


class CandidateModel(Protocol):
    """What a run needs of :class:`agent.serving.LoadedModel`."""

    name: str
    entry: ModelEntry
    session: Any
    input_names: tuple[str, ...]
    output_names: tuple[str, ...]

    @property
    def version(self) -> str: ...


class CanaryRun:
    """One candidate attached beside the stable of ``candidate.name``.

    The model server calls :meth:`split_pick`, :meth:`serve` and :meth:`observe` on the request
    path; none of them blocks. When :func:`local_verdict` says drop, :meth:`drop` marks the stats,
    stops the shadow and calls ``on_drop(run, verdict)`` once (the owner detaches it at once and
    reports it)."""

    def __init__(
        self,
        *,
        candidate: CandidateModel,
        spec: CanarySpec,
        limits: CanaryLimits,
        on_drop: Callable[[CanaryRun, Verdict], None],
        capacity: int = 512,
        max_batch: int = 256,
        linger_s: float = 0.025,
        clock: Callable[[], float] = time.perf_counter,
        check_every: int = 8,
    ) -> None:
        self.candidate = candidate
        self.spec = spec
        self.mode = spec.mode
        self.limits = limits
        self.on_drop = on_drop
        self.clock = clock
        self.check_every = check_every
        self.stats = CanaryStats(rollout=spec.rollout, mode=spec.mode, version=candidate.version)
        self.sampler = Sampler(spec.fraction)
        self.dropped: Verdict | None = None
        self._drop_lock = threading.Lock()
        self._checks = itertools.count()
        self.shadow: Shadow | None = None
        if spec.mode == "shadow":
            self.shadow = Shadow(replay=self._run, stats=self.stats, fraction=spec.fraction, capacity=capacity,
                                 max_batch=max_batch, clock=clock, after=self._after_replay,
                                 name=f"canary-{candidate.name}", linger_s=linger_s)

    @property
    def name(self) -> str:
        return self.candidate.name

    @property
    def version(self) -> str:
        return self.candidate.version

    @property
    def sha256(self) -> str:
        return self.candidate.entry.sha256

    def _run(self, feeds: dict[str, Array]) -> dict[str, Any]:
        values = self.candidate.session.run(None, {k: feeds[k] for k in self.candidate.input_names})
        return dict(zip(self.candidate.output_names, values, strict=True))

    # -- request path --

    def split_pick(self) -> bool:
        return self.mode == "split" and self.dropped is None and self.sampler.pick()

    def serve(self, feeds: dict[str, Array]) -> dict[str, Any] | None:
        """Split: answer with the candidate; ``None`` (the stable answers) if it failed."""
        t0 = self.clock()
        try:
            out = self._run(feeds)
        except Exception as exc:
            self.stats.record_candidate((self.clock() - t0) * 1000.0, ok=False)
            log.info("candidate %s failed on a split request: %s", self.version, exc)
            self.check(force=True)
            return None
        self.stats.record_candidate((self.clock() - t0) * 1000.0, ok=True, outputs=out)
        if has_nonfinite(out):
            self.check(force=True)
            return None
        self.check()
        return out

    def observe(self, feeds: dict[str, Array], stable: Outputs, stable_ms: float) -> None:
        if self.dropped is not None:
            return
        if self.shadow is not None:
            self.shadow.offer(feeds, stable, stable_ms)
        else:
            self.stats.record_stable(stable_ms)

    # -- guard --

    def _after_replay(self) -> None:
        self.check()

    def check(self, force: bool = False) -> Verdict | None:
        if self.dropped is not None:
            return self.dropped
        requests, nonfinite = self.stats.counts()
        quiet = requests < self.limits.min_samples or next(self._checks) % self.check_every
        if not force and not nonfinite and quiet:
            return None
        verdict = local_verdict(self.stats.totals(), self.limits)
        if verdict is not None:
            self.drop(verdict)
        return verdict

    def drop(self, verdict: Verdict) -> None:
        with self._drop_lock:
            if self.dropped is not None:
                return
            self.dropped = verdict
        self.stats.state, self.stats.reason = "dropped", verdict.reason
        if self.shadow is not None:
            self.shadow.stop()
        log.warning("canary %s %s dropped: %s", self.name, self.version, verdict.message)
        self.on_drop(self, verdict)

    # -- lifecycle --

    def start(self) -> None:
        if self.shadow is not None:
            self.shadow.start()

    def stop(self) -> None:
        if self.shadow is not None:
            self.shadow.stop()

