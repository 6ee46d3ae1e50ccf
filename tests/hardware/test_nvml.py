"""NVML through a fake ``pynvml``: three GPUs, old drivers, unsupported queries, no driver.

    .venv/bin/python -m pytest tests/hardware/test_nvml.py -q
"""

from __future__ import annotations

import threading
import types
from collections.abc import Iterator
from typing import Any

import pytest
import torch

from bsfind.hardware import nvml

GIB = 1 << 30


class FakeNVMLError(Exception):
    value = 999

    def __str__(self) -> str:
        return type(self).__name__


class NotSupported(FakeNVMLError):
    value = 3


class FunctionNotFound(FakeNVMLError):
    value = 13


class LibraryNotFound(FakeNVMLError):
    value = 12


class DriverNotLoaded(FakeNVMLError):
    value = 9


class InvalidArgument(FakeNVMLError):
    value = 2


# Three different GPUs: name (bytes, as older bindings return), memory (v2 free is
# net of reserved memory, v1 free is not, so the tests can tell which one was read).
GPUS: list[dict[str, Any]] = [
    dict(name=b"NVIDIA H100 80GB HBM3", uuid="GPU-aaaa", total=80 * GIB, free_v2=70 * GIB,
         free_v1=71 * GIB, util=(87, 40), sm=(1980, 1980), power=(650_500, 700_000),
         pcie=(1200, 3400)),
    dict(name=b"NVIDIA A100-SXM4-40GB", uuid="GPU-bbbb", total=40 * GIB, free_v2=30 * GIB,
         free_v1=31 * GIB, util=(10, 5), sm=(1410, 1410), power=(90_000, 400_000),
         pcie=(10, 20)),
    dict(name="Tesla T4", uuid="GPU-cccc", total=15 * GIB, free_v2=14 * GIB,
         free_v1=15 * GIB, util=(0, 0), sm=(300, 1590), power=(27_123, 70_000),
         pcie=(0, 0)),
]


class FakePynvml(types.ModuleType):
    """Just enough of nvidia-ml-py's surface, with switches for the failure modes."""

    NVMLError = FakeNVMLError
    NVMLError_NotSupported = NotSupported
    NVMLError_FunctionNotFound = FunctionNotFound
    NVMLError_LibraryNotFound = LibraryNotFound
    NVMLError_DriverNotLoaded = DriverNotLoaded
    NVML_CLOCK_SM = 1
    NVML_PCIE_UTIL_TX_BYTES = 0
    NVML_PCIE_UTIL_RX_BYTES = 1
    nvmlMemory_v2 = 0x02000028

    def __init__(self, gpus: list[dict[str, Any]] | None = None, *,
                 memory_v2: str = "ok", unsupported: frozenset[str] = frozenset(),
                 init_error: BaseException | None = None) -> None:
        super().__init__("pynvml")
        self.gpus = GPUS if gpus is None else gpus
        self.memory_v2 = memory_v2  # "ok" | "missing" (FunctionNotFound) | "typeerror" | ...
        self.unsupported = unsupported
        self.init_error = init_error
        self.inits = 0
        self.shutdowns = 0
        self.calls: list[str] = []

    def _check(self, fn: str) -> None:
        self.calls.append(fn)
        if fn in self.unsupported:
            raise NotSupported()

    def _gpu(self, handle: int) -> dict[str, Any]:
        return self.gpus[handle]

    def nvmlInit(self) -> None:
        if self.init_error is not None:
            raise self.init_error
        self.inits += 1

    def nvmlShutdown(self) -> None:
        self.shutdowns += 1

    def nvmlDeviceGetCount(self) -> int:
        return len(self.gpus)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> int:
        if not 0 <= index < len(self.gpus):
            raise InvalidArgument()
        return index

    def nvmlDeviceGetHandleByUUID(self, uuid: str) -> int:
        for i, g in enumerate(self.gpus):
            if g["uuid"] == uuid:
                return i
        raise InvalidArgument()

    def nvmlDeviceGetName(self, h: int) -> Any:
        self._check("nvmlDeviceGetName")
        return self._gpu(h)["name"]

    def nvmlDeviceGetMemoryInfo(self, h: int, version: int | None = None) -> Any:
        g = self._gpu(h)
        if version is not None:
            self.calls.append("memory_v2")
            if self.memory_v2 == "missing":
                raise FunctionNotFound()
            if self.memory_v2 == "typeerror":
                raise TypeError("nvmlDeviceGetMemoryInfo() got an unexpected keyword 'version'")
            if self.memory_v2 == "notsupported":
                raise NotSupported()
            return types.SimpleNamespace(total=g["total"], free=g["free_v2"],
                                         reserved=g["free_v1"] - g["free_v2"])
        self.calls.append("memory_v1")
        self._check("memory_v1")
        return types.SimpleNamespace(total=g["total"], free=g["free_v1"])

    def nvmlDeviceGetUtilizationRates(self, h: int) -> Any:
        self._check("nvmlDeviceGetUtilizationRates")
        gpu, mem = self._gpu(h)["util"]
        return types.SimpleNamespace(gpu=gpu, memory=mem)

    def nvmlDeviceGetClockInfo(self, h: int, kind: int) -> int:
        assert kind == self.NVML_CLOCK_SM
        self._check("nvmlDeviceGetClockInfo")
        return int(self._gpu(h)["sm"][0])

    def nvmlDeviceGetMaxClockInfo(self, h: int, kind: int) -> int:
        assert kind == self.NVML_CLOCK_SM
        self._check("nvmlDeviceGetMaxClockInfo")
        return int(self._gpu(h)["sm"][1])

    def nvmlDeviceGetPowerUsage(self, h: int) -> int:
        self._check("nvmlDeviceGetPowerUsage")
        return int(self._gpu(h)["power"][0])

    def nvmlDeviceGetEnforcedPowerLimit(self, h: int) -> int:
        self._check("nvmlDeviceGetEnforcedPowerLimit")
        return int(self._gpu(h)["power"][1])

    def nvmlDeviceGetPcieThroughput(self, h: int, counter: int) -> int:
        self._check("nvmlDeviceGetPcieThroughput")
        return int(self._gpu(h)["pcie"][counter])

    def nvmlSystemGetDriverVersion(self) -> bytes:
        self._check("nvmlSystemGetDriverVersion")
        return b"550.54.15"


@pytest.fixture(autouse=True)
def _fresh_nvml() -> Iterator[None]:
    nvml.reset()
    yield
    nvml.reset()


def install(monkeypatch: pytest.MonkeyPatch, fake: Any) -> Any:
    monkeypatch.setattr(nvml, "_load_pynvml", lambda: fake)
    return fake


def test_three_gpus(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = install(monkeypatch, FakePynvml())
    assert nvml.available()
    assert nvml.hint() is None
    devices = nvml.list_devices()
    assert [d.name for d in devices] == ["NVIDIA H100 80GB HBM3", "NVIDIA A100-SXM4-40GB",
                                         "Tesla T4"]
    assert [d.index for d in devices] == [0, 1, 2]
    assert [d.total_memory_bytes for d in devices] == [80 * GIB, 40 * GIB, 15 * GIB]
    assert [d.free_memory_bytes for d in devices] == [70 * GIB, 30 * GIB, 14 * GIB]  # v2
    h100 = devices[0]
    assert h100.type == "cuda"
    assert h100.utilization_gpu_pct == 87.0 and h100.utilization_mem_pct == 40.0
    assert (h100.sm_clock_mhz, h100.sm_clock_max_mhz) == (1980, 1980)
    assert h100.power_w == pytest.approx(650.5)  # mW -> W
    assert h100.power_limit_w == pytest.approx(700.0)
    assert (h100.pcie_tx_kbps, h100.pcie_rx_kbps) == (1200, 3400)
    assert h100.driver_version == "550.54.15"  # bytes decoded
    assert h100.note is None
    assert devices[2].sm_clock_mhz == 300 and devices[2].sm_clock_max_mhz == 1590
    assert "memory_v1" not in fake.calls
    assert fake.inits == 1  # lazy init, once


def test_init_once_across_threads(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = install(monkeypatch, FakePynvml())
    barrier = threading.Barrier(8)

    def worker() -> None:
        barrier.wait()
        nvml.available()
        nvml.device_info(1)

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert fake.inits == 1


def test_shutdown_registered_and_called(monkeypatch: pytest.MonkeyPatch) -> None:
    registered: list[Any] = []
    monkeypatch.setattr(nvml.atexit, "register", registered.append)
    monkeypatch.setattr(nvml, "_atexit_registered", False)
    fake = install(monkeypatch, FakePynvml())
    assert nvml.available()
    nvml.available()
    assert registered == [nvml._shutdown]
    nvml._shutdown()
    assert fake.shutdowns == 1
    nvml._shutdown()  # a second shutdown is a no-op
    assert fake.shutdowns == 1


@pytest.mark.parametrize("mode", ["missing", "typeerror", "notsupported"])
def test_memory_falls_back_to_v1(monkeypatch: pytest.MonkeyPatch, mode: str) -> None:
    fake = install(monkeypatch, FakePynvml(memory_v2=mode))
    info = nvml.device_info(0)
    assert info.total_memory_bytes == 80 * GIB
    assert info.free_memory_bytes == 71 * GIB  # the v1 figure
    assert fake.calls.index("memory_v2") < fake.calls.index("memory_v1")


def test_bindings_without_v2_constant(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = FakePynvml()
    monkeypatch.setattr(FakePynvml, "nvmlMemory_v2", None)
    install(monkeypatch, fake)
    assert nvml.device_info(1).free_memory_bytes == 31 * GIB
    assert "memory_v2" not in fake.calls


@pytest.mark.parametrize(
    "unsupported, field",
    [
        ("nvmlDeviceGetPowerUsage", "power_w"),
        ("nvmlDeviceGetEnforcedPowerLimit", "power_limit_w"),
        ("nvmlDeviceGetClockInfo", "sm_clock_mhz"),
        ("nvmlDeviceGetMaxClockInfo", "sm_clock_max_mhz"),
        ("nvmlDeviceGetUtilizationRates", "utilization_gpu_pct"),
        ("nvmlDeviceGetPcieThroughput", "pcie_tx_kbps"),
        ("nvmlSystemGetDriverVersion", "driver_version"),
    ],
)
def test_not_supported_becomes_none(
    monkeypatch: pytest.MonkeyPatch, unsupported: str, field: str
) -> None:
    install(monkeypatch, FakePynvml(unsupported=frozenset({unsupported})))
    info = nvml.device_info(0)
    assert getattr(info, field) is None
    assert info.name == "NVIDIA H100 80GB HBM3"  # the rest is still there
    assert info.total_memory_bytes == 80 * GIB


def test_everything_unsupported(monkeypatch: pytest.MonkeyPatch) -> None:
    every = frozenset({
        "nvmlDeviceGetName", "memory_v1", "nvmlDeviceGetUtilizationRates",
        "nvmlDeviceGetClockInfo", "nvmlDeviceGetMaxClockInfo", "nvmlDeviceGetPowerUsage",
        "nvmlDeviceGetEnforcedPowerLimit", "nvmlDeviceGetPcieThroughput",
        "nvmlSystemGetDriverVersion",
    })
    install(monkeypatch, FakePynvml(memory_v2="notsupported", unsupported=every))
    info = nvml.device_info(2)
    assert info.name == "cuda:2"
    assert info.total_memory_bytes is None and info.free_memory_bytes is None
    assert info.power_w is None and info.utilization_gpu_pct is None
    assert nvml.sample_utilization(2) is None


def test_unknown_index_gets_a_note(monkeypatch: pytest.MonkeyPatch) -> None:
    install(monkeypatch, FakePynvml())
    info = nvml.device_info(7)
    assert info.index == 7 and info.note and "no device 7" in info.note


def test_sample_utilization(monkeypatch: pytest.MonkeyPatch) -> None:
    install(monkeypatch, FakePynvml())
    assert nvml.sample_utilization(0) == 87.0
    assert nvml.sample_utilization(1) == 10.0
    assert nvml.sample_utilization(9) is None


def test_no_library(monkeypatch: pytest.MonkeyPatch) -> None:
    def missing() -> Any:
        raise ImportError("No module named 'pynvml'")

    monkeypatch.setattr(nvml, "_load_pynvml", missing)
    assert not nvml.available()
    hint = nvml.hint()
    assert hint is not None and "\n" not in hint
    assert hint.startswith("NVML not available") and "nvidia-ml-py" in hint
    assert hint.endswith("GPU details shown as N/A")
    info = nvml.device_info(0)
    assert info.note == hint and info.total_memory_bytes is None
    assert nvml.list_devices() == []
    assert nvml.sample_utilization(0) is None


@pytest.mark.parametrize(
    "error, reason",
    [(LibraryNotFound(), "no NVIDIA driver"), (DriverNotLoaded(), "NVIDIA driver not loaded")],
)
def test_init_failure(monkeypatch: pytest.MonkeyPatch, error: Exception, reason: str) -> None:
    install(monkeypatch, FakePynvml(init_error=error))
    assert not nvml.available()
    assert nvml.hint() == f"NVML not available ({reason}): GPU details shown as N/A"
    assert nvml.device_info(0).note == nvml.hint()
    assert nvml.list_devices() == []


def test_other_init_failure_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    install(monkeypatch, FakePynvml(init_error=OSError("libnvidia-ml.so.1: cannot open")))
    assert not nvml.available()
    hint = nvml.hint()
    assert hint is not None and "libnvidia-ml.so.1" in hint


def test_reset_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    install(monkeypatch, FakePynvml(init_error=DriverNotLoaded()))
    assert not nvml.available()
    install(monkeypatch, FakePynvml())
    assert not nvml.available()  # the failure is remembered ...
    nvml.reset()
    assert nvml.available()  # ... until reset


def test_real_bindings_never_raise() -> None:
    # On this machine (no NVIDIA driver) the real pynvml fails to init: N/A, no crash.
    ok = nvml.available()
    if not ok:
        assert nvml.hint()
        assert nvml.device_info(0).note == nvml.hint()
    assert isinstance(nvml.list_devices(), list)


def test_describe_cpu() -> None:
    info = nvml.describe_device(torch.device("cpu"))
    assert info.type == "cpu" and info.name
    assert info.total_memory_bytes is not None and info.total_memory_bytes > 0
    assert info.free_memory_bytes is not None
    assert 0 < info.free_memory_bytes <= info.total_memory_bytes


def fake_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    props = [types.SimpleNamespace(name=g["name"] if isinstance(g["name"], str)
                                   else g["name"].decode(), total_memory=g["total"],
                                   uuid=g["uuid"][len("GPU-"):]) for g in GPUS]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: props[i])
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda i: (GPUS[i]["free_v1"] - 1,
                                                               GPUS[i]["total"]))


def test_describe_cuda_via_uuid(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_cuda(monkeypatch)
    # torch's cuda:0 is NVML's GPU 2 (CUDA_VISIBLE_DEVICES=2): the UUID ties them.
    props = torch.cuda.get_device_properties
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: props(2 - i))
    install(monkeypatch, FakePynvml())
    info = nvml.describe_device(torch.device("cuda", 0))
    assert info.name == "Tesla T4" and info.index == 0
    assert info.sm_clock_max_mhz == 1590


def test_describe_cuda_visible_devices(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_cuda(monkeypatch)
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda i: types.SimpleNamespace(name="x", total_memory=1))  # no uuid
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1,2")
    install(monkeypatch, FakePynvml())
    assert nvml.describe_device(torch.device("cuda", 1)).name == "Tesla T4"
    assert nvml.describe_device(torch.device("cuda")).name == "NVIDIA A100-SXM4-40GB"


def test_utilisation_while_timing_is_sampled_from_torchs_device(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Timing cuda:0 sampled NVML's GPU 0 however torch numbered its devices: with
    CUDA_VISIBLE_DEVICES=1 (torch's cuda:0 is the A100, 10% busy) the H100's 87%
    next to it was reported. The step-time ladder gets the device's own sampler."""
    from bsfind.hardware import measure, timing
    from bsfind.results import MemoryModel

    fake_cuda(monkeypatch)
    props = torch.cuda.get_device_properties
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: props(i + 1))
    install(monkeypatch, FakePynvml())
    sampler = nvml.utilization_sampler(torch.device("cuda", 0))
    assert sampler is not None and sampler() == 10.0
    t4 = nvml.utilization_sampler(torch.device("cuda", 1))
    assert t4 is not None and t4() == 0.0
    assert nvml.utilization_sampler(torch.device("cpu")) is None
    seen: list[float | None] = []

    def ladder(step: Any, sizes: Any, **kw: Any) -> Any:
        seen.append(kw["sample_util"]())
        raise timing.BudgetError("stop")

    monkeypatch.setattr(timing, "time_ladder", ladder)
    job: Any = types.SimpleNamespace(device=torch.device("cuda", 0))
    memory = MemoryModel(fixed_bytes=0, bytes_per_example=1.0, max_batch_size=64,
                         limit_bytes=100, source="measured")
    deadline: Any = types.SimpleNamespace(left=lambda: 10.0)
    assert measure.time_steps(job, lambda b: None, [1, 2], deadline, memory,
                              measure.HardwareOptions(lr=0.1)) is None
    assert seen == [10.0]


def test_utilisation_sampler_by_visible_devices_and_without_nvml(
        monkeypatch: pytest.MonkeyPatch) -> None:
    fake_cuda(monkeypatch)
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda i: types.SimpleNamespace(name="x", total_memory=1))  # no uuid
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1,2")
    install(monkeypatch, FakePynvml())
    a100 = nvml.utilization_sampler(torch.device("cuda"))
    assert a100 is not None and a100() == 10.0
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-unknown")
    assert nvml.utilization_sampler(torch.device("cuda", 0)) is None  # not another GPU's
    nvml.reset()
    install(monkeypatch, FakePynvml(init_error=LibraryNotFound()))
    assert nvml.utilization_sampler(torch.device("cuda", 0)) is None


def test_describe_cuda_without_nvml(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_cuda(monkeypatch)
    install(monkeypatch, FakePynvml(init_error=LibraryNotFound()))
    info = nvml.describe_device(torch.device("cuda", 1))
    assert info.type == "cuda" and info.index == 1
    assert info.name == "NVIDIA A100-SXM4-40GB"
    assert info.total_memory_bytes == 40 * GIB
    assert info.free_memory_bytes == 31 * GIB - 1
    assert info.note == nvml.hint() and info.power_w is None


def test_describe_cuda_when_cuda_is_absent(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    info = nvml.describe_device(torch.device("cuda", 0))
    assert info.type == "cuda" and info.note
