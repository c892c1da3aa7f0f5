"""The accuracy gate: a quantized pack against its fp32 source on held-out inputs, before the pack is published.

For every held-out item the fp32 pack builds the prompt (its own vision graph for the image tokens), prefills and
continues greedily for `new_tokens` tokens, ignoring end-of-sequence. The quantized pack runs its own vision graph
and prefill on the same prompt and is then **teacher-forced on the fp32 tokens**, so one early disagreement does
not compound into a different continuation and every position compares like with like. Per position:

- cosine similarity of the two logits vectors (mean and min over all positions);
- top-1 agreement: the quantized argmax equals the fp32 greedy token.

`drop = 1 - top1_agreement`, the fraction of positions where the quantized pack would have chosen another next
token. `--max-drop X` refuses a pack whose drop exceeds X.

Also recorded: the cosine of the pooled `embedding` output (the coarse-stage vector), the ICM's `t_con`/`t_rel`
cosines (fp32 image tokens in, so the ICM graphs alone are compared), and the reranker's answer agreement on a
query set when a callable `answer_agreement(pack_dir) -> list[int]` is given ("not measured" otherwise).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from retrv.calibration.readers import CalibItem, PackFeeds, pad_candidates
from retrv.runtime.errors import InputError, RetrvError

log = logging.getLogger(__name__)

NOT_MEASURED = "not measured"
AnswerFn = Callable[[Path], list[int]]


class GateError(RetrvError):
    """A quantized pack failed the accuracy gate (`--max-drop`); nothing was written."""


def _cos(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise cosine similarity of (N, D) arrays."""
    a, b = a.astype(np.float64), b.astype(np.float64)
    num = (a * b).sum(-1)
    den = np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1)
    return num / np.maximum(den, 1e-30)


@dataclass(frozen=True)
class GateResult:
    logits_cosine_mean: float
    logits_cosine_min: float
    top1_agreement: float
    drop: float  # 1 - top1_agreement
    positions: int
    prompts: int
    new_tokens: int
    embedding_cosine_min: float
    icm_cosine_min: float | None
    answer_agreement: float | str
    inputs: str  # where the held-out prompts came from

    def to_dict(self) -> dict:
        return {k: (round(v, 6) if isinstance(v, float) else v) for k, v in asdict(self).items()}


def _greedy_logits(feeds: PackFeeds, embeds, pos, forced: list[int] | None, new_tokens: int):
    """Prefill + `new_tokens - 1` decode steps; the tokens fed are `forced` when given (teacher forcing), else the
    greedy choices. Returns (logits (new_tokens, V), tokens chosen, last-position embedding (H,))."""
    backend, gen = feeds.gen.backend, feeds.gen
    state = backend.start(1)
    logits = backend.step(state, embeds, pos, np.ones((1, embeds.shape[1]), np.int64))
    embedding = backend.embed(embeds, pos, np.ones((1, embeds.shape[1]), np.int64))[0]
    out, tokens = [logits[0]], []
    next_pos = int(pos.max()) + 1
    for step in range(new_tokens - 1):
        token = forced[step] if forced is not None else int(np.argmax(logits[0]))
        tokens.append(token)
        step_pos = np.full((3, 1, 1), next_pos + step, np.int64)
        logits = backend.step(state, gen.lookup([token])[None], step_pos, np.ones((1, 1), np.int64))
        out.append(logits[0])
    tokens.append(int(np.argmax(logits[0])))
    return np.stack(out), tokens, embedding


def _icm_cosine(ref: PackFeeds, quant: PackFeeds, items: list[CalibItem]) -> float | None:
    if not (ref.pack.has("icm_content") and quant.pack.has("icm_content")):
        return None
    cands = [ref.candidate_tokens(it) for it in items]
    cand, mask = pad_candidates(cands)
    query = ref.text_tokens(items[0])
    qmask = np.ones(len(query), np.int64)
    cos = [_cos(ref.gen.backend.icm_content(cand, mask), quant.gen.backend.icm_content(cand, mask)),
           _cos(ref.gen.backend.icm_relation(cand, mask, query, qmask),
                quant.gen.backend.icm_relation(cand, mask, query, qmask))]
    return float(min(c.min() for c in cos))


def run_gate(ref_pack: str | Path, quant_pack: str | Path, items: list[CalibItem], *, new_tokens: int = 16,
             inputs: str = "held-out", answer_agreement: AnswerFn | None = None) -> GateResult:
    """Compare `quant_pack` with its fp32 source `ref_pack` on `items` (never the calibration items)."""
    if not items:
        raise InputError("accuracy gate: got no held-out items; expected at least one")
    if new_tokens < 1:
        raise InputError(f"accuracy gate new_tokens: got {new_tokens}; expected >= 1")
    ref, quant = PackFeeds(ref_pack), PackFeeds(quant_pack)
    cosines, agree, emb_cos = [], [], []
    for item in items:
        _, embeds, pos = ref.prompt(item)
        ref_logits, ref_tokens, ref_emb = _greedy_logits(ref, embeds, pos, None, new_tokens)
        _, q_embeds, _ = quant.prompt(item)  # the quantized pack's own vision tokens
        q_logits, _, q_emb = _greedy_logits(quant, q_embeds, pos, ref_tokens[:-1], new_tokens)
        cosines.append(_cos(ref_logits, q_logits))
        agree.append(np.argmax(q_logits, -1) == np.asarray(ref_tokens))
        emb_cos.append(float(_cos(ref_emb[None], q_emb[None])[0]))
    cos = np.concatenate(cosines)
    top1 = float(np.concatenate(agree).mean())
    answers: float | str = NOT_MEASURED
    if answer_agreement is not None:
        a, b = list(answer_agreement(Path(ref_pack))), list(answer_agreement(Path(quant_pack)))
        if len(a) != len(b) or not a:
            raise InputError(f"answer_agreement: got {len(a)} answers from the fp32 pack and {len(b)} from the "
                             f"quantized one; expected the same non-zero number")
        answers = float(np.mean([x == y for x, y in zip(a, b)]))
    result = GateResult(
        logits_cosine_mean=float(cos.mean()), logits_cosine_min=float(cos.min()), top1_agreement=top1,
        drop=1.0 - top1, positions=int(cos.size), prompts=len(items), new_tokens=new_tokens,
        embedding_cosine_min=float(min(emb_cos)), icm_cosine_min=_icm_cosine(ref, quant, items),
        answer_agreement=answers, inputs=inputs,
    )
    log.info("gate: %s", result.to_dict())
    return result


def check_gate(result: GateResult, max_drop: float | None) -> None:
    """Raise GateError (one line, by how much) when the top-1 drop exceeds `max_drop`."""
    if max_drop is not None and result.drop > max_drop:
        raise GateError(
            f"--max-drop {max_drop:g}: top-1 drop {result.drop:.4f} (agreement {result.top1_agreement:.4f} over "
            f"{result.positions} positions) exceeds it by {result.drop - max_drop:.4f}; the pack was not written"
        )


def builtin_items() -> list[CalibItem]:
    """Held-out prompts when no corpus was given: fixed texts, no images (an image needs a file; the gate's
    vision coverage then comes only from a corpus)."""
    texts = [
        "a black dog runs across a snowy field",
        "two children play football on a beach at sunset",
        "a man in a red jacket climbs a rock wall",
        "a plate of pasta with tomato sauce and basil",
    ]
    return [CalibItem(text=t) for t in texts]
