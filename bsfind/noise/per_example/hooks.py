"""The hooks and the context manager: :class:`PerExampleGradNorms`.

Forward hooks on every planned module keep what the module's rule needs and put a
pre-hook on the autograd node of the module's output; that pre-hook computes the
module's per-example squared norms during the ordinary backward pass. Around that:
the root module's hooks learn the batch size (:mod:`.broadcast`), nn.MultiheadAttention
runs its projections through capturing Linear calls (:mod:`.attention`), tied weights
add their cross terms (:mod:`.tied`), and parameters of shape (1, ...) owned by a module
with children are expanded over the batch for the forward.
"""

from __future__ import annotations

import functools
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bsfind import torch_compat as compat
from bsfind.noise.per_example.attention import AttentionProjections, ProjectionWeights
from bsfind.noise.per_example.broadcast import (
    BATCH1_INPUTS,
    GuardedForward,
    crossing_rows,
    first_tensor,
    output_tensors,
)
from bsfind.noise.per_example.func_fallback import func_sq
from bsfind.noise.per_example.fused import FusedProduct, fusable
from bsfind.noise.per_example.plan import (
    PerExamplePlan,
    PerExampleUnsupported,
    TiedWeight,
    plan,
)
from bsfind.noise.per_example.rules import (
    MAX_RANK,
    MIN_RANK,
    PRODUCT_RULES,
    RULES,
    LinearPath,
    Scratch,
    embedding_delta,
    upcast,
)
from bsfind.noise.per_example.tied import embeddings_dot, head_rows, rows_dot

_plan = plan  # PerExampleGradNorms.__init__ has a parameter named `plan`


# -- the hooks ----------------------------------------------------------------------------


def _trained_params(cap: Capture) -> list[Tensor]:
    """The trainable leaf parameters whose gradient ``cap``'s backward feeds: a layer's
    own (weight and bias, always in its forward), a module's own read by torch.func (which
    may leave one out), or the first of its submodules'."""
    module = cap.module
    params: Sequence[Tensor]
    if cap.rule == "broadcast":  # cap.name ends with the parameter's name
        found = getattr(module, cap.name.rpartition(".")[2], None)
        params = [found] if isinstance(found, Tensor) else []
    elif isinstance(module, nn.Module):
        params = [p for p in module.parameters(recurse=False) if p.requires_grad]
        if not params:
            params = [p for p in module.parameters() if p.requires_grad][:1]
    else:  # an attention slice: views of the packed in-projection
        params = [t for t in (module.weight, module.bias) if isinstance(t, Tensor)]
        params = [b if (b := compat.view_base(t)) is not None else t for t in params]
    return [p for p in params if p.requires_grad and p.is_leaf]


def _cleared(param: Tensor) -> bool:
    """Whether ``param.grad`` holds nothing now, as after ``zero_grad()`` (read while a
    backward's hook for the module runs, before its weight gradient is added)."""
    grad = param.grad
    return grad is None or not bool(grad.any())


class Capture:
    """What one module call saved for its backward hook; owned by the autograd graph.

    The only strong reference is the pre-hook on the autograd node that produced the
    module's output, so it is freed with the graph (after the backward, or when the
    graph is dropped unused).
    """

    __slots__ = ("owner", "name", "rule", "module", "x", "args", "kwargs", "out", "version",
                 "nr", "shape", "tied", "task", "cross_rows", "__weakref__")

    def __init__(self, owner: PerExampleGradNorms, name: str, rule: str, module: Any) -> None:
        self.owner: PerExampleGradNorms | None = owner
        self.name = name
        self.rule = rule
        self.module = module  # an nn.Module, or the ProjectionWeights of an attention slice
        self.x: Tensor | None = None
        self.args: tuple[Any, ...] = ()
        self.kwargs: dict[str, Any] = {}
        self.out: Tensor | None = None
        self.version = 0  # of out when captured (func)
        self.nr = 0  # which output of the node is the module's output
        self.shape: torch.Size | None = None  # reshape the node's gradient to the output's
        self.tied: TiedState | None = None  # the tied weight this Embedding / head uses
        self.task: int | None = None  # the backward it fired in
        self.cross_rows: tuple[int | None, Tensor] | None = None  # (task, R) from the head

    def __call__(self, grad_outputs: tuple[Tensor | None, ...]) -> None:
        grad = grad_outputs[self.nr]
        if self.owner is not None and grad is not None:
            g = grad if self.shape is None else grad.reshape(self.shape)
            self.owner.record_backward(self, g)

    def tensor_hook(self, grad: Tensor) -> None:
        """As a hook on a tensor (an expanded parameter) rather than on a node."""
        self((grad,))

    def drop(self) -> None:
        self.owner = None
        self.x = self.out = None
        self.args, self.kwargs = (), {}
        self.tied = None
        self.cross_rows = None


class TiedState:
    """A tied weight during the context: its Embedding calls whose graphs may still be
    back-propagated, and the ones whose gradient arrived in the current backward."""

    def __init__(self, spec: TiedWeight) -> None:
        self.spec = spec
        self.calls: list[weakref.ref[Capture]] = []
        # (backward task, Embedding call, its indices, its effective output gradient)
        self.fired: list[tuple[int | None, str, Tensor, Tensor]] = []

    def add_call(self, cap: Capture) -> None:
        self.calls = [r for r in self.calls if r() is not None]
        self.calls.append(weakref.ref(cap))


def attach(cap: Capture, out: Tensor) -> Tensor | None:
    """Hook ``cap`` on the autograd node that produced ``out``; maybe return a new output.

    The pre-hook of that node receives ∂loss/∂out even if ``out`` is later modified
    in place (a ReLU(inplace=True) after the layer): the node stays in the graph and
    gets the gradient with respect to the values it produced. A view is different: an
    in-place op on it re-routes the graph around the view's own node. So for a view
    that is a plain reshape of its base (Linear with bias on 3-D input returns one)
    the base's node is hooked; any other view or a leaf is replaced by a clone.
    """
    base = compat.view_base(out)
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


def _nothing(*args: Any, **kwargs: Any) -> None:
    return None


def noop(next_id: int | None = None) -> Any:
    """What a copied :class:`Hook` becomes. Loaded in another process, the copy keeps its
    hook ids in the model's hook dicts: handle ids there then start past the saving
    process's (``next_id``), so that no new hook takes a stale id and its flags (a
    review: a re-tracked loaded model's hook got another's with_kwargs and raised)."""
    compat.hook_ids_past(next_id)
    return _nothing


class NodeCache(dict[int, object]):
    """Parameter id -> its AccumulateGrad node. A copy is empty: torch's nodes cannot be
    copied (a tracker kept as a model's attribute failed to copy with it; a review)."""

    def __deepcopy__(self, memo: dict[int, Any]) -> NodeCache:
        return NodeCache()

    def __reduce__(self) -> tuple[Any, ...]:
        return (NodeCache, ())


class Hook(functools.partial):  # type: ignore[type-arg]
    """A hook bsfind registers on a module. torch copies a module's hooks with it
    (``copy.deepcopy``, an EMA's AveragedModel, ``torch.save`` of the whole model): a
    copy of the hook does nothing, so the copy is not measured (it was, 1.7x slower, for
    good), and copying works whatever the hooks' state holds (it failed on AccumulateGrad
    nodes and weak references after a backward; a trial)."""

    def __deepcopy__(self, memo: dict[int, Any]) -> Any:
        return _nothing

    def __reduce__(self) -> tuple[Any, ...]:
        return (noop, (compat.hook_next_id(),))


def input_label(name: str) -> str:
    """How the check of batch-expanded tensors names module ``name``'s batch-1 input."""
    return (f"the batch-1 input of module {name!r} (e.g. position ids of shape (1, T); pass "
            "it with the batch size if this cannot be fixed)")


@dataclass
class RootCall:
    """One active call of the root module: where its entries of ``_expanded`` start,
    what it was given, the modules whose batch-1 input it expanded, and those it refused
    when its forward raised with them expanded (:meth:`PerExampleGradNorms.unexpand`)."""

    expanded_from: int
    given: list[Tensor]  # its tensor arguments
    inputs: list[str] = field(default_factory=list)
    last: Tensor | None = None  # the last hooked module's output
    refused: list[str] = field(default_factory=list)


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
    drops both. Inputs and outputs keep their values; a module returning an irregular
    view returns a copy of it instead, and a module given a batch-1 input that the
    forward broadcasts returns its output expanded to the batch. The root module's
    first tensor argument gives the batch size.

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
        self._scratch = Scratch()
        self.paths: dict[str, str] = {}  # module -> form used in the last backward
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._captures: list[weakref.ref[Capture]] = []
        # (backward task id, module, (B,) squared norms) since the last sq_norms()
        self._terms: list[tuple[int | None, str, Tensor]] = []
        self._fired: dict[str, int | None] = {}  # module -> task id it fired in
        # backward passes since the last sq_norms() whose numbers a later one replaced;
        # ``replaced``: that count at the last sq_norms() (gradient accumulation that the
        # caller did not say: .grad holds every pass, the norms only the last one's)
        self._replaced = 0
        self.replaced = 0
        self._returned: set[int | None] = set()  # passes of autograd.grad w.r.t. parameters
        self._nodes = NodeCache()  # parameter id -> AccumulateGrad (gradient_reach)
        self._errors: list[str] = []
        self._active = False
        self._recomputing = False
        self._checking = False  # inside crossing_rows' extra backward passes
        self._batch: list[int | None] = []  # the root's batch size, per active root call
        self._last_batch: int | None = None
        self._tied: dict[str, TiedState] = {}  # Embedding / head module -> its tied weight
        self._swapped: dict[str, list[list[tuple[str, Tensor]]]] = {}
        self._modes: dict[str, list[AttentionProjections | None]] = {}
        # batch-expanded tensors of the current forward, checked once for this object
        # (the tracker enters its one on every measured step: the check, two backward
        # passes more, ran on each), and what the check or a guard refused, for good
        self._expanded: list[tuple[str, Tensor]] = []
        self._checked: set[str] = set()
        self._crossing: dict[str, str] = {}  # expanded tensor -> why it is refused
        self._made: set[str] = set()  # of those, module outputs of indices made inside
        # broadcast owners whose forward raised with their parameters expanded -> why
        self._unexpandable: dict[str, str] = {}
        # per active root call: modules whose batch-1 input was expanded in it, and where
        # that call's entries of _expanded start; modules whose expanded input made the
        # root's forward raise -> why (BATCH1_INPUTS, the root's GuardedForward)
        self._root_calls: list[RootCall] = []
        self._no_expand: dict[str, str] = {}
        self._guarded: list[nn.Module] = []  # modules whose forward a GuardedForward runs

    # -- context ---------------------------------------------------------------------
    def __enter__(self) -> PerExampleGradNorms:
        if self._active:
            raise RuntimeError("PerExampleGradNorms is already active")
        modules = dict(self.model.named_modules())
        aliased = {split_qualified(a)[0] for a in self.plan.aliases}
        missing = [name for name in [*self.plan.rules, *aliased] if name not in modules]
        if missing:
            raise ValueError(f"the plan does not match the model: no module {missing[0]!r}")
        add = self._handles.append
        add(self.model.register_forward_pre_hook(Hook(self._on_root_start), with_kwargs=True,
                                                 prepend=True))
        for tied in self.plan.tied:
            state = TiedState(tied)
            for name in [*tied.embeddings, *([tied.head] if tied.head else [])]:
                self._tied[name] = state
        owners: set[str] = set(aliased)
        for name, rule in self.plan.rules.items():
            module = modules[name]
            if rule in PRODUCT_RULES:
                hook = Hook(self._on_forward_product, name, rule)
                add(module.register_forward_hook(hook, with_kwargs=True))
            elif rule == "func":
                hook = Hook(self._on_forward_func, name)
                add(module.register_forward_hook(hook, with_kwargs=True))
            elif rule == "attention":
                start = Hook(self._on_attention_start, name)
                end = Hook(self._on_attention_end, name)
                add(module.register_forward_pre_hook(start))
                add(module.register_forward_hook(end, always_call=True))
            elif rule == "broadcast":
                owners.add(name)
            else:
                hook = Hook(self._on_forward, name, rule)
                add(module.register_forward_hook(hook))
        for name in sorted(owners):
            start = Hook(self._on_owner_start, name)
            end = Hook(self._on_owner_end, name)
            add(modules[name].register_forward_pre_hook(start, with_kwargs=True))
            # first of the end hooks: two sets of hooks on one model put their parameters
            # back last-in-first-out (in install order, the second put back the first's
            # expanded tensor, for good; a review)
            add(modules[name].register_forward_hook(end, always_call=True, prepend=True))
            if self.plan.rules.get(name) == "broadcast":
                GuardedForward.install(modules[name], self, name)
                self._guarded.append(modules[name])
        if any(rule not in ("func", "attention", "broadcast")
               for rule in self.plan.rules.values()):  # a module that may expand its input
            GuardedForward.install(self.model, self, BATCH1_INPUTS)
            self._guarded.append(self.model)
        for name, module in modules.items():
            if compat.is_batchnorm(module):
                check = Hook(self._on_batchnorm, name)
                add(module.register_forward_pre_hook(check))
        # last, so that it sees the root's output as the other hooks leave it
        add(self.model.register_forward_hook(Hook(self._on_root_end), with_kwargs=True,
                                             always_call=True))
        self._active = True
        self._reset()
        return self

    def __exit__(self, *exc: object) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        for module in self._guarded:
            GuardedForward.remove(module, self)
        self._guarded.clear()
        self._scratch.clear()
        for ref in self._captures:
            cap = ref()
            if cap is not None:
                cap.drop()  # a graph still alive keeps only an inert hook
        self._captures = []
        self._tied.clear()
        self._batch.clear()
        self._root_calls.clear()
        self._expanded.clear()
        self._active = False
        self._reset()
        self._errors.clear()

    def _reset(self) -> None:
        self._terms = []
        self._fired = {}
        self._replaced = 0
        self._returned = set()
        for state in self._tied.values():
            state.fired.clear()

    def _hooking(self) -> bool:
        """Whether a forward now should be captured (not our own recomputation or check,
        not inside a torch.func transform)."""
        return not (self._recomputing or self._checking
                    or compat.functorch_transforms_active())

    # -- the root: batch size, and the check of batch-expanded tensors ---------------------
    def _on_root_start(self, module: nn.Module, args: tuple[Any, ...],
                       kwargs: dict[str, Any]) -> None:
        x = first_tensor(args, kwargs)
        batch = int(x.shape[0]) if x is not None and x.dim() > 0 else None
        self._batch.append(batch)
        given = output_tensors([*args, *kwargs.values()])
        self._root_calls.append(RootCall(len(self._expanded), given))
        if batch is not None and self._hooking():
            self._last_batch = batch

    def _on_root_end(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any],
                     output: object) -> None:
        batch = self._batch.pop() if self._batch else None
        call = self._root_calls.pop() if self._root_calls else None
        if not self._batch and self._expanded:
            expanded, self._expanded = self._expanded, []
            if batch is not None and torch.is_grad_enabled() and self._hooking():
                self._check_expanded(expanded, output_tensors(output), batch,
                                     call.last if call is not None else None)

    def interrupted(self, name: str) -> None:
        """The guarded module ``name``'s forward ended by a BaseException that is not an
        Exception (Ctrl-C), after which torch runs no end hook, even ``always_call``: its
        parameters stayed expanded (an owner's), or the root's call stayed open, and the
        check never ran again in that context (a review)."""
        if name == BATCH1_INPUTS:
            call = self._root_calls.pop() if self._root_calls else None
            if self._batch:
                self._batch.pop()
            if call is not None:
                del self._expanded[call.expanded_from:]
            return
        stack = self._swapped.get(name)
        module = dict(self.model.named_modules()).get(name)
        for pname, old in reversed(stack.pop() if stack else []):
            if module is not None:
                compat.swap_parameter(module, pname, old)

    def _check_expanded(self, expanded: list[tuple[str, Tensor]], outputs: list[Tensor],
                        batch: int, fallback: Tensor | None = None) -> set[str]:
        """Once per PerExampleGradNorms and tensor: example i's outputs depend on row i
        alone (a tensor found otherwise is refused on every later forward too). Returns
        the labels found so now. ``fallback``: the last hooked module's output, checked
        against when no output has the batch on dim 0 (a model returning its loss alone:
        the check was skipped, silently; a review)."""
        todo = []
        for label, t in expanded:
            if label in self._crossing:
                self._errors.append(self._crossing[label])
            elif label not in self._checked and t.requires_grad:
                todo.append((label, t))
        outputs = [o for o in outputs if o.requires_grad and o.dim() > 0 and o.shape[0] == batch]
        if not outputs and fallback is not None and fallback.shape[0] == batch:
            outputs = [fallback]
        if not todo or not outputs:  # (nothing to check against: a later forward may have)
            return set()
        self._checked.update(label for label, _ in todo)
        self._checking = True
        try:
            found = crossing_rows(outputs, [t for _, t in todo], batch,
                                  [label in self._made for label, _ in todo])
        except RuntimeError as e:  # e.g. a graph that cannot be walked twice
            found = [None] * len(todo)
            self._uncheckable([label for label, _ in todo if label not in self._made], e)
        finally:
            self._checking = False
        for (label, _), k in zip(todo, found, strict=True):
            if k is not None and label in self._made:
                self._crossing[label] = (
                    f"{label} has the batch's size on dim 0 ({batch}) but its rows are not "
                    f"examples: example {k}'s outputs depend on its other rows (positions "
                    "or buckets made in the forward, e.g. torch.arange(T) with T equal to "
                    "the batch: give a position embedding torch.arange(T)[None], of shape "
                    "(1, T), which is broadcast over the batch)")
                self._errors.append(self._crossing[label])
            elif k is not None:
                self._crossing[label] = (
                    f"{label} is expanded over the batch for per-example norms, but example "
                    f"{k}'s outputs depend on other examples' rows of it: the forward indexes "
                    "it along dim 0 (p[0]), reduces or multiplies across that dim, or "
                    "meets a tensor of more dimensions (a (1,) scale times (B, d)), instead "
                    "of broadcasting it with the batch on dim 0 (x + p, p.expand(B, ...))"
                )
                self._errors.append(self._crossing[label])
        return {label for (label, _), k in zip(todo, found, strict=True) if k is not None}

    def _uncheckable(self, labels: list[str], e: RuntimeError) -> None:
        """The check could not run. An expanded tensor is refused, on every later forward
        too (a context after the first measured it unchecked: a review); indices made in
        the forward are left as they were before that check existed (a model making its
        token ids under activation checkpointing was refused: a review)."""
        if not labels:
            return
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        # (aot_eager and inductor donate the saved tensors to the backward: a trial's
        # compiled ViT measured nothing in a whole run, with only torch's words)
        fix = ("; under torch.compile set torch._functorch.config.donated_buffer = "
               "False before the first compiled forward" if "donated buffer" in str(e) else "")
        why = f"could not check that {labels[0]} is broadcast over the batch: {first}{fix}"
        for label in labels:
            self._crossing[label] = why
        self._errors.append(why)

    def _expand_input(self, name: str, module: nn.Module, x: object,
                      output: object) -> tuple[object, object, bool]:
        """A batch-1 input of a model with a larger batch (position ids (1, T)): run the
        module again on it expanded to the batch. Returns (input, output, expanded).

        Not for a slice of a batch-sized tensor (``x[i:i+1]`` in a loop over examples):
        that module is called once per example, which the backward refuses. A forward
        recomputed during the backward (activation checkpointing) is expanded to the
        batch of the last root forward, as the original was."""
        if self._batch:
            batch, check = self._batch[-1], True
        else:
            batch, check = (self._last_batch if compat.in_backward() else None), False
        if (batch is None or batch == 1 or not isinstance(x, Tensor) or x.dim() == 0
                or x.shape[0] != 1 or not isinstance(output, Tensor)
                or not output.requires_grad):
            return x, output, False
        base = compat.view_base(x)
        if (base is not None and base.dim() == x.dim() and base.shape[0] == batch
                and base.shape[1:] == x.shape[1:]):  # a row of a batch-sized tensor
            return x, output, False
        if name in self._no_expand:  # its expanded output made the forward raise
            self._errors.append(self._no_expand[name])
            return x, output, False
        x = x.expand(batch, *x.shape[1:])
        output = module.forward(x)  # the same values, one row per example
        assert isinstance(output, Tensor)
        if self._root_calls:
            self._root_calls[-1].inputs.append(name)
        if check:  # (a recomputation's graph is checked through the original's)
            self._expanded.append((input_label(name), output))
        return x, output, True

    def _after_capture(self, name: str, x: object, output: object, expanded: bool) -> None:
        """Keep the root call's last hooked output with gradient (the fallback of
        :meth:`_check_expanded`), and watch an input that was not expanded for indices
        made in the forward (:meth:`_watch_made`)."""
        if (self._root_calls and isinstance(output, Tensor) and output.requires_grad
                and output.dim() > 0):
            self._root_calls[-1].last = output
        if not expanded:
            self._watch_made(name, x, output)

    def _watch_made(self, name: str, x: object, output: object) -> None:
        """Indices made in the forward whose dim 0 has the batch's size (nanoGPT's
        ``wpe(torch.arange(T))``, T5's relative position buckets (T, T), with T equal to
        the batch) read as examples, silently: B_simple 31% high in a trial's tracker,
        where the probe's pass at another batch size does not run. Such a module's output
        is checked as the batch-expanded tensors are: example i's outputs must depend on
        its row i alone. (Indices the root was given, or views of them, are the batch.)"""
        if not (self._root_calls and self._batch and isinstance(x, Tensor)
                and isinstance(output, Tensor) and output.requires_grad
                and not (x.is_floating_point() or x.is_complex()) and x.dim() > 0):
            return
        batch = self._batch[-1]
        if batch is None or batch < 2 or x.shape[0] != batch:
            return
        base = compat.view_base(x)
        for t in self._root_calls[-1].given:  # (identity: ids made dynamo compile anew)
            t_base = compat.view_base(t)
            if x is t or (base is not None and base is (t if t_base is None else t_base)):
                return
        label = f"the input of module {name!r}"
        self._made.add(label)
        self._expanded.append((label, output))

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
        if not self._hooking():
            return None
        x = args[0] if args else kwargs.get("input")
        x, output, expanded = self._expand_input(name, module, x, output)
        own = self._capture_product(name, rule, module, x, output)
        self._after_capture(name, x, own if own is not None else output, expanded)
        return own if own is not None or not expanded else output  # type: ignore[return-value]

    def _capture_product(self, name: str, rule: str, module: Any, x: object,
                         output: object) -> Tensor | None:
        if (
            self.fuse
            and isinstance(x, Tensor)
            and isinstance(output, Tensor)
            and output.requires_grad
            and not compat.forward_ad_active()
            and fusable(rule, module, x, self.linear_path)
        ):
            cap = self._new_capture(name, rule, module)
            cap.out = output.detach()
            out: Tensor = FusedProduct.apply(x, module.weight, module.bias, cap)
            return out
        return self._capture(name, rule, module, x, output)

    def _on_forward(
        self, name: str, rule: str, module: nn.Module, args: tuple[Any, ...], output: object
    ) -> Tensor | None:
        if not self._hooking():
            return None
        x = args[0] if args else None
        x, output, expanded = self._expand_input(name, module, x, output)
        own = self._capture(name, rule, module, x, output)
        self._after_capture(name, x, own if own is not None else output, expanded)
        return own if own is not None or not expanded else output  # type: ignore[return-value]

    def _capture(self, name: str, rule: str, module: Any, x: object,
                 output: object) -> Tensor | None:
        if not isinstance(output, Tensor):
            self._not_a_tensor(name, output)
            return None
        if not output.requires_grad:
            return None
        if not isinstance(x, Tensor):
            self._errors.append(f"module {name!r} was called without a tensor input")
            return None
        rank = x.dim()
        if rank < MIN_RANK[rule] or rank > MAX_RANK.get(rule, rank):
            self._errors.append(
                f"module {name!r} got a {rank}-D input; dim 0 must be the batch axis"
            )
            return None
        cap = self._new_capture(name, rule, module)
        cap.x = x.detach()  # autograd saved it too, and refuses a backward if it changes
        if cap.tied is not None and rule == "embedding":
            cap.tied.add_call(cap)
        return attach(cap, output)

    def _new_capture(self, name: str, rule: str, module: Any) -> Capture:
        cap = Capture(self, name, rule, module)
        cap.tied = self._tied.get(name)
        self._captures.append(weakref.ref(cap))
        return cap

    def _on_forward_func(
        self,
        name: str,
        module: nn.Module,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        output: object,
    ) -> Tensor | None:
        if not self._hooking():
            return None
        if not isinstance(output, Tensor):
            self._not_a_tensor(name, output)
            return None
        if not output.requires_grad:
            return None
        cap = self._new_capture(name, "func", module)
        cap.args = args
        cap.kwargs = dict(kwargs)
        own = attach(cap, output)
        out = output if own is None else own
        cap.out = out.detach()
        cap.version = compat.version_counter(out)
        return own

    def _not_a_tensor(self, name: str, output: object) -> None:
        if torch.is_grad_enabled():
            self._errors.append(f"module {name!r} returned {type(output).__name__}, not a tensor")

    def _on_batchnorm(self, name: str, module: nn.Module, args: tuple[Any, ...]) -> None:
        if module.training and torch.is_grad_enabled() and not self._recomputing:
            self._errors.append(
                f"{type(module).__name__} at {name!r} mixes examples in training mode"
            )

    # -- nn.MultiheadAttention -------------------------------------------------------------
    def _on_attention_start(self, name: str, module: nn.Module, args: tuple[Any, ...]) -> None:
        mode = None
        if torch.is_grad_enabled() and self._hooking():
            mode = AttentionProjections(functools.partial(self._project, name),
                                        functools.partial(self._refuse_attention, name))
            mode.__enter__()
        self._modes.setdefault(name, []).append(mode)

    def _on_attention_end(self, name: str, module: nn.Module, args: tuple[Any, ...],
                          output: object) -> None:
        stack = self._modes.get(name)
        mode = stack.pop() if stack else None
        if mode is None:
            return
        mode.__exit__(None, None, None)
        if mode.calls == 0:
            out = output[0] if isinstance(output, tuple) and output else output
            if isinstance(out, Tensor) and out.requires_grad:
                self._refuse_attention(name, "did not call F.multi_head_attention_forward")

    def _refuse_attention(self, name: str, why: str) -> None:
        self._errors.append(f"MultiheadAttention at {name!r} {why}; its per-example norms "
                            "are not covered")

    def _project(self, name: str, label: str, x: Tensor, weight: Tensor,
                 bias: Tensor | None) -> Tensor:
        """One projection of an attention layer, x (B, T, d_in): F.linear, captured."""
        y = F.linear(x, weight, bias)
        if not (weight.requires_grad or (bias is not None and bias.requires_grad)):
            return y  # a frozen projection has no per-example gradient
        own = self._capture_product(f"{name}.{label}", "linear",
                                    ProjectionWeights(weight, bias), x, y)
        return y if own is None else own

    # -- parameters used by a module's own forward (next to its children) -------------------
    def _on_owner_start(self, name: str, module: nn.Module, args: tuple[Any, ...],
                        kwargs: dict[str, Any]) -> None:
        swapped: list[tuple[str, Tensor]] = []
        self._swapped.setdefault(name, []).append(swapped)
        if not (torch.is_grad_enabled() and self._hooking()):
            return
        where = f"{name!r}" if name else "the root"
        prefix = f"{name}." if name else ""
        x = first_tensor(args, kwargs)
        batch = int(x.shape[0]) if x is not None and x.dim() > 0 else None
        for pname, param in module.named_parameters(recurse=False):
            if not param.requires_grad:
                continue
            covered_by = self.plan.aliases.get(prefix + pname)
            if covered_by is not None:  # must stay unused here: a view that reports use
                value = param.view_as(param)
                value.register_hook(functools.partial(self._alias_used, where, pname,
                                                      covered_by))
            elif self.plan.rules.get(name) == "broadcast":
                if name in self._unexpandable:
                    self._errors.append(self._unexpandable[name])
                    continue
                if torch.jit.is_tracing():  # (a failed op caught while tracing segfaults)
                    self._errors.append(f"{where} ran under torch.jit.trace, where its "
                                        f"parameter {pname!r} is not expanded to the batch")
                    continue
                if batch is None:
                    self._errors.append(f"{where} was called without a tensor input, so the "
                                        f"batch size for its parameter {pname!r} is unknown")
                    continue
                value = param.expand(batch, *param.shape[1:])
                cap = self._new_capture(prefix + pname, "broadcast", module)
                value.register_hook(cap.tensor_hook)
                self._expanded.append((f"parameter {pname!r} of {where}", value))
            else:
                continue
            old = compat.swap_parameter(module, pname, value)
            if old is None:
                self._errors.append(f"cannot swap parameter {pname!r} of {where} in this "
                                    "version of torch")
                continue
            swapped.append((pname, old))

    def expanded_in(self, name: str) -> bool:
        """Whether the current call of module ``name`` runs with parameters expanded
        (``BATCH1_INPUTS``: the root's, with a module's batch-1 input expanded)."""
        if name == BATCH1_INPUTS:
            return bool(self._root_calls and self._root_calls[-1].inputs)
        stack = self._swapped.get(name)
        return bool(stack and stack[-1])

    def unexpand(self, name: str, module: nn.Module, exc: BaseException) -> None:
        """Put back the parameters of ``module`` expanded for this call, and refuse them
        (:class:`.broadcast.GuardedForward`: its forward raised with them expanded).
        ``BATCH1_INPUTS``: refuse the modules whose batch-1 input this root call expanded;
        the root's forward runs again without."""
        if name == BATCH1_INPUTS:
            self._refuse_inputs(exc)
            return
        swapped = self._swapped[name][-1]
        where = f"{name!r}" if name else "the root"
        for pname, old in reversed(swapped):
            compat.swap_parameter(module, pname, old)
        labels = {f"parameter {pname!r} of {where}" for pname, _ in swapped}
        self._expanded = [(label, t) for label, t in self._expanded if label not in labels]
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        pname, old = swapped[0]
        self._unexpandable[name] = (
            f"parameter {pname!r} of {where} (shape {tuple(old.shape)}) is not broadcast over "
            f"the batch on its leading dimension of 1: expanded to the batch, the forward "
            f"raised {type(exc).__name__} ({first}); give it the number of dimensions of "
            "the tensor it meets ((1, T, d) for (B, T, d)), or move it into a submodule "
            "without parameterised children (the torch.func fallback handles that)")
        self._errors.append(self._unexpandable[name])
        swapped.clear()

    def crossed(self, name: str, output: object) -> bool:
        """After a forward of the guarded module ``name`` that returned: whether it must
        run again, some of its expanded tensors having been refused now. For the root
        (``BATCH1_INPUTS``), its batch-1 inputs are checked here, not at its end hook: an
        expanded input that the forward reduced over the batch (``wpe(ids).sum(0)``)
        changed the user's loss and gradient on that step, silently (a trial: 4.7136 to
        4.8445), the check refusing it only afterwards. Those refused are not expanded
        in the forward run again, which is the user's own."""
        call = self._root_calls[-1] if self._root_calls else None
        batch = self._batch[-1] if self._batch else None
        if (name != BATCH1_INPUTS or call is None or not call.inputs or batch is None
                or not torch.is_grad_enabled() or not self._hooking()):
            return False
        labels = {input_label(n): n for n in call.inputs}
        todo = [(label, t) for label, t in self._expanded[call.expanded_from:]
                if label in labels]
        found = self._check_expanded(todo, output_tensors(output), batch, call.last)
        refused = [n for label, n in labels.items() if label in found]
        if not refused:
            return False
        for n in refused:  # (their message is in the errors: _check_expanded)
            self._no_expand[n] = self._crossing[input_label(n)]
        del self._expanded[call.expanded_from:]
        call.inputs = []
        return True

    def _refuse_inputs(self, exc: BaseException) -> None:
        """The root's forward raised with batch-1 inputs expanded (T5's relative position
        buckets of a one-token target, (1, T_k): its leading 1 is the query length, and
        the expanded bias broadcast into (B, heads, B, T_k); a trial)."""
        call = self._root_calls[-1]
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        why = (f"the batch-1 input of module {call.inputs[0]!r} is not broadcast over the "
               "batch on its leading dimension of 1: expanded to the batch, the forward "
               f"raised {type(exc).__name__} ({first}); pass it with the batch size where "
               "that 1 stands for the batch (position ids as (B, T)); where it does not, "
               "this model has no per-example rule")
        for n in call.inputs:  # (the rerun's modules say why: _expand_input)
            self._no_expand[n] = why
        call.refused, call.inputs = call.refused + call.inputs, []
        del self._expanded[call.expanded_from:]  # (that attempt's: the forward runs again)

    def withdraw(self, name: str) -> None:
        """Take back :meth:`unexpand`'s refusal: the forward raised unexpanded too."""
        if name == BATCH1_INPUTS:
            call = self._root_calls[-1]
            whys = {self._no_expand.pop(n) for n in call.refused if n in self._no_expand}
            self._errors = [e for e in self._errors if e not in whys]
            call.refused = []
            return
        why = self._unexpandable.pop(name, None)
        if why in self._errors:
            self._errors.remove(why)

    def _on_owner_end(self, name: str, module: nn.Module, args: tuple[Any, ...],
                      output: object) -> None:
        stack = self._swapped.get(name)
        for pname, old in reversed(stack.pop() if stack else []):
            compat.swap_parameter(module, pname, old)
        if not self._batch and self._expanded:  # called outside a root forward
            expanded, self._expanded = self._expanded, []
            x = next(iter(output_tensors(output)), None)
            if x is not None and x.dim() > 0 and torch.is_grad_enabled():
                self._check_expanded(expanded, output_tensors(output), int(x.shape[0]))

    def _alias_used(self, where: str, pname: str, covered_by: str, grad: Tensor) -> None:
        if not self._checking:
            self._errors.append(
                f"{where} uses parameter {pname!r} in its own forward, but it is also the "
                f"parameter of its submodule {covered_by!r}, whose rule covers it; a "
                "parameter used by both is not covered: register it on one module only"
            )

    # -- backward hook ---------------------------------------------------------------
    def record_backward(
        self, cap: Capture, grad: Tensor, x: Tensor | None = None, weight_grad: bool = False
    ) -> Tensor | None:
        """Record ``cap``'s (B,) squared norms; with ``weight_grad`` also return ∇W.

        ``x`` is the module's input where the caller holds it (the fused Function),
        else ``cap.x``. Returns None when no weight gradient was formed (not asked, or
        this call's norms are refused).
        """
        if self._checking:
            return None
        task = compat.current_graph_task_id()
        reach = self._reach_of(cap)
        if reach == "untouched":  # the inputs' gradient (adversarial examples, saliency)
            return None
        if reach == "returns":  # autograd.grad w.r.t. the parameters: .grad may be set from it
            self._returned.add(task)
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
            earlier = {t for t, _, _ in self._terms if t != task}
            self._terms = [(t, n, v) for t, n, v in self._terms if t == task]
            self._fired = {n: t for t, n, _ in self._terms}
            # not accumulation when the earlier pass left .grad alone (autograd.grad w.r.t.
            # the parameters) or zero_grad() cleared it since (a GAN's generator pass, SAM's
            # first, a retried step)
            params = _trained_params(cap)
            if not (earlier <= self._returned or (params and _cleared(params[0]))):
                self._replaced += 1
        self._fired[cap.name] = task
        cap.task = task
        acc = None
        if cap.rule == "func":
            sq = self._func(cap, grad)
            if sq is None:
                return None
        elif cap.rule == "broadcast":  # an expanded (1, ...) parameter: row i is example i's
            g = upcast(grad.detach())
            sq = torch.linalg.vector_norm(g.reshape(g.shape[0], -1), dim=1).square()
            self.paths[cap.name] = "broadcast"
        else:
            x = cap.x if x is None else x
            assert x is not None
            if grad.requires_grad:  # backward(create_graph=True): do not extend the graph
                grad = grad.detach()
            if cap.rule in PRODUCT_RULES:
                weight: Tensor = cap.module.weight
                if weight_grad and weight.requires_grad:  # (not frozen since the forward)
                    acc = upcast(x).new_empty(weight.shape)
                sq, used = PRODUCT_RULES[cap.rule](
                    cap.module, x.detach(), grad, self.linear_path, acc, self._scratch)
            else:
                sq, used = RULES[cap.rule](cap.module, x.detach(), grad, self.linear_path)
            self.paths[cap.name] = f"{cap.rule}-{used}"
            if cap.tied is not None:
                self._tied_cross(cap, x.detach(), grad, task)
        self._terms.append((task, cap.name, sq))
        return acc

    def _reach_of(self, cap: Capture) -> str:
        """:func:`compat.gradient_reach` of the running pass for ``cap``'s parameters,
        module by module (``backward(inputs=...)`` and ``autograd.grad`` reach some
        parameters and not others: a review's once-per-pass lookup read 1.6x). A pass that
        leaves them untouched is not the step's gradient, but when it builds a graph
        (create_graph), the loss's backward reaches them through it unseen: refused; as is
        a pass that reaches part of one layer's (its norms cover them together)."""
        reaches = ({compat.gradient_reach(p, self._nodes) for p in _trained_params(cap)}
                   or {"accumulates"})
        if cap.rule == "func" and len(reaches) > 1:
            # a module read by torch.func may leave a parameter out of its forward (a
            # gate used on a flag), which reads "untouched" as if the pass skipped it
            reaches.discard("untouched")
        if len(reaches) > 1:
            self._errors.append(
                f"module {cap.name!r}: the backward reached some of its parameters and not "
                "others (backward(inputs=...) or autograd.grad over part of them), and "
                "per-example norms cover a layer's parameters together")
            return "untouched"
        reach = reaches.pop()
        if reach == "untouched" and torch.is_grad_enabled():
            self._errors.append(
                f"module {cap.name!r}: a gradient through it was taken with create_graph=True "
                "within the step (a gradient penalty, a physics-informed loss), and the "
                "parameters' gradient through that graph is not seen by per-example hooks")
        return reach

    def _tied_cross(self, cap: Capture, x: Tensor, grad: Tensor, task: int | None) -> None:
        """The cross terms of a tied weight (see :mod:`.tied`) that ``cap`` completes."""
        state = cap.tied
        assert state is not None
        label = f"{state.spec.param} (tied)"
        cross: list[Tensor] = []
        if cap.rule == "embedding":
            idx, d = embedding_delta(cap.module, x, grad)
            if cap.cross_rows is not None and cap.cross_rows[0] == task:
                cross.append(rows_dot(d, cap.cross_rows[1]))
            cap.cross_rows = None
            for t, _, idx2, d2 in state.fired:
                if t == task and idx2.shape[0] == idx.shape[0]:
                    cross.append(embeddings_dot(idx, d, idx2, d2))
            state.fired = [f for f in state.fired if f[0] == task]
            state.fired.append((task, cap.name, idx, d))
        else:  # the head: its gradient rows at each Embedding call's indices
            for ref in state.calls:
                emb = ref()
                if emb is None or emb.x is None or emb.x.shape[0] != x.shape[0]:
                    continue
                if emb.task != task:  # not reached yet in this backward: leave R with it
                    emb.cross_rows = (task, head_rows(x, grad, emb.x))
                else:  # already reached (it ran after the head in the forward)
                    for t, name, idx, d in state.fired:
                        if t == task and name == emb.name:
                            cross.append(rows_dot(d, head_rows(x, grad, idx)))
        for c in cross:
            self._terms.append((task, label, 2.0 * c))

    def _func(self, cap: Capture, grad: Tensor) -> Tensor | None:
        params = {n: p.detach() for n, p in cap.module.named_parameters() if p.requires_grad}
        out = cap.out
        if out is not None and compat.version_counter(out) != cap.version:
            out = None  # modified in place since the forward: nothing to check against
        self._recomputing = True
        try:
            with torch.enable_grad():
                sq = func_sq(cap.module, params, cap.args, cap.kwargs, grad.detach(), out)
        except PerExampleUnsupported as e:
            self._errors.append(f"torch.func fallback for {cap.name!r}: {e.message}")
            return None
        except (RuntimeError, ValueError) as e:  # (vmap's own errors are ValueErrors)
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            self._errors.append(f"torch.func fallback for {cap.name!r} failed: {first}")
            return None
        finally:
            self._recomputing = False
        self.paths[cap.name] = "func"
        return sq.detach()

    # -- result ----------------------------------------------------------------------
    def forget(self) -> None:
        """Drop what the backward passes since the last :meth:`sq_norms` recorded (the
        caller abandoned them: a step given up and started again)."""
        self._errors = []
        self._reset()

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
        self.replaced = self._replaced
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
            raise PerExampleUnsupported(self._batch_mismatch([(n, v.shape[0])
                                                              for _, n, v in terms]))
        dtype = torch.float32 if values[0].device.type == "mps" else torch.float64
        return torch.stack(values).to(dtype).sum(0)

    def _batch_mismatch(self, sizes: list[tuple[str, int]]) -> str:
        """Which module saw a batch size other than the model's, and what to do."""
        counts: dict[int, int] = {}
        for _, s in sizes:
            counts[s] = counts.get(s, 0) + 1
        want = (self._last_batch if self._last_batch in counts
                else max(counts, key=lambda s: counts[s]))
        odd = [(n, s) for n, s in sizes if s != want]
        # the size most modules saw (a trial: Swin's projections saw batch × windows rows,
        # while the message named the one module that saw 1, with advice for that)
        size = max(dict.fromkeys(s for _, s in odd), key=lambda s: sum(t == s for _, t in odd))
        name = next(n for n, s in odd if s == size)
        more = f" (and {len(odd) - 1} more)" if len(odd) > 1 else ""
        if size == 1:
            fix = ("it got a tensor of batch size 1 that the forward broadcasts over the batch "
                   "(position ids of shape (1, T)?); that is expanded automatically only for "
                   "Linear, Embedding, convolution and normalisation layers: pass the tensor "
                   "with the batch size (e.g. position_ids of shape (B, T))")
        else:
            fix = ("dim 0 of every module's input must be the batch axis (a position "
                   "embedding called on torch.arange(T)? give it torch.arange(T)[None], of "
                   "shape (1, T), which is broadcast over the batch; a model that folds "
                   "another axis into dim 0, as window attention does, has no per-example "
                   "rule)")
        return (f"module {name!r} saw a batch of {size} where the model's batch is "
                f"{want}{more}: {fix}")


def checking_batch(batch: int) -> int:
    """A batch size other than ``batch`` for one more per-example pass before the norms are
    trusted. A module's input whose dim 0 is not the batch (nanoGPT's position embedding
    called on ``arange(T)``) is caught only when the two sizes differ: at a probe batch equal
    to T its positions read as examples, and B_simple came out 31% high (a trial)."""
    return 3 if batch == 2 else 2


def split_qualified(qualified: str) -> tuple[str, str]:
    """("module", "param") from "module.param" ("" for the root's own parameter)."""
    module, _, param = qualified.rpartition(".")
    return module, param
