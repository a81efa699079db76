"""The statistics of a multi-seed result, without scipy: mean, sample standard deviation, Student
t quantiles (computed exactly from the t distribution's closed-form CDF for an integer number of
degrees of freedom) and the t confidence interval of a mean (used for the paired difference
between DTL's fused head and the best baseline over seeds)."""
from __future__ import annotations

import math


def mean(values) -> float:
    """The arithmetic mean of a non-empty sequence of numbers."""
    values = list(values)
    if not values:
        raise ValueError("mean of no values")
    return math.fsum(values) / len(values)


def sample_std(values) -> float | None:
    """The sample standard deviation (divisor n - 1); None for fewer than two values."""
    values = list(values)
    if len(values) < 2:
        return None
    m = mean(values)
    return math.sqrt(math.fsum((v - m) ** 2 for v in values) / (len(values) - 1))


def t_cdf(t: float, dof: int) -> float:
    """P(T <= t) for Student's t with `dof` (an integer >= 1) degrees of freedom.

    Exact closed form (Abramowitz & Stegun 26.7.3 / 26.7.4): with theta = atan(t / sqrt(dof)),
    A = P(|T| <= |t|) is, for odd dof, (2/pi) (theta + sin(theta) (cos(theta) + 2/3 cos^3 +
    (2*4)/(3*5) cos^5 + ... up to cos^(dof-2))) (just 2 theta / pi for dof = 1), and for even
    dof sin(theta) (1 + 1/2 cos^2 + (1*3)/(2*4) cos^4 + ... up to cos^(dof-2)). The sums have
    dof / 2 terms, so this is exact up to float rounding for any dof."""
    if isinstance(dof, bool) or not isinstance(dof, int) or dof < 1:
        raise ValueError(f"t_cdf: dof must be an integer >= 1, got {dof!r}")
    if math.isnan(t):
        return math.nan
    if math.isinf(t):
        return 1.0 if t > 0 else 0.0
    theta = math.atan(abs(t) / math.sqrt(dof))
    s, c = math.sin(theta), math.cos(theta)
    c2 = c * c
    if dof % 2:
        total, term = 0.0, c  # the terms cos(theta) * prod_{j} (2j)/(2j+1) * cos^2
        for k in range(1, (dof - 1) // 2 + 1):
            total += term
            term *= c2 * (2 * k) / (2 * k + 1)
        a = 2.0 / math.pi * (theta + s * total) if dof > 1 else 2.0 * theta / math.pi
    else:
        total, term = 0.0, 1.0  # 1, 1/2 cos^2, (1*3)/(2*4) cos^4, ...
        for k in range(1, dof // 2 + 1):
            total += term
            term *= c2 * (2 * k - 1) / (2 * k)
        a = s * total
    a = min(max(a, 0.0), 1.0)
    return 0.5 + 0.5 * a if t >= 0 else 0.5 - 0.5 * a


def t_quantile(p: float, dof: int) -> float:
    """The t with P(T <= t) = p for Student's t with `dof` (integer >= 1) degrees of freedom,
    0 < p < 1: bisection on t_cdf to float precision (about 1e-12 relative)."""
    if isinstance(dof, bool) or not isinstance(dof, int) or dof < 1:
        raise ValueError(f"t_quantile: dof must be an integer >= 1, got {dof!r}")
    if not 0.0 < p < 1.0:
        raise ValueError(f"t_quantile: p must be in (0, 1), got {p!r}")
    if p == 0.5:
        return 0.0
    if p < 0.5:
        return -t_quantile(1.0 - p, dof)
    lo, hi = 0.0, 1.0
    while t_cdf(hi, dof) < p:  # the 0.9995 quantile at dof 1 is ~637: a few doublings
        lo, hi = hi, hi * 2.0
        if hi > 1e300:
            return math.inf
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if mid in (lo, hi):
            break
        if t_cdf(mid, dof) < p:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


def mean_interval(values, confidence: float = 0.95) -> dict:
    """The Student t interval of the mean of `values` (independent samples, e.g. per-seed paired
    differences): {"n", "mean", "std", "half_width", "low", "high", "t", "dof", "confidence"}.
    With fewer than two values std, t, half_width, low and high are None (an interval needs an
    estimate of the spread)."""
    values = [float(v) for v in values]
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"mean_interval: confidence must be in (0, 1), got {confidence!r}")
    n = len(values)
    m = mean(values)
    sd = sample_std(values)
    out = {"n": n, "mean": m, "std": sd, "confidence": confidence, "dof": n - 1 if n >= 2 else None,
           "t": None, "half_width": None, "low": None, "high": None}
    if sd is not None:
        t = t_quantile(0.5 + confidence / 2.0, n - 1)
        half = t * sd / math.sqrt(n)
        out.update(t=t, half_width=half, low=m - half, high=m + half)
    return out
