"""Frozen configuration dataclasses read from a checkpoint's `config.json` and `retrv_config.json`.

Two layouts of `config.json` exist in the wild and both are read:
- flat (transformers 4.x, what the released Qwen2.5-VL and V-Retrver checkpoints carry): text fields at the top
  level, `rope_scaling = {"type": "mrope", "mrope_section": [...]}`, `rope_theta` at the top level;
- nested (transformers 5.x `save_pretrained`): `text_config` with `rope_parameters`.

No torch here: the runtime reads the same dataclasses from a pack's manifest.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

from retrv.runtime.errors import CheckpointError

SUPPORTED_MODEL_TYPES = ("qwen2_5_vl",)


def _require(cfg: dict, key: str, where: str) -> Any:
    if key not in cfg:
        raise CheckpointError(f"{where}: missing field '{key}'")
    return cfg[key]


@dataclass(frozen=True)
class VisionConfig:
    depth: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    out_hidden_size: int
    fullatt_block_indexes: tuple[int, ...]
    in_channels: int = 3
    patch_size: int = 14
    spatial_merge_size: int = 2
    temporal_patch_size: int = 2
    window_size: int = 112
    hidden_act: str = "silu"
    tokens_per_second: int = 4
    rope_theta: float = 10000.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "fullatt_block_indexes", tuple(int(i) for i in self.fullatt_block_indexes))
        if self.hidden_size % self.num_heads:
            raise CheckpointError(
                f"vision_config.hidden_size: got {self.hidden_size}; expected a multiple of num_heads={self.num_heads}"
            )
        if (self.hidden_size // self.num_heads) % 4:
            # The 2D rotary splits the head in two axes and each axis rotates pairs.
            raise CheckpointError(
                f"vision head_dim: got {self.hidden_size // self.num_heads}; expected a multiple of 4"
            )
        if self.window_size % (self.spatial_merge_size * self.patch_size):
            raise CheckpointError(
                f"vision_config.window_size: got {self.window_size}; expected a multiple of "
                f"spatial_merge_size*patch_size={self.spatial_merge_size * self.patch_size}"
            )
        bad = [i for i in self.fullatt_block_indexes if not 0 <= i < self.depth]
        if bad:
            raise CheckpointError(f"vision_config.fullatt_block_indexes: got {bad}; expected indexes in [0, {self.depth})")
        if self.hidden_act != "silu":
            raise CheckpointError(f"vision_config.hidden_act: got {self.hidden_act!r}; expected 'silu'")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def patch_dim(self) -> int:
        """Length of one flattened patch as the image processor emits it: C * T * P * P."""
        return self.in_channels * self.temporal_patch_size * self.patch_size * self.patch_size

    @property
    def merge_unit(self) -> int:
        return self.spatial_merge_size**2

    @property
    def merger_window(self) -> int:
        """Window side in merged tokens (112 px / 2 / 14 = 4 for Qwen2.5-VL)."""
        return self.window_size // self.spatial_merge_size // self.patch_size


@dataclass(frozen=True)
class TextConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1000000.0
    mrope_section: tuple[int, ...] = (16, 24, 24)
    hidden_act: str = "silu"
    max_position_embeddings: int = 32768
    tie_word_embeddings: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "mrope_section", tuple(int(s) for s in self.mrope_section))
        if self.hidden_size % self.num_attention_heads:
            raise CheckpointError(
                f"text_config.hidden_size: got {self.hidden_size}; expected a multiple of "
                f"num_attention_heads={self.num_attention_heads}"
            )
        if self.num_attention_heads % self.num_key_value_heads:
            raise CheckpointError(
                f"text_config.num_key_value_heads: got {self.num_key_value_heads}; expected a divisor of "
                f"num_attention_heads={self.num_attention_heads}"
            )
        if len(self.mrope_section) != 3 or 2 * sum(self.mrope_section) != self.head_dim:
            raise CheckpointError(
                f"mrope_section: got {list(self.mrope_section)}; expected 3 sections summing to head_dim/2="
                f"{self.head_dim // 2}"
            )
        if self.hidden_act != "silu":
            raise CheckpointError(f"text_config.hidden_act: got {self.hidden_act!r}; expected 'silu'")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def num_kv_groups(self) -> int:
        return self.num_attention_heads // self.num_key_value_heads


@dataclass(frozen=True)
class ICMConfig:
    """Retrv-R1's Information Compression Module (PAPERS.md): two tokens per candidate.

    ATT1 pools the candidate tokens into `t_con` with a learned query; ATT2 lets every candidate token attend over
    the query tokens, and ATT1' pools that into `t_rel` with a second learned query. Each attention is a small
    pre-norm multi-head block of `num_layers` layers (the notes call them "two-layer attention").
    """

    hidden_size: int
    num_heads: int = 8
    num_layers: int = 2
    rms_norm_eps: float = 1e-6

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_heads:
            raise CheckpointError(
                f"retrv_config.icm.num_heads: got {self.num_heads}; expected a divisor of hidden_size={self.hidden_size}"
            )
        if self.num_layers < 1:
            raise CheckpointError(f"retrv_config.icm.num_layers: got {self.num_layers}; expected >= 1")


@dataclass(frozen=True)
class TokenIds:
    """Special-token ids the model and runtime depend on."""

    image_token_id: int
    video_token_id: int
    vision_start_token_id: int
    vision_end_token_id: int
    eos_token_ids: tuple[int, ...] = ()
    pad_token_id: int | None = None
    inspection_start_token_id: int | None = None
    inspection_end_token_id: int | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "eos_token_ids", tuple(int(i) for i in self.eos_token_ids))


@dataclass(frozen=True)
class ModelConfig:
    text: TextConfig
    vision: VisionConfig
    tokens: TokenIds
    icm: ICMConfig | None = None
    model_type: str = "qwen2_5_vl"

    def __post_init__(self) -> None:
        if self.vision.out_hidden_size != self.text.hidden_size:
            raise CheckpointError(
                f"vision_config.out_hidden_size: got {self.vision.out_hidden_size}; expected the text hidden_size "
                f"{self.text.hidden_size}"
            )
        if self.icm is not None and self.icm.hidden_size != self.text.hidden_size:
            raise CheckpointError(
                f"retrv_config.icm.hidden_size: got {self.icm.hidden_size}; expected {self.text.hidden_size}"
            )
        vocab = self.text.vocab_size
        for name in ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id",
                     "inspection_start_token_id", "inspection_end_token_id"):
            value = getattr(self.tokens, name)
            if value is not None and not 0 <= value < vocab:
                raise CheckpointError(f"{name}: got {value}; expected an id in [0, {vocab})")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        """Inverse of `to_dict` (the pack manifest stores this form)."""
        return cls(
            text=TextConfig(**d["text"]),
            vision=VisionConfig(**d["vision"]),
            tokens=TokenIds(**d["tokens"]),
            icm=ICMConfig(**d["icm"]) if d.get("icm") else None,
            model_type=d.get("model_type", "qwen2_5_vl"),
        )


def _known(cls, d: dict) -> dict:
    names = {f.name for f in fields(cls)}
    return {k: v for k, v in d.items() if k in names}


def parse_hf_config(cfg: dict, retrv_cfg: dict | None = None, where: str = "config.json") -> ModelConfig:
    """Map a Hugging Face Qwen2.5-VL `config.json` (flat or nested) onto `ModelConfig`."""
    model_type = cfg.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise CheckpointError(f"{where}: model_type {model_type!r} is not supported; expected one of {list(SUPPORTED_MODEL_TYPES)}")
    text = dict(cfg.get("text_config") or {})
    for key, value in cfg.items():  # flat layout: text fields live at the top level
        if key not in ("text_config", "vision_config"):
            text.setdefault(key, value)
    if text.get("use_sliding_window"):
        raise CheckpointError(f"{where}: use_sliding_window=true is not supported; expected false (as every Qwen2.5-VL release)")
    rope = text.get("rope_parameters") or text.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in ("default", "mrope"):
        raise CheckpointError(f"{where}: rope type {rope_type!r} is not supported; expected 'mrope' or 'default'")
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"):
        _require(text, key, where)
    text_fields = _known(TextConfig, text)
    text_fields["rope_theta"] = float(rope.get("rope_theta", text.get("rope_theta", 1000000.0)))
    if "mrope_section" in rope:
        text_fields["mrope_section"] = tuple(rope["mrope_section"])
    if text_fields.get("num_key_value_heads") is None:
        text_fields["num_key_value_heads"] = text_fields["num_attention_heads"]
    text_cfg = TextConfig(**text_fields)

    vision = dict(_require(cfg, "vision_config", where))
    if "in_chans" in vision and "in_channels" not in vision:
        vision["in_channels"] = vision["in_chans"]
    for key in ("depth", "hidden_size", "intermediate_size", "num_heads", "out_hidden_size"):
        _require(vision, key, f"{where} vision_config")
    vision.setdefault("fullatt_block_indexes", ())
    vrope = vision.get("rope_parameters") or {}
    if "rope_theta" in vrope:
        vision["rope_theta"] = vrope["rope_theta"]
    vision_cfg = VisionConfig(**_known(VisionConfig, vision))

    eos = cfg.get("eos_token_id", text.get("eos_token_id"))
    eos_ids = tuple(eos) if isinstance(eos, (list, tuple)) else (() if eos is None else (eos,))
    retrv_cfg = retrv_cfg or {}
    special = retrv_cfg.get("special_tokens", {})
    tokens = TokenIds(
        image_token_id=int(_require(cfg, "image_token_id", where)),
        video_token_id=int(cfg.get("video_token_id", 151656)),
        vision_start_token_id=int(_require(cfg, "vision_start_token_id", where)),
        vision_end_token_id=int(cfg.get("vision_end_token_id", 151653)),
        eos_token_ids=eos_ids,
        pad_token_id=text.get("pad_token_id"),
        inspection_start_token_id=special.get("inspection_start_token_id"),
        inspection_end_token_id=special.get("inspection_end_token_id"),
    )
    icm = None
    if retrv_cfg.get("icm"):
        icm = ICMConfig(**{"hidden_size": text_cfg.hidden_size, **retrv_cfg["icm"]})
    return ModelConfig(text=text_cfg, vision=vision_cfg, tokens=tokens, icm=icm, model_type=model_type)


def _read_json(path: Path) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: file not found") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: got a JSON {type(data).__name__}; expected an object")
    return data


def read_config(checkpoint_dir: str | Path) -> ModelConfig:
    """Read `config.json` (and `retrv_config.json` when present) from a checkpoint directory."""
    root = Path(checkpoint_dir)
    if not root.is_dir():
        raise CheckpointError(f"{root}: not a directory; expected a Hugging Face checkpoint directory")
    cfg = _read_json(root / "config.json")
    retrv_path = root / "retrv_config.json"
    retrv_cfg = _read_json(retrv_path) if retrv_path.exists() else None
    parsed = parse_hf_config(cfg, retrv_cfg, where=str(root / "config.json"))
    gen_path = root / "generation_config.json"
    if gen_path.exists():
        # transformers' generate stops on generation_config's eos ids (Instruct models list <|im_end|> and
        # <|endoftext|> there, config.json only one), so the runtime does too.
        eos = _read_json(gen_path).get("eos_token_id")
        if eos is not None:
            eos_ids = tuple(eos) if isinstance(eos, (list, tuple)) else (eos,)
            parsed = replace(parsed, tokens=replace(parsed.tokens, eos_token_ids=eos_ids))
    return parsed
