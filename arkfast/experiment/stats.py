"""The intervals of the experiment table, in plain Python (no scipy).

* :func:`wilson_interval`: a single evaluation's accuracy, ``k`` right of ``n`` problems (Wilson 1927):
  ``(p + z²/2n ± z·sqrt(p(1-p)/n + z²/4n²)) / (1 + z²/n)`` with ``p = k/n``. Unlike ``p ± z·sqrt(p(1-p)/n)``
  it stays inside [0, 1] and does not collapse to a point at 0% or 100%.
* :func:`t_interval`: the mean of a few numbers (one accuracy per training seed) with Student's t:
  ``mean ± t(0.975, k-1) · s / sqrt(k)``, ``s`` the sample standard deviation (``k - 1`` in the
  denominator). With 3 seeds ``t = 4.303``: three seeds give a wide interval, honestly.
* :func:`paired_interval`: the same for differences ``a_i - b_i`` of paired numbers (method and control
  trained with the same seed ``i``, or the same problem ``i``).
* :func:`normal_interval`: ``mean ± 1.96 · s / sqrt(n)`` over many numbers (per-problem differences).
"""
from __future__ import annotations

import math
from collections.abc import Sequence

__all__ = ["mean_std", "normal_interval", "paired_interval", "t_interval", "t_quantile", "wilson_interval"]

Z95 = 1.959963984540054  # the 0.975 quantile of the standard normal

# t(0.975, df) for df = 1..30 (standard tables); above 30 the Cornish-Fisher expansion below is within
# 1e-3 of the exact value.
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145,
         2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048,
         2.045, 2.042)


def t_quantile(df: int) -> float:
    """The 0.975 quantile of Student's t with ``df`` degrees of freedom (two-sided 95%)."""
    if isinstance(df, bool) or not isinstance(df, int) or df < 1:
        raise ValueError(f"degrees of freedom must be an integer >= 1, got {df!r}")
    if df <= len(_T975):
        return _T975[df - 1]
    z = Z95  # Cornish-Fisher: t ≈ z + (z³ + z)/(4 df) + (5z⁵ + 16z³ + 3z)/(96 df²)
    return z + (z ** 3 + z) / (4 * df) + (5 * z ** 5 + 16 * z ** 3 + 3 * z) / (96 * df ** 2)


def wilson_interval(correct: int, n: int, z: float = Z95) -> tuple[float, float]:
    """The 95% Wilson score interval of ``correct`` successes in ``n`` trials, as fractions."""
    if n <= 0 or not 0 <= correct <= n:
        raise ValueError(f"expected 0 <= correct <= n and n >= 1, got correct={correct}, n={n}")
    p = correct / n
    centre = p + z * z / (2 * n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    scale = 1 + z * z / n
    return max(0.0, (centre - half) / scale), min(1.0, (centre + half) / scale)


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """``(mean, sample standard deviation)``; the deviation of a single value is 0."""
    if not values:
        raise ValueError("no values")
    m = sum(values) / len(values)
    if len(values) == 1:
        return m, 0.0
    return m, math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1))


def t_interval(values: Sequence[float]) -> tuple[float, float] | None:
    """The 95% t interval of the mean of ``values``; ``None`` for fewer than 2 values (no spread to
    measure)."""
    if len(values) < 2:
        return None
    m, s = mean_std(values)
    half = t_quantile(len(values) - 1) * s / math.sqrt(len(values))
    return m - half, m + half


def paired_interval(a: Sequence[float], b: Sequence[float]) -> dict[str, object]:
    """The mean difference ``a_i - b_i`` of paired values, its standard deviation and 95% t interval
    (``None`` with one pair)."""
    if len(a) != len(b) or not a:
        raise ValueError(f"expected two equally long non-empty sequences, got {len(a)} and {len(b)} values")
    diffs = [x - y for x, y in zip(a, b)]
    m, s = mean_std(diffs)
    return {"mean": m, "std": s, "n": len(diffs), "interval": t_interval(diffs)}


def normal_interval(values: Sequence[float]) -> tuple[float, float]:
    """``mean ± 1.96 · s / sqrt(n)``: the normal-approximation 95% interval of a mean of many values."""
    if len(values) < 2:
        raise ValueError(f"expected at least 2 values, got {len(values)}")
    m, s = mean_std(values)
    half = Z95 * s / math.sqrt(len(values))
    return m - half, m + half
