"""The seed post's experiment, small: is bsfind's recommended batch really faster?

    .venv/bin/python scripts/equal_time.py configs/digits-mlp.yaml --seconds 6

1. Ask bsfind (``bsfind.api.recommend(spec)``) for a batch size, learning rate
   and predicted wall-clock ratio against the spec's baseline (B0, lr0).
2. Split the dataset into training and held-out parts (``--holdout``).
3. From the same initial weights, train the recommended (B*, lr*) and the
   baseline (B0, lr0) for the same training wall-clock budget (``--seconds``;
   evaluation pauses the clock), then keep training the baseline until it
   matches the recommended run's final training loss, and its held-out
   accuracy (capped at ``--max-factor`` × the budget).
4. Report accuracy, time and steps of each run, and the measured time ratio
   (recommended time / baseline time to the same result) beside bsfind's
   ``predicted_time_ratio``; split into a steps ratio and a step-time ratio
   so a miss can be traced to the noise scale or to the hardware model.

If ``recommend`` fails, the script says so and stops, unless ``--batch`` and
``--lr`` give the candidate to test by hand. Writes PREFIX.md and PREFIX.json
(default docs/img/equal-time-<spec name>). Seeded; wall-clock numbers carry the
machine's timing noise (2 shared CPU cores here), so steps are reported too.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import _train
import numpy as np
import torch
from _train import fmt_num
from torch.utils.data import Subset, TensorDataset

from bsfind.seeds import Seeds
from bsfind.spec import Spec
from bsfind.workload import Workload

Log = Callable[[str], None]
# Evaluations per budget (spaced in training seconds); crossings are interpolated.
EVALS_PER_BUDGET = 40
# Metrics are compared as trailing means over this many evaluations (the last 1/8
# of the budget): a single evaluation of a hot SGD run swings 3x in training loss
# from one evaluation to the next, which made "the final loss" a coin toss.
SMOOTH_EVALS = 5


@dataclass(frozen=True)
class Point:
    step: int
    seconds: float  # training wall-clock (evaluation excluded)
    epochs: float
    train_loss: float
    train_acc: float
    heldout_loss: float
    heldout_acc: float


@dataclass
class TimedRun:
    label: str
    batch_size: int
    lr: float
    seed: int
    points: list[Point]  # raw evaluations
    smoothed: list[Point]  # trailing means over SMOOTH_EVALS evaluations
    at_budget: Point  # smoothed, at the budget
    median_step_s: float
    match_loss_s: float | None = None  # baseline only: time to the recommended run's loss
    match_loss_step: float | None = None
    match_acc_s: float | None = None
    match_acc_step: float | None = None


@dataclass
class Advice:
    batch_size: int
    lr: float
    predicted_time_ratio: float | None
    predicted_steps_ratio: float | None
    predicted_step_time_ratio: float | None
    b_simple: float | None
    b_simple_ci: tuple[float, float] | None
    b_noise: float | None
    noise_step: int | None
    lr_rule: str
    source: str  # "bsfind.api.recommend" or "manual (--batch/--lr)"
    note: str = ""


@dataclass
class EqualTimeResult:
    name: str
    optimizer: str
    baseline_batch: int
    baseline_lr: float
    advice: Advice
    budget_s: float
    train_examples: int
    heldout_examples: int
    runs: list[tuple[TimedRun, TimedRun]]  # (recommended, baseline) per seed
    settings: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0


# --------------------------------------------------------------------------- bsfind's advice


def get_advice(spec: Spec, batch: int | None, lr: float | None, log: Log | None) -> Advice:
    """bsfind's recommendation, or the manual one when given (and say which)."""
    if batch is not None and lr is not None:
        return Advice(batch, lr, None, None, None, None, None, None, None, "manual",
                      "manual (--batch/--lr)")
    from bsfind.api import recommend

    start = time.perf_counter()
    report = recommend(spec)
    rec = report.recommendation
    if rec is None:
        raise RuntimeError("recommend() returned no recommendation")
    steps_ratio = step_time_ratio = None
    base = next((c for c in report.candidates if c.is_baseline), None)
    best = next((c for c in report.candidates if c.is_recommended), None)
    if base is not None and best is not None and base.step_seconds > 0:
        steps_ratio = best.steps_ratio / base.steps_ratio if base.steps_ratio else None
        step_time_ratio = best.step_seconds / base.step_seconds
    used = report.used
    if log:
        log(f"bsfind recommends B={rec.batch_size} lr={rec.learning_rate:.3g} "
            f"(predicted time ratio {rec.predicted_time_ratio}) in "
            f"{time.perf_counter() - start:.0f}s")
    return Advice(
        batch_size=rec.batch_size, lr=rec.learning_rate,
        predicted_time_ratio=rec.predicted_time_ratio,
        predicted_steps_ratio=steps_ratio, predicted_step_time_ratio=step_time_ratio,
        b_simple=used.b_simple if used else None,
        b_simple_ci=(used.ci95.low, used.ci95.high) if used else None,
        b_noise=used.b_noise if used else None, noise_step=used.step if used else None,
        lr_rule=rec.lr_rule, source="bsfind.api.recommend",
        note="; ".join(report.warnings),
    )


# --------------------------------------------------------------------------- training


def split(job: Workload, holdout: float, seed: int) -> tuple[Workload, torch.Tensor]:
    """A training workload over (1 − holdout) of the data, and the held-out indices."""
    n = len(job)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_out = int(round(holdout * n))
    held, train = perm[:n_out].sort().values, perm[n_out:].sort().values
    ds = job.dataset
    if isinstance(ds, TensorDataset):
        sub: Any = TensorDataset(*(t[train] for t in ds.tensors))
    else:
        sub = Subset(ds, train.tolist())
    return job.with_dataset(sub), held


def smooth(points: Sequence[Point], k: int = SMOOTH_EVALS) -> list[Point]:
    """Each point's metrics replaced by the mean over it and the k − 1 before it."""
    out = []
    for i, p in enumerate(points):
        w = points[max(0, i - k + 1) : i + 1]
        out.append(dataclasses.replace(
            p, train_loss=float(np.mean([q.train_loss for q in w])),
            train_acc=float(np.mean([q.train_acc for q in w])),
            heldout_loss=float(np.mean([q.heldout_loss for q in w])),
            heldout_acc=float(np.mean([q.heldout_acc for q in w])),
        ))
    return out


def crossing(points: Sequence[Point], value: Callable[[Point], float], goal: float,
             below: bool) -> tuple[float, float] | None:
    """(seconds, step) at which ``value`` first reaches ``goal``, interpolated."""
    prev = None
    for p in points:
        v = value(p)
        if (v <= goal) if below else (v >= goal):
            if prev is None:
                return p.seconds, float(p.step)
            pv = value(prev)
            frac = (pv - goal) / (pv - v) if pv != v else 1.0
            return (prev.seconds + frac * (p.seconds - prev.seconds),
                    prev.step + frac * (p.step - prev.step))
        prev = p
    return None


def train_timed(
    train_job: Workload,
    full_job: Workload,
    init_state: _train.State,
    *,
    label: str,
    batch_size: int,
    lr: float,
    seed: int,
    budget_s: float,
    train_eval_idx: torch.Tensor,
    heldout_idx: torch.Tensor,
    until: Callable[[list[Point]], bool] | None = None,
    max_s: float | None = None,
    log: Log | None = None,
) -> TimedRun:
    """Train for ``budget_s`` training seconds, then on while ``until`` is unmet."""
    trainer = _train.Trainer(train_job, init_state, batch_size, lr, seed)
    every = budget_s / EVALS_PER_BUDGET

    def point() -> Point:
        tl, ta = _train.evaluate(train_job, train_eval_idx)
        hl, ha = _train.evaluate(full_job, heldout_idx)
        return Point(trainer.steps, trainer.train_seconds, trainer.epochs, tl, ta, hl, ha)

    points = [point()]
    at_budget: Point | None = None
    next_eval = every
    limit = max_s if until is not None and max_s is not None else budget_s
    while True:
        loss = trainer.step()
        if not math.isfinite(loss):
            if log:
                log(f"  {label}: loss is {loss} at step {trainer.steps}; stopping")
            break
        t = trainer.train_seconds
        if at_budget is None and t >= budget_s:
            at_budget = point()
            points.append(at_budget)
            next_eval = t + every
            if until is None or until(points):
                break
        elif t >= next_eval:
            points.append(point())
            next_eval = t + every
            if at_budget is not None and until is not None and until(points):
                break
        if t >= limit:
            break
    if at_budget is None:
        at_budget = points[-1]
    smoothed = smooth(points)
    if log:
        p = smoothed[-1]
        log(f"  {label}: B={trainer.batch_size} lr={lr:.3g} seed={seed}: {p.step} steps, "
            f"{p.seconds:.1f}s, train loss {p.train_loss:.4f}, held-out acc {p.heldout_acc:.4f}")
    return TimedRun(label=label, batch_size=trainer.batch_size, lr=lr, seed=seed,
                    points=points, smoothed=smoothed,
                    at_budget=smoothed[points.index(at_budget)],
                    median_step_s=float(np.median(trainer.step_times)))


def gather(
    spec: Spec,
    job: Workload,
    advice: Advice,
    *,
    budget_s: float,
    seeds: int = 1,
    holdout: float = 0.2,
    eval_examples: int = 512,
    max_factor: float = 8.0,
    name: str = "problem",
    log: Log | None = None,
) -> EqualTimeResult:
    """Both runs per seed, from the same initial weights; numbers only."""
    start = time.perf_counter()
    init_state = _train.snapshot(job.model)
    streams = Seeds(spec.probe.seed)
    train_job, held = split(job, holdout, streams.holdout_split)
    n_train = len(train_job)
    gen = torch.Generator().manual_seed(streams.evaluation_subset)
    train_eval_idx = torch.randperm(n_train, generator=gen)[: min(eval_examples, n_train)]
    heldout_idx = held[: max(eval_examples, 1) * 4]  # all of it unless the split is large
    b0, lr0 = spec.optimizer.batch_size, spec.optimizer.lr
    if advice.batch_size > n_train and log:
        log(f"note: recommended batch {advice.batch_size} > {n_train} training examples; "
            "capped (full-batch training)")
    pairs = []
    for seed in range(seeds):
        rec = train_timed(train_job, job, init_state, label="recommended",
                          batch_size=advice.batch_size, lr=advice.lr, seed=seed,
                          budget_s=budget_s, train_eval_idx=train_eval_idx,
                          heldout_idx=heldout_idx, log=log)
        goal_loss, goal_acc = rec.at_budget.train_loss, rec.at_budget.heldout_acc

        def matched(points: list[Point], gl: float = goal_loss, ga: float = goal_acc) -> bool:
            sm = smooth(points)
            return any(p.train_loss <= gl for p in sm) and any(p.heldout_acc >= ga for p in sm)

        base = train_timed(train_job, job, init_state, label="baseline",
                           batch_size=b0, lr=lr0, seed=seed, budget_s=budget_s,
                           train_eval_idx=train_eval_idx, heldout_idx=heldout_idx,
                           until=matched, max_s=max_factor * budget_s, log=log)
        c = crossing(base.smoothed, lambda p: p.train_loss, goal_loss, below=True)
        if c:
            base.match_loss_s, base.match_loss_step = c
        c = crossing(base.smoothed, lambda p: p.heldout_acc, goal_acc, below=False)
        if c:
            base.match_acc_s, base.match_acc_step = c
        pairs.append((rec, base))
    _train.restore(job.model, init_state)
    return EqualTimeResult(
        name=name, optimizer=spec.optimizer.name, baseline_batch=b0, baseline_lr=lr0,
        advice=advice, budget_s=budget_s, train_examples=n_train,
        heldout_examples=len(heldout_idx), runs=pairs, seconds=time.perf_counter() - start,
        settings={"seeds": seeds, "holdout": holdout, "eval_examples": len(train_eval_idx),
                  "max_factor": max_factor, "threads": torch.get_num_threads()},
    )


# --------------------------------------------------------------------------- rendering


def measured_ratios(res: EqualTimeResult) -> dict[str, float | None]:
    """Mean over seeds of recommended/baseline time (and steps, step time) to the same result."""

    def mean(values: list[float | None]) -> float | None:
        ok = [v for v in values if v is not None]
        return float(np.mean(ok)) if ok and len(ok) == len(values) else None

    loss_t: list[float | None] = []
    acc_t: list[float | None] = []
    steps: list[float | None] = []
    step_t: list[float | None] = []
    for rec, base in res.runs:
        t_rec = rec.at_budget.seconds
        loss_t.append(t_rec / base.match_loss_s if base.match_loss_s else None)
        acc_t.append(t_rec / base.match_acc_s if base.match_acc_s else None)
        steps.append(rec.at_budget.step / base.match_loss_step if base.match_loss_step
                     else None)
        step_t.append(rec.median_step_s / base.median_step_s)
    sr, tr = mean(steps), mean(step_t)
    ok = [v for v in loss_t if v is not None]
    return {"time_ratio_loss": mean(loss_t), "time_ratio_acc": mean(acc_t),
            "steps_ratio_loss": sr, "step_time_ratio": tr,
            # Steps are deterministic and the median step time shrugs off bursts of
            # load from other processes: the timing-noise-free version of the first row.
            "time_ratio_steps_x_median": sr * tr if sr is not None and tr is not None
            else None,
            "time_ratio_loss_min": min(ok) if ok else None,
            "time_ratio_loss_max": max(ok) if ok else None}


def _pct_saving(ratio: float | None) -> str:
    return "—" if ratio is None else f"{100 * (1 - ratio):.0f}%"


def render_markdown(res: EqualTimeResult) -> str:
    a = res.advice
    m = measured_ratios(res)
    out = [
        f"### {res.name}: equal wall-clock budget ({res.budget_s:g} s of training)",
        "",
        f"Baseline {res.optimizer} B0={res.baseline_batch}, lr0={res.baseline_lr:g}. "
        f"Advice ({a.source}): B={a.batch_size}, lr={a.lr:.3g} ({a.lr_rule} rule)"
        + (f", from B_simple={fmt_num(a.b_simple)}"
           f" [{fmt_num(a.b_simple_ci[0])}, {fmt_num(a.b_simple_ci[1])}]"
           f" at step {a.noise_step}" if a.b_simple and a.b_simple_ci else "")
        + (f", B_noise={fmt_num(a.b_noise)}" if a.b_noise else "") + ". "
        f"{res.train_examples} training / {res.heldout_examples} held-out examples; "
        f"{res.settings['threads']} CPU thread(s); evaluation excluded from the clock. "
        f"Losses and accuracies are trailing means over the last {SMOOTH_EVALS} of "
        f"{EVALS_PER_BUDGET} evaluations per budget, for both runs alike.",
        "",
    ]
    if a.note:
        out += [f"bsfind's warnings: {a.note}", ""]
    out += [
        "| run | seed | batch | lr | train time (s) | steps | epochs | train loss | "
        "train acc | held-out acc | median step (ms) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for rec, base in res.runs:
        last = base.smoothed[-1]
        rows = [("baseline, same budget", base, base.at_budget),
                ("baseline, until matched", base, last),
                ("recommended, same budget", rec, rec.at_budget)]
        for label, run, p in rows:
            out.append(
                f"| {label} | {run.seed} | {run.batch_size} | {run.lr:.3g} | {p.seconds:.3g} | "
                f"{p.step} | {p.epochs:.1f} | {p.train_loss:.4f} | {100 * p.train_acc:.2f}% | "
                f"{100 * p.heldout_acc:.2f}% | {1000 * run.median_step_s:.2f} |"
            )
    out += ["", "| per seed | baseline time to rec.'s train loss | ... to rec.'s held-out acc |",
            "|---|---|---|"]
    for rec, base in res.runs:
        def show(t: float | None, r: TimedRun = base) -> str:
            cap = r.points[-1].seconds
            return f"{t:.3g} s" if t is not None else f"not reached in {cap:.3g} s"
        out.append(f"| seed {rec.seed} | {show(base.match_loss_s)} | {show(base.match_acc_s)} |")
    pred = a.predicted_time_ratio
    out += [
        "",
        "| | predicted by bsfind | measured |",
        "|---|---|---|",
        f"| time ratio (recommended / baseline, same training loss) | {fmt_num(pred)} | "
        f"{fmt_num(m['time_ratio_loss'])}"
        + (f" (seeds: {fmt_num(m['time_ratio_loss_min'])}–{fmt_num(m['time_ratio_loss_max'])})"
           if len(res.runs) > 1 else "") + " |",
        f"| wall-clock saving | {_pct_saving(pred)} | {_pct_saving(m['time_ratio_loss'])} |",
        f"| same, as steps ratio × median step-time ratio (robust to load) | "
        f"{fmt_num(pred)} | {fmt_num(m['time_ratio_steps_x_median'])} |",
        f"| time ratio to the same held-out accuracy | — | {fmt_num(m['time_ratio_acc'])} |",
        f"| steps ratio S(B*)/S(B0) | {fmt_num(a.predicted_steps_ratio)} | "
        f"{fmt_num(m['steps_ratio_loss'])} |",
        f"| step-time ratio t(B*)/t(B0) | {fmt_num(a.predicted_step_time_ratio)} | "
        f"{fmt_num(m['step_time_ratio'])} |",
    ]
    return "\n".join(out) + "\n"


def to_json(res: EqualTimeResult) -> dict[str, Any]:
    doc = asdict(res)
    for pair in doc["runs"]:
        for run in pair:
            run.pop("smoothed", None)  # recomputed from "points" by smooth()
    doc["measured"] = measured_ratios(res)
    return _train.jsonable(doc)  # type: ignore[no-any-return]


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("spec")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="spec override, e.g. probe.warmup_steps=200 (repeatable)")
    ap.add_argument("--seconds", type=float, default=10.0,
                    help="training wall-clock budget of each run")
    ap.add_argument("--seeds", type=int, default=1)
    ap.add_argument("--holdout", type=float, default=0.2)
    ap.add_argument("--eval-examples", type=int, default=512)
    ap.add_argument("--max-factor", type=float, default=8.0,
                    help="the baseline trains at most this × the budget to match")
    ap.add_argument("--batch", type=int, default=None, help="test this batch instead of asking")
    ap.add_argument("--lr", type=float, default=None, help="... with this learning rate")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=None,
                    help="output prefix (default docs/img/equal-time-<spec name>)")
    args = ap.parse_args(argv)
    if (args.batch is None) != (args.lr is None):
        ap.error("--batch and --lr go together")

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    torch.set_num_threads(args.threads)  # before recommend(): its timing must match ours
    spec, job = _train.load_job(args.spec, args.set)
    name = Path(args.spec).stem
    try:
        advice = get_advice(spec, args.batch, args.lr, log)
    except Exception as exc:
        log(f"bsfind.api.recommend failed: {type(exc).__name__}: {exc}")
        log("re-run with --batch B --lr LR to test a candidate by hand")
        return 1
    res = gather(spec, job, advice, budget_s=args.seconds, seeds=args.seeds,
                 holdout=args.holdout, eval_examples=args.eval_examples,
                 max_factor=args.max_factor, name=name, log=log)
    res.settings["command"] = " ".join(["scripts/equal_time.py", *sys.argv[1:]])
    md = render_markdown(res)
    print(md)
    prefix = Path(args.out or f"docs/img/equal-time-{name}")
    prefix.parent.mkdir(parents=True, exist_ok=True)
    prefix.with_suffix(".md").write_text(md, encoding="utf-8")
    prefix.with_suffix(".json").write_text(json.dumps(to_json(res), indent=1), encoding="utf-8")
    log(f"wrote {prefix}.md and .json in {res.seconds / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
