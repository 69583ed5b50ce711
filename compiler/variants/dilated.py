"""Dilated (strided) windows, LongNet-style: query ``i`` reads keys ``i - left <= j <= i + right``
with ``(i - j) % dilation == 0``, plus the first ``sinks`` keys. Stacking layers with dilations
1, 2, 4, ... covers a long context at a window's cost per layer (Ding et al., 2023, LongNet).

    dilated:256,dilation=2            every other key of the last 256 (causal)
    dilated:left=512,dilation=4,sinks=4

The whole pattern lives here: its parameters, parse check and block layout (which the PyTorch
reference and the Triton tables run); any site can take it. Its ONNX block mask
is ``backends.onnx_sparse.BLOCK_MASKS[Dilated]``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from compiler.variants.block_layout import _window_blocks
from compiler.ir.errors import PolicyError
from compiler.variants.registry import PatternSpec, register
from compiler.variants.language import resolve_right


@dataclass(frozen=True)
class Dilated:
    left: int = 256
    right: Optional[int] = None  # None: 0 for a causal site, ``left`` otherwise
    dilation: int = 2
    sinks: int = 0
    block: int = 64


def dilated_keep(left: int, right: int, dilation: int, sinks: int):
    """The pair predicate on absolute positions (torch tensors; ``%`` is a floor modulo, so keys to the
    right, where ``i - j < 0``, keep the same stride)."""

    def keep(i, j):
        d = i - j
        return ((d <= left) & (d >= -right) & (d % dilation == 0)) | (j < sinks)

    return keep


def _block_mask(p: Dilated, sq: int, sk: int, causal: bool):
    right = resolve_right(p, causal)
    # The window's block band holds every kept pair; pair_keep drops the skipped keys inside it
    # (a band block can hold none when dilation > block: it is read for nothing, never wrong).
    return _window_blocks(p.left, right, p.sinks, sq, sk, p.block, causal), dilated_keep(p.left, right, p.dilation,
                                                                                          p.sinks)


def _validate(p: Dilated, text: str) -> None:
    if p.dilation < 1:
        raise PolicyError(f"{text!r}: dilation must be positive (1 is a plain window)")


# No auto candidates: the block executors read the window's whole band, so a dilated window costs
# what the plain window of the same span costs and keeps less; auto would never prefer it.
register(PatternSpec("dilated", Dilated, "left", validate=_validate, block_mask=_block_mask))
