"""The noise probe: rounds of two-batch measurements at fixed weights.

A round draws examples uniformly *with replacement* (so the estimators of
``estimators.py`` are unbiased for the dataset's population covariance; a
permutation would bias |G_B|² by the finite-population factor (n−B)/(n−1)),
and measures

- per-example form (b = 1): one forward/backward of B examples with hooks
  that give every example's gradient norm (``per_example/``); |G_B|² is the
  norm of the ordinary batch gradient. Lowest variance (Gray et al. 2024).
- micro-batch form: k micro-batches of b examples, one backward each; |G_b|²
  is the mean of their norms, |G_B|² (B = k·b) the norm of their mean. Works
  for any model, BatchNorm included.

Rounds repeat until the 95% interval of B_simple is within
``target_rel_error`` of the estimate or the deadline passes. While |G|² is
unresolved (its interval includes 0) B_big doubles: more rounds at a batch
far below B_simple barely help (DESIGN §2). No optimizer step happens here.

Where the rounds run is the probe's one extension point, :class:`ProbeComm`:
the default runs them in this process; the data-parallel runner
(``distributed.py``) supplies one whose ranks each draw their own examples,
reduce the norms across ranks and follow rank 0's decisions. The rounds
themselves are written once, for any number of ranks.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from bsfind import wording
from bsfind.budget import Deadline, ProgressFn, now
from bsfind.errors import BudgetError, HardwareError, Interrupted, UserCodeError
from bsfind.hardware.memory import clear_cache, is_oom
from bsfind.noise.estimators import Round, Summary, summarize
from bsfind.results import NoiseEstimate
from bsfind.training import ReplacementSampler, check_grad, check_loss, check_reached
from bsfind.workload import Workload

# Rounds before the interval is trusted for stopping or growing: the t-based
# variance of a handful of rounds is itself too noisy to stop on.
MIN_ROUNDS = 10
# Micro-batches per round in the micro-batch form (B_big = k·b to start).
DEFAULT_MICROBATCHES = 8
# Largest B_big as a multiple of the dataset size (sampling is with replacement,
# so B_big may exceed the dataset; beyond this the recommendation is clipped anyway).
MAX_BIG_OVER_DATASET = 4

# Decisions after each round (made on rank 0 under torchrun, then shared).
_CONTINUE, _CONVERGED, _BUDGET = 0, 1, 2
_STOPPED = {_CONTINUE: "", _CONVERGED: "converged", _BUDGET: "budget"}


@dataclass(frozen=True)
class ProbeOptions:
    """How to probe (the spec's ``probe`` section and baseline batch, as plain values).

    Attributes:
        method: "auto", "per-example" or "microbatch".
        batch_size: the baseline batch: the first B_big (per-example form) or
            the source of the default micro-batch size (baseline/8).
        microbatch_size: b of the micro-batch form (None: batch_size/8).
        target_rel_error: stop once the 95% CI half-width is within this
            fraction of B_simple.
        min_rounds: rounds before the interval is trusted.
        norm_batch: the per-device BatchNorm batch the model trains with, when it
            has BatchNorm in training mode: every micro-batch is then one such batch,
            so the normalisation statistics are those of training (DESIGN §8);
            ``microbatch_size`` does not apply.
        microbatches: micro-batches per round to start with (the big batch's size in
            micro-batches; it doubles while |G|² is unresolved).
    """

    method: str = "auto"
    batch_size: int = 64
    microbatch_size: int | None = None
    target_rel_error: float = 0.1
    min_rounds: int = MIN_ROUNDS
    norm_batch: int | None = None
    microbatches: int = DEFAULT_MICROBATCHES


class ProbeComm:
    """Where a probe's rounds run: this process alone (the default).

    The data-parallel runner subclasses it; each method is one point where
    ranks differ from a single process. ``world`` ranks each take a share of
    every round; sums are over ranks.
    """

    world: int = 1
    rank: int = 0

    def sampling_seed(self, seed: int) -> int:
        """The seed of this rank's sampling stream."""
        return seed

    def agree(self, local: Callable[[], float],
              unsupported: type[Exception] | None = None) -> float:
        """Run this rank's part of a round and return ``local()`` summed over ranks.

        A failure on any rank must raise on every rank (an out-of-memory as an
        exception :meth:`is_round_oom` accepts; ``unsupported`` as itself).
        """
        return local()

    def sq_norm_of_mean(self, tensors: Sequence[torch.Tensor | None], count: int) -> float:
        """|mean over ranks of Σ tensors / count|²: the big batch's squared gradient norm."""
        total = torch.zeros((), dtype=torch.float64,
                            device=next(t for t in tensors if t is not None).device)
        for t in tensors:
            if t is not None:
                total += (t.detach().double() / count).pow(2).sum()
        return float(total)

    def decide(self, fn: Callable[[], list[float]], width: int) -> list[float]:
        """``fn()`` as decided on rank 0, seen by every rank."""
        return fn()

    def is_round_oom(self, exc: BaseException) -> bool:
        """Whether ``exc`` (raised by a round) means "out of memory on some rank"."""
        return is_oom(exc)

    def describe(self, probe: NoiseProbe) -> tuple[str, str]:
        """(method, method_reason) as the report shows them."""
        return probe.method, probe.reason


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


def check_at_another_batch(job: Workload, norms: object, idx: torch.Tensor) -> None:
    """One per-example pass of ``norms`` on the examples ``idx`` (a batch size other than
    the one the hooks ran at: :func:`~bsfind.noise.per_example.checking_batch`), raising
    only the hooks' refusal (PerExampleUnsupported). A model's error at this batch alone,
    a loss without a gradient, or one that reaches no trainable parameter is left to the
    probe's rounds, which meet it with their own examples and say where; a loss that is
    not finite still runs backward, so that the hooks see a whole pass."""
    job.model.zero_grad(set_to_none=True)
    try:
        loss = job.loss(idx)
    except UserCodeError:
        return
    if not loss.requires_grad:
        return
    loss.backward()
    if any(p.grad is not None for p in job.trainable()):
        norms.sq_norms()  # type: ignore[attr-defined]


class NoiseProbe:
    """Measures B_simple of a workload's model at its current weights.

    Sizes are global: ``b_big`` is the big batch over all ranks, and in the
    micro-batch form ``k`` counts the micro-batches of all ranks (a multiple
    of the world size), so the growth rule is the same for any ``comm``.
    """

    def __init__(
        self,
        job: Workload,
        options: ProbeOptions | None = None,
        *,
        seed: int = 0,
        step: int = 0,
        progress: ProgressFn | None = None,
        comm: ProbeComm | None = None,
    ) -> None:
        opts = options or ProbeOptions()
        self.job = job
        self.comm = comm or ProbeComm()
        self.method, self.reason = choose_method(job.model, opts.method)
        self.target = opts.target_rel_error
        self.min_rounds = opts.min_rounds
        self.step = step
        self.progress = progress
        self.n = len(job)
        self._check_seed = self.comm.sampling_seed(seed)  # also the check's, own generator
        self.sampler = ReplacementSampler(
            self.n, torch.Generator().manual_seed(self._check_seed))
        self.params = job.trainable()
        self.max_big = max(2, MAX_BIG_OVER_DATASET * self.n)
        self.k = 1
        self.microbatches = opts.microbatches
        self.norm_batch = opts.norm_batch if self.method == "microbatch" else None
        if self.method == "per-example":
            self.b_small = 1
            self.b_big = max(2, min(opts.batch_size, self.max_big))
        elif self.norm_batch:
            self.b_small = self.norm_batch
            as_in = ("as in training" if opts.batch_size >= self.norm_batch else
                     f"the fewest BatchNorm normalises (it trains with {opts.batch_size})")
            self.reason += (f"; BatchNorm in training mode: each micro-batch is one BatchNorm "
                            f"batch of {self.norm_batch}, {as_in}, so the noise scale "
                            "is that of this BatchNorm batch")
        else:
            self.b_small = opts.microbatch_size or max(2, opts.batch_size // DEFAULT_MICROBATCHES)
        self._fit_to_ranks()
        self.rounds: list[Round] = []
        self._rounds_at_size = 0

    def _fit_to_ranks(self) -> None:
        """Whole examples (per-example) or micro-batches (micro-batch form) per rank."""
        n = self.comm.world
        if self.method == "per-example":
            self.b_big = n * max(1, self.b_big // n)
        else:
            self.k = n * max(1, math.ceil(self.microbatches / n))
            self.b_big = self.b_small * self.k

    def _shrink_after_oom(self) -> None:
        """Halve the batch that ran out of memory and never grow past it again."""
        self.job.model.zero_grad(set_to_none=True)
        clear_cache(self.job.device)
        n = self.comm.world
        if self.method == "per-example":
            smaller = n * max(1, (self.b_big // 2) // n)
            if self.b_big <= 2 or smaller >= self.b_big:
                per_rank = f"{self.b_big // n} example(s) per rank" if n > 1 else (
                    f"batch size {self.b_big}")
                raise HardwareError(
                    f"out of memory in the noise probe even at {per_rank} (per-example form)",
                    hint="use a device with more memory, a smaller model, or "
                    "hardware.precision: bf16",
                )
            self.b_big = smaller
        elif self.norm_batch:
            raise HardwareError(
                f"out of memory in the noise probe at one BatchNorm batch of {self.b_small} "
                "examples, the batch the model trains with on each device",
                hint="use a device with more memory or hardware.precision: bf16 (a smaller "
                "BatchNorm batch would measure another noise scale)",
            )
        elif self.b_small > 1:
            self.b_small //= 2
            self.b_big = self.b_small * self.k
        else:
            raise HardwareError(
                f"out of memory in the noise probe even at batch size {self.b_big} "
                "(microbatch form)",
                hint="use a device with more memory, a smaller model, or "
                "hardware.precision: bf16",
            )
        self.max_big = self.b_big
        self._rounds_at_size = 0

    def _switch_to_microbatch(self, reason: str) -> None:
        self.method, self.reason = "microbatch", reason
        self.b_small = max(2, self.b_big // DEFAULT_MICROBATCHES)
        self._fit_to_ranks()
        self.rounds.clear()
        self._rounds_at_size = 0

    # -- one round -------------------------------------------------------------------
    def _where(self) -> str:
        return f"at training step {self.step} (probe round {len(self.rounds) + 1})"

    def _round_per_example(self, norms: object) -> Round:
        from bsfind.noise.per_example import PerExampleUnsupported

        n = self.comm.world
        b = self.b_big // n
        where = self._where()

        def local() -> float:
            idx = self.sampler.draw(b)
            self.job.model.zero_grad(set_to_none=True)
            loss = self.job.loss(idx)
            check_loss(loss, where)
            loss.backward()
            check_reached(self.params, self.job.model_name, where)
            # Hooks give each example's contribution to .grad: (1/b)·∇L_i for a mean loss.
            per_ex = norms.sq_norms().double()  # type: ignore[attr-defined]
            return float(per_ex.sum()) * float(b * b)

        sq_sum = self.comm.agree(local, PerExampleUnsupported)
        sq_big = self.comm.sq_norm_of_mean([p.grad for p in self.params], 1)
        sq_small = sq_sum / (n * b)
        check_grad(sq_small + sq_big, where)
        return Round(1, sq_small, n * b, sq_big, n * b)

    def _microbatches(self, idx: torch.Tensor, total: list[torch.Tensor], where: str) -> float:
        """One backward per row of ``idx``: add each gradient to ``total``, return Σ|g_j|²."""
        from bsfind.training import grad_sq

        sq_sum = 0.0
        for j in range(idx.shape[0]):
            self.job.model.zero_grad(set_to_none=True)
            loss = self.job.loss(idx[j])
            check_loss(loss, where)
            loss.backward()
            sq_sum += grad_sq(self.params)
            for acc, p in zip(total, self.params, strict=True):
                if p.grad is not None:
                    acc += p.grad.detach().double()
        return sq_sum

    def _round_microbatch(self) -> Round:
        n = self.comm.world
        b, k = self.b_small, self.k // n  # k micro-batches on this rank
        where = self._where()
        total = [torch.zeros_like(p, dtype=torch.float64) for p in self.params]

        def local() -> float:
            return self._microbatches(self.sampler.draw(b * k).view(k, b), total, where)

        sq_sum = self.comm.agree(local)
        sq_big = self.comm.sq_norm_of_mean(total, k)
        sq_small = sq_sum / (n * k)
        check_grad(sq_small + sq_big, where)
        return Round(b, sq_small, n * k * b, sq_big, n * k * b)

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
        start = now()
        try:
            stopped, all_zero = self._run_rounds(deadline)
        except Interrupted:  # an inner one: its partial result stands
            raise
        except KeyboardInterrupt:
            est = self.estimate(now() - start, "interrupted") if self.rounds else None
            raise Interrupted("interrupted during the noise probe", partial=est) from None
        finally:
            self.job.model.zero_grad(set_to_none=True)
        if not self.rounds:
            raise BudgetError(
                "probe.max_seconds ran out before one probe round finished",
                hint="raise probe.max_seconds" + (" or use a smaller probe.microbatch_size"
                                                  if self.method == "microbatch" else ""),
            )
        if all_zero:
            raise UserCodeError(
                f"gradients of {self.job.model_name!r} are all zero at training step {self.step}",
                hint="check that the loss depends on the model's trainable parameters",
            )
        return self.estimate(now() - start, stopped)

    def _run_rounds(self, deadline: Deadline) -> tuple[str, bool]:
        if self.method != "per-example":
            return self._loop(deadline, self._round_microbatch)
        from bsfind.noise.per_example import PerExampleGradNorms, PerExampleUnsupported

        try:
            with PerExampleGradNorms(self.job.model) as norms:
                self._check_at_another_batch(norms)
                return self._loop(deadline, lambda: self._round_per_example(norms))
        except PerExampleUnsupported as exc:
            # Found only at run time (a module called twice, ...): start over
            # with micro-batches, whose estimate is always exact.
            self._switch_to_microbatch(f"{wording.PER_EXAMPLE_FAILED} ({exc.message})")
            return self._loop(deadline, self._round_microbatch)

    def _check_at_another_batch(self, norms: object) -> None:
        """One per-example pass at a batch other than the rounds' first (the hooks refuse a
        module whose dim 0 is not the batch only when the sizes differ:
        :func:`checking_batch`), on examples of a generator of its own, so that the
        rounds' draws stay theirs. Only a refusal of the hooks counts
        (:func:`check_at_another_batch`; the first examples of a dataset can be padding
        alone), and an out-of-memory is left to the rounds, which shrink the batch."""
        from bsfind.noise.per_example import PerExampleUnsupported, checking_batch

        gen = torch.Generator().manual_seed(self._check_seed)
        idx = torch.randint(self.n, (checking_batch(self.b_big // self.comm.world),),
                            generator=gen)

        def local() -> float:
            check_at_another_batch(self.job, norms, idx)
            return 0.0

        try:
            self.comm.agree(local, PerExampleUnsupported)
        except Exception as exc:
            if not self.comm.is_round_oom(exc):
                raise
        finally:
            self.job.model.zero_grad(set_to_none=True)

    def _loop(self, deadline: Deadline, one_round: Callable[[], Round]) -> tuple[str, bool]:
        all_zero = True
        stopped = self._decide(deadline, None, all_zero)
        while not stopped:
            try:
                r: Round | None = one_round()
            except Exception as exc:
                if not self.comm.is_round_oom(exc):
                    raise
                r = None
            if r is None:  # outside the except block, so the failed round's tensors are freed
                self._shrink_after_oom()
                stopped = self._decide(deadline, None, all_zero)
                continue
            s, all_zero = self._record(r, all_zero)
            stopped = self._decide(deadline, s, all_zero)
        return stopped, all_zero

    def _decide(self, deadline: Deadline, s: Summary | None, all_zero: bool) -> str:
        """Stop, grow or go on after a round (or before the first): rank 0 decides."""

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
            return [code, self.b_big, self.k, self._rounds_at_size]

        code, b_big, k, at_size = self.comm.decide(on_rank0, 4)
        self.b_big, self.k, self._rounds_at_size = int(b_big), int(k), int(at_size)
        return _STOPPED[int(code)]

    def _record(self, r: Round, all_zero: bool) -> tuple[Summary, bool]:
        """Keep a finished round, report progress; returns (summary, still all zero)."""
        all_zero = all_zero and r.sq_big == 0.0 and r.sq_small == 0.0
        self.rounds.append(r)
        self._rounds_at_size += 1
        s = summarize(self.rounds)
        if self.progress is not None:
            rel = s.rel_half_width
            frac = 0.0 if not math.isfinite(rel) else min(1.0, self.target / rel)
            shown = (f"B_simple≈{wording.num(s.b_simple)} ±{rel:.0%}" if s.b_simple
                     else "|G|² unresolved")
            ranks = f" over {self.comm.world} ranks" if self.comm.world > 1 else ""
            self.progress("noise", frac, f"step {self.step}: {shown}, B_big={self.b_big}{ranks}")
        return s, all_zero

    def estimate(self, seconds: float, stopped: str) -> NoiseEstimate:
        """The rounds so far as a :class:`NoiseEstimate`."""
        s = summarize(self.rounds)
        method, reason = self.comm.describe(self)
        return NoiseEstimate(
            b_simple=s.b_simple,
            ci95=s.ci95,
            grad_norm_sq=s.grad_norm_sq,
            grad_norm_sq_ci95=s.grad_norm_sq_ci95,
            trace_sigma=s.trace_sigma,
            trace_sigma_ci95=s.trace_sigma_ci95,
            method=method,
            method_reason=reason,
            b_small=self.b_small,
            b_big=self.b_big,
            examples=s.examples,
            rounds=s.rounds,
            seconds=seconds,
            stopped=stopped,
            step=self.step,
        )

