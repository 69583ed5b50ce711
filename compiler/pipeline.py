"""The pass manager: ordered passes over an ExportedProgram, each timed and counted."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Optional

from torch.export import ExportedProgram

from compiler.graph import count_nodes
from compiler.policy import Policy
from compiler.program import clone_program, sync_output_specs
from compiler.report import PassRecord


@dataclass
class PassContext:
    ep: ExportedProgram
    policy: Policy
    exclude: set[str] = field(default_factory=set)
    discovery: object = None  # passes.attention_discovery.Discovery
    fusion: object = None  # passes.attention_fusion.FusionResult
    before_fusion: Optional[ExportedProgram] = None  # snapshot for per-site verification
    subgraphs: dict = field(default_factory=dict)  # site id -> its matched subgraph (compiler.explain)
    variants: dict = field(default_factory=dict)  # site id -> compiler.variants.Variant
    variant_result: object = None  # passes.attention_variants.VariantResult
    skip_passes: set[str] = field(default_factory=set)  # left out: their program failed verification
    verification: dict = field(default_factory=dict)  # what the exact rewrite was checked on


@dataclass
class Pass:
    name: str
    run: Callable[[PassContext], dict]


class PassManager:
    def __init__(self, passes: list[Pass]):
        self.passes = passes

    def run(self, ctx: PassContext) -> list[PassRecord]:
        records = []
        for p in self.passes:
            if p.name in ctx.skip_passes:
                nodes = count_nodes(ctx.ep.graph_module)
                records.append(PassRecord(name=p.name, seconds=0.0, nodes_before=nodes, nodes_after=nodes,
                                          details={"left_out": "with it the program failed end-to-end verification"}))
                continue
            before = count_nodes(ctx.ep.graph_module)
            t0 = time.perf_counter()
            details = p.run(ctx) or {}
            sync_output_specs(ctx.ep)
            seconds = time.perf_counter() - t0
            records.append(
                PassRecord(
                    name=p.name,
                    seconds=round(seconds, 6),
                    nodes_before=before,
                    nodes_after=count_nodes(ctx.ep.graph_module),
                    sites_found=details.pop("sites_found", 0),
                    sites_rewritten=details.pop("sites_rewritten", 0),
                    details=details,
                )
            )
        return records


def exact_pipeline() -> PassManager:
    """Clean up, canonicalize, find attention, fuse every site the policy rewrites into exact attention."""
    from compiler.explain import subgraph
    from passes.attention_discovery import discover
    from passes.attention_fusion import fuse_attention
    from passes.canonicalize import canonicalize
    from passes.constant_folding import constant_folding
    from passes.cse import common_subexpression_elimination
    from passes.dce import dead_code_elimination
    from passes.layout import layout_cleanup

    def discovery(ctx: PassContext) -> dict:
        ctx.discovery = discover(ctx.ep)
        ctx.before_fusion = clone_program(ctx.ep)
        ctx.subgraphs = {m.site.id: subgraph([*m.internal, m.anchor, m.output]) for m in ctx.discovery.matches}
        return {"sites_found": len(ctx.discovery.matches), "rejected_softmax": len(ctx.discovery.rejected)}

    def canonical(ctx: PassContext) -> dict:
        ctx.ep, stats = canonicalize(ctx.ep)
        return stats

    def fusion(ctx: PassContext) -> dict:
        ctx.policy.check_selectors([m.site for m in ctx.discovery.matches])
        selected = {
            m.site.id
            for m in ctx.discovery.matches
            if m.site.id not in ctx.exclude and ctx.policy.variant_for(m.site).kind != "dense"
        }
        ctx.fusion = fuse_attention(ctx.ep.graph_module, ctx.discovery.matches, selected)
        return {"sites_found": len(ctx.discovery.matches), "sites_rewritten": len(ctx.fusion.rewritten),
                "skipped": ctx.fusion.skipped}

    return PassManager([
        Pass("dead_code_elimination", lambda c: dead_code_elimination(c.ep)),
        Pass("canonicalize", canonical),
        Pass("constant_folding", lambda c: constant_folding(c.ep)),
        Pass("common_subexpression_elimination", lambda c: common_subexpression_elimination(c.ep)),
        Pass("attention_discovery", discovery),
        Pass("attention_fusion", fusion),
        Pass("layout_cleanup", lambda c: layout_cleanup(c.ep)),
        Pass("dead_code_elimination", lambda c: dead_code_elimination(c.ep)),
    ])


def variant_pipeline() -> PassManager:
    """Turn fused sites into the sparse or linear variants chosen for them."""
    from passes.attention_variants import apply_variants
    from passes.dce import dead_code_elimination

    def variants(ctx: PassContext) -> dict:
        sites = {m.site.id: m.site for m in ctx.discovery.matches}
        ctx.variant_result = apply_variants(ctx.ep.graph_module, sites, ctx.variants)
        return {"sites_found": len(ctx.variants), "sites_rewritten": len(ctx.variant_result.applied),
                "variants": dict(ctx.variant_result.applied)}

    return PassManager([
        Pass("attention_variants", variants),
        Pass("dead_code_elimination", lambda c: dead_code_elimination(c.ep)),
    ])
