"""The pipeline: spec → workload → probe points → hardware → advice → report.

One function, :func:`run`, for every command and every launcher: it takes a
:class:`~bsfind.runner.Runner` and never asks which one it has. The spec is
read here and turned into the plain options each probe takes; below this
module nothing sees a ``Spec``.
"""

from __future__ import annotations

import dataclasses
import math
import time

import torch

from bsfind import advisor, wording
from bsfind.budget import Deadline, ProgressFn
from bsfind.errors import BudgetError, Interrupted
from bsfind.hardware.measure import HardwareOptions, predict_on_gpu
from bsfind.noise.probe import ProbeOptions
from bsfind.report import Report
from bsfind.results import HardwareMeasurement, MemoryModel, NoiseEstimate, TimingCurve
from bsfind.runner import Runner
from bsfind.seeds import Seeds
from bsfind.spec import Spec
from bsfind.training import EpochSampler
from bsfind.workload import Workload

# Share of probe.max_seconds reserved for the hardware measurements (memory and
# the step-time ladder) when they run; the noise probe gets the rest.
HARDWARE_SHARE = 0.25


def probe_options(spec: Spec) -> ProbeOptions:
    """The noise probe's settings from the spec."""
    return ProbeOptions(method=spec.probe.method, batch_size=spec.optimizer.batch_size,
                        microbatch_size=spec.probe.microbatch_size,
                        target_rel_error=spec.probe.target_rel_error)


def hardware_options(spec: Spec) -> HardwareOptions:
    """The hardware measurement's settings from the spec."""
    return HardwareOptions(lr=spec.optimizer.lr, baseline_batch=spec.optimizer.batch_size,
                           memory_fraction=spec.hardware.memory_fraction,
                           seed=Seeds(spec.probe.seed).hardware)


def run(spec: Spec, runner: Runner, command: str, progress: ProgressFn | None = None,
        max_gpus: int | None = None) -> Report:
    """Measure (and, for ``recommend``, advise) as ``command`` asks, on ``runner``.

    Raises:
        BsfindError: a user-caused failure (see ``bsfind.errors``), with a partial
            result inside ``Interrupted`` on Ctrl-C.
    """
    from bsfind.hardware.nvml import describe_device

    start = time.perf_counter()
    deadline = runner.deadline(spec.probe.max_seconds)
    job = runner.build(spec)
    hardware = command == "recommend" and spec.probe.timing
    estimates, status = probe_points(spec, job, runner, deadline, progress,
                                     1.0 - HARDWARE_SHARE if hardware else 1.0)
    used = estimates[-1]
    report = Report(
        command=command, spec=spec.document, device=describe_device(job.device),
        dataset_size=len(job), baseline_batch=spec.optimizer.batch_size,
        baseline_lr=spec.optimizer.lr, optimizer=spec.optimizer.name,
        noise=tuple(estimates), used=used, status=status,
        warnings=tuple(wording.noise_warnings(
            used, dataset_size=len(job), baseline_batch=spec.optimizer.batch_size,
            from_checkpoint=bool(spec.model.checkpoint))),
    )
    if command == "recommend":
        try:
            hw = (runner.measure_hardware(job, hardware_options(spec), deadline, progress)
                  if hardware else HardwareMeasurement(None, None))
            report = advise(report, spec, job, runner, hw, max_gpus)
        except KeyboardInterrupt:
            raise Interrupted("interrupted during the hardware analysis",
                              partial=tuple(estimates)) from None
    return runner.finish(dataclasses.replace(report, seconds=time.perf_counter() - start))


def probe_points(
    spec: Spec, job: Workload, runner: Runner, deadline: Deadline,
    progress: ProgressFn | None, noise_share: float,
) -> tuple[list[NoiseEstimate], str]:
    """Train to each probe point and measure there. Returns (estimates, status)."""
    seeds = Seeds(spec.probe.seed)
    options = probe_options(spec)
    steps = spec.probe_steps()
    sampler = runner.sampler(job, spec.optimizer.batch_size, seeds.training_order)
    optimizer = job.make_optimizer(spec.optimizer.lr) if steps[-1] > 0 else None
    estimates: list[NoiseEstimate] = []
    status, at = "ok", 0
    start, total = time.perf_counter(), deadline.left()
    for i, target in enumerate(steps):
        if target > at:
            assert optimizer is not None
            at = _train_to(job, runner, optimizer, sampler, at, target, deadline, progress,
                           estimates)
            if at < target:
                status = "partial"
                break
        # Budget for this point: an equal share of what is left for noise probing.
        share = max(0.0, total * noise_share - (time.perf_counter() - start)) / (len(steps) - i)
        try:
            est = _measure_point(job, runner, options, seeds, at, deadline.within(share),
                                 spec.probe.curvature, progress)
        except Interrupted as exc:
            part = exc.partial
            raise Interrupted(
                exc.message,
                partial=tuple(estimates) + ((part,) if isinstance(part, NoiseEstimate) else ()),
            ) from None
        except BudgetError:
            if estimates:
                status = "partial"
                break
            raise
        if est.stopped == "budget":
            status = "partial"
        estimates.append(est)
    return estimates, status


def _train_to(
    job: Workload, runner: Runner, optimizer: torch.optim.Optimizer, sampler: EpochSampler,
    at: int, target: int, deadline: Deadline, progress: ProgressFn | None,
    estimates: list[NoiseEstimate],
) -> int:
    """Train from step ``at`` to ``target``; returns the step reached (less on budget)."""
    try:
        reached = runner.train(job, optimizer, target - at, sampler, start_step=at,
                               progress=progress, deadline=deadline)
    except KeyboardInterrupt:
        raise Interrupted(f"interrupted while training to step {target}",
                          partial=tuple(estimates) or None) from None
    if reached < target and not estimates:
        raise BudgetError(
            f"probe.max_seconds ran out while training to step {target} "
            f"(reached {reached}) before any measurement",
            hint="raise probe.max_seconds or lower probe.warmup_steps/at_steps",
        )
    return reached


def _measure_point(job: Workload, runner: Runner, options: ProbeOptions, seeds: Seeds,
                   step: int, deadline: Deadline, curvature: bool,
                   progress: ProgressFn | None) -> NoiseEstimate:
    """B_simple (and B_noise) at the current weights, the noise scale of training step ``step``."""
    # Seeded by the training step, so the same weights get the same sampling
    # whether reached by warmup_steps or by at_steps.
    probe = runner.noise_probe(job, options, seed=seeds.probe(step), step=step,
                               progress=progress)
    if not curvature:
        return probe.run(deadline)
    # B_simple first on half of this point's share, then B_noise on the rest.
    est = probe.run(deadline.within(deadline.left() / 2))
    return runner.curvature(job, est, options, seed=seeds.curvature(step), deadline=deadline,
                            progress=progress)


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
                            sync_seconds=sync, price=price)
    advice = wording.describe_advice(advisor.advise(inputs, max_gpus=max_gpus), inputs)
    return dataclasses.replace(
        report, memory=hw.memory, timing=hw.timing, predicted_gpu=spec.hardware.gpu,
        predicted_memory=pred_mem, predicted_timing=pred_time,
        recommendation=advice.recommendation, candidates=advice.candidates,
        frontier=advice.frontier, absolute=advice.absolute,
        warnings=report.warnings + tuple(notes),
    )


def advisor_inputs(
    used: NoiseEstimate, spec: Spec, job: Workload, *, world: int,
    timing: TimingCurve | None, memory: MemoryModel | None, sync_seconds: float | None,
    price: float | None,
) -> advisor.AdvisorInputs:
    """The advisor's inputs: the noise scale used, the baseline, the measurements.

    ``world`` > 1 (a data-parallel run) replaces ``hardware.gpus``.
    """
    basis: advisor.Basis
    if used.b_noise is not None:
        b_n, ci, basis = used.b_noise, used.b_noise_ci95 or used.ci95, "b_noise"
    elif used.b_simple is not None:
        b_n, ci, basis = used.b_simple, used.ci95, "b_simple"
    else:
        b_n, ci, basis = math.inf, used.ci95, "b_simple"
    examples = spec.training.examples
    if examples is None and spec.training.epochs is not None:
        examples = int(round(spec.training.epochs * len(job)))
    return advisor.AdvisorInputs(
        b_n=max(b_n, 1e-9), b_n_ci=ci, basis=basis, noise_step=used.step,
        baseline_batch=spec.optimizer.batch_size, baseline_lr=spec.optimizer.lr,
        optimizer_family=advisor.optimizer_family(job.optimizer_cls),
        lr_rule=spec.optimizer.lr_rule, dataset_size=len(job),
        gpus=spec.hardware.gpus if world == 1 else world,
        sync_seconds=sync_seconds, timing=timing, memory=memory,
        grad_bytes=sum(p.numel() * p.element_size() for p in job.trainable()),
        interconnect=spec.hardware.interconnect, price_per_hour=price,
        training_examples=examples,
    )
