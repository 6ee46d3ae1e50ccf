"""The small problem the tracker's tests train on, and its exact noise scale.

A 16-32-4 MLP on 2,048 generated examples (4 Gaussian clusters): B_simple ≈ 32 at
its seeded initial weights, so a few hundred steps of 64 examples pin it to a few
percent. The exact value comes from every example's gradient (tests/exact.py).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from bsfind import data, models
from bsfind.workload import Workload
from tests.exact import exact_noise

REL = 0.10  # the acceptance tolerance against the exact value


def problem() -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs (2048, 16), class targets (2048,))."""
    x, y = data.synthetic(n=2048, features=16, classes=4, noise=2.0).tensors
    return x, y


def model() -> nn.Module:
    """The MLP at its seeded initial weights (the same weights on every call)."""
    torch.manual_seed(0)
    return models.mlp(16, 32, 1, 4)


@functools.cache
def exact_b_simple() -> float:
    """tr(Σ)/|G|² of :func:`model` over :func:`problem` (about a second, computed once)."""
    x, y = problem()
    job = Workload.from_objects(model(), torch.utils.data.TensorDataset(x, y), F.cross_entropy)
    return exact_noise(job).b_simple
