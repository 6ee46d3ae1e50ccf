"""bsfind: a batch-size advisor for PyTorch training.

    from bsfind import load_spec, recommend
    report = recommend(load_spec("configs/digits-mlp.yaml"))

    tracker = bsfind.track(model)      # in a training loop: tracker.update() after backward

The public names below load on first use (PEP 562), so ``import bsfind`` and
``bsfind --version`` do not import torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# name -> the module that defines it
_EXPORTS = {
    "branch": "bsfind.api",
    "measure": "bsfind.api",
    "measure_noise_scale": "bsfind.api",
    "noise_scale_at": "bsfind.api",
    "recommend": "bsfind.api",
    "Report": "bsfind.report",
    "to_dict": "bsfind.report",
    "BranchResult": "bsfind.results",
    "NoiseEstimate": "bsfind.results",
    "Recommendation": "bsfind.results",
    "load_spec": "bsfind.spec",
    "spec_from_dict": "bsfind.spec",
    "read_log": "bsfind.tracker",
    "track": "bsfind.tracker",
}

__all__ = ["__version__", *sorted(_EXPORTS)]

if TYPE_CHECKING:
    from bsfind.api import branch as branch
    from bsfind.api import measure as measure
    from bsfind.api import measure_noise_scale as measure_noise_scale
    from bsfind.api import noise_scale_at as noise_scale_at
    from bsfind.api import recommend as recommend
    from bsfind.report import Report as Report
    from bsfind.report import to_dict as to_dict
    from bsfind.results import BranchResult as BranchResult
    from bsfind.results import NoiseEstimate as NoiseEstimate
    from bsfind.results import Recommendation as Recommendation
    from bsfind.spec import load_spec as load_spec
    from bsfind.spec import spec_from_dict as spec_from_dict
    from bsfind.tracker import read_log as read_log
    from bsfind.tracker import track as track


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'bsfind' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})
