"""Every use of PyTorch internals, in one place, each with a fallback.

bsfind needs a few things torch has no public API for. Each is looked up here
with ``getattr`` (never imported by name, so a torch that renamed it still
imports bsfind), and each has a fallback that keeps bsfind correct, if slower
or less precise, when the internal is gone. Checked against torch 2.13.0 (the
CPU wheel the Makefile pins) and 2.11 (the GPU check machine).

    .venv/bin/python -m pytest tests/test_torch_compat.py -q
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator

import torch
from torch import nn

# torch.autograd.graph.register_multi_grad_hook tells one backward pass from the
# next through this call; PerExampleGradNorms uses it the same way. Without it
# (None) every hook counts as one backward, which still catches weight reuse.
_TASK_ID: Callable[[], int] | None = getattr(torch._C, "_current_graph_task_id", None)


def current_graph_task_id() -> int | None:
    """Id of the backward pass now running, or None where torch cannot say."""
    return None if _TASK_ID is None else int(_TASK_ID())


def in_backward() -> bool:
    """Whether a backward pass is running in this thread (activation checkpointing then
    recomputes forwards). Fallback: False."""
    task = current_graph_task_id()
    return task is not None and task >= 0


def has_graph_task_id() -> bool:
    """Whether :func:`current_graph_task_id` can tell backward passes apart."""
    return _TASK_ID is not None


# Whether the running backward will execute a node: here, a parameter's AccumulateGrad,
# which a pass that only asks for gradients elsewhere (autograd.grad w.r.t. the inputs,
# backward(inputs=...)) skips. Without it (None) every pass counts as accumulating, as
# bsfind counted them before it was used.
_WILL_EXECUTE: Callable[[object], bool] | None = getattr(torch._C, "_will_engine_execute_node",
                                                         None)


def gradient_reach(param: torch.Tensor, nodes: dict[int, object] | None = None) -> str:
    """What the backward now running does with ``param``'s gradient: "accumulates" (into
    ``param.grad``: backward()), "returns" (``torch.autograd.grad`` w.r.t. it hands it to
    the caller, who may assign it to ``.grad``) or "untouched" (``autograd.grad`` w.r.t.
    other tensors, the inputs: adversarial examples, saliency maps, a gradient penalty;
    or ``backward(inputs=...)`` without it). ``nodes``: a cache of the parameters'
    AccumulateGrad nodes by id (looking one up costs ~25 µs, asking the engine ~1 µs;
    held, the node stays the one torch uses, as DDP holds them). Fallback: "accumulates"."""
    edge = getattr(torch.autograd.graph, "get_gradient_edge", None)
    if _WILL_EXECUTE is None or edge is None:
        return "accumulates"
    if not param.requires_grad:
        return "untouched"
    cached = None if nodes is None else nodes.get(id(param))
    if cached is not None and getattr(cached, "variable", None) is param:
        reach = _reach_at(cached)
        if reach != "untouched":
            return reach
        # a node torch replaced (param.data of another dtype or device: .to(), .half()
        # drop the accumulator) reads "untouched" too: ask the one torch uses now
    node = edge(param).node
    if nodes is not None:
        nodes[id(param)] = node
    return _reach_at(node)


def _reach_at(node: object) -> str:
    assert _WILL_EXECUTE is not None
    try:
        return "accumulates" if _WILL_EXECUTE(node) else "untouched"
    except RuntimeError as e:  # torch refuses a leaf that autograd.grad() returns
        return "returns" if "autograd.grad" in str(e) else "accumulates"


def functorch_transforms_active() -> bool:
    """True inside a torch.func transform (vmap, grad, jvp) of the model.

    Fallback: False (hooks then run under the transform, as they did before
    torch.func existed).
    """
    active = getattr(torch._C, "_are_functorch_transforms_active", None)
    return active is not None and bool(active())


def forward_ad_active() -> bool:
    """True while forward-mode AD (``torch.autograd.forward_ad.dual_level``) is on.

    Fallback: False.
    """
    return int(getattr(torch.autograd.forward_ad, "_current_level", -1)) >= 0


def view_base(t: torch.Tensor) -> torch.Tensor | None:
    """The tensor ``t`` is a view of (``Tensor._base``), or None."""
    return getattr(t, "_base", None)


def version_counter(t: torch.Tensor) -> int:
    """How many in-place changes ``t`` has seen (``Tensor._version``; fallback 0, so a
    change goes unnoticed and the check it feeds is skipped)."""
    return int(getattr(t, "_version", 0))


def non_view_alias(t: torch.Tensor) -> torch.Tensor:
    """``t`` itself if it is not a view, else an alias of its data that is not a view.

    A custom autograd Function may not return a view if its output is to be
    modified in place later. ``aten._unsafe_view`` gives the same storage without
    the view relation; the fallback copies.
    """
    if view_base(t) is None:
        return t
    op = getattr(torch.ops.aten, "_unsafe_view", None)
    return t.clone() if op is None else op(t, t.shape)


# torch.nn.modules.batchnorm._BatchNorm is the base of BatchNorm1d/2d/3d, their
# Lazy forms and SyncBatchNorm. Fallback: the public classes.
_BATCHNORM_BASE: type[nn.Module] | None = getattr(torch.nn.modules.batchnorm, "_BatchNorm", None)
BATCHNORM_TYPES: tuple[type[nn.Module], ...] = (
    (_BATCHNORM_BASE,) if isinstance(_BATCHNORM_BASE, type)
    else (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)
)


def is_batchnorm(module: nn.Module) -> bool:
    """A BatchNorm layer of any dimension (in either mode)."""
    return isinstance(module, BATCHNORM_TYPES)


def has_batchnorm_in_training(model: nn.Module) -> bool:
    """Whether some BatchNorm layer of ``model`` normalises over the batch (training mode)."""
    return any(is_batchnorm(m) and m.training for m in model.modules())


def swap_parameter(module: nn.Module, name: str, value: torch.Tensor) -> torch.Tensor | None:
    """Make ``module.<name>`` return ``value`` (any tensor, not only a Parameter) until
    swapped back; returns what was there, or None where this torch keeps parameters
    elsewhere (the caller then cannot swap).

    ``nn.Module.__setattr__`` accepts only Parameters under a parameter's name; its
    ``_parameters`` dict is where ``__getattr__`` looks, and where
    ``torch.func.functional_call`` swaps tensors in the same way.
    """
    params = getattr(module, "_parameters", None)
    if not isinstance(params, dict) or name not in params:
        return None
    old = params[name]
    params[name] = value
    return old


# -- the tracker (bsfind/tracker.py) --------------------------------------------------------

# torch._foreach_* run one kernel per group of tensors instead of one per tensor (what
# clip_grad_norm_ uses). Fallback: a Python loop over the tensors.
_FOREACH_NORM: Callable[..., list[torch.Tensor]] | None = getattr(torch, "_foreach_norm", None)
_FOREACH_SUB_: Callable[..., None] | None = getattr(torch, "_foreach_sub_", None)
_FOREACH_COPY_: Callable[..., None] | None = getattr(torch, "_foreach_copy_", None)


def sq_norm(tensors: list[torch.Tensor]) -> torch.Tensor:
    """Σ |t|² over ``tensors`` as a float64 scalar on their device (no host sync)."""
    norms = _FOREACH_NORM(tensors) if _FOREACH_NORM is not None else [t.norm() for t in tensors]
    n = torch.stack(norms).double()  # each norm in its tensor's dtype, the sum in float64
    return n.dot(n)


def sq_diff_and_copy(prev: list[torch.Tensor], current: list[torch.Tensor]) -> torch.Tensor:
    """Σ |current − prev|², then ``prev`` becomes a copy of ``current`` (in place, no temporary
    the size of the tensors)."""
    if _FOREACH_SUB_ is not None and _FOREACH_COPY_ is not None:
        _FOREACH_SUB_(prev, current)
        sq = sq_norm(prev)
        _FOREACH_COPY_(prev, current)
        return sq
    for p, c in zip(prev, current, strict=True):
        p.sub_(c)
    sq = sq_norm(prev)
    for p, c in zip(prev, current, strict=True):
        p.copy_(c)
    return sq


def loss_scale(scaler: object | None) -> torch.Tensor | float | None:
    """The loss scale a GradScaler's gradients carry now, or None (no scaler, or disabled).

    The scale tensor (``GradScaler._scale``) is read without a host sync; the fallback is
    ``get_scale()`` (a float, one sync).
    """
    if scaler is None:
        return None
    enabled = getattr(scaler, "is_enabled", None)
    if callable(enabled) and not enabled():
        return None
    scale = getattr(scaler, "_scale", None)
    if isinstance(scale, torch.Tensor):
        return scale
    get = getattr(scaler, "get_scale", None)
    return float(get()) if callable(get) else None


def scaler_unscaled(scaler: object | None) -> bool:
    """Whether ``scaler.unscale_(optimizer)`` already ran this step (its per-optimizer
    stage, ``GradScaler._per_optimizer_states``). Fallback: False (cannot tell)."""
    states = getattr(scaler, "_per_optimizer_states", None)
    if not isinstance(states, dict):
        return False
    return any(getattr(s.get("stage"), "name", "") == "UNSCALED" for s in states.values())


_INTERNAL = [0]  # process-wide: CUDA backward runs its nodes on the device's own thread
_INTERNAL_LOCK = threading.Lock()


@contextlib.contextmanager
def internal_backward() -> Iterator[None]:
    """Marks a backward pass bsfind itself runs inside a user's step (the per-example
    hooks' check for rows that cross the batch, ``torch.autograd.grad`` on the forward's
    outputs): hooks that wait for the training backward skip it (:func:`in_internal_backward`).
    The mark is process-wide, not per thread: on CUDA the engine runs backward nodes,
    and their hooks, on a thread of its own."""
    with _INTERNAL_LOCK:
        _INTERNAL[0] += 1
    try:
        yield
    finally:
        with _INTERNAL_LOCK:
            _INTERNAL[0] -= 1


def in_internal_backward() -> bool:
    """Whether the backward now running is one of bsfind's own (:func:`internal_backward`)."""
    return _INTERNAL[0] > 0


def can_queue_backward_callback() -> bool:
    """Whether :func:`queue_backward_callback` is available in this torch."""
    engine = getattr(torch.autograd.Variable, "_execution_engine", None)
    return getattr(engine, "queue_callback", None) is not None


def queue_backward_callback(fn: Callable[[], None]) -> bool:
    """Run ``fn`` once the backward pass now running has finished (and before
    ``backward()`` returns); DDP and FSDP use the same engine call. Must be called
    from inside a backward (a hook). Returns False where torch has no such call."""
    engine = getattr(torch.autograd.Variable, "_execution_engine", None)
    queue = getattr(engine, "queue_callback", None)
    if queue is None:
        return False
    queue(fn)
    return True


def is_parametrized(module: nn.Module) -> bool:
    """Whether torch.nn.utils.parametrize computes some of ``module``'s tensors
    (parametrizations.weight_norm, spectral_norm, orthogonal)."""
    parametrize = getattr(getattr(torch.nn.utils, "parametrize", None), "is_parametrized", None)
    return bool(parametrize(module)) if parametrize is not None else False


def hook_next_id() -> int | None:
    """The id torch gives the next hook handle (``RemovableHandle.next_id``), if any."""
    from torch.utils.hooks import RemovableHandle

    n = getattr(RemovableHandle, "next_id", None)
    return n if isinstance(n, int) else None


def hook_ids_past(n: int | None) -> None:
    """Make hook handles made from now on take ids from ``n`` up: a model loaded with
    another process's hook entries (ids with their with_kwargs/always_call flags) must
    not have a new hook take a stale id, whose flags it would get (a review)."""
    from torch.utils.hooks import RemovableHandle

    now = hook_next_id()
    if n is not None and now is not None and n > now:
        RemovableHandle.next_id = n


RngState = tuple[torch.Tensor, int | None, torch.Tensor | None]


def rng_state(device: torch.device | None) -> RngState | None:
    """torch's global random state (the CPU's, and ``device``'s if CUDA), to draw the same
    numbers again (:func:`set_rng_state`); None while dynamo compiles (read there, it
    would break the graph: fallback, a rerun draws new numbers)."""
    compiling = getattr(getattr(torch, "compiler", None), "is_compiling", None)
    if compiling is not None and compiling():
        return None
    index = (device.index or 0) if device is not None and device.type == "cuda" else None
    return (torch.get_rng_state(), index,
            torch.cuda.get_rng_state(index) if index is not None else None)


def set_rng_state(state: RngState | None) -> None:
    if state is None:
        return
    cpu, index, cuda = state
    torch.set_rng_state(cpu)
    if index is not None and cuda is not None:
        torch.cuda.set_rng_state(cuda, index)
