"""Overhead of per-example gradient norms from hooks vs a plain step and vs torch.func.

Run:
    .venv/bin/python benchmarks/per_example_overhead.py            # all three models
    .venv/bin/python benchmarks/per_example_overhead.py --reps 20 --models mlp cnn --threads 1
    .venv/bin/python benchmarks/per_example_overhead.py --threads 1 --clock thread  # busy host

For each model, three training steps are timed side by side, interleaved
repetition by repetition so that clock drift and thermal effects cancel:

  (a) plain:  forward, backward, Adam step
  (b) hooks:  the same step inside PerExampleGradNorms, sq_norms() read
  (c) func:   torch.func vmap(grad) per-example gradients, their norms, the mean
              gradient written to .grad, Adam step

Each variant has its own copy of the model and optimizer. Warm-up repetitions
are discarded; the table gives median milliseconds and the median of the
per-repetition ratios (b)/(a) and (c)/(a). CPU, torch.set_num_threads(2).
On a shared machine wall-clock times with 2 threads swing wildly (OpenMP threads
spin while another process holds the other core); ``--threads 1 --clock thread``
counts only this thread's CPU time, which other processes barely disturb.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

from bsfind import models
from bsfind.noise.per_example import PerExampleGradNorms

THREADS = 2  # the CI / dev machine this was tuned on has 2 cores
WARMUP = 5


@dataclass
class Case:
    name: str
    model: nn.Module
    x: Tensor
    y: Tensor
    loss: Callable[[Tensor, Tensor], Tensor]


def token_ce(logits: Tensor, target: Tensor) -> Tensor:
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1))


def cases(names: list[str]) -> list[Case]:
    g = torch.Generator().manual_seed(0)
    out = []
    if "mlp" in names:
        out.append(Case("mlp  B=256 (64-128-128-10)", models.mlp(),
                        torch.randn(256, 64, generator=g),
                        torch.randint(0, 10, (256,), generator=g), F.cross_entropy))
    if "cnn" in names:
        out.append(Case("cnn  B=256 (1x8x8, GroupNorm)", models.cnn(),
                        torch.randn(256, 1, 8, 8, generator=g),
                        torch.randint(0, 10, (256,), generator=g), F.cross_entropy))
    if "transformer" in names:
        out.append(Case("transformer B=32 T=64", models.transformer(),
                        torch.randint(0, 128, (32, 64), generator=g),
                        torch.randint(0, 128, (32, 64), generator=g), token_ce))
    return out


def plain_step(case: Case, model: nn.Module, opt: torch.optim.Optimizer) -> None:
    opt.zero_grad(set_to_none=True)
    case.loss(model(case.x), case.y).backward()
    opt.step()


def hook_step(
    case: Case, model: nn.Module, opt: torch.optim.Optimizer, norms: PerExampleGradNorms
) -> None:
    plain_step(case, model, opt)
    norms.sq_norms()


def func_step(case: Case, model: nn.Module, opt: torch.optim.Optimizer) -> None:
    params = {n: p.detach() for n, p in model.named_parameters()}

    def loss_one(p: dict[str, Tensor], xi: Tensor, yi: Tensor) -> Tensor:
        return case.loss(functional_call(model, p, (xi.unsqueeze(0),)), yi.unsqueeze(0))

    per_ex = vmap(grad(loss_one), in_dims=(None, 0, 0))(params, case.x, case.y)
    sum(g.flatten(1).square().sum(1) for g in per_ex.values())  # the per-example norms
    for n, p in model.named_parameters():
        p.grad = per_ex[n].mean(0)
    opt.step()


def measure(
    case: Case, reps: int, clock: Callable[[], float]
) -> tuple[float, float, float, float, float]:
    models_ = [case.model, copy.deepcopy(case.model), copy.deepcopy(case.model)]
    opts = [torch.optim.Adam(m.parameters(), lr=1e-4) for m in models_]
    times: list[list[float]] = [[], [], []]
    with PerExampleGradNorms(models_[1]) as norms:
        steps: list[Callable[[], None]] = [
            lambda: plain_step(case, models_[0], opts[0]),
            lambda: hook_step(case, models_[1], opts[1], norms),
            lambda: func_step(case, models_[2], opts[2]),
        ]
        for r in range(WARMUP + reps):
            for j in range(3):
                k = (r + j) % 3  # rotate the order too: no variant always follows another
                t0 = clock()
                steps[k]()
                if r >= WARMUP:
                    times[k].append(clock() - t0)
    a, b, c = (statistics.median(t) * 1e3 for t in times)
    rb = statistics.median(tb / ta for ta, tb in zip(times[0], times[1], strict=True))
    rc = statistics.median(tc / ta for ta, tc in zip(times[0], times[2], strict=True))
    return a, b, c, rb, rc


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=30, help="timed repetitions per variant")
    parser.add_argument("--threads", type=int, default=THREADS, help="torch.set_num_threads")
    parser.add_argument("--clock", choices=["wall", "thread"], default="wall",
                        help="wall: perf_counter; thread: this thread's CPU time (--threads 1)")
    parser.add_argument("--models", nargs="+", default=["mlp", "cnn", "transformer"],
                        choices=["mlp", "cnn", "transformer"])
    args = parser.parse_args()
    if args.clock == "thread" and args.threads != 1:
        parser.error("--clock thread measures one thread: use it with --threads 1")
    clock = time.perf_counter if args.clock == "wall" else time.thread_time
    torch.set_num_threads(args.threads)
    # torch.func has no batching rule for CPU flash attention and says so on every call.
    warnings.filterwarnings("ignore", message="There is a performance drop")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.clock} clock, "
          f"{args.reps} reps after {WARMUP} warm-up, interleaved")
    header = f"{'model':<32}{'(a) ms':>9}{'(b) ms':>9}{'(c) ms':>9}{'(b)/(a)':>9}{'(c)/(a)':>9}"
    print(header)
    print("-" * len(header))
    for case in cases(args.models):
        a, b, c, rb, rc = measure(case, args.reps, clock)
        print(f"{case.name:<32}{a:>9.2f}{b:>9.2f}{c:>9.2f}{rb:>9.2f}{rc:>9.2f}", flush=True)


if __name__ == "__main__":
    main()
