"""The advisor against closed forms and hand calculations (no torch runs).

Running example used by several tests: B_n = 2000, baseline B0 = 64,
t(B) = 20 ms + 0.1 ms·B on one device (t0/c = 200 examples), so the
time-optimal batch is sqrt(2000·200) = 632.46.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bsfind.advisor import (
    INTERCONNECTS,
    Advice,
    AdvisorInputs,
    accumulation_steps,
    ceil_allowed,
    floor_allowed,
    interconnect,
    optimizer_family,
    round_batch,
    scaled_lr,
    step_seconds,
    steps_ratio,
    sync_seconds,
)
from bsfind.advisor import advise as advise_numbers
from bsfind.errors import UsageError
from bsfind.results import Interval, MemoryModel, TimingCurve
from bsfind.wording import describe_advice

T0, C, BN, B0 = 0.02, 1e-4, 2000.0, 64


def advise(inp: AdvisorInputs, max_gpus: int | None = None) -> Advice:
    """The advice with its words written, as the pipeline produces it."""
    return describe_advice(advise_numbers(inp, max_gpus=max_gpus), inp)


def curve(t0: float = T0, c: float = C, source: str = "measured") -> TimingCurve:
    return TimingCurve(points=(), t0=t0, per_example=c, r2=1.0, source=source)  # type: ignore[arg-type]


def memory(max_batch: int) -> MemoryModel:
    return MemoryModel(fixed_bytes=1_000_000, bytes_per_example=10_000.0,
                       max_batch_size=max_batch, limit_bytes=10**10, source="predicted")


def inputs(**kw: object) -> AdvisorInputs:
    base: dict[str, object] = dict(
        b_n=BN, b_n_ci=Interval(800.0, 1152.0), baseline_batch=B0, baseline_lr=0.1,
        optimizer_family="sgd", dataset_size=10**6, timing=curve(),
    )
    base.update(kw)
    return AdvisorInputs(**base)  # type: ignore[arg-type]


def wall(b: float, b_n: float, t0: float, c: float, gpus: int = 1, sync: float = 0.0,
         max_micro: int | None = None) -> float:
    """S(B)/S_min · t(B), written out independently of the advisor."""
    a = 1 if max_micro is None else math.ceil(b / (gpus * max_micro))
    return (1 + b_n / b) * (a * t0 + c * b / gpus + sync)


# ------------------------------------------------------------------ one device


def test_one_device_optimum_is_sqrt_bn_t0_over_c() -> None:
    adv = advise(inputs())
    assert adv.optimum == pytest.approx(math.sqrt(BN * T0 / C), rel=1e-3)  # 632.46
    # Rounded to the better of its multiple-of-8 neighbours 632 and 640:
    # (1 + 2000/632)(0.02 + 0.0632) = 0.346491 < (1 + 2000/640)(0.02 + 0.064) = 0.346500.
    assert wall(632, BN, T0, C) < wall(640, BN, T0, C)
    assert adv.recommendation.batch_size == 632
    assert adv.recommendation.gpus == 1 and adv.recommendation.grad_accumulation == 1


@pytest.mark.parametrize("bn, t0, c", [(50.0, 0.01, 1e-3), (1e4, 0.05, 1e-5), (3.0, 0.1, 1e-2)])
def test_optimum_closed_form_other_numbers(bn: float, t0: float, c: float) -> None:
    adv = advise(inputs(b_n=bn, b_n_ci=Interval(bn / 2, bn * 2), timing=curve(t0, c)))
    x = math.sqrt(bn * t0 / c)
    assert adv.optimum == pytest.approx(x, rel=1e-3)
    rec = adv.recommendation.batch_size
    assert rec in {floor_allowed(x), ceil_allowed(x), B0}


def test_rounding_rule() -> None:
    # Multiples of 8 (nearest, ties up); 1, 2, 4, 8 below 8 (log-nearest).
    assert [round_batch(x) for x in (0.3, 1.0, 1.4, 1.5, 3.0, 5.0, 6.0)] == [1, 1, 1, 2, 4, 4, 8]
    assert [round_batch(x) for x in (11.9, 12.0, 100.0, 1000.1)] == [8, 16, 104, 1000]
    # past the cap, the cap itself (the whole dataset), or the unit's multiple below it
    assert round_batch(1000.0, cap=500) == 500
    assert round_batch(1000.0, cap=500, unit=3) == 498
    assert round_batch(1000.0, cap=500, whole=False) == 496  # does not split over devices
    assert round_batch(100.0, cap=5) == 5
    assert floor_allowed(0.5) is None and floor_allowed(7.9) == 4 and floor_allowed(17) == 16
    assert ceil_allowed(0.2) == 1 and ceil_allowed(4.5) == 8 and ceil_allowed(17) == 24


def test_clipped_to_dataset_size() -> None:
    adv = advise(inputs(dataset_size=300))
    # The objective falls all the way to 632 > 300: the optimum is the dataset
    # size, and so is the recommendation (the whole dataset is an allowed batch: it was
    # rounded down to 296, and to 16 for 20 examples in the new-user trial).
    assert adv.optimum == pytest.approx(300.0)
    assert adv.recommendation.batch_size == 300
    assert all(c.batch_size <= 300 for c in adv.candidates)
    # the noise scale (2,000) is above the dataset: that is said, not only "clipped" (a
    # trial: 20 examples, B_n 39-49, and nothing said that full-batch steps are the advice)
    said = [n for n in adv.recommendation.notes if "above the dataset's 300 examples" in n]
    assert len(said) == 1 and "full-batch training (300, every" in said[0], said
    odd = advise(inputs(dataset_size=301, gpus=2)).recommendation  # 296 (see below)
    assert any("allows (296: the whole of it does not split" in n for n in odd.notes), odd
    assert not any("clipped" in n for n in adv.recommendation.notes)
    # below the dataset, an optimum past it (sqrt(200 · 0.2 / 1e-4) = 632) is "clipped"
    mid = advise(inputs(dataset_size=300, b_n=200.0, b_n_ci=Interval(180.0, 220.0),
                        timing=curve(t0=0.2)))
    assert mid.recommendation.batch_size == 300
    assert any("optimum reaches the dataset size (300)" in n for n in mid.recommendation.notes)
    assert not any("above the dataset's" in n for n in mid.recommendation.notes)
    # The advisor itself returns the fact; the words come from bsfind.wording.
    bare = advise_numbers(inputs(dataset_size=300))
    assert bare.facts.optimum_clipped and bare.recommendation.notes == ()
    assert bare.recommendation.basis == "" and bare.recommendation.warmup is None
    # ... when it splits evenly over the devices: 301 on 2 or 4 GPUs would give them
    # 151 or 76 each (review); then a multiple of 8 below it
    assert advise(inputs(dataset_size=300, gpus=2)).recommendation.batch_size == 300
    for gpus in (2, 4):
        rec = advise(inputs(dataset_size=301, gpus=gpus)).recommendation
        assert rec.batch_size == 296 and rec.batch_size % gpus == 0
    # on 3 devices no multiple of 8 near it splits evenly either: the whole dataset
    assert advise(inputs(dataset_size=301, gpus=3)).recommendation.batch_size == 301


def test_never_below_one_for_tiny_noise_scale() -> None:
    adv = advise(inputs(b_n=0.01, b_n_ci=Interval(0.005, 0.02), baseline_batch=1))
    # sqrt(0.01·200) = 1.41 -> 1 or 2.
    assert adv.optimum == pytest.approx(math.sqrt(0.01 * 200), rel=1e-3)
    assert adv.recommendation.batch_size in (1, 2)
    assert min(c.batch_size for c in adv.candidates) == 1


def test_time_ratio_hand_calculation() -> None:
    adv = advise(inputs())
    rec = adv.recommendation
    # steps: (1 + 2000/632)/(1 + 2000/64) = 4.1645570/32.25 = 0.12913355
    # time per step: t(632) = 0.0832 s, t(64) = 0.0264 s
    # ratio: 0.12913355 · 0.0832/0.0264 = 0.40696634
    assert rec.predicted_time_ratio == pytest.approx(0.40696634, rel=1e-6)
    assert rec.predicted_cost_ratio == pytest.approx(0.40696634, rel=1e-6)  # same device
    row = next(c for c in adv.candidates if c.is_recommended)
    assert row.steps_ratio == pytest.approx(0.12913355, rel=1e-6)
    assert row.step_seconds == pytest.approx(0.0832)
    base = next(c for c in adv.candidates if c.is_baseline)
    assert base.batch_size == 64 and base.time_ratio == pytest.approx(1.0)
    assert base.step_seconds == pytest.approx(0.0264)


# ---------------------------------------------------------------- accumulation


def test_accumulation_caps_the_optimum_at_the_memory_limit() -> None:
    """With M = 64 examples fitting and no sync, the optimum is min(B*, M).

    For B > M with a = ceil(B/M) >= B/M micro-steps:
    (1 + B_n/B)(a·t0 + c·B) >= (1 + B_n/B)·B·(t0/M + c) = (B + B_n)(t0/M + c),
    which grows with B and equals the objective at B = M. So accumulating
    never pays on one device: B* = sqrt(2000·200) = 632 moves down to 64.
    """
    adv = advise(inputs(memory=memory(64)))
    assert adv.optimum == pytest.approx(64.0)
    assert adv.recommendation.batch_size == 64
    # t uses a = ceil(B/M) micro-steps of t0 each: t(192) = 3·0.02 + 1e-4·192.
    row = next(c for c in adv.candidates if c.batch_size == 192)
    assert (row.grad_accumulation, row.per_device_batch_size, row.fits) == (3, 64, False)
    assert row.step_seconds == pytest.approx(0.0792)
    assert row.memory_bytes == pytest.approx(1_000_000 + 10_000.0 * 64)
    assert accumulation_steps(200, 1, 64) == 4
    assert step_seconds(200, curve(), max_batch_size=64) == pytest.approx(4 * 0.02 + 0.02)
    # A limit above the optimum changes nothing.
    assert advise(inputs(memory=memory(1000))).recommendation.batch_size == 632


def test_accumulation_pays_when_the_sync_is_expensive() -> None:
    """2 devices, 64 fit per device, all-reduce 1 s per optimizer step.

    At full pieces B = 128·a: t = a·t0 + c·B/2 + 1 = B·(t0/128 + c/2) + 1, so
    wall ∝ (1 + B_n/B)(B·1.28125e-4 + 1), minimised at
    sqrt(1e5/1.28125e-4) = 27937.3 = 128·218.26. Inside a piece the
    minimiser sqrt(B_n·(a·t0 + 1)/(c/2)) ~ 8e4 lies beyond the piece, so the
    optimum is the piece end 128·218 = 27904 or 128·219 = 28032.
    """
    t0, c, bn, sync = 0.01, 1e-4, 1e5, 1.0
    adv = advise(inputs(b_n=bn, b_n_ci=Interval(8e4, 1.2e5), timing=curve(t0, c),
                        memory=memory(64), gpus=2, sync_seconds=sync))
    ends = {b: wall(b, bn, t0, c, gpus=2, sync=sync, max_micro=64) for b in (27904, 28032)}
    assert math.sqrt(bn / (t0 / 128 + c / 2)) == pytest.approx(27937.3, abs=0.1)
    assert adv.optimum == min(ends, key=ends.__getitem__) == 27904
    rec = adv.recommendation
    assert (rec.batch_size, rec.grad_accumulation, rec.per_device_batch_size) == (27904, 218, 64)
    assert adv.sync_seconds == 1.0


# -------------------------------------------------------------------- devices


def test_n_devices_with_sync_closed_form() -> None:
    # Per-device batch B/N: t = t0 + c·B/N + t_sync, optimum sqrt(B_n·(t0 + ts)/(c/N)).
    adv = advise(inputs(gpus=4, sync_seconds=0.01))
    x = math.sqrt(BN * (T0 + 0.01) / (C / 4))
    assert x == pytest.approx(1549.19, abs=0.01)
    assert adv.optimum == pytest.approx(x, rel=1e-3)
    rec = adv.recommendation
    assert rec.gpus == 4 and rec.per_device_batch_size == math.ceil(rec.batch_size / 4)
    assert rec.batch_size in (1544, 1552)


def test_sync_seconds_ring_allreduce() -> None:
    # 2(N-1)/N · bytes / bandwidth + latency: 2·3/4 · 4e8 / 3e11 + 20 µs.
    assert sync_seconds(4e8, 4, 3e11, latency_s=20e-6) == pytest.approx(0.002 + 20e-6)
    assert sync_seconds(4e8, 1, 3e11) == 0.0
    link = interconnect("PCIe4")
    assert link is INTERCONNECTS["pcie4"]
    assert interconnect("nvlink") is INTERCONNECTS["nvlink3"]  # the spec's default
    with pytest.raises(UsageError, match="unknown interconnect"):
        interconnect("carrier-pigeon")
    adv = advise(inputs(gpus=2, grad_bytes=4 * 10**8, interconnect="pcie4"))
    assert adv.sync_seconds == pytest.approx(4e8 / 31.5e9 + 30e-6)
    assert any("predicted" in n for n in adv.recommendation.notes)
    assert adv.facts.sync_source == "predicted" and "PCIe 4.0" in (adv.facts.sync_link or "")


def test_frontier_for_four_devices() -> None:
    grad, bw, lat = 4e8, 31.5e9, 30e-6  # pcie4
    adv = advise(inputs(grad_bytes=int(grad), interconnect="pcie4"), max_gpus=4)
    assert [r.gpus for r in adv.frontier] == [1, 2, 3, 4]
    base = wall(64, BN, T0, C)  # the baseline on the input's single device: 32.25 · 0.0264
    assert base == pytest.approx(0.8514)
    for row in adv.frontier:
        n = row.gpus
        ts = 0.0 if n == 1 else 2 * (n - 1) / n * grad / bw + lat
        assert row.sync_seconds == pytest.approx(ts)
        x = math.sqrt(BN * (T0 + ts) / (C / n))
        lo, hi = floor_allowed(x), ceil_allowed(x)
        assert lo is not None
        best = min((lo, hi), key=lambda b: wall(b, BN, T0, C, n, ts))
        assert row.batch_size == best
        assert row.time_ratio == pytest.approx(wall(best, BN, T0, C, n, ts) / base, rel=1e-9)
        assert row.cost_ratio == pytest.approx(row.time_ratio * n, rel=1e-9)
    assert adv.frontier[0].batch_size == 632
    # More devices: faster, dearer.
    times = [r.time_ratio for r in adv.frontier]
    costs = [r.cost_ratio for r in adv.frontier]
    assert times == sorted(times, reverse=True) and costs == sorted(costs)


def test_measured_sync_scaled_by_ring_volume_in_frontier() -> None:
    adv = advise(inputs(gpus=2, sync_seconds=0.01), max_gpus=4)
    # (N-1)/N: 1/2 at 2 devices, 3/4 at 4 -> 0.01 · (3/4)/(1/2) = 0.015.
    assert [r.sync_seconds for r in adv.frontier] == pytest.approx([0.0, 0.01, 0.01 * 4 / 3,
                                                                   0.015])
    # Baseline on 2 devices: cost ratio = time ratio × n/2.
    row = adv.frontier[0]
    assert row.cost_ratio == pytest.approx(row.time_ratio / 2)


# --------------------------------------------------------------- learning rate


def test_lr_rules_at_concrete_numbers() -> None:
    # B0 = 64 -> B = 512 with B_n = 1000: (1 + 1000/64)/(1 + 1000/512) = 16.625/2.953125.
    ratio = 16.625 / 2.953125
    assert ratio == pytest.approx(5.6296, abs=1e-4)
    assert scaled_lr(0.1, 64, 512, 1000, "sgd") == pytest.approx((0.1 * ratio, "mccandlish"))
    lr, rule = scaled_lr(0.1, 64, 512, 1000, "adam")
    assert (lr, rule) == (pytest.approx(0.1 * math.sqrt(ratio)), "mccandlish-sqrt")
    assert scaled_lr(0.1, 64, 512, 1000, "sgd", "linear") == pytest.approx((0.8, "linear"))
    assert scaled_lr(0.1, 64, 512, 1000, "adam", "sqrt") == pytest.approx(
        (0.1 * math.sqrt(8), "sqrt"))
    assert scaled_lr(0.1, 64, 512, 1000, "adam", "none") == (0.1, "none")
    # B ≪ B_n: linear; B ≫ B_n: saturates at 1 + B_n/B0.
    assert scaled_lr(1.0, 8, 16, 1e9, "sgd")[0] == pytest.approx(2.0, rel=1e-6)
    assert scaled_lr(1.0, 64, 10**9, 64, "sgd")[0] == pytest.approx(2.0, rel=1e-6)
    with pytest.raises(ValueError):
        scaled_lr(0.1, 64, 512, 1000, "sgd", "cubic")


def test_seed_post_lamb_64_to_1024() -> None:
    """The seed post: LAMB, batch 64 -> 1024, lr 1e-3 -> 7e-3 (a 7x factor).

    LAMB is Adam family, so "auto" uses sqrt((1 + B_n/64)/(1 + B_n/1024)).
    That factor grows with B_n towards sqrt(1024/64) = 4 and never reaches it:
    no B_n reproduces 7e-3; the rule gives at most 4e-3. The post's 7x is
    above what the Adam rule gives and below the linear rule's 16x (1.6e-2).
    It is exactly what the SGD-form rule (1 + B_n/64)/(1 + B_n/1024) gives at
    B_n = 6·1024/9 = 682.7 (solve 1 + B_n/64 = 7·(1 + B_n/1024)), which we
    note, without claiming the post used it.
    """
    assert optimizer_family("LAMB") == "adam"
    factors = [scaled_lr(1e-3, 64, 1024, bn, "adam")[0] / 1e-3 for bn in (10, 100, 1e3, 1e4, 1e6)]
    assert factors == sorted(factors) and all(f < 4 for f in factors)
    assert factors[-1] == pytest.approx(4.0, rel=1e-2)
    assert scaled_lr(1e-3, 64, 1024, math.inf, "adam")[0] == pytest.approx(4e-3)
    assert scaled_lr(1e-3, 64, 1024, 1e3, "adam", "linear")[0] == pytest.approx(1.6e-2)
    assert scaled_lr(1e-3, 64, 1024, 6 * 1024 / 9, "sgd")[0] == pytest.approx(7e-3)


@pytest.mark.parametrize("name, family", [
    ("sgd", "sgd"), ("SGD", "sgd"), ("torch.optim:SGD", "sgd"), ("LARS", "sgd"),
    ("nesterov", "sgd"), ("momentum", "sgd"), ("adam", "adam"), ("AdamW", "adam"),
    ("NAdam", "adam"), ("lamb", "adam"), ("RMSprop", "adam"), ("Adagrad", "adam"),
    ("Adafactor", "adam"), ("my.module:FusedLAMB", "adam"), ("Lion", "adam"),
])
def test_optimizer_family(name: str, family: str) -> None:
    assert optimizer_family(name) == family


def test_optimizer_family_from_class_and_instance() -> None:
    class MyAdamVariant:
        pass

    class FastSGD:
        pass

    assert optimizer_family(MyAdamVariant) == "adam"
    assert optimizer_family(FastSGD()) == "sgd"


def test_recommendation_learning_rate_uses_the_rule() -> None:
    rec = advise(inputs()).recommendation
    assert rec.lr_rule == "mccandlish"
    assert rec.learning_rate == pytest.approx(0.1 * 32.25 / (1 + 2000 / 632))
    rec = advise(inputs(optimizer_family="adam", lr_rule="linear")).recommendation
    assert (rec.lr_rule, rec.learning_rate) == ("linear", pytest.approx(0.1 * 632 / 64))


# ------------------------------------------------------------ warm-up, hours


def test_warmup_iff_batch_grows_more_than_8x() -> None:
    # Noise-scale-only advice recommends round(B_n): 512 = 8x 64 (no warm-up), 520 > 8x.
    at_8x = advise(inputs(timing=None, b_n=512.0, b_n_ci=Interval(400, 600))).recommendation
    assert at_8x.batch_size == 512 and at_8x.warmup is None
    above = advise(inputs(timing=None, b_n=520.0, b_n_ci=Interval(400, 600))).recommendation
    assert above.batch_size == 520 and above.warmup is not None
    assert "Goyal" in above.warmup and "5 epochs" in above.warmup
    assert advise(inputs()).recommendation.warmup is not None  # 632/64 = 9.9x
    assert advise(inputs(baseline_batch=128)).recommendation.warmup is None  # 4.9x


def test_the_warmup_is_5_epochs_and_at_most_a_18th_of_a_planned_run() -> None:
    """Goyal et al.: 5 epochs of a 90-epoch run. A trial's 2-epoch run was told to warm up
    over 235 steps of its 228. Noise-only advice at B_n = 520 (520 > 8 × 64), 10⁶ examples
    a epoch: 5 epochs are 5·⌈10⁶/520⌉ = 9,620 steps; a plan of 2 epochs at 64 takes
    ⌈2·10⁶/64 · S(520)/S(64)⌉ steps at 520, whose 18th is the warm-up."""
    from bsfind.advisor import steps_ratio

    noise = dict(timing=None, b_n=520.0, b_n_ci=Interval(400, 600))
    rec = advise(inputs(**noise)).recommendation
    assert rec.warmup_steps == 9_620
    for epochs in (2, 90, 200):
        rec = advise(inputs(**noise, training_examples=epochs * 10**6)).recommendation
        run = math.ceil(epochs * 10**6 / 64 * steps_ratio(520, 64, 520.0))
        assert rec.warmup_steps == min(9_620, math.ceil(run * 5 / 90))
        assert f"over the first {rec.warmup_steps:,} steps at batch 520" in (rec.warmup or "")
    assert advise(inputs(**noise, training_examples=2 * 10**6)).recommendation.warmup_steps \
        == math.ceil(math.ceil(2 * 10**6 / 64 * steps_ratio(520, 64, 520.0)) / 18)


def test_predicted_hours_and_money() -> None:
    """6.4M planned examples at B0 = 64 are 100,000 baseline steps.

    baseline: 1e5 · 0.0264 s = 2640 s = 0.73333 h; at $2.50/h: $1.83333.
    batch 632: 1e5 · 0.12913355 · 0.0832 s = 1074.39 s = 0.298442 h: $0.746105.
    """
    ab = advise(inputs(training_examples=6_400_000, price_per_hour=2.5)).absolute
    assert ab is not None
    assert ab.baseline_hours == pytest.approx(0.733333, rel=1e-5)
    assert ab.baseline_cost == pytest.approx(1.833333, rel=1e-5)
    assert ab.hours == pytest.approx(0.298442, rel=1e-5)
    assert ab.cost == pytest.approx(0.746105, rel=1e-5)
    assert ab.label == "predicted" and "6,400,000" in ab.text and "0.746" in ab.text
    # in the unit that reads best: 1074 s and 2640 s are minutes
    assert "predicted 17.9 min (baseline 44 min)" in ab.text
    # what to train for: 1e5 · 0.12913355 = 12,913.4 steps, so 12,914 of 632 examples,
    # 8.16 epochs of the 1,000,000 (a new user kept the baseline's epochs at the new batch)
    assert (ab.batch_size, ab.steps, ab.examples) == (632, 12_914, 12_914 * 632)
    assert ab.epochs == pytest.approx(12_914 * 632 / 10**6)
    assert ("the same progress at batch 632 takes 12,914 optimizer steps, 8,161,648 "
            "examples (8.16 epochs): train that long, not 6,400,000 examples") in ab.text
    # the baseline's own batch: the plan stands, nothing to add (a review)
    same = advise(inputs(training_examples=1_000_000, baseline_batch=632)).absolute
    assert same is not None and same.batch_size == 632 and "same progress" not in same.text
    assert "cost 0.746 (baseline 1.83) at 2.50 per device-hour" in ab.text
    # Two devices: hours from the 2-device step time, money × 2.
    two = advise(inputs(training_examples=6_400_000, price_per_hour=2.5, gpus=2,
                        sync_seconds=0.0)).absolute
    hours_2 = 1e5 * (0.02 + 1e-4 * 32) / 3600  # 0.6444 h: per-device batch 32
    assert two is not None and two.baseline_hours == pytest.approx(hours_2)
    assert two.baseline_cost == pytest.approx(hours_2 * 2 * 2.5)
    # Unknown without planned examples or without timing.
    assert advise(inputs()).absolute is None
    assert advise(inputs(timing=None, training_examples=10**6)).absolute is None


# ----------------------------------------------------------- no timing, range


def test_noise_scale_only_without_timing() -> None:
    adv = advise(inputs(timing=None, b_n=1000.0, b_n_ci=Interval(700, 1500)), max_gpus=4)
    rec = adv.recommendation
    assert rec.batch_size == 1000 and adv.optimum is None
    assert rec.basis.startswith("noise scale only: no step-time measurement")
    assert rec.predicted_time_ratio is None and rec.predicted_cost_ratio is None
    assert rec.batch_range == (704, 1504)
    assert adv.frontier == ()
    assert all(math.isnan(c.time_ratio) for c in adv.candidates)
    assert all(not math.isnan(c.steps_ratio) for c in adv.candidates)


def test_batch_range_from_the_interval() -> None:
    # Ends of the interval: sqrt(800·200) = 400 and sqrt(1152·200) = 480, both multiples of 8.
    rec = advise(inputs()).recommendation
    assert rec.batch_range == (400, 480)
    assert "B_simple = 2,000" in rec.basis and "measured" in rec.basis
    unbounded = advise(inputs(b_n_ci=Interval(800.0, math.inf))).recommendation
    assert unbounded.batch_range == (400, 10**6)
    assert any("unbounded above" in n for n in unbounded.notes)


def test_b_noise_basis_and_probe_step() -> None:
    rec = advise(inputs(basis="b_noise", noise_step=500, timing=curve(source="predicted")))
    r = rec.recommendation
    assert "B_noise" in r.basis and "step 500" in r.basis and "(predicted)" in r.basis
    assert r.noise_step == 500
    assert not any("B_simple exceeded" in n for n in r.notes)


def test_unresolved_noise_scale_takes_the_largest_batch() -> None:
    adv = advise(inputs(b_n=math.inf, b_n_ci=Interval(5000.0, math.inf), dataset_size=50_000))
    # Perfect scaling: wall ∝ t(B)/B = t0/B + c falls with B up to the dataset.
    assert adv.recommendation.batch_size == 50_000
    assert adv.candidates[-1].batch_size == 50_000


def test_inputs_are_validated() -> None:
    with pytest.raises(ValueError):
        inputs(b_n=0.0)
    with pytest.raises(ValueError):
        inputs(b_n=math.nan)
    with pytest.raises(ValueError):
        inputs(lr_rule="cubic")
    with pytest.raises(UsageError, match="hardware.interconnect"):
        inputs(interconnect="token-ring")
    assert steps_ratio(64, 64, 1000) == 1.0
    assert steps_ratio(128, 64, math.inf) == 0.5


# ------------------------------------------------------------------ properties


@st.composite
def random_inputs(draw: st.DrawFn, max_dataset: int = 10**6) -> AdvisorInputs:
    gpus = draw(st.integers(1, 8))
    dataset = draw(st.integers(gpus, max_dataset))
    b0 = draw(st.integers(gpus, min(dataset, 8192)))
    bn = draw(st.floats(0.5, 1e5))
    mem = draw(st.one_of(st.none(), st.integers(8, 4096)))
    return AdvisorInputs(
        b_n=bn, b_n_ci=Interval(bn / 2, bn * 2), baseline_batch=b0, baseline_lr=1e-3,
        optimizer_family=draw(st.sampled_from(["sgd", "adam"])), dataset_size=dataset,
        timing=curve(draw(st.floats(1e-4, 1.0)), draw(st.floats(1e-7, 1e-2))),
        memory=None if mem is None else memory(mem), gpus=gpus,
        sync_seconds=draw(st.floats(0.0, 0.5)) if gpus > 1 else None,
    )


def _allowed(b: int) -> bool:
    return (b % 8 == 0) or b in (1, 2, 4)


@settings(max_examples=200, deadline=None)
@given(random_inputs())
def test_recommendation_is_the_fastest_candidate(inp: AdvisorInputs) -> None:
    """The recommendation minimises predicted wall-clock over every allowed
    batch (multiples of 8, 1/2/4, the baseline, the whole dataset), so no candidate row beats
    it; only float rounding (1e-9 relative) separates them."""
    adv = advise(inp)
    rec = adv.recommendation
    assert 1 <= rec.batch_size <= inp.dataset_size
    assert _allowed(rec.batch_size) or rec.batch_size in (inp.baseline_batch,
                                                          inp.dataset_size)
    recommended = [c for c in adv.candidates if c.is_recommended]
    assert len(recommended) == 1 and recommended[0].batch_size == rec.batch_size
    assert sum(c.is_baseline for c in adv.candidates) == 1
    assert rec.predicted_time_ratio is not None
    best = min(c.time_ratio for c in adv.candidates)
    assert rec.predicted_time_ratio <= best * (1 + 1e-9)
    # The continuous optimum is at least as fast as the rounded one.
    assert adv.optimum is not None
    max_micro = inp.memory.max_batch_size if inp.memory else None
    sync = adv.sync_seconds
    t = inp.timing
    assert t is not None
    f_opt = wall(adv.optimum, inp.b_n, t.t0, t.per_example, inp.gpus, sync, max_micro)
    f_rec = wall(rec.batch_size, inp.b_n, t.t0, t.per_example, inp.gpus, sync, max_micro)
    assert f_opt <= f_rec * (1 + 1e-9)


@settings(max_examples=60, deadline=None)
@given(random_inputs(max_dataset=4000))
def test_recommendation_matches_brute_force(inp: AdvisorInputs) -> None:
    """Every allowed batch evaluated by the written-out formula: the advisor's
    piecewise search finds the same minimum."""
    adv = advise(inp)
    t = inp.timing
    assert t is not None
    max_micro = inp.memory.max_batch_size if inp.memory else None
    allowed = [b for b in range(inp.gpus, inp.dataset_size + 1) if _allowed(b)]
    allowed.append(inp.baseline_batch)
    best = min(wall(b, inp.b_n, t.t0, t.per_example, inp.gpus, adv.sync_seconds, max_micro)
               for b in allowed)
    got = wall(adv.recommendation.batch_size, inp.b_n, t.t0, t.per_example, inp.gpus,
               adv.sync_seconds, max_micro)
    assert got <= best * (1 + 1e-9)
    # And the continuous optimum beats a fine grid of real batch sizes.
    grid = [inp.gpus + (inp.dataset_size - inp.gpus) * i / 2000 for i in range(2001)]
    assert adv.optimum is not None
    f_opt = wall(adv.optimum, inp.b_n, t.t0, t.per_example, inp.gpus, adv.sync_seconds,
                 max_micro)
    assert f_opt <= min(wall(b, inp.b_n, t.t0, t.per_example, inp.gpus, adv.sync_seconds,
                             max_micro) for b in grid) * (1 + 1e-9)


def test_dataclass_replace_keeps_validation() -> None:
    with pytest.raises(ValueError):
        replace(inputs(), gpus=0)


# ------------------------------------------------------------ measured step-time points


def measured(times: dict[int, float], q25: dict[int, float] | None = None) -> TimingCurve:
    from bsfind.hardware.timing import curve_from_points
    from bsfind.results import TimingPoint

    return curve_from_points([TimingPoint(b, s, 5, (q25 or {}).get(b))
                              for b, s in sorted(times.items())])


def test_optimum_is_found_on_the_timed_points() -> None:
    """t = 1 s up to B = 4 (the device is not yet busy), then B/4 s; B_n = 8.

    Objective (1 + 8/B)·t(B): 1 + 8/B falls to 3 at B = 4; beyond, (1 + 8/B)·B/4 =
    B/4 + 2 rises. So 4, where a line through the same points (t0 + c·B, fitted)
    would put the optimum elsewhere.
    """
    curve = measured({1: 1.0, 2: 1.0, 4: 1.0, 8: 2.0, 16: 4.0})
    assert not curve.fit_ok  # R² 0.79: no line through these
    adv = advise(inputs(b_n=8.0, b_n_ci=Interval(8.0, 8.0), timing=curve, baseline_batch=16,
                        dataset_size=1000))
    assert adv.optimum == pytest.approx(4.0)
    assert adv.recommendation.batch_size == 4
    row = {c.batch_size: c for c in adv.candidates}
    assert row[8].step_seconds == pytest.approx(2.0)  # a timed point, not the line
    assert row[32].step_seconds == pytest.approx(8.0)  # past the last rung: proportional
    line_only = replace(curve, quality="line")  # the line fitted to the same points
    by_line = advise(inputs(b_n=8.0, b_n_ci=Interval(8.0, 8.0), timing=line_only,
                            baseline_batch=16, dataset_size=1000))
    assert by_line.optimum == pytest.approx(math.sqrt(8.0 * curve.t0 / curve.per_example))
    assert by_line.optimum != pytest.approx(4.0, rel=0.1)
    assert curve.quality == "points" and adv.facts.timing_state == "points"
    assert any("reads the timed points themselves" in n for n in adv.recommendation.notes)
    assert "5 timed batch sizes (1–16), interpolated" in adv.recommendation.basis


def test_untrusted_step_times_are_not_acted_on() -> None:
    """Times that no line fits and that are themselves noisy (a busy machine): the
    advice is the noise scale's, as without any timing, and says why."""
    from bsfind.results import TimingPoint

    # two rungs slowed 3x in all their steps, far beyond the 15% the rungs' own spread
    # shows (load that lasted through them): neither a line nor clean points
    noisy = {1: 0.20, 2: 0.21, 4: 0.20, 8: 0.60, 16: 0.55, 32: 0.21, 64: 0.22}
    curve = measured(noisy, q25={b: 1.15 * t for b, t in noisy.items()})
    assert curve.quality == "untrusted"
    adv = advise(inputs(timing=curve))
    rec = adv.recommendation
    assert adv.facts.timing_state == "untrusted" and adv.optimum is None
    assert rec.batch_size == round_batch(BN) and rec.predicted_time_ratio is None
    assert any("too noisy" in n for n in rec.notes)
    assert rec.basis.startswith("noise scale only")
    # The same times, clean (no spread between the lowest and the 25th percentile),
    # are read directly.
    assert measured(noisy).quality == "points"
    assert TimingPoint(1, 0.3, 5).seconds_q25 is None


@pytest.mark.parametrize("times, passes, says, not_says", [
    ({32: 0.2}, 0, "only one batch size (32) was timed", "noisy"),
    ({1: 0.0, 2: 0.0, 4: 0.0}, 3, "the clock read 0 s for every timed step", "noisy"),
    ({1: 0.20, 2: 0.21, 4: 0.20, 8: 0.60, 16: 0.55, 32: 0.21, 64: 0.22}, 0,
     "and the budget ended before they could be re-measured", "re-measuring"),
    ({1: 0.20, 2: 0.21, 4: 0.20, 8: 0.60, 16: 0.55, 32: 0.21, 64: 0.22}, 3,
     "too noisy to use even after re-measuring", "budget"),
])
def test_an_unused_step_time_curve_says_why(times: dict[int, float], passes: int, says: str,
                                            not_says: str) -> None:
    """One timed batch size, a clock that read 0 s, or a budget that ended before the
    rungs were re-timed are not noise "even after re-measuring" (the note used to say so
    for each, and to ask whether something else was running)."""
    curve = replace(measured(times, q25={b: 1.15 * t for b, t in times.items()}),
                    passes=passes)
    assert curve.quality == "untrusted"
    rec = advise(inputs(timing=curve)).recommendation
    note = next(n for n in rec.notes if "the advice is from the noise scale alone" in n)
    assert says in note and not_says not in note
    assert ("is something else running" in note) == (passes > 0 and "noisy" in says)


def test_measured_points_on_a_line_agree_with_the_line() -> None:
    times = {b: T0 + C * b for b in (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048)}
    curve = measured(times)
    assert curve.fit_ok
    adv = advise(inputs(timing=curve))
    assert adv.optimum == pytest.approx(632.46, rel=1e-4)
    assert adv.recommendation.batch_size == advise(inputs()).recommendation.batch_size
    assert ("fitted to 12 timed batch sizes (1–2,048; past 2,048, time in proportion to B)"
            in adv.recommendation.basis)


def test_timing_uncertainty_widens_the_plausible_range() -> None:
    # The lowest times are the running example's line; the 25th percentiles carry 10 ms
    # of load: an upper curve with t0 = 30 ms, whose optima at the interval's ends are
    # sqrt(800·300) = 490 and sqrt(1152·300) = 588.
    times = {b: T0 + C * b for b in (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048)}
    q25 = {b: t + 0.01 for b, t in times.items()}
    quiet = advise(inputs(timing=measured(times))).recommendation
    loaded = advise(inputs(timing=measured(times, q25)))
    assert quiet.batch_range == (400, 480)  # the noise scale's interval alone
    assert loaded.recommendation.batch_size == quiet.batch_size
    assert loaded.recommendation.batch_range is not None
    assert loaded.recommendation.batch_range == (400, 584)
    assert loaded.facts.range_from_timing
    assert any("step-time uncertainty" in n for n in loaded.recommendation.notes)


def test_more_devices_planned_from_one_process_leave_room_for_the_gradient_buckets() -> None:
    """Per device on N > 1: the one-process line less one copy of the gradients (DDP's
    buckets); on one device, and for a line measured under torchrun, the line itself."""
    from bsfind.advisor import per_device_max

    line = MemoryModel(fixed_bytes=1_000_000, bytes_per_example=10_000.0, max_batch_size=900,
                       limit_bytes=10_000_000, source="measured")
    one = inputs(memory=line, grad_bytes=400_000)
    assert per_device_max(one, 1) == 900
    assert per_device_max(one, 4) == (10_000_000 - 1_000_000 - 400_000) // 10_000  # 860
    # a one-process run planning for hardware.gpus = 4: its own plan leaves the room too
    four = inputs(memory=line, grad_bytes=400_000, gpus=4)
    assert per_device_max(four, 4) == 860
    rows = {c.batch_size: c for c in advise(four).candidates}
    assert all(c.grad_accumulation == math.ceil(b / (4 * 860)) for b, c in rows.items())
    assert all(c.memory_bytes == 1_400_000 + 10_000 * c.per_device_batch_size
               for c in rows.values())
    # a line measured under torchrun holds the buckets already
    measured = dataclasses.replace(line, fixed_bytes=1_400_000, max_batch_size=860,
                                   ddp_buckets=True)
    torchrun = inputs(memory=measured, grad_bytes=400_000, gpus=2, sync_seconds=0.01)
    assert per_device_max(torchrun, 4) == 860
    assert per_device_max(inputs(), 4) == math.inf  # no memory line
    # a maximum lowered by real steps stays lowered
    low = inputs(memory=MemoryModel(1_000_000, 10_000.0, 300, 10_000_000, "measured", True),
                 grad_bytes=400_000)
    assert per_device_max(low, 4) == 300


def test_durations_read_in_seconds_minutes_or_hours() -> None:
    from bsfind.wording import duration

    assert duration(5.36e-05) == "193 ms"  # 0.193 s
    assert duration(0.000802) == "2.89 s"
    assert duration(0.298442) == "17.9 min"
    assert duration(1.5) == "1.5 h" and duration(250.0) == "250 h"


def test_an_unresolved_noise_scale_says_how_to_resolve_it_where_it_came_from() -> None:
    from bsfind.wording import describe_advice

    for from_log, fix in ((False, "a longer probe (probe.max_seconds)"),
                          (True, "measuring more often (track(model, every=...))")):
        inp = inputs(b_n_lower_bound=True, noise_from_log=from_log)
        notes = describe_advice(advise(inp), inp).recommendation.notes
        said = [n for n in notes if n.startswith("the noise scale was not resolved")]
        assert len(said) == 1 and fix in said[0]


def test_a_batchnorm_floor_far_above_the_noise_scale_says_so() -> None:
    """With BatchNorm the advice never goes below one BatchNorm batch per device, so
    `check` passed a baseline 3x above B_simple (new-user trial: 512 against 163
    [141, 204]). A warning says it when the recommendation sits at that floor and the
    noise scale's whole interval is below half of it; a tracker log's BatchNorm batch
    (its micro-batch) can be below the baseline, and then the advice goes lower itself."""
    from bsfind.pipeline import batchnorm_floor_note

    bn = inputs(b_n=163.0, b_n_ci=Interval(141.0, 204.0), baseline_batch=512, norm_batch=512)
    rec = advise(bn).recommendation
    note = batchnorm_floor_note(bn, rec.batch_size)
    assert rec.batch_size == 512 and note is not None
    assert "512 is the smallest the advice takes with BatchNorm" in note
    assert "3.1x the noise scale (B_simple 163" in note
    assert "measure again at a smaller optimizer.batch_size" in note
    log = dataclasses.replace(bn, noise_from_log=True)
    assert "track a run at a smaller batch" in (batchnorm_floor_note(log, 512) or "")
    # the interval reaches half the floor: no warning
    assert batchnorm_floor_note(dataclasses.replace(bn, b_n_ci=Interval(141.0, 260.0)),
                                512) is None
    # a log's micro-batch of 24 under a baseline of 96: the advice itself goes down to 24
    small = inputs(b_n=30.0, b_n_ci=Interval(25.0, 40.0), baseline_batch=96, norm_batch=24)
    rec = advise(small).recommendation
    assert rec.batch_size < 96 and batchnorm_floor_note(small, rec.batch_size) is None
    # without BatchNorm the advice can go lower, and says so itself
    assert batchnorm_floor_note(dataclasses.replace(bn, norm_batch=None), 512) is None



def test_an_interval_unpacks_as_low_high() -> None:
    """A trial: ``lo, hi = est.ci95`` raised TypeError."""
    low, high = Interval(3.0, math.inf)
    assert (low, high) == (3.0, math.inf) and list(Interval(1.0, 2.0)) == [1.0, 2.0]
    # and indexes as the JSON's list does (a trial: est.ci95[0] was not subscriptable)
    ci = Interval(1.0, 2.0)
    assert (ci[0], ci[1], ci[-1], len(ci)) == (1.0, 2.0, 2.0, 2)


def test_a_line_is_not_extrapolated_past_the_largest_batch_timed() -> None:
    """A review: rungs 8-256 all about 10 ms fit a line of slope 6.6e-8 s per example;
    read past the ladder it put the advice at 5,512 (21x the largest batch timed).
    With t ∝ B past rung 256, time (1 + B_n/B)·t(B) is least at 256 by hand:
    (1 + 200/256)·10.0 ms against 2 x (1 + 200/512)·10.0 ms at 512."""
    curve = measured({8: .0100, 16: .0101, 32: .0099, 64: .0100, 128: .0101, 256: .0100})
    assert curve.fit_ok and 0 < curve.per_example < 1e-6
    adv = advise(inputs(b_n=200.0, b_n_ci=Interval(100.0, 400.0), timing=curve,
                        baseline_batch=32, dataset_size=60_000))
    assert adv.recommendation.batch_size == 256
    row = {c.batch_size: c for c in adv.candidates}
    assert row[512].step_time_source == "extrapolated"
    assert row[512].step_seconds == pytest.approx(2 * curve.seconds(256))


def test_a_rung_left_out_of_the_line_keeps_its_measured_time() -> None:
    """A review: rung 4096 ran at 27 examples/ms against 48 at 2048, so the fit left it
    out of the line; the advisor read the line there and recommended 4096 at a
    predicted 0.74x, where its measured 0.15 s makes it 1.32x (by hand, B_n = 1e6:
    (1 + 1e6/4096)·0.15 = 36.8 s against (1 + 1e6/256)·0.00712 = 27.8 s at the baseline).
    At 2048 it is (1 + 1e6/2048)·0.04296 = 21.0: 0.756x."""
    t0, c = 0.002, 2e-5
    curve = measured({**{b: t0 + c * b for b in (64, 128, 256, 512, 1024, 2048)}, 4096: 0.15})
    assert curve.fitted_up_to == 2048 and curve.fit_ok
    mem = MemoryModel(fixed_bytes=0, bytes_per_example=1.0, max_batch_size=4096,
                      limit_bytes=4096, source="predicted")
    adv = advise(inputs(b_n=1e6, b_n_ci=Interval(5e5, 2e6), timing=curve, memory=mem,
                        baseline_batch=256, dataset_size=100_000))
    assert adv.recommendation.batch_size == 2048
    assert adv.recommendation.predicted_time_ratio == pytest.approx(
        (1 + 1e6 / 2048) * (t0 + c * 2048) / ((1 + 1e6 / 256) * (t0 + c * 256)))
    assert curve.seconds(4096) == pytest.approx(0.15)
    row = {r.batch_size: r for r in adv.candidates}  # 4096 runs as 2 x 2048, the faster
    assert (row[4096].grad_accumulation, row[4096].step_seconds) == (
        2, pytest.approx(2 * (t0 + c * 2048)))


def test_the_search_does_not_prune_a_piece_where_time_per_example_rises() -> None:
    """A review: measured points whose t/b rises (16 -> 32) made the accumulation pieces'
    lower bound too high, and the search stopped before a faster batch: it advised 192
    where 384 (a table row) was 0.8% faster. Brute force over every allowed batch."""
    from bsfind.advisor import wall_clock
    from bsfind.results import TimingPoint

    pts = tuple(TimingPoint(b, t, 5, t * 1.01) for b, t in [
        (8, .00398), (16, .00487), (32, .01083), (64, .01239), (128, .02825), (256, .04072)])
    curve = TimingCurve(points=pts, t0=0.0, per_example=0.0, r2=0.5, source="measured",
                        quality="points")
    mem = MemoryModel(fixed_bytes=0, bytes_per_example=1.0, max_batch_size=100,
                      limit_bytes=100, source="predicted", ddp_buckets=True)
    given_in = inputs(b_n=6200.0, b_n_ci=Interval(3100.0, 12400.0), timing=curve, memory=mem,
                      baseline_batch=64, dataset_size=1000, gpus=3, sync_seconds=0.001)
    model = wall_clock(given_in, 6200.0)
    best = min([*range(8, 1001, 8), 64], key=model.objective)
    assert best == 384
    assert advise(given_in).recommendation.batch_size == best


def test_a_step_count_does_not_round_up_on_float_noise() -> None:
    """A review: at B_n = 1e12 and B = dataset = 1000, 1e4 planned examples take
    (1 + 1e12/1000)/(1 + 1e12/64) x 1e4/64 = 10.0000000094 steps by float arithmetic,
    exactly 10 by hand (B_n huge: perfect scaling); it printed 11 and 11,000 examples."""
    from bsfind.advisor import whole_steps

    given = inputs(b_n=1e12, b_n_ci=Interval(1e11, math.inf), baseline_batch=64,
                   dataset_size=1000, timing=curve(0.01, 1e-5, source="predicted"),
                   training_examples=10**4)
    adv = advise(given)
    assert adv.recommendation.batch_size == 1000
    assert adv.absolute is not None
    assert (adv.absolute.steps, adv.absolute.examples) == (10, 10_000)
    assert whole_steps(10.5) == 11 and whole_steps(10.0) == 10 and whole_steps(10.0001) == 11
    assert whole_steps(2e9 + 1.5) == 2_000_000_002  # a real fraction of a step, however many


def test_without_timing_the_batch_is_at_least_one_example_per_device() -> None:
    """A review: 4 devices, B_n = 2 and no step times advised batch 2, "1 per device x 4
    devices", where the timed advice never goes below the device count."""
    adv = advise(inputs(timing=None, b_n=2.0, b_n_ci=Interval(1.0, 4.0), gpus=4))
    assert (adv.recommendation.batch_size, adv.recommendation.per_device_batch_size) == (4, 1)
    five_gpus = advise(inputs(timing=None, b_n=2.0, b_n_ci=Interval(1.0, 4.0), gpus=5))
    assert five_gpus.recommendation.batch_size == 8  # 5 rounded up to an allowed batch
    five = advise(inputs(timing=None, b_n=2.0, b_n_ci=Interval(1.0, 4.0), gpus=5,
                         dataset_size=6))
    assert five.recommendation.batch_size == 6  # 8 does not fit in 6 examples


def test_an_uneven_split_over_devices_is_said_as_a_range() -> None:
    """A review: "batch 1736 (579 per device × 3)" multiplies to 1,737; the devices take
    579, 579 and 578. With accumulation: 100 in 3 micro-steps is 33-34 each."""
    from bsfind.wording import per_device

    assert per_device(1736, math.ceil(1736 / 3), 1, 3) == "578–579"
    assert per_device(1737, 579, 1, 3) == "579"
    assert per_device(100, 34, 3, 1) == "33–34"
    assert per_device(96, 32, 3, 1) == "32"
    adv = advise(inputs(gpus=3, memory=MemoryModel(
        fixed_bytes=0, bytes_per_example=1.0, max_batch_size=17, limit_bytes=17,
        source="predicted"), b_n=5000.0, b_n_ci=Interval(4000, 6000), sync_seconds=0.1))
    rec = adv.recommendation
    assert (rec.batch_size, rec.per_device_batch_size, rec.grad_accumulation) == (1120, 17, 22)
    assert any("16–17 per device × 22 accumulation steps" in n for n in rec.notes)


def test_micro_batches_stay_below_the_rungs_whose_throughput_fell() -> None:
    """A review: rung 4,096 (0.15 s, 27 examples/ms against 48 at 2,048) was left out of
    the line but not of the micro-batches: on 8 devices with 0.5 s of sync per step the
    advice ran 3,277 per device x 5, where 2,048 x 12 is 28% faster on the same curve
    (objective 2.617 against 2.049 by brute force over batch and accumulation)."""
    t0, c = 0.002, 2e-5
    curve = measured({**{b: t0 + c * b for b in (64, 128, 256, 512, 1024, 2048)}, 4096: 0.15})
    mem = MemoryModel(fixed_bytes=0, bytes_per_example=1.0, max_batch_size=4096,
                      limit_bytes=4096, source="predicted", ddp_buckets=True)
    adv = advise(inputs(b_n=2e5, b_n_ci=Interval(1e5, 4e5), baseline_batch=256, timing=curve,
                        memory=mem, gpus=8, sync_seconds=0.5, dataset_size=10**7))
    rec = adv.recommendation
    assert (rec.batch_size, rec.per_device_batch_size, rec.grad_accumulation) == (196_608, 2048, 12)

    def objective(b: int, a: int) -> float:  # written out, as a brute force would
        return (1 + 2e5 / b) * (a * curve.seconds(b / (a * 8)) + 0.5)

    # around it (every multiple of 8 from 0.5x to 2x, any accumulation up to 2x the least)
    best = min(objective(b, a) for b in range(98_304, 393_216, 8)
               for a in range(math.ceil(b / (8 * 4096)), 2 * math.ceil(b / (8 * 4096)) + 1, 1))
    assert objective(196_608, 12) == pytest.approx(best)
    assert any("ran slower per example than 2,048" in n for n in rec.notes)


def test_the_baseline_is_costed_as_it_runs_not_under_the_throughput_cap() -> None:
    """A review: the throughput cap (rung 4,096 timed at 0.15 s, slower per example than
    2,048) was applied to the user's baseline of 4,096 too, costing it as 2,048 x 2 at
    0.086 s; the advice of 2,048 then read as no gain. By hand, B_n = 1e6: the baseline
    as run is (1 + 1e6/4096)·0.15 = 36.77, 2,048 is (1 + 1e6/2048)·0.04296 = 21.02: 0.572x."""
    t0, c = 0.002, 2e-5
    curve = measured({**{b: t0 + c * b for b in (64, 128, 256, 512, 1024, 2048)}, 4096: 0.15})
    mem = MemoryModel(fixed_bytes=0, bytes_per_example=1.0, max_batch_size=8192,
                      limit_bytes=8192, source="predicted")
    adv = advise(inputs(b_n=1e6, b_n_ci=Interval(5e5, 2e6), timing=curve, memory=mem,
                        baseline_batch=4096, dataset_size=100_000, training_examples=10**7),
                 max_gpus=1)
    rec = adv.recommendation
    assert rec.batch_size == 2048
    expected = (1 + 1e6 / 2048) * (t0 + c * 2048) / ((1 + 1e6 / 4096) * 0.15)
    assert rec.predicted_time_ratio == pytest.approx(expected)
    assert expected == pytest.approx(0.572, abs=1e-3)
    base = next(r for r in adv.candidates if r.is_baseline)
    assert (base.per_device_batch_size, base.grad_accumulation, base.fits) == (4096, 1, True)
    assert base.step_seconds == pytest.approx(0.15)
    assert adv.absolute is not None
    assert adv.absolute.baseline_hours == pytest.approx(10**7 / 4096 * 0.15 / 3600)
    assert adv.frontier[0].time_ratio == pytest.approx(expected)


def test_with_batchnorm_the_throughput_cap_never_splits_the_batchnorm_batch() -> None:
    """A review: rung 256 ran slower per example than 128, and with BatchNorm at 256 the
    advice ran 128 per device x 2, BatchNorm statistics over 128, not the 256 the noise
    scale was measured with (DESIGN §8)."""
    t0, c = 0.002, 2e-5
    curve = measured({**{b: t0 + c * b for b in (16, 32, 64, 128)}, 256: 0.05})
    assert curve.fitted_up_to == 128
    mem = MemoryModel(fixed_bytes=0, bytes_per_example=1.0, max_batch_size=4096,
                      limit_bytes=4096, source="predicted")
    adv = advise(inputs(b_n=5e4, b_n_ci=Interval(2.5e4, 1e5), timing=curve, memory=mem,
                        baseline_batch=256, norm_batch=256, dataset_size=100_000))
    assert all(r.per_device_batch_size == 256 for r in adv.candidates)
    assert adv.recommendation.per_device_batch_size == 256
