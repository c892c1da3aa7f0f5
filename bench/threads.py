"""Thread settings on the real-weights graft: decode ms/token and prefill tokens/s per (intra-op, inter-op) threads.

    python bench/threads.py [--pack PACK] [--threads 1 2] [--rounds 3] [--new-tokens 32] [--out results/threads.json]

One process; every configuration gets its own ONNX Runtime session (`OrtBackend(threads=, inter_op_threads=)`,
what `--threads` / `--inter-op-threads` set); rounds interleave the configurations so machine load hits all of them
alike; the figure is the median over rounds, printed beside the first configuration's (the baseline) as a ratio.
Without --pack the graft (SmolLM2-135M-Instruct in a Qwen2.5-VL checkpoint, retrv.model.graft) is written and
exported fp32 first (minutes). The load average is recorded before each round: the machine is shared.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# ~90 prompt tokens after the chat template, as issue 20's comparison (94 tokens)
PROMPT = ("Describe, in a few sentences, a photograph of a black dog running across a snowy field towards a "
          "child in a red coat, with pine trees and low mountains behind them under a grey winter sky, and say "
          "what the dog might be doing and how the child seems to feel about it.")


def _generator(pack_dir: Path, threads: int, inter: int):
    from retrv.runtime.backends.ort import OrtBackend
    from retrv.runtime.generate import Generator
    from retrv.runtime.pack import Pack

    pack = Pack.open(pack_dir)
    return Generator.from_pack(pack, OrtBackend(pack, provider="cpu", threads=threads, inter_op_threads=inter,
                                                cache_dir=None))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pack", default=None, help="an fp32 (or quantized) pack of the graft (default: export one)")
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--inter-op", type=int, nargs="+", default=[1])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "threads.json"))
    args = ap.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="retrv-threads-") as work:
        pack = Path(args.pack) if args.pack else None
        if pack is None:
            from retrv.export.pack_export import export_pack
            from retrv.model.graft import write_graft

            pack = export_pack(write_graft(Path(work) / "graft"), Path(work) / "fp32")
        configs = [(t, i) for t in args.threads for i in args.inter_op]
        gens = {c: _generator(pack, *c) for c in configs}
        for gen in gens.values():  # warm-up: first-run allocations and prepacking out of the figures
            gen.generate(PROMPT, [], 4, stop_at_eos=False)
        decode = {c: [] for c in configs}
        prefill = {c: [] for c in configs}
        loads = []
        prompt_tokens = 0
        for _ in range(args.rounds):
            loads.append(os.getloadavg()[0])
            for c in configs:
                out = gens[c].generate(PROMPT, [], args.new_tokens, stop_at_eos=False)
                prompt_tokens = len(out.prompt_ids)
                decode[c].append(out.timings_ms["ms_per_token"])
                prefill[c].append(prompt_tokens / (out.timings_ms["prefill"] / 1e3))
    base = configs[0]
    rows = [{"threads": t, "inter_op_threads": i, "decode_ms_per_token": statistics.median(decode[(t, i)]),
             "prefill_tokens_per_s": statistics.median(prefill[(t, i)]),
             "decode_ratio_vs_baseline": statistics.median(decode[base]) / statistics.median(decode[(t, i)]),
             "prefill_ratio_vs_baseline": statistics.median(prefill[(t, i)]) / statistics.median(prefill[base])}
            for t, i in configs]
    result = {"pack": Path(pack).name, "prompt_tokens": prompt_tokens, "new_tokens": args.new_tokens,
              "rounds": args.rounds, "cpus_allowed": len(os.sched_getaffinity(0)),
              "load_avg_1min_per_round": loads, "machine": "2 shared cores (other engineers' jobs running)",
              "rows": rows}
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"prompt {prompt_tokens} tokens, {args.new_tokens} new, median of {args.rounds} interleaved rounds; "
          f"load average per round {[round(x, 1) for x in loads]}")
    print("| intra-op | inter-op | decode ms/token | vs baseline | prefill tok/s | vs baseline |")
    print("| --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['threads']} | {r['inter_op_threads']} | {r['decode_ms_per_token']:.1f} | "
              f"{r['decode_ratio_vs_baseline']:.2f}x | {r['prefill_tokens_per_s']:.0f} | "
              f"{r['prefill_ratio_vs_baseline']:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
