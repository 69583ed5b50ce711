"""Give each fused attention site the variant its policy chose.

Runs after fusion: every ``attnforge::attention`` node that came from a site is replaced by
``attnforge::sparse_attention`` or ``attnforge::linear_attention`` with the same operands,
the pattern travelling as the op's ``spec`` text. Sites the policy keeps exact are untouched.
A variant that cannot apply to a site is a ``PolicyError`` naming the site.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import fx

from compiler.ir.builder import Builder
from compiler.ir.errors import PolicyError
from compiler.ir.graph import shape
from compiler.ir.site import SITE_META, AttentionSite
from compiler.reference.linear_ops import LINEAR_ATTENTION
from compiler.reference.sparse_ops import SPARSE_ATTENTION, head_groups
from compiler.variants.registry import spec_of
from compiler.variants.language import HeadMix, Variant
from passes.attention_fusion import ATTENTION



@dataclass
class VariantResult:
    applied: dict[str, str] = field(default_factory=dict)  # site id -> variant text
    nodes: dict[str, str] = field(default_factory=dict)  # site id -> node computing the site


def _sparse_patterns(p):
    return [v.pattern for _, v in p.groups if v.kind == "sparse"] if isinstance(p, HeadMix) else [p]


def check_variant(site: AttentionSite, variant: Variant, mask_shape=None) -> None:
    """Raise PolicyError, naming the site, when ``variant`` cannot express this site."""
    where = f"site {site.id} ({site.module})"
    if variant.kind == "sparse":
        if isinstance(variant.pattern, HeadMix):
            try:
                head_groups(variant.pattern, site.num_heads)
            except ValueError as e:
                raise PolicyError(f"{where}: {e}") from None
        for p in _sparse_patterns(variant.pattern):
            legal_on = spec_of(p).legal_on
            reason = legal_on(p, site) if legal_on is not None else None
            if reason:
                raise PolicyError(f"{where}: {reason}")
    elif variant.kind == "linear":
        if site.softcap > 0:
            raise PolicyError(f"{where}: linear attention cannot apply a logit softcap")
        if mask_shape is not None and len(mask_shape) >= 2 and mask_shape[-2] != 1:
            raise PolicyError(f"{where}: linear attention applies key masks only, and this site's mask varies "
                              f"per query (shape {list(mask_shape)}); use a sparse or fused variant")


def apply_variants(gm: fx.GraphModule, sites: dict[str, AttentionSite], variants: dict[str, Variant]) -> VariantResult:
    res = VariantResult()
    for node in list(gm.graph.nodes):
        sid = node.meta.get(SITE_META)
        if node.target is not ATTENTION or sid not in variants:
            continue
        variant = variants[sid]
        res.nodes[sid] = node.name
        if variant.exact:
            continue
        q, k, v, mask, scale, causal, softcap = node.args
        check_variant(sites[sid], variant, shape(mask) if isinstance(mask, fx.Node) else None)
        build = Builder(gm.graph, node)
        if variant.kind == "sparse":
            new = build(SPARSE_ATTENTION, q, k, v, mask, scale, causal, softcap, variant.text)
        else:
            new = build(LINEAR_ATTENTION, q, k, v, mask, scale, causal, variant.text)
        new.meta[SITE_META] = sid
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
        res.applied[sid] = variant.text
        res.nodes[sid] = new.name
    gm.graph.lint()
    gm.recompile()
    return res
