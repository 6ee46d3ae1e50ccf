"""One training step, two batch samplers and one training loop, for every phase.

Training along the probe points (warm-up), the hardware measurement's timed
steps, the data-parallel runner, the branched runs and the evidence scripts
all train through :func:`training_step` and draw examples from
:class:`EpochSampler` (ordinary training order) or :class:`ReplacementSampler`
(uniform with replacement: the probes' sampling). The data-parallel runner
adds its collectives through the ``guard`` and ``reduce`` arguments instead of
a second implementation.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar

import torch
from torch import nn

from bsfind.budget import ProgressFn
from bsfind.errors import UserCodeError
from bsfind.workload import Workload

T = TypeVar("T")


def grad_sq(params: Sequence[nn.Parameter]) -> float:
    """|∇|² summed over the parameters' ``.grad`` (float64; parameters without one count 0)."""
    total = torch.zeros((), dtype=torch.float64, device=params[0].device)
    for p in params:
        if p.grad is not None:
            total += p.grad.detach().double().pow(2).sum()
    return float(total)


def check_loss(loss: torch.Tensor, where: str) -> None:
    """Raise a user error naming ``where`` when the loss is NaN or infinite."""
    if not torch.isfinite(loss.detach()):
        raise UserCodeError(
            f"loss is {float(loss.detach())} {where}",
            hint="check the data for NaN/inf, lower the learning rate, or use a checkpoint",
        )


def check_reached(params: Sequence[nn.Parameter], model_name: str, where: str) -> None:
    """Raise a user error when a backward left every trainable parameter without a
    gradient: the loss does not depend on them (a constant, or a detached output)."""
    if all(p.grad is None for p in params):
        raise UserCodeError(
            f"no gradient reached the trainable parameters of {model_name!r} {where}",
            hint="check that the loss depends on the model's outputs, and that the forward "
                 "does not detach them",
        )


def check_grad(value: float, where: str) -> None:
    """Raise a user error naming ``where`` when a squared gradient norm is not finite."""
    if not math.isfinite(value):
        raise UserCodeError(f"gradients are NaN or inf {where}",
                            hint="check the model and loss for overflow")


class EpochSampler:
    """Ordinary training order: a fresh permutation of the dataset every epoch.

    Batches are consecutive slices of the permutation; a batch that would run
    past its end starts the next permutation. With ``world`` ranks (the
    data-parallel runner), every rank walks the same permutations (the same
    ``gen`` seed) and takes its own slice of each global batch, as
    DistributedSampler does; the global batch is then ``world`` × the per-rank
    batch ``batch_size // world``.
    """

    def __init__(self, n: int, batch_size: int, gen: torch.Generator, world: int = 1,
                 rank: int = 0) -> None:
        if n < 1 or batch_size < 1:
            raise ValueError(f"need n >= 1 and batch_size >= 1, got {n}, {batch_size}")
        self.n = n
        self.gen = gen
        self.local = max(1, min(batch_size, n) // world)
        self.batch_size = self.local * world  # the global batch
        self.rank = rank
        self.order = torch.empty(0, dtype=torch.long)
        self.pos = 0

    def next(self) -> torch.Tensor:
        """This rank's indices of the next batch."""
        if self.pos + self.batch_size > self.order.numel():
            self.order = torch.cat([torch.randperm(self.n, generator=self.gen)
                                    for _ in range(math.ceil(self.batch_size / self.n))])
            self.pos = 0
        start = self.pos + self.rank * self.local
        self.pos += self.batch_size
        return self.order[start:start + self.local]


class ReplacementSampler:
    """Examples drawn uniformly with replacement (so the two-batch estimators of
    ``noise/estimators.py`` are unbiased for the dataset's population covariance)."""

    def __init__(self, n: int, gen: torch.Generator) -> None:
        self.n = n
        self.gen = gen

    def draw(self, size: int) -> torch.Tensor:
        return torch.randint(self.n, (size,), generator=self.gen)


def _call(fn: Callable[[], T]) -> T:
    return fn()


def training_step(
    job: Workload,
    optimizer: torch.optim.Optimizer,
    idx: torch.Tensor,
    *,
    where: str = "",
    check: bool = True,
    guard: Callable[[Callable[[], object]], object] = _call,
    reduce: Callable[[list[nn.Parameter]], None] | None = None,
    micro: int | None = None,
) -> torch.Tensor:
    """One optimizer step on the examples ``idx``; returns the (detached) loss.

    Args:
        where: names the step in error messages ("at training step 3").
        check: raise a user error on a NaN/inf loss or gradient (off for timing,
            where it would add a device synchronisation).
        guard: runs the step's two fallible parts (forward + backward, and the
            optimizer step); the data-parallel runner agrees across ranks there.
        reduce: called on the trainable parameters between backward and the
            optimizer step (the data-parallel runner averages gradients there).
        micro: at most this many examples per forward and backward (gradient
            accumulation, as for a batch larger than one step fits): each chunk's mean
            loss weighted by its share of ``idx``, so the gradient is the batch's.
    """
    params = job.trainable()
    chunks = [idx] if micro is None or len(idx) <= micro else list(torch.split(idx, micro))

    def forward_backward() -> torch.Tensor:
        optimizer.zero_grad(set_to_none=True)
        parts = []
        for chunk in chunks:
            loss = job.loss(chunk)
            if check:
                check_loss(loss, where)
            if len(chunks) > 1:
                loss = loss * (len(chunk) / len(idx))
            loss.backward()
            parts.append(loss.detach())
        return parts[0] if len(parts) == 1 else torch.stack(parts).sum()

    loss = guard(forward_backward)
    if reduce is not None:
        reduce(params)
    if check:
        check_grad(grad_sq(params), where)
    guard(functools.partial(optimizer_step, optimizer, job.optimizer_name, where))
    assert isinstance(loss, torch.Tensor)
    return loss


def optimizer_step(optimizer: torch.optim.Optimizer, name: str, where: str = "") -> None:
    """``optimizer.step()``, its failures the user's (out of memory passes through)."""
    from bsfind.hardware.memory import is_oom

    try:
        optimizer.step()
    except Exception as exc:
        if is_oom(exc):
            raise
        closure = isinstance(exc, TypeError) and "closure" in str(exc)
        raise UserCodeError(
            f"optimizer {name!r} raised {type(exc).__name__} in step{' ' + where if where else ''}"
            f": {exc}",
            hint=("an optimizer whose step needs a closure (LBFGS) cannot be used: bsfind "
                  "steps as a training loop does, optimizer.step()") if closure else None,
        ) from exc


def train_steps(
    job: Workload,
    optimizer: torch.optim.Optimizer,
    steps: int,
    sampler: EpochSampler,
    *,
    start_step: int = 0,
    progress: ProgressFn | None = None,
    should_stop: Callable[[], bool] | None = None,
    on_step: Callable[[int, float], None] | None = None,
    guard: Callable[[Callable[[], object]], object] = _call,
    reduce: Callable[[list[nn.Parameter]], None] | None = None,
) -> int:
    """Train up to ``steps`` optimizer steps; return the training step reached.

    Stops early when ``should_stop()`` says so before a step (the deadline).
    ``on_step(step, loss)`` sees every step's training loss.
    """
    step = start_step
    for i in range(steps):
        if should_stop is not None and should_stop():
            break
        idx = sampler.next()
        step = start_step + i + 1
        loss = training_step(job, optimizer, idx, where=f"at training step {step}",
                             guard=guard, reduce=reduce)
        if on_step is not None:
            on_step(step, float(loss))
        if progress is not None and (i % 10 == 0 or i == steps - 1):
            progress("train", (i + 1) / steps, f"training step {step} (loss {float(loss):.3f})")
    optimizer.zero_grad(set_to_none=True)
    return step


def host_copy(x: object) -> object:
    """``x`` (a state dict, nested) with every tensor copied to host memory. Saved states
    kept there leave a GPU's memory to the runs and measurements in between (and out of
    the memory line measured on CUDA, whose fixed part counts every tensor allocated)."""
    if isinstance(x, torch.Tensor):
        return x.detach().to("cpu", copy=True)
    if isinstance(x, dict):
        return {k: host_copy(v) for k, v in x.items()}
    if isinstance(x, tuple) and hasattr(x, "_fields"):  # a named tuple
        return type(x)(*[host_copy(v) for v in x])  # type: ignore[arg-type]
    if isinstance(x, (list, tuple)):
        return type(x)(host_copy(v) for v in x)
    return copy.deepcopy(x)


def _off_host(t: torch.Tensor) -> bool:
    return t.device.type != "cpu"


def _to_host(t: torch.Tensor) -> torch.Tensor:
    return t.to("cpu")


def _back(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    return host.to(device)


def host_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """A host copy of ``model``'s state_dict (weights and buffers): :func:`host_copy`."""
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


@contextlib.contextmanager
def offloaded(optimizer: torch.optim.Optimizer | None, *,
              which: Callable[[torch.Tensor], bool] = _off_host,
              move: Callable[[torch.Tensor], torch.Tensor] = _to_host,
              back: Callable[[torch.Tensor, torch.device], torch.Tensor] = _back
              ) -> Iterator[None]:
    """``optimizer``'s state in host memory inside the block, back where it was after.

    The run along training keeps its optimizer (the branches carry its state); on a GPU
    an Adam state is two more copies of the parameters, which the hardware measurement
    would count as the training's own fixed memory. Only the devices are remembered,
    so nothing holds the device tensors inside the block. ``which`` / ``move`` /
    ``back``: the tensors that go (default: those off the host), how they go and how
    they return (the tests swap them)."""
    away: list[tuple[dict[str, Any], str, torch.device]] = []
    try:
        for st in optimizer.state.values() if optimizer is not None else ():
            for k in list(st):
                if isinstance(st[k], torch.Tensor) and which(st[k]):
                    device = st[k].device
                    st[k] = move(st[k])
                    away.append((st, k, device))
        yield
    finally:
        for st, k, device in away:
            st[k] = back(st[k], device)


@contextlib.contextmanager
def kept_buffers_and_grads(model: nn.Module) -> Iterator[None]:
    """A measurement at fixed weights leaves the caller's model as it found it: its buffers
    (BatchNorm's running statistics, which a forward in training mode updates) and its
    parameters' ``.grad`` (a call between ``backward()`` and ``step()``) are put back
    after the block. Host copies, so that the measurement has the device's memory."""
    buffers = {(m, name): (b.detach().to("cpu", copy=True), b.device)
               for m in model.modules() for name, b in m.named_buffers(recurse=False)}
    grads = {p: None if p.grad is None else p.grad.detach().to("cpu", copy=True)
             for p in model.parameters()}
    try:
        yield
    finally:
        with torch.no_grad():
            for (m, name), (saved, device) in buffers.items():
                now = getattr(m, name, None)
                if (isinstance(now, torch.Tensor) and now.shape == saved.shape
                        and now.dtype == saved.dtype):
                    now.copy_(saved)
                else:  # re-registered in another shape (a cache grown for longer inputs)
                    setattr(m, name, saved.to(device))
        for p, g in grads.items():
            p.grad = None if g is None else g.to(p.device)


@contextlib.contextmanager
def restored_weights(model: nn.Module) -> Iterator[None]:
    """Let a measurement train freely, then restore weights and buffers (and clear grads).
    The saved copy is in host memory (:func:`host_copy`)."""
    saved = host_weights(model)
    try:
        yield
    finally:
        model.load_state_dict(saved)
        model.zero_grad(set_to_none=True)


def evaluation_subset(n: int, seed: int, size: int = 512) -> torch.Tensor:
    """A fixed random subset of at most ``size`` of the ``n`` examples (sorted)."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:size].sort().values


@torch.no_grad()
def evaluate_loss(job: Workload, idx: torch.Tensor, chunk: int = 512) -> float | None:
    """The mean training loss on the examples ``idx``, without a trace on the model.

    The model stays in its mode (the training loss is the quantity S(B) models);
    buffers (BatchNorm statistics) and the random generators are left as they were.
    Chunks of at most ``chunk`` examples, halved on out-of-memory; None when not
    even one example fits (the loss is then not reported).
    """
    from bsfind.hardware.memory import clear_cache, is_oom, preserved_state

    while chunk >= 1:
        total, oom = 0.0, False
        try:
            with preserved_state(job.model):
                for start in range(0, len(idx), chunk):
                    part = idx[start:start + chunk]
                    total += float(job.loss(part)) * len(part)
        except Exception as exc:
            if not is_oom(exc):
                raise
            oom = True
        if not oom:
            return total / max(1, len(idx))
        clear_cache(job.device)  # outside the except block: the failed chunk is freed
        chunk //= 2
    return None
