"""The pass: every Softmax anchor walked back to q@kᵀ and forward to @v, each fused op normalized,
and the entry point ``fuse_onnx_attention``."""

from __future__ import annotations

from typing import Optional

import onnx
import onnx_ir as ir
from onnx_ir.passes.common import ShapeInferencePass
from onnxscript import version_converter
from onnxscript.rewriter.pattern import MatchingTracer, MatchStatus

from compiler.ir.errors import InputError
from passes.onnx.builder import _Builder
from passes.onnx.common import (MAX_IR_VERSION, TARGET_OPSET, _LAYOUT_OPS, OnnxFusionResult, OnnxSite, _compose,
                                _input, _int_dim, _module_path, _neg_threshold, _producer, _rank, _Reject, _same_dim,
                                _shape, _swap_last, _used)
from passes.onnx.evaluation import _Constants
from passes.onnx.fused_op_rules import NormalizedSite, fused_op_rules
from passes.onnx.masks import _Masks, _Term


class _Reasons(MatchingTracer):
    """Keeps why the last rule that matched a node's op declined it (its check or its rewrite)."""

    def __init__(self):
        super().__init__()
        self.reason: Optional[str] = None

    def log(self, rule, container, node, match_result, status):
        if status in (MatchStatus.CONDITION_FAILED, MatchStatus.REPLACEMENT_FAILED):
            self.reason = match_result.reason


class _Fuser:
    def __init__(self, model: ir.Model):
        self.model = model
        self.graph = model.graph
        self.consts = _Constants(model)
        self.masks = _Masks(self.consts)
        self.result = OnnxFusionResult()
        self._builder: Optional[_Builder] = None
        # The fused-op rules; each rewrite files its Attention node here for the site record.
        self.rules = fused_op_rules(self)
        self.normalized: dict[ir.Node, NormalizedSite] = {}

    def _new_builder(self, anchor: ir.Node) -> _Builder:
        self._builder = _Builder(self.graph, anchor)
        return self._builder

    # -- bookkeeping ----------------------------------------------------------------------

    def _finish(self, b: _Builder, old_outputs: list[tuple[ir.Value, ir.Value]], attn: ir.Node,
                source: str, q4, k4, causal: bool, mask_kind: str, scale: float, softcap: float,
                seeds: list[ir.Node]) -> OnnxSite:
        site_id = f"attn.{len(self.result.sites)}"
        attn.metadata_props["attnforge.site"] = site_id
        # Uses move to the new outputs before the commit, so it sees them as used.
        names = []
        for old, new in old_outputs:
            names.append(old.name)
            old.replace_all_uses_with(new, replace_graph_outputs=True)
        created = {id(n) for n in b.commit()}
        removed = self._remove_dead(seeds)
        # A new output takes the replaced output's name, so graph outputs keep theirs.
        for (old, new), name in zip(old_outputs, names):
            p = new.producer()
            if p is not None and id(p) in created and old.producer().graph is None:
                old.name = None
                new.name = name
        site = OnnxSite(
            id=site_id, node=attn.name, source=source, removed_nodes=removed, module=_module_path(b.anchor),
            q_heads=_int_dim(q4, 1), kv_heads=_int_dim(k4, 1), head_dim=_int_dim(q4, 3),
            is_causal=causal, mask=mask_kind, scale=scale, softcap=softcap,
        )
        self.result.sites.append(site)
        return site

    def _remove_dead(self, seeds: list[ir.Node]) -> list[str]:
        removed: list[str] = []
        todo = list(seeds)
        while todo:
            n = todo.pop()
            if n.graph is not self.graph or any(_used(o) for o in n.outputs):
                continue
            inputs = list(n.inputs)  # safe removal detaches them
            self.graph.remove(n, safe=True)
            removed.append(n.name or n.op_type)
            for i in inputs:
                if i is None:
                    continue
                p = i.producer()
                if p is not None:
                    todo.append(p)
                elif (i.is_initializer() and not i.is_graph_input() and not _used(i)
                      and i.name in self.graph.initializers):
                    del self.graph.initializers[i.name]
        return removed

    def _attention(self, b: _Builder, q4, k4, v4, mask, scale: Optional[float], causal: bool,
                   softcap: float = 0.0, extra: Optional[dict] = None) -> ir.Node:
        idx = len(self.result.sites)
        inputs = [q4, k4, v4] + ([mask] if mask is not None else [])
        attrs = [ir.AttrInt64("is_causal", int(causal))]
        if scale is not None:
            attrs.append(ir.AttrFloat32("scale", float(scale)))
        if softcap:
            attrs.append(ir.AttrFloat32("softcap", float(softcap)))
        for k, v in (extra or {}).items():
            attrs.append(ir.AttrInt64(k, v))
        node = ir.Node("", "Attention", inputs, attrs, num_outputs=1, name=f"attnforge_attn_{idx}")
        b.nodes.append(node)
        return node

    # -- driver ---------------------------------------------------------------------------

    def run(self):
        for node in list(self.graph):
            if node.graph is not self.graph:
                continue  # consumed by an earlier site
            key = (node.domain or "", node.op_type)
            # Softmax anchors are walked by hand; every other node is offered to the fused-op rules.
            handler = self.softmax if key in (("", "Softmax"), ("ai.onnx", "Softmax")) else self._apply_rules
            self._builder = None
            try:
                handler(node)
            except _Reject as e:
                if self._builder is not None:
                    self._builder.discard()
                self.result.rejected.append((node.name or node.op_type, str(e)))

    def _apply_rules(self, node: ir.Node):
        """Offer a fused op to the rule set: the rule whose pattern matches it either declines it
        (its check's or rewrite's reason) or builds the replacement, which is applied and
        recorded here like an unfused site."""
        reasons = _Reasons()
        for rule in self.rules:
            delta = rule.try_rewrite(self.model, self.graph, node, tracer=reasons)
            if reasons.reason is not None:
                raise _Reject(reasons.reason)
            if delta is None:
                continue
            attn = next(n for n in delta.new_nodes if n in self.normalized)
            site = self.normalized.pop(attn)
            b = self._new_builder(node)
            b.nodes = list(delta.new_nodes)
            # The op's first output always moves; a further one (GQA's present K/V) when used.
            pairs = [(old, new) for i, (old, new) in enumerate(zip(delta.match.outputs, delta.new_outputs))
                     if i == 0 or _used(old)]
            self._finish(b, pairs, attn, site.source, site.q4, site.k4, site.causal, site.mask_kind,
                         site.scale, site.softcap, [node])
            return

    # -- Softmax anchors ------------------------------------------------------------------

    def softmax(self, sm: ir.Node):
        x = sm.inputs[0]
        rank = _rank(x)
        if rank is None:
            raise _Reject("softmax input rank unknown")
        axis = sm.attributes.get_int("axis", -1)
        if axis not in (-1, rank - 1):
            raise _Reject(f"softmax over axis {axis}, not the last axis")
        alpha, terms, softcap, qk, upcast = self._walk_scores(x)
        pv, prob_nodes = self._walk_probs(sm)
        if rank not in (3, 4):
            raise _Reject(f"scores have rank {rank}; expected 3 or 4")
        q, kt = qk.inputs
        v = pv.inputs[1]
        for name, t in (("q", q), ("k", kt), ("v", v)):
            if _rank(t) != rank:
                raise _Reject(f"{name} operand rank {_rank(t)} does not match the scores rank {rank}")
        # A mask may broadcast into the scores but not enlarge them: the op's output has the
        # shape q/k/v give. Only a static 1 in the product can be enlarged.
        xs, ss = _shape(x), _shape(qk.outputs[0])
        shape_safe = xs is not None and ss is not None and len(xs) == len(ss) and all(
            not (d == 1 and e != 1) for e, d in zip(xs, ss))
        if terms and not shape_safe:
            raise _Reject("cannot prove the mask keeps the shape of the scores")

        b = self._new_builder(pv)
        q, fq = self._peel_scale(b, q)
        kt, fk = self._peel_scale(b, kt)
        alpha *= fq * fk
        if not alpha > 0:
            raise _Reject(f"scale {alpha} is not positive")
        k = self._untranspose(b, kt)
        # repeat_kv is undone on both k and v or neither: the op has one q-to-kv head map.
        rk, rv = self._unrepeat(k), self._unrepeat(v)
        if rk is not None and rv is not None and rk[1] == rv[1]:
            k, v = rk[0], rv[0]
        if rank == 3:
            q4, k4, v4 = (b.op("Unsqueeze", [t, b.ints([1])]) for t in (q, k, v))
            for t4, t in ((q4, q), (k4, k), (v4, v)):
                s = _shape(t)
                if s is not None:
                    t4.type, t4.shape = t.type, ir.Shape([s[0], 1, *s[1:]])
        else:
            q4, k4, v4 = q, k, v
        self._check_heads(q4, k4, v4)

        causal, terms = self.masks.simplify(terms, xs[-2] if xs else None, xs[-1] if xs else None, shape_safe)
        mask, mask_kind = self.masks.assemble(b, terms, q.dtype, q4, k4, rank)
        # A softmax the model ran in fp32 on half-precision scores stays in fp32.
        low = q.dtype in (ir.DataType.FLOAT16, ir.DataType.BFLOAT16)
        extra = {"softmax_precision": int(ir.DataType.FLOAT)} if upcast and low else None
        attn = self._attention(b, q4, k4, v4, mask, alpha, causal, softcap, extra)
        y = attn.outputs[0]
        old = pv.outputs[0]
        if rank == 3:
            y = b.op("Squeeze", [y, b.ints([1])])
        if old.dtype is not None and q.dtype is not None and old.dtype != q.dtype:
            y = b.op("Cast", [y], to=old.dtype)
        y.type, y.shape = old.type, old.shape
        self._finish(b, [(old, y)], attn, "matmul-softmax", q4, k4, causal, mask_kind, alpha,
                     softcap, [pv, sm, *prob_nodes])

    def _walk_probs(self, sm: ir.Node):
        """Softmax forward to the MatMul with V; returns (pv node, nodes on the way)."""
        cur = sm.outputs[0]
        nodes: list[ir.Node] = []
        while True:
            if cur.is_graph_output():
                raise _Reject("attention probabilities are a graph output")
            uses = list(cur.uses())
            users = {id(n): n for n, _ in uses}
            if len(users) == 2:
                safe = self._safe_softmax_where(cur, list(users.values()))
                if safe is not None:
                    nodes.extend(safe[1])
                    cur = safe[0]
                    continue
            if not uses:
                raise _Reject("attention probabilities are unused")
            if len(uses) != 1:
                raise _Reject("attention probabilities are used elsewhere (e.g. returned as weights)")
            node, idx = uses[0]
            op = node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}.{node.op_type}"
            if op == "MatMul" and idx == 0:
                return node, nodes
            if op == "MatMul":
                raise _Reject("probabilities are the right operand of a MatMul (weights, not values)")
            if op == "Cast" and ir.DataType(node.attributes.get_int("to", 0)).is_floating_point():
                pass
            elif op == "Identity":
                pass
            elif op == "Dropout":
                if not self._dropout_inactive(node):
                    raise _Reject("dropout on attention probabilities may be active (training mode)")
            else:
                raise _Reject(f"probabilities pass through {op}, not a MatMul with values")
            nodes.append(node)
            cur = node.outputs[0]

    def _safe_softmax_where(self, p: ir.Value, users: list[ir.Node]):
        """``Where(IsNaN(p), 0, p)``: torch's safe softmax (zeros for fully masked rows)."""
        isnan = next((u for u in users if u.op_type == "IsNaN"), None)
        where = next((u for u in users if u.op_type == "Where"), None)
        if isnan is None or where is None or len(list(p.uses())) != 2:
            return None
        if where.inputs[0] is not isnan.outputs[0] or where.inputs[2] is not p:
            return None
        if self.consts.scalar(where.inputs[1]) != 0.0 or len(list(isnan.outputs[0].uses())) != 1:
            return None
        if isnan.outputs[0].is_graph_output():
            return None
        return where.outputs[0], [isnan, where]

    def _dropout_inactive(self, node: ir.Node) -> bool:
        """Dropout is the identity unless training_mode is (or may be) true."""
        if len(node.outputs) > 1 and _used(node.outputs[1]):
            return False
        training = _input(node, 2)
        if training is None:
            return True
        t = self.consts.scalar(training)
        return t is not None and t == 0

    def _reaches_qk(self, v: ir.Value, depth: int = 24) -> bool:
        """Does ``v`` lead back, through the ops the scores walk allows, to a MatMul of two
        activations? Used to tell scores from bias at an Add/Sub/Where."""
        todo = [(v, 0)]
        while todo:
            cur, d = todo.pop()
            p = _producer(cur)
            if p is None or d > depth:
                continue
            op = p.op_type
            if op == "MatMul":
                if not self.consts.is_static(p.inputs[0]) and not self.consts.is_static(p.inputs[1]):
                    return True
            elif op in ("Cast", "Identity", "Tanh"):
                todo.append((p.inputs[0], d + 1))
            elif op in ("Mul", "Div"):
                todo.extend((i, d + 1) for i in p.inputs if not self.consts.is_static(i))
            elif op in ("Add", "Sub"):
                todo.extend((i, d + 1) for i in p.inputs)
            elif op == "Where":
                todo.extend((i, d + 1) for i in p.inputs[1:])
        return False

    def _walk_scores(self, x: ir.Value):
        """Softmax input back to q@kᵀ, as ``softmax_in = softcap·tanh(alpha·qk/softcap) + Σ terms``.

        ``alpha`` accumulates every scalar multiplier between the product and the softmax;
        each bias is recorded with the multiplier that applies to it. Returns
        (alpha, terms, softcap, product node, whether the scores were cast to fp32)."""
        alpha = 1.0
        terms: list[_Term] = []
        softcap = 0.0
        upcast = False
        v = x
        for _ in range(64):
            p = v.producer()
            if p is None or p.domain not in ("", "ai.onnx"):
                what = "a graph input" if p is None else f"{p.domain}.{p.op_type}"
                raise _Reject(f"scores come from {what}, not a MatMul")
            op = p.op_type
            if op == "MatMul":
                a, c = p.inputs
                if self.consts.is_static(a) or self.consts.is_static(c):
                    raise _Reject("scores are a product with a constant (a projection, not q@kᵀ)")
                return alpha, terms, softcap, p, upcast
            if op == "Cast":
                to = ir.DataType(p.attributes.get_int("to", 0))
                if not to.is_floating_point():
                    raise _Reject("scores are cast to a non-float type")
                upcast = upcast or to == ir.DataType.FLOAT
                v = p.inputs[0]
            elif op == "Identity":
                v = p.inputs[0]
            elif op in ("Mul", "Div"):
                a, c = p.inputs
                ca, cc = self.consts.scalar(a), self.consts.scalar(c)
                if cc is not None and cc != 0:
                    alpha = alpha * cc if op == "Mul" else alpha / cc
                    v = a
                elif op == "Mul" and ca is not None:
                    alpha *= ca
                    v = c
                else:
                    raise _Reject(f"scores pass through {op} by a non-scalar or non-constant tensor")
            elif op == "Tanh":
                # softcap·tanh(z): everything already collected multiplies tanh.
                if softcap:
                    raise _Reject("two tanh soft-caps on the scores")
                softcap = alpha
                v = p.inputs[0]
            elif op in ("Add", "Sub"):
                if softcap:
                    raise _Reject("a bias inside the tanh soft-cap is not expressible")
                a, c = p.inputs
                ra, rc = self._reaches_qk(a), self._reaches_qk(c)
                if ra == rc:
                    raise _Reject("cannot tell scores from bias at " + op)
                if op == "Sub" and rc:
                    raise _Reject("scores are subtracted (negated)")
                scores, bias = (a, c) if ra else (c, a)
                terms.append(_Term("add", bias, alpha if op == "Add" else -alpha))
                v = scores
            elif op == "Where":
                if softcap:
                    raise _Reject("a mask inside the tanh soft-cap is not expressible")
                cond, a, c = p.inputs
                ca, cc = self.consts.scalar(a), self.consts.scalar(c)
                # masked_fill with a finite fill attends nowhere else either, as long as the
                # fill is far below any score; only fully masked rows differ (documented).
                thr = _neg_threshold(p.outputs[0].dtype)
                if cc is not None and cc <= thr and not self.consts.is_static(a):
                    terms.append(_Term("keep", cond))
                    v = a
                elif ca is not None and ca <= thr and not self.consts.is_static(c):
                    terms.append(_Term("drop", cond))
                    v = c
                else:
                    raise _Reject("Where on the scores is not a mask with a large negative fill")
            else:
                raise _Reject(f"scores pass through {op}")
        raise _Reject("scores chain too long")

    def _peel_scale(self, b: _Builder, v: ir.Value) -> tuple[ir.Value, float]:
        """Move scalar Mul/Div on an operand into the scale, also from below layout ops
        (Transpose/Reshape/...), which are re-applied to the unscaled value."""
        factor = 1.0
        chain: list[ir.Node] = []  # layout nodes between v and cur, innermost first
        cur = v
        best = (v, [], 1.0)
        for _ in range(16):
            p = _producer(cur)
            if p is None:
                break
            if p.op_type in ("Mul", "Div"):
                a, c = p.inputs
                ca, cc = self.consts.scalar(a), self.consts.scalar(c)
                if cc is not None and cc != 0:
                    factor = factor * cc if p.op_type == "Mul" else factor / cc
                    cur = a
                elif p.op_type == "Mul" and ca is not None:
                    factor *= ca
                    cur = c
                else:
                    break
                best = (cur, list(chain), factor)
            elif p.op_type in _LAYOUT_OPS and all(self.consts.is_static(i) for i in p.inputs[1:]):
                chain.insert(0, p)
                cur = p.inputs[0]
            else:
                break
        base, chain, factor = best
        if base is v:
            return v, 1.0
        out = base
        for node in chain:
            out = b.op(node.op_type, [out, *node.inputs[1:]],
                       **{k: a.value for k, a in node.attributes.items()})
            out.type, out.shape = node.outputs[0].type, node.outputs[0].shape
        return out, factor

    def _untranspose(self, b: _Builder, kt: ir.Value) -> ir.Value:
        """K from the product's right operand kᵀ (…, D, Sk), folding away the transposes that
        produced it: a Transpose, or the SDPA decomposition's Reshape·Transpose·Reshape."""
        rank = _rank(kt)
        swap = _swap_last(rank)
        p = _producer(kt, "Transpose")
        if p is not None:
            perm = list(p.attributes.get_ints("perm", list(range(rank))[::-1]))
            full = _compose(perm, swap)
            src = p.inputs[0]
            if full == list(range(rank)):
                return src
            return b.transpose(src, full)
        k4 = self._sdpa_untranspose(b, kt)
        if k4 is not None:
            return k4
        return b.transpose(kt, swap)

    @staticmethod
    def _sdpa_untranspose(b: _Builder, kt: ir.Value) -> Optional[ir.Value]:
        """Reshape(Transpose(Reshape(k, [B*H, S, D]), (0, 2, 1)), [B, H, D, S]) is kᵀ of k
        [B, H, S, D]. When the flattened k is not itself a value (torch merges the repeat_kv
        view into the flattening), k is re-formed with one Reshape of the same source."""
        r2 = _producer(kt, "Reshape")
        t = _producer(r2.inputs[0], "Transpose") if r2 else None
        if t is None or list(t.attributes.get_ints("perm", [])) != [0, 2, 1]:
            return None
        r1 = _producer(t.inputs[0], "Reshape")
        if r1 is None:
            return None
        k, flat, out = r1.inputs[0], _shape(r1.outputs[0]), _shape(kt)
        if flat is None or out is None or len(out) != 4 or len(flat) != 3:
            return None
        if not (_same_dim(flat[1], out[3]) and _same_dim(flat[2], out[2])):
            return None
        ks = _shape(k)
        if ks is not None and len(ks) == 4 and all(_same_dim(a, c) for a, c in
                                                  ((ks[0], out[0]), (ks[1], out[1]), (ks[2], out[3]), (ks[3], out[2]))):
            return k
        dims = [out[0], out[1], out[3], out[2]]
        if not all(isinstance(d, int) for d in dims):
            return None
        k4 = b.op("Reshape", [k, b.ints(dims)])
        k4.type, k4.shape = kt.type, ir.Shape(dims)
        return k4

    def _unrepeat(self, x: ir.Value):
        """repeat_kv: Reshape(Expand(Unsqueeze(k, 2), [B, Hkv, n, S, D]), [B, Hkv*n, S, D]).
        Returns (k, Hkv), or None when ``x`` is not such a repeat."""
        r = _producer(x, "Reshape")
        e = _producer(r.inputs[0], "Expand") if r else None
        u = _producer(e.inputs[0], "Unsqueeze") if e else None
        if u is None:
            return None
        axes = self.consts.value(u.inputs[1]) if len(u.inputs) > 1 else None
        axes = axes.tolist() if axes is not None else list(u.attributes.get_ints("axes", []))
        k = u.inputs[0]
        ks, xs = _shape(k), _shape(x)
        if axes not in ([2], 2) or ks is None or xs is None or len(ks) != 4 or len(xs) != 4:
            return None
        # The expanded shape: from shape inference, or from the constant target shape.
        es = _shape(e.outputs[0])
        target = self.consts.value(e.inputs[1])
        if target is not None and target.size == 5:
            es = [t if t != 1 else d for t, d in zip(target.tolist(), [ks[0], ks[1], 1, ks[2], ks[3]])]
        if es is None or len(es) != 5:
            return None
        hkv, n, hq = ks[1], es[2], xs[1]
        if not (isinstance(hkv, int) and isinstance(n, int) and isinstance(hq, int) and hq == hkv * n):
            return None
        if not all(_same_dim(a, c) for a, c in ((ks[0], xs[0]), (ks[2], xs[2]), (ks[3], xs[3]))):
            return None
        return k, hkv

    @staticmethod
    def _check_heads(q4, k4, v4):
        """The op maps q head h to kv head h // (Hq/Hkv) and needs one batch for all three;
        MatMul broadcasting that does anything else is not expressible."""
        qs, ks, vs = _shape(q4), _shape(k4), _shape(v4)
        if qs is None or ks is None or vs is None:
            return
        for a, c, what in ((qs[0], ks[0], "k batch"), (qs[0], vs[0], "v batch"), (ks[1], vs[1], "k/v heads"),
                           (ks[2], vs[2], "k/v length"), (qs[3], ks[3], "q/k head size")):
            if isinstance(a, int) and isinstance(c, int) and a != c:
                raise _Reject(f"{what} broadcast ({a} vs {c}) is not expressible")
        hq, hkv = qs[1], ks[1]
        if isinstance(hq, int) and isinstance(hkv, int) and hq % hkv:
            raise _Reject(f"{hq} query heads are not a multiple of {hkv} key/value heads")



# ----------------------------------------------------------------------------------------
# entry point


def _load(model: onnx.ModelProto) -> ir.Model:
    if not isinstance(model, onnx.ModelProto):
        raise InputError(f"fuse_onnx_attention expects an onnx.ModelProto, got {type(model).__name__}")
    try:
        m = ir.serde.deserialize_model(model)
    except Exception as e:
        raise InputError(f"the ONNX model could not be read: {str(e).splitlines()[0]}") from None
    # Shapes tell layouts, head counts and mask broadcasting apart; a model onnx cannot
    # infer still goes through, with fewer sites proven.
    try:
        m = ShapeInferencePass(strict_mode=False)(m).model
    except Exception:
        pass
    return m


def _to_target_opset(m: ir.Model):
    current = m.opset_imports.get("", m.opset_imports.get("ai.onnx"))
    if current is None:
        m.opset_imports[""] = TARGET_OPSET
        return
    if current >= TARGET_OPSET:
        return
    try:
        version_converter.convert_version(m, TARGET_OPSET, fallback=True)
    except Exception as e:
        raise InputError(f"cannot convert the model from opset {current} to {TARGET_OPSET}: "
                         f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    if m.opset_imports.get("", 0) < TARGET_OPSET:
        raise InputError(f"cannot convert the model from opset {current} to {TARGET_OPSET}")


def fuse_onnx_attention(model: onnx.ModelProto) -> tuple[onnx.ModelProto, OnnxFusionResult]:
    """Rewrite every dense attention subgraph of ``model`` into one ai.onnx ``Attention``
    (opset 23) node. The input model is not modified."""
    m = _load(model)
    _to_target_opset(m)
    fuser = _Fuser(m)
    fuser.run()
    out = ir.serde.serialize_model(m)
    out.ir_version = MAX_IR_VERSION
    return out, fuser.result
