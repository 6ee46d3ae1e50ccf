"""Memory: OOM classification and back-off (fake OOMs), exact byte counts on CPU.

    .venv/bin/python -m pytest tests/hardware/test_memory.py -q
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bsfind.errors import EXIT_HARDWARE, HardwareError, UserCodeError
from bsfind.hardware import memory
from bsfind.hardware.memory import (
    UNBOUNDED_BATCH,
    OutOfMemoryAtBatchOne,
    find_max_batch,
    is_oom,
    measure_memory_cuda,
    predict_memory,
    saved_activation_bytes,
    state_bytes,
    verify_max_batch,
)
from bsfind.results import MemoryModel

F32 = 4  # bytes per float32
I64 = 8  # bytes per int64

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


# --------------------------------------------------------------------------- is_oom


def cuda_oom() -> BaseException:
    return torch.cuda.OutOfMemoryError(
        "CUDA out of memory. Tried to allocate 2.00 GiB (GPU 0; 79.15 GiB total capacity)"
    )


def wrapped_oom() -> BaseException:
    try:
        try:
            raise RuntimeError("CUDA out of memory. Tried to allocate 20.00 MiB")
        except RuntimeError as exc:
            raise UserCodeError("model forward raised RuntimeError") from exc
    except UserCodeError as outer:
        return outer


@pytest.mark.parametrize(
    "exc",
    [
        cuda_oom(),
        torch.OutOfMemoryError("out of memory"),
        RuntimeError("CUDA out of memory. Tried to allocate 512.00 MiB"),
        RuntimeError("CUDA error: out of memory\nCUDA kernel errors might be asynchronously"),
        RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`"),
        RuntimeError("cuDNN error: CUDNN_STATUS_NOT_SUPPORTED. This error may appear if ..."),
        RuntimeError("[enforce fail at alloc_cpu.cpp:83] DefaultCPUAllocator: can't allocate "
                      "memory: you tried to allocate 1099511627776 bytes."),
        MemoryError(),
        wrapped_oom(),
    ],
)
def test_is_oom_true(exc: BaseException) -> None:
    assert is_oom(exc)


@pytest.mark.parametrize(
    "exc",
    [
        RuntimeError("mat1 and mat2 shapes cannot be multiplied (4x3 and 4x8)"),
        ValueError("out of memory"),  # only RuntimeErrors carry OOM messages
        KeyError("x"),
        KeyboardInterrupt(),
        UserCodeError("loss is not a scalar"),
    ],
)
def test_is_oom_false(exc: BaseException) -> None:
    assert not is_oom(exc)


# --------------------------------------------------------------------------- find_max_batch


class FakeDevice:
    """try_step that 'runs out of memory' above ``threshold`` and logs every event."""

    def __init__(self, threshold: int, error: Callable[[], BaseException] = cuda_oom) -> None:
        self.threshold = threshold
        self.error = error
        self.events: list[str] = []

    def try_step(self, batch: int) -> None:
        self.events.append(f"try {batch}")
        if batch > self.threshold:
            raise self.error()

    def clear_cache(self) -> None:
        self.events.append("clear")


@pytest.mark.parametrize(
    "start, upper, threshold, best, tried",
    [
        (64, None, 64, 64, (64,)),  # the prediction fits: one step
        (64, None, 1000, 64, (64,)),  # never searches above start
        (100, 30, 1000, 30, (30,)),  # start clipped to upper
        (64, None, 40, 40, (64, 32, 48, 40, 44, 42, 41)),
        (100, None, 70, 70, (100, 50, 75, 62, 68, 71, 69, 70)),
        (64, None, 5, 5, (64, 32, 16, 8, 4, 6, 5)),
        (10, None, 1, 1, (10, 5, 2, 1)),
        (1, None, 1, 1, (1,)),
        (2, None, 1, 1, (2, 1)),
    ],
)
def test_find_max_batch_sequence(
    start: int, upper: int | None, threshold: int, best: int, tried: tuple[int, ...]
) -> None:
    dev = FakeDevice(threshold)
    assert find_max_batch(dev.try_step, start, upper, dev.clear_cache) == (best, tried)


@pytest.mark.parametrize(
    "error",
    [
        lambda: RuntimeError("CUDA out of memory. Tried to allocate 1.00 GiB"),
        lambda: RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED"),
        MemoryError,
    ],
)
def test_find_max_batch_any_oom_kind(error: Callable[[], BaseException]) -> None:
    dev = FakeDevice(12, error)
    assert find_max_batch(dev.try_step, 32, None, dev.clear_cache) == (12, (32, 16, 8, 12, 14,
                                                                            13))


def test_clear_cache_between_tries() -> None:
    dev = FakeDevice(5)
    find_max_batch(dev.try_step, 16, None, dev.clear_cache)
    # every failed try is followed by a cache clear before the next try; successes are not
    assert dev.events == ["try 16", "clear", "try 8", "clear", "try 4", "try 6", "clear",
                          "try 5"]


def test_oom_at_batch_one() -> None:
    dev = FakeDevice(0)
    with pytest.raises(OutOfMemoryAtBatchOne) as info:
        find_max_batch(dev.try_step, 8, None, dev.clear_cache)
    assert isinstance(info.value, RuntimeError)
    assert isinstance(info.value, HardwareError)
    assert info.value.exit_code == EXIT_HARDWARE
    assert "8, 4, 2, 1" in str(info.value)
    assert dev.events.count("clear") == 4


def test_non_oom_error_propagates() -> None:
    def step(batch: int) -> None:
        if batch > 8:
            raise RuntimeError("CUDA out of memory. Tried to allocate 8.00 GiB")
        raise ValueError("bad target shape")

    with pytest.raises(ValueError, match="bad target shape"):
        find_max_batch(step, 32, None, lambda: None)


def test_keyboard_interrupt_propagates() -> None:
    def step(batch: int) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        find_max_batch(step, 4, None, lambda: None)


def test_find_max_batch_rejects_bad_start() -> None:
    with pytest.raises(ValueError):
        find_max_batch(lambda b: None, 0, None, lambda: None)


def test_verify_max_batch() -> None:
    predicted = MemoryModel(fixed_bytes=100, bytes_per_example=10.0, max_batch_size=64,
                            limit_bytes=740, source="predicted")
    dev = FakeDevice(40)
    checked = verify_max_batch(predicted, dev.try_step, dev.clear_cache)
    assert checked.max_batch_size == 40 and checked.verified
    assert checked.tried == (64, 32, 48, 40, 44, 42, 41)
    assert checked.source == "predicted" and checked.fixed_bytes == 100


# --------------------------------------------------------------------------- state bytes


def mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))


# Linear(4,8): 4·8 weights + 8 biases; Linear(8,3): 8·3 + 3 -> 67 floats in 4 tensors.
MLP_PARAMS = (4 * 8 + 8 + 8 * 3 + 3) * F32  # 268 bytes
MLP_TENSORS = 4
STEP = F32  # torch.optim keeps ``step`` as a float32 0-d tensor per parameter


def real_state_bytes(model: nn.Module, opt: torch.optim.Optimizer) -> int:
    """Bytes of optimizer state after one real step (the ground truth)."""
    model(torch.randn(2, 4)).sum().backward()
    opt.step()
    return sum(v.numel() * v.element_size() for s in opt.state.values() for v in s.values()
               if torch.is_tensor(v))


@pytest.mark.parametrize(
    "name, kwargs, expected",
    [
        ("sgd", {}, 0),
        ("sgd", {"momentum": 0.9}, MLP_PARAMS),  # one momentum buffer per parameter
        ("adam", {}, 2 * MLP_PARAMS + MLP_TENSORS * STEP),  # exp_avg, exp_avg_sq, step
        ("adamw", {}, 2 * MLP_PARAMS + MLP_TENSORS * STEP),
        ("adamw", {"amsgrad": True}, 3 * MLP_PARAMS + MLP_TENSORS * STEP),
        ("rmsprop", {}, MLP_PARAMS + MLP_TENSORS * STEP),  # square_avg, step
        ("rmsprop", {"momentum": 0.9, "centered": True}, 3 * MLP_PARAMS + MLP_TENSORS * STEP),
        ("adagrad", {}, MLP_PARAMS + MLP_TENSORS * STEP),
    ],
)
def test_state_bytes_exact(name: str, kwargs: dict[str, object], expected: int) -> None:
    model = mlp()
    assert state_bytes(model, name, kwargs) == (MLP_PARAMS, MLP_PARAMS, expected)
    # the same for an optimizer instance that has not stepped yet ...
    cls = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam, "adamw": torch.optim.AdamW,
           "rmsprop": torch.optim.RMSprop, "adagrad": torch.optim.Adagrad}[name]
    opt = cls(model.parameters(), lr=0.01, **kwargs)  # type: ignore[arg-type]
    assert state_bytes(model, opt) == (MLP_PARAMS, MLP_PARAMS, expected)
    # ... and it is what torch really allocates after one step
    assert real_state_bytes(model, opt) == expected
    assert state_bytes(model, opt) == (MLP_PARAMS, MLP_PARAMS, expected)


@pytest.mark.parametrize("name", ["adamax", "nadam", "radam", "asgd"])
def test_state_bytes_other_torch_optimizers_by_probe(name: str) -> None:
    model = mlp()
    cls = {n.lower(): getattr(torch.optim, n) for n in dir(torch.optim)}[name]
    expected = real_state_bytes(model, cls(model.parameters(), lr=0.01))
    assert expected > 0
    assert state_bytes(mlp(), name, {"lr": 0.01})[2] == expected


class ThreeBuffers(torch.optim.Optimizer):
    """A user optimizer unknown to bsfind: three buffers per parameter."""

    def __init__(self, params: object, lr: float = 0.1) -> None:
        super().__init__(params, {"lr": lr})  # type: ignore[arg-type]

    @torch.no_grad()
    def step(self, closure: object = None) -> None:  # type: ignore[override]
        for group in self.param_groups:
            for p in group["params"]:
                st = self.state[p]
                if not st:
                    st["a"] = torch.zeros_like(p)
                    st["b"] = torch.zeros_like(p)
                    st["c"] = torch.zeros_like(p)
                st["a"].add_(p.grad)
                p.add_(st["a"], alpha=-group["lr"])


def test_state_bytes_unknown_optimizer() -> None:
    model = mlp()
    assert state_bytes(model, ThreeBuffers)[2] == 3 * MLP_PARAMS
    assert state_bytes(model, ThreeBuffers(model.parameters()))[2] == 3 * MLP_PARAMS


def test_state_bytes_frozen_and_buffers() -> None:
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 3))
    for param in model[0].parameters():
        param.requires_grad_(False)
    frozen = (4 * 8 + 8) * F32
    bn_params = 2 * 8 * F32  # weight, bias
    bn_buffers = 2 * 8 * F32 + I64  # running_mean, running_var, num_batches_tracked
    last = (8 * 3 + 3) * F32
    p, g, o = state_bytes(model, "sgd", {"momentum": 0.9})
    assert p == frozen + bn_params + bn_buffers + last
    assert g == bn_params + last  # frozen parameters get no gradient
    assert o == bn_params + last  # nor optimizer state


def test_state_bytes_unknown_name() -> None:
    with pytest.raises(ValueError, match="unknown optimizer"):
        state_bytes(mlp(), "lion")


# --------------------------------------------------------------------------- saved activations


def mlp_saved_bytes(batch: int) -> int:
    """What autograd saves for Linear(4,8)-ReLU-Linear(8,3) + cross-entropy, by hand.

    - Linear 1 (addmm(b1, x, W1ᵀ)): saves its input x for the weight gradient,
      B·4 floats. It does not save W1ᵀ: x needs no gradient, so no input
      gradient is computed.
    - ReLU: saves its output h, B·8 floats.
    - Linear 2 (addmm(b2, h, W2ᵀ)): saves h (same storage as ReLU's output: not
      counted again) and W2ᵀ (a view of a parameter: counted by state_bytes).
    - cross_entropy = log_softmax + nll_loss: log_softmax saves its output,
      B·3 floats; nll_loss saves that output again (same storage), the targets
      (B int64) and total_weight, one float32 scalar whatever B is.
    """
    return batch * (4 * F32 + 8 * F32 + 3 * F32 + I64) + F32  # 68·B + 4


def cnn() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Flatten(), nn.Linear(2 * 4 * 4, 3))


def cnn_saved_bytes(batch: int) -> int:
    """Conv2d(1,2,3)-ReLU-Flatten-Linear(32,3) + cross-entropy on 1×6×6 images, by hand.

    - Conv2d: saves its input, B·1·6·6 floats (and its kernel, a parameter).
    - ReLU: saves its output, B·2·4·4 floats.
    - Flatten: a view, saves nothing; Linear saves the flattened view, which
      shares the ReLU output's storage (not counted again), and Wᵀ (parameter).
    - cross_entropy: log_softmax output B·3 floats, targets B int64, and the
      float32 total_weight scalar.
    """
    return batch * (36 * F32 + 32 * F32 + 3 * F32 + I64) + F32  # 292·B + 4


def ce_batch(shape: tuple[int, ...]) -> Callable[[int], tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(1)

    def make(b: int) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.randn(b, *shape, generator=gen), torch.randint(0, 3, (b,), generator=gen)

    return make


@pytest.mark.parametrize("batch", [1, 5, 16])
def test_saved_bytes_mlp(batch: int) -> None:
    x, y = ce_batch((4,))(batch)
    assert saved_activation_bytes(mlp(), x, y, F.cross_entropy) == mlp_saved_bytes(batch)


@pytest.mark.parametrize("batch", [1, 5, 16])
def test_saved_bytes_cnn(batch: int) -> None:
    x, y = ce_batch((1, 6, 6))(batch)
    assert saved_activation_bytes(cnn(), x, y, F.cross_entropy) == cnn_saved_bytes(batch)


def test_saved_bytes_mse() -> None:
    # mse_loss saves its input (the logits, B·3 floats) and the target (B·3 floats)
    batch = 6
    x, target = torch.randn(batch, 4), torch.randn(batch, 3)
    expected = batch * (4 + 8 + 3 + 3) * F32
    assert saved_activation_bytes(mlp(), x, target, F.mse_loss) == expected


def test_saved_bytes_leaves_model_and_rng_alone() -> None:
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Dropout(0.5), nn.Linear(8, 3))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    x, y = ce_batch((4,))(8)
    assert saved_activation_bytes(model, x, y, F.cross_entropy) > 0
    assert torch.equal(torch.get_rng_state(), rng)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert all(p.grad is None for p in model.parameters())


def test_predict_memory_mlp() -> None:
    limit = 100_000
    mm = predict_memory(mlp(), ce_batch((4,)), F.cross_entropy, "adam", limit)
    fixed = MLP_PARAMS + MLP_PARAMS + (2 * MLP_PARAMS + MLP_TENSORS * STEP) + F32
    assert mm.source == "predicted" and not mm.verified
    assert mm.fixed_bytes == fixed
    assert mm.bytes_per_example == pytest.approx(68.0)
    assert mm.max_batch_size == (limit - fixed) // 68
    assert mm.limit_bytes == limit


def test_predict_memory_cnn_and_limits() -> None:
    mm = predict_memory(cnn(), ce_batch((1, 6, 6)), F.cross_entropy, "sgd", 10_000,
                        sizes=(3, 7))
    params = (2 * 1 * 3 * 3 + 2 + 32 * 3 + 3) * F32
    assert mm.fixed_bytes == 2 * params + F32
    assert mm.bytes_per_example == pytest.approx(292.0)
    assert mm.max_batch_size == math.floor((10_000 - mm.fixed_bytes) / 292)
    tiny = predict_memory(cnn(), ce_batch((1, 6, 6)), F.cross_entropy, "sgd", 100)
    assert tiny.max_batch_size == 0
    with pytest.raises(ValueError):
        predict_memory(cnn(), ce_batch((1, 6, 6)), F.cross_entropy, "sgd", 100, sizes=(4, 4))


def test_max_batch_for() -> None:
    assert memory.max_batch_for(1000, 200, 100.0) == 8
    assert memory.max_batch_for(1000, 1000, 100.0) == 0
    assert memory.max_batch_for(1000, 10, 0.0) == UNBOUNDED_BATCH


def test_cpu_memory_limit() -> None:
    total, avail = memory.ram_bytes()
    assert total is not None and avail is not None and 0 < avail <= total
    limit = memory.cpu_memory_limit()
    assert 0 < limit <= total
    assert memory.cpu_memory_limit(0.5) == pytest.approx(limit / 2, rel=0.2)


def test_held_bytes_counts_what_the_prediction_counts_as_fixed_once() -> None:
    model = nn.Sequential(nn.Linear(64, 32), nn.BatchNorm1d(32))
    params = sum(p.numel() for p in model.parameters()) * 4
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())
    assert memory.held_bytes(model) == params + buffers  # no gradients yet
    opt = torch.optim.Adam(model.parameters())
    model(torch.randn(4, 64)).square().mean().backward()
    opt.step()
    p, g, o = memory.state_bytes(model, opt)
    assert memory.held_bytes(model, opt) == p + g + o
    flat = torch.zeros(100)  # two parameters viewing one storage: counted once
    shared = nn.Module()
    shared.a, shared.b = nn.Parameter(flat[:30]), nn.Parameter(flat[30:50])
    assert memory.held_bytes(shared) == 50 * 4


def test_a_cpu_limit_does_not_subtract_the_models_own_tensors_twice(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """RAM available now already excludes the parameters, gradients and optimizer state
    this process holds, and the prediction's fixed bytes count them again: 2 GiB of
    them cut a trial's room for activations from 18.6 to 16.6 GiB, and where they were
    most of what was left the largest batch came out 0 ("no batch size in [1] fits")
    although the probe had just trained at its baseline."""
    from bsfind.hardware import measure
    from bsfind.workload import Workload

    torch.manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(64, 256), torch.randint(0, 4, (64,)))
    model = nn.Sequential(nn.Linear(256, 512), nn.ReLU(), nn.Linear(512, 4))
    job = Workload.from_objects(model, data, F.cross_entropy, optimizer="adam")
    opts = measure.HardwareOptions(lr=1e-3, memory_fraction=1.0)
    step = measure.step_function(job, opts.lr, 0)
    step(8)  # as the probe did: gradients and Adam's state now exist
    p, g, o = memory.state_bytes(model, step.optimizer)
    ram = 10 * (p + g + o)  # what was available before any of them existed
    monkeypatch.setattr(memory, "ram_bytes", lambda: (4 * ram, ram - (p + g + o)))
    line = measure.memory_model(job, step, opts)
    assert line.limit_bytes == ram
    assert line.max_batch_size == memory.max_batch_for(ram, line.fixed_bytes,
                                                       line.bytes_per_example)
    # With only the fixed bytes and 16 examples' worth available before, batch 16 fits.
    room = line.fixed_bytes + int(16.5 * line.bytes_per_example)
    monkeypatch.setattr(memory, "ram_bytes", lambda: (4 * ram, room - (p + g + o)))
    assert measure.memory_model(job, step, opts).max_batch_size == 16


# --------------------------------------------------------------------------- CUDA (faked)


class FakeCudaAllocator:
    """Peak allocated bytes = 1,000 + 100·B after a step at B."""

    def __init__(self) -> None:
        self.peak = 0
        self.events: list[str] = []

    def install(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "synchronize", lambda d=None: self.events.append("sync"))
        monkeypatch.setattr(torch.cuda, "empty_cache", lambda: self.events.append("empty"))
        monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", self.reset)
        monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda d=None: self.peak)
        monkeypatch.setattr(torch.cuda, "mem_get_info", lambda d=None: (50_000, 101_000))

    def reset(self, device: object = None) -> None:
        self.events.append("reset")
        self.peak = 0

    def step(self, b: int) -> None:
        self.events.append(f"step {b}")
        self.peak = 1_000 + 100 * b


def test_measure_memory_cuda_faked(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = FakeCudaAllocator()
    fake.install(monkeypatch)
    mm = measure_memory_cuda(fake.step, (2, 4, 8), torch.device("cuda", 0))
    assert mm.source == "measured"
    assert mm.fixed_bytes == 1_000 and mm.bytes_per_example == pytest.approx(100.0)
    assert mm.limit_bytes == int(101_000 * 0.9)
    assert mm.max_batch_size == (90_900 - 1_000) // 100
    assert mm.tried == (2, 4, 8)
    # one unmeasured warm-up step; then each step is preceded by a cache clear and a
    # peak reset, and synchronised after
    assert fake.events[:6] == ["step 2", "empty", "sync", "reset", "step 2", "sync"]
    mm2 = measure_memory_cuda(fake.step, (2, 4), torch.device("cuda", 0), limit_bytes=5_000)
    assert mm2.max_batch_size == 40
    with pytest.raises(ValueError):
        measure_memory_cuda(fake.step, (4, 4), torch.device("cuda", 0))


class LazyStateAllocator(FakeCudaAllocator):
    """Parameters 1,000 bytes; an optimizer state of 2,000 created by the first step,
    whose peak (in the backward) comes before it; 100 bytes per example; out of memory
    from batch ``oom_from`` on."""

    def __init__(self, oom_from: int = 10**9) -> None:
        super().__init__()
        self.state = 0
        self.oom_from = oom_from

    def step(self, b: int) -> None:
        self.events.append(f"step {b}")
        if b >= self.oom_from:
            raise torch.OutOfMemoryError(f"CUDA out of memory at {b}")
        self.peak = max(self.peak, 1_000 + self.state + 100 * b)
        self.state = 2_000


def test_measure_memory_cuda_counts_the_state_the_first_step_creates(
        monkeypatch: pytest.MonkeyPatch) -> None:
    fake = LazyStateAllocator()
    fake.install(monkeypatch)
    mm = measure_memory_cuda(fake.step, (2, 8, 32), torch.device("cuda", 0))
    # without the warm-up the batch-2 point would lack the state: fixed 1,667, slope 148
    assert mm.fixed_bytes == 3_000 and mm.bytes_per_example == pytest.approx(100.0)
    assert mm.max_batch_size == (90_900 - 3_000) // 100


@pytest.mark.parametrize("oom_from, tried, largest", [
    (32, (2, 8), 31),  # the line (batch 879) is capped below the size that failed
    (8, (1, 2), 7),  # one size left: batch 1 makes the second point
])
def test_measure_memory_cuda_out_of_memory_ends_the_line(
        monkeypatch: pytest.MonkeyPatch, oom_from: int, tried: tuple[int, ...],
        largest: int) -> None:
    fake = LazyStateAllocator(oom_from)
    fake.install(monkeypatch)
    mm = measure_memory_cuda(fake.step, (2, 8, 32), torch.device("cuda", 0))
    assert mm.tried == tried and mm.max_batch_size == largest
    assert mm.fixed_bytes == 3_000 and mm.bytes_per_example == pytest.approx(100.0)
    i = fake.events.index(f"step {oom_from}")
    assert fake.events[i + 1] == "empty"  # the failed step's memory freed at once


def test_measure_memory_cuda_when_only_batch_one_fits(monkeypatch: pytest.MonkeyPatch) -> None:
    from bsfind.hardware.memory import OutOfMemoryAtBatchOne

    fake = LazyStateAllocator(2)  # the warm-up at 2 fails; batch 1 runs
    fake.install(monkeypatch)
    mm = measure_memory_cuda(fake.step, (2, 8, 32), torch.device("cuda", 0))
    assert mm.max_batch_size == 1 and mm.tried == (1,) and mm.fixed_bytes == 3_100
    fake = LazyStateAllocator(1)
    fake.install(monkeypatch)
    with pytest.raises(OutOfMemoryAtBatchOne):
        measure_memory_cuda(fake.step, (2, 8, 32), torch.device("cuda", 0))

    def broken(b: int) -> None:
        raise ValueError("a bug in the step, not memory")

    with pytest.raises(ValueError, match="a bug in the step"):
        measure_memory_cuda(broken, (2, 8, 32), torch.device("cuda", 0))


class StateThatGrows(LazyStateAllocator):
    """The warm-up at 2 runs (the state is made after its peak); with the state in
    memory the measured step at 2 no longer fits. ``batchnorm``: batch 1 is refused."""

    def __init__(self, batchnorm: bool = False) -> None:
        super().__init__()
        self.batchnorm = batchnorm

    def step(self, b: int) -> None:
        if b == 1 and self.batchnorm:
            raise ValueError("Expected more than 1 value per channel when training")
        if self.state and b >= 2:
            self.events.append(f"step {b}")
            raise torch.OutOfMemoryError("CUDA out of memory")
        super().step(b)


def test_measure_memory_cuda_falls_back_to_batch_one_after_the_warm_up(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from bsfind.hardware.memory import OutOfMemoryAtBatchOne

    fake = StateThatGrows()
    fake.install(monkeypatch)
    mm = measure_memory_cuda(fake.step, (2, 8, 32), torch.device("cuda", 0))
    assert mm.max_batch_size == 1 and mm.tried == (1,)
    fake = StateThatGrows(batchnorm=True)  # batch 1 raises, and is no point either
    fake.install(monkeypatch)
    with pytest.raises(OutOfMemoryAtBatchOne, match="batch size 1 did not run either"):
        measure_memory_cuda(fake.step, (2, 8, 32), torch.device("cuda", 0))


def test_batch_one_that_raised_is_not_called_out_of_memory(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A BatchNorm model out of memory at batch 2, whose batch 1 then raised "Expected
    more than 1 value per channel", was reported "out of memory even at batch size 1"."""
    from bsfind.hardware.memory import OutOfMemoryAtBatchOne

    fake = StateThatGrows(batchnorm=True)
    fake.install(monkeypatch)
    fake.state = 2_000  # the warm-up at 2 already runs out of memory
    with pytest.raises(OutOfMemoryAtBatchOne) as info:
        measure_memory_cuda(fake.step, (2, 8, 32), torch.device("cuda", 0))
    assert info.value.message == (
        "out of memory at batch size 2, and batch size 1 did not run either: it raised "
        "ValueError: Expected more than 1 value per channel when training")
    fake = StateThatGrows(batchnorm=True)  # the warm-up runs, the measured 2 does not
    fake.install(monkeypatch)
    with pytest.raises(OutOfMemoryAtBatchOne, match="did not run either: it raised Value"):
        measure_memory_cuda(fake.step, (2, 8, 32), torch.device("cuda", 0))
    fake = LazyStateAllocator(2)  # batch 1 out of memory too: as before
    fake.install(monkeypatch)
    monkeypatch.setattr(fake, "oom_from", 1)
    with pytest.raises(OutOfMemoryAtBatchOne) as info:
        measure_memory_cuda(fake.step, (2, 8, 32), torch.device("cuda", 0))
    assert info.value.message == "out of memory even at batch size 1"


def test_a_warm_up_that_ran_out_of_memory_starts_a_fresh_optimizer(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """An out-of-memory error inside Adam's first step can leave exp_avg made and
    exp_avg_sq not; the next step would raise KeyError (and batch 1 would look out of
    memory). ``fresh`` replaces the optimizer before batch 1 is tried."""
    allocator = FakeCudaAllocator()
    allocator.install(monkeypatch)

    class Step:
        def __init__(self) -> None:
            self.fresh_calls = 0
            self.state: dict[str, torch.Tensor] = {}

        def __call__(self, b: int) -> None:
            if self.state and "exp_avg_sq" not in self.state:
                raise KeyError("exp_avg_sq")  # what Adam does with a half-made state
            if not self.state:
                self.state["exp_avg"] = torch.zeros(2)
                if b >= 2:
                    raise torch.OutOfMemoryError("CUDA out of memory (making exp_avg_sq)")
                self.state["exp_avg_sq"] = torch.zeros(2)
            allocator.peak = 1_000 + 100 * b

        def fresh(self) -> None:
            self.fresh_calls += 1
            self.state = {}

    step = Step()
    mm = measure_memory_cuda(step, (2, 8, 32), torch.device("cuda", 0), fresh=step.fresh)
    # warmed up at 1 with a fresh optimizer; with the state made, every size ran
    assert step.fresh_calls == 1 and mm.tried == (1, 2, 8, 32)
    assert mm.fixed_bytes == 1_000 and mm.max_batch_size == (90_900 - 1_000) // 100
    from bsfind.hardware.memory import OutOfMemoryAtBatchOne

    with pytest.raises(OutOfMemoryAtBatchOne):  # without it batch 1 trips on the half state
        measure_memory_cuda(Step(), (2, 8, 32), torch.device("cuda", 0))


def test_the_hardware_step_can_start_a_fresh_optimizer() -> None:
    from bsfind.hardware.measure import step_function
    from tests.test_branches import tiny_job

    job = tiny_job()
    step = step_function(job, 1e-2, 0)
    step(8)
    assert step.optimizer.state  # Adam made its state
    before = step.optimizer
    step.fresh()
    assert step.optimizer is not before and not step.optimizer.state
    step(8)
    assert step.optimizer.state


# --------------------------------------------------------------------------- CUDA (real)


@pytest.mark.cuda
@cuda
def test_measure_memory_cuda_real() -> None:
    device = torch.device("cuda", 0)
    model = nn.Sequential(nn.Linear(256, 1024), nn.ReLU(), nn.Linear(1024, 10)).to(device)
    opt = torch.optim.Adam(model.parameters())

    def step(b: int) -> None:
        x = torch.randn(b, 256, device=device)
        y = torch.randint(0, 10, (b,), device=device)
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()

    mm = measure_memory_cuda(step, (64, 128, 256), device)
    assert mm.source == "measured"
    p, g, o = state_bytes(model, opt)
    assert mm.fixed_bytes >= p  # parameters are allocated throughout
    # a ReLU output (4 KiB) and an input (1 KiB) per example at least
    assert mm.bytes_per_example >= (1024 + 256) * F32
    assert mm.max_batch_size > 256


@pytest.mark.cuda
@cuda
def test_real_oom_backoff() -> None:
    device = torch.device("cuda", 0)
    _free, total = torch.cuda.mem_get_info(device)
    gib = 1 << 30
    start = 2 * total // gib  # twice the device: surely out of memory

    def try_step(b: int) -> None:
        x = torch.empty(b * gib, dtype=torch.uint8, device=device)
        del x

    best, tried = find_max_batch(try_step, start, None, lambda: memory.clear_cache(device))
    assert tried[0] == start and 1 <= best < total // gib + 1
    assert len(tried) > 1


def test_verify_steps_at_most_the_step_limit() -> None:
    """A line allowing millions of examples is stepped at the limit, not at its maximum;
    the maximum then stands unverified beyond it."""
    stepped: list[int] = []
    line = MemoryModel(fixed_bytes=0, bytes_per_example=1.0, max_batch_size=5_000_000,
                       limit_bytes=5_000_000, source="measured")
    checked = verify_max_batch(line, stepped.append, lambda: None, step_limit=4096)
    assert stepped == [4096] and checked.tried == (4096,)
    assert checked.max_batch_size == 5_000_000 and not checked.verified
    # Below the limit the check is the exact search, as before.
    small = dataclasses.replace(line, max_batch_size=1000)
    assert verify_max_batch(small, stepped.append, lambda: None, step_limit=4096).verified


def test_data_parallel_memory_holds_the_gradient_buckets() -> None:
    from bsfind.hardware.measure import with_gradient_buckets
    from bsfind.results import MemoryModel

    model = torch.nn.Sequential(torch.nn.Linear(10, 20), torch.nn.Linear(20, 3))
    model[1].bias.requires_grad_(False)  # frozen: DDP keeps no bucket for it
    grads = (10 * 20 + 20 + 20 * 3) * 4  # float32 trainable parameters: 1,120 bytes
    line = MemoryModel(fixed_bytes=10_000, bytes_per_example=100.0, max_batch_size=900,
                       limit_bytes=100_000, source="measured")
    ddp = with_gradient_buckets(line, model)
    assert ddp.fixed_bytes == 10_000 + grads and ddp.ddp_buckets and not line.ddp_buckets
    assert ddp.max_batch_size == (100_000 - 10_000 - grads) // 100  # 888
    # a maximum real steps lowered stays lowered
    verified = with_gradient_buckets(
        MemoryModel(fixed_bytes=10_000, bytes_per_example=100.0, max_batch_size=500,
                    limit_bytes=100_000, source="measured", verified=True), model)
    assert verified.max_batch_size == 500 and verified.verified
