"""The noise scale inside training: a tracker for any loop (DESIGN §7).

    tracker = bsfind.track(model, log="noise.jsonl")
    for x, y in loader:
        loss = loss_fn(model(x), y)
        loss.backward()
        tracker.update(loss)        # after backward, before clipping and optimizer.step()
        optimizer.step()
        optimizer.zero_grad()

Every training step already holds a small and a big batch. The tracker pairs
them, cheapest first (McCandlish et al. 2018, App. A; the estimators of
``noise/estimators.py``):

- **ddp**: ``model`` is a DistributedDataParallel over N > 1 ranks. A DDP
  communication hook takes each rank's local gradient (small, b = its examples
  of the step) just before the all-reduce, and the all-reduced one (big, N·b)
  just after. Cost: one squared norm per bucket on each side, and one extra
  all-reduce of three scalars per measured step.
- **accumulation**: the loop calls ``micro_step()`` after the backward of
  each micro-batch but the last. The micro-batch gradient is the difference of
  ``.grad`` before and after that micro-batch's backward; their sum is the big
  batch. No hooks. Cost: one extra gradient buffer (the ``.grad`` of the
  previous boundary) and three passes over the gradients per micro-batch.
- **per-example**: otherwise, per-example gradient norms (b = 1) from
  :class:`~bsfind.noise.per_example.PerExampleGradNorms` on one step in
  ``every``. The hooks are attached at the end of the ``update()`` before a
  measured step (the forward must run hooked) and detached by its own
  ``update()``: other steps run the model untouched.

Gradients are read where ``update()`` / ``micro_step()`` are called, so call
them before clipping and before ``GradScaler.unscale_``; with ``scaler=`` the
squared norms are divided by the loss scale squared.

|G|² and tr(Σ) are smoothed separately, as weighted means over the last
``window`` measurements (weights: the big batch) from the latter half of the examples
seen so far (``in_training.Window``: early measurements, whose |G|² is orders of
magnitude larger, leave as training goes on), and B_simple is the ratio of
the two means, never a mean of ratios (McCandlish App. A.1), with Fieller's 95%
interval over the window (:class:`~bsfind.noise.estimators.RatioAccumulator`).
The weights move between the steps of a window, so a tracked value is an
average over that stretch of training, not a measurement at fixed weights
(``bsfind noise`` measures at fixed weights).

Values stay on the device until they are ready: on CUDA each measured step's
numbers are copied to the host without a synchronisation and turned into a
record at a later ``update()`` (``records`` waits for all of them).

With ``log=path`` each record is one JSON line (rank 0 only)::

    {"step": 40, "examples": 2624, "loss": 0.41, "grad_norm_sq": 0.012,
     "trace_sigma": 1.7, "b_simple": 141.6, "b_simple_ci95": [118.2, 175.0],
     "b_small": 1, "b_big": 64, "method": "per-example", ...}

``step`` counts optimizer steps before the measured one (the weights it was
measured at); ``examples`` the training examples through the measured step;
``loss`` the mean of the losses given to ``update()`` since the previous
record; ``grad_norm_sq`` / ``trace_sigma`` the smoothed values behind
``b_simple`` (null when |G|² is not resolved; the interval's high end is then
null). Extra keys: ``step_grad_norm_sq`` and ``step_trace_sigma`` (this step's
own unbiased estimates), ``window`` (measurements smoothed) and ``seconds``
(since the tracker started). :func:`read_log` parses the file.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import operator
import sys
import time
import warnings
import weakref
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Literal

import torch
from torch import nn

from bsfind import torch_compat as compat
from bsfind.advisor import (
    AdvisorInputs,
    advise,
    optimizer_family,
    optimizer_known,
    scaled_lr,
    steps_ratio,
)
from bsfind.errors import UsageError
from bsfind.noise import in_training
from bsfind.noise.estimators import two_batch
from bsfind.noise.in_training import Method
from bsfind.results import Interval, TimingCurve

METHODS: tuple[str, ...] = ("per-example", "accumulation", "ddp")
TimingSource = Literal["given", "measured", "none"]
AdviceBasis = Literal["time", "noise"]

# One step in this many is measured with per-example norms, at least. A measured step
# costs 1.5-1.9x a plain one on the reference models (the hooks, plus about 0.5 ms of
# Python that matters only for millisecond steps), so 1/32 of that is 1.5-3% on average
# (benchmarks/tracker_overhead.py measures it: at 16 the 1 ms MLP step lost 5.6%).
DEFAULT_EVERY = 32
# With the default ``every``, the tracker times its own measured steps against plain
# ones (in_training.StepCost) and measures less often when one in DEFAULT_EVERY would
# cost more than this share of training time (the 1 ms MLP step: about one in 45), up
# to one in MAX_EVERY. Under half the 5% the tracker may cost (issue #16): the other
# steps' bookkeeping (about 1.5% of a 1 ms step) and the noise in the estimate take
# the rest.
OVERHEAD_SHARE = 0.02
MAX_EVERY = 256
# The DDP and accumulation pairings cost a few passes over the gradients, far less
# than a forward and backward: every step is measured.
DEFAULT_EVERY_CHEAP = 1
# Measurements smoothed into one value: enough rounds for the t-based interval
# (df = window - 1) to be close to its normal limit.
DEFAULT_WINDOW = 64
# What to do when update() finds no gradient or a zero one (two warnings say it).
UPDATE_AFTER_BACKWARD = ("call update() after the step's loss.backward(), before "
                         "optimizer.zero_grad()")
# Losses kept one by one between measurements before they are folded into their sum.
LOSSES_KEPT = 64
# dataset size the advisor is given when the caller does not know it
UNKNOWN_DATASET = 2**40
JSON_KEYS = ("step", "examples", "loss", "grad_norm_sq", "trace_sigma", "b_simple",
             "b_simple_ci95", "b_small", "b_big", "method")


# ----------------------------------------------------------------------------- records


@dataclass(frozen=True)
class TrackRecord:
    """One measured step and the smoothed noise scale after it (one JSON line).

    Attributes:
        step: optimizer steps taken before the measured step.
        examples: training examples processed through the measured step (all ranks).
        loss: mean of the losses given to ``update()`` since the previous record.
        grad_norm_sq / trace_sigma: |G|² and tr(Σ) smoothed over the window.
        b_simple: trace_sigma / grad_norm_sq, or None while |G|² is not resolved.
        ci95: Fieller's 95% interval over the window (high end inf when unresolved).
        b_small / b_big: the two batch sizes paired at this step.
        method: "per-example", "accumulation" or "ddp".
        step_grad_norm_sq / step_trace_sigma: this step's own unbiased estimates.
        window: measurements in the smoothing window.
        seconds: wall-clock seconds since the tracker started.
        batch: the examples the measured step trained on (all ranks). ``b_big`` is the
            estimator's big batch, which for unequal micro-batches (an epoch's short
            last step) is their number times their harmonic mean; None in logs written
            before it was logged (``b_big`` stands in).
        parameters: the trainable parameters (elements) of the tracked model, which
            ``bsfind schedule`` compares with the spec's model; None in older logs.
    """

    step: int
    examples: int
    loss: float | None
    grad_norm_sq: float
    trace_sigma: float
    b_simple: float | None
    ci95: Interval
    b_small: int
    b_big: int
    method: str
    step_grad_norm_sq: float = math.nan
    step_trace_sigma: float = math.nan
    window: int = 0
    seconds: float = math.nan
    batch: int | None = None
    parameters: int | None = None

    @property
    def trained(self) -> int:
        """The examples of the measured step (``batch``, or ``b_big`` in older logs)."""
        return self.batch if self.batch is not None else self.b_big

    def metrics(self, prefix: str = "bsfind/") -> dict[str, float]:
        """The record as flat float metrics for a logger (what the integrations log):
        ``b_simple`` and its interval's ends only when they are finite."""
        out = {"grad_norm_sq": self.grad_norm_sq, "trace_sigma": self.trace_sigma,
               "b_big": float(self.b_big), "examples": float(self.examples)}
        if self.b_simple is not None:
            out["b_simple"] = self.b_simple
        for key, value in (("b_simple_low", self.ci95.low), ("b_simple_high", self.ci95.high)):
            if math.isfinite(value):
                out[key] = value
        return {prefix + k: float(v) for k, v in out.items()}

    def to_json(self) -> dict[str, Any]:
        """The JSON-lines object (the keys of the format, then the extras)."""
        return {
            "step": self.step, "examples": self.examples, "loss": _finite_or_none(self.loss),
            "grad_norm_sq": self.grad_norm_sq, "trace_sigma": self.trace_sigma,
            "b_simple": self.b_simple, "b_simple_ci95": self.ci95.as_list(),
            "b_small": self.b_small, "b_big": self.b_big, "method": self.method,
            "step_grad_norm_sq": _finite_or_none(self.step_grad_norm_sq),
            "step_trace_sigma": _finite_or_none(self.step_trace_sigma),
            "window": self.window, "seconds": _finite_or_none(self.seconds),
            "batch": self.batch, "parameters": self.parameters,
        }


def _finite_or_none(x: float | None) -> float | None:
    return x if x is not None and math.isfinite(x) else None


def _number(obj: dict[str, Any], key: str, kind: type, nullable: bool = False) -> Any:
    return _value(obj.get(key), key, kind, nullable)


def _value(value: Any, key: str, kind: type, nullable: bool = False) -> Any:
    """``value`` (read from ``key``) as ``kind``; ValueError naming ``key`` otherwise."""
    if value is None and nullable:
        return None
    if kind is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if kind is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        if not math.isfinite(value):  # the writer puts null for a value it has not
            raise ValueError(f"{key}: expected a finite number, got {value!r}")
        return float(value)
    want = {int: "an integer", float: "a number"}[kind] + (" or null" if nullable else "")
    raise ValueError(f"{key}: expected {want}, got {value!r}")


def record_from_json(obj: dict[str, Any]) -> TrackRecord:
    """Parse one JSON-lines object (extra keys are ignored; missing extras are nan).

    Raises:
        ValueError: a key of the format is missing or has the wrong type.
    """
    missing = [k for k in JSON_KEYS if k not in obj]
    if missing:
        raise ValueError(f"missing key(s) {', '.join(missing)}")
    ci = obj["b_simple_ci95"]
    if not (isinstance(ci, list) and len(ci) == 2):
        raise ValueError(f"b_simple_ci95: expected [low, high|null], got {ci!r}")
    low = _value(ci[0], "b_simple_ci95[0]", float, nullable=True)
    high = _value(ci[1], "b_simple_ci95[1]", float, nullable=True)
    if obj["method"] not in METHODS:
        raise ValueError(f"method: expected one of {', '.join(METHODS)}, got {obj['method']!r}")
    # (logs before the interval's high end was held at 0 may hold [0, negative])
    if low is not None and high is not None and low > max(high, 0.0):
        raise ValueError(f"b_simple_ci95: low {low} above high {high}")
    extras = {k: _number(obj, k, float, nullable=True) for k in
              ("step_grad_norm_sq", "step_trace_sigma", "seconds") if k in obj}
    for key, least in (("step", 0), ("examples", 0), ("b_small", 1), ("b_big", 1)):
        if _number(obj, key, int) < least:
            raise ValueError(f"{key}: expected >= {least}, got {obj[key]}")
    batch = _number(obj, "batch", int, nullable=True)
    if batch is not None and batch < 1:
        raise ValueError(f"batch: expected >= 1, got {batch}")
    parameters = _number(obj, "parameters", int, nullable=True)
    if parameters is not None and parameters < 1:
        raise ValueError(f"parameters: expected >= 1, got {parameters}")
    return TrackRecord(
        step=_number(obj, "step", int), examples=_number(obj, "examples", int),
        loss=_number(obj, "loss", float, nullable=True),
        grad_norm_sq=_number(obj, "grad_norm_sq", float),
        trace_sigma=_number(obj, "trace_sigma", float),
        b_simple=_number(obj, "b_simple", float, nullable=True),
        ci95=Interval(-math.inf if low is None else low, math.inf if high is None else high),
        b_small=_number(obj, "b_small", int), b_big=_number(obj, "b_big", int),
        method=obj["method"],
        step_grad_norm_sq=math.nan if extras.get("step_grad_norm_sq") is None
        else extras["step_grad_norm_sq"],
        step_trace_sigma=math.nan if extras.get("step_trace_sigma") is None
        else extras["step_trace_sigma"],
        window=_number(obj, "window", int) if "window" in obj else 0,
        seconds=math.nan if extras.get("seconds") is None else extras["seconds"],
        batch=batch, parameters=parameters,
    )


def read_log(path: str | Path) -> list[TrackRecord]:
    """The records of a tracker's JSON-lines log, in file order (blank lines skipped). A
    last line cut short (a run killed while writing it) is left out with a
    RuntimeWarning.

    Raises:
        UsageError: the file is missing, or a line is not a record (with its line number).
    """
    records, cut = read_log_records(path)
    if cut is not None:
        warnings.warn(cut, RuntimeWarning, stacklevel=2)
    return records


def read_log_records(path: str | Path) -> tuple[list[TrackRecord], str | None]:
    """:func:`read_log`'s records, and what was left out: a last line that is not a
    record and has no newline after it (the run ended while writing it), or None."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise UsageError(f"{p}: cannot read the tracker log: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise UsageError(f"{p}: cannot read the tracker log: not UTF-8 text",
                         hint="the file should come from bsfind.track(..., log=path)") from None
    lines = text.splitlines()
    out = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
            if not isinstance(obj, dict):
                raise ValueError("not a JSON object")
            out.append(record_from_json(obj))
        except ValueError as exc:  # json.JSONDecodeError is a ValueError
            # a line cut short is never whole JSON, and starts as the tracker writes one
            # (a log of one such line too); a whole object that is not a record is an
            # error wherever it is
            if (isinstance(exc, json.JSONDecodeError) and n == len(lines)
                    and not text.endswith("\n")
                    and (out or line.lstrip().startswith('{"step"'))):
                return out, (f"{p}:{n}: the last line was cut short (the run ended while "
                             "writing it) and is left out")
            raise UsageError(f"{p}:{n}: not a tracker record: {exc}",
                             hint="the file should come from bsfind.track(..., log=path)") from None
    return out, None


# ------------------------------------------------------------------------------ advice


@dataclass(frozen=True)
class TrackerAdvice:
    """What the tracked noise scale says about the batch now (numbers only).

    Doubling B → 2B pays when B_n > 2·c·B²/t0 for a step time t(B) = t0 + c·B
    (DESIGN §10; S(B) = S_min(1 + B_n/B)). Without a step-time curve the basis is
    the noise scale alone: double while 2B stays at or below B_n, the batch where
    the steps saved and the examples spent balance (McCandlish sec. 2.2). Either
    way ``double`` is judged at the low end of B_simple's 95% interval, so it is
    only True when the whole interval agrees.

    Attributes:
        step: optimizer steps taken so far.
        batch_size: the global batch of the last step (examples per optimizer step).
        b_simple / ci95: the latest smoothed noise scale and its interval.
        recommended_batch: the advisor's batch for this phase (:func:`bsfind.advisor.advise`
            with the current batch as baseline; ≈ B_simple without a step-time curve),
            None while B_simple is unresolved.
        double: doubling now pays, at the interval's low end.
        basis: "time" (a step-time curve) or "noise" (B_simple alone).
        threshold: the B_n above which doubling pays (2·c·B²/t0, or 2B).
        steps_ratio: S(2B)/S(B) at B_simple (None when unresolved).
        time_ratio: S(2B)·t(2B) / (S(B)·t(B)) at B_simple (None without a curve).
        timing / timing_source: the curve used and where it came from: "given"
            by the caller, "measured" by the tracker from its step times at two or
            more batch sizes, or "none".
        learning_rate / lr_rule: the learning rate at 2B by the rule (when the
            current one was given) and the rule's name.
    """

    step: int
    batch_size: int
    b_simple: float | None
    ci95: Interval
    recommended_batch: int | None
    double: bool
    basis: AdviceBasis
    threshold: float
    steps_ratio: float | None
    time_ratio: float | None
    timing: TimingCurve | None
    timing_source: TimingSource
    learning_rate: float | None = None
    lr_rule: str | None = None


def _curve(timing: TimingCurve | tuple[float, float]) -> TimingCurve:
    """A given step-time curve, checked: (t0, c) two finite numbers >= 0, not both 0 (a
    trial's (-1, 0.1) was taken and never doubled; (0, 0) was dropped silently)."""
    if isinstance(timing, TimingCurve):
        return timing
    try:
        t0, c = (float(v) for v in timing)
    except (TypeError, ValueError):
        raise ValueError(f"timing: expected (t0, c), seconds per step t0 + c·B, got "
                         f"{timing!r}") from None
    if not (math.isfinite(t0) and math.isfinite(c) and t0 >= 0 and c >= 0 and t0 + c > 0):
        raise ValueError(f"timing: t0 and c must be finite, >= 0 and not both 0, got "
                         f"{timing!r}")
    return TimingCurve(points=(), t0=t0, per_example=c, r2=math.nan, source="given")


def _line_of(curve: TimingCurve | None) -> TimingCurve | None:
    """The curve as its line alone, past the batches timed too: the doubling question is
    about 2B, past them by construction (a review: the advisor, reading no gain past the
    run's own batch, recommended 64 while ``double`` said to double)."""
    if curve is None or not curve.points:
        return curve
    return dataclasses.replace(curve, points=(), fitted_up_to=None)


def _usable(curve: TimingCurve | None) -> bool:
    return curve is not None and (curve.t0 > 0 or curve.per_example > 0)


def doubling_advice(
    step: int,
    batch: int,
    b_simple: float | None,
    ci95: Interval,
    curve: TimingCurve | None,
    timing_source: TimingSource,
    *,
    lr: float | None = None,
    optimizer: Any = None,
    lr_rule: str = "auto",
    dataset_size: int | None = None,
) -> TrackerAdvice:
    """:class:`TrackerAdvice` from a noise scale and a step-time curve (pure math)."""
    b_n = math.inf if b_simple is None else b_simple
    low = max(ci95.low, 0.0)
    family = optimizer_family(optimizer) if optimizer is not None else "adam"
    timed = _usable(curve)
    s_ratio = steps_ratio(2 * batch, batch, b_n) if b_simple is not None else None
    if timed:
        assert curve is not None
        t0, c = max(curve.t0, 0.0), max(curve.per_example, 0.0)
        threshold = math.inf if t0 == 0 else 2.0 * c * batch * batch / t0
        basis: AdviceBasis = "time"
        t_ratio = (None if s_ratio is None
                   else s_ratio * (t0 + 2 * c * batch) / (t0 + c * batch))
    else:
        threshold, basis, t_ratio = 2.0 * batch, "noise", None
    recommended = None
    if b_simple is not None:
        inputs = AdvisorInputs(
            b_n=b_n, b_n_ci=ci95, baseline_batch=batch, baseline_lr=lr or 1.0,
            optimizer_family=family, dataset_size=dataset_size or UNKNOWN_DATASET,
            lr_rule=lr_rule, timing=_line_of(curve) if timed else None)
        recommended = advise(inputs).recommendation.batch_size
    new_lr, rule = (scaled_lr(lr, batch, 2 * batch, b_n, family, lr_rule) if lr is not None
                    else (None, None))
    return TrackerAdvice(
        step=step, batch_size=batch, b_simple=b_simple, ci95=ci95,
        recommended_batch=recommended,
        double=low > threshold if basis == "time" else low >= threshold,
        basis=basis, threshold=threshold, steps_ratio=s_ratio, time_ratio=t_ratio,
        timing=curve if timed else None, timing_source=timing_source if timed else "none",
        learning_rate=new_lr, lr_rule=rule,
    )


def scale_learning_rate(
    optimizers: torch.optim.Optimizer | Iterable[torch.optim.Optimizer],
    factor: float,
    schedulers: Iterable[Any] = (),
) -> None:
    """Multiply every parameter group's learning rate by ``factor``, and the base rates
    the given LR schedulers recompute it from (``base_lrs``, and the groups'
    ``initial_lr``), so that a schedule continues from the scaled rate."""
    opts = [optimizers] if isinstance(optimizers, torch.optim.Optimizer) else list(optimizers)
    for opt in opts:
        for group in opt.param_groups:
            lr = group["lr"]
            group["lr"] = lr.mul_(factor) if isinstance(lr, torch.Tensor) else lr * factor
            if "initial_lr" in group:
                group["initial_lr"] = group["initial_lr"] * factor
    for sched in schedulers:
        base = getattr(sched, "base_lrs", None)
        if isinstance(base, list):
            sched.base_lrs = [b * factor for b in base]


@dataclass(frozen=True)
class Doubling:
    """One doubling of gradient accumulation that an integration made.

    Attributes:
        step / epoch: where (optimizer steps, epoch) it took effect.
        accumulation: micro-batches per optimizer step from then on.
        batch_size: the global batch from then on.
        lr_factor: what every learning rate was multiplied by.
        basis / b_simple / ci95: the advice it followed.
    """

    step: int
    epoch: int
    accumulation: int
    batch_size: int
    lr_factor: float
    basis: AdviceBasis
    b_simple: float | None
    ci95: Interval


def whole_number(value: Any, least: int) -> int | None:
    """``value`` as an int when it is an integer of at least ``least`` (a numpy integer or
    a 0-d integer tensor too, not a bool), else None: the arguments' checks."""
    try:
        n = None if isinstance(value, bool) else operator.index(value)
    except TypeError:
        return None
    return n if n is not None and n >= least else None


def check_tracking_options(every: int | None, window: int) -> None:
    """Validate :class:`Tracker`'s ``every`` and ``window`` (the message names them):
    integers (a numpy one too), every >= 1 and window >= 2."""
    if every is not None and whole_number(every, 1) is None:
        raise ValueError(f"every must be an integer >= 1, got {every!r}")
    if whole_number(window, 2) is None:
        raise ValueError(f"window must be an integer >= 2 measurements, got {window!r}")


def check_batch_and_log(batch_size: Any, log: str | Path | None) -> None:
    """Validate :class:`Tracker`'s ``batch_size`` (an integer >= 1, or None) and ``log``
    (not a folder: found when the tracker is made, not at its first record)."""
    check_step_arguments(batch_size, None)
    if log is not None and Path(log).is_dir():
        raise ValueError(f"log: {log} is a folder; give a file path, e.g. "
                         f"{Path(log) / 'noise.jsonl'}")


def check_model_batch_log_scaler(model: Any, batch_size: Any, log: str | Path | None,
                                 scaler: Any) -> None:
    """Validate :class:`Tracker`'s ``model`` (a module: an optimizer given by mistake
    failed with an AttributeError), ``batch_size``, ``log`` and ``scaler`` (None or a
    GradScaler-like object: a string was accepted)."""
    if not isinstance(model, nn.Module):
        got = ("an optimizer" if isinstance(model, torch.optim.Optimizer)
               else f"a {type(model).__name__}")
        raise ValueError(f"track(model): expected the torch.nn.Module being trained, got {got}")
    check_batch_and_log(batch_size, log)
    if scaler is not None and not (callable(getattr(scaler, "get_scale", None))
                                   or isinstance(getattr(scaler, "_scale", None), torch.Tensor)):
        raise ValueError(f"scaler: expected a torch.amp.GradScaler (or None), got "
                         f"{type(scaler).__name__} {scaler!r}"[:200])


def open_trackers(model: nn.Module, log: str | Path | None) -> list[tuple[Tracker, str]]:
    """The open trackers on ``model`` (or the module a DDP wraps, or a module of it, or a
    model it is part of) or writing ``log``, each with what it shares. Two trackers'
    hooks on one model see each other's (a trial: two Lightning callbacks, one read |G|²
    and tr(Σ) 13-20% off, with no warning), and two writers of one file interleave their
    lines (the trial's log: 2 lines of broken JSON)."""
    ddp = _ddp_of(model)
    inner: nn.Module = ddp.module if ddp is not None else model
    parts = {id(m) for m in inner.modules()}
    path = None if log is None else Path(log).resolve()
    found = []
    for other in list(_OPEN):
        theirs = other._log_path
        if other.module is model or other.module is inner:
            found.append((other, "this model"))
        elif id(other.module) in parts or any(m is inner for m in other.module.modules()):
            found.append((other, "a model this one overlaps"))
        elif path is not None and theirs is not None and theirs.resolve() == path:
            found.append((other, f"the log {str(log)!r}"))
    return found


def close_earlier(model: nn.Module, log: str | Path | None,
                  sibling: Callable[[object], bool] | None = None, who: str = "") -> None:
    """Close, with a warning, the open trackers that share ``model`` or ``log`` with a
    new one: a notebook cell run again, a tracker dropped without close() (the model's
    hooks keep it alive), a Trainer that raised. A callback passes ``sibling``, true of
    another callback in its own Trainer: a tracker one of them owns is in use, refused."""
    for other, shared in open_trackers(model, log):
        if sibling is not None and other.owner is not None and sibling(other.owner):
            raise ValueError(f"{shared} already has an open bsfind tracker, another {who}'s "
                             "in this Trainer: use one (two trackers on one model see each "
                             "other's hooks and read wrong numbers)")
        warnings.warn(f"bsfind tracker: {shared} had an open tracker; it is closed now (two "
                      "trackers on one model see each other's hooks and read wrong numbers): "
                      "close() a tracker when done with it", RuntimeWarning,
                      stacklevel=_caller_level())
        other.close()
        other.closed_by = f"a newer tracker on {shared}"


def _caller_level() -> int:
    """The ``stacklevel`` of the first frame outside this module (track() and Tracker()
    are called from one level apart)."""
    frame: Any = sys._getframe(1)
    level = 1
    while frame is not None and frame.f_code.co_filename == __file__:
        frame, level = frame.f_back, level + 1
    return level


def check_step_arguments(batch_size: Any, divisor: Any) -> None:
    """Validate ``update()``'s and ``micro_step()``'s ``batch_size`` and ``divisor``:
    integers >= 1 (0 stood for "unknown" and -3 counted examples down; a divisor of 0
    wrote a record of zeros)."""
    if batch_size is not None and whole_number(batch_size, 1) is None:
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    if divisor is not None and whole_number(divisor, 1) is None:
        raise ValueError(f"divisor must be an integer >= 1, got {divisor!r}")


def check_advice_arguments(lr: Any, optimizer: Any) -> None:
    """Validate ``advice()``'s ``lr`` (a finite rate >= 0: -1 gave a rate of -1.11; 0 is
    a warm-up's first step or a decay's last, and scales to 0); warn of an optimizer
    named as no rule knows it ('sdg' got the Adam family's rule)."""
    if lr is not None:
        try:
            rate = float(lr)
        except (TypeError, ValueError):
            rate = math.nan
        if not (math.isfinite(rate) and rate >= 0):
            raise ValueError(f"lr must be a finite learning rate >= 0, got {lr!r}")
    if isinstance(optimizer, str) and not optimizer_known(optimizer):
        warnings.warn(
            f"bsfind tracker: optimizer {optimizer!r} is not a name bsfind knows (SGD, "
            "Adam, AdamW, LAMB, LARS, RMSprop, Adagrad, Adafactor, ...): the Adam family's "
            "square-root rule is used; pass the optimizer itself, or lr_rule",
            RuntimeWarning, stacklevel=3)


def compiled_hint() -> str:
    """What to do when the tracker's hooks did not run and torch.compile is in use: code
    compiled before the tracker attached them does not run them (a trial: no record, and
    a message naming bsfind's internals)."""
    if "torch._dynamo" not in sys.modules:
        return ""
    return ("; under torch.compile, create the tracker before the model's first compiled "
            "forward (code compiled before does not run hooks added later; or set "
            "torch._dynamo.config.skip_nnmodule_hook_guards = False)")


def per_example_failure(exc: Exception) -> str:
    """Why the per-example norms failed, in the tracker's words."""
    if "no backward reached" not in str(exc):  # (without the probe's hint: probe.method)
        return getattr(exc, "message", None) or str(exc)
    return ("the per-example hooks saw no backward in the step (update() before "
            "loss.backward()?)" + compiled_hint())


def unsaid_accumulation(passes: int) -> str:
    """The warning for several backward passes in one step without ``micro_step()``."""
    return (f"bsfind tracker: {passes} backward passes ran in one optimizer step without "
            "micro_step() between them, so the step is not measured: under gradient "
            "accumulation, call tracker.micro_step() after each micro-batch's backward but "
            "the last (the per-example norms see only the last pass; .grad holds them all); "
            "after a pass whose gradient the step drops (SAM's first), call discard()")


def check_resume(step: Any, examples: Any) -> tuple[int, int]:
    """Validate :class:`Tracker`'s ``step`` and ``examples`` (a resumed run's counts);
    numpy integers and 0-d integer tensors (a step read from an optimizer's state) count."""
    out = []
    for name, value in (("step", step), ("examples", examples)):
        n = whole_number(value, 0)
        if n is None:
            raise ValueError(f"{name} must be an integer >= 0, got {value!r}")
        out.append(n)
    step, examples = out
    if (step == 0) != (examples == 0):
        raise ValueError(f"step and examples go together (a resumed run's optimizer steps "
                         f"and training examples so far), got step={step}, "
                         f"examples={examples}")
    return step, examples


def kept_records(path: Path, step: int, examples: int) -> list[TrackRecord]:
    """The records of a resumed run's log measured before ``step`` (none when there is no
    log yet); a last line cut short by the killed run is left out. Records that count more
    than ``examples`` before ``step`` are another run's (a review: a log at batch 64
    merged into a resume at batch 32, which bsfind schedule then read as two runs)."""
    if not path.exists():
        return []
    kept = [r for r in read_log_records(path)[0] if r.step < step]
    over = [r for r in kept if r.examples is not None and r.examples > examples]
    if over:
        raise ValueError(
            f"track(step={step}, examples={examples}): {path} records {over[0].examples:,} "
            f"examples at step {over[0].step}, before the step resumed from: another run's "
            "log, or examples counted otherwise (all ranks' examples, as the tracker counts "
            "them); pass another log, or the examples of the checkpoint")
    return kept


def resume_log(path: Path, step: int, examples: int) -> None:
    """Leave in ``path`` only its records before ``step`` (:func:`kept_records`), written
    in one step, so that a kill while rewriting it loses nothing."""
    from bsfind.cache import atomic_write_text

    kept = kept_records(path, step, examples)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, "".join(json.dumps(r.to_json()) + "\n" for r in kept))


def open_log(path: Path | None, append: bool) -> IO[str] | None:
    """The tracker's log, opened as it starts: emptied, or appended to by a resumed run.
    Left untouched until the first record, a log kept a previous run's records when
    nothing was measured, and ``bsfind schedule`` planned from them (a trial)."""
    if path is None:
        return None
    path.parent.mkdir(parents=True, exist_ok=True)
    return path.open("a" if append else "w", encoding="utf-8")


def resume_log_on_every_rank(path: Path | None, step: int, examples: int) -> None:
    """:func:`resume_log`, run by rank 0 (which writes the log; ``path`` None: it has
    none), its refusal raised on every rank: raised on rank 0 alone, the other ranks went
    on to their first all-reduce and waited there for a rank that had stopped (NCCL:
    until its timeout). Every rank of a resumed run calls it, whether given a log or not."""
    if _world() == 1:
        if path is not None:
            resume_log(path, step, examples)
        return
    failure: tuple[str, str, str | None] | None = None
    if path is not None:
        try:
            resume_log(path, step, examples)
        except UsageError as exc:
            failure = ("usage", exc.message, exc.hint)
        except (ValueError, OSError) as exc:
            failure = (type(exc).__name__, str(exc), None)
    box = [failure]
    torch.distributed.broadcast_object_list(box, src=0)
    if box[0] is None:
        return
    kind, message, hint = box[0]
    if kind == "usage":
        raise UsageError(message, hint=hint)
    raise (ValueError if kind == "ValueError" else OSError)(message)


def check_dataset_size(n: Any) -> int | None:
    """Validate :class:`Tracker`'s ``dataset_size``: None, or an integer of at least 2
    (a numpy integer too)."""
    if n is None:
        return None
    value = whole_number(n, 2)
    if value is None:
        raise ValueError(f"dataset_size must be an integer >= 2, got {n!r}")
    return value


def without_replacement(g2: float, trace: float, n: int) -> tuple[float, float]:
    """The two-batch estimates (|G|², tr(Σ)) of batches drawn without replacement from
    ``n`` examples, made unbiased. Such a batch of B has E|G_B|² = |G|² + tr(Σ)(n-B)/
    (B(n-1)), Σ the examples' covariance over n: the estimators, which assume
    tr(Σ)/B, then read |G|² - tr(Σ)/(n-1) and tr(Σ)·n/(n-1) whatever the two batches
    are, so |G|² = g2 + trace/n and tr(Σ) = trace·(n-1)/n."""
    return g2 + trace / n, trace * (n - 1) / n


def epoch_sampled_size(loader: Any) -> int | None:
    """The examples a DataLoader draws its batches from without replacement, in a new
    order each epoch: the ``dataset_size`` of :class:`Tracker`. A ``RandomSampler``
    without replacement (an epoch's shuffle, also accelerate's seedable one) or a plain
    ``DistributedSampler`` (the shards of one shuffle), and N is the size of what that
    sampler draws from. None for anything else: sampling with replacement, an iterable
    dataset, a loader without batching (its items are batches), a sequential pass (the
    same batches every epoch: the window's interval would count repeats as new
    measurements), Lightning's wrapper of another sampler under DDP, a sampler of one's
    own (a review found each of the last two read as an epoch's shuffle)."""
    from torch.utils.data import DistributedSampler, RandomSampler

    batches = getattr(loader, "batch_sampler", None)
    if batches is None:
        return None
    # the sampler the batches come from: the batch sampler's (a custom batch sampler
    # leaves the loader's own .sampler unused), through one wrapper (accelerate's
    # BatchSamplerShard keeps the batch sampler it shards as .batch_sampler)
    s = getattr(getattr(batches, "batch_sampler", batches), "sampler", None)
    source: Any
    if isinstance(s, RandomSampler) and not s.replacement:
        source = s.data_source
    elif type(s) is DistributedSampler and s.shuffle:
        source = s.dataset
    else:
        return None
    try:
        n = len(source)
    except TypeError:
        return None
    return n if n > 1 else None


def callback_options(*, every: int | None, window: int, log_path: str | Path | None,
                     timing: Any, ddp_comm_hook: tuple[Any, Any] | None,
                     max_accumulation: int | None, lr_rule: str) -> dict[str, Any]:
    """The integrations' callbacks: their arguments checked when the callback is made
    (not at the start of training), and the :class:`Tracker` keywords among them."""
    check_tracking_options(every, window)
    check_doubling_options(max_accumulation, lr_rule)
    return dict(every=every, window=window, log=log_path, timing=timing,
                ddp_comm_hook=ddp_comm_hook)


def doubling_to_json(d: Doubling) -> dict[str, Any]:
    """A :class:`Doubling` as JSON (a callback's checkpoint state)."""
    return dict(step=d.step, epoch=d.epoch, accumulation=d.accumulation,
                batch_size=d.batch_size, lr_factor=d.lr_factor, basis=d.basis,
                b_simple=_finite_or_none(d.b_simple), ci95=d.ci95.as_list())


def doubling_from_json(obj: dict[str, Any]) -> Doubling:
    low, high = obj["ci95"]
    return Doubling(step=int(obj["step"]), epoch=int(obj["epoch"]),
                    accumulation=int(obj["accumulation"]), batch_size=int(obj["batch_size"]),
                    lr_factor=float(obj["lr_factor"]), basis=obj["basis"],
                    b_simple=None if obj["b_simple"] is None else float(obj["b_simple"]),
                    ci95=Interval(0.0 if low is None else float(low),
                                  math.inf if high is None else float(high)))


def callback_state(tracker: Tracker | None, doublings: Sequence[Doubling]) -> dict[str, Any]:
    """What the integrations' callbacks keep in a training checkpoint, as JSON: the
    tracker's counts (a resumed run goes on from them, :class:`Tracker`'s ``step`` and
    ``examples``) and the doublings made with ``double=True`` (the checkpoint's learning
    rates are already scaled by them, so the resumed run needs their accumulation).
    Empty before the tracker exists (a checkpoint saved before training started)."""
    if tracker is None:
        return {}
    return dict(step=tracker.step, examples=tracker.examples,
                doublings=[doubling_to_json(d) for d in doublings])


@dataclass(frozen=True)
class Resumed:
    """Where a callback's tracker starts: the counts of :func:`callback_state` read back
    (0 and 0 for a new run), and the doublings made before the checkpoint."""

    step: int = 0
    examples: int = 0
    doublings: tuple[Doubling, ...] = ()

    @property
    def accumulation(self) -> int | None:
        """The accumulation the doublings left (None: none was made)."""
        return self.doublings[-1].accumulation if self.doublings else None


def resumed(saved: dict[str, Any] | None, global_step: int, callback: str) -> Resumed:
    """Read back :func:`callback_state` for a run at the framework's ``global_step``.

    A run resumed from a checkpoint without that state (saved without the callback, or
    by a bsfind before it kept one) counts from 0 again, with a warning: its log is
    overwritten and reads as a new run."""
    if not saved:
        if global_step > 0:
            warnings.warn(
                f"{callback}: training resumed at step {global_step} from a checkpoint "
                "without bsfind's counts (saved without this callback, or by an older "
                "bsfind): the tracker counts steps and examples from 0 and its log starts "
                "again", stacklevel=3)
        return Resumed()
    try:
        step, examples = check_resume(saved.get("step"), saved.get("examples"))
        doublings = tuple(doubling_from_json(d) for d in saved.get("doublings") or ())
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"{callback}: the checkpoint's bsfind state is unreadable ({exc}): "
                         "resume from a checkpoint this callback saved") from None
    if global_step == 0 and step > 0:
        warnings.warn(
            f"{callback}: the trainer starts at step 0, but the callback holds a "
            f"checkpoint's counts at step {step}: they are not used, and the tracker counts "
            "from 0", stacklevel=3)
        return Resumed()
    if step != global_step:
        warnings.warn(
            f"{callback}: the checkpoint's bsfind counts are at step {step}, the trainer "
            f"resumes at step {global_step}: the tracker goes on from step {step}",
            stacklevel=3)
    return Resumed(step, examples, doublings)


def check_doubling_options(max_accumulation: int | None, lr_rule: str) -> None:
    """Validate the integrations' doubling arguments (the message names the argument)."""
    from bsfind.advisor import LR_RULES

    if max_accumulation is not None and max_accumulation < 1:
        raise ValueError(f"max_accumulation must be >= 1, got {max_accumulation}")
    if lr_rule not in LR_RULES:
        raise ValueError(f"lr_rule must be one of {', '.join(LR_RULES)}, got {lr_rule!r}")


def doubling_now(
    tracker: Tracker,
    accumulation: int,
    *,
    max_accumulation: int | None,
    optimizer: Any,
    timing: TimingCurve | tuple[float, float] | None,
    lr_rule: str,
) -> tuple[TrackerAdvice, float] | None:
    """(advice, learning-rate factor) when doubling the accumulation from ``accumulation``
    pays now and stays within ``max_accumulation``; else None."""
    if max_accumulation is not None and 2 * accumulation > max_accumulation:
        return None
    adv = tracker.advice(timing=timing, lr=1.0, optimizer=optimizer, lr_rule=lr_rule)
    if adv is None or not adv.double or adv.learning_rate is None:
        return None
    return adv, adv.learning_rate


# ----------------------------------------------------------------------------- tracker


def _ddp_of(model: nn.Module) -> Any:
    from torch.nn.parallel import DistributedDataParallel

    return model if isinstance(model, DistributedDataParallel) else None


def _world() -> int:
    dist = torch.distributed
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _rank() -> int:
    dist = torch.distributed
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


class Tracker:
    """Tracks the gradient noise scale of a model while it trains (module docstring).

    Args:
        model: the model the loop trains, or its DistributedDataParallel wrapper
            (required for the ddp pairing under several processes).
        every: measure one step in ``every``. Default: 1 for the accumulation and ddp
            pairings; with per-example norms 32, raised (up to 256) when the tracker's
            own timing shows that measured steps would cost more than 2% of the
            training time.
        window: measurements the smoothed values and the interval are taken over.
        batch_size: examples per micro-batch on this rank (under DDP the counts take
            every rank's to be this one's, as DistributedSampler makes them); None reads
            it from the model's input on measured steps (dim 0 of the first tensor its forward
            receives, through a forward pre-hook that only records that size), and
            counts the size last seen on the other steps: pass ``batch_size`` to
            ``update()`` for exact example counts when batch sizes vary.
        scaler: a ``torch.amp.GradScaler`` whose scale the gradients carry when
            ``update()`` runs (call it before ``scaler.unscale_``).
        log: path of a JSON-lines file for the records (rank 0 writes; overwritten,
            unless the run is resumed: see ``step``).
        timing: a step-time curve for :meth:`advice`: a TimingCurve or (t0, c) with
            t(B) = t0 + c·B seconds per optimizer step at global batch B.
        ddp_comm_hook: (state, hook) the DDP model should reduce with (a DDP comm
            hook such as PowerSGD); the tracker wraps it. Default: the plain mean.
        dataset_size: the examples the loop draws its batches from without replacement,
            as an epoch's shuffle does (``len(train_dataset)``; :func:`epoch_sampled_size`
            reads it from a DataLoader): a batch drawn so has less noise than one drawn
            with replacement, by (N-B)/(N-1), which biases the two-batch estimate of |G|²
            low by tr(Σ)/(N-1) and B_simple high, by about 1/(1 - B_simple/N) (a trial:
            78-104 for an exact 63.6 on 200 examples). Given, each measured step is
            corrected for it. None: no correction, right when the loop samples with
            replacement and close enough when B_simple is far below N.
        step / examples: the optimizer steps and training examples (all ranks) already
            taken, for a run resumed from a checkpoint: the counts go on from there, and
            ``log`` keeps its records of the steps before ``step`` and is appended to
            (the records of steps past the checkpoint, which the resumed run trains
            again, are dropped), so that the log reads as one run. Under DDP every
            rank passes the same ``step`` (rank 0 checks the log and tells the others).

    Raises:
        ValueError: bad arguments, no trainable parameters, or several processes
            without a DistributedDataParallel model.
        UsageError: resuming, the log exists but is not a tracker log.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        every: int | None = None,
        window: int = DEFAULT_WINDOW,
        batch_size: int | None = None,
        scaler: Any = None,
        log: str | Path | None = None,
        timing: TimingCurve | tuple[float, float] | None = None,
        ddp_comm_hook: tuple[Any, Any] | None = None,
        step: int = 0,
        examples: int = 0,
        dataset_size: int | None = None,
    ) -> None:
        check_tracking_options(every, window)
        step, examples = check_resume(step, examples)
        self.dataset_size = check_dataset_size(dataset_size)
        check_model_batch_log_scaler(model, batch_size, log, scaler)
        ddp = _ddp_of(model)
        self.world = ddp.process_group.size() if ddp is not None and _world() > 1 else 1
        if ddp is None and _world() > 1:
            raise ValueError(
                "several processes but the model is not a DistributedDataParallel: pass the "
                "DDP-wrapped model, so that each rank's gradient is seen before its all-reduce")
        self.module: nn.Module = ddp.module if ddp is not None else model
        self.params = [p for p in self.module.parameters() if p.requires_grad]
        if not self.params:
            raise ValueError("the model has no trainable parameters")
        self.every_arg = every
        self.scaler = scaler
        self.timing = _curve(timing) if timing is not None else None
        self.batch_size = batch_size
        self.step, self.examples = step, examples
        self.skipped = 0  # measured steps dropped (non-finite: an AMP overflow)
        self._skipped_in_a_row = 0
        self.method: Method | None = None  # of the last measurement
        self.reason: str | None = None  # why per-example norms are unavailable
        self._window = in_training.Window(window)
        self._times = in_training.StepTimes()
        self._cost = in_training.StepCost()
        self._auto_every = DEFAULT_EVERY
        self._measured_at: int | None = None  # the last step measured
        self._span_start: float | None = None  # of this step's whole span (StepCost)
        self._records: list[TrackRecord] = []
        self._pending: deque[in_training.Pending] = deque()
        self._log_path = Path(log) if log is not None and _rank() == 0 else None
        # resumed: the log keeps its records before the checkpoint, rewritten now in one
        # step (a kill while rewriting must not lose them), and is appended to
        if step:
            resume_log_on_every_rank(self._log_path, step, examples)
        self._norms: Any = None  # PerExampleGradNorms, built on first use
        self._hooked = False
        self._warned: set[str] = set()
        self._accumulating = False
        self._prev: list[torch.Tensor | None] | None = None  # .grad at the last boundary
        self._micro: list[int] = []
        self._divisor: int | None = None  # update()'s: each loss's divisor this step
        self._micro_sq: list[torch.Tensor] = []
        self._losses: list[torch.Tensor | float] = []  # since the last measurement
        self._loss_count = 0
        self._seen_batch: int | None = None
        # the sizes the last two watched forwards saw: plain steps count the larger, so that
        # a DataLoader's partial last batch, measured, does not count on for them; a run
        # that raised its batch is followed from its next measurement, one that lowered
        # it from the second
        self._sizes: deque[int] = deque(maxlen=2)
        self._recent: deque[int] = deque(maxlen=2)  # the last two steps' global batches
        self._paused = self._closed = False
        self._start = time.perf_counter()
        close_earlier(model, log)  # (after every check: a refused tracker closes nothing)
        self._log = open_log(self._log_path, append=bool(step))
        hook_state, hook = ddp_comm_hook or (None, None)  # (state, hook), as documented
        self._ddp = (in_training.DDPNorms.on(ddp, hook=hook, state=hook_state)
                     if ddp is not None and self.world > 1 else None)
        _OPEN.add(self)
        self._size_hook: Any = None
        self._begin_step()

    # -- the loop's calls ---------------------------------------------------------------
    def micro_step(self, batch_size: int | None = None) -> None:
        """Call after the backward of each micro-batch but the last (gradient accumulation).

        The last micro-batch's backward is followed by :meth:`update` instead. A call
        after the last backward too leaves the estimate right (a micro-batch whose
        gradient difference is exactly zero is dropped) but counts that micro-batch's
        examples twice.
        """
        self._check_open()
        if batch_size is not None:
            check_step_arguments(batch_size, None)
        if self._paused:
            return
        self._micro.append(self._batch(batch_size))
        if self._ddp is not None:
            return
        if self._hooked:  # the loop accumulates: micro-batch gradients, no hooks
            self._detach()
        self._accumulating = True
        if len(self._micro) == 1 and not self._measuring:
            # .grad holds exactly the first micro-batch's gradient: measuring can start now
            self._measuring = self._due()
        if self._measuring:
            self._check_scaler()
            self._micro_sq.append(self._boundary())

    def discard(self) -> None:
        """Call when the loop abandons the gradients of the step in progress: a guard that
        calls ``zero_grad()`` without ``optimizer.step()`` (a loss or gradient that is
        not finite) and starts the step again. The micro-batches since the last
        :meth:`update` are neither measured nor counted. (Left in, they entered the next
        step as micro-batches of its own: B_simple read 30% high.)"""
        self._check_open()
        if self._paused:
            return
        self._micro, self._micro_sq, self._prev = [], [], None
        if self._hooked:  # the per-example norms of the abandoned backward
            self._norms.forget()
        if self._ddp is not None:
            self._ddp.take()  # the bucket norms of the abandoned backward

    def update(self, loss: torch.Tensor | float | None = None,
               batch_size: int | None = None, divisor: int | None = None
               ) -> TrackRecord | None:
        """Call once per optimizer step, after its last backward, before clipping and
        ``optimizer.step()``. Returns the newest record that became ready, if any.

        Args:
            loss: the step's training loss (a tensor stays on its device), for the records.
            batch_size: examples of the last micro-batch on this rank (default: as given
                to the constructor, or read from the model's input).
            divisor: what each micro-batch's loss was divided by, when not by the number
                of micro-batches of this step (Lightning divides by
                ``accumulate_grad_batches`` on an epoch's short last step too): the
                gradients are rescaled to that step's mean.
        """
        if batch_size is not None or divisor is not None:
            check_step_arguments(batch_size, divisor)
        self._divisor = divisor
        if self._paused:  # another measurement's backward on this model (paused_on)
            return None
        start = time.perf_counter()
        if self._quick > 0 and not self._micro:  # a plain step (see _begin_step): count it
            b = batch_size or self.batch_size or self._usual_batch()
            if b is not None:
                return self._count(start, loss, int(b))
        self._check_open()
        if self._paused:
            return
        self._micro.append(self._batch(batch_size))
        if loss is not None:
            self.record_loss(loss)
        hooked = self._hooked
        # A step scheduled while the loop accumulated (every 1) may come without
        # micro-steps or hooks: it measures nothing and leaves the next step due.
        cheap = len(self._micro) > 1 or self._ddp is not None
        if self.measuring and self._ddp is None and self._trainable_changed():
            pass  # set up for the parameters trainable before: the next step is measured
        elif self.measuring and (hooked or cheap or not self._per_example_ok()):
            self._check_scaler()
            self._measure()  # per-example: the batch size comes from the norms
            # the cadence: the per-example one (the cheap pairings' default is every step,
            # and their measurements do not push it back), or a given every= for any
            # pairing (a DDP loop measured every step at every=4)
            if not cheap or self.every_arg is not None:
                self._measured_at = self.step
        batch = self.world * sum(self._micro)
        self.examples += batch
        self._times.tick(batch, start, keep=not hooked)  # a hooked step is slower: not timed
        if self._ddp is None:
            self._accumulating = len(self._micro) > 1
        new = self._poll(force=False)
        self.step += 1
        self._last_batch = batch
        self._recent.append(batch)
        before = time.perf_counter()
        self._span(batch, before, measured=hooked)
        self._begin_step()
        end = time.perf_counter()
        self._times.last = end  # the next period starts after this call's work
        self._span_start = before if self._hooked else end  # a measured span has the attach
        return new[-1] if new else None

    def _count(self, start: float, loss: torch.Tensor | float | None, b: int
               ) -> TrackRecord | None:
        """The whole ``update()`` of a plain step: nothing measured now or next, no
        micro-steps, no DDP hook to switch (:meth:`_begin_step` sets ``_quick``)."""
        self._quick -= 1
        self._seen_batch = self._last_batch = b
        self._recent.append(b)
        if loss is not None:
            self.record_loss(loss)
        self.examples += b
        self._times.tick(b, start, keep=True)
        new = self._poll(force=False) if self._pending else None
        self.step += 1
        end = time.perf_counter()
        self._span(b, end, measured=False)
        self._times.last = self._span_start = end
        return new[-1] if new else None

    def _span(self, batch: int, now: float, measured: bool) -> None:
        """Add this step's whole span to the step costs; after a measured one, adapt
        the default ``every`` (OVERHEAD_SHARE)."""
        if self._span_start is None:
            return
        self._cost.add(batch, now - self._span_start, measured)
        if measured and self.every_arg is None:
            self._auto_every = self._cost.every(
                batch, OVERHEAD_SHARE, DEFAULT_EVERY, MAX_EVERY) or self._auto_every

    def record_loss(self, loss: torch.Tensor | float) -> None:
        """Add a training loss to the mean the next record reports (no host sync)."""
        self._losses.append(loss.detach() if isinstance(loss, torch.Tensor) else float(loss))
        self._loss_count += 1
        if len(self._losses) > LOSSES_KEPT:  # long gaps between measurements: fold them
            self._losses = [self._loss_sum(self._losses[0])]

    def _loss_sum(self, like: torch.Tensor | float) -> torch.Tensor:
        """Σ of the kept losses, a float64 scalar on the device of ``like``."""
        dev = like.device if isinstance(like, torch.Tensor) else torch.device("cpu")
        tensors = [x for x in self._losses if isinstance(x, torch.Tensor)]
        floats = sum(float(x) for x in self._losses if not isinstance(x, torch.Tensor))
        if not tensors:
            return torch.tensor(floats, dtype=torch.float64, device=dev)
        return torch.stack(tensors).to(dev, torch.float64).sum() + floats

    # -- reading ------------------------------------------------------------------------
    @property
    def measuring(self) -> bool:
        """Whether the step now running is measured (decided when the previous one ended)."""
        return self._measuring

    @property
    def every(self) -> int:
        """One step in this many is measured (for the pairing now in use)."""
        if self.every_arg is not None:
            return self.every_arg
        cheap = self._ddp is not None or self._accumulating
        return DEFAULT_EVERY_CHEAP if cheap else self._auto_every

    def _due(self) -> bool:
        """Whether the step now running is to be measured."""
        return self._measured_at is None or self.step - self._measured_at >= self.every

    @property
    def latest(self) -> TrackRecord | None:
        """The newest record ready so far (no waiting)."""
        return self._records[-1] if self._records else None

    @property
    def records(self) -> list[TrackRecord]:
        """Every record so far, after waiting for the values still on their way."""
        self._poll(force=True)
        return list(self._records)

    def step_times(self) -> TimingCurve | None:
        """The step-time curve fitted to this run's step periods (two batch sizes needed)."""
        return self._times.curve()

    def advice(
        self,
        *,
        timing: TimingCurve | tuple[float, float] | None = None,
        lr: float | None = None,
        optimizer: Any = None,
        lr_rule: str = "auto",
        dataset_size: int | None = None,
    ) -> TrackerAdvice | None:
        """The recommended batch for the current phase and whether doubling now pays.

        Args:
            timing: t(B) = t0 + c·B per optimizer step (a TimingCurve or (t0, c));
                default: the constructor's, else the one measured from this run's step
                times (:meth:`step_times`), else none (the noise-scale basis).
            lr: the learning rate now, for the rate at 2B (:func:`bsfind.advisor.scaled_lr`).
            optimizer: an optimizer (instance, class or name) for the rule's family.
            lr_rule: "auto", "linear", "sqrt" or "none".
            dataset_size: caps the recommendation (default: the tracker's).

        Returns:
            None before the first record.
        """
        check_advice_arguments(lr, optimizer)
        rec = self.latest
        if rec is None:
            return None
        curve, source = self._timing(timing)
        return doubling_advice(
            self.step, self.batch_now, rec.b_simple, rec.ci95, curve, source, lr=lr,
            optimizer=optimizer, lr_rule=lr_rule,
            dataset_size=dataset_size if dataset_size is not None else self.dataset_size)

    @property
    def batch_now(self) -> int:
        """The global batch the loop trains with now: the last step's, unless it was
        smaller than the one before (an epoch's partial last batch: 5 of 1,797 examples
        at 32), which must not stand for the run's batch at the next epoch's start,
        where doubling is decided."""
        if len(self._recent) == 2 and self._recent[1] < self._recent[0]:
            return self._recent[0]
        return self._recent[-1] if self._recent else self._last_batch

    def close(self) -> None:
        """Wait for the last values, detach every hook, close the log."""
        if self._closed:
            return
        self._poll(force=True)
        self._quick = 0
        self._detach()
        self._watch_batch(False)
        if self._ddp is not None:
            self._ddp.active = False  # DDP cannot unregister a comm hook: it stays a plain one
        if self._log is not None:
            self._log.close()
            self._log = None
        self._closed = True
        _OPEN.discard(self)

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """The tracker's hooks off inside the block, as they were after: another
        measurement on the same model (``bsfind.measure_noise_scale``) runs its own
        forwards and per-example hooks, which the tracker must neither count nor meet
        (two attention interceptions on one module see each other's calls)."""
        hooked, watching = self._hooked, self._size_hook is not None
        self._detach()
        self._watch_batch(False)
        self._paused = True  # update() and micro_step() from integrations' hooks: ignored
        try:
            yield
        finally:
            self._paused = False
            if hooked and self._norms is not None:
                self._attach()
            if watching:
                self._watch_batch(True)

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- steps --------------------------------------------------------------------------
    def _timing(self, timing: TimingCurve | tuple[float, float] | None
                ) -> tuple[TimingCurve | None, TimingSource]:
        if timing is not None:
            return _curve(timing), "given"
        if self.timing is not None:
            return self.timing, "given"
        measured = self.step_times()
        return (measured, "measured") if measured is not None else (None, "none")

    def _begin_step(self) -> None:
        self._micro = []
        self._micro_sq = []
        self._prev = None
        self._measuring = self._due()
        # the steps after this one that update() may only count: all before the next
        # measured one, when the pairing is per-example (or none) on a single process
        plain = self._ddp is None and not self._accumulating and not self._measuring
        self._quick = (max(0, self._measured_at + self.every - self.step - 1)
                       if plain and self._measured_at is not None else 0)
        self._watch_batch(self._measuring and self.batch_size is None)
        if self._measuring and self._ddp is None:
            self._trainable_changed()  # a layer (un)frozen since: plan for the new set
        if self._ddp is not None:
            self._ddp.active = self._measuring
        elif self._measuring and not self._accumulating and self._per_example_ok():
            self._attach()  # before this step's forward; stays on if the last step had it
        else:
            self._detach()  # the model runs untouched between measured steps

    def _measure(self) -> None:
        """Queue this step's measurement (values stay on the device)."""
        if self._ddp is not None:
            self._measure_ddp()
            return
        grads = [p.grad for p in self.params if p.grad is not None]
        if not grads:
            self._warn_once("no-grad", (
                f"bsfind tracker: no parameter had a gradient at update() (step {self.step}): "
                + UPDATE_AFTER_BACKWARD))
            return
        if len(self._micro) > 1:
            last = self._boundary()
            self._queue("accumulation", compat.sq_norm(grads),
                        [*self._micro_sq, last])
        elif self._hooked:
            from bsfind.noise.per_example import PerExampleUnsupported

            try:
                per = self._norms.sq_norms()
            except (PerExampleUnsupported, RuntimeError) as exc:
                if "no backward reached" in str(exc) and self._norms.paths:
                    # hooks that measured before: a stray update() (called twice in a
                    # step) turned them off for the rest of the run (a trial)
                    self._warn_once("no-backward", (
                        f"bsfind tracker: step {self.step} not measured: no backward since "
                        "the last update(); " + UPDATE_AFTER_BACKWARD + ", once per step"))
                    return
                self._per_example_failed(per_example_failure(exc))
                return
            if self._norms.replaced:  # the loop accumulated without saying so
                self._warn_once("micro", unsaid_accumulation(self._norms.replaced + 1))
                return
            b = int(per.shape[0])
            self._micro[-1] = self._seen_batch = b
            # Each hooked term is example i's share of .grad, (1/b)·∇L_i for a mean loss:
            # mean_i |∇L_i|² = b²·Σ|share_i|²/b (the factor b is applied on the host).
            self._queue("per-example", compat.sq_norm(grads), [per.sum()])
        else:
            self._warn_once("nothing", "bsfind tracker: nothing measured: " + (
                self.reason or "no pairing available") + "; accumulate gradients (micro_step) "
                "or run under DistributedDataParallel")

    def _measure_ddp(self) -> None:
        assert self._ddp is not None
        repeated = self._ddp.repeated
        taken = self._ddp.take()
        if repeated:
            self._warn_once("ddp-repeated", (
                "bsfind tracker: DDP all-reduced the gradients more than once in one "
                "optimizer step (gradient accumulation without no_sync()), so a rank's own "
                "gradient is not seen before its all-reduce and these steps are not "
                "measured: run the backward of every micro-batch but the last inside "
                "`with model.no_sync():`, which also saves those all-reduces"))
            return
        if taken is None:
            self._warn_once("ddp", "bsfind tracker: no DDP all-reduce ran in this step's "
                            "backward (update() before backward, or no_sync on every "
                            "micro-batch?)")
            return
        local, reduced = taken
        vec = self._values(reduced, [local])
        # the one extra all-reduce: [|G_big|², loss, |g_rank|²] summed over ranks
        work = torch.distributed.all_reduce(vec, group=self._ddp.group, async_op=True)
        self._push(vec, "ddp", work)

    def _queue(self, method: Method, sq_big: torch.Tensor, small: list[torch.Tensor]) -> None:
        self._push(self._values(sq_big, small), method, None)

    def _values(self, sq_big: torch.Tensor, small: Sequence[torch.Tensor]) -> torch.Tensor:
        dev = sq_big.device
        scale = compat.loss_scale(self.scaler)
        if scale is not None:  # the gradients carry the loss scale: divide its square out
            s2 = (scale.to(dev, torch.float64) if isinstance(scale, torch.Tensor)
                  else torch.tensor(float(scale), dtype=torch.float64, device=dev)) ** 2
            sq_big = sq_big / s2
            small = [t / s2 for t in small]
        return torch.stack([sq_big, self._loss_sum(sq_big).to(dev), *small])

    def _push(self, vec: torch.Tensor, method: Method, work: Any) -> None:
        examples = self.examples + self.world * sum(self._micro)  # through this step
        meta = in_training.StepMeta(self.step, examples, method, list(self._micro), self.world,
                     self._loss_count, time.perf_counter() - self._start, self._divisor,
                     sum(p.numel() for p in self.params))
        self._pending.append(in_training.Pending(vec, meta, work))
        self._losses, self._loss_count = [], 0

    # -- resolution -----------------------------------------------------------------------
    def _poll(self, force: bool) -> list[TrackRecord]:
        new = []
        while self._pending and self._pending[0].ready(force):
            p = self._pending.popleft()
            assert p.host is not None
            rec = self._resolve(p.host.tolist(), p.meta)
            if rec is not None:
                new.append(rec)
        return new

    def _resolve(self, v: list[float], m: in_training.StepMeta) -> TrackRecord | None:
        """Host numbers of one measured step -> its estimates, the window, a record."""
        if m.method == "ddp":
            v = [x / m.world for x in v]  # summed over ranks: the mean (sq_big is the same on all)
        sq_big, loss_sum, small = v[0], v[1], v[2:]
        if m.divisor is not None:
            # each loss carried 1/divisor, not 1/k for the k micro-batches the pairing
            # counts (those whose gradient moved, under accumulation): the squared
            # gradients are off by (divisor/k)²
            k = len([s for s in small if s != 0.0]) if m.method == "accumulation" else len(
                m.micro)
            f = (m.divisor / max(k, 1)) ** 2
            sq_big, small = sq_big * f, [x * f for x in small]
        if m.method == "per-example":
            b_small, sq_small, b_big = 1.0, small[0] * m.micro[0], float(m.micro[0])
        elif m.method == "accumulation":
            kept = [(s, b) for s, b in zip(small, m.micro, strict=True) if s != 0.0]
            if len(kept) < 2:
                return None
            k = len(kept)  # each micro-batch's loss carried 1/k: G_b = k·g_j
            b_small = k / sum(1.0 / b for _, b in kept)  # harmonic mean: unbiased for unequal b
            sq_small = k * k * sum(s for s, _ in kept) / k  # mean of |G_b|² = k²·|g_j|²
            b_big = k * b_small
        else:
            b_small = float(sum(m.micro))
            sq_small, b_big = small[0], float(m.world * sum(m.micro))
        if not all(math.isfinite(x) for x in (sq_big, sq_small)) or b_big <= b_small:
            self.skipped += 1
            self._skipped_in_a_row += 1
            loss = loss_sum / m.loss_count if m.loss_count else math.nan
            # (a GradScaler's overflows skip steps in a row while it backs off: only a
            # loss that is not finite says the run diverged there)
            if ((m.loss_count and not math.isfinite(loss))
                    or (self._skipped_in_a_row >= 3 and self.scaler is None)):
                self._warn_once("diverged", (
                    f"bsfind tracker: the gradients at step {m.step} are not finite (mean "
                    f"loss since the last record: {loss:.4g}); {self._skipped_in_a_row} "
                    "measured step(s) in a row skipped. An AMP overflow skips one; a run "
                    "that diverged writes no more records, and advice() reads the last "
                    "finite ones"))
            return None
        self._skipped_in_a_row = 0
        if sq_big == 0.0:  # .grad zeroed before update(), or update() before backward()
            self._warn_once("zero-grad", (
                f"bsfind tracker: the gradient at update() was exactly zero (step {m.step}), "
                "so the step is not measured: " + UPDATE_AFTER_BACKWARD))
            return None
        g2, trace = two_batch(b_small, sq_small, b_big, sq_big)
        if self.dataset_size is not None:
            g2, trace = without_replacement(g2, trace, self.dataset_size)
        self._window.add(trace, g2, b_big, m.examples)
        mean_g2, mean_trace, value, ci = self._window.summary()
        rec = TrackRecord(
            step=m.step, examples=m.examples,
            loss=loss_sum / m.loss_count if m.loss_count else None,
            grad_norm_sq=mean_g2, trace_sigma=mean_trace, b_simple=value, ci95=ci,
            b_small=round(b_small), b_big=round(b_big), method=m.method,
            step_grad_norm_sq=g2, step_trace_sigma=trace, window=len(self._window.rows),
            seconds=m.seconds, batch=m.world * sum(m.micro), parameters=m.parameters)
        self.method = m.method
        self._records.append(rec)
        self._write(rec)
        return rec

    def _write(self, rec: TrackRecord) -> None:
        if self._log is None:
            return
        self._log.write(json.dumps(rec.to_json()) + "\n")
        self._log.flush()

    # -- gradients ------------------------------------------------------------------------
    def _boundary(self) -> torch.Tensor:
        """|.grad − .grad at the last boundary|² (this micro-batch's gradient), and keep
        .grad as the new boundary."""
        if self._prev is None:
            self._prev = [None] * len(self.params)
        pairs_prev, pairs_now, fresh = [], [], []
        for i, p in enumerate(self.params):
            g = p.grad
            if g is None:
                continue
            prev = self._prev[i]
            if prev is None:
                self._prev[i] = g.detach().clone()
                fresh.append(g.detach())
            else:
                pairs_prev.append(prev)
                pairs_now.append(g.detach())
        terms = []
        if pairs_prev:
            terms.append(compat.sq_diff_and_copy(pairs_prev, pairs_now))
        if fresh:
            terms.append(compat.sq_norm(fresh))
        if not terms:
            return torch.zeros((), dtype=torch.float64)
        return torch.stack([t.to(terms[0].device) for t in terms]).sum()

    def _check_scaler(self) -> None:
        if compat.scaler_unscaled(self.scaler):
            raise RuntimeError(
                "bsfind tracker: the GradScaler has already unscaled the gradients: call "
                "tracker.update() / micro_step() before scaler.unscale_(optimizer)")

    def _trainable_changed(self) -> bool:
        """Whether the model's trainable parameters are no longer those followed (a layer
        frozen or unfrozen since track()); if so, follow the new set from here: the
        boundary gradients and the per-example plan (which covers the parameters
        trainable when it was made) start again. (A layer unfrozen at step 100 was left
        out: the log read the frozen model's 115 against the exact 79.)"""
        now = [p for p in self.module.parameters() if p.requires_grad]
        if len(now) == len(self.params) and all(a is b for a, b in zip(now, self.params,
                                                                          strict=True)):
            return False
        self.params = now
        self._poll(force=True)  # measurements of the old set: into the window it leaves
        self._window = in_training.Window(self._window.size)  # another quantity from here
        self._prev = None
        self._micro_sq = []
        self._detach()
        self._norms = None
        self.reason = None  # planned again on the next measured step
        return True

    # -- per-example hooks --------------------------------------------------------------------
    def _per_example_ok(self) -> bool:
        if self._norms is not None:
            return True
        if self.reason is not None:
            return False
        from bsfind.noise.per_example import PerExampleGradNorms, plan

        p = plan(self.module)
        if not p.ok:
            self.reason = f"per-example norms unavailable: {p.reason}"
            return False
        self._norms = PerExampleGradNorms(self.module, p)
        return True

    def _attach(self) -> None:
        if not self._hooked:
            self._norms.__enter__()
            self._hooked = True

    def _detach(self) -> None:
        if self._hooked:
            self._norms.__exit__(None, None, None)
            self._hooked = False

    def _per_example_failed(self, why: str) -> None:
        self._detach()
        self._norms = None
        self.reason = f"per-example norms failed at step {self.step}: {why}"
        self._warn_once("per-example", "bsfind tracker: " + self.reason +
                        "; without them nothing is measured on one process: accumulate "
                        "gradients (micro_step) or run under DistributedDataParallel, "
                        "pairings that need no per-example norms")
        self._warned.add("nothing")  # (said just now: a second warning repeated it)

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(message, RuntimeWarning, stacklevel=3)

    # -- batch sizes ----------------------------------------------------------------------------
    def _on_forward(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
                    ) -> None:
        if not torch.is_grad_enabled():
            return
        for a in (*args, *kwargs.values()):
            if isinstance(a, torch.Tensor) and a.dim() >= 1:
                self._seen_batch = int(a.shape[0])
                self._sizes.append(self._seen_batch)
                return

    def _watch_batch(self, on: bool) -> None:
        """A forward pre-hook that reads the batch size, on measured steps only: any hook
        takes the model's __call__ off its fast path (about 20 µs a step on the MLP).
        Other steps count the size last seen."""
        if on and self._size_hook is None:
            from bsfind.noise.per_example.hooks import Hook  # (a copy's does nothing)

            self._size_hook = self.module.register_forward_pre_hook(Hook(self._on_forward),
                                                                    with_kwargs=True)
        elif not on and self._size_hook is not None:
            self._size_hook.remove()
            self._size_hook = None

    def _usual_batch(self) -> int | None:
        """The batch size a step that does not watch its input counts (see ``_sizes``)."""
        return max(self._sizes) if self._sizes else self._seen_batch

    def _batch(self, given: int | None) -> int:
        # a measured step watched its own input; others count the usual size
        watched = self._size_hook is not None
        b = given or self.batch_size or (self._seen_batch if watched else self._usual_batch())
        self._seen_batch = b  # the size last seen, for steps that do not watch the input
        if b is None:
            raise ValueError("bsfind tracker: batch size unknown: pass batch_size= to track() "
                             "or update() (no tensor input reached the model's forward"
                             + compiled_hint() + ")")
        return int(b)

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("this tracker is closed" + (
                f" ({self.closed_by} closed it)" if self.closed_by else ""))

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` ran (by the loop, or by a newer tracker: ``closed_by``)."""
        return self._closed

    owner: object = None  # the callback that made it (close_earlier's siblings)
    closed_by: str | None = None  # what closed it, when not its own close()
    _last_batch = 0
    _measuring = False
    _quick = 0  # plain steps left that update() only counts


# Trackers not yet closed: another measurement on their model pauses them (paused_on).
_OPEN: weakref.WeakSet[Tracker] = weakref.WeakSet()


@contextlib.contextmanager
def paused_on(model: nn.Module) -> Iterator[None]:
    """Every open tracker of ``model`` (or of a module it contains, or that contains it)
    paused inside the block (:meth:`Tracker.paused`)."""
    mine = set(model.modules())
    with contextlib.ExitStack() as stack:
        for t in list(_OPEN):
            if mine & set(t.module.modules()):
                stack.enter_context(t.paused())
        yield


def track(model: nn.Module, **options: Any) -> Tracker:
    """Start tracking the gradient noise scale of ``model`` in your training loop.

    ``options`` are :class:`Tracker`'s (``every``, ``window``, ``batch_size``,
    ``scaler``, ``log``, ``timing``, ``ddp_comm_hook``, ``dataset_size`` for batches
    drawn without replacement; ``step`` and ``examples`` for a run resumed from a
    checkpoint). Call ``tracker.update(loss)``
    once per optimizer step after its last backward (before clipping), and
    ``tracker.micro_step()`` after the backward of each other micro-batch when
    accumulating gradients.
    """
    return Tracker(model, **options)
