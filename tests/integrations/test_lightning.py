"""NoiseScaleMonitor in a real lightning.Trainer on CPU.

    .venv/bin/python -m pytest tests/integrations/test_lightning.py -q

The metrics reach the Trainer's loggers (an in-memory logger and a CSVLogger), their
values at learning rate 0 match the exact noise scale (tests/tracking.py), and with
double=True accumulation and the learning rate change as the rule says.
"""

from __future__ import annotations

import csv
import json
import statistics
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from bsfind.advisor import scaled_lr
from tests import tracking
from tests.conftest import ROOT
from tests.tracking import REL

L = pytest.importorskip("lightning")
from lightning.pytorch.loggers import CSVLogger, Logger  # noqa: E402

from bsfind.integrations.lightning import NoiseScaleMonitor  # noqa: E402

pytestmark = [
    pytest.mark.filterwarnings("ignore:.*does not have many workers:UserWarning"),
    pytest.mark.filterwarnings("ignore:.*LeafSpec.*:DeprecationWarning"),
    pytest.mark.filterwarnings("ignore:.*LeafSpec.*:FutureWarning"),
]


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    torch.set_num_threads(1)
    yield


class MemoryLogger(Logger):
    """Keeps what Lightning logs: (step, metrics) rows."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: list[tuple[int | None, dict[str, float]]] = []

    @property
    def name(self) -> str:
        return "memory"

    @property
    def version(self) -> int:
        return 0

    def log_hyperparams(self, *args: Any, **kwargs: Any) -> None:
        pass

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.rows.append((step, dict(metrics)))


class Classifier(L.LightningModule):
    def __init__(self, lr: float = 0.0, schedule: bool = False) -> None:
        super().__init__()
        self.net = tracking.model()
        self.lr = lr
        self.schedule = schedule

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], idx: int) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(self.net(x), y)

    def configure_optimizers(self) -> Any:
        opt = torch.optim.SGD(self.parameters(), lr=self.lr)
        if not self.schedule:
            return opt
        return [opt], [torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)]


def _loader(batch: int, batches: int) -> torch.utils.data.DataLoader:
    x, y = tracking.problem()
    ds = torch.utils.data.TensorDataset(x, y)
    sampler = torch.utils.data.RandomSampler(ds, replacement=True, num_samples=batch * batches,
                                             generator=torch.Generator().manual_seed(0))
    return torch.utils.data.DataLoader(ds, batch_size=batch, sampler=sampler)


def _trainer(callback: NoiseScaleMonitor, **kwargs: Any) -> Any:
    return L.Trainer(accelerator="cpu", devices=1, callbacks=[callback],
                     enable_progress_bar=False, enable_model_summary=False,
                     enable_checkpointing=False, **kwargs)


def test_metrics_reach_the_loggers_and_are_exact(tmp_path: Path) -> None:
    memory = MemoryLogger()
    monitor = NoiseScaleMonitor(every=1, window=10_000, log_path=tmp_path / "noise.jsonl")
    trainer = _trainer(monitor, max_epochs=1, log_every_n_steps=10,
                       logger=[memory, CSVLogger(tmp_path)])
    trainer.fit(Classifier(), _loader(64, 200))
    exact = tracking.exact_b_simple()
    rec = monitor.tracker.records[-1] if monitor.tracker else None
    assert rec is not None and rec.method == "per-example" and rec.b_big == 64
    assert monitor.tracker is not None and monitor.tracker.dataset_size is None  # replacement
    logged = [m for _, m in memory.rows if "bsfind/b_simple" in m]
    assert len(logged) == 20  # one row per log_every_n_steps
    assert {"bsfind/grad_norm_sq", "bsfind/trace_sigma", "bsfind/b_simple_low",
            "bsfind/b_simple_high", "bsfind/examples"} <= set(logged[-1])
    assert logged[-1]["bsfind/b_simple"] == pytest.approx(exact, rel=REL)
    with open(next(tmp_path.rglob("metrics.csv"))) as f:
        rows = [r for r in csv.DictReader(f) if r.get("bsfind/b_simple")]
    assert len(rows) == 20
    assert float(rows[-1]["bsfind/b_simple"]) == pytest.approx(exact, rel=REL)
    assert len((tmp_path / "noise.jsonl").read_text().splitlines()) == 200


def test_accumulate_grad_batches_pairs_the_micro_batches() -> None:
    monitor = NoiseScaleMonitor(window=10_000)
    trainer = _trainer(monitor, max_epochs=1, logger=False, accumulate_grad_batches=4)
    trainer.fit(Classifier(), _loader(16, 4 * 200))
    assert monitor.tracker is not None
    recs = monitor.tracker.records
    assert len(recs) == 200 and recs[-1].method == "accumulation"
    assert (recs[-1].b_small, recs[-1].b_big) == (16, 64)
    assert recs[-1].b_simple == pytest.approx(tracking.exact_b_simple(), rel=REL)


def test_an_epochs_short_last_step_is_rescaled() -> None:
    """22 batches at accumulate_grad_batches=4: each epoch ends on a step of 2 micro-
    batches whose losses Lightning still divides by 4. Its record's own |G|², tr(Σ) and
    loss are those of its mean, not (2/4)² and 2/4 of them (a trial's such steps logged
    tr(Σ) 1.37 among neighbours of 8-9, loss 0.86 among 2.2); the examples count 32."""
    from tests.exact import exact_noise

    monitor = NoiseScaleMonitor(every=1, window=10_000)
    trainer = _trainer(monitor, max_epochs=30, logger=False, accumulate_grad_batches=4)
    trainer.fit(Classifier(), _loader(16, 22))
    assert monitor.tracker is not None
    recs = monitor.tracker.records
    short = [r for r in recs if r.batch == 32]
    full = [r for r in recs if r.batch == 64]
    assert len(short) == 30 and len(full) == 150
    x, y = tracking.problem()
    from bsfind.workload import Workload

    exact = exact_noise(Workload.from_objects(
        tracking.model(), torch.utils.data.TensorDataset(x, y), F.cross_entropy))

    def mean(rs: list, key: str) -> float:
        return statistics.fmean(getattr(r, key) for r in rs)

    # each step's own estimates are unbiased: their means over the short steps are near
    # the exact values, as over the full ones
    assert mean(short, "step_trace_sigma") == pytest.approx(exact.trace, rel=0.15)
    assert mean(full, "step_trace_sigma") == pytest.approx(exact.trace, rel=0.15)
    assert mean(short, "loss") == pytest.approx(mean(full, "loss"), rel=0.05)


def test_the_loss_under_a_grad_scaler_is_logged_unscaled() -> None:
    """Under 16-mixed Lightning calls on_before_backward with the loss already times the
    GradScaler's scale (MixedPrecision.pre_backward): the records' loss divides it out (a
    review read it in Lightning's source; 16-mixed does not run on a CPU, so the trainer
    here is a stand-in holding a real GradScaler)."""
    from types import SimpleNamespace

    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    scaled = scaler.scale(torch.tensor(0.75))
    monitor = NoiseScaleMonitor()
    trainer = SimpleNamespace(precision_plugin=SimpleNamespace(scaler=scaler))
    monitor.on_before_backward(trainer, None, scaled)  # type: ignore[arg-type]
    assert float(scaled) == 768.0 and monitor._loss is not None
    assert float(monitor._loss) == 0.75


def test_doubling_changes_accumulation_and_learning_rate_by_the_rule() -> None:
    """A step-time curve with a large fixed cost (t0 = 1 s, c = 1 µs) makes every
    doubling pay: accumulation goes 1 -> 2 -> 4 (the cap) at the epoch starts, and the
    learning rate by the SGD rule lr·(1 + B_n/B)/(1 + B_n/2B) at the B_n advised."""
    monitor = NoiseScaleMonitor(every=1, double=True, timing=(1.0, 1e-6), max_accumulation=4)
    trainer = _trainer(monitor, max_epochs=3, logger=False, limit_train_batches=24)
    module = Classifier(lr=0.1, schedule=True)
    trainer.fit(module, _loader(32, 200))
    assert trainer.accumulate_grad_batches == 4
    assert [(d.epoch, d.accumulation, d.batch_size) for d in monitor.doublings] == [
        (1, 2, 64), (2, 4, 128)]
    lr = 0.1
    for d in monitor.doublings:
        assert d.basis == "time" and d.b_simple is not None
        rule, name = scaled_lr(1.0, d.batch_size // 2, d.batch_size, d.b_simple, "sgd")
        assert d.lr_factor == pytest.approx(rule) and name == "mccandlish" and rule > 1
        lr *= d.lr_factor
    opt = trainer.optimizers[0]
    assert opt.param_groups[0]["lr"] == pytest.approx(lr)  # the scheduler kept the scaling
    assert trainer.lr_scheduler_configs[0].scheduler.base_lrs == [pytest.approx(lr)]
    assert monitor.tracker is not None
    bigs = [r.b_big for r in monitor.tracker.records]
    assert bigs[:24] == [32] * 24 and set(bigs[24:36]) == {64} and set(bigs[36:]) == {128}


def test_bad_arguments_name_themselves() -> None:
    with pytest.raises(ValueError, match="max_accumulation must be >= 1"):
        NoiseScaleMonitor(max_accumulation=0)
    with pytest.raises(ValueError, match="lr_rule must be one of"):
        NoiseScaleMonitor(lr_rule="cubic")


@pytest.mark.skipif(not (torch.distributed.is_available()
                         and torch.distributed.is_gloo_available()), reason="needs gloo")
def test_ddp_strategy_pairs_each_rank_with_the_all_reduced_gradient() -> None:
    """Two gloo ranks launched by hand (Lightning's DDP strategy joins them), two
    micro-batches of 32 per rank and step: the comm hook pairs 64 with 128."""
    ranks = tracking.two_ranks(ROOT / "tests" / "assets" / "tracker_lightning_ddp.py")
    assert [code for code, _, _ in ranks] == [0, 0], ranks[0][2][-2000:] + ranks[1][2][-2000:]
    rec = json.loads(ranks[0][1].strip().splitlines()[-1])
    assert rec["method"] == "ddp" and (rec["b_small"], rec["b_big"]) == (64, 128)
    assert rec["b_simple"] == pytest.approx(tracking.exact_b_simple(), rel=REL)


def _checkpointing(callback: NoiseScaleMonitor, dirpath: Path, **kwargs: Any) -> Any:
    from lightning.pytorch.callbacks import ModelCheckpoint

    saver = ModelCheckpoint(dirpath=dirpath, save_top_k=-1,
                            every_n_train_steps=kwargs.pop("every_n_train_steps", None))
    return L.Trainer(accelerator="cpu", devices=1, callbacks=[callback, saver],
                     enable_progress_bar=False, enable_model_summary=False, logger=False,
                     **kwargs)



def test_a_resumed_fit_goes_on_from_the_checkpoints_counts(tmp_path: Path) -> None:
    """Killed after step 20, resumed from the checkpoint of step 10: the tracker counts
    on from step 10 and its log reads as the uninterrupted run's (steps 10-19, trained
    twice, once). Before, the resumed run counted from 0 and overwrote the log."""
    whole = NoiseScaleMonitor(every=1, log_path=tmp_path / "whole.jsonl")
    _trainer(whole, max_steps=30, logger=False).fit(Classifier(), _loader(32, 200))
    first = NoiseScaleMonitor(every=1, log_path=tmp_path / "resumed.jsonl")
    _checkpointing(first, tmp_path / "ckpt", max_steps=20,
                   every_n_train_steps=10).fit(Classifier(), _loader(32, 200))
    assert len(tracking.log_counts(tmp_path / "resumed.jsonl")) == 20
    again = NoiseScaleMonitor(every=1, log_path=tmp_path / "resumed.jsonl")
    _trainer(again, max_steps=30, logger=False).fit(
        Classifier(), _loader(32, 200), ckpt_path=tmp_path / "ckpt" / "epoch=0-step=10.ckpt")
    tracking.assert_resumed_as_one_run(again.tracker, tmp_path / "resumed.jsonl",
                                       tmp_path / "whole.jsonl", steps=30, batch=32)


def test_a_checkpoint_without_the_callbacks_state_restarts_its_counts_with_a_warning(
        tmp_path: Path) -> None:
    from lightning.pytorch.callbacks import ModelCheckpoint

    saver = ModelCheckpoint(dirpath=tmp_path, save_top_k=-1, every_n_train_steps=10)
    L.Trainer(accelerator="cpu", devices=1, callbacks=[saver], max_steps=10, logger=False,
              enable_progress_bar=False, enable_model_summary=False,
              ).fit(Classifier(), _loader(32, 200))
    monitor = NoiseScaleMonitor(every=1)
    with pytest.warns(UserWarning, match="resumed at step 10 from a checkpoint without "
                                         "bsfind's counts"):
        _trainer(monitor, max_steps=15, logger=False).fit(
            Classifier(), _loader(32, 200), ckpt_path=tmp_path / "epoch=0-step=10.ckpt")
    assert monitor.tracker is not None and monitor.tracker.step == 5


def test_a_resumed_fit_keeps_the_accumulation_its_doublings_left(tmp_path: Path) -> None:
    """The checkpoint's learning rate was scaled for accumulation 2 (doubled at epoch 1):
    the resumed run trains with 2 again (it went back to 1, with the scaled rate, before).
    Its tracker's window starts again at the checkpoint, so the next doubling waits for
    an epoch of measurements: at epoch 3, to 4."""
    monitor = NoiseScaleMonitor(every=1, double=True, timing=(1.0, 1e-6), max_accumulation=4)
    _checkpointing(monitor, tmp_path, max_epochs=2, limit_train_batches=24).fit(
        Classifier(lr=0.1), _loader(32, 200))
    assert [(d.epoch, d.accumulation) for d in monitor.doublings] == [(1, 2)]
    again = NoiseScaleMonitor(every=1, double=True, timing=(1.0, 1e-6), max_accumulation=4)
    trainer = _trainer(again, max_epochs=4, limit_train_batches=24, logger=False)
    trainer.fit(Classifier(lr=0.1), _loader(32, 200),
                ckpt_path=tmp_path / "epoch=1-step=36.ckpt")
    assert trainer.accumulate_grad_batches == 4
    assert [(d.epoch, d.accumulation, d.batch_size) for d in again.doublings] == [
        (1, 2, 64), (3, 4, 128)]
    assert again.doublings[0] == monitor.doublings[0]
    lr = 0.1 * again.doublings[0].lr_factor * again.doublings[1].lr_factor
    assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(lr)
    assert again.tracker is not None and again.tracker.step == 36 + 12 + 6
    assert [r.b_big for r in again.tracker.records] == [64] * 12 + [128] * 6


def test_a_second_monitor_is_refused_and_validate_leaves_none_behind(
        tmp_path: Path) -> None:
    """A trial: two monitors in one Trainer (a review had made them keep their own
    checkpoint state) read different numbers, the first 13-20% off on a CNN: two
    trackers on one model see each other's hooks. The second is now refused at the start.
    And a validate with a checkpoint left its counts in the monitor, which a later fresh
    fit then resumed from (15 steps for 5)."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    first, second = NoiseScaleMonitor(every=1), NoiseScaleMonitor(every=2, prefix="b/")
    with pytest.raises(ValueError, match="this model already has an open bsfind tracker, "
                                         "another NoiseScaleMonitor's in this Trainer"):
        L.Trainer(accelerator="cpu", devices=1, callbacks=[first, second], max_steps=10,
                  logger=False, enable_progress_bar=False, enable_model_summary=False,
                  ).fit(Classifier(), _loader(32, 200))
    # a review: a fit that raised left the monitor's tracker open, and the next fit with
    # the same monitor and model was refused as a second monitor
    class Failing(Classifier):
        def training_step(self, batch: tuple[torch.Tensor, torch.Tensor],
                          idx: int) -> torch.Tensor:
            if idx == 2 and self.fail:
                raise ArithmeticError("the user's bug")
            return super().training_step(batch, idx)

    failing, again = Failing(), NoiseScaleMonitor(every=1)
    failing.fail = True
    with pytest.raises(ArithmeticError):
        _trainer(again, max_steps=5, logger=False).fit(failing, _loader(32, 10))
    assert again.tracker is not None and again.tracker._closed  # on_exception closed it
    failing.fail = False
    _trainer(again, max_steps=5, logger=False).fit(failing, _loader(32, 10))
    assert again.tracker.step == 5
    saver = ModelCheckpoint(dirpath=tmp_path, save_top_k=-1, every_n_train_steps=10)
    L.Trainer(accelerator="cpu", devices=1, callbacks=[NoiseScaleMonitor(every=1), saver],
              max_steps=10, logger=False, enable_progress_bar=False,
              enable_model_summary=False).fit(Classifier(), _loader(32, 200))
    saved = torch.load(tmp_path / "epoch=0-step=10.ckpt", weights_only=False)["callbacks"]
    states = [v for k, v in saved.items() if k.startswith("NoiseScaleMonitor")]
    assert [(v["step"], v["examples"]) for v in states] == [(10, 320)]
    class Validated(Classifier):
        def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor],
                            idx: int) -> torch.Tensor:
            return self.training_step(batch, idx)

    monitor = NoiseScaleMonitor(every=1)
    trainer = _trainer(monitor, max_steps=5, logger=False)
    trainer.validate(Validated(), _loader(32, 4), ckpt_path=tmp_path / "epoch=0-step=10.ckpt",
                     verbose=False)
    trainer = _trainer(monitor, max_steps=5, logger=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(Classifier(), _loader(32, 200))
    assert not [w for w in caught if "NoiseScaleMonitor" in str(w.message)]
    assert monitor.tracker is not None and (monitor.tracker.step, monitor.tracker.examples) == (
        5, 160)


def test_a_loader_without_a_length_steps_at_each_epochs_last_batch() -> None:
    """An iterable loader (no len) of 10 batches an epoch under accumulate_grad_batches=3:
    Lightning steps after batches 3, 6, 9 and 10 of each epoch; the callback read only
    the first three (a review: 6 steps of Lightning's 8 in 2 epochs, 304 examples of 320)."""
    class Batches(torch.utils.data.IterableDataset):
        def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
            x, y = tracking.problem()
            for i in range(10):
                yield x[16 * i:16 * (i + 1)], y[16 * i:16 * (i + 1)]

    monitor = NoiseScaleMonitor(every=1, window=10_000)
    trainer = _trainer(monitor, max_epochs=2, logger=False, accumulate_grad_batches=3)
    trainer.fit(Classifier(), torch.utils.data.DataLoader(Batches(), batch_size=None))
    assert trainer.global_step == 8
    assert monitor.tracker is not None and monitor.tracker.dataset_size is None
    assert (monitor.tracker.step, monitor.tracker.examples) == (8, 320)
