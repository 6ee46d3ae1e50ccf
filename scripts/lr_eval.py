"""Where, and how, a short run measures the learning rate for the whole run (issue #13).

    .venv/bin/python scripts/lr_eval.py configs/digits-mlp.yaml
    .venv/bin/python scripts/lr_eval.py configs/text-transformer.yaml --points 0,64,128,195

`bsfind recommend` measures the learning rate at its recommended batch B* by short runs
(``bsfind.branches.measure_lr``): from the probe run's starting weights, LR_STEPS steps
at f × the rule's learning rate and LR_COOLDOWN steps decaying it to 0, the lowest loss
at the end wins. This script shows why it starts there and cools down. At points of the
probe's own run along training (default: step 0 and the points the advice's noise scale
is the median of, read from the schedule evaluation's report), at the baseline batch B0
and at B*, it runs the short runs for every factor of a fixed grid in two forms:

- *constant*: LR_STEPS + LR_COOLDOWN steps at the constant rate, the loss averaged over
  the last half (the smoothing of the critical-batch branches);
- *cool-down*: what ``measure_lr`` runs.

Beside each, the best learning rate the critical-batch sweep found at that batch for
the whole run to the target (log-log interpolated between swept batches), as a factor of
the same reference: lr0 at B0, the rule's learning rate at B*.

Writes PREFIX.md and PREFIX.json (PREFIX defaults to docs/img/lr-eval-<spec name>).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import _train
import torch
from schedule_eval import load_sweep

from bsfind import branches
from bsfind.budget import Deadline
from bsfind.seeds import Seeds
from bsfind.training import EpochSampler, evaluate_loss, evaluation_subset, training_step

FACTORS = (0.25, 0.5, 1.0, 2.0, 4.0, 8.0)


def short_runs(job: Any, opt: torch.optim.Optimizer, *, batch: int, lr: float, lr0: float,
               seed: int, step: int, repeats: int, cooldown: bool) -> dict[float, float]:
    """Per factor of FACTORS, the mean over ``repeats`` data orders of a short run's loss
    from the current weights and ``opt``'s state (both restored afterwards)."""
    saved_model = {k: v.detach().clone() for k, v in job.model.state_dict().items()}
    saved_opt = copy.deepcopy(opt.state_dict())
    base_lrs = [g["lr"] for g in opt.param_groups]
    eval_idx = evaluation_subset(len(job), Seeds(seed).evaluation_subset)
    total = branches.LR_STEPS + branches.LR_COOLDOWN
    scales = branches.cooldown_scales(branches.LR_STEPS, branches.LR_COOLDOWN)
    at = [total] if cooldown else list(range(math.ceil(total / 2), total + 1))
    out: dict[float, float] = {}
    try:
        for f in FACTORS:
            losses = []
            for r in range(repeats):
                curve = branches.run_branch(
                    job, opt, saved_model, saved_opt, base_lrs, lr_scale=f * lr / lr0,
                    batch=batch, repeat=r, seed=Seeds(seed).branch(step, r), steps=total,
                    at=at, eval_idx=eval_idx, deadline=Deadline.after(1e9),
                    scales=scales if cooldown else None)
                losses.append(curve[-1][1] if cooldown else
                              branches.smoothed_loss(curve, total * batch))
            out[f] = statistics.fmean(losses)
    finally:
        job.model.load_state_dict(saved_model)
        opt.load_state_dict(saved_opt)
        for g, base in zip(opt.param_groups, base_lrs, strict=True):
            g["lr"] = base
    return out


def gather(spec_path: str, overrides: Sequence[str], report: dict[str, Any], sweep: Any,
           points: Sequence[int], repeats: int, log: Any) -> dict[str, Any]:
    spec, job = _train.load_job(spec_path, overrides)
    b0, lr0, seed = spec.optimizer.batch_size, spec.optimizer.lr, spec.probe.seed
    rec = report["recommendation"]
    search = report.get("lr_search") or {}
    bstar = int(rec["batch_size"])
    rule = float(search.get("rule_learning_rate") or rec["learning_rate"])
    sweep_b0, sweep_bstar = sweep.lr_at(b0), sweep.lr_at(bstar)
    opt = job.make_optimizer(lr0)
    sampler = EpochSampler(len(job), b0,
                           torch.Generator().manual_seed(Seeds(seed).training_order))
    eval_idx = evaluation_subset(len(job), Seeds(seed).evaluation_subset)
    rows, step = [], 0
    for p in sorted(points):
        while step < p:
            training_step(job, opt, sampler.next())
            step += 1
        began = time.perf_counter()
        row: dict[str, Any] = {"step": step, "loss": evaluate_loss(job, eval_idx)}
        for name, batch, ref in (("b0", b0, lr0), ("bstar", bstar, rule)):
            for form in ("constant", "cooldown"):
                losses = short_runs(job, opt, batch=batch, lr=ref, lr0=lr0, seed=seed,
                                    step=step, repeats=repeats, cooldown=form == "cooldown")
                row[f"{name}_{form}"] = {"losses": {str(k): v for k, v in losses.items()},
                                         "best": branches.best_factor(losses)}
        row["seconds"] = time.perf_counter() - began
        log(f"step {step}: B0 best {row['b0_constant']['best']:g}x / "
            f"{row['b0_cooldown']['best']:g}x lr0; B*={bstar} best "
            f"{row['bstar_constant']['best']:g}x / {row['bstar_cooldown']['best']:g}x the "
            f"rule's ({row['seconds']:.0f} s)")
        rows.append(row)
    return {
        "spec": spec_path, "baseline_batch": b0, "baseline_lr": lr0, "batch": bstar,
        "rule_lr": rule, "lr_rule": rec["lr_rule"], "sweep": sweep.path,
        "target": sweep.target,
        "sweep_best_lr": {"b0": sweep_b0, "bstar": sweep_bstar},
        "factors": list(FACTORS), "repeats": repeats,
        "steps": branches.LR_STEPS, "cooldown": branches.LR_COOLDOWN, "points": rows,
        "threads": torch.get_num_threads(),
    }


def _f(x: float | None) -> str:
    return "—" if x is None else f"{x:.2g}x"


def render(res: dict[str, Any], name: str) -> str:
    b0, bstar = res["baseline_batch"], res["batch"]
    sb0, sbs = res["sweep_best_lr"]["b0"], res["sweep_best_lr"]["bstar"]
    lines = [
        f"### {name}: the best short-run learning rate against the sweep's",
        "",
        f"B0 = {b0} at lr0 = {res['baseline_lr']:.3g}; B* = {bstar} (bsfind's "
        f"recommendation) at the {res['lr_rule']} rule's {res['rule_lr']:.3g}. Short runs "
        f"of {res['steps'] + res['cooldown']} steps, {res['repeats']} data orders, from the "
        f"probe run's weights and optimizer state at each step; factors "
        f"{', '.join(f'{f:g}' for f in res['factors'])}. *Constant*: the loss averaged over "
        f"the last half; *cool-down*: {res['steps']} steps, then {res['cooldown']} decaying "
        "to 0, the loss at the end. The sweep: the best learning rate for the whole run to "
        f"training loss {res['target']:g} (critical-batch sweep, 2 seeds, a factor-2 grid).",
        "",
        "| step | loss there | B0: constant | B0: cool-down | B0: sweep | "
        "B*: constant | B*: cool-down | B*: sweep |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in res["points"]:
        lines.append(
            f"| {r['step']} | {r['loss']:.3g} | {_f(r['b0_constant']['best'])} | "
            f"{_f(r['b0_cooldown']['best'])} | "
            f"{_f(sb0 / res['baseline_lr'] if sb0 else None)} | "
            f"{_f(r['bstar_constant']['best'])} | {_f(r['bstar_cooldown']['best'])} | "
            f"{_f(sbs / res['rule_lr'] if sbs else None)} |")
    lines += ["", "Factors on lr0 (B0) and on the rule's learning rate (B*). Every loss is "
              "in the JSON beside this file.", ""]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("spec")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--report", default=None,
                    help="schedule_eval.py JSON or a `bsfind recommend --json` document "
                         "(default docs/img/schedule-eval-<name>.json): B* and the rule's LR")
    ap.add_argument("--sweep", default=None,
                    help="critical_batch.py JSON (default docs/img/critical-batch-<name>.json)")
    ap.add_argument("--target", type=float, default=None,
                    help="the sweep's target (default: the report's, else the sweep's lowest)")
    ap.add_argument("--points", default=None,
                    help="steps along the probe run (default: 0 and the steps the advice's "
                         "noise scale is the median of)")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    name = Path(args.spec).stem
    doc = json.loads(Path(args.report or f"docs/img/schedule-eval-{name}.json")
                     .read_text(encoding="utf-8"))
    report = doc.get("report", doc)
    target = args.target if args.target is not None else doc.get("target")
    sweep = load_sweep(Path(args.sweep or f"docs/img/critical-batch-{name}.json"), target)
    if args.points:
        points = [int(x) for x in args.points.split(",")]
    else:
        used = report.get("noise_scale") or {}
        points = sorted({0, *(used.get("summary_of") or [])})

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    start = time.perf_counter()
    res = gather(args.spec, args.set, report, sweep, points, args.repeats, log)
    res["seconds"] = time.perf_counter() - start
    res["command"] = " ".join(["scripts/lr_eval.py", *(sys.argv[1:] if argv is None
                                                         else argv)])
    md = render(res, name)
    print(md)
    prefix = Path(args.out or f"docs/img/lr-eval-{name}")
    prefix.parent.mkdir(parents=True, exist_ok=True)
    prefix.with_suffix(".md").write_text(md, encoding="utf-8")
    prefix.with_suffix(".json").write_text(json.dumps(res, indent=1), encoding="utf-8")
    log(f"wrote {prefix}.md and .json in {res['seconds'] / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
