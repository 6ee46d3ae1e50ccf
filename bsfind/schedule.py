"""A batch-size schedule from the noise scale measured along training (DESIGN §10).

Pure math, like the advisor: numbers in, numbers out.

    .venv/bin/python -m pytest tests/test_schedule.py -q

The noise scale grows during training, so the time-optimal batch grows too.
From the noise scale B_n measured at several points of a run at the baseline
batch B0, indexed by the examples E that run had seen:

1. **Growth.** :func:`fit_growth` fits B_n(E) = a·E^p in log-log (Theil-Sen,
   robust to a checkpoint far off), over the points from the lowest noise
   scale on (the first steps of training often start high and dip before the
   growth sets in; Bergsma et al. 2025 find B_crit growing as a power of the
   data seen). Before the first
   fitted point B_n is held at its value there; past the last measured point
   the power law is an extrapolation, held constant beyond
   EXTRAPOLATION_LIMIT × the examples measured.
2. **Progress.** S(B) = S_min(1 + B_n/B) (McCandlish eq. 2.11) holds at each
   moment: a step of B examples makes 1/(1 + B_n/B) of the progress of an
   infinitely large batch. Measuring progress by the baseline run's own
   examples e, a run at batch B needs (1 + B_n(e)/B)/(1 + B_n(e)/B0) of the
   baseline's steps over de, each taking t(B).
3. **Doublings.** Frameworks ramp by integer factors, so the schedule
   doubles. Going from B to 2B pays exactly when (1 + B_n/2B)·t(2B) <
   (1 + B_n/B)·t(B), i.e. B_n > (t(2B) − t(B)) / (t(B)/B − t(2B)/2B); for
   t = t0 + c·B that is B < B*/√2 with B* = sqrt(B_n·t0/c). The schedule
   starts at the time-optimal batch for the start of the run and doubles
   where the fitted B_n(e) crosses that threshold, up to the dataset size.
   Each phase's learning rate comes from the advisor's rule at the phase's
   noise scale (so ×√2 per doubling for the Adam family while B ≪ B_n, as in
   OLMo's ramp; the McCandlish ratio for SGD), and never falls from one phase
   to the next (:func:`never_falling`).

The horizon is the planned training (``training.examples`` / ``epochs``) when
given, else EXTRAPOLATION_LIMIT × the examples measured.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass

from bsfind.advisor import (
    AdvisorInputs,
    WallClock,
    allowed_extras,
    as_run,
    batch_unit,
    measured_lr,
    scaled_lr,
    wall_clock,
    whole_dataset_allowed,
    whole_steps,
)

# The power law is followed at most this far past the last measured point (in
# examples seen); beyond, the noise scale is held there. Two doublings of the
# run: far enough to plan the next run's ramp, near enough that a power law
# fitted over one or two decades of examples still means something.
EXTRAPOLATION_LIMIT = 4.0
# Points per phase of the numerical integral of the steps (log-spaced trapezoids).
INTEGRATION_POINTS = 256
# Accumulation pieces whose largest batch the best constant batch's grid holds: past each
# the step time jumps (one more micro-batch), so the time is not single-dipped there.
ACCUMULATION_PIECES = 64


@dataclass(frozen=True)
class Growth:
    """B_n(E) = a·E^p, measured over [e_lo, e_hi] examples seen (see the module docstring).

    Attributes:
        points: the (examples, B_n) pairs fitted.
        r2: of log B_n on log E (NaN with two points).
    """

    a: float
    p: float
    e_lo: float
    e_hi: float
    r2: float
    points: tuple[tuple[float, float], ...]

    @property
    def e_cap(self) -> float:
        return EXTRAPOLATION_LIMIT * self.e_hi

    def at(self, e: float) -> float:
        """B_n after ``e`` examples: held below e_lo and above e_cap."""
        e = min(max(e, self.e_lo), self.e_cap)
        return self.a * e**self.p

    def examples_where(self, b_n: float) -> float | None:
        """The examples at which B_n(E) reaches ``b_n`` (None: not within [e_lo, e_cap])."""
        if self.p <= 0 or b_n <= self.at(self.e_lo):
            return None if b_n > self.at(self.e_lo) else self.e_lo
        # in logs: a nearly flat growth (p ~ 1e-4) puts e far past any float (a review)
        log_e = math.log(b_n / self.a) / self.p
        return math.exp(log_e) if log_e <= math.log(self.e_cap) else None


def fit_growth(points: Sequence[tuple[float, float]], bounds_at: Collection[float] = ()
               ) -> Growth | None:
    """Fit B_n(E) = a·E^p to (examples seen, noise scale) points.

    Points with E <= 0 or a non-positive or unresolved noise scale are left
    out; so are the points before the lowest noise scale (the early dip), found
    on a running median of three so that one low outlier does not decide it, and
    among all points but the last (which has no neighbour after it to outvote it).
    ``bounds_at``: the examples of points whose value is only a lower bound (an
    unresolved point's): fitted, but not where the dip is looked for (low by
    construction, they would cut the resolved points before them).
    The slope is Theil-Sen's (the median of the pairwise log-log slopes) and the
    intercept the median residual: robust to one checkpoint far off, which
    single checkpoints often are (docs/validation.md). A decreasing fit (p < 0)
    becomes p = 0: a flat noise scale, no doublings.

    Returns:
        The growth, or None with no usable point. One point (or points all at the
        same examples) gives p = 0.
    """
    pts = sorted((float(e), float(b)) for e, b in points
                 if e > 0 and b is not None and math.isfinite(b) and b > 0)
    if not pts:
        return None
    bounds = set(bounds_at)
    measured = [p for p in pts if p[0] not in bounds] or pts
    values = [b for _, b in measured]
    smooth = [statistics.median(values[max(0, i - 1):i + 2]) if 0 < i < len(values) - 1
              else values[i] for i in range(len(values))]
    # the fit starts at a point with one after it: a last point lowest of all (one low
    # outlier at the end) would otherwise stand alone for the whole run (a bound after
    # the last measured point is one after it)
    first = smooth[:-1] if measured[-1] == pts[-1] and len(smooth) > 1 else smooth
    low = max(i for i, v in enumerate(first) if v == min(first))
    pts = [p for p in pts if p[0] >= measured[low][0]]
    if len(pts) == 1:
        e, b = pts[0]
        return Growth(b, 0.0, e, e, math.nan, tuple(pts))
    xs = [math.log(e) for e, _ in pts]
    ys = [math.log(b) for _, b in pts]
    # pairs at the same examples have no slope (a review: two points there divided by 0)
    slopes = [(ys[j] - ys[i]) / (xs[j] - xs[i])
              for i in range(len(xs)) for j in range(i + 1, len(xs)) if xs[j] != xs[i]]
    p = statistics.median(slopes) if slopes else 0.0
    if p < 0:
        p = 0.0
    c = statistics.median(y - p * x for x, y in zip(xs, ys, strict=True))
    my = sum(ys) / len(ys)
    ss_tot = sum((y - my) ** 2 for y in ys)
    r2 = math.nan
    if len(pts) > 2 and ss_tot > 0:
        r2 = 1 - sum((y - c - p * x) ** 2 for x, y in zip(xs, ys, strict=True)) / ss_tot
    return Growth(math.exp(c), p, pts[0][0], pts[-1][0], r2, tuple(pts))


@dataclass(frozen=True)
class Phase:
    """One constant-batch stretch of the schedule, counted in the NEW run's steps.

    Attributes:
        batch_size: the global batch (per device × devices × accumulation).
        start_step / start_examples: where the phase starts in the new run.
        steps: its predicted steps.
        learning_rate: the advisor's rule at ``b_n``.
        grad_accumulation / per_device_batch_size: how the batch fits in memory.
        b_n: the noise scale (fitted) where the phase starts.
        baseline_examples: where it starts on the measured run's axis.
        extrapolated: it starts past the last measured point.
        lr_held: the rate is the previous phase's: the rule's (as corrected) is lower
            (:func:`never_falling`).
    """

    batch_size: int
    start_step: int
    start_examples: int
    steps: int
    learning_rate: float
    grad_accumulation: int
    per_device_batch_size: int
    b_n: float
    baseline_examples: float
    extrapolated: bool
    lr_held: bool = False


@dataclass(frozen=True)
class Schedule:
    """The doubling schedule and its predicted time against constant batches.

    Attributes:
        horizon_examples: the baseline run's examples the schedule covers.
        horizon_source: "training" (the spec's plan) or "extrapolation limit".
        measured_examples: examples of the last measured point (beyond it,
            the noise scale is extrapolated; beyond EXTRAPOLATION_LIMIT × it, held).
        seconds / baseline_seconds / best_constant_seconds: predicted times of
            the schedule, the baseline batch and the best constant batch.
        best_constant_batch: the constant batch with the least predicted time.
        lr_rule: the learning-rate rule's name.
        lr_measured: (batch, factor) when the learning rate was measured at one batch
            (``with_measured_lr``).
    """

    phases: tuple[Phase, ...]
    growth: Growth
    horizon_examples: int
    horizon_source: str
    measured_examples: float
    seconds: float
    baseline_seconds: float
    best_constant_batch: int
    best_constant_seconds: float
    lr_rule: str
    # The learning rate measured at the recommended batch: (that batch, its factor on the
    # rule's); the phases' learning rates carry advisor.measured_lr. None: the rule's.
    lr_measured: tuple[int, float] | None = None
    # the same ramp as gradient accumulation (``accumulation``): every micro-batch pays
    # the step's fixed time t0, so it is slower than the batch-size form unless t0 is 0
    accumulation_seconds: float = math.nan
    # the recommendation's constant batch over the same run, its fitted growth integrated
    # (the recommendation's own predicted_time_ratio reads the noise scale now for every step)
    recommended_batch: int | None = None
    recommended_seconds: float = math.nan
    # each phase's rate by the rule alone, before never_falling held any (the phases carry
    # the held ones): with_measured_lr corrects these. Empty: the phases' own rates.
    rule_learning_rates: tuple[float, ...] = ()
    # (baseline examples, dataset size): where the last phase's doubling was due but would
    # have passed the dataset, so the schedule stays at it (a trial: 1,576 of 1,797)
    past_dataset: tuple[float, int] | None = None

    @property
    def ramp(self) -> list[tuple[int, int, float]]:
        """(from_step, batch, learning rate) per phase: the form frameworks' ramps take."""
        return [(p.start_step, p.batch_size, p.learning_rate) for p in self.phases]

    @property
    def accumulation(self) -> list[tuple[int, int, int]]:
        """(from_step, per-device micro-batch, accumulation steps) keeping the first phase's
        per-device batch and growing the gradient accumulation instead."""
        first = self.phases[0]
        micro = first.per_device_batch_size
        per_step = max(1, first.batch_size // max(1, first.grad_accumulation))
        return [(p.start_step, micro, max(1, round(p.batch_size / per_step)))
                for p in self.phases]


def never_falling(phases: Sequence[Phase]) -> tuple[Phase, ...]:
    """``phases`` with each learning rate at least the previous phase's (``lr_held`` where
    raised to it).

    At a doubling the rule never lowers the rate: at one noise scale its rate grows with
    the batch. But each phase's rate is the rule's at the noise scale where the phase
    starts, and below B0 the rule's rate at a fixed batch falls as B_n grows:
    lr0·(1 + B_n/B0)/(1 + B_n/B) tends from lr0 to lr0·B/B0 (the square root of it for
    the Adam family). A ramp below B0 whose B_n grows faster than its batch (4x per
    doubling) would so lower the rate at each doubling: the decay the rule asks of the
    previous phase as its B_n grew, which the schedule did not apply there, applied
    instead where the batch, and with it the gradient's precision, doubles (a trial at
    B0 = 4,096: 0.00357 at 72 down to 0.00181 at 2,304, which trained to loss 0.30
    against 0.27 with the rate held). Held, no phase's rate exceeds one the rule gave
    an earlier, smaller batch.
    """
    out: list[Phase] = []
    for p in phases:
        if out and p.learning_rate < out[-1].learning_rate:
            p = dataclasses.replace(p, learning_rate=out[-1].learning_rate, lr_held=True)
        elif p.lr_held:
            p = dataclasses.replace(p, lr_held=False)
        out.append(p)
    return tuple(out)


def _steps(growth: Growth, b: float, b0: float, e_from: float, e_to: float) -> float:
    """New-run steps at batch ``b`` for the baseline's progress from e_from to e_to examples:
    ∫ (1 + B_n(e)/b)/(1 + B_n(e)/b0) de / b0; exact where B_n is held (below e_lo, past
    e_cap), trapezoids on a log grid where it follows the power law."""
    if e_to <= e_from:
        return 0.0

    def f(e: float) -> float:
        bn = growth.at(e)
        return (1 + bn / b) / (1 + bn / b0)

    knots = sorted({e_from, e_to, *(x for x in (growth.e_lo, growth.e_cap) if e_from < x < e_to)})
    total = 0.0
    for lo, hi in zip(knots, knots[1:], strict=False):
        if hi <= growth.e_lo or lo >= growth.e_cap or growth.p == 0:
            total += (hi - lo) * f((lo + hi) / 2)  # constant there
            continue
        n = INTEGRATION_POINTS
        grid = [lo * (hi / lo) ** (i / n) for i in range(n + 1)]
        total += sum((grid[i + 1] - grid[i]) * (f(grid[i]) + f(grid[i + 1])) / 2
                     for i in range(n))
    return total / b0


def _doublings(model: WallClock, growth: Growth, batch: int, horizon: float, dataset: int
               ) -> tuple[list[tuple[int, float]], float | None]:
    """The phases' (batch, where it starts on the baseline's axis) from ``batch``, doubling
    where the growth crosses each threshold before ``horizon``; and where the next doubling
    was due but would pass the dataset (None: it was not)."""
    bounds: list[tuple[int, float]] = [(batch, 0.0)]
    while True:
        threshold = _doubling_threshold(model, batch)
        e = None if threshold is None else growth.examples_where(threshold)
        if e is None or e >= horizon:
            return bounds, None
        if 2 * batch > dataset:
            return bounds, max(e, bounds[-1][1])
        batch *= 2
        bounds.append((batch, max(e, bounds[-1][1])))


def _doubling_threshold(model: WallClock, b: float) -> float | None:
    """The noise scale above which batch 2b beats b: (t(2b) − t(b)) / (t(b)/b − t(2b)/2b)."""
    t1, t2 = model.step_time(b), model.step_time(2 * b)
    denominator = t1 / b - t2 / (2 * b)
    if denominator <= 0:
        return None  # doubling never buys throughput (saturated, or accumulating)
    return max(0.0, (t2 - t1) / denominator)


def constant_seconds(inputs: AdvisorInputs, growth: Growth, horizon: float, b: int,
                     model: WallClock | None = None) -> float:
    """Predicted seconds of a run at the constant batch ``b`` over ``horizon`` baseline
    examples, the noise scale following ``growth`` (``model``: the step times, built from
    ``inputs`` when not given)."""
    model = model or wall_clock(inputs, growth.at(growth.e_hi))
    return _steps(growth, b, inputs.baseline_batch, 0.0, horizon) * model.step_time(b)


def best_constant(inputs: AdvisorInputs, growth: Growth, horizon: float,
                  extra: Sequence[int] = ()) -> tuple[int, float]:
    """(batch, predicted seconds) of the constant batch fastest over the whole horizon.

    Allowed batches only (multiples of 8, or 1, 2, 4; of the BatchNorm unit; the
    baseline; the whole dataset where the advisor allows it; ``extra``), never above the
    dataset. On a grid of powers of two and 1.5× them, the baseline, ``extra``, the whole
    dataset and the largest batch of each of the first accumulation pieces (the time
    jumps up past each: a review found the grid's dataset point beat a faster batch just
    under such a jump), then every allowed batch between the best one's grid neighbours
    (up to the dataset past the grid's last point: an audit found 1,544-1,797 of 1,797
    examples skipped).
    """
    model = wall_clock(inputs, growth.at(growth.e_hi))  # once: a hundred batches are timed

    def seconds(b: int) -> float:
        return constant_seconds(inputs, growth, horizon, b, model)

    b0, cap, gpus = inputs.baseline_batch, inputs.dataset_size, max(1, inputs.gpus)
    unit = batch_unit(inputs)
    step = unit if unit > 1 else 8

    def allowed(b: int) -> bool:
        return gpus <= b <= cap and (b % step == 0 or (unit == 1 and b in (1, 2, 4)))

    grid = {b for k in range(40) for b in (unit * 2**k, unit * 3 * 2**k // 2) if allowed(b)}
    per_step = model.per_step
    if math.isfinite(per_step):
        grid |= {b for a in range(1, ACCUMULATION_PIECES + 1)
                 if allowed(b := step * math.floor(min(a * per_step, cap) / step))}
    grid |= {b for b in (b0, *extra) if gpus <= b <= cap}
    if whole_dataset_allowed(inputs, gpus):
        grid.add(cap)
    if not grid:  # fewer examples than devices: the dataset, as the advisor would
        return cap, seconds(cap)
    ordered = sorted(grid)
    best = min(ordered, key=seconds)
    i = ordered.index(best)
    lo, hi = ordered[max(0, i - 1)], ordered[i + 1] if i + 1 < len(ordered) else cap
    near = {b for b in range(step * math.ceil(lo / step), hi + 1, step) if allowed(b)}
    best = min({best, *near}, key=seconds)
    return best, seconds(best)


def build(inputs: AdvisorInputs, growth: Growth, planned_examples: int | None,
          recommended: int | None = None) -> Schedule:
    """The doubling schedule for the measured growth (see the module docstring).

    Args:
        inputs: the advisor's inputs (timing required; ``b_n`` is ignored: the
            growth gives the noise scale along the run).
        growth: B_n as a function of the baseline run's examples.
        planned_examples: the run's length at the baseline batch, if known.
        recommended: the advisor's batch, whose run is predicted on the growth too.
    """
    b0 = inputs.baseline_batch
    if planned_examples is not None:
        horizon, source = float(planned_examples), "training"
    else:
        horizon, source = growth.e_cap, "extrapolation limit"
    start_bn = growth.at(0.0)
    model = wall_clock(inputs, start_bn)
    _, first, _ = model.optimise(allowed_extras(inputs, inputs.gpus))  # the advisor's
    batch = int(round(first))
    # (batch, where it starts on the baseline's axis)
    bounds, past_dataset = _doublings(model, growth, batch, horizon, inputs.dataset_size)
    phases: list[Phase] = []
    steps_of: list[float] = []  # each phase's steps, unrounded
    step = examples = 0
    total = progress = 0.0  # predicted seconds; steps so far, unrounded
    rule = "none"
    for i, (b, e_start) in enumerate(bounds):
        e_end = bounds[i + 1][1] if i + 1 < len(bounds) else horizon
        n = _steps(growth, b, b0, e_start, e_end)
        if i > 0 and round(n) == 0:  # a doubling just before the horizon: no step left
            continue
        a = model.accumulation(b)
        bn = growth.at(e_start)
        lr, rule = scaled_lr(inputs.baseline_lr, b0, b, bn, inputs.optimizer_family,
                             inputs.lr_rule)
        phases.append(Phase(
            batch_size=b, start_step=step, start_examples=examples,
            steps=max(1, round(progress + n) - step),
            learning_rate=lr, grad_accumulation=a,
            per_device_batch_size=math.ceil(b / (a * inputs.gpus)), b_n=bn,
            baseline_examples=e_start, extrapolated=e_start > growth.e_hi,
        ))
        progress += n
        step += phases[-1].steps
        examples += phases[-1].steps * b
        total += n * model.step_time(b)
        steps_of.append(n)
    # each phase ends at the run's step nearest its unrounded end (rounding each phase's
    # own steps lets their errors add up), the last at the first step past the run's
    # progress, as the recommendation counts its steps (a trial: 390 steps at batch 56
    # where the recommendation said 392, partly this)
    phases[-1] = dataclasses.replace(
        phases[-1], steps=max(1, whole_steps(progress) - phases[-1].start_step))
    best_b, best_s = best_constant(inputs, growth, horizon,
                                   () if recommended is None else (recommended,))
    schedule = Schedule(
        phases=never_falling(phases), growth=growth, horizon_examples=int(horizon),
        horizon_source=source, measured_examples=growth.e_hi, seconds=total,
        baseline_seconds=horizon / b0 * as_run(inputs, model).step_time(b0),
        best_constant_batch=best_b, best_constant_seconds=best_s, lr_rule=rule,
        rule_learning_rates=tuple(p.learning_rate for p in phases),
        past_dataset=(None if past_dataset is None
                      else (past_dataset, inputs.dataset_size)),
    )
    # the accumulation form: a micro-batch of the first phase's per-device batch, timed as
    # one step of it on each device, a times per optimizer step, then one all-reduce; over
    # the phases' steps as the batch form's time counts them (unrounded)
    accumulated = sum(
        n * (a * (model.step_time(micro * inputs.gpus) - model.sync) + model.sync)
        for n, (_, micro, a) in zip(steps_of, schedule.accumulation, strict=True))
    return dataclasses.replace(
        schedule, accumulation_seconds=accumulated, recommended_batch=recommended,
        recommended_seconds=(math.nan if recommended is None
                             else constant_seconds(inputs, growth, horizon, recommended)))



def with_measured_lr(s: Schedule, baseline_batch: int, baseline_lr: float, batch: int,
                     factor: float, rule_at: Callable[[float, float], float]) -> Schedule:
    """``s`` with each phase's learning rate corrected by the one measured at ``batch``
    (``factor`` × the rule's there): ``advisor.measured_lr`` at the phase's batch, from
    its rule rate and ``rule_at(batch, b_n)``, the rule's rate at ``batch`` with the
    phase's own B_n; the rule's rates are the schedule's before :func:`never_falling`,
    which then holds the corrected ones."""
    rules = s.rule_learning_rates or tuple(p.learning_rate for p in s.phases)
    phases = tuple(dataclasses.replace(
        p, learning_rate=measured_lr(p.batch_size, rule, baseline_lr,
                                     baseline_batch, batch, rule_at(batch, p.b_n), factor))
        for p, rule in zip(s.phases, rules, strict=True))
    return dataclasses.replace(s, phases=never_falling(phases), lr_measured=(batch, factor))
