"""Branches as long as the stretch they stand for, combined into the run average (issue
#17: an experiment beside scripts/branch_eval.py, not what ``bsfind branch`` does).

    .venv/bin/python scripts/branch_stretch_eval.py configs/digits-mlp.yaml
    .venv/bin/python scripts/branch_stretch_eval.py configs/text-transformer.yaml \
        --set model.kwargs.context=64

Why: the fitted B_crit at a target is an average from initialisation, which the run
average of scripts/branch_eval.py reproduces from local reads (``branches.run_average``),
but its branches all train on Δ = 64 steps at B0 while the first targets are reached in
10-18 steps: a read at step 0 or at the first target measures the next 64 steps, not the
stretch the fit averages over. Here the ladder at each point, step 0 and every target
but the last, trains on Δ = the steps at B0 to the next target (rounded up to a multiple
of its top factor), so each stretch between targets is measured by branches that span
it, and the run average to target i takes each stretch's own read:

    B_crit(i) ≈ Σ_j<i b_j·S_min,j / Σ_j<i S_min,j,   S_min,j = Δs_j / (1 + b_j/B0)

(``branches.stretch_average``).

The top factor is the largest power of 2 that leaves its branches at least MIN_TOP_STEPS
steps, up to ``branches.MAX_FACTOR``; below B0 the ladder goes down as ``bsfind branch``
does. Everything else (rule, smoothing, repeats, data orders, the rule's learning rate
from the noise scale at those weights) is ``bsfind.branches``'s; the noise scale comes
from docs/img/branch-<name>.json (the same rebuilt weights).

Writes PREFIX.md and PREFIX.json (PREFIX defaults to docs/img/branch-<name>-stretch).
"""

from __future__ import annotations

import math
import sys
from collections.abc import Sequence
from typing import Any

import _train

from bsfind import branches
from bsfind.budget import Deadline

# The top rung's branches take at least this many steps (the default ladder's 64/16).
MIN_TOP_STEPS = 4


def stretch_ladder(steps: int, max_factor: int = branches.MAX_FACTOR) -> tuple[int, int]:
    """(branch_steps, max_factor) for a stretch of ``steps`` steps at B0: the largest power
    of 2 (at least 2, at most ``max_factor``) whose rung keeps MIN_TOP_STEPS steps, and Δ
    rounded up to a multiple of it."""
    top = 2
    while top * 2 <= max_factor and steps / (top * 2) >= MIN_TOP_STEPS:
        top *= 2
    return math.ceil(steps / top) * top, top


def gather(spec_path: str, crit: dict[str, Any], base: dict[str, Any], seeds: Sequence[int],
           overrides: Sequence[str], log: Any) -> list[dict[str, Any]]:
    """One ladder per stretch: from step 0 and from every target but the last."""
    r = _train.rebuild(spec_path, overrides, crit, base)
    job, b0 = r.job, r.b0
    rows = []
    for seed in seeds:
        ends = sorted((p["step"], float(t)) for t, ps in crit["probes"].items()
                      for p in ps if p["at_crossing"] and p["seed"] == seed)
        starts = [(0, math.inf), *ends[:-1]]
        trainer = r.trainer(seed)
        for (step, _t), (end, t_end) in zip(starts, ends, strict=True):
            if end <= step:  # two targets first crossed at the same step: no stretch
                continue
            while trainer.steps < step:
                trainer.step()
            n, top = stretch_ladder(end - step)
            options = branches.BranchOptions(
                baseline_batch=b0, lr=r.lr0, family=r.family,  # type: ignore[arg-type]
                lr_rule=r.spec.optimizer.lr_rule, b_n=r.noise(seed, step), seed=seed,
                step=step, examples_seen=step * b0, branch_steps=n, max_factor=top)
            weights = _train.snapshot(job.model)
            result = branches.measure(job, options, Deadline.after(3600),
                                      optimizer=trainer.optimizer)
            _train.restore(job.model, weights)
            rows.append({"seed": seed, "from_step": step, "to_step": end, "to_target": t_end,
                         "branch_steps": n, "max_factor": top,
                         "critical_batch": result.critical_batch, "bound": result.bound,
                         "rungs": [(g.batch_size, g.steps, g.loss, g.passed)
                                   for g in result.rungs],
                         "examples": result.examples, "seconds": result.seconds})
            log(f"seed {seed} steps {step}-{end} (to {t_end:g}): Δ {n} steps, top {top}·B0: "
                f"{result.critical_batch} [{result.bound}], {result.examples:,} examples, "
                f"{result.seconds:.1f} s")
    return rows


def summarise(rows: list[dict[str, Any]], base: dict[str, Any], b0: int) -> dict[str, Any]:
    """Per target and seed: the stretch average to there against the fitted B_crit."""
    by_target = {r["target"]: r for r in base["summary"]}
    sweep = base["summary"][0]["sweep_examples"]
    out = []
    for t in sorted(by_target, reverse=True):
        s = by_target[t]
        values, costs = [], []
        for seed in s["seeds"]:
            mine = [r for r in rows if r["seed"] == seed]
            end = next((r["to_step"] for r in mine if r["to_target"] == t), None)
            used = [r for r in mine if end is not None and r["to_step"] <= end]
            ok = used and all(r["critical_batch"] is not None for r in used)
            stretches = [(r["from_step"], r["to_step"], r["critical_batch"]) for r in used]
            values.append(branches.stretch_average(stretches, b0) if ok else None)
            costs.append(sum(r["examples"] for r in used))
        b = s["b_crit"]
        out.append({"target": t, "b_crit": b, "seeds": s["seeds"], "stretch_average": values,
                    "ratio": [None if v is None else v / b for v in values],
                    "run_average_ratio": s["run_average_ratio"],
                    "branch_ratio": s["ratio"], "examples": costs,
                    "share_of_sweep": [c / sweep for c in costs]})
    ratios = [q for r in out for q in r["ratio"] if q is not None]
    within_tenth = [p for r in out for q, p in zip(r["ratio"], r["share_of_sweep"],
                                                   strict=True) if q is not None]
    return {"targets": out, "hits": sum(0.5 <= q <= 2 for q in ratios), "points": len(ratios),
            "within_a_tenth": sum(p <= 0.1 for p in within_tenth),
            "both": sum(q is not None and 0.5 <= q <= 2 and p <= 0.1
                        for r in out for q, p in zip(r["ratio"], r["share_of_sweep"],
                                                     strict=True))}


def render(name: str, summ: dict[str, Any], rows: list[dict[str, Any]], seconds: float) -> str:
    def pair(vs: Sequence[Any], fmt: str = "{:.2f}") -> str:
        return " / ".join("—" if v is None else fmt.format(v) for v in vs)

    lines = [
        f"### {name}: branches as long as their stretch, combined into the run average",
        "",
        "Each stretch (step 0 to the first target, then target to target) is measured by a "
        "ladder from its start whose branches train on the stretch's own steps at B0 "
        f"(rounded up; top rung at least {MIN_TOP_STEPS} steps); the run average to a "
        "target weights each stretch's read by its minimum steps. Values: seed 0 / seed 1. "
        f"Took {seconds / 60:.1f} min on 1 CPU thread.",
        "",
        "| target loss | fitted B_crit | stretch average (÷ B_crit) | run average, Δ = 64·B0 "
        "(÷ B_crit) | local branch (÷ B_crit) | examples to here (% of sweep) |",
        "|---|---|---|---|---|---|",
    ]
    for r in summ["targets"]:
        vals = " / ".join("—" if v is None else f"{v:.0f} ({q:.2f})"
                          for v, q in zip(r["stretch_average"], r["ratio"], strict=True))
        cost = " / ".join(f"{e:,} ({p:.1%})" for e, p in zip(r["examples"],
                                                             r["share_of_sweep"], strict=True))
        lines.append(f"| {r['target']:g} | {r['b_crit']:.3g} | {vals} | "
                     f"{pair(r['run_average_ratio'])} | {pair(r['branch_ratio'])} | {cost} |")
    lines += ["", f"Within 2× of the fitted B_crit: {summ['hits']} of {summ['points']}; at "
              f"most a tenth of the sweep: {summ['within_a_tenth']} of {summ['points']}; "
              f"both: {summ['both']}.", "", "Every ladder (batch: smoothed loss, kept up or "
              "fell behind):", ""]
    for r in rows:
        rungs = "; ".join(f"{b} ({s} steps) {loss:.4g}"
                          + ("" if p is None else " kept up" if p else " fell behind")
                          for b, s, loss, p in r["rungs"])
        lines.append(f"- seed {r['seed']}, steps {r['from_step']}–{r['to_step']} (to "
                     f"{r['to_target']:g}), Δ {r['branch_steps']} steps: {rungs} → "
                     f"{r['critical_batch']} ({r['bound']})")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    return _train.run_branch_experiment(
        argv, __doc__, "scripts/branch_stretch_eval.py", "stretch", gather, summarise,
        render)


if __name__ == "__main__":
    sys.exit(main())
