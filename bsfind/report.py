"""Results -> one plain dict (the ``--json`` document and the table's source).

Nothing here knows rich: the CLI renders tables from the same dict that
``--json`` prints, so the two can never disagree.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from bsfind import __version__
from bsfind.results import (
    AbsolutePrediction,
    BranchResult,
    Candidate,
    DeviceInfo,
    DistributedSummary,
    FrontierRow,
    Interval,
    LrSearch,
    MemoryModel,
    NoiseEstimate,
    Recommendation,
    RunAverage,
    TimingCurve,
    Trajectory,
)
from bsfind.schedule import Schedule


@dataclass(frozen=True)
class Report:
    """Everything one run measured and concluded."""

    command: str
    spec: Mapping[str, Any]  # the spec document with defaults filled, echoed as given
    device: DeviceInfo
    dataset_size: int
    baseline_batch: int
    baseline_lr: float
    optimizer: str
    noise: tuple[NoiseEstimate, ...]  # one per probe point, in training order
    used: NoiseEstimate | None  # the point that drove the recommendation
    status: str = "ok"  # ok | partial (budget ran out) | interrupted
    memory: MemoryModel | None = None
    timing: TimingCurve | None = None
    predicted_gpu: str | None = None
    predicted_memory: MemoryModel | None = None
    predicted_timing: TimingCurve | None = None
    recommendation: Recommendation | None = None
    candidates: tuple[Candidate, ...] = ()
    frontier: tuple[FrontierRow, ...] = ()
    absolute: AbsolutePrediction | None = None
    warnings: tuple[str, ...] = field(default_factory=tuple)
    seconds: float = 0.0
    cached: bool = False
    version: str = __version__
    distributed: DistributedSummary | None = None  # torchrun: world size, all-reduce, per rank
    trajectory: Trajectory | None = None  # how far the probe run along training got
    schedule: Schedule | None = None  # the batch-size schedule (recommend)
    branches: tuple[BranchResult, ...] = ()  # branched runs (probe.branches, `bsfind branch`)
    # their run average between model.checkpoints (bsfind.branches.run_average_of)
    branch_run_average: RunAverage | None = None
    lr_search: LrSearch | None = None  # the learning rate measured (probe.lr_branches)


def clean(value: Any) -> Any:
    """JSON-safe: dataclasses -> dicts, intervals -> [low, high], inf/nan -> None."""
    if isinstance(value, Interval):
        return value.as_list()
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: clean(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, Mapping):
        return {str(k): clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [clean(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def noise_dict(est: NoiseEstimate) -> dict[str, Any]:
    d = clean(est)
    d["ci95"] = est.ci95.as_list()
    d["resolved"] = est.b_simple is not None
    d["rel_half_width"] = clean(est.rel_half_width)
    return d


def schedule_dict(s: Schedule | None) -> dict[str, Any] | None:
    """The schedule's phases, its ready-to-paste forms and its predicted times."""
    if s is None:
        return None
    from bsfind.wording import schedule_notes, schedule_past_dataset

    return {
        "phases": clean(s.phases),
        "ramp": [{"from_step": a, "batch_size": b, "learning_rate": lr} for a, b, lr in s.ramp],
        "accumulation": [{"from_step": a, "per_device_batch_size": m, "grad_accumulation": k}
                         for a, m, k in s.accumulation],
        "growth": {"a": s.growth.a, "p": s.growth.p, "examples_from": s.growth.e_lo,
                   "examples_to": s.growth.e_hi, "r2": clean(s.growth.r2),
                   "extrapolation_limit_examples": s.growth.e_cap},
        "horizon_examples": s.horizon_examples,
        "horizon_source": s.horizon_source,
        "measured_examples": s.measured_examples,
        "lr_rule": s.lr_rule,
        "lr_measured": ({"batch_size": s.lr_measured[0], "factor": s.lr_measured[1]}
                        if s.lr_measured else None),
        "predicted_seconds": s.seconds,
        "accumulation_predicted_seconds": clean(s.accumulation_seconds),
        "baseline_seconds": s.baseline_seconds,
        "best_constant_batch": s.best_constant_batch,
        "best_constant_seconds": s.best_constant_seconds,
        "recommended_batch": s.recommended_batch,
        "recommended_seconds": clean(s.recommended_seconds),
        "predicted_time_ratio": s.seconds / s.baseline_seconds if s.baseline_seconds else None,
        "label": "predicted; phases marked extrapolated start past the last measured point",
        "notes": [*schedule_notes(s.seconds, s.best_constant_batch, s.best_constant_seconds,
                                  s.recommended_batch, s.recommended_seconds),
                  *([] if s.past_dataset is None else [schedule_past_dataset(
                      s.phases[-1].batch_size, s.past_dataset[1], s.past_dataset[0])])],
    }


def branch_dict(r: BranchResult) -> dict[str, Any]:
    """One branch measurement: the result's fields, its ratios and the rule in words."""
    from bsfind.wording import branch_line, branch_rule, branch_start

    d = clean(r)
    d["start"] = branch_start(r)
    d["cut_short"] = r.cut_short
    d["ratio_to_b_simple"] = clean(r.ratio_simple)
    d["ratio_to_b_noise"] = clean(r.ratio_noise)
    d["rule"] = branch_rule(r)
    d["summary"] = branch_line(r)
    return d


def _with_summary(r: Any, line: Callable[[Any], str]) -> dict[str, Any] | None:
    """``r``'s fields and its line in words (``summary``); None for None."""
    if r is None:
        return None
    d = clean(r)
    d["summary"] = line(r)
    return d


def run_average_dict(r: RunAverage | None) -> dict[str, Any] | None:
    """The branches' run average between checkpoints: its fields and its line in words."""
    from bsfind.wording import run_average_line

    return _with_summary(r, run_average_line)


def lr_search_dict(r: LrSearch | None) -> dict[str, Any] | None:
    """The learning-rate search: its fields and its line in words."""
    from bsfind.wording import lr_search_line

    return _with_summary(r, lr_search_line)


def to_dict(report: Report) -> dict[str, Any]:
    """The JSON document (see README: "JSON fields")."""
    doc: dict[str, Any] = {
        "version": report.version,
        "command": report.command,
        "status": report.status,
        "cached": report.cached,
        "device": clean(report.device),
        "dataset": {"size": report.dataset_size},
        "baseline": {
            "batch_size": report.baseline_batch,
            "learning_rate": report.baseline_lr,
            "optimizer": report.optimizer,
        },
        "noise_scale": noise_dict(report.used) if report.used else None,
        "noise_scale_by_step": [noise_dict(n) for n in report.noise],
    }
    if report.command not in ("noise", "branch"):
        doc["memory"] = clean(report.memory)
        doc["timing"] = clean(report.timing)
        doc["predicted"] = (
            {
                "gpu": report.predicted_gpu,
                "memory": clean(report.predicted_memory),
                "timing": clean(report.predicted_timing),
                "label": "predicted: not measured on this machine",
            }
            if report.predicted_gpu
            else None
        )
        doc["recommendation"] = clean(report.recommendation)
        doc["candidates"] = clean(report.candidates)
        doc["frontier"] = clean(report.frontier)
        doc["absolute"] = clean(report.absolute)
    doc["trajectory"] = clean(report.trajectory)
    if report.command not in ("noise", "branch"):
        doc["schedule"] = schedule_dict(report.schedule)
    if report.command == "recommend":
        doc["lr_search"] = lr_search_dict(report.lr_search)
    if report.branches or report.command == "branch":
        doc["branches"] = [branch_dict(b) for b in report.branches]
        doc["branch_run_average"] = run_average_dict(report.branch_run_average)
    if report.distributed is not None:
        doc["distributed"] = clean(report.distributed)
    doc["warnings"] = list(report.warnings)
    doc["seconds"] = report.seconds
    doc["spec"] = clean(report.spec)
    return doc
