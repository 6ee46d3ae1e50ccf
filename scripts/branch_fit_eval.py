"""Branches read by a fit over every rung, not by the first rung that falls behind (issue
#17: an experiment beside scripts/branch_eval.py, not what ``bsfind branch`` does).

    .venv/bin/python scripts/branch_fit_eval.py configs/digits-mlp.yaml
    .venv/bin/python scripts/branch_fit_eval.py configs/text-transformer.yaml \\
        --set model.kwargs.context=64

Why: scripts/sweep_rule_eval.py found that the branches' rule (the last rung that needs
at most √2 times the examples of the rung below) reads the sweeps' own steps within 2×
of the fitted B_crit at only 9 of 14 targets, while S(B) = S_min(1 + B_crit/B) fitted
to the sweeps' batches from B0/2 to 16·B0 alone is within 2× at all 14. So here, from
the same points as scripts/branch_eval.py (each probe run's step 0 and its first
crossing of every target, rebuilt the same way, with that run's optimizer state):

- every rung B0/2, B0, 2·B0, ..., 16·B0 (up to the dataset) runs its branches, 3 data
  orders each, Δ = 64·B0 examples, at the learning rate of the advisor's rule at the
  noise scale bsfind's branches used there (docs/img/branch-<name>.json), exactly as
  ``bsfind.branches.run_branch`` trains them, evaluated on the same fixed subset at
  about 16 points spread in log examples over the whole branch (Δ/32 to Δ);
- the common loss L is the baseline rung's (mean over data orders) after Δ/4; when that
  is not below the loss at the start (the baseline's branch went up: the checkpoint
  sits below the noise floor of its rate), there is no read;
- each branch's examples to L is its first crossing, interpolated linearly between
  evaluations (from the start's loss at 0 examples), as the sweeps read steps to a
  target; a rung counts when every data order crossed, with the mean examples;
- S(B) = E(B)/B of the rungs that count is fitted as the sweeps are
  (``_train.fit_critical``); with two rungs, B_crit solves the two equations;
- the run average from the start combines the reads as ``branches.run_average``.

Writes PREFIX.md and PREFIX.json (PREFIX defaults to docs/img/branch-<name>-fit).
"""

from __future__ import annotations

import math
import statistics
import sys
import time
from collections.abc import Sequence
from typing import Any

import _train
from _train import fit_critical

from bsfind import branches
from bsfind.advisor import scaled_lr
from bsfind.budget import Deadline
from bsfind.seeds import Seeds
from bsfind.training import evaluate_loss, evaluation_subset

# The common loss: the baseline rung's after this fraction of Δ.
LEVEL_AT = 0.25
# Evaluations per branch, spread in log examples over [Δ/EARLIEST, Δ].
EVALUATIONS = 16
EARLIEST = 32


def eval_steps(steps: int, count: int = EVALUATIONS, earliest: int = EARLIEST) -> list[int]:
    """Up to ``count`` steps of a ``steps``-step branch, spread in log over
    [steps/earliest, steps]; the last step always."""
    marks = {max(1, round(steps * earliest ** (-i / (count - 1)))) for i in range(count)}
    return sorted(m for m in marks if m <= steps)


def crossing_examples(curve: Sequence[tuple[int, float]], start: float, level: float
                      ) -> float | None:
    """The examples at which ``curve`` (from ``start`` at 0 examples) first falls to
    ``level``, interpolated linearly; None when it never does."""
    prev_e, prev_l = 0.0, start
    if start <= level:
        return 0.0
    for e, loss in curve:
        if loss <= level:
            if not math.isfinite(prev_l):
                return float(e)
            return prev_e + (prev_l - level) / (prev_l - loss) * (e - prev_e)
        prev_e, prev_l = float(e), loss
    return None


def fit_read(examples: dict[int, float]) -> float | None:
    """B_crit from the examples E(B) each rung needed: S(B) = E(B)/B fitted as the sweeps
    are; two rungs: E = E_min(1 + B/B_crit) through both. None: no finite positive fit."""
    pts = sorted((b, e / b) for b, e in examples.items() if e > 0)
    if len(pts) >= 3:
        fit = fit_critical(pts)
        b_crit = None if fit is None else fit.b_crit
    elif len(pts) == 2:
        (b1, s1), (b2, s2) = pts
        # S = a + c/B through both points; B_crit = c/a
        c = (s1 - s2) / (1 / b1 - 1 / b2)
        a = s1 - c / b1
        b_crit = c / a if a > 0 else math.inf
    else:
        return None
    return b_crit if b_crit is not None and 0 < b_crit < math.inf else None


def ladder_batches(b0: int, n: int) -> list[int]:
    return ([b0 // 2] if b0 % 2 == 0 and b0 // 2 >= 2 else []) + branches.ladder(b0, n)


def measure_point(job: Any, opt: Any, *, b0: int, lr0: float, family: str, lr_rule: str,
                  b_n: float, seed: int, step: int) -> dict[str, Any]:
    """Every rung's branches from the model's weights and ``opt``'s state, and the read."""
    delta = branches.BRANCH_STEPS * b0
    eval_idx = evaluation_subset(len(job), Seeds(seed).evaluation_subset)
    saved_model, saved_opt = branches.saved_state(job.model, opt)
    base_lrs = [g["lr"] for g in opt.param_groups]
    start_loss = evaluate_loss(job, eval_idx, chunk=b0)
    examples = 0

    def took(batch: int) -> None:
        nonlocal examples
        examples += batch

    rungs: dict[int, list[list[tuple[int, float]]]] = {}
    lrs: dict[int, float] = {}
    for batch in ladder_batches(b0, len(job)):
        lr, _ = scaled_lr(lr0, b0, batch, b_n, family, lr_rule)  # type: ignore[arg-type]
        n = delta // batch
        rungs[batch] = [branches.run_branch(
            job, opt, saved_model, saved_opt, base_lrs, lr_scale=lr / lr0, batch=batch,
            repeat=r, seed=Seeds(seed).branch(step, r), steps=n, at=eval_steps(n),
            eval_idx=eval_idx, deadline=Deadline.after(3600), on_step=took,
            eval_chunk=b0) for r in range(branches.REPEATS)]
        lrs[batch] = lr
    branches.restore(job.model, opt, saved_model, saved_opt)
    base = rungs[b0]
    # the baseline's mean loss at its evaluation nearest Δ·LEVEL_AT
    marks = [e for e, _ in base[0]]
    j = min(range(len(marks)), key=lambda i: abs(marks[i] - LEVEL_AT * delta))
    level = statistics.fmean(c[j][1] for c in base)
    crossed: dict[int, float] = {}
    start = float(start_loss) if start_loss is not None else math.inf
    # a level not below the start (the baseline's branch went up: the checkpoint sits
    # below the noise floor of its rate) asks for no progress: every rung "reaches" it at
    # its first evaluation, and the examples say nothing about B_crit
    for batch, curves in rungs.items() if level < start else ():
        es = [crossing_examples(c, start, level) for c in curves]
        if all(e is not None for e in es):
            crossed[batch] = statistics.fmean(es)  # type: ignore[arg-type]
    return {"seed": seed, "step": step, "start_loss": start_loss, "level": level,
            "examples_to_level": crossed, "read": fit_read(crossed), "lrs": lrs,
            "final": {b: statistics.fmean(c[-1][1] for c in cs) for b, cs in rungs.items()},
            "examples": examples}


def gather(spec_path: str, crit: dict[str, Any], base: dict[str, Any], seeds: Sequence[int],
           overrides: Sequence[str], log: Any) -> list[dict[str, Any]]:
    """One all-rung ladder at each probe run's step 0 and first crossing of each target."""
    r = _train.rebuild(spec_path, overrides, crit, base)
    rows = []
    for seed in seeds:
        points = sorted({(0, math.inf), *((p["step"], float(t))
                                          for t, ps in crit["probes"].items() for p in ps
                                          if p["at_crossing"] and p["seed"] == seed)})
        trainer = r.trainer(seed)
        done: dict[int, dict[str, Any]] = {}  # two targets first crossed at one step
        for step, target in points:
            while trainer.steps < step:
                trainer.step()
            began = time.perf_counter()
            row = dict(done[step]) if step in done else measure_point(
                r.job, trainer.optimizer, b0=r.b0, lr0=r.lr0, family=r.family,
                lr_rule=r.spec.optimizer.lr_rule, b_n=r.noise(seed, step), seed=seed,
                step=step)
            row.update(target=target, seconds=time.perf_counter() - began)
            done[step] = row
            rows.append(row)
            e2l = ", ".join(f"{b}: {e:,.0f}" for b, e in row["examples_to_level"].items())
            log(f"seed {seed} step {step} (target {target:g}): level {row['level']:.4g}; "
                f"examples to it {e2l}; read {row['read']}; {row['seconds']:.1f} s")
    return rows


def summarise(rows: list[dict[str, Any]], base: dict[str, Any], b0: int) -> dict[str, Any]:
    """Per target and seed: the local fit read and its run average against B_crit."""
    sweep = base["summary"][0]["sweep_examples"]
    out = []
    measured = {r["seed"] for r in rows}
    for s in base["summary"]:
        t = s["target"]
        seeds = [seed for seed in s["seeds"] if seed in measured]
        reads, averages, costs = [], [], []
        for seed in seeds:
            mine = sorted((r for r in rows if r["seed"] == seed), key=lambda r: r["step"])
            here = next(r for r in mine if math.isclose(r["target"], t))
            so_far = [r for r in mine if r["step"] <= here["step"]]
            reads.append(here["read"])
            ok = all(r["read"] is not None for r in so_far)
            averages.append(branches.run_average([(r["step"], r["read"]) for r in so_far], b0)
                            if ok else None)
            costs.append(sum(r["examples"] for r in so_far))
        b = s["b_crit"]
        rule = [q for seed, q in zip(s["seeds"], s["ratio"], strict=True) if seed in measured]
        rule_avg = [q for seed, q in zip(s["seeds"], s["run_average_ratio"], strict=True)
                    if seed in measured]
        out.append({"target": t, "b_crit": b, "seeds": seeds, "read": reads,
                    "read_ratio": [None if v is None else v / b for v in reads],
                    "run_average": averages,
                    "run_average_ratio": [None if v is None else v / b for v in averages],
                    "rule_ratio": rule, "rule_run_average_ratio": rule_avg,
                    "examples": costs, "share_of_sweep": [c / sweep for c in costs]})

    def hits(key: str) -> int:
        return sum(q is not None and 0.5 <= q <= 2 for r in out for q in r[key])

    return {"targets": out, "points": sum(len(r["seeds"]) for r in out),
            "hits_local": hits("read_ratio"), "hits_run_average": hits("run_average_ratio"),
            "hits_rule_local": hits("rule_ratio"),
            "hits_rule_run_average": hits("rule_run_average_ratio"),
            "both": sum(q is not None and 0.5 <= q <= 2 and p <= 0.1 for r in out
                        for q, p in zip(r["run_average_ratio"], r["share_of_sweep"],
                                        strict=True))}


def render(name: str, summ: dict[str, Any], rows: list[dict[str, Any]], seconds: float) -> str:
    def pair(vs: Sequence[Any], qs: Sequence[Any] | None = None) -> str:
        if qs is None:
            return " / ".join("—" if v is None else f"{v:.2f}" for v in vs)
        return " / ".join("—" if v is None else f"{v:.0f} ({q:.2f})"
                          for v, q in zip(vs, qs, strict=True))

    lines = [
        f"### {name}: branches read by a fit over every rung", "",
        f"Every rung B0/2..16·B0 runs ({branches.REPEATS} data orders, Δ = "
        f"{branches.BRANCH_STEPS}·B0); each rung's examples to the baseline's loss after "
        f"Δ·{LEVEL_AT:g} are fitted as the sweeps fit steps. Values: seed 0 / seed 1 "
        "(÷ the fitted B_crit). Took "
        f"{seconds / 60:.1f} min on 1 CPU thread.", "",
        "| target loss | fitted B_crit | fit read, local | run average of fit reads | "
        "rule read (÷) | rule's run average (÷) | examples to here (% of sweep) |",
        "|---|---|---|---|---|---|---|"]
    for r in summ["targets"]:
        cost = " / ".join(f"{e:,} ({p:.1%})" for e, p in zip(r["examples"],
                                                             r["share_of_sweep"], strict=True))
        lines.append(f"| {r['target']:g} | {r['b_crit']:.3g} | "
                     f"{pair(r['read'], r['read_ratio'])} | "
                     f"{pair(r['run_average'], r['run_average_ratio'])} | "
                     f"{pair(r['rule_ratio'])} | {pair(r['rule_run_average_ratio'])} | {cost} |")
    lines += ["", f"Within 2× of the fitted B_crit ({summ['points']} points): fit read "
              f"{summ['hits_local']}, its run average {summ['hits_run_average']} (and within "
              f"a tenth of the sweep: {summ['both']}); the rule's read "
              f"{summ['hits_rule_local']}, its run average {summ['hits_rule_run_average']}.",
              "", "Every ladder (batch: mean examples to the common loss; — when some data "
              "order did not reach it):", ""]
    for r in rows:
        per = "; ".join(f"{b}: " + (f"{r['examples_to_level'][b]:,.0f}"
                                    if b in r["examples_to_level"] else "—")
                        for b in r["final"])
        read = "—" if r["read"] is None else f"{r['read']:.0f}"
        lines.append(f"- seed {r['seed']}, step {r['step']} (target {r['target']:g}), "
                     f"level {r['level']:.4g}: {per} → {read}")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    return _train.run_branch_experiment(
        argv, __doc__, "scripts/branch_fit_eval.py", "fit", gather, summarise, render,
        extra={"level_at": LEVEL_AT, "evaluations": EVALUATIONS, "earliest": EARLIEST})


if __name__ == "__main__":
    sys.exit(main())
