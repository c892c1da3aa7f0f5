"""Artifacts the end-to-end benchmark needs: checkpoints, packs (fp32, INT8, INT4), photo corpora, indexes.

Each artifact is built once per work directory and reused while its key (what it was built from, including a
fingerprint of the project's source) is unchanged; `stamps/<name>.json` records the key and how long the build
took, so a reused artifact still reports its build time. Quantization failures are recorded, never hidden: the
caller gets the error and reports the row as missing.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from collections.abc import Callable
from pathlib import Path

from _common import REPO, source_fingerprint

log = logging.getLogger("bench.prep")

PHOTOS = REPO.parent / "shared" / "data" / "flickr8k-1k"  # DESIGN/data README: ../shared/data from the project root
JPEG_QUALITY = 95  # what a photo pipeline stores; the decode cost is part of the baseline's per-query image work


def cached(workdir: Path, name: str, key: dict, build: Callable[[Path], dict | None]) -> tuple[Path, dict]:
    """Build `workdir/name` unless a stamp with the same key says it is already there. -> (path, info)."""
    out, stamp = workdir / name, workdir / "stamps" / f"{name}.json"
    key = {**key, "source": source_fingerprint()}
    if out.exists() and stamp.is_file():
        saved = json.loads(stamp.read_text())
        if saved.get("key") == key:
            return out, {**saved.get("info", {}), "reused": True}
    if out.exists():
        shutil.rmtree(out) if out.is_dir() else out.unlink()
    t0 = time.perf_counter()
    info = build(out) or {}
    info = {**info, "build_s": round(time.perf_counter() - t0, 2)}
    stamp.parent.mkdir(parents=True, exist_ok=True)
    stamp.write_text(json.dumps({"key": key, "info": info}, indent=1))
    return out, {**info, "reused": False}


# ---------------------------------------------------------------------------------------------- model and packs
def checkpoint(workdir: Path, preset: str, seed: int = 0) -> Path:
    from retrv.model.tiny import write_tiny_checkpoint

    path, _ = cached(workdir, f"{preset}-ckpt", {"preset": preset, "seed": seed},
                     lambda out: write_tiny_checkpoint(out, preset=preset, icm=True, seed=seed) and None)
    return path


def fp32_pack(workdir: Path, ckpt: Path, name: str) -> tuple[Path, dict]:
    from retrv.export.pack_export import export_pack

    return cached(workdir, name, {"ckpt": str(ckpt), "ckpt_config": (ckpt / "config.json").read_text()},
                  lambda out: export_pack(ckpt, out) and None)


def legacy_icm_pack(workdir: Path, pack: Path, ckpt: Path, name: str) -> tuple[Path, dict]:
    """`pack` with its icm_relation.onnx as exported before issue 20 (the query expanded over the K candidates,
    `IcmRelationReference`); every other file unchanged. What a pack made by the earlier code runs, so one run can
    time the ICM step before and after the change (and show such a pack still loads)."""
    def build(out: Path) -> dict:
        import torch

        from retrv.export.graphs import IcmRelationReference, SubModel, icm_relation_spec
        from retrv.export.onnx_export import export_onnx, validate_onnx
        from retrv.model.loading import load_checkpoint
        from retrv.runtime.pack import MANIFEST_NAME, Manifest, describe_file, write_manifest

        shutil.copytree(pack, out)
        model = load_checkpoint(ckpt, dtype=torch.float32)
        sub = SubModel(icm_relation_spec(model.cfg), IcmRelationReference(model))
        export_onnx(sub, model.cfg, out / sub.spec.filename)
        report = validate_onnx(sub, model.cfg, out / sub.spec.filename)
        m = Manifest.from_dict(json.loads((out / MANIFEST_NAME).read_text()))
        entry = m.files[sub.spec.filename]
        files = {**m.files, sub.spec.filename: describe_file(out, sub.spec.filename, entry.role, precision="fp32",
                                                             inputs=entry.inputs, outputs=entry.outputs)}
        write_manifest(out, Manifest(**{**m.__dict__, "files": files,
                                        "extra": {**m.extra, "bench_legacy_icm_relation": True}}))
        return {"icm_relation_validation": report["max_abs_diff"]}

    return cached(workdir, name, {"pack": str(pack), "manifest": (pack / "manifest.json").read_text()}, build)


def quantized_pack(workdir: Path, pack: Path, mode: str, name: str) -> tuple[Path | None, dict]:
    """INT8 (`--mode int8-dynamic`'s defaults: no calibration set needed, every graph) or INT4 (`--mode int4`'s
    defaults, decoder only) through `calibration.quantize.quantize_pack`. -> (None, {"error": ...}) when quantization fails."""
    def build(out: Path) -> dict:
        from retrv.calibration.quantize import Int4WeightOnlyConfig, Int8DynamicConfig, quantize_pack

        config = Int8DynamicConfig() if mode == "int8" else Int4WeightOnlyConfig()
        report = quantize_pack(pack, out, config)
        fp, q = report.total
        return {"config": report.config, "graph_bytes_fp32": fp, "graph_bytes_quantized": q, "gate": report.gate}

    try:
        return cached(workdir, name, {"pack": str(pack), "mode": mode,
                                      "manifest": (pack / "manifest.json").read_text()}, build)
    except Exception as e:  # noqa: BLE001 - any failure makes the row missing, with its message
        log.warning("quantize %s failed: %s", mode, e)
        return None, {"error": f"{type(e).__name__}: {e}"}


# ---------------------------------------------------------------------------------------------------- corpora
def _read_photo_captions(src: Path) -> dict[str, list[str]]:
    from retrv.train.flickr8k import read_captions

    return read_captions(src)


def photo_corpus(workdir: Path, size: int, n: int, src: Path = PHOTOS) -> tuple[Path, dict]:
    """n Flickr8k photos (first by file name), centre-cropped to squares of `size` px, as an M-BEIR candidate
    pool (corpus.jsonl) plus one caption query per photo (queries.json). Without the shared photos: synthetic
    pictures (runtime.demo.synthetic_image) and numbered captions, recorded as such."""
    def build(out: Path) -> dict:
        from PIL import Image

        from retrv.runtime.inputs.corpus import write_jsonl

        (out / "images").mkdir(parents=True)
        rows, queries = [], []
        if src.is_dir():
            captions = _read_photo_captions(src)
            names = sorted(captions)[:n]
            for name in names:
                im = Image.open(src / "images" / name).convert("RGB")
                w, h = im.size
                s = min(w, h)
                im = im.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s))
                im.resize((size, size), Image.Resampling.BICUBIC).save(out / "images" / f"{Path(name).stem}.jpg",
                                                                       quality=JPEG_QUALITY)
                rows.append({"did": Path(name).stem, "txt": "", "img_path": f"images/{Path(name).stem}.jpg",
                             "modality": "image"})
                queries.append({"text": captions[name][0], "positives": [Path(name).stem]})
            source = f"flickr8k-1k ({src})"
        else:
            from retrv.app.demo import synthetic_image

            for i in range(n):
                synthetic_image(1000 + i, (size, size)).save(out / "images" / f"s{i:04d}.jpg", quality=JPEG_QUALITY)
                rows.append({"did": f"s{i:04d}", "txt": "", "img_path": f"images/s{i:04d}.jpg", "modality": "image"})
                queries.append({"text": f"picture number {i} with coloured shapes", "positives": [f"s{i:04d}"]})
            source = "synthetic pictures (flickr8k-1k not found)"
        write_jsonl(out / "corpus.jsonl", rows)
        (out / "queries.json").write_text(json.dumps(queries))
        return {"images": len(rows), "size_px": size, "source": source}

    return cached(workdir, f"photos-{size}-n{n}", {"size": size, "n": n, "src": str(src)}, build)


def synth_test_set(workdir: Path, seed: int, n_test: int, image_size: int, pool_per_query: int,
                   max_objects: int = 3) -> tuple[Path, dict]:
    """The synthetic test split the embedded default is evaluated on (train/synth.py): its test split depends on
    the seed and its own size only, so n_train=0 gives the same test scenes the trainer held out."""
    def build(out: Path) -> dict:
        from retrv.train.synth import generate_dataset

        m = generate_dataset(out, seed=seed, n_train=0, n_val=0, n_test=n_test, image_size=image_size,
                             pool_per_query=pool_per_query, max_objects=max_objects)
        return {"queries": m["splits"]["test"]["n_queries"], "candidates": m["splits"]["test"]["n_candidates"]}

    return cached(workdir, f"synth-s{seed}-n{n_test}-{image_size}px-p{pool_per_query}-o{max_objects}",
                  {"seed": seed, "n_test": n_test, "image_size": image_size, "pool": pool_per_query,
                   "max_objects": max_objects}, build)


# ------------------------------------------------------------------------------------------------------ indexes
def index(workdir: Path, pack: Path, corpus: Path, name: str) -> tuple[Path, dict]:
    """`retrv index build` through the pack's ONNX Runtime backend: real encoding of every candidate (vision
    tokens into the int8 cache, t_con, the coarse vector). Build time and bytes per item are recorded."""
    def build(out: Path) -> dict:
        from retrv.runtime.index.store import Index
        from retrv.runtime.pack import Pack
        from retrv.runtime.backends import open_backend
        from retrv.runtime.retriever import CandidateEncoder, Components

        p = Pack.open(pack)
        with open_backend(p, "ort", cache_dir=workdir / "ort-cache") as backend:
            t0 = time.perf_counter()
            ix = Index.build(CandidateEncoder(Components(p, backend)), corpus, out)
            seconds = time.perf_counter() - t0
        n = len(ix.rows)
        return {"candidates": n, "encode_and_build_s": round(seconds, 2),
                "ms_per_candidate": round(1e3 * seconds / max(1, n), 1), "bytes_per_item": ix.bytes_per_item(),
                "cached_tokens_per_candidate": float(ix.cache.total_tokens / max(1, n))}

    return cached(workdir, name, {"pack_manifest": (pack / "manifest.json").read_text(),
                                  "corpus": (corpus).read_text()}, build)
