"""`retrv index build`, `search` and `eval` on packs whose coarse stage is an optimum-exported CLIP or SigLIP
(tests/fixtures/optimum), the reranker still the pack's own Qwen2.5-VL tower and ICM."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "optimum"


@pytest.fixture(scope="module", params=["clip", "siglip"])
def built(request, tiny_ckpt, tiny_corpus, tmp_path_factory):
    from retrv.app.cli import main

    family = request.param
    root = tmp_path_factory.mktemp(f"optimum-cli-{family}")
    assert main(["export", str(tiny_ckpt), str(root / "pack"), "--embedder", str(FIXTURES / family / "onnx")]) == 0
    assert main(["index", "build", str(root / "pack"), str(tiny_corpus / "corpus.jsonl"), str(root / "index")]) == 0
    return family, root / "pack", root / "index"


def test_index_build_stores_the_embedders_vectors(built, tiny_corpus):
    from retrv.runtime.backends import open_backend
    from retrv.runtime.index.store import Index
    from retrv.runtime.inputs.corpus import read_candidate_files
    from retrv.runtime.inputs.embedding import EmbedItem
    from retrv.runtime.pack import Pack
    from retrv.runtime.retriever import Components

    family, pack_dir, index_dir = built
    pack = Pack.open(pack_dir)
    index = Index.open(index_dir, pack=pack)
    dim = pack.manifest.extra["embedder"]["dim"]
    assert index.meta.dim == dim and index.meta.count == 15
    assert index.meta.extra["embed_template"]["embedder"] == f"optimum-{family}"
    # the search over the index gives the exact neighbours of the embedder's own vector (image+text candidates)
    comps = Components(pack, open_backend(pack, "ort", cache_dir=None))
    cands = read_candidate_files([tiny_corpus / "corpus.jsonl"])
    vectors = comps.embedder.embed([EmbedItem(c.txt, image=c.img_path or None) for c in cands], "candidate")
    query = comps.embedder.embed([EmbedItem("picture 3")], "query")
    labels, scores = index.snapshot().search(query, 5)
    want = np.argsort(-(vectors @ query[0]), kind="stable")[:5]
    assert [index.snapshot().row(int(lab))["did"] for lab in labels[0]] == [cands[i].did for i in want]
    np.testing.assert_allclose(scores[0], np.sort(vectors @ query[0])[::-1][:5], atol=1e-5)


def test_search_runs_with_text_and_image_queries(built, tiny_corpus, capsys):
    from retrv.app.cli import main

    _, pack_dir, index_dir = built
    for query in (["--text", "picture 2"], ["--image", str(tiny_corpus / "3.png")],
                  ["--text", "picture 3", "--image", str(tiny_corpus / "3.png")]):
        assert main(["search", str(index_dir), "--pack", str(pack_dir), *query, "--k", "5", "--json",
                     "--think-budget", "4", "--inspect-budget", "0"]) == 0
        out = json.loads(capsys.readouterr().out)
        assert len(out["ranked"]) == 5 and out["tokens"]["prefill_tokens"] > 0  # the reranker ran on top


def test_eval_reports_the_coarse_recall_of_the_embedders_exact_neighbours(built, tiny_corpus, capsys):
    from retrv.app.cli import main
    from retrv.runtime.backends import open_backend
    from retrv.runtime.inputs.corpus import read_candidate_files, read_queries
    from retrv.runtime.inputs.embedding import EmbedItem
    from retrv.runtime.pack import Pack
    from retrv.runtime.retriever import Components

    _, pack_dir, index_dir = built
    assert main(["eval", str(index_dir), "--pack", str(pack_dir), "--queries", str(tiny_corpus / "queries.jsonl"),
                 "--json", "--think-budget", "4", "--inspect-budget", "0", "--k", "5"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["queries"] == 4 and report["coarse"]["queries"] == 4
    # the oracle: brute force over the embedder's own vectors
    pack = Pack.open(pack_dir)
    emb = Components(pack, open_backend(pack, "ort", cache_dir=None)).embedder
    cands = read_candidate_files([tiny_corpus / "corpus.jsonl"])
    vectors = emb.embed([EmbedItem(c.txt, image=c.img_path or None) for c in cands], "candidate")
    hits = []
    for q in read_queries(tiny_corpus / "queries.jsonl"):
        qv = emb.embed([EmbedItem(q.query_txt or None, image=q.query_img_path or None)], "query")[0]
        top = {cands[i].did for i in np.argsort(-(vectors @ qv), kind="stable")[:5]}
        hits.append(bool(top & set(q.pos_cand_list)))
    assert report["coarse"]["recall@5"] == pytest.approx(np.mean(hits))


def test_serve_reranks_documents_with_the_optimum_coarse_stage(built, tiny_corpus):
    """`retrv serve`'s engine (rerank without an index): documents ordered first by the CLIP/SigLIP cosine, then
    reranked."""
    from PIL import Image

    from retrv.app.serve_engine import Document, Engine
    from retrv.runtime.inputs.dual_encoder import OptimumEmbedder
    from retrv.runtime.pack import Pack
    from retrv.runtime.rerank.budget import Budget

    _, pack_dir, _ = built
    engine = Engine(Pack.open(pack_dir), backend="ort")
    assert isinstance(engine.c.embedder, OptimumEmbedder)
    img = Image.open(tiny_corpus / "3.png").convert("RGB")
    docs = [Document("picture 3"), Document(None, img), Document("picture 9", img)]
    out = engine.rerank("picture 3", docs, Budget(think=4, inspect=0))
    assert sorted(out["order"]) == [0, 1, 2] and len(out["scores"]) == 3
    assert out["meta"]["tokens"]["prefill_tokens"] > 0  # the reranker ran on the embedder's coarse order
