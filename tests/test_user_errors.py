"""Errors a user can cause end in one clear line, the right exit code and no traceback:
the cases an adversarial trial found ending in an internal error (70), a traceback, a
wrong exit code or a misleading blame."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.test_cli import ASSETS, GOOD, assert_clean_failure, run

QUICK = ("--set", "probe.at_steps=[0]", "--set", "probe.max_seconds=10")


def test_a_message_that_looks_like_markup_is_printed_as_it_is() -> None:
    """An optimizer's error "[/group]" crashed the error printer (rich markup): a
    traceback and exit 1, which check reads as "outside the tolerance"."""
    r = run("check", GOOD, "--no-cache", "--set", "optimizer.name=user_code.py:MarkupOpt")
    assert_clean_failure(r, 3, "optimizer 'user_code.py:MarkupOpt' raised RuntimeError in step",
                         "state for param [/group] missing")


def test_a_loss_without_a_gradient_is_the_users_error() -> None:
    """A constant loss, or a detached one: "no backward reached the hooked modules" and
    "element 0 of tensors does not require grad" were internal errors (70)."""
    const = ("--set", "loss=user_code.py:constant_loss")
    assert_clean_failure(run("noise", GOOD, *const, *QUICK), 3,
                         "no gradient reached the trainable parameters")
    assert_clean_failure(run("validate", GOOD, *const), 3,
                         "no gradient reached the trainable parameters")
    assert_clean_failure(run("validate", GOOD, "--set", "loss=user_code.py:detached_loss"), 3,
                         "carries no gradient", ".detach()")


def test_an_optimizer_that_needs_a_closure_is_refused_at_build() -> None:
    r = run("validate", GOOD, "--set", "optimizer.name=torch.optim:LBFGS")
    assert_clean_failure(r, 2, "its step needs a closure (as LBFGS's does)")


def test_a_dataset_of_one_example_is_refused() -> None:
    r = run("validate", GOOD, "--set", "data.factory=user_code.py:one_item_data")
    assert_clean_failure(r, 3, "has one example", "two at least")


def test_an_integer_too_large_for_torch_is_a_spec_error() -> None:
    assert_clean_failure(run("validate", GOOD, "--set", f"probe.seed={2**70}"), 2,
                         "probe.seed: must fit in 64 bits")


@pytest.mark.parametrize(("content", "needle"), [
    (b"\xff\xfe\x00binary", "not UTF-8 text"),
    (b'{"step": 0, "examples": 0, "loss": 1.0, "grad_norm_sq": NaN, "trace_sigma": 1.0, '
     b'"b_simple": 5.0, "b_simple_ci95": [4.0, 6.0], "b_small": 1, "b_big": 8, '
     b'"method": "per-example"}\n', "grad_norm_sq: expected a finite number"),
    (b'{"step": 0, "examples": 0, "loss": 1.0, "grad_norm_sq": 1.0, "trace_sigma": 1.0, '
     b'"b_simple": 5.0, "b_simple_ci95": [40.0, 20.0], "b_small": 1, "b_big": 8, '
     b'"method": "per-example"}\n', "low 40.0 above high 20.0"),
    (b'{"step": 0, "examples": 0, "loss": 1.0, "grad_norm_sq": 1.0, "trace_sigma": 1.0, '
     b'"b_simple": 5.0, "b_simple_ci95": [4.0, 6.0], "b_small": 1, "b_big": 0, '
     b'"method": "per-example"}\n', "b_big: expected >= 1, got 0"),
])
def test_a_tracker_log_that_is_not_one_is_a_usage_error(tmp_path: Path, content: bytes,
                                                        needle: str) -> None:
    log = tmp_path / "noise.jsonl"
    log.write_bytes(content)
    assert_clean_failure(run("schedule", GOOD, str(log)), 2, needle)


def test_user_code_that_exits_is_the_users_error(tmp_path: Path) -> None:
    """argparse at a factory file's import exited 2 as if bsfind's usage were wrong; a
    forward's SystemExit(4) exited 4 ("hardware") with no output, no JSON."""
    spec = tmp_path / "spec.yaml"

    spec.write_text((ASSETS / "good.yaml").read_text().replace(
        "user_code.py:good_model", f"{ASSETS / 'exits_at_import.py'}:model"))
    out = tmp_path / "report.json"
    r = run("check", str(spec), "--no-cache", "--output", str(out))
    assert_clean_failure(r, 3, "model.factory", "importing exits_at_import.py raised "
                         "SystemExit: 2", "if __name__ ==")
    assert json.loads(out.read_text())["exit_code"] == 3
    j = run("noise", GOOD, "--json", "--set", "model.factory=user_code.py:exiting_model",
            *QUICK)
    assert j.exit_code == 3, j.output
    doc = json.loads(j.stdout)
    assert doc["exit_code"] == 3 and "SystemExit: 4" in doc["error"]


def test_check_says_what_is_wrong_with_its_options_before_the_run(tmp_path: Path) -> None:
    r = run("check", GOOD, "--max-seconds", "inf")
    assert_clean_failure(r, 2, "probe.max_seconds: expected a finite number",
                         "(from --max-seconds inf)")
    assert "--set" not in r.output
    assert_clean_failure(run("check", GOOD, "--output", str(tmp_path)), 2,
                         f"--output {tmp_path}: is a folder")
    assert_clean_failure(run("check", GOOD, "--output", str(tmp_path / "no" / "r.json")), 2,
                         "does not exist")
    g = run("recommend", GOOD, "--plot", str(tmp_path / "d.png"), "--gpu", "h999")
    assert_clean_failure(g, 2, "hardware.gpu: unknown GPU 'h999'", "(from --gpu h999)")
    assert "--set" not in g.output
    (tmp_path / "d.png").mkdir()
    assert_clean_failure(run("recommend", GOOD, "--plot", str(tmp_path / "d.png")), 2,
                         "is a folder")
    # the spec's own hardware.gpu is checked at load, by validate too, not after a run
    assert_clean_failure(run("validate", GOOD, "--set", "hardware.gpu=h999"), 2,
                         "hardware.gpu: unknown GPU 'h999'")


def test_what_user_code_prints_does_not_break_the_json() -> None:
    r = run("noise", GOOD, "--json", "--set", "model.factory=user_code.py:printing_model",
            *QUICK)
    assert r.exit_code == 0, r.stderr
    json.loads(r.stdout)  # one document
    assert "building the model" in r.stderr and "forward of" in r.stderr


def test_a_whole_model_saved_as_a_checkpoint_gets_one_line(tmp_path: Path) -> None:
    ckpt = tmp_path / "model.pt"
    torch.save(torch.nn.Linear(8, 3), ckpt)
    r = run("validate", GOOD, "--set", f"model.checkpoint={ckpt}")
    assert_clean_failure(r, 3, "holds pickled Python objects, not a state_dict",
                         "model.state_dict()")
    assert "weights_only" not in r.output and len(r.output.strip().splitlines()) == 2


def test_a_message_of_several_lines_is_printed_as_one() -> None:
    r = run("validate", GOOD, "--set", "model.factory=user_code.py:multiline_model")
    assert_clean_failure(r, 3, "first line second line third line")


def test_a_command_line_usage_error_under_json_writes_the_document(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """typer's own usage errors (before any command runs) printed only a box on stderr:
    a CI step reading --json stdout got nothing."""
    from bsfind import cli

    monkeypatch.setattr("sys.argv", ["bsfind", "check", GOOD, "--json", "--tolerance", "0.5"])
    with pytest.raises(SystemExit) as exit_:
        cli._app()
    assert exit_.value.code == 2
    doc = json.loads(capsys.readouterr().out)
    assert doc["exit_code"] == 2 and "--tolerance" in doc["error"]
    monkeypatch.setattr("sys.argv", ["bsfind", "check", GOOD, "--tolerance", "0.5"])
    with pytest.raises(SystemExit):
        cli._app()
    assert capsys.readouterr().out == ""  # without --json, stdout stays empty


def test_a_set_value_that_is_not_yaml_gets_the_hint_that_fits() -> None:
    """A value the shell cut at a space gets the quoting hint; a YAML tag does not."""
    cut = run("validate", GOOD, "--set", "probe.at_steps=[0,")
    assert cut.exit_code == 2 and "quote the whole --set" in cut.output
    tag = run("validate", GOOD, "--set", "probe.seed=!!python/object:os.system")
    assert_clean_failure(tag, 2, "values are plain YAML")
    assert "quote the whole" not in tag.output


def test_a_key_given_twice_in_the_spec_is_refused(tmp_path: Path) -> None:
    """The last of two `loss:` lines won silently."""

    spec = tmp_path / "spec.yaml"
    spec.write_text((ASSETS / "good.yaml").read_text() + "loss: mse\n")
    assert_clean_failure(run("validate", str(spec)), 2, "key 'loss' given twice (first at line")


def test_an_exception_without_a_message_is_named_alone() -> None:
    """A bare MemoryError read "raised MemoryError in forward: " (a trial)."""
    r = run("validate", GOOD, "--set", "model.factory=user_code.py:bare_error_model")
    assert_clean_failure(r, 3, "raised LookupError in forward\n")


def test_out_of_memory_in_validates_per_example_pass_is_the_devices() -> None:
    r = run("validate", GOOD, "--set", "model.factory=user_code.py:second_forward_oom_model")
    assert_clean_failure(r, 4, "out of memory in validate's per-example norms of 4 examples")


@pytest.mark.parametrize("command", ["validate", "noise"])
def test_a_memory_error_is_out_of_memory_everywhere(command: str) -> None:
    """Python's MemoryError is the device's, exit 4, in validate's step as in a probe
    (validate said exit 3, "raised MemoryError in forward", a trial)."""
    r = run(command, GOOD, "--set", "model.factory=user_code.py:no_memory_model")
    assert_clean_failure(r, 4, "out of memory in " + (
        "validate's one step of 4 examples on cpu" if command == "validate"
        else "the noise probe even at batch size 2"))


def test_a_text_column_left_in_dict_items_is_warned_about() -> None:
    """A tokenized dataset's raw text goes to the model as a keyword argument like the
    other entries; a model taking **kwargs swallowed it silently (a trial's BERT)."""
    text = ("--set", "data.factory=user_code.py:text_rows",
            "--set", "model.factory=user_code.py:swallowing_model")
    r = run("noise", GOOD, "--json", *text, *QUICK)
    assert r.exit_code == 0, r.output
    assert any("hold text under 'text'" in w for w in json.loads(r.stdout)["warnings"])
    plain = run("noise", GOOD, "--json", "--set", "data.factory=user_code.py:dict_rows",
                "--set", "model.factory=user_code.py:swallowing_model", *QUICK)
    assert not any("hold text" in w for w in json.loads(plain.stdout)["warnings"])


def test_a_text_entry_the_forward_names_is_not_warned_about() -> None:
    """Only entries that fall into **kwargs are flagged (a review: a model taking its
    own text input by name was told to remove it)."""
    from bsfind.workload import Workload, text_inputs
    from tests.assets import user_code

    class Named(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.l = torch.nn.Linear(4, 3)

        def forward(self, features: torch.Tensor, extra: torch.Tensor, text: object,
                    **kwargs: object) -> torch.Tensor:
            return self.l(features)

    rows, loss = user_code.text_rows(), torch.nn.functional.cross_entropy
    assert text_inputs(Workload.from_objects(Named(), rows, loss)) == []
    swallowed = text_inputs(Workload.from_objects(user_code.swallowing_model(), rows, loss))
    assert swallowed == ["text"]
    assert text_inputs(Workload.from_objects(user_code.keyword_model(), rows, loss)) == []


def test_regression_targets_under_cross_entropy_are_refused() -> None:
    """Regression targets under loss: cross_entropy passed validate as "ok" with loss
    -2.65 (a new user): one output per example with float targets is refused by every
    command, positive targets too; a negative value is refused by validate; mse is fine."""
    regression = ["--set", "data.factory=user_code.py:regression_rows",
                  "--set", "model.factory=user_code.py:one_output_model"]
    for command in ("validate", "noise"):
        r = run(command, GOOD, *regression, "--set", "loss=cross_entropy",
                "--set", "probe.max_seconds=10")
        assert_clean_failure(r, 3, "float targets against one output per example",
                             "use loss: mse")
    assert run("validate", GOOD, *regression, "--set", "loss=mse").exit_code == 0
    # unsqueezed, (B, 1) against float (B,) or (B, 1): torch's "expected target dtype to
    # be Long", and a loss of 0 whatever the model (the README audit)
    from bsfind.workload import cross_entropy

    for target in (torch.randn(4), torch.randn(4, 1)):
        with pytest.raises(ValueError, match="float targets against one output"):
            cross_entropy(torch.randn(4, 1), target)
    assert cross_entropy(torch.randn(4, 3), torch.tensor([0, 1, 2, 0])) > 0
    # soft targets that are no probabilities, against (B, C) outputs: negative loss
    r = run("validate", GOOD, "--set", "data.factory=user_code.py:signed_soft_rows",
            "--set", "loss=cross_entropy")
    assert_clean_failure(r, 3, "loss 'cross_entropy' is -", "use loss: mse")


def test_a_data_file_beside_the_spec_but_read_from_elsewhere_gets_the_hint(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A factory reads kwargs' paths from the current folder; the spec's is elsewhere: the
    error said only "rows.csv not found." (numpy names no filename; a new user)."""
    import shutil

    import numpy as np

    job = tmp_path / "job"
    job.mkdir()
    shutil.copy(ASSETS / "user_code.py", job / "user_code.py")
    shutil.copy(ASSETS / "good.yaml", job / "good.yaml")
    rows = np.hstack([np.random.default_rng(0).normal(size=(32, 8)), np.zeros((32, 1))])
    np.savetxt(job / "rows.csv", rows, delimiter=",")
    monkeypatch.chdir(tmp_path)
    r = run("validate", "job/good.yaml", "--set", "data.factory=user_code.py:rows_from_file",
            "--set", "data.kwargs={path: rows.csv}")
    assert_clean_failure(r, 3, "rows.csv not found", f"rows.csv is in the spec's folder ({job})",
                         "Path(__file__).parent")
    monkeypatch.chdir(job)
    assert run("validate", "good.yaml", "--set", "data.factory=user_code.py:rows_from_file",
               "--set", "data.kwargs={path: rows.csv}").exit_code == 0
    # a folder beside the spec, listed from elsewhere (ImageFolder, os.listdir): the hint
    (job / "rows").mkdir()
    shutil.copy(job / "rows.csv", job / "rows" / "part0.csv")
    monkeypatch.chdir(tmp_path)
    r = run("validate", "job/good.yaml", "--set", "data.factory=user_code.py:rows_in_folder",
            "--set", "data.kwargs={root: rows}")
    assert_clean_failure(r, 3, f"rows is in the spec's folder ({job})")
    monkeypatch.chdir(job)
    # a name too long to be a path is the user's error still, not an internal one (a review)
    r = run("validate", "good.yaml", "--set", "data.factory=user_code.py:rows_from_file",
            "--set", f"data.kwargs={{path: {'a' * 300}.csv}}")
    assert_clean_failure(r, 3, "raised FileNotFoundError")


def test_ids_past_the_embedding_are_named() -> None:
    """torch says only "index out of range in self" (a trial's vocabulary of 64 under
    byte ids up to 127)."""
    from bsfind.errors import UserCodeError
    from bsfind.workload import Workload

    ids = torch.randint(0, 128, (16, 8))
    ids[0, 0] = 127
    model = torch.nn.Sequential(torch.nn.Embedding(64, 4), torch.nn.Flatten(),
                                torch.nn.Linear(32, 2))
    job = Workload.from_objects(model, torch.utils.data.TensorDataset(ids, ids[:, 0] % 2),
                                torch.nn.functional.cross_entropy)
    with pytest.raises(UserCodeError) as info:
        job.loss(torch.arange(4))
    assert info.value.message.startswith("model 'Sequential' raised IndexError in forward")
    assert info.value.hint.endswith(
        "the inputs' largest id is 127, past every Embedding's rows (the largest has 64: ids "
        "0–63): is the vocabulary as large as the data's?")
    # an IndexError of a smaller table (positions past n_positions) names no vocabulary
    class Positions(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.wte, self.wpe = torch.nn.Embedding(200, 4), torch.nn.Embedding(4, 4)
            self.head = torch.nn.Linear(4, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head((self.wte(x) + self.wpe(torch.arange(x.shape[1]))).mean(1))

    job = Workload.from_objects(Positions(), torch.utils.data.TensorDataset(ids, ids[:, 0] % 2),
                                torch.nn.functional.cross_entropy)
    with pytest.raises(UserCodeError) as info:
        job.loss(torch.arange(4))
    assert "IndexError" in info.value.message and "largest id" not in (info.value.hint or "")


def test_a_stream_is_named_as_one_with_the_way_to_a_dataset() -> None:
    """A trial: a finite IterableDataset with __len__ passed the dataset check (torch's
    Dataset defines a __getitem__ that raises) and failed at item 0 with
    NotImplementedError; an infinite one was "a InfiniteStream", with no hint."""
    import itertools

    from torch import nn

    from bsfind import measure_noise_scale
    from bsfind.errors import UserCodeError

    class Finite(torch.utils.data.IterableDataset):
        def __iter__(self):  # type: ignore[no-untyped-def]
            return ((torch.randn(4), torch.tensor(0)) for _ in range(64))

        def __len__(self) -> int:
            return 64

    class InfiniteStream(torch.utils.data.IterableDataset):
        def __iter__(self):  # type: ignore[no-untyped-def]
            return ((torch.randn(4), torch.tensor(0)) for _ in itertools.count())

    model = nn.Linear(4, 2)
    loss = torch.nn.functional.cross_entropy
    for stream, article in ((Finite(), "a Finite"), (InfiniteStream(), "an InfiniteStream")):
        with pytest.raises(UserCodeError) as caught:
            measure_noise_scale(model, stream, loss, batch_size=8)
        assert f"the dataset is {article}, not a map-style Dataset" in caught.value.message
        assert "but streams its examples" in caught.value.message
        assert caught.value.hint is not None and "itertools.islice" in caught.value.hint
    kept = list(itertools.islice(iter(InfiniteStream()), 256))  # the hint's way, as it says
    assert measure_noise_scale(model, kept, loss, batch_size=8, max_seconds=30).b_simple > 0

    class Indexed(Finite):  # a stream that indexes too is a dataset (a review)
        def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
            return kept[i]

    assert measure_noise_scale(model, Indexed(), loss, batch_size=8, max_seconds=30).b_simple > 0
