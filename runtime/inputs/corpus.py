"""Corpus and query files in M-BEIR's field names, so M-BEIR pools and query files load as they are.

Candidate rows: `{"did", "txt", "img_path", "modality"}`; query rows: `{"qid", "query_txt", "query_img_path",
"query_modality", "pos_cand_list", "neg_cand_list", "task_id"}`. Empty strings and nulls both mean "absent" (M-BEIR
uses both).

Image paths are relative to the M-BEIR root (M-BEIR writes `mbeir_images/...` while its files sit in
`cand_pool/local/` and `query/test/`): the root is found by walking up from the JSONL to the first folder holding
`mbeir_images/` (or both `cand_pool/` and `query/`); a JSONL outside any M-BEIR tree keeps the older rule, paths
relative to its own folder; `image_root` overrides both. Paths come back absolute.

Also here, M-BEIR's other files: TREC qrels (`qrels/test/*_qrels.txt`) and the task instructions
(`instructions/query_instructions.tsv`), which UniIR and LamRA prepend to the query text.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field, replace
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


def find_mbeir_root(path: str | Path) -> Path | None:
    """The M-BEIR root above a file (or folder): the nearest folder, starting at the file's own, that holds
    `mbeir_images/`, or both `cand_pool/` and `query/`. None outside an M-BEIR tree. Returned absolute."""
    here = Path(os.path.abspath(path))
    for folder in ([here] if here.is_dir() else []) + list(here.parents):
        if (folder / MBEIR_IMAGES).is_dir() or ((folder / "cand_pool").is_dir() and (folder / "query").is_dir()):
            return folder
    return None


def image_base(path: str | Path, image_root: str | Path | None = None) -> Path:
    """The folder a JSONL's relative image paths are resolved against: `image_root` when given, else the M-BEIR
    root above the file, else the file's own folder."""
    if image_root is not None:
        return Path(os.path.abspath(image_root))
    return find_mbeir_root(path) or Path(os.path.abspath(Path(path).parent))


def read_candidates(path: str | Path, image_root: str | Path | None = None) -> list[Candidate]:
    """Read a candidate pool. Every row needs a `did` and at least one of `txt`/`img_path`; dids are unique.
    Image paths are resolved against `image_base(path, image_root)` and returned absolute."""
    base = image_base(path, image_root)
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


def read_candidate_files(paths, image_root: str | Path | None = None) -> list[Candidate]:
    """Several pools as one (a global pool is the union of the local ones); each file finds its own M-BEIR root
    unless `image_root` is given. A did may appear in one file only."""
    out, first = [], {}
    for path in paths:
        for c in read_candidates(path, image_root):
            if c.did in first:
                raise InputError(f"{path}: did {_show(c.did)} is also in {first[c.did]}; expected candidate ids "
                                 f"unique across the pools")
            first[c.did] = path
            out.append(c)
    return out


def read_queries(path: str | Path, image_root: str | Path | None = None) -> list[Query]:
    """Read an M-BEIR query file; image paths as `read_candidates` resolves them."""
    base = image_base(path, image_root)
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


# -- M-BEIR's ids, qrels and instructions ---------------------------------------------------------------------------
MBEIR_IMAGES = "mbeir_images"
INSTRUCTIONS_TSV = "instructions/query_instructions.tsv"
# M-BEIR's dataset ids, the number before the colon of every qid and did ("8:123" is a CIRR id), as UniIR's
# released preprocessing numbers them (src/data/preprocessing/utils.py, DATASET_IDS).
MBEIR_DATASETS = {0: "VisualNews", 1: "Fashion200K", 2: "WebQA", 3: "EDIS", 4: "NIGHTS", 5: "OVEN", 6: "INFOSEEK",
                  7: "FashionIQ", 8: "CIRR", 9: "MSCOCO"}
# M-BEIR's task ids -> (query modality, candidate modality); task 5 (i -> (i,t)) is not part of the benchmark.
MBEIR_TASKS = {0: ("text", "image"), 1: ("text", "text"), 2: ("text", "image,text"), 3: ("image", "text"),
               4: ("image", "image"), 6: ("image,text", "text"), 7: ("image,text", "image"),
               8: ("image,text", "image,text")}
_ID = re.compile(r"(\d{1,9}):\d+", re.ASCII)  # "<dataset_id>:<n>"; 9 digits: a dataset id is small, never a big int


def dataset_id(qid: str) -> int | None:
    """M-BEIR's dataset id from a qid or did (`"9:123"` -> 9); None for an id not written that way."""
    m = _ID.fullmatch(qid)
    return int(m.group(1)) if m else None


def task_label(q: Query) -> str:
    """`"cirr_task7"`, as M-BEIR names its files (`mbeir_cirr_task7_test.jsonl`); an id M-BEIR does not know is
    shown as its number, a query without a dataset id as `"unknown"`, one without a task as `"task?"`."""
    task = "task?" if q.task_id is None else f"task{q.task_id}"
    return f"{dataset_label(q)}_{task}"


def dataset_label(q: Query) -> str:
    ds = dataset_id(q.qid)
    return "unknown" if ds is None else MBEIR_DATASETS.get(ds, str(ds)).lower()


def _lines(path: Path, what: str) -> Iterator[tuple[str, str]]:
    """(`file:line`, text) for each non-blank line of a small UTF-8 text file."""
    if not path.is_file():
        raise InputError(f"{path}: file not found; expected {what}")
    for n, raw in enumerate(path.read_bytes().split(b"\n"), 1):
        try:
            line = raw.decode("utf-8").rstrip("\r")
        except UnicodeDecodeError as e:
            raise InputError(f"{path}:{n}: not UTF-8 (byte {e.start} of the line); expected {what}") from None
        if line.strip():
            yield f"{path}:{n}", line


def read_qrels(paths) -> dict[str, tuple[str, ...]]:
    """TREC qrels (`qid 0 did relevance` per line, M-BEIR's `qrels/test/*_qrels.txt`) -> {qid: positive dids, in
    file order}. Relevance > 0 is positive; a qid judged only non-relevant maps to (). Several files merge."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    out: dict[str, list[str]] = {}
    for path in paths:
        judged = 0
        for where, line in _lines(Path(path), "TREC qrels lines 'qid 0 did relevance'"):
            parts = line.split()
            rel = parts[3].removeprefix("-") if len(parts) == 4 else ""
            if not (rel.isascii() and rel.isdigit() and len(rel) <= 9):  # 9 digits: int() of any length is slow
                raise InputError(f"{where}: got {_show(line)}; expected 'qid 0 did relevance' (4 fields, an integer "
                                 f"relevance)")
            qid, _, did, _ = parts
            dids = out.setdefault(qid, [])
            if int(parts[3]) > 0 and did not in dids:
                dids.append(did)
            judged += 1
        if not judged:
            raise InputError(f"{path}: no judgements; expected TREC qrels lines 'qid 0 did relevance'")
    return {qid: tuple(dids) for qid, dids in out.items()}


def with_qrels(queries: list[Query], qrels: dict[str, tuple[str, ...]]) -> list[Query]:
    """The queries with their positives taken from qrels (a query the qrels do not judge has none, and is counted
    as skipped by the metrics rather than scored against its file's `pos_cand_list`)."""
    return [replace(q, pos_cand_list=tuple(qrels.get(q.qid, ()))) for q in queries]


def _modality_key(text: str) -> str:
    return ",".join(sorted(p.strip() for p in text.lower().split(",") if p.strip()))  # "text,image" == "image,text"


@dataclass(frozen=True)
class Instructions:
    """M-BEIR's `instructions/query_instructions.tsv`: a header naming `query_modality`, `cand_modality`,
    `dataset_id` (and `dataset_name`), then `prompt_1`..`prompt_4`; one row per (dataset, query modality, candidate
    modality), which is one task of one dataset. Empty prompts are dropped, as UniIR's loader does."""

    path: str
    prompts: dict  # (dataset_id, query modality, candidate modality) -> tuple of prompt variants

    @classmethod
    def read(cls, path: str | Path) -> "Instructions":
        path = Path(path)
        what = "a tab-separated file with a header naming query_modality, cand_modality, dataset_id, prompt_1, ..."
        lines = _lines(path, what)
        where, header = next(lines, (str(path), ""))
        names = [h.strip() for h in header.split("\t")]
        need = ("query_modality", "cand_modality", "dataset_id")
        prompt_cols = [i for i, h in enumerate(names) if h.startswith("prompt")]
        if missing := [h for h in need if h not in names] + ([] if prompt_cols else ["prompt_1"]):
            raise InputError(f"{where}: header {_show(header)} lacks {', '.join(missing)}; expected {what}")
        col = {h: names.index(h) for h in need}
        prompts = {}
        for where, line in lines:
            parts = [p.strip() for p in line.split("\t")]
            parts += [""] * (len(names) - len(parts))
            ds = parts[col["dataset_id"]]
            if not (ds.isascii() and ds.isdigit() and len(ds) <= 9):
                raise InputError(f"{where}: dataset_id {_show(ds)}; expected a dataset number such as 9 ({len(parts)} "
                                 f"tab-separated fields; expected {len(names)})")
            variants = tuple(parts[i] for i in prompt_cols if i < len(parts) and parts[i])
            if not variants:
                raise InputError(f"{where}: no prompt; expected at least prompt_1 for dataset {ds}")
            key = (int(ds), _modality_key(parts[col["query_modality"]]), _modality_key(parts[col["cand_modality"]]))
            prompts[key] = variants  # a repeated row replaces the earlier one, as in UniIR's loader
        if not prompts:
            raise InputError(f"{path}: no instruction rows; expected {what}")
        return cls(str(path), prompts)

    def find(self, q: Query) -> tuple[str, ...]:
        """The prompt variants for a query's dataset and task. The candidate modality comes from the task id (M-BEIR's
        task table); without one, the dataset's only row for the query modality."""
        ds = dataset_id(q.qid)
        if ds is None:
            raise InputError(f"query {_show(q.qid)}: no M-BEIR dataset id (expected a qid such as \"9:123\") to look "
                             f"its instruction up in {self.path}; pass --no-instructions")
        qmod = _modality_key(q.query_modality)
        if q.task_id is not None:
            if q.task_id not in MBEIR_TASKS:
                raise InputError(f"query {_show(q.qid)}: task_id {q.task_id}; expected one of M-BEIR's tasks "
                                 f"{sorted(MBEIR_TASKS)} (or pass --no-instructions)")
            keys = [(ds, qmod, _modality_key(MBEIR_TASKS[q.task_id][1]))]
        else:
            keys = [k for k in self.prompts if k[:2] == (ds, qmod)]
        found = [self.prompts[k] for k in keys if k in self.prompts]
        if len(found) != 1:
            raise InputError(f"query {_show(q.qid)}: {len(found)} instruction rows in {self.path} for dataset {ds}, "
                             f"query modality {qmod!r}, task {q.task_id}; expected one (or pass --no-instructions)")
        return found[0]

    def apply(self, queries: list[Query], variant: int = 1) -> list[Query]:
        """The queries with their task's instruction (`prompt_<variant>`, 1-based) prepended to the text, written as
        UniIR writes it: `"<Instruction.> <query text.>"`, stripped, first letter capital, a final period added."""
        if isinstance(variant, bool) or not isinstance(variant, int) or variant < 1:
            raise InputError(f"instruction variant: got {variant!r}; expected an integer >= 1 (prompt_1 is 1)")
        out = []
        for q in queries:
            variants = self.find(q)
            if variant > len(variants):
                raise InputError(f"query {_show(q.qid)}: instruction variant {variant}; its task has {len(variants)} "
                                 f"in {self.path}")
            out.append(replace(q, query_txt=_tidy(f"{_tidy(variants[variant - 1])} {_tidy(q.query_txt)}")))
        return out


def _tidy(text: str | None) -> str:
    """UniIR's formatting of query and instruction text: no carriage returns or surrounding quotes, the first
    character upper case, a final period when there is no final . ? or !."""
    text = (text or "").replace("\r", "").strip().strip('"')
    if text:
        text = text[0].upper() + text[1:]
        text = text if text[-1] in ".?!" else text + "."
    return text


def write_jsonl(path: str | Path, rows) -> None:
    """Write rows (dicts or Candidates) as JSONL, atomically."""
    from retrv.runtime.fsutil import atomic_write_text

    lines = [json.dumps(r.to_row() if isinstance(r, Candidate) else r, ensure_ascii=False) for r in rows]
    atomic_write_text(path, "\n".join(lines) + "\n")
