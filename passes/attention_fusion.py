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

from compiler.ir.builder import Builder
from compiler.ir.graph import aten, dtype, hint, is_op, overloads, same_shape, sym_shape, val
from compiler.ir.ops import softmax_dtype
from compiler.ir.site import SITE_META, Operand, SiteMatch
from compiler.ir.errors import first_line

ATTENTION = torch.ops.attnforge.attention.default


class NotRewritable(Exception):
    pass


@dataclass
class FusionResult:
    rewritten: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)  # site id -> reason
    fused_nodes: dict[str, str] = field(default_factory=dict)  # site id -> fused node name
    output_nodes: dict[str, str] = field(default_factory=dict)  # site id -> replaced node name
    # site id -> node computing the site's value ([B, H, Sq, Dv]; the fused node, or the node
    # restoring rows the model attends uniformly); verification compares and forces it
    site_outputs: dict[str, str] = field(default_factory=dict)


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


def _keep_conds(build: Builder, node: tuple) -> list[fx.Node]:
    """The keep-polarity conditions of a ("where", ...) / ("where-all", ...) mask term."""
    if node[0] == "where-all":
        return list(node[1])
    _, cond, negate, _ = node
    return [build(aten.logical_not.default, cond) if negate else cond]


def _fill_mask(build: Builder, keep: fx.Node, cdt: torch.dtype) -> fx.Node:
    """``where(keep, 0, finfo(cdt).min)`` in the op's compute dtype: a row whose keys are all
    filled stays uniform over every key (the fill absorbs any score), as in the model."""
    zero = build(aten.scalar_tensor.default, 0.0, dtype=cdt)
    fill = build(aten.scalar_tensor.default, float(torch.finfo(cdt).min), dtype=cdt)
    return build(aten.where.self, keep, zero, fill)


def _site_rank(build: Builder, node: fx.Node, b: int, hq: int) -> fx.Node:
    """A mask or bias carried in the flat ``[B*H, Sq, Sk]`` score layout, as ``[B, H, Sq, Sk]``."""
    s = sym_shape(node)
    if s is not None and len(s) == 3 and b > 1 and hint(s[0]) == b * hq:
        return build(aten.unflatten.int, node, 0, [-1, hq])
    return node


def _term_node(build: Builder, term, cdt: torch.dtype) -> fx.Node:
    node, coef, tfs = term
    if isinstance(node, tuple):
        node = _fill_mask(build, _and_all(build, _keep_conds(build, node)), cdt)
    if coef != 1.0:
        node = build(aten.mul.Tensor, node, coef)
    for c, kind in tfs:
        node = build(aten.mul.Tensor if kind == "mul" else aten.div.Tensor, node, c)
    return node


def _mask(build: Builder, m: SiteMatch, cdt: torch.dtype):
    b, hq = m.batch_heads
    conds = [build(aten.logical_not.default, c) if neg else c for c, neg in m.keep_masks]
    bias = None
    filled: list[fx.Node] = []
    for t in m.bias_terms:
        node, coef, tfs = t
        if isinstance(node, tuple) and coef > 0 and node[-1] == float("-inf"):
            conds.extend(_keep_conds(build, node))  # an additive -inf mask is a keep-mask
            continue
        if isinstance(node, tuple) and coef > 0 and not tfs:
            # Finite fills replace masked scores: one mask for all of them, so that a key masked
            # twice is not -inf (fill + fill) while another is the fill.
            filled.extend(_keep_conds(build, node))
            continue
        n = _site_rank(build, _term_node(build, t, cdt), b, hq)
        bias = n if bias is None else build(aten.add.Tensor, bias, n)
    if filled:
        n = _site_rank(build, _fill_mask(build, _and_all(build, filled), cdt), b, hq)
        bias = n if bias is None else build(aten.add.Tensor, bias, n)
    keep = _site_rank(build, _and_all(build, conds), b, hq) if conds else None
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


def _uniform_rows(build: Builder, fused: fx.Node, v: fx.Node, rest: list, batch_heads) -> fx.Node:
    """Rows the model attends uniformly: its causal mask had a finite fill and every key a query
    row sees is masked by ``rest`` too, so every score of the row is the fill. The causal op
    gives such a row zeros; the model gives the mean of all values."""
    b, hq = batch_heads
    keep = _and_all(build, [build(aten.logical_not.default, c) if neg else c for c, neg in rest])
    keep = _site_rank(build, keep, b, hq)
    ks = sym_shape(keep)
    keep = build(aten.expand.default, keep, [*(build.size(keep, i) for i in range(len(ks) - 2)),
                                             build.size(fused, -2), build.size(v, -2)])
    seen = build(aten.cumsum.default, keep, -1)  # kept keys j <= current key, per row
    any_kept = build(aten.gt.Scalar, build(aten.diagonal.default, seen, 0, -2, -1), 0)  # [.., Sq]
    any_kept = build(aten.unsqueeze.default, any_kept, -1)
    mean = build(aten.mean.dim, v, [-2], True)  # [B, Hkv, 1, Dv]
    hkv = sym_shape(v)[1]
    if hkv != hq:  # query head h reads kv head h // (hq // hkv)
        mean = build(aten.repeat_interleave.self_int, mean, hq // hkv, 1)
    return build(aten.where.self, any_kept, fused, mean)


_STRIDED_VIEWS = overloads(aten.transpose, aten.permute, aten.unsqueeze, aten.squeeze, aten.expand, aten.alias,
                           aten.slice, aten.select, aten.detach)
_NEEDS_STRIDES = overloads(aten.view, aten._unsafe_view, aten.as_strided)


def _viewed_by_strides(node: fx.Node) -> bool:
    """Whether a consumer reinterprets ``node``'s memory (``view``), through views of it."""
    todo, seen = list(node.users), set()
    while todo:
        u = todo.pop()
        if u in seen:
            continue
        seen.add(u)
        if is_op(u, _NEEDS_STRIDES):
            return True
        if is_op(u, _STRIDED_VIEWS):
            todo.extend(u.users)
    return False


def _match_strides(build: Builder, out: fx.Node, target: fx.Node) -> fx.Node:
    """Give ``out`` the strides the replaced node had when a consumer ``view``s it (export drops a
    ``.contiguous()`` that was a no-op on the original layout); one copy, only then."""
    want, got = val(target), val(out)
    if not isinstance(want, torch.Tensor) or want.dim() < 2 or not _viewed_by_strides(target):
        return out
    ws = [hint(x) for x in want.stride()]
    if ws == [hint(x) for x in got.stride()] or not is_contiguous_strides(ws, [hint(x) for x in want.shape]):
        return out
    order = sorted(range(len(ws)), key=lambda d: (-ws[d], d))
    inverse = [order.index(d) for d in range(len(ws))]
    dense = build(aten.clone.default, build(aten.permute.default, out, order), memory_format=torch.contiguous_format)
    return build(aten.permute.default, dense, inverse)


def is_contiguous_strides(strides: list[int], sizes: list[int]) -> bool:
    """Strides of a dense, non-overlapping layout (some permutation of a contiguous tensor)."""
    expected = 1
    for d in sorted(range(len(strides)), key=lambda d: (strides[d], -d)):
        if sizes[d] != 1 and strides[d] != expected:
            return False
        expected *= sizes[d]
    return True


def rewrite_site(gm: fx.GraphModule, m: SiteMatch) -> tuple[fx.Node, fx.Node]:
    """Rewrite one site; returns (fused op node, node computing the site's [B, H, Sq, Dv] value)."""
    build = Builder(gm.graph, m.output, meta_from=m.anchor)
    q = _as_4d(build, m.q)
    for c, kind in m.scale_tensors:
        q = build(aten.mul.Tensor if kind == "mul" else aten.div.Tensor, q, c)
    k = _as_4d(build, m.k)
    v = _as_4d(build, m.v)
    mask = _mask(build, m, softmax_dtype(dtype(q)))
    fused = build(ATTENTION, q, k, v, mask, float(m.scale), bool(m.site.causal), float(m.site.softcap))
    fused.meta[SITE_META] = m.site.id
    value = fused
    if m.full_rows:
        value = _uniform_rows(build, fused, v, m.full_rows, m.batch_heads)
    out = _match_strides(build, _match_output(build, value, m.output), m.output)
    m.output.replace_all_uses_with(out)
    m.replaced_by = out
    return fused, value


def fuse_attention(gm: fx.GraphModule, matches: list[SiteMatch], selected: set[str]) -> FusionResult:
    """Rewrite the sites whose id is in ``selected``; the graph is left for DCE."""
    res = FusionResult()
    replaced: dict[fx.Node, fx.Node] = {}  # a rewritten site's old output -> what replaced it
    for m in matches:
        if m.site.id not in selected:
            continue
        for op in (m.q, m.k, m.v):  # a site may read the output of one rewritten before it
            op.node = replaced.get(op.node, op.node)
        m.scale_tensors = [(replaced.get(c, c), kind) for c, kind in m.scale_tensors]
        try:
            fused, value = rewrite_site(gm, m)
        except NotRewritable as e:
            res.skipped[m.site.id] = str(e)
            continue
        except Exception as e:  # noqa: BLE001 - one site that cannot be rebuilt stays dense, with why
            first = first_line(e)
            res.skipped[m.site.id] = f"rewrite failed ({type(e).__name__}: {first}); kept dense"
            continue
        res.rewritten.append(m.site.id)
        res.fused_nodes[m.site.id] = fused.name
        res.output_nodes[m.site.id] = m.output.name
        res.site_outputs[m.site.id] = value.name
        replaced[m.output] = m.replaced_by
    gm.graph.lint()
    gm.recompile()
    return res
