"""nn.MultiheadAttention: its projections as Linear calls that the hooks can see.

``F.multi_head_attention_forward`` uses in_proj_weight (or q/k/v_proj_weight),
in_proj_bias and out_proj's weight and bias inside one function: out_proj's hooks never
fire, and the in-projection's input and output gradient are out of reach. While an
nn.MultiheadAttention runs inside the context, a torch function mode
(:class:`torch.overrides.TorchFunctionMode`, public API) catches that one call and
computes the same function with :func:`attention_forward`: the same ops in the same
order as torch's own (so dropout draws the same random numbers, and nothing is computed
twice), except that every projection is a call of ``project`` on batch-first inputs, to
which the hooks attach their Linear capture. The slices of the packed in-projection
(q, k, v; or q and kv for cross-attention) are disjoint, so their squared norms add.

Covered: batch_first=True, self- and cross-attention, kdim/vdim (separate projection
weights), attn_mask (2-D or 3-D, bool or float), key_padding_mask, is_causal,
need_weights (averaged or per head), dropout in training mode. Anything else
(add_bias_kv, add_zero_attn, unbatched input, arguments a later torch adds) runs
torch's own function and is reported through ``refuse``.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.overrides import TorchFunctionMode

# project(label, x (B, T, d_in) batch first, weight, bias) -> x Wᵀ + b with a capture
Project = Callable[[str, Tensor, Tensor, "Tensor | None"], Tensor]

_MHA = F.multi_head_attention_forward
_SIGNATURE = inspect.signature(_MHA)
# The arguments attention_forward reproduces; any other one must keep its default.
_KNOWN = {
    "query", "key", "value", "embed_dim_to_check", "num_heads", "in_proj_weight",
    "in_proj_bias", "bias_k", "bias_v", "add_zero_attn", "dropout_p", "out_proj_weight",
    "out_proj_bias", "training", "key_padding_mask", "need_weights", "attn_mask",
    "use_separate_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight",
    "static_k", "static_v", "average_attn_weights", "is_causal",
}


class ProjectionWeights:
    """The weight and bias of one projection (a slice of the packed in-projection, or
    out_proj's): what the Linear rule reads from a module."""

    __slots__ = ("weight", "bias")

    def __init__(self, weight: Tensor, bias: Tensor | None) -> None:
        self.weight = weight
        self.bias = bias


class AttentionProjections(TorchFunctionMode):
    """Active during one nn.MultiheadAttention forward: routes its
    ``F.multi_head_attention_forward`` call through :func:`attention_forward`.

    Args:
        project: the hooks' capturing Linear.
        refuse: called with the reason when the call is not covered (torch's own
            function then runs).
    """

    def __init__(self, project: Project, refuse: Callable[[str], None]) -> None:
        super().__init__()
        self.project = project
        self.refuse = refuse
        self.calls = 0

    def __torch_function__(
        self,
        func: Callable[..., Any],
        types: Any,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        kwargs = kwargs or {}
        if func is _MHA:
            self.calls += 1
            bound = _SIGNATURE.bind(*args, **kwargs)
            bound.apply_defaults()
            why = unsupported(bound.arguments)
            if why is None:
                return attention_forward(self.project, bound.arguments)
            self.refuse(why)
        return func(*args, **kwargs)


def unsupported(a: dict[str, Any]) -> str | None:
    """Why :func:`attention_forward` cannot reproduce this call (None if it can)."""
    extra = [k for k, v in a.items()
             if k not in _KNOWN and v is not _SIGNATURE.parameters[k].default]
    if extra:
        return f"was called with argument {extra[0]!r}, which bsfind does not know"
    if a["query"].dim() != 3:
        return "got an unbatched (2-D) query; dim 0 must be the batch axis"
    if a["bias_k"] is not None or a["bias_v"] is not None:
        return "has add_bias_kv=True (parameters 'bias_k', 'bias_v'); build it without"
    if a["add_zero_attn"]:
        return "has add_zero_attn=True; build it without"
    if a["static_k"] is not None or a["static_v"] is not None:
        return "got static keys or values"
    return None


def float_mask(mask: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    """A bool mask as the additive float mask torch uses (-inf where True)."""
    if mask is None or torch.is_floating_point(mask):
        return mask
    if mask.dtype != torch.bool:
        raise AssertionError("only bool and floating types of masks are supported")
    return torch.zeros_like(mask, dtype=dtype).masked_fill_(mask, float("-inf"))


def _packed(proj: Tensor, n: int, e: int) -> tuple[Tensor, ...]:
    """(T, B, n·E) -> n contiguous (T, B, E), as torch's _in_projection_packed lays them out."""
    parts = proj.unflatten(-1, (n, e)).unsqueeze(0).transpose(0, -2).squeeze(-2).contiguous()
    return tuple(parts[i] for i in range(n))


def _in_projection(project: Project, a: dict[str, Any]) -> tuple[Tensor, ...]:
    """q, k, v as (T, B, E) contiguous tensors, each projection through ``project``."""
    query, key, value = a["query"], a["key"], a["value"]

    def one(label: str, x: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
        return project(label, x.transpose(0, 1), w, b).transpose(0, 1)

    b_all: Tensor | None = a["in_proj_bias"]
    if not a["use_separate_proj_weight"]:
        w: Tensor = a["in_proj_weight"]
        e = query.size(-1)
        if key is value:
            if query is key:  # self-attention: one product with the packed weight
                return _packed(one("in_proj", query, w, b_all), 3, e)
            w_q, w_kv = w.split([e, e * 2])
            b_q, b_kv = (None, None) if b_all is None else b_all.split([e, e * 2])
            q = one("in_proj[q]", query, w_q, b_q).contiguous()
            k, v = _packed(one("in_proj[kv]", key, w_kv, b_kv), 2, e)
            return q, k, v
        weights = w.chunk(3)
        labels = ("in_proj[q]", "in_proj[k]", "in_proj[v]")
    else:
        weights = (a["q_proj_weight"], a["k_proj_weight"], a["v_proj_weight"])
        labels = ("q_proj", "k_proj", "v_proj")
    biases = (None, None, None) if b_all is None else b_all.chunk(3)
    return tuple(one(lab, x, w_, b_).contiguous() for lab, x, w_, b_
                 in zip(labels, (query, key, value), weights, biases, strict=True))


def attention_forward(project: Project, a: dict[str, Any]) -> tuple[Tensor, Tensor | None]:
    """``F.multi_head_attention_forward`` (seq-first (T, B, E) inputs) with its projections
    through ``project``; ``a`` its bound arguments, checked by :func:`unsupported`.

    Follows torch 2.x's implementation line by line after the in-projection.
    """
    query, num_heads = a["query"], a["num_heads"]
    tgt_len, bsz, embed_dim = query.shape
    need_weights, is_causal = a["need_weights"], a["is_causal"]
    key_padding_mask = float_mask(a["key_padding_mask"], query.dtype)
    attn_mask: Tensor | None = a["attn_mask"]
    if is_causal and attn_mask is None:
        raise RuntimeError(
            "Need attn_mask if specifying the is_causal hint. You may use the Transformer "
            "module method `generate_square_subsequent_mask` to create this mask."
        )
    if is_causal and key_padding_mask is None and not need_weights:
        attn_mask = None  # SDPA takes the causal hint itself
    else:
        attn_mask = float_mask(attn_mask, query.dtype)
        if key_padding_mask is not None:
            is_causal = False  # the merged mask is no longer causal
    if embed_dim != a["embed_dim_to_check"] or embed_dim % num_heads:
        raise AssertionError(f"embedding dimension {embed_dim} does not fit {num_heads} heads")
    head_dim = embed_dim // num_heads

    q, k, v = _in_projection(project, a)

    src_len = k.shape[0]
    if attn_mask is not None:
        if attn_mask.dim() == 2:
            if attn_mask.shape != (tgt_len, src_len):
                raise RuntimeError(f"The shape of the 2D attn_mask is {attn_mask.shape}, "
                                   f"but should be {(tgt_len, src_len)}.")
            attn_mask = attn_mask.unsqueeze(0)
        elif attn_mask.dim() != 3 or attn_mask.shape != (bsz * num_heads, tgt_len, src_len):
            raise RuntimeError(f"attn_mask of shape {tuple(attn_mask.shape)} is not supported")
    q = q.view(tgt_len, bsz * num_heads, head_dim).transpose(0, 1)
    k = k.view(src_len, bsz * num_heads, head_dim).transpose(0, 1)
    v = v.view(src_len, bsz * num_heads, head_dim).transpose(0, 1)
    if key_padding_mask is not None:
        if key_padding_mask.shape != (bsz, src_len):
            raise AssertionError(f"expecting key_padding_mask shape of {(bsz, src_len)}, but "
                                 f"got {tuple(key_padding_mask.shape)}")
        key_padding_mask = (key_padding_mask.view(bsz, 1, 1, src_len)
                            .expand(-1, num_heads, -1, -1).reshape(bsz * num_heads, 1, src_len))
        attn_mask = key_padding_mask if attn_mask is None else attn_mask + key_padding_mask
    dropout_p = a["dropout_p"] if a["training"] else 0.0
    out_w, out_b = a["out_proj_weight"], a["out_proj_bias"]

    if need_weights:
        q_scaled = q * math.sqrt(1.0 / float(q.shape[-1]))
        if attn_mask is not None:
            weights = torch.baddbmm(attn_mask, q_scaled, k.transpose(-2, -1))
        else:
            weights = torch.bmm(q_scaled, k.transpose(-2, -1))
        weights = F.softmax(weights, dim=-1)
        if dropout_p > 0.0:
            weights = F.dropout(weights, p=dropout_p)
        out = torch.bmm(weights, v)  # (B·H, T, hd)
        out = out.transpose(0, 1).reshape(tgt_len, bsz, embed_dim).transpose(0, 1)
        out = _seq_first(project("out_proj", out, out_w, out_b))
        weights = weights.view(bsz, num_heads, tgt_len, src_len)
        if a["average_attn_weights"]:
            weights = weights.mean(dim=1)
        return out, weights

    if attn_mask is not None:  # (1, T, S) or (B·H, T, S) -> broadcastable to (B, H, T, S)
        if attn_mask.size(0) == 1 and attn_mask.dim() == 3:
            attn_mask = attn_mask.unsqueeze(0)
        else:
            attn_mask = attn_mask.view(bsz, num_heads, -1, src_len)
    q = q.view(bsz, num_heads, tgt_len, head_dim)
    k = k.view(bsz, num_heads, src_len, head_dim)
    v = v.view(bsz, num_heads, src_len, head_dim)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask, dropout_p, is_causal)
    out = out.permute(0, 2, 1, 3).reshape(bsz, tgt_len, embed_dim)
    return _seq_first(project("out_proj", out, out_w, out_b)), None


def _seq_first(out: Tensor) -> Tensor:
    """(B, T, E) -> (T, B, E) laid out as torch's own result: what follows may depend on
    the layout (dropout draws its mask in memory order)."""
    return out.transpose(0, 1).contiguous()
