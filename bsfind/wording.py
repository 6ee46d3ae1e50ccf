"""Every sentence bsfind says to people about a result, written in one place.

The probes, the runners and the advisor return numbers and flags; on the way
to the report, this module turns them into the ``basis``, ``notes``,
``warmup`` and ``warnings`` texts of the JSON document and the table. No
torch here, and nothing here decides anything: a sentence is chosen from
facts computed elsewhere.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from bsfind.advisor import Advice, AdvisorInputs
    from bsfind.results import (
        AbsolutePrediction,
        BranchResult,
        Interval,
        LrSearch,
        NoiseEstimate,
        RunAverage,
        TimingCurve,
        Trajectory,
    )
    from bsfind.spec import Spec

NO_TIMING = ("the time budget ran out before any step was timed: no step-time curve; "
             "the advice uses the noise scale only")
NO_TIMING_ON_EVERY_RANK = ("the time budget ran out before every rank timed a step: no "
                           "step-time curve; the advice uses the noise scale only")
MEASURED_AT_INIT = (
    "measured at initialisation: the noise scale changes as training proceeds "
    "(it usually grows, often 10x, but can also start high), so a step-0 value may "
    "misrepresent the run; use probe.warmup_steps, probe.at_steps or model.checkpoint"
)
UNRESOLVED = ("|G|² was not resolved: the noise scale exceeds the largest batch probed, "
              "which is all that is known of it")
UNRESOLVED_ADVICE = ("the noise scale was not resolved: the advice takes its lower bound, "
                     "the largest batch probed")
# the same of a tracker's log (bsfind schedule), which probed nothing
UNRESOLVED_LOG = ("|G|² was not resolved in the log: the noise scale exceeds the batch the "
                  "tracker measured, which is all that is known of it")
UNRESOLVED_ADVICE_LOG = ("the noise scale was not resolved in the log: the advice takes its "
                         "lower bound, the batch the tracker measured (or its interval's low "
                         "end, when larger)")
LR_SEARCH_CUT_SHORT = ("the time budget ended the learning-rate search: the report is partial, "
                       "and the learning rate is the best of those that finished (see "
                       "lr_search; a larger probe.max_seconds lets it finish)")
LR_SEARCH_CUT_FIRST = ("the time budget ended the learning-rate search before its first "
                       "learning rate finished: the report is partial, and the learning rate "
                       "is the rule's (a larger probe.max_seconds lets it finish)")
def token_mean(model_loss: bool) -> str:
    """A loss averaged over a batch's tokens, on examples of different token counts: the
    model's own loss (``model_loss``) or the built-in cross_entropy on (batch, token)
    targets."""
    which = ("the model's own loss (loss: model) averages" if model_loss else
             "the built-in cross_entropy averages (batch, token) targets")
    return (f"{which} over a batch's tokens, and these examples count different numbers "
            "of them (labels of -100 vary per row): each example weighs by its length, while "
            "the noise scale assumes a mean over examples, so it reads low (23% on a padded "
            "GPT-2 in a trial); use a loss that averages each example's tokens first "
            "(README: \"Per-token losses on padded batches\")")
def summed_loss(ratio: float) -> str:
    """A loss that adds up a batch's examples (:func:`bsfind.pipeline.summed_over_batch`)."""
    return (f"the loss of a batch repeated twice is {ratio:.2f}x the batch's: it adds up "
            "the examples (reduction='sum'?) where bsfind expects their mean. The noise "
            "scale is the same either way, and so is an Adam-family step, but an SGD step "
            "grows with the batch, so SGD's learning rates measured and advised are not "
            "comparable across batch sizes; average over the batch (reduction='mean')")


LR_SEARCH_CUT_ONE = ("the time budget ended the learning-rate search after its first "
                     "learning rate, with none to compare it with: the report is partial, "
                     "and the learning rate is the rule's (a larger probe.max_seconds lets it "
                     "finish)")
def api_budget(rel_half_width: float, target: float) -> str:
    """measure_noise_scale stopped by max_seconds before its interval was narrow enough."""
    width = (f"±{rel_half_width * 100:.2g}%" if math.isfinite(rel_half_width)
             else "unbounded")
    return (f"max_seconds ran out before the interval reached ±{target * 100:.2g}% (it is "
            f"{width}; stopped='budget'): raise max_seconds for a narrower one")


BUDGET_RAN_OUT = ("the time budget ran out: results are partial (marked in the table and "
                  "JSON); raise probe.max_seconds for a complete run")


def num(x: float) -> str:
    """A count-like number: thousands separators from 10 up, 3 significant digits below."""
    if math.isinf(x):
        return "∞"
    return f"{x:,.0f}" if abs(x) >= 10 else f"{x:.3g}"


def epochs(x: float) -> str:
    """"200 epochs", "0.5 epochs", "1,234 epochs", "1 epoch": 3 significant digits below
    100, whole epochs with thousands separators from 100 up (a general format printed a
    200-epoch run as "2e+02 epochs")."""
    if x >= 99.95:
        text = f"{round(x):,}"
    elif x > 0:
        text = f"{x:.{max(0, 2 - math.floor(math.log10(x)))}f}".rstrip("0").rstrip(".")
    else:
        text = "0"
    return f"{text} epoch{'' if text == '1' else 's'}"


def secs(s: float) -> str:
    return f"{s * 1e3:.3g} ms" if s < 1 else f"{s:.3g} s"


def duration(hours: float) -> str:
    """A training time in the unit that reads best: s, min or h (3 significant digits)."""
    s = hours * 3600
    if s < 60:
        return secs(s)
    if s < 3600:
        return f"{s / 60:.3g} min"
    return f"{hours:.3g} h"


def money(x: float) -> str:
    """2 decimals, or 3 significant digits for amounts under one unit."""
    return f"{x:,.2f}" if abs(x) >= 1 or x == 0 else f"{x:.3g}"


# --------------------------------------------------------------------------- the noise scale


def noise_warnings(used: NoiseEstimate, trajectory: Trajectory | None, *, dataset_size: int,
                   baseline_batch: int, from_checkpoint: bool, advice: bool = True,
                   partial: bool = False, norm_batch: int | None = None) -> list[str]:
    """Warnings about the noise measurement (and, with ``advice``, what it means for the
    recommendation), in the order stderr prints them."""
    out = []
    if partial:
        out.append(BUDGET_RAN_OUT)
    if norm_batch:
        out.append(batchnorm(norm_batch, advice, below=baseline_batch < norm_batch))
    if used.b_simple is None:
        logged = trajectory is not None and trajectory.mode == "log"
        out.append((UNRESOLVED_ADVICE_LOG if logged else UNRESOLVED_ADVICE) if advice
                   else UNRESOLVED_LOG if logged else UNRESOLVED)
    if used.method_reason.startswith(PER_EXAMPLE_FAILED):
        out.append(f"{used.method_reason}: the probe used micro-batches instead (an "
                   "estimate as exact, at more backward passes per example)")
    if dataset_size < baseline_batch:
        out.append(small_dataset(dataset_size, baseline_batch, advice))
    if trajectory is not None and trajectory.mode == "along":
        if not trajectory.moved:
            out.append(did_not_move(trajectory))
        if (trajectory.planned_examples is None and trajectory.epochs is not None
                and trajectory.epochs > UNPLANNED_EPOCHS):
            out.append(unplanned_run(trajectory.epochs, dataset_size, advice))
    elif used.step == 0 and not from_checkpoint and (trajectory is None
                                                     or trajectory.mode == "pinned"):
        out.append(MEASURED_AT_INIT)
    return out


# A schedule taking this many times the baseline run's examples says so.
SCHEDULE_EXAMPLES_NOTE = 1.5


# A phase whose rate never_falling held at the previous phase's (schedule.never_falling).
SCHEDULE_LR_HELD = (
    "rate held: the rule's rate from the baseline, at the phase's own B_n, is lower there "
    "(below the baseline batch it falls at any one batch as B_n grows); the schedule keeps "
    "the previous phase's rate so that it never falls as the batch grows")


# What docs/validation.md measured of the schedule ("The default advice and the schedule,
# against the best constant batch"): slower than the best constant batch on all three
# shipped problems, 2 seeds each, where bsfind predicted it 0-7% faster.
SCHEDULE_EVIDENCE = (
    "in docs/validation.md the schedule beat the best constant batch on none of the three "
    "shipped problems (1.00–1.45× its time, where bsfind predicted it 0–7% faster)")
# The most the schedule fell behind bsfind's own constant batch there (digits-mlp, seed 1:
# 0.164 s against 0.127 s): a schedule predicted faster than the constant batch by less
# than this factor has not been shown to win.
SCHEDULE_MEASURED_BEHIND = 1.29


def schedule_notes(seconds: float, best_batch: int, best_seconds: float,
                   recommended_batch: int | None, recommended_seconds: float | None
                   ) -> tuple[str, ...]:
    """The schedule's caveat: what the evidence shows and, when its predicted gain over
    the constant batch (the recommendation held constant, else the best constant batch)
    lies within SCHEDULE_MEASURED_BEHIND, that the constant batch is the safer choice."""
    held = (recommended_batch is not None and recommended_seconds is not None
            and math.isfinite(recommended_seconds) and recommended_seconds > 0)
    batch, constant = ((recommended_batch, recommended_seconds) if held
                       else (best_batch, best_seconds))
    assert batch is not None and constant is not None
    if not (math.isfinite(constant) and constant > 0 and math.isfinite(seconds)) or (
            seconds * SCHEDULE_MEASURED_BEHIND < constant):
        return (SCHEDULE_EVIDENCE,)
    ratio = seconds / constant
    how = "no faster than" if ratio >= 0.995 else f"only {1 - ratio:.0%} faster than"
    which = (f"the recommended {batch:,} held constant" if held
             else f"the best constant batch ({batch:,})")
    return (SCHEDULE_EVIDENCE,
            f"here it is predicted {how} {which}, less than the {SCHEDULE_MEASURED_BEHIND}× by "
            "which it fell behind bsfind's own constant batch there: the constant batch is "
            "the safer choice")


def small_dataset(dataset_size: int, baseline_batch: int, advice: bool) -> str:
    """The dataset holds fewer examples than the baseline batch."""
    return (f"the dataset has only {dataset_size} examples, fewer than the baseline batch "
            f"{baseline_batch}: the probe samples with replacement, so the estimate is still "
            "sound" + (f", but no recommendation exceeds {dataset_size}" if advice else ""))


def schedule_past_dataset(batch: int, dataset: int, examples: float) -> str:
    """The schedule held its last batch because the doubling due would pass the dataset."""
    return (f"the noise scale grows enough to double {batch:,} from about example "
            f"{examples:,.0f} of the baseline run, but {2 * batch:,} exceeds the dataset "
            f"({dataset:,} examples): the schedule stays at {batch:,} (the schedule only "
            "doubles; the constant batch may be the whole dataset)")


def schedule_steps_differ(batch: int, steps: int, recommended_steps: int) -> str:
    """A one-phase schedule at the recommended batch counts other steps than the
    recommendation's line: each reads the noise scale its own way."""
    return (f"{steps:,} steps at batch {batch:,} here, {recommended_steps:,} in the "
            "recommendation: it reads one noise scale (where the probes or the log ended) for "
            "every step, the schedule the growth fitted along the run")


def schedule_examples(total: int, horizon: int) -> str | None:
    """The schedule's examples when well above the baseline run's (its fewer, larger steps
    make the same progress with more examples), else None."""
    if horizon <= 0 or total < SCHEDULE_EXAMPLES_NOTE * horizon:
        return None
    return (f"it takes {total:,} examples, {total / horizon:.1f}x the baseline run's "
            f"{horizon:,}: above the noise scale each "
            "example buys less progress, so the same progress in fewer, larger steps takes "
            "more examples (E = E_min·(1 + B/B_noise))")


def text_inputs(keys: list[str]) -> str:
    """The dataset's items hold text entries that go to the model."""
    return (f"the dataset's items hold text under {', '.join(map(repr, keys))}, passed to the "
            "model as keyword arguments like the other entries: remove the columns the model "
            "does not take (dataset.remove_columns)")


# How the probe's method_reason begins when the per-example norms failed at run time.
PER_EXAMPLE_FAILED = "per-example norms failed at run time"
# measure_noise_scale measures the caller's model in the mode it is in (the CLI trains the
# factory's model in training mode): a ViT left in eval() read 462 against 574 with dropout
EVAL_MODE = ("the model is in eval mode, and was measured so (no dropout; BatchNorm on its "
             "running statistics): call model.train() first for the noise scale of training")


# Without a planned run (training.epochs / training.examples) the probe trains for half
# its budget: past this many epochs of the dataset, the point the advice reads is likely
# later than the user's run gets to (the noise scale grows as training goes on).
UNPLANNED_EPOCHS = 10


def unplanned_run(epochs: float, dataset_size: int, advice: bool) -> str:
    """The probe trained many epochs because the spec plans no run."""
    return (f"the probe trained {epochs:,.0f} epochs of the {dataset_size:,}-example dataset, "
            "since the spec plans no run (training.epochs or training.examples): the noise "
            "scale grows along training, so "
            + ("the advice is for a point that far in; " if advice else "the value is from "
               "that far in; ")
            + "set training.epochs to your run's length for a probe that stops there")


def busy_while_timing(share: float) -> str:
    """Other processes used the CPUs while the step time was measured (issue #14)."""
    return (f"other processes used {share:.0%} of the CPUs bsfind runs on while the step time "
            "was measured: the step times, and the batch they favour, are those of a machine "
            "that busy (each timed batch's fastest step discounts short bursts, not a steady "
            "load); re-run on a quiet machine, or set hardware.gpu for the GPU you train on")


def probed_beside_load(share: float, threads: int) -> str:
    """The noise probe ran on the cores other processes left free (``bsfind noise``)."""
    return (f"other processes used {share:.0%} of the CPUs bsfind runs on: the probe ran on "
            f"{threads} intra-op thread{'s' if threads > 1 else ''} (the value is the same; "
            "within the time budget it saw fewer examples, so its interval is wider than on "
            "a quiet machine)")


def capped_by_quota(quota: float, run_threads: int, n: int) -> str:
    """The run's threads were more than the cgroup's CPU quota allows (docker --cpus, a
    Kubernetes CPU limit); ``n``: the threads bsfind used (``measure.quota_threads``)."""
    return (f"this process's CPU quota (its cgroup's limit) is {quota:g} CPUs, but torch ran "
            f"{run_threads} intra-op threads: bsfind measured with {n}, since threads beyond "
            f"the quota are throttled in turns and every step waits for them; train with "
            f"torch.set_num_threads({n}) (or OMP_NUM_THREADS={n}) too")


def timed_beside_load(share: float, threads: int | None, cpu_clock: bool) -> str:
    """The CPU ladder ran on the cores other processes left free (issue #14)."""
    n = threads if threads is not None else 1
    how = (f"on {n} intra-op thread{'s' if n > 1 else ''}" if threads is not None
           else "on this run's one intra-op thread")
    clock = (", each step timed by that thread's CPU time, which their load does not add "
             "to" if cpu_clock else "")
    return (f"other processes used {share:.0%} of the CPUs bsfind runs on: the step time was "
            f"measured {how}{clock}; the step times, and the batch they favour, are those of "
            f"training on {n} core{'s' if n > 1 else ''} (with more, the per-example cost is "
            "lower and the best batch somewhat larger); re-run on a quiet machine, or set "
            "hardware.gpu for the GPU you train on")


def log_batch_differs(logged: list[int], baseline: int, batchnorm: bool = False) -> str:
    """``bsfind schedule``: the logged run's batch is not the spec's baseline."""
    sizes = ", ".join(f"{b:,}" for b in logged)
    why = ("with BatchNorm the noise scale is that of the log's micro-batches" if batchnorm
           else "the noise scale does not depend on the batch")
    return (f"the tracker log's run used batch {sizes}, the spec's baseline is {baseline:,}: "
            f"{why}, but the predicted times and the schedule's first phase are for the "
            "spec's baseline")


def branches_not_in_noise() -> str:
    """``bsfind noise`` with ``probe.branches`` set: it runs none."""
    return ("probe.branches is set, but bsfind noise measures the noise scale only: the "
            "branches run under recommend and check, or alone with bsfind branch")


def log_of_another_model(logged: list[int], own: int) -> str:
    """``bsfind schedule``: the log's tracker counted other trainable parameters than the
    spec's model has."""
    sizes = ", ".join(f"{n:,}" for n in logged)
    return (f"the tracker log's model had {sizes} trainable parameters, the spec's has "
            f"{own:,}: if the log is of another model (not the spec's, nor the part of it "
            "the tracker was given), its noise scale does not apply to this one")


def log_beyond_plan(logged: int, planned: int, what: str = "the tracker log") -> str:
    """``bsfind schedule`` (or ``model.checkpoints``): the points run past the spec's
    planned run."""
    return (f"{what} runs to {logged:,} examples, past the planned run's "
            f"{planned:,} (training.epochs / examples): the advice reads its end, and "
            "the schedule stops at the planned run")


def log_restarted(source: str, at: int, records: int) -> str:
    """``bsfind schedule``: the log holds more than one run (the examples count fell)."""
    return (f"{source} holds more than one run (the examples seen start again at record "
            f"{at + 1:,} of {records:,}): planning from the last one; split the file to plan "
            "from another")


def constant_batches_differ(recommended: int, best_constant: int) -> str:
    """The schedule's best constant batch is outside the recommendation's plausible range:
    why, and which to take for a constant batch (docs/validation.md, the default advice
    and the schedule)."""
    return (f"the recommended batch ({recommended:,}) and this best constant batch "
            f"({best_constant:,}) differ: the recommendation reads the noise scale where the "
            "probes ended, this line integrates its fitted growth over the whole run. For one "
            "constant batch, take the recommendation: it was the nearer to the best batch "
            "measured on the shipped problems (docs/validation.md)")


def no_schedule(resolved: int, points: int, timed: bool, *, timing_off: bool = False,
                budget: bool = False) -> str:
    """``bsfind schedule`` could not build a schedule: why, and what to do. ``resolved``
    of the log's ``points`` have a noise scale; ``timed``: a step time was usable."""
    if not timed:
        why = ("probe.timing is off" if timing_off else
               "the time budget ended before a step was timed" if budget else
               "the timing was too noisy")
        return (f"no batch-size schedule: no step time bsfind can act on ({why}); set "
                "hardware.gpu to plan from a predicted one"
                + (", or raise probe.max_seconds" if budget else ""))
    if not resolved and points:
        return (f"no batch-size schedule: |G|² was unresolved at all {points} points of the "
                "log (too few measurements for a noise scale this far above the batch), and "
                "lower bounds alone do not say how it grew; more measurements resolve it: a "
                "smaller track(every=) (with per-example norms the tracker measures one "
                "step in 32 or fewer by default), or gradient accumulation, measured "
                "every step. A longer "
                "track(window=) does not help: the window keeps only the measurements of "
                "the latter half of training so far")
    return (f"no batch-size schedule: the log gives {resolved} point(s) along the run with "
            "a noise scale to fit its growth; log a longer stretch of training")


def batchnorm(norm_batch: int, advice: bool = True, below: bool = False) -> str:
    """The noise scale of a BatchNorm model is that of its BatchNorm batch (DESIGN §8);
    ``below``: the model trains with fewer per device than the probe could measure."""
    measured = (f"was measured with batches of {norm_batch}, the fewest BatchNorm normalises "
                "(it trains with 1 per device)" if below else
                f"was measured with the one it trains with ({norm_batch} per device)")
    keeps = (f"; the advice keeps {norm_batch} per device in each forward and grows the "
             "batch in multiples of it, by more devices or gradient accumulation over batches "
             f"of {norm_batch}")
    return (f"the model has BatchNorm in training mode: its noise scale depends on the "
            f"BatchNorm batch, and {measured}" + (keeps if advice else ""))


# A BatchNorm recommendation at its floor this many times above the noise scale's
# interval gets a warning (``check``'s default tolerance).
BATCHNORM_ABOVE = 2.0


def batchnorm_floor(batch: int, norm_batch: int, b_n: float, ci: Interval, basis: str,
                    from_log: bool) -> str:
    """A BatchNorm model's recommendation held at its floor (one BatchNorm batch per
    device) far above the noise scale: ``check`` cannot flag such a baseline."""
    return (f"the recommended batch {batch:,} is the smallest the advice takes with BatchNorm "
            f"({norm_batch} per device, the BatchNorm batch the noise scale was measured "
            f"with), and {batch / b_n:.1f}x the noise scale ({basis} {num(b_n)}, interval "
            f"{num(ci.low)}–{num(ci.high)}): past it, more examples per step buy little "
            "progress; " + ("track a run at a smaller batch" if from_log else
                            "measure again at a smaller optimizer.batch_size")
            + " to compare")


def probe_plan(spec: Spec) -> str:
    """Where the noise scale will be measured, in words (``bsfind validate``)."""
    mode = spec.probe_mode
    if mode == "checkpoints":
        return f"at each of the {len(spec.model.checkpoints or ())} model.checkpoints"
    if mode == "pinned":
        if spec.probe.at_steps:
            return f"at training steps {', '.join(map(str, spec.probe.at_steps))}"
        if spec.probe.warmup_steps:
            return f"after {spec.probe.warmup_steps:,} warm-up training steps"
        return "at the weights of model.checkpoint"
    plan = ("up to the planned run (training)" if spec.training.examples is not None
            or spec.training.epochs is not None else "for up to half the noise budget")
    return (f"along training at batch {spec.optimizer.batch_size} and learning rate "
            f"{spec.optimizer.lr:g}, {plan}, at steps 0, 8, 16, 32, ...; the advice from the "
            "median of the last three")


def lr_plan(skipped: str | None) -> str:
    """How ``recommend`` will set the learning rate at its batch (``bsfind validate``)."""
    if skipped is None:
        return ("measured at the recommended batch by short runs from the start of training "
                "(probe.lr_branches)")
    return f"the rule's extrapolation from the baseline's ({skipped})"


def training_out_of_memory(batch: int, step: int) -> str:
    return (f"training along the run at the baseline batch {batch} ran out of memory after step "
            f"{step:,}: the noise scale is from the points measured before; measure at a "
            "real run's checkpoints (model.checkpoints) for later phases")


def did_not_move(t: Trajectory) -> str:
    """The default run along training stopped before training changed much."""
    loss = (f" (training loss {t.loss_from:.3g} → {t.loss_to:.3g})"
            if t.loss_from is not None and t.loss_to is not None else "")
    return (f"the probe trained only {t.steps:,} steps{loss} before its budget ran out: the "
            "noise scale changes as training proceeds (it usually grows, often 10x), so this "
            "may misrepresent the run; raise probe.max_seconds, or measure at points of a "
            "real run (model.checkpoints, probe.at_steps)")


def trajectory_line(t: Trajectory) -> str:
    """One line: how far the probe run got, the loss, and the noise scale's growth."""
    where = {"along": "trained to", "checkpoints": "measured at checkpoints up to",
             "pinned": "measured at", "log": "tracked up to"}[t.mode]
    examples = f", {t.examples:,} examples ({epochs(t.epochs)})" if (
        t.examples is not None and t.epochs is not None) else ""
    at = (f"{where} step {t.steps:,}{examples}" if t.checkpoint is None
          else f"{where} {from_checkpoint(t.checkpoint, t.steps)}{examples if t.steps else ''}")
    loss = (f"; training loss {t.loss_from:.3g} → {t.loss_to:.3g}"
            if t.loss_from is not None and t.loss_to is not None else "")
    growth = ""
    if t.b_simple_first and t.b_simple_last:
        growth = (f"; B_simple {num(t.b_simple_first)} → {num(t.b_simple_last)} now "
                  f"({t.b_simple_last / t.b_simple_first:.2g}x)")
    plan = (f"; planned run {t.planned_examples:,} examples" if t.planned_examples else "")
    return f"{at}{loss}{growth}{plan}"


# --------------------------------------------------------------------------- the advice


def _sync_note(advice: Advice, inputs: AdvisorInputs) -> str | None:
    f, n, t = advice.facts, inputs.gpus, advice.sync_seconds
    if f.sync_source == "scaled":
        return (f"all-reduce time on {n} devices scaled from the one measured on "
                f"{inputs.gpus} by the ring volume 2(N-1)/N")
    if f.sync_source == "predicted":
        return (f"all-reduce time predicted for {f.sync_link}: {secs(t)} per step on {n} "
                "devices, assuming no overlap with the backward pass")
    if f.sync_source == "unknown":
        return ("no gradient size or sync measurement: the all-reduce time between devices "
                "is taken as 0, which favours more devices")
    return None


def from_checkpoint(checkpoint: str, steps: int) -> str:
    """A point counted from a ``model.checkpoint`` whose own step is not known:
    "model.checkpoint ck.pt", or "model.checkpoint ck.pt and 8 steps after it"."""
    return f"model.checkpoint {checkpoint}" + (f" and {steps:,} steps after it" if steps else "")


def _noise_at(inputs: AdvisorInputs) -> str:
    """Where the noise scale was measured: "at training step 200", or "at
    model.checkpoint ck.pt" (:func:`from_checkpoint`)."""
    if inputs.noise_checkpoint is None:
        return f"at training step {inputs.noise_step}"
    return f"at {from_checkpoint(inputs.noise_checkpoint, inputs.noise_step)}"


def _basis(advice: Advice, inputs: AdvisorInputs) -> str:
    name = "B_noise" if inputs.basis == "b_noise" else "B_simple"
    ci = inputs.b_n_ci
    at = _noise_at(inputs)
    noise = f"{name} = {num(inputs.b_n)} (95% CI {num(ci.low)}–{num(ci.high)}) measured {at}"
    if len(inputs.noise_summary_of) > 1:
        steps = ", ".join(f"{s:,}" for s in inputs.noise_summary_of)
        noise = (f"{name} = {num(inputs.b_n)}, the median at training steps {steps} (their "
                 f"intervals span {num(ci.low)}–{num(ci.high)})")
    probed = ("the batch the tracker measured" if inputs.noise_from_log
              else "the largest batch probed")
    if math.isinf(inputs.b_n):
        noise = f"{name} unresolved (above {probed}) {at}"
    elif inputs.b_n_lower_bound:
        noise = (f"{name} unresolved {at}: at least "
                 f"{num(inputs.b_n)} (the larger of {probed} and its "
                 "interval's low end), taken as that")
    timing = inputs.timing
    if advice.facts.timing_state in ("ok", "points", "clamped") and timing is not None:
        return (f"{noise}; step time {step_time_words(timing)} per device "
                f"({timing.source}); the batch minimising predicted wall-clock "
                f"S(B)·t(B) on {inputs.gpus} device(s)")
    return f"noise scale only: no step-time measurement; batch ≈ {noise}"


def step_time_words(timing: TimingCurve) -> str:
    """How the advisor reads a step-time curve, in a few words."""
    t0, c = max(timing.t0, 0.0), max(timing.per_example, 0.0)
    line = f"t(B) = {secs(t0)} + {secs(c)}·B"
    if len(timing.points) < 2:
        return line
    bs = sorted(p.batch_size for p in timing.points)
    if timing.fit_ok and timing.fitted_up_to is not None:
        n = sum(b <= timing.fitted_up_to for b in bs)
        return (f"{line}, fitted to {n} of {len(bs)} timed batch sizes "
                f"({num(bs[0])}–{num(timing.fitted_up_to)}; above it throughput fell well "
                "below its peak: those batches are slower overall at any noise scale, read "
                f"as timed; past {num(bs[-1])}, time in proportion to B)")
    if timing.fit_ok:
        return (f"{line}, fitted to {len(bs)} timed batch sizes ({num(bs[0])}–{num(bs[-1])}; "
                f"past {num(bs[-1])}, time in proportion to B)")
    return (f"from {len(bs)} timed batch sizes ({num(bs[0])}–{num(bs[-1])}), interpolated "
            f"(no line fits them); past {num(bs[-1])}, time in proportion to B")


def _untrusted_timing(t: TimingCurve) -> str:
    """Why a measured step-time curve is not used: one batch size, a clock that read 0 s,
    a budget that ended before the rungs were re-timed, or noise that outlasted it."""
    if len(t.points) < 2:
        return (f"only one batch size ({t.points[0].batch_size:,}) was timed (a larger one "
                "did not fit in memory, or the budget ended), and one point makes no "
                "step-time line" if t.points else "no batch size was timed")
    if not any(p.seconds > 0 for p in t.points):
        return "the clock read 0 s for every timed step (too coarse for steps this short)"
    fit = f"R² {t.r2:.2f}, t0 {secs(t.t0)}, c {secs(t.per_example)}"
    if t.passes == 0:
        return (f"the step times were too noisy to use ({fit}), and the budget ended before "
                "they could be re-measured")
    return (f"the step times were too noisy to use even after re-measuring ({fit}; is "
            "something else running on this machine?)")


def _notes(advice: Advice, inputs: AdvisorInputs) -> list[str]:
    from bsfind.advisor import MAX_PIECES, memory_bound, throughput_cap

    f, rec = advice.facts, advice.recommendation
    notes = [s for s in (_sync_note(advice, inputs),) if s]
    if f.timing_state == "degenerate":
        notes.append("the step-time fit is degenerate (t0 <= 0 and slope <= 0): ignored")
    elif f.timing_state == "points" and inputs.timing is not None:
        t = inputs.timing
        again = " even after re-measuring" if t.passes else ""
        notes.append(
            f"no line t0 + c·B fits the step times{again} (R² {t.r2:.2f}), "
            "but they are clean: within the timed range the advice reads the timed points "
            "themselves, and past the last one it assumes no further gain in throughput")
    elif f.timing_state == "untrusted" and inputs.timing is not None:
        notes.append(f"{_untrusted_timing(inputs.timing)}: the advice is from the noise scale "
                     "alone, the batch where extra examples stop paying off")
    elif f.timing_state == "clamped":
        notes.append("the step-time fit had a negative term; it was clamped at 0")
    if f.search_truncated:
        notes.append(f"the search stopped after {MAX_PIECES:,} gradient-accumulation "
                     "steps per optimizer step; larger batches were not considered")
    if rec.batch_range is not None:
        if f.ci_low_at_zero:
            notes.append("the noise scale's interval reaches 0: the range starts at the "
                         "smallest batch")
        if f.ci_unbounded:
            notes.append(f"the noise scale's interval is unbounded above: the range's upper "
                         f"end is clipped at the dataset size ({inputs.dataset_size:,})")
        if f.range_from_timing:
            notes.append("the plausible range includes the step-time uncertainty (each timed "
                         "batch's 25th-percentile step time instead of its fastest)")
    if math.isinf(inputs.b_n):
        notes.append("an unresolved noise scale is treated as perfect scaling: the largest "
                     "batch wins, limited only by the dataset size")
    elif inputs.b_n_lower_bound:
        fix = ("a longer stretch of training in the log, or measuring more often "
               "(track(model, every=...)), can resolve it" if inputs.noise_from_log else
               "a longer probe (probe.max_seconds) or a larger probe batch can resolve it")
        notes.append("the noise scale was not resolved, so the advice uses its lower bound: "
                     f"the time-optimal batch may be larger still; {fix}")
    if inputs.dataset_size <= inputs.b_n < math.inf:  # (a trial: 20 examples, B_n 39-49)
        whole = (f"full-batch training ({rec.batch_size:,}, every example each step)"
                 if rec.batch_size == inputs.dataset_size else
                 f"the largest batch the dataset allows ({rec.batch_size:,}: the whole of it "
                 "does not split evenly over the devices)")
        notes.append(f"the noise scale ({inputs.b_n:,.0f}) is above the dataset's "
                     f"{inputs.dataset_size:,} examples: even a step over all of them is "
                     "below the batch where extra examples stop paying off, so the advice is "
                     f"{whole}")
    elif f.optimum_clipped:
        notes.append(f"the optimum reaches the dataset size ({inputs.dataset_size:,}): clipped")
    if inputs.basis == "b_simple" and inputs.optimizer_family == "adam":
        notes.append("the Adam family's advice rests on B_simple: in docs/validation.md it "
                     "stayed within 0.34–2.4x of the critical batch fitted from full sweeps, "
                     "while B_noise read about 3x low late in training under Adam/AdamW")
    elif inputs.basis == "b_simple":
        notes.append("B_simple exceeded the measured critical batch 1.5–8x on supervised tasks "
                     "(McCandlish et al. 2018); under SGD, B_noise (probe.curvature) tracked "
                     "it to 0.83–1.10x in docs/validation.md")
    if rec.grad_accumulation > 1:
        split = per_device(rec.batch_size, rec.per_device_batch_size, rec.grad_accumulation,
                           rec.gpus)
        how = f"{split} per device × {rec.grad_accumulation} accumulation steps"
        cap = throughput_cap(inputs)
        if memory_bound(inputs, rec.gpus) or cap is None:
            notes.append(f"batch {rec.batch_size} does not fit in memory on {rec.gpus} "
                         f"device(s): {how}")
        else:
            notes.append(f"batch {rec.batch_size} runs as {how}: per device, the batches timed "
                         f"above {cap:,} ran slower per example than {cap:,} (left out of the "
                         "step-time line), so accumulating is faster")
    return notes


def _warmup(advice: Advice, inputs: AdvisorInputs) -> str | None:
    rec, steps = advice.recommendation, advice.facts.warmup_steps
    if steps is None:
        return None
    return warmup_text(rec.batch_size, inputs.baseline_batch, inputs.baseline_lr,
                       rec.learning_rate, steps)


def warmup_text(batch: int, b0: int, lr0: float, lr: float, steps: int) -> str:
    """The recommended warm-up in words: from lr0 to ``lr`` over ``steps`` steps."""
    from bsfind.advisor import WARMUP_EPOCHS

    unit = "step" if steps == 1 else "steps"
    return (f"the batch grows {batch / b0:.0f}x: ramp the learning rate linearly from "
            f"{lr0:.3g} to {lr:.3g} over the first {steps:,} {unit} at batch {batch} "
            f"(Goyal et al. 2017's warm-up: {WARMUP_EPOCHS} epochs of their 90, or 1/18 of "
            "the planned run when that is shorter)")


def absolute_text(a: AbsolutePrediction) -> str:
    """One line: the planned training's predicted hours (and cost) against the baseline's."""
    text = (f"{a.training_examples:,} planned examples: predicted "
            f"{duration(a.hours)} (baseline {duration(a.baseline_hours)})")
    if a.cost is not None and a.baseline_cost is not None and a.price_per_hour is not None:
        text += (f", cost {money(a.cost)} (baseline {money(a.baseline_cost)}) at "
                 f"{money(a.price_per_hour)} per device-hour")
    # what to train for at the new batch: its steps differ from the plan's, and so may its
    # examples (a review: the examples the same within 1%, the steps halved)
    if a.steps and (a.steps != a.baseline_steps or abs(a.examples - a.training_examples) > max(
            a.batch_size, 0.01 * a.training_examples)):
        run = f" ({epochs(a.epochs)})" if a.epochs is not None else ""
        text += (f"; the same progress at batch {a.batch_size:,} takes {a.steps:,} optimizer "
                 f"step{'' if a.steps == 1 else 's'}, {a.examples:,} examples{run}: train "
                 f"that long, not {a.training_examples:,} examples")
    return text


def describe_advice(advice: Advice, inputs: AdvisorInputs) -> Advice:
    """``advice`` with its texts written: basis, notes, warm-up and the absolute line."""
    import dataclasses

    rec = dataclasses.replace(
        advice.recommendation, basis=_basis(advice, inputs),
        notes=tuple(_notes(advice, inputs)), warmup=_warmup(advice, inputs))
    absolute = advice.absolute
    if absolute is not None:
        absolute = dataclasses.replace(absolute, text=absolute_text(absolute))
    return dataclasses.replace(advice, recommendation=rec, absolute=absolute)


# --------------------------------------------------------------------------- CI preflight


def check_message(*, within: bool, baseline: int, recommended: int, ratio: float,
                  tolerance: float, time_ratio: float | None, cost_ratio: float | None,
                  learning_rate: float, lr_label: str, ranks: int = 1,
                  partial: bool = False) -> str:
    """``bsfind check``'s one-line verdict, with the learning rate at the recommended batch
    (a passing check hid a measured rate 4x the rule's from a trial's CI user); under
    torchrun (``ranks`` > 1) it says the batches are global; ``partial``: that the budget
    ran out (a verdict a longer run may change)."""
    lr = f"; learning rate at {recommended}: {learning_rate:.3g} ({lr_label})"
    if ranks > 1:
        lr += f"; batches are global, over the {ranks} ranks measured"
    if partial:
        lr += "; partial: the measurement stopped early (the warnings say why)"
    if within:
        return (f"ok: baseline batch {baseline} is within {tolerance:g}x of the recommended "
                f"{recommended} ({ratio:.2f}x){lr}")
    direction = "below" if baseline < recommended else "above"
    what = (f"; the recommendation is predicted to take {time_ratio:.2f}x the baseline's time"
            f" and {cost_ratio:.2f}x its cost" if time_ratio is not None
            and cost_ratio is not None else "")
    return (f"baseline batch {baseline} is {ratio:.3g}x {direction} the recommended "
            f"{recommended} (tolerance {tolerance:g}x){what}{lr}")


def cache_unwritable(folder: str, why: str) -> str:
    """``check`` could not store its result: the next run measures again."""
    return (f"the result was not cached ({folder}: {why}): the next check measures again; "
            "set BSFIND_CACHE_DIR to a writable folder")


def setup_took(seconds: float, budget: float, command: bool = True) -> str:
    """Where a budget that measured nothing went: under the CLI it counts from the
    command's start (``command``), so starting Python and torch spend it too, and
    building the job does either way."""
    what = ("starting up (Python, torch, the spec's factories)" if command
            else "building the spec's model and data")
    return f"{what} took {seconds:.1f} s of the {budget:g} s"


# --------------------------------------------------------------------------- torchrun


def gpus_ignored_under_torchrun(gpus: int, world: int) -> str:
    return (f"hardware.gpus: {gpus} is not used under torchrun: the advice is for the {world} "
            "ranks measured (--max-gpus shows other device counts)")


def shards_differ(sizes: list[int]) -> str:
    return (f"the dataset has {', '.join(map(str, sizes))} examples on different ranks "
            "(per-rank shards?): each rank samples its own; the report shows rank 0's size")


B_NOISE_ON_RANK0 = ("B_noise was measured on rank 0 alone (single-device form); B_simple on "
                    "all ranks")


def measured_sync_unused(seconds: float, gpu: str) -> str:
    return (f"the all-reduce time measured here ({seconds:.3g} s) is not used for {gpu}: the "
            "advisor predicts it from hardware.interconnect")


def slowest_rank_basis(points: int) -> str:
    return (f"at each of the {points} batch sizes every rank timed, the slowest rank's median "
            "step time")


def sync_source(repeats: int) -> str:
    return (f"measured: median of {repeats} barrier-synchronised all-reduces of the gradients' "
            "bytes, each the time of the last rank to arrive")


# --------------------------------------------------------------------------- branches


# How a one-sided read is written before its value ("≥ 128"); a bracketed one bare.
BOUND_MARK = {"at least": "≥ ", "at most": "≤ "}

BRANCHES_UNDER_TORCHRUN = ("probe.branches: the branched runs are measured in a single "
                           "process only; skipped under torchrun")


def describe_branches(r: BranchResult, oom_at: int | None = None,
                      accumulated_from: int | None = None, stopped_at: int | None = None,
                      floor: int | None = None, below_error: str | None = None,
                      disputed: Sequence[int] = ()) -> BranchResult:
    """``r`` with its notes written: how the ladder ended and what the bound means.

    Args:
        oom_at: the rung that ran out of memory even in micro-batches (the ladder ended).
        accumulated_from: the rung that first ran out of memory in one forward.
        stopped_at: the rung running when the budget or Ctrl-C ended the ladder.
        floor: the smallest batch the ladder could go down to (None: it did not go
            below the baseline batch).
        below_error: why the ladder stopped going down (a rung below B0 raised).
        disputed: deciding rungs on which the data orders disagree.
    """
    import dataclasses

    notes = []
    if r.optimizer_state == "fresh" and r.step == 0 and r.checkpoint is None:
        notes.append("the branches started at step 0, before the optimizer had any state "
                     "(momentum, Adam's moments), as the run itself did")
    elif r.optimizer_state == "fresh":
        notes.append("the branches started from a fresh optimizer state (bsfind loads a "
                     "checkpoint's weights, not an optimizer state the file may hold): "
                     "momentum and Adam's moments rebuilt during the branches, not carried "
                     "over from the run")
    notes += _diverged_rungs(r)
    micro = [g.micro_batch for g in r.rungs if g.micro_batch is not None]
    if accumulated_from is not None and micro:
        notes.append(f"batch {accumulated_from:,} did not fit in memory in one forward: it "
                     f"and the rungs above it accumulated micro-batches of {micro[0]:,}")
    if r.stopped == "out of memory" and oom_at is not None:
        ran = [g.batch_size for g in r.rungs]
        near = min(ran, key=lambda b: abs(math.log2(b / oom_at))) if ran else None
        notes.append(f"batch {oom_at:,} ran out of memory"
                     + (" even in micro-batches" if micro else "") + ": the ladder ended at "
                     f"{f'{near:,}' if near is not None else 'no batch'}")
    elif r.stopped == "budget":
        notes.append("the time budget ended the ladder" + (
            f" during batch {stopped_at:,} (dropped)" if stopped_at is not None and r.rungs
            else " before any rung finished"))
    elif r.stopped == "interrupted":
        notes.append("interrupted: the rungs measured so far")
    if below_error is not None:
        notes.append(f"the ladder stopped going below the baseline batch: {below_error}")
    if disputed:
        notes.append(f"the data orders disagree at batch{'es' if len(disputed) > 1 else ''} "
                     + _listed([f"{b:,}" for b in disputed])
                     + " (some kept up, some fell behind; the mean decided): the local "
                     "critical batch may be lower or higher than read")
    read = _read_note(r, floor, cut=r.cut_short or below_error is not None)
    if read is not None:
        notes.append(read)
    return dataclasses.replace(r, notes=tuple(notes))


def _read_note(r: BranchResult, floor: int | None, *, cut: bool) -> str | None:
    """What the read (or its absence) means, from how the ladder ended; None when the
    line says it all. ``cut``: something other than the rule ended the ladder."""
    if r.bound == "at most" and r.critical_batch is not None:
        low = r.critical_batch
        if any(g.batch_size < low for g in r.rungs):  # every one below it diverged
            lower = "and below it the ladder diverged"
        elif floor is not None and low <= floor:
            lower = "and the ladder goes no lower"
        elif cut:
            lower = "and the ladder was cut short before it could go lower"
        else:
            lower = "and the ladder cannot go below the baseline batch"
        return (f"already batch {2 * low:,} needed more than {r.tolerance:.3g}x the "
                f"examples of {low:,}: the local critical batch is {low:,} or below, " + lower)
    if r.critical_batch is not None and r.critical_batch < r.baseline_batch:
        double = 2 * r.baseline_batch
        why = (f"already batch {double:,} needed more than {r.tolerance:.3g}x the examples "
               f"of the baseline {r.baseline_batch:,}"
               if any(g.batch_size == double for g in r.rungs) else
               f"batch {double:,} is larger than the dataset")
        return f"{why}: the ladder went below the baseline"
    if r.bound == "at least" and r.cut_short and r.critical_batch is not None:
        top = r.critical_batch
        return (f"so ≥ {top:,} is how far the ladder got before {CUT_BY[r.stopped]} ended "
                f"it, not a ladder top: batch {2 * top:,} was never compared, and the local "
                f"critical batch may be well above {top:,}"
                + ("; a larger probe.max_seconds lets the ladder finish"
                   if r.stopped == "budget" else ""))
    if r.bound == "at least" and r.stopped == "top":
        last = r.rungs[-1].batch_size
        return (f"every rung up to batch {last:,} kept up (the ladder's largest batch): "
                f"the local critical batch is at least {last:,}")
    if r.bound == "none" and r.rungs and not math.isfinite(r.rungs[0].loss):
        return (f"the smallest batch ({r.rungs[0].batch_size:,}) diverged, so no rung has a "
                "loss to be held to: no local critical batch (lower optimizer.lr)")
    if r.bound == "none":
        return NO_LADDER_READ + LADDER_CUT.get(r.stopped, "")
    return None


def frozen_norms(names: Sequence[str]) -> str:
    """BatchNorm layers kept in eval mode: the factory froze them."""
    shown = ", ".join(repr(n) for n in names[:3]) + (f" and {len(names) - 3} more"
                                                     if len(names) > 3 else "")
    them, their = ("them", "their") if len(names) > 1 else ("it", "its")
    return (f"{len(names)} BatchNorm layer{'s' if len(names) > 1 else ''} ({shown}) "
            f"stayed in eval mode, as the factory left {them}, with {their} parameters "
            "frozen: measured as fine-tuning with frozen BatchNorm (the rest of the model "
            "trains)")


def branches_past_plan(spent: int, planned: int) -> str:
    """The branches trained more examples than the run they advise (a trial's short GPT
    run: 18,432 against a planned 3,124, and nothing said so)."""
    return (f"the branches trained {spent:,} examples, {spent / planned:.3g}x the planned "
            f"run's {planned:,}: the measurement cost more than the run it advises")


def ladders_cut(steps: Sequence[int], *, had: float, ladders: int, need: float,
                max_seconds: float, suggested: int, fit: int | None) -> str:
    """The time budget cut ladders short (a trial: 3 of 5 checkpoints' ladders, after 1-2
    doublings): what the branches had, what a complete ladder takes, and how to get
    complete reads (``fit``: how many of ``model.checkpoints`` complete ladders fit)."""
    many = len(steps) > 1
    where = (f"the ladders at steps {_listed([f'{s:,}' for s in steps])}" if many
             else f"the ladder at step {steps[0]:,}")
    each = f", {secs(had / ladders)} for each of {ladders} ladders" if ladders > 1 else ""
    fewer = (f", or keep at most {fit} of the {ladders} model.checkpoints"
             if fit is not None else "")
    return (f"the time budget cut {where} short before {'they' if many else 'it'} ended by "
            f"{'themselves' if many else 'itself'}: the branches had {secs(had)} of "
            f"probe.max_seconds = {max_seconds:g} s{each}, and a complete ladder takes about "
            f"{secs(need)} here; for complete reads set probe.max_seconds to about "
            f"{suggested:,}{fewer}")


def _diverged_rungs(r: BranchResult) -> list[str]:
    """One note for every rung whose loss was not finite, with their learning rates."""
    gone = [g for g in r.rungs if not math.isfinite(g.loss)]
    if not gone:
        return []
    rates = sorted({f"{g.learning_rate:.3g}" for g in gone}, key=float)
    return [f"batch{'es' if len(gone) > 1 else ''} " + _listed([f"{g.batch_size:,}" for g in gone])
            + f" diverged at learning rate{'s' if len(rates) > 1 else ''} "
            + (rates[0] if len(rates) == 1 else f"{rates[0]}–{rates[-1]}")
            + f" ({r.lr_rule}): a diverged rung falls behind"]


def _listed(names: list[str]) -> str:
    """"a", "a and b", "a, b and c"."""
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


NO_LADDER_READ = "fewer than two rungs finished: no local critical batch"
# What cut a ladder short (``BranchResult.cut_short``), by its ``stopped``.
CUT_BY = {"budget": "the time budget", "out of memory": "memory",
          "interrupted": "the interrupt"}


def cut_words(r: BranchResult) -> str:
    """How a cut-short read differs from a ladder that ended by itself: "cut short by the
    time budget before a rung fell behind", or "" for a ladder that ended by itself (or
    gave no read)."""
    if not r.cut_short or r.critical_batch is None:
        return ""
    where = ("before the ladder could go lower" if r.bound == "at most"
             else "before a rung fell behind")
    return f"cut short by {CUT_BY[r.stopped]} {where}"
# Why a ladder without a read ended, when the user can change it.
LADDER_CUT = {"budget": "; the time budget ended the ladder (a larger probe.max_seconds "
                        "lets it climb)"}


def branch_rule(r: BranchResult) -> str:
    """The rule and its constants in one sentence."""
    return (f"each branch trains on {r.delta_examples:,} examples (Δ = "
            f"{r.delta_examples // r.baseline_batch} steps at batch {r.baseline_batch:,}) "
            f"from the same weights and optimizer state; its loss is the mean of its "
            f"evaluations over the last {r.smoothing:.0%} of them, averaged over "
            f"{r.repeats} data order(s); batch B passes when that loss is no higher than "
            f"B/2's after Δ/{r.tolerance:.3g} examples (a doubling costs at most "
            f"{r.tolerance:.3g}x the examples)")


def branch_line(r: BranchResult) -> str:
    """One line: the local critical batch, its bracket, the ratios, the cost."""
    if r.critical_batch is None:
        head = "no local critical batch"
    else:
        lo, hi = r.interval.low, r.interval.high
        where = {"bracketed": f"B_crit {num(lo)}–{num(hi)} by the rule",
                 "at most": f"B_crit below {num(hi)}",
                 "at least": f"B_crit above {num(lo)}"}.get(r.bound, "")
        cut = cut_words(r)
        head = (f"local critical batch {BOUND_MARK.get(r.bound, '')}{r.critical_batch:,} "
                f"({where}{'; ' + cut if cut else ''})")
    ratios = []
    side = BOUND_MARK.get(r.bound, "")
    if r.ratio_simple is not None and r.b_simple is not None:
        ratios.append(f"{side}{r.ratio_simple:.2g}x B_simple ({num(r.b_simple)})")
    if r.ratio_noise is not None and r.b_noise is not None:
        ratios.append(f"{side}{r.ratio_noise:.2g}x B_noise ({num(r.b_noise)})")
    same = f"; {' and '.join(ratios)} at the same weights" if ratios else ""
    return (f"{head}{same}; cost {r.examples:,} training examples, {secs(r.seconds)}, "
            f"from {branch_start(r)}")


def branch_start(r: BranchResult) -> str:
    """Where the branches started: "step 200", or counted from a ``model.checkpoint``
    (:func:`from_checkpoint`)."""
    return f"step {r.step:,}" if r.checkpoint is None else from_checkpoint(r.checkpoint, r.step)


def run_average_line(r: RunAverage) -> str:
    """One line: the run's critical batch between its checkpoints, from the branches, and
    what it rests on: each read with its bound, and the cut-short reads left out."""
    bounds = r.read_bounds or ("bracketed",) * len(r.reads)
    reads = ", ".join(f"{BOUND_MARK.get(side, '')}{b:,} at step {num(s)}"
                      for (s, b), side in zip(r.reads, bounds, strict=True))
    span = f"from step {num(r.from_step)} to {num(r.to_step)}"
    left = _left_out(r)
    if r.critical_batch is None and r.left_out and len(r.reads) < 2:
        return (f"no run average {span}: {left}, and fewer than two complete reads remain"
                + (f" ({reads})" if reads else ""))
    if r.critical_batch is None:
        return (f"no run average {span}: the local reads ({reads}) bound their critical "
                "batches from both sides" + (f"; {left}" if left else ""))
    mark = BOUND_MARK.get(r.bound, "≈ ")
    one_sided = (f"; {r.one_sided} of the reads only bound theirs, so this is a bound too"
                 if r.one_sided else "")
    return (f"the run's critical batch {span} {mark}{num(r.critical_batch)}: the local reads "
            f"({reads}) weighted by the fewest steps each stretch between them needs, as "
            f"S(B) fitted to whole runs would give it{one_sided}" + (f"; {left}" if left else "")
            + " (docs/validation.md: within 2x of the sweeps' B_crit on 17 of 28 points)")


def _left_out(r: RunAverage) -> str:
    """The reads a run average left out (their ladders cut short), or ""."""
    if not r.left_out:
        return ""
    many = len(r.left_out) > 1
    steps = _listed([num(s) for s, _, _, _ in r.left_out])
    values = ", ".join(f"{BOUND_MARK.get(side, '')}{b:,}" for _, b, side, _ in r.left_out)
    causes = sorted({CUT_BY.get(why, why) for _, _, _, why in r.left_out})
    text = (f"left out: the read{'s' if many else ''} at step{'s' if many else ''} {steps} "
            f"({values}), whose ladder{'s' if many else ''} {' or '.join(causes)} cut short "
            f"before {'they' if many else 'it'} ended by {'themselves' if many else 'itself'}: "
            f"{'each says' if many else 'it says'} how far the ladder got, not where the "
            "critical batch is")
    outside = [s for s, _, _, _ in r.left_out if not r.from_step <= s <= r.to_step]
    if outside and len(r.reads) >= 2:
        text += f", so the average spans steps {num(r.from_step)} to {num(r.to_step)} only"
    if any(why == "budget" for _, _, _, why in r.left_out):
        text += (" (a larger probe.max_seconds, or fewer model.checkpoints, lets "
                 f"{'them' if many else 'it'} finish)")
    return text


def with_branches(advice: Advice, inputs: AdvisorInputs, r: BranchResult,
                  measured_b_n: float, measured_name: str, same_weights: bool = False
                  ) -> Advice:
    """``advice`` (already described) with its basis saying how the branches calibrated
    B_n, and the branches' line among the notes. ``measured_b_n``: the noise scale the
    read was paired with; ``same_weights``: measured where the branches started (else
    the advice's own, and the basis says none was measured there)."""
    import dataclasses

    rec = advice.recommendation
    ci = inputs.b_n_ci
    cut = cut_words(r)
    branch = (f"the local critical batch {BOUND_MARK.get(r.bound, '')}{r.critical_batch:,} "
              + (f"({cut}) " if cut else "") + "measured by "
              f"branched runs from {branch_start(r)}")
    b = r.critical_batch
    # a one-sided read on the side the noise scale already lies meets it first
    # (branches.calibrated): B_n is then the noise scale's, not a mean with the bound
    moot = b is not None and ((r.bound == "at least" and b <= measured_b_n)
                              or (r.bound == "at most" and b >= measured_b_n))
    if math.isfinite(measured_b_n):
        where = (f" at {branch_start(r)}" if same_weights else
                 " (the advice's: none was measured at the branches' weights)")
        side = "a lower bound below" if r.bound == "at least" else "an upper bound above"
        noise = (f"B_n = {num(inputs.b_n)} (95% range {num(ci.low)}–{num(ci.high)}), "
                 + (f"{measured_name}{where}: {branch} is {side} it, so it moves nothing"
                    if moot else
                    f"the geometric mean of {measured_name} = {num(measured_b_n)}{where} and "
                    f"{branch}"))
    else:
        noise = f"B_n = {num(inputs.b_n)}, {branch} ({measured_name} unresolved)"
    timing = inputs.timing
    if advice.facts.timing_state in ("ok", "points", "clamped") and timing is not None:
        basis = (f"{noise}; step time {step_time_words(timing)} per device ({timing.source}); "
                 f"the batch minimising predicted wall-clock S(B)·t(B) on {inputs.gpus} "
                 "device(s)")
    else:
        basis = f"noise scale only: no step-time measurement; batch ≈ {noise}"
    note = ("on the shipped problems (docs/validation.md) the branches were repeatable (two "
            "seeds within one doubling on 13 of 14 targets) but read 2.9–5.1x the critical "
            "batch fitted from full sweeps at each problem's first target and 0.24–0.76x "
            "late; their geometric mean with the noise scale was within 2x of it on 20 of "
            "28 points, either alone on 13 (branches) and 19 (noise scale)")
    return dataclasses.replace(advice, recommendation=dataclasses.replace(
        rec, basis=basis, notes=(*rec.notes, note, branch_line(r))))


def describe_lr_search(r: LrSearch, lowest_mean: float | None = None) -> LrSearch:
    """``r`` with its notes written: how the walk ended, and when ``lowest_mean`` (the
    factor with the lowest mean loss) is not the one chosen, why."""
    import dataclasses

    from bsfind.results import stalled_orders

    notes = []
    stalled = stalled_orders({t.factor: t.losses for t in r.trials}, r.start_loss)
    every_stalled = len(r.trials) > 1 and len(stalled) == len(r.trials) and any(
        math.isfinite(t.loss) for t in r.trials)
    for t in r.trials:
        if not math.isfinite(t.loss):
            notes.append(f"{t.factor:g}x the rule's learning rate ({t.learning_rate:.3g}) "
                         "diverged")
        elif t.factor in stalled:
            no = stalled[t.factor]
            which = (f"data order {no[0] + 1}" if len(no) == 1 else
                     "data orders " + " and ".join(str(k + 1) for k in no))
            notes.append(
                f"{t.factor:g}x the rule's learning rate ({t.learning_rate:.3g}) made little "
                f"or no progress on {which} of {len(t.losses)} (loss "
                f"{', '.join(f'{t.losses[k]:.4g}' for k in no)} from {r.start_loss:.4g} where "
                "the runs start, while another rate cut it by more)"
                + ("" if every_stalled else ": not chosen"))
    if every_stalled:
        notes.append("every learning rate tried made little progress on some data order: "
                     "the choice is among them, as far as every data order agrees")
    if r.stopped == "diverged":
        lowest = min(t.factor for t in r.trials)
        notes.append(f"every learning rate tried diverged, down to {lowest:g}x the rule's: "
                     "the rule's stands, and may be too high")
    elif not r.trials:
        notes.append(_unmeasured_why(r) + ": the rule's stands")
    elif r.stopped in _CUT and len(r.trials) == 1:
        notes.append(f"{_CUT[r.stopped](r)} ended the learning-rate search after its first "
                     f"learning rate: {NOTHING_COMPARED}, the rule's stands"
                     if math.isfinite(r.trials[0].loss) else
                     f"{_CUT[r.stopped](r)} ended the learning-rate search after the rule's "
                     "own rate diverged: the rule's stands, and may be too high")
    elif r.stopped == "budget":
        notes.append("the time budget ended the learning-rate search: the best of the "
                     "learning rates that finished")
    elif r.stopped == "out of memory":
        notes.append(f"batch {r.batch_size:,} ran out of memory during the learning-rate "
                     "search: the best of the learning rates that finished")
    if (lowest_mean is not None and lowest_mean != r.factor and r.stopped != "diverged"
            and (every_stalled or lowest_mean not in stalled)):
        notes.append(f"{lowest_mean:g}x the rule's had the lowest mean loss, but not on "
                     f"every data order against its neighbour: {r.factor:g}x kept")
    if r.stopped == "limit":
        notes.append(f"the lowest loss was at the learning-rate search's limit ({r.factor:g}x "
                     "the rule's): the best learning rate may lie further out")
    return dataclasses.replace(r, notes=tuple(notes))


# What can end a learning-rate search early (LrSearch.stopped), in words.
_CUT: dict[str, Callable[[LrSearch], str]] = {
    "budget": lambda r: "the time budget",
    "out of memory": lambda r: f"running out of memory at batch {r.batch_size:,}",
    "interrupted": lambda r: "an interrupt",
}
NOTHING_COMPARED = "nothing to compare it with"


def one_trial_cut(r: LrSearch) -> bool:
    """Did the budget (or memory) end the search after its first trial, the rule's own
    rate? Its line then says all its notes say (``pipeline.with_lr_search``)."""
    return len(r.trials) == 1 and r.stopped in _CUT


def _unmeasured_why(r: LrSearch) -> str:
    """Why a learning-rate search has no trial at all."""
    return {"budget": "the time budget ended before the first learning rate finished",
            "out of memory": f"batch {r.batch_size:,} ran out of memory",
            "interrupted": "interrupted before the first learning rate finished",
            }.get(r.stopped, "no learning rate finished")


def lr_search_line(r: LrSearch) -> str:
    """One line: what the learning-rate runs found."""
    if not r.trials:
        return (f"learning rate at batch {r.batch_size:,}: not measured ({_unmeasured_why(r)}); "
                f"the {r.lr_rule} rule's {r.rule_learning_rate:.3g} stands")
    tried = ", ".join(f"{t.factor:g}x → {num(t.loss)}" for t in r.trials)
    if one_trial_cut(r):  # nothing compared: not a measurement
        if not math.isfinite(r.trials[0].loss):
            return (f"learning rate at batch {r.batch_size:,}: the rule's own rate diverged "
                    f"({tried}) before {_CUT[r.stopped](r)} ended the short runs; the "
                    f"{r.lr_rule} rule's {r.rule_learning_rate:.3g} stands, and may be too high")
        return (f"learning rate at batch {r.batch_size:,}: not measured ({_CUT[r.stopped](r)} "
                f"ended the short runs after the rule's own rate, {tried}); the {r.lr_rule} "
                f"rule's {r.rule_learning_rate:.3g} stands")
    verdict = ("the rule's stands" if r.factor == 1.0 else
               f"{r.factor:g}x the rule's {r.rule_learning_rate:.3g}: {r.learning_rate:.3g}")
    where = "the probe run's start" if r.step == 0 else f"training step {r.step:,}"
    accumulated = ("" if r.micro_batch is None else
                   f", each step accumulating micro-batches of {r.micro_batch:,}")
    return (f"learning rate at batch {r.batch_size:,}, measured by short runs from {where} "
            f"({r.steps} steps, then {r.cooldown} decaying to 0; {r.repeats} data orders"
            f"{accumulated}), loss at the end by factor on the rule's: {tried}; {verdict}")


def lr_not_measured(rule: str, why: str) -> str:
    """The note when the learning rate could not be measured at the recommended batch."""
    return (f"the learning rate is the {rule} rule's extrapolation from the baseline's, not "
            f"measured at this batch ({why})")


def per_device(batch: int, largest: int, accumulation: int, gpus: int) -> str:
    """The examples per device in one forward: ``largest``, or the range when ``batch``
    does not split evenly over the devices and micro-steps (a review: "1,736 (579 per
    device × 3)" is 1,737; it is 578–579)."""
    smallest = batch // max(1, accumulation * gpus)
    return f"{largest}" if smallest >= largest else f"{smallest}–{largest}"


def lr_label(lr_rule: str, lr_factor: float | None) -> str:
    """Where the recommended learning rate came from, in a few words."""
    if lr_factor is None:
        return f"rule: {lr_rule}"
    return f"measured: {lr_factor:g}× the {lr_rule} rule's"
