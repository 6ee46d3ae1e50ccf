"""Small reference models for the demos, tests and benchmarks.

Each factory returns a fresh ``nn.Module``; the configs in ``configs/`` name
them as ``bsfind.models:<name>``. They are deliberately small so that a probe
runs in seconds on two CPU cores, and they use only layers the per-example
rules cover (Linear, Conv, Embedding, LayerNorm/GroupNorm) unless asked for
BatchNorm, which forces the micro-batch form.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def mlp(
    in_features: int = 64, hidden: int = 128, depth: int = 2, classes: int = 10
) -> nn.Module:
    """A ReLU multilayer perceptron: ``depth`` hidden layers of width ``hidden``."""
    layers: list[nn.Module] = []
    width = in_features
    for _ in range(depth):
        layers += [nn.Linear(width, hidden), nn.ReLU()]
        width = hidden
    layers.append(nn.Linear(width, classes))
    return nn.Sequential(*layers)


def cnn(
    in_channels: int = 1,
    channels: int = 16,
    classes: int = 10,
    image_size: int = 8,
    norm: str = "group",
) -> nn.Module:
    """Two 3x3 conv layers, a 2x2 max-pool and a linear head.

    Args:
        norm: "group" (GroupNorm, per-example friendly), "batch" (BatchNorm:
            examples are mixed, so the probe falls back to micro-batches) or "none".
    """

    def norm_layer(c: int) -> nn.Module:
        if norm == "group":
            return nn.GroupNorm(4, c)
        if norm == "batch":
            return nn.BatchNorm2d(c)
        if norm == "none":
            return nn.Identity()
        raise ValueError(f"norm must be 'group', 'batch' or 'none', got {norm!r}")

    side = image_size // 2
    return nn.Sequential(
        nn.Conv2d(in_channels, channels, 3, padding=1),
        norm_layer(channels),
        nn.ReLU(),
        nn.Conv2d(channels, 2 * channels, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(2 * channels * side * side, classes),
    )


class _Block(nn.Module):
    def __init__(self, d_model: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln1 = nn.LayerNorm(d_model)
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)
        self.ln2 = nn.LayerNorm(d_model)
        self.fc = nn.Linear(d_model, 4 * d_model)
        self.out = nn.Linear(4 * d_model, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(d, dim=-1)
        q, k, v = (z.view(b, t, self.heads, d // self.heads).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(y.transpose(1, 2).reshape(b, t, d))
        return x + self.out(F.gelu(self.fc(self.ln2(x))))


class TinyTransformer(nn.Module):
    """A small causal (GPT-style) transformer over byte tokens.

    Input: token ids of shape (B, T); output: logits of shape (B, T, vocab).
    """

    def __init__(
        self,
        vocab: int = 128,
        context: int = 64,
        d_model: int = 64,
        heads: int = 4,
        layers: int = 2,
    ) -> None:
        super().__init__()
        if d_model % heads:
            raise ValueError(f"d_model ({d_model}) must be divisible by heads ({heads})")
        self.context = context
        self.tok = nn.Embedding(vocab, d_model)
        self.pos = nn.Embedding(context, d_model)
        self.blocks = nn.ModuleList(_Block(d_model, heads) for _ in range(layers))
        self.ln = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        t = idx.shape[1]
        if t > self.context:
            raise ValueError(f"sequence length {t} exceeds the model's context {self.context}")
        positions = torch.arange(t, device=idx.device).expand_as(idx)
        x = self.tok(idx) + self.pos(positions)
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln(x))


def transformer(
    vocab: int = 128, context: int = 64, d_model: int = 64, heads: int = 4, layers: int = 2
) -> nn.Module:
    """Factory for :class:`TinyTransformer`."""
    return TinyTransformer(vocab, context, d_model, heads, layers)


def linear(in_features: int = 32, out_features: int = 1) -> nn.Module:
    """A single linear layer (linear regression / logistic regression)."""
    return nn.Linear(in_features, out_features)
