"""The one dense oracle the sparse tests compare with: exact attention over the kept pairs.

Shared by test_sparse, test_sparse_linear, test_triton and test_dilated, so every file reads its
arguments the same way (causality and softcap by keyword only)."""

from typing import Optional

import torch

from compiler.ir.ops import attention_reference


def combine(keep: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
    """The pattern's keep mask [B, H, Sq, Sk] and the user's mask as one mask for the oracle."""
    if mask is None:
        return keep
    if mask.dtype == torch.bool:
        return keep & mask
    return mask.expand(keep.shape).masked_fill(~keep, float("-inf"))


def oracle(q, k, v, keep: torch.Tensor, mask: Optional[torch.Tensor], scale: float, *, causal: bool = False,
           softcap: float = 0.0) -> torch.Tensor:
    """Exact attention over the pairs ``keep`` (broadcast to [B, H, Sq, Sk]) and ``mask`` allow,
    under ``causal`` only keys j <= i (top-left aligned); a row with no pair left gives zeros."""
    sq, sk = q.shape[2], k.shape[2]
    keep = keep.expand(q.shape[0], q.shape[1], sq, sk)
    if causal:
        keep = keep & torch.ones(sq, sk, dtype=torch.bool).tril()
    return attention_reference(q, k, v, combine(keep, mask), scale, False, softcap)
