"""Every backend keeps one contract (backends.protocol), and the driver reads lowerings through it."""

import dataclasses

import pytest
import torch
from torch import nn

import backends
import compiler
from backends.protocol import Backend, LoweringSummary, Runner
from compiler.ir.errors import BackendError


class Attention(nn.Module):
    def __init__(self):
        super().__init__()
        self.qkv = nn.Linear(16, 48)

    def forward(self, x):
        b, s, _ = x.shape
        q, k, v = self.qkv(x).view(b, s, 3, 2, 8).permute(2, 0, 3, 1, 4)
        w = torch.softmax(q @ k.transpose(-1, -2) * 8 ** -0.5, dim=-1)
        return (w @ v).transpose(1, 2).reshape(b, s, 16)


@pytest.fixture(scope="module")
def compiled():
    torch.manual_seed(0)
    m, x = Attention().eval(), torch.randn(2, 6, 16)
    return m, x, compiler.compile(m, (x,), "fused", backend="onnxruntime")


@pytest.mark.parametrize("name", backends.AVAILABLE)
def test_every_backend_keeps_the_protocol(name):
    b = backends.get(name)
    assert isinstance(b, Backend) and b.name == name
    assert dataclasses.is_dataclass(b.options_type)
    assert isinstance(b.parse_options(None), b.options_type)
    with pytest.raises(BackendError, match="nonsense"):
        b.parse_options({"nonsense": 1})


def test_an_unknown_backend_is_one_line():
    with pytest.raises(BackendError, match="unknown backend 'tpu'; valid backends: torch, onnxruntime, triton"):
        backends.get("tpu")


def test_runners_hold_their_plan_and_say_what_they_lowered(compiled):
    m, x, cm = compiled
    torch_run = backends.load("torch", cm.exported_program)
    assert isinstance(torch_run, Runner) and torch_run.plan.segments
    assert torch_run.lowering_summary() is None  # nothing lowered: the reference ops run as they are
    ort = cm._run
    assert isinstance(ort, Runner) and ort.plan is cm.plan and ort.plan.segments[0].backend == "onnxruntime"
    s = ort.lowering_summary()
    assert isinstance(s, LoweringSummary) and s.format == "onnx"
    assert set(s.lowerings) == {site.id for site in cm.report.sites}
    assert torch.allclose(ort(x), m(x), atol=1e-5)


def test_the_report_lowering_keeps_its_schema(compiled):
    _, _, cm = compiled
    low = cm.report.lowering
    assert list(low) == ["format", "opset", "providers", "export_seconds", "onnx_segments", "checked_against",
                         "max_abs_error_vs_torch", "tolerance_vs_torch", "matches_torch", "rounding_of_original"]
    assert low["format"] == "onnx" and low["onnx_segments"] == 1
    # An exact rewrite on onnxruntime is checked end to end as onnxruntime runs it, against the original.
    assert low["checked_against"] == "the original" and low["max_abs_error_vs_torch"] is None
    assert low["rounding_of_original"] is None  # within the exact tolerance: not measured
    assert cm.report.fidelity.passed is True and cm.report.fidelity.checked_inputs[0] == "example inputs (onnxruntime program)"
    assert all(site.lowering for site in cm.report.sites)
