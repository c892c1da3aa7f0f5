"""M-BEIR's files read as they ship: the root found from any JSONL under it, TREC qrels, the task instructions TSV,
dataset ids from qids, and the per-task / per-dataset breakdown with M-BEIR's own metric."""

from __future__ import annotations

import json

import pytest

from retrv.app.cli import main
from retrv.runtime.errors import InputError
from retrv.runtime.evaluate import mbeir_breakdown
from retrv.runtime.inputs.corpus import (Instructions, Query, dataset_id, find_mbeir_root, image_base,
                                         read_candidates, read_qrels, read_queries, task_label, with_qrels)
from retrv.runtime.metrics import grouped_recall, mbeir_k

HEADER = "query_modality\tcand_modality\tdataset_name\tdataset_id\tprompt_1\tprompt_2\tprompt_3\tprompt_4\n"


def _write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def _jsonl(path, rows):
    return _write(path, "".join(json.dumps(r) + "\n" for r in rows))


# -- the root -------------------------------------------------------------------------------------------------------
def test_root_is_the_nearest_folder_with_mbeir_images(tmp_path):
    root = tmp_path / "data" / "M-BEIR"
    (root / "mbeir_images" / "cirr").mkdir(parents=True)
    pool = _jsonl(root / "cand_pool" / "local" / "mbeir_cirr_task7_cand_pool.jsonl",
                  [{"did": "8:1", "txt": "", "img_path": "mbeir_images/cirr/a.png", "modality": "image"}])
    assert find_mbeir_root(pool) == root and find_mbeir_root(root) == root
    assert image_base(pool) == root and image_base(pool, tmp_path) == tmp_path  # --image-root wins
    (c,) = read_candidates(pool)
    assert c.img_path == str(root / "mbeir_images" / "cirr" / "a.png")


def test_root_with_cand_pool_and_query_but_no_images_yet(tmp_path, monkeypatch):
    root = tmp_path / "M-BEIR"
    (root / "cand_pool").mkdir(parents=True)
    q = _jsonl(root / "query" / "test" / "mbeir_cirr_task7_test.jsonl",
               [{"qid": "8:1", "query_txt": "x", "query_img_path": "mbeir_images/cirr/q.png", "task_id": 7}])
    monkeypatch.chdir(tmp_path)  # a relative path from another folder finds the same root
    assert find_mbeir_root("M-BEIR/query/test/mbeir_cirr_task7_test.jsonl") == root
    assert read_queries("M-BEIR/query/test/mbeir_cirr_task7_test.jsonl")[0].query_img_path == \
        str(root / "mbeir_images" / "cirr" / "q.png")
    (root / "cand_pool").rmdir()  # query/ alone is not a root: the file's folder again
    assert find_mbeir_root(q) is None and image_base(q) == q.parent


def test_outside_a_tree_paths_stay_relative_to_the_jsonl(tmp_path):
    pool = _jsonl(tmp_path / "mine" / "pool.jsonl", [{"did": "a", "img_path": "pics/a.png"}])
    assert find_mbeir_root(pool) is None
    assert read_candidates(pool)[0].img_path == str(tmp_path / "mine" / "pics" / "a.png")


# -- ids ------------------------------------------------------------------------------------------------------------
def test_dataset_and_task_from_qid_and_task_id():
    assert dataset_id("8:123") == 8 and dataset_id("q1") is None and dataset_id("9:") is None
    assert dataset_id("٩:1") is None  # an Arabic-Indic digit is not an M-BEIR id
    assert task_label(Query("1:5", "x", task_id=0)) == "fashion200k_task0"
    assert task_label(Query("7:5", "x", task_id=7)) == "fashioniq_task7"
    assert task_label(Query("q", "x")) == "unknown_task?"
    assert task_label(Query("42:1", "x", task_id=1)) == "42_task1"


# -- qrels ----------------------------------------------------------------------------------------------------------
def test_qrels_positives_are_relevance_above_zero(tmp_path):
    a = _write(tmp_path / "a.txt", "8:1 0 8:10 1\n8:1 0 8:11 0\n8:1\t0\t8:12\t2\n\n8:2 0 8:20 0\n")
    b = _write(tmp_path / "b.txt", "1:1 0 1:5 1\r\n8:1 0 8:13 1\n")
    assert read_qrels(a) == {"8:1": ("8:10", "8:12"), "8:2": ()}
    assert read_qrels([a, b]) == {"8:1": ("8:10", "8:12", "8:13"), "8:2": (), "1:1": ("1:5",)}
    qs = with_qrels([Query("8:1", "x", pos_cand_list=("8:99",)), Query("8:3", "y", pos_cand_list=("8:3",))],
                    read_qrels(a))
    assert [q.pos_cand_list for q in qs] == [("8:10", "8:12"), ()]  # replaced, also for a query they do not judge


@pytest.mark.parametrize("text, fragment", [
    ("8:1 0 8:10 1\n8:1 0 8:11\n", "a.txt:2"),
    ("8:1 0 8:10 yes\n", "a.txt:1"),
    ("8:1 0 8:10 1.0\n", "integer relevance"),
    ("8:1 0 8:10 " + "9" * 5000 + "\n", "a.txt:1"),
    ("\n\n", "no judgements"),
])
def test_bad_qrels_are_one_line_errors(tmp_path, text, fragment):
    with pytest.raises(InputError) as e:
        read_qrels(_write(tmp_path / "a.txt", text))
    assert fragment in str(e.value) and "\n" not in str(e.value) and len(str(e.value)) < 300


# -- instructions ---------------------------------------------------------------------------------------------------
TSV = HEADER + ("text\timage\tFashion200K\t1\tfind a product photo matching the caption\tshow me this item\t\t\n"
                "image,text\timage\tCIRR\t8\tretrieve a picture like this one, changed as described\t\t\t\n"
                "image\ttext\tMSCOCO\t9\t\"Find a caption for the image\"\t\t\t\n")


def test_instructions_are_prepended_as_uniir_writes_them(tmp_path):
    inst = Instructions.read(_write(tmp_path / "i.tsv", TSV))
    qs = [Query("1:1", "a red dress", task_id=0),
          Query("8:1", "make it night.", "/x.png", "text,image", task_id=7),  # modality order does not matter
          Query("9:1", None, "/y.png", "image", task_id=3)]
    assert [q.query_txt for q in inst.apply(qs)] == [
        "Find a product photo matching the caption. A red dress.",
        "Retrieve a picture like this one, changed as described. Make it night.",
        "Find a caption for the image."]  # an image-only query's text is the instruction alone
    assert inst.apply(qs[:1], 2)[0].query_txt == "Show me this item. A red dress."
    assert inst.apply([Query("1:2", "b", task_id=None)])[0].query_txt.startswith("Find a product")  # one row fits
    with pytest.raises(InputError, match="variant 2; its task has 1"):
        inst.apply(qs[1:2], 2)
    with pytest.raises(InputError, match="0 instruction rows"):
        inst.apply([Query("1:1", "x", task_id=1)])  # Fashion200K has no text -> text task
    with pytest.raises(InputError, match="no M-BEIR dataset id"):
        inst.apply([Query("q1", "x", task_id=0)])


@pytest.mark.parametrize("text, fragment", [
    ("dataset_id\tprompt_1\n9\tx\n", "lacks query_modality, cand_modality"),
    ("query_modality\tcand_modality\tdataset_id\n", "lacks prompt_1"),
    (HEADER + "text\timage\tCIRR\tnine\tx\n", "i.tsv:2: dataset_id 'nine'"),
    (HEADER + "text\timage\tCIRR\n", "i.tsv:2: dataset_id ''"),
    (HEADER + "text\timage\tCIRR\t8\t\t\t\t\n", "i.tsv:2: no prompt"),
    (HEADER, "no instruction rows"),
    ("", "lacks query_modality"),
])
def test_malformed_instructions_are_one_line_errors(tmp_path, text, fragment):
    with pytest.raises(InputError) as e:
        Instructions.read(_write(tmp_path / "i.tsv", text))
    assert fragment in str(e.value) and "\n" not in str(e.value)


def test_eval_refuses_a_malformed_instructions_file_in_one_line(tmp_path, capsys):
    root = tmp_path / "M-BEIR"
    (root / "mbeir_images").mkdir(parents=True)
    _write(root / "instructions" / "query_instructions.tsv", "dataset\tprompt\nfoo\tbar\n")
    q = _jsonl(root / "query" / "test" / "mbeir_cirr_task7_test.jsonl",
               [{"qid": "8:1", "query_txt": "x", "pos_cand_list": ["8:2"], "task_id": 7}])
    # the queries are read (and refused) before the pack or the index is opened
    assert main(["eval", str(tmp_path / "no-index"), "--pack", str(tmp_path / "no-pack"), "--queries", str(q)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "query_instructions.tsv" in err and "lacks query_modality" in err
    assert main(["eval", "a", "b", "--pack", "p", "--queries", str(q)]) == 2  # two indexes for one query file
    assert "expected one index" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:  # argparse's usage error
        main(["eval", "a", "--pack", "p", "--queries", str(q), "--no-instructions", "--instruction", "2"])
    assert e.value.code == 2


# -- the breakdown --------------------------------------------------------------------------------------------------
def test_grouped_recall_and_mbeir_metric_per_task_and_dataset():
    assert mbeir_k("FashionIQ") == 10 and mbeir_k("fashion200k") == 10 and mbeir_k("cirr") == 5
    qs = [Query("1:1", "a", task_id=0), Query("1:2", "b", task_id=0), Query("1:3", "c", task_id=3),
          Query("8:1", "d", task_id=7), Query("8:2", "e", task_id=7)]
    ranked = [[f"x{i}" for i in range(10)] + ["p"]] * 5
    ranked = [["p"] + ranked[0][:9], ranked[0][:6] + ["p"], ranked[0][:8] + ["p"], ranked[0][:3] + ["p"],
              ranked[0][:4] + ["p"]]  # positive at ranks 1, 7, 9, 4, 5
    pos = [{"p"}] * 4 + [set()]  # the last query has no positive
    m = mbeir_breakdown(qs, {"coarse": ranked}, pos)
    f0, f3, c7 = (m["tasks"][t] for t in ("fashion200k_task0", "fashion200k_task3", "cirr_task7"))
    assert f0["metric"] == "recall@10" and f0["coarse"] == {"recall@1": 0.5, "recall@5": 0.5, "recall@10": 1.0,
                                                           "mbeir": 1.0}
    assert f3["coarse"]["mbeir"] == 1.0 and f3["task_id"] == 3
    assert c7["metric"] == "recall@5" and c7["queries"] == 1 and c7["skipped"] == 1 and c7["coarse"]["mbeir"] == 1.0
    assert m["datasets"]["fashion200k"]["coarse"]["recall@5"] == pytest.approx(1 / 3)
    assert m["average"] == {"tasks": 3, "coarse": 1.0}
    m = mbeir_breakdown(qs[3:], {"coarse": ranked[3:]}, [set(), set()])
    assert m["tasks"]["cirr_task7"]["coarse"] is None and m["average"] == {"tasks": 0, "coarse": None}
    assert grouped_recall([["a"], ["b"]], [{"a"}, {"a"}], ["g", "h"], (1,)) == {
        "g": {"recall@1": 1.0, "queries": 1, "skipped": 0}, "h": {"recall@1": 0.0, "queries": 1, "skipped": 0}}


def test_progress_bars_draw_on_a_terminal_only(monkeypatch):
    import io
    import sys

    from retrv.app.commands import progress_bar

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    for stream, drawn in ((io.StringIO(), False), (Terminal(), True)):
        monkeypatch.setattr(sys, "stderr", stream)
        with progress_bar(3, "query", "eval") as bar:
            bar.update(3)
        assert ("eval:   0%" in stream.getvalue()) is drawn  # (later updates are throttled to 10 a second)
