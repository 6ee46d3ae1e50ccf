"""The YAML spec: the public contract between a user's training job and bsfind.

``load_spec(path, overrides)`` reads YAML with ``yaml.safe_load``, applies
``key.path=value`` overrides (values parsed as YAML), and validates the whole
document against ``SCHEMA``: unknown keys, wrong types and out-of-range values
are all collected and raised together in one ``SpecError`` whose problems read
``dotted.path: message``. Each field is documented once, in ``SCHEMA``;
``starter_spec()`` renders the commented example that ``bsfind init`` writes.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from bsfind.errors import SpecError

# --------------------------------------------------------------------------- schema


@dataclass(frozen=True)
class Field:
    """One spec key: its type, default and the one place it is documented."""

    kind: str  # "str" | "int" | "float" | "bool" | "mapping" | "int_list" | "choice"
    #          | "checkpoint_list"
    doc: str
    default: Any = None
    required: bool = False
    nullable: bool = False
    choices: tuple[str, ...] = ()
    check: Callable[[Any], str | None] | None = None  # returns a problem or None
    example: Any = None  # shown by `bsfind init` instead of the default


def _positive(v: Any) -> str | None:
    return None if v > 0 else f"must be > 0, got {v}"


def _non_negative(v: Any) -> str | None:
    return None if v >= 0 else f"must be >= 0, got {v}"


def _known_gpu(v: Any) -> str | None:
    """A GPU name the table knows (checked at load: before a run, not after)."""
    from bsfind.hardware.gpus import get_gpu  # torch: only when a spec names a GPU

    try:
        get_gpu(v)
    except KeyError as exc:
        return str(exc.args[0])
    return None


def _fraction(v: Any) -> str | None:
    return None if 0 < v < 1 else f"must be between 0 and 1 (exclusive), got {v}"


def _fraction_incl(v: Any) -> str | None:
    return None if 0 < v <= 1 else f"must be in (0, 1], got {v}"


def _factory(v: Any) -> str | None:
    if ":" not in v or v.startswith(":") or v.endswith(":"):
        return f"expected 'module:attr' or 'path/to/file.py:attr', got {v!r}"
    return None


def _device(v: Any) -> str | None:
    if v in ("auto", "cpu", "cuda") or (v.startswith("cuda:") and v[5:].isdigit()):
        return None
    return f"expected auto, cpu, cuda or cuda:N, got {v!r}"


def _steps(v: Any) -> str | None:
    if any(s < 0 for s in v):
        return f"steps must be >= 0, got {v}"
    if list(v) != sorted(set(v)):
        return f"steps must be increasing and distinct, got {v}"
    return None


SCHEMA: dict[str, dict[str, Field]] = {
    "model": {
        "factory": Field(
            "str",
            '"module:attr" or "path/to/file.py:attr" (relative to the spec file) '
            "returning an nn.Module",
            required=True,
            check=_factory,
            example="bsfind.models:mlp",
        ),
        "kwargs": Field(
            "mapping", "passed to the factory; checked against its signature first", {},
            example={"hidden": 128},
        ),
        "checkpoint": Field(
            "str", "optional state_dict file (relative to the spec: .pt, .safetensors, or a "
            "save_pretrained folder) loaded after construction",
            nullable=True,
        ),
        "checkpoints": Field(
            "checkpoint_list",
            "measure at each of a run's checkpoints, no training: a list of {path, step} or "
            "{path, examples} (paths relative to the spec)",
            nullable=True,
            example=None,
        ),
    },
    "data": {
        "factory": Field(
            "str",
            "returns a map-style torch Dataset of (input, target) pairs, or of dicts with "
            "the target under 'labels' or 'label' (the rest: the model's keyword inputs)",
            required=True,
            check=_factory,
            example="bsfind.data:digits",
        ),
        "kwargs": Field("mapping", "passed to the data factory", {}),
        "collate": Field(
            "str",
            'optional "module:attr" / "file.py:attr": a function of a list of items '
            "returning the batch, an (inputs, targets) pair or a dict with 'labels' (to pad "
            "items of different lengths, or tokenize text)",
            nullable=True, check=_factory,
        ),
    },
    "loss": {
        "": Field(
            "str",
            'cross_entropy | mse | model (the model\'s own loss: called with labels=targets, '
            'it returns .loss, as Hugging Face models do) | "module:attr" / "file.py:attr": '
            "fn(outputs, targets) -> mean loss",
            "cross_entropy",
        ),
    },
    "optimizer": {
        "name": Field(
            "str", 'sgd | adam | adamw | rmsprop | "module:attr" (an Optimizer class)', "adam"
        ),
        "lr": Field("float", "the learning rate used today ...", required=True, check=_positive,
                    example=1.0e-3),
        "batch_size": Field("int", "... at the batch size used today: the baseline",
                            required=True, check=_positive, example=64),
        "kwargs": Field("mapping", "extra optimizer arguments (momentum, weight_decay, ...)", {}),
        "lr_rule": Field(
            "choice", "how the learning rate scales with the batch: auto picks by optimizer family",
            "auto", choices=("auto", "linear", "sqrt", "none"),
        ),
    },
    "probe": {
        "seed": Field("int", "seeds weights (unless a checkpoint is given) and batch sampling", 0),
        "warmup_steps": Field(
            "int", "optimizer steps at baseline batch/lr before measuring; 0 = weights as loaded",
            0, check=_non_negative,
        ),
        "at_steps": Field(
            "int_list", "measure at several points of one short run, e.g. [0, 200, 1000]",
            nullable=True, check=_steps,
        ),
        "max_seconds": Field("float", "wall-clock budget of the whole probe", 60.0,
                             check=_positive),
        "target_rel_error": Field(
            "float", "stop once the 95% CI half-width of B_simple is within this fraction of it",
            0.1, check=_fraction,
        ),
        "method": Field(
            "choice", "auto picks the cheapest exact method: per-example norms when every layer "
            "has a rule, else micro-batches", "auto",
            choices=("auto", "per-example", "microbatch"),
        ),
        "microbatch_size": Field(
            "int", "examples per micro-batch in the micro-batch form (default: baseline/8)",
            nullable=True, check=_positive,
        ),
        "curvature": Field("bool", "also measure B_noise = tr(HΣ)/(GᵀHG) with Hessian-vector "
                           "products (slower)", False),
        "timing": Field("bool", "time optimizer steps at a ladder of batch sizes", True),
        "branches": Field(
            "bool", "recommend also measures the critical batch directly: short branched runs "
            "at 1, 2, 4, ... x the baseline batch from the probe point (at most 960 baseline "
            "batches of examples; `bsfind branch` runs them alone)", False),
        "lr_branches": Field(
            "bool", "recommend measures the learning rate at the recommended batch: short "
            "runs from the probe run's start at 1/4-4x the rule's learning rate (32 steps, "
            "then 16 decaying to 0; 2 data orders), the lowest loss wins", True),
    },
    "hardware": {
        "device": Field("str", "auto | cpu | cuda | cuda:N", "auto", check=_device),
        "gpus": Field("int", "data-parallel devices the training job will use", 1,
                      check=_positive),
        "gpu": Field("str", "plan for a GPU that is not present, e.g. h100-80gb (predicted)",
                     nullable=True, check=_known_gpu),
        "precision": Field("choice", "training precision", "fp32",
                           choices=("fp32", "bf16", "fp16")),
        "price_per_hour": Field("float", "price of one device-hour (else the GPU table's)",
                                nullable=True, check=_non_negative),
        "memory_fraction": Field("float", "share of device memory a batch may use", 0.9,
                                 check=_fraction_incl),
        "interconnect": Field("str", "link between devices for the predicted sync cost",
                              "nvlink"),
    },
    "training": {
        "examples": Field("int", "examples the training job will process (for absolute "
                          "hours and cost)", nullable=True, check=_positive),
        "epochs": Field("float", "or: epochs over the dataset", nullable=True, check=_positive),
    },
}

# Sections that must be present (the rest have defaults for every key).
REQUIRED_SECTIONS = ("model", "data", "optimizer")

# --------------------------------------------------------------------------- typed spec


@dataclass(frozen=True)
class CheckpointSpec:
    """One entry of ``model.checkpoints``: a state_dict and where in training it was saved."""

    path: str
    step: int | None = None
    examples: int | None = None

    def examples_at(self, batch: int) -> int:
        """The examples seen when it was saved (``examples``, or ``step`` × ``batch``)."""
        return self.examples if self.examples is not None else (self.step or 0) * batch


@dataclass(frozen=True)
class ModelSpec:
    factory: str
    kwargs: dict[str, Any]
    checkpoint: str | None
    checkpoints: tuple[CheckpointSpec, ...] | None = None


@dataclass(frozen=True)
class DataSpec:
    factory: str
    kwargs: dict[str, Any]
    collate: str | None = None


@dataclass(frozen=True)
class OptimizerSpec:
    name: str
    lr: float
    batch_size: int
    kwargs: dict[str, Any]
    lr_rule: str


@dataclass(frozen=True)
class ProbeSpec:
    seed: int
    warmup_steps: int
    at_steps: tuple[int, ...] | None
    max_seconds: float
    target_rel_error: float
    method: str
    microbatch_size: int | None
    curvature: bool
    timing: bool
    branches: bool = False
    lr_branches: bool = True


@dataclass(frozen=True)
class HardwareSpec:
    device: str
    gpus: int
    gpu: str | None
    precision: str
    price_per_hour: float | None
    memory_fraction: float
    interconnect: str


@dataclass(frozen=True)
class TrainingSpec:
    examples: int | None
    epochs: float | None


@dataclass(frozen=True)
class Spec:
    """A validated spec. ``document`` is the full mapping with defaults filled
    (what the JSON report echoes and the cache key hashes); ``base_dir`` is
    where relative paths are resolved (the spec file's folder)."""

    model: ModelSpec
    data: DataSpec
    loss: str
    optimizer: OptimizerSpec
    probe: ProbeSpec
    hardware: HardwareSpec
    training: TrainingSpec
    base_dir: Path
    document: dict[str, Any] = field(repr=False, compare=False)
    source: str = "spec"

    def probe_steps(self) -> tuple[int, ...]:
        """Training steps at which the noise scale is measured (when pinned)."""
        if self.probe.at_steps:
            return self.probe.at_steps
        return (self.probe.warmup_steps,)

    @property
    def probe_mode(self) -> str:
        """Where the noise scale is measured.

        "checkpoints": at each of ``model.checkpoints``; "pinned": at
        ``probe.at_steps``, after ``probe.warmup_steps``, or at the weights of
        ``model.checkpoint``; "along": the default, along a short run of
        training at the baseline batch and learning rate.
        """
        if self.model.checkpoints:
            return "checkpoints"
        if self.probe.at_steps or self.probe.warmup_steps or self.model.checkpoint:
            return "pinned"
        return "along"

    def planned_examples(self, dataset_size: int) -> int | None:
        """``training.examples``, or ``training.epochs`` × the dataset; None if neither."""
        if self.training.examples is not None:
            return self.training.examples
        if self.training.epochs is not None:
            return int(round(self.training.epochs * dataset_size))
        return None


# --------------------------------------------------------------------------- parsing

_MISSING = object()


def _type_name(v: Any) -> str:
    if v is None:
        return "null"
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string",
            list: "a list", dict: "a mapping"}.get(type(v), type(v).__name__)


def _coerce(f: Field, value: Any, path: str, problems: list[str]) -> Any:
    """Return the value converted to the field's kind, or _MISSING after a problem."""
    if value is None:
        if f.nullable:
            return None
        if f.kind == "mapping":
            return {}
        problems.append(f"{path}: expected {_expected(f)}, got null")
        return _MISSING
    out: Any = _MISSING
    if f.kind == "str" or f.kind == "choice":
        if isinstance(value, str):
            out = value
        if f.kind == "choice" and isinstance(value, str) and value not in f.choices:
            problems.append(f"{path}: expected one of {', '.join(f.choices)}, got {value!r}")
            return _MISSING
    elif f.kind == "int":
        if isinstance(value, int) and not isinstance(value, bool):
            out = value
        elif isinstance(value, float) and value.is_integer():
            out = int(value)
        if isinstance(out, int) and not -2**63 <= out < 2**63:  # torch takes 64 bits
            problems.append(f"{path}: must fit in 64 bits, got {out}")
            return _MISSING
    elif f.kind == "float":
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            out = float(value)
        elif isinstance(value, str):
            # YAML 1.1 reads `1e-3` (no dot) as a string; accept numeric strings.
            try:
                out = float(value)
            except ValueError:
                out = _MISSING
        if out is not _MISSING and not math.isfinite(out):
            problems.append(f"{path}: expected a finite number, got {value!r}")
            return _MISSING
    elif f.kind == "bool":
        if isinstance(value, bool):
            out = value
    elif f.kind == "mapping":
        if isinstance(value, Mapping) and all(isinstance(k, str) for k in value):
            out = dict(value)
    elif f.kind == "int_list":
        if isinstance(value, (list, tuple)) and all(
            isinstance(v, int) and not isinstance(v, bool) for v in value
        ):
            out = tuple(value)
    elif f.kind == "checkpoint_list":
        return _checkpoints(value, path, problems)
    if out is _MISSING:
        problems.append(f"{path}: expected {_expected(f)}, got {_type_name(value)} {value!r}")
        return _MISSING
    if f.check is not None:
        problem = f.check(out)
        if problem:
            problems.append(f"{path}: {problem}")
            return _MISSING
    return out


def _mixed_checkpoint_order(checkpoints: Any, batch_size: Any) -> list[str]:
    """``model.checkpoints`` given in examples (alone or mixed with steps): in training
    order without repeats once examples count as the nearest step of
    ``optimizer.batch_size``, as the points are placed (steps alone are checked with the
    list)."""
    if not isinstance(checkpoints, tuple) or not isinstance(batch_size, int) or batch_size < 1:
        return []
    if all(c.step is not None for c in checkpoints):
        return []
    # as the points are placed: examples at the nearest step (trajectory)
    order = [c.step if c.step is not None else round(c.examples / batch_size)
             for c in checkpoints]
    if order != sorted(set(order)):
        return ["model.checkpoints: checkpoints must be in training order, without repeats "
                f"(examples count in steps of optimizer.batch_size = {batch_size}: "
                + ", ".join(f"{v:g}" for v in order) + ")"]
    return []


def _checkpoints(value: Any, path: str, problems: list[str]) -> Any:
    """``model.checkpoints``: a non-empty list of {path, step} / {path, examples}."""
    if not isinstance(value, (list, tuple)) or not value:
        problems.append(f"{path}: expected a non-empty list of {{path, step}} or "
                        f"{{path, examples}} mappings, got {_type_name(value)} {value!r}")
        return _MISSING
    out: list[CheckpointSpec] = []
    before = len(problems)
    for i, item in enumerate(value):
        where = f"{path}[{i}]"
        if not isinstance(item, Mapping):
            problems.append(f"{where}: expected a mapping with path and step (or examples), "
                            f"got {_type_name(item)} {item!r}")
            continue
        unknown = sorted(set(item) - {"path", "step", "examples"})
        if unknown:
            problems.append(f"{where}.{unknown[0]}: unknown key (expected path, step, examples)")
        if not isinstance(item.get("path"), str) or not item.get("path"):
            problems.append(f"{where}.path: expected a file path (relative to the spec)")
        counts = [k for k in ("step", "examples") if item.get(k) is not None]
        if len(counts) != 1:
            problems.append(f"{where}: give exactly one of step or examples")
        for k in counts:
            v = item[k]
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                problems.append(f"{where}.{k}: expected an integer >= 0, got {v!r}")
        if len(problems) == before:
            out.append(CheckpointSpec(item["path"], item.get("step"), item.get("examples")))
    if len(problems) > before:
        return _MISSING
    order = [c.step if c.step is not None else c.examples for c in out]
    kinds = {c.step is None for c in out}
    if len(kinds) == 1 and order != sorted(set(order)):  # type: ignore[type-var]
        problems.append(f"{path}: checkpoints must be in training order, without repeats")
        return _MISSING
    return tuple(out)


def _expected(f: Field) -> str:
    return {
        "str": "a string", "choice": "one of " + ", ".join(f.choices), "int": "an integer",
        "float": "a number", "bool": "true or false", "mapping": "a mapping",
        "int_list": "a list of integers",
    }[f.kind] + (" or null" if f.nullable else "")


def _near(word: str, choices: Iterable[str]) -> str | None:
    """The closest of ``choices`` to a misspelt ``word`` (difflib), if any is close."""
    import difflib

    found = difflib.get_close_matches(word, [c for c in choices if c], n=1, cutoff=0.75)
    return found[0] if found else None


def _did_you_mean(near: str | None) -> str:
    return f"did you mean {near!r}? " if near else ""


def _unknown_sections(document: Mapping[str, Any], problems: list[str]) -> set[str]:
    """Add a problem per unknown section; return the known sections they misspell (and
    that are missing), which are then not reported again as missing."""
    misspelt: set[str] = set()
    for key in document:
        if key not in SCHEMA:
            near = _near(str(key), SCHEMA)
            if near is not None and near not in document:
                misspelt.add(near)
            problems.append(f"{key}: unknown section ({_did_you_mean(near)}expected one of "
                            f"{', '.join(SCHEMA)})")
    return misspelt


def validate(document: Any, base_dir: Path, source: str = "spec") -> Spec:
    """Validate a parsed YAML document; raise SpecError listing every problem."""
    problems: list[str] = []
    if document is None:
        raise SpecError(["the spec is empty; run `bsfind init` for a starter"], source)
    if not isinstance(document, Mapping):
        raise SpecError([f"the spec must be a mapping of sections, got {_type_name(document)}"],
                        source)
    misspelt = _unknown_sections(document, problems)
    for section in REQUIRED_SECTIONS:
        if section not in document and section not in misspelt:
            problems.append(f"{section}: missing required section")
    values: dict[str, dict[str, Any]] = {}
    filled: dict[str, Any] = {}
    for section, fields in SCHEMA.items():
        raw = document.get(section)
        if "" in fields:  # a scalar section such as `loss`
            f = fields[""]
            v = f.default if raw is None else _coerce(f, raw, section, problems)
            values[section] = {"": v}
            filled[section] = v
            continue
        if raw is None:
            raw = {}
        if not isinstance(raw, Mapping):
            problems.append(f"{section}: expected a mapping, got {_type_name(raw)} {raw!r}")
            raw = {}
        for key in raw:
            if key not in fields:
                near = _near(str(key), fields)
                problems.append(f"{section}.{key}: unknown key ({_did_you_mean(near)}"
                                f"expected one of {', '.join(fields)})")
        out: dict[str, Any] = {}
        for name, f in fields.items():
            path = f"{section}.{name}"
            if name in raw:
                out[name] = _coerce(f, raw[name], path, problems)
            elif f.required:
                if section not in misspelt:  # said once, as the misspelt section
                    problems.append(f"{path}: missing required key")
                out[name] = _MISSING
            else:
                out[name] = copy.deepcopy(f.default)
        values[section] = out
        filled[section] = {k: _plain(v) for k, v in out.items()}
    p_, t_ = values["probe"], values["training"]
    if p_.get("at_steps") and p_.get("warmup_steps"):
        problems.append("probe.at_steps: set either at_steps or warmup_steps, not both "
                        "(at_steps counts from the loaded weights: add the warm-up to them)")
    m_ = values["model"]
    if m_.get("checkpoints") and (m_.get("checkpoint") or p_.get("at_steps")
                                  or p_.get("warmup_steps")):
        problems.append("model.checkpoints: measures at each checkpoint without training; it "
                        "cannot be combined with model.checkpoint, probe.at_steps or "
                        "probe.warmup_steps")
    if t_.get("examples") is not None and t_.get("epochs") is not None:
        problems.append("training.epochs: set either training.examples or training.epochs, "
                        "not both")
    problems += _mixed_checkpoint_order(m_.get("checkpoints"),
                                        values["optimizer"].get("batch_size"))
    if problems:
        raise SpecError(problems, source)
    m, d, o, p, h, t = (values[s] for s in
                        ("model", "data", "optimizer", "probe", "hardware", "training"))
    return Spec(
        model=ModelSpec(**m),
        data=DataSpec(**d),
        loss=values["loss"][""],
        optimizer=OptimizerSpec(**o),
        probe=ProbeSpec(**p),
        hardware=HardwareSpec(**h),
        training=TrainingSpec(**t),
        base_dir=base_dir,
        document=filled,
        source=source,
    )


def _plain(v: Any) -> Any:
    """A value as the spec document (JSON, cache key) holds it."""
    if isinstance(v, CheckpointSpec):
        return {k: x for k, x in (("path", v.path), ("step", v.step), ("examples", v.examples))
                if x is not None}
    if isinstance(v, tuple):
        return [_plain(x) for x in v]
    return v


def parse_override(text: str) -> tuple[list[str], Any]:
    """Split ``a.b=value`` into (["a", "b"], YAML-parsed value)."""
    from bsfind.errors import UsageError

    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key or any(not part for part in key.split(".")):
        raise UsageError(f"--set {text!r}: expected key.path=value, e.g. probe.seed=3")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as exc:
        raise UsageError(f"--set {text!r}: the value is not valid YAML "
                         f"({''.join(_yaml_problem(exc))})",
                         hint=("quote the whole --set when its value has spaces: "
                               "--set \"probe.at_steps=[0, 200]\"")
                         if raw.strip()[:1] in ("[", "{", "'", '"') and " " not in raw.strip()
                         else "values are plain YAML: numbers, strings, lists, mappings"
                         ) from None
    return key.split("."), value


def _yaml_problem(exc: yaml.YAMLError, line: bool = False) -> tuple[str, str]:
    """PyYAML's message in one line: (its problem, " at [line L, ]column C" or "")."""
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
    if mark is None:
        return problem, ""
    return problem, (f" at line {mark.line + 1}, column {mark.column + 1}" if line
                     else f" at column {mark.column + 1}")


def apply_overrides(document: Any, overrides: Sequence[str]) -> Any:
    """Return a copy of ``document`` with each ``key.path=value`` applied."""
    from bsfind.errors import UsageError

    doc = copy.deepcopy(document) if document is not None else {}
    written: dict[str, str] = {}  # key path -> the --set that last wrote it
    for text in overrides:
        keys, value = parse_override(text)
        node = doc
        for i, k in enumerate([*keys[:-1], None]):
            if not isinstance(node, dict):
                path = ".".join(keys[:i])
                # the --set that wrote this path or the section holding it (the longest)
                writer = next((written[".".join(keys[:j])] for j in range(i, 0, -1)
                               if ".".join(keys[:j]) in written), None)
                by = (f"--set {writer!r} made it" if writer is not None
                      else "the spec file has it as")
                raise UsageError(f"--set {text!r}: {path} is not a mapping ({by} {node!r})")
            if k is None:
                break
            nxt = node.get(k)
            if nxt is None:
                nxt = node[k] = {}
            node = nxt
        node[keys[-1]] = value
        written[".".join(keys)] = text
    return doc


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml.safe_load's loader, refusing a key given twice in one mapping (the last one
    would win silently: a spec with two ``loss:`` lines ran the second)."""


def _unique_mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode,
                    deep: bool = False) -> dict[Any, Any]:
    seen: dict[Any, int] = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        try:
            first = seen.get(key)
        except TypeError:  # an unhashable key: the constructor below says so
            continue
        if first is not None:
            raise yaml.constructor.ConstructorError(
                None, None, f"key {key!r} given twice (first at line {first})",
                key_node.start_mark)
        seen[key] = key_node.start_mark.line + 1
    return loader.construct_mapping(node, deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _unique_mapping)


def load_spec(path: str | Path, overrides: Sequence[str] = (),
              origins: Mapping[str, str] | None = None) -> Spec:
    """Read, override and validate a spec file. ``origins``: how the user gave an
    override that was not a ``--set`` (``{"hardware.gpu=h999": "--gpu h999"}``), for the
    errors' blame."""
    p = Path(path)
    source = str(path)
    if not p.exists():
        raise SpecError([f"file not found: {p}"], source)
    if p.is_dir():
        raise SpecError([f"{p} is a directory, not a spec file"], source)
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise SpecError([f"cannot read the file ({exc})"], source) from None
    try:
        document = yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 (a SafeLoader)
    except yaml.YAMLError as exc:
        problem, where = _yaml_problem(exc, line=True)
        raise SpecError([f"invalid YAML{where}: {problem}"], source) from None
    if overrides:
        if document is not None and not isinstance(document, dict):
            raise SpecError([f"the spec must be a mapping of sections, got "
                             f"{_type_name(document)}"], source)
        document = apply_overrides(document, overrides)
    try:
        return validate(document, p.resolve().parent, source)
    except SpecError as exc:
        raise SpecError([_from_set(problem, overrides, origins or {})
                         for problem in exc.problems], source) from None


def _from_set(problem: str, overrides: Sequence[str], origins: Mapping[str, str]) -> str:
    """``problem`` with the ``--set`` (or the option, ``origins``) it came from, when its
    key path is one that an override wrote (the file is not to blame)."""
    path = problem.split(":", 1)[0].strip()
    keys = [(text, text.partition("=")[0].strip()) for text in overrides]
    # the last override of the path itself or of a section above it wrote its value;
    # else one below it made the section
    wrote = next((text for text, key in reversed(keys)
                  if path == key or path.startswith(key + ".")), None) or next(
        (text for text, key in keys if key.startswith(path + ".")), None)
    return problem if wrote is None else f"{problem} (from {origins.get(wrote, '--set ' + wrote)})"


def spec_from_dict(document: Mapping[str, Any], base_dir: str | Path = ".") -> Spec:
    """Validate a spec given as a Python mapping (the notebook entry point)."""
    return validate(copy.deepcopy(dict(document)), Path(base_dir).resolve(), "spec")


def starter_spec() -> str:
    """The commented example `bsfind init` writes, rendered from SCHEMA."""
    lines = [
        "# bsfind spec: run with `bsfind recommend spec.yaml`",
        "# Check it without probing: `bsfind validate spec.yaml`. Override any key on the",
        "# command line: `--set probe.seed=3`.",
    ]
    for section, fields in SCHEMA.items():
        if "" in fields:
            f = fields[""]
            lines.append(f"{section}: {_yaml_value(f.example or f.default)}  # {f.doc}")
            continue
        lines.append(f"{section}:")
        for name, f in fields.items():
            value = f.example if f.example is not None else f.default
            req = " (required)" if f.required else ""
            lines.append(f"  {name}: {_yaml_value(value)}  # {f.doc}{req}")
    return "\n".join(lines) + "\n"


def _yaml_value(v: Any) -> str:
    if v is None:
        return "null"
    return yaml.safe_dump(v, default_flow_style=True).strip().removesuffix("...").strip()
