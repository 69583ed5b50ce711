"""Constant folding of small input-independent subgraphs.

Only nodes computed from literals (``full``, ``arange`` of a static size, ``scalar_tensor``
...) fold; parameters and buffers stay inputs so loading new weights still works. Results
larger than ``max_elements`` are left as computation: a folded ``[S, S]`` mask would be
stored in the saved program.
"""

from __future__ import annotations

import torch
from torch import fx
from torch.export import ExportedProgram

from compiler.ir.graph import ConeEvaluator, count_nodes
from compiler.ir.program import add_constant
from passes.infra import PassResult, counted

_IMPURE = {torch.ops.aten._assert_tensor_metadata.default}
_NONDETERMINISTIC = {"rand", "randn", "randint", "randperm", "rand_like", "randn_like", "bernoulli", "dropout", "native_dropout", "empty", "empty_like", "empty_strided", "new_empty"}


def _foldable(node: fx.Node, known: set) -> bool:
    if node.op != "call_function" or node.target in _IMPURE:
        return False
    name = getattr(getattr(node.target, "_overloadpacket", None), "__name__", "")
    if name in _NONDETERMINISTIC or not isinstance(node.meta.get("val"), torch.Tensor):
        return False
    flat = fx.node.map_aggregate((node.args, node.kwargs), lambda a: a)
    inputs = node.all_input_nodes
    if any(isinstance(a, torch.SymInt) for a in torch.utils._pytree.tree_leaves(flat)):
        return False
    return all(i in known for i in inputs)


def constant_folding(ep: ExportedProgram, max_elements: int = 4096) -> PassResult:
    gm = ep.graph_module
    before = count_nodes(gm)
    evaluator = ConeEvaluator(ep)
    known: set = set()
    for node in gm.graph.nodes:
        if _foldable(node, known):
            known.add(node)
    # Fold only the frontier: constant nodes read by non-constant ones.
    folded = 0
    for node in list(known):
        if not node.all_input_nodes:
            # A bare literal (full/arange/scalar_tensor) is already as cheap as a constant.
            continue
        if all(u in known for u in node.users):
            continue
        value = evaluator(node)
        if value.numel() > max_elements:
            continue
        const = add_constant(ep, f"_folded_{node.name}", value.clone(), node)
        node.replace_all_uses_with(const)
        folded += 1
    gm.graph.eliminate_dead_code()
    gm.recompile()
    return counted({"folded": folded, "removed_nodes": before - count_nodes(gm)})
