"""Branched runs (bsfind/branches.py): the rule on hand-computed curves, isolation of the
branches, the budget, Ctrl-C and out-of-memory.

    .venv/bin/python -m pytest tests/test_branches.py -q
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from bsfind import branches
from bsfind.budget import Deadline
from bsfind.errors import Interrupted
from bsfind.results import BranchResult, Interval
from bsfind.workload import Workload
from tests.conftest import CONFIGS, ROOT
from tests.subprocesses import start_bsfind, wait_for_stderr


@pytest.fixture(autouse=True)
def one_thread() -> None:
    # Tiny models: a second thread only spins while other work holds the other core.
    torch.set_num_threads(1)

# --------------------------------------------------------------------------- the rule


def test_smoothed_loss_is_the_mean_over_the_window() -> None:
    curve = [(10, 1.0), (20, 0.8), (30, 0.6), (40, 0.4)]
    # [20, 40]: 0.8, 0.6, 0.4
    assert branches.smoothed_loss(curve, 40, 0.5) == pytest.approx(0.6)
    # [15, 30]: 0.8, 0.6
    assert branches.smoothed_loss(curve, 30, 0.5) == pytest.approx(0.7)
    # nothing inside [12, 15]: the last evaluation before, 10 -> 1.0
    assert branches.smoothed_loss(curve, 15, 0.2) == pytest.approx(1.0)
    assert branches.smoothed_loss(curve, 5, 0.5) == math.inf  # nothing yet
    assert branches.smoothed_loss([(10, 1.0), (20, math.nan)], 20, 0.5) == math.inf


def test_rule_on_hand_computed_curves() -> None:
    """Δ = 16; B/2 is read after 16/√2 = 11.31 examples, over [5.66, 11.31]."""
    r0 = [[(4, 1.0), (8, 0.9), (12, 0.8), (16, 0.7)]]  # at 16: [8, 16] -> 0.8
    r1 = [[(8, 0.94), (16, 0.84)]]  # at 16: 0.89; r0 at 11.31: (8, 0.9) -> 0.9: passes
    r2 = [[(8, 0.99), (16, 0.97)]]  # at 16: 0.98; r1 at 11.31: (8, 0.94) -> 0.94: fails
    r3 = [[(16, 0.1)]]  # never looked at: the ladder ended at r2
    out = branches.verdicts([r0, r1, r2, r3], 16, tolerance=math.sqrt(2), smoothing=0.5)
    assert [v.passed for v in out] == [None, True, False]
    assert out[0].loss == pytest.approx(0.8)
    assert out[1].loss == pytest.approx(0.89)
    assert out[1].reference == pytest.approx(0.9)
    assert out[2].loss == pytest.approx(0.98)
    assert out[2].reference == pytest.approx(0.94)
    b, bound, interval = branches.bracket([4, 8, 16, 32], out)
    assert (b, bound) == (8, "bracketed")
    assert interval.low == pytest.approx(8 / math.sqrt(2))
    assert interval.high == pytest.approx(8 * math.sqrt(2))


def test_repeats_are_averaged_before_the_rule() -> None:
    r0 = [[(8, 1.0), (16, 1.0)], [(8, 0.6), (16, 0.6)]]  # 1.0 and 0.6 -> 0.8
    r1 = [[(16, 0.9)], [(16, 0.7)]]  # 0.8 <= 0.8: passes (equal keeps up)
    out = branches.verdicts([r0, r1], 16, tolerance=math.sqrt(2), smoothing=0.5)
    assert out[0].loss == pytest.approx(0.8)
    assert out[1].loss == pytest.approx(0.8)
    assert out[1].passed is True


def test_bounds_when_the_ladder_cannot_bracket() -> None:
    first_fails = [branches.Verdict(1.0, None, None), branches.Verdict(2.0, 1.5, False)]
    b, bound, interval = branches.bracket([32, 64], first_fails)
    assert (b, bound) == (32, "at most")
    assert interval.low == 0.0 and interval.high == pytest.approx(32 * math.sqrt(2))
    all_pass = [branches.Verdict(1.0, None, None), branches.Verdict(0.9, 1.0, True),
                branches.Verdict(0.8, 1.0, True)]
    b, bound, interval = branches.bracket([32, 64, 128], all_pass)
    assert (b, bound) == (128, "at least")
    assert interval.low == pytest.approx(128 / math.sqrt(2)) and math.isinf(interval.high)
    assert branches.bracket([32], all_pass[:1])[:2] == (None, "none")
    diverged_b0 = [branches.Verdict(math.inf, None, None), branches.Verdict(1.0, 2.0, True)]
    assert branches.bracket([32, 64], diverged_b0)[:2] == (None, "none")


def test_crossing_is_sqrt2_at_the_default_tolerance() -> None:
    x = branches.crossing(math.sqrt(2))
    assert x == pytest.approx(math.sqrt(2))
    # by definition: (1 + x)/(1 + x/2) equals the tolerance
    for tol in (1.2, 1.5, 1.8):
        x = branches.crossing(tol)
        assert (1 + x) / (1 + x / 2) == pytest.approx(tol)
    with pytest.raises(ValueError):
        branches.crossing(2.0)


@pytest.mark.parametrize("b_crit", [20.0, 100.0, 300.0])
def test_rule_recovers_b_crit_within_sqrt2_on_the_model(b_crit: float) -> None:
    """Curves from S(B) = S_min(1 + B_crit/B): after e examples at batch B the loss is
    f(e / (1 + B/B_crit)), f decreasing; evaluated after every step."""
    b0, delta = 16, 64 * 16

    def curve(b: int) -> list[tuple[int, float]]:
        return [(s * b, math.exp(-(s * b) / (1 + b / b_crit) / 500.0))
                for s in range(1, delta // b + 1)]

    batches = branches.ladder(b0, 10**6, max_factor=32)
    found = branches.verdicts([[curve(b)] for b in batches], delta)
    b, bound, interval = branches.bracket(batches, found)
    assert b is not None and interval.low <= b_crit < interval.high
    if b_crit < b0 * math.sqrt(2):  # the first doubling already fails
        assert (b, bound) == (b0, "at most")
    else:
        assert bound == "bracketed" and b / math.sqrt(2) <= b_crit < b * math.sqrt(2)


def test_ladder_and_evaluation_steps() -> None:
    assert branches.ladder(64, 1797) == [64, 128, 256, 512, 1024]
    assert branches.ladder(32, 10**6) == [32, 64, 128, 256, 512]
    assert branches.ladder(32, 100) == [32, 64]
    assert branches.ladder(256, 100) == [256]  # the baseline itself even above the dataset
    # 64 steps: from ceil(0.5·Δ/√2 / B) = 23 to 64, 12 of them, the last included
    steps = branches.evaluation_steps(64, 32, 64 * 32)
    assert len(steps) == 12 and steps[0] == 23 and steps[-1] == 64
    assert branches.evaluation_steps(4, 512, 64 * 32) == [2, 3, 4]


def test_calibrated_value_and_its_bounds() -> None:
    def result(b: int | None, bound: str, low: float, high: float) -> BranchResult:
        return BranchResult(step=10, examples_seen=640, critical_batch=b, bound=bound,
                            interval=Interval(low, high), baseline_batch=64,
                            delta_examples=4096, tolerance=math.sqrt(2), smoothing=0.5,
                            repeats=3, lr_rule="mccandlish-sqrt", lr_noise_scale=100.0,
                            optimizer_state="carried", rungs=(), b_simple=100.0, b_noise=None,
                            examples=1, seconds=1.0, stopped="failed")

    ci = Interval(50.0, 200.0)

    def value(r: BranchResult, b_n: float) -> float:
        out = branches.calibrated(r, b_n, ci)
        assert out is not None
        return out[0]

    out = branches.calibrated(result(256, "bracketed", 181, 362), 100.0, ci)
    assert out is not None
    assert out[0] == pytest.approx(160.0)  # √(100 · 256)
    assert out[1].low == pytest.approx(math.sqrt(50 * 181))
    assert out[1].high == pytest.approx(math.sqrt(200 * 362))
    # one-sided bounds meet B_n first
    assert value(result(64, "at most", 0, 90.5), 40.0) == 40.0
    assert value(result(64, "at most", 0, 90.5), 400.0) == pytest.approx(160.0)
    assert value(result(1024, "at least", 724, math.inf), 3000.0) == 3000.0
    assert value(result(1024, "at least", 724, math.inf), 256.0) == pytest.approx(512.0)
    # an unresolved noise scale leaves the branches' value
    assert branches.calibrated(result(256, "bracketed", 181, 362), math.inf, ci) == (
        256.0, Interval(181, 362))
    assert branches.calibrated(result(None, "none", math.nan, math.nan), 100.0, ci) is None
    r = result(128, "bracketed", 90.5, 181)
    assert r.ratio_simple == pytest.approx(1.28) and r.ratio_noise is None


def test_run_average_is_the_critical_batch_of_whole_runs_on_the_model() -> None:
    """Stretches of a run with local critical batch b_j = √(read_j · read_j+1) and minimum
    steps S_min,j: a whole run at batch B takes Σ S_min,j (1 + b_j/B) steps. Fitting
    S = S_min + S_min·B_crit/B to those (exact: linear in 1/B) gives the B_crit the run
    average must return from the reads and the steps the run took at B0."""
    reads = [4.0, 10.0, 30.0, 60.0, 200.0]
    s_min = [5.0, 20.0, 40.0, 100.0]
    b0 = 32
    local = [math.sqrt(a * b) for a, b in itertools.pairwise(reads)]
    steps = [0]
    for s, b in zip(s_min, local, strict=True):
        steps.append(steps[-1] + round(s * (1 + b / b0) * 1000))  # exact in integer steps
    s_min = [(b - a) / (1 + lb / b0) for a, b, lb in zip(steps, steps[1:], local, strict=False)]

    def fitted(n: int) -> float:
        batches = [8.0, 16, 64, 256, 1024]
        total = [sum(s * (1 + b / bb) for s, b in zip(s_min[:n], local[:n], strict=True))
                 for bb in batches]
        slope, intercept = np.polyfit([1 / bb for bb in batches], total, 1)
        return float(slope / intercept)

    for n in (1, 2, 4):
        reads_so_far = list(zip(steps, reads, strict=True))[:n + 1]
        assert branches.run_average(reads_so_far, b0) == pytest.approx(fitted(n), rel=1e-9)
    by_hand = sum(s * b for s, b in zip(s_min, local, strict=True)) / sum(s_min)
    assert fitted(4) == pytest.approx(by_hand)  # the weighted mean
    assert branches.run_average([(0, 8.0)], b0) is None
    assert branches.run_average([(5, 8.0), (5, 16.0)], b0) is None


# --------------------------------------------------------------------------- the runs


class OomAbove(nn.Module):
    """A small MLP whose training forward raises CUDA's out-of-memory error above a batch."""

    def __init__(self, limit: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
        self.limit = limit

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and x.shape[0] > self.limit:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return self.net(x)  # type: ignore[no-any-return]


def tiny_job(limit: int = 10**9) -> Workload:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(512, 8, generator=gen)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0).long()
    torch.manual_seed(0)
    model = OomAbove(limit)
    return Workload.from_objects(model, torch.utils.data.TensorDataset(x, y),
                                 nn.functional.cross_entropy, optimizer="adam")


def trained(job: Workload, steps: int = 5) -> torch.optim.Optimizer:
    """An Adam with state, as the run along training leaves it."""
    from bsfind.training import EpochSampler, training_step

    opt = job.make_optimizer(1e-2)
    sampler = EpochSampler(len(job), 8, torch.Generator().manual_seed(1))
    for _ in range(steps):
        training_step(job, opt, sampler.next())
    return opt


def digest(model: nn.Module, opt: torch.optim.Optimizer) -> str:
    """A hash of the weights and of the optimizer's state (not its learning rate)."""
    h = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    for pid, state in sorted(opt.state_dict()["state"].items()):
        for k, v in sorted(state.items()):
            h.update(f"{pid}.{k}".encode())
            h.update(v.detach().cpu().contiguous().numpy().tobytes() if torch.is_tensor(v)
                     else repr(v).encode())
    return h.hexdigest()


# min_fraction=1: the ladder does not go below B0 (test_the_ladder_goes_below_b0 does).
OPTIONS = branches.BranchOptions(baseline_batch=8, lr=1e-2, family="adam", b_n=50.0,
                                 step=5, examples_seen=40, b_simple=50.0, branch_steps=8,
                                 max_factor=4, repeats=2, min_fraction=1)


def test_every_branch_starts_from_the_same_weights_and_optimizer_state() -> None:
    job = tiny_job()
    opt = trained(job)
    before = digest(job.model, opt)
    lr_before = opt.param_groups[0]["lr"]
    seen: list[tuple[int, int, str, float]] = []

    def check(start: branches.BranchStart) -> None:
        seen.append((start.batch_size, start.repeat, digest(start.model, start.optimizer),
                     start.optimizer.param_groups[0]["lr"]))

    r = branches.measure(job, OPTIONS, Deadline.after(60), optimizer=opt, on_branch_start=check)
    assert [(b, rep) for b, rep, _, _ in seen] == [(8, 0), (8, 1), (16, 0), (16, 1),
                                                   (32, 0), (32, 1)][:len(seen)]
    assert len(seen) == 2 * len(r.rungs) and len(r.rungs) >= 2
    assert {d for _, _, d, _ in seen} == {before}  # the same state before every branch
    # the learning rate is the advisor's rule at each rung
    from bsfind.advisor import scaled_lr

    for b, _, _, lr in seen:
        assert lr == pytest.approx(scaled_lr(1e-2, 8, b, 50.0, "adam")[0])
    # restored afterwards: weights, optimizer state and learning rate
    assert digest(job.model, opt) == before
    assert opt.param_groups[0]["lr"] == lr_before
    assert r.optimizer_state == "carried" and r.examples == 2 * 64 * len(r.rungs)
    assert r.rungs[0].repeats == 2 and len(r.rungs[0].losses) == 2
    assert r.b_simple == 50.0 and r.step == 5


def test_the_saved_start_is_a_host_copy_that_no_branch_can_touch() -> None:
    """The weights and the optimizer state the branches restore are copies in host
    memory (on a GPU they leave the device to the runs): equal to the live ones, sharing
    no storage with them, and untouched by the steps that follow a restore (Adam's
    step count is updated in place)."""
    job = tiny_job()
    opt = trained(job)
    saved_model, saved_opt = branches.saved_state(job.model, opt)
    live = [*job.model.state_dict().values(),
            *(t for st in opt.state_dict()["state"].values() for t in st.values())]
    copies = [*saved_model.values(),
              *(t for st in saved_opt["state"].values() for t in st.values())]  # type: ignore[attr-defined]
    assert len(copies) == len(live) and all(c.device.type == "cpu" for c in copies)
    assert all(torch.equal(c, t) for c, t in zip(copies, live, strict=True))
    assert not {c.data_ptr() for c in copies} & {t.data_ptr() for t in live}
    assert saved_opt["param_groups"] == opt.state_dict()["param_groups"]
    before = [c.clone() for c in copies]
    for _ in range(2):  # restore, then train: the saved start must not move
        branches.restore(job.model, opt, saved_model, saved_opt)
        job.loss(torch.arange(8)).backward()
        opt.step()
    assert all(torch.equal(c, b) for c, b in zip(copies, before, strict=True))
    branches.restore(job.model, opt, saved_model, saved_opt)
    assert all(p.grad is None for p in job.model.parameters())
    assert torch.equal(next(iter(opt.state.values()))["step"], before[len(saved_model)])


def test_a_fresh_optimizer_is_said() -> None:
    job = tiny_job()
    r = branches.measure(job, OPTIONS, Deadline.after(60))
    assert r.optimizer_state == "fresh"
    assert any("fresh optimizer state" in n for n in r.notes)


def test_the_same_data_order_at_every_rung() -> None:
    """Rung 2B's batches are the unions of two consecutive batches of B (one seed)."""
    job = tiny_job()
    seen: dict[int, list[torch.Tensor]] = {}
    original = job.loss

    def spy(idx: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled():
            seen.setdefault(len(idx), []).append(idx.clone())
        return original(idx)

    job.loss = spy  # type: ignore[method-assign]
    opts = branches.BranchOptions(baseline_batch=8, lr=1e-2, family="adam", branch_steps=8,
                                  max_factor=2, repeats=1)
    branches.measure(job, opts, Deadline.after(60))
    small, big = torch.cat(seen[8]), torch.cat(seen[16])
    assert torch.equal(small, big)


def test_budget_ends_the_ladder_and_drops_the_cut_rung() -> None:
    """A fake clock that advances one second per branch: the deadline lets two rungs of two
    branches finish, and passes in the third rung's first branch."""
    job = tiny_job()
    opt = trained(job)
    before = digest(job.model, opt)
    now = [0.0]

    def tick(start: branches.BranchStart) -> None:
        now[0] += 1.0

    deadline = Deadline(4.5, clock=lambda: now[0])
    r = branches.measure(job, OPTIONS, deadline, optimizer=opt, on_branch_start=tick)
    assert r.stopped == "budget"
    assert [g.batch_size for g in r.rungs] == [8, 16]
    assert all(g.repeats == 2 for g in r.rungs)
    assert any("time budget" in n for n in r.notes)
    assert digest(job.model, opt) == before
    none = branches.measure(job, OPTIONS, Deadline(0.0, clock=lambda: 1.0), optimizer=opt)
    assert none.critical_batch is None and none.rungs == () and none.stopped == "budget"


def test_a_read_the_budget_cut_short_is_marked_so_wherever_it_is_shown(
        capsys: pytest.CaptureFixture[str]) -> None:
    """A trial's checkpoints: ladders the budget ended after 1-2 doublings read "≥ 32" and
    "≥ 64" in the summary table just as the ladder-top reads "≥ 256" did. Rungs 8 and 16
    finish, the deadline passes in 32: "≥ 16", cut short, in the line, the notes, the JSON
    and the table; a ladder that reached its top is not."""
    import dataclasses

    from bsfind.cli import render_branches
    from bsfind.report import branch_dict
    from bsfind.wording import branch_line

    job = tiny_job()
    opt = trained(job)
    now = [0.0]

    def tick(start: branches.BranchStart) -> None:
        now[0] += 1.0

    r = branches.measure(job, OPTIONS, Deadline(4.5, clock=lambda: now[0]), optimizer=opt,
                         on_branch_start=tick)
    assert (r.critical_batch, r.bound, r.stopped, r.cut_short) == (16, "at least", "budget",
                                                                   True)
    assert branch_line(r).startswith("local critical batch ≥ 16 (B_crit above 11; cut short "
                                     "by the time budget before a rung fell behind)")
    assert ("so ≥ 16 is how far the ladder got before the time budget ended it, not a ladder "
            "top: batch 32 was never compared, and the local critical batch may be well above "
            "16; a larger probe.max_seconds lets the ladder finish") in r.notes
    top = dataclasses.replace(r, stopped="top", step=9, notes=())
    assert not top.cut_short and "cut short" not in branch_line(top)
    docs = [branch_dict(r), branch_dict(top)]
    assert [d["cut_short"] for d in docs] == [True, False]
    capsys.readouterr()
    render_branches({"branches": docs})
    rows = [[c.strip() for c in ln.split("│")[1:-1]] for ln in capsys.readouterr().out
            .split("Local critical batch at each point")[1].splitlines() if ln.startswith("│")]
    assert [(row[0], row[2], row[6]) for row in rows] == [
        ("5", "≥ 16 (cut)", "time budget: cut"), ("9", "≥ 16", "at its top")]


def test_ctrl_c_gives_what_was_measured_marked_interrupted() -> None:
    job = tiny_job()
    opt = trained(job)
    before = digest(job.model, opt)

    def interrupt_at_32(start: branches.BranchStart) -> None:
        if start.batch_size == 32:
            raise KeyboardInterrupt

    with pytest.raises(Interrupted) as info:
        branches.measure(job, OPTIONS, Deadline.after(60), optimizer=opt,
                         on_branch_start=interrupt_at_32)
    partial = info.value.partial
    assert isinstance(partial, BranchResult)
    assert partial.stopped == "interrupted"
    assert [g.batch_size for g in partial.rungs] == [8, 16]
    assert "batch 32" in info.value.message
    assert digest(job.model, opt) == before


def test_a_rung_out_of_memory_accumulates_micro_batches_of_the_last_that_ran() -> None:
    """Batch 16 and 32 do not fit in one forward (the model raises CUDA's error above 8):
    they run as micro-batches of 8, and give the same losses (to float rounding) as the
    ladder on a device where they fit."""
    fits = tiny_job()
    opt = trained(fits)
    whole = branches.measure(fits, OPTIONS, Deadline.after(60), optimizer=opt)
    job = tiny_job(limit=8)
    opt = trained(job)
    before = digest(job.model, opt)
    r = branches.measure(job, OPTIONS, Deadline.after(60), optimizer=opt)
    assert digest(job.model, opt) == before
    assert [g.batch_size for g in r.rungs] == [g.batch_size for g in whole.rungs]
    assert len(r.rungs) >= 2
    assert [g.micro_batch for g in r.rungs] == [None] + [8] * (len(r.rungs) - 1)
    for a, b in zip(r.rungs, whole.rungs, strict=True):
        assert a.losses == pytest.approx(b.losses, rel=1e-5)
    assert (r.critical_batch, r.bound, r.stopped) == (whole.critical_batch, whole.bound,
                                                       whole.stopped)
    assert any("batch 16 did not fit in memory in one forward: it and the rungs above it "
               "accumulated micro-batches of 8" in n for n in r.notes)


def test_out_of_memory_even_in_micro_batches_ends_the_ladder_at_the_previous_rung() -> None:
    job = tiny_job(limit=8)
    opt = trained(job)
    before = digest(job.model, opt)

    def shrink_at_16(start: branches.BranchStart) -> None:
        if start.batch_size == 16:
            job.model.limit = 4  # type: ignore[assignment]  # micro-batches of 8 fail too

    r = branches.measure(job, OPTIONS, Deadline.after(60), optimizer=opt,
                         on_branch_start=shrink_at_16)
    assert r.stopped == "out of memory"
    assert [g.batch_size for g in r.rungs] == [8]
    assert r.critical_batch is None and r.bound == "none"
    assert any("batch 16 ran out of memory: the ladder ended at 8" in n for n in r.notes)
    assert digest(job.model, opt) == before


def _model_branch(b_crit: float) -> Callable[..., list[tuple[int, float]]]:
    """A stand-in for ``branches.run_branch`` whose curves follow S(B) = S_min(1 + B_crit/B):
    after e examples at batch B the loss is exp(-e / (1 + B/B_crit) / 500)."""
    def run(job: Workload, opt: torch.optim.Optimizer, *args: object, batch: int,
            steps: int, at: list[int], on_step: Callable[[int], None] | None = None,
            **kwargs: object) -> list[tuple[int, float]]:
        for _ in range(steps):
            if on_step is not None:
                on_step(batch)
        return [(s * batch, math.exp(-(s * batch) / (1 + batch / b_crit) / 500.0)) for s in at]
    return run


@pytest.mark.parametrize(("b_crit", "expected", "bound"), [
    (60.0, 64, "bracketed"),  # the ladder climbs: 64/√2 <= 60 < 128/√2
    (12.0, 16, "bracketed"),  # 2·B0 = 32 falls behind, 16 keeps up with 8: 16/√2 <= 12
    (7.0, 8, "bracketed"),  # 16 falls behind 8 too, 8 keeps up with 4: 8/√2 <= 7
    (3.0, 4, "bracketed"),  # down to 4 (vs 2): 2.83 <= 3 < 5.66
    (1.5, 2, "at most"),  # B0/8 = 2 is the floor: 4 falls behind 2, B_crit < 2√2
])
def test_the_ladder_goes_below_b0(monkeypatch: pytest.MonkeyPatch, b_crit: float,
                                  expected: int, bound: str) -> None:
    """B0 = 16: when 32 already falls behind, the ladder halves (8, 4, 2 = B0/8) until a
    doubling keeps up, and the bracket holds B_crit."""
    monkeypatch.setattr(branches, "run_branch", _model_branch(b_crit))
    job = tiny_job()
    opts = branches.BranchOptions(baseline_batch=16, lr=1e-2, family="adam", b_n=50.0,
                                  branch_steps=16, max_factor=8, repeats=1)
    r = branches.measure(job, opts, Deadline.after(60))
    assert (r.critical_batch, r.bound) == (expected, bound)
    assert r.interval.low <= b_crit < r.interval.high
    sizes = [g.batch_size for g in r.rungs]
    assert sizes == sorted(sizes)
    # every rung that ran is shown and counted, also those above the first that fell
    # behind (a descent's 16 and 32)
    assert r.examples == len(sizes) * 16 * 16
    if sizes[0] < 16:
        assert r.stopped == "failed" and sizes[-2:] == [16, 32]
        assert [g.passed for g in r.rungs][-1] is False
    assert any("went below" in n or "goes no lower" in n for n in r.notes) == (expected < 16)
    assert branches.below(16) == [8, 4, 2] and branches.below(24) == [12, 6, 3]
    assert branches.below(12, 8) == [6, 3] and branches.below(5) == []
    # never below 2: BatchNorm in training mode cannot normalise one example
    assert branches.below(8) == [4, 2] and branches.below(4) == [2] and branches.below(2) == []


def test_a_baseline_whose_double_exceeds_the_dataset_goes_below_it(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """B0 = 512 on 512 examples: 1024 cannot run, so the ladder goes down from B0 (B_crit
    100: 512 and 256 fall behind, 128 keeps up with 64)."""
    monkeypatch.setattr(branches, "run_branch", _model_branch(100.0))
    opts = branches.BranchOptions(baseline_batch=512, lr=1e-2, family="adam", b_n=50.0,
                                  branch_steps=16, max_factor=8, repeats=1)
    r = branches.measure(tiny_job(), opts, Deadline.after(60))
    assert [g.batch_size for g in r.rungs] == [64, 128, 256, 512]
    assert (r.critical_batch, r.bound, r.stopped) == (128, "bracketed", "failed")
    assert r.interval.low <= 100.0 < r.interval.high
    assert any("batch 1,024 is larger than the dataset: the ladder went below the baseline"
               in n for n in r.notes)


def test_a_rung_below_b0_that_raises_ends_the_descent_and_keeps_the_rest(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """B_crit 3 with B0 = 16 would take the ladder down to 4; a model that cannot run a
    batch of 4 leaves "at most 8", saying why, instead of losing the measurement."""
    model = _model_branch(3.0)

    def run(*args: object, batch: int, **kwargs: object) -> list[tuple[int, float]]:
        if batch < 8:
            raise ValueError("Expected more than 4 values per channel when training\nmore")
        return model(*args, batch=batch, **kwargs)

    monkeypatch.setattr(branches, "run_branch", run)
    opts = branches.BranchOptions(baseline_batch=16, lr=1e-2, family="adam", b_n=50.0,
                                  branch_steps=16, max_factor=8, repeats=1)
    r = branches.measure(tiny_job(), opts, Deadline.after(60))
    assert (r.critical_batch, r.bound, r.stopped) == (8, "at most", "failed")
    assert any("stopped going below the baseline batch: batch 4 raised ValueError (Expected "
               "more than 4 values per channel when training)" in n for n in r.notes)
    assert any("cut short before it could go lower" in n for n in r.notes)


def test_the_budget_in_the_descent_says_where_it_stopped(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A fake clock: one second per branch; the deadline passes inside batch 4's branch."""
    now = [0.0]
    model = _model_branch(3.0)

    def run(*args: object, batch: int, deadline: Deadline, **kwargs: object
            ) -> list[tuple[int, float]]:
        now[0] += 1.0
        if deadline.passed():
            raise branches._OutOfTime
        return model(*args, batch=batch, **kwargs)

    monkeypatch.setattr(branches, "run_branch", run)
    opts = branches.BranchOptions(baseline_batch=16, lr=1e-2, family="adam", b_n=50.0,
                                  branch_steps=16, max_factor=8, repeats=1)
    # rungs 16, 32 (fails), 8 finish at t = 3; batch 4 starts at 3 and passes 3.5
    r = branches.measure(tiny_job(), opts, Deadline(3.5, clock=lambda: now[0]))
    assert r.stopped == "budget" and (r.critical_batch, r.bound) == (8, "at most")
    assert any("the time budget ended the ladder during batch 4 (dropped)" in n
               for n in r.notes)
    assert any("cut short before it could go lower" in n for n in r.notes)


def test_every_rung_is_evaluated_in_chunks_of_the_baseline_batch(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """In training mode a BatchNorm model's loss depends on the chunk: every rung of a
    ladder is evaluated alike, in chunks of B0."""
    chunks: set[int] = set()
    real = branches.evaluate_loss

    def spy(job: Workload, idx: torch.Tensor, chunk: int = 512) -> float | None:
        chunks.add(chunk)
        return real(job, idx, chunk=chunk)

    monkeypatch.setattr(branches, "evaluate_loss", spy)
    job = tiny_job()
    r = branches.measure(job, OPTIONS, Deadline.after(60), optimizer=trained(job))
    assert len(r.rungs) >= 2 and chunks == {8}


def _diverging(diverges: Callable[[int], bool]) -> Workload:
    """tiny_job() whose training loss is NaN at the batch sizes ``diverges`` picks (its
    evaluations, without gradients, stay finite)."""
    job = tiny_job()
    original = job.loss

    def loss(idx: torch.Tensor) -> torch.Tensor:
        value = original(idx)
        return value * math.nan if diverges(len(idx)) and torch.is_grad_enabled() else value

    job.loss = loss  # type: ignore[method-assign]
    return job


def test_a_diverging_rung_fails() -> None:
    job = _diverging(lambda b: b > 8)
    opts = branches.BranchOptions(baseline_batch=8, lr=1e-2, family="sgd", lr_rule="linear",
                                  branch_steps=8, max_factor=4, repeats=1, min_fraction=1)
    r = branches.measure(job, opts, Deadline.after(60))
    assert [g.passed for g in r.rungs] == [None, False]
    assert math.isinf(r.rungs[1].loss)
    assert (r.critical_batch, r.bound) == (8, "at most")
    assert "batch 16 diverged at learning rate 0.02 (linear): a diverged rung falls behind" \
        in r.notes


def test_a_read_above_diverged_rungs_below_b0_is_kept() -> None:
    """Batches 4 and 16 diverge, 8 (B0) does not: 16 fell behind 8, so the local critical
    batch is at most 8, whatever 4 did (a review: "none", and a note that the smallest
    rung left nothing to be held to)."""
    job = _diverging(lambda b: b in (4, 16))
    opts = branches.BranchOptions(baseline_batch=8, lr=1e-2, family="sgd", lr_rule="linear",
                                  branch_steps=8, max_factor=4, repeats=1, min_fraction=2)
    r = branches.measure(job, opts, Deadline.after(60))
    assert [(g.batch_size, g.passed) for g in r.rungs] == [(4, None), (8, None), (16, False)]
    assert (r.critical_batch, r.bound) == (8, "at most")
    assert r.notes[-1] == ("already batch 16 needed more than 1.41x the examples of 8: the "
                           "local critical batch is 8 or below, and below it the ladder "
                           "diverged")


def test_every_rung_diverging_stops_the_ladder_and_says_why() -> None:
    """A trial's hot rate: every rung diverged, and inf <= inf kept the ladder climbing
    with four rungs "kept up"; the note then said fewer than two rungs had finished."""
    job = _diverging(lambda b: True)
    opts = branches.BranchOptions(baseline_batch=8, lr=1e-2, family="sgd", lr_rule="linear",
                                  branch_steps=8, max_factor=8, repeats=1, min_fraction=2)
    r = branches.measure(job, opts, Deadline.after(60))
    assert [g.batch_size for g in r.rungs] == [4, 8, 16]  # 16 fell behind: down to 4
    assert not any(g.passed for g in r.rungs)
    assert (r.critical_batch, r.bound) == (None, "none")
    from bsfind.cli import render_branches, stdout
    from bsfind.report import branch_dict

    with stdout.capture() as shown:
        render_branches({"branches": [branch_dict(r)]})
    assert shown.get().count("diverged") >= 3 and "reference" not in shown.get()
    assert r.notes[-2:] == (
        "batches 4, 8 and 16 diverged at learning rates 0.005–0.02 (linear): a diverged rung "
        "falls behind",
        "the smallest batch (4) diverged, so no rung has a loss to be held to: no local "
        "critical batch (lower optimizer.lr)")


# --------------------------------------------------------------------------- end to end


# One thread: the machine is shared, and tiny models only spin a second one.
ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}


def _start(*args: str) -> subprocess.Popen[str]:
    return start_bsfind(*args, env={"OMP_NUM_THREADS": "1"})


# One probe point after 5 steps, then the branches of a wide MLP: seconds, long enough
# to be interrupted.
SLOW_BRANCHES = ["--set", "model.kwargs.hidden=1024", "--set", "probe.warmup_steps=5",
                 "--set", "probe.max_seconds=120"]
# One probe point after 20 steps (fast), then the branches with most of the budget.
QUICK = ["probe.warmup_steps=20", "probe.max_seconds=60"]


def test_sigint_during_the_branches_prints_them_and_exits_130() -> None:
    pytest.importorskip("sklearn")
    proc = _start("branch", str(CONFIGS / "digits-mlp.yaml"), "--json", *SLOW_BRANCHES)
    wait_for_stderr(proc, "bsfind: branch:")
    time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "interrupted" in err and "Traceback" not in err
    doc = json.loads(out)
    assert doc["status"] == "interrupted"
    assert doc["noise_scale"]["examples"] > 0
    assert doc["branches"][-1]["stopped"] == "interrupted"


def test_branch_command_json_and_table() -> None:
    pytest.importorskip("sklearn")
    proc = subprocess.run(
        [sys.executable, "-m", "bsfind", "branch", str(CONFIGS / "digits-mlp.yaml"), "--json",
         *(a for kv in QUICK for a in ("--set", kv))],
        cwd=ROOT, capture_output=True, text=True, timeout=120, env=ENV)
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["command"] == "branch" and len(doc["branches"]) == 1
    b = doc["branches"][0]
    assert b["critical_batch"] in (64, 128, 256, 512, 1024)
    assert b["bound"] in ("bracketed", "at most", "at least")
    assert b["delta_examples"] == 64 * 64 and b["repeats"] == 3
    assert b["tolerance"] == pytest.approx(math.sqrt(2)) and b["smoothing"] == 0.5
    assert b["ratio_to_b_simple"] == pytest.approx(b["critical_batch"] / b["b_simple"])
    assert "Δ/1.41" in b["rule"] and "local critical batch" in b["summary"]
    assert b["optimizer_state"] == "carried"
    assert b["rungs"][0]["passed"] is None and b["rungs"][0]["learning_rate"] == 8e-3
    assert "recommendation" not in doc
    # the branches trained more than the planned run (10 epochs, 17,970 examples): said
    planned = doc["trajectory"]["planned_examples"]
    assert planned == 17_970 and b["examples"] > planned
    assert (f"the branches trained {b['examples']:,} examples, {b['examples'] / planned:.3g}x "
            f"the planned run's 17,970") in " ".join(doc["warnings"])


def _recommend(extra: list[str]) -> Callable[[], dict]:  # type: ignore[type-arg]
    from bsfind.api import recommend
    from bsfind.report import to_dict
    from bsfind.spec import load_spec

    return lambda: to_dict(recommend(load_spec(CONFIGS / "digits-mlp.yaml", extra)))


def test_recommend_with_branches_uses_the_local_critical_batch() -> None:
    pytest.importorskip("sklearn")
    doc = _recommend(["probe.branches=true", *QUICK])()
    b = doc["branches"][0]
    rec = doc["recommendation"]
    assert "measured by branched runs" in rec["basis"] and "geometric mean" in rec["basis"]
    assert any("local critical batch" in n for n in rec["notes"])
    assert b["critical_batch"] is not None
    assert doc["spec"]["probe"]["branches"] is True
    assert doc["seconds"] <= 60 * 1.1
    assert b["step"] == 20 and doc["recommendation"]["noise_step"] == 20
    # paired with B_simple at the branches' own weights, not the median of the last points
    from bsfind.wording import num

    assert f"geometric mean of B_simple = {num(b['b_simple'])} at step 20 and" in rec["basis"]
    # the value the advice used, as a number (a trial found it only in the basis's words)
    assert rec["b_n"] == pytest.approx(math.sqrt(b["b_simple"] * b["critical_batch"]))
    assert rec["b_n"] != pytest.approx(doc["noise_scale"]["b_simple"])


def test_ctrl_c_after_the_branches_keeps_them(monkeypatch: pytest.MonkeyPatch,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    """Ctrl-C in the hardware analysis, after the branches finished: the partial result
    kept only the noise points (a trial); it has the branches, labelled as measured."""
    pytest.importorskip("sklearn")
    from bsfind.cli import _partial_noise
    from bsfind.results import BranchPartial
    from bsfind.runner import LocalRunner

    def interrupted(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(LocalRunner, "measure_hardware", interrupted)
    with pytest.raises(Interrupted) as info:
        _recommend(["probe.branches=true", *QUICK])()
    partial = info.value.partial
    assert isinstance(partial, BranchPartial) and len(partial.branches) == 1
    assert partial.branches[0].stopped != "interrupted"
    assert "hardware analysis" in info.value.message
    capsys.readouterr()
    _partial_noise(True, "recommend")(partial)
    doc = json.loads(capsys.readouterr().out)
    assert doc["command"] == "recommend" and doc["branches"][0]["critical_batch"] is not None
    assert doc["branch_run_average"] is None  # (one point: no average)
    _partial_noise(False, "recommend")(partial)
    assert capsys.readouterr().out.startswith("measured by the branches: ")


def test_branches_at_each_checkpoint(tmp_path: Path, capsys: pytest.CaptureFixture[str]
                                     ) -> None:
    """model.checkpoints: a ladder from each, with a fresh optimizer state."""
    pytest.importorskip("sklearn")
    from bsfind.api import branch
    from bsfind.spec import load_spec
    from bsfind.training import EpochSampler, train_steps
    from bsfind.workload import build

    spec = load_spec(CONFIGS / "digits-mlp.yaml")
    job = build(spec)
    torch.save(job.model.state_dict(), tmp_path / "a.pt")
    train_steps(job, job.make_optimizer(8e-3), 20,
                EpochSampler(len(job), 64, torch.Generator().manual_seed(0)))
    torch.save(job.model.state_dict(), tmp_path / "b.pt")
    (tmp_path / "spec.yaml").write_text((CONFIGS / "digits-mlp.yaml").read_text())
    spec = load_spec(tmp_path / "spec.yaml", [
        "model.checkpoints=[{path: a.pt, step: 0}, {path: b.pt, step: 20}]",
        "probe.max_seconds=60", "training.epochs=null"])
    report = branch(spec)
    assert [b.step for b in report.branches] == [0, 20]
    assert all(b.optimizer_state == "fresh" for b in report.branches)
    assert [b.b_simple for b in report.branches] == [n.b_simple for n in report.noise]
    # each checkpoint's learning-rate rule reads its own noise scale, not the list's
    assert [b.lr_noise_scale for b in report.branches] == [n.b_simple for n in report.noise]
    # the run's critical batch between the two checkpoints, from their local reads
    reads = [(float(b.step), b.critical_batch) for b in report.branches]
    avg = report.branch_run_average
    assert all(c is not None for _, c in reads)  # digits-mlp: 128 at both (validation.md)
    assert avg is not None and (avg.from_step, avg.to_step) == (0.0, 20.0)
    assert avg.critical_batch == pytest.approx(branches.run_average(reads, 64))
    assert avg.examples == sum(b.examples for b in report.branches)
    from bsfind.report import to_dict

    doc = to_dict(report)["branch_run_average"]
    assert doc["critical_batch"] == pytest.approx(avg.critical_batch)
    assert "the run's critical batch from step 0 to 20" in doc["summary"]
    # the CLI puts the points side by side, then the run average
    from bsfind.cli import _interval_words, render_branches

    capsys.readouterr()
    render_branches(to_dict(report))
    out = capsys.readouterr().out
    assert "Local critical batch at each point" in out and "Run average: the run's" in out
    lines = [ln for ln in out.splitlines() if ln.startswith("│") and "36,864" in ln]
    assert [ln.split("│")[1].strip() for ln in lines[-2:]] == ["0", "20"]
    assert _interval_words(90.5, 181.0) == "90–181" and _interval_words(90.5, None) == "≥ 90"
    assert _interval_words(0.0, 45.3) == "< 45" and _interval_words(None, None) == "—"
    # losses keep 4 significant digits at any size (a user's 20.14, 19.98, 20.03 read "20")
    from bsfind.cli import _loss

    assert [_loss(v) for v in (20.14, 19.98, 0.012345, None)] == ["20.14", "19.98",
                                                                   "0.01235", "∞"]


def test_run_average_of_checkpoints_reads_steps_from_examples() -> None:
    """A checkpoint's examples seen ÷ B0 is its step at the baseline batch; one-sided reads
    are counted and taken at their bound; one read alone gives nothing."""
    from bsfind.wording import run_average_line

    def at(examples: int, b: int | None, bound: str = "bracketed") -> BranchResult:
        return BranchResult(step=0, examples_seen=examples, critical_batch=b, bound=bound,
                            interval=Interval(0.0, 1.0), baseline_batch=32,
                            delta_examples=2048, tolerance=math.sqrt(2), smoothing=0.5,
                            repeats=3, lr_rule="mccandlish-sqrt", lr_noise_scale=None,
                            optimizer_state="fresh", rungs=(), b_simple=None, b_noise=None,
                            examples=100, seconds=1.0, stopped="failed")

    got = branches.run_average_of([at(0, 16, "at most"), at(3200, 64), at(6400, None)], 32)
    assert got is not None
    assert got.reads == ((0.0, 16), (100.0, 64)) and got.one_sided == 1
    assert got.critical_batch == pytest.approx(32.0)  # one stretch: √(16·64)
    assert got.bound == "at most"  # the average grows with each read: a bound too
    assert got.examples == 300 and (got.from_step, got.to_step) == (0.0, 100.0)
    # whole steps are ints in the JSON (a trial read "from_step": 0.0), a fraction stays
    assert [type(v).__name__ for v in (got.from_step, got.to_step)] == ["int", "int"]
    part = branches.run_average_of([at(0, 16), at(3216, 64)], 32)
    assert part is not None and part.to_step == 100.5
    assert "≤ 32" in run_average_line(got)
    exact = branches.run_average_of([at(0, 16), at(3200, 64)], 32)
    assert exact is not None and exact.bound == "estimate" and "≈ 32" in run_average_line(exact)
    both = branches.run_average_of([at(0, 16, "at least"), at(3200, 64, "at most")], 32)
    assert both is not None and both.bound == "none" and both.critical_batch is None
    assert run_average_line(both).startswith("no run average from step 0 to 100")
    assert branches.run_average_of([at(0, 16)], 32) is None


def test_the_run_average_leaves_out_reads_whose_ladders_were_cut_short() -> None:
    """A trial's 5 checkpoints: "≥ 32", "≥ 64", "≥ 64" (the budget ended those ladders)
    were averaged with two ladder tops into "≥ 130". A cut read says how far its ladder
    got, so it is left out, as if its checkpoint were not listed, and the line says so."""
    from bsfind.wording import run_average_line

    def at(examples: int, b: int, bound: str = "bracketed", stopped: str = "failed"
           ) -> BranchResult:
        return BranchResult(step=0, examples_seen=examples, critical_batch=b, bound=bound,
                            interval=Interval(0.0, 1.0), baseline_batch=32,
                            delta_examples=2048, tolerance=math.sqrt(2), smoothing=0.5,
                            repeats=3, lr_rule="mccandlish", lr_noise_scale=None,
                            optimizer_state="fresh", rungs=(), b_simple=None, b_noise=None,
                            examples=100, seconds=1.0, stopped=stopped)

    cut = at(0, 32, "at least", "budget")
    # at an end: the span shrinks to steps 100-200, one stretch of √(64·128) = 90.51
    got = branches.run_average_of([cut, at(3200, 64), at(6400, 128)], 32)
    assert got is not None and got.bound == "estimate"
    assert got.critical_batch == pytest.approx(90.50967)
    assert (got.from_step, got.to_step, got.reads) == (100.0, 200.0, ((100.0, 64), (200.0, 128)))
    assert got.left_out == ((0.0, 32, "at least", "budget"),) and got.examples == 300
    assert run_average_line(got) == (
        "the run's critical batch from step 100 to 200 ≈ 91: the local reads (64 at step 100, "
        "128 at step 200) weighted by the fewest steps each stretch between them needs, as "
        "S(B) fitted to whole runs would give it; left out: the read at step 0 (≥ 32), whose "
        "ladder the time budget cut short before it ended by itself: it says how far the "
        "ladder got, not where the critical batch is, so the average spans steps 100 to 200 "
        "only (a larger probe.max_seconds, or fewer model.checkpoints, lets it finish) "
        "(docs/validation.md: within 2x of the sweeps' B_crit on 17 of 28 points)")
    # inside: one stretch from 0 to 200, √(16·256) = 64 (with the cut read as a bound the
    # stretches 0-100 at √(16·32) and 100-200 at √(32·256) gave "≥ 43.6")
    inside = branches.run_average_of(
        [at(0, 16), at(3200, 32, "at least", "out of memory"), at(6400, 256)], 32)
    assert inside is not None and inside.bound == "estimate"
    assert inside.critical_batch == pytest.approx(64.0)
    assert (inside.from_step, inside.to_step) == (0.0, 200.0)
    assert "left out: the read at step 100 (≥ 32), whose ladder memory cut short" in \
        run_average_line(inside) and "spans" not in run_average_line(inside)
    # a ladder top stays, as a bound: every rung allowed kept up
    top = branches.run_average_of([at(0, 16), at(3200, 512, "at least", "top")], 32)
    assert top is not None and top.bound == "at least" and top.left_out == ()
    assert top.read_bounds == ("bracketed", "at least")
    assert "(16 at step 0, ≥ 512 at step 100)" in run_average_line(top)
    # fewer than two complete reads: no value, and why
    few = branches.run_average_of([cut, at(3200, 64)], 32)
    assert few is not None and few.critical_batch is None and few.bound == "none"
    assert (few.from_step, few.to_step) == (0.0, 100.0)
    assert run_average_line(few) == (
        "no run average from step 0 to 100: left out: the read at step 0 (≥ 32), whose "
        "ladder the time budget cut short before it ended by itself: it says how far the "
        "ladder got, not where the critical batch is (a larger probe.max_seconds, or fewer "
        "model.checkpoints, lets it finish), and fewer than two complete reads remain "
        "(64 at step 100)")


def test_ladders_the_budget_cut_say_how_to_get_complete_reads() -> None:
    """A trial's 5 checkpoints: the budget cut 3 ladders after 1-2 doublings, and nothing
    said what would let them finish. Hand-computed: B0 = 16, 1,797 examples, so the
    ladder is 16-256. The longest rung times at each batch: 16: 1.6, 32: 1.6, 64: 0.9,
    128: 0.6, 256: 0.5 s. Step 0's ladder (16, 32 done) takes 1.6 + 1.6 + 0.9 + 0.6 + 0.5
    = 5.2 s, step 128's (16 done) 1.5 + 1.6 + 0.9 + 0.6 + 0.5 = 5.1 s, step 512's its own
    4.2 s. Three ladders of 5.2 s need 15.6 s of the 13.5 s the branches had: 2.1 s more,
    BRANCH_SHARE (40%) of 5.25 s more of probe.max_seconds, so 65.25, about 70; 13.5 s
    covers 2 complete ladders."""
    from bsfind.pipeline import ladders_cut_note
    from bsfind.results import BranchRung

    def rung(b: int, seconds: float) -> BranchRung:
        return BranchRung(batch_size=b, learning_rate=0.05, steps=1024 // b, repeats=3,
                          loss=0.1, reference=None, passed=None, seconds=seconds)

    def at(step: int, rungs: tuple[BranchRung, ...], stopped: str, seconds: float
           ) -> BranchResult:
        return BranchResult(step=step, examples_seen=step * 16, critical_batch=None,
                            bound="none", interval=Interval(0.0, 1.0), baseline_batch=16,
                            delta_examples=1024, tolerance=math.sqrt(2), smoothing=0.5,
                            repeats=3, lr_rule="mccandlish", lr_noise_scale=None,
                            optimizer_state="fresh", rungs=rungs, b_simple=None,
                            b_noise=None, examples=100, seconds=seconds, stopped=stopped)

    done = [at(0, (rung(16, 1.6), rung(32, 1.6)), "budget", 4.5),
            at(128, (rung(16, 1.5),), "budget", 4.5),
            at(512, (rung(16, 1.2), rung(32, 1.0), rung(64, 0.9), rung(128, 0.6),
                     rung(256, 0.5)), "top", 4.2)]
    note = ladders_cut_note(done, had=13.5, baseline_batch=16, dataset_size=1797,
                            max_seconds=60, checkpoints=True)
    assert note == (
        "the time budget cut the ladders at steps 0 and 128 short before they ended by "
        "themselves: the branches had 13.5 s of probe.max_seconds = 60 s, 4.5 s for each of "
        "3 ladders, and a complete ladder takes about 5.2 s here; for complete reads set "
        "probe.max_seconds to about 70, or keep at most 2 of the 3 model.checkpoints")
    # one ladder along training: no checkpoints to drop; 16: 3 s done, the rest at its
    # slowest rung: 4 x 3 = 12 s more, 15 s in all: (15 - 9.3) / 0.4 = 14.25 s more
    one = ladders_cut_note([at(20, (rung(16, 3.0),), "budget", 9.3)], had=9.3,
                           baseline_batch=16, dataset_size=1797, max_seconds=30,
                           checkpoints=False)
    assert one == (
        "the time budget cut the ladder at step 20 short before it ended by itself: the "
        "branches had 9.3 s of probe.max_seconds = 30 s, and a complete ladder takes about "
        "15 s here; for complete reads set probe.max_seconds to about 50")
    assert ladders_cut_note(done[2:], had=13.5, baseline_batch=16, dataset_size=1797,
                            max_seconds=60, checkpoints=True) is None
    # no rung finished (a trial: 0.033 s x 5 rungs read "165 ms" for a ladder of 10-15 s):
    # its 100 examples in 0.5 s, and a ladder's 3 x 1,024 x 5 = 15,360: 76.8 s, so
    # (76.8 - 0.5) / 0.4 = 190.75 s more than 12: about 210
    none = ladders_cut_note([at(20, (), "budget", 0.5)], had=0.5, baseline_batch=16,
                            dataset_size=1797, max_seconds=12, checkpoints=False)
    assert none is not None and none.endswith("takes about 76.8 s here; for complete "
                                              "reads set probe.max_seconds to about 210"), none
    # a rung above the last finished one is costed at that one's time, not the slowest's
    # (B0's): 3.0 + 1.0 + 3 x 1.0 = 7 s, (7 - 4) / 0.4 = 7.5 s more than 30: about 40
    two = ladders_cut_note([at(20, (rung(16, 3.0), rung(32, 1.0)), "budget", 4.0)], had=4.0,
                           baseline_batch=16, dataset_size=1797, max_seconds=30,
                           checkpoints=False)
    assert two is not None and two.endswith("takes about 7 s here; for complete reads set "
                                            "probe.max_seconds to about 40"), two


def test_checkpoint_files_are_checked_before_anything_is_measured(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A missing last checkpoint ends the run at the build, not after the first ones were
    measured; validate loads each one (a checkpoint of another model is named), and
    leaves the model's weights as they were."""
    pytest.importorskip("sklearn")
    from bsfind.api import branch, validate
    from bsfind.errors import ResolutionError
    from bsfind.spec import load_spec
    from bsfind.workload import build

    spec = load_spec(CONFIGS / "digits-mlp.yaml")
    torch.save(build(spec).model.state_dict(), tmp_path / "a.pt")
    torch.save(nn.Linear(3, 2).state_dict(), tmp_path / "other.pt")
    (tmp_path / "spec.yaml").write_text((CONFIGS / "digits-mlp.yaml").read_text())
    missing = load_spec(tmp_path / "spec.yaml", [
        "model.checkpoints=[{path: a.pt, step: 0}, {path: nope.pt, step: 20}]",
        "probe.max_seconds=60"])
    from bsfind.noise import probe

    def measured(*args: object, **kwargs: object) -> None:
        raise AssertionError("something was measured before the files were checked")

    monkeypatch.setattr(probe.NoiseProbe, "run", measured)
    monkeypatch.setattr(branches, "measure", measured)
    with pytest.raises(ResolutionError, match=r"model.checkpoints\[1\].path: file not found"):
        branch(missing)
    with pytest.raises(ResolutionError, match=r"model.checkpoints\[1\].path: file not found"):
        validate(missing)
    other = load_spec(tmp_path / "spec.yaml", [
        "model.checkpoints=[{path: a.pt, step: 0}, {path: other.pt, step: 20}]"])
    with pytest.raises(ResolutionError,
                       match=r"model.checkpoints\[1\].path .*other.pt does not match the model"):
        validate(other)
    ok = load_spec(tmp_path / "spec.yaml", ["model.checkpoints=[{path: a.pt, step: 0}]"])
    assert validate(ok).dataset_size == 1797


def test_a_verdict_the_data_orders_disagree_on_is_flagged(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Data order 0 follows B_crit 60, order 1 B_crit 20: from 32 (32/√2 = 22.6) up to
    64, order 0 keeps up and order 1 falls behind; wherever the mean puts the verdict, a
    deciding rung is split, and the note says the read may be lower or higher. Orders that agree
    (both B_crit 60) give no such note."""
    def split(b_crits: tuple[float, float]) -> Callable[..., list[tuple[int, float]]]:
        models = [_model_branch(b) for b in b_crits]

        def run(*args: object, repeat: int, **kwargs: object) -> list[tuple[int, float]]:
            return models[repeat](*args, **kwargs)
        return run

    opts = branches.BranchOptions(baseline_batch=16, lr=1e-2, family="adam", b_n=50.0,
                                  branch_steps=16, max_factor=8, repeats=2)
    monkeypatch.setattr(branches, "run_branch", split((60.0, 20.0)))
    r = branches.measure(tiny_job(), opts, Deadline.after(60))
    said = [n for n in r.notes if "the data orders disagree at batch" in n]
    assert len(said) == 1 and "may be lower or higher than read" in said[0]
    monkeypatch.setattr(branches, "run_branch", split((60.0, 60.0)))
    r = branches.measure(tiny_job(), opts, Deadline.after(60))
    assert r.critical_batch == 64 and not any("disagree" in n for n in r.notes)


def test_a_split_verdict_below_the_deciding_rungs_is_flagged_too(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Flat curves with these losses per data order: 32 keeps up on the mean (0.975 <= 1)
    but not in order 1 (1.05 > 1); 64 keeps up in both; 128 falls behind in both. The
    read is 64, and the split at 32 is named: had order 1 ruled, the read would be 16."""
    losses = {16: (1.0, 1.0), 32: (0.9, 1.05), 64: (0.8, 0.9), 128: (1.0, 1.1)}

    def run(*args: object, batch: int, repeat: int, steps: int, at: list[int],
            on_step: Callable[[int], None] | None = None, **kwargs: object
            ) -> list[tuple[int, float]]:
        return [(s * batch, losses[batch][repeat]) for s in at]

    monkeypatch.setattr(branches, "run_branch", run)
    opts = branches.BranchOptions(baseline_batch=16, lr=1e-2, family="adam", b_n=50.0,
                                  branch_steps=16, max_factor=8, repeats=2)
    r = branches.measure(tiny_job(), opts, Deadline.after(60))
    assert (r.critical_batch, r.bound) == (64, "bracketed")
    said = [n for n in r.notes if "the data orders disagree at batch" in n]
    assert len(said) == 1 and said[0].startswith("the data orders disagree at batch 32 (")


def test_an_unresolved_noise_scale_gives_the_rule_its_lower_bound() -> None:
    """The rule's rate grows with B_n: an unresolved B_simple is at least the largest batch
    probed (or its interval's low end), as the advisor takes it, not infinite."""
    from bsfind.pipeline import lr_noise_scale
    from bsfind.results import NoiseEstimate

    def est(low: float) -> NoiseEstimate:
        return NoiseEstimate(b_simple=None, ci95=Interval(low, math.inf), grad_norm_sq=0.0,
                             grad_norm_sq_ci95=Interval(-1.0, 1.0), trace_sigma=1.0,
                             trace_sigma_ci95=Interval(0.5, 2.0), method="per-example",
                             method_reason="", b_small=8, b_big=256, examples=2560,
                             rounds=10, seconds=1.0, stopped="budget")

    job = tiny_job()
    assert lr_noise_scale(job, est(300.0)) == 300.0
    assert lr_noise_scale(job, est(math.nan)) == 256.0
    assert lr_noise_scale(job, est(40.0)) == 256.0


def test_the_branch_read_is_paired_with_the_noise_scale_at_its_own_weights() -> None:
    """A trial's basis: "the geometric mean of B_simple = 107 and the local critical batch
    ≥ 256 ... from step 1,123", 107 being the median of steps 256, 512 and 1,123 (107, 43,
    115), while B_simple at step 1,123, where the branches ran, was 115. docs/validation.md
    paired each read with the basis at its own weights: √(115 · 256) = 171.58 (was
    √(107 · 256) = 165.5); its interval's low end √(105 · 181.02) = 137.866, no high end.
    The schedule's points are scaled by 171.58/115, so step 1,123's becomes 171.58."""
    import dataclasses

    from bsfind.advisor import AdvisorInputs
    from bsfind.pipeline import branch_pair, calibrated_inputs, calibrated_points
    from bsfind.results import NoiseEstimate

    def point(step: int, b: float, low: float, high: float) -> NoiseEstimate:
        return NoiseEstimate(b_simple=b, ci95=Interval(low, high), grad_norm_sq=1.0,
                             grad_norm_sq_ci95=Interval(0.5, 2.0), trace_sigma=1.0,
                             trace_sigma_ci95=Interval(0.5, 2.0), method="per-example",
                             method_reason="", b_small=16, b_big=256, examples=2560,
                             rounds=10, seconds=1.0, stopped="converged", step=step,
                             examples_seen=16 * step)

    points = (point(256, 107.0, 97.0, 119.0), point(512, 43.0, 39.0, 48.0),
              point(1123, 115.0, 105.0, 128.0))
    measured = AdvisorInputs(b_n=107.0, b_n_ci=Interval(39.0, 128.0), basis="b_simple",
                             noise_step=256, noise_summary_of=(256, 512, 1123),
                             baseline_batch=16, baseline_lr=0.05, optimizer_family="sgd",
                             dataset_size=1797)
    r = _read_at_1123(256, examples=15360, seconds=4.0, stopped="top")
    pair = branch_pair(points, r, measured)
    assert pair == (115.0, Interval(105.0, 128.0), False, True)
    got = calibrated_inputs(measured, (r,), pair)
    assert got.b_n == pytest.approx(171.5809)
    assert got.b_n_ci.low == pytest.approx(137.866, rel=1e-5) and math.isinf(got.b_n_ci.high)
    assert (got.basis, got.noise_step, got.noise_summary_of) == ("branches", 1123, ())
    scaled = calibrated_points(points, measured, got, pair.b_n)
    assert [p.b_simple for p in scaled] == pytest.approx(
        [107 * 171.5809 / 115, 43 * 171.5809 / 115, 171.5809], rel=1e-6)
    # no point at the branches' weights: the advisor's B_n, and the pair says so
    elsewhere = dataclasses.replace(r, step=1000, examples_seen=16000)
    assert branch_pair(points, elsewhere, measured) == (107.0, Interval(39.0, 128.0), False,
                                                        False)


def _read_at_1123(critical: int, *, examples: int, seconds: float, stopped: str
                  ) -> BranchResult:
    """A one-sided branch read "≥ critical" at a trial's step 1,123 (B0 = 16, B_simple 115)."""
    return BranchResult(step=1123, examples_seen=17968, critical_batch=critical,
                        bound="at least", interval=Interval(critical / math.sqrt(2), math.inf),
                        baseline_batch=16, delta_examples=1024, tolerance=math.sqrt(2),
                        smoothing=0.5, repeats=3, lr_rule="mccandlish", lr_noise_scale=115.0,
                        optimizer_state="fresh", rungs=(), b_simple=115.0, b_noise=None,
                        examples=examples, seconds=seconds, stopped=stopped)


def test_a_bound_on_the_side_the_noise_scale_lies_is_said_to_move_nothing() -> None:
    """A run with every ladder cut: "B_n = 115, the geometric mean of B_simple = 115 and
    the local critical batch ≥ 32": ≥ 32 meets B_simple first (max(115, 32) = 115), so
    B_n is B_simple's, √(115 · 115), not a mean with 32 (61). The basis says so; a bound
    above it is still a mean: ≥ 256 gives √(115 · 256) = 172."""
    import dataclasses

    from bsfind import advisor
    from bsfind.pipeline import BranchPair, calibrated_inputs
    from bsfind.results import TimingCurve
    from bsfind.wording import describe_advice, with_branches

    measured = advisor.AdvisorInputs(
        b_n=115.0, b_n_ci=Interval(105.0, 128.0), basis="b_simple", noise_step=1123,
        baseline_batch=16, baseline_lr=0.05, optimizer_family="sgd", dataset_size=1797,
        timing=TimingCurve(points=(), t0=7e-4, per_example=3.3e-5, r2=1.0,
                           source="measured"))
    r = _read_at_1123(32, examples=7744, seconds=4.2, stopped="budget")
    pair = BranchPair(115.0, Interval(105.0, 128.0), False, True)

    def basis(read: BranchResult) -> str:
        inputs = calibrated_inputs(measured, (read,), pair)
        advice = describe_advice(advisor.advise(inputs), inputs)
        return with_branches(advice, inputs, read, 115.0, "B_simple",
                             same_weights=True).recommendation.basis

    assert basis(r).startswith(
        "B_n = 115 (95% range 49–∞), B_simple at step 1,123: the local critical batch ≥ 32 "
        "(cut short by the time budget before a rung fell behind) measured by branched runs "
        "from step 1,123 is a lower bound below it, so it moves nothing; step time")
    top = dataclasses.replace(r, critical_batch=256, stopped="top",
                              interval=Interval(256 / math.sqrt(2), math.inf))
    assert basis(top).startswith(
        "B_n = 172 (95% range 138–∞), the geometric mean of B_simple = 115 at step 1,123 and "
        "the local critical batch ≥ 256 measured by branched runs from step 1,123; step time")


def test_a_ladder_the_budget_cut_after_one_rung_says_to_raise_the_budget() -> None:
    """One rung finished, then the budget ended: no local critical batch, and the note
    says what would give one (a new user's branch at 30 s said nothing)."""
    job = tiny_job()
    opt = trained(job)
    now = [0.0]

    def tick(start: branches.BranchStart) -> None:
        now[0] += 1.0

    reps = OPTIONS.repeats
    r = branches.measure(job, OPTIONS, Deadline(reps + 0.5, clock=lambda: now[0]),
                         optimizer=opt, on_branch_start=tick)
    assert r.stopped == "budget" and len(r.rungs) == 1
    assert r.critical_batch is None and r.bound == "none"
    assert any("the time budget ended the ladder (a larger probe.max_seconds lets it climb)"
               in n for n in r.notes)


def test_a_diverged_rung_falls_behind_even_a_diverged_reference() -> None:
    """inf <= inf passed: a trial's ladder at a hot rate marked four diverged rungs
    "kept up" and climbed on for 13 s."""
    inf = math.inf
    r0 = [[(8, inf), (16, inf)]]
    r1 = [[(16, inf)]]
    r2 = [[(8, 0.6), (16, 0.5)]]
    out = branches.verdicts([r0, r1, r2], 16, tolerance=math.sqrt(2), smoothing=0.5)
    assert [v.passed for v in out] == [None, False]
    assert branches.bracket([32, 64], out)[1] == "none"
    # a finite rung above a diverged one is held to nothing: the next one's reference
    # (a review: it "kept up" with an infinite loss, and the read was thrown away)
    r3 = [[(8, 0.9), (16, 0.8)]]
    out = branches.verdicts([r1, r2, r3], 16, tolerance=math.sqrt(2), smoothing=0.5)
    assert [v.passed for v in out] == [None, None, False]
    assert branches.bracket([16, 32, 64], out)[:2] == (32, "at most")
