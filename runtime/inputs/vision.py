"""The one image encoder: images -> merged vision tokens, with one vision-graph call for a batch.

Built from a pack's model config and preprocessor and a backend; handed down to whoever encodes images: the
retriever (queries, index-time candidates), the reranker's tools (crops, selected images), generation, and a
separate embedder (its own config, preprocessor and graph role).
"""

from __future__ import annotations

import numpy as np

from retrv.runtime.inputs.positions import vision_graph_inputs
from retrv.runtime.inputs.preprocess import preprocess_images


class VisionEncoder:
    def __init__(self, backend, cfg, processor, role: str = "vision") -> None:
        """`cfg`: the model config (its `vision` section); `processor`: its image preprocessor; `role`: the
        backend's vision graph ("vision", or "embedder_vision" for a separate embedder)."""
        self.backend, self.cfg, self.processor, self.role = backend, cfg, processor, role

    def encode(self, images) -> tuple[np.ndarray, np.ndarray]:
        """Images (paths, PIL, arrays) -> (merged tokens of all images (M, H), grids (n, 3))."""
        patches, grids = preprocess_images(list(images), self.processor)
        v = self.cfg.vision
        feeds = vision_graph_inputs(grids, v.spatial_merge_size, v.window_size, v.patch_size)
        feeds["patches"] = patches
        tokens = self.backend.vision(feeds) if self.role == "vision" else self.backend.vision(feeds, role=self.role)
        return tokens, grids

    def __call__(self, images: list) -> list[tuple[np.ndarray, tuple[int, int, int]]]:
        """Images -> [(merged tokens (M_i, H), grid)], one per image ([] for none)."""
        if not images:
            return []
        tokens, grids = self.encode(images)
        counts = (grids.prod(axis=1) // self.cfg.vision.spatial_merge_size**2).tolist()
        splits = np.split(tokens, np.cumsum(counts)[:-1])
        return [(s, tuple(int(x) for x in g)) for s, g in zip(splits, grids)]
