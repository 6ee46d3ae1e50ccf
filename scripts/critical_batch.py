"""Measure the critical batch size by training, and set bsfind's probes beside it.

    .venv/bin/python scripts/critical_batch.py configs/digits-mlp.yaml \
        --targets 0.3,0.1,0.03 --max-steps 6000

For every batch size (powers of two, 4..512 by default) and a small learning-rate
grid around the baseline LR scaled by the optimizer family's rule (sqrt for Adam,
linear for SGD), train from the SAME initial weights with >= 2 data orders and
record the optimizer steps at which the training loss (on a fixed evaluation
subset) first reaches each target. The best LR per (batch, target) is the one
with the fewest steps averaged over seeds; when it sits on the grid's edge the
grid is extended one step that way (``--extend`` times at most). Per target,
S(B) = S_min·(1 + B_crit/B) (McCandlish et al. 2018, eq. 2.11) is fitted in
its 1/B-linear form S = S_min + S_min·B_crit/B.

Beside each fit: bsfind's NoiseProbe (B_simple) and CurvatureProbe (B_noise)
run at the weights where a baseline-batch, baseline-LR run (seed 0) first
reached that target, i.e. at the point of training the B_crit describes.

Writes PREFIX.md (tables), PREFIX.json (every run) and PREFIX.png (steps vs
batch, log-log, with the fits; B_crit vs the probes), PREFIX defaulting to
docs/img/critical-batch-<spec name>. Seeded throughout; only wall-clock
numbers vary between runs.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import _train
import numpy as np
import torch
from _train import CriticalFit, TargetRun, fit_critical, fmt_num

from bsfind.api import noise_scale_at
from bsfind.budget import Deadline
from bsfind.noise.curvature import CurvatureProbe
from bsfind.noise.estimators import RatioAccumulator
from bsfind.pipeline import probe_options
from bsfind.seeds import Seeds
from bsfind.spec import Spec
from bsfind.workload import Workload

DEFAULT_BATCHES = "4,8,16,32,64,128,256,512"
DEFAULT_LR_MULTS = "0.5,1,2"
# A run at batch 2B slower than this × the best at B is stuck, not tuned (see run_batch).
SMALLER_BATCH_MARGIN = 2.0

Log = Callable[[str], None]


@dataclass(frozen=True)
class ProbePoint:
    """bsfind's noise scales at the weights where the baseline run reached a target."""

    target: float
    seed: int  # data order of the baseline-batch run the weights come from
    step: int  # its optimizer steps when the target was first reached
    b_simple: float | None
    b_simple_ci: tuple[float, float]
    b_simple_rounds: int
    b_noise: float | None
    b_noise_ci: tuple[float, float] | None
    b_noise_rounds: int
    seconds: float
    at_crossing: bool = True  # False: a neighbouring checkpoint of the pooling window
    # Unbiased means behind the ratios, for pooling over checkpoints.
    trace_sigma: float = math.nan
    grad_norm_sq: float = math.nan
    trace_h_sigma: float = math.nan
    gthg: float = math.nan


@dataclass(frozen=True)
class Pooled:
    """Noise scales over the checkpoints around a target's crossing (all probe runs).

    Each checkpoint's value is itself a well-resolved ratio (±~10%); what varies
    is the noise scale along the trajectory (|G|² moves 10x or more between
    neighbouring checkpoints at a hot learning rate). The median and range
    summarise that distribution. ``*_rom`` is the ratio of the mean numerators
    to the mean denominators over checkpoints (what an EMA over training would
    give): the checkpoints with the largest |G|² dominate it.
    """

    b_simple: float | None  # median over checkpoints
    b_simple_range: tuple[float, float]
    b_noise: float | None
    b_noise_range: tuple[float, float] | None
    b_simple_rom: float | None
    b_noise_rom: float | None
    checkpoints: int
    steps: tuple[int, int]  # first and last checkpoint step


@dataclass
class BatchResult:
    """All runs at one batch size and, per target, the best LR's mean steps."""

    batch_size: int
    runs: list[TargetRun]
    best_steps: dict[float, float | None]  # target -> mean steps over seeds (best LR)
    best_lr: dict[float, float | None]
    lr_grid: list[float]
    edge: dict[float, bool]  # best LR on the (final) grid's edge: the true optimum may lie out


@dataclass
class CriticalResult:
    name: str
    optimizer: str
    baseline_batch: int
    baseline_lr: float
    lr_exponent: float
    targets: list[float]
    seeds: int
    batches: list[BatchResult]
    fits: dict[float, CriticalFit | None]
    probes: dict[float, list[ProbePoint]]  # per probe run (data order) and window checkpoint
    pooled: dict[float, Pooled | None]
    settings: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0


# --------------------------------------------------------------------------- the grid


def _mean_steps(runs: Sequence[TargetRun], target: float) -> float | None:
    values = [r.crossings[target] for r in runs]
    if not values or any(v is None for v in values):
        return None
    return float(np.mean([v for v in values if v is not None]))


def run_batch(
    job: Workload,
    init_state: _train.State,
    *,
    batch_size: int,
    centre_lr: float,
    lr_mults: Sequence[float],
    extend: int,
    seeds: int,
    targets: Sequence[float],
    max_steps: int,
    eval_idx: torch.Tensor,
    eval_frac: float,
    smaller: dict[float, float | None] | None = None,
    log: Log | None = None,
) -> BatchResult:
    """The LR grid at one batch size: every seed at every LR, pruned when beaten.

    ``smaller``: best steps per target at the next smaller batch. With tuned LRs
    S(B) does not grow with B, so a run past SMALLER_BATCH_MARGIN × that is
    stuck (dead units, too small an LR) and is stopped.
    """
    by_lr: dict[float, list[TargetRun]] = {}
    best: dict[float, float] = {}  # target -> best mean steps so far
    smaller = smaller or {}

    def give_up(t: float) -> float:
        # Exact pruning: with n seeds, a seed past n·best cannot bring the mean below best.
        limit = seeds * best[t] if t in best else math.inf
        prev = smaller.get(t)
        if prev is not None:
            limit = min(limit, seeds * SMALLER_BATCH_MARGIN * prev)
        return limit

    def run_lr(mult: float) -> None:
        lr = centre_lr * mult
        runs = []
        for seed in range(seeds):
            r = _train.train_to_targets(
                job, init_state, batch_size=batch_size, lr=lr, seed=seed, targets=targets,
                max_steps=max_steps, eval_idx=eval_idx, eval_frac=eval_frac, give_up=give_up,
            )
            runs.append(r)
            if log:
                reached = ", ".join(f"{t:g}@{fmt_num(v, 4)}" for t, v in r.crossings.items())
                flag = "DIVERGED " if r.diverged else "STALLED " if r.stalled else ""
                log(f"  B={batch_size:<4} lr={lr:.3g} seed={seed} steps={r.steps} "
                    f"{flag}[{reached}] {r.seconds:.1f}s")
        by_lr[mult] = runs
        for t in targets:
            m = _mean_steps(runs, t)
            if m is not None and m < best.get(t, math.inf):
                best[t] = m

    mults = sorted(lr_mults, key=lambda m: abs(math.log(m)))  # the centre first
    for m in mults:
        run_lr(m)
    # Extend the grid while the best LR of some target sits on an edge.
    for _ in range(extend):
        grid = sorted(by_lr)
        step_down, step_up = grid[0] / grid[1], grid[-1] / grid[-2]
        grow: set[float] = set()
        for t in targets:
            means = {m: _mean_steps(by_lr[m], t) for m in grid}
            done = {m: v for m, v in means.items() if v is not None}
            if not done:
                # Nothing reached it: go down if the smallest LR diverged, up if the
                # largest is still stable (too slow), else give up on this target.
                if any(r.diverged for r in by_lr[grid[0]]):
                    grow.add(grid[0] * step_down)
                elif not any(r.diverged for r in by_lr[grid[-1]]):
                    grow.add(grid[-1] * step_up)
                continue
            arg = min(done, key=lambda m: done[m])
            if arg == grid[-1] and not any(r.diverged for r in by_lr[arg]):
                grow.add(grid[-1] * step_up)
            elif arg == grid[0]:
                grow.add(grid[0] * step_down)
        if not grow:
            break
        for m in sorted(grow):
            run_lr(m)
    grid = sorted(by_lr)
    best_steps: dict[float, float | None] = {}
    best_lr: dict[float, float | None] = {}
    edge: dict[float, bool] = {}
    for t in targets:
        done = {m: v for m in grid if (v := _mean_steps(by_lr[m], t)) is not None}
        if not done:
            best_steps[t], best_lr[t], edge[t] = None, None, False
            continue
        arg = min(done, key=lambda m: done[m])
        best_steps[t], best_lr[t] = done[arg], centre_lr * arg
        edge[t] = len(grid) > 1 and arg in (grid[0], grid[-1])
    return BatchResult(
        batch_size=batch_size, runs=[r for m in grid for r in by_lr[m]],
        best_steps=best_steps, best_lr=best_lr, lr_grid=[centre_lr * m for m in grid],
        edge=edge,
    )


def probe_at(
    job: Workload,
    state: _train.State,
    *,
    target: float,
    seed: int,
    step: int,
    spec: Spec,
    seconds: float,
    curvature: bool,
    curv_batch: int,
    at_crossing: bool = True,
) -> ProbePoint:
    """bsfind's B_simple (and B_noise) at saved weights, as ``bsfind noise`` measures them."""
    _train.restore(job.model, state)
    start = time.perf_counter()
    est = noise_scale_at(job, probe_options(spec), seed=spec.probe.seed, step=step,
                         max_seconds=seconds)
    b_noise, b_noise_ci, b_noise_rounds = None, None, 0
    trace_h_sigma = gthg = math.nan
    if curvature:
        # B_noise at its own batch (curv_batch) rather than the spec's: seeded as
        # ``bsfind noise`` seeds it at this step.
        cp = CurvatureProbe(job, batch_size=curv_batch, seed=Seeds(spec.probe.seed).curvature(step),
                            target_rel_error=spec.probe.target_rel_error, step=step)
        res = cp.run(Deadline.after(seconds))
        b_noise, b_noise_rounds = res.b_noise, res.rounds
        b_noise_ci = (res.ci95.low, res.ci95.high)
        trace_h_sigma, gthg = res.trace_h_sigma, res.gthg
    return ProbePoint(
        target=target, seed=seed, step=step, b_simple=est.b_simple,
        b_simple_ci=(est.ci95.low, est.ci95.high), b_simple_rounds=est.rounds,
        at_crossing=at_crossing, trace_sigma=est.trace_sigma, grad_norm_sq=est.grad_norm_sq,
        trace_h_sigma=trace_h_sigma, gthg=gthg,
        b_noise=b_noise, b_noise_ci=b_noise_ci, b_noise_rounds=b_noise_rounds,
        seconds=time.perf_counter() - start,
    )


def pool(points: Sequence[ProbePoint]) -> Pooled | None:
    """Median and range of the checkpoints' noise scales, plus the ratio of means."""
    if len(points) < 2:
        return None
    simple = [p.b_simple for p in points if p.b_simple is not None]
    noise = [p.b_noise for p in points if p.b_noise is not None]
    rom_s, rom_n = RatioAccumulator(), RatioAccumulator()
    for p in points:
        if math.isfinite(p.trace_sigma) and math.isfinite(p.grad_norm_sq):
            rom_s.add(p.trace_sigma, p.grad_norm_sq)
        if math.isfinite(p.trace_h_sigma) and math.isfinite(p.gthg):
            rom_n.add(p.trace_h_sigma, p.gthg)

    def rom(acc: RatioAccumulator) -> float | None:
        if not len(acc):
            return None
        mn, md = acc.moments()[:2]
        return mn / md if md > 0 else None

    steps = [p.step for p in points]
    return Pooled(
        b_simple=float(np.median(simple)) if simple else None,
        b_simple_range=(min(simple), max(simple)) if simple else (math.nan, math.nan),
        b_noise=float(np.median(noise)) if noise else None,
        b_noise_range=(min(noise), max(noise)) if noise else None,
        b_simple_rom=rom(rom_s), b_noise_rom=rom(rom_n),
        checkpoints=len(points), steps=(min(steps), max(steps)),
    )


def window_steps(crossing: int, available: Sequence[int], width: float, points: int) -> list[int]:
    """Up to ``points - 1`` checkpoint steps in [s/(1+width), s·(1+width)] besides s,
    spread evenly over what is available (the crossing itself is probed anyway)."""
    near = [s for s in available
            if crossing / (1 + width) <= s <= crossing * (1 + width) and s != crossing]
    if len(near) <= points - 1:
        return near
    pick = np.linspace(0, len(near) - 1, points - 1).round().astype(int)
    return [near[i] for i in sorted(set(pick.tolist()))]


def gather(
    spec: Spec,
    job: Workload,
    *,
    batches: Sequence[int],
    lr_mults: Sequence[float],
    seeds: int,
    targets: Sequence[float],
    max_steps: int,
    extend: int = 6,
    probe_lr: str = "tuned",
    probe_seeds: int = 2,
    window: float = 0.25,
    window_points: int = 5,
    window_seconds: float = 3.0,
    eval_examples: int = 512,
    eval_frac: float = 0.03,
    probe_seconds: float = 20.0,
    curvature: bool = True,
    curv_batch: int = 256,
    name: str = "problem",
    log: Log | None = None,
) -> CriticalResult:
    """Run the whole experiment and return its numbers (nothing printed but ``log``)."""
    start = time.perf_counter()
    targets = sorted(targets, reverse=True)
    init_state = _train.snapshot(job.model)
    n = len(job)
    gen = torch.Generator().manual_seed(Seeds(spec.probe.seed).evaluation_subset)
    eval_idx = torch.randperm(n, generator=gen)[: min(eval_examples, n)].sort().values
    b0, lr0 = spec.optimizer.batch_size, spec.optimizer.lr
    expo = _train.lr_exponent(spec.optimizer.name)

    results: list[BatchResult] = []
    for b in sorted(batches):
        if log:
            log(f"batch {b}:")
        results.append(run_batch(
            job, init_state, batch_size=b, centre_lr=_train.scaled_lr(lr0, b0, b, expo),
            lr_mults=lr_mults, extend=extend, seeds=seeds, targets=targets,
            max_steps=max_steps, eval_idx=eval_idx, eval_frac=eval_frac,
            smaller=results[-1].best_steps if results else None, log=log,
        ))
    # The probe points: a run at the baseline batch (seed 0) that saves its weights when
    # each target is first reached. "tuned": at the LR the grid found best at B0 for the
    # lowest target (the S(B) curve is for tuned LRs, and the noise scale depends on the
    # LR the weights were trained with); "baseline": at the spec's lr0.
    probe_lr_value = lr0
    at_b0 = [r for r in results if r.batch_size == b0]
    if probe_lr == "tuned" and at_b0:
        probe_lr_value = float(at_b0[0].best_lr[targets[-1]] or lr0)
    crossed: dict[tuple[float, int], int] = {}  # (target, seed) -> step
    snaps: dict[tuple[int, int], _train.State] = {}  # (seed, step) -> weights
    for seed in range(probe_seeds):
        if log:
            log(f"probe run: B={b0} lr={probe_lr_value:.3g} ({probe_lr}) seed={seed}")

        def on_cross(t: float, step: int, seed: int = seed) -> None:
            crossed[(t, seed)] = step

        def on_eval(step: int, loss: float, seed: int = seed) -> None:
            snaps[(seed, step)] = _train.snapshot(job.model)

        _train.train_to_targets(job, init_state, batch_size=b0, lr=probe_lr_value, seed=seed,
                                targets=targets, max_steps=max_steps, eval_idx=eval_idx,
                                eval_frac=eval_frac, on_cross=on_cross, on_eval=on_eval,
                                overrun=window)
    fits = {t: fit_critical([(r.batch_size, s) for r in results
                             if (s := r.best_steps[t]) is not None]) for t in targets}
    probes: dict[float, list[ProbePoint]] = {t: [] for t in targets}
    for (t, seed), step in sorted(crossed.items(), key=lambda kv: (-kv[0][0], kv[0][1])):
        others = window_steps(step, [s for (sd, s) in snaps if sd == seed], window,
                              window_points)
        if log:
            log(f"probing at target {t:g} (probe run seed {seed}, step {step}; "
                f"window {others})")
        probes[t].append(probe_at(job, snaps[(seed, step)], target=t, seed=seed, step=step,
                                  spec=spec, seconds=probe_seconds, curvature=curvature,
                                  curv_batch=curv_batch))
        for s in others:
            probes[t].append(probe_at(job, snaps[(seed, s)], target=t, seed=seed, step=s,
                                      spec=spec, seconds=window_seconds, curvature=curvature,
                                      curv_batch=curv_batch, at_crossing=False))
    pooled = {t: pool(probes[t]) for t in targets}
    _train.restore(job.model, init_state)
    return CriticalResult(
        name=name, optimizer=spec.optimizer.name, baseline_batch=b0, baseline_lr=lr0,
        lr_exponent=expo, targets=list(targets), seeds=seeds, batches=results, fits=fits,
        probes=probes, pooled=pooled, seconds=time.perf_counter() - start,
        settings={"batches": list(batches), "lr_mults": list(lr_mults), "extend": extend,
                  "max_steps": max_steps, "eval_examples": len(eval_idx),
                  "eval_frac": eval_frac, "probe_seconds": probe_seconds,
                  "curvature": curvature, "curv_batch": curv_batch,
                  "probe_lr": probe_lr, "probe_lr_value": probe_lr_value,
                  "probe_seeds": probe_seeds, "window": window,
                  "target_rel_error": spec.probe.target_rel_error,
                  "window_points": window_points, "window_seconds": window_seconds,
                  "threads": torch.get_num_threads()},
    )


# --------------------------------------------------------------------------- rendering


def _ci(ci: tuple[float, float] | None) -> str:
    if ci is None:
        return ""
    return f" [{fmt_num(ci[0])}, {fmt_num(ci[1])}]"


def _ratio(num: float | None, den: float | None) -> str:
    if num is None or den is None or not math.isfinite(den) or den <= 0:
        return "—"
    return f"{num / den:.2f}"


def _ratio_of(attr: str, den: float | None, p: ProbePoint) -> str:
    return _ratio(getattr(p, attr), den)


def summary_rows(res: CriticalResult) -> list[dict[str, str]]:
    """One row per target: the fit beside the probes (what the markdown table shows).

    Probe columns list one value per probe run (data order), separated by " / ".
    """
    rows = []
    for t in res.targets:
        fit, ps = res.fits[t], res.probes[t]
        if fit is None:
            crit, quality, smin = "— (< 3 batches reached it)", "—", "—"
        else:
            crit = f"{fmt_num(fit.b_crit)} ± {fmt_num(fit.b_crit_se, 2)}"
            if math.isinf(fit.b_crit):
                crit = f"> {max(res.settings['batches'])} (no saturation)"
            quality = f"{fit.r2:.3f} / {100 * fit.rel_rms:.0f}%"
            smin = fmt_num(fit.s_min)
        b_crit = fit.b_crit if fit else None
        at = [p for p in ps if p.at_crossing]
        pl = res.pooled.get(t)

        def each(show: Callable[[ProbePoint], str], at: list[ProbePoint] = at) -> str:
            return " / ".join(show(p) for p in at) if at else "—"

        def pooled(v: float | None, ci: tuple[float, float] | None) -> str:
            return "—" if v is None else fmt_num(v) + _ci(ci)

        n_ck = f" ({pl.checkpoints})" if pl else ""

        rows.append({
            "target loss": f"{t:g}",
            "S_min": smin,
            "B_crit ± s.e.": crit,
            "R² / rel. RMS": quality,
            "B0 step": each(lambda p: str(p.step)),
            "B_simple at crossing": each(lambda p: fmt_num(p.b_simple)),
            "B_simple window median [range]" + n_ck:
                pooled(pl.b_simple, pl.b_simple_range) if pl else "—",
            "B_noise at crossing": each(lambda p: fmt_num(p.b_noise)),
            "B_noise window median [range]":
                pooled(pl.b_noise, pl.b_noise_range) if pl else "—",
            "B_simple/B_crit": each(partial(_ratio_of, "b_simple", b_crit))
            + (f" (median {_ratio(pl.b_simple, b_crit)})" if pl else ""),
            "B_noise/B_crit": each(partial(_ratio_of, "b_noise", b_crit))
            + (f" (median {_ratio(pl.b_noise, b_crit)})" if pl else ""),
        })
    return rows


def _table(rows: list[dict[str, str]]) -> str:
    head = list(rows[0])
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    lines += ["| " + " | ".join(r[h] for h in head) + " |" for r in rows]
    return "\n".join(lines)


def render_markdown(res: CriticalResult) -> str:
    rule = "sqrt" if res.lr_exponent == 0.5 else "linear"
    out = [
        f"### {res.name}: critical batch vs bsfind's noise scales",
        "",
        f"Baseline: {res.optimizer}, B0={res.baseline_batch}, lr0={res.baseline_lr:g}; "
        f"LR grid per batch: lr0·(B/B0)^{res.lr_exponent:g} ({rule} rule) × "
        f"{res.settings['lr_mults']} (extended up to {res.settings['extend']}× on an edge); "
        f"{res.seeds} seeds; max {res.settings['max_steps']} steps; training loss on "
        f"{res.settings['eval_examples']} fixed examples. Probes at the weights of "
        f"{res.settings['probe_seeds']} B0 runs (seeds 0, 1, ...; values separated by /) "
        f"at lr={res.settings['probe_lr_value']:.3g} ({res.settings['probe_lr']}), "
        f"when each first reached the target (each ±~"
        f"{100 * res.settings['target_rel_error']:.0f}% by the probe's own 95% CI; all CIs in "
        f"the JSON); 'window' adds up to {res.settings['window_points'] - 1} "
        f"checkpoints per run within steps s/{1 + res.settings['window']:g}.."
        f"s·{1 + res.settings['window']:g} of each crossing s (count in brackets) and "
        f"gives the median and range over them. Took "
        f"{res.seconds / 60:.1f} min on {res.settings['threads']} CPU thread(s).",
        "",
        _table(summary_rows(res)),
        "",
        "Steps to each target at the best LR (mean over seeds); `*` = best LR on the grid's "
        "edge, `—` = not reached in every seed:",
        "",
    ]
    steps_rows = []
    for r in res.batches:
        row = {"B": str(r.batch_size)}
        for t in res.targets:
            s, lr = r.best_steps[t], r.best_lr[t]
            row[f"loss {t:g}: steps (lr)"] = (
                "—" if s is None else f"{s:.0f} ({lr:.2g}){'*' if r.edge[t] else ''}"
            )
        steps_rows.append(row)
    out.append(_table(steps_rows))
    return "\n".join(out) + "\n"


def plot(res: CriticalResult, path: Path) -> None:
    """Steps vs batch (log-log) with the fits; B_crit, B_simple, B_noise vs target."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 4.2))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    bmin = min(r.batch_size for r in res.batches)
    bmax = max(r.batch_size for r in res.batches)
    grid = np.geomspace(bmin / 1.5, bmax * 1.5, 100)
    for i, t in enumerate(res.targets):
        c = colors[i % len(colors)]
        pts = [(r.batch_size, r.best_steps[t]) for r in res.batches if r.best_steps[t]]
        if pts:
            ax.plot(*zip(*pts, strict=True), "o", color=c)
        fit = res.fits[t]
        label = f"loss {t:g}"
        if fit is not None and math.isfinite(fit.b_crit) and fit.b_crit > 0:
            ax.plot(grid, fit.predict(grid), "-", color=c, alpha=0.7)
            label += f": B_crit={fit.b_crit:.0f}"
        ax.plot([], [], "o-", color=c, label=label)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("batch size B")
    ax.set_ylabel("optimizer steps to target training loss")
    ax.set_title(f"{res.name}: S(B) = S_min(1 + B_crit/B)")
    ax.legend(fontsize=8)
    ax.grid(True, which="both", alpha=0.3)

    xs = np.arange(len(res.targets))
    for off, key, lab, c in ((-0.2, "crit", "B_crit (fit ± s.e.)", "k"),
                             (0.0, "simple", "B_simple window median [range]", colors[0]),
                             (0.2, "noise", "B_noise window median [range]", colors[1])):
        xv, yv, lo, hi = [], [], [], []
        sx, sy = [], []  # single checkpoints, at the crossing
        for i, t in enumerate(res.targets):
            fit, pl = res.fits[t], res.pooled.get(t)
            val: tuple[float, float, float] | None = None
            if key == "crit" and fit and math.isfinite(fit.b_crit) and fit.b_crit > 0:
                se = fit.b_crit_se if math.isfinite(fit.b_crit_se) else 0.0
                val = (fit.b_crit, fit.b_crit - se, fit.b_crit + se)
            elif key == "simple" and pl and pl.b_simple:
                val = (pl.b_simple, *pl.b_simple_range)
            elif key == "noise" and pl and pl.b_noise and pl.b_noise_range:
                val = (pl.b_noise, *pl.b_noise_range)
            for p in res.probes[t]:
                v1 = p.b_simple if key == "simple" else p.b_noise if key == "noise" else None
                if p.at_crossing and v1:
                    sx.append(i + off + 0.08)
                    sy.append(v1)
            if val is None:
                continue
            v, a, b = val
            b = b if math.isfinite(b) else v * 10
            a = max(a, v * 0.05)
            xv.append(i + off)
            yv.append(v)
            lo.append(v - a)
            hi.append(b - v)
        if xv:
            bx.errorbar(xv, yv, yerr=[lo, hi], fmt="o", color=c, label=lab, capsize=3)
        if sx:
            bx.plot(sx, sy, "x", color=c, alpha=0.7, ms=5,
                    label=f"{lab.split()[0]} at each crossing")
    bx.set_xticks(xs, [f"{t:g}" for t in res.targets])
    bx.set_xlabel("target training loss (training proceeds →)")
    bx.set_yscale("log")
    bx.set_ylabel("batch size")
    bx.set_title("measured B_crit vs bsfind's probes at the same weights")
    bx.legend(fontsize=8)
    bx.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def to_json(res: CriticalResult) -> dict[str, object]:
    doc = asdict(res)
    for b in doc["batches"]:
        for r in b["runs"]:
            r.pop("curve", None)  # the curves are large; crossings carry the result
    return _train.jsonable(doc)  # type: ignore[no-any-return]


# --------------------------------------------------------------------------- CLI


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("spec")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="spec override, e.g. data.kwargs.max_chars=50000 (repeatable)")
    ap.add_argument("--batches", default=DEFAULT_BATCHES)
    ap.add_argument("--lrs", default=DEFAULT_LR_MULTS,
                    help="LR multipliers of the rule-scaled baseline LR lr0·(B/B0)^p")
    ap.add_argument("--extend", type=int, default=6,
                    help="max grid extensions per batch when the best LR is on an edge")
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--targets", required=True, help="training losses, e.g. 0.3,0.1,0.03")
    ap.add_argument("--max-steps", type=int, default=4000)
    ap.add_argument("--eval-examples", type=int, default=512)
    ap.add_argument("--eval-frac", type=float, default=0.03)
    ap.add_argument("--probe-seconds", type=float, default=20.0,
                    help="budget of each probe (B_simple, B_noise) at each target")
    ap.add_argument("--probe-lr", choices=("tuned", "baseline"), default="tuned",
                    help="LR of the baseline-batch run whose weights are probed")
    ap.add_argument("--probe-seeds", type=int, default=2,
                    help="baseline-batch runs (data orders) whose weights are probed")
    ap.add_argument("--window", type=float, default=0.25,
                    help="pool checkpoints within steps s/(1+w)..s·(1+w) of each crossing")
    ap.add_argument("--window-points", type=int, default=5,
                    help="checkpoints per probe run in the pooling window (1 = no pooling)")
    ap.add_argument("--window-seconds", type=float, default=3.0,
                    help="probe budget at each neighbouring checkpoint")
    ap.add_argument("--no-curvature", action="store_true", help="skip B_noise")
    ap.add_argument("--curv-batch", type=int, default=256,
                    help="B_big of the curvature probe (8 micro-batches of B/8)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=None,
                    help="output prefix (default docs/img/critical-batch-<spec name>)")
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    spec, job = _train.load_job(args.spec, args.set)
    name = Path(args.spec).stem

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    res = gather(
        spec, job, batches=_train.parse_ints(args.batches),
        lr_mults=_train.parse_floats(args.lrs), seeds=args.seeds,
        targets=_train.parse_floats(args.targets), max_steps=args.max_steps,
        extend=args.extend, probe_lr=args.probe_lr, probe_seeds=args.probe_seeds,
        window=args.window, window_points=args.window_points,
        window_seconds=args.window_seconds,
        eval_examples=args.eval_examples,
        eval_frac=args.eval_frac,
        probe_seconds=args.probe_seconds, curvature=not args.no_curvature,
        curv_batch=args.curv_batch, name=name, log=log,
    )
    res.settings["command"] = " ".join(["scripts/critical_batch.py", *sys.argv[1:]]) \
        if argv is None else "critical_batch.main(...)"
    md = render_markdown(res)
    print(md)
    prefix = Path(args.out or f"docs/img/critical-batch-{name}")
    prefix.parent.mkdir(parents=True, exist_ok=True)
    prefix.with_suffix(".md").write_text(md, encoding="utf-8")
    prefix.with_suffix(".json").write_text(json.dumps(to_json(res), indent=1), encoding="utf-8")
    plot(res, prefix.with_suffix(".png"))
    log(f"wrote {prefix}.md, .json, .png in {res.seconds / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
