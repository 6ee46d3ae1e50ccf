"""The tracker as a Lightning Callback: the noise scale in your loggers.

    import lightning as L
    from bsfind.integrations.lightning import NoiseScaleMonitor

    trainer = L.Trainer(callbacks=[NoiseScaleMonitor(log_path="noise.jsonl")])
    trainer.fit(module, loader)

Metrics (``bsfind/b_simple``, ``bsfind/b_simple_low``/``_high``, ``bsfind/grad_norm_sq``,
``bsfind/trace_sigma``, ``bsfind/b_big``, ``bsfind/examples``: the latest record) go
through ``pl_module.log_dict`` at the steps where the Trainer writes step metrics
(every ``log_every_n_steps`` optimizer steps), so every logger of the Trainer gets them.
``accumulate_grad_batches`` and DDP are handled: the callback feeds the tracker
(:mod:`bsfind.tracker`) from ``on_after_backward`` (after each micro-batch's
backward, before Lightning unscales AMP gradients and clips), pairing micro-batches
under accumulation and each rank's gradient with the all-reduced one under DDP (a
comm hook on the strategy's DistributedDataParallel).

With ``double=True`` it acts on :meth:`~bsfind.tracker.Tracker.advice`: at the
start of an epoch, the only point where Lightning lets accumulation change (as its
own ``GradientAccumulationScheduler`` does), it doubles
``trainer.accumulate_grad_batches`` when doubling the batch pays, and multiplies
every learning rate (and the LR schedulers' base rates) by the rule of
:func:`bsfind.advisor.scaled_lr` for the optimizer's family. Without ``timing``
the step-time curve is the one the tracker measures from its step times once two
batch sizes were seen, and before that the noise scale alone decides (see
:class:`~bsfind.tracker.TrackerAdvice`). On one device, doubling through
accumulation does not make a step cheaper per example: pass the step-time curve
of your setup when you have one.

Lightning's checkpoints keep the callback's state (the tracker's step and example
counts, and the doublings made): a run resumed with ``trainer.fit(..., ckpt_path=...)``
goes on counting from the checkpoint, its ``log_path`` keeps the records before it
(:class:`~bsfind.tracker.Tracker`'s ``step``/``examples``), and the accumulation the
doublings left is set again (the checkpoint's learning rates were scaled for it).

Needs ``pip install 'bsfind[lightning]'`` (``lightning.pytorch``) and automatic
optimization; with manual optimization, call :func:`bsfind.track` in ``training_step``.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

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
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import Callback, GradientAccumulationScheduler
    from lightning.pytorch.utilities.data import extract_batch_size
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "bsfind.integrations.lightning needs Lightning: pip install 'bsfind[lightning]'"
    ) from exc


class NoiseScaleMonitor(Callback):
    """Track the gradient noise scale during ``Trainer.fit`` and log it.

    Args:
        every, window, timing, ddp_comm_hook: as for :class:`bsfind.tracker.Tracker`.
        log_path: also write the records as JSON lines there (rank 0).
        double: double ``accumulate_grad_batches`` at an epoch start when the advice
            says doubling the batch pays, with the learning-rate rule.
        max_accumulation: never accumulate more micro-batches than this.
        lr_rule: "auto" (the optimizer family's rule), "linear", "sqrt" or "none".
        prefix: of the logged metric names.

    Attributes:
        tracker: the :class:`~bsfind.tracker.Tracker` (from ``on_train_start``).
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
        super().__init__()
        self.options = callback_options(every=every, window=window, log_path=log_path,
                                        timing=timing, ddp_comm_hook=ddp_comm_hook,
                                        max_accumulation=max_accumulation, lr_rule=lr_rule)
        self.timing = timing
        self.double = double
        self.max_accumulation = max_accumulation
        self.lr_rule = lr_rule
        self.prefix = prefix
        self.tracker: Tracker | None = None
        self.doublings: list[Doubling] = []
        self._batch: int | None = None
        self._batch_idx = 0
        self._loss: torch.Tensor | None = None
        self._micros = 0  # micro-batches of the current optimizer step
        self._stepped = False  # the last backward was an optimizer step's last
        self._saved: dict[str, Any] | None = None  # the checkpoint's state (load_state_dict)

    # -- checkpoints ------------------------------------------------------------------------
    @property
    def state_key(self) -> str:
        # one per metric prefix and log: two monitors in one Trainer keep their own state
        # (Lightning refuses two stateful callbacks with the same key)
        return self._generate_state_key(prefix=self.prefix, log=str(self.options["log"]))

    def state_dict(self) -> dict[str, Any]:
        """Saved in Lightning's checkpoints: the tracker's counts and the doublings made."""
        return callback_state(self.tracker, self.doublings)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """A resumed ``fit(ckpt_path=...)``: the tracker goes on from the checkpoint."""
        self._saved = dict(state_dict)

    # -- set-up ---------------------------------------------------------------------------
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not pl_module.automatic_optimization:
            raise RuntimeError(
                "NoiseScaleMonitor needs automatic optimization; with manual optimization "
                "call bsfind.track(model) and tracker.update() in training_step")
        if self.double and any(isinstance(cb, GradientAccumulationScheduler)
                               for cb in trainer.callbacks):  # type: ignore[attr-defined]
            raise ValueError("NoiseScaleMonitor(double=True) changes accumulate_grad_batches "
                             "itself: remove the GradientAccumulationScheduler callback")
        from torch.nn.parallel import DistributedDataParallel

        wrapped = trainer.strategy.model
        model = wrapped if isinstance(wrapped, DistributedDataParallel) else pl_module
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        start = resumed(self._saved, trainer.global_step, "NoiseScaleMonitor")
        self._saved = None
        self.doublings = list(start.doublings)
        if start.accumulation is not None:
            # the checkpoint's learning rates were scaled for this accumulation
            trainer.accumulate_grad_batches = start.accumulation
        if self.tracker is not None:  # a fit that raised left it open
            self.tracker.close()
        callbacks = trainer.callbacks  # type: ignore[attr-defined]
        close_earlier(model, self.options["log"],
                      lambda owner: owner is not self and any(owner is c for c in callbacks),
                      "NoiseScaleMonitor")
        try:
            self.tracker = Tracker(model, scaler=scaler, step=start.step,
                                   examples=start.examples,
                                   dataset_size=epoch_sampled_size(trainer.train_dataloader),
                                   **self.options)
            self.tracker.owner = self
        except RuntimeError as exc:  # DDP allows one comm hook
            if "comm_hook" in str(exc) or "communication hook" in str(exc).lower():
                raise RuntimeError(
                    "the DDP strategy already has a comm hook: pass it to "
                    "NoiseScaleMonitor(ddp_comm_hook=(state, hook)) instead, which wraps it"
                ) from exc
            raise

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.tracker is not None:
            self.tracker.close()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                     exception: BaseException) -> None:
        if self.tracker is not None:  # its hooks off the model, its log closed
            self.tracker.close()

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        # validate/test with a checkpoint load this state too, and a fit can end before
        # on_train_start: the state must not carry over to a later fresh fit (a review's
        # validate-then-fit counted on from the checkpoint)
        self._saved = None

    # -- every micro-batch --------------------------------------------------------------------
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                             batch: Any, batch_idx: int) -> None:
        try:
            self._batch = extract_batch_size(batch)
        except Exception:  # a batch Lightning cannot size: the tracker reads the forward's input
            self._batch = None
        self._batch_idx = batch_idx

    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           loss: torch.Tensor) -> None:
        # Lightning backpropagates loss / accumulate_grad_batches: their sum is the step's mean.
        # Under 16-mixed the hook gets the loss already multiplied by the GradScaler's scale.
        d = loss.detach()
        scale = compat.loss_scale(getattr(trainer.precision_plugin, "scaler", None))
        if scale is not None:
            d = d / scale
        self._loss = d if self._loss is None else self._loss + d

    def on_after_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.tracker is None or self.tracker.closed:  # (a newer tracker closed it, warned)
            return
        acc = trainer.accumulate_grad_batches
        n = trainer.num_training_batches
        # Lightning steps after every acc-th batch of an epoch and after its last batch
        # (of a loader without a length, known from its data fetcher: a review's iterable
        # loader counted 6 steps of Lightning's 8 in 2 epochs)
        progress = getattr(getattr(trainer.fit_loop, "epoch_loop", None), "batch_progress", None)
        last = ((self._batch_idx + 1) % acc == 0
                or (math.isfinite(n) and self._batch_idx + 1 >= n)
                or bool(getattr(progress, "is_last_batch", False)))
        self._stepped = last
        self._micros += 1
        if last:
            # An epoch's short last step (fewer than acc micro-batches) still had each loss
            # divided by acc: its losses sum to k/acc of the step's mean, and the tracker
            # rescales its gradients (a trial's such steps logged tr(Σ) 1.37 among 8-9).
            k, loss = self._micros, self._loss
            short = k < acc
            if short and loss is not None:
                loss = loss * (acc / k)
            self.tracker.update(loss, batch_size=self._batch, divisor=acc if short else None)
            self._loss, self._micros = None, 0
        else:
            self.tracker.micro_step(batch_size=self._batch)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           outputs: Any, batch: Any, batch_idx: int) -> None:
        rec = self.tracker.latest if self.tracker is not None else None
        every = int(getattr(trainer, "log_every_n_steps", 50))  # set at run time, not declared
        # Only where Lightning writes step metrics (a batch that stepped, at its
        # log_every_n_steps); log_dict costs about 2 ms a call.
        if (rec is not None and every > 0 and self._stepped
                and trainer.global_step % every == 0):
            pl_module.log_dict(rec.metrics(self.prefix), on_step=True, on_epoch=False)

    # -- acting on the advice -----------------------------------------------------------------
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.double or self.tracker is None or not trainer.optimizers:
            return
        acc = trainer.accumulate_grad_batches
        decided = doubling_now(self.tracker, acc, max_accumulation=self.max_accumulation,
                               optimizer=trainer.optimizers[0], timing=self.timing,
                               lr_rule=self.lr_rule)
        if decided is None:
            return
        adv, factor = decided
        trainer.accumulate_grad_batches = 2 * acc
        scale_learning_rate(trainer.optimizers, factor,
                            [cfg.scheduler for cfg in trainer.lr_scheduler_configs])
        self.doublings.append(Doubling(
            step=trainer.global_step, epoch=trainer.current_epoch, accumulation=2 * acc,
            batch_size=2 * adv.batch_size, lr_factor=factor, basis=adv.basis,
            b_simple=adv.b_simple, ci95=adv.ci95))
