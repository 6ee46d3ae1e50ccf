"""Training throughput with the tracker (bsfind.track, default settings) ÷ without it.

Run:
    .venv/bin/python benchmarks/tracker_overhead.py                 # all three models
    .venv/bin/python benchmarks/tracker_overhead.py --reps 40 --models mlp cnn
    .venv/bin/python benchmarks/tracker_overhead.py --threads 1 --clock thread   # busy host

The models and batches of ``per_example_overhead.py`` (bsfind.models: the MLP and the
CNN at batch 256, the transformer at batch 32 of 64 tokens), each trained with Adam by
two copies side by side:

  (a) plain:    forward, backward, optimizer step
  (t) tracked:  the same, with ``tracker.update(loss)`` after backward; the tracker at
                its defaults (per-example norms on one step in ``every`` = 32, batch
                size read from the model's input, records smoothed as they come)

The unit of time is a block of ``every`` steps, which holds exactly one measured step,
so a block's time is the amortised cost. Blocks of the two variants are interleaved
in a random order each repetition, so load on a shared machine hits both alike; warm-up
blocks are discarded. Each variant's time is the low quartile of its blocks (other
processes only ever add time, DESIGN §9). The table gives milliseconds per step, the
throughput ratio (a block time / t block time: tracked throughput ÷ plain throughput,
goal >= 0.95), and the same for the measured step alone (the first step of each
tracked block against the first step of each plain block).
"""

from __future__ import annotations

import argparse
import copy
import random
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from per_example_overhead import THREADS, Case, cases  # noqa: E402

from bsfind.tracker import DEFAULT_EVERY, Tracker, track  # noqa: E402

WARMUP = 2  # blocks


def _step(case: Case, model: torch.nn.Module, opt: torch.optim.Optimizer,
          tracker: Tracker | None) -> None:
    loss = case.loss(model(case.x), case.y)
    loss.backward()
    if tracker is not None:
        tracker.update(loss)
    opt.step()
    opt.zero_grad(set_to_none=True)


def measure(case: Case, reps: int, clock: Callable[[], float], warmup: int = WARMUP
            ) -> tuple[list[float], float, float]:
    """([plain ms/step, tracked ms/step, plain measured-step ms, tracked measured-step ms],
    throughput ratio, measured-step throughput ratio)."""
    models_ = [case.model, copy.deepcopy(case.model)]
    opts = [torch.optim.Adam(m.parameters(), lr=1e-4) for m in models_]
    tracker = track(models_[1])  # the defaults
    every = tracker.every  # one measured step per block, the first
    blocks: list[list[float]] = [[], []]
    firsts: list[list[float]] = [[], []]
    order = random.Random(0)
    for r in range(warmup + reps):
        for v in order.sample(range(2), 2):
            t_block = clock()
            first = 0.0
            for i in range(every):
                t0 = clock()
                _step(case, models_[v], opts[v], tracker if v == 1 else None)
                if i == 0:
                    first = clock() - t0
            if r >= warmup:
                blocks[v].append(clock() - t_block)
                firsts[v].append(first)
    tracker.close()
    assert tracker.records, "the tracker measured nothing"
    low = [_low(b) for b in (*blocks, *firsts)]
    ms = [low[0] / every * 1e3, low[1] / every * 1e3, low[2] * 1e3, low[3] * 1e3]
    return ms, low[0] / low[1], low[2] / low[3]


def _low(times: list[float]) -> float:
    """The low quartile: other processes only ever add time, so a low quantile over
    interleaved repetitions estimates a variant's own cost (DESIGN §9)."""
    s = sorted(times)
    return s[(len(s) - 1) // 4]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=20, help="timed blocks per variant")
    parser.add_argument("--threads", type=int, default=THREADS, help="torch.set_num_threads")
    parser.add_argument("--clock", choices=["wall", "thread"], default="wall",
                        help="wall: perf_counter; thread: this thread's CPU time (--threads 1)")
    parser.add_argument("--models", nargs="+", default=["mlp", "cnn", "transformer"],
                        choices=["mlp", "cnn", "cnn32", "transformer"])
    args = parser.parse_args()
    if args.clock == "thread" and args.threads != 1:
        parser.error("--clock thread measures one thread: use it with --threads 1")
    clock = time.perf_counter if args.clock == "wall" else time.thread_time
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", message="There is a performance drop")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.clock} clock, "
          f"{args.reps} blocks of {DEFAULT_EVERY} steps (one measured) after {WARMUP} warm-up, "
          "interleaved")
    cols = ["(a) ms", "(t) ms", "thru t/a", "meas a ms", "meas t ms", "meas t/a"]
    header = f"{'model':<32}" + "".join(f"{c:>10}" for c in cols)
    print(header)
    print("-" * len(header))
    for case in cases(args.models):
        ms, ratio, measured = measure(case, args.reps, clock)
        row = [*ms[:2], ratio, *ms[2:], measured]
        print(f"{case.name:<32}" + "".join(f"{v:>10.2f}" if i not in (2, 5) else f"{v:>10.3f}"
                                           for i, v in enumerate(row)), flush=True)
    print("\nthru t/a: tracked throughput / plain throughput over blocks of "
          f"{DEFAULT_EVERY} steps (goal >= 0.95); meas: the measured step alone.")


if __name__ == "__main__":
    main()
