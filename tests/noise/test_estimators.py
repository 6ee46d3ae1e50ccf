"""The two-batch estimators and Fieller's interval against closed forms."""

from __future__ import annotations

import math
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bsfind.noise.estimators import RatioAccumulator, Round, fieller, summarize, t975, two_batch


def test_two_batch_recovers_exact_expectations() -> None:
    # E|G_B|² = |G|² + tr(Σ)/B exactly: plug in expectations, get the truth back.
    g2, trace = 2.5, 40.0
    for b, big in [(1, 64), (8, 64), (3, 1000)]:
        est = two_batch(b, g2 + trace / b, big, g2 + trace / big)
        assert est == pytest.approx((g2, trace), rel=1e-12)


def test_two_batch_rejects_bad_sizes() -> None:
    with pytest.raises(ValueError):
        two_batch(8, 1.0, 8, 1.0)


def test_t_quantiles() -> None:
    assert t975(1) == pytest.approx(12.706)
    assert t975(10) == pytest.approx(2.228)
    assert t975(10_000) == pytest.approx(1.96, abs=1e-3)
    assert t975(0) == math.inf


def test_fieller_bounded_contains_ratio_and_matches_delta_for_tight_den() -> None:
    ci, ok = fieller(10.0, 2.0, 0.04, 1e-8, 0.0, 1.96)
    assert ok and ci.low < 5.0 < ci.high
    # With an exact denominator, Fieller reduces to num ± t·sd(num) over den.
    assert ci.low == pytest.approx((10 - 1.96 * 0.2) / 2, rel=1e-4)
    assert ci.high == pytest.approx((10 + 1.96 * 0.2) / 2, rel=1e-4)


def test_fieller_unresolved_denominator_is_unbounded() -> None:
    ci, ok = fieller(10.0, 0.1, 1.0, 1.0, 0.0, 1.96)
    assert not ok and ci.high == math.inf


def test_ratio_of_sums_not_mean_of_ratios() -> None:
    acc = RatioAccumulator()
    for num, den in [(1.0, 1.0), (3.0, 0.5), (2.0, 1.0), (2.5, 0.9)]:
        acc.add(num, den)
    value, *_ = acc.ratio()
    assert value == pytest.approx(8.5 / 3.4)  # not the mean of 1, 6, 2, 2.78


def _simulated_rounds(rng: random.Random, g: float, trace: float, big: int, n: int) -> list[Round]:
    """Rounds from a scalar Gaussian model: per-example gradients g + N(0, trace)."""
    rounds = []
    for _ in range(n):
        xs = [g + rng.gauss(0.0, math.sqrt(trace)) for _ in range(big)]
        mean = sum(xs) / big
        rounds.append(Round(1, sum(x * x for x in xs) / big, big, mean * mean, big))
    return rounds


def test_identical_gradients_give_zero_trace() -> None:
    rounds = [Round(1, 4.0, 16, 4.0, 16) for _ in range(5)]
    s = summarize(rounds)
    assert s.trace_sigma == 0.0 and s.grad_norm_sq == pytest.approx(4.0)
    assert s.b_simple == 0.0


def test_zero_mean_gradients_are_unresolved_not_huge() -> None:
    rng = random.Random(0)
    s = summarize(_simulated_rounds(rng, 0.0, 1.0, 32, 30))
    assert s.b_simple is None
    assert s.ci95.high == math.inf


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), scale=st.floats(1e-3, 1e3))
def test_invariant_to_round_order_and_gradient_scale(seed: int, scale: float) -> None:
    rng = random.Random(seed)
    rounds = _simulated_rounds(rng, 1.0, 16.0, 32, 12)
    base = summarize(rounds)
    shuffled = rounds[:]
    rng.shuffle(shuffled)
    scaled = [Round(r.b_small, r.sq_small * scale**2, r.b_big, r.sq_big * scale**2, r.examples)
              for r in rounds]
    for other in (summarize(shuffled), summarize(scaled)):
        assert (other.b_simple is None) == (base.b_simple is None)
        if base.b_simple is not None:
            assert other.b_simple == pytest.approx(base.b_simple, rel=1e-9)
            assert other.ci95.low == pytest.approx(base.ci95.low, rel=1e-6, abs=1e-9)
