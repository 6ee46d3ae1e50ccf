"""The noise probe: rounds of two-batch measurements at fixed weights.

A round draws examples uniformly *with replacement* (so the estimators of
``estimators.py`` are unbiased for the dataset's population covariance; a
permutation would bias |G_B|² by the finite-population factor (n−B)/(n−1)),
and measures

- per-example form (b = 1): one forward/backward of B examples with hooks
  that give every example's gradient norm (``per_example.py``); |G_B|² is the
  norm of the ordinary batch gradient. Lowest variance (Gray et al. 2024).
- micro-batch form: k micro-batches of b examples, one backward each; |G_b|²
  is the mean of their norms, |G_B|² (B = k·b) the norm of their mean. Works
  for any model, BatchNorm included.

Rounds repeat until the 95% interval of B_simple is within
``target_rel_error`` of the estimate or the deadline passes. While |G|² is
unresolved (its interval includes 0) B_big doubles: more rounds at a batch
far below B_simple barely help (DESIGN §2). No optimizer step happens here.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from bsfind.errors import BudgetError, HardwareError, Interrupted, UserCodeError
from bsfind.hardware.memory import clear_cache, is_oom
from bsfind.noise.estimators import Round, Summary, summarize
from bsfind.results import NoiseEstimate
from bsfind.workload import Workload

# Progress callback: (phase, fraction done in [0, 1], message). The CLI draws it.
ProgressFn = Callable[[str, float, str], None]

# Rounds before the interval is trusted for stopping or growing: the t-based
# variance of a handful of rounds is itself too noisy to stop on.
MIN_ROUNDS = 10
# Micro-batches per round in the micro-batch form (B_big = k·b to start).
DEFAULT_MICROBATCHES = 8
# Largest B_big as a multiple of the dataset size (sampling is with replacement,
# so B_big may exceed the dataset; beyond this the recommendation is clipped anyway).
MAX_BIG_OVER_DATASET = 4


@dataclass(frozen=True)
class Deadline:
    """A wall-clock budget shared by the phases of one run."""

    end: float
    clock: Callable[[], float] = time.perf_counter

    @classmethod
    def after(cls, seconds: float, clock: Callable[[], float] = time.perf_counter) -> Deadline:
        return cls(clock() + seconds, clock)

    def left(self) -> float:
        return self.end - self.clock()

    def passed(self) -> bool:
        return self.left() <= 0


def choose_method(model: torch.nn.Module, requested: str) -> tuple[str, str]:
    """Pick "per-example" or "microbatch" and say why."""
    if requested == "microbatch":
        return "microbatch", "requested (probe.method: microbatch)"
    from bsfind.noise.per_example import plan

    p = plan(model)
    if p.ok:
        why = "requested" if requested == "per-example" else "auto: cheapest exact method"
        return "per-example", f"{why}; {p.reason}"
    if requested == "per-example":
        raise UserCodeError(
            f"probe.method: per-example is not possible for this model: {p.reason}",
            hint="use probe.method: auto or microbatch",
        )
    return "microbatch", f"auto: per-example norms unavailable ({p.reason})"


def _grad_sq(params: list[torch.nn.Parameter]) -> float:
    total = torch.zeros((), dtype=torch.float64, device=params[0].device)
    for p in params:
        if p.grad is not None:
            total += p.grad.detach().double().pow(2).sum()
    return float(total)


def _check_loss(loss: torch.Tensor, where: str) -> None:
    if not torch.isfinite(loss.detach()):
        raise UserCodeError(
            f"loss is {float(loss.detach())} {where}",
            hint="check the data for NaN/inf, lower the learning rate, or use a checkpoint",
        )


def _check_grad(value: float, where: str) -> None:
    if not math.isfinite(value):
        raise UserCodeError(f"gradients are NaN or inf {where}",
                            hint="check the model and loss for overflow")


class NoiseProbe:
    """Measures B_simple of a workload's model at its current weights."""

    def __init__(
        self,
        job: Workload,
        *,
        method: str = "auto",
        batch_size: int = 64,
        microbatch_size: int | None = None,
        target_rel_error: float = 0.1,
        seed: int = 0,
        step: int = 0,
        progress: ProgressFn | None = None,
        min_rounds: int = MIN_ROUNDS,
    ) -> None:
        self.job = job
        self.method, self.reason = choose_method(job.model, method)
        self.target = target_rel_error
        self.step = step
        self.progress = progress
        self.min_rounds = min_rounds
        self.n = len(job)
        self.gen = torch.Generator().manual_seed(seed)
        self.params = job.trainable()
        self.max_big = max(2, MAX_BIG_OVER_DATASET * self.n)
        if self.method == "per-example":
            self.b_small = 1
            self.b_big = max(2, min(batch_size, self.max_big))
        else:
            b = microbatch_size or max(2, batch_size // DEFAULT_MICROBATCHES)
            self.b_small = b
            self.k = DEFAULT_MICROBATCHES
            self.b_big = b * self.k
        self.rounds: list[Round] = []
        self._rounds_at_size = 0

    def _shrink_after_oom(self) -> None:
        """Halve the batch that ran out of memory and never grow past it again."""
        self.job.model.zero_grad(set_to_none=True)
        clear_cache(self.job.device)
        if self.method == "per-example" and self.b_big > 2:
            self.b_big //= 2
        elif self.method == "microbatch" and self.b_small > 1:
            self.b_small //= 2
            self.b_big = self.b_small * self.k
        else:
            raise HardwareError(
                f"out of memory in the noise probe even at batch size {self.b_big} "
                f"({self.method} form)",
                hint="use a device with more memory, a smaller model, or "
                "hardware.precision: bf16",
            )
        self.max_big = self.b_big
        self._rounds_at_size = 0

    def _switch_to_microbatch(self, reason: str) -> None:
        self.method, self.reason = "microbatch", reason
        self.b_small = max(2, self.b_big // DEFAULT_MICROBATCHES)
        self.k = DEFAULT_MICROBATCHES
        self.b_big = self.b_small * self.k
        self.rounds.clear()
        self._rounds_at_size = 0

    # -- one round -------------------------------------------------------------------
    def _draw(self, size: int) -> torch.Tensor:
        return torch.randint(self.n, (size,), generator=self.gen)

    def _round_per_example(self, norms: object) -> Round:
        b = self.b_big
        idx = self._draw(b)
        self.job.model.zero_grad(set_to_none=True)
        loss = self.job.loss(idx)
        where = f"at training step {self.step} (probe round {len(self.rounds) + 1})"
        _check_loss(loss, where)
        loss.backward()
        # Hooks give each example's contribution to .grad: (1/B)·∇L_i for a mean loss.
        per_ex = norms.sq_norms().double() * float(b * b)  # type: ignore[attr-defined]
        sq_small = float(per_ex.mean())
        sq_big = _grad_sq(self.params)
        _check_grad(sq_small + sq_big, where)
        return Round(1, sq_small, b, sq_big, b)

    def _microbatches(self, idx: torch.Tensor, total: list[torch.Tensor], where: str) -> float:
        """One backward per row of ``idx``: add each gradient to ``total``, return Σ|g_j|²."""
        sq_sum = 0.0
        for j in range(idx.shape[0]):
            self.job.model.zero_grad(set_to_none=True)
            loss = self.job.loss(idx[j])
            _check_loss(loss, where)
            loss.backward()
            sq_sum += _grad_sq(self.params)
            for acc, p in zip(total, self.params, strict=True):
                if p.grad is not None:
                    acc += p.grad.detach().double()
        return sq_sum

    def _round_microbatch(self) -> Round:
        b, k = self.b_small, self.k
        idx = self._draw(b * k).view(k, b)
        total = [torch.zeros_like(p, dtype=torch.float64) for p in self.params]
        where = f"at training step {self.step} (probe round {len(self.rounds) + 1})"
        sq_sum = self._microbatches(idx, total, where)
        sq_big = float(sum((acc / k).pow(2).sum() for acc in total))
        _check_grad(sq_sum + sq_big, where)
        return Round(b, sq_sum / k, b * k, sq_big, b * k)

    # -- the loop ----------------------------------------------------------------------
    def _grow(self, s: Summary) -> None:
        """Double B_big while |G|² is unresolved or B_big is below the estimate.

        Per example, the variance of the |G|² estimate falls as B_big grows
        toward B_simple (its 1/B² term dominates below it), so rounds at a
        batch far under B_simple waste examples (DESIGN §2).
        """
        if self._rounds_at_size < self.min_rounds:
            return
        if s.g2_resolved and (s.b_simple is None or self.b_big >= s.b_simple):
            return
        if self.b_big * 2 > self.max_big:
            return
        if self.method == "per-example":
            self.b_big *= 2
        else:
            self.k *= 2
            self.b_big = self.b_small * self.k
        self._rounds_at_size = 0

    def run(self, deadline: Deadline) -> NoiseEstimate:
        """Rounds until converged or the deadline; raise BudgetError if no round fit."""
        start = time.perf_counter()
        stopped = "budget"
        all_zero = True
        try:
            if self.method == "per-example":
                from bsfind.noise.per_example import PerExampleGradNorms, PerExampleUnsupported

                try:
                    with PerExampleGradNorms(self.job.model) as norms:
                        stopped, all_zero = self._loop(
                            deadline, lambda: self._round_per_example(norms))
                except PerExampleUnsupported as exc:
                    # Found only at run time (a module called twice, ...): start
                    # over with micro-batches, whose estimate is always exact.
                    self._switch_to_microbatch(f"per-example norms failed at run time "
                                               f"({exc.message})")
                    stopped, all_zero = self._loop(deadline, self._round_microbatch)
            else:
                stopped, all_zero = self._loop(deadline, self._round_microbatch)
        except KeyboardInterrupt:
            est = self.estimate(time.perf_counter() - start, "interrupted") if self.rounds else None
            raise Interrupted("interrupted during the noise probe", partial=est) from None
        finally:
            self.job.model.zero_grad(set_to_none=True)
        if not self.rounds:
            raise BudgetError(
                "probe.max_seconds ran out before one probe round finished",
                hint="raise probe.max_seconds or use a smaller probe.microbatch_size",
            )
        if all_zero:
            raise UserCodeError(
                f"gradients of {self.job.model_name!r} are all zero at training step {self.step}",
                hint="check that the loss depends on the model's trainable parameters",
            )
        return self.estimate(time.perf_counter() - start, stopped)

    def _loop(self, deadline: Deadline, one_round: Callable[[], Round]) -> tuple[str, bool]:
        all_zero = True
        while True:
            if deadline.passed():
                return "budget", all_zero
            try:
                r = one_round()
            except Exception as exc:
                if not is_oom(exc):
                    raise
                oom = True
            else:
                oom = False
            if oom:  # outside the except block, so the failed round's tensors are freed
                self._shrink_after_oom()
                continue
            s, all_zero = self._record(r, all_zero)
            if all_zero and len(self.rounds) >= 2:
                return "converged", all_zero
            if len(self.rounds) >= self.min_rounds and s.rel_half_width <= self.target:
                return "converged", all_zero
            self._grow(s)

    def _record(self, r: Round, all_zero: bool) -> tuple[Summary, bool]:
        """Keep a finished round, report progress; returns (summary, still all zero)."""
        all_zero = all_zero and r.sq_big == 0.0 and r.sq_small == 0.0
        self.rounds.append(r)
        self._rounds_at_size += 1
        s = summarize(self.rounds)
        if self.progress is not None:
            rel = s.rel_half_width
            frac = 0.0 if not math.isfinite(rel) else min(1.0, self.target / rel)
            shown = f"B_simple≈{s.b_simple:.0f} ±{rel:.0%}" if s.b_simple else "|G|² unresolved"
            self.progress("noise", frac,
                          f"step {self.step}: {shown}, B_big={self.b_big}{self._where()}")
        return s, all_zero

    def _where(self) -> str:
        """Suffix of the progress message (the distributed probe names its ranks)."""
        return ""

    def estimate(self, seconds: float, stopped: str) -> NoiseEstimate:
        s = summarize(self.rounds)
        return NoiseEstimate(
            b_simple=s.b_simple,
            ci95=s.ci95,
            grad_norm_sq=s.grad_norm_sq,
            grad_norm_sq_ci95=s.grad_norm_sq_ci95,
            trace_sigma=s.trace_sigma,
            trace_sigma_ci95=s.trace_sigma_ci95,
            method=self.method,
            method_reason=self.reason,
            b_small=self.b_small,
            b_big=self.b_big,
            examples=s.examples,
            rounds=s.rounds,
            seconds=seconds,
            stopped=stopped,
            step=self.step,
        )


def train_steps(
    job: Workload,
    optimizer: torch.optim.Optimizer,
    steps: int,
    batch_size: int,
    gen: torch.Generator,
    start_step: int = 0,
    progress: ProgressFn | None = None,
    deadline: Deadline | None = None,
) -> int:
    """Train ``steps`` optimizer steps at the baseline batch; return the step reached.

    Batches are drawn from a fresh permutation each epoch (ordinary training).
    Stops early (returning the step reached) when the deadline passes.
    """
    n = len(job)
    b = min(batch_size, n)
    order = torch.randperm(n, generator=gen)
    pos = 0
    step = start_step
    for i in range(steps):
        if deadline is not None and deadline.passed():
            break
        if pos + b > n:
            order, pos = torch.randperm(n, generator=gen), 0
        idx = order[pos : pos + b]
        pos += b
        optimizer.zero_grad(set_to_none=True)
        loss = job.loss(idx)
        step = start_step + i + 1
        _check_loss(loss, f"at warm-up training step {step}")
        loss.backward()
        _check_grad(_grad_sq(job.trainable()), f"at warm-up training step {step}")
        optimizer.step()
        if progress is not None and (i % 10 == 0 or i == steps - 1):
            progress("train", (i + 1) / steps, f"training step {step} (loss {loss.item():.3f})")
    optimizer.zero_grad(set_to_none=True)
    return step
