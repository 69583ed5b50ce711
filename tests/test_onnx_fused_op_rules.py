"""The fused-op normalizers are onnxscript rewrite rules: each rule's pattern matches its op (and
only its op), its check declines an illegal node with the reason the report shows, and its
rewrite is the opset-23 Attention form, also when onnxscript's own RewriteRuleSet applies it."""

import numpy as np
import pytest

for _dep in ("onnx", "onnxruntime", "onnxscript", "onnx_ir"):
    pytest.importorskip(_dep)

import onnx  # noqa: E402
import onnxruntime as ort  # noqa: E402
import onnx_ir as ir  # noqa: E402
from onnx import TensorProto as TP  # noqa: E402
from onnx import helper as oh  # noqa: E402
from onnx import numpy_helper  # noqa: E402
from onnxscript.rewriter.pattern import MatchingTracer, MatchStatus  # noqa: E402

from passes.onnx.fused_op_rules import (GroupQueryAttentionRule, MultiHeadAttentionRule,  # noqa: E402
                                        OnnxAttentionRule, PackedAttentionRule, fused_op_rules)
from passes.onnx.fuser import _Fuser, _load, _to_target_opset  # noqa: E402
from passes.onnx_attention_fusion import fuse_onnx_attention  # noqa: E402

B, H, S, D = 2, 2, 4, 8
HKV = 1
RNG = np.random.default_rng(3)


def _vi(name, shape, dtype=TP.FLOAT):
    return oh.make_tensor_value_info(name, dtype, shape)


def _model(node, inputs, outputs, inits=(), opset=23):
    graph = oh.make_graph([node], "g", inputs, outputs, initializer=list(inits))
    opsets = [oh.make_opsetid("", opset), oh.make_opsetid("com.microsoft", 1)]
    return oh.make_model(graph, opset_imports=opsets, ir_version=10)


def _x(*shape, dtype=np.float32):
    return RNG.standard_normal(shape).astype(dtype)


# Each builder returns (model, feeds); ``bad`` turns on the one condition the rule declines.

def onnx_attention(bad=False):
    inputs = ["q", "k", "v", "", "pk", "pv"] if bad else ["q", "k", "v"]
    node = oh.make_node("Attention", inputs, ["y"], q_num_heads=H, kv_num_heads=HKV)
    vis = [_vi("q", [B, S, H * D]), _vi("k", [B, S, HKV * D]), _vi("v", [B, S, HKV * D])]
    feeds = {"q": _x(B, S, H * D), "k": _x(B, S, HKV * D), "v": _x(B, S, HKV * D)}
    if bad:
        vis += [_vi("pk", [B, HKV, 2, D]), _vi("pv", [B, HKV, 2, D])]
    return _model(node, vis, [_vi("y", [B, S, H * D])]), feeds


def multihead(bad=False):
    outputs = ["y", "present_k", "present_v"] if bad else ["y"]
    node = oh.make_node("MultiHeadAttention", ["q", "k", "v", "", "kpm"], outputs, domain="com.microsoft",
                        num_heads=H)
    kpm = np.ones((B, S), dtype=np.int32)
    kpm[1, 2:] = 0
    outs = [_vi("y", [B, S, H * D])] + ([_vi("present_k", None)] if bad else [])
    vis = [_vi(n, [B, S, H * D]) for n in "qkv"] + [_vi("kpm", [B, S], TP.INT32)]
    return _model(node, vis, outs), {**{n: _x(B, S, H * D) for n in "qkv"}, "kpm": kpm}


def packed(bad=False):
    hidden = 6
    node = oh.make_node("Attention", ["x", "w", "bias"], ["y"], domain="com.microsoft", num_heads=H,
                        **({"do_rotary": 1} if bad else {}))
    inits = [numpy_helper.from_array(_x(hidden, 3 * H * D) * 0.3, "w"), numpy_helper.from_array(_x(3 * H * D), "bias")]
    return _model(node, [_vi("x", [B, S, hidden])], [_vi("y", [B, S, H * D])], inits), {"x": _x(B, S, hidden)}


def gqa(bad=False):
    node = oh.make_node("GroupQueryAttention", ["q", "k", "v", "", "", "seqlens", "total"], ["y", "pk", "pv"],
                        domain="com.microsoft", num_heads=H, kv_num_heads=HKV,
                        **({"local_window_size": 2} if bad else {}))
    vis = [_vi("q", [B, S, H * D]), _vi("k", [B, S, HKV * D]), _vi("v", [B, S, HKV * D]), _vi("seqlens", [B], TP.INT32)]
    inits = [numpy_helper.from_array(np.array(S, dtype=np.int32), "total")]
    feeds = {"q": _x(B, S, H * D), "k": _x(B, S, HKV * D), "v": _x(B, S, HKV * D),
             "seqlens": np.array([S - 1, 1], dtype=np.int32)}
    return _model(node, vis, [_vi("y", [B, S, H * D])], inits), feeds


CASES = [
    (OnnxAttentionRule, onnx_attention, "past_key/past_value (KV cache) are not normalized"),
    (MultiHeadAttentionRule, multihead, "present key/value or qk outputs are used"),
    (PackedAttentionRule, packed, "do_rotary=1 is not normalized"),
    (GroupQueryAttentionRule, gqa, "local_window_size (sliding window) is not normalized"),
]
IDS = [c[0].__name__ for c in CASES]


def _fuser(model: onnx.ModelProto) -> tuple[_Fuser, ir.Node]:
    m = _load(model)
    _to_target_opset(m)
    return _Fuser(m), next(iter(m.graph))


def _run(model: onnx.ModelProto, feeds):
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    opts.intra_op_num_threads = 1
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"]).run(None, feeds)[0]


@pytest.mark.parametrize("cls,build,reason", CASES, ids=IDS)
def test_rule_matches_its_op_only(cls, build, reason):
    fuser, node = _fuser(build()[0])
    matched = [r.name for r in fuser.rules
               if r.match(fuser.model, fuser.graph, node, check_nodes_are_removable=False)]
    assert matched == [cls.__name__]


@pytest.mark.parametrize("cls,build,reason", CASES, ids=IDS)
def test_rule_rewrites_to_one_attention_with_the_same_numbers(cls, build, reason):
    model, feeds = build()
    out, res = fuse_onnx_attention(model)
    onnx.checker.check_model(out, full_check=True)
    assert [s.source for s in res.sites] == [cls.source] and not res.rejected
    assert [(n.domain, n.op_type) for n in out.graph.node if "Attention" in n.op_type] == [("", "Attention")]
    np.testing.assert_allclose(_run(out, feeds), _run(model, feeds), atol=1e-4)


@pytest.mark.parametrize("cls,build,reason", CASES, ids=IDS)
def test_check_declines_with_its_reason(cls, build, reason):
    model, _ = build(bad=True)
    fuser, node = _fuser(model)
    rule = next(r for r in fuser.rules if r.name == cls.__name__)
    tracer = MatchingTracer()
    assert not rule.match(fuser.model, fuser.graph, node, check_nodes_are_removable=False, tracer=tracer)
    [info] = tracer.best_matches_map[rule]
    assert info.status == MatchStatus.CONDITION_FAILED and info.match_result.reason == reason
    # The same reason reaches the fusion result, and the node is left alone.
    out, res = fuse_onnx_attention(model)
    assert not res.sites and [r for _, r in res.rejected] == [reason]
    assert [n.op_type for n in out.graph.node] == [model.graph.node[0].op_type]


def test_rule_set_runs_under_onnxscript():
    """The rules are plain onnxscript rules: RewriteRuleSet.apply_to_model rewrites the fused op."""
    model, feeds = multihead()
    fuser, _ = _fuser(model)
    assert fused_op_rules(fuser, standalone=True).apply_to_model(fuser.model) == 1
    out = ir.serde.serialize_model(fuser.model)
    assert [n.op_type for n in out.graph.node if "Attention" in n.op_type] == ["Attention"]
    np.testing.assert_allclose(_run(out, feeds), _run(model, feeds), atol=1e-4)
