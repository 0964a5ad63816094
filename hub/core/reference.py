"""The training reference a version is published with, computed from training inputs: quantile
bins per table column, tensor statistics for N-D inputs (images), one reference per input for
models with several, and the output class shares. Pure (numpy): the publish CLI and the hub's
tests use it; the device computes the same statistics with the same :func:`agent.contract.histograms.tensor_stat`."""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt

from edgefleet.agent.contract.histograms import feature_histogram, tensor_stat
from edgefleet.agent.contract.wire import FeatureReference, Reference

__all__ = ["SATURATED_EDGES", "channel_axis", "compute_inputs_reference", "compute_reference",
           "compute_tensor_reference", "output_features"]


SATURATED_EDGES = (0.0, 0.001, 0.01, 0.05, 0.2, 1.0)  # share of a sample's values at the range's ends


def _quantile_bins(values: npt.NDArray[np.float64], bins: int) -> tuple[float, ...]:
    v = values[~np.isnan(values)]
    edges = np.unique(np.quantile(v, np.linspace(0, 1, bins + 1)))
    if len(edges) < 2:
        edges = np.array([edges[0] - 0.5, edges[0] + 0.5])
    return tuple(float(e) for e in edges)


def channel_axis(shape: tuple[int, ...]) -> int:
    """Where the channels are in samples of ``shape`` (batch first): 1 for ``[N, C, ...]`` (ONNX's
    usual NCHW), -1 for ``[N, H, W, C]`` with 1, 3 or 4 channels last and not first."""
    if len(shape) >= 4 and shape[1] not in (1, 3, 4) and shape[-1] in (1, 3, 4):
        return -1
    return 1


def compute_tensor_reference(data: npt.NDArray[np.float64], *, input_name: str, bins: int = 10) -> tuple[
        FeatureReference, ...]:
    """The reference of an N-D input (``[N, ...]``): per channel the histogram of its values, and
    per sample its mean, standard deviation and share of saturated values (at or beyond the
    training range), each binned like a table column. The same statistics the device computes
    (:func:`agent.contract.histograms.tensor_stat`), so the hub compares like with like."""
    axis = channel_axis(data.shape)
    channels = data.shape[axis]
    lo, hi = float(np.nanmin(data)), float(np.nanmax(data))
    specs: list[tuple[str, dict[str, Any]]] = [
        (f"{input_name}[c{k}]", {"stat": "channel", "channel": k, "axis": axis}) for k in range(min(channels, 16))]
    specs += [(f"{input_name}.{stat}", {"stat": stat}) for stat in ("mean", "std")]
    specs.append((f"{input_name}.saturated", {"stat": "saturated", "lo": lo, "hi": hi}))
    out = []
    for name, extra in specs:
        probe = FeatureReference(name=name, edges=(0.0, 1.0), freqs=(1.0,), extra={"input": input_name, **extra})
        values = tensor_stat(data, probe)
        edges = SATURATED_EDGES if extra["stat"] == "saturated" else _quantile_bins(values, bins)
        hist = feature_histogram(values, edges)
        total = max(1, sum(hist["counts"]))
        out.append(FeatureReference(name=name, edges=edges, freqs=tuple(round(c / total, 6) for c in hist["counts"]),
                                    extra=probe.extra))
    return tuple(out)


def compute_reference(
    data: npt.NDArray[np.float64],
    *,
    bins: int = 10,
    names: list[str] | None = None,
    outputs: npt.NDArray[Any] | None = None,
    input_name: str = "input",
) -> Reference:
    """Quantile bins per feature (deduplicated for discrete features) and their frequencies; for
    N-D samples (images) the tensor statistics of :func:`compute_tensor_reference` instead."""
    if data.ndim > 2:
        return Reference(features=(), tensors=compute_tensor_reference(data, input_name=input_name, bins=bins)
                         + output_features(outputs, bins=bins),
                         rows=int(data.shape[0]), output=_output_reference(outputs),
                         extra={"first_input": input_name})
    feats = []
    for j in range(data.shape[1]):
        col = data[:, j]
        col = col[~np.isnan(col)]
        edges = np.unique(np.quantile(col, np.linspace(0, 1, bins + 1)))
        if len(edges) < 2:
            edges = np.array([edges[0] - 0.5, edges[0] + 0.5])
        idx = np.clip(np.searchsorted(edges, col, side="right") - 1, 0, len(edges) - 2)
        counts = np.bincount(idx, minlength=len(edges) - 1)
        freqs = counts / max(1, counts.sum())
        feats.append(FeatureReference(
            name=names[j] if names else f"f{j}",
            edges=tuple(float(e) for e in edges),
            freqs=tuple(round(float(f), 6) for f in freqs),
        ))
    return Reference(features=tuple(feats), rows=int(data.shape[0]), output=_output_reference(outputs),
                     tensors=output_features(outputs, bins=bins))


def output_features(outputs: npt.NDArray[Any] | None, *, bins: int = 10) -> tuple[FeatureReference, ...]:
    """The first output's distribution when it is not class labels: the top class's probability
    per sample (``output.confidence``) for a probability vector, every value (``output.value``)
    for a regression. Scored like input features, so drift in what a model answers shows."""
    if outputs is None:
        return ()
    out = np.asarray(outputs)
    if out.dtype.kind != "f" or len(out) < 2:
        return ()
    stat = "confidence" if out.ndim == 2 and out.shape[1] > 1 else "value"
    probe = FeatureReference(name=f"output.{stat}", edges=(0.0, 1.0), freqs=(1.0,), extra={"stat": stat, "output": True})
    values = tensor_stat(out.astype(np.float64), probe)
    edges = _quantile_bins(values, bins)
    hist = feature_histogram(values, edges)
    total = max(1, sum(hist["counts"]))
    return (FeatureReference(name=probe.name, edges=edges, freqs=tuple(round(c / total, 6) for c in hist["counts"]),
                             extra=probe.extra),)


def _output_reference(outputs: npt.NDArray[Any] | None) -> dict[str, Any] | None:
    if outputs is None:
        return None
    out = np.asarray(outputs).reshape(-1)
    if out.dtype.kind in "iub":
        labels, counts = np.unique(out, return_counts=True)
        return {"classes": {str(k): round(float(c) / len(out), 6) for k, c in zip(labels, counts, strict=True)}}
    return None


def compute_inputs_reference(inputs: dict[str, npt.NDArray[np.float64]], *, bins: int = 10,
                             outputs: npt.NDArray[Any] | None = None) -> Reference:
    """A reference for several inputs, each its own: table columns named ``{input}.f{j}`` (with
    ``input`` and ``column`` so the device bins the right array) and the tensor statistics of
    N-D ones. The first input's features are those older agents read."""
    names = list(inputs)
    features: list[FeatureReference] = []
    tensors: list[FeatureReference] = []
    for name, data in inputs.items():
        if data.ndim > 2:
            tensors += compute_tensor_reference(data, input_name=name, bins=bins)
            continue
        for f in compute_reference(data, bins=bins).features:
            j = int(f.name[1:])
            features.append(FeatureReference(name=f"{name}.f{j}", edges=f.edges, freqs=f.freqs,
                                             extra={"input": name, "column": j}))
    return Reference(features=tuple(features), tensors=(*tensors, *output_features(outputs, bins=bins)),
                     rows=len(inputs[names[0]]),
                     output=_output_reference(outputs), extra={"first_input": names[0]})
