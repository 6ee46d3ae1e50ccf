"""Every random seed bsfind uses, derived from ``probe.seed`` in this one place.

Each stream has a name and its own offset, so that two phases never share
random numbers and a change to one phase never moves another's. The offsets
are part of the results' reproducibility: changing one changes the numbers a
spec gives for the same seed.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

# Rank r of a data-parallel launch draws from seed + r·RANK_STRIDE: independent
# streams per rank, and rank 0 draws what a single process would.
RANK_STRIDE = 1_000_003
# Repeat r of the branched runs (a second data order at the same rung) draws from
# branch(step) + r·BRANCH_REPEAT_STRIDE.
BRANCH_REPEAT_STRIDE = 100_003
# torch's global random state, which dropout (and any draw of the user's code) takes
# from, is seeded per phase from that phase's seed plus this offset (not the seed itself:
# its own generator already draws the phase's examples from it). Left as each fresh
# process found it, one spec and seed read B_simple 7.3, 8.8 and 24.9 in three runs with
# dropout 0.1 (a trial).
GLOBAL_STATE_OFFSET = 500_009


@dataclass(frozen=True)
class Seeds:
    """The named seed streams of one run, from the spec's ``probe.seed``."""

    base: int

    @property
    def weights(self) -> int:
        """Initial weights: torch's generator while the model factory runs."""
        return self.base

    @property
    def training_order(self) -> int:
        """The data order of training along the probe points (warm-up)."""
        return self.base + 1

    @property
    def hardware(self) -> int:
        """The examples of the memory and step-time measurements."""
        return self.base + 5

    def probe(self, step: int) -> int:
        """The noise probe's sampling at training step ``step``: the same weights get
        the same sampling however they were reached."""
        return self.base + 1000 + step

    def curvature(self, step: int) -> int:
        """The curvature (B_noise) probe's sampling at training step ``step``."""
        return self.base + 77 + step

    def branch(self, step: int, repeat: int = 0) -> int:
        """The data order of the branched runs started at training step ``step`` (every
        rung the same, so that the rungs differ in batch size and learning rate only);
        ``repeat`` > 0: the further data orders averaged at each rung."""
        return self.base + 2000 + step + BRANCH_REPEAT_STRIDE * repeat

    @property
    def holdout_split(self) -> int:
        """Which examples the evidence scripts hold out."""
        return self.base + 4242

    @property
    def evaluation_subset(self) -> int:
        """The fixed subset the evidence scripts and branches evaluate the loss on."""
        return self.base + 12345


def for_rank(seed: int, rank: int) -> int:
    """The seed of rank ``rank``'s own stream (rank 0 keeps ``seed``)."""
    return seed + RANK_STRIDE * rank


@contextmanager
def global_random(seed: int, device: torch.device) -> Iterator[None]:
    """torch's global random state seeded from phase seed ``seed`` (and the rank, under
    torchrun) inside, so that dropout's masks are the same in every run of a spec; the
    caller's state is put back after (the CPU's and ``device``'s)."""
    dist = torch.distributed
    rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
    devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(for_rank(seed + GLOBAL_STATE_OFFSET, rank))
        yield
