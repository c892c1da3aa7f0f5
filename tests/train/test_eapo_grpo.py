"""GRPO over tool-using (V-Retrver) rollouts: real rollouts run, and one update moves the policy the right way."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from retrv.model import load_checkpoint
from retrv.model.tiny import write_tiny_checkpoint
from scripted_backend import ScriptedBackend
from retrv.runtime.rerank.budget import Budget
from retrv.app.demo import synthetic_image
from retrv.runtime.inputs.preprocess import ImageProcessorConfig
from retrv.runtime.inputs.prompt import PromptTokenizer
from retrv.runtime.rerank.loop import Reranker
from retrv.runtime.rerank.prompt import CandidateInput, QueryInput
from retrv.train.eapo import eapo_reward
from retrv.train.eapo_grpo import ToolRollout, grpo_step, tool_rollouts, torch_image_encoder
from retrv.train.grpo import advantages, policy_loss
from retrv.train.sequences import SequenceBuilder


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
    ckpt = write_tiny_checkpoint(tmp_path_factory.mktemp("plain"), seed=11)
    model = load_checkpoint(ckpt)
    tok = PromptTokenizer(ckpt / "tokenizer.json")
    proc = ImageProcessorConfig.from_file(ckpt / "preprocessor_config.json")
    return model, tok, proc


def _window(model, proc, n=3):
    encode = torch_image_encoder(model, proc)
    imgs = [synthetic_image(50 + i, (112, 112)) for i in range(n + 1)]
    enc = encode(imgs)
    q = QueryInput("which one", enc[0][0], enc[0][1], image=imgs[0])
    cands = [CandidateInput(f"c{i}", f"item {i}", enc[i + 1][0], enc[i + 1][1], image=imgs[i + 1]) for i in range(n)]
    return q, cands


def test_tool_rollouts_run_on_the_pytorch_backend(plain):
    model, tok, proc = plain
    q, cands = _window(model, proc)
    rolls = tool_rollouts(model, tok, proc, q, cands, gold=2, group=2, temperature=1.0, seed=0,
                          budget=Budget(think=12, tool=2))
    assert len(rolls) == 2 and all(r.trace.actions for r in rolls)
    assert all(r.reward.total == eapo_reward(r.text, 2, len(r.trace.tool_calls)).total for r in rolls)


def _scripted(model, tok, proc, q, cands, text):
    table = model.language_model.embed_tokens.weight.detach().numpy()
    backend = ScriptedBackend(table, tok.encode_text(text), end_token=model.cfg.tokens.eos_token_ids[0])
    rr = Reranker(backend, tok, model.cfg, table, record=True, method="listwise",
                  image_encoder=torch_image_encoder(model, proc))
    trace = rr.rerank(q, cands, Budget(think=400, tool=2), window=len(cands), stride=len(cands)).windows[0]
    assert trace.chunks and trace.actions
    return trace


def test_one_grpo_step_on_tool_using_rollouts_lowers_the_loss(plain):
    model, tok, proc = plain
    q, cands = _window(model, proc)
    crop = json.dumps({"name": "crop_image", "arguments": {"bbox_2d": [0.1, 0.1, 0.6, 0.6], "target_image": 2}})
    good_text = f"<think>look<tool_call>{crop}</tool_call>yes</think><answer>[2, 1, 3]</answer>"
    bad_text = "<think>no</think><answer>[3, 1, 2]</answer>"
    rolls = []
    for text in (good_text, bad_text):
        trace = _scripted(model, tok, proc, q, cands, text)
        own = tok.decode([t for _, t in trace.actions])
        rolls.append(ToolRollout(trace, own, eapo_reward(own, 2, len(trace.tool_calls))))
    assert rolls[0].trace.tool_calls and rolls[0].trace.tool_calls[0]["ok"]
    assert rolls[0].total > rolls[1].total  # tool + gold first vs gold last
    sb = SequenceBuilder(model, tok)
    batch = [(r, float(a)) for r, a in zip(rolls, advantages([r.total for r in rolls]))]
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    before = float(policy_loss(sb, batch, 1.0).detach())
    grpo_step(sb, opt, [rolls], temperature=1.0)
    after = float(policy_loss(sb, batch, 1.0).detach())
    assert after < before
