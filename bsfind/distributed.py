"""Data-parallel probing under torchrun: every rank measures, rank 0 reports.

    torchrun --standalone --nproc_per_node 2 -m bsfind recommend configs/digits-mlp.yaml --json
    .venv/bin/python -m pytest tests/test_distributed.py -q     # 2 CPU processes, gloo

``bsfind.api`` hands a run to :func:`execute` when the torch.distributed launch
environment is set (WORLD_SIZE > 1 with RANK; MASTER_ADDR, MASTER_PORT and
LOCAL_RANK as torchrun sets them; see ``bsfind.launch``) or the caller already
initialised a process group. :func:`execute` joins the group and runs the one
pipeline with a :class:`TorchrunRunner`: every rank builds the workload, probes
and times its own device (cuda:LOCAL_RANK with NCCL, or the CPU with gloo); the
run returns the same ``Report`` on every rank, and only rank 0's CLI prints or
writes files.

Why gradients are all-reduced explicitly instead of through
DistributedDataParallel:

- the noise scale needs each rank's gradient *before* the reduction (the
  small batch of McCandlish et al. 2018, App. A) as well as after it; DDP
  overwrites ``.grad`` with the mean during backward, so it would have to run
  under ``no_sync()`` with a manual all-reduce anyway;
- every collective here is entered only after all ranks agreed that they got
  there healthy (see "Failures"). DDP reduces *inside* backward, so an
  exception or an out-of-memory in one rank's backward leaves the other ranks
  blocked in a bucket all-reduce until the process-group timeout;
- the advisor models a step as t(B) = a·t_dev(B/(a·N)) + t_sync. Timing a
  local step (t_dev) and an all-reduce of the gradient's bytes (t_sync) apart
  measures exactly those two terms; DDP overlaps them, so their sum is an
  upper bound on a DDP step (as the advisor already assumes).

The noise scale (DESIGN §2, "data-parallel form"): each rank draws its own
examples with replacement from a generator seeded by its rank, so ranks see
different examples; the all-reduced mean gradient is the big batch
B = N·(examples per rank), and the small batch is

- ``distributed+per-example``: b = 1; |G_b|² is the mean of the squared
  per-example norms over all N·b_local examples (their sum is all-reduced);
- ``distributed+microbatch``: each rank takes k micro-batches of b; |G_b|²
  is the mean of all N·k micro-batch norms and B = N·k·b. With k = 1 this is
  the plain data-parallel form: each rank's local gradient is the small batch.

Failures: work that can fail on one rank only (the user's factories, forward,
backward, out-of-memory) runs locally, then the ranks all-reduce a status
code (:meth:`Coordinator.exchange`). If any rank failed, every rank raises:
the failing rank its own error, the others ``_PeerFailed``. All ranks then
gather the error messages once (:meth:`Coordinator.failure`) and raise the
first failing rank's error with its exit code, so rank 0 prints it ("rank 1:
...") and every rank exits with the same code. Loop decisions (stop, grow the
batch, the time budget) are made on rank 0 and broadcast. The process-group
timeout (:data:`TIMEOUT_ENV`) is the last resort for a rank that hangs or dies
outright; a collective that fails that way ends the run with a
:class:`CollectiveError` (exit 4).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import os
import signal
import socket
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from bsfind import wording
from bsfind.budget import Deadline, ProgressFn, run_deadline
from bsfind.errors import BsfindError, HardwareError, Interrupted, UsageError
from bsfind.hardware import measure
from bsfind.hardware.measure import HardwareOptions
from bsfind.launch import RANK_OUTPUT_ENV, env_int
from bsfind.noise.probe import NoiseProbe, ProbeComm, ProbeOptions
from bsfind.report import Report
from bsfind.results import (
    DistributedSummary,
    HardwareMeasurement,
    MemoryModel,
    NoiseEstimate,
    RankInfo,
    TimingCurve,
    TimingPoint,
)
from bsfind.runner import measure_curvature
from bsfind.seeds import for_rank
from bsfind.spec import Spec
from bsfind.training import EpochSampler, restored_weights, train_steps
from bsfind.workload import Workload, build

T = TypeVar("T")

# Seconds a collective may wait for the slowest rank before the run fails.
TIMEOUT_ENV = "BSFIND_DIST_TIMEOUT"
# Default timeout: it must exceed the longest purely local stretch between two
# collectives (building the workload, e.g. loading data; one probe round; a
# timing ladder or a B_noise probe, both bounded by probe.max_seconds), so it
# is the larger of this and 2·max_seconds + 60 s.
MIN_TIMEOUT_S = 300.0
# On a failure, ranks other than 0 return this much later than rank 0: a
# launcher that stops the whole job at the first non-zero exit (torchrun sends
# SIGTERM to the others) must not kill rank 0 before it has printed the error,
# which it has in hand once the messages are gathered (milliseconds).
SECONDARY_EXIT_DELAY_S = 2.0
# All-reduce timing: discarded warm-up calls, then timed repetitions (median).
SYNC_WARMUP = 2
SYNC_REPEATS = 7

# Status codes of Coordinator.exchange.
OK, FAILED, OOM, UNSUPPORTED = 0, 1, 2, 3


# --------------------------------------------------------------------------- launch


def timeout_seconds(max_seconds: float) -> float:
    """The process-group timeout: $BSFIND_DIST_TIMEOUT, else see MIN_TIMEOUT_S."""
    text = os.environ.get(TIMEOUT_ENV)
    if text:
        try:
            value = float(text)
        except ValueError:
            value = -1.0
        if not value > 0:
            raise UsageError(f"{TIMEOUT_ENV}={text!r}: expected a positive number of seconds")
        return value
    return max(MIN_TIMEOUT_S, 2.0 * max_seconds + 60.0)


@dataclass(frozen=True)
class Context:
    """Where this rank sits in the launch and which device it uses."""

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    device: torch.device
    backend: str


def context(requested_device: str) -> Context:
    """This rank's context from the launcher's environment (or an existing group).

    On CUDA each rank uses cuda:LOCAL_RANK (whatever ``hardware.device`` names)
    and NCCL; on CPU, gloo.

    Raises:
        HardwareError: CUDA was asked for but this rank has no GPU of its own.
    """
    from bsfind.workload import resolve_device

    if dist.is_available() and dist.is_initialized():
        r, world = dist.get_rank(), dist.get_world_size()
    else:
        r, world = env_int("RANK") or 0, env_int("WORLD_SIZE") or 1
    local = env_int("LOCAL_RANK")
    local = r if local is None else local
    local_world = env_int("LOCAL_WORLD_SIZE") or world
    # Any "cuda[:N]" means this rank's own GPU; a machine without CUDA fails here, on every rank.
    device = resolve_device("cuda" if requested_device.startswith("cuda") else requested_device)
    if device.type == "cuda":
        if local >= torch.cuda.device_count():
            raise HardwareError(
                f"rank {r} has LOCAL_RANK {local} but only {torch.cuda.device_count()} "
                "CUDA device(s) exist on its node",
                hint="start at most one process per GPU (torchrun --nproc_per_node)",
            )
        device = torch.device("cuda", local)
    if dist.is_available() and dist.is_initialized():
        backend = str(dist.get_backend())
    else:
        backend = "nccl" if device.type == "cuda" else "gloo"
    return Context(r, world, local, local_world, device, backend)


def _init(ctx: Context, max_seconds: float) -> bool:
    """Join the process group; False when the caller had already initialised one."""
    if dist.is_initialized():
        return False
    if not dist.is_available():
        raise UsageError("torch.distributed is not available in this build of PyTorch")
    missing = [v for v in ("MASTER_ADDR", "MASTER_PORT") if v not in os.environ]
    if missing:
        raise UsageError(
            f"distributed launch: RANK and WORLD_SIZE are set but {', '.join(missing)} "
            "is not",
            hint="start bsfind with torchrun, or set RANK, WORLD_SIZE, MASTER_ADDR, "
            "MASTER_PORT and LOCAL_RANK for every process",
        )
    if ctx.device.type == "cuda":
        torch.cuda.set_device(ctx.device)
    try:
        dist.init_process_group(ctx.backend, timeout=timedelta(seconds=timeout_seconds(
            max_seconds)))
    except Exception as exc:
        raise HardwareError(
            f"rank {ctx.rank} of {ctx.world_size} could not join the process group "
            f"({ctx.backend}): {type(exc).__name__}: {exc}",
            hint="check MASTER_ADDR/MASTER_PORT and that every rank was started",
        ) from exc
    from bsfind import launch

    launch.mark_joined()
    return True


# --------------------------------------------------------------------------- errors


class CollectiveError(HardwareError):
    """A collective failed: another rank died, or the process-group timeout passed."""


class RankError(BsfindError):
    """Another rank's error, raised on this rank with that rank's exit code."""

    def __init__(self, message: str, hint: str | None, exit_code: int) -> None:
        super().__init__(message, hint)
        self.exit_code = exit_code


class _PeerFailed(Exception):
    """Raised on the healthy ranks when another rank failed; replaced by its message."""

    def __init__(self, ranks: Sequence[int]) -> None:
        super().__init__(f"rank(s) {', '.join(map(str, ranks))} failed")
        self.ranks = tuple(ranks)


class _RankOOM(RuntimeError):
    """Out of memory on some rank, raised on every rank so that all back off together.

    A RuntimeError whose message says "out of memory", so
    :func:`bsfind.hardware.memory.is_oom` counts it.
    """


def _describe(exc: BaseException) -> tuple[int | None, str, str | None]:
    """(exit code or None for a bug, message, hint): what other ranks need to show it."""
    if isinstance(exc, BsfindError):
        return exc.exit_code, exc.message, exc.hint
    return None, f"{type(exc).__name__}: {exc}", None


# --------------------------------------------------------------------------- collectives


class Coordinator:
    """The few collectives the probes need, each turned into one clear error if it fails."""

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self.rank = ctx.rank
        self.world = ctx.world_size
        # NCCL only moves CUDA tensors; gloo is happiest with CPU ones.
        self.device = ctx.device if ctx.backend == "nccl" else torch.device("cpu")

    def _collective(self, what: str, fn: Callable[[], T]) -> T:
        try:
            return fn()
        except Exception as exc:
            first = (str(exc).strip().splitlines() or [""])[0][:200]
            raise CollectiveError(
                f"rank {self.rank}: lost contact with the other ranks during {what} "
                f"({type(exc).__name__}: {first})",
                hint=f"another rank died or stopped answering (its output: set "
                f"{RANK_OUTPUT_ENV}=all); a slow rank needs a larger {TIMEOUT_ENV}",
            ) from exc

    def exchange(self, code: int, values: Sequence[float] = ()) -> tuple[list[int], list[float]]:
        """All-reduce every rank's status code and the sum of ``values`` over ranks.

        Returns (the code of each rank, the summed values). A rank whose code is
        not OK contributes zeros.
        """
        t = torch.zeros(self.world, 1 + len(values), dtype=torch.float64)
        t[self.rank, 0] = float(code)
        if code == OK and values:
            t[self.rank, 1:] = torch.tensor([float(v) for v in values], dtype=torch.float64)
        t = t.to(self.device)
        self._collective("a status exchange", lambda: dist.all_reduce(t))
        t = t.cpu()
        codes = [int(c) for c in t[:, 0].tolist()]
        return codes, [float(v) for v in t[:, 1:].sum(0).tolist()]

    def settle(self, codes: Sequence[int], error: BaseException | None) -> None:
        """After an exchange: raise on every rank when any rank's code is not OK."""
        if error is not None:
            raise error
        bad = [r for r, c in enumerate(codes) if c != OK]
        if bad:
            raise _PeerFailed(bad)

    def checked_values(
        self, fn: Callable[[], T], width: int, values: Callable[[T], Sequence[float]]
    ) -> tuple[T, list[float]]:
        """Run ``fn`` here, agree that no rank failed, and sum ``values(result)`` over ranks."""
        error: Exception | None = None
        result: Any = None
        vals: Sequence[float] = ()
        try:
            result = fn()
            vals = values(result)
        except Interrupted:
            raise  # Ctrl-C reaches every rank: no agreement to wait for
        except Exception as exc:
            error = exc
        codes, sums = self.exchange(FAILED if error is not None else OK,
                                    vals if error is None else [0.0] * width)
        self.settle(codes, error)
        return result, sums

    def checked(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` on this rank, then agree that no rank failed (else raise on all)."""
        return self.checked_values(fn, 0, lambda _: ())[0]

    def decide(self, fn: Callable[[], Sequence[float]], width: int) -> list[float]:
        """``fn()`` evaluated on rank 0 and broadcast: one decision for every rank."""
        t = torch.zeros(width, dtype=torch.float64)
        if self.rank == 0:
            t[:] = torch.tensor([float(v) for v in fn()], dtype=torch.float64)
        t = t.to(self.device)
        self._collective("a broadcast from rank 0", lambda: dist.broadcast(t, src=0))
        return [float(v) for v in t.cpu().tolist()]

    def all_min(self, value: float) -> float:
        t = torch.tensor([float(value)], dtype=torch.float64, device=self.device)
        self._collective("an all-reduce (min)",
                         lambda: dist.all_reduce(t, op=dist.ReduceOp.MIN))
        return float(t.item())

    def all_reduce_(self, t: torch.Tensor) -> None:
        """Sum ``t`` over ranks, in place."""
        if t.device == self.device:
            self._collective("a gradient all-reduce", lambda: dist.all_reduce(t))
            return
        moved = t.to(self.device)
        self._collective("a gradient all-reduce", lambda: dist.all_reduce(moved))
        t.copy_(moved)

    def broadcast_(self, t: torch.Tensor) -> None:
        """Overwrite ``t`` with rank 0's values."""
        base = t.detach()
        tmp = base
        if tmp.dtype == torch.bool or tmp.device != self.device or not tmp.is_contiguous():
            tmp = tmp.to(self.device, torch.uint8 if tmp.dtype == torch.bool else tmp.dtype,
                         copy=True).contiguous()
        self._collective("a broadcast of the weights", lambda: dist.broadcast(tmp, src=0))
        if tmp is not base:
            with torch.no_grad():
                base.copy_(tmp.to(base.device, base.dtype))

    def barrier(self) -> None:
        if self.ctx.backend == "nccl":
            self._collective("a barrier",
                             lambda: dist.barrier(device_ids=[self.device.index or 0]))
        else:
            self._collective("a barrier", dist.barrier)

    def gather(self, obj: Any) -> list[Any]:
        """Every rank's ``obj`` (picklable), in rank order, on every rank."""
        out: list[Any] = [None] * self.world
        self._collective("a gather", lambda: dist.all_gather_object(out, obj))
        return out

    def broadcast_object(self, obj: T) -> T:
        """Rank 0's ``obj`` (picklable) on every rank."""
        box: list[Any] = [obj if self.rank == 0 else None]
        device = self.device if self.ctx.backend == "nccl" else None
        self._collective("a broadcast from rank 0",
                         lambda: dist.broadcast_object_list(box, src=0, device=device))
        return box[0]  # type: ignore[no-any-return]

    def failure(self, exc: Exception) -> BaseException:
        """The error this rank should raise once some rank failed (a collective itself).

        Every rank calls it with what it caught; the failing ranks' messages are
        gathered, and each rank gets back its own error or, when it was healthy
        (``_PeerFailed``), the first failing rank's, prefixed "rank r:", with the
        same exit code (a bug in bsfind stays a plain exception: exit 70).
        """
        mine = None if isinstance(exc, _PeerFailed) else _describe(exc)
        try:
            infos = self.gather(mine)
        except CollectiveError as lost:
            return exc if mine is not None else lost
        if mine is not None:
            return exc
        failed = [(r, info) for r, info in enumerate(infos) if info is not None]
        if not failed:
            return RuntimeError(f"{exc} without a message")
        r, (code, message, hint) = failed[0]
        others = [str(q) for q, _ in failed[1:]]
        text = f"rank {r}: {message}" + (
            f" (rank {', '.join(others)} failed too)" if others else "")
        if code is None:
            return RuntimeError(text)
        return RankError(text, hint, code)


# --------------------------------------------------------------------------- gradients


def _flat_grads(params: Sequence[torch.nn.Parameter]) -> torch.Tensor:
    """All gradients as one float64 vector (zeros where a parameter got none)."""
    return torch.cat([
        (p.grad.detach() if p.grad is not None else torch.zeros_like(p)).reshape(-1).double()
        for p in params
    ])


def _write_grads(params: Sequence[torch.nn.Parameter], flat: torch.Tensor) -> None:
    offset = 0
    for p in params:
        n = p.numel()
        p.grad = flat[offset:offset + n].reshape(p.shape).to(p.dtype, copy=True)
        offset += n


# --------------------------------------------------------------------------- the noise probe


class DistributedComm(ProbeComm):
    """The noise probe's rounds spread over the ranks (``noise/probe.py``'s extension point).

    Each rank draws its own examples (its own seed stream); the per-example
    or micro-batch squared norms are summed over ranks, the big batch is the
    all-reduced gradient, and rank 0's stop/grow decisions are broadcast, so
    every rank runs the same rounds. A failure or out-of-memory on one rank
    raises on every rank (:meth:`agree`).
    """

    def __init__(self, coord: Coordinator) -> None:
        self.coord = coord
        self.world = coord.world
        self.rank = coord.rank

    def sampling_seed(self, seed: int) -> int:
        return for_rank(seed, self.rank)

    def agree(self, local: Callable[[], float],
              unsupported: type[Exception] | None = None) -> float:
        """Run this rank's part of a round; raise on every rank if any failed; sum the value.

        An out-of-memory on any rank raises ``_RankOOM`` on every rank, so that
        all shrink the batch together.
        """
        from bsfind.hardware.memory import is_oom

        code, error, value = OK, None, 0.0
        try:
            value = local()
        except Exception as exc:
            if unsupported is not None and isinstance(exc, unsupported):
                code, error = UNSUPPORTED, exc
            elif is_oom(exc):
                code = OOM  # the exception (and the tensors it holds) is dropped here
            else:
                code, error = FAILED, exc
        codes, sums = self.coord.exchange(code, [value])
        if FAILED in codes:
            self.coord.settle(codes, error if code == FAILED else None)
        ooms = [r for r, c in enumerate(codes) if c == OOM]
        if ooms:
            raise _RankOOM(f"out of memory in the noise probe on rank "
                           f"{', '.join(map(str, ooms))}")
        lost = [r for r, c in enumerate(codes) if c == UNSUPPORTED]
        if lost:
            if error is not None:
                raise error
            from bsfind.noise.per_example import PerExampleUnsupported

            raise PerExampleUnsupported(f"per-example norms failed on rank {lost[0]}")
        return sums[0]

    def sq_norm_of_mean(self, tensors: Sequence[torch.Tensor | None], count: int) -> float:
        parts = [t.detach().reshape(-1).double() for t in tensors if t is not None]
        flat = torch.cat(parts)
        self.coord.all_reduce_(flat)
        return float((flat / (self.world * count)).pow(2).sum())

    def decide(self, fn: Callable[[], list[float]], width: int) -> list[float]:
        return self.coord.decide(fn, width)

    def is_round_oom(self, exc: BaseException) -> bool:
        return isinstance(exc, _RankOOM)

    def describe(self, probe: NoiseProbe) -> tuple[str, str]:
        n = self.world
        if probe.method == "per-example":
            local = f"{probe.b_big // n} examples per rank, b = 1 from per-example norms"
        else:
            local = (f"{probe.k // n} micro-batch(es) of {probe.b_small} per rank, b = "
                     f"{probe.b_small}")
        return (f"distributed+{probe.method}",
                f"{n} ranks ({self.coord.ctx.backend}), each drawing its own examples; "
                f"{local}; B = {probe.b_big} from the all-reduced gradient; {probe.reason}")


# --------------------------------------------------------------------------- the runner


class TorchrunRunner:
    """The pipeline's runner on one rank of a data-parallel launch (``bsfind.runner``)."""

    def __init__(self, coord: Coordinator) -> None:
        self.coord = coord
        self.world_size = coord.world
        self.notes: list[str] = []
        self.per_rank: list[RankInfo] = []
        self.sync_seconds: float | None = None
        self.sync_bytes: int | None = None
        self.per_device_batch: int | None = None
        self.timing_basis: str | None = None

    # -- set-up ------------------------------------------------------------------------
    def fit_to_load(self, job: Workload) -> contextlib.AbstractContextManager[None]:
        return contextlib.nullcontext()  # each rank's threads are the launcher's to set

    def deadline(self, seconds: float) -> Deadline:
        """The run's budget, ending at the same moment on every rank (rank 0's, counted
        from its command's start)."""
        left = self.coord.decide(lambda: [run_deadline(seconds).left()], 1)[0]
        return Deadline.after(left)

    def build(self, spec: Spec) -> Workload:
        """Build on every rank, check that the models agree, copy rank 0's weights."""
        from bsfind.errors import UserCodeError
        from bsfind.hardware.nvml import describe_device

        job = self.coord.checked(functools.partial(build, spec))
        params, buffers = list(job.model.parameters()), list(job.model.buffers())
        shape = [len(params), sum(p.numel() for p in params),
                 len(buffers), sum(b.numel() for b in buffers)]
        mine = RankInfo(rank=self.coord.rank, local_rank=self.coord.ctx.local_rank,
                        host=socket.gethostname(), device=str(job.device),
                        device_name=describe_device(job.device).name, examples=len(job))
        infos = self.coord.gather((mine, shape))
        for info, other in infos[1:]:
            if other != infos[0][1]:
                raise UserCodeError(
                    f"model.factory built a different model on rank {info.rank} "
                    f"({other[1]:,} parameter elements) than on rank 0 "
                    f"({infos[0][1][1]:,})",
                    hint="the factories must build the same model on every rank",
                )
        sizes = sorted({info.examples for info, _ in infos})
        if len(sizes) > 1:
            self.notes.append(wording.shards_differ(sizes))
        self._copy_rank0_state(job, with_params=True)
        self.per_rank = [info for info, _ in infos]
        return job

    def _copy_rank0_state(self, job: Workload, with_params: bool) -> None:
        """What DDP does at construction: every rank starts from rank 0's weights."""
        tensors = [*job.model.parameters()] if with_params else []
        for t in [*tensors, *job.model.buffers()]:
            self.coord.broadcast_(t)

    # -- training and the probes -----------------------------------------------------------
    def sampler(self, job: Workload, batch_size: int, seed: int) -> EpochSampler:
        """The global batch split over the ranks: the same permutations on every rank
        (``seed`` alike everywhere), each rank taking its slice, as DistributedSampler."""
        return EpochSampler(len(job), batch_size, torch.Generator().manual_seed(seed),
                            world=self.coord.world, rank=self.coord.rank)

    def train(
        self, job: Workload, optimizer: torch.optim.Optimizer, steps: int,
        sampler: EpochSampler, *, start_step: int, progress: ProgressFn | None,
        deadline: Deadline, on_step: Callable[[int, float], None] | None = None,
    ) -> int:
        """Data-parallel training: the mean gradient is all-reduced before every step, so
        the weights stay identical on all ranks; rank 0 decides when the deadline passed."""
        coord = self.coord

        def average(params: list[torch.nn.Parameter]) -> None:
            flat = _flat_grads(params)
            coord.all_reduce_(flat)
            _write_grads(params, flat / coord.world)

        def stop() -> bool:
            return bool(coord.decide(lambda: [1.0 if deadline.passed() else 0.0], 1)[0])

        step = train_steps(job, optimizer, steps, sampler, start_step=start_step,
                           progress=progress, should_stop=stop, on_step=on_step,
                           guard=coord.checked, reduce=average)
        self._copy_rank0_state(job, with_params=False)  # BatchNorm statistics, as DDP does
        return step

    def noise_probe(self, job: Workload, options: ProbeOptions, *, seed: int, step: int,
                    progress: ProgressFn | None) -> NoiseProbe:
        return NoiseProbe(job, options, seed=seed, step=step,
                          progress=progress if self.coord.rank == 0 else None,
                          comm=DistributedComm(self.coord))

    def curvature(self, job: Workload, est: NoiseEstimate, options: ProbeOptions, *,
                  seed: int, deadline: Deadline, progress: ProgressFn | None
                  ) -> NoiseEstimate:
        """B_noise on rank 0 alone (single-device form); the others wait for it."""

        def on_rank0() -> NoiseEstimate:
            if self.coord.rank != 0:
                return est
            return measure_curvature(job, est, options, seed=seed, deadline=deadline,
                                     progress=progress)

        out = self.coord.broadcast_object(self.coord.checked(on_rank0))
        if wording.B_NOISE_ON_RANK0 not in self.notes:
            self.notes.append(wording.B_NOISE_ON_RANK0)
        return out

    # -- hardware ----------------------------------------------------------------------
    def measure_hardware(self, job: Workload, options: HardwareOptions, deadline: Deadline,
                         progress: ProgressFn | None) -> HardwareMeasurement:
        """Memory agreed across ranks, the all-reduce time, and every rank's step times.

        Memory: each rank measures (CUDA) or predicts (CPU; RAM shared by the
        node's ranks) its own line; the smallest maximum is then verified with
        real steps on all ranks together (``_agree_max_batch``). Timing: each
        rank runs the step-time ladder on its own device at the same time (a
        synchronous step waits for the slowest, so the curve the advisor gets
        takes, at each batch size every rank timed, the slowest rank's time).
        """
        coord = self.coord
        per_device = max(1, options.baseline_batch // self.world_size)
        self.per_device_batch = per_device
        with restored_weights(job.model):
            step = measure.step_function(job, options.lr, for_rank(options.seed, coord.rank))
            if progress is not None:
                progress("memory", 0.0, "memory model")
            memory = measure.with_gradient_buckets(coord.checked(functools.partial(
                measure.memory_model, job, step, options, coord.ctx.local_world_size)),
                job.model)
            local_max = memory.max_batch_size
            # the largest batch worth stepping, on every device: a line can allow 2**30
            upper = measure.TIMING_MAX_BATCH
            memory, oom_at = self._agree_max_batch(memory, step, job, upper)
            if progress is not None:
                progress("memory", 1.0, f"max batch {memory.max_batch_size:,} per rank "
                         f"({memory.source})")
                progress("sync", 0.0, "timing the all-reduce")
            own_sync = self._time_sync(job)
            if progress is not None:
                progress("timing", 0.0, "timing steps on every rank")
            sizes = measure.ladder_sizes(job, memory)
            own_curve = coord.checked(functools.partial(
                measure.time_steps, job, step, sizes, deadline, memory, options))
        gathered = coord.gather((own_curve, own_sync, local_max, memory.tried, tuple(oom_at)))
        curve = combine_curves([g[0] for g in gathered])
        notes = []
        if curve is None:
            notes.append(wording.NO_TIMING_ON_EVERY_RANK)
        else:
            self.timing_basis = wording.slowest_rank_basis(len(curve.points))
        self.per_rank = [
            dataclasses.replace(
                info, per_device_batch_size=per_device, timing=c,
                step_seconds=c.seconds(per_device) if c is not None else None,
                sync_seconds=s, max_batch_size=m, memory_tried=tuple(tried), oom_at=oom)
            for info, (c, s, m, tried, oom) in zip(self.per_rank, gathered, strict=True)
        ]
        if progress is not None:
            progress("timing", 1.0, "timed" if curve is not None else "no step time")
        return HardwareMeasurement(memory, curve, tuple(notes), sync_seconds=self.sync_seconds)

    def _agree_max_batch(
        self, memory: MemoryModel, step: Callable[[int], None], job: Workload,
        upper: int | None,
    ) -> tuple[MemoryModel, list[int]]:
        """The smallest rank's maximum, checked by real steps that all ranks take together.

        Each rank catches its own out-of-memory, the ranks exchange a flag, and
        when any rank ran out every rank raises the same OOM, so
        :func:`~bsfind.hardware.memory.find_max_batch` halves and bisects in
        lockstep: every rank tries the same sizes. ``upper`` bounds the size
        actually stepped (on CPU the timing ladder's top): when that clipped
        size runs, the predicted maximum stands, unverified beyond it.

        Returns:
            (the memory model with the agreed maximum, the sizes that ran out
            of memory on this rank).
        """
        from bsfind.hardware import memory as mem

        start = max(1, int(self.coord.all_min(float(memory.max_batch_size))))
        top = min(start, upper) if upper is not None else start
        oom_at: list[int] = []

        def try_step(b: int) -> None:
            code, error = OK, None
            try:
                step(b)
            except Exception as exc:
                if mem.is_oom(exc):
                    code = OOM
                else:
                    code, error = FAILED, exc
            codes, _ = self.coord.exchange(code)
            if FAILED in codes:
                self.coord.settle([c if c == FAILED else OK for c in codes], error)
            ranks = [r for r, c in enumerate(codes) if c == OOM]
            if ranks:
                if self.coord.rank in ranks:
                    oom_at.append(b)
                raise _RankOOM(f"out of memory at batch size {b} on rank "
                               f"{', '.join(map(str, ranks))}")

        found, tried = mem.find_max_batch(try_step, top, None,
                                          lambda: mem.clear_cache(job.device))
        if found == top and top < start:
            agreed, verified = start, False
        else:
            agreed, verified = found, True
        return dataclasses.replace(memory, max_batch_size=agreed, verified=verified,
                                   tried=memory.tried + tried), oom_at

    def _time_sync(self, job: Workload) -> float:
        """All-reduce time of a buffer of the gradients' bytes; returns this rank's median.

        Before each repetition a barrier lines the ranks up; the rank that left
        it last waits for nobody, so its time is the all-reduce alone. The
        estimate used (``sync_seconds``) is therefore, per repetition, the
        fastest rank's time, and its median over repetitions.
        """
        nbytes = sum(p.numel() * p.element_size() for p in job.trainable())
        buf = torch.zeros(max(1, math.ceil(nbytes / 4)), dtype=torch.float32, device=job.device)
        cuda = job.device.type == "cuda"
        times = torch.zeros(self.world_size, SYNC_REPEATS, dtype=torch.float64)
        for i in range(SYNC_WARMUP + SYNC_REPEATS):
            self.coord.barrier()
            t_begin = time.perf_counter()
            self.coord.all_reduce_(buf)
            if cuda:
                torch.cuda.synchronize(job.device)
            if i >= SYNC_WARMUP:
                times[self.coord.rank, i - SYNC_WARMUP] = time.perf_counter() - t_begin
        self.coord.all_reduce_(times)
        self.sync_bytes = nbytes
        self.sync_seconds = float(times.min(dim=0).values.median())
        return float(times[self.coord.rank].median())

    def finish(self, report: Report) -> Report:
        """Rank 0's report, with the run's notes and the ``distributed`` summary, on every rank."""
        if self.coord.rank == 0:
            # the spec as run: the advice is for the ranks measured, not hardware.gpus
            ran = {**report.spec, "hardware": {**(report.spec.get("hardware") or {}),
                                               "gpus": self.world_size}}
            report = dataclasses.replace(report, warnings=report.warnings + tuple(self.notes),
                                         distributed=self.summary(), spec=ran)
        return self.coord.broadcast_object(report)

    def agree(self, go: bool) -> bool:
        """Rank 0's ``go`` on every rank (decisions from each rank's own clock differ)."""
        return bool(self.coord.decide(lambda: [1.0 if go else 0.0], 1)[0])

    def summary(self) -> DistributedSummary:
        """The report's ``distributed`` object."""
        return DistributedSummary(
            world_size=self.world_size, backend=self.coord.ctx.backend,
            sync_seconds=self.sync_seconds, sync_bytes=self.sync_bytes,
            sync_source=(None if self.sync_seconds is None
                         else wording.sync_source(SYNC_REPEATS)),
            per_device_batch_size=self.per_device_batch, timing_basis=self.timing_basis,
            per_rank=tuple(self.per_rank),
        )



def combine_curves(curves: Sequence[TimingCurve | None]) -> TimingCurve | None:
    """One device's t(B) for a synchronous data-parallel step from every rank's curve.

    At each batch size that every rank timed, the slowest rank's time (a
    synchronous step waits for it), refitted; None when a rank has no curve
    or the ranks share no batch size.
    """
    from bsfind.hardware.timing import curve_from_points

    if not curves or any(c is None for c in curves):
        return None
    tables = [{p.batch_size: p for p in c.points} for c in curves if c is not None]
    common = sorted(set.intersection(*(set(t) for t in tables)))
    if not common:
        return None
    points = [
        TimingPoint(b, max(t[b].seconds for t in tables), min(t[b].samples for t in tables),
                    max(t[b].seconds_q25 or t[b].seconds for t in tables))
        for b in common
    ]
    saturated = [cv.saturated_at for cv in curves if cv is not None]
    utils = [cv.utilization_gpu_pct for cv in curves
             if cv is not None and cv.utilization_gpu_pct is not None]
    return curve_from_points(
        points,
        saturated_at=None if None in saturated else max(s for s in saturated if s is not None),
        utilization=statistics.fmean(utils) if utils else None,
        passes=min(cv.passes for cv in curves if cv is not None),
    )


# --------------------------------------------------------------------------- the run


def execute(
    spec: Spec, progress: ProgressFn | None,
    body: Callable[[Spec, TorchrunRunner, ProgressFn | None], Report],
) -> Report:
    """Run ``body`` (the pipeline) on this rank of a data-parallel launch.

    Joins the process group (unless the caller already did), points the spec
    at this rank's device, and turns any rank's failure into the same error on
    every rank. Only rank 0 gets ``progress``.

    Returns:
        Rank 0's report on every rank (``body`` ends with the runner's ``finish``).

    Raises:
        The failing rank's error on every rank (``RankError`` where it came from
        another rank), ``CollectiveError`` when a rank stopped answering.
    """
    ctx = context(spec.hardware.device)
    spec = dataclasses.replace(
        spec, hardware=dataclasses.replace(spec.hardware, device=str(ctx.device)))
    created = _init(ctx, spec.probe.max_seconds)
    coord = Coordinator(ctx)
    try:
        try:
            return body(spec, TorchrunRunner(coord), progress if ctx.rank == 0 else None)
        except (Interrupted, CollectiveError):
            raise
        except Exception as exc:
            secondary = created and ctx.rank != 0
            # torchrun stops the others (SIGTERM, read as Ctrl-C) once rank 0 has exited,
            # while they agree on the error or wait: the agreed error stands, not
            # "interrupted" (a failing rank exited 130); the handler is put back after
            ignored, old = False, None
            if secondary:
                with contextlib.suppress(ValueError):  # (not the main thread)
                    old = signal.signal(signal.SIGTERM, signal.SIG_IGN)
                    ignored = True
            try:
                err = coord.failure(exc)
                if secondary:
                    time.sleep(SECONDARY_EXIT_DELAY_S)
            finally:
                if ignored:  # (None: a handler not set from Python, read as the default)
                    signal.signal(signal.SIGTERM, old if old is not None else signal.SIG_DFL)
            if err is exc:
                raise
            raise err from None
    finally:
        if created:
            with contextlib.suppress(Exception):
                dist.destroy_process_group()
