"""Seconds of probing to reach a 10% interval: per-example vs micro-batch form.

    .venv/bin/python benchmarks/probe_efficiency.py [--config configs/digits-mlp.yaml] [--seeds 5]

Both forms measure the same model at the same fixed weights until the 95%
interval's half-width of B_simple is within 10% of the estimate; seeds are
interleaved (per-example, micro-batch, per-example, ...) so load on the
machine hits both alike. Prints the medians of seconds and of examples used,
and their ratios (micro-batch / per-example: above 1 means per-example wins).
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bsfind.budget import Deadline  # noqa: E402
from bsfind.noise.probe import NoiseProbe, ProbeOptions  # noqa: E402
from bsfind.spec import load_spec  # noqa: E402
from bsfind.workload import build  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=str(ROOT / "configs" / "digits-mlp.yaml"))
    ap.add_argument("--seeds", type=int, default=7)
    ap.add_argument("--target", type=float, default=0.1)
    args = ap.parse_args()
    torch.set_num_threads(2)
    spec = load_spec(args.config)
    job = build(spec)
    batch = spec.optimizer.batch_size
    results: dict[str, dict[str, list[float]]] = {
        m: {"seconds": [], "examples": [], "b_simple": []} for m in ("per-example", "microbatch")
    }
    # One untimed run of each to warm up allocators and kernels.
    for method in results:
        NoiseProbe(job, ProbeOptions(method=method, batch_size=batch), seed=999).run(
            Deadline.after(60))
    for seed in range(args.seeds):
        for method, r in results.items():
            opts = ProbeOptions(method=method, batch_size=batch, target_rel_error=args.target)
            est = NoiseProbe(job, opts, seed=seed).run(Deadline.after(120))
            r["seconds"].append(est.seconds)
            r["examples"].append(est.examples)
            r["b_simple"].append(est.b_simple or float("nan"))
    print(f"config: {args.config}  target: ±{args.target:.0%} (95% CI half-width)  "
          f"seeds: {args.seeds}  threads: {torch.get_num_threads()}")
    print(f"{'method':<12} {'median s':>10} {'median examples':>16} {'median B_simple':>16}")
    for method, r in results.items():
        print(f"{method:<12} {statistics.median(r['seconds']):>10.3f} "
              f"{statistics.median(r['examples']):>16,.0f} "
              f"{statistics.median(r['b_simple']):>16.1f}")
    pe, mb = results["per-example"], results["microbatch"]
    print(f"ratio micro-batch / per-example: seconds "
          f"{statistics.median(mb['seconds']) / statistics.median(pe['seconds']):.2f}x, "
          f"examples {statistics.median(mb['examples']) / statistics.median(pe['examples']):.2f}x")


if __name__ == "__main__":
    main()
