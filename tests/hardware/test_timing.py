"""Step-time ladder and fit, with a fake clock (no real waiting).

    .venv/bin/python -m pytest tests/hardware/test_timing.py -q
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bsfind.errors import BudgetError, HardwareError
from bsfind.hardware import timing
from bsfind.hardware.timing import (
    MIN_PASSES,
    SATURATION_MIN_GAIN,
    SATURATION_RUNGS,
    fit_linear,
    geometric_ladder,
    time_ladder,
)
from bsfind.results import TimingCurve, TimingPoint

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
    curve = time_ladder(dev.step, [1, 2, 4, 8, 16, 32, 64, 128], device=CPU, warmup=2,
                        repeats=3, max_seconds=1e6, max_batch=None, clock=dev.clock)
    # SATURATION_RUNGS (3) rungs without a throughput gain (16, 32, 64) end the climb.
    assert SATURATION_RUNGS == 3
    assert [p.batch_size for p in curve.points] == [1, 2, 4, 8, 16, 32, 64]
    assert [p.seconds for p in curve.points] == [1.0, 1.0, 1.0, 1.0, 2.0, 4.0, 8.0]
    assert curve.saturated_at == 8
    assert 128 not in {b for b, _ in dev.steps}
    # A flat-then-linear curve is no line (R² 0.81): it is re-measured once more, then
    # the curve says so and past the last rung time grows in proportion to B.
    assert curve.quality == "points" and curve.r2 < 0.9  # clean, but no line
    assert curve.seconds(128) == pytest.approx(16.0) and curve.seconds(6) == pytest.approx(1.0)
    assert curve.seconds(128, upper=True) == pytest.approx(16.0)  # no load: no uncertainty
    # 3 timed steps per rung in the climb, then MIN_PASSES interleaved passes (the times
    # were stable from the first), one step per rung per pass, twice; warm-ups untimed.
    assert curve.passes == 2 * MIN_PASSES
    assert all(p.samples == 3 + 2 * MIN_PASSES for p in curve.points)
    assert len(dev.steps) == 7 * (2 + 3 + 2 * MIN_PASSES)
    assert curve.source == "measured" and curve.utilization_gpu_pct is None


def test_saturation_is_never_called_below_the_floor() -> None:
    # The same device, but the baseline's floor (min_top) is 128: the climb goes on.
    dev = FakeDevice(lambda b: max(1.0, b / 8))
    curve = time_ladder(dev.step, [1, 2, 4, 8, 16, 32, 64, 128, 256], device=CPU,
                        max_seconds=1e6, max_batch=None, clock=dev.clock, min_top=128)
    assert [p.batch_size for p in curve.points][-1] == 128
    assert curve.saturated_at == 8 and 256 not in {b for b, _ in dev.steps}


def test_linear_regime_runs_the_whole_ladder_and_fits() -> None:
    dev = FakeDevice(lambda b: 0.05 + 0.001 * b)
    curve = time_ladder(dev.step, geometric_ladder(1, 32), device=CPU, max_seconds=1e6,
                        max_batch=None, clock=dev.clock, sample_util=lambda: 75.0)
    assert [p.batch_size for p in curve.points] == [1, 2, 4, 8, 16, 32]
    assert curve.saturated_at is None and curve.fit_ok
    assert curve.t0 == pytest.approx(0.05) and curve.per_example == pytest.approx(0.001)
    assert curve.r2 == pytest.approx(1.0)
    assert curve.utilization_gpu_pct == 75.0
    assert curve.seconds(20) == pytest.approx(0.07)  # within the ladder: the line
    # past the last rung, in proportion to B: no throughput gain that was not measured
    assert curve.seconds(100) == pytest.approx(0.082 * 100 / 32)


@pytest.mark.parametrize("excess, saturated", [(-0.04, True), (0.01, False)])
def test_saturation_threshold_is_relative(excess: float, saturated: bool) -> None:
    # Each doubling past 8 gains 1% (three together stay under 5%: saturated) or 6% (not).
    gain = 1 + SATURATION_MIN_GAIN + excess
    dev = FakeDevice(lambda b: 1.0 if b <= 8 else (b / 8) / gain ** math.log2(b / 8))
    curve = time_ladder(dev.step, [8, 16, 32, 64, 128], device=CPU, max_seconds=1e6,
                        max_batch=None, clock=dev.clock)
    if saturated:
        assert curve.saturated_at == 8 and len(curve.points) == 4
    else:
        assert curve.saturated_at is None and len(curve.points) == 5


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
    assert curve.passes == 0  # no budget left for the interleaved passes
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


def test_a_rung_out_of_memory_caps_the_largest_batch(monkeypatch: pytest.MonkeyPatch) -> None:
    """On a CPU nothing checks the memory line's maximum by real steps: a trial's model
    out of memory above batch 8 (the CPU allocator's "not enough memory") was still
    advised batch 512. The ladder's failed rung caps it at the largest batch that ran."""
    from bsfind.hardware.measure import capped_by_timing
    from bsfind.results import MemoryModel

    monkeypatch.setattr(timing, "clear_cache", lambda device: None)
    dev = FakeDevice(lambda b: 0.1 + 0.01 * b, fail=lambda b: RuntimeError(
        "[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: not enough memory: "
        "you tried to allocate 1073741824 bytes.") if b > 8 else None)
    curve = time_ladder(dev.step, [2, 4, 8, 16, 32], device=CPU, max_seconds=1e6,
                        max_batch=None, clock=dev.clock)
    assert curve.out_of_memory_at == 16
    line = MemoryModel(fixed_bytes=0, bytes_per_example=1.0, max_batch_size=123_456,
                       limit_bytes=10**9, source="predicted")
    capped = capped_by_timing(line, curve)
    assert capped.max_batch_size == 8 and capped.tried == (16,)
    fits = FakeDevice(lambda b: 0.1 + 0.01 * b)
    whole = time_ladder(fits.step, [2, 4], device=CPU, max_seconds=1e6, max_batch=None,
                        clock=fits.clock)
    assert whole.out_of_memory_at is None and capped_by_timing(line, whole) is line
    assert capped_by_timing(line, None) is line


@pytest.mark.parametrize("failing", [32, 8])
def test_a_rung_out_of_memory_in_the_passes_is_dropped_with_the_larger_ones(
        monkeypatch: pytest.MonkeyPatch, failing: int) -> None:
    """A rung that ran in the climb can run out of memory in a later pass (a padded
    batch's longest sequence differs between draws; the ladder's top is the largest
    batch found with one draw): that used to end the command with "internal error:
    OutOfMemoryError". The rung and every larger one are dropped, the rest re-timed."""
    from bsfind.hardware.measure import capped_by_timing
    from bsfind.results import MemoryModel

    cleared: list[torch.device | None] = []
    monkeypatch.setattr(timing, "clear_cache", cleared.append)
    runs = [0]

    def fail(b: int) -> BaseException | None:
        runs[0] += b == failing
        if b == failing and runs[0] == 2 + 3 + 1:  # the climb's 2 warm-ups, 3 timed steps ran
            return torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20 MiB")
        return None

    dev = FakeDevice(lambda b: 0.01 + 1e-4 * b, fail=fail)
    curve = time_ladder(dev.step, geometric_ladder(1, 32), device=CPU, max_seconds=1e6,
                        max_batch=None, clock=dev.clock)
    assert curve.out_of_memory_at == failing and cleared == [CPU]
    assert [p.batch_size for p in curve.points] == [b for b in (1, 2, 4, 8, 16) if b < failing]
    at = [k for k, (b, _) in enumerate(dev.steps) if b == failing][-1]
    assert runs[0] == 2 + 3 + 1 and all(b < failing for b, _ in dev.steps[at + 1:])
    assert curve.passes >= MIN_PASSES and curve.fit_ok
    line = MemoryModel(fixed_bytes=0, bytes_per_example=1.0, max_batch_size=123_456,
                       limit_bytes=10**9, source="measured")
    assert capped_by_timing(line, curve).max_batch_size == failing // 2


def test_out_of_memory_in_the_passes_at_the_smallest_rung(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(timing, "clear_cache", lambda device: None)
    runs = [0]

    def fail(b: int) -> BaseException | None:
        runs[0] += b == 2
        return MemoryError() if b == 2 and runs[0] > 5 else None

    dev = FakeDevice(lambda b: 0.01 + 1e-4 * b, fail=fail)
    with pytest.raises(HardwareError, match="smallest rung"):
        time_ladder(dev.step, [2, 4, 8], device=CPU, max_seconds=1e6, max_batch=None,
                    clock=dev.clock)


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
    """The real clock and CPU synchronisation: every rung is stepped in the climb and in
    each interleaved pass, and each point's time is the lowest of its timed steps."""
    model = nn.Linear(16, 4)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    calls: dict[int, int] = {}
    durations: dict[int, list[float]] = {}

    def step(b: int) -> None:
        calls[b] = calls.get(b, 0) + 1
        begin = time.perf_counter()
        opt.zero_grad()
        F.mse_loss(model(torch.randn(b, 16)), torch.randn(b, 4)).backward()
        opt.step()
        durations.setdefault(b, []).append(time.perf_counter() - begin)

    curve = time_ladder(step, [4, 8, 16], device=CPU, warmup=1, repeats=3, max_seconds=30.0,
                        max_batch=None)
    assert [p.batch_size for p in curve.points] == [4, 8, 16]
    assert curve.passes >= MIN_PASSES
    for p in curve.points:
        assert calls[p.batch_size] == 1 + 3 + curve.passes == 1 + p.samples
        # the clock brackets the step, so the lowest timed step is at least its own work
        assert min(durations[p.batch_size][1:]) <= p.seconds
        assert p.seconds <= (p.seconds_q25 or p.seconds)


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


def test_a_clock_too_coarse_to_see_a_step_is_untrusted() -> None:
    """A clock with 15.6 ms ticks (thread_time on some platforms) reads 0 s for a 1 ms
    step: every rung's lowest time is 0, which used to raise StatisticsError in the fit."""
    dev = FakeDevice(lambda b: 0.001 + 1e-6 * b)
    curve = time_ladder(dev.step, geometric_ladder(1, 64), device=CPU, max_seconds=5.0,
                        max_batch=None, clock=lambda: math.floor(dev.now / 0.0156) * 0.0156,
                        budget_clock=dev.clock)
    assert all(p.seconds == 0 for p in curve.points) and len(curve.points) == 7
    assert curve.quality == "untrusted" and not curve.fit_ok


# --------------------------------------------------------------------------- under load


def _quiet(b: int) -> float:
    # The 569-example logistic regression on 2 cores: t(B) = 0.5 ms + 0.15 µs·B.
    return 0.5e-3 + 0.15e-6 * b


def _loaded_device(burst: float = 1.0e-3, length: int = 15, period: int = 30) -> FakeDevice:
    """Another process on the cores: ``length`` steps in every ``period`` take ``burst``
    seconds more (deterministic, so the test is exact)."""
    dev = FakeDevice(_quiet)
    dev.cost = lambda b: _quiet(b) + (burst if (len(dev.steps) - 1) % period < length else 0.0)
    return dev


def test_load_bursts_do_not_stop_the_ladder_or_bend_the_line() -> None:
    ladder = geometric_ladder(1, 4096)
    quiet_dev = FakeDevice(_quiet)
    quiet = time_ladder(quiet_dev.step, ladder, device=CPU, max_seconds=1e6, max_batch=None,
                        clock=quiet_dev.clock, min_top=256)
    dev = _loaded_device()
    loaded = time_ladder(dev.step, ladder, device=CPU, max_seconds=1e6, max_batch=None,
                         clock=dev.clock, min_top=256)
    # The load is real: half the steps ran 1.9-3x slower, in runs of 15 (three rungs
    # of the climb in a row), which used to end the ladder at batch 4.
    slowed = sum(1 for i in range(len(dev.steps)) if i % 30 < 15)
    assert slowed >= 0.45 * len(dev.steps)
    # The ladder climbs to the top, as on the quiet machine ...
    assert [p.batch_size for p in loaded.points] == ladder == [p.batch_size for p in quiet.points]
    assert loaded.saturated_at is None
    # ... and the step's own time is found: t0 > 0 and the line of the quiet clock.
    assert loaded.fit_ok and loaded.t0 > 0
    assert loaded.t0 == pytest.approx(quiet.t0, rel=0.02)
    assert loaded.per_example == pytest.approx(quiet.per_example, rel=0.02)
    assert [p.seconds for p in loaded.points] == pytest.approx([p.seconds for p in quiet.points])
    # The upper quantile saw some of the load: the timing knows its own uncertainty.
    assert any((p.seconds_q25 or 0) > p.seconds for p in loaded.points)


def test_recommendation_under_load_stays_where_the_quiet_clock_puts_it() -> None:
    from bsfind.advisor import AdvisorInputs, advise
    from bsfind.results import Interval

    def recommend(curve: TimingCurve) -> int:
        inputs = AdvisorInputs(b_n=30.0, b_n_ci=Interval(27.0, 33.0), baseline_batch=32,
                               baseline_lr=1e-3, optimizer_family="adam", dataset_size=100_000,
                               timing=curve)
        return advise(inputs).recommendation.batch_size

    ladder = geometric_ladder(1, 4096)
    quiet_dev, dev = FakeDevice(_quiet), _loaded_device()
    quiet = time_ladder(quiet_dev.step, ladder, device=CPU, max_seconds=1e6, max_batch=None,
                        clock=quiet_dev.clock, min_top=256)
    loaded = time_ladder(dev.step, ladder, device=CPU, max_seconds=1e6, max_batch=None,
                         clock=dev.clock, min_top=256)
    # sqrt(30 · 0.5 ms / 0.15 µs) = 316: between the rungs 256 and 512
    assert recommend(quiet) == recommend(loaded) == 320
    # The median of each rung's steps (the old estimator) is bent by the same load.
    median_curve = TimingCurve(
        points=tuple(TimingPoint(p.batch_size, p.seconds_q25 or p.seconds, p.samples)
                     for p in loaded.points),
        t0=loaded.t0, per_example=loaded.per_example, r2=loaded.r2, source="measured")
    assert median_curve.points != loaded.points


@pytest.mark.parametrize("phase", [0.0, 0.6, 0.8, 0.9])
@pytest.mark.parametrize("quiet, saturated_at", [
    (lambda b: 5e-3 + 2e-5 * b, None),  # throughput +34%, +20%, +11%, +6% per doubling
    (lambda b: max(1e-2, 2e-5 * b), 512),  # 50,000 examples/s from 512 on
])
def test_intermittent_load_does_not_move_saturation(
        quiet: Callable[[int], float], saturated_at: int | None, phase: float) -> None:
    """Half of every second 3x slower (another job's bursts): many rungs' medians are
    loaded, their lowest times are not. Judged with a margin as wide as the rungs' spread
    (median over lowest, up to 2), the rising curve "saturated near batch" 512 or 256
    (phases 0.8, 0.9) and the saturating one did not saturate (0.6); on the lowest
    times both saturate where the quiet ones do."""
    dev = FakeDevice(quiet)
    dev.cost = lambda b: quiet(b) * (3.0 if (dev.now + phase) % 1.0 < 0.5 else 1.0)
    loaded = time_ladder(dev.step, geometric_ladder(1, 4096), device=CPU, max_seconds=20.0,
                         max_batch=None, clock=dev.clock, min_top=256)
    still = FakeDevice(quiet)
    calm = time_ladder(still.step, geometric_ladder(1, 4096), device=CPU, max_seconds=20.0,
                       max_batch=None, clock=still.clock, min_top=256)
    busy = sum((start + phase) % 1.0 < 0.5 for _, start in dev.steps) / len(dev.steps)
    assert busy > 0.2  # the load is real: 1 step in 4 (3x as long, half the time)
    assert calm.saturated_at == loaded.saturated_at == saturated_at


def test_a_poor_line_is_re_measured_then_not_used() -> None:
    # Wave quantisation (a GPU runs 64 examples per wave): t = 1 ms · ceil(B/64). No line
    # fits that; the floor (min_top) keeps the flat stretch from counting as saturation.
    dev = FakeDevice(lambda b: 1e-3 * math.ceil(b / 64))
    curve = time_ladder(dev.step, geometric_ladder(1, 256), device=CPU, max_seconds=1e6,
                        max_batch=None, clock=dev.clock, min_top=256)
    assert [p.batch_size for p in curve.points][-1] == 256
    assert curve.quality == "points" and curve.r2 < 0.9
    assert curve.passes == 2 * MIN_PASSES  # re-measured once before giving up on the line
    # Within the timed range the curve is the points; past them, proportional to B.
    assert curve.seconds(32) == pytest.approx(1e-3)
    assert curve.seconds(96) == pytest.approx(1.5e-3)
    assert curve.seconds(512) == pytest.approx(8e-3)


# --------------------------------------------------------------------------- dominated rungs

# digits-cnn's 2-thread ladder on this machine (lowest times, ms): throughput peaks at
# 2048 (48 examples/ms) and collapses at 4096 (27/ms).
CNN_2_THREADS = [(1, 1.06), (2, 1.57), (4, 1.43), (8, 1.53), (16, 1.82), (32, 2.2),
                 (64, 2.89), (128, 3.92), (256, 6.25), (512, 11.13), (1024, 21.29),
                 (2048, 42.38), (4096, 148.86)]


def _points(rows: list[tuple[int, float]], noise: float = 0.08) -> list[TimingPoint]:
    return [TimingPoint(b, ms / 1e3, 8, ms / 1e3 * (1 + noise)) for b, ms in rows]


def test_rungs_past_a_throughput_collapse_are_left_out_of_the_line() -> None:
    pts = _points(CNN_2_THREADS)
    assert [p.batch_size for p in timing.fit_points(pts)] == [b for b, _ in CNN_2_THREADS[:-1]]
    _, _, r2_all, _ = timing.line_fit(pts)
    curve = timing.curve_from_points(pts)
    # 0.94 with the collapsed rung (R² 0.91-0.95 in five quiet runs, MIN_R2 = 0.9 is the
    # edge between the line and the noise scale alone), 0.97 without it
    assert r2_all < 0.95 and curve.r2 > r2_all + 0.02
    assert curve.quality == "line" and curve.fitted_up_to == 2048
    assert len(curve.points) == len(pts)  # the curve keeps every point
    t0, c, r2, q = timing.line_fit(timing.fit_points(pts))
    assert (curve.t0, curve.per_example, curve.r2) == (t0, c, r2)
    # the step time's words say which rungs the line covers
    from bsfind.wording import step_time_words

    assert "fitted to 12 of 13 timed batch sizes (1–2,048; above it" in step_time_words(curve)


def test_a_plateau_and_a_rising_ladder_keep_every_rung() -> None:
    rising = _points([(b, 1.0 + 0.02 * b) for b in (1, 2, 4, 8, 16, 32, 64)])
    assert timing.fit_points(rising) == rising
    assert timing.curve_from_points(rising).fitted_up_to is None
    # past the peak, within DOMINATED_DROP of it: kept (a plateau, noise)
    plateau = _points([(64, 2.0), (128, 3.0), (256, 5.5), (512, 12.0), (1024, 25.0)])
    rates = [p.batch_size / p.seconds for p in plateau]
    assert min(rates[2:]) >= (1 - timing.DOMINATED_DROP) * max(rates)
    assert timing.fit_points(plateau) == plateau
    # the first rung that drops more ends the fit, even if a later one recovers
    dip = _points([(64, 2.0), (128, 3.0), (256, 12.0), (512, 12.5)])
    assert [p.batch_size for p in timing.fit_points(dip)] == [64, 128]


@pytest.mark.parametrize("b_n", [1.0, 30.0, 200.0, 1e4, math.inf])
def test_a_left_out_rung_is_slower_overall_at_any_noise_scale(b_n: float) -> None:
    """Why the left-out rungs cannot hold the optimum: S(B)·t(B) at 4096 is above it at
    the peak, 2048, whatever B_n (the examples processed, S(B)·B, grow with B)."""
    from bsfind.advisor import steps_ratio

    t = dict(CNN_2_THREADS)
    time_at = {b: steps_ratio(b, 32, b_n) * t[b] for b in (2048, 4096)}
    assert time_at[4096] > time_at[2048]
