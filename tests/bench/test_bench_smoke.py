"""The benchmark's quick path on the tiny preset, end to end, so that CI catches a broken bench.

`bench/run_all.py --quick` as a user runs it, into a temporary directory (never over docs/ or bench/results/): every
configuration (transformers baseline, PyTorch fallback, ONNX Runtime fp32/INT8/INT4, no-ICM) at one small K, the
embedded-default part on the same tiny random checkpoint (so the recall and budget code runs before the trained
default exists), a small ANN part, the plots and the markdown page.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")
pytest.importorskip("matplotlib")

REPO = Path(__file__).resolve().parents[2]


def test_quick_run_on_the_tiny_preset_writes_results_tables_and_plots(tmp_path):
    work = tmp_path / "work"
    cmd = [sys.executable, str(REPO / "bench" / "run_all.py"), "--quick", "--preset", "tiny",
           "--workdir", str(work), "--results-dir", str(tmp_path / "results"), "--md", str(tmp_path / "B.md"),
           "--img-dir", str(tmp_path / "img"), "--ann-ns", "1000",
           # e2e.py: K=4 over 4 photos; the default part on the same checkpoint with 2 synthetic test scenes
           "--ks", "4", "--corpus", "4", "--size-k", "4", "--queries", "1", "--warmup", "0", "--think", "4",
           "--default-ckpt", str(work / "tiny-ckpt"), "--default-k", "4", "--default-think", "4",
           "--default-n-test", "2",
           "--default-queries", "2", "--sweep-think", "0", "4", "--sweep-inspect", "0"]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    e2e = json.loads((tmp_path / "results" / "e2e.json").read_text())
    rows = e2e["k_sweep"]["rows"]
    assert e2e["k_sweep"]["errors"] == {}, e2e["k_sweep"]["errors"]
    assert set(rows) == {"transformers", "transformers-sdpa", "torch", "ort-fp32", "ort-int8", "ort-int4",
                         "ort-fp32-full"}
    assert e2e["k_sweep"]["load_before_each_configuration"]["4"][0].keys() == rows.keys()
    assert not e2e["protocol"]["followed"] and "ks" in e2e["protocol"]["deviations"]
    for name, row in rows.items():
        point = row["by_k"]["4"]
        assert point["latency_ms"]["total"]["n"] == 1 and point["latency_ms"]["total"]["p50"] > 0, name
        assert point["tokens"]["total_tokens"] > 0 and point["peak_rss_mb"] > 0, name
    # The ICM replaces each candidate's full image tokens by two: the baseline's prompt must be the longer one.
    assert rows["transformers"]["by_k"]["4"]["tokens"]["prefill_tokens"] > \
        rows["ort-fp32"]["by_k"]["4"]["tokens"]["prefill_tokens"]
    assert rows["transformers"]["by_k"]["4"]["tokens"]["images_encoded"] == 4
    assert not rows["ort-fp32"]["load"]["modules"]["torch"]  # the ONNX Runtime path never imports torch

    d = e2e["default"]
    assert d["present"] and d["errors"] == {}, d.get("errors")
    assert {"transformers", "ort-fp32", "ort-int8", "ort-int4"} <= set(d["rows"])
    assert 0.0 <= d["rows"]["ort-fp32"]["recall"]["reranked"]["recall@1"] <= 1.0
    assert len(d["sweep"]) == 2

    ann = json.loads((tmp_path / "results" / "ann.json").read_text())
    assert ann["results"][0]["n"] == 1000 and ann["results"][0]["recall_at_10"] > 0.5

    md = (tmp_path / "B.md").read_text()
    assert "python bench/run_all.py" in md and "| K | configuration |" in md and "Headline" in md
    for png in ("latency_vs_k.png", "latency_breakdown.png", "recall_vs_budget.png"):
        assert (tmp_path / "img" / png).stat().st_size > 1000, png
    assert "speed-up" in done.stdout and "Decoder tokens per query" in done.stdout


def test_default_section_reads_the_test_split_from_train_runs_record(tmp_path):
    sys.path.insert(0, str(REPO / "bench"))
    try:
        from e2e import _synth_config
    finally:
        sys.path.remove(str(REPO / "bench"))
    assert _synth_config(tmp_path)["max_objects"] == 3  # no training.json: the generator's defaults
    record = {"config": {"seed": 7, "data": {"n_train": 2000, "n_val": 50, "n_test": 120, "max_objects": 2}}}
    (tmp_path / "training.json").write_text(json.dumps(record))
    syn = _synth_config(tmp_path)
    assert (syn["seed"], syn["n_test"], syn["max_objects"]) == (7, 120, 2)


def test_the_page_shows_checkpoints_inside_the_repository_by_relative_path(tmp_path):
    sys.path.insert(0, str(REPO / "bench"))
    try:
        from markdown_doc import _shown
    finally:
        sys.path.remove(str(REPO / "bench"))
    assert _shown(str(REPO / "model" / "default")) == "model/default"
    assert _shown(str(tmp_path / "ckpt")) == str(tmp_path / "ckpt")


def test_embedder_index_build_bench_runs_on_the_tiny_clip_fixture(tmp_path):
    """`bench/index.py --embedders` end to end on the tiny preset and the committed tiny CLIP (the real run uses the
    mid preset and a CLIP-B export): both rows, a throughput and a peak memory each, the ratios."""
    out = tmp_path / "emb.json"
    cmd = [sys.executable, str(REPO / "bench" / "index.py"), "--embedders", "--preset", "tiny",
           "--clip-dir", str(REPO / "tests" / "fixtures" / "optimum" / "clip" / "onnx"), "--images", "2",
           "--rounds", "1", "--workdir", str(tmp_path / "work"), "--json", str(out)]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads(out.read_text())
    assert set(result["rows"]) == {"qwen2.5-vl tiny (baseline)", "optimum clip (--clip-dir)"}
    for row in result["rows"].values():
        assert row["images"] == 2 and row["build_images_per_s"] > 0 and row["peak_rss_mb"] > 0
    assert result["ratios"]["build_images_per_s"] > 0 and "start" in result["load_avg"]
    assert "clip / baseline" in done.stdout
