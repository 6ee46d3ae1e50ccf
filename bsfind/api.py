"""The Python API: what the CLI calls, usable from a notebook or a script.

    from bsfind import load_spec, recommend
    report = recommend(load_spec("configs/digits-mlp.yaml"))
    print(report.recommendation.batch_size)

    from bsfind import measure_noise_scale
    est = measure_noise_scale(model, dataset, torch.nn.functional.cross_entropy, batch_size=64)

Each function returns typed results (``Report``, ``NoiseEstimate``); nothing
here prints. Progress goes to an optional callback ``progress(phase, fraction,
message)``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import torch

from bsfind.errors import BudgetError, Interrupted
from bsfind.noise.probe import Deadline, NoiseProbe, ProgressFn, train_steps
from bsfind.report import Report
from bsfind.results import MemoryModel, NoiseEstimate, TimingCurve
from bsfind.spec import Spec, spec_from_dict
from bsfind.workload import LossFn, Workload, build

if TYPE_CHECKING:
    from bsfind.distributed import Parallel

# Share of probe.max_seconds reserved for the hardware measurements (memory and
# the step-time ladder) when they run; the noise probe gets the rest.
HARDWARE_SHARE = 0.25
# Largest batch the step-time ladder tries; beyond it the linear fit extrapolates.
TIMING_MAX_BATCH = 4096


def _probe_points(
    job: Workload, deadline: Deadline, progress: ProgressFn | None, noise_share: float,
    par: Parallel | None = None,
) -> tuple[list[NoiseEstimate], str]:
    """Train to each probe point and measure there. Returns (estimates, status).

    ``par``: the data-parallel versions of training, probe and B_noise (torchrun).
    """
    train = train_steps if par is None else par.train_steps
    make_probe = NoiseProbe if par is None else par.noise_probe
    curvature_fn = _with_curvature if par is None else par.curvature
    spec = job.spec
    steps = spec.probe_steps()
    gen = torch.Generator().manual_seed(spec.probe.seed + 1)
    optimizer = job.make_optimizer() if steps[-1] > 0 else None
    estimates: list[NoiseEstimate] = []
    status = "ok"
    at = 0
    start = time.perf_counter()
    total = deadline.left()
    for i, target in enumerate(steps):
        if target > at:
            assert optimizer is not None
            try:
                at = train(job, optimizer, target - at, spec.optimizer.batch_size, gen,
                           start_step=at, progress=progress, deadline=deadline)
            except KeyboardInterrupt:
                raise Interrupted(f"interrupted while training to step {target}",
                                  partial=tuple(estimates) or None) from None
            if at < target:
                status = "partial"
                if not estimates:
                    raise BudgetError(
                        f"probe.max_seconds ran out while training to step {target} "
                        f"(reached {at}) before any measurement",
                        hint="raise probe.max_seconds or lower probe.warmup_steps/at_steps",
                    )
                break
        # Budget for this point: an equal share of what is left for noise probing.
        used = time.perf_counter() - start
        noise_left = max(0.0, total * noise_share - used)
        share = noise_left / (len(steps) - i)
        point_deadline = Deadline(min(deadline.end, deadline.clock() + share), deadline.clock)
        probe = make_probe(
            job,
            method=spec.probe.method,
            batch_size=spec.optimizer.batch_size,
            microbatch_size=spec.probe.microbatch_size,
            target_rel_error=spec.probe.target_rel_error,
            # Seeded by the training step, so the same weights get the same
            # sampling whether reached by warmup_steps or by at_steps.
            seed=spec.probe.seed + 1000 + at,
            step=at,
            progress=progress,
        )
        curvature = spec.probe.curvature
        if curvature:
            # B_simple first on half of this point's share, then B_noise on the rest.
            half = Deadline(min(point_deadline.end, deadline.clock() + share / 2), deadline.clock)
        try:
            est = probe.run(half if curvature else point_deadline)
            if curvature:
                est = curvature_fn(job, est, point_deadline, progress)
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


def _with_curvature(
    job: Workload, est: NoiseEstimate, deadline: Deadline, progress: ProgressFn | None
) -> NoiseEstimate:
    """Add B_noise (tr(HΣ)/GᵀHG) measured at the same weights."""
    from bsfind.noise.curvature import CurvatureProbe

    spec = job.spec
    cp = CurvatureProbe(job, batch_size=spec.optimizer.batch_size,
                        microbatch_size=spec.probe.microbatch_size,
                        seed=spec.probe.seed + 77 + est.step,
                        target_rel_error=spec.probe.target_rel_error,
                        progress=progress, step=est.step)
    try:
        value, ci, rounds, seconds = cp.run(deadline)
    except KeyboardInterrupt:
        raise Interrupted("interrupted during the curvature probe", partial=est) from None
    return dataclasses.replace(est, b_noise=value, b_noise_ci95=ci,
                               seconds=est.seconds + seconds)


def measure(spec: Spec, progress: ProgressFn | None = None) -> Report:
    """Run the noise probe(s) of a spec: the ``bsfind noise`` command."""
    return _run(spec, progress, command="noise")


def recommend(
    spec: Spec, progress: ProgressFn | None = None, max_gpus: int | None = None
) -> Report:
    """Probe noise and hardware, then advise: the ``bsfind recommend`` command.

    Args:
        max_gpus: also compute the time/cost frontier for 1..max_gpus devices.
    """
    return _run(spec, progress, command="recommend", max_gpus=max_gpus)


def write_plot(report: Report, path: Any) -> Any:
    """Write the candidates' predicted time and cost against batch size (PNG/SVG)."""
    from pathlib import Path

    from bsfind.errors import UsageError
    from bsfind.plot import plot_candidates

    if not report.candidates:
        raise UsageError("--plot: there are no candidates to plot")
    try:
        return plot_candidates(report.candidates, Path(path),
                               title=f"bsfind: {report.spec['model']['factory']}")
    except ImportError as exc:
        raise UsageError(str(exc)) from None
    except ValueError as exc:
        raise UsageError(f"--plot {path}: {exc}") from None
    except OSError as exc:
        raise UsageError(f"--plot {path}: cannot write ({exc.strerror or exc})") from None


def _run(
    spec: Spec, progress: ProgressFn | None, command: str, max_gpus: int | None = None,
    par: Parallel | None = None,
) -> Report:
    if par is None:
        from bsfind import distributed

        if distributed.requested():  # a rank of torchrun: comes back here with ``par``
            return distributed.run(spec, progress, command, max_gpus)
    start = time.perf_counter()
    deadline = (Deadline.after(spec.probe.max_seconds) if par is None
                else par.deadline(spec.probe.max_seconds))
    job = build(spec) if par is None else par.build(spec)
    from bsfind.hardware.nvml import describe_device

    device = describe_device(job.device)
    hardware = command == "recommend" and spec.probe.timing
    estimates, status = _probe_points(job, deadline, progress,
                                      1.0 - HARDWARE_SHARE if hardware else 1.0, par)
    used = estimates[-1]
    warnings: list[str] = []
    if used.b_simple is None:
        warnings.append(
            "|G|² was not resolved: the noise scale exceeds the largest batch probed; "
            "the recommendation is the largest batch considered"
        )
    if len(job) < spec.optimizer.batch_size:
        warnings.append(
            f"the dataset has only {len(job)} examples, fewer than the baseline batch "
            f"{spec.optimizer.batch_size}: the probe samples with replacement, so the estimate "
            f"is still sound, but no recommendation exceeds {len(job)}"
        )
    if used.step == 0 and not spec.model.checkpoint:
        warnings.append(
            "measured at initialisation: the noise scale changes as training proceeds "
            "(it usually grows, often 10x, but can also start high), so a step-0 value may "
            "misrepresent the run; use probe.warmup_steps, probe.at_steps or model.checkpoint"
        )
    report = Report(
        command=command,
        spec=spec.document,
        device=device,
        dataset_size=len(job),
        baseline_batch=spec.optimizer.batch_size,
        baseline_lr=spec.optimizer.lr,
        optimizer=spec.optimizer.name,
        noise=tuple(estimates),
        used=used,
        status=status,
        warnings=tuple(warnings),
    )
    if command == "recommend":
        try:
            report = _advise(report, job, deadline, progress, hardware, max_gpus, par)
        except KeyboardInterrupt:
            raise Interrupted("interrupted during the hardware analysis",
                              partial=tuple(estimates)) from None
    return dataclasses.replace(report, seconds=time.perf_counter() - start)


def ladder_start(model: torch.nn.Module) -> int:
    """Smallest batch to time: 2 when BatchNorm (training mode) needs > 1 value per channel."""
    from torch.nn.modules.batchnorm import _BatchNorm

    return 2 if any(isinstance(m, _BatchNorm) and m.training for m in model.modules()) else 1


def _step_function(job: Workload, seed: int) -> Callable[[int], None]:
    """One full training step (forward, backward, optimizer) at batch B.

    Runs on the live model; callers wrap it in ``_scratch_weights`` so the
    weights the noise was measured at are restored afterwards.
    """
    optimizer = job.make_optimizer()
    gen = torch.Generator().manual_seed(seed)

    def step(b: int) -> None:
        idx = torch.randint(len(job), (b,), generator=gen)
        optimizer.zero_grad(set_to_none=True)
        job.loss(idx).backward()
        optimizer.step()

    return step


@contextlib.contextmanager
def _scratch_weights(job: Workload) -> Iterator[None]:
    """Let hardware measurements train freely, then restore weights and buffers."""
    saved = {k: v.detach().clone() for k, v in job.model.state_dict().items()}
    try:
        yield
    finally:
        job.model.load_state_dict(saved)
        job.model.zero_grad(set_to_none=True)


def _measure_hardware(
    job: Workload, deadline: Deadline, progress: ProgressFn | None
) -> tuple[MemoryModel | None, TimingCurve | None, list[str]]:
    """Memory model and step-time ladder on the probe's own device."""
    from bsfind.hardware import memory as mem
    from bsfind.hardware import nvml, timing

    spec = job.spec
    notes: list[str] = []
    fraction = spec.hardware.memory_fraction
    with _scratch_weights(job):
        step = _step_function(job, spec.probe.seed + 5)
        if progress is not None:
            progress("memory", 0.0, "memory model")
        if job.device.type == "cuda":
            memory = mem.measure_memory_cuda(step, (2, 8, 32), job.device,
                                             memory_fraction=fraction)
            memory = mem.verify_max_batch(memory, step, lambda: mem.clear_cache(job.device))
        else:

            def make_batch(b: int) -> tuple[Any, torch.Tensor]:
                return job.batch(torch.randint(len(job), (b,)))

            memory = mem.predict_memory(
                job.model, make_batch, job.loss_fn, job.optimizer_cls,
                limit_bytes=mem.cpu_memory_limit(fraction),
                optimizer_kwargs={"lr": spec.optimizer.lr, **job.optimizer_kwargs},
            )
        if progress is not None:
            progress("memory", 1.0, f"max batch {memory.max_batch_size:,} ({memory.source})")
            progress("timing", 0.0, "timing steps")
        ladder_top = min(memory.max_batch_size, TIMING_MAX_BATCH)
        sizes = timing.geometric_ladder(
            ladder_start(job.model), max(ladder_start(job.model), ladder_top))
        util = None
        if job.device.type == "cuda" and nvml.available():
            index = job.device.index or 0

            def util() -> float | None:
                return nvml.sample_utilization(index)

        try:
            curve = timing.time_ladder(
                step, sizes, device=job.device, max_seconds=max(0.0, deadline.left()),
                max_batch=memory.max_batch_size, sample_util=util,
            )
        except BudgetError:
            curve = None
            notes.append("the time budget ran out before any step was timed: no step-time "
                         "curve; the advice uses the noise scale only")
        if progress is not None:
            progress("timing", 1.0, "timed")
    return memory, curve, notes


def _advise(
    report: Report,
    job: Workload,
    deadline: Deadline,
    progress: ProgressFn | None,
    hardware: bool,
    max_gpus: int | None,
    par: Parallel | None = None,
) -> Report:
    """Hardware measurements (if enabled), what-if predictions, then the advisor.

    ``par`` (torchrun): measure on every rank; advise for its world size and all-reduce time.
    """
    from bsfind import advisor

    spec = job.spec
    memory = curve = None
    warnings = list(report.warnings)
    if hardware:
        measure = _measure_hardware if par is None else par.measure_hardware
        memory, curve, notes = measure(job, deadline, progress)
        warnings += notes
    pred_mem = pred_time = None
    price = spec.hardware.price_per_hour
    if spec.hardware.gpu:
        pred_mem, pred_time, gpu_price = _what_if(job, memory, spec.hardware.gpu)
        price = price if price is not None else gpu_price
    used = report.used
    assert used is not None
    if used.b_noise is not None:
        basis: advisor.Basis
        b_n, ci, basis = used.b_noise, used.b_noise_ci95 or used.ci95, "b_noise"
    elif used.b_simple is not None:
        b_n, ci, basis = used.b_simple, used.ci95, "b_simple"
    else:
        b_n, ci, basis = math.inf, used.ci95, "b_simple"
    examples = spec.training.examples
    if examples is None and spec.training.epochs is not None:
        examples = int(round(spec.training.epochs * len(job)))
    grad_bytes = sum(p.numel() * p.element_size() for p in job.trainable())
    inputs = advisor.AdvisorInputs(
        b_n=max(b_n, 1e-9),
        b_n_ci=ci,
        basis=basis,
        noise_step=used.step,
        baseline_batch=spec.optimizer.batch_size,
        baseline_lr=spec.optimizer.lr,
        optimizer_family=advisor.optimizer_family(job.optimizer_cls),
        lr_rule=spec.optimizer.lr_rule,
        dataset_size=len(job),
        timing=pred_time or curve,
        memory=pred_mem or memory,
        gpus=spec.hardware.gpus if par is None else par.world_size,
        sync_seconds=None if par is None else par.advice_sync_seconds,
        grad_bytes=grad_bytes,
        interconnect=spec.hardware.interconnect,
        price_per_hour=price,
        training_examples=examples,
    )
    advice = advisor.advise(inputs, max_gpus=max_gpus)
    return dataclasses.replace(
        report,
        memory=memory,
        timing=curve,
        predicted_gpu=spec.hardware.gpu,
        predicted_memory=pred_mem,
        predicted_timing=pred_time,
        recommendation=advice.recommendation,
        candidates=advice.candidates,
        frontier=advice.frontier,
        absolute=advice.absolute,
        warnings=tuple(warnings),
    )


def _what_if(
    job: Workload, memory: MemoryModel | None, gpu_name: str
) -> tuple[MemoryModel, TimingCurve, float | None]:
    """Predicted memory limit and t(B) on a GPU that is not present."""
    from bsfind.errors import UsageError
    from bsfind.hardware import gpus
    from bsfind.hardware import memory as mem

    spec = job.spec
    try:
        gpu = gpus.get_gpu(gpu_name)
    except KeyError as exc:
        raise UsageError(f"hardware.gpu: {exc.args[0]}") from None

    def make_batch(b: int) -> tuple[Any, torch.Tensor]:
        return job.batch(torch.randint(len(job), (b,)))

    with _scratch_weights(job):
        if memory is None or memory.source != "predicted":
            memory = mem.predict_memory(
                job.model, make_batch, job.loss_fn, job.optimizer_cls,
                limit_bytes=gpu.memory_bytes,
                optimizer_kwargs={"lr": spec.optimizer.lr, **job.optimizer_kwargs},
            )
        flops = gpus.flops_per_example(job.model, make_batch, job.loss_fn)
    pred_time = gpus.predict_timing(flops, gpu, spec.hardware.precision)
    pred_mem = gpus.predict_memory_on(gpu, memory, spec.hardware.memory_fraction)
    return pred_mem, pred_time, gpu.price_per_hour


def measure_noise_scale(
    model: torch.nn.Module,
    dataset: Any,
    loss_fn: LossFn,
    *,
    batch_size: int = 64,
    method: str = "auto",
    target_rel_error: float = 0.1,
    max_seconds: float = 60.0,
    seed: int = 0,
    progress: ProgressFn | None = None,
) -> NoiseEstimate:
    """Measure B_simple of ``model`` on ``dataset`` at its current weights.

    Args:
        model: any nn.Module (its weights are not changed).
        dataset: a map-style dataset of (input, target) pairs.
        loss_fn: fn(outputs, targets) -> mean loss.
        batch_size: the starting big batch (grown while |G|² is unresolved).
        method: "auto", "per-example" or "microbatch".
    """
    spec = spec_from_dict(
        {
            "model": {"factory": "bsfind.models:mlp"},
            "data": {"factory": "bsfind.data:synthetic"},
            "optimizer": {"lr": 1e-3, "batch_size": batch_size},
            "probe": {"seed": seed, "method": method, "target_rel_error": target_rel_error,
                      "max_seconds": max_seconds},
        }
    )
    job = Workload.from_objects(model, dataset, loss_fn, spec=spec)
    probe = NoiseProbe(job, method=method, batch_size=batch_size,
                       target_rel_error=target_rel_error, seed=seed, progress=progress)
    return probe.run(Deadline.after(max_seconds))


# --------------------------------------------------------------------------- CI preflight


@dataclasses.dataclass(frozen=True)
class CheckResult:
    """``bsfind check``: is the baseline batch within ``tolerance``× of the advice?"""

    within: bool
    ratio: float  # max(B0/B*, B*/B0) >= 1
    baseline_batch: int
    recommended_batch: int
    tolerance: float
    message: str
    cached: bool
    document: dict[str, Any]


def cache_key(spec: Spec) -> str:
    """Key of a spec's result: the spec, its factories' source files, hardware, version.

    Imports the factories' modules (to find their files) but builds nothing.
    """
    import os
    import platform

    from bsfind import __version__
    from bsfind.cache import cache_key as _key
    from bsfind.hardware.nvml import describe_device
    from bsfind.workload import LOSSES, OPTIMIZERS, resolve, resolve_device

    files = []
    refs = [("model.factory", spec.model.factory), ("data.factory", spec.data.factory)]
    if spec.loss not in LOSSES:
        refs.append(("loss", spec.loss))
    if spec.optimizer.name.lower() not in OPTIMIZERS:
        refs.append(("optimizer.name", spec.optimizer.name))
    for key, ref in refs:
        src = resolve(ref, spec.base_dir, key).source_file
        if src is not None:
            files.append(src)
    if spec.model.checkpoint:
        files.append((spec.base_dir / spec.model.checkpoint).resolve())
    dev = describe_device(resolve_device(spec.hardware.device))
    hardware = "|".join(str(x) for x in (
        dev.type, dev.name, dev.total_memory_bytes, dev.driver_version, torch.__version__,
        os.cpu_count(), platform.machine()))
    return _key(spec.document, files, hardware, __version__)


def check(
    spec: Spec,
    tolerance: float = 2.0,
    use_cache: bool = True,
    progress: ProgressFn | None = None,
) -> CheckResult:
    """Recommend (or reuse a cached result) and compare with the baseline batch."""
    from bsfind import cache, distributed
    from bsfind.report import to_dict

    # Under torchrun every rank must run the probe, and the key does not know the world size.
    key = cache_key(spec) if use_cache and not distributed.requested() else None
    doc = cache.load(key) if key else None
    cached = doc is not None
    if doc is None:
        report = recommend(spec, progress=progress)
        doc = to_dict(report)
        # A partial result (budget ran out) is cached too: the budget is part of
        # the spec, so the same spec and budget would measure the same again.
        if key and report.status in ("ok", "partial"):
            with contextlib.suppress(OSError):
                cache.store(key, doc)
    else:
        doc = {**doc, "cached": True}
    return verdict(doc, tolerance, cached)


def verdict(doc: dict[str, Any], tolerance: float, cached: bool = False) -> CheckResult:
    """Compare the report's baseline batch with its recommendation."""
    b0 = int(doc["baseline"]["batch_size"])
    rec = doc["recommendation"]
    b = int(rec["batch_size"])
    ratio = max(b0 / b, b / b0)
    within = ratio <= tolerance
    direction = "below" if b0 < b else "above"
    cost = rec.get("predicted_time_ratio")
    what = (f"; the recommendation is predicted to take {cost:.2f}x the baseline's time"
            f" and {rec['predicted_cost_ratio']:.2f}x its cost" if cost is not None else "")
    if within:
        message = (f"ok: baseline batch {b0} is within {tolerance:g}x of the recommended {b} "
                   f"({ratio:.2f}x)")
    else:
        message = (f"baseline batch {b0} is {ratio:.1f}x {direction} the recommended {b} "
                   f"(tolerance {tolerance:g}x){what}; learning rate at {b}: "
                   f"{rec['learning_rate']:.3g} ({rec['lr_rule']})")
    doc = {**doc, "check": {"within": within, "ratio": ratio, "tolerance": tolerance,
                            "message": message}}
    return CheckResult(within, ratio, b0, b, tolerance, message, cached, doc)
