"""Layout cleanup: cancel permute/transpose pairs, collapse reshape chains, drop identity views.

Rewrites leave layout ops around the fused op (flatten then view back, transpose then
transpose back); they are free in eager PyTorch only when they are views, and every backend
lowers fewer nodes without them.
"""

from __future__ import annotations

from torch import fx
from torch.export import ExportedProgram

from compiler.ir.graph import aten, count_nodes, is_op, overloads, same_shape, sym_shape
from passes.infra import PassResult, counted

# aten.view.dtype reinterprets bits (qweight.view(torch.int8)): not a reshape, never dropped.
RESHAPES = overloads(aten.view, aten.reshape, aten._unsafe_view, aten.flatten, aten.unflatten) - {aten.view.dtype}
IDENTITY_IF_SAME = RESHAPES | overloads(aten.expand, aten.alias)
PERMUTES = overloads(aten.permute)
TRANSPOSES = overloads(aten.transpose)


def _perm(node: fx.Node) -> list[int] | None:
    s = sym_shape(node.args[0])
    if s is None:
        return None
    n = len(s)
    if is_op(node, PERMUTES):
        return [d % n for d in node.args[1]] if n else []
    if is_op(node, TRANSPOSES):
        a, b = node.args[1] % n, node.args[2] % n
        p = list(range(n))
        p[a], p[b] = p[b], p[a]
        return p
    return None


def layout_cleanup(ep: ExportedProgram) -> PassResult:
    gm = ep.graph_module
    before = count_nodes(gm)
    stats = {"identity_views": 0, "reshape_chains": 0, "permute_pairs": 0}
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or not node.args or not isinstance(node.args[0], fx.Node):
            continue
        src = node.args[0]
        if is_op(node, IDENTITY_IF_SAME) and same_shape(sym_shape(node), sym_shape(src)):
            node.replace_all_uses_with(src)
            stats["identity_views"] += 1
            continue
        if is_op(node, RESHAPES) and is_op(src, RESHAPES):
            # A reshape of a reshape that lands on the original shape is the original.
            root = src
            while is_op(root, RESHAPES):
                root = root.args[0]
            if same_shape(sym_shape(node), sym_shape(root)):
                node.replace_all_uses_with(root)
                stats["reshape_chains"] += 1
            continue
        p2 = _perm(node)
        if p2 is not None and (is_op(src, PERMUTES) or is_op(src, TRANSPOSES)):
            p1 = _perm(src)
            composed = [p1[i] for i in p2]
            if composed == list(range(len(composed))):
                node.replace_all_uses_with(src.args[0])
            else:
                node.args = (src.args[0], composed)
                node.target = aten.permute.default
            stats["permute_pairs"] += 1
    gm.graph.eliminate_dead_code()
    gm.recompile()
    stats["removed_nodes"] = before - count_nodes(gm)
    return counted(stats)
