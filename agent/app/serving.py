"""Serving: one ONNX Runtime session per active model, and the in-process inference API.

:class:`ModelServer` maps model names to :class:`LoadedModel`. Swapping a version replaces one
dict entry; a request holds the object it started with, so in-flight requests finish on the old
session and no request is dropped. Every answer names the version (and sha256) that produced it.
"""

from __future__ import annotations

import itertools
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt
import onnxruntime as ort

from edgefleet.agent.adapters.capture import Capture
from edgefleet.agent.app.recorder import Recorder
from edgefleet.agent.contract.config import DeviceProfile
from edgefleet.agent.contract.errors import (
    EdgefleetError,
    InferenceError,
    ModelRejected,
    UnknownModel,
)
from edgefleet.agent.contract.wire import ModelEntry

__all__ = ["CanaryHook", "InferResult", "LoadedModel", "ModelServer", "load"]

_LEVELS = {
    "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}


class InferResult:
    """What :meth:`ModelServer.infer` returns: the outputs and which model version made them.

    A plain class with slots, not a frozen dataclass: building one is on the hot path, and the
    frozen dataclass ``__init__`` alone cost 0.4 µs per request."""

    __slots__ = ("model", "outputs", "request_id", "sha256", "version")

    def __init__(self, model: str, version: str, sha256: str, request_id: str,
                 outputs: dict[str, npt.NDArray[Any]]) -> None:
        self.model, self.version, self.sha256 = model, version, sha256
        self.request_id, self.outputs = request_id, outputs

    def __repr__(self) -> str:
        return (f"InferResult(model={self.model!r}, version={self.version!r}, request_id={self.request_id!r}, "
                f"outputs={sorted(self.outputs)})")


def stable_runner(model: LoadedModel) -> Callable[[dict[str, Any]], dict[str, Any]]:
    """``feeds -> outputs by name`` on ``model``'s session: how a shadow replays the stable."""
    names, outputs = model.input_names, model.output_names

    def run(feeds: dict[str, Any]) -> dict[str, Any]:
        values = model.session.run(None, {k: feeds[k] for k in names})
        return dict(zip(outputs, values, strict=True))

    return run


def session_options(profile: DeviceProfile) -> ort.SessionOptions:
    # Memory: no option here would shrink a session. Measured (ORT 1.32, x86_64, logistic
    # regression and a 100-tree forest): of a small model's ~10 MiB, ~8.5 MiB are onnxruntime's
    # own code pages touched when the first session registers the CPU kernels, ~1.4 MiB heap;
    # enable_cpu_mem_arena=False, enable_mem_pattern=False, 1 intra-op thread, no spinning or
    # basic optimisation each moved it by <= 0.3 MiB, within noise. Thread counts and spinning
    # are latency/CPU choices, left to the device profile.
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = profile.intra_op_threads
    opts.inter_op_num_threads = profile.inter_op_threads
    opts.graph_optimization_level = _LEVELS[profile.graph_optimization_level]
    opts.log_severity_level = 3
    return opts


def session_runner(sess: ort.InferenceSession, output_names: tuple[str, ...]) -> Callable[[dict[str, Any], None], list[Any]]:
    """``run(feeds, None)``: the session's outputs, in ``output_names`` order.

    ``InferenceSession.run`` checks the feed names in Python, then calls the C++ session it
    wraps; :meth:`ModelServer.infer` has already built the feeds from the model's own input
    list, so on CPU the agent calls the C++ session directly (1 µs less per call, a quarter of
    a small model's whole run). With other providers the public ``run`` stays: its wrapper
    falls back to CPU when a CUDA/TensorRT run fails. Any onnxruntime without the inner
    session object gets the public ``run`` too.
    """
    inner = getattr(sess, "_sess", None)
    if inner is not None and callable(getattr(inner, "run", None)) and sess.get_providers() == ["CPUExecutionProvider"]:
        return partial(inner.run, list(output_names))
    return partial(sess.run, list(output_names))


def providers_for(profile: DeviceProfile) -> tuple[list[Any], list[str]]:
    """Providers the profile asks for that this build has, and the ones it lacks."""
    available = set(ort.get_available_providers())
    use: list[Any] = []
    missing: list[str] = []
    for name in profile.execution_providers:
        if name in available:
            opts = dict(profile.provider_options.get(name, {}))
            use.append((name, opts) if opts else name)
        else:
            missing.append(name)
    if not use:
        use.append("CPUExecutionProvider")
    return use, missing


@dataclass
class LoadedModel:
    name: str
    entry: ModelEntry
    session: ort.InferenceSession
    recorder: Recorder
    input_names: tuple[str, ...]
    input_types: tuple[str, ...]
    output_names: tuple[str, ...]
    # Execution providers the profile asked for that the session does not use: absent from this
    # ONNX Runtime build, or present but failed to initialise (e.g. CUDA without a GPU), in
    # which case ONNX Runtime quietly continues on the next one.
    missing_providers: tuple[str, ...] = ()
    # (input name, numpy dtype or None) per input: what ``infer`` converts to, computed once.
    feed_spec: tuple[tuple[str, Any], ...] = ()
    # run(feeds, None) -> outputs in output_names order: see :func:`session_runner`.
    run: Callable[[dict[str, Any], None], list[Any]] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if not self.feed_spec:
            pairs = zip(self.input_names, self.input_types, strict=True)
            self.feed_spec = tuple((n, _ORT_TO_NUMPY.get(t)) for n, t in pairs)
        self.run = session_runner(self.session, self.output_names)

    @property
    def version(self) -> str:
        return self.entry.version


_ORT_TO_NUMPY = {
    "tensor(float)": np.float32,
    "tensor(double)": np.float64,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
    "tensor(string)": np.str_,
    "tensor(bool)": np.bool_,
}


def load(name: str, entry: ModelEntry, path: Path, profile: DeviceProfile) -> LoadedModel:
    """Open an ONNX Runtime session on a blob that passed :func:`agent.adapters.modelcheck.check_model_bytes`.

    The agent checks every blob's structure once, before it is installed (in the guard child);
    a blob is only loaded again after its sha256 matched the signed entry, so the bytes are the
    ones that were checked.
    """
    data = path.read_bytes()
    providers, _missing = providers_for(profile)
    try:
        sess = ort.InferenceSession(data, sess_options=session_options(profile), providers=providers)
    except Exception as exc:  # onnxruntime raises its own Fail/InvalidGraph types
        raise ModelRejected(
            f"ONNX Runtime could not load {name} {entry.version}: {exc}", reason="model_load"
        ) from exc
    inputs = sess.get_inputs()
    used = set(sess.get_providers())
    missing = tuple(p for p in profile.execution_providers if p not in used)
    return LoadedModel(
        name=name,
        entry=entry,
        session=sess,
        recorder=Recorder(entry.version, max_rows=profile.max_sampled_rows,
                          output_names=tuple(o.name for o in sess.get_outputs())),
        input_names=tuple(i.name for i in inputs),
        input_types=tuple(i.type for i in inputs),
        output_names=tuple(o.name for o in sess.get_outputs()),
        missing_providers=missing,
    )


class CanaryHook(Protocol):
    """A candidate running beside a stable (:class:`agent.app.shadow.CanaryRun`). The request path
    calls it; none of its methods may block or raise. ``bind_stable`` is told which stable it runs
    beside (at attach, and whenever that stable is replaced), so a shadow can time both alike."""

    @property
    def version(self) -> str: ...
    @property
    def sha256(self) -> str: ...
    @property
    def mode(self) -> str: ...  # "shadow" or "split"
    def split_pick(self) -> bool: ...
    def serve(self, feeds: dict[str, npt.NDArray[Any]]) -> dict[str, Any] | None: ...
    def observe(self, feeds: dict[str, npt.NDArray[Any]], outputs: Mapping[str, Any], ms: float) -> None: ...
    def bind_stable(self, run: Callable[[dict[str, Any]], dict[str, Any]] | None) -> None: ...


class ModelServer:
    """The in-process inference API that the HTTP endpoint and local applications share."""

    def __init__(self) -> None:
        self._models: dict[str, LoadedModel] = {}
        self._canaries: dict[str, CanaryHook] = {}
        self._lock = threading.Lock()
        # Request ids: a random per-server prefix and a counter. uuid4() per request cost
        # ~1.7 µs (an os.urandom call), more than half the in-process serving overhead.
        self._id_prefix = uuid.uuid4().hex[:12]
        self._ids = itertools.count(1)
        self.capture: Capture | None = None  # set by the agent when its profile enables capture

    def attach_canary(self, name: str, hook: CanaryHook) -> None:
        """Run ``hook``'s candidate beside the stable of ``name`` (shadow or split)."""
        with self._lock:
            self._canaries = {**self._canaries, name: hook}
            stable = self._models.get(name)
        hook.bind_stable(stable_runner(stable) if stable is not None else None)

    def detach_canary(self, name: str, hook: CanaryHook | None = None) -> CanaryHook | None:
        """Stop routing to the candidate of ``name`` (only if it is ``hook``, when given)."""
        with self._lock:
            current = self._canaries.get(name)
            if current is None or (hook is not None and current is not hook):
                return None
            canaries = dict(self._canaries)
            del canaries[name]
            self._canaries = canaries
        return current

    def canaries(self) -> dict[str, CanaryHook]:
        return self._canaries

    def install(self, model: LoadedModel) -> LoadedModel | None:
        """Make ``model`` serve its name; return the model it replaced."""
        with self._lock:
            old = self._models.get(model.name)
            self._models = {**self._models, model.name: model}
            hook = self._canaries.get(model.name)
        if hook is not None:
            hook.bind_stable(stable_runner(model))
        return old

    def remove(self, name: str) -> LoadedModel | None:
        with self._lock:
            models = dict(self._models)
            old = models.pop(name, None)
            self._models = models
        return old

    def get(self, name: str) -> LoadedModel:
        model = self._models.get(name)
        if model is None:
            raise UnknownModel(
                f"no model named {name!r} is serving here; serving: {sorted(self._models) or 'none'}"
            )
        return model

    def models(self) -> dict[str, LoadedModel]:
        return self._models

    def _capture(self, name: str, version: str, sha256: str, rid: str, feeds: Mapping[str, Any],
                 outputs: Mapping[str, Any]) -> None:
        capture = self.capture
        if capture is not None and capture.sample():
            capture.add(name, version, sha256, rid, feeds, outputs)

    def infer(
        self,
        name: str,
        inputs: Mapping[str, Any],
        *,
        request_id: str | None = None,
        allow_canary: bool = True,
    ) -> InferResult:
        """Run ``name`` on ``inputs`` (input name -> array-like); record telemetry.

        This is the hot path (budget: a few µs above ONNX Runtime at batch 1): arrays that
        already have the model's dtype are passed through untouched, per-model lookups are
        precomputed in :class:`LoadedModel`. A split canary may answer instead of the stable
        (the result names its version) unless ``allow_canary`` is false (a request pinned to
        the stable's version).
        """
        model = self._models.get(name)
        if model is None:
            model = self.get(name)  # raises UnknownModel with the list of served models
        feeds: dict[str, npt.NDArray[Any]] = {}
        try:
            for iname, dtype in model.feed_spec:
                try:
                    value = inputs[iname]
                except KeyError:
                    raise InferenceError(
                        f"model {name} {model.version} expects inputs {list(model.input_names)}, "
                        f"missing {iname!r}"
                    ) from None
                if type(value) is np.ndarray and (dtype is None or value.dtype == dtype):
                    feeds[iname] = value
                else:
                    feeds[iname] = np.asarray(value, dtype=dtype)
        except (TypeError, ValueError) as exc:
            raise InferenceError(f"inputs do not convert to the model's types: {exc}") from exc
        first = feeds[model.input_names[0]] if feeds else None
        hook = self._canaries.get(name)
        if hook is not None and allow_canary and hook.split_pick():
            answer = hook.serve(feeds)
            if answer is not None:  # else the candidate failed: the stable answers this request
                rid = request_id or f"{self._id_prefix}-{next(self._ids):x}"
                if self.capture is not None:  # a prediction the candidate made is traced like any
                    self._capture(name, hook.version, hook.sha256, rid, feeds, answer)
                return InferResult(model=name, version=hook.version, sha256=hook.sha256, request_id=rid,
                                   outputs=answer)
        t0 = time.perf_counter()
        try:
            values = model.run(feeds, None)
        except Exception as exc:
            model.recorder.record(time.perf_counter() - t0, error=True)
            if isinstance(exc, EdgefleetError):
                raise
            raise InferenceError(f"model {name} {model.version} failed: {exc}") from exc
        elapsed = time.perf_counter() - t0
        others = {n: feeds[n] for n in model.input_names[1:]} if len(model.input_names) > 1 else None
        model.recorder.record(elapsed, first, values[0] if values else None, others=others,
                              outputs=values if len(values) > 1 else None)
        rid = request_id or f"{self._id_prefix}-{next(self._ids):x}"
        outputs = dict(zip(model.output_names, values))  # noqa: B905 - ORT returns one per name
        if self.capture is not None:
            self._capture(name, model.version, model.entry.sha256, rid, feeds, outputs)
        if hook is not None:
            hook.observe(feeds, outputs, elapsed * 1000.0)
        return InferResult(
            model=name,
            version=model.entry.version,
            sha256=model.entry.sha256,
            request_id=rid,
            outputs=outputs,
        )
