"""Overhead of per-example gradient norms from hooks vs a plain step and vs torch.func.

Run:
    .venv/bin/python benchmarks/per_example_overhead.py            # all three models
    .venv/bin/python benchmarks/per_example_overhead.py --reps 20 --models mlp cnn --threads 1
    .venv/bin/python benchmarks/per_example_overhead.py --reps 20 --models cnn32  # larger CNN
    .venv/bin/python benchmarks/per_example_overhead.py --threads 1 --clock thread  # busy host

For each model, four training steps are timed side by side, interleaved
repetition by repetition (in a random order each time) so that clock drift,
thermal effects and cache state cancel:

  (a) plain:    forward, backward, Adam step
  (b) hooks:    the same step inside PerExampleGradNorms, sq_norms() read; Linear
                layers on sequences and convolutions are fused (their weight
                gradient is the sum of the per-example products the norms need)
  (u) unfused:  as (b) with fuse=False: autograd forms the weight gradient itself
  (c) func:     torch.func vmap(grad) per-example gradients, their norms, the mean
                gradient written to .grad, Adam step

Each variant has its own copy of the model and optimizer. Warm-up repetitions
are discarded; the table gives median milliseconds and the median of the
per-repetition ratios to (a). CPU, torch.set_num_threads(2).

Then, for the CNN's second convolution, the rate of the two kernels that differ
between (a) and (b): the convolution's own weight-gradient kernel (oneDNN) and the
batched GEMM that forms the per-example products (torch.bmm; MKL on x86). Both
do the same multiply-adds; where the batched GEMM is much slower, the CNN's
ratio is bounded by it rather than by the hooks.
On a shared machine wall-clock times with 2 threads swing wildly (OpenMP threads
spin while another process holds the other core); ``--threads 1 --clock thread``
counts only this thread's CPU time, which other processes barely disturb.
"""

from __future__ import annotations

import argparse
import copy
import random
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
    if "cnn32" in names:  # not run by default: a CIFAR-sized CNN, about 1 s per repetition
        wide = nn.Sequential(
            nn.Conv2d(3, 32, 3, padding=1), nn.GroupNorm(8, 32), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.GroupNorm(8, 64), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(64 * 8 * 8, 10),
        )
        out.append(Case("cnn32 B=128 (3x32x32, 32-64 ch)", wide,
                        torch.randn(128, 3, 32, 32, generator=g),
                        torch.randint(0, 10, (128,), generator=g), F.cross_entropy))
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


def measure(case: Case, reps: int, clock: Callable[[], float]) -> tuple[list[float], list[float]]:
    """Median ms of (a), (b), (u), (c) and the median ratios (b)/(a), (u)/(a), (c)/(a)."""
    models_ = [case.model] + [copy.deepcopy(case.model) for _ in range(3)]
    opts = [torch.optim.Adam(m.parameters(), lr=1e-4) for m in models_]
    times: list[list[float]] = [[], [], [], []]
    with (PerExampleGradNorms(models_[1]) as fused,
          PerExampleGradNorms(models_[2], fuse=False) as unfused):
        steps: list[Callable[[], None]] = [
            lambda: plain_step(case, models_[0], opts[0]),
            lambda: hook_step(case, models_[1], opts[1], fused),
            lambda: hook_step(case, models_[2], opts[2], unfused),
            lambda: func_step(case, models_[3], opts[3]),
        ]
        order = random.Random(0)
        for r in range(WARMUP + reps):
            # a fresh random order each repetition: no variant always follows another (the
            # step after torch.func's runs on evicted caches)
            for k in order.sample(range(4), 4):
                t0 = clock()
                steps[k]()
                if r >= WARMUP:
                    times[k].append(clock() - t0)
    ms = [statistics.median(t) * 1e3 for t in times]
    ratios = [statistics.median(tv / ta for ta, tv in zip(times[0], times[v], strict=True))
              for v in (1, 2, 3)]
    return ms, ratios


def gemm_rates(reps: int) -> tuple[float, float]:
    """GFLOP/s of the conv weight-gradient kernel and of torch.bmm on the same products.

    Shapes of the benchmark CNN's second convolution: batch 256, 16 -> 32 channels,
    3x3 kernel, 8x8 positions.
    """
    g = torch.Generator().manual_seed(0)
    b, c, o, side = 256, 16, 32, 8
    x = torch.randn(b, c, side, side, generator=g)
    d = torch.randn(b, o, side, side, generator=g)
    w = torch.randn(o, c, 3, 3, generator=g)
    cols = torch.randn(b, side * side, c * 9, generator=g)  # the unfolded input
    ds = d.reshape(b, o, side * side)

    def conv_weight_grad() -> None:
        torch.ops.aten.convolution_backward(d, x, w, None, [1, 1], [1, 1], [1, 1], False,
                                            [0, 0], 1, [False, True, False])

    def batched_gemm() -> None:
        torch.bmm(ds, cols)

    flops = 2.0 * b * side * side * c * 9 * o
    rates = []
    for fn in (conv_weight_grad, batched_gemm):
        for _ in range(WARMUP):
            fn()
        ts = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
        rates.append(flops / statistics.median(ts) / 1e9)
    return rates[0], rates[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=30, help="timed repetitions per variant")
    parser.add_argument("--threads", type=int, default=THREADS, help="torch.set_num_threads")
    parser.add_argument("--clock", choices=["wall", "thread"], default="wall",
                        help="wall: perf_counter; thread: this thread's CPU time (--threads 1)")
    parser.add_argument("--models", nargs="+", default=["mlp", "cnn", "transformer"],
                        choices=["mlp", "cnn", "cnn32", "transformer"],
                        help="cnn32 (a CIFAR-sized CNN) runs only when named")
    args = parser.parse_args()
    if args.clock == "thread" and args.threads != 1:
        parser.error("--clock thread measures one thread: use it with --threads 1")
    clock = time.perf_counter if args.clock == "wall" else time.thread_time
    torch.set_num_threads(args.threads)
    # torch.func has no batching rule for CPU flash attention and says so on every call.
    warnings.filterwarnings("ignore", message="There is a performance drop")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.clock} clock, "
          f"{args.reps} reps after {WARMUP} warm-up, interleaved")
    cols = ["(a) ms", "(b) ms", "(u) ms", "(c) ms", "(b)/(a)", "(u)/(a)", "(c)/(a)"]
    header = f"{'model':<32}" + "".join(f"{c:>9}" for c in cols)
    print(header)
    print("-" * len(header))
    for case in cases(args.models):
        ms, ratios = measure(case, args.reps, clock)
        print(f"{case.name:<32}" + "".join(f"{v:>9.2f}" for v in ms + ratios), flush=True)
    conv_rate, bmm_rate = gemm_rates(args.reps)
    print(f"\nCNN conv 2 weight gradient, same multiply-adds: conv kernel {conv_rate:.0f} GFLOP/s, "
          f"batched GEMM (torch.bmm) {bmm_rate:.0f} GFLOP/s ({conv_rate / bmm_rate:.1f}x slower)")

if __name__ == "__main__":
    main()
