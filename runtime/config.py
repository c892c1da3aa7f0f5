"""The config layer: frozen, validated dataclasses that describe a model (text decoder, vision tower, ICM, special
token ids). The bottom of the stack: numpy-free, torch-free; a pack's manifest stores `ModelConfig.to_dict()` and
the runtime reads it back with `ModelConfig.from_dict`. Reading a Hugging Face checkpoint's `config.json` into these
(`parse_hf_config`, `read_config`) is checkpoint work and lives in `retrv.model.config`.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import MISSING, asdict, dataclass, fields
from typing import Any

from retrv.runtime.errors import CheckpointError

SUPPORTED_MODEL_TYPES = ("qwen2_5_vl",)
# Upper bound on every size and token id: 16x the largest dimension of any released model (vocabularies of
# ~256k), and small enough that the product of two sizes stays far inside int64 when arrays are allocated.
MAX_SIZE = 1 << 24


def require_field(cfg: dict, key: str, where: str) -> Any:
    if key not in cfg:
        raise CheckpointError(f"{where}: missing field '{key}'")
    return cfg[key]


def bad_value(name: str, value: Any, expected: str) -> CheckpointError:
    text = repr(value)
    text = text if len(text) <= 60 else text[:57] + "..."  # a hostile value can be megabytes long
    return CheckpointError(f"{name}: got {text} ({type(value).__name__}); expected {expected}")


def _int(name: str, value: Any, lo: int = 1, hi: int = MAX_SIZE) -> int:
    # bool is an int subclass: `"num_hidden_layers": true` is a typo, not a 1. A string "64" is not 64 either.
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or not lo <= value <= hi:
        raise bad_value(name, value, f"an integer in [{lo}, {hi}]")
    return int(value)


def _opt_int(name: str, value: Any, lo: int = 0, hi: int = MAX_SIZE) -> int | None:
    return None if value is None else _int(name, value, lo, hi)


def _float(name: str, value: Any) -> float:
    """A finite float > 0 (every float field here is a scale: epsilon, rope base); a JSON integer is accepted."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise bad_value(name, value, "a number > 0")
    try:
        out = float(value)
    except OverflowError:
        out = math.inf
    if not math.isfinite(out) or out <= 0:
        raise bad_value(name, value, "a finite number > 0")
    return out


def _ints(name: str, value: Any, lo: int, hi: int = MAX_SIZE) -> tuple[int, ...]:
    if not isinstance(value, (list, tuple)):
        raise bad_value(name, value, f"a list of integers in [{lo}, {hi}]")
    return tuple(_int(f"{name}[{i}]", v, lo, hi) for i, v in enumerate(value))


def _str(name: str, value: Any) -> str:
    if not isinstance(value, str):
        raise bad_value(name, value, "a string")
    return value


def _set(obj: Any, name: str, value: Any) -> None:
    object.__setattr__(obj, name, value)


def _from_section(cls, d: Any, where: str):
    """`cls(**d)` for a section of a manifest's model config, refusing unknown and missing fields by name."""
    if not isinstance(d, dict):
        raise bad_value(where, d, "a JSON object")
    names = {f.name for f in fields(cls)}
    required = {f.name for f in fields(cls) if f.default is MISSING and f.default_factory is MISSING}
    unknown, missing = sorted(set(d) - names, key=str), sorted(required - set(d))
    if unknown or missing:
        problem = f"unknown fields {unknown}" if unknown else f"missing fields {missing}"
        raise CheckpointError(f"{where}: {problem}; expected {sorted(names)}")
    return cls(**d)


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
        for name in ("depth", "hidden_size", "intermediate_size", "num_heads", "out_hidden_size", "in_channels",
                     "patch_size", "spatial_merge_size", "temporal_patch_size", "window_size", "tokens_per_second"):
            _set(self, name, _int(f"vision_config.{name}", getattr(self, name)))
        _set(self, "fullatt_block_indexes",
             _ints("vision_config.fullatt_block_indexes", self.fullatt_block_indexes, 0, self.depth - 1))
        _set(self, "hidden_act", _str("vision_config.hidden_act", self.hidden_act))
        _set(self, "rope_theta", _float("vision_config.rope_theta", self.rope_theta))
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
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                     "num_key_value_heads", "max_position_embeddings"):
            _set(self, name, _int(f"text_config.{name}", getattr(self, name)))
        for name in ("rms_norm_eps", "rope_theta"):
            _set(self, name, _float(f"text_config.{name}", getattr(self, name)))
        _set(self, "mrope_section", _ints("text_config.mrope_section", self.mrope_section, 0))
        _set(self, "hidden_act", _str("text_config.hidden_act", self.hidden_act))
        if not isinstance(self.tie_word_embeddings, bool):
            raise bad_value("text_config.tie_word_embeddings", self.tie_word_embeddings, "true or false")
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
        for name in ("hidden_size", "num_heads", "num_layers"):
            _set(self, name, _int(f"retrv_config.icm.{name}", getattr(self, name)))
        _set(self, "rms_norm_eps", _float("retrv_config.icm.rms_norm_eps", self.rms_norm_eps))
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
        for name in ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id"):
            _set(self, name, _int(name, getattr(self, name), 0))
        for name in ("pad_token_id", "inspection_start_token_id", "inspection_end_token_id"):
            _set(self, name, _opt_int(name, getattr(self, name)))
        _set(self, "eos_token_ids", _ints("eos_token_id", self.eos_token_ids, 0))


@dataclass(frozen=True)
class ModelConfig:
    text: TextConfig
    vision: VisionConfig
    tokens: TokenIds
    icm: ICMConfig | None = None
    model_type: str = "qwen2_5_vl"

    def __post_init__(self) -> None:
        for name, cls in (("text", TextConfig), ("vision", VisionConfig), ("tokens", TokenIds), ("icm", ICMConfig)):
            value = getattr(self, name)
            if not isinstance(value, cls) and not (name == "icm" and value is None):
                raise bad_value(name, value, f"a {cls.__name__}")
        if self.model_type not in SUPPORTED_MODEL_TYPES:
            raise bad_value("model_type", self.model_type, f"one of {list(SUPPORTED_MODEL_TYPES)}")
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
        ids = [(name, getattr(self.tokens, name)) for name in (
            "image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id",
            "inspection_start_token_id", "inspection_end_token_id")]
        for name, value in ids + [("eos_token_id", i) for i in self.tokens.eos_token_ids]:
            if value is not None and not 0 <= value < vocab:
                raise CheckpointError(f"{name}: got {value}; expected an id in [0, {vocab})")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Any) -> "ModelConfig":
        """Inverse of `to_dict` (the pack manifest stores this form); every field is checked by name."""
        if not isinstance(d, dict):
            raise bad_value("model config", d, "a JSON object")
        known = {"text", "vision", "tokens", "icm", "model_type"}
        unknown, missing = sorted(set(d) - known, key=str), sorted({"text", "vision", "tokens"} - set(d))
        if unknown or missing:
            problem = f"unknown fields {unknown}" if unknown else f"missing fields {missing}"
            raise CheckpointError(f"model config: {problem}; expected {sorted(known)}")
        return cls(
            text=_from_section(TextConfig, d["text"], "text"),
            vision=_from_section(VisionConfig, d["vision"], "vision"),
            tokens=_from_section(TokenIds, d["tokens"], "tokens"),
            icm=None if d.get("icm") is None else _from_section(ICMConfig, d["icm"], "icm"),
            model_type=d.get("model_type", "qwen2_5_vl"),
        )
