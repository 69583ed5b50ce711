"""Common-subexpression elimination, by torch.fx's CSEPass on functional ATen graphs."""

from __future__ import annotations

import torch
from torch.export import ExportedProgram
from torch.fx.passes.dialect.common.cse_pass import CSEPass, get_CSE_banned_ops

from compiler.ir.graph import count_nodes
from passes.infra import PassResult, counted

aten = torch.ops.aten
# Random and side-effecting ops must stay distinct.
_BANNED = get_CSE_banned_ops() | {aten.dropout, aten.native_dropout, aten.bernoulli, aten._assert_tensor_metadata}


def common_subexpression_elimination(ep: ExportedProgram) -> PassResult:
    before = count_nodes(ep.graph_module)
    result = CSEPass(banned_ops=_BANNED)(ep.graph_module)
    if result.modified:
        ep.graph_module.graph = result.graph_module.graph
        ep.graph_module.recompile()
    return counted({"merged_nodes": before - count_nodes(ep.graph_module)})
