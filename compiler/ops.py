"""The attention op vocabulary.

``attnforge::attention`` is exact softmax attention with everything the discovery pass can
recover from a hand-written graph kept as attributes instead of tensors:

* ``scale``: the factor applied to ``q @ k^T``;
* ``is_causal``: top-left aligned causal masking (query ``i`` sees keys ``j <= i``), as in
  ``scaled_dot_product_attention``; recovered from mask construction, never a dense mask;
* ``mask``: optional boolean keep-mask (True = attend) or additive float bias, broadcastable
  to ``[B, Hq, Sq, Sk]``;
* grouped-query attention natively: ``k``/``v`` carry ``Hkv`` heads, ``Hq % Hkv == 0`` and
  query head ``h`` reads kv head ``h // (Hq // Hkv)``; nothing is repeated;
* ``softcap``: when > 0, scores become ``softcap * tanh(scores / softcap)`` (Gemma 2).

Rows whose keys are all masked produce zeros, never NaN. Scores and softmax run in fp32 (fp64
for fp64 inputs): ``softmax_dtype``.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor


def softmax_dtype(dt: torch.dtype) -> torch.dtype:
    """The precision the op computes scores and softmax in for inputs of dtype ``dt``."""
    return torch.float64 if dt == torch.float64 else torch.float32


def _keep_mask_causal(sq: int, sk: int, device) -> Tensor:
    return torch.ones(sq, sk, dtype=torch.bool, device=device).tril()


def _grouped(x: Tensor, hkv: int) -> Tensor:
    """[B, Hq, ...] -> [B, Hkv, rep, ...] as a view, so GQA broadcasts instead of repeating."""
    b, hq = x.shape[0], x.shape[1]
    return x.reshape(b, hkv, hq // hkv, *x.shape[2:])


def _grouped_mask(mask: Tensor, hq: int, hkv: int) -> Tensor:
    """Broadcast a [.., Sq, Sk] mask against grouped scores [B, Hkv, rep, Sq, Sk]."""
    while mask.dim() < 4:
        mask = mask.unsqueeze(0)
    if mask.shape[1] == 1:
        return mask.unsqueeze(2)
    return mask.reshape(mask.shape[0], hkv, hq // hkv, *mask.shape[2:])


def attention_reference(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mask: Optional[Tensor] = None,
    scale: float = 1.0,
    is_causal: bool = False,
    softcap: float = 0.0,
) -> Tensor:
    """Plain PyTorch math for ``attnforge::attention``; the ``torch`` backend runs this.

    It follows the arithmetic of the eager attention it replaces (same matmul shapes when
    there is no GQA, ``torch.softmax`` itself) so that an exact rewrite stays within fp32
    rounding of the original.
    """
    b, hq, sq, _ = q.shape
    hkv, sk = k.shape[1], k.shape[2]
    grouped = hkv != hq
    if grouped:
        # Query heads sharing a kv head become one group, so k/v broadcast instead of repeating.
        scores = torch.matmul(_grouped(q, hkv), k.unsqueeze(2).transpose(-1, -2))  # [B, Hkv, rep, Sq, Sk]
    else:
        scores = torch.matmul(q, k.transpose(-1, -2))  # [B, H, Sq, Sk]
    # Softmax in fp32 (fp64 for fp64 inputs) whatever the input dtype, as the models we replace do.
    cdt = softmax_dtype(q.dtype)
    if scores.dtype != cdt:
        # fp16/bf16: the models we replace scale in their own precision (``q @ k^T * s``), then
        # upcast for the softmax; rounding where they round keeps us within their noise.
        scores = (scores * scale).to(cdt)
    else:
        scores = scores * scale
    if softcap > 0.0:
        scores = softcap * torch.tanh(scores / softcap)
    keep = None
    if mask is not None:
        m = _grouped_mask(mask, hq, hkv) if grouped else mask
        if m.dtype == torch.bool:
            keep = m
        else:
            scores = scores + m.to(cdt)
    if is_causal:
        causal = _keep_mask_causal(sq, sk, q.device)
        keep = causal if keep is None else keep & causal
    if keep is not None:
        scores = scores.masked_fill(~keep, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    if keep is not None or mask is not None:
        # A row whose keys are all masked is all -inf: zeros, not NaN.
        probs = probs.nan_to_num(0.0)
    if grouped:
        out = torch.matmul(probs.to(v.dtype), v.unsqueeze(2))  # [B, Hkv, rep, Sq, Dv]
        return out.reshape(b, hq, sq, v.shape[-1])
    return torch.matmul(probs.to(v.dtype), v)


@torch.library.custom_op("attnforge::attention", mutates_args=())
def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mask: Optional[Tensor] = None,
    scale: float = 1.0,
    is_causal: bool = False,
    softcap: float = 0.0,
) -> Tensor:
    return attention_reference(q, k, v, mask, scale, is_causal, softcap)


@attention.register_fake
def _attention_fake(q, k, v, mask=None, scale=1.0, is_causal=False, softcap=0.0):
    return q.new_empty((*q.shape[:-1], v.shape[-1]), dtype=v.dtype)


def attention_flops(b: int, hq: int, sq: int, sk: int, d: int, dv: int, kept_pairs: float | None = None) -> int:
    """Multiply-add FLOPs of QK^T and PV (2 per MAC) plus ~5 per score for softmax.

    ``kept_pairs`` is the number of (query, key) pairs per head the op must compute; dense
    attention computes all ``sq * sk``.
    """
    pairs = sq * sk if kept_pairs is None else kept_pairs
    return int(b * hq * pairs * (2 * d + 2 * dv + 5))


def causal_pairs(sq: int, sk: int) -> int:
    """Kept (i, j) pairs of a top-left aligned causal mask: sum over i of min(i + 1, sk)."""
    full = min(sq, sk)
    return full * (full + 1) // 2 + max(0, sq - sk) * sk


def default_scale(head_dim: int) -> float:
    return 1.0 / math.sqrt(head_dim)


ATTENTION_OPS = (torch.ops.attnforge.attention.default,)
