"""Training: rewards, curriculum, CoT format, prompt parity with the runtime, and one optimizer step per stage."""

from __future__ import annotations

import math
import numpy as np
import pytest
import torch

from retrv.model.loading import load_checkpoint
from retrv.model.tiny import VOCAB_SIZE, write_tiny_checkpoint
from retrv.model.tiny_tokenizer import build_tiny_tokenizer
from retrv.runtime.rerank.answer import parse_index
from retrv.export.torch_backend import TorchBackend
from retrv.runtime.rerank.budget import Budget
from retrv.runtime.inputs.prompt import PromptTokenizer
from retrv.runtime.rerank.loop import Reranker
from retrv.runtime.rerank.prompt import RerankTemplate
from retrv.train import losses
from retrv.train.cot import (
    INSPECT_END,
    INSPECT_START,
    coarse_key,
    cot_events,
    cot_text,
    own_text,
    parse_cot,
    plan_cot,
)
from retrv.train.grpo import Rollout, advantages, policy_loss, rollouts, to_runtime
from retrv.train.probe import token_labels
from retrv.train.rewards import curriculum, format_reward, retrv_reward
from retrv.train.sequences import Item, SequenceBuilder
from retrv.train.scene import Scene, SceneObject

GRID = (1, 8, 8)  # a 112 px image: 8x8 patches, 16 merged tokens


# -- rewards and curriculum -----------------------------------------------------------------------------------------
WELL_FORMED = (f"red: red circle left dot.\n1+ 2- 3+ 4-\n{INSPECT_START}1{INSPECT_END}{INSPECT_START}3{INSPECT_END}"
               "</think><answer>3</answer>")


def test_reward_hand_worked_cases():
    r_f = format_reward(WELL_FORMED)
    assert r_f == 1.0
    assert retrv_reward(r_f, True, 2, 5, 0.5) == pytest.approx(r_f + 0.8)  # 1 - 0.5 * 2 / 5
    assert retrv_reward(r_f, False, 2, 5, 0.5) == r_f  # a wrong answer earns the format reward only
    assert retrv_reward(r_f, True, 0, 5, 1.0) == pytest.approx(2.0)
    assert retrv_reward(r_f, True, 5, 5, 1.0) == pytest.approx(1.0)
    with pytest.raises(ValueError):
        retrv_reward(1.0, True, 1, 0, 0.5)


@pytest.mark.parametrize("text", [
    "no answer at all",
    "reasoning <answer>3</answer>",  # think block never closed
    "reasoning </think><answer>three</answer>",  # answer not an index
    f"reasoning {INSPECT_START}x{INSPECT_END}</think><answer>3</answer>",  # inspection index not an index
    f"reasoning {INSPECT_START}2</think><answer>3</answer>",  # inspection never closed
    "reasoning </think><answer>3</answer> and more",  # text after the answer
    "<think>reasoning</think><answer>3</answer>",  # a stray tag in the free text
])
def test_malformed_reasoning_gets_format_zero(text):
    assert format_reward(text) == 0.0
    assert retrv_reward(format_reward(text), False, 0, 5, 0.5) == 0.0


def test_curriculum_goes_from_zero_to_one_monotonically():
    n = 37
    lams = [curriculum(i, n) for i in range(n + 1)]
    assert lams[0] == 0.0 and lams[-1] == 1.0
    assert all(a < b for a, b in zip(lams, lams[1:]))
    with pytest.raises(ValueError):
        curriculum(n + 1, n)


# -- chain of thought -----------------------------------------------------------------------------------------------
def _scene(colour="red", shape="circle", position="left", detail="dot", background="grey") -> Scene:
    return Scene(background, (SceneObject(shape, colour, position, detail),
                              SceneObject("star", "blue", "right")))


def _window() -> tuple[Scene, list[Scene]]:
    target = _scene()
    window = [_scene(detail="ring"), _scene(colour="green"), target, _scene(detail="slash"),
              _scene(position="top"), _scene(shape="square"), _scene(background="beige")]
    return target, window


def test_cot_has_four_phases_and_parses_back_through_the_runtime():
    target, window = _window()
    plan = plan_cot(target, window, answer=3)
    assert plan.drop == (2, 6, 7)  # everything that differs in what compressed tokens carry (colour, shape, bg)
    assert plan.inspect == (1, 3)  # look-alikes in coarse order, up to and including the target
    text = cot_text(cot_events(plan), shown=lambda i: f"<tokens of {i}>")
    imagine, rest = text.split("\n", 1)
    assert imagine == "grey: red circle left dot, blue star right."  # (1) the ideal result
    assert rest.startswith("1+ 2- 3+ 4+ 5+ 6- 7-\n")  # (2) eliminate: a verdict per candidate
    assert plan.keep == (True, False, True, True, True, False, False)
    assert text.count(INSPECT_START) == text.count(INSPECT_END) == 2  # (3) inspect, markup well formed
    assert "\n[1] <tokens of 1>\n" in text and "\n[3] <tokens of 3>\n" in text  # RerankTemplate.inspected_prefix
    # after each inspection: what the full tokens show, in phase 1's words, and whether it is the one
    assert "<tokens of 1>\ngrey: red circle left ring, blue star right. no\n" in text
    assert "<tokens of 3>\ngrey: red circle left dot, blue star right. yes\n" in text
    assert text.endswith("</think><answer>3</answer>")  # (4) answer
    inspected, answer = parse_cot(text)
    assert inspected == [1, 3] and answer == 3 == plan.answer
    assert parse_index(text.split("<answer>")[1].split("</answer>")[0]) == 3
    assert format_reward(own_text(cot_events(plan))) == 1.0  # the model's own tokens earn the format reward
    assert format_reward(own_text(cot_events(plan, inspect_budget=0))) == 1.0


def test_cot_under_an_exhausted_inspection_budget_answers_without_looking():
    target, window = _window()
    plan = plan_cot(target, window, answer=3)
    events = cot_events(plan, inspect_budget=0)
    assert events[1] == ("inspect", 1, False) and events[-1][1].endswith("<answer>3</answer>")
    assert RerankTemplate().marker_inspect_budget in cot_text(events)
    alone = plan_cot(target, [target, _scene(colour="green")], answer=1)
    assert alone.inspect == () and alone.drop == (2,)  # the only survivor needs no inspection


def test_cot_plan_refuses_a_wrong_answer_index():
    target, window = _window()
    with pytest.raises(ValueError):
        plan_cot(target, window, answer=1)
    assert coarse_key(window[0]) == coarse_key(target) == coarse_key(window[4]) != coarse_key(window[1])


# -- a tiny random checkpoint ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    torch.manual_seed(0)
    ckpt = write_tiny_checkpoint(tmp_path_factory.mktemp("train") / "ckpt", icm=True, seed=0)
    model = load_checkpoint(ckpt).train()
    tok = PromptTokenizer.from_tokenizer(build_tiny_tokenizer(VOCAB_SIZE)[0])
    return model, tok


def _items(h: int, n: int, seed: int) -> list[Item]:
    gen = torch.Generator().manual_seed(seed)
    return [Item(None, torch.randn(16, h, generator=gen), GRID, f"d{i}") for i in range(n)]


def _snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _one_step_lowers(model, params, loss_fn, lr=1e-3) -> tuple[float, float]:
    state = _snapshot(model)
    opt = torch.optim.Adam([p for p in params if p.requires_grad], lr=lr)
    before = loss_fn()
    opt.zero_grad()
    before.backward()
    opt.step()
    with torch.no_grad():
        after = loss_fn()
    model.load_state_dict(state)
    return float(before.detach()), float(after)


def test_training_prompt_is_the_runtime_prompt_and_replays_its_logits(tiny):
    model, tok = tiny
    sb = SequenceBuilder(model, tok)
    h = model.cfg.text.hidden_size
    query, cands = Item("a red circle", _items(h, 1, 1)[0].tokens, GRID), _items(h, 4, 2)
    with torch.no_grad():
        icm = losses.icm_tokens(sb, query, cands)
        seq = sb.rerank(query, cands, icm, [])
    table = model.language_model.embed_tokens.weight.detach().numpy()
    rr = Reranker(TorchBackend(model), tok, model.cfg, table, temperature=1.0, seed=0, record=True)
    q_in, c_in = to_runtime(query, cands)
    trace = rr.rerank(q_in, c_in, Budget(think=24), window=4, stride=4).windows[0]
    ids, embeds, pos = trace.chunks[0]
    assert seq.chunks[0].ids == ids and np.array_equal(seq.chunks[0].pos, pos[:, 0])
    slots = [j for j, i in enumerate(ids) if i == sb.pb.slot_id]
    np.testing.assert_allclose(embeds[slots], icm.reshape(-1, h).numpy(), atol=1e-5)
    # every action's log-probability, replayed from the recorded feeds, is the runtime's own distribution
    steps = []
    backend = TorchBackend(model)
    state = backend.start(1)
    for c_ids, c_emb, c_pos in trace.chunks:
        steps.append((len(c_ids), backend.step(state, c_emb[None], c_pos, np.ones((1, len(c_ids)), np.int64))[0]))
    fed, by_count = 0, {}
    for n, logits in steps:
        fed += n
        by_count[fed] = logits
    replay = sb.from_trace(trace.chunks)
    with torch.no_grad():
        hidden, _ = sb.forward([replay])
        logits = model.lm_head(hidden[0]).numpy()
    model.train()
    for fed, _tok in trace.actions:
        np.testing.assert_allclose(logits[fed - 1], by_count[fed], atol=1e-4)


def test_embedder_step_lowers_infonce(tiny):
    model, tok = tiny
    sb = SequenceBuilder(model, tok)
    h = model.cfg.text.hidden_size
    cands = {c.did: c for c in _items(h, 6, 3)}
    queries = [Item("a red circle"), Item("a blue star"), Item("make it green", _items(h, 1, 4)[0].tokens, GRID)]

    def loss():
        return losses.info_nce(sb, queries, ["d0", "d1", "d2"], [["d3", "d4"], ["d5"], ["d3"]], cands.__getitem__)

    before, after = _one_step_lowers(model, model.parameters(), loss)
    assert after < before


def _sft_batch(sb, h, icm: bool):
    target, window = _window()
    plan = plan_cot(target, window[:5], answer=3)
    seqs = []
    for n, budget in enumerate((None, 0)):
        query, cands = Item("a red circle with a dot", None, None), _items(h, 5, 10 + n)
        tokens = losses.icm_tokens(sb, query, cands) if icm else None
        seqs.append(sb.rerank(query, cands, tokens, cot_events(plan, budget)))
    return seqs


def test_sft_step_lowers_the_cot_loss_on_own_tokens_only(tiny):
    model, tok = tiny
    sb = SequenceBuilder(model, tok)
    h = model.cfg.text.hidden_size
    seqs = _sft_batch(sb, h, icm=True)
    own_text = tok.decode([i for s in seqs[:1] for i, o in zip(s.ids, s.own) if o])
    assert own_text.startswith("grey: red circle") and "<|image_pad|>" not in own_text  # appends are not targets
    assert own_text.count(INSPECT_END) == 2
    before, after = _one_step_lowers(model, model.parameters(), lambda: losses.rerank_loss(sb, _sft_batch(sb, h, True)))
    assert after < before


def test_icm_alignment_step_lowers_kl_with_the_lm_frozen(tiny):
    model, tok = tiny
    sb = SequenceBuilder(model, tok)
    h = model.cfg.text.hidden_size
    target, window = _window()
    plan = plan_cot(target, window[:5], answer=3)
    events = cot_events(plan.__class__(plan.ideal, plan.drop, (), plan.answer, plan.size))
    query, cands = Item("a red circle", None, None), _items(h, 5, 20)

    def loss():
        teacher = [sb.rerank(query, cands, None, events)]
        student = [sb.rerank(query, cands, losses.icm_tokens(sb, query, cands), events)]
        return losses.align_loss(sb, teacher, student)

    lm_before = {k: v.clone() for k, v in model.language_model.state_dict().items()}
    before, after = _one_step_lowers(model, model.icm.parameters(), loss, lr=1e-4)
    assert after < before
    assert all(torch.equal(v, lm_before[k]) for k, v in model.language_model.state_dict().items())


def test_grpo_rollouts_use_the_runtime_and_a_step_raises_advantaged_actions(tiny):
    model, tok = tiny
    sb = SequenceBuilder(model, tok)
    h = model.cfg.text.hidden_size
    query, cands = Item("a red circle", None, None), _items(h, 4, 30)
    group = rollouts(sb, query, cands, answer=2, group=4, lam=0.5, temperature=1.0, seed=0, budget=Budget(think=12))
    assert len(group) == 4 and all(r.trace.actions for r in group)
    assert all(r.reward == retrv_reward(r.format_ok, r.correct, r.inspected, 4, 0.5) for r in group)
    adv = advantages([1.0, 0.0, 2.0, 1.0])
    assert adv.mean() == pytest.approx(0.0) and adv[2] > adv[0] > adv[1]
    assert not advantages([1.0, 1.0]).any()  # a group that agrees carries no signal
    batch = [(r, a) for r, a in zip(group, (1.0, -1.0, 1.0, -1.0))]
    before, after = _one_step_lowers(model, model.parameters(), lambda: policy_loss(sb, batch, 1.0))
    assert after < before


def test_grpo_loss_is_zero_without_signal(tiny):
    model, tok = tiny
    sb = SequenceBuilder(model, tok)
    dummy = Rollout(trace=None, text="", reward=0.0, correct=False, inspected=0, format_ok=0.0)
    assert float(policy_loss(sb, [(dummy, 0.0)], 1.0).detach()) == 0.0


def test_vision_probe_labels_the_tokens_under_each_object():
    scene = Scene("grey", (SceneObject("circle", "red", "left", "ring"), SceneObject("star", "blue", "right")))
    labels = token_labels(scene, GRID).reshape(4, 4, 4)  # (row, col, [background, colour, shape, detail])
    assert (labels[..., 0] == 1).all()  # grey everywhere
    assert set(labels[1:3, 0, 1].ravel()) == {1} and set(labels[1:3, 3, 1].ravel()) == {5}  # red left, blue right
    assert (labels[0, :, 1] == 0).all() and (labels[3, :, 1] == 0).all()  # top and bottom rows: no object
    assert set(labels[1:3, 0, 3].ravel()) == {3} and set(labels[1:3, 3, 3].ravel()) == {0}  # ring / no mark
    assert (labels[0, :, 3] == -100).all()  # no detail label away from an object's middle
    with_pos = token_labels(scene, GRID, position=True).reshape(4, 4, 5)
    assert (with_pos[..., :4] == labels).all()  # the first four columns do not change
    assert set(with_pos[1:3, 0, 4].ravel()) == {1} and set(with_pos[1:3, 3, 4].ravel()) == {5}  # left, right
    assert (with_pos[0, :, 4] == 0).all()  # no object: class 0


def test_vision_probe_with_positions_has_a_fifth_head_and_refuses_mismatched_labels():
    from retrv.train.probe import VisionProbe

    scene = Scene("grey", (SceneObject("circle", "red", "left", "ring"),))
    tokens = torch.randn(16, 8)
    assert float(VisionProbe(8, position=True)(tokens, torch.from_numpy(token_labels(scene, GRID, position=True)))) > 0
    with pytest.raises(ValueError, match="got 4 columns; expected 5"):
        VisionProbe(8, position=True)(tokens, torch.from_numpy(token_labels(scene, GRID)))


def test_schedule_is_a_function_of_the_budget_only():
    from retrv.train.run import schedule_for

    a, b, short = schedule_for(50), schedule_for(50), schedule_for(20)
    assert a == b  # no clock involved: the same minutes give the same steps
    for stage in ("vision", "pretrain", "sft_full", "align", "sft_icm", "grpo"):
        assert getattr(short, stage).steps < getattr(a, stage).steps


def test_per_task_results_combine_into_query_weighted_means():
    from retrv.train.evaluation import combine

    def part(n, r1, tokens):
        return {"queries": n, "coarse": {"recall@1": r1}, "reranked": {"recall@1": r1 + 0.1},
                "tokens_per_query": {"total_tokens": tokens}, "fallback_rate": 0.0, "forced_rate": 0.0,
                "latency_ms_p50": {"total": 1.0}}

    out = combine([part(100, 0.2, 200.0), part(300, 0.6, 100.0)])
    assert out["queries"] == 400
    assert out["coarse"]["recall@1"] == pytest.approx(0.5) and out["reranked"]["recall@1"] == pytest.approx(0.6)
    assert out["tokens_per_query"]["total_tokens"] == pytest.approx(125.0)


def test_hard_negative_figures_combine_weighted_by_pairs():
    from retrv.train.evaluation import combine

    def part(n, wins):
        return {"queries": n, "coarse": {"recall@1": 0.5}, "latency_ms_p50": {"total": 1.0},
                "hard_negatives": {"coarse": {"all": {"wins": wins, "pairs": 2 * n}, "shape": {"wins": wins,
                                                                                              "pairs": n}}}}

    out = combine([part(100, 0.2), part(300, 0.6)])
    assert out["hard_negatives"]["coarse"]["all"] == {"wins": pytest.approx(0.5), "pairs": 800}
    assert out["hard_negatives"]["coarse"]["shape"] == {"wins": pytest.approx(0.5), "pairs": 400}


def test_shipped_checkpoint_loads_and_says_how_it_was_made():
    from pathlib import Path

    root = Path(__file__).resolve().parents[2] / "model" / "default"
    if not (root / "config.json").exists():
        pytest.skip("model/default has not been trained yet (python -m retrv.train.run model/default)")
    model = load_checkpoint(root)
    assert model.icm is not None and model.cfg.tokens.inspection_start_token_id is not None
    card = (root / "CARD.md").read_text()
    assert "python -m retrv.train.run model/default" in card and "Flickr8k" in card
    assert sum(p.stat().st_size for p in root.glob("*.safetensors")) < 20e6  # a few MB


def test_relevance_read_out_hand_worked_and_one_step_lowers_it():
    head = losses.RelevanceHead(4)
    torch.nn.init.zeros_(head.score.weight)
    torch.nn.init.zeros_(head.score.bias)
    icm = [torch.randn(5, 2, 4), torch.randn(3, 2, 4)]
    answers, keeps = [2, 1], [(True, True, False, False, True), (True, False, False)]
    loss = head(icm, answers, keeps)  # every score 0: listwise CE ln K, binary CE ln 2 per candidate
    assert float(loss) == pytest.approx(((math.log(5) + math.log(2)) + (math.log(3) + math.log(2))) / 2, rel=1e-6)
    opt = torch.optim.SGD(head.parameters(), lr=0.5)
    opt.zero_grad()
    loss.backward()
    opt.step()
    assert float(head(icm, answers, keeps)) < float(loss)


def test_cot_inspecting_in_coarse_order_covers_every_candidate_up_to_the_target():
    target, window = _window()
    plan = plan_cot(target, window, answer=3, order="coarse")
    assert plan.inspect == (1, 2, 3) and plan.drop == (2, 6, 7)  # candidate 2 is dropped and still inspected
    assert [s.endswith(".") for s in plan.seen] == [True] * 3
    with pytest.raises(ValueError):
        plan_cot(target, window, answer=3, order="random")


def test_shares_and_the_reproducing_command():
    import argparse

    from retrv.train.run import SHARES, parse_shares, reproduce_command

    shares = parse_shares("pretrain=0.25,sft_icm=0.47,grpo=0.05")
    assert shares["sft_icm"] == 0.47 and shares["vision"] == SHARES["vision"]
    assert parse_shares("") == SHARES
    for bad in ("pretrain=0.5", "warmup=0.1", "grpo=0"):
        with pytest.raises(ValueError, match="--shares"):
            parse_shares(bad)
    args = argparse.Namespace(minutes=45.0, seed=0, max_objects=2, inspect_order="coarse", window_block=0,
                              probe_position=False, shares=shares)
    assert reproduce_command(args) == ("python -m retrv.train.run model/default --minutes 45 --seed 0 --max-objects 2 "
                                       "--inspect-order coarse --shares pretrain=0.25,sft_icm=0.47,grpo=0.05")
    args.window_block = 200
    from retrv.train.run import main
    with pytest.raises(SystemExit):  # argparse refuses a negative block before anything runs
        main(["unused-out", "--window-block", "-1"])
    assert reproduce_command(args).endswith("--inspect-order coarse --window-block 200 --shares "
                                            "pretrain=0.25,sft_icm=0.47,grpo=0.05")
    args.probe_position = True
    assert "--window-block 200 --probe-position --shares" in reproduce_command(args)


def test_block_windows_rank_each_training_query_among_its_block_only(tmp_path):
    from retrv.train.data import load_split
    from retrv.train.examples import block_mask, build_windows, top1_rate
    from retrv.train.synth import generate_dataset

    generate_dataset(tmp_path, seed=3, n_train=8, n_val=2, n_test=2, max_objects=1)
    split = load_split(tmp_path, "train")
    assert block_mask(split, 0, 0) is None and block_mask(split, 8, 0) is None  # one block: the whole corpus
    with pytest.raises(ValueError, match="window block"):
        block_mask(split, -1, 0)
    mask = block_mask(split, 2, 0)
    group = {d: split.scenes[d].group for d in split.dids}
    for q, row in zip(split.queries, mask):
        mates = {g for q2, r2 in zip(split.queries, mask) if (r2 == row).all() for g in [q2.pos_cand_list[0]]}
        assert len(mates) == 2  # two targets per block, and the block holds every image drawn for them
        assert {d for d, m in zip(split.dids, row) if m} == {d for d in split.dids if group[d] in mates}
    rng = np.random.default_rng(0)
    targets = sorted({q.pos_cand_list[0] for q in split.queries})
    base = {t: rng.normal(size=8) for t in targets}
    qv = np.stack([base[q.pos_cand_list[0]] for q in split.queries])
    cv = rng.normal(size=(len(split.dids), 8)) * 0.1
    for t in targets:
        cv[split.dids.index(t)] = base[t] * 10  # every target is its queries' best candidate...
    intruder = next(i for i, d in enumerate(split.dids) if d not in targets)
    cv[intruder] = qv.sum(axis=0) * 1e3  # ...except for one candidate that outranks everything, for every query
    assert top1_rate(qv, cv, split) == 0.0  # ranked against the whole corpus, the intruder always wins
    inside = mask[:, intruder]
    assert top1_rate(qv, cv, split, mask=mask) == pytest.approx(1 - inside.mean())  # only in its own block
    wins = build_windows(split, qv, cv, 10, 0.0, 0, mask=mask)
    assert len(wins) == len(split.queries)
    for w in wins:
        row = mask[split.queries.index(w.query)]
        assert all(row[split.dids.index(d)] for d in w.dids)  # never a candidate from another block
        assert w.answer == (2 if row[intruder] else 1)


def test_card_leads_with_whether_the_reranker_beats_its_coarse_stage():
    from retrv.train.card import status

    def record(coarse, no_insp, insp):
        r = lambda x: {"recall@1": x, "recall@5": 0.7, "recall@10": 0.9}  # noqa: E731
        return {"evaluation": {"synthetic": {"with_inspection": {"all": {"coarse": r(coarse), "reranked": r(insp)}},
                                             "without_inspection": {"all": {"reranked": r(no_insp)}}}}}

    assert len(status(record(0.18, 0.25, 0.30))) == 1  # the method's claims hold: no warning
    for bad in (record(0.178, 0.172, 0.09), record(0.30, 0.20, 0.25)):
        text = " ".join(status(bad))
        assert "its reranker does not yet improve on it" in text and "test R@1" in text
    assert "R@1 17.2 without inspection, 9.0 with" in " ".join(status(record(0.178, 0.172, 0.09)))
    text = " ".join(status(record(0.18, 0.30, 0.25)))  # reranking helps, inspection does not
    assert "reranking improves on it, but details inspection does not" in text and "does not yet" not in text


def test_card_tabulates_which_look_alike_outranks_the_target():
    from retrv.train.card import hard_negative_table

    def stage(position):
        return {"all": {"wins": 0.1, "pairs": 40}, "position": {"wins": position, "pairs": 10},
                "colour": {"wins": 0.0, "pairs": 10}}

    res = {"with_inspection": {"all": {"hard_negatives": {"coarse": stage(0.45), "reranked": stage(0.3)}}},
           "without_inspection": {"all": {"hard_negatives": {"coarse": stage(0.45), "reranked": stage(0.5)}}}}
    rows = hard_negative_table(res)
    assert rows[2] == "| any attribute | 40 | 10.0 | 10.0 | 10.0 |"
    assert rows[3] == "| colour | 10 | 0.0 | 0.0 | 0.0 |"
    assert rows[4] == "| position | 10 | 45.0 | 50.0 | 30.0 |"
    del res["without_inspection"]["all"]["hard_negatives"]
    assert hard_negative_table(res) == []  # a record from before the figure existed: no table, no error


def test_a_missing_flickr_folder_is_refused_before_any_training(tmp_path, capsys):
    from retrv.train.run import main

    with pytest.raises(SystemExit) as e:
        main([str(tmp_path / "out"), "--flickr", str(tmp_path / "nowhere")])
    assert e.value.code == 2
    assert "--flickr: " in capsys.readouterr().err and not (tmp_path / "out").exists()


def test_probe_position_reaches_the_vision_stage(tiny, tmp_path):
    from dataclasses import replace

    from retrv.runtime.inputs.preprocess import ImageProcessorConfig
    from retrv.train.checkpoint import MAX_PIXELS, MIN_PIXELS
    from retrv.train.data import ImageBank, load_split
    from retrv.train.run import schedule_for
    from retrv.train.stages import StageConfig, Trainer
    from retrv.train.synth import generate_dataset

    import copy

    model, tok = copy.deepcopy(tiny[0]), tiny[1]  # the vision step trains the tower: keep the shared fixture as is
    generate_dataset(tmp_path, seed=3, n_train=2, n_val=1, n_test=0, max_objects=1)
    train, val = load_split(tmp_path, "train"), load_split(tmp_path, "val")
    bank = ImageBank(ImageProcessorConfig(min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS))
    bank.add_split(train)
    vision = StageConfig(1, lr=1e-3, batch=2, embed_batch=0, warmup=1)
    for position, heads in ((False, 4), (True, 5)):
        schedule = replace(schedule_for(45), vision=vision, probe_position=position)
        trainer = Trainer(model, tok, train, val, bank, schedule, 0, report=lambda msg: None)
        trainer.pretrain_vision()  # the probe refuses labels whose column count differs from its heads
        assert len(trainer.probe.heads) == heads
