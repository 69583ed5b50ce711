"""What an attention site is: the description the discovery pass produces.

``AttentionSite`` is plain data for reports and policies. ``SiteMatch`` adds the graph nodes
a rewrite needs; it lives only while a pass pipeline runs.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Optional

from torch import fx

SITE_META = "attnforge_site"  # node.meta key: the site id an attnforge op node came from


def layer_of(module_path: str) -> Optional[int]:
    """The layer a site belongs to, for ``layers.N`` selectors: the first integer component of its
    module path (``encoder.layer.3.attention.self`` -> 3), the same rule on both front ends."""
    m = re.search(r"(?:^|\.)(\d+)(?:\.|$)", module_path)
    return int(m.group(1)) if m else None


@dataclass
class AttentionSite:
    id: str
    module: str  # module path from nn_module_stack, e.g. "layers.0.self_attn"
    module_type: str
    form: str  # "sdpa" or "matmul-softmax-matmul"
    batch: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    value_dim: int
    seq_q: int
    seq_k: int
    scale: Optional[float]  # None when the scale is a runtime tensor folded into q
    causal: bool
    mask_kind: str  # "none", "bool", "additive", "bool+additive"
    softcap: float = 0.0
    dtype: str = "float32"
    layer: Optional[int] = None  # first integer in the module path, for policies
    notes: list[str] = field(default_factory=list)


@dataclass
class Operand:
    """A tensor the fused op will read: an existing node, maybe re-laid-out."""

    node: fx.Node
    transpose_last: bool = False  # needs .transpose(-1, -2) to be [.., S, D]
    reshape_to: Optional[list] = None  # target [B, H, S, D] when the node has another batch layout


@dataclass
class SiteMatch:
    site: AttentionSite
    anchor: fx.Node  # softmax or sdpa node
    output: fx.Node  # the node whose uses the fused op takes over
    q: Operand
    k: Operand
    v: Operand
    scale: float
    scale_tensors: list  # [(node, "mul"|"div")] runtime scalars applied to q
    bias_terms: list  # [(node, coefficient)] additive terms, coefficient a float
    keep_masks: list  # bool nodes: True = attend
    batch_heads: tuple  # (B, Hq) the fused op runs with
    internal: list[fx.Node] = field(default_factory=list)  # nodes that die with the rewrite
    # The other conjuncts of a finite-fill mask whose causal part became ``is_causal``: rows they
    # mask whole stay uniform over all keys, as in the model (``MaskResolver.resolve_masks``).
    full_rows: list = field(default_factory=list)
    replaced_by: Optional[fx.Node] = None  # set by the fusion pass: what now stands for ``output``
