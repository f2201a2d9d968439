"""Summary statistics over seeds: mean, sample standard deviation, t confidence intervals."""

import math
from dataclasses import dataclass

from scipy import stats


@dataclass(frozen=True)
class Summary:
    n: int
    mean: float
    std: float | None  # sample standard deviation (ddof=1); None for a single run


def summarize(values) -> Summary:
    values = [float(v) for v in values]
    if not values:
        raise ValueError("no values to summarize")
    n = len(values)
    mean = math.fsum(values) / n
    std = math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else None
    return Summary(n, mean, std)


# Why an interval could not be estimated (Interval.undetermined).
TOO_FEW_RUNS = "n < 2"
NO_SPREAD = "no spread"  # every run identical: a sample standard deviation of 0 is not a known 0


@dataclass(frozen=True)
class Interval:
    estimate: float
    low: float | None   # None when no interval can be estimated; `undetermined` says why
    high: float | None
    df: float | None
    undetermined: str | None = None  # TOO_FEW_RUNS or NO_SPREAD when low/high are None

    @property
    def excludes_zero(self) -> bool | None:
        if self.low is None:
            return None
        return self.low > 0 or self.high < 0


def mean_minus_constant(values, constant: float, confidence: float = 0.95) -> Interval:
    """Student t interval of mean(values) - constant (e.g. ours minus the paper's number).

    Undetermined with fewer than 2 runs, or when every run is identical (no estimate of the spread)."""
    s = summarize(values)
    estimate = s.mean - constant
    if s.n < 2:
        return Interval(estimate, None, None, None, TOO_FEW_RUNS)
    if s.std == 0.0:
        return Interval(estimate, None, None, None, NO_SPREAD)
    half = float(stats.t.ppf(0.5 + confidence / 2, s.n - 1)) * s.std / math.sqrt(s.n)
    return Interval(estimate, estimate - half, estimate + half, float(s.n - 1))


def welch_difference(treatment, baseline, confidence: float = 0.95) -> Interval:
    """Welch's t interval of mean(treatment) - mean(baseline), unequal variances.

    Undetermined with fewer than 2 runs in a group, or when every run of both groups is identical:
    zero observed spread says nothing about seed noise, so no difference is called distinguishable.
    """
    a, b = summarize(treatment), summarize(baseline)
    estimate = a.mean - b.mean
    if a.n < 2 or b.n < 2:
        return Interval(estimate, None, None, None, TOO_FEW_RUNS)
    va, vb = a.std ** 2 / a.n, b.std ** 2 / b.n
    se = math.sqrt(va + vb)
    if se == 0.0:
        return Interval(estimate, None, None, None, NO_SPREAD)
    df = (va + vb) ** 2 / (va ** 2 / (a.n - 1) + vb ** 2 / (b.n - 1))
    half = float(stats.t.ppf(0.5 + confidence / 2, df)) * se
    return Interval(estimate, estimate - half, estimate + half, df)
