"""The mid-preset mode of bench/decode.py (`--mid`): ONNX Runtime (CPU) against the project's PyTorch model on the
mid-size random config, in one run; and `measure`, the prefill + decode timer bench/quant.py shares.

Both backends run the same numpy loop, so the comparison is of the backends only. Reported: prefill tokens/s for
a prompt of `--prompt-tokens`, and ms per decoded token over `--new-tokens` (median of `--repeats` runs after one
warm-up), with ORT/PyTorch ratios.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np


def greedy_once(backend, table, ids, new_tokens: int) -> tuple[float, float]:
    """One prefill of the prompt `ids` and `new_tokens` greedy steps through `backend.step` (argmax in numpy) ->
    (prefill seconds, seconds per decoded token). The loop bench/fused_decode.py and `measure` share."""
    n = len(ids)
    embeds = table[ids][None].astype(np.float32)  # (1, S, H)
    pos = np.broadcast_to(np.arange(n), (3, 1, n)).astype(np.int64).copy()
    state = backend.start(1)
    t0 = time.perf_counter()
    logits = backend.step(state, embeds, pos, np.ones((1, n), np.int64))
    t1 = time.perf_counter()
    for i in range(new_tokens):
        tok = int(np.argmax(logits[0]))
        step_pos = np.full((3, 1, 1), n + i, np.int64)
        logits = backend.step(state, table[[tok]][None].astype(np.float32), step_pos, np.ones((1, 1), np.int64))
    return t1 - t0, (time.perf_counter() - t1) / max(1, new_tokens)


def measure(backend, table, prompt_tokens: int, new_tokens: int, repeats: int, seed: int = 0) -> dict:
    """Prefill of a random `prompt_tokens` prompt, then greedy decode of `new_tokens`; medians over `repeats`
    after one warm-up. Shared by bench/quant.py."""
    ids = np.random.default_rng(seed).integers(0, 400, prompt_tokens)
    runs = [greedy_once(backend, table, ids, new_tokens) for _ in range(repeats + 1)][1:]  # run 0: the warm-up
    p, d = statistics.median(r[0] for r in runs), statistics.median(r[1] for r in runs)
    return {"prefill_tokens_per_s": prompt_tokens / p, "prefill_ms": p * 1e3, "ms_per_token": d * 1e3,
            "decode_tokens_per_s": 1 / d}


def mid_main(argv: list[str] | None = None) -> int:
    """The mid-preset mode: ONNX Runtime against PyTorch on random weights (`--mid`)."""
    ap = argparse.ArgumentParser(prog="bench/decode.py --mid", description="ORT against PyTorch, mid preset")
    ap.add_argument("--prompt-tokens", type=int, default=512)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--json", default=None, help="also write the results here")
    args = ap.parse_args(argv)

    import torch

    from retrv.export.pack_export import export_pack
    from retrv.model import load_checkpoint
    from retrv.model.tiny import write_tiny_checkpoint
    from retrv.runtime.backends.ort import OrtBackend
    from retrv.runtime.inputs.table import open_table
    from retrv.export.torch_backend import TorchBackend
    from retrv.runtime.pack import Pack

    if args.threads:
        torch.set_num_threads(args.threads)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="retrv-bench-"))
    ckpt = work / "mid"
    if not (ckpt / "config.json").exists():
        write_tiny_checkpoint(ckpt, preset="mid", seed=0)
    pack_dir = work / "mid-pack"
    if not (pack_dir / "manifest.json").exists():
        export_pack(ckpt, pack_dir)
    pack = Pack.open(pack_dir)
    model = load_checkpoint(ckpt)
    n_params = sum(p.numel() for p in model.language_model.parameters()) + model.lm_head.weight.numel()
    table = open_table(pack)

    results = {}
    with OrtBackend(pack, provider="cpu", threads=args.threads, cache_dir=work / "cache") as ort_b:
        results["ort-cpu"] = measure(ort_b, table, args.prompt_tokens, args.new_tokens, args.repeats)
    results["pytorch"] = measure(TorchBackend(model), table, args.prompt_tokens, args.new_tokens, args.repeats)
    ratio = {k: results["ort-cpu"][k] / results["pytorch"][k] for k in results["ort-cpu"]}

    print(f"decoder: {n_params / 1e6:.1f} M parameters (mid preset), prompt {args.prompt_tokens} tokens, "
          f"{args.new_tokens} new tokens, median of {args.repeats}, threads {args.threads or 'default'}")
    print(f"{'':<14}{'prefill tok/s':>15}{'prefill ms':>12}{'ms/token':>10}{'decode tok/s':>14}")
    for name, r in results.items():
        print(f"{name:<14}{r['prefill_tokens_per_s']:>15.0f}{r['prefill_ms']:>12.1f}{r['ms_per_token']:>10.2f}"
              f"{r['decode_tokens_per_s']:>14.1f}")
    print(f"{'ort / pytorch':<14}{ratio['prefill_tokens_per_s']:>14.2f}x{ratio['prefill_ms']:>11.2f}x"
          f"{ratio['ms_per_token']:>9.2f}x{ratio['decode_tokens_per_s']:>13.2f}x")
    if args.json:
        Path(args.json).write_text(json.dumps({"params": n_params, "args": vars(args), "results": results,
                                               "ratio_ort_over_pytorch": ratio}, indent=2))
    return 0


