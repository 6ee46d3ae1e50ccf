"""The small problem the tracker's tests train on, and its exact noise scale.

A 16-32-4 MLP on 2,048 generated examples (4 Gaussian clusters): B_simple ≈ 32 at
its seeded initial weights, so a few hundred steps of 64 examples pin it to a few
percent. The exact value comes from every example's gradient (tests/exact.py).
"""

from __future__ import annotations

import functools
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from bsfind import data, models
from bsfind.workload import Workload
from tests.conftest import ROOT
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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def two_ranks(script: Path, *args: str, timeout: float = 120, **env: str
              ) -> list[tuple[int, str, str]]:
    """Run ``script`` as ranks 0 and 1 of a gloo launch (the torch.distributed environment
    set by hand); returns each rank's (exit code, stdout, stderr).

    The free port is found by binding port 0 and closing it, so another process on this
    shared machine can take it before rank 0 does: such a launch is retried on a new port.
    """
    for _ in range(3):
        ranks = _launch_two(script, args, timeout, env)
        if not any("address already in use" in err.lower() for _, _, err in ranks):
            break
    return ranks


def _launch_two(script: Path, args: tuple[str, ...], timeout: float, env: dict[str, str]
                ) -> list[tuple[int, str, str]]:
    base = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    base.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), WORLD_SIZE="2",
                OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), **env)
    procs = [subprocess.Popen([sys.executable, str(script), *args], cwd=ROOT, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              env={**base, "RANK": str(r), "LOCAL_RANK": str(r)})
             for r in range(2)]
    try:
        outs = [p.communicate(timeout=timeout) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    return [(p.returncode, out, err) for p, (out, err) in zip(procs, outs, strict=True)]


def log_counts(path: Path) -> list[tuple[int, int]]:
    """(step, examples) of every record in a tracker log."""
    import json

    return [(r["step"], r["examples"]) for r in map(json.loads, path.read_text().splitlines())]


def assert_resumed_as_one_run(tracker: Any, resumed: Path, whole: Path, steps: int,
                              batch: int) -> None:
    """A run resumed from a checkpoint counted on from it and its log reads as the
    uninterrupted run's: ``steps`` steps of ``batch`` examples, each recorded once."""
    assert tracker is not None and (tracker.step, tracker.examples) == (steps, steps * batch)
    assert log_counts(resumed) == log_counts(whole) == [
        (s, batch * (s + 1)) for s in range(steps)]
