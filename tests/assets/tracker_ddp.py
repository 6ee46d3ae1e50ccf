"""One rank of the tracker's DDP test (tests/test_tracker.py): two gloo ranks on CPU.

Every rank builds the same model (seeded), wraps it in DistributedDataParallel,
draws its own examples with replacement and runs forward/backward at fixed weights
(no optimizer step: learning rate 0). Rank 0 prints the last record as JSON.

    RANK=0 WORLD_SIZE=2 MASTER_ADDR=127.0.0.1 MASTER_PORT=29500 python tests/assets/tracker_ddp.py
"""

from __future__ import annotations

import json
import os
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

from bsfind import data, models
from bsfind.tracker import track

STEPS = int(os.environ.get("TRACKER_STEPS", "400"))
ACCUMULATE = int(os.environ.get("TRACKER_ACCUMULATE", "1"))
NO_SYNC = os.environ.get("TRACKER_NO_SYNC", "1") == "1"  # 0: every micro-batch all-reduces
FP16_HOOK = os.environ.get("TRACKER_FP16_HOOK") == "1"  # ddp_comm_hook=(state, hook)
TWICE = os.environ.get("TRACKER_TWICE") == "1"  # SAM's first backward, then discard()
RESUME = os.environ.get("TRACKER_RESUME")  # "step:examples", the log given to rank 0 only
AGAIN = int(os.environ.get("TRACKER_AGAIN", "0"))  # a second tracker from this step, unclosed
PRINT_ALL = os.environ.get("TRACKER_PRINT_ALL") == "1"  # every record's own step estimates
BATCH = 32  # per rank and micro-batch


def main() -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    ds = data.synthetic(n=2048, features=16, classes=4, noise=2.0)
    x, y = ds.tensors
    torch.manual_seed(0)
    model = DistributedDataParallel(models.mlp(16, 32, 1, 4))
    gen = torch.Generator().manual_seed(100 + rank)
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

    hook = (dist.group.WORLD, default_hooks.fp16_compress_hook) if FP16_HOOK else None
    log = sys.argv[1] if len(sys.argv) > 1 else None
    step, examples = map(int, RESUME.split(":")) if RESUME else (0, 0)
    tracker = track(model, every=1, window=100_000, ddp_comm_hook=hook,
                    log=log if rank == 0 or not RESUME else None, step=step, examples=examples)
    for i in range(STEPS):
        if AGAIN and i == AGAIN:  # (a notebook cell run again: the first is not closed)
            tracker = track(model, every=1, window=100_000, ddp_comm_hook=hook)
        if TWICE:  # all-reduced, then given up: only the second backward is measured
            idx = torch.randint(len(x), (BATCH,), generator=gen)
            F.cross_entropy(model(x[idx]), y[idx]).backward()
            tracker.discard()
            model.zero_grad(set_to_none=True)
        for j in range(ACCUMULATE):
            idx = torch.randint(len(x), (BATCH,), generator=gen)
            last = j == ACCUMULATE - 1
            with model.no_sync() if NO_SYNC and not last else torch.enable_grad():
                loss = F.cross_entropy(model(x[idx]), y[idx]) / ACCUMULATE
                loss.backward()
            if not last:
                tracker.micro_step()
        tracker.update(loss * ACCUMULATE)
        model.zero_grad(set_to_none=True)
    records = tracker.records
    tracker.close()
    if rank == 0 and PRINT_ALL:
        print(json.dumps([(r.step_grad_norm_sq, r.step_trace_sigma) for r in records]))
    elif rank == 0:
        print(json.dumps(records[-1].to_json()) if records else "no records")
    dist.barrier()  # (no rank leaves while the other's last all-reduce still runs)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
    # leave without interpreter finalization, as bsfind's CLI does under torchrun: gloo's
    # threads can abort a finished rank at teardown ("terminate called without an active
    # exception", exit -6: seen once in this test's runs)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
