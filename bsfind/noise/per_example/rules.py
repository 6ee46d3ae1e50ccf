"""The per-example norm rules: one function per layer type (Goodfellow 2015).

Each rule takes the module, its input x and the gradient δ of its output and returns
the (B,) squared norms of every example's gradient of that module's parameters, and
the name of the form it used. The product rules (Linear, Conv) can also fill the
weight gradient from the per-example products (see :mod:`.fused`).
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

LinearPath = Literal["auto", "direct", "gram"]

# Upper bound on the elements of one temporary (a (n, d_out, d_in) per-example
# gradient, a (n, T, T) Gram matrix or an unfolded conv input): larger batches
# are processed in chunks of examples. 2**25 float32 = 128 MiB; chosen so a
# chunk fits next to the activations of a model that already fits in memory.
MAX_TEMP_ELEMENTS = 2**25

# On CPU, smaller chunks: 2**19 float32 = 2 MiB temporaries stay in cache, so the layers
# around them are not slowed by their eviction (benchmarks/per_example_overhead.py, CNN on
# 2 cores: 1.57x at 2**25, 1.46x at 2**19, worse again below 2**17 as the ops shrink).
CPU_TEMP_ELEMENTS = 2**19


# -- the rules ----------------------------------------------------------------------------
# Each returns a (B,) float32 (float64 for float64 inputs) tensor of squared norms.


def upcast(t: Tensor) -> Tensor:
    """Upcast half precision to float32 for the norm arithmetic."""
    return t if t.dtype in (torch.float32, torch.float64) else t.float()


def chunk_size(n: int, per_example: int, like: Tensor) -> int:
    """Examples per chunk so one temporary stays under MAX_TEMP_ELEMENTS (on CPU, under
    CPU_TEMP_ELEMENTS too)."""
    cap = MAX_TEMP_ELEMENTS
    if like.device.type == "cpu":
        cap = min(cap, CPU_TEMP_ELEMENTS)
    return max(1, min(n, cap // max(1, per_example)))


class Scratch:
    """Temporaries of the product rules, reused from one backward to the next.

    On CPU a fresh tensor of several MiB is fresh memory from the OS, and its first
    touch page-faults: the im2col copy of the CNN benchmark ran about 8x slower into a
    new tensor than into a reused one. So the padded inputs (the size of the layer's
    input), the unfolded inputs and the per-example products (one chunk each) are written
    into buffers that live as long as the context. Elsewhere (CUDA's caching allocator
    already reuses memory) every request is a new tensor.
    """

    def __init__(self) -> None:
        self._buffers: dict[tuple[str, torch.dtype, int], Tensor] = {}

    def get(self, key: str, shape: tuple[int, ...], like: Tensor) -> Tensor:
        """An uninitialised tensor of ``shape`` with ``like``'s dtype and device."""
        if like.device.type != "cpu":
            return like.new_empty(shape)
        n = math.prod(shape)
        slot = (key, like.dtype, threading.get_ident())
        buf = self._buffers.get(slot)
        if buf is None or buf.numel() < n:
            buf = self._buffers[slot] = like.new_empty(n)
        return buf[:n].view(shape)

    def clear(self) -> None:
        self._buffers.clear()


def use_gram(t: int, d_in: int, d_out: int, path: LinearPath) -> bool:
    """Cost model for |x_iᵀ δ_i|²_F with x_i (t, d_in) and δ_i (t, d_out).

    Direct: G_i = δ_iᵀ x_i is t·d_in·d_out multiply-adds, then d_in·d_out squares;
    it holds a (d_out, d_in) temporary per example. Gram: x_i x_iᵀ and δ_i δ_iᵀ are
    t²·(d_in + d_out) multiply-adds, then t² products; temporaries 2·t² per example.
    Gram wins on FLOPs when t·(d_in + d_out) < d_in·d_out, i.e. short sequences and
    wide layers; whenever it wins on FLOPs it also needs less memory, since then
    2·t² < d_in·d_out / 2.
    """
    if path != "auto":
        return path == "gram"
    return t * t * (d_in + d_out + 1) < (t + 1) * d_in * d_out


def seq_sq(
    x: Tensor,
    d: Tensor,
    path: LinearPath,
    acc: Tensor | None,
    scratch: Scratch,
) -> tuple[Tensor, str]:
    """|x_nᵀ d_n|²_F for x (N, T, d_in), d (N, T, d_out), chunked over N.

    With ``acc`` (shape (G, d_in, d_out)) the direct form is used and the per-example
    products x_nᵀ d_n are also summed into it, rows n, n+G, n+2G, ... into acc[n mod G]
    (G groups of a grouped convolution interleaved along N; G = 1 otherwise).
    """
    n, t, d_in = x.shape
    d_out = d.shape[2]
    gram = acc is None and use_gram(t, d_in, d_out, path)
    step = chunk_size(n, 2 * t * t if gram else d_in * d_out, x)
    if acc is not None:
        step = max(acc.shape[0], step - step % acc.shape[0])
    out = []
    for s in range(0, n, step):
        xs, ds = x[s : s + step], d[s : s + step]
        if gram:
            kx = torch.bmm(xs, xs.transpose(1, 2))
            kd = torch.bmm(ds, ds.transpose(1, 2))
            out.append(torch.linalg.vecdot(kx.flatten(1), kd.flatten(1)))
        else:
            g = scratch.get("product", (xs.shape[0], d_in, d_out), xs)
            torch.bmm(xs.transpose(1, 2), ds, out=g)  # (n, d_in, d_out)
            out.append(torch.linalg.vector_norm(g, dim=(1, 2)).square())
            if acc is not None:
                acc += g.view(-1, *acc.shape).sum(0)
    used = "gram" if gram else "fused" if acc is not None else "direct"
    return (out[0] if len(out) == 1 else torch.cat(out)), used


def linear_rule(
    module: Any,
    x: Tensor,
    d: Tensor,
    path: LinearPath,
    acc: Tensor | None,
    scratch: Scratch,
) -> tuple[Tensor, str]:
    """Linear rule; with ``acc`` (the weight's shape) also fill it with the weight gradient
    Σ_i δ_iᵀ x_i, summed from the per-example products (only for inputs with middle axes).

    ``module`` needs only ``weight`` and ``bias`` (an nn.Linear, or a slice of
    nn.MultiheadAttention's packed in-projection)."""
    return _linear_sq(module, x, d, path, acc, scratch, transposed=False)


def transposed_linear_rule(
    module: Any,
    x: Tensor,
    d: Tensor,
    path: LinearPath,
    acc: Tensor | None,
    scratch: Scratch,
) -> tuple[Tensor, str]:
    """The linear rule for ``x @ weight + bias`` with weight (in, out) (transformers'
    Conv1D): the same norms (a transpose keeps the Frobenius norm); ``acc`` is (in, out)."""
    return _linear_sq(module, x, d, path, acc, scratch, transposed=True)


def _linear_sq(
    module: Any,
    x: Tensor,
    d: Tensor,
    path: LinearPath,
    acc: Tensor | None,
    scratch: Scratch,
    transposed: bool,
) -> tuple[Tensor, str]:
    w_on = module.weight.requires_grad
    b_on = module.bias is not None and module.bias.requires_grad
    x, d = upcast(x), upcast(d)
    b = x.shape[0]
    if x.dim() == 2:  # Goodfellow: ∇W_i = δ_i x_iᵀ is rank one, |∇W_i|² = |x_i|²·|δ_i|²
        # (vector_norm: one kernel where vecdot is two; these layers are cheap, so the
        # number of small ops is their cost)
        nd = torch.linalg.vector_norm(d, dim=1).square_()
        if not w_on:
            return nd, "outer"
        nx = torch.linalg.vector_norm(x, dim=1).square_()
        return (nx.add_(1.0) if b_on else nx).mul_(nd), "outer"
    x = x.reshape(b, -1, x.shape[-1])
    d = d.reshape(b, -1, d.shape[-1])
    used = "direct"
    sq = x.new_zeros(b)
    if w_on:
        total = None if acc is None else x.new_zeros(1, x.shape[2], d.shape[2])
        sq, used = seq_sq(x, d, path, total, scratch)
        if acc is not None and total is not None:
            acc.copy_(total[0] if transposed else total[0].T)
    if b_on:
        db = d.sum(1)
        sq = sq + torch.linalg.vecdot(db, db)
    return sq, used


def conv_rule(
    module: nn.Module,
    x: Tensor,
    d: Tensor,
    path: LinearPath,
    acc: Tensor | None,
    scratch: Scratch,
) -> tuple[Tensor, str]:
    """Conv rule; with ``acc`` (the weight's shape) also fill it with the weight gradient,
    summed from the per-example products.

    Long because: the padding, the im2col view, its chunked copy and the copy of the
    fused weight gradient back to the kernel's layout all depend on one choice of
    memory layout (channels-last or channel-major); split apart, every piece would
    need that choice and the strides passed to it.
    """
    conv: Any = module
    w_on = conv.weight.requires_grad
    b_on = conv.bias is not None and conv.bias.requires_grad
    x, d = upcast(x), upcast(d)
    one_d = x.dim() == 3
    if one_d:  # Conv1d as a Conv2d of height 1
        x, d = x.unsqueeze(2), d.unsqueeze(2)
    b = x.shape[0]
    sq = x.new_zeros(b)
    used = "direct"
    if w_on:
        (kh, kw), (sh, sw), (dh, dw) = (
            ((1, *v) if one_d else tuple(v))
            for v in (conv.kernel_size, conv.stride, conv.dilation)
        )
        pads = explicit_padding(conv, one_d)
        left, right, top, bottom = pads
        g = conv.groups
        c, h, w = x.shape[1], x.shape[2] + top + bottom, x.shape[3] + left + right
        k = c * kh * kw
        ho, wo = (h - dh * (kh - 1) - 1) // sh + 1, (w - dw * (kw - 1) - 1) // sw + 1
        n_pos = ho * wo
        # im2col as a strided view of the padded input and one copy per chunk: several
        # times faster on CPU than F.unfold, which loops over the batch. Channels-last
        # windows (B, Ho, Wo, kh, kw, C) copy contiguous runs of C values, channel-major
        # ones (B, C, kh, kw, Ho, Wo) runs of Wo values (stride 1); the latter also keeps
        # each group's channels one slice of K.
        channels_last = g == 1 and (c >= wo or sw > 1)
        if conv.padding_mode == "zeros":
            # pad straight into a reused buffer: one copy, no fresh memory
            xp = scratch.get("padded", (b, h, w, c) if channels_last else (b, c, h, w), x)
            if any(pads):
                xp.zero_()
            if channels_last:
                xp[:, top : h - bottom, left : w - right].copy_(x.permute(0, 2, 3, 1))
            else:
                xp[:, :, top : h - bottom, left : w - right].copy_(x)
        else:
            xp = F.pad(x, pads, mode=conv.padding_mode) if any(pads) else x
            if channels_last:
                xp = xp.contiguous(memory_format=torch.channels_last).permute(0, 2, 3, 1)
            else:
                xp = xp.contiguous()
        s0, s1, s2, s3 = xp.stride()
        if channels_last:
            windows = xp.as_strided((b, ho, wo, kh, kw, c),
                                    (s0, sh * s1, sw * s2, dh * s1, dw * s2, s3))
        else:
            windows = xp.as_strided((b, c, kh, kw, ho, wo),
                                    (s0, s1, dh * s2, dw * s3, sh * s2, sw * s3))
        step = chunk_size(b, k * n_pos, x)
        total = None if acc is None else x.new_zeros(g, k // g, d.shape[1] // g)
        parts = []
        for i in range(0, b, step):
            part_windows = windows[i : i + step]
            n = part_windows.shape[0]
            cols = scratch.get("unfolded", part_windows.shape, x).copy_(part_windows)
            if channels_last:
                xg = cols.view(n, n_pos, k)  # (n, L, K)
                dg = d[i : i + step].reshape(n, -1, n_pos).transpose(1, 2)  # (n, L, O)
            else:  # per group: (n·g, L, K/g) inputs and (n·g, L, O/g) output gradients
                xg = cols.view(n * g, -1, n_pos).transpose(1, 2)
                dg = d[i : i + step].reshape(n * g, -1, n_pos).transpose(1, 2)
            part, used = seq_sq(xg, dg, path, total, scratch)
            parts.append(part.view(n, g).sum(1) if g > 1 else part)
        sq = parts[0] if len(parts) == 1 else torch.cat(parts)
        if acc is not None and total is not None:
            o = d.shape[1]
            if channels_last:  # K in (kh, kw, C) order
                acc.view(o, c, kh, kw).copy_(total[0].view(kh, kw, c, o).permute(3, 2, 0, 1))
            else:  # per group, K/g in (C/g, kh, kw) order
                acc.view(o, c // g, kh, kw).copy_(total.transpose(1, 2).reshape(o, c // g, kh, kw))
    if b_on:
        db = d.flatten(2).sum(2)
        sq = sq + torch.linalg.vecdot(db, db)
    return sq, used


def explicit_padding(conv: Any, one_d: bool) -> tuple[int, ...]:
    """F.pad amounts (last axis first) reproducing ``conv``'s padding, incl. 'same'."""
    k = list(conv.kernel_size)
    dil = list(conv.dilation)
    if conv.padding == "valid":
        pads = [(0, 0)] * len(k)
    elif conv.padding == "same":
        # As _ConvNd does: total = d·(k-1), the odd one extra on the right.
        totals = [dl * (kk - 1) for kk, dl in zip(k, dil, strict=True)]
        pads = [(tot // 2, tot - tot // 2) for tot in totals]
    else:
        pads = [(p, p) for p in conv.padding]
    if one_d:
        pads = [(0, 0), *pads]
    out: list[int] = []
    for left, right in reversed(pads):
        out += [left, right]
    return tuple(out)


def embedding_delta(module: nn.Module, idx: Tensor, d: Tensor) -> tuple[Tensor, Tensor]:
    """Indices (B, T) and the output gradient (B, T, dim) as the weight gradient uses it:
    zero at padding_idx, divided by the index's count in the batch with
    scale_grad_by_freq. Example i's weight gradient is the scatter-sum of its rows."""
    emb: Any = module
    b = idx.shape[0]
    idx = idx.reshape(b, -1)
    d = upcast(d).reshape(b, -1, d.shape[-1])
    if emb.padding_idx is not None:
        d = d * (idx != emb.padding_idx).unsqueeze(-1).to(d.dtype)
    if emb.scale_grad_by_freq:  # torch divides each row's gradient by its count in the batch
        counts = torch.bincount(idx.flatten(), minlength=emb.num_embeddings).to(d.dtype)
        d = d / counts[idx].unsqueeze(-1)
    return idx, d


def embedding_rule(
    module: nn.Module, idx: Tensor, d: Tensor, path: LinearPath
) -> tuple[Tensor, str]:
    emb: Any = module
    b = idx.shape[0]
    dim = d.shape[-1]
    idx, d = embedding_delta(module, idx, d)
    # Sum δ over equal (example, index) pairs: sort the keys i·V + idx and number each run of
    # equal keys (no data-dependent sizes, so no device sync on CUDA); then scatter-add the
    # rows of δ, in their own order, into their run's slot.
    key = (idx + torch.arange(b, device=idx.device).unsqueeze(1) * emb.num_embeddings).flatten()
    sorted_key, order = torch.sort(key)
    run = torch.zeros_like(sorted_key)
    run[1:] = (sorted_key[1:] != sorted_key[:-1]).cumsum(0)
    slot = torch.empty_like(run).scatter_(0, order, run)
    rows = d.new_zeros(key.numel(), dim).index_add_(0, slot, d.reshape(-1, dim))
    row_sq = torch.linalg.vecdot(rows, rows)
    example = torch.zeros_like(run).scatter_(0, run, sorted_key // emb.num_embeddings)
    return d.new_zeros(b).index_add_(0, example, row_sq), "scatter"


def affine_sq(module: nn.Module, xhat: Tensor, d: Tensor, n_affine: int) -> Tensor:
    """Squared norms of weight Σ δ·x̂ and bias Σ δ, summed over all but batch and affine axes.

    The affine axes are the trailing ones (LayerNorm, RMSNorm), ``n_affine`` elements.
    """
    norm: Any = module
    b = d.shape[0]
    sq = d.new_zeros(b)
    if norm.weight is not None and norm.weight.requires_grad:
        gw = (xhat * d).view(b, -1, n_affine).sum(1)
        sq = torch.linalg.vecdot(gw, gw)
    if getattr(norm, "bias", None) is not None and norm.bias.requires_grad:
        gb = d.reshape(b, -1, n_affine).sum(1)
        sq = sq + torch.linalg.vecdot(gb, gb)
    return sq


def layernorm_rule(
    module: nn.Module, x: Tensor, d: Tensor, path: LinearPath
) -> tuple[Tensor, str]:
    ln: Any = module
    x, d = upcast(x), upcast(d)
    shape = tuple(ln.normalized_shape)
    xhat = F.layer_norm(x, shape, eps=ln.eps)
    return affine_sq(module, xhat, d, math.prod(shape)), "direct"


def rmsnorm_rule(
    module: nn.Module, x: Tensor, d: Tensor, path: LinearPath
) -> tuple[Tensor, str]:
    rms: Any = module
    x, d = upcast(x), upcast(d)
    shape = tuple(rms.normalized_shape)
    xhat = F.rms_norm(x, shape, eps=rms.eps)
    return affine_sq(module, xhat, d, math.prod(shape)), "direct"


def groupnorm_rule(
    module: nn.Module, x: Tensor, d: Tensor, path: LinearPath
) -> tuple[Tensor, str]:
    gn: Any = module
    x, d = upcast(x), upcast(d)
    b, c = x.shape[0], x.shape[1]
    xhat = F.group_norm(x, gn.num_groups, eps=gn.eps).reshape(b, c, -1)
    d = d.reshape(b, c, -1)
    sq = d.new_zeros(b)
    if gn.weight is not None and gn.weight.requires_grad:
        gw = torch.linalg.vecdot(xhat, d)  # (B, C): Σ over positions of δ·x̂
        sq = torch.linalg.vecdot(gw, gw)
    if gn.bias is not None and gn.bias.requires_grad:
        gb = d.sum(2)
        sq = sq + torch.linalg.vecdot(gb, gb)
    return sq, "direct"


Rule = Callable[[nn.Module, Tensor, Tensor, LinearPath], tuple[Tensor, str]]
RULES: dict[str, Rule] = {
    "embedding": embedding_rule,
    "layernorm": layernorm_rule,
    "groupnorm": groupnorm_rule,
    "rmsnorm": rmsnorm_rule,
}
# The rules that form products: they use scratch buffers and can also give ∇W (acc).
ProductRule = Callable[
    [nn.Module, Tensor, Tensor, LinearPath, "Tensor | None", Scratch], tuple[Tensor, str]
]
PRODUCT_RULES: dict[str, ProductRule] = {
    "linear": linear_rule, "transposed_linear": transposed_linear_rule,
    "conv1d": conv_rule, "conv2d": conv_rule,
}
# Product rules whose weight multiplies the input's last axis (no unfolding).
LINEAR_RULES = ("linear", "transposed_linear")
# Input rank each rule accepts (batch axis included); anything else is unbatched or exotic.
MIN_RANK = {"linear": 2, "transposed_linear": 2, "conv1d": 3, "conv2d": 4, "embedding": 1,
            "layernorm": 2, "groupnorm": 2, "rmsnorm": 2}
MAX_RANK = {"conv1d": 3, "conv2d": 4}
