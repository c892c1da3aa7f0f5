"""The ONNX side of the TensorRT plugin, checked without TensorRT: the ICM graphs exported with one `retrv::` node
per attention core are valid ONNX, carry what TensorRT's parser needs to find the plugin, and compute
`model.icm.content/relation` when the custom nodes are evaluated by an independent numpy implementation."""

import sys

import numpy as np
import pytest
import torch

onnx = pytest.importorskip("onnx")

from retrv.export.graphs import icm_content_spec, icm_relation_spec, sample_inputs  # noqa: E402
from retrv.export.trt import export_icm_plugin_graphs  # noqa: E402
from retrv.kernels.trt_plugin import NAMESPACE, onnx_reference_ops, require_trt_plugin  # noqa: E402
from retrv.model import load_checkpoint  # noqa: E402
from retrv.model.tiny import write_tiny_checkpoint  # noqa: E402
from retrv.runtime.errors import MissingDependencyError  # noqa: E402


@pytest.fixture(scope="module")
def plugin_graphs(tmp_path_factory):
    root = tmp_path_factory.mktemp("plugin")
    model = load_checkpoint(write_tiny_checkpoint(root / "ckpt", icm=True, seed=5), dtype=torch.float32)
    return model, export_icm_plugin_graphs(model, root)


def test_custom_nodes_are_what_tensorrt_parses(plugin_graphs):
    model, paths = plugin_graphs
    layers = model.cfg.icm.num_layers
    expected = {"icm_content": {"IcmPoolAttention": layers},
                "icm_relation": {"IcmCrossAttention": layers, "IcmPoolAttention": layers}}
    for role, path in paths.items():
        m = onnx.load(str(path))
        onnx.checker.check_model(m)
        custom = [n for n in m.graph.node if n.domain == NAMESPACE]
        counts = {t: sum(n.op_type == t for n in custom) for t in {n.op_type for n in custom}}
        assert counts == expected[role]
        assert not any(n.op_type in ("Softmax",) for n in m.graph.node), "attention left outside the plugin"
        for n in custom:
            attrs = {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}
            assert attrs == {"num_heads": model.cfg.icm.num_heads, "plugin_namespace": NAMESPACE.encode()}
        assert {o.domain: o.version for o in m.opset_import}[NAMESPACE] == 1
        assert [i.name for i in m.graph.input] == list((icm_content_spec if role == "icm_content"
                                                        else icm_relation_spec)(model.cfg).inputs)


@pytest.mark.parametrize("variant", [1, 2])
def test_plugin_graphs_compute_the_icm(plugin_graphs, variant):
    from onnx.reference import ReferenceEvaluator

    model, paths = plugin_graphs
    for role, path in paths.items():
        spec = (icm_content_spec if role == "icm_content" else icm_relation_spec)(model.cfg)
        feeds = sample_inputs(spec, model.cfg, variant=variant)  # shapes other than the traced one
        got = ReferenceEvaluator(str(path), new_ops=onnx_reference_ops()).run(None, feeds)[0]
        t = {k: torch.from_numpy(v) for k, v in feeds.items()}
        with torch.no_grad():
            want = (model.icm.content(t["cand_tokens"], t["cand_mask"]) if role == "icm_content" else
                    model.icm.relation(t["cand_tokens"], t["cand_mask"], t["query_tokens"], t["query_mask"]))
        assert np.abs(got - want.numpy()).max() <= 1e-5 * max(1.0, float(want.abs().max())), role


def test_missing_tensorrt_gives_install_hint(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    with pytest.raises(MissingDependencyError, match=r"pip install 'retrv-edge\[gpu\]'.*JETSON"):
        require_trt_plugin()
