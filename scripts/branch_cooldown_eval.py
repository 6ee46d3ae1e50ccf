"""Branches that end in a learning-rate cool-down, against the fitted critical batch
(issue #17: an experiment beside scripts/branch_eval.py, not what ``bsfind branch`` does).

    .venv/bin/python scripts/branch_cooldown_eval.py configs/digits-mlp.yaml
    .venv/bin/python scripts/branch_cooldown_eval.py configs/text-transformer.yaml \
        --set model.kwargs.context=64

Why: late in training the constant-rate branches of ``bsfind.branches`` compare losses
that hover at the level the learning rate's noise holds them to (on digits-mlp the
baseline's own branch ends above where it started), so the rule reads the noise of
each batch's rate rather than its progress. A branch that decays its rate to 0 over its
last COOLDOWN share of steps (``branches.cooldown_scales``, as the learning-rate runs do)
ends where its progress took it. The rule is the same in examples: rung B passes when
its loss at the end of a branch of Δ examples is no higher than that of B/2's own branch
of Δ/√2 examples (a separate run, since a cool-down must end where it is read). Each
rung but the last costs those two branches, about 1.7× the constant-rate ladder.

From the same rebuilt weights and optimizer state as scripts/branch_eval.py (that run's
JSON, docs/img/branch-<name>.json, gives each point's rule noise scale and basis, so
the learning rates are the constant-rate ladder's), in the same data orders.

Writes PREFIX.md and PREFIX.json (PREFIX defaults to docs/img/branch-<name>-cooldown).
"""

from __future__ import annotations

import math
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import _train
import torch

from bsfind import branches
from bsfind.advisor import optimizer_family, scaled_lr
from bsfind.budget import Deadline
from bsfind.seeds import Seeds
from bsfind.training import evaluation_subset

# Share of a branch's steps over which its learning rate falls to 0: the learning-rate
# runs' 16 of 48 steps (branches.LR_COOLDOWN / (LR_STEPS + LR_COOLDOWN)).
COOLDOWN = branches.LR_COOLDOWN / (branches.LR_STEPS + branches.LR_COOLDOWN)


def cooled_loss(job: Any, opt: torch.optim.Optimizer, saved: tuple[Any, Any],
                base_lrs: list[float], lr_scale: float, batch: int, examples: float,
                seed: int, step: int, eval_idx: torch.Tensor, cooldown: float,
                repeats: int) -> tuple[float, list[float], int]:
    """(mean, per-order losses, steps) at the end of ``repeats`` branches of about
    ``examples`` examples at ``batch``, each ending in a linear cool-down."""
    steps = max(1, round(examples / batch))
    cool = max(1, round(cooldown * steps)) if cooldown > 0 else 0
    losses = []
    for r in range(repeats):
        curve = branches.run_branch(
            job, opt, saved[0], saved[1], base_lrs, lr_scale=lr_scale, batch=batch,
            repeat=r, seed=Seeds(seed).branch(step, r), steps=steps, at=[steps],
            eval_idx=eval_idx, deadline=Deadline.after(3600),
            scales=branches.cooldown_scales(steps - cool, cool))
        losses.append(curve[-1][1])
    return statistics.fmean(losses), losses, steps


def ladder_at(job: Any, opt: torch.optim.Optimizer, point: dict[str, Any], b0: int,
              lr0: float, family: str, lr_rule: str, delta: int, cooldown: float,
              repeats: int) -> dict[str, Any]:
    """The cooled ladder from the current weights and ``opt``'s state (both restored)."""
    saved = branches.saved_state(job.model, opt)
    base_lrs = [g["lr"] for g in opt.param_groups]
    # the evaluation subset and the data orders of branch_eval.py's BranchOptions(seed=seed)
    eval_idx = evaluation_subset(len(job), Seeds(point["seed"]).evaluation_subset)
    b_n = point["b_n"] if point["b_n"] else math.inf
    rungs: list[dict[str, Any]] = []
    examples = 0

    def run(batch: int, length: float) -> tuple[float, list[float], int]:
        nonlocal examples
        lr, _ = scaled_lr(lr0, b0, batch, b_n, family, lr_rule)  # type: ignore[arg-type]
        out = cooled_loss(job, opt, saved, base_lrs, lr / lr0, batch, length,
                          point["seed"], point["step"], eval_idx, cooldown, repeats)
        examples += out[2] * batch * repeats
        return out

    batches = branches.ladder(b0, len(job), branches.MAX_FACTOR)
    found = batches[0]
    reference = run(batches[0], delta / branches.TOLERANCE)
    rungs.append({"batch_size": batches[0], "reference_loss": reference[0]})
    for i, b in enumerate(batches[1:], 1):
        loss, losses, steps = run(b, delta)
        passed = loss <= reference[0]
        rungs.append({"batch_size": b, "loss": loss, "losses": losses, "steps": steps,
                      "against": reference[0], "passed": passed})
        if not passed:
            break
        found = b
        if i + 1 < len(batches):
            reference = run(b, delta / branches.TOLERANCE)
            rungs[-1]["reference_loss"] = reference[0]
    branches.restore(job.model, opt, *saved)
    bound = "bracketed" if not rungs[-1].get("passed", True) else "at least"
    if len(rungs) > 1 and rungs[1].get("passed") is False:
        bound = "at most"
    return {"critical_batch": found, "bound": bound, "rungs": rungs, "examples": examples}


def gather(spec_path: str, crit: dict[str, Any], base: dict[str, Any],
           seeds: Sequence[int], targets: Sequence[float] | None, overrides: Sequence[str],
           cooldown: float, log: Any) -> list[dict[str, Any]]:
    spec, job = _train.load_job(spec_path, overrides)
    init = _train.snapshot(job.model)
    b0 = spec.optimizer.batch_size
    lr0 = float(crit["settings"]["probe_lr_value"])
    family = optimizer_family(spec.optimizer.name)
    delta = base["constants"]["branch_steps"] * b0
    repeats = base["constants"]["repeats"]
    by_point = {(m["target"], m["seed"]): m for m in base["measurements"]}
    rows = []
    for seed in seeds:
        points = sorted((p["step"], float(t)) for t, ps in crit["probes"].items()
                        for p in ps if p["at_crossing"] and p["seed"] == seed
                        and (targets is None or float(t) in targets))
        trainer = _train.Trainer(job, init, b0, lr0, seed)
        for step, t in points:
            while trainer.steps < step:
                trainer.step()
            m = by_point[(t, seed)]
            point = {"seed": seed, "step": step, "b_n": m["branches"]["lr_noise_scale"]}
            began = time.perf_counter()
            got = ladder_at(job, trainer.optimizer, point, b0, lr0, family,
                            spec.optimizer.lr_rule, delta, cooldown, repeats)
            got.update(target=t, seed=seed, step=step, seconds=time.perf_counter() - began,
                       constant=m["branches"]["critical_batch"])
            rows.append(got)
            log(f"target {t:g} seed {seed} step {step}: {got['critical_batch']} "
                f"[{got['bound']}] (constant rate: {got['constant']}), "
                f"{got['examples']:,} examples, {got['seconds']:.1f} s")
    return rows


def summarise(rows: list[dict[str, Any]], base: dict[str, Any]) -> dict[str, Any]:
    """Per target: fitted B_crit, both ladders' reads and their ratios; counts."""
    summary = {r["target"]: r for r in base["summary"]}
    out: list[dict[str, Any]] = []
    hits = {"constant": 0, "cooled": 0, "cooled_mean": 0, "constant_mean": 0}
    for t in sorted({r["target"] for r in rows}, reverse=True):
        s = summary[t]
        mine = [r for r in rows if r["target"] == t]
        seeds = [r["seed"] for r in mine]
        basis = [s["basis"][s["seeds"].index(seed)] for seed in seeds]
        cooled = [r["critical_batch"] for r in mine]
        constant = [r["constant"] for r in mine]
        mean = [math.sqrt(b * c) if b else None for b, c in zip(basis, cooled, strict=True)]
        for key, values in (("cooled", cooled), ("constant", constant), ("cooled_mean", mean),
                            ("constant_mean", [s["calibrated"][s["seeds"].index(x)]
                                               for x in seeds])):
            hits[key] += sum(v is not None and 0.5 <= v / s["b_crit"] <= 2 for v in values)
        out.append({"target": t, "b_crit": s["b_crit"], "local": [s["local_before"],
                    s["local_after"]], "seeds": seeds, "constant": constant,
                    "cooled": cooled, "cooled_mean": mean,
                    "examples": [r["examples"] for r in mine],
                    "share_of_sweep": [r["examples"] / s["sweep_examples"] for r in mine],
                    "seeds_agree": max(cooled) / min(cooled) <= 2})
    return {"targets": out, "hits": hits, "points": len(rows),
            "seeds_agree": sum(r["seeds_agree"] for r in out), "target_count": len(out)}


def render(name: str, cooldown: float, summ: dict[str, Any], rows: list[dict[str, Any]],
           seconds: float) -> str:
    def pair(vs: Sequence[Any], b: float) -> str:
        return " / ".join("—" if v is None else f"{v:.0f} ({v / b:.2f})" for v in vs)

    lines = [
        f"### {name}: branches ending in a learning-rate cool-down",
        "",
        f"The same points, rule learning rates, Δ and data orders as branch-{name}.md; each "
        f"branch's rate falls linearly to 0 over its last {cooldown:.0%} of steps, and rung B "
        "is held to B/2's own cooled branch of Δ/√2. Values: seed 0 / seed 1, (÷ fitted "
        f"B_crit). Took {seconds / 60:.1f} min on 1 CPU thread.",
        "",
        "| target loss | fitted B_crit | constant-rate branches | cooled branches | "
        "√(basis · cooled) | seeds within one doubling | examples (% of sweep) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in summ["targets"]:
        b = r["b_crit"]
        ex = " / ".join(f"{e:,} ({p:.1%})" for e, p in zip(r["examples"], r["share_of_sweep"],
                                                           strict=True))
        lines.append(f"| {r['target']:g} | {b:.3g} | {pair(r['constant'], b)} | "
                     f"{pair(r['cooled'], b)} | {pair(r['cooled_mean'], b)} | "
                     f"{'yes' if r['seeds_agree'] else 'no'} | {ex} |")
    h, n = summ["hits"], summ["points"]
    lines += ["", f"Within 2× of the fitted B_crit: constant-rate branches {h['constant']} of "
              f"{n}, cooled {h['cooled']} of {n}; the advisor's √(basis · branches) with the "
              f"constant-rate branches {h['constant_mean']} of {n}, with the cooled ones "
              f"{h['cooled_mean']} of {n}. Cooled, two seeds within one doubling: "
              f"{summ['seeds_agree']} of {summ['target_count']}.", "", "Every ladder "
              "(batch: cooled loss after Δ vs B/2's after Δ/√2):", ""]
    for r in rows:
        rungs = "; ".join(
            f"{g['batch_size']}: {g['loss']:.4g} vs {g['against']:.4g} "
            f"{'kept up' if g['passed'] else 'fell behind'}" for g in r["rungs"][1:])
        lines.append(f"- {r['target']:g} / seed {r['seed']} / step {r['step']}: {rungs} → "
                     f"{r['critical_batch']} ({r['bound']})")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    ap = _train.branch_experiment_parser(__doc__)
    ap.add_argument("--targets", default=None)
    ap.add_argument("--cooldown", type=float, default=COOLDOWN,
                    help="share of each branch's steps decaying the rate to 0")
    args = ap.parse_args(argv)
    name, crit, base = _train.branch_experiment_inputs(args)
    start = time.perf_counter()
    rows = gather(args.spec, crit, base, _train.parse_ints(args.seeds),
                  _train.parse_floats(args.targets) if args.targets else None, args.set,
                  args.cooldown, lambda m: print(m, file=sys.stderr, flush=True))
    seconds = time.perf_counter() - start
    summ = summarise(rows, base)
    md = render(name, args.cooldown, summ, rows, seconds)
    print(md)
    _train.write_outputs(Path(args.out or f"docs/img/branch-{name}-cooldown"), md, {
        "name": name, "cooldown": args.cooldown, "seconds": seconds, "summary": summ,
        "ladders": rows,
        "command": " ".join(["scripts/branch_cooldown_eval.py", *(argv or sys.argv[1:])])})
    return 0

if __name__ == "__main__":
    sys.exit(main())
