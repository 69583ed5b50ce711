"""The ONNX front end runs its passes through the same PassManager as the fx path: records timed
by the manager, the checker as a post-condition, failures that name the pass."""

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

import compiler.driver.onnx_program as onnx_program
from compiler.driver.onnx_program import ONNX, OnnxPassContext, rewrite_onnx
from compiler.driver.pipeline import Pass, PassManager
from passes.infra import PassConditionError, PassError, PassResult

B, H, S, D = 1, 2, 8, 4


def _attention_model() -> onnx.ModelProto:
    """MatMul(q, k^T) * scale, Softmax, MatMul(v): the plain form an exporter writes."""
    shape = [B, H, S, D]
    nodes = [helper.make_node("Transpose", ["k"], ["kt"], perm=[0, 1, 3, 2]),
             helper.make_node("MatMul", ["q", "kt"], ["qk"]),
             helper.make_node("Mul", ["qk", "scale"], ["scores"]),
             helper.make_node("Softmax", ["scores"], ["p"], axis=-1),
             helper.make_node("MatMul", ["p", "v"], ["y"])]
    graph = helper.make_graph(nodes, "attention",
                              [helper.make_tensor_value_info(n, TensorProto.FLOAT, shape) for n in "qkv"],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, shape)],
                              initializer=[helper.make_tensor("scale", TensorProto.FLOAT, [], [D ** -0.5])])
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    m.ir_version = 8
    return m


def _feeds():
    rng = np.random.default_rng(0)
    return {n: rng.standard_normal((B, H, S, D)).astype(np.float32) for n in "qkv"}


def test_onnx_records_come_from_the_manager():
    model = _attention_model()
    rw = rewrite_onnx(model, "window:2", feeds=_feeds())
    fusion, variants = rw.report.passes
    assert (fusion.name, variants.name) == ("onnx_attention_fusion", "onnx_attention_variants")
    assert fusion.nodes_before == len(model.graph.node) == 5
    assert fusion.nodes_after < fusion.nodes_before  # five nodes became one Attention (plus its inputs)
    assert (fusion.sites_found, fusion.sites_rewritten) == (1, 1)
    assert fusion.details == {"sources": [rw.report.sites[0].module_type]}
    assert variants.nodes_before == fusion.nodes_after and variants.nodes_after > variants.nodes_before
    assert (variants.sites_found, variants.sites_rewritten) == (1, 1)
    assert all(p.seconds > 0 for p in rw.report.passes)


def test_an_exception_inside_an_onnx_pass_names_the_pass(monkeypatch):
    def broken(*a, **k):
        raise ValueError("the lowering met a shape it does not know")

    monkeypatch.setattr(onnx_program, "lowered_graph", broken)
    with pytest.raises(PassError) as e:
        rewrite_onnx(_attention_model(), "window:2", feeds=_feeds())
    assert e.value.pass_name == "onnx_attention_variants"
    assert "shape it does not know" in str(e.value) and isinstance(e.value.__cause__, ValueError)


def test_an_onnx_pass_leaving_an_invalid_model_breaks_the_checker_condition():
    def dangling(ctx):
        out = onnx.ModelProto()
        out.CopyFrom(ctx.program)
        out.graph.node.append(helper.make_node("Relu", ["not_defined_anywhere"], ["r"]))
        return PassResult(changed=True, program=out)

    with pytest.raises(PassConditionError) as e:
        PassManager([Pass("dangling", dangling)], kind=ONNX).run(OnnxPassContext(_attention_model()))
    assert e.value.pass_name == "dangling" and e.value.condition == "onnx checker"
