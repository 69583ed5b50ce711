"""The pass manager's contract: typed results, conditions checked, failures that name the pass."""

import json

import pytest
import torch
from torch import nn

from compiler.ir.errors import PolicyError
from compiler.ir.graph import count_nodes
from compiler.driver.pipeline import Pass, PassContext, PassManager, exact_pipeline, variant_pipeline
from compiler.variants.policy import parse_policy
from compiler.ir.program import clone_program
from compiler.report.data import PassRecord, Report
from passes.infra import PassConditionError, PassError, PassResult


class TwoLayers(nn.Module):
    def __init__(self):
        super().__init__()
        self.q, self.k, self.v = nn.Linear(16, 16), nn.Linear(16, 16), nn.Linear(16, 16)

    def forward(self, x):
        b, s, _ = x.shape
        q, k, v = (p(x).view(b, s, 2, 8).transpose(1, 2) for p in (self.q, self.k, self.v))
        w = torch.softmax(q @ k.transpose(-1, -2) / 8 ** 0.5, dim=-1)
        y = (w @ v).transpose(1, 2).reshape(b, s, 16)
        return y + x, torch.softmax(y, dim=-1)  # the second softmax is not attention


@pytest.fixture(scope="module")
def program():
    torch.manual_seed(0)
    return torch.export.export(TwoLayers().eval(), (torch.randn(2, 5, 16),))


def _ctx(ep, policy="fused"):
    return PassContext(clone_program(ep), parse_policy(policy))


def test_an_exception_inside_a_pass_names_the_pass(program):
    def boom(ctx):
        raise ValueError("the rule met an op it does not know")

    pm = PassManager([Pass("dead_code_elimination", exact_pipeline().passes[0].run), Pass("my_rewrite", boom)])
    with pytest.raises(PassError) as e:
        pm.run(_ctx(program))
    assert e.value.pass_name == "my_rewrite"
    assert "my_rewrite" in str(e.value) and "op it does not know" in str(e.value)
    assert isinstance(e.value.__cause__, ValueError)


def test_a_users_mistake_inside_a_pass_is_not_wrapped(program):
    # layers.9 selects no layer of this one-layer model: the fusion pass's policy check says so.
    with pytest.raises(PolicyError):
        exact_pipeline().run(_ctx(program, "layers.9:window:2"))


def test_a_pass_must_return_a_pass_result(program):
    with pytest.raises(PassError, match="legacy.*not a PassResult"):
        PassManager([Pass("legacy", lambda c: {"removed_nodes": 0})]).run(_ctx(program))


def test_a_postcondition_violation_is_caught_and_names_the_pass(program):
    def drop_an_output(ctx):
        out = next(n for n in ctx.ep.graph.nodes if n.op == "output")
        out.args = (out.args[0][:1],)  # the signature still names two outputs
        return PassResult(changed=True)

    with pytest.raises(PassConditionError) as e:
        PassManager([Pass("drop_an_output", drop_an_output)]).run(_ctx(program))
    assert e.value.pass_name == "drop_an_output" and e.value.condition == "output specs in sync"
    assert "returns 1 values but the signature names 2" in str(e.value)


def test_a_graph_that_no_longer_lints_is_caught(program):
    def use_before_definition(ctx):
        g = ctx.ep.graph
        out = next(n for n in g.nodes if n.op == "output")
        last = out.args[0][0]
        first = next(n for n in g.nodes if n.op == "call_function")
        first.args = (last, *first.args[1:])  # a cycle: the first op reads the last
        return PassResult(changed=True)

    with pytest.raises(PassConditionError) as e:
        PassManager([Pass("cycle", use_before_definition)]).run(_ctx(program))
    assert e.value.pass_name == "cycle" and e.value.condition == "graph lint"


def test_records_match_the_program_and_keep_the_schema(program):
    ctx = _ctx(program, "window:2")
    records = exact_pipeline().run(ctx)
    assert [r.name for r in records] == [
        "dead_code_elimination", "canonicalize", "constant_folding", "common_subexpression_elimination",
        "attention_discovery", "attention_fusion", "layout_cleanup", "dead_code_elimination"]
    for a, b in zip(records, records[1:]):
        assert a.nodes_after == b.nodes_before  # node counts chain: each pass starts where the last stopped
    assert records[-1].nodes_after == count_nodes(ctx.ep.graph_module)
    by = {r.name: r for r in records}
    assert (by["attention_discovery"].sites_found, by["attention_discovery"].details) == (1, {"rejected_softmax": 1})
    assert by["attention_fusion"].sites_rewritten == 1 and by["attention_fusion"].details == {"skipped": {}}
    assert set(records[0].details) == {"removed_nodes", "pruned_state"}
    assert set(by["common_subexpression_elimination"].details) == {"merged_nodes"}
    assert all(r.seconds >= 0 for r in records)

    ctx.variants = {sid: ctx.policy.variant_for(m.site) for m in ctx.discovery.matches for sid in [m.site.id]}
    (variants, dce) = variant_pipeline().run(ctx)
    assert variants.sites_rewritten == 1 and list(variants.details) == ["variants"]
    assert "window" in next(iter(variants.details["variants"].values()))
    # The records round-trip through the report's JSON reader unchanged.
    back = Report.from_dict(json.loads(json.dumps(Report(model="m", policy="window:2", backend="torch", passes=records).to_dict()))).passes
    assert back == records and all(isinstance(r, PassRecord) for r in back)


def test_a_left_out_pass_is_recorded_and_not_run(program):
    ctx = _ctx(program)
    ctx.skip_passes = {"layout_cleanup"}
    (cleanup,) = [r for r in exact_pipeline().run(ctx) if r.name == "layout_cleanup"]
    assert cleanup.details == {"left_out": "with it the program failed end-to-end verification"}
    assert cleanup.nodes_before == cleanup.nodes_after and cleanup.seconds == 0.0
