"""The reranking loop, driven by a scripted model: inspection, budgets, bad output, windows."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from retrv.model.config import parse_hf_config
from retrv.model.tiny import VOCAB_SIZE, tiny_config
from retrv.model.tiny_tokenizer import build_tiny_tokenizer
from scripted_backend import ScriptedBackend
from retrv.runtime.rerank.budget import Budget
from retrv.runtime.errors import InputError
from retrv.runtime.inputs.prompt import PromptTokenizer
from retrv.runtime.rerank.loop import Reranker, window_starts
from retrv.runtime.rerank.prompt import CandidateInput, QueryInput

H = 64


@pytest.fixture(scope="module")
def env():
    tok_raw, ids = build_tiny_tokenizer(VOCAB_SIZE)
    tok = PromptTokenizer.from_tokenizer(tok_raw)
    config, retrv, _ = tiny_config("tiny", icm=True)
    cfg = parse_hf_config(config, retrv)
    table = np.random.default_rng(0).standard_normal((VOCAB_SIZE, H)).astype(np.float32)
    return tok, ids, cfg, table


def cands(n, rng=None):
    rng = rng or np.random.default_rng(1)
    return [CandidateInput(did=f"d{i}", text=f"photo number {i}", image_tokens=rng.standard_normal((4, H)).astype(np.float32),
                           grid=(1, 4, 4), t_con=rng.standard_normal(H).astype(np.float32), score=1.0 - i / 100)
            for i in range(n)]


def script(env, *parts):
    """Parts: strings (tokenized) or ints (token ids)."""
    tok = env[0]
    out = []
    for p in parts:
        out += tok.encode_text(p) if isinstance(p, str) else [p]
    return out


def run(env, parts, n=5, budget=None, window=20, stride=10, fallback_order=None):
    tok, ids, cfg, table = env
    backend = ScriptedBackend(table, script(env, *parts), end_token=ids["<|im_end|>"],
                              fallback_order=fallback_order)
    rr = Reranker(backend, tok, cfg, table)
    query = QueryInput(text="a photo", image_tokens=np.ones((4, H), np.float32), grid=(1, 4, 4))
    return rr.rerank(query, cands(n), budget or Budget(), window, stride), backend


def test_inspection_appends_the_candidate_and_the_answer_reranks(env):
    _, ids, *_ = env
    res, backend = run(env, ["two looks close ", ids["<inspection-index-start>"], "2", ids["<inspection-index-end>"],
                             " yes", "</think>", "<answer>", "2", "</answer>"])
    w = res.windows[0]
    assert res.order[0] == 1 and sorted(res.order) == list(range(5))
    assert w.inspected == [1] and res.usage.inspect == 1 and not w.forced and w.fallback is None
    assert "photo number 1" in w.text  # candidate 2's caption came back into the context
    assert sum(backend.calls) == res.usage.token


def test_inspections_past_the_budget_are_refused_with_a_marker(env):
    _, ids, *_ = env
    insp = lambda i: [ids["<inspection-index-start>"], str(i), ids["<inspection-index-end>"]]  # noqa: E731
    res, _ = run(env, [*insp(2), *insp(3), *insp(4), "</think>", "<answer>", "3", "</answer>"],
                 budget=Budget(inspect=1))
    w = res.windows[0]
    assert w.inspected == [1] and res.usage.inspect == 1
    assert w.text.count("(inspection budget exhausted)") == 2
    assert "inspect" in res.exhausted and res.order[0] == 2


def test_out_of_range_and_repeated_inspection_get_markers_not_crashes(env):
    _, ids, *_ = env
    insp = lambda i: [ids["<inspection-index-start>"], str(i), ids["<inspection-index-end>"]]  # noqa: E731
    res, _ = run(env, [*insp(9), *insp(1), *insp(1), "<answer>", "1", "</answer>"])
    w = res.windows[0]
    assert "(no candidate 9)" in w.text and "(candidate 1 already inspected)" in w.text
    assert w.inspected == [0] and res.order == [0, 1, 2, 3, 4]


def test_think_budget_exhaustion_forces_a_valid_answer(env):
    tok, ids, *_ = env
    # The model would ramble forever; the forced answer follows its preference among valid indices ("4").
    res, _ = run(env, ["la " * 200], budget=Budget(think=7), fallback_order=tok.encode_text("4"))
    w = res.windows[0]
    assert w.forced and w.fallback is None and res.usage.think == 7
    assert "think" in res.exhausted
    assert res.order[0] == 3
    assert "</think>" in w.text and "<answer>" in w.text


def test_garbage_output_falls_back_to_coarse_order_and_is_flagged(env):
    res, _ = run(env, ["zq xv !!! ##"])  # then eos, never an answer
    assert res.windows[0].fallback == "no_answer" and res.fallback
    assert res.order == list(range(5))


def test_out_of_range_answer_falls_back_and_is_flagged(env):
    res, _ = run(env, ["hmm", "</think>", "<answer>", "9", "</answer>"])
    assert res.windows[0].fallback == "invalid_answer" and res.order == list(range(5))


def test_several_windows_back_to_front_merge_into_one_ranking(env):
    # K=7, window 4, stride 2 -> starts [3, 1, 0]; the scripted model always answers 3 (hand-worked order below).
    assert window_starts(7, 4, 2) == [3, 1, 0]
    assert window_starts(50, 20, 10) == [30, 20, 10, 0]
    res, _ = run(env, ["<answer>", "3", "</answer>"], n=7, window=4, stride=2)
    # [0..6] -> window@3 [3,4,5,6] picks 5 -> [0,1,2,5,3,4,6] -> window@1 [1,2,5,3] picks 5 -> [0,5,1,2,3,4,6]
    # -> window@0 [0,5,1,2] picks 1 -> [1,0,5,2,3,4,6]
    assert res.order == [1, 0, 5, 2, 3, 4, 6]
    assert [w.start for w in res.windows] == [3, 1, 0]


def test_token_budget_too_small_for_the_prompt_keeps_coarse_order(env):
    res, backend = run(env, ["<answer>", "2", "</answer>"], budget=Budget(token=20))
    assert res.windows[0].fallback == "token_budget" and res.order == list(range(5))
    assert res.usage.token == 0 and sum(backend.calls) == 0 and "token" in res.exhausted
    ran, _ = run(env, ["<answer>", "2", "</answer>"])
    # what the window needed is known even though it did not run (the deadline planner learns from it), and is
    # the prompt it prefills plus the answer's reserve when it does run
    assert res.windows[0].needed_tokens == ran.windows[0].needed_tokens > ran.windows[0].prefill_tokens > 20


def test_no_icm_model_prompts_with_full_tokens(env):
    tok, ids, cfg, table = env
    backend = ScriptedBackend(table, script(env, "<answer>", "2", "</answer>"), end_token=ids["<|im_end|>"])
    query = QueryInput(text="a photo")
    full = Reranker(backend, tok, cfg, table, use_icm=False).rerank(query, cands(3))
    icm = Reranker(backend, tok, cfg, table, use_icm=True).rerank(query, cands(3))
    assert full.order[0] == 1 == icm.order[0]
    # 3 candidates x (4 image tokens + 2 vision markers) instead of 2 slots each
    assert full.windows[0].prefill_tokens > icm.windows[0].prefill_tokens


def test_bad_arguments_are_refused(env):
    with pytest.raises(InputError, match="stride"):
        window_starts(10, 4, 5)
    with pytest.raises(InputError, match="budget.think"):
        Budget(think=-1)
    tok, ids, cfg, table = env
    with pytest.raises(InputError, match="candidates"):
        Reranker(ScriptedBackend(table, [], ids["<|im_end|>"]), tok, cfg, table).rerank(QueryInput(text="x"), [])


WORDS = ["yes ", "no ", "7", "2", "1", "</think>", "<answer>", "</answer>", "look ", "[", "]"]


@st.composite
def scripts(draw, ids):
    parts = []
    for _ in range(draw(st.integers(0, 30))):
        kind = draw(st.integers(0, 5))
        if kind == 0:
            parts += [ids["<inspection-index-start>"], str(draw(st.integers(0, 14))), ids["<inspection-index-end>"]]
        elif kind == 1:
            parts.append(draw(st.sampled_from([ids["<inspection-index-start>"], ids["<inspection-index-end>"],
                                                ids["<|im_end|>"]])))
        else:
            parts.append(draw(st.sampled_from(WORDS)))
    return parts


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_property_no_budget_is_exceeded_and_the_result_is_a_permutation(env, data):
    _, ids, *_ = env
    parts = data.draw(scripts(ids))
    n = data.draw(st.integers(1, 12))
    window = data.draw(st.integers(1, 8))
    stride = data.draw(st.integers(1, window))
    budget = Budget(think=data.draw(st.integers(0, 25)), inspect=data.draw(st.integers(0, 3)),
                    token=data.draw(st.one_of(st.none(), st.integers(1, 600))))
    res, backend = run(env, parts, n=n, budget=budget, window=window, stride=stride)
    assert sorted(res.order) == list(range(n))
    assert res.usage.think <= budget.think
    assert res.usage.inspect <= budget.inspect
    assert sum(backend.calls) == res.usage.token  # the ledger counts exactly what the decoder processed
    if budget.token is not None:
        assert res.usage.token <= budget.token
    for w in res.windows:
        assert w.choice is None or 0 <= w.choice < len(w.candidates)
        assert (w.choice is None) == bool(w.fallback)


def test_recorded_rollout_replays_the_fed_sequence_and_marks_only_taken_tokens(env):
    tok, ids, cfg, table = env
    parts = ["ok ", ids["<inspection-index-start>"], "2", ids["<inspection-index-end>"], "la " * 50]
    backend = ScriptedBackend(table, script(env, *parts), end_token=ids["<|im_end|>"])
    rr = Reranker(backend, tok, cfg, table, record=True)
    res = rr.rerank(QueryInput(text="a photo"), cands(4), Budget(think=9))
    w = res.windows[0]
    fed = sum(len(c[0]) for c in w.chunks)
    assert fed == res.usage.token == sum(backend.calls)
    # positions continue chunk to chunk, so a trainer can rebuild the exact sequence
    last = -1
    for ids_, _, pos in w.chunks:
        assert pos.min() > last
        last = int(pos.max())
    assert len(w.actions) == 9  # the think budget: the 10th drawn token was discarded, not recorded
    flat = [t for c in w.chunks for t in c[0]]
    for before, token in w.actions:
        assert flat[before] == token  # every taken action was then fed at exactly that position


def test_sampling_is_seeded_and_differs_from_greedy(env):
    tok, ids, cfg, table = env
    rng = np.random.default_rng(3)

    class Noisy(ScriptedBackend):
        def step(self, state, *a):
            super().step(state, *a)
            return rng.standard_normal((1, self.vocab)).astype(np.float32)

    def go(seed, temperature):
        nonlocal rng
        rng = np.random.default_rng(3)
        b = Noisy(table, [], ids["<|im_end|>"])
        rr = Reranker(b, tok, cfg, table, temperature=temperature, seed=seed, record=True)
        return [t for _, t in rr.rerank(QueryInput(text="q"), cands(3), Budget(think=12)).windows[0].actions]

    assert go(1, 1.0) == go(1, 1.0)
    assert go(1, 1.0) != go(2, 1.0)
    with pytest.raises(InputError, match="temperature"):
        Reranker(ScriptedBackend(table, [], ids["<|im_end|>"]), tok, cfg, table, temperature=-1)
