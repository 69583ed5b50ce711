"""ONNX lowerings of exact attention (``attnforge::attention``) and the table that picks one.

Three lowerings, each checked against the PyTorch reference in the tests:

* ``attention``: the standard ONNX ``Attention`` op (opset 23). It runs every feature we
  have: top-left causal, bool or additive masks, native GQA on 4-D inputs, softcap, and rows
  whose keys are all masked come out as zeros, as ours do (checked on ORT 1.31).
* ``gqa``: com.microsoft ``GroupQueryAttention`` in its prefill form; causal only, ``Sq == Sk``.
  A mask goes in as its ``attention_bias`` (a bool mask as 0 / -inf); rows left with no key come
  out NaN there and are zeroed. It takes packed ``[B, S, H*D]`` inputs, so it costs transposes.
* ``mha``: com.microsoft ``MultiHeadAttention``; no causality, mask, softcap or GQA (its fast
  CPU path is the unmasked one, and its masked rows are uniform rather than zero), fp32 only.
* ``chunked``: one op per block of query rows, each against the keys its rows can see (a causal
  prefix). ORT's CPU kernels of all three ops above hold the whole probability matrix
  ``[B, H, Sq, Sk]`` (8 GiB for 8 heads at 16k in fp32, 32 GiB at 32k); this one holds one
  block's, so long sequences fit. Causal blocks have equal areas (``chunk_bounds``). A plain
  causal sequence runs each block as GroupQueryAttention after a past of the keys before it;
  otherwise each block is the standard op with its slice of the mask. Needs a static query
  length (and ``Sq == Sk`` when causal).

Which one a site gets is decided by ``choose_fused`` from the site's features and the
execution provider's preference order, measured by ``tools/bench_onnx.py``; a site whose
probability matrix would exceed ``PROBS_BUDGET`` gets ``chunked`` first.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

from onnxscript import ir
from onnxscript import opset23 as op

from backends import ort_schemas
from backends.onnx_build import MS, additive, dim, ints, nan_to_zero, same_dim, scalar_int, static_dim

# Fastest first, per execution provider, measured with tools/bench_onnx.py (docs/benchmarks.md):
# on CPU at B=1, H=8, D=64, S=4096, GQA runs causal attention in 0.72x the time of the standard
# op (about 0.85x with a mask as attention_bias, timed by hand), MHA unmasked bidirectional
# attention in 0.93x; at S<=1024 all three are within 10%.
PREFERENCE = {
    "CPUExecutionProvider": ("gqa", "mha", "attention"),
}
DEFAULT_PREFERENCE = ("attention",)

# Bytes of probabilities one fused site may hold at once before it is lowered in query blocks
# (ORT's fused ops on CPU allocate all of [B, H, Sq, Sk]); also the size of one block's.
PROBS_BUDGET = 256 * 2**20
_ITEMSIZE = {"float32": 4, "float16": 2, "bfloat16": 2, "float64": 8}


@dataclass(frozen=True)
class FusedFeatures:
    causal: bool
    mask: str  # "none", "bool" or "float"
    softcap: bool
    grouped: bool  # Hkv < Hq
    square: bool  # Sq == Sk provably (same number or same symbol)
    dtype: str  # "float32", "float16", ...
    head_dim: Optional[int] = None  # None when dynamic
    probs_bytes: Optional[int] = None  # B*H*Sq*Sk*itemsize when static: what ORT's kernels allocate
    batch: Optional[int] = None  # None when dynamic

    def supported_by(self, lowering: str) -> bool:
        if lowering == "attention":
            return True
        if lowering == "chunked":
            return self.probs_bytes is not None and (self.square or not self.causal)
        if lowering == "gqa":
            # ORT's kernel also needs the head size to be a multiple of 8.
            return self.causal and self.square and self.dtype in ("float32", "float16") \
                and self.head_dim is not None and self.head_dim % 8 == 0
        if lowering == "mha":
            return not (self.causal or self.grouped or self.softcap) and self.mask == "none" \
                and self.dtype == "float32"
        raise KeyError(lowering)


def choose_fused(features: FusedFeatures, provider: str, allowed: Optional[tuple] = None) -> str:
    """The first lowering in the provider's preference order that supports the site; ``chunked``
    first where the whole probability matrix would not fit ``PROBS_BUDGET``."""
    big = features.probs_bytes is not None and features.probs_bytes > PROBS_BUDGET
    for lowering in (("chunked",) if big else ()) + PREFERENCE.get(provider, DEFAULT_PREFERENCE):
        if (allowed is None or lowering in allowed) and features.supported_by(lowering):
            return lowering
    return "attention"


_DTYPES = {ir.DataType.FLOAT: "float32", ir.DataType.FLOAT16: "float16", ir.DataType.BFLOAT16: "bfloat16",
           ir.DataType.DOUBLE: "float64"}


def features_of(q, k, mask, is_causal: bool, softcap: float) -> FusedFeatures:
    """Features of a site from the symbolic values the exporter hands a translation."""
    mask_kind = "none" if mask is None else ("bool" if mask.dtype == ir.DataType.BOOL else "float")
    hq, hkv = static_dim(q, 1), static_dim(k, 1)
    dtype = _DTYPES.get(q.dtype, str(q.dtype))
    sizes = (static_dim(q, 0), hq, static_dim(q, 2), static_dim(k, 2))
    probs = None if None in sizes else sizes[0] * sizes[1] * sizes[2] * sizes[3] * _ITEMSIZE.get(dtype, 4)
    return FusedFeatures(
        causal=bool(is_causal),
        mask=mask_kind,
        softcap=softcap > 0.0,
        grouped=hq is None or hkv is None or hq != hkv,
        square=same_dim(q, 2, k, 2),
        dtype=dtype,
        head_dim=static_dim(q, 3),
        probs_bytes=probs,
        batch=sizes[0],
    )


@dataclass(frozen=True)
class FusedLoweringOptions:
    """What one export builds exact attention for: the execution provider whose preference
    order picks each site's lowering, or one lowering forced where the site supports it
    (benchmarks and tests compare them)."""

    provider: str = "CPUExecutionProvider"
    forced: Optional[str] = None


def _packed(x):
    """[B, H, S, D] -> [B, S, H*D]."""
    return op.Reshape(op.Transpose(x, perm=[0, 2, 1, 3]), ints(0, 0, -1))


def _unpacked(x, heads: int):
    """[B, S, H*D] -> [B, H, S, D]."""
    return op.Transpose(op.Reshape(x, ints(0, 0, heads, -1)), perm=[0, 2, 1, 3])


def _key_mask(mask) -> bool:
    """A mask with one row for every query, ``[.., 1, Sk]``."""
    return mask is not None and len(mask.shape) >= 2 and static_dim(mask, len(mask.shape) - 2) == 1


def full_rows(mask, q):
    """ORT's Attention wants a mask row per query; a key mask [.., 1, Sk] is expanded to Sq rows."""
    if not _key_mask(mask):
        return mask
    lead = op.Shape(mask, end=-2)
    return op.Expand(mask, op.Concat(lead, dim(q, 2), op.Shape(mask, start=-1), axis=0))


def _typed_like(out, q):
    """Give a contrib op's output its type: onnx has no inference function for com.microsoft ops,
    and the full checker needs every value typed."""
    out.dtype = q.dtype
    if q.shape is not None:
        b, h, s, d = q.shape
        out.shape = ir.Shape([b, s, h * d if isinstance(h, int) and isinstance(d, int) else None])
    return out


def chunk_bounds(features: FusedFeatures, sq: int, sk: int) -> list[tuple[int, int]]:
    """Query-row blocks ``[a, b)``, each holding at most ``PROBS_BUDGET`` of probabilities.

    Without causality every block reads all ``sk`` keys, so the blocks are equal. A causal block
    reads the prefix ``[0, b)``, so its rows shrink as ``b`` grows: ``rows * b`` stays near the
    budget (equal-area blocks). Every block's probabilities then take about the same memory, and
    there are about half as many blocks (and nodes to export and run) as with fixed rows: 71 per
    site at 32k, not 128. Rows are multiples of 64, at least 64.
    """
    area = max(1, PROBS_BUDGET * sq * sk // features.probs_bytes)  # rows x keys one block may hold
    if not features.causal:
        rows = max(64, area // sk // 64 * 64)
        return [(a, min(a + rows, sq)) for a in range(0, sq, rows)]
    bounds, a = [], 0
    while a < sq:
        rows = int((math.sqrt(a * a + 4 * area) - a) / 2)  # rows * (a + rows) == area
        b = min(a + max(64, rows // 64 * 64), sq)
        bounds.append((a, b))
        a = b
    return bounds


def chunks_by_gqa(features: FusedFeatures) -> bool:
    """A causal site of one sequence goes block by block through com.microsoft GroupQueryAttention,
    the keys before the block passed as its past: the kernel applies the causal rule itself, so no
    causal mask tensor exists (ORT folds the standard op's per-block masks into constants: 2.1 GiB
    at 32k). ORT takes a chunk of several tokens after a past for one sequence only."""
    return features.causal and features.batch == 1 and features.supported_by("gqa")


def lower_chunked(q, k, v, mask, scale: float, is_causal: bool, softcap: float, features: FusedFeatures):
    """Exact attention one block of query rows at a time (see ``chunked`` above).

    A causal block [a, b) reads keys [0, b) only, so the blocks together compute the causal
    triangle plus half a block per row block, not the square. Where GroupQueryAttention cannot
    take the blocks, each is the standard op with the user's mask sliced and its own ``j <= i``
    computed at run time in absolute positions (a constant would store the triangle in the file).
    """
    sq, sk = static_dim(q, 2), static_dim(k, 2)
    bounds = chunk_bounds(features, sq, sk)
    if len(bounds) > 1 and chunks_by_gqa(features):
        return _chunked_gqa(q, k, v, mask, scale, softcap, bounds)
    outs = []
    for a, b in bounds:
        qc = op.Slice(q, ints(a), ints(b), ints(2))
        kc, vc, end = k, v, None
        if is_causal:
            kc, vc, end = op.Slice(k, ints(0), ints(b), ints(2)), op.Slice(v, ints(0), ints(b), ints(2)), b
        m = _mask_block(mask, qc, a, b, end)
        if is_causal:
            seen = op.LessOrEqual(op.Unsqueeze(op.Range(scalar_int(0), scalar_int(b), scalar_int(1)), ints(0)),
                                  op.Unsqueeze(op.Range(scalar_int(a), scalar_int(b), scalar_int(1)), ints(1)))
            m = seen if m is None else op.And(m, seen) if mask.dtype == ir.DataType.BOOL else \
                op.Add(m, additive(seen, q))
        outs.append(op.Attention(qc, kc, vc, m, scale=scale, is_causal=0, softcap=softcap)[0])
    return outs[0] if len(outs) == 1 else op.Concat(*outs, axis=2)


def _gqa(q, k, v, past_k, past_v, seq, heads: int, kv_heads: int, scale: float, softcap: float, bias=None):
    """com.microsoft GroupQueryAttention on packed ``[B, S, H*D]`` rows, every sequence full length:
    ``seq`` (int32 ``[1]``) keys in all, the last ``S`` of them this call's, the past
    (``[B, Hkv, seq - S, D]``, or none) first. Returns the output and the present keys and values
    (the past and this call's, ``[B, Hkv, seq, D]``)."""
    ort_schemas.register("GroupQueryAttention")
    seqlens = op.Expand(op.Sub(seq, op.Cast(ints(1), to=ir.DataType.INT32)), dim(q, 0))
    return MS.GroupQueryAttention(q, k, v, past_k, past_v, seqlens, op.Squeeze(seq), None, None, None, bias,
                                  num_heads=heads, kv_num_heads=kv_heads, scale=scale, softcap=softcap)[:3]


def _chunked_gqa(q, k, v, mask, scale: float, softcap: float, bounds: list):
    """Causal attention in query blocks through GroupQueryAttention: block [a, b) is a chunk of new
    tokens after a past of keys [0, a), the kernel's causal rule (key j <= past + row) being ours.
    Each block's present (keys [0, b)) is the next block's past, so no prefix is sliced out. A user
    mask goes in as each block's ``attention_bias``, rows [a, b) and keys [0, b) of it; rows it
    leaves with no key come out NaN there and are zeroed, as ours are."""
    hq, hkv = static_dim(q, 1), static_dim(k, 1)
    qp, kp, vp = _packed(q), _packed(k), _packed(v)
    key_mask = _key_mask(mask)
    outs, past_k, past_v = [], None, None
    for a, b in bounds:
        rows = (ints(a), ints(b), ints(1))
        bias = None if mask is None else \
            _bias(_mask_block(mask, None, a, b, b), mask, q, b - a if key_mask else None)
        out, past_k, past_v = _gqa(op.Slice(qp, *rows), op.Slice(kp, *rows), op.Slice(vp, *rows), past_k, past_v,
                                   op.Constant(value=ir.tensor([b], dtype=ir.DataType.INT32)), hq, hkv, scale, softcap,
                                   bias)
        outs.append(out)
    out = _unpacked(_typed_like(op.Concat(*outs, axis=1), q), hq)
    return out if mask is None else nan_to_zero(out)


def _bias(block, mask, like, rows: Optional[int] = None):
    """``block`` (a slice or expansion of the user's ``mask``, whose rank and type it may no longer
    know) as GroupQueryAttention's ``attention_bias``: 4-D, additive in ``like``'s type; a key
    mask broadcast to ``rows`` query rows when given."""
    rank = len(mask.shape)
    if rank < 4:
        block = op.Unsqueeze(block, ints(*range(4 - rank)))
    if rows is not None:
        block = op.Expand(block, ints(1, 1, rows, 1))
    return additive(block, like) if mask.dtype == ir.DataType.BOOL else op.CastLike(block, like)


def _mask_block(mask, qc, a: int, b: int, end: Optional[int]):
    """The user's mask at query rows [a, b) and keys [0, end); a key mask ``[.., 1, Sk]`` gets
    its rows (``full_rows``) unless the causal mask it is combined with brings them."""
    if mask is None:
        return None
    rank = len(mask.shape)
    key_mask = _key_mask(mask)
    if not key_mask:
        mask = op.Slice(mask, ints(a), ints(b), ints(rank - 2))
    if end is not None:
        return op.Slice(mask, ints(0), ints(end), ints(rank - 1))
    return full_rows(mask, qc) if key_mask else mask


def lower_attention(q, k, v, mask, scale: float, is_causal: bool, softcap: float, lowering: str,
                    features: Optional[FusedFeatures] = None):
    if lowering == "chunked":
        return lower_chunked(q, k, v, mask, scale, is_causal, softcap, features)
    if lowering == "attention":
        mask = full_rows(mask, q)
        return op.Attention(q, k, v, mask, scale=scale, is_causal=int(is_causal), softcap=softcap)[0]
    hq, hkv = static_dim(q, 1), static_dim(k, 1)
    if lowering == "gqa":
        bias = None if mask is None else _bias(full_rows(mask, q), mask, q)
        # The prefill form: no past, the keys are this call's.
        out = _gqa(_packed(q), _packed(k), _packed(v), None, None, op.Cast(dim(q, 2), to=ir.DataType.INT32),
                   hq, hkv, scale, softcap, bias)[0]
        out = _unpacked(_typed_like(out, q), hq)
        return nan_to_zero(out) if mask is not None else out
    if lowering == "mha":
        ort_schemas.register("MultiHeadAttention")
        out = MS.MultiHeadAttention(_packed(q), _packed(k), _packed(v), num_heads=hq, scale=scale)[0]
        return _unpacked(_typed_like(out, q), hq)
    raise KeyError(lowering)


def attention_translation(options: FusedLoweringOptions, chosen: list):
    """The translation of ``attnforge::attention`` for one export: each site gets the provider's
    fastest lowering that supports it, appended to ``chosen`` in graph order."""

    def attention_translation(q, k, v, mask=None, scale=1.0, is_causal=False, softcap=0.0):
        feats = features_of(q, k, mask, is_causal, softcap)
        forced = options.forced
        lowering = forced if forced is not None and feats.supported_by(forced) else \
            choose_fused(feats, options.provider)
        chosen.append(lowering)
        return lower_attention(q, k, v, mask, scale, is_causal, softcap, lowering, feats)

    return attention_translation
