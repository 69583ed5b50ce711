"""Fused attention ops (ai.onnx Attention, com.microsoft MultiHeadAttention / Attention /
GroupQueryAttention) normalized to one standard ``Attention`` node."""

from __future__ import annotations

from typing import Optional

import numpy as np
import onnx_ir as ir

from passes.onnx.builder import _Builder
from passes.onnx.common import _MS, _Reject, _input, _int_dim, _rank, _shape, _used
from passes.onnx.masks import _Term


class FusedOpNormalizers:
    """The ``_Fuser`` methods that rewrite an already-fused op; they share its builder and site records."""

    def _emit_fused(self, node: ir.Node, source: str, b: _Builder, q4, k4, v4, terms: list[_Term],
                    causal: bool, scale: Optional[float], softcap: float, out3: bool,
                    extra_outputs: list[tuple[ir.Value, ir.Value]] = (), extra_attrs=None):
        qs, ks = _shape(q4), _shape(k4)
        found, terms = self.masks.simplify(terms, qs[2] if qs else None, ks[2] if ks else None, True)
        causal = causal or found
        dtype = q4.dtype
        mask, kind = self.masks.assemble(b, terms, dtype, q4, k4, 4)
        if scale is None:
            scale = self._default_scale(q4)
        attn = self._attention(b, q4, k4, v4, mask, scale, causal, softcap, extra_attrs)
        y = attn.outputs[0]
        old = node.outputs[0]
        if out3:
            y = b.merge_heads(y)
        y.type, y.shape = old.type, old.shape
        self._finish(b, [(old, y), *extra_outputs], attn, source, q4, k4, causal, kind,
                     scale if scale is not None else float("nan"), softcap, [node])

    def _emit_contrib(self, node: ir.Node, source: str, b: _Builder, q4, k4, v4, terms: list[_Term], bias):
        """The tail MultiHeadAttention and Attention share: their bias, scale and ``unidirectional``."""
        attrs = node.attributes
        if bias is not None:
            terms.append(_Term("add", bias))
        scale = attrs.get_float("scale", 0.0) or None
        self._emit_fused(node, source, b, q4, k4, v4, terms, bool(attrs.get_int("unidirectional", 0)), scale, 0.0,
                         True)

    def onnx_attention(self, node: ir.Node):
        if any(_input(node, i) is not None for i in (4, 5)):
            raise _Reject("past_key/past_value (KV cache) are not normalized")
        if any(_input(node, i) is not None for i in range(6, len(node.inputs))):
            raise _Reject("nonpad_kv_seqlen is not normalized")
        if any(_used(o) for o in node.outputs[1:]):
            raise _Reject("present_key/present_value/qk_matmul_output are used")
        q, k, v, m = (_input(node, i) for i in range(4))
        attrs = node.attributes
        hq, hkv = attrs.get_int("q_num_heads", 0), attrs.get_int("kv_num_heads", 0)
        b = self._new_builder(node)
        out3 = _rank(q) == 3
        q4 = self._head_inputs(b, q, hq, "Q")
        k4 = self._head_inputs(b, k, hkv, "K")
        v4 = self._head_inputs(b, v, hkv, "V")
        rk, rv = self._unrepeat(k4), self._unrepeat(v4)
        if rk is not None and rv is not None and rk[1] == rv[1]:
            k4, v4 = rk[0], rv[0]  # the exporter's repeat_kv: the op does GQA natively
        terms = []
        if m is not None:
            terms.append(_Term("keep", m) if m.dtype == ir.DataType.BOOL else _Term("add", m))
        scale = attrs.get_float("scale", 0.0) if "scale" in attrs else None
        extra = {"softmax_precision": attrs.get_int("softmax_precision", 0)} \
            if attrs.get_int("softmax_precision", 0) else None
        self._emit_fused(node, "ai.onnx.Attention", b, q4, k4, v4, terms, bool(attrs.get_int("is_causal", 0)),
                         scale, attrs.get_float("softcap", 0.0), out3, extra_attrs=extra)

    def _padding_term(self, b: _Builder, mask: ir.Value, fill: float, dtype, batch, k4, q3,
                      what: str) -> _Term:
        """onnxruntime's key padding / mask_index (1 attends, 0 adds ``fill``) as a float term,
        so the numbers match the contrib op exactly."""
        r = _rank(mask)
        zero, neg = b.scalar_like(0.0, dtype), b.scalar_like(fill, dtype)
        if r == 1:
            n = _int_dim(mask, 0)
            if n is None or batch is None or n != batch:
                raise _Reject(f"{what} of shape {_shape(mask)} (start/end positions) is not normalized")
            # [B] lengths: keys at or past the length are masked
            t = b.op("Squeeze", [b.seq_len(k4), b.ints([0])])
            pos = b.op("Range", [b.ints(0), t, b.ints(1)])
            lens = b.op("Unsqueeze", [b.op("Cast", [mask], to=ir.DataType.INT64), b.ints([1])])
            keep = b.op("Less", [pos, lens])
            add = b.op("Where", [keep, zero, neg])
            return _Term("add", b.op("Unsqueeze", [add, b.ints([1, 2])]))
        if r in (2, 3):
            masked = b.op("Equal", [mask, b.const(np.zeros((), dtype=mask.dtype.numpy()))])
            add = b.op("Where", [masked, neg, zero])
            return _Term("add", b.op("Unsqueeze", [add, b.ints([1, 2] if r == 2 else [1])]))
        raise _Reject(f"{what} of rank {r} is not normalized")

    def ms_multihead(self, node: ir.Node):
        if any(_input(node, i) is not None for i in range(6, len(node.inputs))):
            raise _Reject("past key/value or cache inputs (decoding form) are not normalized")
        if any(_used(o) for o in node.outputs[1:]):
            raise _Reject("present key/value or qk outputs are used")
        q, k, v, bias, kpm, ab = (_input(node, i) for i in range(6))
        attrs = node.attributes
        heads = attrs.get_int("num_heads", 0)
        if k is None or v is None:
            raise _Reject("packed QKV query is not normalized")
        if _rank(q) != 3 or _rank(k) not in (3, 4) or _rank(v) not in (3, 4):
            raise _Reject(f"query/key/value ranks {_rank(q)}/{_rank(k)}/{_rank(v)} are not the 3-D separate form")
        b = self._new_builder(node)
        if bias is not None:
            if _rank(k) != 3:
                raise _Reject("bias with 4-D key is not normalized")
            sizes = [_int_dim(t, 2) for t in (q, k, v)]
            if None in sizes:
                raise _Reject("bias needs static hidden sizes")
            bq, bk, bv = b.op("Split", [bias, b.ints(sizes)], num_outputs=3, axis=0)
            q, k, v = b.op("Add", [q, bq]), b.op("Add", [k, bk]), b.op("Add", [v, bv])
            for new, old in ((q, node.inputs[0]), (k, node.inputs[1]), (v, node.inputs[2])):
                new.type, new.shape = old.type, old.shape
        q4 = self._head_inputs(b, q, heads, "query")
        k4 = self._head_inputs(b, k, heads, "key")
        v4 = self._head_inputs(b, v, heads, "value")
        fill = attrs.get_float("mask_filter_value", -10000.0)
        terms = []
        if kpm is not None:
            terms.append(self._padding_term(b, kpm, fill, q.dtype, _int_dim(q, 0), k4, q, "key_padding_mask"))
        self._emit_contrib(node, f"{_MS}.MultiHeadAttention", b, q4, k4, v4, terms, ab)

    def ms_attention(self, node: ir.Node):
        attrs = node.attributes
        if _input(node, 4) is not None or _input(node, 6) is not None:
            raise _Reject("past state (decoding form) is not normalized")
        if any(_used(o) for o in node.outputs[1:]):
            raise _Reject("present state output is used")
        if attrs.get_int("do_rotary", 0):
            raise _Reject("do_rotary=1 is not normalized")
        x, w, bias, mask, ab = (_input(node, i) for i in (0, 1, 2, 3, 5))
        heads = attrs.get_int("num_heads", 0)
        if _rank(x) != 3:
            raise _Reject(f"input of rank {_rank(x)} is not normalized")
        sizes = list(attrs.get_ints("qkv_hidden_sizes", []))
        if not sizes:
            total = _int_dim(w, 1)
            if total is None or total % 3:
                raise _Reject("weights width unknown; cannot split Q/K/V")
            sizes = [total // 3] * 3
        b = self._new_builder(node)
        # Packed projection as the contrib op computes it: x @ W + bias, then Q|K|V.
        qkv = b.op("MatMul", [x, w])
        if bias is not None:
            qkv = b.op("Add", [qkv, bias])
        q, k, v = b.op("Split", [qkv, b.ints(sizes)], num_outputs=3, axis=2)
        xs = _shape(x)
        for t, d in zip((q, k, v), sizes):
            t.type = x.type
            if xs is not None:
                t.shape = ir.Shape([xs[0], xs[1], d])
        q4 = self._head_inputs(b, q, heads, "Q")
        k4 = self._head_inputs(b, k, heads, "K")
        v4 = self._head_inputs(b, v, heads, "V")
        terms = []
        if mask is not None:
            if _rank(mask) == 4:
                raise _Reject("4-D (Megatron) mask_index is not normalized")
            terms.append(self._padding_term(b, mask, attrs.get_float("mask_filter_value", -10000.0),
                                            x.dtype, _int_dim(x, 0), k4, x, "mask_index"))
        self._emit_contrib(node, f"{_MS}.Attention", b, q4, k4, v4, terms, ab)

    def ms_gqa(self, node: ir.Node):
        attrs = node.attributes
        if _input(node, 3) is not None or _input(node, 4) is not None:
            raise _Reject("past_key/past_value (decoding form) are not normalized")
        if attrs.get_int("do_rotary", 0):
            raise _Reject("do_rotary=1 is not normalized")
        if attrs.get_int("local_window_size", -1) != -1:
            raise _Reject("local_window_size (sliding window) is not normalized")
        if attrs.get_int("smooth_softmax", 0) or _input(node, 11) is not None:
            raise _Reject("smooth softmax / head_sink is not normalized")
        if attrs.get_int("qk_output", 0) or (len(node.outputs) > 3 and _used(node.outputs[3])):
            raise _Reject("qk output is used")
        q, k, v, seqlens, total, ab = (_input(node, i) for i in (0, 1, 2, 5, 6, 10))
        if any(_input(node, i) is not None for i in (7, 8, 9)):
            raise _Reject("rotary inputs are not normalized")
        hq, hkv = attrs.get_int("num_heads", 0), attrs.get_int("kv_num_heads", 0)
        if _rank(q) != 3:
            raise _Reject(f"query of rank {_rank(q)} is not normalized")
        b = self._new_builder(node)
        if k is None:
            width = _int_dim(q, 2)
            if width is None or not hq or not hkv or width % (hq + 2 * hkv):
                raise _Reject("packed QKV of unknown width")
            d = width // (hq + 2 * hkv)
            q, k, v = b.op("Split", [q, b.ints([hq * d, hkv * d, hkv * d])], num_outputs=3, axis=2)
            qs = _shape(node.inputs[0])
            for t, n in zip((q, k, v), (hq, hkv, hkv)):
                t.type, t.shape = node.inputs[0].type, ir.Shape([qs[0], qs[1], n * d])
        q4 = self._head_inputs(b, q, hq, "query")
        k4 = self._head_inputs(b, k, hkv, "key")
        v4 = self._head_inputs(b, v, hkv, "value")
        s = _int_dim(q, 1)
        extra = []
        present = [o for o in node.outputs[1:3] if _used(o)]
        if present:
            # Without past, present key/value are the new K/V, if the cache is not longer.
            tot = self.consts.scalar(total)
            if tot is None or s is None or int(tot) != s:
                raise _Reject("present_key/present_value are used and total_sequence_length is not the input length")
            extra = [(o, t) for o, t in zip(node.outputs[1:3], (k4, v4)) if _used(o)]
            for o, t in extra:
                t.type, t.shape = o.type or t.type, o.shape or t.shape
        terms = []
        lens = self.consts.value(seqlens)
        if lens is None or s is None or not np.all(lens == s - 1):
            # keys past seqlens_k[b] are padding: keep[b, j] = j <= seqlens_k[b]
            t = b.op("Squeeze", [b.seq_len(k4), b.ints([0])])
            pos = b.op("Range", [b.ints(0), t, b.ints(1)])
            ends = b.op("Unsqueeze", [b.op("Cast", [seqlens], to=ir.DataType.INT64), b.ints([1, 2, 3])])
            terms.append(_Term("keep", b.op("LessOrEqual", [pos, ends])))
        if ab is not None:
            terms.append(_Term("add", ab))
        scale = attrs.get_float("scale", 0.0) or None
        self._emit_fused(node, f"{_MS}.GroupQueryAttention", b, q4, k4, v4, terms, True, scale,
                         attrs.get_float("softcap", 0.0), True, extra_outputs=extra)
