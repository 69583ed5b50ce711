"""Never a wrong answer (issue 14, sections 1 and 2): each case once returned a wrong program or crashed.

Every check compares the compiled program with the ORIGINAL module in eager mode, on the
example inputs and on inputs the example did not cover (other padding, fully masked rows).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import compiler
from compare import max_err
from compiler.ir.errors import AttnforgeError

ATTN = torch.ops.attnforge.attention.default
B, H, S, D = 2, 2, 6, 4


def _g(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _qkv(dtype=torch.float32, b=B, h=H, s=S):
    return tuple(torch.randn(b, h, s, D, generator=_g(i)).to(dtype) for i in (1, 2, 3))


def _eager(model, *args):
    with torch.no_grad():
        return model(*args)


def _scalar(x: float, like: torch.Tensor) -> torch.Tensor:
    """A 0-d tensor in ``like``'s dtype (a Python float would make a float32 tensor: finfo(float64).min overflows)."""
    return torch.full((), x, dtype=like.dtype)


def _statuses(cm):
    return {s.id: (s.status, s.reason) for s in cm.report.sites}


# ----------------------------------------------------------------------------- 1. ignored operand


class BaddbmmEmpty(nn.Module):
    """Megatron / diffusers: baddbmm(empty, q, kT, beta=0, alpha=scale) ignores its input."""

    def forward(self, q, k, v, buf):
        b, h, s, d = q.shape
        qf, kf, vf = (x.reshape(b * h, s, d) for x in (q, k, v))
        scores = torch.baddbmm(buf, qf, kf.transpose(1, 2), beta=0.0, alpha=1.0 / math.sqrt(d))
        return torch.bmm(torch.softmax(scores, -1), vf).view(b, h, s, d)


def test_baddbmm_beta_zero_never_reads_its_input():
    m = BaddbmmEmpty()
    q, k, v = _qkv()
    clean = torch.zeros(B * H, S, S)
    cm = compiler.compile(m, (q, k, v, clean))
    assert [s.status for s in cm.report.sites] == ["rewritten"]
    # Memory left over from an earlier call: the original ignores it, so must we.
    dirty = torch.full((B * H, S, S), float("nan"))
    got = cm(q, k, v, dirty)
    assert not torch.isnan(got).any()
    assert max_err(_eager(m, q, k, v, dirty), got) <= 1e-5


# ----------------------------------------------------------------------------- 2. causal + padding in one mask


class CausalPadMaskedFill(nn.Module):
    """masked_fill(~(tril & pad), finfo.min): a row whose visible keys are all padding is uniform."""

    def forward(self, q, k, v, attention_mask):
        s = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
        sq, sk = s.shape[-2], s.shape[-1]
        tril = torch.tril(torch.ones(sq, sk, dtype=torch.bool))
        keep = tril[None, None] & attention_mask[:, None, None, :].bool()
        s = s.masked_fill(~keep, torch.finfo(s.dtype).min)
        return torch.softmax(s, -1) @ v


class CausalPadAdditive(nn.Module):
    """HF style: scores + where(tril & pad, 0, finfo.min)."""

    def forward(self, q, k, v, attention_mask):
        s = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
        sq, sk = s.shape[-2], s.shape[-1]
        causal = torch.arange(sq)[:, None] >= torch.arange(sk)[None, :]
        keep = causal[None, None] & attention_mask[:, None, None, :].bool()
        bias = torch.where(keep, _scalar(0.0, s), _scalar(torch.finfo(s.dtype).min, s))
        return torch.softmax(s + bias, -1) @ v


class CausalFinitePadInf(nn.Module):
    """Causal with a finite fill, padding with -inf: the causal part must stay in the mask."""

    def forward(self, q, k, v, attention_mask):
        s = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
        sq, sk = s.shape[-2], s.shape[-1]
        s = s.masked_fill(~torch.tril(torch.ones(sq, sk, dtype=torch.bool)), torch.finfo(s.dtype).min)
        s = s.masked_fill(~attention_mask[:, None, None, :].bool(), float("-inf"))
        return torch.softmax(s, -1) @ v


def _right_padded(b=B, s=S):
    m = torch.ones(b, s, dtype=torch.long)
    m[-1, -2:] = 0
    return m


def _left_padded(b=B, s=S):
    m = torch.ones(b, s, dtype=torch.long)
    m[0, :2] = 0  # rows 0 and 1 of batch 0 see only padding
    m[-1, :] = 0  # batch 1: every key padded
    return m


@pytest.mark.parametrize("model", [CausalPadMaskedFill, CausalPadAdditive, CausalFinitePadInf])
def test_causal_and_padding_keep_fully_masked_rows(model):
    m = model()
    q, k, v = _qkv()
    cm = compiler.compile(m, (q, k, v, _right_padded()))
    assert [s.status for s in cm.report.sites] == ["rewritten"], _statuses(cm)
    # The verification itself went beyond the (right-padded) example.
    assert any("left-padded" in c for c in cm.report.fidelity.checked_inputs)
    for mask in (_right_padded(), _left_padded()):
        ref, got = _eager(m, q, k, v, mask), cm(q, k, v, mask)
        defined = ~torch.isnan(ref)  # softmax over a row of -inf: NaN in eager, zeros by contract
        assert max_err(ref[defined], got[defined]) <= 1e-5


def test_causal_and_padding_keeps_causal_speedup():
    """The row-level semantics are restored next to is_causal, not by dropping it."""
    cm = compiler.compile(CausalPadAdditive(), (*_qkv(), _right_padded()))
    assert cm.report.sites[0].causal


# ----------------------------------------------------------------------------- 3. meaning outside attention


class QuantizedProjection(nn.Module):
    """A uint8 weight reinterpreted as int8 (a bit cast, not an identity view), then attention."""

    def __init__(self):
        super().__init__()
        self.register_buffer("qweight", torch.randint(0, 256, (D, D), generator=_g(7), dtype=torch.uint8))
        self.scale = 0.05

    def forward(self, q, k, v):
        w = self.qweight.view(torch.int8).float() * self.scale
        out = F.scaled_dot_product_attention(q, k, v)
        return out @ w


def test_layout_cleanup_keeps_bit_reinterpretation():
    m = QuantizedProjection()
    q, k, v = _qkv()
    cm = compiler.compile(m, (q, k, v))
    assert [s.status for s in cm.report.sites] == ["rewritten"], _statuses(cm)
    assert cm.report.fidelity.passed
    assert max_err(_eager(m, q, k, v), cm(q, k, v)) <= 1e-5
    targets = {n.target for n in cm.exported_program.graph.nodes}
    assert torch.ops.aten.view.dtype in targets


def _double_output(ep):
    """A broken pass: changes the program's meaning outside attention."""
    out = next(n for n in ep.graph.nodes if n.op == "output")
    first = out.args[0][0]
    with ep.graph.inserting_before(out):
        doubled = ep.graph.call_function(torch.ops.aten.mul.Tensor, (first, 2.0))
    doubled.meta["val"] = first.meta["val"]
    out.args = ((doubled, *out.args[0][1:]),)
    ep.graph_module.recompile()
    from passes.infra import PassResult

    return PassResult(changed=True)


def test_a_pass_that_breaks_the_program_is_left_out(monkeypatch):
    import passes.layout

    monkeypatch.setattr(passes.layout, "layout_cleanup", _double_output)
    m = QuantizedProjection()
    q, k, v = _qkv()
    cm = compiler.compile(m, (q, k, v))
    assert cm.report.fidelity.passed
    assert max_err(_eager(m, q, k, v), cm(q, k, v)) <= 1e-5
    (cleanup,) = [p for p in cm.report.passes if p.name == "layout_cleanup"]
    assert "left_out" in cleanup.details
    assert [s.status for s in cm.report.sites] == ["rewritten"]  # the innocent site stays rewritten


def test_a_program_that_fails_verification_is_never_returned_or_written(monkeypatch, tmp_path):
    import passes.dce
    from compiler.cli import main
    from compiler.ir.errors import VerificationError

    monkeypatch.setattr(passes.dce, "dead_code_elimination", _double_output)
    m = QuantizedProjection()
    q, k, v = _qkv()
    with pytest.raises(VerificationError):
        compiler.compile(m, (q, k, v))
    src, out = tmp_path / "m.pt2", tmp_path / "out.pt2"
    torch.export.save(torch.export.export(m, (q, k, v)), src)
    assert main(["rewrite", str(src), "-o", str(out), "-q"]) == 2
    assert not out.exists() and not (tmp_path / "out.pt2.plan.json").exists()


# ----------------------------------------------------------------------------- 4. precision follows the original


class PadAdditive(nn.Module):
    """where(keep, 0, finfo(dtype).min) added to the scores, in the inputs' dtype."""

    def forward(self, q, k, v, attention_mask):
        s = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
        keep = attention_mask[:, None, None, :].bool()
        bias = torch.where(keep, _scalar(0.0, s), _scalar(torch.finfo(s.dtype).min, s))
        return torch.softmax(s + bias, -1) @ v


@pytest.mark.parametrize("model", [PadAdditive, CausalPadAdditive])
def test_float64_site_computes_in_float64(model):
    m = model()
    q, k, v = _qkv(torch.float64)
    cm = compiler.compile(m, (q, k, v, _right_padded()))
    assert [s.status for s in cm.report.sites] == ["rewritten"], _statuses(cm)
    for mask in (_right_padded(), _left_padded()):
        ref, got = _eager(m, q, k, v, mask), cm(q, k, v, mask)
        assert got.dtype == torch.float64
        assert max_err(ref, got) <= 1e-12  # fp32 arithmetic would be ~1e-7 off


# ----------------------------------------------------------------------------- 5. no cascade


class WrongShiftThenAttention(nn.Module):
    """A hand softmax shifted by the max over the WRONG axis (not a softmax), then real attention."""

    def forward(self, q, k, v):
        s = q @ k.transpose(-2, -1) / math.sqrt(D)
        e = torch.exp(s - s.amax(-2, keepdim=True))
        x = (e / e.sum(-1, keepdim=True)) @ v + q
        return F.softmax(x @ k.transpose(-2, -1) / math.sqrt(D), -1) @ v


def test_one_wrong_site_costs_one_site():
    m = WrongShiftThenAttention()
    q, k, v = _qkv()
    cm = compiler.compile(m, (q, k, v))
    assert max_err(_eager(m, q, k, v), cm(q, k, v)) <= 1e-5
    assert cm.report.fidelity.passed
    last = cm.report.sites[-1]
    assert last.status == "rewritten", _statuses(cm)  # the real attention downstream is not rolled back


# ----------------------------------------------------------------------------- 6. crashes become rollbacks or work


class NanoGPTAttention(nn.Module):
    def __init__(self, c=8, h=2):
        super().__init__()
        self.c_attn = nn.Linear(c, 3 * c)
        self.c_proj = nn.Linear(c, c)
        self.h = h

    def forward(self, x):
        b, t, c = x.size()
        q, k, v = self.c_attn(x).split(c, dim=2)
        q, k, v = (z.view(b, t, self.h, c // self.h).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        y = y.transpose(1, 2).contiguous().view(b, t, c)  # export drops the no-op .contiguous()
        return self.c_proj(y)


def _x():
    return (torch.randn(B, S, 8, generator=_g(4)),)


def test_nanogpt_output_layout():
    torch.manual_seed(0)
    m = NanoGPTAttention().eval()
    cm = compiler.compile(m, _x())
    assert [s.status for s in cm.report.sites] == ["rewritten"], _statuses(cm)
    assert max_err(_eager(m, *_x()), cm(*_x())) <= 1e-5


def test_a_site_that_fails_at_run_time_is_rolled_back_with_the_reason(monkeypatch):
    import passes.attention_fusion as fusion

    monkeypatch.setattr(fusion, "_match_strides", lambda build, out, target: out)  # the layout bug, back
    torch.manual_seed(0)
    m = NanoGPTAttention().eval()
    cm = compiler.compile(m, _x())
    (site,) = cm.report.sites
    assert site.status == "rolled_back" and "fails" in site.reason, _statuses(cm)
    assert max_err(_eager(m, *_x()), cm(*_x())) <= 1e-5


def test_a_site_that_fails_to_rewrite_is_kept_dense_with_the_reason(monkeypatch):
    import passes.attention_fusion as fusion

    real = fusion.rewrite_site

    def flaky(gm, m):
        if m.site.id == "attn.0":
            raise RuntimeError("boom")
        return real(gm, m)

    monkeypatch.setattr(fusion, "rewrite_site", flaky)
    m = WrongShiftThenAttention()
    q, k, v = _qkv()
    cm = compiler.compile(m, (q, k, v))
    st = _statuses(cm)
    assert st["attn.0"][0] == "skipped" and "boom" in st["attn.0"][1]
    assert max_err(_eager(m, q, k, v), cm(q, k, v)) <= 1e-5


class AlibiBaddbmm(nn.Module):
    """BLOOM: baddbmm(alibi[B*H, 1, S], q, kT, beta=1, alpha) viewed to 4-D, plus a padding mask."""

    def forward(self, q, k, v, alibi, attention_mask):
        b, h, s, d = q.shape
        qf, kf, vf = (x.reshape(b * h, s, d) for x in (q, k, v))
        scores = torch.baddbmm(alibi, qf, kf.transpose(1, 2), beta=1.0, alpha=1.0 / math.sqrt(d))
        scores = scores.view(b, h, s, s)
        bias = torch.where(attention_mask[:, None, None, :].bool(), 0.0, torch.finfo(scores.dtype).min)
        p = torch.softmax(scores + bias, -1).view(b * h, s, s)
        return torch.bmm(p, vf).view(b, h, s, d)


def test_alibi_bias_in_the_flat_layout():
    m = AlibiBaddbmm()
    q, k, v = _qkv()
    alibi = torch.randn(B * H, 1, S, generator=_g(6))
    cm = compiler.compile(m, (q, k, v, alibi, _right_padded()))
    assert [s.status for s in cm.report.sites] == ["rewritten"], _statuses(cm)
    for mask in (_right_padded(), _left_padded()):
        assert max_err(_eager(m, q, k, v, alibi, mask), cm(q, k, v, alibi, mask)) <= 1e-5


class ChainedSites(nn.Module):
    """One site's output is the next site's query, with nothing in between."""

    def forward(self, q, k, v):
        x = F.softmax(q @ k.transpose(-2, -1) / math.sqrt(D), -1) @ v
        return F.softmax(x @ k.transpose(-2, -1) / math.sqrt(D), -1) @ v


def test_chained_sites_both_rewritten():
    m = ChainedSites()
    q, k, v = _qkv()
    cm = compiler.compile(m, (q, k, v))
    assert [s.status for s in cm.report.sites] == ["rewritten", "rewritten"], _statuses(cm)
    assert sum(n.target == ATTN for n in cm.exported_program.graph.nodes) == 2
    assert "aten.softmax.int" not in {str(n.target) for n in cm.exported_program.graph.nodes}
    assert max_err(_eager(m, q, k, v), cm(q, k, v)) <= 1e-5


class LowPrecisionHF(nn.Module):
    """HF eager in bf16/fp16: scale and mask in the model's dtype, softmax in fp32, back to the dtype."""

    def forward(self, q, k, v, attention_mask):
        s = torch.matmul(q, k.transpose(2, 3)) * (1 / math.sqrt(q.shape[-1]))
        keep = attention_mask[:, None, None, :].bool()
        s = s + torch.where(keep, _scalar(0.0, s), _scalar(torch.finfo(s.dtype).min, s))
        return torch.softmax(s, -1, dtype=torch.float32).to(q.dtype) @ v


@pytest.mark.parametrize("dt", [torch.float16, torch.bfloat16])
def test_low_precision_site_rounds_like_the_model(dt):
    m = LowPrecisionHF()
    q, k, v = (torch.randn(2, 2, 32, 24, generator=_g(i)).mul(2).to(dt) for i in (1, 2, 3))
    mask = _right_padded(2, 32)
    cm = compiler.compile(m, (q, k, v, mask))
    site = cm.report.sites[0]
    if site.status == "rewritten":
        # Rounding where the model rounds: far inside the dtype's tolerance (fp32 scaling was ~5e-2 off in bf16).
        assert max_err(_eager(m, q, k, v, mask).float(), cm(q, k, v, mask).float()) <= 1e-2
    else:  # fp16's finfo.min does not absorb scores: fully padded rows are not uniform in the model
        assert dt == torch.float16 and "fully masked" in site.reason, _statuses(cm)
    assert max_err(_eager(m, q, k, v, mask).float(), cm(q, k, v, mask).float()) <= 1e-2


def test_a_matcher_failure_leaves_the_softmax_dense_with_the_reason(monkeypatch):
    from passes.attention_discovery import _Matcher

    def broken(self, node, idx):
        raise IndexError("tuple index out of range")

    monkeypatch.setattr(_Matcher, "match_softmax", broken)
    m = ChainedSites()
    q, k, v = _qkv()
    cm = compiler.compile(m, (q, k, v))
    assert cm.report.sites == [] and all("matcher failed" in r["reason"] for r in cm.report.rejected)
    assert max_err(_eager(m, q, k, v), cm(q, k, v)) <= 1e-5


def test_dynamic_lengths_are_verified_too():
    m = CausalPadAdditive()
    q, k, v = _qkv()
    seq = torch.export.Dim("seq", min=2, max=16)
    dyn = ({2: seq}, {2: seq}, {2: seq}, {1: seq})
    cm = compiler.compile(m, (q, k, v, _right_padded()), dynamic_shapes=dyn)
    assert "another length (each site)" in cm.report.fidelity.checked_inputs
    assert [s.status for s in cm.report.sites] == ["rewritten"], _statuses(cm)
    q, k, v = _qkv(s=9)
    mask = torch.ones(B, 9, dtype=torch.long)
    mask[0, :4] = 0
    assert max_err(_eager(m, q, k, v, mask), cm(q, k, v, mask)) <= 1e-5


def test_example_inputs_that_do_not_fit_are_one_typed_error():
    from compiler.ir.errors import InputError

    ep = torch.export.export(ChainedSites(), _qkv())
    with pytest.raises(InputError, match="example inputs"):
        compiler.compile_program(ep, _qkv(s=S + 1))
