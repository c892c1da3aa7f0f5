"""The baseline a user compares against: what they would write without retrv.

Load the checkpoint in transformers (`Qwen2_5_VLForConditionalGeneration`, fp32; eager attention, or `attn="sdpa"`:
PyTorch's scaled_dot_product_attention, what `from_pretrained` picks when nothing is asked for) and call
`generate` once per query with the query and ALL K candidates' full image tokens in one prompt, greedy. Every
candidate image is read from disk, preprocessed by transformers' image processor and encoded by the vision tower
on every query: nothing is cached, and there is no ICM. That is the point of the comparison.

To compare like with like, the baseline sees exactly the project's full-token prompt (`PromptBuilder.window_prompt`
without ICM tokens: the same system text, query, "[i] <image>" candidate lines and instruction), its coarse stage
embeds the query with the same LamRA-style prompt through the transformers model (last hidden state, L2-normalised)
and searches the same HNSW index, and it generates `think + answer` new tokens: the project's think budget plus
the tokens the project spends closing the reasoning and writing the answer. With random weights
(`force_length=True`) end-of-sequence is suppressed so that both do the same decode work; with trained weights the
model may stop early and its `<answer>i</answer>` is parsed (no answer: the coarse order stands).

Stages: embed, search, images (load + preprocess K images), vision (the vision tower inside `generate`, timed by a
hook), prefill (the first decoder call), decode (the others), other (the rest of `generate`), total.
"""

from __future__ import annotations

import re
import time
from pathlib import Path

import numpy as np

ANSWER = re.compile(r"<answer>(.*?)</answer>", re.S)


class _Clock:
    """Forward hooks that time every call of a module."""

    def __init__(self, module) -> None:
        self.calls: list[list[float]] = []
        self.lengths: list[int] = []
        module.register_forward_pre_hook(self._pre, with_kwargs=True)
        module.register_forward_hook(self._post, with_kwargs=True)

    def _pre(self, module, args, kwargs) -> None:
        x = kwargs.get("input_ids")
        if x is None:
            x = kwargs.get("inputs_embeds")
        if x is None and args:
            x = args[0]
        self.lengths.append(int(x.shape[1]) if x is not None and x.ndim >= 2 else 0)
        self.calls.append([time.perf_counter()])

    def _post(self, module, args, kwargs, output) -> None:
        self.calls[-1].append(time.perf_counter())

    def reset(self) -> None:
        self.calls.clear()
        self.lengths.clear()

    def ms(self, calls: list[list[float]] | None = None) -> float:
        return 1e3 * sum(c[1] - c[0] for c in (self.calls if calls is None else calls) if len(c) == 2)


class TransformersBaseline:
    def __init__(self, ckpt: str | Path, index_dir: str | Path, attn: str = "eager") -> None:
        import torch
        import transformers

        from retrv.model.config import read_config
        from retrv.runtime.inputs.embedding import Embedder
        from retrv.runtime.index.store import Index
        from retrv.runtime.inputs.prompt import PromptTokenizer
        from retrv.runtime.rerank.prompt import PromptBuilder, RerankTemplate

        self.torch = torch
        ckpt = Path(ckpt)
        transformers.utils.logging.disable_progress_bar()
        self.model = transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(
            str(ckpt), dtype=torch.float32, attn_implementation=attn).eval()
        self.attn = attn
        try:  # what a user would call; AutoProcessor itself needs torchvision (see model/tiny_tokenizer.py)
            self.processor = transformers.AutoImageProcessor.from_pretrained(str(ckpt))
            self.processor_name = type(self.processor).__name__
        except Exception:  # noqa: BLE001 - fall back to the project's numpy port, identical output
            self.processor = None
            self.processor_name = "retrv.runtime.inputs.preprocess (transformers' image processor failed to load)"
        self.cfg = read_config(ckpt)
        from retrv.runtime.inputs.preprocess import ImageProcessorConfig

        self.proc_cfg = ImageProcessorConfig.from_file(ckpt / "preprocessor_config.json")
        self.tok = PromptTokenizer(ckpt / "tokenizer.json")
        self.builder = PromptBuilder(self.tok, self.cfg, None)
        self.template = RerankTemplate()
        self.embedder = Embedder(None, self.builder)
        self.index = Index.open(index_dir)
        self.eos = list(self.cfg.tokens.eos_token_ids)
        self.lm_clock = _Clock(self.model)
        self.vision_clock = _Clock(self.model.model.visual)

    def open_index(self, index_dir) -> None:
        from retrv.runtime.index.store import Index

        self.index = Index.open(index_dir)

    # -- pieces ----------------------------------------------------------------------------------------------------
    def _pixels(self, images: list) -> tuple:
        """-> (pixel_values (N, patch_dim) tensor, grids (n, 3) numpy)."""
        torch = self.torch
        if self.processor is not None:
            from PIL import Image

            pil = [Image.open(p).convert("RGB") if isinstance(p, (str, Path)) else p for p in images]
            out = self.processor(images=pil, return_tensors="pt")
            return out["pixel_values"].float(), out["image_grid_thw"].numpy().astype(np.int64)
        from retrv.runtime.inputs.preprocess import preprocess_images

        patches, grids = preprocess_images(images, self.proc_cfg)
        return torch.from_numpy(patches), grids

    def _placeholder(self, grid) -> np.ndarray:
        # Only the ids matter here: the prompt builder checks the token count against the grid.
        n = int(np.prod(grid)) // self.cfg.vision.spatial_merge_size ** 2
        return np.zeros((n, self.cfg.text.hidden_size), np.float32)

    def _mm(self, ids):
        return (ids == self.cfg.tokens.image_token_id).int()

    # -- one query -------------------------------------------------------------------------------------------------
    def search(self, text: str | None, image, k: int, think: int, force_length: bool, answer_tokens: int) -> dict:
        from retrv.runtime.rerank.answer import parse_index
        from retrv.runtime.inputs.embedding import EmbedItem
        from retrv.runtime.rerank.prompt import CandidateInput, QueryInput

        torch, clock, t = self.torch, time.perf_counter, {}
        t_start = t0 = clock()
        q_pv, q_grid = (None, None)
        if image is not None:
            q_pv, grids = self._pixels([image])
            q_grid = tuple(int(x) for x in grids[0])
        item = EmbedItem(text, self._placeholder(q_grid) if q_grid else None, q_grid)
        ids = torch.tensor([[i for p in self.embedder.pieces(item, "query") for i in p.ids]])
        kwargs = {} if q_pv is None else dict(pixel_values=q_pv, image_grid_thw=torch.tensor([q_grid]),
                                               mm_token_type_ids=self._mm(ids))
        with torch.no_grad():
            hidden = self.model.model(input_ids=ids, attention_mask=torch.ones_like(ids), **kwargs).last_hidden_state
        vec = hidden[0, -1].float().numpy()
        vec = vec / max(float(np.linalg.norm(vec)), 1e-12)
        t["embed"] = (clock() - t0) * 1e3

        t0 = clock()
        labels, _ = self.index.search(vec[None], k)
        rows = [self.index.row(int(lab)) for lab in labels[0]]
        t["search"] = (clock() - t0) * 1e3

        t0 = clock()  # every candidate image from disk, every query
        paths = [r["img_path"] for r in rows if r.get("img_path")]
        c_pv, c_grids = self._pixels(paths) if paths else (None, np.zeros((0, 3), np.int64))
        t["images"] = (clock() - t0) * 1e3

        grid_of = iter(c_grids)
        cands = []
        for r in rows:
            g = tuple(int(x) for x in next(grid_of)) if r.get("img_path") else None
            cands.append(CandidateInput(r["did"], r.get("txt") or None, self._placeholder(g) if g else None, g))
        query = QueryInput(text, self._placeholder(q_grid) if q_grid else None, q_grid)
        ids = torch.tensor([[i for p in self.builder.window_prompt(query, cands, None) for i in p.ids]])
        pv = [x for x in (q_pv, c_pv) if x is not None]
        grids = [g for g in ([q_grid] if q_grid else []) + [tuple(int(x) for x in g) for g in c_grids]]
        kwargs = {} if not pv else dict(pixel_values=torch.cat(pv), image_grid_thw=torch.tensor(grids),
                                        mm_token_type_ids=self._mm(ids))
        new = think + answer_tokens
        self.lm_clock.reset()
        self.vision_clock.reset()
        t0 = clock()
        with torch.no_grad():
            out = self.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new,
                                      min_new_tokens=new if force_length else None, do_sample=False,
                                      eos_token_id=self.eos, pad_token_id=self.eos[0], **kwargs)
        gen_ms = (clock() - t0) * 1e3
        calls = self.lm_clock.calls
        t["vision"] = self.vision_clock.ms()
        t["prefill"] = self.lm_clock.ms(calls[:1])
        t["decode"] = self.lm_clock.ms(calls[1:])
        t["other"] = max(0.0, gen_ms - t["vision"] - t["prefill"] - t["decode"])
        t["total"] = (clock() - t_start) * 1e3

        new_ids = out[0, ids.shape[1]:].tolist()
        text_out = self.tok.decode(new_ids)
        m = ANSWER.search(text_out)
        choice = parse_index(m.group(1)) if m else None
        coarse = [r["did"] for r in rows]
        ranked = list(coarse)
        answered = choice is not None and 1 <= choice <= len(rows)
        if answered:
            ranked = [coarse[choice - 1]] + [d for d in coarse if d != coarse[choice - 1]]
        return {
            "timings_ms": t, "ranked": ranked, "coarse": coarse, "answered": answered,
            "tokens": {"prefill_tokens": int(ids.shape[1]), "new_tokens": len(new_ids),
                       "total_tokens": int(sum(self.lm_clock.lengths)),
                       "images_encoded": len(paths) + (1 if q_grid else 0),
                       "vision_patches": int(sum(int(np.prod(g)) for g in grids))},
        }
