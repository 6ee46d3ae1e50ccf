"""Data-parallel probing under torchrun: every rank measures, rank 0 reports.

    torchrun --standalone --nproc_per_node 2 -m bsfind recommend configs/digits-mlp.yaml --json
    .venv/bin/python -m pytest tests/test_distributed.py -q     # 2 CPU processes, gloo

``bsfind.api`` hands a run to :func:`run` when the torch.distributed launch
environment is set (WORLD_SIZE > 1 with RANK; MASTER_ADDR, MASTER_PORT and
LOCAL_RANK as torchrun sets them) or the caller already initialised a process
group. Every rank builds the workload, probes and times its own device
(cuda:LOCAL_RANK with NCCL, or the CPU with gloo); the run returns the same
``Report`` on every rank, and only rank 0's CLI prints or writes files.

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
import socket
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, Any, TypeVar

import torch
import torch.distributed as dist

from bsfind.errors import BsfindError, BudgetError, HardwareError, Interrupted, UsageError
from bsfind.noise.estimators import Round, Summary
from bsfind.noise.probe import (
    DEFAULT_MICROBATCHES,
    Deadline,
    NoiseProbe,
    ProgressFn,
    _check_grad,
    _check_loss,
)
from bsfind.results import MemoryModel, NoiseEstimate, TimingCurve, TimingPoint

if TYPE_CHECKING:
    from bsfind.report import Report
    from bsfind.spec import Spec
    from bsfind.workload import Workload

T = TypeVar("T")

# Set to "all" to keep the stdout/stderr of ranks other than 0 (debugging).
RANK_OUTPUT_ENV = "BSFIND_RANK_OUTPUT"
# Seconds a collective may wait for the slowest rank before the run fails.
TIMEOUT_ENV = "BSFIND_DIST_TIMEOUT"
# Default timeout: it must exceed the longest purely local stretch between two
# collectives (building the workload, e.g. loading data; one probe round; a
# timing ladder or a B_noise probe, both bounded by probe.max_seconds), so it
# is the larger of this and 2·max_seconds + 60 s.
MIN_TIMEOUT_S = 300.0
# Rank r seeds its sampling generators with seed + r·SEED_STRIDE: independent
# streams per rank, and rank 0 draws what a single process would.
SEED_STRIDE = 1_000_003
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
# Loop decisions that rank 0 broadcasts.
_CONTINUE, _CONVERGED, _BUDGET = 0, 1, 2
_STOPPED = {_CONTINUE: "", _CONVERGED: "converged", _BUDGET: "budget"}


# --------------------------------------------------------------------------- launch


def _env_int(name: str) -> int | None:
    try:
        return int(os.environ[name])
    except (KeyError, ValueError):
        return None


def requested() -> bool:
    """True when this process is one rank of a multi-process data-parallel launch."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size() > 1
    world = _env_int("WORLD_SIZE")
    return world is not None and world > 1 and _env_int("RANK") is not None


def rank() -> int:
    """This process's global rank (0 outside a distributed launch)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return _env_int("RANK") or 0


def is_secondary_rank() -> bool:
    """True on every rank but 0 of a distributed launch: it must stay silent."""
    return requested() and rank() != 0


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
        r, world = _env_int("RANK") or 0, _env_int("WORLD_SIZE") or 1
    local = _env_int("LOCAL_RANK")
    local = r if local is None else local
    local_world = _env_int("LOCAL_WORLD_SIZE") or world
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


class DistributedNoiseProbe(NoiseProbe):
    """One rank's share of the noise probe: local examples, an all-reduced big batch.

    Sizes keep the single-process meaning: ``b_big`` is the global big batch,
    and in the micro-batch form ``k`` counts the micro-batches of all ranks,
    so the growth rule of :class:`NoiseProbe` (``_grow``) applies unchanged.
    Rank 0 applies it and broadcasts the result, with its stop decision.
    """

    def __init__(
        self, coord: Coordinator, job: Workload, *, seed: int = 0,
        progress: ProgressFn | None = None, **kwargs: Any,
    ) -> None:
        self.coord = coord
        super().__init__(job, seed=seed + SEED_STRIDE * coord.rank,
                         progress=progress if coord.rank == 0 else None, **kwargs)
        self._fit_to_ranks()

    def _fit_to_ranks(self) -> None:
        n = self.coord.world
        if self.method == "per-example":
            self.b_big = n * max(1, self.b_big // n)
        else:
            self.k = n * max(1, math.ceil(DEFAULT_MICROBATCHES / n))
            self.b_big = self.b_small * self.k

    def _switch_to_microbatch(self, reason: str) -> None:
        super()._switch_to_microbatch(reason)
        self._fit_to_ranks()

    def _shrink_after_oom(self) -> None:
        """The single-process back-off, kept to whole examples per rank (all ranks alike)."""
        before = self.b_big
        super()._shrink_after_oom()
        if self.method == "per-example":
            n = self.coord.world
            self.b_big = n * max(1, self.b_big // n)
            if self.b_big >= before:
                raise HardwareError(
                    f"out of memory in the noise probe even at {before // n} example(s) per "
                    "rank (per-example form)",
                    hint="use a device with more memory, a smaller model, or "
                    "hardware.precision: bf16",
                )
            self.max_big = self.b_big

    def _agree(self, local: Callable[[], float], unsupported: type[Exception] | None = None
               ) -> float:
        """Run this rank's part of a round; raise on every rank if any failed; sum the value.

        An out-of-memory on any rank raises ``_RankOOM`` on every rank, so that
        all shrink the batch together (``_loop``).
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
        failed = [r for r, c in enumerate(codes) if c == FAILED]
        if failed:
            self.coord.settle(codes, error if code == FAILED else None)
        ooms = [r for r, c in enumerate(codes) if c == OOM]
        if ooms:
            raise _RankOOM(f"out of memory in the noise probe at B_big={self.b_big} on rank "
                           f"{', '.join(map(str, ooms))}")
        lost = [r for r, c in enumerate(codes) if c == UNSUPPORTED]
        if lost:
            if error is not None:
                raise error
            from bsfind.noise.per_example import PerExampleUnsupported

            raise PerExampleUnsupported(f"per-example norms failed on rank {lost[0]}")
        return sums[0]

    def _round_per_example(self, norms: object) -> Round:
        from bsfind.noise.per_example import PerExampleUnsupported

        n = self.coord.world
        b = self.b_big // n
        where = f"at training step {self.step} (probe round {len(self.rounds) + 1})"

        def local() -> float:
            idx = self._draw(b)
            self.job.model.zero_grad(set_to_none=True)
            loss = self.job.loss(idx)
            _check_loss(loss, where)
            loss.backward()
            # Hooks give each example's contribution to .grad: (1/b)·∇L_i for a mean loss.
            per_ex = norms.sq_norms().double()  # type: ignore[attr-defined]
            return float(per_ex.sum()) * float(b * b)

        sq_sum = self._agree(local, PerExampleUnsupported)
        flat = _flat_grads(self.params)
        self.coord.all_reduce_(flat)
        sq_big = float((flat / n).pow(2).sum())
        sq_small = sq_sum / (n * b)
        _check_grad(sq_small + sq_big, where)
        return Round(1, sq_small, n * b, sq_big, n * b)

    def _round_microbatch(self) -> Round:
        n = self.coord.world
        b, k = self.b_small, self.k // n
        where = f"at training step {self.step} (probe round {len(self.rounds) + 1})"
        total = [torch.zeros_like(p, dtype=torch.float64) for p in self.params]

        def local() -> float:
            return self._microbatches(self._draw(b * k).view(k, b), total, where)

        sq_sum = self._agree(local)
        flat = torch.cat([acc.reshape(-1) for acc in total])
        self.coord.all_reduce_(flat)
        sq_big = float((flat / (n * k)).pow(2).sum())
        sq_small = sq_sum / (n * k)
        _check_grad(sq_small + sq_big, where)
        return Round(b, sq_small, n * k * b, sq_big, n * k * b)

    def _decide(self, deadline: Deadline, s: Summary | None, all_zero: bool) -> str:
        """Rank 0's stop/grow decision after a round (or before the first), broadcast."""

        def on_rank0() -> list[float]:
            code = _CONTINUE
            if s is not None:
                if (all_zero and len(self.rounds) >= 2) or (
                        len(self.rounds) >= self.min_rounds and s.rel_half_width <= self.target):
                    code = _CONVERGED
                else:
                    self._grow(s)
            if code == _CONTINUE and deadline.passed():
                code = _BUDGET
            return [code, self.b_big, getattr(self, "k", 0), self._rounds_at_size]

        code, b_big, k, at_size = self.coord.decide(on_rank0, 4)
        if self.coord.rank != 0:
            self.b_big, self._rounds_at_size = int(b_big), int(at_size)
            if self.method != "per-example":
                self.k = int(k)
        return _STOPPED[int(code)]

    def _loop(self, deadline: Deadline, one_round: Callable[[], Round]) -> tuple[str, bool]:
        all_zero = True
        stopped = self._decide(deadline, None, all_zero)
        while not stopped:
            try:
                r = one_round()
            except _RankOOM:
                r = None
            if r is None:  # outside the except block, so the failed round's tensors are freed
                self._shrink_after_oom()
                stopped = self._decide(deadline, None, all_zero)
                continue
            s, all_zero = self._record(r, all_zero)
            stopped = self._decide(deadline, s, all_zero)
        return stopped, all_zero

    def _where(self) -> str:
        return f" over {self.coord.world} ranks"

    def estimate(self, seconds: float, stopped: str) -> NoiseEstimate:
        est = super().estimate(seconds, stopped)
        n = self.coord.world
        if self.method == "per-example":
            local = f"{self.b_big // n} examples per rank, b = 1 from per-example norms"
        else:
            local = (f"{self.k // n} micro-batch(es) of {self.b_small} per rank, b = "
                     f"{self.b_small}")
        return dataclasses.replace(
            est,
            method=f"distributed+{self.method}",
            method_reason=(f"{n} ranks ({self.coord.ctx.backend}), each drawing its own "
                           f"examples; {local}; B = {self.b_big} from the all-reduced "
                           f"gradient; {self.reason}"),
        )


# --------------------------------------------------------------------------- the hooks


class Parallel:
    """What ``bsfind.api`` calls instead of its single-process steps, on every rank."""

    def __init__(self, coord: Coordinator) -> None:
        self.coord = coord
        self.world_size = coord.world
        self.notes: list[str] = []
        self.per_rank: list[dict[str, Any]] = []
        self.sync_seconds: float | None = None
        self.sync_bytes: int | None = None
        self.advice_sync_seconds: float | None = None  # None: the advisor predicts it
        self.per_device_batch: int | None = None
        self.timing_basis: str | None = None

    # -- set-up ------------------------------------------------------------------------
    def deadline(self, seconds: float) -> Deadline:
        """The run's budget, started at the same moment on every rank (rank 0's value)."""
        left = self.coord.decide(lambda: [seconds], 1)[0]
        return Deadline.after(left)

    def build(self, spec: Spec) -> Workload:
        """Build on every rank, check that the models agree, copy rank 0's weights."""
        from bsfind.errors import UserCodeError
        from bsfind.hardware.nvml import describe_device
        from bsfind.workload import build

        job = self.coord.checked(functools.partial(build, spec))
        params, buffers = list(job.model.parameters()), list(job.model.buffers())
        shape = [len(params), sum(p.numel() for p in params),
                 len(buffers), sum(b.numel() for b in buffers)]
        mine = {"rank": self.coord.rank, "local_rank": self.coord.ctx.local_rank,
                "host": socket.gethostname(), "device": str(job.device),
                "device_name": describe_device(job.device).name, "examples": len(job),
                "shape": shape}
        infos = self.coord.gather(mine)
        for info in infos[1:]:
            if info["shape"] != infos[0]["shape"]:
                raise UserCodeError(
                    f"model.factory built a different model on rank {info['rank']} "
                    f"({info['shape'][1]:,} parameter elements) than on rank 0 "
                    f"({infos[0]['shape'][1]:,})",
                    hint="the factories must build the same model on every rank",
                )
        sizes = sorted({info["examples"] for info in infos})
        if len(sizes) > 1:
            self.notes.append(
                f"the dataset has {', '.join(map(str, sizes))} examples on different ranks "
                "(per-rank shards?): each rank samples its own; the report shows rank 0's size")
        self._copy_rank0_state(job, with_params=True)
        self.per_rank = [{k: v for k, v in info.items() if k != "shape"} for info in infos]
        return job

    def _copy_rank0_state(self, job: Workload, with_params: bool) -> None:
        """What DDP does at construction: every rank starts from rank 0's weights."""
        tensors = [*job.model.parameters()] if with_params else []
        for t in [*tensors, *job.model.buffers()]:
            self.coord.broadcast_(t)

    # -- the probes --------------------------------------------------------------------
    def noise_probe(self, job: Workload, **kwargs: Any) -> NoiseProbe:
        return DistributedNoiseProbe(self.coord, job, **kwargs)

    def train_steps(
        self,
        job: Workload,
        optimizer: torch.optim.Optimizer,
        steps: int,
        batch_size: int,
        gen: torch.Generator,
        start_step: int = 0,
        progress: ProgressFn | None = None,
        deadline: Deadline | None = None,
    ) -> int:
        """Data-parallel warm-up: the global batch ``batch_size`` split over the ranks.

        Like DistributedSampler: one permutation per epoch, the same on every
        rank (``gen`` is seeded alike everywhere), each rank taking its slice of
        every global batch; the mean gradient is all-reduced before every
        optimizer step, so the weights stay identical on all ranks. Rank 0
        decides when the deadline has passed.
        """
        coord = self.coord
        n = len(job)
        local = max(1, min(batch_size, n) // coord.world)
        glob = local * coord.world
        params = job.trainable()
        order, pos = torch.empty(0, dtype=torch.long), 0

        def stop_now() -> list[float]:
            return [1.0 if deadline is not None and deadline.passed() else 0.0]

        def one(idx: torch.Tensor, where: str) -> float:
            optimizer.zero_grad(set_to_none=True)
            loss = job.loss(idx)
            _check_loss(loss, where)
            loss.backward()
            return float(loss.detach())

        step = start_step
        stop = coord.decide(stop_now, 1)[0]
        for i in range(steps):
            if stop:
                break
            if pos + glob > order.numel():
                order = torch.cat([torch.randperm(n, generator=gen)
                                   for _ in range(math.ceil(glob / n))])
                pos = 0
            idx = order[pos + coord.rank * local: pos + (coord.rank + 1) * local]
            pos += glob
            where = f"at warm-up training step {start_step + i + 1}"
            _, sums = coord.checked_values(functools.partial(one, idx, where), 1,
                                           lambda v: [v])
            flat = _flat_grads(params)
            coord.all_reduce_(flat)
            flat /= coord.world
            _check_grad(float(flat.pow(2).sum()), where)
            _write_grads(params, flat)
            coord.checked(optimizer.step)
            step = start_step + i + 1
            if progress is not None and (i % 10 == 0 or i == steps - 1):
                progress("train", (i + 1) / steps,
                         f"training step {step} (loss {sums[0] / coord.world:.3f})")
            stop = coord.decide(stop_now, 1)[0]
        optimizer.zero_grad(set_to_none=True)
        self._copy_rank0_state(job, with_params=False)  # BatchNorm statistics, as DDP does
        return step

    def curvature(
        self, job: Workload, est: NoiseEstimate, deadline: Deadline, progress: ProgressFn | None
    ) -> NoiseEstimate:
        """B_noise on rank 0 alone (single-device form); the others wait for it."""
        from bsfind.api import _with_curvature

        def on_rank0() -> NoiseEstimate:
            if self.coord.rank != 0:
                return est
            return _with_curvature(job, est, deadline, progress)

        out = self.coord.broadcast_object(self.coord.checked(on_rank0))
        note = "B_noise was measured on rank 0 alone (single-device form); B_simple on all ranks"
        if note not in self.notes:
            self.notes.append(note)
        return out

    # -- hardware ----------------------------------------------------------------------
    def measure_hardware(
        self, job: Workload, deadline: Deadline, progress: ProgressFn | None
    ) -> tuple[MemoryModel | None, TimingCurve | None, list[str]]:
        """Memory agreed across ranks, the all-reduce time, and every rank's step times.

        Memory: each rank measures (CUDA) or predicts (CPU; RAM shared by the
        node's ranks) its own line; the smallest maximum is then verified with
        real steps on all ranks together (``_agree_max_batch``). Timing: each
        rank runs the step-time ladder on its own device at the same time (a
        synchronous step waits for the slowest, so the curve the advisor gets
        takes, at each batch size every rank timed, the slowest rank's time).
        """
        from bsfind import api
        from bsfind.hardware import memory as mem
        from bsfind.hardware import nvml, timing

        spec = job.spec
        coord = self.coord
        notes: list[str] = []
        if spec.hardware.gpus not in (1, self.world_size):
            notes.append(f"hardware.gpus: {spec.hardware.gpus} is not used under torchrun: the "
                         f"advice is for the {self.world_size} ranks measured (--max-gpus "
                         "shows other device counts)")
        cuda = job.device.type == "cuda"
        fraction = spec.hardware.memory_fraction
        self.per_device_batch = max(1, spec.optimizer.batch_size // self.world_size)

        def clear() -> None:
            mem.clear_cache(job.device)

        with api._scratch_weights(job):
            step = api._step_function(job, spec.probe.seed + 5 + SEED_STRIDE * coord.rank)
            if progress is not None:
                progress("memory", 0.0, "memory model")

            def local_memory() -> MemoryModel:
                if cuda:
                    return mem.measure_memory_cuda(step, (2, 8, 32), job.device,
                                                   memory_fraction=fraction)

                def make_batch(b: int) -> tuple[Any, torch.Tensor]:
                    return job.batch(torch.randint(len(job), (b,)))

                # The node's ranks share its RAM.
                limit = mem.cpu_memory_limit(fraction) // max(1, coord.ctx.local_world_size)
                return mem.predict_memory(
                    job.model, make_batch, job.loss_fn, job.optimizer_cls, limit_bytes=limit,
                    optimizer_kwargs={"lr": spec.optimizer.lr, **job.optimizer_kwargs},
                )

            memory = coord.checked(local_memory)
            local_max = memory.max_batch_size
            memory, oom_at = self._agree_max_batch(
                memory, step, clear, None if cuda else api.TIMING_MAX_BATCH)
            if progress is not None:
                progress("memory", 1.0, f"max batch {memory.max_batch_size:,} per rank "
                         f"({memory.source})")
                progress("sync", 0.0, "timing the all-reduce")
            own_sync = self._time_sync(job)
            if progress is not None:
                progress("timing", 0.0, "timing steps on every rank")
            ladder_top = min(memory.max_batch_size, api.TIMING_MAX_BATCH)
            sizes = timing.geometric_ladder(
            api.ladder_start(job.model), max(api.ladder_start(job.model), ladder_top))
            util = None
            if cuda and nvml.available():
                index = job.device.index or 0

                def util() -> float | None:
                    return nvml.sample_utilization(index)

            def local_ladder() -> TimingCurve | None:
                try:
                    return timing.time_ladder(
                        step, sizes, device=job.device, max_seconds=max(0.0, deadline.left()),
                        max_batch=memory.max_batch_size, sample_util=util,
                    )
                except BudgetError:
                    return None

            own_curve = coord.checked(local_ladder)
        gathered = coord.gather({"curve": own_curve, "sync_seconds": own_sync,
                                 "max_batch_size": local_max, "tried": list(memory.tried),
                                 "oom_at": oom_at})
        curves = [g["curve"] for g in gathered]
        curve = combine_curves(curves)
        if curve is None:
            notes.append("the time budget ran out before every rank timed a step: no "
                         "step-time curve; the advice uses the noise scale only")
        else:
            self.timing_basis = (f"at each of the {len(curve.points)} batch sizes every rank "
                                 "timed, the slowest rank's median step time")
        for info, g in zip(self.per_rank, gathered, strict=True):
            c = g["curve"]
            info.update({
                "per_device_batch_size": self.per_device_batch,
                "step_seconds": c.seconds(self.per_device_batch) if c is not None else None,
                "timing": None if c is None else {
                    "t0": c.t0, "per_example": c.per_example, "r2": c.r2,
                    "points": [{"batch_size": p.batch_size, "seconds": p.seconds,
                                "samples": p.samples} for p in c.points],
                },
                "sync_seconds": g["sync_seconds"],
                "max_batch_size": g["max_batch_size"],
                "memory_tried": g["tried"],
                "oom_at": g["oom_at"],
            })
        self.advice_sync_seconds = None if spec.hardware.gpu else self.sync_seconds
        if spec.hardware.gpu:
            notes.append(f"the all-reduce time measured here ({self.sync_seconds:.3g} s) is not "
                         f"used for {spec.hardware.gpu}: the advisor predicts it from "
                         "hardware.interconnect")
        if progress is not None:
            progress("timing", 1.0, "timed")
        return memory, curve, notes

    def _agree_max_batch(
        self, memory: MemoryModel, step: Callable[[int], None], clear: Callable[[], None],
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

        found, tried = mem.find_max_batch(try_step, top, None, clear)
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

    def summary(self) -> dict[str, Any]:
        """The report's ``distributed`` object."""
        return {
            "world_size": self.world_size,
            "backend": self.coord.ctx.backend,
            "sync_seconds": self.sync_seconds,
            "sync_bytes": self.sync_bytes,
            "sync_source": None if self.sync_seconds is None else (
                f"measured: median of {SYNC_REPEATS} barrier-synchronised all-reduces of "
                "the gradients' bytes, each the time of the last rank to arrive"),
            "per_device_batch_size": self.per_device_batch,
            "timing_basis": self.timing_basis,
            "per_rank": self.per_rank,
        }


def combine_curves(curves: Sequence[TimingCurve | None]) -> TimingCurve | None:
    """One device's t(B) for a synchronous data-parallel step from every rank's curve.

    At each batch size that every rank timed, the slowest rank's median (a
    synchronous step waits for it), refitted; None when a rank has no curve
    or the ranks share no batch size.
    """
    from bsfind.hardware.timing import fit_linear

    if not curves or any(c is None for c in curves):
        return None
    tables = [{p.batch_size: p for p in c.points} for c in curves if c is not None]
    common = sorted(set.intersection(*(set(t) for t in tables)))
    if not common:
        return None
    points = tuple(
        TimingPoint(b, max(t[b].seconds for t in tables), min(t[b].samples for t in tables))
        for b in common
    )
    t0, c, r2 = fit_linear(points)
    saturated = [cv.saturated_at for cv in curves if cv is not None]
    utils = [cv.utilization_gpu_pct for cv in curves
             if cv is not None and cv.utilization_gpu_pct is not None]
    return TimingCurve(
        points=points, t0=t0, per_example=c, r2=r2, source="measured",
        saturated_at=None if None in saturated else max(s for s in saturated if s is not None),
        utilization_gpu_pct=statistics.fmean(utils) if utils else None,
    )


# --------------------------------------------------------------------------- the run


def run(spec: Spec, progress: ProgressFn | None, command: str, max_gpus: int | None) -> Report:
    """``bsfind.api``'s run on one rank of a data-parallel launch.

    Returns rank 0's report on every rank (with its ``distributed`` object).

    Raises:
        The failing rank's error on every rank (``RankError`` where it came from
        another rank), ``CollectiveError`` when a rank stopped answering.
    """
    from bsfind import api

    ctx = context(spec.hardware.device)
    spec = dataclasses.replace(
        spec, hardware=dataclasses.replace(spec.hardware, device=str(ctx.device)))
    created = _init(ctx, spec.probe.max_seconds)
    coord = Coordinator(ctx)
    par = Parallel(coord)
    try:
        try:
            report = api._run(spec, progress if ctx.rank == 0 else None, command, max_gpus,
                              par=par)
        except (Interrupted, CollectiveError):
            raise
        except Exception as exc:
            err = coord.failure(exc)
            if created and ctx.rank != 0:
                time.sleep(SECONDARY_EXIT_DELAY_S)
            if err is exc:
                raise
            raise err from None
        if ctx.rank == 0:
            report = dataclasses.replace(report, warnings=report.warnings + tuple(par.notes),
                                         distributed=par.summary())
        return coord.broadcast_object(report)
    finally:
        if created:
            with contextlib.suppress(Exception):
                dist.destroy_process_group()
