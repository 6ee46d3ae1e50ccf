"""The tracker as a Hugging Face TrainerCallback: the noise scale in the Trainer's logs.

    from transformers import Trainer
    from bsfind.integrations.transformers import NoiseScaleCallback

    trainer = Trainer(model=model, args=args, train_dataset=train)
    NoiseScaleCallback.attach(trainer, log_path="noise.jsonl")
    trainer.train()

At every logging step the latest values (``bsfind/b_simple``,
``bsfind/b_simple_low``/``_high``, ``bsfind/grad_norm_sq``, ``bsfind/trace_sigma``,
``bsfind/b_big``, ``bsfind/examples``) are put in the ``logs`` of ``on_log`` and in
``state.log_history``. :meth:`NoiseScaleCallback.attach` puts the callback first in
the Trainer's list, so that every ``report_to`` backend (TensorBoard, W&B, ...),
which receives the same ``logs`` after it, logs them too; passed through
``callbacks=[...]`` it comes after those backends and only ``state.log_history``
and later callbacks see its values.

The Trainer clips gradients (``max_grad_norm``, 1.0 by default) before any
callback runs, so the gradients are read where the backward of each micro-batch
ends: a forward hook on the model hooks the autograd graph of its output, which
asks the autograd engine to run the tracker once that backward has finished (the
engine's final callback, as DDP and FSDP use), before the Trainer unscales AMP
gradients or clips them. Under data parallelism the tracker pairs each rank's
gradient with the all-reduced one through a comm hook on the Trainer's
DistributedDataParallel model, which needs ``attach``.

With ``double=True``, at the start of an epoch (where the Trainer reads
``args.gradient_accumulation_steps`` for the epoch) it doubles
``gradient_accumulation_steps`` when the advice says doubling the batch pays, and
scales the learning rate and the scheduler's base rates by the rule of
:func:`bsfind.advisor.scaled_lr`. The scheduler keeps its planned number of steps.

The Trainer's checkpoints keep the callback's state (the tracker's step and example
counts, and the doublings made) in ``trainer_state.json``, under ``stateful_callbacks``
as ``"bsfind"`` (``"bsfind:<prefix>"`` for another ``prefix``): a run resumed with
``trainer.train(resume_from_checkpoint=...)`` goes on counting from the checkpoint,
its ``log_path`` keeps the records before it (:class:`~bsfind.tracker.Tracker`'s
``step``/``examples``), and the accumulation the doublings left is set again (the
checkpoint's learning rates were scaled for it; but the Trainer finds its place in the
data from the step count at the configured accumulation, so a run resumed after a
doubling trains again part of what it trained, up to whole epochs). The entry is not a
callback the Trainer can rebuild: with ``restore_callback_states_from_checkpoint=True``
it logs that it ignores it.

Needs ``pip install 'bsfind[transformers]'`` (transformers and accelerate).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from bsfind import torch_compat as compat
from bsfind.tracker import (
    DEFAULT_WINDOW,
    Doubling,
    Tracker,
    callback_options,
    callback_state,
    close_earlier,
    doubling_now,
    epoch_sampled_size,
    resumed,
    scale_learning_rate,
)

try:
    from accelerate.state import GradientState
    from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "bsfind.integrations.transformers needs transformers and accelerate: "
        "pip install 'bsfind[transformers]'"
    ) from exc


def state_key(prefix: str) -> str:
    """The callback's entry in TrainerState.stateful_callbacks: one per metric prefix, so
    that two callbacks keep their own (a review: the second overwrote the first's)."""
    return "bsfind" if prefix == "bsfind/" else f"bsfind:{prefix}"


def _stateful(state: Any) -> dict[str, Any]:
    """``TrainerState.stateful_callbacks``: declared a list, a dict once the state exists."""
    entries = getattr(state, "stateful_callbacks", None)
    if not isinstance(entries, dict):
        entries = {}
        state.stateful_callbacks = entries
    return entries


def _tensors(output: Any) -> list[torch.Tensor]:
    """The tensors of a model output (a tensor, a tuple/list, a dict or a ModelOutput)."""
    if isinstance(output, torch.Tensor):
        return [output]
    if isinstance(output, dict):  # ModelOutput is an OrderedDict
        output = list(output.values())
    if isinstance(output, (list, tuple)):
        return [t for item in output for t in _tensors(item)]
    return []


def _batch_size(args: Any, kwargs: dict[str, Any]) -> int | None:
    """Examples in a forward's batch: the first axis of its first tensor input
    (input_ids, pixel_values, ...); None when it has none."""
    for v in (*args, *kwargs.values()):
        if isinstance(v, torch.Tensor) and v.dim() > 0:
            return int(v.shape[0])
    return None


def _loss(output: Any) -> torch.Tensor | None:
    loss = output.get("loss") if isinstance(output, dict) else getattr(output, "loss", None)
    return loss if isinstance(loss, torch.Tensor) and loss.dim() == 0 else None


def token_scale(args: Any) -> int:
    """What the summed micro-batch losses of one rank are multiplied by to be that rank's
    mean loss. With ``average_tokens_across_devices`` (the default) under data
    parallelism, the Trainer gives the model ``num_items_in_batch`` counted over every
    rank, so each rank's losses add up to its share of the global mean; the Trainer
    itself multiplies them back by the number of processes (``Trainer.compute_loss``).
    The callback reads the model's output, before that: it does the same."""
    world = int(getattr(args, "world_size", 1) or 1)
    return world if getattr(args, "average_tokens_across_devices", False) and world > 1 else 1


class NoiseScaleCallback(TrainerCallback):
    """Track the gradient noise scale during ``Trainer.train`` and log it.

    Args:
        every, window, timing, ddp_comm_hook: as for :class:`bsfind.tracker.Tracker`.
        log_path: also write the records as JSON lines there (rank 0).
        double: double ``gradient_accumulation_steps`` at an epoch start when the
            advice says doubling the batch pays, with the learning-rate rule.
        max_accumulation: never accumulate more micro-batches than this.
        lr_rule: "auto" (the optimizer family's rule), "linear", "sqrt" or "none".
        prefix: of the logged metric names.

    Attributes:
        tracker: the :class:`~bsfind.tracker.Tracker` (from ``on_train_begin``).
        doublings: every doubling made, in order.
    """

    def __init__(
        self,
        *,
        every: int | None = None,
        window: int = DEFAULT_WINDOW,
        log_path: str | Path | None = None,
        timing: Any = None,
        double: bool = False,
        max_accumulation: int | None = None,
        lr_rule: str = "auto",
        prefix: str = "bsfind/",
        ddp_comm_hook: tuple[Any, Any] | None = None,
    ) -> None:
        self.options = callback_options(every=every, window=window, log_path=log_path,
                                        timing=timing, ddp_comm_hook=ddp_comm_hook,
                                        max_accumulation=max_accumulation, lr_rule=lr_rule)
        self.timing = timing
        self.double = double
        self.max_accumulation = max_accumulation
        self.lr_rule = lr_rule
        self.prefix = prefix
        self.trainer: Any = None
        self.tracker: Tracker | None = None
        self.doublings: list[Doubling] = []
        self._hook: Any = None
        self._state: Any = None  # the TrainerState of the run it tracks (close_earlier)
        self._losses: list[torch.Tensor] = []
        self._summed = False  # the micro-batch losses add up to the step's (see _on_forward)
        self._token_scale = 1  # see token_scale
        self._last_task: int | None = None

    @classmethod
    def attach(cls, trainer: Any, **options: Any) -> NoiseScaleCallback:
        """Add a new callback in front of ``trainer``'s others (before the ``report_to``
        backends, so they log its metrics) and let it find the DDP model; returns it."""
        cb = cls(**options)
        cb.trainer = trainer
        trainer.callback_handler.callbacks.insert(0, cb)
        return cb

    # -- set-up ---------------------------------------------------------------------------
    def on_train_begin(self, args: TrainingArguments, state: TrainerState,
                       control: TrainerControl, model: nn.Module | None = None,
                       optimizer: Any = None, **kwargs: Any) -> None:
        if model is None:
            raise RuntimeError("the Trainer passed no model to NoiseScaleCallback")
        if not compat.can_queue_backward_callback():
            raise RuntimeError("NoiseScaleCallback needs torch's autograd engine callbacks "
                               "(torch.autograd.Variable._execution_engine.queue_callback), "
                               "which this torch lacks")
        tracked: nn.Module = model
        if args.world_size > 1:
            from torch.nn.parallel import DistributedDataParallel

            wrapped = getattr(self.trainer, "model_wrapped", None)
            if not isinstance(wrapped, DistributedDataParallel):
                raise RuntimeError(
                    "NoiseScaleCallback under data parallelism needs the Trainer's "
                    "DistributedDataParallel model: add it with "
                    "NoiseScaleCallback.attach(trainer) (FSDP and DeepSpeed are not supported)")
            tracked = wrapped
        # AcceleratedOptimizer holds the GradScaler of fp16 training.
        scaler = getattr(optimizer, "scaler", None)
        self._token_scale = token_scale(args)
        saved = _stateful(state).get(state_key(self.prefix))
        start = resumed(saved if isinstance(saved, dict) else None, state.global_step,
                        "NoiseScaleCallback")
        self.doublings = list(start.doublings)
        if start.accumulation is not None:
            # the checkpoint's learning rates were scaled for this accumulation
            args.gradient_accumulation_steps = start.accumulation
        self.on_train_end(args, state, control)  # a train() that raised left them on
        # the Trainer hands every callback its one TrainerState: another callback's
        # tracker made for the same state is a sibling's, one of an earlier Trainer stale
        self._state = state
        close_earlier(tracked, self.options["log"],
                      lambda owner: (isinstance(owner, NoiseScaleCallback) and owner is not self
                                     and owner._state is state), "NoiseScaleCallback")
        self.tracker = Tracker(tracked, scaler=scaler, step=start.step,
                               examples=start.examples,
                               dataset_size=epoch_sampled_size(kwargs.get("train_dataloader")),
                               **self.options)
        self.tracker.owner = self
        from bsfind.noise.per_example.hooks import Hook  # (a copy of the model's does nothing)

        self._hook = model.register_forward_hook(Hook(self._on_forward), with_kwargs=True)

    def on_train_end(self, args: TrainingArguments, state: TrainerState,
                     control: TrainerControl, **kwargs: Any) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        if self.tracker is not None:
            self.tracker.close()

    # -- every micro-batch --------------------------------------------------------------------
    def _on_forward(self, module: nn.Module, args: Any, kwargs: dict[str, Any],
                    output: Any) -> None:
        if self.tracker is None or self.tracker.closed:  # a newer tracker closed it: leave
            if self._hook is not None:
                self._hook.remove()
                self._hook = None
            return
        if not (torch.is_grad_enabled() and module.training):
            return
        loss = _loss(output)
        if loss is not None:
            self._losses.append(loss.detach())
            # Given num_items_in_batch, the model divides each micro-batch's summed loss
            # by the whole step's count: the micro-batch losses then add up to the
            # step's mean (without it each is its own mean, and they are averaged).
            self._summed = kwargs.get("num_items_in_batch") is not None
        last = GradientState().sync_gradients  # the Trainer sets it before each micro-batch
        batch = _batch_size(args, kwargs)  # a DataLoader's partial last batch counts as such
        nodes = {t.grad_fn for t in _tensors(output) if t.grad_fn is not None}
        fired = [False]

        def at_start_of_backward(grad_outputs: Any) -> None:
            if compat.in_internal_backward():
                return  # the per-example hooks' own check, inside the forward
            task = compat.current_graph_task_id()
            if fired[0] or (task is not None and task == self._last_task):
                return  # another output of this forward, or of another forward, same backward
            fired[0] = True
            self._last_task = task
            # Queued from a final callback, it runs after those queued during the
            # backward: DDP's, which waits for the all-reduce.
            def queue_again() -> None:
                compat.queue_backward_callback(lambda: self._after_backward(last, batch))

            compat.queue_backward_callback(queue_again)

        for node in nodes:
            node.register_prehook(at_start_of_backward)

    def _after_backward(self, last: bool, batch: int | None) -> None:
        if self.tracker is None:
            return
        if last:
            losses = torch.stack(self._losses) if self._losses else None
            loss = (None if losses is None else losses.sum() * self._token_scale if self._summed
                    else losses.mean())
            self._losses = []
            self.tracker.update(loss, batch_size=batch)
        else:
            self.tracker.micro_step(batch_size=batch)

    def on_step_end(self, args: TrainingArguments, state: TrainerState,
                    control: TrainerControl, **kwargs: Any) -> None:
        # Before the Trainer saves a checkpoint at this step (it writes stateful_callbacks
        # into trainer_state.json as they are; a plain dict is kept as it is).
        _stateful(state)[state_key(self.prefix)] = callback_state(self.tracker, self.doublings)

    # -- logs ---------------------------------------------------------------------------------
    def on_log(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
               logs: dict[str, Any] | None = None, **kwargs: Any) -> None:
        rec = self.tracker.latest if self.tracker is not None else None
        if rec is None or logs is None:
            return
        metrics = rec.metrics(self.prefix)
        logs.update(metrics)
        # The Trainer appended a copy of ``logs`` to the history just before on_log.
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(metrics)

    # -- acting on the advice -----------------------------------------------------------------
    def on_epoch_begin(self, args: TrainingArguments, state: TrainerState,
                       control: TrainerControl, optimizer: Any = None,
                       lr_scheduler: Any = None, **kwargs: Any) -> None:
        if not self.double or self.tracker is None or optimizer is None:
            return
        acc = args.gradient_accumulation_steps
        inner = getattr(optimizer, "optimizer", optimizer)  # AcceleratedOptimizer wraps it
        decided = doubling_now(self.tracker, acc, max_accumulation=self.max_accumulation,
                               optimizer=inner, timing=self.timing, lr_rule=self.lr_rule)
        if decided is None:
            return
        adv, factor = decided
        args.gradient_accumulation_steps = 2 * acc
        scale_learning_rate(inner, factor, [lr_scheduler] if lr_scheduler is not None else [])
        self.doublings.append(Doubling(
            step=state.global_step, epoch=int(state.epoch or 0), accumulation=2 * acc,
            batch_size=2 * adv.batch_size, lr_factor=factor, basis=adv.basis,
            b_simple=adv.b_simple, ci95=adv.ci95))
