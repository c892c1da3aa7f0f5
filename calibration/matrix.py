"""One weight matrix at a time: 4- or 8-bit blockwise quantization into ONNX Runtime's MatMulNBits layout.

Callable per matrix (numpy in, numpy out, no graph), so a streaming exporter can quantize each weight as it reads it
and a graph pass (`nbits_graph`) can replace a whole graph's MatMuls with the same math.

Layout (com.microsoft MatMulNBits, bits=4 or 8): for `x @ w` with w of shape (K, N), blocks of `block_size` run
along K within each output column n:
- `packed` (N, ceil(K/block), block * bits / 8) uint8: for 4 bits two values a byte, the lower index in the low
  nibble; for 8 bits one value a byte;
- `scales` (N * blocks,) float32;
- `zero_points`: float32 (N * blocks,) for "float" zeros (4 bits only: ONNX Runtime's CPU kernel refuses float
  zeros with 8 bits); uint8 for "int" zeros, two a byte (N * ceil(blocks/2),) for 4 bits, one a byte (N * blocks,)
  for 8; absent for "symmetric" (the kernel's default zero point 2^(bits-1): 8 or 128).
A value dequantizes as (q - zero) * scale.

"offset": float zeros' grid (lo + q * scale: the block's min and max exact, llama.cpp's Q4_1) on the fast kernel.
The 4-bit values are stored symmetric (no zero-point input: the kernel's 8) and the rest, lo + 8 * scale per
block, is added outside the kernel: x @ W = MatMulNBits(x) + blocksum(x) @ offsets, where blocksum(x) = x @ E
(E: (K, blocks) ones per block, shared by the MatMuls that read the same x) and offsets is (blocks, N) float32.
Per distinct input one block sum (a MatMul by E where E is small, else a constant reshape and a ReduceSum), then per
projection a small fp32 MatMul and an Add; 4 bytes a block more than "int", as float zeros.

Zero points. "int" (what ORT's default RTN writes): the zero is rounded to an integer 0..2^bits-1 and the range is
widened to include 0, so the block's min and max are generally not on the grid. "float" (llama.cpp's Q4_1 form,
and HQQ's): scale = (max - min) / 15, zero = -min / scale unrounded, so both ends are exact. Same bytes per block
on disk up to the zero's width; measured on the SmolLM2 graft, 4 bits, "float" keeps perplexity where "int" loses
15% (docs/BENCHMARKS.md) - partly because the graft's weights ARE Q4_1 blocks of 32, which "float" reproduces.
At 8 bits the integer zero's rounding costs at most half a step of 255 and "int" is the form to use.

Speed (ONNX Runtime 1.32's CPU kernel, contrib_ops/cpu/quantization/matmul_nbits.cc): zero points of any type but
uint8 set `has_unquantized_zero_point_`, which skips the MLAS pre-packing and takes `ComputeBUnpacked`, a naive
dequantization of the whole matrix on every call followed by an fp32 GEMM: "float" zeros are exact but the slowest
form there is (measured 4-6x slower than "int" zeros on the graft's decode, docs/BENCHMARKS.md). "int" and
"symmetric" take the packed MLAS kernels (SQNBIT_CompInt8 at accuracy_level 4, CompFp32 otherwise).

Fit. "rtn" rounds to the block's min/max grid. "mse" (the default of `retrv quantize --mode int4`) searches each
block's scale and integer zero point for the least squared error, the way llama.cpp's k-quants (make_qkx) do: for
several candidate scales around (max - min) / levels and the zero points anchoring either end, round, then refit
the scale by least squares on the rounded values, and keep the candidate with the smallest error. The "rtn"
candidate is among them, so a block's error is never above RTN's. Vectorised over all blocks, in chunks.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from retrv.runtime.errors import InputError

ZERO_POINTS = ("float", "int", "symmetric", "offset")
FITS = ("rtn", "mse")
BITS = (4, 8)
# "mse": candidate scales (max - min) / d for d in levels + SEARCH_STEPS: llama.cpp's make_qkx2 range (levels - 1 ..
# levels + 1) widened on the small-d side, where rounding the zero point needs the room. Step 0.25: on Gaussian
# 576x1536 blocks of 32 the error equals step 0.125's to 3e-5 relative, at half the time.
SEARCH_STEPS = tuple(-1.5 + 0.25 * i for i in range(11))
SEARCH_CHUNK = 256  # blocks per vectorised step: (chunk, 2 x candidates, block) float32 stays in cache (~0.7 MB)
LEVELS = 15  # 4 bits: 0..15


@dataclass(frozen=True)
class QuantMatrix:
    packed: np.ndarray  # (N, blocks, block_size * bits // 8) uint8
    scales: np.ndarray  # (N * blocks,) float32
    zero_points: np.ndarray | None  # float32 (N * blocks,), packed uint8, or None (symmetric)
    k: int
    n: int
    block_size: int
    zero_point: str
    bits: int = 4
    offsets: np.ndarray | None = None  # "offset" only: (blocks, N) float32, added through the block sums of x

    @property
    def blocks(self) -> int:
        return self.packed.shape[1]


Int4Matrix = QuantMatrix  # the 4-bit name callers know


def quantize_int4(w: np.ndarray, block_size: int = 32, zero_point: str = "float", fit: str = "rtn") -> QuantMatrix:
    """4-bit blocks of one (K, N) weight matrix (ONNX MatMul's B)."""
    return quantize_matrix(w, 4, block_size, zero_point, fit)


def quantize_matrix(w: np.ndarray, bits: int = 4, block_size: int = 32, zero_point: str = "float",
                    fit: str = "rtn") -> QuantMatrix:
    """`bits`-bit blocks (4 or 8) of one (K, N) weight matrix (ONNX MatMul's B), fitted by `fit` (module doc)."""
    if fit not in FITS:
        raise InputError(f"fit: got {fit!r}; expected one of {list(FITS)}")
    if fit == "mse" and zero_point == "float":
        raise InputError("fit: got 'mse' with float zero points; expected 'rtn', or zero_point 'offset' (the same "
                         "grid, searched) / 'int' / 'symmetric'")
    if bits not in BITS:
        raise InputError(f"bits: got {bits!r}; expected one of {list(BITS)} (MatMulNBits)")
    if zero_point not in ZERO_POINTS:
        raise InputError(f"zero_point: got {zero_point!r}; expected one of {list(ZERO_POINTS)}")
    if bits == 8 and zero_point == "float":
        raise InputError("zero_point: got 'float' with 8 bits; expected 'int' or 'symmetric' (ONNX Runtime's CPU "
                         "MatMulNBits refuses float zero points with 8-bit weights)")
    levels = (1 << bits) - 1
    half = 1 << (bits - 1)
    if not isinstance(w, np.ndarray) or w.ndim != 2 or not np.issubdtype(w.dtype, np.floating):
        raise InputError(f"weight: got {type(w).__name__} {getattr(w, 'shape', '')}; expected a 2-D float array (K, N)")
    if block_size < 16 or block_size & (block_size - 1):
        raise InputError(f"block_size: got {block_size}; expected a power of two >= 16 (MatMulNBits)")
    if not np.isfinite(w).all():
        raise InputError(f"weight: has NaN or inf values; expected finite weights (shape {w.shape})")
    k, n = w.shape
    blocks = -(-k // block_size)
    padded = np.zeros((blocks * block_size, n), np.float64)
    padded[:k] = w
    x = padded.T.reshape(n, blocks, block_size)  # (N, blocks, block)
    if fit == "mse" and zero_point == "offset":
        scale, low, q = search_offset_blocks(x.reshape(-1, block_size), levels)
        scale, q = scale.reshape(n, blocks, 1), q.reshape(n, blocks, block_size)
        zeros = None
        offsets = (low.reshape(n, blocks) + half * scale[..., 0]).T.astype(np.float32)  # (blocks, N)
    elif fit == "mse":
        scale, zp, q = search_blocks(x.reshape(-1, block_size), levels, None if zero_point == "int" else half)
        scale, q = scale.reshape(n, blocks, 1), q.reshape(n, blocks, block_size)
        zeros = None if zero_point == "symmetric" else zp.reshape(n, blocks)
    elif zero_point == "offset":  # float zeros' grid (lo + q * scale), stored symmetric + a float offset per block
        lo, hi = x.min(-1, keepdims=True), x.max(-1, keepdims=True)
        scale = (hi - lo) / levels
        scale[scale == 0] = 1.0
        q = np.clip(np.round((x - lo) / scale), 0, levels)
        zeros = None
        offsets = (lo + half * scale)[..., 0].T.astype(np.float32)  # (blocks, N): (q - half) * s + this = q s + lo
    elif zero_point == "symmetric":  # ORT's convention: the signed extreme maps to -2^(bits-1), the zero point
        idx = np.abs(x).argmax(-1)[..., None]
        scale = np.take_along_axis(x, idx, -1) / -float(half)
        scale[scale == 0] = 1.0
        q = np.clip(np.round(x / scale) + half, 0, levels)
        zeros = None
    else:
        lo, hi = x.min(-1, keepdims=True), x.max(-1, keepdims=True)
        if zero_point == "int":  # the range must contain 0 for an integer zero point in 0..levels
            lo, hi = np.minimum(lo, 0.0), np.maximum(hi, 0.0)
        scale = (hi - lo) / levels
        scale[scale == 0] = 1.0
        zp = -lo / scale
        if zero_point == "int":
            zp = np.clip(np.round(zp), 0, levels)
        q = np.clip(np.round(x / scale + zp), 0, levels)
        zeros = zp[..., 0]  # (N, blocks)
    q = q.astype(np.uint8)
    packed = q if bits == 8 else (q[..., 0::2] | (q[..., 1::2] << 4)).astype(np.uint8)
    scales = scale[..., 0].astype(np.float32).reshape(-1)
    if zero_point != "offset":
        offsets = None
    if zeros is None:
        zpt = None
    elif zero_point == "float":
        zpt = zeros.astype(np.float32).reshape(-1)
    elif bits == 8:
        zpt = zeros.astype(np.uint8).reshape(-1)
    else:
        z = zeros.astype(np.uint8)
        if z.shape[1] % 2:
            z = np.concatenate([z, np.zeros((n, 1), np.uint8)], axis=1)
        zpt = (z[:, 0::2] | (z[:, 1::2] << 4)).astype(np.uint8).reshape(-1)
    return QuantMatrix(packed, scales, zpt, k, n, block_size, zero_point, bits, offsets)


def search_blocks(x: np.ndarray, levels: int, fixed_zero: int | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Least-squares scale and integer zero point per row of `x` (blocks, block): -> (scale (blocks,) float64,
    zero (blocks,) int, q (blocks, block) uint8), x ~ (q - zero) * scale with q and zero in 0..levels.
    `fixed_zero`: the symmetric form's zero (2^(bits-1)), not searched."""
    out_s = np.empty(len(x))
    out_z = np.empty(len(x), np.int64)
    out_q = np.empty(x.shape, np.uint8)
    steps = (levels + np.asarray(SEARCH_STEPS)).astype(np.float32)  # (C,)
    for a in range(0, len(x), SEARCH_CHUNK):
        xs = x[a:a + SEARCH_CHUNK].astype(np.float32)  # (B, block); float32: the search is memory-bound
        if fixed_zero is None:  # the grid contains 0 (an integer zero point): widen the range to include it
            lo = np.minimum(xs.min(-1), 0.0)[:, None]  # (B, 1)
            hi = np.maximum(xs.max(-1), 0.0)[:, None]
            s0 = (hi - lo) / steps  # (B, C)
            s0[s0 == 0] = 1.0
            z = np.concatenate([np.round(-lo / s0), levels - np.round(hi / s0)], axis=1)  # anchor min, or max
            s0 = np.concatenate([s0, s0], axis=1)  # (B, 2C)
            z = np.clip(z, 0, levels)
        else:  # the signed extreme on -fixed_zero (RTN's symmetric choice) or, over the candidates, inside it
            ext = np.take_along_axis(xs, np.abs(xs).argmax(-1)[:, None], -1)  # (B, 1) signed extreme
            s0 = -ext / (fixed_zero * steps / levels)  # (B, C); negative when the extreme is positive
            s0[s0 == 0] = 1.0
            z = np.full(s0.shape, float(fixed_zero))
        q = np.clip(np.round(xs[:, None, :] / s0[..., None]) + z[..., None], 0, levels)  # (B, C', block)
        v = q - z[..., None]
        xv = (v * xs[:, None, :]).sum(-1)  # (B, C')
        vv = (v * v).sum(-1)
        safe = np.where(vv > 0, vv, 1.0)
        err = np.where(vv > 0, -xv * xv / safe, 0.0)  # + sum x^2, the same for every candidate of a block
        best = err.argmin(-1)  # (B,)
        rows = np.arange(len(xs))
        s = np.where(vv[rows, best] > 0, xv[rows, best] / safe[rows, best], s0[rows, best])
        s[s == 0] = 1.0  # an all-zero block: any scale, q at the zero point
        out_s[a:a + SEARCH_CHUNK] = s
        out_z[a:a + SEARCH_CHUNK] = z[rows, best]
        out_q[a:a + SEARCH_CHUNK] = q[rows, best]
    return out_s, out_z, out_q


def search_offset_blocks(x: np.ndarray, levels: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Least-squares scale and float minimum per row of `x` (blocks, block), llama.cpp's make_qkx2 for Q4_1-like
    blocks: for each candidate scale (max - min) / d, round from the min, then fit x ~ scale * q + low jointly by
    least squares; keep the best. -> (scale (blocks,), low (blocks,), q (blocks, block) uint8). The min/max grid
    (d = levels) is a candidate, so a block's error is never above RTN's."""
    out_s = np.empty(len(x))
    out_b = np.empty(len(x))
    out_q = np.empty(x.shape, np.uint8)
    steps = (levels + np.asarray(SEARCH_STEPS)).astype(np.float32)  # (C,)
    n = float(x.shape[1])
    for a in range(0, len(x), SEARCH_CHUNK):
        xs = x[a:a + SEARCH_CHUNK].astype(np.float32)  # (B, block)
        lo, hi = xs.min(-1)[:, None], xs.max(-1)[:, None]  # (B, 1)
        s0 = (hi - lo) / steps  # (B, C)
        s0[s0 == 0] = 1.0
        q = np.clip(np.round((xs[:, None, :] - lo[..., None]) / s0[..., None]), 0, levels)  # (B, C, block)
        sq, sqq = q.sum(-1), (q * q).sum(-1)  # (B, C)
        sx = xs.sum(-1)[:, None]
        sxq = (q * xs[:, None, :]).sum(-1)
        det = n * sqq - sq * sq
        ok = det > 0
        safe = np.where(ok, det, 1.0)
        scale = np.where(ok, (n * sxq - sq * sx) / safe, s0)
        low = (sx - scale * sq) / n
        err = -(scale * sxq + low * sx)  # + sum x^2: the least-squares residual, where ok
        err = np.where(ok, err, -sx * sx / n)  # constant q: the block's mean, residual sum x^2 - sx^2 / n
        best = err.argmin(-1)
        rows = np.arange(len(xs))
        out_s[a:a + SEARCH_CHUNK] = scale[rows, best]
        out_b[a:a + SEARCH_CHUNK] = low[rows, best]
        out_q[a:a + SEARCH_CHUNK] = q[rows, best]
    return out_s, out_b, out_q


def dequantize_int4(m: QuantMatrix) -> np.ndarray:
    """The (K, N) float32 weights `m` stands for (what MatMulNBits multiplies by); 4 or 8 bits."""
    return dequantize_matrix(m)


def dequantize_matrix(m: QuantMatrix) -> np.ndarray:
    """The (K, N) float32 weights `m` stands for (what MatMulNBits multiplies by)."""
    if m.bits == 8:
        q = m.packed.astype(np.float64)
    else:
        q = np.empty(m.packed.shape[:2] + (m.block_size,), np.float64)
        q[..., 0::2] = m.packed & 0x0F
        q[..., 1::2] = m.packed >> 4
    scale = m.scales.reshape(m.n, m.blocks, 1).astype(np.float64)
    if m.zero_point in ("symmetric", "offset"):
        zp = float(1 << (m.bits - 1))
    elif m.zero_point == "float":
        zp = m.zero_points.reshape(m.n, m.blocks, 1).astype(np.float64)
    elif m.bits == 8:
        zp = m.zero_points.reshape(m.n, m.blocks, 1).astype(np.float64)
    else:
        z = m.zero_points.reshape(m.n, -1)
        both = np.stack([z & 0x0F, z >> 4], axis=-1).reshape(m.n, -1)[:, : m.blocks]
        zp = both[..., None].astype(np.float64)
    w = (q - zp) * scale  # (N, blocks, block)
    if m.offsets is not None:
        w = w + m.offsets.T.astype(np.float64)[..., None]
    return w.reshape(m.n, -1)[:, : m.k].T.astype(np.float32)


# The block sums of x: one MatMul by E (K, blocks) of ones when E is at most this many bytes (it stays in a core's L2
# cache, shared by every layer of that width: one op), else a reshape to (..., blocks, block) and a ReduceSum (two
# ops, no matrix read: at 7B's down_proj E would be 45 MB a layer). SmolLM2's widths (576, 1536): 41 and 295 KB.
BLOCKSUM_MATRIX_BYTES = 1 << 20


def offset_nodes(x: str, nbits_out: str, out: str, name: str, k: int, block_size: int, offsets: str,
                 block_sums: dict, inits: dict, dtype, rank: int | None = None) -> tuple[list, object]:
    """The "offset" form's side product: out = nbits_out + blocksum(x) @ offsets, blocksum(x) = x @ E with E (K,
    blocks) ones per block. `block_sums` maps (x, K) to a block-sum output already made (shared by the MatMuls that
    read x); `inits` the graph's initializers by name; `rank` x's rank when the graph declares it (one constant
    Reshape), else None (the shape is built at run time). -> (nodes, the new initializers or None)."""
    from onnx import helper, numpy_helper

    nodes, new = [], None
    key = (x, k)
    small = k * -(-k // block_size) * 4 <= BLOCKSUM_MATRIX_BYTES
    if key not in block_sums and k % block_size == 0 and not small:
        # Whole blocks: reshape (..., K) -> (..., blocks, block) and sum the last axis (no K x blocks matrix to read
        # every token: at 7B's down_proj that matrix would be 45 MB a layer)
        blocks, sums = k // block_size, f"{x}_blocksum{block_size}"
        lead = [0] * (rank - 1) if rank else []  # Reshape's 0: keep that input dimension
        shape_name = f"blocksum_shape_{k}_{block_size}" + (f"_rank{rank}" if rank else "")
        if shape_name not in inits:
            inits[shape_name] = new = numpy_helper.from_array(np.array([*lead, blocks, block_size], np.int64),
                                                              shape_name)
        axes = f"blocksum_axes_{block_size}"
        if rank:
            nodes.append(helper.make_node("Reshape", [x, shape_name], [f"{sums}_blocks"],
                                          name=name + "_blocksum_reshape"))
        else:
            nodes += [helper.make_node("Shape", [x], [f"{sums}_lead"], name=name + "_blocksum_lead", end=-1),
                      helper.make_node("Concat", [f"{sums}_lead", shape_name], [f"{sums}_shape"], axis=0,
                                       name=name + "_blocksum_shape"),
                      helper.make_node("Reshape", [x, f"{sums}_shape"], [f"{sums}_blocks"],
                                       name=name + "_blocksum_reshape")]
        nodes.append(helper.make_node("ReduceSum", [f"{sums}_blocks", axes], [sums], keepdims=0,
                                      name=name + "_blocksum"))
        if axes not in inits:
            inits[axes] = numpy_helper.from_array(np.array([-1], np.int64), axes)
            new = [t for t in (new, inits[axes]) if t is not None]
        block_sums[key] = sums
    elif key not in block_sums:
        e = f"blocksum_{k}_{block_size}"
        if e not in inits:
            blocks = -(-k // block_size)
            ones = np.zeros((k, blocks), dtype)  # (K, blocks)
            ones[np.arange(k), np.arange(k) // block_size] = 1
            inits[e] = new = numpy_helper.from_array(ones, e)
        block_sums[key] = f"{x}_blocksum{block_size}"
        nodes.append(helper.make_node("MatMul", [x, e], [block_sums[key]], name=name + "_blocksum"))
    nodes.append(helper.make_node("MatMul", [block_sums[key], offsets], [out + "_offset"], name=name + "_offset"))
    nodes.append(helper.make_node("Add", [nbits_out, out + "_offset"], [out], name=name + "_offset_add"))
    return nodes, new


def int4_graph(model, quantize: tuple[str, ...], block_size: int, zero_point: str, accuracy_level: int,
               fit: str = "rtn") -> int:
    """`nbits_graph` with 4 bits."""
    return nbits_graph(model, quantize, block_size, zero_point, accuracy_level, bits=4, fit=fit)


def nbits_graph(model, quantize: tuple[str, ...], block_size: int, zero_point: str, accuracy_level: int,
                bits: int = 4, fit: str = "rtn") -> int:
    """Replace each MatMul named in `quantize` (constant 2-D B) of an onnx.ModelProto by MatMulNBits (4 or 8
    bits), in place, one matrix at a time. Returns how many were replaced."""
    import onnx
    from onnx import helper, numpy_helper

    inits = {t.name: t for t in model.graph.initializer}
    uses: dict[str, int] = {}
    for node in model.graph.node:
        for i in node.input:
            uses[i] = uses.get(i, 0) + 1
    targets = set(quantize)
    ranks = {v.name: len(v.type.tensor_type.shape.dim) for v in [*model.graph.input, *model.graph.value_info]
             if v.type.tensor_type.HasField("shape")}
    nodes, done = [], 0
    block_sums: dict[tuple[str, int], str] = {}  # (input, K) -> its block sums, shared by q/k/v and gate/up
    for node in model.graph.node:
        b = inits.get(node.input[1]) if node.op_type == "MatMul" and len(node.input) == 2 else None
        if node.name not in targets or b is None or len(b.dims) != 2:
            nodes.append(node)
            continue
        m = quantize_matrix(numpy_helper.to_array(b).astype(np.float32), bits, block_size, zero_point, fit)
        base = b.name
        new = [numpy_helper.from_array(m.packed, base + f"_Q{bits}"),
               numpy_helper.from_array(m.scales, base + "_scales")]
        if m.zero_points is not None:
            new.append(numpy_helper.from_array(m.zero_points, base + "_zero_points"))
        model.graph.initializer.extend(new)
        out = list(node.output) if m.offsets is None else [node.output[0] + f"_Q{bits}"]
        nodes.append(helper.make_node("MatMulNBits", [node.input[0], *(t.name for t in new)], out,
                                      name=node.name + f"_Q{bits}", domain="com.microsoft", K=m.k, N=m.n,
                                      bits=bits, block_size=block_size, accuracy_level=accuracy_level))
        if m.offsets is not None:
            off = numpy_helper.from_array(m.offsets, base + "_offsets")
            model.graph.initializer.append(off)
            side, e = offset_nodes(node.input[0], out[0], node.output[0], node.name, m.k, block_size, off.name,
                                   block_sums, inits, np.float32, ranks.get(node.input[0]))
            nodes.extend(side)
            if e is not None:
                model.graph.initializer.extend(e if isinstance(e, list) else [e])
        uses[base] -= 1
        if uses[base] == 0:
            model.graph.initializer.remove(b)
        done += 1
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    if not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(onnx.helper.make_opsetid("com.microsoft", 1))
    return done
