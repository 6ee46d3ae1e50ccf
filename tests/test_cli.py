"""The CLI as users see it: exit codes, one-line messages naming the culprit, JSON."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from bsfind.cli import app
from tests.conftest import CONFIGS, ROOT

ASSETS = ROOT / "tests" / "assets"
GOOD = str(ASSETS / "good.yaml")
runner = CliRunner()


def run(*args: str):
    return runner.invoke(app, list(args))


def assert_clean_failure(result, code: int, *needles: str) -> None:
    out = result.output
    assert result.exit_code == code, out
    assert "Traceback" not in out, out
    for n in needles:
        assert n in out, f"{n!r} not in {out!r}"


def test_version() -> None:
    r = run("--version")
    assert r.exit_code == 0 and "bsfind 0." in r.output


def test_validate_ok() -> None:
    r = run("validate", GOOD)
    assert r.exit_code == 0 and "ok" in r.output and "trainable parameters" in r.output
    # a trial: a batch larger than the dataset was said by noise and recommend, not here
    small = run("validate", GOOD, "--set", "data.kwargs={n: 20}")
    assert small.exit_code == 0, small.output
    assert "the dataset has only 20 examples, fewer than the baseline batch 16" not in (
        small.output)  # 20 >= 16: nothing to say
    tiny = run("validate", GOOD, "--set", "data.kwargs={n: 12}")
    assert tiny.exit_code == 0, tiny.output
    assert "the dataset has only 12 examples, fewer than the baseline batch 16" in " ".join(
        tiny.output.split())


def test_noise_json_is_one_document() -> None:
    r = runner.invoke(app, ["noise", GOOD, "--json"])
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert doc["noise_scale"]["b_simple"] > 0
    assert doc["device"]["type"] == "cpu"
    assert not any("probe.branches" in w for w in doc["warnings"])
    # probe.branches is not noise's: said, not ignored (a trial)
    r = runner.invoke(app, ["noise", GOOD, "--json", "--set", "probe.branches=true",
                            "--set", "probe.at_steps=[0]"])
    assert r.exit_code == 0, r.output
    assert any("bsfind noise measures the noise scale only" in w
               for w in json.loads(r.stdout)["warnings"])


def test_init_writes_a_valid_spec(tmp_path: Path) -> None:
    target = tmp_path / "s.yaml"
    assert run("init", str(target)).exit_code == 0
    assert target.read_text().startswith("# bsfind spec")
    assert_clean_failure(run("init", str(target)), 2, "exists", "--force")


FAULTS = [
    # (overrides, exit code, what the message must name)
    (["optimizer.lr=fast"], 2, "optimizer.lr: expected a number"),
    (["probe.sed=1", "optimizer.batch_size=-1"], 2, "probe.sed: unknown key"),
    (["model.factory=nonexistent_mod_xyz:f"], 3, "nonexistent_mod_xyz"),
    (["model.factory=missing.py:f"], 3, "missing.py"),
    (["model.factory=user_code.py:nope"], 3, "has no attribute 'nope'"),
    (["model.factory=user_code.py:good_modl"], 3, "did you mean 'good_model'?"),
    (["model.kwargs={hidden: 3}"], 3, "model.kwargs"),
    (["model.factory=user_code.py:raising_model"], 3, "boom in the model factory"),
    (["model.factory=broken_import.py:f"], 3, "broken_import.py"),
    (["model.factory=user_code.py:not_a_module"], 3, "not a torch.nn.Module"),
    (["model.factory=user_code.py:class_not_instance"], 3,
     "returned the class Linear, not an instance of it"),
    (["model.factory=user_code.py:no_params"], 3, "no trainable parameters"),
    (["model.factory=user_code.py:frozen_model"], 3, "no trainable parameters"),
    (["model.checkpoint=missing.pt"], 3, "model.checkpoint: file not found"),
    (["data.factory=user_code.py:empty_data"], 3,
     "the dataset of data.factory 'user_code.py:empty_data' is empty"),
    (["data.factory=user_code.py:not_a_dataset"], 3, "not a map-style Dataset"),
    (["data.factory=user_code.py:triples"], 3, "(input, target) pair or a dict"),
    (["data.factory=user_code.py:dict_rows", "data.kwargs={target: false}"], 3,
     "a dict needs the target under 'labels' or 'label'"),
    (["data.factory=user_code.py:sentences", "model.factory=user_code.py:bag_of_words"], 3,
     "items do not batch together"),
    (["data.factory=user_code.py:sentences", "data.collate=user_code.py:raising_collate"], 3,
     "data.collate 'user_code.py:raising_collate' raised ValueError on 3 items: no tokenizer"),
    (["data.collate=user_code.py:scalar_collate"], 3,
     "its batch of 3 items: must be an (input, target) pair or a dict with a 'labels' key, "
     "got int"),
    (["data.collate=user_code.py:identity_collate"], 3,
     "its batch of 3 items: must be an (input, target) pair or a dict with a 'labels' key, "
     "got list of length 3"),
    (["data.collate=user_code.py:torch"], 3, "data.collate 'user_code.py:torch' is not callable"),
    (["data.collate=pad"], 2, "data.collate: expected 'module:attr'"),
    (["data.factory=user_code.py:raising_data"], 3, "cannot open /data/train"),
    (["data.factory=user_code.py:ragged_data"], 3, "items do not batch together"),
    (["data.factory=user_code.py:broken_item_data"], 3, "an item raised IndexError: record"),
    (["model.factory=user_code.py:shape_mismatch_model"], 3, "shape_mismatch_model"),
    (["loss=user_code.py:vector_loss"], 3, "must return a scalar"),
    (["loss=user_code.py:raising_loss"], 3, "loss exploded"),
    (["loss=hinge"], 2, "unknown loss 'hinge'"),
    (["optimizer.name=lion"], 2, "unknown optimizer 'lion'"),
    (["optimizer.name=adamm"], 2, "unknown optimizer 'adamm' (did you mean 'adam'?"),
    (["optimizer.kwargs={momentun: 0.9}"], 3, "optimizer.kwargs"),
    (["model.factory=user_code.py:nan_model"], 3, "loss is nan"),
    (["model.factory=user_code.py:nan_model", "probe.warmup_steps=5"], 3,
     "at training step 1"),
    (["model.factory=user_code.py:zero_grad_model"], 3, "all zero"),
    (["probe.max_seconds=0.000001"], 5, "probe.max_seconds"),
    (["model.factory=user_code.py:oom_model", "model.kwargs={threshold: 0}"], 4,
     "out of memory in the noise probe even at batch size"),
]


@pytest.mark.parametrize("overrides, code, needle", FAULTS,
                         ids=[f[2][:30] for f in FAULTS])
def test_faults_end_in_one_clear_line(overrides: list[str], code: int, needle: str) -> None:
    args = ["noise", GOOD]
    for o in overrides:
        args += ["--set", o]
    assert_clean_failure(run(*args), code, needle)


def test_a_diverging_probe_run_is_an_error_not_advice() -> None:
    # SGD at lr 1000: the loss stays finite (no NaN check fires) but rises 300-fold by
    # step 8; before, the advice was a batch 8x the baseline at a 1.7e3 learning rate.
    r = run("recommend", str(CONFIGS / "digits-mlp.yaml"), "--set", "optimizer.name=sgd",
            "--set", "optimizer.lr=1000", "--set", "probe.max_seconds=20")
    assert_clean_failure(r, 3, "training diverges", "optimizer.lr=1000", "lower optimizer.lr")


def test_no_divergence_is_read_into_a_negative_loss_or_a_pinned_point() -> None:
    # A negative loss that falls (-2.3 -> -4.9): 3x the first point's is further below 0,
    # so "rose 3-fold" read every improvement short of 3x as divergence (review).
    doc = json.loads(run("noise", GOOD, "--json", "--set", "loss=user_code.py:shifted_loss",
                         "--set", "probe.max_seconds=20").stdout)
    losses = [p["loss"] for p in doc["noise_scale_by_step"]]
    assert doc["trajectory"]["mode"] == "along" and len(losses) >= 3 and losses[0] < 0


def test_only_a_run_from_the_initial_weights_is_checked_for_divergence(
        monkeypatch: pytest.MonkeyPatch) -> None:
    # Every evaluation reads 10x the one before. Along training (step 0 = the model's
    # initial weights) that is divergence; at pinned points after training (or from a
    # checkpoint), which start low where ordinary bumps are several-fold, it is not read.
    from bsfind import trajectory

    def rising() -> None:
        losses = iter(10.0 ** k for k in range(100))
        monkeypatch.setattr(trajectory, "evaluate_loss", lambda *a, **k: next(losses))

    rising()
    r = run("noise", GOOD, "--set", "probe.at_steps=[16,32,64]")
    assert r.exit_code == 0, r.output
    rising()
    assert_clean_failure(run("noise", GOOD, "--set", "probe.max_seconds=20"), 3,
                         "training diverges", "rose from 1 (step 0) to 10 (step 8)")


def test_a_budget_error_hints_only_what_applies() -> None:
    # good.yaml's MLP takes the per-example path: no micro-batches to make smaller
    r = run("noise", GOOD, "--set", "probe.max_seconds=0.000001")
    assert_clean_failure(r, 5, "raise probe.max_seconds")
    assert "microbatch_size" not in r.output


def test_the_budget_counts_from_the_command_start(monkeypatch: pytest.MonkeyPatch) -> None:
    """--max-seconds bounds the whole command: importing torch and the user's code count
    (a trial's check --max-seconds 30 ran 38 s, 6 s of it importing torch under load).
    A command that began 1000 s ago has no budget left, whatever the probe needs."""
    import time

    from bsfind import budget, cli

    monkeypatch.setattr(cli, "_STARTED", time.perf_counter() - 1000)
    r = run("noise", GOOD, "--set", "probe.max_seconds=60")
    assert_clean_failure(r, 5, "raise probe.max_seconds")
    # and it says where the budget went (over 1000 s before the probe began)
    took = re.search(r"starting up \(Python, torch, the spec's factories\) took ([\d.]+) s "
                     r"of the 60 s", r.output)
    assert took and float(took.group(1)) >= 1000, r.output
    # the fake-clock arithmetic: counted from the start inside the block, from now outside
    with budget.counted_from(10.0):
        assert budget.run_deadline(5.0, clock=lambda: 12.0).left() == 3.0
    assert budget.run_deadline(5.0, clock=lambda: 12.0).left() == 5.0
    with budget.counted_from(None):
        assert budget.run_deadline(5.0, clock=lambda: 12.0).left() == 5.0


def test_missing_spec_file() -> None:
    assert_clean_failure(run("noise", "no/such/spec.yaml"), 2, "file not found")


def test_checkpoint_that_does_not_match(tmp_path: Path) -> None:
    ckpt = tmp_path / "other.pt"
    torch.save(torch.nn.Linear(3, 3).state_dict(), ckpt)
    assert_clean_failure(run("noise", GOOD, "--set", f"model.checkpoint={ckpt}"), 3,
                         "does not match the model")


def test_checkpoint_is_loaded(tmp_path: Path) -> None:
    import sys

    sys.path.insert(0, str(ASSETS))
    try:
        import user_code
    finally:
        sys.path.remove(str(ASSETS))
    model = user_code.good_model()
    ckpt = tmp_path / "good.pt"
    torch.save({"state_dict": model.state_dict()}, ckpt)
    r = runner.invoke(app, ["noise", GOOD, "--json", "--set", f"model.checkpoint={ckpt}"])
    assert r.exit_code == 0, r.output


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_absent_cuda_device_is_a_hardware_error() -> None:
    assert_clean_failure(run("noise", GOOD, "--set", "hardware.device=cuda"), 4,
                         "hardware.device", "no CUDA device")


def test_debug_shows_the_traceback() -> None:
    r = run("noise", GOOD, "--set", "model.factory=user_code.py:raising_model", "--debug")
    assert r.exit_code == 3 and "Traceback" in r.output


def test_out_of_memory_in_the_probe_backs_off() -> None:
    """A fake CUDA OOM above 12 examples: the probe halves its batch and finishes."""
    r = runner.invoke(app, ["noise", GOOD, "--json", "--set",
                            "model.factory=user_code.py:oom_model",
                            "--set", "model.kwargs={threshold: 12}",
                            "--set", "optimizer.batch_size=48"])
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert doc["noise_scale"]["b_big"] <= 12 and doc["noise_scale"]["rounds"] > 0


def test_dataset_smaller_than_the_batch_is_said_and_still_probed() -> None:
    r = runner.invoke(app, ["noise", GOOD, "--json", "--set",
                            "data.factory=user_code.py:tiny_data"])
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert any("only 6 examples" in w for w in doc["warnings"])
    assert doc["noise_scale"]["examples"] > 0


def test_bf16_precision_runs_the_forward_under_autocast() -> None:
    from bsfind.spec import load_spec
    from bsfind.workload import build

    job = build(load_spec(GOOD, ["hardware.precision=bf16"]))
    seen = []
    job.model[0].register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    loss = job.loss(torch.arange(8))
    assert seen == [torch.bfloat16] and loss.dtype == torch.float32
    r = runner.invoke(app, ["noise", GOOD, "--json", "--set", "hardware.precision=bf16"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["noise_scale"]["b_simple"] > 0


def test_batchnorm_model_recommends_with_microbatches() -> None:
    r = runner.invoke(app, ["recommend", GOOD, "--json", "--set",
                            "model.factory=user_code.py:bn_model"])
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert doc["noise_scale"]["method"] == "microbatch"
    assert "BatchNorm" in doc["noise_scale"]["method_reason"]
    assert min(p["batch_size"] for p in doc["timing"]["points"]) == 2
    # The note: the noise scale is that of the BatchNorm batch (16 here), and the
    # advice keeps 16 per device in each forward, growing by accumulation (DESIGN §8).
    assert doc["noise_scale"]["b_small"] == 16
    assert any("BatchNorm batch" in w and "keeps 16 per device" in w for w in doc["warnings"])
    rec = doc["recommendation"]
    assert rec["batch_size"] % 16 == 0 and rec["per_device_batch_size"] <= 16
    assert all(c["batch_size"] % 16 == 0 for c in doc["candidates"])
    for c in doc["candidates"]:  # never more than one BatchNorm batch per forward
        assert c["per_device_batch_size"] <= 16
        assert c["grad_accumulation"] == max(1, c["batch_size"] // 16)


def test_init_into_a_missing_folder_is_a_usage_error(tmp_path: Path) -> None:
    assert_clean_failure(run("init", str(tmp_path / "no" / "s.yaml")), 2, "cannot write")


def test_bad_plot_path_fails_before_probing(tmp_path: Path) -> None:
    assert_clean_failure(run("recommend", GOOD, "--plot", str(tmp_path / "p.txt")), 2,
                         "must end in .png or .svg")
    assert_clean_failure(run("recommend", GOOD, "--plot", str(tmp_path / "no" / "p.png")), 2,
                         "does not exist")


def test_same_training_step_same_estimate_by_warmup_or_at_steps() -> None:
    from bsfind.api import measure
    from bsfind.spec import load_spec

    # A budget far above what convergence needs: both runs stop on the target, so
    # their rounds are decided by the data alone and must be the same rounds.
    common = ["probe.max_seconds=120", "probe.target_rel_error=0.2"]
    by_warmup = measure(load_spec(GOOD, [*common, "probe.warmup_steps=10"])).used
    by_points = measure(load_spec(GOOD, [*common, "probe.at_steps=[0,10]"])).noise[-1]
    assert by_warmup is not None and by_warmup.step == by_points.step == 10
    assert by_warmup.stopped == by_points.stopped == "converged"
    for field in ("b_simple", "ci95", "grad_norm_sq", "trace_sigma", "rounds", "examples"):
        assert getattr(by_warmup, field) == getattr(by_points, field), field
    at_zero = measure(load_spec(GOOD, [*common, "probe.at_steps=[0]"])).used  # other weights
    assert at_zero is not None and at_zero.b_simple != by_warmup.b_simple


@pytest.mark.parametrize("overrides, code, needle", FAULTS,
                         ids=[f[2][:30] for f in FAULTS])
def test_faults_with_json_print_a_json_error(overrides: list[str], code: int,
                                             needle: str) -> None:
    """With --json a failure still leaves one JSON document on stdout (a pipeline running
    `json.load` on it gets the error), and the message on stderr."""
    args = ["noise", GOOD, "--json"]
    for o in overrides:
        args += ["--set", o]
    r = run(*args)
    assert r.exit_code == code
    doc = json.loads(r.stdout)
    assert doc["status"] == "error" and doc["exit_code"] == code
    assert needle in doc["error"] or any(needle in p for p in doc.get("problems", []))
    assert needle in r.stderr


def test_internal_error_with_json(monkeypatch: pytest.MonkeyPatch) -> None:
    from bsfind import api

    def broken(*args: object, **kwargs: object) -> None:
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(api, "measure", broken)
    r = run("noise", GOOD, "--json")
    assert r.exit_code == 70
    doc = json.loads(r.stdout)
    assert doc == {"version": doc["version"], "status": "error",
                   "error": "internal error: ZeroDivisionError: a bug",
                   "hint": "rerun with --debug and report the traceback", "exit_code": 70}


def test_validate_catches_a_loss_that_cannot_take_the_output() -> None:
    """A loss for tensors on a model that returns an object: exit 3 at validate, in one
    small step, with the hint to use the model's own loss or its logits."""
    r = run("validate", GOOD, "--set", "model.factory=user_code.py:object_output_model")
    assert_clean_failure(r, 3, "got a Output from the model", "loss: model", "outputs.logits")
    ok = run("validate", GOOD, "--set", "model.factory=user_code.py:object_output_model",
             "--set", "loss=model")
    assert ok.exit_code == 0, ok.output
    assert "noise probe: per-example" in ok.output
    j = run("validate", GOOD, "--json", "--set",
            "model.factory=user_code.py:object_output_model")
    assert json.loads(j.stdout)["exit_code"] == 3
    # a forward without labels=: loss: model would fail next, so the hint leaves it out
    t = run("validate", GOOD, "--set", "model.factory=user_code.py:tuple_output_model")
    assert_clean_failure(t, 3, "got a tuple from the model",
                         "use a loss function 'file.py:fn' that reads the logits from the "
                         "model's tuple")
    assert "loss: model" not in t.output


def test_validate_says_which_method_and_where() -> None:
    r = run("validate", GOOD, "--json")
    doc = json.loads(r.stdout)
    assert doc["status"] == "ok" and doc["method"] == "per-example"
    assert "cheapest exact method" in doc["method_reason"]
    assert doc["probe_points"].startswith("along training at batch 16")
    assert doc["learning_rate"].startswith("measured at the recommended batch")
    off = json.loads(run("validate", GOOD, "--json", "--set", "probe.at_steps=[0]").stdout)
    assert off["learning_rate"] == ("the rule's extrapolation from the baseline's (the probe "
                                    "trains no steps (probe.at_steps [0]))")
    assert "learning rate: measured at the recommended batch" in run("validate", GOOD).output
    bn = json.loads(run("validate", str(ROOT / "configs" / "digits-cnn.yaml"), "--json",
                        "--set", "model.kwargs.norm=batch").stdout)
    assert bn["method"] == "microbatch" and "BatchNorm" in bn["method_reason"]
    # the micro-batch is the BatchNorm batch: the baseline's 32 (only the JSON said so)
    assert "each micro-batch is a BatchNorm batch of 32" in bn["method_reason"]
    assert "BatchNorm batch" not in doc["method_reason"]


def test_per_example_norms_that_fail_at_run_time_are_found_and_said() -> None:
    """A parameter behind an old-style autograd.Function (no setup_context): every layer
    has a rule, but torch.func cannot run it, which shows only at run time. validate
    runs the norms on its step and says micro-batches; the probe's fallback warns (a
    trial found it only in the JSON's method_reason)."""
    custom = ("--set", "model.factory=user_code.py:custom_function_model")
    doc = json.loads(run("validate", GOOD, "--json", *custom).stdout)
    assert doc["method"] == "microbatch", doc
    assert "failed on validate's step" in doc["method_reason"]
    assert "setup_context" in doc["method_reason"]
    r = run("noise", GOOD, "--json", *custom, "--set", "probe.at_steps=[0]")
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert out["noise_scale"]["method"] == "microbatch"
    assert any(w.startswith("per-example norms failed at run time") and
               "the probe used micro-batches instead" in w for w in out["warnings"])
    plain = json.loads(run("noise", GOOD, "--json", "--set", "probe.at_steps=[0]").stdout)
    assert not any("failed at run time" in w for w in plain["warnings"])


def test_plain_progress_prints_each_phase_first_and_last_message() -> None:
    """Off a terminal (CI logs), a phase's first message shows when it starts, and its
    last one when it ends if that says something else: a probe's first round is
    "|G|² unresolved", its last one holds the value."""
    from bsfind.cli import _phase_lines

    lines: list[str] = []
    with _phase_lines(lines.append) as log:
        log("train", 0.5, "training step 1 (loss 2.300)")
        log("train", 1.0, "training step 1 (loss 2.300)")  # nothing new: no closing line
        log("noise", 0.1, "step 1: |G|² unresolved, B_big=64")
        assert lines[-1] == "bsfind: noise: step 1: |G|² unresolved, B_big=64"  # at once
        log("noise", 0.6, "step 1: B_simple≈70 ±30%, B_big=128")
        log("noise", 1.0, "step 1: B_simple≈64 ±9%, B_big=128")
        log("train", 0.2, "training step 2 (loss 2.100)")
        log("train", 1.0, "training step 8 (loss 1.700)")
    assert lines == [
        "bsfind: train: training step 1 (loss 2.300)",
        "bsfind: noise: step 1: |G|² unresolved, B_big=64",
        "bsfind: noise: step 1: B_simple≈64 ±9%, B_big=128",
        "bsfind: train: training step 2 (loss 2.100)",
        "bsfind: train: training step 8 (loss 1.700)",  # the last phase, closed at the end
    ]
    quiet: list[str] = []
    with _phase_lines(quiet.append):
        pass
    assert quiet == []
    failed: list[str] = []  # after an error its one line ends the output: no closing line
    with pytest.raises(RuntimeError), _phase_lines(failed.append) as log:
        log("noise", 0.1, "step 0: |G|² unresolved, B_big=64")
        log("noise", 0.5, "step 0: B_simple≈70 ±30%, B_big=128")
        raise RuntimeError("loss is nan")
    assert failed == ["bsfind: noise: step 0: |G|² unresolved, B_big=64"]


def test_shape_errors_show_the_batch_they_got() -> None:
    """torch's shape messages name the tensors the model or loss saw; the hint adds the
    batch's own shapes (the first axis is the batch)."""
    r = run("noise", GOOD, "--set", "model.factory=user_code.py:shape_mismatch_model")
    assert_clean_failure(r, 3, "raised RuntimeError in forward",
                         "the batch: inputs [", "] float32, targets [")
    r = run("noise", GOOD, "--set", "loss=user_code.py:raising_loss")
    assert_clean_failure(r, 3, "loss exploded", "it got outputs [", "and targets [")


class _TiedLM(torch.nn.Module):
    """An embedding tied to the output head, as GPT-2's wte and lm_head."""

    def __init__(self) -> None:
        super().__init__()
        self.wte = torch.nn.Embedding(10, 4)
        self.lm_head = torch.nn.Linear(4, 10, bias=False)
        self.lm_head.weight = self.wte.weight
        self.norm = torch.nn.LayerNorm(4)


def test_checkpoints_from_save_pretrained_folders_and_tied_weights(tmp_path: Path) -> None:
    """A Hugging Face folder (model.safetensors inside) and a state_dict that stores a
    tied weight once both load; a key missing for an untied parameter does not."""
    save_file = pytest.importorskip("safetensors.torch").save_file

    from bsfind.errors import ResolutionError
    from bsfind.workload import load_checkpoint

    torch.manual_seed(0)
    saved = _TiedLM()
    state = {k: v for k, v in saved.state_dict().items() if k != "lm_head.weight"}
    folder = tmp_path / "gptsave"
    folder.mkdir()
    save_file(state, str(folder / "model.safetensors"))
    torch.save(state, tmp_path / "tied.pt")
    for path in ("gptsave", "gptsave/model.safetensors", "tied.pt"):
        model = _TiedLM()
        load_checkpoint(model, path, tmp_path)
        assert torch.equal(model.wte.weight, saved.wte.weight)
        assert model.lm_head.weight is model.wte.weight  # still tied
    (tmp_path / "empty").mkdir()
    with pytest.raises(ResolutionError, match="folder without model.safetensors or "
                                              "pytorch_model.bin"):
        load_checkpoint(_TiedLM(), "empty", tmp_path)
    torch.save({k: v for k, v in state.items() if k != "norm.weight"}, tmp_path / "cut.pt")
    with pytest.raises(ResolutionError, match="does not match the model: missing norm.weight"):
        load_checkpoint(_TiedLM(), "cut.pt", tmp_path)
    # another shape: torch's indented lines, joined without their runs of spaces (a trial)
    torch.save(torch.nn.Linear(3, 5).state_dict(), tmp_path / "wide.pt")
    with pytest.raises(ResolutionError, match="Linear: size mismatch for weight") as info:
        load_checkpoint(torch.nn.Linear(3, 4), "wide.pt", tmp_path)
    assert "  " not in str(info.value)
    (tmp_path / "notes.pt").write_text("not a checkpoint\n")
    with pytest.raises(ResolutionError, match="not a file torch.save or safetensors wrote"):
        load_checkpoint(torch.nn.Linear(3, 4), "notes.pt", tmp_path)


def test_check_reports_a_misspelt_name_as_a_spec_error() -> None:
    """check keys its cache before the build: a misspelt built-in name is not a module
    to import there, and ends as the build reports it (exit 2, did you mean)."""
    assert_clean_failure(run("check", GOOD, "--set", "optimizer.name=adamm"), 2,
                         "unknown optimizer 'adamm' (did you mean 'adam'?")
    assert_clean_failure(run("check", GOOD, "--set", "loss=cross_entropyy"), 2,
                         "unknown loss 'cross_entropyy' (did you mean 'cross_entropy'?")


def _noise_doc() -> dict[str, object]:
    row = {"step": 1280, "examples_seen": 81_920, "loss": 0.00938, "b_simple": 156.2,
           "ci95": [143.1, 174.4], "grad_norm_sq": 0.0839, "trace_sigma": 13.1,
           "b_noise": None, "b_noise_ci95": None, "method": "per-example",
           "examples": 20_864, "seconds": 0.16, "stopped": "converged"}
    return {"noise_scale": {"step": 1280}, "noise_scale_by_step": [row]}


def test_a_narrow_terminal_hides_columns_instead_of_cutting_numbers() -> None:
    """At 80 columns the 12-column noise table squeezed every number to "1,0…" (new-user
    trial): now the least read columns go, an empty one first and unmentioned, and a
    caption names the rest; a wide terminal keeps them all."""
    import io

    from rich.console import Console

    from bsfind.cli import NOISE_DROP, print_table, render_noise

    out = io.StringIO()
    narrow = Console(file=out, width=80, force_terminal=True, color_system=None)
    hidden = print_table(render_noise(_noise_doc()), NOISE_DROP, narrow)
    text = out.getvalue()
    assert "…" not in text and max(len(line) for line in text.splitlines()) <= 80
    present = [d for d in NOISE_DROP[1:] if d != "window examples"]  # a measured table's
    assert hidden and "B_noise" not in hidden and hidden == present[:len(hidden)]
    assert f"hidden to fit the terminal: {', '.join(hidden)}" in text
    for kept in ("156", "[143, 174]", "81,920"):
        assert kept in text
    wide = Console(file=io.StringIO(), width=200, force_terminal=True)
    assert print_table(render_noise(_noise_doc()), NOISE_DROP, wide) == []
    # piped (not a terminal), columns go only when even wrapped headers cannot fit
    piped = Console(file=io.StringIO(), width=132, force_terminal=False)
    assert print_table(render_noise(_noise_doc()), NOISE_DROP, piped) == []


def test_a_factory_file_imports_its_neighbours() -> None:
    """`from user_code import good_model` in a factory file: its folder is on the import
    path, as under `python file.py` (a new user's model file failed with
    ModuleNotFoundError)."""
    r = run("validate", GOOD, "--set", "model.factory=sibling_factory.py:model")
    assert r.exit_code == 0, r.output


def test_a_tracker_logs_table_has_no_probe_columns() -> None:
    """bsfind schedule's points took no probe time and have no B_noise: no seconds (all
    0.00), stopped (all "logged") or B_noise columns, and the examples column says what
    its numbers are (new-user trial: "probe examples" 896 with no obvious meaning)."""
    import io

    from rich.console import Console

    from bsfind.cli import NOISE_DROP, print_table, render_noise

    doc = _noise_doc()
    doc["noise_scale_by_step"][0].update(stopped="logged", seconds=0.0)  # type: ignore[index]
    table = render_noise(doc)
    headers = [str(c.header) for c in table.columns]
    assert "window examples" in headers and "probe examples" not in headers
    assert not {"seconds", "stopped", "B_noise"} & set(headers)
    out = io.StringIO()
    print_table(table, NOISE_DROP, Console(file=out, width=200))
    assert "from the tracker log" in out.getvalue() and "20,864" in out.getvalue()
    # a trial: the rows are medians over stretches of records, unsaid; "window examples"
    # was explained nowhere
    words = " ".join(out.getvalue().split())  # the caption wraps at the console's width
    assert "each row stands for the log's records over a stretch of training" in words
    assert "window examples: the examples the tracker averaged over" in words
    narrow = io.StringIO()
    print_table(render_noise(doc), NOISE_DROP, Console(file=narrow, width=80,
                                                       force_terminal=True, color_system=None))
    words = " ".join(narrow.getvalue().split())
    assert "each row stands for" in words and "hidden to fit the terminal" in words


def test_the_candidates_title_names_the_predicted_gpus_step_times() -> None:
    """With --gpu every row's step time is the predicted GPU's: the title said
    "measured" (this machine's), a new user's trial found."""
    from bsfind.cli import render_candidates

    doc = {"timing": {"source": "measured"},
           "predicted": {"timing": {"source": "predicted"}}, "candidates": []}
    assert render_candidates(doc).title == "Candidates (step time: predicted)"
    assert render_candidates({"timing": {"source": "measured"}, "predicted": None,
                              "candidates": []}).title == "Candidates (step time: measured)"


def test_checkpoints_of_wrapped_models_load_into_plain_ones_and_back(tmp_path: Path) -> None:
    """DDP's "module." and torch.compile's "_orig_mod." before every key: a trial's
    compiled ViT met a plain checkpoint ("missing _orig_mod.cls_token", no hint)."""
    from bsfind.errors import ResolutionError
    from bsfind.workload import load_checkpoint

    torch.manual_seed(0)
    source = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    plain = {k: v.clone() for k, v in source.state_dict().items()}
    torch.save({f"module.{k}": v for k, v in plain.items()}, tmp_path / "ddp.pt")
    torch.save(plain, tmp_path / "plain.pt")
    torch.save({f"_orig_mod.module.{k}": v for k, v in plain.items()}, tmp_path / "both.pt")
    for file, target in (("ddp.pt", torch.nn.Sequential(torch.nn.Linear(3, 4),
                                                        torch.nn.Linear(4, 2))),
                         ("both.pt", torch.nn.Sequential(torch.nn.Linear(3, 4),
                                                         torch.nn.Linear(4, 2))),
                         ("plain.pt", torch.compile(torch.nn.Sequential(
                             torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))))):
        load_checkpoint(target, file, tmp_path)
        loaded = {k.removeprefix("_orig_mod."): v for k, v in target.state_dict().items()}
        assert all(torch.equal(loaded[k], v) for k, v in plain.items()), file
    # an AveragedModel's own counter is the one key left over
    torch.save({**{f"module.{k}": v for k, v in plain.items()},
                "n_averaged": torch.tensor(3)}, tmp_path / "ema.pt")
    with pytest.raises(ResolutionError, match=r"does not match the model: unexpected "
                                              r"n_averaged$"):
        load_checkpoint(torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2)),
                        "ema.pt", tmp_path)


@pytest.mark.parametrize("args", [("env",), ("env", "--json"), ("--help",)])
def test_a_reader_that_leaves_early_ends_bsfind_with_141_not_checks_1(
        args: tuple[str, ...]) -> None:
    """A trial: `bsfind validate spec | head -1` exited 1, silently (rich's broken-pipe
    exit), and 1 is check's "outside the tolerance". Now 128 + SIGPIPE, as a shell
    reports a process the signal ended, and nothing on stderr. `--help` too: typer's
    own console printed it, and exited 1 (a note)."""
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-m", "bsfind", *args], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.close()  # the reader is gone before bsfind writes a line
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 141, err
    assert err == ""


def test_warnings_reach_stderr_when_stdouts_reader_has_left(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """A review: `bsfind recommend spec | head` exited 141 before the report's warnings
    (on stderr, which still has its reader) were written: they were lost."""
    from bsfind import cli

    def gone(text: str) -> None:
        raise SystemExit(cli.EXIT_BROKEN_PIPE)

    monkeypatch.setattr(cli, "_write_stdout", gone)
    with pytest.raises(SystemExit) as exc:
        cli._emit({"warnings": ["the noise scale is unresolved"]}, True)
    assert exc.value.code == 141
    assert "warning: the noise scale is unresolved" in capsys.readouterr().err
