"""Quantization benchmark: fp32 against INT8 (dynamic, static) and INT4 packs of the mid-size random config, in one
run, on this machine's CPU.

    python bench/quant.py [--flickr ../shared/data/flickr8k-1k] [--prompt-tokens 512] [--new-tokens 64]
                          [--repeats 3] [--threads N] [--workdir DIR [--reuse]] [--json OUT]

Every quantized pack is calibrated (static INT8, GPTQ) and gated on real photographs and captions from the
flickr8k-1k folder (`captions.csv` + `images/`; the gate's held-out items are never calibration items).
Reported per pack: decoder size (external data counted), prefill tokens/s for a `--prompt-tokens` prompt, ms per
decoded token over `--new-tokens` (median of `--repeats` runs after a warm-up, same numpy loop and ONNX Runtime
settings for every pack), the bandwidth achieved by decode (bytes of decoder weights read per token / time per
token) beside this machine's memory bandwidth measured in the same run (a large numpy copy), and the gate
figures. Ratios are against the fp32 pack.

The weights are random: gate figures on a random model are a stress test (flat logits, no trained margins), not
a prediction of a trained model's accuracy loss.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from decode import measure  # bench/ is the script's folder, so its sibling imports directly

REPO = Path(__file__).resolve().parents[1]


def memory_bandwidth(gib: float = 1.0, repeats: int = 5) -> dict:
    """Best of `repeats` numpy copies of a `gib` GiB array: bytes read, and read + written, per second."""
    n = int(gib * (1 << 30)) // 8
    src = np.ones(n, np.float64)
    dst = np.empty_like(src)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        np.copyto(dst, src)
        best = min(best, time.perf_counter() - t0)
    return {"read_gbs": src.nbytes / best / 1e9, "copy_gbs": 2 * src.nbytes / best / 1e9}


def decoder_weight_bytes(path: Path) -> int:
    """Bytes of the decoder's initializers: what one decode step reads (every weight, once)."""
    import onnx

    model = onnx.load(str(path))
    return sum(onnx.numpy_helper.to_array(t).nbytes for t in model.graph.initializer)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--flickr", default=str(REPO / ".." / "shared" / "data" / "flickr8k-1k"),
                    help="captions.csv + images/ folder of real photographs (calibration and gate)")
    ap.add_argument("--prompt-tokens", type=int, default=512)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--json", default=None, help="also write the results here")
    ap.add_argument("--reuse", action="store_true",
                    help="with --workdir: reuse packs quantized by an earlier run (re-measure timings only)")
    args = ap.parse_args()

    flickr = Path(args.flickr).resolve()
    if not (flickr / "captions.csv").is_file():
        print(f"bench/quant.py: --flickr {flickr}: captions.csv not found; expected the flickr8k-1k folder",
              file=sys.stderr)
        return 2
    work = Path(args.workdir or tempfile.mkdtemp(prefix="retrv-quant-bench-"))
    try:
        return run(args, work, flickr)
    finally:
        if args.workdir is None:  # ~0.6 GB of packs: kept only where the caller asked for them
            shutil.rmtree(work, ignore_errors=True)


def run(args: argparse.Namespace, work: Path, flickr: Path) -> int:
    from retrv.calibration.quantize import (
        Int4WeightOnlyConfig,
        Int8DynamicConfig,
        Int8StaticConfig,
        quantize_pack,
    )
    from retrv.export.pack_export import export_pack
    from retrv.model.tiny import write_tiny_checkpoint
    from retrv.runtime.backends.ort import OrtBackend, physical_cores
    from retrv.runtime.inputs.table import open_table
    from retrv.runtime.errors import RetrvError
    from retrv.runtime.pack import Pack

    ckpt = work / "mid"
    if not (ckpt / "config.json").exists():
        write_tiny_checkpoint(ckpt, preset="mid", icm=True, seed=0)
    fp32_dir = work / "fp32"
    if not (fp32_dir / "manifest.json").exists():
        export_pack(ckpt, fp32_dir)

    calib = str(flickr)
    variants = {
        "int8-dynamic": Int8DynamicConfig(calib=calib),
        "int8-static minmax": Int8StaticConfig(calib=calib, method="minmax"),
        "int8-static entropy": Int8StaticConfig(calib=calib, method="entropy"),
        "int8-static percentile": Int8StaticConfig(calib=calib, method="percentile"),
        "int8-static minmax u8": Int8StaticConfig(calib=calib, method="minmax", activations="uint8"),
        "int4 rtn": Int4WeightOnlyConfig(calib=calib, algo="rtn"),
        "int4 rtn acc0": Int4WeightOnlyConfig(calib=calib, algo="rtn", accuracy_level=0),
        "int4 hqq": Int4WeightOnlyConfig(calib=calib, algo="hqq"),
        "int4 gptq": Int4WeightOnlyConfig(calib=calib, algo="gptq"),
    }
    packs = {"fp32": fp32_dir}
    quant_seconds, refused = {}, {}
    for name, config in variants.items():
        out = work / name.replace(" ", "-")
        if args.reuse and (out / "manifest.json").exists():
            packs[name] = out
            continue
        t0 = time.perf_counter()
        try:
            quantize_pack(fp32_dir, out, config)
        except RetrvError as e:  # a mode this onnxruntime cannot do right is refused, and said so
            refused[name] = str(e)
            continue
        quant_seconds[name] = time.perf_counter() - t0
        packs[name] = out
        print(f"quantized {name} in {quant_seconds[name]:.1f} s", file=sys.stderr)

    bandwidth = memory_bandwidth()
    threads = args.threads or physical_cores()
    rows = {}
    for name, path in packs.items():
        pack = Pack.open(path, verify="size")
        files = pack.manifest.files
        size = sum(e.bytes for n, e in files.items() if n == "decoder.onnx" or e.data_of == "decoder.onnx")
        weights = decoder_weight_bytes(pack.file("decoder"))
        table = open_table(pack)
        with OrtBackend(pack, provider="cpu", threads=threads, cache_dir=None) as backend:
            timing = measure(backend, table, args.prompt_tokens, args.new_tokens, args.repeats)
        gate = pack.manifest.validation.get("gate", {})
        rows[name] = {"decoder_bytes": size, "weight_bytes": weights, **timing,
                      "achieved_gbs": weights / (timing["ms_per_token"] / 1e3) / 1e9, "gate": gate,
                      "quantize_s": quant_seconds.get(name)}

    base = rows["fp32"]
    print(f"\nmid config (decoder: 8 layers, hidden 512), prompt {args.prompt_tokens} tokens, {args.new_tokens} new "
          f"tokens, median of {args.repeats}, ORT CPU, {threads} threads; calibration/gate: {flickr.name} photographs")
    print(f"memory bandwidth (numpy copy of 1 GiB, same run): {bandwidth['read_gbs']:.1f} GB/s read "
          f"({bandwidth['copy_gbs']:.1f} GB/s read+write)\n")
    head = (f"{'pack':<23} {'decoder MB':>10} {'size':>6} {'prefill tok/s':>13} {'x':>5} {'ms/token':>8} {'x':>5} "
            f"{'GB/s':>6} {'%bw':>4} {'cos mean':>8} {'cos min':>8} {'top-1':>6} {'emb cos':>7} {'quant s':>7}")
    print(head)
    print("-" * len(head))
    for name, r in rows.items():
        g = r["gate"]
        cos_mean = f"{g['logits_cosine_mean']:.4f}" if g else "-"
        cos_min = f"{g['logits_cosine_min']:.4f}" if g else "-"
        top1 = f"{g['top1_agreement']:.3f}" if g else "-"
        emb = f"{g['embedding_cosine_min']:.4f}" if g else "-"
        print(f"{name:<23} {r['decoder_bytes'] / 1e6:>10.1f} {r['decoder_bytes'] / base['decoder_bytes']:>5.2f}x "
              f"{r['prefill_tokens_per_s']:>13.0f} {r['prefill_tokens_per_s'] / base['prefill_tokens_per_s']:>4.2f}x "
              f"{r['ms_per_token']:>8.2f} {base['ms_per_token'] / r['ms_per_token']:>4.2f}x "
              f"{r['achieved_gbs']:>6.1f} {100 * r['achieved_gbs'] / bandwidth['read_gbs']:>3.0f}% "
              f"{cos_mean:>8} {cos_min:>8} {top1:>6} {emb:>7} "
              f"{(format(r['quantize_s'], '.0f') if r['quantize_s'] else '-'):>7}")
    print("\nsize: decoder file(s) vs fp32; x: speed-up vs fp32 (higher is faster); GB/s: decoder weight bytes / "
          "time per decoded token; %bw: of the measured read bandwidth; gate: logits cosine and top-1 agreement "
          "with fp32 (teacher-forced) on held-out photographs, embedding cosine min of the pooled output; quant s: "
          "seconds to quantize, calibrate and gate")
    for name, why in refused.items():
        print(f"{name}: refused: {why}")
    print("int8-static minmax/entropy/percentile: int8 symmetric activations (TensorRT's form); u8: uint8 "
          "activations (ONNX Runtime CPU's form); int4 acc0: MatMulNBits accuracy_level 0 (fp32 compute) instead "
          "of 4 (int8 compute)")
    if args.json:
        Path(args.json).write_text(json.dumps({"bandwidth": bandwidth, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
