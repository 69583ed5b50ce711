"""The onnxruntime backend: every lowering against the PyTorch reference ops, the zoo against
the torch backend, dynamic shapes, saving, and the bad-input messages."""

from __future__ import annotations

import re

import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F

import backends
import compiler
from backends.onnx_attention import FusedFeatures, choose_fused
from backends.onnx_export import export_onnx
from conftest import covering
from compiler.ir.errors import BackendError, InputError
from compiler.reference.linear_ops import linear_attention_reference
from compiler.ir.ops import attention_reference
from compiler.reference.sparse_ops import sparse_attention_reference
from zoo import HF_CASES, TORCH_CASES, hf_model, torch_model

TOL = 1e-4


class OneOp(torch.nn.Module):
    """One attnforge op, with its attributes fixed, as a model to export."""

    def __init__(self, kind: str, scale: float, causal: bool, softcap: float = 0.0, spec: str = ""):
        super().__init__()
        self.kind, self.scale, self.causal, self.softcap, self.spec = kind, scale, causal, softcap, spec

    def forward(self, q, k, v, mask=None):
        if self.kind == "fused":
            return torch.ops.attnforge.attention(q, k, v, mask, self.scale, self.causal, self.softcap)
        if self.kind == "sparse":
            return torch.ops.attnforge.sparse_attention(q, k, v, mask, self.scale, self.causal, self.softcap,
                                                        self.spec)
        return torch.ops.attnforge.linear_attention(q, k, v, mask, self.scale, self.causal, self.spec)

    def reference(self, q, k, v, mask=None):
        if self.kind == "fused":
            return attention_reference(q, k, v, mask, self.scale, self.causal, self.softcap)
        if self.kind == "sparse":
            return sparse_attention_reference(q, k, v, mask, self.scale, self.causal, self.softcap, self.spec)
        return linear_attention_reference(q, k, v, mask, self.scale, self.causal, self.spec)


def _inputs(seq: int, mask: str | None, hq=4, hkv=2, d=16, seed=0, sk: int | None = None):
    g = torch.Generator().manual_seed(seed)
    sk = seq if sk is None else sk
    q = torch.randn(2, hq, seq, d, generator=g)
    k, v = torch.randn(2, hkv, sk, d, generator=g), torch.randn(2, hkv, sk, d, generator=g)
    m = None
    if mask == "key-bool":
        m = torch.ones(2, 1, 1, sk, dtype=torch.bool)
        m[1, ..., sk - 5:] = False
    elif mask == "key-float":
        m = torch.zeros(2, 1, 1, sk)
        m[1, ..., sk - 5:] = float("-inf")
        m[0, ..., :3] = -1.5
    elif mask == "full-bool":
        m = torch.rand(2, 1, seq, sk, generator=g) > 0.3
        m[0, 0, 1] = False  # a query with every key masked: zeros, never NaN
    return (q, k, v) if m is None else (q, k, v, m)


def _export_dynamic(mod: OneOp, mask: str | None, seq: int = 40, fused_lowering=None):
    s = torch.export.Dim("s", min=2, max=4096)
    shapes = [{2: s}] * 3
    if mask in ("key-bool", "key-float"):
        shapes.append({3: s})
    elif mask == "full-bool":
        shapes.append({2: s, 3: s})
    ep = torch.export.export(mod, _inputs(seq, mask), dynamic_shapes=tuple(shapes))
    return export_onnx(ep, fused_lowering=fused_lowering)


def _session(model: onnx.ModelProto):
    so = ort.SessionOptions()
    so.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def _check_lengths(mod: OneOp, mask: str | None, lengths=(40, 23, 70), fused_lowering=None) -> str:
    """Export at the first length, run at every length, compare with the reference op."""
    ex = _export_dynamic(mod, mask, lengths[0], fused_lowering)
    onnx.checker.check_model(ex.model, full_check=True)
    sess = _session(ex.model)
    for i, seq in enumerate(lengths):
        x = _inputs(seq, mask, seed=i)
        got = sess.run(None, {a.name: t.numpy() for a, t in zip(sess.get_inputs(), x)})[0]
        want = mod.reference(*x)
        assert not torch.isnan(torch.from_numpy(got)).any()
        err = (torch.from_numpy(got) - want).abs().max().item()
        assert err < TOL, f"{mod.kind} {mod.spec} seq={seq} mask={mask}: max abs error {err:.2e}"
    (lowering,) = ex.lowerings.values()
    return lowering


def _check_static(mod: OneOp, x: tuple) -> onnx.ModelProto:
    """Export at the shapes of ``x``, run ``x``, compare with the reference op; the model exported."""
    model = export_onnx(torch.export.export(mod, x)).model
    sess = _session(model)
    got = torch.from_numpy(sess.run(None, {a.name: t.numpy() for a, t in zip(sess.get_inputs(), x)})[0])
    assert (got - mod.reference(*x)).abs().max().item() < TOL
    return model


MASKS = [None, "key-bool", "key-float", "full-bool"]


@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
@pytest.mark.parametrize("mask", MASKS, ids=lambda m: m or "nomask")
def test_fused_standard_attention(causal, mask):
    assert _check_lengths(OneOp("fused", 0.3, causal), mask, fused_lowering="attention") == "attention"


@pytest.mark.parametrize("mask", MASKS, ids=lambda m: m or "nomask")
def test_fused_gqa_takes_masks_as_bias(mask):
    """Causal GQA with any mask as attention_bias, fully masked rows zeroed, at three lengths."""
    assert _check_lengths(OneOp("fused", 0.3, True), mask, fused_lowering="gqa") == "gqa"
    assert _check_lengths(OneOp("fused", 0.3, True, softcap=2.0), mask, fused_lowering="gqa") == "gqa"


def test_fused_softcap_and_cross_lengths():
    _check_static(OneOp("fused", 0.25, True, softcap=3.0), _inputs(9, "full-bool", sk=13))


@pytest.mark.parametrize("lowering,causal,gqa", [("gqa", True, True), ("gqa", True, False), ("mha", False, False)])
def test_contrib_lowerings(lowering, causal, gqa):
    mod = OneOp("fused", 0.2, causal)
    s = torch.export.Dim("s", min=2, max=4096)
    hkv = 2 if gqa else 4
    ep = torch.export.export(mod, _inputs(33, None, hkv=hkv), dynamic_shapes=({2: s},) * 3)
    ex = export_onnx(ep, fused_lowering=lowering)
    assert list(ex.lowerings.values()) == [lowering]
    domains = {n.domain for n in ex.model.graph.node}
    assert "com.microsoft" in domains
    sess = _session(ex.model)
    for seq in (33, 17, 64):
        x = _inputs(seq, None, hkv=hkv, seed=seq)
        got = torch.from_numpy(sess.run(None, {a.name: t.numpy() for a, t in zip(sess.get_inputs(), x)})[0])
        assert (got - mod.reference(*x)).abs().max().item() < TOL


def test_capability_table_never_picks_an_unsupporting_lowering():
    for causal in (False, True):
        for mask in ("none", "bool", "float"):
            for grouped in (False, True):
                for square in (False, True):
                    f = FusedFeatures(causal, mask, False, grouped, square, "float32", 64)
                    chosen = choose_fused(f, "CPUExecutionProvider")
                    assert f.supported_by(chosen)
                    if chosen == "gqa":
                        assert causal and square
                    if chosen == "mha":
                        assert not causal and not grouped and mask == "none"
    # A causal site's mask rides along as GQA's attention_bias; a bidirectional masked one needs the
    # standard op (MHA gives fully masked rows other values).
    assert choose_fused(FusedFeatures(True, "bool", False, True, True, "float32", 64),
                        "CPUExecutionProvider") == "gqa"
    assert choose_fused(FusedFeatures(False, "bool", False, False, True, "float32", 64),
                        "CPUExecutionProvider") == "attention"
    # ORT's GQA kernel needs D % 8 == 0 (TransformerEncoderLayer(16, 4) has D = 4).
    assert choose_fused(FusedFeatures(True, "none", False, False, True, "float32", 4),
                        "CPUExecutionProvider") == "attention"


SPARSE = [
    "window:8",
    "window:8,sinks:3,block=8",
    "blocksparse:block=8,local=1,global=1,stride=3",
    "topk:blocks=2,block=8",
    "topk:mass=0.8,block=8",
    "heads[0]=fused;heads[*]=window:8,block=8",
    "vslash:vertical=6,slash=4,last=8,sinks=2,local=3,block=8",
    "heads[0-1]=topk:blocks=1,block=8;heads[*]=vslash:vertical=3,slash=2,last=4,sinks=1,local=1,block=4",
]


@pytest.mark.parametrize("spec,causal,mask", covering(SPARSE, [False, True], MASKS))
def test_sparse_lowering(spec, causal, mask):
    assert _check_lengths(OneOp("sparse", 0.3, causal, spec=spec), mask) == "block-gather"


def test_sparse_softcap():
    _check_lengths(OneOp("sparse", 0.3, True, softcap=2.0, spec="window:8,block=8"), "key-float")


@pytest.mark.parametrize("spec,causal,mask", covering(SPARSE, [False, True], MASKS))
@pytest.mark.parametrize("seq", [40, 23])
def test_sparse_lowering_in_query_block_groups(monkeypatch, spec, causal, mask, seq):
    """Exported at a known length, a static layout or a fixed top-k runs its query blocks in groups
    (scores that stay in cache); here one block a group: the same numbers (top-k by mass and
    vertical-slash keep a number of blocks known only per call: one group)."""
    import backends.onnx_sparse as onnx_sparse

    monkeypatch.setattr(onnx_sparse, "GROUP_SCORE_BYTES", 1)
    mod = OneOp("sparse", 0.3, causal, softcap=2.0 if mask == "key-float" else 0.0, spec=spec)
    model = _check_static(mod, _inputs(seq, mask, seed=3))
    softmaxes = sum(n.op_type == "Softmax" for n in model.graph.node)
    if spec.startswith(("window", "blocksparse", "heads[0]=fused", "topk:blocks")):  # known widths
        block = int(re.search(r"block=(\d+)", spec).group(1)) if "block=" in spec else 64
        assert softmaxes == -(-seq // block), "not one group per query block"


def test_neighborhood_lowering_static_grid():
    mod = OneOp("sparse", 0.3, False, spec="neighborhood:3x3,block=8")
    _check_static(mod, _inputs(37, "key-bool"))  # a CLS token and a 6x6 grid


def test_sparse_lowering_does_only_the_kept_work():
    """The gathered scores are [.., nqb, block, K*block]: K, the kept blocks, not Sk."""
    mod = OneOp("sparse", 0.125, True, spec="window:64,block=64")
    x = _inputs(1024, None, hq=2, hkv=2, d=16)
    model = export_onnx(torch.export.export(mod, x)).model
    shapes = onnx.shape_inference.infer_shapes(model, data_prop=True).graph.value_info
    matmul_out = {n.output[0] for n in model.graph.node if n.op_type == "MatMul"}
    sizes = [[d.dim_value for d in vi.type.tensor_type.shape.dim] for vi in shapes if vi.name in matmul_out]
    assert sizes, "no MatMul shapes inferred"
    assert all(max(s) < 1024 for s in sizes if s), sizes  # no [.., 1024, 1024] product anywhere


LINEAR = ["linear:elu,chunk=16", "linear:relu,chunk=16", "linear:favor,features=32,chunk=16", "linear:taylor,chunk=16",
          "hybrid:8,map=taylor,chunk=16", "hybrid:16,map=favor,features=32,chunk=16"]


@pytest.mark.parametrize("spec,causal,mask", covering(LINEAR, [False, True], [None, "key-bool", "key-float"]))
def test_linear_lowering(spec, causal, mask):
    assert _check_lengths(OneOp("linear", 0.3, causal, spec=spec), mask) == "feature-map"


@pytest.mark.parametrize("spec,mask", covering(LINEAR, [None, "key-bool", "key-float"]))
@pytest.mark.parametrize("seq", [48, 40])
def test_causal_linear_lowering_at_a_known_length(spec, mask, seq):
    """Exported at a known length: whole chunks (48 = 3 x 16) take no Pad, a short last chunk
    (40) keeps it; the numerator and denominator share the products (a ones column on v): one
    prefix sum."""
    mod = OneOp("linear", 0.3, True, spec=spec)
    model = _check_static(mod, _inputs(seq, mask, seed=5))
    ops = [n.op_type for n in model.graph.node]
    if spec.startswith("linear"):  # (a hybrid's window pads the user's mask into blocks)
        assert ("Pad" in ops) == (seq % 16 != 0)
    assert ops.count("CumSum") == 1  # one prefix sum carries numerator and denominator


@pytest.mark.parametrize("spec", [s for s in LINEAR if s.startswith("linear")])
@pytest.mark.parametrize("mask", [None, "key-bool", "key-heads"])
@pytest.mark.parametrize("hkv,per", [(2, 1), (4, 2), (1, 4)])
@pytest.mark.parametrize("seq", [48, 40])
def test_causal_linear_in_head_groups(monkeypatch, spec, mask, hkv, per, seq):
    """A causal site runs its heads in groups of ``per`` (a chain of nodes each), with each
    group's KV heads (GQA) and mask heads, and equals the reference op."""
    from backends import onnx_linear

    monkeypatch.setattr(onnx_linear, "GROUP_BYTES", per * 2 * seq * 17 * 4)  # per heads of [B=2, seq, Dv + 1]
    q, k, v, *m = _inputs(seq, None if mask == "key-heads" else mask, hkv=hkv, seed=6)
    if mask == "key-heads":  # a different key mask for every query head
        m = [torch.randn(2, 4, 1, seq, generator=torch.Generator().manual_seed(1))]
        m[0][1, 2, :, :7] = float("-inf")
    model = _check_static(OneOp("linear", 0.3, True, spec=spec), (q, k, v, *m))
    # Groups reading the same KV heads under the same key weights share one prefix sum (the
    # optimizer's CSE); a mask per head gives each group its own.
    kv_sets = {tuple(h // (4 // hkv) for h in range(g, g + per)) for g in range(0, 4, per)}
    sums = 4 // per if mask == "key-heads" else len(kv_sets)
    assert [n.op_type for n in model.graph.node].count("CumSum") == sums


def _zoo_cases():
    variants = {
        "gpt2": ["window:3,block=2", "linear:elu"],
        "llama": ["topk:blocks=1,block=2", "heads[0]=fused;heads[*]=window:2,sinks:1,block=2"],
        "bert": ["blocksparse:block=2,local=1,global=1", "linear:favor,features=16"],
        "vit": ["neighborhood:3x3,block=4", "linear:taylor"],
    }
    # The default run keeps every variant and fused on the eager forms; fused on SDPA-written and
    # torch-module forms runs in the slow step.
    slow = pytest.mark.slow
    for kind, impl in HF_CASES:
        for pol in ["fused", *variants[kind][impl == "sdpa"::2]]:
            marks = (slow,) if pol == "fused" and impl == "sdpa" else ()
            yield pytest.param(("hf", kind, impl), pol, id=f"{kind}-{impl}-{pol}", marks=marks)
    for kind in TORCH_CASES:
        for pol in ["fused", "topk:mass=0.9,block=2"]:
            yield pytest.param(("torch", kind, None), pol, id=f"{kind}-{pol}", marks=(slow,) if pol == "fused" else ())


@pytest.mark.parametrize("case,policy", list(_zoo_cases()))
def test_zoo_matches_torch_backend(case, policy):
    z = hf_model(case[1], case[2]) if case[0] == "hf" else torch_model(case[1])
    cm = compiler.compile(z.model, z.args, policy, example_kwargs=z.kwargs, show_progress=False)
    ort_run = backends.load("onnxruntime", cm.exported_program, {"intra_op_num_threads": 1})
    want = cm(*z.args, **z.kwargs)
    got = ort_run(*z.args, **{**cm.default_kwargs, **z.kwargs})
    flat_w, flat_g = torch.utils._pytree.tree_leaves(want), torch.utils._pytree.tree_leaves(got)
    assert len(flat_w) == len(flat_g)
    for w, g in zip(flat_w, flat_g):
        assert (w - g).abs().max().item() < TOL
    n_sites = sum(s.status == "rewritten" for s in cm.report.sites)
    assert n_sites == z.attention_blocks
    assert len(ort_run.exported.lowerings) == n_sites


def test_compile_with_onnxruntime_reports_lowering_and_saves(tmp_path):
    z = hf_model("llama", "eager")
    cm = compiler.compile(z.model, z.args, "fused", backend="onnxruntime", example_kwargs=z.kwargs,
                          backend_options={"intra_op_num_threads": 1}, show_progress=False)
    low = cm.report.lowering
    assert low["format"] == "onnx" and low["opset"] == 23
    # Checked end to end as onnxruntime runs it, against the original model.
    assert low["checked_against"] == "the original" and cm.report.fidelity.max_abs_error < TOL
    assert cm.report.fidelity.checked_inputs[0] == "example inputs (onnxruntime program)"
    assert all(s.lowering in ("attention", "gqa", "mha") for s in cm.report.sites)
    assert "lowered to onnx" in str(cm.report)
    path = cm.save(tmp_path / "llama.onnx")
    onnx.checker.check_model(onnx.load(path), full_check=True)
    sess = _session(onnx.load(path))
    ref = z.model(**z.kwargs, use_cache=False).last_hidden_state
    feeds = {i.name: z.kwargs[i.name].numpy() for i in sess.get_inputs()}
    got = torch.from_numpy(sess.run(None, feeds)[0])
    assert (got - ref).abs().max().item() < TOL
    # The pt2 path still writes an ExportedProgram, and it computes the same outputs.
    back = torch.export.load(cm.save(tmp_path / "llama.pt2")).module()
    assert (back(**z.kwargs, use_cache=False).last_hidden_state - ref).abs().max().item() < TOL


def test_dynamic_sequence_through_the_backend():
    z = hf_model("gpt2", "eager")
    s = torch.export.Dim("seq", min=2, max=60)
    cm = compiler.compile(z.model, (), "window:3,block=2", backend="onnxruntime", example_kwargs=z.kwargs,
                          dynamic_shapes={"input_ids": {1: s}, "attention_mask": {1: s}}, show_progress=False)
    ref = compiler.compile(z.model, (), "window:3,block=2", example_kwargs=z.kwargs,
                           dynamic_shapes={"input_ids": {1: s}, "attention_mask": {1: s}}, show_progress=False)
    g = torch.Generator().manual_seed(5)
    for n in (4, 12):
        m = torch.ones(2, n, dtype=torch.long)
        m[1, n - 2:] = 0
        kw = {"input_ids": torch.randint(0, 100, (2, n), generator=g), "attention_mask": m}
        got, want = cm(**kw).last_hidden_state, ref(**kw).last_hidden_state
        assert got.shape[1] == n
        assert (got - want).abs().max().item() < TOL


# ------------------------------------------------------------------------------ bad input


def _tiny():
    class A(torch.nn.Module):
        def forward(self, q, k, v):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)

    return A(), _inputs(16, None, hkv=4)


def test_bad_backend_options():
    model, x = _tiny()
    with pytest.raises(BackendError, match="unknown onnxruntime option.*threads"):
        compiler.compile(model, x, backend="onnxruntime", backend_options={"threads": 2}, show_progress=False)
    with pytest.raises(BackendError, match="not available here"):
        compiler.compile(model, x, backend="onnxruntime", backend_options={"providers": ["CUDAExecutionProvider"]},
                         show_progress=False)
    with pytest.raises(BackendError, match="takes no options"):
        compiler.compile(model, x, backend_options={"intra_op_num_threads": 1}, show_progress=False)


@torch.library.custom_op("attnforge_test::halve", mutates_args=())
def _halve(x: torch.Tensor) -> torch.Tensor:
    return x / 2


@_halve.register_fake
def _(x):
    return torch.empty_like(x)


class _WithCustomOp(torch.nn.Module):
    def forward(self, q, k, v):
        return torch.ops.attnforge_test.halve(F.scaled_dot_product_attention(q, k, v))


def test_op_without_onnx_translation_is_named():
    _, x = _tiny()
    ep = torch.export.export(_WithCustomOp(), x)
    with pytest.raises(BackendError, match="attnforge_test.halve.*no ONNX translation.*backend='torch'"):
        export_onnx(ep)


def test_op_without_onnx_translation_runs_on_torch():
    _, x = _tiny()
    cm = compiler.compile(_WithCustomOp(), x, backend="onnxruntime", show_progress=False)
    assert [s.backend for s in cm.plan.segments] == ["onnxruntime", "torch"]
    torch.testing.assert_close(cm(*x), _WithCustomOp()(*x), atol=1e-5, rtol=0)


def test_neighborhood_needs_static_shapes():
    mod = OneOp("sparse", 0.3, False, spec="neighborhood:3x3,block=8")
    with pytest.raises(BackendError, match="neighborhood attention needs a fixed sequence length"):
        _export_dynamic(mod, None, seq=36)


def test_wrong_inputs_at_run_time():
    model, x = _tiny()
    cm = compiler.compile(model, x, backend="onnxruntime", show_progress=False)
    with pytest.raises(InputError, match="onnxruntime could not run these inputs"):
        cm(x[0][:, :, :, :8], x[1], x[2])
    with pytest.raises(InputError, match="not structured like the example inputs"):
        cm(x[0], x[1])
