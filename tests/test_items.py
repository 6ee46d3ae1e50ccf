"""Items as Hugging Face datasets give them: dicts with the target under "labels" or
"label", the other keys passed to the model as keyword arguments, on every path that
runs it; and ``data.collate``, a user's function making the batch (padding).

    .venv/bin/python -m pytest tests/test_items.py
"""

from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F

from bsfind.errors import UserCodeError
from bsfind.spec import load_spec
from bsfind.workload import Workload, build
from tests.conftest import ROOT

GOOD = str(ROOT / "tests" / "assets" / "good.yaml")
DICT = ["model.factory=user_code.py:keyword_model", "data.factory=user_code.py:dict_rows"]


def job_of(*overrides: str) -> Workload:
    return build(load_spec(GOOD, [*DICT, *overrides]))


def test_a_batch_of_dict_items_splits_off_the_target() -> None:
    job = job_of()
    x, y = job.batch(torch.tensor([3, 5, 7]))
    assert isinstance(x, dict) and sorted(x) == ["extra", "features"]
    assert x["features"].shape == (3, 4) and x["extra"].shape == (3, 4)
    rows = [job.dataset[i] for i in (3, 5, 7)]
    assert torch.equal(y, torch.tensor([int(r["labels"]) for r in rows]))
    assert torch.equal(x["features"], torch.stack([r["features"] for r in rows]))


@pytest.mark.parametrize("key", ["labels", "label"])
def test_the_loss_calls_the_model_with_keywords(key: str) -> None:
    """cross_entropy on model(**inputs); ``loss: model`` on model(**inputs, labels=y)."""
    idx = torch.arange(16)
    job = job_of(f"data.kwargs={{key: {key}}}")
    x, y = job.batch(idx)
    torch.testing.assert_close(job.loss(idx), F.cross_entropy(job.model(**x), y))
    own = job_of(f"data.kwargs={{key: {key}}}", "loss=model")
    torch.testing.assert_close(own.loss(idx), own.model(**x, labels=y)["loss"])


def test_dict_items_without_a_target_are_a_clear_error() -> None:
    with pytest.raises(UserCodeError, match="item 0 of the dataset of data.factory .*: a dict "
                       "needs the target under 'labels' or 'label'; it has 'features', 'extra'"):
        job_of("data.kwargs={target: false}")


def test_noise_on_dict_items_is_per_example_and_exact() -> None:
    """B_simple through keyword inputs within 10% of the exact value from every example's
    own gradient, one by one."""
    from bsfind.api import noise_scale_at
    from bsfind.noise.probe import ProbeOptions

    job = job_of("loss=model")
    est = noise_scale_at(job, ProbeOptions(method="per-example", batch_size=32,
                                           target_rel_error=0.05), max_seconds=60)
    assert est.method == "per-example"
    params = [p for p in job.model.parameters() if p.requires_grad]
    grads = [torch.cat([g.reshape(-1) for g in torch.autograd.grad(
        job.loss(torch.tensor([i])), params)]).double() for i in range(len(job))]
    stack = torch.stack(grads)
    g2 = float(stack.mean(0).pow(2).sum())
    exact = (float(stack.pow(2).sum(1).mean()) - g2) / g2
    assert est.b_simple == pytest.approx(exact, rel=0.10), (est.b_simple, exact)


@pytest.mark.parametrize("loss", ["model", "cross_entropy"])
def test_a_gpu_prediction_runs_the_model_as_the_loss_does(loss: str) -> None:
    """The predicted memory line and FLOPs call the model with keyword inputs (and labels
    with ``loss: model``), as training does. Two Linear(4, 3) on inputs that need no
    gradient: 2·2·4·3 FLOPs forward and as many for the weight gradients, per example.
    Before, ``loss: model`` took the logits as the loss and failed in backward."""
    from bsfind.hardware.measure import HardwareOptions, predict_on_gpu

    job = job_of(f"loss={loss}")
    mem, timing, _ = predict_on_gpu(job, None, "h100-80gb", precision="fp32",
                                    opts=HardwareOptions(lr=0.1))
    assert timing.source == "predicted" and mem.max_batch_size > 10**6
    from bsfind.hardware.gpus import flops_per_example
    from bsfind.hardware.measure import batch_maker

    assert flops_per_example(job.model, batch_maker(job, 0), job.loss_fn,
                             loss_of=job.fp32_loss) == 2 * (2 * 2 * 4 * 3)


PADDED = ["model.factory=user_code.py:bag_of_words", "data.factory=user_code.py:sentences",
          "data.collate=user_code.py:pad"]


def test_a_collate_function_pads_items_of_different_lengths() -> None:
    job = build(load_spec(GOOD, PADDED))
    idx = torch.tensor([0, 1, 6])  # lengths 3, 4 and 9
    x, y = job.batch(idx)
    assert sorted(x) == ["attention_mask", "input_ids"] and x["input_ids"].shape == (3, 9)
    assert x["attention_mask"].sum(1).tolist() == [3, 4, 9]
    assert y.tolist() == [int(job.dataset[i]["input_ids"][0]) % 3 for i in (0, 1, 6)]
    torch.testing.assert_close(job.loss(idx), F.cross_entropy(job.model(**x), y))
    # a collate returning (inputs, targets): the model gets the inputs positionally
    pairs = build(load_spec(GOOD, [*PADDED, "data.collate=user_code.py:pad_pairs"]))
    ids, y2 = pairs.batch(idx)
    assert torch.equal(ids, x["input_ids"]) and torch.equal(y2, y)


def test_noise_through_a_collate_function_is_exact() -> None:
    """B_simple on padded batches within 10% of the exact value from every example's own
    gradient (one example alone needs no padding; the mask keeps pads out of it)."""
    from bsfind.api import noise_scale_at
    from bsfind.noise.probe import ProbeOptions

    job = build(load_spec(GOOD, PADDED))
    est = noise_scale_at(job, ProbeOptions(method="per-example", batch_size=16,
                                           target_rel_error=0.05), max_seconds=60)
    assert est.method == "per-example"
    params = [p for p in job.model.parameters() if p.requires_grad]
    stack = torch.stack([torch.cat([g.reshape(-1) for g in torch.autograd.grad(
        job.loss(torch.tensor([i])), params)]).double() for i in range(len(job))])
    g2 = float(stack.mean(0).pow(2).sum())
    exact = (float(stack.pow(2).sum(1).mean()) - g2) / g2
    assert est.b_simple == pytest.approx(exact, rel=0.10), (est.b_simple, exact)


@pytest.mark.parametrize("gpu", [None, "h100-80gb"])
def test_a_model_error_while_counting_memory_is_the_users(gpu: str | None) -> None:
    """The memory count (batches 2 and 8) and the FLOP count run the user's model: its
    error is a UserCodeError naming the model (exit 3), not an internal error (exit 70,
    "report the traceback"), as a new user's trial found."""
    from bsfind.hardware.measure import HardwareOptions, memory_model, predict_on_gpu

    job = build(load_spec(GOOD, ["model.factory=user_code.py:raises_at_batch"]))
    opts = HardwareOptions(lr=0.1)
    with pytest.raises(UserCodeError, match="raises_at_batch' raised RuntimeError in forward"):
        if gpu is None:
            memory_model(job, lambda b: None, opts)
        else:
            predict_on_gpu(job, None, gpu, precision="fp32", opts=opts)


def test_the_python_api_takes_dict_items_a_collate_and_a_loss_by_name() -> None:
    """measure_noise_scale on padded dict items with the model's own loss by name: the
    same estimate as the spec's path at the same weights and seed."""
    from bsfind import measure_noise_scale
    from tests.assets import user_code

    torch.manual_seed(0)
    model = user_code.keyword_model()
    rows = user_code.dict_rows()
    est = measure_noise_scale(model, rows, "model", batch_size=32, seed=3, max_seconds=30)
    from bsfind.api import noise_scale_at
    from bsfind.noise.probe import ProbeOptions
    from bsfind.workload import model_loss

    job = Workload.from_objects(model, rows, model_loss)
    same = noise_scale_at(job, ProbeOptions(batch_size=32), seed=3, max_seconds=30)
    assert est.b_simple == same.b_simple
    padded = measure_noise_scale(user_code.bag_of_words(), user_code.sentences(),
                                 F.cross_entropy, batch_size=16, max_seconds=30,
                                 collate_fn=user_code.pad)
    assert padded.b_simple is not None and padded.method == "per-example"
    with pytest.raises(ValueError, match="loss_fn 'hinge'"):
        measure_noise_scale(model, rows, "hinge")
    with pytest.raises(ValueError, match="did you mean 'cross_entropy'"):
        measure_noise_scale(model, rows, "cross_entopy")


def test_dict_inputs_go_as_keywords_when_the_forward_names_them() -> None:
    """A collate's (dict, targets) pair under a custom loss: the forward names every key,
    so model(**inputs) (a new user's BERT got the dict positionally: "'dict' object has
    no attribute 'size'"). A forward taking one dict still gets it whole."""
    idx = torch.arange(6)
    job = build(load_spec(GOOD, [*PADDED, "data.collate=user_code.py:pad_dict_pairs"]))
    x, y = job.batch(idx)
    torch.testing.assert_close(job.loss(idx), F.cross_entropy(job.model(**x), y))
    whole = build(load_spec(GOOD, ["model.factory=user_code.py:one_dict_model",
                                   "data.factory=user_code.py:dict_pairs"]))
    x, y = whole.batch(idx)
    torch.testing.assert_close(whole.loss(idx), F.cross_entropy(whole.model(x), y))


def test_a_token_mean_over_padded_examples_is_warned_about() -> None:
    """loss: model (a mean over the batch's tokens) on labels padded with -100 to
    different lengths: each example weighs by its length, which the estimators do not
    assume (a trial's padded GPT-2 read 23% low, silently). Equal lengths, or a loss of
    one's own, are not flagged."""
    from bsfind import wording
    from bsfind.workload import uneven_token_weights

    lm = ["model.factory=user_code.py:tiny_lm", "data.factory=user_code.py:sentences",
          "data.collate=user_code.py:pad_lm"]
    assert uneven_token_weights(build(load_spec(GOOD, [*lm, "loss=model"])))
    assert not uneven_token_weights(build(load_spec(GOOD, [*lm, "loss=model",
                                                           "data.kwargs={lengths: 1}"])))
    assert not uneven_token_weights(build(load_spec(GOOD, PADDED)))
    # a masked language model's labels: -100 scattered by random masks, not padding
    from bsfind.workload import model_loss

    class Masked(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return 40

        def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
            ids = torch.arange(1, 13) + i
            keep = torch.zeros(12, dtype=torch.bool)
            keep[[i % 12, (3 * i + 1) % 12, (5 * i + 7) % 12]] = True
            return {"input_ids": ids, "labels": torch.where(keep, ids, -100)}

    mlm = Workload.from_objects(torch.nn.Linear(1, 1), Masked(), model_loss)
    assert not uneven_token_weights(mlm)

    class Turns(torch.utils.data.Dataset):  # two answer blocks per row, of varying length
        def __len__(self) -> int:
            return 40

        def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
            ids = torch.arange(1, 41)
            keep = torch.zeros(40, dtype=torch.bool)
            keep[2:4 + i % 9] = True
            keep[20:22 + (3 * i) % 13] = True
            return {"input_ids": ids, "labels": torch.where(keep, ids, -100)}

    assert uneven_token_weights(Workload.from_objects(torch.nn.Linear(1, 1), Turns(),
                                                      model_loss))
    # the built-in cross_entropy flattens (batch, token) targets: the same token mean (a
    # trial's padded character model read 11% low, silently); class targets are not
    from bsfind.workload import cross_entropy

    ids = torch.arange(40 * 12).reshape(40, 12) % 50
    padded = torch.where(torch.arange(12) < 4 + torch.arange(40)[:, None] % 8, ids, -100)
    lm_model = torch.nn.Sequential(torch.nn.Embedding(50, 8), torch.nn.Linear(8, 50))
    data = torch.utils.data.TensorDataset(ids, padded)
    assert uneven_token_weights(Workload.from_objects(lm_model, data, cross_entropy))
    assert not uneven_token_weights(Workload.from_objects(
        torch.nn.Linear(12, 3), torch.utils.data.TensorDataset(ids.float(), ids[:, 0] % 3),
        cross_entropy))
    from typer.testing import CliRunner

    from bsfind.cli import app

    r = CliRunner().invoke(app, ["noise", GOOD, "--json", *[a for o in [
        *lm, "loss=model", "probe.at_steps=[0]", "probe.max_seconds=5"] for a in ("--set", o)]])
    assert r.exit_code == 0, r.output
    import json

    assert wording.token_mean(True) in json.loads(r.stdout)["warnings"]
    assert "the model's own loss (loss: model) averages over a batch's tokens" in \
        wording.token_mean(True)
    # validate says so too, before any probe (a trial: only noise and recommend did)
    r = CliRunner().invoke(app, ["validate", GOOD, "--json", *[a for o in [
        *lm, "loss=model"] for a in ("--set", o)]])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["warnings"] == [wording.token_mean(True)]
    r = CliRunner().invoke(app, ["validate", GOOD, *[a for o in [*lm, "loss=model"]
                                                     for a in ("--set", o)]])
    assert "warning: the model's own loss (loss: model) averages" in r.output


def test_the_python_api_fits_its_threads_to_the_machines_load(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """measure_noise_scale beside a busy process runs on the cores left free, as the CLI
    does (a new user's probe took 7 s on 2 threads against 1.7 s on 1, same result).
    The load is faked; the threads are restored afterwards."""
    from bsfind import measure_noise_scale
    from bsfind.hardware import measure
    from bsfind.noise import probe
    from tests.assets import user_code

    busy = measure.LadderSetup(1, reduced=True, cpu_clock=True, share=0.5)
    monkeypatch.setattr(measure, "setup_for_load", lambda use: busy)
    seen: list[int] = []
    original = probe.NoiseProbe.run

    def run(self, deadline):  # type: ignore[no-untyped-def]
        seen.append(torch.get_num_threads())
        return original(self, deadline)

    monkeypatch.setattr(probe.NoiseProbe, "run", run)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        measure_noise_scale(user_code.good_model(), user_code.digits_like(), F.cross_entropy,
                            batch_size=16, max_seconds=10)
        assert seen == [1] and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_one_key_named_like_the_forwards_parameter_still_goes_whole() -> None:
    """forward(self, x) over items ({"x": ...}, y) takes the dict whole, as before: one
    key matching a parameter's name is no sign of keyword inputs (a review found the
    model given model(x=tensor))."""

    class Whole(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = torch.nn.Linear(4, 3)

        def forward(self, x: dict[str, torch.Tensor]) -> torch.Tensor:
            return self.lin(x["x"])

    class Items(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return 12

        def __getitem__(self, i: int):  # type: ignore[no-untyped-def]
            return {"x": torch.full((4,), float(i))}, i % 3

    job = Workload.from_objects(Whole(), Items(), F.cross_entropy)
    idx = torch.arange(6)
    x, y = job.batch(idx)
    torch.testing.assert_close(job.loss(idx), F.cross_entropy(job.model(x), y))


def test_the_python_api_leaves_the_model_as_it_found_it() -> None:
    """measure_noise_scale on a caller's model: BatchNorm's running statistics and the
    parameters' .grad are put back (a trial's call moved num_batches_tracked 0 -> 432 and
    wiped .grad), gradients are on under the caller's no_grad, and the CLI's warnings come
    as Python warnings."""
    import warnings

    from torch import nn

    from bsfind import measure_noise_scale

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 3))
    data = torch.utils.data.TensorDataset(torch.randn(64, 8), torch.randint(0, 3, (64,)))
    for p in model.parameters():
        p.grad = torch.full_like(p, 0.5)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with warnings.catch_warnings(record=True) as caught, torch.no_grad():
        warnings.simplefilter("always")
        est = measure_noise_scale(model, data, F.cross_entropy, batch_size=128, max_seconds=10)
    assert est.b_simple is not None and est.method == "microbatch"  # BatchNorm mixes examples
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert after["1.num_batches_tracked"] == 0
    assert all(torch.equal(p.grad, torch.full_like(p, 0.5)) for p in model.parameters())
    assert [str(w.message) for w in caught if "bsfind:" in str(w.message)] == [
        "bsfind: the model has BatchNorm in training mode: its noise scale depends on the "
        "BatchNorm batch, and was measured with the one it trains with (128 per device)",
        "bsfind: the dataset has only 64 examples, fewer than the baseline batch 128: the "
        "probe samples with replacement, so the estimate is still sound"]
    assert est.b_small == 128  # one BatchNorm batch, as the CLI (a trial: 128 // 8)
    # under the caller's inference_mode the .grad put back is a normal tensor: the next
    # backward works (a review: an inference tensor refused the in-place update)
    import numpy as np

    with torch.inference_mode():
        measure_noise_scale(model, data, F.cross_entropy, batch_size=np.int64(16),
                            max_seconds=5)
    assert not any(p.grad.is_inference() for p in model.parameters())
    F.cross_entropy(model(data.tensors[0][:8]), data.tensors[1][:8]).backward()


def test_the_python_api_puts_back_a_buffer_the_model_regrew() -> None:
    """A cache buffer re-registered in another shape during the probe (rotary-style, grown
    for a larger batch) is put back as it was (a review: copy_ raised, or broadcast)."""
    from torch import nn

    from bsfind import measure_noise_scale

    class Growing(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(4, 2)
            self.register_buffer("cache", torch.zeros(2, 3), persistent=False)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if x.shape[0] > self.cache.shape[0]:
                self.register_buffer("cache", torch.ones(x.shape[0], 3), persistent=False)
            return self.lin(x)

    torch.manual_seed(0)
    model = Growing()
    data = torch.utils.data.TensorDataset(torch.randn(32, 4), torch.randint(0, 2, (32,)))
    measure_noise_scale(model, data, F.cross_entropy, batch_size=8, max_seconds=5)
    assert torch.equal(model.cache, torch.zeros(2, 3))


@pytest.mark.parametrize(("arguments", "message"), [
    ({"method": "micro-batch"}, "method 'micro-batch': did you mean 'microbatch'?"),
    ({"batch_size": 0}, "batch_size: expected an integer >= 1, got 0"),
    ({"max_seconds": -1}, "max_seconds: expected a finite number > 0, got -1"),
    ({"target_rel_error": 2}, "target_rel_error: expected a number in (0, 1), got 2"),
])
def test_the_python_api_checks_its_arguments(arguments: dict, message: str) -> None:
    """The spec's checks of the probe section, for measure_noise_scale's own arguments
    (a trial's method="micro-batch" ran per-example silently)."""
    from bsfind import measure_noise_scale
    from tests.assets import user_code

    with pytest.raises(ValueError, match=re.escape(message)):
        measure_noise_scale(user_code.keyword_model(), user_code.dict_rows(), "model",
                            **arguments)


def test_a_dataloader_passed_as_the_dataset_gets_the_hint() -> None:
    from bsfind import measure_noise_scale

    data = torch.utils.data.TensorDataset(torch.randn(8, 4), torch.randint(0, 2, (8,)))
    with pytest.raises(UserCodeError, match="the dataset is a DataLoader") as info:
        measure_noise_scale(torch.nn.Linear(4, 2), torch.utils.data.DataLoader(data),
                            F.cross_entropy)
    assert "pass the DataLoader's .dataset" in (info.value.hint or "")


def test_the_python_api_warns_of_a_token_mean_over_padded_examples() -> None:
    """The CLI's padding warning, from measure_noise_scale too (a trial's padded GPT-2
    through the README's own API call got none)."""
    import warnings

    from bsfind import measure_noise_scale
    from tests.assets import user_code

    torch.manual_seed(0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        measure_noise_scale(user_code.tiny_lm(), user_code.sentences(), "model",
                            batch_size=16, max_seconds=10, collate_fn=user_code.pad_lm)
    from bsfind import wording

    assert f"bsfind: {wording.token_mean(True)}" in [str(w.message) for w in caught]


def test_loss_model_reads_a_tuple_by_position_only() -> None:
    """A Hugging Face output without a loss (GPT2Model, no head) gave its hidden states at
    [0], and a (logits, loss) tuple its logits: both read as a non-scalar 'loss'."""
    from transformers.modeling_outputs import BaseModelOutput, CausalLMOutput

    from bsfind.workload import model_loss

    scalar, hidden = torch.tensor(1.5), torch.zeros(4, 3, 2)
    assert model_loss(CausalLMOutput(loss=scalar), None) is scalar
    assert model_loss({"loss": scalar, "logits": hidden}, None) is scalar
    assert model_loss((scalar, hidden), None) is scalar
    with pytest.raises(TypeError, match="returned BaseModelOutput without a loss"):
        model_loss(BaseModelOutput(last_hidden_state=hidden), None)
    with pytest.raises(TypeError, match="returned Tensor without a loss"):
        model_loss(hidden, None)
    with pytest.raises(TypeError, match=re.escape(
            "returned a tuple whose first element has shape (4, 3, 2), not a loss")):
        model_loss((hidden, scalar), None)
    with pytest.raises(TypeError, match=re.escape("first element has shape (1, 1)")):
        model_loss((torch.zeros(1, 1), scalar), None)  # one output at batch 1: not a loss


def test_the_model_is_measured_in_the_mode_the_factory_or_caller_left_it() -> None:
    """A BatchNorm layer frozen with .eval() under a model in training mode stays so in
    the CLI (train() on the whole model read a trial's fine-tuned ResNet ~10x low, through
    micro-batches of a BatchNorm it never trains); a whole model in eval mode (as
    from_pretrained returns it) trains. The API measures the mode it is given, and
    warns about eval mode."""
    import warnings

    from bsfind import measure_noise_scale
    from bsfind.pipeline import batchnorm_batch
    from tests.assets import user_code

    good = ROOT / "tests" / "assets" / "good.yaml"
    job = build(load_spec(good, ["model.factory=user_code.py:bn_model",
                                 "model.kwargs={frozen: true}"]))
    frozen = job.model
    assert frozen.training and not frozen[1].training
    from bsfind import wording
    from bsfind.pipeline import item_warnings

    assert item_warnings(job) == [wording.frozen_norms(("1",))]
    assert wording.frozen_norms(("1",)).startswith(
        "1 BatchNorm layer ('1') stayed in eval mode, as the factory left it, with its "
        "parameters frozen")
    assert batchnorm_batch(frozen, 16) is None
    # a wrapped backbone in eval mode (from_pretrained's) trains, dropout included, and
    # so does a BatchNorm in eval mode whose parameters still learn (a review)
    from torch import nn

    from bsfind.workload import _train_mode

    backbone = nn.Sequential(nn.Linear(8, 8), nn.Dropout(0.1), nn.BatchNorm1d(8)).eval()
    wrapped = nn.Sequential(backbone, nn.Linear(8, 3))
    assert _train_mode(wrapped) == ()
    assert all(m.training for m in wrapped.modules())
    frozen_bn = nn.Sequential(nn.Linear(8, 8), nn.BatchNorm1d(8), nn.Dropout(0.1)).eval()
    frozen_bn[1].requires_grad_(False)
    assert _train_mode(frozen_bn) == ("1",)
    assert frozen_bn.training and frozen_bn[2].training and not frozen_bn[1].training
    whole = build(load_spec(good, ["model.factory=user_code.py:bn_model",
                                   "model.kwargs={evaluated: true}"])).model
    assert all(m.training for m in whole.modules())
    assert batchnorm_batch(whole, 16) == 16
    model = user_code.bn_model(evaluated=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        est = measure_noise_scale(model, user_code.digits_like(), F.cross_entropy,
                                  batch_size=16, max_seconds=5)
    assert est.method == "per-example" and not model.training
    assert any("the model is in eval mode" in str(w.message) for w in caught)


def test_a_batchnorm_model_trained_at_batch_1_is_not_said_to_be_measured_as_trained() -> None:
    """The probe's BatchNorm batch is 2 at the least: a trial's ResNet at batch 1 was told
    its noise scale "was measured with the one it trains with (2 per device)"."""
    from bsfind import wording
    from bsfind.noise.probe import NoiseProbe, ProbeOptions
    from tests.assets import user_code

    job = Workload.from_objects(user_code.bn_model(), user_code.digits_like(),
                                F.cross_entropy)
    probe = NoiseProbe(job, ProbeOptions(method="microbatch", batch_size=1, norm_batch=2))
    assert "one BatchNorm batch of 2, the fewest BatchNorm normalises (it trains with 1)" \
        in probe.reason
    assert wording.batchnorm(2, advice=False, below=True) == (
        "the model has BatchNorm in training mode: its noise scale depends on the BatchNorm "
        "batch, and was measured with batches of 2, the fewest BatchNorm normalises (it "
        "trains with 1 per device)")


def test_a_loss_that_adds_up_the_batch_is_warned_about() -> None:
    """reduction='sum' (a trial's spec: accepted silently, and its learning rates advised as
    a mean loss's): the batch repeated twice doubles it, where a mean, or a sum over each
    example's outputs averaged over the batch, stays. The check's forwards in training
    mode leave BatchNorm's running statistics as they were."""
    from torch import nn

    from bsfind.pipeline import item_warnings, summed_over_batch

    gen = torch.Generator().manual_seed(0)
    ds = torch.utils.data.TensorDataset(torch.randn(64, 6, generator=gen),
                                        torch.randint(0, 3, (64,), generator=gen))
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Dropout(0.2),
                        nn.Linear(16, 3)).train()
    before = [b.clone() for b in net.buffers()]
    summed = Workload.from_objects(
        net, ds, lambda out, t: F.cross_entropy(out, t, reduction="sum"))
    ratio = summed_over_batch(summed)
    assert ratio == pytest.approx(2.0, rel=1e-5)  # eval mode for the check: no dropout
    assert all(m.training for m in net.modules())  # and the modes put back
    net[3].eval()  # a module the caller left in eval mode stays so
    summed_over_batch(summed)
    assert [m.training for m in net] == [True, True, True, False, True]
    net[3].train()
    assert all(torch.equal(a, b) for a, b in zip(before, net.buffers(), strict=True))
    assert [w for w in item_warnings(summed) if "reduction='sum'" in w] == [
        "the loss of a batch repeated twice is 2.00x the batch's: it adds up the "
        "examples (reduction='sum'?) where bsfind expects their mean. The noise scale is the "
        "same either way, and so is an Adam-family step, but an SGD step grows with the "
        "batch, so SGD's learning rates measured and advised are not comparable across "
        "batch sizes; average over the batch (reduction='mean')"]
    assert summed_over_batch(Workload.from_objects(net, ds, F.cross_entropy)) is None

    def squares_summed_per_example(out: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return ((out - F.one_hot(t, 3)) ** 2).sum(1).mean()

    assert summed_over_batch(Workload.from_objects(net, ds, squares_summed_per_example)) is None

    def in_batch_contrastive(out: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        # every example against the batch's others (CLIP-style): repeating the batch adds
        # log k, and at a loss near 0.69 twice the batch reads doubled (a review)
        z = F.normalize(out, dim=1)
        logits = z @ z.T / 0.05
        return F.cross_entropy(logits, torch.arange(len(z)))

    contrastive = Workload.from_objects(net, ds, in_batch_contrastive)
    assert summed_over_batch(contrastive) is None
    assert not item_warnings(Workload.from_objects(net, ds, F.cross_entropy))


def test_the_python_api_keeps_the_rng_checks_arguments_and_warns_on_a_cut_probe() -> None:
    """A notebook user's trial: dropout in training mode moved the global RNG (every later
    mask and shuffle); a probe the budget stopped returned silently; a class given as the
    loss, a non-module model and a float seed failed with torch's own errors."""
    import warnings

    from torch import nn

    from bsfind import measure_noise_scale

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Dropout(0.3), nn.Linear(16, 3))
    data = torch.utils.data.TensorDataset(torch.randn(256, 8), torch.randint(0, 3, (256,)))
    before = torch.get_rng_state()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        est = measure_noise_scale(model, data, F.cross_entropy, batch_size=16,
                                  target_rel_error=1e-4, max_seconds=2)
    assert torch.equal(torch.get_rng_state(), before)
    assert est.stopped == "budget"
    assert [str(w.message) for w in caught if "max_seconds ran out" in str(w.message)] == [
        f"bsfind: max_seconds ran out before the interval reached ±0.01% (it is "
        f"±{est.rel_half_width * 100:.2g}%; stopped='budget'): raise max_seconds for a "
        "narrower one"]
    for kwargs, match in ((dict(loss_fn=nn.CrossEntropyLoss), "got the class CrossEntropyLoss"),
                          (dict(seed=1.5), "seed: expected an integer"),
                          (dict(model=lambda x: x), "model: expected a torch.nn.Module")):
        args: dict = {**dict(model=model, dataset=data, loss_fn=F.cross_entropy), **kwargs}
        with pytest.raises(ValueError, match=match):
            measure_noise_scale(args.pop("model"), args.pop("dataset"), args.pop("loss_fn"),
                                **args)


def test_ctrl_c_in_the_python_api_passes_except_exception_with_what_was_measured() -> None:
    """``Interrupted`` was an ``Exception``: a notebook loop guarded by ``except
    Exception`` swallowed Ctrl-C and went on to the next configuration. It is a
    ``KeyboardInterrupt`` now, carrying the rounds measured, the model as it was."""
    from torch import nn

    from bsfind import measure_noise_scale
    from bsfind.errors import Interrupted

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
    data = torch.utils.data.TensorDataset(torch.randn(256, 8), torch.randint(0, 3, (256,)))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    calls = 0

    def loss_then_ctrl_c(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        nonlocal calls
        calls += 1
        if calls > 40:  # the user's Ctrl-C, some rounds in
            raise KeyboardInterrupt
        return F.cross_entropy(out, y)

    tried = []
    with pytest.raises(Interrupted) as info:
        for seed in (0, 1):
            try:
                measure_noise_scale(model, data, loss_then_ctrl_c, batch_size=16,
                                    target_rel_error=1e-4, max_seconds=600, seed=seed)
            except Exception:  # noqa: BLE001 - the user's guard: Ctrl-C must pass it
                tried.append(seed)
    assert tried == [] and isinstance(info.value, KeyboardInterrupt)
    assert not isinstance(info.value, Exception)
    assert "interrupted during the noise probe" in str(info.value)
    partial = info.value.partial
    assert partial is not None and partial.stopped == "interrupted" and partial.b_simple > 0
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())
