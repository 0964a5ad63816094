"""The training reference a version is published with, computed from training inputs: quantile
bins per table column, tensor statistics for N-D inputs (images), category frequencies for
string columns, one reference per input for models with several, and per output the class shares
(labels), the top class's probability (probability vectors) or the values (regression). Pure
(numpy): the publish CLI and the hub's tests use it; the device computes the same statistics with
the same :func:`agent.contract.histograms.tensor_stat` and
:func:`agent.contract.histograms.category_histogram`."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import numpy.typing as npt

from edgefleet.agent.contract.histograms import (
    category_counts,
    feature_histogram,
    tensor_stat,
)
from edgefleet.agent.contract.wire import MAX_CATEGORIES, MAX_KNOWN, FeatureReference, Reference

__all__ = ["SATURATED_EDGES", "TOP_CATEGORIES", "channel_axis", "compute_category_reference",
           "compute_inputs_reference", "compute_reference", "compute_tensor_reference", "is_categorical",
           "output_features"]

TOP_CATEGORIES = 20  # categories a string column's reference names; the rest share "other"
KNOWN_CHARS = 64 * 1024  # characters of the further training categories a reference lists, at most


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
    return tuple(_stat_feature(name, data, {"input": input_name, **extra}, bins,
                               SATURATED_EDGES if extra["stat"] == "saturated" else None) for name, extra in specs)


def _stat_feature(name: str, data: npt.NDArray[Any], extra: dict[str, Any], bins: int,
                  edges: tuple[float, ...] | None = None) -> FeatureReference:
    """A tensor feature (``extra["stat"]``, see :func:`agent.contract.histograms.tensor_stat`) of
    ``data``: its values binned on ``edges``, or on quantile bins of them, as the device bins them."""
    probe = FeatureReference(name=name, edges=(0.0, 1.0), freqs=(1.0,), extra=extra)
    values = tensor_stat(data, probe)
    edges = edges if edges is not None else _quantile_bins(values, bins)
    hist = feature_histogram(values, edges)
    total = max(1, sum(hist["counts"]))
    return FeatureReference(name=name, edges=edges, freqs=tuple(round(c / total, 6) for c in hist["counts"]),
                            extra=extra)


def compute_reference(
    data: npt.NDArray[np.float64],
    *,
    bins: int = 10,
    names: list[str] | None = None,
    outputs: npt.NDArray[Any] | Mapping[str, npt.NDArray[Any]] | None = None,
    input_name: str = "input",
) -> Reference:
    """Quantile bins per feature (deduplicated for discrete features) and their frequencies; for
    N-D samples (images) the tensor statistics of :func:`compute_tensor_reference` instead."""
    if data.ndim > 2:
        outs = output_features(outputs, bins=bins)
        return Reference(features=(), tensors=compute_tensor_reference(data, input_name=input_name, bins=bins)
                         + _first(outs), more_outputs=_later(outs),
                         rows=int(data.shape[0]), output=_output_reference(outputs),
                         extra={"first_input": input_name})
    feats = []
    for j in range(data.shape[1]):
        col = data[:, j]
        present = ~np.isnan(col)
        missing = 1.0 - float(present.mean()) if len(col) else 0.0
        col = col[present]
        if not len(col):
            raise ValueError(f"column {names[j] if names else f'f{j}'} has no values, only missing ones")
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
            # training's share of missing values (NaN): live NaN at that share is no drift
            extra={"missing": round(missing, 6), "count": len(col)} if missing else {},
        ))
    outs = output_features(outputs, bins=bins)
    return Reference(features=tuple(feats), rows=int(data.shape[0]), output=_output_reference(outputs),
                     tensors=_first(outs), more_outputs=_later(outs))


def output_features(outputs: npt.NDArray[Any] | Mapping[str, npt.NDArray[Any]] | None, *,
                    bins: int = 10) -> tuple[FeatureReference, ...]:
    """The distribution of every float output: the top class's probability per sample
    (``confidence``) for a probability vector, every value (``value``) for a regression. Scored
    like input features, so drift in what a model answers shows. ``outputs`` is the first output
    (named ``output.confidence`` / ``output.value``, as before several outputs) or every output by
    name in the model's order: the first is named as before, the others ``output.{name}.{stat}``
    with ``extra["output"]`` the output's name, so the device folds the right one."""
    if outputs is None:
        return ()
    items = list(outputs.items()) if isinstance(outputs, Mapping) else [("", outputs)]
    feats: list[FeatureReference] = []
    for i, (oname, value) in enumerate(items):
        out = np.asarray(value)
        if out.dtype.kind != "f" or len(out) < 2:
            continue
        stat = "confidence" if out.ndim == 2 and out.shape[1] > 1 else "value"
        name = f"output.{stat}" if i == 0 else f"output.{oname}.{stat}"
        feats.append(_stat_feature(name, out.astype(np.float64), {"stat": stat, "output": True if i == 0 else oname},
                                   bins))
    return tuple(feats)


def is_categorical(data: npt.NDArray[Any]) -> bool:
    """Strings (or Python objects, as text) rather than numbers: a categorical input."""
    return np.asarray(data).dtype.kind in "OUS"


def compute_category_reference(values: npt.NDArray[Any], *, name: str, input_name: str, column: int,
                               top: int = TOP_CATEGORIES, name_unseen: bool = True) -> FeatureReference:
    """A string column's reference: the ``top`` most frequent training categories by name (ties by
    name), one bin "other" for the rest. The most frequent of the rest are listed in ``known`` (up
    to :data:`~agent.contract.wire.MAX_KNOWN` and :data:`KNOWN_CHARS` characters in all;
    ``complete`` says whether that is all of them) so a device tells a rare training category from
    one training never saw: a column of free text or ids gets an incomplete list, and its unseen
    values count as "other". ``missing`` is training's share of missing values, ``count`` the
    values behind the shares (for the chi-square test). ``name_unseen`` false: devices count
    unseen values without naming them (a column of personal data). Counted with
    :func:`agent.contract.histograms.category_counts`, the device's own counting."""
    if not 1 <= top <= MAX_CATEGORIES:
        raise ValueError(f"top categories must be in 1..{MAX_CATEGORIES}, got {top}")
    tally = category_counts(values)
    missing = tally.pop(None, 0)
    if not tally:
        raise ValueError(f"column {name!r} has no values, only missing ones")
    ranked = sorted(tally, key=lambda k: (-tally[k], str(k)))
    named = [str(k) for k in ranked[:top]]
    known: list[str] = []
    chars = 0
    for k in ranked[top:]:
        if len(known) >= MAX_KNOWN or chars + len(str(k)) > KNOWN_CHARS:
            break
        known.append(str(k))
        chars += len(str(k))
    counted = sum(tally.values())
    extra: dict[str, Any] = {"input": input_name, "column": column, "categories": named, "known": sorted(known),
                             "complete": len(known) == len(ranked) - len(named), "count": counted,
                             "missing": round(missing / (counted + missing), 6)}
    if not name_unseen:
        extra["name_unseen"] = False
    counts = [tally[k] for k in ranked[:top]] + [counted - sum(tally[k] for k in ranked[:top])]
    return FeatureReference(name=name, edges=tuple(float(i) for i in range(len(named) + 2)),
                            freqs=tuple(round(c / counted, 6) for c in counts), extra=extra)


def _output_reference(outputs: npt.NDArray[Any] | Mapping[str, npt.NDArray[Any]] | None) -> dict[str, Any] | None:
    """Class shares of the first output when it holds labels (integers or strings)."""
    if isinstance(outputs, Mapping):
        outputs = next(iter(outputs.values()), None)
    if outputs is None:
        return None
    out = np.asarray(outputs).reshape(-1)
    if out.dtype.kind in "iubUSO":
        labels, counts = np.unique(out, return_counts=True)
        return {"classes": {str(k): round(float(c) / len(out), 6) for k, c in zip(labels, counts, strict=True)}}
    return None


def compute_inputs_reference(inputs: Mapping[str, npt.NDArray[Any]], *, bins: int = 10,
                             outputs: npt.NDArray[Any] | Mapping[str, npt.NDArray[Any]] | None = None,
                             top: int = TOP_CATEGORIES, hide_unseen: frozenset[str] = frozenset()) -> Reference:
    """A reference for a model's inputs by name, each its own: numeric table columns, the tensor
    statistics of N-D inputs, the category frequencies of string columns. A column is named
    ``{input}.f{j}``, or ``{input}`` alone when the input has one column (a model converted from a
    DataFrame has one input per column), and carries ``input`` and ``column`` so the device bins
    the right array. The first input's features are those older agents read. ``hide_unseen``:
    text columns (feature names) whose unseen values devices count without naming them."""
    names = list(inputs)
    features: list[FeatureReference] = []
    tensors: list[FeatureReference] = []
    categories: list[FeatureReference] = []
    for name, data in inputs.items():
        table = data.reshape(-1, 1) if data.ndim == 1 else data
        if is_categorical(table) and table.ndim == 2:
            for j in range(table.shape[1]):
                fname = name if table.shape[1] == 1 else f"{name}.f{j}"
                categories.append(compute_category_reference(table[:, j], name=fname, input_name=name, column=j,
                                                             top=top, name_unseen=fname not in hide_unseen))
            continue
        if table.ndim > 2:
            tensors += compute_tensor_reference(table.astype(np.float64), input_name=name, bins=bins)
            continue
        for f in compute_reference(table.astype(np.float64), bins=bins).features:
            j = int(f.name[1:])
            fname = name if table.shape[1] == 1 else f"{name}.f{j}"
            features.append(FeatureReference(name=fname, edges=f.edges, freqs=f.freqs,
                                             extra={**f.extra, "input": name, "column": j}))
    outs = output_features(outputs, bins=bins)
    return Reference(features=tuple(features), tensors=(*tensors, *_first(outs)), more_outputs=_later(outs),
                     categories=tuple(categories), rows=len(inputs[names[0]]),
                     output=_output_reference(outputs), extra={"first_input": names[0]})


def _first(outs: tuple[FeatureReference, ...]) -> tuple[FeatureReference, ...]:
    return tuple(f for f in outs if f.extra.get("output") is True)


def _later(outs: tuple[FeatureReference, ...]) -> tuple[FeatureReference, ...]:
    return tuple(f for f in outs if f.extra.get("output") is not True)
