"""Liveness, a memory-aware execution order, and linear-scan buffer assignment.

Registers are defined by one step and die after the last step that reads them or any view of
them (program outputs live to the end). Inputs and constants exist before the call and after
it, so they are not part of the plan's memory. The order is chosen for the fewest backend
switches first and, inside each run of one backend, greedily: among the ready steps, the one
that adds the fewest live bytes, which runs a branch that frees memory before one that
allocates it.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass

from compiler.ir.plan import MemoryStats, Step, storage_owner


@dataclass(frozen=True)
class Interval:
    register: str
    start: int  # the step that defines it
    end: int  # the last step that reads it (or a view of it)
    nbytes: int
    dtype: str


def _owned(registers: dict, names) -> list:
    """The storage-owning value registers behind ``names`` (inputs and constants dropped)."""
    out = []
    for n in names:
        o = storage_owner(registers, n)
        if registers[o].kind == "value" and o not in out:
            out.append(o)
    return out


def intervals(registers: dict, order: list, outputs: list) -> list:
    """One interval per storage-owning value register, over positions in ``order``.

    A step that may run in place (``Step.inplace``) and is the last reader of a same-sized
    input of its dtype writes over it: its output then extends that storage instead of taking
    its own.
    """
    start, end, nbytes, dtype = {}, {}, {}, {}
    merged: dict = {}  # register -> the register whose storage it took over

    def root(r: str) -> str:
        while r in merged:
            r = merged[r]
        return r

    last_read: dict = {}
    for i, step in enumerate(order):
        for r in _owned(registers, step.inputs):
            last_read[r] = i
    kept = set(_owned(registers, outputs))
    for i, step in enumerate(order):
        ins = [root(r) for r in _owned(registers, step.inputs)]
        for r in ins:
            end[r] = max(end.get(r, i), i)
        donors = [r for r, orig in zip(ins, _owned(registers, step.inputs))
                  if step.inplace and last_read.get(orig) == i and orig not in kept and end.get(r) == i]
        for r in _owned(registers, step.outputs):
            donor = next((d for d in donors if nbytes[d] == registers[r].nbytes and dtype[d] == registers[r].dtype),
                         None)
            if donor is not None:
                merged[r] = donor
                donors.remove(donor)
                continue
            start.setdefault(r, i)
            end[r] = max(end.get(r, i), i)
            nbytes[r], dtype[r] = registers[r].nbytes, registers[r].dtype
    for r in kept:
        end[root(r)] = len(order)
    for r in list(last_read):
        rr = root(r)
        if rr in end:
            end[rr] = max(end[rr], last_read[r])
    return [Interval(r, start[r], end[r], nbytes[r], dtype[r]) for r in start]


def peak_live_bytes(registers: dict, order: list, outputs: list) -> int:
    """Largest sum of live values plus the running step's workspace, over the steps."""
    n = len(order)
    delta = [0] * (n + 2)
    for iv in intervals(registers, order, outputs):
        delta[iv.start] += iv.nbytes
        delta[iv.end + 1] -= iv.nbytes
    live, peak = 0, 0
    for i in range(n + 1):
        live += delta[i]
        peak = max(peak, live + (order[i].workspace_bytes if i < n else 0))
    return peak


def linear_scan(ivs: list) -> tuple[dict, list]:
    """Registers -> reusable buffers: (register -> buffer index, buffer sizes).

    Intervals in order of definition; a buffer is free again once its register's last reader
    has run (a step's inputs and outputs overlap, so they never share). Best fit: the smallest
    free buffer of the same dtype that holds the register, else the largest one of that dtype
    grown to fit, else a new buffer.
    """
    assignment, sizes, dtypes = {}, [], []
    active: list = []  # heap of (end, buffer)
    free: list = []
    for iv in sorted(ivs, key=lambda x: (x.start, -x.nbytes, x.register)):
        while active and active[0][0] < iv.start:
            free.append(heapq.heappop(active)[1])
        same = [b for b in free if dtypes[b] == iv.dtype]
        fits = [b for b in same if sizes[b] >= iv.nbytes]
        if fits:
            buf = min(fits, key=lambda b: (sizes[b], b))
        elif same:
            buf = max(same, key=lambda b: (sizes[b], -b))
            sizes[buf] = iv.nbytes
        else:
            buf = len(sizes)
            sizes.append(iv.nbytes)
            dtypes.append(iv.dtype)
        if buf in free:
            free.remove(buf)
        assignment[iv.register] = buf
        heapq.heappush(active, (iv.end, buf))
    return assignment, sizes


def naive_stats(registers: dict, steps: list, outputs: list) -> MemoryStats:
    """Export order, one buffer per value (no reuse at all)."""
    values = {r for s in steps for r in _owned(registers, s.outputs)}
    return MemoryStats("export", peak_live_bytes(registers, steps, outputs), len(values),
                       sum(registers[r].nbytes for r in values))


def _net_bytes(registers: dict, step: Step, remaining_reads: dict) -> int:
    """Bytes a step adds to the live set: what it defines minus what it is the last reader of."""
    made = sum(registers[r].nbytes for r in _owned(registers, step.outputs))
    freed = sum(registers[r].nbytes for r in _owned(registers, step.inputs) if remaining_reads.get(r) == 1)
    return made - freed


def memory_order(registers: dict, steps: list, outputs: list) -> list:
    """A topological order of ``steps`` with the fewest backend switches, and within that freedom
    the fewest live bytes.

    It runs in phases: a phase runs every step of one backend that is or becomes ready, then
    the next phase switches backend. Running more of the current backend only makes more steps
    ready, so for two backends this gives the fewest switches once the first backend is chosen
    (both are tried; the tests check it against every topological order of small graphs).
    Inside a phase the step that adds the fewest live bytes goes first; ties keep export order.
    The same phases in export order are the other candidate; the lower peak wins.
    """
    best = None
    for first in sorted({s.backend for s in steps}):
        # The greedy choice can lose to export order (it looks one step ahead); keep the better.
        for greedy in (True, False):
            order, switches = _phased(registers, steps, outputs, first, greedy)
            key = (switches, peak_live_bytes(registers, order, outputs))
            if best is None or key < best[1]:
                best = (order, key)
    return best[0] if best else []


def _phased(registers: dict, steps: list, outputs: list, first: str, greedy: bool) -> tuple[list, int]:
    index = {s.name: i for i, s in enumerate(steps)}
    missing = {s.name: len(set(s.deps)) for s in steps}
    users: dict = {}
    for s in steps:
        for d in set(s.deps):
            users.setdefault(d, []).append(s.name)
    reads: dict = {}
    for s in steps:
        for r in _owned(registers, s.inputs):
            reads[r] = reads.get(r, 0) + 1
    for r in _owned(registers, outputs):
        reads[r] = reads.get(r, 0) + 1  # outputs are never freed
    by_name = {s.name: s for s in steps}
    ready: dict = {}  # backend -> ready step names
    for s in steps:
        if missing[s.name] == 0:
            ready.setdefault(s.backend, set()).add(s.name)
    order, current, switches = [], first, 0
    while len(order) < len(steps):
        if not ready.get(current):
            # Switch to the backend with the most ready work (the other one, with two backends).
            current = max((b for b in ready if ready[b]), key=lambda b: (len(ready[b]), b))
            switches += 1 if order else 0
        pick = min(ready[current], key=lambda m: (_net_bytes(registers, by_name[m], reads) if greedy else 0, index[m]))
        ready[current].discard(pick)
        step = by_name[pick]
        for r in _owned(registers, step.inputs):
            reads[r] -= 1
        order.append(step)
        for u in users.get(pick, ()):
            missing[u] -= 1
            if missing[u] == 0:
                ready.setdefault(by_name[u].backend, set()).add(u)
    return order, switches


def planned_stats(registers: dict, order: list, outputs: list) -> tuple[MemoryStats, dict, list]:
    ivs = intervals(registers, order, outputs)
    assignment, sizes = linear_scan(ivs)
    stats = MemoryStats("planned", peak_live_bytes(registers, order, outputs), len(sizes), sum(sizes))
    return stats, assignment, sizes


__all__ = ["Interval", "intervals", "linear_scan", "memory_order", "naive_stats", "peak_live_bytes",
           "planned_stats"]
