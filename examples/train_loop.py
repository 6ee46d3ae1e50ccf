# examples/train_loop.py: the noise scale of a plain PyTorch training loop.
import torch
import torch.nn.functional as F

import bsfind
from bsfind.data import synthetic  # generated examples: no download

torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(32, 128), torch.nn.ReLU(), torch.nn.Linear(128, 10))
optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
loader = torch.utils.data.DataLoader(synthetic(n=4096, noise=2.0), batch_size=64, shuffle=True)

tracker = bsfind.track(model, every=8, log="noise.jsonl")  # per-example norms, 1 step in 8
for _ in range(4):  # epochs
    for x, y in loader:
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        tracker.update(loss, batch_size=len(x))  # after backward, before clipping and step()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad()
tracker.close()

print(tracker.records[-1].to_json())  # the last line of noise.jsonl
advice = tracker.advice(lr=1e-3, optimizer=optimizer)  # timing=(t0, c) if you know them
batch = advice.recommended_batch  # None while |G|² is not yet told from 0
print(f"recommended batch {batch if batch is not None else 'not yet resolved'} "
      f"(B_simple {advice.ci95.low:.0f}–{advice.ci95.high:.0f}); doubling to "
      f"{2 * advice.batch_size} pays now: {advice.double} ({advice.basis} basis), at "
      f"learning rate {advice.learning_rate:.2g}")
