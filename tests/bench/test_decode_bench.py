"""bench/decode.py on the tiny pack with llama.cpp absent (the path CI takes: the `bench` extra is not installed
there), and the pieces its figures come from. No timing is asserted: timings here say nothing."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture()
def bench(monkeypatch):
    monkeypatch.syspath_prepend(str(REPO / "bench"))
    import decode

    return decode


def _captions(path: Path) -> Path:
    lines = ["image,caption"] + [f"{i}.jpg,a dog runs along the beach while a child throws a red ball number {i}"
                                 for i in range(40)]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_decode_bench_on_the_tiny_pack_skips_llama_cpp_with_the_reason(bench, tiny_pack, tmp_path, monkeypatch,
                                                                        capsys):
    pytest.importorskip("matplotlib")
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # `import llama_cpp` raises ImportError
    out = tmp_path / "decode.json"
    rc = bench.main(["--fp32-pack", str(tiny_pack), "--only", "fp32", "--workdir", str(tmp_path / "work"),
                     "--captions", str(_captions(tmp_path / "captions.csv")), "--prompt-tokens", "40",
                     "--new-tokens", "4", "--repeats", "2", "--threads", "1", "--ppl-rows", "2", "--ppl-seq-len", "8",
                     "--bandwidth-gib", "0.01", "--json", str(out), "--img", str(tmp_path / "pareto.png")])
    captured = capsys.readouterr()
    printed = captured.out
    assert rc == 0, printed + captured.err
    assert "llama.cpp: skipped: llama_cpp not importable" in printed and "pip install -e '.[bench]'" in printed
    result = json.loads(out.read_text())
    assert result["llama_cpp"]["used"] is False
    assert set(result["engines"]) == {"fp32"}  # no llama.cpp rows at all
    row = result["timing"]["1"]["fp32"]
    assert len(row["tokens"]) == 4 and len(row["ms_per_token_runs"]) == 2 and row["ms_per_token"] > 0
    assert len(result["protocol"]["prompt_ids"]) == 40
    assert result["perplexity"]["positions"] == 2 * 7 and result["perplexity"]["by_engine"]["fp32"] > 1
    # and on the project's own prose, a second and harder text
    assert result["perplexity"]["markdown"]["positions"] == 2 * 7
    assert result["perplexity"]["markdown"]["by_engine"]["fp32"] != result["perplexity"]["by_engine"]["fp32"]
    assert "| perplexity (the repo's prose) |" in result["table"]
    assert result["engines"]["fp32"]["bytes_per_token"] > 0 and result["bandwidth_gbs"]["1"] > 0
    assert "| retrv fp32 |" in result["table"] and "share of" in result["table"]
    assert result["gemm_gflops"]["1"] > 0 and result["prefill_flops"] > 0 and "fp32 GEMM" in result["table"]
    assert (tmp_path / "pareto.png").stat().st_size > 1000
    # the CPU and the SIMD extensions the guest sees are recorded (they choose ORT's and llama.cpp's int8 kernels)
    flags = Path("/proc/cpuinfo").read_text().split("flags", 1)[-1].split("\n", 1)[0].split() \
        if Path("/proc/cpuinfo").exists() else []
    assert result["machine"]["simd"] == (sorted(set(flags) & bench.SIMD_FLAGS) if flags else None)
    assert "SIMD the guest sees" in printed


def test_decode_bench_refuses_missing_captions_in_one_line(bench, tmp_path, capsys):
    assert bench.main(["--captions", str(tmp_path / "nope.csv"), "--no-llama"]) == 2
    err = capsys.readouterr().err
    assert "--captions" in err and "nope.csv: not found" in err and "Traceback" not in err


def test_a_pack_given_by_flags_pairs_with_the_gguf_of_its_mode(bench):
    args = bench.parse_args(["--pack", "int4-head=--mode int4 --block-size 32 --no-keep-lm-head", "--only", "fp32",
                             "int4-head"])
    assert args.packs == {"fp32": None, "int4-head": "--mode int4 --block-size 32 --no-keep-lm-head"}
    assert bench.GGUF_FOR_MODE[bench.mode_of(args.packs["int4-head"])] == "Q4_1"
    assert bench.GGUF_FOR_MODE[bench.mode_of(None)] == "F32"
    with pytest.raises(SystemExit):
        bench.parse_args(["--only", "int9"])


def test_weight_bytes_count_a_gather_only_table_one_row_and_a_tied_one_whole(bench, tmp_path):
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper, numpy_helper

    from _decode_engines import onnx_decode_bytes

    emb = numpy_helper.from_array(np.zeros((100, 8), np.float32), "emb")  # Gather only: one row per token
    tied = numpy_helper.from_array(np.zeros((50, 8), np.float32), "tied")  # Gather and MatMul: read whole
    w = numpy_helper.from_array(np.zeros((8, 8), np.uint8), "w")
    nodes = [helper.make_node("Gather", ["emb", "ids"], ["x"]), helper.make_node("Gather", ["tied", "ids"], ["y"]),
             helper.make_node("Cast", ["w"], ["wf"], to=TensorProto.FLOAT),
             helper.make_node("MatMul", ["x", "wf"], ["h"]), helper.make_node("Add", ["h", "y"], ["z"]),
             helper.make_node("Transpose", ["tied"], ["tt"]), helper.make_node("MatMul", ["z", "tt"], ["logits"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("ids", TensorProto.INT64, [1])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 50])],
                              [emb, tied, w])
    path = tmp_path / "g.onnx"
    onnx.save(helper.make_model(graph), str(path))
    assert onnx_decode_bytes(path) == {"total": 8 * 4 + 50 * 8 * 4 + 64, "gathered_tables": 1}


def test_the_table_prints_each_pair_with_its_bandwidth_share(bench):
    timing = {t: {"fp32": {"ms_per_token": 10.0, "prefill_tok_s": 900.0},
                  "llama.cpp F32": {"ms_per_token": 20.0, "prefill_tok_s": 600.0}} for t in ("1", "2")}
    result = {"engines": {"fp32": {"engine": "retrv", "pair": "llama.cpp F32", "bytes_per_token": 100e6},
                          "llama.cpp F32": {"engine": "llama.cpp", "bytes_per_token": 100e6}},
              "bandwidth_gbs": {"1": 20.0, "2": 40.0}, "timing": timing,
              "perplexity": {"by_engine": {"fp32": 19.41, "llama.cpp F32": 19.4},
                             "markdown": {"by_engine": {"fp32": 231.63, "llama.cpp F32": 231.6}}},
              "greedy_match": {"fp32": {"same": 120, "of": 128}}}
    table = bench.markdown_table(result)
    # 100 MB in 10 ms = 10 GB/s: half of 20 GB/s with 1 thread, a quarter of 40 with 2
    assert "| decode ms/token, 1 thread (share of 20.0 GB/s read) | 10.0 (50%) / 20.0 (25%) |" in table
    assert "| decode ms/token, 2 threads (share of 40.0 GB/s read) | 10.0 (25%) / 20.0 (12%) |" in table
    assert "| prefill tok/s, 2 threads | 900 / 600 |" in table and "| 0.50x / 0.50x |" in table and "| retrv fp32 / llama.cpp F32 |" in table
    assert "| greedy tokens equal (2 threads) | 120/128 |" in table and "19.410 / 19.400" in table
    assert "| perplexity (the repo's prose) | 231.63 / 231.60 |" in table
    assert "GFLOP/s" not in table  # a result from before the GEMM reference: no such row
    # 1 GFLOP over a 100-token prompt at 900 tok/s = 9 GFLOP/s: 9% of 100 GFLOP/s; 600 tok/s: 6%
    table = bench.markdown_table({**result, "gemm_gflops": {"2": 100.0}, "prefill_flops": 1e9,
                                  "protocol": {"prompt_tokens": 100}})
    assert "| prefill GFLOP/s, 2 threads (share of 100 GFLOP/s fp32 GEMM) | 9 (9%) / 6 (6%) |" in table


def test_prefill_flops_count_every_weight_matrix_once_per_token_and_the_head_once():
    from types import SimpleNamespace

    from _decode_engines import prefill_flops

    # SmolLM2-135M: q/k/v 576 x 960, o 576 x 576, gate/up/down 3 x 576 x 1536, 30 layers; the head 576 x 49152
    c = SimpleNamespace(hidden_size=576, num_attention_heads=9, num_key_value_heads=3, intermediate_size=1536,
                        num_hidden_layers=30, vocab_size=49152)
    assert prefill_flops(c, 94) == 2 * (30 * (576 * 960 + 576 * 576 + 3 * 576 * 1536) * 94 + 576 * 49152)


@pytest.mark.slow
def test_llama_cpp_engine_decodes_and_scores_the_shipped_gguf(bench):
    """Where the `bench` extra is installed: the llama.cpp side on the real Q4_1 file (greedy ids, a perplexity)."""
    from _decode_engines import LlamaEngine, gguf_decode_bytes, import_llama_cpp

    L, why_not = import_llama_cpp()
    if L is None:
        pytest.skip(why_not)
    from retrv.model.graft import default_gguf

    gguf = default_gguf()
    engine = LlamaEngine(L, gguf, threads=1, n_ctx=64)
    try:
        run = engine.run(list(range(1, 17)), 3)
        assert len(run.tokens) == 3 and all(0 <= t < engine.n_vocab for t in run.tokens)
        assert engine.run(list(range(1, 17)), 3).tokens == run.tokens  # the cache is cleared between runs
        assert 1.0 < engine.perplexity(np.arange(100, 116).reshape(1, 16)) < 1e6
    finally:
        engine.close()
    assert 90e6 < gguf_decode_bytes(gguf) < 100e6  # 96.6 MB: Q4_1 layers and the Q8_0 tied embedding, read whole


def test_each_timed_run_starts_after_the_settle_pause_in_rotated_order(bench):
    from _decode_engines import Run

    class Fake:
        def __init__(self, name, log):
            self.name, self.log = name, log

        def run(self, ids, new_tokens):
            start = time.perf_counter()
            self.log.append((self.name, start, time.perf_counter()))
            return Run(0.01, 0.03, [1, 2, 3, 4])

    log: list = []
    engines = {n: Fake(n, log) for n in ("a", "b", "c")}
    rows = bench.time_engines(engines, [1, 2], 4, repeats=3, threads=1, settle_s=0.02)
    timed = log[3:]  # after one warm-up each
    assert [n for n, _, _ in timed] == ["a", "b", "c", "b", "c", "a", "c", "a", "b"]
    gaps = [start - prev_end for (_, start, _), (_, _, prev_end) in zip(timed, log[2:])]
    assert min(gaps) >= 0.02
    assert rows["a"]["ms_per_token"] == pytest.approx(10.0) and len(rows["b"]["prefill_ms_runs"]) == 3


@pytest.mark.parametrize("value", ["-1", "nan", "inf", "1e9"])
def test_a_settle_pause_out_of_range_is_refused_in_one_line(bench, value, capsys):
    with pytest.raises(SystemExit):
        bench.parse_args(["--settle-ms", value])
    err = capsys.readouterr().err
    assert f"--settle-ms {float(value)}: expected milliseconds from 0 to" in err and "Traceback" not in err


def test_an_existing_pack_given_by_path_pairs_with_the_gguf_of_its_recorded_mode(bench, tiny_pack, tmp_path, capsys):
    args = bench.parse_args(["--pack", f"old=@{tiny_pack}", "--only", "old"])
    assert args.packs == {"old": f"@{tiny_pack}"}
    assert bench.mode_of(args.packs["old"]) is None  # an fp32 pack: paired with F32
    assert bench.GGUF_FOR_MODE[bench.mode_of(args.packs["old"])] == "F32"
    packs, _ = bench.prepare_packs(args, tmp_path)
    assert packs == {"old": tiny_pack}
    for bad in (tmp_path / "nothing", tmp_path):  # missing; a folder that is no pack
        with pytest.raises(SystemExit):
            bench.parse_args(["--pack", f"old=@{bad}"])
        err = capsys.readouterr().err
        last = err.strip().splitlines()[-1]  # argparse: usage, then the one error line
        assert last.startswith("bench/decode.py: error: --pack 'old=@") and "expected" in last
        assert "Traceback (most recent call last)" not in err


def test_an_existing_pack_the_run_would_write_over_is_refused_before_any_work(bench, tiny_pack, tmp_path):
    """`--pack old=@WORK/fp32 --workdir WORK` without --reuse would export over the pack it is asked to measure."""
    import shutil

    work = tmp_path / "work"
    shutil.copytree(tiny_pack, work / "fp32")
    args = bench.parse_args(["--pack", f"old=@{work / 'fp32'}", "--workdir", str(work)])
    before = sorted(p.name for p in (work / "fp32").iterdir())
    with pytest.raises(bench.BenchError, match=r"this run writes .*fp32.*expected a pack outside"):
        bench.prepare_packs(args, work)
    assert sorted(p.name for p in (work / "fp32").iterdir()) == before
    args = bench.parse_args(["--pack", f"old=@{work / 'fp32'}", "--workdir", str(work), "--reuse", "--only", "old"])
    assert bench.prepare_packs(args, work)[0] == {"old": work / "fp32"}  # --reuse: nothing is written


def test_the_pareto_frontier_keeps_the_packs_nothing_beats_on_both_axes(monkeypatch):
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[2] / "bench"))
    from plots import pareto_front

    pts = [(19.41, 29.6, "fp32"), (19.41, 34.3, "fp32-matmul"), (19.37, 15.6, "int8"), (19.44, 12.6, "int4"),
           (19.53, 18.3, "int8-dynamic"), (21.87, 11.7, "intzp")]
    assert [p[2] for p in pareto_front(pts)] == ["int8", "int4", "intzp"]
    assert pareto_front([(1.0, 2.0, "a"), (1.0, 2.0, "b")]) == [(1.0, 2.0, "a")]  # a tie is kept once
