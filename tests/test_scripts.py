"""The validation scripts (critical_batch.py, equal_time.py, schedule_eval.py, lr_eval.py, ...)
on a tiny setting.

Not a check of the evidence (docs/validation.md has that), only that the
scripts still run end to end against the current bsfind API, in a few seconds.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from bsfind import branches

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))

import _train  # noqa: E402
import branch_cooldown_eval  # noqa: E402
import branch_eval  # noqa: E402
import branch_fit_eval  # noqa: E402
import branch_stretch_eval  # noqa: E402
import ci_coverage  # noqa: E402
import critical_batch  # noqa: E402
import equal_time  # noqa: E402
import lr_eval  # noqa: E402
import schedule_eval  # noqa: E402
import sweep_rule_eval  # noqa: E402

pytest.importorskip("sklearn")  # the digits dataset
pytest.importorskip("matplotlib")


def test_fit_recovers_exact_critical_batch() -> None:
    bs = np.array([4, 8, 16, 32, 64, 128, 256, 512])
    steps = 100.0 * (1 + 50.0 / bs)
    fit = _train.fit_critical(list(zip(bs.tolist(), steps.tolist(), strict=True)))
    assert fit is not None
    assert fit.b_crit == pytest.approx(50.0, rel=1e-9)
    assert fit.s_min == pytest.approx(100.0, rel=1e-9)
    assert fit.r2 == pytest.approx(1.0)
    assert fit.rel_rms < 1e-9


def test_fit_flags_no_saturation_and_too_few_points() -> None:
    # S halves with every doubling: pure 1/B, S_min = 0, B_crit unbounded.
    fit = _train.fit_critical([(4, 800.0), (8, 400.0), (16, 200.0), (32, 100.0)])
    assert fit is not None and (math.isinf(fit.b_crit) or fit.b_crit > 1e6)
    assert _train.fit_critical([(4, 10.0), (8, 9.0)]) is None


@pytest.fixture
def one_thread() -> None:
    # The scripts default to one thread: two threads on a shared 2-core runner
    # oversubscribe it and slow this test tenfold.
    torch.set_num_threads(1)


@pytest.mark.usefixtures("one_thread")
def test_critical_batch_runs_end_to_end(tmp_path: Path) -> None:
    spec, job = _train.load_job(str(ROOT / "configs" / "digits-mlp.yaml"))
    res = critical_batch.gather(
        spec, job, batches=[16, 64, 256], lr_mults=[0.5], seeds=1, targets=[1.5, 1.0],
        max_steps=150, extend=0, eval_examples=256, probe_seconds=0.25, curv_batch=64,
        window_points=2, window_seconds=0.1,
    )
    assert [b.batch_size for b in res.batches] == [16, 64, 256]
    for b in res.batches:
        assert all(v is not None for v in b.best_steps.values())
    # More examples per step, never more steps.
    s = [b.best_steps[1.0] for b in res.batches]
    assert s[0] >= s[1] >= s[2]  # type: ignore[operator]
    assert res.fits[1.0] is not None
    # Two probe runs (data orders) by default, each probed at the crossing and at one
    # neighbouring checkpoint; the pooled estimate combines all four.
    assert sum(p.at_crossing for p in res.probes[1.0]) == 2
    assert len(res.probes[1.0]) == 4
    assert all(p.b_simple_rounds > 0 for p in res.probes[1.0])
    pooled = res.pooled[1.0]
    assert pooled is not None and pooled.checkpoints == 4
    md = critical_batch.render_markdown(res)
    assert "B_crit" in md and "| 1 |" in md
    critical_batch.plot(res, tmp_path / "cb.png")
    assert (tmp_path / "cb.png").stat().st_size > 0
    assert critical_batch.to_json(res)["targets"] == [1.5, 1.0]


@pytest.mark.usefixtures("one_thread")
def test_equal_time_runs_end_to_end(tmp_path: Path) -> None:
    out = tmp_path / "et"
    rc = equal_time.main([str(ROOT / "configs" / "digits-mlp.yaml"), "--batch", "128",
                          "--lr", "0.003", "--seconds", "0.3", "--max-factor", "3",
                          "--eval-examples", "256", "--threads", "1", "--out", str(out)])
    assert rc == 0
    md = out.with_suffix(".md").read_text()
    assert "manual (--batch/--lr)" in md and "recommended, same budget" in md
    doc = out.with_suffix(".json").read_text()
    assert '"measured"' in doc


@pytest.mark.usefixtures("one_thread")
def test_branch_eval_runs_end_to_end(tmp_path: Path) -> None:
    """A tiny sweep's JSON, then the branches from its probe runs' crossings."""
    import json

    spec, job = _train.load_job(str(ROOT / "configs" / "digits-mlp.yaml"))
    res = critical_batch.gather(
        spec, job, batches=[16, 64, 256], lr_mults=[1.0], seeds=1, targets=[1.0],
        max_steps=150, extend=0, eval_examples=256, probe_seconds=0.25, curv_batch=64,
        window_points=1, probe_seeds=1)
    crit = tmp_path / "crit.json"
    crit.write_text(json.dumps(critical_batch.to_json(res)))
    out = tmp_path / "branch"
    rc = branch_eval.main([str(ROOT / "configs" / "digits-mlp.yaml"), "--crit", str(crit),
                           "--seeds", "0", "--threads", "1", "--branch-steps", "32",
                           "--out", str(out)])
    assert rc == 0
    md = out.with_suffix(".md").read_text()
    assert "Δ = 2,048 examples (32 steps at B0)" in md
    assert "branch critical batch" in md and "% of sweep" in md
    doc = json.loads(out.with_suffix(".json").read_text())
    row = doc["summary"][0]
    assert row["target"] == 1.0 and row["critical_batch"][0] in (64, 128, 256, 512, 1024)
    assert row["sweep_examples"] == sum(r.steps * r.batch_size
                                        for b in res.batches for r in b.runs)
    start, crossing = doc["measurements"]  # the run's step 0 (target inf: null), then 1.0
    assert start["step"] == 0 and start["target"] is None
    assert start["branches"]["optimizer_state"] == "fresh"  # Adam has no state at step 0
    assert crossing["branches"]["optimizer_state"] == "carried"
    assert doc["constants"]["branch_steps"] == 32
    assert crossing["branches"]["delta_examples"] == 32 * 64
    # the run average from the start to the crossing: branches.run_average of both reads
    reads = [(m["step"], m["branches"]["critical_batch"]) for m in (start, crossing)]
    assert row["run_average"][0] == pytest.approx(branches.run_average(reads, 64))
    assert row["run_average_examples"][0] == sum(m["branches"]["examples"]
                                                 for m in (start, crossing))


@pytest.mark.usefixtures("one_thread")
def test_branch_cooldown_eval_runs_end_to_end(tmp_path: Path) -> None:
    """The cooled ladder from the shipped sweep's first digits-mlp crossing (seed 0)."""
    import json

    out = tmp_path / "cool"
    img = ROOT / "docs" / "img"
    rc = branch_cooldown_eval.main([
        str(ROOT / "configs" / "digits-mlp.yaml"), "--seeds", "0", "--targets", "1.0",
        "--crit", str(img / "critical-batch-digits-mlp.json"),
        "--branches", str(img / "branch-digits-mlp.json"), "--out", str(out)])
    assert rc == 0
    doc = json.loads(out.with_suffix(".json").read_text())
    (ladder,) = doc["ladders"]
    rungs = ladder["rungs"]
    assert rungs[0]["batch_size"] == 64 and "reference_loss" in rungs[0]
    for i, r in enumerate(rungs[1:], 1):  # each rung held to the one below's Δ/√2 branch
        assert r["against"] == rungs[i - 1]["reference_loss"]
        assert r["passed"] == (r["loss"] <= r["against"])
        assert r["steps"] == round(64 * 64 / r["batch_size"])
    last_passed = [r["batch_size"] for r in rungs[1:] if r["passed"]]
    assert ladder["critical_batch"] == (last_passed[-1] if last_passed else 64)
    assert doc["summary"]["points"] == 1
    assert "cooled branches" in out.with_suffix(".md").read_text()


def test_branch_stretch_ladders() -> None:
    """Δ covers the stretch, in whole steps of the top rung, which keeps 4 steps."""
    assert branch_stretch_eval.stretch_ladder(10) == (10, 2)
    assert branch_stretch_eval.stretch_ladder(64) == (64, 16)
    assert branch_stretch_eval.stretch_ladder(48) == (48, 8)
    assert branch_stretch_eval.stretch_ladder(30) == (32, 4)
    assert branch_stretch_eval.stretch_ladder(3) == (4, 2)
    assert branch_stretch_eval.stretch_ladder(500) == (512, 16)
    # two stretches by hand: S_min = 10/(1 + 32/64) and 30/(1 + 128/64)
    w = [10 / 1.5, 30 / 3.0]
    assert branches.stretch_average([(0, 10, 32), (10, 40, 128)], 64) == (
        pytest.approx((32 * w[0] + 128 * w[1]) / sum(w)))


def digits_mlp_experiment(main: Any, out: Path) -> dict[str, Any]:
    """Run a branch experiment's ``main`` on seed 0 of the shipped digits-mlp sweep and
    branches; its JSON."""
    img = ROOT / "docs" / "img"
    rc = main([str(ROOT / "configs" / "digits-mlp.yaml"), "--seeds", "0",
               "--crit", str(img / "critical-batch-digits-mlp.json"),
               "--branches", str(img / "branch-digits-mlp.json"), "--out", str(out)])
    assert rc == 0
    return json.loads(out.with_suffix(".json").read_text())  # type: ignore[no-any-return]


@pytest.mark.usefixtures("one_thread")
def test_branch_stretch_eval_runs_end_to_end(tmp_path: Path) -> None:
    """Seed 0 of the shipped digits-mlp sweep: one ladder per stretch between targets."""
    out = tmp_path / "stretch"
    doc = digits_mlp_experiment(branch_stretch_eval.main, out)
    ladders = doc["ladders"]
    assert ladders[0]["from_step"] == 0
    for a, b in zip(ladders, ladders[1:], strict=False):
        assert b["from_step"] == a["to_step"]  # the stretches tile the run
    for r in ladders:
        assert r["branch_steps"] >= r["to_step"] - r["from_step"]
        assert r["branch_steps"] % r["max_factor"] == 0
    first = doc["summary"]["targets"][0]  # loss 1: the first stretch only
    assert first["stretch_average"][0] == pytest.approx(ladders[0]["critical_batch"])
    assert first["examples"][0] == ladders[0]["examples"]
    assert "branches as long as their stretch" in out.with_suffix(".md").read_text()


def test_branch_fit_eval_runs_end_to_end(tmp_path: Path) -> None:
    """Seed 0 of the shipped digits-mlp sweep: every rung at step 0 and each target."""
    doc = digits_mlp_experiment(branch_fit_eval.main, tmp_path / "fit")
    ladders = doc["ladders"]
    assert [r["step"] for r in ladders][0] == 0 and len(ladders) == 6
    for r in ladders:
        if r["level"] >= r["start_loss"]:  # no progress asked for: no read
            assert r["read"] is None and not r["examples_to_level"]
        if r["read"] is not None:
            e = {int(b): v for b, v in r["examples_to_level"].items()}
            assert r["read"] == pytest.approx(branch_fit_eval.fit_read(e))
    first = doc["summary"]["targets"][0]  # loss 1: step 0 and the first target
    reads = [(r["step"], r["read"]) for r in ladders[:2]]
    if None not in (v for _, v in reads):
        assert first["run_average"][0] == pytest.approx(branches.run_average(reads, 64))
    assert first["examples"][0] == ladders[0]["examples"] + ladders[1]["examples"]


def test_branch_fit_helpers() -> None:
    # First crossing of 0.5 from 1.0 at 0 examples: between (100, 0.6) and (200, 0.4).
    curve = [(100, 0.6), (200, 0.4), (300, 0.45)]
    assert branch_fit_eval.crossing_examples(curve, 1.0, 0.5) == pytest.approx(150.0)
    assert branch_fit_eval.crossing_examples(curve, 1.0, 0.3) is None
    # Before the first evaluation: interpolated from the start.
    assert branch_fit_eval.crossing_examples(curve, 1.0, 0.8) == pytest.approx(50.0)
    # E(B) = E_min(1 + B/B_crit) exactly: the fit recovers B_crit, from 3 rungs or from 2.
    exact = {b: 1000.0 * (1 + b / 96.0) for b in (32, 64, 128, 256)}
    assert branch_fit_eval.fit_read(exact) == pytest.approx(96.0, rel=1e-9)
    two = {b: exact[b] for b in (64, 128)}
    assert branch_fit_eval.fit_read(two) == pytest.approx(96.0, rel=1e-9)
    # Examples fall with the batch (no saturation in sight): no finite read.
    assert branch_fit_eval.fit_read({32: 900.0, 64: 800.0, 128: 700.0}) is None
    assert branch_fit_eval.fit_read({64: 800.0}) is None
    # Evaluations spread in log examples, the last step always, none past the end.
    steps = branch_fit_eval.eval_steps(128)
    assert steps[0] == 4 and steps[-1] == 128 and steps == sorted(set(steps))
    assert branch_fit_eval.eval_steps(4) == [1, 2, 3, 4]
    assert branch_fit_eval.ladder_batches(64, 10_000) == [32, 64, 128, 256, 512, 1024]


def test_sweep_rule_reads_the_ladder_on_steps() -> None:
    # S(32)/S(64) = 2 and S(64)/S(128) = 2 pass (>= √2); S(128)/S(256) = 1 fails: read 128,
    # bracketed. The log ratio falls from ln 2 to 0 between rungs 128 and 256, so it
    # crosses ln √2 halfway, at R* = 128·√2, and B_crit = R*/√2 = 128.
    steps = {16: 800.0, 32: 400.0, 64: 200.0, 128: 100.0, 256: 100.0, 512: 100.0}
    read, bound, cont = sweep_rule_eval.rule_read(steps, 32)
    assert (read, bound) == (128, "bracketed")
    assert cont == pytest.approx(128.0)
    # 2·B0 falls behind: the ladder goes below B0 until a doubling keeps up (16 -> 32).
    flat = {8: 400.0, 16: 200.0, 32: 180.0, 64: 170.0, 128: 165.0}
    assert sweep_rule_eval.rule_read(flat, 32)[:2] == (16, "bracketed")
    # Never falls behind within the sweep's batches: at least the last rung.
    assert sweep_rule_eval.rule_read({32: 400.0, 64: 200.0, 128: 100.0}, 32)[:2] == (
        128, "at least")
    # Under S = S_min(1 + B_crit/B) the read is within √2 of B_crit.
    for b_crit in (20.0, 50.0, 130.0, 300.0):
        exact = {b: 10.0 * (1 + b_crit / b) for b in (4, 8, 16, 32, 64, 128, 256, 512)}
        r, _, c = sweep_rule_eval.rule_read(exact, 32)
        assert r is not None and b_crit / math.sqrt(2) <= r <= b_crit * math.sqrt(2)
        assert c is not None and c == pytest.approx(b_crit, rel=0.15)


def test_sweep_rule_eval_runs_on_the_shipped_sweeps(tmp_path: Path) -> None:
    assert sweep_rule_eval.main(["digits-mlp", "--out", str(tmp_path / "sr")]) == 0
    doc = json.loads((tmp_path / "sr.json").read_text())
    assert [r["target"] for r in doc["rows"]] == [1.0, 0.3, 0.1, 0.03, 0.01]
    assert all(len(r["seed_fits"]) == 2 for r in doc["rows"])


def test_lr_eval_runs_end_to_end(tmp_path: Path) -> None:
    """The short runs at B0 and B* from step 0, against the shipped sweep and report."""
    import json

    out = tmp_path / "lr"
    rc = lr_eval.main([str(ROOT / "configs" / "digits-mlp.yaml"),
                       "--report", str(ROOT / "docs" / "img" / "schedule-eval-digits-mlp.json"),
                       "--sweep", str(ROOT / "docs" / "img" / "critical-batch-digits-mlp.json"),
                       "--points", "0", "--repeats", "1", "--out", str(out)])
    assert rc == 0
    doc = json.loads(out.with_suffix(".json").read_text())
    row = doc["points"][0]
    assert row["step"] == 0 and doc["steps"] == 32 and doc["cooldown"] == 16
    for key in ("b0_constant", "b0_cooldown", "bstar_constant", "bstar_cooldown"):
        losses = {float(k): v for k, v in row[key]["losses"].items()}
        assert sorted(losses) == list(lr_eval.FACTORS)
        assert row[key]["best"] == min(losses, key=lambda f: (losses[f], abs(math.log2(f))))
    assert doc["sweep_best_lr"]["b0"] == pytest.approx(doc["baseline_lr"])
    assert "B*: cool-down" in out.with_suffix(".md").read_text()


def test_trainer_switch_keeps_optimizer_and_data_order() -> None:
    spec, job = _train.load_job(str(ROOT / "configs" / "digits-mlp.yaml"))
    init = _train.snapshot(job.model)
    trainer = _train.Trainer(job, init, 16, 0.01, seed=0)
    for _ in range(3):
        trainer.step()
    order = trainer.sampler.order.clone()
    state = trainer.optimizer.state_dict()["state"]
    trainer.switch(64, 0.02)
    # The same permutation, carried on at the new batch size; Adam's moments kept.
    assert torch.equal(trainer.sampler.next(), order[48:112])
    assert trainer.optimizer.state_dict()["state"].keys() == state.keys()
    assert all(g["lr"] == 0.02 for g in trainer.optimizer.param_groups)
    trainer.step()
    assert trainer.examples == 3 * 16 + 64 and trainer.batch_size == 64


@pytest.mark.usefixtures("one_thread")
def test_schedule_eval_switches_at_the_phase_steps() -> None:
    spec, job = _train.load_job(str(ROOT / "configs" / "digits-mlp.yaml"))
    init = _train.snapshot(job.model)
    way = schedule_eval.Way("schedule", (schedule_eval.Phase(0, 16, 0.008),
                                         schedule_eval.Phase(5, 64, 0.016)))
    run = schedule_eval.run_way(job, init, way, seed=0, rep=0, target=1e-9, max_steps=12,
                                eval_idx=torch.arange(64), eval_frac=0.03, loss0=2.3)
    assert run.steps is None and run.steps_run == 12
    assert {b: len(t) for b, t in run.step_times.items()} == {16: 5, 64: 7}
    run.steps = 9.5  # as if the target were reached there
    assert run.steps_by_batch() == {16: 5, 64: 4.5}
    assert schedule_eval.parse_way("r=0:16:0.008,5:64:0.016") == schedule_eval.Way(
        "extra-r", way.phases)
    with pytest.raises(ValueError, match="step order"):
        schedule_eval.parse_way("r=0:16:0.008,0:64:0.016")


@pytest.mark.usefixtures("one_thread")
def test_schedule_eval_runs_end_to_end(tmp_path: Path) -> None:
    # bsfind.api.recommend on a 2-second budget, the shipped sweep at its first target.
    out = tmp_path / "se"
    rc = schedule_eval.main([
        str(ROOT / "configs" / "digits-mlp.yaml"), "--set", "probe.max_seconds=2",
        "--sweep", str(ROOT / "docs" / "img" / "critical-batch-digits-mlp.json"),
        "--target", "1.0", "--seeds", "1", "--reps", "1", "--eval-examples", "128",
        "--ladder-passes", "1", "--ladder-steps", "2", "--threads", "1", "--out", str(out),
        "--way", "ramp=0:32:0.008,3:64:0.011"])
    assert rc == 0
    md = out.with_suffix(".md").read_text()
    assert "bsfind recommend" in md and "best constant" in md and "Regret ≤ 1.25" in md
    assert "| extra: ramp | 32@0 → 64@3 |" in md
    doc = json.loads(out.with_suffix(".json").read_text())
    assert doc["report"]["recommendation"]["batch_size"] == doc["advice"]["batch_size"]
    assert doc["summary"]["best"]["seconds"] in doc["candidates"]
    assert all(c["steps"] is not None for c in doc["cells"])
    # A timing bsfind did not trust: no step seconds, no schedule (a crash, once, under load).
    report = doc["report"]
    report["timing"]["quality"] = "untrusted"
    for c in report["candidates"]:
        c["step_seconds"] = c["time_ratio"] = None
    report["schedule"] = None
    adv = schedule_eval.advice_from_report(report, "test")
    assert adv.predicted_step_time(64) is None and adv.predicted_steps_ratio is None
    assert schedule_eval.schedule_phases(adv) == []
    # The saved report is read back instead of probing again.
    rc = schedule_eval.main([
        str(ROOT / "configs" / "digits-mlp.yaml"), "--report", str(out.with_suffix(".json")),
        "--sweep", str(ROOT / "docs" / "img" / "critical-batch-digits-mlp.json"),
        "--target", "1.0", "--seeds", "1", "--reps", "1", "--eval-examples", "128",
        "--ladder-passes", "1", "--ladder-steps", "2", "--out", str(tmp_path / "again")])
    assert rc == 0


def test_ci_coverage_exact_value_and_a_run(tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """The script's exact B_simple (every example's gradient, its own vmap) equals the
    tests' reference (tests/exact.py), with dropout masks or without; two probe runs give
    a table row."""
    from tests.exact import exact_noise

    case = ci_coverage.Case("digits-mlp at init", "digits-mlp", 0)
    job, batch = ci_coverage.trained_job(case)
    value, se, kurtosis, top = ci_coverage.exact(job, 1)
    assert value == pytest.approx(exact_noise(job).b_simple, rel=1e-6)
    assert batch == 64 and kurtosis > 1 and 0.01 <= top < 1 and math.isnan(se)
    # no dropout: every mask gives the same, so chunks of masks agree exactly
    monkeypatch.setattr(ci_coverage, "MASK_CHUNK", 2)
    again, se, _, _ = ci_coverage.exact(job, 3)
    assert again == pytest.approx(value, rel=1e-6) and se == pytest.approx(0, abs=1e-9)
    # with dropout the masks differ: the chunks' spread is the value's standard error
    dropped, _ = ci_coverage.trained_job(ci_coverage.Case("d", "digits-mlp", 0, dropout=0.5))
    value_d, se, _, _ = ci_coverage.exact(dropped, 3)
    assert 0 < se < 0.5 and value_d > 0
    row = ci_coverage.run_case(case, runs=2, masks=1)
    assert row["runs"] == 2 and 0 <= row["covered"] <= 2
    assert row["covered"] + row["interval_below_exact"] + row["interval_above_exact"] == 2
    assert "| digits-mlp at init |" in ci_coverage.markdown([row])
    assert " ± 1.5% s.e. |" in ci_coverage.markdown([{**row, "exact_rel_se": 0.015}])
