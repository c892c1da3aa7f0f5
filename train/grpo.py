"""GRPO with Retrv-R1's reward, with rollouts through the runtime's own `Reranker`.

Each query gets a group of rollouts sampled at `temperature` by the `Reranker` on a `TorchBackend` over the model
being trained (`record=True`), so the policy acts under exactly the runtime's rules: its prompt, inspection
appends, budgets and answer parsing. Every recorded feed (`trace.chunks`) is replayed through the LM with
gradients and the log-probability of each token the policy chose (`trace.actions`) is read from the position
before it. Advantages are group-normalised rewards; one gradient step per batch of rollouts (on-policy, so the
PPO ratio is 1 and there is nothing to clip). No KL term (V-Retrver used weight 0 as well).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from retrv.export.torch_backend import TorchBackend
from retrv.runtime.rerank.budget import Budget
from retrv.runtime.rerank.loop import Reranker, WindowTrace
from retrv.runtime.rerank.prompt import CandidateInput, QueryInput
from retrv.train.rewards import format_reward, retrv_reward
from retrv.train.sequences import Item, SequenceBuilder


@dataclass
class Rollout:
    trace: WindowTrace
    text: str  # the policy's own tokens, decoded
    reward: float
    correct: bool
    inspected: int
    format_ok: float


def to_runtime(query: Item, cands: list[Item]) -> tuple[QueryInput, list[CandidateInput]]:
    q = QueryInput(query.text, None if query.tokens is None else query.tokens.detach().numpy(), query.grid)
    cs = [CandidateInput(c.did, c.text, None if c.tokens is None else c.tokens.detach().numpy(), c.grid) for c in cands]
    return q, cs


def rollouts(sb: SequenceBuilder, query: Item, cands: list[Item], answer: int, group: int, lam: float,
             temperature: float, seed: int, budget: Budget) -> list[Rollout]:
    """`group` sampled rerankings of one window; `answer` is the 1-based gold index."""
    model = sb.model
    table = model.language_model.embed_tokens.weight.detach().numpy()  # a view: always the current weights
    q, cs = to_runtime(query, cands)
    out = []
    for g in range(group):
        rr = Reranker(TorchBackend(model), sb.tok, model.cfg, table, temperature=temperature, seed=seed + g,
                      record=True)
        trace = rr.rerank(q, cs, budget, window=len(cs), stride=len(cs)).windows[0]
        text = sb.tok.decode([t for _, t in trace.actions])
        fmt = format_reward(text)
        correct = trace.choice is not None and trace.choice == answer - 1
        reward = retrv_reward(fmt, correct, len(trace.inspected), len(cs), lam)
        out.append(Rollout(trace, text, reward, correct, len(trace.inspected), fmt))
    model.train()
    return out


def advantages(rewards: list[float], eps: float = 1e-4) -> np.ndarray:
    """Group-normalised: (r - mean) / (std + eps); all zeros when the group agrees (no signal)."""
    r = np.asarray(rewards, dtype=np.float64)
    std = r.std()
    return np.zeros_like(r) if std < 1e-8 else (r - r.mean()) / (std + eps)


def policy_loss(sb: SequenceBuilder, batch: list[tuple[Rollout, float]], temperature: float) -> torch.Tensor:
    """-mean over rollouts of advantage * mean log-prob of the rollout's chosen tokens (at the sampling
    temperature), recomputed with gradients from the recorded feeds."""
    batch = [(r, a) for r, a in batch if a != 0.0 and r.trace.actions]
    if not batch:
        return torch.zeros((), requires_grad=True)
    seqs = [sb.from_trace(r.trace.chunks) for r, _ in batch]
    hidden, _ = sb.forward(seqs)
    rows, cols, toks, weights = [], [], [], []
    for b, (r, adv) in enumerate(batch):
        n = len(r.trace.actions)
        for fed, tok in r.trace.actions:
            rows.append(b)
            cols.append(fed - 1)  # the logits that chose token `tok` are those of the last token fed before it
            toks.append(tok)
            weights.append(adv / n)
    logits = sb.model.lm_head(hidden[torch.tensor(rows), torch.tensor(cols)]).float() / temperature
    logp = torch.log_softmax(logits, -1).gather(1, torch.tensor(toks)[:, None])[:, 0]
    return -(torch.tensor(weights) * logp).sum() / len(batch)
