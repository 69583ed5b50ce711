"""Rewrite discovered attention sites into ``attnforge::attention``.

The fused op reads the roots the discovery pass found (GQA repeats, ``k^T`` and scale
multiplications are bypassed), takes recovered causality as a flag and whatever mask remains
as one boolean or additive tensor. Everything between the roots and the old output is left
for dead-code elimination.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import fx

from compiler.builder import Builder
from compiler.graph import aten, dtype, hint, same_shape, sym_shape
from compiler.site import SITE_META, Operand, SiteMatch

ATTENTION = torch.ops.attnforge.attention.default


class NotRewritable(Exception):
    pass


@dataclass
class FusionResult:
    rewritten: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)  # site id -> reason
    fused_nodes: dict[str, str] = field(default_factory=dict)  # site id -> fused node name
    output_nodes: dict[str, str] = field(default_factory=dict)  # site id -> replaced node name


def _as_4d(build: Builder, op: Operand) -> fx.Node:
    x = op.node
    if op.transpose_last:
        x = build(aten.transpose.int, x, -2, -1)
    b, h = op.reshape_to
    s = sym_shape(x)
    br = len(s) - 2
    if br == 2 and [hint(d) for d in s[:2]] == [b, h]:
        return x  # discovery proved the flat batch order; same sizes means same layout
    if br == 0:
        return build(aten.unsqueeze.default, build(aten.unsqueeze.default, x, 0), 0)
    if br > 1:
        x = build(aten.flatten.using_ints, x, 0, br - 1)
    if b == 1 and isinstance(sym_shape(x)[0], int) and sym_shape(x)[0] == h:
        return build(aten.unsqueeze.default, x, 0)
    if not isinstance(h, int):
        raise NotRewritable("dynamic head count")
    return build(aten.unflatten.int, x, 0, [-1, h])


def _and_all(build: Builder, conds: list[fx.Node]) -> fx.Node:
    out = conds[0]
    for c in conds[1:]:
        out = build(aten.logical_and.default, out, c)
    return out


def _term_node(build: Builder, term) -> fx.Node:
    node, coef, tfs = term
    if isinstance(node, tuple):
        if node[0] == "where-all":
            _, residual, fill = node
            cond = _and_all(build, residual)
        else:
            _, cond, negate, fill = node
            if negate:
                cond = build(aten.logical_not.default, cond)
        node = build(aten.where.Scalar, cond, 0.0, fill)
    if coef != 1.0:
        node = build(aten.mul.Tensor, node, coef)
    for c, kind in tfs:
        node = build(aten.mul.Tensor if kind == "mul" else aten.div.Tensor, node, c)
    return node


def _mask(build: Builder, m: SiteMatch):
    keep = None
    if m.keep_masks:
        conds = [build(aten.logical_not.default, c) if neg else c for c, neg in m.keep_masks]
        keep = _and_all(build, conds)
    bias = None
    for t in m.bias_terms:
        n = _term_node(build, t)
        bias = n if bias is None else build(aten.add.Tensor, bias, n)
    if bias is None:
        return keep
    if keep is not None:
        bias = build(aten.add.Tensor, bias, build(aten.where.Scalar, keep, 0.0, float("-inf")))
    return bias


def _match_output(build: Builder, fused: fx.Node, target: fx.Node) -> fx.Node:
    ts, fs = sym_shape(target), sym_shape(fused)
    out = fused
    if not same_shape(ts, fs):
        br = len(ts) - 2
        if br == 1:
            out = build(aten.flatten.using_ints, fused, 0, 1)
        elif br == 0:
            out = build(aten.squeeze.dims, fused, [0, 1])
        else:
            if not all(isinstance(d, int) for d in ts[1:-2]):
                raise NotRewritable("dynamic head count in the output layout")
            out = build(aten.unflatten.int, build(aten.flatten.using_ints, fused, 0, 1), 0, [-1, *ts[1:-2]])
        if not same_shape(sym_shape(out), ts):
            raise NotRewritable("output layout not recognised")
    if dtype(out) != dtype(target):
        out = build(aten._to_copy.default, out, dtype=dtype(target))
    return out


def rewrite_site(gm: fx.GraphModule, m: SiteMatch) -> fx.Node:
    build = Builder(gm.graph, m.output, meta_from=m.anchor)
    q = _as_4d(build, m.q)
    for c, kind in m.scale_tensors:
        q = build(aten.mul.Tensor if kind == "mul" else aten.div.Tensor, q, c)
    k = _as_4d(build, m.k)
    v = _as_4d(build, m.v)
    mask = _mask(build, m)
    fused = build(ATTENTION, q, k, v, mask, float(m.scale), bool(m.site.causal), float(m.site.softcap))
    fused.meta[SITE_META] = m.site.id
    out = _match_output(build, fused, m.output)
    m.output.replace_all_uses_with(out)
    return fused


def fuse_attention(gm: fx.GraphModule, matches: list[SiteMatch], selected: set[str]) -> FusionResult:
    """Rewrite the sites whose id is in ``selected``; the graph is left for DCE."""
    res = FusionResult()
    for m in matches:
        if m.site.id not in selected:
            continue
        try:
            fused = rewrite_site(gm, m)
        except NotRewritable as e:
            res.skipped[m.site.id] = str(e)
            continue
        res.rewritten.append(m.site.id)
        res.fused_nodes[m.site.id] = fused.name
        res.output_nodes[m.site.id] = m.output.name
    gm.graph.lint()
    gm.recompile()
    return res
