"""Data-parallel probing (bsfind.distributed): 2 CPU processes talking over gloo.

    .venv/bin/python -m pytest tests/test_distributed.py -q      # about a minute on 2 cores

Each test starts two real ranks, either through torchrun (what users run) or by
setting the launcher's environment by hand (RANK, WORLD_SIZE, MASTER_ADDR,
MASTER_PORT, LOCAL_RANK: "any launcher"), on tests/assets/dist.yaml, whose
model misbehaves on one rank when its kwargs ask for it (tests/assets/dist_code.py).
"""

from __future__ import annotations

import json
import math
import os
import re
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed

from bsfind.distributed import combine_curves
from bsfind.results import TimingCurve, TimingPoint
from tests.conftest import ROOT

SPEC = str(ROOT / "tests" / "assets" / "dist.yaml")
TORCHRUN = Path(sys.executable).parent / "torchrun"
LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR",
               "MASTER_PORT", "GROUP_RANK", "ROLE_RANK", "TORCHELASTIC_RUN_ID")
# Every run must end well before this (they take 10-20 s on 2 busy cores).
RUN_TIMEOUT_S = 120

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not (torch.distributed.is_available() and torch.distributed.is_gloo_available()),
        reason="needs torch.distributed with the gloo backend",
    ),
]


# --------------------------------------------------------------------------- launching


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARS}
    # One thread per rank, as torchrun sets it: two ranks share two cores.
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **extra)
    return env


def _torchrun(*args: str) -> tuple[subprocess.CompletedProcess[str], float]:
    if not TORCHRUN.exists():
        pytest.skip(f"torchrun not found next to {sys.executable}")
    start = time.monotonic()
    proc = subprocess.run(
        [str(TORCHRUN), "--standalone", "--nproc_per_node", "2", "-m", "bsfind", *args],
        cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=RUN_TIMEOUT_S,
    )
    return proc, time.monotonic() - start


@dataclass
class Rank:
    code: int
    out: str
    err: str


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _launch(*args: str) -> tuple[list[Rank], float]:
    """Two ranks started with the torch.distributed environment set by hand."""
    port = str(_free_port())
    start = time.monotonic()
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "bsfind", *args], cwd=ROOT, text=True,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            env=_env(RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2",
                     MASTER_ADDR="127.0.0.1", MASTER_PORT=port),
        )
        for r in range(2)
    ]
    ranks = []
    try:
        for p in procs:  # rank 0 first: it is the one that writes
            out, err = p.communicate(timeout=RUN_TIMEOUT_S)
            ranks.append(Rank(p.returncode, out, err))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    return ranks, time.monotonic() - start


def _one_document(stdout: str) -> dict[str, Any]:
    """The JSON document on stdout, asserting that there is exactly one."""
    text = stdout.strip()
    doc, end = json.JSONDecoder().raw_decode(text)
    assert text[end:].strip() == "", f"more than one document on stdout: {text[end:][:200]!r}"
    return doc  # type: ignore[no-any-return]


# --------------------------------------------------------------------------- tests


def test_torchrun_reports_once_and_agrees_with_a_single_process() -> None:
    from bsfind.api import measure
    from bsfind.spec import load_spec

    proc, _ = _torchrun("recommend", SPEC, "--json", "--set", "probe.at_steps=[0]")
    assert proc.returncode == 0, proc.stderr
    doc = _one_document(proc.stdout)
    # Only rank 0 wrote: one copy of each warning.
    assert proc.stderr.count("warning: measured at initialisation") == 1, proc.stderr

    noise = doc["noise_scale"]
    assert noise["method"] == "distributed+per-example"
    assert "2 ranks" in noise["method_reason"]
    assert noise["b_big"] % 2 == 0 and noise["b_simple"] is not None
    dist = doc["distributed"]
    assert dist["world_size"] == 2 and dist["backend"] == "gloo"
    assert dist["sync_seconds"] > 0 and dist["sync_bytes"] == 195 * 4
    assert [r["rank"] for r in dist["per_rank"]] == [0, 1]
    for r in dist["per_rank"]:
        assert r["step_seconds"] > 0 and r["sync_seconds"] > 0
        assert len(r["timing"]["points"]) >= 2
    assert doc["timing"]["source"] == "measured"
    assert doc["recommendation"]["gpus"] == 2
    assert doc["spec"]["hardware"]["gpus"] == 2  # the spec as run: the ranks measured
    # each rank's memory line holds DDP's gradient buckets: one more copy of the
    # gradients (195 float32 parameters) than the single-process line
    from bsfind.hardware import measure as hw
    from bsfind.workload import build

    job = build(load_spec(SPEC, ["probe.at_steps=[0]"]))
    alone = hw.memory_model(job, hw.step_function(job, 0.1, 0), hw.HardwareOptions(lr=0.1))
    assert doc["memory"]["fixed_bytes"] == alone.fixed_bytes + 195 * 4

    # One process, same spec: the same weights (seeded before the factory),
    # drawing its own examples. The two 95% intervals must overlap.
    torch.set_num_threads(1)  # as each rank ran
    single = measure(load_spec(SPEC, ["probe.at_steps=[0]"])).used
    assert single is not None and single.b_simple is not None
    lo, hi = noise["ci95"]
    hi = math.inf if hi is None else hi
    assert max(lo, single.ci95.low) <= min(hi, single.ci95.high), (noise["ci95"], single.ci95)


def test_out_of_memory_on_one_rank_backs_off_on_every_rank() -> None:
    """Rank 1's model runs out of memory above 100 examples, rank 0's never: first in
    the noise probe (whose B_big grows to 256, 128 per rank), then in the memory search."""
    limit = 100
    ranks, _ = _launch("recommend", SPEC, "--json",
                       "--set", f"model.kwargs={{oom_rank: 1, oom_above: {limit}}}",
                       "--set", "probe.max_seconds=30")
    assert [r.code for r in ranks] == [0, 0], ranks[0].err
    assert ranks[1].out == "" and ranks[1].err == ""  # rank 1 stays silent
    doc = _one_document(ranks[0].out)
    # The probe shrank its batch on both ranks and still converged.
    assert doc["noise_scale"]["b_big"] <= 2 * limit and doc["noise_scale"]["b_simple"]
    memory = doc["memory"]
    per_rank = doc["distributed"]["per_rank"]
    # Both ranks stepped the same sizes in the same order ...
    assert per_rank[0]["memory_tried"] == per_rank[1]["memory_tried"] == memory["tried"]
    from bsfind.hardware.measure import TIMING_MAX_BATCH

    tried = memory["tried"]
    assert tried[:4] == [TIMING_MAX_BATCH, TIMING_MAX_BATCH // 2, TIMING_MAX_BATCH // 4,
                         TIMING_MAX_BATCH // 8]  # halving, then bisecting
    # ... although only rank 1 ran out, at exactly the sizes above 600.
    assert per_rank[0]["oom_at"] == []
    assert per_rank[1]["oom_at"] == [b for b in tried if b > limit]
    assert memory["max_batch_size"] == limit and memory["verified"]
    assert doc["recommendation"]["per_device_batch_size"] <= limit


@pytest.mark.parametrize("launcher", ["torchrun", "env"])
def test_a_factory_failing_on_one_rank_ends_every_rank(launcher: str) -> None:
    args = ("recommend", SPEC, "--set", "model.kwargs={fail_on_rank: 1}")
    message = "rank 1: model.factory 'dist_code.py:model' raised ValueError: boom on rank 1"
    if launcher == "torchrun":
        proc, seconds = _torchrun(*args)
        assert proc.returncode != 0  # torchrun exits 1; the ranks' code 3 is in its summary
        assert proc.stderr.count(message) == 1, proc.stderr
        assert re.search(r"exitcode\s*:\s*3\b", proc.stderr), proc.stderr
        # torchrun's SIGTERM to rank 1 while it waits for rank 0 to print: its code
        # stays the agreed 3, not 130 ("interrupted"), as a trial saw
        assert not re.search(r"exitcode\s*:\s*130\b", proc.stderr), proc.stderr
        assert proc.stdout == ""
    else:
        ranks, seconds = _launch(*args)
        assert [r.code for r in ranks] == [3, 3], ranks[0].err
        assert message in ranks[0].err and "Traceback" not in ranks[0].err
        assert ranks[1].out == "" and ranks[1].err == ""
    assert seconds < 30


def test_combined_curve_takes_the_slowest_rank_at_shared_batch_sizes() -> None:
    """A synchronous step waits for the slowest rank (pure function, no processes)."""
    def curve(points: list[tuple[int, float]]) -> TimingCurve:
        pts = tuple(TimingPoint(b, s, 5) for b, s in points)
        return TimingCurve(pts, 0.0, 0.0, 1.0, "measured")

    fast = curve([(1, 1.0), (2, 1.5), (4, 2.5), (8, 4.5)])
    slow = curve([(1, 2.0), (2, 2.5), (4, 3.5)])  # its ladder stopped earlier
    combined = combine_curves([fast, slow])
    assert combined is not None
    assert [(p.batch_size, p.seconds) for p in combined.points] == [(1, 2.0), (2, 2.5), (4, 3.5)]
    assert combined.t0 == pytest.approx(1.5) and combined.per_example == pytest.approx(0.5)
    assert combine_curves([fast, None]) is None


def test_the_text_output_says_the_batches_are_global(
        capsys: pytest.CaptureFixture[str]) -> None:
    """Plain text under torchrun names the ranks and that the batch is global (a torchrun
    trial could not tell from the text output; pure functions, no processes)."""
    from bsfind import wording
    from bsfind.cli import render_report

    line = wording.check_message(within=True, baseline=16, recommended=32, ratio=2.0,
                                 tolerance=2, time_ratio=None, cost_ratio=None,
                                 learning_rate=0.1, lr_label="rule: mccandlish", ranks=2)
    assert line.endswith("; batches are global, over the 2 ranks measured")
    assert "global" not in wording.check_message(
        within=True, baseline=16, recommended=32, ratio=2.0, tolerance=2, time_ratio=None,
        cost_ratio=None, learning_rate=0.1, lr_label="rule: mccandlish")
    doc = {"version": "x", "device": {"name": "cpu", "type": "cpu"}, "dataset": {"size": 256},
           "baseline": {"batch_size": 16, "learning_rate": 0.1, "optimizer": "sgd"},
           "distributed": {"world_size": 2, "backend": "gloo"}, "noise_scale_by_step": [],
           "noise_scale": None, "command": "noise"}
    render_report(doc)
    header = capsys.readouterr().out.splitlines()[0]
    assert "· 2 ranks (gloo) ·" in header
    assert "baseline: batch 16 over all ranks (8 per rank), lr 0.1" in header


def test_microbatch_form_across_ranks() -> None:
    """probe.method: microbatch: each rank's micro-batches are the small batches."""
    proc, _ = _torchrun("noise", SPEC, "--json", "--set", "probe.method=microbatch")
    assert proc.returncode == 0, proc.stderr
    doc = _one_document(proc.stdout)
    assert doc["distributed"]["world_size"] == 2  # noise's JSON says how many ranks
    noise = doc["noise_scale"]
    assert noise["method"] == "distributed+microbatch"
    assert noise["b_simple"] is not None and noise["ci95"][0] <= noise["b_simple"]
    assert noise["b_big"] == noise["b_small"] * (noise["b_big"] // noise["b_small"])


@pytest.mark.parametrize(("method", "rel"), [("per-example", 0.10), ("microbatch", 0.15)])
def test_distributed_estimate_matches_the_exact_value(method: str, rel: float) -> None:
    """Both data-parallel forms against tr(Σ)/|G|² from every example's gradient, at the
    spec's initial weights (rank 0's, which every rank copies)."""
    from bsfind.spec import load_spec
    from bsfind.workload import build
    from tests.exact import exact_noise

    exact = exact_noise(build(load_spec(SPEC))).b_simple
    proc, _ = _torchrun("noise", SPEC, "--json", "--set", f"probe.method={method}",
                        "--set", "probe.target_rel_error=0.05", "--set", "probe.max_seconds=60",
                        "--set", "probe.at_steps=[0]")
    assert proc.returncode == 0, proc.stderr
    noise = _one_document(proc.stdout)["noise_scale"]
    assert noise["method"] == f"distributed+{method}" and noise["stopped"] == "converged"
    assert noise["b_simple"] == pytest.approx(exact, rel=rel), (noise, exact)


def test_the_default_probe_along_training_runs_on_every_rank() -> None:
    """The default: data-parallel training along the run, the ranks following rank 0's
    decisions on when to stop (their own clocks differ), then the median."""
    proc, seconds = _torchrun("noise", SPEC, "--json", "--set", "probe.max_seconds=15")
    assert proc.returncode == 0, proc.stderr
    doc = _one_document(proc.stdout)
    steps = [p["step"] for p in doc["noise_scale_by_step"]]
    assert steps[0] == 0 and len(steps) >= 3 and doc["trajectory"]["mode"] == "along"
    assert doc["noise_scale"]["summary_of"] == steps[1:][-3:]
    assert seconds < 60


def test_a_failure_leaves_the_ranks_sigterm_handler_as_it_was() -> None:
    """Secondary ranks ignore SIGTERM while they agree on a failure and wait for rank 0
    to print it (torchrun's SIGTERM made them exit 130); a review found the ignore left
    in place afterwards for an API caller that catches the error and goes on."""
    snippet = (
        "import signal\n"
        "from bsfind import load_spec, measure\n"
        "from bsfind.errors import BsfindError\n"
        f"spec = load_spec({SPEC!r}, ['model.kwargs={{fail_on_rank: 1}}'])\n"
        "before = signal.getsignal(signal.SIGTERM)\n"
        "try:\n"
        "    measure(spec)\n"
        "except BsfindError as exc:\n"
        "    print('caught', 'boom on rank 1' in str(exc))\n"
        "print('same handler', signal.getsignal(signal.SIGTERM) == before)\n")
    port = str(_free_port())
    procs = [subprocess.Popen(
        [sys.executable, "-c", snippet], cwd=ROOT, text=True, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=_env(RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2",
                 MASTER_ADDR="127.0.0.1", MASTER_PORT=port)) for r in range(2)]
    try:
        outs = [p.communicate(timeout=RUN_TIMEOUT_S) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for out, err in outs:
        assert "caught True" in out and "same handler True" in out, (out, err)


def test_a_secondary_rank_that_fails_alone_waits_then_says_why(tmp_path: Path) -> None:
    """A bad spec fails every rank before they coordinate. Rank 1 used to exit at once,
    and torchrun then stopped rank 0 before it printed: the user saw only torchrun's
    traceback (a trial: 2 runs in 8). A failing secondary rank now waits its grace
    (torchrun ends it once rank 0 has failed and printed), and when nothing ends it,
    says the error itself on its own stderr."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE")}
    env.update(RANK="1", WORLD_SIZE="2", LOCAL_RANK="1", BSFIND_RANK_GRACE="1.5",
               PYTHONPATH=str(ROOT))
    start = time.monotonic()
    r = subprocess.run([sys.executable, "-m", "bsfind", "recommend", "missing.yaml"],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    took = time.monotonic() - start
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.startswith("error (rank 1): ") and "missing.yaml" in r.stderr, r.stderr
    assert took >= 1.5
    # rank 0 says the same at once, as before
    env.update(RANK="0", LOCAL_RANK="0")
    r = subprocess.run([sys.executable, "-m", "bsfind", "recommend", "missing.yaml"],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "missing.yaml" in r.stderr and "(rank" not in r.stderr


def test_branch_under_torchrun_stops_with_a_usage_error(monkeypatch: pytest.MonkeyPatch) -> None:
    """A trial: `torchrun ... bsfind branch` exited 0, status ok, with no branch measured
    and only a warning naming probe.branches."""
    from bsfind.api import branch
    from bsfind.errors import EXIT_SPEC, UsageError
    from bsfind.spec import load_spec

    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(UsageError, match="single process only") as caught:
        branch(load_spec(str(ROOT / "tests" / "assets" / "good.yaml")))
    assert caught.value.exit_code == EXIT_SPEC and "without torchrun" in str(caught.value)


def test_validate_under_torchrun_says_what_recommend_runs_over_the_ranks(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """`bsfind validate` under torchrun described the single-process probe (per-example,
    the learning rate measured), not the distributed one that recommend runs there."""
    from bsfind.api import validate
    from bsfind.spec import load_spec

    spec = load_spec(str(ROOT / "tests" / "assets" / "good.yaml"))
    alone = validate(spec)
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    ranked = validate(spec)
    assert not alone.method.startswith("distributed")
    assert ranked.method == f"distributed+{alone.method}"
    assert "over the 2 ranks" in ranked.method_reason
    assert "under torchrun" in ranked.learning_rate
    assert "under torchrun" not in alone.learning_rate
