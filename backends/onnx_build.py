"""Small helpers for writing ONNX graphs as traced onnxscript code.

Our translations are plain Python functions that call ``op.X(...)`` on symbolic values while
the exporter traces them, so Python decides the graph's structure from the op's attributes and
static shapes, and ONNX computes everything that depends on a dynamic size.
"""

from __future__ import annotations

import onnxscript
from onnxscript import ir
from onnxscript import opset23 as op

MS = onnxscript.values.Opset("com.microsoft", 1)

NEG_INF = float("-inf")


def ints(*values: int):
    """A constant 1-D int64 tensor."""
    return op.Constant(value_ints=list(values))


def scalar_int(value: int):
    return op.Constant(value_int=value)


def scalar_like(value: float, like):
    return op.CastLike(op.Constant(value_float=value), like)


def dim(x, axis: int):
    """``x.shape[axis]`` as a 1-element int64 tensor (works for dynamic sizes)."""
    return op.Shape(x, start=axis, end=axis + 1)


def static_dim(x, axis: int):
    """``x.shape[axis]`` when the exporter knows it as a number, else None."""
    shape = x.shape
    if shape is None:
        return None
    d = shape[axis]
    return d if isinstance(d, int) else None


def mask_dims4(mask) -> list:
    """Static sizes of a mask broadcast to rank 4 ([1] * missing + its own; None where dynamic)."""
    shape = list(mask.shape)
    return [1] * (4 - len(shape)) + [d if isinstance(d, int) else None for d in shape]


def at_rank4(mask):
    rank = len(mask.shape)
    return mask if rank == 4 else op.Unsqueeze(mask, ints(*range(4 - rank)))


def same_dim(a, axis_a: int, b, axis_b: int) -> bool:
    """Whether two sizes are provably equal: both the same number or the same symbol."""
    if a.shape is None or b.shape is None:
        return False
    da, db = a.shape[axis_a], b.shape[axis_b]
    if isinstance(da, int) and isinstance(db, int):
        return da == db
    return isinstance(da, ir.SymbolicDim) and isinstance(db, ir.SymbolicDim) and da.value is not None \
        and da.value == db.value


def ceil_div(n, d: int):
    """``ceil(n / d)`` for a 1-element int64 tensor ``n`` and a Python int ``d``."""
    return op.Div(op.Add(n, ints(d - 1)), ints(d))


def arange(n):
    return op.Range(scalar_int(0), op.Squeeze(n), scalar_int(1))


def pad_axis(x, axis: int, amount, rank: int):
    """Zero-pad ``x`` at the end of ``axis`` by ``amount`` (a 1-element int64 tensor)."""
    zeros = [0] * rank
    after = [ints(0)] * rank
    after[axis] = amount
    return op.Pad(x, op.Concat(ints(*zeros), *after, axis=0))


def additive(keep, like):
    """A boolean keep-mask as an additive 0 / -inf term in ``like``'s type."""
    return op.Where(keep, scalar_like(0.0, like), scalar_like(NEG_INF, like))


def nan_to_zero(x):
    return op.Where(op.IsNaN(x), scalar_like(0.0, x), x)


def to_float32(x):
    return x if x.dtype == ir.DataType.FLOAT else op.Cast(x, to=ir.DataType.FLOAT)
