"""The pass manager: ordered passes over an ExportedProgram, each checked, timed and recorded.

A pass is a name and a function ``(PassContext) -> PassResult`` (``passes.infra``). The manager,
modelled on torch.fx's ``PassManager`` and onnx-ir's pass contracts, owns what every pass shares:
the program lints before the first pass and after each one, the output specs follow the graph
(a pass may replace the node an output reads), each pass is timed on its own, and an exception
inside a pass is re-raised as a ``PassError`` naming it (a user's ``AttnforgeError`` passes
through as it is). Policy decisions stay out of the passes: the context carries them in.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from torch.export import ExportedProgram
from torch.export.graph_signature import TensorArgument

from compiler.ir.errors import AttnforgeError
from compiler.ir.graph import count_nodes
from compiler.variants.policy import Policy
from compiler.ir.program import clone_program, sync_output_specs
from compiler.report.data import PassRecord
from compiler.variants.language import Variant
from passes.attention_discovery import Discovery
from passes.attention_fusion import FusionResult
from passes.attention_variants import VariantResult
from passes.infra import PassConditionError, PassError, PassResult

LEFT_OUT = "with it the program failed end-to-end verification"


@dataclass
class PassContext:
    ep: ExportedProgram
    policy: Policy
    exclude: set[str] = field(default_factory=set)  # site ids kept dense (rolled back by verification)
    discovery: Optional[Discovery] = None
    fusion: Optional[FusionResult] = None
    before_fusion: Optional[ExportedProgram] = None  # snapshot for per-site verification
    subgraphs: dict[str, dict] = field(default_factory=dict)  # site id -> its matched subgraph (compiler.driver.explain)
    variants: dict[str, Variant] = field(default_factory=dict)  # site id -> the variant chosen for it
    variant_result: Optional[VariantResult] = None
    skip_passes: set[str] = field(default_factory=set)  # left out: their program failed verification
    verification: dict = field(default_factory=dict)  # what the exact rewrite was checked on
    exact_outputs: Any = None  # the exact program's outputs on the example (its end-to-end check), if run

    @property
    def program(self) -> ExportedProgram:  # the name PassManager uses for fx and ONNX contexts alike
        return self.ep

    @program.setter
    def program(self, ep: ExportedProgram) -> None:
        self.ep = ep


# ----------------------------------------------------------------------------- typed details


@dataclass
class DiscoveryDetails:
    rejected_softmax: int  # softmaxes left alone (their reasons are in the report's ``rejected``)


@dataclass
class FusionDetails:
    skipped: dict[str, str]  # site id -> why it was not rewritten


@dataclass
class VariantDetails:
    variants: dict[str, str]  # site id -> the variant applied, as text


@dataclass
class LeftOut:
    left_out: str


# ----------------------------------------------------------------------------- conditions


def lint_graph(ep: ExportedProgram) -> None:
    """fx's own well-formedness check: every use defined before it, one output, known targets."""
    ep.graph.lint()


def output_specs_in_sync(ep: ExportedProgram) -> None:
    """The signature names exactly the values the graph returns."""
    out = next(n for n in reversed(ep.graph.nodes) if n.op == "output")
    specs = ep.graph_signature.output_specs
    if len(specs) != len(out.args[0]):
        raise AssertionError(f"the graph returns {len(out.args[0])} values but the signature names {len(specs)}")
    for spec, node in zip(specs, out.args[0]):
        if isinstance(spec.arg, TensorArgument) and getattr(node, "name", None) != spec.arg.name:
            raise AssertionError(f"output spec {spec.arg.name!r} does not name the returned value {node}")


CONDITIONS: tuple[tuple[str, Callable[[ExportedProgram], None]], ...] = (
    ("graph lint", lint_graph),
    ("output specs in sync", output_specs_in_sync),
)


@dataclass(frozen=True)
class ProgramKind:
    """What the manager needs of a program type: its size in nodes, what follows every pass,
    and the conditions it keeps. ``FX`` here; ``compiler.driver.onnx_program.ONNX`` for ONNX models."""

    size: Callable[[Any], int]
    after_pass: Callable[[Any], None]
    conditions: tuple[tuple[str, Callable[[Any], None]], ...]


# Outputs follow the graph: a pass may have replaced the node an output reads.
FX = ProgramKind(lambda ep: count_nodes(ep.graph_module), sync_output_specs, CONDITIONS)


@dataclass
class Pass:
    name: str
    run: Callable[[Any], PassResult]  # (PassContext or another context with a ``program``) -> PassResult


class PassManager:
    """Runs passes over ``ctx.program`` (an ExportedProgram, or an ONNX model with ``kind=ONNX``)."""

    def __init__(self, passes: list[Pass], conditions=None, kind: ProgramKind = FX):
        self.passes = passes
        self.kind = kind
        self.conditions = kind.conditions if conditions is None else conditions

    def _check(self, ep, after: str) -> None:
        for condition, check in self.conditions:
            try:
                check(ep)
            except Exception as e:  # noqa: BLE001 - any failure of a condition is that condition broken
                raise PassConditionError(after, condition, e) from e

    def run(self, ctx) -> list[PassRecord]:
        self._check(ctx.program, "<input>")
        records = []
        for p in self.passes:
            nodes = self.kind.size(ctx.program)
            if p.name in ctx.skip_passes:
                records.append(PassRecord(name=p.name, seconds=0.0, nodes_before=nodes, nodes_after=nodes,
                                          details={"left_out": LEFT_OUT}))
                continue
            t0 = time.perf_counter()
            try:
                result = p.run(ctx)
            except AttnforgeError:
                raise  # the user's mistake, already one line that says what to do
            except Exception as e:
                raise PassError(p.name, e) from e
            if not isinstance(result, PassResult):
                raise PassError(p.name, TypeError(f"returned {type(result).__name__}, not a PassResult"))
            seconds = time.perf_counter() - t0
            if result.program is not None:
                ctx.program = result.program
            self.kind.after_pass(ctx.program)
            self._check(ctx.program, p.name)
            records.append(PassRecord(name=p.name, seconds=round(seconds, 6), nodes_before=nodes,
                                      nodes_after=self.kind.size(ctx.program),
                                      sites_found=result.sites_found, sites_rewritten=result.sites_rewritten,
                                      details=result.record_details()))
        return records


# ----------------------------------------------------------------------------- pipelines


def selected_sites(ctx: PassContext) -> set[str]:
    """The sites the policy rewrites: every one found that it does not leave dense, less those excluded."""
    ctx.policy.check_selectors([m.site for m in ctx.discovery.matches])
    return {m.site.id for m in ctx.discovery.matches
            if m.site.id not in ctx.exclude and ctx.policy.variant_for(m.site).kind != "dense"}


def exact_pipeline() -> PassManager:
    """Clean up, canonicalize, find attention, fuse every site the policy rewrites into exact attention."""
    # Looked up when the pipeline is built, so a test can replace a pass function in its module.
    from compiler.driver.explain import subgraph
    from passes.attention_discovery import discover
    from passes.attention_fusion import fuse_attention
    from passes.canonicalize import canonicalize
    from passes.constant_folding import constant_folding
    from passes.cse import common_subexpression_elimination
    from passes.dce import dead_code_elimination
    from passes.layout import layout_cleanup

    def canonical(ctx: PassContext) -> PassResult:
        ep, stats = canonicalize(ctx.ep)
        changed = ep is not ctx.ep or any(stats.values())
        return PassResult(changed=changed, counts=stats, program=ep if ep is not ctx.ep else None)

    def discovery(ctx: PassContext) -> PassResult:
        ctx.discovery = discover(ctx.ep)
        ctx.before_fusion = clone_program(ctx.ep)
        ctx.subgraphs = {m.site.id: subgraph([*m.internal, m.anchor, m.output]) for m in ctx.discovery.matches}
        return PassResult(changed=False, sites_found=len(ctx.discovery.matches),
                          details=DiscoveryDetails(rejected_softmax=len(ctx.discovery.rejected)))

    def fusion(ctx: PassContext) -> PassResult:
        ctx.fusion = fuse_attention(ctx.ep.graph_module, ctx.discovery.matches, selected_sites(ctx))
        return PassResult(changed=bool(ctx.fusion.rewritten), sites_found=len(ctx.discovery.matches),
                          sites_rewritten=len(ctx.fusion.rewritten), details=FusionDetails(skipped=ctx.fusion.skipped))

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

    def variants(ctx: PassContext) -> PassResult:
        sites = {m.site.id: m.site for m in ctx.discovery.matches}
        ctx.variant_result = apply_variants(ctx.ep.graph_module, sites, ctx.variants)
        applied = dict(ctx.variant_result.applied)
        return PassResult(changed=bool(applied), sites_found=len(ctx.variants), sites_rewritten=len(applied),
                          details=VariantDetails(variants=applied))

    return PassManager([
        Pass("attention_variants", variants),
        Pass("dead_code_elimination", lambda c: dead_code_elimination(c.ep)),
    ])
