"""Memory and step time of a workload on its own device, and on a GPU that is not here.

The pieces every runner composes (the local one in ``runner.py``, the
data-parallel one in ``distributed.py``): a timed training step, the memory
line (measured on CUDA, predicted elsewhere), the batch sizes of the
step-time ladder and the ladder itself; and :func:`predict_on_gpu` for
``hardware.gpu``. Every timed step trains the live model: callers wrap them in
:func:`bsfind.training.restored_weights`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

from bsfind import torch_compat
from bsfind.budget import Deadline, now
from bsfind.errors import BudgetError, UsageError
from bsfind.hardware import memory as mem
from bsfind.hardware import nvml, timing
from bsfind.results import MemoryModel, TimingCurve
from bsfind.training import ReplacementSampler, training_step
from bsfind.workload import Workload

# Largest batch the step-time ladder tries; beyond it the advisor assumes no further gain
# in throughput (``TimingCurve.segments``).
TIMING_MAX_BATCH = 4096
# Batch sizes at which CUDA memory is measured (two or more, small enough to fit).
CUDA_MEMORY_SIZES = (2, 8, 32)
# The step-time ladder may call saturation only at or above this many times the
# baseline batch, and this many examples: a rung or two slowed by load from other
# processes must not end it (issue #14: on a busy 2-core runner the old ladder
# stopped at batch 4 and the advice collapsed to batch 1).
SATURATION_FLOOR_FACTOR = 4
SATURATION_FLOOR_EXAMPLES = 256
# Before a CPU ladder, other processes' use of the CPUs is sampled over at least this
# long (the memory model's time counts towards it; /proc/stat counts in 10 ms ticks).
LOAD_SAMPLE_SECONDS = 0.25


@dataclass(frozen=True)
class HardwareOptions:
    """How to measure the hardware (from the spec's optimizer and hardware sections).

    Attributes:
        lr: the learning rate of the timed optimizer steps (the baseline's).
        baseline_batch: the batch trained today (the data-parallel runner reports
            each rank's step time at its share of it).
        memory_fraction: share of device memory (or available RAM) a batch may use.
        seed: the timed steps' sampling seed.
    """

    lr: float
    baseline_batch: int = 1
    memory_fraction: float = 0.9
    seed: int = 0


class TrainingStep:
    """One full training step (forward, backward, optimizer) at batch B, on the live
    model, with its own optimizer; ``fresh()`` replaces that optimizer (no state)."""

    def __init__(self, job: Workload, lr: float, seed: int) -> None:
        self.job, self.lr = job, lr
        self.optimizer = job.make_optimizer(lr)
        self.sampler = ReplacementSampler(len(job), torch.Generator().manual_seed(seed))

    def __call__(self, b: int) -> None:
        training_step(self.job, self.optimizer, self.sampler.draw(b), check=False)

    def fresh(self) -> None:
        """A new optimizer: a first step that ran out of memory may have left its state
        half made (Adam's exp_avg without exp_avg_sq), which the next step would trip on."""
        self.optimizer = self.job.make_optimizer(self.lr)


def step_function(job: Workload, lr: float, seed: int) -> TrainingStep:
    """One full training step at batch B (:class:`TrainingStep`)."""
    return TrainingStep(job, lr, seed)


def batch_maker(job: Workload, seed: int) -> Callable[[int], tuple[Any, torch.Tensor]]:
    """``make_batch(B) -> (inputs, targets)``: B examples drawn with replacement."""
    sampler = ReplacementSampler(len(job), torch.Generator().manual_seed(seed))
    return lambda b: job.batch(sampler.draw(b))


def ladder_start(model: torch.nn.Module) -> int:
    """Smallest batch to time: 2 when BatchNorm (training mode) needs > 1 value per channel."""
    return 2 if torch_compat.has_batchnorm_in_training(model) else 1


def memory_model(job: Workload, step: Callable[[int], None], opts: HardwareOptions,
                 ram_share: int = 1) -> MemoryModel:
    """The memory line of one device: measured on CUDA, predicted (counted bytes) elsewhere.

    ``ram_share``: processes sharing this machine's RAM (the ranks of one node).
    Not yet verified by real steps (see :func:`bsfind.hardware.memory.find_max_batch`).
    """
    if job.device.type == "cuda":
        return mem.measure_memory_cuda(step, CUDA_MEMORY_SIZES, job.device,
                                       memory_fraction=opts.memory_fraction,
                                       fresh=getattr(step, "fresh", None))
    # RAM available now excludes the tensors this process already holds that the
    # prediction counts as fixed: they are added back (mem.held_bytes)
    held = mem.held_bytes(job.model, getattr(step, "optimizer", None))
    return mem.predict_memory(
        job.model, batch_maker(job, opts.seed), job.loss_fn, job.optimizer_cls,
        limit_bytes=mem.cpu_memory_limit(opts.memory_fraction) // max(1, ram_share) + held,
        optimizer_kwargs={"lr": opts.lr, **job.optimizer_kwargs}, loss_of=job.fp32_loss,
    )


def with_gradient_buckets(memory: MemoryModel, model: torch.nn.Module) -> MemoryModel:
    """``memory`` for data-parallel training: DistributedDataParallel keeps its gradient
    buckets, one more copy of the trainable parameters' gradients, which the measured
    (or counted) step, with no all-reduce, did not hold. The largest batch shrinks to
    match, and never grows (a maximum lowered by real steps stays)."""
    buckets = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    fixed = memory.fixed_bytes + buckets
    largest = mem.max_batch_for(memory.limit_bytes, fixed, memory.bytes_per_example)
    return dataclasses.replace(memory, fixed_bytes=fixed, ddp_buckets=True,
                               max_batch_size=min(memory.max_batch_size, largest))


def ladder_sizes(job: Workload, memory: MemoryModel) -> list[int]:
    """The batch sizes of the step-time ladder: powers of two up to what fits."""
    first = ladder_start(job.model)
    top = min(memory.max_batch_size, TIMING_MAX_BATCH)
    return timing.geometric_ladder(first, max(first, top))


def capped_by_timing(memory: MemoryModel, curve: TimingCurve | None) -> MemoryModel:
    """``memory`` with its maximum lowered to the largest batch the step-time ladder ran,
    when a larger rung ran out of memory there (a line's or a prediction's maximum is
    not checked by real steps on a CPU: advice above a batch seen to fail would fail)."""
    if curve is None or curve.out_of_memory_at is None:
        return memory
    ran = max(p.batch_size for p in curve.points)
    return dataclasses.replace(memory, max_batch_size=min(memory.max_batch_size, ran),
                               tried=(*memory.tried, curve.out_of_memory_at))


def time_steps(job: Workload, step: Callable[[int], None], sizes: list[int],
               deadline: Deadline, memory: MemoryModel, opts: HardwareOptions,
               cpu_clock: bool = False) -> TimingCurve | None:
    """The step-time ladder on ``job``'s device; None when the budget ran out first.

    ``cpu_clock``: time each step by this thread's CPU time (one intra-op thread beside
    a steady load, :func:`ladder_setup`); the budget stays on the wall clock.
    """
    util = nvml.utilization_sampler(job.device)  # None off CUDA or without NVML
    try:
        floor = max(SATURATION_FLOOR_FACTOR * opts.baseline_batch, SATURATION_FLOOR_EXAMPLES)
        return timing.time_ladder(step, sizes, device=job.device,
                                  max_seconds=max(0.0, deadline.left()),
                                  max_batch=memory.max_batch_size, sample_util=util,
                                  min_top=floor, seed=opts.seed,
                                  clock=time.thread_time if cpu_clock else time.perf_counter,
                                  budget_clock=now)
    except BudgetError:
        return None


def predict_on_gpu(
    job: Workload, memory: MemoryModel | None, gpu_name: str, *, precision: str,
    opts: HardwareOptions,
) -> tuple[MemoryModel, TimingCurve, float | None]:
    """(memory line, t(B), indicative price) predicted for a GPU that is not present."""
    from bsfind.hardware import gpus
    from bsfind.training import restored_weights

    try:
        gpu = gpus.get_gpu(gpu_name)
    except KeyError as exc:
        raise UsageError(f"hardware.gpu: {exc.args[0]}") from None
    make_batch = batch_maker(job, opts.seed)
    with restored_weights(job.model):
        if memory is None or memory.source != "predicted":
            memory = mem.predict_memory(
                job.model, make_batch, job.loss_fn, job.optimizer_cls,
                limit_bytes=gpu.memory_bytes,
                optimizer_kwargs={"lr": opts.lr, **job.optimizer_kwargs}, loss_of=job.fp32_loss,
            )
        flops = gpus.flops_per_example(job.model, make_batch, job.loss_fn, loss_of=job.fp32_loss)
    pred_time = gpus.predict_timing(flops, gpu, precision)
    pred_mem = gpus.predict_memory_on(gpu, memory, opts.memory_fraction)
    return pred_mem, pred_time, gpu.price_per_hour


# ------------------------------------------------------------- other processes' CPU use

# Other processes took at least this share of the machine's CPUs while the step time was
# measured on the CPU: the report says the step times are those of a busy machine.
BUSY_SHARE = 0.25


def others_share(system_busy: float, own_cpu: float, wall: float, cpus: int) -> float:
    """The share of the machine's ``cpus`` that other processes used over ``wall`` seconds:
    the whole machine's busy CPU-seconds ``system_busy`` less this process's ``own_cpu``,
    clipped to [0, 1]."""
    if wall <= 0 or cpus <= 0:
        return 0.0
    return min(1.0, max(0.0, (system_busy - own_cpu) / (wall * cpus)))


def busy_seconds(cpu_line: str, ticks_per_second: float) -> float:
    """Busy CPU-seconds from one /proc/stat line ("cpu" or "cpuN"): every field but idle and
    iowait, less guest and guest_nice (already counted in user and nice); steal counts
    as busy (another machine's work on these CPUs)."""
    fields = [float(v) for v in cpu_line.split()[1:]]
    idle = sum(fields[3:5])  # idle, iowait
    guest = sum(fields[8:10])
    return (sum(fields) - idle - guest) / ticks_per_second


def usable_cpus() -> frozenset[int]:
    """The CPUs this process may run on: the union of its threads' affinities
    (``taskset``, a container's cpuset), which ``os.cpu_count()`` ignores; every CPU
    where the platform cannot say. The union, because a thread can be pinned to fewer
    (``OMP_PROC_BIND`` pins the main thread to one CPU once torch's threads start)."""
    import os

    if not hasattr(os, "sched_getaffinity"):
        return frozenset(range(os.cpu_count() or 1))
    cpus: set[int] = set()
    try:
        for tid in os.listdir("/proc/self/task"):
            with contextlib.suppress(OSError, ValueError):  # a thread that just ended
                cpus |= os.sched_getaffinity(int(tid))
    except OSError:
        pass
    if not cpus:
        try:
            cpus = set(os.sched_getaffinity(0))
        except OSError:
            return frozenset(range(os.cpu_count() or 1))
    return frozenset(cpus)


def cpu_quota(root: str = "/") -> float | None:
    """The CPUs this process's cgroup may use by its CPU bandwidth limit (``docker
    --cpus``, a Kubernetes CPU limit): quota ÷ period, the smallest along its cgroup's
    path (a parent's limit holds for its children); None when there is none, or off
    Linux. cgroup v2 reads ``cpu.max`` ("200000 100000"; "max": none), v1
    ``cpu.cfs_quota_us`` / ``cpu.cfs_period_us`` (-1: none). A quota is not an affinity:
    the process may run on every CPU of its cpuset, but more threads than the quota are
    throttled in turns, and every step waits for the slowest thread. ``root`` stands for
    "/" in tests."""
    import os

    def read(path: str) -> str | None:
        try:
            with open(os.path.join(root, path.lstrip("/")), encoding="ascii") as f:
                return f.read().strip()
        except (OSError, ValueError):
            return None

    def isdir(path: str) -> bool:
        return os.path.isdir(os.path.join(root, path.lstrip("/")))

    groups = read("/proc/self/cgroup")
    if groups is None:
        return None
    limits: list[float] = []
    files: tuple[str, ...]
    for line in groups.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, path = parts
        if controllers == "":  # v2
            mounts, files = ["/sys/fs/cgroup", "/sys/fs/cgroup/unified"], ("cpu.max",)
        elif "cpu" in controllers.split(","):
            mounts = [f"/sys/fs/cgroup/{controllers}", "/sys/fs/cgroup/cpu,cpuacct",
                      "/sys/fs/cgroup/cpu"]
            files = ("cpu.cfs_quota_us", "cpu.cfs_period_us")
        else:
            continue
        for mount in mounts:
            if not isdir(mount):
                continue
            # The cgroup's own directory when the mount shows the host's tree, else the
            # mount itself (a cgroup namespace, or a container's own mount); then up to
            # the mount, since a parent's limit holds for its children.
            here = os.path.join(mount, path.lstrip("/")).rstrip("/")
            if not isdir(here):
                here = mount
            while True:
                limit = _bandwidth(read, here, files)
                if limit is not None:
                    limits.append(limit)
                if len(here) <= len(mount):
                    break
                here = os.path.dirname(here)
            break
    return min(limits) if limits else None


def quota_threads(quota: float) -> int:
    """The threads a CPU quota holds without throttling: its whole CPUs, at least 1."""
    return max(1, math.floor(quota + 1e-9))


def _bandwidth(read: Callable[[str], str | None], here: str, files: tuple[str, ...]
               ) -> float | None:
    """One cgroup directory's CPU limit in CPUs (None: unlimited or unreadable)."""
    import os

    try:
        if len(files) == 1:  # v2 cpu.max: "$MAX $PERIOD"
            text = read(os.path.join(here, files[0]))
            if text is None:
                return None
            quota, _, period = text.partition(" ")
            if quota == "max":
                return None
            return float(quota) / float(period or 100000)
        quota_text, period_text = (read(os.path.join(here, f)) for f in files)
        if quota_text is None or period_text is None or float(quota_text) <= 0:
            return None
        return float(quota_text) / float(period_text)
    except (ValueError, ZeroDivisionError):
        return None


def cpu_lines(stat_text: str) -> dict[int, str]:
    """/proc/stat's per-CPU lines ("cpuN ..."), by N."""
    lines = {}
    for line in stat_text.splitlines():
        head = line.split(maxsplit=1)[0] if line.strip() else ""
        if head.startswith("cpu") and head[3:].isdigit():
            lines[int(head[3:])] = line
    return lines


def busy_on(stat_text: str, cpus: frozenset[int], ticks_per_second: float) -> float | None:
    """Busy CPU-seconds of the CPUs ``cpus`` from /proc/stat's text: the sum of their
    "cpuN" lines. None when one of them has no line (then the caller cannot say)."""
    lines = cpu_lines(stat_text)
    if not cpus or any(c not in lines for c in cpus):
        return None
    return sum(busy_seconds(lines[c], ticks_per_second) for c in cpus)


def _proc_stat() -> str | None:
    try:
        with open("/proc/stat", encoding="ascii") as f:
            return f.read()
    except (OSError, ValueError):
        return None


def busy_reader(stat: Callable[[], str | None] = _proc_stat, ticks: float | None = None
                ) -> tuple[Callable[[], float | None], int]:
    """(a reading of busy CPU-seconds since boot, how many CPUs it covers) for this
    process's CPUs (:func:`usable_cpus`), from /proc/stat's per-CPU lines: on a host whose
    other CPUs are busy with other jobs, only the ones this process shares count.

    Those lines are the host's only when there is one per CPU the machine has: LXCFS
    shows a container its cpuset's CPUs alone, numbered from 0, so numbers would name
    other CPUs. Then (or when one of this process's CPUs has no line) the reading is the
    first line, the sum of every line shown, over the number of lines shown. Off Linux,
    or where /proc/stat cannot be read or parsed, a reading of None."""
    import os

    mine = usable_cpus()
    text = stat()
    try:
        per_second = ticks or float(os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, AttributeError):
        text = None
    if text is None:
        return (lambda: None), len(mine)
    shown = cpu_lines(text)
    host_layout = len(shown) == (os.cpu_count() or 0) and mine <= shown.keys()

    def reading(parse: Callable[[str], float | None]) -> Callable[[], float | None]:
        def read() -> float | None:
            now = stat()
            try:
                return None if now is None else parse(now)
            except (ValueError, IndexError):
                return None
        return read

    if host_layout:
        return reading(lambda t: busy_on(t, mine, per_second)), len(mine)
    return (reading(lambda t: busy_seconds(t.splitlines()[0], per_second)
                    if t.startswith("cpu ") else None),
            len(shown) or os.cpu_count() or 1)


@dataclass(frozen=True)
class LadderSetup:
    """How a CPU ladder is timed beside other processes (:func:`ladder_setup`).

    Attributes:
        threads: torch intra-op threads the ladder runs with.
        reduced: fewer threads than the run has (the cores other processes left free).
        cpu_clock: each step timed by this thread's CPU time (one thread).
        share: other processes' share of the CPUs sampled before the ladder.
        quota / run_threads: the cgroup's CPU quota (:func:`cpu_quota`) when it capped
            the run's ``run_threads`` intra-op threads to whole CPUs of it; else None.
    """

    threads: int
    reduced: bool = False
    cpu_clock: bool = False
    share: float | None = None
    quota: float | None = None
    run_threads: int | None = None


def ladder_setup(share: float | None, threads: int, cpus: int) -> LadderSetup:
    """Time the ladder as the run is, unless other processes took BUSY_SHARE or more of
    the CPUs just before it. Then time it on the cores they leave free, and with one
    thread by that thread's CPU time. Torch's intra-op threads on a shared core wait for
    each other: beside one busy process on 2 cores the per-example cost of a step timed
    with 2 threads was 2.2-5.8x the quiet one (README, timing under load), and no low
    quantile removes a steady load. A thread's CPU time is what its own step took,
    whether or not another process ran in between (the runner keeps the wall clock
    for datasets that are not in-memory tensors: reading them may wait on files)."""
    if share is None or share < BUSY_SHARE:
        return LadderSetup(threads, share=share)
    free = max(1, min(threads, round(cpus * (1.0 - share))))
    return LadderSetup(free, reduced=free < threads, cpu_clock=free == 1, share=share)


def setup_for_load(use: CpuUse) -> LadderSetup:
    """:func:`ladder_setup` for the load ``use`` has seen since it started (sampled for
    at least LOAD_SAMPLE_SECONDS), this process's threads and the CPUs it may run on.
    The threads are at most the whole CPUs of the cgroup's CPU quota (:func:`cpu_quota`,
    at least 1): beyond it they are throttled in turns."""
    threads = torch.get_num_threads()
    quota = cpu_quota()
    allowed = threads if quota is None else min(threads, quota_threads(quota))
    setup = ladder_setup(use.share_over(LOAD_SAMPLE_SECONDS), allowed, use.cpus)
    if allowed < threads:
        setup = dataclasses.replace(setup, quota=quota, run_threads=threads)
    return setup


@contextlib.contextmanager
def intra_op_threads(n: int) -> Iterator[None]:
    """torch's intra-op threads set to ``n`` inside the block, restored after."""
    before = torch.get_num_threads()
    if n != before:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        if torch.get_num_threads() != before:
            torch.set_num_threads(before)


class CpuUse:
    """Other processes' share of this process's CPUs (:func:`usable_cpus`) between
    ``start()`` and ``share()`` (Linux)."""

    def __init__(self, read: Callable[[], float | None] | None = None,
                 own: Callable[[], float] | None = None,
                 clock: Callable[[], float] | None = None, cpus: int | None = None) -> None:
        import os

        reading, covered = busy_reader() if read is None else (read, len(usable_cpus()))
        self._read = reading
        self._own = own or (lambda: sum(os.times()[:2]))
        self._clock = clock or time.perf_counter
        self._cpus = cpus or covered
        self._start: tuple[float, float, float] | None = None

    @property
    def cpus(self) -> int:
        """How many CPUs the share is of."""
        return self._cpus

    def start(self) -> None:
        busy = self._read()
        self._start = None if busy is None else (busy, self._own(), self._clock())

    def share_over(self, seconds: float, sleep: Callable[[float], None] = time.sleep
                   ) -> float | None:
        """:meth:`share` once at least ``seconds`` have passed since ``start()``
        (sleeping for what is left), or None where the machine's use cannot be read."""
        if self._start is None:
            return None
        rest = seconds - (self._clock() - self._start[2])
        if rest > 0:
            sleep(rest)
        return self.share()

    def share(self) -> float | None:
        """The share since ``start()``, or None where the machine's use cannot be read."""
        busy = self._read()
        if self._start is None or busy is None:
            return None
        b0, o0, w0 = self._start
        return others_share(busy - b0, self._own() - o0, self._clock() - w0, self._cpus)
