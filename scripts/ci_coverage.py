"""How often the probe's 95% interval of B_simple covers the exact value.

    .venv/bin/python scripts/ci_coverage.py [--runs 60] [--out docs/img/ci-coverage]

The README calls the interval honest; this measures it where the per-example gradients
are far from normal. For each case the weights are fixed (trained from the spec's
seeded initial weights for a given number of Adam/SGD steps at the spec's batch and
learning rate), B_simple is computed exactly from every example's own gradient
(``tests/exact.py``: the dataset's population covariance, which the probe's sampling
with replacement estimates without bias), and the probe runs ``--runs`` times with
different sampling seeds at the spec's settings (stop at ±10%, at least 10 rounds). A run
covers when its interval holds the exact value; 95% of runs should.

The tail of the per-example squared gradient norms |g_i|² is reported as their kurtosis
and the share of Σ|g_i|² held by the top 1% of examples: once most examples are fitted,
a few hard ones carry most of tr(Σ) (kurtosis 3 is a normal's).

One case has dropout: the exact value then averages over dropout masks too, computed
from every example under ``--masks`` masks each (each example's gradient under its own
mask, vmap with randomness="different"). The probe samples (example, mask) pairs
from the population of all masks, so this value is itself a Monte-Carlo estimate: the
table gives its standard error, from the spread of chunks of 32 masks. It matters: a
memorised example flips only under rare masks, so one chunk's value moves by ±5%,
as much as half the probe's ±10% target.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.func import functional_call, grad, vmap

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bsfind.budget import Deadline  # noqa: E402
from bsfind.noise.probe import NoiseProbe, ProbeOptions  # noqa: E402
from bsfind.spec import load_spec  # noqa: E402
from bsfind.workload import Workload, build  # noqa: E402


@dataclass(frozen=True)
class Case:
    name: str
    config: str
    steps: int  # training steps before the weights are fixed
    method: str = "per-example"
    dropout: float = 0.0  # > 0: an MLP with dropout after each hidden layer


CASES = (
    Case("digits-mlp at init", "digits-mlp", 0),
    Case("digits-mlp, 300 steps", "digits-mlp", 300),
    Case("digits-mlp, 300 steps, micro-batch form", "digits-mlp", 300, "microbatch"),
    Case("digits-mlp, 1500 steps (loss ~1e-4)", "digits-mlp", 1500),
    Case("digits-cnn, 300 steps", "digits-cnn", 300),
    Case("digits-mlp with dropout 0.2, 1500 steps", "digits-mlp", 1500, dropout=0.2),
)


def dropout_mlp(p: float) -> nn.Module:
    """The digits-mlp config's MLP (64-128-128-10) with dropout after each hidden layer."""
    return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Dropout(p),
                         nn.Linear(128, 128), nn.ReLU(), nn.Dropout(p), nn.Linear(128, 10))


def per_example_sq_and_sum(job: Workload,
                           masks: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(|g_i|² for every example (and mask), Σ g_i per parameter), in float64."""
    model = job.model
    params = {k: v.detach() for k, v in model.named_parameters()}
    buffers = {k: v.detach() for k, v in model.named_buffers()}

    def loss_one(p: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        out = functional_call(model, {**p, **buffers}, (x.unsqueeze(0),))
        return job.loss_fn(out, y.unsqueeze(0))

    each = vmap(grad(loss_one), in_dims=(None, 0, 0), randomness="different")
    sq, total = [], {k: torch.zeros_like(v, dtype=torch.float64) for k, v in params.items()}
    for _ in range(masks):
        for start in range(0, len(job), 256):
            x, y = job.batch(torch.arange(start, min(len(job), start + 256)))
            g = each(params, x, y)
            sq.append(sum(v.double().pow(2).reshape(len(y), -1).sum(1) for v in g.values()))
            for k, v in g.items():
                total[k] += v.double().sum(0)
    return torch.cat(sq), total  # type: ignore[arg-type]


# Dropout masks per chunk of the exact value: the chunks' spread gives its standard error
# (with 32 masks a chunk, one chunk's B_simple moved by ±5% on the dropout case).
MASK_CHUNK = 32


def exact(job: Workload, masks: int) -> tuple[float, float, float, float]:
    """(B_simple, its relative standard error, kurtosis of |g_i|², top-1% share of
    Σ|g_i|²) over every example, under ``masks`` dropout masks each.

    The masks run in chunks of MASK_CHUNK; the standard error is the chunks' spread over
    √chunks (nan with one chunk; 0 without dropout, where every mask gives the same).
    """
    chunks = []
    sq_all: list[torch.Tensor] = []
    total: dict[str, torch.Tensor] = {}
    for start in range(0, masks, MASK_CHUNK):
        sq, part = per_example_sq_and_sum(job, min(MASK_CHUNK, masks - start))
        chunks.append(_b_simple(sq, part))
        sq_all.append(sq)
        total = {k: total.get(k, 0) + v for k, v in part.items()}
    sq = torch.cat(sq_all)
    value = _b_simple(sq, total)
    se = (statistics.stdev(chunks) / math.sqrt(len(chunks)) / value if len(chunks) > 1
          else math.nan)
    centred = sq - sq.mean()
    kurtosis = float(centred.pow(4).mean() / centred.pow(2).mean().pow(2))
    top = float(sq.sort(descending=True).values[: max(1, len(sq) // 100)].sum() / sq.sum())
    return value, se, kurtosis, top


def _b_simple(sq: torch.Tensor, total: dict[str, torch.Tensor]) -> float:
    """tr(Σ)/|G|² of the population whose |g_i|² are ``sq`` and whose Σ g_i is ``total``."""
    n = len(sq)
    g2 = float(sum((v / n).pow(2).sum() for v in total.values()))
    return (float(sq.mean()) - g2) / g2


def trained_job(case: Case) -> tuple[Workload, int]:
    spec = load_spec(ROOT / "configs" / f"{case.config}.yaml")
    job = build(spec)
    if case.dropout:
        torch.manual_seed(spec.probe.seed)
        job = Workload.from_objects(dropout_mlp(case.dropout), job.dataset, job.loss_fn,
                                    optimizer=spec.optimizer.name,
                                    optimizer_kwargs=dict(spec.optimizer.kwargs))
    opt = job.make_optimizer(spec.optimizer.lr)
    g = torch.Generator().manual_seed(0)
    job.model.train()
    for _ in range(case.steps):
        idx = torch.randint(0, len(job), (spec.optimizer.batch_size,), generator=g)
        opt.zero_grad(set_to_none=True)
        job.loss(idx).backward()
        opt.step()
    opt.zero_grad(set_to_none=True)
    return job, spec.optimizer.batch_size


def run_case(case: Case, runs: int, masks: int) -> dict[str, object]:
    job, batch = trained_job(case)
    value, exact_se, kurtosis, top = exact(job, masks if case.dropout else 1)
    with torch.no_grad():
        loss = float(job.loss(torch.arange(len(job))))
    covered, ests, halves, rounds, stopped = 0, [], [], [], []
    below = above = 0
    start = time.perf_counter()
    for seed in range(runs):
        opts = ProbeOptions(method=case.method, batch_size=batch)
        est = NoiseProbe(job, opts, seed=1000 + seed).run(Deadline.after(120))
        low, high = est.ci95.low, est.ci95.high
        covered += low <= value <= high
        below += high < value
        above += low > value
        ests.append(est.b_simple if est.b_simple is not None else math.nan)
        halves.append((high - low) / 2 / est.b_simple if est.b_simple else math.inf)
        rounds.append(est.rounds)
        stopped.append(est.stopped)
    finite = [e for e in ests if math.isfinite(e)]
    return {
        "case": case.name, "method": case.method, "steps": case.steps, "loss": loss,
        "exact_b_simple": value,
        "exact_rel_se": (exact_se if math.isfinite(exact_se) else None) if case.dropout else 0.0,
        "kurtosis": kurtosis, "top1_share": top,
        "runs": runs, "covered": covered, "interval_below_exact": below,
        "interval_above_exact": above,
        "median_ratio": statistics.median(finite) / value,
        "claimed_half_width": statistics.median(halves),
        "spread_1_96_sd": 1.96 * statistics.pstdev(finite) / value,
        "median_rounds": statistics.median(rounds),
        "converged": sum(s == "converged" for s in stopped),
        "seconds": time.perf_counter() - start,
    }


def markdown(rows: list[dict[str, object]]) -> str:
    head = ("| case | training loss | exact B_simple | kurtosis of \\|g_i\\|² | top 1%'s share "
            "of Σ\\|g_i\\|² | covered | interval below / above exact | median estimate ÷ "
            "exact | claimed half-width (median) | 1.96 × spread of estimates | median "
            "rounds |\n|---|---|---|---|---|---|---|---|---|---|---|\n")
    return head + "".join(
        f"| {r['case']} | {r['loss']:.3g} | {_exact_cell(r)} | {r['kurtosis']:.0f} "
        f"| {r['top1_share']:.0%} | {r['covered']} of {r['runs']} | "
        f"{r['interval_below_exact']} / {r['interval_above_exact']} | "
        f"{r['median_ratio']:.3f} | ±{r['claimed_half_width']:.1%} | "
        f"±{r['spread_1_96_sd']:.1%} | {r['median_rounds']:.0f} |\n" for r in rows)


def _exact_cell(r: dict[str, object]) -> str:
    """The exact value, with its standard error when it is a Monte-Carlo one (dropout)."""
    se = r.get("exact_rel_se")
    cell = f"{r['exact_b_simple']:.4g}"
    if se is None:
        return cell + " (one mask chunk: s.e. unknown)"
    return cell + (f" ± {se:.1%} s.e." if se else "")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=60)
    ap.add_argument("--masks", type=int, default=512,
                    help="dropout masks per example for the dropout case's exact value "
                         f"(in chunks of {MASK_CHUNK}, whose spread gives its error)")
    ap.add_argument("--cases", default="all", help="comma-separated indices, or all")
    ap.add_argument("--out", default=None, help="write <out>.json and <out>.md")
    args = ap.parse_args()
    torch.set_num_threads(1)
    picked = (CASES if args.cases == "all"
              else [CASES[int(i)] for i in args.cases.split(",")])
    rows = []
    for case in picked:
        rows.append(run_case(case, args.runs, args.masks))
        print(markdown(rows[-1:]).splitlines()[-1], flush=True)
    table = markdown(rows)
    print(table)
    if args.out:
        Path(f"{args.out}.json").write_text(json.dumps(rows, indent=1) + "\n")
        Path(f"{args.out}.md").write_text(table)


if __name__ == "__main__":
    main()
