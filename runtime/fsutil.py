"""Atomic file and directory writes, and streaming checksums (stdlib only).

A reader never sees a half-written file: data goes to a temporary sibling, is flushed and fsync'ed, and is renamed
over the target with `os.replace` (atomic on POSIX and on Windows within one volume); the directory is then
fsync'ed so that the rename itself survives a power cut. A failure at any step removes the temporary and leaves
the old target untouched.

Temporaries are named `.<name>.<random>.tmp` (directories: `.<name>.<random>.tmpdir`) beside the target, so that
the final rename never crosses a filesystem, and a crash leaves a visible dot-file rather than a half-written
target. They are created with mode 0o666/0o777 minus the umask, as `open()` and `mkdir` would. A directory that
replaces another is swapped in with one renameat2(RENAME_EXCHANGE) where Linux offers it; the next directory write
of a target recovers or deletes what killed writes of it left (`atomic_dir`, `clean_leftovers`).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import re
import secrets
import shutil
import stat
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None

log = logging.getLogger(__name__)

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


# renameat2(2) flag from <linux/fs.h>: swap two existing paths in one step.
RENAME_EXCHANGE = 2
_AT_FDCWD = -100  # <fcntl.h>: relative paths are resolved against the working directory
_UNSUPPORTED = {errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP}  # kernel, libc or filesystem lacks RENAME_EXCHANGE
_renameat2: Any = None  # ctypes function, loaded on first use; False where there is none


def _load_renameat2():
    global _renameat2
    if _renameat2 is None:
        _renameat2 = False
        if sys.platform.startswith("linux"):
            import ctypes

            try:
                fn = ctypes.CDLL(None, use_errno=True).renameat2  # glibc >= 2.28, musl >= 1.2.3
            except (OSError, AttributeError):
                return False
            fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
            fn.restype = ctypes.c_int
            _renameat2 = fn
    return _renameat2


def exchange(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """Swap two existing paths atomically (Linux renameat2 RENAME_EXCHANGE): at every instant each name holds one
    of the two. Returns False, having changed nothing, where the platform, libc or filesystem cannot."""
    fn = _load_renameat2()
    if not fn:
        return False
    if fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), RENAME_EXCHANGE) == 0:
        return True
    import ctypes

    err = ctypes.get_errno()
    if err in _UNSUPPORTED:
        return False
    raise OSError(err, os.strerror(err), os.fspath(a), None, os.fspath(b))


def _leftover_pattern(final: Path) -> re.Pattern:
    # exactly the names `_sibling(final, ...)` makes for a directory write of `final`, nothing else
    return re.compile(rf"\.{re.escape(final.name)}\.[0-9a-f]{{12}}\.(tmpdir|old|del)")


def _claim(path: Path) -> int | None:
    """Lock the directory at `path` unless a live writer holds it; the fd (close it to unlock) or None.

    A writer holds an flock on its temporary directory for as long as it runs; the kernel drops the lock when the
    process dies, SIGKILL included, so an unlocked temporary is one whose writer is gone. The check after locking
    catches a writer that lost its directory to a cleaner between `mkdir` and `flock`."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    except OSError:  # gone already, or not a directory / a symlink: not ours to touch
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        if os.lstat(path).st_ino != os.fstat(fd).st_ino:
            raise OSError("renamed meanwhile")
    except OSError:
        os.close(fd)
        return None
    return fd


def clean_leftovers(final_path: str | os.PathLike) -> None:
    """Recover or remove what killed directory writes of `final_path` left beside it (see `atomic_dir`).

    An unlocked `.old` while `final_path` is missing is the previous version, complete (the writer was killed
    between its two renames): it is renamed back. Every other unlocked `.tmpdir`/`.old`, and every `.del`, is
    deleted. A no-op without `fcntl` (Windows): no lock tells a dead writer from a live one there."""
    if fcntl is None:
        return
    final = Path(final_path)
    pattern = _leftover_pattern(final)
    try:
        names = sorted(n for n in os.listdir(final.parent) if pattern.fullmatch(n))
    except OSError:
        return
    found = [final.parent / n for n in names]
    olds = [p for p in found if p.name.endswith(".old")]
    olds.sort(key=_ctime, reverse=True)  # the newest first: the one a writer moved aside last
    for path in olds + [p for p in found if not p.name.endswith(".old")]:
        if path.name.endswith(".del"):  # named only once its writer or cleaner is done with it
            shutil.rmtree(path, ignore_errors=True)
            continue
        fd = _claim(path)
        if fd is None:
            continue
        try:
            if path.name.endswith(".old") and not os.path.lexists(final):
                os.rename(path, final)
                log.warning("%s: restored the previous version from %s (a write was killed mid-swap)", final,
                            path.name)
                fsync_dir(final.parent)
                continue
            trash = _sibling(final, ".del")
            os.rename(path, trash)
        except OSError:
            continue
        finally:
            os.close(fd)
        log.info("%s: removing %s, left by a killed write", final, path.name)
        shutil.rmtree(trash, ignore_errors=True)


def _ctime(path: Path) -> float:
    try:
        return os.lstat(path).st_ctime
    except OSError:
        return 0.0


def _new_locked_tmp(final: Path) -> tuple[Path, int | None]:
    for _ in range(3):  # a retry happens only when a cleaner takes the directory between mkdir and flock
        tmp = _sibling(final, ".tmpdir")
        os.mkdir(tmp, 0o777)
        if fcntl is None:
            return tmp, None
        try:
            fd = os.open(tmp, os.O_RDONLY | os.O_DIRECTORY)
        except FileNotFoundError:
            continue
        fcntl.flock(fd, fcntl.LOCK_EX)  # waits only while a cleaner renames it away (microseconds)
        with contextlib.suppress(OSError):
            if os.lstat(tmp).st_ino == os.fstat(fd).st_ino:
                return tmp, fd
        os.close(fd)
    raise FileExistsError(f"{final}: could not create a temporary directory beside it")


def _refuse_non_dir(final: Path) -> None:
    if final.is_symlink() or (final.exists() and not final.is_dir()):
        raise FileExistsError(f"{final}: exists and is not a directory; refusing to replace it with one")


def _swap_in(tmp: Path, final: Path) -> Path | None:
    """Move the finished `tmp` to `final`; return where the replaced directory now lies (to delete), or None."""
    if not final.exists():
        os.rename(tmp, final)  # atomic; fails (ENOTEMPTY) if another writer put a directory there meanwhile
        return None
    if exchange(tmp, final):
        return tmp  # the temporary name now holds the old directory
    # Fallback: two renames, with a gap between them that `clean_leftovers` repairs after a kill.
    old = _sibling(final, ".old")
    lock = os.open(final, os.O_RDONLY | os.O_DIRECTORY) if fcntl is not None else None
    try:
        if lock is not None:
            fcntl.flock(lock, fcntl.LOCK_EX)  # a cleaner must not take our `.old` for a dead writer's
        os.rename(final, old)
        try:
            os.rename(tmp, final)
        except BaseException:
            os.rename(old, final)
            raise
        trash = _sibling(final, ".del")
        try:
            os.rename(old, trash)
        except OSError:
            trash = old
    finally:
        if lock is not None:
            os.close(lock)
    return trash


@contextlib.contextmanager
def atomic_dir(final_path: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty temporary sibling directory to fill; move it to `final_path` when the block succeeds.

        with atomic_dir("packs/tiny") as tmp:
            write_files(tmp)          # an exception here deletes tmp; packs/tiny is untouched

    On success the files are fsync'ed and the directory is moved into place. The parent of `final_path` is created
    if needed. A non-directory (or a symlink) at `final_path` is refused with `FileExistsError` before anything is
    written. Whatever kills the process (SIGKILL, power cut), `final_path` holds the old directory or the new one,
    complete:

    - no directory there yet: one `rename(tmp, final)`, atomic.
    - a directory there, on Linux (renameat2 RENAME_EXCHANGE in libc; ext4, xfs, btrfs, tmpfs, overlayfs): the two
      are swapped in one syscall, with no moment where `final_path` is missing; the old directory, now under the
      temporary name, is then deleted.
    - elsewhere (macOS, Windows, a filesystem without RENAME_EXCHANGE): the old directory is renamed aside
      (`.<name>.<random>.old`), the new one renamed in, the old one renamed to `.<name>.<random>.del` and deleted.
      Between the first two renames (microseconds) `final_path` is missing: a reader then gets "not found", never
      a mix; a kill exactly then leaves the complete old directory under its `.old` name, and the next write of
      `final_path` renames it back first (`clean_leftovers`). If the second rename fails, the old one is put back.

    Leftovers of killed writes (`.<name>.<12 hex>.tmpdir`, `.old`, `.del`, exactly those names) are recovered or
    deleted when the next write of the same `final_path` starts. A live writer is never disturbed: each writer
    holds an flock on its temporary directory (and, in the fallback, on the directory it moves aside) until it
    is done, and the kernel releases it when the process dies, so "unlocked" means "its writer is gone". An age
    threshold could not tell a dead writer from a slow one (a quantization runs for minutes). Without flock
    (Windows) nothing is cleaned.
    """
    final = Path(final_path)
    _refuse_non_dir(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    clean_leftovers(final)
    tmp, lock = _new_locked_tmp(final)
    try:
        try:
            yield tmp
            _fsync_tree(tmp)
            _refuse_non_dir(final)
            trash = _swap_in(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    finally:
        if lock is not None:
            os.close(lock)
    fsync_dir(final.parent)
    if trash is not None:
        shutil.rmtree(trash, ignore_errors=True)


def sha256_file(path: str | os.PathLike, chunk: int = CHUNK) -> str:
    """Hex sha256 of a file, read in `chunk`-byte pieces so memory stays flat for multi-GB weights."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        buf = bytearray(chunk)
        view = memoryview(buf)
        while n := f.readinto(buf):
            h.update(view[:n])
    return h.hexdigest()
