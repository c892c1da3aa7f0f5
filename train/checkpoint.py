"""The trained model's shape, a fresh model of it, and saving it as a Hugging Face checkpoint the runtime loads.

The layout is `retrv.model.tiny`'s (flat transformers 4.x `config.json`, `model.safetensors` under transformers
names, `icm.safetensors`, `retrv_config.json`, tokenizer files, `preprocessor_config.json`,
`generation_config.json`), so `retrv.model.load_checkpoint` and `retrv export` read it like any checkpoint.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from retrv.model.config import parse_hf_config
from retrv.model.loading import module_to_hf_name
from retrv.model.qwen import Qwen2_5_VL
from retrv.model.tiny import tiny_config
from retrv.model.tiny_tokenizer import write_preprocessor_config, write_tokenizer_files

# 112x112 px (the synthetic images) is 12,544 px: at least MIN_PIXELS, so it stays 112 px, an 8x8 patch grid and
# 16 merged tokens. MAX_PIXELS caps any other image (a photograph) at that same area: the model never saw more
# than 16 tokens per image, and a 500 px photo would cost 20x the tokens to encode, cache and inspect.
MIN_PIXELS = 56 * 56
MAX_PIXELS = 112 * 112


@dataclass(frozen=True)
class ModelSize:
    """Sizes of the LM, the vision tower and the ICM. Defaults: the shipped model (see CARD.md for why)."""

    hidden_size: int = 128
    intermediate_size: int = 384
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    mrope_section: tuple[int, int, int] = (4, 6, 6)  # head_dim 32 -> 16 rotary frequencies, Qwen's 1:1.5:1.5 split
    vision_depth: int = 2
    vision_hidden_size: int = 64
    vision_intermediate_size: int = 128
    vision_num_heads: int = 2
    icm_num_heads: int = 4
    icm_num_layers: int = 2  # the paper's "two-layer attention"

    def to_dict(self) -> dict:
        return {**asdict(self), "mrope_section": list(self.mrope_section)}


def hf_configs(size: ModelSize, ids: dict[str, int], vocab_size: int) -> tuple[dict, dict]:
    """-> (config.json, retrv_config.json) for `size` with the token ids of our tokenizer."""
    config, retrv, _ = tiny_config(
        "tiny", icm=True, hidden_size=size.hidden_size, intermediate_size=size.intermediate_size,
        num_hidden_layers=size.num_hidden_layers, num_attention_heads=size.num_attention_heads,
        num_key_value_heads=size.num_key_value_heads, mrope_section=list(size.mrope_section),
        vision=dict(depth=size.vision_depth, hidden_size=size.vision_hidden_size,
                    intermediate_size=size.vision_intermediate_size, num_heads=size.vision_num_heads,
                    fullatt_block_indexes=[size.vision_depth - 1]),
    )
    config.update(vocab_size=vocab_size, bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"],
                  pad_token_id=ids["<|endoftext|>"], image_token_id=ids["<|image_pad|>"],
                  video_token_id=ids["<|video_pad|>"], vision_start_token_id=ids["<|vision_start|>"],
                  vision_end_token_id=ids["<|vision_end|>"])
    retrv["icm"] = {"num_heads": size.icm_num_heads, "num_layers": size.icm_num_layers}
    retrv["special_tokens"] = {"inspection_start_token_id": ids["<inspection-index-start>"],
                               "inspection_end_token_id": ids["<inspection-index-end>"]}
    return config, retrv


# Residual branches' output projections start at zero, so every block starts as the identity (SkipInit / "zero
# init" of the residual branch): the vision tower then starts as patch embedding + merger and learned colours,
# shapes and positions several times faster on the synthetic images than with N(0, 0.02) everywhere.
ZERO_INIT = ("o_proj.weight", "down_proj.weight", "attn.proj.weight")


def init_weights_(model: Qwen2_5_VL, seed: int) -> None:
    """Initialisation for training from scratch: N(0, 0.02), residual output projections zero, norms 1, biases 0."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if name.endswith("bias"):
                p.zero_()
            elif "norm" in name or name.endswith("ln_q.weight"):
                p.fill_(1.0)
            elif name.endswith(ZERO_INIT):
                p.zero_()
            else:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.02)


def new_model(size: ModelSize, ids: dict[str, int], vocab_size: int, seed: int) -> Qwen2_5_VL:
    config, retrv = hf_configs(size, ids, vocab_size)
    model = Qwen2_5_VL(parse_hf_config(config, retrv))
    init_weights_(model, seed)
    return model


@dataclass
class SavedCheckpoint:
    path: Path
    files: dict[str, int] = field(default_factory=dict)  # name -> bytes


def save_checkpoint(model: Qwen2_5_VL, tokenizer, ids: dict[str, int], size: ModelSize, out: str | Path,
                    extra: dict | None = None) -> SavedCheckpoint:
    """Write `model` as a Hugging Face checkpoint directory; `extra` goes to training.json (how it was made)."""
    from safetensors.torch import save_file

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    config, retrv = hf_configs(size, ids, model.cfg.text.vocab_size)
    state = {n: t.detach().contiguous() for n, t in model.state_dict().items()}
    save_file({module_to_hf_name(n): t for n, t in state.items() if not n.startswith("icm.")},
              str(out / "model.safetensors"), metadata={"format": "pt"})
    save_file({n[len("icm."):]: t for n, t in state.items() if n.startswith("icm.")}, str(out / "icm.safetensors"),
              metadata={"format": "pt"})
    dump = lambda name, obj: (out / name).write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")  # noqa: E731
    dump("config.json", config)
    dump("retrv_config.json", retrv)
    dump("generation_config.json", {"bos_token_id": config["bos_token_id"], "do_sample": False,
                                    "eos_token_id": [ids["<|im_end|>"], ids["<|endoftext|>"]],
                                    "pad_token_id": config["pad_token_id"]})
    write_tokenizer_files(out, tokenizer, ids)
    write_preprocessor_config(out, min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS)
    if extra is not None:
        dump("training.json", extra)
    return SavedCheckpoint(out, {p.name: p.stat().st_size for p in sorted(out.iterdir()) if p.is_file()})
