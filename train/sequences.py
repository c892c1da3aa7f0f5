"""Differentiable versions of the runtime's prompts: one source of truth for wording and positions.

Every sequence is built from the pieces the runtime builds (`PromptBuilder.window_prompt`, `full_candidate`,
`Embedder.pieces`) and assembled by the runtime's `PromptBuilder.assemble`, chunk by chunk exactly as the
`Reranker` feeds the decoder (prompt, generated tokens, inspection appends each start at the previous chunk's
largest position + 1), so ids and M-RoPE positions are identical by construction. Only the embeddings differ in
where they come from: text rows from the trainable `embed_tokens`, image tokens from the trainable vision tower,
ICM slots from the trainable ICM. The numpy pieces carry zero placeholders of the right shape; the tensors that
replace them ride along in `Chunk.sources`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from retrv.runtime.inputs.embedding import EmbedItem, Embedder, EmbedTemplate
from retrv.runtime.rerank.prompt import CandidateInput, Piece, PromptBuilder, QueryInput, RerankTemplate
from retrv.train.cot import INSPECT_END, INSPECT_START

# Training-only prompt for vision-language pretraining (captioning); never served, so not part of a template.
CAPTION_PROMPT = "\nDescribe the image."  # then the chat template hands over to the assistant


@dataclass
class Item:
    """A query or candidate whose image tokens are tensors (with gradients when the tower trains)."""

    text: str | None = None
    tokens: torch.Tensor | None = None  # (M, H) merged vision tokens
    grid: tuple[int, int, int] | None = None
    did: str = ""


@dataclass
class Chunk:
    ids: list[int]
    pos: np.ndarray  # (3, S) int64 M-RoPE positions
    sources: list[tuple[int, torch.Tensor]]  # (offset in the chunk, (n, H) embeddings replacing table rows)
    own: np.ndarray  # (S,) bool: a token the model itself chose (a training target)


@dataclass
class Sequence:
    chunks: list[Chunk] = field(default_factory=list)
    next_pos: int = 0

    def add(self, chunk: Chunk) -> None:
        self.chunks.append(chunk)
        self.next_pos = int(chunk.pos.max()) + 1

    @property
    def ids(self) -> list[int]:
        return [i for c in self.chunks for i in c.ids]

    @property
    def own(self) -> np.ndarray:
        return np.concatenate([c.own for c in self.chunks])

    def __len__(self) -> int:
        return sum(len(c.ids) for c in self.chunks)


class SequenceBuilder:
    def __init__(self, model, tokenizer, template: RerankTemplate | None = None,
                 embed_template: EmbedTemplate | None = None) -> None:
        cfg = model.cfg
        self.model, self.tok, self.cfg = model, tokenizer, cfg
        self.hidden = cfg.text.hidden_size
        # The builder's table only feeds positions here: every embedding comes from the model.
        table = np.zeros((cfg.text.vocab_size, self.hidden), np.float32)
        self.pb = PromptBuilder(tokenizer, cfg, table, template)
        self.embedder = Embedder(None, self.pb, embed_template)
        self.t = self.pb.t
        self.insp_start, self.insp_end = tokenizer.token_id(INSPECT_START), tokenizer.token_id(INSPECT_END)
        self.pad_id = cfg.tokens.pad_token_id or 0

    # -- chunks ---------------------------------------------------------------------------------------------------
    def _ph(self, x: torch.Tensor | None) -> np.ndarray | None:
        return None if x is None else np.zeros(tuple(x.shape), np.float32)

    def chunk(self, pieces: list[Piece], sources: list[torch.Tensor], start: int, own=False) -> Chunk:
        """Assemble `pieces` at `start` with the runtime's code; `sources` replace the embedding-carrying pieces in
        order. `own`: a bool for the whole chunk or a per-token sequence."""
        ids, _, pos = self.pb.assemble(pieces, start)
        src, at, k = [], 0, 0
        for p in pieces:
            if p.embeds is not None:
                if k >= len(sources) or tuple(sources[k].shape) != (len(p.ids), self.hidden):
                    raise ValueError(f"chunk: source {k} does not fit a piece of {len(p.ids)} tokens")
                src.append((at, sources[k]))
                k += 1
            at += len(p.ids)
        if k != len(sources):
            raise ValueError(f"chunk: got {len(sources)} sources for {k} embedding pieces")
        own_arr = np.full(len(ids), bool(own)) if isinstance(own, bool) else np.asarray(own, dtype=bool)
        return Chunk(ids, pos[:, 0], src, own_arr)

    def text_chunk(self, text: str, start: int, own: bool) -> Chunk:
        return self.chunk([self.pb.text(text)], [], start, own)

    # -- the runtime's prompts ------------------------------------------------------------------------------------
    def embedding(self, item: Item, role: str) -> Sequence:
        """The coarse-stage sequence (`Embedder.pieces`): pooled at its last token."""
        pieces = self.embedder.pieces(EmbedItem(item.text, self._ph(item.tokens), item.grid), role)
        seq = Sequence()
        seq.add(self.chunk(pieces, [item.tokens] if item.tokens is not None else [], 0))
        return seq

    def caption(self, image: Item, caption: str) -> Sequence:
        chat = self.pb.chat
        pieces = [self.pb.text(chat.open_turn("user"))] + self.pb.image(self._ph(image.tokens), image.grid) + \
            [self.pb.text(CAPTION_PROMPT + chat.handover("assistant"))]
        seq = Sequence()
        seq.add(self.chunk(pieces, [image.tokens], 0))
        seq.add(self.text_chunk(caption + chat.turn_end, seq.next_pos, True))
        return seq

    def rerank(self, query: Item, cands: list[Item], icm: torch.Tensor | None, events: list[tuple]) -> Sequence:
        """The window prompt (ICM slots when `icm` (n, 2, H) is given, full tokens otherwise), then the reasoning
        `events` (`retrv.train.cot.cot_events`) fed as the Reranker feeds them."""
        q_in = QueryInput(query.text, self._ph(query.tokens), query.grid)
        c_in = [CandidateInput(c.did, c.text, self._ph(c.tokens), c.grid) for c in cands]
        pieces = self.pb.window_prompt(q_in, c_in, None if icm is None else np.zeros(tuple(icm.shape), np.float32))
        sources = [query.tokens] if query.tokens is not None else []
        if icm is not None:
            sources += list(icm.unbind(0))
        else:
            sources += [c.tokens for c in cands if c.tokens is not None and len(c.tokens)]
        seq = Sequence()
        seq.add(self.chunk(pieces, sources, 0))
        for ev in events:
            if ev[0] == "write":
                seq.add(self.text_chunk(ev[1], seq.next_pos, True))
                continue
            _, i, granted = ev
            seq.add(self.chunk([Piece([self.insp_start] + self.tok.encode_text(str(i)))], [], seq.next_pos, True))
            end = Piece([self.insp_end])
            if granted:  # the Reranker's `_inspect`: marker token, prefix, the candidate's full tokens, newline
                pieces = [end, self.pb.text(self.t.inspected_prefix.format(i=i))] + \
                    self.pb.full_candidate(c_in[i - 1]) + [self.pb.text("\n")]
                src = [cands[i - 1].tokens] if cands[i - 1].tokens is not None else []
            else:
                pieces, src = [end, self.pb.text(self.t.marker_inspect_budget)], []
            n = sum(len(p.ids) for p in pieces)
            seq.add(self.chunk(pieces, src, seq.next_pos, [True] + [False] * (n - 1)))
        return seq

    def from_trace(self, chunks: list[tuple]) -> Sequence:
        """A rollout's recorded feeds (`WindowTrace.chunks`: ids, embeds, positions) as a sequence: text rows come
        from `embed_tokens` again (so they get gradients), image and ICM rows stay the recorded values."""
        fixed = {self.cfg.tokens.image_token_id, self.pb.slot_id}
        seq = Sequence()
        for ids, embeds, pos in chunks:
            keep = np.isin(np.asarray(ids), list(fixed)).astype(np.int8)
            edges = np.flatnonzero(np.diff(np.concatenate([[0], keep, [0]])))  # starts and ends of fixed runs
            src = [(int(a), torch.from_numpy(np.asarray(embeds[a:b], np.float32)))
                   for a, b in zip(edges[::2], edges[1::2])]
            seq.add(Chunk(list(ids), np.asarray(pos)[:, 0], src, np.zeros(len(ids), bool)))
        return seq

    # -- running a batch --------------------------------------------------------------------------------------------
    def forward(self, seqs: list[Sequence]) -> tuple[torch.Tensor, np.ndarray]:
        """Right-padded batch through the LM -> (final-norm hidden (B, S, H), lengths (B,))."""
        lm = self.model.language_model
        b, s = len(seqs), max(len(q) for q in seqs)
        ids = np.full((b, s), self.pad_id, np.int64)
        pos = np.ones((3, b, s), np.int64)
        mask = np.zeros((b, s), np.int64)
        rows, cols, vals = [], [], []
        lengths = np.zeros(b, np.int64)
        for r, q in enumerate(seqs):
            at = 0
            for c in q.chunks:
                n = len(c.ids)
                ids[r, at:at + n], pos[:, r, at:at + n], mask[r, at:at + n] = c.ids, c.pos, 1
                for off, t in c.sources:
                    rows += [r] * t.shape[0]
                    cols += range(at + off, at + off + t.shape[0])
                    vals.append(t)
                at += n
            lengths[r] = at
        embeds = lm.embed_tokens(torch.from_numpy(ids))  # (B, S, H)
        if vals:
            embeds = embeds.index_put((torch.tensor(rows), torch.tensor(cols)), torch.cat(vals).to(embeds.dtype))
        cfg = lm.cfg
        empty = embeds.new_zeros(b, cfg.num_key_value_heads, 0, cfg.head_dim)
        hidden, _, _ = lm(embeds, torch.from_numpy(pos), torch.from_numpy(mask), [empty] * cfg.num_hidden_layers,
                          [empty] * cfg.num_hidden_layers)
        return hidden, lengths

    def pooled(self, seqs: list[Sequence]) -> torch.Tensor:
        """The runtime's embedding: final-norm hidden at the last real position, L2-normalised. (B, H)"""
        hidden, lengths = self.forward(seqs)
        last = hidden[torch.arange(len(seqs)), torch.from_numpy(lengths - 1)].float()
        return F.normalize(last, dim=-1)

    def target_logits(self, seqs: list[Sequence]) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
        """Logits predicting every own token: (T, V) logits, (T,) targets, tokens per sequence."""
        hidden, _ = self.forward(seqs)
        rows, cols, targets, counts = [], [], [], []
        for r, q in enumerate(seqs):
            own, ids = q.own, q.ids
            js = np.flatnonzero(own[1:]) + 1  # position j is predicted from the hidden state at j - 1
            rows += [r] * len(js)
            cols += (js - 1).tolist()
            targets += [ids[j] for j in js]
            counts.append(len(js))
        logits = self.model.lm_head(hidden[torch.tensor(rows), torch.tensor(cols)])
        return logits.float(), torch.tensor(targets), counts

    def lm_loss(self, seqs: list[Sequence]) -> torch.Tensor:
        """Mean cross-entropy over the model's own tokens (never over prompts or appended candidate tokens)."""
        logits, targets, _ = self.target_logits(seqs)
        return F.cross_entropy(logits, targets)
