"""ONNX in, ONNX out: ``attnforge rewrite model.onnx -o out.onnx --policy ...``.

1. load and check the file (a one-line error for a corrupt file or an opset ORT cannot load);
2. ``passes.onnx_attention_fusion`` turns every attention subgraph, however the exporter
   wrote it, into one standard ``Attention`` node;
3. each site gets its variant from the policy, as on the torch path; exact sites stay
   ``Attention`` nodes, sparse and linear ones are replaced by the same lowering the torch path
   exports (``backends.onnx_sites``);
4. the original and the rewritten model run in onnxruntime on the same inputs: end-to-end
   fidelity, plus each approximate site measured against exact attention on its own inputs.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import onnx
import onnxruntime as ort
import torch
from google.protobuf.message import DecodeError

from backends.onnx_sites import SiteShape, lowered_graph, splice
from compiler.driver import verify
from compiler.driver.budget import Fidelity
from compiler.ir.errors import BackendError, InputError, PolicyError, first_line
from compiler.driver.measure import SiteInputs, exact_probabilities, site_effect
from compiler.driver.pipeline import Pass, PassManager, ProgramKind
from compiler.variants.policy import PolicySpec, parse_policy
from compiler.report.data import FidelityRecord, Report, SiteRecord
from compiler.driver.site_record import site_record
from compiler.ir.site import AttentionSite, layer_of
from compiler.variants.language import Variant
from passes.attention_variants import check_variant
from passes.infra import PassResult
from passes.onnx_attention_fusion import OnnxFusionResult, fuse_onnx_attention

MAX_OPSET = 26  # the newest ai.onnx opset onnxruntime 1.31 loads
_SITE_KEY = "attnforge.site"


# ONNX models under the same PassManager as fx programs: sized in nodes, checked by onnx's checker.
ONNX = ProgramKind(lambda m: len(m.graph.node), lambda m: None, (("onnx checker", onnx.checker.check_model),))


@dataclass
class OnnxPassContext:
    """What the ONNX passes share (``PassContext``'s counterpart): the model, then what each pass found."""

    program: onnx.ModelProto
    fusion: Optional[OnnxFusionResult] = None
    sites: list[AttentionSite] = field(default_factory=list)  # described by the driver between the pipelines
    nodes: list = field(default_factory=list)  # each site's Attention node in the fused model
    variants: dict[str, Variant] = field(default_factory=dict)
    inputs: dict[str, SiteInputs] = field(default_factory=dict)
    lowerings: dict[str, str] = field(default_factory=dict)  # site id -> how the variants pass lowered it
    skip_passes: set[str] = field(default_factory=set)


@dataclass
class OnnxFusionDetails:
    sources: list[str]  # the forms the sites were found in (softmax subgraph, fused ops)


def _fusion_pass(ctx: OnnxPassContext) -> PassResult:
    fused, ctx.fusion = fuse_onnx_attention(ctx.program)
    n = len(ctx.fusion.sites)
    return PassResult(changed=bool(n), program=fused, sites_found=n, sites_rewritten=n,
                      details=OnnxFusionDetails(sources=sorted({s.source for s in ctx.fusion.sites})))


def _variants_pass(ctx: OnnxPassContext) -> PassResult:
    """Each approximate site's Attention node replaced by the graph its variant lowers to."""
    fused = ctx.program
    out = onnx.ModelProto()
    out.CopyFrom(fused)
    for site, n in zip(ctx.sites, ctx.nodes):
        var, x = ctx.variants[site.id], ctx.inputs[site.id]
        if var.exact:
            ctx.lowerings[site.id] = "attention"
            continue
        shape = SiteShape(site.num_heads, site.num_kv_heads, site.head_dim, site.value_dim,
                          None if x.mask is None else tuple(x.mask.shape), x.mask is not None and
                          x.mask.dtype == torch.bool, _static_lengths(fused, n))
        lowered, ctx.lowerings[site.id] = lowered_graph(var, _mask_dims(shape, fused, n), x.scale, x.causal,
                                                        x.softcap)
        target = next(m for m in out.graph.node if _site_of(m) == site.id)
        splice(out, target, lowered, site.id)
    onnx.checker.check_model(out, full_check=True)
    rewritten = sum(not v.exact for v in ctx.variants.values())
    return PassResult(changed=bool(rewritten), program=out, sites_found=len(ctx.sites), sites_rewritten=rewritten)


@dataclass
class OnnxRewrite:
    model: onnx.ModelProto
    report: Report

    def save(self, path) -> Path:
        from backends.onnx_export import save_onnx

        return save_onnx(self.model, path)


def load_onnx(path) -> onnx.ModelProto:
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: no such file")
    try:
        model = onnx.load(path)
    except (FileNotFoundError, onnx.checker.ValidationError) as e:  # names external data that is not there
        import re

        where = re.search(r"should be stored in (\S+?),", str(e))
        missing = Path(where.group(1) if where else e.filename or "its external data file").name
        raise InputError(f"{path}: the model keeps its weights in {missing}, which is missing or unreadable; put "
                         "that file next to the model") from None
    except (DecodeError, RuntimeWarning, ValueError, OSError, UnicodeDecodeError) as e:
        raise InputError(f"{path}: not a readable ONNX model ({type(e).__name__}); is the file complete?") from None
    if not model.graph.node:
        raise InputError(f"{path}: the ONNX file holds no graph (truncated or not an ONNX model)")
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    if opset is not None and opset > MAX_OPSET:
        raise InputError(f"{path}: opset {opset} is newer than onnxruntime {ort.__version__} can load (up to "
                         f"{MAX_OPSET}); re-export with opset_version<={MAX_OPSET}")
    try:
        onnx.checker.check_model(model)
    except onnx.checker.ValidationError as e:
        first = first_line(e, 200, "?")
        raise InputError(f"{path}: not a valid ONNX model ({first})") from None
    except UnicodeDecodeError:  # a damaged string field (names, producer) the checker decodes
        raise InputError(f"{path}: not a valid ONNX model (a text field is not UTF-8); is the file intact?") from None
    return model


def _session(model: onnx.ModelProto, threads: int = 0) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.intra_op_num_threads = threads
    try:
        return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    except Exception as e:
        first = first_line(e, 300, "?")
        raise InputError(f"onnxruntime cannot load this model ({first})") from None


_NP = {onnx.TensorProto.FLOAT: np.float32, onnx.TensorProto.FLOAT16: np.float16, onnx.TensorProto.DOUBLE: np.float64,
       onnx.TensorProto.INT64: np.int64, onnx.TensorProto.INT32: np.int32, onnx.TensorProto.BOOL: np.bool_}


def example_feeds(model: onnx.ModelProto, shapes: Optional[dict] = None, seq: int = 16, batch: int = 2,
                  bool_value: bool = True) -> dict:
    """Inputs for every graph input: given shapes, else static sizes with dynamic ones set to
    ``batch`` (first axis) or ``seq``. Integer masks (names with "mask") get padding on the last
    row; bool inputs are all ``bool_value`` (whether True means keep or drop is the model's)."""
    shapes = dict(shapes or {})
    rng = np.random.default_rng(0)
    init = {i.name for i in model.graph.initializer}
    feeds = {}
    for inp in model.graph.input:
        if inp.name in init:
            continue
        tt = inp.type.tensor_type
        if tt.elem_type not in _NP:
            raise InputError(f"input {inp.name} has element type {tt.elem_type}, which attnforge cannot feed; "
                             "give example inputs")
        shape = shapes.get(inp.name) or [d.dim_value if d.HasField("dim_value") else (batch if i == 0 else seq)
                                          for i, d in enumerate(tt.shape.dim)]
        dtype = _NP[tt.elem_type]
        if "mask" in inp.name and dtype != np.bool_:
            x = np.ones(shape, dtype=dtype)
            if len(shape) >= 2 and shape[0] > 1 and shape[-1] > 2:
                x[-1, ..., -2:] = 0
        elif dtype == np.bool_:
            x = np.full(shape, bool_value, dtype=dtype)
        elif np.issubdtype(dtype, np.integer):
            x = rng.integers(0, 32, size=shape).astype(dtype)
        else:
            x = rng.standard_normal(shape).astype(dtype)
        feeds[inp.name] = x
    return feeds


def _run(sess: ort.InferenceSession, feeds: dict, names: Optional[list] = None) -> list:
    try:
        return sess.run(names, {i.name: feeds[i.name] for i in sess.get_inputs()})
    except Exception as e:
        first = first_line(e, 300, "?")
        raise InputError(f"onnxruntime could not run the model on the example inputs ({first}); give "
                         "--example-shape for its inputs") from None


def _typed(model: onnx.ModelProto) -> dict:
    inferred = onnx.shape_inference.infer_shapes(model)
    g = inferred.graph
    return {vi.name: vi for vi in (*g.value_info, *g.input, *g.output)}


def _site_inputs(model: onnx.ModelProto, nodes: list, feeds: dict) -> dict:
    """Each Attention node's operands on the example inputs, as torch tensors."""
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    typed = _typed(model)
    wanted = []
    for n in nodes:
        for name in n.input:
            if name and name not in wanted and name not in {o.name for o in probe.graph.output}:
                if name not in typed:
                    raise BackendError(f"cannot read the type of {name}, an input of {n.name}")
                probe.graph.output.append(typed[name])
                wanted.append(name)
    values = _run(_session(probe), feeds, wanted)
    return {name: torch.from_numpy(np.asarray(v)) for name, v in zip(wanted, values)}


def _attrs(node: onnx.NodeProto) -> dict:
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def rewrite_onnx(model: onnx.ModelProto, policy: PolicySpec = "fused", feeds: Optional[dict] = None,
                 budget: Optional[Fidelity] = None, model_name: str = "onnx") -> OnnxRewrite:
    t0 = time.perf_counter()
    pol = parse_policy(policy)
    if pol.auto:
        raise PolicyError("policy='auto' is for programs captured from PyTorch; give an explicit policy for an "
                          "ONNX file (e.g. the one auto chose for the torch model)")
    original = _session(model)
    if feeds is None:
        feeds = example_feeds(model)
        reference = _run(original, feeds)
        if not all(np.isfinite(x).all() for x in reference if np.issubdtype(np.asarray(x).dtype, np.floating)):
            # All-True bool inputs masked every key (a key_padding_mask means True = drop): flip them.
            feeds = example_feeds(model, bool_value=False)
            reference = _run(original, feeds)
    else:
        reference = _run(original, feeds)
    reference = [torch.from_numpy(np.asarray(x)) for x in reference]

    ctx = OnnxPassContext(model)
    passes = PassManager([Pass("onnx_attention_fusion", _fusion_pass)], kind=ONNX).run(ctx)
    fused, fusion = ctx.program, ctx.fusion
    if not fusion.sites:
        raise InputError("no attention found in this ONNX model; nothing to rewrite")
    by_id = {_site_of(n): n for n in fused.graph.node if _site_of(n)}
    nodes = [by_id[s.id] for s in fusion.sites]
    operands = _site_inputs(fused, nodes, feeds)

    sites, inputs = [], {}
    for i, (s, n) in enumerate(zip(fusion.sites, nodes)):
        q, k, v = (operands[x] for x in n.input[:3])
        mask = operands[n.input[3]] if len(n.input) > 3 and n.input[3] else None
        a = _attrs(n)
        scale = float(a.get("scale", q.shape[-1] ** -0.5))
        x = SiteInputs(q, k, v, mask, scale, bool(a.get("is_causal", 0)), float(a.get("softcap", 0.0)))
        inputs[s.id] = x
        sites.append(AttentionSite(
            id=s.id, module=s.module or s.node, module_type=s.source, form=s.source, batch=q.shape[0],
            num_heads=q.shape[1], num_kv_heads=k.shape[1], head_dim=q.shape[-1], value_dim=v.shape[-1],
            seq_q=q.shape[2], seq_k=k.shape[2], scale=scale, causal=x.causal,
            mask_kind="none" if mask is None else ("bool" if mask.dtype == torch.bool else "additive"),
            softcap=x.softcap, layer=layer_of(s.module),
        ))
    pol.check_selectors(sites)
    variants = {s.id: pol.variant_for(s) for s in sites}
    for site in sites:
        mask = inputs[site.id].mask
        check_variant(site, variants[site.id], None if mask is None else tuple(mask.shape))

    t1 = time.perf_counter()
    ctx.sites, ctx.nodes, ctx.variants, ctx.inputs = sites, nodes, variants, inputs
    passes += PassManager([Pass("onnx_attention_variants", _variants_pass)], kind=ONNX).run(ctx)
    out, lowerings = ctx.program, ctx.lowerings

    got = [torch.from_numpy(np.asarray(x)) for x in _run(_session(out), feeds)]
    cmp = verify.compare(reference, got)
    approx = any(not v.exact for v in variants.values())
    if approx:
        cmp["tolerance"] = None
        cmp["passed"] = budget.holds(cmp) if budget is not None else None
    elif budget is not None:
        cmp["passed"] = cmp["passed"] and budget.holds(cmp)
    report = Report(model=model_name, policy=pol.text, backend="onnxruntime", passes=passes,
                    rejected=[{"node": a, "module": "", "reason": b} for a, b in fusion.rejected],
                    fidelity=FidelityRecord(**cmp, checked_inputs=["example inputs (onnxruntime)"]),
                    budget=budget.to_dict() if budget is not None else None,
                    lowering={"format": "onnx", "opset": 23, "providers": ["CPUExecutionProvider"],
                              "export_seconds": round(time.perf_counter() - t1, 4), "max_abs_error_vs_torch": None})
    for site in sites:
        report.sites.append(_record(site, variants[site.id], inputs[site.id], lowerings[site.id]))
    report.compile_seconds = time.perf_counter() - t0
    return OnnxRewrite(out, report)


def _static_lengths(model: onnx.ModelProto, node: onnx.NodeProto) -> Optional[tuple[int, int]]:
    """(query length, key length) when the graph declares both as fixed sizes, else None: a
    static file gets a static lowering, which is what a grid-shaped variant needs."""
    typed = _typed(model)
    lengths = []
    for name in node.input[:2]:
        dims = typed[name].type.tensor_type.shape.dim if name in typed else []
        if len(dims) != 4 or not dims[2].HasField("dim_value"):
            return None
        lengths.append(dims[2].dim_value)
    return lengths[0], lengths[1]


def _mask_dims(shape: SiteShape, model: onnx.ModelProto, node: onnx.NodeProto) -> SiteShape:
    """The mask's static layout as the graph declares it (1 stays 1; other sizes are dynamic)."""
    if shape.mask_shape is None:
        return shape
    vi = _typed(model).get(node.input[3])
    if vi is None:
        return shape
    dims = tuple(d.dim_value if d.HasField("dim_value") else None for d in vi.type.tensor_type.shape.dim)
    return dataclasses.replace(shape, mask_shape=dims)


def _site_of(node: onnx.NodeProto) -> Optional[str]:
    return next((p.value for p in node.metadata_props if p.key == _SITE_KEY), None)


def _record(site: AttentionSite, variant, x: SiteInputs, lowering: str) -> SiteRecord:
    kept = variant.text == "dense"
    # Every ONNX site is normalized to one attention op, so even a kept one costs exact flops.
    return site_record(site, variant.text, "kept" if kept else "rewritten",
                       reason="exact: an ONNX site is always normalized to one standard Attention node" if kept else "",
                       intermediate_bytes=4 * site.batch * site.num_heads * site.seq_q * site.seq_k * 2,
                       exact_after=True, lowering=lowering,
                       effect=None if variant.exact else site_effect(variant, x, exact_probs=exact_probabilities(x)))
