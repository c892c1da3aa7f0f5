"""kill -9 during `Index.build` / `add` / `delete`, at many moments: the old or a newer complete index opens, never
neither, and the next write cleans up and succeeds.

The worker (index_worker.py) runs a sequence of operations whose every intermediate state is known; after the kill
the index must be exactly one of those states. Kill moments are spread evenly over the operations phase of an
uninterrupted run (measured first), so they land in encoding, the token-cache append, the ANN and rows writes, the
fsyncs and the commit.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from retrv.runtime.errors import IndexFileError
from retrv.runtime.index.store import Index

from index_worker import FakeEncoder, rows

WORKER = Path(__file__).with_name("index_worker.py")
BASE = 30  # candidates in the index before the killed operation


def _states(cmd: str, n: int, batch: int, base_n: int) -> list[set[str]]:
    base = {f"b{i}" for i in range(base_n)}
    if cmd == "build":
        return [{f"b{i}" for i in range(n)}]
    out = [set(base)]
    for lo in range(0, n, batch):
        if cmd == "add":
            out.append(out[-1] | {f"a{i}" for i in range(lo, min(lo + batch, n))})
        else:
            out.append(out[-1] - {f"b{i}" for i in range(lo, min(lo + batch, n))})
    return out


def _run(args: list[str], kill_after: float | None) -> tuple[float, bool]:
    """Start the worker; after 'ready', kill it `kill_after` seconds later (None: let it finish). Returns the
    operations phase's duration and whether it was killed before finishing."""
    p = subprocess.Popen([sys.executable, str(WORKER), *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True)
    assert p.stdout.readline().strip() == "ready"
    t0 = time.perf_counter()
    if kill_after is None:
        _, err = p.communicate(timeout=120)
        assert p.returncode == 0, err[-2000:]
        return time.perf_counter() - t0, False
    try:
        p.wait(timeout=kill_after)
    except subprocess.TimeoutExpired:
        p.send_signal(signal.SIGKILL)
    p.communicate(timeout=60)
    return time.perf_counter() - t0, p.returncode == -signal.SIGKILL


def _fresh(tmp: Path, cmd: str, base_n: int) -> Path:
    path = tmp / "ix"
    if cmd != "build":
        Index.build(FakeEncoder(), rows("b", 0, base_n), path)
    return path


def kill_campaign(tmp: Path, cmd: str, moments: int, n: int = 24, batch: int = 4) -> dict:
    args = [n] if cmd == "build" else [0, n, batch]
    base_n = max(BASE, n)  # delete removes b0..b(n-1): they must exist
    states = _states(cmd, n, batch, base_n)
    probe = tmp / "probe"
    probe.mkdir()
    duration, _ = _run([cmd, str(_fresh(probe, cmd, base_n)), *map(str, args)], None)
    counts = {"moments": 0, "killed": 0, "old": 0, "new": 0, "intermediate": 0, "neither": 0}
    for i in range(moments):
        work = tmp / f"m{i}"
        work.mkdir()
        path = _fresh(work, cmd, base_n)
        if cmd == "build":  # rebuild over an existing index: the old one must survive a kill
            Index.build(FakeEncoder(), rows("b", 0, base_n + 5), path)
            states = [{f"b{i}" for i in range(base_n + 5)}, {f"b{i}" for i in range(n)}]
        _, killed = _run([cmd, str(path), *map(str, args)], duration * (i + 0.5) / moments * 0.9)
        counts["moments"] += 1
        counts["killed"] += killed
        try:
            live = Index.open(path).snapshot().live_dids()
        except IndexFileError as e:
            counts["neither"] += 1
            pytest.fail(f"{cmd} killed at {i}/{moments}: the index no longer opens: {e}")
        if live not in states:
            counts["neither"] += 1
            pytest.fail(f"{cmd} killed at {i}/{moments}: {len(live)} live candidates match no state the "
                        f"operation passes through")
        j = states.index(live)
        counts["old" if j == 0 else "new" if j == len(states) - 1 else "intermediate"] += 1
        # the next write finds the leftovers, removes them and succeeds; the result reopens
        index = Index.open(path)
        index.add([{"did": "after-kill", "txt": "x"}], encoder=FakeEncoder())
        reopened = Index.open(path)
        assert reopened.snapshot().live_dids() == live | {"after-kill"}
        gens = sorted(p.name for p in path.iterdir() if p.name.startswith("g"))
        assert len(gens) <= 2 and not [p for p in path.iterdir() if p.name.endswith((".tmp", ".tmpdir"))]
    return counts


@pytest.mark.parametrize("cmd", ["add", "delete", "build"])
def test_kill_during_index_writes_leaves_old_or_new(tmp_path, cmd):
    counts = kill_campaign(tmp_path, cmd, moments=20 if cmd != "build" else 12)
    print(f"\nIndex.{cmd} (CI): {counts}")
    assert counts["neither"] == 0
    assert counts["killed"] >= counts["moments"] // 2  # the moments really fell inside the run


@pytest.mark.slow
@pytest.mark.parametrize("cmd", ["add", "delete", "build"])
def test_kill_during_index_writes_many_moments(tmp_path, cmd):
    counts = kill_campaign(tmp_path, cmd, moments=100, n=60, batch=5)
    print(f"\nIndex.{cmd} (slow): {counts}")
    assert counts["neither"] == 0


@pytest.mark.slow
@pytest.mark.parametrize("command", ["add", "delete", "build"])
def test_kill_retrv_index_commands(tmp_path, tiny_pack, tiny_corpus, command):
    """The same through the command line with a real (tiny) pack: `retrv index add|delete|build` killed at 20
    moments spread over an uninterrupted run; the index opens as the old or the new one every time."""
    from retrv.runtime.inputs.corpus import write_jsonl

    more = tmp_path / "more.jsonl"
    write_jsonl(more, [{"did": f"n{i}", "txt": f"new picture {i}", "img_path": str(tiny_corpus / f"{i % 14}.png")}
                       for i in range(8)])
    corpus = tiny_corpus / "corpus.jsonl"
    old = {f"c{i}" for i in range(14)} | {"t0"}
    argv = {"add": lambda ix: ["index", "add", ix, str(more), "--pack", str(tiny_pack)],
            "delete": lambda ix: ["index", "delete", ix, "--ids", *[f"c{i}" for i in range(10)]],
            "build": lambda ix: ["index", "build", str(tiny_pack), str(more), ix]}[command]
    new = {"add": old | {f"n{i}" for i in range(8)}, "delete": old - {f"c{i}" for i in range(10)},
           "build": {f"n{i}" for i in range(8)}}[command]
    from retrv.app.cli import main

    def fresh(name: str) -> Path:
        path = tmp_path / name / "ix"
        assert main(["index", "build", str(tiny_pack), str(corpus), str(path)]) == 0
        return path

    cmd = [sys.executable, "-c", "import sys; from retrv.app.cli import main; sys.exit(main(sys.argv[1:]))"]
    probe = fresh("probe")
    t0 = time.perf_counter()
    subprocess.run(cmd + argv(str(probe)), check=True, capture_output=True, timeout=300)
    duration = time.perf_counter() - t0
    outcomes = {"old": 0, "new": 0}
    for i in range(20):
        path = fresh(f"m{i}")
        p = subprocess.Popen(cmd + argv(str(path)), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            p.wait(timeout=duration * (i + 0.5) / 20)
        except subprocess.TimeoutExpired:
            p.send_signal(signal.SIGKILL)
            p.wait()
        live = Index.open(path).snapshot().live_dids()
        assert live in (old, new), f"{command} killed at {i}/20: {len(live)} live candidates, neither old nor new"
        outcomes["old" if live == old else "new"] += 1
    print(f"\nretrv index {command}: 20 kill moments over a {duration:.1f} s run: {outcomes}, neither 0")
