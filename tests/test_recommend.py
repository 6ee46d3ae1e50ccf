"""End to end: `recommend --json` keys, `check` exit codes and its cache."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from bsfind.cli import app
from tests.conftest import CONFIGS, ROOT

ASSETS = ROOT / "tests" / "assets"
runner = CliRunner()


@pytest.fixture(scope="module")
def digits_cnn_doc() -> dict:
    r = runner.invoke(app, ["recommend", str(CONFIGS / "digits-cnn.yaml"), "--json",
                            "--gpu", "a100-80gb", "--set", "probe.max_seconds=30"])
    assert r.exit_code == 0, r.output
    return json.loads(r.stdout)


def test_recommend_json_has_every_documented_key(digits_cnn_doc: dict) -> None:
    d = digits_cnn_doc
    assert d["version"] and d["device"]["type"] == "cpu"
    assert d["baseline"] == {"batch_size": 32, "learning_rate": 0.05, "optimizer": "sgd"}
    ns = d["noise_scale"]
    for key in ("b_simple", "ci95", "grad_norm_sq", "trace_sigma", "method", "examples",
                "seconds"):
        assert key in ns
    assert ns["b_simple"] > 0 and ns["ci95"][0] <= ns["b_simple"] <= ns["ci95"][1]
    rec = d["recommendation"]
    for key in ("batch_size", "learning_rate", "grad_accumulation", "lr_rule",
                "per_device_batch_size", "gpus", "predicted_time_ratio",
                "predicted_cost_ratio", "basis"):
        assert key in rec, key
    assert rec["batch_size"] >= 1 and rec["learning_rate"] > 0
    # without branches or curvature the advice rests on the B_simple reported
    assert rec["b_n"] == pytest.approx(ns["b_simple"]) and rec["b_n_ci95"] == ns["ci95"]


def _readme_json_fields() -> dict[str, set[str]]:
    """README's "JSON fields" table: the names each `prefix.{a,b,...}` row lists."""
    import re

    text = (ROOT / "README.md").read_text().split("## JSON fields", 1)[1].split("\n## ", 1)[0]
    return {m[1]: set(m[2].replace("[]", "").split(","))
            for m in re.finditer(r"^\| `(\w+)\.\{([\w,\[\]]+)\}`", text, re.M)}


def test_every_json_field_recommend_writes_is_in_the_readme(digits_cnn_doc: dict) -> None:
    """A CI user's trial found 15 fields the README's table did not list."""
    documented = _readme_json_fields()
    for section in ("noise_scale", "memory", "timing", "recommendation", "lr_search",
                    "trajectory", "schedule"):
        written = digits_cnn_doc[section]
        assert written is not None, section
        assert set(written) <= documented[section], (section, set(written) - documented[section])


def test_recommend_measures_memory_and_timing(digits_cnn_doc: dict) -> None:
    mem, tim = digits_cnn_doc["memory"], digits_cnn_doc["timing"]
    assert mem["source"] == "predicted"  # CPU: counted bytes, not a CUDA measurement
    assert mem["max_batch_size"] > 0 and mem["bytes_per_example"] > 0 and mem["fixed_bytes"] > 0
    assert tim["source"] == "measured" and len(tim["points"]) >= 2
    assert all(p["seconds"] > 0 for p in tim["points"])
    assert tim["t0"] is not None and tim["per_example"] is not None and tim["r2"] is not None
    pred = digits_cnn_doc["predicted"]
    assert pred["gpu"] == "a100-80gb" and pred["label"].startswith("predicted")
    assert pred["memory"]["source"] == "predicted" and pred["timing"]["source"] == "predicted"
    assert pred["memory"]["max_batch_size"] > 0
    marked = [c for c in digits_cnn_doc["candidates"] if c["is_recommended"]]
    assert len(marked) == 1
    assert marked[0]["batch_size"] == digits_cnn_doc["recommendation"]["batch_size"]


def test_table_output(tmp_path: Path) -> None:
    # --gpu: a predicted step time, which no load on this machine can make untrustworthy
    r = runner.invoke(app, ["recommend", str(ASSETS / "good.yaml"), "--max-gpus", "2",
                            "--gpu", "a100-80gb", "--plot", str(tmp_path / "p.png")])
    assert r.exit_code == 0, r.output
    assert "Recommendation: batch size" in r.output and "Candidates" in r.output
    assert "device(s)" in r.output  # the frontier
    assert (tmp_path / "p.png").stat().st_size > 0


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A copy of the tiny spec and its factory file, with a private cache."""
    for name in ("good.yaml", "user_code.py"):
        shutil.copy(ASSETS / name, tmp_path / name)
    monkeypatch.setenv("BSFIND_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path


def test_check_exit_codes_and_tolerance(project: Path) -> None:
    spec = str(project / "good.yaml")
    wide = runner.invoke(app, ["check", spec, "--tolerance", "1000000"])
    assert wide.exit_code == 0, wide.output
    assert wide.stdout.startswith("ok: baseline batch 16")
    assert "; learning rate at " in wide.stdout  # the rate to use, on a pass too
    out = project / "report.json"
    # A baseline 16x the dataset (256 examples) is beyond any recommendation.
    tight = runner.invoke(app, ["check", spec, "--set", "optimizer.batch_size=4096",
                                "--tolerance", "2", "--output", str(out), "--no-cache"])
    doc = json.loads(out.read_text())
    assert tight.exit_code == 1, tight.output
    assert "baseline batch 4096 is" in tight.output and "x above the recommended" in tight.output
    assert doc["check"]["within"] is False and doc["check"]["ratio"] > 1.0001
    assert not list(project.glob("*.tmp*")), "no temporary files left behind"


def test_check_writes_its_output_on_an_error_too(project: Path) -> None:
    """The README's CI step uploads --output `if: always()`: on an error the file holds
    the error's document (before, there was no file to upload)."""
    out = project / "report.json"
    r = runner.invoke(app, ["check", str(project / "good.yaml"), "--set", "loss=hinge",
                            "--output", str(out), "--no-cache"])
    assert r.exit_code == 2 and "unknown loss 'hinge'" in r.output
    doc = json.loads(out.read_text())
    assert doc["status"] == "error" and doc["exit_code"] == 2
    assert "unknown loss 'hinge'" in doc["error"]
    # an output in a folder that does not exist: said before the run, once
    missing = project / "no" / "such" / "dir" / "r.json"
    r = runner.invoke(app, ["check", str(project / "good.yaml"), "--set", "loss=hinge",
                            "--output", str(missing), "--no-cache"])
    assert r.exit_code == 2 and "unknown loss" not in r.output
    assert r.output.count(f"--output {missing}: folder") == 1
    # an output that cannot be written (an existing folder that refuses files, even to
    # root) does not hide the run's own error, and says so
    bad = Path("/proc/self/bsfind-report.json")
    r = runner.invoke(app, ["check", str(project / "good.yaml"), "--set", "loss=hinge",
                            "--output", str(bad), "--no-cache"])
    assert r.exit_code == 2 and "unknown loss 'hinge'" in r.output
    assert r.output.count(f"--output {bad}: cannot write") == 1
    # a run that succeeds but cannot write its output: that is the error, said once
    r = runner.invoke(app, ["check", str(project / "good.yaml"), "--tolerance", "1000000",
                            "--output", str(bad)])
    assert r.exit_code == 2 and r.output.count(f"--output {bad}: cannot write") == 1


def test_check_cache_reuses_and_invalidates(project: Path, monkeypatch: pytest.MonkeyPatch
                                            ) -> None:
    import dataclasses

    from bsfind import api

    spec = str(project / "good.yaml")
    # a budget the run never reaches (it ends at its planned run in a few seconds), so
    # that it completes on a loaded machine too: a partial result is not cached
    budget = ["--max-seconds", "60"]
    real = api.recommend
    calls = []

    def partial(*a: object, **k: object) -> object:
        calls.append(1)
        return dataclasses.replace(real(*a, **k), status="partial")  # type: ignore[arg-type]

    monkeypatch.setattr(api, "recommend", partial)
    for _ in range(2):
        r = runner.invoke(app, ["check", spec, "--tolerance", "1000000", "--json", *budget])
        assert r.exit_code == 0 and json.loads(r.stdout)["cached"] is False, r.output
    assert len(calls) == 2  # the partial result was measured again, not reused
    # nor is one that an earlier version stored
    from bsfind import cache
    from bsfind.spec import load_spec

    key = api.cache_key(load_spec(spec, ["probe.max_seconds=60"]))
    stored = {k: v for k, v in json.loads(r.stdout).items() if k not in ("check", "cached")}
    for status, reused in (("ok", True), ("partial", False)):  # the same key, both ways
        cache.store(key, {**stored, "status": status})
        r = runner.invoke(app, ["check", spec, "--tolerance", "1000000", "--json", *budget])
        assert json.loads(r.stdout)["cached"] is reused
    assert len(calls) == 3
    cache.store(key, {**stored, "status": "partial"})  # left for the run below to replace
    monkeypatch.setattr(api, "recommend", real)
    first = runner.invoke(app, ["check", spec, "--tolerance", "1000000", "--json", *budget])
    assert first.exit_code == 0, first.output
    assert json.loads(first.stdout)["status"] == "ok"

    def no_probe(*a: object, **k: object) -> None:
        raise AssertionError("a cached run must not probe")

    monkeypatch.setattr(api, "recommend", no_probe)
    second = runner.invoke(app, ["check", spec, "--tolerance", "1000000", "--json", *budget])
    assert second.exit_code == 0, second.output
    d1, d2 = json.loads(first.stdout), json.loads(second.stdout)
    assert d2["cached"] is True
    assert d1["recommendation"] == d2["recommendation"]
    assert d1["noise_scale"] == d2["noise_scale"]

    # Editing the factory's source file invalidates the entry: now it must probe.
    src = project / "user_code.py"
    src.write_text(src.read_text() + "\n# edited\n")
    third = runner.invoke(app, ["check", spec, "--tolerance", "1000000", *budget])
    assert third.exit_code != 0 and "a cached run must not probe" in third.output


def test_check_outside_the_tolerance_still_prints_json(project: Path) -> None:
    """Exit 1 (the baseline is off) is a verdict, not an error: the full report, with its
    ``check`` object, is the JSON document."""
    r = runner.invoke(app, ["check", str(project / "good.yaml"), "--json", "--no-cache",
                            "--set", "optimizer.batch_size=4096", "--tolerance", "2"])
    assert r.exit_code == 1, r.output
    doc = json.loads(r.stdout)
    assert doc["check"]["within"] is False and doc["recommendation"]["batch_size"] < 4096


def test_a_cache_that_cannot_be_written_is_said(project: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """The result is still given; a warning says the next check measures again (it was
    skipped silently)."""
    monkeypatch.setenv("BSFIND_CACHE_DIR", "/proc/self/bsfind-cache")  # refuses, even root
    r = runner.invoke(app, ["check", str(project / "good.yaml"), "--tolerance", "1000000",
                            "--json", "--max-seconds", "60"])
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert any(w.startswith("the result was not cached (/proc/self/bsfind-cache: ")
               and "the next check measures again" in w for w in doc["warnings"]), doc


def test_a_partial_checks_line_says_so() -> None:
    """A check cut short by its budget said nothing of it on stdout (a new user's CI
    failed on a partial, unresolved measurement)."""
    from bsfind import wording

    cut = wording.check_message(within=False, baseline=16, recommended=64, ratio=4.0,
                                tolerance=2, time_ratio=None, cost_ratio=None,
                                learning_rate=0.1, lr_label="rule: mccandlish", partial=True)
    assert cut.endswith("; partial: the measurement stopped early (the warnings say why)")


@pytest.mark.parametrize("gpu", [True, False])
def test_no_local_step_time_under_a_predicted_gpu_is_no_loss(
        monkeypatch: pytest.MonkeyPatch, gpu: bool) -> None:
    """hardware.gpu set and the local ladder timed nothing: the report said "the advice
    uses the noise scale only" while the advice used the predicted GPU step time."""
    from bsfind import wording
    from bsfind.hardware import measure
    from bsfind.results import HardwareMeasurement
    from bsfind.runner import LocalRunner

    def no_timing(self, job, options, deadline, progress):  # type: ignore[no-untyped-def]
        memory = measure.memory_model(job, measure.step_function(job, options.lr, 0), options)
        return HardwareMeasurement(memory, None, (wording.NO_TIMING,))

    monkeypatch.setattr(LocalRunner, "measure_hardware", no_timing)
    r = runner.invoke(app, ["recommend", str(ASSETS / "good.yaml"), "--json",
                            "--set", "probe.max_seconds=5", "--set", "probe.lr_branches=false",
                            *(["--gpu", "a100-80gb"] if gpu else [])])
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert doc["timing"] is None
    assert (doc["recommendation"]["predicted_time_ratio"] is not None) == gpu
    assert (wording.NO_TIMING in doc["warnings"]) == (not gpu)
