"""Flickr8k -> M-BEIR: one text query per caption, absolute image paths into the source, clear input errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from retrv.runtime.inputs.corpus import read_candidates, read_queries
from retrv.runtime.errors import InputError
from retrv.train.flickr8k import convert_flickr8k, main

REAL = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "flickr8k-1k"

CAPTIONS = """image,caption
b_2.jpg,A dog runs on the beach .
b_2.jpg,"A brown dog , wet , on sand ."
a_1.jpg,Two children play   in a park .
a_1.jpg,Kids on grass .
a_1.jpg,A boy and a girl outdoors .
c_3.jpg,A man rides a bike .
"""


def _fake(root: Path, captions: str = CAPTIONS, photos=("a_1.jpg", "b_2.jpg", "c_3.jpg", "uncaptioned.jpg")) -> Path:
    (root / "images").mkdir(parents=True)
    for i, name in enumerate(photos):
        Image.new("RGB", (8, 6), (40 * i, 0, 0)).save(root / "images" / name)
    (root / "captions.csv").write_text(captions, encoding="utf-8")
    return root


def test_converts_one_query_per_caption(tmp_path):
    src = _fake(tmp_path / "src")
    m = convert_flickr8k(src, tmp_path / "out")
    out = tmp_path / "out"
    cands = read_candidates(out / "corpus.jsonl")
    assert [c.did for c in cands] == ["a_1", "b_2", "c_3"]  # uncaptioned photo left out; sorted by name
    for c in cands:
        assert Path(c.img_path).is_absolute() and Path(c.img_path).parent == (src / "images").resolve()
        assert Path(c.img_path).is_file() and c.modality == "image"
    assert not list(out.rglob("*.jpg"))  # the photos are referenced, never copied

    queries = read_queries(out / "queries.jsonl")
    assert [q.qid for q in queries] == ["b_2.jpg#0", "b_2.jpg#1", "a_1.jpg#0", "a_1.jpg#1", "a_1.jpg#2", "c_3.jpg#0"]
    by_id = {q.qid: q for q in queries}
    assert by_id["b_2.jpg#1"].query_txt == "A brown dog, wet, on sand."  # quoted comma kept, spacing normalised
    assert by_id["a_1.jpg#0"].query_txt == "Two children play in a park."
    assert all(q.task_id == 0 and q.query_modality == "text" and q.query_img_path is None for q in queries)
    assert all(q.pos_cand_list == (q.qid.split(".")[0],) and q.neg_cand_list == () for q in queries)

    qrels = [line.split() for line in (out / "qrels.txt").read_text().splitlines()]
    assert qrels == [[q.qid, "0", q.pos_cand_list[0], "1"] for q in queries]
    assert m["n_images"] == 3 and m["n_queries"] == 6 and m["n_captions"] == 6
    assert json.loads((out / "dataset.json").read_text())["files"].keys() == {"corpus.jsonl", "queries.jsonl",
                                                                               "qrels.txt"}


def test_sampled_queries_are_seeded_and_keep_the_whole_corpus(tmp_path):
    src = _fake(tmp_path / "src")
    convert_flickr8k(src, tmp_path / "a", n_queries=3, seed=1)
    convert_flickr8k(src, tmp_path / "b", n_queries=3, seed=1)
    a = (tmp_path / "a" / "queries.jsonl").read_bytes()
    assert a == (tmp_path / "b" / "queries.jsonl").read_bytes()
    picked = [q.qid for q in read_queries(tmp_path / "a" / "queries.jsonl")]
    assert len(picked) == 3
    all_ids = ["b_2.jpg#0", "b_2.jpg#1", "a_1.jpg#0", "a_1.jpg#1", "a_1.jpg#2", "c_3.jpg#0"]
    assert picked == [q for q in all_ids if q in picked]  # file order kept
    assert len(read_candidates(tmp_path / "a" / "corpus.jsonl")) == 3
    subsets = set()
    for seed in range(6):
        convert_flickr8k(src, tmp_path / f"s{seed}", n_queries=3, seed=seed)
        subsets.add((tmp_path / f"s{seed}" / "queries.jsonl").read_bytes())
    assert len(subsets) > 1  # the seed matters


@pytest.mark.parametrize("captions, match", [
    ("img,text\na_1.jpg,x\n", "header"),
    ("image,caption\n", "no caption rows"),
    ("image,caption\na_1.jpg,one,two\n", "got 3 fields"),
    ("image,caption\na_1.jpg,  \n", "empty"),
    ("image,caption\n../a_1.jpg,escape\n", "file name inside images"),
    ("image,caption\nmissing.jpg,A cat .\n", "missing"),
])
def test_malformed_captions_are_refused(tmp_path, captions, match):
    src = _fake(tmp_path / "src", captions)
    with pytest.raises(InputError, match=match):
        convert_flickr8k(src, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_missing_inputs_and_bad_arguments_are_refused(tmp_path, capsys):
    with pytest.raises(InputError, match="folder not found"):
        convert_flickr8k(tmp_path / "nope", tmp_path / "out")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="captions.csv"):
        convert_flickr8k(tmp_path / "empty", tmp_path / "out")
    src = _fake(tmp_path / "src")
    with pytest.raises(InputError, match="n_queries"):
        convert_flickr8k(src, tmp_path / "out", n_queries=7)
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "notes.txt").write_text("keep")
    with pytest.raises(InputError, match="not empty"):
        convert_flickr8k(src, tmp_path / "taken")
    with pytest.raises(InputError, match="no dataset.json"):
        convert_flickr8k(src, tmp_path / "taken", overwrite=True)
    assert main([str(tmp_path / "nope"), str(tmp_path / "o")]) == 2
    assert "folder not found" in capsys.readouterr().err


def test_cli(tmp_path, capsys):
    src = _fake(tmp_path / "src")
    assert main([str(src), str(tmp_path / "o"), "--n-queries", "2"]) == 0
    assert "3 photos, 2 queries" in capsys.readouterr().out
    assert main([str(src), str(tmp_path / "o"), "--overwrite"]) == 0
    assert len(read_queries(tmp_path / "o" / "queries.jsonl")) == 6


@pytest.mark.skipif(not REAL.is_dir(), reason=f"{REAL} not present")
def test_real_flickr8k_subset(tmp_path):
    m = convert_flickr8k(REAL, tmp_path / "out")
    cands = read_candidates(tmp_path / "out" / "corpus.jsonl")
    queries = read_queries(tmp_path / "out" / "queries.jsonl")
    assert m["n_images"] == len(cands) == 1000 and len(queries) == 5000
    assert all(Path(c.img_path).is_file() for c in cands)
    dids = {c.did for c in cands}
    assert all(q.pos_cand_list[0] in dids and q.query_txt for q in queries)
