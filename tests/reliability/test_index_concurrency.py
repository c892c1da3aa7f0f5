"""Searches while a writer adds and deletes: nothing raises, nothing is lost, nothing comes back from the dead.

Each searcher records which generation it searched and which dids it got back; the writer's plan says which dids
were live in each generation, so a phantom (a label visible before its row) or a resurrected did is caught, not just
an exception. Within one process (threads sharing one `Index`) and across processes (a writer process, searching
threads in this one picking up its commits).
"""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from retrv.runtime.errors import InputError
from retrv.runtime.index.store import Index

from index_worker import FakeEncoder, plan_churn, rows, vector

WORKER = Path(__file__).with_name("index_worker.py")
N_CHURN = 1000  # candidates the writer adds; it deletes half of them along the way


def _live_by_generation(initial: set[str], n: int) -> dict[int, set[str]]:
    live, out = set(initial), {1: set(initial)}
    for gen, (op, arg) in enumerate(plan_churn(n), start=2):
        if op == "add":
            live |= {r["did"] for r in arg}
        else:
            live -= set(arg)
        out[gen] = set(live)
    return out


def _searcher(index: Index, stop: threading.Event, seen: list, errors: list, seed: int) -> None:
    rng = np.random.default_rng(seed)
    try:
        while not stop.is_set():
            snap = index.snapshot()
            did = f"s{rng.integers(0, N_CHURN)}" if rng.random() < 0.7 else f"b{rng.integers(0, 50)}"
            labels, _ = snap.search(vector(did)[None], 10)
            got = []
            for lab in labels[0].tolist():
                got.append(snap.row(lab)["did"])
                snap.cache.tokens(lab)  # the cached tokens of every returned label exist in this generation
                snap.cache.t_con([lab])
            seen.append((snap.generation, got))
            time.sleep(0.002)  # a searcher that never releases the GIL would starve the writer thread
    except Exception as e:  # noqa: BLE001 - every exception is a failure, reported below
        errors.append(e)


def _check(seen: list, live_at: dict[int, set[str]], final: Index, errors: list, name: str) -> None:
    assert seen, "the searchers never ran"
    bad = [(g, d) for g, dids in seen for d in dids if d not in live_at[g]]
    snap = final.snapshot()
    want = live_at[max(live_at)]
    lost, resurrected = want - snap.live_dids(), snap.live_dids() - want
    vecs = np.stack([vector(d) for d in sorted(want)])
    labels, _ = snap.search(vecs, 1)
    missed = [d for d, lab in zip(sorted(want), labels[:, 0].tolist()) if snap.row(lab)["did"] != d]
    added = len({d for live in live_at.values() for d in live} - live_at[1])
    print(f"\n{name}: {len(seen)} searches over {len({g for g, _ in seen})} generations while {added} candidates "
          f"were added and {added - len(want - live_at[1])} deleted; exceptions {len(errors)}, results not live in "
          f"their generation {len(bad)}, lost {len(lost)}, resurrected {len(resurrected)}, not found by their own "
          f"vector {len(missed)}")
    assert not errors, errors[:3]
    assert not bad, f"{len(bad)} results were not live in the generation searched, e.g. {bad[:3]}"
    assert not lost and not resurrected
    assert not missed, f"{len(missed)} live candidates are not found by their own vector: {missed[:5]}"


def test_four_searching_threads_and_a_writer_in_one_process(tmp_path):
    enc = FakeEncoder()
    index = Index.build(enc, rows("b", 0, 50), tmp_path / "ix")
    live_at = _live_by_generation({f"b{i}" for i in range(50)}, N_CHURN)
    stop, seen, errors = threading.Event(), [], []
    threads = [threading.Thread(target=_searcher, args=(index, stop, seen, errors, s)) for s in range(4)]
    for t in threads:
        t.start()
    try:
        for op, arg in plan_churn(N_CHURN):
            index.add(arg, encoder=enc) if op == "add" else index.delete(arg)
    finally:
        stop.set()
        for t in threads:
            t.join()
    _check(seen, live_at, Index.open(tmp_path / "ix"), errors, "4 threads searching, 1 writer, one process")
    assert sorted(p.name for p in (tmp_path / "ix").iterdir() if p.name.startswith("g")) == \
        [f"g{max(live_at) - 1:06d}", f"g{max(live_at):06d}"]  # old generations are removed as it goes


def test_searching_threads_pick_up_another_process_commits(tmp_path):
    index = Index.build(FakeEncoder(), rows("b", 0, 50), tmp_path / "ix")
    n = 300
    live_at = _live_by_generation({f"b{i}" for i in range(50)}, n)
    stop, seen, errors = threading.Event(), [], []
    threads = [threading.Thread(target=_searcher, args=(index, stop, seen, errors, s)) for s in range(4)]
    for t in threads:
        t.start()
    try:
        proc = subprocess.run([sys.executable, str(WORKER), "churn", str(tmp_path / "ix"), str(n)],
                              capture_output=True, text=True, timeout=300)
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert index.snapshot().generation == max(live_at)  # this process's Index picked up the last commit
    assert len({g for g, _ in seen}) > 1  # and searched more than one generation while the writer ran
    _check(seen, live_at, index, errors, "4 threads searching here, 1 writer process")


def test_two_threads_adding_the_same_did_one_wins(tmp_path):
    enc = FakeEncoder()
    index = Index.build(enc, rows("b", 0, 5), tmp_path / "ix")
    results, barrier = [], threading.Barrier(4)

    def adder():
        barrier.wait()
        try:
            results.append(index.add([{"did": "same", "txt": "x"}], encoder=enc))
        except InputError as e:
            results.append(str(e))

    threads = [threading.Thread(target=adder) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum(isinstance(r, int) for r in results) == 1
    assert all("already in the index" in r for r in results if isinstance(r, str))
    reopened = Index.open(tmp_path / "ix")
    assert [r["did"] for r in reopened.rows].count("same") == 1


def test_two_index_objects_in_two_processes_never_lose_an_add(tmp_path):
    """Two writer processes adding disjoint candidates at once: the lock serialises them, both sets land."""
    Index.build(FakeEncoder(), rows("b", 0, 5), tmp_path / "ix")
    procs = [subprocess.Popen([sys.executable, str(WORKER), "add", str(tmp_path / "ix"), str(start), "40", "5"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for start in (0, 1000)]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-2000:]
    live = Index.open(tmp_path / "ix").snapshot().live_dids()
    assert live == {f"b{i}" for i in range(5)} | {f"a{i}" for i in range(40)} | {f"a{i}" for i in range(1000, 1040)}


@pytest.mark.slow
def test_stress_many_rounds(tmp_path):
    for r in range(5):
        test_four_searching_threads_and_a_writer_in_one_process(tmp_path / str(r))
