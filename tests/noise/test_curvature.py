"""B_noise against tr(HΣ)/(GᵀHG) formed exactly from the full Hessian and Σ."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.func import functional_call

from bsfind.data import synthetic
from bsfind.noise.curvature import CurvatureProbe
from bsfind.noise.probe import Deadline
from bsfind.spec import spec_from_dict
from bsfind.workload import Workload, cross_entropy
from tests.exact import per_example_grads


def _small_job() -> Workload:
    torch.manual_seed(0)
    ds = synthetic(n=512, features=8, classes=3, noise=2.0)
    model = nn.Sequential(nn.Linear(8, 6), nn.Tanh(), nn.Linear(6, 3))  # 75 parameters
    spec = spec_from_dict({"model": {"factory": "m:f"}, "data": {"factory": "d:f"},
                           "optimizer": {"lr": 0.1, "batch_size": 64}})
    return Workload.from_objects(model, ds, cross_entropy, spec=spec)


def _exact_b_noise(job: Workload) -> float:
    model = job.model
    names = [k for k, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    x, y = job.dataset.tensors
    n = len(x)

    def unflat(v: torch.Tensor) -> dict[str, torch.Tensor]:
        out, i = {}, 0
        for k, s in zip(names, shapes, strict=True):
            out[k] = v[i : i + s.numel()].view(s)
            i += s.numel()
        return out

    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    hess = torch.autograd.functional.hessian(
        lambda v: cross_entropy(functional_call(model, unflat(v), (x,)), y), flat).double()
    g = per_example_grads(job, torch.arange(n))
    per = torch.cat([g[k].reshape(n, -1) for k in names], 1).double()
    mean = per.mean(0)
    centred = per - mean
    sigma = centred.T @ centred / n  # population covariance (sampling with replacement)
    return float((hess * sigma).sum() / (mean @ hess @ mean))


def test_b_noise_within_15_percent_of_exact() -> None:
    job = _small_job()
    exact = _exact_b_noise(job)
    assert exact > 0
    value, ci, rounds, _ = CurvatureProbe(job, batch_size=64, seed=0,
                                          target_rel_error=0.05).run(Deadline.after(60))
    assert value is not None and rounds >= 10
    assert value == pytest.approx(exact, rel=0.15)
    assert ci.low <= value <= ci.high


def test_curvature_probe_leaves_weights_and_grads_alone() -> None:
    job = _small_job()
    before = [p.detach().clone() for p in job.model.parameters()]
    CurvatureProbe(job, batch_size=64, seed=1).run(Deadline.after(1))
    for a, p in zip(before, job.model.parameters(), strict=True):
        assert torch.equal(a, p) and p.grad is None


def test_curvature_runs_through_attention() -> None:
    """Double backward through scaled_dot_product_attention (math kernel on CPU)."""
    from bsfind.spec import load_spec
    from bsfind.workload import build
    from tests.conftest import CONFIGS

    job = build(load_spec(CONFIGS / "text-transformer.yaml",
                          ["data.kwargs.max_chars=12000", "model.kwargs.d_model=16",
                           "model.kwargs.layers=1"]))
    value, ci, rounds, _ = CurvatureProbe(job, batch_size=16, seed=0).run(Deadline.after(2))
    assert rounds >= 1 and ci.low >= 0
