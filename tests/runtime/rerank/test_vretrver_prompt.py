"""The V-Retrver prompt as released: system prompt, tool schema, candidate layout, invalid-action observation, and
the format a pack records (prompt, answer format, target_image numbering)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from retrv.runtime.errors import InputError
from retrv.runtime.rerank.formats import ListwiseFormat
from retrv.runtime.rerank.loop import Reranker
from retrv.runtime.rerank.prompt import CandidateInput, PromptBuilder, QueryInput, RerankTemplate
from retrv.runtime.rerank.tools import ToolServer
from scripted_backend import ScriptedBackend

H = 64
RELEASED = json.loads((Path(__file__).parent / "fixtures" / "v_retrver_released.json").read_text())
IMAGE = "<|vision_start|>" + "<|image_pad|>" * 4 + "<|vision_end|>"  # a (1, 4, 4) grid: 4 merged tokens


def cands(n, images=True):
    return [CandidateInput(did=f"d{i}", text=f"a red car number {i}",
                           image_tokens=np.ones((4, H), np.float32) if images else None,
                           grid=(1, 4, 4) if images else None, image=Image.new("RGB", (100 + 10 * i, 80)))
            for i in range(n)]


def released_prompt(query: str, texts: list[str], images: bool, system: str, guideline: str) -> str:
    """The window as the released code writes it (the Qwen chat template around the system and user turns)."""
    layout = RELEASED["candidate_with_image" if images else "candidate_text_only"]
    candidates = "".join(layout.format(n=n, text=t).replace("<image>", IMAGE) for n, t in enumerate(texts, 1))
    user = (f"Query: {IMAGE} {query}\n" + RELEASED["candidates_header"] + candidates + RELEASED["candidates_end"]
            + guideline)
    return (f"<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n{user}<|im_end|>\n"
            f"<|im_start|>assistant\n")


def test_template_quotes_the_released_strings():
    t = RerankTemplate()
    assert t.listwise_system == RELEASED["system_prompt"]
    assert t.listwise_guidelines_index == RELEASED["guideline"]
    assert t.invalid_action == RELEASED["invalid_action"]


@pytest.mark.parametrize("images", [True, False], ids=["with-images", "text-only"])
def test_rendered_prompt_equals_the_released_one_token_for_token(env, images):
    """The query part before "Candidates:" comes from LamRA's data files, which the release does not include:
    ours ("Query: <image> text") is checked for layout only; everything after it is the release's."""
    tok, ids, cfg, table = env
    b = PromptBuilder(tok, cfg, table)
    q = QueryInput(text="find the red car", image_tokens=np.ones((4, H), np.float32), grid=(1, 4, 4))
    cs = cands(3, images)
    pieces = b.listwise_prompt(q, cs, ListwiseFormat(answer_format="index"))
    got = [i for p in pieces for i in p.ids]
    expected = released_prompt(q.text, [c.text for c in cs], images, RELEASED["system_prompt"], RELEASED["guideline"])
    assert tok.decode(got) == expected
    assert got == tok.encode_text(expected)  # token for token, not only the same text


def test_default_format_asks_for_a_list_and_keeps_the_released_system_prompt(env):
    tok, ids, cfg, table = env
    b = PromptBuilder(tok, cfg, table)
    text = tok.decode([i for p in b.listwise_prompt(QueryInput(text="q"), cands(2)) for i in p.ids])
    assert RELEASED["system_prompt"] in text and RELEASED["guideline"] not in text
    assert "<answer>[the candidate numbers from the best match to the worst" in text
    assert ListwiseFormat.from_dict(None) == ListwiseFormat() == ListwiseFormat("v-retrver-released", "list", 1)


def test_target_image_base_zero_rewrites_only_that_description(env):
    tok, ids, cfg, table = env
    b = PromptBuilder(tok, cfg, table)
    zero = b.listwise_system(0)
    assert zero != RELEASED["system_prompt"] and "Choose 0 to operate on the query image" in zero
    assert zero.replace(RerankTemplate().target_image_base0, RerankTemplate().target_image_base1) == \
        RELEASED["system_prompt"]


def test_manifest_format_is_validated_and_defaulted():
    assert ListwiseFormat.from_dict({"answer_format": "index"}).target_image_base == 1
    for bad in ({"answer_format": "ranked"}, {"target_image_base": 2}, {"target_image_base": True},
                {"prompt": "ours"}, {"colour": 1}, [1]):
        with pytest.raises(InputError, match="rerank"):
            ListwiseFormat.from_dict(bad)


# -- the tool numbering: prompt and tool agree -------------------------------------------------------------------
def test_crop_target_image_follows_the_chosen_base():
    images = [Image.new("RGB", (300, 200)), Image.new("RGB", (100, 100)), None, Image.new("RGB", (640, 480))]
    def crop(t):
        return json.dumps({"name": "crop_image", "arguments": {"bbox_2d": [0, 0, 1, 1], "target_image": t}})

    one, zero = ToolServer(images, 1), ToolServer(images, 0)
    # base 1 (the released prompt): 1 = the original (query) image, then the images in the order shown
    assert "300x200" in one.run(crop(1)).text and "100x100" in one.run(crop(2)).text
    assert "640x480" in one.run(crop(3)).text and not one.run(crop(0)).ok and not one.run(crop(4)).ok
    # base 0 (the released tool server): 0 = the query image, i = candidate i
    assert "300x200" in zero.run(crop(0)).text and "640x480" in zero.run(crop(3)).text
    # "number" in the schema: whole numbers are indices, anything else is refused, never raised
    assert "100x100" in one.run(crop(2.0)).text and "100x100" in one.run(crop("2")).text
    for bad in (2.5, float("inf"), "two", None, [2], True, 10**400):
        r = one.run(json.dumps({"name": "crop_image", "arguments": {"bbox_2d": [0, 0, 1, 1], "target_image": bad}}))
        assert not r.ok


def test_tool_calls_are_read_tolerantly():
    s = ToolServer([Image.new("RGB", (300, 200)), Image.new("RGB", (100, 100))], 1)
    body = '{"name": "crop_image", "arguments": {"bbox_2d": [0, 0, 1, 1], "target_image": 2,},}'
    assert s.run(body).ok  # trailing commas
    assert s.run("```json\n" + body.replace(",}", "}") + "\n```").ok
    assert s.run("call: " + body.replace(",}", "}") + " thanks").ok
    assert s.run('{"name": "select_images", "arguments": {"target_images": [1.0]}}').ok
    for junk in ("[" * 100000, '{"name": "crop_image", "arguments": {"bbox_2d": [NaN, 0, 1, 1], "target_image": 1}}',
                 '{"name": "crop_image", "arguments": {"bbox_2d": [1e999, 0, 2e999, 1], "target_image": 1}}'):
        assert not s.run(junk).ok


def test_invalid_call_observation_starts_with_the_released_text(env):
    tok, ids, cfg, table = env
    text = '<tool_call>{oops</tool_call><tool_call>{"name": "crop_image", "arguments": {"bbox_2d": [0, 0, 1, 1], ' \
           '"target_image": 1}}</tool_call><answer>[2, 1]</answer>'
    backend = ScriptedBackend(table, tok.encode_text(text), end_token=ids["<|im_end|>"])
    rr = Reranker(backend, tok, cfg, table, image_encoder=lambda ims: [(np.ones((4, H), np.float32), (1, 4, 4))
                                                                         for _ in ims])
    res = rr.rerank(QueryInput(text="q", image=Image.new("RGB", (50, 50))), cands(3))
    bad, good = res.windows[0].tool_calls
    assert bad["observation"].startswith(RELEASED["invalid_action"]) and not bad["ok"]
    assert good["ok"] and not good["observation"].startswith(RELEASED["invalid_action"])
    assert res.order == [1, 0, 2]
