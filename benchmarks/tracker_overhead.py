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
                its defaults (per-example norms on one step in ``every``: 32, raised by
                the tracker when its own timing shows measured steps would cost more
                than 2% of training time; batch size read from the model's input)

Each copy first runs WARMUP_STEPS steps alone, long enough for the tracker to settle
its ``every``. The unit of time is then a block of a whole number of measurement
cycles (about BLOCK_SECONDS of training), so blocks hold about the same number of
measured steps and a block's time is the amortised cost. Blocks of the two variants
are interleaved in a random order each repetition, so load on a shared machine hits
both alike. The throughput ratio is the median over repetitions of (a block time / t
block time) within the repetition: tracked throughput ÷ plain throughput, goal >= 0.95.
Pairing the two blocks timed next to each other cancels the machine's slow drifts, and
the median ignores a block that a burst of load hit: over repeated runs it varied by
about ±0.01 on the MLP, where the ratio of each variant's low-quartile block varied
by ±0.02. The table also gives milliseconds per step (low quartiles: other processes
only ever add time, DESIGN §9), the tracker's ``every`` (timed steps per measured
step), and the measured step alone against a plain step (low quartiles).
"""

from __future__ import annotations

import argparse
import copy
import random
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from per_example_overhead import THREADS, Case, cases, synchronizer  # noqa: E402

from bsfind.tracker import DEFAULT_EVERY, Tracker, track  # noqa: E402

# Steps each variant runs alone before timing: enough for the tracker to time four
# measured steps and settle its default ``every`` (bsfind.tracker.OVERHEAD_SHARE).
WARMUP_STEPS = 5 * DEFAULT_EVERY
# A timed block holds a whole number of the tracker's measurement cycles, about this
# many seconds of training (at least one cycle), so that blocks hold about the same
# number of measured steps even when ``every`` moves by a few steps.
BLOCK_SECONDS = 0.25


def _step(case: Case, model: torch.nn.Module, opt: torch.optim.Optimizer,
          tracker: Tracker | None) -> None:
    loss = case.loss(model(case.x), case.y)
    loss.backward()
    if tracker is not None:
        tracker.update(loss)
    opt.step()
    opt.zero_grad(set_to_none=True)


@dataclass
class Result:
    ms: list[float]  # plain ms/step, tracked ms/step, plain step ms, measured step ms
    ratio: float  # tracked throughput / plain throughput
    measured: float  # the same on the measured step alone
    every: float  # timed steps / measured steps of the tracked variant
    cadence: int = 0  # the tracker's own ``every`` at the end (one step in this many)


def measure(case: Case, reps: int, clock: Callable[[], float]) -> Result:
    """Both variants after warm-up, in interleaved blocks of whole measurement cycles."""
    models_ = [case.model, copy.deepcopy(case.model)]
    opts = [torch.optim.Adam(m.parameters(), lr=1e-4) for m in models_]
    tracker = track(models_[1])  # the defaults
    t_step = 0.0
    for v in range(2):  # each alone: the tracker times its own steps, not the other's
        t0 = clock()
        for _ in range(WARMUP_STEPS):
            _step(case, models_[v], opts[v], tracker if v == 1 else None)
        t_step = (clock() - t0) / WARMUP_STEPS if v == 0 else t_step
    every = tracker.every
    length = every * max(1, round(BLOCK_SECONDS / (every * t_step)))
    blocks: list[list[float]] = [[], []]
    steps: list[list[float]] = [[], []]  # tracked: its measured steps; plain: all
    order = random.Random(0)
    for _ in range(reps):
        for v in order.sample(range(2), 2):
            t_block = clock()
            for _ in range(length):
                measured = v == 1 and tracker.measuring
                t0 = clock()
                _step(case, models_[v], opts[v], tracker if v == 1 else None)
                if v == 0 or measured:
                    steps[v].append(clock() - t0)
            blocks[v].append(clock() - t_block)
    tracker.close()
    assert tracker.records, "the tracker measured nothing"
    low = [_low(b) for b in (*blocks, *steps)]
    ms = [low[0] / length * 1e3, low[1] / length * 1e3, low[2] * 1e3, low[3] * 1e3]
    paired = statistics.median(a / t for a, t in zip(*blocks, strict=True))
    return Result(ms, paired, low[2] / low[3], reps * length / max(1, len(steps[1])),
                  tracker.every)


def _low(times: list[float]) -> float:
    """The low quartile: other processes only ever add time, so a low quantile over
    interleaved repetitions estimates a variant's own cost (DESIGN §9)."""
    s = sorted(times)
    return s[(len(s) - 1) // 4]


def _synchronised(sync: Callable[[], None]) -> Callable[[], float]:
    def clock() -> float:
        sync()
        return time.perf_counter()
    return clock


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=20, help="timed blocks per variant")
    parser.add_argument("--threads", type=int, default=THREADS, help="torch.set_num_threads")
    parser.add_argument("--clock", choices=["wall", "thread"], default="wall",
                        help="wall: perf_counter; thread: this thread's CPU time (--threads 1)")
    parser.add_argument("--device", default="cpu",
                        help="cpu, cuda or cuda:N (the clock then synchronises the device)")
    parser.add_argument("--models", nargs="+", default=["mlp", "cnn", "transformer"],
                        choices=["mlp", "cnn", "cnn32", "transformer"])
    args = parser.parse_args()
    if args.clock == "thread" and args.threads != 1:
        parser.error("--clock thread measures one thread: use it with --threads 1")
    if args.clock == "thread" and args.device != "cpu":
        parser.error("--clock thread measures the host thread: use it with --device cpu")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: CUDA is not available")
    clock = time.perf_counter if args.clock == "wall" else time.thread_time
    if args.device.startswith("cuda"):  # the device's queued work counts: wait for it
        clock = _synchronised(synchronizer(torch.device(args.device)))
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", message="There is a performance drop")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.clock} clock, "
          f"on {args.device}, {args.reps} blocks per variant of about {BLOCK_SECONDS} s "
          f"(whole measurement cycles) after {WARMUP_STEPS} warm-up steps each, interleaved")
    cols = ["(a) ms", "(t) ms", "thru t/a", "every", "step a ms", "meas t ms", "meas t/a"]
    header = f"{'model':<32}" + "".join(f"{c:>10}" for c in cols)
    print(header)
    print("-" * len(header))
    for case in cases(args.models, args.device):
        r = measure(case, args.reps, clock)
        cells = [f"{r.ms[0]:.2f}", f"{r.ms[1]:.2f}", f"{r.ratio:.3f}", f"{r.every:.1f}",
                 f"{r.ms[2]:.2f}", f"{r.ms[3]:.2f}", f"{r.measured:.3f}"]
        print(f"{case.name:<32}" + "".join(f"{c:>10}" for c in cells), flush=True)
    print("\nthru t/a: tracked throughput / plain throughput (goal >= 0.95); every: timed "
          "steps per measured step (the tracker's default adapts it); meas: a measured step "
          "against a plain one.")


if __name__ == "__main__":
    main()
