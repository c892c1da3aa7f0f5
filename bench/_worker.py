"""One benchmark configuration in its own process (see _common.py for why and for the protocol).

init kinds:
  {"kind": "retriever", "backend": "ort"|"torch", "pack", "index", "ckpt", "ort_cache", "use_icm": null|false,
   "suppress_eos": bool}
      the project's Retriever: ONNX Runtime on a pack, or the PyTorch fallback (TorchBackend on the checkpoint the
      pack was exported from). use_icm=false: Retrv-R1 without the ICM (full cached candidate tokens).
  {"kind": "baseline", "ckpt", "index", "attn": "eager"|"sdpa"}: transformers generate over full tokens
      (_baseline.py), with that attention implementation.
  "threads": intra-op threads (torch.set_num_threads / ONNX Runtime intra_op_num_threads); absent: each library's
  default (every core this process may use, for both).
ops: query, index (reopen another index), mem, exit.
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback
from pathlib import Path

_PROTO = os.fdopen(os.dup(1), "w", buffering=1)  # replies go here; fd 1 itself now points at stderr
os.dup2(2, 1)
sys.stdout = sys.stderr
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402

from _common import peak_rss_mb, rss_mb  # noqa: E402


def reply(obj: dict) -> None:
    _PROTO.write(json.dumps(obj) + "\n")
    _PROTO.flush()


def modules() -> dict:
    return {m: m in sys.modules for m in ("torch", "transformers", "onnxruntime")}


class SuppressEos:
    """Random weights only: the backend's logits with end-of-sequence masked, as transformers' `min_new_tokens`
    masks it for the baseline, so that both sides decode the same number of tokens instead of one stopping at a
    random EOS. Everything else is delegated unchanged."""

    def __init__(self, backend, eos_ids) -> None:
        self.inner, self.eos = backend, list(eos_ids)

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def step(self, state, inputs_embeds, position_ids, attention_mask):
        logits = self.inner.step(state, inputs_embeds, position_ids, attention_mask).copy()
        logits[:, self.eos] = -np.inf
        return logits


class RetrieverConfig:
    def __init__(self, msg: dict) -> None:
        from retrv.runtime.index.store import Index
        from retrv.runtime.pack import Pack
        from retrv.runtime.retriever import Retriever

        threads = msg.get("threads")
        if threads and msg["backend"] == "torch":
            import torch

            torch.set_num_threads(threads)
        self.pack = Pack.open(msg["pack"])
        index = Index.open(msg["index"], pack=self.pack)
        if msg["backend"] == "torch":
            import retrv.export.torch_backend  # noqa: F401  (registers the PyTorch fallback with the runtime)

            self.r = Retriever(self.pack, index, backend="torch", checkpoint=msg["ckpt"])
        else:
            self.r = Retriever(self.pack, index, backend="ort", cache_dir=msg.get("ort_cache"), threads=threads)
        if msg.get("use_icm") is False:
            from retrv.runtime.rerank.loop import Reranker

            c = self.r.c
            self.r.reranker = Reranker(self.r.backend, c.tokenizer, c.cfg, c.table, method="retrv-r1",
                                       use_icm=False, image_encoder=c.vision)
        if msg.get("suppress_eos"):
            self.r.reranker.backend = SuppressEos(self.r.backend, self.r.c.cfg.tokens.eos_token_ids)

    def open_index(self, path: str) -> None:
        from retrv.runtime.index.store import Index

        self.r.index = Index.open(path, pack=self.pack)

    def query(self, q: dict) -> dict:
        from retrv.runtime.rerank.budget import Budget

        window = q.get("window") or q["k"]
        res = self.r.search(text=q.get("text"), image=q.get("image"), k=q["k"], budget=Budget(**q["budget"]),
                            window=window, stride=min(q.get("stride") or 10, window))
        d = res.to_dict(trace=False)
        return {"timings_ms": dict(res.timings_ms), "ranked": [r["did"] for r in res.ranked],
                "coarse": [r["did"] for r in sorted(res.ranked, key=lambda r: r["coarse_rank"])],
                "answered": res.rerank.answered if res.rerank else False,
                "tokens": {**{k: v for k, v in d["tokens"].items() if k != "budget_exhausted"},
                           "new_tokens": d["tokens"]["total_tokens"] - d["tokens"]["prefill_tokens"],
                           "images_encoded": 1 if q.get("image") else 0},
                "flags": d["flags"]}


class BaselineConfig:
    def __init__(self, msg: dict) -> None:
        from _baseline import TransformersBaseline

        if msg.get("threads"):
            import torch

            torch.set_num_threads(msg["threads"])
        self.b = TransformersBaseline(msg["ckpt"], msg["index"], msg.get("attn", "eager"))

    def open_index(self, path: str) -> None:
        self.b.open_index(path)

    def query(self, q: dict) -> dict:
        return self.b.search(q.get("text"), q.get("image"), q["k"], q["budget"]["think"], q["force_length"],
                             q["answer_tokens"])


def main() -> int:
    config = None
    for line in sys.stdin:
        msg = json.loads(line)
        op = msg.get("op")
        try:
            if op == "exit":
                return 0
            if op == "init":
                t0 = time.perf_counter()
                config = BaselineConfig(msg) if msg["kind"] == "baseline" else RetrieverConfig(msg)
                reply({"load_s": time.perf_counter() - t0, "rss_mb": rss_mb(), "peak_rss_mb": peak_rss_mb(),
                       "modules": modules(), "pid": os.getpid(),
                       **({"processor": config.b.processor_name, "attn": config.b.attn}
                          if msg["kind"] == "baseline" else {})})
            elif op == "index":
                config.open_index(msg["path"])
                reply({"ok": True})
            elif op == "query":
                out = config.query(msg)
                out["rss_mb"] = rss_mb()
                reply(out)
            elif op == "mem":
                reply({"rss_mb": rss_mb(), "peak_rss_mb": peak_rss_mb(), "modules": modules()})
            else:
                reply({"error": f"unknown op {op!r}"})
        except Exception as e:  # noqa: BLE001 - reported to the orchestrator, which marks the row missing
            traceback.print_exc()
            reply({"error": f"{type(e).__name__}: {e}"[:2000]})
    return 0


if __name__ == "__main__":
    sys.exit(main())
