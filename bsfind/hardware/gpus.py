"""What-if planning for a GPU that is not present (a CI runner planning for the cluster).

    from bsfind.hardware import gpus
    gpu = gpus.get_gpu("h100")                          # -> GpuSpec for h100-80gb
    f = gpus.flops_per_example(model, make_batch, loss_fn)
    curve = gpus.predict_timing(f, gpu, "bf16")          # source="predicted"
    mem = gpus.predict_memory_on(gpu, predicted_memory, memory_fraction=0.9)

Step time on a GPU we do not have is predicted from the FLOPs one example
costs (``torch.utils.flop_counter`` over forward and backward), the GPU's
peak dense FLOP/s at the training precision, and an assumed utilisation
(:data:`DEFAULT_MFU`), plus a fixed per-step overhead
(:data:`PER_STEP_OVERHEAD_S`). Every such number is labelled "predicted".

The table's figures are dense (no structured sparsity) peaks from NVIDIA's
datasheets; memory is the datasheet capacity (NVIDIA's device-memory "GB"
are binary: an "80GB" card reports about 80 GiB, a little less once the
driver and the CUDA context take theirs, which ``memory_fraction`` absorbs).
Prices are indicative on-demand list prices of one named offer each, per GPU
and hour; they change often and differ several-fold between clouds, so a
user's own price (spec ``hardware.price_per_hour``) always wins.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from bsfind.hardware.memory import max_batch_for, preserved_state
from bsfind.results import MemoryModel, TimingCurve

TFLOPS = 1e12
GiB = 1 << 30
GBps = 1e9

# Model FLOPs utilisation assumed for a GPU we cannot measure: the share of
# peak dense FLOP/s a training step achieves. Well-tuned large-model training
# reports 30-50% (PaLM 540B: 46.2% MFU, Chowdhery et al. 2022, Table 3), and
# 0.4 sits in that range. Small models reach less per FLOP, but most of that
# loss is per-step overhead, which PER_STEP_OVERHEAD_S carries separately.
DEFAULT_MFU = 0.4

# Fixed cost of one eager-mode optimizer step, independent of the batch. An
# assumption, not a measurement: a small model's forward, backward and
# optimizer launch some 100-200 kernels at roughly 5-10 µs of Python dispatch
# plus CUDA launch each. Pass fixed_overhead_s, or measure t0 with
# time_ladder on any GPU you do have, to replace it.
PER_STEP_OVERHEAD_S = 1e-3

PRECISIONS = ("fp32", "tf32", "bf16", "fp16")
_PRECISION_ALIASES = {
    "float32": "fp32", "float": "fp32", "32": "fp32",
    "tensorfloat32": "tf32",
    "bfloat16": "bf16", "bf16-mixed": "bf16",
    "float16": "fp16", "half": "fp16", "16": "fp16", "16-mixed": "fp16",
}


@dataclass(frozen=True)
class GpuSpec:
    """Peak figures of one GPU model (dense, no sparsity) and an indicative price.

    ``tf32_flops`` equals ``fp32_flops`` on GPUs without TF32 (before Ampere),
    and ``bf16_flops`` equals ``fp32_flops`` on GPUs without bf16 tensor cores
    (T4, V100), where PyTorch runs bf16 at roughly fp32 speed. Note that
    PyTorch runs fp32 matmuls in full fp32 by default
    (``torch.backends.cuda.matmul.allow_tf32 = False``), so "fp32" uses
    ``fp32_flops``; ask for "tf32" when TF32 is enabled.
    """

    name: str
    description: str
    fp32_flops: float  # FLOP/s, non-tensor FP32
    tf32_flops: float  # FLOP/s, TF32 tensor core, dense
    bf16_flops: float  # FLOP/s, BF16 tensor core (FP32 accumulate), dense
    fp16_flops: float  # FLOP/s, FP16 tensor core (FP32 accumulate), dense
    memory_bytes: int
    memory_bandwidth: float  # bytes/s
    price_per_hour: float  # USD per GPU-hour, indicative (see price_source)
    spec_source: str
    price_source: str

    def peak_flops(self, precision: str) -> float:
        """Peak dense FLOP/s at ``precision`` ("fp32", "tf32", "bf16", "fp16")."""
        p = normalize_precision(precision)
        return float(getattr(self, f"{p}_flops"))


def normalize_precision(precision: str) -> str:
    """"bfloat16" -> "bf16", ...; ValueError for an unknown precision."""
    key = precision.strip().lower()
    key = _PRECISION_ALIASES.get(key, key)
    if key not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; known: {', '.join(PRECISIONS)}")
    return key


_A100_SHEET = "NVIDIA A100 Tensor Core GPU datasheet (2021), SXM column; dense = starred / 2"
_H100_SHEET = "NVIDIA H100 Tensor Core GPU datasheet (2023); dense = starred (sparse) / 2"
_AWS = "AWS EC2 on-demand, us-east-1, Linux, 2024 list price"

GPUS: dict[str, GpuSpec] = {
    g.name: g
    for g in (
        GpuSpec(
            name="a100-40gb",
            description="NVIDIA A100 40GB (SXM4)",
            fp32_flops=19.5 * TFLOPS,  # A100 datasheet: FP32 19.5 TFLOPS
            tf32_flops=156 * TFLOPS,  # A100 datasheet: TF32 156 (312*) TFLOPS
            bf16_flops=312 * TFLOPS,  # A100 datasheet: BF16 312 (624*) TFLOPS
            fp16_flops=312 * TFLOPS,  # A100 datasheet: FP16 312 (624*) TFLOPS
            memory_bytes=40 * GiB,  # A100 datasheet: 40GB HBM2
            memory_bandwidth=1555 * GBps,  # A100 datasheet: 1,555 GB/s
            price_per_hour=32.7726 / 8,  # p4d.24xlarge (8x A100 40GB): $32.7726/h
            spec_source=_A100_SHEET,
            price_source=f"{_AWS}: p4d.24xlarge $32.77/h / 8 GPUs (indicative)",
        ),
        GpuSpec(
            name="a100-80gb",
            description="NVIDIA A100 80GB (SXM4)",
            fp32_flops=19.5 * TFLOPS,  # A100 datasheet: FP32 19.5 TFLOPS
            tf32_flops=156 * TFLOPS,  # A100 datasheet: TF32 156 TFLOPS dense
            bf16_flops=312 * TFLOPS,  # A100 datasheet: BF16 312 TFLOPS dense
            fp16_flops=312 * TFLOPS,  # A100 datasheet: FP16 312 TFLOPS dense
            memory_bytes=80 * GiB,  # A100 datasheet: 80GB HBM2e
            memory_bandwidth=2039 * GBps,  # A100 datasheet: 2,039 GB/s (SXM)
            price_per_hour=40.9657 / 8,  # p4de.24xlarge (8x A100 80GB): $40.9657/h
            spec_source=_A100_SHEET,
            price_source=f"{_AWS}: p4de.24xlarge $40.97/h / 8 GPUs (indicative)",
        ),
        GpuSpec(
            name="h100-80gb",
            description="NVIDIA H100 80GB (SXM5)",
            fp32_flops=67 * TFLOPS,  # H100 datasheet, SXM: FP32 67 TFLOPS
            tf32_flops=494.7 * TFLOPS,  # H100 datasheet, SXM: TF32 989* TFLOPS / 2
            bf16_flops=989.4 * TFLOPS,  # H100 datasheet, SXM: BF16 1,979* TFLOPS / 2
            fp16_flops=989.4 * TFLOPS,  # H100 datasheet, SXM: FP16 1,979* TFLOPS / 2
            memory_bytes=80 * GiB,  # H100 datasheet, SXM: 80GB HBM3
            memory_bandwidth=3350 * GBps,  # H100 datasheet, SXM: 3.35 TB/s
            price_per_hour=98.32 / 8,  # p5.48xlarge (8x H100 SXM): $98.32/h
            spec_source=_H100_SHEET + ", SXM column",
            price_source=f"{_AWS}: p5.48xlarge $98.32/h / 8 GPUs (indicative; "
            "AWS has since cut P5 prices, specialist clouds charge 2-4x less)",
        ),
        GpuSpec(
            name="h100-pcie",
            description="NVIDIA H100 80GB PCIe",
            fp32_flops=51 * TFLOPS,  # H100 datasheet, PCIe: FP32 51 TFLOPS
            tf32_flops=378 * TFLOPS,  # H100 datasheet, PCIe: TF32 756* TFLOPS / 2
            bf16_flops=756 * TFLOPS,  # H100 datasheet, PCIe: BF16 1,513* TFLOPS / 2
            fp16_flops=756 * TFLOPS,  # H100 datasheet, PCIe: FP16 1,513* TFLOPS / 2
            memory_bytes=80 * GiB,  # H100 datasheet, PCIe: 80GB HBM2e
            memory_bandwidth=2000 * GBps,  # H100 datasheet, PCIe: 2 TB/s
            price_per_hour=2.49,  # Lambda on-demand 1x H100 PCIe: $2.49/h
            spec_source=_H100_SHEET + ", PCIe column",
            price_source="Lambda Cloud on-demand, 1x H100 PCIe, 2024: $2.49/h (indicative; "
            "the hyperscalers offer the SXM part, not PCIe)",
        ),
        GpuSpec(
            name="h200",
            description="NVIDIA H200 141GB (SXM)",
            fp32_flops=67 * TFLOPS,  # H200 datasheet, SXM: FP32 67 TFLOPS
            tf32_flops=494.7 * TFLOPS,  # H200 datasheet, SXM: TF32 989* TFLOPS / 2
            bf16_flops=989.4 * TFLOPS,  # H200 datasheet, SXM: BF16 1,979* TFLOPS / 2
            fp16_flops=989.4 * TFLOPS,  # H200 datasheet, SXM: FP16 1,979* TFLOPS / 2
            memory_bytes=141 * GiB,  # H200 datasheet: 141GB HBM3e
            memory_bandwidth=4800 * GBps,  # H200 datasheet: 4.8 TB/s
            price_per_hour=5.408,  # EC2 Capacity Blocks, p5e.48xlarge: $5.408/GPU-h
            spec_source="NVIDIA H200 Tensor Core GPU datasheet (2024), SXM column; "
            "dense = starred / 2",
            price_source="AWS EC2 Capacity Blocks for ML, p5e.48xlarge (8x H200), US East "
            "(Ohio), late 2024: effective $5.408 per accelerator-hour (indicative; a "
            "reservation rate, as AWS listed no on-demand H200 price then)",
        ),
        GpuSpec(
            name="l4",
            description="NVIDIA L4 24GB",
            fp32_flops=30.3 * TFLOPS,  # L4 datasheet: FP32 30.3 TFLOPS
            tf32_flops=60 * TFLOPS,  # L4 datasheet: TF32 120* TFLOPS / 2
            bf16_flops=121 * TFLOPS,  # L4 datasheet: BF16 242* TFLOPS / 2
            fp16_flops=121 * TFLOPS,  # L4 datasheet: FP16 242* TFLOPS / 2
            memory_bytes=24 * GiB,  # L4 datasheet: 24GB GDDR6
            memory_bandwidth=300 * GBps,  # L4 datasheet: 300 GB/s
            price_per_hour=0.8048,  # g6.xlarge (1x L4): $0.8048/h
            spec_source="NVIDIA L4 Tensor Core GPU datasheet (2023); dense = starred / 2",
            price_source=f"{_AWS}: g6.xlarge $0.80/h (indicative)",
        ),
        GpuSpec(
            name="l40s",
            description="NVIDIA L40S 48GB",
            fp32_flops=91.6 * TFLOPS,  # L40S datasheet: FP32 91.6 TFLOPS
            tf32_flops=183 * TFLOPS,  # L40S datasheet: TF32 366* TFLOPS / 2
            bf16_flops=366 * TFLOPS,  # L40S datasheet: BF16 733* TFLOPS / 2
            fp16_flops=366 * TFLOPS,  # L40S datasheet: FP16 733* TFLOPS / 2
            memory_bytes=48 * GiB,  # L40S datasheet: 48GB GDDR6
            memory_bandwidth=864 * GBps,  # L40S datasheet: 864 GB/s
            price_per_hour=1.861,  # g6e.xlarge (1x L40S): $1.861/h
            spec_source="NVIDIA L40S GPU datasheet (2023); dense = starred / 2",
            price_source=f"{_AWS}: g6e.xlarge $1.86/h (indicative)",
        ),
        GpuSpec(
            name="a10g",
            description="NVIDIA A10G 24GB (AWS variant of the A10)",
            fp32_flops=31.2 * TFLOPS,  # Baseten, "NVIDIA A10 vs A10G": FP32 31.2 TFLOPS
            tf32_flops=35 * TFLOPS,  # same comparison: TF32 tensor 35 TFLOPS
            bf16_flops=70 * TFLOPS,  # same comparison: BF16 tensor 70 TFLOPS
            fp16_flops=70 * TFLOPS,  # same comparison: FP16 tensor 70 TFLOPS
            memory_bytes=24 * GiB,  # AWS G5 documentation: 24 GB GDDR6
            memory_bandwidth=600 * GBps,  # same comparison: 600 GB/s (as the A10)
            price_per_hour=1.006,  # g5.xlarge (1x A10G): $1.006/h
            spec_source="NVIDIA publishes no A10G datasheet; figures from the A10 vs A10G "
            "spec comparison by Baseten (baseten.co/blog/nvidia-a10-vs-a10g-for-ml-model-"
            "inference); the A10G has fewer tensor FLOP/s than the A10's 125 TFLOPS",
            price_source=f"{_AWS}: g5.xlarge $1.006/h (indicative)",
        ),
        GpuSpec(
            name="t4",
            description="NVIDIA T4 16GB",
            fp32_flops=8.1 * TFLOPS,  # T4 datasheet: FP32 8.1 TFLOPS
            tf32_flops=8.1 * TFLOPS,  # Turing has no TF32: runs as FP32
            bf16_flops=8.1 * TFLOPS,  # Turing has no BF16 tensor cores: about FP32 speed
            fp16_flops=65 * TFLOPS,  # T4 datasheet: mixed precision (FP16/FP32) 65 TFLOPS
            memory_bytes=16 * GiB,  # T4 datasheet: 16 GB GDDR6
            memory_bandwidth=320 * GBps,  # T4 datasheet: 320+ GB/s
            price_per_hour=0.526,  # g4dn.xlarge (1x T4): $0.526/h
            spec_source="NVIDIA T4 Tensor Core GPU datasheet (2019)",
            price_source=f"{_AWS}: g4dn.xlarge $0.526/h (indicative)",
        ),
        GpuSpec(
            name="v100-16gb",
            description="NVIDIA V100 16GB (SXM2)",
            fp32_flops=15.7 * TFLOPS,  # V100 datasheet, SXM2: single precision 15.7 TFLOPS
            tf32_flops=15.7 * TFLOPS,  # Volta has no TF32: runs as FP32
            bf16_flops=15.7 * TFLOPS,  # Volta has no BF16 tensor cores: about FP32 speed
            fp16_flops=125 * TFLOPS,  # V100 datasheet, SXM2: tensor performance 125 TFLOPS
            memory_bytes=16 * GiB,  # V100 datasheet: 16 GB HBM2
            memory_bandwidth=900 * GBps,  # V100 datasheet: 900 GB/s
            price_per_hour=3.06,  # p3.2xlarge (1x V100 16GB): $3.06/h
            spec_source="NVIDIA Tesla V100 datasheet (2020), SXM2 column",
            price_source=f"{_AWS}: p3.2xlarge $3.06/h (indicative)",
        ),
        GpuSpec(
            name="v100-32gb",
            description="NVIDIA V100 32GB (SXM2)",
            fp32_flops=15.7 * TFLOPS,  # V100 datasheet, SXM2: single precision 15.7 TFLOPS
            tf32_flops=15.7 * TFLOPS,  # Volta has no TF32: runs as FP32
            bf16_flops=15.7 * TFLOPS,  # Volta has no BF16 tensor cores: about FP32 speed
            fp16_flops=125 * TFLOPS,  # V100 datasheet, SXM2: tensor performance 125 TFLOPS
            memory_bytes=32 * GiB,  # V100 datasheet: 32 GB HBM2
            memory_bandwidth=900 * GBps,  # V100 datasheet: 900 GB/s
            price_per_hour=31.212 / 8,  # p3dn.24xlarge (8x V100 32GB): $31.212/h
            spec_source="NVIDIA Tesla V100 datasheet (2020), SXM2 column",
            price_source=f"{_AWS}: p3dn.24xlarge $31.21/h / 8 GPUs (indicative)",
        ),
        GpuSpec(
            name="rtx-4090",
            description="NVIDIA GeForce RTX 4090 24GB",
            fp32_flops=82.6 * TFLOPS,  # Ada whitepaper, App. A: FP32 82.6 TFLOPS
            tf32_flops=82.6 * TFLOPS,  # Ada whitepaper: TF32 tensor 82.6 (165.2*) TFLOPS
            bf16_flops=165.2 * TFLOPS,  # Ada whitepaper: BF16, FP32 accumulate 165.2 dense
            fp16_flops=165.2 * TFLOPS,  # Ada whitepaper: FP16, FP32 accumulate 165.2 dense
            memory_bytes=24 * GiB,  # Ada whitepaper: 24 GB GDDR6X
            memory_bandwidth=1008 * GBps,  # Ada whitepaper: 1008 GB/s
            price_per_hour=0.69,  # RunPod Secure Cloud, 1x RTX 4090, 2024: ~$0.69/h
            spec_source="NVIDIA Ada Lovelace GPU architecture whitepaper (v2.1), Appendix A, "
            "GeForce RTX 4090 column (PyTorch accumulates fp16/bf16 in FP32)",
            price_source="RunPod Secure Cloud on-demand, 1x RTX 4090, 2024: about $0.69/h "
            "(indicative; no hyperscaler rents GeForce cards)",
        ),
    )
}

# Other spellings, including the names NVML reports, normalised by _key().
GPU_ALIASES: dict[str, str] = {
    "a100": "a100-80gb",
    "a100-40g": "a100-40gb",
    "a100-80g": "a100-80gb",
    "a100-sxm4-40gb": "a100-40gb",
    "a100-pcie-40gb": "a100-40gb",
    "a100-sxm4-80gb": "a100-80gb",
    "a100-80gb-pcie": "a100-80gb",
    "h100": "h100-80gb",
    "h100-sxm": "h100-80gb",
    "h100-sxm5": "h100-80gb",
    "h100-sxm5-80gb": "h100-80gb",
    "h100-80gb-hbm3": "h100-80gb",
    "h100-80gb-pcie": "h100-pcie",
    "h100-nvl": "h100-pcie",
    "h200-141gb": "h200",
    "h200-sxm": "h200",
    "l40-s": "l40s",
    "a10": "a10g",
    "t4-16gb": "t4",
    "v100": "v100-16gb",
    "v100-sxm2-16gb": "v100-16gb",
    "v100-pcie-16gb": "v100-16gb",
    "v100-sxm2-32gb": "v100-32gb",
    "v100-pcie-32gb": "v100-32gb",
    "4090": "rtx-4090",
    "rtx4090": "rtx-4090",
    "rtx-4090-24gb": "rtx-4090",
}


def _key(name: str) -> str:
    """'NVIDIA GeForce RTX 4090' -> 'rtx-4090', 'Tesla V100-SXM2-16GB' -> 'v100-sxm2-16gb'."""
    key = name.strip().lower().replace("_", "-").replace(" ", "-")
    while "--" in key:
        key = key.replace("--", "-")
    for prefix in ("nvidia-", "tesla-", "geforce-"):
        if key.startswith(prefix):
            key = key[len(prefix):]
    return key.strip("-")


def get_gpu(name: str) -> GpuSpec:
    """The table entry for ``name`` (any spelling in GPU_ALIASES or NVML's name).

    Raises:
        KeyError: unknown GPU; the message lists the known names.
    """
    key = _key(name)
    key = GPU_ALIASES.get(key, key)
    if key in GPUS:
        return GPUS[key]
    raise KeyError(
        f"unknown GPU {name!r}; known: {', '.join(GPUS)} "
        f"(also: {', '.join(sorted(GPU_ALIASES))})"
    )


# --------------------------------------------------------------------------- predictions


def _requires_grad_tensors(x: Any) -> list[torch.Tensor]:
    if isinstance(x, torch.Tensor):
        return [x] if x.requires_grad else []
    if isinstance(x, (list, tuple)):
        return [t for v in x for t in _requires_grad_tensors(v)]
    if isinstance(x, dict):
        return [t for v in x.values() for t in _requires_grad_tensors(v)]
    return []


def _step_flops(model: nn.Module, inputs: Any, targets: Any,
                loss_fn: Callable[[Any, Any], torch.Tensor],
                loss_of: Callable[[Any, Any], torch.Tensor] | None) -> int:
    params = [p for p in model.parameters() if p.requires_grad]
    wrt = params + _requires_grad_tensors(inputs)
    # backward(inputs=...) rather than autograd.grad: FlopCounterMode's module
    # hooks do not support autograd.grad on leaf inputs. The parameters'
    # gradients are put back afterwards.
    saved = [p.grad for p in params]
    try:
        with preserved_state(model), torch.enable_grad(), \
                FlopCounterMode(display=False) as counter:
            for p in params:
                p.grad = None
            loss = (loss_fn(model(inputs), targets) if loss_of is None
                    else loss_of(inputs, targets))
            if wrt:
                loss.backward(inputs=wrt)
    finally:
        for p, g in zip(params, saved, strict=True):
            p.grad = g
    return int(counter.get_total_flops())


def flops_per_example(
    model: nn.Module,
    make_batch: Callable[[int], tuple[Any, Any]],
    loss_fn: Callable[[Any, Any], torch.Tensor],
    sizes: tuple[int, int] = (2, 4),
    loss_of: Callable[[Any, Any], torch.Tensor] | None = None,
) -> float:
    """FLOPs one example adds to a training step (forward + backward).

    Counted by ``torch.utils.flop_counter.FlopCounterMode`` (matmuls,
    convolutions, attention; elementwise ops count 0) at two batch sizes;
    the slope removes any per-batch constant. The backward computes what
    ``loss.backward()`` would: gradients of the trainable parameters and of
    inputs that require grad, nothing else. So a Linear(d_in, d_out) costs
    2·d_in·d_out forward + 2·d_in·d_out for its weight gradient + (when its
    input needs a gradient, as for every layer but the first)
    2·d_in·d_out for the input gradient: the familiar 3 × forward inside a
    network, 2 × forward for a first layer. The model's parameter gradients,
    buffers and the RNG are left untouched. ``loss_of(inputs, targets) -> loss``
    replaces ``loss_fn(model(inputs), targets)`` (a workload's call convention).
    """
    small, big = sizes
    if small == big or min(sizes) < 1:
        raise ValueError(f"sizes must be two distinct positive batch sizes, got {sizes}")
    counts = []
    for b in (small, big):
        x, y = make_batch(b)
        counts.append(_step_flops(model, x, y, loss_fn, loss_of))
    return max(0.0, (counts[1] - counts[0]) / (big - small))


def predict_timing(
    flops_per_example: float,
    gpu: GpuSpec | str,
    precision: str = "fp32",
    utilization: float = DEFAULT_MFU,
    fixed_overhead_s: float = PER_STEP_OVERHEAD_S,
) -> TimingCurve:
    """t(B) = fixed_overhead_s + B·flops_per_example / (peak FLOP/s · utilization).

    The curve is ``source="predicted"``, has no measured points and an r2 of
    NaN (it is not a fit). It assumes a compute-bound step; memory-bound
    models (few FLOPs per byte moved) run slower than this.
    """
    spec = get_gpu(gpu) if isinstance(gpu, str) else gpu
    if not 0 < utilization <= 1:
        raise ValueError(f"utilization must be in (0, 1], got {utilization}")
    if fixed_overhead_s < 0 or flops_per_example < 0:
        raise ValueError("fixed_overhead_s and flops_per_example must be >= 0")
    per_example = flops_per_example / (spec.peak_flops(precision) * utilization)
    return TimingCurve(
        points=(),
        t0=float(fixed_overhead_s),
        per_example=per_example,
        r2=math.nan,
        source="predicted",
    )


def predict_memory_on(
    gpu: GpuSpec | str, memory_model_predicted: MemoryModel, memory_fraction: float
) -> MemoryModel:
    """The predicted memory line against another GPU's capacity (``source="predicted"``).

    The line (fixed bytes, bytes per example) is the one counted here, at the
    precision it was counted in (fp32 on CPU): conservative for bf16/fp16
    training, whose activations take about half as many bytes. The budget is
    ``memory_fraction`` × the GPU's memory.
    """
    spec = get_gpu(gpu) if isinstance(gpu, str) else gpu
    if not 0 < memory_fraction <= 1:
        raise ValueError(f"memory_fraction must be in (0, 1], got {memory_fraction}")
    m = memory_model_predicted
    limit = int(spec.memory_bytes * memory_fraction)
    return MemoryModel(
        fixed_bytes=m.fixed_bytes,
        bytes_per_example=m.bytes_per_example,
        max_batch_size=max_batch_for(limit, m.fixed_bytes, m.bytes_per_example),
        limit_bytes=limit,
        source="predicted",
    )
