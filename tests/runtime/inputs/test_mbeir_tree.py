"""A tree laid out as M-BEIR ships (root with mbeir_images/, cand_pool/local/, query/test/, qrels/test/,
instructions/) is indexed and evaluated as it lies, from another working directory, and eval's per-task figures
equal those recomputed by hand from `retrv search --json` rankings: local pools (one index per task) and the global
union pool (one index over every pool file)."""

from __future__ import annotations

import io
import json
import os
from contextlib import redirect_stdout

import pytest

from retrv.app.cli import main
from retrv.app.demo import synthetic_image
from retrv.runtime.index.store import Index

POOL_SIZE = 10  # k = 10 covers a local pool: R@10 (Fashion200K's metric) and R@5 can differ on the global one
INSTRUCTION = {"fashion200k": "Find a product photo matching the caption.",
               "cirr": "Retrieve a picture like this one, changed as described."}
TSV = ("query_modality\tcand_modality\tdataset_name\tdataset_id\tprompt_1\tprompt_2\tprompt_3\tprompt_4\n"
       "text\timage\tFashion200K\t1\tfind a product photo matching the caption\tshow me this item\t\t\n"
       "image,text\timage\tCIRR\t8\tretrieve a picture like this one, changed as described\t\t\t\n")


def _jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    """root/: two tasks, Fashion200K task 0 (text -> image) and CIRR task 7 ((image, text) -> image), three queries
    each. Fashion200K's qrels differ from its query file's pos_cand_list on purpose: the qrels must win."""
    root = tmp_path_factory.mktemp("mbeir") / "M-BEIR"
    for ds, n, seed in (("fashion200k", 1, 300), ("cirr", 8, 400)):
        (root / "mbeir_images" / ds).mkdir(parents=True)
        for i in range(POOL_SIZE):
            synthetic_image(seed + i, (96, 112)).save(root / "mbeir_images" / ds / f"{i}.png")
    for i in range(3):
        synthetic_image(500 + i, (104, 96)).save(root / "mbeir_images" / "cirr" / f"q{i}.png")
    _jsonl(root / "cand_pool/local/mbeir_fashion200k_task0_cand_pool.jsonl",
           [{"did": f"1:{i}", "txt": "", "img_path": f"mbeir_images/fashion200k/{i}.png", "modality": "image"}
            for i in range(POOL_SIZE)])
    _jsonl(root / "cand_pool/local/mbeir_cirr_task7_cand_pool.jsonl",
           [{"did": f"8:{i}", "txt": None, "img_path": f"mbeir_images/cirr/{i}.png", "modality": "image"}
            for i in range(POOL_SIZE)])
    _jsonl(root / "query/test/mbeir_fashion200k_task0_test.jsonl",
           [{"qid": f"1:{i}", "query_txt": f"a dress in shade {i}", "query_img_path": None, "query_modality": "text",
             "query_src_content": None, "pos_cand_list": [f"1:{i}"], "neg_cand_list": [], "task_id": 0}
            for i in range(3)])
    _jsonl(root / "query/test/mbeir_cirr_task7_test.jsonl",
           [{"qid": f"8:{i}", "query_txt": f"make it look like picture {i}",
             "query_img_path": f"mbeir_images/cirr/q{i}.png", "query_modality": "image,text",
             "query_src_content": "", "pos_cand_list": [f"8:{i}"], "neg_cand_list": [f"8:{i + 1}"], "task_id": 7}
            for i in range(3)])
    (root / "qrels/test").mkdir(parents=True)
    (root / "qrels/test/mbeir_fashion200k_task0_test_qrels.txt").write_text(
        "1:0 0 1:7 1\n1:0 0 1:0 0\n1:1 0 1:1 1\n1:2 0 1:2 1\n1:2 0 1:9 1\n")
    (root / "qrels/test/mbeir_cirr_task7_test_qrels.txt").write_text("".join(f"8:{i} 0 8:{i} 1\n" for i in range(3)))
    (root / "instructions").mkdir()
    (root / "instructions/query_instructions.tsv").write_text(TSV)
    return root


def _run(argv) -> dict:
    buf = io.StringIO()
    with redirect_stdout(buf):
        assert main(argv) == 0
    return json.loads(buf.getvalue()) if "--json" in argv else buf.getvalue()


def _hand_figures(index, pack, root, task, qrels, flags, instructions=True):
    """Recall@1/5/10 and M-BEIR's metric of one task, from `retrv search --json` rankings, without retrv's metrics."""
    ds = task.split("_")[0]
    rows = [json.loads(line) for line in (root / f"query/test/mbeir_{task}_test.jsonl").read_text().splitlines()]
    positives = {}
    for line in qrels.read_text().splitlines():
        qid, _, did, rel = line.split()
        positives.setdefault(qid, set())
        if int(rel) > 0:
            positives[qid].add(did)
    hits = {name: {k: 0 for k in (1, 5, 10)} for name in ("coarse", "reranked")}
    for r in rows:
        text = f"{INSTRUCTION[ds]} {r['query_txt'][0].upper()}{r['query_txt'][1:]}." if instructions else r["query_txt"]
        argv = ["search", index, "--pack", pack, "--text", text, "--json", *flags]
        if r["query_img_path"]:
            argv += ["--image", str(root / r["query_img_path"])]
        got = _run(argv)["ranked"]
        for name, ranking in (("coarse", sorted(got, key=lambda x: x["coarse_rank"])), ("reranked", got)):
            first = next((n for n, x in enumerate(ranking, 1) if x["did"] in positives[r["qid"]]), None)
            for k in (1, 5, 10):
                hits[name][k] += first is not None and first <= k
    metric = 10 if ds == "fashion200k" else 5
    return {name: {**{f"recall@{k}": h[k] / len(rows) for k in (1, 5, 10)}, "mbeir": h[metric] / len(rows)}
            for name, h in hits.items()}


def test_mbeir_tree_indexed_and_evaluated_in_place(tree, tiny_pack, tmp_path, monkeypatch, capsys):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # every path below is relative to a folder outside the tree
    rel = lambda p: os.path.relpath(p, elsewhere)  # noqa: E731
    pack = rel(tiny_pack)
    tasks = ("fashion200k_task0", "cirr_task7")
    pools = [rel(tree / f"cand_pool/local/mbeir_{t}_cand_pool.jsonl") for t in tasks]
    queries = [rel(tree / f"query/test/mbeir_{t}_test.jsonl") for t in tasks]
    qrels = [tree / f"qrels/test/mbeir_{t}_test_qrels.txt" for t in tasks]
    for t, pool in zip(tasks, pools):
        assert main(["index", "build", pack, pool, f"local-{t}"]) == 0
    assert main(["index", "build", pack, *pools, "global"]) == 0  # the union pool: several files, one index
    rows = Index.open("global").rows
    assert len(rows) == 2 * POOL_SIZE  # stored absolute, under the tree's root
    assert {r["img_path"] for r in rows} == {str(tree / "mbeir_images" / ds / f"{i}.png")
                                             for ds in ("fashion200k", "cirr") for i in range(POOL_SIZE)}

    flags = ["--k", "10", "--think-budget", "6"]
    local = _run(["eval", *(f"local-{t}" for t in tasks), "--pack", pack, "--queries", *queries,
                  "--qrels", *map(str, qrels), "--json", *flags])
    m = local["mbeir"]
    assert local["settings"]["pool"] == "local" and local["settings"]["instruction_variant"] == 1
    assert list(m["tasks"]) == list(tasks) and set(m["datasets"]) == {"fashion200k", "cirr"}
    assert m["tasks"]["fashion200k_task0"]["metric"] == "recall@10" and m["tasks"]["cirr_task7"]["metric"] == "recall@5"
    for t, q in zip(tasks, qrels):
        want = _hand_figures(f"local-{t}", pack, tree, t, q, flags)
        for name in ("coarse", "reranked"):
            assert m["tasks"][t][name] == pytest.approx(want[name]), (t, name)
            assert m["datasets"][t.split("_")[0]][name] == pytest.approx(want[name])
    for name in ("coarse", "reranked"):
        assert m["average"][name] == pytest.approx((m["tasks"][tasks[0]][name]["mbeir"]
                                                    + m["tasks"][tasks[1]][name]["mbeir"]) / 2)

    flags = ["--k", "10", "--no-rerank"]
    glob = _run(["eval", "global", "--pack", pack, "--queries", *queries, "--qrels", *map(str, qrels), "--json",
                 *flags])
    assert glob["settings"]["pool"] == "one index" and "reranked" not in glob["mbeir"]["average"]
    for t, q in zip(tasks, qrels):
        want = _hand_figures("global", pack, tree, t, q, flags)
        assert glob["mbeir"]["tasks"][t]["coarse"] == pytest.approx(want["coarse"]), t

    # without instructions the raw query text is searched; figures follow the same rankings
    plain = _run(["eval", "global", "--pack", pack, "--queries", queries[0], "--qrels", str(qrels[0]),
                  "--no-instructions", "--json", *flags])
    want = _hand_figures("global", pack, tree, tasks[0], qrels[0], flags, instructions=False)
    assert plain["mbeir"]["tasks"][tasks[0]]["coarse"] == pytest.approx(want["coarse"])
    assert plain["settings"]["instruction_variant"] is None

    text = _run(["eval", "global", "--pack", pack, "--queries", *queries, "--qrels", *map(str, qrels), *flags])
    assert "M-BEIR task (one index)" in text and "fashion200k_task0" in text and "recall@10" in text
    assert "average over 2 tasks (paper-style" in text
