"""GPU benchmark, one run, baselines beside results: the fused ICM kernel against unfused PyTorch, and TensorRT fp16
against PyTorch eager and ONNX Runtime CUDA.

    python bench/gpu.py [--cands 50] [--cand-len 256] [--query-len 64] [--hidden 3584] [--heads 28]
                        [--repeats 20] [--preset mid] [--new-tokens 32] [--json OUT]

1. Attention cores (`--hidden/--heads`, fp16): `icm_attention` (one launch: content pool + relation with R kept in
   registers) vs the PyTorch reference cores (R materialised); ATT2's `cross` kernel vs PyTorch.
2. The whole ICM relation token (`model.icm.relation`, random weights at --hidden): the attention done by the Triton
   kernels inside the exact split (kernels/split.py) vs PyTorch eager. This is what the runtime would gain today.
3. A `--preset` random model exported as an fp16 pack: TensorRT engines vs PyTorch eager (fp16, CUDA) vs ONNX
   Runtime CUDA, for the ICM relation graph and for decode (ms per token after a 512-token prefill).

Each row is the median of `--repeats` timed runs after warm-up. A stage whose dependency is missing (triton,
tensorrt, onnxruntime-gpu) prints `n/a` with the reason; without a CUDA GPU the script refuses in one line.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path


def timed(fn, repeats: int, sync) -> float:
    """Median milliseconds of `fn()` over `repeats` runs after two warm-ups."""
    for _ in range(2):
        fn()
    sync()
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync()
        samples.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(samples)


def row(table: list, stage: str, name: str, ms: float | None, baseline: float | None, note: str = "") -> None:
    table.append({"stage": stage, "config": name, "ms": ms, "baseline_ms": baseline,
                  "speedup": (baseline / ms) if ms and baseline else None, "note": note})


def bench_cores(args, table, torch) -> None:
    from retrv.kernels import reference as ref

    k, length, lq, c, h = args.cands, args.cand_len, args.query_len, args.hidden, args.heads
    r = lambda *s: torch.randn(*s, device="cuda", dtype=torch.float16)  # noqa: E731
    x = dict(con_q=r(k, c), con_k=r(k, length, c), con_v=r(k, length, c),
             cand_mask=torch.ones(k, length, device="cuda", dtype=torch.long), rel_q=r(k, length, c),
             query_k=r(lq, c), query_v=r(lq, c), query_mask=torch.ones(lq, device="cuda", dtype=torch.long),
             pool_q=r(k, c))
    sync = torch.cuda.synchronize
    base = timed(lambda: ref.icm_attention(**x, num_heads=h), args.repeats, sync)
    base_cross = timed(lambda: ref.cross(x["rel_q"], x["query_k"], x["query_v"], x["query_mask"], h), args.repeats, sync)
    try:
        from retrv.kernels import triton_icm as tri

        fused = timed(lambda: tri.icm_attention(**x, num_heads=h), args.repeats, sync)
        cross = timed(lambda: tri.cross(x["rel_q"], x["query_k"], x["query_v"], x["query_mask"], h), args.repeats, sync)
        note = ""
    except Exception as e:  # noqa: BLE001 - a benchmark reports what it could not run
        fused = cross = None
        note = f"{type(e).__name__}: {e}"
    shape = f"K={k} L={length} Lq={lq} C={c} H={h} fp16"
    row(table, "1 attention cores", "PyTorch reference cores (R materialised)", base, base, shape)
    row(table, "1 attention cores", "Triton icm_attention (one launch, R in registers)", fused, base, note)
    row(table, "1 attention cores", "PyTorch cross (ATT2 core)", base_cross, base_cross, shape)
    row(table, "1 attention cores", "Triton cross", cross, base_cross, note)


def bench_icm(args, table, torch) -> None:
    from retrv.kernels import split
    from retrv.model.config import ICMConfig
    from retrv.model.icm import ICM

    icm = ICM(ICMConfig(hidden_size=args.hidden, num_heads=args.heads, num_layers=2)).cuda().half().eval()
    with torch.no_grad():
        for name, p in icm.named_parameters():
            p.copy_(torch.randn_like(p) * 0.02 + (1.0 if "norm" in name else 0.0))
    cand = torch.randn(args.cands, args.cand_len, args.hidden, device="cuda", dtype=torch.float16)
    mask = torch.ones(args.cands, args.cand_len, device="cuda", dtype=torch.long)
    query = torch.randn(args.query_len, args.hidden, device="cuda", dtype=torch.float16)
    qmask = torch.ones(args.query_len, device="cuda", dtype=torch.long)
    sync = torch.cuda.synchronize
    with torch.no_grad():
        base = timed(lambda: icm.relation(cand, mask, query, qmask), args.repeats, sync)
        torch_split = timed(lambda: split.relation(icm, cand, mask, query, qmask), args.repeats, sync)
        try:
            from retrv.kernels.triton_icm import TritonCores

            tri = timed(lambda: split.relation(icm, cand, mask, query, qmask, TritonCores), args.repeats, sync)
            note = ""
        except Exception as e:  # noqa: BLE001
            tri, note = None, f"{type(e).__name__}: {e}"
    row(table, "2 ICM relation", "model.icm.relation, PyTorch eager", base, base, f"hidden {args.hidden}, fp16")
    row(table, "2 ICM relation", "split, PyTorch cores (query projected once)", torch_split, base)
    row(table, "2 ICM relation", "split, Triton cores", tri, base, note)


def bench_backends(args, table, torch) -> None:
    import numpy as np

    from retrv.export.pack_export import export_pack
    from retrv.model import load_checkpoint
    from retrv.model.tiny import write_tiny_checkpoint
    from retrv.export.torch_backend import TorchBackend
    from retrv.runtime.pack import Pack

    work = Path(args.workdir or tempfile.mkdtemp(prefix="retrv-bench-gpu-"))
    ckpt = write_tiny_checkpoint(work / "ckpt", icm=True, seed=0, preset=args.preset)
    pack = Pack.open(export_pack(ckpt, work / "pack", precision="fp16"))
    model = load_checkpoint(ckpt, dtype=torch.float32).half().cuda()
    backends = {"PyTorch eager fp16": lambda: TorchBackend(model)}

    def ort_cuda():
        from retrv.runtime.backends.ort import OrtBackend

        return OrtBackend(pack, provider="cuda", cache_dir=None)

    def trt():
        from retrv.export.trt import EngineShapes, build_engines
        from retrv.runtime.backends.trt import TrtBackend

        built = build_engines(pack.path, fp16=True, shapes=EngineShapes(max_total=2048, max_seq=1024,
                                                                        opt_prefill=512, opt_past=544))
        return TrtBackend(built)

    backends["ONNX Runtime CUDA"], backends["TensorRT fp16"] = ort_cuda, trt
    h = pack.model_config.text.hidden_size
    rng = np.random.default_rng(0)
    cand = rng.standard_normal((args.cands, min(args.cand_len, 64), h)).astype(np.float32)
    cmask = np.ones(cand.shape[:2], np.int64)
    query = rng.standard_normal((min(args.query_len, 64), h)).astype(np.float32)
    qmask = np.ones(query.shape[0], np.int64)
    prompt = rng.standard_normal((1, 512, h)).astype(np.float32)
    pos = np.broadcast_to(np.arange(512), (3, 1, 512)).astype(np.int64).copy()
    results = {}
    for name, make in backends.items():
        try:
            b = make()
            icm_ms = timed(lambda: b.icm_relation(cand, cmask, query, qmask), args.repeats, lambda: None)

            def decode():
                state = b.start(1)
                b.step(state, prompt, pos, np.ones((1, 512), np.int64))
                t0 = time.perf_counter()
                for i in range(args.new_tokens):
                    b.step(state, prompt[:, :1], np.full((3, 1, 1), 512 + i, np.int64), np.ones((1, 1), np.int64))
                return (time.perf_counter() - t0) * 1e3 / args.new_tokens

            decode()
            results[name] = (icm_ms, statistics.median(decode() for _ in range(max(3, args.repeats // 4))), "")
        except Exception as e:  # noqa: BLE001
            results[name] = (None, None, f"{type(e).__name__}: {str(e)[:160]}")
    base_icm, base_dec, _ = results["PyTorch eager fp16"]
    for name, (icm_ms, dec_ms, note) in results.items():
        row(table, f"3 {args.preset} fp16 pack: ICM relation", name, icm_ms, base_icm, note)
    for name, (icm_ms, dec_ms, note) in results.items():
        row(table, f"3 {args.preset} fp16 pack: decode ms/token", name, dec_ms, base_dec, note)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cands", type=int, default=50)
    ap.add_argument("--cand-len", type=int, default=256)
    ap.add_argument("--query-len", type=int, default=64)
    ap.add_argument("--hidden", type=int, default=3584)  # Qwen2.5-VL-7B
    ap.add_argument("--heads", type=int, default=28)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--preset", default="mid")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    try:
        import torch
    except ImportError:
        print("bench/gpu.py: error: torch is not installed; this benchmark needs torch with CUDA", file=sys.stderr)
        return 2
    if not torch.cuda.is_available():
        print(f"bench/gpu.py: error: no CUDA GPU (torch {torch.__version__}); this benchmark only runs on a GPU "
              f"machine", file=sys.stderr)
        return 2
    table: list = []
    bench_cores(args, table, torch)
    bench_icm(args, table, torch)
    bench_backends(args, table, torch)
    print(f"GPU: {torch.cuda.get_device_name()}  torch {torch.__version__}")
    print(f"{'stage':<34} {'config':<52} {'ms':>9} {'baseline':>9} {'speedup':>8}  note")
    for r in table:
        ms = f"{r['ms']:.3f}" if r["ms"] is not None else "n/a"
        base = f"{r['baseline_ms']:.3f}" if r["baseline_ms"] is not None else "n/a"
        sp = f"{r['speedup']:.2f}x" if r["speedup"] is not None else "n/a"
        print(f"{r['stage']:<34} {r['config']:<52} {ms:>9} {base:>9} {sp:>8}  {r['note']}")
    if args.json:
        Path(args.json).write_text(json.dumps({"gpu": torch.cuda.get_device_name(), "rows": table}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
