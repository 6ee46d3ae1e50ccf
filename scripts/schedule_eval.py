"""bsfind's default advice and its batch-size schedule against the best constant batch.

    .venv/bin/python scripts/schedule_eval.py configs/digits-mlp.yaml --target 0.01

From the same initial weights and the same data orders (``--seeds``), train
four ways until the training loss on a fixed subset (the critical-batch
study's: ``Seeds(probe.seed).evaluation_subset``, ``--eval-examples``) first
reaches ``--target``:

1. **baseline**: the spec's batch B0 and learning rate lr0;
2. **best constant**: the batch with the least predicted time to the target,
   steps from the critical-batch sweep (``--sweep``, the JSON that
   ``scripts/critical_batch.py`` writes: per batch, the best LR and the mean
   steps over its seeds) × the median step time measured here, before the
   runs, in interleaved shuffled passes; trained at the sweep's best LR;
3. **bsfind**: ``bsfind.api.recommend(spec)`` in this process (the default
   probe along training), its constant batch and learning rate;
4. **schedule**: the same report's ``schedule``: batch and learning rate
   switch at each phase's start step (optimizer state kept; the sampler
   rebuilt on the same data order, ``_train.Trainer.switch``); the last phase
   runs on until the target.

Every (way, seed) run is repeated ``--reps`` times, all runs interleaved in a
shuffled order, so that load from other processes falls on every way alike.
Steps are deterministic; the wall-clock to the target (training steps only,
evaluation excluded, interpolated between evaluations like the steps) is the
median over the repetitions. The load-robust variant is steps × median step
time, phase by phase, the median pooled over every step this experiment took
at that batch size.

Reported: steps and seconds to the target per way and seed; bsfind's
``predicted_time_ratio`` and the schedule's predicted seconds against the
measured; the regret, seconds(bsfind) / seconds(best constant), and
seconds(schedule) / seconds(best constant). Writes PREFIX.md and PREFIX.json
(default docs/img/schedule-eval-<spec name>); the JSON holds bsfind's whole
report, which ``--report`` reads back instead of calling ``recommend`` again.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import statistics
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

from bsfind.seeds import Seeds
from bsfind.spec import Spec
from bsfind.workload import Workload

Log = Callable[[str], None]
LABELS = {"baseline": "baseline (spec)", "bsfind": "bsfind recommend",
          "schedule": "bsfind schedule",
          "bsfind_sweep_lr": "diagnostic: bsfind's batch, sweep's LR"}
# Acceptance of issue #13: bsfind's constant batch within this × the best constant
# batch's wall-clock to the target.
REGRET_LIMIT = 1.25
# The step time the best constant batch is picked with: this quantile of each batch's
# timed steps (0: the fastest). Other processes only add time; on 2 cores shared by 3-4
# busy processes, bursts covered most of one batch's 40 samples (digits-cnn, B=128: the
# 25th percentile read 10.2 ms, the runs' median 5.8 ms), so the fastest step is read,
# as bsfind's own timing does.
LADDER_QUANTILE = 0.0
# The sweep's step counts carry ±10-20% noise (2 seeds, a factor-2 LR grid), so every
# batch predicted within this fraction of the least time is trained as a candidate,
# at most MAX_CANDIDATES of them; the best constant batch is the measured fastest.
NEAR_BEST = 0.15
MAX_CANDIDATES = 3


# --------------------------------------------------------------------------- inputs


@dataclass(frozen=True)
class Phase:
    start_step: int
    batch_size: int
    lr: float


@dataclass(frozen=True)
class Way:
    key: str  # one of WAYS
    phases: tuple[Phase, ...]

    @property
    def batches(self) -> list[int]:
        return [p.batch_size for p in self.phases]


@dataclass(frozen=True)
class Sweep:
    """The critical-batch sweep at one target: per batch, mean steps and best LR."""

    path: str
    target: float
    steps: dict[int, float | None]
    lr: dict[int, float | None]
    edge: dict[int, bool]
    s_min: float | None  # the fit S(B) = S_min(1 + B_crit/B) at this target
    b_crit: float | None
    seeds: int
    eval_examples: int
    eval_frac: float
    runs: list[tuple[int, float, int, float | None]] = field(default_factory=list)
    # (batch, lr, seed, steps to the target) of every sweep run

    def seed_steps(self, b: int, lr: float, seed: int) -> float | None:
        """The sweep's steps to the target at this batch, LR and data order (None: not run
        or not reached)."""
        return next((s for bb, ll, sd, s in self.runs if bb == b and sd == seed
                     and math.isclose(ll, lr, rel_tol=1e-6)), None)

    def lr_at(self, b: int) -> float | None:
        """The sweep's best LR at batch ``b``: its own, else log-log interpolated between
        the neighbouring batches' (None outside the swept range)."""
        known = sorted((k, v) for k, v in self.lr.items() if v is not None)
        for (b1, l1), (b2, l2) in zip(known, known[1:], strict=False):
            if b1 <= b <= b2:
                w = math.log(b / b1) / math.log(b2 / b1)
                return math.exp((1 - w) * math.log(l1) + w * math.log(l2))
        return dict(known).get(b)

    def fit_steps(self, b: float) -> float | None:
        if self.s_min is None or self.b_crit is None or not math.isfinite(self.b_crit):
            return None
        return self.s_min * (1 + self.b_crit / b)


def _key_for(mapping: dict[str, Any], target: float) -> str:
    for k in mapping:
        if math.isclose(float(k), target, rel_tol=1e-9):
            return k
    raise KeyError(f"target {target:g} not in the sweep (it has {', '.join(mapping)})")


def load_sweep(path: Path, target: float | None) -> Sweep:
    """Read a ``critical_batch.py`` JSON at ``target`` (default: its lowest target)."""
    doc = json.loads(path.read_text(encoding="utf-8"))
    t = min(doc["targets"]) if target is None else target
    steps, lr, edge = {}, {}, {}
    runs = []
    for b in doc["batches"]:
        k = _key_for(b["best_steps"], t)
        runs += [(int(b["batch_size"]), float(r["lr"]), int(r["seed"]),
                  r["crossings"].get(_key_for(r["crossings"], t)))
                 for r in b.get("runs", [])]
        steps[int(b["batch_size"])] = b["best_steps"][k]
        lr[int(b["batch_size"])] = b["best_lr"][k]
        edge[int(b["batch_size"])] = bool(b["edge"][k])
    fit = doc["fits"].get(_key_for(doc["fits"], t)) if doc.get("fits") else None
    settings = doc.get("settings", {})
    return Sweep(path=str(path), target=t, steps=steps, lr=lr, edge=edge,
                 s_min=fit["s_min"] if fit else None, b_crit=fit["b_crit"] if fit else None,
                 seeds=int(doc.get("seeds", 0)),
                 eval_examples=int(settings.get("eval_examples", 512)),
                 eval_frac=float(settings.get("eval_frac", 0.03)), runs=runs)


@dataclass
class Advice:
    """What ``bsfind recommend`` said, read from its JSON document."""

    batch_size: int
    lr: float
    lr_rule: str
    predicted_time_ratio: float | None
    predicted_steps_ratio: float | None
    predicted_step_time_ratio: float | None
    b_simple: float | None
    b_simple_ci: list[float] | None
    b_noise: float | None
    noise_steps: list[int]  # the training steps the noise scale is the median over
    basis: str
    t0: float | None  # the step-time line bsfind fitted: t(B) = t0 + c·B
    c: float | None
    timing_quality: str | None
    schedule: dict[str, Any] | None
    status: str
    warnings: list[str]
    source: str  # "bsfind.api.recommend (N s)" or the --report file
    report: dict[str, Any] = field(default_factory=dict)

    def predicted_step_time(self, b: int) -> float | None:
        if self.t0 is None or self.c is None or self.timing_quality == "untrusted":
            return None
        return self.t0 + self.c * b


def advice_from_report(doc: dict[str, Any], source: str) -> Advice:
    """The fields this experiment needs from a ``bsfind recommend --json`` document."""
    rec = doc["recommendation"]
    if rec is None:
        raise RuntimeError("the report has no recommendation")
    cands = doc.get("candidates") or []
    base = next((c for c in cands if c["is_baseline"]), None)
    best = next((c for c in cands if c["is_recommended"]), None)
    steps_ratio = step_time_ratio = None
    # A timing bsfind did not trust has no step seconds (null in the JSON).
    if base and best and base["step_seconds"] and best["step_seconds"] \
            and base["steps_ratio"]:
        steps_ratio = best["steps_ratio"] / base["steps_ratio"]
        step_time_ratio = best["step_seconds"] / base["step_seconds"]
    used = doc.get("noise_scale") or {}
    timing = doc.get("timing") or {}
    return Advice(
        batch_size=int(rec["batch_size"]), lr=float(rec["learning_rate"]),
        lr_rule=rec["lr_rule"], predicted_time_ratio=rec.get("predicted_time_ratio"),
        predicted_steps_ratio=steps_ratio, predicted_step_time_ratio=step_time_ratio,
        b_simple=used.get("b_simple"), b_simple_ci=used.get("ci95"),
        b_noise=used.get("b_noise"),
        noise_steps=list(used.get("summary_of") or [used.get("step", 0)]),
        basis=rec.get("basis", ""), t0=timing.get("t0"), c=timing.get("per_example"),
        timing_quality=timing.get("quality"), schedule=doc.get("schedule"),
        status=doc.get("status", "?"), warnings=list(doc.get("warnings") or []),
        source=source, report=doc,
    )


def get_advice(spec: Spec, report_path: str | None, log: Log | None) -> Advice:
    """``bsfind.api.recommend(spec)`` in this process, or a saved report (``--report``)."""
    if report_path is not None:
        doc = json.loads(Path(report_path).read_text(encoding="utf-8"))
        doc = doc.get("report", doc)  # this script's own JSON holds the report under "report"
        return advice_from_report(doc, f"saved report {report_path}")
    from bsfind.api import recommend
    from bsfind.report import to_dict

    start = time.perf_counter()
    report = recommend(spec)
    took = time.perf_counter() - start
    adv = advice_from_report(to_dict(report), f"bsfind.api.recommend ({took:.0f} s)")
    if log:
        log(f"bsfind recommends B={adv.batch_size} lr={adv.lr:.3g} (predicted time ratio "
            f"{fmt_num(adv.predicted_time_ratio)}); schedule "
            f"{[(p.start_step, p.batch_size) for p in schedule_phases(adv)]}; {took:.0f} s")
    return adv


def schedule_phases(adv: Advice) -> list[Phase]:
    if not adv.schedule:
        return []
    return [Phase(int(p["start_step"]), int(p["batch_size"]), float(p["learning_rate"]))
            for p in adv.schedule["phases"]]


# --------------------------------------------------------------------------- step times


def time_batches(job: Workload, init_state: _train.State, lrs: dict[int, float], *,
                 passes: int, steps: int, seed: int) -> dict[int, list[float]]:
    """Step times per batch: ``passes`` shuffled passes over the batches, ``steps`` timed
    steps each (after one untimed step), from the initial weights every time."""
    rng = random.Random(seed)
    times: dict[int, list[float]] = {b: [] for b in lrs}
    for _ in range(passes):
        order = list(lrs)
        rng.shuffle(order)
        for b in order:
            trainer = _train.Trainer(job, init_state, b, lrs[b], seed)
            trainer.step()  # first step: optimizer state allocated
            trainer.step_times.clear()
            for _ in range(steps):
                trainer.step()
            times[b].extend(trainer.step_times)
    _train.restore(job.model, init_state)
    return times


# --------------------------------------------------------------------------- the runs


@dataclass
class Run:
    way: str
    seed: int
    rep: int
    phases: tuple[Phase, ...]
    steps: float | None  # optimizer steps to the target (interpolated); None: not reached
    seconds: float | None  # training wall-clock to the target (interpolated)
    steps_run: int
    examples: int
    final_loss: float
    diverged: bool
    curve: list[tuple[int, float, float]]  # (step, training seconds, loss) per evaluation
    step_times: dict[int, list[float]]  # batch -> every step's seconds at that batch

    def steps_by_batch(self) -> dict[int, float]:
        """Steps to the target spent in each phase's batch (None: not reached)."""
        out: dict[int, float] = {}
        if self.steps is None:
            return out
        for i, p in enumerate(self.phases):
            end = self.phases[i + 1].start_step if i + 1 < len(self.phases) else math.inf
            n = max(0.0, min(self.steps, end) - p.start_step)
            if n > 0:
                out[p.batch_size] = out.get(p.batch_size, 0.0) + n
        return out


def run_way(job: Workload, init_state: _train.State, way: Way, *, seed: int, rep: int,
            target: float, max_steps: int, eval_idx: torch.Tensor, eval_frac: float,
            loss0: float) -> Run:
    """Train one way from the initial weights until the evaluation loss reaches ``target``."""
    phases = way.phases
    trainer = _train.Trainer(job, init_state, phases[0].batch_size, phases[0].lr, seed)
    nxt = 1
    curve = [(0, 0.0, loss0)]
    step_times: dict[int, list[float]] = {}
    steps = seconds = None
    diverged = False
    last = curve[0]
    while trainer.steps < max_steps:
        if nxt < len(phases) and trainer.steps >= phases[nxt].start_step:
            trainer.switch(phases[nxt].batch_size, phases[nxt].lr)
            nxt += 1
        b = trainer.batch_size
        trainer.step()
        step_times.setdefault(b, []).append(trainer.step_times[-1])
        s = trainer.steps
        if not (_train.eval_due(s, last[0], eval_frac) or s == max_steps):
            continue
        loss, _ = _train.evaluate(job, eval_idx)
        point = (s, trainer.train_seconds, loss)
        curve.append(point)
        if not math.isfinite(loss) or loss > _train.DIVERGED_FACTOR * loss0:
            diverged = True
            break
        if loss <= target:
            # Linear interpolation between the two evaluations that bracket the target.
            frac = (last[2] - target) / (last[2] - loss) if last[2] > loss else 1.0
            steps = last[0] + frac * (s - last[0])
            seconds = last[1] + frac * (point[1] - last[1])
            break
        last = point
    return Run(way=way.key, seed=seed, rep=rep, phases=phases, steps=steps, seconds=seconds,
               steps_run=trainer.steps, examples=trainer.examples, final_loss=curve[-1][2],
               diverged=diverged, curve=curve, step_times=step_times)


# --------------------------------------------------------------------------- the experiment


@dataclass
class Result:
    name: str
    optimizer: str
    baseline_batch: int
    baseline_lr: float
    target: float
    dataset_size: int
    sweep: Sweep
    advice: Advice
    ladder: dict[int, float]  # batch -> step seconds (LADDER_QUANTILE; interleaved, before runs)
    predicted: dict[int, float | None]  # sweep batch -> sweep steps × ladder step time
    ways: dict[str, Way]  # every distinct way trained
    aliases: dict[str, str]  # a way identical to one already trained -> that one's key
    candidates: list[str]  # the constant ways the best constant batch is chosen among
    runs: list[Run]
    settings: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0

    def key(self, way: str) -> str:
        return self.aliases.get(way, way)

    def has(self, way: str) -> bool:
        return self.key(way) in self.ways


def candidate_batches(sweep: Sweep, ladder: dict[int, float]
                      ) -> tuple[list[int], dict[int, float | None]]:
    """The sweep's batches by predicted time (steps × measured step time): the least, and
    the others within NEAR_BEST of it (at most MAX_CANDIDATES in all)."""
    predicted: dict[int, float | None] = {}
    for b, s in sweep.steps.items():
        predicted[b] = None if s is None or b not in ladder else s * ladder[b]
    done = {b: v for b, v in predicted.items() if v is not None}
    if not done:
        raise RuntimeError(f"no batch of the sweep reached the target {sweep.target:g}")
    ranked = sorted(done, key=lambda b: done[b])
    near = [b for b in ranked if done[b] <= (1 + NEAR_BEST) * done[ranked[0]]]
    return near[:MAX_CANDIDATES], predicted


def parse_way(text: str) -> Way:
    """``NAME=STEP:BATCH:LR[,STEP:BATCH:LR...]`` (``--way``) -> the way ``extra-NAME``."""
    name, _, body = text.partition("=")
    try:
        phases = tuple(Phase(int(a), int(b), float(c)) for a, b, c in
                       (part.split(":") for part in body.split(",")))
    except ValueError:
        raise ValueError(f"--way {text!r}: expected NAME=STEP:BATCH:LR[,...]") from None
    if not name or not phases or phases[0].start_step != 0 or any(
            q.start_step <= p.start_step for p, q in zip(phases, phases[1:], strict=False)):
        raise ValueError(f"--way {text!r}: a name, and phases from step 0 in step order")
    return Way(f"extra-{name}", phases)


def plan_ways(spec: Spec, advice: Advice, sweep: Sweep, batches: list[int],
              extra: Sequence[Way] = ()) -> tuple[dict[str, Way], dict[str, str], list[str]]:
    """The distinct ways to train, aliases for duplicates, and the best-constant candidates.

    ``extra``: ways given by hand (``--way``), trained and shown, never candidates."""
    b0, lr0 = spec.optimizer.batch_size, spec.optimizer.lr
    wanted: list[Way] = [Way("baseline", (Phase(0, b0, lr0),))]
    for b in batches:
        lr = sweep.lr[b]
        assert lr is not None
        wanted.append(Way(f"const-{b}", (Phase(0, b, lr),)))
    wanted.append(Way("bsfind", (Phase(0, advice.batch_size, advice.lr),)))
    sched = schedule_phases(advice)
    if sched:
        wanted.append(Way("schedule", tuple(sched)))
    # Diagnostic: bsfind's batch at the LR the sweep found best there, which splits the
    # regret into the batch's share and the learning-rate rule's share.
    tuned = sweep.lr_at(advice.batch_size)
    if tuned is not None:
        wanted.append(Way("bsfind_sweep_lr", (Phase(0, advice.batch_size, tuned),)))
    wanted += extra
    ways: dict[str, Way] = {}
    aliases: dict[str, str] = {}
    for w in wanted:
        same = next((k for k, v in ways.items() if _same(v.phases, w.phases)), None)
        if same is None:
            ways[w.key] = w
        else:
            aliases[w.key] = same
    # The baseline competes for "best constant" when it is the sweep's own point (the
    # shipped configs' lr0 is the sweep's best LR at B0 for the target).
    candidates = [aliases.get(f"const-{b}", f"const-{b}") for b in batches]
    lr_b0 = sweep.lr.get(b0)
    if lr_b0 is not None and math.isclose(lr_b0, lr0, rel_tol=1e-6) and "baseline" not in \
            candidates:
        candidates.append("baseline")
    return ways, aliases, candidates


def _same(a: Sequence[Phase], b: Sequence[Phase]) -> bool:
    return len(a) == len(b) and all(
        p.start_step == q.start_step and p.batch_size == q.batch_size
        and math.isclose(p.lr, q.lr, rel_tol=1e-6) for p, q in zip(a, b, strict=True))


def gather(
    spec: Spec,
    job: Workload,
    advice: Advice,
    sweep: Sweep,
    *,
    seeds: int = 2,
    reps: int = 5,
    max_steps: int = 6000,
    eval_examples: int | None = None,
    eval_frac: float | None = None,
    ladder_passes: int = 8,
    ladder_steps: int = 8,
    extra: Sequence[Way] = (),
    name: str = "problem",
    log: Log | None = None,
) -> Result:
    """Pick the best constant batch's candidates, then run every way; numbers only."""
    start = time.perf_counter()
    load_before = os.getloadavg()
    init_state = _train.snapshot(job.model)
    n = len(job)
    eval_examples = sweep.eval_examples if eval_examples is None else eval_examples
    eval_frac = sweep.eval_frac if eval_frac is None else eval_frac
    # The critical-batch study's evaluation subset (critical_batch.gather): same seed, same size.
    gen = torch.Generator().manual_seed(Seeds(spec.probe.seed).evaluation_subset)
    eval_idx = torch.randperm(n, generator=gen)[: min(eval_examples, n)].sort().values
    _train.restore(job.model, init_state)
    loss0, _ = _train.evaluate(job, eval_idx)
    b0, lr0 = spec.optimizer.batch_size, spec.optimizer.lr

    lrs: dict[int, float] = {b: lr for b, lr in sweep.lr.items() if lr is not None}
    for b, lr in [(b0, lr0), (advice.batch_size, advice.lr),
                  *((p.batch_size, p.lr) for p in schedule_phases(advice))]:
        lrs.setdefault(b, lr)
    times = time_batches(job, init_state, lrs, passes=ladder_passes, steps=ladder_steps,
                         seed=spec.probe.seed)
    ladder = {b: float(np.quantile(v, LADDER_QUANTILE)) for b, v in sorted(times.items())}
    batches, predicted = candidate_batches(sweep, ladder)
    ways, aliases, candidates = plan_ways(spec, advice, sweep, batches, extra)
    if log:
        log("step times (ms): " + ", ".join(f"{b}: {1e3 * t:.3g}" for b, t in ladder.items()))
        log("best constant batch candidates (predicted s): "
            + ", ".join(f"{b} ({predicted[b]:.3g})" for b in batches)
            + f"; ways {list(ways)}, aliases {aliases}")
    rng = random.Random(spec.probe.seed)
    runs: list[Run] = []
    for rep in range(reps):
        for seed in range(seeds):
            order = list(ways)
            rng.shuffle(order)
            for key in order:
                r = run_way(job, init_state, ways[key], seed=seed, rep=rep,
                            target=sweep.target, max_steps=max_steps, eval_idx=eval_idx,
                            eval_frac=eval_frac, loss0=loss0)
                runs.append(r)
                if log:
                    flag = " DIVERGED" if r.diverged else ""
                    log(f"  rep {rep} seed {seed} {key:<15} B={ways[key].batches} "
                        f"steps {fmt_num(r.steps, 4)} seconds {fmt_num(r.seconds)}{flag}")
    _train.restore(job.model, init_state)
    return Result(
        name=name, optimizer=spec.optimizer.name, baseline_batch=b0, baseline_lr=lr0,
        target=sweep.target, dataset_size=n, sweep=sweep, advice=advice, ladder=ladder,
        predicted=predicted, ways=ways, aliases=aliases, candidates=candidates, runs=runs,
        seconds=time.perf_counter() - start,
        settings={"seeds": seeds, "reps": reps, "max_steps": max_steps,
                  "eval_examples": len(eval_idx), "eval_frac": eval_frac,
                  "ladder_passes": ladder_passes, "ladder_steps": ladder_steps,
                  "ladder_quantile": LADDER_QUANTILE, "near_best": NEAR_BEST,
                  "initial_loss": loss0, "threads": torch.get_num_threads(),
                  "load_before": load_before, "load_after": os.getloadavg()},
    )


# --------------------------------------------------------------------------- summaries

METRICS = ("seconds", "robust")  # measured wall-clock; steps × pooled median step time


@dataclass(frozen=True)
class Cell:
    """One way at one seed, over its repetitions."""

    way: str
    seed: int
    steps: float | None  # the same in every repetition (else the median; see steps_agree)
    steps_agree: bool
    seconds: float | None  # median over repetitions (None: some repetition missed the target)
    seconds_range: tuple[float, float] | None
    robust: float | None  # steps × pooled median step time, phase by phase
    examples: float | None  # examples to the target


def pooled_step_times(res: Result) -> dict[int, float]:
    """Median seconds per step at each batch over every run of the experiment."""
    pool: dict[int, list[float]] = {}
    for r in res.runs:
        for b, ts in r.step_times.items():
            pool.setdefault(b, []).extend(ts)
    return {b: float(np.median(ts)) for b, ts in sorted(pool.items())}


def cells(res: Result) -> dict[tuple[str, int], Cell]:
    """Per (way, seed), for every trained way (aliases: look up ``res.key(way)``)."""
    med = pooled_step_times(res)
    out = {}
    for key in res.ways:
        for seed in range(res.settings["seeds"]):
            rs = [r for r in res.runs if r.way == key and r.seed == seed]
            steps = [r.steps for r in rs]
            if not rs or any(v is None for v in steps):
                out[(key, seed)] = Cell(key, seed, None, True, None, None, None, None)
                continue
            s_ok = [v for v in steps if v is not None]
            t_ok = [r.seconds for r in rs if r.seconds is not None]
            by_batch = rs[0].steps_by_batch()
            out[(key, seed)] = Cell(
                way=key, seed=seed, steps=statistics.median(s_ok),
                steps_agree=max(s_ok) - min(s_ok) < 1e-6,
                seconds=statistics.median(t_ok), seconds_range=(min(t_ok), max(t_ok)),
                robust=sum(n * med[b] for b, n in by_batch.items()),
                examples=sum(n * b for b, n in by_batch.items()),
            )
    return out


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b <= 0 else a / b


def _mean(values: Sequence[float | None]) -> float | None:
    return None if not values or any(v is None for v in values) else float(
        np.mean([v for v in values if v is not None]))


def summary(res: Result) -> dict[str, Any]:
    """The best constant batch per metric and the ratios the acceptance points are stated in.

    The best constant batch is the candidate with the least mean over seeds of the
    metric (measured seconds, or the robust variant); per-seed ratios divide by that
    same candidate's run at the seed.
    """
    c = cells(res)
    seeds = list(range(res.settings["seeds"]))

    def get(way: str, seed: int, metric: str) -> float | None:
        if not res.has(way):
            return None
        return getattr(c[(res.key(way), seed)], metric)  # type: ignore[no-any-return]

    def mean(way: str, metric: str) -> float | None:
        return _mean([get(way, s, metric) for s in seeds])

    out: dict[str, Any] = {"step_times": pooled_step_times(res), "best": {}, "per_seed": []}
    for metric in METRICS:
        done = {k: m for k in res.candidates if (m := mean(k, metric)) is not None}
        out["best"][metric] = min(done, key=lambda k: done[k]) if done else None
    for seed in seeds:
        row: dict[str, Any] = {"seed": seed}
        for metric in METRICS:
            best = out["best"][metric]
            v = {k: get(k, seed, metric) for k in
                 ("baseline", "bsfind", "schedule", "bsfind_sweep_lr")}
            vb = get(best, seed, metric) if best else None
            row[metric] = {
                "regret": _ratio(v["bsfind"], vb),
                "schedule_vs_best": _ratio(v["schedule"], vb),
                "regret_at_sweep_lr": _ratio(v["bsfind_sweep_lr"], vb),
                "bsfind_vs_baseline": _ratio(v["bsfind"], v["baseline"]),
                "schedule_vs_baseline": _ratio(v["schedule"], v["baseline"]),
                "best_vs_baseline": _ratio(vb, v["baseline"]),
            }
        row["steps"] = {
            "bsfind_vs_baseline": _ratio(get("bsfind", seed, "steps"),
                                         get("baseline", seed, "steps")),
            "schedule_vs_baseline": _ratio(get("schedule", seed, "steps"),
                                           get("baseline", seed, "steps")),
        }
        out["per_seed"].append(row)
    for metric in (*METRICS, "steps"):
        out[metric] = {k: _mean([row[metric][k] for row in out["per_seed"]])
                       for k in out["per_seed"][0][metric]}
    for metric in METRICS:
        best = out["best"][metric]
        # The ratio of the seeds' mean times, beside the mean of the per-seed ratios.
        out[metric]["regret_of_means"] = _ratio(mean("bsfind", metric),
                                                mean(best, metric) if best else None)
        out[metric]["schedule_vs_best_of_means"] = _ratio(
            mean("schedule", metric), mean(best, metric) if best else None)
    med = out["step_times"]
    out["step_time_ratio"] = _ratio(med.get(res.advice.batch_size),
                                    med.get(res.baseline_batch))

    def every(metric: str, k: str, ok: Callable[[float], bool]) -> bool:
        vals = [row[metric][k] for row in out["per_seed"]]
        return all(v is not None and ok(v) for v in vals)

    out["acceptance"] = {
        "regret_within_limit": every("seconds", "regret", lambda v: v <= REGRET_LIMIT),
        "regret_within_limit_robust": every("robust", "regret", lambda v: v <= REGRET_LIMIT),
        "schedule_beats_best": every("seconds", "schedule_vs_best", lambda v: v < 1),
        "schedule_beats_best_robust": every("robust", "schedule_vs_best", lambda v: v < 1),
    }
    a = res.advice
    if a.schedule:
        out["schedule_predicted"] = {
            "seconds": a.schedule["predicted_seconds"],
            "baseline_seconds": a.schedule["baseline_seconds"],
            "time_ratio": a.schedule["predicted_time_ratio"],
            "steps": sum(p["steps"] for p in a.schedule["phases"]),
            "baseline_steps": a.schedule["horizon_examples"] / res.baseline_batch,
            "best_constant_batch": a.schedule["best_constant_batch"],
            "best_constant_seconds": a.schedule["best_constant_seconds"],
        }
    return out


# --------------------------------------------------------------------------- rendering


def _s(v: float | None) -> str:
    return "—" if v is None else f"{v:.3g}"


def _ms(v: float | None) -> str:
    return "—" if v is None else f"{1e3 * v:.3g}"


def yes(flag: bool) -> str:
    return "yes" if flag else "no"


def _batches(way: Way) -> str:
    if len(way.phases) == 1:
        return str(way.phases[0].batch_size)
    return " → ".join(f"{p.batch_size}@{p.start_step}" for p in way.phases)


def _lrs(way: Way) -> str:
    return " → ".join(f"{p.lr:.3g}" for p in way.phases)


def _label(res: Result, key: str, best: str | None) -> str:
    names = [LABELS.get(k, f"extra: {k[6:]}" if k.startswith("extra-") else
                        "constant (sweep candidate)") for k in
             [key, *(a for a, k in res.aliases.items() if k == key)]]
    text = " = ".join(dict.fromkeys(names))
    return f"**{text}, best constant**" if key == best else text


def _advice_lines(res: Result) -> list[str]:
    a = res.advice
    rng = f" [{fmt_num(a.b_simple_ci[0])}, {fmt_num(a.b_simple_ci[1])}]" if a.b_simple_ci else ""
    out = [
        f"bsfind ({a.source}, status {a.status}): B={a.batch_size}, lr={a.lr:.3g} "
        f"({a.lr_rule}), predicted time ratio {fmt_num(a.predicted_time_ratio)}, from "
        f"B_simple={fmt_num(a.b_simple)}{rng} (median at steps {a.noise_steps})"
        + (f", B_noise={fmt_num(a.b_noise)}" if a.b_noise else "")
        + (f"; step time {1e3 * a.t0:.3g} ms + {1e3 * a.c:.3g} ms·B ({a.timing_quality})"
           if a.t0 is not None and a.c is not None else "") + ".",
        "",
    ]
    if a.warnings:
        out += ["bsfind's warnings: " + " ".join(a.warnings), ""]
    if not a.schedule:
        return [*out, "bsfind gave no schedule.", ""]
    g = a.schedule["growth"]
    out += [
        f"Schedule: B_n(E) = {g['a']:.3g}·E^{g['p']:.2f} fitted over "
        f"{g['examples_from']:.0f}–{g['examples_to']:.0f} examples (R² "
        f"{fmt_num(g['r2'])}); horizon {a.schedule['horizon_examples']} examples "
        f"({a.schedule['horizon_source']}); predicted {a.schedule['predicted_seconds']:.3g} s "
        f"against {a.schedule['baseline_seconds']:.3g} s at B0 (ratio "
        f"{fmt_num(a.schedule['predicted_time_ratio'])}); bsfind's best constant batch "
        f"over the same horizon {a.schedule['best_constant_batch']} "
        f"({a.schedule['best_constant_seconds']:.3g} s).",
        "",
        "| phase | from step | batch | lr | B_n at start | predicted steps | extrapolated |",
        "|---|---|---|---|---|---|---|",
    ]
    for i, p in enumerate(a.schedule["phases"]):
        out.append(f"| {i + 1} | {p['start_step']} | {p['batch_size']} | "
                   f"{p['learning_rate']:.3g} | {fmt_num(p['b_n'])} | {p['steps']} | "
                   f"{'yes' if p['extrapolated'] else 'no'} |")
    return [*out, ""]


def _sweep_lines(res: Result, med: dict[int, float]) -> list[str]:
    a, sw, st = res.advice, res.sweep, res.settings
    cand = {res.ways[k].phases[0].batch_size for k in res.candidates}
    out = [
        f"The sweep ({Path(sw.path).name}, {sw.seeds} seeds, best LR per batch) × step times "
        f"measured here before the runs ({st['ladder_passes']} shuffled passes of "
        f"{st['ladder_steps']} steps; the fastest). `*`: a candidate for "
        f"the best constant batch (the least predicted time, those within {NEAR_BEST:.0%} "
        "of it, and B0 when lr0 is the sweep's best LR there). "
        f"S_fit = S_min(1 + B_crit/B) with S_min={fmt_num(sw.s_min)}, "
        f"B_crit={fmt_num(sw.b_crit)}. Step times in the runs: median of every step at that "
        "batch; bsfind's: its fitted line.",
        "",
        "| batch | sweep steps | best lr | step (ms) | predicted s | S_fit | S_fit × step (s) | "
        "step in runs (ms) | bsfind's t(B) (ms) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    sched = {p.batch_size for p in schedule_phases(a)}
    for b in sorted(set(sw.steps) | {a.batch_size} | sched):
        s, lr = sw.steps.get(b), sw.lr.get(b)
        t = res.ladder.get(b)
        fit = sw.fit_steps(b)
        tags = [x for x, on in (("B0", b == res.baseline_batch), ("bsfind", b == a.batch_size),
                                ("schedule", b in sched)) if on]
        who = f" ({', '.join(tags)})" if tags else ""
        out.append(
            f"| {b}{'*' if b in cand else ''}{who} | {fmt_num(s, 4)} | {fmt_num(lr)} | "
            f"{_ms(t)} | {_s(res.predicted.get(b))} | {fmt_num(fit, 4)} | "
            f"{_s(None if fit is None or t is None else fit * t)} | {_ms(med.get(b))} | "
            f"{_ms(a.predicted_step_time(b))} |")
    return [*out, ""]


def render_markdown(res: Result) -> str:
    c = cells(res)
    sm = summary(res)
    med = sm["step_times"]
    st = res.settings
    seeds = range(st["seeds"])
    best_s, best_r = sm["best"]["seconds"], sm["best"]["robust"]
    out = [
        f"### {res.name}: bsfind's advice and schedule against the best constant batch",
        "",
        f"{res.optimizer}, B0={res.baseline_batch}, lr0={res.baseline_lr:g}; target training "
        f"loss {res.target:g} on {st['eval_examples']} fixed examples (initial "
        f"{st['initial_loss']:.3g}); {res.dataset_size} training examples; "
        f"{st['seeds']} seeds (data orders) × {st['reps']} interleaved repetitions; "
        f"{st['threads']} CPU thread(s); evaluation excluded from the clock. "
        f"Took {res.seconds / 60:.1f} min; load average (1 min) "
        f"{st['load_before'][0]:.1f} before, {st['load_after'][0]:.1f} after.",
        "",
        *_advice_lines(res),
        *_sweep_lines(res, med),
        "Steps and seconds to the target. Seconds: training wall-clock, median over the "
        "repetitions [range]; robust: steps × the median step time at each batch, pooled "
        "over every run of this experiment. Sweep: the same batch, LR and seed in the "
        "critical-batch sweep (a reproduction check). The best constant batch is the "
        "candidate with the least mean seconds"
        + ("" if best_s == best_r else
           f" ({_batches(res.ways[best_s]) if best_s else '—'}; by the robust variant "
           f"{_batches(res.ways[best_r]) if best_r else '—'})") + ".",
        "",
        "| way | batch (@ from step) | lr | seed | steps (sweep) | seconds [range] | robust s | "
        "÷ best (s / robust) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for key, way in res.ways.items():
        for seed in seeds:
            cl = c[(key, seed)]
            span = (f" [{cl.seconds_range[0]:.3g}, {cl.seconds_range[1]:.3g}]"
                    if cl.seconds_range else "")
            agree = "" if cl.steps_agree else ", reps differ"
            ref = (res.sweep.seed_steps(way.phases[0].batch_size, way.phases[0].lr, seed)
                   if len(way.phases) == 1 else None)
            vs = [_ratio(getattr(cl, m), getattr(c[(b, seed)], m) if b else None)
                  for m, b in (("seconds", best_s), ("robust", best_r))]
            out.append(
                f"| {_label(res, key, best_s)} | {_batches(way)} | {_lrs(way)} | {seed} | "
                f"{fmt_num(cl.steps, 4)} ({fmt_num(ref, 4)}{agree}) | {_s(cl.seconds)}{span} | "
                f"{_s(cl.robust)} | {fmt_num(vs[0])} / {fmt_num(vs[1])} |")
    out += _prediction_lines(res, sm, c)
    acc = sm["acceptance"]

    def pair(row: dict[str, Any], k: str) -> str:
        return f"{fmt_num(row['seconds'][k])} / {fmt_num(row['robust'][k])}"

    out += [
        "",
        "| per seed | regret: bsfind ÷ best (s / robust) | schedule ÷ best (s / robust) | "
        "diagnostic: bsfind's batch at the sweep's LR ÷ best (s / robust) |",
        "|---|---|---|---|",
    ]
    for row in sm["per_seed"]:
        out.append(f"| seed {row['seed']} | {pair(row, 'regret')} | "
                   f"{pair(row, 'schedule_vs_best')} | {pair(row, 'regret_at_sweep_lr')} |")
    out += [
        f"| mean of seeds | {pair(sm, 'regret')} | {pair(sm, 'schedule_vs_best')} | "
        f"{pair(sm, 'regret_at_sweep_lr')} |",
        "",
        f"Regret ≤ {REGRET_LIMIT} on every seed: **{yes(acc['regret_within_limit'])}** "
        f"(robust: {yes(acc['regret_within_limit_robust'])}). Schedule faster than the best "
        f"constant batch on every seed: **{yes(acc['schedule_beats_best'])}** "
        f"(robust: {yes(acc['schedule_beats_best_robust'])}).",
    ]
    return "\n".join(out) + "\n"


def _prediction_lines(res: Result, sm: dict[str, Any], c: dict[tuple[str, int], Cell]
                      ) -> list[str]:
    a = res.advice
    med = sm["step_times"]
    seeds = range(res.settings["seeds"])

    def mean(way: str, metric: str) -> float | None:
        if not res.has(way):
            return None
        return _mean([getattr(c[(res.key(way), s)], metric) for s in seeds])

    def both(k: str) -> str:
        return f"{fmt_num(sm['seconds'][k])} / {fmt_num(sm['robust'][k])}"

    out = [
        "",
        "Predicted against measured (measured: mean over seeds of the per-seed ratios; "
        "seconds / robust):",
        "",
        "| quantity | predicted | measured |",
        "|---|---|---|",
        f"| bsfind: time ratio to B0 (`predicted_time_ratio`) | "
        f"{fmt_num(a.predicted_time_ratio)} | {both('bsfind_vs_baseline')} |",
        f"| bsfind: steps ratio S(B)/S(B0) | {fmt_num(a.predicted_steps_ratio)} | "
        f"{fmt_num(sm['steps']['bsfind_vs_baseline'])} |",
        f"| bsfind: step-time ratio t(B)/t(B0) | {fmt_num(a.predicted_step_time_ratio)} | "
        f"{fmt_num(sm['step_time_ratio'])} |",
        f"| bsfind: step time at B={a.batch_size} (ms) | "
        f"{_ms(a.predicted_step_time(a.batch_size))} | {_ms(med.get(a.batch_size))} |",
    ]
    sched = sm.get("schedule_predicted")
    if sched:
        out += [
            f"| schedule: seconds | {sched['seconds']:.3g} | {_s(mean('schedule', 'seconds'))} "
            f"/ {_s(mean('schedule', 'robust'))} |",
            f"| schedule: B0's seconds (over its horizon) | {sched['baseline_seconds']:.3g} | "
            f"{_s(mean('baseline', 'seconds'))} / {_s(mean('baseline', 'robust'))} |",
            f"| schedule: time ratio to B0 | {fmt_num(sched['time_ratio'])} | "
            f"{both('schedule_vs_baseline')} |",
            f"| schedule: steps (B0's steps) | {sched['steps']} "
            f"({sched['baseline_steps']:.0f}) | {fmt_num(mean('schedule', 'steps'), 4)} "
            f"({fmt_num(mean('baseline', 'steps'), 4)}) |",
            f"| schedule: steps ratio to B0 | {fmt_num(sched['steps'] / sched['baseline_steps'])}"
            f" | {fmt_num(sm['steps']['schedule_vs_baseline'])} |",
        ]
    return out


def to_json(res: Result) -> dict[str, Any]:
    doc = asdict(res)
    for r in doc["runs"]:
        times = r.pop("step_times")
        r["step_time_median"] = {b: float(np.median(v)) for b, v in times.items()}
        r["step_count"] = {b: len(v) for b, v in times.items()}
        if r["rep"] > 0:  # the same steps and losses as repetition 0; only the clock differs
            del r["curve"]
    doc["report"] = doc["advice"].pop("report")
    doc["cells"] = [asdict(v) for v in cells(res).values()]
    doc["summary"] = summary(res)
    return _train.jsonable(doc)  # type: ignore[no-any-return]


# --------------------------------------------------------------------------- CLI


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("spec")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="spec override (repeatable); bsfind and the runs both see it")
    ap.add_argument("--target", type=float, default=None,
                    help="training loss to reach (default: the sweep's lowest target)")
    ap.add_argument("--sweep", default=None,
                    help="critical_batch.py JSON (default docs/img/critical-batch-<name>.json)")
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--reps", type=int, default=5,
                    help="timed repetitions of every (way, seed) run, interleaved")
    ap.add_argument("--max-steps", type=int, default=6000)
    ap.add_argument("--eval-examples", type=int, default=None,
                    help="evaluation subset (default: the sweep's)")
    ap.add_argument("--eval-frac", type=float, default=None,
                    help="evaluation spacing as a fraction of the step (default: the sweep's)")
    ap.add_argument("--ladder-passes", type=int, default=8)
    ap.add_argument("--ladder-steps", type=int, default=8)
    ap.add_argument("--way", action="append", default=[], metavar="NAME=STEP:BATCH:LR,...",
                    help="also train this schedule (phases from step 0), e.g. "
                         "floor=0:32:0.05,69:64:0.078 (repeatable; never a candidate)")
    ap.add_argument("--report", default=None,
                    help="a saved `bsfind recommend --json` document (or this script's JSON) "
                         "instead of calling recommend")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=None,
                    help="output prefix (default docs/img/schedule-eval-<spec name>)")
    args = ap.parse_args(argv)
    try:
        extra = [parse_way(w) for w in args.way]
    except ValueError as exc:
        ap.error(str(exc))

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    torch.set_num_threads(args.threads)  # before recommend(): its timing must match ours
    spec, job = _train.load_job(args.spec, args.set)
    name = Path(args.spec).stem
    sweep = load_sweep(Path(args.sweep or f"docs/img/critical-batch-{name}.json"), args.target)
    try:
        advice = get_advice(spec, args.report, log)
    except Exception as exc:
        import traceback

        traceback.print_exc()
        log(f"bsfind.api.recommend failed: {type(exc).__name__}: {exc}")
        return 1
    res = gather(spec, job, advice, sweep, seeds=args.seeds, reps=args.reps,
                 max_steps=args.max_steps, eval_examples=args.eval_examples,
                 eval_frac=args.eval_frac, ladder_passes=args.ladder_passes,
                 ladder_steps=args.ladder_steps, extra=extra, name=name, log=log)
    res.settings["command"] = " ".join(["scripts/schedule_eval.py", *(
        sys.argv[1:] if argv is None else argv)])
    md = render_markdown(res)
    print(md)
    prefix = Path(args.out or f"docs/img/schedule-eval-{name}")
    prefix.parent.mkdir(parents=True, exist_ok=True)
    prefix.with_suffix(".md").write_text(md, encoding="utf-8")
    prefix.with_suffix(".json").write_text(json.dumps(to_json(res), indent=1), encoding="utf-8")
    log(f"wrote {prefix}.md and .json in {res.seconds / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
