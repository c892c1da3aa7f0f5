"""`retrv demo`: the whole product on the embedded default, end to end.

The shipped checkpoint (`retrv/model/default`, a small Retrv-R1 trained by `python -m retrv.train.run`) is
exported to a verified pack, quantized to INT8, and an index is built over a generated test corpus the model never
saw; then queries are answered and the three stages the paper compares are measured on the same queries: the
coarse stage alone, reranking without details inspection (inspect budget 0), and reranking with it. Every
artifact is cached, so later runs start at the queries.
"""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path
from typing import TextIO

import numpy as np

from retrv.runtime.errors import InputError, require

DEMO_QUERIES = 40  # test queries evaluated (text->image and composed); the demo stays under 3 minutes on 2 cores
SHOWN = 2  # queries printed with their reasoning traces
_IMAGE_RUN = re.compile(r"<\|vision_start\|>((?:<\|image_pad\|>)*)<\|vision_end\|>")


def _readable(trace: str) -> str:
    """A trace on one line, each appended image as "<N image tokens>" rather than N pad tokens."""
    trace = _IMAGE_RUN.sub(lambda m: f"<{m.group(1).count('<|image_pad|>')} image tokens>", trace)
    return trace.replace("\n", " ")


def default_checkpoint() -> Path:
    import retrv.model

    return Path(retrv.model.__path__[0]) / "default"


def synthetic_image(seed: int, size: tuple[int, int] = (160, 224)):
    """A deterministic picture (coloured shapes on a gradient) for checks that need any image."""
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    h, w = size
    grad = np.linspace(0, 255, w, dtype=np.float32)[None, :, None] * np.array([0.3, 0.5, 0.9], np.float32)
    img = Image.fromarray(np.broadcast_to(grad, (h, w, 3)).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    for _ in range(4):
        x0, y0 = int(rng.integers(0, w - 40)), int(rng.integers(0, h - 40))
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        draw.ellipse([x0, y0, x0 + int(rng.integers(20, 60)), y0 + int(rng.integers(20, 60))], fill=colour)
    return img


def _cache_root(cache_dir: str | None) -> Path:
    default = Path(os.environ.get("RETRV_CACHE", Path.home() / ".cache" / "retrv")) / "demo"
    root = Path(cache_dir) if cache_dir else default
    if os.path.lexists(root) and not root.is_dir():  # the demo only adds its own sub-folders; a file is a mistake
        raise InputError(f"--cache-dir {str(root)!r}: exists and is not a directory; expected a folder for the "
                         f"demo's data, packs and index")
    return root


def _max_objects(ckpt: Path) -> int:
    """Objects per scene in the data the default was trained on (its training.json), 3 when it does not say."""
    try:
        return int(json.loads((ckpt / "training.json").read_text())["config"]["data"].get("max_objects", 3))
    except (OSError, ValueError, KeyError, TypeError):
        return 3


def _stamp(path: Path) -> str:
    """Fingerprint of the shipped weights: a new default invalidates the cached pack and index."""
    from retrv.runtime.fsutil import sha256_file

    return sha256_file(path / "model.safetensors")[:16]


def build_demo(cache_dir: str | None, seed: int = 0, n_queries: int = DEMO_QUERIES):
    """The demo's data, INT8 pack and index over the embedded default, built once under the cache and reused
    (`retrv demo`, `retrv serve --demo`). -> (root, data folder, Pack, its backend, Index, setup seconds by step);
    None when the package ships no default checkpoint."""
    require("torch", "export")
    ckpt = default_checkpoint()
    if not (ckpt / "config.json").is_file():
        return None
    from retrv.calibration.config import Int8DynamicConfig
    from retrv.calibration.quantize import quantize_pack
    from retrv.export.pack_export import export_pack
    from retrv.runtime.index.store import INDEX_FORMAT_VERSION, Index
    from retrv.runtime.pack import Pack
    from retrv.runtime.backends import open_backend
    from retrv.runtime.retriever import CandidateEncoder, Components
    from retrv.train.synth import generate_dataset

    root = _cache_root(cache_dir) / f"default-{_stamp(ckpt)}"
    root.mkdir(parents=True, exist_ok=True)
    clock, setup = time.perf_counter, {}

    t0 = clock()
    scenes = (max(n_queries, DEMO_QUERIES) + 1) // 2  # each scene gives a text and a composed query
    data = root / f"data-seed{seed}-{scenes}"
    if not (data / "dataset.json").is_file():  # scenes like those the default was trained on, never the same ones
        generate_dataset(data, seed=1000 + seed, n_train=0, n_val=0, n_test=scenes, max_objects=_max_objects(ckpt))
    setup["data"] = clock() - t0
    t0 = clock()
    if not (root / "pack" / "manifest.json").is_file():
        export_pack(ckpt, root / "pack")
    setup["export"] = clock() - t0
    t0 = clock()
    if not (root / "pack-int8" / "manifest.json").is_file():
        quantize_pack(root / "pack", root / "pack-int8", Int8DynamicConfig())
    setup["quantize"] = clock() - t0
    pack = Pack.open(root / "pack-int8")
    backend = open_backend(pack, "ort", cache_dir=root / "ort-cache")
    t0 = clock()
    index_dir = root / f"index-v{INDEX_FORMAT_VERSION}-seed{seed}-{scenes}"  # an older layout is rebuilt, not refused
    if not (index_dir / "index.json").is_file():
        Index.build(CandidateEncoder(Components(pack, backend)), data / "corpus_test.jsonl", index_dir)
    setup["index"] = clock() - t0
    return root, data, pack, backend, Index.open(index_dir, pack=pack), setup


def run_demo(cache_dir: str | None, seed: int, out: TextIO, n_queries: int = DEMO_QUERIES) -> int:
    built = build_demo(cache_dir, seed, n_queries)
    if built is None:
        return _random_pipeline_demo(_cache_root(cache_dir), seed, out)
    from retrv.runtime.rerank.budget import Budget
    from retrv.runtime.inputs.corpus import read_queries
    from retrv.runtime.evaluate import evaluate
    from retrv.runtime.retriever import Retriever

    root, data, pack, backend, index, setup = built
    retriever = Retriever(pack, index, backend=backend)
    queries = read_queries(data / "queries_test.jsonl")[:n_queries]

    k = window = 10  # as the model was trained and its card evaluated: one window over the coarse top 10
    with_insp, without = Budget(), Budget(inspect=0)  # the runtime's default budgets, and no inspection
    print("retrv demo: the embedded default (a small Retrv-R1 trained on synthetic scenes; see its CARD.md)", file=out)
    print(f"pack {pack.path} (INT8 dynamic), index of {index.meta.count} candidates the model never saw in "
          f"training\n", file=out)
    for q in queries[:SHOWN]:
        res = retriever.search(text=q.query_txt, image=q.query_img_path, k=k, budget=with_insp, window=window,
                               stride=window)
        d = res.to_dict()
        query = (f"[image {Path(q.query_img_path).name}] " if q.query_img_path else "") + (q.query_txt or "")
        print(f"query  {query}", file=out)
        print(f"gold   {', '.join(q.pos_cand_list)}", file=out)
        for i, r in enumerate(d["ranked"][:3], 1):
            mark = "  <- gold" if r["did"] in q.pos_cand_list else ""
            print(f"  {i}. {r['did']} (coarse #{r['coarse_rank'] + 1}){mark}", file=out)
        trace = _readable(d["windows"][0]["text"]) if d["windows"] else ""
        print(f"  reasoning: {trace[:600]}{'...' if len(trace) > 600 else ''}", file=out)
        t = d["tokens"]
        print(f"  tokens: {t['prefill_tokens']} prefill, {t['think_tokens']} generated, {t['inspected']} inspected\n",
              file=out)

    runs = {
        "coarse stage only": evaluate(retriever, queries, k=k, window=window, stride=window, rerank=False),
        "rerank, no inspection": evaluate(retriever, queries, k=k, budget=without, window=window, stride=window),
        "rerank + inspection": evaluate(retriever, queries, k=k, budget=with_insp, window=window, stride=window),
    }
    print(f"{len(queries)} held-out queries (text->image and composed image+text->image), K={k}", file=out)
    print(f"{'':<24}{'R@1':>7}{'R@5':>7}{'tokens/query':>14}{'p50 ms':>9}", file=out)
    for name, r in runs.items():
        key = "reranked" if "reranked" in r else "coarse"
        tokens = r.get("tokens_per_query", {}).get("total_tokens", 0.0)
        print(f"{name:<24}{r[key]['recall@1']:>7.3f}{r[key]['recall@5']:>7.3f}{tokens:>14.1f}"
              f"{r['latency_ms']['total']['p50']:>9.1f}", file=out)
    kinds = sorted(k for k in runs["coarse stage only"].get("hard_negatives", {}).get("coarse", {}) if k != "all")
    if kinds:
        print(f"hard negatives ranked above the target, by what they differ in: {' / '.join(kinds)}", file=out)
        for name, r in runs.items():
            wins = r["hard_negatives"]["reranked" if "reranked" in r else "coarse"]
            print(f"  {name:<22}" + " / ".join(f"{wins[k]['wins']:.2f}" if k in wins else "-" for k in kinds),
                  file=out)
    stages = runs["rerank + inspection"]["latency_ms"]
    print("per stage p50 (ms): " + ", ".join(f"{s} {v['p50']:.1f}" for s, v in stages.items() if s != "total"),
          file=out)
    print("setup (s, cached after the first run): " + ", ".join(f"{k} {v:.1f}" for k, v in setup.items()), file=out)
    (root / "last_run.json").write_text(json.dumps(runs, indent=2))
    return 0


def _random_pipeline_demo(root: Path, seed: int, out: TextIO) -> int:
    """Without the shipped default (a source tree where it was removed): the pipeline on random weights."""
    from retrv.export.pack_export import export_pack
    from retrv.model.tiny import write_tiny_checkpoint
    from retrv.runtime.generate import load_pack_generator

    ckpt, pack_dir = root / f"tiny-random-seed{seed}", root / f"tiny-random-seed{seed}-pack"
    if not (ckpt / "config.json").exists():
        write_tiny_checkpoint(ckpt, icm=True, seed=seed)
    if not (pack_dir / "manifest.json").exists():
        export_pack(ckpt, pack_dir, verify=True)
    gen = load_pack_generator(pack_dir, cache_dir=root / "ort-cache")
    images = [synthetic_image(seed), synthetic_image(seed + 1, (200, 120))]
    result = gen.generate("Which picture shows a red ball?", images, max_new_tokens=16, stop_at_eos=False)
    print("retrv demo: no embedded default found; RANDOM WEIGHTS. This checks the pipeline (checkpoint -> "
          "verified pack -> ONNX Runtime generation with images); it retrieves nothing.", file=out)
    print(f"pack {pack_dir}; prompt {len(result.prompt_ids)} tokens; generated {result.token_ids}", file=out)
    print("timings " + "  ".join(f"{k}={v:.1f}ms" for k, v in result.timings_ms.items()), file=out)
    return 0
