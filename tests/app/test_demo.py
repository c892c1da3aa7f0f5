"""`retrv demo`: the product path on the shipped default, and the labelled random-weights path without it."""

from __future__ import annotations

import io
import json
import re
from contextlib import redirect_stdout
from pathlib import Path

import pytest

from retrv.app import demo
from retrv.app.cli import main as cli

pytest.importorskip("torch")

ROWS = ("coarse stage only", "rerank, no inspection", "rerank + inspection")


def _run(argv: list[str]) -> str:
    buf = io.StringIO()
    with redirect_stdout(buf):
        assert cli(argv) == 0
    return buf.getvalue()


def test_without_a_default_the_demo_says_it_runs_random_weights(tmp_path, monkeypatch):
    monkeypatch.setattr(demo, "default_checkpoint", lambda: tmp_path / "no-default")
    out = _run(["demo", "--cache-dir", str(tmp_path / "cache")])
    assert "RANDOM WEIGHTS" in out and "retrieves nothing" in out
    assert re.search(r"generated \[\d+(, \d+)*\]", out)


@pytest.mark.skipif(not (demo.default_checkpoint() / "config.json").is_file(),
                    reason="model/default is not in this tree (python -m retrv.train.run model/default)")
def test_demo_on_the_shipped_default_prints_what_it_measured(tmp_path):
    cache = tmp_path / "cache"
    out = _run(["demo", "--cache-dir", str(cache), "--queries", "4"])
    assert "RANDOM WEIGHTS" not in out and "INT8" in out
    assert out.count("reasoning: ") == demo.SHOWN and out.count("gold   ") == demo.SHOWN
    assert "<|image_pad|>" not in out  # an inspected candidate's tokens print as "<16 image tokens>"
    runs = json.loads(next(cache.glob("default-*/last_run.json")).read_text())
    assert list(runs) == list(ROWS)
    for name in ROWS:  # the printed table is the evaluation it saved, not other numbers
        row = next(line for line in out.splitlines() if line.startswith(name))
        r1, r5 = (float(x) for x in row[len(name):].split()[:2])
        res = runs[name]["reranked" if "rerank" in name else "coarse"]
        assert (r1, r5) == (round(res["recall@1"], 3), round(res["recall@5"], 3))
        assert runs[name]["queries"] == 4
    assert runs["rerank, no inspection"]["tokens_per_query"]["inspected"] == 0
    header = next(line for line in out.splitlines() if line.startswith("hard negatives ranked above the target"))
    kinds = header.split(": ")[1].split(" / ")
    assert kinds == ["colour", "detail", "position", "shape"]  # the demo's scenes name every hard negative's kind
    line = next(line for line in out.splitlines() if line.startswith("  coarse stage only"))
    wins = runs["coarse stage only"]["hard_negatives"]["coarse"]
    assert line.split()[-7::2] == [f"{wins[k]['wins']:.2f}" for k in kinds]

    again = _run(["demo", "--cache-dir", str(cache), "--queries", "4"])  # everything cached: same answers
    setup = dict(re.findall(r"(\w+) ([\d.]+)", again.split("setup (s, cached after the first run): ")[1]))
    assert all(float(v) < 1.0 for v in setup.values()), setup
    assert json.loads(next(cache.glob("default-*/last_run.json")).read_text())[ROWS[2]]["reranked"] == \
        runs[ROWS[2]]["reranked"]


def test_traces_print_appended_images_as_a_token_count():
    trace = "1+ 2-\n<inspection-index-start>1<inspection-index-end>\n[1] <|vision_start|>" + "<|image_pad|>" * 16 + \
        "<|vision_end|>\n yes\n</think>"
    assert demo._readable(trace) == "1+ 2- <inspection-index-start>1<inspection-index-end> [1] <16 image tokens>  yes </think>"


def test_default_checkpoint_is_inside_the_installed_package():
    assert demo.default_checkpoint() == Path(demo.__file__).resolve().parents[1] / "model" / "default"


def test_demo_scenes_follow_the_objects_per_scene_the_default_was_trained_on(tmp_path):
    assert demo._max_objects(tmp_path) == 3  # no training.json: the generator's default
    (tmp_path / "training.json").write_text(json.dumps({"config": {"data": {"max_objects": 2}}}))
    assert demo._max_objects(tmp_path) == 2
    (tmp_path / "training.json").write_text("{not json")
    assert demo._max_objects(tmp_path) == 3
