"""ExportedProgram -> ONNX, with our ops translated by ``backends.onnx_*``.

``torch.onnx.export(..., dynamo=True)`` does the rest of the graph; a custom translation
table maps each attnforge op to its lowering. Dynamic batch and sequence sizes of the program
stay dynamic in the file. What each site was lowered to is returned for the report.
"""

from __future__ import annotations

import io
import logging
import warnings
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import onnx
import torch
from torch.export import ExportedProgram

from backends.onnx_attention import FusedLoweringOptions, attention_translation
from backends.onnx_cache import CACHE_ATTENTION_STEP, cache_step_translation
from backends.onnx_linear import linear_translation
from backends.onnx_sparse import sparse_translation
from compiler.ir.errors import AttnforgeError, BackendError, first_line
from compiler.reference.linear_ops import LINEAR_ATTENTION
from compiler.ir.ops import ATTENTION_OPS
from compiler.ir.site import SITE_META
from compiler.reference.sparse_ops import SPARSE_ATTENTION

OPSET = 23  # the first opset with the standard Attention op; ORT 1.31 loads up to 26

OUR_OPS = (ATTENTION_OPS[0], SPARSE_ATTENTION, LINEAR_ATTENTION, CACHE_ATTENTION_STEP)


def translations(options: FusedLoweringOptions, chosen: list) -> dict:
    """The custom translation table of one export; ``chosen`` receives each exact site's lowering."""
    return {
        ATTENTION_OPS[0]: attention_translation(options, chosen),
        SPARSE_ATTENTION: sparse_translation,
        LINEAR_ATTENTION: linear_translation,
        CACHE_ATTENTION_STEP: cache_step_translation,
    }


class ExportError(BackendError):
    """The exporter failed; ``op`` names the op it failed on, when it says (the planner runs it on torch)."""

    def __init__(self, message: str, op: Optional[str] = None):
        super().__init__(message)
        self.op = op


@dataclass
class OnnxExport:
    model: onnx.ModelProto
    lowerings: dict = field(default_factory=dict)  # site id (or node name) -> what it became
    seconds: float = 0.0
    opset: int = 23


def save_onnx(model: onnx.ModelProto, path) -> Path:
    """Write atomically: a failed write leaves no partial file behind."""
    path = Path(path)
    tmp = path.with_name(path.name + ".partial")
    try:
        onnx.save_model(model, tmp)
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def _site_nodes(ep: ExportedProgram) -> list[tuple[str, object]]:
    return [(n.meta.get(SITE_META, n.name), n.target) for n in ep.graph.nodes
            if n.op == "call_function" and n.target in OUR_OPS]


def carry_site_ids(src: torch.fx.Graph, dst: torch.fx.Graph) -> None:
    """Re-tracing and decomposing drop node metadata; give our ops in ``dst`` the site ids of
    those in ``src`` (they come out in the same order), so the report can say how each site was
    lowered."""
    ours = [n for n in src.nodes if n.op == "call_function" and n.target in OUR_OPS]
    again = [n for n in dst.nodes if n.op == "call_function" and n.target in OUR_OPS]
    for old, new in zip(ours, again):
        if SITE_META in old.meta:
            new.meta[SITE_META] = old.meta[SITE_META]


def _our_error(e: BaseException) -> Optional[AttnforgeError]:
    seen = set()
    while e is not None and id(e) not in seen:
        if isinstance(e, AttnforgeError):
            return e
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return None


def _failing_op(text: str) -> str:
    marker = "target="
    if marker in text:
        return text.split(marker, 1)[1].split("]")[0].split(")")[0]
    return ""


def _drop_unused_contrib_outputs(graph: onnx.GraphProto) -> None:
    """Trim the optional outputs (caches, scores) of com.microsoft nodes nobody reads, and the
    types the exporter guessed for their outputs: ORT types them from its own inference and
    rejects the guesses. A GroupQueryAttention given a past keeps its present cache, read or not:
    without it ORT's kernel attends to wrong keys (onnxruntime 1.32)."""
    used = {name for n in graph.node for name in n.input} | {o.name for o in graph.output}
    contrib = set()
    for n in graph.node:
        if n.domain != "com.microsoft":
            continue
        outs = list(n.output)
        keep = 3 if n.op_type == "GroupQueryAttention" and len(n.input) > 3 and n.input[3] else 1
        while len(outs) > keep and outs[-1] not in used:
            outs.pop()
        del n.output[:]
        n.output.extend(outs)
        contrib.update(outs[1:])
    keep_info = [vi for vi in graph.value_info if vi.name not in contrib]
    del graph.value_info[:]
    graph.value_info.extend(keep_info)


def output_names(ep: ExportedProgram) -> Optional[list]:
    """The model's own names for its outputs (``logits``, ``last_hidden_state``), where its output
    structure has them, so the ONNX file is read by name as the model is; else the exporter's."""
    from torch.utils import _pytree as pytree

    spec = ep.call_spec.out_spec
    if spec is None:
        return None
    try:
        dummy = pytree.tree_unflatten(list(range(spec.num_leaves)), spec)
        paths = [path for path, _ in pytree.tree_flatten_with_path(dummy)[0]]
    except Exception:  # noqa: BLE001 - an output class that cannot be rebuilt from placeholders
        return None
    names = []
    for path in paths:
        keys = [getattr(k, "key", getattr(k, "name", None)) for k in path]
        if not all(isinstance(k, str) for k in keys):
            return None  # a position in a tuple is no name; leave the exporter's
        names.append(".".join(keys) if keys else "output")
    inputs = {s.arg.name for s in ep.graph_signature.input_specs if hasattr(s.arg, "name")}
    user_outputs = [s for s in ep.graph_signature.output_specs if s.kind.name == "USER_OUTPUT"]
    if len(names) != len(user_outputs) or len(set(names)) != len(names) or inputs & set(names):
        return None
    return names


def optimize(model) -> None:
    """The exporter's ``optimize=True`` (onnxscript's ``optimize_ir``, then its ONNX fusions)
    without the one rule whose cost is quadratic in the graph's size, in place.

    That rule (two Slices of one tensor -> one Split) has two output nodes, and onnxscript
    matches such a pattern by listing every node of the graph for each node it starts from. On
    a 4-layer Llama-shaped model with a window lowering the exporter's optimizer took 3.5-4.3 s
    at 8k tokens (3,048 nodes) and 21-25 s at 32k (8,592 nodes); this takes 1.3 s and 4-5 s and
    gives the same graph. onnxruntime runs two Slices as it runs a Split. Everything else runs
    as the exporter runs it, fusions (RMSNormalization, RotaryEmbedding) included."""
    import onnx_ir as ir
    from onnx_ir.passes import common
    from onnxscript import optimizer, rewriter
    from onnxscript.rewriter import onnx_fusions

    try:
        from onnxscript.rewriter.rules.common import slice_split_rule

        rules = rewriter._DEFAULT_REWRITE_RULES  # the list optimize_ir applies (no public name)
    except (ImportError, AttributeError):  # another onnxscript: its own optimizer, whatever it costs
        optimizer.optimize_ir(model)
        onnx_fusions.fuse(model)
        return
    rewrite = rewriter.RewritePass([r for r in rules if r is not slice_split_rule])
    cleanup = ir.passes.Sequential(common.RemoveUnusedNodesPass(), common.RemoveUnusedFunctionsPass(),
                                   common.RemoveUnusedOpsetsPass())
    common.InlinePass()(model)
    for _ in range(2):  # as optimize_ir: a second round takes what the first one's folds uncovered
        folded = optimizer.fold_constants_ir(model, onnx_shape_inference=True).modified
        rewritten = rewrite(model).modified
        cleanup(model)
        if not (folded or rewritten):
            break
    ir.passes.Sequential(
        common.RemoveUnusedNodesPass(),
        common.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0),
        common.LiftSubgraphInitializersToMainGraphPass(), common.DeduplicateInitializersPass(),
        common.CommonSubexpressionEliminationPass(), common.OutputFixPass(), common.NameFixPass(),
    )(model)
    onnx_fusions.fuse(model)


def export_onnx(ep: ExportedProgram, provider: str = "CPUExecutionProvider",
                fused_lowering: Optional[str] = None) -> OnnxExport:
    """The program as an ONNX model that passes the full checker.

    ``fused_lowering`` forces one lowering of exact attention where the site supports it
    (benchmarks and tests compare them); by default the provider's table chooses.
    """
    import time

    t0 = time.perf_counter()
    choices: list = []
    table = translations(FusedLoweringOptions(provider, fused_lowering), choices)
    sink = io.StringIO()
    try:
        # The exporter narrates each step on stdout and warns about optional packages.
        with warnings.catch_warnings(), redirect_stdout(sink), redirect_stderr(sink):
            warnings.simplefilter("ignore")
            logging.getLogger("torch.onnx").setLevel(logging.ERROR)
            program = torch.onnx.export(ep, (), dynamo=True, opset_version=OPSET, custom_translation_table=table,
                                        optimize=False, verbose=False, output_names=output_names(ep))
            optimize(program.model)
            model = program.model_proto  # serializing warns of the contrib outputs' types, dropped below
    except Exception as e:  # the exporter wraps everything; name what failed, not where
        ours = _our_error(e)
        if ours is not None:
            raise BackendError(f"cannot export to ONNX: {ours}") from None
        failing = _failing_op(str(e))
        if failing and any(str(t) in failing for t in OUR_OPS):
            # Our own lowering failed: that is a bug to report, with the innermost cause.
            inner = e
            while inner.__cause__ is not None:
                inner = inner.__cause__
            raise ExportError(f"lowering {failing} to ONNX failed ({type(inner).__name__}: "
                              f"{str(inner).strip()[:300]}); please report it, and use backend='torch' meanwhile",
                              op=failing) from e
        what = f"op {failing} has no ONNX translation" if failing else first_line(e, 200, "?")
        raise ExportError(f"cannot export to ONNX: {what}; run it with backend='torch'", op=failing or None) from None
    _drop_unused_contrib_outputs(model.graph)
    try:
        onnx.checker.check_model(model, full_check=True)
    except onnx.checker.ValidationError as e:
        first = first_line(e, 200, "?")
        raise BackendError(f"the exported ONNX model does not pass onnx.checker ({first})") from None
    lowerings, fused = {}, iter(choices)
    for site, target in _site_nodes(ep):
        if target == SPARSE_ATTENTION:
            lowerings[site] = "block-gather"
        elif target == LINEAR_ATTENTION:
            lowerings[site] = "feature-map"
        elif target == CACHE_ATTENTION_STEP:
            lowerings[site] = "cache-scatter-attention"
        else:
            lowerings[site] = next(fused, "attention")
    return OnnxExport(model, lowerings, time.perf_counter() - t0, OPSET)
