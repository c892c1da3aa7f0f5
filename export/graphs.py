"""The sub-models a pack carries: thin wrappers over `retrv.model` with a declarative I/O spec each.

A spec names every input and output with its dtype and shape; strings in a shape are dynamic axes. The exporter
turns specs into dynamic axes, the validator into feeds, the runtime into checks, so the three cannot drift.
Dummy inputs use batch 2 and distinct axis lengths so no axis is frozen to a constant during tracing.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from retrv.model.config import ModelConfig
from retrv.model.qwen import Qwen2_5_VL
from retrv.model.vision import vision_inputs


@dataclass(frozen=True)
class TensorSpec:
    dtype: str  # numpy dtype name
    shape: tuple  # ints are fixed, strings are dynamic axes

    def to_dict(self) -> dict:
        return {"dtype": self.dtype, "shape": list(self.shape)}


@dataclass(frozen=True)
class GraphSpec:
    role: str  # also the file stem: <role>.onnx
    inputs: dict[str, TensorSpec]
    outputs: dict[str, TensorSpec]

    @property
    def filename(self) -> str:
        return f"{self.role}.onnx"

    def renamed(self, role: str) -> "GraphSpec":
        return GraphSpec(role, self.inputs, self.outputs)

    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        axes = {}
        for name, spec in {**self.inputs, **self.outputs}.items():
            dyn = {i: d for i, d in enumerate(spec.shape) if isinstance(d, str)}
            if dyn:
                axes[name] = dyn
        return axes


def kv_names(num_layers: int, kind: str) -> list[str]:
    """past_key_0, past_value_0, past_key_1, ... (kind = "past" | "present")."""
    return [f"{kind}_{t}_{i}" for i in range(num_layers) for t in ("key", "value")]


# ---------------------------------------------------------------------------------------------------------- specs
def vision_spec(cfg: ModelConfig, fdt: str = "float32") -> GraphSpec:
    v = cfg.vision
    return GraphSpec(
        "vision",
        inputs={
            "patches": TensorSpec(fdt, ("patches", v.patch_dim)),
            "position_ids": TensorSpec("int64", ("patches", 2)),
            "window_index": TensorSpec("int64", ("tokens",)),
            "reverse_index": TensorSpec("int64", ("tokens",)),
            "window_segments": TensorSpec("int64", ("patches",)),
            "image_segments": TensorSpec("int64", ("patches",)),
        },
        outputs={"image_tokens": TensorSpec(fdt, ("tokens", cfg.text.hidden_size))},
    )


def decoder_spec(cfg: ModelConfig, fdt: str = "float32") -> GraphSpec:
    t = cfg.text
    kv_in = TensorSpec(fdt, ("batch", t.num_key_value_heads, "past", t.head_dim))
    kv_out = TensorSpec(fdt, ("batch", t.num_key_value_heads, "total", t.head_dim))
    return GraphSpec(
        "decoder",
        inputs={
            "inputs_embeds": TensorSpec(fdt, ("batch", "seq", t.hidden_size)),
            "position_ids": TensorSpec("int64", (3, "batch", "seq")),
            "attention_mask": TensorSpec("int64", ("batch", "total")),
            **{n: kv_in for n in kv_names(t.num_hidden_layers, "past")},
        },
        outputs={
            "logits": TensorSpec("float32", ("batch", t.vocab_size)),
            "embedding": TensorSpec("float32", ("batch", t.hidden_size)),
            **{n: kv_out for n in kv_names(t.num_hidden_layers, "present")},
        },
    )


def embedder_spec(cfg: ModelConfig, fdt: str = "float32") -> GraphSpec:
    h = cfg.text.hidden_size
    return GraphSpec(
        "embedder",
        inputs={
            "inputs_embeds": TensorSpec(fdt, ("batch", "seq", h)),
            "position_ids": TensorSpec("int64", (3, "batch", "seq")),
            "attention_mask": TensorSpec("int64", ("batch", "seq")),
        },
        outputs={"embedding": TensorSpec("float32", ("batch", h))},
    )


def icm_content_spec(cfg: ModelConfig, fdt: str = "float32") -> GraphSpec:
    h = cfg.text.hidden_size
    return GraphSpec(
        "icm_content",
        inputs={
            "cand_tokens": TensorSpec(fdt, ("cands", "cand_len", h)),
            "cand_mask": TensorSpec("int64", ("cands", "cand_len")),
        },
        outputs={"t_con": TensorSpec(fdt, ("cands", h))},
    )


def icm_relation_spec(cfg: ModelConfig, fdt: str = "float32") -> GraphSpec:
    h = cfg.text.hidden_size
    return GraphSpec(
        "icm_relation",
        inputs={
            "cand_tokens": TensorSpec(fdt, ("cands", "cand_len", h)),
            "cand_mask": TensorSpec("int64", ("cands", "cand_len")),
            "query_tokens": TensorSpec(fdt, ("query_len", h)),
            "query_mask": TensorSpec("int64", ("query_len",)),
        },
        outputs={"t_rel": TensorSpec(fdt, ("cands", h))},
    )


# -------------------------------------------------------------------------------------------------------- modules
class VisionGraph(nn.Module):
    def __init__(self, model: Qwen2_5_VL) -> None:
        super().__init__()
        self.visual = model.visual

    def forward(self, patches, position_ids, window_index, reverse_index, window_segments, image_segments):
        return self.visual(patches, position_ids, window_index, reverse_index, window_segments, image_segments)


def pooled_embedding(hidden: torch.Tensor) -> torch.Tensor:
    """LamRA-style embedding: the final-norm hidden state of the last position, L2-normalised, fp32. Left padding
    puts every row's last real token at the last position."""
    last = hidden[:, -1].float()  # (B, H)
    return last / last.norm(dim=-1, keepdim=True).clamp_min(1e-12)


class DecoderGraph(nn.Module):
    """Prefill, extension and decode in one graph: logits of the last position only (a 3,000-token prefill would
    otherwise materialise 3,000 x vocab floats nobody reads), the pooled embedding of the last position (so the
    default coarse-stage embedder needs no second copy of the backbone), and the extended KV cache."""

    def __init__(self, model: Qwen2_5_VL) -> None:
        super().__init__()
        self.language_model, self.lm_head = model.language_model, model.lm_head

    def forward(self, inputs_embeds, position_ids, attention_mask, *past):
        hidden, keys, values = self.language_model(
            inputs_embeds, position_ids, attention_mask, list(past[0::2]), list(past[1::2])
        )
        logits = self.lm_head(hidden[:, -1]).float()  # (B, V); fp32 whatever the weights
        presents = [t for kv in zip(keys, values) for t in kv]
        return (logits, pooled_embedding(hidden), *presents)


class EmbedderGraph(nn.Module):
    """A stand-alone embedder graph (no cache I/O): for a separate embedder checkpoint (`--embedder`). The default
    embedder is the decoder graph's `embedding` output."""

    def __init__(self, model: Qwen2_5_VL) -> None:
        super().__init__()
        self.language_model = model.language_model
        self.layers = model.cfg.text.num_hidden_layers

    def forward(self, inputs_embeds, position_ids, attention_mask):
        b = inputs_embeds.shape[0]
        cfg = self.language_model.cfg
        empty = inputs_embeds.new_zeros(b, cfg.num_key_value_heads, 0, cfg.head_dim)
        hidden, _, _ = self.language_model(
            inputs_embeds, position_ids, attention_mask, [empty] * self.layers, [empty] * self.layers
        )
        return pooled_embedding(hidden)


class IcmContentGraph(nn.Module):
    def __init__(self, model: Qwen2_5_VL) -> None:
        super().__init__()
        self.icm = model.icm

    def forward(self, cand_tokens, cand_mask):
        return self.icm.content(cand_tokens, cand_mask)


class IcmRelationGraph(nn.Module):
    """The exported relation step: the query side computed once and broadcast over the K candidates
    (`ICM.relation_shared`). Same inputs and outputs as before, so packs exported earlier keep working as they are;
    validated against `IcmRelationReference`."""

    def __init__(self, model: Qwen2_5_VL) -> None:
        super().__init__()
        self.icm = model.icm

    def forward(self, cand_tokens, cand_mask, query_tokens, query_mask):
        return self.icm.relation_shared(cand_tokens, cand_mask, query_tokens, query_mask)


class IcmRelationReference(IcmRelationGraph):
    """The oracle: `ICM.relation` as the paper writes it (the query expanded over the K candidates)."""

    def forward(self, cand_tokens, cand_mask, query_tokens, query_mask):
        return self.icm.relation(cand_tokens, cand_mask, query_tokens, query_mask)


@dataclass(frozen=True)
class SubModel:
    spec: GraphSpec
    module: nn.Module


FLOAT_NAMES = {torch.float32: "float32", torch.float16: "float16"}


def sub_models(model: Qwen2_5_VL, reference: bool = False) -> list[SubModel]:
    """The pack's graphs for `model`; float inputs/outputs take the model's dtype (fp32 or fp16), except the
    decoder's logits and the embedding, which stay fp32 (argmax ties and cosine scores need the precision).
    `reference`: the oracles the exported graphs are validated against (`IcmRelationReference`)."""
    cfg = model.cfg
    fdt = FLOAT_NAMES[model.dtype]
    subs = [
        SubModel(vision_spec(cfg, fdt), VisionGraph(model)),
        SubModel(decoder_spec(cfg, fdt), DecoderGraph(model)),
    ]
    if model.icm is not None:
        subs += [
            SubModel(icm_content_spec(cfg, fdt), IcmContentGraph(model)),
            SubModel(icm_relation_spec(cfg, fdt), (IcmRelationReference if reference else IcmRelationGraph)(model)),
        ]
    return subs


def embedder_sub_models(model: Qwen2_5_VL) -> list[SubModel]:
    """A separate embedder checkpoint's graphs: its own vision tower and a cache-free pooled-embedding graph."""
    cfg, fdt = model.cfg, FLOAT_NAMES[model.dtype]
    return [
        SubModel(vision_spec(cfg, fdt).renamed("embedder_vision"), VisionGraph(model)),
        SubModel(embedder_spec(cfg, fdt), EmbedderGraph(model)),
    ]


def cast_feeds(spec: GraphSpec, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Float arrays converted to the dtype the graph declares (an fp16 graph takes fp16 embeddings)."""
    return {k: (v.astype(spec.inputs[k].dtype) if v.dtype.kind == "f" and k in spec.inputs else v)
            for k, v in feeds.items()}


# --------------------------------------------------------------------------------------------------- dummy inputs
def sample_inputs(spec: GraphSpec, cfg: ModelConfig, variant: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Feeds of a distinct shape per `variant` (0 traces, 1 and 2 validate). Real structure, random values:
    vision indices come from an actual grid; decoder masks have left padding in row 1."""
    rng = np.random.default_rng(seed + 97 * variant)
    f32 = lambda *s: rng.standard_normal(s).astype(np.float32)  # noqa: E731
    if spec.role in ("vision", "embedder_vision"):
        grids = [[(1, 8, 12), (1, 4, 6)], [(1, 16, 16)], [(1, 6, 10), (1, 12, 8), (1, 4, 4)]][variant % 3]
        grid = np.array(grids, dtype=np.int64)
        n = int(grid.prod(1).sum())
        feeds = {"patches": f32(n, cfg.vision.patch_dim)}
        feeds.update({k: v.numpy() for k, v in vision_inputs(grid, cfg.vision).as_dict().items()})
        return feeds
    if spec.role in ("decoder", "embedder"):
        b, s, p = [(2, 5, 3), (1, 7, 0), (3, 1, 9)][variant % 3]
        if spec.role == "embedder":
            p = 0
        h, t = cfg.text.hidden_size, cfg.text
        pos = np.broadcast_to(np.arange(p, p + s), (3, b, s)).astype(np.int64).copy()
        mask = np.ones((b, p + s), dtype=np.int64)
        if b > 1:
            mask[1, : min(2, p + s - 1)] = 0  # left padding in row 1
        feeds = {"inputs_embeds": f32(b, s, h), "position_ids": pos, "attention_mask": mask}
        if spec.role == "decoder":
            for name in kv_names(t.num_hidden_layers, "past"):
                feeds[name] = f32(b, t.num_key_value_heads, p, t.head_dim)
        return feeds
    k, length, lq = [(3, 5, 4), (1, 9, 6), (4, 2, 1)][variant % 3]
    h = cfg.text.hidden_size
    mask = np.ones((k, length), dtype=np.int64)
    mask[0, length // 2 + 1:] = 0  # a shorter first candidate
    feeds = {"cand_tokens": f32(k, length, h), "cand_mask": mask}
    if spec.role == "icm_relation":
        feeds.update(query_tokens=f32(lq, h), query_mask=np.ones(lq, dtype=np.int64))
    return feeds


def run_torch(module: nn.Module, spec: GraphSpec, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The oracle: the PyTorch module on the same feeds, outputs named as the spec names them."""
    param = next(module.parameters())
    args = []
    for name, ts in spec.inputs.items():
        t = torch.from_numpy(np.ascontiguousarray(feeds[name]))
        args.append(t.to(param.dtype) if ts.dtype.startswith("float") else t)
    with torch.no_grad():
        out = module(*args)
    out = out if isinstance(out, tuple) else (out,)
    return {name: o.float().numpy() for name, o in zip(spec.outputs, out)}
