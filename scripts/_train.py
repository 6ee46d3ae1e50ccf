"""Shared helpers for the validation scripts (critical_batch.py, equal_time.py).

Not part of the bsfind package: these are the plain training loops the evidence
in docs/validation.md rests on. Everything is seeded: the initial weights come
from ``bsfind.workload.build`` (``probe.seed``) and are saved once and reloaded
for every run, so runs differ only in batch size, learning rate and the data
order (``seed``).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bsfind.advisor import optimizer_family
from bsfind.spec import Spec, load_spec
from bsfind.training import EpochSampler, training_step
from bsfind.workload import Workload, build

State = dict[str, torch.Tensor]

# A run whose evaluation loss exceeds this multiple of the initial loss (or is not
# finite) has diverged: stop it rather than spend its step budget.
DIVERGED_FACTOR = 3.0
# A run still above this fraction of its initial loss after STALL_STEPS steps (or a
# tenth of its budget, whichever is larger) is stuck (dead units): stop it too.
STALL_FRACTION = 0.95
STALL_STEPS = 50


def load_job(path: str, overrides: Sequence[str] = ()) -> tuple[Spec, Workload]:
    """Load a bsfind spec (with ``key=value`` overrides) and build its workload."""
    spec = load_spec(path, list(overrides))
    return spec, build(spec)


def snapshot(model: torch.nn.Module) -> State:
    """A detached copy of the model's state_dict (safe to keep across training)."""
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def restore(model: torch.nn.Module, state: State) -> None:
    model.load_state_dict(state)


def lr_exponent(optimizer_name: str) -> float:
    """The LR grid's centre scales with B^0.5 for the Adam family (Malladi et al. 2022)
    and linearly for the SGD family (Goyal et al. 2017); the family is the advisor's."""
    return 0.5 if optimizer_family(optimizer_name) == "adam" else 1.0


def scaled_lr(lr0: float, b0: int, b: int, exponent: float) -> float:
    """The centre of the LR grid at batch ``b``: lr0·(b/b0)^exponent."""
    return lr0 * (b / b0) ** exponent


@torch.no_grad()
def evaluate(job: Workload, idx: torch.Tensor, chunk: int = 512) -> tuple[float, float]:
    """Mean loss and accuracy (argmax over the last axis) on the examples ``idx``.

    The model is in eval mode only for the duration (no dropout/BatchNorm here,
    but a user model might have them).
    """
    was_training = job.model.training
    job.model.eval()
    total_loss, total_correct, total_count, n = 0.0, 0.0, 0, 0
    try:
        for start in range(0, len(idx), chunk):
            part = idx[start : start + chunk]
            x, y = job.batch(part)
            out = job.model(x)
            total_loss += float(job.loss_fn(out, y)) * len(part)
            n += len(part)
            if out.dim() >= 2 and out.shape[:-1] == y.shape:
                total_correct += float((out.argmax(-1) == y).sum())
                total_count += y.numel()
    finally:
        job.model.train(was_training)
    acc = total_correct / total_count if total_count else math.nan
    return total_loss / n, acc


class Trainer:
    """Ordinary mini-batch training: a fresh permutation per epoch, one step per call.

    ``train_seconds`` counts only the time inside ``step()`` (data gathering,
    forward, backward, optimizer), never evaluation.
    """

    def __init__(
        self, job: Workload, init_state: State, batch_size: int, lr: float, seed: int
    ) -> None:
        restore(job.model, init_state)
        job.model.train()
        self.job = job
        self.n = len(job)
        self.sampler = EpochSampler(self.n, batch_size, torch.Generator().manual_seed(seed))
        self.batch_size = self.sampler.batch_size
        self.lr = lr
        self.optimizer = job.make_optimizer(lr)
        self.steps = 0
        self.examples = 0  # examples trained on (batch sizes may change: ``switch``)
        self.train_seconds = 0.0
        self.step_times: list[float] = []

    def step(self) -> float:
        start = time.perf_counter()
        # Unchecked: a diverging run is detected (and stopped) by its evaluations.
        loss = training_step(self.job, self.optimizer, self.sampler.next(), check=False)
        value = float(loss)  # also synchronizes on CUDA before the clock is read
        elapsed = time.perf_counter() - start
        self.train_seconds += elapsed
        self.step_times.append(elapsed)
        self.steps += 1
        self.examples += self.batch_size
        return value

    def switch(self, batch_size: int, lr: float) -> None:
        """Change batch size and learning rate between steps, as a framework's ramp does.

        The optimizer (and its state: momentum, Adam's moments) is kept; only the
        param groups' ``lr`` changes. The sampler is rebuilt at the new batch size
        on the same generator and carries on through the current epoch's
        permutation (the data order a run without the switch would see, cut into
        batches of the new size; as at any epoch's end, a tail shorter than a
        batch is dropped).
        """
        old = self.sampler
        self.sampler = EpochSampler(self.n, batch_size, old.gen)
        self.sampler.order, self.sampler.pos = old.order, old.pos
        self.batch_size = self.sampler.batch_size
        self.lr = lr
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    @property
    def epochs(self) -> float:
        return self.examples / self.n


# --------------------------------------------------------------------------- steps to target


@dataclass
class TargetRun:
    """One training run of the critical-batch grid.

    ``crossings`` maps each target loss to the (linearly interpolated) optimizer
    step at which the evaluation loss first fell to it, or None if it did not
    within the run (``max_steps``, divergence, or pruned as already beaten).
    """

    batch_size: int
    lr: float
    seed: int
    crossings: dict[float, float | None]
    steps: int
    final_loss: float
    diverged: bool
    seconds: float
    stalled: bool = False
    curve: list[tuple[int, float]] = field(default_factory=list)


def eval_due(step: int, last: int, frac: float) -> bool:
    """Evaluate at every step up to 20, then every ~``frac`` of the step count."""
    return step - last >= max(1, int(step * frac)) if step > 20 else True


def train_to_targets(
    job: Workload,
    init_state: State,
    *,
    batch_size: int,
    lr: float,
    seed: int,
    targets: Sequence[float],
    max_steps: int,
    eval_idx: torch.Tensor,
    eval_frac: float = 0.03,
    give_up: Callable[[float], float] | None = None,
    on_cross: Callable[[float, int], None] | None = None,
    on_eval: Callable[[int, float], None] | None = None,
    overrun: float = 0.0,
) -> TargetRun:
    """Train until every target training loss is reached (or ``max_steps``).

    Args:
        targets: training losses (on ``eval_idx``), any order.
        eval_frac: evaluation spacing as a fraction of the current step (a
            geometric schedule: about 2% resolution costs ~40 evaluations per
            doubling of the run). Crossings are interpolated between evaluations.
        give_up: target -> the step beyond which reaching it no longer matters
            (another learning rate already did better); the run stops once every
            unreached target is past its limit.
        on_cross: called as on_cross(target, step) at the first evaluation at or
            below the target, with the model holding those weights.
        on_eval: called as on_eval(step, loss) after every evaluation (same weights).
        overrun: once every target is reached at step s, train on to (1 + overrun)·s
            (so that checkpoints after the last crossing exist too).
    """
    start = time.perf_counter()
    trainer = Trainer(job, init_state, batch_size, lr, seed)
    loss0, _ = evaluate(job, eval_idx)
    curve = [(0, loss0)]
    crossings: dict[float, float | None] = {t: None for t in targets}
    for t in targets:
        if loss0 <= t:
            crossings[t] = 0.0
    last_step, last_loss = 0, loss0
    diverged = stalled = False
    stall_at = max(STALL_STEPS, max_steps // 10)
    def running() -> bool:
        if trainer.steps >= max_steps:
            return False
        if any(v is None for v in crossings.values()):
            return True
        last = max(v for v in crossings.values() if v is not None)
        return trainer.steps < (1 + overrun) * last

    while running():
        trainer.step()
        s = trainer.steps
        if not (eval_due(s, last_step, eval_frac) or s == max_steps):
            continue
        loss, _ = evaluate(job, eval_idx)
        curve.append((s, loss))
        if on_eval is not None:
            on_eval(s, loss)
        if not math.isfinite(loss) or loss > DIVERGED_FACTOR * loss0:
            diverged = True
            break
        for t in sorted(crossings, reverse=True):
            if crossings[t] is None and loss <= t:
                # Linear interpolation between the two evaluations that bracket t.
                frac = (last_loss - t) / (last_loss - loss) if last_loss > loss else 1.0
                crossings[t] = last_step + frac * (s - last_step)
                if on_cross is not None:
                    on_cross(t, s)
        last_step, last_loss = s, loss
        if s >= stall_at and loss > STALL_FRACTION * loss0:
            stalled = True
            break
        if give_up is not None:
            open_targets = [t for t, v in crossings.items() if v is None]
            if open_targets and all(s > give_up(t) for t in open_targets):
                break
    return TargetRun(
        batch_size=trainer.batch_size, lr=lr, seed=seed, crossings=crossings,
        steps=trainer.steps, final_loss=curve[-1][1], diverged=diverged,
        seconds=time.perf_counter() - start, stalled=stalled, curve=curve,
    )


# --------------------------------------------------------------------------- the fit


@dataclass(frozen=True)
class CriticalFit:
    """S(B) = S_min·(1 + B_crit/B) fitted as S = a + b/B (a = S_min, b = S_min·B_crit).

    Attributes:
        s_min: fitted minimum steps (large-batch limit).
        b_crit: fitted critical batch b/a; inf when a <= 0 (no saturation seen),
            0 when b <= 0 (no small-batch regime seen).
        b_crit_se: delta-method standard error of b_crit from the fit's covariance.
        r2: coefficient of determination of S on 1/B (unweighted, as in the linear form).
        rel_rms: root-mean-square relative residual (S_fit − S)/S.
        points: the (B, S) pairs fitted.
    """

    s_min: float
    b_crit: float
    b_crit_se: float
    r2: float
    rel_rms: float
    points: tuple[tuple[int, float], ...]

    def predict(self, b: np.ndarray) -> np.ndarray:
        return self.s_min * (1.0 + self.b_crit / b)


def fit_critical(points: Sequence[tuple[int, float]]) -> CriticalFit | None:
    """Least squares of S = a + b·(1/B), each row weighted by 1/S.

    Step counts carry roughly constant *relative* noise (a few percent from the
    seed, more from the LR grid's spacing), so rows are scaled by 1/S: the fit
    minimises relative residuals instead of letting the slowest (smallest)
    batch dominate. Returns None with fewer than 3 points.
    """
    pts = [(int(b), float(s)) for b, s in points if s is not None and math.isfinite(s)]
    if len(pts) < 3:
        return None
    bs = np.array([p[0] for p in pts], dtype=float)
    ss = np.array([p[1] for p in pts], dtype=float)
    x = np.stack([np.ones_like(bs), 1.0 / bs], axis=1)
    w = 1.0 / ss
    xw, yw = x * w[:, None], ss * w
    coef, *_ = np.linalg.lstsq(xw, yw, rcond=None)
    a, b = float(coef[0]), float(coef[1])
    fitted = x @ coef
    resid_w = yw - xw @ coef
    dof = max(1, len(pts) - 2)
    sigma2 = float(resid_w @ resid_w) / dof
    cov = sigma2 * np.linalg.inv(xw.T @ xw)
    ss_tot = float(((ss - ss.mean()) ** 2).sum())
    r2 = 1.0 - float(((ss - fitted) ** 2).sum()) / ss_tot if ss_tot > 0 else math.nan
    rel_rms = float(np.sqrt(np.mean(((fitted - ss) / ss) ** 2)))
    if a <= 0:
        b_crit, se = math.inf, math.inf
    elif b <= 0:
        b_crit, se = 0.0, math.nan
    else:
        b_crit = b / a
        var = b_crit**2 * (cov[1, 1] / b**2 + cov[0, 0] / a**2 - 2 * cov[0, 1] / (a * b))
        se = math.sqrt(max(var, 0.0))
    return CriticalFit(s_min=a, b_crit=b_crit, b_crit_se=se, r2=r2, rel_rms=rel_rms,
                       points=tuple(pts))


def parse_floats(text: str) -> list[float]:
    return [float(v) for v in text.split(",") if v.strip()]


def parse_ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def fmt_num(value: float | None, digits: int = 3) -> str:
    """A compact number for the markdown tables ("—" for missing, "∞" for inf)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    if math.isinf(value):
        return "∞"
    return f"{value:.{digits}g}" if abs(value) < 10**digits else f"{value:.0f}"


def jsonable(value: Any) -> Any:
    """inf/nan -> None, tuples -> lists, float keys -> strings (for json.dump)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    return value


# --------------------------------------------------------------------------- experiments


def branch_experiment_parser(doc: str) -> argparse.ArgumentParser:
    """The arguments the experiments beside scripts/branch_eval.py share: the spec, the
    sweep's and the branches' JSON, the probe runs, spec overrides, threads, output."""
    ap = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    ap.add_argument("spec")
    ap.add_argument("--crit", default=None, help="default docs/img/critical-batch-<name>.json")
    ap.add_argument("--branches", default=None, help="default docs/img/branch-<name>.json")
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=None)
    return ap


def branch_experiment_inputs(args: argparse.Namespace
                             ) -> tuple[str, dict[str, Any], dict[str, Any]]:
    """(spec name, the sweep's JSON, the branches' JSON), with torch's threads set."""
    torch.set_num_threads(args.threads)
    name = Path(args.spec).stem
    crit = json.loads(Path(args.crit or f"docs/img/critical-batch-{name}.json").read_text())
    base = json.loads(Path(args.branches or f"docs/img/branch-{name}.json").read_text())
    return name, crit, base


def write_outputs(prefix: Path, md: str, doc: dict[str, Any]) -> None:
    """PREFIX.md and PREFIX.json (made JSON-safe by :func:`jsonable`)."""
    prefix.parent.mkdir(parents=True, exist_ok=True)
    prefix.with_suffix(".md").write_text(md, encoding="utf-8")
    prefix.with_suffix(".json").write_text(json.dumps(jsonable(doc), indent=1),
                                           encoding="utf-8")


def run_branch_experiment(argv: Sequence[str] | None, doc: str, script: str, suffix: str,
                          gather: Callable[..., list[dict[str, Any]]],
                          summarise: Callable[..., dict[str, Any]],
                          render: Callable[..., str], extra: dict[str, Any] | None = None
                          ) -> int:
    """The main of an experiment beside scripts/branch_eval.py that takes the shared
    arguments only: ``gather(spec, crit, base, seeds, overrides, log)`` the ladders,
    ``summarise(rows, base, b0)``, ``render(name, summary, rows, seconds)``, and write
    docs/img/branch-<name>-<suffix>.{md,json} (or ``--out``), with ``extra`` in the JSON."""
    import sys

    args = branch_experiment_parser(doc).parse_args(argv)
    name, crit, base = branch_experiment_inputs(args)
    start = time.perf_counter()
    rows = gather(args.spec, crit, base, parse_ints(args.seeds), args.set,
                  lambda m: print(m, file=sys.stderr, flush=True))
    seconds = time.perf_counter() - start
    summ = summarise(rows, base, int(base["baseline_batch"]))
    md = render(name, summ, rows, seconds)
    print(md)
    write_outputs(Path(args.out or f"docs/img/branch-{name}-{suffix}"), md, {
        "name": name, "seconds": seconds, "summary": summ, "ladders": rows, **(extra or {}),
        "command": " ".join([script, *(argv if argv is not None else sys.argv[1:])])})
    return 0


@dataclass
class Rebuilt:
    """What an experiment beside scripts/branch_eval.py needs to rebuild the sweep's probe
    runs: the spec and workload, their initial weights, B0, the probe runs' learning rate,
    the optimizer family and, per (seed, step), the noise scale the branches' rule read
    there (from docs/img/branch-<name>.json)."""

    spec: Spec
    job: Workload
    init: State
    b0: int
    lr0: float
    family: str
    b_n: dict[tuple[int, int], float | None]

    def noise(self, seed: int, step: int) -> float:
        """The noise scale the branches' rule read at (seed, step); inf: none."""
        return self.b_n.get((seed, step)) or math.inf

    def trainer(self, seed: int) -> Trainer:
        """The probe run of ``seed`` from its initial weights, at B0 and its rate."""
        return Trainer(self.job, self.init, self.b0, self.lr0, seed)


def rebuild(spec_path: str, overrides: Sequence[str], crit: dict[str, Any],
            base: dict[str, Any]) -> Rebuilt:
    spec, job = load_job(spec_path, overrides)
    return Rebuilt(spec=spec, job=job, init=snapshot(job.model),
                   b0=spec.optimizer.batch_size,
                   lr0=float(crit["settings"]["probe_lr_value"]),
                   family=optimizer_family(spec.optimizer.name),
                   b_n={(m["seed"], m["step"]): m["branches"]["lr_noise_scale"]
                        for m in base["measurements"]})
