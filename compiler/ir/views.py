"""Seeing through layout ops around attention matmuls.

An attention operand reaches its matmul through views, expands, clones, unsqueezes and
permutes that only move *batch* dimensions (the last two, ``[S, D]``, keep their sizes),
possibly a transpose of the last two (``k^T``), and scalar multiplications (a scale folded
into ``q`` or ``k``). ``trace_operand`` walks back through those to the tensor that was
computed (the root). ``batch_map`` then replays the recorded ops on an ``arange`` over the
root's batch dimensions only, which says exactly which root matrix each operand matrix reads:
that is how GQA repetition (``repeat_kv``, ``repeat_interleave``) and head flattening are
recognised without trusting any op's name.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional, Union

import torch
from torch import fx

from compiler.ir.graph import aten, is_op, overloads, same_shape, shape, sym_shape, val

VIEWS = overloads(aten.view, aten.reshape, aten._unsafe_view)
EXPANDS = overloads(aten.expand)
IDENTITIES = overloads(aten.clone, aten.contiguous, aten.alias, aten.detach, aten.lift_fresh_copy)
UNSQUEEZES = overloads(aten.unsqueeze)
PERMUTES = overloads(aten.permute)
TRANSPOSES = overloads(aten.transpose)
MULS = overloads(aten.mul)
DIVS = overloads(aten.div)
REPEAT_INTERLEAVE = frozenset({aten.repeat_interleave.self_int})

Scalar = Union[float, fx.Node]


@dataclass
class Trace:
    root: fx.Node
    steps: list[fx.Node] = field(default_factory=list)  # root (exclusive) -> operand (inclusive)
    transposed: bool = False  # the operand is the root with its last two dims swapped
    factors: list[tuple[Scalar, str]] = field(default_factory=list)  # ("mul"|"div")


def _rank(node) -> int:
    s = sym_shape(node)
    return -1 if s is None else len(s)


def _norm(d: int, n: int) -> int:
    return d + n if d < 0 else d


def keeps_last_two(src: fx.Node, dst: fx.Node) -> bool:
    a, b = sym_shape(src), sym_shape(dst)
    return a is not None and b is not None and len(a) >= 2 and len(b) >= 2 and same_shape(a[-2:], b[-2:])


def scalar_operand(node: fx.Node, scalar_value) -> Optional[tuple[fx.Node, Scalar]]:
    """For ``mul``/``div`` with one scalar side, return (tensor side, scalar)."""
    if len(node.args) < 2:
        return None
    a, b = node.args[0], node.args[1]
    if isinstance(b, (int, float)) and isinstance(a, fx.Node):
        return a, float(b)
    if isinstance(a, (int, float)) and isinstance(b, fx.Node) and node.target in MULS:
        return b, float(a)
    for x, s in ((a, b), (b, a)):
        if s is a and node.target in DIVS:
            continue  # c / x is not a scaling of x
        if isinstance(x, fx.Node) and isinstance(s, fx.Node):
            sv = val(s)
            if isinstance(sv, torch.Tensor) and sv.numel() == 1 and same_shape(sym_shape(x), sym_shape(node)):
                c = scalar_value(s)
                return x, (c if c is not None else s)
    return None


def trace_operand(node: fx.Node, scalar_value, allow_scale: bool = True) -> Trace:
    """Walk back from a matmul operand through batch-only layout ops (see module doc)."""
    steps: list[fx.Node] = []
    factors: list[tuple[Scalar, str]] = []
    transposed = False
    cur = node
    while True:
        n = _rank(cur)
        if n < 2 or not isinstance(cur.args[0] if cur.args else None, fx.Node):
            break
        src = cur.args[0]
        if is_op(cur, IDENTITIES):
            pass
        elif is_op(cur, VIEWS | EXPANDS):
            if not keeps_last_two(src, cur):
                break
        elif is_op(cur, UNSQUEEZES):
            if _norm(cur.args[1], n) >= n - 2:
                break
        elif is_op(cur, REPEAT_INTERLEAVE):
            dim = cur.args[2] if len(cur.args) > 2 else cur.kwargs.get("dim")
            if dim is None or _norm(dim, n) >= n - 2 or not isinstance(cur.args[1], int):
                break
        elif is_op(cur, PERMUTES):
            perm = [_norm(p, n) for p in cur.args[1]]
            if sorted(perm[:-2]) != list(range(n - 2)):
                break
            if perm[-2:] == [n - 1, n - 2]:
                transposed = not transposed
        elif is_op(cur, TRANSPOSES):
            a, b = sorted((_norm(cur.args[1], n), _norm(cur.args[2], n)))
            if (a, b) == (n - 2, n - 1):
                transposed = not transposed
            elif b >= n - 2:
                break
        elif allow_scale and is_op(cur, MULS | DIVS):
            so = scalar_operand(cur, scalar_value)
            if so is None:
                break
            src, c = so
            factors.append((c, "mul" if cur.target in MULS else "div"))
        else:
            break
        steps.append(cur)
        cur = src
    steps.reverse()
    return Trace(cur, steps, transposed, factors)


def batch_map(root: fx.Node, steps: list[fx.Node], final_batch: Optional[list[int]] = None) -> Optional[torch.Tensor]:
    """For each operand matrix, the flat index of the root matrix it reads.

    Replays ``steps`` on ``arange`` over the root's batch dims with the last two dims set to 1.
    ``final_batch`` broadcasts the result (``aten.matmul`` broadcasting). Returns a 1-D tensor,
    or None if a step cannot be replayed.
    """
    rs = shape(root)
    if rs is None or len(rs) < 2:
        return None
    p = torch.arange(math.prod(rs[:-2])).reshape(*rs[:-2], 1, 1)
    try:
        for s in steps:
            out = shape(s)
            n = len(out)
            if s.target in VIEWS:
                p = p.reshape(*out[:-2], 1, 1)
            elif s.target in EXPANDS:
                p = p.expand(*out[:-2], 1, 1)
            elif s.target in UNSQUEEZES:
                p = p.unsqueeze(_norm(s.args[1], n))
            elif s.target in REPEAT_INTERLEAVE:
                dim = s.args[2] if len(s.args) > 2 else s.kwargs["dim"]
                p = p.repeat_interleave(s.args[1], dim=_norm(dim, n))
            elif s.target in PERMUTES:
                p = p.permute(*[_norm(d, n) for d in s.args[1]])
            elif s.target in TRANSPOSES:
                p = p.transpose(_norm(s.args[1], n), _norm(s.args[2], n))
        if final_batch is not None:
            p = p.expand(*final_batch, 1, 1)
    except RuntimeError:
        return None
    return p.reshape(-1)


def gqa_map(batch: int, hq: int, hkv: int) -> torch.Tensor:
    """Root index read by query head h of batch b when kv head h // (hq // hkv) serves it."""
    n = torch.arange(batch * hq)
    return (n // hq) * hkv + (n % hq) // (hq // hkv)


def kv_heads_for(mapping: torch.Tensor, root: fx.Node, batch: int, hq: int) -> Optional[int]:
    """How many kv heads the root holds if ``mapping`` is identity or a GQA repeat, else None."""
    rs = shape(root)
    roots = math.prod(rs[:-2])
    if mapping.numel() != batch * hq or roots % batch:
        return None
    hkv = roots // batch
    if hkv == 0 or hq % hkv:
        return None
    return hkv if torch.equal(mapping, gqa_map(batch, hq, hkv)) else None
