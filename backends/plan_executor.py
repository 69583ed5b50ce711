"""Runs a plan: the program's graph module, reordered as planned, with each ONNX Runtime segment
fused into one submodule that an InferenceSession runs.

The top-level module is an FX graph module, so Python frees every value right after its last
use (FX's code generator drops each name there); torch segments are its own nodes, ORT
segments are ``OrtSegment`` calls, exported from the fused submodule with its own dynamic
dimensions.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch
from torch.fx import GraphModule, Node
from torch.fx.passes.utils.fuser_utils import fuse_by_partitions

from backends.capabilities import prepare, size_hint
from backends.onnx_export import ExportError, carry_site_ids, export_onnx
from backends.onnxruntime_backend import OrtOptions, OrtProgram, onnx_summary
from backends.protocol import LoweringSummary
from backends.planner import fitting_plan, make_plan
from backends.typed_lowering import GUARDS, is_tuple_read
from compiler.ir.errors import BackendError
from compiler.ir.plan import Plan

SEGMENT_PREFIX = "ort_segment_"


def reorder(gm: GraphModule, rank: dict) -> None:
    """Rebuild ``gm``'s graph with nodes sorted by ``rank`` (node name -> number); placeholders,
    attributes and the input guards first, the output last, ties in the old order."""
    old = list(gm.graph.nodes)
    position = {n.name: i for i, n in enumerate(old)}

    def key(n: Node):
        if n.op in ("placeholder", "get_attr") or (n.op == "call_module" and n.target == GUARDS):
            return (0, position[n.name], 0)
        if n.op == "output":
            return (3, 0, 0)
        return (1, rank.get(n.name, position[n.name]), position[n.name])

    new = torch.fx.Graph()
    new._codegen = gm.graph._codegen
    env: dict = {}
    for n in sorted(old, key=key):
        env[n] = new.node_copy(n, lambda a: env[a])
    gm.graph = new
    gm.recompile()


def _ranks(gm: GraphModule, plan: Plan) -> dict:
    """Plan position per node; a tuple read goes right after the node it reads."""
    rank = {s.name: float(i) for i, s in enumerate(plan.steps)}
    for n in gm.graph.nodes:
        if is_tuple_read(n) and n.args[0].name in rank:
            rank[n.name] = rank[n.args[0].name] + 0.5
    return rank


def _example(val):
    """A real tensor (or int) standing in for a traced value, to re-export a segment."""
    if isinstance(val, torch.SymInt):
        return size_hint(val)
    if not isinstance(val, torch.Tensor):
        return val
    shape = [size_hint(d) for d in val.shape]
    if val.dtype.is_floating_point or val.dtype.is_complex:
        return torch.randn(shape, dtype=val.dtype, generator=torch.Generator().manual_seed(0))
    return torch.zeros(shape, dtype=val.dtype)


def _dynamic_spec(val):
    if isinstance(val, torch.SymInt):
        return torch.export.Dim.AUTO
    if isinstance(val, torch.Tensor):
        return {i: torch.export.Dim.AUTO for i, d in enumerate(val.shape) if not isinstance(d, int)} or None
    return None


class OrtSegment(torch.nn.Module):
    """One fused segment exported on its own and run by an InferenceSession."""

    def __init__(self, sub: GraphModule, vals: list, options: OrtOptions):
        super().__init__()
        args = tuple(_example(v) for v in vals)
        specs = tuple(_dynamic_spec(v) for v in vals)
        try:
            ep = torch.export.export(sub, args, dynamic_shapes=specs if any(s is not None for s in specs) else None,
                                     strict=False)
        except Exception as e:  # noqa: BLE001 - re-tracing our own segment failing is a planner bug
            raise BackendError(f"cannot re-export an ONNX Runtime segment ({type(e).__name__}: "
                               f"{str(e).strip().splitlines()[0][:200]}); please report it") from None
        carry_site_ids(sub.graph, ep.graph)
        self.exported = export_onnx(ep, options.providers[0], options.fused_lowering)
        self.program = OrtProgram(ep, options, self.exported)

    def forward(self, *args):
        out = self.program(*args)
        return out if isinstance(out, tuple) else (out,)


class PlannedProgram:
    """Calls the rewritten program the way ``ep.module()`` is called, segment by segment."""

    def __init__(self, gm: GraphModule, plan: Plan, options: Optional[OrtOptions] = None):
        self.plan = plan
        self.options = options or OrtOptions()
        reorder(gm, _ranks(gm, plan))
        ort_segments = [s for s in plan.segments if s.backend == "onnxruntime"]
        if ort_segments:
            by_name = {n.name: n for n in gm.graph.nodes}
            partitions = []
            for seg in ort_segments:
                members = {by_name[name]: None for name in seg.steps}
                for n in list(members):
                    for user in n.users:
                        if is_tuple_read(user):
                            members[user] = None
                partitions.append(members)
            vals_by_name = {n.name: n.meta.get("val") for n in gm.graph.nodes}
            gm = fuse_by_partitions(gm, partitions, prefix=SEGMENT_PREFIX, always_return_tuple=True)
            for node in list(gm.graph.nodes):
                if node.op == "call_module" and str(node.target).startswith(SEGMENT_PREFIX):
                    sub = getattr(gm, node.target)
                    vals = [vals_by_name.get(a.name, a.meta.get("val")) for a in node.args]
                    setattr(gm, node.target, OrtSegment(sub, vals, self.options))
            # Fusing sorts the graph again; put the segments back where the plan runs them.
            reorder(gm, _segment_ranks(gm, plan))
        self.module = gm

    @property
    def segments(self) -> list:
        return [m for name, m in self.module.named_children() if name.startswith(SEGMENT_PREFIX)]

    @property
    def lowerings(self) -> dict:
        out: dict = {}
        for seg in self.segments:
            out.update(seg.exported.lowerings)
        return out

    def lowering_summary(self) -> Optional[LoweringSummary]:
        segs = self.segments
        return onnx_summary([s.exported for s in segs], self.options) if segs else None

    def __call__(self, *args, **kwargs):
        with torch.no_grad():
            return self.module(*args, **kwargs)

    def save(self, path) -> Path:
        segs = self.segments
        if len(segs) == 1 and len(self.plan.segments) == 1:
            return segs[0].program.save(path)
        torch_ops = sorted(self.plan.fallbacks)
        raise BackendError(f"this model runs as {len(self.plan.segments)} segments ({', '.join(torch_ops) or 'none'} "
                           "on torch), which one ONNX file cannot hold; save it as .pt2, or replace those ops")


def _segment_ranks(gm: GraphModule, plan: Plan) -> dict:
    """Ranks after fusing: a segment call at its first step's plan position, its tuple reads after
    it, torch nodes at their own."""
    rank = _ranks(gm, plan)
    # fuse_by_partitions names segments in the order of the partitions it was given: plan order.
    first = [rank[seg.steps[0]] for seg in plan.segments if seg.backend == "onnxruntime"]
    for node in gm.graph.nodes:
        if node.op == "call_module" and str(node.target).startswith(SEGMENT_PREFIX):
            rank[node.name] = first[int(str(node.target)[len(SEGMENT_PREFIX):])]
            for user in node.users:
                rank[user.name] = rank[node.name] + 0.5
    return rank


def load_onnxruntime(ep, options: Optional[dict] = None, plan: Optional[Plan] = None):
    """The ``onnxruntime`` backend. A program ORT runs whole is exported in one piece (its dynamic
    sizes kept as the program has them); otherwise the planned segments run in turn. An op whose
    lowering fails at export is planned again on torch, and the plan says why."""
    opts = options if isinstance(options, OrtOptions) else OrtOptions.from_dict(options)
    gm = prepare(ep, "onnxruntime").module()
    plan = fitting_plan(gm, "onnxruntime", plan)
    refused: dict = dict(plan.fallbacks)
    while True:
        try:
            if len(plan.segments) == 1 and plan.segments[0].backend == "onnxruntime":
                return OrtProgram(ep, opts, plan=plan)
            return PlannedProgram(gm, plan, opts)
        except ExportError as e:
            op = e.op
            if not op or op in refused:
                raise
            refused[op] = str(e)
            gm = prepare(ep, "onnxruntime").module()
            plan = make_plan(gm, "onnxruntime", refused)


class OrtBackend:
    name = "onnxruntime"
    options_type = OrtOptions
    checks_its_program = True

    def unavailable_reason(self) -> Optional[str]:
        return None  # onnxruntime is a dependency; a provider that is missing is an options error

    def parse_options(self, options: Optional[dict]) -> OrtOptions:
        return OrtOptions.from_dict(options)

    def load(self, ep, options: OrtOptions, plan: Optional[Plan] = None):
        return load_onnxruntime(ep, options, plan)


BACKEND = OrtBackend()
