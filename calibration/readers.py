"""Calibration data: real corpus items turned into exactly the feeds each graph of a pack sees at run time, served
as ONNX Runtime `CalibrationDataReader`s.

    items = load_items("captions/")                     # M-BEIR candidate JSONL, or captions.csv + images/
    feeds = PackFeeds("pack/")                          # the fp32 pack: tokenizer, template, vision graph, decoder
    reader = DecoderReader(feeds, items, decode_steps=3)
    quantize_static("decoder.onnx", "out.onnx", reader, ...)

- vision: the item's image preprocessed as the runtime does it (`preprocess_images`) with the grid indices from
  `positions.vision_graph_inputs`;
- decoder: the item's text rendered through the pack's tokenizer and chat template with the image's merged tokens
  (from the fp32 vision graph) scattered into the `<|image_pad|>` slots, i.e. what `Generator.prompt_embeds`
  builds; one prefill feed (empty past) and then `decode_steps` one-token feeds whose past is the fp32 decoder's
  own `present_*` and whose token is its greedy choice, so the KV-cache path is calibrated on real caches;
- ICM: groups of candidates' tokens (merged image tokens, or embedded text tokens for text-only items), padded
  with a key mask, and for `icm_relation` another item's text as the query.

Feeds are built on first use and kept, so one reader can be replayed (`rewind`, `set_range`, as ORT's strided
calibration does) and deep-copied (ORT's GPTQ path copies its reader).
"""

from __future__ import annotations

import copy
import csv
import logging
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np

from retrv.runtime.inputs import positions
from retrv.runtime.errors import InputError, require

log = logging.getLogger(__name__)

CAPTIONS_CSV = "captions.csv"  # the flickr8k-style layout: `image,caption` rows, images under images/
IMAGES_DIR = "images"


@dataclass(frozen=True)
class CalibItem:
    """One corpus item: a caption and/or an image (absolute path), at least one of them."""

    text: str | None = None
    image: str | None = None

    def prompt(self) -> str:
        """The user text of the prompt built for this item: a relevance question, the reranker's kind of input."""
        if self.image and self.text:
            return f"Candidate caption: {self.text}\nDoes the caption describe the image? Answer yes or no."
        if self.image:
            return "Describe the image in one sentence."
        return f"Candidate: {self.text}\nIs this candidate relevant to the query? Answer yes or no."


# ------------------------------------------------------------------------------------------------------ corpus
def _caption_rows(folder: Path) -> list[CalibItem]:
    """captions.csv (`image,caption` header) + images/: one item per image, with its first caption."""
    table = folder / CAPTIONS_CSV
    if not table.is_file():
        raise InputError(f"--calib {folder}: {CAPTIONS_CSV} not found; expected a directory with {CAPTIONS_CSV} "
                         f"(image,caption) and {IMAGES_DIR}/, or an M-BEIR candidate JSONL file")
    items: dict[str, str | None] = {}
    with open(table, encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        if not reader.fieldnames or not {"image", "caption"} <= set(reader.fieldnames):
            raise InputError(f"{table}: header {reader.fieldnames}; expected columns 'image' and 'caption'")
        for row in reader:
            name = (row.get("image") or "").strip()
            if not name:
                continue
            caption = (row.get("caption") or "").strip() or None
            if name not in items or items[name] is None:
                items[name] = caption
    return [CalibItem(text=t, image=str(folder / IMAGES_DIR / n)) for n, t in items.items()]


def _jsonl_rows(path: Path) -> list[CalibItem]:
    from retrv.runtime.inputs.corpus import read_candidates

    return [CalibItem(text=c.txt, image=c.img_path) for c in read_candidates(path)]


def _readable(image: str) -> bool:
    from retrv.runtime.inputs.preprocess import load_image

    try:
        load_image(image)
        return True
    except InputError as e:
        log.warning("calibration: skipping image %s (%s)", image, e)
        return False


def load_items(path: str | Path, limit: int | None = None) -> list[CalibItem]:
    """Usable items of `path` in file order, at most `limit`. An unreadable image is dropped from its item (the
    caption stays); an item with neither a readable image nor text is skipped. A missing path or one with no
    usable item raises a one-line InputError."""
    p = Path(path)
    if not p.exists():
        raise InputError(f"--calib {p}: not found; expected an M-BEIR candidate JSONL file or a directory with "
                         f"{CAPTIONS_CSV} and {IMAGES_DIR}/")
    rows = _caption_rows(p) if p.is_dir() else _jsonl_rows(p)
    items: list[CalibItem] = []
    for row in rows:
        text = row.text if row.text and row.text.strip() else None
        image = row.image if row.image and _readable(row.image) else None
        if text or image:
            items.append(CalibItem(text=text, image=image))
        if limit is not None and len(items) >= limit:
            break
    if not items:
        raise InputError(f"--calib {p}: no usable item among {len(rows)} rows (no readable image, no text); "
                         f"expected at least one")
    return items


def split_items(items: list[CalibItem], heldout: int) -> tuple[list[CalibItem], list[CalibItem]]:
    """(calibration, held-out): the last `heldout` items (at most half) are kept out of calibration for the gate."""
    n = min(heldout, len(items) // 2)
    return items[: len(items) - n], items[len(items) - n:]


# ------------------------------------------------------------------------------------------------------- feeds
class PackFeeds:
    """The fp32 pack's pieces that turn an item into graph inputs: tokenizer and template, embedding table,
    vision graph (for the image tokens the decoder and ICM see) and decoder (for real past KV)."""

    def __init__(self, pack_dir: str | Path) -> None:
        from retrv.runtime.backends.ort import OrtBackend
        from retrv.runtime.generate import Generator
        from retrv.runtime.pack import Pack

        self.pack = Pack.open(pack_dir, verify="size")
        # cache_dir=None: calibration must not write optimised graphs into the user's cache.
        self.gen = Generator.from_pack(self.pack, OrtBackend(self.pack, provider="cpu", cache_dir=None))
        self.cfg = self.pack.model_config
        self._tokens: dict[str, tuple[np.ndarray, np.ndarray]] = {}

    def __deepcopy__(self, memo):  # readers are deep-copied by ORT; the sessions are shared, never mutated
        return self

    def vision_feed(self, image: str) -> dict[str, np.ndarray]:
        from retrv.runtime.inputs.preprocess import preprocess_images

        patches, grids = preprocess_images([image], self.gen.processor)
        v = self.cfg.vision
        feed = positions.vision_graph_inputs(grids, v.spatial_merge_size, v.window_size, v.patch_size)
        feed["patches"] = patches
        return feed

    def image_tokens(self, image: str) -> tuple[np.ndarray, np.ndarray]:
        """(merged tokens (M, H), grids (1, 3)) from the fp32 vision graph, cached per image."""
        if image not in self._tokens:
            self._tokens[image] = self.gen.encode_images([image])
        return self._tokens[image]

    def prompt(self, item: CalibItem) -> tuple[list[int], np.ndarray, np.ndarray]:
        """(ids, inputs_embeds (1, S, H), position_ids (3, 1, S)) for the item, as `Generator.generate` builds them."""
        tokens, grids = self.image_tokens(item.image) if item.image else (None, np.zeros((0, 3), np.int64))
        ids = self.gen.render(item.prompt(), grids)
        embeds = self.gen.prompt_embeds(ids, tokens)  # (S, H)
        pos, _ = positions.rope_index(
            np.asarray([ids]), grids if len(grids) else None, None,
            image_token_id=self.cfg.tokens.image_token_id, spatial_merge_size=self.cfg.vision.spatial_merge_size,
        )
        return ids, embeds[None], pos

    def empty_past(self, batch: int = 1) -> dict[str, np.ndarray]:
        t = self.cfg.text
        empty = np.zeros((batch, t.num_key_value_heads, 0, t.head_dim), np.float32)
        return {f"past_{kind}_{i}": empty for i in range(t.num_hidden_layers) for kind in ("key", "value")}

    def decoder_feeds(self, item: CalibItem, decode_steps: int) -> list[dict[str, np.ndarray]]:
        """The prefill feed and `decode_steps` one-token feeds continuing it greedily on the fp32 decoder."""
        _, embeds, pos = self.prompt(item)
        if self.gen.backend.pack.decoder_layout == "fused":
            return self._fused_decoder_feeds(embeds, pos, decode_steps)
        seq = embeds.shape[1]
        feed = {"inputs_embeds": embeds, "position_ids": pos, "attention_mask": np.ones((1, seq), np.int64),
                **self.empty_past()}
        feeds = [feed]
        runner = self.gen.backend.runner("decoder")
        next_pos = int(pos.max()) + 1
        for step in range(decode_steps):
            out = runner.infer(feed)
            token = int(np.argmax(out["logits"][0]))
            total = feed["attention_mask"].shape[1] + 1
            feed = {
                "inputs_embeds": self.gen.lookup([token])[None],  # (1, 1, H)
                "position_ids": np.full((3, 1, 1), next_pos + step, np.int64),
                "attention_mask": np.ones((1, total), np.int64),
                **{k.replace("present_", "past_"): v for k, v in out.items() if k.startswith("present_")},
            }
            feeds.append(feed)
        return feeds

    def _fused_decoder_feeds(self, embeds: np.ndarray, pos: np.ndarray, decode_steps: int) -> list[dict]:
        """The fused layout's feeds (export/fused_decoder.py): the same prefill and greedy steps, the KV buffer and
        rotary caches snapshotted per feed (each feed must stay valid after the next step writes the buffer)."""
        from retrv.runtime.backends.fused import FusedCache, mrope_angles

        t = self.cfg.text
        cache = FusedCache.allocate(1, t.num_hidden_layers, t.num_key_value_heads, t.head_dim, np.float32,
                                    t.max_position_embeddings, capacity=embeds.shape[1] + decode_steps)
        runner = self.gen.backend.runner("decoder")
        feeds, length, next_pos = [], 0, int(pos.max()) + 1
        for step in range(decode_steps + 1):
            s = embeds.shape[1]
            cache.write_rotary(length, mrope_angles(pos, t))
            feed = {"inputs_embeds": embeds, "seqlens_k": np.array([length + s - 1], np.int32),
                    "total_sequence_length": np.array(length + s, np.int32), "cos_cache": cache.cos.copy(),
                    "sin_cache": cache.sin.copy()}
            for i in range(t.num_hidden_layers):
                feed[f"past_key_{i}"], feed[f"past_value_{i}"] = cache.keys[i].copy(), cache.values[i].copy()
            feeds.append(feed)
            if step == decode_steps:
                break
            out = runner.infer(feed)
            for i in range(t.num_hidden_layers):
                cache.keys[i][...], cache.values[i][...] = out[f"present_key_{i}"], out[f"present_value_{i}"]
            length += s
            embeds = self.gen.lookup([int(np.argmax(out["logits"][0]))])[None]  # (1, 1, H)
            pos = np.full((3, 1, 1), next_pos + step, np.int64)
        return feeds

    def candidate_tokens(self, item: CalibItem) -> np.ndarray:
        """What the index caches per candidate: merged image tokens, or the embedded caption for a text item."""
        if item.image:
            return self.image_tokens(item.image)[0]
        return self.gen.lookup(self.gen.text_ids(item.text, "calibration text"))

    def text_tokens(self, item: CalibItem) -> np.ndarray:
        if item.text:
            return self.gen.lookup(self.gen.text_ids(item.text, "calibration text"))
        return self.image_tokens(item.image)[0]


def pad_candidates(tokens: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Ragged (L_i, H) arrays -> (K, L, H) zero-padded and the (K, L) key mask."""
    k, length, h = len(tokens), max(t.shape[0] for t in tokens), tokens[0].shape[1]
    out = np.zeros((k, length, h), np.float32)
    mask = np.zeros((k, length), np.int64)
    for i, t in enumerate(tokens):
        out[i, : len(t)] = t
        mask[i, : len(t)] = 1
    return out, mask


# ----------------------------------------------------------------------------------------------------- readers
def _reader_base():
    return require("onnxruntime.quantization", "runtime").CalibrationDataReader


class FeedReader(_reader_base()):
    """A replayable list of feeds, built on first use. `set_range` and `__len__` are what ORT's strided
    calibration (`CalibStridedMinMax`) calls; iterating yields the feeds (what ORT's GPTQ data loader wants)."""

    role = ""

    def __init__(self, feeds: PackFeeds, items: list[CalibItem]) -> None:
        if not items:
            raise InputError(f"{self.role} calibration: got no items; expected at least one")
        self.source, self.items = feeds, list(items)
        self._start, self._end, self._pos = 0, None, 0

    def build(self) -> list[dict[str, np.ndarray]]:
        raise NotImplementedError

    @cached_property
    def feeds(self) -> list[dict[str, np.ndarray]]:
        feeds = self.build()
        if not feeds:
            raise InputError(f"{self.role} calibration: no usable item among {len(self.items)} "
                             f"(this graph needs {'an image' if self.role == 'vision' else 'text or an image'})")
        log.info("calibration: %d %s feeds", len(feeds), self.role)
        return feeds

    def __len__(self) -> int:
        return len(self.feeds)

    def __iter__(self):
        return iter(self.feeds)

    def set_range(self, start_index: int, end_index: int) -> None:
        self._start, self._end, self._pos = start_index, end_index, start_index

    def rewind(self) -> None:
        self._start, self._end, self._pos = 0, None, 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        end = len(self.feeds) if self._end is None else min(self._end, len(self.feeds))
        if self._pos >= end:
            return None
        self._pos += 1
        return self.feeds[self._pos - 1]

    def __deepcopy__(self, memo):
        other = copy.copy(self)
        other.rewind()
        return other


class VisionReader(FeedReader):
    role = "vision"

    def build(self):
        return [self.source.vision_feed(it.image) for it in self.items if it.image]


class DecoderReader(FeedReader):
    role = "decoder"

    def __init__(self, feeds: PackFeeds, items: list[CalibItem], decode_steps: int = 3) -> None:
        super().__init__(feeds, items)
        self.decode_steps = decode_steps

    def build(self):
        return [f for it in self.items for f in self.source.decoder_feeds(it, self.decode_steps)]


ICM_GROUP = 4  # candidates per ICM feed: a small rerank window; enough to exercise the key mask's padding


def _groups(items: list[CalibItem]) -> list[list[CalibItem]]:
    return [items[i: i + ICM_GROUP] for i in range(0, len(items), ICM_GROUP)]


class IcmContentReader(FeedReader):
    role = "icm_content"

    def build(self):
        feeds = []
        for group in _groups(self.items):
            cand, mask = pad_candidates([self.source.candidate_tokens(it) for it in group])
            feeds.append({"cand_tokens": cand, "cand_mask": mask})
        return feeds


class IcmRelationReader(FeedReader):
    role = "icm_relation"

    def build(self):
        feeds = []
        groups = _groups(self.items)
        for g, group in enumerate(groups):
            cand, mask = pad_candidates([self.source.candidate_tokens(it) for it in group])
            # The query is an item from another group (a real caption, not one of these candidates' own).
            query_item = groups[(g + 1) % len(groups)][0]
            query = self.source.text_tokens(query_item)
            feeds.append({"cand_tokens": cand, "cand_mask": mask, "query_tokens": query,
                          "query_mask": np.ones(len(query), np.int64)})
        return feeds


READERS = {"vision": VisionReader, "decoder": DecoderReader, "icm_content": IcmContentReader,
           "icm_relation": IcmRelationReader}


def make_reader(role: str, feeds: PackFeeds, items: list[CalibItem], decode_steps: int = 3) -> FeedReader:
    if role not in READERS:
        raise InputError(f"calibration reader: got role {role!r}; expected one of {sorted(READERS)}")
    if role == "decoder":
        return DecoderReader(feeds, items, decode_steps)
    return READERS[role](feeds, items)
