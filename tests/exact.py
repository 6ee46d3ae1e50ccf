"""Exact noise-scale quantities from every example's gradient (torch.func).

The reference the estimators are tested against: G = mean_i ∇L_i over the
whole dataset and tr(Σ) = mean_i |∇L_i|² − |G|² (the population covariance,
matching the probe's sampling with replacement).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.func import functional_call, grad, vmap

from bsfind.workload import Workload


@dataclass(frozen=True)
class Exact:
    g2: float
    trace: float
    mean_grad: dict[str, torch.Tensor]

    @property
    def b_simple(self) -> float:
        return self.trace / self.g2


def per_example_grads(job: Workload, idx: torch.Tensor) -> dict[str, torch.Tensor]:
    """{name: (len(idx), *param.shape)} gradients of each example's own loss."""
    model = job.model
    params = {k: v.detach() for k, v in model.named_parameters() if v.requires_grad}
    buffers = {k: v.detach() for k, v in model.named_buffers()}

    def loss_one(p: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        out = functional_call(model, {**p, **buffers}, (x.unsqueeze(0),))
        return job.loss_fn(out, y.unsqueeze(0))

    x, y = job.batch(idx)
    return vmap(grad(loss_one), in_dims=(None, 0, 0))(params, x, y)


def exact_noise(job: Workload, chunk: int = 256) -> Exact:
    n = len(job)
    total: dict[str, torch.Tensor] = {}
    sq = torch.zeros((), dtype=torch.float64)
    for start in range(0, n, chunk):
        idx = torch.arange(start, min(n, start + chunk))
        g = per_example_grads(job, idx)
        for k, v in g.items():
            v = v.double()
            total[k] = total.get(k, 0) + v.sum(0)
            sq += v.pow(2).reshape(len(idx), -1).sum()
    mean = {k: v / n for k, v in total.items()}
    g2 = float(sum(v.pow(2).sum() for v in mean.values()))
    trace = float(sq) / n - g2
    return Exact(g2, trace, mean)
