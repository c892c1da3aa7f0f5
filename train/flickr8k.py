"""Flickr8k photographs and captions as an M-BEIR text->image retrieval set (task 0).

Input: a folder with `captions.csv` (header `image,caption`, any number of captions per photo; the shared subset
has five) and `images/`. Output, in `out_dir`:

- `corpus.jsonl`: one image candidate per captioned photo, sorted by file name. `did` is the file stem; `img_path`
  is ABSOLUTE and points into the source folder: the photos are never copied, so the output stays small and the
  photos' licence terms stay with their folder. Photos in `images/` that no caption names are left out.
- `queries.jsonl`: ONE QUERY PER CAPTION (five per photo), the protocol of Flickr and MSCOCO retrieval that
  M-BEIR's MSCOCO t->i split also follows; every caption is a different, valid description, and one sampled caption
  per photo would throw away 80% of the queries for no gain. `qid` is `<image>#<k>`, Flickr8k's own caption id
  (k counts the photo's captions in file order). `pos_cand_list` is the photo; `neg_cand_list` is empty (Flickr
  has no annotated hard negatives). `n_queries` keeps a seeded random subset of the captions (ranked by
  sha256(seed, qid), so the choice is the same on every platform and Python version) in file order; the corpus
  stays whole, so a subset is exactly as hard per query.
- `qrels.txt`: M-BEIR qrels, `qid 0 did 1`.
- `dataset.json`: source folder, sha256 of `captions.csv`, counts, the policy above and the sha256 of every file.

Captions are lightly normalised: whitespace collapsed and the tokeniser's space before punctuation removed
("a ball , then ." -> "a ball, then."); nothing else.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import logging
import re
import sys
from pathlib import Path

from retrv.runtime.errors import InputError, RetrvError
from retrv.runtime.fsutil import atomic_dir, atomic_write_json, sha256_file

log = logging.getLogger(__name__)

CONVERTER_VERSION = 1  # bump whenever the bytes written for a given input change
TASK_TEXT_TO_IMAGE = 0  # M-BEIR task id


def _clean(caption: str) -> str:
    return re.sub(r"\s+([.,!?;:])", r"\1", " ".join(caption.split()))


def read_captions(src_dir: str | Path) -> dict[str, list[str]]:
    """{image file name: [caption, ...]} from `src_dir/captions.csv`, in file order; every named photo must exist."""
    src = Path(src_dir)
    if not src.is_dir():
        raise InputError(f"{src}: folder not found; expected a Flickr8k folder with captions.csv and images/")
    path = src / "captions.csv"
    if not path.is_file():
        raise InputError(f"{path}: file not found; expected a CSV with the header 'image,caption'")
    if not (src / "images").is_dir():
        raise InputError(f"{src / 'images'}: folder not found; expected the photos named in captions.csv")
    captions: dict[str, list[str]] = {}
    with open(path, encoding="utf-8-sig", newline="") as f:  # -sig: tolerate a byte-order mark
        reader = csv.reader(f)
        try:
            header = next(reader, None)
            if header is None or [h.strip().lower() for h in header] != ["image", "caption"]:
                raise InputError(f"{path}:1: header: got {header!r}; expected ['image', 'caption']")
            for row in reader:
                n = reader.line_num
                if not row or not any(c.strip() for c in row):
                    continue
                if len(row) != 2:
                    raise InputError(f"{path}:{n}: got {len(row)} fields; expected 2 (image,caption); "
                                     "quote a caption that contains a comma")
                image, caption = row[0].strip(), _clean(row[1])
                # A separator could point outside images/ (img_path is absolute); qrels.txt is split on whitespace.
                if not image or image in (".", "..") or any(c in image for c in "/\\") or len(image.split()) != 1:
                    raise InputError(f"{path}:{n}: image: got {row[0]!r}; expected a file name inside images/, "
                                     "without spaces")
                if not caption:
                    raise InputError(f"{path}:{n}: caption of {image!r} is empty; expected text")
                captions.setdefault(image, []).append(caption)
        except csv.Error as e:
            raise InputError(f"{path}:{reader.line_num}: not valid CSV ({e})") from None
        except UnicodeDecodeError as e:
            raise InputError(f"{path}: not UTF-8 ({e.reason} at byte {e.start})") from None
    if not captions:
        raise InputError(f"{path}: no caption rows; expected at least one 'image,caption' line after the header")
    missing = [name for name in captions if not (src / "images" / name).is_file()]
    if missing:
        raise InputError(f"{src / 'images'}: {len(missing)} photo(s) named in captions.csv are missing, e.g. "
                         f"{missing[:3]}; expected every named photo to exist")
    return captions


def _rank(seed: int, qid: str) -> bytes:
    return hashlib.sha256(f"{seed}/{qid}".encode()).digest()


def convert_flickr8k(src_dir: str | Path, out_dir: str | Path, n_queries: int | None = None, seed: int = 0,
                     *, overwrite: bool = False) -> dict:
    """Write corpus.jsonl, queries.jsonl, qrels.txt and dataset.json to `out_dir` (atomically); return the manifest."""
    src = Path(src_dir).resolve()
    captions = read_captions(src)
    queries = [(image, k, text) for image in captions for k, text in enumerate(captions[image])]
    if n_queries is not None:
        if not isinstance(n_queries, int) or not 1 <= n_queries <= len(queries):
            raise InputError(f"n_queries: got {n_queries!r}; expected 1 to {len(queries)} (the number of captions)")
        keep = set(sorted(range(len(queries)), key=lambda i: _rank(seed, f"{queries[i][0]}#{queries[i][1]}"))[:n_queries])
        queries = [q for i, q in enumerate(queries) if i in keep]
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        if not overwrite:
            raise InputError(f"{out}: exists and is not empty; expected a new or empty folder (or overwrite=True)")
        if not (out / "dataset.json").is_file():
            raise InputError(f"{out}: has no dataset.json; refusing to replace a folder this converter did not write")
    unnamed = sum(1 for p in (src / "images").iterdir() if p.name not in captions)
    if unnamed:
        log.info("flickr8k: %d photo(s) in %s have no caption and are left out of the corpus", unnamed, src / "images")

    did = {image: Path(image).stem for image in captions}
    if len(set(did.values())) < len(did):
        raise InputError(f"{src / 'captions.csv'}: two photos share a file stem; expected unique names")
    corpus = [{"did": did[image], "txt": "", "img_path": str(src / "images" / image), "modality": "image"}
              for image in sorted(captions)]
    rows = [{"qid": f"{image}#{k}", "query_txt": text, "query_img_path": None, "query_modality": "text",
             "pos_cand_list": [did[image]], "neg_cand_list": [], "task_id": TASK_TEXT_TO_IMAGE}
            for image, k, text in queries]
    files = {"corpus.jsonl": corpus, "queries.jsonl": rows}
    with atomic_dir(out) as root:
        for name, lines in files.items():
            (root / name).write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in lines), "utf-8")
        (root / "qrels.txt").write_text("".join(f"{r['qid']} 0 {r['pos_cand_list'][0]} 1\n" for r in rows), "utf-8")
        manifest = {
            "converter": "retrv.train.flickr8k", "converter_version": CONVERTER_VERSION, "source": str(src),
            "captions_sha256": sha256_file(src / "captions.csv"), "n_images": len(corpus),
            "n_captions": sum(len(c) for c in captions.values()), "n_queries": len(rows),
            "query_policy": "one query per caption" + ("" if n_queries is None else f"; {n_queries} sampled"),
            "n_queries_requested": n_queries, "seed": seed, "task_id": TASK_TEXT_TO_IMAGE,
            "files": {name: sha256_file(root / name) for name in ("corpus.jsonl", "queries.jsonl", "qrels.txt")},
        }
        atomic_write_json(root / "dataset.json", manifest)
    return manifest


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m retrv.train.flickr8k", description=__doc__.split("\n\n")[0])
    ap.add_argument("src", help="Flickr8k folder with captions.csv and images/")
    ap.add_argument("out", help="output folder (new or empty; --overwrite replaces an earlier conversion)")
    ap.add_argument("--n-queries", type=int, default=None, help="keep a seeded random subset of the captions")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--overwrite", action="store_true")
    ap.add_argument("-v", "--verbose", action="store_true", help="log progress to stderr")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        m = convert_flickr8k(args.src, args.out, n_queries=args.n_queries, seed=args.seed, overwrite=args.overwrite)
    except RetrvError as e:
        print(f"flickr8k: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.out}: {m['n_images']} photos, {m['n_queries']} queries")
    return 0


if __name__ == "__main__":
    sys.exit(main())
