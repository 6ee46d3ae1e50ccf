"""The hooks and the context manager: :class:`PerExampleGradNorms`.

Forward hooks on every planned module keep what the module's rule needs and put a
pre-hook on the autograd node of the module's output; that pre-hook computes the
module's per-example squared norms during the ordinary backward pass.
"""

from __future__ import annotations

import functools
import weakref
from typing import Any

import torch
from torch import Tensor, nn

from bsfind import torch_compat as compat
from bsfind.noise.per_example.func_fallback import func_sq
from bsfind.noise.per_example.fused import FusedProduct, fusable
from bsfind.noise.per_example.plan import PerExamplePlan, PerExampleUnsupported, plan
from bsfind.noise.per_example.rules import (
    MAX_RANK,
    MIN_RANK,
    PRODUCT_RULES,
    RULES,
    LinearPath,
    Scratch,
    upcast,
)

_plan = plan  # PerExampleGradNorms.__init__ has a parameter named `plan`


# -- the hooks ----------------------------------------------------------------------------




class Capture:
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
            g = grad if self.shape is None else grad.reshape(self.shape)
            self.owner.record_backward(self, g)

    def drop(self) -> None:
        self.owner = None
        self.x = self.out = None
        self.args, self.kwargs = (), {}


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
        self._scratch = Scratch()
        self.paths: dict[str, str] = {}  # module -> form used in the last backward
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._captures: list[weakref.ref[Capture]] = []
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
            if rule in PRODUCT_RULES:
                hook = functools.partial(self._on_forward_product, name, rule)
                self._handles.append(module.register_forward_hook(hook, with_kwargs=True))
            elif rule == "func":
                hook = functools.partial(self._on_forward_func, name)
                self._handles.append(module.register_forward_hook(hook, with_kwargs=True))
            else:
                hook = functools.partial(self._on_forward, name, rule)
                self._handles.append(module.register_forward_hook(hook))
        for name, module in modules.items():
            if compat.is_batchnorm(module):
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
            and not compat.functorch_transforms_active()
            and not compat.forward_ad_active()
            and fusable(rule, module, x, self.linear_path)
        ):
            cap = Capture(self, name, rule, module)
            cap.out = output.detach()
            self._captures.append(weakref.ref(cap))
            out: Tensor = FusedProduct.apply(x, module.weight, module.bias, cap)
            return out
        return self._on_forward(name, rule, module, (x,) if x is not None else (), output)

    def _on_forward(
        self, name: str, rule: str, module: nn.Module, args: tuple[Any, ...], output: object
    ) -> Tensor | None:
        if self._recomputing or compat.functorch_transforms_active():
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
        if rank < MIN_RANK[rule] or rank > MAX_RANK.get(rule, rank):
            self._errors.append(
                f"module {name!r} got a {rank}-D input; dim 0 must be the batch axis"
            )
            return None
        cap = Capture(self, name, rule, module)
        cap.x = x.detach()  # autograd saved it too, and refuses a backward if it changes
        self._captures.append(weakref.ref(cap))
        return attach(cap, output)

    def _on_forward_func(
        self,
        name: str,
        module: nn.Module,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        output: object,
    ) -> Tensor | None:
        if self._recomputing or compat.functorch_transforms_active():
            return None
        if not isinstance(output, Tensor):
            self._not_a_tensor(name, output)
            return None
        if not output.requires_grad:
            return None
        cap = Capture(self, name, "func", module)
        cap.args = args
        cap.kwargs = dict(kwargs)
        self._captures.append(weakref.ref(cap))
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

    # -- backward hook ---------------------------------------------------------------
    def record_backward(
        self, cap: Capture, grad: Tensor, x: Tensor | None = None, weight_grad: bool = False
    ) -> Tensor | None:
        """Record ``cap``'s (B,) squared norms; with ``weight_grad`` also return ∇W.

        ``x`` is the module's input where the caller holds it (the fused Function),
        else ``cap.x``. Returns None when no weight gradient was formed (not asked, or
        this call's norms are refused).
        """
        task = compat.current_graph_task_id()
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
            if cap.rule in PRODUCT_RULES:
                weight: Tensor = cap.module.weight  # type: ignore[assignment]
                if weight_grad and weight.requires_grad:  # (not frozen since the forward)
                    acc = upcast(x).new_empty(weight.shape)
                sq, used = PRODUCT_RULES[cap.rule](
                    cap.module, x.detach(), grad, self.linear_path, acc, self._scratch)
            else:
                sq, used = RULES[cap.rule](cap.module, x.detach(), grad, self.linear_path)
            self.paths[cap.name] = f"{cap.rule}-{used}"
        self._terms.append((task, cap.name, sq))
        return acc

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
