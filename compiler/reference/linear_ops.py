"""``attnforge::linear_attention``: kernelized attention ``phi(q) . phi(k)`` in place of
``exp(q . k * scale)``, linear in sequence length.

Feature maps (``compiler.variants.language.FEATURE_MAPS``):

* ``elu``: ``elu(x) + 1``; ``relu``: ``relu(x)`` (Katharopoulos et al.);
* ``favor``: Performer's positive orthogonal random features, an unbiased estimate of the
  softmax kernel ``exp(s)``; more features, smaller error;
* ``taylor``: the second-order Taylor expansion ``1 + s + s^2 / 2`` of ``exp(s)`` (Based), as
  features ``[1, x, vec(x x^T) / sqrt 2]``.

Inputs are scaled by ``sqrt(scale)`` before the map, so ``phi(q) . phi(k)`` tracks
``exp(scale * q . k)`` for the softmax-kernel maps.

Bidirectional sites use the ``phi(K)^T V`` summary; causal sites use chunked prefix sums
(exact quadratic form inside a chunk, a running state between chunks). The ``hybrid`` variant
computes an exact softmax window and linear attention for every key outside it, on one
normalizer (as the sparse + linear split of SLA), which needs a softmax-kernel map.

Masks: only key masks (broadcast over queries) are expressible; a key's weight is
``exp(bias)`` or its boolean keep value.
"""

from __future__ import annotations

import math
from functools import lru_cache, partial
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from compiler.variants.block_layout import static_layout
from compiler.ir.ops import causal_pairs
from compiler.variants.registry import extend, feature
from compiler.variants.language import Hybrid, Window, parse_variant

_EPS = 1e-12


@lru_cache(maxsize=32)
def orthogonal_features(num: int, dim: int, seed: int) -> Tensor:
    """Performer's projection [num, dim]: blocks of orthogonal rows with chi-distributed norms."""
    g = torch.Generator().manual_seed(seed)
    blocks = []
    for _ in range(-(-num // dim)):
        qmat, _ = torch.linalg.qr(torch.randn(dim, dim, generator=g, dtype=torch.float64))
        blocks.append(qmat.T)
    w = torch.cat(blocks)[:num]
    norms = torch.randn(num, dim, generator=g, dtype=torch.float64).norm(dim=1, keepdim=True)
    return (w * norms).float()


def feature_dim(p, head_dim: int) -> int:
    if p.map == "favor":
        return p.features
    if p.map == "taylor":
        return 1 + head_dim + head_dim * head_dim
    return head_dim


class Scratch:
    """Buffers a CPU slab loop reuses, by name: every slab has the same shapes.

    Why: a fresh [rows, features] buffer per op and slab is mapped anew by the C allocator and
    page-faulted on first touch, and those faults cost as much as the arithmetic around them (16k
    tokens, 8 heads, ``linear:elu``: copying v into a fresh ones-column buffer took 300 us a slab
    and zero-filling it 336 us; into a reused one the copy takes 70 us).
    ``take`` hands back the buffer of that name, shape and dtype, and says when it is new (a
    loop's last, shorter slab gets its own: two shapes a name at most)."""

    def __init__(self) -> None:
        self._bufs: dict = {}

    def take(self, name, shape, like: Tensor, dtype=None) -> tuple[Tensor, bool]:
        key = (name, tuple(shape), dtype or like.dtype)
        buf = self._bufs.get(key)
        if buf is not None:
            return buf, False
        buf = self._bufs[key] = like.new_empty(shape, dtype=key[2])
        return buf, True


def _take(scratch: Optional[Scratch], name, shape, like: Tensor, dtype=None) -> tuple[Tensor, bool]:
    if scratch is None:
        return like.new_empty(shape, dtype=dtype or like.dtype), True
    return scratch.take(name, shape, like, dtype)


def features(x: Tensor, p, scale: float, stabilize: str, scratch: Optional[Scratch] = None,
             name: str = "") -> tuple[Tensor, Tensor]:
    """(phi, log_offset): the true features are ``phi * exp(log_offset)``.

    Only ``favor`` has an offset: its exponentials are shifted by a per-row max for queries
    (``stabilize="row"``) or one max over all keys (``"all"``), which cancels in the ratio.
    """
    # Always a tensor of our own (a scratch buffer or a new one): the maps below work in place.
    c = math.sqrt(scale)
    buf = _take(scratch, name, x.shape, x, torch.float32)[0]
    zero = buf.new_zeros(())
    if p.map == "elu" and c > 0.0:
        # elu(c x) in one pass over x, by elu's own scales: c x where positive, and where not
        # (1/c) c (exp(c x) - 1) (a separate scaling pass was a quarter of the map's time).
        return torch.ops.aten.elu.out(x.float(), 1.0 / c, c, c, out=buf).add_(1.0), zero
    x = torch.mul(x.float(), c, out=buf)
    if p.map == "elu":
        return F.elu(x, inplace=True).add_(1.0), zero
    if p.map == "relu":
        return x.relu_(), zero
    if p.map == "taylor":
        second = (x.unsqueeze(-1) * x.unsqueeze(-2)).flatten(-2) / math.sqrt(2.0)
        return torch.cat([torch.ones_like(x[..., :1]), x, second], -1), zero
    w = orthogonal_features(p.features, x.shape[-1], p.seed).to(x.device)
    h = x @ w.T - (x * x).sum(-1, keepdim=True) / 2
    off = h.amax(-1, keepdim=True) if stabilize == "row" else h.amax((-2, -1), keepdim=True)
    return torch.exp(h - off) / math.sqrt(p.features), off


def key_weights(mask: Optional[Tensor], b: int, h: int, sk: int) -> Optional[Tensor]:
    """A key mask as per-key weights [B|1, H|1, Sk, 1]; full [.., Sq, Sk] masks are refused."""
    if mask is None:
        return None
    while mask.dim() < 4:
        mask = mask.unsqueeze(0)
    if mask.shape[-2] != 1:
        raise ValueError("linear attention can only apply a key mask (one row for every query), "
                         f"not a mask of shape {tuple(mask.shape)}")
    w = mask.to(torch.float32) if mask.dtype == torch.bool else torch.exp(mask.float().clamp(max=80.0))
    return w.squeeze(-2).unsqueeze(-1)


def _linear_terms(fq: Tensor, fk: Tensor, v: Tensor, causal: bool, chunk: int,
                  scratch: Optional[Scratch] = None) -> tuple[Tensor, Tensor]:
    """(numerator [B,H,Sq,Dv], denominator [B,H,Sq,1]) of sum_j phi(q_i).phi(k_j) v_j."""
    if not causal:
        kv = fk.transpose(-1, -2) @ v
        z = fk.sum(-2, keepdim=True)
        return fq @ kv, (fq * z).sum(-1, keepdim=True)
    num, den, _ = _causal_terms(fq, fk, v, chunk, scratch=scratch)
    return num, den


def _causal_terms(fq: Tensor, fk: Tensor, v: Tensor, chunk: int, carry: Optional[Tensor] = None,
                  want_carry: bool = False, scratch: Optional[Scratch] = None
                  ) -> tuple[Tensor, Tensor, Optional[Tensor]]:
    """The causal sums in chunks: exact inside a chunk, a running state between chunks.

    ``carry`` [B*H, F, Dv + 1]: ``phi(k)^T [v, 1]`` of keys before these rows, which every row
    reads (rows taken a slab at a time); with ``want_carry`` the same sums including these rows
    come back as the third value. With ``scratch`` the products live in its buffers: the
    numerator and denominator returned are views the next call overwrites."""
    sq, sk = fq.shape[2], fk.shape[2]
    s = max(sq, sk)
    chunk = min(chunk, s)
    n = -(-s // chunk)
    pad = n * chunk
    dv = v.shape[-1]

    def blocks(x, length):
        x = x if pad == length else F.pad(x, (0, 0, 0, pad - length))
        return x.reshape(-1, chunk, x.shape[-1])  # [B*H*n, C, F]: chunks of every (b, h) in a row

    # A ones column on v carries the normalizer through the same products (its sums are the
    # denominator), so num and den share every matmul and no per-chunk key sums are kept.
    # (Dv + 1 columns also keep the chunk states' stride off a power of two: with Dv columns
    # the cumulative sum over chunks ran 10x slower, its rows 16 KiB apart in the same cache sets.)
    v1, fresh = _take(scratch, ("v1", sk), (*v.shape[:2], pad, dv + 1), v)
    if fresh:  # padded keys: zero values, zero features; what a reused buffer already holds
        v1.zero_()
        v1[:, :, :sk, dv] = 1.0
    v1[:, :, :sk, :dv] = v
    cq, ck, cv = blocks(fq, sq), blocks(fk, sk), v1.view(-1, chunk, dv + 1)
    f = ck.shape[-1]
    m = cq.shape[0]
    intra = torch.bmm(cq, ck.transpose(-1, -2), out=_take(scratch, "intra", (m, chunk, chunk), cq)[0]).tril_()
    out = torch.bmm(intra, cv, out=_take(scratch, "out", (m, chunk, dv + 1), cq)[0])  # [B*H*n, C, Dv + 1]
    after = None
    if n > 1 or carry is not None or want_carry:
        # Chunk c reads the keys of chunks < c: the inclusive prefix of the chunk summaries, one
        # chunk behind. Shifting by one in the flat [B*H*n] order pairs every chunk with its
        # predecessor's prefix without a copy; each head's last prefix is read only by the next
        # head's first chunk, so it is replaced by what that chunk reads: the next head's carry.
        state = torch.bmm(ck.transpose(-1, -2), cv,
                          out=_take(scratch, "state", (m, f, dv + 1), cq)[0]).view(-1, n, f, dv + 1)
        if carry is not None:
            state[:, 0] += carry
        state.cumsum_(1)
        if want_carry:
            after = state[:, -1].clone()
        state[:, -1] = 0.0
        if carry is not None:
            state[:-1, -1] = carry[1:]
            out[0].addmm_(cq[0], carry[0])
        out[1:].baddbmm_(cq[1:], state.view(-1, f, dv + 1)[:-1])
    out = out.view(*fq.shape[:2], pad, dv + 1)[:, :, :sq]
    return out[..., :dv], out[..., dv:], after


def _expand_kv(x: Tensor, hq: int) -> Tensor:
    return x if x.shape[1] == hq else x.repeat_interleave(hq // x.shape[1], 1)


def _hybrid_window(p: Hybrid, causal: bool) -> Window:
    return Window(left=p.window, right=None, sinks=0, block=min(64, max(16, p.window)))


extend(Hybrid, exact_window=_hybrid_window)


SLAB_BYTES = 4 << 20  # most bytes of one [heads, rows, features] fp32 operand a CPU slab works on


def linear_attention_reference(q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor] = None, scale: float = 1.0,
                               is_causal: bool = False, spec: str = "", terms=None) -> Tensor:
    """``terms(fq, fk, v, causal, chunk) -> (num, den)`` computes the linear sums; the Triton
    backend passes its kernels, everything around them stays this one definition.

    On CPU the work is taken a slab of heads at a time, and a causal site's long rows a slab of
    rows at a time with the key sums carried between them (every term is per (batch, head) and
    a running sum over rows, so the math is the same). Why: each op of the whole [B, H, S, D]
    problem allocated a fresh buffer of tens of MiB, which the C allocator maps anew and returns
    at every call, and on CPU the page faults cost more than the arithmetic (16k tokens, 8 heads:
    124 ms whole, 68 ms in slabs; 63 ms whole under an allocator that keeps its pages). A slab's
    operands stay under ``SLAB_BYTES`` and are reused from the heap call after call."""
    if terms is not None or q.device.type != "cpu":
        return _linear_attention(q, k, v, mask, scale, is_causal, spec, terms or _linear_terms)
    p = parse_variant(spec).pattern
    b, hq, sq, d = q.shape
    sk = k.shape[2]
    group = hq // k.shape[1]
    row = 4 * max(feature_dim(p, d), d, v.shape[-1] + 1)
    heads = max(1, SLAB_BYTES // (row * max(sq, sk)))
    # A slab holds whole KV groups, or a divisor of one: its query heads share the KV heads it slices.
    heads = heads - heads % group if heads >= group else math.gcd(heads, group)
    rows = sq
    if heads == 1 and is_causal and sq == sk and p.map != "favor" and feature(p, "exact_window") is None:
        # favor's key features share one offset over all keys and the hybrid's window crosses
        # slabs: those keep whole rows.
        slabs = -(-sq * row // SLAB_BYTES)
        rows = -(-sq // slabs // p.chunk) * p.chunk
    if heads >= hq and b == 1 and rows >= sq:
        return _linear_attention(q, k, v, mask, scale, is_causal, spec, _linear_terms)
    if mask is not None:
        mask = mask.reshape(*[1] * (4 - mask.dim()), *mask.shape)
    out = q.new_empty(b, hq, sq, v.shape[-1], dtype=v.dtype)
    scratch = Scratch()
    for bi in range(b):
        for h0 in range(0, hq, heads):
            hs = slice(h0, min(hq, h0 + heads))
            ks = slice(h0 // group, (hs.stop - 1) // group + 1)
            ms = None if mask is None else mask[bi if mask.shape[0] > 1 else 0, hs if mask.shape[1] > 1 else slice(0, 1)]
            args = (q[bi:bi + 1, hs], k[bi:bi + 1, ks], v[bi:bi + 1, ks], None if ms is None else ms.unsqueeze(0))
            if rows < sq:
                _causal_rows(*args, scale, p, rows, out[bi:bi + 1, hs], scratch)
            else:
                _linear_attention(*args, scale, is_causal, spec, partial(_linear_terms, scratch=scratch),
                                  scratch, out[bi:bi + 1, hs])
    return out


def _causal_rows(q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor], scale: float, p, rows: int,
                 out: Tensor, scratch: Scratch) -> None:
    """Causal linear attention (a map with no offset, no window) into ``out``, ``rows`` at a time."""
    hq = q.shape[1]
    k, v = _expand_kv(k, hq), _expand_kv(v, hq)
    w = key_weights(mask, *q.shape[:2], k.shape[2])
    carry = None
    for r0 in range(0, q.shape[2], rows):
        r = slice(r0, r0 + rows)
        fq, _ = features(q[:, :, r], p, scale, "row", scratch, "q")
        fk, _ = features(k[:, :, r], p, scale, "all", scratch, "k")
        if w is not None:
            fk = fk * (w[:, :, r] if w.shape[2] > 1 else w)  # a mask broadcast over keys: as is
        num, den, carry = _causal_terms(fq, fk, v[:, :, r].float(), p.chunk, carry,
                                        want_carry=r0 + rows < q.shape[2], scratch=scratch)
        torch.div(num, den.clamp_min(_EPS), out=out[:, :, r])


def _linear_attention(q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor], scale: float, is_causal: bool,
                      spec: str, terms, scratch: Optional[Scratch] = None, into: Optional[Tensor] = None) -> Tensor:
    """The whole op on these heads and rows; into ``into`` when given (a slab of the output)."""
    p = parse_variant(spec).pattern
    b, hq, sq, _ = q.shape
    sk = k.shape[2]
    k, v = _expand_kv(k, hq), _expand_kv(v, hq)
    if mask is not None:
        mask = mask.reshape(*[1] * (4 - mask.dim()), *mask.shape)
    w = key_weights(mask, b, hq, sk)
    fq, oq = features(q, p, scale, "row", scratch, "q")
    fk, ok = features(k, p, scale, "all", scratch, "k")
    vf = v.float()
    fkw = fk if w is None else fk * w
    num, den = terms(fq, fkw, vf, is_causal, p.chunk)
    if feature(p, "exact_window") is None:
        if into is not None:
            return torch.div(num, den.clamp_min(_EPS), out=into)
        return (num / den.clamp_min(_EPS)).to(v.dtype)
    out = _hybrid(p, q, k, vf, fq, oq, fkw, ok, num, den, mask, scale, is_causal)
    return out.to(v.dtype) if into is None else into.copy_(out)


def _hybrid(p: Hybrid, q, k, vf, fq, oq, fkw, ok, lin_num, lin_den, mask, scale, causal) -> Tensor:
    """Exact softmax inside the window, the linear estimate outside it, one normalizer.

    Everything is divided by ``exp(m_i)``, the row max of the exact window scores, so the exact
    part is a stable softmax numerator and the linear part is rescaled by
    ``exp(offset_q + offset_k - m_i)``.
    """
    b, hq, sq, d = q.shape
    sk = k.shape[2]
    layout = static_layout(_hybrid_window(p, causal), sq, sk, causal)
    bs, nqb = layout.block, layout.num_q_blocks
    nk = layout.kv_blocks.shape[-1]
    idx = layout.kv_blocks.clamp(min=0)[0, 0].to(q.device)  # [nqb, K]
    nkb = -(-sk // bs)

    def gather(x):
        xp = F.pad(x, (0, 0, 0, nkb * bs - sk)).view(b, hq, nkb, bs, x.shape[-1])
        return xp[:, :, idx].reshape(b, hq, nqb, nk * bs, x.shape[-1])

    def rows(x):
        return F.pad(x, (0, 0, 0, nqb * bs - sq)).view(b, hq, nqb, bs, x.shape[-1])

    drop = layout.gathered_drop(causal).to(q.device)
    scores = rows(q.float() * scale) @ gather(k.float()).transpose(-1, -2)  # [B, H, nqb, bs, K*bs]
    if mask is not None and mask.dtype != torch.bool:
        scores = scores + gather(mask.float().expand(b, hq, 1, sk).transpose(-1, -2)).transpose(-1, -2)
    elif mask is not None:
        drop = drop | ~gather(mask.expand(b, hq, 1, sk).transpose(-1, -2).float()).transpose(-1, -2).bool()
    scores = scores.masked_fill(drop, float("-inf"))
    m = scores.amax(-1, keepdim=True).clamp_min(-1e30)  # rows with an empty window stay finite
    e = torch.exp(scores - m)
    vg = gather(vf)
    ex_num, ex_den = e @ vg, e.sum(-1, keepdim=True)
    # The linear terms of the window's own pairs, to take them out of the all-keys sums.
    kern = (rows(fq) @ gather(fkw).transpose(-1, -2)).masked_fill(drop, 0.0)
    band_num, band_den = kern @ vg, kern.sum(-1, keepdim=True)

    def flat(x):
        return x.reshape(b, hq, nqb * bs, x.shape[-1])[:, :, :sq]

    factor = torch.exp((oq + ok - flat(m)).clamp(max=80.0))
    num = flat(ex_num) + factor * (lin_num - flat(band_num))
    den = flat(ex_den) + factor * (lin_den - flat(band_den)).clamp_min(0.0)
    return num / den.clamp_min(_EPS)


@torch.library.custom_op("attnforge::linear_attention", mutates_args=())
def linear_attention(q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor] = None, scale: float = 1.0,
                     is_causal: bool = False, spec: str = "") -> Tensor:
    return linear_attention_reference(q, k, v, mask, scale, is_causal, spec)


@linear_attention.register_fake
def _linear_attention_fake(q, k, v, mask=None, scale=1.0, is_causal=False, spec=""):
    return q.new_empty((*q.shape[:-1], v.shape[-1]), dtype=v.dtype)


def linear_flops(spec: str, b: int, hq: int, sq: int, sk: int, d: int, dv: int, causal: bool) -> int:
    """Multiply-add FLOPs (2 per MAC) of the reference: feature maps, summaries, outputs."""
    p = parse_variant(spec).pattern
    f = feature_dim(p, d)
    fmap = 2 * (sq + sk) * f * d if p.map == "favor" else (sq + sk) * f
    if causal:
        c = min(p.chunk, max(sq, sk))
        core = 2 * sk * f * dv + 2 * sq * f * dv + 2 * sq * c * (f + dv)
    else:
        core = 2 * sk * f * (dv + 1) + 2 * sq * f * (dv + 1)
    total = fmap + core
    if feature(p, "exact_window") is not None:
        pairs = static_layout(_hybrid_window(p, causal), sq, sk, causal).computed_pairs()
        total += pairs * (2 * d + 2 * dv + 5 + 2 * f + 2 * dv)
    return int(b * hq * total)


def linear_density(spec: str, sq: int, sk: int, d: int, dv: int, causal: bool) -> float:
    """Linear FLOPs as a share of dense attention FLOPs for the same shape."""
    from compiler.ir.ops import attention_flops

    dense = attention_flops(1, 1, sq, sk, d, dv, causal_pairs(sq, sk) if causal else None)
    return linear_flops(spec, 1, 1, sq, sk, d, dv, causal) / dense


LINEAR_ATTENTION = torch.ops.attnforge.linear_attention.default
