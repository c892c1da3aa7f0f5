"""Fuzzing every parser of a user file: config.json / retrv_config.json, preprocessor_config.json, the pack manifest,
corpus and query JSONL, ann.json. The only allowed outcomes are a parsed object or a RetrvError subclass with a
one-line message; anything else (KeyError, TypeError, ValueError, RecursionError, OverflowError...) is a parser bug.
"""

from __future__ import annotations

import copy
import json
import math
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from retrv.model.config import ModelConfig, parse_hf_config, read_config
from retrv.model.tiny import tiny_config
from retrv.runtime.index.ann import HnswIndex, HnswParams
from retrv.runtime.index.ann_files import read_meta
from retrv.runtime.inputs.corpus import read_candidates, read_queries
from retrv.runtime.errors import RetrvError
from retrv.runtime.pack import PACK_FORMAT_VERSION, Manifest, Pack, describe_file, write_manifest
from retrv.runtime.inputs.preprocess import ImageProcessorConfig

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# Values a hostile or careless file holds: every JSON type, the integers that break naive code (bools, 0, -1,
# 2**31, 2**64, 10**400), NaN and infinities, strings that look like numbers.
SCALARS = (st.none() | st.booleans() | st.integers(-3, 70) | st.sampled_from([2**31, 2**64, -(2**63), 10**400])
           | st.floats() | st.sampled_from(["", "64", "true", "silu", "mrope", "a\x00b", "../x"]) | st.text(max_size=8))
VALUES = st.recursive(SCALARS, lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=6), c, max_size=3),
                      max_leaves=6)


def _paths(d, prefix=()):
    for k, v in d.items():
        yield prefix + (k,)
        if isinstance(v, dict):
            yield from _paths(v, prefix + (k,))


@st.composite
def mutated(draw, base: dict) -> dict:
    """`base` with one to three fields replaced by random values, deleted, or added."""
    d = copy.deepcopy(base)
    for _ in range(draw(st.integers(1, 3))):
        paths = list(_paths(d))
        if not paths:
            break
        path = draw(st.sampled_from(paths))
        parent = d
        for key in path[:-1]:
            parent = parent[key]
        action = draw(st.sampled_from(["replace", "replace", "delete", "add"]))
        if action == "delete":
            del parent[path[-1]]
        elif action == "add":
            parent[draw(st.text(max_size=6))] = draw(VALUES)
        else:
            parent[path[-1]] = draw(VALUES)
    return d


def outcome(fn, *args):
    """The parsed object, or None after checking that the refusal is a one-line RetrvError."""
    try:
        return fn(*args)
    except RetrvError as e:
        msg = str(e)
        assert msg and "\n" not in msg and "\r" not in msg, repr(msg)
        return None


def dumps(d) -> str:
    return json.dumps(d)  # NaN and Infinity are written as the tokens Python's reader accepts


# --- config.json -> ModelConfig -------------------------------------------------------------------------------------

CONFIG, RETRV_CONFIG, _ = tiny_config(icm=True)


@FUZZ
@given(mutated(CONFIG), mutated(RETRV_CONFIG))
def test_fuzz_hf_config(cfg, retrv_cfg):
    parsed = outcome(parse_hf_config, cfg, retrv_cfg)
    if parsed is not None:  # what parsed must also survive the manifest round trip
        assert ModelConfig.from_dict(json.loads(json.dumps(parsed.to_dict()))) == parsed


MODEL_DICT = parse_hf_config(CONFIG, RETRV_CONFIG).to_dict()


@FUZZ
@given(mutated(json.loads(json.dumps(MODEL_DICT))))
def test_fuzz_model_config_from_dict(d):
    outcome(ModelConfig.from_dict, d)


@pytest.fixture(scope="module")
def scratch():
    with tempfile.TemporaryDirectory() as d:
        yield Path(d)


@FUZZ
@given(st.binary(max_size=300) | st.builds(lambda t: t.encode("utf-8", "surrogatepass"), st.text(max_size=100)),
       st.sampled_from(["config.json", "retrv_config.json", "generation_config.json"]))
def test_fuzz_checkpoint_json_bytes(scratch, data, name):
    ckpt = scratch / "ckpt"
    ckpt.mkdir(exist_ok=True)
    for n, d in (("config.json", CONFIG), ("retrv_config.json", RETRV_CONFIG), ("generation_config.json", {})):
        (ckpt / n).write_text(json.dumps(d))
    (ckpt / name).write_bytes(data)
    outcome(read_config, ckpt)


# --- preprocessor_config.json ---------------------------------------------------------------------------------------

@FUZZ
@given(mutated(ImageProcessorConfig().to_dict()))
def test_fuzz_preprocessor_config(d):
    outcome(ImageProcessorConfig.from_dict, d)


@FUZZ
@given(st.binary(max_size=200))
def test_fuzz_preprocessor_bytes(scratch, data):
    (scratch / "preprocessor_config.json").write_bytes(data)
    outcome(ImageProcessorConfig.from_file, scratch / "preprocessor_config.json")


# --- corpus and query JSONL -----------------------------------------------------------------------------------------

CAND_KEYS = ["did", "txt", "img_path", "modality"]
QUERY_KEYS = ["qid", "query_txt", "query_img_path", "query_modality", "pos_cand_list", "neg_cand_list", "task_id"]


def _rows(keys):
    good = {"did": st.text(min_size=1, max_size=5), "qid": st.text(min_size=1, max_size=5),
            "pos_cand_list": st.lists(st.text(min_size=1, max_size=3), max_size=2)}
    value = lambda k: VALUES | good.get(k, SCALARS)  # noqa: E731 (half plausible, half hostile)
    row = st.fixed_dictionaries({}, optional={k: value(k) for k in keys + ["extra"]})
    return st.lists(row | VALUES, min_size=1, max_size=4)


@FUZZ
@given(_rows(CAND_KEYS), _rows(QUERY_KEYS))
def test_fuzz_corpus_and_query_rows(scratch, cands, queries):
    (scratch / "corpus.jsonl").write_text("\n".join(map(dumps, cands)) + "\n")
    (scratch / "queries.jsonl").write_text("\n".join(map(dumps, queries)) + "\n")
    for c in outcome(read_candidates, scratch / "corpus.jsonl") or []:
        assert isinstance(c.did, str) and c.did and (c.txt is None or isinstance(c.txt, str))
    for q in outcome(read_queries, scratch / "queries.jsonl") or []:
        assert all(isinstance(d, str) for d in q.pos_cand_list + q.neg_cand_list)
        assert q.task_id is None or (isinstance(q.task_id, int) and not isinstance(q.task_id, bool))


@FUZZ
@given(st.binary(max_size=300))
def test_fuzz_jsonl_bytes(scratch, data):
    (scratch / "any.jsonl").write_bytes(data)
    outcome(read_candidates, scratch / "any.jsonl")
    outcome(read_queries, scratch / "any.jsonl")


# --- pack manifest --------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def pack_dir(scratch):
    pack = scratch / "pack"
    pack.mkdir()
    (pack / "tokenizer.json").write_text('{"model": {"vocab": {"a": 0}}}')
    np.save(pack / "embed_tokens.npy", np.zeros((4, 8), np.float32))
    files = {"tokenizer.json": describe_file(pack, "tokenizer.json", "tokenizer"),
             "embed_tokens.npy": describe_file(pack, "embed_tokens.npy", "embed_tokens", precision="fp32")}
    manifest = Manifest(format_version=PACK_FORMAT_VERSION, model=MODEL_DICT, method="retrv-r1",
                        preprocessor=ImageProcessorConfig().to_dict(), prompt_template={"default_system": "x"},
                        opset=18, created_by={"retrv-edge": "0"}, files=files,
                        extra={"source_checkpoint": "ckpt", "source_fingerprint": "0" * 64})
    write_manifest(pack, manifest)
    return pack, manifest.to_dict()


@FUZZ
@given(data=st.data())
def test_fuzz_manifest(pack_dir, data):
    pack, base = pack_dir
    d = data.draw(mutated(base))
    outcome(Manifest.from_dict, d)
    (pack / "manifest.json").write_text(dumps(d))
    outcome(Pack.open, pack)


@FUZZ
@given(st.binary(max_size=300))
def test_fuzz_manifest_bytes(pack_dir, data):
    pack, base = pack_dir
    (pack / "manifest.json").write_bytes(data)
    outcome(Pack.open, pack)


def test_fuzz_fixture_pack_opens(pack_dir):
    pack, base = pack_dir
    (pack / "manifest.json").write_text(dumps(base))
    assert Pack.open(pack).manifest.to_dict() == base


# --- ann.json -------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def ann_meta(scratch):
    d = scratch / "ann"
    index = HnswIndex.create(HnswParams("cosine", 4), capacity=8)
    index.add(np.arange(3), np.random.default_rng(0).random((3, 4), dtype=np.float32))
    index.save(d)
    return d / "ann.json", json.loads((d / "ann.json").read_text())


@FUZZ
@given(data=st.data())
def test_fuzz_ann_meta(ann_meta, data):
    path, base = ann_meta
    path.write_text(dumps(data.draw(mutated(base))))
    meta = outcome(read_meta, path)
    if meta is not None:
        assert isinstance(meta["params"], HnswParams) and not math.isnan(meta["capacity"])


@FUZZ
@given(st.binary(max_size=300))
def test_fuzz_ann_meta_bytes(ann_meta, data):
    path, _ = ann_meta
    path.write_bytes(data)
    outcome(read_meta, path)


# --- index.json, the index's rows, the token cache's cache.json --------------------------------------------------

@pytest.fixture(scope="module")
def index_dir(scratch):
    import sys

    sys.path.insert(0, str(Path(__file__).parent))
    from index_worker import FakeEncoder, rows

    from retrv.runtime.index.store import Index

    Index.build(FakeEncoder(), rows("b", 0, 6), scratch / "index")
    root = scratch / "index"
    return root, {name: (root / name).read_bytes() for name in ("index.json", "g000001/cache.json",
                                                                "g000001/candidates.jsonl")}


def _restore(root, originals):
    for name, data in originals.items():
        (root / name).write_bytes(data)


@FUZZ
@given(data=st.data())
def test_fuzz_index_json(index_dir, data):
    from retrv.runtime.index.store import Index

    root, originals = index_dir
    _restore(root, originals)
    (root / "index.json").write_text(dumps(data.draw(mutated(json.loads(originals["index.json"])))))
    outcome(Index.open, root)


@FUZZ
@given(st.binary(max_size=300))
def test_fuzz_index_json_bytes(index_dir, data):
    from retrv.runtime.index.store import Index

    root, originals = index_dir
    _restore(root, originals)
    (root / "index.json").write_bytes(data)
    outcome(Index.open, root)


@FUZZ
@given(data=st.data())
def test_fuzz_token_cache_json(index_dir, data):
    from retrv.runtime.index.token_cache import TokenCache

    root, originals = index_dir
    _restore(root, originals)
    meta = root / "g000001" / "cache.json"
    meta.write_text(dumps(data.draw(mutated(json.loads(originals["g000001/cache.json"])))))
    outcome(TokenCache.open, root / "cache", "full", meta)


@FUZZ
@given(_rows(["did", "txt", "img_path", "modality", "deleted"]) | st.binary(max_size=300))
def test_fuzz_index_rows(scratch, rows_or_bytes):
    from retrv.runtime.index.generations import read_rows as _read_rows

    path = scratch / "rows.jsonl"
    if isinstance(rows_or_bytes, bytes):
        path.write_bytes(rows_or_bytes)
    else:
        path.write_text("".join(dumps(r) + "\n" for r in rows_or_bytes))
    outcome(_read_rows, path)


def test_fuzz_fixture_index_opens(index_dir):
    from retrv.runtime.index.store import Index

    root, originals = index_dir
    _restore(root, originals)
    assert Index.open(root).meta.count == 6
