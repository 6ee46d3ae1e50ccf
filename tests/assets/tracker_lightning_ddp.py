"""One rank of the Lightning DDP test (tests/integrations/test_lightning.py).

Started twice with the torch.distributed environment set (RANK, WORLD_SIZE,
MASTER_ADDR, MASTER_PORT, LOCAL_RANK), Lightning's DDP strategy joins the launch
instead of starting processes itself. Each rank draws its own examples with
replacement; learning rate 0. Rank 0 prints the last record as JSON.
"""

from __future__ import annotations

import json
import os
import sys
import warnings

import lightning as L
import torch
import torch.nn.functional as F

from bsfind.integrations.lightning import NoiseScaleMonitor
from tests import tracking

STEPS = 200
ACCUMULATE = 2


class Classifier(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = tracking.model()

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], idx: int) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(self.net(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.0)


def main() -> None:
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    x, y = tracking.problem()
    ds = torch.utils.data.TensorDataset(x, y)
    rank = int(os.environ["RANK"])
    sampler = torch.utils.data.RandomSampler(
        ds, replacement=True, num_samples=32 * ACCUMULATE * STEPS,
        generator=torch.Generator().manual_seed(100 + rank))
    loader = torch.utils.data.DataLoader(ds, batch_size=32, sampler=sampler)
    monitor = NoiseScaleMonitor(window=10_000)
    trainer = L.Trainer(max_epochs=1, accelerator="cpu", devices=2, strategy="ddp",
                        accumulate_grad_batches=ACCUMULATE, use_distributed_sampler=False,
                        logger=False, callbacks=[monitor], enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False)
    trainer.fit(Classifier(), loader)
    assert monitor.tracker is not None
    rec = monitor.tracker.records[-1]
    if trainer.global_rank == 0:
        print(json.dumps(rec.to_json()))


if __name__ == "__main__":
    main()
    # leave without interpreter finalization, as bsfind's CLI does under torchrun: gloo's
    # threads can abort a finished rank at teardown ("terminate called without an active
    # exception", exit -6: seen once in this test's runs)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
