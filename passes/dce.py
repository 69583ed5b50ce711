"""Dead-code elimination.

fx's own ``eliminate_dead_code`` keeps side-effecting and random nodes. In exported graphs
that includes ``_assert_tensor_metadata`` checks and inference-mode ``dropout`` (the
identity); either would keep a whole dead attention subgraph alive. Checks on values nothing
else reads go first, inactive dropout counts as pure, and unused lifted state (a causal-mask
buffer, say) is pruned from the program afterwards.
"""

from __future__ import annotations

import torch
from torch.export import ExportedProgram

from compiler.graph import count_nodes, user_input_names
from compiler.program import prune_unused_state

_ASSERTS = {torch.ops.aten._assert_tensor_metadata.default, torch.ops.aten._assert_scalar.default}
_DROPOUT = {torch.ops.aten.dropout.default}


def _orphan_asserts(graph, user_inputs: set[str]) -> list:
    out = []
    for n in graph.nodes:
        if n.op == "call_function" and n.target in _ASSERTS and n.args and hasattr(n.args[0], "users"):
            subject = n.args[0]
            if subject.name not in user_inputs and all(u.target in _ASSERTS for u in subject.users):
                out.append(n)
    return out


def _impure(node) -> bool:
    if node.op == "call_function" and node.target in _DROPOUT:
        p = node.args[1] if len(node.args) > 1 else node.kwargs.get("p", 0.5)
        train = node.args[2] if len(node.args) > 2 else node.kwargs.get("train", True)
        if p == 0 or train is False:
            return False
    return node.is_impure()


def dead_code_elimination(ep: ExportedProgram) -> dict:
    before = count_nodes(ep.graph_module)
    graph = ep.graph
    user_inputs = user_input_names(ep)
    while True:
        orphans = _orphan_asserts(graph, user_inputs)
        for n in orphans:
            graph.erase_node(n)
        changed = graph.eliminate_dead_code(is_impure_node=_impure)
        if not orphans and not changed:
            break
    ep.graph_module.recompile()
    pruned = prune_unused_state(ep)
    return {"removed_nodes": before - count_nodes(ep.graph_module), "pruned_state": pruned}
