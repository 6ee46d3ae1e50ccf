"""Which per-example rule each parameterised module of a model gets (no model run).

:func:`plan` inspects a model's modules and decides, per module that owns trainable
parameters, which rule of :mod:`.rules` computes its per-example norms, or the
torch.func fallback (:mod:`.func_fallback`), or why none can. Modules are visited in
model order (``named_modules()``), so the first obstacle named is the same on every run.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor, nn
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
class TiedWeight:
    """One weight shared by Embedding layers and at most one Linear head (tied input and
    output embeddings: GPT-2's ``wte``/``lm_head``, BERT's MLM decoder, T5).

    Attributes:
        param: the weight's qualified name at its first use, e.g. "transformer.wte.weight".
        embeddings: the Embedding modules that use it, in model order.
        head: the Linear module that uses it as its weight, or None.
    """

    param: str
    embeddings: tuple[str, ...]
    head: str | None


@dataclass(frozen=True)
class PerExamplePlan:
    """What :func:`plan` found: whether every trainable parameter has a per-example rule.

    Attributes:
        ok: True if every trainable parameter is covered by a rule or by the torch.func
            fallback.
        reason: one line saying why (or why not).
        rules: module qualified name -> rule name ("linear", "transposed_linear" (a
            Linear with weight (in, out): transformers' Conv1D), "conv1d", "conv2d",
            "embedding", "layernorm", "groupnorm", "rmsnorm", "attention"
            (nn.MultiheadAttention, its out_proj included), "broadcast" (parameters of
            shape (1, ...) used by a module that also has parameterised children),
            "func"). For "linear" the direct or Gram form is chosen per call from the
            input shape.
        tied: weights shared by Embedding layers and a Linear head; their modules also
            have their own rules above, and the cross terms are added.
        aliases: "module.param" -> the module whose rule covers it, for a parameter
            registered both on a module and on one of its descendants (transformers'
            BERT registers the MLM decoder's bias on the prediction head too). The
            ancestor must not use it itself; that is checked at run time.
    """

    ok: bool
    reason: str
    rules: dict[str, str] = field(default_factory=dict)
    tied: tuple[TiedWeight, ...] = ()
    aliases: dict[str, str] = field(default_factory=dict)


# -- planning -----------------------------------------------------------------------------


def _uses_forward_of(module: nn.Module, cls: type[nn.Module]) -> bool:
    # A subclass that overrides forward (LoRA, quantised, ...) computes something else, as
    # does an instance whose forward was replaced.
    return (isinstance(module, cls) and type(module).forward is cls.forward
            and "forward" not in vars(module))


def is_transposed_linear(module: nn.Module) -> bool:
    """transformers' ``Conv1D`` (GPT-2, GPT): ``x @ weight + bias`` with weight (in, out).

    Recognised by class name and module, its ``nf`` attribute and shapes, and an
    unchanged forward, so that bsfind never imports transformers.
    """
    base: Any = next((c for c in type(module).__mro__ if c.__name__ == "Conv1D"
                      and c.__module__.startswith("transformers.")), None)
    if base is None or type(module).forward is not base.forward or "forward" in vars(module):
        return False
    weight, bias = getattr(module, "weight", None), getattr(module, "bias", None)
    return (isinstance(weight, Tensor) and weight.dim() == 2
            and getattr(module, "nf", None) == weight.shape[1]
            and (bias is None or (isinstance(bias, Tensor) and bias.shape == weight.shape[1:])))


def _rule_for(module: nn.Module, trainable: list[str]) -> str:
    """The rule name for a leaf module that owns the trainable parameters ``trainable``."""
    if not set(trainable) <= {"weight", "bias"}:
        return "func"  # e.g. the old weight_norm: weight_g/weight_v, weight computed
    if _uses_forward_of(module, nn.Linear):
        return "linear"
    if is_transposed_linear(module):
        return "transposed_linear"
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


def _attention_problem(attn: Any) -> str | None:
    """Why an nn.MultiheadAttention is not covered (None if it is)."""
    if not attn.batch_first:
        return ("has batch_first=False: dim 0 of its input is the sequence, not the batch; "
                "build it (or the nn.TransformerEncoderLayer / nn.TransformerDecoderLayer / "
                "nn.Transformer that creates it) with batch_first=True")
    if attn.bias_k is not None:
        return ("has add_bias_kv=True (parameters 'bias_k', 'bias_v'), which the per-example "
                "rule does not cover; build it with add_bias_kv=False")
    if attn.add_zero_attn:
        return ("has add_zero_attn=True, which the per-example rule does not cover; build it "
                "with add_zero_attn=False")
    return None


def _is_ancestor(a: str, b: str) -> bool:
    """Whether module ``a`` contains module ``b`` (qualified names, "" the root)."""
    return a != b and (a == "" or b.startswith(a + "."))


def _where(name: str) -> str:
    return f"'{name}'" if name else "the root"


def _qualified(module: str, param: str) -> str:
    return f"{module}.{param}" if module else param


def plan(model: nn.Module) -> PerExamplePlan:
    """Inspect ``model`` (without running it) for per-example gradient rules.

    A module that owns trainable parameters gets a rule by type, or the torch.func
    fallback ("func") when it has none. A module with parameters of its own and
    parameter-free children (a custom activation holding a learned scale) is handled
    by the fallback as a whole. A module with parameterised children may own parameters
    of shape (1, ...) that its forward broadcasts over the batch (a ViT's cls_token and
    pos_embed): rule "broadcast". Embedding layers and one Linear head may share their
    weight (tied embeddings). Not ok: BatchNorm in training mode, any other parameter on
    a module whose children own trainable parameters, any other sharing of a parameter,
    an nn.MultiheadAttention with batch_first=False, add_bias_kv or add_zero_attn, a
    module the fallback cannot run.

    Args:
        model: the model as it will be trained (its train/eval mode matters).

    Returns:
        The plan; ``reason`` is one line naming the first obstacle in model order and how
        many more.
    """
    return _Planner(model).result()


class _Planner:
    """The walk behind :func:`plan`: problems are kept with their module's position, so
    the reason names the first obstacle in model order."""

    def __init__(self, model: nn.Module) -> None:
        self.modules = list(model.named_modules())
        self.by_name = dict(self.modules)
        self.order = {name: i for i, (name, _) in enumerate(self.modules)}
        self.problems: list[tuple[int, str]] = []
        self.owned: dict[str, list[str]] = {}  # module -> its own trainable parameters
        for name, module in self.modules:
            if compat.is_batchnorm(module) and module.training:
                self.problems.append((self.order[name], f"{type(module).__name__} at "
                                      f"{_where(name)} mixes examples in training mode"))
            if compat.is_parametrized(module) and any(p.requires_grad
                                                      for p in module.parameters()):
                kind = type(module).__name__.removeprefix("Parametrized")
                self.problems.append((self.order[name], (
                    f"{kind} at {_where(name)} is parametrized ("
                    f"{', '.join(repr(k) for k in module.parametrizations)} computed by "
                    "torch.nn.utils.parametrize: weight_norm, spectral_norm, orthogonal), so "
                    "its layer's per-example gradient is not that of the parameters trained "
                    "(the old hook-based torch.nn.utils.weight_norm is covered)")))
            trainable = [n for n, p in module.named_parameters(recurse=False) if p.requires_grad]
            if trainable:
                self.owned[name] = trainable
        self.attention = [n for n, m in self.modules
                          if _uses_forward_of(m, nn.MultiheadAttention)]
        # first descendant that owns trainable parameters, for every ancestor of one
        self.owning_below: dict[str, str] = {}
        for name in self.owned:  # model order
            parts = name.split(".") if name else []
            for depth in range(len(parts)):
                self.owning_below.setdefault(".".join(parts[:depth]), name)
        self.aliases: dict[str, str] = {}
        self.tied: list[TiedWeight] = []
        self.rules: dict[str, str] = {}
        self._sharing()
        for name, module in self.modules:
            self._module(name, module)

    def in_attention(self, name: str) -> str | None:
        return next((a for a in self.attention if a == name or _is_ancestor(a, name)), None)

    def _sharing(self) -> None:
        """Parameters registered on more than one module: aliases, tied weights, refusals."""
        uses: dict[int, list[tuple[str, str]]] = {}
        for name, pnames in self.owned.items():
            for pname in pnames:
                uses.setdefault(id(getattr(self.by_name[name], pname)), []).append(
                    (name, pname))
        for group in uses.values():
            if len(group) < 2:
                continue
            # a registration on an ancestor of another user is an alias of the descendant's
            users = [(m, p) for m, p in group if not any(_is_ancestor(m, o) for o, _ in group)]
            for m, p in group:
                if (m, p) not in users:
                    self.aliases[_qualified(m, p)] = next(o for o, _ in users
                                                          if _is_ancestor(m, o))
            if len(users) < 2:
                continue
            problem = _sharing_problem(self.by_name, users, self.in_attention)
            if problem is None:
                embeddings = tuple(m for m, _ in users
                                   if _uses_forward_of(self.by_name[m], nn.Embedding))
                head = next((m for m, _ in users if m not in embeddings), None)
                self.tied.append(TiedWeight(_qualified(*users[0]), embeddings, head))
            else:
                self.problems.append((self.order[users[0][0]], problem))

    def _module(self, name: str, module: nn.Module) -> None:
        """The rule of one module (or a problem)."""
        attn = self.in_attention(name)
        if attn is not None:
            if attn == name and any(p.requires_grad for p in module.parameters()):
                why = _attention_problem(module)
                if why is None:
                    self.rules[name] = "attention"
                else:
                    first = next(n for n, p in module.named_parameters() if p.requires_grad)
                    self.problems.append((self.order[name], f"MultiheadAttention at "
                                          f"{_where(name)} (parameter {first!r}) {why}"))
            return
        own = [p for p in self.owned.get(name, []) if _qualified(name, p) not in self.aliases]
        if not own:
            return
        where = _where(name)
        if name in self.owning_below:
            wide = [p for p in own if getattr(module, p).dim() == 0
                    or getattr(module, p).shape[0] != 1]
            if not wide:
                self.rules[name] = "broadcast"
                return
            shape = tuple(getattr(module, wide[0]).shape)
            self.problems.append((self.order[name], (
                f"{type(module).__name__} at {where} owns parameter {wide[0]!r} of shape "
                f"{shape} and has children with parameters ({self.owning_below[name]!r}); a "
                "parameter used by such a module's own forward is covered only if it has "
                "a leading dimension of 1 broadcast over the batch (like a ViT's "
                "cls_token of shape (1, 1, d)): give it that shape, or move it into a "
                "submodule without parameterised children (the torch.func fallback "
                "handles that)")))
            return
        lazy: Any = module
        if isinstance(module, LazyModuleMixin) and lazy.has_uninitialized_params():
            self.problems.append((self.order[name], (
                f"{type(module).__name__} at {where} has uninitialised (lazy) parameter "
                f"{own[0]!r}; run one batch through the model first")))
            return
        is_leaf = next(iter(module.children()), None) is None
        rule = _rule_for(module, own) if is_leaf else "func"
        why = _func_infeasible(module) if rule == "func" else None
        if why is not None:
            self.problems.append((self.order[name], (
                f"{type(module).__name__} at {where} (parameter {own[0]!r}) {why}, "
                "which the torch.func fallback cannot differentiate")))
            return
        self.rules[name] = rule

    def result(self) -> PerExamplePlan:
        rules, tied, aliases = self.rules, tuple(self.tied), self.aliases
        if self.problems:
            problems = sorted(self.problems, key=lambda p: p[0])  # stable: model order
            more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
            return PerExamplePlan(False, problems[0][1] + more, rules, tied, aliases)
        if not rules:
            return PerExamplePlan(False, "the model has no trainable parameters", rules)
        n_func = sum(r == "func" for r in rules.values())
        reason = f"all {len(rules)} parameterised modules have per-example rules"
        if n_func:
            first = next(n for n, r in rules.items() if r == "func")
            reason += f" ({n_func} through the torch.func fallback, e.g. {first!r})"
        for tw in tied:
            sharing = [*tw.embeddings, *([tw.head] if tw.head else [])]
            reason += f"; {tw.param!r} tied across " + ", ".join(repr(u) for u in sharing)
        return PerExamplePlan(True, reason, rules, tied, aliases)


def _sharing_problem(
    modules: dict[str, nn.Module],
    users: list[tuple[str, str]],
    in_attention: Callable[[str], str | None],
) -> str | None:
    """Why a parameter used by the modules ``users`` (module, parameter name) is not
    covered; None for Embedding layers that share their weight with at most one Linear."""
    covered = (
        all(p == "weight" and in_attention(m) is None for m, p in users)
        and sum(_uses_forward_of(modules[m], nn.Linear) for m, _ in users) <= 1
        and all(_uses_forward_of(modules[m], nn.Embedding)
                or _uses_forward_of(modules[m], nn.Linear) for m, _ in users)
        and any(_uses_forward_of(modules[m], nn.Embedding) for m, _ in users)
    )
    if covered:
        return None
    (a, pa), (b, pb) = users[0], users[1]
    more = f" and {len(users) - 2} more" if len(users) > 2 else ""
    return (
        f"parameter {_qualified(a, pa)!r} is shared by {_where(a)} "
        f"({type(modules[a]).__name__}) and {_where(b)} ({type(modules[b]).__name__}, as "
        f"{pb!r}){more}: the per-example norm of a shared parameter needs the cross terms "
        "between its uses, implemented only for Embedding layers tied to one Linear head "
        "(input/output embeddings); untie it (give each module its own copy)"
    )
