"""The Python API: what the CLI calls, usable from a notebook or a script.

    from bsfind import load_spec, recommend
    report = recommend(load_spec("configs/digits-mlp.yaml"))
    print(report.recommendation.batch_size)

    from bsfind import measure_noise_scale
    est = measure_noise_scale(model, dataset, torch.nn.functional.cross_entropy, batch_size=64)

Each function returns typed results (``Report``, ``NoiseEstimate``); nothing
here prints. Progress goes to an optional callback ``progress(phase, fraction,
message)``. Under a data-parallel launch (torchrun) the same calls run on every
rank (``bsfind.distributed``); otherwise in this process (``bsfind.runner``).
"""

from __future__ import annotations

import contextlib
import dataclasses
from pathlib import Path
from typing import Any

import torch

from bsfind import launch, pipeline, wording
from bsfind.budget import Deadline, ProgressFn
from bsfind.errors import HardwareError, UsageError, UserCodeError
from bsfind.noise.probe import ProbeOptions
from bsfind.report import Report
from bsfind.results import NoiseEstimate
from bsfind.runner import LocalRunner
from bsfind.seeds import Seeds, global_random
from bsfind.spec import Spec
from bsfind.workload import Collate, LossFn, Workload


def _execute(spec: Spec, command: str, progress: ProgressFn | None,
             max_gpus: int | None = None) -> Report:
    """The pipeline on the runner this process calls for: a rank of torchrun, or local."""
    if launch.requested():
        from bsfind import distributed

        return distributed.execute(
            spec, progress,
            lambda s, runner, p: pipeline.run(s, runner, command, p, max_gpus))
    return pipeline.run(spec, LocalRunner(), command, progress, max_gpus)


def measure(spec: Spec, progress: ProgressFn | None = None) -> Report:
    """Run the noise probe(s) of a spec: the ``bsfind noise`` command."""
    return _execute(spec, "noise", progress)


def branch(spec: Spec, progress: ProgressFn | None = None) -> Report:
    """The noise probe(s), then the critical batch by branched runs from the probe point:
    the ``bsfind branch`` command (``bsfind.branches``).

    Raises:
        UsageError: under torchrun, where the branched runs are not measured (a trial's
            ``torchrun ... branch`` exited 0 with no branch and a warning naming a key).
    """
    if launch.requested():
        raise UsageError(
            "bsfind branch measures the branched runs in a single process only, and this is "
            "one rank of a distributed launch",
            hint="run bsfind branch without torchrun (one device); under torchrun, "
                 "bsfind noise measures the noise scale")
    return _execute(spec, "branch", progress)


def recommend(
    spec: Spec, progress: ProgressFn | None = None, max_gpus: int | None = None
) -> Report:
    """Probe noise and hardware, then advise: the ``bsfind recommend`` command.

    Args:
        max_gpus: also compute the time/cost frontier for 1..max_gpus devices.
    """
    return _execute(spec, "recommend", progress, max_gpus)


def schedule_from_log(spec: Spec, log: str | Path, progress: ProgressFn | None = None,
                      max_gpus: int | None = None) -> Report:
    """Plan the next run from the last: the ``bsfind schedule SPEC LOG`` command.

    The noise scale along training comes from a tracker's JSON-lines ``log``
    (``bsfind.track(model, log=path)``); the spec gives the model, the baseline and
    the planned run, and its hardware is measured here (or predicted for
    ``hardware.gpu``). The report carries the recommendation for the end of the
    logged run and the batch-size schedule fitted to the whole log.

    Raises:
        UsageError: the log is missing or not a tracker's, or bsfind runs under torchrun.
    """
    from bsfind.errors import UsageError
    from bsfind.tracker import read_log_records

    if launch.requested():
        raise UsageError("bsfind schedule plans from a log on one process",
                         hint="run it without torchrun")
    records, cut = read_log_records(log)
    return pipeline.plan_from_log(spec, LocalRunner(), records, str(log), progress, max_gpus,
                                  notes=() if cut is None else (cut,))


def write_plot(report: Report, path: str | Path) -> Path:
    """Write the candidates' predicted time and cost against batch size (PNG/SVG)."""
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


def noise_scale_at(
    job: Workload,
    options: ProbeOptions | None = None,
    *,
    seed: int = 0,
    step: int = 0,
    max_seconds: float = 60.0,
    curvature: bool = False,
    progress: ProgressFn | None = None,
) -> NoiseEstimate:
    """B_simple (and, with ``curvature``, B_noise) of a built workload at its current weights.

    The weights, buffers and gradients are left as they were. ``step`` labels the
    result (the training step the weights come from) and, with ``seed``, picks the
    sampling streams exactly as ``bsfind noise`` would at that step, so the evidence scripts
    measure what the CLI measures. On a busy CPU it runs on the cores other processes
    leave free, as the CLI does (the value is the same; it sees more examples).
    """
    from bsfind.training import kept_buffers_and_grads
    from bsfind.trajectory import measure_point

    runner = LocalRunner()
    # on a CPU other processes share, on the cores they leave free, as the CLI runs; the
    # budget starts after the load is sampled. The model is left as it was found: its
    # buffers (BatchNorm's running statistics), its .grad, and gradients on under a
    # caller's no_grad or inference_mode.
    with (runner.fit_to_load(job), torch.inference_mode(False), torch.enable_grad(),
          kept_buffers_and_grads(job.model)):  # copied and put back as normal tensors
        return measure_point(job, runner, options or ProbeOptions(), Seeds(seed), step,
                             Deadline.after(max_seconds), curvature, progress)


def measure_noise_scale(
    model: torch.nn.Module,
    dataset: Any,
    loss_fn: LossFn | str,
    *,
    batch_size: int = 64,
    method: str = "auto",
    target_rel_error: float = 0.1,
    max_seconds: float = 60.0,
    seed: int = 0,
    progress: ProgressFn | None = None,
    collate_fn: Collate | None = None,
) -> NoiseEstimate:
    """Measure B_simple of ``model`` on ``dataset`` at its current weights.

    Args:
        model: any nn.Module (its weights, buffers and .grad are left as they were).
        dataset: a map-style dataset of (input, target) pairs, or of dicts with the
            target under "labels" or "label" (the rest: the model's keyword arguments).
        loss_fn: fn(outputs, targets) -> mean loss, or a spec's name for one:
            "cross_entropy", "mse", "model" (the model's own loss, called with labels=).
        batch_size: the starting big batch (grown while |G|² is unresolved).
        method: "auto", "per-example" or "microbatch".
        seed: seeds the sampling (the stream ``bsfind noise`` uses at step 0).
        collate_fn: makes a batch of a list of items (the spec's ``data.collate``).
    """
    import warnings

    from bsfind.tracker import paused_on
    from bsfind.workload import LOSSES, near_name

    if not isinstance(model, torch.nn.Module):
        raise ValueError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    if isinstance(loss_fn, str):
        if loss_fn not in LOSSES:
            raise ValueError(f"loss_fn {loss_fn!r}: {near_name(loss_fn, LOSSES)}expected a "
                             f"function or one of {', '.join(LOSSES)}")
        loss_fn = LOSSES[loss_fn]
    if isinstance(loss_fn, type):  # nn.CrossEntropyLoss, not nn.CrossEntropyLoss()
        raise ValueError(f"loss_fn: got the class {loss_fn.__name__}, not a loss: pass an "
                         f"instance ({loss_fn.__name__}()) or a function")
    batch_size = _check_probe_arguments(method, batch_size, target_rel_error, max_seconds,
                                        seed)
    job = Workload.from_objects(model, dataset, loss_fn, collate=collate_fn)
    # BatchNorm in training mode: micro-batches of the batch it trains with, as the CLI
    # measures (a trial's ResNet got micro-batches of batch_size // 8 and no warning)
    norm = pipeline.batchnorm_batch(model, batch_size)
    opts = ProbeOptions(method=method, batch_size=batch_size,
                        target_rel_error=target_rel_error, norm_batch=norm)
    # a tracker of the same model neither counts nor meets it; the global RNG, which the
    # model's dropout draws from, is put back (a trial: a mid-run check moved every later
    # dropout mask and shuffle)
    # (dropout's masks are the seed's: seeds.global_random)
    with paused_on(model), global_random(seed, job.device):
        est = noise_scale_at(job, opts, seed=seed, max_seconds=max_seconds,
                             progress=progress)
    # what the CLI says on stderr about the same measurement, as Python warnings
    for text in (wording.noise_warnings(est, None, dataset_size=len(job),
                                        baseline_batch=batch_size, from_checkpoint=True,
                                        advice=False, norm_batch=norm)
                 + ([] if model.training else [wording.EVAL_MODE])
                 + ([wording.api_budget(est.rel_half_width, target_rel_error)]
                    if est.stopped == "budget" else [])
                 + pipeline.item_warnings(job)):
        warnings.warn(f"bsfind: {text}", UserWarning, stacklevel=2)
    return est


def _check_probe_arguments(method: str, batch_size: int, target_rel_error: float,
                           max_seconds: float, seed: int = 0) -> int:
    """measure_noise_scale's own arguments, as the spec checks its probe section; returns
    the batch size as an int."""
    from bsfind.tracker import whole_number
    from bsfind.workload import near_name

    methods = ("auto", "per-example", "microbatch")
    if method not in methods:
        raise ValueError(f"method {method!r}: {near_name(method, methods)}expected one of "
                         f"{', '.join(methods)}")
    size = whole_number(batch_size, 1)  # an int, or a numpy one
    if size is None:
        raise ValueError(f"batch_size: expected an integer >= 1, got {batch_size!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed: expected an integer, got {seed!r}")
    if not 0 < target_rel_error < 1:
        raise ValueError(f"target_rel_error: expected a number in (0, 1), got "
                         f"{target_rel_error!r}")
    if not (isinstance(max_seconds, (int, float)) and 0 < max_seconds < float("inf")):
        raise ValueError(f"max_seconds: expected a finite number > 0, got {max_seconds!r}")
    return size


@dataclasses.dataclass(frozen=True)
class Validation:
    """``bsfind validate``: the spec builds, one tiny training step runs, and how it probes."""

    model: str
    data: str
    loss: str
    optimizer: str
    device: str
    trainable_parameters: int
    dataset_size: int
    batch_size: int
    loss_value: float
    grad_norm_sq: float
    method: str
    method_reason: str
    probe_points: str
    learning_rate: str = ""  # how recommend sets the learning rate at its batch
    warnings: tuple[str, ...] = ()  # what the model and examples make of the measurement

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# Examples of validate's one forward and backward (at most the baseline batch and the
# dataset; 2 at least, so that a BatchNorm layer in training mode can normalise).
VALIDATE_BATCH = 4


def validate(spec: Spec) -> Validation:
    """Build the spec's objects and run one forward and backward of a few examples on
    the chosen device (no optimizer step): a loss that cannot take the model's output,
    a shape error or a NaN shows up in seconds instead of a minute into a probe.

    Raises:
        BsfindError: what a probe would raise, for the same cause.
    """
    from bsfind import wording
    from bsfind.hardware.memory import is_oom
    from bsfind.noise.probe import choose_method
    from bsfind.training import check_grad, check_loss, check_reached, grad_sq
    from bsfind.workload import build

    job = build(spec)
    n = min(len(job), spec.optimizer.batch_size, VALIDATE_BATCH)
    n = min(len(job), max(n, 2))
    idx = torch.arange(n)
    job.model.zero_grad(set_to_none=True)
    try:
        loss = job.loss(idx)
        check_loss(loss, "in validate's one step")
        if spec.loss == "cross_entropy" and float(loss.detach()) < 0:
            # never negative over class indices or probabilities (a new user's regression
            # targets under cross_entropy passed validate with loss -2.65)
            raise UserCodeError(
                f"loss 'cross_entropy' is {float(loss.detach()):.4g} in validate's one step: "
                "a cross-entropy is never negative over class indices or probabilities, so "
                "the targets are neither", hint="for regression targets use loss: mse")
        loss.backward()
        check_reached(job.trainable(), job.model_name, "in validate's one step")
        g2 = grad_sq(job.trainable())
        check_grad(g2, "in validate's one step")
    except Exception as exc:  # out of memory is the device's, as in a probe (exit 4)
        if is_oom(exc):
            raise _validate_oom("one step", n, job) from exc
        raise
    finally:
        job.model.zero_grad(set_to_none=True)
    if spec.model.checkpoints:  # each one matches the model (its weights put back after)
        from bsfind.training import host_weights
        from bsfind.workload import load_checkpoint

        start = host_weights(job.model)
        for i, entry in enumerate(spec.model.checkpoints):
            load_checkpoint(job.model, entry.path, spec.base_dir,
                            key=f"model.checkpoints[{i}].path")
        job.model.load_state_dict(start)
    method, reason = choose_method(job.model, spec.probe.method)
    if method == "per-example":
        method, reason = _per_example_runs(job, idx, reason)
    world = launch.world_size()
    norm = pipeline.norm_batch(spec, job, world)
    if method == "microbatch" and norm is not None:  # (else only the JSON's notes said it)
        reason += (f"; each micro-batch is a BatchNorm batch of {norm:,}, the baseline's "
                   "per device, and the advice keeps it")
    if world > 1:  # each rank validated alone: say what recommend will run over them all
        method = f"distributed+{method}"
        reason += f"; over the {world} ranks, see README's Multi-GPU section"
    return Validation(
        model=spec.model.factory, data=spec.data.factory, loss=spec.loss,
        optimizer=spec.optimizer.name, device=str(job.device),
        trainable_parameters=sum(p.numel() for p in job.trainable()), dataset_size=len(job),
        batch_size=n, loss_value=float(loss.detach()), grad_norm_sq=g2, method=method,
        method_reason=reason, probe_points=wording.probe_plan(spec),
        learning_rate=wording.lr_plan(pipeline.lr_search_skipped_by_spec(spec, world=world)),
        warnings=(*pipeline.item_warnings(job),  # (a trial: only noise and recommend said it)
                  *([wording.small_dataset(len(job), spec.optimizer.batch_size, True)]
                    if len(job) < spec.optimizer.batch_size else [])),
    )


def _per_example_runs(job: Workload, idx: torch.Tensor, reason: str) -> tuple[str, str]:
    """(method, reason) once the per-example norms have run on validate's examples: some
    failures show only at run time (a custom autograd.Function without setup_context, a
    module called twice), and the probe then falls back to micro-batches."""
    from bsfind.hardware.memory import is_oom
    from bsfind.noise.per_example import (
        PerExampleGradNorms,
        PerExampleUnsupported,
        checking_batch,
    )
    from bsfind.noise.probe import check_at_another_batch

    try:
        with PerExampleGradNorms(job.model) as norms:
            job.loss(idx).backward()
            norms.sq_norms()
            # and at another batch size, as the probe checks (a module fed arange(T) passes
            # when T is the batch)
            check_at_another_batch(
                job, norms, idx[torch.arange(checking_batch(len(idx))) % len(idx)])
    except PerExampleUnsupported as exc:
        return "microbatch", f"per-example norms failed on validate's step ({exc.message})"
    except Exception as exc:
        if is_oom(exc):
            raise _validate_oom("per-example norms", len(idx), job) from exc
        raise
    finally:
        job.model.zero_grad(set_to_none=True)
    return "per-example", reason


def _validate_oom(what: str, n: int, job: Workload) -> HardwareError:
    """Out of memory in validate's step: the device's, as in a probe (exit 4)."""
    return HardwareError(f"out of memory in validate's {what} of {n} examples on {job.device}",
                         hint="use a device with more memory, a smaller model, or "
                         "hardware.precision: bf16")


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

    from bsfind import __version__, cache
    from bsfind.hardware.measure import usable_cpus
    from bsfind.hardware.nvml import describe_device
    from bsfind.workload import (
        checkpoint_file,
        is_user_source,
        refresh_user_modules,
        resolve,
        resolve_device,
        source_files_under,
    )

    files = []
    refresh_user_modules()  # an edited helper is imported afresh below, and recorded
    refs = [("model.factory", spec.model.factory), ("data.factory", spec.data.factory)]
    refs += [("data.collate", spec.data.collate)] if spec.data.collate else []
    # a built-in name (or a misspelt one, which the build reports) has no source file
    refs += [(key, ref) for key, ref in (("loss", spec.loss), ("optimizer.name",
                                                                spec.optimizer.name))
             if ":" in ref]
    for key, ref in refs:
        src = resolve(ref, spec.base_dir, key).source_file
        if src is not None:
            files.append(src)
    # and every source file in the factory files' folders, whatever they import (a
    # helper's helper, a lazy import inside a factory), and an installed-elsewhere
    # package's own folder for a "package.module:attr" factory outside site-packages
    files += [f for folder in sorted({f.parent for f in files if is_user_source(f)}, key=str)
              for f in source_files_under(folder)]
    # the weights files themselves (a save_pretrained folder's), every one of a list
    if spec.model.checkpoint:
        files.append(checkpoint_file(spec.model.checkpoint, spec.base_dir))
    files += [checkpoint_file(c.path, spec.base_dir, key=f"model.checkpoints[{i}].path")
              for i, c in enumerate(spec.model.checkpoints or ())]
    files += _files_named_in(spec.model.kwargs, spec.data.kwargs, base=spec.base_dir)
    dev = describe_device(resolve_device(spec.hardware.device))
    hardware = "|".join(str(x) for x in (
        dev.type, dev.name, dev.total_memory_bytes, dev.driver_version, torch.__version__,
        os.cpu_count(), len(usable_cpus()), platform.machine()))
    return cache.cache_key(spec.document, files, hardware, __version__)


def _files_named_in(*values: Any, base: Path) -> list[Path]:
    """The files that strings in factories' kwargs name (a data file: a new user's edited
    CSV kept a stale cached result), as they stand from the current folder or beside the
    spec; folders are not read (a dataset's may be large)."""
    found: list[Path] = []
    for v in values:
        if isinstance(v, str) and v:
            for p in {Path(v), base / v}:
                with contextlib.suppress(OSError, ValueError):  # not a path at all
                    if p.is_file():
                        found.append(p)
        elif isinstance(v, dict):
            found += _files_named_in(*v.values(), base=base)
        elif isinstance(v, (list, tuple)):
            found += _files_named_in(*v, base=base)
    return found


def check(
    spec: Spec,
    tolerance: float = 2.0,
    use_cache: bool = True,
    progress: ProgressFn | None = None,
) -> CheckResult:
    """Recommend (or reuse a cached result) and compare with the baseline batch."""
    from bsfind import cache
    from bsfind.report import to_dict

    # Under torchrun every rank must run the probe, and the key does not know the world size.
    key = cache_key(spec) if use_cache and not launch.requested() else None
    doc = cache.load(key) if key else None
    if doc is not None and doc.get("status") != "ok":
        doc = None  # a partial result stored by an earlier version: measure again
    cached = doc is not None
    if doc is None:
        report = recommend(spec, progress=progress)
        doc = to_dict(report)
        # Only a complete result: a partial one (the budget ran out, perhaps on a loaded
        # machine, since the budget counts from the command's start) would otherwise
        # stand for the job until its spec changed (a trial's CI reused one).
        if key and report.status == "ok":
            try:
                cache.store(key, doc)
            except OSError as exc:  # only costs a re-run, which the user should expect
                doc = {**doc, "warnings": [*doc["warnings"], wording.cache_unwritable(
                    str(cache.cache_dir()), exc.strerror or str(exc))]}
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
    message = wording.check_message(
        within=within, baseline=b0, recommended=b, ratio=ratio, tolerance=tolerance,
        time_ratio=rec.get("predicted_time_ratio"), cost_ratio=rec.get("predicted_cost_ratio"),
        learning_rate=rec["learning_rate"],
        lr_label=wording.lr_label(rec["lr_rule"], rec.get("lr_factor")),
        ranks=(doc.get("distributed") or {}).get("world_size", 1),
        partial=doc.get("status") == "partial")
    doc = {**doc, "check": {"within": within, "ratio": ratio, "tolerance": tolerance,
                            "message": message}}
    return CheckResult(within, ratio, b0, b, tolerance, message, cached, doc)
