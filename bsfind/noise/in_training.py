"""The pieces of the in-training tracker (``bsfind/tracker.py``) that are not its API.

- :class:`Window`: the last measurements, combined as a ratio of weighted means with
  Fieller's interval (McCandlish App. A.1: never a mean of ratios);
- :class:`StepTimes`: step periods per batch size and the line t(B) = t0 + c·B;
- :class:`StepCost`: what a measured step costs over a plain one, and the ``every``
  that keeps that cost to a share of training time;
- :class:`Pending`: a measured step's numbers on their way from the device to the
  host without a synchronisation (a non-blocking copy and an event on CUDA);
- :class:`DDPNorms`: the DDP communication hook that measures each bucket before and
  after its all-reduce.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass
from typing import Any, Literal

import torch

from bsfind import torch_compat as compat
from bsfind.noise.estimators import RatioAccumulator
from bsfind.results import Interval, TimingCurve, TimingPoint

Method = Literal["per-example", "accumulation", "ddp"]

# Step periods kept per batch size, and needed before a size enters the fitted curve.
TIMED_STEPS = 64
MIN_TIMED_STEPS = 8
# The fitted step time must grow this much from the smallest batch size timed to the
# largest to be a curve: less is within the jitter of host-timed steps (a few percent).
MIN_GROWTH = 0.05
# ... over sizes at least this far apart: two close ones (an epoch's partial last batch
# of 57 beside the full 60) fit their jitter, often with a negative t0 (a review).
MIN_SPAN = 1.5
# The quantile of step periods that stands for a batch size's step time: other
# processes only ever add time, so a low quantile estimates the step's own cost
# (DESIGN §9); a low quantile rather than the minimum, because on CUDA host-side
# periods jitter around the device's.
TIMING_QUANTILE = 0.25
# Measured-step spans kept per batch size, and needed before ``every`` is adapted.
COST_SPANS = 8
MIN_COST_SPANS = 3


# The window keeps the measurements of the latest 1/RECENT of the examples seen so far
# (2: the latter half of training so far).
RECENT = 2.0


class Window:
    """The last ``size`` per-step estimates, combined as a ratio of weighted means,
    from the latter part of training so far only: a row measured at e examples leaves
    once the newest is past e / RECENT. The weights move while the window fills, and
    |G|² falls by orders of magnitude early in training; a window reaching back to
    the start let the first |G|² dominate the mean (a tracked B_simple 17× below the
    fixed-weight value at the same step). The noise scale grows about as a power of
    the examples seen (docs/validation.md), so within the last halving it changes by a
    bounded factor whatever the step."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.rows: deque[tuple[float, float, float, float]] = deque(maxlen=size)

    def add(self, trace: float, g2: float, weight: float, examples: float = 0.0) -> None:
        self.rows.append((trace, g2, weight, examples))
        while len(self.rows) > 2 and self.rows[0][3] * RECENT < examples:
            self.rows.popleft()

    def summary(self) -> tuple[float, float, float | None, Interval]:
        """(smoothed |G|², smoothed tr(Σ), B_simple or None, its interval)."""
        traces, g2s, weights, _ = (list(c) for c in zip(*self.rows, strict=True))
        acc = RatioAccumulator(traces, g2s, weights)
        moments = acc.moments()
        value, ci, _, _ = acc.ratio(moments)
        mean_trace, mean_g2 = moments[:2]  # the weighted means
        return mean_g2, mean_trace, value, ci


class StepTimes:
    """Host time from the end of one ``update()`` call to the start of the next (a
    training step without the tracker's own work), per global batch size."""

    def __init__(self) -> None:
        self.periods: dict[int, deque[float]] = {}
        self.last: float | None = None

    def tick(self, batch: int, now: float, keep: bool) -> None:
        if self.last is not None and keep:
            got = self.periods.get(batch)  # (setdefault would build a deque every step)
            if got is None:
                got = self.periods[batch] = deque(maxlen=TIMED_STEPS)
            got.append(now - self.last)

    def curve(self) -> TimingCurve | None:
        """t(B) = t0 + c·B through each batch size's low quantile, once two sizes have
        MIN_TIMED_STEPS periods each (one size cannot separate t0 from c); None when the
        sizes span less than MIN_SPAN, when the fit's t0 is negative, or when the time at
        the largest size timed is not at least MIN_GROWTH above the smallest's: overhead
        and noise, not a step-time curve. (A new user's epochs ended on a partial
        batch of 8 beside the full 32, timed alike: c came out negative, and the advice ran
        off to 2^40; a review's c just above 0 sent it to 4,496.)"""
        pts = []
        for b, ps in sorted(self.periods.items()):
            if len(ps) >= MIN_TIMED_STEPS:
                pts.append(TimingPoint(b, _low(ps), len(ps)))
        if len(pts) < 2:
            return None
        xs = [float(p.batch_size) for p in pts]
        ys = [p.seconds for p in pts]
        mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
        sxx = sum((x - mx) ** 2 for x in xs)
        c = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sxx
        t0 = my - c * mx
        ss = sum((y - my) ** 2 for y in ys)
        res = sum((y - t0 - c * x) ** 2 for x, y in zip(xs, ys, strict=True))
        r2 = 1.0 - res / ss if ss > 0 else 1.0
        if (c <= 0 or t0 < 0 or xs[-1] < MIN_SPAN * xs[0]
                or t0 + c * xs[-1] < (1 + MIN_GROWTH) * (t0 + c * xs[0])):
            return None
        return TimingCurve(points=tuple(pts), t0=t0, per_example=c, r2=r2, source="measured")


def _low(values: deque[float]) -> float:
    s = sorted(values)
    return s[int(TIMING_QUANTILE * (len(s) - 1))]


class StepCost:
    """Whole-step host spans per batch size: of plain steps (the end of one ``update()``
    to the end of the next) and of measured ones (from just before the hooks were
    attached, in the ``update()`` before, to their own ``update()``'s detaching them). The
    difference of their low quantiles is what one measurement costs."""

    def __init__(self) -> None:
        self.plain: dict[int, deque[float]] = {}
        self.measured: dict[int, deque[float]] = {}

    def add(self, batch: int, seconds: float, measured: bool) -> None:
        spans, keep = (self.measured, COST_SPANS) if measured else (self.plain, TIMED_STEPS)
        got = spans.get(batch)
        if got is None:
            got = spans[batch] = deque(maxlen=keep)
        got.append(seconds)

    def every(self, batch: int, share: float, lowest: int, highest: int) -> int | None:
        """The smallest ``every`` in [lowest, highest] at which measured steps cost at
        most ``share`` of training time at ``batch``: extra / (every · t_plain) <= share.
        None until MIN_TIMED_STEPS plain and MIN_COST_SPANS measured spans exist."""
        plain, measured = self.plain.get(batch), self.measured.get(batch)
        if (plain is None or measured is None or len(plain) < MIN_TIMED_STEPS
                or len(measured) < MIN_COST_SPANS):
            return None
        t = _low(plain)
        if t <= 0.0:
            return None
        extra = max(0.0, _low(measured) - t)
        return min(highest, max(lowest, math.ceil(extra / (share * t))))


@dataclass
class StepMeta:
    """What a measured step knows on the host; the numbers wait on the device."""

    step: int
    examples: int
    method: Method
    micro: list[int]  # batch size of each micro-batch on this rank
    world: int
    loss_count: int
    seconds: float
    divisor: int | None = None  # each micro-batch loss's divisor, when not len(micro)
    parameters: int | None = None  # the tracked model's trainable parameters then


class Pending:
    """A measured step's values on their way to the host, without a synchronisation.

    ``values``: float64 device vector [sq_big, loss_sum, sq_small terms...]; ``work``:
    an async all-reduce still summing it over ranks.
    """

    def __init__(self, values: torch.Tensor, meta: StepMeta, work: Any = None) -> None:
        self.values = values
        self.meta = meta
        self.work = work
        self.host: torch.Tensor | None = None
        self.event: Any = None

    def ready(self, force: bool) -> bool:
        if self.work is not None:
            if not force and not self.work.is_completed():
                return False
            self.work.wait()
            self.work = None
        if self.host is None:
            if self.values.device.type == "cuda":
                self.host = torch.empty(self.values.shape, dtype=self.values.dtype,
                                        pin_memory=True)
                self.host.copy_(self.values, non_blocking=True)
                self.event = torch.cuda.Event()
                self.event.record()
            else:
                self.host = self.values.to("cpu")
        if self.event is not None:
            if not force and not self.event.query():
                return False
            self.event.synchronize()
        return True


class DDPNorms:
    """A DDP communication hook that also measures each bucket before and after its
    all-reduce (the small and the big batch of the ddp pairing).

    A bucket all-reduced twice in one step (gradient accumulation without ``no_sync()``:
    every micro-batch's backward all-reduces) cannot be paired: its second local side is
    the first all-reduced gradient plus this rank's new micro-batch, and summing both
    sides as one pair read B_simple at about half the exact value (a trial: 43 against
    79). ``repeated`` says so, and :meth:`take` then gives nothing."""

    def __init__(self, ddp: Any, hook: Any = None, state: Any = None) -> None:
        self.active = False
        self.local: list[torch.Tensor] = []
        self.reduced: list[torch.Tensor] = []
        self.buckets: set[int] = set()  # the bucket indices all-reduced since take()
        self.repeated = False  # some bucket was all-reduced twice since take()
        self.group = ddp.process_group
        self.wrap(hook, state)
        ddp.register_comm_hook(self, ddp_comm_hook)

    def wrap(self, hook: Any, state: Any) -> None:
        """All-reduce through ``hook`` with ``state`` (the user's), else DDP's default."""
        from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

        self.inner = hook or default_hooks.allreduce_hook
        self.inner_state = state if hook is not None else self.group

    @classmethod
    def on(cls, ddp: Any, hook: Any = None, state: Any = None) -> DDPNorms:
        """The norms of ``ddp``: a new comm hook, or the one an earlier tracker registered
        (DDP takes one comm hook and cannot remove it: a second tracker on the same DDP
        model, a notebook cell run again, failed at registration), taken over with the
        inner hook asked for now."""
        for registered, norms in getattr(ddp, "_comm_hooks", ()):
            if registered is ddp_comm_hook and isinstance(norms, cls):
                norms.take()  # (what an abandoned step left)
                norms.active = False
                norms.wrap(hook, state)
                return norms
        return cls(ddp, hook=hook, state=state)

    def take(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(Σ |local bucket|², Σ |reduced bucket|²) since the last call, or None (also
        when a bucket was all-reduced more than once: ``repeated``, reset by the next
        call)."""
        local, reduced, repeated = self.local, self.reduced, self.repeated
        self.local, self.reduced, self.buckets, self.repeated = [], [], set(), False
        if repeated or not local or len(reduced) != len(local):
            return None
        return torch.stack(local).sum(), torch.stack(reduced).sum()


def ddp_comm_hook(norms, bucket):  # type: ignore[no-untyped-def]
    # No annotations: DDP compares them with dist.GradBucket / Future[Tensor] at
    # registration, and this module's postponed (string) annotations never match.
    if not norms.active:
        return norms.inner(norms.inner_state, bucket)
    if bucket.index() in norms.buckets:
        norms.repeated = True
    norms.buckets.add(bucket.index())
    norms.local.append(compat.sq_norm([bucket.buffer()]))
    fut = norms.inner(norms.inner_state, bucket)

    def after(f: Any) -> torch.Tensor:
        t = f.value()
        t = t[0] if isinstance(t, list) else t
        norms.reduced.append(compat.sq_norm([t]))  # list.append: safe from the comm thread
        return t

    return fut.then(after)
