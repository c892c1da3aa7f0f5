"""Large-checkpoint export: a Qwen2.5-VL-7B-shaped random bf16 checkpoint (written shard by shard) exported by the
streaming path to an fp16 pack and to an INT4 pack, each verified (`--verify`'s checks) and the INT4 one generating;
the peak RSS of every step, as `/usr/bin/time -v` reports it, against the checkpoint's bytes (the limit: 50%).

    python bench/export_large.py [--workdir DIR] [--shape 7b|3b] [--layers 28] [--vision-depth 32] [--traced-baseline]

Full depth (the defaults) is ~16.6 GB of checkpoint plus ~11 GB for the larger pack: the bench checks `df` first,
deletes each pack before the next and the checkpoint at the end (unless --keep). `--layers 2 --vision-depth 8`
is a ~3.5 GB variant for development. `--traced-baseline` also runs the traced (non-streaming) export of the same
checkpoint to fp16 as the baseline, in the same run (only for small variants: it holds ~4x the fp32 weights;
`--shape 3b --layers 2` is 2.4 GB of checkpoint, ~10 GB for the traced export). Kept out of the test suite (minutes, GBs of disk); tests/export/test_stream_export.py runs the same path
on a small config.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

# Qwen2.5-VL-7B/3B-Instruct's released configs (vocabulary and widths; layers and vision depth are flags).
SHAPES = {
    "7b": dict(hidden_size=3584, intermediate_size=18944, num_attention_heads=28, num_key_value_heads=4,
               mrope_section=[16, 24, 24], vocab_size=152064, tie_word_embeddings=False),
    "3b": dict(hidden_size=2048, intermediate_size=11008, num_attention_heads=16, num_key_value_heads=2,
               mrope_section=[16, 24, 24], vocab_size=151936, tie_word_embeddings=True),
}
VISION_7B = dict(hidden_size=1280, intermediate_size=3420, num_heads=16, window_size=112)
FULL_ATTENTION = [7, 15, 23, 31]
SHARD_BYTES = 4 << 30  # as the released checkpoints are sharded (~4 GB each)
CHUNK = 1 << 24  # random values generated per call: 64 MB of fp32


def write_checkpoint(out: Path, layers: int, vision_depth: int, shape: str = "7b", seed: int = 0) -> int:
    """Random bf16 weights with the released names and shapes, written shard by shard with an index; no tensor is
    ever whole in memory. -> total bytes of the shards."""
    import torch

    from retrv.model.config import parse_hf_config
    from retrv.model.loading import module_to_hf_name
    from retrv.model.qwen import Qwen2_5_VL
    from retrv.model.tiny import (MAX_PIXELS, MIN_PIXELS, build_tiny_tokenizer, tiny_config, write_preprocessor_config,
                                  write_tokenizer_files, VOCAB_SIZE)

    full = [i for i in FULL_ATTENTION if i < vision_depth]
    config, _, ids = tiny_config("tiny", num_hidden_layers=layers, **SHAPES[shape],
                                 vision=dict(VISION_7B, depth=vision_depth, fullatt_block_indexes=full))
    config["torch_dtype"] = "bfloat16"
    config["vision_config"]["out_hidden_size"] = SHAPES[shape]["hidden_size"]
    with torch.device("meta"):
        model = Qwen2_5_VL(parse_hf_config(config, None))
    tensors = [(module_to_hf_name(n), tuple(p.shape)) for n, p in model.state_dict().items()
               if not (n == "lm_head.weight" and config["tie_word_embeddings"])]  # tied (3B): no lm_head tensor
    del model
    out.mkdir(parents=True)
    shards, cur, size = [], [], 0
    for name, shape in tensors:
        nbytes = int(np.prod(shape)) * 2
        if cur and size + nbytes > SHARD_BYTES:
            shards.append(cur)
            cur, size = [], 0
        cur.append((name, shape))
        size += nbytes
    shards.append(cur)
    rng = np.random.default_rng(seed)
    weight_map, total = {}, 0
    for k, shard in enumerate(shards):
        fname = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        header, offset = {"__metadata__": {"format": "pt"}}, 0
        for name, shape in shard:
            n = int(np.prod(shape)) * 2
            header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + n]}
            offset += n
            weight_map[name] = fname
        blob = json.dumps(header).encode()
        blob += b" " * ((-len(blob)) % 8)
        with open(out / fname, "wb") as f:
            f.write(len(blob).to_bytes(8, "little") + blob)
            for name, shape in shard:
                left = int(np.prod(shape))
                is_norm = len(shape) == 1 and "norm" in name or name.endswith("ln_q.weight")
                while left:
                    m = min(left, CHUNK)
                    x = rng.standard_normal(m, dtype=np.float32) * (0.1 if is_norm else 0.02)
                    if is_norm:
                        x += 1.0
                    f.write(((x.view(np.uint32) + 0x8000) >> 16).astype(np.uint16).tobytes())  # fp32 -> bf16 (round)
                    left -= m
        total += (out / fname).stat().st_size
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                  "weight_map": weight_map}, indent=1))
    (out / "config.json").write_text(json.dumps(config, indent=2))
    (out / "generation_config.json").write_text(json.dumps({"do_sample": False, "eos_token_id": [ids["<|im_end|>"]]}))
    tokenizer, special = build_tiny_tokenizer(VOCAB_SIZE)
    write_tokenizer_files(out, tokenizer, special)
    write_preprocessor_config(out, min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS)
    return total


def code_state() -> str:
    """The commit the step's code came from (+ "-dirty" when the worktree differs): the steps import retrv at start."""
    root = Path(__file__).resolve().parents[1]
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True).stdout
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root, capture_output=True,
                               text=True).stdout
    except OSError:
        return "unknown"
    return head.strip() + ("-dirty" if dirty.strip() else "")


def timed(argv: list[str]) -> dict:
    """Run one step under /usr/bin/time -v: -> seconds, peak RSS (bytes), the tail of its output, when it started
    and from which commit."""
    started, code = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), code_state()
    t0 = time.perf_counter()
    out = subprocess.run(["/usr/bin/time", "-v", *argv], capture_output=True, text=True)
    secs = time.perf_counter() - t0
    peak = re.search(r"Maximum resident set size \(kbytes\): (\d+)", out.stderr)
    if out.returncode:
        raise SystemExit(f"step failed: {' '.join(argv)}\n{out.stderr[-3000:]}")
    return {"seconds": round(secs, 1), "peak_rss": int(peak.group(1)) * 1024 if peak else None,
            "stdout": out.stdout.strip()[-400:], "started": started, "code": code}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--shape", default="7b", choices=sorted(SHAPES))
    ap.add_argument("--layers", type=int, default=28)
    ap.add_argument("--vision-depth", type=int, default=32)
    ap.add_argument("--traced-baseline", action="store_true")
    ap.add_argument("--keep", action="store_true", help="keep the checkpoint")
    ap.add_argument("--exports-only", action="store_true", help="skip the verify and generate steps")
    args = ap.parse_args()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="retrv-large-"))
    work.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(work).free
    need = (16.6e9 + 11e9) * args.layers / 28
    print(f"disk free at {work}: {free / 1e9:.1f} GB; this run needs about {need / 1e9:.1f} GB", flush=True)
    if free < need * 1.1:
        raise SystemExit("not enough disk")
    ckpt, pack = work / "ckpt", work / "pack"
    py, rows = sys.executable, []
    t0 = time.perf_counter()
    weights = write_checkpoint(ckpt, args.layers, args.vision_depth, args.shape)
    rows.append({"step": "write checkpoint", "seconds": round(time.perf_counter() - t0, 1), "peak_rss": None})
    print(f"checkpoint: {weights / 1e9:.2f} GB bf16 ({args.shape}-shaped, {args.layers} layers, vision depth "
          f"{args.vision_depth})",
          flush=True)
    verify = ("from retrv.export.stream_verify import verify_streamed_pack as v; import json; "
              "print(json.dumps(v({p!r}, {c!r})))")
    generate = ("from retrv.runtime.generate import load_pack_generator as g; "
                "r = g({p!r}, cache_dir=None).generate('hello', max_new_tokens=8); print(r.token_ids)")
    steps = []
    if args.traced_baseline:
        steps.append(("export fp16 (traced, baseline)",
                      ["retrv", "export", str(ckpt), str(pack), "--precision", "fp16", "--stream", "off"]))
    steps += [
        ("export fp16 (streamed)", ["retrv", "export", str(ckpt), str(pack), "--precision", "fp16", "--stream", "on"]),
        ("verify fp16", [py, "-c", verify.format(p=str(pack), c=str(ckpt))]),
        ("export int4 (streamed)", ["retrv", "export", str(ckpt), str(pack), "--quantize", "int4", "--stream", "on"]),
        ("verify int4", [py, "-c", verify.format(p=str(pack), c=str(ckpt))]),
        ("generate int4", [py, "-c", generate.format(p=str(pack))]),
    ]
    for name, argv in steps:
        if args.exports_only and not name.startswith("export"):
            continue
        if name.startswith("export") and pack.exists():
            shutil.rmtree(pack)  # each pack deleted before the next: disk
        r = timed(argv)
        r["step"] = name
        if name.startswith("export"):
            r["pack_bytes"] = sum(p.stat().st_size for p in pack.iterdir())
        rows.append(r)
        ratio = f"{r['peak_rss'] / weights:.2f}" if r["peak_rss"] else "-"
        print(f"{name:<32}{r['seconds']:>8} s  peak RSS {r['peak_rss'] / 1e9:6.2f} GB = {ratio} x checkpoint "
              f"(started {r['started']}, code {r['code']})", flush=True)
        print(json.dumps(r), flush=True)
    shutil.rmtree(pack, ignore_errors=True)
    if not args.keep:
        shutil.rmtree(ckpt)
    print(json.dumps({"checkpoint_bytes": weights, "shape": args.shape, "layers": args.layers, "vision_depth": args.vision_depth,
                      "limit_bytes": weights // 2, "steps": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
