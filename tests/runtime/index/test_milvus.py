"""runtime/index/milvus.py: the vectors in Milvus (Lite inside the index, or a server on loopback) behave as the
hnswlib store does: same neighbours, adds found, crash leftovers repaired, mismatches refused in one line."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("pymilvus", reason="Milvus tests need pymilvus + milvus-lite (the dev and scale extras)")

from retrv.app.cli import main as cli  # noqa: E402
from retrv.runtime.errors import IndexFileError, InputError  # noqa: E402
from retrv.runtime.index.ann import HnswIndex, HnswParams, exact_search  # noqa: E402
from retrv.runtime.index.milvus import LOCAL_DB, MilvusStore, StoreSpec, release_local  # noqa: E402
from retrv.runtime.index.store import INDEX_JSON, Index  # noqa: E402

RELIABILITY = Path(__file__).parents[2] / "reliability"
sys.path.insert(0, str(RELIABILITY))
from index_worker import FakeEncoder, rows, vector  # noqa: E402


def _overlap(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.mean([len(set(x) & set(y)) / len(x) for x, y in zip(a.tolist(), b.tolist())]))


def test_the_runtime_imports_no_milvus_client_until_an_index_uses_it():
    code = ("import sys, retrv.runtime, retrv.runtime.index.store, retrv.runtime.retriever; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('pymilvus', 'milvus_lite', 'grpc', 'ray')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stdout + out.stderr


def test_vector_store_spec_is_parsed_or_refused_in_one_line():
    assert StoreSpec.parse("hnsw").store == "hnsw"
    assert StoreSpec.parse("milvus") == StoreSpec("milvus", None, "vectors")
    s = StoreSpec.parse("milvus://127.0.0.1:19530/my_coll")
    assert (s.uri, s.collection) == ("http://127.0.0.1:19530", "my_coll")
    assert StoreSpec.parse("milvus://db.local:19530").collection.startswith("retrv_")
    for bad in ("faiss", "milvus://host", "milvus://h:99999", "http://h:1", 3):
        with pytest.raises(InputError, match="--vector-store: got .*expected hnsw, milvus or milvus://HOST:PORT"):
            StoreSpec.parse(bad)
    with pytest.raises(InputError, match="collection '9x'; expected letters, digits"):
        StoreSpec.parse("milvus://h:1/9x")


def test_milvus_and_hnswlib_return_the_same_top10_on_the_same_vectors(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2000, 32)).astype(np.float32)  # (n, dim)
    q = x[rng.choice(2000, 50, replace=False)] + 0.3 * rng.standard_normal((50, 32)).astype(np.float32)
    labels = np.arange(2000, dtype=np.int64)
    params = HnswParams("cosine", 32)
    hnsw = HnswIndex.create(params, 2000)
    hnsw.add(labels, x)
    milvus = MilvusStore.create(StoreSpec.parse("milvus"), tmp_path, params)
    milvus.add(labels, x)
    exact, _ = exact_search(x, labels, q, 10, "cosine")
    got_h, _ = hnsw.search(q, 10)
    got_m, scores = milvus.search(q, 10, below=2000)
    assert _overlap(got_m, got_h) >= 0.9 and _overlap(got_m, exact) >= 0.9
    assert np.all(np.diff(scores, axis=1) <= 1e-6)  # best first, cosine similarity (higher is better)
    release_local(tmp_path / LOCAL_DB)


@pytest.fixture(scope="module")
def tiny_milvus_index(tiny_pack, tiny_corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny-milvus") / "index"
    assert cli(["index", "build", str(tiny_pack), str(tiny_corpus / "corpus.jsonl"), str(out),
                "--vector-store", "milvus"]) == 0
    return out


def test_the_tiny_pack_ranks_the_same_on_both_stores(tiny_index, tiny_milvus_index, tiny_pack, capsys):
    hnsw, milvus = Index.open(tiny_index), Index.open(tiny_milvus_index, pack=None)
    assert milvus.info()["vector_store"]["store"] == "milvus" and milvus.meta.count == hnsw.meta.count == 15
    live = hnsw.ann.labels()
    queries = hnsw.ann.vectors(live)  # every candidate's own vector as a query
    got_h, _ = hnsw.search(queries, 10)
    got_m, _ = milvus.search(queries, 10)
    assert _overlap(got_m, got_h) >= 0.9
    capsys.readouterr()
    argv = ["search", "--pack", str(tiny_pack), "--text", "picture 3", "--no-rerank", "--json", "--k", "10"]
    assert cli(argv[:1] + [str(tiny_index)] + argv[1:]) == 0
    ranked_h = [r["did"] for r in json.loads(capsys.readouterr().out)["ranked"]]
    assert cli(argv[:1] + [str(tiny_milvus_index)] + argv[1:]) == 0
    ranked_m = [r["did"] for r in json.loads(capsys.readouterr().out)["ranked"]]
    assert len(set(ranked_h) & set(ranked_m)) >= 9


def test_eval_and_serve_run_unchanged_on_a_milvus_index(tiny_index, tiny_milvus_index, tiny_pack, tiny_corpus,
                                                        capsys):
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from retrv.app.serve import create_app

    got = {}
    for name, ix in (("hnsw", tiny_index), ("milvus", tiny_milvus_index)):
        capsys.readouterr()
        assert cli(["eval", str(ix), "--pack", str(tiny_pack), "--queries", str(tiny_corpus / "queries.jsonl"),
                    "--k", "6", "--think-budget", "8", "--json"]) == 0
        got[name] = json.loads(capsys.readouterr().out)
    assert got["milvus"]["queries"] == got["hnsw"]["queries"] == 4
    assert got["milvus"]["coarse"] == got["hnsw"]["coarse"]
    with TestClient(create_app(str(tiny_pack), str(tiny_milvus_index))) as client:
        r = client.post("/v1/search", json={"text": "picture 3", "k": 5, "rerank": False})
        assert r.status_code == 200 and len(r.json()["ranked"]) == 5


@pytest.mark.parametrize("store", ["hnsw", "milvus"])
def test_add_then_search_finds_every_added_candidate_and_delete_hides_it(tmp_path, store):
    index = Index.build(FakeEncoder(), rows("b", 0, 30), tmp_path / "ix", vector_store=store)
    added = rows("a", 0, 12)
    index.add(added, encoder=FakeEncoder())
    index.delete(["a3", "b0"])
    re = Index.open(tmp_path / "ix")
    assert re.meta.store == store and re.meta.count == 40
    snap = re.snapshot()
    for r in added:
        labels, _ = snap.search(vector(r["did"])[None], 3)
        found = [snap.row(x)["did"] for x in labels[0]]
        assert (r["did"] in found) == (r["did"] != "a3"), (r["did"], found)
    labels, _ = snap.search(np.stack([vector(d) for d in ("b0", "a3")]), 40)
    assert {snap.row(x)["did"] for x in labels.ravel()} & {"b0", "a3"} == set()
    release_local(tmp_path / "ix" / LOCAL_DB)


_KILLED_ADD = """
import os, sys
sys.path.insert(0, {rel!r})
from index_worker import FakeEncoder, rows
import retrv.runtime.index.store as store
from retrv.runtime.index.store import Index

def die(*a, **k):  # the moment between Milvus's flushed inserts and the generation's commit
    os.kill(os.getpid(), 9)

store.commit = die
Index.open({ix!r}).add(rows("k", 0, 7), encoder=FakeEncoder())
"""


def test_a_killed_add_leaves_orphans_in_milvus_that_the_next_open_deletes(tmp_path):
    ix = tmp_path / "ix"
    Index.build(FakeEncoder(), rows("b", 0, 20), ix, vector_store="milvus")
    release_local(ix / LOCAL_DB)  # Milvus Lite: one process per database file
    proc = subprocess.run([sys.executable, "-c", _KILLED_ADD.format(rel=str(RELIABILITY), ix=str(ix))],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == -9, proc.stderr[-2000:]
    store = MilvusStore.open(json.loads((ix / INDEX_JSON).read_text())["vectors"], ix, HnswParams("cosine", 16))
    assert len(store.ids(upto=20)) == 27  # the killed add's 7 vectors are in Milvus, its generation is not
    index = Index.open(ix)
    assert index.generation == 1 and index.meta.count == 20
    assert store.ids(upto=20).tolist() == list(range(20))  # repaired: the orphans are gone
    index.add(rows("k", 0, 7), encoder=FakeEncoder())  # and the same candidates can be added for real
    labels, _ = Index.open(ix).snapshot().search(vector("k4")[None], 1)
    assert Index.open(ix).row(labels[0, 0])["did"] == "k4"
    release_local(ix / LOCAL_DB)


def test_a_delete_stopped_after_its_commit_hides_the_vectors_and_the_next_open_deletes_them(tmp_path, monkeypatch):
    from retrv.runtime.index.milvus import MilvusWriter

    ix = tmp_path / "ix"
    index = Index.build(FakeEncoder(), rows("b", 0, 20), ix, vector_store="milvus")

    def stop(self):  # the moment between the commit of generation 2 and the Milvus delete
        raise KeyboardInterrupt

    monkeypatch.setattr(MilvusWriter, "after_commit", stop)
    with pytest.raises(KeyboardInterrupt):
        index.delete(["b3", "b7"])
    monkeypatch.undo()
    store = MilvusStore.open(json.loads((ix / INDEX_JSON).read_text())["vectors"], ix, HnswParams("cosine", 16))
    assert len(store.ids(upto=20)) == 20  # committed as deleted, still in Milvus
    snap = index.snapshot()
    labels, _ = snap.search(np.stack([vector("b3"), vector("b7")]), 5)  # the rows' deleted marks filter them
    assert snap.generation == 2 and {snap.row(x)["did"] for x in labels.ravel()}.isdisjoint({"b3", "b7"})
    assert labels.shape == (2, 5)
    Index.open(ix)  # repairs: the deleted labels' vectors are removed from Milvus
    assert store.ids(upto=20).tolist() == [i for i in range(20) if i not in (3, 7)]
    release_local(ix / LOCAL_DB)


def test_a_missing_vector_or_a_changed_record_is_refused_in_one_line(tmp_path):
    ix = tmp_path / "ix"
    Index.build(FakeEncoder(), rows("b", 0, 10), ix, vector_store="milvus")
    record = json.loads((ix / INDEX_JSON).read_text())
    store = MilvusStore.open(record["vectors"], ix, HnswParams("cosine", 16))
    store.delete(np.array([4]))
    with pytest.raises(IndexFileError, match=r"lacks 1 live candidates' vectors \(label 4, did 'b4'\)"):
        Index.open(ix)
    store.add(np.array([4]), vector("b4")[None])
    assert Index.open(ix).meta.count == 10
    for key, value, msg in [("ids_sha256", "0" * 64, "do not describe the live rows"),
                            ("collection", "other", "collection 'other' not found"),
                            ("index", {**record["vectors"]["index"], "M": 32}, "index is .*expected"),
                            ("uri", "ftp://x", "vectors.uri is 'ftp://x'; expected a valid value")]:
        bad = {**record, "vectors": {**record["vectors"], key: value}}
        (ix / INDEX_JSON).write_text(json.dumps(bad))
        with pytest.raises(IndexFileError, match=msg) as e:
            Index.open(ix)
        assert "\n" not in str(e.value)
    (ix / INDEX_JSON).write_text(json.dumps(record))
    release_local(ix / LOCAL_DB)


def test_migrate_moves_the_vectors_both_ways_and_keeps_the_neighbours(tmp_path, capsys):
    ix = tmp_path / "ix"
    Index.build(FakeEncoder(), rows("b", 0, 25), ix)
    probe = np.stack([vector(f"b{i}") for i in range(25)])
    before, _ = Index.open(ix).search(probe, 5)
    assert cli(["index", "migrate", str(ix), "--to", "milvus"]) == 0
    assert "moved the vectors" in capsys.readouterr().out
    index = Index.open(ix)
    assert index.meta.store == "milvus" and not (ix / f"g{index.generation:06d}" / "ann").exists()
    assert _overlap(index.search(probe, 5)[0], before) >= 0.9
    with pytest.raises(InputError, match="already keeps its vectors in 'milvus'"):
        index.migrate("milvus")
    index.migrate("hnsw")
    assert not (ix / LOCAL_DB).exists()  # the collection left behind is dropped after the commit
    again = Index.open(ix)
    assert again.meta.store == "hnsw" and _overlap(again.search(probe, 5)[0], before) >= 0.9
    assert cli(["index", "migrate", str(ix), "--to", "milvus://nohost"]) == 2
    assert "expected hnsw, milvus or milvus://HOST:PORT" in capsys.readouterr().err


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture()
def milvus_server(tmp_path):
    """A Milvus Lite gRPC server on loopback (`milvus-lite server`), the only Milvus server this machine runs."""
    port = _free_port()
    exe = Path(sys.executable).parent / "milvus-lite"
    proc = subprocess.Popen([str(exe), "server", "--data-dir", str(tmp_path / "server-data"), "--host", "127.0.0.1",
                             "--port", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    break
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            time.sleep(0.2)
        yield f"milvus://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_a_milvus_server_on_loopback_takes_the_same_code_path(tmp_path, milvus_server):
    ix = tmp_path / "ix"
    index = Index.build(FakeEncoder(), rows("b", 0, 20), ix, vector_store=f"{milvus_server}/retrv_test")
    rec = index.meta.vectors
    assert rec["uri"].startswith("http://127.0.0.1:") and rec["collection"] == "retrv_test"
    assert not (ix / LOCAL_DB).exists()
    index.add(rows("a", 0, 4), encoder=FakeEncoder())
    index.delete(["b2"])
    snap = Index.open(ix).snapshot()
    labels, _ = snap.search(vector("a1")[None], 1)
    assert snap.row(labels[0, 0])["did"] == "a1" and snap.meta.count == 23
    with pytest.raises(InputError, match="collection 'retrv_test' already exists"):
        Index.build(FakeEncoder(), rows("b", 0, 3), tmp_path / "other", vector_store=f"{milvus_server}/retrv_test")
    Index.open(ix).migrate("hnsw")
    assert Index.open(ix).meta.store == "hnsw"
    Index.open(ix).migrate(f"{milvus_server}/again")  # and back to the server, under another name
    snap = Index.open(ix).snapshot()
    assert snap.meta.vectors["collection"] == "again" and snap.row(snap.search(vector("a3")[None], 1)[0][0, 0])["did"] == "a3"
