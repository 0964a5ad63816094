"""How both sides of the wire bin values: a feature's histogram on reference bins, and the
statistic a tensor feature measures. The device folds its windows with these
(:mod:`agent.core.telemetry`) and the publisher computes the training reference with them
(:mod:`hub.core.reference`), so the hub always compares like with like."""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from typing import Any

import numpy as np
import numpy.typing as npt

from edgefleet.agent.contract.wire import FeatureReference

__all__ = ["CATEGORY_CHARS", "TENSOR_VALUES", "UNSEEN_CHARS", "UNSEEN_NAMES", "category_counts",
           "category_histogram", "category_text", "feature_histogram", "tensor_stat"]

TENSOR_VALUES = 1 << 18  # values per channel histogram, at most (a stride through the samples)
UNSEEN_NAMES = 8  # unseen categories a histogram names (the most frequent), at most
UNSEEN_CHARS = 64  # characters of an unseen category kept in its name
CATEGORY_CHARS = 256  # characters of a category both sides compare (a longer text is cut: free text, not a category)


def feature_histogram(values: npt.NDArray[Any], edges: tuple[float, ...]) -> dict[str, Any]:
    """Counts of ``values`` on the bins ``[e0,e1), ..., [e_{n-1}, e_n]`` plus out-of-range and NaN."""
    v = np.asarray(values, dtype=np.float64)
    nan = np.isnan(v)
    v = v[~nan]
    e = np.asarray(edges, dtype=np.float64)
    below = int(np.count_nonzero(v < e[0]))
    above = int(np.count_nonzero(v > e[-1]))
    inside = v[(v >= e[0]) & (v <= e[-1])]
    idx = np.searchsorted(e, inside, side="right") - 1
    idx = np.clip(idx, 0, len(e) - 2)
    counts = np.bincount(idx, minlength=len(e) - 1)
    return {
        "counts": [int(c) for c in counts],
        "below": below,
        "above": above,
        "nan": int(np.count_nonzero(nan)),
    }


def tensor_stat(x: npt.NDArray[Any], feat: FeatureReference) -> npt.NDArray[np.float64]:
    """The values a tensor feature bins, from samples ``x`` (``[N, ...]``, one sample per row):

    * ``channel``: every value of channel ``channel`` on axis ``axis`` (1: NCHW, -1: NHWC), strided
      down to :data:`TENSOR_VALUES`;
    * ``mean`` / ``std``: each sample's mean and standard deviation over all its values;
    * ``saturated``: each sample's share of values at or beyond the reference's range
      (``lo``/``hi``: the smallest and largest training values), i.e. clipped or blown-out pixels;
    * ``confidence`` / ``value`` (on the model's first output): each sample's top-class probability,
      or every regression value.

    Cheap on purpose (a few passes over at most ``agent.core.telemetry.TENSOR_SAMPLES`` samples a
    window) and the same on the device and at publish (:func:`hub.core.reference.compute_tensor_reference`)."""
    x = np.asarray(x, dtype=np.float64)
    stat = feat.extra.get("stat")
    out: npt.NDArray[np.float64]
    if stat == "channel":
        axis = int(feat.extra.get("axis", 1))
        v = np.take(x, int(feat.extra["channel"]), axis=axis).reshape(-1)
        out = v[:: max(1, -(-len(v) // TENSOR_VALUES))]  # a stride that keeps at most TENSOR_VALUES
        return out
    flat = x.reshape(len(x), -1)
    if stat == "mean":
        out = flat.mean(axis=1)
        return out
    if stat == "std":
        out = flat.std(axis=1)
        return out
    if stat == "confidence":  # an output of class probabilities: the top class's
        out = x.reshape(len(x), -1).max(axis=1)
        return out
    if stat == "value":  # a regression output: every value
        out = x.reshape(-1)
        return out
    if stat == "saturated":
        lo, hi = float(feat.extra.get("lo", 0.0)), float(feat.extra.get("hi", 1.0))
        out = ((flat <= lo) | (flat >= hi)).mean(axis=1)
        return out
    raise ValueError(f"unknown tensor statistic {stat!r}")


def category_text(value: Any) -> str | None:
    """A categorical value as the text both sides compare: ``str`` as it is, ``bytes`` decoded as
    UTF-8 (OIP v2 ``BYTES``), numbers through ``str``, cut to :data:`CATEGORY_CHARS`; ``None``,
    ``""`` and NaN are missing."""
    if value is None:
        return None
    if isinstance(value, bytes | np.bytes_):
        value = bytes(value).decode("utf-8", "replace")
    elif isinstance(value, float | np.floating) and value != value:  # NaN  # noqa: PLR0124
        return None
    text = str(value)[:CATEGORY_CHARS]
    return text or None


def category_counts(values: npt.NDArray[Any]) -> dict[str | None, int]:
    """How often each category text (:func:`category_text`; ``None``: missing) occurs in
    ``values``: what the device's windows and the publisher's reference both count with. Counts
    distinct values first (a ``Counter``, hashing in C: ~9x ``np.unique``'s sort of Python
    strings), then turns each distinct value into its text once."""
    flat = np.asarray(values, dtype=object).reshape(-1).tolist()
    try:
        tally: Mapping[Any, int] = Counter(flat)
    except TypeError:  # an unhashable value (a list in an object array): text first, then count
        tally = Counter(category_text(v) for v in flat)
    out: dict[str | None, int] = {}
    for v, c in tally.items():
        text = category_text(v)
        out[text] = out.get(text, 0) + int(c)
    return out


def category_histogram(values: npt.NDArray[Any], feat: FeatureReference) -> dict[str, Any]:
    """Counts of categorical ``values`` on a category feature's bins: one per named training
    category (``extra["categories"]``), then "other" for the remaining training categories
    (``extra["known"]``). A value training never saw lands in no bin but in ``above``, and the
    :data:`UNSEEN_NAMES` most frequent of them are named in ``unseen`` (text cut to
    :data:`UNSEEN_CHARS`); missing values count in ``nan``. When the reference could not list every
    training category (``extra["complete"]`` false) an unlisted value counts as "other": it may be
    one of those. With ``extra["name_unseen"]`` false (a column whose values are personal data)
    unseen values are counted, never named. Counted with :func:`category_counts`, so the Python
    work grows with the categories a window holds, not with its rows."""
    names: list[str] = list(feat.extra.get("categories") or [])
    index = {c: i for i, c in enumerate(names)}
    known = set(feat.extra.get("known") or ())
    complete = bool(feat.extra.get("complete", True))
    name_unseen = bool(feat.extra.get("name_unseen", True))
    counts = [0] * (len(names) + 1)
    missing = unseen = 0
    new: dict[str, int] = {}
    for text, c in category_counts(values).items():
        if text is None:
            missing += c
        elif text in index:
            counts[index[text]] += c
        elif text in known or not complete:
            counts[-1] += c
        else:
            unseen += c
            if name_unseen:
                new[text[:UNSEEN_CHARS]] = new.get(text[:UNSEEN_CHARS], 0) + c
    out: dict[str, Any] = {"counts": counts, "below": 0, "above": unseen, "nan": missing}
    if new:
        top = sorted(new.items(), key=lambda kv: (-kv[1], kv[0]))[:UNSEEN_NAMES]
        out["unseen"] = dict(top)
    return out
