"""The runner seam: what the pipeline asks of "where the measurements run".

:class:`Runner` is everything ``pipeline.run`` needs beyond pure computation:
building the workload, training along the probe points, the noise and
curvature probes, the hardware measurement and the deadline. The pipeline
takes one and never asks which one it has. :class:`LocalRunner` runs in this
process; ``distributed.TorchrunRunner`` runs on every rank of a data-parallel
launch. Adding another launcher (FSDP, a cluster scheduler) means adding a
runner, not touching the pipeline.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterator
from typing import Protocol

import torch

from bsfind import wording
from bsfind.budget import Deadline, ProgressFn, run_deadline
from bsfind.errors import Interrupted
from bsfind.hardware import measure
from bsfind.hardware.measure import HardwareOptions
from bsfind.noise.probe import NoiseProbe, ProbeOptions
from bsfind.report import Report
from bsfind.results import HardwareMeasurement, NoiseEstimate
from bsfind.spec import Spec
from bsfind.training import EpochSampler, restored_weights, train_steps
from bsfind.workload import Workload, build


class Runner(Protocol):
    """Where a run's measurements happen (see the module docstring)."""

    @property
    def world_size(self) -> int:
        """Data-parallel devices the measurements ran on (the advice is for this many
        when greater than 1)."""

    def deadline(self, seconds: float) -> Deadline:
        """The run's budget, starting now."""

    def build(self, spec: Spec) -> Workload:
        """Build the spec's model, data, loss and optimizer."""

    def sampler(self, job: Workload, batch_size: int, seed: int) -> EpochSampler:
        """The training order of the run along the probe points."""

    def train(
        self, job: Workload, optimizer: torch.optim.Optimizer, steps: int,
        sampler: EpochSampler, *, start_step: int, progress: ProgressFn | None,
        deadline: Deadline, on_step: Callable[[int, float], None] | None = None,
    ) -> int:
        """Train up to ``steps`` steps at the sampler's batch; return the step reached."""

    def noise_probe(self, job: Workload, options: ProbeOptions, *, seed: int, step: int,
                    progress: ProgressFn | None) -> NoiseProbe:
        """A noise probe at the current weights."""

    def curvature(self, job: Workload, est: NoiseEstimate, options: ProbeOptions, *,
                  seed: int, deadline: Deadline, progress: ProgressFn | None
                  ) -> NoiseEstimate:
        """``est`` with B_noise measured at the same weights."""

    def measure_hardware(self, job: Workload, options: HardwareOptions, deadline: Deadline,
                         progress: ProgressFn | None) -> HardwareMeasurement:
        """Memory line and step times of the device(s)."""

    def fit_to_load(self, job: Workload) -> contextlib.AbstractContextManager[None]:
        """Inside it, the run uses what other processes leave of this machine (the local
        runner on the CPU: the free cores; others: nothing changes)."""

    def finish(self, report: Report) -> Report:
        """The report as every caller sees it (the distributed runner adds its summary)."""

    def agree(self, go: bool) -> bool:
        """One decision for every rank (rank 0's): whether to go on."""


def measure_curvature(job: Workload, est: NoiseEstimate, options: ProbeOptions, *, seed: int,
                      deadline: Deadline, progress: ProgressFn | None) -> NoiseEstimate:
    """B_noise (tr(HΣ)/GᵀHG) in this process, at ``est``'s weights, added to ``est``."""
    from bsfind.noise.curvature import CurvatureProbe

    cp = CurvatureProbe(job, batch_size=options.batch_size,
                        microbatch_size=options.microbatch_size, seed=seed,
                        target_rel_error=options.target_rel_error,
                        progress=progress, step=est.step)
    try:
        res = cp.run(deadline)
    except Interrupted:  # an inner one: its partial result stands
        raise
    except KeyboardInterrupt:
        raise Interrupted("interrupted during the curvature probe", partial=est) from None
    return dataclasses.replace(est, b_noise=res.b_noise, b_noise_ci95=res.ci95,
                               seconds=est.seconds + res.seconds)


class LocalRunner:
    """Everything in this process, on the spec's device."""

    world_size = 1

    def __init__(self) -> None:
        self._load: measure.LadderSetup | None = None  # set inside fit_to_load on the CPU
        self._use: measure.CpuUse | None = None  # started with the deadline
        # what fit_to_load did with the last run's threads (it stays after the block)
        self.fitted: measure.LadderSetup | None = None

    @contextlib.contextmanager
    def fit_to_load(self, job: Workload) -> Iterator[None]:
        """On the CPU: other processes' share of the CPUs, sampled since the deadline
        started (over the build) and for at least LOAD_SAMPLE_SECONDS;
        at BUSY_SHARE or more the run's intra-op threads are the cores they leave free
        (measure.ladder_setup). Torch's threads on a shared core wait for each other:
        beside one busy process on 2 cores a run with 2 threads took about 7x as long as
        on the quiet machine, so a budget-bound probe saw fewer examples."""
        if job.device.type != "cpu":
            yield
            return
        use, self._use = self._use, None
        if use is None:
            use = measure.CpuUse()
            use.start()
        self._load = self.fitted = measure.setup_for_load(use)
        try:
            with measure.intra_op_threads(self._load.threads):
                yield
        finally:
            self._load = None

    def deadline(self, seconds: float) -> Deadline:
        self._use = measure.CpuUse()  # the load sample of fit_to_load spans the build
        self._use.start()
        return run_deadline(seconds)

    def build(self, spec: Spec) -> Workload:
        return build(spec)

    def sampler(self, job: Workload, batch_size: int, seed: int) -> EpochSampler:
        return EpochSampler(len(job), batch_size, torch.Generator().manual_seed(seed))

    def train(
        self, job: Workload, optimizer: torch.optim.Optimizer, steps: int,
        sampler: EpochSampler, *, start_step: int, progress: ProgressFn | None,
        deadline: Deadline, on_step: Callable[[int, float], None] | None = None,
    ) -> int:
        return train_steps(job, optimizer, steps, sampler, start_step=start_step,
                           progress=progress, should_stop=deadline.passed, on_step=on_step)

    def noise_probe(self, job: Workload, options: ProbeOptions, *, seed: int, step: int,
                    progress: ProgressFn | None) -> NoiseProbe:
        return NoiseProbe(job, options, seed=seed, step=step, progress=progress)

    def curvature(self, job: Workload, est: NoiseEstimate, options: ProbeOptions, *,
                  seed: int, deadline: Deadline, progress: ProgressFn | None
                  ) -> NoiseEstimate:
        return measure_curvature(job, est, options, seed=seed, deadline=deadline,
                                 progress=progress)

    def measure_hardware(self, job: Workload, options: HardwareOptions, deadline: Deadline,
                         progress: ProgressFn | None) -> HardwareMeasurement:
        """Memory line (verified by real steps on CUDA), then the step-time ladder."""
        from bsfind.hardware import memory as mem

        cpu = job.device.type == "cpu"
        use = measure.CpuUse()
        use.start()  # other processes' load before the ladder, over the memory model
        with restored_weights(job.model):
            step = measure.step_function(job, options.lr, options.seed)
            if progress is not None:
                progress("memory", 0.0, "memory model")
            memory = measure.memory_model(job, step, options)
            if job.device.type == "cuda":
                memory = mem.verify_max_batch(memory, step, lambda: mem.clear_cache(job.device),
                                              step_limit=measure.TIMING_MAX_BATCH)
            if progress is not None:
                progress("memory", 1.0, f"max batch {memory.max_batch_size:,} ({memory.source})")
                progress("timing", 0.0, "timing steps")
            if self._load is not None and (self._load.reduced or self._load.cpu_clock):
                setup = self._load  # fit_to_load fitted the whole run to a load
            elif cpu:  # (again: a load may have started since the run did)
                setup = measure.setup_for_load(use)
            else:
                setup = measure.LadderSetup(torch.get_num_threads())
            if setup.cpu_clock and job.tensors is None:
                # a dataset read example by example may wait on files: wall time counts
                setup = dataclasses.replace(setup, cpu_clock=False)
            with measure.intra_op_threads(setup.threads):
                use.start()
                curve = measure.time_steps(job, step, measure.ladder_sizes(job, memory),
                                           deadline, memory, options, cpu_clock=setup.cpu_clock)
                memory = measure.capped_by_timing(memory, curve)
                busy = use.share() if cpu else None
            if progress is not None:
                progress("timing", 1.0, "timed" if curve is not None else "no step time")
        notes = () if curve is not None else (wording.NO_TIMING,)
        timed = curve is not None
        return HardwareMeasurement(
            memory, curve, notes, busy_share=busy if timed else None,
            timing_threads=setup.threads if timed and setup.reduced else None,
            timing_cpu_clock=timed and setup.cpu_clock,
            busy_before=setup.share if timed else None)

    def finish(self, report: Report) -> Report:
        return report

    def agree(self, go: bool) -> bool:
        return go

