"""Building the new nodes of one site, inserted before its anchor on commit."""

from __future__ import annotations

from typing import Optional

import numpy as np
import onnx_ir as ir

from passes.onnx.common import _int_dim, _shape, _used


class _Builder:
    """Collects new nodes for one site; they are inserted before ``anchor`` on commit."""

    def __init__(self, graph: ir.Graph, anchor: ir.Node):
        self.graph = graph
        self.anchor = anchor
        self.nodes: list[ir.Node] = []

    def op(self, op_type: str, inputs, num_outputs: int = 1, name: Optional[str] = None, **attrs):
        node = ir.Node("", op_type, inputs, ir.convenience.convert_attributes(attrs),
                       num_outputs=num_outputs, name=name)
        self.nodes.append(node)
        return node.outputs[0] if num_outputs == 1 else tuple(node.outputs)

    def const(self, array) -> ir.Value:
        return self.op("Constant", [], value=ir.tensor(np.asarray(array)))

    def ints(self, values) -> ir.Value:
        return self.const(np.asarray(values, dtype=np.int64))

    def scalar_like(self, value: float, dtype: Optional[ir.DataType]) -> ir.Value:
        np_dtype = dtype.numpy() if dtype is not None else np.float32
        return self.const(np.asarray(value, dtype=np_dtype))

    def transpose(self, x: ir.Value, perm: list[int]) -> ir.Value:
        """``Transpose(x, perm)``, its shape and type known when ``x``'s are."""
        out = self.op("Transpose", [x], perm=perm)
        s = _shape(x)
        if s is not None:
            out.shape = ir.Shape([s[i] for i in perm])
            out.type = x.type
        return out

    def split_heads(self, x: ir.Value, heads: int) -> ir.Value:
        """[B, S, H*D] -> [B, H, S, D]."""
        y = self.op("Reshape", [x, self.ints([0, 0, heads, -1])])
        return self.op("Transpose", [y], perm=[0, 2, 1, 3])

    def merge_heads(self, y: ir.Value) -> ir.Value:
        """[B, H, S, D] -> [B, S, H*D]."""
        t = self.op("Transpose", [y], perm=[0, 2, 1, 3])
        return self.op("Reshape", [t, self.ints([0, 0, -1])])

    def seq_len(self, x4: ir.Value) -> ir.Value:
        """Length of axis 2 of a 4-D value, as a 1-element int64 tensor."""
        d = _int_dim(x4, 2)
        if d is not None:
            return self.ints([d])
        return self.op("Shape", [x4], start=2, end=3)

    def discard(self):
        """Forget the nodes of a site that was rejected half-way: their inputs must not keep
        counting them as uses."""
        for node in self.nodes:
            for i in range(len(node.inputs)):
                node.replace_input_with(i, None)
        self.nodes = []

    def commit(self) -> list[ir.Node]:
        """Insert the nodes whose outputs are used; drop the rest (e.g. a layout copy that a
        later transpose folding made redundant)."""
        keep = []
        for node in reversed(self.nodes):
            if any(_used(o) for o in node.outputs) or node.op_type == "Attention":
                keep.append(node)
            else:
                for i in range(len(node.inputs)):
                    node.replace_input_with(i, None)
        keep.reverse()
        if keep:
            self.graph.insert_before(self.anchor, keep)
        self.nodes = []
        return keep
