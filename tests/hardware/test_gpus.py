"""The GPU table and what-if predictions for a GPU that is not present.

    .venv/bin/python -m pytest tests/hardware/test_gpus.py -q
"""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bsfind.hardware import gpus
from bsfind.hardware.gpus import (
    DEFAULT_MFU,
    GPU_ALIASES,
    GPUS,
    PER_STEP_OVERHEAD_S,
    flops_per_example,
    get_gpu,
    predict_memory_on,
    predict_timing,
)
from bsfind.results import MemoryModel

REQUIRED = ("a100-40gb", "a100-80gb", "h100-80gb", "h100-pcie", "h200", "l4", "l40s", "a10g",
            "t4", "v100-16gb", "v100-32gb", "rtx-4090")


def test_required_gpus_present() -> None:
    assert set(REQUIRED) <= set(GPUS)


@pytest.mark.parametrize("name", sorted(GPUS))
def test_entry_is_sane(name: str) -> None:
    g = GPUS[name]
    assert g.name == name and g.description
    for value in (g.fp32_flops, g.tf32_flops, g.bf16_flops, g.fp16_flops, g.memory_bytes,
                  g.memory_bandwidth, g.price_per_hour):
        assert value > 0 and math.isfinite(value)
    assert g.bf16_flops >= g.fp32_flops
    assert g.fp16_flops >= g.fp32_flops
    assert g.tf32_flops >= g.fp32_flops
    assert 1e12 <= g.fp32_flops <= 1e15  # TFLOP/s range, not a unit slip
    assert 8 * 2**30 <= g.memory_bytes <= 256 * 2**30
    assert 1e11 <= g.memory_bandwidth <= 1e13
    assert g.price_per_hour < 50
    assert g.spec_source and g.price_source and "indicative" in g.price_source


def test_relative_order() -> None:
    assert GPUS["h100-80gb"].bf16_flops > GPUS["a100-80gb"].bf16_flops > GPUS["t4"].fp16_flops
    assert GPUS["h200"].memory_bytes > GPUS["h100-80gb"].memory_bytes
    assert GPUS["a100-80gb"].memory_bytes == 2 * GPUS["a100-40gb"].memory_bytes


@pytest.mark.parametrize("alias, target", sorted(GPU_ALIASES.items()))
def test_aliases_resolve(alias: str, target: str) -> None:
    assert target in GPUS
    assert get_gpu(alias) is GPUS[target]


@pytest.mark.parametrize(
    "spelling, target",
    [
        ("H100", "h100-80gb"),
        ("h100_80gb", "h100-80gb"),
        ("NVIDIA H100 80GB HBM3", "h100-80gb"),  # NVML's name
        ("NVIDIA H100 PCIe", "h100-pcie"),
        ("NVIDIA A100-SXM4-40GB", "a100-40gb"),
        ("NVIDIA A100-SXM4-80GB", "a100-80gb"),
        ("Tesla T4", "t4"),
        ("Tesla V100-SXM2-32GB", "v100-32gb"),
        ("NVIDIA GeForce RTX 4090", "rtx-4090"),
        ("NVIDIA A10G", "a10g"),
        ("NVIDIA L40S", "l40s"),
        ("  L4 ", "l4"),
        ("NVIDIA H200", "h200"),
    ],
)
def test_spellings(spelling: str, target: str) -> None:
    assert get_gpu(spelling).name == target


def test_unknown_gpu_lists_known_names() -> None:
    with pytest.raises(KeyError) as info:
        get_gpu("b300")
    text = str(info.value)
    assert "b300" in text and all(name in text for name in REQUIRED)


def test_peak_flops_precisions() -> None:
    h100 = GPUS["h100-80gb"]
    assert h100.peak_flops("fp32") == h100.fp32_flops
    assert h100.peak_flops("bfloat16") == h100.bf16_flops
    assert h100.peak_flops("FP16") == h100.fp16_flops
    assert h100.peak_flops("tf32") == h100.tf32_flops
    with pytest.raises(ValueError, match="unknown precision"):
        h100.peak_flops("fp8")


def test_predict_timing() -> None:
    f = 1e9
    curve = predict_timing(f, "a100-80gb", "bf16")
    assert curve.source == "predicted"
    assert curve.points == () and math.isnan(curve.r2)
    assert curve.t0 == PER_STEP_OVERHEAD_S
    assert curve.per_example == pytest.approx(f / (312e12 * DEFAULT_MFU))
    slower = predict_timing(f, GPUS["a100-80gb"], "fp32", utilization=0.5, fixed_overhead_s=0.0)
    assert slower.per_example == pytest.approx(f / (19.5e12 * 0.5)) and slower.t0 == 0.0
    assert slower.seconds(1000) == pytest.approx(1000 * f / (19.5e12 * 0.5))
    with pytest.raises(ValueError):
        predict_timing(f, "t4", utilization=0.0)
    with pytest.raises(KeyError):
        predict_timing(f, "nope")


def test_predict_memory_on() -> None:
    counted = MemoryModel(fixed_bytes=2 * 2**30, bytes_per_example=2**20, max_batch_size=10,
                          limit_bytes=3 * 2**30, source="predicted")
    mm = predict_memory_on("h100", counted, memory_fraction=0.9)
    limit = int(80 * 2**30 * 0.9)
    assert mm.source == "predicted" and not mm.verified
    assert mm.limit_bytes == limit
    assert (mm.fixed_bytes, mm.bytes_per_example) == (counted.fixed_bytes, 2**20)
    assert mm.max_batch_size == (limit - 2 * 2**30) // 2**20
    tight = predict_memory_on(GPUS["t4"], counted, memory_fraction=0.1)
    assert tight.max_batch_size == 0
    with pytest.raises(ValueError):
        predict_memory_on("t4", counted, memory_fraction=1.5)


def linear_batch(requires_grad: bool) -> Any:
    def make(b: int) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.randn(b, 64, requires_grad=requires_grad), torch.randn(b, 10)

    return make


def test_flops_per_example_linear_inside_a_network() -> None:
    # A layer whose input needs a gradient: forward 2·64·10, weight grad 2·64·10,
    # input grad 2·64·10 per example: 3·2·64·10.
    lin = nn.Linear(64, 10)
    assert flops_per_example(lin, linear_batch(True), F.mse_loss) == 3 * 2 * 64 * 10
    assert all(p.grad is None for p in lin.parameters())  # no side effects
    lin.weight.grad = torch.ones_like(lin.weight)
    flops_per_example(lin, linear_batch(True), F.mse_loss)
    assert torch.equal(lin.weight.grad, torch.ones_like(lin.weight)) and lin.bias.grad is None


def test_flops_per_example_first_layer() -> None:
    # As the first layer (input without grad) backward skips the input gradient.
    lin = nn.Linear(64, 10)
    assert flops_per_example(lin, linear_batch(False), F.mse_loss) == 2 * 2 * 64 * 10


def test_flops_per_example_mlp() -> None:
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))

    def make(b: int) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.randn(b, 64), torch.randint(0, 10, (b,))

    expected = 2 * 2 * 64 * 32 + 3 * 2 * 32 * 10  # first layer: no input gradient
    assert flops_per_example(model, make, F.cross_entropy) == expected


def test_prediction_pipeline() -> None:
    # flops -> timing on an absent GPU: the step time grows with B and is labelled predicted
    f = flops_per_example(nn.Linear(64, 10), linear_batch(True), F.mse_loss)
    curve = gpus.predict_timing(f, "l4", "bf16")
    assert curve.source == "predicted"
    assert curve.seconds(1024) > curve.seconds(1) > 0
