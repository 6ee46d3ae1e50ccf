"""Factories the GPU check (scripts/gpu_check.py) names in its specs by file path.

    --set data.factory=scripts/gpu_check_factories.py:digits_like    # no scikit-learn
    --set model.factory=scripts/gpu_check_factories.py:mlp_oom_above  # --dry-run's OOM

- :func:`digits_like` stands in for ``bsfind.data:digits`` where scikit-learn is
  missing (the GPU machine has none and cannot install it): ``bsfind.data.synthetic``
  clusters in the digits' shape, taking the same kwargs, so a config keeps its model.
- :func:`mlp_oom_above` is ``bsfind.models.mlp`` that runs out of memory above a
  batch size, so that ``--dry-run`` exercises the out-of-memory paths on a CPU.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import TensorDataset

from bsfind.data import synthetic
from bsfind.models import mlp

# scikit-learn's digits: 1,797 images of 8x8 pixels, 10 classes.
DIGITS_N, DIGITS_SIDE, DIGITS_CLASSES = 1797, 8, 10


def digits_like(image: bool = False, seed: int = 0) -> TensorDataset:
    """Gaussian clusters shaped like ``bsfind.data.digits(image)``: 64 features or (1, 8, 8).

    Not the digits: B_simple and the advice differ from the digits' own.
    """
    x, y = synthetic(n=DIGITS_N, features=DIGITS_SIDE**2, classes=DIGITS_CLASSES,
                     seed=seed).tensors
    if image:
        x = x.view(-1, 1, DIGITS_SIDE, DIGITS_SIDE)
    return TensorDataset(x, y)


class OomAbove(nn.Module):
    """``inner``, raising ``torch.OutOfMemoryError`` for a batch of more than ``limit``."""

    def __init__(self, inner: nn.Module, limit: int) -> None:
        super().__init__()
        self.inner = inner
        self.limit = limit

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] > self.limit:
            raise torch.OutOfMemoryError(
                f"out of memory (simulated by gpu_check --dry-run: batch {x.shape[0]} > "
                f"{self.limit})")
        return self.inner(x)


def mlp_oom_above(limit: int, in_features: int = 64, hidden: int = 128, depth: int = 2,
                  classes: int = 10) -> nn.Module:
    """``bsfind.models.mlp`` that is out of memory above ``limit`` examples."""
    return OomAbove(mlp(in_features, hidden, depth, classes), limit)
