"""Where along training the noise scale is measured, and what it says for the run.

Three ways, chosen by the spec (``Spec.probe_mode``):

- **along** (the default): bsfind trains at the baseline batch and learning
  rate for a share of the budget and measures at points spaced geometrically
  in steps (0, FIRST_STEP, 2·FIRST_STEP, ...), never past the planned run
  (``training``). The noise scale at initialisation says little about a run
  (docs/validation.md: B_crit grew 6-13× over training on all three shipped
  problems), and single checkpoints are noisy (2-24× apart within ±25% of the
  same step) while the median over nearby ones is stable; so the advice for
  "now" is the median over the last SUMMARY_POINTS points.
- **checkpoints**: at each of ``model.checkpoints``, no training.
- **pinned**: at ``probe.at_steps``, after ``probe.warmup_steps``, or at the
  weights of ``model.checkpoint``; the last point drives the advice.
- **log**: read from a tracker's JSON-lines log (``bsfind schedule SPEC LOG``,
  :func:`from_log`): the user's own run measured itself, nothing is probed.

Every point also records the training loss on a fixed subset of the data, so
the report can say how far training got.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

import torch

from bsfind.budget import Deadline, ProgressFn, now
from bsfind.errors import BudgetError, Interrupted, UsageError, UserCodeError
from bsfind.noise.probe import ProbeOptions
from bsfind.results import Interval, NoiseEstimate, NoisePartial, Trajectory
from bsfind.runner import Runner
from bsfind.seeds import Seeds, global_random
from bsfind.spec import Spec
from bsfind.training import EpochSampler, evaluate_loss, evaluation_subset, host_weights
from bsfind.workload import Workload, load_checkpoint

if TYPE_CHECKING:
    from bsfind.tracker import TrackRecord

# The first training step measured after step 0; later points double it.
FIRST_STEP = 8
# Share of the noise budget that training along the run may take; the probes
# at the points get the rest.
TRAIN_SHARE = 0.5
# Points the median for "now" is taken over (the last ones).
SUMMARY_POINTS = 3
# Training "moved" when the loss fell by at least this fraction (or the planned
# run was reached): only then does the run stand for training beyond initialisation.
MOVED_LOSS_DROP = 0.3
# A probe run whose training loss reaches this multiple of its first point's has diverged
# (the sweeps' criterion, docs/validation.md "How it was measured").
DIVERGED_RISE = 3.0
# Each point's probe may take at most this share of the noise budget.
POINT_SHARE = 0.2
# ... and, however the points are paced to reach the planned run, at least this share:
# a probe needs a few rounds to resolve |G|² at all.
POINT_FLOOR = 0.05
# A tracker log holds a record every few steps; the growth fit sees at most this
# many points, each the median over a stretch of equal width in log(examples)
# (the geometric spacing of the probe's own points).
LOG_POINTS = 16


@dataclasses.dataclass(frozen=True)
class Points:
    """What the probe points gave: every estimate, the run's summary, the status."""

    estimates: tuple[NoiseEstimate, ...]
    used: NoiseEstimate
    trajectory: Trajectory
    status: str
    notes: tuple[str, ...] = ()
    # The optimizer of the run along training, at the last point (None: no training ran,
    # e.g. at checkpoints): the branched runs carry its state (``bsfind.branches``).
    optimizer: torch.optim.Optimizer | None = None
    # The training step of the model's weights now: the last point's, unless the budget
    # (or an out-of-memory error) stopped the run after it trained on.
    weights_step: int = 0
    # The weights the run along training started from, at step 0 (on the CPU): the
    # learning rate is measured from there (``bsfind.branches.measure_lr``). None: no
    # training ran, or they were not asked for.
    start_weights: dict[str, torch.Tensor] | None = None


def measure(spec: Spec, job: Workload, runner: Runner, deadline: Deadline,
            progress: ProgressFn | None, noise_share: float, options: ProbeOptions,
            keep_start: bool = False) -> Points:
    """Measure the noise scale where ``spec.probe_mode`` says; see the module docstring.
    ``keep_start``: keep a CPU copy of the weights the training starts from."""
    walk = _Walk(spec, job, runner, deadline, progress, noise_share, options)
    walk.keep_start = keep_start
    if spec.probe_mode == "checkpoints":
        walk.checkpoints()
    elif spec.probe_mode == "pinned":
        walk.pinned()
    else:
        walk.along()
    if not walk.estimates:
        raise BudgetError("probe.max_seconds ran out before one probe round finished",
                          hint="raise probe.max_seconds")
    return walk.result()


class _Walk:
    """One walk along training: trains, measures at points, keeps the losses."""

    def __init__(self, spec: Spec, job: Workload, runner: Runner, deadline: Deadline,
                 progress: ProgressFn | None, noise_share: float,
                 options: ProbeOptions) -> None:
        self.spec, self.job, self.runner = spec, job, runner
        self.deadline, self.progress, self.options = deadline, progress, options
        self.seeds = Seeds(spec.probe.seed)
        self.b0 = spec.optimizer.batch_size
        self.start = now()
        self.noise_seconds = max(0.0, deadline.left()) * noise_share
        self.eval_idx = evaluation_subset(len(job), self.seeds.evaluation_subset)
        self.estimates: list[NoiseEstimate] = []
        self.status = "ok"
        self.step = 0
        self.train_seconds = 0.0
        self.planned = spec.planned_examples(len(job))
        self.notes: list[str] = []
        self.optimizer: torch.optim.Optimizer | None = None
        self.start_weights: dict[str, torch.Tensor] | None = None
        self.keep_start = False

    # -- the three modes -------------------------------------------------------------
    def pinned(self) -> None:
        steps = self.spec.probe_steps()
        trainer = self._trainer() if steps[-1] > 0 else None
        for i, target in enumerate(steps):
            if target > self.step:
                assert trainer is not None
                if not self._train_to(trainer, target):
                    return
            used = now() - self.start
            share = max(0.0, self.noise_seconds - used) / (len(steps) - i)
            if not self._measure(self.deadline.within(share), self.step * self.b0):
                return

    def checkpoints(self) -> None:
        from bsfind import wording

        entries = self.spec.model.checkpoints or ()
        # every file matches the model before any is measured (a trial's third checkpoint
        # failed after two had been measured); the first is loaded first below anyway
        for i, c in list(enumerate(entries))[1:]:
            load_checkpoint(self.job.model, c.path, self.spec.base_dir,
                            key=f"model.checkpoints[{i}].path")
        last = entries[-1].examples_at(self.b0)
        if self.planned is not None and last > self.planned:
            self.notes.append(wording.log_beyond_plan(last, self.planned,
                                                      "model.checkpoints"))
        for i, c in enumerate(entries):
            load_checkpoint(self.job.model, c.path, self.spec.base_dir,
                            key=f"model.checkpoints[{i}].path")
            examples = c.examples_at(self.b0)
            self.step = c.step if c.step is not None else round(examples / self.b0)
            if self.keep_start and examples == 0:  # the run's start: the rate search's
                self.start_weights = host_weights(self.job.model)
            used = now() - self.start
            share = max(0.0, self.noise_seconds - used) / (len(entries) - i)
            if not self._measure(self.deadline.within(share), examples):
                return

    def along(self) -> None:
        """Measure at step 0, then train and measure at doubling steps while the budget
        (and the planned run) allows."""
        trainer = self._trainer()
        probe_cap = POINT_SHARE * self.noise_seconds
        if not self._measure(self.deadline.within(probe_cap), 0):
            return
        last_probe = self.estimates[-1].seconds
        target = FIRST_STEP
        while True:
            if self.planned is not None:
                target = min(target, self._end_step())
            if target <= self.step:
                return
            per_step = self.train_seconds / self.step if self.step else 0.0
            need = (target - self.step) * per_step
            left = self.noise_seconds - (now() - self.start)
            cap = self._paced_cap(probe_cap, target, per_step, left)
            go = (self.train_seconds + need <= TRAIN_SHARE * self.noise_seconds
                  and need + min(last_probe, cap) <= left)
            if not self.runner.agree(go):  # rank 0 decides for every rank
                return
            if not self._train_to(trainer, target):
                return
            if not self._measure(self.deadline.within(min(cap, max(0.0, left - need))),
                                 self.step * self.b0, partial_ok=True):
                return
            last_probe = self.estimates[-1].seconds
            target = 2 * self.step

    def _end_step(self) -> int:
        """The planned run's last step at the baseline batch (whole steps, at least 1)."""
        assert self.planned is not None
        return max(1, self.planned // self.b0)

    def _paced_cap(self, cap: float, target: int, per_step: float, left: float) -> float:
        """The probe's seconds at step ``target`` (see :func:`paced_probe_seconds`)."""
        if self.planned is None:
            return cap
        end = self._end_step()
        may_train = max(0.0, TRAIN_SHARE * self.noise_seconds - self.train_seconds)
        train_left = may_train
        if per_step > 0:  # the end the training share can reach
            end = min(end, self.step + int(may_train / per_step))
            train_left = max(0, end - self.step) * per_step
        paced = paced_probe_seconds(cap, points_ahead(target, max(end, target)), left,
                                    train_left)
        return min(cap, max(POINT_FLOOR * self.noise_seconds, paced))

    # -- pieces ----------------------------------------------------------------------
    def _trainer(self) -> tuple[torch.optim.Optimizer, EpochSampler]:
        if self.keep_start:
            self.start_weights = host_weights(self.job.model)
        self.optimizer = self.job.make_optimizer(self.spec.optimizer.lr)
        return self.optimizer, self.runner.sampler(self.job, self.b0, self.seeds.training_order)

    def _train_to(self, trainer: tuple[torch.optim.Optimizer, EpochSampler], target: int
                  ) -> bool:
        """Train to step ``target``; False (status partial) when the budget stopped it."""
        from bsfind import wording
        from bsfind.hardware.memory import clear_cache, is_oom

        optimizer, sampler = trainer
        begin = now()
        oom = False
        try:
            reached = self.runner.train(self.job, optimizer, target - self.step, sampler,
                                        start_step=self.step, progress=self.progress,
                                        deadline=self.deadline)
        except Interrupted:  # an inner one: its partial result stands
            raise
        except KeyboardInterrupt:
            raise Interrupted(f"interrupted while training to step {target}",
                              partial=self.partial(tuple(self.estimates))) from None
        except Exception as exc:
            if not (is_oom(exc) and self.estimates and self.spec.probe_mode == "along"):
                raise
            oom = True
        if oom:  # the default run along training is an extra: keep what was measured
            self.job.model.zero_grad(set_to_none=True)
            clear_cache(self.job.device)
            self.notes.append(wording.training_out_of_memory(self.b0, self.step))
            self.status = "partial"
            return False
        self.train_seconds += now() - begin
        self.step = reached
        if reached < target:
            if not self.estimates:
                raise BudgetError(
                    f"probe.max_seconds ran out while training to step {target} "
                    f"(reached {reached}) before any measurement",
                    hint="raise probe.max_seconds or lower probe.warmup_steps/at_steps",
                )
            self.status = "partial"
            return False
        return True

    def _measure(self, deadline: Deadline, examples: int, partial_ok: bool = False) -> bool:
        """Measure at the current weights; False when the budget ended the walk."""
        try:
            est = measure_point(self.job, self.runner, self.options, self.seeds, self.step,
                                deadline, self.spec.probe.curvature, self.progress)
        except Interrupted as exc:
            part = exc.partial
            raise Interrupted(exc.message, partial=self.partial(tuple(self.estimates) + (
                (part,) if isinstance(part, NoiseEstimate) else ()))) from None
        except BudgetError:
            if self.estimates:
                self.status = "partial"
                return False
            raise
        loss = evaluate_loss(self.job, self.eval_idx, chunk=self.b0)
        self._check_diverged(loss)
        self.estimates.append(dataclasses.replace(est, examples_seen=examples, loss=loss))
        if est.stopped == "budget" and not partial_ok:
            self.status = "partial"
        return True

    def _check_diverged(self, loss: float | None) -> None:
        """Along training from the model's initial weights, a training loss DIVERGED_RISE
        times the first point's ends the run: every number after it would rest on a
        diverging run (finite losses pass the NaN check). Only there: a pinned point
        after training (or a checkpoint's) may start near zero, where ordinary bumps
        are several-fold; and only for a positive first loss (a loss may be negative).
        Rank 0 decides for every rank (each evaluates its own data)."""
        if self.spec.probe_mode != "along" or not self.estimates:
            return
        first = self.estimates[0].loss
        diverged = (first is not None and loss is not None and first > 0
                    and loss > DIVERGED_RISE * first)
        if not self.runner.agree(diverged):
            return

        def fmt(x: float | None) -> str:  # another rank's decision: this rank's may be None
            return "?" if x is None else f"{x:.3g}"

        raise UserCodeError(
            f"the training loss rose from {fmt(first)} (step {self.estimates[0].step}) to "
            f"{fmt(loss)} (step {self.step}) while the probe trained at the baseline "
            f"(batch {self.b0}, optimizer.lr={self.spec.optimizer.lr:g}): training diverges",
            hint="lower optimizer.lr, or check the loss and the optimizer's settings")

    # -- the result ------------------------------------------------------------------
    def used(self, points: Sequence[NoiseEstimate]) -> NoiseEstimate:
        """The value the advice uses from ``points``: along training or at checkpoints the
        median of the last three (:func:`summarize`), pinned the last point."""
        return (summarize(points) if self.spec.probe_mode != "pinned" and len(points) > 1
                else points[-1])

    def partial(self, points: tuple[NoiseEstimate, ...]) -> NoisePartial | None:
        """What an interruption leaves: ``points`` and the value the advice would use."""
        return NoisePartial(points, self.used(points)) if points else None

    def result(self) -> Points:
        mode = self.spec.probe_mode
        used = self.used(self.estimates)
        first, last = self.estimates[0], self.estimates[-1]
        # the plan's last whole step (3,594 examples at batch 32: step 112, 3,584 examples,
        # which the examples themselves never reach: a trial's finished run was warned)
        reached = (self.planned is not None and last.examples_seen is not None
                   and last.examples_seen >= self._end_step() * self.b0)
        moved = mode != "along" or reached or (
            first.loss is not None and last.loss is not None
            and last.loss <= (1 - MOVED_LOSS_DROP) * first.loss)
        examples = last.examples_seen
        trajectory = Trajectory(
            mode=mode, steps=last.step, examples=examples,
            epochs=None if examples is None else examples / len(self.job),
            loss_from=first.loss, loss_to=last.loss,
            b_simple_first=first.b_simple, b_simple_last=used.b_simple, moved=moved,
            planned_examples=self.planned,
            checkpoint=self.spec.model.checkpoint if mode != "checkpoints" else None,
        )
        return Points(tuple(self.estimates), used, trajectory, self.status, tuple(self.notes),
                      self.optimizer, self.step, self.start_weights)


def points_ahead(target: int, end: int) -> int:
    """The points the walk along training measures from step ``target`` to step ``end``
    (the planned run's last), both included: target, 2·target, ... capped at ``end``."""
    n = 1
    while target < end:
        target, n = min(2 * target, end), n + 1
    return n


def paced_probe_seconds(cap: float, points: int, left: float, train_left: float) -> float:
    """Seconds for the next probe point: at most ``cap``, and no more than an even share,
    over the ``points`` still to measure, of the budget ``left`` after ``train_left``
    seconds of training to the planned run's end. On a slow machine (a loaded CI runner)
    each point is then less precise, but the walk still reaches the end of the run, where
    the advice comes from (issue #14: under load the walk used to stop at a quarter of
    the run and the advice fell 3×)."""
    return min(cap, max(0.0, left - train_left) / max(points, 1))


def summarize(points: Sequence[NoiseEstimate], k: int = SUMMARY_POINTS) -> NoiseEstimate:
    """The median over the last ``k`` points measured after initialisation.

    An unresolved point counts as larger than every resolved one (its noise scale
    exceeds what was probed), so the median is unresolved when most are. The
    interval spans the points' own intervals: it says how far the noise scale
    moved between them, not only how precisely each was measured.
    """
    later = [p for p in points if p.step > 0 or p.examples_seen] or list(points)
    last = later[-k:]
    values = sorted(p.b_simple if p.b_simple is not None else float("inf") for p in last)
    mid = statistics.median(values)
    b_simple = None if mid == float("inf") else mid
    noise = [p.b_noise for p in last]
    b_noise = statistics.median(noise) if all(v is not None for v in noise) else None  # type: ignore[type-var]
    noise_cis = [p.b_noise_ci95 for p in last]
    return dataclasses.replace(
        last[-1],
        b_simple=b_simple,
        ci95=Interval(min(p.ci95.low for p in last), max(p.ci95.high for p in last)),
        **_median_components(last),
        b_noise=b_noise,
        b_noise_ci95=(Interval(min(c.low for c in noise_cis if c is not None),
                               max(c.high for c in noise_cis if c is not None))
                      if b_noise is not None and all(c is not None for c in noise_cis)
                      else None),
        examples=sum(p.examples for p in last),
        rounds=sum(p.rounds for p in last),
        seconds=sum(p.seconds for p in last),
        summary_of=tuple(p.step for p in last),
    )


def measure_point(job: Workload, runner: Runner, options: ProbeOptions, seeds: Seeds,
                   step: int, deadline: Deadline, curvature: bool,
                   progress: ProgressFn | None) -> NoiseEstimate:
    """B_simple (and B_noise) at the current weights, the noise scale of training step ``step``."""
    # Seeded by the training step, so the same weights get the same sampling (and
    # dropout masks) whether reached by warmup_steps or by at_steps; training's own
    # random state is left as it was.
    with global_random(seeds.probe(step), job.device):
        probe = runner.noise_probe(job, options, seed=seeds.probe(step), step=step,
                                   progress=progress)
        if not curvature:
            return probe.run(deadline)
        # B_simple first on half of this point's share, then B_noise on the rest.
        est = probe.run(deadline.within(deadline.left() / 2))
        return runner.curvature(job, est, options, seed=seeds.curvature(step),
                                deadline=deadline, progress=progress)


# ------------------------------------------------------------------- a tracker's log


def from_log(records: Sequence[TrackRecord], *, dataset_size: int, planned: int | None,
             source: str) -> Points:
    """The points of a tracker log (``bsfind.track(..., log=path)``), as the probe's.

    The estimates are at most LOG_POINTS medians over stretches of equal width in
    log(examples seen), for the growth fit and the table; "now" is the median over
    the last SUMMARY_POINTS records (each already smoothed over the tracker's window).

    Raises:
        UsageError: the log has no record after the first training examples.
    """
    from bsfind import wording

    later = [r for r in records if r.examples > 0]
    if not later:
        raise UsageError(f"{source}: the tracker log has no measured step",
                         hint="let the run log a few records (tracker.update() after "
                              "each backward) before planning from it")
    # Runs appended to one file: the examples count starts again; plan from the last run.
    restart = max((i for i in range(1, len(later))
                   if later[i].examples < later[i - 1].examples), default=0)
    notes = (wording.log_restarted(source, restart, len(later)),) if restart else ()
    later = later[restart:]
    # A record is smoothed over the tracker's window: its own measurement and the
    # window - 1 before it, each a record of the log (one per measured step; before the
    # log's first line, when its head was cut off, counted at that line's batch)
    windows = [range(i - max(r.window, 1) + 1, i + 1) for i, r in enumerate(later)]

    def examples(indices: Iterable[int]) -> int:
        return sum(later[max(j, 0)].trained for j in indices)

    each = [_record_estimate(r, len(w), examples(w)) for r, w in zip(later, windows,
                                                                      strict=True)]
    points = tuple(_median_point(g) for g in _log_stretches(each, LOG_POINTS))
    used = summarize(each) if len(each) > 1 else each[-1]
    # "now"'s windows overlap: count the measurements behind it once
    behind = set().union(*windows[-SUMMARY_POINTS:])
    used = dataclasses.replace(used, rounds=len(behind), examples=examples(behind))
    if points[-1].step != used.step:  # the stretch's middle: end the points at "now"
        points += (used,)
    first, last = later[0], later[-1]
    return Points(points, used, Trajectory(
        mode="log", steps=last.step, examples=last.examples,
        epochs=last.examples / dataset_size if dataset_size else None,
        loss_from=first.loss, loss_to=last.loss,
        b_simple_first=next((p.b_simple for p in points if p.b_simple is not None), None),
        b_simple_last=used.b_simple, moved=True,
        planned_examples=planned,
    ), "ok", notes)


def _record_estimate(r: TrackRecord, rounds: int, examples: int) -> NoiseEstimate:
    """A log record as an estimate: ``rounds`` measurements of ``examples`` behind it."""
    unknown = Interval(math.nan, math.nan)  # the tracker logs the ratio's interval only
    return NoiseEstimate(
        b_simple=r.b_simple, ci95=r.ci95, grad_norm_sq=r.grad_norm_sq,
        grad_norm_sq_ci95=unknown, trace_sigma=r.trace_sigma, trace_sigma_ci95=unknown,
        method=r.method, method_reason="read from a tracker log",
        b_small=r.b_small, b_big=r.b_big, examples=examples, rounds=rounds, seconds=0.0,
        stopped="logged", step=r.step, examples_seen=r.examples, loss=r.loss)


def _log_stretches(points: list[NoiseEstimate], n: int) -> list[list[NoiseEstimate]]:
    """``points`` (ascending examples) in at most ``n`` groups of equal log-width."""
    lo = math.log(points[0].examples_seen or 1)
    width = (math.log(points[-1].examples_seen or 1) - lo) / n
    groups: dict[int, list[NoiseEstimate]] = {}
    for p in points:
        k = 0 if width <= 0 else min(int((math.log(p.examples_seen or 1) - lo) / width), n - 1)
        groups.setdefault(k, []).append(p)
    return [groups[k] for k in sorted(groups)]


def _median_point(group: list[NoiseEstimate]) -> NoiseEstimate:
    """One point for a stretch: its middle record, with the median noise scale (an
    unresolved record counting as the largest) and the interval of them all."""
    values = sorted(p.b_simple if p.b_simple is not None else math.inf for p in group)
    mid = statistics.median(values)
    losses = [p.loss for p in group if p.loss is not None]
    return dataclasses.replace(
        group[len(group) // 2],
        b_simple=None if mid == math.inf else mid,
        ci95=Interval(min(p.ci95.low for p in group), max(p.ci95.high for p in group)),
        **_median_components(group),
        loss=statistics.median(losses) if losses else None,
    )


def _median_components(points: Sequence[NoiseEstimate]) -> dict[str, Any]:
    """|G|² and tr(Σ) of several points: each its median, with the interval that spans
    the points' own (so that it holds the median; NaN where a point's is unknown). The
    medians are taken apart: their ratio need not be the median B_simple."""
    def span(cis: list[Interval]) -> Interval:
        ends = [c.low for c in cis] + [c.high for c in cis]
        if any(math.isnan(v) for v in ends):
            return Interval(math.nan, math.nan)
        return Interval(min(c.low for c in cis), max(c.high for c in cis))

    return {"grad_norm_sq": statistics.median(p.grad_norm_sq for p in points),
            "grad_norm_sq_ci95": span([p.grad_norm_sq_ci95 for p in points]),
            "trace_sigma": statistics.median(p.trace_sigma for p in points),
            "trace_sigma_ci95": span([p.trace_sigma_ci95 for p in points])}
