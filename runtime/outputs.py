"""Refuse an output path that would replace something the user did not mean to replace (stdlib only).

Every command that writes a folder (`retrv export`, `retrv quantize`, `retrv index build`, training, the tiny
checkpoint writer) calls `check_output` before any work starts: the folder it writes is replaced as a whole
(`fsutil.atomic_dir`), so a wrong path would otherwise delete a checkpoint, an index or a folder of documents.

Allowed: a path that does not exist yet (its parent is created), an empty folder, and a folder of the same kind
(a pack over a pack, an index over an index: the replacement stays atomic). Refused, with one line naming the path
and what was expected: an empty path, a path that is one of the command's inputs or lies inside one or contains
one, anything that is not a directory (a file, a symlink), a folder of another kind, a non-empty folder of no
known kind, and a path whose parent cannot be created or written.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path

from retrv.runtime.errors import InputError

KINDS = ("pack", "index", "checkpoint", "token-cache")
MAX_PROBE_BYTES = 1 << 20  # a pack manifest is a few KB; larger is not one we wrote, and is not read further


def _is_pack_manifest(path: Path) -> bool:
    """A JSON object with the two fields every pack manifest has. Read at most MAX_PROBE_BYTES; never hashes."""
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_PROBE_BYTES + 1)
        if len(raw) > MAX_PROBE_BYTES:
            return False
        data = json.loads(raw)
    except (OSError, ValueError, RecursionError):
        return False
    return isinstance(data, dict) and "format_version" in data and "files" in data


def folder_kind(path: str | os.PathLike) -> str | None:
    """What the existing directory at `path` is: "pack", "index", "checkpoint", "token-cache", or None (not a
    directory, or none of these). Looks at file names only, and for a pack at one small JSON read."""
    p = Path(path)
    if p.is_symlink() or not p.is_dir():
        return None
    try:
        names = set(os.listdir(p))
    except OSError:
        return None
    if "manifest.json" in names and _is_pack_manifest(p / "manifest.json"):
        return "pack"
    if "index.json" in names:  # keyed on the name alone: the index format is free to change
        return "index"
    if "cache.json" in names:
        return "token-cache"
    if "config.json" in names and ("model.safetensors.index.json" in names
                                   or any(n.endswith(".safetensors") for n in names)):
        return "checkpoint"
    return None


def _article(kind: str) -> str:
    return "an" if kind[0] in "aeiou" else "a"


def _real(path: str | os.PathLike) -> Path:
    return Path(os.path.realpath(os.path.abspath(path)))


def _within(inner: Path, outer: Path) -> bool:
    return inner == outer or outer in inner.parents


def check_output(out: str | os.PathLike | None, kind: str,
                 inputs: Mapping[str, str | os.PathLike | None] | Iterable[tuple[str, str | os.PathLike | None]] = ()
                 ) -> Path:
    """Return `out` as a Path, or raise a one-line `InputError` if writing a `kind` folder there could replace
    something else. `inputs` maps a description ("the checkpoint being exported") to each path the command reads;
    None values are skipped. Symlinks and `./x/` spellings are resolved before comparing."""
    if kind not in KINDS:
        raise ValueError(f"kind: got {kind!r}; expected one of {KINDS}")
    expected = f"expected a new or existing {kind} directory"
    text = "" if out is None else os.fspath(out)
    if not str(text).strip():
        raise InputError(f"{kind} {text!r}: empty path; {expected}")
    out_path = Path(text)
    if out_path.name in ("", ".", ".."):
        raise InputError(f"{kind} {text!r}: names no folder of its own; {expected} such as 'packs/tiny'")
    real = _real(out_path)
    pairs = inputs.items() if isinstance(inputs, Mapping) else inputs
    for what, given in pairs:
        if given is None or not str(os.fspath(given)).strip():
            continue
        src = _real(given)
        if src == real:
            raise InputError(f"{kind} {text!r}: is {what}; {expected}")
        if _within(real, src):
            raise InputError(f"{kind} {text!r}: is inside {what} ({os.fspath(given)!r}); {expected} elsewhere")
        if _within(src, real):
            raise InputError(f"{kind} {text!r}: contains {what} ({os.fspath(given)!r}); {expected} that holds "
                             f"none of the inputs")
    if out_path.is_symlink():
        raise InputError(f"{kind} {text!r}: is a symbolic link (to {os.readlink(out_path)!r}); {expected}, not a "
                         f"link (give the link's target instead)")
    if os.path.lexists(out_path):
        if not out_path.is_dir():
            what = "a file" if out_path.is_file() else "not a directory"
            raise InputError(f"{kind} {text!r}: exists and is {what}; {expected}")
        found = folder_kind(out_path)
        if found is not None and found != kind:
            raise InputError(f"{kind} {text!r}: is {_article(found)} {found} directory; {expected} "
                             f"({_article(kind)} {kind} is never written over {_article(found)} {found})")
        if found is None:
            try:
                empty = not any(os.scandir(out_path))
            except OSError as e:
                raise InputError(f"{kind} {text!r}: cannot be listed ({e.strerror or e}); {expected}") from None
            if not empty:
                raise InputError(f"{kind} {text!r}: is a non-empty folder that is not {_article(kind)} {kind}; "
                                 f"{expected} (move it away first, or pick another path)")
    _check_parent(out_path, kind, text, expected)
    return out_path


def _check_parent(out: Path, kind: str, text: str, expected: str) -> None:
    """The folder is written beside `out` and renamed into place, so `out`'s parent must be writable, or the
    nearest existing ancestor if the parent must be created."""
    parent = Path(os.path.abspath(out)).parent
    ancestor = parent
    while not os.path.lexists(ancestor) and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise InputError(f"{kind} {text!r}: cannot be created: {str(ancestor)!r} is not a directory; {expected}")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        action = "written in" if ancestor == parent else "created in"
        raise InputError(f"{kind} {text!r}: {str(ancestor)!r} is not writable, so the {kind} cannot be {action} "
                         f"it; {expected} in a writable folder")
