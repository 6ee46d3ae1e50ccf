"""NVIDIA GPU details through NVML, behind one module (the nvitop / gpustat way).

    from bsfind.hardware import nvml
    nvml.available()          # False on a machine without an NVIDIA driver
    nvml.list_devices()       # [DeviceInfo, ...], one per GPU NVML sees
    nvml.describe_device(torch.device("cuda", 0))

The official bindings are the ``nvidia-ml-py`` package (module ``pynvml``;
the PyPI package named "pynvml" is deprecated). NVML is initialised lazily,
once, on the first query (thread-safe) and shut down at interpreter exit.

Absence is a normal path, never an exception: without the library, without a
driver, or when ``nvmlInit`` fails, :func:`available` is False, :func:`hint`
gives a one-line reason, and :func:`device_info` returns a ``DeviceInfo``
whose ``note`` carries that hint. Each query a GPU or driver does not support
(``NVMLError_NotSupported``, an old driver without a function, a GPU that
fell off the bus) turns into ``None`` (N/A) for that field only.

Tests inject a fake ``pynvml`` by monkeypatching :func:`_load_pynvml` and
calling :func:`reset` (see tests/hardware/test_nvml.py).
"""

from __future__ import annotations

import atexit
import os
import platform
import threading
from collections.abc import Callable
from typing import Any, TypeVar

import torch

from bsfind.hardware.memory import ram_bytes
from bsfind.results import DeviceInfo

T = TypeVar("T")

_HINT_FMT = "NVML not available ({reason}): GPU details shown as N/A"

_lock = threading.Lock()
_tried = False  # nvmlInit attempted (successfully or not)
_nvml: Any = None  # the initialised pynvml module, or None
_hint: str | None = None  # why NVML is unavailable
_atexit_registered = False


def _load_pynvml() -> Any:
    """Import the bindings. Tests monkeypatch this to return a fake module."""
    import pynvml

    return pynvml


def _init_failure_reason(mod: Any, exc: BaseException) -> str:
    """Turn an ``nvmlInit`` failure into the reason shown in the hint."""
    for cls_name, reason in (
        ("NVMLError_LibraryNotFound", "no NVIDIA driver"),
        ("NVMLError_DriverNotLoaded", "NVIDIA driver not loaded"),
        ("NVMLError_NoPermission", "no permission to query the NVIDIA driver"),
        ("NVMLError_LibRmVersionMismatch", "NVIDIA driver/library version mismatch; reboot?"),
    ):
        cls = getattr(mod, cls_name, None)
        if isinstance(cls, type) and isinstance(exc, cls):
            return reason
    text = str(exc).strip() or type(exc).__name__
    return f"nvmlInit failed: {text}"


def _shutdown() -> None:
    """Release NVML (registered with atexit once NVML initialised)."""
    global _nvml, _tried
    with _lock:
        mod, _nvml, _tried = _nvml, None, False
    if mod is not None:
        try:
            mod.nvmlShutdown()
        except Exception:  # shutting down at exit must never raise
            pass


def _ensure() -> Any:
    """The initialised pynvml module, or None (then ``_hint`` says why)."""
    global _tried, _nvml, _hint, _atexit_registered
    if _tried:
        return _nvml
    with _lock:
        if _tried:  # another thread won the race
            return _nvml
        try:
            mod = _load_pynvml()
        except ImportError:
            _hint = _HINT_FMT.format(
                reason="nvidia-ml-py is not installed; `pip install nvidia-ml-py`"
            )
            mod = None
        except Exception as exc:  # a broken install must not stop a CPU run
            _hint = _HINT_FMT.format(reason=f"importing pynvml failed: {exc}")
            mod = None
        if mod is not None:
            try:
                mod.nvmlInit()
            except Exception as exc:
                _hint = _HINT_FMT.format(reason=_init_failure_reason(mod, exc))
                mod = None
        if mod is not None:
            _hint = None
            if not _atexit_registered:
                atexit.register(_shutdown)
                _atexit_registered = True
        _nvml = mod
        _tried = True
        return mod


def reset() -> None:
    """Forget the lazy state (shutting NVML down if it was up); tests use it."""
    global _hint
    _shutdown()
    with _lock:
        _hint = None


def available() -> bool:
    """True when NVML is loaded and initialised (an NVIDIA driver is present)."""
    return _ensure() is not None


def hint() -> str | None:
    """The one-line reason NVML is unavailable, or None when it is available."""
    _ensure()
    return _hint


def _query(fn: Callable[..., T], *args: Any) -> T | None:
    """Call one NVML query; anything it cannot answer becomes None (N/A)."""
    try:
        return fn(*args)
    except Exception:  # NVMLError_NotSupported, FunctionNotFound, GPU lost, ...
        return None


def _text(value: Any) -> str | None:
    """NVML strings are bytes in older bindings and str in newer ones."""
    if value is None:
        return None
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return str(value)


def _memory(mod: Any, handle: Any) -> tuple[int | None, int | None]:
    """(total, free) bytes, from the v2 struct where the driver has it, else v1.

    v2 reports ``free`` net of memory the driver reserves, which is what a
    process can actually allocate; v1 counts that reserved memory as free.
    Old drivers lack ``nvmlDeviceGetMemoryInfo_v2`` (FunctionNotFound), some
    GPUs answer NotSupported, and old bindings take no ``version`` argument
    (TypeError): each of those falls back to v1.
    """
    version = getattr(mod, "nvmlMemory_v2", None)
    info = None
    if version is not None:
        try:
            info = mod.nvmlDeviceGetMemoryInfo(handle, version=version)
        except Exception:
            info = None
    if info is None:
        info = _query(mod.nvmlDeviceGetMemoryInfo, handle)
    if info is None:
        return None, None
    total = getattr(info, "total", None)
    free = getattr(info, "free", None)
    return (int(total) if total is not None else None, int(free) if free is not None else None)


def _watts(milliwatts: Any) -> float | None:
    return None if milliwatts is None else float(milliwatts) / 1000.0


def _info(mod: Any, handle: Any, index: int) -> DeviceInfo:
    """Every field NVML can give for one device handle; None where it cannot."""
    total, free = _memory(mod, handle)
    util = _query(mod.nvmlDeviceGetUtilizationRates, handle)
    sm = getattr(mod, "NVML_CLOCK_SM", 1)
    tx = getattr(mod, "NVML_PCIE_UTIL_TX_BYTES", 0)
    rx = getattr(mod, "NVML_PCIE_UTIL_RX_BYTES", 1)
    clock = _query(mod.nvmlDeviceGetClockInfo, handle, sm)
    clock_max = _query(mod.nvmlDeviceGetMaxClockInfo, handle, sm)
    pcie_tx = _query(mod.nvmlDeviceGetPcieThroughput, handle, tx)
    pcie_rx = _query(mod.nvmlDeviceGetPcieThroughput, handle, rx)
    return DeviceInfo(
        type="cuda",
        index=index,
        name=_text(_query(mod.nvmlDeviceGetName, handle)) or f"cuda:{index}",
        total_memory_bytes=total,
        free_memory_bytes=free,
        utilization_gpu_pct=None if util is None else float(getattr(util, "gpu", 0)),
        utilization_mem_pct=None if util is None else float(getattr(util, "memory", 0)),
        sm_clock_mhz=None if clock is None else int(clock),
        sm_clock_max_mhz=None if clock_max is None else int(clock_max),
        power_w=_watts(_query(mod.nvmlDeviceGetPowerUsage, handle)),
        power_limit_w=_watts(_query(mod.nvmlDeviceGetEnforcedPowerLimit, handle)),
        pcie_tx_kbps=None if pcie_tx is None else int(pcie_tx),
        pcie_rx_kbps=None if pcie_rx is None else int(pcie_rx),
        driver_version=_text(_query(mod.nvmlSystemGetDriverVersion)),
    )


def device_info(index: int) -> DeviceInfo:
    """What NVML knows about GPU ``index`` (NVML's numbering, PCI bus order).

    Never raises: without NVML the result has only ``type``/``index`` and a
    ``note`` with the hint; an index NVML does not know gets a note too.
    """
    mod = _ensure()
    if mod is None:
        return DeviceInfo(type="cuda", index=index, name=f"cuda:{index}", note=_hint)
    try:
        handle = mod.nvmlDeviceGetHandleByIndex(index)
    except Exception as exc:
        return DeviceInfo(
            type="cuda", index=index, name=f"cuda:{index}",
            note=f"NVML has no device {index}: {exc}",
        )
    return _info(mod, handle, index)


def list_devices() -> list[DeviceInfo]:
    """One ``DeviceInfo`` per GPU NVML sees; empty without NVML."""
    mod = _ensure()
    if mod is None:
        return []
    count = _query(mod.nvmlDeviceGetCount)
    return [device_info(i) for i in range(int(count or 0))]


def _utilization(mod: Any, handle: Any) -> float | None:
    util = _query(mod.nvmlDeviceGetUtilizationRates, handle)
    gpu = getattr(util, "gpu", None)
    return None if gpu is None else float(gpu)


def sample_utilization(index: int) -> float | None:
    """GPU utilisation in percent over NVML's last sample period, or None.

    ``index`` is NVML's numbering (PCI bus order), not torch's: for torch's
    ``cuda:N`` use :func:`utilization_sampler`. Cheap enough to call after every
    timed step: NVML reports the share of the last 1/6–1 s during which a kernel
    ran, so calling it right after a step reflects that step.
    """
    mod = _ensure()
    if mod is None:
        return None
    handle = _query(mod.nvmlDeviceGetHandleByIndex, index)
    return None if handle is None else _utilization(mod, handle)


def utilization_sampler(torch_device: torch.device) -> Callable[[], float | None] | None:
    """A function sampling the utilisation (as :func:`sample_utilization`) of torch's
    ``torch_device``, or None (not CUDA, no NVML, or NVML cannot identify it).

    The NVML handle is resolved once, as :func:`describe_device` resolves it: by the
    device's UUID, so CUDA_VISIBLE_DEVICES and CUDA_DEVICE_ORDER, which renumber
    torch's devices but not NVML's, do not make it read another GPU (a MIG instance's
    handle has no utilisation: None, not its neighbours').
    """
    if torch_device.type != "cuda" or not torch.cuda.is_available():
        return None
    mod = _ensure()
    if mod is None:
        return None
    handle = _nvml_handle_for(mod, _torch_index(torch_device))
    if handle is None:
        return None
    return lambda: _utilization(mod, handle)


# --------------------------------------------------------------------------- torch devices


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as fh:
            for line in fh:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def _torch_index(torch_device: torch.device) -> int:
    if torch_device.index is not None:
        return torch_device.index
    return torch.cuda.current_device() if torch.cuda.is_available() else 0


def _nvml_handle_for(mod: Any, torch_index: int) -> Any:
    """The NVML handle of torch's ``cuda:torch_index``, or None.

    torch numbers devices after CUDA_VISIBLE_DEVICES and CUDA_DEVICE_ORDER;
    NVML numbers every GPU in PCI bus order. The UUID ties the two together;
    without one, a CUDA_VISIBLE_DEVICES list of integers is mapped by hand.
    """
    try:
        uuid = getattr(torch.cuda.get_device_properties(torch_index), "uuid", None)
    except Exception:
        uuid = None
    if uuid is not None:
        text = str(uuid)
        text = text if text.startswith(("GPU-", "MIG-")) else f"GPU-{text}"
        handle = _query(mod.nvmlDeviceGetHandleByUUID, text)
        if handle is not None:
            return handle
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    nvml_index = torch_index
    if visible is not None:
        parts = [p.strip() for p in visible.split(",") if p.strip()]
        if torch_index < len(parts) and parts[torch_index].isdigit():
            nvml_index = int(parts[torch_index])
        else:
            return None
    return _query(mod.nvmlDeviceGetHandleByIndex, nvml_index)


def _cuda_from_torch(index: int, note: str | None) -> DeviceInfo:
    """CUDA details from torch alone (NVML missing): name and memory."""
    try:
        props = torch.cuda.get_device_properties(index)
    except Exception as exc:
        return DeviceInfo(type="cuda", index=index, name=f"cuda:{index}",
                          note=f"cannot query cuda:{index}: {exc}")
    free: int | None
    try:
        free = int(torch.cuda.mem_get_info(index)[0])
    except Exception:
        free = None
    return DeviceInfo(
        type="cuda", index=index, name=str(props.name),
        total_memory_bytes=int(props.total_memory), free_memory_bytes=free, note=note,
    )


def describe_device(torch_device: torch.device) -> DeviceInfo:
    """The device a probe runs on: NVML details for CUDA, RAM figures for CPU.

    CPU: name from /proc/cpuinfo (else ``platform.processor()``), total RAM
    from ``os.sysconf``, free RAM from /proc/meminfo ``MemAvailable``.
    CUDA: NVML's details when NVML is available, else name and memory from
    ``torch.cuda.get_device_properties`` with the NVML hint as ``note``.
    """
    if torch_device.type == "cuda":
        index = _torch_index(torch_device)
        if not torch.cuda.is_available():
            return DeviceInfo(type="cuda", index=index, name=f"cuda:{index}",
                              note="CUDA is not available in this process")
        mod = _ensure()
        if mod is None:
            return _cuda_from_torch(index, _hint)
        handle = _nvml_handle_for(mod, index)
        if handle is None:
            return _cuda_from_torch(index, f"NVML cannot identify cuda:{index}")
        return _info(mod, handle, index)
    if torch_device.type == "cpu":
        total, free = ram_bytes()
        return DeviceInfo(type="cpu", index=None, name=_cpu_name(),
                          total_memory_bytes=total, free_memory_bytes=free)
    return DeviceInfo(type=torch_device.type, index=torch_device.index,
                      name=str(torch_device), note="no details for this device type")
