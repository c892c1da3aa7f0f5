"""The synthetic dataset as training examples: queries, their candidate pools, ground-truth scenes and image patches.

Images go through the runtime's own preprocessing (`retrv.runtime.inputs.preprocess`) with the checkpoint's
preprocessor settings, so training sees exactly the patches the runtime will feed the vision graph.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from retrv.runtime.inputs.corpus import Candidate, Query, read_candidates, read_queries
from retrv.runtime.inputs.preprocess import ImageProcessorConfig, preprocess_image
from retrv.train.synth import SceneRecord, read_scenes

VISION_CHUNK = 8  # images per vision call: the block-diagonal attention is (N, N) over all patches of a call, so
# larger calls waste quadratic work on masked pairs; 8 images (512 patches) keeps that below the useful work


def image_key(path: str | Path) -> str:
    """The id of an image in the dataset: the file stem (`did` of a candidate, `rid` of a reference)."""
    return Path(path).stem


@dataclass
class Split:
    name: str
    root: Path
    queries: list[Query]
    corpus: list[Candidate]
    scenes: dict[str, SceneRecord]  # image key -> ground truth

    @property
    def dids(self) -> list[str]:
        return [c.did for c in self.corpus]

    def image_path(self, key: str) -> str:
        return str(self.root / self.scenes[key].image)

    def query_image_key(self, q: Query) -> str | None:
        return image_key(q.query_img_path) if q.query_img_path else None


def load_split(root: str | Path, split: str) -> Split:
    root = Path(root)
    return Split(split, root, read_queries(root / f"queries_{split}.jsonl"),
                 read_candidates(root / f"corpus_{split}.jsonl"), read_scenes(root / f"scenes_{split}.jsonl"))


class ImageBank:
    """Preprocessed patches per image key, kept in float16 (half the memory; the vision tower's first op is a
    matmul in float32, and the patch values are normalised pixels that fp16 holds to 1e-3)."""

    def __init__(self, processor: ImageProcessorConfig) -> None:
        self.processor = processor
        self.patches: dict[str, np.ndarray] = {}
        self.grids: dict[str, tuple[int, int, int]] = {}

    def add(self, key: str, path: str) -> None:
        if key not in self.patches:
            p, g = preprocess_image(path, self.processor)
            self.patches[key] = p.astype(np.float16)
            self.grids[key] = tuple(int(x) for x in g)

    def add_split(self, split: Split) -> None:
        for key in sorted(split.scenes):
            self.add(key, split.image_path(key))

    def encode(self, model, keys: list[str]) -> list[torch.Tensor]:
        """Merged vision tokens (16, H) per key, with gradients when the tower trains."""
        out = []
        for s in range(0, len(keys), VISION_CHUNK):
            chunk = keys[s:s + VISION_CHUNK]
            patches = torch.from_numpy(np.concatenate([self.patches[k] for k in chunk]).astype(np.float32))
            grids = np.asarray([self.grids[k] for k in chunk], dtype=np.int64)
            tokens = model.visual.encode(patches, grids)  # (sum tokens, H)
            counts = (grids.prod(axis=1) // model.cfg.vision.merge_unit).tolist()
            out += list(torch.split(tokens, counts))
        return out


class TokenStore:
    """Vision tokens of every image once the tower is frozen (what the runtime's token cache holds)."""

    def __init__(self) -> None:
        self.tokens: dict[str, torch.Tensor] = {}
        self.grids: dict[str, tuple[int, int, int]] = {}

    @torch.no_grad()
    def fill(self, model, bank: ImageBank, keys: list[str]) -> None:
        todo = [k for k in keys if k not in self.tokens]
        for k, t in zip(todo, bank.encode(model, todo)):
            self.tokens[k] = t.detach().clone()
            self.grids[k] = bank.grids[k]

    def get(self, keys: list[str]) -> list[torch.Tensor]:
        return [self.tokens[k] for k in keys]
