"""Tied input/output embeddings: the cross terms of one weight used by Embedding layers
and a Linear head (GPT-2's ``wte``/``lm_head``, BERT's MLM decoder, T5).

Example i's gradient of the shared weight W (V, d) is the sum of its uses' gradients:
A_i^e from each Embedding call e (the rows δe_t' of its output gradient, scatter-summed
into the rows idx_t' of the example's indices) and C_i = δh_iᵀ h_i from the head (h its
input (T, d), δh the gradient of its output (T, V)). So

    |G_i|² = Σ_e |A_i^e|² + |C_i|² + 2 Σ_e ⟨A_i^e, C_i⟩ + 2 Σ_{e<e'} ⟨A_i^e, A_i^e'⟩.

The first two sums are the modules' own rules. The cross terms never form a V×d matrix:

    ⟨A^e, C⟩   = Σ_t' δe_t'·C[idx_t'] = Σ_t' δe_t'·R_t',   R_t' = Σ_t δh_{t, idx_t'} h_t
    ⟨A^e, A^e'⟩ = Σ_t,s [idx_t = idx'_s] δe_t·δe'_s

(T·T'·d multiply-adds per example each). δe is taken as the weight gradient sees it:
zero at padding_idx, divided by the index's batch count with scale_grad_by_freq
(:func:`.rules.embedding_delta`). R is computed when the head's gradient arrives (the
head runs after the embeddings, so its backward comes first), and the head's (B, T, V)
output gradient is not kept.
"""

from __future__ import annotations

import torch
from torch import Tensor

from bsfind.noise.per_example.rules import chunk_size, upcast


def head_rows(h: Tensor, dh: Tensor, idx: Tensor) -> Tensor:
    """R (B, T', d): row idx_t' of each example's head gradient δh_iᵀ h_i, for every t'.

    Args:
        h: the head's input, (B, ..., d).
        dh: the gradient of the head's output, (B, ..., V).
        idx: the Embedding's indices, (B, T').
    """
    b = h.shape[0]
    h = upcast(h).reshape(b, -1, h.shape[-1])
    dh = dh.reshape(b, -1, dh.shape[-1])
    idx = idx.reshape(b, -1)
    t, t_emb = h.shape[1], idx.shape[1]
    step = chunk_size(b, t * t_emb, h)
    out = []
    for s in range(0, b, step):
        # cols[n, t, t'] = δh[n, t, idx[n, t']]: gathered before the upcast, so a (B, T, V)
        # half-precision gradient is never copied whole
        cols = torch.gather(dh[s : s + step], 2, idx[s : s + step].unsqueeze(1).expand(-1, t, -1))
        out.append(torch.bmm(cols.to(h.dtype).transpose(1, 2), h[s : s + step]))
    return out[0] if len(out) == 1 else torch.cat(out)


def rows_dot(d: Tensor, rows: Tensor) -> Tensor:
    """(B,) Σ_t' d_t'·rows_t' for d and rows of shape (B, T', dim)."""
    b = d.shape[0]
    return torch.linalg.vecdot(d.reshape(b, -1), rows.to(d.dtype).reshape(b, -1))


def embeddings_dot(idx1: Tensor, d1: Tensor, idx2: Tensor, d2: Tensor) -> Tensor:
    """(B,) ⟨A_i, A'_i⟩ of two Embedding calls: Σ_t,s [idx1_t = idx2_s] d1_t·d2_s.

    Args:
        idx1, idx2: indices (B, T1), (B, T2).
        d1, d2: their effective output gradients (B, T1, dim), (B, T2, dim).
    """
    b = idx1.shape[0]
    step = chunk_size(b, idx1.shape[1] * idx2.shape[1], d1)
    out = []
    for s in range(0, b, step):
        same = idx1[s : s + step].unsqueeze(2) == idx2[s : s + step].unsqueeze(1)
        dots = torch.bmm(d1[s : s + step], d2[s : s + step].to(d1.dtype).transpose(1, 2))
        out.append((dots * same).sum((1, 2)))
    return out[0] if len(out) == 1 else torch.cat(out)
