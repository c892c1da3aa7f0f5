"""The model's context bounds everything: budgets past it are capped and reported, prompts past it refused, and
texts too long to ever fit are refused before the tokenizer sees them.

Everything runs on a tiny model whose context (`max_position_embeddings`) is 256, so the caps are reached fast.
"""

from __future__ import annotations

import io
import json
from contextlib import redirect_stderr, redirect_stdout

import numpy as np
import pytest

from retrv.export.pack_export import export_pack
from retrv.model.config import parse_hf_config
from retrv.model.tiny import VOCAB_SIZE, tiny_config, write_tiny_checkpoint
from retrv.model.tiny_tokenizer import build_tiny_tokenizer
from scripted_backend import ScriptedBackend
from retrv.runtime.rerank.budget import Budget
from retrv.app.cli import main as cli
from retrv.runtime.inputs.corpus import write_jsonl
from retrv.runtime.errors import InputError
from retrv.runtime.generate import Generator
from retrv.runtime.limits import MAX_CHARS_PER_TOKEN
from retrv.runtime.pack import Pack
from retrv.runtime.inputs.prompt import PromptTokenizer
from retrv.runtime.rerank.loop import Reranker
from retrv.runtime.rerank.prompt import CandidateInput, QueryInput

CONTEXT = 256  # the tiny model's max_position_embeddings here: a 4-candidate window prompt is ~150 tokens
H = 64
HUGE_TEXT = "word " * 20_000  # 100,000 characters, far past CONTEXT x MAX_CHARS_PER_TOKEN


# -- the reranking loop, scripted ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def env():
    tok_raw, ids = build_tiny_tokenizer(VOCAB_SIZE)
    tok = PromptTokenizer.from_tokenizer(tok_raw)
    config, retrv, _ = tiny_config("tiny", icm=True, max_position_embeddings=CONTEXT)
    cfg = parse_hf_config(config, retrv)
    table = np.random.default_rng(0).standard_normal((VOCAB_SIZE, H)).astype(np.float32)
    return tok, ids, cfg, table


class ContextBackend(ScriptedBackend):
    """A scripted model with a real model's limit: it refuses to hold more than CONTEXT positions."""

    def step(self, state, inputs_embeds, position_ids, attention_mask):
        held = state.length + inputs_embeds.shape[1]
        if held > CONTEXT or int(position_ids.max()) >= CONTEXT:
            raise AssertionError(f"fed past the context: {held} tokens, position {int(position_ids.max())}")
        return super().step(state, inputs_embeds, position_ids, attention_mask)


def _cands(n, text=lambda i: f"photo number {i}"):
    rng = np.random.default_rng(1)
    return [CandidateInput(did=f"d{i}", text=text(i), t_con=rng.standard_normal(H).astype(np.float32))
            for i in range(n)]


def _rerank(env, script_text, budget, cands, ids_before=()):
    tok, ids, cfg, table = env
    script = list(ids_before) + tok.encode_text(script_text)
    backend = ContextBackend(table, script, end_token=ids["<|im_end|>"])
    rr = Reranker(backend, tok, cfg, table, record=True)
    return rr.rerank(QueryInput(text="a photo"), cands, budget, window=4, stride=2), backend


def _positions_fed(window):
    return max(int(pos.max()) for _, _, pos in window.chunks) + 1


def test_think_budget_past_the_context_is_capped_reported_and_the_answer_still_fits(env):
    # The model would ramble for 3 contexts' worth of tokens; before the context bound it did.
    res, backend = _rerank(env, "la " * (3 * CONTEXT), Budget(think=10**12, token=10**12), _cands(4))
    cap = res.limits["think"]
    assert (cap.asked, cap.capped_to) == (10**12, CONTEXT) and "context 256" in cap.reason
    assert res.limits["token"].capped_to == CONTEXT
    w = res.windows[0]
    assert w.forced and w.choice is not None and "context" in res.exhausted
    assert res.usage.token == sum(backend.calls) <= CONTEXT
    assert _positions_fed(w) <= CONTEXT
    assert res.usage.think > CONTEXT // 4  # the loop did think until the context, not a token more


def test_every_window_stays_within_the_context(env):
    res, _ = _rerank(env, "la " * (3 * CONTEXT), Budget(think=10**12, inspect=10**12, tool=10**12), _cands(7))
    assert len(res.windows) == 3  # K=7, window 4, stride 2
    assert res.limits["think"].capped_to == 3 * CONTEXT
    assert res.limits["inspect"].capped_to == 12  # each candidate at most once per window: 4 + 4 + 4
    for w in res.windows:
        assert w.usage.token <= CONTEXT and _positions_fed(w) <= CONTEXT
        assert w.choice is not None  # the answer fitted after the reasoning
    assert sorted(res.order) == list(range(7))


def test_an_inspection_that_would_not_fit_is_not_taken(env):
    _, ids, *_ = env
    # candidate 2's caption is ~120 tokens: the prompt (~150) plus it cannot fit in 256
    long_caption = lambda i: "word " * 60 if i == 1 else f"photo number {i}"  # noqa: E731
    insp = [ids["<inspection-index-start>"], *env[0].encode_text("2"), ids["<inspection-index-end>"]]
    res, backend = _rerank(env, " then </think><answer>2</answer>", Budget(think=50), _cands(4, long_caption),
                           ids_before=insp)
    w = res.windows[0]
    assert w.inspected == [] and "(token budget exhausted)" in w.text and "context" in res.exhausted
    assert w.choice == 1 and w.usage.token <= CONTEXT  # the model's own answer still fitted


def test_a_window_prompt_past_the_context_keeps_the_coarse_order_and_says_why(env):
    tok, ids, cfg, table = env
    backend = ContextBackend(table, [], end_token=ids["<|im_end|>"])
    rr = Reranker(backend, tok, cfg, table, use_icm=False)  # full tokens: 4 captions of ~110 tokens each
    res = rr.rerank(QueryInput(text="a photo"), _cands(4, lambda i: "word " * 30), Budget())
    assert res.windows[0].fallback == "context_budget" and "context" in res.exhausted
    assert res.order == [0, 1, 2, 3] and sum(backend.calls) == 0


# -- generation ------------------------------------------------------------------------------------------------------
def test_generation_past_the_context_is_capped_and_reported(env):
    tok, ids, cfg, table = env
    filler = tok.encode_text("la")[0]  # never eos: the scripted model would generate forever
    backend = ContextBackend(table, [], end_token=filler)
    gen = Generator(backend, tok, cfg, None, table)
    res = gen.generate("hi", max_new_tokens=10**9)
    prompt = len(res.prompt_ids)
    assert len(res.token_ids) == CONTEXT - prompt  # prompt and generation fill the context exactly
    assert res.to_dict()["limits"] == {"max_new_tokens": {
        "asked": 10**9, "capped_to": CONTEXT - prompt, "reason": f"context {CONTEXT} - prompt {prompt}"}}
    assert sum(backend.calls) < CONTEXT  # the last token is produced, never fed
    assert gen.generate("hi", max_new_tokens=5).limits == {}


def test_a_prompt_that_fills_the_context_is_refused(env):
    tok, ids, cfg, table = env
    gen = Generator(ContextBackend(table, [], end_token=ids["<|im_end|>"]), tok, cfg, None, table)
    with pytest.raises(InputError, match=r"prompt: got \d+ tokens; expected at most 255 \(the model's context is 256"):
        gen.generate("word " * 300)  # ~600 tokens, under the character limit


@pytest.fixture
def encode_spy(monkeypatch):
    """Lengths of every text handed to the tokenizer; one past the character limit fails the test at once."""
    seen: list[int] = []
    real_encode, real_render = PromptTokenizer.encode_text, PromptTokenizer.render

    def record(n):
        seen.append(n)
        if n > CONTEXT * MAX_CHARS_PER_TOKEN:
            raise AssertionError(f"the tokenizer was handed {n} characters")

    def encode_text(self, text):
        record(len(text))
        return real_encode(self, text)

    def render(self, messages, counts, add_generation_prompt=True):
        record(len(self.template.render(messages, add_generation_prompt)))
        return real_render(self, messages, counts, add_generation_prompt)

    monkeypatch.setattr(PromptTokenizer, "encode_text", encode_text)
    monkeypatch.setattr(PromptTokenizer, "render", render)
    return seen


def test_a_huge_prompt_or_query_is_refused_before_tokenizing(env, encode_spy):
    tok, ids, cfg, table = env
    backend = ContextBackend(table, [], end_token=ids["<|im_end|>"])
    limit = f"{CONTEXT * MAX_CHARS_PER_TOKEN:,}"
    with pytest.raises(InputError, match=f"prompt: got 100,000 characters; expected at most {limit}"):
        Generator(backend, tok, cfg, None, table).generate(HUGE_TEXT)
    with pytest.raises(InputError, match=f"query text: got 100,000 characters; expected at most {limit}"):
        Reranker(backend, tok, cfg, table).rerank(QueryInput(text=HUGE_TEXT), _cands(3))
    with pytest.raises(InputError, match="candidate 'd1' text: got 100,000 characters"):
        Reranker(backend, tok, cfg, table).rerank(QueryInput(text="x"), _cands(3, lambda i: HUGE_TEXT if i else "a"))
    assert all(n <= CONTEXT * MAX_CHARS_PER_TOKEN for n in encode_spy)


# -- the command line, on a real tiny pack and index -----------------------------------------------------------------
@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("bounds")
    ckpt = write_tiny_checkpoint(root / "ckpt", icm=True, seed=3, max_position_embeddings=CONTEXT)
    pack_dir = export_pack(ckpt, root / "pack")
    assert Pack.open(pack_dir).model_config.text.max_position_embeddings == CONTEXT
    write_jsonl(root / "corpus.jsonl", [{"did": f"c{i}", "txt": f"picture {i}", "img_path": "", "modality": "text"}
                                        for i in range(4)])
    assert cli(["index", "build", str(pack_dir), str(root / "corpus.jsonl"), str(root / "index")]) == 0
    return root, pack_dir, root / "index"


@pytest.fixture
def ort_context_guard(monkeypatch):
    """ONNX Runtime would run past the context silently (its rotary tables are computed): make it refuse."""
    from retrv.runtime.backends.ort import OrtBackend

    real = OrtBackend.step

    def step(self, state, inputs_embeds, position_ids, attention_mask):
        if state.length + inputs_embeds.shape[1] > CONTEXT:
            raise AssertionError(f"fed past the context: {state.length + inputs_embeds.shape[1]} tokens")
        return real(self, state, inputs_embeds, position_ids, attention_mask)

    monkeypatch.setattr(OrtBackend, "step", step)


def _cli(argv):
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        rc = cli(argv)
    return rc, out.getvalue(), err.getvalue()


def test_generate_json_reports_the_capped_max_new_tokens(world, ort_context_guard):
    _, pack_dir, _ = world
    rc, out, _ = _cli(["generate", str(pack_dir), "--prompt", "hi", "--max-new-tokens", str(10**20), "--json"])
    d = json.loads(out)
    assert rc == 0 and len(d["prompt_ids"]) + len(d["token_ids"]) <= CONTEXT
    assert d["limits"]["max_new_tokens"] == {"asked": 10**20, "capped_to": CONTEXT - len(d["prompt_ids"]),
                                             "reason": f"context {CONTEXT} - prompt {len(d['prompt_ids'])}"}
    rc, _, err = _cli(["generate", str(pack_dir), "--prompt", HUGE_TEXT])
    assert rc == 2 and err.count("\n") == 1 and "prompt: got 100,000 characters" in err


def test_search_with_huge_numbers_caps_and_reports_them(world, ort_context_guard):
    _, pack_dir, index_dir = world
    rc, out, err = _cli(["search", str(index_dir), "--pack", str(pack_dir), "--text", "picture 2", "--k", str(10**6),
                         "--think-budget", str(10**12), "--token-budget", str(10**30), "--json"])
    assert rc == 0, err
    d = json.loads(out)
    assert len(d["ranked"]) == 4
    # (past MAX_K, 10**6, --k is refused by argparse: tests/reliability/test_cli_errors.py)
    assert d["limits"]["k"] == {"asked": 10**6, "capped_to": 4, "reason": "the index holds 4 candidates"}
    assert d["limits"]["think"]["asked"] == 10**12 and d["limits"]["think"]["capped_to"] == CONTEXT
    assert d["limits"]["token"]["capped_to"] == CONTEXT
    assert all(w["tokens"] <= CONTEXT for w in d["windows"]) and d["tokens"]["total_tokens"] <= CONTEXT
    write_jsonl(index_dir.parent / "queries.jsonl", [{"qid": "q", "query_txt": "picture 1", "query_img_path": "",
                                                      "pos_cand_list": ["c1"], "task_id": 0}])
    rc, out, err = _cli(["eval", str(index_dir), "--pack", str(pack_dir), "--queries",
                         str(index_dir.parent / "queries.jsonl"), "--think-budget", str(10**12), "--json"])
    assert rc == 0, err
    assert json.loads(out)["limits"]["think"] == {"asked": 10**12, "capped_to": CONTEXT,
                                                  "reason": f"context {CONTEXT} tokens x 1 window"}
    rc, _, err = _cli(["search", str(index_dir), "--pack", str(pack_dir), "--text", HUGE_TEXT])
    assert rc == 2 and err.count("\n") == 1 and "query text: got 100,000 characters" in err


def test_index_build_refuses_a_huge_candidate_text_before_tokenizing(world, encode_spy):
    root, pack_dir, _ = world
    write_jsonl(root / "huge.jsonl", [{"did": "ok", "txt": "picture", "img_path": "", "modality": "text"},
                                      {"did": "big", "txt": HUGE_TEXT, "img_path": "", "modality": "text"}])
    rc, _, err = _cli(["index", "build", str(pack_dir), str(root / "huge.jsonl"), str(root / "huge-index")])
    assert rc == 2 and err.count("\n") == 1 and "candidate 'big' text: got 100,000 characters" in err
    assert all(n <= CONTEXT * MAX_CHARS_PER_TOKEN for n in encode_spy)
