"""The canary's threads: the shadow replay queue and one attached candidate.

* :class:`Shadow` - a bounded queue and one daemon thread replaying sampled requests on the
  candidate. The request path only copies and appends: when the queue is full the sample is
  skipped and counted, so the stable path never waits. Queued items are replayed in batches.
* :class:`CanaryRun` - one attached candidate: the hook :class:`agent.app.serving.ModelServer` calls
  on every request of the model (split choice, shadow offer) and the local guard that drops the
  candidate at once when it errors, returns NaN/inf or breaks its limits.

Replays batch requests of any input signature: several named inputs, N-D inputs (images as
N x C x H x W), and string inputs (``tensor(string)``, unicode arrays of any length). Requests
whose inputs concatenate go to the candidate in one call; the others are grouped by signature
(names, dtypes, trailing shapes). The stable's outputs are concatenated alike and compared by
:func:`agent.core.canary.compare_outputs`, per output family.

The statistics they feed and the verdicts they act on are the pure :mod:`agent.core.canary`.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any, Protocol

import numpy as np

from edgefleet.agent.contract.wire import ModelEntry
from edgefleet.agent.core.canary import (
    Array,
    CanaryLimits,
    CanarySpec,
    CanaryStats,
    Outputs,
    Sampler,
    Verdict,
    has_nonfinite,
    local_verdict,
    row_count,
)

__all__ = ["CanaryRun", "CandidateModel", "Shadow"]

log = logging.getLogger("edgefleet.agent.app.shadow")

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
        # Like for like: with the stable's session bound, each batch runs on both, on this thread,
        # in alternating order, and both latencies are timed the same way (issue 15: a request-path
        # stable against shadow-thread replays carried a 1.5x bias for identical models).
        self.stable_replay: Replay | None = None
        self._stable_first = False
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
            s[k] = v.copy() if isinstance(v, np.ndarray) else v
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
        stable_replay = self.stable_replay
        self._stable_first = first = not self._stable_first
        warm = stable_replay is not None and first and _quietly(stable_replay, feeds)
        t0 = self.clock()
        try:
            out = self.replay(feeds)  # the answers compared; timed only when the stable is not bound
        except Exception as exc:
            ms = (self.clock() - t0) * 1000.0
            if len(group) > 1:
                # One bad input fails the whole batched call: replay the requests one by one, so
                # a model that fails on 1 % of inputs reports 1 %, not every request of its batch.
                log.info("candidate failed on a batch of %d shadow replays (%s); replaying them one by one",
                         len(group), exc)
                for item in group:
                    self._replay_group([item], item[0])
                return
            log.info("candidate failed on a shadow replay: %s", exc)
            self.stats.record_candidate(ms, ok=False)
            return
        ms = (self.clock() - t0) * 1000.0
        stable_ms: float | None = None
        if stable_replay is not None:
            timed = self._time_both(stable_replay, feeds, first, warm)
            if timed is not None:
                stable_ms, ms = timed
        cand_ms = _shares(group, feeds, ms)
        s_ms = (_shares(group, feeds, stable_ms) if stable_ms is not None
                else np.array([s for _, _, s in group], dtype=np.float64))  # the request path's
        paired = stable_ms is not None
        if len(group) == 1:
            self.stats.record_pair(group[0][1], out, s_ms, cand_ms, paired)
            return
        stable = {k: _concat([s[k] for _, s, _ in group]) for k in group[0][1]}
        self.stats.record_pair(stable, out, s_ms, cand_ms, paired)

    def _time_both(self, stable: Replay, feeds: dict[str, Array], stable_first: bool,
                   warm: bool) -> tuple[float, float] | None:
        """(stable ms, candidate ms) on this batch, timed alike. Each version has run once on the
        batch untimed (the candidate for its answers, the stable just before or after it), so both
        find the batch's part of their model in the caches, as when serving traffic; then both run
        timed, in alternating order, each with exactly one run of the other version between its
        warm-up and its timed run:

            stable first:      S(warm) C(answers) S(timed) C(timed)
            candidate first:   C(answers) S(warm) C(timed) S(timed)

        A stable kept warm by the request path against a candidate cold on this thread read 1.15x
        for identical models on a busy machine, and orders with uneven gaps 1.07x. ``None`` if
        the stable fails here (it answered these requests once already; the request path's times
        stand in)."""
        clock = self.clock
        try:
            if stable_first:
                if not warm:
                    return None
                t0 = clock()
                stable(feeds)
                t1 = clock()
                self.replay(feeds)
                t2 = clock()
                return (t1 - t0) * 1000.0, (t2 - t1) * 1000.0
            stable(feeds)
            t0 = clock()
            self.replay(feeds)
            t1 = clock()
            stable(feeds)
            t2 = clock()
            return (t2 - t1) * 1000.0, (t1 - t0) * 1000.0
        except Exception:
            return None

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


def _quietly(run: Replay, feeds: dict[str, Array]) -> bool:
    try:
        run(feeds)
    except Exception:
        return False
    return True


def _shares(group: list[_Item], feeds: dict[str, Array], ms: float) -> Array:
    """One batch's time shared by its requests, by rows (the per-request cost a batch amortises:
    see docs/update-path.md on what that means for the latency ratio)."""
    first = next(iter(feeds), None)
    total = row_count(feeds[first]) if first is not None else len(group)
    if total == len(group):  # one row per request (the usual case): an equal share each
        return np.full(total, ms / total)
    if first is not None:
        return np.array([row_count(f[first]) for f, _, _ in group], dtype=np.float64) * (ms / total)
    return np.full(len(group), ms / len(group))


def _concat(values: list[Any]) -> Any:
    if isinstance(values[0], list):  # ZipMap rows
        return [row for v in values for row in v]
    try:
        return np.concatenate(values)
    except ValueError:  # 0-d outputs: one value per request
        return np.concatenate([np.atleast_1d(np.asarray(v)) for v in values])


MAX_STRING_BATCH_BYTES = 4 << 20  # a batched string input, padded, at most (else requests replay one by one)


def _stack(group: list[_Item]) -> dict[str, Array] | None:
    """The group's inputs concatenated along the batch axis (one C call per input), or ``None``
    when they do not concatenate as they are (other names, ranks or trailing shapes, or dtypes
    that numpy would have to convert). Strings of different lengths (``<U5`` and ``<U9``, as the
    model server hands out ``tensor(string)`` inputs) are one type: they concatenate to the
    longest, which changes no value, unless that padding would pass
    :data:`MAX_STRING_BATCH_BYTES` (one long string among short ones): then ``None``."""
    first = group[0][0]
    if len(group) == 1:
        return first
    for k in (k for k, v in first.items() if v.dtype.kind in "US"):
        parts = [f[k] for f, _, _ in group if k in f]  # a U array holds every row at the longest's size
        if len(parts) < len(group) or sum(p.size for p in parts) * max(p.dtype.itemsize for p in parts) > \
                MAX_STRING_BATCH_BYTES:
            return None
    try:
        feeds = {k: np.concatenate([f[k] for f, _, _ in group]) for k in first}
    except (KeyError, ValueError, TypeError, MemoryError):
        return None
    for k, v in first.items():
        got = feeds[k].dtype
        if got != v.dtype and not (got.kind == v.dtype.kind and got.kind in "US"):
            return None
    return feeds


def _dtype_key(a: Array) -> str:
    """A dtype as a batch sees it: strings by kind (any length), everything else exactly."""
    dt = np.asarray(a).dtype
    return dt.kind if dt.kind in "US" else dt.str


def _signature(it: _Item) -> tuple[Any, ...]:
    """What must match for requests to share one candidate call: the input names, each input's
    dtype (:func:`_dtype_key`), rank and trailing shape (N-D inputs such as N x 3 x H x W too)."""
    return tuple((k, _dtype_key(v), np.shape(v)[1:]) for k, v in sorted(it[0].items()))


def _groups(items: list[_Item]) -> list[list[_Item]]:
    groups: dict[tuple[Any, ...], list[_Item]] = {}
    for it in items:
        groups.setdefault(_signature(it), []).append(it)
    return list(groups.values())


class CandidateModel(Protocol):
    """What a run needs of :class:`agent.app.serving.LoadedModel`."""

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
        self.stats = CanaryStats(rollout=spec.rollout, mode=spec.mode, version=candidate.version,
                                 lock=threading.Lock())
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

    def bind_stable(self, run: Replay | None) -> None:
        """The stable's session to time beside the candidate (shadow mode; see :class:`Shadow`)."""
        if self.shadow is not None:
            self.shadow.stable_replay = run

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

