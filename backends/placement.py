"""Placement: each node on a backend that can run it.

Nodes the requested backend supports go to it; the rest go to ``torch``, with the reason kept
for the report. Grouping into segments is the order's business (``memory_plan.memory_order``
runs each backend's ready work in phases, which gives the fewest switches).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch.fx import GraphModule

from backends.capabilities import CAPABILITIES, supports
from backends.typed_lowering import step_nodes


@dataclass
class Placement:
    backend_of: dict  # node name -> backend
    fallbacks: dict = field(default_factory=dict)  # op -> why it runs on torch


def place(gm: GraphModule, backend: str, refused: dict | None = None) -> Placement:
    """``refused``: op -> reason, for ops an attempted lowering on ``backend`` already failed."""
    refused = dict(refused or {})
    backend_of, fallbacks = {}, dict(refused)
    for node in step_nodes(gm):
        if supports(backend, node, frozenset(refused)):
            backend_of[node.name] = backend
        else:
            backend_of[node.name] = "torch"
            if not CAPABILITIES[backend].attention_only:
                fallbacks.setdefault(str(node.target), f"no {backend} lowering")
    return Placement(backend_of, fallbacks)


def greedy_segments(gm: GraphModule, backend_of: dict) -> int:
    """The naive partition: export order, a new segment wherever the backend changes."""
    count, last = 0, None
    for node in step_nodes(gm):
        b = backend_of[node.name]
        if b != last:
            count, last = count + 1, b
    return count
