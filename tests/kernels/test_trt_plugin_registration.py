"""`register_plugins()` against a stand-in for `tensorrt.plugin` that enforces the decorator schemas TensorRT
documents (register: annotated inputs then attributes -> TensorDesc; autotune: the same inputs, a subset of the
attributes, then `outputs`; impl: inputs, attributes, `outputs`, `stream`, and `tactic` when tactics are used).
TensorRT itself is not installed here; this checks that the plugin definitions are well-formed and that the shape
functions and autotune combinations say what they should."""

import inspect
import sys
import types

import pytest

from retrv.kernels import trt_plugin


class FakeDesc:
    def __init__(self, shape):
        self.shape = shape

    def like(self):
        return FakeDesc(self.shape)


class FakeCombination:
    def __init__(self):
        self.positions, self.types, self.tactic_ids = None, None, None

    def pos(self, positions, types):
        self.positions, self.types = positions, types

    def tactics(self, ids):
        self.tactic_ids = ids


def fake_trtp():
    mod = types.ModuleType("tensorrt.plugin")
    mod.TensorDesc, mod.Tensor, mod.AutoTuneCombination = FakeDesc, object, FakeCombination
    mod.defs = {}

    def decorator(kind):
        def outer(plugin_id):
            def inner(fn):
                mod.defs.setdefault(plugin_id, {})[kind] = fn
                return fn
            return inner
        return outer

    mod.register, mod.autotune, mod.impl = decorator("register"), decorator("autotune"), decorator("impl")
    return mod


@pytest.fixture
def trtp(monkeypatch):
    mod = fake_trtp()
    monkeypatch.setitem(sys.modules, "tensorrt", types.ModuleType("tensorrt"))
    monkeypatch.setitem(sys.modules, "tensorrt.plugin", mod)
    monkeypatch.setattr(trt_plugin, "_REGISTERED", False)
    trt_plugin.register_plugins()
    trt_plugin.register_plugins()  # idempotent: TensorRT refuses a second registration of the same id
    return mod


def test_three_plugins_with_complete_definitions(trtp):
    ns = trt_plugin.NAMESPACE
    assert set(trtp.defs) == {f"{ns}::{op}" for op in (trt_plugin.POOL_OP, trt_plugin.CROSS_OP,
                                                        trt_plugin.RELATION_POOL_OP)}
    for plugin_id, defs in trtp.defs.items():
        assert set(defs) == {"register", "autotune", "impl"}, plugin_id


def test_signatures_follow_the_documented_schema(trtp):
    for plugin_id, defs in trtp.defs.items():
        reg = inspect.signature(defs["register"])
        params = list(reg.parameters.values())
        assert all(p.annotation is not inspect.Parameter.empty for p in params), plugin_id
        assert reg.return_annotation is FakeDesc
        inputs = [p.name for p in params if p.annotation is FakeDesc]
        attrs = [p.name for p in params if p.annotation is not FakeDesc]
        assert attrs == ["num_heads"] and [p.annotation for p in params if p.name in attrs] == [int]
        assert [p.name for p in params] == inputs + attrs  # inputs first, then attributes
        assert list(inspect.signature(defs["autotune"]).parameters) == inputs + attrs + ["outputs"]
        assert list(inspect.signature(defs["impl"]).parameters) == inputs + attrs + ["outputs", "stream", "tactic"]


def test_shapes_and_type_combinations(trtp):
    ns = trt_plugin.NAMESPACE
    q2, q3 = FakeDesc(("K", "C")), FakeDesc(("K", "L", "C"))
    pool = trtp.defs[f"{ns}::{trt_plugin.POOL_OP}"]
    assert pool["register"](q2, q3, q3, FakeDesc(("K", "L")), 4).shape == ("K", "C")
    cross = trtp.defs[f"{ns}::{trt_plugin.CROSS_OP}"]
    assert cross["register"](q3, q2, q2, FakeDesc(("Lq",)), 4).shape == ("K", "L", "C")
    rp = trtp.defs[f"{ns}::{trt_plugin.RELATION_POOL_OP}"]
    assert rp["register"](q3, q2, q2, FakeDesc(("Lq",)), FakeDesc(("K", "C")), FakeDesc(("K", "L")), 4).shape \
        == ("K", "C")
    for plugin_id, n_io in ((f"{ns}::{trt_plugin.POOL_OP}", 5), (f"{ns}::{trt_plugin.RELATION_POOL_OP}", 7)):
        defs = trtp.defs[plugin_id]
        n_args = len(inspect.signature(defs["autotune"]).parameters)
        (combo,) = defs["autotune"](*([None] * n_args))
        assert combo.positions == list(range(n_io)) and combo.types == "FP32|FP16"
        assert trt_plugin.TACTIC_TORCH in combo.tactic_ids
