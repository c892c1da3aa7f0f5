"""One decoder sequence: the only place that calls `backend.step`.

Generation (`Generator`), each reranking window and the constrained answer (`AnswerTrie`) all decode through a
`DecodeSession`: it feeds prompt pieces, whole prepared inputs or single tokens at the next M-RoPE positions,
chooses the next token (greedy, or sampled at a temperature for training rollouts), counts every fed token against
a window's allowance when it has one, keeps the transcript (the ids the caller wants as text) and, when recording,
every fed chunk and every chosen token (training replays them).
"""

from __future__ import annotations

import time

import numpy as np

from retrv.runtime.errors import InputError


class Picker:
    """The next free token from logits: argmax at temperature 0, a sample otherwise (its own seeded generator)."""

    def __init__(self, temperature: float = 0.0, seed: int | None = None) -> None:
        if temperature < 0:
            raise InputError(f"temperature: got {temperature}; expected >= 0 (0 = greedy)")
        self.temperature, self.rng = temperature, np.random.default_rng(seed)

    def __call__(self, logits: np.ndarray) -> int:
        if self.temperature == 0:
            return int(np.argmax(logits))
        z = (logits - logits.max()) / self.temperature
        p = np.exp(z.astype(np.float64))
        return int(self.rng.choice(len(p), p=p / p.sum()))


GREEDY = Picker()


class DecodeSession:
    def __init__(self, backend, builder, picker: Picker = GREEDY, allowance=None, record: bool = False) -> None:
        """`builder`: a `PromptBuilder` (pieces -> ids, embeddings, positions; its table embeds single tokens).
        `allowance`: a `WindowAllowance` every feed is counted against (None: generation, bounded by its caller)."""
        self.backend, self.builder, self.picker, self.allowance = backend, builder, picker, allowance
        self.state = backend.start(1)
        self.next_pos = 0
        self.fed = 0  # tokens fed so far
        self.logits: np.ndarray | None = None  # (V,) after the last feed
        self.step_ms = 0.0  # time spent in the decoder
        self.transcript: list[int] = []  # fed and noted ids since the last `clear_transcript`, for the text
        self.record = record
        self.chunks: list = []  # with record: every fed chunk as (ids, embeds, position_ids)
        self.actions: list = []  # with record: (tokens fed before it, token) per chosen token acted on

    # -- feeding ------------------------------------------------------------------------------------------------
    def cost(self, pieces) -> int:
        return sum(len(p.ids) for p in pieces)

    def feed(self, pieces) -> None:
        """Prompt pieces (text, image tokens, ICM slots) at the next positions."""
        self.feed_inputs(*self.builder.assemble(pieces, self.next_pos))

    def feed_token(self, token: int) -> None:
        """One text token at the next position (what `feed([Piece([token])])` gives, without the M-RoPE walk)."""
        embeds = np.asarray(self.builder.table[np.asarray([token], dtype=np.int64)], dtype=np.float32)
        self.feed_inputs([int(token)], embeds, np.full((3, 1, 1), self.next_pos, dtype=np.int64))

    def feed_inputs(self, ids: list[int], embeds: np.ndarray, pos: np.ndarray) -> None:
        """Prepared inputs: ids, embeddings (S, H) and absolute position ids (3, 1, S)."""
        if self.allowance is not None:
            self.allowance.feed(len(ids))
        if self.record:
            self.chunks.append((ids, embeds, pos))
        t0 = time.perf_counter()
        self.logits = self.backend.step(self.state, embeds[None], pos, np.ones((1, len(ids)), np.int64))[0]
        self.step_ms += (time.perf_counter() - t0) * 1e3
        self.next_pos = int(pos.max()) + 1
        self.fed += len(ids)
        self.transcript += ids

    def can_feed(self, n: int, reserve: int = 0) -> bool:
        return self.allowance is None or self.allowance.can_feed(n, reserve)

    # -- choosing -----------------------------------------------------------------------------------------------
    def choose(self) -> int:
        """The model's next free token."""
        return self.picker(self.logits)

    def choose_among(self, options) -> int:
        """The most likely of `options` (a constraint: the model's logits decide only among them)."""
        return max(options, key=lambda t: self.logits[t])

    def taken(self, token: int) -> None:
        """Record a chosen token the caller acted on (a token discarded because a budget ran out is not)."""
        if self.record:
            self.actions.append((self.fed, token))

    def read_until(self, close: str, stop_ids, limit: int, decode) -> list[int]:
        """Free decoding of a short answer: choose and feed until `close` appears in the text, a stop id, the
        allowance runs out or `limit` tokens. -> the ids written (the last one is noted, not fed)."""
        written: list[int] = []
        fed_last = False  # at the limit the last token was fed (it is in the transcript): note it only otherwise
        for _ in range(limit):
            tok = self.choose()
            self.taken(tok)
            written.append(tok)
            if tok in stop_ids or close in decode(written) or not self.can_feed(1):
                fed_last = False
                break
            self.feed_token(tok)
            fed_last = True
        if not fed_last:
            self.note(written[-1:])
        return written

    # -- the transcript -----------------------------------------------------------------------------------------
    def note(self, ids) -> None:
        """Add ids to the transcript without feeding them (the last token of an answer is never fed)."""
        self.transcript += list(ids)

    def clear_transcript(self) -> None:
        self.transcript = []
