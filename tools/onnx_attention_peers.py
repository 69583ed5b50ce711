"""The attention-alone peers of tools/bench_onnx.py, built with onnx.helper: the unfused graph
a plain export runs, ai.onnx Attention-23, com.microsoft MultiHeadAttention and
GroupQueryAttention (with its local window); the torch SDPA module and window mask."""

from __future__ import annotations

from typing import Optional

import onnx
import torch
import torch.nn.functional as F
from onnx import TensorProto, helper

B, H, D = 1, 8, 64
WINDOW = 256


def _model(nodes, inits, s: int) -> onnx.ModelProto:
    shape = [B, H, s, D]
    ins = [helper.make_tensor_value_info(n, TensorProto.FLOAT, shape) for n in ("q", "k", "v")]
    out = [helper.make_tensor_value_info("y", TensorProto.FLOAT, shape)]
    graph = helper.make_graph(nodes, "attention", ins, out, initializer=inits)
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23), helper.make_opsetid("com.microsoft", 1)])
    m.ir_version = 10
    return m


def _i64(name, values):
    return helper.make_tensor(name, TensorProto.INT64, [len(values)], values)


def build_unfused(s: int, causal: bool) -> onnx.ModelProto:
    """What a plain export runs: MatMul(q, k^T) * scale (+ causal -inf bias from Trilu), Softmax, MatMul(v)."""
    nodes = [
        helper.make_node("Transpose", ["k"], ["kt"], perm=[0, 1, 3, 2]),
        helper.make_node("MatMul", ["q", "kt"], ["qk"]),
        helper.make_node("Mul", ["qk", "scale"], ["scores"]),
    ]
    inits = [helper.make_tensor("scale", TensorProto.FLOAT, [], [D ** -0.5])]
    logits = "scores"
    if causal:
        nodes += [
            helper.make_node("Shape", ["q"], ["n"], start=2, end=3),
            helper.make_node("Concat", ["n", "n"], ["nn"], axis=0),
            helper.make_node("ConstantOfShape", ["nn"], ["neg"],
                             value=helper.make_tensor("v", TensorProto.FLOAT, [1], [float("-inf")])),
            helper.make_node("Trilu", ["neg", "one"], ["bias"], upper=1),  # -inf strictly above the diagonal
            helper.make_node("Add", ["scores", "bias"], ["masked"]),
        ]
        inits.append(helper.make_tensor("one", TensorProto.INT64, [], [1]))
        logits = "masked"
    nodes += [helper.make_node("Softmax", [logits], ["p"], axis=-1), helper.make_node("MatMul", ["p", "v"], ["y"])]
    return _model(nodes, inits, s)


def build_onnx_attention(s: int, causal: bool) -> onnx.ModelProto:
    return _model([helper.make_node("Attention", ["q", "k", "v"], ["y"], is_causal=int(causal))], [], s)


def _packed_io(core: list, s: int, extra_inits=()) -> onnx.ModelProto:
    """[B, H, S, D] -> [B, S, H*D] for q, k, v; ``core`` maps q3, k3, v3 to o3; back to [B, H, S, D]."""
    nodes = []
    for x in ("q", "k", "v"):
        nodes += [helper.make_node("Transpose", [x], [x + "_t"], perm=[0, 2, 1, 3]),
                  helper.make_node("Reshape", [x + "_t", "shape3"], [x + "3"])]
    nodes += core
    nodes += [helper.make_node("Reshape", ["o3", "shape4"], ["o4"]),
              helper.make_node("Transpose", ["o4"], ["y"], perm=[0, 2, 1, 3])]
    inits = [_i64("shape3", [0, 0, H * D]), _i64("shape4", [0, 0, H, D]), *extra_inits]
    return _model(nodes, inits, s)


def build_mha(s: int, causal: bool) -> onnx.ModelProto:
    node = helper.make_node("MultiHeadAttention", ["q3", "k3", "v3"], ["o3"], domain="com.microsoft",
                            num_heads=H, unidirectional=int(causal))
    return _packed_io([node], s)


def gqa_local_window(window: int) -> int:
    """ORT keeps ``local_window_size`` keys including the query's own (j > i - size); attnforge's
    window:W keeps i-W <= j <= i, W+1 keys. Same keys: size = W + 1."""
    return window + 1


def build_gqa(s: int, causal: bool, window: Optional[int] = None) -> onnx.ModelProto:
    node = helper.make_node(
        "GroupQueryAttention", ["q3", "k3", "v3", "", "", "seqlens_k", "total_len"], ["o3"], domain="com.microsoft",
        num_heads=H, kv_num_heads=H, causal=int(causal),
        local_window_size=gqa_local_window(window) if window else -1)
    inits = [helper.make_tensor("seqlens_k", TensorProto.INT32, [B], [s - 1] * B),  # prefill: S-1 per batch
             helper.make_tensor("total_len", TensorProto.INT32, [], [s])]
    return _packed_io([node], s, inits)


class SDPA(torch.nn.Module):
    def __init__(self, causal: bool):
        super().__init__()
        self.causal = causal

    def forward(self, q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)


def window_mask(s: int, causal: bool, window: int = WINDOW) -> torch.Tensor:
    """attnforge's window:W: keys i-W <= j <= i (causal) or |i-j| <= W."""
    i = torch.arange(s)
    d = i[:, None] - i[None, :]
    return (d <= window) & (d >= (0 if causal else -window))
