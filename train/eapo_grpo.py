"""GRPO over V-Retrver's tool-using rollouts with the EAPO reward, on the PyTorch backend.

Rollouts come from the runtime's own `Reranker` in listwise mode (full candidate tokens, `select_images` /
`crop_image` answered in-process, tool results encoded by the model's own vision tower), sampled at
`temperature` with `record=True`. The reward is EAPO's (`train/eapo.py`); advantages and the policy loss are
GRPO's (`train/grpo.py`): every recorded feed, tool observations included, is replayed with gradients on the text
rows, and the log-probability of each token the policy chose is read from the position before it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from retrv.export.torch_backend import TorchBackend
from retrv.runtime.rerank.budget import Budget
from retrv.runtime.rerank.loop import Reranker, WindowTrace
from retrv.runtime.rerank.prompt import CandidateInput, QueryInput
from retrv.train.eapo import EapoReward, eapo_reward
from retrv.train.grpo import advantages, policy_loss  # noqa: F401 - re-exported: the same GRPO step serves both


@dataclass
class ToolRollout:
    trace: WindowTrace
    text: str  # the policy's own tokens, decoded: what EAPO scores
    reward: EapoReward

    @property
    def total(self) -> float:
        return self.reward.total


def torch_image_encoder(model, processor):
    """Tool results (crops, selected images) through the model's own vision tower, as the runtime does with a
    pack's vision graph."""
    from retrv.runtime.inputs.preprocess import preprocess_images

    def encode(images):
        out = []
        for img in images:
            patches, grids = preprocess_images([img], processor)
            with torch.no_grad():
                tokens = model.encode_images(torch.from_numpy(patches), grids).float().numpy()
            out.append((tokens, tuple(int(x) for x in grids[0])))
        return out

    return encode


def tool_rollouts(model, tokenizer, processor, query: QueryInput, cands: list[CandidateInput], gold: int,
                  group: int, temperature: float, seed: int, budget: Budget) -> list[ToolRollout]:
    """`group` sampled listwise rerankings of one window with tools; `gold` is the 1-based gold index."""
    table = model.language_model.embed_tokens.weight.detach().numpy()
    encode = torch_image_encoder(model, processor)
    was_training = model.training
    model.eval()
    out = []
    for g in range(group):
        rr = Reranker(TorchBackend(model), tokenizer, model.cfg, table, temperature=temperature, seed=seed + g,
                      record=True, method="listwise", image_encoder=encode)
        trace = rr.rerank(query, cands, budget, window=len(cands), stride=len(cands)).windows[0]
        text = tokenizer.decode([t for _, t in trace.actions])
        out.append(ToolRollout(trace, text, eapo_reward(text, gold, n_tool=len(trace.tool_calls))))
    model.train(was_training)
    return out


def grpo_step(sb, optimizer, groups: list[list[ToolRollout]], temperature: float) -> float:
    """One GRPO update over several queries' rollout groups; returns the loss."""
    batch = []
    for rollouts in groups:
        adv = advantages([r.total for r in rollouts])
        batch += [(r, float(a)) for r, a in zip(rollouts, adv)]
    loss = policy_loss(sb, batch, temperature)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return float(loss.detach())


def mean_reward(groups: list[list[ToolRollout]]) -> float:
    return float(np.mean([r.total for g in groups for r in g]))
