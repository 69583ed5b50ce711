"""The two walks of attention discovery over an fx graph: from a softmax back through the
scores to the QK product (scales, biases, masks, softcap, batch reshapes), and forward
through the probabilities to the PV product; then each operand back to its head layout.

Anything the walks do not understand raises ``NotAttention`` with the reason.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import fx
from torch.export import ExportedProgram

from compiler.ir import views as L
from compiler.ir.graph import (
    ConeEvaluator,
    ancestors,
    depends_on_user_values,
    dtype,
    is_op,
    reaches,
    same_shape,
    same_size,
    sym_shape,
    user_input_names,
    val,
)
from compiler.ir.masks import WHERES, acts_as_neg_inf
from compiler.ir.site import Operand
from passes.softmax_forms import (
    ADDS,
    ASSERTS,
    CASTS,
    DROPOUTS,
    FULL_LIKE,
    MASKED_FILL,
    PV_PRODUCTS,
    QK_PRODUCTS,
    SUBS,
    TANH,
    NotAttention,
    dropout_inactive,
    is_safe_softmax_where,
)


class ChainWalker:
    """Walks score and probability chains of one exported program (values computed once)."""

    def __init__(self, ep: ExportedProgram):
        self.ep = ep
        self.gm = ep.graph_module
        self.user_inputs = user_input_names(ep)
        self.evaluator = ConeEvaluator(ep)

    # -- values ---------------------------------------------------------------------

    def scalar_value(self, x) -> Optional[float]:
        """A Python float for a number or a one-element node computable without inputs."""
        if isinstance(x, bool):
            return None
        if isinstance(x, (int, float)):
            return float(x)
        if not isinstance(x, fx.Node):
            return None
        v = val(x)
        if not isinstance(v, torch.Tensor) or v.numel() != 1:
            return None
        # Baking a parameter or buffer into the graph would ignore later state changes.
        if any(a.op == "placeholder" for a in ancestors(x)):
            return None
        try:
            return float(self.evaluator(x).item())
        except Exception:
            return None

    def activation(self, node: fx.Node) -> bool:
        return depends_on_user_values(node, self.user_inputs)

    # -- score chain: softmax input back to the QK product ---------------------------

    def walk_scores(self, x: fx.Node, target_shape):
        const = 1.0
        tensor_factors: list[tuple[fx.Node, str]] = []
        terms: list[tuple[fx.Node, float, list]] = []  # (node, const coef, tensor factors)
        keeps: list[tuple[fx.Node, bool]] = []  # (cond, negate)
        steps: list[fx.Node] = []
        internal: list[fx.Node] = []
        softcap = 0.0  # set once the walk passes c * tanh(.): everything further back is inside it
        # A finite fill (finfo.min) applied after an earlier -inf mask overwrites its -inf: a row
        # the fill masks whole is uniform over ALL keys in the model, -inf ones included.
        finite_fill = False
        overridden = "a finite mask fill overwrites an earlier -inf mask (rows it masks whole would differ)"
        cur = x

        def at_full_shape(n):
            if not same_shape(sym_shape(n), target_shape):
                raise NotAttention("a mask is applied before the scores reach their final layout")
            if softcap:
                raise NotAttention("a mask or bias is applied inside the softcap tanh")

        while True:
            internal.append(cur)
            if is_op(cur, QK_PRODUCTS):
                break
            if is_op(cur, CASTS):
                if not dtype(cur).is_floating_point:
                    raise NotAttention("scores cast to a non-float type")
                cur = cur.args[0]
            elif is_op(cur, L.IDENTITIES):
                cur = cur.args[0]
            elif is_op(cur, L.VIEWS):
                if not L.keeps_last_two(cur.args[0], cur):
                    raise NotAttention("scores reshaped across their query/key axes")
                steps.append(cur)
                cur = cur.args[0]
            elif is_op(cur, L.MULS | L.DIVS):
                if cur.kwargs.get("rounding_mode") is not None:
                    raise NotAttention("scores divided with rounding (floor/trunc) is not a scale")
                so = L.scalar_operand(cur, self.scalar_value) or self._head_factor(cur, target_shape)
                if so is None:
                    raise NotAttention("scores multiplied by a tensor that is not constant per query head")
                src, c = so
                is_mul = cur.target in L.MULS
                if isinstance(c, float):
                    if c <= 0:
                        raise NotAttention("non-positive score scale")
                    const = const * c if is_mul else const / c
                else:
                    tensor_factors.append((c, "mul" if is_mul else "div"))
                cur = src
            elif is_op(cur, ADDS | SUBS) and self._row_constant(cur) is not None:
                # The same finite number added to every score: softmax does not see it.
                if softcap:
                    raise NotAttention("a constant is added inside the softcap tanh")
                cur = self._row_constant(cur)
            elif is_op(cur, TANH):
                if softcap or tensor_factors or not const > 0:
                    raise NotAttention("tanh on scores is not a softcap c * tanh(s / c)")
                softcap, const = const, 1.0
                cur = cur.args[0]
            elif is_op(cur, ADDS | SUBS):
                a, b = cur.args[0], cur.args[1]
                alpha = cur.kwargs.get("alpha", 1)
                if not isinstance(a, fx.Node) or not isinstance(b, fx.Node) or alpha != 1:
                    raise NotAttention("unsupported add on scores")
                path, other = self._pick_path(a, b)
                if cur.target in SUBS and path is b:
                    raise NotAttention("scores subtracted from a tensor")
                if finite_fill and self._holds_neg_inf(other):
                    raise NotAttention(overridden)
                at_full_shape(cur)
                sign = -1.0 if cur.target in SUBS else 1.0
                terms.append((other, sign * const, list(tensor_factors)))
                cur = path
            elif is_op(cur, WHERES):
                if softcap:
                    raise NotAttention("a mask is applied inside the softcap tanh")
                cond, a, b = cur.args[:3]
                if isinstance(a, fx.Node) and self._reaches_product(a):
                    path, fill, negate = a, b, False
                elif isinstance(b, fx.Node) and self._reaches_product(b):
                    path, fill, negate = b, a, True
                else:
                    raise NotAttention("where() on scores without a score branch")
                finite_fill = self._fill_order(fill, finite_fill, overridden)
                self._mask_fill(fill, cond, negate, const, tensor_factors, terms, keeps, dtype(cur))
                at_full_shape(cur)
                cur = path
            elif is_op(cur, MASKED_FILL):
                if softcap:
                    raise NotAttention("a mask is applied inside the softcap tanh")
                src, cond, fill = cur.args[:3]
                finite_fill = self._fill_order(fill, finite_fill, overridden)
                self._mask_fill(fill, cond, True, const, tensor_factors, terms, keeps, dtype(cur))
                at_full_shape(cur)
                cur = src
            else:
                raise NotAttention(f"scores pass through {cur.target}")
        steps.reverse()
        if softcap:
            # c * tanh(a * qk) is the op's softcap * tanh(scale * qk / softcap) with scale = a * c.
            const = const * softcap
        return cur, const, tensor_factors, terms, keeps, steps, internal, softcap

    def _fill_order(self, fill, finite_seen: bool, reason: str) -> bool:
        """Walking back from the softmax: whether a finite fill has been seen, refusing an
        -inf fill that a later finite one would overwrite."""
        f = self.scalar_value(fill)
        if f == float("-inf") and finite_seen:
            raise NotAttention(reason)
        return finite_seen or (f is not None and f != float("-inf"))

    def _holds_neg_inf(self, node: fx.Node) -> bool:
        """Whether an input-independent additive term holds -inf (a causal triu(-inf), say)."""
        if self.activation(node):
            return False
        try:
            v = self.evaluator(node)
        except Exception:  # noqa: BLE001 - cannot tell: assume it may
            return True
        return isinstance(v, torch.Tensor) and bool((v == float("-inf")).any())

    def _row_constant(self, node: fx.Node) -> Optional[fx.Node]:
        """The scores side of ``scores + c`` / ``scores - c`` for a finite constant ``c``, else None."""
        a, b = node.args[0], node.args[1]
        for path, c in ((a, b), (b, a)):
            if path is b and node.target in SUBS:
                continue
            if not isinstance(path, fx.Node) or not same_shape(sym_shape(path), sym_shape(node)):
                continue
            v = self.scalar_value(c)
            if v is not None and math.isfinite(v * float(node.kwargs.get("alpha", 1))):
                return path
        return None

    def _head_factor(self, node: fx.Node, scores_shape) -> Optional[tuple[fx.Node, fx.Node]]:
        """(scores, t) for ``scores * t`` / ``scores / t`` with a float tensor ``t`` constant over
        the last two axes of 4-D ``[B, H, Sq, Sk]`` scores (a per-head logit scale), folded into q.

        ``t`` must come from the model's state, not from an input: a per-call tensor is not a
        scale the model fixed (and Inductor's suite counts that form as not attention)."""
        a, b = node.args[0], node.args[1]
        pairs = ((a, b),) if node.target in L.DIVS else ((a, b), (b, a))
        for src, t in pairs:
            if not (isinstance(src, fx.Node) and isinstance(t, fx.Node)):
                continue
            ts, ss = sym_shape(t), sym_shape(src)
            if ts is None or len(scores_shape) != 4 or len(ts) > 4 or not dtype(t).is_floating_point:
                continue
            if self.activation(t):
                continue
            if not same_shape(ss, sym_shape(node)) or not same_shape(ss, scores_shape):
                continue
            padded = (1,) * (4 - len(ts)) + tuple(ts)
            if same_size(padded[-1], 1) and same_size(padded[-2], 1):
                return src, t
        return None

    def _mask_fill(self, fill, cond, negate, const, tensor_factors, terms, keeps, scores_dtype=torch.float32):
        f = self.scalar_value(fill)
        if f is None:
            raise NotAttention("mask fill value is not a constant")
        if not acts_as_neg_inf(f, scores_dtype):
            raise NotAttention(
                f"mask fill {f:g} is neither -inf nor finfo.min; rewriting would change fully-masked rows"
            )
        if f == float("-inf") or not isinstance(cond, fx.Node):
            keeps.append((cond, negate))
        else:
            # Keep the model's exact semantics for fully masked rows (uniform, not zero).
            terms.append((("where", cond, negate, f), const, list(tensor_factors)))

    def _reaches_product(self, node: fx.Node) -> bool:
        return reaches(node, lambda n: is_op(n, QK_PRODUCTS) and all(
            self.activation(a) for a in n.args[-2:] if isinstance(a, fx.Node)))

    def _pick_path(self, a: fx.Node, b: fx.Node):
        ra, rb = self._reaches_product(a), self._reaches_product(b)
        if ra and not rb:
            return a, b
        if rb and not ra:
            return b, a
        raise NotAttention("cannot tell scores from bias in an add")

    # -- probabilities: softmax forward to the PV product ----------------------------

    def walk_probs(self, softmax: fx.Node, scores: fx.Node):
        cur = softmax
        steps: list[fx.Node] = []
        internal: list[fx.Node] = []
        while True:
            users = [u for u in cur.users if not is_op(u, ASSERTS | FULL_LIKE)]
            if len(users) != 1:
                raise NotAttention(
                    "attention probabilities are used elsewhere (e.g. returned as attention weights)"
                    if users
                    else "attention probabilities are unused"
                )
            u = users[0]
            if is_op(u, PV_PRODUCTS) and u.args[0] is cur:
                return u, steps, internal
            if is_op(u, CASTS) and dtype(u).is_floating_point:
                pass
            elif is_op(u, DROPOUTS):
                if not dropout_inactive(u):
                    raise NotAttention("dropout on attention probabilities is active (training mode)")
            elif is_op(u, L.IDENTITIES) or is_safe_softmax_where(u, cur, scores):
                pass
            elif is_op(u, L.VIEWS | L.EXPANDS) and L.keeps_last_two(cur, u):
                steps.append(u)
            else:
                raise NotAttention(f"probabilities pass through {u.target}")
            internal.append(u)
            cur = u

    # -- operands -------------------------------------------------------------------

    def operand(self, x: fx.Node, want_transposed: bool, batch_heads, final_batch, allow_scale=True, pre_map=None):
        """Trace an operand, check how its root maps onto (B, Hq); return (Operand, Hkv, trace)."""
        tr = L.trace_operand(x, self.scalar_value, allow_scale=allow_scale)
        try:
            hkv = self._kv_heads(tr, batch_heads, final_batch, pre_map)
        except NotAttention:
            # The root is shared another way (a learned query expanded over the batch): the
            # operand itself, already laid out like the scores, still serves.
            tr = L.Trace(x, [], False, [])
            if pre_map is not None or self._kv_heads(tr, batch_heads, final_batch, None) != batch_heads[1]:
                raise
            hkv = batch_heads[1]
        return Operand(tr.root, transpose_last=(tr.transposed != want_transposed),
                       reshape_to=[batch_heads[0], hkv]), hkv, tr

    def _kv_heads(self, tr, batch_heads, final_batch, pre_map) -> int:
        b, hq = batch_heads
        mapping = L.batch_map(tr.root, tr.steps, final_batch)
        if mapping is None:
            raise NotAttention("operand layout could not be replayed")
        if pre_map is not None:
            mapping = mapping[pre_map]
        if mapping.numel() != b * hq:
            raise NotAttention("operand batch does not match the scores")
        hkv = L.kv_heads_for(mapping, tr.root, b, hq)
        if hkv is None:
            raise NotAttention("operand heads are neither aligned with the query heads nor a GQA repeat")
        return hkv
