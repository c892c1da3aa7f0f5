"""bench/serve.py's report (its section of docs/BENCHMARKS.md and the two plots) from a small result, and the page
keeping that section when bench/run_all.py rewrites it. The load run itself needs the embedded default and
minutes: it is run by hand (`python bench/serve.py --quick`)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

pytest.importorskip("matplotlib")

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture()
def bench_modules():
    sys.path.insert(0, str(REPO / "bench"))
    try:
        import markdown_doc
        import serve

        yield serve, markdown_doc
    finally:
        sys.path.remove(str(REPO / "bench"))


def _row(c, p50, deadline=None):
    row = {"concurrency": c, "seconds": 3.0, "sent": 10, "ok": 9, "refused": 1, "errors": 0, "throughput_rps": 3.0,
           "p50": p50, "p95": p50 * 1.5, "p99": p50 * 1.6}
    if deadline:
        row.update(deadline_ms=deadline, within_deadline=0.9, reranked=0.5)
    return row


def _result():
    rows = {s: [_row(c, 100.0 * c) for c in (1, 4)] for s in ("rerank10", "rerank20", "search50")}
    rows["deadline"] = [_row(c, 80.0, deadline=150.0) for c in (1, 4)]
    cfg = {"rows": rows, "metrics_requests_total": 42.0}
    machine = {"cores": 2, "cpu": "test", "loadavg": [1.0, 1.0, 1.0], "time": "now"}
    return {"machine": machine, "machine_after": machine, "seconds_per_point": 3.0, "backoff_s": 0.1,
            "configs": {"1x2": {"workers": 1, "threads": 2, **cfg}, "2x1": {"workers": 2, "threads": 1, **cfg}},
            "in_process": {"rerank20": {"n": 3, "p50": 50.0}}, "in_process_1thread": {"rerank20": {"n": 3, "p50": 25.0}}}


def test_the_section_and_plots_come_from_the_result(bench_modules, tmp_path):
    serve, _ = bench_modules
    text = serve.section(_result())
    assert "| 2x1 (2 workers x 1 thread) | rerank20 | 4 | 3.00 | 400 | 600 | 640 | 1 | 0 |" in text
    assert "| 1x2 | 1 | 150 | 9 | 80 | 120 | 90% | 50% | 1 |" in text
    assert "| rerank20 | 50 | 25 | 100 (2.00x) | 100 (4.00x) |" in text  # each server against its thread count
    assert "shared with other engineers' jobs" in text
    paths = serve.plot(_result(), tmp_path)
    assert [p.name for p in paths] == ["serve_throughput.png", "serve_deadline.png"] and all(p.stat().st_size for p in paths)


def test_the_page_keeps_the_section_when_it_is_rewritten(bench_modules, tmp_path):
    _, markdown_doc = bench_modules
    page = tmp_path / "B.md"
    page.write_text("# Benchmarks\nold body\n")
    markdown_doc.splice_section(page, "serve", "## retrv serve\nfirst")
    markdown_doc.splice_section(page, "serve", "## retrv serve\nsecond")  # replaced, not appended twice
    assert page.read_text().count("## retrv serve") == 1 and "second" in page.read_text()
    kept = markdown_doc.kept_sections(page)
    assert kept.startswith("<!-- section serve: begin -->") and kept.endswith("<!-- section serve: end -->")
    assert "old body" not in kept
