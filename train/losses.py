"""The losses of every stage, on batches of examples. Each takes the `SequenceBuilder` (model + prompt formats).

- `info_nce`: the coarse embedder, in-batch InfoNCE with the queries' hard negatives in the batch;
- `caption_loss`: vision-language pretraining (describe the image), our stand-in for the pretrained Qwen2.5-VL
  the paper starts from;
- `rerank_loss`: SFT on the four-phase CoT, full-token or ICM prompts;
- `align_loss`: ICM self-alignment, the LM's CoT distributions from compressed vs full prompts (KL);
- `icm_tokens`: [t_con, t_rel] per candidate with gradients, from the same token lists the runtime gives the ICM;
- `RelevanceHead`: a training-only linear read-out of `t_rel` (which candidate of the window is the target, and
  which survive the CoT's phase 2).

Why the relevance read-out: self-alignment can only teach the ICM what its teacher knows, and our teacher is an LM
trained from scratch for a few minutes. In the first full run it had learned to copy the coarse order, the ICM
was aligned to that, and the reranker never learned to compare the query with the candidates (validation R@1
0.04 after SFT). A listwise cross-entropy on a linear score of each `t_rel` gives the ICM a direct signal that
the relation token should say how well the candidate fits the query; the head is discarded, nothing of it ships.
"""

from __future__ import annotations

import random

import torch
import torch.nn.functional as F
from torch import nn

from retrv.runtime.inputs.corpus import Query
from retrv.train.sequences import Item, Sequence, SequenceBuilder

TAU = 0.05  # InfoNCE temperature, fixed: CLIP's learned value settles near 0.01-0.07; fixed keeps runs comparable


def _text_embeds(sb: SequenceBuilder, text: str) -> torch.Tensor:
    return sb.model.language_model.embed_tokens(torch.tensor(sb.tok.encode_text(text)))


def icm_inputs(sb: SequenceBuilder, item: Item) -> torch.Tensor:
    """T_c / T_q as the runtime forms them (`PromptBuilder.candidate_tokens` / `query_tokens`): image tokens then
    text embeddings, (L, H)."""
    parts = []
    if item.tokens is not None and len(item.tokens):
        parts.append(item.tokens)
    if item.text:
        parts.append(_text_embeds(sb, item.text))
    return torch.cat(parts)


def _pad(seqs: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    longest = max(s.shape[0] for s in seqs)
    out = seqs[0].new_zeros(len(seqs), longest, seqs[0].shape[1])
    mask = torch.zeros(len(seqs), longest, dtype=torch.long)
    for i, s in enumerate(seqs):
        out[i, : s.shape[0]] = s
        mask[i, : s.shape[0]] = 1
    return out, mask


def icm_tokens(sb: SequenceBuilder, query: Item, cands: list[Item]) -> torch.Tensor:
    """(K, 2, H): t_con and t_rel of each candidate against `query`."""
    icm = sb.model.icm
    ct, cm = _pad([icm_inputs(sb, c) for c in cands])
    qt = icm_inputs(sb, query)
    t_con = icm.content(ct, cm)  # (K, H)
    t_rel = icm.relation(ct, cm, qt, torch.ones(qt.shape[0], dtype=torch.long))  # (K, H)
    return torch.stack([t_con, t_rel], dim=1)


class RelevanceHead(nn.Module):
    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.score = nn.Linear(hidden, 1)

    def forward(self, icm: list[torch.Tensor], answers: list[int], keeps: list[tuple[bool, ...]]) -> torch.Tensor:
        """icm: per window (K, 2, H) [t_con, t_rel]; answers: 1-based target index; keeps: per candidate, whether
        it survives the CoT's phase 2 -> mean over windows of the listwise CE (which candidate is the target) plus
        a binary CE per candidate on the same score (is it a look-alike of the target: phase 2's verdict)."""
        out = []
        for t, a, keep in zip(icm, answers, keeps):
            score = self.score(t[:, 1]).squeeze(-1)  # (K,)
            out.append(F.cross_entropy(score[None], torch.tensor([a - 1])) +
                       F.binary_cross_entropy_with_logits(score, torch.tensor(keep, dtype=score.dtype)))
        return torch.stack(out).mean()


def info_nce(sb: SequenceBuilder, queries: list[Item], positives: list[str], negatives: list[list[str]],
             cand_item) -> torch.Tensor:
    """Queries against every candidate of the batch (their positives and hard negatives, deduplicated)."""
    keys = list(dict.fromkeys(positives + [d for negs in negatives for d in negs]))
    col = {k: i for i, k in enumerate(keys)}
    qv = sb.pooled([sb.embedding(q, "query") for q in queries])  # (B, H)
    cv = sb.pooled([sb.embedding(cand_item(k), "candidate") for k in keys])  # (C, H)
    logits = qv @ cv.T / TAU  # (B, C)
    return F.cross_entropy(logits, torch.tensor([col[p] for p in positives]))


def sample_negatives(queries: list[Query], n: int, rng: random.Random) -> list[list[str]]:
    out = []
    for q in queries:
        negs = list(q.neg_cand_list)
        out.append(rng.sample(negs, min(n, len(negs))))
    return out


def caption_loss(sb: SequenceBuilder, images: list[Item], captions: list[str]) -> torch.Tensor:
    return sb.lm_loss([sb.caption(im, cap) for im, cap in zip(images, captions)])


def rerank_loss(sb: SequenceBuilder, seqs: list[Sequence]) -> torch.Tensor:
    return sb.lm_loss(seqs)


def align_loss(sb: SequenceBuilder, teacher: list[Sequence], student: list[Sequence]) -> torch.Tensor:
    """KL(teacher || student) over the vocabulary at every CoT position; the teacher runs without gradients. The
    two sequences of a pair differ in the prompt only, so their own tokens line up one to one."""
    with torch.no_grad():
        t_logits, t_targets, _ = sb.target_logits(teacher)
    s_logits, s_targets, _ = sb.target_logits(student)
    if not torch.equal(t_targets, s_targets):
        raise ValueError("align_loss: teacher and student sequences have different reasoning tokens")
    return F.kl_div(F.log_softmax(s_logits, -1), F.log_softmax(t_logits, -1), log_target=True, reduction="batchmean")
