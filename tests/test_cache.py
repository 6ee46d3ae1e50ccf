"""The result cache: keys, round trips, corrupt entries, atomic writes."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from bsfind import cache


def spec_in(folder: Path, *overrides: str):  # type: ignore[no-untyped-def]
    """The digits-mlp config written to ``folder``, loaded with a model factory of the
    user's (``model.kwargs`` emptied) and ``overrides``."""
    from bsfind.spec import load_spec
    from tests.conftest import CONFIGS

    (folder / "spec.yaml").write_text((CONFIGS / "digits-mlp.yaml").read_text())
    return load_spec(folder / "spec.yaml", ["model.kwargs={}", *overrides])


@pytest.fixture
def cache_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    d = tmp_path / "cache"
    monkeypatch.setenv("BSFIND_CACHE_DIR", str(d))
    return d


SPEC = {"model": {"factory": "model.py:net", "kwargs": {"width": 32}},
        "optimizer": {"lr": 1e-3, "batch_size": 64}}


def _key(src: list[Path], spec: dict | None = None, hw: str = "cpu", ver: str = "0.1.0") -> str:
    return cache.cache_key(spec if spec is not None else SPEC, src, hw, ver)


def test_key_is_stable_and_canonical(tmp_path: Path) -> None:
    src = tmp_path / "model.py"
    src.write_text("def net(): ...\n")
    k = _key([src])
    assert len(k) == 64 and int(k, 16) >= 0
    # Key order in the spec and order/duplicates of files do not matter.
    reordered = {"optimizer": {"batch_size": 64, "lr": 1e-3},
                 "model": {"kwargs": {"width": 32}, "factory": "model.py:net"}}
    other = tmp_path / "data.py"
    other.write_text("x = 1\n")
    assert _key([src], reordered) == k
    assert _key([src, other]) == _key([other, src, other])


def test_key_changes_with_every_input(tmp_path: Path) -> None:
    src = tmp_path / "model.py"
    src.write_text("def net(): ...\n")
    k = _key([src])
    assert _key([src], {**SPEC, "optimizer": {"lr": 2e-3, "batch_size": 64}}) != k
    assert _key([src], hw="cuda:NVIDIA H100") != k
    assert _key([src], ver="0.2.0") != k
    assert _key([]) != k
    src.write_text("def net(): return 1\n")  # a changed source file -> a new key
    assert _key([src]) != k
    src.unlink()  # a missing file is hashed as missing, not an error
    assert _key([src]) not in (k, _key([]))


def test_cache_dir_precedence(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("BSFIND_CACHE_DIR", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache.cache_dir() == tmp_path / "home" / ".cache" / "bsfind"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache.cache_dir() == tmp_path / "xdg" / "bsfind"
    monkeypatch.setenv("BSFIND_CACHE_DIR", str(tmp_path / "mine"))
    assert cache.cache_dir() == tmp_path / "mine"


def test_round_trip(cache_home: Path) -> None:
    doc = {"recommendation": {"batch_size": 632, "learning_rate": 0.77}, "ci": [1.0, None]}
    key = "a" * 64
    assert cache.load(key) is None
    path = cache.store(key, doc)
    assert path.parent == cache_home and path.exists()
    assert cache.load(key) == doc
    cache.store(key, {"replaced": True})
    assert cache.load(key) == {"replaced": True}


@pytest.mark.parametrize("content", [
    b"",
    b'{"format": 1, "key": "',  # a half-written entry
    b"\xff\xfe not utf-8",
    b"[1, 2, 3]",
    b'{"format": 1, "key": "someone-else", "document": {}}',
    b'{"format": 999, "key": "KEY", "document": {}}',
    b'{"format": 1, "key": "KEY", "document": [1]}',
])
def test_corrupt_entry_reads_as_miss(cache_home: Path, content: bytes) -> None:
    key = "b" * 64
    cache_home.mkdir(parents=True)
    (cache_home / f"{key}.json").write_bytes(content.replace(b"KEY", key.encode()))
    assert cache.load(key) is None


def test_unreadable_entry_reads_as_miss(cache_home: Path) -> None:
    key = "c" * 64
    (cache_home / f"{key}.json").mkdir(parents=True)  # a directory where the file should be
    assert cache.load(key) is None


def test_bad_key_rejected(cache_home: Path) -> None:
    with pytest.raises(ValueError):
        cache.store("../escape", {})


def _leftovers(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir() if p.name.endswith(".tmp"))


def test_atomic_write_replaces_and_leaves_no_temp(tmp_path: Path) -> None:
    target = tmp_path / "out.yaml"
    cache.atomic_write_text(target, "first\n")
    cache.atomic_write_text(target, "second\n")
    assert target.read_text() == "second\n"
    assert _leftovers(tmp_path) == []
    assert [p.name for p in tmp_path.iterdir()] == ["out.yaml"]
    # A new file gets the umask mode, not mkstemp's 0600.
    mask = os.umask(0o022)
    os.umask(mask)
    assert stat.S_IMODE(target.stat().st_mode) == 0o666 & ~mask


def test_atomic_write_keeps_existing_mode(tmp_path: Path) -> None:
    target = tmp_path / "script.sh"
    target.write_text("old")
    target.chmod(0o750)
    cache.atomic_write_text(target, "new")
    assert stat.S_IMODE(target.stat().st_mode) == 0o750


@pytest.mark.parametrize("fail_at", ["fsync", "replace"])
def test_failure_mid_write_leaves_old_file_and_no_temp(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fail_at: str
) -> None:
    target = tmp_path / "result.json"
    target.write_text('{"old": true}')
    seen: list[str] = []

    def boom(*args: object) -> None:
        # By now half the new bytes sit in the temp file: it must never surface.
        seen.extend(_leftovers(tmp_path))
        raise OSError("disk full")

    monkeypatch.setattr(os, fail_at, boom)
    with pytest.raises(OSError, match="disk full"):
        cache.atomic_write_text(target, '{"new": true, "padding": "' + "x" * 100_000 + '"}')
    monkeypatch.undo()
    assert seen, "the failure was injected after the temp file was written"
    assert target.read_text() == '{"old": true}'
    assert _leftovers(tmp_path) == []


def test_interrupted_store_is_a_miss_not_a_half_entry(
    cache_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    key = "d" * 64

    def interrupted(*args: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        cache.store(key, {"x": 1})
    monkeypatch.undo()
    assert cache.load(key) is None
    assert list(cache_home.iterdir()) == []


def test_the_cache_key_covers_every_checkpoint_file(tmp_path: Path) -> None:
    """model.checkpoints' files (and a save_pretrained folder's weights) count: rewriting
    the second of two checkpoints gives a new key; hashed in chunks."""
    import torch

    from bsfind.api import cache_key
    from bsfind.spec import load_spec
    from tests.conftest import CONFIGS

    (tmp_path / "spec.yaml").write_text((CONFIGS / "digits-mlp.yaml").read_text())
    torch.save({"w": torch.zeros(3)}, tmp_path / "a.pt")
    torch.save({"w": torch.zeros(3)}, tmp_path / "b.pt")
    (tmp_path / "hf").mkdir()
    torch.save({"w": torch.zeros(3)}, tmp_path / "hf" / "pytorch_model.bin")
    spec = load_spec(tmp_path / "spec.yaml", [
        "model.checkpoints=[{path: a.pt, step: 0}, {path: b.pt, step: 20}]"])
    pinned = load_spec(tmp_path / "spec.yaml", ["model.checkpoint=hf"])
    before, before_hf = cache_key(spec), cache_key(pinned)
    torch.save({"w": torch.ones(3)}, tmp_path / "b.pt")
    torch.save({"w": torch.ones(3)}, tmp_path / "hf" / "pytorch_model.bin")
    assert cache_key(spec) != before and cache_key(pinned) != before_hf
    import hashlib

    from bsfind.cache import file_digest

    data = (tmp_path / "b.pt").read_bytes()
    assert file_digest(tmp_path / "b.pt", chunk=7) == hashlib.sha256(data).digest()
    # above the full-digest size: the size, the time and both ends count, not the middle
    import os

    big = tmp_path / "big.bin"
    big.write_bytes(b"a" * 100 + b"m" * 100 + b"z" * 100)
    first = file_digest(big, chunk=50, full_up_to=200)
    assert first != hashlib.sha256(big.read_bytes()).digest()
    stat = big.stat()
    big.write_bytes(b"a" * 100 + b"M" * 100 + b"z" * 100)  # the middle only, same time
    os.utime(big, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert file_digest(big, chunk=50, full_up_to=200) == first
    big.write_bytes(b"A" + b"a" * 99 + b"m" * 100 + b"z" * 100)  # an end
    os.utime(big, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    second = file_digest(big, chunk=50, full_up_to=200)
    assert second != first
    os.utime(big, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1))  # the time alone
    assert file_digest(big, chunk=50, full_up_to=200) != second


def test_the_cache_key_covers_the_files_factories_kwargs_name(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A data file named in data.kwargs (nested too), beside the spec or from the current
    folder, counts: editing it gives a new key (a new user's edited CSV kept the stale
    result); a string that names no file, or a folder, changes nothing."""
    from bsfind.api import cache_key
    from bsfind.spec import load_spec
    from tests.conftest import CONFIGS

    (tmp_path / "spec.yaml").write_text((CONFIGS / "digits-mlp.yaml").read_text())
    (tmp_path / "rows.csv").write_text("1,2\n")
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    (elsewhere / "extra.csv").write_text("3\n")
    monkeypatch.chdir(elsewhere)
    spec = load_spec(tmp_path / "spec.yaml", [
        "data.kwargs={files: [rows.csv, {more: extra.csv}], mode: fast, folder: cwd}"])
    first = cache_key(spec)
    (tmp_path / "rows.csv").write_text("1,3\n")  # beside the spec
    second = cache_key(spec)
    (elsewhere / "extra.csv").write_text("4\n")  # from the current folder
    third = cache_key(spec)
    (elsewhere / "other.txt").write_text("x")  # named nowhere
    assert len({first, second, third}) == 3 and cache_key(spec) == third


def test_the_cache_key_covers_what_a_factory_file_imports(tmp_path: Path) -> None:
    """A factory file's neighbour (`from helper_cache_t import WIDTH`) counts: editing it
    gives a new key (a new user's `bsfind check` returned the old model's cached answer);
    an installed package's files do not count."""
    from bsfind.api import cache_key
    from bsfind.spec import load_spec
    from tests.conftest import CONFIGS

    (tmp_path / "helper_cache_t.py").write_text("WIDTH = 64\n")
    (tmp_path / "fac.py").write_text(
        "from helper_cache_t import WIDTH\nimport yaml\n"
        "from bsfind.models import mlp\n\n"
        "def model():\n    return mlp(64, WIDTH, 1, 10)\n")
    (tmp_path / "spec.yaml").write_text((CONFIGS / "digits-mlp.yaml").read_text())
    spec = load_spec(tmp_path / "spec.yaml", ["model.factory=fac.py:model",
                                              "model.kwargs={}"])
    before = cache_key(spec)
    assert cache_key(spec) == before
    (tmp_path / "helper_cache_t.py").write_text("WIDTH = 8\n")
    changed = cache_key(spec)
    assert changed != before
    # what the process imported meanwhile does not move the key (bsfind's own modules,
    # the standard library), nor does the file's folder on the import path shadow them
    import colorsys  # noqa: F401
    import wave  # noqa: F401

    import bsfind.plot  # noqa: F401

    assert cache_key(spec) == changed


def test_a_helper_is_read_afresh_by_each_build(tmp_path: Path) -> None:
    """Two specs whose factory files import a same-named helper, and an edit between two
    builds in one process: each build gets the helper as it is on disk (before, the first
    import stood, and check cached its result under the edited file's key)."""
    from bsfind.spec import load_spec
    from bsfind.workload import build
    from tests.conftest import CONFIGS

    def spec_in(folder: Path, width: int):  # type: ignore[no-untyped-def]
        folder.mkdir()
        (folder / "helper_t2.py").write_text(f"WIDTH = {width}\n")
        (folder / "fac.py").write_text("from helper_t2 import WIDTH\n"
                                       "from bsfind.models import mlp\n\n"
                                       "def model():\n    return mlp(64, WIDTH, 1, 10)\n")
        (folder / "spec.yaml").write_text((CONFIGS / "digits-mlp.yaml").read_text())
        return load_spec(folder / "spec.yaml", ["model.factory=fac.py:model",
                                                "model.kwargs={}"])

    def width(spec) -> int:  # type: ignore[no-untyped-def]
        return build(spec).model[0].out_features

    a, b = spec_in(tmp_path / "a", 4), spec_in(tmp_path / "b", 16)
    assert (width(a), width(b)) == (4, 16)
    (tmp_path / "a" / "helper_t2.py").write_text("WIDTH = 32\n")
    assert width(a) == 32
    # the same size, at once (a .pyc checked by whole seconds and size would pass)
    (tmp_path / "a" / "helper_t2.py").write_text("WIDTH = 64\n")
    assert width(a) == 64
    import sys

    assert str(tmp_path / "a") not in sys.path[:1]  # not first: nothing is shadowed


def test_an_unchanged_helper_is_imported_once(tmp_path: Path) -> None:
    """check runs the cache key, then the build: a helper whose import registers a torch
    op namespace (which fails the second time) is imported once, and a model built
    before is still an instance of the live module's class (it pickles)."""
    import io

    import torch

    from bsfind.api import cache_key
    from bsfind.workload import build

    (tmp_path / "ops_t3.py").write_text(
        "import torch\nlib = torch.library.Library('bsfind_test_ops_t3', 'DEF')\n"
        "lib.define('twice(Tensor x) -> Tensor')\n")
    (tmp_path / "net_t3.py").write_text(
        "from torch import nn\n\nclass Net(nn.Sequential):\n    pass\n")
    (tmp_path / "fac.py").write_text(
        "import ops_t3\nfrom net_t3 import Net\nfrom torch import nn\n\n"
        "def model():\n    return Net(nn.Linear(64, 10))\n")
    spec = spec_in(tmp_path, "model.factory=fac.py:model")
    cache_key(spec)
    job = build(spec)
    cache_key(spec)
    build(spec)
    import sys

    assert isinstance(job.model, sys.modules["net_t3"].Net)
    torch.save(job.model, io.BytesIO())


def test_the_key_and_the_build_follow_a_helpers_helper_and_a_packages_module(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """fac.py imports a_t4, which imports b_t4; a "pkg_t4.models:model" factory imports
    pkg_t4.layers. Editing b_t4 or pkg_t4/layers.py moves the key and reaches the next
    build in the same process (a review: the importer kept the old objects, and a
    module-ref factory's helpers were not in the key)."""
    from bsfind.api import cache_key
    from bsfind.workload import build

    (tmp_path / "b_t4.py").write_text("WIDTH = 4\n")
    (tmp_path / "a_t4.py").write_text("from b_t4 import WIDTH\n")
    (tmp_path / "fac.py").write_text("from a_t4 import WIDTH\nfrom bsfind.models import mlp"
                                     "\n\ndef model():\n    return mlp(64, WIDTH, 1, 10)\n")
    pkg = tmp_path / "lib" / "pkg_t4"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "layers.py").write_text("WIDTH = 6\n")
    (pkg / "models.py").write_text("from pkg_t4.layers import WIDTH\nfrom bsfind.models "
                                   "import mlp\n\ndef model():\n    return mlp(64, WIDTH, 1, "
                                   "10)\n")
    monkeypatch.syspath_prepend(str(tmp_path / "lib"))
    by_file = spec_in(tmp_path, "model.factory=fac.py:model")
    by_module = spec_in(tmp_path, "model.factory=pkg_t4.models:model")
    keys = cache_key(by_file), cache_key(by_module)
    assert build(by_file).model[0].out_features == 4
    (tmp_path / "b_t4.py").write_text("WIDTH = 8\n")
    (pkg / "layers.py").write_text("WIDTH = 9\n")
    assert cache_key(by_file) != keys[0] and cache_key(by_module) != keys[1]
    assert build(by_file).model[0].out_features == 8


def test_a_same_named_file_elsewhere_leaves_the_helper_alone(tmp_path: Path) -> None:
    """The loss file's folder holds an unused layers_t5.py: the model's helper of that
    name, which registers an op namespace, stays the one imported (a review: it was
    dropped, so the next import failed and the model stopped pickling); a factory file
    that registers one itself is run once while unchanged."""
    import io

    import torch

    from bsfind.api import cache_key
    from bsfind.workload import build

    (tmp_path / "layers_t5.py").write_text(
        "import torch\nfrom torch import nn\n"
        "lib = torch.library.Library('bsfind_test_ops_t5', 'DEF')\n"
        "class Net(nn.Sequential):\n    pass\n")
    (tmp_path / "fac.py").write_text(
        "import torch\nfrom layers_t5 import Net\nfrom torch import nn\n"
        "lib = torch.library.Library('bsfind_test_ops_t5f', 'DEF')\n\n"
        "def model():\n    return Net(nn.Linear(64, 10))\n")
    (tmp_path / "extra").mkdir()
    (tmp_path / "extra" / "layers_t5.py").write_text("raise RuntimeError('not this one')\n")
    (tmp_path / "extra" / "loss.py").write_text(
        "import torch.nn.functional as F\n\ndef fn(out, y):\n"
        "    return F.cross_entropy(out, y)\n")
    spec = spec_in(tmp_path, "model.factory=fac.py:model", "loss=extra/loss.py:fn")
    job = build(spec)
    cache_key(spec)
    build(spec)
    torch.save(job.model, io.BytesIO())


def test_an_edit_reaches_every_factory_file_that_imported_it(tmp_path: Path) -> None:
    """The data factory in b/ imports a/common.py (a/ is on the import path after the
    model factory's import); editing common reaches both factories in the next build
    (a review: the data factory, in another folder, kept the old value while the model
    took the new)."""
    from bsfind.workload import build

    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    (tmp_path / "a" / "common_t6.py").write_text("N = 40\n")
    (tmp_path / "a" / "fac.py").write_text(
        "from common_t6 import N\nfrom bsfind.models import mlp\n\n"
        "def model():\n    return mlp(64, N, 1, 10)\n")
    (tmp_path / "b" / "dat.py").write_text(
        "from common_t6 import N\nfrom torch.utils.data import Subset\n"
        "from bsfind.data import digits\n\ndef data():\n    return Subset(digits(), range(N))\n")
    spec = spec_in(tmp_path, "model.factory=a/fac.py:model", "data.factory=b/dat.py:data")
    job = build(spec)
    assert (job.model[0].out_features, len(job)) == (40, 40)
    (tmp_path / "a" / "common_t6.py").write_text("N = 24\n")
    job = build(spec)
    assert (job.model[0].out_features, len(job)) == (24, 24)


def test_the_key_hashes_a_factory_files_own_folder_first(tmp_path: Path) -> None:
    """Past the file limit, the files cut are the deepest, not the factory's own
    neighbours (a review: a vendored tree of 2,100 files sorted first and pushed
    layers.py out of the key)."""
    from bsfind.workload import source_files_under

    (tmp_path / "layers.py").write_text("W = 1\n")
    (tmp_path / "model.py").write_text("from layers import W\n")
    vendored = tmp_path / "apex"
    vendored.mkdir()
    for i in range(30):
        (vendored / f"m{i:03d}.py").write_text("")
    found = source_files_under(tmp_path, limit=20)
    assert len(found) == 20 and {tmp_path / "layers.py", tmp_path / "model.py"} <= set(found)


def test_bsfind_code_counts_in_the_key(monkeypatch: pytest.MonkeyPatch) -> None:
    """A review: the version alone (0.1.0 across commits) let an upgraded bsfind serve
    results its old code measured."""
    digest = cache.code_digest()
    assert len(digest) == 64 and int(digest, 16) >= 0 and digest == cache.code_digest()
    before = _key([])
    monkeypatch.setattr(cache, "code_digest", lambda: "0" * 64)
    assert _key([]) != before
