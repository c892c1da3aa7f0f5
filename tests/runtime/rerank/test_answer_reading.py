"""Answers as real models write them: the released merger's repairs, the answer after </think>, a cap sized from
the tokenizer, and no model output that can raise out of the reranker."""

from __future__ import annotations

import json
import re
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from retrv.runtime.rerank.answer import answer_span, parse_ranking
from retrv.runtime.rerank.budget import Budget
from retrv.runtime.rerank.loop import Reranker
from retrv.runtime.rerank.methods import Listwise
from retrv.runtime.rerank.prompt import CandidateInput, QueryInput, RerankTemplate
from scripted_backend import ScriptedBackend

H = 64
RELEASED = json.loads((Path(__file__).parent / "fixtures" / "v_retrver_released.json").read_text())


def released_merger(response: str, n: int) -> list[int]:
    """The released evaluation merger's reading, as its behaviour is documented (an oracle for the cases it reads):
    the first <answer>[...]</answer> anywhere, int() per entry (unreadable ones skipped), 1-based -> 0-based,
    duplicates then out-of-range entries dropped, the missing ones appended in window order."""
    m = re.search(RELEASED["merger_answer_pattern"], response)
    if not m:
        return list(range(n))
    got = []
    for s in m.group(1).split(","):
        try:
            got.append(int(s.strip()) - 1)
        except ValueError:
            pass
    got = [i for i in dict.fromkeys(got) if 0 <= i < n] or list(range(n))
    return got + [i for i in range(n) if i not in got]


@pytest.mark.parametrize("answer, order, repair", [
    ("[4, ², 3]", [3, 2, 0, 1, 4], "dropped unreadable '²'"),
    ("[-1, 4, 2]", [3, 1, 0, 2, 4], "dropped out-of-range -1"),
    ("[4.0, 1]", [0, 1, 2, 3, 4], "dropped unreadable '4.0'"),
    ("[٣, 1]", [2, 0, 1, 3, 4], "appended missing [2, 4, 5]"),  # int() reads Arabic-Indic digits, as released
    (" [ 2 , 1 , 3 , 4 , 5 ] ", [1, 0, 2, 3, 4], None),
    ("[2, 2, 9, 1]", [1, 0, 2, 3, 4], "dropped duplicate 2"),
])
def test_released_merger_cases_are_repaired_entry_by_entry(answer, order, repair):
    got, repairs = parse_ranking(answer, 5)
    assert got == order == released_merger(f"<answer>{answer}</answer>", 5)
    assert repair is None and not repairs or repair in repairs


def test_one_number_as_the_released_guideline_asks_is_read_where_the_released_merger_reads_nothing():
    assert parse_ranking("3", 5) == ([2, 0, 1, 3, 4], ["appended missing [1, 2, 4, 5]"])
    assert released_merger("<answer>3</answer>", 5) == [0, 1, 2, 3, 4]


@given(st.lists(st.one_of(st.integers(-3, 9).map(str), st.sampled_from(["²", "٣", "4.0", "x", "", " 7 ", "+2"])),
                max_size=8))
def test_same_order_as_the_released_merger_whenever_it_reads_a_list(entries):
    answer = "[" + ", ".join(entries) + "]"
    got, _ = parse_ranking(answer, 5)
    assert (got or list(range(5))) == released_merger(f"<answer>{answer}</answer>", 5)


def test_answer_after_think_is_the_last_complete_one():
    span = lambda s: answer_span(s, "<answer>", "</answer>", "</think>")  # noqa: E731
    assert span("<think>maybe <answer>[2]</answer></think><answer>[3, 1]</answer>") == "[3, 1]"
    assert span("<think>x</think><answer>[1]</answer><answer>[2]</answer>") == "[2]"
    assert span("<think>only <answer>[2]</answer> thinking") is None
    assert span("<answer>[1]</answer>") == "[1]"


def encoder(images):
    return [(np.ones((4, H), np.float32), (1, 4, 4)) for _ in images]


def run(env, text, n=5, method="listwise", budget=None):
    tok, ids, cfg, table = env
    backend = ScriptedBackend(table, tok.encode_text(text), end_token=ids["<|im_end|>"])
    rr = Reranker(backend, tok, cfg, table, method=method, use_icm=False, image_encoder=encoder)
    cs = [CandidateInput(did=f"d{i}", text=f"item {i}", image_tokens=np.ones((4, H), np.float32), grid=(1, 4, 4),
                         image=Image.new("RGB", (40 + i, 30))) for i in range(n)]
    return rr.rerank(QueryInput(text="q", image=Image.new("RGB", (50, 40))), cs, budget or Budget(think=300))


def test_an_answer_inside_think_is_reasoning_not_the_answer(env):
    res = run(env, "<think>maybe <answer>[2, 1]</answer> no</think><answer>[3, 1]</answer>")
    w = res.windows[0]
    assert w.ranking == [2, 0, 1, 3, 4] and res.order == [2, 0, 1, 3, 4]
    assert "[2, 1]</answer> no</think>" in w.text  # the first one was read past, as reasoning


def test_a_crash_case_repairs_in_the_trace(env):
    res = run(env, "<think>ok</think><answer>[4, ², 3]</answer>")
    assert res.order == [3, 2, 0, 1, 4] and "dropped unreadable '²'" in res.windows[0].repairs


def test_cap_fits_a_spaced_answer_under_a_tokenizer_with_one_token_per_character():
    """A tokenizer that splits finer than Qwen's: the old cap (4n+8 = 28 for n=5) cut this well-formed answer."""
    chars = SimpleNamespace(encode_text=lambda s: list(s))
    ep = SimpleNamespace(cands=[None] * 5, builder=SimpleNamespace(tok=chars, t=RerankTemplate()))
    assert Listwise().answer_limit(ep) >= len(" [ 2 , 1 , 3 , 4 , 5 ] </answer>") > 4 * 5 + 8


def test_an_answer_cut_by_the_cap_shows_each_token_once(env):
    tok = env[0]
    script = "<think>x</think><answer>[" + ", ".join(str(i) for i in range(1, 80))
    res = run(env, script)
    w = res.windows[0]
    assert script.startswith(w.text) and len(w.text) > len("<think>x</think><answer>[1, 2")
    assert sorted(w.ranking) == list(range(5))


FRAGMENTS = ["<think>", "</think>", "<answer>", "</answer>", "<tool_call>", "</tool_call>", "[", "]", ",", " ",
             "1", "2", "3", "9", "-1", "4.0", "²", "٣", "{", "}", '"name": "crop_image"', '"select_images"',
             '"arguments": {"bbox_2d": [0, 0, 1, 1], "target_image": 1.0}', '"target_images": [2]', ":", "NaN",
             "1e999", "<inspection-index-start>", "<inspection-index-end>", "\n"]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.one_of(st.text(max_size=80), st.lists(st.sampled_from(FRAGMENTS), max_size=40).map("".join)),
       method=st.sampled_from(["listwise", "retrv-r1"]))
def test_no_model_output_raises_and_the_result_is_a_permutation(env, text, method):
    res = run(env, text, n=4, method=method, budget=Budget(think=60, tool=2))
    assert sorted(res.order) == [0, 1, 2, 3]
    w = res.windows[0]
    assert w.ranking is None or sorted(w.ranking) == [0, 1, 2, 3]
