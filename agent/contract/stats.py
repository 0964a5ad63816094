"""Confidence bounds both sides of the wire decide with: the device's canary guard and the hub's
rollout gates. One definition, so a device and its hub never disagree on what "at 99 %" means."""

from __future__ import annotations

import math

__all__ = ["Z99", "wilson_bounds"]

Z99 = 2.576  # two-sided 99 % (99.5 % one-sided) normal quantile


def wilson_bounds(k: int, n: int, z: float = Z99) -> tuple[float, float]:
    """Wilson score interval of a rate ``k / n`` (``(0, 1)`` when nothing was counted). Unlike the
    normal interval it stays inside [0, 1] and is honest near 0 and 1, where error rates and
    agreements live."""
    if n <= 0:
        return 0.0, 1.0
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)
