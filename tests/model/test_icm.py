"""The ICM's relation step: `relation_shared` (what the exported graph runs) against `relation` (the reference)."""

from __future__ import annotations

import pytest
import torch

from retrv.model.config import ICMConfig
from retrv.model.icm import ICM

HIDDEN = 64


@pytest.fixture(scope="module")
def icm():
    torch.manual_seed(0)
    m = ICM(ICMConfig(hidden_size=HIDDEN, num_heads=4, num_layers=2)).eval()
    with torch.no_grad():  # random weights everywhere, biases and norm scales included, so no term vanishes
        for p in m.parameters():
            p.copy_(torch.randn_like(p) * 0.2 + (1.0 if p.ndim == 1 else 0.0))
    return m


def _inputs(k: int, length: int, lq: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    cand = torch.randn(k, length, HIDDEN, generator=g)
    mask = torch.ones(k, length, dtype=torch.long)
    mask[0, length // 2 + 1:] = 0  # a shorter first candidate
    query = torch.randn(lq, HIDDEN, generator=g)
    qmask = torch.ones(lq, dtype=torch.long)
    qmask[-1] = 0 if lq > 1 else 1  # a padded query position is ignored by both
    return cand, mask, query, qmask


@pytest.mark.parametrize("k", [1, 3, 50])
def test_relation_shared_equals_the_reference(icm, k):
    args = _inputs(k, 9, 6, seed=k)
    with torch.no_grad():
        want, got = icm.relation(*args), icm.relation_shared(*args)
    assert got.shape == (k, HIDDEN)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-4 * max(1.0, float(want.abs().max())))


def test_relation_shared_projects_the_query_once_and_never_the_candidates_in_the_pool(icm):
    """The work the change removes: ATT2's key/value projections see the Lq query rows once per layer whatever K
    (the reference projects K copies), and ATT1' projects no candidate token: its value projection sees one
    mixed row per candidate and head (K * H), whatever the candidates' length L."""
    rows: dict[str, list[int]] = {}
    hooks = []
    for stack in ("relation_attn", "relation_pool"):
        for i, layer in enumerate(getattr(icm, stack).layers):
            for proj in ("k_proj", "v_proj"):
                name = f"{stack}.{i}.{proj}"
                hooks.append(getattr(layer.attn, proj).register_forward_hook(
                    lambda mod, inp, out, name=name: rows.setdefault(name, []).append(inp[0].shape[:-1].numel())))
    k, lq = 5, 6
    try:
        with torch.no_grad():
            icm.relation_shared(*_inputs(k, 9, lq, seed=1))
            shared, rows = rows, {}
            icm.relation(*_inputs(k, 9, lq, seed=1))
            reference = rows
    finally:
        for h in hooks:
            h.remove()
    assert reference["relation_attn.0.k_proj"] == [k * lq] and reference["relation_pool.0.k_proj"] == [k * 9]
    heads = icm.cfg.num_heads
    assert shared == {**{f"relation_attn.{i}.{p}": [lq] for i in (0, 1) for p in ("k_proj", "v_proj")},
                      **{f"relation_pool.{i}.v_proj": [k * heads] for i in (0, 1)}}
