"""What bench/decode.py measures with: the two engines behind one small interface, the weight bytes each reads per
decoded token, and the machine's read bandwidth.

Both engines answer `run(ids, new_tokens) -> Run` (prefill of the prompt ids, then greedy decode, argmax on the
logits in numpy for both) and `close()`. The retrv engine goes through the runtime's public path
(`load_pack_generator` + `DecodeSession`, the loop `retrv generate` runs), so whatever decoder graph and backend a
pack's manifest selects is what gets timed: a fused decoder or an INT8 head lands here without a change. The
llama.cpp engine drives libllama through llama-cpp-python's low-level C bindings (not `Llama`, whose constructor
cannot turn off the extra weight buffers that crash `llama_decode` for Q4_1/Q8_0 on this CPU).
"""

from __future__ import annotations

import ctypes
import math
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

# llama.cpp file types made from the shipped Q4_1 file (llama.h's enum llama_ftype)
LLAMA_FTYPES = {"F32": 0, "Q4_1": 3, "Q8_0": 7}


@dataclass
class Run:
    prefill_s: float
    decode_s: float  # the (new_tokens - 1) steps after the prefill: the prefill's logits choose the first token
    tokens: list[int] = field(default_factory=list)

    @property
    def s_per_token(self) -> float:
        return self.decode_s / max(1, len(self.tokens) - 1)


def load_average() -> float:
    """1-minute load average (0 where the platform has none)."""
    try:
        return os.getloadavg()[0]
    except OSError:
        return 0.0


# --------------------------------------------------------------------------------------------------- bandwidth
def read_bandwidth(threads: int, gib: float = 1.0, repeats: int = 5) -> float:
    """GB/s read by `threads` threads summing their slice of one `gib` GiB float64 array (numpy's reductions
    release the GIL); best of `repeats`, after the array is written once so every page is resident."""
    a = np.ones(int(gib * (1 << 30)) // 8, np.float64)
    parts = np.array_split(a, threads)
    best = math.inf
    with ThreadPoolExecutor(threads) as pool:
        for _ in range(repeats):
            t0 = time.perf_counter()
            list(pool.map(np.sum, parts))
            best = min(best, time.perf_counter() - t0)
    return a.nbytes / best / 1e9


_GEMM = """
import sys, time
import numpy as np
m, k, n, repeats = map(int, sys.argv[1:5])
rng = np.random.default_rng(0)
a, b = rng.random((m, k), np.float32), rng.random((k, n), np.float32)
a @ b
best = float("inf")
for _ in range(repeats):
    t0 = time.perf_counter()
    a @ b
    best = min(best, time.perf_counter() - t0)
print(2 * m * k * n / best / 1e9)
"""


def gemm_rate(threads: int, m: int, k: int, n: int, repeats: int = 30) -> float:
    """GFLOP/s of this machine's fp32 GEMM at one (m, k) x (k, n) product: numpy's BLAS (OpenBLAS in the pip
    wheels) with `threads` threads, best of `repeats`. In a subprocess: BLAS reads its thread count when it loads.
    The reference a prefill's arithmetic is held against, as `read_bandwidth` is for decode's bytes."""
    import subprocess
    import sys

    env = {**os.environ, **{v: str(threads) for v in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS",
                                                       "MKL_NUM_THREADS")}}
    out = subprocess.run([sys.executable, "-c", _GEMM, str(m), str(k), str(n), str(repeats)], env=env,
                         capture_output=True, text=True, check=True)
    return float(out.stdout)


def prefill_flops(text_config, tokens: int) -> float:
    """Multiply-adds x 2 of a prefill of `tokens` through the decoder's weight matrices (q/k/v, o, gate/up, down per
    layer; the LM head once, for the last token), the same for every engine that runs the model. Attention's own
    products (~1.5% here at 94 tokens) are left out."""
    c = text_config
    head_dim = c.hidden_size // c.num_attention_heads
    per_layer = c.hidden_size * (c.num_attention_heads + 2 * c.num_key_value_heads) * head_dim \
        + c.num_attention_heads * head_dim * c.hidden_size + 3 * c.hidden_size * c.intermediate_size
    return 2.0 * (c.num_hidden_layers * per_layer * tokens + c.hidden_size * c.vocab_size)


# --------------------------------------------------------------------------------------------- bytes per token
def onnx_decode_bytes(path: str | Path) -> dict:
    """Weight bytes one decode step reads from an ONNX graph: every initializer once, except a table read only
    by Gather (an embedding inside the graph), of which one row per token. Sizes come from the graph's dims and
    types, so external data is never loaded. -> {"total", "gathered_tables"}"""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    g = model.graph
    consumers: dict[str, list] = {}
    for node in g.node:
        for i, name in enumerate(node.input):
            consumers.setdefault(name, []).append((node.op_type, i))
    total, gathered = 0, 0
    for t in g.initializer:
        n = onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize * math.prod(t.dims)
        uses = consumers.get(t.name, [])
        if uses and all(op == "Gather" and i == 0 for op, i in uses) and t.dims:
            n //= t.dims[0]
            gathered += 1
        total += n
    return {"total": total, "gathered_tables": gathered}


def pack_decode_bytes(pack_dir: str | Path, role: str = "decoder") -> int:
    """Weight bytes per decoded token of a pack: its decode graph's (`role`), plus the one embedding row the
    runtime looks up outside the graph."""
    from retrv.runtime.pack import Pack

    from retrv.runtime.inputs.table import open_table

    pack = Pack.open(pack_dir, verify="size")
    table = open_table(pack)
    # a tied quantized head doubles as the table (embed_tokens.nbits): its rows are the head's bytes, counted above
    row = table.shape[1] * table.dtype.itemsize if isinstance(table, np.ndarray) else 0
    return onnx_decode_bytes(pack.file(role))["total"] + row


def gguf_decode_bytes(path: str | Path) -> int:
    """Weight bytes per decoded token of a GGUF model: every tensor once, but the token embedding (read by
    get_rows) counts one row unless the model has no `output.weight`, where the tied head reads all of it."""
    from gguf import GGUFReader

    tensors = {t.name: t for t in GGUFReader(str(path)).tensors}
    total = 0
    for name, t in tensors.items():
        n = int(t.n_bytes)
        if name == "token_embd.weight" and "output.weight" in tensors:
            n //= int(t.shape[-1])  # GGUF shapes list the row length first, the rows last
        total += n
    return total


# ------------------------------------------------------------------------------------------------------- retrv
class RetrvEngine:
    engine = "retrv"

    def __init__(self, pack_dir: str | Path, threads: int, cache_dir: str | Path | None = None) -> None:
        from retrv.runtime.generate import load_pack_generator

        self.gen = load_pack_generator(pack_dir, provider="cpu", threads=threads,
                                       cache_dir=None if cache_dir is None else Path(cache_dir))

    def run(self, ids: list[int], new_tokens: int) -> Run:
        from retrv.runtime.decode import DecodeSession

        n = len(ids)
        embeds = self.gen.lookup(ids)  # (S, H)
        pos = np.broadcast_to(np.arange(n, dtype=np.int64), (3, 1, n)).copy()  # text only: the 3 rows agree
        session = DecodeSession(self.gen.backend, self.gen.builder)
        t0 = time.perf_counter()
        session.feed_inputs(list(ids), embeds, pos)
        t1 = time.perf_counter()
        tokens = [session.choose()]
        for _ in range(new_tokens - 1):
            session.feed_token(tokens[-1])
            tokens.append(session.choose())
        return Run(t1 - t0, time.perf_counter() - t1, tokens)

    def close(self) -> None:
        self.gen.backend.close()


# --------------------------------------------------------------------------------------------------- llama.cpp
def import_llama_cpp():
    """(llama_cpp module, None), or (None, the reason it cannot be used)."""
    try:
        import llama_cpp
    except ImportError as e:
        return None, (f"llama_cpp not importable ({e}); install the bench extra: CMAKE_BUILD_PARALLEL_LEVEL=2 "
                      f"pip install -e '.[bench]' (builds llama.cpp from source, docs/BENCHMARKS.md)")
    except (OSError, RuntimeError) as e:  # the package is there but its shared library is not loadable
        return None, f"llama_cpp installed but libllama did not load: {e}"
    return llama_cpp, None


_LOG_SINK = None  # the no-op log callback; kept referenced for as long as libllama may call it


def _quiet(L) -> None:
    global _LOG_SINK
    if _LOG_SINK is None:
        _LOG_SINK = L.llama_log_callback(lambda level, text, user_data: None)
        L.llama_log_set(_LOG_SINK, ctypes.c_void_p())
        L.llama_backend_init()


def make_gguf(L, source: Path, out: Path, ftype: str, threads: int = 2) -> Path:
    """`source` requantized to `ftype` by llama.cpp's own `llama_model_quantize` (allow_requantize: the source
    is already Q4_1), written to a temporary name and renamed into place."""
    if out.is_file():
        return out
    _quiet(L)
    params = L.llama_model_quantize_default_params()
    params.ftype = LLAMA_FTYPES[ftype]
    params.allow_requantize = True
    params.nthread = threads
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    rc = L.llama_model_quantize(str(source).encode(), str(tmp).encode(), ctypes.byref(params))
    if rc != 0:
        tmp.unlink(missing_ok=True)
        raise RuntimeError(f"llama_model_quantize {source.name} -> {ftype}: returned {rc}")
    os.replace(tmp, out)
    return out


class LlamaEngine:
    engine = "llama.cpp"

    def __init__(self, L, gguf: str | Path, threads: int, n_ctx: int = 512, extra_bufts: bool = False) -> None:
        _quiet(L)
        self.L = L
        mp = L.llama_model_default_params()
        mp.n_gpu_layers = 0
        mp.use_extra_bufts = extra_bufts
        self.model = L.llama_model_load_from_file(str(gguf).encode(), mp)
        if not self.model:
            raise RuntimeError(f"{gguf}: llama_model_load_from_file failed")
        cp = L.llama_context_default_params()
        cp.n_ctx = cp.n_batch = cp.n_ubatch = n_ctx  # a prompt (or a perplexity row) in one batch
        cp.n_threads = cp.n_threads_batch = threads
        cp.no_perf = True
        self.ctx = L.llama_init_from_model(self.model, cp)
        if not self.ctx:
            raise RuntimeError(f"{gguf}: llama_init_from_model failed")
        self.n_ctx = n_ctx
        self.n_vocab = L.llama_vocab_n_tokens(L.llama_model_get_vocab(self.model))
        self.batch = L.llama_batch_init(n_ctx, 0, 1)

    def _clear(self) -> None:
        self.L.llama_memory_clear(self.L.llama_get_memory(self.ctx), True)

    def _decode(self, ids, start: int, all_logits: bool = False) -> np.ndarray:
        """Feed `ids` at positions start...; -> logits (n, V) for every position, or (V,) of the last."""
        b, n = self.batch, len(ids)
        b.n_tokens = n
        for i, tok in enumerate(ids):
            b.token[i], b.pos[i], b.n_seq_id[i] = int(tok), start + i, 1
            b.seq_id[i][0] = 0
            b.logits[i] = all_logits or i == n - 1
        rc = self.L.llama_decode(self.ctx, b)
        if rc != 0:
            raise RuntimeError(f"llama_decode: returned {rc}")
        if all_logits:
            return np.ctypeslib.as_array(self.L.llama_get_logits(self.ctx), shape=(n, self.n_vocab))
        return np.ctypeslib.as_array(self.L.llama_get_logits_ith(self.ctx, -1), shape=(self.n_vocab,))

    def run(self, ids: list[int], new_tokens: int) -> Run:
        self._clear()
        n = len(ids)
        t0 = time.perf_counter()
        logits = self._decode(ids, 0)
        t1 = time.perf_counter()
        tokens = [int(np.argmax(logits))]
        for i in range(new_tokens - 1):
            tokens.append(int(np.argmax(self._decode([tokens[-1]], n + i))))
        return Run(t1 - t0, time.perf_counter() - t1, tokens)

    def perplexity(self, rows: np.ndarray) -> float:
        """exp(mean NLL of each true next token) over `rows` (B, S), every position's logits from one batch per
        row: the same teacher-forced positions `retrv.calibration.quality.score_pack` scores."""
        nll = []
        for row in rows:
            self._clear()
            logits = self._decode(row, 0, all_logits=True)[:-1].astype(np.float64)  # (S-1, V)
            m = logits.max(-1, keepdims=True)
            logz = (m + np.log(np.exp(logits - m).sum(-1, keepdims=True)))[:, 0]
            nll.append(logz - logits[np.arange(len(row) - 1), row[1:]])
        return float(np.exp(np.concatenate(nll).mean()))

    def close(self) -> None:
        if self.ctx:
            self.L.llama_batch_free(self.batch)
            self.L.llama_free(self.ctx)
            self.L.llama_model_free(self.model)
            self.ctx = self.model = None
