"""Fused weight gradients: the per-example products summed into the weight gradient.

For Linear on inputs with middle axes and for convolutions, the direct form of the
norm rule forms every example's weight gradient x_iᵀ δ_i anyway, and their sum IS the
weight gradient; :class:`FusedProduct` lets that sum be the gradient instead of
letting autograd form the same product a second time.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from bsfind import torch_compat as compat
from bsfind.noise.per_example.rules import LINEAR_RULES, LinearPath, explicit_padding, use_gram

if TYPE_CHECKING:
    from bsfind.noise.per_example.hooks import Capture

# -- fused weight gradients -----------------------------------------------------------------
# For Linear on inputs with middle axes and for convolutions, the direct form materialises
# every example's weight gradient x_iᵀ δ_i anyway; their sum IS the weight gradient. So these
# layers run (inside the context) as a custom autograd Function whose backward returns that
# sum instead of letting autograd form the same product a second time. That removes most of
# the overhead of the norms on these layers (benchmarks/per_example_overhead.py, "unfused").

def conv_padding(conv: Any) -> tuple[int, ...] | None:
    """``conv``'s zero padding as one int per spatial axis; None if it is not symmetric
    (torch then pads outside the convolution) or not zeros."""
    if conv.padding_mode != "zeros":
        return None
    n = len(conv.kernel_size)
    pads = explicit_padding(conv, n == 1)[: 2 * n]  # (left, right) per axis, last first
    if any(pads[i] != pads[i + 1] for i in range(0, 2 * n, 2)):
        return None
    return tuple(reversed(pads[::2]))


def fusable(rule: str, module: Any, x: Tensor, path: LinearPath) -> bool:
    """Whether the direct form will run for this call, so its products can give ∇W.

    ``module`` needs ``weight`` (and, for convolutions, their settings)."""
    weight: Tensor = module.weight
    if not weight.requires_grad or not x.is_floating_point():
        return False
    if rule in LINEAR_RULES:
        if x.dim() < 3:
            return False  # the rank-one rule needs no product at all
        d_out, d_in = weight.shape if rule == "linear" else weight.shape[::-1]
        return not use_gram(math.prod(x.shape[1:-1]), d_in, d_out, path)
    conv: Any = module
    pads = conv_padding(conv)
    if pads is None or x.dim() != (3 if rule == "conv1d" else 4):
        return False
    n_pos = 1
    for size, k, st, dl, p in zip(x.shape[2:], conv.kernel_size, conv.stride, conv.dilation,
                                  pads, strict=True):
        n_pos *= (size + 2 * p - dl * (k - 1) - 1) // st + 1
    k_g = weight[0].numel()  # C/g · kernel
    return not use_gram(n_pos, k_g, weight.shape[0] // conv.groups, path)


def conv_backward(
    conv: Any, x: Tensor, weight: Tensor, d: Tensor, input_grad: bool
) -> Tensor:
    """One of autograd's two convolution gradients, from the actual input and weight.

    (torch.nn.grad.conv2d_input passes an expanded dummy input instead, which sends
    oneDNN down a path 3-4x slower on CPU.)
    """
    pads = conv_padding(conv)
    assert pads is not None  # only fused convolutions get here
    grads = torch.ops.aten.convolution_backward(
        d, x.to(d.dtype), weight.to(d.dtype), None, list(conv.stride), list(pads),
        list(conv.dilation), False, [0] * len(pads), conv.groups,
        [input_grad, not input_grad, False],
    )
    return grads[0] if input_grad else grads[1]


def input_grad(module: Any, rule: str, x: Tensor, weight: Tensor, d: Tensor) -> Tensor:
    # autocast: the product ran in δ's dtype; autograd casts the result back to x's
    if rule == "linear":
        return d.matmul(weight.to(d.dtype))
    if rule == "transposed_linear":
        return d.matmul(weight.to(d.dtype).T)
    return conv_backward(module, x, weight, d, input_grad=True)


def weight_grad(module: Any, rule: str, x: Tensor, weight: Tensor, d: Tensor) -> Tensor:
    """Autograd's own weight gradient (differentiable; for the unfused cases)."""
    if rule in LINEAR_RULES:
        dw = d.reshape(-1, d.shape[-1]).T.matmul(x.to(d.dtype).reshape(-1, x.shape[-1]))
        return dw if rule == "linear" else dw.T
    return conv_backward(module, x, weight, d, input_grad=False)


class FusedProduct(torch.autograd.Function):
    """A Linear (either weight layout) or zero-padded convolution whose backward also gives
    per-example norms.

    Forward: the output the module computed. Backward: the input gradient as autograd
    would form it, the bias gradient, and the weight gradient as the sum of the
    per-example products that the norm rule forms (see :func:`seq_sq`). Where no norms
    are wanted (the context has exited, a double backward, a duplicate call) the weight
    gradient is autograd's usual product.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, x: Tensor, weight: Tensor, bias: Tensor | None, cap: Capture
    ) -> Tensor:
        ctx.cap = cap  # the graph node owns the capture, as with the hooks
        # As autograd does: a Linear needs its weight only for the input gradient (so an
        # in-place change of the weight before backward is allowed when there is none).
        keep_weight = cap.rule not in LINEAR_RULES or ctx.needs_input_grad[0]
        ctx.save_for_backward(x, weight if keep_weight else None)
        # The output the module itself computed (the forward hook passes it in the
        # capture): an alias of it, not recomputed, and not a view, so that in-place ops
        # on it stay allowed (a custom Function's view outputs could not be modified).
        out = cap.out
        assert out is not None
        cap.out = None
        return compat.non_view_alias(out)

    @staticmethod
    def backward(ctx: Any, d: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        x, weight = ctx.saved_tensors
        cap: Capture = ctx.cap
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        dx = input_grad(cap.module, cap.rule, x, weight, d) if need_x else None
        db = None
        if need_b:
            channel = d.dim() - 1 if cap.rule in LINEAR_RULES else 1
            db = d.sum([i for i in range(d.dim()) if i != channel])
        dw = None
        if cap.owner is not None:
            fuse = need_w and not torch.is_grad_enabled()  # not in a double backward
            dw = cap.owner.record_backward(cap, d, x=x, weight_grad=fuse)
        if need_w and dw is None:
            dw = weight_grad(cap.module, cap.rule, x, weight, d)
        if dw is not None:
            param: Tensor = cap.module.weight  # type: ignore[assignment]
            dw = dw.to(param.dtype)
        return dx, dw, db, None
