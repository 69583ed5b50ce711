"""The policy language: text forms, per-site targeting, head mixes, and the errors it gives."""

import pytest
import torch

import compiler
from compiler.ir.errors import PolicyError
from compiler.variants.policy import parse_policy
from compiler.variants.language import HeadMix, Linear, TopK, Window, parse_variant
from compare import max_err
from zoo import hf_model


@pytest.mark.parametrize("text,pattern", [
    ("window:256,sinks:4", Window(left=256, sinks=4)),
    ("sinks:4,window:256", Window(left=256, sinks=4)),
    ("window:left=8,right=2", Window(left=8, right=2)),
    ("topk:blocks=8,block=64", TopK(blocks=8, block=64)),
    ("topk:mass=0.9", TopK(mass=0.9)),
    ("linear:favor,features=128", Linear(map="favor", features=128)),
])
def test_text_forms(text, pattern):
    v = parse_variant(text)
    assert v.pattern == pattern
    assert parse_variant(v.text) == v  # the canonical text (the ops' spec) round-trips


def test_head_mix_forms():
    v = parse_variant("heads[0-1,3]=fused; heads[*]=window:16,sinks:2")
    assert isinstance(v.pattern, HeadMix)
    assert v.pattern.groups[0][0] == (0, 1, 3) and v.pattern.groups[1][0] is None
    d = parse_policy({"attn.0": {"heads[0-1,3]": "fused", "heads[*]": "window:16,sinks:2"}})
    assert d.rules[0][1] == v


@pytest.mark.parametrize("text,needles", [
    ("windo:3", ["'windo'", "window", "topk", "linear"]),
    ("topk:blocks=8,foo=1", ["'foo'", "blocks", "mass"]),
    ("window:abc", ["left='abc'", "whole number"]),
    ("topk:mass=2", ["mass='2'"]),
    ("neighborhood:6x6", ["odd"]),
    ("hybrid:window=8,map=elu", ["favor", "taylor"]),
    ("linear:gauss", ["'gauss'", "elu", "favor"]),
    ("heads[0-3]=linear:elu", ["head mixes"]),
    ("heads[0-3]=fused; heads[2]=window:4", ["[2]", "two groups"]),
    ("sinks:4", ["need a window"]),
])
def test_bad_variants_name_the_token_and_what_is_valid(text, needles):
    with pytest.raises(PolicyError) as e:
        parse_variant(text)
    for n in needles:
        assert n in str(e.value), str(e.value)


def test_auto_is_a_whole_model_policy():
    assert parse_policy("auto").auto
    with pytest.raises(PolicyError, match="whole model"):
        parse_policy({"*": "auto"})


def test_per_site_targeting_on_a_model():
    z = hf_model("bert", "eager")
    pol = {"*": "window:2,block=4", "layers.0": "fused", "encoder.layer.1.*": "topk:blocks=1,block=2"}
    cm = compiler.compile(z.model, z.args, pol, example_kwargs=z.kwargs)
    v = [s.variant for s in cm.report.sites]
    assert v[0] == "fused" and v[1].startswith("topk:")
    cm = compiler.compile(z.model, z.args, {"*": "fused", "attn.1": "dense"}, example_kwargs=z.kwargs)
    assert [s.status for s in cm.report.sites] == ["rewritten", "kept"]
    # Approximate sites report their own fidelity and cost.
    cm = compiler.compile(z.model, z.args, {"attn.1": "window:1,block=4"}, example_kwargs=z.kwargs)
    s = cm.report.sites[1]
    assert s.cosine_similarity is not None and s.cosine_similarity < 1.0 and s.max_abs_error > 0
    assert cm.report.sites[0].status == "kept" and cm.report.fidelity.passed is None


def test_head_mix_on_a_model_keeps_named_heads_exact():
    z = hf_model("llama", "eager")
    full = compiler.compile(z.model, z.args, "heads[0-3]=fused; heads[*]=window:1,block=4", example_kwargs=z.kwargs)
    ref = z.model(*z.args, **z.kwargs, use_cache=False)
    assert max_err(ref, full(*z.args, **z.kwargs)) <= 1e-5  # all 4 heads named: exact
    mixed = compiler.compile(z.model, z.args, "heads[0-1]=fused; heads[*]=window:1,block=4", example_kwargs=z.kwargs)
    assert max_err(ref, mixed(*z.args, **z.kwargs)) > 1e-4


@pytest.mark.parametrize("kind,policy,needles", [
    ("llama", "neighborhood:3x3", ["attn.0", "causal"]),
    ("bert", "neighborhood:3x3", ["attn.0", "not a square grid"]),
    ("bert", "heads[9]=fused; heads[*]=window:2", ["attn.0", "[9]", "4 heads"]),
    ("bert", {"layers.7": "fused"}, ["'layers.7'", "matches no attention site", "attn.0"]),
])
def test_policies_that_cannot_apply_name_the_site(kind, policy, needles):
    z = hf_model(kind, "eager")
    with pytest.raises(PolicyError) as e:
        compiler.compile(z.model, z.args, policy, example_kwargs=z.kwargs)
    for n in needles:
        assert n in str(e.value), str(e.value)


def test_linear_refuses_a_site_whose_mask_varies_per_query():
    from compiler.ir.site import AttentionSite
    from compiler.variants.language import parse_variant
    from passes.attention_variants import check_variant

    site = AttentionSite("attn.3", "m", "M", "sdpa", 1, 2, 2, 8, 8, 5, 5, 0.3, False, "bool")
    with pytest.raises(PolicyError, match="attn.3.*varies per query"):
        check_variant(site, parse_variant("linear:elu"), [1, 1, 5, 5])
    check_variant(site, parse_variant("linear:elu"), [1, 1, 1, 5])  # a key mask is fine


def test_sparse_program_saves_and_reloads(tmp_path):
    z = hf_model("gpt2", "eager")
    cm = compiler.compile(z.model, z.args, "window:2,sinks:1,block=4", example_kwargs=z.kwargs)
    path = cm.save(tmp_path / "w.pt2")
    ep = torch.export.load(path)
    assert sum(n.target == torch.ops.attnforge.sparse_attention.default for n in ep.graph.nodes) == 2
    assert max_err(cm(*z.args, **z.kwargs), ep.module()(*z.args, **z.kwargs, use_cache=False)) == 0
