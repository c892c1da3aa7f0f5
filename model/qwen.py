"""Qwen2.5-VL (plus an optional Retrv-R1 ICM) as one module with transformers' calling convention.

`forward(input_ids, pixel_values, image_grid_thw, attention_mask)` returns `.logits` like
`Qwen2_5_VLForConditionalGeneration`; M-RoPE positions come from numpy (`retrv.runtime.inputs.positions`) so the
PyTorch model, the exported graphs and the runtime all use one implementation of them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from retrv.model.config import ModelConfig
from retrv.model.decoder import KVCache, TextModel
from retrv.model.icm import ICM
from retrv.model.vision import VisionTower
from retrv.runtime.inputs import positions
from retrv.runtime.errors import InputError


@dataclass
class ModelOutput:
    logits: torch.Tensor  # (B, S, vocab)
    cache: KVCache
    position_ids: torch.Tensor  # (3, B, S)


class Qwen2_5_VL(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.visual = VisionTower(cfg.vision)
        self.language_model = TextModel(cfg.text)
        self.lm_head = nn.Linear(cfg.text.hidden_size, cfg.text.vocab_size, bias=False)
        self.icm = ICM(cfg.icm) if cfg.icm is not None else None

    @property
    def dtype(self) -> torch.dtype:
        return self.lm_head.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.lm_head.weight.device

    # -- pieces the runtime and the exporter reuse ------------------------------------------------------------
    def encode_images(self, pixel_values: torch.Tensor, image_grid_thw) -> torch.Tensor:
        """(N, patch_dim) patches of one or more images -> (sum N_i/4, H) merged tokens in image order."""
        return self.visual.encode(pixel_values.to(self.device, self.dtype), image_grid_thw)

    def embed(self, input_ids: torch.Tensor, image_embeds: torch.Tensor | None = None) -> torch.Tensor:
        """Token embeddings with image placeholders replaced by vision tokens, in order."""
        embeds = self.language_model.embed_tokens(input_ids)  # (B, S, H)
        is_image = input_ids == self.cfg.tokens.image_token_id
        n_slots = int(is_image.sum())
        n_tokens = 0 if image_embeds is None else image_embeds.shape[0]
        if n_slots != n_tokens:
            raise InputError(
                f"input_ids: got {n_slots} image placeholder tokens; expected {n_tokens} (the vision tokens of the images)"
            )
        if n_tokens:
            embeds = embeds.masked_scatter(is_image[..., None], image_embeds.to(embeds.dtype))
        return embeds

    def decode(self, inputs_embeds, position_ids, attention_mask, cache: KVCache) -> tuple[torch.Tensor, KVCache]:
        """Run the LM over new embeddings on top of `cache`; returns logits (B, S, V) and the extended cache."""
        mask = torch.cat([cache.attention_mask, attention_mask.to(cache.attention_mask)], dim=1)
        hidden, keys, values = self.language_model(
            inputs_embeds, position_ids, mask, cache.keys, cache.values
        )
        return self.lm_head(hidden), KVCache(keys, values, mask, cache.next_position)

    # -- transformers-compatible entry points -----------------------------------------------------------------
    def forward(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        image_grid_thw: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> ModelOutput:
        if input_ids.ndim != 2:
            raise InputError(f"input_ids: got shape {tuple(input_ids.shape)}; expected (batch, seq)")
        input_ids = input_ids.to(self.device)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        attention_mask = attention_mask.to(self.device)
        grid = None if image_grid_thw is None else np.asarray(torch.as_tensor(image_grid_thw).cpu(), dtype=np.int64)
        image_embeds = None
        if pixel_values is not None:
            if grid is None:
                raise InputError("image_grid_thw: got None with pixel_values; expected (num_images, 3)")
            image_embeds = self.encode_images(pixel_values, grid)
        embeds = self.embed(input_ids, image_embeds)

        pos, _ = positions.rope_index(
            input_ids.cpu().numpy(), grid, attention_mask.cpu().numpy(),
            image_token_id=self.cfg.tokens.image_token_id,
            spatial_merge_size=self.cfg.vision.spatial_merge_size,
        )
        position_ids = torch.from_numpy(pos).to(self.device)
        cache = KVCache.empty(self.cfg.text, input_ids.shape[0], self.dtype, self.device)
        logits, cache = self.decode(embeds, position_ids, attention_mask, cache)
        # The next text token continues after the largest position of the (unpadded) prompt.
        valid_pos = torch.where(attention_mask[None] > 0, position_ids, torch.zeros_like(position_ids))
        cache.next_position = valid_pos.amax(dim=(0, 2)) + 1  # (B,)
        return ModelOutput(logits=logits, cache=cache, position_ids=position_ids)

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        image_grid_thw: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        max_new_tokens: int = 32,
        eos_token_ids: tuple[int, ...] | None = None,
        pad_token_id: int | None = None,
    ) -> torch.Tensor:
        """Greedy decoding with the KV cache. Returns the new tokens (B, <= max_new_tokens); a row that has ended
        is filled with `pad_token_id` (default: its first eos) until every row ends, as transformers does."""
        if max_new_tokens < 1:
            raise InputError(f"max_new_tokens: got {max_new_tokens}; expected >= 1")
        eos = tuple(self.cfg.tokens.eos_token_ids if eos_token_ids is None else eos_token_ids)
        pad = pad_token_id if pad_token_id is not None else (self.cfg.tokens.pad_token_id or (eos[0] if eos else 0))
        out = self(input_ids, pixel_values, image_grid_thw, attention_mask)
        cache, logits = out.cache, out.logits[:, -1]
        batch = input_ids.shape[0]
        done = torch.zeros(batch, dtype=torch.bool, device=self.device)
        eos_t = torch.tensor(eos, dtype=torch.long, device=self.device)
        tokens = []
        for step in range(max_new_tokens):
            nxt = logits.argmax(-1)  # (B,)
            nxt = torch.where(done, torch.full_like(nxt, pad), nxt)
            tokens.append(nxt)
            done = done | torch.isin(nxt, eos_t)
            if bool(done.all()) or step == max_new_tokens - 1:
                break
            pos = (cache.next_position + step).view(1, batch, 1).expand(3, batch, 1)
            embeds = self.language_model.embed_tokens(nxt[:, None])
            step_logits, cache = self.decode(embeds, pos, torch.ones(batch, 1, dtype=torch.long), cache)
            logits = step_logits[:, -1]
        return torch.stack(tokens, dim=1)
