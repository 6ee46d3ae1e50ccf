"""The critical batch measured directly: short branched runs from one point (DESIGN §11).

    bsfind branch configs/digits-mlp.yaml        # the ladder's table
    .venv/bin/python -m pytest tests/test_branches.py -q

Merrill et al. 2025 (arXiv:2505.23971): from one point of training, weights and
optimizer state, run short branches at k·B0 for k = 1, 2, 4, ... over the same number
of examples Δ, with the learning rate the optimizer's scaling rule gives, and call the
local critical batch the largest k·B0 whose smoothed loss is still within a tolerance
of the smaller batches'. Here:

- **The rule.** Rung B passes when its smoothed loss after Δ examples is no higher
  than the next smaller rung's (B/2) after Δ/TOLERANCE: doubling the batch cost at
  most TOLERANCE times the examples for the same loss. The ladder stops at the first
  rung that fails; the local critical batch is the last rung that passed. When 2·B0
  already fails, or is larger than the dataset, the ladder goes below B0 by halves
  (B0/2, B0/4, ... B0/MIN_FRACTION, never below 2) until a doubling keeps up: a
  baseline batch above the critical batch is measured, not only bounded. A rung below
  B0 that raises ends that descent (noted). Every rung that ran is reported. Why
  TOLERANCE = √2: under S(B) = S_min(1 + B_crit/B) (McCandlish et al. 2018, eq. 2.11)
  a run at batch B needs E_min(1 + B/B_crit) examples, so B needs
  (1 + B/B_crit)/(1 + B/(2·B_crit)) times the examples of B/2, which is √2 exactly at
  B = √2·B_crit. The last rung that passes is then within √2 of B_crit
  (:func:`bracket`), and the tolerance is stated in examples, so it is the same for
  every loss scale.
- **Δ** = BRANCH_STEPS baseline steps' worth of examples. The ladder stops at
  MAX_FACTOR·B0, whose branches still take BRANCH_STEPS/MAX_FACTOR = 4 steps.
- **Smoothing.** A branch's loss after e examples is the mean of its evaluations over
  the last SMOOTHING of them, [(1 − SMOOTHING)·e, e], averaged over REPEATS data orders.
  At the learning rates the shipped problems are tuned to, the training loss of one
  step swings ±30-50% (docs/validation.md); a single evaluation, or a single data
  order, decided rungs by chance.
- **Loss** on the fixed evaluation subset of the training data that the points along
  training report their loss on (``Seeds.evaluation_subset``, 512 examples). S(B)
  models the training loss, and so does the fitted B_crit the branches are checked
  against; a held-out split would measure generalisation, which on the memorising
  stretches of the shipped digits problems stands still or rises while the training
  loss falls.
- **Isolation.** Every branch starts from the same weights and optimizer state (copies
  in host memory taken before the first branch, restored before each and at the end)
  and, per repeat, the same data order (``Seeds.branch``): the batches of 2B are the
  unions of two consecutive batches of B, so rungs differ in batch size and learning
  rate only.
- **Limits.** The ladder also stops before a batch larger than the dataset and when the
  time budget runs out (a rung cut short is dropped). A rung that runs out of memory
  runs again, and so do the rungs above it, accumulating micro-batches of the largest
  rung that ran, as the recommendation would; the ladder stops (the previous rung
  stands) only when that runs out of memory too. Ctrl-C raises ``Interrupted`` carrying what was
  measured, with the weights and optimizer state restored.

Defaults and their cost (docs/validation.md): REPEATS × rungs × Δ training examples,
at most 3 × 5 × 64·B0 = 960·B0 (going below B0: at most 3 more rungs), plus EVALUATIONS
forward passes over the evaluation subset per branch. On the shipped problems (one CPU
thread, a shared machine): 37-49k examples and 0.6-0.9 s per point on digits-mlp,
18-25k and 2.6-4.6 s on digits-cnn, 18-25k and 15-32 s on text-transformer; 0.7-4.9%
of the examples of a full sweep, and two seeds' values within one doubling on 13 of 14
targets.
"""

from __future__ import annotations

import bisect
import copy
import itertools
import math
import statistics
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch

from bsfind import wording
from bsfind.advisor import Family, measured_lr, scaled_lr
from bsfind.budget import Deadline, ProgressFn, now
from bsfind.errors import Interrupted
from bsfind.results import (
    BranchResult,
    BranchRung,
    Interval,
    LrSearch,
    LrTrial,
    RunAverage,
    stalled_orders,
)
from bsfind.seeds import Seeds, global_random
from bsfind.training import (
    EpochSampler,
    evaluate_loss,
    evaluation_subset,
    host_copy,
    host_weights,
    training_step,
)
from bsfind.workload import Workload

# Δ, in baseline steps: every branch trains on BRANCH_STEPS·B0 examples. 64 made two
# probe runs' checkpoints agree within one doubling on 13 of 14 targets of the shipped
# problems (docs/validation.md); 32 left the digits rungs too close to call.
BRANCH_STEPS = 64
# The largest rung is MAX_FACTOR·B0; its branches take BRANCH_STEPS/MAX_FACTOR steps.
MAX_FACTOR = 16
# When 2·B0 already falls behind B0, the ladder goes down by halves to B0/MIN_FRACTION
# until a doubling keeps up. The fitted B_crit of the shipped problems at their first
# targets was 13-15 with B0 = 32 (docs/validation.md), below the baseline; B0/8 branches
# take 8·BRANCH_STEPS steps, which is what the smallest rung costs in time.
MIN_FRACTION = 8
# A doubling passes when it needs at most this factor more examples for the same loss;
# √2 puts the last passing rung within √2 of B_crit under McCandlish eq. 2.11 (above).
TOLERANCE = math.sqrt(2)
# The smoothed loss after e examples: the mean of the evaluations in [(1 - SMOOTHING)·e, e].
SMOOTHING = 0.5
# Data orders per rung, averaged: three kept the late digits rungs from flipping
# between runs (docs/validation.md).
REPEATS = 3
# Evaluations per branch, spread over the examples the rule reads:
# [(1 - SMOOTHING)·Δ/TOLERANCE, Δ].
EVALUATIONS = 12

Curve = Sequence[tuple[int, float]]  # (examples trained, loss on the evaluation subset)


@dataclass(frozen=True)
class BranchOptions:
    """Where the branches start and how their learning rates are set.

    Attributes:
        baseline_batch / lr: B0 and the learning rate lr0 tuned there.
        family / lr_rule / b_n: the advisor's learning-rate rule
            (``advisor.scaled_lr``): the optimizer family, the spec's
            ``optimizer.lr_rule`` and the noise scale B_n it reads (inf: none).
        seed / step / examples_seen: ``probe.seed`` and the point the branches start at.
        checkpoint: ``model.checkpoint``, when the weights started from it (its own step
            is not known: ``step`` then counts from it).
        b_simple / b_noise: the noise scales measured at the same weights (reported
            beside the result).
        lr_measured: (batch, factor) of a learning rate measured at one batch
            (``measure_lr``): each rung's rule rate carries ``advisor.measured_lr``.
            None: the rule's rates.
        branch_steps / max_factor / min_fraction / repeats: the constants above (tests
            shrink them).
    """

    baseline_batch: int
    lr: float
    family: Family
    lr_rule: str = "auto"
    b_n: float = math.inf
    seed: int = 0
    step: int = 0
    examples_seen: int | None = None
    b_simple: float | None = None
    b_noise: float | None = None
    branch_steps: int = BRANCH_STEPS
    max_factor: int = MAX_FACTOR
    min_fraction: int = MIN_FRACTION
    repeats: int = REPEATS
    lr_measured: tuple[int, float] | None = None
    checkpoint: str | None = None

    def __post_init__(self) -> None:
        if (self.baseline_batch < 1 or self.repeats < 1 or self.max_factor < 2
                or self.min_fraction < 1):
            raise ValueError("baseline_batch, repeats, min_fraction >= 1 and max_factor >= 2 "
                             "needed")
        if self.branch_steps % self.max_factor:
            raise ValueError(f"branch_steps ({self.branch_steps}) must be a multiple of "
                             f"max_factor ({self.max_factor})")

    @property
    def delta(self) -> int:
        """Δ: the examples every branch trains on."""
        return self.branch_steps * self.baseline_batch


@dataclass(frozen=True)
class BranchStart:
    """What ``on_branch_start`` sees: the rung and repeat about to train (from restored state)."""

    batch_size: int
    repeat: int
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer


class Verdict(NamedTuple):
    """The rule at one rung: its smoothed loss, the reference it is held to, the outcome."""

    loss: float
    reference: float | None
    passed: bool | None  # None: the first rung, the reference of the second


# --------------------------------------------------------------------------- the rule


def smoothed_loss(curve: Curve, at: float, smoothing: float = SMOOTHING) -> float:
    """The mean of a branch's evaluations in [(1 - smoothing)·at, at] (the last one at or
    before ``at`` when none falls inside); inf when there is none, or one is not finite."""
    inside = [loss for e, loss in curve if (1 - smoothing) * at - 1e-9 <= e <= at + 1e-9]
    if not inside:
        inside = [loss for e, loss in curve if e <= at + 1e-9][-1:]
    if not inside or not all(math.isfinite(v) for v in inside):
        return math.inf
    return statistics.fmean(inside)


def mean_smoothed(curves: Sequence[Curve], at: float, smoothing: float = SMOOTHING) -> float:
    """:func:`smoothed_loss` averaged over the repeats of one rung."""
    return statistics.fmean(smoothed_loss(c, at, smoothing) for c in curves)


def keeps_up(loss: float, reference: float) -> bool:
    """Whether a rung's smoothed loss keeps up with its reference: a diverged rung (inf)
    never does, even beside a diverged reference (inf <= inf passed four diverged rungs
    and kept the ladder climbing, in a trial)."""
    return math.isfinite(loss) and loss <= reference


def verdicts(rungs: Sequence[Sequence[Curve]], delta: float, tolerance: float = TOLERANCE,
             smoothing: float = SMOOTHING, every: bool = False) -> list[Verdict]:
    """The rule along the ladder (rungs in doubling order, each a list of repeats' curves).

    Rung i passes when its smoothed loss after ``delta`` is finite and not above rung
    i-1's after ``delta / tolerance``. Above a diverged rung, a finite one is held to
    nothing (``passed`` None: it is the next rung's reference, as the first rung is); a
    diverged one fails. The list ends at the first rung that fails (``every``: it goes
    on, for the table of every rung that ran).
    """
    out: list[Verdict] = []
    for i, curves in enumerate(rungs):
        loss = mean_smoothed(curves, delta, smoothing)
        if i == 0:
            out.append(Verdict(loss, None, None))
            continue
        reference = mean_smoothed(rungs[i - 1], delta / tolerance, smoothing)
        passed = (keeps_up(loss, reference) if math.isfinite(reference) or
                  not math.isfinite(loss) else None)
        out.append(Verdict(loss, reference, passed))
        if passed is False and not every:
            break
    return out


def crossing(tolerance: float = TOLERANCE) -> float:
    """x* = B/B_crit where a doubling to B needs exactly ``tolerance`` times the examples
    of B/2 under S(B) = S_min(1 + B_crit/B): (1 + x)/(1 + x/2) = tolerance."""
    if not 1.0 < tolerance < 2.0:
        raise ValueError(f"tolerance must be in (1, 2), got {tolerance}")
    return 2.0 * (tolerance - 1.0) / (2.0 - tolerance)


def bracket(batches: Sequence[int], found: Sequence[Verdict], tolerance: float = TOLERANCE
            ) -> tuple[int | None, str, Interval]:
    """The local critical batch, its bound and where B_crit lies by the rule.

    A rung B passes exactly when B_crit >= B/x* (x* = :func:`crossing`, √2 for the
    default tolerance), so the last passing rung B and a failing 2B put B_crit in
    [B/x*, 2B/x*): "bracketed". When the first doubling failed (the ladder's smallest
    batch b), B_crit < 2·b/x*: "at most" b. When no rung failed before the ladder ended,
    B_crit >= B/x*: "at least". The ladder is read from its first finite rung (the ones
    below it diverged).
    """
    x = crossing(tolerance)
    first = next((i for i, v in enumerate(found) if math.isfinite(v.loss)), len(found))
    if len(found) - first < 2:
        return None, "none", Interval(math.nan, math.nan)
    last = max(i for i, v in enumerate(found) if i >= first and v.passed is not False)
    b = batches[last]
    if found[-1].passed is not False:
        return b, "at least", Interval(b / x, math.inf)
    if last == first:
        return b, "at most", Interval(0.0, 2 * b / x)
    return b, "bracketed", Interval(b / x, 2 * b / x)


def ladder(baseline_batch: int, dataset_size: int, max_factor: int = MAX_FACTOR) -> list[int]:
    """k·B0 for k = 1, 2, 4, ... up to ``max_factor`` and the dataset size."""
    out, k = [], 1
    while k <= max_factor and k * baseline_batch <= max(dataset_size, baseline_batch):
        out.append(k * baseline_batch)
        k *= 2
    return out


def below(baseline_batch: int, min_fraction: int = MIN_FRACTION) -> list[int]:
    """B0/2, B0/4, ... down to B0/``min_fraction``, while B0 halves evenly (Δ = k·B0
    examples must divide into whole steps) and the batch stays at least 2 (BatchNorm in
    training mode cannot normalise one example)."""
    out, b = [], baseline_batch
    while b % 2 == 0 and b // 2 >= max(2, baseline_batch / min_fraction):
        b //= 2
        out.append(b)
    return out


def evaluation_steps(steps: int, batch: int, delta: int, count: int = EVALUATIONS) -> list[int]:
    """The steps after which a branch is evaluated: up to ``count``, spread evenly over
    the examples the rule reads, [(1 - SMOOTHING)·Δ/TOLERANCE, Δ]; the last step always."""
    first = max(1, math.ceil((1 - SMOOTHING) * delta / TOLERANCE / batch - 1e-9))
    span = list(range(first, steps + 1))
    if len(span) <= count:
        return span
    pick = {span[round(i * (len(span) - 1) / (count - 1))] for i in range(count)}
    return sorted(pick)


# --------------------------------------------------------------------------- the runs


class _OutOfTime(Exception):
    """The deadline passed inside a rung: the rung is dropped."""


def _cut_short(job: Workload, exc: Exception) -> str:
    """Why a rung (or a learning-rate trial) ended early: "budget" or "out of memory"
    (the gradients and the device cache cleared); any other error is raised again."""
    from bsfind.hardware.memory import clear_cache, is_oom

    if isinstance(exc, _OutOfTime):
        return "budget"
    if not is_oom(exc):
        raise exc
    job.model.zero_grad(set_to_none=True)
    clear_cache(job.device)
    return "out of memory"


def measure(job: Workload, options: BranchOptions, deadline: Deadline, *,
            optimizer: torch.optim.Optimizer | None = None,
            progress: ProgressFn | None = None,
            on_branch_start: Callable[[BranchStart], None] | None = None) -> BranchResult:
    """Run the ladder from the model's current weights and ``optimizer``'s state.

    Args:
        optimizer: the run's optimizer at this point (its state is carried into every
            branch and restored afterwards); None: a fresh one (a checkpoint holds
            weights only), which the result says.
        on_branch_start: called before each branch trains, after the state is restored
            (the tests check that every branch starts from the same state).

    Raises:
        Interrupted: Ctrl-C, carrying the result so far (``stopped="interrupted"``).
    """
    start = now()
    opt = optimizer if optimizer is not None else job.make_optimizer(options.lr)
    saved_model, saved_opt = saved_state(job.model, opt)
    eval_idx = evaluation_subset(len(job), Seeds(options.seed).evaluation_subset)
    batches = ladder(options.baseline_batch, len(job), options.max_factor)
    run = _Ladder(job, options, opt, saved_model, saved_opt, eval_idx, deadline, progress,
                  on_branch_start, len(batches))
    stopped = "top"
    try:
        for batch in batches:
            cut = run.attempt(batch)
            if cut is not None:
                stopped = cut
                break
            if run.verdicts()[-1].passed is False:
                stopped = "failed"
                break
        # below B0 when 2·B0 fell behind, or could not run (larger than the dataset)
        if ((stopped == "failed" and run.batches == batches[:2])
                or (stopped == "top" and len(batches) == 1 and run.batches == batches)):
            cut = run.descend(below(options.baseline_batch, options.min_fraction))
            failed = any(v.passed is False for v in run.verdicts())
            stopped = cut or ("failed" if failed else stopped)
    except Interrupted:  # an inner one: its partial result stands
        raise
    except KeyboardInterrupt:
        raise Interrupted(f"interrupted during the branches at batch {run.current}",
                          partial=run.result("interrupted", now() - start)
                          ) from None
    finally:
        restore(job.model, opt, saved_model, saved_opt)
    return run.result(stopped, now() - start)


def saved_state(model: torch.nn.Module, opt: torch.optim.Optimizer
           ) -> tuple[dict[str, torch.Tensor], dict[str, object]]:
    """Host copies of the weights and the optimizer state (``training.host_copy``): on a
    GPU the weights and an Adam state would take three more copies of the parameters
    there; restoring copies them back."""
    return host_weights(model), host_copy(opt.state_dict())  # type: ignore[return-value]


def restore(model: torch.nn.Module, opt: torch.optim.Optimizer,
            saved_model: dict[str, torch.Tensor], saved_opt: dict[str, object]) -> None:
    """Weights and optimizer state back to the saved ones, gradients cleared. The
    optimizer gets a fresh copy: its steps update their state in place (Adam's step
    count stays on the host), and loading on the host device keeps the tensors given."""
    model.load_state_dict(saved_model)
    opt.load_state_dict(copy.deepcopy(saved_opt))
    model.zero_grad(set_to_none=True)


def run_branch(job: Workload, opt: torch.optim.Optimizer, saved_model: dict[str, torch.Tensor],
               saved_opt: dict[str, object], base_lrs: Sequence[float], *, lr_scale: float,
               batch: int, repeat: int, seed: int, steps: int, at: Sequence[int],
               eval_idx: torch.Tensor, deadline: Deadline,
               on_start: Callable[[BranchStart], None] | None = None,
               scales: Sequence[float] | None = None,
               on_step: Callable[[int], None] | None = None,
               micro: int | None = None, eval_chunk: int | None = None
               ) -> list[tuple[int, float]]:
    """One branch: restore the saved weights and optimizer state, set every parameter
    group's learning rate to its saved value × ``lr_scale``, train ``steps`` steps at
    ``batch`` in the data order ``seed`` (and dropout's masks: every rung alike), and
    evaluate the loss on ``eval_idx`` after each step in ``at``. ``scales``: the learning
    rate's further scale at each step (a cool-down); None: constant. ``on_start`` sees
    the restored state (``repeat`` names the data order); ``on_step`` gets the examples
    of each training step as it is taken.
    ``micro``: at most this many examples per forward and backward (accumulated).
    ``eval_chunk``: the evaluation's examples per forward (default: ``micro`` or
    ``batch``); a ladder evaluates every rung alike, since in training mode a
    BatchNorm model's loss depends on it.

    Returns:
        The (examples trained, loss) evaluations (inf once the branch diverged: its
        later steps are skipped).

    Raises:
        _OutOfTime: the deadline passed (the caller drops the branch).
    """
    restore(job.model, opt, saved_model, saved_opt)
    for group, base in zip(opt.param_groups, base_lrs, strict=True):
        group["lr"] = base * lr_scale
    if on_start is not None:
        on_start(BranchStart(batch, repeat, job.model, opt))
    with global_random(seed, job.device):
        return _branch_steps(job, opt, base_lrs, lr_scale=lr_scale, batch=batch, seed=seed,
                             steps=steps, at=at, eval_idx=eval_idx, deadline=deadline,
                             scales=scales, on_step=on_step, micro=micro,
                             eval_chunk=eval_chunk)


def _branch_steps(job: Workload, opt: torch.optim.Optimizer, base_lrs: Sequence[float], *,
                  lr_scale: float, batch: int, seed: int, steps: int, at: Sequence[int],
                  eval_idx: torch.Tensor, deadline: Deadline, scales: Sequence[float] | None,
                  on_step: Callable[[int], None] | None, micro: int | None,
                  eval_chunk: int | None) -> list[tuple[int, float]]:
    """:func:`run_branch`'s steps, once its state is restored."""
    sampler = EpochSampler(len(job), batch, torch.Generator().manual_seed(seed))
    marks = set(at)
    curve: list[tuple[int, float]] = []
    diverged = False
    for s in range(1, steps + 1):
        if deadline.passed():
            raise _OutOfTime
        if not diverged:
            if scales is not None:
                for group, base in zip(opt.param_groups, base_lrs, strict=True):
                    group["lr"] = base * lr_scale * scales[s - 1]
            loss = training_step(job, opt, sampler.next(), check=False, micro=micro,
                                 where=f"in the branch at batch {batch}, step {s}")
            diverged = not math.isfinite(float(loss))
            if on_step is not None:
                on_step(batch)
        if s in marks:
            # In chunks that fit: the branch's training step did (or B0's, for a ladder).
            value = math.inf if diverged else evaluate_loss(
                job, eval_idx, chunk=eval_chunk or micro or batch)
            if value is None:  # not even one example fits: an out-of-memory error
                raise MemoryError("evaluation out of memory even at one example")
            curve.append((s * batch, value if math.isfinite(value) else math.inf))
    opt.zero_grad(set_to_none=True)
    return curve


class _Ladder:
    """The rungs run so far and how to run the next one."""

    def __init__(self, job: Workload, options: BranchOptions, opt: torch.optim.Optimizer,
                 saved_model: dict[str, torch.Tensor], saved_opt: dict[str, object],
                 eval_idx: torch.Tensor, deadline: Deadline, progress: ProgressFn | None,
                 on_branch_start: Callable[[BranchStart], None] | None, planned: int) -> None:
        self.job, self.options, self.opt = job, options, opt
        self.saved_model, self.saved_opt = saved_model, saved_opt
        self.eval_idx, self.deadline, self.progress = eval_idx, deadline, progress
        self.on_branch_start, self.planned = on_branch_start, planned
        self.base_lrs = [g["lr"] for g in opt.param_groups]
        self.batches: list[int] = []
        self.curves: list[list[list[tuple[int, float]]]] = []
        self.lrs: list[float] = []
        self.micros: list[int | None] = []
        self.seconds: list[float] = []
        self.examples = 0
        self.current = options.baseline_batch
        self.oom_at: int | None = None
        self.micro: int | None = None  # set once a rung ran out of memory
        self.accumulated_from: int | None = None
        self.shown = 0.0  # the progress shown so far
        self.floor: int | None = None  # the smallest batch the descent may reach
        self.below_error: str | None = None  # why the descent stopped (a rung raised)
        self.rule = "none"

    def attempt(self, batch: int) -> str | None:
        """Run the rung at ``batch``; why the ladder ends there, or None. A rung that runs
        out of memory runs again accumulating micro-batches of the largest rung that ran
        (as the recommendation would), and so do the rungs above it."""
        try:
            self.rung(batch)
            return None
        except Exception as exc:  # noqa: BLE001 - _cut_short raises what is not ours
            cut = _cut_short(self.job, exc)
        if (cut == "out of memory" and self.micro is None and self.batches
                and max(self.batches) < batch):
            self.micro = max(self.batches)
            self.accumulated_from = batch
            try:
                self.rung(batch)
                return None
            except Exception as exc:  # noqa: BLE001
                cut = _cut_short(self.job, exc)
        if cut == "out of memory":
            self.oom_at = batch
        return cut

    def descend(self, batches: Sequence[int]) -> str | None:
        """Below B0, after 2·B0 already fell behind: the rungs ``batches`` (B0/2, B0/4,
        ...) until the rung above one keeps up with it. Returns why the descent was cut
        short (the budget, memory), or None."""
        self.floor = batches[-1] if batches else None
        for batch in batches:
            try:
                cut = self.attempt(batch)
            except Exception as exc:  # noqa: BLE001 - the descent is optional: keep the rest
                first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
                self.below_error = (f"batch {batch:,} raised {type(exc).__name__}"
                                    + (f" ({first[:160]})" if first else ""))
                return None
            if cut is not None:
                return cut
            if self.verdicts()[1].passed:
                return None
        return None

    def rung(self, batch: int) -> None:
        """R branches at ``batch`` (kept only when every one finished), in batch order."""
        o = self.options
        self.current = batch
        lr, self.rule = scaled_lr(o.lr, o.baseline_batch, batch, o.b_n, o.family, o.lr_rule)
        if o.lr_measured is not None:
            at, factor = o.lr_measured
            rule_there = scaled_lr(o.lr, o.baseline_batch, at, o.b_n, o.family, o.lr_rule)[0]
            lr = measured_lr(batch, lr, o.lr, o.baseline_batch, at, rule_there, factor)
            self.rule = f"{self.rule}, corrected by the rate measured at {o.lr_measured[0]}"
        micro = self.micro if self.micro is not None and self.micro < batch else None
        began = now()
        curves = [self._branch(batch, lr, r, micro) for r in range(o.repeats)]
        i = bisect.bisect(self.batches, batch)
        self.batches.insert(i, batch)
        self.curves.insert(i, curves)
        self.lrs.insert(i, lr)
        self.micros.insert(i, micro)
        self.seconds.insert(i, now() - began)

    def _branch(self, batch: int, lr: float, repeat: int, micro: int | None
                ) -> list[tuple[int, float]]:
        o = self.options
        curve = run_branch(
            self.job, self.opt, self.saved_model, self.saved_opt, self.base_lrs,
            lr_scale=lr / o.lr, batch=batch, repeat=repeat,
            seed=Seeds(o.seed).branch(o.step, repeat), steps=o.delta // batch,
            at=evaluation_steps(o.delta // batch, batch, o.delta), eval_idx=self.eval_idx,
            deadline=self.deadline, on_start=self.on_branch_start, on_step=self._took,
            micro=micro, eval_chunk=o.baseline_batch)
        if self.progress is not None:
            done = (len(self.batches) + (repeat + 1) / o.repeats) / max(1, self.planned)
            self.shown = max(self.shown, min(1.0, done))  # a rung run again: no step back
            self.progress("branch", self.shown,
                          f"batch {batch:,}: data order {repeat + 1} of {o.repeats}")
        return curve

    def _took(self, examples: int) -> None:
        self.examples += examples

    def verdicts(self) -> list[Verdict]:
        return verdicts(self.curves, self.options.delta)

    def disputed(self, found: Sequence[Verdict]) -> list[int]:
        """The rungs that decided the result (every one compared, up to the first that
        fell behind: had one of them gone the other way, the ladder would have ended
        elsewhere) on which the data orders disagree: paired by order, some kept up and
        some did not. The verdict there rests on the mean of orders that point both ways."""
        o = self.options
        out = []
        for i in range(1, len(found)):
            if len(self.curves[i]) < 2 or found[i].passed is None:
                continue
            kept = [keeps_up(smoothed_loss(c, o.delta), smoothed_loss(p, o.delta / TOLERANCE))
                    for c, p in zip(self.curves[i], self.curves[i - 1], strict=True)]
            if any(kept) and not all(kept):
                out.append(self.batches[i])
        return out

    def result(self, stopped: str, seconds: float) -> BranchResult:
        o = self.options
        found = self.verdicts()
        critical, bound, interval = bracket(self.batches, found)
        # every rung that ran, also those above the first that fell behind (a descent's)
        rungs = []
        for i, v in enumerate(verdicts(self.curves, o.delta, every=True)):
            reps = self.curves[i]
            mean_curve = tuple((e, statistics.fmean(c[j][1] for c in reps))
                               for j, (e, _) in enumerate(reps[0]))
            rungs.append(BranchRung(
                batch_size=self.batches[i], learning_rate=self.lrs[i],
                steps=o.delta // self.batches[i], repeats=len(reps), loss=v.loss,
                reference=v.reference, passed=v.passed,
                losses=tuple(smoothed_loss(c, o.delta) for c in reps), curve=mean_curve,
                seconds=self.seconds[i], micro_batch=self.micros[i]))
        result = BranchResult(
            step=o.step, examples_seen=o.examples_seen, critical_batch=critical, bound=bound,
            interval=interval, baseline_batch=o.baseline_batch, delta_examples=o.delta,
            tolerance=TOLERANCE, smoothing=SMOOTHING, repeats=o.repeats, lr_rule=self.rule,
            lr_noise_scale=o.b_n if math.isfinite(o.b_n) else None,
            optimizer_state="carried" if self.saved_opt.get("state") else "fresh",
            rungs=tuple(rungs), b_simple=o.b_simple, b_noise=o.b_noise,
            examples=self.examples, seconds=seconds, stopped=stopped,
            checkpoint=o.checkpoint,
        )
        return wording.describe_branches(
            result, oom_at=self.oom_at, accumulated_from=self.accumulated_from,
            stopped_at=self.current if stopped in ("budget", "interrupted") else None,
            floor=self.floor, below_error=self.below_error, disputed=self.disputed(found))


def calibrated(result: BranchResult, b_n: float, b_n_ci: Interval
               ) -> tuple[float, Interval] | None:
    """The noise scale the advisor uses once branches ran, √(B_n · local critical batch),
    and its interval; None when the branches gave no local critical batch.

    Why the geometric mean: on the shipped problems (docs/validation.md) the branches
    were repeatable but biased against the critical batch fitted from full sweeps (high
    early in training, where they see the local B_crit and the fit averages from
    initialisation; low late, under the advisor's learning-rate rule), and the noise
    scale at one checkpoint was unbiased on the median but scattered 2-24x. Within 2x of
    the fitted B_crit: the geometric mean 20 of 28 points, the noise scale alone 19, the
    branches alone 13, B_n scaled by the whole measured ratio 10; worst misses 3.9x,
    7.8x, 5.1x and 8.2x. A one-sided bound first meets B_n: "at most" the ladder's
    smallest batch takes B_n when it is below it, "at least" the ladder's top takes B_n
    when it is above (then the result is B_n). An unresolved B_n (inf) leaves the branches' value.
    """
    b = result.critical_batch
    if b is None:
        return None
    measured = float(b)
    if result.bound == "at most":
        measured = min(b_n, measured)
    elif result.bound == "at least":
        measured = max(b_n, measured)
    if not math.isfinite(b_n):
        return measured, result.interval
    value = math.sqrt(b_n * measured)
    low = math.sqrt(max(b_n_ci.low, 0.0) * max(result.interval.low, 0.0))
    high = math.sqrt(b_n_ci.high * result.interval.high)
    return value, Interval(min(low, value), max(high, value))


def ladder_seconds(r: BranchResult, planned: Sequence[int],
                   rung_seconds: Mapping[int, float]) -> float:
    """About how long ``r``'s ladder takes to its end: its own seconds, unless the time
    budget cut it short; then its finished rungs' seconds plus, for each batch of
    ``planned`` (the ladder's rungs from B0 up, :func:`ladder`) it did not finish,
    ``rung_seconds`` there (the longest any ladder took at that batch), else its own
    largest finished rung's; with no rung finished, every planned rung's examples at the rate of
    the examples it trained (the first rung's, B0: the slowest per example, so the time
    is not underestimated; a trial: its seconds per planned rung read 165 ms for a
    ladder of 10-15 s, and advised a budget far too small), or, having trained none,
    its seconds for each planned rung (in that time not one finished)."""
    if r.stopped != "budget":
        return r.seconds
    done = {g.batch_size: g.seconds for g in r.rungs}
    if not done:
        examples = r.repeats * r.delta_examples * len(planned)
        return (r.seconds * examples / r.examples if r.examples > 0
                else r.seconds * len(planned))
    # (a larger batch trains the same Δ in fewer steps: its last finished rung's time,
    # not its slowest (the first, B0's), bounds the rungs above; a trial's estimate
    # was 14.7 s for ladders that took 8.1-8.8)
    top = done[max(done)]
    return sum(done.values()) + sum(rung_seconds.get(b, top) for b in planned
                                    if b not in done)


def run_average(reads: Sequence[tuple[float, float]], baseline_batch: int) -> float | None:
    """The critical batch of a run at B0 from its first read to its last: what S(B) fitted
    to whole runs between those points would give, from local critical batches measured
    along one run (``reads``: (step, local critical batch), in step order).

    Under S(B) = S_min(1 + B_crit/B), a stretch j of the run (steps s_j to s_j+1, the
    loss from L_j to L_j+1) with a local critical batch b_j takes S_min,j(1 + b_j/B)
    steps at any batch B. A run over several stretches then takes
    ΣS_min,j + (Σ b_j·S_min,j)/B: the same form, with B_crit = Σ b_j·S_min,j / ΣS_min,j,
    the local critical batches weighted by the minimum steps each stretch needs
    (McCandlish et al. 2018, E_min/S_min). The run at B0 took Δs_j = s_j+1 - s_j steps
    there, so S_min,j = Δs_j/(1 + b_j/B0). A stretch's b_j is the geometric mean of the
    reads at its ends (the critical batch grows along training). None with fewer than two
    reads or no steps between them.
    """
    return stretch_average([(s0, s1, math.sqrt(b0 * b1))
                            for (s0, b0), (s1, b1) in itertools.pairwise(sorted(reads))
                            if s1 > s0 and b0 > 0 and b1 > 0], baseline_batch)


def stretch_average(stretches: Sequence[tuple[float, float, float]], baseline_batch: int
                    ) -> float | None:
    """Σ b_j·S_min,j / ΣS_min,j over stretches (start step, end step, local critical
    batch b_j) of a run at B0, with S_min,j = (end - start)/(1 + b_j/B0): the core of
    :func:`run_average`, for stretches each measured as a whole. None without steps."""
    s_min = e_min = 0.0
    for s0, s1, b in stretches:
        weight = (s1 - s0) / (1.0 + b / baseline_batch)
        s_min += weight
        e_min += b * weight
    return e_min / s_min if s_min > 0 else None


def run_average_of(results: Sequence[BranchResult], baseline_batch: int) -> RunAverage | None:
    """:func:`run_average` of branch results at a run's checkpoints (``model.checkpoints``):
    each at its step at the baseline batch (its examples seen ÷ B0 when known). A read
    that only bounds its critical batch counts as its bound, and bounds the average the
    same way (it grows with every read); reads bounded both ways give no value.

    A read whose ladder was cut short (``BranchResult.cut_short``: the budget, memory or
    Ctrl-C ended it before a rung fell behind) is left out, as if its checkpoint were not
    listed: "≥ 32" there says how far the ladder got, which the budget decided, not where
    the local critical batch is, while a ladder-top "≥ 16·B0" says every batch allowed
    kept up. Between the reads kept, the average interpolates as it does between any two
    checkpoints; a left-out read at an end shortens the span (``from_step``/``to_step``).
    None with fewer than two local critical batches in all; with fewer than two complete
    ones, no value (``bound`` "none") and the left-out reads, for the line to say why."""
    def at(r: BranchResult) -> float:  # (a whole step as an int: JSON's "from_step": 0.0)
        step = r.examples_seen / baseline_batch if r.examples_seen is not None else r.step
        return int(step) if float(step).is_integer() else step

    read = sorted((r for r in results if r.critical_batch is not None), key=at)
    if len(read) < 2:
        return None
    kept = [r for r in read if not r.cut_short]
    left_out = tuple((at(r), int(r.critical_batch), r.bound, r.stopped)
                     for r in read if r.cut_short and r.critical_batch is not None)
    reads = tuple((at(r), int(r.critical_batch)) for r in kept if r.critical_batch is not None)
    span = [at(r) for r in (kept if len(kept) >= 2 else read)]

    def average(value: float | None, bound: str) -> RunAverage:
        return RunAverage(critical_batch=value, bound=bound, from_step=span[0],
                          to_step=span[-1], reads=reads,
                          one_sided=sum(r.bound != "bracketed" for r in kept),
                          examples=sum(r.examples for r in results),
                          read_bounds=tuple(r.bound for r in kept), left_out=left_out)

    if len(kept) < 2:
        return average(None, "none")
    value = run_average(reads, baseline_batch)
    if value is None:
        return None
    sides = {r.bound for r in kept} - {"bracketed"}
    bound = "estimate" if not sides else sides.pop() if len(sides) == 1 else "none"
    return average(None if bound == "none" else value, bound)


# --------------------------------------------------------------------------- the learning rate

# The learning rate at the recommended batch B* (issue #13; docs/validation.md). The
# advisor's rule extrapolates lr0 from B0 to B*; on digits-mlp (Adam) the sweep's best
# learning rate at B* was 2.5x the rule's, while on digits-cnn and the transformer the
# rule was within 10% of the sweep. Measured instead: short training runs at B* from the
# probe run's starting weights (a fresh optimizer), at f x the rule's learning rate for
# f a power of 2, each LR_STEPS steps at that rate and then LR_COOLDOWN steps decaying
# it linearly to 0, over the same data orders. The lowest loss at the end wins, as far
# as every data order agrees (``consistent_factor``).
#
# Why from the start of training (docs/validation.md, "The learning rate",
# scripts/lr_eval.py): a run from the start is a short copy of the run the advice is
# for. From there the short runs picked within 1.35x of the sweep's best learning rate
# for the whole run at B* on all three shipped problems (within 2x at B0). From points later in
# training they drifted low, to 0.25-0.5x at B0 where lr0 is the sweep's best: late in
# training a smaller step always lowers the loss at once. The cool-down (the comparison
# of WSD-style runs, Hägele et al. 2024) removes the noise floor a higher rate leaves at
# the end of a constant stretch; at the start both forms agreed, later it halved the
# drift (B*: 0.5-2x of the rule's against 0.25-1x).
LR_STEPS = 32
# Linear decay to 0 after the constant stretch (WSD-style: Hägele et al. 2024 compare
# runs by their loss after a cool-down).
LR_COOLDOWN = 16
# Data orders averaged per learning rate (paired: every factor sees the same ones).
LR_REPEATS = 2
# The walk goes at most this factor above or below the rule's learning rate.
LR_MAX_FACTOR = 4.0


@dataclass(frozen=True)
class LrOptions:
    """What the learning-rate branches compare.

    Attributes:
        batch_size: B*, the recommended batch.
        micro_batch: at most this many examples per forward and backward, when B* does
            not fit in one (the steps accumulate them, as the recommendation does).
        rule_lr / lr_rule: the advisor's learning rate at B* and the rule's name.
        baseline_lr: lr0, the learning rate the optimizer's parameter groups were built
            with (each group's own is scaled by rule_lr·f/lr0).
        seed / step: ``probe.seed`` and the training step of the starting weights (0:
            the probe run's start).
        steps / cooldown / repeats / max_factor: the constants above (tests shrink them).
    """

    batch_size: int
    rule_lr: float
    lr_rule: str
    baseline_lr: float
    seed: int = 0
    step: int = 0
    steps: int = LR_STEPS
    cooldown: int = LR_COOLDOWN
    repeats: int = LR_REPEATS
    max_factor: float = LR_MAX_FACTOR
    micro_batch: int | None = None

    def __post_init__(self) -> None:
        if (self.batch_size < 1 or self.steps < 1 or self.cooldown < 0 or self.repeats < 1
                or self.max_factor < 2 or (self.micro_batch is not None
                                           and self.micro_batch < 1)):
            raise ValueError("batch_size, steps, repeats >= 1, cooldown >= 0 and "
                             "max_factor >= 2 needed")


def next_factor(tried: dict[float, float], max_factor: float = LR_MAX_FACTOR) -> float | None:
    """The next learning-rate factor to try, given the losses of those tried (None: stop).

    The walk: the rule's (1), then 2; while each doubling lowered the loss, up by 2 again;
    when 2 did not (or 1 diverged), down by halves from 1 while each halving lowers it
    (or the last one still diverged). Never beyond ``max_factor`` either way.
    """
    if 1.0 not in tried:
        return 1.0
    if 2.0 not in tried and math.isfinite(tried[1.0]):
        return 2.0
    if 2.0 in tried and tried[2.0] < tried[1.0]:
        f = max(tried)
        return 2 * f if tried[f] < tried[f / 2] and 2 * f <= max_factor * (1 + 1e-9) else None
    f = min(tried)
    if f == 1.0:
        return 0.5
    lower = tried[f] < tried[2 * f] or not math.isfinite(tried[f])  # on down while diverging
    return f / 2 if lower and 2 / f <= max_factor * (1 + 1e-9) else None


def best_factor(tried: dict[float, float]) -> float:
    """The factor with the lowest loss (ties: the one nearest the rule's); 1 when none
    is finite."""
    finite = {f: v for f, v in tried.items() if math.isfinite(v)}
    if not finite:
        return 1.0
    return min(finite, key=lambda f: (finite[f], abs(math.log2(f))))


def consistent_factor(losses: dict[float, Sequence[float]],
                      start: float | None = None) -> float:
    """The factor chosen from each factor's losses per data order (the orders paired):
    :func:`best_factor` of the means, stepped back towards the rule's (1) while not every
    data order agrees that it beats its neighbour towards 1. A rate is moved off the
    rule's only as far as the evidence is consistent: with 2 data orders, a sign test.
    A factor that stalled on some order (:func:`~bsfind.results.stalled_orders`) is chosen
    only when every one did, and the step back never goes to one."""
    failed = set(stalled_orders(losses, start))
    steady = {k: v for k, v in losses.items() if k not in failed} or losses
    f = best_factor({k: statistics.fmean(v) for k, v in steady.items()})
    while f != 1.0:
        toward = f / 2 if f > 1 else f * 2
        if toward not in losses or (toward in failed and f not in failed):
            break
        if all(a < b for a, b in zip(losses[f], losses[toward], strict=True)):
            break
        f = toward
    return f


def cooldown_scales(steps: int, cooldown: int) -> list[float]:
    """The learning rate's scale at each step of a branch: 1 for ``steps`` steps, then
    falling linearly towards 0 over ``cooldown`` steps (k/(cooldown + 1) short of 1 at
    its k-th step, so that every step still trains)."""
    return [1.0] * steps + [1.0 - k / (cooldown + 1) for k in range(1, cooldown + 1)]


def walk_end(tried: dict[float, float], max_factor: float = LR_MAX_FACTOR,
             chosen: float | None = None) -> str:
    """How a walk that ran to its end stopped: "diverged" (no finite loss), "limit" (the
    chosen factor, by default the lowest mean loss's, is the largest or smallest allowed)
    or "found"."""
    if not any(math.isfinite(v) for v in tried.values()):
        return "diverged"
    f = best_factor(tried) if chosen is None else chosen
    if abs(abs(math.log2(f)) - math.log2(max_factor)) < 1e-9:
        return "limit"
    return "found"


def measure_lr(job: Workload, options: LrOptions, deadline: Deadline,
               optimizer: torch.optim.Optimizer, *, progress: ProgressFn | None = None,
               on_branch_start: Callable[[BranchStart], None] | None = None) -> LrSearch:
    """Walk the learning-rate factors (:func:`next_factor`) at the recommended batch from
    the model's current weights and ``optimizer``'s state, and keep the lowest loss.

    The weights and the optimizer state are restored afterwards, as for :func:`measure`.
    A trial cut short by the deadline is dropped; an out-of-memory error ends the walk
    (both keep what finished). Raises ``Interrupted`` on Ctrl-C, carrying what was
    measured.
    """
    walk = _LrWalk(job, options, optimizer, deadline, progress, on_branch_start)
    stopped = "found"
    try:
        factor = next_factor(walk.tried, options.max_factor)
        while factor is not None:
            try:
                walk.trial(factor)
            except Exception as exc:
                stopped = _cut_short(job, exc)
                break
            factor = next_factor(walk.tried, options.max_factor)
        if stopped == "found" and walk.tried:
            stopped = walk_end(walk.tried, options.max_factor, walk.chosen())
    except Interrupted:  # an inner one: its partial result stands
        raise
    except KeyboardInterrupt:
        raise Interrupted("interrupted while measuring the learning rate",
                          partial=walk.result("interrupted")) from None
    finally:
        restore(job.model, optimizer, walk.saved_model, walk.saved_opt)
    return walk.result(stopped)


class _LrWalk:
    """The learning rates tried so far and how to try the next one."""

    def __init__(self, job: Workload, options: LrOptions, opt: torch.optim.Optimizer,
                 deadline: Deadline, progress: ProgressFn | None,
                 on_branch_start: Callable[[BranchStart], None] | None) -> None:
        self.job, self.options, self.opt = job, options, opt
        self.deadline, self.progress, self.on_branch_start = deadline, progress, on_branch_start
        self.start = now()
        self.saved_model, self.saved_opt = saved_state(job.model, opt)
        self.base_lrs = [g["lr"] for g in opt.param_groups]
        self.eval_idx = evaluation_subset(len(job), Seeds(options.seed).evaluation_subset)
        self.scales = cooldown_scales(options.steps, options.cooldown)
        # every run starts here: a run that ends no lower made no progress (stalled)
        self.start_loss = evaluate_loss(job, self.eval_idx,
                                        chunk=options.micro_batch or options.batch_size)
        self.tried: dict[float, float] = {}
        self.trials: list[LrTrial] = []
        self.examples = 0

    def _took(self, examples: int) -> None:
        self.examples += examples

    def trial(self, factor: float) -> None:
        """R short runs at ``factor`` × the rule's learning rate (kept only when every one
        finished); raises what cut one short."""
        o = self.options
        began = now()
        losses: list[float] = []
        for r in range(o.repeats):
            curve = run_branch(
                self.job, self.opt, self.saved_model, self.saved_opt, self.base_lrs,
                lr_scale=factor * o.rule_lr / o.baseline_lr, batch=o.batch_size, repeat=r,
                seed=Seeds(o.seed).branch(o.step, r), steps=len(self.scales),
                at=[len(self.scales)], eval_idx=self.eval_idx, deadline=self.deadline,
                on_start=self.on_branch_start, scales=self.scales, on_step=self._took,
                micro=o.micro_batch)
            losses.append(curve[-1][1])
            if self.progress is not None:
                done = min(1.0, (len(self.trials) + (r + 1) / o.repeats) / 4)
                self.progress("learning rate", done, f"{factor:g}x the rule's learning rate: "
                              f"data order {r + 1} of {o.repeats}")
        loss = statistics.fmean(losses)
        self.tried[factor] = loss
        self.trials.append(LrTrial(factor=factor, learning_rate=factor * o.rule_lr, loss=loss,
                                   losses=tuple(losses), seconds=now() - began))

    def chosen(self) -> float:
        return consistent_factor({t.factor: t.losses for t in self.trials}, self.start_loss)

    def result(self, stopped: str) -> LrSearch:
        o = self.options
        f = self.chosen()
        return wording.describe_lr_search(LrSearch(
            batch_size=o.batch_size, step=o.step, rule_learning_rate=o.rule_lr,
            lr_rule=o.lr_rule, factor=f, learning_rate=o.rule_lr * f, steps=o.steps,
            cooldown=o.cooldown, repeats=o.repeats, trials=tuple(self.trials),
            examples=self.examples, seconds=now() - self.start,
            stopped=stopped, micro_batch=o.micro_batch, start_loss=self.start_loss),
            lowest_mean=best_factor(self.tried))
