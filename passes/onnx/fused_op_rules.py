"""Already-fused attention ops as onnxscript rewrite rules: ai.onnx ``Attention`` and the
onnxruntime contrib ops ``MultiHeadAttention``, ``Attention`` (packed QKV weights) and
``GroupQueryAttention`` (prefill form).

Each rule is a ``pattern`` (the fused op and its inputs), a ``check`` (the legality conditions,
failing with the reason the report shows for a node left alone) and a ``rewrite`` (the
normalized form: 4-D Q/K/V, an explicit mask and one standard opset-23 ``Attention``). The rules
only build; the fuser applies each replacement and records the site (``_Fuser._apply_rule``), so
site records, node removal and output naming stay in one place for fused and unfused sites.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional

import numpy as np
import onnx_ir as ir
from onnxscript.rewriter.pattern import MatchResult, RewriteRuleClassBase, RewriteRuleSet, Var

from passes.onnx.builder import _Builder
from passes.onnx.common import _MS, _Reject, _input, _int_dim, _rank, _shape, _used
from passes.onnx.masks import _Term

if TYPE_CHECKING:
    from passes.onnx.fuser import _Fuser


@dataclass
class NormalizedSite:
    """What a rule's rewrite tells the site recorder about the ``Attention`` node it built."""

    source: str
    q4: ir.Value
    k4: ir.Value
    causal: bool
    mask_kind: str
    scale: float
    softcap: float


def _optional(*names: str) -> list[Var]:
    """Pattern inputs a model may leave out."""
    return [Var(n, can_match_none=True) for n in names]


def _failed(reason: str) -> MatchResult:
    return MatchResult().fail(reason)


def _head_reason(x: Optional[ir.Value], heads: Optional[int], what: str, rank: Optional[int] = None) -> Optional[str]:
    """Why ``x`` (rank ``rank`` when given, else its own) cannot be split into heads, or None."""
    r = _rank(x) if rank is None else rank
    if r == 4:
        return None
    if r == 3:
        return None if heads else f"3-D {what} needs a head count"
    return f"{what} has rank {r}; expected 3 or 4"


def _head_inputs(b: _Builder, x: ir.Value, heads: Optional[int], what: str) -> ir.Value:
    """[B, S, H*D] -> [B, H, S, D]; 4-D values pass through."""
    reason = _head_reason(x, heads, what)
    if reason is not None:
        raise _Reject(reason)
    if _rank(x) == 4:
        return x
    out = b.op("Reshape", [x, b.ints([0, 0, heads, -1])])
    out = b.op("Transpose", [out], perm=[0, 2, 1, 3])
    s = _shape(x)
    if s is not None:
        d = s[2] // heads if isinstance(s[2], int) else None
        out.shape = ir.Shape([s[0], heads, s[1], d])
        out.type = x.type
    return out


def _padding_reason(mask: ir.Value, batch: Optional[int], what: str) -> Optional[str]:
    r = _rank(mask)
    if r == 1:
        n = _int_dim(mask, 0)
        if n is None or batch is None or n != batch:
            return f"{what} of shape {_shape(mask)} (start/end positions) is not normalized"
        return None
    return None if r in (2, 3) else f"{what} of rank {r} is not normalized"


def _padding_term(b: _Builder, mask: ir.Value, fill: float, dtype, batch, k4, what: str) -> _Term:
    """onnxruntime's key padding / mask_index (1 attends, 0 adds ``fill``) as a float term,
    so the numbers match the contrib op exactly."""
    reason = _padding_reason(mask, batch, what)
    if reason is not None:
        raise _Reject(reason)
    r = _rank(mask)
    zero, neg = b.scalar_like(0.0, dtype), b.scalar_like(fill, dtype)
    if r == 1:
        # [B] lengths: keys at or past the length are masked
        t = b.op("Squeeze", [b.seq_len(k4), b.ints([0])])
        pos = b.op("Range", [b.ints(0), t, b.ints(1)])
        lens = b.op("Unsqueeze", [b.op("Cast", [mask], to=ir.DataType.INT64), b.ints([1])])
        keep = b.op("Less", [pos, lens])
        add = b.op("Where", [keep, zero, neg])
        return _Term("add", b.op("Unsqueeze", [add, b.ints([1, 2])]))
    masked = b.op("Equal", [mask, b.const(np.zeros((), dtype=mask.dtype.numpy()))])
    add = b.op("Where", [masked, neg, zero])
    return _Term("add", b.op("Unsqueeze", [add, b.ints([1, 2] if r == 2 else [1])]))


class _FusedOpRule(RewriteRuleClassBase):
    """Shared by the rules: ``check`` asks ``reason(node)``, ``rewrite`` runs ``normalize`` on a
    builder whose nodes are the replacement, then the common tail (mask simplification, the
    ``Attention`` node, head merge)."""

    source = ""
    output = "output"  # the pattern's name for the op's first output

    def __init__(self, fuser: "_Fuser", remove_nodes: bool = False):
        # The fuser removes the node itself (with its now-dead producers) when it records the site;
        # run on their own (``RewriteRuleSet.apply_to_model``) the rules must remove it, or the
        # kept node matches again on the next sweep.
        super().__init__(name=type(self).__name__, remove_nodes=remove_nodes)
        self.fuser = fuser

    def reason(self, node: ir.Node) -> Optional[str]:
        raise NotImplementedError

    def normalize(self, b: _Builder, node: ir.Node) -> list[ir.Value]:
        raise NotImplementedError

    def check(self, context, **_) -> MatchResult:
        if context.root in self.fuser.normalized:
            # Our own output (an opset-23 Attention): under onnxscript's driver, which sweeps
            # until nothing matches, it would match the Attention rule again and again.
            return _failed("already in the normalized form")
        why = self.reason(context.root)
        return _failed(why) if why else MatchResult()

    def rewrite(self, op, **bindings):
        node = bindings[self.output].producer()
        b = self.fuser._new_builder(node)
        try:
            outputs = self.normalize(b, node)
        except _Reject as e:
            return _failed(str(e))
        for n in b.nodes:
            # The builder's nodes are the replacement subgraph; the tape's storage hook takes
            # them as built (no renaming or folding, so the result is the hand-written one's).
            op._add_node(n)
        return outputs

    def emit(self, node: ir.Node, b: _Builder, q4, k4, v4, terms: list[_Term], causal: bool,
             scale: Optional[float], softcap: float, out3: bool, extra_attrs=None) -> ir.Value:
        qs, ks = _shape(q4), _shape(k4)
        fuser = self.fuser
        found, terms = fuser.masks.simplify(terms, qs[2] if qs else None, ks[2] if ks else None, True)
        causal = causal or found
        mask, kind = fuser.masks.assemble(b, terms, q4.dtype, q4, k4, 4)
        if scale is None:
            d = _int_dim(q4, 3)
            scale = 1.0 / math.sqrt(d) if d else None
        attn = fuser._attention(b, q4, k4, v4, mask, scale, causal, softcap, extra_attrs)
        fuser.normalized[attn] = NormalizedSite(self.source, q4, k4, causal, kind,
                                                scale if scale is not None else float("nan"), softcap)
        y = attn.outputs[0]
        old = node.outputs[0]
        if out3:
            y = b.merge_heads(y)
        y.type, y.shape = old.type, old.shape
        return y

    def emit_contrib(self, node: ir.Node, b: _Builder, q4, k4, v4, terms: list[_Term], bias) -> ir.Value:
        """The tail MultiHeadAttention and Attention share: their bias, scale and ``unidirectional``."""
        attrs = node.attributes
        if bias is not None:
            terms.append(_Term("add", bias))
        scale = attrs.get_float("scale", 0.0) or None
        return self.emit(node, b, q4, k4, v4, terms, bool(attrs.get_int("unidirectional", 0)), scale, 0.0, True)


class OnnxAttentionRule(_FusedOpRule):
    """ai.onnx ``Attention`` (opset 23), 3-D or 4-D, without KV cache."""

    source, output = "ai.onnx.Attention", "Y"

    def pattern(self, op, Q, K, V):
        return op.Attention(Q, K, V, *_optional("attn_mask"), _allow_other_inputs=True, _outputs=["Y"])

    def reason(self, node):
        if any(_input(node, i) is not None for i in (4, 5)):
            return "past_key/past_value (KV cache) are not normalized"
        if any(_input(node, i) is not None for i in range(6, len(node.inputs))):
            return "nonpad_kv_seqlen is not normalized"
        if any(_used(o) for o in node.outputs[1:]):
            return "present_key/present_value/qk_matmul_output are used"
        attrs = node.attributes
        hq, hkv = attrs.get_int("q_num_heads", 0), attrs.get_int("kv_num_heads", 0)
        return next((r for r in (_head_reason(_input(node, 0), hq, "Q"), _head_reason(_input(node, 1), hkv, "K"),
                                 _head_reason(_input(node, 2), hkv, "V")) if r), None)

    def normalize(self, b, node):
        q, k, v, m = (_input(node, i) for i in range(4))
        attrs = node.attributes
        hq, hkv = attrs.get_int("q_num_heads", 0), attrs.get_int("kv_num_heads", 0)
        out3 = _rank(q) == 3
        q4, k4, v4 = _head_inputs(b, q, hq, "Q"), _head_inputs(b, k, hkv, "K"), _head_inputs(b, v, hkv, "V")
        rk, rv = self.fuser._unrepeat(k4), self.fuser._unrepeat(v4)
        if rk is not None and rv is not None and rk[1] == rv[1]:
            k4, v4 = rk[0], rv[0]  # the exporter's repeat_kv: the op does GQA natively
        terms = []
        if m is not None:
            terms.append(_Term("keep", m) if m.dtype == ir.DataType.BOOL else _Term("add", m))
        scale = attrs.get_float("scale", 0.0) if "scale" in attrs else None
        extra = {"softmax_precision": attrs.get_int("softmax_precision", 0)} \
            if attrs.get_int("softmax_precision", 0) else None
        return [self.emit(node, b, q4, k4, v4, terms, bool(attrs.get_int("is_causal", 0)), scale,
                          attrs.get_float("softcap", 0.0), out3, extra_attrs=extra)]


class MultiHeadAttentionRule(_FusedOpRule):
    """com.microsoft ``MultiHeadAttention``: separate 3-D Q/K/V (K/V may be 4-D), optional packed
    bias, key padding mask and attention bias; no past state."""

    source = f"{_MS}.MultiHeadAttention"

    def pattern(self, op, query):
        return op.MultiHeadAttention(query, *_optional("key", "value", "bias", "key_padding_mask", "attention_bias"),
                                     _domain=_MS, _allow_other_inputs=True, _outputs=["output"])

    def reason(self, node):
        if any(_input(node, i) is not None for i in range(6, len(node.inputs))):
            return "past key/value or cache inputs (decoding form) are not normalized"
        if any(_used(o) for o in node.outputs[1:]):
            return "present key/value or qk outputs are used"
        q, k, v, bias, kpm = (_input(node, i) for i in range(5))
        heads = node.attributes.get_int("num_heads", 0)
        if k is None or v is None:
            return "packed QKV query is not normalized"
        if _rank(q) != 3 or _rank(k) not in (3, 4) or _rank(v) not in (3, 4):
            return f"query/key/value ranks {_rank(q)}/{_rank(k)}/{_rank(v)} are not the 3-D separate form"
        if bias is not None:
            if _rank(k) != 3:
                return "bias with 4-D key is not normalized"
            if None in [_int_dim(t, 2) for t in (q, k, v)]:
                return "bias needs static hidden sizes"
        why = next((r for r in (_head_reason(q, heads, "query"), _head_reason(k, heads, "key"),
                                _head_reason(v, heads, "value")) if r), None)
        if why is None and kpm is not None:
            why = _padding_reason(kpm, _int_dim(q, 0), "key_padding_mask")
        return why

    def normalize(self, b, node):
        q, k, v, bias, kpm, ab = (_input(node, i) for i in range(6))
        attrs = node.attributes
        heads = attrs.get_int("num_heads", 0)
        if bias is not None:
            sizes = [_int_dim(t, 2) for t in (q, k, v)]
            bq, bk, bv = b.op("Split", [bias, b.ints(sizes)], num_outputs=3, axis=0)
            q, k, v = b.op("Add", [q, bq]), b.op("Add", [k, bk]), b.op("Add", [v, bv])
            for new, old in ((q, node.inputs[0]), (k, node.inputs[1]), (v, node.inputs[2])):
                new.type, new.shape = old.type, old.shape
        q4, k4, v4 = _head_inputs(b, q, heads, "query"), _head_inputs(b, k, heads, "key"), \
            _head_inputs(b, v, heads, "value")
        fill = attrs.get_float("mask_filter_value", -10000.0)
        terms = []
        if kpm is not None:
            terms.append(_padding_term(b, kpm, fill, q.dtype, _int_dim(q, 0), k4, "key_padding_mask"))
        return [self.emit_contrib(node, b, q4, k4, v4, terms, ab)]


class PackedAttentionRule(_FusedOpRule):
    """com.microsoft ``Attention``: one packed projection ``x @ W + bias`` split into Q|K|V."""

    source = f"{_MS}.Attention"

    def pattern(self, op, input, weights):
        return op.Attention(input, weights, *_optional("bias", "mask_index"), _domain=_MS, _allow_other_inputs=True,
                            _outputs=["output"])

    @staticmethod
    def _sizes(node) -> Optional[list[int]]:
        sizes = list(node.attributes.get_ints("qkv_hidden_sizes", []))
        if sizes:
            return sizes
        total = _int_dim(_input(node, 1), 1)
        return None if total is None or total % 3 else [total // 3] * 3

    def reason(self, node):
        attrs = node.attributes
        if _input(node, 4) is not None or _input(node, 6) is not None:
            return "past state (decoding form) is not normalized"
        if any(_used(o) for o in node.outputs[1:]):
            return "present state output is used"
        if attrs.get_int("do_rotary", 0):
            return "do_rotary=1 is not normalized"
        x, mask = _input(node, 0), _input(node, 3)
        if _rank(x) != 3:
            return f"input of rank {_rank(x)} is not normalized"
        if self._sizes(node) is None:
            return "weights width unknown; cannot split Q/K/V"
        heads = attrs.get_int("num_heads", 0)
        why = next((r for r in (_head_reason(None, heads, w, rank=3) for w in ("Q", "K", "V")) if r), None)
        if why is None and mask is not None:
            why = ("4-D (Megatron) mask_index is not normalized" if _rank(mask) == 4
                   else _padding_reason(mask, _int_dim(x, 0), "mask_index"))
        return why

    def normalize(self, b, node):
        attrs = node.attributes
        x, w, bias, mask, ab = (_input(node, i) for i in (0, 1, 2, 3, 5))
        heads = attrs.get_int("num_heads", 0)
        sizes = self._sizes(node)
        # Packed projection as the contrib op computes it: x @ W + bias, then Q|K|V.
        qkv = b.op("MatMul", [x, w])
        if bias is not None:
            qkv = b.op("Add", [qkv, bias])
        q, k, v = b.op("Split", [qkv, b.ints(sizes)], num_outputs=3, axis=2)
        xs = _shape(x)
        for t, d in zip((q, k, v), sizes):
            t.type, t.shape = x.type, ir.Shape([xs[0], xs[1], d])
        q4, k4, v4 = _head_inputs(b, q, heads, "Q"), _head_inputs(b, k, heads, "K"), _head_inputs(b, v, heads, "V")
        terms = []
        if mask is not None:
            terms.append(_padding_term(b, mask, attrs.get_float("mask_filter_value", -10000.0),
                                       x.dtype, _int_dim(x, 0), k4, "mask_index"))
        return [self.emit_contrib(node, b, q4, k4, v4, terms, ab)]


class GroupQueryAttentionRule(_FusedOpRule):
    """com.microsoft ``GroupQueryAttention`` in prefill form: no past, no rotary, no local window;
    keys past ``seqlens_k[b]`` are padding and the op is causal."""

    source = f"{_MS}.GroupQueryAttention"

    def pattern(self, op, query):
        inputs = _optional("key", "value", "past_key", "past_value", "seqlens_k", "total_sequence_length")
        return op.GroupQueryAttention(query, *inputs, _domain=_MS, _allow_other_inputs=True,
                                      _outputs=["output", "present_key", "present_value"])

    @staticmethod
    def _packed_head_dim(node) -> Optional[int]:
        attrs = node.attributes
        hq, hkv = attrs.get_int("num_heads", 0), attrs.get_int("kv_num_heads", 0)
        width = _int_dim(_input(node, 0), 2)
        if width is None or not hq or not hkv or width % (hq + 2 * hkv):
            return None
        return width // (hq + 2 * hkv)

    def reason(self, node):
        attrs = node.attributes
        if _input(node, 3) is not None or _input(node, 4) is not None:
            return "past_key/past_value (decoding form) are not normalized"
        if attrs.get_int("do_rotary", 0):
            return "do_rotary=1 is not normalized"
        if attrs.get_int("local_window_size", -1) != -1:
            return "local_window_size (sliding window) is not normalized"
        if attrs.get_int("smooth_softmax", 0) or _input(node, 11) is not None:
            return "smooth softmax / head_sink is not normalized"
        if attrs.get_int("qk_output", 0) or (len(node.outputs) > 3 and _used(node.outputs[3])):
            return "qk output is used"
        if any(_input(node, i) is not None for i in (7, 8, 9)):
            return "rotary inputs are not normalized"
        q, k, v = (_input(node, i) for i in range(3))
        hq, hkv = attrs.get_int("num_heads", 0), attrs.get_int("kv_num_heads", 0)
        if _rank(q) != 3:
            return f"query of rank {_rank(q)} is not normalized"
        if k is None:
            if self._packed_head_dim(node) is None:
                return "packed QKV of unknown width"
            why = next((r for r in (_head_reason(None, n, w, rank=3) for n, w in
                                    ((hq, "query"), (hkv, "key"), (hkv, "value"))) if r), None)
        else:
            why = next((r for r in (_head_reason(q, hq, "query"), _head_reason(k, hkv, "key"),
                                    _head_reason(v, hkv, "value")) if r), None)
        if why is None and any(_used(o) for o in node.outputs[1:3]):
            # Without past, present key/value are the new K/V, if the cache is not longer.
            tot, s = self.fuser.consts.scalar(_input(node, 6)), _int_dim(q, 1)
            if tot is None or s is None or int(tot) != s:
                why = "present_key/present_value are used and total_sequence_length is not the input length"
        return why

    def normalize(self, b, node):
        attrs = node.attributes
        q, k, v, seqlens, ab = (_input(node, i) for i in (0, 1, 2, 5, 10))
        hq, hkv = attrs.get_int("num_heads", 0), attrs.get_int("kv_num_heads", 0)
        if k is None:
            d = self._packed_head_dim(node)
            q, k, v = b.op("Split", [q, b.ints([hq * d, hkv * d, hkv * d])], num_outputs=3, axis=2)
            qs = _shape(node.inputs[0])
            for t, n in zip((q, k, v), (hq, hkv, hkv)):
                t.type, t.shape = node.inputs[0].type, ir.Shape([qs[0], qs[1], n * d])
        q4 = _head_inputs(b, q, hq, "query")
        k4, v4 = _head_inputs(b, k, hkv, "key"), _head_inputs(b, v, hkv, "value")
        s = _int_dim(q, 1)
        present = []
        for o, t in zip(node.outputs[1:3], (k4, v4)):
            if _used(o):
                t.type, t.shape = o.type or t.type, o.shape or t.shape
            present.append(t)
        terms = []
        lens = self.fuser.consts.value(seqlens)
        if lens is None or s is None or not np.all(lens == s - 1):
            # keys past seqlens_k[b] are padding: keep[b, j] = j <= seqlens_k[b]
            t = b.op("Squeeze", [b.seq_len(k4), b.ints([0])])
            pos = b.op("Range", [b.ints(0), t, b.ints(1)])
            ends = b.op("Unsqueeze", [b.op("Cast", [seqlens], to=ir.DataType.INT64), b.ints([1, 2, 3])])
            terms.append(_Term("keep", b.op("LessOrEqual", [pos, ends])))
        if ab is not None:
            terms.append(_Term("add", ab))
        scale = attrs.get_float("scale", 0.0) or None
        y = self.emit(node, b, q4, k4, v4, terms, True, scale, attrs.get_float("softcap", 0.0), True)
        return [y, *present]


RULES = (OnnxAttentionRule, MultiHeadAttentionRule, PackedAttentionRule, GroupQueryAttentionRule)


def fused_op_rules(fuser: "_Fuser", *, standalone: bool = False) -> RewriteRuleSet:
    """The rule set the fuser offers each node to, bound to its constants, masks and site records;
    ``standalone``: for onnxscript's own driver, the rules remove the node they replace."""
    return RewriteRuleSet([cls.rule(fuser, remove_nodes=standalone) for cls in RULES])
