"""Canonicalize the graph before attention discovery: one spelling per piece of math.

Models write the same attention in many ways; the matcher should see one. Each rule here is
exact (the same math, at most a different rounding order) and local:

* **functionalize**: in-place ops (``add_``, ``div_``, ``masked_fill_``, ``+=``) that
  torch.export's training IR keeps become their functional forms, by torch's own
  functionalization (``run_decompositions`` with an empty table decomposes nothing);
* **einsum** of a batched matrix product becomes ``permute`` + ``matmul`` (+ ``permute``), and
  ``x.mT`` becomes ``x.transpose(-2, -1)``;
* ``exp(log_softmax(x))`` and ``exp(x - max) / sum(exp(x - max))`` become ``softmax(x)``;
  ``e * reciprocal(s)`` becomes ``e / s`` (``1 / s`` in Python is ``reciprocal(s) * 1``, and ``x * 1`` is ``x``);
* a softmax over 5-D grouped scores ``[B, Hkv, G, Sq, Sk]`` runs on their 4-D view;
* ``transpose(matmul(a, b))`` becomes ``matmul(bᵀ, aᵀ)`` when that cancels a transpose
  (``(vᵀ pᵀ)ᵀ`` is ``p v``);
* a **bool tensor added** to float scores is cast to the scores' dtype first: it is a 0/1
  bias, not a keep-mask, and saying so in the graph keeps every later pass from guessing;
* **views sink into the product**: an elementwise op on the scores applied in another view
  (a mask added to a ``(B·H, S, S)`` or a 5-D windowed view, then viewed back) is moved after
  the views, with its other operands re-laid-out, so that every mask, bias and scale on a
  score path is applied in the layout the softmax reads.

The pass reports how often each rule fired.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from typing import Optional

import torch
from torch import fx
from torch.export import ExportedProgram

from compiler.ir import views as L
from compiler.ir.builder import Builder
from compiler.ir.graph import aten, count_nodes, dtype, is_op, overloads, reaches, same_shape, sym_shape

EINSUM = overloads(aten.einsum)
EXPS = overloads(aten.exp)
LOG_SOFTMAX = overloads(aten.log_softmax, aten._log_softmax)
RECIPROCAL = overloads(aten.reciprocal)
MATMULS = overloads(aten.matmul, aten.bmm)
PRODUCTS = MATMULS | overloads(aten.baddbmm)
ADD_SUB = overloads(aten.add, aten.sub)
# Elementwise ops a score path may take in another view; each is moved after the view.
_SINKABLE = (
    overloads(aten.add, aten.sub, aten.mul, aten.div, aten.where, aten.masked_fill, aten.tanh)
    | overloads(aten._to_copy, aten.to)
    | L.IDENTITIES
)


def _mutating(node: fx.Node) -> bool:
    schema = getattr(node.target, "_schema", None)
    return node.op == "call_function" and schema is not None and schema.is_mutable


def functionalize(ep: ExportedProgram) -> tuple[ExportedProgram, int]:
    """Functional form of ``ep`` when an in-place op writes to a tensor computed from a matrix
    product (scores, probabilities), by torch's functionalization; else ``ep`` itself.

    Functionalization also rewrites every ``reshape`` as ``view``/``clone`` and bakes in the
    strides export saw, so programs whose in-place ops only build masks are left as they are.
    """
    n = sum(1 for node in ep.graph.nodes if _mutating(node) and node.args and isinstance(node.args[0], fx.Node)
            and _reaches_product(node.args[0], budget=256))
    if not n:
        return ep, 0
    ep = ep.run_decompositions({})
    for node in ep.graph.nodes:
        # Functionalization traced each reshape as a view of the strides export saw; a rewrite
        # may produce other strides, and in a graph without mutation a reshape means the same.
        if node.op == "call_function" and node.target is aten.view.default:
            node.target = aten.reshape.default
    ep.graph_module.recompile()
    return ep, n


# ----------------------------------------------------------------------------- einsum


def _einsum_terms(eq: str, ranks: list[int]) -> Optional[tuple[list[str], str]]:
    eq = eq.replace(" ", "")
    if "->" not in eq:
        return None
    lhs, out = eq.split("->")
    ins = lhs.split(",")
    if len(ins) != 2:
        return None
    if "..." in eq:
        spare = [c for c in string.ascii_letters if c not in eq]
        n = max(r - len(t.replace("...", "")) for t, r in zip(ins, ranks))
        ell = "".join(spare[:n])
        ins = [t.replace("...", ell[len(ell) - (r - len(t.replace("...", ""))):]) for t, r in zip(ins, ranks)]
        out = out.replace("...", ell)
    if not all(re.fullmatch(r"[A-Za-z]*", t) for t in (*ins, out)):
        return None
    if any(len(set(t)) != len(t) for t in (*ins, out)) or [len(t) for t in ins] != ranks:
        return None
    return ins, out


def _einsum_as_matmul(gm: fx.GraphModule, node: fx.Node) -> bool:
    """``einsum("...mk,...kn->...mn")`` in any letter order -> permute + matmul + permute."""
    eq, operands = node.args[0], node.args[1]
    if len(operands) != 2 or not all(isinstance(o, fx.Node) for o in operands):
        return False
    ranks = [len(sym_shape(o) or ()) for o in operands]
    parsed = _einsum_terms(eq, ranks)
    if parsed is None:
        return False
    (a, b), out = parsed
    batch = [c for c in out if c in a and c in b]
    m = [c for c in a if c in out and c not in b]
    n = [c for c in b if c in out and c not in a]
    k = [c for c in a if c in b and c not in out]
    if len(m) != 1 or len(n) != 1 or len(k) != 1 or len(batch) + 2 != len(out):
        return False
    if set(a) != set(batch + m + k) or set(b) != set(batch + k + n):
        return False
    build = Builder(gm.graph, node)

    def arrange(x: fx.Node, have: str, want: str) -> fx.Node:
        perm = [have.index(c) for c in want]
        return x if perm == list(range(len(perm))) else build(aten.permute.default, x, perm)

    bs = "".join(batch)
    prod = build(aten.matmul.default, arrange(operands[0], a, bs + m[0] + k[0]),
                 arrange(operands[1], b, bs + k[0] + n[0]))
    res = arrange(prod, bs + m[0] + n[0], out)
    node.replace_all_uses_with(res)
    return True


# ----------------------------------------------------------------------------- small rewrites


def _is_last_two_transpose(node: fx.Node) -> bool:
    if not is_op(node, L.TRANSPOSES):
        return False
    n = len(sym_shape(node))
    return sorted((node.args[1] % n, node.args[2] % n)) == [n - 2, n - 1]


def _transposed(build: Builder, x: fx.Node) -> fx.Node:
    return x.args[0] if _is_last_two_transpose(x) else build(aten.transpose.int, x, -2, -1)


def _transpose_of_product(gm: fx.GraphModule, node: fx.Node) -> bool:
    """``(aᵀ bᵀ)ᵀ``-like: transpose(matmul(a, b)) -> matmul(bᵀ, aᵀ) when a or b is a transpose."""
    if not _is_last_two_transpose(node):
        return False
    prod = node.args[0]
    if not is_op(prod, MATMULS) or len(prod.users) != 1:
        return False
    a, b = prod.args[:2]
    if not (isinstance(a, fx.Node) and isinstance(b, fx.Node)):
        return False
    if min(len(sym_shape(a)), len(sym_shape(b))) < 2 or not (_is_last_two_transpose(a) or _is_last_two_transpose(b)):
        return False
    build = Builder(gm.graph, node, meta_from=prod)
    new = build(prod.target, _transposed(build, b), _transposed(build, a))
    if not same_shape(sym_shape(new), sym_shape(node)):
        return False
    node.replace_all_uses_with(new)
    return True


def _matrix_transpose(gm: fx.GraphModule, node: fx.Node) -> bool:
    """``x.mT`` is ``x.transpose(-2, -1)``: one spelling for layout tracing."""
    build = Builder(gm.graph, node)
    node.replace_all_uses_with(build(aten.transpose.int, node.args[0], -2, -1))
    return True


SOFTMAXES = overloads(aten.softmax, aten._softmax, aten._safe_softmax)


def _hand_softmax(gm: fx.GraphModule, node: fx.Node) -> bool:
    """``exp(x - max(x)) / sum(...)`` written out is ``softmax(x, -1)``."""
    from passes.softmax_forms import softmax_input

    x = softmax_input(node)
    if x is None:
        return False
    build = Builder(gm.graph, node)
    node.replace_all_uses_with(build(aten.softmax.int, x, -1))
    return True


def _grouped_softmax(gm: fx.GraphModule, node: fx.Node) -> bool:
    """A softmax over ``[B, Hkv, group, Sq, Sk]`` scores (GQA as a 5-D grouped view) runs on their
    ``[B, Hkv * group, Sq, Sk]`` view, so that its masks and scales meet the scores in 4-D."""
    x = node.args[0]
    shape = sym_shape(x)
    if shape is None or len(shape) != 5 or node.args[1] not in (-1, 4):
        return False
    if not all(isinstance(d, int) for d in shape[1:3]):
        return False
    build = Builder(gm.graph, node)
    sizes = build.sizes(x)
    x4 = build(aten.reshape.default, x, [sizes[0], shape[1] * shape[2], *sizes[3:]])
    sm = build(node.target, x4, -1, *node.args[2:], **node.kwargs)
    node.replace_all_uses_with(build(aten.view.default, sm, sizes))
    return True


def _exp_of_log_softmax(gm: fx.GraphModule, node: fx.Node) -> bool:
    if not is_op(node, EXPS) or not is_op(node.args[0], LOG_SOFTMAX):
        return False
    ls = node.args[0]
    build = Builder(gm.graph, node, meta_from=ls)
    if ls.target is aten._log_softmax.default:
        new = build(aten._softmax.default, *ls.args)
    else:
        new = build(aten.softmax.int, *ls.args, **ls.kwargs)
    node.replace_all_uses_with(new)
    return True


def _is_one(x) -> bool:
    return not isinstance(x, bool) and isinstance(x, (int, float)) and x == 1


def _times_one(gm: fx.GraphModule, node: fx.Node) -> bool:
    """``x * 1`` and ``x / 1`` are ``x`` (a Python scalar never changes a tensor's dtype)."""
    if not is_op(node, L.MULS | L.DIVS) or len(node.args) != 2 or node.kwargs:
        return False
    x, c = node.args
    if is_op(node, L.MULS) and _is_one(x) and isinstance(c, fx.Node):
        x, c = c, x
    if not (isinstance(x, fx.Node) and _is_one(c) and dtype(x) == dtype(node)):
        return False
    node.replace_all_uses_with(x)
    return True


def _mul_by_reciprocal(gm: fx.GraphModule, node: fx.Node) -> bool:
    """``e * reciprocal(s)`` -> ``e / s``."""
    if not is_op(node, L.MULS) or len(node.args) != 2 or node.kwargs:
        return False
    for e, r in (node.args, node.args[::-1]):
        if isinstance(e, fx.Node) and is_op(r, RECIPROCAL) and same_shape(sym_shape(e), sym_shape(node)):
            build = Builder(gm.graph, node)
            node.replace_all_uses_with(build(aten.div.Tensor, e, r.args[0]))
            return True
    return False


def _bool_bias(gm: fx.GraphModule, node: fx.Node) -> bool:
    """``scores + bool_tensor``: make the 0/1 float bias explicit."""
    if not is_op(node, ADD_SUB) or len(node.args) < 2:
        return False
    target = dtype(node)
    if target is None or not target.is_floating_point:
        return False
    changed = False
    args = list(node.args)
    for i in (0, 1):
        x = args[i]
        if isinstance(x, fx.Node) and dtype(x) == torch.bool:
            build = Builder(gm.graph, node, meta_from=x)
            args[i] = build(aten._to_copy.default, x, dtype=target)
            changed = True
    if changed:
        node.args = tuple(args)
    return changed


# ----------------------------------------------------------------------------- views


def _reaches_product(node: fx.Node, budget: int = 64) -> bool:
    return reaches(node, lambda n: is_op(n, PRODUCTS | EINSUM), budget)


def _score_operand(node: fx.Node) -> Optional[fx.Node]:
    """The one tensor operand of an elementwise op that carries the scores (same shape)."""
    path = [a for a in node.all_input_nodes if same_shape(sym_shape(a), sym_shape(node)) and _reaches_product(a)]
    return path[0] if len(path) == 1 else None


def _sink_view(gm: fx.GraphModule, view: fx.Node) -> Optional[fx.Node]:
    """view(op(x, m)) -> op(view(x), m re-laid-out); returns the new op node."""
    op = view.args[0]
    users = [u for u in op.users if u.target is not aten._assert_tensor_metadata.default]
    if not is_op(op, _SINKABLE) or users != [view] or not L.keeps_last_two(op, view):
        return None
    if is_op(op, L.DIVS) and op.kwargs.get("rounding_mode") is not None:
        return None
    x = _score_operand(op)
    if x is None:
        return None
    shape = view.args[1]
    build = Builder(gm.graph, view, meta_from=op)

    def moved(a):
        if not isinstance(a, fx.Node):
            return a
        s = sym_shape(a)
        if s is None:
            return a
        if a is x or same_shape(s, sym_shape(op)):
            return build(view.target, a, shape)
        if len(s) == 0:
            return a
        return build(aten.reshape.default, build(aten.expand.default, a, build.sizes(x)), shape)

    args = tuple(moved(a) for a in op.args)
    kwargs = {k: moved(v) for k, v in op.kwargs.items()}
    new = build(op.target, *args, **kwargs)
    view.replace_all_uses_with(new)
    # Erase the old pair now: the next view up must see its op used once.
    gm.graph.erase_node(view)
    for u in list(op.users):  # metadata checks of a value nothing computes from any more
        if u.target is aten._assert_tensor_metadata.default and not u.users:
            gm.graph.erase_node(u)
    if not op.users:
        gm.graph.erase_node(op)
    return new


def _sink_views(gm: fx.GraphModule, scores: fx.Node) -> int:
    """Sink the views on the score path that ends at ``scores`` into its product, so every
    elementwise op on the path runs in the layout of ``scores``; returns how many moved."""
    count, cur, budget = 0, scores, 64
    target = sym_shape(scores)
    while isinstance(cur, fx.Node) and cur.op == "call_function" and budget:
        budget -= 1
        if is_op(cur, PRODUCTS | EINSUM):
            break
        if is_op(cur, L.VIEWS) and isinstance(cur.args[0], fx.Node) and same_shape(sym_shape(cur), target):
            inner = cur.args[0]
            if is_op(inner, L.VIEWS) and isinstance(inner.args[0], fx.Node) and same_shape(
                    sym_shape(inner.args[0]), target):
                cur.replace_all_uses_with(inner.args[0])  # a view and its inverse
                count += 1
                cur = inner.args[0]
                continue
            new = _sink_view(gm, cur)
            if new is not None:
                count += 1
                cur = new
                continue
            cur = inner
        elif is_op(cur, L.VIEWS | L.IDENTITIES) and isinstance(cur.args[0], fx.Node):
            cur = cur.args[0]
        elif is_op(cur, _SINKABLE):
            cur = _score_operand(cur)
        else:
            break
    return count


# ----------------------------------------------------------------------------- driver

_LOCAL_RULES = {
    "einsum_to_matmul": (EINSUM, _einsum_as_matmul),
    "matrix_transpose": (overloads(aten.mT), _matrix_transpose),
    "times_one": (L.MULS | L.DIVS, _times_one),
    "reciprocal_to_div": (L.MULS, _mul_by_reciprocal),
    "log_softmax_exp": (EXPS, _exp_of_log_softmax),
    "hand_written_softmax": (L.DIVS, _hand_softmax),
    "grouped_softmax_4d": (SOFTMAXES, _grouped_softmax),
    "transpose_of_product": (L.TRANSPOSES, _transpose_of_product),
    "bool_bias": (ADD_SUB, _bool_bias),
}


def canonicalize(ep: ExportedProgram) -> tuple[ExportedProgram, dict]:
    """Canonical form of ``ep`` (a new program when functionalization was needed); stats per rule."""
    from passes.softmax_forms import softmax_input

    before = count_nodes(ep.graph_module)
    ep, inplace = functionalize(ep)
    stats: Counter = Counter()
    if inplace:
        stats["functionalized_inplace_ops"] = inplace
    gm = ep.graph_module
    for name, (ops, rule) in _LOCAL_RULES.items():
        for node in list(gm.graph.nodes):
            if node.op == "call_function" and node.target in ops and node.users and rule(gm, node):
                stats[name] += 1
        gm.graph.eliminate_dead_code()
    for node in list(gm.graph.nodes):
        x = softmax_input(node) if node.op == "call_function" else None
        if x is not None:
            stats["views_sunk"] += _sink_views(gm, x)
    gm.graph.eliminate_dead_code()
    gm.graph.lint()
    gm.recompile()
    out = {k: v for k, v in stats.items() if v}
    out["removed_nodes"] = before - count_nodes(gm)
    return ep, out
