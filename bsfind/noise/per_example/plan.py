"""Which per-example rule each parameterised module of a model gets (no model run).

:func:`plan` inspects a model's modules and decides, per module that owns trainable
parameters, which rule of :mod:`.rules` computes its per-example norms, or the
torch.func fallback (:mod:`.func_fallback`), or why none can.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import nn
from torch.nn.modules.lazy import LazyModuleMixin

from bsfind import torch_compat as compat
from bsfind.errors import UserCodeError

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
        if compat.is_batchnorm(module) and module.training:
            problems.append(f"{type(module).__name__} at {where} mixes examples in training mode")
        if any(p.requires_grad for p in module.parameters(recurse=False)):
            owning.add(name)
    # first descendant that owns trainable parameters, for every ancestor of one
    owning_below: dict[str, str] = {}
    for name in (n for n, _ in modules if n in owning):  # model order, not set order
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
