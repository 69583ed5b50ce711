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
from compiler.errors import AttnforgeError

ATTN = torch.ops.attnforge.attention.default
B, H, S, D = 2, 2, 6, 4


def _g(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _qkv(dtype=torch.float32, b=B, h=H, s=S):
    return tuple(torch.randn(b, h, s, D, generator=_g(i)).to(dtype) for i in (1, 2, 3))


def _eager(model, *args):
    with torch.no_grad():
        return model(*args)


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
