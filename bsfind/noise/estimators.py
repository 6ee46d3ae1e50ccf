"""Unbiased gradient-noise-scale estimators (pure math, no torch).

McCandlish et al. 2018, App. A: with G_B the mean gradient of a random batch
of B examples, E|G_B|² = |G|² + tr(Σ)/B. Two batch sizes b < B give unbiased
estimates of both terms:

    |G|²  ≈ (B·|G_B|² − b·|G_b|²) / (B − b)
    tr(Σ) ≈ (|G_b|² − |G_B|²) / (1/b − 1/B)

Their ratio B_simple = tr(Σ)/|G|² is *not* unbiased, so rounds are combined
by summing numerator and denominator separately (ratio of means, never a mean
of ratios). Rounds are weighted by their big-batch size (examples), fixed
before the data are seen, so both weighted sums stay unbiased.

The 95% interval of the ratio is Fieller's (1954): the set of R with
(S̄ − R·Ḡ)² ≤ t²·Var(S̄ − R·Ḡ). It is honest when |G|² is barely resolved —
it becomes unbounded above when Ḡ's own interval reaches 0, which is exactly
"the big batch is too small to see the signal".
"""

from __future__ import annotations

import math
import operator
from collections.abc import Iterable
from dataclasses import dataclass, field

from bsfind.results import Interval

# Two-sided 97.5% Student-t quantiles for df = 1..30 (standard tables); beyond
# 30 an interpolation in 1/df to the normal 1.959964 is accurate to < 1e-3.
_T975 = (
    12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228,
    2.201, 2.179, 2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086,
    2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042,
)
Z975 = 1.959964


def t975(df: int) -> float:
    """Student-t 97.5% quantile (two-sided 95%) for ``df`` degrees of freedom."""
    if df < 1:
        return math.inf
    if df <= 30:
        return _T975[df - 1]
    return Z975 + (_T975[29] - Z975) * 30.0 / df


def two_batch(b_small: float, sq_small: float, b_big: float, sq_big: float) -> tuple[float, float]:
    """Unbiased (|G|², tr(Σ)) from |G_b|² at b and |G_B|² at B (b < B).

    ``sq_small`` may itself be a mean of several small-batch norms.
    """
    if not b_big > b_small > 0:
        raise ValueError(f"need 0 < b_small < b_big, got {b_small}, {b_big}")
    g2 = (b_big * sq_big - b_small * sq_small) / (b_big - b_small)
    trace = (sq_small - sq_big) / (1.0 / b_small - 1.0 / b_big)
    return g2, trace


def fieller(
    num: float, den: float, var_num: float, var_den: float, cov: float, t: float
) -> tuple[Interval, bool]:
    """Fieller's interval for num/den given the means' (co)variances.

    Returns (interval, resolved). ``resolved`` is False when the denominator is
    not significantly above zero; the interval is then unbounded above (its low
    end is still a valid lower bound when one exists).
    """
    t2 = t * t
    a = den * den - t2 * var_den
    b = num * den - t2 * cov
    c = num * num - t2 * var_num
    disc = b * b - a * c
    if a > 0 and den > 0:
        root = math.sqrt(max(disc, 0.0))
        return Interval((b - root) / a, (b + root) / a), True
    # Denominator unresolved: the confidence set is unbounded. When it is the
    # union (-inf, r1] U [r2, inf), r2 = the upper root is a valid lower bound
    # for a positive ratio; otherwise nothing is known.
    if a < 0 and disc >= 0:
        r_hi = max((b - math.sqrt(disc)) / a, (b + math.sqrt(disc)) / a)
        return Interval(max(r_hi, 0.0), math.inf), False
    return Interval(0.0, math.inf), False


@dataclass(frozen=True)
class Round:
    """One round's two-batch measurement."""

    b_small: float
    sq_small: float  # mean |G_b|² over the round's small batches
    b_big: float
    sq_big: float
    examples: int

    @property
    def estimates(self) -> tuple[float, float]:
        return two_batch(self.b_small, self.sq_small, self.b_big, self.sq_big)


@dataclass(frozen=True)
class Summary:
    """Combined estimate over rounds (see module docstring)."""

    b_simple: float | None
    ci95: Interval
    grad_norm_sq: float
    grad_norm_sq_ci95: Interval
    trace_sigma: float
    trace_sigma_ci95: Interval
    rounds: int
    examples: int

    @property
    def rel_half_width(self) -> float:
        if self.b_simple is None or not self.ci95.bounded or self.b_simple <= 0:
            return math.inf
        return (self.ci95.high - self.ci95.low) / 2.0 / self.b_simple

    @property
    def g2_resolved(self) -> bool:
        return self.grad_norm_sq_ci95.low > 0


@dataclass
class RatioAccumulator:
    """Weighted pairs (numerator, denominator) per round -> ratio with Fieller CI.

    Used for B_simple (tr(Σ), |G|²) and B_noise (tr(HΣ), GᵀHG) alike.
    """

    nums: list[float] = field(default_factory=list)
    dens: list[float] = field(default_factory=list)
    weights: list[float] = field(default_factory=list)

    def add(self, num: float, den: float, weight: float = 1.0) -> None:
        if not (math.isfinite(num) and math.isfinite(den)):
            raise ValueError(f"non-finite round estimate ({num}, {den})")
        self.nums.append(num)
        self.dens.append(den)
        self.weights.append(weight)

    def __len__(self) -> int:
        return len(self.nums)

    def moments(self) -> tuple[float, float, float, float, float]:
        """Weighted means and the variance/covariance of those means.

        Var of a weighted mean with weights fixed in advance, estimated from
        the rounds' spread (the ratio-estimator / cluster-sampling formula):
        n/(n-1) · Σ w²(x − x̄)² / (Σw)².
        """
        n = len(self.nums)
        ws, xs, ys = self.weights, self.nums, self.dens
        wsum = sum(ws)
        # map(operator.mul) rather than generator expressions: the tracker summarises
        # its window after every measured step, and this is most of that cost
        mn = sum(map(operator.mul, ws, xs)) / wsum
        md = sum(map(operator.mul, ws, ys)) / wsum
        if n < 2:
            return mn, md, math.inf, math.inf, 0.0
        k = n / (n - 1) / (wsum * wsum)
        dx = [w * (x - mn) for w, x in zip(ws, xs, strict=True)]
        dy = [w * (y - md) for w, y in zip(ws, ys, strict=True)]
        vn = k * sum(map(operator.mul, dx, dx))
        vd = k * sum(map(operator.mul, dy, dy))
        cv = k * sum(map(operator.mul, dx, dy))
        return mn, md, vn, vd, cv

    def ratio(self, moments: tuple[float, float, float, float, float] | None = None
              ) -> tuple[float | None, Interval, Interval, Interval]:
        """(ratio or None, ratio CI, numerator CI, denominator CI); ``moments``: those
        of :meth:`moments`, when the caller has them already."""
        n = len(self.nums)
        if n == 0:
            inf = Interval(-math.inf, math.inf)
            return None, Interval(0.0, math.inf), inf, inf
        mn, md, vn, vd, cv = moments or self.moments()
        t = t975(n - 1)
        if not math.isfinite(vn):
            inf = Interval(-math.inf, math.inf)
            return None, Interval(0.0, math.inf), inf, inf
        num_ci = Interval(mn - t * math.sqrt(vn), mn + t * math.sqrt(vn))
        den_ci = Interval(md - t * math.sqrt(vd), md + t * math.sqrt(vd))
        ci, resolved = fieller(mn, md, vn, vd, cv, t)
        value = mn / md if resolved else None
        if value is not None:  # B_simple >= 0: a negative tr(Σ) estimate reads as 0
            ci = Interval(max(ci.low, 0.0), max(ci.high, 0.0))
        return value, ci, num_ci, den_ci


def summarize(rounds: Iterable[Round]) -> Summary:
    """Combine rounds into B_simple with its interval (ratio of weighted sums)."""
    acc = RatioAccumulator()
    examples = 0
    for r in rounds:
        g2, trace = r.estimates
        acc.add(trace, g2, weight=r.b_big)
        examples += r.examples
    value, ci, trace_ci, g2_ci = acc.ratio()
    mn, md = (acc.moments()[:2]) if len(acc) else (math.nan, math.nan)
    return Summary(
        b_simple=value,
        ci95=ci,
        grad_norm_sq=md,
        grad_norm_sq_ci95=g2_ci,
        trace_sigma=mn,
        trace_sigma_ci95=trace_ci,
        rounds=len(acc),
        examples=examples,
    )
