"""Slow check: a random config whose fp32 weights exceed the 2 GB protobuf limit exports with external data,
opens and generates; reports the peak memory of each stage (each in its own process, so peaks do not mix).

    python bench/export_large.py [--workdir DIR] [--layers 12]

Kept out of the test suite (minutes, several GB of disk).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

STAGES = {
    "write checkpoint": "from retrv.model.tiny import write_tiny_checkpoint as w; w({ckpt!r}, preset='mid', seed=0, "
                        "hidden_size=2048, intermediate_size=5632, num_hidden_layers={layers}, num_attention_heads=16, "
                        "num_key_value_heads=4, mrope_section=[16, 24, 24])",
    "export": "from retrv.export.pack_export import export_pack as e; e({ckpt!r}, {pack!r})",
    "open + generate (ort)": "from retrv.runtime.generate import load_pack_generator as g; "
                             "r = g({pack!r}, cache_dir=None).generate('hello', max_new_tokens=8); print(r.token_ids)",
}


PEAK = "; import resource; print('PEAK_KB', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)"


def run_stage(code: str) -> tuple[float, float, str]:
    """-> (seconds, the child's own peak RSS in GB, its other stdout)."""
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", code + PEAK], capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(f"stage failed:\n{out.stderr[-3000:]}")
    lines = out.stdout.strip().splitlines()
    peak_kb = int(lines[-1].split()[1])
    return time.perf_counter() - t0, peak_kb / 1e6, "\n".join(lines[:-1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--layers", type=int, default=12)
    args = ap.parse_args()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="retrv-large-"))
    ckpt, pack = str(work / "ckpt"), str(work / "pack")
    rows = []
    for name, template in STAGES.items():
        secs, peak, out = run_stage(template.format(ckpt=ckpt, pack=pack, layers=args.layers))
        rows.append({"stage": name, "seconds": round(secs, 1), "peak_rss_gb": round(peak, 2), "stdout": out})
    weights = sum(p.stat().st_size for p in Path(ckpt).glob("*.safetensors"))
    files = {p.name: p.stat().st_size for p in Path(pack).iterdir()}
    print(f"checkpoint weights: {weights / 1e9:.2f} GB (fp32), over the 2 GB protobuf limit: {weights > 2**31}")
    print("pack files: " + ", ".join(f"{k} {v / 1e9:.2f} GB" for k, v in sorted(files.items()) if v > 1e7))
    print(f"{'stage':<24}{'seconds':>9}{'peak RSS of the stage (GB)':>30}")
    for r in rows:
        print(f"{r['stage']:<24}{r['seconds']:>9}{r['peak_rss_gb']:>30}")
    print(json.dumps({"weights_bytes": weights, "pack_files": files, "stages": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
