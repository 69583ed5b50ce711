"""Reading attention masks: which part is causal, which part must stay.

Models build masks many ways (iota comparisons, ``tril``/``triu``, slices of a stored buffer,
``where(mask, 0, finfo.min)``), usually combining a causal part with padding from an input.
We flatten the mask's AND-tree and evaluate each conjunct that does not depend on input
values: conjuncts equal to a top-left causal mask become ``is_causal=True``, all-true ones
vanish, and the rest stays as a (smaller, usually ``[B, 1, 1, Sk]``) mask. Evaluation happens
at the example sizes; the verification stage re-checks the rewrite numerically.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch
from torch import fx

from compiler.ir.graph import ConeEvaluator, aten, depends_on_user_values, dtype, is_op, overloads

ANDS = overloads(aten.__and__, aten.bitwise_and, aten.logical_and)
ORS = overloads(aten.__or__, aten.bitwise_or, aten.logical_or)
NOTS = overloads(aten.logical_not, aten.bitwise_not)
BOOL_PASSTHROUGH = overloads(aten.expand, aten.clone, aten.alias, aten.contiguous)
CASTS = overloads(aten.to, aten._to_copy)
WHERES = overloads(aten.where)

# The one definition of a mask value that "acts as -inf", shared by the PyTorch and ONNX front
# ends: -inf itself, or at least half as negative as the lowest finite value of the dtype the
# scores are computed in (``finfo.min``, ``-finfo.max`` and ``finfo.min / 2`` as models write
# them, for fp16, bf16, fp32 and fp64 alike). Such a fill gives a masked key exactly zero weight
# in a row with any kept key; a row whose keys are ALL filled is uniform over every key, which a
# rewrite must keep (see ``compiler.ir.ops``: it masks with ``finfo(compute dtype).min``).
NEG_INF_FRACTION = 0.5


def neg_inf_threshold(dt=torch.float32) -> float:
    """Values at or below this act as -inf in ``dt``: a torch dtype, or a numpy one (ONNX front
    end); fp32 for anything that is not a float dtype."""
    if isinstance(dt, torch.dtype):
        lowest = torch.finfo(dt if dt.is_floating_point else torch.float32).min
    else:
        try:
            lowest = np.finfo(dt).min
        except (TypeError, ValueError):
            lowest = torch.finfo(torch.float32).min
    return NEG_INF_FRACTION * float(lowest)


def acts_as_neg_inf(x: float, dt: torch.dtype = torch.float32) -> bool:
    return x == float("-inf") or x <= neg_inf_threshold(dt)


def is_absorbing(x: float, dt: torch.dtype = torch.float32) -> bool:
    """Kept for callers: a fill that acts as -inf in ``dt``."""
    return acts_as_neg_inf(x, dt)


@dataclass
class CausalSplit:
    causal: bool = False
    residual: list[fx.Node] = field(default_factory=list)  # bool conjuncts still needed
    notes: list[str] = field(default_factory=list)


def _is_bool_cast(n: fx.Node) -> bool:
    return is_op(n, CASTS) and dtype(n) == torch.bool and dtype(n.args[0]) == torch.bool


def _leaves(node: fx.Node, ops: frozenset) -> list[fx.Node]:
    """Leaves of a tree of boolean ``ops``, looking through broadcasts and bool->bool casts."""
    if is_op(node, ops) and dtype(node) == torch.bool:
        return [c for a in node.args[:2] if isinstance(a, fx.Node) for c in _leaves(a, ops)]
    if (is_op(node, BOOL_PASSTHROUGH) or _is_bool_cast(node)) and isinstance(node.args[0], fx.Node):
        return _leaves(node.args[0], ops)
    return [node]


def conjuncts(node: fx.Node) -> list[fx.Node]:
    """Leaves of an AND-tree (a keep-mask)."""
    return _leaves(node, ANDS)


def keep_pattern(v: torch.Tensor, sq: int, sk: int) -> Optional[str]:
    """"causal" / "all" / None for a bool keep-mask broadcastable to [..., sq, sk]."""
    if v.dim() < 2:
        v = v.reshape(*([1] * (2 - v.dim())), *v.shape)
    try:
        full = v.expand(*v.shape[:-2], sq, sk)
    except RuntimeError:
        return None
    if bool(v.all()):  # broadcasting repeats values: v itself answers, without the expanded copy
        return "all"
    # The triangle a block of rows at a time: no [sq, sk] copy, and a mask that is not causal is
    # usually told apart by its first rows.
    rows = max(1, (1 << 24) // max(sk, 1))
    keys = torch.arange(sk, device=v.device)
    for a in range(0, sq, rows):
        block = full[..., a:a + rows, :]
        queries = torch.arange(a, a + block.shape[-2], device=v.device)
        if not torch.equal(block, (keys <= queries[:, None]).expand_as(block)):
            return None
    return "causal"


def additive_pattern(v: torch.Tensor, sq: int, sk: int) -> Optional[str]:
    """``keep_pattern`` of a float bias that is 0 where kept and acts as -inf elsewhere; None
    for any other bias."""
    if not v.is_floating_point():
        return None
    kept = v == 0
    if not bool((kept | (v <= neg_inf_threshold(v.dtype))).all()):
        return None
    return keep_pattern(kept, sq, sk)


def mask_pattern(mask: torch.Tensor, sq: int, sk: int) -> Optional[str]:
    """What an attention op's ``attn_mask`` value is: "causal" when it keeps exactly the top-left
    triangle ``is_causal`` means, "all" when it keeps every key, else None."""
    return keep_pattern(mask, sq, sk) if mask.dtype == torch.bool else additive_pattern(mask, sq, sk)


def _pattern_of(evaluator: ConeEvaluator, leaf: fx.Node, sq: int, sk: int, negate: bool = False) -> Optional[str]:
    """The keep pattern of ``leaf``'s evaluated value (negated: ``leaf`` marks masked positions),
    once per leaf: the sites of a model usually share one mask, and each check is O(sq * sk)."""
    def compute():
        value = evaluator(leaf)
        if not isinstance(value, torch.Tensor):
            return None
        return keep_pattern(~value if negate else value, sq, sk)

    return evaluator.derived(("keep pattern", leaf, sq, sk, negate), compute)


def disjuncts(node: fx.Node) -> list[fx.Node]:
    """Leaves of an OR-tree (a condition marking masked positions)."""
    return _leaves(node, ORS)


def split_causal_masked(masked: fx.Node, evaluator, user_inputs, sq: int, sk: int) -> tuple[CausalSplit, list[fx.Node]]:
    """For a condition that marks *masked* positions (``masked_fill(scores, cond, -inf)``).

    By De Morgan its disjuncts are negated keep-conjuncts. Returns the split and the masked
    disjuncts that must stay (still in "masked" polarity).
    """
    out, residual_masked = CausalSplit(), []
    for leaf in disjuncts(masked):
        if is_op(leaf, NOTS) and dtype(leaf.args[0]) == torch.bool:
            inner = split_causal(leaf.args[0], evaluator, user_inputs, sq, sk)
            out.causal |= inner.causal
            out.residual.extend(inner.residual)
            out.notes.extend(inner.notes)
            continue
        if dtype(leaf) == torch.bool and not depends_on_user_values(leaf, user_inputs):
            try:
                kind = _pattern_of(evaluator, leaf, sq, sk, negate=True)
            except Exception:
                kind = None
            if kind == "causal":
                out.causal = True
                continue
            if kind == "all":
                continue
        residual_masked.append(leaf)
    return out, residual_masked


def split_causal(keep: fx.Node, evaluator: ConeEvaluator, user_inputs: set[str], sq: int, sk: int) -> CausalSplit:
    out = CausalSplit()
    for leaf in conjuncts(keep):
        if dtype(leaf) != torch.bool or depends_on_user_values(leaf, user_inputs):
            out.residual.append(leaf)
            continue
        try:
            kind = _pattern_of(evaluator, leaf, sq, sk)
        except Exception as e:  # a cone we cannot run: keep the conjunct as a mask
            out.notes.append(f"mask part {leaf.name} not evaluated: {type(e).__name__}")
            out.residual.append(leaf)
            continue
        if kind == "causal":
            out.causal = True
        elif kind != "all":
            out.residual.append(leaf)
    return out


def additive_keep(node: fx.Node, scalar_value) -> Optional[tuple[fx.Node, float]]:
    """``where(keep, 0, fill)`` with an absorbing fill -> (keep, fill); else None."""
    if not is_op(node, WHERES) or len(node.args) < 3:
        return None
    cond, a, b = node.args[:3]
    if not isinstance(cond, fx.Node) or dtype(cond) != torch.bool:
        return None
    va, vb = scalar_value(a), scalar_value(b)
    if va == 0.0 and vb is not None and acts_as_neg_inf(vb, dtype(node)):
        return cond, vb
    return None


def constant_additive_pattern(node: fx.Node, evaluator: ConeEvaluator, user_inputs, sq: int, sk: int) -> Optional[str]:
    """For an input-independent float bias: "causal"/"all" if it is 0 where kept and absorbing elsewhere."""
    if depends_on_user_values(node, user_inputs):
        return None
    try:
        v = evaluator(node)
    except Exception:
        return None
    return additive_pattern(v, sq, sk) if isinstance(v, torch.Tensor) else None
