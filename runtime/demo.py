"""`retrv demo`: the pipeline end to end on what the project has today.

Until the trained embedded default exists (issue 6), the demo runs on a tiny *random* checkpoint that the project
writes itself: it shows that the stages run and how long each takes, not that anything is retrieved. It says so.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import TextIO

import numpy as np

from retrv.runtime.errors import require


def synthetic_image(seed: int, size: tuple[int, int] = (160, 224)) -> "PIL.Image.Image":  # noqa: F821
    """A deterministic picture (coloured shapes on a gradient): the demo ships no photographs."""
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


def run_demo(cache_dir: str | None, seed: int, out: TextIO) -> int:
    require("torch", "export")
    from retrv.export.pack_export import export_pack
    from retrv.model.tiny import write_tiny_checkpoint
    from retrv.runtime.generate import load_pack_generator

    root = Path(cache_dir) if cache_dir else Path(tempfile.mkdtemp(prefix="retrv-demo-"))
    ckpt, pack_dir = root / f"tiny-random-seed{seed}", root / f"tiny-random-seed{seed}-pack"
    timings: dict[str, float] = {}

    t0 = time.perf_counter()
    if not (ckpt / "config.json").exists():
        write_tiny_checkpoint(ckpt, icm=True, seed=seed)
    timings["checkpoint_ms"] = (time.perf_counter() - t0) * 1e3
    t0 = time.perf_counter()
    if not (pack_dir / "manifest.json").exists():
        export_pack(ckpt, pack_dir, verify=True)  # every graph validated, greedy tokens checked end to end
    timings["export_ms"] = (time.perf_counter() - t0) * 1e3

    gen = load_pack_generator(pack_dir, cache_dir=root / "cache")
    images = [synthetic_image(seed), synthetic_image(seed + 1, (200, 120))]
    result = gen.generate("Which of the two pictures shows a red ball on a blue background?", images,
                          max_new_tokens=16, stop_at_eos=False)
    cfg = gen.cfg
    print("retrv demo: RANDOM WEIGHTS. This checks the pipeline (checkpoint -> verified ONNX pack -> ONNX Runtime",
          file=out)
    print("generation with images); it retrieves nothing. The trained embedded default replaces it (issue 6).",
          file=out)
    print(f"checkpoint   {ckpt} (hidden {cfg.text.hidden_size}, {cfg.text.num_hidden_layers} layers, ICM: "
          f"{cfg.icm is not None})", file=out)
    print(f"pack         {pack_dir} ({', '.join(sorted(gen.backend.pack.manifest.files))})", file=out)
    print(f"prompt       {len(result.prompt_ids)} tokens, 2 synthetic images", file=out)
    print(f"generated    {result.token_ids}", file=out)
    print(f"text         {result.text!r}", file=out)
    timings.update({(k if k.startswith("ms_") else f"{k}_ms"): v for k, v in result.timings_ms.items()})
    print("timings      " + "  ".join(f"{k}={v:.1f}" for k, v in timings.items()), file=out)
    return 0
