"""The scheduler: placement -> typed lowering -> memory-aware order -> segments, transitions, buffers."""

from __future__ import annotations

import time
from typing import Optional

from torch.fx import GraphModule

from backends.capabilities import CAPABILITIES, segment_device, transition_cost_us
from backends.memory_plan import memory_order, naive_stats, planned_stats
from backends.placement import greedy_segments, place
from backends.typed_lowering import lower, step_nodes
from compiler.ir.errors import BackendError
from compiler.ir.plan import Plan, Segment, Transition, storage_owner


def _segments(order: list, registers: dict, outputs: list, plan_backend: str) -> tuple[list, dict]:
    """Consecutive steps on one backend form a segment."""
    groups: list = []
    for step in order:
        if groups and groups[-1][0] == step.backend:
            groups[-1][1].append(step)
        else:
            groups.append((step.backend, [step]))
    defined_in = {r: i for i, (_, steps) in enumerate(groups) for s in steps for r in s.outputs}
    read_by: dict = {}
    for i, (_, steps) in enumerate(groups):
        for s in steps:
            for r in s.inputs:
                read_by.setdefault(r, set()).add(i)
    position = {r: i for i, r in enumerate(registers)}
    segments = []
    for i, (backend, steps) in enumerate(groups):
        inside = {r for s in steps for r in s.outputs}
        ins = []
        for s in steps:
            ins += [r for r in s.inputs if r not in inside and r not in ins and registers[r].kind != "constant"]
        outs = [r for r in sorted(inside, key=position.__getitem__)
                if any(j > i for j in read_by.get(r, ())) or r in outputs]
        segments.append(Segment(i, backend, segment_device(backend, plan_backend), [s.name for s in steps], ins, outs))
    return segments, defined_in


def make_plan(gm: GraphModule, backend: str, refused: Optional[dict] = None, strategy: str = "planned") -> Plan:
    """Plan ``gm`` (an unlifted graph module of the rewritten program) for ``backend``.

    ``strategy="greedy"`` keeps export order and splits wherever the backend changes (the
    baseline the benchmark compares against); the default plans the order.
    """
    if strategy not in ("planned", "greedy"):
        raise BackendError(f"unknown plan strategy {strategy!r}; use 'planned' or 'greedy'")
    if backend not in CAPABILITIES:
        raise BackendError(f"no capability table for backend {backend!r}; known: {', '.join(CAPABILITIES)}")
    t0 = time.perf_counter()
    placement = place(gm, backend, refused)
    registers, steps, outputs = lower(gm, placement.backend_of)
    naive = naive_stats(registers, steps, outputs)
    order = memory_order(registers, steps, outputs) if strategy == "planned" else list(steps)
    planned, buffers, sizes = planned_stats(registers, order, outputs)
    segments, defined_in = _segments(order, registers, outputs, backend)
    transitions = []
    for seg in segments:
        for r in seg.inputs:
            src = defined_in.get(storage_owner(registers, r), defined_in.get(r))
            if src is not None and segments[src].backend != seg.backend:
                nbytes = registers[r].nbytes
                cost = transition_cost_us(nbytes, segments[src].backend, seg.backend)
                transitions.append(Transition(r, src, seg.index, nbytes, round(cost, 2)))
    greedy = greedy_segments(gm, placement.backend_of)
    return Plan(backend=backend, registers=registers, steps=order, outputs=outputs, segments=segments,
                transitions=transitions,
                buffers=buffers, buffer_sizes=sizes, naive=naive, planned=planned, greedy_segments=greedy,
                greedy_transitions=max(greedy - 1, 0), fallbacks=placement.fallbacks,
                seconds=time.perf_counter() - t0)


def fitting_plan(gm: GraphModule, backend: str, plan: Optional[Plan] = None, refused: Optional[dict] = None) -> Plan:
    """``plan`` if it was made for this graph and backend (a saved one), else a new plan."""
    if plan is not None and plan.backend == backend and \
            sorted(s.name for s in plan.steps) == sorted(n.name for n in step_nodes(gm)):
        return plan
    return make_plan(gm, backend, refused)
