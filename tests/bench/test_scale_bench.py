"""bench/ann_scale.py (with Milvus Lite) and bench/token_fetch.py run end to end on tiny sizes and write what
docs/SCALE.md reads."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).parents[2] / "bench"


def _run(script: str, *args: str) -> None:
    proc = subprocess.run([sys.executable, script, *args], cwd=BENCH, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_ann_scale_measures_milvus_lite_beside_hnswlib_and_brute_force(tmp_path):
    pytest.importorskip("pymilvus")
    out = tmp_path / "ann.json"
    _run("ann_scale.py", "--ns", "600", "--gaussian-ns", "--queries", "10", "--json", str(out))
    r = json.loads(out.read_text())["results"][0]
    assert r["n"] == 600 and r["recall_at_10_milvus"] >= 0.9 and r["qps_milvus"] > 0
    assert r["milvus_bytes_per_item"] > 4 * r["dim"]  # at least the raw float32 vector


def test_token_fetch_reads_k_candidates_from_the_cache_and_the_sharded_store(tmp_path):
    out = tmp_path / "tf.json"
    _run("token_fetch.py", "--candidates", "12", "--tokens", "4", "--k", "5", "--queries", "2", "--shards", "3",
         "--json", str(out))
    rows = json.loads(out.read_text())["results"]
    assert [(r["model"], r["hidden"]) for r in rows] == [("3B", 2048), ("7B", 3584)]
    # the layout: L x H int8 + 4 L scales + 8 length + 24 grid + 2 H t_con, plus cache.json over 12 candidates
    assert all(4 * r["hidden"] + 16 + 32 + 2 * r["hidden"] < r["bytes_per_candidate"] < 6 * r["hidden"] + 400
               for r in rows)
    assert all(r["warm_ms_sharded"] > 0 and r["cold_ms_local"] > 0 for r in rows)
