"""Offline datasets for demos and tests: nothing here downloads anything.

- ``digits``: scikit-learn's bundled 8x8 handwritten digits (1,797 images).
- ``breast_cancer``: scikit-learn's bundled breast-cancer data (569 × 30 features).
- ``text``: byte windows of Python's own standard-library source code, real
  text that ships with every Python.
- ``synthetic``: Gaussian-cluster classification or teacher-network regression,
  generated from a seed.

Each factory returns a map-style ``torch.utils.data.Dataset`` of
``(input, target)`` pairs (a ``TensorDataset``).
"""

from __future__ import annotations

import sysconfig
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import TensorDataset


def _sklearn(name: str) -> Any:
    """One of scikit-learn's bundled data sets (``sklearn.datasets.load_<name>``)."""
    try:
        import sklearn.datasets
    except ImportError as exc:  # pragma: no cover - exercised only without the extra
        raise ImportError(
            f"bsfind.data:{name} needs scikit-learn: pip install 'bsfind[examples]'"
        ) from exc
    return getattr(sklearn.datasets, f"load_{name}")()


def digits(image: bool = False) -> TensorDataset:
    """scikit-learn's digits, pixels scaled to [0, 1].

    Args:
        image: return inputs of shape (1, 8, 8) for a CNN instead of flat (64,).
    """
    bunch = _sklearn("digits")
    x = torch.tensor(bunch.data, dtype=torch.float32) / 16.0
    if image:
        x = x.view(-1, 1, 8, 8)
    y = torch.tensor(bunch.target, dtype=torch.long)
    return TensorDataset(x, y)


def breast_cancer() -> TensorDataset:
    """scikit-learn's bundled breast-cancer data: 569 examples of 30 standardised
    features, 2 classes (a logistic-regression problem)."""
    bunch = _sklearn("breast_cancer")
    x = torch.tensor(bunch.data, dtype=torch.float32)
    x = (x - x.mean(0)) / x.std(0)
    return TensorDataset(x, torch.tensor(bunch.target, dtype=torch.long))


def _stdlib_files() -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    # Top-level modules only: stable across installs, no site-packages or tests.
    return sorted(p for p in root.glob("*.py") if p.is_file())


def text(context: int = 64, max_chars: int = 200_000, stride: int | None = None) -> TensorDataset:
    """Next-byte prediction windows over the standard library's source.

    Inputs are ``context`` byte ids (bytes >= 128 map to 127), targets the same
    window shifted by one. Files are read in sorted order until ``max_chars``
    bytes are collected, so the dataset is the same on every run of one Python.

    Args:
        context: window length T.
        max_chars: bytes of source to read.
        stride: step between windows (default: ``context``, non-overlapping).
    """
    if context < 1 or max_chars <= context:
        raise ValueError("need context >= 1 and max_chars > context")
    chunks: list[bytes] = []
    total = 0
    for path in _stdlib_files():
        data = path.read_bytes()
        chunks.append(data)
        total += len(data)
        if total >= max_chars:
            break
    raw = b"".join(chunks)[:max_chars]
    ids = torch.frombuffer(bytearray(raw), dtype=torch.uint8).to(torch.long).clamp_(max=127)
    step = stride or context
    starts = torch.arange(0, ids.numel() - context - 1, step)
    offsets = torch.arange(context)
    x = ids[starts[:, None] + offsets]
    y = ids[starts[:, None] + offsets + 1]
    return TensorDataset(x, y)


def synthetic(
    n: int = 4096,
    features: int = 32,
    classes: int = 10,
    task: str = "classification",
    noise: float = 1.0,
    seed: int = 0,
) -> TensorDataset:
    """Generated data.

    Args:
        task: "classification" (Gaussian clusters, one per class, with
            ``noise`` as the within-cluster std) or "regression" (a random
            linear teacher plus Gaussian noise of std ``noise``; target shape (1,)).
    """
    g = torch.Generator().manual_seed(seed)
    if task == "classification":
        centers = torch.randn(classes, features, generator=g)
        y = torch.randint(classes, (n,), generator=g)
        x = centers[y] + noise * torch.randn(n, features, generator=g)
        return TensorDataset(x, y)
    if task == "regression":
        w = torch.randn(features, 1, generator=g) / features**0.5
        x = torch.randn(n, features, generator=g)
        y = x @ w + noise * torch.randn(n, 1, generator=g)
        return TensorDataset(x, y)
    raise ValueError(f"task must be 'classification' or 'regression', got {task!r}")
