from __future__ import annotations

from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ROOT / "configs"


@pytest.fixture(autouse=True)
def _threads() -> None:
    # Tests are timed on 2 cores; keep torch from oversubscribing them.
    torch.set_num_threads(2)


@pytest.fixture
def digits_mlp_spec():
    from bsfind.spec import load_spec

    return load_spec(CONFIGS / "digits-mlp.yaml")
