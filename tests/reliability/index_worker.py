"""A fake candidate encoder and a worker process for the index reliability tests (no model, no torch: fast).

    python tests/reliability/index_worker.py build INDEX N            # one build of N candidates
    python tests/reliability/index_worker.py add INDEX START N BATCH  # N candidates in adds of BATCH
    python tests/reliability/index_worker.py delete INDEX START N BATCH
    python tests/reliability/index_worker.py churn INDEX N            # the stress test's writer (see plan_churn)

Each operation's expected result is a function of the arguments alone, so a test that kills the worker knows every
state the index may be left in.
"""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

import numpy as np

from retrv.runtime.retriever import EncodedBatch, EncodedCandidate

DIM, HIDDEN = 16, 8
PACK_SHA = "ab" * 32


def vector(did: str) -> np.ndarray:
    seed = int.from_bytes(hashlib.sha256(did.encode()).digest()[:8], "little")
    return np.random.default_rng(seed).standard_normal(DIM).astype(np.float32)


class FakeEncoder:
    """What `Index` needs from a `CandidateEncoder`, computed from the did alone."""

    dim, hidden, has_t_con, pack_sha256, template = DIM, HIDDEN, True, PACK_SHA, {"fake": True}

    def encode(self, cands) -> EncodedBatch:
        items = []
        for c in cands:
            rng = np.random.default_rng(int.from_bytes(hashlib.sha256(c.did.encode()).digest()[8:16], "little"))
            n = 4 if c.img_path else 0
            items.append(EncodedCandidate(rng.standard_normal((n, HIDDEN)).astype(np.float32),
                                          (1, 4, 4) if n else None, rng.standard_normal(HIDDEN).astype(np.float32)))
        return EncodedBatch(items, np.stack([vector(c.did) for c in cands]))


def rows(prefix: str, start: int, n: int) -> list[dict]:
    # every third candidate has an image path (tokens in the cache); it is never opened by the fake encoder
    return [{"did": f"{prefix}{i}", "txt": f"candidate {i}", **({"img_path": f"/img/{i}.png"} if i % 3 == 0 else {})}
            for i in range(start, start + n)]


def plan_churn(n: int, batch: int = 10) -> list[tuple[str, list]]:
    """The stress test's writer: adds n candidates in batches, and after each add deletes half of the previous
    batch, so adds and deletes interleave through the run."""
    ops, prev = [], []
    for lo in range(0, n, batch):
        new = rows("s", lo, min(batch, n - lo))
        ops.append(("add", new))
        if prev:
            ops.append(("delete", [r["did"] for r in prev[::2]]))
        prev = new
    return ops


def main(argv: list[str]) -> None:
    from retrv.runtime.index.store import Index

    cmd, path = argv[0], Path(argv[1])
    enc = FakeEncoder()
    print("ready", flush=True)
    if cmd == "build":
        Index.build(enc, rows("b", 0, int(argv[2])), path)
    elif cmd == "add":
        start, n, batch = map(int, argv[2:5])
        index = Index.open(path)
        for lo in range(start, start + n, batch):
            index.add(rows("a", lo, min(batch, start + n - lo)), encoder=enc)
            print("op", flush=True)
    elif cmd == "delete":
        start, n, batch = map(int, argv[2:5])
        index = Index.open(path)
        for lo in range(start, start + n, batch):
            index.delete([f"b{i}" for i in range(lo, min(lo + batch, start + n))])
            print("op", flush=True)
    elif cmd == "churn":
        index = Index.open(path)
        for op, arg in plan_churn(int(argv[2])):
            gen = index.add(arg, encoder=enc) if op == "add" else index.delete(arg)
            print(f"{op} {gen}", flush=True)
    print("done", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
