"""The Triton kernels as PyTorch ops: ``attnforge_triton::attention``, ``::sparse_attention`` and
``::linear_attention``, drop-in replacements for the reference ops of ``compiler`` (same
arguments plus ``site``, the site id the report files the chosen kernel under).

They are ``torch.library.custom_op``s, so ``torch.export`` keeps each as one node and
``torch.compile`` compiles the graph around them without tracing into Triton. What each site
ran as (kernel, configuration, split count, where the configuration came from) goes to the
``KernelRecords`` of the program that ran it, named by the op's ``site`` argument
(``KernelRecords.site_arg``): a custom op takes only plain values, so the argument carries the
records' key, and results never pass through a shared table.
"""

from __future__ import annotations

import itertools
import weakref
from typing import Optional

import torch
from torch import Tensor

from backends.triton_attention import attention as fused_kernel
from backends.triton_attention import sparse_attention as sparse_kernel
from backends.triton_layout import sparse_tables
from backends.triton_schedule import SCHEDULER, make_key, sparse_candidates
from compiler.reference.linear_ops import linear_attention_reference
from compiler.reference.sparse_ops import _slice_heads, kv_head_map, sparse_attention_reference

MAX_HEAD_DIM = 256


class KernelRecords:
    """What each site of one program ran as, on its last call: site id -> entry."""

    _live: "weakref.WeakValueDictionary[str, KernelRecords]" = weakref.WeakValueDictionary()
    _ids = itertools.count()

    def __init__(self):
        self.key = f"records{next(self._ids)}"
        self.entries: dict[str, dict] = {}
        KernelRecords._live[self.key] = self

    def site_arg(self, site: str) -> str:
        """The ``site`` argument that files a call of our ops under ``site`` in these records."""
        return f"{self.key}/{site}"


def _record(site: str, **entry) -> None:
    key, _, site_id = site.partition("/")
    records = KernelRecords._live.get(key)
    if records is not None and site_id:
        records.entries[site_id] = entry


def _unsupported(q: Tensor, v: Tensor) -> Optional[str]:
    """Why the kernels cannot take these inputs, or None."""
    if max(q.shape[-1], v.shape[-1]) > MAX_HEAD_DIM:
        return f"head dim {max(q.shape[-1], v.shape[-1])} > {MAX_HEAD_DIM}"
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return f"dtype {q.dtype}"
    return None


def _block_unsupported(block: int) -> Optional[str]:
    if block < 16 or block & (block - 1):
        return f"block {block} is not a power of two >= 16"
    return None


@torch.library.custom_op("attnforge_triton::attention", mutates_args=())
def attention(q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor] = None, scale: float = 1.0,
              is_causal: bool = False, softcap: float = 0.0, site: str = "") -> Tensor:
    from compiler.ir.ops import attention_reference

    why = _unsupported(q, v)
    if why:
        _record(site, kernel="reference", reason=why)
        return attention_reference(q, k, v, mask, scale, is_causal, softcap)
    info: dict = {}
    out = fused_kernel(q, k, v, mask, scale, is_causal, softcap, record=info)
    _record(site, kernel="fused", **info)
    return out


@attention.register_fake
def _attention_fake(q, k, v, mask=None, scale=1.0, is_causal=False, softcap=0.0, site=""):
    return q.new_empty((*q.shape[:-1], v.shape[-1]), dtype=v.dtype)


def _sparse(q, k, v, mask, scale, is_causal, softcap, spec, info: dict) -> Tensor:
    entries = sparse_tables(spec, q, k, scale, is_causal)

    def run(qh, kh, vh, tables, mh):
        key = make_key("sparse", spec, qh, kh, vh, f"{'causal' if is_causal else 'full'}-block{tables.block}")
        choice = SCHEDULER.choose(key, sparse_candidates(tables.block),
                                  lambda c: sparse_kernel(qh, kh, vh, tables, mh, scale, is_causal, softcap, c))
        info.update(config=choice.config.text(), source=choice.source, block=tables.block)
        return sparse_kernel(qh, kh, vh, tables, mh, scale, is_causal, softcap, choice.config)

    if len(entries) == 1 and entries[0][0] is None:
        return run(q, k, v, entries[0][1], mask)
    # Head groups with different block sizes: one launch per group, each group's kv heads
    # gathered so that the kernel's head mapping holds inside the group.
    out = q.new_empty((*q.shape[:-1], v.shape[-1]), dtype=v.dtype)
    kv_map = kv_head_map(q.shape[1], k.shape[1], q.device)
    for heads, tables in entries:
        qh, kh, vh = q.index_select(1, heads), k.index_select(1, kv_map[heads]), v.index_select(1, kv_map[heads])
        mh = _slice_heads(mask, heads)
        o = fused_kernel(qh, kh, vh, mh, scale, is_causal, softcap) if tables is None else run(qh, kh, vh, tables, mh)
        out.index_copy_(1, heads, o)
    info["launches"] = len(entries)
    return out


def _blocks_of(spec: str) -> list:
    from compiler.variants.language import HeadMix, parse_variant

    pattern = parse_variant(spec).pattern
    if isinstance(pattern, HeadMix):
        return sorted({var.pattern.block for _, var in pattern.groups if var.kind == "sparse"})
    return [pattern.block]


@torch.library.custom_op("attnforge_triton::sparse_attention", mutates_args=())
def sparse_attention(q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor] = None, scale: float = 1.0,
                     is_causal: bool = False, softcap: float = 0.0, spec: str = "", site: str = "") -> Tensor:
    why = _unsupported(q, v) or next(filter(None, map(_block_unsupported, _blocks_of(spec))), None)
    if why:
        _record(site, kernel="reference", reason=why)
        return sparse_attention_reference(q, k, v, mask, scale, is_causal, softcap, spec)
    info: dict = {}
    out = _sparse(q, k, v, mask, scale, is_causal, softcap, spec, info)
    _record(site, kernel="block-sparse", pattern=spec, **info)
    return out


@sparse_attention.register_fake
def _sparse_attention_fake(q, k, v, mask=None, scale=1.0, is_causal=False, softcap=0.0, spec="", site=""):
    return q.new_empty((*q.shape[:-1], v.shape[-1]), dtype=v.dtype)


@torch.library.custom_op("attnforge_triton::linear_attention", mutates_args=())
def linear_attention(q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor] = None, scale: float = 1.0,
                     is_causal: bool = False, spec: str = "", site: str = "") -> Tensor:
    from backends.triton_linear import linear_attention as linear_kernel

    why = _unsupported(q, v)
    if why:
        _record(site, kernel="reference", reason=why)
        return linear_attention_reference(q, k, v, mask, scale, is_causal, spec)
    out = linear_kernel(q, k, v, mask, scale, is_causal, spec)
    _record(site, kernel="chunked-linear" if is_causal else "linear", pattern=spec)
    return out


@linear_attention.register_fake
def _linear_attention_fake(q, k, v, mask=None, scale=1.0, is_causal=False, spec="", site=""):
    return q.new_empty((*q.shape[:-1], v.shape[-1]), dtype=v.dtype)


SWAP = {
    torch.ops.attnforge.attention.default: torch.ops.attnforge_triton.attention.default,
    torch.ops.attnforge.sparse_attention.default: torch.ops.attnforge_triton.sparse_attention.default,
    torch.ops.attnforge.linear_attention.default: torch.ops.attnforge_triton.linear_attention.default,
}
"""Reference op -> Triton op."""
