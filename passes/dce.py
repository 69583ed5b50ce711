"""Dead-code elimination.

fx's own ``eliminate_dead_code`` keeps side-effecting and random nodes. In exported graphs
that includes ``_assert_tensor_metadata`` checks and every op tagged as drawing random numbers
even when its arguments say it draws none: inference-mode ``dropout`` (the identity) and
``scaled_dot_product_attention`` with ``dropout_p=0`` (the op a rewritten SDPA site leaves
behind). Either would keep a whole dead attention subgraph alive, computed on every call.
Checks on values nothing else reads go first, seeded ops that draw nothing count as pure, and
unused lifted state (a causal-mask buffer, say) is pruned from the program afterwards.
"""

from __future__ import annotations

import torch
from torch.export import ExportedProgram

from compiler.ir.graph import count_nodes, user_input_names
from compiler.ir.program import prune_unused_state
from passes.infra import PassResult, counted

_ASSERTS = {torch.ops.aten._assert_tensor_metadata.default, torch.ops.aten._assert_scalar.default}
# Arguments that, at these values, make a seeded op draw no random numbers.
_NO_DRAW = (("train", False), ("p", 0), ("dropout_p", 0))


def _orphan_asserts(graph, user_inputs: set[str]) -> list:
    out = []
    for n in graph.nodes:
        if n.op == "call_function" and n.target in _ASSERTS and n.args and hasattr(n.args[0], "users"):
            subject = n.args[0]
            if subject.name not in user_inputs and all(u.target in _ASSERTS for u in subject.users):
                out.append(n)
    return out


def _draws_nothing(node) -> bool:
    """A ``nondeterministic_seeded`` op called with dropout off (p=0, or train=False)."""
    target = node.target
    if node.op != "call_function" or not isinstance(target, torch._ops.OpOverload):
        return False
    if torch.Tag.nondeterministic_seeded not in target.tags:
        return False
    given = {}
    for i, a in enumerate(target._schema.arguments):
        if i < len(node.args) and not a.kwarg_only:
            given[a.name] = node.args[i]
        elif a.name in node.kwargs:
            given[a.name] = node.kwargs[a.name]
        elif a.has_default_value():
            given[a.name] = a.default_value
    return any(name in given and type(given[name]) in (bool, int, float) and given[name] == off
               for name, off in _NO_DRAW)


def _impure(node) -> bool:
    if _draws_nothing(node):
        return node.is_impure(impure_random=False)
    return node.is_impure()


def eliminate_dead_code(graph, user_inputs: set[str]) -> None:
    """Dead code out of ``graph`` to a fixed point: checks on values nothing else reads (except the
    placeholders named ``user_inputs``: the caller's inputs stay checked), seeded ops that draw nothing."""
    while True:
        orphans = _orphan_asserts(graph, user_inputs)
        for n in orphans:
            graph.erase_node(n)
        changed = graph.eliminate_dead_code(is_impure_node=_impure)
        if not orphans and not changed:
            break


def dead_code_elimination(ep: ExportedProgram) -> PassResult:
    before = count_nodes(ep.graph_module)
    eliminate_dead_code(ep.graph, user_input_names(ep))
    ep.graph_module.recompile()
    pruned = prune_unused_state(ep)
    return counted({"removed_nodes": before - count_nodes(ep.graph_module), "pruned_state": pruned})
