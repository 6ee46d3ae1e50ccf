"""Result cache for ``bsfind check``, and atomic file writes.

A cached result is reused only when nothing it depends on changed: the key
hashes the spec document, the bytes of the user's source files (model, data,
loss factories), a hardware fingerprint and the bsfind version. Entries live
in ``cache_dir()`` as ``<key>.json``; a corrupt or half-written entry reads as
a miss, never as a crash. Writes are atomic (temp file + fsync + rename), so a
reader never sees a partial file, even if the writer is killed.

    .venv/bin/python -m pytest tests/test_cache.py -q
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import re
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

CACHE_ENV = "BSFIND_CACHE_DIR"
# Bump when the entry layout changes: older entries then read as misses.
ENTRY_FORMAT = 1
_KEY = re.compile(r"^[0-9A-Za-z_-]{1,128}$")


def _update(h: Any, tag: bytes, payload: bytes) -> None:
    # Length-prefixed framing: no two different inputs hash the same stream.
    h.update(tag + len(payload).to_bytes(8, "big") + payload)


# Files larger than this count by their size, modification time and first and last MiB,
# not by every byte: a data file a kwarg names may be tens of gigabytes, and the key is
# computed on every check, inside its budget (a review: 17 GB hashed in about 12 s).
FULL_DIGEST_BYTES = 256 << 20


def file_digest(path: Path, chunk: int = 1 << 20, full_up_to: int = FULL_DIGEST_BYTES
                ) -> bytes:
    """sha256 of a file's bytes, read in chunks; above ``full_up_to`` bytes, of its size,
    modification time and its first and last ``chunk`` bytes."""
    h = hashlib.sha256()
    st = path.stat()
    with open(path, "rb") as f:
        if st.st_size > full_up_to:
            h.update(f"{st.st_size}:{st.st_mtime_ns}".encode())
            h.update(f.read(chunk))
            f.seek(-chunk, 2)
            h.update(f.read(chunk))
            return h.digest()
        while block := f.read(chunk):
            h.update(block)
    return h.digest()


def cache_key(
    spec_document: dict[str, Any], source_files: Iterable[Path], hardware: str, version: str
) -> str:
    """sha256 of everything a result depends on.

    Args:
        spec_document: the spec as loaded (canonicalised: sorted keys, compact
            separators; values JSON cannot hold are hashed by ``str``).
        source_files: files whose bytes count (order and duplicates do not
            matter; a missing file counts as "missing", not as an error).
        hardware: a fingerprint of the device (name, memory, driver, ...).
        version: the bsfind version (bsfind's own source files count too:
            :func:`code_digest`).

    Returns:
        64 hexadecimal characters.
    """
    h = hashlib.sha256()
    canonical = json.dumps(spec_document, sort_keys=True, separators=(",", ":"),
                           ensure_ascii=False, default=str)
    _update(h, b"spec", canonical.encode("utf-8"))
    for path in sorted({Path(p).resolve() for p in source_files}, key=str):
        _update(h, b"path", str(path).encode("utf-8"))
        try:
            _update(h, b"file", file_digest(path))
        except OSError:
            _update(h, b"missing", b"")
    _update(h, b"hardware", hardware.encode("utf-8"))
    _update(h, b"version", version.encode("utf-8"))
    _update(h, b"code", code_digest().encode("utf-8"))
    return h.hexdigest()


@functools.cache
def code_digest() -> str:
    """sha256 of bsfind's own source files: a result measured by other code is not reused
    (a review: the version alone, unchanged between commits, served an upgraded install
    the old learning-rate choice and warm-up)."""
    h = hashlib.sha256()
    root = Path(__file__).resolve().parent
    for path in sorted(root.rglob("*.py")):
        _update(h, b"path", str(path.relative_to(root)).encode("utf-8"))
        _update(h, b"file", path.read_bytes())
    return h.hexdigest()


def cache_dir() -> Path:
    """$BSFIND_CACHE_DIR, else $XDG_CACHE_HOME/bsfind, else ~/.cache/bsfind."""
    explicit = os.environ.get(CACHE_ENV)
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    if xdg:
        return Path(xdg).expanduser() / "bsfind"
    return Path.home() / ".cache" / "bsfind"


def _entry(key: str) -> Path:
    if not _KEY.match(key):
        raise ValueError(f"bad cache key {key!r}")
    return cache_dir() / f"{key}.json"


def load(key: str) -> dict[str, Any] | None:
    """The cached document for ``key``, or None (absent, unreadable, corrupt)."""
    try:
        entry = json.loads(_entry(key).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    if (
        not isinstance(entry, dict)
        or entry.get("format") != ENTRY_FORMAT
        or entry.get("key") != key
        or not isinstance(entry.get("document"), dict)
    ):
        return None
    document: dict[str, Any] = entry["document"]
    return document


def store(key: str, document: dict[str, Any]) -> Path:
    """Write ``document`` under ``key`` atomically; returns the entry's path.

    Raises:
        OSError: the cache directory cannot be written (callers may ignore it:
            a cache that cannot be written only costs a re-run).
        TypeError: the document is not JSON-serialisable.
    """
    path = _entry(key)
    text = json.dumps({"format": ENTRY_FORMAT, "key": key, "document": document}, indent=1)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, text + "\n")
    return path


def _default_mode() -> int:
    # The mode a plain open() would give a new file: 0o666 minus the umask.
    # os.umask can only be read by setting it; restore it at once.
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data`` so that readers see the old or the new
    file, never a partial one.

    The bytes go to a temp file in the same directory (same file system, so
    the rename is atomic), are fsync'ed, and the temp file is renamed over
    ``path`` with ``os.replace``. On any error the temp file is removed and
    ``path`` is left as it was. An existing file's permissions are kept; a new
    one gets the usual umask-derived mode (mkstemp would make it 0600).
    """
    path = Path(path)
    try:
        mode = path.stat().st_mode & 0o7777
    except OSError:
        mode = _default_mode()
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    # Make the rename itself durable (POSIX; not possible on Windows).
    with contextlib.suppress(OSError):
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def atomic_write_text(path: Path, text: str) -> None:
    """``atomic_write_bytes`` for UTF-8 text (newlines written as given)."""
    atomic_write_bytes(path, text.encode("utf-8"))
