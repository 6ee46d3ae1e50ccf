"""Tensors of batch size 1 that the forward broadcasts over the batch.

Two constructs put one tensor into every example's computation:

- a module input of batch size 1 broadcast later: GPT-2 and BERT build position ids of
  shape (1, T), and the position embedding's (1, T, d) output is added to the (B, T, d)
  token embeddings. Such a module (Linear, Embedding, convolution, normalisation) is run
  again on its input expanded to the model's batch size (read from the root module's
  input): the same values, one row per example, so its rule sees every example's output
  gradient.
- a parameter of shape (1, ...) used by the forward of a module that also has
  parameterised children (a ViT's cls_token and pos_embed on the root): for the forward
  it is swapped for its ``expand(B, ...)``, whose gradient row i is example i's gradient.

Both are exact only if the rest of the forward broadcasts that tensor: example i's
outputs must depend on its row i alone. :func:`crossing_rows` checks that once per
PerExampleGradNorms, on the first forward: two more backward passes through the
retained graph, with a random cotangent on example 0's outputs, then on example 1's;
gradient reaching any other row means the tensor was indexed along dim 0
(``pos_embed[0]``), reduced or multiplied across it. The same check reads the output
of a module given indices made in the forward with the batch's length on dim 0, which
may be positions (``torch.arange(T)`` with T = B), not examples.
"""

from __future__ import annotations

import copy
import types
from collections.abc import Mapping
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from bsfind import torch_compat as compat

# Gradient on rows other than the cotangent's example, relative to its own row's, above
# which the tensor counts as shared across examples. Independent rows get exact zeros
# (a zero cotangent times finite local derivatives); the margin only absorbs denormals.
CROSSING_RTOL = 1e-6


def first_tensor(args: tuple[Any, ...], kwargs: dict[str, Any] | None = None) -> Tensor | None:
    """The first tensor among a call's arguments (positional first, then keyword, looking
    into dicts, lists and tuples)."""
    found = _tensors(args, 3, first=True) or _tensors(list((kwargs or {}).values()), 3,
                                                      first=True)
    return found[0] if found else None


def output_tensors(output: object) -> list[Tensor]:
    """The tensors in a module's output (a tensor, or dicts / lists / tuples of them, e.g. a
    transformers ModelOutput)."""
    return _tensors(output, 3, first=False)


def _tensors(obj: object, depth: int, first: bool) -> list[Tensor]:
    if isinstance(obj, Tensor):
        return [obj]
    if depth == 0:
        return []
    items: list[object] = []
    if isinstance(obj, Mapping):
        items = list(obj.values())
    elif isinstance(obj, (list, tuple)):
        items = list(obj)
    out: list[Tensor] = []
    for item in items:
        out += _tensors(item, depth - 1, first)
        if first and out:
            break
    return out


def crossing_rows(outputs: list[Tensor], tensors: list[Tensor], batch: int,
                  permuted: list[bool] | None = None) -> list[int | None]:
    """For each of ``tensors`` (batch-expanded, rows = examples), the example k whose
    outputs depend on rows other than k (None where no such dependence was found).

    Args:
        outputs: the forward's outputs with the batch on dim 0 (others are ignored).
        tensors: tensors of the graph with ``batch`` rows.
        batch: the batch size.
        permuted: per tensor, whether its rows may be the examples in another order
            (indices made in the forward: a batch sorted by length, ``ids[order]``, is
            one example per row, as exact as the unsorted one; a review): then example k
            must depend on one row alone, not the same one as example k's neighbour.
    """
    outs = [o for o in outputs if o.requires_grad and o.dim() >= 1 and o.shape[0] == batch]
    found: list[int | None] = [None] * len(tensors)
    if not outs or batch < 2:
        return found
    permuted = permuted or [False] * len(tensors)
    rows_of: list[list[int]] = [[] for _ in tensors]  # the one row example k depends on
    gen = torch.Generator(device=outs[0].device).manual_seed(0)  # not the user's RNG
    for k in (0, 1):
        cotangents = []
        for o in outs:
            c = torch.zeros_like(o)
            c[k] = torch.randn(o.shape[1:], generator=gen, device=o.device).to(o.dtype)
            cotangents.append(c)
        with compat.internal_backward():  # not the user's backward (tracker callbacks)
            grads = torch.autograd.grad(outs, tensors, cotangents, retain_graph=True,
                                        allow_unused=True)
        for i, g in enumerate(grads):
            if g is None or found[i] is not None:
                continue
            rows = torch.linalg.vector_norm(g.detach().float().reshape(batch, -1), dim=1)
            if permuted[i]:
                used = torch.nonzero(rows > CROSSING_RTOL * rows.max()).flatten().tolist()
                if len(used) > 1 or (used and used[0] in rows_of[i]):
                    found[i] = k
                rows_of[i] += used
                continue
            own = rows[k]
            others = torch.linalg.vector_norm(torch.cat([rows[:k], rows[k + 1 :]]))
            if others > CROSSING_RTOL * own:
                found[i] = k
    return found


# --------------------------------------------------------------------------- the guard


class ExpansionOwner(Protocol):
    """What :class:`GuardedForward` asks of the hooks that expand a module's parameters."""

    def expanded_in(self, name: str) -> bool: ...

    def unexpand(self, name: str, module: nn.Module, exc: BaseException) -> None: ...

    def withdraw(self, name: str) -> None: ...

    def crossed(self, name: str, output: object) -> bool: ...

    def interrupted(self, name: str) -> None: ...


# The name under which the root's GuardedForward asks its hooks about the batch-1 module
# inputs expanded in the current call (not a module's name: names have no "<").
BATCH1_INPUTS = "<batch-1 inputs>"


def plain_forward(module: nn.Module) -> Any:
    """``module``'s class forward, bound to it."""
    return types.MethodType(type(module).forward, module)


def unchanged(value: Any) -> Any:
    return value


# Words of torch's errors for shapes that do not fit, and for a tensor of B elements
# where the forward wanted one (.item(), float(), `if p > 0`: a review).
SHAPE_WORDS = ("size", "shape", "dimension", "converted to", "one element", "ambiguous")


def shape_error(exc: BaseException) -> bool:
    """Whether ``exc`` reads as shapes that do not fit (what an expanded parameter that
    is not broadcast over the batch raises), not as memory or the user's own control."""
    text = str(exc).lower()
    return (isinstance(exc, (RuntimeError, ValueError, IndexError))
            and not isinstance(exc, torch.OutOfMemoryError) and "out of memory" not in text
            and any(word in text for word in SHAPE_WORDS))


class GuardedForward:
    """The forward of a module whose (1, ...) parameters the hooks expand to the batch
    (rule "broadcast"), while hooks are on: when it raises a shape error with them
    expanded, it runs again unexpanded. A leading 1 that is not the batch's dim (a
    ReZero scale of shape (1,) times (B, d) activations; a (1, d) embedding added to
    (B, T, d)) made the expanded parameter fail in the user's own forward, in their
    training loop (a review). When the run unexpanded succeeds, the hooks refuse the
    parameter; when it raises too, the error is the user's, and nothing is refused.
    The root's guard does the same for the batch-1 module inputs expanded in its call
    (``BATCH1_INPUTS``): the whole forward runs again without them; and when its forward
    returns, those inputs are checked (:meth:`ExpansionOwner.crossed`), so that one the
    forward does not broadcast over the batch is refused and the forward run again
    before its changed values reach the user's loss.

    One guard per module, for every set of hooks on it (they may close in any order).
    A copy of the module (``copy.deepcopy``: an EMA's AveragedModel; ``pickle``), whose
    copied hooks do nothing (``hooks.Hook``), gets its class's forward: a closure here ran
    the original's forward, for good (a review)."""

    def __init__(self, module: nn.Module, own: Any) -> None:
        self.module = module
        self.own = own  # the instance's own forward before the guard (None: its class's)
        self.owners: list[tuple[ExpansionOwner, str]] = []

    @classmethod
    def install(cls, module: nn.Module, owner: ExpansionOwner, name: str) -> None:
        current = vars(module).get("forward")
        guard = current if isinstance(current, cls) else cls(module, current)
        guard.owners.append((owner, name))
        module.forward = guard  # type: ignore[method-assign]

    @classmethod
    def remove(cls, module: nn.Module, owner: ExpansionOwner) -> None:
        guard = vars(module).get("forward")
        if not isinstance(guard, cls):
            return
        guard.owners = [(o, n) for o, n in guard.owners if o is not owner]
        if guard.owners:
            return
        if guard.own is None:
            del vars(module)["forward"]
        else:
            module.forward = guard.own  # type: ignore[method-assign]

    @property
    def __wrapped__(self) -> Any:
        """The forward it runs (``inspect.signature`` reads its parameters: a Hugging Face
        Trainer keeps the dataset columns that the forward names)."""
        return self.own if self.own is not None else plain_forward(self.module)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        forward = self.__wrapped__
        if torch.jit.is_tracing():  # (torch.jit.trace segfaults on a caught failed op)
            return forward(*args, **kwargs)
        x = first_tensor(args, kwargs)
        # (a rerun draws the first attempt's random numbers: dropout's masks; a review)
        state = compat.rng_state(x.device if x is not None else None)
        refused: list[tuple[ExpansionOwner, str]] = []
        while True:  # each rerun refuses one more expansion at least: it ends
            try:
                out = forward(*args, **kwargs)
            except Exception as exc:
                expanded = [(o, n) for o, n in self.owners if o.expanded_in(n)]
                if not expanded or not shape_error(exc):
                    for owner, name in refused:  # raised without them too: the user's error
                        owner.withdraw(name)
                    raise
                for owner, name in reversed(expanded):  # (the last expansion put back first)
                    owner.unexpand(name, self.module, exc)
                refused += expanded  # (one per layer: UMT5's biases, a review)
            except BaseException:  # Ctrl-C: torch runs no end hook, even always_call
                for owner, name in self.owners:
                    owner.interrupted(name)
                raise
            else:
                if not any([o.crossed(n, out) for o, n in self.owners]):  # (each checks)
                    return out
            compat.set_rng_state(state)  # again, without what was refused: as without bsfind

    def __deepcopy__(self, memo: dict[int, Any]) -> Any:
        if self.own is not None:
            return copy.deepcopy(self.own, memo)
        return plain_forward(copy.deepcopy(self.module, memo))

    def __reduce__(self) -> tuple[Any, ...]:
        return (unchanged, (self.own,)) if self.own is not None else (
            plain_forward, (self.module,))
