"""The device for tests that can run off the CPU too: $BSFIND_TEST_DEVICE (default cpu).

    BSFIND_TEST_DEVICE=cuda python3 -m pytest tests/noise/test_per_example.py

scripts/gpu_check.sh runs it so. Unset (or "cpu"), nothing changes: :func:`on_device`
returns its arguments as they are. On CUDA, TF32 is switched off for matmuls and cuDNN
convolutions: the tests compare with exact values at float32 tolerances, and cuDNN
convolutions use TF32 by default (about 1e-3 relative error; PyTorch docs, "TensorFloat-32
(TF32) on Ampere (and later) devices").
"""

from __future__ import annotations

import os
from typing import Any

import torch

DEVICE_ENV = "BSFIND_TEST_DEVICE"
DEVICE = torch.device(os.environ.get(DEVICE_ENV) or "cpu")


def _ieee_float32() -> None:
    """Full float32 matmuls and convolutions on CUDA, through whichever API this torch has."""
    matmul = torch.backends.cuda.matmul
    conv = getattr(torch.backends.cudnn, "conv", None)
    if hasattr(matmul, "fp32_precision") and conv is not None:  # torch >= 2.9
        matmul.fp32_precision = "ieee"
        conv.fp32_precision = "ieee"
    else:
        matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False


if DEVICE.type == "cuda":
    _ieee_float32()


def on_device(*objs: Any) -> tuple[Any, ...]:
    """Modules and tensors moved to :data:`DEVICE` (None stays None); on the CPU, unchanged."""
    if DEVICE.type == "cpu":
        return objs
    return tuple(None if o is None else o.to(DEVICE) for o in objs)
