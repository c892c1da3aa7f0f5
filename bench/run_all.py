"""Reproduce every benchmark table and plot: `python bench/run_all.py` (or `--quick` for a ~2-minute smoke run).

    1. bench/e2e.py        latency, decoder tokens, peak RSS vs K and image size; the embedded default's recall
    2. bench/ann_scale.py  the coarse stage vs corpus size (10k and 100k random vectors)
    3. tables, headline ratios, docs/BENCHMARKS.md and docs/img/*.png from the two JSON files

Arguments it does not know are passed to bench/e2e.py (e.g. `--ks 10 20`, `--queries 3`, `--skip sizes`).
The two parts run one after the other, never at the same time (each would slow the other's timings).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from _common import BENCH_DIR, REPO


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="K=10, 2 queries, no image-size sweep, 10k-vector ANN")
    ap.add_argument("--preset", default="mid", choices=("tiny", "mid"))
    ap.add_argument("--workdir", default=str(BENCH_DIR / ".work"))
    # --quick writes under bench/results/quick/ unless told otherwise: a smoke run never replaces the published page.
    ap.add_argument("--results-dir", default=None, help="bench/results (quick: bench/results/quick)")
    ap.add_argument("--md", default=None, help="docs/BENCHMARKS.md (quick: <results-dir>/BENCHMARKS.md)")
    ap.add_argument("--img-dir", default=None, help="docs/img (quick: <results-dir>/img)")
    ap.add_argument("--ann-ns", type=int, nargs="+", default=None,
                    help="corpus sizes for the ANN part (10000 100000; quick 10000)")
    ap.add_argument("--ann-gaussian-ns", type=int, nargs="*", default=None,
                    help="sizes with unstructured Gaussian vectors (10000; quick none)")
    ap.add_argument("--skip-ann", action="store_true")
    args, e2e_args = ap.parse_known_args(argv)
    results = Path(args.results_dir or (BENCH_DIR / "results" / ("quick" if args.quick else "")))
    args.md = args.md or str(results / "BENCHMARKS.md" if args.quick else REPO / "docs" / "BENCHMARKS.md")
    args.img_dir = args.img_dir or str(results / "img" if args.quick else REPO / "docs" / "img")
    results.mkdir(parents=True, exist_ok=True)
    e2e_json, ann_json = results / "e2e.json", results / "ann.json"
    cold = not (Path(args.workdir) / "stamps").is_dir()
    t0 = time.perf_counter()

    cmd = [sys.executable, str(BENCH_DIR / "e2e.py"), "--preset", args.preset, "--workdir", args.workdir,
           "--json", str(e2e_json)] + (["--quick"] if args.quick else []) + e2e_args
    print("$ " + " ".join(cmd[1:]), flush=True)
    rc = subprocess.call(cmd, cwd=str(REPO))
    if rc:
        print(f"run_all: bench/e2e.py failed with exit code {rc}", file=sys.stderr)
        return rc
    t_e2e = time.perf_counter() - t0

    ann = None
    if not args.skip_ann:
        ns = args.ann_ns or ([10_000] if args.quick else [10_000, 100_000])
        gauss = args.ann_gaussian_ns if args.ann_gaussian_ns is not None else ([] if args.quick else [10_000])
        cmd = [sys.executable, str(BENCH_DIR / "ann_scale.py"), "--ns", *map(str, ns), "--gaussian-ns",
               *map(str, gauss), "--json", str(ann_json)]
        print("$ " + " ".join(cmd[1:]), flush=True)
        rc = subprocess.call(cmd, cwd=str(REPO))
        if rc:
            print(f"run_all: bench/ann_scale.py failed with exit code {rc}", file=sys.stderr)
            return rc
        ann = json.loads(ann_json.read_text())

    from markdown_doc import write_markdown
    from plots import draw_all
    from report import console

    e2e = json.loads(e2e_json.read_text())
    images = draw_all(e2e, Path(args.img_dir))
    total = time.perf_counter() - t0
    run = {"total_min": round(total / 60, 2), "e2e_min": round(t_e2e / 60, 2), "cold": cold, "quick": args.quick}
    (results / "run_all.json").write_text(json.dumps(run, indent=1))  # report.py --md reads it back
    md = write_markdown(e2e, ann, Path(args.md), Path(args.img_dir), images, run)
    print(console(e2e, ann))
    print(f"\nwrote {e2e_json}" + (f", {ann_json}" if ann else "") + f", {md}, "
          + ", ".join(str(p) for p in images.values()))
    print(f"run_all: {total / 60:.1f} min in all (end-to-end part {t_e2e / 60:.1f} min; "
          f"{'cold: artifacts built in this run' if cold else 'artifacts reused from ' + args.workdir})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
