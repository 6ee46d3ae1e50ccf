"""Per-example gradient norms from forward/backward hooks (DESIGN.md §2).

After ONE ordinary forward + backward of a batch, :class:`PerExampleGradNorms`
gives, for every example i, the squared L2 norm of example i's contribution to
the accumulated ``.grad`` (summed over all trainable parameters). With a loss
that is a mean over B examples that contribution is (1/B)·∇L_i; the caller
rescales. No per-example gradient is ever materialised for the whole model:
each layer's norm is computed inside its backward hook and the inputs it
needed are dropped with the graph.

Rules (Goodfellow 2015, arXiv:1510.01799; Gray et al. 2024, arXiv:2411.00999),
with x a layer's input and δ = ∂loss/∂output:

==============  =================================================================
rule            squared norm of example i's gradient
==============  =================================================================
linear          2-D input: |x_i|²·|δ_i|² (+ |δ_i|² for the bias). Inputs with
                middle axes (B, T..., d_in): |x_iᵀ δ_i|²_F, directly or through
                the Gram form Σ_t,t' (x_it·x_it')(δ_it·δ_it'), whichever costs
                fewer FLOPs (see :func:`_use_gram`); bias |Σ_t δ_it|².
conv1d/conv2d   the linear rule on the unfolded input (im2col), per group;
                bias |Σ_positions δ|².
embedding       δ summed over equal indices within the example (scatter-sum),
                then squared; padding_idx rows get no gradient.
layernorm,      weight Σ δ·x̂, bias Σ δ (sums over every axis but the batch and
groupnorm,      the affine ones), x̂ the normalised input recomputed from x.
rmsnorm
func            any other leaf module: torch.func, vmap over examples of the vjp
                of ``functional_call(module, params, x_i[None])`` with δ_i.
==============  =================================================================

Limitations, each reported rather than answered wrongly: BatchNorm in training
mode mixes examples (no per-example gradient exists); a parameter on a module
that also has parameterised children, or shared by two modules (tied weights),
is refused by :func:`plan`; a module that receives two gradients in one backward
(called twice in the forward, or two forwards back-propagated together) makes
:meth:`PerExampleGradNorms.sq_norms` raise :class:`PerExampleUnsupported`, as
does a fallback module whose one-example outputs differ from its batched ones.
Not detectable by hooks, hence the caller's responsibility: a parameter used
outside its module's ``forward`` (e.g. ``logits = h @ model.tok.weight.T``), or
a module called through ``.forward()`` instead of ``__call__``; both make the
sum silently miss that use.

Cost: for Linear on inputs with middle axes and for convolutions the direct form
forms every example's weight gradient x_iᵀ δ_i. Their sum is the weight gradient, so
while the context is active those layers run as a custom autograd Function
(:class:`_FusedProduct`) whose backward returns that sum instead of letting autograd
form the same product a second time ("fused"; ``fuse=False`` turns it off). What is
left is the per-example product's lower efficiency as a batched GEMM, the im2col copy
for convolutions, and a fixed cost of a few small ops per layer. The Gram form, and
the rank-one rule of 2-D Linear inputs, cost a fraction of the layer's training FLOPs.
On CPU, temporaries live in buffers reused across backward passes and are chunked to
stay in cache. ``benchmarks/per_example_overhead.py`` measures all of it.
"""

from __future__ import annotations

import functools
import math
import threading
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.lazy import LazyModuleMixin

from bsfind.errors import UserCodeError

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

# Relative tolerance when the func fallback checks that running a module one
# example at a time reproduces its batched output (float32 reductions reorder).
FUNC_CHECK_RTOL = 1e-3

_RMSNorm: type[nn.Module] | None = getattr(nn, "RMSNorm", None)  # torch >= 2.4


class PerExampleUnsupported(UserCodeError, RuntimeError):
    """Per-example norms cannot be computed exactly for this model or this batch."""

    def __init__(self, message: str) -> None:
        super().__init__(
            message, hint="use the micro-batch form of the noise probe (probe.method: microbatch)"
        )


@dataclass(frozen=True)
class PerExamplePlan:
    """What :func:`plan` found: whether every trainable parameter has a per-example rule.

    Attributes:
        ok: True if every trainable parameter is covered by a rule or by the torch.func
            fallback.
        reason: one line saying why (or why not).
        rules: module qualified name -> rule name ("linear", "conv1d", "conv2d",
            "embedding", "layernorm", "groupnorm", "rmsnorm", "func"). For "linear" the
            direct or Gram form is chosen per call from the input shape.
    """

    ok: bool
    reason: str
    rules: dict[str, str] = field(default_factory=dict)


# -- planning -----------------------------------------------------------------------------


def _uses_forward_of(module: nn.Module, cls: type[nn.Module]) -> bool:
    # A subclass that overrides forward (LoRA, quantised, ...) computes something else, as
    # does an instance whose forward was replaced.
    return (isinstance(module, cls) and type(module).forward is cls.forward
            and "forward" not in vars(module))


def _rule_for(module: nn.Module, trainable: list[str]) -> str:
    """The rule name for a leaf module that owns the trainable parameters ``trainable``."""
    if not set(trainable) <= {"weight", "bias"}:
        return "func"  # e.g. the old weight_norm: weight_g/weight_v, weight computed
    if _uses_forward_of(module, nn.Linear):
        return "linear"
    if _uses_forward_of(module, nn.Conv1d):
        return "conv1d"
    if _uses_forward_of(module, nn.Conv2d):
        return "conv2d"
    if _uses_forward_of(module, nn.Embedding):
        return "embedding"
    if _uses_forward_of(module, nn.LayerNorm):
        return "layernorm"
    if _uses_forward_of(module, nn.GroupNorm):
        return "groupnorm"
    if _RMSNorm is not None and _uses_forward_of(module, _RMSNorm):
        return "rmsnorm"
    return "func"


def _func_infeasible(module: nn.Module) -> str | None:
    """Why the torch.func fallback cannot handle ``module`` (None if it can)."""
    if isinstance(module, nn.RNNBase):
        return "returns a (output, hidden state) tuple"
    return None


def plan(model: nn.Module) -> PerExamplePlan:
    """Inspect ``model`` (without running it) for per-example gradient rules.

    A module that owns trainable parameters gets a rule by type, or the torch.func
    fallback ("func") when it has none. A module with parameters of its own and
    parameter-free children (a custom activation holding a learned scale) is handled
    by the fallback as a whole. Not ok: BatchNorm in training mode, a trainable
    parameter on a module whose children also own trainable parameters, a trainable
    parameter shared by two modules (tied weights), a module the fallback cannot run.

    Args:
        model: the model as it will be trained (its train/eval mode matters).

    Returns:
        The plan; ``reason`` is one line naming the first obstacle and how many more.
    """
    problems: list[str] = []
    rules: dict[str, str] = {}
    owners: dict[int, list[str]] = {}
    modules = list(model.named_modules())
    owning: set[str] = set()
    for name, module in modules:
        where = f"'{name}'" if name else "the root"
        if isinstance(module, _BatchNorm) and module.training:
            problems.append(f"{type(module).__name__} at {where} mixes examples in training mode")
        if any(p.requires_grad for p in module.parameters(recurse=False)):
            owning.add(name)
    # first descendant that owns trainable parameters, for every ancestor of one
    owning_below: dict[str, str] = {}
    for name in owning:
        parts = name.split(".") if name else []
        for depth in range(len(parts)):
            owning_below.setdefault(".".join(parts[:depth]), name)
    for name, module in modules:
        if name not in owning:
            continue
        where = f"'{name}'" if name else "the root"
        trainable = [n for n, p in module.named_parameters(recurse=False) if p.requires_grad]
        for pname in trainable:
            owners.setdefault(id(getattr(module, pname)), []).append(
                f"{name}.{pname}" if name else pname
            )
        if name in owning_below:
            problems.append(
                f"{type(module).__name__} at {where} owns parameter '{trainable[0]}' and has "
                f"children with parameters ({owning_below[name]!r}); no per-example rule"
            )
            continue
        lazy: Any = module
        if isinstance(module, LazyModuleMixin) and lazy.has_uninitialized_params():
            problems.append(
                f"{type(module).__name__} at {where} has uninitialised (lazy) parameters; "
                "run one batch through the model first"
            )
            continue
        is_leaf = next(iter(module.children()), None) is None
        rule = _rule_for(module, trainable) if is_leaf else "func"
        if rule == "func":
            why = _func_infeasible(module)
            if why is not None:
                problems.append(f"{type(module).__name__} at {where} {why}")
                continue
        rules[name] = rule
    for names in owners.values():
        if len(names) > 1:
            problems.append(
                f"parameter shared by {names[0]!r} and {names[1]!r} (tied weights): "
                "per-example norms of a sum are not sums of norms"
            )
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        return PerExamplePlan(False, problems[0] + more, rules)
    if not rules:
        return PerExamplePlan(False, "the model has no trainable parameters", rules)
    n_func = sum(r == "func" for r in rules.values())
    reason = f"all {len(rules)} parameterised modules have per-example rules"
    if n_func:
        first = next(n for n, r in rules.items() if r == "func")
        reason += f" ({n_func} through the torch.func fallback, e.g. {first!r})"
    return PerExamplePlan(True, reason, rules)


_plan = plan  # PerExampleGradNorms.__init__ has a parameter named `plan`


# -- the rules ----------------------------------------------------------------------------
# Each returns a (B,) float32 (float64 for float64 inputs) tensor of squared norms.


def _acc(t: Tensor) -> Tensor:
    """Upcast half precision to float32 for the norm arithmetic."""
    return t if t.dtype in (torch.float32, torch.float64) else t.float()


def _chunk(n: int, per_example: int, like: Tensor) -> int:
    """Examples per chunk so one temporary stays under MAX_TEMP_ELEMENTS (on CPU, under
    CPU_TEMP_ELEMENTS too)."""
    cap = MAX_TEMP_ELEMENTS
    if like.device.type == "cpu":
        cap = min(cap, CPU_TEMP_ELEMENTS)
    return max(1, min(n, cap // max(1, per_example)))


class _Scratch:
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


def _use_gram(t: int, d_in: int, d_out: int, path: LinearPath) -> bool:
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


def _seq_sq(
    x: Tensor,
    d: Tensor,
    path: LinearPath,
    acc: Tensor | None,
    scratch: _Scratch,
) -> tuple[Tensor, str]:
    """|x_nᵀ d_n|²_F for x (N, T, d_in), d (N, T, d_out), chunked over N.

    With ``acc`` (shape (G, d_in, d_out)) the direct form is used and the per-example
    products x_nᵀ d_n are also summed into it, rows n, n+G, n+2G, ... into acc[n mod G]
    (G groups of a grouped convolution interleaved along N; G = 1 otherwise).
    """
    n, t, d_in = x.shape
    d_out = d.shape[2]
    gram = acc is None and _use_gram(t, d_in, d_out, path)
    step = _chunk(n, 2 * t * t if gram else d_in * d_out, x)
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


def _linear(
    module: nn.Module,
    x: Tensor,
    d: Tensor,
    path: LinearPath,
    acc: Tensor | None,
    scratch: _Scratch,
) -> tuple[Tensor, str]:
    """Linear rule; with ``acc`` (the weight's shape) also fill it with the weight gradient
    Σ_i δ_iᵀ x_i, summed from the per-example products (only for inputs with middle axes)."""
    w_on = module.weight.requires_grad
    b_on = module.bias is not None and module.bias.requires_grad
    x, d = _acc(x), _acc(d)
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
        sq, used = _seq_sq(x, d, path, total, scratch)
        if acc is not None and total is not None:
            acc.copy_(total[0].T)
    if b_on:
        db = d.sum(1)
        sq = sq + torch.linalg.vecdot(db, db)
    return sq, used


def _conv(
    module: nn.Module,
    x: Tensor,
    d: Tensor,
    path: LinearPath,
    acc: Tensor | None,
    scratch: _Scratch,
) -> tuple[Tensor, str]:
    """Conv rule; with ``acc`` (the weight's shape) also fill it with the weight gradient,
    summed from the per-example products."""
    conv: Any = module
    w_on = conv.weight.requires_grad
    b_on = conv.bias is not None and conv.bias.requires_grad
    x, d = _acc(x), _acc(d)
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
        pads = _explicit_padding(conv, one_d)
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
        step = _chunk(b, k * n_pos, x)
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
            part, used = _seq_sq(xg, dg, path, total, scratch)
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


def _explicit_padding(conv: Any, one_d: bool) -> tuple[int, ...]:
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


def _embedding(module: nn.Module, idx: Tensor, d: Tensor, path: LinearPath) -> tuple[Tensor, str]:
    emb: Any = module
    b = idx.shape[0]
    dim = d.shape[-1]
    idx = idx.reshape(b, -1)
    d = _acc(d).reshape(b, -1, dim)
    if emb.padding_idx is not None:
        d = d * (idx != emb.padding_idx).unsqueeze(-1).to(d.dtype)
    if emb.scale_grad_by_freq:  # torch divides each row's gradient by its count in the batch
        counts = torch.bincount(idx.flatten(), minlength=emb.num_embeddings).to(d.dtype)
        d = d / counts[idx].unsqueeze(-1)
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


def _affine_sq(module: nn.Module, xhat: Tensor, d: Tensor, n_affine: int) -> Tensor:
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


def _layernorm(module: nn.Module, x: Tensor, d: Tensor, path: LinearPath) -> tuple[Tensor, str]:
    ln: Any = module
    x, d = _acc(x), _acc(d)
    shape = tuple(ln.normalized_shape)
    xhat = F.layer_norm(x, shape, eps=ln.eps)
    return _affine_sq(module, xhat, d, math.prod(shape)), "direct"


def _rmsnorm(module: nn.Module, x: Tensor, d: Tensor, path: LinearPath) -> tuple[Tensor, str]:
    rms: Any = module
    x, d = _acc(x), _acc(d)
    shape = tuple(rms.normalized_shape)
    xhat = F.rms_norm(x, shape, eps=rms.eps)
    return _affine_sq(module, xhat, d, math.prod(shape)), "direct"


def _groupnorm(module: nn.Module, x: Tensor, d: Tensor, path: LinearPath) -> tuple[Tensor, str]:
    gn: Any = module
    x, d = _acc(x), _acc(d)
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


_Rule = Callable[[nn.Module, Tensor, Tensor, LinearPath], tuple[Tensor, str]]
_RULES: dict[str, _Rule] = {
    "embedding": _embedding,
    "layernorm": _layernorm,
    "groupnorm": _groupnorm,
    "rmsnorm": _rmsnorm,
}
# The rules that form products: they use scratch buffers and can also give ∇W (acc).
_ProductRule = Callable[
    [nn.Module, Tensor, Tensor, LinearPath, "Tensor | None", _Scratch], tuple[Tensor, str]
]
_PRODUCT_RULES: dict[str, _ProductRule] = {"linear": _linear, "conv1d": _conv, "conv2d": _conv}
# Input rank each rule accepts (batch axis included); anything else is unbatched or exotic.
_MIN_RANK = {"linear": 2, "conv1d": 3, "conv2d": 4, "embedding": 1, "layernorm": 2,
             "groupnorm": 2, "rmsnorm": 2}
_MAX_RANK = {"conv1d": 3, "conv2d": 4}


# -- the torch.func fallback ---------------------------------------------------------------


def _func_sq(
    module: nn.Module,
    params: dict[str, Tensor],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    d: Tensor,
    out: Tensor | None,
) -> Tensor:
    """vmap over examples of the vjp of the module run on one example, with δ_i.

    If ``out`` (the batched output, unmodified since the forward) is given, the
    per-example outputs are checked against it: a module that mixes examples or
    draws random numbers would otherwise give a wrong answer silently.
    """
    from torch.func import functional_call, vjp, vmap

    tensor_pos = [i for i, a in enumerate(args) if isinstance(a, Tensor)]
    tensor_kw = [k for k, v in kwargs.items() if isinstance(v, Tensor)]
    batched = [args[i].detach() for i in tensor_pos] + [kwargs[k].detach() for k in tensor_kw]

    def one(xs: list[Tensor], d_i: Tensor) -> tuple[Tensor, Tensor]:
        a = list(args)
        kw = dict(kwargs)
        for i, v in zip(tensor_pos, xs, strict=False):
            a[i] = v.unsqueeze(0)
        for k, v in zip(tensor_kw, xs[len(tensor_pos) :], strict=True):
            kw[k] = v.unsqueeze(0)

        def f(p: dict[str, Tensor]) -> Tensor:
            y = functional_call(module, p, tuple(a), kw)
            if not isinstance(y, Tensor):
                raise PerExampleUnsupported("module output is not a single tensor")
            return y

        y, back = vjp(f, params)[:2]
        (g,) = back(d_i.unsqueeze(0).to(y.dtype))
        total = sum(_acc(v).square().sum() for v in g.values())
        return torch.as_tensor(total), y.squeeze(0)

    sq, ys = vmap(one)(batched, d)
    if out is not None and not torch.allclose(
        ys.to(out.dtype), out, rtol=FUNC_CHECK_RTOL, atol=FUNC_CHECK_RTOL * float(out.abs().max())
    ):
        raise PerExampleUnsupported(
            "run one example at a time it gives a different output: it mixes examples "
            "or is random"
        )
    return sq


# -- fused weight gradients -----------------------------------------------------------------
# For Linear on inputs with middle axes and for convolutions, the direct form materialises
# every example's weight gradient x_iᵀ δ_i anyway; their sum IS the weight gradient. So these
# layers run (inside the context) as a custom autograd Function whose backward returns that
# sum instead of letting autograd form the same product a second time. That removes most of
# the overhead of the norms on these layers (benchmarks/per_example_overhead.py, "unfused").

def _conv_padding(conv: Any) -> tuple[int, ...] | None:
    """``conv``'s zero padding as one int per spatial axis; None if it is not symmetric
    (torch then pads outside the convolution) or not zeros."""
    if conv.padding_mode != "zeros":
        return None
    n = len(conv.kernel_size)
    pads = _explicit_padding(conv, n == 1)[: 2 * n]  # (left, right) per axis, last first
    if any(pads[i] != pads[i + 1] for i in range(0, 2 * n, 2)):
        return None
    return tuple(reversed(pads[::2]))


def _fusable(rule: str, module: nn.Module, x: Tensor, path: LinearPath) -> bool:
    """Whether the direct form will run for this call, so its products can give ∇W."""
    weight: Tensor = module.weight  # type: ignore[assignment]
    if not weight.requires_grad or not x.is_floating_point():
        return False
    if rule == "linear":
        if x.dim() < 3:
            return False  # the rank-one rule needs no product at all
        d_out, d_in = weight.shape
        return not _use_gram(math.prod(x.shape[1:-1]), d_in, d_out, path)
    conv: Any = module
    pads = _conv_padding(conv)
    if pads is None or x.dim() != (3 if rule == "conv1d" else 4):
        return False
    n_pos = 1
    for size, k, st, dl, p in zip(x.shape[2:], conv.kernel_size, conv.stride, conv.dilation,
                                  pads, strict=True):
        n_pos *= (size + 2 * p - dl * (k - 1) - 1) // st + 1
    k_g = weight[0].numel()  # C/g · kernel
    return not _use_gram(n_pos, k_g, weight.shape[0] // conv.groups, path)


def _under_functorch() -> bool:
    """A torch.func transform (vmap, grad, jvp) of the model is running: its tensors are
    batched or wrapped, the rules' out= products have no batching rule, and the norms
    of one example's transform are not the ones asked for, so such calls are not hooked."""
    active = getattr(torch._C, "_are_functorch_transforms_active", None)
    return active is not None and bool(active())


def _forward_ad_active() -> bool:
    """Forward-mode AD is on: the fused Function has no jvp, so the hooks' path is taken."""
    return int(getattr(torch.autograd.forward_ad, "_current_level", -1)) >= 0


def _conv_backward(
    conv: Any, x: Tensor, weight: Tensor, d: Tensor, input_grad: bool
) -> Tensor:
    """One of autograd's two convolution gradients, from the actual input and weight.

    (torch.nn.grad.conv2d_input passes an expanded dummy input instead, which sends
    oneDNN down a path 3-4x slower on CPU.)
    """
    pads = _conv_padding(conv)
    assert pads is not None  # only fused convolutions get here
    grads = torch.ops.aten.convolution_backward(
        d, x.to(d.dtype), weight.to(d.dtype), None, list(conv.stride), list(pads),
        list(conv.dilation), False, [0] * len(pads), conv.groups,
        [input_grad, not input_grad, False],
    )
    return grads[0] if input_grad else grads[1]


def _input_grad(module: nn.Module, rule: str, x: Tensor, weight: Tensor, d: Tensor) -> Tensor:
    # autocast: the product ran in δ's dtype; autograd casts the result back to x's
    if rule == "linear":
        return d.matmul(weight.to(d.dtype))
    return _conv_backward(module, x, weight, d, input_grad=True)


def _weight_grad(module: nn.Module, rule: str, x: Tensor, weight: Tensor, d: Tensor) -> Tensor:
    """Autograd's own weight gradient (differentiable; for the unfused cases)."""
    if rule == "linear":
        return d.reshape(-1, d.shape[-1]).T.matmul(x.to(d.dtype).reshape(-1, x.shape[-1]))
    return _conv_backward(module, x, weight, d, input_grad=False)


class _FusedProduct(torch.autograd.Function):
    """A Linear or zero-padded convolution whose backward also gives per-example norms.

    Forward: the output the module computed. Backward: the input gradient as autograd
    would form it, the bias gradient, and the weight gradient as the sum of the
    per-example products that the norm rule forms (see :func:`_seq_sq`). Where no norms
    are wanted (the context has exited, a double backward, a duplicate call) the weight
    gradient is autograd's usual product.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, x: Tensor, weight: Tensor, bias: Tensor | None, cap: _Capture
    ) -> Tensor:
        ctx.cap = cap  # the graph node owns the capture, as with the hooks
        # As autograd does: a Linear needs its weight only for the input gradient (so an
        # in-place change of the weight before backward is allowed when there is none).
        keep_weight = cap.rule != "linear" or ctx.needs_input_grad[0]
        ctx.save_for_backward(x, weight if keep_weight else None)
        # The output the module itself computed (the forward hook passes it in the
        # capture): an alias of it, not recomputed, and not a view, so that in-place ops
        # on it stay allowed (a custom Function's view outputs could not be modified).
        out = cap.out
        assert out is not None
        cap.out = None
        return out if out._base is None else torch.ops.aten._unsafe_view(out, out.shape)

    @staticmethod
    def backward(ctx: Any, d: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        x, weight = ctx.saved_tensors
        cap: _Capture = ctx.cap
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        dx = _input_grad(cap.module, cap.rule, x, weight, d) if need_x else None
        db = None
        if need_b:
            channel = d.dim() - 1 if cap.rule == "linear" else 1
            db = d.sum([i for i in range(d.dim()) if i != channel])
        dw = None
        if cap.owner is not None:
            fuse = need_w and not torch.is_grad_enabled()  # not in a double backward
            dw = cap.owner._on_backward(cap, d, x=x, weight_grad=fuse)
        if need_w and dw is None:
            dw = _weight_grad(cap.module, cap.rule, x, weight, d)
        if dw is not None:
            param: Tensor = cap.module.weight  # type: ignore[assignment]
            dw = dw.to(param.dtype)
        return dx, dw, db, None


# -- the hooks ----------------------------------------------------------------------------


# Id of the backward pass now running: the same (private) call that the public
# torch.autograd.graph.register_multi_grad_hook uses to tell one backward from the next.
# It is how "the most recent backward" is defined; None where torch lacks it.
_CURRENT_TASK: Callable[[], int] | None = getattr(torch._C, "_current_graph_task_id", None)


class _Capture:
    """What one module call saved for its backward hook; owned by the autograd graph.

    The only strong reference is the pre-hook on the autograd node that produced the
    module's output, so it is freed with the graph (after the backward, or when the
    graph is dropped unused).
    """

    __slots__ = ("owner", "name", "rule", "module", "x", "args", "kwargs", "out", "version",
                 "nr", "shape", "__weakref__")

    def __init__(self, owner: PerExampleGradNorms, name: str, rule: str, module: nn.Module) -> None:
        self.owner: PerExampleGradNorms | None = owner
        self.name = name
        self.rule = rule
        self.module = module
        self.x: Tensor | None = None
        self.args: tuple[Any, ...] = ()
        self.kwargs: dict[str, Any] = {}
        self.out: Tensor | None = None
        self.version = 0  # of out when captured (func)
        self.nr = 0  # which output of the node is the module's output
        self.shape: torch.Size | None = None  # reshape the node's gradient to the output's

    def __call__(self, grad_outputs: tuple[Tensor | None, ...]) -> None:
        grad = grad_outputs[self.nr]
        if self.owner is not None and grad is not None:
            self.owner._on_backward(self, grad if self.shape is None else grad.reshape(self.shape))

    def drop(self) -> None:
        self.owner = None
        self.x = self.out = None
        self.args, self.kwargs = (), {}


def _attach(cap: _Capture, out: Tensor) -> Tensor | None:
    """Hook ``cap`` on the autograd node that produced ``out``; maybe return a new output.

    The pre-hook of that node receives ∂loss/∂out even if ``out`` is later modified
    in place (a ReLU(inplace=True) after the layer): the node stays in the graph and
    gets the gradient with respect to the values it produced. A view is different: an
    in-place op on it re-routes the graph around the view's own node. So for a view
    that is a plain reshape of its base (Linear with bias on 3-D input returns one)
    the base's node is hooked; any other view or a leaf is replaced by a clone.
    """
    base = out._base
    if base is None and out.grad_fn is not None:
        out.grad_fn.register_prehook(cap)
        cap.nr = out.output_nr
        return None
    if (
        base is not None
        and base.grad_fn is not None
        and base.numel() == out.numel()
        and base.storage_offset() == out.storage_offset()
        and base.is_contiguous()
        and out.is_contiguous()
    ):
        base.grad_fn.register_prehook(cap)
        cap.nr, cap.shape = base.output_nr, out.shape
        return None
    own = out.clone()
    assert own.grad_fn is not None
    own.grad_fn.register_prehook(cap)
    return own


class PerExampleGradNorms:
    """Context manager: per-example squared gradient norms of one forward + backward.

    While active, hooks on ``model`` record what is needed so that after ONE forward
    and backward of a batch, :meth:`sq_norms` returns a (B,) tensor: for each example
    i, the squared L2 norm (summed over all trainable parameters) of example i's
    contribution to the accumulated ``.grad`` of that backward. With a mean-reduced
    loss over B examples that contribution is (1/B)·∇L_i; the caller rescales.
    Dim 0 of every module input is the batch axis. The norms are of the gradient
    actually back-propagated: under a GradScaler they carry its scale squared.

    Example::

        with PerExampleGradNorms(model) as norms:
            loss_fn(model(x), y).backward()
            per_example = norms.sq_norms() * len(x) ** 2   # |∇L_i|²

    Each covered module gets a forward hook that keeps its input (autograd keeps it
    too) and puts a pre-hook on the autograd node of its output; that pre-hook
    computes the module's (B,) squared norms from input and output gradient and
    drops both. Inputs and outputs are never modified (except that a module
    returning an irregular view returns a copy of it instead).

    Args:
        model: the model; its modules must be called through ``__call__``.
        plan: a plan from :func:`plan` (computed when None). Must be ok.
        linear_path: force the direct or the Gram form for sequence inputs of
            Linear and Conv layers ("auto": cheaper by the FLOP model).
        fuse: where the direct form runs, let the weight gradient be the sum of its
            per-example products instead of a second product by autograd (the forward
            hook of those Linear and Conv modules routes their output through a custom
            autograd Function; values and gradients are the same up to float rounding).

    Raises:
        ValueError: the plan is not ok.
    """

    def __init__(
        self,
        model: nn.Module,
        plan: PerExamplePlan | None = None,
        *,
        linear_path: LinearPath = "auto",
        fuse: bool = True,
    ) -> None:
        self.plan = plan if plan is not None else _plan(model)
        if not self.plan.ok:
            raise ValueError(f"per-example gradient norms unavailable: {self.plan.reason}")
        if linear_path not in ("auto", "direct", "gram"):
            raise ValueError(f"linear_path must be auto, direct or gram, got {linear_path!r}")
        self.model = model
        self.linear_path: LinearPath = linear_path
        self.fuse = fuse
        self._scratch = _Scratch()
        self.paths: dict[str, str] = {}  # module -> form used in the last backward
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._captures: list[weakref.ref[_Capture]] = []
        # (backward task id, module, (B,) squared norms) since the last sq_norms()
        self._terms: list[tuple[int | None, str, Tensor]] = []
        self._fired: dict[str, int | None] = {}  # module -> task id it fired in
        self._errors: list[str] = []
        self._active = False
        self._recomputing = False

    # -- context ---------------------------------------------------------------------
    def __enter__(self) -> PerExampleGradNorms:
        if self._active:
            raise RuntimeError("PerExampleGradNorms is already active")
        modules = dict(self.model.named_modules())
        missing = [name for name in self.plan.rules if name not in modules]
        if missing:
            raise ValueError(f"the plan does not match the model: no module {missing[0]!r}")
        for name, rule in self.plan.rules.items():
            module = modules[name]
            if rule in _PRODUCT_RULES:
                hook = functools.partial(self._on_forward_product, name, rule)
                self._handles.append(module.register_forward_hook(hook, with_kwargs=True))
            elif rule == "func":
                hook = functools.partial(self._on_forward_func, name)
                self._handles.append(module.register_forward_hook(hook, with_kwargs=True))
            else:
                hook = functools.partial(self._on_forward, name, rule)
                self._handles.append(module.register_forward_hook(hook))
        for name, module in modules.items():
            if isinstance(module, _BatchNorm):
                check = functools.partial(self._on_batchnorm, name)
                self._handles.append(module.register_forward_pre_hook(check))
        self._active = True
        self._reset()
        return self

    def __exit__(self, *exc: object) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._scratch.clear()
        for ref in self._captures:
            cap = ref()
            if cap is not None:
                cap.drop()  # a graph still alive keeps only an inert hook
        self._captures = []
        self._active = False
        self._reset()
        self._errors.clear()

    def _reset(self) -> None:
        self._terms = []
        self._fired = {}

    # -- forward hooks ---------------------------------------------------------------
    def _on_forward_product(
        self,
        name: str,
        rule: str,
        module: nn.Module,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        output: object,
    ) -> Tensor | None:
        """Linear / Conv: where the direct form will run, replace the output by the same
        values coming out of the fused Function; else the usual hook."""
        x = args[0] if args else kwargs.get("input")
        if (
            self.fuse
            and isinstance(x, Tensor)
            and isinstance(output, Tensor)
            and output.requires_grad
            and not self._recomputing
            and not _under_functorch()
            and not _forward_ad_active()
            and _fusable(rule, module, x, self.linear_path)
        ):
            cap = _Capture(self, name, rule, module)
            cap.out = output.detach()
            self._captures.append(weakref.ref(cap))
            out: Tensor = _FusedProduct.apply(x, module.weight, module.bias, cap)
            return out
        return self._on_forward(name, rule, module, (x,) if x is not None else (), output)

    def _on_forward(
        self, name: str, rule: str, module: nn.Module, args: tuple[Any, ...], output: object
    ) -> Tensor | None:
        if self._recomputing or _under_functorch():
            return None
        if not isinstance(output, Tensor):
            self._not_a_tensor(name, output)
            return None
        if not output.requires_grad:
            return None
        x = args[0] if args else None
        if not isinstance(x, Tensor):
            self._errors.append(f"module {name!r} was called without a tensor input")
            return None
        rank = x.dim()
        if rank < _MIN_RANK[rule] or rank > _MAX_RANK.get(rule, rank):
            self._errors.append(
                f"module {name!r} got a {rank}-D input; dim 0 must be the batch axis"
            )
            return None
        cap = _Capture(self, name, rule, module)
        cap.x = x.detach()  # autograd saved it too, and refuses a backward if it changes
        self._captures.append(weakref.ref(cap))
        return _attach(cap, output)

    def _on_forward_func(
        self,
        name: str,
        module: nn.Module,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        output: object,
    ) -> Tensor | None:
        if self._recomputing or _under_functorch():
            return None
        if not isinstance(output, Tensor):
            self._not_a_tensor(name, output)
            return None
        if not output.requires_grad:
            return None
        cap = _Capture(self, name, "func", module)
        cap.args = args
        cap.kwargs = dict(kwargs)
        self._captures.append(weakref.ref(cap))
        own = _attach(cap, output)
        out = output if own is None else own
        cap.out = out.detach()
        cap.version = out._version
        return own

    def _not_a_tensor(self, name: str, output: object) -> None:
        if torch.is_grad_enabled():
            self._errors.append(f"module {name!r} returned {type(output).__name__}, not a tensor")

    def _on_batchnorm(self, name: str, module: nn.Module, args: tuple[Any, ...]) -> None:
        if module.training and torch.is_grad_enabled() and not self._recomputing:
            self._errors.append(
                f"{type(module).__name__} at {name!r} mixes examples in training mode"
            )

    # -- backward hook ---------------------------------------------------------------
    def _on_backward(
        self, cap: _Capture, grad: Tensor, x: Tensor | None = None, weight_grad: bool = False
    ) -> Tensor | None:
        """Record ``cap``'s (B,) squared norms; with ``weight_grad`` also return ∇W.

        ``x`` is the module's input where the caller holds it (the fused Function),
        else ``cap.x``. Returns None when no weight gradient was formed (not asked, or
        this call's norms are refused).
        """
        task = None if _CURRENT_TASK is None else _CURRENT_TASK()
        if cap.name in self._fired:
            if task is None or self._fired[cap.name] == task:
                self._errors.append(
                    f"module {cap.name!r} received two gradients in one backward: it was "
                    "called more than once in the forward (weight reuse), or outputs of two "
                    "forward passes were back-propagated together"
                    + ("" if task is not None else ", or sq_norms() was not read after a backward")
                )
                return None
            # Fired in an earlier backward: a new one began and the last one's numbers are
            # stale. (A module firing for the first time under a new task id is not enough:
            # reentrant activation checkpointing runs a nested backward inside this one.)
            self._terms = [(t, n, v) for t, n, v in self._terms if t == task]
            self._fired = {n: t for t, n, _ in self._terms}
        self._fired[cap.name] = task
        acc = None
        if cap.rule == "func":
            sq = self._func(cap, grad)
            if sq is None:
                return None
        else:
            x = cap.x if x is None else x
            assert x is not None
            if grad.requires_grad:  # backward(create_graph=True): do not extend the graph
                grad = grad.detach()
            if cap.rule in _PRODUCT_RULES:
                weight: Tensor = cap.module.weight  # type: ignore[assignment]
                if weight_grad and weight.requires_grad:  # (not frozen since the forward)
                    acc = _acc(x).new_empty(weight.shape)
                sq, used = _PRODUCT_RULES[cap.rule](
                    cap.module, x.detach(), grad, self.linear_path, acc, self._scratch)
            else:
                sq, used = _RULES[cap.rule](cap.module, x.detach(), grad, self.linear_path)
            self.paths[cap.name] = f"{cap.rule}-{used}"
        self._terms.append((task, cap.name, sq))
        return acc

    def _func(self, cap: _Capture, grad: Tensor) -> Tensor | None:
        params = {n: p.detach() for n, p in cap.module.named_parameters() if p.requires_grad}
        out = cap.out if cap.out is not None and cap.out._version == cap.version else None
        self._recomputing = True
        try:
            with torch.enable_grad():
                sq = _func_sq(cap.module, params, cap.args, cap.kwargs, grad.detach(), out)
        except PerExampleUnsupported as e:
            self._errors.append(f"torch.func fallback for {cap.name!r}: {e.message}")
            return None
        except RuntimeError as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            self._errors.append(f"torch.func fallback for {cap.name!r} failed: {first}")
            return None
        finally:
            self._recomputing = False
        self.paths[cap.name] = "func"
        return sq.detach()

    # -- result ----------------------------------------------------------------------
    def sq_norms(self) -> Tensor:
        """Per-example squared gradient norms of the most recent backward, shape (B,).

        Float64 (float32 on devices without float64), on the model's device. Clears the
        state for the next batch.

        Raises:
            PerExampleUnsupported: this batch could not be handled exactly (weight reuse,
                BatchNorm in training mode, a fallback that failed, ...).
            RuntimeError: no backward ran through the hooked modules since the last call.
        """
        errors, terms = self._errors, self._terms
        self._errors = []
        self._reset()
        self._captures = [ref for ref in self._captures if ref() is not None]
        if errors:
            more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
            raise PerExampleUnsupported(errors[0] + more)
        if not terms:
            raise RuntimeError(
                "sq_norms(): no backward reached the hooked modules since the last call "
                "(call it inside the context, after loss.backward())"
            )
        values = [v for _, _, v in terms]
        sizes = {v.shape[0] for v in values}
        if len(sizes) > 1:
            raise PerExampleUnsupported(
                f"modules saw different batch sizes {sorted(sizes)} in one backward"
            )
        dtype = torch.float32 if values[0].device.type == "mps" else torch.float64
        return torch.stack(values).to(dtype).sum(0)
