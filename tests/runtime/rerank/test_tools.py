"""V-Retrver: tools, malformed calls, the tool budget, listwise answers and their repair."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from retrv.runtime.rerank.answer import parse_ranking
from scripted_backend import ScriptedBackend
from retrv.runtime.rerank.budget import Budget
from retrv.runtime.rerank.loop import Reranker
from retrv.runtime.rerank.prompt import CandidateInput, QueryInput
from retrv.runtime.rerank.tools import ToolServer, crop_box

H = 64


def img(w, h, colour=(200, 30, 30)):
    return Image.new("RGB", (w, h), colour)


# -- the tool server on its own ------------------------------------------------------------------------------------
def call(name, **arguments):
    return json.dumps({"name": name, "arguments": arguments})


@pytest.fixture()
def server():
    return ToolServer([img(300, 200), img(100, 100), None, img(640, 480)])  # query, c1, c2 (text only), c3


def test_select_images_returns_the_images(server):
    r = server.run(call("select_images", target_images=[3]))
    assert r.ok and len(r.images) == 1 and r.images[0].size == (640, 480)
    assert r.text.startswith("Here are the selected images for detailed analysis. (Image Size: 640x480")
    assert r.text.count("<image>") == 1


@pytest.mark.parametrize("name", ["crop_image", "zoom_in"])
def test_crop_normalized_box_is_padded_by_a_tenth(server, name):
    r = server.run(call(name, bbox_2d=[0.5, 0.5, 0.6, 0.7], target_image=0))
    assert r.ok and r.images[0].size == (90, 80)  # (0.4..0.7) x 300, (0.4..0.8) x 200
    assert "Here is the cropped image. (Image Size: 90x80)" in r.text


def test_crop_pixel_box_and_padding_cap():
    assert crop_box((300, 200), [150, 100, 180, 140]) == (120, 80, 210, 160)  # pixels, padded by 30 and 20 px
    # on a huge image 0.1 would be 1,000 px: the padding is capped at 600 px
    assert crop_box((10000, 1000), [0.5, 0.5, 0.51, 0.6]) == (4400, 400, 5700, 700)
    assert crop_box((300, 200), [2.0, 2.0, 1.5, 1.5]) is None  # inverted
    assert crop_box((300, 200), [0.99, 0.99, 1.0, 1.0]) == (267, 178, 300, 200)  # clamped at the border


@pytest.mark.parametrize("body, expected", [
    ("not json", "Invalid tool call"),
    (json.dumps(["crop_image"]), "Invalid tool call"),
    (call("rotate_image", angle=3), "Unknown action name"),
    (json.dumps({"name": "crop_image"}), "Missing 'arguments'"),
    (json.dumps({"name": "crop_image", "arguments": [1]}), "should be a dictionary"),
    (call("crop_image", target_image=1), "Missing parameters: bbox_2d"),
    (call("crop_image", bbox_2d=[0, 0, 1], target_image=1), "Invalid bbox_2d format"),
    (call("crop_image", bbox_2d=[0, 0, "a", 1], target_image=1), "Invalid bbox_2d format"),
    (call("crop_image", bbox_2d=[0.1, 0.1, 0.2, 0.2], target_image=7), "invalid image index"),
    (call("crop_image", bbox_2d=[0.1, 0.1, 0.2, 0.2], target_image=2), "has no image"),
    (call("crop_image", bbox_2d=[5000, 5000, 6000, 6000], target_image=1), "inside image 1"),
    (call("crop_image", bbox_2d=[0.6, 0.6, 0.5, 0.7], target_image=1), "expected x1 < x2"),
    (call("select_images", target_images=3), "Invalid target_images format"),
    (call("select_images", target_images=[0, 9]), "Invalid indices found"),
    (call("select_images"), "Missing parameters: target_images"),
])
def test_malformed_calls_become_observations(server, body, expected):
    r = server.run(body)
    assert not r.ok and expected in r.text and not r.images


def test_missing_query_image_and_unreadable_file_are_observations(tmp_path):
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"not an image")
    s = ToolServer([None, str(bad)])
    assert "Query image does not exist" in s.run(call("select_images", target_images=[0])).text
    r = s.run(call("select_images", target_images=[1]))
    assert not r.ok and "Error processing select_images" in r.text


# -- listwise answers ----------------------------------------------------------------------------------------------
def test_listwise_repair():
    assert parse_ranking("[4, 1, 3, 5, 2]", 5) == ([3, 0, 2, 4, 1], [])
    order, repairs = parse_ranking(" [2, 2, 7, 1] ", 4)
    assert order == [1, 0, 2, 3] and "dropped duplicate 2" in repairs and "dropped out-of-range 7" in repairs
    assert parse_ranking("[9, 8]", 3)[0] is None
    assert parse_ranking("2, 1", 3)[0] == [1, 0, 2]  # brackets optional: the released guideline asks for "2"
    assert parse_ranking("two", 3)[0] is None


# -- the loop, scripted ----------------------------------------------------------------------------------------------
def fake_encoder(images):
    """Stand-in for the vision graph: a 4x4-patch grid per image (one merged token per 2x2)."""
    return [(np.full((4, H), float(i.size[0]), np.float32), (1, 4, 4)) for i in images]


def run(env, text, n=4, budget=None, encoder=fake_encoder, window=20, stride=10):
    tok, ids, cfg, table = env
    backend = ScriptedBackend(table, tok.encode_text(text), end_token=ids["<|im_end|>"])
    rr = Reranker(backend, tok, cfg, table, image_encoder=encoder)
    assert rr.method == "listwise" and not rr.use_icm
    cands = [CandidateInput(did=f"d{i}", text=f"item {i}", image_tokens=np.ones((4, H), np.float32), grid=(1, 4, 4),
                            image=img(100 + 10 * i, 80)) for i in range(n)]
    res = rr.rerank(QueryInput(text="find it", image=img(120, 90)), cands, budget or Budget(), window, stride)
    return res, backend


def test_tool_call_result_is_appended_and_the_list_answer_reranks(env):
    crop = call("crop_image", bbox_2d=[0.1, 0.1, 0.5, 0.5], target_image=2)
    res, _ = run(env, f"<think>check<tool_call>{crop}</tool_call>ok</think><answer>[3, 1, 4, 2]</answer>")
    w = res.windows[0]
    assert w.tool_calls == [{"name": "crop_image", "ok": True, "observation": w.tool_calls[0]["observation"]}]
    assert "Here is the cropped image." in w.text and res.usage.tool == 1
    assert res.order == [2, 0, 3, 1] and w.ranking == [2, 0, 3, 1] and not w.repairs


def test_tool_budget_is_enforced(env):
    sel = call("select_images", target_images=[1])
    res, _ = run(env, f"<tool_call>{sel}</tool_call>" * 3 + "<answer>[1]</answer>", budget=Budget(tool=2, think=1000))
    w = res.windows[0]
    assert res.usage.tool == 2 and [c["ok"] for c in w.tool_calls] == [True, True, False]
    assert "Tool budget exhausted" in w.tool_calls[2]["observation"] and "tool" in res.exhausted
    assert res.order == [0, 1, 2, 3] and "appended missing [2, 3, 4]" in w.repairs


def test_malformed_call_in_the_loop_gets_an_error_observation(env):
    res, _ = run(env, "<tool_call>{oops</tool_call><answer>[2, 1]</answer>")
    w = res.windows[0]
    assert w.tool_calls[0]["ok"] is False and "Invalid tool call" in w.text
    assert res.order == [1, 0, 2, 3]


def test_listwise_answer_repaired_and_garbage_flagged(env):
    res, _ = run(env, "<answer>[4, 4, 9]</answer>")
    assert res.order == [3, 0, 1, 2] and "dropped duplicate 4" in res.windows[0].repairs
    res, _ = run(env, "<answer>the second one</answer>")
    assert res.windows[0].fallback == "invalid_answer" and res.order == [0, 1, 2, 3]


def test_forced_listwise_answer_is_a_valid_permutation(env):
    res, _ = run(env, "la " * 100, budget=Budget(think=5))
    w = res.windows[0]
    assert w.forced and sorted(w.ranking) == [0, 1, 2, 3] and "forced" in w.repairs[0]


def test_windows_merge_listwise_rankings_back_to_front(env):
    # K=6, window 4, stride 2 -> starts [2, 0]; the model always answers [2, 1] (then repaired: + 3, 4)
    res, _ = run(env, "<answer>[2, 1]</answer>", n=6, window=4, stride=2)
    # [0..5] -> window@2 [2,3,4,5] -> [3,2,4,5] -> [0,1,3,2,4,5] -> window@0 [0,1,3,2] -> [1,0,3,2] -> [1,0,3,2,4,5]
    assert res.order == [1, 0, 3, 2, 4, 5]


def test_tools_without_an_image_encoder_are_refused_politely(env):
    res, _ = run(env, f"<tool_call>{call('select_images', target_images=[1])}</tool_call><answer>[1]</answer>",
                 encoder=None)
    assert "not available" in res.windows[0].tool_calls[0]["observation"] and res.usage.tool == 0
