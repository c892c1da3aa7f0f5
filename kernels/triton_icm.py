"""Python entry points for the fused ICM attention kernel (Triton), same contracts as `kernels/reference.py`.

    con, rel = icm_attention(con_q, con_k, con_v, cand_mask, rel_q, query_k, query_v, query_mask, pool_q, heads)

runs ONE launch, grid (K candidates, H heads, 2 tokens): program (k, h, 0) pools candidate k's tokens with its
content query (online softmax over the tokens); program (k, h, 1) walks candidate k's tokens tile by tile, computes
each tile's R = attention(tile, query tokens) in registers and folds it straight into the relation query's online
softmax, so R (K x L x C) is never written. `pool`, `cross` and `relation_pool` are the single-core launches
(`TritonCores` gives them the interface `kernels.split` composes with).

Tensors may live on CUDA or, with TRITON_INTERPRET=1 set before triton is first imported, on the CPU (Triton's
interpreter: slow, for tests). Inputs are fp32 or fp16; the last axis must be contiguous (a Linear output is).
triton is imported on first use; without it every function raises `MissingDependencyError` with the install hint.
"""

from __future__ import annotations

import torch

from retrv.runtime.errors import InputError, MissingDependencyError

_KERNELS = None
MIN_BLOCK = 16  # tl.dot needs every tile dimension >= 16


def kernels():
    """The compiled-on-demand Triton module, imported once."""
    global _KERNELS
    if _KERNELS is None:
        try:
            import triton  # noqa: F401
        except ImportError:
            raise MissingDependencyError(
                "triton is not installed; install it with: pip install 'retrv-edge[gpu]' (or pip install triton)"
            ) from None
        from retrv.kernels import _triton_kernels

        _KERNELS = _triton_kernels
    return _KERNELS


def _pow2(n: int) -> int:
    return max(MIN_BLOCK, 1 << max(0, int(n) - 1).bit_length())


def _blocks(device: torch.device, dtype: torch.dtype, d: int, block_l: int | None,
            block_q: int | None) -> tuple[int, int]:
    """Token tiles (BLOCK_L candidate tokens x BLOCK_Q query tokens). Chosen from sm_80 builds of these kernels
    (compiled here without a GPU, registers read with cuobjdump): fp16 at 32x32 fits in registers for head sizes up
    to 128 (222 registers, no spill); fp32 at 32x32 spills 1.2 KB per thread at D = 128 and stays at 255 registers
    with an 8-byte stack at 16x16. The interpreter runs each program in Python, so it gets the minimum tile."""
    if device.type != "cuda":
        default = MIN_BLOCK
    else:
        default = 32 if dtype == torch.float16 or d <= 64 else MIN_BLOCK
    bl, bq = block_l or default, block_q or default
    for name, b in (("block_l", bl), ("block_q", bq)):
        if b < MIN_BLOCK or b & (b - 1):
            raise InputError(f"{name}: got {b}; expected a power of two >= {MIN_BLOCK}")
    return bl, bq


def _check(name: str, t: torch.Tensor, ndim: int, last: int | None = None) -> torch.Tensor:
    if not isinstance(t, torch.Tensor) or t.ndim != ndim:
        got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
        raise InputError(f"icm kernel input '{name}': got {got}; expected a {ndim}-d tensor")
    if last is not None and t.shape[-1] != last:
        raise InputError(f"icm kernel input '{name}': got shape {tuple(t.shape)}; expected last axis {last}")
    if t.is_floating_point() and t.dtype not in (torch.float32, torch.float16):
        raise InputError(f"icm kernel input '{name}': got dtype {t.dtype}; expected float32 or float16")
    return t if t.stride(-1) == 1 else t.contiguous()


def _mask(name: str, m: torch.Tensor, shape: tuple) -> torch.Tensor:
    if tuple(m.shape) != shape:
        raise InputError(f"icm kernel input '{name}': got shape {tuple(m.shape)}; expected {shape}")
    return (m > 0).to(torch.int32).contiguous()


def _head_dim(c: int, num_heads: int) -> int:
    if num_heads < 1 or c % num_heads:
        raise InputError(f"num_heads: got {num_heads}; expected a divisor of the channel count {c}")
    return c // num_heads


def _fused(con, rel, num_heads: int, block_l, block_q):
    """Launch icm_fused_kernel for the content pool (`con` = (q, k, v, mask)) and/or the relation pool
    (`rel` = (q, k, v, query_mask, pool_q, cand_mask)); either may be None."""
    k_mod = kernels()
    ref = con[1] if con is not None else rel[0]  # (K, L, C): fixes K, L, C, device
    kk, length, c = ref.shape
    if length < 1:
        raise InputError(f"icm kernel: got {length} tokens per candidate; expected >= 1")
    d = _head_dim(c, num_heads)
    bl, bq = _blocks(ref.device, ref.dtype, d, block_l, block_q)
    dummy = ref.new_zeros(1)
    if con is not None:
        cq, ck, cv = _check("con_q", con[0], 2, c), _check("con_k", con[1], 3, c), _check("con_v", con[2], 3, c)
        cmask = _mask("cand_mask", con[3], (kk, length))
        con_out = torch.empty((kk, c), device=ref.device, dtype=cq.dtype)
        is_fp32 = cq.dtype == torch.float32
    else:
        cq = ck = cv = con_out = dummy
    lq = 1
    if rel is not None:
        qc, kq, vq = _check("rel_q", rel[0], 3, c), _check("query_k", rel[1], 2, c), _check("query_v", rel[2], 2, c)
        lq = kq.shape[0]
        if lq < 1 or tuple(qc.shape) != (kk, length, c) or vq.shape[0] != lq:
            raise InputError(f"icm kernel: rel_q {tuple(qc.shape)}, query_k {tuple(kq.shape)}, query_v "
                             f"{tuple(vq.shape)}; expected ({kk}, {length}, {c}), (Lq >= 1, {c}), (Lq, {c})")
        qmask = _mask("query_mask", rel[3], (lq,))
        pq = _check("pool_q", rel[4], 2, c)
        cmask = _mask("cand_mask", rel[5], (kk, length))
        rel_out = torch.empty((kk, c), device=ref.device, dtype=pq.dtype)
        is_fp32 = qc.dtype == torch.float32
    else:
        qc = kq = vq = qmask = pq = rel_out = dummy
    floats = {t.dtype for t in (cq, ck, cv, qc, kq, vq, pq) if t is not dummy}
    if len(floats) != 1:
        raise InputError(f"icm kernel: inputs of dtypes {sorted(map(str, floats))}; expected one float dtype")
    tasks = (con is not None) + (rel is not None)
    grid = (kk, num_heads, tasks)
    k_mod.icm_fused_kernel[grid](
        cq, ck, cv, cmask, con_out,
        cq.stride(0), ck.stride(0), ck.stride(1), cv.stride(0), cv.stride(1),
        qc, kq, vq, qmask, pq, rel_out,
        qc.stride(0), qc.stride(1) if qc.ndim == 3 else 0, kq.stride(0), vq.stride(0), 1, pq.stride(0),
        cmask.stride(0), cmask.stride(1), con_out.stride(0), rel_out.stride(0), length, lq, d, d ** -0.5,
        DO_CONTENT=con is not None, DO_RELATION=rel is not None, REL_TASK=1 if con is not None else 0,
        BLOCK_L=bl, BLOCK_Q=bq, BLOCK_D=_pow2(d), IS_FP32=is_fp32,
    )
    return (con_out if con is not None else None), (rel_out if rel is not None else None)


def icm_attention(con_q, con_k, con_v, cand_mask, rel_q, query_k, query_v, query_mask, pool_q, num_heads: int,
                  *, block_l: int | None = None, block_q: int | None = None):
    """Both tokens' attention for every candidate in one launch -> (content (K, C), relation (K, C)).
    con_q (K, C), con_k/con_v (K, L, C), cand_mask (K, L); rel_q (K, L, C), query_k/query_v (Lq, C),
    query_mask (Lq,), pool_q (K, C). Equals `reference.icm_attention`."""
    return _fused((con_q, con_k, con_v, cand_mask), (rel_q, query_k, query_v, query_mask, pool_q, cand_mask),
                  num_heads, block_l, block_q)


def pool(q, k, v, mask, num_heads: int, *, block_l: int | None = None):
    """q (K, C), k/v (K, L, C), mask (K, L) -> (K, C). Equals `reference.pool`."""
    return _fused((q, k, v, mask), None, num_heads, block_l, None)[0]


def relation_pool(q, k, v, query_mask, pool_q, cand_mask, num_heads: int, *, block_l=None, block_q=None):
    """R = cross(q, k, v) kept in registers, pooled by pool_q -> (K, C). Equals `reference.relation_pool`."""
    return _fused(None, (q, k, v, query_mask, pool_q, cand_mask), num_heads, block_l, block_q)[1]


def cross(q, k, v, mask, num_heads: int, *, block_l: int | None = None, block_q: int | None = None):
    """q (K, L, C), k/v (Lq, C), mask (Lq,) -> R (K, L, C), written out. Equals `reference.cross`."""
    k_mod = kernels()
    kk, length, c = q.shape
    d = _head_dim(c, num_heads)
    q, k, v = _check("q", q, 3, c), _check("k", k, 2, c), _check("v", v, 2, c)
    lq = k.shape[0]
    if lq < 1 or v.shape[0] != lq:
        raise InputError(f"icm kernel: k {tuple(k.shape)}, v {tuple(v.shape)}; expected (Lq >= 1, {c}) each")
    qmask = _mask("mask", mask, (lq,))
    bl, bq = _blocks(q.device, q.dtype, d, block_l, block_q)
    out = torch.empty((kk, length, c), device=q.device, dtype=q.dtype)
    grid = (kk, -(-length // bl), num_heads)
    k_mod.cross_kernel[grid](
        q, k, v, qmask, out, q.stride(0), q.stride(1), k.stride(0), v.stride(0), 1, out.stride(0), out.stride(1),
        length, lq, d, d ** -0.5, BLOCK_L=bl, BLOCK_Q=bq, BLOCK_D=_pow2(d), IS_FP32=q.dtype == torch.float32,
    )
    return out


def aot_compile(kernel: str, arch: int, dtype: torch.dtype = torch.float16, head_dim: int = 64,
                block_l: int | None = None, block_q: int | None = None, content: bool = True, relation: bool = True):
    """Compile one kernel variant for an NVIDIA target (`arch` 80 = sm_80) without a GPU: Triton's full pipeline to
    PTX and, through the ptxas bundled with triton, a cubin. Returns triton's CompiledKernel (`.asm["ptx"]`,
    `.asm["cubin"]`, `.metadata.shared`): what a CPU machine can check of the compiled path, and what an AOT
    TensorRT plugin (`@trtp.aot_impl`) would embed."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = {"fused": kernels().icm_fused_kernel, "cross": kernels().cross_kernel}[kernel]
    bl, bq = _blocks(torch.device("cuda"), dtype, head_dim, block_l, block_q)
    consts = {"BLOCK_L": bl, "BLOCK_Q": bq, "BLOCK_D": _pow2(head_dim), "IS_FP32": dtype == torch.float32}
    if kernel == "fused":
        consts.update(DO_CONTENT=content, DO_RELATION=relation, REL_TASK=1 if content else 0)
    elem = {torch.float32: "fp32", torch.float16: "fp16"}[dtype]
    sig = {}
    for name in fn.arg_names:
        if name in consts:
            sig[name] = "constexpr"
        elif name.endswith("_ptr"):
            sig[name] = "*i32" if "mask" in name else f"*{elem}"  # masks are int32 (see _mask)
        else:
            sig[name] = "fp32" if name == "scale" else "i32"
    return triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts), target=GPUTarget("cuda", arch, 32))


class TritonCores:
    """The Triton cores behind the interface `kernels.split` composes with."""

    name = "triton"

    @staticmethod
    def pool(q, k, v, mask, num_heads):
        return pool(q, k, v, mask, num_heads)

    @staticmethod
    def cross(q, k, v, mask, num_heads):
        return cross(q, k, v, mask, num_heads)

    @staticmethod
    def relation_pool(q, k, v, query_mask, pool_q, cand_mask, num_heads):
        return relation_pool(q, k, v, query_mask, pool_q, cand_mask, num_heads)
