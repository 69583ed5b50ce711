"""The onnxruntime backend's sparse lowering against the eager reference, on the
hypothesis-generated problems of test_sparse (shapes, GQA, causal and bidirectional, every mask
form, rows with nothing kept), exported at the problem's own static shapes: the shapes where the
lowering drops its Pad (lengths filling whole blocks) and its NaN fix (no row can be empty)."""

from __future__ import annotations

import onnxruntime as ort
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from backends.onnx_export import export_onnx
from compiler.reference.sparse_ops import sparse_attention_reference
from compiler.variants.language import parse_variant
from test_sparse import SETTINGS, problems

pytestmark = pytest.mark.usefixtures("one_thread")


class SparseOp(torch.nn.Module):
    def __init__(self, spec: str, scale: float, causal: bool, softcap: float = 0.0):
        super().__init__()
        self.spec, self.scale, self.causal, self.softcap = spec, scale, causal, softcap

    def forward(self, q, k, v, mask=None):
        return torch.ops.attnforge.sparse_attention(q, k, v, mask, self.scale, self.causal, self.softcap, self.spec)


def _check(p, text: str, softcap: float = 0.0):
    text = parse_variant(text).text
    q, k, v, m = p["q"], p["k"], p["v"], p["mask"]
    args = (q, k, v) if m is None else (q, k, v, m)
    mod = SparseOp(text, p["scale"], p["causal"], softcap)
    model = export_onnx(torch.export.export(mod, args)).model
    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.intra_op_num_threads = 1
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    got = torch.from_numpy(sess.run(None, {i.name: t.numpy() for i, t in zip(sess.get_inputs(), args)})[0])
    want = sparse_attention_reference(q, k, v, m, p["scale"], p["causal"], softcap, text)
    assert torch.isfinite(got).all(), text
    assert float((got - want).abs().max()) <= 1e-5, text


@settings(max_examples=6, **SETTINGS)
@given(p=problems(), left=st.integers(0, 20), right=st.one_of(st.none(), st.integers(0, 10)),
       sinks=st.integers(0, 5), block=st.sampled_from([4, 8, 16]), softcap=st.sampled_from([0.0, 5.0]))
def test_window_lowering(p, left, right, sinks, block, softcap):
    _check(p, f"window:{left},right={'auto' if right is None else right},sinks={sinks},block={block}", softcap)


@settings(max_examples=3, **SETTINGS)
@given(p=problems(), left=st.integers(0, 20), dilation=st.integers(1, 3), block=st.sampled_from([4, 8]))
def test_dilated_lowering(p, left, dilation, block):
    _check(p, f"dilated:{left},dilation={dilation},block={block}")


@settings(max_examples=3, **SETTINGS)
@given(p=problems(), blocks=st.integers(1, 3), block=st.sampled_from([4, 8]), local=st.integers(0, 1),
       sinks=st.integers(0, 1))
def test_topk_lowering(p, blocks, block, local, sinks):
    _check(p, f"topk:blocks={blocks},block={block},local={local},sinks={sinks}")
