"""Which fx nodes are a softmax over the last axis, and the op sets attention is written with.

``softmax_input`` recognises ``softmax``/``_softmax``/``_safe_softmax`` and the decomposed
``exp(x - amax(x)) / sum(...)``; the other helpers recognise what may sit between the
probabilities and the value product (torch's safe-softmax ``where``, inactive dropout).
Used by the discovery walk and by canonicalization.
"""

from __future__ import annotations

import operator
from typing import Optional

from torch import fx

from compiler.ir.graph import aten, is_op, overloads, sym_shape
from compiler.ir.masks import WHERES

SOFTMAX = overloads(aten.softmax, aten._softmax, aten._safe_softmax)
SDPA = overloads(aten.scaled_dot_product_attention)
MATMUL = overloads(aten.matmul)
BMM = overloads(aten.bmm)
BADDBMM = overloads(aten.baddbmm)
QK_PRODUCTS = MATMUL | BMM | BADDBMM
PV_PRODUCTS = MATMUL | BMM
ADDS = overloads(aten.add)
SUBS = overloads(aten.sub)
MASKED_FILL = overloads(aten.masked_fill)
CASTS = overloads(aten.to, aten._to_copy, aten.type_as)
DROPOUTS = overloads(aten.dropout, aten.native_dropout)
EXPS = overloads(aten.exp)
SUMS = overloads(aten.sum)
AMAX = overloads(aten.amax)
FULL_LIKE = overloads(aten.full_like, aten.zeros_like, aten.empty_like)
ASSERTS = overloads(aten._assert_tensor_metadata)
LOGICAL_NOT = overloads(aten.logical_not)
ANY = overloads(aten.any)
EQ = overloads(aten.eq)
MAX_DIM = overloads(aten.max.dim)
TANH = overloads(aten.tanh)


class NotAttention(Exception):
    """Raised inside the matcher with the reason a candidate is not (rewritable) attention."""



def softmax_input(node: fx.Node) -> Optional[fx.Node]:
    """The scores a softmax-like node normalises over its last dim, else None."""
    if is_op(node, SOFTMAX):
        x, dim = node.args[0], node.args[1]
        return x if dim in (-1, len(sym_shape(x)) - 1) else None
    # exp(x - amax(x)) / sum(exp(x - amax(x)), -1, keepdim)  (or without the max shift)
    if is_op(node, overloads(aten.div)) and len(node.args) == 2 and all(isinstance(a, fx.Node) for a in node.args):
        num, den = node.args
        if not (is_op(num, EXPS) and is_op(den, SUMS) and den.args[0] is num):
            return None
        dims = den.args[1] if len(den.args) > 1 else None
        keep = den.args[2] if len(den.args) > 2 else den.kwargs.get("keepdim", False)
        n = len(sym_shape(num))
        if not keep or not dims or [d % n for d in dims] != [n - 1]:
            return None
        inner = num.args[0]
        if is_op(inner, SUBS) and isinstance(inner.args[1], fx.Node) and _row_max(inner.args[1]) is inner.args[0]:
            return inner.args[0]
        if is_op(inner, SUBS) and _row_max_like(inner.args[1]):
            return None  # shifted by a max over another axis: not a softmax
        return inner
    return None


def _row_max(node: fx.Node) -> Optional[fx.Node]:
    """x for ``amax(x, -1, keepdim=True)`` or ``x.max(-1, keepdim=True).values``, else None."""
    if is_op(node, AMAX):
        x = node.args[0]
        dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", [])
        keep = node.args[2] if len(node.args) > 2 else node.kwargs.get("keepdim", False)
    elif node.op == "call_function" and node.target is operator.getitem and node.args[1] == 0 and is_op(node.args[0], MAX_DIM):
        x = node.args[0].args[0]
        dims = [node.args[0].args[1]]
        keep = node.args[0].args[2] if len(node.args[0].args) > 2 else node.args[0].kwargs.get("keepdim", False)
    else:
        return None
    n = len(sym_shape(x))
    dims = [dims] if isinstance(dims, int) else list(dims)
    return x if keep and [d % n for d in dims] == [n - 1] else None


def _row_max_like(x) -> bool:
    return is_op(x, AMAX) or (isinstance(x, fx.Node) and x.target is operator.getitem and is_op(x.args[0], MAX_DIM))


def is_safe_softmax_where(node: fx.Node, probs: fx.Node, scores: fx.Node) -> bool:
    """``where(all(scores == -inf, -1), 0, probs)``: torch's decomposition of a safe softmax."""
    if not is_op(node, WHERES) or len(node.args) < 3 or node.args[2] is not probs:
        return False
    cond, zero = node.args[0], node.args[1]
    if not (is_op(zero, FULL_LIKE) and (zero.target in overloads(aten.zeros_like) or zero.args[1] == 0)):
        return False
    # logical_not(any(logical_not(eq(scores, -inf)), -1, True))
    if not is_op(cond, LOGICAL_NOT):
        return False
    a = cond.args[0]
    if not is_op(a, ANY):
        return False
    b = a.args[0]
    if not is_op(b, LOGICAL_NOT):
        return False
    c = b.args[0]
    return is_op(c, EQ) and c.args[0] is scores and c.args[1] == float("-inf")


def dropout_inactive(node: fx.Node) -> bool:
    p = node.args[1] if len(node.args) > 1 else node.kwargs.get("p", 0.5)
    train = node.args[2] if len(node.args) > 2 else node.kwargs.get("train", True)
    return p == 0 or train is False
