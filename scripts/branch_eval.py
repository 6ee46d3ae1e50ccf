"""The branch measurement against the critical batch fitted from full sweeps (issue #17).

    .venv/bin/python scripts/branch_eval.py configs/digits-mlp.yaml
    .venv/bin/python scripts/branch_eval.py configs/text-transformer.yaml --seeds 0,1

For every target loss of docs/img/critical-batch-<name>.json and each of its probe runs
(seeds 0 and 1): rebuild the weights where that run first reached the target (the
seeded initial weights of the spec, then the run's own steps at the baseline batch and
its learning rate, with ``_train.Trainer`` as scripts/critical_batch.py trains them),
keep that run's optimizer state, and run ``bsfind.branches.measure`` from there with
bsfind's defaults, exactly as ``bsfind branch`` would from that point. Beside the local
critical batch: the fitted B_crit, B_simple and B_noise the sweep measured at the same
weights, and the training examples the branches and the sweep cost.

B_simple and B_noise are measured again at the rebuilt weights, by the sweep's own
probe (``critical_batch.probe_at``: bsfind's NoiseProbe and CurvatureProbe with the
sweep's budgets and seeds), since a rebuilt run can drift from the sweep's by float
rounding (a hot SGD run amplifies it: the table shows each point's loss). The
learning-rate rule of the branches reads the noise scale the advisor would use there:
B_noise for the SGD family when it was measured, else B_simple.

The sweep's model must be rebuilt as it was: text-transformer's sweep ran before the
shipped config's model context went from 64 to 32 (the data were already 32-byte
windows), so its initial weights need ``--set model.kwargs.context=64``.

Writes PREFIX.md and PREFIX.json (PREFIX defaults to docs/img/branch-<spec name>).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import _train
import torch
from _train import fit_critical, fmt_num

from bsfind import branches
from bsfind.advisor import optimizer_family
from bsfind.budget import Deadline
from bsfind.report import branch_dict
from bsfind.results import BranchResult, Interval


def sweep_examples(crit: dict[str, Any]) -> int:
    """Training examples of the whole sweep: steps × batch over every run in the JSON."""
    return sum(r["steps"] * r["batch_size"] for b in crit["batches"] for r in b["runs"])


def local_b_crit(crit: dict[str, Any]) -> dict[float, tuple[float | None, float | None]]:
    """Per target, B_crit fitted to the steps *between* consecutive targets (before it,
    after it): S(B) from initialisation averages B_crit over the run so far, while
    branches measure it where they start."""
    targets = [float(t) for t in crit["targets"]]
    steps = {t: {b["batch_size"]: b["best_steps"][str(t) if str(t) in b["best_steps"]
                                                   else f"{t:g}"]
                 for b in crit["batches"]} for t in targets}

    def between(a: float, b: float) -> float | None:
        pts = [(bs, steps[b][bs] - steps[a][bs]) for bs in steps[b]
               if steps[a].get(bs) is not None and steps[b][bs] is not None
               and steps[b][bs] > steps[a][bs]]
        fit = fit_critical(pts)
        return None if fit is None else fit.b_crit

    out = {}
    for i, t in enumerate(targets):
        out[t] = (between(targets[i - 1], t) if i > 0 else None,
                  between(t, targets[i + 1]) if i + 1 < len(targets) else None)
    return out


def _key(d: dict[str, Any], t: float) -> Any:
    return d[str(t)] if str(t) in d else d[f"{t:g}"]


def gather(spec_path: str, crit: dict[str, Any], seeds: Sequence[int],
           targets: Sequence[float] | None, log: Any, overrides: Sequence[str] = (),
           lr_measured: tuple[int, float] | None = None,
           branch_steps: int = branches.BRANCH_STEPS, from_init: bool = True
           ) -> dict[str, Any]:
    """Every (target, seed) measurement and what the table needs; with ``from_init``
    also the branches from each probe run's first step (target inf), which the run
    average (``branches.run_average``) starts from."""
    import critical_batch

    spec, job = _train.load_job(spec_path, overrides)
    init = _train.snapshot(job.model)
    b0 = spec.optimizer.batch_size
    lr = float(crit["settings"]["probe_lr_value"])
    family = optimizer_family(spec.optimizer.name)
    n = len(job)
    eval_n = int(crit["settings"]["eval_examples"])
    from bsfind.seeds import Seeds

    gen = torch.Generator().manual_seed(Seeds(spec.probe.seed).evaluation_subset)
    crit_eval = torch.randperm(n, generator=gen)[:min(eval_n, n)].sort().values
    chosen = [float(t) for t in crit["targets"]
              if targets is None or float(t) in targets]
    rows: list[dict[str, Any]] = []
    for seed in seeds:
        points = sorted((p["step"], float(t)) for t, ps in crit["probes"].items()
                        for p in ps if p["at_crossing"] and p["seed"] == seed
                        and float(t) in chosen)
        if from_init:
            points.insert(0, (0, math.inf))  # the run's start: target inf
        trainer = _train.Trainer(job, init, b0, lr, seed)
        for step, t in points:
            while trainer.steps < step:
                trainer.step()
            loss_at, _ = _train.evaluate(job, crit_eval)
            weights = _train.snapshot(job.model)
            probe = critical_batch.probe_at(
                job, weights, target=t, seed=seed, step=step, spec=spec,
                seconds=float(crit["settings"]["probe_seconds"]), curvature=True,
                curv_batch=int(crit["settings"]["curv_batch"]))
            basis = (probe.b_noise if family == "sgd" and probe.b_noise else probe.b_simple)
            options = branches.BranchOptions(
                baseline_batch=b0, lr=lr, family=family, lr_rule=spec.optimizer.lr_rule,
                b_n=basis if basis else math.inf, seed=seed, step=step,
                examples_seen=step * b0, b_simple=probe.b_simple, b_noise=probe.b_noise,
                lr_measured=lr_measured, branch_steps=branch_steps)
            start = time.perf_counter()
            # at step 0 the optimizer has no state yet: the branches start fresh, as the run
            result = branches.measure(job, options, Deadline.after(3600),
                                      optimizer=trainer.optimizer)
            _train.restore(job.model, weights)  # (measure restores it too)
            rows.append({"target": t, "seed": seed, "step": step, "loss_at_step": loss_at,
                         "result": result, "seconds": time.perf_counter() - start})
            ladder = " ".join(f"{g.batch_size}:{g.loss:.4g}"
                              + ("" if g.passed is None else "+-"[not g.passed])
                              for g in result.rungs)
            log(f"target {t:g} seed {seed} step {step} (loss {loss_at:.4g}): "
                f"{result.critical_batch} [{result.bound}] from {ladder}; "
                f"{result.examples:,} examples, {result.seconds:.1f} s")
    return {"name": Path(spec_path).stem, "optimizer": spec.optimizer.name,
            "baseline_batch": b0, "lr": lr, "rows": rows, "overrides": list(overrides),
            "branch_steps": branch_steps}


# --------------------------------------------------------------------------- table


def _ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or not math.isfinite(b) or b <= 0:
        return None
    return a / b


def _pair(values: Sequence[Any], fmt: Any = fmt_num) -> str:
    return " / ".join("—" if v is None else fmt(v) for v in values)


def summary(res: dict[str, Any], crit: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per target: the branches (per seed) beside the sweep's numbers."""
    sweep = sweep_examples(crit)
    local = local_b_crit(crit)
    out = []
    for t in sorted({r["target"] for r in res["rows"] if math.isfinite(r["target"])},
                    reverse=True):
        rows = sorted((r for r in res["rows"] if r["target"] == t), key=lambda r: r["seed"])
        fit = _key(crit["fits"], t)
        b_crit = fit["b_crit"] if fit else None
        pooled = _key(crit["pooled"], t)
        results: list[BranchResult] = [r["result"] for r in rows]
        cbs = [r.critical_batch for r in results]
        # the alternative calibration: the window median of B_simple × the ratio measured
        # at the crossing (branch / B_simple there)
        scaled = [None if pooled is None or r.ratio_simple is None
                  else pooled["b_simple"] * r.ratio_simple for r in results]
        # what the advisor uses (branches.calibrated), from the B_n of the learning-rate
        # rule there (the advisor's basis at these weights)
        calibrated = []
        for r in results:
            b_n = r.lr_noise_scale if r.lr_noise_scale is not None else math.inf
            c = branches.calibrated(r, b_n, Interval(b_n, b_n))
            calibrated.append(None if c is None else c[0])
        # the run average from the start to here: the reads of the same probe run at its
        # start and at every target up to this one (branches.run_average)
        def so_far(r: dict[str, Any]) -> list[dict[str, Any]]:
            return [x for x in res["rows"] if x["seed"] == r["seed"] and x["step"] <= r["step"]]

        averages = [branches.run_average(
            [(x["step"], x["result"].critical_batch) for x in so_far(r)
             if x["result"].critical_batch is not None], res["baseline_batch"])
            if r["result"].critical_batch is not None else None for r in rows]
        average_examples = [sum(x["result"].examples for x in so_far(r)) for r in rows]
        agree = (None if None in cbs or len(cbs) < 2
                 else max(cbs) / min(cbs) <= 2)  # type: ignore[type-var,operator]
        out.append({
            "target": t, "b_crit": b_crit, "b_crit_se": fit["b_crit_se"] if fit else None,
            "local_before": local[t][0], "local_after": local[t][1],
            "steps": [r["step"] for r in rows], "seeds": [r["seed"] for r in rows],
            "loss_at_step": [r["loss_at_step"] for r in rows],
            "critical_batch": cbs, "bound": [r.bound for r in results],
            "ratio": [_ratio(c, b_crit) for c in cbs],
            "within_2x": [None if c is None or b_crit is None else
                          0.5 <= c / b_crit <= 2.0 for c in cbs],
            "seeds_agree": agree,
            "b_simple": [r.b_simple for r in results], "b_noise": [r.b_noise for r in results],
            "b_simple_ratio": [_ratio(r.b_simple, b_crit) for r in results],
            "b_noise_ratio": [_ratio(r.b_noise, b_crit) for r in results],
            "b_simple_median_ratio": _ratio(pooled["b_simple"], b_crit) if pooled else None,
            "b_noise_median_ratio": _ratio(pooled["b_noise"], b_crit) if pooled else None,
            "scaled_ratio": [_ratio(s, b_crit) for s in scaled],
            "basis": [r.lr_noise_scale for r in results],
            "basis_ratio": [_ratio(r.lr_noise_scale, b_crit) for r in results],
            "run_average": averages,
            "run_average_ratio": [_ratio(a, b_crit) for a in averages],
            "run_average_examples": average_examples,
            "run_average_share": [e / sweep for e in average_examples],
            "calibrated": calibrated,
            "calibrated_ratio": [_ratio(c, b_crit) for c in calibrated],
            "examples": [r.examples for r in results],
            "seconds": [r.seconds for r in results],
            "sweep_examples": sweep,
            "share_of_sweep": [r.examples / sweep for r in results],
        })
    return out


def _table(rows: list[dict[str, str]]) -> str:
    head = list(rows[0])
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    lines += ["| " + " | ".join(r[h] for h in head) + " |" for r in rows]
    return "\n".join(lines)


def render_markdown(res: dict[str, Any], crit: dict[str, Any], rows: list[dict[str, Any]],
                    seconds: float) -> str:
    mark = {"bracketed": "", "at most": "≤", "at least": "≥", "none": "?"}
    table = []
    for r in rows:
        table.append({
            "target loss": f"{r['target']:g}",
            "fitted B_crit ± s.e.": f"{fmt_num(r['b_crit'])} ± {fmt_num(r['b_crit_se'], 2)}",
            "local B_crit before / after": _pair([r["local_before"], r["local_after"]]),
            "B0 step (loss there)": " / ".join(
                f"{s} ({fmt_num(x)}{'!' if x > r['target'] else ''})"
                for s, x in zip(r["steps"], r["loss_at_step"], strict=True)),
            "branch critical batch": " / ".join(
                f"{mark[b]}{c}" if c is not None else "—"
                for c, b in zip(r["critical_batch"], r["bound"], strict=True)),
            "branch / B_crit": _pair(r["ratio"], lambda v: f"{v:.2f}"),
            "run average from the start (÷ B_crit)": " / ".join(
                "—" if a is None else f"{fmt_num(a)} ({q:.2f})"
                for a, q in zip(r["run_average"], r["run_average_ratio"], strict=True)),
            "seeds within one doubling": {True: "yes", False: "no", None: "—"}[r["seeds_agree"]],
            "B_simple / B_crit (median)": _pair(r["b_simple_ratio"], lambda v: f"{v:.2f}")
            + f" ({fmt_num(r['b_simple_median_ratio'])})",
            "B_noise / B_crit (median)": _pair(r["b_noise_ratio"], lambda v: f"{v:.2f}")
            + f" ({fmt_num(r['b_noise_median_ratio'])})",
            "advisor's B_n = √(basis · branch) / B_crit": _pair(r["calibrated_ratio"],
                                                                lambda v: f"{v:.2f}"),
            "B_simple median × ratio / B_crit": _pair(r["scaled_ratio"], lambda v: f"{v:.2f}"),
            "branch examples (% of sweep)": " / ".join(
                f"{e:,} ({100 * s:.1f}%)" for e, s in zip(r["examples"], r["share_of_sweep"],
                                                           strict=True)),
            "run average examples (% of sweep)": " / ".join(
                f"{e:,} ({100 * q:.1f}%)" for e, q in zip(r["run_average_examples"],
                                                          r["run_average_share"], strict=True)),
            "seconds": _pair(r["seconds"], lambda v: f"{v:.1f}"),
        })
    ratios = [v for r in rows for v in r["ratio"] if v is not None]
    within = sum(0.5 <= v <= 2.0 for v in ratios)

    def hits(key: str) -> str:
        values = [v for r in rows for v in r[key] if v is not None]
        return f"{sum(0.5 <= v <= 2.0 for v in values)} of {len(values)}"

    agree = [r["seeds_agree"] for r in rows if r["seeds_agree"] is not None]
    per_seed_total = {s: sum(x["result"].examples for x in res["rows"] if x["seed"] == s)
                      for s in {x["seed"] for x in res["rows"]}}
    sweep = sweep_examples(crit)
    detail = []
    for row in res["rows"]:
        g: BranchResult = row["result"]
        detail.append({
            "target / seed / step": (f"{row['target']:g}" if math.isfinite(row["target"])
                                     else "start") + f" / {row['seed']} / {row['step']}",
            "rungs: batch (lr) smoothed loss vs B/2 after Δ/√2": "; ".join(
                f"{x.batch_size} ({x.learning_rate:.2g}) {x.loss:.4g}"
                + ("" if x.reference is None else f" vs {x.reference:.4g} "
                   + ("kept up" if x.passed else "fell behind")) for x in g.rungs),
            "result": f"{mark[g.bound]}{g.critical_batch} ({g.stopped})",
        })
    r0 = res["rows"][0]["result"]
    return "\n".join([
        f"### {res['name']}: the branch measurement against the fitted critical batch",
        "",
        f"{res['optimizer']}, B0 = {res['baseline_batch']}, lr0 = {res['lr']:g} (the tuned "
        f"LR the sweep's probe runs trained with). Branches from the weights and optimizer "
        f"state where each probe run (seed 0 / seed 1) first reached the target: "
        f"{r0.repeats} data orders per rung, Δ = {r0.delta_examples:,} examples "
        f"({r0.delta_examples // r0.baseline_batch} steps at B0), smoothing over the last "
        f"{r0.smoothing:.0%} of Δ, tolerance √2 in examples, {r0.lr_rule} learning rate. "
        f"≤ / ≥: the ladder could not bracket it (the first doubling failed / no rung "
        f"failed). Loss there: the rebuilt run's training loss at that step on the sweep's "
        f"evaluation subset (!: above the target, the rebuilt run drifted from the sweep's; "
        f"B_simple and B_noise are measured at the rebuilt weights). Local B_crit: fitted "
        f"to the steps between consecutive targets (before / after this one). B_simple "
        f"median: the sweep's, over its checkpoints around the crossing. Sweep: {sweep:,} "
        f"training examples "
        f"(scripts/critical_batch.py, every run's steps × batch). Took {seconds / 60:.1f} "
        f"min on {torch.get_num_threads()} CPU thread(s).",
        "",
        _table(table),
        "",
        "At the start (step 0, a fresh optimizer): " + ("; ".join(
            f"seed {x['seed']} {mark[x['result'].bound]}{x['result'].critical_batch} "
            f"({x['result'].examples:,} examples)"
            for x in res["rows"] if not math.isfinite(x["target"])) or "not measured") + ".",
        "",
        f"Within 2× of the fitted B_crit: the branches {within} of {len(ratios)}; their run "
        f"average from the start (branches.run_average over the same run's reads at its "
        f"start and at every target so far) {hits('run_average_ratio')}; B_simple "
        f"at the same weights {hits('b_simple_ratio')}; the advisor's basis there (B_noise "
        f"for SGD, else B_simple) {hits('basis_ratio')}; their geometric mean with the "
        f"branches, which the advisor uses, {hits('calibrated_ratio')}; the sweep's B_simple "
        f"median times the branches' ratio {hits('scaled_ratio')}. Two seeds within one "
        f"doubling: {sum(agree)} of {len(agree)}. All targets of one seed together (and its "
        f"start): "
        + ", ".join(f"seed {s} {e:,} examples ({100 * e / sweep:.1f}% of the sweep)"
                    for s, e in sorted(per_seed_total.items())) + ".",
        "",
        "Every ladder:",
        "",
        _table(detail),
        "",
    ])


def to_json(res: dict[str, Any], rows: list[dict[str, Any]], seconds: float) -> dict[str, Any]:
    return _train.jsonable({
        "name": res["name"], "optimizer": res["optimizer"], "overrides": res["overrides"],
        "baseline_batch": res["baseline_batch"], "lr": res["lr"], "seconds": seconds,
        "threads": torch.get_num_threads(),
        "constants": {"branch_steps": res["branch_steps"], "max_factor": branches.MAX_FACTOR,
                      "tolerance": branches.TOLERANCE, "smoothing": branches.SMOOTHING,
                      "repeats": branches.REPEATS, "evaluations": branches.EVALUATIONS},
        "summary": rows,
        "measurements": [{**{k: v for k, v in r.items() if k != "result"},
                          "branches": branch_dict(r["result"])} for r in res["rows"]],
    })


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("spec")
    ap.add_argument("--crit", default=None,
                    help="the sweep's JSON (default docs/img/critical-batch-<spec name>.json)")
    ap.add_argument("--seeds", default="0,1", help="probe runs (data orders) to branch from")
    ap.add_argument("--targets", default=None, help="only these target losses, e.g. 0.3,0.1")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="spec override to rebuild the sweep's model, e.g. "
                    "model.kwargs.context=64 (repeatable)")
    ap.add_argument("--lr-measured", default=None, metavar="BATCH:FACTOR",
                    help="correct the rungs' rule learning rates by one measured at BATCH "
                         "(FACTOR x the rule's there; advisor.lr_correction), e.g. 264:2")
    ap.add_argument("--branch-steps", type=int, default=branches.BRANCH_STEPS,
                    help="Δ in baseline steps (default branches.BRANCH_STEPS; a multiple "
                         "of branches.MAX_FACTOR)")
    ap.add_argument("--no-start", action="store_true",
                    help="skip the branches at each probe run's step 0 (the run average "
                         "then starts at the first target)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=None,
                    help="output prefix (default docs/img/branch-<spec name>)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    name = Path(args.spec).stem
    crit = json.loads(Path(args.crit or f"docs/img/critical-batch-{name}.json").read_text())

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    start = time.perf_counter()
    measured = None
    if args.lr_measured:
        b, f = args.lr_measured.split(":")
        measured = (int(b), float(f))
    res = gather(args.spec, crit, _train.parse_ints(args.seeds),
                 _train.parse_floats(args.targets) if args.targets else None, log, args.set,
                 measured, args.branch_steps, from_init=not args.no_start)
    seconds = time.perf_counter() - start
    rows = summary(res, crit)
    md = render_markdown(res, crit, rows, seconds)
    print(md)
    prefix = Path(args.out or f"docs/img/branch-{name}")
    prefix.parent.mkdir(parents=True, exist_ok=True)
    prefix.with_suffix(".md").write_text(md, encoding="utf-8")
    doc = to_json(res, rows, seconds)
    doc["command"] = " ".join(["scripts/branch_eval.py", *(argv or sys.argv[1:])])
    prefix.with_suffix(".json").write_text(json.dumps(doc, indent=1), encoding="utf-8")
    log(f"wrote {prefix}.md, .json in {seconds / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
