"""Where the noise scale is measured: along training by default, at a run's checkpoints,
or pinned; the trajectory, the median for "now" and the schedule in the report.

    .venv/bin/python -m pytest tests/test_along.py -q
"""

from __future__ import annotations

import json
import math
import shutil
import statistics
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

from bsfind.cli import app
from tests.conftest import ROOT

ASSETS = ROOT / "tests" / "assets"
GOOD = str(ASSETS / "good.yaml")  # 256 examples, batch 16, training.epochs 20
runner = CliRunner()


def run_json(*args: str) -> dict:
    r = runner.invoke(app, [*args, "--json"])
    assert r.exit_code == 0, r.output
    return json.loads(r.stdout)


def test_default_probes_along_the_planned_run() -> None:
    # a budget well above what the planned run needs here, so that it is what stops it
    doc = run_json("noise", GOOD, "--set", "probe.max_seconds=60")
    points = doc["noise_scale_by_step"]
    # Step 0, then doubling steps, ending at the planned run: 20 epochs × 256 / 16 = 320.
    steps = [p["step"] for p in points]
    assert steps[:5] == [0, 8, 16, 32, 64] and steps[-1] == 320
    assert all(b == 2 * a for a, b in zip(steps[1:-2], steps[2:-1], strict=True))
    assert [p["examples_seen"] for p in points] == [16 * s for s in steps]
    assert all(p["loss"] is not None for p in points)
    # "Now" is the median of the last three points, each resolved here.
    used = doc["noise_scale"]
    assert used["summary_of"] == steps[-3:]
    values = sorted(p["b_simple"] for p in points[-3:])
    assert used["b_simple"] == pytest.approx(values[1])
    assert used["ci95"][0] == min(p["ci95"][0] for p in points[-3:])
    t = doc["trajectory"]
    assert t["mode"] == "along" and t["steps"] == 320 and t["examples"] == 5120
    assert t["planned_examples"] == 5120 and t["moved"] is True
    assert t["loss_from"] == points[0]["loss"] and t["loss_to"] == points[-1]["loss"]
    assert not any("initialisation" in w for w in doc["warnings"])


def test_one_spec_and_seed_give_one_estimate_with_dropout() -> None:
    """A trial: torch's global random state, which dropout draws from, was left as each
    fresh process found it, and three runs of one spec and seed read B_simple 7.3, 8.8
    and 24.9 with dropout 0.1. It is seeded from probe.seed for each phase, and put back
    after (two runs from different global states read the same numbers)."""
    docs = []
    for state in (1, 2):
        torch.manual_seed(state)
        before = torch.get_rng_state()
        docs.append(run_json("noise", GOOD, "--set", "model.factory=user_code.py:dropout_model",
                             "--set", "probe.at_steps=[0,8]", "--set", "probe.max_seconds=600"))
        assert torch.equal(torch.get_rng_state(), before)
    got = [[(p["step"], p["loss"], p["b_simple"], p["stopped"]) for p in d["noise_scale_by_step"]]
           for d in docs]
    assert got[0] == got[1] and [p[3] for p in got[0]] == ["converged"] * 2


def test_a_run_that_does_not_move_says_so() -> None:
    """A learning rate too small to move anything and no planned run: the probe trains for
    its share of the budget, the loss stays, and the warning says the run did not move."""
    doc = run_json("noise", GOOD, "--set", "optimizer.lr=1e-9", "--set", "training.epochs=null",
                   "--set", "probe.max_seconds=3")
    t = doc["trajectory"]
    assert t["moved"] is False and t["steps"] > 0
    assert t["loss_to"] == pytest.approx(t["loss_from"], rel=0.01)
    assert any(w.startswith(f"the probe trained only {t['steps']:,} steps")
               for w in doc["warnings"])


def test_a_run_that_reached_a_plan_of_part_of_a_step_is_not_warned() -> None:
    """A plan that is not a whole number of steps (100 examples at batch 16: the run
    ends at step 6, 96 examples): the finished run read as cut short by the budget."""
    doc = run_json("noise", GOOD, "--set", "optimizer.lr=1e-9", "--set", "training.epochs=null",
                   "--set", "training.examples=100", "--set", "probe.max_seconds=30")
    t = doc["trajectory"]
    assert (t["steps"], t["examples"], t["moved"]) == (6, 96, True)
    assert not any(w.startswith("the probe trained only") for w in doc["warnings"])


def test_pinned_points_keep_the_step_0_warning() -> None:
    doc = run_json("noise", GOOD, "--set", "probe.at_steps=[0]")
    assert doc["trajectory"]["mode"] == "pinned"
    assert any("measured at initialisation" in w for w in doc["warnings"])


def _train_and_save(tmp_path: Path) -> list[tuple[int, Path]]:
    """Checkpoints of the good spec's model at steps 0, 20 and 40 of its own training."""
    from bsfind.seeds import Seeds
    from bsfind.spec import load_spec
    from bsfind.training import EpochSampler, training_step
    from bsfind.workload import build

    spec = load_spec(GOOD)
    job = build(spec)
    opt = job.make_optimizer(spec.optimizer.lr)
    sampler = EpochSampler(len(job), 16, torch.Generator().manual_seed(Seeds(0).training_order))
    saved = []
    for step in range(41):
        if step in (0, 20, 40):
            path = tmp_path / f"ck{step}.pt"
            torch.save(job.model.state_dict(), path)
            saved.append((step, path))
        if step < 40:
            training_step(job, opt, sampler.next())
    return saved


def _spec_with(folder: Path, **model: object) -> Path:
    """The good spec beside its factory file in ``folder``, with ``model`` keys set (the
    checkpoints' paths are relative to it)."""
    shutil.copy(ASSETS / "user_code.py", folder / "user_code.py")
    doc = yaml.safe_load(Path(GOOD).read_text())
    doc["model"].update(model)
    path = folder / "run.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def test_model_checkpoints_measures_at_each_without_training(tmp_path: Path) -> None:
    from bsfind.api import noise_scale_at
    from bsfind.pipeline import probe_options
    from bsfind.spec import load_spec
    from bsfind.workload import build, load_checkpoint

    saved = _train_and_save(tmp_path)
    spec_path = _spec_with(tmp_path, checkpoints=[
        {"path": "ck0.pt", "step": 0}, {"path": "ck20.pt", "step": 20},
        {"path": "ck40.pt", "examples": 640}])
    out = run_json("noise", str(spec_path))
    points = out["noise_scale_by_step"]
    assert [p["step"] for p in points] == [0, 20, 40]
    assert not any("past the planned run" in w for w in out["warnings"])
    past = run_json("noise", str(spec_path), "--set", "training.epochs=1")  # 256 examples
    assert ("model.checkpoints runs to 640 examples, past the planned run's 256 "
            "(training.epochs / examples)") in " ".join(past["warnings"])
    assert [p["examples_seen"] for p in points] == [0, 320, 640]
    assert out["trajectory"]["mode"] == "checkpoints"
    assert out["noise_scale"]["summary_of"] == [20, 40]  # the points after initialisation
    # Each point is exactly what measuring those weights gives (same seeds, same sampling).
    spec = load_spec(spec_path)
    job = build(spec)
    for (step, path), p in zip(saved, points, strict=True):
        load_checkpoint(job.model, str(path), tmp_path)
        est = noise_scale_at(job, probe_options(spec, job), seed=spec.probe.seed, step=step)
        assert est.b_simple == p["b_simple"] and est.rounds == p["rounds"]


@pytest.mark.parametrize("entries, problem", [
    ([{"path": "a.pt"}], "give exactly one of step or examples"),
    ([{"path": "a.pt", "step": 5, "examples": 80}], "give exactly one of step or examples"),
    ([{"path": "a.pt", "step": 9}, {"path": "b.pt", "step": 3}], "training order"),
    ([{"path": "a.pt", "step": -1}], "expected an integer >= 0"),
    ([{"step": 1}], "checkpoints[0].path"),
    ("a.pt", "expected a non-empty list"),
])
def test_checkpoints_spec_errors(entries: object, problem: str) -> None:
    r = runner.invoke(app, ["noise", GOOD, "--set", f"model.checkpoints={json.dumps(entries)}"])
    assert r.exit_code == 2 and problem in r.output, r.output


def test_checkpoints_exclude_other_probe_points() -> None:
    r = runner.invoke(app, ["validate", GOOD, "--set",
                            'model.checkpoints=[{"path": "a.pt", "step": 1}]',
                            "--set", "probe.warmup_steps=5"])
    assert r.exit_code == 2 and "cannot be combined" in r.output


def _steady_ladder(monkeypatch: pytest.MonkeyPatch) -> None:
    """The step-time ladder on a fake clock, t(B) = 1 ms + 50 µs·B: on a shared machine
    this tiny model's real step times can be too noisy to act on, and then there is no
    schedule (tests/test_schedule_log.py covers that case)."""
    from bsfind.hardware import measure, timing

    def time_steps(job, step, sizes, deadline, memory, opts,  # type: ignore[no-untyped-def]
                   cpu_clock=False):
        clock = [0.0]

        def fake_step(b: int) -> None:
            clock[0] += 1e-3 + 5e-5 * b

        return timing.time_ladder(fake_step, sizes, device=job.device, max_seconds=10.0,
                                  max_batch=memory.max_batch_size, clock=lambda: clock[0])

    monkeypatch.setattr(measure, "time_steps", time_steps)


def test_recommend_reports_the_schedule(monkeypatch: pytest.MonkeyPatch) -> None:
    _steady_ladder(monkeypatch)
    doc = run_json("recommend", GOOD, "--set", "probe.max_seconds=8")
    s = doc["schedule"]
    assert s is not None, doc["recommendation"]["notes"]
    phases = s["phases"]
    assert len(phases) >= 2, phases
    assert phases[0]["start_step"] == 0 and phases[0]["start_examples"] == 0
    for a, b in zip(phases, phases[1:], strict=False):
        assert b["batch_size"] == 2 * a["batch_size"]
        assert b["start_step"] == a["start_step"] + a["steps"]
        assert b["start_examples"] == a["start_examples"] + a["steps"] * a["batch_size"]
    for key in ("batch_size", "start_step", "start_examples", "steps", "learning_rate",
                "grad_accumulation", "per_device_batch_size", "b_n", "baseline_examples",
                "extrapolated"):
        assert all(key in p for p in phases), key
    assert [r["batch_size"] for r in s["ramp"]] == [p["batch_size"] for p in phases]
    assert [r["from_step"] for r in s["accumulation"]] == [p["start_step"] for p in phases]
    assert s["horizon_source"] == "training" and s["horizon_examples"] == 5120
    assert s["predicted_seconds"] > 0 and s["baseline_seconds"] > 0
    assert s["best_constant_batch"] >= 1 and s["growth"]["examples_from"] > 0


def test_points_ahead_and_paced_probe_seconds() -> None:
    from bsfind.trajectory import paced_probe_seconds, points_ahead

    assert points_ahead(8, 320) == 7  # 8, 16, 32, 64, 128, 256, 320
    assert points_ahead(8, 256) == 6 and points_ahead(320, 320) == 1 and points_ahead(8, 5) == 1
    # 20 s left, 8 s of training to the end, 4 points: 3 s each, under a 5 s cap.
    assert paced_probe_seconds(5.0, 4, 20.0, 8.0) == 3.0
    assert paced_probe_seconds(2.0, 4, 20.0, 8.0) == 2.0
    assert paced_probe_seconds(5.0, 4, 6.0, 8.0) == 0.0


def test_slow_probes_still_reach_the_planned_run() -> None:
    """Probes that never reach their precision (as on a loaded machine, where every round
    is slow) use their whole share; the shares are paced so that the walk still reaches
    the planned run (320 steps), where "now" is measured, instead of stopping after the
    first few points at 20% of the budget each."""
    doc = run_json("noise", GOOD, "--set", "probe.max_seconds=8",
                   "--set", "probe.target_rel_error=0.002")
    steps = [p["step"] for p in doc["noise_scale_by_step"]]
    assert steps[0] == 0 and steps[-1] == 320, steps
    assert doc["trajectory"]["steps"] == 320
    assert all(p["stopped"] == "budget" for p in doc["noise_scale_by_step"])


def test_a_probe_many_epochs_past_an_unplanned_run_says_so() -> None:
    """No training.epochs / examples: the probe trains for half its budget, which on a
    small dataset is many epochs; past UNPLANNED_EPOCHS the warning says to plan the run."""
    from bsfind import wording
    from bsfind.results import Interval, NoiseEstimate, Trajectory

    used = NoiseEstimate(b_simple=100.0, ci95=Interval(90.0, 110.0), grad_norm_sq=1.0,
                         grad_norm_sq_ci95=Interval(0.9, 1.1), trace_sigma=100.0,
                         trace_sigma_ci95=Interval(90.0, 110.0), method="per-example",
                         method_reason="", b_small=8, b_big=64, rounds=10, examples=640,
                         seconds=1.0, stopped="converged", step=500)

    def warnings(epochs: float, planned: int | None) -> list[str]:
        t = Trajectory(mode="along", steps=500, examples=int(epochs * 569), epochs=epochs,
                       loss_from=0.7, loss_to=0.1, b_simple_first=10.0, b_simple_last=100.0,
                       moved=True, planned_examples=planned)
        return wording.noise_warnings(used, t, dataset_size=569, baseline_batch=16,
                                      from_checkpoint=False)

    said = [w for w in warnings(230.0, None) if "since the spec plans no run" in w]
    assert len(said) == 1 and said[0].startswith("the probe trained 230 epochs of the "
                                                 "569-example dataset")
    assert "set training.epochs" in said[0]
    assert not any("plans no run" in w for w in warnings(wording.UNPLANNED_EPOCHS, None))
    assert not any("plans no run" in w for w in warnings(230.0, 230 * 569))


def test_the_summary_of_points_keeps_each_value_inside_its_interval() -> None:
    """"Now" is the median over the last points; |G|² and tr(Σ) are medians taken apart,
    and each interval spans the points' own, so that it holds its median (before, they
    were the last point's: a median outside its own interval, new-user trial)."""
    import dataclasses

    from bsfind.results import Interval, NoiseEstimate
    from bsfind.trajectory import summarize

    def point(step: int, g2: float, tr: float) -> NoiseEstimate:
        return NoiseEstimate(
            b_simple=tr / g2, ci95=Interval(0.9 * tr / g2, 1.1 * tr / g2), grad_norm_sq=g2,
            grad_norm_sq_ci95=Interval(0.95 * g2, 1.05 * g2), trace_sigma=tr,
            trace_sigma_ci95=Interval(0.97 * tr, 1.03 * tr), method="per-example",
            method_reason="", b_small=1, b_big=64, examples=64, rounds=1, seconds=0.1,
            stopped="converged", step=step, examples_seen=step * 64)

    # |G|² 0.04, 0.26, 0.5; tr(Σ) 4.3, 0.046, 12: the last point alone has neither median
    pts = [point(0, 1.0, 1.0), point(8, 0.04, 4.3), point(16, 0.5, 0.046),
           point(32, 0.26, 12.0)]
    s = summarize(pts)
    assert s.summary_of == (8, 16, 32)
    assert s.grad_norm_sq == 0.26 and s.grad_norm_sq_ci95 == Interval(0.95 * 0.04, 1.05 * 0.5)
    assert s.trace_sigma == 4.3 and s.trace_sigma_ci95 == Interval(0.97 * 0.046, 1.03 * 12.0)
    assert s.b_simple == statistics.median([4.3 / 0.04, 0.046 / 0.5, 12.0 / 0.26])
    for value, ci in ((s.grad_norm_sq, s.grad_norm_sq_ci95), (s.trace_sigma, s.trace_sigma_ci95),
                      (s.b_simple, s.ci95)):
        assert ci.low <= value <= ci.high
    # a tracker's records carry no component intervals: unknown stays unknown
    unknown = [dataclasses.replace(p, grad_norm_sq_ci95=Interval(float("nan"), float("nan")))
               for p in pts]
    assert math.isnan(summarize(unknown).grad_norm_sq_ci95.low)


@pytest.mark.parametrize("during", ["training", "measuring"])
def test_ctrl_c_along_training_reports_the_median_the_advice_would_use(
        monkeypatch: pytest.MonkeyPatch, during: str) -> None:
    """Interrupted after four points (while training to the fifth, or while measuring it),
    the JSON's noise_scale is the median of the last three points, as a finished run's
    would be, not the last point (a torchrun trial read the cut-short point there)."""
    from bsfind import trajectory
    from bsfind.errors import Interrupted
    from bsfind.runner import LocalRunner

    real_measure, real_train = trajectory.measure_point, LocalRunner.train
    measured: list[int] = []

    def measure(*args: object, **kwargs: object):  # type: ignore[no-untyped-def]
        if len(measured) == 4 and during == "measuring":
            raise Interrupted("interrupted during the noise probe")  # cut, nothing kept
        est = real_measure(*args, **kwargs)  # type: ignore[arg-type]
        measured.append(est.step)
        return est

    def train(self, *args: object, **kwargs: object) -> bool:  # type: ignore[no-untyped-def]
        if len(measured) == 4 and during == "training":
            raise KeyboardInterrupt
        return real_train(self, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(trajectory, "measure_point", measure)
    monkeypatch.setattr(LocalRunner, "train", train)
    r = runner.invoke(app, ["noise", GOOD, "--json", "--set", "probe.max_seconds=60"])
    assert r.exit_code == 130, r.output
    doc = json.loads(r.stdout)
    points = doc["noise_scale_by_step"]
    assert [p["step"] for p in points] == measured == [0, 8, 16, 32]
    used = doc["noise_scale"]
    assert used["summary_of"] == [8, 16, 32]
    assert used["b_simple"] == pytest.approx(statistics.median(p["b_simple"] for p in points[1:]))


def test_a_single_checkpoint_is_named_where_steps_are_counted_from(tmp_path: Path) -> None:
    """model.checkpoint's own step is not known: the report names the file instead of
    "step 0, 0 examples" (a fine-tuning trial's 200-step checkpoint read as
    initialisation), and branches from it start from a fresh optimizer state, not "before
    the optimizer had any state, as the run itself did"."""
    from bsfind import wording
    from bsfind.results import Trajectory

    saved = _train_and_save(tmp_path)
    spec_path = _spec_with(tmp_path, checkpoint=saved[1][1].name)  # ck20.pt
    out = run_json("branch", str(spec_path), "--set", "probe.max_seconds=20")
    assert out["trajectory"]["checkpoint"] == "ck20.pt"
    (b,) = out["branches"]
    assert b["checkpoint"] == "ck20.pt" and b["start"] == "model.checkpoint ck20.pt"
    assert b["summary"].endswith("from model.checkpoint ck20.pt")
    assert b["optimizer_state"] == "fresh"
    assert any("bsfind loads a checkpoint's weights, not an optimizer state" in n
               for n in b["notes"])
    assert not any("as the run itself did" in n for n in b["notes"])
    text = runner.invoke(app, ["noise", str(spec_path), "--set", "probe.max_seconds=10"])
    assert "Probe run: measured at model.checkpoint ck20.pt;" in text.stdout, text.stdout
    # pinned steps after it count from it
    t = Trajectory(mode="pinned", steps=8, examples=128, epochs=0.5, loss_from=None,
                   loss_to=None, b_simple_first=None, b_simple_last=None, moved=True,
                   checkpoint="ck20.pt")
    assert wording.trajectory_line(t) == ("measured at model.checkpoint ck20.pt and 8 steps "
                                          "after it, 128 examples (0.5 epochs)")


def test_epochs_read_as_counts() -> None:
    """A trial's 200-epoch probe (40,000 examples of a 200-example dataset) printed
    "(2e+02 epochs)"; the absolute line printed 3 significant digits in a general format,
    "1.23e+03 epochs" for 1,234."""
    import dataclasses

    from bsfind import wording
    from bsfind.results import AbsolutePrediction, Trajectory

    t = Trajectory(mode="along", steps=1250, examples=40_000, epochs=200.0, loss_from=3.65,
                   loss_to=8.7e-08, b_simple_first=None, b_simple_last=None, moved=True)
    assert "step 1,250, 40,000 examples (200 epochs);" in wording.trajectory_line(t)
    t = dataclasses.replace(t, steps=8, examples=100, epochs=0.5)
    assert "step 8, 100 examples (0.5 epochs);" in wording.trajectory_line(t)
    t = dataclasses.replace(t, examples=200, epochs=1.0)
    assert "200 examples (1 epoch);" in wording.trajectory_line(t)
    a = AbsolutePrediction(training_examples=1000, hours=0.1, baseline_hours=0.2, cost=None,
                           baseline_cost=None, price_per_hour=None, batch_size=100,
                           steps=1234, examples=123_400, baseline_steps=100, epochs=1234.4)
    assert "123,400 examples (1,234 epochs): train" in wording.absolute_text(a)
    assert [wording.epochs(x) for x in (426.3, 18.15, 4.9, 0.0123)] == [
        "426 epochs", "18.1 epochs", "4.9 epochs", "0.0123 epochs"]


def test_a_checkpoint_that_does_not_match_fails_before_any_is_measured(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The third of model.checkpoints of another model (its keys under 'encoder.'): exit 3
    naming it, before the first is measured (a trial's run measured two, then failed). A
    'module.' prefix (DDP's) is no longer a mismatch: it loads."""
    from bsfind import trajectory

    saved = _train_and_save(tmp_path)
    state = torch.load(saved[2][1])
    torch.save({f"encoder.{k}": v for k, v in state.items()}, tmp_path / "ddp.pt")
    spec_path = _spec_with(tmp_path, checkpoints=[
        {"path": "ck0.pt", "step": 0}, {"path": "ck20.pt", "step": 20},
        {"path": "ddp.pt", "step": 40}])
    measured: list[int] = []
    real = trajectory.measure_point
    monkeypatch.setattr(trajectory, "measure_point",
                        lambda *a, **k: measured.append(1) or real(*a, **k))
    r = runner.invoke(app, ["noise", str(spec_path)])
    assert r.exit_code == 3, r.output
    assert "model.checkpoints[2].path" in r.output and "does not match the model" in r.output
    assert measured == []
