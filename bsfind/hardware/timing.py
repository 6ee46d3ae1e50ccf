"""Step time of one device, measured on a geometric ladder of batch sizes.

    from bsfind.hardware.timing import geometric_ladder, time_ladder
    curve = time_ladder(step, geometric_ladder(8, 1024), device=device,
                        max_seconds=30.0, max_batch=mm.max_batch_size)
    curve.points, curve.t0, curve.per_example, curve.quality, curve.saturated_at

Built to survive a shared machine (DESIGN §9): other processes only ever add
time, so a rung's step time is the LOWEST of its timed steps, not their median.
The ladder climbs (``warmup`` discarded steps, then ``repeats`` timed steps per
rung), then re-times every rung in interleaved passes, in a shuffled order,
until no rung's lowest time has improved for STABLE_PASSES passes (or the
budget ends), so a burst of load lands on every batch size alike. Saturation
(throughput B/t no longer growing) ends the climb only on clear evidence:
SATURATION_RUNGS rungs in a row whose lowest times show no gain larger than 5%,
and never below ``min_top`` (e.g. 4× the baseline batch); a climb that load made
look saturated resumes when the passes show it was load. The line t0 + c·B is
fitted to the lowest times; a line that is not physical (t0 <= 0 or c < 0) or
fits badly (R² < MIN_R2) is re-measured once more, and if it is still bad the
curve says so (``quality``): the advisor then reads the timed points themselves
if they are clean, and otherwise does not use the step time at all (see
``TimingCurve``).
On CUDA the clock is read only after ``torch.cuda.synchronize``. An
out-of-memory ends the climb at the previous rung; one in the passes (a rung that
ran once can fail later) drops that rung and every larger one.
"""

from __future__ import annotations

import math
import random
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch

from bsfind.errors import BudgetError, HardwareError
from bsfind.hardware.memory import clear_cache, is_oom
from bsfind.results import TimingCurve, TimingPoint

# A rung's throughput B/t (t its lowest time) must beat the best so far by more than
# this to count as a gain.
SATURATION_MIN_GAIN = 0.05
# Consecutive rungs without a gain before the climb stops: a burst of load
# from another process can make one or two rungs look slow.
SATURATION_RUNGS = 3
# Interleaved passes over the rungs after the climb: at least MIN_PASSES, then
# until no rung's lowest time improved by more than STABLE_TOL for STABLE_PASSES
# passes in a row, at most MAX_PASSES.
MIN_PASSES = 3
STABLE_PASSES = 2
STABLE_TOL = 0.02
MAX_PASSES = 30
# How the fitted line may be read (``line_fit``): it fits when R² >= MIN_R2, or when
# its residuals are within MAX_NOISE_RATIO times the rungs' measured noise (each
# rung's 25th-percentile time over its lowest, at least NOISE_FLOOR); points whose
# median noise is at most CLEAN_NOISE are clean enough to be read directly.
MIN_R2 = 0.9
MAX_NOISE_RATIO = 2.0
NOISE_FLOOR = 0.01
CLEAN_NOISE = 0.05
# Rungs past the throughput peak whose throughput B/t fell more than DOMINATED_DROP
# below it are left out of the line (``fit_points``). Under S(B) = S_min(1 + B_n/B) a
# run at batch B processes E(B) = S_min(B + B_n) examples, which grows with B, so a batch
# whose throughput is below a smaller batch's takes longer than that batch at any noise
# scale: never the optimum. Such rungs (a CPU's caches or a device's memory overrun)
# are a regime the line t0 + c·B does not describe, and they tell nothing about the
# optimum. Fitted, digits-cnn's 2-thread rung 4096 (27 examples/ms against 48 at 2048)
# pulled R² to 0.90-0.92, at MIN_R2, and in 1 quiet run of 5 the advice fell back to the
# noise scale (batch 200 against 96-104). 25% is well above a rung's noise (NOISE_FLOOR
# to CLEAN_NOISE and a little more on a shared machine), so a plateau is kept.
DOMINATED_DROP = 0.25
# The quantile of a rung's timed steps that bounds its step time from above.
UPPER_QUANTILE = 0.25
# The climb resumes after the passes at most this often (when they show the rungs
# that looked saturated were slowed by load).
MAX_RESUMES = 2


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


@dataclass
class _Rung:
    batch: int
    samples: list[float] = field(default_factory=list)

    @property
    def low(self) -> float:
        return min(self.samples)

    def point(self) -> TimingPoint:
        s = sorted(self.samples)
        q = s[min(len(s) - 1, int(UPPER_QUANTILE * (len(s) - 1) + 0.5))]
        return TimingPoint(self.batch, s[0], len(s), q)


class _Timer:
    """Runs and times steps within the budget; samples utilisation after each."""

    def __init__(self, step: Callable[[int], None], device: torch.device, max_seconds: float,
                 clock: Callable[[], float],
                 sample_util: Callable[[], float | None] | None,
                 budget_clock: Callable[[], float] | None = None) -> None:
        self.step, self.sync, self.clock = step, _synchronizer(device), clock
        self.budget_clock = budget_clock or clock
        self.sample_util = sample_util
        self.end = self.budget_clock() + max_seconds
        self.utils: list[float] = []
        self.oom_at: int | None = None  # the rung that ran out of memory

    def left(self) -> bool:
        return self.budget_clock() < self.end

    def warm(self, b: int, n: int) -> bool:
        """``n`` untimed steps; False when the budget ended first."""
        for _ in range(n):
            if not self.left():
                return False
            self.step(b)
        self.sync()
        return True

    def time(self, b: int) -> float | None:
        """One timed step, or None when the budget has ended."""
        if not self.left():
            return None
        t_begin = self.clock()
        self.step(b)
        self.sync()
        elapsed = self.clock() - t_begin
        if self.sample_util is not None:
            u = self.sample_util()
            if u is not None:
                self.utils.append(float(u))
        return elapsed


def saturation(rungs: Sequence[_Rung], min_top: int) -> int | None:
    """The batch where throughput stopped growing, on clear evidence only, else None.

    Walking up the rungs, a gain is a throughput (B over the rung's lowest time) more
    than SATURATION_MIN_GAIN above the best so far; SATURATION_RUNGS rungs in a row
    without one, ending at or above ``min_top``, call saturation at the last gain.
    The lowest times are what load leaves alone (it only adds time): a margin widened
    by the rungs' spread (median over lowest) read intermittent load, half the steps
    3x slower, as saturation at ``min_top`` while the lowest times still gained
    6-34% per doubling above it.
    """
    best: _Rung | None = None
    flat = 0
    for r in rungs:
        if r.low <= 0:
            continue
        if best is None:
            best = r
            continue
        if r.batch / r.low > (1 + SATURATION_MIN_GAIN) * best.batch / best.low:
            best, flat = r, 0
        else:
            flat += 1
            if flat >= SATURATION_RUNGS and r.batch >= min_top:
                return best.batch
    return None


def _out_of_memory(timer: _Timer, rungs: list[_Rung], b: int, device: torch.device) -> None:
    """After an out-of-memory at batch ``b``: clear the cache, record ``b`` and drop it
    and every larger rung (a rung that ran once can fail later: a padded batch's longest
    sequence differs between draws, memory fragments)."""
    clear_cache(device)
    timer.oom_at = b if timer.oom_at is None else min(timer.oom_at, b)
    rungs[:] = [r for r in rungs if r.batch < b]
    if not rungs:
        raise HardwareError(
            f"out of memory at batch size {b}, the smallest rung of the timing ladder",
            hint="lower the batch sizes to time, or use a device with more memory",
        )


def _climb(timer: _Timer, ladder: Sequence[int], rungs: list[_Rung], warmup: int,
           repeats: int, min_top: int, device: torch.device) -> str:
    """Time the rungs of ``ladder`` in increasing order, appending to ``rungs``.

    Returns why it stopped: "top", "saturated", "memory" or "budget".
    """
    for b in ladder:
        rung = _Rung(b)
        oom = False
        try:
            if timer.warm(b, warmup):
                while len(rung.samples) < repeats:
                    t = timer.time(b)
                    if t is None:
                        break
                    rung.samples.append(t)
        except Exception as exc:
            if not is_oom(exc):
                raise
            oom = True
        if oom:
            _out_of_memory(timer, rungs, b, device)
            return "memory"
        if rung.samples:
            rungs.append(rung)
        if not timer.left():
            return "budget"
        if saturation(rungs, min_top) is not None:
            return "saturated"
    return "top"


def _passes(timer: _Timer, rungs: list[_Rung], rng: random.Random,
            device: torch.device) -> int:
    """Interleaved re-timing of every rung until the lowest times are stable.

    A rung out of memory is dropped with every larger one (see ``_out_of_memory``) and
    the pass begins again on those left, until fewer than two are.
    """
    done = stable = 0
    while done < MAX_PASSES and timer.left() and len(rungs) >= 2:
        before = [r.low for r in rungs]
        order = list(range(len(rungs)))
        rng.shuffle(order)
        batch = 0
        try:
            for i in order:
                batch = rungs[i].batch
                t = timer.time(batch)
                if t is None:
                    return done
                rungs[i].samples.append(t)
        except Exception as exc:
            if not is_oom(exc):
                raise
            _out_of_memory(timer, rungs, batch, device)
            continue
        done += 1
        improved = any(r.low < (1 - STABLE_TOL) * b for r, b in zip(rungs, before, strict=True))
        stable = 0 if improved else stable + 1
        if done >= MIN_PASSES and stable >= STABLE_PASSES:
            break
    return done


Quality = Literal["line", "points", "untrusted"]


def line_fit(points: Sequence[TimingPoint]) -> tuple[float, float, float, Quality]:
    """(t0, c, R², quality) of the line through the points' lowest times.

    quality (see ``TimingCurve``): "line" when the unconstrained fit is physical
    (t0 > 0, c >= 0, or c < 0 by less than the noise over the ladder: a flat
    curve) and either R² >= MIN_R2 or the residuals are within the rungs' measured
    noise (RMS of residual / noise <= MAX_NOISE_RATIO, where a
    rung's noise is its 25th-percentile time over its lowest, at least
    NOISE_FLOOR): a tiny model whose step time barely grows has a low R² only
    because there is little to explain. Otherwise "points" when the points are
    clean (median noise <= CLEAN_NOISE) and "untrusted" when they are not. t0
    and c are those of :func:`fit_linear` (clipped at 0).
    """
    t0, c, r2 = fit_linear(points)
    if len(points) < 2 or not any(p.seconds > 0 for p in points):
        return t0, c, r2, "untrusted"  # no line; or a clock too coarse to see a step
    rows = [(1.0 / (p.seconds * p.seconds) if p.seconds > 0 else 1.0, float(p.batch_size),
             p.seconds) for p in points]
    sw = sum(w for w, _, _ in rows)
    mx = sum(w * x for w, x, _ in rows) / sw
    my = sum(w * y for w, _, y in rows) / sw
    sxx = sum(w * (x - mx) ** 2 for w, x, _ in rows)
    raw_c = sum(w * (x - mx) * (y - my) for w, x, y in rows) / sxx if sxx > 0 else 0.0
    raw_t0 = my - raw_c * mx
    noise = [max(NOISE_FLOOR, ((p.seconds_q25 or p.seconds) - p.seconds) / p.seconds)
             if p.seconds > 0 else NOISE_FLOOR for p in points]
    ratio = math.sqrt(statistics.fmean(
        ((p.seconds - t0 - c * p.batch_size) / (p.seconds * n)) ** 2
        for p, n in zip(points, noise, strict=True) if p.seconds > 0))
    fits = (not math.isnan(r2) and r2 >= MIN_R2) or ratio <= MAX_NOISE_RATIO
    # A slope below 0 by less than the noise over the ladder is a flat curve (no
    # measurable cost per example), not an unphysical one: the clipped line stands.
    top = max(p.batch_size for p in points)
    flat = raw_c < 0 and -raw_c * top <= MAX_NOISE_RATIO * statistics.median(noise) * my
    if raw_t0 > 0 and (raw_c >= 0 or flat) and fits:
        return t0, c, r2, "line"
    return t0, c, r2, "points" if statistics.median(noise) <= CLEAN_NOISE else "untrusted"


def fit_points(points: Sequence[TimingPoint]) -> list[TimingPoint]:
    """The points the line is fitted to, in batch order: every one up to the throughput
    peak, then those beyond it until the first whose throughput fell more than
    DOMINATED_DROP below the peak (that one and the rest are dominated batches: see
    DOMINATED_DROP). All of them when fewer than two would be left."""
    pts = sorted(points, key=lambda p: p.batch_size)
    rate = [p.batch_size / p.seconds if p.seconds > 0 else 0.0 for p in pts]
    peak = max(range(len(pts)), key=lambda i: rate[i], default=0)
    keep = pts[:peak + 1]
    for p, r in zip(pts[peak + 1:], rate[peak + 1:], strict=True):
        if r < (1 - DOMINATED_DROP) * rate[peak]:
            break
        keep.append(p)
    return keep if len(keep) >= 2 else pts


def curve_from_points(points: Sequence[TimingPoint], *, saturated_at: int | None = None,
                      utilization: float | None = None, passes: int = 0,
                      out_of_memory_at: int | None = None) -> TimingCurve:
    """A measured :class:`TimingCurve` from timed points: the line through their lowest
    times, and the line through their 25th percentiles (the timing's uncertainty), both
    fitted to :func:`fit_points` (the curve keeps every point)."""
    fitted = fit_points(points)
    t0, c, r2, quality = line_fit(fitted)
    upper = [TimingPoint(p.batch_size, p.seconds_q25 if p.seconds_q25 is not None
                         else p.seconds, p.samples) for p in fitted]
    t0_up, c_up, _ = fit_linear(upper)
    top = fitted[-1].batch_size if len(fitted) < len(points) else None
    return TimingCurve(points=tuple(points), t0=t0, per_example=c, r2=r2, source="measured",
                       saturated_at=saturated_at, utilization_gpu_pct=utilization,
                       quality=quality, passes=passes, t0_upper=t0_up, per_example_upper=c_up,
                       fitted_up_to=top, out_of_memory_at=out_of_memory_at)


def time_ladder(
    step: Callable[[int], None],
    sizes: Sequence[int],
    *,
    device: torch.device,
    warmup: int = 2,
    repeats: int = 3,
    max_seconds: float,
    max_batch: int | None,
    min_top: int = 1,
    sample_util: Callable[[], float | None] | None = None,
    clock: Callable[[], float] = time.perf_counter,
    seed: int = 0,
    budget_clock: Callable[[], float] | None = None,
) -> TimingCurve:
    """Time one training step at each batch size of a ladder (``source="measured"``).

    Climbs the rungs (sizes above ``max_batch`` dropped), re-times them in
    interleaved passes, resumes the climb if the passes show that saturation
    was load, re-measures once more if the fitted line is unphysical or poor;
    see the module docstring. Before every step the budget is checked, so the
    ladder overruns ``max_seconds`` by at most one step.

    Args:
        step: runs one full training step (forward, backward, optimizer) at B.
        min_top: saturation is never called below this batch (memory may stop
            the climb earlier).
        sample_util: called after each timed step (e.g. NVML utilisation); the
            mean of its numbers becomes ``utilization_gpu_pct``.
        clock: seconds as a float, what a step's time is read from (e.g. this thread's
            CPU time beside a steady load); tests inject a fake.
        seed: the order of the interleaved passes.
        budget_clock: what ``max_seconds`` is counted on (default: ``clock``); the
            wall clock when ``clock`` is a CPU-time clock.

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
    timer = _Timer(step, device, max_seconds, clock, sample_util, budget_clock)
    rng = random.Random(seed)
    rungs: list[_Rung] = []
    passes, stopped = 0, _climb(timer, ladder, rungs, warmup, repeats, min_top, device)
    for _ in range(MAX_RESUMES + 1):
        if len(rungs) < 2 or stopped == "budget":
            break
        passes += _passes(timer, rungs, rng, device)
        rest = [b for b in ladder if b > rungs[-1].batch
                and (timer.oom_at is None or b < timer.oom_at)]
        if stopped != "saturated" or saturation(rungs, min_top) is not None or not rest:
            break
        stopped = _climb(timer, rest, rungs, warmup, repeats, min_top, device)
    if not rungs:
        raise BudgetError(
            f"timing: {max_seconds:g} s ran out before any step was timed",
            hint="raise probe.max_seconds or set probe.timing: false",
        )
    if len(rungs) >= 2 and line_fit([r.point() for r in rungs])[3] != "line":
        passes += _passes(timer, rungs, rng, device)  # once more before giving up on the line
    return curve_from_points(
        [r.point() for r in rungs], saturated_at=saturation(rungs, min_top),
        utilization=statistics.fmean(timer.utils) if timer.utils else None, passes=passes,
        out_of_memory_at=timer.oom_at)
