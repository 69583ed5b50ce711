"""Triton linear attention: the kernels behind ``attnforge::linear_attention`` on a GPU.

The feature maps, key weights and the hybrid's exact window stay the reference's own
(``compiler.reference.linear_ops``), so both paths share one definition of the variant; only the
``O(S * F * Dv)`` core, the sums ``sum_j phi(q_i) . phi(k_j) [v_j, 1]``, runs here, because it
is the part that dominates time and memory at long sequences and large F (``taylor``).

Causal sites use the chunked ("chunk") form of flash-linear-attention in two kernels:

* ``_chunk_states``: one program per (batch*head, F tile, Dv tile) walks the chunks in order
  and writes every chunk's exclusive prefix state ``sum_{c' < c} phi(K_c')^T V_c'`` and key
  sum ``z``. A sequential walk instead of a separate prefix pass: the running state never
  leaves registers, and F x Dv tiles give the parallelism (F is large exactly when it matters);
* ``_chunk_output``: one program per (batch*head, chunk, Dv tile) adds the exact quadratic
  part inside its chunk, ``tril(phiQ_c phiK_c^T) V_c``, to ``phiQ_c S_prev``.

Bidirectional sites run the same two kernels with a single state (every key) and no
quadratic part. F is always walked in tiles, so ``taylor``'s ``1 + D + D^2`` features never
sit in registers at once. The chunk tile is a power of two in [16, 64] near the variant's
``chunk``: the chunk size only orders the sums (the result is exact for any), and ``tl.dot``
needs power-of-two tiles of at least 16.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from compiler.reference.linear_ops import linear_attention_reference

_MAX_CHUNK = 64  # a [chunk, chunk] score tile and a [chunk, Dv tile] accumulator per program
_MAX_TILE = 64


@triton.jit
def _chunk_states(
    K, V, S, Z,
    stride_kb, stride_kn, stride_kf,
    stride_vb, stride_vn, stride_vd,
    stride_sb, stride_sc, stride_sf, stride_sd,
    stride_zb, stride_zc, stride_zf,
    SK, F, DV, N_ADD,
    PREFIX: tl.constexpr,  # store the exclusive prefix of every chunk, else only the total
    BLOCK_C: tl.constexpr,
    BLOCK_F: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    PRECISION: tl.constexpr,
):
    bh = tl.program_id(0).to(tl.int64)  # states of long, wide sequences pass 2^31 elements
    pf = tl.program_id(1)
    pv = tl.program_id(2)
    offs_c = tl.arange(0, BLOCK_C)
    offs_f = pf * BLOCK_F + tl.arange(0, BLOCK_F)
    offs_v = pv * BLOCK_DV + tl.arange(0, BLOCK_DV)
    f_ok = offs_f < F
    v_ok = offs_v < DV
    s_ptrs = S + bh * stride_sb + offs_f[:, None] * stride_sf + offs_v[None, :] * stride_sd
    z_ptrs = Z + bh * stride_zb + offs_f * stride_zf
    s_ok = f_ok[:, None] & v_ok[None, :]
    # Every Dv tile computes z; only the first writes it (a zero bound for the others: the
    # interpreter rejects a tensor & scalar mask).
    z_ok = offs_f < tl.where(pv == 0, F, 0)
    state = tl.zeros((BLOCK_F, BLOCK_DV), dtype=tl.float32)
    z = tl.zeros((BLOCK_F,), dtype=tl.float32)
    if PREFIX:
        tl.store(s_ptrs, state, mask=s_ok)
        tl.store(z_ptrs, z, mask=z_ok)
    for c in range(0, N_ADD):
        rows = c * BLOCK_C + offs_c
        r_ok = rows < SK
        k = tl.load(K + bh * stride_kb + rows[:, None] * stride_kn + offs_f[None, :] * stride_kf,
                    mask=r_ok[:, None] & f_ok[None, :], other=0.0)
        v = tl.load(V + bh * stride_vb + rows[:, None] * stride_vn + offs_v[None, :] * stride_vd,
                    mask=r_ok[:, None] & v_ok[None, :], other=0.0)
        state += tl.dot(tl.trans(k), v, input_precision=PRECISION)
        z += tl.sum(k, axis=0)
        if PREFIX:
            tl.store(s_ptrs + (c + 1) * stride_sc, state, mask=s_ok)
            tl.store(z_ptrs + (c + 1) * stride_zc, z, mask=z_ok)
    if not PREFIX:
        tl.store(s_ptrs, state, mask=s_ok)
        tl.store(z_ptrs, z, mask=z_ok)


@triton.jit
def _chunk_output(
    Q, K, V, S, Z, Num, Den,
    stride_qb, stride_qm, stride_qf,
    stride_kb, stride_kn, stride_kf,
    stride_vb, stride_vn, stride_vd,
    stride_sb, stride_sc, stride_sf, stride_sd,
    stride_zb, stride_zc, stride_zf,
    stride_nb, stride_nm, stride_nd,
    stride_db, stride_dm,
    SQ, SK, F, DV,
    CAUSAL: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_F: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    PRECISION: tl.constexpr,
):
    bh = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1)
    pv = tl.program_id(2)
    offs_c = tl.arange(0, BLOCK_C)
    offs_v = pv * BLOCK_DV + tl.arange(0, BLOCK_DV)
    rows = c * BLOCK_C + offs_c  # this chunk's queries and, causal, its keys
    q_ok = rows < SQ
    k_ok = rows < SK
    v_ok = offs_v < DV
    slot = c if CAUSAL else 0  # bidirectional: one state holds every key
    s_base = S + bh * stride_sb + slot * stride_sc
    z_base = Z + bh * stride_zb + slot * stride_zc
    acc = tl.zeros((BLOCK_C, BLOCK_DV), dtype=tl.float32)
    den = tl.zeros((BLOCK_C,), dtype=tl.float32)
    scores = tl.zeros((BLOCK_C, BLOCK_C), dtype=tl.float32)
    for f0 in range(0, F, BLOCK_F):
        offs_f = f0 + tl.arange(0, BLOCK_F)
        f_ok = offs_f < F
        fq = tl.load(Q + bh * stride_qb + rows[:, None] * stride_qm + offs_f[None, :] * stride_qf,
                     mask=q_ok[:, None] & f_ok[None, :], other=0.0)
        st = tl.load(s_base + offs_f[:, None] * stride_sf + offs_v[None, :] * stride_sd,
                     mask=f_ok[:, None] & v_ok[None, :], other=0.0)
        z = tl.load(z_base + offs_f * stride_zf, mask=f_ok, other=0.0)
        acc += tl.dot(fq, st, input_precision=PRECISION)
        den += tl.sum(fq * z[None, :], axis=1)
        if CAUSAL:
            fk = tl.load(K + bh * stride_kb + rows[:, None] * stride_kn + offs_f[None, :] * stride_kf,
                         mask=k_ok[:, None] & f_ok[None, :], other=0.0)
            scores += tl.dot(fq, tl.trans(fk), input_precision=PRECISION)
    if CAUSAL:
        # Chunks start at multiples of BLOCK_C for queries and keys alike (top-left alignment),
        # so the in-chunk causal bound is the tile's own lower triangle.
        scores = tl.where(offs_c[None, :] <= offs_c[:, None], scores, 0.0)
        v = tl.load(V + bh * stride_vb + rows[:, None] * stride_vn + offs_v[None, :] * stride_vd,
                    mask=k_ok[:, None] & v_ok[None, :], other=0.0)
        acc += tl.dot(scores, v, input_precision=PRECISION)
        den += tl.sum(scores, axis=1)
    tl.store(Num + bh * stride_nb + rows[:, None] * stride_nm + offs_v[None, :] * stride_nd, acc,
             mask=q_ok[:, None] & v_ok[None, :])
    tl.store(Den + bh * stride_db + rows * stride_dm, den, mask=rows < tl.where(pv == 0, SQ, 0))


def _tile(n: int, cap: int) -> int:
    return min(cap, max(16, triton.next_power_of_2(n)))


def _rows(x: Tensor) -> Tensor:
    """[B, H, S, X] as a contiguous [B*H, S, X] fp32 tensor."""
    return x.float().flatten(0, 1).contiguous()


def linear_terms(fq: Tensor, fk: Tensor, v: Tensor, causal: bool, chunk: int) -> tuple[Tensor, Tensor]:
    """(numerator [B,H,Sq,Dv], denominator [B,H,Sq,1]) of sum_j phi(q_i).phi(k_j) v_j, in fp32.

    The contract of ``compiler.reference.linear_ops._linear_terms``: features already key-weighted,
    causal means key j is seen by query i when j <= i (top-left, also for Sq != Sk).
    """
    b, h, sq, nf = fq.shape
    sk, dv = fk.shape[2], v.shape[-1]
    if sq == 0:  # no chunk to hold even the zero state the kernel writes first
        return fq.new_zeros((b, h, 0, dv)), fq.new_zeros((b, h, 0, 1))
    q3, k3, v3 = _rows(fq), _rows(fk), _rows(v)
    block_c, block_f, block_dv = _tile(chunk, _MAX_CHUNK), _tile(nf, _MAX_TILE), _tile(dv, _MAX_TILE)
    n_chunks = triton.cdiv(sq, block_c)
    # Causal: chunk c needs the keys of chunks < c; later keys reach no query (j <= i < Sq).
    slots, n_add = (n_chunks, n_chunks - 1) if causal else (1, triton.cdiv(sk, block_c))
    states = torch.empty((b * h, slots, nf, dv), dtype=torch.float32, device=fq.device)
    zs = torch.empty((b * h, slots, nf), dtype=torch.float32, device=fq.device)
    num = torch.empty((b * h, sq, dv), dtype=torch.float32, device=fq.device)
    den = torch.empty((b * h, sq), dtype=torch.float32, device=fq.device)
    # Two stages keep the causal output kernel near 48 KiB of shared memory (three need ~96).
    tiles = dict(BLOCK_C=block_c, BLOCK_F=block_f, BLOCK_DV=block_dv, PRECISION="ieee", num_stages=2)
    n_dv = triton.cdiv(dv, block_dv)
    _chunk_states[(b * h, triton.cdiv(nf, block_f), n_dv)](
        k3, v3, states, zs, *k3.stride(), *v3.stride(), *states.stride(), *zs.stride(),
        sk, nf, dv, n_add, PREFIX=bool(causal), **tiles,
    )
    _chunk_output[(b * h, n_chunks, n_dv)](
        q3, k3, v3, states, zs, num, den,
        *q3.stride(), *k3.stride(), *v3.stride(), *states.stride(), *zs.stride(), *num.stride(), *den.stride(),
        sq, sk, nf, dv, CAUSAL=bool(causal), **tiles,
    )
    return num.view(b, h, sq, dv), den.view(b, h, sq, 1)


def linear_attention(q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor] = None, scale: float = 1.0,
                     is_causal: bool = False, spec: str = "") -> Tensor:
    """``compiler.reference.linear_ops.linear_attention_reference`` with its linear terms on Triton."""
    return linear_attention_reference(q, k, v, mask, scale, is_causal, spec, terms=linear_terms)
