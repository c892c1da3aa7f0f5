"""End to end on a tiny random checkpoint: index build, search, eval; ONNX Runtime and PyTorch agree."""

from __future__ import annotations

import io
import json
import shutil
import threading
from contextlib import redirect_stdout

import numpy as np
import pytest

from retrv.export.pack_export import export_pack
from retrv.model.tiny import write_tiny_checkpoint
from scripted_backend import ScriptedBackend
from retrv.runtime.rerank.budget import Budget
from retrv.app.cli import main as cli
from retrv.runtime.inputs.corpus import Candidate, write_jsonl
from retrv.runtime.inputs.embedding import EmbedItem
from retrv.runtime.errors import IndexFileError, RetrvError
from retrv.runtime.index.store import Index
from retrv.runtime.pack import Pack
import retrv.export.torch_backend  # noqa: F401  (registers the PyTorch fallback with the runtime)
from retrv.runtime.backends import open_backend
from retrv.runtime.retriever import CandidateEncoder, Components, Retriever


@pytest.fixture(scope="module")
def world(tiny_ckpt, tiny_pack, tiny_corpus, tiny_index):
    return tiny_ckpt, tiny_pack, tiny_corpus, tiny_index


def _json(argv):
    buf = io.StringIO()
    with redirect_stdout(buf):
        assert cli(argv) == 0
    return json.loads(buf.getvalue())


def test_search_json_reports_ranking_tokens_and_timings(world):
    _, pack_dir, data, index_dir = world
    out = _json(["search", str(index_dir), "--pack", str(pack_dir), "--text", "picture 3", "--image",
                 str(data / "3.png"), "--k", "10", "--window", "4", "--stride", "2", "--think-budget", "20", "--json"])
    assert len(out["ranked"]) == 10 and len({r["did"] for r in out["ranked"]}) == 10
    assert out["tokens"]["prefill_tokens"] > 0 and out["tokens"]["think_tokens"] <= 20
    assert len(out["windows"]) == 4  # K=10, window 4, stride 2 -> starts 6, 4, 2, 0
    for stage in ("vision", "embed", "search", "icm", "prefill", "decode", "total"):
        assert stage in out["timings_ms"]


def test_eval_reports_recall_tokens_and_latency(world):
    _, pack_dir, data, index_dir = world
    out = _json(["eval", str(index_dir), "--pack", str(pack_dir), "--queries", str(data / "queries.jsonl"),
                 "--k", "6", "--think-budget", "8", "--json"])
    assert out["queries"] == 4
    for name in ("coarse", "reranked"):
        assert set(out[name]) >= {"recall@1", "recall@5", "recall@10"}
    assert out["tokens_per_query"]["total_tokens"] > 0
    assert {"p50", "p95"} <= set(out["latency_ms"]["decode"])


def test_eval_counts_which_hard_negatives_outrank_the_target(world, tmp_path):
    from retrv.runtime.metrics import hard_negative_wins

    _, pack_dir, data, index_dir = world
    rows = [{"qid": f"q{i}", "query_txt": f"picture {i}", "query_img_path": "", "pos_cand_list": [f"c{i}"],
             "neg_cand_list": [f"c{i + 1}", f"c{i + 2}"], "neg_types": ["colour", "shape"], "task_id": 0}
            for i in range(4)]
    write_jsonl(tmp_path / "queries.jsonl", rows)
    out = _json(["eval", str(index_dir), "--pack", str(pack_dir), "--queries", str(tmp_path / "queries.jsonl"),
                 "--k", "6", "--think-budget", "8", "--json"])
    # The oracle: the same coarse rankings from `search`, scored by the metric directly.
    coarse = []
    for r in rows:
        got = _json(["search", str(index_dir), "--pack", str(pack_dir), "--text", r["query_txt"], "--k", "6",
                     "--no-rerank", "--json"])
        coarse.append([x["did"] for x in sorted(got["ranked"], key=lambda x: x["coarse_rank"])])
    expected = hard_negative_wins(coarse, [r["pos_cand_list"] for r in rows], [r["neg_cand_list"] for r in rows],
                                  [r["neg_types"] for r in rows])
    assert out["hard_negatives"]["coarse"] == expected and expected["all"]["pairs"] > 0
    assert set(out["hard_negatives"]["reranked"]) <= {"all", "colour", "shape"}
    buf = io.StringIO()
    with redirect_stdout(buf):
        assert cli(["eval", str(index_dir), "--pack", str(pack_dir), "--queries", str(tmp_path / "queries.jsonl"),
                    "--k", "6", "--no-rerank"]) == 0
    w = expected["all"]
    assert f"coarse    hard negatives ranked above the target: all {w['wins']:.2f} ({w['pairs']})" in buf.getvalue()

    rows[1]["neg_types"] = "colour"
    write_jsonl(tmp_path / "bad.jsonl", rows)
    assert cli(["eval", str(index_dir), "--pack", str(pack_dir), "--queries", str(tmp_path / "bad.jsonl"),
                "--k", "6", "--no-rerank"]) == 2


def test_ort_and_torch_backends_give_the_same_ranking(world):
    ckpt, pack_dir, data, index_dir = world
    pack = Pack.open(pack_dir)
    index = Index.open(index_dir, pack=pack)
    results = {}
    for name in ("ort", "torch"):
        r = Retriever(pack, index, backend=name, checkpoint=ckpt, cache_dir=None) if name == "ort" else \
            Retriever(pack, index, backend=name, checkpoint=ckpt)
        res = r.search(text="picture 2", image=str(data / "5.png"), k=8, budget=Budget(think=16), window=4, stride=2)
        results[name] = ([x["did"] for x in res.ranked], res.to_dict()["tokens"], [w.text for w in res.rerank.windows])
    assert results["ort"] == results["torch"]


def test_index_built_with_another_pack_is_refused(world, tmp_path):
    ckpt, pack_dir, _, index_dir = world
    other = export_pack(write_tiny_checkpoint(tmp_path / "other", icm=True, seed=6), tmp_path / "other-pack")
    with pytest.raises(IndexFileError, match="built with pack"):
        Index.open(index_dir, pack=Pack.open(other))
    assert cli(["search", str(index_dir), "--pack", str(other), "--text", "x"]) == 2


def test_truncated_or_tampered_index_is_refused(world, tmp_path):
    _, _, _, index_dir = world
    for victim, how in (("g000001/ann/hnsw.bin", "truncate"), ("cache/tokens.i8", "flip"),
                        ("g000001/candidates.jsonl", "truncate"), ("g000001/candidates.jsonl", "flip"),
                        ("g000001/cache.json", "flip"), ("index.json", "truncate")):
        bad = tmp_path / f"bad-{how}-{victim.replace('/', '_')}"
        shutil.copytree(index_dir, bad)
        data = bytearray((bad / victim).read_bytes())
        if how == "truncate":
            data = data[: len(data) // 2]
        else:
            data[len(data) // 3] ^= 0x55
        (bad / victim).write_bytes(bytes(data))
        with pytest.raises(RetrvError) as e:
            Index.open(bad)
        assert "\n" not in str(e.value) and str(bad) in str(e.value)


def test_add_and_delete_without_rebuild_and_search_while_adding(world, tmp_path):
    _, pack_dir, data, index_dir = world
    work = tmp_path / "idx"
    shutil.copytree(index_dir, work)
    pack = Pack.open(pack_dir)
    index = Index.open(work, pack=pack)
    comps = Components(pack, open_backend(pack, "ort", cache_dir=None))
    encoder = CandidateEncoder(comps)
    before = index.meta.count
    new = [Candidate(did=f"n{i}", txt=f"new picture {i}", img_path=str(data / f"{i}.png"), modality="image,text")
           for i in range(6)]
    query_vec = comps.embedder.embed([EmbedItem("picture 1")], "query")
    errors = []

    def searcher():
        try:
            for _ in range(20):
                labels, _ = index.search(query_vec, 5)
                assert len(set(labels[0].tolist())) == labels.shape[1]
        except Exception as e:  # noqa: BLE001 - surfaced below
            errors.append(e)

    threads = [threading.Thread(target=searcher) for _ in range(4)]
    for t in threads:
        t.start()
    index.add(new[:3], encoder=encoder)
    index.add(new[3:], encoder=encoder)
    for t in threads:
        t.join()
    assert not errors
    index.delete(["c0"])
    reopened = Index.open(work, pack=pack)
    assert reopened.meta.count == before + 6 - 1
    live = {r["did"] for r in reopened.rows if not r["deleted"]}
    assert {f"n{i}" for i in range(6)} <= live and "c0" not in live
    # cached tokens of the added candidates equal a fresh encoding (int8 round trip)
    fresh = encoder.encode(new[:1]).items[0].tokens
    label = next(i for i, r in enumerate(reopened.rows) if r["did"] == "n0")
    np.testing.assert_allclose(reopened.cache.tokens(label), fresh, atol=np.abs(fresh).max() / 127)
    labels, _ = reopened.search(encoder.encode(new[2:3]).vectors, 1)
    assert reopened.row(labels[0, 0])["did"] == "n2"  # an added item is found by its own vector


@pytest.fixture(scope="module")
def plain_world(tmp_path_factory, world):
    """A plain Qwen2.5-VL (no ICM: V-Retrver's kind) over the same corpus."""
    _, _, data, _ = world
    root = tmp_path_factory.mktemp("plain")
    ckpt = write_tiny_checkpoint(root / "ckpt", icm=False, seed=8)
    pack_dir = export_pack(ckpt, root / "pack")
    index_dir = root / "index"
    assert cli(["index", "build", str(pack_dir), str(data / "corpus.jsonl"), str(index_dir)]) == 0
    return ckpt, pack_dir, data, index_dir


def test_plain_checkpoint_search_with_tools_same_on_ort_and_torch(plain_world):
    ckpt, pack_dir, data, index_dir = plain_world
    assert Pack.open(pack_dir).manifest.method == "listwise"
    outs = []
    for backend in ("ort", "torch"):
        outs.append(_json(["search", str(index_dir), "--pack", str(pack_dir), "--text", "picture 4", "--image",
                           str(data / "4.png"), "--k", "6", "--window", "4", "--stride", "2", "--think-budget", "12",
                           "--tool-budget", "2", "--backend", backend, "--checkpoint", str(ckpt), "--json"]))
    strip = lambda o: {k: v for k, v in o.items() if k not in ("timings_ms", "ranked")}  # noqa: E731
    assert strip(outs[0]) == strip(outs[1])  # answers, windows, traces, token accounting: identical
    assert [r["did"] for r in outs[0]["ranked"]] == [r["did"] for r in outs[1]["ranked"]]
    np.testing.assert_allclose([r["score"] for r in outs[0]["ranked"]], [r["score"] for r in outs[1]["ranked"]],
                               atol=1e-5)
    assert all(w["ranking"] is not None or w["fallback"] for w in outs[0]["windows"])


class _ScriptedDecoder(ScriptedBackend):
    """Real vision/embedding graphs from `real`, a scripted decoder: drives a tool call through the real pipeline."""

    def __init__(self, real, *a, **k):
        super().__init__(*a, **k)
        self.real = real

    def vision(self, feeds):
        return self.real.vision(feeds)

    def embed(self, *a):
        return self.real.embed(*a)


def test_tool_results_are_encoded_by_the_real_vision_graph(plain_world):
    ckpt, pack_dir, data, index_dir = plain_world
    pack = Pack.open(pack_dir)
    index = Index.open(index_dir, pack=pack)
    comps = Components(pack, open_backend(pack, "ort", cache_dir=None))
    crop = json.dumps({"name": "crop_image", "arguments": {"bbox_2d": [0.2, 0.2, 0.6, 0.6], "target_image": 1}})
    script = comps.tokenizer.encode_text(f"<tool_call>{crop}</tool_call><answer>[2, 1]</answer>")
    calls = []
    real = comps.backend
    orig = real.vision

    def spy(feeds):
        calls.append(feeds["patches"].shape)
        return orig(feeds)

    real.vision = spy
    backend = _ScriptedDecoder(real, comps.table, script, end_token=comps.cfg.tokens.eos_token_ids[0])
    res = Retriever(pack, index, backend=backend).search(text="picture 1", image=str(data / "1.png"), k=3,
                                                         budget=Budget(think=400, tool=1))
    w = res.rerank.windows[0]
    assert w.tool_calls[0]["ok"] and "Here is the cropped image." in w.text
    assert len(calls) == 2  # the query image, then the crop
    assert [r["coarse_rank"] for r in res.ranked][:2] == [1, 0]


def test_cli_index_add_with_image_root_then_search_finds_it(world, tmp_path):
    _, pack_dir, data, index_dir = world
    work = tmp_path / "idx"
    shutil.copytree(index_dir, work)
    elsewhere = tmp_path / "lists"
    elsewhere.mkdir()
    write_jsonl(elsewhere / "new.jsonl", [{"did": "new3", "txt": "picture 3 again", "img_path": "3.png"}])
    assert cli(["index", "add", str(work), str(elsewhere / "new.jsonl"), "--pack", str(pack_dir)]) == 2  # not there
    assert cli(["index", "add", str(work), str(elsewhere / "new.jsonl"), "--pack", str(pack_dir),
                "--image-root", str(data)]) == 0
    pack = Pack.open(pack_dir)
    index = Index.open(work, pack=pack)
    assert index.generation == 2 and index.rows[-1]["img_path"] == str(data / "3.png")
    # the same candidate added through the Python API with the pack's own encoder gets the same vector
    index.add([{"did": "new3b", "txt": "picture 3 again", "img_path": str(data / "3.png")}])
    snap = index.snapshot()
    a, b = snap.label("new3"), snap.label("new3b")
    np.testing.assert_array_equal(snap.cache.tokens(a), snap.cache.tokens(b))
    vec = np.asarray(snap.ann._index.get_items([a, b]))
    np.testing.assert_allclose(vec[0], vec[1], atol=1e-6)


def test_eval_resolves_query_images_against_image_root(world, tmp_path, capsys):
    _, pack_dir, data, index_dir = world
    shutil.copy(data / "queries.jsonl", tmp_path / "queries.jsonl")  # images named relative to data/, not here
    args = ["eval", str(index_dir), "--pack", str(pack_dir), "--queries", str(tmp_path / "queries.jsonl"), "--k", "3",
            "--no-rerank", "--json"]
    assert cli(args) == 2 and "1.png" in capsys.readouterr().err
    out = _json(args + ["--image-root", str(data)])
    assert out["queries"] == 4
