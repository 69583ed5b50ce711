"""The exported graph's optimizer (backends.onnx_export.optimize) against onnxscript's own."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest
import torch
from onnxscript import optimizer
from onnxscript.rewriter import onnx_fusions

from backends.onnx_export import OPSET, optimize
from tests.zoo import hf_model


def _unoptimized(model, args, kwargs=None) -> ir.Model:
    ep = torch.export.export(model, args, kwargs or {})
    return torch.onnx.export(ep, (), dynamo=True, opset_version=OPSET, optimize=False, verbose=False).model


def _copy(model: ir.Model) -> ir.Model:
    return ir.serde.deserialize_model(ir.serde.serialize_model(model))


def _ops(model: ir.Model) -> list:
    return [(n.domain, n.op_type, len(n.inputs), len(n.outputs)) for n in model.graph]


def _run(model: ir.Model, feeds: dict) -> list:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    sess = ort.InferenceSession(ir.serde.serialize_model(model).SerializeToString(), opts,
                                providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


@pytest.mark.parametrize("kind", ["llama", "gpt2", "bert"])
def test_same_graph_as_the_exporters_optimizer(kind, one_thread):
    zoo = hf_model(kind, "sdpa")
    kwargs = {**zoo.kwargs, **({"use_cache": False} if zoo.causal else {})}
    raw = _unoptimized(zoo.model, zoo.args, kwargs)
    ours, theirs = _copy(raw), _copy(raw)
    optimize(ours)
    # The reference: what torch.onnx.export(..., optimize=True) runs (optimize_ir, then fusions).
    # The rule left out rewrites none of these graphs; the rest must give the same graph.
    optimizer.optimize_ir(theirs)
    onnx_fusions.fuse(theirs)
    assert _ops(ours) == _ops(theirs)
    assert len(_ops(ours)) < len(_ops(raw))  # it did fold and fuse
    if kind == "llama":
        assert "RMSNormalization" in {op for _, op, _, _ in _ops(ours)}  # the exporter's fusions ran
    feeds = {v.name: t.numpy() for v, t in zip(ours.graph.inputs, zoo.kwargs.values())}
    with torch.no_grad():
        want = zoo.model(**kwargs)[0].numpy()
    np.testing.assert_allclose(_run(ours, feeds)[0], want, atol=2e-5, rtol=1e-4)
