"""Dead-code elimination.

fx's own ``eliminate_dead_code`` keeps side-effecting nodes, which in exported graphs
includes ``_assert_tensor_metadata`` checks; a check on a value nothing else reads would keep
a whole dead attention subgraph alive, so such checks go first. Unused lifted state (a
causal-mask buffer, say) is pruned from the program afterwards.
"""

from __future__ import annotations

import torch
from torch.export import ExportedProgram

from compiler.graph import count_nodes
from compiler.program import prune_unused_state

_ASSERTS = {torch.ops.aten._assert_tensor_metadata.default, torch.ops.aten._assert_scalar.default}


def _orphan_asserts(graph) -> list:
    out = []
    for n in graph.nodes:
        if n.op == "call_function" and n.target in _ASSERTS and n.args and hasattr(n.args[0], "users"):
            subject = n.args[0]
            if subject.op != "placeholder" and all(u.target in _ASSERTS for u in subject.users):
                out.append(n)
    return out


def dead_code_elimination(ep: ExportedProgram) -> dict:
    before = count_nodes(ep.graph_module)
    graph = ep.graph
    while True:
        orphans = _orphan_asserts(graph)
        for n in orphans:
            graph.erase_node(n)
        changed = graph.eliminate_dead_code()
        if not orphans and not changed:
            break
    ep.graph_module.recompile()
    pruned = prune_unused_state(ep)
    return {"removed_nodes": before - count_nodes(ep.graph_module), "pruned_state": pruned}
