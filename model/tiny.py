"""Write a tiny random Qwen2.5-VL checkpoint in Hugging Face format, optionally with a random Retrv-R1 ICM.

Tests build one per session in well under a second, and a user can check a device before the real checkpoint
arrives:

    python -m retrv.model.tiny OUT [--icm] [--seed N] [--preset tiny|mid]

The layout is what released checkpoints carry (transformers 4.x names, flat `config.json`), so the same directory
loads in transformers (the parity oracle) and in `retrv.model.load_checkpoint`.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from retrv.model.config import parse_hf_config
from retrv.model.loading import module_to_hf_name
from retrv.model.qwen import Qwen2_5_VL
from retrv.model.tiny_tokenizer import build_tiny_tokenizer, write_preprocessor_config, write_tokenizer_files
from retrv.runtime.errors import InputError
from retrv.runtime.outputs import check_output

# Presets by name (gpt-fast style). "tiny": the test model. "mid": tens of millions of parameters, for benchmarks
# where per-token cost should look like a real model's (weight bandwidth, not Python overhead).
PRESETS: dict[str, dict] = {
    "tiny": dict(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        mrope_section=[2, 3, 3],
        vision=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, fullatt_block_indexes=[1]),
        icm=dict(num_heads=4, num_layers=2),
    ),
    "mid": dict(
        hidden_size=512, intermediate_size=1536, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=2,
        mrope_section=[8, 12, 12],
        vision=dict(depth=4, hidden_size=256, intermediate_size=768, num_heads=4, fullatt_block_indexes=[3]),
        icm=dict(num_heads=8, num_layers=2),
    ),
}
# The released Qwen2.5-VL-3B/7B-Instruct config values (config.json of each); layers are chosen per use
# (`num_hidden_layers=`, `vision=dict(depth=...)`): a full-depth 7B is 16.6 GB of bf16.
_RELEASED_VISION = dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16,
                        fullatt_block_indexes=[7, 15, 23, 31])
PRESETS["3b"] = dict(hidden_size=2048, intermediate_size=11008, num_hidden_layers=36, num_attention_heads=16,
                     num_key_value_heads=2, mrope_section=[16, 24, 24], vision=_RELEASED_VISION,
                     icm=dict(num_heads=16, num_layers=2), vocab_size=151936, tie_word_embeddings=True)
PRESETS["7b"] = dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                     num_key_value_heads=4, mrope_section=[16, 24, 24], vision=_RELEASED_VISION,
                     icm=dict(num_heads=28, num_layers=2), vocab_size=152064, tie_word_embeddings=False)
# What the released Qwen2.5-VL-*-Instruct generation_config.json asks for (sampling that is nearly greedy, and a
# repetition penalty that is not): `--verify` must stay plain greedy whatever this says.
INSTRUCT_GENERATION = dict(do_sample=True, repetition_penalty=1.05, temperature=0.1, top_k=1, top_p=0.001)
VOCAB_SIZE = 512  # the tiny tokenizer's learned vocabulary plus Qwen2.5-VL's special tokens fit in this
# Small images keep tests fast; 112x112 px at the minimum still gives a 8x8 patch grid, 224x224 a 4-window one.
MIN_PIXELS = 28 * 28 * 4
MAX_PIXELS = 28 * 28 * 256


def tiny_config(preset: str = "tiny", *, icm: bool = False, **overrides) -> tuple[dict, dict | None, dict[str, int]]:
    """-> (config.json dict, retrv_config.json dict or None, special-token ids). `overrides` replace text fields
    (or `vision=dict(...)` vision fields) of the preset."""
    if preset not in PRESETS:
        raise ValueError(f"preset: got {preset!r}; expected one of {sorted(PRESETS)}")
    spec = {**PRESETS[preset], **{k: v for k, v in overrides.items() if k != "vision"}}
    vision = {**spec.pop("vision"), **overrides.get("vision", {})}
    icm_spec = spec.pop("icm")
    vocab = spec.pop("vocab_size", VOCAB_SIZE)
    _, ids = _tokenizer(vocab)
    mrope = spec.pop("mrope_section")
    config = {
        "architectures": ["Qwen2_5_VLForConditionalGeneration"],
        "model_type": "qwen2_5_vl",
        "vocab_size": vocab,
        "hidden_act": "silu",
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0,
        "rope_scaling": {"type": "mrope", "mrope_section": mrope},
        "tie_word_embeddings": False,
        "use_sliding_window": False,
        "torch_dtype": "float32",
        "bos_token_id": ids["<|endoftext|>"],
        "eos_token_id": ids["<|im_end|>"],
        "pad_token_id": ids["<|endoftext|>"],
        "image_token_id": ids["<|image_pad|>"],
        "video_token_id": ids["<|video_pad|>"],
        "vision_start_token_id": ids["<|vision_start|>"],
        "vision_end_token_id": ids["<|vision_end|>"],
        **spec,
        "vision_config": {
            "model_type": "qwen2_5_vl",
            "hidden_act": "silu",
            "in_chans": 3,
            "patch_size": 14,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "window_size": 112,
            "tokens_per_second": 2,
            "out_hidden_size": spec["hidden_size"],
            **vision,
        },
    }
    retrv = None
    if icm:
        retrv = {
            "format_version": 1,
            "icm": icm_spec,
            "special_tokens": {
                "inspection_start_token_id": ids["<inspection-index-start>"],
                "inspection_end_token_id": ids["<inspection-index-end>"],
            },
        }
    return config, retrv, ids


def _tokenizer(vocab_size: int):
    """The tiny tokenizer (ids < 512) or, for a real-size vocabulary, the one with the released ids."""
    from retrv.model.tiny_tokenizer import QWEN_LEARNED_VOCAB, build_real_ids_tokenizer

    return build_real_ids_tokenizer() if vocab_size > QWEN_LEARNED_VOCAB else build_tiny_tokenizer(VOCAB_SIZE)


def nested_config(flat: dict) -> dict:
    """The transformers 5.x `save_pretrained` layout of a flat (4.x) config: text fields in `text_config`,
    rope in `rope_parameters`; the ids and the vision config stay at the top."""
    top_keys = ("architectures", "model_type", "image_token_id", "video_token_id", "vision_start_token_id",
                "vision_end_token_id", "vision_config", "tie_word_embeddings", "torch_dtype", "retrv_random_weights")
    top = {k: v for k, v in flat.items() if k in top_keys}
    text = {k: v for k, v in flat.items() if k not in top_keys and k not in ("rope_scaling", "rope_theta")}
    text["model_type"] = "qwen2_5_vl_text"
    text["rope_parameters"] = {"rope_type": "default", "mrope_section": flat["rope_scaling"]["mrope_section"],
                               "rope_theta": flat["rope_theta"]}
    text["tie_word_embeddings"] = flat["tie_word_embeddings"]
    top["dtype"] = top.pop("torch_dtype", "float32")
    return {**top, "text_config": text}


def _save_shards(tensors: dict, out: Path, shards: int) -> None:
    """model.safetensors, or `shards` files model-0000i-of-0000n.safetensors with model.safetensors.index.json,
    as `save_pretrained` writes them (tensors kept whole, split by running size)."""
    from safetensors.torch import save_file

    if shards == 1:
        save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
        return
    names = sorted(tensors)
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    groups: list[list[str]] = [[] for _ in range(shards)]
    running = 0
    for n in names:
        groups[min(shards - 1, running * shards // max(total, 1))].append(n)
        running += tensors[n].numel() * tensors[n].element_size()
    weight_map = {}
    for i, group in enumerate(groups):
        fname = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        save_file({n: tensors[n] for n in group}, str(out / fname), metadata={"format": "pt"})
        weight_map.update({n: fname for n in group})
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def random_init_(model: torch.nn.Module, seed: int) -> None:
    """Deterministic random weights. Norm weights are 1 +- noise and biases nonzero, so a wrong norm or a dropped
    bias shows up in the parity tests instead of hiding behind ones and zeros."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if name.endswith("norm.weight") or ".norm" in name or name.endswith("ln_q.weight"):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))
            elif name.endswith("bias"):
                p.copy_(0.02 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)


def write_tiny_checkpoint(out: str | Path, *, icm: bool = False, seed: int = 0, preset: str = "tiny",
                          dtype: str = "float32", shards: int = 1, layout: str = "flat", generation: str = "greedy",
                          **overrides) -> Path:
    """`dtype` "bfloat16" as released; `shards` > 1 writes an index; `layout` "nested" is transformers 5's config
    and tensor names; `generation` "instruct" writes the released Instruct generation_config.json."""
    from safetensors.torch import save_file

    if dtype not in ("float32", "bfloat16") or layout not in ("flat", "nested") \
            or generation not in ("greedy", "instruct") or shards < 1:
        raise ValueError(f"dtype/layout/generation/shards: got {dtype!r}/{layout!r}/{generation!r}/{shards!r}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    config, retrv, ids = tiny_config(preset, icm=icm, **overrides)
    config["torch_dtype"] = dtype
    # Declares what the weights are: quantize's accuracy gate reports only on random weights (calibration.config).
    config["retrv_random_weights"] = True
    cfg = parse_hf_config(config, retrv)
    model = Qwen2_5_VL(cfg)
    random_init_(model, seed)
    model = model.to(getattr(torch, dtype))
    state = {n: t.contiguous() for n, t in model.state_dict().items()}
    base = {module_to_hf_name(n): t for n, t in state.items() if not n.startswith("icm.")}
    if cfg.text.tie_word_embeddings:  # a tied checkpoint stores the table once, as embed_tokens
        base.pop("lm_head.weight")
    if layout == "nested":  # transformers 5.x names (retrv.model.loading._PREFIXES)
        base = {("model.language_model." + n[len("model."):]) if n.startswith("model.")
                else ("model." + n) if n.startswith("visual.") else n: t for n, t in base.items()}
        config = nested_config(config)
    _save_shards(base, out, shards)
    if icm:
        save_file({n[len("icm."):]: t for n, t in state.items() if n.startswith("icm.")}, str(out / "icm.safetensors"))
        (out / "retrv_config.json").write_text(json.dumps(retrv, indent=2, sort_keys=True) + "\n")
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    (out / "generation_config.json").write_text(json.dumps({
        "bos_token_id": ids["<|endoftext|>"], "eos_token_id": [ids["<|im_end|>"], ids["<|endoftext|>"]],
        "pad_token_id": ids["<|endoftext|>"],
        **(INSTRUCT_GENERATION if generation == "instruct" else {"do_sample": False}),
    }, indent=2, sort_keys=True) + "\n")
    tokenizer, special = _tokenizer(cfg.text.vocab_size)
    write_tokenizer_files(out, tokenizer, special)
    write_preprocessor_config(out, min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m retrv.model.tiny", description=__doc__.splitlines()[0])
    ap.add_argument("out", help="directory to write the checkpoint into")
    ap.add_argument("--icm", action="store_true", help="add a random Retrv-R1 ICM (icm.safetensors, retrv_config.json)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    args = ap.parse_args(argv)
    try:  # the files are written into OUT: never into a folder that is something else
        check_output(args.out, "checkpoint")
    except InputError as e:
        print(f"{ap.prog}: error: {e}", file=sys.stderr)
        return 2
    path = write_tiny_checkpoint(args.out, icm=args.icm, seed=args.seed, preset=args.preset)
    n = sum(p.stat().st_size for p in path.glob("*.safetensors"))
    print(f"wrote {args.preset} checkpoint to {path} ({n / 1e6:.1f} MB of weights, seed {args.seed})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
