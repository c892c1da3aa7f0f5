"""Reading a Hugging Face Qwen2.5-VL checkpoint's `config.json` and `retrv_config.json` into the config layer's
dataclasses (`retrv.runtime.config`, re-exported here).

Two layouts of `config.json` exist in the wild and both are read:
- flat (transformers 4.x, what the released Qwen2.5-VL and V-Retrver checkpoints carry): text fields at the top
  level, `rope_scaling = {"type": "mrope", "mrope_section": [...]}`, `rope_theta` at the top level;
- nested (transformers 5.x `save_pretrained`): `text_config` with `rope_parameters`.

No torch here.
"""

from __future__ import annotations

import os
from dataclasses import fields, replace
from pathlib import Path
from typing import Any

from retrv.model.files import checkpoint_file, read_json
from retrv.runtime.config import (MAX_SIZE, SUPPORTED_MODEL_TYPES, ICMConfig, ModelConfig, TextConfig,  # noqa: F401
                                  TokenIds, VisionConfig, bad_value, require_field)
from retrv.runtime.errors import CheckpointError


def _known(cls, d: dict) -> dict:
    """The fields of `cls` in `d`; a null means "absent" (the dataclass default), as Hugging Face configs use it."""
    names = {f.name for f in fields(cls)}
    return {k: v for k, v in d.items() if k in names and v is not None}


def _object(name: str, value: Any, default: Any = None) -> dict:
    """A JSON object field that may be absent or null."""
    if value is None:
        return dict(default or {})
    if not isinstance(value, dict):
        raise bad_value(name, value, "a JSON object")
    return dict(value)


def _default(value: Any, default: Any) -> Any:
    return default if value is None else value


def _eos(name: str, value: Any) -> tuple:
    # transformers writes one id or a list of ids; the TokenIds check types each one.
    if value is None:
        return ()
    return tuple(value) if isinstance(value, (list, tuple)) else (value,)


def parse_hf_config(cfg: dict, retrv_cfg: dict | None = None, where: str = "config.json") -> ModelConfig:
    """Map a Hugging Face Qwen2.5-VL `config.json` (flat or nested) onto `ModelConfig`. Every field is type- and
    range-checked; a bad one is a one-line CheckpointError naming `where`, the field, the value and what was
    expected."""
    try:
        return _parse_hf_config(cfg, retrv_cfg, where)
    except CheckpointError as e:
        msg = str(e)
        raise CheckpointError(msg if msg.startswith(where) else f"{where}: {msg}") from None


def _parse_hf_config(cfg: Any, retrv_cfg: Any, where: str) -> ModelConfig:
    cfg = _object("config", cfg)
    model_type = cfg.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise CheckpointError(f"{where}: model_type {model_type!r} is not supported; expected one of {list(SUPPORTED_MODEL_TYPES)}")
    text = _object("text_config", cfg.get("text_config"))
    for key, value in cfg.items():  # flat layout: text fields live at the top level
        if key not in ("text_config", "vision_config"):
            text.setdefault(key, value)
    sliding = text.get("use_sliding_window")
    if sliding is True:
        raise CheckpointError(f"{where}: use_sliding_window=true is not supported; expected false (as every Qwen2.5-VL release)")
    if sliding is not None and sliding is not False:
        raise bad_value("use_sliding_window", sliding, "true or false")
    rope_key = "rope_parameters" if text.get("rope_parameters") is not None else "rope_scaling"
    rope = _object(rope_key, text.get(rope_key))
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if not isinstance(rope_type, str) or rope_type not in ("default", "mrope"):
        raise CheckpointError(f"{where}: rope type {rope_type!r} is not supported; expected 'mrope' or 'default'")
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"):
        require_field(text, key, where)
    text_fields = _known(TextConfig, text)
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"):
        text_fields.setdefault(key, None)  # present but null: refused by name in TextConfig
    theta = rope.get("rope_theta", text.get("rope_theta"))
    if theta is not None:
        text_fields["rope_theta"] = theta
    if rope.get("mrope_section") is not None:
        text_fields["mrope_section"] = rope["mrope_section"]
    text_fields.setdefault("num_key_value_heads", text_fields["num_attention_heads"])
    text_cfg = TextConfig(**text_fields)

    vision = require_field(cfg, "vision_config", where)
    if not isinstance(vision, dict):  # required: null is no vision tower
        raise bad_value("vision_config", vision, "a JSON object")
    vision = dict(vision)
    if "in_chans" in vision and "in_channels" not in vision:
        vision["in_channels"] = vision["in_chans"]
    for key in ("depth", "hidden_size", "intermediate_size", "num_heads", "out_hidden_size"):
        require_field(vision, key, f"{where} vision_config")
    vrope = _object("vision_config.rope_parameters", vision.get("rope_parameters"))
    if "rope_theta" in vrope:
        vision["rope_theta"] = vrope["rope_theta"]
    vision_fields = _known(VisionConfig, vision)
    for key in ("depth", "hidden_size", "intermediate_size", "num_heads", "out_hidden_size"):
        vision_fields.setdefault(key, None)
    vision_fields.setdefault("fullatt_block_indexes", ())
    vision_cfg = VisionConfig(**vision_fields)

    retrv_cfg = _object("retrv_config.json", retrv_cfg)
    special = _object("retrv_config.special_tokens", retrv_cfg.get("special_tokens"))
    tokens = TokenIds(
        image_token_id=require_field(cfg, "image_token_id", where),
        video_token_id=_default(cfg.get("video_token_id"), 151656),
        vision_start_token_id=require_field(cfg, "vision_start_token_id", where),
        vision_end_token_id=_default(cfg.get("vision_end_token_id"), 151653),
        eos_token_ids=_eos("eos_token_id", cfg.get("eos_token_id", text.get("eos_token_id"))),
        pad_token_id=text.get("pad_token_id"),
        inspection_start_token_id=special.get("inspection_start_token_id"),
        inspection_end_token_id=special.get("inspection_end_token_id"),
    )
    icm = None
    if retrv_cfg.get("icm") is not None:
        icm_fields = _object("retrv_config.icm", retrv_cfg["icm"])
        known = {f.name for f in fields(ICMConfig)}
        if unknown := sorted(set(icm_fields) - known):
            raise CheckpointError(f"retrv_config.icm: unknown fields {unknown}; expected {sorted(known)}")
        icm = ICMConfig(**{"hidden_size": text_cfg.hidden_size, **icm_fields})
    return ModelConfig(text=text_cfg, vision=vision_cfg, tokens=tokens, icm=icm, model_type=model_type)


# What a generation_config.json may ask of decoding. The Instruct releases ship do_sample=true, top_k=1,
# top_p=0.001, temperature=0.1 and repetition_penalty=1.05: recorded in the pack (what the checkpoint asked for),
# never applied by `--verify`, whose oracle is plain greedy (retrv.export.verify).
DECODING_FIELDS = ("do_sample", "num_beams", "temperature", "top_k", "top_p", "repetition_penalty",
                   "no_repeat_ngram_size", "length_penalty", "max_new_tokens", "max_length")


def read_generation_config(checkpoint_dir: str | Path) -> dict:
    """The decoding settings a checkpoint's generation_config.json asks for ({} without the file). Values are
    recorded as given (JSON scalars only); the file's token ids are read by `read_config`."""
    root = Path(checkpoint_dir)
    path = root / "generation_config.json"
    if not os.path.lexists(path):
        return {}
    data = read_json(checkpoint_file(root, path.name))
    out = {}
    for key in DECODING_FIELDS:
        value = data.get(key)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            if not (key == "do_sample" and isinstance(value, bool)):
                raise CheckpointError(f"{path}: {key} is {value!r}; expected a number"
                                      f"{' or true/false' if key == 'do_sample' else ''}")
        out[key] = value
    return out


def read_config(checkpoint_dir: str | Path) -> ModelConfig:
    """Read `config.json` (and `retrv_config.json` when present) from a checkpoint directory. Every file must lie
    inside the directory (`retrv.model.files.checkpoint_file`)."""
    root = Path(checkpoint_dir)
    if not root.is_dir():
        raise CheckpointError(f"{root}: not a directory; expected a Hugging Face checkpoint directory")
    config_path = checkpoint_file(root, "config.json")
    cfg = read_json(config_path)
    retrv_path = root / "retrv_config.json"
    retrv_cfg = read_json(checkpoint_file(root, retrv_path.name)) if os.path.lexists(retrv_path) else None
    parsed = parse_hf_config(cfg, retrv_cfg, where=str(config_path))
    gen_path = root / "generation_config.json"
    if os.path.lexists(gen_path):
        # transformers' generate stops on generation_config's eos ids (Instruct models list <|im_end|> and
        # <|endoftext|> there, config.json only one), so the runtime does too.
        eos = read_json(checkpoint_file(root, gen_path.name)).get("eos_token_id")
        if eos is not None:
            try:
                parsed = replace(parsed, tokens=replace(parsed.tokens, eos_token_ids=_eos("eos_token_id", eos)))
            except CheckpointError as e:
                raise CheckpointError(f"{gen_path}: {e}") from None
    return parsed


def source_record(checkpoint_dir: str | Path) -> dict:
    """What a pack's manifest records of its checkpoint besides the fingerprint: the decoding settings its
    generation_config.json asks for (the runtime and --verify decode greedily regardless) and whether its config
    declares random weights (then quality gates report and do not refuse)."""
    root = Path(checkpoint_dir)
    return {"checkpoint_generation_config": read_generation_config(root),
            "random_weights": bool(read_json(checkpoint_file(root, "config.json")).get("retrv_random_weights"))}
