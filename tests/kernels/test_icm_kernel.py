"""The Triton ICM kernel against the PyTorch reference, on the CPU through Triton's interpreter.

TRITON_INTERPRET must be set before triton is first imported, and must not leak into other tests (tests/gpu runs
the compiled kernel in this same pytest process), so every kernel call runs in ONE child process started with the
variable set: this file, executed as a script, runs all cases and prints one JSON object. Shapes are small
because the interpreter runs each program in Python; they still cover head sizes below the 16-wide tile and not
powers of two, token counts that are not multiples of the tile, masked tokens, fully masked candidates, a fully
masked query, fp16, a 32-token tile, and the whole ICM (random weights) with its attention done by the kernel.
"""

import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch

FP32_TOL = 1e-5  # observed ~1e-6: the kernel differs from the reference by summation order only
FP16_TOL = 4e-3  # fp16 outputs of O(1) values: a few ulps (ulp(2.0) = 2e-3 in fp16)

# (K, L, Lq, H, D, dtype, block): K candidates of L tokens, Lq query tokens, H heads of size D
CASES = [
    (2, 5, 3, 2, 8, "float32", None),  # D < 16: padded head; L, Lq < one tile
    (3, 37, 19, 3, 24, "float32", None),  # nothing a multiple of the 16-tile; D not a power of two
    (4, 33, 17, 2, 40, "float32", None),  # fully masked candidate 1, half-masked query
    (2, 40, 20, 2, 16, "float32", 32),  # 32-token tiles (the GPU default)
    (3, 20, 7, 2, 16, "float16", None),
]


def _inputs(k, length, lq, h, d, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    dt = getattr(torch, dtype)
    c = h * d
    r = lambda *s: torch.randn(*s, generator=g).to(dt)  # noqa: E731
    cand_mask = (torch.rand(k, length, generator=g) > 0.3).long()
    cand_mask[:, 0] = 1
    if k > 3:
        cand_mask[1] = 0  # a fully masked candidate: the model averages all its positions
    query_mask = torch.ones(lq, dtype=torch.long)
    query_mask[lq // 2 + 1:] = 0
    return dict(con_q=r(k, c), con_k=r(k, length, c), con_v=r(k, length, c), cand_mask=cand_mask,
                rel_q=r(k, length, c), query_k=r(lq, c), query_v=r(lq, c), query_mask=query_mask, pool_q=r(k, c))


def _diff(a, b) -> float:
    return float((a.float() - b.float()).abs().max())


def run_cases() -> dict:
    """Child process only (TRITON_INTERPRET=1 already set): every case, max abs differences."""
    from retrv.kernels import reference as ref
    from retrv.kernels import split
    from retrv.kernels import triton_icm as tri
    from retrv.model.config import ICMConfig
    from retrv.model.icm import ICM

    out = {"cases": []}
    for i, (k, length, lq, h, d, dtype, block) in enumerate(CASES):
        x = _inputs(k, length, lq, h, d, dtype, seed=i)
        con, rel = tri.icm_attention(**x, num_heads=h, block_l=block, block_q=block)
        con_ref, rel_ref = ref.icm_attention(**x, num_heads=h)
        cross = tri.cross(x["rel_q"], x["query_k"], x["query_v"], x["query_mask"], h, block_l=block, block_q=block)
        cross_ref = ref.cross(x["rel_q"], x["query_k"], x["query_v"], x["query_mask"], h)
        out["cases"].append({"case": [k, length, lq, h, d, dtype, block], "content": _diff(con, con_ref),
                             "relation_pool": _diff(rel, rel_ref), "cross": _diff(cross, cross_ref),
                             "dtypes_kept": con.dtype == x["con_q"].dtype and rel.dtype == x["pool_q"].dtype})
    # a query whose every token is masked: the model's mask value makes it uniform, never NaN
    x = _inputs(2, 9, 4, 2, 8, "float32", seed=99)
    x["query_mask"] = torch.zeros_like(x["query_mask"])
    _, rel = tri.icm_attention(**x, num_heads=2)
    out["all_query_masked"] = _diff(rel, ref.icm_attention(**x, num_heads=2)[1])

    # the whole ICM on random weights, attention by the kernel, everything else by the graph parts
    torch.manual_seed(0)
    icm = ICM(ICMConfig(hidden_size=48, num_heads=4, num_layers=2))  # D = 12: padded to a 16-wide tile
    with torch.no_grad():
        for name, p in icm.named_parameters():
            p.copy_(torch.randn_like(p) * 0.2 + (1.0 if "norm" in name else 0.0))
        cand, query = torch.randn(3, 9, 48), torch.randn(6, 48)
        cand_mask = torch.ones(3, 9, dtype=torch.long)
        cand_mask[0, 5:] = 0
        cand_mask[2] = 0
        query_mask = torch.tensor([1, 1, 1, 1, 0, 0])
        t_con = split.content(icm, cand, cand_mask, tri.TritonCores)
        t_rel = split.relation(icm, cand, cand_mask, query, query_mask, tri.TritonCores)
        out["icm_content"] = _diff(t_con, icm.content(cand, cand_mask))
        out["icm_relation"] = _diff(t_rel, icm.relation(cand, cand_mask, query, query_mask))
        out["icm_scale"] = float(max(t_con.abs().max(), t_rel.abs().max()))
    return out


@pytest.fixture(scope="module")
def interpreted():
    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed (pip install triton); the kernel cannot be interpreted")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
        raise AssertionError(f"interpreter run failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("index", range(len(CASES)), ids=[f"K{c[0]}-L{c[1]}-Lq{c[2]}-H{c[3]}-D{c[4]}-{c[5]}"
                                                          + (f"-tile{c[6]}" if c[6] else "") for c in CASES])
def test_kernel_matches_reference(interpreted, index):
    case = interpreted["cases"][index]
    tol = FP16_TOL if case["case"][5] == "float16" else FP32_TOL
    for core in ("content", "relation_pool", "cross"):
        assert case[core] <= tol, f"{core} on {case['case']}: max abs diff {case[core]:.3g} > {tol}"
    assert case["dtypes_kept"]


def test_fully_masked_query_is_finite_and_matches(interpreted):
    assert interpreted["all_query_masked"] <= FP32_TOL


def test_icm_with_kernel_attention_equals_model_icm(interpreted):
    for name in ("icm_content", "icm_relation"):
        assert interpreted[name] <= FP32_TOL * max(1.0, interpreted["icm_scale"]), (name, interpreted[name])


def test_split_with_torch_cores_equals_model_icm():
    """The same split without triton: the graph parts around the reference cores reproduce model.icm exactly."""
    from retrv.kernels import split
    from retrv.model.config import ICMConfig
    from retrv.model.icm import ICM

    torch.manual_seed(1)
    icm = ICM(ICMConfig(hidden_size=64, num_heads=8, num_layers=3))
    with torch.no_grad():
        for name, p in icm.named_parameters():
            p.copy_(torch.randn_like(p) * 0.2 + (1.0 if "norm" in name else 0.0))
        cand, query = torch.randn(5, 11, 64), torch.randn(7, 64)
        cand_mask = (torch.rand(5, 11) > 0.4).long()
        cand_mask[:, 0] = 1
        query_mask = (torch.rand(7) > 0.3).long()
        assert torch.allclose(split.content(icm, cand, cand_mask), icm.content(cand, cand_mask), atol=1e-5)
        assert torch.allclose(split.relation(icm, cand, cand_mask, query, query_mask),
                              icm.relation(cand, cand_mask, query, query_mask), atol=1e-5)


def test_missing_triton_gives_install_hint(monkeypatch):
    from retrv.kernels import triton_icm
    from retrv.runtime.errors import MissingDependencyError

    monkeypatch.setattr(triton_icm, "_KERNELS", None)
    monkeypatch.setitem(sys.modules, "triton", None)  # import triton -> ImportError
    with pytest.raises(MissingDependencyError, match=r"pip install 'retrv-edge\[gpu\]'"):
        triton_icm.pool(torch.zeros(1, 16), torch.zeros(1, 2, 16), torch.zeros(1, 2, 16), torch.ones(1, 2), 1)


# (kernel, sm arch, dtype, head dim, content, relation): the interpreter does not run Triton's compiler, so the
# compiled path is checked by compiling to a cubin for real targets: A100/H100-class, Jetson Orin (sm_87), Turing
AOT = [("fused", 80, "float32", 64, True, True), ("fused", 87, "float16", 128, True, True),
       ("fused", 75, "float16", 24, False, True), ("fused", 90, "float32", 128, True, False),
       ("cross", 89, "float32", 40, True, True), ("cross", 87, "float16", 128, True, True)]


@pytest.mark.parametrize("kernel,arch,dtype,head_dim,content,relation", AOT,
                         ids=[f"{a[0]}-sm{a[1]}-{a[2]}-D{a[3]}" + ("" if a[4] and a[5] else "-one-task") for a in AOT])
def test_kernels_compile_for_gpu_targets(kernel, arch, dtype, head_dim, content, relation, monkeypatch):
    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed (pip install triton)")
    if os.environ.get("TRITON_INTERPRET"):
        pytest.skip("TRITON_INTERPRET is set in this process: kernels are interpreted, not compiled")
    monkeypatch.setenv("TRITON_DEFAULT_FP_FUSION", "1")  # triton 3.9 warns when unset; 1 is its current default
    from retrv.kernels.triton_icm import aot_compile

    compiled = aot_compile(kernel, arch, getattr(torch, dtype), head_dim, content=content, relation=relation)
    assert compiled.asm["cubin"] and ".entry" in compiled.asm["ptx"]
    shared_limit = {75: 64 << 10, 80: 163 << 10, 87: 163 << 10, 89: 99 << 10, 90: 227 << 10}[arch]
    assert compiled.metadata.shared <= shared_limit, f"{compiled.metadata.shared} B shared memory on sm_{arch}"


if __name__ == "__main__":
    print(json.dumps(run_cases()))
