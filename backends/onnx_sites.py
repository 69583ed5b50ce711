"""Rewrite one standard ``Attention`` node of an ONNX graph into a variant's lowering.

The lowering is the same graph the torch path exports: a one-op program (``SiteOp``) with the
site's heads, head size, mask layout and attributes is exported with dynamic batch and
sequence sizes by ``backends.onnx_export``, and its nodes are spliced in place of the node,
every name prefixed with the site id so nothing collides.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import onnx
import torch
from onnx import helper

from backends.onnx_export import export_onnx
from compiler.variants.language import Variant


class SiteOp(torch.nn.Module):
    """One attnforge op with fixed attributes, as a program to export."""

    def __init__(self, variant: Variant, scale: float, causal: bool, softcap: float):
        super().__init__()
        self.variant, self.scale, self.causal, self.softcap = variant, scale, causal, softcap

    def forward(self, q, k, v, mask=None):
        if self.variant.kind == "sparse":
            return torch.ops.attnforge.sparse_attention(q, k, v, mask, self.scale, self.causal, self.softcap,
                                                        self.variant.text)
        if self.variant.kind == "linear":
            return torch.ops.attnforge.linear_attention(q, k, v, mask, self.scale, self.causal, self.variant.text)
        return torch.ops.attnforge.attention(q, k, v, mask, self.scale, self.causal, self.softcap)


@dataclass(frozen=True)
class SiteShape:
    """What the lowering needs to know statically about a site's operands."""

    num_heads: int
    num_kv_heads: int
    head_dim: int
    value_dim: int
    mask_shape: Optional[tuple] = None  # static sizes of the mask, None where dynamic
    mask_bool: bool = False
    lengths: Optional[tuple[int, int]] = None  # (query, key) lengths when the graph fixes them


def _example(shape: SiteShape):
    b, (sq, sk) = 2, shape.lengths or (16, 16)
    q = torch.zeros(b, shape.num_heads, sq, shape.head_dim)
    k = torch.zeros(b, shape.num_kv_heads, sk, shape.head_dim)
    v = torch.zeros(b, shape.num_kv_heads, sk, shape.value_dim)
    # A graph with fixed lengths gets a lowering with fixed lengths (a neighborhood's grid comes
    # from them); otherwise the sequence stays dynamic.
    seq = None if shape.lengths else torch.export.Dim("seq", min=2, max=1 << 20)
    batch = torch.export.Dim("batch", min=1, max=1 << 16)
    dyn = [{0: batch, **({2: seq} if seq is not None else {})}] * 3
    if shape.mask_shape is None:
        return (q, k, v), tuple(dyn)
    rank = len(shape.mask_shape)
    sizes, mdyn = [], {}
    for axis, size in enumerate(shape.mask_shape):
        from_end = rank - axis
        if size == 1:
            sizes.append(1)
        elif from_end <= 2:  # a query or key axis
            sizes.append(sq if from_end == 2 else sk)
            if seq is not None:
                mdyn[axis] = seq
        elif from_end == 3:
            sizes.append(size if size is not None else shape.num_heads)
        else:  # the batch axis
            sizes.append(b)
            mdyn[axis] = batch
    mask = torch.ones(sizes, dtype=torch.bool) if shape.mask_bool else torch.zeros(sizes)
    return (q, k, v, mask), (*dyn, mdyn)


def lowered_graph(variant: Variant, shape: SiteShape, scale: float, causal: bool, softcap: float):
    """(graph, lowering name) of the variant for a site of this shape."""
    args, dynamic = _example(shape)
    ep = torch.export.export(SiteOp(variant, scale, causal, softcap), args, dynamic_shapes=dynamic)
    ex = export_onnx(ep)
    (lowering,) = ex.lowerings.values()
    return ex.model, lowering


def splice(model: onnx.ModelProto, node: onnx.NodeProto, lowered: onnx.ModelProto, prefix: str) -> None:
    """Replace ``node`` (inputs q, k, v[, mask]; output y) by the lowered graph's nodes."""
    g, sub = model.graph, lowered.graph
    rename = {i.name: node.input[n] for n, i in enumerate(sub.input) if n < len(node.input) and node.input[n]}
    rename[sub.output[0].name] = node.output[0]

    def name(x: str) -> str:
        return x if not x else rename.get(x, f"{prefix}/{x}")

    new_nodes = []
    for n in sub.node:
        m = onnx.NodeProto()
        m.CopyFrom(n)
        m.name = f"{prefix}/{n.name}"
        del m.input[:]
        m.input.extend(name(x) for x in n.input)
        del m.output[:]
        m.output.extend(name(x) for x in n.output)
        new_nodes.append(m)
    for init in sub.initializer:
        t = onnx.TensorProto()
        t.CopyFrom(init)
        t.name = name(init.name)
        g.initializer.append(t)
    for vi in sub.value_info:
        if vi.name not in rename:
            c = onnx.ValueInfoProto()
            c.CopyFrom(vi)
            c.name = name(vi.name)
            g.value_info.append(c)
    index = list(g.node).index(node)
    g.node.remove(node)
    for offset, m in enumerate(new_nodes):
        g.node.insert(index + offset, m)
    have = {(o.domain or ""): o.version for o in model.opset_import}
    for o in lowered.opset_import:
        if (o.domain or "") not in have:
            model.opset_import.append(helper.make_opsetid(o.domain, o.version))
