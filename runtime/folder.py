"""Versioned folders: the one toolkit for directories that retrv writes and later trusts (indexes today; packs and
token caches move onto it with the architecture work).

A versioned folder is a directory with one JSON *manifest* that is written last (temp file + rename) and that
names every other file with its size and sha256. The toolkit gives each such format the same five pieces:

    read_manifest(path, ...)      a capped, UTF-8, strict JSON object, or a one-line error naming the file
    check_version(...)            the version gate: a newer writer's folder is refused with "upgrade retrv-edge"
    member(root, name, ...)       a relative POSIX name inside `root`, no `..`, no symlink in any component,
                                  a regular file: anything else is refused before it is opened
    describe(root, name)          {"bytes", "sha256"} of one file, for the manifest's file table
    verify_files(root, table)     sizes first (cheap: a truncated file is reported before GBs are hashed), then
                                  every sha256
    WriterLock(root)              one writer at a time per folder, across threads and processes (flock)

Every error is raised as the caller's `RetrvError` subclass, so a pack reports `PackError` and an index
`IndexFileError`, each as one line.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import stat
import threading
import time
from collections.abc import Iterator, Mapping
from pathlib import Path, PurePosixPath
from typing import Any

from retrv.runtime.errors import RetrvError
from retrv.runtime.fsutil import sha256_file

logger = logging.getLogger(__name__)
_SHA_RE = re.compile(r"[0-9a-f]{64}")
LOCK_NAME = ".lock"
LOCK_TIMEOUT_S = 600.0  # a writer waits this long for another one (an index update of a large corpus) before failing


def one_line(msg: Any) -> str:
    """Messages are printed as one line by the CLI, and may quote untrusted JSON."""
    return " ".join(str(msg).split())


def _err(cls: type[RetrvError], msg: str) -> RetrvError:
    return cls(one_line(msg))


def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)  # `true` is no size


def read_manifest(path: Path, error: type[RetrvError], max_bytes: int, what: str, symlink_ok: bool = False) -> dict:
    """The JSON object in `path`, refused (as `error`, one line) unless it is a regular file that is not a symlink
    (`symlink_ok`: the caller has checked where it points), at most `max_bytes`, UTF-8, strict JSON (no
    NaN/Infinity) and an object."""
    try:
        st = os.stat(path) if symlink_ok else os.lstat(path)
    except FileNotFoundError:
        raise _err(error, f"{path}: file not found; expected {what}") from None
    except OSError as e:
        raise _err(error, f"{path}: cannot be read ({e.strerror or e}); expected {what}") from None
    if stat.S_ISLNK(st.st_mode):
        raise _err(error, f"{path}: is a symlink; expected {what} as a regular file inside the folder")
    if not stat.S_ISREG(st.st_mode):
        raise _err(error, f"{path}: not a regular file; expected {what}")
    if st.st_size > max_bytes:
        raise _err(error, f"{path}: {st.st_size} bytes; expected {what} of at most {max_bytes} bytes")
    try:
        with open(path, "rb") as f:
            raw = f.read(min(st.st_size, max_bytes) + 1)  # sized to the file: no max_bytes buffer for a 1 KB file
    except OSError as e:
        raise _err(error, f"{path}: cannot be read ({e.strerror or e}); expected {what}") from None

    def no_constant(c: str) -> float:
        raise ValueError(f"{c} is not JSON")

    try:
        data = json.loads(raw.decode("utf-8"), parse_constant=no_constant)
    except UnicodeDecodeError:
        raise _err(error, f"{path}: not UTF-8 text; expected {what} (JSON)") from None
    except json.JSONDecodeError as e:
        raise _err(error, f"{path}: not valid JSON ({e.msg} at line {e.lineno} column {e.colno}); "
                          f"expected {what}") from None
    except (ValueError, RecursionError) as e:
        raise _err(error, f"{path}: not valid JSON ({type(e).__name__}: {e}); expected {what}") from None
    if not isinstance(data, dict):
        raise _err(error, f"{path}: got a JSON {type(data).__name__}; expected an object ({what})")
    return data


def check_version(where: Any, value: Any, current: int, error: type[RetrvError], oldest: int = 1,
                  older_hint: str = "") -> int:
    """`value` must be an integer in [oldest, current]. Newer: upgrade retrv-edge. Older: `older_hint` says what to
    do (e.g. rebuild), since this reader no longer reads it. `where` prefixes the message (None: no prefix)."""
    at = f"{where}: " if where else ""
    if not is_int(value) or value < 1:
        raise _err(error, f"{at}format_version: got {value!r}; expected an integer from {oldest} to {current}")
    if value > current:
        raise _err(error, f"{at}format_version {value} is newer than this retrv-edge supports ({current}); "
                          f"upgrade retrv-edge")
    if value < oldest:
        raise _err(error, f"{at}format_version {value} is older than this retrv-edge reads ({oldest} to "
                          f"{current}){'; ' + older_hint if older_hint else ''}")
    return value


def check_name(name: Any, error: type[RetrvError], where: str = "file name", folder: str = "folder",
               example: str = "a/b.bin") -> str:
    """A relative, normalized POSIX path: no absolute path, drive, backslash, NUL, `.`/`..` or empty component."""
    if not isinstance(name, str) or not name or "\x00" in name or "\\" in name:
        raise _err(error, f"{where} {name!r}: expected a non-empty relative path inside the {folder}")
    if PurePosixPath(name).is_absolute() or re.match(r"^[A-Za-z]:", name):
        raise _err(error, f"{where} {name!r}: absolute path escapes the {folder}; expected a relative path")
    if any(part in ("", ".", "..") for part in name.split("/")):
        raise _err(error, f"{where} {name!r}: escapes the {folder} or is not normalized; expected e.g. '{example}'")
    return name


def member(root: Path, name: str, error: type[RetrvError], kind: str = "file", symlinks: str = "refuse",
           folder: str = "folder") -> Path:
    """`root/name`, refused unless every component below `root` exists and is not a symlink, and the last is a
    regular file (kind="file") or a directory (kind="dir"). A symlink anywhere could point outside the folder.

    `symlinks="inside"` (packs: a user may deduplicate files with links) accepts symlinks whose target, fully
    resolved, is inside `root` (itself resolved), and returns the resolved path."""
    check_name(name, error, folder=folder)
    if symlinks == "inside":
        return _resolved_member(root, name, error, kind, folder)
    path = root
    parts = name.split("/")
    for i, part in enumerate(parts):
        path = path / part
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            raise _err(error, f"{path}: not found; expected it (listed in the folder's manifest)") from None
        except OSError as e:
            raise _err(error, f"{path}: cannot be read ({e.strerror or e})") from None
        if stat.S_ISLNK(st.st_mode):
            raise _err(error, f"{path}: is a symlink; expected a regular {kind} inside {root} (symlinks are "
                              f"refused: they can point anywhere)")
        last = i == len(parts) - 1
        want_dir = not last or kind == "dir"
        if want_dir and not stat.S_ISDIR(st.st_mode):
            raise _err(error, f"{path}: not a directory; expected one")
        if not want_dir and not stat.S_ISREG(st.st_mode):  # a FIFO or device would block or never end when hashed
            raise _err(error, f"{path}: not a regular file; expected a file of the folder")
    return path


def _resolved_member(root: Path, name: str, error: type[RetrvError], kind: str, folder: str) -> Path:
    real_root = Path(os.path.realpath(root))
    path = root / name
    real = Path(os.path.realpath(path))
    if real != real_root and real_root not in real.parents:
        raise _err(error, f"{path}: resolves to {real}, outside the {folder}; expected a {kind} inside {real_root}")
    try:
        st = os.stat(real)
    except FileNotFoundError:
        raise _err(error, f"{path}: file not found; expected it (listed in the {folder}'s manifest)") from None
    except OSError as e:
        raise _err(error, f"{path}: cannot be read ({e.strerror or e})") from None
    if kind == "file" and not stat.S_ISREG(st.st_mode):  # a FIFO or device would block or never end when hashed
        raise _err(error, f"{path}: not a regular file; expected a file of the {folder}")
    if kind == "dir" and not stat.S_ISDIR(st.st_mode):
        raise _err(error, f"{path}: not a directory; expected one")
    return real


def describe(root: Path, name: str) -> dict:
    """The manifest entry of one file: {"bytes", "sha256"}."""
    p = root / name
    return {"bytes": p.stat().st_size, "sha256": sha256_file(p)}


def check_table(where: Any, table: Any, error: type[RetrvError]) -> dict[str, dict]:
    """A manifest's file table: {name: {"bytes": int >= 0, "sha256": 64 hex}}."""
    if not isinstance(table, dict):
        raise _err(error, f"{where}: files is {type(table).__name__}; expected an object name -> {{bytes, sha256}}")
    for name, entry in table.items():
        check_name(name, error, f"{where}: file name")
        if not isinstance(entry, dict) or set(entry) != {"bytes", "sha256"} or not is_int(entry["bytes"]) \
                or entry["bytes"] < 0 or not isinstance(entry["sha256"], str) or not _SHA_RE.fullmatch(entry["sha256"]):
            raise _err(error, f"{where}: files[{name!r}] is {entry!r}; expected {{'bytes': int >= 0, "
                              f"'sha256': 64 hex digits}}")
    return table


def verify_files(root: Path, table: Mapping[str, Mapping], error: type[RetrvError], verify: str = "full",
                 symlinks: str = "refuse", folder: str = "folder") -> dict[str, Path]:
    """Every listed file exists inside `root` (no symlinks, or only symlinks inside with `symlinks="inside"`), has
    its size, and (verify="full") its sha256; sizes first, so a truncated file is reported before GBs are hashed.
    `table`: name -> {"bytes", "sha256"} (a mapping, or an object with those attributes). Returns name -> path."""
    paths = {}
    for name, entry in table.items():
        entry = _entry(entry)
        p = member(root, name, error, symlinks=symlinks, folder=folder)
        size = os.stat(p).st_size
        if size != entry["bytes"]:
            raise _err(error, f"{root / name}: {size} bytes; expected {entry['bytes']} (truncated or modified file)")
        paths[name] = p
    if verify == "full":
        for name, entry in table.items():
            entry = _entry(entry)
            logger.info("verifying %s (%d bytes)", name, entry["bytes"])
            try:
                digest = sha256_file(paths[name])
            except OSError as e:
                raise _err(error, f"{paths[name]}: cannot be read ({e.strerror or e})") from None
            if digest != entry["sha256"]:
                raise _err(error, f"{root / name}: sha256 {digest}; expected {entry['sha256']} (modified file)")
    return paths


def _entry(entry: Any) -> Mapping:
    return entry if isinstance(entry, Mapping) else {"bytes": entry.bytes, "sha256": entry.sha256}


# ---------------------------------------------------------------------------------------------- one writer

_THREAD_LOCKS: dict[str, threading.Lock] = {}
_THREAD_LOCKS_GUARD = threading.Lock()


class WriterLock:
    """One writer per folder: a per-process `threading.Lock` (flock does not exclude two threads that share an
    open file description, and the lock must not depend on how callers open it) plus `flock` on `root/.lock`
    (other processes; released by the kernel when a writer dies, so a kill -9 never leaves a stale lock).

        with WriterLock(index_dir, error=IndexFileError):
            ...   # read the committed state, write the next one, commit

    Waits up to `timeout` seconds, then raises `error`. Not reentrant.
    """

    def __init__(self, root: Path, error: type[RetrvError], timeout: float = LOCK_TIMEOUT_S) -> None:
        self.root, self.error, self.timeout = Path(root), error, timeout
        key = os.path.realpath(self.root)
        with _THREAD_LOCKS_GUARD:
            self._tlock = _THREAD_LOCKS.setdefault(key, threading.Lock())
        self._fd: int | None = None

    def __enter__(self) -> "WriterLock":
        if not self._tlock.acquire(timeout=self.timeout):
            raise _err(self.error, f"{self.root}: another writer in this process held it for {self.timeout:.0f} s; "
                                   f"expected one writer at a time")
        try:
            self._fd = self._flock()
        except BaseException:
            self._tlock.release()
            raise
        return self

    def _flock(self) -> int | None:
        try:
            import fcntl
        except ImportError:  # Windows: the in-process lock only; one writing process at a time is the caller's
            return None
        try:
            fd = os.open(self.root / LOCK_NAME, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o666)
        except OSError as e:
            raise _err(self.error, f"{self.root / LOCK_NAME}: cannot be opened ({e.strerror or e}); expected a "
                                   f"writable folder") from None
        deadline = time.monotonic() + self.timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return fd
            except OSError:
                if time.monotonic() > deadline:
                    os.close(fd)
                    raise _err(self.error, f"{self.root / LOCK_NAME}: held by another process for "
                                           f"{self.timeout:.0f} s; expected one writer at a time") from None
                time.sleep(0.01)

    def __exit__(self, *exc: Any) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            with contextlib.suppress(OSError):
                os.close(fd)  # releases the flock
        self._tlock.release()


@contextlib.contextmanager
def writer_lock(root: Path, error: type[RetrvError]) -> Iterator[None]:
    with WriterLock(root, error):
        yield
