"""Memory per training step, M(B) ≈ M0 + m·B, and the largest batch that fits.

Two ways to get the line (DESIGN §3):

- predicted, anywhere (CPU, or a GPU that is not here): parameters + gradients
  + optimizer state (:func:`state_bytes`) + the bytes autograd saves for the
  backward pass (:func:`saved_activation_bytes`, counted with
  ``torch.autograd.graph.saved_tensors_hooks`` at two batch sizes for the slope);
- measured, on CUDA: ``torch.cuda.max_memory_allocated`` after one step at
  two or three batch sizes (:func:`measure_memory_cuda`).

Either maximum is then checked with real steps by :func:`find_max_batch`,
which backs off on out-of-memory. :func:`is_oom` is the one place that decides
what counts as out-of-memory.

    from bsfind.hardware.memory import predict_memory
    mm = predict_memory(model, make_batch, loss_fn, "adam", limit_bytes=cpu_memory_limit())
    mm.max_batch_size
"""

from __future__ import annotations

import contextlib
import gc
import math
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from bsfind.errors import HardwareError
from bsfind.results import MemoryModel

LossFn = Callable[[Any, Any], torch.Tensor]
# ``loss_of(inputs, targets) -> loss``: a batch's loss when not ``loss_fn(model(inputs),
# targets)`` (a workload's: its call convention, keyword inputs, labels=targets, and
# the user's errors reported as theirs).
LossOf = Callable[[Any, Any], torch.Tensor]
MakeBatch = Callable[[int], tuple[Any, Any]]

# Stand-in for "no per-example memory at all": the line never reaches the limit.
UNBOUNDED_BATCH = 1 << 30

# Messages of RuntimeErrors that mean out-of-memory. The list follows
# accelerate's ``should_reduce_batch_size`` (accelerate/utils/memory.py) plus
# cuBLAS failing to allocate its workspace, which PyTorch reports as a
# RuntimeError rather than an OutOfMemoryError.
OOM_MESSAGES = (
    "out of memory",  # "CUDA out of memory.", "CUDA error: out of memory", HIP, MPS
    "CUBLAS_STATUS_ALLOC_FAILED",
    "cuDNN error: CUDNN_STATUS_NOT_SUPPORTED.",  # cuDNN's way of failing to get workspace
    "DefaultCPUAllocator: can't allocate memory",  # CPU allocator (Linux)
    "DefaultCPUAllocator: not enough memory",  # CPU allocator (when a size is refused)
)


# --------------------------------------------------------------------------- RAM


def ram_bytes() -> tuple[int | None, int | None]:
    """(total, available) system RAM in bytes; None where the OS cannot say.

    Total from ``os.sysconf``; available from /proc/meminfo ``MemAvailable``
    (the kernel's estimate of what can be allocated without swapping), else
    ``SC_AVPHYS_PAGES`` (free pages only, an underestimate).
    """
    total: int | None = None
    avail: int | None = None
    try:
        total = int(os.sysconf("SC_PAGE_SIZE")) * int(os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        total = None
    try:
        with open("/proc/meminfo", encoding="ascii", errors="replace") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    avail = int(line.split()[1]) * 1024  # the file says kB (KiB)
                    break
    except (OSError, ValueError, IndexError):
        avail = None
    if avail is None:
        try:
            avail = int(os.sysconf("SC_PAGE_SIZE")) * int(os.sysconf("SC_AVPHYS_PAGES"))
        except (ValueError, OSError, AttributeError):
            avail = None
    return total, avail


def cpu_memory_limit(fraction: float = 1.0) -> int:
    """Bytes a CPU run may use: ``fraction`` of the RAM available now.

    Raises:
        HardwareError: when the OS reports neither available nor total RAM.
    """
    total, avail = ram_bytes()
    base = avail if avail is not None else total
    if base is None:
        raise HardwareError("cannot read the available RAM of this machine")
    return int(base * fraction)


def held_bytes(model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> int:
    """Bytes this process holds now, on the CPU, for what :func:`predict_memory` counts as
    fixed: ``model``'s parameters, buffers and gradients, and ``optimizer``'s state.

    RAM available now (:func:`cpu_memory_limit`) already excludes them, so a CPU limit
    that the prediction's fixed bytes are subtracted from adds them back (else they are
    subtracted twice: a trial's 2 GiB of weights, gradients and Adam state cut the room
    for activations from 18.6 to 16.6 GiB). A storage several tensors view is counted
    once, never beyond its size.
    """
    tensors: list[torch.Tensor] = [*model.parameters(), *model.buffers()]
    tensors += [p.grad for p in model.parameters() if p.grad is not None]
    if optimizer is not None:
        tensors += [v for st in optimizer.state.values() if isinstance(st, dict)
                    for v in st.values() if isinstance(v, torch.Tensor)]
    views: dict[int, set[tuple[int, int]]] = {}  # storage -> {(data_ptr, nbytes)}
    sizes: dict[int, int] = {}
    for t in tensors:
        if t.device.type != "cpu" or t.layout != torch.strided:
            continue
        storage = t.untyped_storage()
        key = storage.data_ptr()
        sizes[key] = storage.nbytes()
        views.setdefault(key, set()).add((t.data_ptr(), t.numel() * t.element_size()))
    return sum(min(sizes[k], sum(n for _, n in v)) for k, v in views.items())


# --------------------------------------------------------------------------- OOM


def is_oom(exc: BaseException) -> bool:
    """True when ``exc`` (or an exception it was raised from) is out-of-memory.

    Counts ``torch.OutOfMemoryError`` / ``torch.cuda.OutOfMemoryError``,
    ``MemoryError``, and RuntimeErrors whose message contains one of
    :data:`OOM_MESSAGES`. The ``__cause__``/``__context__`` chain is followed,
    so an OOM that user-code wrappers (``UserCodeError(...) from exc``)
    re-raised still counts.
    """
    oom_types: tuple[type[BaseException], ...] = (MemoryError,) + tuple(
        t for t in (getattr(torch, "OutOfMemoryError", None),
                    getattr(torch.cuda, "OutOfMemoryError", None))
        if isinstance(t, type)
    )
    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        if isinstance(cur, oom_types):
            return True
        if isinstance(cur, RuntimeError):
            text = str(cur)
            if any(m in text for m in OOM_MESSAGES):
                return True
        cur = cur.__cause__ or cur.__context__
    return False


class OutOfMemoryAtBatchOne(HardwareError, RuntimeError):
    """Even a batch of one example does not fit in memory (exit code 4)."""

    def __init__(self, message: str = "out of memory even at batch size 1",
                 hint: str | None = "use a smaller model, a lower precision, or a larger device"
                 ) -> None:
        super().__init__(message, hint)


def clear_cache(device: torch.device | None = None) -> None:
    """Free what an out-of-memory step left behind: garbage, then CUDA's cache."""
    gc.collect()
    if (device is None or device.type == "cuda") and torch.cuda.is_available():
        torch.cuda.empty_cache()


def find_max_batch(
    try_step: Callable[[int], None],
    start: int,
    upper: int | None,
    clear_cache: Callable[[], None],
) -> tuple[int, tuple[int, ...]]:
    """The largest batch size ≤ ``start`` whose step runs, found by real steps.

    Tries ``start`` (clipped to ``upper``, the largest batch worth trying, e.g.
    the dataset size). If it runs, that is the answer: the search never goes
    above ``start`` (the predicted maximum). On out-of-memory it halves until
    a step runs, then binary-searches between that success and the smallest
    failure, so the answer is exact: ``answer`` ran and ``answer + 1`` failed.
    ``clear_cache`` is called after every failed try, outside the ``except``
    block so that the traceback no longer holds the failed step's tensors.

    Returns:
        (largest batch that ran, every batch size tried, in order).

    Raises:
        OutOfMemoryAtBatchOne: when even a batch of 1 is out of memory.
        Any non-OOM exception of ``try_step``, unchanged.
    """
    if start < 1:
        raise ValueError(f"start must be >= 1, got {start}")
    if upper is not None:
        if upper < 1:
            raise ValueError(f"upper must be >= 1, got {upper}")
        start = min(start, upper)
    tried: list[int] = []

    def runs(batch: int) -> bool:
        tried.append(batch)
        failed = False
        try:
            try_step(batch)
        except BaseException as exc:
            if not is_oom(exc):
                raise
            failed = True
        if failed:
            clear_cache()
        return not failed

    if runs(start):
        return start, tuple(tried)
    bad = start
    good = bad // 2
    while good >= 1 and not runs(good):
        bad = good
        good //= 2
    if good < 1:
        raise OutOfMemoryAtBatchOne(
            f"out of memory even at batch size 1 (tried {', '.join(map(str, tried))})"
        )
    while bad - good > 1:
        mid = (good + bad) // 2
        if runs(mid):
            good = mid
        else:
            bad = mid
    return good, tuple(tried)


# --------------------------------------------------------------------------- optimizer state

# Per-parameter state buffers of the same shape and dtype as the parameter
# (read off each optimizer's ``step`` in torch/optim/*.py), and whether it
# keeps a scalar ``step`` tensor per parameter.
def _buffers_per_param(name: str, group: Mapping[str, Any]) -> tuple[int, bool] | None:
    if name == "sgd":
        return (1 if group.get("momentum", 0) else 0), False
    if name in ("adam", "adamw"):
        return (3 if group.get("amsgrad", False) else 2), True  # exp_avg, exp_avg_sq[, max]
    if name == "rmsprop":
        n = 1 + (1 if group.get("momentum", 0) else 0) + (1 if group.get("centered", False) else 0)
        return n, True  # square_avg[, momentum_buffer][, grad_avg]
    if name == "adagrad":
        return 1, True  # sum
    return None


_KNOWN: dict[str, type[torch.optim.Optimizer]] = {
    "sgd": torch.optim.SGD,
    "adam": torch.optim.Adam,
    "adamw": torch.optim.AdamW,
    "rmsprop": torch.optim.RMSprop,
    "adagrad": torch.optim.Adagrad,
}

# Largest parameter set an unknown optimizer is stepped on as CPU zeros when it
# cannot step on the meta device (the probe holds parameters, gradients and
# state at once: several times this in RAM).
PROBE_CPU_MAX_BYTES = 1 << 30

# Default hyperparameters for a name given without kwargs (torch's defaults,
# except that SGD needs a learning rate to be constructed).
_NAME_DEFAULTS: dict[str, dict[str, Any]] = {"sgd": {"lr": 0.1}}


def _scalar_step_bytes() -> int:
    # torch.optim keeps ``step`` as a 0-d tensor of _get_scalar_dtype():
    # float64 when that is the default dtype, else float32.
    return 8 if torch.get_default_dtype() == torch.float64 else 4


def _tensor_bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _unique(tensors: Iterator[torch.Tensor]) -> list[torch.Tensor]:
    seen: set[int] = set()
    out = []
    for t in tensors:
        if id(t) not in seen:
            seen.add(id(t))
            out.append(t)
    return out


def _state_tensor_bytes(opt: torch.optim.Optimizer) -> int:
    total = 0
    for state in opt.state.values():
        for v in state.values():
            if isinstance(v, torch.Tensor):
                total += _tensor_bytes(v)
    return total


def _probe_state_bytes(
    cls: type[torch.optim.Optimizer], params: Sequence[torch.Tensor], kwargs: Mapping[str, Any]
) -> int | None:
    """Optimizer state after one step on stand-in parameters with zero grads.

    First on the meta device (no memory used: shapes only), else on CPU zeros
    of the same shapes (exact, costs about three copies of the parameters in
    RAM, so only up to PROBE_CPU_MAX_BYTES of parameters). None when the
    optimizer cannot be built or stepped that way.
    """
    nbytes = sum(_tensor_bytes(p) for p in params)
    for device in ("meta", "cpu"):
        if device == "cpu" and nbytes > PROBE_CPU_MAX_BYTES:
            break
        try:
            fakes = []
            for p in params:
                f = torch.zeros(p.shape, dtype=p.dtype, device=device, requires_grad=True)
                f.grad = torch.zeros(p.shape, dtype=p.dtype, device=device)
                fakes.append(f)
            opt = cls(fakes, **dict(kwargs))
            with torch.no_grad():
                opt.step()
            return _state_tensor_bytes(opt)
        except Exception:
            continue
    return None


def _optimizer_groups(
    optimizer: str | torch.optim.Optimizer | type[torch.optim.Optimizer],
    kwargs: dict[str, Any],
    trainable: list[torch.Tensor],
) -> tuple[type[torch.optim.Optimizer], dict[str, Any],
           list[tuple[Mapping[str, Any], list[torch.Tensor]]]]:
    """(class, hyperparameters, [(group settings, group parameters)]) of an optimizer
    given as an instance, a class or a name."""
    if isinstance(optimizer, torch.optim.Optimizer):
        groups: list[tuple[Mapping[str, Any], list[torch.Tensor]]] = [
            (g, list(g["params"])) for g in optimizer.param_groups
        ]
        return type(optimizer), dict(optimizer.defaults), groups
    if isinstance(optimizer, str):
        key = optimizer.strip().lower()
        if key in _KNOWN:
            cls = _KNOWN[key]
        else:
            found = {n.lower(): getattr(torch.optim, n) for n in dir(torch.optim)}.get(key)
            if not (isinstance(found, type) and issubclass(found, torch.optim.Optimizer)):
                raise ValueError(
                    f"unknown optimizer {optimizer!r}; known: {', '.join(sorted(_KNOWN))} "
                    "or any torch.optim class name"
                )
            cls = found
        kwargs = {**_NAME_DEFAULTS.get(cls.__name__.lower(), {}), **kwargs}
    else:
        cls = optimizer
    return cls, kwargs, [({**_defaults_of(cls), **kwargs}, trainable)]


def state_bytes(
    model: nn.Module,
    optimizer: str | torch.optim.Optimizer | type[torch.optim.Optimizer],
    optimizer_kwargs: Mapping[str, Any] | None = None,
) -> tuple[int, int, int]:
    """(parameter, gradient, optimizer-state) bytes of one training setup.

    * parameter bytes: every parameter and buffer of ``model`` (buffers such
      as BatchNorm statistics occupy memory the same way), shared ones once;
    * gradient bytes: one gradient per parameter that requires grad;
    * optimizer state, exact for the optimizers whose state torch documents
      in their ``step``: SGD (none, or one momentum buffer per parameter when
      ``momentum`` ≠ 0), Adam/AdamW (exp_avg and exp_avg_sq, plus
      max_exp_avg_sq with ``amsgrad``, plus a scalar ``step`` tensor),
      RMSprop (square_avg, + momentum_buffer, + grad_avg when centered, +
      ``step``) and Adagrad (sum + ``step``).

    An optimizer *instance* whose state already exists (it has stepped) is
    counted as it is. Any other optimizer is built on stand-in parameters of
    the same shapes and stepped once with zero gradients, on the meta device
    where it can run there, else on CPU zeros; its state after that one step
    is counted. If even that fails, Adam-like state (two buffers per
    parameter) is assumed.

    Args:
        model: the model being trained.
        optimizer: an optimizer instance, an optimizer class, or a name
            ("sgd", "adam", "adamw", "rmsprop", "adagrad", or any class name in
            ``torch.optim``).
        optimizer_kwargs: hyperparameters for a name or class (e.g.
            ``{"momentum": 0.9}``); an instance carries its own.
    """
    params = _unique(iter(model.parameters()))
    buffers = _unique(iter(model.buffers()))
    param_bytes = sum(_tensor_bytes(p) for p in params) + sum(_tensor_bytes(b) for b in buffers)
    trainable = [p for p in params if p.requires_grad]
    grad_bytes = sum(_tensor_bytes(p) for p in trainable)
    if isinstance(optimizer, torch.optim.Optimizer):
        opt_params = _unique(p for g in optimizer.param_groups for p in g["params"])
        if optimizer.state and all(p in optimizer.state for p in opt_params):
            return param_bytes, grad_bytes, _state_tensor_bytes(optimizer)
    cls, kwargs, groups = _optimizer_groups(optimizer, dict(optimizer_kwargs or {}), trainable)
    name = cls.__name__.lower()
    step_bytes = _scalar_step_bytes()
    opt_bytes = 0
    for group, group_params in groups:
        rule = _buffers_per_param(name, group) if cls in _KNOWN.values() else None
        if rule is not None:
            n_buffers, has_step = rule
            opt_bytes += sum(n_buffers * _tensor_bytes(p) + (step_bytes if has_step else 0)
                             for p in group_params)
            continue
        probe_kwargs = {k: group.get(k, v) for k, v in kwargs.items()}
        probed = _probe_state_bytes(cls, group_params, probe_kwargs)
        opt_bytes += (probed if probed is not None
                      else sum(2 * _tensor_bytes(p) for p in group_params))
    return param_bytes, grad_bytes, opt_bytes


def _defaults_of(cls: type[torch.optim.Optimizer]) -> dict[str, Any]:
    """Keyword defaults of an optimizer's constructor (momentum=0, amsgrad=False, ...)."""
    import inspect

    try:
        sig = inspect.signature(cls.__init__)
    except (TypeError, ValueError):
        return {}
    return {
        k: p.default for k, p in sig.parameters.items()
        if p.default is not inspect.Parameter.empty and k not in ("self", "params")
    }


# --------------------------------------------------------------------------- activations


@contextlib.contextmanager
def preserved_state(model: nn.Module) -> Iterator[None]:
    """Run a measuring forward without side effects on the model or the RNG.

    Buffers (BatchNorm running statistics, ...) are restored afterwards and
    the random number generators (dropout) are forked, so that measuring does
    not change what the probes later compute.
    """
    saved = [(b, b.detach().clone()) for b in model.buffers()]
    devices = sorted({p.device.index or 0 for p in model.parameters() if p.is_cuda})
    with torch.random.fork_rng(devices=devices):
        try:
            yield
        finally:
            with torch.no_grad():
                for b, copy in saved:
                    b.copy_(copy)


def _storage_key(t: torch.Tensor) -> tuple[str, int] | None:
    try:
        storage = t.untyped_storage()
    except Exception:  # sparse / nested / wrapper tensors without one storage
        return None
    return str(t.device), storage.data_ptr()


def saved_activation_bytes(
    model: nn.Module, inputs: Any, targets: Any, loss_fn: LossFn,
    loss_of: LossOf | None = None,
) -> int:
    """Bytes autograd keeps for the backward pass of one forward + loss.

    Every tensor the forward saves for backward passes through a
    ``saved_tensors_hooks`` pack hook. Tensors are counted by *storage*: two
    saved tensors that share one storage (ReLU's output is saved by the ReLU
    and again as the next Linear's input; a ``view``/``flatten`` of it) count
    once, and a saved view counts its whole storage, which is what autograd
    keeps alive. Storages of parameters and buffers are not counted here at
    all: :func:`state_bytes` already counts them (a Linear saves its weight
    for the input gradient, a Conv its kernel). The inputs and targets count
    when autograd saves them (a first Linear saves its input for the weight
    gradient; ``nll_loss`` saves the targets).

    The forward runs in the model's current mode, under ``enable_grad``,
    without a backward pass; buffers and the RNG are left as they were.
    """
    skip = {k for k in (_storage_key(t) for t in (*model.parameters(), *model.buffers()))
            if k is not None}
    seen: dict[tuple[str, int], int] = {}
    loose = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal loose
        key = _storage_key(t)
        if key is None:
            loose += _tensor_bytes(t)
        elif key not in skip:
            nbytes = t.untyped_storage().nbytes()
            seen[key] = max(seen.get(key, 0), nbytes)
        return t

    with preserved_state(model), torch.enable_grad():
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = (loss_fn(model(inputs), targets) if loss_of is None
                    else loss_of(inputs, targets))
        del loss
    return sum(seen.values()) + loose


def _line(points: Sequence[tuple[float, float]]) -> tuple[float, float]:
    """Least-squares (intercept, slope) through (x, y) points; needs 2 distinct x."""
    n = len(points)
    mx = sum(x for x, _ in points) / n
    my = sum(y for _, y in points) / n
    sxx = sum((x - mx) ** 2 for x, _ in points)
    if sxx == 0:
        raise ValueError("need at least two different batch sizes")
    slope = sum((x - mx) * (y - my) for x, y in points) / sxx
    return my - slope * mx, slope


def max_batch_for(limit: int, fixed: int, per_example: float) -> int:
    """floor((limit − fixed) / per_example): 0 when nothing fits, UNBOUNDED_BATCH
    when no memory grows with the batch."""
    if limit <= fixed:
        return 0
    if per_example <= 0:
        return UNBOUNDED_BATCH
    # + 1e-6: a least-squares slope of exactly 100 may come out 100.00000000000001
    return min(UNBOUNDED_BATCH, int(math.floor((limit - fixed) / per_example + 1e-6)))


def predict_memory(
    model: nn.Module,
    make_batch: MakeBatch,
    loss_fn: LossFn,
    optimizer: str | torch.optim.Optimizer | type[torch.optim.Optimizer],
    limit_bytes: int,
    sizes: tuple[int, int] = (2, 8),
    optimizer_kwargs: Mapping[str, Any] | None = None,
    loss_of: LossOf | None = None,
) -> MemoryModel:
    """M(B) = fixed + per_example·B from counted bytes (``source="predicted"``).

    fixed = parameters + buffers + gradients + optimizer state + the
    intercept of the saved-activation line; per_example = the slope of the
    saved bytes between the two ``sizes``; max_batch_size =
    floor((limit_bytes − fixed) / per_example), 0 when nothing fits.

    This is a lower bound on the real peak: during backward the gradients of
    one layer's output and input also exist for a moment, and allocators
    round up and fragment. Keep a margin in ``limit_bytes`` (memory_fraction)
    and verify on the device with :func:`find_max_batch`.

    Args:
        make_batch: ``make_batch(B) -> (inputs, targets)`` on the model's device.
        sizes: the two batch sizes counted (distinct).
        loss_of: ``loss_of(inputs, targets) -> loss`` when not ``loss_fn(model(inputs),
            targets)``.
    """
    small, big = sizes
    if small == big or min(small, big) < 1:
        raise ValueError(f"sizes must be two distinct positive batch sizes, got {sizes}")
    p, g, o = state_bytes(model, optimizer, optimizer_kwargs)
    counted = []
    for b in (small, big):
        x, y = make_batch(b)
        counted.append((float(b), float(saved_activation_bytes(model, x, y, loss_fn, loss_of))))
    intercept, slope = _line(counted)
    slope = max(0.0, slope)
    fixed = p + g + o + max(0, int(round(intercept)))
    return MemoryModel(
        fixed_bytes=fixed,
        bytes_per_example=slope,
        max_batch_size=max_batch_for(limit_bytes, fixed, slope),
        limit_bytes=int(limit_bytes),
        source="predicted",
    )


# --------------------------------------------------------------------------- CUDA


def _runs(step: Callable[[int], None], b: int, device: torch.device,
          any_error: bool = False, why: list[str] | None = None) -> bool:
    """One step at ``b``: False when it ran out of memory (or, with ``any_error``, failed
    at all: batch 1 is a fallback, and BatchNorm refuses it); what failed is appended to
    ``why`` ("out of memory", or the error's type and message)."""
    try:
        step(b)
        return True
    except Exception as exc:
        if not (any_error or is_oom(exc)):
            raise
        if why is not None:
            why.append("out of memory" if is_oom(exc) else f"{type(exc).__name__}: {exc}")
    clear_cache(device)  # outside the except: the error's frames hold the tensors
    return False


def _peak_after(step: Callable[[int], None], b: int, device: torch.device,
                any_error: bool = False, why: list[str] | None = None
                ) -> tuple[float, float] | None:
    """(b, CUDA's peak allocated bytes over one step at b), from an emptied cache and a
    reset peak; None when the step did not run (:func:`_runs`)."""
    clear_cache(device)
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    if not _runs(step, b, device, any_error, why):
        return None
    torch.cuda.synchronize(device)
    return float(b), float(torch.cuda.max_memory_allocated(device))


def _not_even_one(failed: int | None, why: list[str], where: str = "") -> OutOfMemoryAtBatchOne:
    """Out of memory at ``failed`` and batch 1 did not run: out of memory, or what it
    raised (BatchNorm refuses a batch of 1; that is no out-of-memory at batch 1)."""
    if failed in (None, 1) or (why == ["out of memory"] and not where):
        return OutOfMemoryAtBatchOne()
    said = f"out of memory at batch size {failed}{where}, and batch size 1 did not run either"
    if why and why[-1] != "out of memory":
        said += f": it raised {why[-1]}"
    return OutOfMemoryAtBatchOne(said)


def measure_memory_cuda(
    step: Callable[[int], None],
    sizes: Sequence[int],
    device: torch.device,
    *,
    limit_bytes: int | None = None,
    memory_fraction: float = 0.9,
    fresh: Callable[[], None] | None = None,
) -> MemoryModel:
    """M(B) from CUDA's peak allocated bytes after one step at each size.

    One unmeasured step at the smallest size comes first: an optimizer creates its
    state in its first step (Adam: two copies of the parameters), and a peak inside
    that step's forward or backward would leave the state out of the first point only,
    tilting the line. Before each measured step the cache is emptied and the peak
    statistics reset; the peak (``max_memory_allocated``) therefore includes what was
    already allocated (parameters, optimizer state) plus the step's transient memory.
    A least-squares line through (B, peak) gives ``fixed_bytes`` and
    ``bytes_per_example`` (``source="measured"``).

    Running out of memory: a warm-up that fails is tried again at batch 1 (after
    ``fresh()``, which drops the optimizer state the failed step may have half made).
    A measured size that fails ends the measurement (larger ones would too): the line
    goes through the sizes that ran, with batch 1 added when fewer than two did, and
    the largest batch stays below the size that failed. When only batch 1 runs, the
    largest batch is 1 (no slope is measured).

    Args:
        step: runs one full training step at batch size B on ``device``.
        sizes: two or more distinct batch sizes, small enough to fit.
        limit_bytes: the budget; default ``memory_fraction`` × the device's
            total memory.
        fresh: replaces the step's optimizer with a new one (no state).

    Raises:
        OutOfMemoryAtBatchOne: not even batch 1 ran.
    """
    if len(set(sizes)) < 2:
        raise ValueError(f"need at least two distinct batch sizes, got {tuple(sizes)}")
    if limit_bytes is None:
        _free, total = torch.cuda.mem_get_info(device)
        limit_bytes = int(total * memory_fraction)
    order = sorted(set(sizes))
    why: list[str] = []  # what batch 1 raised, when it did not run
    if not _runs(step, order[0], device):  # the warm-up
        if fresh is not None:
            fresh()
        if order[0] == 1 or not _runs(step, 1, device, any_error=True, why=why):
            raise _not_even_one(order[0], why)
        order = [1, *order]
    points: list[tuple[float, float]] = []
    failed: int | None = None
    for b in order:
        point = _peak_after(step, b, device)
        if point is None:
            failed = b
            break
        points.append(point)
    if len(points) < 2 and not any(b == 1.0 for b, _ in points):
        one = _peak_after(step, 1, device, any_error=True, why=why)
        points = ([] if one is None else [one]) + points
    if not points:
        raise _not_even_one(failed, why, " while measuring the memory line")
    if len(points) == 1:
        return MemoryModel(fixed_bytes=int(points[0][1]), bytes_per_example=0.0,
                           max_batch_size=1, limit_bytes=int(limit_bytes), source="measured",
                           tried=(1,))
    intercept, slope = _line(points)
    slope = max(0.0, slope)
    fixed = max(0, int(round(intercept)))
    largest = max_batch_for(limit_bytes, fixed, slope)
    return MemoryModel(
        fixed_bytes=fixed,
        bytes_per_example=slope,
        max_batch_size=largest if failed is None else min(largest, failed - 1),
        limit_bytes=int(limit_bytes),
        source="measured",
        tried=tuple(int(b) for b, _ in points),
    )


def verify_max_batch(
    memory: MemoryModel,
    try_step: Callable[[int], None],
    clear: Callable[[], None],
    upper: int | None = None,
    step_limit: int | None = None,
) -> MemoryModel:
    """Check ``memory.max_batch_size`` with real steps, backing off on OOM.

    Returns the model with ``max_batch_size`` replaced by what ran,
    ``verified=True`` and ``tried`` extended by the sizes stepped.

    Args:
        upper: the largest batch worth having (e.g. the dataset size).
        step_limit: the largest batch worth stepping: a line whose maximum is
            above it is checked there, and its maximum then stands, unverified
            beyond it (``verified=False``), instead of gathering a batch of
            millions and bisecting down from it.

    Raises:
        OutOfMemoryAtBatchOne: when not even one example fits.
    """
    import dataclasses

    start = max(1, memory.max_batch_size)
    if upper is not None:
        start = min(start, upper)
    top = start if step_limit is None else min(start, step_limit)
    found, tried = find_max_batch(try_step, top, None, clear)
    clipped = found == top and top < start
    return dataclasses.replace(memory, max_batch_size=start if clipped else found,
                               verified=not clipped, tried=memory.tried + tried)
