"""Step-time ladder and fit, with a fake clock (no real waiting).

    .venv/bin/python -m pytest tests/hardware/test_timing.py -q
"""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bsfind.errors import BudgetError, HardwareError
from bsfind.hardware import timing
from bsfind.hardware.timing import (
    INTERLEAVED_PASSES,
    SATURATION_MIN_GAIN,
    fit_linear,
    geometric_ladder,
    time_ladder,
)
from bsfind.results import TimingPoint

CPU = torch.device("cpu")
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


class FakeDevice:
    """A clock that only moves when a step runs; a step at B takes ``cost(B)`` seconds."""

    def __init__(self, cost: Callable[[int], float],
                 fail: Callable[[int], BaseException | None] = lambda b: None) -> None:
        self.now = 0.0
        self.cost = cost
        self.fail = fail
        self.steps: list[tuple[int, float]] = []  # (batch, start time)

    def clock(self) -> float:
        return self.now

    def step(self, b: int) -> None:
        self.steps.append((b, self.now))
        exc = self.fail(b)
        if exc is not None:
            raise exc
        self.now += self.cost(b)


# --------------------------------------------------------------------------- fit


@pytest.mark.parametrize("t0, c", [(0.01, 0.002), (0.0, 1e-4), (2.5, 0.0)])
def test_fit_linear_exact(t0: float, c: float) -> None:
    pts = [TimingPoint(b, t0 + c * b, 5) for b in (1, 2, 4, 8, 64)]
    f0, fc, r2 = fit_linear(pts)
    assert f0 == pytest.approx(t0, abs=1e-12)
    assert fc == pytest.approx(c, abs=1e-12)
    assert r2 == pytest.approx(1.0)
    assert fit_linear([(p.batch_size, p.seconds) for p in pts]) == pytest.approx((f0, fc, r2))


def test_fit_linear_weights_relative_errors() -> None:
    # The same 10% error at the largest rung moves t0 less than ordinary least squares would.
    pts = [(1, 0.011), (2, 0.012), (4, 0.014), (8, 0.018), (256, 0.266 * 1.1)]
    t0, c, r2 = fit_linear(pts)
    assert t0 == pytest.approx(0.01, rel=0.05)
    assert 0.9 < r2 < 1.0


def test_fit_linear_clips_negative_intercept() -> None:
    pts = [(2, 0.01), (4, 0.03), (8, 0.07)]  # t = -0.01 + 0.01·B
    t0, c, r2 = fit_linear(pts)
    assert t0 == 0.0
    assert c > 0 and r2 < 1.0


def test_fit_linear_clips_negative_slope() -> None:
    t0, c, r2 = fit_linear([(1, 0.02), (2, 0.019), (4, 0.018)])
    assert c == 0.0 and t0 == pytest.approx(0.019, rel=0.01)


def test_fit_linear_degenerate() -> None:
    t0, c, r2 = fit_linear([TimingPoint(8, 0.4, 3)])
    assert (t0, c) == (0.0, pytest.approx(0.05)) and math.isnan(r2)
    with pytest.raises(ValueError):
        fit_linear([])


# --------------------------------------------------------------------------- ladder


def test_geometric_ladder() -> None:
    assert geometric_ladder(1, 64) == [1, 2, 4, 8, 16, 32, 64]
    assert geometric_ladder(1, 100) == [1, 2, 4, 8, 16, 32, 64, 100]  # max batch timed
    assert geometric_ladder(1, 70) == [1, 2, 4, 8, 16, 32, 64]  # 70 too close to 64
    assert geometric_ladder(8, 8) == [8]
    assert geometric_ladder(3, 100, factor=4) == [3, 12, 48, 100]  # 100/48 >= √4
    assert geometric_ladder(3, 90, factor=4) == [3, 12, 48]
    assert geometric_ladder(1, 5, factor=1.5) == [1, 2, 3, 5]
    with pytest.raises(ValueError):
        geometric_ladder(0, 10)
    with pytest.raises(ValueError):
        geometric_ladder(4, 2)
    with pytest.raises(ValueError):
        geometric_ladder(1, 10, factor=1)


def test_stops_at_saturation() -> None:
    # t(B) = max(1, B/8) s: throughput grows until B = 8, then stays at 8 examples/s.
    dev = FakeDevice(lambda b: max(1.0, b / 8))
    curve = time_ladder(dev.step, [1, 2, 4, 8, 16, 32, 64], device=CPU, warmup=2, repeats=5,
                        max_seconds=1e6, max_batch=None, clock=dev.clock)
    # Two rungs without a throughput gain (16 and 32) end the ladder.
    assert [p.batch_size for p in curve.points] == [1, 2, 4, 8, 16, 32]
    assert [p.seconds for p in curve.points] == [1.0, 1.0, 1.0, 1.0, 2.0, 4.0]
    # 5 timed steps per rung, then INTERLEAVED_PASSES more, one per rung per pass,
    # and the medians are taken over the interleaved samples alone.
    assert all(p.samples == INTERLEAVED_PASSES for p in curve.points)
    assert curve.saturated_at == 8
    assert 64 not in {b for b, _ in dev.steps}
    # warm-up steps are run but not timed
    assert len(dev.steps) == 6 * (2 + 5 + INTERLEAVED_PASSES)
    assert curve.source == "measured"
    assert curve.utilization_gpu_pct is None


def test_linear_regime_runs_the_whole_ladder_and_fits() -> None:
    dev = FakeDevice(lambda b: 0.05 + 0.001 * b)
    curve = time_ladder(dev.step, geometric_ladder(1, 32), device=CPU, max_seconds=1e6,
                        max_batch=None, clock=dev.clock, sample_util=lambda: 75.0)
    assert [p.batch_size for p in curve.points] == [1, 2, 4, 8, 16, 32]
    assert curve.saturated_at is None
    assert curve.t0 == pytest.approx(0.05) and curve.per_example == pytest.approx(0.001)
    assert curve.r2 == pytest.approx(1.0)
    assert curve.utilization_gpu_pct == 75.0
    assert curve.seconds(100) == pytest.approx(0.15)


@pytest.mark.parametrize("excess, saturated", [(-0.03, True), (0.01, False)])
def test_saturation_threshold_is_relative(excess: float, saturated: bool) -> None:
    # Each doubling past 8 gains 2% (two of them stay under 5%: saturated) or 6% (not).
    gain = 1 + SATURATION_MIN_GAIN + excess
    dev = FakeDevice(lambda b: 1.0 if b <= 8 else (b / 8) / gain ** math.log2(b / 8))
    curve = time_ladder(dev.step, [8, 16, 32, 64], device=CPU, max_seconds=1e6,
                        max_batch=None, clock=dev.clock)
    if saturated:
        assert curve.saturated_at == 8 and len(curve.points) == 3
    else:
        assert curve.saturated_at is None and len(curve.points) == 4


def test_one_slow_rung_does_not_end_the_ladder() -> None:
    # A burst of load makes rung 4 look slow; the rungs after it still gain.
    dev = FakeDevice(lambda b: 3.0 if b == 4 else 1.0 + b / 64)
    curve = time_ladder(dev.step, [1, 2, 4, 8, 16], device=CPU, max_seconds=1e6,
                        max_batch=None, clock=dev.clock)
    assert [p.batch_size for p in curve.points] == [1, 2, 4, 8, 16]


def test_stops_at_budget() -> None:
    dev = FakeDevice(lambda b: 1.0 + 0.1 * b)
    max_seconds = 20.0
    curve = time_ladder(dev.step, [1, 2, 4, 8, 16], device=CPU, warmup=2, repeats=5,
                        max_seconds=max_seconds, max_batch=None, clock=dev.clock)
    # every step began before the deadline, so the overrun is at most one step
    assert all(start < max_seconds for _, start in dev.steps)
    longest = max(dev.cost(b) for b, _ in dev.steps)
    assert dev.now <= max_seconds + longest
    # rungs 1 and 2 cost 7·1.1 + 7·1.2 = 16.1 s; rung 4's two warm-ups end at 18.9 s,
    # its first timed step at 20.3 s: the budget is spent, and that one sample is kept
    assert [(p.batch_size, p.samples) for p in curve.points] == [(1, 5), (2, 5), (4, 1)]
    assert dev.now == pytest.approx(20.3)
    assert curve.saturated_at is None
    assert {b for b, _ in dev.steps} == {1, 2, 4}


def test_budget_spent_before_any_step() -> None:
    dev = FakeDevice(lambda b: 1.0)
    with pytest.raises(BudgetError):
        time_ladder(dev.step, [1, 2], device=CPU, max_seconds=0.0, max_batch=None,
                    clock=dev.clock)
    assert dev.steps == []


def test_oom_mid_ladder_keeps_previous_rungs(monkeypatch: pytest.MonkeyPatch) -> None:
    cleared: list[torch.device | None] = []
    monkeypatch.setattr(timing, "clear_cache", cleared.append)
    dev = FakeDevice(
        lambda b: 0.1 + 0.01 * b,
        fail=lambda b: RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
        if b >= 16 else None,
    )
    curve = time_ladder(dev.step, [2, 4, 8, 16, 32], device=CPU, max_seconds=1e6,
                        max_batch=None, clock=dev.clock)
    assert [p.batch_size for p in curve.points] == [2, 4, 8]
    assert curve.saturated_at is None
    assert cleared == [CPU]  # the cache is cleared once, after the failed rung
    assert 32 not in {b for b, _ in dev.steps}


def test_oom_at_first_rung() -> None:
    dev = FakeDevice(lambda b: 1.0, fail=lambda b: torch.cuda.OutOfMemoryError("out of memory"))
    with pytest.raises(HardwareError, match="smallest rung"):
        time_ladder(dev.step, [64, 128], device=CPU, max_seconds=1e6, max_batch=None,
                    clock=dev.clock)


def test_non_oom_error_propagates() -> None:
    dev = FakeDevice(lambda b: 1.0, fail=lambda b: ValueError("shape") if b == 4 else None)
    with pytest.raises(ValueError, match="shape"):
        time_ladder(dev.step, [2, 4, 8], device=CPU, max_seconds=1e6, max_batch=None,
                    clock=dev.clock)


def test_max_batch_and_order() -> None:
    dev = FakeDevice(lambda b: 0.5 + 0.01 * b)
    curve = time_ladder(dev.step, [32, 8, 16, 8, 64, 128], device=CPU, max_seconds=1e6,
                        max_batch=40, clock=dev.clock, warmup=0, repeats=1)
    assert [p.batch_size for p in curve.points] == [8, 16, 32]
    with pytest.raises(HardwareError, match="fits in memory"):
        time_ladder(dev.step, [64], device=CPU, max_seconds=1.0, max_batch=8, clock=dev.clock)
    with pytest.raises(ValueError):
        time_ladder(dev.step, [0], device=CPU, max_seconds=1.0, max_batch=8, clock=dev.clock)


def test_real_clock_on_cpu() -> None:
    model = nn.Linear(16, 4)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)

    def step(b: int) -> None:
        opt.zero_grad()
        F.mse_loss(model(torch.randn(b, 16)), torch.randn(b, 4)).backward()
        opt.step()

    curve = time_ladder(step, [4, 8, 16], device=CPU, warmup=1, repeats=3, max_seconds=5.0,
                        max_batch=None)
    assert curve.points and all(p.seconds > 0 for p in curve.points)
    assert curve.t0 >= 0 and curve.per_example >= 0


@pytest.mark.cuda
@cuda
def test_cuda_synchronized_timing() -> None:
    device = torch.device("cuda", 0)
    model = nn.Sequential(nn.Linear(1024, 4096), nn.ReLU(), nn.Linear(4096, 1024)).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)

    def step(b: int) -> None:
        x = torch.randn(b, 1024, device=device)
        opt.zero_grad(set_to_none=True)
        model(x).square().mean().backward()
        opt.step()

    curve = time_ladder(step, geometric_ladder(64, 4096), device=device, max_seconds=30.0,
                        max_batch=None)
    assert len(curve.points) >= 2
    # synchronised: a step at the largest rung takes longer than one at the smallest
    assert curve.points[-1].seconds > curve.points[0].seconds
    assert curve.per_example > 0
