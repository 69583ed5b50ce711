"""ONNX front end: attention subgraphs in ONNX files become one ai.onnx Attention node each.

Every check compares onnxruntime's output of the rewritten model with onnxruntime's output of
the original model on the same inputs (graph optimizations off, so ORT's own fusions do not
stand in for the original arithmetic).
"""

import contextlib
import io
import math
import warnings

import numpy as np
import pytest
import torch

# The ONNX stack is the optional "onnx" extra.
for _dep in ("onnx", "onnxruntime", "onnxscript", "onnx_ir"):
    pytest.importorskip(_dep)

import onnx  # noqa: E402
import onnxruntime as ort  # noqa: E402
from onnx import TensorProto as TP  # noqa: E402
from onnx import helper as oh  # noqa: E402
from onnx import numpy_helper  # noqa: E402

from compiler.ir.errors import InputError  # noqa: E402
from passes.onnx_attention_fusion import fuse_onnx_attention  # noqa: E402
from zoo import HF_CASES, TORCH_CASES, hf_model, torch_model  # noqa: E402

TOL = 1e-4
ort.set_default_logger_severity(3)


# ----------------------------------------------------------------------------------------
# helpers


def _session(model: onnx.ModelProto) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    opts.intra_op_num_threads = 1
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def _run(model: onnx.ModelProto, feeds: dict) -> list[np.ndarray]:
    return _session(model).run(None, feeds)


def _max_err(a: list[np.ndarray], b: list[np.ndarray]) -> float:
    assert len(a) == len(b)
    return max(float(np.abs(x.astype(np.float64) - y.astype(np.float64)).max()) for x, y in zip(a, b))


def _ops(model: onnx.ModelProto) -> list[str]:
    return [n.op_type for n in model.graph.node]


def _check(model: onnx.ModelProto, feeds: dict, sites: int):
    """Rewrite, validate, and compare with the original. Returns (rewritten, result)."""
    out, res = fuse_onnx_attention(model)
    onnx.checker.check_model(out, full_check=True)
    assert out.ir_version <= 10
    assert {o.domain: o.version for o in out.opset_import}.get("", 0) >= 23
    assert len(res.sites) == sites, res.rejected
    attn = [n for n in out.graph.node if n.op_type == "Attention" and n.domain in ("", "ai.onnx")]
    assert len(attn) == sites
    for node, site in zip(attn, res.sites):
        assert node.name == site.node
        assert {p.key: p.value for p in node.metadata_props}["attnforge.site"] == site.id
        assert len(node.input) <= 4 and len(node.output) == 1
    assert [s.id for s in res.sites] == [f"attn.{i}" for i in range(sites)]
    assert [o.name for o in out.graph.output] == [o.name for o in model.graph.output]
    err = _max_err(_run(model, feeds), _run(out, feeds))
    assert err <= TOL, err
    return out, res


def _model(nodes, inputs, outputs, inits=(), opset=18, ms=False) -> onnx.ModelProto:
    graph = oh.make_graph(nodes, "g", inputs, outputs, initializer=list(inits))
    opsets = [oh.make_opsetid("", opset)] + ([oh.make_opsetid("com.microsoft", 1)] if ms else [])
    return oh.make_model(graph, opset_imports=opsets, ir_version=10)


def _vi(name, shape, dtype=TP.FLOAT):
    return oh.make_tensor_value_info(name, dtype, shape)


def _const(name, array):
    return numpy_helper.from_array(np.asarray(array), name)


B, H, S, D = 2, 4, 5, 8
RNG = np.random.default_rng(0)
Q, K, V = (RNG.standard_normal((B, H, S, D)).astype(np.float32) for _ in range(3))
QKV_IN = [_vi("q", [B, H, S, D]), _vi("k", [B, H, S, D]), _vi("v", [B, H, S, D])]
QKV = {"q": Q, "k": K, "v": V}


def _attention_graph(score_nodes, scores="s", extra_inputs=(), inits=(), softmax_axis=-1, extra_outputs=()):
    """q @ kᵀ -> (score_nodes) -> Softmax -> @ v, with k transposed by a Transpose node."""
    nodes = [
        oh.make_node("Transpose", ["k"], ["kt"], perm=[0, 1, 3, 2]),
        oh.make_node("MatMul", ["q", "kt"], ["qk"]),
        *score_nodes,
        oh.make_node("Softmax", [scores], ["p"], axis=softmax_axis),
        oh.make_node("MatMul", ["p", "v"], ["y"]),
    ]
    outputs = [_vi("y", [B, H, S, D]), *extra_outputs]
    return _model(nodes, QKV_IN + list(extra_inputs), outputs, inits)


def _reference(q, k, v, scale, keep=None):
    s = scale * q @ np.swapaxes(k, -1, -2)
    if keep is not None:
        s = np.where(keep, s, -np.inf)
    s = s - s.max(-1, keepdims=True)
    p = np.exp(s)
    return (p / p.sum(-1, keepdims=True)) @ v


# ----------------------------------------------------------------------------------------
# zoo models through both exporters

_CAUSAL_LM = {"gpt2", "llama"}


class _Positional(torch.nn.Module):
    """The legacy exporter maps example kwargs onto forward's signature positionally and
    fails on Hugging Face signatures ("got multiple values for argument 'use_cache'"), so
    HF models get positional inputs for it. The attention code traced is the model's own."""

    def __init__(self, model, names, extra):
        super().__init__()
        self.model, self.names, self.extra = model, names, extra

    def forward(self, *inputs):
        return self.model(**dict(zip(self.names, inputs)), **self.extra).last_hidden_state


def _export(z, kind: str, dynamo: bool, path, opset=None) -> onnx.ModelProto:
    kwargs = dict(z.kwargs)
    if kind in _CAUSAL_LM:
        kwargs["use_cache"] = False
    f = str(path / "model.onnx")
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        try:
            if dynamo:
                extra = {"opset_version": opset} if opset else {}
                torch.onnx.export(z.model, z.args, f, kwargs=kwargs, dynamo=True, **extra)
            elif z.kwargs:
                extra = {"use_cache": False} if kind in _CAUSAL_LM else {}
                wrapped = _Positional(z.model, list(z.kwargs), extra).eval()
                torch.onnx.export(wrapped, tuple(z.kwargs.values()), f, dynamo=False,
                                  input_names=list(z.kwargs))
            else:
                torch.onnx.export(z.model, z.args, f, dynamo=False)
        except Exception as e:  # pragma: no cover - depends on the installed exporter
            pytest.skip(f"the {'dynamo' if dynamo else 'TorchScript'} exporter cannot export {z.name}: "
                        f"{type(e).__name__}: {str(e).splitlines()[0][:200]}")
    return onnx.load(f)


def _feeds(model: onnx.ModelProto, z) -> dict:
    values = [*z.args, *z.kwargs.values()]
    names = [i.name for i in model.graph.input]
    assert len(names) == len(values), names
    return {n: t.numpy() for n, t in zip(names, values)}


@pytest.mark.parametrize("dynamo", [True, False], ids=["dynamo", "torchscript"])
@pytest.mark.parametrize("kind,impl", HF_CASES)
def test_hf_zoo(kind, impl, dynamo, tmp_path, one_thread):
    z = hf_model(kind, impl)
    model = _export(z, kind, dynamo, tmp_path)
    out, res = _check(model, _feeds(model, z), z.attention_blocks)
    assert "Softmax" not in _ops(out)
    for s in res.sites:
        assert s.source == "matmul-softmax"
        assert s.is_causal == z.causal, s
        assert (s.q_heads, s.kv_heads, s.head_dim) == (4, z.kv_heads, 8), s
        assert s.scale == pytest.approx(1 / math.sqrt(8), rel=1e-6)
        # padding stays a mask; the causal part of a combined mask becomes is_causal
        assert s.mask == ("none" if kind == "vit" else "bool"), s


@pytest.mark.parametrize("dynamo", [True, False], ids=["dynamo", "torchscript"])
@pytest.mark.parametrize("kind", TORCH_CASES)
def test_torch_zoo(kind, dynamo, tmp_path, one_thread):
    z = torch_model(kind)
    model = _export(z, kind, dynamo, tmp_path)
    out, res = _check(model, _feeds(model, z), z.attention_blocks)
    assert "Softmax" not in _ops(out)
    for s in res.sites:
        assert s.is_causal == z.causal, s
        assert s.scale == pytest.approx(0.5, rel=1e-6)
        assert s.mask == ("float" if kind.startswith("mha") else "none"), s


@pytest.mark.parametrize("kind,impl", [("llama", "sdpa"), ("gpt2", "sdpa")])
def test_dynamo_opset23_attention_nodes(kind, impl, tmp_path, one_thread):
    """At opset 23 the dynamo exporter writes ai.onnx Attention with repeated K/V and a
    combined causal-and-padding bool mask; normalizing keeps GQA native and is_causal."""
    z = hf_model(kind, impl)
    model = _export(z, kind, True, tmp_path, opset=23)
    assert "Attention" in _ops(model)
    _, res = _check(model, _feeds(model, z), 2)
    for s in res.sites:
        assert s.source == "ai.onnx.Attention"
        assert s.is_causal and s.mask == "bool" and s.kv_heads == z.kv_heads


def test_dynamo_opset23_multihead_mask_made_explicit(tmp_path, one_thread):
    """torch writes nn.MultiheadAttention's key padding mask as [B, H, 1, S]; ORT 1.31's
    Attention does not broadcast over the query axis ("inconsistent q_sequence_length") and
    cannot run that file. The normalized node carries an explicit [.., Sq, Sk] mask and
    matches the default-opset export of the same model."""
    z = torch_model("mha")
    at23 = _export(z, "mha", True, tmp_path, opset=23)
    at18 = _export(z, "mha", True, tmp_path)
    feeds = _feeds(at23, z)
    out, res = fuse_onnx_attention(at23)
    onnx.checker.check_model(out, full_check=True)
    assert [s.source for s in res.sites] == ["ai.onnx.Attention"] * 2
    assert _max_err(_run(out, feeds), _run(at18, feeds)) <= TOL


def test_dynamic_sequence_length(tmp_path, one_thread):
    """With a symbolic length the causal part is recovered by evaluating the mask's
    shape-only cone at two lengths; the rewritten file runs at lengths it was not exported at."""
    z = hf_model("llama", "eager")
    seq = torch.export.Dim("seq", min=2, max=32)
    f = str(tmp_path / "model.onnx")
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        torch.onnx.export(z.model, (), f, kwargs={**z.kwargs, "use_cache": False}, dynamo=True,
                          dynamic_shapes={"input_ids": {1: seq}, "attention_mask": {1: seq}, "use_cache": None})
    model = onnx.load(f)
    out, res = fuse_onnx_attention(model)
    onnx.checker.check_model(out, full_check=True)
    assert [(s.is_causal, s.mask, s.kv_heads) for s in res.sites] == [(True, "bool", 2)] * 2
    for length in (3, 11):
        ids = RNG.integers(0, 100, (2, length))
        mask = np.ones((2, length), dtype=np.int64)
        mask[0, -2:] = 0
        feeds = {"input_ids": ids, "attention_mask": mask}
        assert _max_err(_run(model, feeds), _run(out, feeds)) <= TOL


# ----------------------------------------------------------------------------------------
# hand-built graphs


@pytest.mark.parametrize("form", ["div", "mul", "mul-left"])
def test_scale_on_scores(form):
    c = math.sqrt(D) if form == "div" else 1 / math.sqrt(D)
    inputs = ["qk", "c"] if form != "mul-left" else ["c", "qk"]
    node = oh.make_node("Div" if form == "div" else "Mul", inputs, ["s"])
    model = _attention_graph([node], inits=[_const("c", np.float32(c))])
    out, res = _check(model, QKV, 1)
    assert res.sites[0].scale == pytest.approx(1 / math.sqrt(D), rel=1e-6)
    assert res.sites[0].source == "matmul-softmax" and res.sites[0].mask == "none"
    assert not res.sites[0].is_causal
    np.testing.assert_allclose(_run(out, QKV)[0], _reference(Q, K, V, 1 / math.sqrt(D)), atol=1e-5)


def test_scale_on_q_and_sqrt_split_through_layout():
    """q scaled before the product; k scaled by √ before its transpose and q by √ too (the
    SDPA decomposition), plus a Div on the scores: the factors multiply into one scale."""
    nodes = [
        oh.make_node("Mul", ["q", "a"], ["qa"]),
        oh.make_node("Mul", ["k", "a"], ["ka"]),
        oh.make_node("Transpose", ["ka"], ["kt"], perm=[0, 1, 3, 2]),
        oh.make_node("Mul", ["qa", "b"], ["qb"]),
        oh.make_node("MatMul", ["qb", "kt"], ["qk"]),
        oh.make_node("Div", ["qk", "two"], ["s"]),
        oh.make_node("Softmax", ["s"], ["p"], axis=-1),
        oh.make_node("MatMul", ["p", "v"], ["y"]),
    ]
    a, bq = 0.6, 0.9
    inits = [_const("a", np.float32(a)), _const("b", np.float32(bq)), _const("two", np.float32(2.0))]
    model = _model(nodes, QKV_IN, [_vi("y", [B, H, S, D])], inits)
    out, res = _check(model, QKV, 1)
    expected = np.float32(a) * np.float32(a) * np.float32(bq) / 2.0
    assert res.sites[0].scale == pytest.approx(float(expected), rel=1e-6)
    assert "Mul" not in _ops(out)


@pytest.mark.parametrize("form", ["masked_fill", "masked_fill_drop", "where_add"])
def test_where_mask_from_input(form):
    keep = RNG.random((B, 1, S, S)) > 0.3
    keep[..., 0] = True  # no fully masked row: those differ by design (see test below)
    if form == "masked_fill":
        nodes = [oh.make_node("Where", ["m", "qk", "ninf"], ["s"])]
        m = keep
    elif form == "masked_fill_drop":
        nodes = [oh.make_node("Where", ["m", "ninf", "qk"], ["s"])]
        m = ~keep
    else:  # HF style: Where(keep, 0, finfo.min) added to the scores
        nodes = [oh.make_node("Where", ["m", "zero", "fmin"], ["bias"]), oh.make_node("Add", ["qk", "bias"], ["s"])]
        m = keep
    inits = [_const("ninf", np.float32(-np.inf)), _const("zero", np.float32(0)),
             _const("fmin", np.finfo(np.float32).min)]
    model = _attention_graph(nodes, extra_inputs=[_vi("m", [B, 1, S, S], TP.BOOL)], inits=inits)
    feeds = {**QKV, "m": m}
    out, res = _check(model, feeds, 1)
    assert res.sites[0].mask == "bool" and not res.sites[0].is_causal
    assert res.sites[0].scale == 1.0
    np.testing.assert_allclose(_run(out, feeds)[0], _reference(Q, K, V, 1.0, keep), atol=1e-5)


@pytest.mark.parametrize("form", ["additive", "where_trilu", "bool_and_padding"])
def test_constant_causal_mask_becomes_is_causal(form):
    tri = np.tril(np.ones((S, S), dtype=bool))
    inits = [_const("ninf", np.float32(-np.inf)), _const("zero", np.float32(0))]
    extra_inputs = []
    feeds = dict(QKV)
    if form == "additive":  # torch's generate_square_subsequent_mask, stored
        inits.append(_const("causal", np.where(tri, 0, -np.inf).astype(np.float32)))
        nodes = [oh.make_node("Add", ["qk", "causal"], ["s"])]
    elif form == "where_trilu":  # computed from the scores' shape
        nodes = [
            oh.make_node("Shape", ["qk"], ["shp"], start=2),
            oh.make_node("ConstantOfShape", ["shp"], ["ones"], value=oh.make_tensor("", TP.INT64, [1], [1])),
            oh.make_node("Trilu", ["ones"], ["tril"], upper=0),
            oh.make_node("Cast", ["tril"], ["keep"], to=TP.BOOL),
            oh.make_node("Where", ["keep", "qk", "ninf"], ["s"]),
        ]
    else:  # causal AND padding: the causal part is recovered, padding stays
        pad = np.ones((B, 1, 1, S), dtype=bool)
        pad[1, ..., 3:] = False
        inits.append(_const("tri", tri))
        extra_inputs.append(_vi("pad", [B, 1, 1, S], TP.BOOL))
        feeds["pad"] = pad
        nodes = [oh.make_node("And", ["tri", "pad"], ["keep"]), oh.make_node("Where", ["keep", "qk", "ninf"], ["s"])]
    model = _attention_graph(nodes, extra_inputs=extra_inputs, inits=inits)
    out, res = _check(model, feeds, 1)
    site = res.sites[0]
    assert site.is_causal
    assert site.mask == ("bool" if form == "bool_and_padding" else "none")
    assert not {"Trilu", "And", "Where"} & set(_ops(out))


def test_constant_non_causal_mask_stays_a_mask():
    """A sliding window (or bottom-right causal) constant is not is_causal=1."""
    i, j = np.indices((S, S))
    window = (j <= i) & (j > i - 2)
    model = _attention_graph([oh.make_node("Where", ["w", "qk", "ninf"], ["s"])],
                             inits=[_const("w", window), _const("ninf", np.float32(-np.inf))])
    _, res = _check(model, QKV, 1)
    assert not res.sites[0].is_causal and res.sites[0].mask == "bool"


def test_softcap_tanh():
    """Gemma-2 style: cap·tanh(scale·qk / cap), then the mask."""
    cap, scale = 2.0, 0.7
    nodes = [
        oh.make_node("Mul", ["qk", "scale"], ["s1"]),
        oh.make_node("Div", ["s1", "cap"], ["s2"]),
        oh.make_node("Tanh", ["s2"], ["s3"]),
        oh.make_node("Mul", ["s3", "cap"], ["s4"]),
        oh.make_node("Add", ["s4", "bias"], ["s"]),
    ]
    bias = RNG.standard_normal((1, H, S, S)).astype(np.float32)
    inits = [_const("scale", np.float32(scale)), _const("cap", np.float32(cap))]
    model = _attention_graph(nodes, extra_inputs=[_vi("bias", [1, H, S, S])], inits=inits)
    feeds = {**QKV, "q": Q * 3, "bias": bias}  # big scores, so the cap matters
    _, res = _check(model, feeds, 1)
    site = res.sites[0]
    assert site.softcap == pytest.approx(cap) and site.scale == pytest.approx(scale)
    assert site.mask == "float"


def test_fp16_scores_upcast_for_softmax():
    """fp16 q/k/v with the softmax in fp32 (Cast up, Cast down) and inference Dropout."""
    half = [_vi(n, [B, H, S, D], TP.FLOAT16) for n in "qkv"]
    nodes = [
        oh.make_node("Transpose", ["k"], ["kt"], perm=[0, 1, 3, 2]),
        oh.make_node("MatMul", ["q", "kt"], ["qk"]),
        oh.make_node("Cast", ["qk"], ["qk32"], to=TP.FLOAT),
        oh.make_node("Mul", ["qk32", "c"], ["s0"]),
        oh.make_node("Add", ["s0", "m"], ["s"]),
        oh.make_node("Softmax", ["s"], ["p32"], axis=-1),
        oh.make_node("Cast", ["p32"], ["p"], to=TP.FLOAT16),
        oh.make_node("Dropout", ["p"], ["pd"]),
        oh.make_node("MatMul", ["pd", "v"], ["y"]),
    ]
    model = _model(nodes, half + [_vi("m", [B, 1, 1, S])], [_vi("y", [B, H, S, D], TP.FLOAT16)],
                   [_const("c", np.float32(0.35))], opset=17)
    m = np.zeros((B, 1, 1, S), dtype=np.float32)
    m[1, ..., 3:] = -np.inf
    feeds = {**{n: x.astype(np.float16) for n, x in QKV.items()}, "m": m}
    out, res = fuse_onnx_attention(model)
    onnx.checker.check_model(out, full_check=True)
    attn = next(n for n in out.graph.node if n.op_type == "Attention")
    assert {a.name: oh.get_attribute_value(a) for a in attn.attribute}["softmax_precision"] == TP.FLOAT
    assert res.sites[0].mask == "float" and res.sites[0].scale == pytest.approx(0.35)
    assert _max_err(_run(model, feeds), _run(out, feeds)) <= 2e-3  # fp16 output


def test_three_d_scores_and_k_laid_out_transposed():
    """bmm form [B*H, S, D] with k already stored as [B*H, D, S]."""
    n = B * H
    nodes = [oh.make_node("MatMul", ["q3", "kt3"], ["qk"]), oh.make_node("Mul", ["qk", "c"], ["s"]),
             oh.make_node("Softmax", ["s"], ["p"], axis=2), oh.make_node("MatMul", ["p", "v3"], ["y"])]
    model = _model(nodes, [_vi("q3", [n, S, D]), _vi("kt3", [n, D, S]), _vi("v3", [n, S, D])],
                   [_vi("y", [n, S, D])], [_const("c", np.float32(0.25))])
    feeds = {"q3": Q.reshape(n, S, D), "kt3": np.swapaxes(K, -1, -2).reshape(n, D, S), "v3": V.reshape(n, S, D)}
    _, res = _check(model, feeds, 1)
    assert res.sites[0].scale == 0.25


def test_fully_masked_row_gives_zeros():
    """Documented difference: the Attention op (ORT 1.31) returns a zero row where every key
    is masked; the unfused graph gives NaN with a -inf fill. All other rows match."""
    keep = np.ones((B, 1, S, S), dtype=bool)
    keep[0, 0, 2, :] = False
    model = _attention_graph([oh.make_node("Where", ["m", "qk", "ninf"], ["s"])],
                             extra_inputs=[_vi("m", [B, 1, S, S], TP.BOOL)],
                             inits=[_const("ninf", np.float32(-np.inf))])
    feeds = {**QKV, "m": keep}
    out, res = fuse_onnx_attention(model)
    assert len(res.sites) == 1
    before, after = _run(model, feeds)[0], _run(out, feeds)[0]
    assert np.isnan(before[0, :, 2]).all() and (after[0, :, 2] == 0).all()
    ok = np.ones(before.shape[:3], dtype=bool)
    ok[0, :, 2] = False
    assert np.abs(before[ok] - after[ok]).max() <= TOL


# ----------------------------------------------------------------------------------------
# already-fused nodes


def test_onnx_attention_3d_inputs():
    hkv = 2
    q = RNG.standard_normal((B, S, H * D)).astype(np.float32)
    k, v = (RNG.standard_normal((B, S + 1, hkv * D)).astype(np.float32) for _ in range(2))
    mask = RNG.random((S, S + 1)) > 0.3
    mask[:, 0] = True
    node = oh.make_node("Attention", ["q", "k", "v", "m"], ["y"], q_num_heads=H, kv_num_heads=hkv, scale=0.3)
    model = _model([node], [_vi("q", [B, S, H * D]), _vi("k", [B, S + 1, hkv * D]), _vi("v", [B, S + 1, hkv * D]),
                            _vi("m", [S, S + 1], TP.BOOL)], [_vi("y", [B, S, H * D])], opset=23)
    out, res = _check(model, {"q": q, "k": k, "v": v, "m": mask}, 1)
    site = res.sites[0]
    assert (site.source, site.q_heads, site.kv_heads, site.head_dim) == ("ai.onnx.Attention", H, hkv, D)
    assert site.scale == pytest.approx(0.3) and site.mask == "bool"
    attn = next(n for n in out.graph.node if n.op_type == "Attention")
    assert not {a.name for a in attn.attribute} & {"q_num_heads", "kv_num_heads"}


def test_ms_multihead_attention():
    q, k, v = (RNG.standard_normal((B, S, H * D)).astype(np.float32) for _ in range(3))
    bias = RNG.standard_normal((3 * H * D,)).astype(np.float32)
    kpm = np.ones((B, S), dtype=np.int32)
    kpm[1, 3:] = 0
    ab = RNG.standard_normal((1, H, S, S)).astype(np.float32)
    node = oh.make_node("MultiHeadAttention", ["q", "k", "v", "bias", "kpm", "ab"], ["y"],
                        domain="com.microsoft", num_heads=H)
    model = _model([node], [_vi("q", [B, S, H * D]), _vi("k", [B, S, H * D]), _vi("v", [B, S, H * D]),
                            _vi("kpm", [B, S], TP.INT32), _vi("ab", [1, H, S, S])],
                   [_vi("y", [B, S, H * D])], [_const("bias", bias)], ms=True)
    _, res = _check(model, {"q": q, "k": k, "v": v, "kpm": kpm, "ab": ab}, 1)
    site = res.sites[0]
    assert site.source == "com.microsoft.MultiHeadAttention"
    assert (site.q_heads, site.kv_heads, site.head_dim, site.mask) == (H, H, D, "float")
    assert site.scale == pytest.approx(1 / math.sqrt(D))


def test_ms_multihead_causal_and_past_rejected():
    q = RNG.standard_normal((B, S, H * D)).astype(np.float32)
    node = oh.make_node("MultiHeadAttention", ["q", "q", "q"], ["y"], domain="com.microsoft",
                        num_heads=H, unidirectional=1, scale=0.2)
    model = _model([node], [_vi("q", [B, S, H * D])], [_vi("y", [B, S, H * D])], ms=True)
    _, res = _check(model, {"q": q}, 1)
    assert res.sites[0].is_causal and res.sites[0].scale == pytest.approx(0.2)

    past = oh.make_node("MultiHeadAttention", ["q", "q", "q", "", "", "", "pk", "pv"], ["y", "ok", "ov"],
                        domain="com.microsoft", num_heads=H)
    model = _model([past], [_vi("q", [B, S, H * D]), _vi("pk", [B, H, 3, D]), _vi("pv", [B, H, 3, D])],
                   [_vi("y", [B, S, H * D])], ms=True)
    out, res = fuse_onnx_attention(model)
    assert not res.sites and "past" in res.rejected[0][1]
    assert "MultiHeadAttention" in _ops(out)


def test_ms_attention_packed_weights():
    hidden = 16
    x = RNG.standard_normal((B, S, hidden)).astype(np.float32)
    w = (RNG.standard_normal((hidden, 3 * H * D)) * 0.3).astype(np.float32)
    bias = RNG.standard_normal((3 * H * D,)).astype(np.float32)
    mask = np.ones((B, S), dtype=np.int32)
    mask[0, 4:] = 0
    node = oh.make_node("Attention", ["x", "w", "bias", "mask"], ["y"], domain="com.microsoft", num_heads=H)
    model = _model([node], [_vi("x", [B, S, hidden]), _vi("mask", [B, S], TP.INT32)], [_vi("y", [B, S, H * D])],
                   [_const("w", w), _const("bias", bias)], ms=True)
    out, res = _check(model, {"x": x, "mask": mask}, 1)
    assert res.sites[0].source == "com.microsoft.Attention" and res.sites[0].mask == "float"
    assert {"MatMul", "Add", "Split"} <= set(_ops(out))


@pytest.mark.parametrize("packed", [False, True])
def test_ms_group_query_attention(packed):
    hkv = 2
    q = RNG.standard_normal((B, S, H * D)).astype(np.float32)
    k, v = (RNG.standard_normal((B, S, hkv * D)).astype(np.float32) for _ in range(2))
    seqlens = np.array([S - 1, 2], dtype=np.int32)  # batch 1 is right-padded
    total = np.array(S, dtype=np.int32)
    if packed:
        inputs, feeds = ["qkv", "", ""], {"qkv": np.concatenate([q, k, v], -1)}
        vis = [_vi("qkv", [B, S, (H + 2 * hkv) * D])]
    else:
        inputs, feeds = ["q", "k", "v"], {"q": q, "k": k, "v": v}
        vis = [_vi("q", [B, S, H * D]), _vi("k", [B, S, hkv * D]), _vi("v", [B, S, hkv * D])]
    node = oh.make_node("GroupQueryAttention", [*inputs, "", "", "seqlens", "total"], ["y", "pk", "pv"],
                        domain="com.microsoft", num_heads=H, kv_num_heads=hkv, softcap=1.5)
    model = _model([node], vis + [_vi("seqlens", [B], TP.INT32)], [_vi("y", [B, S, H * D]), _vi("pk", None)],
                   [_const("total", total)], ms=True)
    out, res = _check(model, {**feeds, "seqlens": seqlens}, 1)
    site = res.sites[0]
    assert site.source == "com.microsoft.GroupQueryAttention"
    assert (site.is_causal, site.q_heads, site.kv_heads, site.softcap, site.mask) == (True, H, hkv, 1.5, "bool")


def test_ms_gqa_decoding_form_rejected():
    node = oh.make_node("GroupQueryAttention", ["q", "k", "v", "pk", "pv", "sl", "tot"], ["y", "ok", "ov"],
                        domain="com.microsoft", num_heads=H, kv_num_heads=H)
    model = _model([node], [_vi("q", [B, 1, H * D]), _vi("k", [B, 1, H * D]), _vi("v", [B, 1, H * D]),
                            _vi("pk", [B, H, 4, D]), _vi("pv", [B, H, 4, D]), _vi("sl", [B], TP.INT32),
                            _vi("tot", [], TP.INT32)], [_vi("y", [B, 1, H * D])], ms=True)
    out, res = fuse_onnx_attention(model)
    assert not res.sites and "past" in res.rejected[0][1]
    assert "GroupQueryAttention" in _ops(out)


# ----------------------------------------------------------------------------------------
# softmaxes that are not attention


def _unchanged(model, feeds, reason_part):
    out, res = fuse_onnx_attention(model)
    onnx.checker.check_model(out, full_check=True)
    assert not res.sites
    assert len(res.rejected) == 1 and reason_part in res.rejected[0][1], res.rejected
    assert "Attention" not in _ops(out) and "Softmax" in _ops(out)
    assert _max_err(_run(model, feeds), _run(out, feeds)) == 0.0


def test_classifier_softmax_is_not_attention():
    w = RNG.standard_normal((D, 3)).astype(np.float32)
    nodes = [oh.make_node("MatMul", ["x", "w"], ["logits"]), oh.make_node("Softmax", ["logits"], ["p"], axis=-1)]
    model = _model(nodes, [_vi("x", [B, D])], [_vi("p", [B, 3])], [_const("w", w)])
    _unchanged(model, {"x": Q[0, 0, :B]}, "constant")


def test_router_softmax_is_not_attention():
    w = RNG.standard_normal((D, 4)).astype(np.float32)
    nodes = [oh.make_node("MatMul", ["x", "w"], ["logits"]), oh.make_node("Softmax", ["logits"], ["p"], axis=-1),
             oh.make_node("TopK", ["p", "two"], ["vals", "idx"], axis=-1)]
    model = _model(nodes, [_vi("x", [S, D])], [_vi("vals", [S, 2]), _vi("idx", [S, 2], TP.INT64)],
                   [_const("w", w), _const("two", np.array([2], dtype=np.int64))])
    _unchanged(model, {"x": Q[0, 0]}, "constant")


def test_softmax_on_axis_1_is_not_attention():
    model = _attention_graph([], scores="qk", softmax_axis=1)
    _unchanged(model, QKV, "axis 1")


def test_probabilities_also_returned_is_not_attention():
    model = _attention_graph([], scores="qk", extra_outputs=[_vi("p", [B, H, S, S])])
    _unchanged(model, QKV, "graph output")


def test_not_a_model_is_an_input_error():
    with pytest.raises(InputError):
        fuse_onnx_attention(b"not a model")
