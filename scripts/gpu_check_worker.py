"""Processes the GPU check (scripts/gpu_check.py) starts, one mode each.

    python3 scripts/gpu_check_worker.py torch-info   # one JSON line: torch, CUDA, cuDNN, NCCL
    python3 scripts/gpu_check_worker.py capped 0.02 recommend SPEC --json ...
    python3 -m torch.distributed.run --standalone --nproc_per_node 2 \\
        scripts/gpu_check_worker.py nccl-pair               # two NCCL ranks on cuda:0
    python3 -m torch.distributed.run --standalone --nproc_per_node 1 \\
        scripts/gpu_check_worker.py nccl-bsfind SPEC --set k=v ...

- ``capped FRACTION ARGS``: the bsfind CLI with ARGS after
  ``torch.cuda.set_per_process_memory_fraction(FRACTION)``. bsfind sizes batches by
  the device's total memory and does not know the cap, so its largest batch runs out of
  memory for real and the back-off (``find_max_batch``) has to find what fits. Without
  CUDA the cap is not applied (said on stderr).
- ``nccl-pair``: each rank joins an NCCL group on cuda:0 and all-reduces its rank + 1.
  NCCL normally refuses two ranks on one GPU ("Duplicate GPU detected"); each rank
  prints one ``NCCL_PAIR {json}`` line with what happened.
- ``nccl-bsfind SPEC``: bsfind's data-parallel runner (``bsfind.distributed.execute``)
  on an NCCL group of one rank. ``bsfind recommend`` under torchrun needs two ranks for
  that (it runs locally at world size 1) and gives rank r the GPU cuda:r, so on a
  one-GPU machine this is the only way its NCCL collectives run. Prints the JSON report.
"""

from __future__ import annotations

import importlib.util
import json
import os
import platform
import sys
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

NCCL_PAIR_TAG = "NCCL_PAIR "
NCCL_TIMEOUT_S = 30  # the pair's process-group timeout: a hang ends in an error, not forever


def _get(fn: Callable[[], Any]) -> Any:
    """One reading; a feature this torch lacks becomes a string saying why."""
    try:
        return fn()
    except Exception as exc:
        return f"unavailable: {type(exc).__name__}: {exc}"


def torch_info() -> dict[str, Any]:
    """What the summary needs to know about torch, CUDA and the optional packages."""
    import torch
    import torch.distributed as dist

    info: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda_build": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
        "nccl_available": _get(lambda: dist.is_available() and dist.is_nccl_available()),
        "packages": {name: importlib.util.find_spec(name) is not None
                     for name in ("sklearn", "pynvml", "transformers", "timm", "lightning")},
    }
    if not info["cuda_available"]:
        return info
    props = torch.cuda.get_device_properties(0)
    info.update(
        device_count=torch.cuda.device_count(),
        device_name=props.name,
        capability=".".join(map(str, torch.cuda.get_device_capability(0))),
        total_memory_bytes=int(props.total_memory),
        bf16_supported=_get(torch.cuda.is_bf16_supported),
        cudnn=_get(torch.backends.cudnn.version),
        nccl=_get(lambda: ".".join(map(str, torch.cuda.nccl.version()))),
        matmul_fp32=_get(lambda: getattr(torch.backends.cuda.matmul, "fp32_precision", None)
                         or f"allow_tf32={torch.backends.cuda.matmul.allow_tf32}"),
        flash_sdp=_get(torch.backends.cuda.flash_sdp_enabled),
    )
    return info


def capped(fraction: float, args: list[str]) -> None:
    """The bsfind CLI with ``args``, its CUDA allocator capped at ``fraction`` of each GPU."""
    import torch

    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            torch.cuda.set_per_process_memory_fraction(fraction, i)
        total = torch.cuda.get_device_properties(0).total_memory
        print(f"gpu_check: CUDA allocator capped at {fraction:g} of the GPU "
              f"({fraction * total / 2**30:.1f} GiB); bsfind sizes batches by the whole GPU",
              file=sys.stderr, flush=True)
    else:
        print("gpu_check: no CUDA: allocator cap not applied", file=sys.stderr, flush=True)
    from bsfind.cli import main

    sys.argv = ["bsfind", *args]
    main()


def nccl_pair() -> None:
    """Two (or more) ranks on cuda:0 in one NCCL group; one tagged JSON line per rank."""
    import torch
    import torch.distributed as dist

    rank = int(os.environ.get("RANK", "0"))
    out: dict[str, Any] = {"rank": rank, "world_size": int(os.environ.get("WORLD_SIZE", "1"))}
    try:
        torch.cuda.set_device(0)
        dist.init_process_group("nccl", timeout=timedelta(seconds=NCCL_TIMEOUT_S))
        t = torch.full((1,), float(rank + 1), device="cuda:0")
        dist.all_reduce(t)
        torch.cuda.synchronize()
        out.update(ok=True, all_reduce=float(t.item()))
    except Exception as exc:
        out.update(ok=False, error=f"{type(exc).__name__}: {exc}"[:4000])
    finally:
        if dist.is_initialized():
            try:
                dist.destroy_process_group()
            except Exception:
                pass
    print(NCCL_PAIR_TAG + json.dumps(out), flush=True)
    sys.stderr.flush()
    os._exit(0)  # no interpreter teardown: NCCL/gloo threads can abort it (see bsfind.cli)


def nccl_bsfind(spec_path: str, rest: list[str]) -> None:
    """``bsfind recommend SPEC --set ...`` through the data-parallel runner; JSON on stdout."""
    from bsfind import distributed, pipeline, report
    from bsfind.errors import BsfindError
    from bsfind.spec import load_spec

    overrides = [rest[i + 1] for i in range(len(rest) - 1) if rest[i] == "--set"]
    code = 0
    try:
        spec = load_spec(Path(spec_path), overrides)
        r = distributed.execute(
            spec, None, lambda s, runner, p: pipeline.run(s, runner, "recommend", p))
        print(json.dumps(report.to_dict(r), indent=2, allow_nan=False), flush=True)
    except BsfindError as exc:
        print(f"error: {exc.message}" + (f"\n  hint: {exc.hint}" if exc.hint else ""),
              file=sys.stderr)
        code = exc.exit_code
    except Exception as exc:
        import traceback

        traceback.print_exc()
        print(f"internal error: {type(exc).__name__}: {exc}", file=sys.stderr)
        code = 70
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def main(argv: list[str]) -> None:
    if not argv:
        sys.exit(__doc__)
    mode, rest = argv[0], argv[1:]
    if mode == "torch-info":
        print(json.dumps(torch_info()))
    elif mode == "capped" and rest:
        capped(float(rest[0]), rest[1:])
    elif mode == "nccl-pair":
        nccl_pair()
    elif mode == "nccl-bsfind" and rest:
        nccl_bsfind(rest[0], rest[1:])
    else:
        sys.exit(f"unknown mode or missing arguments: {' '.join(argv)}\n\n{__doc__}")


if __name__ == "__main__":
    main(sys.argv[1:])
