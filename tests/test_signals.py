"""Ctrl-C prints what was measured so far and exits 130; budgets are honoured."""

from __future__ import annotations

import json
import signal
import time

import pytest
import torch

from tests.conftest import CONFIGS
from tests.subprocesses import start_bsfind, wait_for_stderr


@pytest.mark.parametrize("command", ["noise", "recommend"])
def test_sigint_during_probe_prints_partial_and_exits_130(command: str) -> None:
    proc = start_bsfind(command, str(CONFIGS / "digits-mlp.yaml"), "--json",
                  "--set", "probe.target_rel_error=0.0001", "--set", "probe.max_seconds=120")
    wait_for_stderr(proc, "bsfind: noise:")
    time.sleep(1.0)  # let a few rounds run
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "interrupted" in err and "Traceback" not in err
    doc = json.loads(out)
    assert doc["status"] == "interrupted" and doc["exit_code"] == 130
    assert doc["noise_scale"]["stopped"] == "interrupted"
    assert doc["noise_scale"]["examples"] > 0


def test_sigterm_is_treated_like_ctrl_c() -> None:
    proc = start_bsfind("noise", str(CONFIGS / "digits-mlp.yaml"),
                  "--set", "probe.target_rel_error=0.0001", "--set", "probe.max_seconds=120")
    wait_for_stderr(proc, "bsfind: noise:")
    time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "interrupted at step 0: B_simple" in out


class WorkClock:
    """A fake clock that runs on work, not on the machine: every forward of a linear
    layer costs ``per_call`` + ``per_example`` × its batch in virtual seconds, and every
    reading of the clock ``per_read`` (so that a loop which only waits on it still ends).
    A run then spends its budget the same way on a loaded machine as on an idle one,
    and a phase that keeps working past its deadline overruns on this clock too."""

    def __init__(self, per_call: float, per_example: float, per_read: float) -> None:
        self.t = 0.0
        self.per_call, self.per_example, self.per_read = per_call, per_example, per_read

    def __call__(self) -> float:
        self.t += self.per_read
        return self.t

    def forward(self, module: torch.nn.Module, args: tuple[object, ...]) -> None:
        if isinstance(module, torch.nn.Linear):
            x = args[0] if args else None
            rows = x.shape[0] if isinstance(x, torch.Tensor) and x.dim() > 1 else 1
            self.t += self.per_call + self.per_example * rows


@pytest.mark.parametrize("budget", [5.0, 10.0])
def test_time_budget_is_honoured_within_10_percent(budget: float) -> None:
    """probe.max_seconds bounds the whole run (build, noise, memory, timing, advice),
    counted on a clock that runs on the work done (deterministic, whatever the load)."""
    from bsfind.api import recommend
    from bsfind.budget import clocked
    from bsfind.spec import load_spec

    spec = load_spec(CONFIGS / "digits-cnn.yaml", [f"probe.max_seconds={budget}",
                                                   "probe.target_rel_error=0.0001"])
    clock = WorkClock(per_call=8e-3, per_example=8e-5, per_read=1e-5)
    hook = torch.nn.modules.module.register_module_forward_pre_hook(clock.forward)
    try:
        with clocked(clock):
            report = recommend(spec)
    finally:
        hook.remove()
    assert report.status == "partial"
    assert report.seconds <= 1.10 * budget, report.seconds
    assert report.seconds >= 0.5 * budget  # it used the budget rather than quitting early
    assert report.recommendation is not None
    assert clock.t >= report.seconds  # the report's seconds are the fake clock's


def test_the_partial_output_labels_only_the_cut_probe_interrupted(
        capsys: pytest.CaptureFixture[str]) -> None:
    """After Ctrl-C, the points that finished read as measured and only the probe cut
    short as interrupted (a trial saw every finished point labelled "interrupted")."""
    import dataclasses

    from bsfind.cli import _partial_noise
    from bsfind.results import Interval, NoiseEstimate, NoisePartial

    done = NoiseEstimate(
        b_simple=50.0, ci95=Interval(45.0, 55.0), grad_norm_sq=1.0,
        grad_norm_sq_ci95=Interval(0.9, 1.1), trace_sigma=50.0,
        trace_sigma_ci95=Interval(48.0, 52.0), method="per-example", method_reason="",
        b_small=1, b_big=64, examples=640, rounds=10, seconds=0.1, stopped="converged",
        step=0, examples_seen=0)
    cut = dataclasses.replace(done, step=8, stopped="interrupted", examples=64)
    _partial_noise(False, "noise")(NoisePartial((done, cut), cut))
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("measured at step 0: B_simple 50")
    assert lines[1].startswith("interrupted at step 8: B_simple 50")


def test_the_partial_output_gives_the_value_the_advice_would_use(
        capsys: pytest.CaptureFixture[str]) -> None:
    """Along training the advice uses the median of the last three points: an
    interruption's top-level noise_scale is that median, not the last point (a torchrun
    trial read the cut-short point's value there)."""
    import dataclasses

    from bsfind.cli import _partial_noise
    from bsfind.results import Interval, NoiseEstimate, NoisePartial
    from bsfind.trajectory import summarize

    def point(step: int, b: float, stopped: str = "converged") -> NoiseEstimate:
        return NoiseEstimate(
            b_simple=b, ci95=Interval(0.9 * b, 1.1 * b), grad_norm_sq=1.0,
            grad_norm_sq_ci95=Interval(0.9, 1.1), trace_sigma=b,
            trace_sigma_ci95=Interval(0.9 * b, 1.1 * b), method="per-example",
            method_reason="", b_small=1, b_big=64, examples=640, rounds=10, seconds=0.1,
            stopped=stopped, step=step, examples_seen=64 * step)

    points = (point(0, 20.0), point(8, 40.0), point(16, 60.0), point(32, 80.0),
              dataclasses.replace(point(64, 500.0, "interrupted"), examples=64))
    used = summarize(points)
    assert used.b_simple == 80.0 and used.summary_of == (16, 32, 64)  # by hand
    _partial_noise(True, "noise")(NoisePartial(points, used))
    doc = json.loads(capsys.readouterr().out)
    assert doc["noise_scale"]["b_simple"] == 80.0
    assert doc["noise_scale"]["summary_of"] == [16, 32, 64]
    assert [p["step"] for p in doc["noise_scale_by_step"]] == [0, 8, 16, 32, 64]
    _partial_noise(False, "noise")(NoisePartial(points, used))
    last = capsys.readouterr().out.splitlines()[-1]
    assert last == "their median, which the advice would use: B_simple 80 (steps 16, 32, 64)"
