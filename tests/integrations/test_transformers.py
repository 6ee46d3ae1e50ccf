"""NoiseScaleCallback in a real transformers.Trainer on CPU.

    .venv/bin/python -m pytest tests/integrations/test_transformers.py -q

The metrics reach the ``logs`` every later callback (a report_to backend) receives in
on_log and ``state.log_history``; their values at learning rate 0 match the exact
noise scale although the Trainer clips gradients (tests/tracking.py); with
double=True accumulation and the learning rate change as the rule says.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bsfind.advisor import scaled_lr
from tests import tracking
from tests.tracking import REL

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")
from transformers import Trainer, TrainerCallback, TrainingArguments  # noqa: E402

from bsfind.integrations.transformers import NoiseScaleCallback  # noqa: E402


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    torch.set_num_threads(1)
    yield


class Classifier(nn.Module):
    """Returns what a transformers model returns: a dict with the loss."""

    def __init__(self) -> None:
        super().__init__()
        self.net = tracking.model()

    def forward(self, x: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        logits = self.net(x)
        return {"loss": F.cross_entropy(logits, labels), "logits": logits}


class Examples(torch.utils.data.Dataset):
    def __init__(self) -> None:
        self.x, self.y = tracking.problem()

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"x": self.x[i], "labels": self.y[i]}


class Reporter(TrainerCallback):
    """Stands for a report_to backend: keeps the logs it is given."""

    def __init__(self) -> None:
        self.logs: list[dict[str, Any]] = []

    def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kw: Any) -> None:
        self.logs.append(dict(logs or {}))


def _args(tmp_path: Path, **kwargs: Any) -> TrainingArguments:
    base: dict[str, Any] = dict(output_dir=str(tmp_path), learning_rate=0.0, report_to="none",
                                use_cpu=True, save_strategy="no", disable_tqdm=True, seed=0,
                                logging_steps=10)
    return TrainingArguments(**{**base, **kwargs})


def test_metrics_reach_every_logger_and_are_exact(tmp_path: Path) -> None:
    reporter = Reporter()
    trainer = Trainer(model=Classifier(), args=_args(tmp_path, per_device_train_batch_size=64,
                                                     max_steps=200),
                      train_dataset=Examples(), callbacks=[reporter])
    callback = NoiseScaleCallback.attach(trainer, every=1, window=10_000,
                                         log_path=tmp_path / "noise.jsonl")
    trainer.train()
    exact = tracking.exact_b_simple()
    assert callback.tracker is not None
    rec = callback.tracker.records[-1]
    assert rec.method == "per-example" and rec.b_big == 64 and rec.step == 199
    # the Trainer's loader shuffles without replacement: corrected for its 2,048 examples
    assert callback.tracker.dataset_size == 2048
    assert rec.b_simple == pytest.approx(exact, rel=REL)  # read before the Trainer clipped
    seen = [logs for logs in reporter.logs if "bsfind/b_simple" in logs]
    assert len(seen) == 21  # 20 logging steps and the end of training
    history = [h for h in trainer.state.log_history if "bsfind/b_simple" in h]
    assert len(history) == 21 and history[-2]["step"] == 200
    assert history[-2]["bsfind/b_simple"] == pytest.approx(exact, rel=REL)
    assert {"bsfind/grad_norm_sq", "bsfind/trace_sigma", "bsfind/b_simple_low",
            "bsfind/b_simple_high", "loss", "grad_norm"} <= set(seen[-2])
    assert len((tmp_path / "noise.jsonl").read_text().splitlines()) == 200


class Copier(TrainerCallback):
    """Copies and saves the model after each step, as an EMA or a snapshot does."""

    def on_step_end(self, args: Any, state: Any, control: Any, model: Any = None,
                    **kw: Any) -> None:
        import copy
        import io

        copy.deepcopy(model)
        torch.save(model, io.BytesIO())


def test_the_model_copies_and_saves_while_the_callback_tracks_it(tmp_path: Path) -> None:
    """The callback's own forward hook was a bound method: a copy of the model copied
    the callback and its tracker, and failed on the hooks' AccumulateGrad nodes (a
    review). Its copy does nothing now, and every step is measured."""
    trainer = Trainer(model=Classifier(), args=_args(tmp_path, per_device_train_batch_size=32,
                                                     max_steps=6),
                      train_dataset=Examples(), callbacks=[Copier()])
    callback = NoiseScaleCallback.attach(trainer, every=1)
    trainer.train()
    assert callback.tracker is not None and len(callback.tracker.records) == 6


def test_gradient_accumulation_pairs_the_micro_batches(tmp_path: Path) -> None:
    """Passed in callbacks=[...] it still fills state.log_history."""
    callback = NoiseScaleCallback(window=10_000)
    trainer = Trainer(model=Classifier(),
                      args=_args(tmp_path, per_device_train_batch_size=16,
                                 gradient_accumulation_steps=4, max_steps=200),
                      train_dataset=Examples(), callbacks=[callback])
    trainer.train()
    assert callback.tracker is not None
    recs = callback.tracker.records
    assert len(recs) == 200 and recs[-1].method == "accumulation"
    assert (recs[-1].b_small, recs[-1].b_big) == (16, 64)
    assert recs[-1].b_simple == pytest.approx(tracking.exact_b_simple(), rel=REL)
    assert sum("bsfind/b_simple" in h for h in trainer.state.log_history) == 21


def test_doubling_changes_accumulation_and_learning_rate_by_the_rule(tmp_path: Path) -> None:
    """As in the Lightning test: t0 = 1 s, c = 1 µs makes every doubling pay; accumulation
    goes 1 -> 2 -> 4 (the cap) at the epoch starts, the learning rate by the SGD rule."""
    callback = NoiseScaleCallback(every=1, double=True, timing=(1.0, 1e-6), max_accumulation=4)
    args = _args(tmp_path, per_device_train_batch_size=64, num_train_epochs=3,
                 learning_rate=0.1, optim="sgd", lr_scheduler_type="constant")
    trainer = Trainer(model=Classifier(), args=args, train_dataset=Examples(),
                      callbacks=[callback])
    trainer.train()
    assert args.gradient_accumulation_steps == 4
    assert [(d.epoch, d.accumulation, d.batch_size) for d in callback.doublings] == [
        (1, 2, 128), (2, 4, 256)]
    lr = 0.1
    for d in callback.doublings:
        assert d.basis == "time" and d.b_simple is not None
        rule, name = scaled_lr(1.0, d.batch_size // 2, d.batch_size, d.b_simple, "sgd")
        assert d.lr_factor == pytest.approx(rule) and name == "mccandlish" and rule > 1
        lr *= d.lr_factor
    assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(lr)
    assert callback.tracker is not None
    bigs = [r.b_big for r in callback.tracker.records]
    assert bigs == [64] * 32 + [128] * 16 + [256] * 8  # 2048 examples an epoch


class _Tokens(torch.utils.data.Dataset):
    def __init__(self) -> None:
        self.ids = torch.randint(0, 50, (256, 12), generator=torch.Generator().manual_seed(1))

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def test_a_gpt2_without_accumulation_is_measured_on_every_scheduled_step(
        tmp_path: Path) -> None:
    """GPT-2's position embeddings are broadcast over the batch, so the per-example hooks
    check the forward's outputs with torch.autograd.grad; that check must not pass for
    the training backward (a new user's run got one record in 384 steps)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=50, n_positions=12, n_embd=16, n_layer=1,
                                       n_head=2, bos_token_id=0, eos_token_id=0))
    trainer = Trainer(model=model, args=_args(tmp_path, per_device_train_batch_size=16,
                                              max_steps=12, learning_rate=1e-3),
                      train_dataset=_Tokens())
    callback = NoiseScaleCallback.attach(trainer, every=4)
    trainer.train()
    assert callback.tracker is not None
    recs = callback.tracker.records
    assert [r.step for r in recs] == [0, 4, 8]
    assert all(r.method == "per-example" and r.b_big == 16 for r in recs)


def test_the_logged_loss_is_the_steps_mean_with_or_without_accumulation(
        tmp_path: Path) -> None:
    """The Trainer gives the model num_items_in_batch: each micro-batch's loss is then
    its share of the step's, and they add up (their mean read half with 2 micro-batches)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    losses = []
    for acc, per_device in ((1, 16), (2, 8)):
        torch.manual_seed(0)
        model = GPT2LMHeadModel(GPT2Config(vocab_size=50, n_positions=12, n_embd=16,
                                           n_layer=1, n_head=2, bos_token_id=0,
                                           eos_token_id=0))
        trainer = Trainer(model=model, args=_args(tmp_path, per_device_train_batch_size=per_device,
                                                  gradient_accumulation_steps=acc, max_steps=3),
                          train_dataset=_Tokens())
        callback = NoiseScaleCallback.attach(trainer, every=1)
        trainer.train()
        assert callback.tracker is not None
        losses.append([r.loss for r in callback.tracker.records])
    plain, accumulated = losses
    assert len(plain) == len(accumulated) == 3
    assert accumulated == pytest.approx(plain, rel=0.02)  # lr 0, the same 16 examples a step
    assert plain[0] == pytest.approx(math.log(50), rel=0.1)  # random weights: about ln V


def test_a_ranks_loss_under_token_averaging_across_devices_is_its_own_mean() -> None:
    """With average_tokens_across_devices under DDP, num_items_in_batch counts every rank's
    tokens: a rank whose two micro-batches hold 10 and 6 tokens with summed losses 20 and
    12, of 32 tokens on 2 ranks, gets 20/32 and 12/32 from the model, which add up to half
    its mean loss (32/16 = 2). The callback multiplies them back, as the Trainer does."""
    from types import SimpleNamespace

    from bsfind.integrations.transformers import token_scale

    assert token_scale(SimpleNamespace(world_size=2, average_tokens_across_devices=True)) == 2
    assert token_scale(SimpleNamespace(world_size=2, average_tokens_across_devices=False)) == 1
    assert token_scale(SimpleNamespace(world_size=1, average_tokens_across_devices=True)) == 1
    seen: list[float] = []
    callback = NoiseScaleCallback()
    callback.tracker = SimpleNamespace(  # type: ignore[assignment]
        update=lambda loss, batch_size: seen.append(float(loss)))
    callback._token_scale = token_scale(
        SimpleNamespace(world_size=2, average_tokens_across_devices=True))
    callback._summed = True
    callback._losses = [torch.tensor(20 / 32), torch.tensor(12 / 32)]
    callback._after_backward(True, 8)
    assert seen == [pytest.approx(2.0)]


def test_a_partial_last_batch_counts_its_own_examples(tmp_path: Path) -> None:
    """2,048 examples at batch 60: each epoch ends with a batch of 8. The callback reads
    every forward's batch size from its inputs, so the records count what was trained
    (before, a partial batch counted as a full one: +52 an epoch, new-user trial)."""
    callback = NoiseScaleCallback(every=8, window=10_000)
    trainer = Trainer(model=Classifier(),
                      args=_args(tmp_path, per_device_train_batch_size=60, max_steps=120),
                      train_dataset=Examples(), callbacks=[callback])
    trainer.train()
    assert callback.tracker is not None
    per_epoch = math.ceil(2048 / 60)  # 35 steps: 34 of 60, then 8

    def trained(steps: int) -> int:
        epochs, rest = divmod(steps, per_epoch)
        return epochs * 2048 + rest * 60

    recs = callback.tracker.records
    assert recs and recs[-1].step > 2 * per_epoch
    for r in recs:
        assert r.examples == trained(r.step + 1), (r.step, r.examples)



def test_a_resumed_train_goes_on_from_the_checkpoints_counts(tmp_path: Path) -> None:
    """Killed after step 20, resumed from checkpoint-10: the tracker counts on from step 10
    and its log reads as the uninterrupted run's. Before, the resumed run counted from 0
    and overwrote the log."""
    def run(max_steps: int, log: str, resume: str | None = None, **kw: Any) -> Any:
        trainer = Trainer(model=Classifier(), args=_args(
            tmp_path / "out", per_device_train_batch_size=32, max_steps=max_steps, **kw),
            train_dataset=Examples())
        callback = NoiseScaleCallback.attach(trainer, every=1, log_path=tmp_path / log)
        trainer.train(resume_from_checkpoint=resume)
        return callback

    run(30, "whole.jsonl")
    run(20, "resumed.jsonl", save_strategy="steps", save_steps=10)
    assert len(tracking.log_counts(tmp_path / "resumed.jsonl")) == 20
    again = run(30, "resumed.jsonl", str(tmp_path / "out" / "checkpoint-10"))
    tracking.assert_resumed_as_one_run(again.tracker, tmp_path / "resumed.jsonl",
                                       tmp_path / "whole.jsonl", steps=30, batch=32)


def test_a_checkpoint_without_the_callbacks_state_restarts_its_counts_with_a_warning(
        tmp_path: Path) -> None:
    args = dict(per_device_train_batch_size=32, save_strategy="steps", save_steps=10)
    Trainer(model=Classifier(), args=_args(tmp_path, max_steps=10, **args),
            train_dataset=Examples()).train()
    trainer = Trainer(model=Classifier(), args=_args(tmp_path, max_steps=15, **args),
                      train_dataset=Examples())
    callback = NoiseScaleCallback.attach(trainer, every=1)
    with pytest.warns(UserWarning, match="resumed at step 10 from a checkpoint without "
                                         "bsfind's counts"):
        trainer.train(resume_from_checkpoint=str(tmp_path / "checkpoint-10"))
    assert callback.tracker is not None and callback.tracker.step == 5


def test_a_resumed_train_keeps_the_accumulation_its_doublings_left(tmp_path: Path) -> None:
    """As in the Lightning test: the checkpoint's learning rate was scaled for
    accumulation 2, which the resumed run trains with again."""
    def run(epochs: int, resume: str | None = None) -> tuple[Any, Any]:
        args = _args(tmp_path, per_device_train_batch_size=64, num_train_epochs=epochs,
                     learning_rate=0.1, optim="sgd", lr_scheduler_type="constant",
                     save_strategy="epoch")
        callback = NoiseScaleCallback(every=1, double=True, timing=(1.0, 1e-6),
                                      max_accumulation=2)
        trainer = Trainer(model=Classifier(), args=args, train_dataset=Examples(),
                          callbacks=[callback])
        trainer.train(resume_from_checkpoint=resume)
        return trainer, callback

    _, first = run(2)
    assert [(d.epoch, d.accumulation) for d in first.doublings] == [(1, 2)]
    trainer, again = run(3, str(tmp_path / "checkpoint-48"))
    assert trainer.args.gradient_accumulation_steps == 2
    assert again.doublings == first.doublings
    assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(
        0.1 * first.doublings[0].lr_factor)
    assert again.tracker is not None
    # every step at the restored accumulation; how many depends on the Trainer, which
    # finds its place in the data from global_step at the configured accumulation (1)
    recs = again.tracker.records
    assert recs and {r.b_big for r in recs} == {128} and recs[0].step == 48


def test_a_second_callback_on_one_model_is_refused(tmp_path: Path) -> None:
    """A trial: two callbacks on one model (a review had made them keep their own
    checkpoint entries) read different numbers, the first 13-20% off on a CNN: two
    trackers on one model see each other's hooks. The second is refused at the start."""
    args = _args(tmp_path, per_device_train_batch_size=32, max_steps=10, save_strategy="no")
    trainer = Trainer(model=Classifier(), args=args, train_dataset=Examples())
    NoiseScaleCallback.attach(trainer, every=1)
    NoiseScaleCallback.attach(trainer, every=2, prefix="b/")
    with pytest.raises(ValueError, match="this model already has an open bsfind tracker"):
        trainer.train()
    # a review: passed as Trainer(callbacks=[...]), without attach(), the second closed
    # the first's tracker instead (the callbacks know their Trainer only by its state)
    listed = Trainer(model=Classifier(), args=args, train_dataset=Examples(),
                     callbacks=[NoiseScaleCallback(every=1), NoiseScaleCallback(prefix="b/")])
    with pytest.raises(ValueError, match="another NoiseScaleCallback's in this Trainer"):
        listed.train()


def test_a_new_trainer_after_one_that_raised_closes_its_stale_tracker(tmp_path: Path) -> None:
    """A review: the Trainer has no hook on an exception, so a train() that raised left
    its callback's tracker open, and a new Trainer and callback on the same model (a
    notebook cell run again) were refused as a second callback. The stale tracker is
    closed with a warning, and the new run is measured."""
    import warnings

    class Boom(TrainerCallback):
        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if state.global_step == 3:
                raise ArithmeticError("the user's bug")

    model = Classifier()
    first = Trainer(model=model, args=_args(tmp_path / "a", per_device_train_batch_size=32,
                                            max_steps=6, save_strategy="no"),
                    train_dataset=Examples())
    stale = NoiseScaleCallback.attach(first, every=1)
    first.add_callback(Boom())
    with pytest.raises(ArithmeticError):
        first.train()
    second = Trainer(model=model, args=_args(tmp_path / "b", per_device_train_batch_size=32,
                                             max_steps=6, save_strategy="no"),
                     train_dataset=Examples())
    fresh = NoiseScaleCallback.attach(second, every=1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        second.train()
    assert any("this model had an open tracker; it is closed" in str(w.message)
               for w in caught)
    assert stale.tracker is not None and stale.tracker.closed_by is not None
    assert fresh.tracker is not None and fresh.tracker.step == 6
