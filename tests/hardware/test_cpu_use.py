"""Other processes' CPU use around the step-time ladder: the ladder runs on the free cores,
and the report says so (#14)."""

from __future__ import annotations

import sys

import pytest

from bsfind.hardware import measure
from bsfind.hardware.measure import BUSY_SHARE, CpuUse, others_share


def test_others_share_is_the_machine_less_this_process() -> None:
    # 2 CPUs for 10 s = 20 CPU-seconds; the machine was busy 14, this process used 9.
    assert others_share(14.0, 9.0, 10.0, 2) == pytest.approx(0.25)
    assert others_share(8.0, 9.0, 10.0, 2) == 0.0  # tick rounding: never negative
    assert others_share(40.0, 0.0, 10.0, 2) == 1.0
    assert others_share(5.0, 0.0, 0.0, 2) == 0.0


def test_cpu_use_from_fake_counters() -> None:
    busy = iter([100.0, 112.0])
    own = iter([3.0, 7.0])
    clock = iter([50.0, 60.0])
    use = CpuUse(read=lambda: next(busy), own=lambda: next(own), clock=lambda: next(clock),
                 cpus=2)
    use.start()
    assert use.share() == pytest.approx((12.0 - 4.0) / 20.0)


def test_cpu_use_unreadable_is_none() -> None:
    use = CpuUse(read=lambda: None)
    use.start()
    assert use.share() is None


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc/stat")
def test_cpu_use_reads_this_machine() -> None:
    use = CpuUse()
    use.start()
    share = use.share()
    assert share is not None and 0.0 <= share <= 1.0


def steady(share: float, cpus: int = 2, own_rate: float = 0.5) -> CpuUse:
    """Counters in which other processes steadily use ``share`` of ``cpus`` CPUs and this
    process ``own_rate`` CPU-seconds a second; each clock reading is 1 s later."""
    t = [0.0]

    def clock() -> float:
        t[0] += 1.0
        return t[0]

    return CpuUse(read=lambda: t[0] * (share * cpus + own_rate), own=lambda: t[0] * own_rate,
                  clock=clock, cpus=cpus)


def test_steady_counters_give_their_share_every_time() -> None:
    use = steady(0.4)
    use.start()
    assert use.share() == pytest.approx(0.4)
    use.start()
    assert use.share_over(0.25, sleep=lambda s: pytest.fail("no sleep: 1 s passed")) \
        == pytest.approx(0.4)


def test_share_over_sleeps_for_what_is_left() -> None:
    clock = iter([10.0, 10.1, 10.3])
    slept: list[float] = []
    use = CpuUse(read=lambda: 0.0, own=lambda: 0.0, clock=lambda: next(clock), cpus=2)
    use.start()
    assert use.share_over(0.25, sleep=slept.append) == 0.0
    assert slept == [pytest.approx(0.15)]
    assert CpuUse(read=lambda: None).share_over(0.25, sleep=slept.append) is None


@pytest.mark.parametrize(("share", "threads", "cpus", "want"), [
    (None, 2, 2, measure.LadderSetup(2)),  # unreadable: as the run is
    (0.1, 2, 2, measure.LadderSetup(2, share=0.1)),  # quiet
    (0.5, 2, 2, measure.LadderSetup(1, reduced=True, cpu_clock=True, share=0.5)),
    (0.9, 2, 2, measure.LadderSetup(1, reduced=True, cpu_clock=True, share=0.9)),
    (0.5, 1, 2, measure.LadderSetup(1, cpu_clock=True, share=0.5)),  # one thread already
    (0.3, 16, 16, measure.LadderSetup(11, reduced=True, share=0.3)),  # 16 x 0.7 = 11.2
    (0.25, 4, 16, measure.LadderSetup(4, share=0.25)),  # 12 cores free: all 4 threads
])
def test_ladder_setup_uses_the_free_cores(share: float | None, threads: int, cpus: int,
                                          want: measure.LadderSetup) -> None:
    assert measure.ladder_setup(share, threads, cpus) == want


def test_intra_op_threads_are_restored() -> None:
    import torch

    before = torch.get_num_threads()
    with measure.intra_op_threads(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
    with pytest.raises(RuntimeError), measure.intra_op_threads(1):
        raise RuntimeError("a step failed")
    assert torch.get_num_threads() == before


def _recording_ladder(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, bool]]:
    """measure.time_steps, recording (intra-op threads, cpu_clock) of each ladder."""
    import torch

    seen: list[tuple[int, bool]] = []
    real = measure.time_steps

    def time_steps(*args, cpu_clock=False):  # type: ignore[no-untyped-def]
        seen.append((torch.get_num_threads(), cpu_clock))
        return real(*args, cpu_clock=cpu_clock)

    monkeypatch.setattr(measure, "time_steps", time_steps)
    return seen


@pytest.mark.parametrize(("share", "gpu"), [(0.6, None), (0.1, None), (0.6, "a100-80gb")])
def test_recommend_says_when_the_machine_was_busy(share: float, gpu: str | None,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """Fake counters in which others use ``share`` of 2 CPUs: at BUSY_SHARE or more the
    run (the probe and the ladder) runs on the one free core, the ladder timed by the
    thread's CPU time, and the report
    says so when the measured step time is the one the advice uses (not with
    hardware.gpu, whose step time is predicted); below it the ladder runs as the run."""
    import torch

    from bsfind import api
    from bsfind.spec import load_spec
    from tests.conftest import CONFIGS

    monkeypatch.setattr(measure, "CpuUse", lambda: steady(share))
    seen = _recording_ladder(monkeypatch)
    from bsfind import trajectory

    probe_threads: list[int] = []
    real_walk = trajectory.measure

    def walk(*args, **kwargs):  # type: ignore[no-untyped-def]
        probe_threads.append(torch.get_num_threads())
        return real_walk(*args, **kwargs)

    monkeypatch.setattr(trajectory, "measure", walk)
    threads = torch.get_num_threads()
    spec = load_spec(CONFIGS / "digits-mlp.yaml", ["probe.max_seconds=6", "probe.at_steps=[0]"]
                     + ([f"hardware.gpu={gpu}"] if gpu else []))
    report = api.recommend(spec)
    assert torch.get_num_threads() == threads  # restored after the ladder
    busy = share >= BUSY_SHARE
    assert seen == [(1, True)] if busy else seen == [(threads, False)]
    assert probe_threads == [1 if busy else threads]  # the whole run on the free core
    notes = [w for w in report.warnings if w.startswith("other processes used")]
    assert bool(notes) == (busy and gpu is None)
    if notes:
        assert notes[0].startswith(f"other processes used {share:.0%}")
        assert "timed by that thread's CPU time" in notes[0]


def test_a_load_that_starts_during_the_ladder_is_still_reported() -> None:
    from bsfind import wording

    assert wording.busy_while_timing(0.42).startswith("other processes used 42%")
    note = wording.timed_beside_load(0.5, 1, True)
    assert "1 intra-op thread," in note and "those of training on 1 core " in note
    note = wording.timed_beside_load(0.3, 11, False)
    assert "11 intra-op threads;" in note and "CPU time" not in note


def test_the_ladder_budget_is_wall_time_when_steps_are_timed_by_cpu_time() -> None:
    """Beside a load, a step's CPU time (the timing clock) is a third of its wall time
    (the budget clock): the ladder stops on the wall-clock budget, and the line it fits
    is the CPU-time one."""
    import torch

    from bsfind.hardware import timing

    cpu, wall = [0.0], [0.0]

    def step(b: int) -> None:
        t = 1e-3 + 1e-5 * b
        cpu[0] += t
        wall[0] += 3 * t

    curve = timing.time_ladder(step, [8, 16, 32, 64, 128, 256], device=torch.device("cpu"),
                               max_seconds=0.05, max_batch=None, clock=lambda: cpu[0],
                               budget_clock=lambda: wall[0])
    # the budget bound (on the CPU clock, 0.05 s would have lasted three times as long)
    assert 0.05 <= wall[0] <= 0.05 + 3 * (1e-3 + 1e-5 * 256)  # over by one step at most
    assert len(curve.points) >= 2
    assert curve.t0 == pytest.approx(1e-3) and curve.per_example == pytest.approx(1e-5)


def test_busy_seconds_from_a_proc_stat_line() -> None:
    from bsfind.hardware.measure import busy_seconds

    # user nice system idle iowait irq softirq steal guest guest_nice, in ticks of 1/100 s
    line = "cpu  1000 100 300 5000 200 10 20 30 400 50"
    # busy = user + nice + system + irq + softirq + steal (guest time is inside user/nice)
    assert busy_seconds(line, 100) == pytest.approx((1000 + 100 + 300 + 10 + 20 + 30) / 100)
    assert busy_seconds("cpu  1000 100 300 5000", 100) == pytest.approx(14.0)  # old kernels


def test_a_load_that_starts_after_the_build_is_seen_before_the_ladder(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Quiet over the build (the whole run keeps its threads), 60% busy by the time the
    ladder runs: the ladder still runs on the free core, by CPU time."""
    import torch

    from bsfind import api
    from bsfind.spec import load_spec
    from tests.conftest import CONFIGS

    counters = iter([steady(0.0), steady(0.6)])
    monkeypatch.setattr(measure, "CpuUse", lambda: next(counters))
    seen = _recording_ladder(monkeypatch)
    threads = torch.get_num_threads()
    spec = load_spec(CONFIGS / "digits-mlp.yaml", ["probe.max_seconds=6", "probe.at_steps=[0]"])
    report = api.recommend(spec)
    assert seen == [(1, True)] and torch.get_num_threads() == threads
    assert any("timed by that thread's CPU time" in w for w in report.warnings)


def test_a_dataset_read_example_by_example_keeps_the_wall_clock(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Reading such a dataset may wait on files, which a thread's CPU time leaves out."""
    import dataclasses

    from bsfind.budget import Deadline
    from bsfind.pipeline import hardware_options
    from bsfind.runner import LocalRunner
    from bsfind.spec import load_spec
    from bsfind.workload import build
    from tests.conftest import CONFIGS

    monkeypatch.setattr(measure, "CpuUse", lambda: steady(0.6))
    seen = _recording_ladder(monkeypatch)
    spec = load_spec(CONFIGS / "digits-mlp.yaml", [])
    job = build(spec)
    assert job.tensors is not None
    hw = LocalRunner().measure_hardware(dataclasses.replace(job, tensors=None),
                                        hardware_options(spec), Deadline.after(3.0), None)
    assert seen == [(1, False)] and hw.timing_threads in (1, None) and not hw.timing_cpu_clock


STAT = """cpu  5000 0 1000 20000 0 0 0 0 0 0
cpu0 1000 0 200 4000 100 0 0 0 0 0
cpu1 2000 0 300 3000 0 0 0 50 0 0
cpu2 1500 0 400 6000 0 10 0 0 0 0
cpu3 500 0 100 7000 0 0 0 0 0 0
intr 123456 0 0
ctxt 987654
"""


def test_busy_on_sums_only_the_cpus_this_process_may_use() -> None:
    from bsfind.hardware.measure import busy_on

    # ticks of 1/100 s; busy = user + nice + system + irq + softirq + steal
    assert busy_on(STAT, frozenset({1, 2}), 100) == pytest.approx(
        (2000 + 300 + 50) / 100 + (1500 + 400 + 10) / 100)
    assert busy_on(STAT, frozenset({0}), 100) == pytest.approx(12.0)
    # a CPU without a line (offline, or another kernel's layout): cannot say
    assert busy_on(STAT, frozenset({0, 7}), 100) is None
    assert busy_on(STAT, frozenset(), 100) is None


def test_a_busy_host_beside_free_pinned_cpus_is_not_load() -> None:
    """Pinned to CPUs 0-1 of a 4-CPU host whose CPUs 2-3 another job keeps busy: the
    share is of CPUs 0-1, which only this process used."""
    from bsfind.hardware.measure import busy_on

    before = STAT
    # 10 s later: CPUs 2 and 3 busy the whole time (1000 ticks each), CPU 0 busy 4 s
    # with this process's work, CPU 1 idle
    after = STAT.replace("cpu0 1000 0 200 4000", "cpu0 1400 0 200 4600") \
                .replace("cpu1 2000 0 300 3000", "cpu1 2000 0 300 4000") \
                .replace("cpu2 1500", "cpu2 2500").replace("cpu3 500", "cpu3 1500")
    readings = iter([busy_on(before, frozenset({0, 1}), 100),
                     busy_on(after, frozenset({0, 1}), 100)])
    own = iter([0.0, 4.0])
    clock = iter([0.0, 10.0])
    use = CpuUse(read=lambda: next(readings), own=lambda: next(own),
                 clock=lambda: next(clock), cpus=2)
    use.start()
    assert use.share() == pytest.approx(0.0)
    # the whole host's counters would have called half the machine busy
    host = iter([busy_on(before, frozenset(range(4)), 100),
                 busy_on(after, frozenset(range(4)), 100)])
    own, clock = iter([0.0, 4.0]), iter([0.0, 10.0])
    whole = CpuUse(read=lambda: next(host), own=lambda: next(own),
                   clock=lambda: next(clock), cpus=4)
    whole.start()
    assert whole.share() == pytest.approx((24.0 - 4.0) / 40.0)


@pytest.mark.skipif(not hasattr(__import__("os"), "sched_getaffinity"), reason="affinity")
def test_usable_cpus_follow_the_affinity(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    from bsfind.hardware.measure import usable_cpus

    assert usable_cpus() == frozenset(os.sched_getaffinity(0))
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {3, 5})
    assert usable_cpus() == frozenset({3, 5})
    assert CpuUse(read=lambda: 0.0).cpus == 2
    monkeypatch.delattr(os, "sched_getaffinity")
    assert usable_cpus() == frozenset(range(os.cpu_count() or 1))


def test_setup_for_load_counts_the_cpus_of_the_share(monkeypatch: pytest.MonkeyPatch) -> None:
    # 8 CPUs of which others use half: the 4 left are free for 2 threads, whatever
    # os.cpu_count() says of the host (here it says 2, which would leave 1)
    import os

    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    use = steady(0.5, cpus=8)
    use.start()
    with measure.intra_op_threads(2):
        setup = measure.setup_for_load(use)
    assert setup.threads == 2 and not setup.reduced
    assert setup.share == pytest.approx(0.5)


def test_busy_reader_uses_the_pinned_cpus_or_else_the_whole_machine(
        monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    from bsfind.hardware.measure import busy_reader

    monkeypatch.setattr(os, "cpu_count", lambda: 4)
    monkeypatch.setattr(measure, "usable_cpus", lambda: frozenset({1, 2}))
    read, cpus = busy_reader(stat=lambda: STAT, ticks=100)
    assert cpus == 2 and read() == pytest.approx(23.5 + 19.1)  # cpu1 + cpu2, as above
    # a CPU of the affinity has no line: the machine's first line, over all its CPUs
    monkeypatch.setattr(measure, "usable_cpus", lambda: frozenset({1, 9}))
    read, cpus = busy_reader(stat=lambda: STAT, ticks=100)
    assert cpus == 4 and read() == pytest.approx(60.0)  # user 5000 + system 1000 ticks
    # LXCFS shows a container only its cpuset's CPUs, renumbered from 0: four lines on a
    # 64-CPU host are not the host's numbering, so the sum of what is shown, over four
    monkeypatch.setattr(os, "cpu_count", lambda: 64)
    monkeypatch.setattr(measure, "usable_cpus", lambda: frozenset({1, 2}))
    read, cpus = busy_reader(stat=lambda: STAT, ticks=100)
    assert cpus == 4 and read() == pytest.approx(60.0)
    # nothing readable (off Linux): no reading, so no load handling
    read, _ = busy_reader(stat=lambda: None, ticks=100)
    assert read() is None
    # a file that stops parsing later: no reading, not an error
    texts = iter([STAT, "cpu  12 x\n"])
    read, _ = busy_reader(stat=lambda: next(texts), ticks=100)
    assert read() is None


def test_a_plain_cpu_use_reads_through_busy_reader(monkeypatch: pytest.MonkeyPatch) -> None:
    readings = iter([10.0, 13.0])
    monkeypatch.setattr(measure, "busy_reader", lambda: (lambda: next(readings), 3))
    clock = iter([0.0, 2.0])
    use = CpuUse(own=lambda: 0.0, clock=lambda: next(clock))
    use.start()
    assert use.cpus == 3 and use.share() == pytest.approx(3.0 / 6.0)


@pytest.mark.skipif(not hasattr(__import__("os"), "sched_getaffinity"), reason="affinity")
def test_usable_cpus_are_every_thread_s_not_the_main_one_s(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """OMP_PROC_BIND pins the main thread to one CPU; the process still runs on all of
    its threads' CPUs."""
    import os

    from bsfind.hardware.measure import usable_cpus

    pinned = {100: {0}, 101: {1}, 102: {0, 1}}
    monkeypatch.setattr(os, "listdir", lambda path: ["100", "101", "102"])
    monkeypatch.setattr(os, "sched_getaffinity", lambda tid: pinned[tid])
    assert usable_cpus() == frozenset({0, 1})


def test_bsfind_noise_says_it_probed_on_the_free_cores(monkeypatch: pytest.MonkeyPatch) -> None:
    """60% of 2 CPUs busy: the probe runs on the one core left, and the report says so
    (recommend says it with its step times)."""
    from bsfind import api
    from bsfind.spec import load_spec
    from tests.conftest import CONFIGS

    monkeypatch.setattr(measure, "CpuUse", lambda: steady(0.6, cpus=2))
    spec = load_spec(CONFIGS / "digits-mlp.yaml", ["probe.max_seconds=3", "probe.at_steps=[0]"])
    with measure.intra_op_threads(2):
        report = api.measure(spec)
    said = [w for w in report.warnings if "the probe ran on 1 intra-op thread" in w]
    assert len(said) == 1 and said[0].startswith("other processes used 60%")
    monkeypatch.setattr(measure, "CpuUse", lambda: steady(0.0, cpus=2))
    with measure.intra_op_threads(2):
        quiet = api.measure(spec)
    assert not any("intra-op thread" in w for w in quiet.warnings)


def _cgroup_fs(root: object, cgroup: str, files: dict[str, str]) -> str:
    """A fake root: /proc/self/cgroup and the cgroup files given (path -> content)."""
    from pathlib import Path

    base = Path(str(root))
    (base / "proc/self").mkdir(parents=True, exist_ok=True)
    (base / "proc/self/cgroup").write_text(cgroup)
    for path, text in files.items():
        f = base / path.lstrip("/")
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text(text + "\n")
    return str(base)


@pytest.mark.parametrize(("cgroup", "files", "quota"), [
    # cgroup v2 in a namespace (docker --cpus=1.5): the container's own cpu.max at the root
    ("0::/\n", {"/sys/fs/cgroup/cpu.max": "150000 100000"}, 1.5),
    ("0::/\n", {"/sys/fs/cgroup/cpu.max": "max 100000"}, None),
    # v2, the host's tree: the pod's limit holds for its container, which has none
    ("0::/kubepods/pod1/ctr\n", {"/sys/fs/cgroup/kubepods/pod1/ctr/cpu.max": "max 100000",
                                 "/sys/fs/cgroup/kubepods/pod1/cpu.max": "200000 100000",
                                 "/sys/fs/cgroup/kubepods/cpu.max": "max 100000"}, 2.0),
    # a leaf without the cpu controller's files: its parent's limit
    ("0::/kubepods/pod2/ctr\n", {"/sys/fs/cgroup/kubepods/pod2/ctr/cgroup.procs": "1",
                                 "/sys/fs/cgroup/kubepods/pod2/cpu.max": "50000 100000"}, 0.5),
    # the smaller of a parent's and a child's
    ("0::/a/b\n", {"/sys/fs/cgroup/a/b/cpu.max": "300000 100000",
                   "/sys/fs/cgroup/a/cpu.max": "100000 50000"}, 2.0),
    # cgroup v1 (this machine's layout): quota -1 is none
    ("4:memory:/x\n1:cpu:/\n0::/\n", {"/sys/fs/cgroup/cpu/cpu.cfs_quota_us": "-1",
                                      "/sys/fs/cgroup/cpu/cpu.cfs_period_us": "100000"}, None),
    ("3:cpu,cpuacct:/docker/abc\n", {
        "/sys/fs/cgroup/cpu,cpuacct/docker/abc/cpu.cfs_quota_us": "50000",
        "/sys/fs/cgroup/cpu,cpuacct/docker/abc/cpu.cfs_period_us": "100000"}, 0.5),
    # v1, the container's own mount (the host path is not under it): the mount's limit
    ("3:cpu,cpuacct:/docker/abc\n", {
        "/sys/fs/cgroup/cpu,cpuacct/cpu.cfs_quota_us": "300000",
        "/sys/fs/cgroup/cpu,cpuacct/cpu.cfs_period_us": "100000"}, 3.0),
    ("0::/\n", {}, None),  # no cpu controller files
])
def test_cpu_quota_from_cgroup_files(tmp_path: object, cgroup: str, files: dict[str, str],
                                     quota: float | None) -> None:
    root = _cgroup_fs(tmp_path, cgroup, files)
    assert measure.cpu_quota(root) == (None if quota is None else pytest.approx(quota))


def test_cpu_quota_without_proc_is_none(tmp_path: object) -> None:
    assert measure.cpu_quota(str(tmp_path)) is None


def test_a_cpu_quota_caps_the_threads_and_the_report_says_so(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A quota of 1.5 CPUs on a 2-thread run: bsfind runs 1 thread (a quiet machine), the
    warning gives the number to train with, and the run's threads come back."""
    from bsfind import api
    from bsfind.spec import load_spec
    from tests.conftest import CONFIGS

    monkeypatch.setattr(measure, "cpu_quota", lambda: 1.5)
    use = steady(0.0, cpus=2)
    use.start()
    with measure.intra_op_threads(2):
        setup = measure.setup_for_load(use)
    assert (setup.threads, setup.quota, setup.run_threads) == (1, 1.5, 2)
    assert not setup.reduced  # not other processes' load
    monkeypatch.setattr(measure, "CpuUse", lambda: steady(0.0, cpus=2))
    # a loose precision ends the probe early; the budget only bounds a loaded machine
    spec = load_spec(CONFIGS / "digits-mlp.yaml", ["probe.max_seconds=30", "probe.at_steps=[0]",
                                                   "probe.target_rel_error=0.5"])
    seen: list[int] = []
    import torch

    real = measure.intra_op_threads

    def spy(n: int) -> object:
        seen.append(n)
        return real(n)

    monkeypatch.setattr(measure, "intra_op_threads", spy)
    with real(2):
        report = api.measure(spec)
        assert torch.get_num_threads() == 2
    said = [w for w in report.warnings if "CPU quota" in w]
    assert len(said) == 1 and "is 1.5 CPUs, but torch ran 2 intra-op threads" in said[0]
    assert "torch.set_num_threads(1)" in said[0] and seen[0] == 1
    monkeypatch.setattr(measure, "cpu_quota", lambda: 4.0)  # above the threads: nothing
    with real(2):
        quiet = api.measure(spec)
    assert not any("CPU quota" in w for w in quiet.warnings)
