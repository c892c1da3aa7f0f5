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
    import torch

    from retrv.model import load_checkpoint
    from retrv.model.tiny import write_tiny_checkpoint
    from retrv.runtime.preprocess import ImageProcessorConfig, preprocess_images
    from retrv.runtime.prompt import PromptTokenizer

    root = Path(cache_dir) if cache_dir else Path(tempfile.mkdtemp(prefix="retrv-demo-"))
    ckpt = root / f"tiny-random-seed{seed}"
    timings: dict[str, float] = {}

    t0 = time.perf_counter()
    if not (ckpt / "config.json").exists():
        write_tiny_checkpoint(ckpt, icm=True, seed=seed)
    model = load_checkpoint(ckpt)
    timings["load_ms"] = (time.perf_counter() - t0) * 1e3

    t0 = time.perf_counter()
    images = [synthetic_image(seed), synthetic_image(seed + 1, (200, 120))]
    proc = ImageProcessorConfig.from_file(ckpt / "preprocessor_config.json")
    patches, grids = preprocess_images(images, proc)
    tok = PromptTokenizer(ckpt / "tokenizer.json")
    merge = model.cfg.vision.spatial_merge_size**2
    messages = [{"role": "user", "content": [
        {"type": "image"}, {"type": "image"},
        {"type": "text", "text": "Which of the two pictures shows a red ball on a blue background?"},
    ]}]
    ids = tok.render(messages, [int(np.prod(g)) // merge for g in grids])
    timings["preprocess_ms"] = (time.perf_counter() - t0) * 1e3

    t0 = time.perf_counter()
    new = model.generate(
        torch.tensor([ids]), torch.from_numpy(patches), torch.from_numpy(grids), max_new_tokens=16, eos_token_ids=()
    )[0].tolist()
    timings["generate_ms"] = (time.perf_counter() - t0) * 1e3

    n_params = sum(p.numel() for p in model.parameters())
    print("retrv demo: RANDOM WEIGHTS. This checks the pipeline (checkpoint -> preprocessing -> model -> greedy", file=out)
    print("decoding); it retrieves nothing. The trained embedded default replaces it (issue 6).", file=out)
    print(f"checkpoint   {ckpt} ({n_params / 1e6:.2f} M parameters, ICM: {model.icm is not None})", file=out)
    print(f"images       {len(images)} synthetic, grids {grids.tolist()} -> {patches.shape[0]} patches", file=out)
    print(f"prompt       {len(ids)} tokens (chat template with image placeholders expanded)", file=out)
    print(f"generated    {new}", file=out)
    print(f"text         {tok.decode(new)!r}", file=out)
    print("timings      " + "  ".join(f"{k}={v:.1f}" for k, v in timings.items()), file=out)
    return 0
