"""Is this process one rank of a data-parallel launch (torchrun and the like)?

Read from the launcher's environment, without importing torch, so that the CLI
can decide how to start (and answer ``--help``) before torch loads. A process
group the caller already initialised counts too, but only if torch.distributed
is already imported: then asking costs nothing.
"""

from __future__ import annotations

import os
import sys
from typing import Any

# Set to "all" to keep the stdout/stderr of ranks other than 0 (debugging).
RANK_OUTPUT_ENV = "BSFIND_RANK_OUTPUT"


def env_int(name: str) -> int | None:
    try:
        return int(os.environ[name])
    except (KeyError, ValueError):
        return None


def _initialised_group() -> Any | None:
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        return dist
    return None


def requested() -> bool:
    """True when this process is one rank of a multi-process data-parallel launch."""
    dist = _initialised_group()
    if dist is not None:
        return bool(dist.get_world_size() > 1)
    world = env_int("WORLD_SIZE")
    return world is not None and world > 1 and env_int("RANK") is not None


def world_size() -> int:
    """How many ranks the launch has (1 outside a distributed launch)."""
    if not requested():
        return 1
    dist = _initialised_group()
    return int(dist.get_world_size()) if dist is not None else env_int("WORLD_SIZE") or 1


def rank() -> int:
    """This process's global rank (0 outside a distributed launch)."""
    dist = _initialised_group()
    if dist is not None:
        return int(dist.get_rank())
    return env_int("RANK") or 0


def is_secondary_rank() -> bool:
    """True on every rank but 0 of a distributed launch: it must stay silent."""
    return requested() and rank() != 0


_JOINED = [False]


def mark_joined() -> None:
    """This rank has joined the process group: from here its errors reach rank 0, which
    prints every rank's (bsfind.distributed)."""
    _JOINED[0] = True


def joined() -> bool:
    """Whether this rank joined the process group (:func:`mark_joined`)."""
    return _JOINED[0]
