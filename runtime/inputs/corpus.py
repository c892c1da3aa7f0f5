"""Corpus and query files in M-BEIR's field names, so M-BEIR pools and query files load as they are.

Candidate rows: `{"did", "txt", "img_path", "modality"}`; query rows: `{"qid", "query_txt", "query_img_path",
"query_modality", "pos_cand_list", "neg_cand_list", "task_id"}`. Image paths are relative to the JSONL file unless
absolute. Empty strings and nulls both mean "absent" (M-BEIR uses both).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from retrv.runtime.errors import InputError


@dataclass(frozen=True)
class Candidate:
    did: str
    txt: str | None = None
    img_path: str | None = None  # absolute, resolved against the JSONL file's folder
    modality: str = "text"

    def to_row(self) -> dict:
        return {"did": self.did, "txt": self.txt or "", "img_path": self.img_path or "", "modality": self.modality}


@dataclass(frozen=True)
class Query:
    qid: str
    query_txt: str | None = None
    query_img_path: str | None = None
    query_modality: str = "text"
    pos_cand_list: tuple[str, ...] = ()
    neg_cand_list: tuple[str, ...] = ()
    task_id: int | None = None
    extra: dict = field(default_factory=dict, compare=False)


def _absent(value) -> bool:
    return value is None or (isinstance(value, str) and not value.strip())


def _show(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."  # a hostile value can be megabytes long


class _Row:
    """One parsed JSONL row and its `file:line`, with typed field access that names the field when it is wrong."""

    def __init__(self, where: str, row: dict) -> None:
        self.where, self.row = where, row

    def fail(self, msg: str) -> InputError:
        return InputError(f"{self.where}: {msg}")

    def text(self, key: str) -> str | None:
        """A string field; null and "" (and whitespace) mean absent, as M-BEIR writes them."""
        value = self.row.get(key)
        if _absent(value):
            return None
        if not isinstance(value, str):
            raise self.fail(f"{key}: got {_show(value)} ({type(value).__name__}); expected a string or null")
        if "\x00" in value:
            raise self.fail(f"{key}: got {_show(value)}; expected a string without NUL characters")
        return value

    def ident(self, key: str) -> str:
        """A required id. M-BEIR ids are strings ("9:123"); a JSON number is refused rather than str()-ed, because
        5, 5.0 and "5" would then name different candidates and a typo'd schema would load silently."""
        value = self.text(key)
        if value is None:
            raise self.fail(f"missing {key!r}; expected a non-empty string id such as \"9:123\"")
        return value

    def path(self, key: str, base: Path) -> str | None:
        value = self.text(key)
        if value is None:
            return None
        p = Path(value)
        return os.path.abspath(p if p.is_absolute() else (base / p))  # stored absolute in an index

    def ids(self, key: str) -> tuple[str, ...]:
        value = self.row.get(key)
        if value is None:
            return ()
        if not isinstance(value, list) or not all(isinstance(d, str) and d for d in value):
            raise self.fail(f"{key}: got {_show(value)}; expected a list of non-empty string dids")
        return tuple(value)

    def integer(self, key: str) -> int | None:
        value = self.row.get(key)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int):  # bool is an int subclass
            raise self.fail(f"{key}: got {_show(value)} ({type(value).__name__}); expected an integer or null")
        return value


def _modality(txt, img) -> str:
    return "image,text" if txt and img else ("image" if img else "text")


def _rows(path: str | Path) -> Iterator[_Row]:
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: file not found; expected an M-BEIR JSONL file")
    try:
        f = open(path, "rb")  # bytes: a bad byte is reported with its line, which a text-mode reader cannot do
    except OSError as e:
        raise InputError(f"{path}: cannot be read ({e.strerror or e})") from None
    with f:
        for n, raw in enumerate(f, 1):
            where = f"{path}:{n}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise InputError(f"{where}: not UTF-8 (byte {e.start} of the line); expected UTF-8 JSON") from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise InputError(f"{where}: not valid JSON ({e.msg}); expected one object per line") from None
            except (ValueError, RecursionError) as e:  # a 5,000-digit integer; nesting deeper than the stack
                raise InputError(f"{where}: not valid JSON ({type(e).__name__}); expected one object per line") \
                    from None
            if not isinstance(row, dict):
                raise InputError(f"{where}: got a JSON {type(row).__name__}; expected an object")
            yield _Row(where, row)


def _candidate(r: "_Row", base: Path) -> Candidate:
    did = r.ident("did")
    txt, img = r.text("txt"), r.path("img_path", base)
    if txt is None and img is None:
        raise r.fail(f"candidate {_show(did)} has neither 'txt' nor 'img_path'; expected at least one")
    return Candidate(did=did, txt=txt, img_path=img, modality=r.text("modality") or _modality(txt, img))


def _unique(cands: list[Candidate], where: str) -> list[Candidate]:
    seen: set[str] = set()
    for c in cands:
        if c.did in seen:
            raise InputError(f"{where}: duplicate did {c.did!r}; expected unique candidate ids")
        seen.add(c.did)
    return cands


def read_candidates(path: str | Path, image_root: str | Path | None = None) -> list[Candidate]:
    """Read a candidate pool. Every row needs a `did` and at least one of `txt`/`img_path`; dids are unique.
    Image paths are relative to the JSONL file's folder, or to `image_root` when given; returned absolute."""
    base = Path(os.path.abspath(image_root if image_root is not None else Path(path).parent))
    out, seen = [], set()
    for r in _rows(path):
        c = _candidate(r, base)
        if c.did in seen:
            raise r.fail(f"duplicate did {_show(c.did)}; expected unique candidate ids")
        seen.add(c.did)
        out.append(c)
    if not out:
        raise InputError(f"{path}: no candidates; expected at least one JSONL row")
    return out


def candidates_from_rows(rows, base: str | Path | None = None) -> list[Candidate]:
    """Candidates given in Python: M-BEIR candidate rows (dicts) or `Candidate`s. Relative image paths are
    relative to `base` (default: the current directory) and come back absolute."""
    if isinstance(rows, (str, bytes, dict)) or not hasattr(rows, "__iter__"):
        raise InputError(f"rows: got {type(rows).__name__}; expected a list of candidate rows (dicts)")
    root = Path(os.path.abspath(base if base is not None else os.getcwd()))
    out = []
    for i, row in enumerate(rows):
        if isinstance(row, Candidate):
            img = row.img_path and str(root / row.img_path)  # an absolute img_path stays as it is
            out.append(Candidate(row.did, row.txt, img, row.modality))
        elif isinstance(row, dict):
            out.append(_candidate(_Row(f"rows[{i}]", row), root))
        else:
            raise InputError(f"rows[{i}]: got {type(row).__name__}; expected a candidate row (dict) or Candidate")
    return _unique(out, "rows")


def read_queries(path: str | Path, image_root: str | Path | None = None) -> list[Query]:
    base = Path(os.path.abspath(image_root if image_root is not None else Path(path).parent))
    out = []
    known = {"qid", "query_txt", "query_img_path", "query_modality", "pos_cand_list", "neg_cand_list", "task_id"}
    for r in _rows(path):
        qid = r.ident("qid")
        txt, img = r.text("query_txt"), r.path("query_img_path", base)
        if txt is None and img is None:
            raise r.fail(f"query {_show(qid)} has neither 'query_txt' nor 'query_img_path'")
        out.append(Query(
            qid=qid, query_txt=txt, query_img_path=img,
            query_modality=r.text("query_modality") or _modality(txt, img),
            pos_cand_list=r.ids("pos_cand_list"),
            neg_cand_list=r.ids("neg_cand_list"),
            task_id=r.integer("task_id"),
            extra={k: v for k, v in r.row.items() if k not in known},
        ))
    if not out:
        raise InputError(f"{path}: no queries; expected at least one JSONL row")
    return out


def write_jsonl(path: str | Path, rows) -> None:
    """Write rows (dicts or Candidates) as JSONL, atomically."""
    from retrv.runtime.fsutil import atomic_write_text

    lines = [json.dumps(r.to_row() if isinstance(r, Candidate) else r, ensure_ascii=False) for r in rows]
    atomic_write_text(path, "\n".join(lines) + "\n")
