"""Typed results passed between the probes, the runners, the advisor and the report.

Every arrow of the pipeline (DESIGN §1) is one of these dataclasses; nothing
here prints, and the only computing is a result reading its own numbers
(a timing curve evaluated at a batch size). ``report.py`` turns them into the JSON document.
Each measured number says where it came from (``source``: "measured" or
"predicted") so that a prediction is never shown as a measurement.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

Source = Literal["measured", "predicted"]


@dataclass(frozen=True)
class Interval:
    """A two-sided 95% confidence interval; ``high`` may be ``math.inf``."""

    low: float
    high: float

    @property
    def bounded(self) -> bool:
        return math.isfinite(self.low) and math.isfinite(self.high)

    def __iter__(self) -> Iterator[float]:
        """``low, high = est.ci95``, as a pair unpacks."""
        return iter((self.low, self.high))

    def __getitem__(self, i: int) -> float:
        """``est.ci95[0]``, as the JSON's list indexes (a trial: not subscriptable)."""
        return (self.low, self.high)[i]

    def __len__(self) -> int:
        return 2

    def as_list(self) -> list[float | None]:
        """JSON-friendly form: an unbounded side becomes ``None``."""
        return [
            self.low if math.isfinite(self.low) else None,
            self.high if math.isfinite(self.high) else None,
        ]


@dataclass(frozen=True)
class NoiseEstimate:
    """The gradient noise scale measured at one set of weights.

    Attributes:
        b_simple: tr(Σ)/|G|² (ratio of the summed unbiased estimates), or
            ``None`` when |G|² is not resolved (its interval includes 0).
        ci95: 95% interval of ``b_simple`` (Fieller's interval for a ratio of
            means); unbounded above when |G|² is unresolved.
        grad_norm_sq: unbiased estimate of |G|² and its interval.
        trace_sigma: unbiased estimate of tr(Σ) and its interval.
        method: "per-example" or "microbatch" (or "distributed").
        method_reason: why that method ran (user choice, a layer no rule covers, ...).
        b_small / b_big: the two batch sizes of the last round.
        examples: examples used in all rounds together.
        rounds: number of rounds.
        seconds: wall-clock seconds of the measurement.
        stopped: "converged" (target precision reached), "budget" (time ran
            out first), "max_examples" (could not grow further) or "interrupted".
        step: optimizer steps trained before this measurement (0 = as loaded).
        b_noise: tr(HΣ)/(GᵀHG) when curvature was measured, else ``None``.
        b_noise_ci95: its interval.
        examples_seen: training examples before this point (steps × baseline batch
            for bsfind's own training; a checkpoint's own count).
        loss: the training loss around this point (bsfind's own training only).
        summary_of: set when this estimate summarises several points (the median
            over the last points of a run): their training steps.
    """

    b_simple: float | None
    ci95: Interval
    grad_norm_sq: float
    grad_norm_sq_ci95: Interval
    trace_sigma: float
    trace_sigma_ci95: Interval
    method: str
    method_reason: str
    b_small: int
    b_big: int
    examples: int
    rounds: int
    seconds: float
    stopped: str
    step: int = 0
    b_noise: float | None = None
    b_noise_ci95: Interval | None = None
    examples_seen: int | None = None  # training examples before this point (None: unknown)
    loss: float | None = None  # training loss around this point (mean of the last steps)
    summary_of: tuple[int, ...] = ()  # a summary: the steps of the points it summarises

    @property
    def rel_half_width(self) -> float:
        """Half the interval's width over the estimate (inf when unresolved)."""
        if self.b_simple is None or not self.ci95.bounded or self.b_simple <= 0:
            return math.inf
        return (self.ci95.high - self.ci95.low) / 2.0 / self.b_simple


@dataclass(frozen=True)
class CurvatureResult:
    """B_noise = tr(HΣ)/(GᵀHG) measured at one set of weights (``noise/curvature.py``).

    Attributes:
        b_noise: the ratio of the summed estimates, or None when GᵀHG is not
            resolved (or no round finished).
        ci95: its Fieller interval.
        rounds / seconds: how long it took.
        trace_h_sigma / gthg: the unbiased means behind the ratio (NaN without rounds).
    """

    b_noise: float | None
    ci95: Interval
    rounds: int
    seconds: float
    trace_h_sigma: float = math.nan
    gthg: float = math.nan


@dataclass(frozen=True)
class DeviceInfo:
    """The device the probe ran on, with what NVML could tell about it.

    Fields NVML cannot supply are ``None`` (shown as N/A).
    """

    type: str  # "cpu" or "cuda"
    index: int | None = None
    name: str = "cpu"
    total_memory_bytes: int | None = None
    free_memory_bytes: int | None = None
    utilization_gpu_pct: float | None = None
    utilization_mem_pct: float | None = None
    sm_clock_mhz: int | None = None
    sm_clock_max_mhz: int | None = None
    power_w: float | None = None
    power_limit_w: float | None = None
    pcie_tx_kbps: int | None = None
    pcie_rx_kbps: int | None = None
    driver_version: str | None = None
    note: str | None = None  # e.g. the one-line hint when NVML is missing


@dataclass(frozen=True)
class MemoryModel:
    """M(B) ≈ fixed_bytes + bytes_per_example·B and the largest batch that fits.

    ``source`` is "measured" (CUDA peak allocated at several batch sizes) or
    "predicted" (parameter/gradient/optimizer bytes plus saved activations).
    ``limit_bytes`` is the budget used (device memory × memory_fraction, or
    available RAM on CPU). ``verified`` is True when the maximum was checked by
    one real step (CUDA).
    """

    fixed_bytes: int
    bytes_per_example: float
    max_batch_size: int
    limit_bytes: int
    source: Source
    verified: bool = False
    tried: tuple[int, ...] = ()
    # The fixed part holds DDP's gradient buckets (a line measured under torchrun);
    # plans for more devices from a one-process line add them (advisor.per_device_max).
    ddp_buckets: bool = False


@dataclass(frozen=True)
class TimingPoint:
    """One rung of the step-time ladder.

    ``seconds`` is the step's own time: the lowest of the rung's timed steps,
    since load from other processes only ever adds time. ``seconds_q25``, the
    25th percentile of the same steps, bounds how much of what was timed may
    have been load: the gap between the two is the timing's uncertainty.
    """

    batch_size: int
    seconds: float
    samples: int
    seconds_q25: float | None = None  # None: as ``seconds``


@dataclass(frozen=True)
class Segment:
    """t(b) = alpha + beta·b for per-device batches b in [lo, hi] (beta >= 0, t(b) >= 0)."""

    lo: float
    hi: float
    alpha: float
    beta: float


def _isotonic(values: list[float]) -> list[float]:
    """The non-decreasing sequence closest to ``values`` in least squares (pool adjacent
    violators): a step of more examples cannot take less time."""
    blocks: list[list[float]] = []  # [sum, count]
    for v in values:
        blocks.append([v, 1.0])
        while len(blocks) > 1 and blocks[-2][0] / blocks[-2][1] > blocks[-1][0] / blocks[-1][1]:
            s, n = blocks.pop()
            blocks[-1][0] += s
            blocks[-1][1] += n
    out: list[float] = []
    for s, n in blocks:
        out += [s / n] * int(n)
    return out


@dataclass(frozen=True)
class TimingCurve:
    """Step time t(B) of one device: the timed points, and a line t0 + per_example·B.

    ``quality`` says how the advisor may read it (``hardware/timing.py`` decides):

    - "line": the line t0 + per_example·B, fitted to the timed points (up to
      ``fitted_up_to`` when larger rungs' throughput fell well below the peak), is
      physical (t0 > 0, per_example >= 0) and fits them (R² >= MIN_R2, or
      residuals within the rungs' own measured noise). A line through a dozen
      rungs averages out the noise of each one.
    - "points": no line fits, but the points are clean (a genuinely curved
      t(B), e.g. a GPU filling up): the points themselves, made non-decreasing
      and interpolated; past the last rung, time in proportion to B (no
      further gain in throughput assumed).
    - "untrusted": neither, even after re-measuring (a machine too busy to
      time), or when the budget ended before the rungs were re-timed; also one
      timed batch size, or a clock that read 0 s for every step: the advice
      does not use the step time at all.

    A predicted curve (no points) is the line alone. ``t0_upper`` /
    ``per_example_upper``: the line through the rungs' 25th percentiles, the
    timing's uncertainty (None: as the line).
    """

    points: tuple[TimingPoint, ...]
    t0: float
    per_example: float
    r2: float
    source: Source | Literal["given"]  # given: the user's (t0, c), e.g. tracker.advice
    saturated_at: int | None = None  # batch where throughput stopped growing
    utilization_gpu_pct: float | None = None  # mean NVML utilisation while timing
    quality: Literal["line", "points", "untrusted"] = "line"
    passes: int = 0  # interleaved passes over the rungs after the first climb
    t0_upper: float | None = None
    per_example_upper: float | None = None
    # The largest batch the line was fitted to when larger rungs were left out: their
    # throughput fell well below the peak's (``hardware.timing.fit_points``); None: all.
    fitted_up_to: int | None = None
    # The rung that ran out of memory, where the climb stopped (None: none did).
    out_of_memory_at: int | None = None

    @property
    def fit_ok(self) -> bool:
        """Whether the fitted line is the curve (``quality == "line"``)."""
        return self.quality == "line"

    def segments(self, upper: bool = False) -> tuple[Segment, ...]:
        """t(b) as linear pieces; ``upper``: from the rungs' 25th percentiles instead.

        Past the largest timed batch, time in proportion to B: no throughput gain that
        was not measured (a review: a nearly flat line through rungs 8-256, extrapolated,
        put the advice at 5,512). A line's rungs past ``fitted_up_to`` (their throughput
        fell) are read as timed, never below the line (the same review: the line alone
        advised the rung the fit had left out for its drop, at 0.74x for a measured 1.32x).
        """
        if self.quality != "points" or len(self.points) < 2:
            return self._line_segments(upper)
        pts = sorted(self.points, key=lambda p: p.batch_size)
        bs = [float(p.batch_size) for p in pts]
        ts = _isotonic([self._timed(p, upper) for p in pts])
        out = []
        for i in range(len(bs) - 1):
            beta = (ts[i + 1] - ts[i]) / (bs[i + 1] - bs[i])
            alpha = ts[i] - beta * bs[i]
            if i == 0 and alpha >= 0.0:
                out.append(Segment(0.0, bs[1], alpha, beta))  # the first piece reaches b = 0
                continue
            if i == 0:  # a negative intercept: below the first rung, its time
                out.append(Segment(0.0, bs[0], ts[0], 0.0))
            out.append(Segment(bs[i], bs[i + 1], alpha, beta))
        out.append(Segment(bs[-1], math.inf, 0.0, ts[-1] / bs[-1]))
        return tuple(out)

    @staticmethod
    def _timed(p: TimingPoint, upper: bool) -> float:
        return max(0.0, p.seconds_q25 if upper and p.seconds_q25 is not None else p.seconds)

    def _line_segments(self, upper: bool) -> tuple[Segment, ...]:
        """The line, then the rungs it was not fitted to, then time in proportion to B."""
        t0, c = self.t0, self.per_example
        if upper and self.t0_upper is not None and self.per_example_upper is not None:
            t0, c = self.t0_upper, self.per_example_upper
        t0, c = max(t0, 0.0), max(c, 0.0)
        if not self.points or t0 == 0.0 and self.fitted_up_to is None:
            return (Segment(0.0, math.inf, t0, c),)  # predicted or given; or already ∝ B
        pts = sorted(self.points, key=lambda p: p.batch_size)
        end = float(self.fitted_up_to if self.fitted_up_to is not None else pts[-1].batch_size)
        out = [Segment(0.0, end, t0, c)]
        end_t = t0 + c * end
        for p in pts:
            b = float(p.batch_size)
            if b <= end:
                continue
            t = max(end_t, t0 + c * b, self._timed(p, upper))
            beta = (t - end_t) / (b - end)
            out.append(Segment(end, b, end_t - beta * end, beta))
            end, end_t = b, t
        out.append(Segment(end, math.inf, 0.0, end_t / end))
        return tuple(out)

    def seconds(self, batch_size: float, upper: bool = False) -> float:
        for s in self.segments(upper):
            if batch_size <= s.hi:
                return s.alpha + s.beta * batch_size
        raise AssertionError("the last segment is unbounded")  # pragma: no cover


@dataclass(frozen=True)
class Candidate:
    """One row of the advisor's table."""

    batch_size: int
    per_device_batch_size: int
    grad_accumulation: int
    steps_ratio: float  # S(B)/S(B0)
    step_seconds: float  # t(B), one optimizer step
    time_ratio: float  # S(B)·t(B) / (S(B0)·t(B0))
    cost_ratio: float
    memory_bytes: float | None
    fits: bool
    is_baseline: bool = False
    is_recommended: bool = False
    # where its step time comes from: "measured" (within the timed batch sizes),
    # "extrapolated" (per-device batch past the largest one timed), "predicted"
    # (a GPU that is not here) or None (no step time)
    step_time_source: str | None = None


@dataclass(frozen=True)
class Recommendation:
    batch_size: int
    learning_rate: float
    lr_rule: str
    grad_accumulation: int
    per_device_batch_size: int
    gpus: int
    basis: str  # what drove it, in words
    predicted_time_ratio: float | None = None
    predicted_cost_ratio: float | None = None
    batch_range: tuple[int, int] | None = None  # implied by the noise scale's interval
    warmup: str | None = None
    noise_step: int = 0  # which probe point (training step) drove it
    notes: tuple[str, ...] = field(default_factory=tuple)
    # learning_rate over the rule's, measured by branched runs at this batch
    # (``bsfind.branches.measure_lr``); None: not measured, the rule's learning rate.
    lr_factor: float | None = None
    # steps of the recommended learning-rate warm-up (``warmup`` says it in words)
    warmup_steps: int | None = None
    # the noise scale the advice rests on and its interval: B_simple as measured, B_noise
    # under probe.curvature, √(B_n · the branches' read) with branches (inf: unresolved)
    b_n: float = math.nan
    b_n_ci95: Interval | None = None


@dataclass(frozen=True)
class HardwareMeasurement:
    """What a runner measured about its device(s): memory, step time and, on several
    devices, the all-reduce time the advisor uses (None: predicted from the link)."""

    memory: MemoryModel | None
    timing: TimingCurve | None
    notes: tuple[str, ...] = ()
    sync_seconds: float | None = None
    # Other processes' share of the CPUs while a CPU step time was measured, and just
    # before (None: not measured, e.g. on CUDA or off Linux).
    busy_share: float | None = None
    busy_before: float | None = None
    # The intra-op threads a CPU ladder ran with when fewer than the run's (the cores
    # other processes left free), and whether steps were timed by the thread's CPU time.
    timing_threads: int | None = None
    timing_cpu_clock: bool = False


@dataclass(frozen=True)
class FrontierRow:
    """The optimum on ``gpus`` devices against the baseline (B0 on the input's N)."""

    gpus: int
    batch_size: int
    per_device_batch_size: int
    grad_accumulation: int
    step_seconds: float
    time_ratio: float  # S(B)·t(B) on `gpus` / S(B0)·t(B0) on the baseline's devices
    cost_ratio: float  # time_ratio × gpus / baseline devices
    sync_seconds: float


@dataclass(frozen=True)
class AbsolutePrediction:
    """Hours and money for the planned training, at the recommendation and the baseline.

    The planned examples E run at the baseline batch in E/B0 steps; at batch B
    the steps scale by S(B)/S(B0): hours(B) = (E/B0)·steps_ratio(B)·t(B)/3600,
    cost = hours × devices × price per device-hour. All predicted. The same progress at
    batch B takes (B + B_n)/(B0 + B_n) times E examples, more for any B above B0 and
    most above the noise scale: a run kept at E examples would stop short of it.
    """

    training_examples: int
    hours: float
    baseline_hours: float
    cost: float | None
    baseline_cost: float | None
    price_per_hour: float | None
    label: str = "predicted"
    text: str = ""  # one line for people, written by bsfind.wording
    # what the same progress takes at the recommended batch: steps S(B) = (E/B0)·S(B)/S(B0),
    # their examples S(B)·B (more than E above the noise scale) and those in epochs
    batch_size: int = 0
    steps: int = 0
    examples: int = 0
    epochs: float | None = None
    baseline_steps: int = 0  # E/B0, rounded up


@dataclass(frozen=True)
class RankInfo:
    """One rank of a data-parallel run, as the report's ``distributed.per_rank[]`` shows it."""

    rank: int
    local_rank: int
    host: str
    device: str
    device_name: str
    examples: int
    per_device_batch_size: int | None = None
    step_seconds: float | None = None  # its fitted step time at the per-device baseline batch
    timing: TimingCurve | None = None
    sync_seconds: float | None = None
    max_batch_size: int | None = None
    memory_tried: tuple[int, ...] = ()
    oom_at: tuple[int, ...] = ()


@dataclass(frozen=True)
class DistributedSummary:
    """The report's ``distributed`` object: the launch, the all-reduce and every rank."""

    world_size: int
    backend: str
    sync_seconds: float | None
    sync_bytes: int | None
    sync_source: str | None
    per_device_batch_size: int | None
    timing_basis: str | None
    per_rank: tuple[RankInfo, ...]


@dataclass(frozen=True)
class Trajectory:
    """How far the probe run along training got, and what the noise scale did there.

    Attributes:
        mode: "along" (bsfind trained at the baseline batch and learning rate),
            "checkpoints" (``model.checkpoints``), "log" (a tracker's log, ``bsfind
            schedule``) or "pinned" (``at_steps``,
            ``warmup_steps``, ``model.checkpoint``).
        steps / examples: the last point's training step and examples seen.
        epochs: examples over the dataset size.
        loss_from / loss_to: the training loss at the start and at the end.
        b_simple_first / b_simple_last: the noise scale at the first point and "now",
            the value the advice uses (along training the median of the last three
            points, which one lucky dip cannot move); None when unresolved; ``growth``
            is their ratio.
        moved: whether training got far enough to stand for the run (the loss
            fell by at least MOVED_LOSS_DROP, or the planned run was reached).
        planned_examples: the run the spec plans (``training``), when given.
        checkpoint: ``model.checkpoint``, when the weights started from it: steps and
            examples then count from the checkpoint, whose own are not known.
    """

    mode: str
    steps: int
    examples: int | None
    epochs: float | None
    loss_from: float | None
    loss_to: float | None
    b_simple_first: float | None
    b_simple_last: float | None
    moved: bool
    planned_examples: int | None = None
    checkpoint: str | None = None

    @property
    def growth(self) -> float | None:
        if not self.b_simple_first or not self.b_simple_last:
            return None
        return self.b_simple_last / self.b_simple_first


@dataclass(frozen=True)
class BranchRung:
    """One rung of the branch ladder: R branches at one batch size (``bsfind.branches``).

    Attributes:
        batch_size: k·B0.
        learning_rate: the advisor's rule at this batch (``lr_rule`` of the result).
        steps: optimizer steps of each branch (Δ / batch_size).
        repeats: branches run to the end (data orders); their losses are averaged.
        loss: the smoothed loss after Δ examples, the mean over the repeats (inf:
            a branch diverged).
        reference: the next smaller rung's smoothed loss after Δ/tolerance examples
            (None for the first rung): this rung passes when ``loss`` is not above it.
        passed: True / False by the rule; None for the first rung (the reference).
        losses: each repeat's smoothed loss after Δ.
        curve: (examples, loss) evaluations, averaged over the repeats.
        seconds: wall-clock of the rung's branches (training and evaluations).
        micro_batch: at most this many examples per forward and backward when the rung
            did not fit in memory in one (its steps accumulated them); None: one.
    """

    batch_size: int
    learning_rate: float
    steps: int
    repeats: int
    loss: float
    reference: float | None
    passed: bool | None
    losses: tuple[float, ...] = ()
    curve: tuple[tuple[int, float], ...] = ()
    seconds: float = 0.0
    micro_batch: int | None = None


# How a ladder ends when something other than its rule or its top ends it
# (``BranchResult.stopped``): its read is cut short.
LADDER_CUTS = ("budget", "out of memory", "interrupted")


@dataclass(frozen=True)
class BranchResult:
    """The local critical batch measured by short branched runs from one point of training.

    Attributes:
        step / examples_seen: where the branches start (the probe point).
        critical_batch: the largest rung that passed (every smaller one passed too),
            or None when fewer than two rungs finished.
        bound: "bracketed" (a larger rung failed: under S(B) = S_min(1 + B_crit/B),
            B_crit lies within ``interval``), "at most" (the first doubling failed even at
            the ladder's smallest batch, B0/MIN_FRACTION or B0 when it could not go
            below: B_crit is below √2 times it, how far the ladder cannot see) or "at
            least" (no rung failed before the ladder ended: B_crit is above
            ``interval.low``).
        interval: where B_crit lies by the rule (see ``bound``).
        baseline_batch: B0, the first rung (when 2·B0 already failed the ladder went
            below it: ``rungs`` then starts at a smaller batch).
        delta_examples: Δ, the examples every branch trains on.
        tolerance / smoothing / repeats: the rule's constants (``bsfind.branches``).
        lr_rule: the learning-rate rule of the rungs; ``lr_noise_scale`` the B_n it used.
        optimizer_state: "carried" (the run's own optimizer state) or "fresh" (none
            was available: a checkpoint holds weights only).
        checkpoint: ``model.checkpoint``, when the weights started from it (its own step
            is not known: ``step`` then counts from it).
        b_simple / b_noise: the noise scales measured at the same weights.
        examples: training examples all branches took; ``seconds`` their wall-clock.
        stopped: why the ladder ended: "failed" (a rung failed: the normal end), "top"
            (the largest factor, or the dataset), "out of memory", "budget" or
            "interrupted" (the last three: ``cut_short``).
        notes: sentences for people (written by ``bsfind.wording``).
    """

    step: int
    examples_seen: int | None
    critical_batch: int | None
    bound: str
    interval: Interval
    baseline_batch: int
    delta_examples: int
    tolerance: float
    smoothing: float
    repeats: int
    lr_rule: str
    lr_noise_scale: float | None
    optimizer_state: str
    rungs: tuple[BranchRung, ...]
    b_simple: float | None
    b_noise: float | None
    examples: int
    seconds: float
    stopped: str
    notes: tuple[str, ...] = ()
    checkpoint: str | None = None

    @property
    def cut_short(self) -> bool:
        """Whether something other than the ladder ended it (``LADDER_CUTS``: the budget,
        memory, Ctrl-C) before a rung fell behind and before its top: a read is then how
        far the ladder got ("≥ 32": 64 was never compared), not a ladder top ("≥ 16·B0":
        every rung allowed kept up) nor a bracket."""
        return self.stopped in LADDER_CUTS

    @property
    def ratio_simple(self) -> float | None:
        """Local critical batch / B_simple at the same weights."""
        if self.critical_batch is None or not self.b_simple:
            return None
        return self.critical_batch / self.b_simple

    @property
    def ratio_noise(self) -> float | None:
        """Local critical batch / B_noise at the same weights (None: not measured)."""
        if self.critical_batch is None or not self.b_noise:
            return None
        return self.critical_batch / self.b_noise


@dataclass(frozen=True)
class RunAverage:
    """The critical batch of a run between its first and last checkpoint, from the local
    critical batches measured by branches at each (``bsfind.branches.run_average``).

    Attributes:
        critical_batch: Σ b_j·S_min,j / ΣS_min,j over the stretches between checkpoints:
            what S(B) = S_min(1 + B_crit/B) fitted to whole runs over those stretches
            would give; None when the reads bound it from both sides, or fewer than two
            are left once the cut-short ones are left out.
        bound: "estimate" (every read bracketed), "at least" / "at most" (some reads only
            bound their critical batch, all the same way: the average grows with each
            read, so it is bounded the same way), "none" (bounds both ways, or fewer than
            two complete reads).
        from_step / to_step: the first and last checkpoint's step (at the baseline batch).
        reads: (step, local critical batch) of each checkpoint used; a one-sided read
            ("at most" / "at least") counts as its bound.
        one_sided: how many of the reads were one-sided.
        examples: training examples all those branches took (the left-out ones' too).
        read_bounds: each read's ``BranchResult.bound``, in the order of ``reads``.
        left_out: (step, read, bound, stopped) of the reads whose ladders were cut short
            (``BranchResult.cut_short``): how far a ladder got is not a read of its
            critical batch, so each is left out, as if its checkpoint were not listed
            (the average spans the complete reads; with fewer than two of them it has no
            value, and ``bound`` is "none").
    """

    critical_batch: float | None
    from_step: float
    to_step: float
    reads: tuple[tuple[float, int], ...]
    one_sided: int
    examples: int
    bound: str = "estimate"
    read_bounds: tuple[str, ...] = ()
    left_out: tuple[tuple[float, int, str, str], ...] = ()


@dataclass(frozen=True)
class NoisePartial:
    """What a run interrupted after its first noise point had measured: every point, the
    last one cut short when the interruption came during it, and the value the advice
    would use from them (along training the median of the last three, as in a finished
    run; pinned, the last point)."""

    points: tuple[NoiseEstimate, ...]
    used: NoiseEstimate


@dataclass(frozen=True)
class BranchPartial:
    """What a run interrupted during or after its branches had measured: the noise points,
    the branch results (one the interruption cut marked ``stopped="interrupted"``) and,
    with ``model.checkpoints``, their run average."""

    noise: NoisePartial
    branches: tuple[BranchResult, ...]
    run_average: RunAverage | None = None


@dataclass(frozen=True)
class LrTrial:
    """One learning rate of the search: R branches at the recommended batch.

    Attributes:
        factor: the learning rate over the rule's (1: the rule's own).
        learning_rate: the rule's learning rate × ``factor``.
        loss: the loss at the end of the runs (after the cool-down), the mean over the
            repeats (inf: a run diverged).
        losses: each repeat's.
        seconds: wall-clock of its branches (training and evaluations).
    """

    factor: float
    learning_rate: float
    loss: float
    losses: tuple[float, ...] = ()
    seconds: float = 0.0


@dataclass(frozen=True)
class LrSearch:
    """The learning rate measured at the recommended batch by short training runs
    (``bsfind.branches.measure_lr``), instead of extrapolated from lr0 by a rule.

    Attributes:
        batch_size: the batch the runs trained at (the recommendation's).
        step: the training step of their starting weights (the probe run's start).
        rule_learning_rate / lr_rule: the rule's learning rate there, and the rule.
        factor: the chosen learning rate over the rule's: the trial with the lowest loss
            (1: the rule's stood, also when no trial finished).
        learning_rate: the rule's × ``factor``.
        steps / cooldown / repeats: each run's steps at its learning rate, the steps of
            the linear decay to 0 after them (the loss is read at the end), and the data
            orders averaged.
        trials: in the order they ran.
        examples / seconds: training examples all runs took, and their wall-clock.
        stopped: "found" (the walk ended at a lowest loss), "limit" (the lowest was at
            the largest or smallest factor allowed), "diverged" (no factor gave a finite
            loss: the rule's stands), "budget", "out of memory" or "interrupted".
        notes: sentences for people (written by ``bsfind.wording``).
        micro_batch: the examples per forward and backward when the batch did not fit
            in one (each step accumulated them); None: one per step.
        start_loss: the loss at the weights every run starts from, on the same
            examples as the runs' (None: not measured, or out of memory); a run that
            ends no lower made no progress.
    """

    batch_size: int
    step: int
    rule_learning_rate: float
    lr_rule: str
    factor: float
    learning_rate: float
    steps: int
    cooldown: int
    repeats: int
    trials: tuple[LrTrial, ...]
    examples: int
    seconds: float
    stopped: str
    notes: tuple[str, ...] = ()
    micro_batch: int | None = None
    start_loss: float | None = None


# A learning rate stalled on a data order when, where another rate cut the loss from the
# runs' start by at least this share of it, it made less than this share of that cut.
STALL_SHARE = 0.1


def stalled_orders(losses: Mapping[float, Sequence[float]], start: float | None
                   ) -> dict[float, tuple[int, ...]]:
    """The learning-rate search's factors that stalled (:data:`STALL_SHARE`), each with the
    data orders (0-based) it stalled on; a diverged run counts on its order whatever
    ``start`` (the loss at the weights every run starts from; None: not known).

    A trial's SGD run at the rule's rate fell back to chance on one order (2.309 from
    2.306, where 0.5x reached 0.50) and was kept for beating 0.5x on the other by 5%; a
    review's ended at chance just below a start above it (2.284), so the rule asks for a
    share of the best progress, not merely a lower loss. Where no rate cut the loss by
    that share (late in a run, losses within noise of the start), nothing stalls."""
    out: dict[float, tuple[int, ...]] = {}
    for f, ends in losses.items():
        orders = []
        for k, end in enumerate(ends):
            if not math.isfinite(end):
                orders.append(k)
                continue
            if start is None:
                continue
            cuts = [start - other[k] for g, other in losses.items()
                    if g != f and k < len(other) and math.isfinite(other[k])]
            best = max(cuts, default=0.0)
            if best >= STALL_SHARE * abs(start) and start - end < STALL_SHARE * best:
                orders.append(k)
        if orders:
            out[f] = tuple(orders)
    return out
