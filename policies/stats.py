"""Intervals for success rates: every result here is a rate over episodes, reported with
its 95% interval."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np


def wilson_interval(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """The 95% Wilson score interval of a binomial proportion (sound near 0 and 1)."""
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def hierarchical_bootstrap(
    groups: Sequence[Sequence[float]], resamples: int = 10_000, seed: int = 0, level: float = 0.95
) -> dict[str, float]:
    """The mean of ``groups`` (one sequence per seed: per-episode values, or paired
    differences) and its bootstrap interval over seeds and episodes: each resample draws
    the seeds with replacement, then each drawn seed's episodes with replacement. With
    one group it is the plain bootstrap over episodes. Returns ``mean``, ``low``, ``high``."""
    arrays = [np.asarray(g, dtype=float) for g in groups]
    if not arrays or any(a.size == 0 for a in arrays):
        raise ValueError("hierarchical_bootstrap needs at least one group, each with at least one value")
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level}")
    rng = np.random.default_rng(seed)
    pooled = np.concatenate(arrays)
    means = np.empty(resamples)
    picks = rng.integers(len(arrays), size=(resamples, len(arrays)))
    for b in range(resamples):
        total = count = 0.0
        for g in picks[b]:
            values = arrays[g]
            total += values[rng.integers(values.size, size=values.size)].sum()
            count += values.size
        means[b] = total / count
    tail = (1.0 - level) / 2
    low, high = np.quantile(means, [tail, 1.0 - tail])
    return {"mean": float(pooled.mean()), "low": float(low), "high": float(high)}


def format_difference(d: dict[str, Any] | None) -> str:
    """A paired difference (``mean``, ``low``, ``high``, ``significant``) in points with its
    interval, in bold when significant; "-" for none."""
    if d is None:
        return "-"
    text = f"{100 * d['mean']:+.1f} [{100 * d['low']:+.1f}, {100 * d['high']:+.1f}]"
    return f"**{text}**" if d["significant"] else text
