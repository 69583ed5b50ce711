"""Find every dense attention site in an ATen graph.

Anchors are softmax nodes (``softmax``, ``_softmax``, ``_safe_softmax`` or the decomposed
``exp / sum(exp)``) and ``scaled_dot_product_attention``. From a softmax we walk the scores
back as ``a * x + sum(bias)`` through scalar mul/div, adds, ``where``/``masked_fill`` masks,
dtype casts and batch reshapes until a ``matmul``/``bmm``/``baddbmm`` whose two operands both
carry activations, then walk the probabilities forward to a matmul that contracts the key
axis. Anything else on the way means this softmax is not attention (a classifier head, a
router, a softmax over weights) and it is left alone.

The pass only describes; ``attention_fusion`` rewrites.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import fx
from torch.export import ExportedProgram

from compiler import layout as L
from compiler.graph import (
    ConeEvaluator,
    ancestors,
    aten,
    depends_on_user_values,
    dtype,
    is_op,
    module_path,
    module_type,
    overloads,
    reaches,
    same_shape,
    same_size,
    shape,
    sym_shape,
    user_input_names,
    val,
)
from compiler.masks import (
    WHERES,
    acts_as_neg_inf,
    additive_keep,
    constant_additive_pattern,
    split_causal,
    split_causal_masked,
)
from compiler.ops import default_scale
from compiler.site import AttentionSite, Operand, SiteMatch, layer_of
from compiler.errors import first_line

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


@dataclass
class Discovery:
    matches: list[SiteMatch] = field(default_factory=list)
    rejected: list[dict] = field(default_factory=list)  # {"node", "module", "reason"}


# ----------------------------------------------------------------------------- helpers


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


def _is_safe_softmax_where(node: fx.Node, probs: fx.Node, scores: fx.Node) -> bool:
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


def _dropout_inactive(node: fx.Node) -> bool:
    p = node.args[1] if len(node.args) > 1 else node.kwargs.get("p", 0.5)
    train = node.args[2] if len(node.args) > 2 else node.kwargs.get("train", True)
    return p == 0 or train is False


class _Matcher:
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
                if not _dropout_inactive(u):
                    raise NotAttention("dropout on attention probabilities is active (training mode)")
            elif is_op(u, L.IDENTITIES) or _is_safe_softmax_where(u, cur, scores):
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

    # -- masks ------------------------------------------------------------------------

    def resolve_masks(self, terms, keeps, sq, sk, notes, full_rows=None):
        """Split causal structure out of the masks. Returns (causal, terms, keeps, kind).

        A causal part found in a mask with a finite fill (``finfo.min``) only becomes
        ``is_causal`` when the model's rows stay the same: a row whose every key is filled
        attends uniformly over ALL keys in the model, causal ones included. That is kept exactly
        when this mask is the site's only mask (``full_rows`` receives its other conjuncts, for
        the rewrite to restore such rows); otherwise the causal part stays in the mask.
        """
        first = self._resolve_masks(terms, keeps, sq, sk, split_finite=True)
        causal, out_terms, out_keeps, n, finite = first
        if finite:
            # Input-dependent additive terms may be masks too; constant ones (ALiBi) are biases.
            masks = sum(isinstance(t[0], tuple) or self.activation(t[0]) for t in out_terms)
            others = bool(out_keeps) or masks > sum(produced for _, produced in finite)
            with_rest = [rest for rest, _ in finite if rest]
            if not others and len(with_rest) <= 1 and (not with_rest or sq <= sk):
                if with_rest and full_rows is not None:
                    full_rows.extend(with_rest[0])
            else:
                causal, out_terms, out_keeps, n, _ = self._resolve_masks(terms, keeps, sq, sk, split_finite=False)
                notes.append("causal part kept in the mask: a row whose keys are all filled with a finite value "
                             "attends uniformly over every key, as the model does")
        notes.extend(n)
        kinds = []
        if out_keeps:
            kinds.append("bool")
        if out_terms:
            kinds.append("additive")
        return causal, out_terms, out_keeps, "+".join(kinds) or "none"

    def _resolve_masks(self, terms, keeps, sq, sk, split_finite: bool):
        """(causal, terms, keeps, notes, finite): ``finite`` lists, for each causal part split
        from a finite-fill mask, the (cond, negate) conjuncts that stayed with it."""
        causal = False
        notes: list[str] = []
        finite: list[list] = []
        out_terms, out_keeps = [], []
        for cond, negate in keeps:
            if negate:
                split, masked = split_causal_masked(cond, self.evaluator, self.user_inputs, sq, sk)
                out_keeps.extend((m, True) for m in masked)
            else:
                split = split_causal(cond, self.evaluator, self.user_inputs, sq, sk)
            notes.extend(split.notes)
            causal |= split.causal
            out_keeps.extend((r, False) for r in split.residual)
        for node, coef, tfs in terms:
            if isinstance(node, tuple):  # ("where", cond, negate, fill) from a masked score
                _, cond, negate, fill = node
                if not split_finite:
                    out_terms.append((node, coef, tfs))
                    continue
                rest = []
                if negate:
                    split, masked = split_causal_masked(cond, self.evaluator, self.user_inputs, sq, sk)
                    rest = [(m, True) for m in masked]
                    for m in masked:
                        out_terms.append((("where", m, True, fill), coef, tfs))
                else:
                    split = split_causal(cond, self.evaluator, self.user_inputs, sq, sk)
                notes.extend(split.notes)
                causal |= split.causal
                rest += [(r, False) for r in split.residual]
                if split.causal:
                    finite.append((rest, len(rest) - len(split.residual) + bool(split.residual)))
                if split.residual:
                    out_terms.append((("where-all", split.residual, fill), coef, tfs))
                continue
            ak = additive_keep(node, self.scalar_value)
            if ak is not None and coef > 0:
                cond, fill = ak
                if not split_finite:
                    out_terms.append((("where-all", [cond], fill), coef, tfs))
                    continue
                split = split_causal(cond, self.evaluator, self.user_inputs, sq, sk)
                notes.extend(split.notes)
                causal |= split.causal
                if split.causal and fill != float("-inf"):
                    finite.append(([(r, False) for r in split.residual], bool(split.residual)))
                if split.residual:
                    out_terms.append((("where-all", split.residual, fill), coef, tfs))
                continue
            pat = constant_additive_pattern(node, self.evaluator, self.user_inputs, sq, sk)
            if pat == "causal" and split_finite:
                causal = True
                if not bool((self.evaluator(node) == float("-inf")).any()):
                    finite.append(([], 0))
                continue
            if pat == "all":
                continue
            out_terms.append((node, coef, tfs))
        return causal, out_terms, out_keeps, notes, finite

    # -- site assembly ---------------------------------------------------------------

    def match_softmax(self, sm: fx.Node, idx: int) -> SiteMatch:
        x = softmax_input(sm)
        if x is None:
            raise NotAttention("softmax is not over the last axis")
        sshape = sym_shape(x)
        if len(sshape) < 2 or len(sshape) > 5:
            raise NotAttention("scores are not 2-5 dimensional")
        product, const, tfs, terms, keeps, sc_steps, internal, softcap = self.walk_scores(x, sshape)
        # Queries may be learned (Perceiver latents, attention pooling); keys must be activations.
        if not all(isinstance(a, fx.Node) for a in product.args[-2:]) or not self.activation(product.args[-1]):
            raise NotAttention("the keys of the score product are a weight, not an activation")
        pv, pr_steps, pr_internal = self.walk_probs(sm, x)
        xv = pv.args[1]
        if not isinstance(xv, fx.Node) or not self.activation(xv):
            raise NotAttention("the probabilities multiply a weight, not values")

        hs = shape(x)
        b, hq = _batch_heads(hs[:-2])
        sq, sk = hs[-2], hs[-1]
        # The scores and probabilities must keep the product's flat batch order.
        ident = torch.arange(b * hq)
        m = L.batch_map(product, sc_steps)
        if m is None or not torch.equal(m, ident):
            raise NotAttention("score layout not recognised")
        m = L.batch_map(sm, pr_steps)
        if m is None or not torch.equal(m, ident):
            raise NotAttention("probability layout not recognised")

        alpha, beta = 1.0, 1.0
        if is_op(product, BADDBMM):
            beta = float(product.kwargs.get("beta", 1.0))
            alpha = float(product.kwargs.get("alpha", 1.0))
            if beta != 0.0:  # beta == 0: baddbmm never reads its input (often torch.empty)
                terms.append((product.args[0], const * beta, list(tfs)))
        xq, xk = product.args[-2], product.args[-1]
        qk_batch = shape(product)[:-2]
        fb = qk_batch if is_op(product, MATMUL) else None
        q_op, hq_root, q_tr = self.operand(xq, False, (b, hq), fb)
        if hq_root != hq:
            raise NotAttention("query heads repeat")
        k_op, hkv, k_tr = self.operand(xk, True, (b, hq), fb)
        fbv = shape(pv)[:-2] if is_op(pv, MATMUL) else None
        v_op, hkv_v, _ = self.operand(xv, False, (b, hq), fbv, allow_scale=False)
        if hkv_v != hkv:
            raise NotAttention("keys and values have different head counts")

        scale = const * alpha
        for c, kind in q_tr.factors + k_tr.factors:
            if isinstance(c, float):
                scale = scale * c if kind == "mul" else scale / c
            else:
                tfs.append((c, kind))
        d = shape(q_op.node)[-1] if not q_op.transpose_last else shape(q_op.node)[-2]
        dv = shape(v_op.node)[-1] if not v_op.transpose_last else shape(v_op.node)[-2]
        return self._finish(sm, pv, idx, "matmul-softmax-matmul", q_op, k_op, v_op, scale, tfs, terms, keeps,
                            (b, hq), hkv, sq, sk, d, dv, False, internal + [sm] + pr_internal, softcap)

    def match_sdpa(self, node: fx.Node, idx: int) -> SiteMatch:
        args = list(node.args) + [None] * (8 - len(node.args))
        q, k, v, mask, dropout_p, is_causal, scale, gqa = args[:8]
        mask = node.kwargs.get("attn_mask", mask)
        dropout_p = node.kwargs.get("dropout_p", dropout_p) or 0.0
        is_causal = bool(node.kwargs.get("is_causal", is_causal) or False)
        scale = node.kwargs.get("scale", scale)
        gqa = bool(node.kwargs.get("enable_gqa", gqa) or False)
        if dropout_p:
            raise NotAttention("dropout_p > 0 (training mode)")
        qs, ks = shape(q), shape(k)
        if len(qs) != 4 or len(ks) != 4:
            raise NotAttention("scaled_dot_product_attention with non 4-D inputs")
        b, hq, sq, d = qs
        sk = ks[-2]
        # SDPA repeats kv heads itself under enable_gqa: compose that index with any
        # repeat found upstream of its k/v inputs.
        pre = L.gqa_map(b, hq, ks[1]) if gqa and ks[1] != hq else None
        q_op, hq_root, q_tr = self.operand(q, False, (b, hq), None)
        if hq_root != hq:
            raise NotAttention("query heads repeat")
        k_op, hkv, k_tr = self.operand(k, False, (b, hq), None, pre_map=pre)
        v_op, hkv_v, _ = self.operand(v, False, (b, hq), None, allow_scale=False, pre_map=pre)
        if hkv != hkv_v:
            raise NotAttention("keys and values have different head counts")
        s = default_scale(d) if scale is None else float(scale)
        tfs: list = []
        for c, kind in q_tr.factors + k_tr.factors:
            if isinstance(c, float):
                s = s * c if kind == "mul" else s / c
            else:
                tfs.append((c, kind))
        terms, keeps = [], []
        if isinstance(mask, fx.Node):
            if dtype(mask) == torch.bool:
                keeps.append((mask, False))
            else:
                terms.append((mask, 1.0, []))
        dv = shape(v_op.node)[-1]
        site = self._finish(node, node, idx, "sdpa", q_op, k_op, v_op, s, tfs, terms, keeps,
                            (b, hq), hkv, sq, sk, d, dv, is_causal, [node])
        return site

    def _finish(self, anchor, output, idx, form, q_op, k_op, v_op, scale, tfs, terms, keeps,
                batch_heads, hkv, sq, sk, d, dv, causal, internal, softcap=0.0) -> SiteMatch:
        b, hq = batch_heads
        notes: list[str] = []
        full_rows: list = []
        found_causal, terms, keeps, kind = self.resolve_masks(terms, keeps, sq, sk, notes, full_rows)
        causal = causal or found_causal
        if (terms or keeps or tfs) and len(sym_shape(softmax_input(anchor) if form != "sdpa" else q_op.node)) > 4:
            raise NotAttention("a mask or tensor scale on 5-D grouped scores")
        q_op.reshape_to = [b, hq]
        k_op.reshape_to = [b, hkv]
        v_op.reshape_to = [b, hkv]
        path = module_path(anchor)
        site = AttentionSite(
            id=f"attn.{idx}",
            module=path,
            module_type=module_type(anchor),
            form=form,
            batch=b,
            num_heads=hq,
            num_kv_heads=hkv,
            head_dim=d,
            value_dim=dv,
            seq_q=sq,
            seq_k=sk,
            scale=None if tfs else scale,
            causal=causal,
            mask_kind=kind,
            softcap=softcap,
            dtype=str(dtype(q_op.node)).replace("torch.", ""),
            layer=layer_of(path),
            notes=notes,
        )
        match = SiteMatch(site, anchor, output, q_op, k_op, v_op, scale, tfs, terms, keeps, (b, hq), internal)
        if full_rows:
            match.extra["full_rows"] = full_rows
        return match


def _batch_heads(batch: list[int]) -> tuple[int, int]:
    if len(batch) == 0:
        return 1, 1
    if len(batch) == 1:
        return 1, batch[0]
    return batch[0], math.prod(batch[1:])  # [B, Hkv, group] scores: the group is part of the heads


def discover(ep: ExportedProgram) -> Discovery:
    """Describe every attention site of ``ep`` (graph order); reasons for softmaxes left alone."""
    m = _Matcher(ep)
    out = Discovery()
    idx = 0
    for node in list(ep.graph_module.graph.nodes):
        if node.op != "call_function":
            continue
        try:
            if node.target in SDPA:
                out.matches.append(m.match_sdpa(node, idx))
                idx += 1
            elif softmax_input(node) is not None or node.target in SOFTMAX:
                out.matches.append(m.match_softmax(node, idx))
                idx += 1
        except NotAttention as e:
            out.rejected.append({"node": node.name, "module": module_path(node), "reason": str(e)})
        except Exception as e:  # noqa: BLE001 - a form the matcher trips on stays dense, with why
            first = first_line(e)
            out.rejected.append({"node": node.name, "module": module_path(node),
                                 "reason": f"matcher failed ({type(e).__name__}: {first}); left dense"})
    return out
