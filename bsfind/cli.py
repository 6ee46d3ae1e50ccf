"""The command line: a thin layer over ``bsfind.api``; the only module that prints.

    bsfind recommend configs/digits-mlp.yaml          # table on stdout
    bsfind recommend configs/digits-mlp.yaml --json   # one JSON document on stdout
    bsfind noise configs/digits-mlp.yaml --set probe.seed=3
    bsfind branch configs/digits-mlp.yaml --json      # the critical batch by branched runs
    bsfind check configs/digits-mlp.yaml --tolerance 2 --output report.json
    bsfind validate configs/digits-mlp.yaml
    bsfind init spec.yaml
    bsfind env

Progress and warnings go to stderr, so ``--json > out.json`` is always valid
JSON. Every user-caused error is one line and a distinct exit code (see
``bsfind.errors``); ``--debug`` shows the traceback.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import platform
import signal
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext, redirect_stdout
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn, TypeVar

import typer
from rich.console import Console
from rich.measure import Measurement
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from bsfind import __version__, launch
from bsfind.budget import now
from bsfind.errors import (
    EXIT_INTERRUPTED,
    EXIT_USER_CODE,
    BsfindError,
    Interrupted,
    SpecError,
    UsageError,
    UserCodeError,
)

if TYPE_CHECKING:
    from bsfind.api import CheckResult

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="bsfind: measure the gradient noise scale and the hardware, recommend a batch size.",
    pretty_exceptions_enable=False,
)

# Piped output (CI logs, files) gets a width that fits the tables instead of 80.
# A terminal wraps prose at its width, between words; piped output keeps each line whole.
# Markup off by default: messages and table cells carry user text ("[/group]" in an
# exception crashed the error printer); the few styled prints ask for it.
# Exit code for a bug in bsfind itself (BSD sysexits EX_SOFTWARE), kept apart
# from the user-error codes so CI can tell "your job is misconfigured" from ours.
EXIT_INTERNAL = 70
# Exit code when the reader of stdout left early (`bsfind check ... | head -1`): 128 +
# SIGPIPE, what a shell reports for a process that signal ended. Not 1, which is check's
# "outside the tolerance" (a trial: rich's own broken-pipe exit was a silent 1).
EXIT_BROKEN_PIPE = 141


def _reader_gone() -> NoReturn:
    """Stdout's reader closed the pipe: stop quietly (what is left to write goes to
    /dev/null, so the interpreter's last flush says nothing) with EXIT_BROKEN_PIPE."""
    with contextlib.suppress(OSError, ValueError):  # (no file descriptor under pytest)
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    raise SystemExit(EXIT_BROKEN_PIPE)


class _Console(Console):
    def on_broken_pipe(self) -> None:
        _reader_gone()


def _write_stdout(text: str) -> None:
    """Write a JSON document to stdout, a closed pipe stopping as a print's does."""
    try:
        sys.stdout.write(text)
        sys.stdout.flush()
    except BrokenPipeError:
        _reader_gone()


stdout = _Console(highlight=False, markup=False, soft_wrap=not sys.stdout.isatty(),
                  width=None if sys.stdout.isatty() else 132)
stderr = Console(stderr=True, highlight=False, markup=False,
                 soft_wrap=not sys.stderr.isatty())

T = TypeVar("T")

SpecArg = Annotated[Path, typer.Argument(help="The YAML spec of the training job.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Write one JSON document to stdout.")]
SetOpt = Annotated[
    list[str] | None,
    typer.Option("--set", help="Override a spec key, e.g. --set probe.seed=3 (YAML value)."),
]
DebugOpt = Annotated[bool, typer.Option("--debug", help="Show tracebacks on errors.")]


def _version(value: bool) -> None:
    if value:
        stdout.print(f"bsfind {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Show the version.")
    ] = False,
) -> None:
    """bsfind: a batch-size advisor for PyTorch training."""


# --------------------------------------------------------------------------- error edge


def _one_line(text: str) -> str:
    """A message as one line: a user's exception text may span several."""
    return " ".join(part.strip() for part in text.splitlines() if part.strip())


def _print_error(text: str, hint: str | None = None, label: str = "error") -> None:
    """``label: text`` on stderr, the label in red; the text (the user's words, which may
    look like markup) and the hint printed as they are."""
    stderr.print(f"[red]{label}:[/] ", end="", markup=True)
    stderr.print(text, markup=False)
    if hint:
        stderr.print(f"  hint: {hint}", markup=False)


def _fail(exc: BsfindError, debug: bool) -> None:
    if debug:
        stderr.print_exception()
    if isinstance(exc, SpecError) and len(exc.problems) > 1:
        _print_error(f"{exc.source} is not well-formed, found {len(exc.problems)} problems:")
        for p in exc.problems:
            stderr.print(f"  {p}", markup=False)
        if exc.hint:
            stderr.print(f"  hint: {exc.hint}", markup=False)
    else:
        _print_error(_one_line(exc.message), exc.hint)


def _guard(
    debug: bool, fn: Callable[[], T], on_interrupt: Callable[[Any], None] | None = None,
    as_json: bool = False, on_error: Callable[[dict[str, Any]], None] | None = None,
) -> T:
    """Run ``fn``; map bsfind errors to their exit codes, Ctrl-C to 130.

    With ``as_json`` an error also writes one JSON document to stdout (``status``
    "error" or "interrupted", ``error``, ``hint``, ``exit_code``), so a pipeline
    reading stdout always gets JSON. ``on_error`` gets that document too (``check
    --output`` writes it).
    """
    def failed(status: str, message: str, hint: str | None, code: int,
               problems: list[str] | None = None, printed: bool = False) -> None:
        doc = _error_doc(status, message, hint, code, problems)
        if as_json and not printed:
            _json_error(doc)
        if on_error is not None:
            on_error(doc)

    try:
        # under --json, stdout holds one document: what the user's code prints goes to stderr
        with redirect_stdout(sys.stderr) if as_json else nullcontext():
            return fn()
    except Interrupted as exc:
        partial = on_interrupt is not None and exc.partial is not None
        if partial:
            on_interrupt(exc.partial)  # type: ignore[misc]
        failed("interrupted", exc.message, None, EXIT_INTERRUPTED, printed=partial)
        said = exc.message  # ("interrupted: interrupted during the branches", a trial)
        stderr.print(said if said.startswith("interrupted") else f"interrupted: {said}",
                     markup=False)
        raise typer.Exit(EXIT_INTERRUPTED) from None
    except KeyboardInterrupt:
        failed("interrupted", "interrupted", None, EXIT_INTERRUPTED)
        stderr.print("interrupted", markup=False)
        raise typer.Exit(EXIT_INTERRUPTED) from None
    except BsfindError as exc:
        _remember(exc)
        failed("error", exc.message, exc.hint, exc.exit_code,
               exc.problems if isinstance(exc, SpecError) else None)
        _fail(exc, debug)
        raise typer.Exit(exc.exit_code) from None
    except typer.Exit:
        raise
    except SystemExit as exc:  # the user's code (bsfind's own exits are typer.Exit)
        message = f"your code exited while bsfind ran it (SystemExit: {exc.code})"
        hint = "a sys.exit or argparse in the model, data, loss or optimizer code"
        failed("error", message, hint, EXIT_USER_CODE)
        _fail(UserCodeError(message, hint=hint), debug)
        raise typer.Exit(EXIT_USER_CODE) from None
    except Exception as exc:
        if debug:
            stderr.print_exception()
        message = f"internal error: {type(exc).__name__}: {exc}"
        hint = "rerun with --debug and report the traceback"
        failed("error", message, hint, EXIT_INTERNAL)
        _print_error(_one_line(f"{type(exc).__name__}: {exc}"), hint, "internal error")
        raise typer.Exit(EXIT_INTERNAL) from None


def _remember(exc: BsfindError) -> None:
    """Keep the error in words for a silenced rank's own line (_failed_secondary_exit)."""
    global _LAST_ERROR
    _LAST_ERROR = _one_line(str(exc))


def _error_doc(status: str, message: str, hint: str | None, code: int,
               problems: list[str] | None = None) -> dict[str, Any]:
    doc: dict[str, Any] = {"version": __version__, "status": status, "error": message,
                           "hint": hint, "exit_code": code}
    if problems is not None:
        doc["problems"] = problems
    return doc


def _json_error(doc: dict[str, Any]) -> None:
    if _secondary_rank():
        return
    _write_stdout(json.dumps(doc, indent=2) + "\n")
    sys.stdout.flush()


@contextmanager
def _phase_lines(emit: Callable[[str], None]) -> Iterator[Callable[[str, float, str], None]]:
    """Progress as plain lines: a phase's first message when it starts, and its last one
    when it ends, if that says something else (a probe's first round reads "|G|²
    unresolved"; its last one has the value)."""
    shown: list[str] = ["", ""]  # the current phase, the message printed for it
    latest: list[str] = [""]

    def close() -> None:
        if shown[0] and latest[0] != shown[1]:
            emit(f"bsfind: {shown[0]}: {latest[0]}")

    def log(phase: str, fraction: float, message: str) -> None:
        if phase != shown[0]:
            close()
            shown[:] = [phase, message]
            emit(f"bsfind: {phase}: {message}")
        latest[0] = message

    yield log
    close()  # (not after an error: its one line ends the output)


@contextmanager
def _progress(enabled: bool) -> Iterator[Callable[[str, float, str], None] | None]:
    """A rich progress bar on stderr when it is a terminal; else one line per phase.

    The plain lines (CI logs) go to stderr too, so ``--json`` stdout stays clean.
    """
    if not enabled:
        yield None
        return
    if not stderr.is_terminal:
        with _phase_lines(lambda line: stderr.print(line, markup=False)) as log:
            yield log
        return
    bar = Progress(
        TextColumn("{task.fields[phase]:>6}", markup=False), BarColumn(),
        TextColumn("{task.description}", markup=False),
        TimeElapsedColumn(), console=stderr, transient=True,
    )
    tasks: dict[str, Any] = {}

    def update(phase: str, fraction: float, message: str) -> None:
        if phase not in tasks:
            tasks[phase] = bar.add_task(message, total=1.0, phase=phase)
        bar.update(tasks[phase], completed=fraction, description=message)

    with bar:
        yield update


# When the command began (set by main; None when the app is invoked in-process, as the
# tests do): its budget (probe.max_seconds) counts from here, so that it covers
# importing torch and the user's code.
_STARTED: float | None = None


@contextmanager
def _measuring() -> Iterator[Callable[[str, float, str], None] | None]:
    """Around a budgeted command's run: SIGTERM as Ctrl-C, the budget counted from the
    command's start, and the progress display (yielded)."""
    from bsfind.budget import counted_from

    with _sigterm_as_interrupt(), counted_from(_STARTED), _progress(True) as progress:
        yield progress


@contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """CI runners stop jobs with SIGTERM: treat it like Ctrl-C (partial report, 130)."""
    def handler(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    try:
        old = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


# --------------------------------------------------------------------------- rendering


def _loss(v: float | None) -> str:
    """A loss to compare with its neighbours: 4 significant digits at any size (a user's
    losses of 20.14, 19.98 and 20.03 all read "20"; JSON null for a diverged one)."""
    return "∞" if v is None or not math.isfinite(v) else f"{v:.4g}"


def _fmt(v: Any, digits: int = 3) -> str:
    if v is None:
        return "N/A"
    if isinstance(v, float):
        if not math.isfinite(v):
            return "∞"
        if v != 0 and (abs(v) >= 1e5 or abs(v) < 1e-3):
            return f"{v:.{digits}g}"
        return f"{v:.{digits}g}" if abs(v) < 10 else f"{v:,.0f}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


def _fmt_bytes(n: float | None) -> str:
    if n is None:
        return "N/A"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n:.0f} B"
        n /= 1024
    return str(n)


def _fmt_seconds(s: float | None) -> str:
    if s is None:
        return "N/A"
    if s < 0.9995e-6:
        return f"{s * 1e9:.3g} ns"
    if s < 0.9995e-3:
        return f"{s * 1e6:.3g} µs"
    if s < 1:
        return f"{s * 1e3:.2f} ms"
    return f"{s:.2f} s"


def _ci(ci: list[float | None] | None) -> str:
    if not ci:
        return "N/A"
    lo, hi = ci
    return f"[{_fmt(lo)}, {_fmt(hi) if hi is not None else '∞'}]"


def print_table(t: Table, drop: Sequence[str], console: Console | None = None) -> list[str]:
    """Print ``t``, without the columns ``drop`` names (first to last) while it is too wide
    for the terminal: a table squeezed below its width cuts numbers to "1,0…". A column
    whose every cell is "—" (or blank) goes first, unmentioned. Piped output (132 wide)
    drops a column only when even wrapped headers cannot fit it. A caption names what was
    hidden; returns it."""
    console = console or stdout
    empty = [str(c.header) for c in t.columns
             if c.header in drop and all(str(v) in ("—", "") for v in c.cells)]
    hidden: list[str] = []
    for name in [*empty, *(d for d in drop if d not in empty)]:
        # measured unbounded: console.measure clamps to the width it is checked against
        fits = Measurement.get(console, console.options.update_width(10**6), t)
        if (fits.maximum if console.is_terminal else fits.minimum) <= console.width:
            break
        col = next((c for c in t.columns if str(c.header) == name), None)
        if col is not None and len(t.columns) > 1:
            t.columns.remove(col)
            if name not in empty:  # an empty column hides nothing
                hidden.append(name)
    if hidden:
        note = f"hidden to fit the terminal: {', '.join(hidden)} (--json has them)"
        t.caption = f"{t.caption}\n{note}" if t.caption else note
    if t.caption:
        t.caption_justify = "left"
    console.print(t)
    return hidden


# Columns a narrow terminal hides first (print_table), the least read first.
NOISE_DROP = ("B_noise", "probe examples", "window examples", "seconds", "method", "|G|²",
              "tr(Σ)", "stopped", "examples seen", "loss")
CANDIDATES_DROP = ("step time", "per device × accum", "memory", "steps ratio", "time/step",
                   "fits", "cost")


def render_noise(doc: dict[str, Any]) -> Table:
    # A tracker log's points (bsfind schedule) took no probe time, have no B_noise and all
    # read "logged": their examples are those the tracker measured in its window.
    logged = all(n["stopped"] == "logged" for n in doc["noise_scale_by_step"])
    t = Table(title="Gradient noise scale (" + ("from the tracker log" if logged
                                               else "measured") + ")", title_justify="left")
    for col in ("step", "examples seen", "loss", "B_simple", "95% CI", "|G|²", "tr(Σ)",
                "B_noise", "method", "window examples" if logged else "probe examples",
                "seconds", "stopped"):
        t.add_column(col, justify="right" if col not in ("method", "stopped") else "left")
    used = doc.get("noise_scale") or {}
    marked = set(used.get("summary_of") or ([used.get("step")] if used else []))
    for n in doc["noise_scale_by_step"]:
        mark = " ◀" if n["step"] in marked and len(doc["noise_scale_by_step"]) > 1 else ""
        t.add_row(
            f"{n['step']:,}{mark}",
            _fmt(n.get("examples_seen")),
            _fmt(n.get("loss")),
            _fmt(n["b_simple"]) if n["b_simple"] is not None else "unresolved",
            _ci(n["ci95"]),
            _fmt(n["grad_norm_sq"]),
            _fmt(n["trace_sigma"]),
            (f"{_fmt(n['b_noise'])} {_ci(n['b_noise_ci95'])}" if n.get("b_noise") is not None
             else "—"),
            n["method"],
            _fmt(n["examples"]),
            f"{n['seconds']:.2f}" if n["seconds"] < 10 else f"{n['seconds']:.0f}",
            n["stopped"],
        )
    if logged:
        t.columns = [c for c in t.columns if c.header not in ("seconds", "stopped", "B_noise")]
        t.caption = ("each row stands for the log's records over a stretch of training (the "
                     "step: the middle one's; ◀: the last records, the advice's): their median "
                     "loss, B_simple, |G|² and tr(Σ), the span of their 95% CIs; window "
                     "examples: the examples the tracker averaged over for the step's record")
    return t


def _interval_words(low: float | None, high: float | None) -> str:
    """Where B_crit lies by the rule: "91–181", "≥ 91", "< 45" (JSON has null for ∞)."""
    if low is None or (high is None and not low):
        return "—"
    if high is None:
        return f"≥ {_fmt(low)}"
    if not low:
        return f"< {_fmt(high)}"
    return f"{_fmt(low)}–{_fmt(high)}"


# The summary table's "ladder ended" column, by ``branches[].stopped``: the last three
# cut the ladder short (its read is how far it got).
LADDER_ENDED = {"failed": "fell behind", "top": "at its top",
                "budget": "time budget: cut", "out of memory": "memory: cut",
                "interrupted": "interrupted: cut"}


def render_branches(doc: dict[str, Any]) -> None:
    """One table per branch measurement (the ladder), then its summary, rule and notes."""
    from bsfind.wording import BOUND_MARK as mark

    for b in doc.get("branches") or []:
        start = b.get("start") or f"step {b['step']:,}"  # (a result cached before it)
        t = Table(title=f"Branched runs from {start} (measured; "
                  f"Δ = {b['delta_examples']:,} examples, {b['repeats']} data order(s))",
                  title_justify="left")
        for col in ("batch", "learning rate", "steps", "smoothed loss", "B/2 after Δ/"
                    f"{b['tolerance']:.3g}", "per data order", "seconds", "verdict"):
            t.add_column(col, justify="left" if col == "verdict" else "right")
        for r in b["rungs"]:
            verdict = ("diverged" if r["loss"] is None or not math.isfinite(r["loss"]) else
                       {None: "reference", True: "kept up"}.get(r["passed"], "fell behind"))
            t.add_row(f"{r['batch_size']:,}", f"{r['learning_rate']:.3g}", f"{r['steps']:,}",
                      _loss(r["loss"]), _loss(r["reference"]) if r["reference"] else "—",
                      " / ".join(_loss(v) for v in r["losses"]), f"{r['seconds']:.2f}",
                      verdict)
        print_table(t, ("per data order", "seconds", "steps"))
        stdout.print(f"  {b['summary']}", markup=False)
        stdout.print(f"  rule: {b['rule']} ({b['lr_rule']} learning rate)", markup=False)
        for note in b.get("notes") or []:
            stdout.print(f"  note: {note}", markup=False)
    if len(doc.get("branches") or []) > 1:  # the points side by side
        t = Table(title="Local critical batch at each point (measured)", title_justify="left")
        for col in ("step", "examples seen", "local critical batch", "B_crit by the rule",
                    "B_simple there", "ratio", "ladder ended", "training examples"):
            t.add_column(col, justify="right" if col != "ladder ended" else "left")
        for b in doc["branches"]:
            low, high = b["interval"] or (None, None)
            # a read the budget, memory or Ctrl-C cut short: how far it got, not a ladder top
            cut = " (cut)" if b.get("cut_short") and b["critical_batch"] is not None else ""
            t.add_row(
                f"{b['step']:,}", "—" if b["examples_seen"] is None else f"{b['examples_seen']:,}",
                "—" if b["critical_batch"] is None
                else f"{mark.get(b['bound'], '')}{b['critical_batch']:,}{cut}",
                _interval_words(low, high),
                _fmt(b["b_simple"]),
                "—" if b["ratio_to_b_simple"] is None
                else f"{mark.get(b['bound'], '')}{b['ratio_to_b_simple']:.2g}x",
                LADDER_ENDED.get(b["stopped"], b["stopped"]),
                f"{b['examples']:,}")
        print_table(t, ("training examples", "examples seen", "B_crit by the rule",
                        "ladder ended"))
    average = doc.get("branch_run_average")
    if average:
        stdout.print(f"Run average: {average['summary']}", markup=False)


def _per_device(doc: dict[str, Any], row: dict[str, Any]) -> str:
    """A table row's "per device × accum", an uneven split as its range (578–579 × 1)."""
    from bsfind.wording import per_device

    hardware = (doc.get("spec") or {}).get("hardware") or {}
    gpus = (doc.get("recommendation") or {}).get("gpus") or hardware.get("gpus") or 1
    split = per_device(row["batch_size"], row["per_device_batch_size"],
                       row["grad_accumulation"], int(gpus))
    return f"{split} × {row['grad_accumulation']}"


def render_schedule(doc: dict[str, Any]) -> None:
    """The batch-size schedule: a table, then the forms frameworks' ramps take."""
    s = doc.get("schedule")
    if not s:
        return
    m = s.get("lr_measured")
    lr_words = (f"{s['lr_rule']} learning rate per phase" if not m else
                f"{s['lr_rule']} learning rate per phase, corrected by the one measured at "
                f"batch {m['batch_size']:,} ({m['factor']:g}×)")
    t = Table(title=f"Batch-size schedule (predicted; {lr_words})", title_justify="left")
    for col in ("from step", "from examples", "batch", "per device × accum", "learning rate",
                "B_n there", "steps", "note"):
        t.add_column(col, justify="right" if col != "note" else "left")
    for p in s["phases"]:
        t.add_row(f"{p['start_step']:,}", f"{p['start_examples']:,}", f"{p['batch_size']:,}",
                  _per_device(doc, p), f"{p['learning_rate']:.3g}", _fmt(p["b_n"]),
                  f"{p['steps']:,}",
                  ", ".join(w for w, on in (("extrapolated", p["extrapolated"]),
                                            ("rate held", p.get("lr_held"))) if on))
    print_table(t, ("from examples", "B_n there", "per device × accum", "steps", "note"))
    ramp = ", ".join(f"({r['from_step']}, {r['batch_size']}, {r['learning_rate']:.3g})"
                     for r in s["ramp"])
    acc = ", ".join(f"({r['from_step']}, {r['grad_accumulation']})" for r in s["accumulation"])
    micro = s["accumulation"][0]["per_device_batch_size"]
    acc_time = s.get("accumulation_predicted_seconds")  # (absent from older cached results)
    slower = (acc_time is not None and s["baseline_seconds"]
              and acc_time > 1.005 * s["predicted_seconds"])
    acc_note = (f" (predicted {acc_time / s['baseline_seconds']:.2f}×: each micro-batch "
                "pays the step's fixed time)" if slower else "")
    horizon = ("the planned run" if s["horizon_source"] == "training"
               else f"{s['horizon_examples']:,} examples (no training length given: the "
                    "extrapolation limit)")
    held = s.get("recommended_batch")  # the recommendation held for the whole run
    held_words = (f" and {s['recommended_seconds'] / s['baseline_seconds']:.2f}× for the "
                  f"recommended {held:,} held constant"
                  if held and held != s["best_constant_batch"]
                  and s.get("recommended_seconds") is not None else "")
    stdout.print(
        f"  over {horizon}: predicted {s['predicted_seconds'] / s['baseline_seconds']:.2f}× "
        f"the baseline's time, against {s['best_constant_seconds'] / s['baseline_seconds']:.2f}×"
        f" for the best constant batch ({s['best_constant_batch']:,}){held_words}\n"
        f"  ramp as (from_step, batch, lr): [{ramp}]\n"
        f"  or as gradient accumulation over {micro} per device, (from_step, steps): [{acc}]"
        f"{acc_note}\n"
        f"  the noise scale was measured up to {s['measured_examples']:,.0f} examples"
        + ("; past it the schedule follows the fitted growth (held beyond "
           f"{s['growth']['extrapolation_limit_examples']:,.0f})"
           if s["horizon_examples"] > s["measured_examples"] else ", the whole run planned"),
        markup=False,
    )
    for line in _schedule_lines(doc, s):
        stdout.print("  " + line, markup=False)


def _schedule_lines(doc: dict[str, Any], s: dict[str, Any]) -> list[str]:
    """The lines under the schedule's table: held rates, the notes, a one-phase schedule's
    steps against the recommendation's, its examples, and which constant batch to take."""
    from bsfind.wording import (
        SCHEDULE_LR_HELD,
        constant_batches_differ,
        schedule_examples,
        schedule_steps_differ,
    )

    lines: list[str] = [SCHEDULE_LR_HELD] if any(p.get("lr_held") for p in s["phases"]) else []

    # (the cache key counts bsfind's code: a cached result has every field this writes)
    lines += ["note: " + note for note in s["notes"]]
    ab, phases = doc.get("absolute") or {}, s["phases"]
    if (len(phases) == 1 and ab.get("steps") and ab.get("batch_size") == phases[0]["batch_size"]
            and ab["steps"] != phases[0]["steps"]):
        lines.append(schedule_steps_differ(ab["batch_size"], phases[0]["steps"],
                                           ab["steps"]))
    more = schedule_examples(sum(p["steps"] * p["batch_size"] for p in s["phases"]),
                             s["horizon_examples"])
    if more:
        lines.append(more)
    # recommend only: bsfind schedule's recommendation reads the logged run's end, not
    # the probes' (validation.md compared the two for recommend)
    rec = doc.get("recommendation") if doc.get("command") == "recommend" else None
    lo, hi = (rec.get("batch_range") or (rec["batch_size"],) * 2) if rec else (0, 0)
    if rec and not lo <= s["best_constant_batch"] <= hi:  # (within it: they agree)
        lines.append(constant_batches_differ(rec["batch_size"], s["best_constant_batch"]))
    return lines


def render_candidates(doc: dict[str, Any]) -> Table:
    # the rows' step times are the predicted GPU's when one was asked for (--gpu)
    timing = (doc.get("predicted") or {}).get("timing") or doc.get("timing") or {}
    src = timing.get("source", "no timing")
    if timing.get("quality") == "untrusted":
        src += ", not used (see the notes)"
    t = Table(title=f"Candidates (step time: {src})", title_justify="left")
    for col in ("batch", "per device × accum", "steps ratio", "time/step", "total time",
                "cost", "memory", "fits", "step time"):
        t.add_column(col, justify="right" if col not in ("fits", "step time") else "left")
    for c in doc.get("candidates") or []:
        mark = " ★" if c["is_recommended"] else (" ◆" if c["is_baseline"] else "")
        t.add_row(
            f"{c['batch_size']}{mark}",
            _per_device(doc, c),
            f"{c['steps_ratio']:.2f}",
            _fmt_seconds(c["step_seconds"]) if c["step_seconds"] is not None else "—",
            f"{c['time_ratio']:.2f}×" if c["time_ratio"] is not None else "—",
            f"{c['cost_ratio']:.2f}×" if c["cost_ratio"] is not None else "—",
            _fmt_bytes(c["memory_bytes"]),
            "yes" if c["fits"] else "accumulate",
            c.get("step_time_source") or "—",
        )
    return t


def render_report(doc: dict[str, Any]) -> None:
    """The whole report on stdout: header, noise table, hardware lines, candidates, advice."""
    dev, dist = doc["device"], doc.get("distributed")
    batch = doc["baseline"]["batch_size"]
    stdout.print(
        f"bsfind {doc['version']} · device: {dev['name']} ({dev['type']})"
        + (f" · {dist['world_size']} ranks ({dist['backend']})" if dist else "")
        + f" · dataset: {doc['dataset']['size']:,} examples · baseline: batch {batch}"
        + (f" over all ranks ({max(1, batch // dist['world_size'])} per rank)" if dist else "")
        + f", lr {doc['baseline']['learning_rate']:g} ({doc['baseline']['optimizer']})"
        + (" · cached result" if doc.get("cached") else ""),
        markup=False,
    )
    print_table(render_noise(doc), NOISE_DROP)
    if doc.get("trajectory"):
        from bsfind.wording import trajectory_line

        label = "Logged run" if doc["trajectory"]["mode"] == "log" else "Probe run"
        stdout.print(f"{label}: {trajectory_line(_trajectory(doc['trajectory']))}",
                     markup=False)
    render_branches(doc)
    if doc["command"] in ("noise", "branch"):
        return
    for line in hardware_lines(doc):
        stdout.print(line, markup=False)
    if doc.get("candidates"):
        print_table(render_candidates(doc), CANDIDATES_DROP)
    for row in doc.get("frontier") or []:
        stdout.print(
            f"  {row['gpus']} device(s): batch {row['batch_size']}, time "
            f"{row['time_ratio']:.2f}×, cost {row['cost_ratio']:.2f}×",
            markup=False,
        )
    if doc.get("recommendation"):
        render_recommendation(doc)
    render_schedule(doc)


def _trajectory(d: dict[str, Any]) -> Any:
    from bsfind.results import Trajectory

    return Trajectory(**{k: v for k, v in d.items() if k != "growth"})


def hardware_lines(doc: dict[str, Any]) -> list[str]:
    """One line each for memory, step time, a predicted GPU and the data-parallel timings."""
    lines = []
    mem, tim = doc.get("memory"), doc.get("timing")
    if mem:
        lines.append(
            f"Memory ({mem['source']}): {_fmt_bytes(mem['fixed_bytes'])} fixed + "
            f"{_fmt_bytes(mem['bytes_per_example'])}/example → max batch "
            f"{mem['max_batch_size']:,} within {_fmt_bytes(mem['limit_bytes'])}")
    if tim:
        lines.append(
            f"Step time ({tim['source']}): t(B) = {_fmt_seconds(tim['t0'])} + "
            f"{_fmt_seconds(tim['per_example'])}·B (R² {_fmt(tim['r2'])}, "
            + {"line": "", "points": "read from the timed points, ",
               "untrusted": "not used (see the notes), "}.get(tim.get("quality") or "line", "")
            + f"{len(tim['points'])} batch sizes"
            + (f", saturates near batch {tim['saturated_at']:,}" if tim.get("saturated_at") else "")
            + (f", GPU utilisation {tim['utilization_gpu_pct']:.0f}% while timing"
               if tim.get("utilization_gpu_pct") is not None else "")
            + ")")
    pred = doc.get("predicted")
    if pred:
        pm, pt = pred.get("memory") or {}, pred.get("timing") or {}
        lines.append(
            f"Predicted for {pred['gpu']} (not measured): max batch "
            f"{_fmt(pm.get('max_batch_size'))}, t(B) = {_fmt_seconds(pt.get('t0'))} + "
            f"{_fmt_seconds(pt.get('per_example'))}·B")
    dist = doc.get("distributed")
    if dist and dist.get("sync_seconds") is not None:
        steps = ", ".join(f"rank {r['rank']} {_fmt_seconds(r.get('step_seconds'))}"
                          for r in dist["per_rank"])
        lines.append(
            f"Data-parallel ({dist['world_size']} ranks, {dist['backend']}, measured): "
            f"all-reduce of {_fmt_bytes(dist['sync_bytes'])} {_fmt_seconds(dist['sync_seconds'])}"
            f"; step at {dist['per_device_batch_size']}/rank: {steps}")
    return lines


def render_recommendation(doc: dict[str, Any]) -> None:
    from bsfind.wording import lr_label, per_device

    rec = doc["recommendation"]
    rng = rec.get("batch_range")
    split = per_device(rec["batch_size"], rec["per_device_batch_size"],
                       rec["grad_accumulation"], rec["gpus"])
    stdout.print(
        f"[bold]Recommendation:[/] batch size [bold]{rec['batch_size']}[/]"
        + (f" ({split} per device × {rec['gpus']} devices)" if rec["gpus"] > 1 else "")
        + (f" with {rec['grad_accumulation']}× gradient accumulation"
           if rec["grad_accumulation"] > 1 else "")
        + f", learning rate [bold]{rec['learning_rate']:.3g}[/] "
        + f"({lr_label(rec['lr_rule'], rec.get('lr_factor'))})",
        markup=True,
    )
    if rng:
        stdout.print("  plausible range from the basis's interval (below): "
                     + (f"{rng[0]}–{rng[1]}" if rng[0] != rng[1] else
                        f"{rng[0]} (the whole interval gives this batch)"), markup=False)
    if rec.get("predicted_time_ratio") is not None:
        stdout.print(
            f"  predicted time {rec['predicted_time_ratio']:.2f}× and cost "
            f"{rec['predicted_cost_ratio']:.2f}× the baseline's (predicted)",
            markup=False,
        )
    ab = doc.get("absolute")
    if ab:
        stdout.print(f"  {ab.get('text', '')}", markup=False)
    stdout.print(f"  basis: {rec['basis']}", markup=False)
    if rec.get("warmup"):
        stdout.print(f"  warm-up: {rec['warmup']}", markup=False)
    for note in rec.get("notes") or []:
        stdout.print(f"  note: {note}", markup=False)


def _warn(doc: dict[str, Any]) -> None:
    """Every warning of the report (the same list as the JSON's ``warnings``) on stderr."""
    for w in doc.get("warnings", []):
        stderr.print("[yellow]warning:[/] ", end="", markup=True)
        stderr.print(w, markup=False, highlight=False)


def _emit(doc: dict[str, Any], as_json: bool) -> None:
    try:
        if as_json:
            _write_stdout(json.dumps(doc, indent=2, allow_nan=False) + "\n")
        else:
            render_report(doc)
    except SystemExit as exc:  # stdout's reader left (| head): stderr may still be read
        if exc.code == EXIT_BROKEN_PIPE:
            _warn(doc)
        raise
    _warn(doc)


# --------------------------------------------------------------------------- commands


def _load(spec: Path, set_: list[str] | None,
          options: dict[str, tuple[str, Any]] | None = None) -> Any:
    """The spec with the --set overrides, then those of the options that set a spec key
    (``{"--gpu": ("hardware.gpu", value)}``; a value None or "" sets nothing), which its
    errors name instead of a --set."""
    from bsfind.spec import load_spec

    overrides, origins = list(set_ or []), {}
    for flag, (key, value) in (options or {}).items():
        if value is not None and value != "":
            overrides.append(f"{key}={value}")
            origins[overrides[-1]] = f"{flag} {value}"
    return load_spec(spec, overrides, origins)


def _partial_noise(as_json: bool, command: str) -> Callable[[Any], None]:
    """On Ctrl-C, print what was measured so far, marked interrupted."""
    def show(partial: Any) -> None:
        from bsfind.report import branch_dict, noise_dict, run_average_dict
        from bsfind.results import BranchPartial, BranchResult, NoisePartial

        branched: tuple[BranchResult, ...] = ()
        average = None
        if isinstance(partial, BranchPartial):
            partial, branched, average = partial.noise, partial.branches, partial.run_average
        # a walk's points and the value the advice would use from them, or one probe
        items, used = ((partial.points, partial.used) if isinstance(partial, NoisePartial)
                       else ((partial,), partial))
        doc: dict[str, Any] = {
            "version": __version__,
            "command": command,
            "status": "interrupted",
            "exit_code": EXIT_INTERRUPTED,
            "noise_scale": noise_dict(used),
            "noise_scale_by_step": [noise_dict(n) for n in items],
        }
        if branched:
            doc["branches"] = [branch_dict(b) for b in branched]
            doc["branch_run_average"] = run_average_dict(average)
        if as_json:
            _write_stdout(json.dumps(doc, indent=2, allow_nan=False) + "\n")
        else:
            for b in doc.get("branches") or []:  # (a finished ladder is not "interrupted")
                cut = b["stopped"] == "interrupted"
                stdout.print(f"{'interrupted during' if cut else 'measured by'} the branches: "
                             f"{b['summary']}", markup=False)
            if doc.get("branch_run_average"):
                stdout.print(f"Run average: {doc['branch_run_average']['summary']}",
                             markup=False)
            for n in doc["noise_scale_by_step"]:  # the probe cut short, or one that finished
                cut = n.get("stopped") == "interrupted"
                stdout.print(
                    f"{'interrupted at step' if cut else 'measured at step'} {n['step']}: B_simple "
                    f"{_fmt(n['b_simple']) if n['b_simple'] else 'unresolved'} "
                    f"95% CI {_ci(n['ci95'])} from {n['examples']:,} examples",
                    markup=False,
                )
            summary = doc["noise_scale"]
            if len(summary.get("summary_of") or ()) > 1:  # as a finished run's advice would
                steps = ", ".join(f"{s:,}" for s in summary["summary_of"])
                value = _fmt(summary["b_simple"]) if summary["b_simple"] else "unresolved"
                stdout.print(f"their median, which the advice would use: B_simple {value} "
                             f"(steps {steps})", markup=False)
    return show


@app.command()
def recommend(
    spec: SpecArg,
    json_out: JsonOpt = False,
    set_: SetOpt = None,
    gpu: Annotated[str | None, typer.Option("--gpu", help="Plan for a GPU that is not "
                                             "present, e.g. a100-80gb (predicted).")] = None,
    max_gpus: Annotated[int | None, typer.Option("--max-gpus", min=1,
                                                 help="Also show the time/cost frontier "
                                                 "for 1..M devices.")] = None,
    plot: Annotated[Path | None, typer.Option("--plot", help="Write a PNG or SVG of "
                                              "predicted time and cost vs batch.")] = None,
    debug: DebugOpt = False,
) -> None:
    """Measure the noise scale and the hardware, then recommend a batch size and LR."""
    def run() -> dict[str, Any]:
        from bsfind import api, report  # inside: Ctrl-C while torch loads is handled

        s = _load(spec, set_, {"--gpu": ("hardware.gpu", gpu)})
        if plot is not None:  # fail before a minute of probing, not after
            from bsfind.errors import UsageError
            from bsfind.plot import FORMATS

            if plot.suffix.lower() not in FORMATS:
                raise UsageError(f"--plot {plot}: the file must end in "
                                 f"{' or '.join(FORMATS)}")
            if not plot.parent.is_dir():
                raise UsageError(f"--plot {plot}: folder {plot.parent} does not exist")
            if plot.is_dir():
                raise UsageError(f"--plot {plot}: is a folder")
        with _measuring() as progress:
            r = api.recommend(s, progress=progress, max_gpus=max_gpus)
        if plot is not None and not _secondary_rank():
            api.write_plot(r, plot)
        return report.to_dict(r)

    doc = _guard(debug, run, on_interrupt=_partial_noise(json_out, "recommend"), as_json=json_out)
    _emit(doc, json_out)


@app.command()
def schedule(
    spec: SpecArg,
    log: Annotated[Path | None, typer.Argument(
        help="Required: a tracker's JSON-lines log, bsfind.track(model, log=path) in the "
        "last run.",
        show_default=False)] = None,
    json_out: JsonOpt = False,
    set_: SetOpt = None,
    gpu: Annotated[str | None, typer.Option("--gpu", help="Plan for a GPU that is not "
                                             "present, e.g. a100-80gb (predicted).")] = None,
    debug: DebugOpt = False,
) -> None:
    """Plan the next run's batch-size schedule from a tracker's log (no noise probe).

    The noise scale comes from the log of the last run; the step time is this machine's
    (or --gpu's, predicted)."""

    def run() -> dict[str, Any]:
        from bsfind import api, report  # inside: Ctrl-C while torch loads is handled

        if log is None:  # (optional here, so that the message can say which is missing)
            given = f"SPEC {spec}" if spec.suffix == ".jsonl" else f"{spec} LOG"
            raise UsageError(f"bsfind schedule takes the spec first, then the log: "
                             f"bsfind schedule {given}")
        if spec.suffix == ".jsonl" or log.suffix in (".yaml", ".yml"):
            raise UsageError(f"bsfind schedule takes the spec first, then the log: "
                             f"bsfind schedule {log} {spec}")
        s = _load(spec, set_, {"--gpu": ("hardware.gpu", gpu)})
        with _measuring() as progress:
            return report.to_dict(api.schedule_from_log(s, log, progress=progress))

    doc = _guard(debug, run, as_json=json_out)
    _emit(doc, json_out)


@app.command()
def check(
    spec: SpecArg,
    tolerance: Annotated[float, typer.Option("--tolerance", min=1.0,
                                             help="Pass when the baseline batch is within "
                                             "this factor of the recommendation.")] = 2.0,
    output: Annotated[Path | None, typer.Option("--output", help="Write the full JSON "
                                                "report here (atomically).")] = None,
    max_seconds: Annotated[float | None, typer.Option("--max-seconds", min=0.001,
                                                      help="Bound the whole run "
                                                      "(sets probe.max_seconds).")] = None,
    no_cache: Annotated[bool, typer.Option("--no-cache", help="Ignore and do not "
                                           "consult the result cache.")] = False,
    json_out: JsonOpt = False,
    set_: SetOpt = None,
    debug: DebugOpt = False,
) -> None:
    """CI preflight: exit 0 if the baseline batch is within --tolerance of the advice, 1 if not."""

    unwritable: list[str] = []  # set when --output could not be written

    def write(doc: dict[str, Any]) -> None:
        """The report (or, on an error, the error's document) to --output, atomically:
        a CI step that uploads it always finds one."""
        if output is None or _secondary_rank():
            return
        from bsfind.cache import atomic_write_text

        try:
            atomic_write_text(output, json.dumps(doc, indent=2, allow_nan=False) + "\n")
        except OSError as exc:
            from bsfind.errors import UsageError

            unwritable.append(f"--output {output}: cannot write ({exc})")
            raise UsageError(unwritable[-1]) from None

    def write_error(doc: dict[str, Any]) -> None:
        if unwritable:  # the error is the output's own: said once, as the error
            return
        try:
            write(doc)
        except BsfindError as exc:  # the run's own error is the one to report
            stderr.print(f"warning: {exc.message}", markup=False)

    def run() -> CheckResult:
        from bsfind import api  # inside: Ctrl-C while torch loads is handled

        if output is not None and (output.is_dir() or not output.parent.is_dir()):
            # before a minute of probing, not after
            unwritable.append(f"--output {output}: " + (
                "is a folder" if output.is_dir() else f"folder {output.parent} does not exist"))
            raise UsageError(unwritable[-1])
        s = _load(spec, set_, {"--max-seconds": ("probe.max_seconds", max_seconds)})
        with _measuring() as progress:
            result = api.check(s, tolerance=tolerance, use_cache=not no_cache,
                               progress=progress)
        write(result.document)
        return result

    result = _guard(debug, run, on_interrupt=_partial_noise(json_out, "check"), as_json=json_out,
                    on_error=write_error)
    if json_out:
        _write_stdout(json.dumps(result.document, indent=2, allow_nan=False) + "\n")
    else:
        stdout.print(result.message + (" (cached result)" if result.cached else ""),
                     markup=False)
    _warn(result.document)
    raise typer.Exit(0 if result.within else 1)


def _measurement_only(doc: dict[str, Any], *extra: str) -> dict[str, Any]:
    """The JSON of a command that measures without advising: no hardware, no advice."""
    keys = ("version", "command", "status", "device", "dataset", "baseline", "noise_scale",
            "noise_scale_by_step", *extra, "trajectory", "distributed", "warnings", "seconds")
    return {k: doc[k] for k in keys if k in doc}  # distributed: under torchrun only


@app.command()
def noise(spec: SpecArg, json_out: JsonOpt = False, set_: SetOpt = None,
          debug: DebugOpt = False) -> None:
    """Measure the gradient noise scale only (no hardware analysis, no advice)."""

    def run() -> dict[str, Any]:
        from bsfind import api, report  # inside: Ctrl-C while torch loads is handled

        s = _load(spec, set_)
        with _measuring() as progress:
            return report.to_dict(api.measure(s, progress=progress))

    doc = _guard(debug, run, on_interrupt=_partial_noise(json_out, "noise"), as_json=json_out)
    _emit(_measurement_only(doc) if json_out else doc, json_out)


@app.command()
def branch(spec: SpecArg, json_out: JsonOpt = False, set_: SetOpt = None,
           debug: DebugOpt = False) -> None:
    """Measure the critical batch directly, by short branched runs at 1, 2, 4, ... x B0.

    The branches start from the probe point (after the noise probe, as `noise` runs it),
    or from each of model.checkpoints."""

    def run() -> dict[str, Any]:
        from bsfind import api, report  # inside: Ctrl-C while torch loads is handled

        s = _load(spec, set_)
        with _measuring() as progress:
            return report.to_dict(api.branch(s, progress=progress))

    doc = _guard(debug, run, on_interrupt=_partial_noise(json_out, "branch"), as_json=json_out)
    _emit(_measurement_only(doc, "branches", "branch_run_average") if json_out else doc,
          json_out)


@app.command()
def validate(spec: SpecArg, json_out: JsonOpt = False, set_: SetOpt = None,
             debug: DebugOpt = False) -> None:
    """Check the spec: build it, run one tiny forward and backward, say which method runs."""

    def run() -> dict[str, Any]:
        from bsfind import api  # inside: Ctrl-C while torch loads is handled

        return api.validate(_load(spec, set_)).as_dict()

    doc = _guard(debug, run, as_json=json_out)
    if json_out:
        _write_stdout(json.dumps({"version": __version__, "status": "ok", **doc}, indent=2)
                         + "\n")
        _warn(doc)  # on stderr as well, as every command's
        return
    stdout.print(
        f"{spec}: ok · model {doc['model']} ({doc['trainable_parameters']:,} trainable "
        f"parameters) · data {doc['data']} ({doc['dataset_size']:,} examples) · loss "
        f"{doc['loss']} · optimizer {doc['optimizer']} · device {doc['device']}",
        markup=False)
    stdout.print(f"  one step of {doc['batch_size']} examples: loss {doc['loss_value']:.4g}, "
                 f"|gradient|² {doc['grad_norm_sq']:.4g}", markup=False)
    stdout.print(f"  noise probe: {doc['method']} ({doc['method_reason']})", markup=False)
    stdout.print(f"  probe points: {doc['probe_points']}", markup=False)
    stdout.print(f"  learning rate: {doc['learning_rate']}", markup=False)
    _warn(doc)


@app.command()
def init(
    path: Annotated[Path, typer.Argument(help="Where to write the starter spec.")] = Path(
        "bsfind.yaml"),
    force: Annotated[bool, typer.Option("--force", help="Overwrite an existing file.")] = False,
    debug: DebugOpt = False,
) -> None:
    """Write a commented starter spec."""
    from bsfind.errors import UsageError
    from bsfind.spec import starter_spec

    def run() -> None:
        if path.exists() and not force:
            raise UsageError(f"{path} exists", hint="pass --force to overwrite it")
        from bsfind.cache import atomic_write_text

        try:
            atomic_write_text(path, starter_spec())
        except OSError as exc:
            raise UsageError(f"{path}: cannot write ({exc.strerror or exc})") from None

    _guard(debug, run)
    stdout.print(f"wrote {path}; check it with `bsfind validate {path}`", markup=False)


@app.command()
def env(json_out: JsonOpt = False, debug: DebugOpt = False) -> None:
    """Versions and devices, for bug reports."""
    import torch

    from bsfind.hardware import nvml
    from bsfind.hardware.measure import cpu_quota, usable_cpus

    def run() -> dict[str, Any]:
        devices = [nvml.describe_device(torch.device("cpu"))]
        if nvml.available():
            devices += nvml.list_devices()
        elif torch.cuda.is_available():
            devices += [nvml.describe_device(torch.device("cuda", i))
                        for i in range(torch.cuda.device_count())]
        from bsfind.report import clean

        return {
            "bsfind": __version__,
            "python": platform.python_version(),
            "platform": platform.platform(),
            "torch": torch.__version__,
            "cuda_available": torch.cuda.is_available(),
            "cuda_version": torch.version.cuda,
            "nvml": nvml.available(),
            "nvml_note": None if nvml.available() else nvml.hint(),
            "cpu_threads": torch.get_num_threads(),
            "cpu_count": os.cpu_count(),
            "cpus_usable": len(usable_cpus()),
            "cpu_quota": cpu_quota(),
            "devices": [clean(d) for d in devices],
        }

    doc = _guard(debug, run, as_json=json_out)
    if json_out:
        _write_stdout(json.dumps(doc, indent=2) + "\n")
        return
    for k, v in doc.items():
        if k != "devices":
            stdout.print(f"{k:>15}: {v}", markup=False)
    t = Table(title="Devices", title_justify="left")
    for col in ("type", "name", "memory total", "free", "util %", "SM clock", "power"):
        t.add_column(col)
    for d in doc["devices"]:
        t.add_row(
            d["type"], d["name"], _fmt_bytes(d["total_memory_bytes"]),
            _fmt_bytes(d["free_memory_bytes"]), _fmt(d["utilization_gpu_pct"]),
            f"{_fmt(d['sm_clock_mhz'])}/{_fmt(d['sm_clock_max_mhz'])} MHz"
            if d["sm_clock_mhz"] is not None else "N/A",
            f"{_fmt(d['power_w'])}/{_fmt(d['power_limit_w'])} W"
            if d["power_w"] is not None else "N/A",
        )
    stdout.print(t)


def _secondary_rank() -> bool:
    """Under torchrun, every rank but 0: it neither prints nor writes files."""
    return launch.is_secondary_rank()


# A secondary rank's own stderr, kept while it is silenced (_failed_secondary_exit).
_RANK_STDERR: int | None = None
# The last error a command ended with, in words (a silenced rank's, for its own line).
_LAST_ERROR: str | None = None
# Seconds a failing secondary rank waits before it exits (env: BSFIND_RANK_GRACE).
RANK_GRACE = 10.0


def _silence_secondary_rank() -> None:
    """Point a secondary rank's stdout and stderr (fds 1, 2) at /dev/null.

    Rank 0 prints the one report (and any rank's error); $BSFIND_RANK_OUTPUT=all
    keeps every rank's output for debugging.
    """
    global _RANK_STDERR
    if not _secondary_rank() or os.environ.get(launch.RANK_OUTPUT_ENV) == "all":
        return
    sys.stdout.flush()
    sys.stderr.flush()
    _RANK_STDERR = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    os.dup2(devnull, 2)
    os.close(devnull)


def _failed_secondary_exit(code: int) -> None:
    """A silenced secondary rank that failed waits RANK_GRACE seconds before it exits.
    An error every rank meets before they coordinate (a bad or missing spec) then reaches
    the user from rank 0, which prints it: exiting at once, the secondary rank made
    torchrun stop rank 0 before it printed, and the user saw only torchrun's traceback
    (a trial: 2 runs in 8). Rank 0 failing too, torchrun ends this wait; else the error
    was this rank's alone, and it says it on its own stderr. A rank that had joined the
    process group exits at once: its error went to rank 0, which prints it."""
    if _RANK_STDERR is None or code == 0 or launch.joined():
        return  # (once joined, rank 0 prints every rank's error)
    try:
        grace = float(os.environ.get("BSFIND_RANK_GRACE", RANK_GRACE))
    except ValueError:
        grace = RANK_GRACE
    time.sleep(max(0.0, grace))
    text = _LAST_ERROR or f"exited with code {code}"
    os.write(_RANK_STDERR, f"error (rank {launch.rank()}): {text}\n".encode())


def _app() -> None:
    """The app; a command-line usage error (typer's own, before any command runs) under
    --json also writes the error's JSON document to stdout, as every other error does."""
    try:
        app()
    except SystemExit as exc:
        if isinstance(exc.__context__, BrokenPipeError):
            # typer's own console (--help, a usage error) met a closed stdout: rich
            # exits 1, which is check's "outside the tolerance" (a trial: --help | head)
            _reader_gone()
        usage: Any = exc.__context__  # typer exits while handling click's UsageError
        # (of typer's own copy of click: known by name)
        if "--json" in sys.argv[1:] and usage is not None and any(
                c.__name__ == "UsageError" for c in type(usage).__mro__):
            _json_error(_error_doc("error", _one_line(usage.format_message()),
                                   "see --help", int(usage.exit_code)))
        raise


def main() -> None:
    """Console entry point."""
    global _STARTED
    _STARTED = now()
    _silence_secondary_rank()
    if not launch.requested():
        _app()
        return
    # Under torchrun, leave without interpreter finalization: PyTorch's gloo threads can
    # abort a finished rank while the interpreter tears down (SIGABRT, "terminate called
    # without an active exception"; cf. pytorch/pytorch#179291), turning exit 0 into -6.
    # The process group is destroyed and every file written by then.
    try:
        _app()
        code = 0
    except SystemExit as exc:
        if isinstance(exc.code, int) or exc.code is None:
            code = exc.code or 0
        else:
            sys.stderr.write(f"{exc.code}\n")
            code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    _failed_secondary_exit(code)
    os._exit(code)


if __name__ == "__main__":  # pragma: no cover
    main()
