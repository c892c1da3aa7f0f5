"""Dense supervision for the vision tower during pretraining: what lies under each merged token.

The paper's vision encoder arrives pretrained on web-scale data; ours starts from random weights. Captioning alone
teaches it slowly: after 300 steps the LM still guessed colours and shapes at chance, because the caption loss
reaches the tower only through an LM that has not yet learned where to look. This probe gives the tower a direct
signal: for every merged token, the background colour, and the colour, shape and fine detail of the object that
covers it (from the scene's ground truth). The linear heads are discarded after pretraining; nothing of them ships.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from retrv.train.scene import BACKGROUNDS, DETAILS, PALETTE, POSITIONS, RADIUS, SHAPES, Scene

IGNORE = -100
COVER = 0.6  # a token is labelled with an object when the object's disc reaches this deep into it (x radius)
MARK = 0.3  # ... and with its fine detail only when the token holds the object's middle, where every mark is drawn


def token_labels(scene: Scene, grid: tuple[int, int, int], merge: int = 2, position: bool = False) -> np.ndarray:
    """(tokens, 4) int64 per merged token in raster order: background, colour, shape, detail. Colour and shape have
    a "no object" class (0); detail is IGNORE except on tokens holding an object's middle (0 = no mark). With
    `position`, a fifth column names the covering object's position (0: no object), which a token can only know if
    the tower writes where it sits into its content: Qwen2.5-VL's tower has rotary (relative) positions only."""
    gh, gw = grid[1] // merge, grid[2] // merge
    colours, backgrounds = list(PALETTE), list(BACKGROUNDS)
    out = np.full((gh * gw, 5 if position else 4), IGNORE, dtype=np.int64)
    out[:, 0] = backgrounds.index(scene.background)
    out[:, 1:3] = 0
    if position:
        out[:, 4] = 0
    for r in range(gh):
        for c in range(gw):
            x0, x1, y0, y1 = c / gw, (c + 1) / gw, r / gh, (r + 1) / gh
            best = None
            for o in scene.objects:
                px, py = POSITIONS[o.position]
                cx, cy, rad = px + o.dx, py + o.dy, RADIUS * o.scale
                gap = math.hypot(max(x0 - cx, 0, cx - x1), max(y0 - cy, 0, cy - y1))  # centre to the token's box
                if gap < COVER * rad:
                    dist = math.hypot(cx - (x0 + x1) / 2, cy - (y0 + y1) / 2)
                    if best is None or dist < best[0]:
                        best = (dist, o, gap < MARK * rad)
            if best is not None:
                _, o, middle = best
                out[r * gw + c, 1:3] = (1 + colours.index(o.colour), 1 + SHAPES.index(o.shape))
                if position:
                    out[r * gw + c, 4] = 1 + list(POSITIONS).index(o.position)
                if middle:
                    out[r * gw + c, 3] = 0 if o.detail is None else 1 + DETAILS.index(o.detail)
    return out


DETAIL_WEIGHT = 4.0  # the fine detail is the slowest attribute to learn (a few pixels in one token); weighted up,
# its loss started falling within 100 steps instead of staying at chance for 200 (vision-only runs, 64 images/step)


class VisionProbe(nn.Module):
    """Linear heads over merged vision tokens (training only)."""

    def __init__(self, hidden: int, position: bool = False) -> None:
        super().__init__()
        heads = [nn.Linear(hidden, len(BACKGROUNDS)), nn.Linear(hidden, 1 + len(PALETTE)),
                 nn.Linear(hidden, 1 + len(SHAPES)), nn.Linear(hidden, 1 + len(DETAILS))]
        if position:
            heads.append(nn.Linear(hidden, 1 + len(POSITIONS)))
        self.heads = nn.ModuleList(heads)

    def forward(self, tokens: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """tokens (N, H), labels (N, 4 or 5) -> the weighted sum of the heads' cross-entropies."""
        if labels.shape[1] != len(self.heads):
            raise ValueError(f"probe labels: got {labels.shape[1]} columns; expected {len(self.heads)}, one per head")
        weights = (1.0, 1.0, 1.0, DETAIL_WEIGHT, 1.0)
        return sum(w * F.cross_entropy(head(tokens), labels[:, i], ignore_index=IGNORE)
                   for i, (w, head) in enumerate(zip(weights, self.heads)))
