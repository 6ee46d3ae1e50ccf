"""`bsfind schedule SPEC LOG`: the advice and the schedule from a tracker's log (#16)."""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import statistics
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import bsfind
from bsfind import trajectory
from bsfind.cli import app
from bsfind.errors import UsageError
from bsfind.results import Interval
from bsfind.schedule import fit_growth
from bsfind.tracker import TrackRecord, read_log
from tests.conftest import CONFIGS

runner = CliRunner()


def record(step: int, examples: int, b: float | None, loss: float = 1.0) -> TrackRecord:
    g2 = 0.5
    return TrackRecord(
        step=step, examples=examples, loss=loss, grad_norm_sq=g2,
        trace_sigma=(b if b is not None else 1e3) * g2,
        b_simple=b, ci95=Interval(0.8 * b, 1.3 * b) if b is not None else Interval(3.0, math.inf),
        b_small=1, b_big=64, method="per-example", window=8)


def test_the_examples_behind_a_log_point_are_its_windows_measurements() -> None:
    """Each record is smoothed over its window of measurements (records of the log):
    "now" counted window × b_big for each of the last three and added them up, though
    their windows overlap (6,976 examples behind a value from about 2,400), and a record
    whose own step was an epoch's partial batch counted window × that batch (20)."""
    recs = [dataclasses.replace(record(i, 64 * (i + 1), 50.0), window=min(i + 1, 4))
            for i in range(10)]
    recs[9] = dataclasses.replace(recs[9], b_big=5)  # the epoch's last, partial batch
    pts = trajectory.from_log(recs, dataset_size=1000, planned=None, source="log")
    # records 7, 8, 9 smooth over 4..7, 5..8, 6..9: measurements 4..9, once each
    assert pts.used.rounds == 6 and pts.used.examples == 5 * 64 + 5
    assert pts.used.step == 9
    one = trajectory.from_log(recs[:1], dataset_size=1000, planned=None, source="log")
    assert one.used.examples == 64 and one.used.rounds == 1
    # a log whose head was cut off (tail -n 2): the windows reach before its first line,
    # whose batch stands in for the measurements not there
    cut = trajectory.from_log(recs[-2:], dataset_size=1000, planned=None, source="log")
    assert cut.used.rounds == 5 and cut.used.examples == 4 * 64 + 5
    # unequal micro-batches (32 + 5): b_big is the estimator's 2 × their harmonic mean,
    # 17; the step trained 37, which a logged batch says (a trial's "batch 17" warning)
    short = dataclasses.replace(recs[9], b_big=17, batch=37)
    back = bsfind.tracker.record_from_json(json.loads(json.dumps(short.to_json())))
    assert back == short and back.trained == 37 and recs[9].trained == 5
    pts = trajectory.from_log([*recs[:9], short], dataset_size=1000, planned=None,
                              source="log")
    assert pts.used.examples == 5 * 64 + 37


def test_points_of_a_log_recover_the_growth_and_the_last_median() -> None:
    # B_simple = 2·E^0.4 on 400 records every 4 steps of batch 64: the growth fit on
    # the log's (at most LOG_POINTS) points recovers it, "now" is the median of the last 3.
    recs = [record(4 * i, 64 * (4 * i + 1), 2.0 * (64 * (4 * i + 1)) ** 0.4, loss=2.0 / (i + 1))
            for i in range(400)]
    pts = trajectory.from_log(recs, dataset_size=1000, planned=None, source="log")
    assert 2 <= len(pts.estimates) <= trajectory.LOG_POINTS
    growth = fit_growth([(p.examples_seen, p.b_simple) for p in pts.estimates])
    assert growth is not None
    assert growth.p == pytest.approx(0.4, abs=0.01) and growth.a == pytest.approx(2.0, rel=0.1)
    assert pts.used.b_simple == pytest.approx(statistics.median(r.b_simple for r in recs[-3:]))
    assert pts.used.ci95.low == pytest.approx(min(0.8 * r.b_simple for r in recs[-3:]))
    t = pts.trajectory
    assert t.mode == "log" and t.steps == recs[-1].step and t.examples == recs[-1].examples
    assert t.loss_from == 2.0 and t.loss_to == recs[-1].loss
    assert t.epochs == recs[-1].examples / 1000


def test_unresolved_records_count_as_the_largest() -> None:
    recs = [record(1, 64, 10.0), record(2, 128, None), record(3, 192, None)]
    pts = trajectory.from_log(recs, dataset_size=100, planned=None, source="log")
    assert pts.used.b_simple is None and pts.used.ci95.high == math.inf
    recs[1] = record(2, 128, 20.0)
    assert trajectory.from_log(recs, dataset_size=100, planned=None,
                               source="log").used.b_simple == 20.0


def test_the_points_end_at_the_last_record() -> None:
    recs = [record(4 * i, 64 * (4 * i + 1), 10.0 + i) for i in range(40)]
    pts = trajectory.from_log(recs, dataset_size=1000, planned=None, source="log")
    assert pts.estimates[-1].step == recs[-1].step
    assert pts.estimates[-1].examples_seen == recs[-1].examples
    assert pts.estimates[-1].summary_of == tuple(r.step for r in recs[-3:])


def test_runs_appended_to_one_log_plan_from_the_last() -> None:
    first = [record(4 * i, 64 * (4 * i + 1), 50.0) for i in range(30)]
    second = [record(4 * i, 64 * (4 * i + 1), 20.0) for i in range(10)]
    pts = trajectory.from_log(first + second, dataset_size=1000, planned=None, source="r.jsonl")
    assert pts.used.b_simple == 20.0 and pts.trajectory.examples == second[-1].examples
    assert all(p.b_simple == 20.0 for p in pts.estimates)
    assert len(pts.notes) == 1 and "r.jsonl holds more than one run" in pts.notes[0]
    assert "record 31 of 40" in pts.notes[0]


def test_a_log_without_a_measured_step_is_a_clear_error() -> None:
    with pytest.raises(UsageError, match="no measured step"):
        trajectory.from_log([], dataset_size=100, planned=None, source="empty.jsonl")


@pytest.fixture(scope="module")
def digits_log(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real tracker log: digits-mlp trained at its baseline for 4 epochs."""
    from bsfind.spec import load_spec
    from bsfind.workload import build

    spec = load_spec(CONFIGS / "digits-mlp.yaml")
    job = build(spec)
    assert job.tensors is not None
    x, y = job.tensors
    opt = job.optimizer_cls(job.model.parameters(), lr=spec.optimizer.lr)
    path = tmp_path_factory.mktemp("log") / "noise.jsonl"
    gen = torch.Generator().manual_seed(0)
    b = spec.optimizer.batch_size
    with bsfind.track(job.model, every=2, log=path) as tracker:
        for _ in range(4):
            perm = torch.randperm(len(y), generator=gen)
            for i in range(0, len(y) - b + 1, b):
                idx = perm[i:i + b]
                loss = job.loss_fn(job.model(x[idx]), y[idx])
                loss.backward()
                tracker.update(loss)
                opt.step()
                opt.zero_grad()
    return path


def test_schedule_command_plans_from_the_log(digits_log: Path) -> None:
    # A predicted GPU's step time (no timing on this machine): deterministic advice.
    r = runner.invoke(app, ["schedule", str(CONFIGS / "digits-mlp.yaml"), str(digits_log),
                            "--json", "--gpu", "a100-80gb", "--set", "probe.timing=false"])
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    recs = read_log(digits_log)
    assert doc["command"] == "schedule" and doc["trajectory"]["mode"] == "log"
    assert doc["trajectory"]["examples"] == recs[-1].examples
    last = sorted(v.b_simple if v.b_simple is not None else math.inf for v in recs[-3:])
    assert doc["noise_scale"]["b_simple"] == pytest.approx(last[1])
    assert doc["recommendation"]["batch_size"] >= 1
    assert doc["recommendation"]["lr_factor"] is None
    assert any("rule's extrapolation" in n and "trains nothing" in n
               for n in doc["recommendation"]["notes"])
    s = doc["schedule"]
    assert s is not None and s["phases"][0]["start_step"] == 0
    # The growth was fitted to the log's points, which end at its last record.
    assert s["measured_examples"] == recs[-1].examples
    assert doc["noise_scale_by_step"][-1]["step"] == recs[-1].step


def test_without_a_step_time_the_command_says_why_there_is_no_schedule(
        digits_log: Path) -> None:
    r = runner.invoke(app, ["schedule", str(CONFIGS / "digits-mlp.yaml"), str(digits_log),
                            "--json", "--set", "probe.timing=false"])
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert doc["schedule"] is None
    assert "no batch-size schedule: no step time bsfind can act on (probe.timing is off); " \
        "set hardware.gpu to plan from a predicted one" in doc["warnings"]
    assert not any("trainable parameters" in w for w in doc["warnings"])


def test_a_log_of_another_model_is_said(digits_log: Path, tmp_path: Path) -> None:
    """The log records the tracked model's trainable parameters; a log of another model
    (here a wider MLP's) planned without a word before (a note)."""
    from bsfind.spec import load_spec
    from bsfind.workload import build

    own = sum(p.numel() for p in build(load_spec(CONFIGS / "digits-mlp.yaml")).trainable())
    recs = read_log(digits_log)
    assert {r.parameters for r in recs} == {own}
    log = tmp_path / "wide.jsonl"
    log.write_text("".join(json.dumps({**r.to_json(), "parameters": 2 * own}) + "\n"
                           for r in recs))
    r = runner.invoke(app, ["schedule", str(CONFIGS / "digits-mlp.yaml"), str(log),
                            "--json", "--set", "probe.timing=false"])
    assert r.exit_code == 0, r.output
    said = [w for w in json.loads(r.stdout)["warnings"] if "trainable parameters" in w]
    assert said == [f"the tracker log's model had {2 * own:,} trainable parameters, the "
                    f"spec's has {own:,}: if the log is of another model (not the spec's, nor "
                    "the part of it the tracker was given), its noise scale does not apply "
                    "to this one"]
    # a log written before the count was logged says nothing
    log.write_text("".join(json.dumps({k: v for k, v in r.to_json().items()
                                       if k != "parameters"}) + "\n" for r in recs))
    r = runner.invoke(app, ["schedule", str(CONFIGS / "digits-mlp.yaml"), str(log),
                            "--json", "--set", "probe.timing=false"])
    assert not any("trainable parameters" in w for w in json.loads(r.stdout)["warnings"])


def test_the_logs_batches_are_those_of_records_in_a_row(tmp_path: Path) -> None:
    """An epoch's partial last step (here every sixth record, 37 examples) is not a batch
    the run used (a review: epochs of few measured steps made the schedule warn that the
    run used "batch 37, 64" against the spec's 64); a run that doubled to 128 did."""
    def warnings_for(batches: list[int]) -> list[str]:
        log = tmp_path / "noise.jsonl"
        examples = list(itertools.accumulate(batches))
        log.write_text("".join(json.dumps(dataclasses.replace(
            record(i, e, 50.0 + i), b_big=b, batch=b).to_json()) + "\n"
            for i, (b, e) in enumerate(zip(batches, examples, strict=True))))
        r = runner.invoke(app, ["schedule", str(CONFIGS / "digits-mlp.yaml"), str(log),
                                "--json", "--set", "probe.timing=false"])
        assert r.exit_code == 0, r.output
        return [w for w in json.loads(r.stdout)["warnings"] if "the tracker log's run" in w]

    assert warnings_for(([64] * 5 + [37]) * 6) == []
    (doubled,) = warnings_for([64] * 20 + [128] * 20)
    assert doubled.startswith("the tracker log's run used batch 64, 128, the spec's baseline")


def test_a_log_whose_points_are_all_unresolved_gets_no_schedule(tmp_path: Path) -> None:
    """Lower bounds alone say how far the tracker resolved, not how the noise scale grew:
    a trial's 19 unresolved records (two with a positive low end) got a confident
    schedule, "measured up to 160 examples" of 1,176."""
    log = tmp_path / "noise.jsonl"
    log.write_text("".join(json.dumps(record(4 * i, 64 * (4 * i + 1), None).to_json()) + "\n"
                           for i in range(19)))
    r = runner.invoke(app, ["schedule", str(CONFIGS / "digits-mlp.yaml"), str(log), "--json",
                            "--set", "probe.max_seconds=15"])
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert doc["schedule"] is None
    why = [w for w in doc["warnings"]
           if w.startswith("no batch-size schedule: |G|² was unresolved at all ")]
    assert why, doc["warnings"]
    # what helps is more measurements (every=); the window keeps the latter half only,
    # so a longer one cannot (a trial's 7 unresolved records were told window=)
    assert "smaller track(every=)" in why[0] and "window=) does not help" in why[0]
    # a log probed nothing: its lower bound is the batch the tracker measured
    assert "largest batch probed" not in r.stdout + r.stderr
    assert any("the batch the tracker measured" in w for w in doc["warnings"])


def test_schedule_does_not_ask_for_the_checkpoints_it_never_loads(
        digits_log: Path, tmp_path: Path) -> None:
    # The spec of the last run lists its checkpoints, cleaned up since: `schedule` plans
    # from the log and builds the model for its step time only. (`recommend` on the same
    # spec still stops at the build: those files are what it would measure.)
    text = (CONFIGS / "digits-mlp.yaml").read_text().replace(
        "  checkpoint: null\n",
        "  checkpoints: [{path: gone-100.pt, step: 100}, {path: gone-200.pt, step: 200}]\n")
    spec = tmp_path / "spec.yaml"
    spec.write_text(text)
    r = runner.invoke(app, ["schedule", str(spec), str(digits_log), "--json",
                            "--gpu", "a100-80gb", "--set", "probe.timing=false"])
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert doc["schedule"] is not None
    assert len(doc["spec"]["model"]["checkpoints"]) == 2  # the report shows the spec as given
    r = runner.invoke(app, ["validate", str(spec)])  # both missing files named at once
    assert r.exit_code == 3 and "2 of model.checkpoints cannot be read" in r.output
    assert "gone-100.pt" in r.output and "gone-200.pt" in r.output


def test_a_log_cut_short_by_a_killed_run_plans_from_its_whole_lines(
        digits_log: Path, tmp_path: Path) -> None:
    text = digits_log.read_text()
    cut = tmp_path / "killed.jsonl"
    cut.write_text(text[:len(text) - 40])  # the last record half written, no newline
    whole = read_log(digits_log)
    with pytest.warns(RuntimeWarning, match="cut short"):
        assert read_log(cut) == whole[:-1]
    r = runner.invoke(app, ["schedule", str(CONFIGS / "digits-mlp.yaml"), str(cut), "--json",
                            "--gpu", "a100-80gb", "--set", "probe.timing=false"])
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert doc["trajectory"]["examples"] == whole[-2].examples
    assert any("killed.jsonl" in w and "cut short" in w for w in doc["warnings"])
    # a bad line that ends with its newline is not a cut: still an error
    cut.write_text(text[:len(text) - 40] + "\n")
    r = runner.invoke(app, ["schedule", str(CONFIGS / "digits-mlp.yaml"), str(cut)])
    assert r.exit_code == 2 and "not a tracker record" in r.output
    # nor is a whole JSON object that is not a record, newline or not (an edited file)
    last = json.loads(text.splitlines()[-1])
    last["method"] = "per_example"
    cut.write_text("".join(line + "\n" for line in text.splitlines()[:-1]) + json.dumps(last))
    with pytest.raises(UsageError, match="not a tracker record"):
        read_log(cut)
    # a log of one line, cut short: the cut, then no record (a trial read "not a tracker
    # record"); one line of something else, without a newline, is still an error
    cut.write_text(text.splitlines()[0][:40])
    with pytest.warns(RuntimeWarning, match="cut short"):
        assert read_log(cut) == []
    r = runner.invoke(app, ["schedule", str(CONFIGS / "digits-mlp.yaml"), str(cut)])
    assert r.exit_code == 2 and "the tracker log has no measured step" in r.output
    cut.write_text("model: {factory: x")
    with pytest.raises(UsageError, match="not a tracker record"):
        read_log(cut)


def test_a_log_past_the_planned_run_says_so(digits_log: Path) -> None:
    # 4 epochs logged, 2 planned: the advice reads the log's end, past the plan (trial)
    r = runner.invoke(app, ["schedule", str(CONFIGS / "digits-mlp.yaml"), str(digits_log),
                            "--json", "--set", "probe.timing=false",
                            "--set", "training.epochs=2"])
    assert r.exit_code == 0, r.output
    past = [w for w in json.loads(r.stdout)["warnings"] if "past the planned run's" in w]
    assert len(past) == 1 and f"{2 * 1797:,} (training.epochs" in past[0]
    r = runner.invoke(app, ["schedule", str(CONFIGS / "digits-mlp.yaml"), str(digits_log),
                            "--json", "--set", "probe.timing=false"])  # 10 planned
    assert not any("past the planned run's" in w for w in json.loads(r.stdout)["warnings"])


def test_schedule_command_errors_are_one_line(tmp_path: Path) -> None:
    spec = str(CONFIGS / "digits-mlp.yaml")
    r = runner.invoke(app, ["schedule", spec, str(tmp_path / "missing.jsonl")])
    assert r.exit_code != 0 and "cannot read the tracker log" in r.output
    assert "Traceback" not in r.output
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"step": 1}\n')
    r = runner.invoke(app, ["schedule", spec, str(bad), "--json"])
    assert r.exit_code != 0
    assert json.loads(r.stdout)["status"] == "error" and "bad.jsonl:1" in r.output
    r = runner.invoke(app, ["schedule", str(bad), spec])  # swapped
    assert r.exit_code == 2 and "takes the spec first, then the log" in r.output
    assert f"bsfind schedule {spec} {bad}" in r.output.replace("\n", "")
    # one argument: typer said "Missing argument 'LOG'" when the log was given alone
    r = runner.invoke(app, ["schedule", str(bad)])
    assert r.exit_code == 2 and f"bsfind schedule SPEC {bad}" in r.output.replace("\n", "")
    r = runner.invoke(app, ["schedule", spec, "--json"])
    assert r.exit_code == 2 and f"bsfind schedule {spec} LOG" in json.loads(r.stdout)["error"]


def test_a_batchnorm_log_keeps_its_micro_batch_per_device() -> None:
    """A tracker log of a BatchNorm model (accumulation pairing: each micro-batch is a
    BatchNorm batch) gives the advice that BatchNorm batch per device, as the probe's
    micro-batches do; without BatchNorm there is none."""
    import dataclasses as dc

    from bsfind.pipeline import measured_norm_batch
    from bsfind.results import Interval, NoiseEstimate
    from bsfind.spec import load_spec
    from bsfind.workload import build

    logged = NoiseEstimate(
        b_simple=130.0, ci95=Interval(74.0, 373.0), grad_norm_sq=1.0,
        grad_norm_sq_ci95=Interval(0.5, 1.5), trace_sigma=130.0,
        trace_sigma_ci95=Interval(100.0, 160.0), method="accumulation", method_reason="log",
        b_small=24, b_big=96, examples=0, rounds=1, seconds=0.0, stopped="converged")
    from tests.conftest import ROOT

    good = ROOT / "tests" / "assets" / "good.yaml"
    bn = build(load_spec(good, ["model.factory=user_code.py:bn_model"]))
    plain = build(load_spec(good))
    spec = load_spec(good)
    assert measured_norm_batch(spec, bn, logged) == 24
    assert measured_norm_batch(spec, plain, logged) is None
    probed = dc.replace(logged, method="microbatch")  # the probe's: the baseline per device
    assert measured_norm_batch(spec, bn, probed) == spec.optimizer.batch_size


def test_a_window_whose_trace_reads_negative_writes_a_log_that_reads_back() -> None:
    """Little true noise: the window's unbiased tr(Σ) can come out below 0, and B_simple
    with it; its interval was written [0, negative], which the reader refused, making
    the whole log unreadable. The interval is held at 0 at both ends, and such a line
    already written still reads."""
    from bsfind.noise.in_training import Window
    from bsfind.results import Interval
    from bsfind.tracker import TrackRecord, record_from_json

    w = Window(64)
    for i, t in enumerate([-1.0, -1.2, -0.9, -1.1, -1.05, -0.95]):
        w.add(t, 10.0 + 0.1 * i, 64.0, 64.0 * (i + 1))
    g2, trace, value, ci = w.summary()
    assert value is not None and value < 0 and ci.low == ci.high == 0.0
    rec = TrackRecord(step=5, examples=384, loss=0.5, grad_norm_sq=g2, trace_sigma=trace,
                      b_simple=value, ci95=ci, b_small=1, b_big=64, method="per-example",
                      step_grad_norm_sq=g2, step_trace_sigma=trace, window=6, seconds=1.0)
    assert record_from_json(json.loads(json.dumps(rec.to_json()))).ci95 == ci
    old = {**rec.to_json(), "b_simple_ci95": [0.0, -0.083]}
    assert record_from_json(old).ci95 == Interval(0.0, -0.083)
