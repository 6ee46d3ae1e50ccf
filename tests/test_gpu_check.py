"""The prepared GPU check (scripts/gpu_check.sh, issue #18) in its dry run, and its parts.

The dry run does on the CPU, at tiny sizes, what the one GPU run does on CUDA, so that
run cannot fail on a stale command line, a renamed option or a summary that no longer
parses. The parts: the time box kills a hung process group, later substeps keep their
reserve, and the parsers read what pytest, the benchmark and NCCL print.

Run: .venv/bin/python -m pytest tests/test_gpu_check.py -q   (about a minute on 2 cores)
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import ROOT

sys.path.insert(0, str(ROOT / "scripts"))

import gpu_check  # noqa: E402

STEPS = {"env": "passed", "tests": "passed", "bench": "passed", "recommend": "passed",
         "nccl": "skipped"}


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[subprocess.CompletedProcess[str],
                                                                Path]:
    """One dry run for the module, as the GPU machine would see it (no scikit-learn)."""
    out = tmp_path_factory.mktemp("gpu-check")
    env = {**os.environ, "PYTHON": sys.executable}
    proc = subprocess.run(
        [str(ROOT / "scripts" / "gpu_check.sh"), "--dry-run", "--synthetic-digits", str(out)],
        capture_output=True, text=True, env=env, timeout=400, check=False)
    return proc, out


def _summary(out: Path) -> dict[str, Any]:
    return json.loads((out / "summary.json").read_text(encoding="utf-8"))


def test_dry_run_runs_every_step_on_the_cpu(
        dry_run: tuple[subprocess.CompletedProcess[str], Path]) -> None:
    proc, out = dry_run
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    files = {p.name for p in out.iterdir()}
    assert len(files) <= 8 and files <= set(gpu_check.FILES), files
    assert {"summary.txt", "summary.json", "reports.json"} <= files
    summary = _summary(out)
    assert summary["mode"] == "dry-run" and summary["seconds"] < gpu_check.BUDGET_S
    assert {s["name"]: s["status"] for s in summary["steps"]} == STEPS
    subs = {sub["name"]: sub for s in summary["steps"] for sub in s["substeps"]}
    assert subs["nccl.pair"]["reason"] == subs["nccl.bsfind"]["reason"] == "no CUDA"
    # only what needs a GPU, nvidia-smi or another branch's file did not run
    skipped = {n for n, sub in subs.items() if sub["status"] == "skipped"}
    assert skipped <= {"env.nvidia-smi", "bench.tracker", "nccl.pair", "nccl.bsfind"}
    assert all(sub["box"] is not None for n, sub in subs.items() if n not in skipped)


def test_dry_run_summary_has_a_line_per_step_and_the_key_figures(
        dry_run: tuple[subprocess.CompletedProcess[str], Path]) -> None:
    proc, out = dry_run
    text = (out / "summary.txt").read_text(encoding="utf-8")
    # printed last, so that a tool keeping only the tail of the output keeps them
    tail = proc.stdout.rstrip().splitlines()[-len(STEPS) - 1:-1]
    assert tail == [ln for ln in text.splitlines() if ln[:1].isdigit()]
    step_lines = [ln.split()[:3] for ln in text.splitlines() if ln[:1].isdigit()]
    assert step_lines == [[str(i), n, s] for i, (n, s) in enumerate(STEPS.items(), 1)]
    for words in ("B_simple->batch", "(b)/(a)", "OOM (simulated)", "h200/measured",
                  "bf16", "synthetic stand-in", "no CUDA"):
        assert words in text, words
    steps = {s["name"]: s for s in _summary(out)["steps"]}
    rec = steps["recommend"]["figures"]
    for config in gpu_check.CONFIGS:
        # 3 s of probing: a noise scale that outgrew the budget late in the walk is
        # unresolved, which the summary must show as N/A, not crash on
        b = rec[config]["b_simple"]
        assert (b is None and re.search(rf"{config}\*? N/A->", text)) or b > 0
        assert rec[config]["batch"] >= 1
        assert rec[config]["device_type"] == "cpu"
        assert rec[config]["timing"]["source"] == "measured"
    assert rec["oom"]["timing"]["largest_rung"] == gpu_check.DRY_OOM_LIMIT
    assert rec["h200"]["predicted"]["gpu"] == "h200"
    subs = {sub["name"]: sub for sub in steps["recommend"]["substeps"]}
    assert "gpu_check_factories.py:digits_like" in subs["recommend.digits-mlp"]["command"]
    assert "gpu_check_factories.py:digits_like" not in subs["recommend.text-transformer"][
        "command"]
    rows = {n for sub in steps["bench"]["substeps"] for n in sub["figures"].get("rows", {})}
    assert any(n.startswith("gpt2") and n.endswith("bf16") for n in rows), rows
    reports = json.loads((out / "reports.json").read_text(encoding="utf-8"))
    assert reports["env.bsfind-env-json"]["cuda_available"] is False
    assert reports["recommend.bf16"]["spec"]["hardware"]["precision"] == "bf16"


def test_a_hung_process_group_is_killed_at_its_box(tmp_path: Path) -> None:
    # a child that ignores SIGTERM and a grandchild that sleeps: both die at the box
    code = ("import signal, subprocess, sys, time; signal.signal(signal.SIGTERM, "
            "signal.SIG_IGN); subprocess.Popen([sys.executable, '-c', "
            "'import time; time.sleep(60)']); print('up', flush=True); time.sleep(60)")
    start = time.monotonic()
    res = gpu_check.run_boxed([sys.executable, "-c", code], box=3.0, env=dict(os.environ),
                              scratch=tmp_path, grace=1.0)
    assert res.timed_out and res.rc is not None and res.rc < 0
    assert res.stdout.strip() == "up"
    assert time.monotonic() - start < 10


def test_later_substeps_keep_their_reserve(tmp_path: Path) -> None:
    c = gpu_check.Check(tmp_path, gpu_check.GPU, dry_run=False, budget=gpu_check.BUDGET_S,
                        steps=["recommend", "nccl"], synthetic_digits=False)
    shutil.rmtree(c.scratch)  # its scratch folder, unused here (each run left one in /tmp)
    assert c.box("recommend.digits-mlp") == gpu_check.BOXES["recommend.digits-mlp"][0]
    c.budget = gpu_check.SUMMARY_S + 7 * gpu_check.RESERVE_S + 20  # 20 s for the first
    assert c.box("recommend.digits-mlp") == pytest.approx(20, abs=1)
    assert c.box("nccl.bsfind") == gpu_check.BOXES["nccl.bsfind"][0]  # the last one
    c.budget -= 15
    assert c.box("recommend.digits-mlp") is None  # under MIN_BOX_S: skipped, not started


def test_parsers() -> None:
    assert gpu_check.pytest_counts("...\n2 failed, 94 passed, 3 skipped in 12.31s\n") == {
        "failed": 2, "passed": 94, "skipped": 3}
    assert gpu_check.pytest_counts("===== 1 error, 5 deselected in 0.5s =====") == {
        "error": 1, "deselected": 5}
    killed = ("tests/noise/test_per_example.py::test_linear_2d[True] PASSED   [  1%]\n"
              "tests/noise/test_per_example.py::test_mlp FAILED                [  2%]\n"
              "tests/noise/test_per_example.py::test_cnn_groupnorm PASSED      [  3%]\n")
    assert gpu_check.pytest_counts(killed) == {"passed": 2, "failed": 1, "killed": 1}
    table = ("model        (a) ms   (b) ms   (u) ms   (c) ms  (b)/(a)  (u)/(a)  (c)/(a)\n"
             "-----\n"
             "mlp  B=4096 (64-128-128-10) bf16   1.00   1.10   1.20   9.00   1.10   1.20   9.00\n"
             "gpt2 B=8 T=1024 (768x12, V=50257)  failed: OutOfMemoryError: CUDA out of memory\n")
    rows = gpu_check.bench_rows(table)
    assert rows["mlp  B=4096 (64-128-128-10) bf16"]["b/a"] == 1.10
    assert rows["gpt2 B=8 T=1024 (768x12, V=50257)"]["error"].startswith("OutOfMemoryError")
    assert gpu_check.short_case("mlp  B=4096 (64-128-128-10) bf16") == "mlp B=4096 bf16"
    assert gpu_check.parse_json('warning: x\n{"a": {"b": 1}}\n[W] teardown\n') == {"a": {"b": 1}}
    assert gpu_check.parse_json("no json {here") is None
    line, seq, found = gpu_check.backoff(
        {"tried": [2, 8, 32, 1000, 500, 250, 375, 312], "max_batch_size": 312})
    assert line == [2, 8, 32] and seq == [1000, 500, 250, 375, 312] and found == 312


def test_nccl_pair_verdicts() -> None:
    ok = "\n".join(f'NCCL_PAIR {{"rank": {r}, "ok": true, "all_reduce": 3.0}}' for r in (0, 1))
    assert gpu_check.pair_verdict(ok)[0] == "passed"
    refused = ('NCCL_PAIR {"rank": 0, "ok": false, "error": "DistBackendError: NCCL error: '
               'invalid usage ... Duplicate GPU detected : rank 0 and rank 1 both on CUDA '
               'device 1a000"}')
    status, reason = gpu_check.pair_verdict(refused)
    assert status == "skipped" and "Duplicate GPU" in reason
    assert gpu_check.pair_verdict("torchrun: worker crashed")[0] == "failed"


# --------------------------------------------------------------------------- the GPU branches


GIB = 1 << 30


def _report(device: str = "cuda", *, tried: tuple[int, ...] = (2, 8, 32, 25_000_000),
            max_batch: int = 25_000_000, verified: bool = True, predicted: bool = False,
            distributed: bool = False) -> str:
    """A ``bsfind recommend --json`` document as an H200 run would print it."""
    doc: dict[str, Any] = {
        "status": "ok", "seconds": 12.0, "warnings": [],
        "device": {"type": device, "name": "NVIDIA H200"},
        "spec": {"hardware": {"precision": "fp32"}},
        "noise_scale": {"b_simple": 120.0, "ci95": [100.0, 150.0], "method": "per-example",
                        "b_big": 64, "examples": 4096},
        "recommendation": {"batch_size": 256, "learning_rate": 1e-3},
        "memory": {"source": "measured", "max_batch_size": max_batch, "fixed_bytes": 3 << 20,
                   "bytes_per_example": 2900.0, "limit_bytes": 70 * GIB, "verified": verified,
                   "tried": list(tried)},
        "timing": {"source": "measured", "t0": 1.2e-3, "per_example": 4e-9, "r2": 0.99,
                   "saturated_at": None, "utilization_gpu_pct": 35.0,
                   "points": [{"batch_size": b, "seconds": 1e-3, "samples": 5}
                              for b in (1, 2, 4096)]},
    }
    if predicted:
        doc["predicted"] = {
            "gpu": "h200",
            "memory": {"max_batch_size": 30_000_000, "bytes_per_example": 2400.0,
                       "fixed_bytes": 2 << 20},
            "timing": {"t0": 1e-3, "per_example": 2e-9, "r2": None, "source": "predicted"}}
    if distributed:
        doc["distributed"] = {"world_size": 1, "backend": "nccl", "sync_seconds": 2.5e-5,
                              "sync_bytes": 420_000, "timing_basis": "the slowest rank"}
    return json.dumps(doc)


GPU_OUTPUTS = {
    "env.bsfind-env-json": json.dumps({
        "torch": "2.11.0+cu130", "cuda_available": True, "nvml": True, "nvml_note": None,
        "devices": [{"type": "cpu", "name": "Xeon"},
                    {"type": "cuda", "name": "NVIDIA H200", "total_memory_bytes": 140 * GIB,
                     "free_memory_bytes": 139 * GIB, "driver_version": "580.65",
                     "sm_clock_mhz": 345, "sm_clock_max_mhz": 1980, "power_w": 80.0,
                     "power_limit_w": 700.0, "utilization_gpu_pct": 0.0}]}),
    "env.torch": json.dumps({
        "torch": "2.11.0+cu130", "cuda_build": "13.0", "cuda_available": True,
        "device_name": "NVIDIA H200", "total_memory_bytes": 140 * GIB - (200 << 20),
        "capability": "9.0", "bf16_supported": True, "cudnn": 91000, "nccl": "2.27.3",
        "python": "3.12.3", "packages": {"sklearn": False}}),
    "tests.cuda-marked": "...\n3 passed, 80 deselected in 9.10s\n",
    "tests.per-example": "F..\nFAILED tests/noise/test_per_example.py::test_mlp - assert\n"
                         "1 failed, 95 passed in 40.00s\n",
    "bench.overhead": "mlp  B=4096 (64-128-128-10)   0.50   0.60   0.70   5.00   1.20   1.40"
                      "  10.00\n",
    "bench.gpt2": "gpt2 B=8 T=1024 (768x12, V=50257) bf16  failed: OutOfMemoryError: oom\n",
    "recommend.digits-mlp": _report(),
    "recommend.digits-cnn": _report(tried=(), verified=False),  # this run must fail
    "recommend.text-transformer": _report(),
    "recommend.oom": _report(tried=(2, 8, 32, 1_000_000, 500_000, 250_000, 375_000),
                             max_batch=250_000),
    "recommend.h200": _report(predicted=True),
    "recommend.bf16": _report(),
    "nccl.pair": 'NCCL_PAIR {"rank": 0, "ok": false, "error": "DistBackendError: '
                 'Duplicate GPU detected"}\n',
    "nccl.bsfind": _report(distributed=True),
}
GPU_EXIT_CODES = {"tests.per-example": 1, "bench.gpt2": 1}  # as pytest and the bench exit


class CannedGpu(gpu_check.Check):
    """The GPU run's steps on canned outputs: the code paths a dry run cannot reach."""

    def __init__(self, out: Path) -> None:
        super().__init__(out, gpu_check.GPU, dry_run=False, budget=gpu_check.BUDGET_S,
                         steps=gpu_check.STEPS, synthetic_digits=True)
        shutil.rmtree(self.scratch)  # (in /tmp, where each run of this test left one)
        self.scratch = out.parent / "scratch"
        self.scratch.mkdir()
        self.commands: dict[str, list[str]] = {}

    def execute(self, name: str, cmd: Any, box: float,
                env: dict[str, str]) -> gpu_check.Outcome:
        self.commands[name] = [str(c) for c in cmd]
        return gpu_check.Outcome(GPU_EXIT_CODES.get(name, 0), 1.0, False,
                                 GPU_OUTPUTS.get(name, ""), "")


def test_the_gpu_run_on_canned_outputs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(gpu_check.shutil, "which", lambda name: f"/usr/bin/{name}")
    tracker = tmp_path / "tracker_overhead.py"  # a script with only these two flags
    tracker.write_text('p.add_argument("--reps")\np.add_argument("--device")\n')
    monkeypatch.setattr(gpu_check, "TRACKER_BENCH", tracker)
    out = tmp_path / "out"
    out.mkdir()
    c = CannedGpu(out)
    steps = {name: gpu_check.STEP_FUNCTIONS[name](c) for name in gpu_check.STEPS}
    c.results = list(steps.values())
    text = gpu_check.write_summary(c)
    assert c.cuda is True
    assert steps["env"].status == "passed" and "NVIDIA H200" in steps["env"].headline
    assert steps["tests"].status == "failed" and "test_mlp" in steps["tests"].headline
    assert steps["bench"].status == "failed"  # a case out of memory: a row, and exit 1
    assert "mlp B=4096 1.20" in steps["bench"].headline
    assert "gpt2 B=8 T=1024 bf16 failed" in steps["bench"].headline
    rec = {s.name: s for s in steps["recommend"].subs}
    assert rec["recommend.digits-cnn"].status == "failed"
    assert "verified" in rec["recommend.digits-cnn"].reason
    assert steps["recommend"].status == "failed"
    assert rec["recommend.oom"].status == "passed"
    assert rec["recommend.oom"].figures["backoff"]["tried"] == [1_000_000, 500_000, 250_000,
                                                                375_000]
    assert "1,000,000 OOM -> 500,000 OOM -> 250,000 ran -> 375,000 OOM" in text
    assert rec["recommend.h200"].figures["predicted_vs_measured"]["max_batch"] == [
        30_000_000, 25_000_000]
    assert "h200/measured max batch ×1.20, t(256) ×0.83" in text
    nccl = {s.name: s for s in steps["nccl"].subs}
    assert nccl["nccl.pair"].status == "skipped" and "Duplicate GPU" in nccl["nccl.pair"].reason
    assert nccl["nccl.bsfind"].status == "passed" and steps["nccl"].status == "passed"
    assert "bsfind on 1 nccl rank" in steps["nccl"].headline
    # what the GPU machine will be asked to run
    cmd = {k: " ".join(v) for k, v in c.commands.items()}
    assert "hardware.device=cuda" in cmd["recommend.digits-mlp"]
    assert "digits_like" in cmd["recommend.digits-mlp"]
    assert "hardware.memory_fraction=0.5" in cmd["recommend.digits-mlp"]
    assert "hardware.memory_fraction" not in cmd["recommend.text-transformer"]
    assert f"capped {gpu_check.OOM_CAP}" in cmd["recommend.oom"]
    assert "--gpu h200" in cmd["recommend.h200"]
    assert "--nproc_per_node 2" in cmd["nccl.pair"] and "nccl-bsfind" in cmd["nccl.bsfind"]
    assert "--device cuda" in cmd["bench.overhead"] and "--batch-scale 16" in cmd["bench.overhead"]
    assert "-m cuda" in cmd["tests.cuda-marked"]
    assert cmd["env.nvidia-smi"] == "/usr/bin/nvidia-smi"
    assert cmd["bench.tracker"].endswith("tracker_overhead.py --device cuda")
    assert len({p.name for p in out.iterdir()}) <= 8
