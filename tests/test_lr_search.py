"""The learning rate measured at the recommended batch (bsfind/branches.py, measure_lr):
the walk and the choice on hand-written losses, the cool-down, the correction of the
schedule's learning rates, isolation of the runs, the budget, Ctrl-C, out-of-memory, and
the report of `recommend`.

    .venv/bin/python -m pytest tests/test_lr_search.py -q
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest
import torch

from bsfind import branches, wording
from bsfind.advisor import lr_correction
from bsfind.budget import Deadline
from bsfind.errors import Interrupted
from bsfind.results import LrSearch
from tests.test_along import GOOD, _steady_ladder, run_json
from tests.test_branches import digest, tiny_job


@pytest.fixture(autouse=True)
def one_thread() -> None:
    torch.set_num_threads(1)


# --------------------------------------------------------------------------- the walk


def walk(losses: dict[float, float], max_factor: float = 4.0) -> list[float]:
    """The factors the walk tries when factor f's loss is ``losses[f]``."""
    tried: dict[float, float] = {}
    order = []
    while (f := branches.next_factor(tried, max_factor)) is not None:
        order.append(f)
        tried[f] = losses[f]
    return order


def test_the_walk_goes_up_while_doubling_helps() -> None:
    assert walk({1: 0.5, 2: 0.4, 4: 0.45}) == [1, 2, 4]
    assert walk({1: 0.5, 2: 0.4, 4: 0.3}) == [1, 2, 4]  # stops at the limit
    assert walk({1: 0.5, 2: 0.4, 4: 0.3, 8: 0.2, 16: 0.1}, max_factor=8) == [1, 2, 4, 8]


def test_the_walk_goes_down_when_doubling_does_not_help() -> None:
    assert walk({1: 0.5, 2: 0.6, 0.5: 0.55}) == [1, 2, 0.5]
    assert walk({1: 0.5, 2: 0.6, 0.5: 0.4, 0.25: 0.3}) == [1, 2, 0.5, 0.25]  # the limit
    assert walk({1: 0.5, 2: 0.6, 0.5: 0.4, 0.25: 0.45}) == [1, 2, 0.5, 0.25]
    # a diverged rule's rate: straight down, without trying 2
    assert walk({1: math.inf, 0.5: 0.7, 0.25: 0.8}) == [1, 0.5, 0.25]
    # on down while every rate diverges, to the limit
    assert walk({1: math.inf, 0.5: math.inf, 0.25: math.inf, 0.125: 0.1},
                max_factor=8) == [1, 0.5, 0.25, 0.125]
    assert walk({1: math.inf, 0.5: math.inf, 0.25: math.inf}) == [1, 0.5, 0.25]


def test_the_choice_is_the_lowest_finite_loss_ties_to_the_rule() -> None:
    assert branches.best_factor({1: 0.5, 2: 0.4, 4: 0.45}) == 2
    assert branches.best_factor({1: 0.5, 2: 0.6, 0.5: 0.5}) == 1  # a tie: the rule's
    assert branches.best_factor({1: 0.5, 2: 0.5, 4: 0.5, 0.5: 0.5}) == 1
    assert branches.best_factor({1: math.inf, 0.5: 0.7, 0.25: 0.6}) == 0.25
    assert branches.best_factor({1: math.inf}) == 1  # nothing finite: the rule's
    assert branches.best_factor({}) == 1


def test_a_rate_moves_off_the_rules_only_as_far_as_every_data_order_agrees() -> None:
    # 2x beats 1x on both orders, 4x beats 2x on one only: 2x, though 4x has the lowest mean
    losses = {1.0: (0.070, 0.071), 2.0: (0.040, 0.034), 4.0: (0.030, 0.035)}
    assert branches.best_factor({f: sum(v) / 2 for f, v in losses.items()}) == 4.0
    assert branches.consistent_factor(losses) == 2.0
    assert branches.consistent_factor({**losses, 4.0: (0.030, 0.033)}) == 4.0
    # a tie within the orders' spread: the rule's (the new user's BERT case)
    assert branches.consistent_factor({1.0: (0.5253, 0.5263), 2.0: (0.5240, 0.5300),
                                       0.5: (0.5291, 0.5290)}) == 1.0
    assert branches.consistent_factor({1.0: (0.52, 0.53), 0.5: (0.50, 0.54)}) == 1.0
    assert branches.consistent_factor({1.0: (0.52, 0.53), 0.5: (0.50, 0.51)}) == 0.5
    # a diverged rule's rate loses to any finite one
    assert branches.consistent_factor({1.0: (math.inf, math.inf), 0.5: (0.6, 0.7)}) == 0.5
    assert branches.walk_end({1.0: 0.0705, 2.0: 0.037, 4.0: 0.0325}, chosen=2.0) == "found"


def test_how_a_walk_ended() -> None:
    assert branches.walk_end({1: 0.5, 2: 0.4, 4: 0.3}) == "limit"
    assert branches.walk_end({1: 0.5, 2: 0.6, 0.5: 0.4, 0.25: 0.3}) == "limit"
    assert branches.walk_end({1: 0.5, 2: 0.4, 4: 0.45}) == "found"
    assert branches.walk_end({1: math.inf, 0.5: math.inf, 0.25: math.inf}) == "diverged"


def test_cooldown_scales() -> None:
    assert branches.cooldown_scales(3, 3) == [1, 1, 1, 0.75, 0.5, 0.25]
    assert branches.cooldown_scales(2, 0) == [1, 1]


def test_lr_correction_between_the_two_measured_batches() -> None:
    # lr0 at B0 = 64 (factor 1), 4x the rule's measured at B* = 256
    assert lr_correction(64, 64, 256, 4.0) == pytest.approx(1.0)
    assert lr_correction(128, 64, 256, 4.0) == pytest.approx(2.0)  # halfway in log batch
    assert lr_correction(256, 64, 256, 4.0) == pytest.approx(4.0)
    assert lr_correction(1024, 64, 256, 4.0) == pytest.approx(4.0)  # held beyond B*
    assert lr_correction(16, 64, 256, 4.0) == pytest.approx(1.0)  # held below B0
    # B* below B0: the same, mirrored
    assert lr_correction(32, 64, 16, 0.25) == pytest.approx(0.5)
    assert lr_correction(8, 64, 16, 0.25) == pytest.approx(0.25)
    # measured at B0 itself: lr0 is off at this point, everywhere
    assert lr_correction(512, 64, 64, 2.0) == 2.0
    assert lr_correction(512, 64, 256, 1.0) == 1.0


def test_lr_correction_takes_what_no_rule_explains_as_lr0_s_own_error() -> None:
    """Between B0 and B* a rule can be off by at most B*/B0 (constant against linear
    scaling): 4x measured at B* = 2·B0 leaves a factor 2 that is lr0's own, at B0 too."""
    assert lr_correction(64, 64, 128, 4.0) == pytest.approx(2.0)
    assert lr_correction(90.50966799, 64, 128, 4.0) == pytest.approx(2 * 2 ** 0.5)
    assert lr_correction(128, 64, 128, 4.0) == pytest.approx(4.0)
    assert lr_correction(32, 64, 128, 4.0) == pytest.approx(2.0)  # held below B0
    # 4x at 72 over 64 (a new user's transformer): no cliff between 64 and 72
    e = 4.0 ** (1 - math.log(72 / 64) / math.log(4.0))  # 3.55
    assert lr_correction(64, 64, 72, 4.0) == pytest.approx(e) and e == pytest.approx(3.5556,
                                                                                     rel=1e-4)
    assert lr_correction(128, 64, 72, 4.0) == pytest.approx(4.0)
    # mirrored: a quarter measured at B* = B0/2
    assert lr_correction(64, 64, 32, 0.25) == pytest.approx(0.5)
    # within what the batch change explains: unchanged (1 at B0)
    assert lr_correction(64, 64, 256, 2.0) == pytest.approx(1.0)


def test_lr_correction_with_the_rules_exponent_never_lowers_the_rate_as_the_batch_grows(
) -> None:
    """2x the sqrt rule's measured at B* = 16 below B0 = 32 (a new user's BERT): the
    rule halves the batch with lr × 0.71, so the best rate at 16 lies in lr0·[0.5, 1]
    (q in [0, 1]) and the rule's factor there in [0.71, 1.41]: 2x leaves 1.41 that is
    lr0's own, at 32 too. Before, without the exponent, 2x counted as all explained
    (the span of linear scaling): the schedule went 0.0018 at 16, then 0.001 at 32."""
    from bsfind.advisor import rule_exponent, scaled_lr

    p = rule_exponent(1e-3, scaled_lr(1e-3, 32, 16, math.inf, "adam", "sqrt")[0], 32, 16)
    assert p == pytest.approx(0.5)
    at = {b: lr_correction(b, 32, 16, 2.0, p) for b in (8, 16, 24, 32, 64)}
    assert at[16] == pytest.approx(2.0) and at[8] == pytest.approx(2.0)
    assert at[32] == pytest.approx(2 ** 0.5) and at[64] == pytest.approx(2 ** 0.5)
    lrs = [1e-3 * (b / 32) ** 0.5 * at[b] for b in (8, 16, 24, 32, 64)]
    assert all(a <= b * (1 + 1e-12) for a, b in zip(lrs[1:], lrs[2:], strict=False))
    assert lrs[3] == pytest.approx(lrs[1])  # 16 → 32 keeps the rate: q = 0 at the edge
    assert lr_correction(32, 64, 16, 2.0) == pytest.approx(2 ** 0.5)  # unknown p: as before
    # within what the rule can be off by: 1.2x at B0/2 is the batch's, 1 at B0
    assert lr_correction(32, 32, 16, 1.2, 0.5) == pytest.approx(1.0)
    # the linear rule (p = 1) at 2·B0 cannot be off upward: 2x is all lr0's own
    assert lr_correction(64, 64, 128, 2.0, 1.0) == pytest.approx(2.0)
    assert rule_exponent(1e-3, 2e-3, 64, 64) is None


@pytest.mark.parametrize("family, b0, b_star, b_n, factor", [
    ("adam", 32, 1024, 100.0, 0.5), ("adam", 32, 1024, 100.0, 3.0),
    ("sgd", 16, 4096, 10.0, 0.5), ("adam", 256, 16, 40.0, 2.0), ("sgd", 128, 8, 30.0, 0.4)])
def test_the_measured_rate_never_falls_as_the_batch_grows(family: str, b0: int, b_star: int,
                                                          b_n: float, factor: float) -> None:
    """Under the mccandlish rules (no power law: they flatten past B_n) interpolating the
    factor made the rate rise and fall between B0 and B* (a review: Adam, B0 32, B* 1024,
    B_n 100, 0.5x: 0.00113 at 128, 0.00097 at 1024); the rate itself is interpolated now.
    It meets lr0's own error at B0 and factor × the rule's at B*."""
    from bsfind.advisor import measured_lr, scaled_lr

    def rule(b: float) -> float:
        return scaled_lr(1e-3, b0, b, b_n, family)[0]  # type: ignore[arg-type]

    batches = [2 ** k for k in range(2, 14)]
    lrs = [measured_lr(b, rule(b), 1e-3, b0, b_star, rule(b_star), factor) for b in batches]
    assert all(a <= c * (1 + 1e-9) for a, c in zip(lrs, lrs[1:], strict=False)), lrs
    assert measured_lr(b_star, rule(b_star), 1e-3, b0, b_star, rule(b_star), factor) == (
        pytest.approx(factor * rule(b_star)))
    # a measurement that confirms the rule leaves the rule (a review: interpolating in
    # log batch put the concave mccandlish rule's rates 25% low between B0 and B*)
    assert [measured_lr(b, rule(b), 1e-3, b0, b_star, rule(b_star), 1.0) for b in batches] \
        == pytest.approx([rule(b) for b in batches])


def test_the_schedule_carries_the_correction() -> None:
    from bsfind.schedule import Growth, Phase, Schedule, with_measured_lr

    phases = tuple(Phase(batch_size=b, start_step=s, start_examples=s * b, steps=10,
                         learning_rate=lr, grad_accumulation=1, per_device_batch_size=b,
                         b_n=50.0, baseline_examples=0.0, extrapolated=False)
                   for b, s, lr in ((64, 0, 0.01), (128, 10, 0.014), (256, 20, 0.02)))
    s = Schedule(phases=phases, growth=Growth(a=1.0, p=0.5, e_lo=1.0, e_hi=2.0, r2=1.0,
                                              points=((1.0, 1.0), (2.0, 1.4))),
                 horizon_examples=1000, horizon_source="training", measured_examples=500,
                 seconds=1.0, baseline_seconds=2.0, best_constant_batch=128,
                 best_constant_seconds=1.5, lr_rule="mccandlish-sqrt")
    # the rule doubles the rate from 64 to 256 (p = 0.5); 4x the rule's there is 8x lr0,
    # more than linear scaling gives: 2x is lr0's own, at 64 too; between, the rate
    # (the phases' rule: 0.01·(b/64)^0.5, whatever their B_n)
    out = with_measured_lr(s, baseline_batch=64, baseline_lr=0.01, batch=256, factor=4.0,
                           rule_at=lambda b, b_n: 0.01 * (b / 64) ** 0.5)
    # at 128 the rule gives 0.014, u = log 1.4 / log 2 of the way: 0.014 · 2 · 2^u = 0.0392
    assert [p.learning_rate for p in out.phases] == pytest.approx([0.02, 0.0392, 0.08])
    assert out.lr_measured == (256, 4.0)
    assert [p.batch_size for p in out.phases] == [64, 128, 256]


def test_the_corrected_schedule_corrects_the_rules_rates_and_never_falls() -> None:
    """The correction starts from the rule's rates (``rule_learning_rates``), not from
    rates the schedule held; a corrected rate that falls is held in turn. Rule rates
    0.01, 0.009, 0.008 at 64, 128, 256 (a rule falling below B0 as B_n grows), measured
    4x the rule's 0.02 at 256 (p = 0.5): lr0's own error is 2 (test above); each
    phase's rule rate lies at or below lr0, u = 0: 2x the rule's, 0.02, 0.018, 0.016;
    held: 0.02 throughout."""
    from bsfind.schedule import Growth, Phase, Schedule, with_measured_lr

    phases = tuple(Phase(batch_size=b, start_step=s, start_examples=s * b, steps=10,
                         learning_rate=0.01, grad_accumulation=1, per_device_batch_size=b,
                         b_n=50.0, baseline_examples=0.0, extrapolated=False,
                         lr_held=s > 0)
                   for b, s in ((64, 0), (128, 10), (256, 20)))
    s = Schedule(phases=phases, growth=Growth(a=1.0, p=0.5, e_lo=1.0, e_hi=2.0, r2=1.0,
                                              points=((1.0, 1.0), (2.0, 1.4))),
                 horizon_examples=1000, horizon_source="training", measured_examples=500,
                 seconds=1.0, baseline_seconds=2.0, best_constant_batch=128,
                 best_constant_seconds=1.5, lr_rule="mccandlish-sqrt",
                 rule_learning_rates=(0.01, 0.009, 0.008))
    out = with_measured_lr(s, baseline_batch=64, baseline_lr=0.01, batch=256, factor=4.0,
                           rule_at=lambda b, b_n: 0.01 * (b / 64) ** 0.5)
    assert [p.learning_rate for p in out.phases] == pytest.approx([0.02, 0.02, 0.02])
    assert [p.lr_held for p in out.phases] == [False, True, True]
    # rising rule rates: the correction as before, nothing held
    s = dataclasses.replace(s, rule_learning_rates=(0.01, 0.014, 0.02))
    out = with_measured_lr(s, baseline_batch=64, baseline_lr=0.01, batch=256, factor=4.0,
                           rule_at=lambda b, b_n: 0.01 * (b / 64) ** 0.5)
    assert [p.learning_rate for p in out.phases] == pytest.approx([0.02, 0.0392, 0.08])
    assert not any(p.lr_held for p in out.phases)


# --------------------------------------------------------------------------- the runs


OPTIONS = branches.LrOptions(batch_size=16, rule_lr=2e-2, lr_rule="mccandlish-sqrt",
                             baseline_lr=1e-2, steps=4, cooldown=2, repeats=2)


def test_every_run_starts_from_the_same_state_at_its_learning_rate() -> None:
    job = tiny_job()
    opt = job.make_optimizer(1e-2)  # fresh, as from the probe run's start
    before = digest(job.model, opt)
    seen: list[tuple[int, str, float]] = []
    lrs: list[float] = []
    original = opt.step

    def spy_step(*args, **kwargs):  # type: ignore[no-untyped-def]
        lrs.append(opt.param_groups[0]["lr"])
        return original(*args, **kwargs)

    opt.step = spy_step  # type: ignore[method-assign]

    def check(start: branches.BranchStart) -> None:
        seen.append((start.repeat, digest(start.model, start.optimizer),
                     start.optimizer.param_groups[0]["lr"]))

    r = branches.measure_lr(job, OPTIONS, Deadline.after(60), opt, on_branch_start=check)
    factors = [t.factor for t in r.trials]
    assert factors[:2] == [1.0, 2.0] and len(seen) == 2 * len(factors)
    assert {d for _, d, _ in seen} == {before}
    assert [rep for rep, _, _ in seen] == [0, 1] * len(factors)
    # every step's learning rate: f × the rule's, then the linear cool-down
    expected = [f * 2e-2 * s for f in factors for _ in range(2)
                for s in (1.0, 1.0, 1.0, 1.0, 2 / 3, 1 / 3)]
    assert lrs == pytest.approx(expected)
    # restored afterwards: weights, optimizer state and learning rate
    assert digest(job.model, opt) == before and opt.param_groups[0]["lr"] == 1e-2
    assert r.learning_rate == pytest.approx(r.factor * 2e-2)
    assert r.factor == branches.best_factor({t.factor: t.loss for t in r.trials})
    assert r.examples == 2 * 6 * 16 * len(factors)
    assert all(len(t.losses) == 2 and t.loss == pytest.approx(sum(t.losses) / 2)
               for t in r.trials)


def test_the_loss_is_read_after_the_cooldown() -> None:
    """A trial's loss is the evaluation after its last (cool-down) step, computed here
    by training the same steps by hand."""
    from bsfind.seeds import Seeds
    from bsfind.training import EpochSampler, evaluate_loss, evaluation_subset, training_step

    job = tiny_job()
    opt = job.make_optimizer(1e-2)
    options = dataclasses.replace(OPTIONS, repeats=1, max_factor=2.0)
    idx = evaluation_subset(len(job), Seeds(0).evaluation_subset)
    start = evaluate_loss(job, idx, chunk=16)
    r = branches.measure_lr(job, options, Deadline.after(60), opt)
    assert r.start_loss == start  # where every run starts, on the same examples
    first = r.trials[0]
    assert first.factor == 1.0
    sampler = EpochSampler(len(job), 16, torch.Generator().manual_seed(Seeds(0).branch(0, 0)))
    for s in branches.cooldown_scales(4, 2):
        for g in opt.param_groups:
            g["lr"] = 2e-2 * s
        training_step(job, opt, sampler.next(), check=False)
    assert first.loss == pytest.approx(evaluate_loss(job, idx, chunk=16))


def test_budget_drops_the_cut_trial() -> None:
    job = tiny_job()
    opt = job.make_optimizer(1e-2)
    before = digest(job.model, opt)
    now = [0.0]

    def tick(start: branches.BranchStart) -> None:
        now[0] += 1.0

    r = branches.measure_lr(job, OPTIONS, Deadline(2.5, clock=lambda: now[0]), opt,
                            on_branch_start=tick)
    assert r.stopped == "budget" and [t.factor for t in r.trials] == [1.0]
    assert any("time budget" in n for n in r.notes)
    assert digest(job.model, opt) == before
    none = branches.measure_lr(job, OPTIONS, Deadline(0.0, clock=lambda: 1.0), opt)
    assert none.trials == () and none.factor == 1.0 and none.learning_rate == 2e-2
    assert any("the rule's stands" in n for n in none.notes)


def test_out_of_memory_keeps_the_rule() -> None:
    job = tiny_job(limit=8)
    opt = job.make_optimizer(1e-2)
    before = digest(job.model, opt)
    r = branches.measure_lr(job, OPTIONS, Deadline.after(60), opt)
    assert r.stopped == "out of memory" and r.trials == () and r.factor == 1.0
    assert any("batch 16 ran out of memory" in n for n in r.notes)
    assert digest(job.model, opt) == before


def test_ctrl_c_gives_what_was_measured() -> None:
    job = tiny_job()
    opt = job.make_optimizer(1e-2)
    before = digest(job.model, opt)
    calls = [0]

    def interrupt_third(start: branches.BranchStart) -> None:
        calls[0] += 1
        if calls[0] == 3:
            raise KeyboardInterrupt

    with pytest.raises(Interrupted) as info:
        branches.measure_lr(job, OPTIONS, Deadline.after(60), opt,
                            on_branch_start=interrupt_third)
    partial = info.value.partial
    assert isinstance(partial, LrSearch) and partial.stopped == "interrupted"
    assert [t.factor for t in partial.trials] == [1.0]
    assert digest(job.model, opt) == before


def test_a_diverging_rate_is_never_chosen() -> None:
    """SGD at 1e3 × the rule's rate: inf loss (NaN weights); the walk goes straight down
    and never picks it."""
    from torch import nn

    from bsfind.workload import Workload

    base = tiny_job()
    job = Workload.from_objects(base.model, base.dataset, nn.functional.cross_entropy,
                                optimizer="sgd")
    opt = job.make_optimizer(1e-2)
    options = dataclasses.replace(OPTIONS, rule_lr=1e4, baseline_lr=1e-2, max_factor=2**14)
    r = branches.measure_lr(job, options, Deadline.after(60), opt)
    assert math.isinf(r.trials[0].loss) and r.trials[1].factor == 0.5  # straight down
    assert any("diverged" in n for n in r.notes)
    assert math.isfinite(r.trials[-2].loss) and r.factor == r.trials[-2].factor
    assert r.stopped == "found"


def test_when_every_rate_diverges_the_rule_stands_unmeasured() -> None:
    from torch import nn

    from bsfind.workload import Workload

    base = tiny_job()
    job = Workload.from_objects(base.model, base.dataset, nn.functional.cross_entropy,
                                optimizer="sgd")
    options = dataclasses.replace(OPTIONS, rule_lr=1e9, baseline_lr=1e-2)
    r = branches.measure_lr(job, options, Deadline.after(60), job.make_optimizer(1e-2))
    assert [t.factor for t in r.trials] == [1.0, 0.5, 0.25]
    assert r.stopped == "diverged" and r.factor == 1.0
    assert any("every learning rate tried diverged, down to 0.25x" in n for n in r.notes)


def test_a_branch_cut_by_the_budget_still_counts_its_examples() -> None:
    """`bsfind branch`: the steps a cut branch took count in ``examples``."""
    job = tiny_job()
    opt = job.make_optimizer(1e-2)
    taken = [0]
    original = opt.step

    def spy_step(*args, **kwargs):  # type: ignore[no-untyped-def]
        taken[0] += 1
        return original(*args, **kwargs)

    opt.step = spy_step  # type: ignore[method-assign]
    ticks = [0.0]

    def clock() -> float:  # one tick per look at the clock: the cut falls mid-branch
        ticks[0] += 1
        return ticks[0]

    from tests.test_branches import OPTIONS as BRANCH_OPTIONS

    r = branches.measure(job, BRANCH_OPTIONS, Deadline(11.5, clock=clock), optimizer=opt)
    assert r.stopped == "budget" and 8 < taken[0] < 16  # inside the second branch
    assert r.examples == 8 * taken[0]


def test_the_hardware_keeps_its_share_before_the_search() -> None:
    from bsfind.pipeline import HARDWARE_SHARE, hardware_deadline
    from bsfind.spec import load_spec

    spec = load_spec(GOOD, ["probe.max_seconds=10"])
    own = HARDWARE_SHARE * 10
    for left, reserve, expected in ((8.0, 1.0, 7.0),      # the reserve comes off
                                    (3.0, 1.0, own),      # but not below its own share
                                    (0.9, 1.0, 0.9),      # nor below what is left
                                    (8.0, 0.0, 8.0)):     # no search: all of it
        deadline = Deadline(left, clock=lambda: 0.0)
        assert hardware_deadline(deadline, spec, reserve).left() == pytest.approx(expected)


@pytest.mark.parametrize("overrides, why", [
    (["probe.lr_branches=false"], "probe.lr_branches is off"),
    (["probe.at_steps=[0]"], "the probe trains no steps"),
    (["model.checkpoint=w.pt"], "model.checkpoint"),
    (['model.checkpoints=[{"path": "a.pt", "step": 1}]'], "model.checkpoints"),
])
def test_when_the_spec_rules_the_search_out(overrides: list[str], why: str) -> None:
    from bsfind.pipeline import lr_search_skipped_by_spec, lr_searching, noise_share
    from bsfind.spec import load_spec

    spec = load_spec(GOOD, overrides)
    reason = lr_search_skipped_by_spec(spec, world=1)
    assert reason is not None and why in reason
    assert not lr_searching(spec, "recommend")
    # no reserve is taken from the points along training for a search that cannot run
    assert noise_share(spec, "recommend", hardware=True) == pytest.approx(0.75)


def test_the_search_runs_only_for_recommend_in_one_process() -> None:
    from bsfind.pipeline import LR_SHARE, lr_searching, noise_share
    from bsfind.spec import load_spec

    spec = load_spec(GOOD)
    assert lr_searching(spec, "recommend") and not lr_searching(spec, "noise")
    assert not lr_searching(spec, "recommend", world=2)
    assert noise_share(spec, "recommend", hardware=True) == pytest.approx(0.75 - LR_SHARE)
    assert noise_share(spec, "recommend", hardware=True, world=2) == pytest.approx(0.75)


def test_check_labels_a_measured_rate() -> None:
    from bsfind.api import verdict

    doc = {"baseline": {"batch_size": 16},
           "recommendation": {"batch_size": 128, "learning_rate": 0.2, "lr_rule": "mccandlish",
                              "lr_factor": 2.0, "predicted_time_ratio": 0.5,
                              "predicted_cost_ratio": 0.5}}
    assert "0.2 (measured: 2× the mccandlish rule's)" in verdict(doc, 2.0).message
    doc["recommendation"]["lr_factor"] = None
    assert "0.2 (rule: mccandlish)" in verdict(doc, 2.0).message


# --------------------------------------------------------------------------- recommend


def _starts_of_the_search(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The digests of the model and optimizer each learning-rate search starts from."""
    starts: list[str] = []
    original = branches.measure_lr

    def spy(job, options, deadline, optimizer, **kw):  # type: ignore[no-untyped-def]
        starts.append(digest(job.model, optimizer))
        return original(job, options, deadline, optimizer, **kw)

    monkeypatch.setattr(branches, "measure_lr", spy)
    return starts


def test_recommend_measures_the_learning_rate_from_the_probe_runs_start(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from bsfind.spec import load_spec
    from bsfind.workload import build

    _steady_ladder(monkeypatch)
    starts = _starts_of_the_search(monkeypatch)
    doc = run_json("recommend", GOOD, "--set", "probe.max_seconds=8")
    fresh = build(load_spec(GOOD))  # the same seeded initial weights, a fresh optimizer
    assert starts == [digest(fresh.model, fresh.make_optimizer(0.1))]
    s, rec = doc["lr_search"], doc["recommendation"]
    assert s["batch_size"] == rec["batch_size"] and s["step"] == 0
    assert s["trials"] and s["trials"][0]["factor"] == 1.0
    assert rec["lr_factor"] == s["factor"]
    assert rec["learning_rate"] == pytest.approx(s["rule_learning_rate"] * s["factor"])
    assert any(n.startswith("learning rate at batch") for n in rec["notes"])
    sched = doc["schedule"]
    assert sched is not None
    assert sched["lr_measured"] == {"batch_size": rec["batch_size"], "factor": s["factor"]}
    # the batch grows more than 8x here: the warm-up ramps to the measured rate
    assert rec["warmup"] and f"to {rec['learning_rate']:.3g} over" in rec["warmup"]


def test_with_a_checkpoint_at_step_0_the_search_starts_from_it(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """model.checkpoints with an entry at step 0 (the run's start, as README advises)
    said "holds no starting weights" and skipped the search (a trial): the short runs
    now start from that entry's weights, with a fresh optimizer."""
    from bsfind.spec import load_spec
    from bsfind.workload import build

    _steady_ladder(monkeypatch)
    job = build(load_spec(GOOD))
    with torch.no_grad():
        for p in job.model.parameters():
            p.mul_(0.5)  # not the factory's seeded weights
    torch.save(job.model.state_dict(), tmp_path / "start.pt")
    with torch.no_grad():
        for p in job.model.parameters():
            p.add_(0.01)
    torch.save(job.model.state_dict(), tmp_path / "later.pt")
    starts = _starts_of_the_search(monkeypatch)
    listed = (f'model.checkpoints=[{{path: "{tmp_path / "start.pt"}", step: 0}}, '
              f'{{path: "{tmp_path / "later.pt"}", step: 5}}]')
    doc = run_json("recommend", GOOD, "--set", "probe.max_seconds=8", "--set", listed)
    fresh = build(load_spec(GOOD))
    fresh.model.load_state_dict(torch.load(tmp_path / "start.pt"))
    assert starts == [digest(fresh.model, fresh.make_optimizer(0.1))]
    assert doc["recommendation"]["lr_factor"] == doc["lr_search"]["factor"]
    from bsfind.pipeline import lr_search_skipped_by_spec

    later = load_spec(GOOD, [f'model.checkpoints=[{{path: "{tmp_path / "later.pt"}", '
                             'step: 5}]'])
    assert "lists no entry at step 0" in str(lr_search_skipped_by_spec(later, world=1))


def test_a_search_the_budget_stops_leaves_the_rule_and_a_partial_report(
        monkeypatch: pytest.MonkeyPatch) -> None:
    _steady_ladder(monkeypatch)
    original = branches.measure_lr

    def out_of_time(job, options, deadline, optimizer, **kw):  # type: ignore[no-untyped-def]
        return original(job, options, Deadline(0.0, clock=lambda: 1.0), optimizer, **kw)

    monkeypatch.setattr(branches, "measure_lr", out_of_time)
    doc = run_json("recommend", GOOD, "--set", "probe.max_seconds=8")
    rec = doc["recommendation"]
    assert doc["status"] == "partial" and doc["lr_search"]["stopped"] == "budget"
    assert rec["lr_factor"] is None
    assert rec["learning_rate"] == pytest.approx(doc["lr_search"]["rule_learning_rate"])
    # one note says it, with why (before, three lines did: two notes and the warning)
    said = [n for n in rec["notes"] if "stands" in n]
    assert len(said) == 1, rec["notes"]
    assert "not measured (the time budget ended before the first learning rate " in said[0]
    assert doc["lr_search"]["notes"] == [
        "the time budget ended before the first learning rate finished: the rule's stands"]
    # a partial report says why among its warnings (a CI log shows those), and that the
    # rate is the rule's: no learning rate finished (it said "the best of those that
    # finished", new-user trial)
    cut = [w for w in doc["warnings"] if "ended the learning-rate search" in w]
    assert len(cut) == 1 and "before its first learning rate finished" in cut[0]
    assert "the learning rate is the rule's" in cut[0]


def test_a_search_cut_after_its_first_rate_measured_nothing(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Only the rule's own rate (1x) finished before the budget ended: nothing was
    compared, so the recommendation's rate is the rule's, not "measured: 1x" (a new
    user's check at --max-seconds 30), and the warning says why."""
    _steady_ladder(monkeypatch)
    original = branches.measure_lr

    def one_trial(job, options, deadline, optimizer, **kw):  # type: ignore[no-untyped-def]
        now = [0.0]
        given = kw.pop("on_branch_start", None)

        def tick(start: branches.BranchStart) -> None:
            now[0] += 1.0
            if given is not None:
                given(start)

        quick = dataclasses.replace(options, repeats=1)
        return original(job, quick, Deadline(1.5, clock=lambda: now[0]), optimizer,
                        on_branch_start=tick, **kw)

    monkeypatch.setattr(branches, "measure_lr", one_trial)
    doc = run_json("recommend", GOOD, "--set", "probe.max_seconds=8")
    s, rec = doc["lr_search"], doc["recommendation"]
    assert [t["factor"] for t in s["trials"]] == [1.0] and s["stopped"] == "budget"
    assert rec["lr_factor"] is None and doc["status"] == "partial"
    assert rec["learning_rate"] == pytest.approx(s["rule_learning_rate"])
    # one note says so (a trial read "measured by short runs ... the rule's stands" beside
    # "ended after its first learning rate"); the JSON's search keeps its own note
    said = [n for n in rec["notes"] if "learning rate at batch" in n]
    assert len(said) == 1 and "not measured (the time budget ended the short runs after " \
        "the rule's own rate, 1x → " in said[0] and "measured by short runs" not in said[0]
    assert not any("nothing to compare it with" in n for n in rec["notes"])
    assert any("nothing to compare it with" in n for n in s["notes"])
    assert [w for w in doc["warnings"] if "ended the learning-rate search" in w] == [
        wording.LR_SEARCH_CUT_ONE]


def test_recommend_without_the_search_says_the_rate_is_the_rules(
        monkeypatch: pytest.MonkeyPatch) -> None:
    _steady_ladder(monkeypatch)
    doc = run_json("recommend", GOOD, "--set", "probe.max_seconds=8",
                   "--set", "probe.lr_branches=false")
    assert doc["lr_search"] is None and doc["recommendation"]["lr_factor"] is None
    assert any("rule's extrapolation" in n and "probe.lr_branches is off" in n
               for n in doc["recommendation"]["notes"])
    assert doc["schedule"]["lr_measured"] is None


def test_branch_rungs_can_carry_a_measured_correction() -> None:
    """`branch_eval.py --lr-measured`: each rung's rate by advisor.measured_lr."""
    from bsfind.advisor import measured_lr, scaled_lr
    from tests.test_branches import OPTIONS as BRANCH_OPTIONS

    job = tiny_job()
    opts = dataclasses.replace(BRANCH_OPTIONS, lr_measured=(32, 2.0))
    seen: dict[int, float] = {}

    def record(start: branches.BranchStart) -> None:
        seen[start.batch_size] = start.optimizer.param_groups[0]["lr"]

    r = branches.measure(job, opts, Deadline.after(60), on_branch_start=record)
    for b, lr in seen.items():
        rule = scaled_lr(1e-2, 8, b, 50.0, "adam")[0]
        there = scaled_lr(1e-2, 8, 32, 50.0, "adam")[0]
        assert lr == pytest.approx(measured_lr(b, rule, 1e-2, 8, 32, there, 2.0))
    assert seen[8] == pytest.approx(scaled_lr(1e-2, 8, 8, 50.0, "adam")[0])  # B0: as lr0's
    assert "corrected by the rate measured at 32" in r.lr_rule


def test_a_rate_stepped_back_is_said() -> None:
    from bsfind.results import LrTrial
    from bsfind.wording import describe_lr_search

    trials = (LrTrial(1.0, 0.01, 0.0705, (0.070, 0.071)),
              LrTrial(2.0, 0.02, 0.037, (0.040, 0.034)),
              LrTrial(4.0, 0.04, 0.0325, (0.030, 0.035)))
    r = describe_lr_search(LrSearch(
        batch_size=64, step=0, rule_learning_rate=0.01, lr_rule="mccandlish-sqrt",
        factor=2.0, learning_rate=0.02, steps=32, cooldown=16, repeats=2, trials=trials,
        examples=0, seconds=0.0, stopped="found"), lowest_mean=4.0)
    assert any("4x the rule's had the lowest mean loss, but not on every data order" in n
               and "2x kept" in n for n in r.notes)


def test_a_rate_that_made_no_progress_on_one_data_order_is_not_chosen() -> None:
    """A trial (SGD, momentum 0.9): the rule's rate fell back to chance (2.309, from 2.306)
    on one data order and beat 0.5x by 5% on the other, so the sign test kept it; trained
    at it, the run ended at twice the baseline's loss, at 0.5x at 0.001. A review: a run
    at chance just below a start above chance (2.284 from 2.306) is the same failure."""
    from bsfind.results import LrTrial, stalled_orders
    from bsfind.wording import describe_lr_search

    losses = {1.0: (2.309, 0.384), 0.5: (0.501, 0.405)}
    assert branches.consistent_factor(losses) == 1.0  # without the start: as before
    assert branches.consistent_factor(losses, start=2.306) == 0.5
    # a cut under a tenth of the best cut on that order (0.5x: 1.805) stalls
    assert stalled_orders(losses, 2.306) == {1.0: (0,)}
    assert stalled_orders({1.0: (2.284, 0.384), 0.5: (0.501, 0.405)}, 2.306) == {1.0: (0,)}
    assert stalled_orders({1.0: (2.0, 0.384), 0.5: (0.501, 0.405)}, 2.306) == {}  # 0.31 cut
    # late in a run, every loss within noise of the start: no cut is large enough to judge
    assert stalled_orders({1.0: (0.1002, 0.0990), 2.0: (0.0991, 0.0985)}, 0.1) == {}
    # a diverged run stalls on its order, start known or not
    assert stalled_orders({1.0: (math.inf, 0.3), 2.0: (0.2, 0.3)}, None) == {1.0: (0,)}
    # every rate stalled somewhere: the sign test among them, as before
    both = {1.0: (2.309, 0.384), 0.5: (0.501, 2.31)}
    assert set(stalled_orders(both, 2.306)) == {1.0, 0.5}
    assert branches.consistent_factor(both, start=2.306) == 1.0
    # the step back stops short of a stalled rate, and goes on between steady ones
    assert branches.consistent_factor(
        {1.0: (2.4, 0.3), 0.5: (0.35, 0.31), 0.25: (0.34, 0.32)}, start=2.3) == 0.5

    def notes(trial_losses: dict[float, tuple[float, float]], factor: float) -> tuple[str, ...]:
        trials = tuple(LrTrial(f, 0.2 * f, sum(v) / 2, v) for f, v in trial_losses.items())
        return describe_lr_search(LrSearch(
            batch_size=80, step=0, rule_learning_rate=0.2, lr_rule="mccandlish",
            factor=factor, learning_rate=0.2 * factor, steps=32, cooldown=16, repeats=2,
            trials=trials, examples=0, seconds=0.0, stopped="found", start_loss=2.306),
            lowest_mean=branches.best_factor({f: sum(v) / 2 for f, v in trial_losses.items()})
        ).notes

    assert notes(losses, 0.5) == (
        "1x the rule's learning rate (0.2) made little or no progress on data order 1 of 2 "
        "(loss 2.309 from 2.306 where the runs start, while another rate cut it by more): "
        "not chosen",)
    assert notes(both, 1.0) == (
        "1x the rule's learning rate (0.2) made little or no progress on data order 1 of 2 "
        "(loss 2.309 from 2.306 where the runs start, while another rate cut it by more)",
        "0.5x the rule's learning rate (0.1) made little or no progress on data order 2 of 2 "
        "(loss 2.31 from 2.306 where the runs start, while another rate cut it by more)",
        "every learning rate tried made little progress on some data order: the choice is "
        "among them, as far as every data order agrees")


# --------------------------------------------------------------------------- accumulation


def test_an_accumulated_step_is_the_full_batch_step() -> None:
    """Micro-batches of 5 over a batch of 16, each mean loss weighted by its share: the
    same loss, gradient and update as one step on all 16 (no BatchNorm here)."""
    from bsfind.training import training_step

    idx = torch.arange(16)
    updated = []
    for micro in (None, 5):
        job = tiny_job()
        opt = torch.optim.SGD(job.model.parameters(), lr=0.1)
        loss = training_step(job, opt, idx, micro=micro)
        grads = [p.grad.clone() for p in job.model.parameters()]
        updated.append((loss, grads, [p.detach().clone() for p in job.model.parameters()]))
    (full, g_full, w_full), (acc, g_acc, w_acc) = updated
    assert acc.item() == pytest.approx(full.item(), rel=1e-6)
    assert all(torch.allclose(a, b, rtol=1e-5, atol=1e-7) for a, b in zip(g_acc, g_full,
                                                                          strict=True))
    assert all(torch.allclose(a, b, rtol=1e-5, atol=1e-7) for a, b in zip(w_acc, w_full,
                                                                          strict=True))


def test_a_batch_that_does_not_fit_is_measured_with_accumulation() -> None:
    """No forward and backward takes more than the micro-batch, every step takes the
    whole batch, and the losses are those of the unaccumulated runs."""
    job = tiny_job()
    sizes: list[int] = []
    original = job.loss

    def spy(idx: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled():
            sizes.append(len(idx))
        return original(idx)

    object.__setattr__(job, "loss", spy)
    options = dataclasses.replace(OPTIONS, micro_batch=5, max_factor=2.0)
    r = branches.measure_lr(job, options, Deadline.after(60), job.make_optimizer(1e-2))
    assert sizes and max(sizes) <= 5
    steps = [sizes[i:i + 4] for i in range(0, len(sizes), 4)]  # 5 + 5 + 5 + 1 per step
    assert all(s == [5, 5, 5, 1] for s in steps)
    from bsfind.wording import lr_search_line

    assert r.micro_batch == 5 and "accumulating micro-batches of 5" in lr_search_line(r)
    again = tiny_job()
    plain = branches.measure_lr(again, dataclasses.replace(OPTIONS, max_factor=2.0),
                                Deadline.after(60), again.make_optimizer(1e-2))
    assert [t.factor for t in r.trials] == [t.factor for t in plain.trials]
    assert [t.loss for t in r.trials] == pytest.approx([t.loss for t in plain.trials],
                                                        rel=1e-4)


def test_the_pipeline_accumulates_when_the_recommendation_is_above_the_memory_line(
        ) -> None:
    from bsfind.pipeline import lr_micro_batch
    from bsfind.results import MemoryModel

    fits = MemoryModel(fixed_bytes=0, bytes_per_example=1.0, max_batch_size=512,
                       limit_bytes=512, source="predicted")
    assert lr_micro_batch(300, fits) is None and lr_micro_batch(512, fits) is None
    assert lr_micro_batch(300, dataclasses.replace(fits, max_batch_size=128)) == 128
    assert lr_micro_batch(300, None) is None  # no memory line: nothing to go by
    # a BatchNorm model's forward keeps its BatchNorm batch, as the recommendation does
    assert lr_micro_batch(128, fits, norm_batch=32) == 32
    assert lr_micro_batch(32, fits, norm_batch=32) is None
    assert lr_micro_batch(300, dataclasses.replace(fits, max_batch_size=16), 32) == 16


@pytest.mark.parametrize(("loss", "stopped", "says", "kept"), [
    (0.42, "budget", "not measured (the time budget ended the short runs after the rule's "
     "own rate, 1x → 0.42)", None),
    (math.inf, "budget", "the rule's own rate diverged (1x → ∞) before the time budget ended "
     "the short runs; the mccandlish-sqrt rule's 0.0132 stands, and may be too high",
     "1x the rule's learning rate (0.0132) diverged"),
    (0.42, "out of memory", "not measured (running out of memory at batch 1,024 ended the "
     "short runs after the rule's own rate, 1x → 0.42)", None),
])
def test_a_search_of_one_trial_says_what_ended_it(loss: float, stopped: str, says: str,
                                                  kept: str | None) -> None:
    """One trial compares nothing, whatever ended the search; a review found the rule's
    own rate diverging (then the budget ending the 0.5x trial) reported as "not measured"
    with the divergence dropped, and one trial ended by running out of memory reported as
    "measured by short runs"."""
    from bsfind import pipeline
    from bsfind.results import LrTrial

    search = wording.describe_lr_search(LrSearch(
        batch_size=1024, step=0, rule_learning_rate=0.0132, lr_rule="mccandlish-sqrt",
        factor=1.0, learning_rate=0.0132, steps=20, cooldown=5, repeats=2,
        trials=(LrTrial(1.0, 0.0132, loss),), examples=0, seconds=1.0, stopped=stopped))
    line = wording.lr_search_line(search)
    assert says in line and "measured by short runs" not in line
    assert any(wording.NOTHING_COMPARED in n for n in search.notes) == math.isfinite(loss)

    @dataclasses.dataclass(frozen=True)
    class Rec:
        notes: tuple[str, ...] = ()
        batch_size: int = 1024
        warmup_steps: int | None = None
        warmup: str | None = None
        learning_rate: float = 0.0132
        lr_factor: float | None = None

    @dataclasses.dataclass(frozen=True)
    class Rep:
        recommendation: Rec
        warnings: tuple[str, ...] = ()
        status: str = "ok"
        lr_search: object = None
        schedule: object = None
        baseline_batch: int = 64
        baseline_lr: float = 0.008

    out = pipeline.with_lr_search(Rep(Rec()), search, lambda b, n: 0.0132)  # type: ignore[arg-type]
    notes = out.recommendation.notes
    assert out.recommendation.lr_factor is None and notes[0] == line
    assert len(notes) == 1  # the line says what the search's notes say (a review)
    assert kept is None or kept in search.notes
