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


def _resolve(base: Path, value) -> str | None:
    """An image path, absolute: relative paths are taken against `base` (stored absolute in an index, so the index
    does not depend on the directory it is used from)."""
    if _absent(value):
        return None
    p = Path(value)
    return os.path.abspath(p if p.is_absolute() else (base / p))


def _modality(txt, img) -> str:
    return "image,text" if txt and img else ("image" if img else "text")


def _rows(path: str | Path) -> Iterator[tuple[int, dict]]:
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: file not found; expected an M-BEIR JSONL file")
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise InputError(f"{path}:{n}: not valid JSON ({e.msg}); expected one object per line") from None
            if not isinstance(row, dict):
                raise InputError(f"{path}:{n}: got a JSON {type(row).__name__}; expected an object")
            yield n, row


def _candidate(row: dict, where: str, base: Path) -> Candidate:
    did = row.get("did")
    if _absent(did):
        raise InputError(f"{where}: missing 'did'; expected a candidate id")
    did = str(did)
    txt, img = (None if _absent(row.get("txt")) else str(row["txt"])), _resolve(base, row.get("img_path"))
    if txt is None and img is None:
        raise InputError(f"{where}: candidate {did!r} has neither 'txt' nor 'img_path'; expected at least one")
    return Candidate(did=did, txt=txt, img_path=img, modality=row.get("modality") or _modality(txt, img))


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
    for n, row in _rows(path):
        c = _candidate(row, f"{path}:{n}", base)
        if c.did in seen:
            raise InputError(f"{path}:{n}: duplicate did {c.did!r}; expected unique candidate ids")
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
            out.append(_candidate(row, f"rows[{i}]", root))
        else:
            raise InputError(f"rows[{i}]: got {type(row).__name__}; expected a candidate row (dict) or Candidate")
    return _unique(out, "rows")


def read_queries(path: str | Path, image_root: str | Path | None = None) -> list[Query]:
    base = Path(os.path.abspath(image_root if image_root is not None else Path(path).parent))
    out = []
    known = {"qid", "query_txt", "query_img_path", "query_modality", "pos_cand_list", "neg_cand_list", "task_id"}
    for n, row in _rows(path):
        qid = row.get("qid")
        if _absent(qid):
            raise InputError(f"{path}:{n}: missing 'qid'; expected a query id")
        txt = None if _absent(row.get("query_txt")) else str(row["query_txt"])
        img = _resolve(base, row.get("query_img_path"))
        if txt is None and img is None:
            raise InputError(f"{path}:{n}: query {qid!r} has neither 'query_txt' nor 'query_img_path'")
        pos = row.get("pos_cand_list") or []
        if not isinstance(pos, list):
            raise InputError(f"{path}:{n}: pos_cand_list: got {type(pos).__name__}; expected a list of dids")
        out.append(Query(
            qid=str(qid), query_txt=txt, query_img_path=img,
            query_modality=row.get("query_modality") or _modality(txt, img),
            pos_cand_list=tuple(str(d) for d in pos),
            neg_cand_list=tuple(str(d) for d in (row.get("neg_cand_list") or [])),
            task_id=row.get("task_id"),
            extra={k: v for k, v in row.items() if k not in known},
        ))
    if not out:
        raise InputError(f"{path}: no queries; expected at least one JSONL row")
    return out


def write_jsonl(path: str | Path, rows) -> None:
    """Write rows (dicts or Candidates) as JSONL, atomically."""
    from retrv.runtime.fsutil import atomic_write_text

    lines = [json.dumps(r.to_row() if isinstance(r, Candidate) else r, ensure_ascii=False) for r in rows]
    atomic_write_text(path, "\n".join(lines) + "\n")
