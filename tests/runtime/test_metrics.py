"""M-BEIR Recall@k, percentiles and per-stage latency summaries, checked against hand-worked values."""

import time

import numpy as np
import pytest

from retrv.runtime.errors import InputError
from retrv.runtime.metrics import LatencyLog, StageTimer, hard_negative_wins, percentiles, recall_at_k


def ranking(first_positive_rank, n=20):
    """Ids c0..c{n-1}, with the positive "p" placed at 1-based `first_positive_rank`."""
    ids = [f"c{i}" for i in range(n)]
    ids[first_positive_rank - 1] = "p"
    return ids


def test_recall_first_positive_at_1_4_12():
    ranked = [ranking(1), ranking(4), ranking(12)]
    out = recall_at_k(ranked, [{"p"}] * 3)
    assert out == {"recall@1": pytest.approx(1 / 3), "recall@5": pytest.approx(2 / 3),
                   "recall@10": pytest.approx(2 / 3), "queries": 3, "skipped": 0}


def test_recall_any_positive_counts_once():
    # Query 0: positives at ranks 3 and 4 -> one hit at k=5, not two, and not 2/3 of its positives.
    # Query 1: of three positives only one is retrieved, at rank 2 -> still a full hit at k=5 (M-BEIR's rule).
    # Query 2: positives never retrieved -> 0 everywhere.
    ranked = [["a", "b", "x", "y", "c"], ["a", "y", "b"], ["a", "b", "c"]]
    positives = [{"x", "y", "z"}, {"y", "u", "v"}, {"q"}]
    out = recall_at_k(ranked, positives, ks=(1, 2, 5))
    assert out["recall@1"] == 0.0
    assert out["recall@2"] == pytest.approx(1 / 3)
    assert out["recall@5"] == pytest.approx(2 / 3)
    assert out["queries"] == 3 and out["skipped"] == 0


def test_recall_skips_queries_without_positives():
    ranked = [ranking(1), ranking(7), ["a", "b"], ranking(2)]
    positives = [{"p"}, ["p"], set(), ("p",)]  # any iterable of ids
    out = recall_at_k(ranked, positives, ks=(1, 5))
    assert out == {"recall@1": pytest.approx(1 / 3), "recall@5": pytest.approx(2 / 3), "queries": 3, "skipped": 1}


def test_recall_short_rankings_and_duplicates():
    # A ranking shorter than k is fine; a positive repeated in a ranking is still one hit.
    out = recall_at_k([["p", "p"], []], [{"p"}, {"p"}], ks=(1, 10))
    assert out["recall@1"] == 0.5 and out["recall@10"] == 0.5


@pytest.mark.parametrize("ranked, positives, ks, match", [
    ([["a"]], [{"a"}, {"b"}], (1,), "one each"),
    ([["a"]], [set()], (1,), "none of the 1 queries has a positive"),
    ([["a"]], [{"a"}], (0,), "ks"),
    ([["a"]], [{"a"}], (), "ks"),
    ([["a"]], ["a"], (1,), "got a string"),
])
def test_recall_refuses_bad_input(ranked, positives, ks, match):
    with pytest.raises(InputError, match=match):
        recall_at_k(ranked, positives, ks)


def test_percentiles_linear():
    # Sorted [1, 2, 3, 4, 10]: p50 at position 2 -> 3; p95 at position 3.8 -> 4 + 0.8 * (10 - 4) = 8.8.
    assert percentiles([10, 1, 4, 2, 3]) == {"p50": 3.0, "p95": pytest.approx(8.8)}
    assert percentiles([5.0], ps=(0, 50, 99.9)) == {"p0": 5.0, "p50": 5.0, "p99.9": 5.0}
    x = np.random.default_rng(0).exponential(size=101)
    assert percentiles(x, ps=(90,))["p90"] == pytest.approx(np.sort(x)[90])


@pytest.mark.parametrize("samples, ps", [([], (50,)), ([1.0, float("nan")], (50,)), ([1.0], (101,)), ([1.0], ())])
def test_percentiles_refuse_bad_input(samples, ps):
    with pytest.raises(InputError):
        percentiles(samples, ps)


def test_latency_log_summary():
    log = LatencyLog()
    log.add({"embed": 1.0, "search": 2.0, "icm": 4.0, "total": 10.0})
    log.add({"embed": 3.0, "search": 2.0, "total": 20.0})  # no ICM stage (V-Retrver)
    log.add({"embed": 2.0, "search": 5.0, "total": 30.0})
    s = log.summary()
    assert list(s) == ["embed", "search", "icm", "total"] and len(log) == 3
    assert s["embed"] == {"n": 3, "mean": 2.0, "p50": 2.0, "p95": pytest.approx(2.9)}
    assert s["icm"] == {"n": 1, "mean": 4.0, "p50": 4.0, "p95": 4.0}
    assert s["total"]["p50"] == 20.0 and s["total"]["p95"] == pytest.approx(29.0)
    assert log.samples("search") == [2.0, 2.0, 5.0]
    with pytest.raises(InputError, match="stage 'decode'"):
        log.samples("decode")
    with pytest.raises(InputError, match="expected a finite time"):
        log.add({"embed": -1.0})
    assert len(log) == 3  # a refused query adds nothing


def test_stage_timer_accumulates_repeated_stages():
    t = StageTimer()
    for _ in range(2):  # e.g. prefill of two sliding windows
        with t("prefill"):
            time.sleep(0.002)
    with t("decode"):
        pass
    assert list(t.timings) == ["prefill", "decode"]
    assert t.timings["prefill"] >= 4.0 and t.timings["decode"] >= 0.0
    log = LatencyLog()
    log.add(t.timings)
    assert log.summary()["prefill"]["n"] == 1


def test_hard_negative_wins_hand_worked():
    ranked = [["n1", "p", "n2"], ["p", "x"], ["x", "y"]]
    positives = [{"p"}, {"p"}, {"p"}]
    negatives = [["n1", "n2"], ["n3"], ["n4"]]
    types = [["position", "colour"], ["position"], ["shape"]]
    out = hard_negative_wins(ranked, positives, negatives, types)
    # q0: n1 beats p, n2 does not; q1: n3 not retrieved, ranks below p; q2: neither retrieved -> no pair.
    assert out["all"] == {"wins": 1 / 3, "pairs": 3}
    assert out["position"] == {"wins": 0.5, "pairs": 2}
    assert out["colour"] == {"wins": 0.0, "pairs": 1}
    assert "shape" not in out
    # A retrieved negative beats a positive that was not retrieved.
    assert hard_negative_wins([["n"]], [{"p"}], [["n"]]) == {"all": {"wins": 1.0, "pairs": 1}}
    # The best-ranked of several positives is the one compared; queries without negatives add nothing.
    assert hard_negative_wins([["a", "n", "b"], ["p"]], [{"a", "b"}, {"p"}], [["n"], []])["all"]["wins"] == 0.0
    assert hard_negative_wins([["x"]], [{"p"}], [["n"]]) == {}


def test_hard_negative_wins_refuses_mismatched_lists():
    with pytest.raises(InputError, match="negatives: got 1 lists for 2 rankings"):
        hard_negative_wins([["a"], ["b"]], [{"a"}, {"b"}], [["n"]])
    with pytest.raises(InputError, match="query 0: got 2 negative types for 1 negatives"):
        hard_negative_wins([["a"]], [{"a"}], [["n"]], [["colour", "shape"]])
    with pytest.raises(InputError, match="named 'all'"):
        hard_negative_wins([["a"]], [{"a"}], [["n"]], [["all"]])
