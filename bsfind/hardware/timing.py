"""Step time t(B) ≈ t0 + c·B, measured on a geometric ladder of batch sizes.

    from bsfind.hardware.timing import geometric_ladder, time_ladder
    curve = time_ladder(step, geometric_ladder(8, 1024), device=device,
                        max_seconds=30.0, max_batch=mm.max_batch_size)
    curve.t0, curve.per_example, curve.saturated_at

Each rung runs ``warmup`` discarded steps (new shapes: cuDNN autotuning,
allocator growth), then ``repeats`` timed steps; its time is their median.
On CUDA the clock is read only after ``torch.cuda.synchronize``, since kernels
run asynchronously. The ladder stops when throughput B/t stops growing
(the device is saturated), when the time budget is spent, or at the first
out-of-memory (the rungs before it are kept).
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Sequence

import torch

from bsfind.errors import BudgetError, HardwareError
from bsfind.hardware.memory import clear_cache, is_oom
from bsfind.results import TimingCurve, TimingPoint

# A rung whose throughput B/t is less than this much above the previous
# rung's means the device is saturated: doubling the batch no longer buys
# examples per second. 5% is above the run-to-run noise of a median of 5
# steps on an idle GPU (typically 1-2%), so noise alone rarely stops a ladder.
SATURATION_MIN_GAIN = 0.05
# Consecutive rungs without that gain before the ladder stops: one slow rung
# (a burst of load from another process) must not end the ladder early.
SATURATION_RUNGS = 2


def geometric_ladder(start: int, stop: int, factor: float = 2) -> list[int]:
    """Batch sizes start, start·factor, start·factor², ... up to ``stop``.

    ``stop`` itself is appended as the last rung when it is at least
    √factor above the previous one (so the largest batch that fits gets
    timed, but no rung sits so close to the previous one that the
    saturation test reads the small step as "throughput stopped growing").
    """
    if start < 1 or stop < start:
        raise ValueError(f"need 1 <= start <= stop, got start={start}, stop={stop}")
    if factor <= 1:
        raise ValueError(f"factor must be > 1, got {factor}")
    sizes: list[int] = []
    b = float(start)
    while int(round(b)) <= stop:
        r = int(round(b))
        if not sizes or r > sizes[-1]:
            sizes.append(r)
        b *= factor
    if stop > sizes[-1] and stop >= sizes[-1] * math.sqrt(factor):
        sizes.append(stop)
    return sizes


def fit_linear(
    points: Sequence[TimingPoint | tuple[float, float]],
) -> tuple[float, float, float]:
    """Fit t = t0 + per_example·B by weighted least squares.

    Weights are ``samples / t²``: step-time noise is roughly proportional to
    the step time, so this minimises relative residuals and keeps the largest
    rung from dictating the fit (and with it t0, which the small rungs
    determine). ``(B, t)`` tuples count as one sample each.

    Physical constraints: t0 is clipped at 0 (a negative intercept is noise
    or a super-linear regime; the line is then refitted through the origin)
    and per_example at 0 (the line is then the weighted mean time).

    Returns:
        (t0, per_example, r2) where r2 is the weighted coefficient of
        determination of the returned line (1.0 for exact points; NaN when
        fewer than two distinct batch sizes make a fit meaningless, in which
        case the line goes through the origin and the mean point).
    """
    rows: list[tuple[float, float, float]] = []  # (weight, B, t)
    for p in points:
        if isinstance(p, TimingPoint):
            b, t, n = float(p.batch_size), float(p.seconds), max(1, p.samples)
        else:
            b, t, n = float(p[0]), float(p[1]), 1
        rows.append((n / (t * t) if t > 0 else float(n), b, t))
    if not rows:
        raise ValueError("fit_linear needs at least one point")
    if any(t <= 0 for _, _, t in rows):  # weights 1/t² are meaningless: use equal ones
        rows = [(1.0, b, t) for _, b, t in rows]
    sw = sum(w for w, _, _ in rows)
    mx = sum(w * x for w, x, _ in rows) / sw
    my = sum(w * y for w, _, y in rows) / sw
    sxx = sum(w * (x - mx) ** 2 for w, x, _ in rows)
    if sxx <= 0:
        c = my / mx if mx > 0 else 0.0
        return 0.0, max(0.0, c), math.nan
    c = sum(w * (x - mx) * (y - my) for w, x, y in rows) / sxx
    t0 = my - c * mx
    if c < 0:
        c, t0 = 0.0, my
    elif t0 < 0:
        c = sum(w * x * y for w, x, y in rows) / sum(w * x * x for w, x, _ in rows)
        t0 = 0.0
    ss_tot = sum(w * (y - my) ** 2 for w, _, y in rows)
    ss_res = sum(w * (y - t0 - c * x) ** 2 for w, x, y in rows)
    if ss_tot <= 1e-24 * sum(w * y * y for w, _, y in rows):  # all times equal
        r2 = 1.0 if ss_res <= ss_tot else 0.0
    else:
        r2 = 1.0 - ss_res / ss_tot
    return t0, c, r2


def _synchronizer(device: torch.device) -> Callable[[], None]:
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    if device.type == "mps" and hasattr(torch, "mps"):
        return torch.mps.synchronize
    return lambda: None


# Extra passes over the kept rungs, one step per rung per pass, interleaved so
# that a burst of load from other processes lands on every batch size alike
# rather than on one rung (which would bend the fitted line).
INTERLEAVED_PASSES = 5


def _interleaved(
    step: Callable[[int], None],
    sync: Callable[[], None],
    by_size: dict[int, list[float]],
    budget_left: Callable[[], bool],
    clock: Callable[[], float],
) -> list[TimingPoint]:
    """Time every rung again, interleaved, and return the new medians.

    When every rung got at least 3 interleaved samples, the median is taken
    over those alone (the first pass ran each rung in one block, exposed to
    whatever load was running then); otherwise over all samples.
    """
    extra: dict[int, list[float]] = {b: [] for b in by_size}
    for _ in range(INTERLEAVED_PASSES):
        for b in by_size:
            if not budget_left():
                break
            t_begin = clock()
            step(b)
            sync()
            extra[b].append(clock() - t_begin)
    if all(len(e) >= 3 for e in extra.values()):
        return [TimingPoint(b, statistics.median(e), len(e)) for b, e in extra.items()]
    return [TimingPoint(b, statistics.median(s + extra[b]), len(s) + len(extra[b]))
            for b, s in by_size.items()]


def time_ladder(
    step: Callable[[int], None],
    sizes: Sequence[int],
    *,
    device: torch.device,
    warmup: int = 2,
    repeats: int = 5,
    max_seconds: float,
    max_batch: int | None,
    sample_util: Callable[[], float | None] | None = None,
    clock: Callable[[], float] = time.perf_counter,
) -> TimingCurve:
    """Time one training step at each batch size of a ladder (``source="measured"``).

    Long because: (to be split with the load-robust ladder of issue #14).

    Rungs run in increasing order (sizes above ``max_batch`` are dropped).
    Before every step, warm-up or timed, the budget is checked: once
    ``max_seconds`` have passed since the start no further step begins, so
    the ladder overruns the budget by at most one step. A rung cut short
    keeps the timed steps it has (``samples`` says how many).

    Stops early, keeping the rungs that triggered it, when
    :data:`SATURATION_RUNGS` consecutive rungs fail to raise the best
    throughput B/t so far by :data:`SATURATION_MIN_GAIN`; ``saturated_at``
    is then the rung of that best throughput, the smallest batch already
    within that margin of the peak.
    An out-of-memory error (:func:`~bsfind.hardware.memory.is_oom`) ends the
    ladder at the previous rung; the failed rung is discarded and the cache
    cleared. Other exceptions propagate.

    Args:
        step: runs one full training step (forward, backward, optimizer) at B.
        sample_util: called after each timed step (e.g.
            ``lambda: nvml.sample_utilization(i)``); the mean of the numbers
            it returns becomes ``utilization_gpu_pct``.
        clock: seconds as a float; tests inject a fake.

    Raises:
        BudgetError: the budget ran out before any step was timed.
        HardwareError: out of memory at the smallest rung, or every size is
            above ``max_batch``.
    """
    if repeats < 1 or warmup < 0:
        raise ValueError(f"need repeats >= 1 and warmup >= 0, got {repeats}, {warmup}")
    if not any(b >= 1 for b in sizes):
        raise ValueError(f"no positive batch size to time in {list(sizes)}")
    ladder = sorted({int(b) for b in sizes if b >= 1 and (max_batch is None or b <= max_batch)})
    if not ladder:
        raise HardwareError(
            f"timing: no batch size in {list(sizes)} fits in memory (max batch {max_batch})",
            hint="use a smaller model, or a device with more memory",
        )
    sync = _synchronizer(device)
    start = clock()

    def budget_left() -> bool:
        return clock() - start < max_seconds

    points: list[TimingPoint] = []
    by_size: dict[int, list[float]] = {}
    utils: list[float] = []
    saturated_at: int | None = None
    best: tuple[int, float] | None = None  # (batch, throughput) of the last real gain
    flat = 0  # rungs since then that gained less than SATURATION_MIN_GAIN
    out_of_budget = False
    for b in ladder:
        samples: list[float] = []
        oom = False
        try:
            for _ in range(warmup):
                if not budget_left():
                    out_of_budget = True
                    break
                step(b)
            sync()
            while not out_of_budget and len(samples) < repeats:
                if not budget_left():
                    out_of_budget = True
                    break
                t_begin = clock()
                step(b)
                sync()
                samples.append(clock() - t_begin)
                if sample_util is not None:
                    u = sample_util()
                    if u is not None:
                        utils.append(float(u))
        except Exception as exc:
            if not is_oom(exc):
                raise
            oom = True
        if oom:
            clear_cache(device)
            if not points:
                raise HardwareError(
                    f"out of memory at batch size {b}, the smallest rung of the timing ladder",
                    hint="lower the batch sizes to time, or use a device with more memory",
                )
            break
        if samples:
            by_size[b] = samples
            points.append(TimingPoint(b, statistics.median(samples), len(samples)))
        if out_of_budget:
            break
        cur = points[-1]
        if cur.seconds > 0:
            throughput = cur.batch_size / cur.seconds
            if best is None or throughput >= (1 + SATURATION_MIN_GAIN) * best[1]:
                best, flat = (cur.batch_size, throughput), 0
            else:
                flat += 1
            if flat >= SATURATION_RUNGS:
                saturated_at = best[0]
                break
    if not points:
        raise BudgetError(
            f"timing: {max_seconds:g} s ran out before any step was timed",
            hint="raise probe.max_seconds or set probe.timing: false",
        )
    if len(points) >= 2 and not out_of_budget:
        points = _interleaved(step, sync, by_size, budget_left, clock)
    t0, c, r2 = fit_linear(points)
    return TimingCurve(
        points=tuple(points),
        t0=t0,
        per_example=c,
        r2=r2,
        source="measured",
        saturated_at=saturated_at,
        utilization_gpu_pct=statistics.fmean(utils) if utils else None,
    )
