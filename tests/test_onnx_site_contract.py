"""The ONNX front end keeps the same site contract as the PyTorch one: variant legality,
``layers.N`` selectors by layer, and grid variants on files with fixed shapes."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

import compiler
from compiler.ir.errors import PolicyError
from compiler.driver.onnx_program import rewrite_onnx
from test_onnx_fusion import _export, _feeds
from zoo import hf_model


@pytest.fixture(scope="module")
def bert():
    return hf_model("bert", "eager")


@pytest.fixture(scope="module", params=[True, False], ids=["dynamo", "torchscript"])
def bert_onnx(request, bert, tmp_path_factory):
    return _export(bert, "bert", request.param, tmp_path_factory.mktemp("bert"))


def _torch_error(z, policy) -> str:
    with pytest.raises(PolicyError) as e:
        compiler.compile(z.model, z.args, policy, example_kwargs=z.kwargs)
    return str(e.value)


def test_illegal_head_mix_is_the_same_policy_error_on_both_front_ends(bert, bert_onnx, one_thread):
    policy = "heads[0-5]=fused; heads[*]=window:2,block=2"  # the site has 4 heads
    on_torch = _torch_error(bert, policy)
    with pytest.raises(PolicyError) as e:
        rewrite_onnx(bert_onnx, policy, feeds=_feeds(bert_onnx, bert))
    # Same complaint about the heads; the module path names the same layer.
    assert on_torch.split(": ", 1)[1] == str(e.value).split(": ", 1)[1]
    assert "encoder.layer.0.attention" in str(e.value)


class _Attend(torch.nn.Module):
    def __init__(self, dim=16, heads=2):
        super().__init__()
        self.heads, self.proj = heads, torch.nn.Linear(dim, 3 * dim)

    def forward(self, x, ctx):
        b, s, d = x.shape
        q = self.proj(x)[..., :d].view(b, s, self.heads, -1).transpose(1, 2)
        k, v = (t.view(b, ctx.shape[1], self.heads, -1).transpose(1, 2)
                for t in self.proj(ctx)[..., d:].split(d, dim=-1))
        p = torch.softmax(q @ k.transpose(-1, -2) / (d // self.heads) ** 0.5, dim=-1)
        return (p @ v).transpose(1, 2).reshape(b, s, d)


class _Layer(torch.nn.Module):
    """Two attention sites per layer (self and cross), so site index and layer differ."""

    def __init__(self):
        super().__init__()
        self.self_attn, self.cross_attn = _Attend(), _Attend()

    def forward(self, x, mem):
        x = x + self.self_attn(x, x)
        return x + self.cross_attn(x, mem)


class _Decoder(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = torch.nn.ModuleList([_Layer(), _Layer()])

    def forward(self, x, mem):
        for layer in self.layers:
            x = layer(x, mem)
        return x


@pytest.mark.parametrize("dynamo", [True, False], ids=["dynamo", "torchscript"])
def test_layer_selectors_select_by_layer_on_both_front_ends(dynamo, tmp_path, one_thread):
    torch.manual_seed(0)
    model = _Decoder().eval()
    args = (torch.randn(1, 8, 16), torch.randn(1, 8, 16))
    path = tmp_path / "dec.onnx"
    torch.onnx.export(model, args, str(path), dynamo=dynamo, input_names=["x", "mem"])
    onnx_model = onnx.load(path)
    feeds = {"x": args[0].numpy(), "mem": args[1].numpy()}
    policy = {"*": "fused", "layers.1": "window:2,block=2"}
    cm = compiler.compile(model, args, policy)
    rw = rewrite_onnx(onnx_model, policy, feeds=feeds)
    on_torch = [(s.layer, s.variant) for s in cm.report.sites]
    on_onnx = [(s.layer, s.variant) for s in rw.report.sites]
    assert on_torch == on_onnx
    assert [layer for layer, _ in on_onnx] == [0, 0, 1, 1]
    assert [v.startswith("window") for _, v in on_onnx] == [False, False, True, True]
    assert [s.module for s in rw.report.sites] == [s.module for s in cm.report.sites]


def test_neighborhood_on_an_onnx_file_with_a_static_grid(tmp_path, one_thread):
    z = hf_model("vit", "eager")  # 4x4 patches + CLS, fixed shapes
    model = _export(z, "vit", False, tmp_path)
    feeds = _feeds(model, z)
    rw = rewrite_onnx(model, "neighborhood:3x3,block=4", feeds=feeds)
    assert [s.status for s in rw.report.sites] == ["rewritten", "rewritten"]
    # Independent check: the torch path's program with the same variant, run eagerly.
    cm = compiler.compile(z.model, z.args, "neighborhood:3x3,block=4", example_kwargs=z.kwargs)
    want = cm(*z.args, **z.kwargs).last_hidden_state.detach().numpy()
    sess = ort.InferenceSession(rw.model.SerializeToString(), providers=["CPUExecutionProvider"])
    got = sess.run(None, feeds)[0]
    assert np.abs(got - want).max() < 1e-4
    # The variant changed the numbers (it is not exact attention) yet agrees across front ends.
    exact = z.model(*z.args, **z.kwargs).last_hidden_state.detach().numpy()
    assert np.abs(exact - want).max() > 1e-4
