"""INT4 / INT8 weight-only variants on real weights: perplexity, top-1 and decode speed, in one process.

    python bench/int4_variants.py [--work DIR] [--rows 4] [--seq-len 64] [--tokens 64] [--out bench/results/int4_variants.json]

The SmolLM2-135M-Instruct graft (retrv.model.graft) exported to an fp32 pack (the baseline, measured in the same
run), then one pack per variant whose decoder's MatMuls (LM head kept, as `retrv quantize`'s default) are replaced
by MatMulNBits with the variant's bits / block / zero points / fit / accuracy_level (calibration.matrix, the code
`retrv quantize --mode int4 / int8-weight` runs; the gate is not run here, bench/quality.py runs it). Per pack:

- perplexity and teacher-forced top-1 agreement with fp32 on the shared captions (calibration.quality);
- decode ms/token, 1 and 2 intra-op threads: a short prompt, `tokens` greedy tokens, median of 3 (1 run for a
  variant slower than 4x fp32: float zero points);
- the decoder's bytes on disk; the 1-minute load average before each variant (the machine is shared).

The graft's weights are Q4_1 blocks of 32 (the GGUF's): float zero points with block 32 reproduce them exactly, so
every INT4 perplexity here is optimistic against a model trained in 16 bits.

`--work DIR` keeps the graft and fp32 pack between runs (built once).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DEFAULT_CAPTIONS = REPO.parent / "shared" / "data" / "flickr8k-1k" / "captions.csv"
PROMPT = "Describe a dog running on a beach."


@dataclass(frozen=True)
class Variant:
    name: str
    bits: int
    block: int
    zero_point: str  # float / int / symmetric
    fit: str  # rtn / mse
    accuracy_level: int

    @property
    def weights_key(self) -> tuple:
        return self.bits, self.block, self.zero_point, self.fit


VARIANTS = [
    Variant("int4 b32 float-zero rtn acc4 (previous default)", 4, 32, "float", "rtn", 4),
    Variant("int4 b32 int-zero rtn acc4 (ORT's RTN)", 4, 32, "int", "rtn", 4),
    Variant("int4 b32 offset rtn acc4", 4, 32, "offset", "rtn", 4),
    Variant("int4 b32 offset mse acc4 (new default)", 4, 32, "offset", "mse", 4),
    Variant("int4 b32 offset mse acc0", 4, 32, "offset", "mse", 0),
    Variant("int4 b32 int-zero mse acc4", 4, 32, "int", "mse", 4),
    Variant("int4 b32 int-zero mse acc1", 4, 32, "int", "mse", 1),
    Variant("int4 b32 int-zero mse acc0", 4, 32, "int", "mse", 0),
    Variant("int4 b32 symmetric rtn acc4", 4, 32, "symmetric", "rtn", 4),
    Variant("int4 b32 symmetric mse acc4", 4, 32, "symmetric", "mse", 4),
    Variant("int4 b64 offset mse acc4", 4, 64, "offset", "mse", 4),
    Variant("int4 b128 offset mse acc4", 4, 128, "offset", "mse", 4),
    Variant("int8 b32 int-zero rtn acc4 (int8-weight default)", 8, 32, "int", "rtn", 4),
    Variant("int8 b32 int-zero rtn acc0", 8, 32, "int", "rtn", 0),
]


def _decode_ms(pack: Path, threads: int, tokens: int, runs: int) -> float:
    from retrv.runtime.backends.ort import OrtBackend
    from retrv.runtime.generate import Generator
    from retrv.runtime.pack import Pack

    p = Pack.open(pack)
    gen = Generator.from_pack(p, OrtBackend(p, provider="cpu", threads=threads, cache_dir=None))
    gen.generate(PROMPT, [], 4)  # warm-up: session creation, first-run allocations
    times = []
    for _ in range(runs):
        out = gen.generate(PROMPT, [], tokens)
        times.append(out.timings_ms["decode"] / max(1, len(out.token_ids) - 1))
    return statistics.median(times)


def _variant_pack(fp32: Path, out: Path, v: Variant, cache: dict) -> None:
    """A copy of the fp32 pack (hard links) whose decoder is quantized as `v` says; quantized protos cached per
    weights so accuracy levels share one quantization."""
    import onnx
    from onnxruntime.quantization.onnx_model import ONNXModel

    from retrv.calibration.matrix import nbits_graph
    from retrv.calibration.rules import plan_graph
    from retrv.runtime.pack import Manifest, Pack, describe_file, write_manifest

    src = Pack.open(fp32)
    name = next(n for n, e in src.manifest.files.items() if e.role == "decoder" and n.endswith(".onnx"))
    entry = src.manifest.files[name]
    if v.weights_key not in cache:
        cache.clear()  # one quantized decoder in memory at a time
        model = onnx.load(str(fp32 / name))
        ONNXModel(model).replace_gemm_with_matmul()
        plan = plan_graph(model, "decoder", True, ())
        t0 = time.perf_counter()
        nbits_graph(model, plan.quantize, v.block, v.zero_point, v.accuracy_level, bits=v.bits, fit=v.fit)
        cache[v.weights_key] = (model, time.perf_counter() - t0)
    model = onnx.ModelProto()
    model.CopyFrom(cache[v.weights_key][0])  # saving moves tensors to external data: keep the cached one whole
    secs = cache[v.weights_key][1]
    for node in model.graph.node:
        if node.op_type == "MatMulNBits":
            for a in node.attribute:
                if a.name == "accuracy_level":
                    a.i = v.accuracy_level
    out.mkdir(parents=True)
    files = {}
    for n, e in src.manifest.files.items():
        if n == name or e.data_of == name:
            continue
        os.link(fp32 / n, out / n)
        files[n] = e
    ONNXModel(model).save_model_to_file(str(out / name), True)
    files[name] = describe_file(out, name, "decoder", precision=f"int{v.bits}", quantization={"variant": v.name},
                                inputs=entry.inputs, outputs=entry.outputs)
    if (out / (name + ".data")).exists():
        from retrv.runtime.pack import EXTERNAL_DATA

        files[name + ".data"] = describe_file(out, name + ".data", EXTERNAL_DATA, data_of=name)
    m = src.manifest
    write_manifest(out, Manifest(**{**m.__dict__, "files": files,
                                    "validation": {k: x for k, x in m.validation.items() if k == "vision"}}))
    return secs


def _decoder_bytes(pack: Path) -> int:
    return sum(p.stat().st_size for p in pack.iterdir() if p.name.startswith("decoder"))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--captions", default=str(DEFAULT_CAPTIONS))
    ap.add_argument("--work", default=None, help="folder keeping the graft and fp32 pack between runs")
    ap.add_argument("--rows", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--only", default=None, help="comma-separated substrings: run only matching variants")
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "int4_variants.json"))
    args = ap.parse_args(argv)

    from retrv.calibration.quality import caption_text, score_pack, token_rows, top1_agreement
    from retrv.export.pack_export import export_pack
    from retrv.model.graft import write_graft
    from retrv.runtime.inputs.prompt import PromptTokenizer

    captions = Path(args.captions)
    if not captions.is_file():
        print(f"bench/int4_variants.py: error: {captions}: not found; expected the shared Flickr8k captions "
              f"(--captions PATH)", file=sys.stderr)
        return 2
    work = Path(args.work) if args.work else Path("/tmp") / f"retrv-int4-{os.getpid()}"
    work.mkdir(parents=True, exist_ok=True)
    fp32 = work / "fp32"
    if not (fp32 / "manifest.json").is_file():
        t0 = time.perf_counter()
        ckpt = work / "graft" if (work / "graft" / "config.json").is_file() else write_graft(work / "graft")
        export_pack(ckpt, fp32)
        print(f"graft + fp32 export: {time.perf_counter() - t0:.0f} s", flush=True)
    tok = PromptTokenizer(fp32 / "tokenizer.json")
    rows = token_rows(tok.encode_text(caption_text(captions)), args.rows, args.seq_len)
    ref = score_pack(fp32, rows)

    def measure(pack: Path, slow: bool) -> dict:
        runs = 1 if slow else 3
        return {f"decode_ms_{t}t": _decode_ms(pack, t, args.tokens, runs) for t in (1, 2)}

    out_rows = [{"variant": "fp32", "perplexity": ref.perplexity, "ppl_change_pct": 0.0, "top1": 1.0,
                 "load_avg_1min": os.getloadavg()[0], **measure(fp32, False),
                 "decoder_mb": _decoder_bytes(fp32) / 1e6}]
    print(out_rows[-1], flush=True)
    fp32_ms = out_rows[0]["decode_ms_1t"]
    only = [s.strip() for s in args.only.split(",")] if args.only else None
    cache: dict = {}
    for v in VARIANTS:
        if only and not any(s in v.name for s in only):
            continue
        load = os.getloadavg()[0]
        pack = work / "variant"
        shutil.rmtree(pack, ignore_errors=True)
        secs = _variant_pack(fp32, pack, v, cache)
        s = score_pack(pack, rows)
        probe = _decode_ms(pack, 1, 8, 1)  # float zeros: several times fp32; fewer runs keep the bench short
        row = {"variant": v.name, "bits": v.bits, "block": v.block, "zero_point": v.zero_point, "fit": v.fit,
               "accuracy_level": v.accuracy_level, "perplexity": s.perplexity,
               "ppl_change_pct": 100 * (s.perplexity / ref.perplexity - 1), "top1": top1_agreement(ref, s),
               "load_avg_1min": load, **measure(pack, probe > 4 * fp32_ms),
               "decoder_mb": _decoder_bytes(pack) / 1e6, "quantize_s": secs}
        out_rows.append(row)
        print(row, flush=True)
        shutil.rmtree(pack)
    result = {"model": "SmolLM2-135M-Instruct grafted into Qwen2.5-VL (retrv.model.graft); weights are Q4_1 "
                       "blocks of 32 dequantized: INT4 figures are optimistic",
              "text": f"{captions.name}: {args.rows} rows x {args.seq_len} tokens ({ref.positions} predicted "
                      f"positions), teacher-forced",
              "decode": f"prompt {PROMPT!r}, {args.tokens} greedy tokens, median of 3 (1 for variants over 4x "
                        f"fp32), 1 and 2 intra-op threads",
              "machine": "2 shared cores (other engineers' jobs running; load average per row)",
              "onnxruntime": __import__("onnxruntime").__version__, "rows": out_rows}
    if out_rows:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print("| variant | perplexity | vs fp32 | top-1 | ms/token 1t | ms/token 2t | decoder MB | load |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in out_rows:
        print(f"| {r['variant']} | {r['perplexity']:.3f} | {r['ppl_change_pct']:+.2f}% | {r['top1']:.3f} | "
              f"{r['decode_ms_1t']:.1f} | {r['decode_ms_2t']:.1f} | {r['decoder_mb']:.0f} | "
              f"{r['load_avg_1min']:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
