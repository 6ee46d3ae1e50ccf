"""The branches' rule applied to the sweeps themselves (issue #17): no new training.

    .venv/bin/python scripts/sweep_rule_eval.py digits-mlp digits-cnn text-transformer

Acceptance 1 of issue #17 holds the branch measurement to within 2× of the B_crit fitted
to a sweep's steps to each target, S(B) = S_min(1 + B_crit/B). The branches do not fit
that curve: their rule (``bsfind.branches``) passes rung B when it needs at most √2 times
the examples of B/2, and reads the last rung that passes. This script asks what that rule
reads on the sweep's own steps, where no branch is involved: the examples to a target at
batch B are B·S(B), so rung B passes exactly when S(B/2)/S(B) >= √2. The rungs are the
ladder ``bsfind branch`` climbs (B0, 2·B0, ... 16·B0, down to B0/8 when 2·B0 already
fails), limited to the batches the sweep ran, and the read is bracketed as the branches'
(``branches.bracket``). Under the fitted curve itself the rule's read is within √2 of
B_crit by construction, so every miss below is the sweep's steps departing from the curve.

Also per target:
- a continuous read: between the last rung that passes and the first that fails, the
  batch R* where S(R*/2)/S(R*) = √2 (interpolated in log B), and B_crit = R*/√2 (the
  crossing under the curve, ``branches.crossing``);
- B_crit fitted, as the sweep's is, but only to the batches a ladder spans, B0/2 to
  16·B0: what a read that fits all rungs, rather than stopping at the first that falls
  behind, would give if the branches reproduced the sweep's steps;
- the reference's own repeatability: B_crit fitted to each seed's steps alone (at the
  learning rate the sweep chose from both), and the rule's read on each seed's steps;
- the branch reads of docs/img/branch-<name>.json (local; run average from the start)
  and docs/img/branch-<name>-stretch.json (branches as long as each stretch).

Writes docs/img/branch-sweep-rule.md and .json (``--out`` PREFIX to change).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import _train
from _train import fit_critical, fmt_num

from bsfind import branches

ROOT = Path(__file__).resolve().parent.parent


def rule_read(steps: dict[int, float], baseline_batch: int
              ) -> tuple[int | None, str, float | None]:
    """The branches' ladder and rule on steps to a target per batch: (read, bound,
    continuous B_crit or None). Batches missing from ``steps`` end the ladder there."""
    def passes(b: int) -> bool:  # rung b against b/2: S(b/2)/S(b) >= √2
        return steps[b // 2] / steps[b] >= branches.TOLERANCE

    up = [b for b in branches.ladder(baseline_batch, 1 << 30) if b in steps]
    if not up or up[0] != baseline_batch:
        return None, "none", None
    rungs = up[:1]
    for b in up[1:]:
        rungs.append(b)
        if not passes(b):
            break
    if len(rungs) == 2 and not passes(rungs[1]):  # 2·B0 fell behind: go below B0
        for b in branches.below(baseline_batch):
            if b not in steps:
                break
            rungs.insert(0, b)
            if passes(rungs[1]):
                break
    found: list[branches.Verdict] = [branches.Verdict(rungs[0] * steps[rungs[0]], None, None)]
    for b in rungs[1:]:
        ok = passes(b)
        found.append(branches.Verdict(b * steps[b], branches.TOLERANCE * b / 2 * steps[b // 2],
                                      ok))
        if not ok:
            break
    read, bound, _ = branches.bracket(rungs, found)
    return read, bound, continuous(steps, read) if bound == "bracketed" else None


def continuous(steps: dict[int, float], read: int | None) -> float | None:
    """B_crit from the rung where the doubling's step ratio crosses √2, interpolated in
    log B between the last passing rung ``read`` and the failing 2·read."""
    if read is None or read // 2 not in steps or 2 * read not in steps:
        return None
    r1 = math.log(steps[read // 2] / steps[read])
    r2 = math.log(steps[read] / steps[2 * read])
    target = math.log(branches.TOLERANCE)
    if not r1 >= target > r2:
        return None
    t = (r1 - target) / (r1 - r2)
    return read * 2.0 ** t / branches.crossing()


def seed_steps(crit: dict[str, Any], target: float) -> dict[int, dict[int, float]]:
    """seed -> batch -> that seed's steps to ``target`` at the learning rate the sweep
    chose for the batch (from both seeds)."""
    out: dict[int, dict[int, float]] = {}
    for b in crit["batches"]:
        lr = _key(b["best_lr"], target)
        for run in b["runs"]:
            s = _key(run["crossings"], target)
            if lr is not None and s is not None and math.isclose(run["lr"], lr):
                out.setdefault(run["seed"], {})[b["batch_size"]] = s
    return out


def _key(d: dict[str, Any], t: float) -> Any:
    return d.get(str(t), d.get(f"{t:g}"))


def _within(value: float | None, ref: float | None) -> bool | None:
    if value is None or ref is None or not math.isfinite(ref) or ref <= 0:
        return None
    return 0.5 <= value / ref <= 2.0


def problem(name: str, img: Path) -> list[dict[str, Any]]:
    """One row per target of problem ``name`` (reads its sweep and branch JSONs)."""
    crit = json.loads((img / f"critical-batch-{name}.json").read_text())
    base = json.loads((img / f"branch-{name}.json").read_text())
    stretch_path = img / f"branch-{name}-stretch.json"
    stretch = (json.loads(stretch_path.read_text())["summary"]["targets"]
               if stretch_path.exists() else [])
    b0 = crit["baseline_batch"]
    rows = []
    for t in crit["targets"]:
        fit = _key(crit["fits"], t)
        steps = {int(b): s for b, s in fit["points"]}
        read, bound, cont = rule_read(steps, b0)
        lo, hi = b0 // 2, b0 * branches.MAX_FACTOR
        in_ladder = fit_critical(sorted((b, v) for b, v in steps.items() if lo <= b <= hi))
        per_seed = seed_steps(crit, t)
        seed_fits = [fit_critical(sorted(s.items())) for _, s in sorted(per_seed.items())]
        seed_reads = [rule_read(s, b0)[0] for _, s in sorted(per_seed.items())]
        br = next((s for s in base["summary"] if math.isclose(s["target"], t)), None)
        st = next((s for s in stretch if math.isclose(s["target"], t)), None)
        rows.append({
            "problem": name, "target": t, "b_crit": fit["b_crit"],
            "rule_read": read, "rule_bound": bound, "rule_continuous": cont,
            "ladder_fit": None if in_ladder is None else in_ladder.b_crit,
            "seed_fits": [None if f is None else f.b_crit for f in seed_fits],
            "seed_reads": seed_reads,
            "branch": br["critical_batch"] if br else None,
            "run_average": br["run_average"] if br else None,
            "stretch": st["stretch_average"] if st else None,
        })
    return rows


def hits(rows: Sequence[dict[str, Any]], key: str, ref: str = "b_crit") -> tuple[int, int]:
    """(values within 2× of each row's ``ref``, values compared); lists count each entry."""
    n = total = 0
    for r in rows:
        values = r[key] if isinstance(r[key], list) else [r[key]]
        for v in values:
            ok = _within(v, r[ref])
            if ok is not None:
                total += 1
                n += ok
    return n, total


def agreement(rows: Sequence[dict[str, Any]], key: str) -> tuple[int, int]:
    """(branch values within one doubling of the rule's read on the sweep, compared)."""
    n = total = 0
    for r in rows:
        for v in r[key] or []:
            if v is not None and r["rule_read"] is not None:
                total += 1
                n += 0.5 <= v / r["rule_read"] <= 2.0
    return n, total


def render(rows: Sequence[dict[str, Any]]) -> str:
    def pair(values: Sequence[Any] | None) -> str:
        return "—" if not values else " / ".join(fmt_num(v) for v in values)

    def ratio(v: float | None, ref: float) -> str:
        return "—" if v is None else f"{fmt_num(v)} ({v / ref:.2f})"

    out = ["### The branches' rule on the sweeps' own steps", "",
           "Rule read: the ladder and rule of `bsfind branch` applied to the sweep's steps to "
           "each target (rung B passes when S(B/2)/S(B) ≥ √2); continuous: B_crit where that "
           "ratio crosses √2, interpolated in log B; fit over B0/2..16·B0: the sweep's fit "
           "restricted to a ladder's batches; per seed: B_crit fitted to one seed's "
           "steps, and the rule's read on them. Values in brackets: ÷ the fitted B_crit.", "",
           "| problem | target | fitted B_crit | rule read on the sweep | continuous | "
           "fit over B0/2..16·B0 | fit per seed | rule read per seed | branch, local | "
           "run average | stretch |",
           "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        bc = r["b_crit"]
        bound = "" if r["rule_bound"] == "bracketed" else f" ({r['rule_bound']})"
        out.append(
            f"| {r['problem']} | {fmt_num(r['target'])} | {fmt_num(bc)} | "
            f"{ratio(r['rule_read'], bc)}{bound} | {ratio(r['rule_continuous'], bc)} | "
            f"{ratio(r['ladder_fit'], bc)} | "
            f"{pair(r['seed_fits'])} | "
            f"{pair(r['seed_reads'])} | {pair(r['branch'])} | {pair(r['run_average'])} | "
            f"{pair(r['stretch'])} |")
    out += ["", "| within 2× of the fitted B_crit | hits |", "|---|---|"]
    for key, label in [("rule_read", "the rule's read on the sweep's steps (one per target)"),
                       ("rule_continuous", "its continuous read"),
                       ("ladder_fit", "B_crit fitted to the sweep's B0/2..16·B0 only"),
                       ("seed_fits", "B_crit fitted to one seed's steps"),
                       ("seed_reads", "the rule's read on one seed's steps"),
                       ("branch", "branches, local read"),
                       ("run_average", "branches, run average from the start"),
                       ("stretch", "branches as long as each stretch")]:
        n, total = hits(rows, key)
        out.append(f"| {label} | {n} of {total} |")
    out += ["", "| within one doubling of the rule's read on the sweep | hits |", "|---|---|"]
    for key, label in [("branch", "branches, local read"),
                       ("run_average", "branches, run average from the start"),
                       ("stretch", "branches as long as each stretch")]:
        n, total = agreement(rows, key)
        out.append(f"| {label} | {n} of {total} |")
    return "\n".join(out) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("names", nargs="+", help="problems with docs/img/critical-batch-<name>.json")
    ap.add_argument("--img", default=str(ROOT / "docs" / "img"))
    ap.add_argument("--out", default=None, help="default <img>/branch-sweep-rule")
    args = ap.parse_args(argv)
    img = Path(args.img)
    rows = [r for name in args.names for r in problem(name, img)]
    md = render(rows)
    _train.write_outputs(Path(args.out or img / "branch-sweep-rule"), md, {"rows": rows})
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
