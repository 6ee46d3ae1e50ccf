# examples/lightning_callback.py: the noise scale in a Lightning Trainer's loggers.
import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import CSVLogger

from bsfind.data import synthetic
from bsfind.integrations.lightning import NoiseScaleMonitor


class Classifier(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(32, 128), torch.nn.ReLU(),
                                       torch.nn.Linear(128, 10))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-3)


torch.manual_seed(0)
loader = torch.utils.data.DataLoader(synthetic(n=4096, noise=2.0), batch_size=64, shuffle=True)
monitor = NoiseScaleMonitor(every=8, log_path="noise.jsonl")  # double=True: act on advice
trainer = L.Trainer(max_epochs=4, callbacks=[monitor], logger=CSVLogger("logs"),
                    log_every_n_steps=16, enable_progress_bar=False, enable_checkpointing=False)
trainer.fit(Classifier(), loader)
print(monitor.tracker.records[-1])  # logged as bsfind/b_simple, bsfind/grad_norm_sq, ...
