"""Datasets of dict items (Hugging Face style): the target under "labels" or "label",
the other keys passed to the model as keyword arguments, on every path that runs it.

    .venv/bin/python -m pytest tests/test_dict_items.py
"""

from __future__ import annotations

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
    with pytest.raises(UserCodeError, match="dict items need the target under 'labels' or "
                                            "'label'; dataset\\[0\\] has 'features', 'extra'"):
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
                             forward=job.forward) == 2 * (2 * 2 * 4 * 3)
