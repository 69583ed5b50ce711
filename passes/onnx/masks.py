"""Mask terms: split, classified (causal, padding), simplified, assembled into one attn_mask."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import numpy as np
import onnx_ir as ir

from passes.onnx.builder import _Builder
from passes.onnx.common import _Reject, _neg_threshold, _producer, _rank, _same_dim, _shape
from passes.onnx.evaluation import _Constants


class _AllSymbols:
    """A binding of every symbolic dim to one number."""

    def __init__(self, n: int):
        self.n = n

    def get(self, key, default=None):
        return self.n

    def items(self):
        return [("*", self.n)]


@dataclass
class _Term:
    """One part of the bias added to the scores: ``kind`` is "keep" (bool, True attends),
    "drop" (bool, True is masked) or "add" (float, ``coeff * value`` is added)."""

    kind: str
    value: ir.Value
    coeff: float = 1.0


class _Masks:
    """Splits mask terms, turns their constant top-left triangular part into is_causal,
    and assembles what remains into one ``attn_mask``."""

    def __init__(self, consts: _Constants):
        self.consts = consts

    def _leaves(self, term: _Term, shape_safe: bool) -> list[_Term]:
        """Flatten And (keep), Or (drop) or Add (add) trees into their parts. Expand is looked
        through only when the scores keep their shape (``shape_safe``): the Attention op
        broadcasts the mask itself."""
        joins = {"keep": "And", "drop": "Or", "add": "Add"}
        out: list[_Term] = []
        todo = [term]
        while todo:
            t = todo.pop()
            p = _producer(t.value)
            if p is not None and p.op_type == joins[t.kind]:
                todo.extend(_Term(t.kind, i, t.coeff) for i in reversed(p.inputs))
            elif p is not None and p.op_type == "Expand" and shape_safe:
                todo.append(_Term(t.kind, p.inputs[0], t.coeff))
            elif t.kind == "add" and p is not None and p.op_type == "Where":
                leaf = self._where_leaf(t, p)
                if leaf is t:
                    out.append(t)
                else:
                    todo.append(leaf)  # a bool condition: split its And/Or too
            else:
                out.append(t)
        return out

    def _where_leaf(self, t: _Term, where: ir.Node) -> _Term:
        """``Where(c, 0, -inf)`` added to scores is a bool mask; keep other Wheres as floats.
        Only fills that act as -inf convert (dtype minimum or below), so the float and the
        bool form give the same numbers."""
        cond, a, b = where.inputs
        ca, cb = self.consts.scalar(a), self.consts.scalar(b)
        thr = _neg_threshold(t.value.dtype)
        if t.coeff > 0 and ca == 0.0 and cb is not None and cb <= thr:
            return _Term("keep", cond)
        if t.coeff > 0 and cb == 0.0 and ca is not None and ca <= thr:
            return _Term("drop", cond)
        return t

    def _classify(self, leaves: list[_Term], sq: int, sk: int, thr: float,
                  binding=None) -> Optional[str]:
        """'causal', 'none' (attends everywhere) or None for the combined constant leaves."""
        masked = np.zeros((sq, sk), dtype=bool)
        residual = np.zeros((sq, sk), dtype=np.float64)
        for t in leaves:
            a = self.consts.value(t.value, binding)
            if a is None or a.ndim > 4:
                return None
            try:
                a = np.broadcast_to(a, np.broadcast_shapes(a.shape, (sq, sk)))
            except ValueError:
                return None
            if a.shape[-2:] != (sq, sk):
                return None
            if t.kind == "keep":
                m = ~a.astype(bool)
                r = np.zeros(a.shape)
            elif t.kind == "drop":
                m = a.astype(bool)
                r = np.zeros(a.shape)
            else:
                f = t.coeff * a.astype(np.float64)
                m = f <= thr
                r = np.where(m, 0.0, f)
            masked = masked | m
            residual = residual + r
        if not np.all(residual[~np.broadcast_to(masked, residual.shape)] == 0):
            return None
        masked = masked.reshape(-1, sq, sk)
        if not masked.any():
            return "none"
        tri = np.tril(np.ones((sq, sk), dtype=bool))
        if all(np.array_equal(m, ~tri) for m in masked):
            return "causal"
        return None

    def _classify_any(self, leaves: list[_Term], sq, sk, thr: float) -> Optional[str]:
        """Classify at the static sizes; with a dynamic length, at two bindings of every
        symbol to one number. That is only done for self-attention (Sq and Sk the same
        symbol): there top-left and bottom-right causal coincide, so no binding can make a
        different mask look like is_causal."""
        if isinstance(sq, int) and isinstance(sk, int):
            if all(self.consts.is_static(t.value) for t in leaves):
                return self._classify(leaves, sq, sk, thr)
            return None
        if not (isinstance(sq, ir.SymbolicDim) and _same_dim(sq, sk)):
            return None
        kinds = set()
        for n in (5, 8):
            binding = _AllSymbols(n)
            kinds.add(self._classify(leaves, n, n, thr, binding))
        return kinds.pop() if len(kinds) == 1 else None

    def simplify(self, terms: list[_Term], sq, sk,
                 shape_safe: bool) -> tuple[bool, list[_Term]]:
        """Drop constant causal / all-attend parts. Returns (is_causal, remaining terms)."""
        causal = False
        out: list[_Term] = []
        for term in terms:
            leaves = self._leaves(term, shape_safe)
            static = [t for t in leaves if self.consts.is_shape_only(t.value)]
            dynamic = [t for t in leaves if not self.consts.is_shape_only(t.value)]
            kind = self._classify_any(static, sq, sk, _neg_threshold(term.value.dtype)) if static else None
            if kind is None:
                out.extend(leaves)  # the same mask, with -inf-filled float parts as bools
                continue
            causal = causal or kind == "causal"
            out.extend(dynamic)
        return causal, out

    @staticmethod
    def assemble(b: _Builder, terms: list[_Term], dtype: Optional[ir.DataType],
                 q4: ir.Value, k4: ir.Value, scores_rank: int) -> tuple[Optional[ir.Value], str]:
        """One attn_mask from the remaining terms: bool when all parts are bool, else float
        in the query dtype. Made explicit over the query axis, which ORT does not
        broadcast."""
        if not terms:
            return None, "none"
        bools, floats = [], []
        for t in terms:
            if scores_rank == 3:
                # 3-D scores became [N, 1, Sq, Sk]: a 3-D mask part needs that head axis too.
                r = _rank(t.value)
                if r is None:
                    raise _Reject("mask rank unknown for 3-D scores")
                if r == 3:
                    t = _Term(t.kind, b.op("Unsqueeze", [t.value, b.ints([1])]), t.coeff)
            if t.kind == "keep":
                bools.append(t.value if t.value.dtype == ir.DataType.BOOL
                             else b.op("Cast", [t.value], to=ir.DataType.BOOL))
            elif t.kind == "drop":
                c = t.value if t.value.dtype == ir.DataType.BOOL else b.op("Cast", [t.value], to=ir.DataType.BOOL)
                bools.append(b.op("Not", [c]))
            else:
                v = t.value
                if dtype is not None and v.dtype != dtype:
                    v = b.op("Cast", [v], to=dtype)
                if t.coeff != 1.0:
                    v = b.op("Mul", [v, b.scalar_like(t.coeff, dtype)])
                floats.append(v)
        if floats:
            kind = "float"
            parts = floats + [b.op("Where", [c, b.scalar_like(0.0, dtype), b.scalar_like(-math.inf, dtype)])
                              for c in bools]
            join = "Add"
        else:
            kind, parts, join = "bool", bools, "And"
        mask = parts[0]
        for p in parts[1:]:
            mask = b.op(join, [mask, p])
        s = _shape(mask) if len(parts) == 1 and scores_rank == 4 else None
        sq, sk = _shape(q4)[2] if _shape(q4) else None, _shape(k4)[2] if _shape(k4) else None
        explicit = s is not None and len(s) >= 2 and _same_dim(s[-2], sq) and _same_dim(s[-1], sk)
        if not explicit:
            target = b.op("Concat", [b.seq_len(q4), b.seq_len(k4)], axis=0)
            mask = b.op("Expand", [mask, target])
        return mask, kind
