"""The pipeline: spec → workload → probe points → hardware → advice → report.

One function, :func:`run`, for every command and every launcher: it takes a
:class:`~bsfind.runner.Runner` and never asks which one it has. The spec is
read here and turned into the plain options each probe takes; below this
module nothing sees a ``Spec``.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import math
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, NamedTuple

from bsfind import advisor, schedule, trajectory, wording
from bsfind.budget import Deadline, ProgressFn, counts_from_command, now
from bsfind.errors import BudgetError, Interrupted
from bsfind.hardware.measure import BUSY_SHARE, HardwareOptions, predict_on_gpu, quota_threads
from bsfind.noise.probe import ProbeOptions
from bsfind.report import Report
from bsfind.results import (
    BranchPartial,
    BranchResult,
    HardwareMeasurement,
    Interval,
    LrSearch,
    MemoryModel,
    NoiseEstimate,
    NoisePartial,
    RunAverage,
    TimingCurve,
)
from bsfind.runner import Runner
from bsfind.seeds import Seeds, global_random
from bsfind.spec import Spec
from bsfind.training import host_weights, kept_buffers_and_grads, offloaded
from bsfind.workload import (
    Workload,
    model_loss,
    spread_indices,
    text_inputs,
    uneven_token_weights,
)

if TYPE_CHECKING:
    import torch

    from bsfind.tracker import TrackRecord

# Share of probe.max_seconds reserved for the hardware measurements (memory and
# the step-time ladder) when they run; the noise probe gets the rest.
HARDWARE_SHARE = 0.25
# Share of probe.max_seconds the branched runs get when they run (probe.branches, or
# `bsfind branch`): the points along training then get 1 - BRANCH_SHARE (less the
# hardware's share), and the branches whatever of the budget is left before the
# hardware's reserve.
BRANCH_SHARE = 0.4
# Share of probe.max_seconds kept for the learning rate measured at the recommended
# batch (probe.lr_branches, on by default): the points along training get that much
# less. 6 s of the default 60: the search costs 2-8 branches of LR_STEPS (32) steps.
LR_SHARE = 0.1


SUM_CHECK_EXAMPLES = 8
SUMMED = (1.7, 2.3)  # the loss of the batch repeated twice over the batch's, for a sum
LINEAR = (1.8, 2.2)  # (thrice - once) over (twice - once): 2 for a sum, log 3/log 2 = 1.58
#                      for an in-batch contrastive loss, which repeating moves by log k


def summed_over_batch(job: Workload) -> float | None:
    """The loss of SUM_CHECK_EXAMPLES examples repeated twice over theirs, when the loss
    adds up its examples (``reduction='sum'``) instead of averaging them: a mean over the
    batch is the same for the batch repeated, a sum doubles, and grows in proportion
    (thrice: three times). A loss over the batch as a whole, such as a contrastive one
    with in-batch negatives, moves by log k for k repeats: twice can look doubled (L + log
    2 over L is 2 at L = 0.69: a review's CLIP-style loss), thrice then moves by less than
    twice as much again. The model runs in eval mode for the three forwards (dropout,
    functional or not, and stochastic depth off; BatchNorm on its running statistics:
    each example's output does not depend on the batch), its modes and buffers put back.
    Else None; a model or loss that fails on these batches, or a loss that is not finite,
    is left to the measurement."""
    import torch

    from bsfind.errors import HardwareError, UserCodeError
    from bsfind.hardware.memory import is_oom

    if len(job) < 1:
        return None
    idx = spread_indices(len(job), SUM_CHECK_EXAMPLES)
    try:
        # (under a caller's inference_mode too, what is put back is a normal tensor)
        with (torch.inference_mode(False), torch.no_grad(), kept_buffers_and_grads(job.model),
              _eval_mode(job.model)):
            one, two, three = (float(job.loss(idx.repeat(k))) for k in (1, 2, 3))
    except (UserCodeError, HardwareError):
        return None
    except RuntimeError as exc:
        if is_oom(exc):
            return None
        raise
    if not all(math.isfinite(v) for v in (one, two, three)) or one == 0 or two == one:
        return None
    ratio, linear = two / one, (three - one) / (two - one)
    return (ratio if SUMMED[0] <= ratio <= SUMMED[1] and LINEAR[0] <= linear <= LINEAR[1]
            else None)


@contextlib.contextmanager
def _eval_mode(model: torch.nn.Module) -> Iterator[None]:
    """The whole model in eval mode for the block; each module's own mode put back."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training


def item_warnings(job: Workload) -> list[str]:
    """What the model and the examples make of the measurement: BatchNorm layers the
    factory froze, a per-token mean loss over examples of different token counts, a loss
    that adds up the batch's examples, text that reaches the model as strings."""
    return (([wording.frozen_norms(job.frozen_norms)] if job.frozen_norms else [])
            + ([wording.token_mean(job.loss_fn is model_loss)] if uneven_token_weights(job)
               else [])
            + ([wording.summed_loss(ratio)] if (ratio := summed_over_batch(job)) else [])
            + ([wording.text_inputs(keys)] if (keys := text_inputs(job)) else []))


def probe_options(spec: Spec, job: Workload | None = None, world: int = 1) -> ProbeOptions:
    """The noise probe's settings from the spec (and, with ``job``, its BatchNorm batch)."""
    return ProbeOptions(method=spec.probe.method, batch_size=spec.optimizer.batch_size,
                        microbatch_size=spec.probe.microbatch_size,
                        target_rel_error=spec.probe.target_rel_error,
                        norm_batch=norm_batch(spec, job, world) if job is not None else None)


def norm_batch(spec: Spec, job: Workload, world: int = 1) -> int | None:
    """The per-device BatchNorm batch of a model with BatchNorm in training mode, else None:
    the baseline batch over the devices it is trained on (the ranks of a data-parallel
    run, else ``hardware.gpus``), at least 2."""
    return batchnorm_batch(job.model, spec.optimizer.batch_size,
                           world if world > 1 else spec.hardware.gpus)


def batchnorm_batch(model: torch.nn.Module, batch_size: int, devices: int = 1) -> int | None:
    """``batch_size`` over ``devices``, at least 2 (BatchNorm1d cannot normalise one
    example), for a model with BatchNorm in training mode; else None."""
    from bsfind.torch_compat import has_batchnorm_in_training

    if not has_batchnorm_in_training(model):
        return None
    return max(2, batch_size // max(1, devices))


def measured_norm_batch(spec: Spec, job: Workload, used: NoiseEstimate, world: int = 1
                        ) -> int | None:
    """The BatchNorm batch the noise scale ``used`` was measured with, for a model with
    BatchNorm in training mode: the probe's micro-batches (:func:`norm_batch`), or the
    small batch of a tracker's log (its accumulated micro-batches, each a BatchNorm
    batch). None without BatchNorm."""
    from bsfind.torch_compat import has_batchnorm_in_training

    if used.method.endswith("microbatch"):
        return norm_batch(spec, job, world)
    # (a DDP log's small batch is a rank's whole share of the step, micro-batches summed:
    # not a BatchNorm batch)
    if used.method != "ddp" and used.b_small > 1 and has_batchnorm_in_training(job.model):
        return int(used.b_small)
    return None


def hardware_deadline(deadline: Deadline, spec: Spec, lr_reserve: float) -> Deadline:
    """The hardware measurement's deadline: what is left less the learning-rate search's
    reserve, but never less than the hardware's own share of the budget when that much is
    left (the advice needs the step time; the search only refines the learning rate)."""
    own = min(max(0.0, deadline.left()), HARDWARE_SHARE * spec.probe.max_seconds)
    return deadline.within(max(own, deadline.left() - lr_reserve))


def hardware_options(spec: Spec) -> HardwareOptions:
    """The hardware measurement's settings from the spec."""
    return HardwareOptions(lr=spec.optimizer.lr, baseline_batch=spec.optimizer.batch_size,
                           memory_fraction=spec.hardware.memory_fraction,
                           seed=Seeds(spec.probe.seed).hardware)


def run(spec: Spec, runner: Runner, command: str, progress: ProgressFn | None = None,
        max_gpus: int | None = None) -> Report:
    """Measure (and, for ``recommend``, advise) as ``command`` asks, on ``runner``.

    Raises:
        BsfindError: a user-caused failure (see ``bsfind.errors``).
        Interrupted: Ctrl-C (a ``KeyboardInterrupt``), with a partial result.
    """
    deadline = runner.deadline(spec.probe.max_seconds)
    start = deadline.end - spec.probe.max_seconds  # the command's start, under the CLI
    job = runner.build(spec)
    setup = now() - start  # Python, torch and the user's factories
    try:  # (dropout's masks the same in every run of the spec: seeds.global_random)
        with runner.fit_to_load(job), global_random(Seeds(spec.probe.seed).training_order,
                                                    job.device):
            report = _measure_and_advise(spec, runner, command, job, deadline, progress,
                                         max_gpus)
    except BudgetError as exc:  # nothing measured: say where the budget went
        took = wording.setup_took(setup, spec.probe.max_seconds, counts_from_command())
        raise BudgetError(exc.message, hint=f"{exc.hint}; {took}" if exc.hint else took
                          ) from exc
    if command == "noise" and spec.probe.branches:  # (a trial: ignored without a word)
        report = dataclasses.replace(report, warnings=report.warnings + (
            wording.branches_not_in_noise(),))
    fitted = getattr(runner, "fitted", None)  # recommend says so with its step times
    if command != "recommend" and fitted is not None and fitted.reduced:
        report = dataclasses.replace(report, warnings=report.warnings + (
            wording.probed_beside_load(fitted.share or BUSY_SHARE, fitted.threads),))
    if fitted is not None and fitted.quota is not None and fitted.run_threads is not None:
        report = dataclasses.replace(report, warnings=report.warnings + (
            wording.capped_by_quota(fitted.quota, fitted.run_threads,
                                    quota_threads(fitted.quota)),))
    return runner.finish(dataclasses.replace(report, seconds=now() - start))


def _measure_and_advise(spec: Spec, runner: Runner, command: str, job: Workload,
                        deadline: Deadline, progress: ProgressFn | None,
                        max_gpus: int | None) -> Report:
    """:func:`run` once the workload is built."""
    hardware = command == "recommend" and spec.probe.timing
    world = runner.world_size
    searching = lr_searching(spec, command, world)
    points = trajectory.measure(spec, job, runner, deadline, progress,
                                noise_share(spec, command, hardware, world),
                                probe_options(spec, job, world), keep_start=searching)
    lr_reserve = LR_SHARE * spec.probe.max_seconds if searching else 0.0
    branched, branch_notes = (
        branch_points(spec, job, runner, points, deadline, progress,
                      reserve=lr_reserve + (HARDWARE_SHARE * spec.probe.max_seconds
                                            if hardware else 0.0))
        if branching(spec, command) else ((), ()))
    report = dataclasses.replace(
        points_report(spec, job, command, points,
                      norm_batch=measured_norm_batch(spec, job, points.used,
                                                     runner.world_size),
                      notes=branch_notes),
        status="partial" if any(b.stopped == "budget" for b in branched) else points.status,
        branches=branched, branch_run_average=branch_run_average(spec, branched))
    if command == "recommend":
        # The run's optimizer state is not the training's memory (on a GPU): on the host
        # while the memory is measured, and while the learning rate is measured up to
        # the largest batch that memory allows.
        with offloaded(points.optimizer):
            try:
                with global_random(Seeds(spec.probe.seed).hardware, job.device):
                    hw = (runner.measure_hardware(job, hardware_options(spec),
                                                  hardware_deadline(deadline, spec,
                                                                    lr_reserve), progress)
                          if hardware else HardwareMeasurement(None, None))
                report = advise(report, spec, job, runner, hw, max_gpus)
            except Interrupted:  # an inner one: its partial result stands
                raise
            except KeyboardInterrupt:  # (the branches' results, finished, are kept)
                raise Interrupted("interrupted during the hardware analysis",
                                  partial=measured_so_far(spec, points, branched)) from None
            report = measured_lr(report, spec, job, runner, points, deadline, progress)
    return report


def points_report(spec: Spec, job: Workload, command: str, points: trajectory.Points, *,
                  norm_batch: int | None = None, notes: tuple[str, ...] = ()) -> Report:
    """The report of the noise scale measured (or read) at ``points``, with its warnings;
    no hardware and no advice yet."""
    from bsfind.hardware.nvml import describe_device

    return Report(
        command=command, spec=spec.document, device=describe_device(job.device),
        dataset_size=len(job), baseline_batch=spec.optimizer.batch_size,
        baseline_lr=spec.optimizer.lr, optimizer=spec.optimizer.name,
        noise=points.estimates, used=points.used, status=points.status,
        trajectory=points.trajectory,
        warnings=tuple(wording.noise_warnings(
            points.used, points.trajectory, dataset_size=len(job),
            baseline_batch=spec.optimizer.batch_size,
            from_checkpoint=bool(spec.model.checkpoint),
            advice=command in ("recommend", "schedule"),
            partial=points.status == "partial", norm_batch=norm_batch))
        + tuple(item_warnings(job)) + points.notes + notes,
    )


def plan_from_log(spec: Spec, runner: Runner, records: Sequence[TrackRecord], source: str,
                  progress: ProgressFn | None = None, max_gpus: int | None = None,
                  notes: Sequence[str] = ()) -> Report:
    """``bsfind schedule``: the advice and the batch-size schedule from the noise scale a
    tracker logged along the user's own run, with this machine's hardware measured
    (or ``hardware.gpu`` predicted) as ``recommend`` measures it. No noise probe runs:
    the hardware gets the whole of ``probe.max_seconds``. ``notes``: about the log
    (a last line left out), for the report's warnings.

    Raises:
        BsfindError: a user-caused failure (an empty log, a spec that does not build).
    """

    deadline = runner.deadline(spec.probe.max_seconds)
    start = deadline.end - spec.probe.max_seconds  # the command's start, under the CLI
    # the noise scale comes from the log: model.checkpoints (the last run's files, perhaps
    # cleaned up since) are never loaded here, so the build does not ask for them
    job = runner.build(dataclasses.replace(
        spec, model=dataclasses.replace(spec.model, checkpoints=None)))
    planned = spec.planned_examples(len(job))
    points = trajectory.from_log(records, dataset_size=len(job), planned=planned,
                                 source=source)
    trained = [r.trained for r in records]
    # the batches the run trained with: those of two records in a row, not an epoch's
    # partial last batch, which comes alone between full ones (a review: epochs of few
    # measured steps made it look like a batch of the run)
    logged = {a for a, b in zip(trained, trained[1:], strict=False) if a == b} or (
        {collections.Counter(trained).most_common(1)[0][0]} if trained else set())
    bn = measured_norm_batch(spec, job, points.used)
    notes = [*notes, *([wording.log_batch_differs(sorted(logged), spec.optimizer.batch_size,
                                                  batchnorm=bn is not None)] if (
        logged and logged != {spec.optimizer.batch_size}) else [])]
    own = sum(p.numel() for p in job.trainable())
    counted = sorted({r.parameters for r in records if r.parameters is not None})
    if counted and own not in counted:  # (a log of another model planned without a word)
        notes.append(wording.log_of_another_model(counted, own))
    reached = points.trajectory.examples
    if planned is not None and reached is not None and reached > planned:
        notes.append(wording.log_beyond_plan(reached, planned))
    report = points_report(spec, job, "schedule", points, notes=tuple(notes), norm_batch=bn)
    with global_random(Seeds(spec.probe.seed).hardware, job.device):
        hw = (runner.measure_hardware(job, hardware_options(spec), deadline, progress)
              if spec.probe.timing else HardwareMeasurement(None, None))
    report = advise(report, spec, job, runner, hw, max_gpus)
    if report.recommendation is not None:  # no training: nothing to measure the rate from
        report = with_note(report, wording.lr_not_measured(
            report.recommendation.lr_rule, "bsfind schedule trains nothing"))
    if report.schedule is None:
        timed = any(c.step_seconds is not None and math.isfinite(c.step_seconds)
                    for c in report.candidates)
        resolved = sum(p.b_simple is not None for p in points.estimates)
        report = dataclasses.replace(report, warnings=report.warnings + (
            wording.no_schedule(resolved, len(points.estimates), timed,
                                timing_off=not spec.probe.timing,
                                budget=hw.timing is None and deadline.passed()),))
    return runner.finish(dataclasses.replace(report, seconds=now() - start))


def advise(report: Report, spec: Spec, job: Workload, runner: Runner, hw: HardwareMeasurement,
           max_gpus: int | None) -> Report:
    """What-if predictions (``hardware.gpu``), then the advisor, then the words."""
    pred_mem = pred_time = None
    price = spec.hardware.price_per_hour
    if spec.hardware.gpu:
        pred_mem, pred_time, gpu_price = predict_on_gpu(
            job, hw.memory, spec.hardware.gpu, precision=spec.hardware.precision,
            opts=hardware_options(spec))
        price = price if price is not None else gpu_price
    notes = list(hw.notes)
    if spec.hardware.gpu:  # the predicted step time is the one used, not the measured one:
        # none measured here is no loss ("the advice uses the noise scale only" is untrue)
        notes = [n for n in notes if n not in (wording.NO_TIMING,
                                               wording.NO_TIMING_ON_EVERY_RANK)]
    elif hw.timing_threads is not None or hw.timing_cpu_clock:
        shares = [x for x in (hw.busy_before, hw.busy_share) if x is not None]
        notes.append(wording.timed_beside_load(max(shares, default=BUSY_SHARE),
                                               hw.timing_threads, hw.timing_cpu_clock))
    elif hw.busy_share is not None and hw.busy_share >= BUSY_SHARE:
        notes.append(wording.busy_while_timing(hw.busy_share))
    world, gpus = runner.world_size, spec.hardware.gpus
    if world > 1 and gpus not in (1, world):
        notes.insert(0, wording.gpus_ignored_under_torchrun(gpus, world))
    sync = hw.sync_seconds
    if spec.hardware.gpu and sync is not None:  # the planned GPUs' link, not this machine's
        notes.append(wording.measured_sync_unused(sync, spec.hardware.gpu))
        sync = None
    assert report.used is not None
    inputs = advisor_inputs(report.used, spec, job, world=world,
                            timing=pred_time or hw.timing, memory=pred_mem or hw.memory,
                            sync_seconds=sync, price=price,
                            from_log=report.trajectory is not None
                            and report.trajectory.mode == "log")
    measured = inputs
    pair = branch_pair(report.noise, report.branches[-1], inputs) if report.branches else None
    inputs = calibrated_inputs(inputs, report.branches, pair)
    advice = wording.describe_advice(advisor.advise(inputs, max_gpus=max_gpus), inputs)
    if inputs is not measured and pair is not None:
        advice = wording.with_branches(advice, inputs, report.branches[-1], pair.b_n,
                                       "B_noise" if measured.basis == "b_noise" else "B_simple",
                                       same_weights=pair.same_weights)
    floor_note = batchnorm_floor_note(inputs, advice.recommendation.batch_size)
    if floor_note is not None:
        notes.append(floor_note)
    return dataclasses.replace(
        report, memory=hw.memory, timing=hw.timing, predicted_gpu=spec.hardware.gpu,
        predicted_memory=pred_mem, predicted_timing=pred_time,
        recommendation=advice.recommendation, candidates=advice.candidates,
        frontier=advice.frontier, absolute=advice.absolute,
        schedule=batch_schedule(calibrated_points(report.noise, measured, inputs,
                                                  pair.b_n if pair is not None else None),
                                inputs,
                                spec.planned_examples(len(job)),
                                advice.recommendation.batch_size),
        warnings=report.warnings + tuple(notes),
    )


def batch_schedule(points: tuple[NoiseEstimate, ...], inputs: advisor.AdvisorInputs,
                   planned: int | None, recommended: int | None = None
                   ) -> schedule.Schedule | None:
    """The doubling schedule from the noise scale along training (``schedule.py``); None
    without a usable step time, with fewer than two points after initialisation, or when
    none of them is resolved. An unresolved point enters with its interval's lower end,
    what it did measure: left out, the fit ended before it and extrapolated below it."""
    if not advisor.timing_usable(inputs):
        return None
    values = [(p.examples_seen, *growth_value(p, inputs.basis)) for p in points
              if p.examples_seen]
    if len(values) < 2 or all(bound for _, _, bound in values):
        return None  # lower bounds alone say how far the probe saw, not how B_n grew
    growth = schedule.fit_growth([(e, v) for e, v, _ in values],  # type: ignore[misc]
                                 bounds_at={e for e, _, bound in values if bound})
    return None if growth is None else schedule.build(inputs, growth, planned, recommended)


def batchnorm_floor_note(inputs: advisor.AdvisorInputs, batch: int) -> str | None:
    """The warning when a BatchNorm model's recommendation ``batch`` sits at the advice's
    floor (one BatchNorm batch per device) and that floor is BATCHNORM_ABOVE times the
    noise scale's whole interval: ``check`` cannot flag such a baseline. None otherwise."""
    floor = advisor.batch_unit(inputs)
    if not (inputs.norm_batch and batch == floor
            and wording.BATCHNORM_ABOVE * inputs.b_n_ci.high < floor):
        return None
    basis = {"b_noise": "B_noise", "b_simple": "B_simple"}.get(inputs.basis, "B_n")
    return wording.batchnorm_floor(floor, inputs.norm_batch, inputs.b_n, inputs.b_n_ci,
                                   basis, inputs.noise_from_log)


def basis_value(p: NoiseEstimate, basis: advisor.Basis) -> tuple[float | None, Interval | None]:
    """A point's noise scale on ``basis`` and its interval (B_noise's, else B_simple's)."""
    return (p.b_noise, p.b_noise_ci95) if basis == "b_noise" else (p.b_simple, p.ci95)


def growth_value(p: NoiseEstimate, basis: advisor.Basis) -> tuple[float | None, bool]:
    """A point's noise scale for the growth fit, and whether it is only a lower bound:
    the basis's value, or when unresolved the positive lower end of its interval (None:
    not even that)."""
    value, ci = basis_value(p, basis)
    if value is not None:
        return value, False
    low = ci.low if ci is not None else math.nan
    return (low if math.isfinite(low) and low > 0 else None), True


def point_noise_scale(p: NoiseEstimate, basis: advisor.Basis) -> tuple[float, Interval] | None:
    """A point's noise scale on ``basis`` as the advice takes it, and its interval: B_noise
    (None when not measured there), or B_simple; an unresolved B_simple is at least the
    largest batch probed (and the interval's low end), with no upper end."""
    if basis == "b_noise":
        return None if p.b_noise is None else (p.b_noise, p.b_noise_ci95 or p.ci95)
    if p.b_simple is not None:
        return p.b_simple, p.ci95
    low = max(float(p.b_big), p.ci95.low if math.isfinite(p.ci95.low) else 0.0)
    return low, Interval(low, math.inf)


def basis_for(job: Workload, used: NoiseEstimate) -> advisor.Basis:
    """Which noise scale the advice rests on, per optimizer family (docs/validation.md).

    SGD family: B_noise when it was measured (it tracked the fitted B_crit to
    0.83-1.10× on the CNN). Adam family: always B_simple (within 0.34-2.4× of
    B_crit, while B_noise read about 3× low late in training under Adam/AdamW).
    """
    family = advisor.optimizer_family(job.optimizer_cls)
    return "b_noise" if used.b_noise is not None and family == "sgd" else "b_simple"


def advisor_inputs(
    used: NoiseEstimate, spec: Spec, job: Workload, *, world: int,
    timing: TimingCurve | None, memory: MemoryModel | None, sync_seconds: float | None,
    price: float | None, from_log: bool = False,
) -> advisor.AdvisorInputs:
    """The advisor's inputs: the noise scale used, the baseline, the measurements.

    ``world`` > 1 (a data-parallel run) replaces ``hardware.gpus``.
    """
    basis: advisor.Basis = basis_for(job, used)
    value = point_noise_scale(used, basis)
    assert value is not None  # (basis_for picks B_noise only where it was measured)
    b_n, ci = value
    examples = spec.training.examples
    if examples is None and spec.training.epochs is not None:
        examples = int(round(spec.training.epochs * len(job)))
    return advisor.AdvisorInputs(
        b_n=max(b_n, 1e-9), b_n_ci=ci, basis=basis, noise_step=used.step,
        noise_checkpoint=None if from_log else spec.model.checkpoint,
        b_n_lower_bound=used.b_simple is None and basis == "b_simple",
        norm_batch=measured_norm_batch(spec, job, used, world),
        noise_summary_of=used.summary_of, noise_from_log=from_log,
        baseline_batch=spec.optimizer.batch_size, baseline_lr=spec.optimizer.lr,
        optimizer_family=advisor.optimizer_family(job.optimizer_cls),
        lr_rule=spec.optimizer.lr_rule, dataset_size=len(job),
        gpus=spec.hardware.gpus if world == 1 else world,
        sync_seconds=sync_seconds, timing=timing, memory=memory,
        grad_bytes=sum(p.numel() * p.element_size() for p in job.trainable()),
        interconnect=spec.hardware.interconnect, price_per_hour=price,
        training_examples=examples,
    )


# --------------------------------------------------------------------------- branches


def branching(spec: Spec, command: str) -> bool:
    """Whether this run measures the critical batch by branched runs (``bsfind.branches``)."""
    return command == "branch" or (command == "recommend" and spec.probe.branches)


def noise_share(spec: Spec, command: str, hardware: bool, world: int = 1) -> float:
    """The share of the budget the points along training may take."""
    share = 1.0 - HARDWARE_SHARE if hardware else 1.0
    share -= LR_SHARE if lr_searching(spec, command, world) else 0.0
    return share - BRANCH_SHARE if branching(spec, command) else share


def lr_noise_scale(job: Workload, used: NoiseEstimate) -> float:
    """The B_n the branches' learning-rate rule reads: the advisor's basis; unresolved, at
    least the largest batch probed (and the interval's low end), as the advisor takes it
    (the rule's rate grows with B_n: an unresolved value is not taken as infinite)."""
    value = used.b_noise if basis_for(job, used) == "b_noise" else used.b_simple
    if value is not None:
        return value
    low = max(float(used.b_big), used.ci95.low if math.isfinite(used.ci95.low) else 0.0)
    return low if low > 0 else math.inf


def branch_points(spec: Spec, job: Workload, runner: Runner, points: trajectory.Points,
                  deadline: Deadline, progress: ProgressFn | None, *, reserve: float
                  ) -> tuple[tuple[BranchResult, ...], tuple[str, ...]]:
    """The branched runs from the probe point: the last point of the run along training
    (its optimizer state carried), or each of ``model.checkpoints`` (a fresh one).

    They get what is left of the budget before ``reserve`` (the hardware's share),
    split evenly over the checkpoints. Returns the results and warnings.

    Raises:
        Interrupted: Ctrl-C, with a :class:`BranchPartial` of what was measured.
    """
    from bsfind import branches
    from bsfind.workload import load_checkpoint

    if runner.world_size > 1:
        return (), (wording.BRANCHES_UNDER_TORCHRUN,)
    b0 = spec.optimizer.batch_size
    base = branches.BranchOptions(
        baseline_batch=b0, lr=spec.optimizer.lr,
        family=advisor.optimizer_family(job.optimizer_cls), lr_rule=spec.optimizer.lr_rule,
        b_n=lr_noise_scale(job, points.used), seed=spec.probe.seed)
    starts: list[tuple[NoiseEstimate | None, str | None, int]]
    if spec.probe_mode == "checkpoints":
        entries = spec.model.checkpoints or ()
        starts = [(est, entries[i].path, i) for i, est in enumerate(points.estimates)]
    else:
        last = points.estimates[-1]
        starts = [(last if last.step == points.weights_step else None, None, 0)]
    done: list[BranchResult] = []
    had = max(0.0, deadline.left() - reserve)  # the branches' whole budget
    for n, (est, path, i) in enumerate(starts):
        if path is not None:
            load_checkpoint(job.model, path, spec.base_dir, key=f"model.checkpoints[{i}].path")
        step = est.step if est is not None else points.weights_step
        # a checkpoint's branches read its own noise scale: a local measurement of its
        # weights alone, whatever else the list holds
        b_n = base.b_n if path is None or est is None else lr_noise_scale(job, est)
        options = dataclasses.replace(
            base, step=step, b_n=b_n,
            examples_seen=est.examples_seen if est is not None else step * b0,
            b_simple=est.b_simple if est is not None else None,
            b_noise=est.b_noise if est is not None else None,
            checkpoint=spec.model.checkpoint)
        share = max(0.0, deadline.left() - reserve) / (len(starts) - n)
        try:
            done.append(branches.measure(job, options, deadline.within(share),
                                         optimizer=points.optimizer if path is None else None,
                                         progress=progress))
        except Interrupted as exc:
            part = exc.partial if isinstance(exc.partial, BranchResult) else None
            raise Interrupted(exc.message, partial=measured_so_far(
                spec, points, (*done, *((part,) if part else ())))) from None
    spent, planned = sum(r.examples for r in done), spec.planned_examples(len(job))
    cut = ladders_cut_note(done, had=had, baseline_batch=b0, dataset_size=len(job),
                           max_seconds=spec.probe.max_seconds,
                           checkpoints=spec.probe_mode == "checkpoints")
    return tuple(done), ((wording.branches_past_plan(spent, planned),)
                         if planned is not None and spent > planned else ()) + (
        (cut,) if cut is not None else ())


def ladders_cut_note(results: Sequence[BranchResult], *, had: float, baseline_batch: int,
                     dataset_size: int, max_seconds: float, checkpoints: bool) -> str | None:
    """When the time budget cut ladders short: what the branches had, what a complete
    ladder takes here (``branches.ladder_seconds``, the longest of them), and what gives
    complete reads: the probe.max_seconds whose BRANCH_SHARE of the increase covers every
    ladder at that length (rounded up to 10 s), or, with ``model.checkpoints``, how many
    complete ladders ``had`` covers. None when none was cut by the budget."""
    from bsfind import branches

    cut = [r for r in results if r.stopped == "budget"]
    if not cut:
        return None
    planned = branches.ladder(baseline_batch, dataset_size)
    rung_seconds: dict[int, float] = {}
    for r in results:
        for g in r.rungs:
            rung_seconds[g.batch_size] = max(g.seconds, rung_seconds.get(g.batch_size, 0.0))
    need = max(branches.ladder_seconds(r, planned, rung_seconds) for r in results)
    more = max(0.0, len(results) * need - had) / BRANCH_SHARE
    suggested = math.ceil((max_seconds + more) / 10 - 1e-9) * 10
    fit = int(had // need) if need > 0 else len(results)
    return wording.ladders_cut([r.step for r in cut], had=had, ladders=len(results),
                               need=need, max_seconds=max_seconds, suggested=suggested,
                               fit=fit if checkpoints and 0 < fit < len(results) else None)


def measured_so_far(spec: Spec, points: trajectory.Points,
                    branched: tuple[BranchResult, ...]) -> NoisePartial | BranchPartial:
    """What an interrupted run shows: the noise points, and the branches' results with
    their run average when any ran (a trial: Ctrl-C after the branches, in the hardware
    analysis, dropped them)."""
    noise = NoisePartial(points.estimates, points.used)
    if not branched:
        return noise
    return BranchPartial(noise, branched, branch_run_average(spec, branched))


def branch_run_average(spec: Spec, results: tuple[BranchResult, ...]) -> RunAverage | None:
    """The run's critical batch between ``model.checkpoints`` from their branches
    (``branches.run_average_of``); None for one point or fewer than two reads."""
    from bsfind import branches

    if spec.probe_mode != "checkpoints":
        return None
    return branches.run_average_of(results, spec.optimizer.batch_size)


class BranchPair(NamedTuple):
    """The noise scale a branch read is paired with (:func:`branch_pair`)."""

    b_n: float
    ci: Interval
    lower_bound: bool  # an unresolved B_simple's lower bound
    same_weights: bool  # measured at the branches' own weights


def branch_pair(points: Sequence[NoiseEstimate], r: BranchResult,
                inputs: advisor.AdvisorInputs) -> BranchPair:
    """The noise scale the branches' read ``r`` is paired with: the advisor's basis
    measured at the branches' own weights (the point at their step and examples seen), as
    docs/validation.md paired them (√(basis there · branches) within 2x of the sweeps'
    B_crit on 20 of 28 points), not the summary the advice reads without branches (a
    trial: the median of the last three points, 107, from step 256, beside the read at
    step 1,123, where B_simple was 115). The advisor's own B_n when no point was measured
    at those weights, or it has no value on the basis there."""
    same = [p for p in points if p.step == r.step and p.examples_seen == r.examples_seen]
    value = None
    if same and inputs.basis != "branches":
        value = point_noise_scale(same[-1], inputs.basis)
    if value is None:
        return BranchPair(inputs.b_n, inputs.b_n_ci, inputs.b_n_lower_bound, False)
    unresolved = inputs.basis == "b_simple" and same[-1].b_simple is None
    return BranchPair(*value, lower_bound=unresolved, same_weights=True)


def calibrated_inputs(inputs: advisor.AdvisorInputs, results: tuple[BranchResult, ...],
                      pair: BranchPair | None = None) -> advisor.AdvisorInputs:
    """``inputs`` with B_n calibrated by the branches at the latest point: √(B_n · local
    critical batch) (``branches.calibrated`` says why), B_n being ``pair``'s (by default
    the advisor's: :func:`branch_pair` gives the one at the branches' weights); unchanged
    when none gave a local critical batch."""
    from bsfind import branches

    if pair is None:
        pair = BranchPair(inputs.b_n, inputs.b_n_ci, inputs.b_n_lower_bound, False)
    value = branches.calibrated(results[-1], pair.b_n, pair.ci) if results else None
    if value is None:
        return inputs
    b_n, ci = value
    return dataclasses.replace(inputs, b_n=b_n, b_n_ci=ci, basis="branches",
                               noise_step=results[-1].step, noise_summary_of=(),
                               b_n_lower_bound=pair.lower_bound)


def calibrated_points(points: tuple[NoiseEstimate, ...], measured: advisor.AdvisorInputs,
                      inputs: advisor.AdvisorInputs, paired: float | None = None
                      ) -> tuple[NoiseEstimate, ...]:
    """The points along training for the schedule: when branches calibrated B_n, each
    point's noise scale (the measured basis) times the same factor, calibrated ÷
    ``paired`` (the noise scale the branches were paired with; by default the advisor's),
    so that the schedule's growth curve passes through the calibrated value where that
    was measured."""
    base = measured.b_n if paired is None else paired
    if inputs is measured or not math.isfinite(base):
        return points
    factor = inputs.b_n / base

    def scaled(p: NoiseEstimate) -> NoiseEstimate:
        value, ci = basis_value(p, measured.basis)
        # the interval too: an unresolved point enters the growth at its lower end
        return dataclasses.replace(
            p, b_simple=None if value is None else value * factor,
            ci95=(Interval(math.nan, math.nan) if ci is None
                  else Interval(ci.low * factor, ci.high * factor)))

    return tuple(scaled(p) for p in points)


# --------------------------------------------------------------------------- learning rate


def lr_searching(spec: Spec, command: str, world: int = 1) -> bool:
    """Whether this run measures the learning rate at the recommended batch: ``recommend``
    with ``probe.lr_branches`` in one process, when the probe trains from the model's
    initial weights (the short runs start there)."""
    return command == "recommend" and lr_search_skipped_by_spec(spec, world) is None


def lr_search_skipped_by_spec(spec: Spec, world: int) -> str | None:
    """Why the spec (or the launcher) rules the learning-rate search out (None: it does not)."""
    if not spec.probe.lr_branches:
        return "probe.lr_branches is off"
    if world > 1:
        return "it is not measured under torchrun: run bsfind in one process to measure it"
    if spec.model.checkpoints and all(c.examples_at(spec.optimizer.batch_size) > 0
                                      for c in spec.model.checkpoints):
        return ("model.checkpoints lists no entry at step 0, the start of training, where "
                "the short runs start")
    if spec.model.checkpoint:
        return ("the weights come from model.checkpoint, not from the start of training, "
                "where short runs read the learning rate low (docs/validation.md)")
    if spec.probe_mode == "pinned" and spec.probe_steps()[-1] == 0:
        return "the probe trains no steps (probe.at_steps [0])"
    return None


def lr_search_skipped(report: Report, spec: Spec, runner: Runner, points: trajectory.Points
                      ) -> str | None:
    """Why the learning rate is not measured here (None: it is)."""
    assert report.recommendation is not None
    why = lr_search_skipped_by_spec(spec, runner.world_size)
    if why is not None:
        return why
    if points.start_weights is None:
        return "the probe run kept no starting weights"
    return None


def lr_micro_batch(batch: int, memory: MemoryModel | None,
                   norm_batch: int | None = None) -> int | None:
    """The micro-batch the learning-rate runs accumulate, as the recommendation does:
    the largest that fits in one step on this device when ``batch`` does not, and no more
    than a BatchNorm model's BatchNorm batch (``norm_batch``); None: one per step."""
    caps = [c for c in (memory.max_batch_size if memory is not None else None, norm_batch)
            if c is not None and batch > c]
    return max(1, min(caps)) if caps else None


def measured_lr(report: Report, spec: Spec, job: Workload, runner: Runner,
                points: trajectory.Points, deadline: Deadline, progress: ProgressFn | None
                ) -> Report:
    """The report with the learning rate measured at the recommended batch by short
    runs from the probe run's starting weights (``branches.measure_lr``), the schedule's
    phases corrected to match; when it cannot run, the report says the learning rate is
    the rule's extrapolation from lr0. The model's weights are left as they were.

    Raises:
        Interrupted: Ctrl-C, with the noise points measured.
    """
    from bsfind import branches

    rec = report.recommendation
    if rec is None:
        return report
    why = lr_search_skipped(report, spec, runner, points)
    if why is not None:
        return with_note(report, wording.lr_not_measured(rec.lr_rule, why))
    assert points.start_weights is not None
    options = branches.LrOptions(
        batch_size=rec.batch_size, rule_lr=rec.learning_rate, lr_rule=rec.lr_rule,
        baseline_lr=spec.optimizer.lr, seed=spec.probe.seed,
        micro_batch=lr_micro_batch(rec.batch_size, report.memory,
                                   measured_norm_batch(spec, job, points.used)))
    now: dict[str, torch.Tensor] = {}
    try:
        # The weights now on the CPU: the device holds the runs' own copies.
        now = host_weights(job.model)
        job.model.load_state_dict(points.start_weights)
        search = branches.measure_lr(job, options, deadline,
                                     job.make_optimizer(spec.optimizer.lr), progress=progress)
    except (Interrupted, KeyboardInterrupt) as exc:
        message = (exc.message if isinstance(exc, Interrupted)
                   else "interrupted while measuring the learning rate")
        raise Interrupted(message, partial=measured_so_far(spec, points,
                                                           report.branches)) from None
    finally:
        if now:
            job.model.load_state_dict(now)
    family = advisor.optimizer_family(job.optimizer_cls)

    def rule_at(b: float, b_n: float) -> float:
        return advisor.scaled_lr(spec.optimizer.lr, spec.optimizer.batch_size, b, b_n,
                                 family, spec.optimizer.lr_rule)[0]

    return with_lr_search(report, search, rule_at)


def with_note(report: Report, note: str) -> Report:
    """``report`` with ``note`` added to its recommendation's notes."""
    rec = report.recommendation
    assert rec is not None
    return dataclasses.replace(report, recommendation=dataclasses.replace(
        rec, notes=(*rec.notes, note)))


def with_lr_search(report: Report, search: LrSearch,
                   rule_at: Callable[[float, float], float]) -> Report:
    """``report`` with the measured learning rate in its recommendation (and warm-up) and
    schedule; the rule's stands, with the search's notes, when no trial gave a finite
    loss or only one ran. A search the budget cut short makes the report partial.
    ``rule_at(batch, b_n)``: the rule's rate (for the schedule's phases)."""
    rec = report.recommendation
    assert rec is not None
    # With no trial, or the rule's own rate only before the search was cut, the line
    # already says what its notes say (search.notes keep them, for the JSON)
    said = not search.trials or wording.one_trial_cut(search)
    notes = (*rec.notes, wording.lr_search_line(search), *(() if said else search.notes))
    status = "partial" if search.stopped == "budget" else report.status
    # one trial (the rule's own rate) compared nothing: the rule's stands, unmeasured
    finished = any(math.isfinite(t.loss) for t in search.trials) and len(search.trials) > 1
    cut = (wording.LR_SEARCH_CUT_SHORT if finished else wording.LR_SEARCH_CUT_ONE
           if search.trials else wording.LR_SEARCH_CUT_FIRST)
    if search.stopped == "budget" and cut not in report.warnings:
        report = dataclasses.replace(report, warnings=(*report.warnings, cut))
    if not finished:
        return dataclasses.replace(report, lr_search=search, status=status,
                                   recommendation=dataclasses.replace(rec, notes=notes))
    sched = report.schedule
    if sched is not None:
        sched = schedule.with_measured_lr(sched, report.baseline_batch, report.baseline_lr,
                                          search.batch_size, search.factor, rule_at)
    warmup = (wording.warmup_text(rec.batch_size, report.baseline_batch, report.baseline_lr,
                                  search.learning_rate, rec.warmup_steps)
              if rec.warmup_steps is not None else rec.warmup)
    return dataclasses.replace(
        report, lr_search=search, schedule=sched, status=status,
        recommendation=dataclasses.replace(rec, learning_rate=search.learning_rate,
                                           lr_factor=search.factor, notes=notes,
                                           warmup=warmup))
