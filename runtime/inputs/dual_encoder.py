"""The coarse stage from an embedder that optimum exported: a CLIP / SigLIP dual encoder or a text encoder.

`retrv export --embedder DIR` (export/optimum_embedder.py) splits optimum's one `model.onnx` into two graphs by
output, so an image-only item runs only the image tower and a text-only item only the text tower:

    embedder_image.onnx   pixel_values (B, 3, H, W)            -> features (B, D)   the image tower, projected
    embedder_text.onnx    input_ids (B, S) [, attention_mask]  -> features (B, D)   the text tower, projected
                          (a text encoder: -> features (B, D) sentence_embedding, or (B, S, D) token embeddings
                           pooled here as its pooling config says)

`features` are the towers' outputs BEFORE the L2 normalisation CLIPModel/SiglipModel apply: what
`get_image_features` / `get_text_features` return. An item's vector follows UniIR's CLIP-SF score fusion: an
image+text item is the sum of its raw image and text features, an image-only or text-only item its one tower's
features, and every vector is then L2-normalised (the index is cosine). The configuration is the pack manifest's
`extra.embedder` (`OptimumEmbedderConfig`), checked when the pack opens.

numpy + tokenizers + pillow only: this runs on the device.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, fields
from typing import Any

import numpy as np

from retrv.runtime.errors import InputError
from retrv.runtime.inputs.clip_preprocess import ClipImageConfig, preprocess_clip_images

log = logging.getLogger(__name__)

KIND = "optimum"  # extra.embedder.kind of a pack whose embedder came from an optimum folder
FAMILIES = ("clip", "siglip", "text")
POOLINGS = ("tower", "sentence_embedding", "mean", "cls", "max", "lasttoken")
PADDINGS = ("longest", "max_length")
FUSIONS = ("sum",)  # UniIR CLIP-SF: raw image features + raw text features, then L2 (docs/ARCHITECTURE.md)
TEXT_INPUTS = ("input_ids", "attention_mask", "token_type_ids", "position_ids")
MAX_TEXT_LENGTH = 1 << 16  # far above any text tower's positions (CLIP 77, SigLIP 64, BERT 512)


def _int_in(where: str, value: Any, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise InputError(f"{where}: got {value!r}; expected an integer in [{lo}, {hi}]")
    return value


def _choice(where: str, value: Any, choices: tuple) -> str:
    if value not in choices:
        raise InputError(f"{where}: got {value!r}; expected one of {list(choices)}")
    return value


@dataclass(frozen=True)
class TextInputConfig:
    """How texts become the text graph's input_ids: truncated to `max_length` (special tokens included), padded
    to the longest in the batch (CLIP, BERT) or always to `max_length` (SigLIP: it pools the last position and
    was trained on max_length-padded text) with `pad_id`."""

    max_length: int
    padding: str
    pad_id: int

    def __post_init__(self) -> None:
        _int_in("embedder text.max_length", self.max_length, 1, MAX_TEXT_LENGTH)
        _choice("embedder text.padding", self.padding, PADDINGS)
        _int_in("embedder text.pad_id", self.pad_id, 0, 1 << 31)

    @classmethod
    def from_dict(cls, d: Any) -> TextInputConfig:
        if not isinstance(d, dict) or set(d) != {f.name for f in fields(cls)}:
            raise InputError(f"embedder text: got {d!r}; expected {{'max_length', 'padding', 'pad_id'}}")
        return cls(**d)


@dataclass(frozen=True)
class OptimumEmbedderConfig:
    """`extra.embedder` of a pack whose embedder is an optimum export. `family`: "clip"/"siglip" (dual encoders,
    image and text graphs) or "text" (a text encoder, text graph only); `pooling`: "tower" (the towers pool and
    project inside the graph), "sentence_embedding" (sentence-transformers' own output) or how token embeddings
    are pooled here; `dim`: the vectors' width."""

    family: str
    model_type: str
    dim: int
    pooling: str
    text: TextInputConfig
    image: ClipImageConfig | None = None
    fusion: str = "sum"
    normalize: bool = True
    source: str = ""
    kind: str = KIND

    def __post_init__(self) -> None:
        _choice("embedder family", self.family, FAMILIES)
        _choice("embedder kind", self.kind, (KIND,))
        _choice("embedder fusion", self.fusion, FUSIONS)
        _choice("embedder pooling", self.pooling, POOLINGS)
        _int_in("embedder dim", self.dim, 1, 1 << 20)
        if not isinstance(self.model_type, str) or not self.model_type:
            raise InputError(f"embedder model_type: got {self.model_type!r}; expected a config.json model_type")
        if not isinstance(self.normalize, bool):
            raise InputError(f"embedder normalize: got {self.normalize!r}; expected true or false")
        if (self.family == "text") != (self.image is None):
            raise InputError(f"embedder family {self.family!r} with image config {self.image is not None}: a dual "
                             f"encoder needs its image preprocessing and a text encoder has none")
        if (self.family == "text") == (self.pooling == "tower"):
            raise InputError(f"embedder pooling: got {self.pooling!r} for family {self.family!r}; expected 'tower' "
                             f"for a dual encoder and a text pooling for a text encoder")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["image"] = None if self.image is None else self.image.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: Any) -> OptimumEmbedderConfig:
        if not isinstance(d, dict):
            raise InputError(f"embedder: got {type(d).__name__}; expected a JSON object")
        known = {f.name for f in fields(cls)}
        unknown, missing = sorted(set(d) - known), [k for k in ("family", "model_type", "dim", "pooling", "text")
                                                     if k not in d]
        if unknown or missing:
            raise InputError(f"embedder: {'unknown fields ' + str(unknown) if unknown else 'missing ' + str(missing)}; "
                             f"expected {sorted(known)}")
        kw = dict(d)
        kw["text"] = TextInputConfig.from_dict(d["text"])
        kw["image"] = None if d.get("image") is None else ClipImageConfig.from_dict(d["image"])
        return cls(**kw)


def is_optimum_spec(spec: Any) -> bool:
    return isinstance(spec, dict) and spec.get("kind") == KIND


class OptimumEmbedder:
    """Items -> L2-normalised vectors through the pack's `embedder_image` / `embedder_text` graphs, each run by the
    backend's runner for that role (opened on first use: a text-only corpus never loads the image tower)."""

    def __init__(self, backend, config: OptimumEmbedderConfig, tokenizer_path) -> None:
        from tokenizers import Tokenizer

        self.backend, self.config = backend, config
        self.tokenizer = Tokenizer.from_file(str(tokenizer_path))
        self.tokenizer.no_padding()  # padded here, to the pack's rule
        # what transformers' `truncation=True, max_length=N` sets on the same backend: special tokens counted
        self.tokenizer.enable_truncation(config.text.max_length)

    @property
    def dim(self) -> int:
        return self.config.dim

    def describe(self) -> dict:
        """What the index records about how its vectors were made."""
        c = self.config
        return {"embedder": f"optimum-{c.family}", "model_type": c.model_type, "pooling": c.pooling,
                "fusion": c.fusion}

    # -- towers ---------------------------------------------------------------------------------------------
    def image_features(self, images: list) -> np.ndarray:
        """Images -> raw (un-normalised) image features (n, D): CLIP's get_image_features."""
        if self.config.image is None:
            raise InputError(f"embedder: got an image; the pack's embedder is a {self.config.model_type} text "
                             f"encoder, expected text-only items (export a CLIP/SigLIP embedder for images)")
        pixels = preprocess_clip_images(images, self.config.image)  # (n, 3, H, W)
        out = self.backend.runner("embedder_image").infer({"pixel_values": pixels}, ["features"])["features"]
        return np.asarray(out, np.float32)

    def tokenize(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """-> input_ids, attention_mask (n, S) int64, as the transformers tokenizer gives them with
        `truncation=True, max_length=..., padding=...`."""
        t = self.config.text
        encodings = self.tokenizer.encode_batch([str(x) for x in texts])
        ids = [e.ids for e in encodings]
        length = t.max_length if t.padding == "max_length" else max(len(x) for x in ids)
        input_ids = np.full((len(ids), length), t.pad_id, np.int64)  # right padding, as transformers pads
        mask = np.zeros((len(ids), length), np.int64)
        for r, x in enumerate(ids):
            input_ids[r, : len(x)] = x
            mask[r, : len(x)] = 1
        return input_ids, mask

    def text_features(self, texts: list[str]) -> np.ndarray:
        """Texts -> raw text features (n, D): CLIP's get_text_features, or a text encoder's pooled output."""
        input_ids, mask = self.tokenize(texts)
        runner = self.backend.runner("embedder_text")
        feed = {}
        for name in runner.input_names:
            if name == "input_ids":
                feed[name] = input_ids
            elif name == "attention_mask":
                feed[name] = mask
            elif name == "token_type_ids":
                feed[name] = np.zeros_like(input_ids)
            elif name == "position_ids":
                feed[name] = np.broadcast_to(np.arange(input_ids.shape[1], dtype=np.int64), input_ids.shape).copy()
            else:  # export/optimum_embedder.py admits only TEXT_INPUTS; a hand-edited pack is refused here
                raise InputError(f"{runner.name}: input {name!r} is not one the runtime can feed; expected "
                                 f"{list(TEXT_INPUTS)}")
        out = np.asarray(runner.infer(feed, ["features"])["features"], np.float32)
        return self.pool(out, mask)

    def pool(self, out: np.ndarray, mask: np.ndarray) -> np.ndarray:
        """(n, D) passes; (n, S, D) token embeddings pooled over the real tokens as the pack says."""
        if out.ndim == 2:
            return out
        p = self.config.pooling
        m = mask[:, :, None].astype(np.float32)  # (n, S, 1)
        if p == "mean":
            return (out * m).sum(1) / np.maximum(m.sum(1), 1e-9)
        if p == "max":
            return np.where(m > 0, out, -np.inf).max(1)
        if p == "cls":
            return out[:, 0]
        if p == "lasttoken":
            return out[np.arange(len(out)), mask.sum(1) - 1]
        raise InputError(f"embedder pooling {p!r}: the text graph gave token embeddings {out.shape}; expected "
                         f"one of ['mean', 'max', 'cls', 'lasttoken']")

    # -- items ----------------------------------------------------------------------------------------------
    def embed(self, items: list, role: str) -> np.ndarray:
        """EmbedItems -> (n, D) float32, L2-normalised; UniIR's score fusion for image+text items. `role` (query /
        candidate) does not change the vector: CLIP-style encoders are symmetric."""
        if role not in ("query", "candidate"):
            raise InputError(f"role: got {role!r}; expected 'query' or 'candidate'")
        for it in items:
            if not it.text and it.image is None:
                raise InputError(f"{role}: got neither text nor image; expected at least one")
        vectors = np.zeros((len(items), self.dim), np.float32)  # (n, D)
        with_image = [i for i, it in enumerate(items) if it.image is not None]
        with_text = [i for i, it in enumerate(items) if it.text]
        if with_image:
            vectors[with_image] += self.image_features([items[i].image for i in with_image])
        if with_text:
            vectors[with_text] += self.text_features([items[i].text for i in with_text])
        if self.config.normalize:
            vectors /= np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
        return vectors
