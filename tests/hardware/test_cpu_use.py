"""Other processes' CPU use while the step time is measured: said in the report (#14)."""

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


@pytest.mark.parametrize(("share", "gpu"), [(0.6, None), (0.1, None), (0.6, "a100-80gb")])
def test_recommend_says_when_the_machine_was_busy(share: float, gpu: str | None,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """Fake counters in which others use ``share`` of the CPUs while the ladder runs: the
    warning appears exactly when the share reaches BUSY_SHARE and the measured step time
    is the one the advice uses (not with hardware.gpu, whose step time is predicted)."""
    from bsfind import api
    from bsfind.spec import load_spec
    from tests.conftest import CONFIGS

    def fake() -> CpuUse:
        busy, own, clock = iter([0.0, 20.0 * share + 1.0]), iter([0.0, 1.0]), iter([0.0, 10.0])
        return CpuUse(read=lambda: next(busy), own=lambda: next(own),
                      clock=lambda: next(clock), cpus=2)

    monkeypatch.setattr(measure, "CpuUse", fake)
    spec = load_spec(CONFIGS / "digits-mlp.yaml", ["probe.max_seconds=6", "probe.at_steps=[0]"]
                     + ([f"hardware.gpu={gpu}"] if gpu else []))
    report = api.recommend(spec)
    busy = [w for w in report.warnings if w.startswith("other processes used")]
    assert bool(busy) == (share >= BUSY_SHARE and gpu is None)
    if busy:
        assert busy[0].startswith(f"other processes used {share:.0%}")


def test_busy_seconds_from_a_proc_stat_line() -> None:
    from bsfind.hardware.measure import busy_seconds

    # user nice system idle iowait irq softirq steal guest guest_nice, in ticks of 1/100 s
    line = "cpu  1000 100 300 5000 200 10 20 30 400 50"
    # busy = user + nice + system + irq + softirq + steal (guest time is inside user/nice)
    assert busy_seconds(line, 100) == pytest.approx((1000 + 100 + 300 + 10 + 20 + 30) / 100)
    assert busy_seconds("cpu  1000 100 300 5000", 100) == pytest.approx(14.0)  # old kernels
