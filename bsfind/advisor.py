"""The advisor: measured noise scale + step time + memory -> batch size and LR.

Pure math (DESIGN §4): numbers in, numbers out, no torch, no printing. Tested
against closed forms in ``tests/test_advisor.py``:

    .venv/bin/python -m pytest tests/test_advisor.py -q

The model
---------
- Steps to a fixed loss: S(B) = S_min·(1 + B_n/B) (McCandlish et al. 2018,
  eq. 2.11), so S(B)/S(B0) = (1 + B_n/B)/(1 + B_n/B0). An unresolved noise
  scale (B_n = inf) means perfect scaling: S(B)/S(B0) = B0/B.
- One optimizer step of B examples over N data-parallel devices, with
  gradient accumulation a: t(B) = a·t_dev(B/(a·N)) + t_sync(N), where
  t_dev(b) = t0 + c·b is the fitted step-time curve of one device and a is the
  smallest accumulation whose per-device micro-batch B/(a·N) fits under the
  memory model's ``max_batch_size``. Written out: t(B) = a·t0 + c·B/N + t_sync.
  (Micro-batches are taken as equal; an uneven split costs at most c per
  micro-step more, which the model ignores.)
- Wall-clock ∝ S(B)·t(B); cost ∝ wall-clock × devices.

Search
------
For a fixed accumulation a the objective (1 + B_n/B)(K + k·B), with
K = a·t0 + t_sync and k = c/N, is convex in B with its minimum at
sqrt(B_n·K/k); on one device without memory limit that is the classic
B* = sqrt(B_n·t0/c). The advisor walks the accumulation pieces
((a-1)·N·M, a·N·M], takes each piece's closed-form minimiser clipped to the
piece, and stops once a lower bound of the next piece exceeds the best value
found, so the continuous optimum is exact, not a grid approximation.

Rounding: the recommended batch is the *allowed* batch with the lowest
predicted wall-clock, where allowed means a multiple of 8 (1, 2 or 4 below
8), the baseline itself or the whole dataset (when it splits evenly over the
devices, or when the device count does not divide 8, so that multiples of 8 do not
split evenly either), within [devices, dataset size]. Because each piece
is convex, the best allowed batch of a piece is one of the two allowed
neighbours of the piece's minimiser, so this is an exact discrete minimum: the
recommendation is never slower than any row of the candidate table (whose
batches are all allowed) beyond float rounding. The baseline is allowed so
that "keep your batch" wins ties and is never beaten by its own rounding.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple

from bsfind.errors import UsageError
from bsfind.results import (
    AbsolutePrediction,
    Candidate,
    FrontierRow,
    Interval,
    MemoryModel,
    Recommendation,
    Segment,
    TimingCurve,
)

Family = Literal["sgd", "adam"]
LrRule = Literal["auto", "linear", "sqrt", "none"]
# "branches": the local critical batch measured by branched runs (bsfind.branches).
Basis = Literal["b_noise", "b_simple", "branches"]

LR_RULES: tuple[str, ...] = ("auto", "linear", "sqrt", "none")

# Batch sizes are rounded to multiples of this (powers of two below it): the
# granularity at which GPU kernels tile well and the usual human choice.
BATCH_MULTIPLE = 8

# The candidate table stops at this multiple of the noise scale: beyond
# ~B_n the number of steps no longer falls (S(B) -> S_min), so larger batches
# only add compute (McCandlish et al. 2018, Fig. 2).
CANDIDATE_SPAN = 64

# Below this noise scale / dataset size the table also lists batches 1, 2, 4.
SMALL_PROBLEM = 64

# Recommend a learning-rate warm-up when the batch grows more than this
# factor: Goyal et al. 2017 (arXiv:1706.02677, sec. 2.2) needed a gradual
# warm-up for an 8k batch (32x their 256 baseline); 8x is where the linear
# rule's first-step LR jump starts to be large enough to diverge early.
WARMUP_GROWTH = 8.0
# ... over this many epochs (Goyal et al. 2017 use 5 epochs of linear warm-up) ...
WARMUP_EPOCHS = 5
# ... and at most this share of the run's steps: theirs, 5 of 90 epochs (a trial's
# 2-epoch run was told to warm up over 235 steps of its 228).
WARMUP_SHARE = WARMUP_EPOCHS / 90

# Never walk more accumulation pieces than this in one search (a guard for
# pathological inputs such as t0 ~ 0 with a 1-example memory limit, where
# 1e5 micro-steps per optimizer step would be needed); a note says so.
MAX_PIECES = 100_000

# ----------------------------------------------------------------- interconnects


class Interconnect(NamedTuple):
    """A device-to-device link for the predicted all-reduce time."""

    bandwidth_bytes_per_s: float  # nominal, per direction
    latency_s: float  # fixed cost of one step's all-reduce (order of magnitude)
    note: str


# Nominal per-direction bandwidths from the vendors' data sheets. Real NCCL
# bus bandwidth is typically 70-90% of these, and DDP overlaps the all-reduce
# with the backward pass, so predictions from this table are an upper bound on
# the exposed sync time; measure it (hardware.sync_seconds) when it matters.
# Latencies are the order of magnitude of nccl-tests ``all_reduce_perf``
# small-message times (tens of µs inside a node, ~100 µs over TCP/IP); they
# only matter for tiny models.
INTERCONNECTS: dict[str, Interconnect] = {
    # NVIDIA A100 data sheet: third-generation NVLink, 600 GB/s total
    # (bidirectional) per GPU -> 300 GB/s per direction.
    "nvlink3": Interconnect(300e9, 20e-6, "NVLink 3 (A100), 300 GB/s per direction"),
    # NVIDIA H100 SXM data sheet: fourth-generation NVLink, 900 GB/s total
    # (bidirectional) per GPU -> 450 GB/s per direction.
    "nvlink4": Interconnect(450e9, 20e-6, "NVLink 4 (H100), 450 GB/s per direction"),
    # PCI-SIG: PCIe 3.0 8 GT/s x16 lanes with 128b/130b coding ~ 15.75 GB/s.
    "pcie3": Interconnect(15.75e9, 30e-6, "PCIe 3.0 x16, 15.75 GB/s per direction"),
    # PCIe 4.0: 16 GT/s x16 ~ 31.5 GB/s per direction.
    "pcie4": Interconnect(31.5e9, 30e-6, "PCIe 4.0 x16, 31.5 GB/s per direction"),
    # PCIe 5.0: 32 GT/s x16 ~ 63 GB/s per direction.
    "pcie5": Interconnect(63e9, 30e-6, "PCIe 5.0 x16, 63 GB/s per direction"),
    # InfiniBand HDR / NDR: 200 / 400 Gb/s per port (IBTA), one port per GPU.
    "infiniband-hdr": Interconnect(25e9, 50e-6, "InfiniBand HDR, 200 Gb/s per GPU"),
    "infiniband-ndr": Interconnect(50e9, 50e-6, "InfiniBand NDR, 400 Gb/s per GPU"),
    # IEEE 802.3 Ethernet line rates, TCP/IP (no RDMA).
    "ethernet-100g": Interconnect(12.5e9, 100e-6, "100 Gb/s Ethernet"),
    "ethernet-25g": Interconnect(3.125e9, 100e-6, "25 Gb/s Ethernet"),
    "ethernet-10g": Interconnect(1.25e9, 100e-6, "10 Gb/s Ethernet"),
}
# Short names the spec accepts. "nvlink" is the A100 generation: the most
# common NVLink in rented clusters and the more conservative of the two.
INTERCONNECT_ALIASES: dict[str, str] = {
    "nvlink": "nvlink3",
    "pcie": "pcie4",
    "infiniband": "infiniband-hdr",
    "ib": "infiniband-hdr",
    "ethernet": "ethernet-25g",
}
DEFAULT_INTERCONNECT = "nvlink"  # the spec's default (hardware.interconnect)


def interconnect(name: str) -> Interconnect:
    """Look up an interconnect by name (case-insensitive, ``_`` = ``-``).

    Raises:
        UsageError: the name is unknown; the hint lists the known ones.
    """
    key = name.strip().lower().replace("_", "-")
    key = INTERCONNECT_ALIASES.get(key, key)
    if key not in INTERCONNECTS:
        known = ", ".join(sorted([*INTERCONNECTS, *INTERCONNECT_ALIASES]))
        raise UsageError(f"hardware.interconnect: unknown interconnect {name!r}",
                         hint=f"use one of {known}, or measure hardware.sync_seconds")
    return INTERCONNECTS[key]


def sync_seconds(
    grad_bytes: float,
    gpus: int,
    bandwidth_bytes_per_s: float,
    latency_s: float = INTERCONNECTS["nvlink3"].latency_s,
) -> float:
    """Predicted all-reduce time of one optimizer step (ring algorithm).

    A ring all-reduce sends and receives 2(N−1)/N of the gradient bytes per
    device (Patarasuk & Yuan 2009; NCCL's "bus bandwidth" convention), so
    t_sync = 2(N−1)/N · bytes / bandwidth + latency, and 0 on one device.
    No overlap with the backward pass is assumed (an upper bound).

    Args:
        grad_bytes: bytes of the gradients that are all-reduced per step.
        gpus: data-parallel devices N.
        bandwidth_bytes_per_s: per-direction link bandwidth.
        latency_s: fixed per-step cost.
    """
    if gpus < 1:
        raise ValueError(f"gpus must be >= 1, got {gpus}")
    if gpus == 1:
        return 0.0
    if bandwidth_bytes_per_s <= 0:
        raise ValueError("bandwidth must be positive")
    return 2.0 * (gpus - 1) / gpus * grad_bytes / bandwidth_bytes_per_s + latency_s


# -------------------------------------------------------------- learning rate

# Lower-case markers in an optimizer's (class) name. Adaptive markers are
# checked first, so "NAdam" or "AdamWithNesterov" count as Adam family.
_ADAM_MARKERS = ("adam", "lamb", "rmsprop", "adagrad", "adafactor", "adadelta")
_SGD_MARKERS = ("sgd", "momentum", "nesterov", "lars")


def optimizer_family(name_or_class: Any) -> Family:
    """Which learning-rate scaling family an optimizer belongs to.

    "sgd": SGD, momentum, Nesterov, LARS (their update is linear in the
    gradient: McCandlish eq. 2.6). "adam": Adam, AdamW, LAMB, RMSprop,
    Adagrad, Adafactor and any class whose name contains these (normalised
    updates: the square-root rule, Malladi et al. 2022).

    An unknown optimizer counts as "adam": the square-root rule changes the
    learning rate less than the SGD rule for every batch, so a wrong guess
    errs towards stability, and most optimizers written today are adaptive.

    Args:
        name_or_class: a name ("adamw", "torch.optim:SGD"), an optimizer class,
            or an optimizer instance.
    """
    key = _optimizer_key(name_or_class)
    if any(m in key for m in _ADAM_MARKERS):
        return "adam"
    if any(m in key for m in _SGD_MARKERS):
        return "sgd"
    return "adam"


def optimizer_known(name_or_class: Any) -> bool:
    """Whether :func:`optimizer_family` knows the optimizer (else it guesses "adam")."""
    key = _optimizer_key(name_or_class)
    return any(m in key for m in (*_ADAM_MARKERS, *_SGD_MARKERS))


def _optimizer_key(name_or_class: Any) -> str:
    if isinstance(name_or_class, str):
        name = name_or_class.replace(":", ".").rsplit(".", 1)[-1]
    elif isinstance(name_or_class, type):
        name = name_or_class.__name__
    else:
        name = type(name_or_class).__name__
    return name.lower()


def whole_steps(x: float) -> int:
    """The steps that complete ``x`` steps' progress: its ceiling, float noise aside (a
    review: 10.0000000094 steps at B_n = 1e12 read as 11, one more pass over the data)."""
    return math.ceil(x - min(1e-6, 1e-9 * abs(x)))


def steps_ratio(b: float, b0: float, b_n: float) -> float:
    """S(B)/S(B0) with S(B) = S_min·(1 + B_n/B) (McCandlish eq. 2.11).

    ``b_n = inf`` (an unresolved noise scale) gives perfect scaling, B0/B.
    """
    if b <= 0 or b0 <= 0:
        raise ValueError("batch sizes must be positive")
    if math.isinf(b_n):
        return b0 / b
    return (1.0 + b_n / b) / (1.0 + b_n / b0)


def scaled_lr(
    lr0: float, b0: float, b: float, b_n: float, family: Family, rule: str = "auto"
) -> tuple[float, str]:
    """Learning rate for batch ``b`` given ``lr0`` tuned at ``b0`` (DESIGN §4).

    - "auto", SGD family: lr0·(1 + B_n/B0)/(1 + B_n/B) ("mccandlish",
      McCandlish eq. 2.6): linear while B ≪ B_n, saturating beyond it; the
      factor never exceeds B/B0.
    - "auto", Adam family: the same ratio to the power 0.5 ("mccandlish-sqrt",
      Malladi et al. 2022); the factor never exceeds sqrt(B/B0).
    - "linear": lr0·B/B0; "sqrt": lr0·sqrt(B/B0); "none": lr0.

    Returns:
        (learning rate, the rule's name as shown to the user).
    """
    if rule not in LR_RULES:
        raise ValueError(f"unknown lr rule {rule!r}; use one of {', '.join(LR_RULES)}")
    if b <= 0 or b0 <= 0:
        raise ValueError("batch sizes must be positive")
    if rule == "linear":
        return lr0 * b / b0, "linear"
    if rule == "sqrt":
        return lr0 * math.sqrt(b / b0), "sqrt"
    if rule == "none":
        return lr0, "none"
    if math.isinf(b_n):
        ratio = b / b0  # the B_n -> inf limit
    else:
        ratio = (1.0 + b_n / b0) / (1.0 + b_n / b)
    if family == "adam":
        return lr0 * math.sqrt(ratio), "mccandlish-sqrt"
    return lr0 * ratio, "mccandlish"


def lr_correction(b: float, b0: float, b_star: float, factor: float,
                  rule_exponent: float | None = None) -> float:
    """The factor on the rule's learning rate at batch ``b`` once the learning rate was
    measured at ``b_star`` (``factor`` × the rule's there; ``bsfind.branches.measure_lr``).

    Two points are known: at B0 the rule gives lr0, the learning rate the user tuned
    (factor 1); at B* the branches measured ``factor``. Between them the factor is
    interpolated geometrically in log batch; beyond B* it stays ``factor``, and on the
    far side of B0 it stays what it is at B0.

    How much of ``factor`` the batch change can explain is bounded: the best learning
    rate scales as B^q between B0 and B* with q in [0, 1] (not at all, up to linearly),
    the rule as B^p (``rule_exponent``: its rate at B* over lr0, in log, over log(B*/B0)),
    so the factor at B* is (B*/B0)^(q − p). Unknown p allows any q − p in [−1, 1]: a
    factor up to B*/B0 (or B0/B*) either way. The rest cannot come from the batch, so
    it is lr0's own error at this point of training and applies at every batch, B0
    included. When B* = B0 that is all of ``factor``; a measurement just above B0 (4× at
    1.1·B0) no longer makes a cliff between B0 and B*; and with p known, 2× the sqrt
    rule's at B0/2 no longer makes the learning rate fall where the batch doubles back
    to B0 (a new user's schedule: 0.0018 at 16, then 0.001 at 32).
    """
    if b <= 0 or b0 <= 0 or b_star <= 0 or factor <= 0:
        raise ValueError("batch sizes and the factor must be positive")
    r = math.log(b_star / b0)
    if factor == 1.0 or r == 0.0:
        return factor
    if rule_exponent is None:
        lo, hi = -abs(r), abs(r)
    else:
        p = min(1.0, max(0.0, rule_exponent))
        lo, hi = sorted((-p * r, (1.0 - p) * r))
    log_f = math.log(factor)
    excess = math.exp(log_f - min(hi, max(lo, log_f)))
    w = math.log(b / b0) / r
    return float(excess * (factor / excess) ** min(1.0, max(0.0, w)))


def measured_lr(b: float, rule_lr: float, lr0: float, b0: float, b_star: float,
                rule_lr_star: float, factor: float) -> float:
    """The learning rate at batch ``b`` (where the rule gives ``rule_lr``) once it was
    measured at ``b_star``: ``factor`` × the rule's ``rule_lr_star`` there (the rule at
    B* as at ``b``: the same B_n).

    lr0's own error e (:func:`lr_correction` at B0, with the rule's exponent over the
    span) applies from B0 outwards and ``factor`` from B* outwards; between them the
    correction moves from e to ``factor`` geometrically in the rule's own rate,
    u = log(rule/lr0) / log(rule(B*)/lr0) (in log batch when the rule is flat). So the
    rate goes from lr0·e to factor·rule(B*) as lr0·e·(factor·rule(B*)/(lr0·e))^u, which
    never falls as the batch grows (q in [0, 1]), not even under the mccandlish rules,
    which are no power law; and with factor = e = 1 it is the rule's.
    """
    if b_star == b0:
        return rule_lr * factor
    e = lr_correction(b0, b0, b_star, factor, rule_exponent(lr0, rule_lr_star, b0, b_star))
    span = math.log(rule_lr_star / lr0)
    u = (math.log(rule_lr / lr0) / span if abs(span) > 1e-12
         else math.log(b / b0) / math.log(b_star / b0))
    return float(rule_lr * e * (factor / e) ** min(1.0, max(0.0, u)))


def rule_exponent(lr0: float, lr_star: float, b0: float, b_star: float) -> float | None:
    """p of a rule that gives ``lr_star`` at ``b_star`` from ``lr0`` at ``b0``: lr ∝ B^p
    over that span (None when the two batches are one)."""
    if b_star == b0 or lr0 <= 0 or lr_star <= 0:
        return None
    return math.log(lr_star / lr0) / math.log(b_star / b0)


# ------------------------------------------------------------ step-time model


def accumulation_steps(batch: float, gpus: int = 1, max_batch_size: int | None = None) -> int:
    """Smallest a with batch/(a·gpus) <= max_batch_size (1 when unlimited)."""
    if max_batch_size is None:
        return 1
    per_step = gpus * max(1, max_batch_size)
    return max(1, math.ceil(batch / per_step - 1e-9))


def step_seconds(
    batch: float,
    timing: TimingCurve,
    *,
    gpus: int = 1,
    max_batch_size: int | None = None,
    sync: float = 0.0,
) -> float:
    """t(B) = a·t_dev(B/(a·N)) + t_sync, with t_dev the curve as the advisor reads it
    (``TimingCurve.segments``: within the timed range the line, a·t0 + c·B/N + t_sync,
    or the measured points; past it, t_dev in proportion to b). A negative fitted t0 or
    slope counts as 0.
    """
    a = accumulation_steps(batch, gpus, max_batch_size)
    return a * timing.seconds(batch / (a * gpus)) + sync


@dataclass(frozen=True)
class WallClock:
    """Wall-clock model of one configuration (devices, memory, sync): S(B)·t(B) up
    to the constant S_min, ``objective``; one optimizer step's time, ``step_time``.

    One device's step time t_dev(b) is piecewise linear in the per-device
    micro-batch b (``segments``; one piece for a fitted or predicted line).
    """

    b_n: float  # inf: unresolved (perfect scaling)
    segments: tuple[Segment, ...]  # t_dev(b) >= 0, non-decreasing, continuous
    gpus: int
    max_micro: float  # per-device micro-batch limit; inf = unlimited
    sync: float  # seconds per optimizer step
    lo: float  # smallest batch considered (one example per device)
    hi: float  # largest batch considered (the dataset)
    unit: int = 1  # batches are multiples of this (a BatchNorm batch), or 1: the usual rule

    @property
    def per_step(self) -> float:
        return self.gpus * self.max_micro

    @property
    def _line(self) -> bool:
        return len(self.segments) == 1

    @property
    def _free_accumulation(self) -> bool:
        """Micro-steps cost nothing fixed: accumulating never adds time."""
        return self._line and self.segments[0].alpha == 0.0

    def t_dev(self, b: float) -> float:
        for s in self.segments:
            if b <= s.hi:
                return s.alpha + s.beta * b
        raise AssertionError("the last segment is unbounded")  # pragma: no cover

    def accumulation(self, b: float) -> int:
        if math.isinf(self.max_micro):
            return 1
        return max(1, math.ceil(b / self.per_step - 1e-9))

    def step_time(self, b: float) -> float:
        a = self.accumulation(b)
        return a * self.t_dev(b / (a * self.gpus)) + self.sync

    def _weights(self) -> tuple[float, float]:
        # Objective ∝ (w + bn/B)·t(B): (1, B_n) normally, (0, 1) when B_n = inf.
        return (0.0, 1.0) if math.isinf(self.b_n) else (1.0, self.b_n)

    def objective(self, b: float) -> float:
        w, bn = self._weights()
        return (w + bn / b) * self.step_time(b)

    def _pieces(self) -> Iterator[int]:
        if math.isinf(self.max_micro) or self._free_accumulation:
            yield 1  # accumulation costs nothing extra: one piece
            return
        first = self.accumulation(self.lo)
        last = self.accumulation(self.hi)
        w, _ = self._weights()
        if w == 0.0:
            # Perfect scaling: within full pieces the best point is the right
            # end, and (a·t0 + ts)/(a·N·M) falls with a, so the winners sit at
            # the ends; look at both ends only.
            window = 64
            yield from sorted({*range(first, min(last, first + window) + 1),
                               *range(max(first, last - window), last + 1)})
            return
        yield from range(first, min(last, first + MAX_PIECES) + 1)

    def _piece_bounds(self, a: int) -> tuple[float, float]:
        if math.isinf(self.max_micro) or self._free_accumulation:
            return self.lo, self.hi
        return max(self.lo, (a - 1) * self.per_step), min(self.hi, a * self.per_step)

    def _sub_pieces(self, a: int, left: float, right: float
                    ) -> Iterator[tuple[float, float, float, float]]:
        """(left, right, K, k) of each piece of accumulation piece ``a`` where
        t(B) = K + k·B: one per segment of t_dev the micro-batch B/(a·N) crosses."""
        scale = a * self.gpus
        for s in self.segments:
            lo, hi = max(left, s.lo * scale), min(right, s.hi * scale)
            if lo <= hi:
                yield lo, hi, a * s.alpha + self.sync, s.beta / self.gpus

    def _argmin(self, big_k: float, k: float, left: float, right: float) -> float:
        """Minimiser of (w + bn/B)·(K + k·B) on [left, right] (convex for K >= 0)."""
        w, bn = self._weights()
        if big_k <= 0.0:
            x = left  # (w + bn/B)·(K + k·B) is non-decreasing
        elif w * k <= 0.0:
            x = right  # (w + bn/B)·K is decreasing
        else:
            x = math.sqrt(bn * big_k / (w * k))
        return min(max(x, left), right)

    def _lower_bound(self, a: int, left: float) -> float:
        """A lower bound of the objective on piece a and on every later piece.

        One line (t0, c): on piece a' >= a, f = w·K' + w·k·B + bn·K'/B + bn·k
        with K' = a'·t0 + ts >= K_a, B >= left and B <= a'·N·M, so bn·K'/B >=
        bn·t0/(N·M); and f >= (sqrt(w·K') + sqrt(bn·k))², the unconstrained
        minimum. Pieces (a ≥ 2): every micro-batch of piece a' exceeds
        (a'-1)/a'·M, so t(B) >= a'·t_dev((a'-1)/a'·M) + ts, growing with a';
        and bn·t(B)/B >= bn·min over b <= M of t_dev(b)/b, over N. t_dev(b)/b is
        monotone on each piece, so that minimum sits at a piece's end (it need not
        fall with b: a review's isotonic points rose from 16 to 32, and the bound at M
        pruned a piece holding a faster batch than the one advised).
        """
        w, bn = self._weights()
        if not self._line:
            if a < 2:
                return 0.0
            m = self.max_micro
            return (w * (a * self.t_dev((a - 1) / a * m) + self.sync)
                    + bn * self._least_per_example / self.gpus)
        t0, c = self.segments[0].alpha, self.segments[0].beta
        big_k = a * t0 + self.sync
        k = c / self.gpus
        unconstrained = (math.sqrt(w * big_k) + math.sqrt(bn * k)) ** 2
        per_micro = bn * t0 / self.per_step if math.isfinite(self.per_step) else 0.0
        return max(unconstrained, w * (big_k + k * left) + bn * k + per_micro)

    @functools.cached_property
    def _least_per_example(self) -> float:
        """min over b <= max_micro of t_dev(b)/b (see :meth:`_lower_bound`)."""
        m = self.max_micro
        ends = [x for s in self.segments for x in (s.lo, s.hi) if 0.0 < x < m] + [m]
        return min(self.t_dev(x) / x for x in ends)

    def truncated(self) -> bool:
        """Whether ``_pieces`` stops before the last accumulation piece."""
        if math.isinf(self.max_micro) or self._free_accumulation or math.isinf(self.b_n):
            return False
        return self.accumulation(self.hi) > self.accumulation(self.lo) + MAX_PIECES

    def optimise(self, extra: tuple[float, ...] = ()) -> tuple[float, float, bool]:
        """(continuous optimum, best allowed batch, search truncated) over [lo, hi].

        ``extra``: further allowed batches (the baseline).
        """
        complete = False
        best_c, arg_c = math.inf, self.lo
        best_d, arg_d = math.inf, math.nan
        for e in extra:
            if self.lo <= e <= self.hi and self.objective(e) < best_d:
                best_d, arg_d = self.objective(e), e
        for a in self._pieces():
            left, right = self._piece_bounds(a)
            if left > right:
                continue
            if self._lower_bound(a, left) >= max(best_c, best_d):
                complete = True
                break  # no later piece can beat either optimum
            for sub_left, sub_right, big_k, k in self._sub_pieces(a, left, right):
                x = self._argmin(big_k, k, sub_left, sub_right)
                fx = self.objective(x)
                if fx < best_c:
                    best_c, arg_c = fx, x
                # The best allowed batch of this convex piece is the largest one
                # <= x or the smallest one >= x that lies in the piece. When x sits
                # on the piece's open left end, the ceiling belongs to the previous
                # piece and the next allowed batch is the piece's first.
                up = ceil_allowed(x, self.unit)
                tries = [floor_allowed(x, self.unit), up]
                if self.accumulation(up) < a:
                    tries.append(next_allowed(up, self.unit))
                for t in tries:
                    if t is None or not (self.lo <= t <= self.hi):
                        continue
                    ft = self.objective(t)
                    if ft < best_d:
                        best_d, arg_d = ft, float(t)
        if math.isnan(arg_d):  # no allowed batch in [lo, hi] (e.g. 5 devices, 7 examples)
            arg_d = float(max(1, floor_allowed(self.hi, self.unit) or math.floor(self.hi)))
        return arg_c, arg_d, not complete and self.truncated()


# ------------------------------------------------------------------- rounding


def floor_allowed(x: float, unit: int = 1) -> int | None:
    """Largest allowed batch <= x: a multiple of 8, or 1, 2, 4 below 8; with ``unit``
    > 1 (a BatchNorm batch), a multiple of ``unit``."""
    if unit > 1:
        return unit * math.floor(x / unit + 1e-12) if x >= unit else None
    if x >= BATCH_MULTIPLE:
        return BATCH_MULTIPLE * math.floor(x / BATCH_MULTIPLE + 1e-12)
    if x < 1:
        return None
    p = 1
    while p * 2 <= x:
        p *= 2
    return p


def ceil_allowed(x: float, unit: int = 1) -> int:
    """Smallest allowed batch >= x."""
    if unit > 1:
        return unit * max(1, math.ceil(x / unit - 1e-12))
    if x > BATCH_MULTIPLE:
        return BATCH_MULTIPLE * math.ceil(x / BATCH_MULTIPLE - 1e-12)
    p = 1
    while p < x:
        p *= 2
    return p


def next_allowed(b: float, unit: int = 1) -> int:
    """Smallest allowed batch strictly greater than b."""
    return ceil_allowed(math.floor(b) + 1, unit)


def round_batch(x: float, cap: float | None = None, unit: int = 1, whole: bool = True
                ) -> int:
    """Round to an allowed batch: the nearest multiple of 8 (ties up), or the
    log-nearest of 1, 2, 4, 8 below 8 (with ``unit`` > 1: the nearest multiple of it,
    at least one); then clipped to [1, cap] (``cap`` itself, the whole dataset, is
    allowed when ``unit`` divides it and ``whole`` says it splits over the devices)."""
    if unit > 1:
        r = unit * max(1, math.floor(x / unit + 0.5))
    elif x >= BATCH_MULTIPLE:
        r = BATCH_MULTIPLE * math.floor(x / BATCH_MULTIPLE + 0.5)
    elif x <= 1:
        r = 1
    else:
        r = 2 ** round(math.log2(x))
    if cap is not None and r > cap:  # the whole dataset, when it divides into units
        r = int(cap) if whole and cap % unit == 0 else floor_allowed(cap, unit) or unit
    return max(1, int(r))


# ---------------------------------------------------------------- the advisor


@dataclass(frozen=True, kw_only=True)
class AdvisorInputs:
    """Everything the advisor needs, all measured (or predicted) upstream.

    Attributes:
        b_n: the noise scale used (B_noise when measured, else B_simple);
            ``math.inf`` when unresolved (treated as perfect scaling).
        b_n_ci: its 95% interval (``high`` may be inf).
        basis: which noise scale ``b_n`` is.
        noise_step: training step of the probe point that gave ``b_n``.
        noise_checkpoint: ``model.checkpoint`` when the weights started from it (whose
            own step is not known: ``noise_step`` then counts from it).
        noise_summary_of: when ``b_n`` is a median over several points, their steps.
        noise_from_log: ``b_n`` was read from a tracker's log (``bsfind schedule``).
        b_n_lower_bound: the noise scale was not resolved; ``b_n`` is its lower bound
            (the largest batch probed), not an estimate.
        norm_batch: the per-device BatchNorm batch the noise scale was measured with
            (DESIGN §8): batches are then multiples of it on every device.
        baseline_batch / baseline_lr: B0 and the learning rate tuned there.
        optimizer_family: "sgd" or "adam" (see ``optimizer_family``).
        lr_rule: "auto" | "linear" | "sqrt" | "none".
        dataset_size: examples in the dataset: the largest batch considered.
        timing: one device's step-time curve, or None (noise-scale-only advice).
        memory: the memory model (its ``max_batch_size`` is per device), or
            None (unlimited).
        gpus: data-parallel devices N; the baseline runs on the same N.
        sync_seconds: measured all-reduce time per step at ``gpus`` devices;
            None: predicted from ``grad_bytes`` and ``interconnect``.
        grad_bytes: bytes of gradients all-reduced per step.
        interconnect: a key of ``INTERCONNECTS`` (or an alias).
        price_per_hour: price of one device-hour.
        training_examples: examples the job processes at the baseline batch
            (epochs are converted by the caller): for absolute hours/cost.
    """

    b_n: float
    b_n_ci: Interval
    baseline_batch: int
    baseline_lr: float
    optimizer_family: Family
    dataset_size: int
    basis: Basis = "b_simple"
    noise_step: int = 0
    noise_checkpoint: str | None = None  # model.checkpoint: steps count from it
    noise_summary_of: tuple[int, ...] = ()
    # b_n was read from a tracker's log (bsfind schedule), not measured by a probe now.
    noise_from_log: bool = False
    b_n_lower_bound: bool = False
    norm_batch: int | None = None
    lr_rule: str = "auto"
    timing: TimingCurve | None = None
    memory: MemoryModel | None = None
    gpus: int = 1
    sync_seconds: float | None = None
    grad_bytes: int | None = None
    interconnect: str = DEFAULT_INTERCONNECT
    price_per_hour: float | None = None
    training_examples: int | None = None

    def __post_init__(self) -> None:
        if not (self.b_n > 0):  # also rejects nan
            raise ValueError(f"b_n must be positive (or inf), got {self.b_n}")
        if self.baseline_batch < 1 or self.dataset_size < 1 or self.gpus < 1:
            raise ValueError("baseline_batch, dataset_size and gpus must be >= 1")
        if self.lr_rule not in LR_RULES:
            raise ValueError(f"unknown lr_rule {self.lr_rule!r}")
        if self.optimizer_family not in ("sgd", "adam"):
            raise ValueError(f"unknown optimizer family {self.optimizer_family!r}")
        if self.sync_seconds is not None and self.sync_seconds < 0:
            raise ValueError("sync_seconds must be >= 0")
        interconnect(self.interconnect)  # an unknown name is a UsageError even on 1 device


SyncSource = Literal["one device", "measured", "scaled", "predicted", "unknown"]
TimingState = Literal["ok", "points", "untrusted", "clamped", "degenerate", "absent"]


@dataclass(frozen=True)
class Facts:
    """What the advice rests on, as flags and numbers (``bsfind.wording`` writes the words).

    Attributes:
        sync_source: where the all-reduce time of the input's device count came
            from: "one device" (none needed), "measured" (at that count),
            "scaled" (from a measurement at another count), "predicted" (from
            the gradient bytes and the interconnect) or "unknown" (taken as 0).
        sync_link: the interconnect's description when predicted.
        timing_state: "ok", "points" (no line fits the timed points even after
            re-measuring, but they are clean: they are read directly, and time
            past the last rung grows in proportion to B), "untrusted" (neither:
            the step time is not used), "clamped" (a negative fitted term set to
            0), "degenerate" (no time at all: ignored) or "absent".
        range_from_timing: the timing's own uncertainty (the rungs' 25th
            percentiles instead of their minima) widened the plausible range.
        search_truncated: the search stopped after MAX_PIECES accumulation pieces.
        ci_low_at_zero / ci_unbounded: the noise scale's interval reaches 0 /
            is unbounded above (the plausible range is clipped there).
        optimum_clipped: the continuous optimum reached the dataset size.
        warmup_steps: steps of a learning-rate warm-up at the recommended batch
            (:func:`warmup_steps`) when the batch grows more than WARMUP_GROWTH×.
    """

    sync_source: SyncSource = "one device"
    sync_link: str | None = None
    timing_state: TimingState = "absent"
    search_truncated: bool = False
    ci_low_at_zero: bool = False
    ci_unbounded: bool = False
    optimum_clipped: bool = False
    warmup_steps: int | None = None
    range_from_timing: bool = False


@dataclass(frozen=True)
class Advice:
    """The advisor's answer: numbers only.

    ``optimum`` is the continuous (unrounded) time-optimal batch, None without
    a step-time curve. The recommendation's ``basis``, ``notes`` and
    ``warmup`` are left empty here; ``bsfind.wording.describe_advice`` writes them
    (and ``absolute.text``) from ``facts``.
    """

    recommendation: Recommendation
    candidates: tuple[Candidate, ...]
    facts: Facts
    frontier: tuple[FrontierRow, ...] = ()
    optimum: float | None = None
    sync_seconds: float = 0.0  # the per-step sync time used at the input's N
    absolute: AbsolutePrediction | None = None


def _sync_for(inputs: AdvisorInputs, gpus: int) -> tuple[float, SyncSource]:
    """All-reduce seconds per step on ``gpus`` devices, and where the number came from."""
    if gpus == 1:
        return 0.0, "one device"
    if inputs.sync_seconds is not None and gpus == inputs.gpus:
        return inputs.sync_seconds, "measured"
    if inputs.sync_seconds is not None and inputs.gpus > 1:
        # Scale a measurement at N devices by the ring volume factor (N-1)/N.
        f = ((gpus - 1) / gpus) / ((inputs.gpus - 1) / inputs.gpus)
        return inputs.sync_seconds * f, "scaled"
    if inputs.grad_bytes is not None:
        link = interconnect(inputs.interconnect)
        return (sync_seconds(inputs.grad_bytes, gpus, link.bandwidth_bytes_per_s,
                             link.latency_s), "predicted")
    return 0.0, "unknown"


def _timing_state(inputs: AdvisorInputs) -> TimingState:
    t = inputs.timing
    if t is None:
        return "absent"
    if t.quality == "untrusted":
        return "untrusted"
    if not _timing_usable(inputs):
        return "degenerate"
    if t.quality == "points" and len(t.points) >= 2:
        return "points"
    return "clamped" if t.t0 < 0 or t.per_example < 0 else "ok"


def wall_clock(inputs: AdvisorInputs, b_n: float, gpus: int | None = None,
               sync: float | None = None, upper: bool = False) -> WallClock:
    """The wall-clock model of ``inputs`` at noise scale ``b_n`` (on ``gpus`` devices,
    default the input's, with ``sync`` seconds per step, default the input's)."""
    n = inputs.gpus if gpus is None else gpus
    return _model(inputs, b_n, n, _sync_for(inputs, n)[0] if sync is None else sync, upper)


def _model(inputs: AdvisorInputs, b_n: float, gpus: int, sync: float,
           upper: bool = False) -> WallClock:
    assert inputs.timing is not None
    unit = batch_unit(inputs, gpus)
    return WallClock(
        b_n=b_n,
        segments=inputs.timing.segments(upper),
        gpus=gpus,
        max_micro=per_device_max(inputs, gpus),
        sync=sync,
        lo=float(min(max(gpus, unit), inputs.dataset_size)),
        hi=float(inputs.dataset_size),
        unit=unit,
    )


def per_device_max(inputs: AdvisorInputs, gpus: int) -> float:
    """The largest batch per device per step: with BatchNorm, the BatchNorm batch the
    noise scale was measured with (a larger one would change it: the batch grows by
    devices and accumulation, DESIGN §8). On N > 1 devices, DDP's gradient buckets (one more
    copy of the gradients, ``grad_bytes``) come off a line that does not hold them yet
    (one process's, or one predicted for ``hardware.gpu``; a line measured under
    torchrun has them: ``hardware.measure.with_gradient_buckets``). Nor above the
    timed batches whose throughput fell (:func:`throughput_cap`)."""
    timed = None if inputs.norm_batch else throughput_cap(inputs)  # BatchNorm's is fixed
    return min(_memory_max(inputs, gpus), math.inf if timed is None else float(timed))


def as_run(inputs: AdvisorInputs, model: WallClock) -> WallClock:
    """``model`` as the baseline is costed: the user's batch as it runs today, in as few
    steps as memory allows. The throughput cap is advice; charging the baseline with it
    would put a made-up time under every ratio (a review: a baseline of 4,096 timed at
    0.15 s costed as 2,048 x 2 at 0.086 s, which read a 0.57x gain as none)."""
    memory = _memory_max(inputs, model.gpus)
    return model if memory == model.max_micro else dataclasses.replace(model, max_micro=memory)


def throughput_cap(inputs: AdvisorInputs) -> int | None:
    """The largest per-device batch worth running, when larger timed ones lost more than
    ``DOMINATED_DROP`` of the peak throughput (``TimingCurve.fitted_up_to``): a micro-batch
    there is slower per example than accumulating smaller ones (a review: 3,277 per device
    x 5 where 2,048 x 12 was 28% faster). None: no such rung."""
    t = inputs.timing
    if t is None or t.quality == "untrusted" or t.fitted_up_to is None:
        return None
    if not any(p.batch_size > t.fitted_up_to for p in t.points):
        return None
    return t.fitted_up_to


def memory_bound(inputs: AdvisorInputs, gpus: int) -> bool:
    """Whether memory (or the BatchNorm batch), not :func:`throughput_cap`, sets the
    largest batch per device."""
    return _memory_max(inputs, gpus) <= per_device_max(inputs, gpus)


def _memory_max(inputs: AdvisorInputs, gpus: int) -> float:
    m = inputs.memory
    if m is None:
        return float(inputs.norm_batch) if inputs.norm_batch else math.inf
    largest = max(1, m.max_batch_size)
    if inputs.norm_batch:  # BatchNorm: the batch the noise scale was measured with (§8)
        largest = min(largest, inputs.norm_batch)
    if gpus > 1 and not m.ddp_buckets and inputs.grad_bytes and m.bytes_per_example > 0:
        room = m.limit_bytes - m.fixed_bytes - inputs.grad_bytes
        largest = min(largest, max(1, math.floor(room / m.bytes_per_example + 1e-6)))
    return float(largest)


def timing_usable(inputs: AdvisorInputs) -> bool:
    """Whether the inputs carry a step-time curve the advice may act on."""
    return _timing_usable(inputs)


def batch_unit(inputs: AdvisorInputs, gpus: int | None = None) -> int:
    """Global batches are multiples of this: a BatchNorm batch on each device, or 1
    (the usual multiples of 8)."""
    return inputs.norm_batch * (inputs.gpus if gpus is None else gpus) if inputs.norm_batch else 1


def _timing_usable(inputs: AdvisorInputs) -> bool:
    t = inputs.timing
    return (t is not None and t.quality != "untrusted"
            and any(s.alpha > 0 or s.beta > 0 for s in t.segments()))


def whole_dataset_allowed(inputs: AdvisorInputs, gpus: int) -> bool:
    """Whether the whole dataset is an allowed batch on ``gpus`` devices: when it splits
    evenly over them (and BatchNorm batches), or when the device count does not divide 8,
    so that multiples of 8 do not split evenly either (3 devices). Without it the optimum,
    clipped at the dataset, would round down below it (16 for 20 examples)."""
    unit = batch_unit(inputs, gpus)
    return (inputs.dataset_size % math.lcm(unit, gpus) == 0
            or (unit == 1 and BATCH_MULTIPLE % gpus != 0))


def allowed_extras(inputs: AdvisorInputs, gpus: int) -> tuple[float, ...]:
    """The batches allowed besides the rounded ones: the baseline, and the whole dataset
    where ``whole_dataset_allowed``."""
    whole = (float(inputs.dataset_size),) if whole_dataset_allowed(inputs, gpus) else ()
    return (float(inputs.baseline_batch), *whole)


def _candidate_grid(inputs: AdvisorInputs, recommended: int) -> list[int]:
    """Powers of two up to min(dataset, 64·B_n, 16x the larger of the baseline
    and the recommendation: rows beyond only get worse), plus 1.5× powers of two (24,
    48, 96, ...: multiples of 8) within 4x of the recommendation, where the
    curve is worth seeing closely. Baseline and recommendation are added by
    the caller."""
    upper = min(float(inputs.dataset_size), CANDIDATE_SPAN * inputs.b_n,
                16.0 * max(recommended, inputs.baseline_batch))
    unit = batch_unit(inputs)
    if unit > 1:  # BatchNorm: multiples of its batch
        return [unit * 2**k for k in range(40) if unit * 2**k <= max(upper, unit)]
    start = 1 if min(inputs.dataset_size, inputs.b_n) < SMALL_PROBLEM else BATCH_MULTIPLE
    grid: set[int] = set()
    p = start
    while p <= upper:
        grid.add(p)
        mid = 3 * p // 2
        if p >= 2 * BATCH_MULTIPLE and mid <= upper and recommended / 4 <= mid <= 4 * recommended:
            grid.add(mid)
        p *= 2
    one_step = per_device_max(inputs, inputs.gpus)
    if math.isfinite(one_step):  # the largest batch that fits without accumulation
        fits = floor_allowed(int(inputs.gpus * one_step))
        if fits is not None and fits <= upper:
            grid.add(fits)
    return sorted(b for b in grid if b >= inputs.gpus)


def _recommend_batch(
    inputs: AdvisorInputs, b_n: float, gpus: int, sync: float, upper: bool = False
) -> tuple[float | None, int, bool]:
    """(continuous optimum or None, recommended batch, search truncated) for one noise
    scale; ``upper``: on the step-time curve of the rungs' 25th percentiles."""
    unit = batch_unit(inputs, gpus)
    whole = whole_dataset_allowed(inputs, gpus)
    if _timing_usable(inputs):
        m = _model(inputs, b_n, gpus, sync, upper)
        opt, best, truncated = m.optimise(allowed_extras(inputs, gpus))
        return opt, int(round(best)), truncated
    # Noise scale only: B_n is the knee of the time/compute trade-off
    # (McCandlish sec. 2.2: B_crit ≈ B_noise).
    target = float(inputs.dataset_size) if math.isinf(b_n) else b_n
    batch = round_batch(target, cap=inputs.dataset_size, unit=unit, whole=whole)
    if batch < gpus <= inputs.dataset_size:  # one example per device at least, as with timing
        batch = min(ceil_allowed(gpus, unit), inputs.dataset_size)
    return None, batch, False


def candidates_table(inputs: AdvisorInputs, batch: int, model: WallClock | None
                     ) -> tuple[Candidate, ...]:
    """The table's rows: a grid of batches plus the baseline and the recommendation."""
    n, b0 = inputs.gpus, inputs.baseline_batch
    # per device: the advice's limit; the baseline's as it runs today (memory only)
    caps = (per_device_max(inputs, n), _memory_max(inputs, n))
    buckets = (inputs.grad_bytes or 0) if (n > 1 and inputs.memory is not None
                                           and not inputs.memory.ddp_buckets) else 0
    timing = inputs.timing
    timed_top = max((p.batch_size for p in timing.points), default=0) if timing else 0

    def source(micro: int) -> str | None:
        if model is None or timing is None:
            return None
        if timing.source == "predicted":
            return "predicted"
        return "measured" if micro <= timed_top else "extrapolated"

    run = None if model is None else as_run(inputs, model)

    def row(b: int) -> Candidate:
        today = b == b0 and b != batch  # the baseline as it runs (when not the advice)
        cap = caps[today]
        a = accumulation_steps(b, n, int(cap) if math.isfinite(cap) else None)
        micro = math.ceil(b / (a * n))
        mem = (inputs.memory.fixed_bytes + buckets + inputs.memory.bytes_per_example * micro
               if inputs.memory is not None else None)
        if model is not None and run is not None:
            m = run if today else model
            t, ratio = m.step_time(b), m.objective(b) / run.objective(b0)
        else:
            t = ratio = math.nan
        return Candidate(
            batch_size=b, per_device_batch_size=micro, grad_accumulation=a,
            steps_ratio=steps_ratio(b, b0, inputs.b_n), step_seconds=t, time_ratio=ratio,
            cost_ratio=ratio,  # same devices as the baseline
            memory_bytes=mem, fits=a == 1, is_baseline=b == b0, is_recommended=b == batch,
            step_time_source=source(micro),
        )

    return tuple(row(b) for b in sorted({*_candidate_grid(inputs, batch), b0, batch}))


def plausible_range(inputs: AdvisorInputs, sync: float
                    ) -> tuple[tuple[int, int] | None, bool]:
    """The recommendations at the ends of the noise scale's interval and, with timed
    points, on both step-time curves (minima and 25th percentiles of the rungs).

    Returns:
        (the range, whether the timing's uncertainty widened it).
    """
    ci = inputs.b_n_ci
    if math.isnan(ci.low) or math.isnan(ci.high):
        return None, False
    ends = (ci.low if ci.low > 0 else 1e-9, ci.high)
    by_noise = [_recommend_batch(inputs, b, inputs.gpus, sync)[1] for b in ends]
    both = list(by_noise)
    if inputs.timing is not None and inputs.timing.points and _timing_usable(inputs):
        both += [_recommend_batch(inputs, b, inputs.gpus, sync, upper=True)[1] for b in ends]
    widened = (min(both), max(both)) != (min(by_noise), max(by_noise))
    return (min(both), max(both)), widened


def frontier(inputs: AdvisorInputs, model: WallClock, max_gpus: int, sync: float
             ) -> tuple[FrontierRow, ...]:
    """The optimum on 1..max_gpus devices, each against the baseline on the input's N."""
    rows = []
    base = as_run(inputs, model).objective(inputs.baseline_batch)
    for g in range(1, max_gpus + 1):
        s_g = _sync_for(inputs, g)[0] if g != inputs.gpus else sync
        _, b_g, _ = _recommend_batch(inputs, inputs.b_n, g, s_g)
        m_g = _model(inputs, inputs.b_n, g, s_g)
        a_g = m_g.accumulation(b_g)
        ratio = m_g.objective(b_g) / base
        rows.append(FrontierRow(
            gpus=g, batch_size=b_g, per_device_batch_size=math.ceil(b_g / (a_g * g)),
            grad_accumulation=a_g, step_seconds=m_g.step_time(b_g), time_ratio=ratio,
            cost_ratio=ratio * g / inputs.gpus, sync_seconds=s_g,
        ))
    return tuple(rows)


def warmup_steps(inputs: AdvisorInputs, batch: int, ratio: float) -> int | None:
    """Steps of the learning-rate warm-up at ``batch`` (``ratio``: its steps over the
    baseline's), when it grows more than WARMUP_GROWTH× over the baseline: WARMUP_EPOCHS
    epochs, at most WARMUP_SHARE of the planned run's steps (when it has a plan)."""
    if batch <= WARMUP_GROWTH * inputs.baseline_batch:
        return None
    epochs = WARMUP_EPOCHS * math.ceil(inputs.dataset_size / batch)
    if inputs.training_examples is None:
        return epochs
    run = whole_steps(inputs.training_examples / inputs.baseline_batch * ratio)
    return max(1, min(epochs, math.ceil(WARMUP_SHARE * run)))


def absolute_prediction(inputs: AdvisorInputs, model: WallClock, rec: Candidate
                        ) -> AbsolutePrediction | None:
    """Hours and cost of the planned examples at the recommendation and at the baseline."""
    e = inputs.training_examples
    if e is None:
        return None
    n, b0 = inputs.gpus, inputs.baseline_batch
    base_steps = e / b0
    base_hours = base_steps * as_run(inputs, model).step_time(b0) / 3600.0
    hours = base_steps * rec.steps_ratio * model.step_time(rec.batch_size) / 3600.0
    price = inputs.price_per_hour
    steps = whole_steps(base_steps * rec.steps_ratio)
    return AbsolutePrediction(
        training_examples=e, hours=hours, baseline_hours=base_hours,
        cost=None if price is None else hours * n * price,
        baseline_cost=None if price is None else base_hours * n * price,
        price_per_hour=price, batch_size=rec.batch_size, steps=steps,
        examples=steps * rec.batch_size, baseline_steps=whole_steps(base_steps),
        epochs=steps * rec.batch_size / inputs.dataset_size if inputs.dataset_size else None,
    )


def advise(inputs: AdvisorInputs, max_gpus: int | None = None) -> Advice:
    """Recommend a batch size, learning rate and device count (DESIGN §4).

    Args:
        inputs: the measurements.
        max_gpus: also compute the time/cost frontier for 1..max_gpus devices.

    Returns:
        The recommendation, the candidate table, the frontier and, when the
        planned examples are known, absolute hours and cost; with the facts
        the words are written from.
    """
    n, b0, cap = inputs.gpus, inputs.baseline_batch, inputs.dataset_size
    state = _timing_state(inputs)
    timed = state in ("ok", "points", "clamped")
    sync, source = _sync_for(inputs, n) if timed else (0.0, "one device")
    optimum, batch, truncated = _recommend_batch(inputs, inputs.b_n, n, sync)
    model = _model(inputs, inputs.b_n, n, sync) if timed else None
    candidates = candidates_table(inputs, batch, model)
    rec_row = next(c for c in candidates if c.is_recommended)
    lr, rule = scaled_lr(inputs.baseline_lr, b0, batch, inputs.b_n, inputs.optimizer_family,
                         inputs.lr_rule)
    ci = inputs.b_n_ci
    batch_range, widened = plausible_range(inputs, sync)
    facts = Facts(
        sync_source=source,
        sync_link=interconnect(inputs.interconnect).note if source == "predicted" else None,
        timing_state=state,
        search_truncated=truncated,
        ci_low_at_zero=ci.low <= 0,
        ci_unbounded=math.isinf(ci.high),
        optimum_clipped=(model is not None and optimum is not None and optimum >= cap
                         and inputs.b_n < math.inf),
        warmup_steps=warmup_steps(inputs, batch, rec_row.steps_ratio),
        range_from_timing=widened,
    )
    time_ratio = rec_row.time_ratio if model is not None else None
    recommendation = Recommendation(
        batch_size=batch, learning_rate=lr, lr_rule=rule,
        grad_accumulation=rec_row.grad_accumulation,
        per_device_batch_size=rec_row.per_device_batch_size, gpus=n, basis="",
        predicted_time_ratio=time_ratio,
        predicted_cost_ratio=time_ratio,  # baseline on the same devices
        batch_range=batch_range, noise_step=inputs.noise_step,
        warmup_steps=facts.warmup_steps, b_n=inputs.b_n, b_n_ci95=inputs.b_n_ci,
    )
    return Advice(
        recommendation=recommendation,
        candidates=candidates,
        facts=facts,
        frontier=(frontier(inputs, model, max_gpus, sync)
                  if model is not None and max_gpus is not None else ()),
        optimum=optimum,
        sync_seconds=sync,
        absolute=absolute_prediction(inputs, model, rec_row) if model is not None else None,
    )
