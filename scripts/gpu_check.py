"""One prepared GPU check of bsfind (issue #18): its CUDA paths in one command, time-boxed.

    scripts/gpu_check.sh OUTDIR                                     # the GPU machine (python3)
    PYTHON=.venv/bin/python scripts/gpu_check.sh --dry-run OUTDIR   # here: CPU, tiny sizes
    scripts/gpu_check.sh --steps recommend,nccl OUTDIR              # rerun some steps

Nothing is installed and nothing touches the network: every step runs this Python
(``$PYTHON``, default python3) on the source tree (PYTHONPATH=the repository). Each
substep is one process group, killed when its time box runs out, so a hang costs that
box and not the rest; the whole run stays within ``--budget`` seconds (480: the 8
minutes of issue #18), every later substep keeping RESERVE_S of it. At most 8 files
are written to OUTDIR (default: a new temporary folder, printed):

  summary.txt    one line per step (passed / failed / skipped, key figures), then details
  summary.json   the same as data, with every substep's command, box and exit code
  env.log tests.log bench.log recommend.log nccl.log    each step's output
  reports.json   every JSON document the commands printed, by substep

Steps:
  1 env        ``bsfind env`` (table and --json); torch, CUDA, cuDNN, NCCL; nvidia-smi
  2 tests      the cuda-marked tests; tests/noise/test_per_example*.py on
               $BSFIND_TEST_DEVICE=cuda (the fused path and bf16 autocast included)
  3 bench      benchmarks/per_example_overhead.py at GPU-sized batches (fp32 and bf16)
               and on a GPT-2-small-sized transformer (B=8, T=1024);
               benchmarks/tracker_overhead.py on cuda
  4 recommend  the three shipped configs on cuda (memory measured, then verified by
               real steps); an out-of-memory forced by capping the CUDA allocator at 2%
               of the GPU (the back-off sequence); the same large spec uncapped with
               ``--gpu h200`` (predicted beside measured); text-transformer in bf16
  5 nccl       two NCCL ranks on the one GPU (NCCL usually refuses: detected and said);
               bsfind's data-parallel runner on one NCCL rank

``--dry-run`` runs every step on the CPU at tiny sizes (tests/test_gpu_check.py does,
so the script cannot rot). Its out-of-memory is simulated by a model that raises one
above batch 32 (scripts/gpu_check_factories.py), and NCCL is skipped (no CUDA). Where
scikit-learn is missing (the GPU machine), or with ``--synthetic-digits``, the digits
configs load synthetic clusters of the digits' shape instead, and the summary says so.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
WORKER = ROOT / "scripts" / "gpu_check_worker.py"
FACTORIES = ROOT / "scripts" / "gpu_check_factories.py"
OVERHEAD_BENCH = ROOT / "benchmarks" / "per_example_overhead.py"
TRACKER_BENCH = ROOT / "benchmarks" / "tracker_overhead.py"
CONFIGS = ("digits-mlp", "digits-cnn", "text-transformer")
STEPS = ("env", "tests", "bench", "recommend", "nccl")
FILES = ("summary.txt", "summary.json", "env.log", "tests.log", "bench.log",
         "recommend.log", "reports.json", "nccl.log")

BUDGET_S = 480.0  # issue #18: the whole check within 8 minutes of the GPU machine
SUMMARY_S = 10.0  # kept back at the end for writing the summary
RESERVE_S = 15.0  # every substep still to come keeps at least this much of the budget
MIN_BOX_S = 8.0  # a substep left less than this is skipped rather than started
KILL_GRACE_S = 10.0  # SIGTERM, then this long (torchrun stops its ranks), then SIGKILL
OOM_CAP = 0.02  # share of the GPU the out-of-memory run's allocator may use (~2.8 GiB)
DRY_OOM_LIMIT = 32  # --dry-run: the simulated out-of-memory above this batch

# Time boxes in seconds per substep: (GPU, --dry-run). The GPU figures allow several
# times what each should take on an H200 (a torch import, CUDA start-up, the work).
BOXES: dict[str, tuple[float, float]] = {
    "env.bsfind-env": (45, 30), "env.bsfind-env-json": (45, 30), "env.torch": (45, 30),
    "env.nvidia-smi": (20, 20),
    "tests.cuda-marked": (90, 60), "tests.per-example": (150, 90),
    "bench.overhead": (100, 60), "bench.gpt2": (120, 60), "bench.tracker": (60, 60),
    "recommend.digits-mlp": (75, 40), "recommend.digits-cnn": (75, 40),
    "recommend.text-transformer": (75, 40), "recommend.oom": (90, 40),
    "recommend.h200": (75, 40), "recommend.bf16": (60, 40),
    "nccl.pair": (60, 30), "nccl.bsfind": (75, 40),
}


@dataclass(frozen=True)
class Sizes:
    """What each step runs at: the GPU machine's sizes, or the dry run's tiny ones."""

    device: str
    bench: tuple[str, ...]  # per_example_overhead.py, the small models
    gpt2: tuple[str, ...]  # per_example_overhead.py, the GPT-2-sized transformer
    probe: tuple[str, ...]  # spec overrides of every recommend run
    transformer: tuple[str, ...]  # ... and of the text-transformer runs
    digits: tuple[str, ...]  # ... and of the digits runs
    large: tuple[str, ...]  # the large spec (out-of-memory and h200 runs), on digits-mlp
    oom_model: tuple[str, ...]  # what turns the large spec into the out-of-memory run
    per_example: tuple[str, ...] = ()  # pytest selection of the per-example tests
    # tracker_overhead.py's options: each group is passed when the script mentions its
    # flag (a copy of the tree with an older script still runs)
    tracker: tuple[tuple[str, ...], ...] = ()
    env: tuple[tuple[str, str], ...] = ()


def _sets(*pairs: str) -> tuple[str, ...]:
    return tuple(a for p in pairs for a in ("--set", p))


LARGE_MLP = "{in_features: 256, hidden: 4096, depth: 4, classes: 10}"  # 51M parameters
# hardware.memory_fraction 0.5 where the step that verifies the largest batch is costly:
# tens of millions of digits examples (gathered on the CPU, ~10 GB) or a million-example
# step of the 51M-parameter MLP (~5 s). Should that step run out of memory, the exact
# bisection of find_max_batch takes some 20 more such steps: minutes, not seconds. The
# text-transformer runs keep the default 0.9, where that step is cheap.
HALF = _sets("hardware.memory_fraction=0.5")
GPU = Sizes(
    device="cuda",
    bench=("--device", "cuda", "--batch-scale", "16", "--precision", "fp32", "bf16",
           "--models", "mlp", "cnn", "cnn32", "transformer", "--reps", "20"),
    gpt2=("--device", "cuda", "--models", "gpt2", "--precision", "fp32", "bf16",
          "--reps", "10"),
    # the budget counts from the command's start: importing torch and CUDA's start too
    probe=_sets("hardware.device=cuda", "probe.max_seconds=35"),
    transformer=(),
    digits=HALF,
    # the noise scale is not the point of these two runs: leave time for the hardware
    large=_sets(f"model.kwargs={LARGE_MLP}", "data.factory=bsfind.data:synthetic",
                "data.kwargs={n: 8192, features: 256, classes: 10}",
                "optimizer.batch_size=256", "probe.target_rel_error=0.3") + HALF,
    oom_model=(),
    tracker=(("--device", "cuda"),),
)
DRY = Sizes(
    device="cpu",
    bench=("--device", "cpu", "--models", "mlp", "--precision", "fp32", "bf16",
           "--reps", "1", "--threads", "1"),
    gpt2=("--device", "cpu", "--models", "gpt2", "--precision", "fp32", "bf16",
          "--reps", "1", "--threads", "1", "--gpt2-batch", "2", "--gpt2-context", "16",
          "--gpt2-d-model", "32", "--gpt2-heads", "2", "--gpt2-layers", "1",
          "--gpt2-vocab", "128"),
    probe=_sets("hardware.device=cpu", "probe.max_seconds=7", "probe.target_rel_error=0.5"),
    transformer=_sets("data.kwargs.max_chars=20000", "data.kwargs.context=32",
                      "model.kwargs.context=32"),
    digits=(),
    large=_sets("model.kwargs={in_features: 32, hidden: 64, depth: 2, classes: 10}",
                "data.factory=bsfind.data:synthetic",
                "data.kwargs={n: 1024, features: 32, classes: 10}",
                "optimizer.batch_size=64"),
    oom_model=_sets(f"model.factory={FACTORIES}:mlp_oom_above",
                    f"model.kwargs={{limit: {DRY_OOM_LIMIT}, in_features: 32, hidden: 64, "
                    "depth: 2, classes: 10}"),
    # the suite runs them all on the CPU anyway: here only the plumbing and a few
    per_example=("-k", "autocast or double_backward or test_mlp or chunked"),
    tracker=(("--device", "cpu"), ("--models", "mlp"), ("--reps", "1"), ("--threads", "1")),
    env=(("OMP_NUM_THREADS", "1"),),  # 2 shared cores: no oversubscription
)


# --------------------------------------------------------------------------- results


@dataclass
class Sub:
    """One substep: a command in its time box (or a reason it did not run)."""

    name: str
    status: str  # passed | failed | skipped
    reason: str = ""
    seconds: float = 0.0
    box: float | None = None
    command: str = ""
    rc: int | None = None
    detail: str = ""  # its figures in words, for the summary's figures section
    figures: dict[str, Any] = field(default_factory=dict)


@dataclass
class Step:
    number: int
    name: str
    status: str = "skipped"
    headline: str = ""
    seconds: float = 0.0
    figures: dict[str, Any] = field(default_factory=dict)
    subs: list[Sub] = field(default_factory=list)

    def settle(self, headline: str, failure: str | None = None) -> None:
        """Status from the substeps (any failed: failed; all skipped: skipped)."""
        self.headline = headline
        states = {s.status for s in self.subs}
        if failure or "failed" in states:
            self.status = "failed"
            if failure:
                self.headline = f"{failure}; {headline}" if headline else failure
        elif states and states <= {"skipped"}:
            self.status = "skipped"
        else:
            self.status = "passed"


@dataclass
class Outcome:
    rc: int | None
    seconds: float
    timed_out: bool
    stdout: str
    stderr: str


class Stop(Exception):
    """SIGTERM or Ctrl-C: stop after killing the running substep, keep what was measured."""


# --------------------------------------------------------------------------- running


def kill_group(proc: subprocess.Popen[bytes], grace: float = KILL_GRACE_S) -> None:
    """SIGTERM to the substep's process group, SIGKILL after ``grace`` seconds."""
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def run_boxed(cmd: Sequence[str], box: float, env: dict[str, str], scratch: Path,
              grace: float = KILL_GRACE_S) -> Outcome:
    """Run ``cmd`` in its own process group; kill the group once ``box`` seconds pass
    (SIGTERM ``grace`` seconds before the end of the box, SIGKILL at its end).

    Output goes through files, not pipes: a grandchild that outlives the kill (a
    torchrun rank in its own session) cannot block the read.
    """
    # files of their own: an orphan of a killed substep must not write into the next one's
    fd, out_name = tempfile.mkstemp(prefix="stdout-", dir=scratch)
    os.close(fd)
    out_path = Path(out_name)
    err_path = out_path.with_name(out_path.name.replace("stdout-", "stderr-"))
    start = time.monotonic()
    with open(out_path, "wb") as out, open(err_path, "wb") as err:
        proc = subprocess.Popen(list(cmd), cwd=ROOT, env=env, stdout=out, stderr=err,
                                stdin=subprocess.DEVNULL, start_new_session=True)
        timed_out = False
        try:
            proc.wait(timeout=max(1.0, box - grace))
        except subprocess.TimeoutExpired:
            timed_out = True
            kill_group(proc, grace)
        except BaseException:
            kill_group(proc, grace=2.0)
            raise
    return Outcome(proc.returncode, time.monotonic() - start, timed_out, read_text(out_path),
                   read_text(err_path))


def read_text(path: Path) -> str:
    return path.read_bytes().decode("utf-8", "replace")


class Check:
    """The run: budget, logs, reports and the environment every substep gets."""

    def __init__(self, out: Path, sizes: Sizes, dry_run: bool, budget: float,
                 steps: Sequence[str], synthetic_digits: bool) -> None:
        self.out, self.sizes, self.dry_run, self.budget = out, sizes, dry_run, budget
        self.py = sys.executable
        self.start = time.monotonic()
        self.steps = list(steps)
        self.plan = [k for k in BOXES if k.split(".")[0] in self.steps]
        self.scratch = Path(tempfile.mkdtemp(prefix="bsfind-gpu-check-"))
        self.synthetic_digits = synthetic_digits
        self.cuda: bool | None = None  # known after the env step
        self.reports: dict[str, Any] = {}
        self.results: list[Step] = []
        self.env = dict(os.environ)
        path = os.environ.get("PYTHONPATH")
        self.env.update(
            PYTHONPATH=str(ROOT) + (os.pathsep + path if path else ""),
            PYTHONUNBUFFERED="1", PYTHONDONTWRITEBYTECODE="1", MPLBACKEND="Agg",
            BSFIND_CACHE_DIR=str(self.scratch / "cache"), BSFIND_TEST_DEVICE=sizes.device,
            HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",  # no network on the GPU machine
        )
        self.env.update(dict(sizes.env))

    def left(self) -> float:
        return self.budget - (time.monotonic() - self.start)

    def box(self, name: str) -> float | None:
        """This substep's box: its own, cut so that every later one keeps RESERVE_S."""
        later = len(self.plan) - self.plan.index(name) - 1
        avail = self.left() - SUMMARY_S - RESERVE_S * later
        box = min(BOXES[name][1 if self.dry_run else 0], avail)
        return box if box >= MIN_BOX_S else None

    def execute(self, name: str, cmd: Sequence[str], box: float,
                env: dict[str, str]) -> Outcome:
        """Run substep ``name``'s command in its box (tests replace this with canned
        outcomes)."""
        return run_boxed(cmd, box, env, self.scratch)

    def log(self, step: str, text: str) -> None:
        with open(self.out / f"{step}.log", "a", encoding="utf-8") as fh:
            fh.write(text)

    def run(self, name: str, cmd: Sequence[str], *, json_out: bool = False,
            env: dict[str, str] | None = None) -> tuple[Sub, Outcome | None]:
        """One substep: run, log, and (``json_out``) keep its stdout as a report."""
        step = name.split(".")[0]
        shown = " ".join(shlex.quote(str(c)) for c in cmd).replace(str(ROOT) + "/", "")
        box = self.box(name)
        if box is None:
            sub = Sub(name, "skipped", f"out of time ({self.left():.0f} s of the budget left)",
                      command=shown)
            self.log(step, f"\n=== {name}: skipped, {sub.reason}\n$ {shown}\n")
            return sub, None
        print(f"gpu_check: {name} (box {box:.0f} s) ...", flush=True)
        self.log(step, f"\n=== {name} (box {box:.0f} s)\n$ {shown}\n")
        res = self.execute(name, cmd, box, {**self.env, **(env or {})})
        if not json_out:
            self.log(step, res.stdout)
        if res.stderr:
            self.log(step, ("--- stderr\n" if not json_out else "") + res.stderr)
        end = "timed out, killed" if res.timed_out else f"exit {res.rc}"
        self.log(step, f"--- {end} after {res.seconds:.1f} s\n")
        sub = Sub(name, "passed", seconds=round(res.seconds, 1), box=round(box),
                  command=shown, rc=res.rc)
        if res.timed_out:
            sub.status, sub.reason = "failed", f"timed out after {box:.0f} s (killed)"
        elif res.rc != 0:
            sub.status, sub.reason = "failed", f"exit {res.rc}: {last_line(res.stderr)}"
        if json_out:
            doc = parse_json(res.stdout)
            self.reports[name] = doc if doc is not None else {"stdout": res.stdout[-4000:]}
            if doc is None and sub.status == "passed":
                sub.status, sub.reason = "failed", "no JSON document on stdout"
            write_json(self.out / "reports.json", self.reports)
        print(f"gpu_check: {name}: {sub.status}" + (f" ({sub.reason})" if sub.reason else "")
              + f", {res.seconds:.0f} s", flush=True)
        return sub, res


# --------------------------------------------------------------------------- helpers


def last_line(text: str) -> str:
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    return lines[-1][:300] if lines else ""


def parse_json(text: str) -> Any | None:
    """The first JSON object in ``text`` (a command's stdout, maybe with lines around it);
    None when there is none."""
    decoder = json.JSONDecoder()
    start = text.find("{")
    while start >= 0:
        try:
            return decoder.raw_decode(text, start)[0]
        except json.JSONDecodeError:
            start = text.find("{", start + 1)
    return None


def finite(obj: Any) -> Any:
    """NaN and infinities as None, so the JSON is strict."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite(v) for v in obj]
    return obj


def write_json(path: Path, obj: Any) -> None:
    """Write atomically, through a hidden file beside ``path``."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(finite(obj), indent=2, allow_nan=False) + "\n", encoding="utf-8")
    tmp.replace(path)


def fmt_bytes(n: float | None) -> str:
    if n is None:
        return "N/A"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def fmt_s(s: float | None) -> str:
    if s is None:
        return "N/A"
    if s < 1e-6:
        return f"{s * 1e9:.3g} ns"
    if s < 1e-3:
        return f"{s * 1e6:.3g} µs"
    return f"{s * 1e3:.3g} ms" if s < 1 else f"{s:.2f} s"


def fmt_n(v: float | None) -> str:
    if v is None:
        return "N/A"
    return f"{v:,.0f}" if abs(v) >= 100 else f"{v:.3g}"


def ratio(a: float | None, b: float | None) -> str:
    return f"×{a / b:.2f}" if a is not None and b else "×N/A"


# --------------------------------------------------------------------------- parsers

PYTEST_COUNT = re.compile(r"(\d+) (passed|failed|skipped|errors?|deselected|xfailed|xpassed)")


PYTEST_VERBOSE = re.compile(r"^\S+::\S.*? (PASSED|FAILED|SKIPPED|ERROR|XFAIL|XPASS)\b")


def pytest_counts(output: str) -> dict[str, int]:
    """{'passed': 96, 'skipped': 3, ...} from pytest's last summary line; without one (a
    run killed at its box), counted from the verbose per-test lines, with 'killed': 1."""
    for line in reversed(output.strip().splitlines()):
        found = PYTEST_COUNT.findall(line)
        if found and (" in " in line or line.startswith("=")):
            return {k.rstrip("s") if k.startswith("error") else k: int(n) for n, k in found}
    counts: dict[str, int] = {}
    for line in output.splitlines():
        m = PYTEST_VERBOSE.match(line)
        if m:
            key = m[1].lower()
            counts[key] = counts.get(key, 0) + 1
    return {**counts, "killed": 1} if counts else {}


def pytest_failures(output: str, limit: int = 5) -> list[str]:
    names = [ln.split(" ", 1)[1].split(" - ")[0] for ln in output.splitlines()
             if ln.startswith(("FAILED ", "ERROR "))]
    return names[:limit]


BENCH_ROW = re.compile(r"^(?P<name>\S.*?)\s+(?P<nums>(?:-?\d+\.\d+\s+){6}-?\d+\.\d+)\s*$")
BENCH_FAIL = re.compile(r"^(?P<name>\S.*?)\s+failed: (?P<error>.*)$")
BENCH_COLS = ("a_ms", "b_ms", "u_ms", "c_ms", "b/a", "u/a", "c/a")


def bench_rows(output: str) -> dict[str, dict[str, Any]]:
    """The overhead table's rows, by model name; a failed case as {'error': ...}."""
    rows: dict[str, dict[str, Any]] = {}
    for line in output.splitlines():
        m = BENCH_ROW.match(line)
        if m and not line.startswith("model"):
            rows[m["name"]] = dict(zip(BENCH_COLS, map(float, m["nums"].split()), strict=True))
            continue
        f = BENCH_FAIL.match(line)
        if f:
            rows[f["name"]] = {"error": f["error"]}
    return rows


def report_figures(doc: dict[str, Any]) -> dict[str, Any]:
    """The figures of a ``bsfind recommend --json`` document the summary shows."""
    ns = doc.get("noise_scale") or {}
    rec = doc.get("recommendation") or {}
    mem = doc.get("memory") or {}
    tim = doc.get("timing") or {}
    pred = doc.get("predicted") or {}
    points = tim.get("points") or []
    return {
        "status": doc.get("status"), "device": (doc.get("device") or {}).get("name"),
        "device_type": (doc.get("device") or {}).get("type"),
        "b_simple": ns.get("b_simple"), "ci95": ns.get("ci95"), "method": ns.get("method"),
        "b_big": ns.get("b_big"), "examples": ns.get("examples"),
        "batch": rec.get("batch_size"), "lr": rec.get("learning_rate"),
        "memory": {k: mem.get(k) for k in ("source", "max_batch_size", "fixed_bytes",
                                           "bytes_per_example", "limit_bytes", "verified",
                                           "tried")},
        "timing": {k: tim.get(k) for k in ("source", "t0", "per_example", "r2",
                                           "saturated_at", "utilization_gpu_pct")}
        | {"largest_rung": max((p["batch_size"] for p in points), default=None)},
        "predicted": {"gpu": pred.get("gpu"), "memory": pred.get("memory"),
                      "timing": pred.get("timing")} if pred else None,
        "seconds": doc.get("seconds"), "warnings": doc.get("warnings") or [],
    }


def backoff(memory: dict[str, Any]) -> tuple[list[int], list[int], int | None]:
    """(memory-line sizes, back-off sizes, the batch found) from a verified memory model.

    find_max_batch starts at the predicted maximum, the largest size it tries; every size
    after the measured line's (2, 8, 32) is a real step: above the answer out of memory,
    at or below it run.
    """
    tried = [int(b) for b in memory.get("tried") or []]
    if not tried:
        return [], [], memory.get("max_batch_size")
    top = tried.index(max(tried))
    return tried[:top], tried[top:], memory.get("max_batch_size")


def t_at(timing: dict[str, Any] | None, b: int | None) -> float | None:
    if not timing or b is None or timing.get("t0") is None or timing.get("per_example") is None:
        return None
    return float(timing["t0"]) + float(timing["per_example"]) * b


# --------------------------------------------------------------------------- 1 env


def step_env(c: Check) -> Step:
    """``bsfind env`` as users see it and as JSON; torch's CUDA details; nvidia-smi."""
    st = Step(1, "env")
    bsfind = [c.py, "-m", "bsfind", "env"]
    st.subs.append(c.run("env.bsfind-env", bsfind)[0])
    st.subs.append(c.run("env.bsfind-env-json", [*bsfind, "--json"], json_out=True)[0])
    st.subs.append(c.run("env.torch", [c.py, str(WORKER), "torch-info"], json_out=True)[0])
    smi = shutil.which("nvidia-smi")
    st.subs.append(c.run("env.nvidia-smi", [smi])[0] if smi else
                   Sub("env.nvidia-smi", "skipped", "no nvidia-smi on PATH"))
    env = c.reports.get("env.bsfind-env-json") or {}
    info = c.reports.get("env.torch") or {}
    c.cuda = bool(info.get("cuda_available", env.get("cuda_available", False)))
    gpu = next((d for d in env.get("devices") or [] if d.get("type") == "cuda"), {})
    st.figures = {"bsfind_env": env, "torch": info}
    head = (f"torch {info.get('torch') or env.get('torch')}, "
            f"CUDA {info.get('cuda_build') or 'none'}")
    failure = None
    if c.cuda:
        total, nvml_total = info.get("total_memory_bytes"), gpu.get("total_memory_bytes")
        head += (f", {info.get('device_name')} {fmt_bytes(total)}, driver "
                 f"{gpu.get('driver_version')}, NVML {'yes' if env.get('nvml') else 'no'}, "
                 f"bf16 {'yes' if info.get('bf16_supported') is True else 'no'}")
        st.subs[1].detail = (
            f"NVML: {gpu.get('name')}, {fmt_bytes(nvml_total)} total, "
            f"{fmt_bytes(gpu.get('free_memory_bytes'))} free, utilisation "
            f"{gpu.get('utilization_gpu_pct')}%, SM clock {gpu.get('sm_clock_mhz')}/"
            f"{gpu.get('sm_clock_max_mhz')} MHz, power {gpu.get('power_w')}/"
            f"{gpu.get('power_limit_w')} W, PCIe tx/rx {gpu.get('pcie_tx_kbps')}/"
            f"{gpu.get('pcie_rx_kbps')} KB/s")
        st.subs[2].detail = (
            f"torch: sm {info.get('capability')}, cuDNN {info.get('cudnn')}, NCCL "
            f"{info.get('nccl')}, fp32 matmul {info.get('matmul_fp32')}, flash SDPA "
            f"{info.get('flash_sdp')}, {info.get('device_count')} device(s)")
        if not env.get("nvml") or nvml_total is None:
            failure = f"NVML gave no readings ({env.get('nvml_note') or gpu.get('note')})"
        elif total and abs(nvml_total - total) > 0.05 * total:
            failure = "NVML and torch disagree on the GPU's memory by more than 5%"
    else:
        head += f", no CUDA, NVML: {env.get('nvml_note') or env.get('nvml')}"
        if not c.dry_run and (env or info):
            failure = "CUDA is not available (on a machine without a GPU, use --dry-run)"
    head += f", python {info.get('python')}"
    if (info.get("packages") or {}).get("sklearn") is False or c.synthetic_digits:
        head += ", no scikit-learn (digits configs: synthetic stand-ins)"
    st.settle(head, failure)
    return st


# --------------------------------------------------------------------------- 2 tests


def step_tests(c: Check) -> Step:
    """The cuda-marked tests, and the per-example tests on $BSFIND_TEST_DEVICE."""
    st = Step(2, "tests")
    tests = ROOT / "tests"
    marked = sorted(str(p.relative_to(ROOT)) for p in tests.rglob("test_*.py")
                    if "mark.cuda" in p.read_text(encoding="utf-8", errors="replace"))
    per_example = sorted(str(p.relative_to(ROOT))
                         for p in (tests / "noise").glob("test_per_example*.py"))
    # -v twice against the -q of pyproject's addopts: a line per test, so that a run killed
    # at its box still shows what ran (pytest_counts reads those lines then)
    pytest = [c.py, "-m", "pytest", "-p", "no:cacheprovider", "-v", "-v", "-rfEs",
              "--tb=short"]
    parts = []
    for name, args, label in (
        ("tests.cuda-marked", ["-m", "cuda", *marked], "cuda-marked"),
        ("tests.per-example", [*c.sizes.per_example, *per_example],
         f"per-example on {c.sizes.device}"),
    ):
        sub, res = c.run(name, [*pytest, *args])
        if res is not None:
            counts = pytest_counts(res.stdout)
            sub.figures = {"counts": counts, "failures": pytest_failures(res.stdout)}
            text = ", ".join(f"{n} {k}" for k, n in counts.items()) or "no pytest summary"
            if sub.figures["failures"]:
                text += f" ({', '.join(sub.figures['failures'])})"
            if name == "tests.cuda-marked" and counts.get("skipped"):
                if c.cuda:
                    sub.status, sub.reason = "failed", "cuda-marked tests were skipped"
                else:
                    text += " (no CUDA: dry run)"
            if sub.status == "failed" and not sub.reason.startswith("timed out"):
                sub.reason = text
            sub.detail = f"{label}: {text}"
            parts.append(sub.detail)
        else:
            parts.append(f"{label}: {sub.reason}")
        st.subs.append(sub)
    st.figures = {s.name: s.figures for s in st.subs}
    st.settle("; ".join(parts))
    return st


# --------------------------------------------------------------------------- 3 bench


def short_case(name: str) -> str:
    """'mlp  B=4096 (64-128-128-10) bf16' -> 'mlp B=4096 bf16'."""
    base = " ".join(name.split(" (")[0].split())
    return base + (" bf16" if name.endswith(" bf16") else "")


def step_bench(c: Check) -> Step:
    """The per-example overhead at GPU-sized batches and on a GPT-2-sized transformer."""
    st = Step(3, "bench")
    parts = []
    for name, args in (("bench.overhead", c.sizes.bench), ("bench.gpt2", c.sizes.gpt2)):
        sub, res = c.run(name, [c.py, str(OVERHEAD_BENCH), *args])
        if res is not None:
            rows = bench_rows(res.stdout)
            sub.figures = {"rows": rows}
            rates = re.search(r"conv kernel (\d+) GFLOP/s, batched GEMM \(torch.bmm\) (\d+)",
                              res.stdout)
            if rates:
                sub.figures["conv_bmm_gflops"] = [int(rates[1]), int(rates[2])]
            if not rows and sub.status == "passed":
                sub.status, sub.reason = "failed", "no table rows in the output"
            parts += [f"{short_case(n)} " + (f"{r['b/a']:.2f}" if "error" not in r
                                             else "failed") for n, r in rows.items()]
            sub.detail = "; ".join(
                f"{n}: " + (f"(a) {r['a_ms']:.2f} ms, (b)/(a) {r['b/a']:.2f}, (u)/(a) "
                            f"{r['u/a']:.2f}, (c)/(a) {r['c/a']:.2f}" if "error" not in r
                            else f"failed: {r['error']}") for n, r in rows.items())
        else:
            parts.append(f"{name}: {sub.reason}")
        st.subs.append(sub)
    if TRACKER_BENCH.is_file():
        text = TRACKER_BENCH.read_text(encoding="utf-8", errors="replace")
        args = [a for group in c.sizes.tracker if f'"{group[0]}"' in text for a in group]
        sub, res = c.run("bench.tracker", [c.py, str(TRACKER_BENCH), *args])
        where = "" if "--device" in args else " (on the CPU: the script has no --device)"
        tail = [ln.strip() for ln in (res.stdout if res else "").splitlines() if ln.strip()]
        sub.detail = f"tracker_overhead{where}: " + (" | ".join(tail[-6:]) or sub.reason)
        parts.append(f"tracker_overhead {sub.status}")
    else:
        sub = Sub("bench.tracker", "skipped",
                  "benchmarks/tracker_overhead.py is not on this branch")
        parts.append("tracker_overhead skipped (not on this branch)")
    st.subs.append(sub)
    st.figures = {s.name: s.figures for s in st.subs}
    st.settle("(b)/(a) " + ", ".join(parts))
    return st


# --------------------------------------------------------------------------- 4 recommend


def digits_fallback(c: Check, config: Path) -> list[str]:
    """Overrides that replace ``bsfind.data:digits`` when scikit-learn is missing."""
    import importlib.util

    import yaml

    data = (yaml.safe_load(config.read_text(encoding="utf-8")) or {}).get("data") or {}
    if data.get("factory") != "bsfind.data:digits":
        return []
    if c.synthetic_digits or importlib.util.find_spec("sklearn") is None:
        return ["--set", f"data.factory={FACTORIES}:digits_like"]
    return []


def check_measured(c: Check, sub: Sub, f: dict[str, Any]) -> None:
    """A recommend run must have run on the check's device, with memory and step times
    measured there (CUDA: the memory line verified by real steps)."""
    problems = []
    if f["device_type"] != c.sizes.device:
        problems.append(f"ran on {f['device_type']}, not {c.sizes.device}")
    if c.sizes.device == "cuda" and not (f["memory"].get("source") == "measured"
                                         and f["memory"].get("verified")):
        problems.append("memory not measured and verified on the GPU")
    if f["timing"].get("source") != "measured":
        problems.append("no measured step times")
    if problems and sub.status == "passed":
        sub.status, sub.reason = "failed", "; ".join(problems)


def describe_config(c: Check, sub: Sub, f: dict[str, Any], name: str) -> str:
    check_measured(c, sub, f)
    mem, tim = f["memory"], f["timing"]
    lo, hi = (f.get("ci95") or [None, None])[:2]
    line, seq, _ = backoff(mem)
    sub.detail = (
        f"{name}: B_simple {fmt_n(f['b_simple'])} [{fmt_n(lo)}, {fmt_n(hi)}] ({f['method']}, "
        f"{fmt_n(f['examples'])} examples) -> batch {f['batch']}, lr {fmt_n(f['lr'])}; memory "
        f"({mem.get('source')}{', verified' if mem.get('verified') else ''}) "
        f"{fmt_bytes(mem.get('fixed_bytes'))} + {fmt_bytes(mem.get('bytes_per_example'))}/"
        f"example, max batch {fmt_n(mem.get('max_batch_size'))}"
        + (f" (tried {', '.join(f'{b:,}' for b in seq)})" if seq else "")
        + f"; t(B) = {fmt_s(tim.get('t0'))} + {fmt_s(tim.get('per_example'))}·B (R² "
        f"{fmt_n(tim.get('r2'))}, rungs to {tim.get('largest_rung')}, "
        + (f"saturated at {tim['saturated_at']}" if tim.get("saturated_at") else
           "not saturated")
        + (f", GPU utilisation {tim['utilization_gpu_pct']:.0f}%"
           if tim.get("utilization_gpu_pct") is not None else "") + ")")
    return f"{name} {fmt_n(f['b_simple'])}->{f['batch']}"


def describe_oom(c: Check, sub: Sub, f: dict[str, Any]) -> str:
    """The back-off the out-of-memory run went through (simulated in the dry run)."""
    if c.sizes.device == "cuda":
        line, seq, found = backoff(f["memory"])
        sub.figures["backoff"] = {"memory_line_sizes": line, "tried": seq, "found": found}
        marks = " -> ".join(f"{b:,}{' OOM' if found is not None and b > found else ' ran'}"
                            for b in seq)
        if len(seq) < 2 and sub.status == "passed":
            sub.status, sub.reason = "failed", "no out-of-memory: the cap did not bite"
        sub.detail = (f"OOM with the CUDA allocator capped at {OOM_CAP:g} of the GPU: memory "
                      f"line at {line}, then {marks}; max batch {fmt_n(found)}")
        return f"OOM back-off {' -> '.join(f'{b:,}' for b in seq)} = {fmt_n(found)}"
    rung = f["timing"].get("largest_rung")
    if rung != DRY_OOM_LIMIT and sub.status == "passed":
        sub.status, sub.reason = "failed", f"timing ladder reached {rung}, not {DRY_OOM_LIMIT}"
    sub.detail = (f"OOM simulated above batch {DRY_OOM_LIMIT} (CPU: no verification steps): "
                  f"timing ladder stopped at {rung}, noise probe's big batch {f.get('b_big')}")
    return f"OOM (simulated) ladder stopped at {rung}"


def describe_prediction(sub: Sub, f: dict[str, Any], batch: int) -> str:
    """Predicted (--gpu h200) beside measured memory and step time, as ratios pred/meas."""
    pred = f.get("predicted") or {}
    pm, pt = pred.get("memory") or {}, pred.get("timing") or {}
    mm, mt = f["memory"], f["timing"]
    if not pm or not pt:
        if sub.status == "passed":
            sub.status, sub.reason = "failed", "no predicted memory or timing in the report"
        return "h200 prediction missing"
    pairs = {
        "max_batch": (pm.get("max_batch_size"), mm.get("max_batch_size")),
        "bytes_per_example": (pm.get("bytes_per_example"), mm.get("bytes_per_example")),
        "fixed_bytes": (pm.get("fixed_bytes"), mm.get("fixed_bytes")),
        "t0": (pt.get("t0"), mt.get("t0")),
        "per_example": (pt.get("per_example"), mt.get("per_example")),
        f"t({batch})": (t_at(pt, batch), t_at(mt, batch)),
    }
    sub.figures["predicted_vs_measured"] = {k: list(v) for k, v in pairs.items()}
    sub.detail = (
        f"{pred.get('gpu')} predicted vs {mm.get('source')} on {f['device']}: max batch "
        f"{fmt_n(pairs['max_batch'][0])} vs {fmt_n(pairs['max_batch'][1])} "
        f"({ratio(*pairs['max_batch'])}); bytes/example {fmt_bytes(pairs['bytes_per_example'][0])}"
        f" vs {fmt_bytes(pairs['bytes_per_example'][1])}; fixed "
        f"{fmt_bytes(pairs['fixed_bytes'][0])} vs {fmt_bytes(pairs['fixed_bytes'][1])}; t0 "
        f"{fmt_s(pairs['t0'][0])} vs {fmt_s(pairs['t0'][1])}; per example "
        f"{fmt_s(pairs['per_example'][0])} vs {fmt_s(pairs['per_example'][1])}; t({batch}) "
        f"{fmt_s(pairs[f't({batch})'][0])} vs {fmt_s(pairs[f't({batch})'][1])} "
        f"({ratio(*pairs[f't({batch})'])})")
    return (f"{pred.get('gpu')}/measured max batch {ratio(*pairs['max_batch'])}, "
            f"t({batch}) {ratio(*pairs[f't({batch})'])}")


def describe_bf16(sub: Sub, f: dict[str, Any], fp32: dict[str, Any]) -> str:
    tim, ref = f["timing"], fp32.get("timing") or {}
    sub.detail = (f"bf16 text-transformer: B_simple {fmt_n(f['b_simple'])} (fp32 "
                  f"{fmt_n(fp32.get('b_simple'))}) -> batch {f['batch']}; t(B) = "
                  f"{fmt_s(tim.get('t0'))} + {fmt_s(tim.get('per_example'))}·B (fp32 "
                  f"{fmt_s(ref.get('t0'))} + {fmt_s(ref.get('per_example'))}·B); memory "
                  f"{fmt_bytes(f['memory'].get('bytes_per_example'))}/example (fp32 "
                  f"{fmt_bytes((fp32.get('memory') or {}).get('bytes_per_example'))})")
    return f"bf16 {fmt_n(f['b_simple'])}->{f['batch']}"


def step_recommend(c: Check) -> Step:
    """The shipped configs; a forced out-of-memory; --gpu h200 beside measurement; bf16."""
    st = Step(4, "recommend")
    bsfind = [c.py, "-m", "bsfind", "recommend"]
    parts: list[str] = []

    def one(name: str, cmd: list[str], describe: Callable[[Sub, dict[str, Any]], str]) -> None:
        sub, _ = c.run(f"recommend.{name}", cmd, json_out=True)
        doc = c.reports.get(sub.name)
        if sub.status != "skipped" and isinstance(doc, dict) and "noise_scale" in doc:
            sub.figures = report_figures(doc)
            st.figures[name] = sub.figures
            parts.append(describe(sub, sub.figures))
        else:
            parts.append(f"{name} {sub.status}")
        st.subs.append(sub)

    synthetic = []
    for config in CONFIGS:
        fallback = digits_fallback(c, ROOT / "configs" / f"{config}.yaml")
        synthetic += [config] if fallback else []
        extra = c.sizes.transformer if config == "text-transformer" else c.sizes.digits
        label = config + ("*" if fallback else "")
        one(config, [*bsfind, f"configs/{config}.yaml", "--json", *c.sizes.probe, *extra,
                     *fallback], lambda sub, f, n=label: describe_config(c, sub, f, n))
    large = ["configs/digits-mlp.yaml", "--json", *c.sizes.probe, *c.sizes.large]
    one("oom", [c.py, str(WORKER), "capped", str(OOM_CAP), "recommend", *large,
                *c.sizes.oom_model], lambda sub, f: describe_oom(c, sub, f))
    baseline = int(next(a.split("=")[1] for a in c.sizes.large if "batch_size=" in a))
    one("h200", [*bsfind, *large, "--gpu", "h200"],
        lambda sub, f: describe_prediction(sub, f, baseline))
    fp32 = st.figures.get("text-transformer") or {}
    one("bf16", [*bsfind, "configs/text-transformer.yaml", "--json", *c.sizes.probe,
                 *c.sizes.transformer, "--set", "hardware.precision=bf16"],
        lambda sub, f: describe_bf16(sub, f, fp32))
    note = (f" (* {', '.join(synthetic)}: synthetic stand-in for the digits, no scikit-learn)"
            if synthetic else "")
    st.settle("B_simple->batch: " + "; ".join(parts) + note)
    return st


# --------------------------------------------------------------------------- 5 nccl


def pair_verdict(output: str) -> tuple[str, str]:
    """(status, what happened) from the nccl-pair ranks' tagged lines and NCCL's log."""
    ranks = [json.loads(ln.split(" ", 1)[1]) for ln in output.splitlines()
             if ln.startswith("NCCL_PAIR ")]
    if len(ranks) >= 2 and all(r.get("ok") for r in ranks):
        return "passed", (f"two NCCL ranks shared cuda:0 (all-reduce gave "
                          f"{ranks[0].get('all_reduce')})")
    errors = " | ".join(r.get("error", "") for r in ranks if not r.get("ok"))
    if "Duplicate GPU" in output or "Duplicate GPU" in errors:
        return "skipped", "refused by NCCL (\"Duplicate GPU detected\"): one rank per GPU"
    if errors:
        return "failed", f"two ranks on cuda:0 failed: {errors[:300]}"
    return "failed", f"no result from the ranks: {last_line(output)}"


def step_nccl(c: Check) -> Step:
    """Two NCCL ranks on one GPU if NCCL allows it; bsfind's runner on one NCCL rank."""
    st = Step(5, "nccl")
    if not c.cuda:
        st.subs = [Sub("nccl.pair", "skipped", "no CUDA"),
                   Sub("nccl.bsfind", "skipped", "no CUDA")]
        st.settle("no CUDA")
        return st
    run = [c.py, "-m", "torch.distributed.run", "--standalone"]
    sub, res = c.run("nccl.pair", [*run, "--nproc_per_node", "2", str(WORKER), "nccl-pair"],
                     env={"NCCL_DEBUG": "WARN"})
    if res is not None and not res.timed_out:
        sub.status, sub.reason = pair_verdict(res.stdout + res.stderr)
    sub.detail = f"two NCCL ranks on cuda:0: {sub.reason or sub.status}"
    parts = [f"2 ranks on one GPU: {sub.reason or sub.status}"]
    st.subs.append(sub)
    spec = ["configs/text-transformer.yaml", *c.sizes.probe, *c.sizes.transformer]
    sub, _ = c.run("nccl.bsfind", [*run, "--nproc_per_node", "1", str(WORKER), "nccl-bsfind",
                                   *spec], json_out=True)
    doc = c.reports.get("nccl.bsfind") or {}
    dist = doc.get("distributed") or {}
    if sub.status == "passed" and dist.get("backend") != "nccl":
        sub.status, sub.reason = "failed", f"backend {dist.get('backend')}, not nccl"
    if dist:
        local = (c.reports.get("recommend.text-transformer") or {}).get("noise_scale") or {}
        sub.figures = {"backend": dist.get("backend"), "sync_seconds": dist.get("sync_seconds"),
                       "sync_bytes": dist.get("sync_bytes"),
                       "b_simple": (doc.get("noise_scale") or {}).get("b_simple"),
                       "b_simple_local": local.get("b_simple")}
        sub.detail = (f"bsfind's data-parallel runner on 1 {dist.get('backend')} rank: "
                      f"all-reduce of {fmt_bytes(dist.get('sync_bytes'))} in "
                      f"{fmt_s(dist.get('sync_seconds'))}, B_simple "
                      f"{fmt_n(sub.figures['b_simple'])} (local run "
                      f"{fmt_n(local.get('b_simple'))}), {dist.get('timing_basis')}")
        parts.append(f"bsfind on 1 {dist.get('backend')} rank: all-reduce "
                     f"{fmt_s(dist.get('sync_seconds'))}, B_simple "
                     f"{fmt_n(sub.figures['b_simple'])}")
    else:
        parts.append(f"bsfind on 1 NCCL rank: {sub.status} ({sub.reason})")
    st.subs.append(sub)
    st.figures = {s.name: s.figures for s in st.subs}
    st.settle("; ".join(parts))
    return st


# --------------------------------------------------------------------------- summary

STEP_FUNCTIONS: dict[str, Callable[[Check], Step]] = {
    "env": step_env, "tests": step_tests, "bench": step_bench, "recommend": step_recommend,
    "nccl": step_nccl,
}


def summary_parts(c: Check, note: str | None) -> tuple[list[str], list[str], list[str]]:
    """(the header and one line per step, the figures, the substeps with their commands)."""
    mode = ("dry run: every step on the CPU at tiny sizes, no GPU figures" if c.dry_run
            else "GPU run")
    used = time.monotonic() - c.start
    head = [f"bsfind GPU check (issue #18), {mode}; {used:.0f} s of the {c.budget:.0f} s "
            f"budget; python {c.py}" + (f"; {note}" if note else "")]
    done = {s.name for s in c.results}
    steps = c.results + [Step(STEPS.index(n) + 1, n, "skipped", note or "not run")
                         for n in c.steps if n not in done]
    head += [f"{s.number} {s.name:<10}{s.status:<8}{s.seconds:>5.0f} s  {s.headline}"
             for s in steps]
    figures = ["figures:"] + [f"  {sub.name}: {sub.detail}" for s in c.results
                              for sub in s.subs if sub.detail]
    subs = ["substeps (status, seconds / box, command):"]
    for s in c.results:
        for sub in s.subs:
            subs.append(f"  {sub.name:<28}{sub.status:<8}{sub.seconds:>6.1f} s"
                        + (f" / {sub.box} s" if sub.box is not None else "")
                        + (f"  [{sub.reason}]" if sub.reason else "")
                        + (f"\n      $ {sub.command}" if sub.command else ""))
    return head, figures, subs


def write_summary(c: Check, note: str | None = None) -> str:
    """Write summary.txt, summary.json and reports.json; return what to print.

    The printed text ends with the step lines: a tool that keeps only the tail of the
    output (the GPU machine's) keeps them.
    """
    head, figures, subs = summary_parts(c, note)
    text = "\n".join([*head, "", *figures, "", *subs]) + "\n"
    (c.out / "summary.txt").write_text(text, encoding="utf-8")
    write_json(c.out / "summary.json", {
        "mode": "dry-run" if c.dry_run else "gpu", "budget_s": c.budget,
        "seconds": round(time.monotonic() - c.start, 1), "python": c.py, "note": note,
        "steps": [{"step": s.number, "name": s.name, "status": s.status,
                   "headline": s.headline, "seconds": round(s.seconds, 1),
                   "figures": s.figures,
                   "substeps": [vars(sub) for sub in s.subs]} for s in c.results],
    })
    write_json(c.out / "reports.json", c.reports)
    return "\n".join([*figures, "", *head]) + "\n"


# --------------------------------------------------------------------------- main


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n".join(__doc__.splitlines()[1:]))
    p.add_argument("outdir", nargs="?", help="folder for the results (default: a new "
                   "temporary folder, printed)")
    p.add_argument("--dry-run", action="store_true",
                   help="every step on the CPU at tiny sizes (no GPU needed)")
    p.add_argument("--budget", type=float, default=BUDGET_S,
                   help=f"seconds for the whole check (default {BUDGET_S:.0f})")
    p.add_argument("--steps", default=",".join(STEPS),
                   help=f"comma-separated steps to run, by name or number ({','.join(STEPS)})")
    p.add_argument("--synthetic-digits", action="store_true",
                   help="replace bsfind.data:digits even where scikit-learn is installed "
                   "(as on the GPU machine)")
    args = p.parse_args(argv)
    wanted = [s.strip() for s in args.steps.split(",") if s.strip()]
    names = [STEPS[int(s) - 1] if s.isdigit() and 1 <= int(s) <= len(STEPS) else s
             for s in wanted]
    unknown = [n for n in names if n not in STEPS]
    if unknown or not names:
        p.error(f"--steps: unknown {', '.join(unknown) or '(none given)'}; "
                f"choose from {', '.join(STEPS)}")
    args.steps = [s for s in STEPS if s in names]
    return args


def _stop(signum: int, frame: Any) -> None:
    raise Stop(signal.Signals(signum).name)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    for stream in (sys.stdout, sys.stderr):  # "µs" and "×" on a terminal that is not UTF-8
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="replace")
    out = Path(args.outdir or tempfile.mkdtemp(prefix="bsfind-gpu-check-out-")).resolve()
    out.mkdir(parents=True, exist_ok=True)
    for name in FILES:  # a rerun into the same folder starts clean
        (out / name).unlink(missing_ok=True)
    print(f"gpu_check: results go to {out}", flush=True)
    c = Check(out, DRY if args.dry_run else GPU, args.dry_run, args.budget, args.steps,
              args.synthetic_digits)
    if "env" not in c.steps:
        c.cuda = not c.dry_run
    signal.signal(signal.SIGTERM, _stop)
    note = None
    try:
        for name in c.steps:
            started = time.monotonic()
            try:
                step = STEP_FUNCTIONS[name](c)
            except Stop:
                raise
            except Exception as exc:  # a bug in this script: that step fails, the rest runs
                step = Step(STEPS.index(name) + 1, name, "failed",
                            f"gpu_check error: {type(exc).__name__}: {exc}")
            step.seconds = time.monotonic() - started
            c.results.append(step)
            write_summary(c)
    except (Stop, KeyboardInterrupt) as exc:
        note = f"interrupted ({exc or 'Ctrl-C'})"
    finally:
        text = write_summary(c, note)
        shutil.rmtree(c.scratch, ignore_errors=True)
    print(f"\n{text}gpu_check: results in {out} (summary.txt has the commands too)",
          flush=True)
    failed = note is not None or any(s.status == "failed" for s in c.results)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
