"""Atomic file and directory writes, and streaming checksums (stdlib only).

A reader never sees a half-written file: data goes to a temporary sibling, is flushed and fsync'ed, and is renamed
over the target with `os.replace` (atomic on POSIX and on Windows within one volume); the directory is then
fsync'ed so that the rename itself survives a power cut. A failure at any step removes the temporary and leaves
the old target untouched.

Temporaries are named `.<name>.<random>.tmp` (directories: `.<name>.<random>.tmpdir`) beside the target, so that
the final rename never crosses a filesystem, and a crash leaves a visible dot-file rather than a half-written
target. They are created with mode 0o666/0o777 minus the umask, as `open()` and `mkdir` would.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets
import shutil
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

CHUNK = 1 << 20  # 1 MiB: large enough that hashing runs at disk speed, small enough to stay out of the way


def _sibling(path: Path, suffix: str) -> Path:
    # 48 random bits: two writers of the same target in one directory never pick the same name.
    return path.with_name(f".{path.name}.{secrets.token_hex(6)}{suffix}")


def fsync_dir(path: str | os.PathLike) -> None:
    """Make renames and creations inside `path` durable. A no-op where directories cannot be opened (Windows)."""
    if os.name != "posix":
        return
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to `path` so that `path` holds either its old content or all of `data`, never a part."""
    path = Path(path)
    tmp = _sibling(path, ".tmp")
    try:
        # O_EXCL: never follow or reuse something already at the temporary name.
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)


def atomic_write_text(path: str | os.PathLike, text: str, encoding: str = "utf-8") -> None:
    atomic_write_bytes(path, text.encode(encoding))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write `obj` as JSON (sorted keys, indent 2, trailing newline).

    The object is serialized before any file is touched, so an unserializable object (a set, a numpy array, NaN)
    raises `TypeError`/`ValueError` and leaves the old file as it was. NaN and Infinity are refused
    (`allow_nan=False`): they are not JSON, and strict readers in other languages reject them.
    """
    text = json.dumps(obj, sort_keys=True, indent=2, ensure_ascii=False, allow_nan=False) + "\n"
    atomic_write_text(path, text)


def _fsync_tree(root: Path) -> None:
    """fsync every regular file under `root`, then every directory, deepest first.

    Files written by other code (an exporter writing `decoder.onnx` directly) may still sit in the page cache;
    renaming the directory into place before they reach the disk could leave, after a power cut, a pack whose
    name is final but whose files are empty.
    """
    if os.name != "posix":
        return
    for dirpath, _dirnames, filenames in os.walk(root, topdown=False):
        for name in filenames:
            p = os.path.join(dirpath, name)
            if stat.S_ISREG(os.lstat(p).st_mode):
                fd = os.open(p, os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
        fsync_dir(dirpath)


@contextlib.contextmanager
def atomic_dir(final_path: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty temporary sibling directory to fill; move it to `final_path` when the block succeeds.

        with atomic_dir("packs/tiny") as tmp:
            write_files(tmp)          # an exception here deletes tmp; packs/tiny is untouched

    On success the files are fsync'ed and the directory is renamed into place. The parent of `final_path` is
    created if needed. If a directory already exists at `final_path` it is replaced: the old one is renamed
    aside (`.<name>.<random>.old`), the new one renamed in, then the old one deleted. Between those two renames
    (two syscalls, microseconds) `final_path` does not exist: a reader opening it then gets "not found", never a
    mix of old and new files; a crash exactly then leaves the old directory under its `.old` name and the new one
    under its `.tmpdir` name, both complete. (POSIX has no portable atomic directory swap; Linux's
    renameat2(RENAME_EXCHANGE) is not in the standard library.) If the final rename fails, the old directory is
    put back. A non-directory at `final_path` is refused with `FileExistsError` before anything is written.
    """
    final = Path(final_path)
    if final.is_symlink() or (final.exists() and not final.is_dir()):
        raise FileExistsError(f"{final}: exists and is not a directory; refusing to replace it with one")
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = _sibling(final, ".tmpdir")
    os.mkdir(tmp, 0o777)
    old: Path | None = None
    try:
        yield tmp
        _fsync_tree(tmp)
        if final.is_symlink() or (final.exists() and not final.is_dir()):
            raise FileExistsError(f"{final}: exists and is not a directory; refusing to replace it with one")
        if final.exists():
            old = _sibling(final, ".old")
            os.rename(final, old)
        try:
            os.rename(tmp, final)
        except BaseException:
            if old is not None:
                os.rename(old, final)
            raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    fsync_dir(final.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def sha256_file(path: str | os.PathLike, chunk: int = CHUNK) -> str:
    """Hex sha256 of a file, read in `chunk`-byte pieces so memory stays flat for multi-GB weights."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        buf = bytearray(chunk)
        view = memoryview(buf)
        while n := f.readinto(buf):
            h.update(view[:n])
    return h.hexdigest()
