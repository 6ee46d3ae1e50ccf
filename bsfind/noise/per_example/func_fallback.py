"""The torch.func fallback: per-example norms of any leaf module by vmap over examples.

Slower than the rules of :mod:`.rules` (one vjp per example, vectorised), but exact
for any module that treats examples independently; the batched output is checked
against the one-example outputs to catch modules that do not.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import Tensor, nn

from bsfind.noise.per_example.plan import PerExampleUnsupported
from bsfind.noise.per_example.rules import upcast

# Relative tolerance when the func fallback checks that running a module one
# example at a time reproduces its batched output (float32 reductions reorder).
FUNC_CHECK_RTOL = 1e-3


# -- the torch.func fallback ---------------------------------------------------------------


def func_sq(
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

    # Tensors with the batch on dim 0 are split over the examples; any other (a (T, T)
    # mask, EmbeddingBag's flat ids) is given whole to every example, and the output
    # check below says whether that was right (vmap's ValueError escaped the hooks).
    n = int(d.shape[0])

    def per_example(v: object) -> bool:
        return isinstance(v, Tensor) and v.dim() > 0 and int(v.shape[0]) == n

    tensor_pos = [i for i, a in enumerate(args) if per_example(a)]
    tensor_kw = [k for k, v in kwargs.items() if per_example(v)]
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
        total = sum(upcast(v).square().sum() for v in g.values())
        return torch.as_tensor(total), y.squeeze(0)

    with warnings.catch_warnings():  # (functorch's, on every measured step: not the user's)
        warnings.filterwarnings("ignore", message="There is a performance drop")
        sq, ys = vmap(one)(batched, d)
    if out is not None and not torch.allclose(
        ys.to(out.dtype), out, rtol=FUNC_CHECK_RTOL, atol=FUNC_CHECK_RTOL * float(out.abs().max())
    ):
        shared = [f"argument {i}" for i, a in enumerate(args)
                  if isinstance(a, Tensor) and i not in tensor_pos] + [
            repr(k) for k, v in kwargs.items() if isinstance(v, Tensor) and k not in tensor_kw]
        given = (f" ({', '.join(shared)}, not of the batch's size, given whole to each "
                 "example)" if shared else "")
        raise PerExampleUnsupported(
            "run one example at a time it gives a different output: it mixes examples "
            f"or is random{given}"
        )
    return sq
