"""Factories for tests/test_distributed.py: a model that misbehaves on one rank only.

The rank is read from the RANK variable that torchrun (or any launcher) sets.
"""

import os

import torch
from torch import nn


def _rank() -> int:
    return int(os.environ.get("RANK", "0"))


class FakeOOM(nn.Module):
    """A small MLP whose forward raises a CUDA-style out-of-memory error on one
    rank when the batch has more than ``oom_above`` examples (no GPU needed)."""

    def __init__(self, oom_rank: int, oom_above: int) -> None:
        super().__init__()
        self.oom_rank = oom_rank
        self.oom_above = oom_above
        self.net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _rank() == self.oom_rank and x.shape[0] > self.oom_above:
            raise RuntimeError(
                f"CUDA out of memory. Tried to allocate 2.00 GiB (fake: rank {_rank()}, "
                f"batch {x.shape[0]} > {self.oom_above})"
            )
        return self.net(x)


def model(oom_rank: int = -1, oom_above: int = 0, fail_on_rank: int = -1) -> nn.Module:
    """``fail_on_rank``: the factory raises on that rank; ``oom_rank``: see FakeOOM."""
    if _rank() == fail_on_rank:
        raise ValueError(f"boom on rank {fail_on_rank}")
    return FakeOOM(oom_rank, oom_above)
