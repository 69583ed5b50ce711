"""PyTorch Inductor's attention-pattern suite, ported (tests/inductor_patterns.py): attnforge must
find and rewrite every pattern Inductor fuses on CPU, exactly, and leave its negative cases alone.

Compiled with ``verify=False`` so that nothing rolls a wrong rewrite back: the comparison with
the ORIGINAL module's eager output here, on the example inputs and on fresh ones (other q/k/v,
other padding, other bias), is the check. Inductor's own counts: tools/bench_discovery_inductor.py.
"""

from __future__ import annotations

import pytest
import torch

import compiler
from compare import max_err
from inductor_patterns import BEYOND, NEGATIVE, PATTERNS, fresh_inputs, module_for

ATTN = torch.ops.attnforge.attention.default


def _compile(p):
    model, x = module_for(p), p.inputs()
    cm = compiler.compile(model, x, verify=False, show_progress=False)
    fused = [n for n in cm.exported_program.graph.nodes if n.target == ATTN]
    return model, x, cm, fused


@pytest.mark.parametrize("p", PATTERNS + BEYOND, ids=lambda p: p.name)
def test_pattern_found_and_exact(p):
    model, x, cm, fused = _compile(p)
    assert [s.status for s in cm.report.sites] == ["rewritten"], cm.report.rejected
    assert len(fused) == 1
    assert not any(n.target in (torch.ops.aten.softmax.int, torch.ops.aten._safe_softmax.default)
                   for n in cm.exported_program.graph.nodes)
    with torch.no_grad():
        for inputs in (x, fresh_inputs(p)):
            assert max_err(model(*inputs), cm(*inputs)) <= p.atol


@pytest.mark.parametrize("p", NEGATIVE, ids=lambda p: p.name)
def test_negative_case_unmatched(p):
    model, x, cm, fused = _compile(p)
    assert not fused and not cm.report.sites
    assert len(cm.report.rejected) == 1 and cm.report.rejected[0]["reason"]
    with torch.no_grad():
        assert max_err(model(*x), cm(*x)) == 0.0
