"""bench/e2e.py's pinned protocol: the flags' defaults ARE the protocol, a run records whether it followed it, and
the interleaved runner reads the machine load before each configuration runs each query."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def bench():
    sys.path.insert(0, str(REPO / "bench"))
    try:
        import _common
        import e2e

        yield e2e, _common
    finally:
        sys.path.remove(str(REPO / "bench"))


def test_no_flags_is_the_pinned_protocol(bench):
    e2e, _ = bench
    rec = e2e.protocol_record(e2e.parse([]))
    assert rec["followed"] and rec["deviations"] == {}
    assert rec["this_run"] == rec["pinned"]
    assert rec["pinned"]["ks"] == [50] and rec["pinned"]["queries"] >= 20 and rec["pinned"]["preset"] == "mid"


def test_a_run_off_the_protocol_says_where(bench):
    e2e, _ = bench
    rec = e2e.protocol_record(e2e.parse(["--queries", "3", "--threads", "2"]))
    assert not rec["followed"]
    assert rec["deviations"] == {"queries": {"protocol": 20, "this_run": 3}, "threads": {"protocol": 1, "this_run": 2}}


def test_both_baselines_are_configured(bench):
    e2e, _ = bench
    s = e2e.specs(["transformers", "transformers-sdpa"], Path("ckpt"), {}, {"fp32": Path("ix")}, Path("c"), 1, True)
    assert (s["transformers"]["attn"], s["transformers-sdpa"]["attn"]) == ("eager", "sdpa")


class _Worker:
    error = None

    def __init__(self, name: str, calls: list, spans: list) -> None:
        self.name, self.calls, self.spans = name, calls, spans

    def call(self, q: dict) -> dict:
        self.calls.append((q["i"], self.name))
        self.spans.append((time.perf_counter(), time.perf_counter()))
        return {"i": q["i"]}


def test_interleaved_queries_with_the_load_read_before_each_configuration(bench):
    _, common = bench
    calls: list = []
    spans: list = []
    workers = {n: _Worker(n, calls, spans) for n in ("a", "b", "c")}
    loads: list = []
    lines: list = []
    out = common.run_interleaved(workers, [{"i": i} for i in range(3)], [], {}, loads=loads, log=lines.append,
                                 settle_s=0.02)
    assert min(start - end for (start, _), (_, end) in zip(spans[1:], spans)) >= 0.02  # the settle pause
    assert [i for i, _ in calls] == [0, 0, 0, 1, 1, 1, 2, 2, 2]  # every configuration before the next query
    assert [n for _, n in calls[:3]] == ["a", "b", "c"] and [n for _, n in calls[3:6]] == ["b", "c", "a"]
    assert len(loads) == 3 and all(set(row) == {"a", "b", "c"} for row in loads)
    assert all(isinstance(v, float) for row in loads for v in row.values())
    assert len(lines) == 3 and "1-min load before each" in lines[0]
    assert {n: len(r) for n, r in out.items()} == {"a": 3, "b": 3, "c": 3}
