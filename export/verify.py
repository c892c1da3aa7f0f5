"""`--verify`: greedy generation through the finished pack must equal the PyTorch model's and transformers' (when
installed), token for token, for a text prompt and a prompt with two images of different sizes."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from retrv.export.onnx_export import ExportValidationError
from retrv.runtime.backends.ort import OrtBackend
from retrv.export.torch_backend import TorchBackend
from retrv.runtime.generate import Generator
from retrv.runtime.pack import Pack

log = logging.getLogger(__name__)

MAX_NEW_TOKENS = 32


def verification_images():
    """Two deterministic pictures of different sizes (the project ships no photographs)."""
    from retrv.app.demo import synthetic_image

    return [synthetic_image(11, (150, 220)), synthetic_image(12, (260, 120))]


def plain_greedy_config(transformers, eos: list[int], pad: int | None):
    """The oracle's decoding: plain greedy, whatever the checkpoint's generation_config.json asks for. The Instruct
    releases ship do_sample/top_k/top_p/temperature and repetition_penalty 1.05; inherited, the last one changes
    the argmax and the oracle stops being greedy. Every sampling knob is set to its neutral value explicitly."""
    return transformers.GenerationConfig(
        do_sample=False, num_beams=1, repetition_penalty=1.0, temperature=1.0, top_k=0, top_p=1.0,
        no_repeat_ngram_size=0, max_new_tokens=MAX_NEW_TOKENS, eos_token_id=eos,
        pad_token_id=pad if pad is not None else eos[0])


def _transformers_greedy(ckpt: Path, gen: Generator, prompt: str, images) -> list[int] | None:
    try:
        import transformers
    except ImportError:
        return None
    transformers.utils.logging.disable_progress_bar()  # library output; the CLI prints its own result
    try:
        ref = transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(
            str(ckpt), dtype=torch.float32, attn_implementation="eager"
        ).eval()
    finally:
        transformers.utils.logging.enable_progress_bar()
    kwargs = {}
    grids = np.zeros((0, 3), np.int64)
    if images:
        from retrv.runtime.inputs.preprocess import preprocess_images

        patches, grids = preprocess_images(images, gen.processor)
        kwargs = dict(pixel_values=torch.from_numpy(patches), image_grid_thw=torch.from_numpy(grids))
    ids = torch.tensor([gen.render(prompt, grids)])
    if images:
        kwargs["mm_token_type_ids"] = (ids == gen.cfg.tokens.image_token_id).int()
    greedy = plain_greedy_config(transformers, list(gen.cfg.tokens.eos_token_ids), gen.cfg.tokens.pad_token_id)
    # Replaced on the model as well as passed: transformers fills the fields of a passed config that equal the
    # library defaults from the model's own generation_config (repetition_penalty=1.0 would become 1.05).
    ref.generation_config = greedy
    with torch.no_grad():
        out = ref.generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=greedy, **kwargs)
    return out[0, ids.shape[1]:].tolist()


def verify_pack(pack_dir: Path, ckpt: Path, model, precision: str = "fp32") -> dict:
    pack = Pack.open(pack_dir)
    ort_gen = Generator.from_pack(pack, OrtBackend(pack, provider="cpu", cache_dir=None))
    torch_gen = Generator.from_pack(pack, TorchBackend(model))
    cases = {"text": ("Describe a red bicycle leaning on a wall.", []),
             "two_images": ("Which picture shows more circles?", verification_images())}
    report = {}
    for name, (prompt, images) in cases.items():
        got = ort_gen.generate(prompt, images, MAX_NEW_TOKENS).token_ids
        eager = torch_gen.generate(prompt, images, MAX_NEW_TOKENS).token_ids
        if got != eager:
            raise ExportValidationError(f"{pack_dir.name}: greedy tokens for the {name} prompt differ from the PyTorch "
                                        f"model's at position {_first_diff(got, eager)} ({got[:8]}... vs {eager[:8]}...)")
        ref = _transformers_greedy(ckpt, ort_gen, prompt, images)
        if ref is not None and got != ref:
            raise ExportValidationError(f"{pack_dir.name}: greedy tokens for the {name} prompt differ from "
                                        f"transformers' at position {_first_diff(got, ref)}")
        report[name] = {"tokens": len(got), "matches_torch": True, "matches_transformers": ref is not None}
    log.info("verified %s: %s", pack_dir, report)
    return report


def _first_diff(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
