"""kill -9 a real `retrv export` / `retrv quantize` writing over an existing good pack, at many moments, and require
that the output path then holds the old pack or the new one, complete (`Pack.open` verifies every sha256), never
neither; and that the leftovers of the killed write are gone once the next write of that path starts.

The kill moments: one uncontrolled run measures the command's duration D (and gives the new pack's fingerprint:
export and int8-dynamic quantization are deterministic); then kills at N evenly spaced fractions of D, a few at
seeded random moments, and two aimed at the swap itself: as soon as the finished temporary holds its manifest
(just before the swap), and as soon as the output path names another directory (just after it, while the old
pack is being deleted). A third mode runs the command with renameat2 disabled (the two-rename fallback of
`fsutil.atomic_dir`), where a kill between the renames leaves the old pack aside and the next write restores it.

`-s` prints the figures (moments tried; outcomes old / new / neither).
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pytest

from retrv.runtime import fsutil
from retrv.runtime.errors import PackError
from retrv.runtime.pack import Pack

POLL_S = 0.0005  # the aimed kills poll this often; the swap itself takes microseconds, the steps around it ms
NO_EXCHANGE = ("import sys; from retrv.runtime import fsutil; fsutil._renameat2 = False; "
               "from retrv.app.cli import main; sys.exit(main(sys.argv[1:]))")


@dataclass
class Job:
    name: str
    argv: list[str]  # after `python -m retrv.app.cli`
    out: Path
    pristine: Path  # a copy of the old pack, put back at `out` before each try
    old_sha: str
    new_sha: str | None = None
    duration: float = 0.0


@pytest.fixture(scope="module")
def packs(tmp_path_factory):
    from retrv.export.pack_export import export_pack
    from retrv.model.tiny import write_tiny_checkpoint

    root = tmp_path_factory.mktemp("kill")
    old_ckpt = write_tiny_checkpoint(root / "old-ckpt", seed=1)
    new_ckpt = write_tiny_checkpoint(root / "new-ckpt", seed=0)
    old_pack = export_pack(old_ckpt, root / "old-pack")
    return root, old_pack, new_ckpt


def make_job(packs, name: str, command: str) -> Job:
    root, old_pack, new_ckpt = packs
    work = root / name
    work.mkdir()
    out = work / "out" / "pack"
    if command == "export":
        argv = ["export", str(new_ckpt), str(out)]
    else:
        src = root / "source-pack"
        if not src.exists():
            from retrv.export.pack_export import export_pack

            export_pack(new_ckpt, src)
        argv = ["quantize", str(src), str(out), "--mode", "int8-dynamic"]
    return Job(name, argv, out, old_pack, Pack.open(old_pack).sha256)


def reset(job: Job) -> int:
    """Put the old pack back at `out`, with no leftovers beside it; -> its inode."""
    parent = job.out.parent
    if parent.exists():
        shutil.rmtree(parent)
    parent.mkdir(parents=True)
    shutil.copytree(job.pristine, job.out)
    return os.stat(job.out).st_ino


def start(job: Job, fallback: bool) -> subprocess.Popen:
    head = [sys.executable, "-c", NO_EXCHANGE] if fallback else [sys.executable, "-m", "retrv.app.cli"]
    return subprocess.Popen(head + job.argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def leftovers(job: Job) -> list[str]:
    return sorted(n for n in os.listdir(job.out.parent) if n.startswith(f".{job.out.name}."))


def measure(job: Job, runs: int = 2) -> None:
    """The shortest of `runs` uncontrolled runs: the first one pays for cold caches, and kills planned on its
    duration would land after the end too often."""
    durations = []
    for _ in range(runs):
        reset(job)
        t0 = time.perf_counter()
        proc = start(job, fallback=False)
        _, err = proc.communicate()
        durations.append(time.perf_counter() - t0)
        assert proc.returncode == 0, err.decode()
        job.new_sha = Pack.open(job.out).sha256
        assert job.new_sha != job.old_sha and not leftovers(job)
    job.duration = min(durations)


def wait_until(proc: subprocess.Popen, ready, limit: float) -> None:
    end = time.perf_counter() + limit
    while proc.poll() is None and time.perf_counter() < end and not ready():
        time.sleep(POLL_S)


def before_swap(job: Job):
    def ready() -> bool:
        return any(n.endswith(".tmpdir") and os.path.exists(job.out.parent / n / "manifest.json")
                   for n in leftovers(job))
    return ready


def after_swap(job: Job, ino: int):
    def ready() -> bool:
        try:
            return os.stat(job.out).st_ino != ino
        except FileNotFoundError:  # the fallback's gap: the next poll sees the new one in place
            return False
    return ready


def classify(job: Job) -> str:
    """old / new after a kill; the next write's first step (clean_leftovers) runs, and must keep it so."""
    outcome = None
    if job.out.exists():
        try:
            sha = Pack.open(job.out).sha256
        except PackError:
            return "neither"
        outcome = {job.old_sha: "old", job.new_sha: "new"}.get(sha, "neither")
    fsutil.clean_leftovers(job.out)  # what the next write of this path does before anything else
    left = leftovers(job)
    assert not left, f"left beside the pack after the next write started: {left}"
    if outcome is None:  # only the two-rename fallback can get here: killed between its renames
        try:
            return "old (restored)" if Pack.open(job.out).sha256 == job.old_sha else "neither"
        except PackError:
            return "neither"
    try:
        assert Pack.open(job.out).sha256 == {"old": job.old_sha, "new": job.new_sha}[outcome]
    except PackError:
        return "neither"
    return outcome


def kill_at(job: Job, *, delay: float | None = None, ready=None, fallback: bool = False) -> tuple[str, bool]:
    """One try: start, kill -9 after `delay` seconds or once `ready()` holds; -> (outcome, killed before the end)."""
    ino = reset(job)
    proc = start(job, fallback)
    if delay is not None:
        wait_until(proc, lambda: False, delay)
    else:
        wait_until(proc, ready(job) if ready is before_swap else ready(job, ino), 4 * job.duration + 10)
    killed = proc.poll() is None
    if killed:
        proc.send_signal(signal.SIGKILL)
    _, err = proc.communicate()
    assert killed or proc.returncode == 0, err.decode()
    return classify(job), killed


def kill_series(job: Job, evenly: int, randomly: int, fallback_tries: int = 0, seed: int = 0) -> Counter:
    measure(job)
    rng = random.Random(seed)
    delays = [job.duration * i / (evenly + 1) for i in range(1, evenly + 1)]
    delays += [rng.uniform(0, job.duration) for _ in range(randomly)]
    tally: Counter = Counter()
    finished = 0
    for d in delays:
        outcome, killed = kill_at(job, delay=d)
        tally[outcome] += 1
        finished += not killed
    for ready in (before_swap, after_swap):
        outcome, killed = kill_at(job, ready=ready)
        tally[f"{outcome} (aimed {ready.__name__.replace('_', ' ')})"] += 1
        finished += not killed
    for i in range(fallback_tries):
        ready = after_swap if i % 2 else before_swap
        outcome, killed = kill_at(job, ready=ready, fallback=True)
        tally[f"{outcome} (fallback, aimed {ready.__name__.replace('_', ' ')})"] += 1
        finished += not killed
    total = sum(tally.values())
    print(f"\n{job.name}: {total} kill moments over a {job.duration:.1f} s run ({finished} finished before the "
          f"kill): " + ", ".join(f"{k} {v}" for k, v in sorted(tally.items())))
    return tally


def check(tally: Counter) -> None:
    assert not any(k.startswith("neither") for k in tally), tally
    assert any(k.startswith("old") for k in tally) and any(k.startswith("new") for k in tally), tally


@pytest.mark.skipif(os.name != "posix", reason="SIGKILL and flock")
def test_export_killed_at_any_moment_leaves_the_old_or_the_new_pack(packs):
    job = make_job(packs, "export", "export")
    tally = kill_series(job, evenly=14, randomly=4)
    assert sum(tally.values()) >= 20
    check(tally)


@pytest.mark.slow
@pytest.mark.skipif(os.name != "posix", reason="SIGKILL and flock")
@pytest.mark.parametrize("command", ["export", "quantize"])
def test_many_kills_export_and_quantize(packs, command):
    job = make_job(packs, f"{command}-slow", command)
    tally = kill_series(job, evenly=70, randomly=20, fallback_tries=10, seed=1)
    assert sum(tally.values()) >= 100
    check(tally)
