"""The Triton kernels behind `kernels.triton_icm` (imported only from there, so a missing triton is one clear error).

Layout: every tensor is (rows, C) with heads side by side (head h = channels h*D:(h+1)*D), rows addressed through
explicit strides, so Linear outputs go in without a transpose or a copy. One program handles one (candidate, head)
pair, or one (candidate, token tile, head) triple for `cross`. Scores, softmax and accumulators are fp32; `tl.dot`
runs in the input dtype with an fp32 accumulator (fp32 inputs: IEEE, never TF32, so fp32 results match the
reference to fp32 rounding). Sizes that are not multiples of a tile are handled by masked loads: BLOCK_D is the head
size rounded up to a power of two (>= 16, tl.dot's minimum), out-of-range rows/columns load 0 and score -inf.
A padding token (mask 0) scores s + float32 min, exactly as the model's additive bias does.
"""

import triton
import triton.language as tl

NEG_MIN = tl.constexpr(-3.4028234663852886e38)  # float32 min: the model's mask_value(); jit code reads only constexpr globals


@triton.jit
def _online_update(m_i, l_i, acc, s, vals):
    """One online-softmax step: running max m_i (1,), sum l_i (1,), acc (BD,); scores s (BL,), values (BL, BD)."""
    m_new = tl.maximum(m_i, tl.max(s, axis=0))
    alpha = tl.exp(m_i - m_new)
    p = tl.exp(s - m_new)  # (BL,)
    l_i = l_i * alpha + tl.sum(p, axis=0)
    acc = acc * alpha + tl.sum(p[:, None] * vals, axis=0)
    return m_new, l_i, acc


@triton.jit
def _attend_query(qc, kq_ptr, vq_ptr, qmask_ptr, s_kq, s_vq, s_qm, col0, Lq, offs_d, dmask, scale,
                  BLOCK_L: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_D: tl.constexpr, IS_FP32: tl.constexpr):
    """R for a tile of candidate tokens: qc (BL, BD) in the input dtype attends over all Lq query tokens of one
    head, online softmax over query tiles. Returns R (BL, BD) in fp32; it stays in registers."""
    m2 = tl.zeros([BLOCK_L], dtype=tl.float32) - float("inf")
    l2 = tl.zeros([BLOCK_L], dtype=tl.float32)
    acc2 = tl.zeros([BLOCK_L, BLOCK_D], dtype=tl.float32)
    for j0 in range(0, Lq, BLOCK_Q):
        offs_j = j0 + tl.arange(0, BLOCK_Q)
        jmask = offs_j < Lq
        tile = jmask[:, None] & dmask[None, :]
        kt = tl.load(kq_ptr + offs_j[:, None] * s_kq + col0 + offs_d[None, :], mask=tile, other=0.0)  # (BQ, BD)
        vt = tl.load(vq_ptr + offs_j[:, None] * s_vq + col0 + offs_d[None, :], mask=tile, other=0.0)
        if IS_FP32:
            s2 = tl.dot(qc, tl.trans(kt), input_precision="ieee")  # (BL, BQ)
        else:
            s2 = tl.dot(qc, tl.trans(kt))
        qm = tl.load(qmask_ptr + offs_j * s_qm, mask=jmask, other=0)
        s2 = s2 * scale + tl.where(qm > 0, 0.0, NEG_MIN)[None, :]
        s2 = tl.where(jmask[None, :], s2, float("-inf"))
        m_new = tl.maximum(m2, tl.max(s2, axis=1))
        alpha = tl.exp(m2 - m_new)
        p = tl.exp(s2 - m_new[:, None])  # (BL, BQ)
        l2 = l2 * alpha + tl.sum(p, axis=1)
        if IS_FP32:
            pv = tl.dot(p, vt, input_precision="ieee")
        else:
            pv = tl.dot(p.to(vt.dtype), vt)
        acc2 = acc2 * alpha[:, None] + pv
        m2 = m_new
    return acc2 / l2[:, None]


@triton.jit
def _pool_program(k_id, h, q_ptr, k_ptr, v_ptr, mask_ptr, out_ptr,
                  s_q, s_kk, s_kl, s_vk, s_vl, s_mk, s_ml, s_o, L, D, scale,
                  BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr):
    """ATT1 / ATT1' attention for candidate k_id, head h: one query over the candidate's L tokens."""
    offs_d = tl.arange(0, BLOCK_D)
    dmask = offs_d < D
    col0 = h * D
    q = tl.load(q_ptr + k_id * s_q + col0 + offs_d, mask=dmask, other=0.0).to(tl.float32)  # (BD,)
    m_i = tl.zeros([1], dtype=tl.float32) - float("inf")
    l_i = tl.zeros([1], dtype=tl.float32)
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    for l0 in range(0, L, BLOCK_L):
        offs_l = l0 + tl.arange(0, BLOCK_L)
        lmask = offs_l < L
        tile = lmask[:, None] & dmask[None, :]
        kt = tl.load(k_ptr + k_id * s_kk + offs_l[:, None] * s_kl + col0 + offs_d[None, :], mask=tile, other=0.0)
        vt = tl.load(v_ptr + k_id * s_vk + offs_l[:, None] * s_vl + col0 + offs_d[None, :], mask=tile, other=0.0)
        mk = tl.load(mask_ptr + k_id * s_mk + offs_l * s_ml, mask=lmask, other=0)
        s = tl.sum(kt.to(tl.float32) * q[None, :], axis=1) * scale + tl.where(mk > 0, 0.0, NEG_MIN)
        s = tl.where(lmask, s, float("-inf"))
        m_i, l_i, acc = _online_update(m_i, l_i, acc, s, vt.to(tl.float32))
    out = acc / l_i
    tl.store(out_ptr + k_id * s_o + col0 + offs_d, out.to(out_ptr.dtype.element_ty), mask=dmask)


@triton.jit
def _relation_pool_program(k_id, h, qc_ptr, kq_ptr, vq_ptr, qmask_ptr, pq_ptr, cmask_ptr, out_ptr,
                           s_qck, s_qcl, s_kq, s_vq, s_qm, s_pq, s_mk, s_ml, s_o, L, Lq, D, scale,
                           BLOCK_L: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_D: tl.constexpr,
                           IS_FP32: tl.constexpr):
    """ATT2 then ATT1' for candidate k_id, head h, tile by tile over the candidate's tokens: each tile's R is
    computed in registers, scored against the pool query and folded into the pool's online softmax. R is never
    written to memory."""
    offs_d = tl.arange(0, BLOCK_D)
    dmask = offs_d < D
    col0 = h * D
    pq = tl.load(pq_ptr + k_id * s_pq + col0 + offs_d, mask=dmask, other=0.0).to(tl.float32)
    m_i = tl.zeros([1], dtype=tl.float32) - float("inf")
    l_i = tl.zeros([1], dtype=tl.float32)
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    for l0 in range(0, L, BLOCK_L):
        offs_l = l0 + tl.arange(0, BLOCK_L)
        lmask = offs_l < L
        tile = lmask[:, None] & dmask[None, :]
        qc = tl.load(qc_ptr + k_id * s_qck + offs_l[:, None] * s_qcl + col0 + offs_d[None, :], mask=tile, other=0.0)
        r = _attend_query(qc, kq_ptr, vq_ptr, qmask_ptr, s_kq, s_vq, s_qm, col0, Lq, offs_d, dmask, scale,
                          BLOCK_L, BLOCK_Q, BLOCK_D, IS_FP32)  # (BL, BD) fp32
        r = tl.where(tile, r, 0.0)
        mk = tl.load(cmask_ptr + k_id * s_mk + offs_l * s_ml, mask=lmask, other=0)
        s = tl.sum(r * pq[None, :], axis=1) * scale + tl.where(mk > 0, 0.0, NEG_MIN)
        s = tl.where(lmask, s, float("-inf"))
        m_i, l_i, acc = _online_update(m_i, l_i, acc, s, r)
    out = acc / l_i
    tl.store(out_ptr + k_id * s_o + col0 + offs_d, out.to(out_ptr.dtype.element_ty), mask=dmask)


@triton.jit
def icm_fused_kernel(
    # content: ATT1's attention
    cq_ptr, ck_ptr, cv_ptr, cmask_ptr, con_out_ptr,
    s_cq, s_ckk, s_ckl, s_cvk, s_cvl,
    # relation: ATT2 + ATT1' attention
    qc_ptr, kq_ptr, vq_ptr, qmask_ptr, pq_ptr, rel_out_ptr,
    s_qck, s_qcl, s_kq, s_vq, s_qm, s_pq,
    # shared
    s_mk, s_ml, s_co, s_ro, L, Lq, D, scale,
    DO_CONTENT: tl.constexpr, DO_RELATION: tl.constexpr, REL_TASK: tl.constexpr,
    BLOCK_L: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_D: tl.constexpr, IS_FP32: tl.constexpr,
):
    """Grid (K, H, tasks): axis 2 picks the token (0 = content, REL_TASK = relation). One launch gives both tokens'
    attention for every candidate and head."""
    k_id = tl.program_id(0)
    h = tl.program_id(1)
    task = tl.program_id(2)
    if DO_CONTENT:
        if task == 0:
            _pool_program(k_id, h, cq_ptr, ck_ptr, cv_ptr, cmask_ptr, con_out_ptr,
                          s_cq, s_ckk, s_ckl, s_cvk, s_cvl, s_mk, s_ml, s_co, L, D, scale, BLOCK_L, BLOCK_D)
    if DO_RELATION:
        if task == REL_TASK:
            _relation_pool_program(k_id, h, qc_ptr, kq_ptr, vq_ptr, qmask_ptr, pq_ptr, cmask_ptr, rel_out_ptr,
                                   s_qck, s_qcl, s_kq, s_vq, s_qm, s_pq, s_mk, s_ml, s_ro, L, Lq, D, scale,
                                   BLOCK_L, BLOCK_Q, BLOCK_D, IS_FP32)


@triton.jit
def cross_kernel(qc_ptr, kq_ptr, vq_ptr, qmask_ptr, out_ptr,
                 s_qck, s_qcl, s_kq, s_vq, s_qm, s_ok, s_ol, L, Lq, D, scale,
                 BLOCK_L: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_D: tl.constexpr, IS_FP32: tl.constexpr):
    """ATT2's attention alone, R written out: grid (K, cdiv(L, BLOCK_L), H). What the ICM as built needs, because
    its MLP and norms sit between ATT2 and ATT1' (kernels/split.py)."""
    k_id = tl.program_id(0)
    l0 = tl.program_id(1) * BLOCK_L
    h = tl.program_id(2)
    offs_d = tl.arange(0, BLOCK_D)
    dmask = offs_d < D
    col0 = h * D
    offs_l = l0 + tl.arange(0, BLOCK_L)
    tile = (offs_l < L)[:, None] & dmask[None, :]
    qc = tl.load(qc_ptr + k_id * s_qck + offs_l[:, None] * s_qcl + col0 + offs_d[None, :], mask=tile, other=0.0)
    r = _attend_query(qc, kq_ptr, vq_ptr, qmask_ptr, s_kq, s_vq, s_qm, col0, Lq, offs_d, dmask, scale,
                      BLOCK_L, BLOCK_Q, BLOCK_D, IS_FP32)
    tl.store(out_ptr + k_id * s_ok + offs_l[:, None] * s_ol + col0 + offs_d[None, :],
             r.to(out_ptr.dtype.element_ty), mask=tile)
