"""The compiled Triton kernel on CUDA against the PyTorch reference (the CPU suite runs it interpreted)."""

import importlib.util

import pytest
import torch

from retrv.kernels import reference as ref

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None,
                                reason="triton is not installed (pip install 'retrv-edge[gpu]')")

# (K, L, Lq, H, D): odd sizes, then the papers' K = 50 at a 7B-like head size
SHAPES = [(2, 5, 3, 2, 8), (3, 37, 19, 3, 24), (4, 33, 17, 2, 80), (50, 256, 64, 8, 64), (7, 300, 45, 28, 128)]
TOL = {torch.float32: 1e-4, torch.float16: 1e-2}


def _inputs(k, length, lq, h, d, dtype, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    c = h * d
    r = lambda *s: torch.randn(*s, generator=g, device="cuda").to(dtype)  # noqa: E731
    cand_mask = (torch.rand(k, length, generator=g, device="cuda") > 0.3).long()
    cand_mask[:, 0] = 1
    if k > 3:
        cand_mask[1] = 0
    query_mask = torch.ones(lq, dtype=torch.long, device="cuda")
    query_mask[lq // 2 + 1:] = 0
    return dict(con_q=r(k, c), con_k=r(k, length, c), con_v=r(k, length, c), cand_mask=cand_mask,
                rel_q=r(k, length, c), query_k=r(lq, c), query_v=r(lq, c), query_mask=query_mask, pool_q=r(k, c))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("shape", SHAPES, ids=[f"K{s[0]}-L{s[1]}-Lq{s[2]}-H{s[3]}-D{s[4]}" for s in SHAPES])
def test_compiled_kernel_matches_reference(shape, dtype):
    from retrv.kernels import triton_icm as tri

    k, length, lq, h, d = shape
    x = _inputs(*shape, dtype)
    con, rel = tri.icm_attention(**x, num_heads=h)
    con_ref, rel_ref = ref.icm_attention(**x, num_heads=h)
    cross = tri.cross(x["rel_q"], x["query_k"], x["query_v"], x["query_mask"], h)
    cross_ref = ref.cross(x["rel_q"], x["query_k"], x["query_v"], x["query_mask"], h)
    torch.cuda.synchronize()
    for name, got, want in (("content", con, con_ref), ("relation_pool", rel, rel_ref), ("cross", cross, cross_ref)):
        diff = float((got.float() - want.float()).abs().max())
        assert diff <= TOL[dtype] * max(1.0, float(want.float().abs().max())), f"{name}: max abs diff {diff:.3g}"
        assert got.dtype == dtype


def test_icm_with_kernel_attention_equals_model_icm_on_cuda():
    from retrv.kernels import split
    from retrv.kernels.triton_icm import TritonCores
    from retrv.model.config import ICMConfig
    from retrv.model.icm import ICM

    torch.manual_seed(0)
    icm = ICM(ICMConfig(hidden_size=256, num_heads=8, num_layers=2)).cuda()
    with torch.no_grad():
        for name, p in icm.named_parameters():
            p.copy_(torch.randn_like(p) * 0.05 + (1.0 if "norm" in name else 0.0))
        cand, query = torch.randn(20, 70, 256, device="cuda"), torch.randn(33, 256, device="cuda")
        cand_mask = (torch.rand(20, 70, device="cuda") > 0.2).long()
        cand_mask[:, 0] = 1
        query_mask = torch.ones(33, dtype=torch.long, device="cuda")
        want_c, want_r = icm.content(cand, cand_mask), icm.relation(cand, cand_mask, query, query_mask)
        got_c = split.content(icm, cand, cand_mask, TritonCores)
        got_r = split.relation(icm, cand, cand_mask, query, query_mask, TritonCores)
    assert float((got_c - want_c).abs().max()) <= 1e-4 * max(1.0, float(want_c.abs().max()))
    assert float((got_r - want_r).abs().max()) <= 1e-4 * max(1.0, float(want_r.abs().max()))
