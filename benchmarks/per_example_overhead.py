"""Overhead of per-example gradient norms from hooks vs a plain step and vs torch.func.

Run:
    .venv/bin/python benchmarks/per_example_overhead.py            # all three models
    .venv/bin/python benchmarks/per_example_overhead.py --reps 20 --models mlp cnn --threads 1
    .venv/bin/python benchmarks/per_example_overhead.py --reps 20 --models cnn32  # larger CNN
    .venv/bin/python benchmarks/per_example_overhead.py --threads 1 --clock thread  # busy host
    python3 benchmarks/per_example_overhead.py --device cuda --batch-scale 16 --precision fp32 bf16
    python3 benchmarks/per_example_overhead.py --device cuda --models gpt2 --reps 10  # GPT-2 small

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

On a GPU (``--device cuda``) every timed step ends with ``torch.cuda.synchronize``,
so a time is the step's kernels, not their launch; ``--batch-scale K`` multiplies each
model's batch by K (GPU-sized batches) and ``--precision bf16`` runs the forwards under
``torch.autocast`` (one row per precision). ``gpt2`` (named only) is a GPT-2-small-sized
TinyTransformer with random weights: d_model 768, 12 heads, 12 layers, context 1024,
vocabulary 50,257, batch 8 (``--gpt2-*`` change each). Its head is not tied to the token
embedding, so it has 163M parameters where GPT-2 small has 124M.

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
import contextlib
import copy
import gc
import random
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

from bsfind import models
from bsfind.noise.per_example import PerExampleGradNorms

THREADS = 2  # the CI / dev machine this was tuned on has 2 cores
WARMUP = 5
MODELS = ("mlp", "cnn", "cnn32", "transformer", "gpt2")  # the order rows are printed in
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16}


@dataclass
class Case:
    name: str
    model: nn.Module
    x: Tensor
    y: Tensor
    loss: Callable[[Tensor, Tensor], Tensor]
    autocast: torch.dtype | None = None  # forward and loss under torch.autocast


@dataclass(frozen=True)
class Gpt2Size:
    """The ``gpt2`` case: GPT-2 small's shape (Radford et al. 2019, Table 2: 117M row,
    d_model 768, 12 layers; 12 heads and context 1024 from the released config)."""

    batch: int = 8
    context: int = 1024
    d_model: int = 768
    heads: int = 12
    layers: int = 12
    vocab: int = 50257


def token_ce(logits: Tensor, target: Tensor) -> Tensor:
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1))


def cases(names: list[str], device: str | torch.device = "cpu", batch_scale: int = 1,
          precision: str = "fp32", gpt2: Gpt2Size = Gpt2Size()) -> list[Case]:
    """The named cases, built on the CPU from one seeded generator, then moved to ``device``.

    ``batch_scale`` multiplies every batch but gpt2's (``gpt2.batch``); a precision other
    than fp32 is appended to each name.
    """
    g = torch.Generator().manual_seed(0)
    k = batch_scale
    out = []
    if "mlp" in names:
        out.append(Case(f"mlp  B={256 * k} (64-128-128-10)", models.mlp(),
                        torch.randn(256 * k, 64, generator=g),
                        torch.randint(0, 10, (256 * k,), generator=g), F.cross_entropy))
    if "cnn" in names:
        out.append(Case(f"cnn  B={256 * k} (1x8x8, GroupNorm)", models.cnn(),
                        torch.randn(256 * k, 1, 8, 8, generator=g),
                        torch.randint(0, 10, (256 * k,), generator=g), F.cross_entropy))
    if "cnn32" in names:  # not run by default: a CIFAR-sized CNN, about 1 s per repetition
        wide = nn.Sequential(
            nn.Conv2d(3, 32, 3, padding=1), nn.GroupNorm(8, 32), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.GroupNorm(8, 64), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(64 * 8 * 8, 10),
        )
        out.append(Case(f"cnn32 B={128 * k} (3x32x32, 32-64 ch)", wide,
                        torch.randn(128 * k, 3, 32, 32, generator=g),
                        torch.randint(0, 10, (128 * k,), generator=g), F.cross_entropy))
    if "transformer" in names:
        out.append(Case(f"transformer B={32 * k} T=64", models.transformer(),
                        torch.randint(0, 128, (32 * k, 64), generator=g),
                        torch.randint(0, 128, (32 * k, 64), generator=g), token_ce))
    if "gpt2" in names:  # not run by default: 163M parameters, four copies with Adam state
        s = gpt2
        out.append(Case(
            f"gpt2 B={s.batch} T={s.context} ({s.d_model}x{s.layers}, V={s.vocab})",
            models.TinyTransformer(s.vocab, s.context, s.d_model, s.heads, s.layers),
            torch.randint(0, s.vocab, (s.batch, s.context), generator=g),
            torch.randint(0, s.vocab, (s.batch, s.context), generator=g), token_ce))
    dev = torch.device(device)
    for c in out:
        c.model, c.x, c.y = c.model.to(dev), c.x.to(dev), c.y.to(dev)
        c.autocast = PRECISIONS[precision]
        if precision != "fp32":
            c.name += f" {precision}"
    return out


def autocast(case: Case) -> contextlib.AbstractContextManager[object]:
    """``torch.autocast`` on the case's device when it asks for one, else nothing."""
    if case.autocast is None:
        return contextlib.nullcontext()
    return torch.autocast(case.x.device.type, dtype=case.autocast)


def synchronizer(device: torch.device) -> Callable[[], None]:
    """Wait for the device's queued kernels (CUDA runs them asynchronously); CPU: nothing."""
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


def plain_step(case: Case, model: nn.Module, opt: torch.optim.Optimizer) -> None:
    opt.zero_grad(set_to_none=True)
    with autocast(case):
        loss = case.loss(model(case.x), case.y)
    loss.backward()
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

    with autocast(case):
        per_ex = vmap(grad(loss_one), in_dims=(None, 0, 0))(params, case.x, case.y)
    sum(g.flatten(1).square().sum(1) for g in per_ex.values())  # the per-example norms
    for n, p in model.named_parameters():
        p.grad = per_ex[n].mean(0)
    opt.step()


def measure(case: Case, reps: int, clock: Callable[[], float]) -> tuple[list[float], list[float]]:
    """Median ms of (a), (b), (u), (c) and the median ratios (b)/(a), (u)/(a), (c)/(a).

    On CUDA each step is synchronised before the clock is read.
    """
    sync = synchronizer(case.x.device)
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
                sync()
                if r >= WARMUP:
                    times[k].append(clock() - t0)
    ms = [statistics.median(t) * 1e3 for t in times]
    ratios = [statistics.median(tv / ta for ta, tv in zip(times[0], times[v], strict=True))
              for v in (1, 2, 3)]
    return ms, ratios


def gemm_rates(reps: int, device: str | torch.device = "cpu",
               batch_scale: int = 1) -> tuple[float, float]:
    """GFLOP/s of the conv weight-gradient kernel and of torch.bmm on the same products.

    Shapes of the benchmark CNN's second convolution: batch 256 (× ``batch_scale``),
    16 -> 32 channels, 3x3 kernel, 8x8 positions.
    """
    g = torch.Generator().manual_seed(0)
    dev = torch.device(device)
    sync = synchronizer(dev)
    b, c, o, side = 256 * batch_scale, 16, 32, 8
    x = torch.randn(b, c, side, side, generator=g).to(dev)
    d = torch.randn(b, o, side, side, generator=g).to(dev)
    w = torch.randn(o, c, 3, 3, generator=g).to(dev)
    cols = torch.randn(b, side * side, c * 9, generator=g).to(dev)  # the unfolded input
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
        sync()
        ts = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            sync()
            ts.append(time.perf_counter() - t0)
        rates.append(flops / statistics.median(ts) / 1e9)
    return rates[0], rates[1]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=30, help="timed repetitions per variant")
    parser.add_argument("--threads", type=int, default=THREADS, help="torch.set_num_threads")
    parser.add_argument("--clock", choices=["wall", "thread"], default="wall",
                        help="wall: perf_counter; thread: this thread's CPU time (--threads 1)")
    parser.add_argument("--models", nargs="+", default=["mlp", "cnn", "transformer"],
                        choices=list(MODELS),
                        help="cnn32 (a CIFAR-sized CNN) and gpt2 run only when named")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    parser.add_argument("--batch-scale", type=int, default=1,
                        help="multiply every batch but gpt2's by this (GPU-sized batches)")
    parser.add_argument("--precision", nargs="+", default=["fp32"], choices=list(PRECISIONS),
                        help="one row per precision; bf16 runs forwards under torch.autocast")
    gpt = parser.add_argument_group("gpt2 (GPT-2 small by default)")
    for field, value in vars(Gpt2Size()).items():
        gpt.add_argument(f"--gpt2-{field.replace('_', '-')}", type=int, default=value,
                         dest=f"gpt2_{field}", help=f"default {value}")
    args = parser.parse_args()
    if args.clock == "thread" and args.threads != 1:
        parser.error("--clock thread measures one thread: use it with --threads 1")
    if args.clock == "thread" and args.device != "cpu":
        parser.error("--clock thread counts no GPU time: use the wall clock with --device")
    if args.batch_scale < 1:
        parser.error("--batch-scale must be >= 1")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: CUDA is not available")
    return args


@contextlib.contextmanager
def released(device: torch.device) -> Iterator[None]:
    """Free a case's models and CUDA cache once its row is printed (gpt2 takes ~10 GB)."""
    try:
        yield
    finally:
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()


def main() -> None:
    args = parse_args()
    clock = time.perf_counter if args.clock == "wall" else time.thread_time
    device = torch.device(args.device)
    gpt2 = Gpt2Size(**{f: getattr(args, f"gpt2_{f}") for f in vars(Gpt2Size())})
    torch.set_num_threads(args.threads)
    # torch.func has no batching rule for CPU flash attention and says so on every call.
    warnings.filterwarnings("ignore", message="There is a performance drop")
    on = f", {device} ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.clock} clock, "
          f"{args.reps} reps after {WARMUP} warm-up, interleaved{on}")
    cols = ["(a) ms", "(b) ms", "(u) ms", "(c) ms", "(b)/(a)", "(u)/(a)", "(c)/(a)"]
    width = 32 if "gpt2" not in args.models and args.precision == ["fp32"] else 44
    header = f"{'model':<{width}}" + "".join(f"{c:>9}" for c in cols)
    print(header)
    print("-" * len(header))
    failed = False
    for name in (m for m in MODELS if m in args.models):
        for precision in args.precision:
            label = f"{name} {precision}"
            try:
                with released(device):
                    case = cases([name], device, args.batch_scale, precision, gpt2)[0]
                    label = case.name
                    ms, ratios = measure(case, args.reps, clock)
                    del case
                print(f"{label:<{width}}" + "".join(f"{v:>9.2f}" for v in ms + ratios),
                      flush=True)
            except Exception as exc:  # one case out of memory or unsupported: report, go on
                failed = True
                text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
                print(f"{label:<{width}} failed: {type(exc).__name__}: {text}", flush=True)
    conv_rate, bmm_rate = gemm_rates(args.reps, device, args.batch_scale)
    print(f"\nCNN conv 2 weight gradient, same multiply-adds: conv kernel {conv_rate:.0f} GFLOP/s, "
          f"batched GEMM (torch.bmm) {bmm_rate:.0f} GFLOP/s ({conv_rate / bmm_rate:.1f}x slower)")
    if failed:
        sys.exit(1)


if __name__ == "__main__":
    main()
