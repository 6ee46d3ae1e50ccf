"""Does the recommendation survive a busy machine? `bsfind recommend`, quiet vs loaded.

    .venv/bin/python benchmarks/timing_under_load.py            # 5 + 5 runs per config
    .venv/bin/python benchmarks/timing_under_load.py --runs 2 --configs configs/digits-mlp.yaml

For each config, runs `bsfind recommend CONFIG --json` RUNS times on the quiet
machine and RUNS times beside BUSY busy-loop processes (started and stopped by
this script), alternating quiet and loaded runs so that drift in the machine's
speed hits both alike. Prints, per config, every recommended batch, the ratio of
the loaded median to the quiet median, and the worst loaded recommendation's
ratio to the quiet median. Goal (issue #14): every loaded recommendation within
×1.5 of the quiet median.

With ``--one-thread``, each config also gets RUNS quiet runs with one intra-op thread
(OMP_NUM_THREADS=1): beside a steady load bsfind runs on the cores left free, so on a
2-core machine with one busy process its answer should be the quiet one-thread answer.

Run it with nothing else busy on the machine: the quiet runs must be quiet.
Besides the three shipped configs, the default list holds the issue's own case:
a 30→2 logistic regression on scikit-learn's 569-example breast-cancer data,
baseline 32 (benchmarks/assets/logreg.yaml).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ["configs/digits-mlp.yaml", "configs/digits-cnn.yaml", "configs/text-transformer.yaml",
           "benchmarks/assets/logreg.yaml"]
BUSY_LOOP = "while True:\n    pass\n"
GOAL = 1.5


def recommend(config: str, extra: list[str], threads: int | None = None) -> dict[str, object]:
    """One `bsfind recommend --json` run (with ``threads`` intra-op threads: torch reads
    OMP_NUM_THREADS); the recommendation and the step-time fit."""
    bsfind = Path(sys.executable).parent / "bsfind"
    env = dict(os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads else {}))
    proc = subprocess.run([str(bsfind), "recommend", config, "--json", *extra],
                          cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"bsfind recommend {config} failed:\n{proc.stderr[-2000:]}")
    doc = json.loads(proc.stdout)
    timing = doc.get("timing") or {}
    return {"batch": doc["recommendation"]["batch_size"],
            "range": doc["recommendation"]["batch_range"],
            "t0": timing.get("t0"), "c": timing.get("per_example"), "r2": timing.get("r2"),
            "fit_ok": timing.get("fit_ok"), "rungs": len(timing.get("points") or []),
            "seconds": doc["seconds"]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--configs", nargs="+", default=CONFIGS)
    ap.add_argument("--runs", type=int, default=5, help="quiet and loaded runs per config")
    ap.add_argument("--busy", type=int, default=1, help="busy-loop processes while loaded")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="spec override for every run, e.g. probe.max_seconds=30")
    ap.add_argument("--one-thread", action="store_true",
                    help="also RUNS quiet runs with one intra-op thread: what bsfind gives "
                         "beside a load that leaves one core free")
    args = ap.parse_args()
    extra = [a for kv in args.set for a in ("--set", kv)]
    results: dict[str, dict[str, list[dict[str, object]]]] = {}
    start = time.perf_counter()
    for config in args.configs:
        results[config] = {"quiet": [], "loaded": [], "1 thread": []}
        for i in range(args.runs):
            modes = ["quiet", "loaded"] if i % 2 == 0 else ["loaded", "quiet"]
            for mode in modes + (["1 thread"] if args.one_thread else []):
                busy = [subprocess.Popen([sys.executable, "-c", BUSY_LOOP])
                        for _ in range(args.busy if mode == "loaded" else 0)]
                try:
                    time.sleep(0.5 if busy else 0.0)  # let the load settle in
                    r = recommend(config, extra, 1 if mode == "1 thread" else None)
                finally:
                    for p in busy:
                        p.kill()
                        p.wait()
                results[config][mode].append(r)
                print(f"{config} {mode:8} run {i + 1}: batch {r['batch']} (t0 {r['t0']:.3g} s, "
                      f"c {r['c']:.3g} s, R² {r['r2']:.2f}, {r['rungs']} rungs, "
                      f"{r['seconds']:.0f} s)", file=sys.stderr, flush=True)
    print(f"\n{args.runs} quiet and {args.runs} loaded runs per config, {args.busy} busy-loop "
          f"process(es) while loaded, {(time.perf_counter() - start) / 60:.1f} min\n")
    one = args.one_thread
    print("| config | quiet batches | loaded batches | loaded median / quiet median | "
          "worst loaded / quiet median | within ×1.5 |"
          + (" quiet, 1 thread | loaded median / 1-thread median |" if one else ""))
    print("|---|---|---|---|---|---|" + ("---|---|" if one else ""))
    ok_all = True
    for config, r in results.items():
        quiet = [int(x["batch"]) for x in r["quiet"]]  # type: ignore[call-overload]
        loaded = [int(x["batch"]) for x in r["loaded"]]  # type: ignore[call-overload]
        qm, lm = statistics.median(quiet), statistics.median(loaded)
        worst = max(max(b / qm, qm / b) for b in loaded)
        ok = worst <= GOAL
        ok_all &= ok
        single = [int(x["batch"]) for x in r["1 thread"]]  # type: ignore[call-overload]
        extra_cells = (f" {', '.join(map(str, single))} | {lm / statistics.median(single):.2f} |"
                       if single else "")
        print(f"| {Path(config).stem} | {', '.join(map(str, quiet))} | "
              f"{', '.join(map(str, loaded))} | {lm / qm:.2f} | {worst:.2f} | "
              f"{'yes' if ok else 'NO'} |" + extra_cells)
    return 0 if ok_all else 1


if __name__ == "__main__":
    sys.exit(main())
