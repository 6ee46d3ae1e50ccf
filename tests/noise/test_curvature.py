"""B_noise against tr(HΣ)/(GᵀHG) formed exactly from the full Hessian and Σ."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.func import functional_call
from torch.nn.attention import SDPBackend, sdpa_kernel

from bsfind.budget import Deadline
from bsfind.data import synthetic
from bsfind.noise.curvature import CurvatureProbe
from bsfind.workload import Workload, cross_entropy
from tests.exact import per_example_grads


def _small_job() -> Workload:
    torch.manual_seed(0)
    ds = synthetic(n=512, features=8, classes=3, noise=2.0)
    model = nn.Sequential(nn.Linear(8, 6), nn.Tanh(), nn.Linear(6, 3))  # 75 parameters
    return Workload.from_objects(model, ds, cross_entropy)


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
    with sdpa_kernel([SDPBackend.MATH]):  # the only CPU attention kernel with a 2nd derivative
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
    res = CurvatureProbe(job, batch_size=64, seed=0, target_rel_error=0.05).run(
        Deadline.after(60))
    assert res.b_noise is not None and res.rounds >= 10
    assert res.b_noise == pytest.approx(exact, rel=0.15)
    assert res.ci95.low <= res.b_noise <= res.ci95.high
    assert res.b_noise == pytest.approx(res.trace_h_sigma / res.gthg)


def test_curvature_probe_leaves_weights_and_grads_alone() -> None:
    job = _small_job()
    before = [p.detach().clone() for p in job.model.parameters()]
    CurvatureProbe(job, batch_size=64, seed=1).run(Deadline.after(1))
    for a, p in zip(before, job.model.parameters(), strict=True):
        assert torch.equal(a, p) and p.grad is None


def test_b_noise_through_attention_matches_the_exact_hessian() -> None:
    """Hessian-vector products through scaled_dot_product_attention (a causal
    transformer small enough for its full Hessian): the probe's B_noise against
    tr(HΣ)/GᵀHG formed exactly."""
    from bsfind.models import TinyTransformer

    torch.manual_seed(1)  # initial weights where GᵀHG > 0 (exact B_noise 19.2)
    model = TinyTransformer(vocab=8, context=4, d_model=4, heads=1, layers=1)  # 340 params
    x = torch.randint(8, (256, 4))
    y = x.clone()  # copy the token: learnable through attention and the residual path
    job = Workload.from_objects(model, torch.utils.data.TensorDataset(x, y), cross_entropy)
    exact = _exact_b_noise(job)
    assert exact > 0
    res = CurvatureProbe(job, batch_size=64, seed=0, target_rel_error=0.05).run(
        Deadline.after(60))
    assert res.b_noise is not None and res.rounds >= 10
    assert res.b_noise == pytest.approx(exact, rel=0.2)
