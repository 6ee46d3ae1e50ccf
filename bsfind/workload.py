"""Resolve a Spec into live objects: model, dataset, loss, optimizer, device.

Factory strings are ``"package.module:attr"`` or ``"path/to/file.py:attr"``
(relative to the spec file). Keyword arguments are checked against the
factory's signature (``inspect.signature(...).bind``) before anything is
called, so a typo in ``kwargs`` is a one-line error, not a traceback from
deep inside the user's code. Every failure names the spec key and the
factory string.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import importlib
import importlib.util
import inspect
import os
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from bsfind.errors import HardwareError, ResolutionError, UsageError, UserCodeError
from bsfind.seeds import Seeds
from bsfind.spec import Spec

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
# data.collate: a list of items -> the batch, an (inputs, targets) pair or a dict.
Collate = Callable[[list[Any]], Any]

OPTIMIZERS: dict[str, type[torch.optim.Optimizer]] = {
    "sgd": torch.optim.SGD,
    "adam": torch.optim.Adam,
    "adamw": torch.optim.AdamW,
    "rmsprop": torch.optim.RMSprop,
}


def cross_entropy(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy; a sequence axis (B, T, C) vs (B, T) is flattened. One output
    per example with float targets is refused: torch would read the batch as one
    example's classes (a new user's regression model, squeezed to (B,)); so is one
    class per example, (B, 1) (unsqueezed: torch said only "expected target dtype to be
    Long", and float (B, 1) targets read a loss of 0 whatever the model)."""
    if targets.is_floating_point() and (outputs.dim() == 1 or (
            outputs.dim() == 2 and outputs.shape[1] == 1)):
        raise ValueError("float targets against one output per example: cross_entropy "
                         "would read the batch as one example's classes (regression "
                         "targets? use loss: mse)")
    if outputs.dim() > 2 and targets.dim() == outputs.dim() - 1:
        outputs = outputs.reshape(-1, outputs.shape[-1])
        targets = targets.reshape(-1)
    return F.cross_entropy(outputs, targets)


def mse(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean squared error; targets are cast to the outputs' dtype."""
    return F.mse_loss(outputs, targets.to(outputs.dtype).reshape(outputs.shape))


def model_loss(outputs: Any, targets: torch.Tensor) -> torch.Tensor:
    """``loss: model``: the loss the model returned (it was called with labels=targets):
    ``outputs.loss`` (Hugging Face), ``outputs["loss"]``, or the first of a tuple. Only a
    tuple or list is read by position: a Hugging Face output without a loss (GPT2Model, no
    head) gives its hidden states at [0], which read as a non-scalar loss."""
    for get in (lambda o: o.loss, lambda o: o["loss"]):
        try:
            value = get(outputs)
        except (AttributeError, KeyError, TypeError, IndexError):
            continue
        if isinstance(value, torch.Tensor):
            return value
    first = outputs[0] if isinstance(outputs, (tuple, list)) and outputs else None
    if isinstance(first, torch.Tensor) and first.dim() == 0:  # not one example's logits
        return first
    if isinstance(first, torch.Tensor):
        raise TypeError(f"the model returned a {type(outputs).__name__} whose first element "
                        f"has shape {tuple(first.shape)}, not a loss (.loss, ['loss'] or a "
                        "tuple starting with the scalar loss)")
    raise TypeError(f"the model returned {type(outputs).__name__} without a loss "
                    "(.loss, ['loss'] or a tuple starting with it)")


LOSSES: dict[str, LossFn] = {"cross_entropy": cross_entropy, "mse": mse, "model": model_loss}


# --------------------------------------------------------------------------- resolution


@dataclass(frozen=True)
class Resolved:
    obj: Any
    source_file: Path | None  # the file that defines it (for the cache key)


def _is_file_ref(module_part: str) -> bool:
    return module_part.endswith(".py") or "/" in module_part or "\\" in module_part


# The user's own modules that a factory file's import (or its factory's call) loaded
# from the file's folder, by (sys.modules name, that folder): their file and its
# (mtime_ns, size) then. refresh_user_modules drops them all once one changed, so that
# an edited helper is read afresh, while unchanged ones are not imported twice (an
# import may register a torch op namespace, which fails the second time; a model built
# before would stop pickling). Two folders may each record a module of one name (two
# specs' helper.py); sys.modules holds the one imported last.
_USER_MODULES: dict[tuple[str, Path], tuple[Path, tuple[int, int]]] = {}
# The factory files loaded, by path: their (mtime_ns, size) then.
_FACTORY_FILES: dict[Path, tuple[int, int]] = {}


def _stat(path: Path) -> tuple[int, int] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_mtime_ns, st.st_size


def _module_file(module: Any) -> Path | None:
    f = getattr(module, "__file__", None)
    return Path(f).resolve() if f else None


def _live(name: str, path: Path) -> bool:
    """Is ``sys.modules[name]`` the module loaded from ``path``?"""
    return name in sys.modules and _module_file(sys.modules[name]) == path


def refresh_user_modules() -> None:
    """Once any recorded module's file changed (or went) since its import, drop them all
    and every factory file, so that the next resolve runs them afresh: an importer
    anywhere holds the old module's objects (``from common import WIDTH`` in another
    folder's file). Their compiled caches go too: an edit within the same second and of
    the same size would otherwise be read from a stale .pyc. Unchanged, nothing is run
    twice."""
    if all(_stat(path) == stat for path, stat in _USER_MODULES.values()):
        return
    for (name, _), (path, _) in list(_USER_MODULES.items()):
        if _live(name, path):
            del sys.modules[name]
        with contextlib.suppress(OSError, ValueError, NotImplementedError):
            Path(importlib.util.cache_from_source(str(path))).unlink(missing_ok=True)
    _USER_MODULES.clear()
    _FACTORY_FILES.clear()


@contextlib.contextmanager
def _importing(folder: Path | None) -> Iterator[None]:
    """With ``folder`` (a factory file's): first on the import path inside, as under
    ``python file.py`` (the file imports its neighbours), and last afterwards, for
    imports inside its functions (first for good would let a user's ``profile.py``
    shadow the standard library's for every later import); another folder's recorded
    module that a file of the same name in ``folder`` shadows is set aside meanwhile,
    and put back unless the block imported its namesake; the modules imported inside
    from ``folder`` are recorded."""
    if folder is None:
        yield
        return
    here = folder.resolve()
    aside: dict[str, Any] = {}
    for (name, where), (path, _) in _USER_MODULES.items():
        top = name.split(".")[0]
        mine = here / f"{top}.py", here / top / "__init__.py"
        if where != here and _live(name, path) and any(m.is_file() for m in mine):
            aside[name] = sys.modules.pop(name)
    before = set(sys.modules)
    entry = str(here)
    sys.path.insert(0, entry)
    try:
        yield
    finally:
        with contextlib.suppress(ValueError):  # the user's code may have removed it
            sys.path.remove(entry)
        if entry not in sys.path:
            sys.path.append(entry)
        for name in set(sys.modules) - before:
            found = _module_file(sys.modules.get(name))
            if (found is not None and found.is_relative_to(here)
                    and not name.startswith("bsfind_user_")
                    and "site-packages" not in found.parts):
                stat = _stat(found)
                if stat is not None:
                    _USER_MODULES[name, here] = (found, stat)
        for name, module in aside.items():
            if name not in sys.modules:  # its namesake was not imported here
                sys.modules[name] = module


@functools.cache
def _installed_roots() -> tuple[Path, ...]:
    """Where installed code lives: the standard library, site-packages, bsfind itself."""
    import site
    import sysconfig

    paths = {sysconfig.get_paths().get(k) for k in ("stdlib", "platstdlib", "purelib",
                                                    "platlib")}
    paths |= set(site.getsitepackages()) | {str(Path(__file__).resolve().parent)}
    return tuple(Path(p).resolve() for p in paths if p)


def is_user_source(path: Path) -> bool:
    """A factory's source file that is the user's (not of an installed package or bsfind):
    its folder's files count in the cache key (:func:`source_files_under`)."""
    if any(part in ("site-packages", "dist-packages") for part in path.parts):
        return False
    return not any(path.is_relative_to(root) for root in _installed_roots())


def source_files_under(folder: Path, limit: int = 2000) -> list[Path]:
    """The ``.py`` files under ``folder`` (hidden folders, caches and virtual
    environments left out; the first ``limit`` top-down, the folder's own first): for
    the cache key, what a factory file there can import, whenever it does."""
    skip = {"__pycache__", "site-packages", "node_modules", "venv", "env", "build", "dist"}
    found: list[Path] = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and d not in skip)
        found += [Path(root) / f for f in sorted(files) if f.endswith(".py")]
        if len(found) >= limit:
            break
    return sorted(found[:limit], key=str)  # top-down: the folder's own files first


def _load_factory_file(path: Path, name: str, key: str, ref: str) -> Any:
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ResolutionError(f"{key} {ref!r}: cannot load {path} as a Python module")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    stat = _stat(path)
    try:
        with _importing(path.parent):
            spec.loader.exec_module(module)
    except (Exception, SystemExit) as exc:  # SystemExit: argparse or sys.exit at import
        sys.modules.pop(name, None)
        _FACTORY_FILES.pop(path, None)
        raise ResolutionError(
            f"{key} {ref!r}: importing {path.name} raised {_raised(exc)}",
            hint=_EXIT_HINT if isinstance(exc, SystemExit) else None,
        ) from exc
    if stat is not None:
        _FACTORY_FILES[path] = stat
    return module


def resolve(ref: str, base_dir: Path, key: str) -> Resolved:
    """Import ``module:attr`` or ``file.py:attr``; errors name ``key`` and ``ref``."""
    module_part, _, attr = ref.rpartition(":")
    if not module_part or not attr:
        raise ResolutionError(f"{key} {ref!r}: expected 'module:attr' or 'file.py:attr'")
    if _is_file_ref(module_part):
        path = (base_dir / module_part).resolve()
        if not path.is_file():
            raise ResolutionError(
                f"{key} {ref!r}: file not found: {path}",
                hint="paths are relative to the spec file",
            )
        name = "bsfind_user_" + hashlib.sha1(str(path).encode()).hexdigest()[:12]
        loaded = _FACTORY_FILES.get(path)
        if loaded is not None and loaded == _stat(path) and name in sys.modules:
            module = sys.modules[name]  # unchanged: run once (model and loss share it)
        else:
            module = _load_factory_file(path, name, key, ref)
    else:
        try:
            module = importlib.import_module(module_part)
        except ImportError as exc:
            raise ResolutionError(
                f"{key} {ref!r}: cannot import module {module_part!r} ({exc})",
                hint="is it installed, or did you mean a file path like models.py:attr?",
            ) from exc
        except (Exception, SystemExit) as exc:
            raise ResolutionError(
                f"{key} {ref!r}: importing {module_part} raised {_raised(exc)}",
                hint=_EXIT_HINT if isinstance(exc, SystemExit) else None,
            ) from exc
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            near = near_name(part, [n for n in dir(obj) if not n.startswith("_")]).rstrip()
            raise ResolutionError(
                f"{key} {ref!r}: module {module_part!r} has no attribute {attr!r}"
                + (f" ({near})" if near else "")
            )
        obj = getattr(obj, part)
    src = getattr(module, "__file__", None)
    return Resolved(obj, Path(src).resolve() if src else None)


def check_kwargs(fn: Any, kwargs: dict[str, Any], key: str, ref: str, *leading: Any) -> None:
    """Raise ResolutionError if ``fn(*leading, **kwargs)`` does not fit its signature."""
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return  # builtins without a signature: let the call decide
    try:
        sig.bind(*leading, **kwargs)
    except TypeError as exc:
        raise ResolutionError(
            f"{key} for {ref!r} do not fit its signature: {exc}",
            hint=f"signature: {ref.rpartition(':')[2]}{sig}",
        ) from None


def call_factory(ref: str, kwargs: dict[str, Any], base_dir: Path, section: str) -> Resolved:
    r = resolve(ref, base_dir, f"{section}.factory")
    if not callable(r.obj):
        raise ResolutionError(f"{section}.factory {ref!r} is not callable")
    check_kwargs(r.obj, kwargs, f"{section}.kwargs", ref)
    folder = r.source_file.parent if r.source_file and _is_file_ref(ref.rpartition(":")[0]) \
        else None
    try:
        with _importing(folder):  # its lazy imports, as at its file's import
            out = r.obj(**kwargs)
    except (Exception, SystemExit) as exc:
        raise ResolutionError(
            f"{section}.factory {ref!r} raised {_raised(exc)}",
            hint=(_EXIT_HINT if isinstance(exc, SystemExit)
                  else _beside_spec(exc, kwargs, base_dir)),
        ) from exc
    return Resolved(out, r.source_file)


def _beside_spec(exc: BaseException, kwargs: dict[str, Any], base_dir: Path) -> str | None:
    """The hint when a factory did not find a relative path (the error's, or one of its
    kwargs) that is there beside the spec: its code reads paths from the current
    directory, not the spec's (a new user ran `bsfind validate job/myjob.yaml` from the
    folder above; numpy's error names no filename)."""
    if not isinstance(exc, FileNotFoundError):
        return None
    missing = getattr(exc, "filename", None)
    names = [missing, *kwargs.values()]
    for name in (str(n) for n in names if isinstance(n, (str, Path)) and str(n)):
        if name != str(missing) and name not in str(exc):
            continue  # a kwarg the error is not about
        try:  # (a string that is no path: too long, a NUL in it)
            beside = (not Path(name).is_absolute() and not Path(name).exists()
                      and (base_dir / name).exists())
        except (OSError, ValueError):
            continue
        if beside:
            return (f"{name} is in the spec's folder ({base_dir}), but your code reads it "
                    f"from the current one ({Path.cwd()}): run from the spec's folder, or "
                    "build the path from your file's own (Path(__file__).parent / ...)")
    return None


def _raised(exc: BaseException, where: str = "") -> str:
    """"ValueError{where}: its message", or the name alone when it has none (a bare
    MemoryError read "raised MemoryError in forward: ")."""
    text = str(exc).strip()
    return f"{type(exc).__name__}{where}" + (f": {text}" if text else "")


# The hint of a factory file that exited while bsfind imported or called it.
_EXIT_HINT = ("it exited (argparse, or sys.exit, at import?): put a script's own "
              "start under if __name__ == \"__main__\":")


# --------------------------------------------------------------------------- the workload


@dataclass
class Workload:
    """Everything a probe needs: the live model, data, loss and optimizer class.

    Built from a spec by :func:`build`, or from live objects by :meth:`from_objects`.
    It holds no spec: probes get their settings as arguments.
    """

    model: nn.Module
    dataset: Any
    loss_fn: LossFn
    optimizer_cls: type[torch.optim.Optimizer]
    optimizer_kwargs: dict[str, Any]
    device: torch.device
    optimizer_name: str = "adam"
    source_files: list[Path] = field(default_factory=list)
    # The dataset's (inputs, targets) tensors when it is a TensorDataset: batches
    # are then gathered by indexing instead of collating items one by one.
    tensors: tuple[torch.Tensor, ...] | None = None
    # The target's key when items are dicts (Hugging Face style, TARGET_KEYS): the other
    # keys are the inputs, passed to the model as keyword arguments.
    target_key: str | None = None
    # data.collate: makes a batch of a list of items (else torch's default_collate).
    collate: Collate | None = None
    model_name: str = "model"
    loss_name: str = "loss"
    data_name: str = "the dataset"
    # _named_in_forward's answers, by the inputs' keys.
    _keyword_calls: dict[tuple[Any, ...], bool] = field(default_factory=dict, repr=False,
                                                        compare=False)
    # hardware.precision bf16/fp16: forward under autocast (the loss in fp32).
    # No loss scaling: the probe takes no optimizer step, and gradients are
    # read in fp32 (parameters stay fp32 under autocast).
    autocast_dtype: torch.dtype | None = None
    # BatchNorm layers left in eval mode: the factory froze them (:func:`_train_mode`)
    frozen_norms: tuple[str, ...] = ()

    @classmethod
    def from_objects(
        cls,
        model: nn.Module,
        dataset: Any,
        loss_fn: LossFn,
        *,
        optimizer: str | type[torch.optim.Optimizer] = "adam",
        optimizer_kwargs: dict[str, Any] | None = None,
        device: torch.device | None = None,
        collate: Collate | None = None,
    ) -> Workload:
        """Wrap live objects (the notebook API and the evidence scripts).

        Args:
            optimizer: a name of :data:`OPTIMIZERS` or an optimizer class (the
                optimizer of warm-up training and of the hardware measurement).
            device: where to run; default the model's.
            collate: makes a batch of a list of items (else torch's default_collate).
        """
        dev = device or next(model.parameters()).device
        if isinstance(optimizer, str):
            opt_cls, opt_name = OPTIMIZERS.get(optimizer.lower(), torch.optim.Adam), optimizer
        else:
            opt_cls, opt_name = optimizer, optimizer.__name__
        tensors, target_key = _check_dataset(dataset, "the dataset", collate, "collate")
        return cls(
            model=model.to(dev), dataset=dataset, loss_fn=loss_fn,
            optimizer_cls=opt_cls, optimizer_kwargs=dict(optimizer_kwargs or {}), device=dev,
            optimizer_name=opt_name, tensors=tensors, target_key=target_key, collate=collate,
            model_name=type(model).__name__, loss_name=getattr(loss_fn, "__name__", "loss"),
        )

    def with_dataset(self, dataset: Any) -> Workload:
        """The same model, loss and optimizer over another dataset (a split of this one)."""
        tensors, target_key = _check_dataset(dataset, "the dataset", self.collate)
        return dataclasses.replace(self, dataset=dataset, tensors=tensors,
                                   target_key=target_key)

    def make_optimizer(self, lr: float) -> torch.optim.Optimizer:
        """A fresh optimizer over the trainable parameters at learning rate ``lr``."""
        try:
            return self.optimizer_cls(  # type: ignore[call-arg]
                self.trainable(), lr=lr, **self.optimizer_kwargs
            )
        except Exception as exc:
            raise UserCodeError(
                f"optimizer {self.optimizer_name!r} could not be built: "
                f"{type(exc).__name__}: {exc}"
            ) from exc

    def trainable(self) -> list[nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    def __len__(self) -> int:
        return len(self.dataset)

    def batch(self, indices: torch.Tensor) -> tuple[Any, torch.Tensor]:
        """Collate the examples at ``indices`` and move them to the device."""
        x: Any
        if self.tensors is not None:
            idx = indices.to(self.tensors[0].device)
            x, y = (t[idx] for t in self.tensors)
        else:
            try:
                items = [self.dataset[int(i)] for i in indices]
            except Exception as exc:
                raise UserCodeError(f"{self.data_name}: an item raised "
                                    f"{type(exc).__name__}: {exc}") from exc
            if self.collate is not None:
                batch = _collated(self.collate, items, "data.collate")
            else:
                try:
                    batch = torch.utils.data.default_collate(items)
                except Exception as exc:
                    raise UserCodeError(
                        f"{self.data_name}: {len(items)} items do not batch together "
                        f"({type(exc).__name__}: {exc})",
                        hint="every item's input and target must have the same shape (pad "
                             "or crop them in the dataset, or name a data.collate that "
                             "pads them), or be a dict/tuple of such") from exc
            x, y = self._split(batch)
        return _to(x, self.device), _to(y, self.device)

    def _split(self, batch: Any) -> tuple[Any, Any]:
        """(inputs, targets) of a collated batch: a pair, or a dict less its target."""
        if self.target_key is None and isinstance(batch, (tuple, list)) and len(batch) == 2:
            return batch[0], batch[1]
        if self.target_key is not None and isinstance(batch, Mapping) \
                and self.target_key in batch:
            x = dict(batch)
            return x, x.pop(self.target_key)
        raise UserCodeError(
            f"{'data.collate' if self.collate is not None else self.data_name}: a batch is "
            f"{_shapes(batch)}, not the "
            + ("(input, target) pair" if self.target_key is None
               else f"dict with {self.target_key!r}") + " its first one was",
            hint="every batch must have one form: an (inputs, targets) pair or a dict with "
                 "'labels'")

    def loss(self, indices: torch.Tensor) -> torch.Tensor:
        """Forward the examples and return the (mean) loss, checked."""
        x, y = self.batch(indices)
        return self.loss_on(x, y)

    def fp32_loss(self, x: Any, y: torch.Tensor) -> torch.Tensor:
        """:meth:`loss_on` without autocast: what the memory and FLOP counts run."""
        return self.loss_on(x, y, autocast=False)

    def forward(self, x: Any, y: torch.Tensor) -> Any:
        """The model's outputs on a batch, called as the spec says: ``model(x)``;
        with ``loss: model`` also ``labels=y``; a dict of inputs as keyword arguments,
        as Hugging Face models take them, when it came from dict items, with ``loss:
        model``, or when the model's forward names every key (a collate's (dict,
        targets) pair); else whole, to a forward that takes one dict."""
        labels = {"labels": y} if self.loss_fn is model_loss else {}
        if isinstance(x, Mapping) and (labels or self.target_key is not None
                                       or self._named_in_forward(tuple(x))):
            return self.model(**x, **labels)
        return self.model(x, **labels)

    def _named_in_forward(self, keys: tuple[Any, ...]) -> bool:
        """Does the model's forward have a parameter named by every one of ``keys``? One
        key alone is ambiguous (``forward(self, x)`` may take ``{"x": ...}`` whole): it
        counts only on a Hugging Face model (``main_input_name``)."""
        if keys not in self._keyword_calls:
            params = self.forward_parameters() or {}
            named = bool(keys) and all(
                isinstance(k, str) and k in params
                and params[k].kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD,
                                       inspect.Parameter.KEYWORD_ONLY) for k in keys)
            self._keyword_calls[keys] = named and (
                len(keys) > 1 or hasattr(self.model, "main_input_name"))
        return self._keyword_calls[keys]

    def forward_parameters(self) -> Mapping[str, inspect.Parameter] | None:
        """The parameters of the model's forward (None: its signature cannot be read)."""
        try:
            return inspect.signature(self.model.forward).parameters
        except (TypeError, ValueError):
            return None

    def _takes_labels(self) -> bool:
        """Can ``loss: model`` call this model's forward with labels=?"""
        params = self.forward_parameters()
        if params is None:
            return True  # unknown: the hint keeps loss: model
        return any(p.name == "labels" or p.kind is inspect.Parameter.VAR_KEYWORD
                   for p in params.values())

    def loss_on(self, x: Any, y: torch.Tensor, autocast: bool = True) -> torch.Tensor:
        """The checked loss of a batch: the user's errors as UserCodeError. ``autocast``
        False runs in fp32 whatever hardware.precision says (the memory count's)."""
        ctx = (torch.autocast(self.device.type, dtype=self.autocast_dtype)
               if self.autocast_dtype is not None and autocast else contextlib.nullcontext())
        own = self.loss_fn is model_loss
        with ctx:
            try:
                out = self.forward(x, y)
            except Exception as exc:
                raise UserCodeError(
                    f"model {self.model_name!r} raised {_raised(exc, ' in forward')}",
                    hint=("loss: model calls the model with labels=targets and reads the "
                          "loss it returns; " if own else "")
                    + f"the batch: inputs {_shapes(x)}, targets {_shapes(y)}"
                    + (_ids_beyond_embedding(self.model, x) if isinstance(exc, IndexError)
                       else ""),
                ) from exc
        if not isinstance(out, torch.Tensor) and self.loss_name in LOSSES and not own:
            raise UserCodeError(
                f"loss {self.loss_name!r} got a {type(out).__name__} from the model, not a "
                "tensor of outputs",
                hint=("use loss: model (the model's own loss: it is called with "
                      "labels=targets), or " if self._takes_labels() else "use ")
                + "a loss function 'file.py:fn' that reads "
                + ("outputs.logits" if hasattr(out, "logits") else
                   f"the logits from the model's {type(out).__name__}"),
            )
        try:
            loss = self.loss_fn(out.float() if isinstance(out, torch.Tensor) else out, y)
        except Exception as exc:
            raise UserCodeError(
                f"loss {self.loss_name!r} raised {_raised(exc)}",
                hint=f"it got outputs {_shapes(out)} and targets {_shapes(y)} (the first "
                     "axis is the batch)",
            ) from exc
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
            shape = tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
            raise UserCodeError(
                f"loss {self.loss_name!r} must return a scalar (the mean over the batch), "
                f"got {shape}"
            )
        if torch.is_grad_enabled() and not loss.requires_grad:
            raise UserCodeError(
                f"loss {self.loss_name!r} carries no gradient: it does not depend on the "
                "model's trainable parameters",
                hint="a .detach(), .item() or integer cast in the model's forward or the "
                     f"loss? (the model's outputs: {_shapes(out)})",
            )
        return loss.reshape(())


def text_inputs(job: Workload) -> list[str]:
    """The entries of dict items (without a collate) that hold text, not numbers, and that
    the model's forward does not name but swallows in its **kwargs, as a Hugging Face
    model's does (a raw text column left in a tokenized dataset). A forward without
    **kwargs fails on such an entry loudly; one that names it takes it on purpose."""
    if job.target_key is None or job.collate is not None or len(job) == 0:
        return []
    item, params = job.dataset[0], job.forward_parameters()
    if params is None or not isinstance(item, Mapping) or not any(
            p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return []
    return [str(k) for k, v in item.items() if k != job.target_key and k not in params and (
        isinstance(v, str) or (isinstance(v, (list, tuple)) and v and isinstance(v[0], str)))]


# Examples looked at by uneven_token_weights.
TOKEN_CHECK_EXAMPLES = 32
# Hugging Face's label for a token the loss ignores (padding).
IGNORE_INDEX = -100


def spread_indices(n: int, k: int) -> torch.Tensor:
    """``min(n, k)`` indices spread evenly over 0..n-1, ends included, in integers (a
    float32 linspace rounded the last past n - 1 for some n over 2^24: a review)."""
    k = min(n, k)
    if k <= 1:
        return torch.zeros(k, dtype=torch.long)
    return torch.arange(k, dtype=torch.long) * (n - 1) // (k - 1)


def uneven_token_weights(job: Workload) -> bool:
    """``loss: model`` (a mean over a batch's tokens, as Hugging Face's) or the built-in
    ``cross_entropy`` (which flattens (B, T) targets: the same mean) on examples that
    count different numbers of tokens (2-D labels whose counted tokens, those not
    IGNORE_INDEX, form one block per row, as padding leaves them, of varying length, or
    vary more than random masks make them):
    each example then weighs by its length, not equally, as the noise scale's estimators
    assume. Looks at TOKEN_CHECK_EXAMPLES spread over the dataset."""
    if job.loss_fn not in (model_loss, cross_entropy) or len(job) < 2:
        return False
    idx = spread_indices(len(job), TOKEN_CHECK_EXAMPLES)
    _, y = job.batch(idx)
    if not isinstance(y, torch.Tensor) or y.dim() != 2 or y.is_floating_point():
        return False
    counted = y != IGNORE_INDEX
    n = counted.sum(1)
    # padding (and a masked prompt) leaves each row one block of counted tokens; a masked
    # language model's random masks scatter them, and vary their count only by chance
    first, at = counted.int().argmax(1)[:, None], torch.arange(y.shape[1])
    contiguous = bool((((at >= first) & (at < first + n[:, None])) == counted).all())
    # or counts far more spread than random masks give (twice a binomial's variance):
    # several blocks per row (multi-turn chat), first sub-words of words, ...
    mean, length = float(n.float().mean()), y.shape[1]
    spread = float(n.float().var()) > 2.0 * mean * (1.0 - mean / length)
    return bool(n.min() != n.max()) and (contiguous or spread)


def _ids_beyond_embedding(model: nn.Module, x: Any) -> str:
    """For an IndexError in forward: the inputs' largest integer id when it is past every
    Embedding's rows (a vocabulary smaller than the data's: torch says only "index out of
    range in self"). Not against a smaller table: position or token-type embeddings are
    indexed by other ids (a review: a GPT-2 whose context outgrew n_positions was told
    about its vocabulary)."""
    rows = [m.num_embeddings for m in model.modules() if isinstance(m, nn.Embedding)]
    values = x.values() if isinstance(x, Mapping) else x if isinstance(x, (list, tuple)) else [x]
    ids = [int(v.max()) for v in values if isinstance(v, torch.Tensor) and v.numel()
           and not v.is_floating_point() and not v.is_complex() and v.dtype != torch.bool]
    if not rows or not ids or max(ids) < max(rows):
        return ""
    return (f"; the inputs' largest id is {max(ids):,}, past every Embedding's rows (the "
            f"largest has {max(rows):,}: ids 0–{max(rows) - 1:,}): is the vocabulary as "
            "large as the data's?")


def _shapes(x: Any) -> str:
    """A batch's shape(s) and dtype(s), for messages: [4, 64] float32, or a dict/tuple
    of them."""
    if isinstance(x, torch.Tensor):
        return f"[{', '.join(map(str, x.shape))}] {str(x.dtype).removeprefix('torch.')}"
    if isinstance(x, Mapping):
        return "{" + ", ".join(f"{k}: {_shapes(v)}" for k, v in x.items()) + "}"
    if isinstance(x, (list, tuple)):
        return "(" + ", ".join(_shapes(v) for v in x) + ")"
    return type(x).__name__


def _to(x: Any, device: torch.device) -> Any:
    if isinstance(x, torch.Tensor):
        return x.to(device, non_blocking=True)
    if isinstance(x, (list, tuple)):
        return type(x)(_to(v, device) for v in x)
    if isinstance(x, dict):
        return {k: _to(v, device) for k, v in x.items()}
    return x


def resolve_device(name: str) -> torch.device:
    """``auto`` -> cuda if present else cpu; an absent CUDA device is a HardwareError."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise HardwareError(
                f"hardware.device: {name!r} requested but no CUDA device is available",
                hint="set hardware.device: auto or cpu",
            )
        index = int(name.split(":")[1]) if ":" in name else 0
        if index >= torch.cuda.device_count():
            raise HardwareError(
                f"hardware.device: {name!r} requested but only "
                f"{torch.cuda.device_count()} CUDA device(s) exist"
            )
        return torch.device("cuda", index)
    return torch.device("cpu")


# The keys a dict item's target may have, first found wins: Hugging Face's convention
# ("labels" in tokenized datasets and model forwards, "label" in classification sets).
TARGET_KEYS = ("labels", "label")


def _check_dataset(ds: Any, name: str, collate: Collate | None = None,
                   collate_ref: str = "data.collate"
                   ) -> tuple[tuple[torch.Tensor, ...] | None, str | None]:
    """Check ``ds`` is a non-empty map-style dataset of (input, target) pairs or of dicts
    with a TARGET_KEYS entry (with ``collate``: that its batch of the first two items is
    one of those); returns (its tensors when a TensorDataset, the target's key when dicts).
    ``name`` names it in errors: "the dataset of data.factory 'x.py:f'", or "the
    dataset" for one passed in (the Python API)."""
    # an IterableDataset has torch's __getitem__ that raises (a trial's finite stream with
    # __len__ passed the check and failed at item 0 with NotImplementedError)
    stream = (isinstance(ds, torch.utils.data.IterableDataset)
              and type(ds).__getitem__ is torch.utils.data.Dataset.__getitem__)
    if stream or not hasattr(ds, "__getitem__") or not hasattr(ds, "__len__"):
        loader = isinstance(ds, torch.utils.data.DataLoader)
        kind = type(ds).__name__
        hint = None
        if loader:
            hint = ("pass the DataLoader's .dataset (bsfind draws its own batches), and its "
                    "collate_fn as the collate")
        elif stream or hasattr(ds, "__iter__"):
            hint = ("bsfind draws examples at random, so it needs them by index: return "
                    "list(itertools.islice(stream, N)) of a few thousand examples, or a "
                    "map-style Dataset over the same data")
        raise UserCodeError(
            f"{name} is {'an' if kind[:1].lower() in 'aeiou' else 'a'} {kind}, not a "
            "map-style Dataset (it needs __len__ and __getitem__)"
            + (", but streams its examples" if stream else ""), hint=hint)
    try:
        n = len(ds)
    except Exception as exc:
        raise UserCodeError(f"len() of {name} raised {_raised(exc)}") from exc
    if n == 0:
        raise UserCodeError(f"{name} is empty")
    if n == 1:
        raise UserCodeError(f"{name} has one example: the noise scale is the spread of "
                            "examples' gradients, so it needs two at least")
    try:
        # three for a collate: an identity collate's list of two reads as a pair
        items = [ds[i] for i in range(min(n, 3 if collate is not None else 1))]
    except Exception as exc:
        raise UserCodeError(f"item 0 of {name} raised {_raised(exc)}") from exc
    if collate is not None:
        batch = _collated(collate, items, collate_ref)
        return None, _target_key(batch, f"{collate_ref}: its batch of {len(items)} items")
    key = _target_key(items[0], f"item 0 of {name}")
    if key is None and isinstance(ds, torch.utils.data.TensorDataset) and len(ds.tensors) == 2:
        return tuple(ds.tensors), None
    return None, key


def _collated(collate: Collate, items: list[Any], ref: str) -> Any:
    try:
        return collate(items)
    except Exception as exc:
        raise UserCodeError(f"{ref} raised {type(exc).__name__} on {len(items)} items: "
                            f"{exc}") from exc


def _target_key(obj: Any, what: str) -> str | None:
    """The TARGET_KEYS entry of a dict item (or batch), None for an (input, target) pair;
    a UserCodeError for anything else. ``what`` names it in the message."""
    if isinstance(obj, Mapping):
        key = next((k for k in TARGET_KEYS if k in obj), None)
        if key is None:
            raise UserCodeError(
                f"{what}: a dict needs the target under "
                f"{' or '.join(repr(k) for k in TARGET_KEYS)}; it has "
                f"{', '.join(map(repr, obj)) or 'no keys'}",
                hint="return (input, target) pairs, or name the target 'labels' (the "
                     "other keys are passed to the model as keyword arguments)")
        if len(obj) == 1:
            raise UserCodeError(f"{what}: a dict holding only the target {key!r}, no inputs")
        return key
    if not isinstance(obj, (tuple, list)) or len(obj) != 2:
        raise UserCodeError(
            f"{what}: must be an (input, target) pair or a dict with a 'labels' key, got "
            f"{type(obj).__name__}"
            + (f" of length {len(obj)}" if isinstance(obj, (tuple, list)) else "")
        )
    return None


# The weights file of a Hugging Face save_pretrained folder (the first that exists).
HF_WEIGHTS = ("model.safetensors", "pytorch_model.bin")


def checkpoint_file(path_str: str, base_dir: Path, key: str = "model.checkpoint") -> Path:
    """The weights file a checkpoint entry names (relative to ``base_dir``; a
    ``save_pretrained`` folder's HF_WEIGHTS file); errors name ``key``."""
    path = (base_dir / path_str).resolve()
    if path.is_dir():
        found = [path / name for name in HF_WEIGHTS if (path / name).is_file()]
        if not found:
            raise ResolutionError(f"{key}: {path} is a folder without "
                                  f"{' or '.join(HF_WEIGHTS)} in it",
                                  hint="name the weights file, or a save_pretrained folder")
        path = found[0]
    if not path.is_file():
        raise ResolutionError(f"{key}: file not found: {path}")
    return path


def load_checkpoint(
    model: nn.Module, path_str: str, base_dir: Path, key: str = "model.checkpoint"
) -> None:
    """Load a state_dict file (relative to ``base_dir``) into ``model``; errors name ``key``.

    Also a ``.safetensors`` file, and a Hugging Face ``save_pretrained`` folder (its
    HF_WEIGHTS file). Keys missing for parameters tied to one that is present (GPT-2's
    ``lm_head.weight`` is ``transformer.wte.weight``; such files store it once) are fine.
    """
    path = checkpoint_file(path_str, base_dir, key)
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state: Any = load_file(str(path), device="cpu")
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        text = str(exc)
        # torch's many-line advice is not ours: a pickled object is a class it refused
        # ("Unsupported global"); any other unpickling error is a file of something else
        if "Weights only load failed" in text and "Unsupported global" in text:
            raise ResolutionError(
                f"{key} {path} holds pickled Python objects, not a state_dict (a whole model "
                "saved with torch.save(model)?)",
                hint="save model.state_dict() instead; bsfind never unpickles code",
            ) from None
        text = text.split("WeightsUnpickler error:", 1)[-1].strip()
        head = text.splitlines()[0] if text else ""
        raise ResolutionError(
            f"{key} {path}: cannot be read as a state_dict (not a file torch.save or "
            f"safetensors wrote? {type(exc).__name__}: {head})"
        ) from None
    if isinstance(state, dict):
        for inner in ("state_dict", "model", "model_state_dict"):
            if inner in state and isinstance(state[inner], dict):
                state = state[inner]
                break
    if not isinstance(state, dict):
        raise ResolutionError(f"{key} {path}: expected a state_dict mapping")
    state = _without_wrapper_prefix(model, state)
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # shapes that differ
        first = [line.strip() for line in str(exc).splitlines()[0:3]]  # (torch indents)
        raise ResolutionError(f"{key} {path} does not match the model: {' '.join(first)}"
                              ) from None
    untied = [k for k in missing if k not in _tied_to_present(model, state)]
    if untied or unexpected:
        parts = ([f"missing {', '.join(untied[:3])}" + (" ..." if len(untied) > 3 else "")]
                 if untied else []) + (
            [f"unexpected {', '.join(unexpected[:3])}" + (" ..." if len(unexpected) > 3 else "")]
            if unexpected else [])
        raise ResolutionError(f"{key} {path} does not match the model: {'; '.join(parts)}")


# The prefixes wrappers put before every key: DistributedDataParallel's and
# torch.compile's (whose OptimizedModule holds the model as _orig_mod).
WRAPPER_PREFIXES = ("module.", "_orig_mod.")


def _without_wrapper_prefix(model: nn.Module, state: dict[str, Any]) -> dict[str, Any]:
    """``state`` with its keys in the model's form when the two differ only by wrappers'
    prefixes, up to two deep (``DDP(torch.compile(m))`` saves "module._orig_mod."): a
    checkpoint saved from a DDP or compiled model, loaded into a plain one, or the reverse
    (a trial's compiled ViT met a plain checkpoint: "missing _orig_mod.cls_token", no
    hint). Keys without the prefix stay as they are (an AveragedModel's n_averaged)."""
    own = set(model.state_dict())
    if not state or set(state) & own:
        return state
    forms = [state]
    for _ in range(2):
        ahead = []
        for form in forms:
            for prefix in WRAPPER_PREFIXES:
                if any(k.startswith(prefix) for k in form):
                    ahead.append({k.removeprefix(prefix): v for k, v in form.items()})
                ahead.append({prefix + k: v for k, v in form.items()})
        for form in ahead:
            if set(form) & own:
                return form
        forms = ahead
    return state


def _tied_to_present(model: nn.Module, state: dict[str, Any]) -> set[str]:
    """Names of parameters that share their tensor with another name found in ``state``."""
    names: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(name)
    return {n for group in names.values() if any(g in state for g in group) for n in group}


def _autocast_dtype(precision: str, device: torch.device) -> torch.dtype:
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    try:
        with torch.autocast(device.type, dtype=dtype):
            pass
    except (RuntimeError, ValueError) as exc:
        raise HardwareError(
            f"hardware.precision: {precision} autocast is not supported on {device} ({exc})",
            hint="use hardware.precision: fp32",
        ) from None
    if device.type == "cuda" and dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
        raise HardwareError(f"hardware.precision: bf16 is not supported by {device}",
                            hint="use fp16 or fp32")
    return dtype


def build(spec: Spec) -> Workload:
    """Build every object the spec names, on the requested device.

    The factories run with torch's random generators seeded by ``probe.seed``
    (so the same spec builds the same weights) and restored afterwards, so the
    caller's own random state is left as it was.
    """
    device = resolve_device(spec.hardware.device)
    refresh_user_modules()  # the user's helpers as they are now on disk
    cuda = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=cuda):
        torch.manual_seed(Seeds(spec.probe.seed).weights)
        job = _build(spec, device)
    if spec.hardware.precision != "fp32":
        job.autocast_dtype = _autocast_dtype(spec.hardware.precision, device)
    # Build the optimizer once now: a bad kwarg fails before any probing, and
    # torch.optim's lazy imports are paid here rather than inside a timed phase.
    job.make_optimizer(spec.optimizer.lr)
    return job


def _build(spec: Spec, device: torch.device) -> Workload:
    sources: list[Path] = []
    model = _build_model(spec, sources)
    d = call_factory(spec.data.factory, spec.data.kwargs, spec.base_dir, "data")
    if d.source_file:
        sources.append(d.source_file)
    collate = None
    if spec.data.collate is not None:
        c = resolve(spec.data.collate, spec.base_dir, "data.collate")
        if not callable(c.obj):
            raise ResolutionError(f"data.collate {spec.data.collate!r} is not callable",
                                  hint="name a function of a list of items")
        collate = c.obj
        if c.source_file:
            sources.append(c.source_file)
    tensors, target_key = _check_dataset(d.obj, f"the dataset of data.factory "
                                                f"{spec.data.factory!r}", collate,
                                         f"data.collate {spec.data.collate!r}")
    loss_fn = _resolve_loss(spec, sources)
    opt_cls = _resolve_optimizer(spec, sources)
    model.to(device)
    frozen_norms = _train_mode(model)
    return Workload(
        model=model,
        dataset=d.obj,
        loss_fn=loss_fn,
        optimizer_cls=opt_cls,
        optimizer_kwargs=dict(spec.optimizer.kwargs),
        device=device,
        optimizer_name=spec.optimizer.name,
        source_files=sources,
        tensors=tensors,
        target_key=target_key,
        collate=collate,
        model_name=spec.model.factory,
        loss_name=spec.loss,
        data_name=f"data.factory {spec.data.factory!r}",
        frozen_norms=frozen_norms,
    )


def _train_mode(model: nn.Module) -> tuple[str, ...]:
    """Put ``model`` in training mode, as a training loop's ``model.train()`` does, except
    the BatchNorm layers the factory froze: in eval mode with every parameter's
    requires_grad off (fine-tuning's idiom; train() read a trial's ResNet ~10x low, through
    micro-batches of a BatchNorm it never trains). Everything else trains, also a
    wrapped from_pretrained backbone, which comes in eval mode (its dropout off, a review).
    Returns the names of the layers kept in eval mode."""
    from bsfind.torch_compat import is_batchnorm

    frozen = [(name, m) for name, m in model.named_modules()
              if is_batchnorm(m) and not m.training and list(m.parameters(recurse=False))
              and not any(p.requires_grad for p in m.parameters(recurse=False))]
    model.train()
    for _, m in frozen:
        m.eval()
    return tuple(name for name, _ in frozen)


def _build_model(spec: Spec, sources: list[Path]) -> nn.Module:
    m = call_factory(spec.model.factory, spec.model.kwargs, spec.base_dir, "model")
    if not isinstance(m.obj, nn.Module):
        is_class = isinstance(m.obj, type) and issubclass(m.obj, nn.Module)
        raise ResolutionError(  # (a trial: "returned type", for the class itself)
            f"model.factory {spec.model.factory!r} returned "
            + (f"the class {m.obj.__name__}, not an instance of it" if is_class
               else f"{type(m.obj).__name__}, not a torch.nn.Module"),
            hint=(f"return {m.obj.__name__}(...) from the factory, or name the class itself "
                  "as the factory with its arguments under model.kwargs") if is_class else None)
    model: nn.Module = m.obj
    if m.source_file:
        sources.append(m.source_file)
    if spec.model.checkpoint:
        load_checkpoint(model, spec.model.checkpoint, spec.base_dir)
        sources.append((spec.base_dir / spec.model.checkpoint).resolve())
    # every file there before anything is measured: loaded one by one later, a missing
    # last one ended a run after the first ones were measured; all missing ones at once
    missing = []
    for i, entry in enumerate(spec.model.checkpoints or ()):
        try:
            sources.append(checkpoint_file(entry.path, spec.base_dir,
                                           key=f"model.checkpoints[{i}].path"))
        except ResolutionError as exc:
            missing.append(exc)
    if len(missing) == 1:
        raise missing[0]
    if missing:
        raise ResolutionError(f"{len(missing)} of model.checkpoints cannot be read: "
                              + "; ".join(e.message for e in missing),
                              hint="fix the paths, or leave the entries out")
    if not any(p.requires_grad for p in model.parameters()):
        raise UserCodeError(
            f"model {spec.model.factory!r} has no trainable parameters "
            "(none with requires_grad=True)"
        )
    return model


def _resolve_loss(spec: Spec, sources: list[Path]) -> LossFn:
    if spec.loss in LOSSES:
        return LOSSES[spec.loss]
    if ":" in spec.loss:
        r = resolve(spec.loss, spec.base_dir, "loss")
        if not callable(r.obj):
            raise ResolutionError(f"loss {spec.loss!r} is not callable")
        if r.source_file:
            sources.append(r.source_file)
        return r.obj  # type: ignore[no-any-return]
    raise UsageError(  # a spec value, not the user's code: exit 2
        f"loss: unknown loss {spec.loss!r} ({near_name(spec.loss, LOSSES)}expected "
        f"{', '.join(LOSSES)} or 'module:attr')"
    )


def near_name(word: str, names: Iterable[str]) -> str:
    """"did you mean 'adam'? " for a misspelt built-in name, else ""."""
    import difflib

    by_lower = {n.lower(): n for n in names}
    found = difflib.get_close_matches(word.lower(), list(by_lower), n=1, cutoff=0.75)
    return f"did you mean {by_lower[found[0]]!r}? " if found else ""


def _needs_closure(opt_cls: type[torch.optim.Optimizer]) -> bool:
    """Does ``opt_cls.step`` require its closure argument (LBFGS)?"""
    try:
        param = inspect.signature(opt_cls.step).parameters.get("closure")
    except (TypeError, ValueError):
        return False
    return param is not None and param.default is inspect.Parameter.empty


def _resolve_optimizer(spec: Spec, sources: list[Path]) -> type[torch.optim.Optimizer]:
    name = spec.optimizer.name
    if name.lower() in OPTIMIZERS:
        opt_cls = OPTIMIZERS[name.lower()]
    elif ":" in name:
        r = resolve(name, spec.base_dir, "optimizer.name")
        if not (isinstance(r.obj, type) and issubclass(r.obj, torch.optim.Optimizer)):
            raise ResolutionError(
                f"optimizer.name {name!r} is not a torch.optim.Optimizer subclass"
            )
        opt_cls = r.obj
        if r.source_file:
            sources.append(r.source_file)
        if _needs_closure(opt_cls):
            raise UsageError(
                f"optimizer.name {name!r}: its step needs a closure (as LBFGS's does), which "
                "bsfind does not pass: it steps as a training loop does, optimizer.step()")
    else:
        raise UsageError(  # a spec value, not the user's code: exit 2
            f"optimizer.name: unknown optimizer {name!r} ({near_name(name, OPTIMIZERS)}"
            f"expected {', '.join(OPTIMIZERS)} or 'module:attr')"
        )
    check_kwargs(opt_cls, {"lr": spec.optimizer.lr, **spec.optimizer.kwargs},
                 "optimizer.kwargs", name, [])
    return opt_cls
