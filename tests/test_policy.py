"""The variant language and policies: parsing, canonical text, per-site targeting, and errors
that name the bad token (or the site a variant cannot apply to) and list the valid choices."""

from __future__ import annotations

import re

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import compiler
from compiler.ir.errors import PolicyError
from compiler.variants.policy import parse_policy, selects
from compiler.ir.site import AttentionSite
from compiler.variants.language import (DENSE, FUSED, BlockSparse, HeadMix, Hybrid, Linear, Neighborhood, TopK, Variant,
                               VerticalSlash, Window, parse_variant)
from passes.attention_variants import check_variant
from zoo import hf_model

ATTN = torch.ops.attnforge.attention.default
SPARSE = torch.ops.attnforge.sparse_attention.default
LINEAR = torch.ops.attnforge.linear_attention.default


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors: threads only add overhead, and spin badly when the CPU is shared."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


VARIANT_NAMES = ["fused", "dense", "window", "blocksparse", "topk", "vslash", "neighborhood", "linear", "hybrid"]


def sparse(p) -> Variant:
    return Variant("sparse", p)


# ----------------------------------------------------------------------------- text forms


@pytest.mark.parametrize("text,want", [
    ("window:256,sinks:4", sparse(Window(left=256, sinks=4))),
    ("sinks:4,window:256", sparse(Window(left=256, sinks=4))),
    ("window=256, sinks=4", sparse(Window(left=256, sinks=4))),
    ("WINDOW:256,Sinks:4", sparse(Window(left=256, sinks=4))),
    ("window:8,right=2,block=16", sparse(Window(left=8, right=2, block=16))),
    ("window:8,right=auto", sparse(Window(left=8))),
    ("topk:blocks=8,block=64", sparse(TopK(blocks=8, block=64))),
    ("topk:4,mass=0.9,local=0,sinks=2", sparse(TopK(blocks=4, mass=0.9, local=0, sinks=2))),
    ("blocksparse:block=32,local=2,global=1,stride=4", sparse(BlockSparse(block=32, local=2, global_=1, stride=4))),
    ("vslash:vertical=32,slash=16,last=8", sparse(VerticalSlash(vertical=32, slash=16, last=8))),
    ("neighborhood:5x3,grid=4x6,prefix=1", sparse(Neighborhood(size=(5, 3), grid=(4, 6), prefix=1))),
    ("neighborhood:3", sparse(Neighborhood(size=(3, 3)))),
    ("linear:favor,features=128", Variant("linear", Linear(map="favor", features=128))),
    ("linear:relu,chunk=3", Variant("linear", Linear(map="relu", chunk=3))),
    ("hybrid:16,map=favor,seed=2", Variant("linear", Hybrid(window=16, map="favor", seed=2))),
    ("fused", FUSED), ("exact", FUSED), ("dense", DENSE), ("none", DENSE), ("off", DENSE),
])
def test_string_forms(text, want):
    v = parse_variant(text)
    assert v == want
    assert v.exact == (want.kind in ("fused", "dense"))


def test_head_mix_text():
    v = parse_variant("heads[0-3]=fused; heads[*]=window:256,sinks:4")
    assert v == sparse(HeadMix((((0, 1, 2, 3), FUSED), (None, sparse(Window(left=256, sinks=4))))))
    assert v.text == "heads[0-3]=fused; heads[*]=window:left=256,right=auto,sinks=4,block=64"
    # "dense" heads inside one op are exact heads; a mix of only exact heads is just fused
    assert parse_variant("heads[0]=dense; heads[*]=window:4").pattern.groups[0][1] == FUSED
    assert parse_variant("heads[0-1]=fused; heads[*]=exact") == FUSED
    assert parse_variant("heads[3,0-1]=window:2; heads[*]=fused").pattern.groups[0][0] == (0, 1, 3)


ROUND_TRIP = [
    "fused", "dense", "window:256,sinks:4", "window:3,right=0", "window:0,sinks=9,block=8", "topk:blocks=8,block=64",
    "topk:mass=0.9", "topk:mass=0.25,local=0", "blocksparse:block=16,global=0,stride=3", "vslash:vertical=1,slash=2",
    "neighborhood:7x7", "neighborhood:3x5,grid=4x6,prefix=2", "linear:elu", "linear:favor,features=128,seed=7",
    "linear:taylor,chunk=1", "hybrid:8", "hybrid:4,map=favor,features=32",
    "heads[0-3]=fused; heads[*]=window:256,sinks:4", "heads[1,3]=topk:blocks=2; heads[0]=fused; heads[*]=window:8",
]


@pytest.mark.parametrize("text", ROUND_TRIP)
def test_canonical_text_round_trips(text):
    v = parse_variant(text)
    assert parse_variant(v.text) == v
    assert parse_variant(v.text).text == v.text


_ints = st.integers(0, 300)
_pos = st.integers(1, 300)
_odd = st.integers(0, 5).map(lambda x: 2 * x + 1)
_opt_grid = st.one_of(st.none(), st.tuples(st.integers(1, 30), st.integers(1, 30)))
_mass = st.one_of(st.just(0.0), st.sampled_from([0.5, 0.9, 0.25, 0.999, 1.0, 0.05]))

_single = st.one_of(
    st.builds(Window, left=_ints, right=st.one_of(st.none(), _ints), sinks=_ints, block=_pos),
    st.builds(BlockSparse, block=_pos, local=_ints, global_=_ints, stride=_ints),
    st.builds(TopK, blocks=_pos, block=_pos, mass=_mass, local=_ints, sinks=_ints),
    st.builds(VerticalSlash, vertical=_ints, slash=_ints, last=_pos, sinks=_ints, local=_ints, block=_pos),
    st.builds(Neighborhood, size=st.tuples(_odd, _odd), grid=_opt_grid, prefix=st.one_of(st.none(), _ints),
              block=_pos),
    st.builds(Linear, map=st.sampled_from(["elu", "relu", "favor", "taylor"]), features=_pos, chunk=_pos, seed=_ints),
    st.builds(Hybrid, window=_pos, map=st.sampled_from(["favor", "taylor"]), features=_pos, chunk=_pos, seed=_ints),
)


@st.composite
def variants(draw):
    p = draw(_single)
    if isinstance(p, (Linear, Hybrid)) or not draw(st.booleans()):
        return Variant("linear" if isinstance(p, (Linear, Hybrid)) else "sparse", p)
    # a head mix: disjoint head lists, optionally a heads[*] group, at least one sparse group
    heads = draw(st.permutations(range(8)))
    cuts = sorted(draw(st.lists(st.integers(1, 7), min_size=0, max_size=3, unique=True)))
    lists = [tuple(sorted(heads[a:b])) for a, b in zip([0, *cuts], [*cuts, 8])]
    lists = lists[: draw(st.integers(1, len(lists)))]
    if draw(st.booleans()):
        lists.append(None)
    groups = []
    for i, hs in enumerate(lists):
        q = draw(_single.filter(lambda x: not isinstance(x, (Linear, Hybrid))))
        groups.append((hs, FUSED if i > 0 and draw(st.booleans()) else sparse(q)))
    return sparse(HeadMix(tuple(groups)))


@settings(max_examples=300, deadline=None, derandomize=True, database=None)
@given(v=variants())
def test_random_variants_round_trip(v):
    assert parse_variant(v.text) == v


def test_float_parameters_round_trip_exactly():
    v = parse_variant("topk:mass=0.1234567")
    assert parse_variant(v.text) == v


def test_parse_variant_of_a_list_is_a_policy_error():
    with pytest.raises(PolicyError, match="a variant is a string"):
        parse_variant(["window:8"])


# ----------------------------------------------------------------------------- bad variants


def _valid_variants_listed(msg):
    return all(n in msg for n in VARIANT_NAMES)


@pytest.mark.parametrize("text,token,choices", [
    ("windo:256", "windo", VARIANT_NAMES),
    ("slidingwindow", "slidingwindow", VARIANT_NAMES),
    ("", None, VARIANT_NAMES),
    ("window:8,,sinks=1", None, VARIANT_NAMES),
    ("window:256,foo=3", "foo", ["left", "right", "sinks", "block"]),
    ("topk:blocks=8,sink=1", "sink", ["blocks", "block", "mass", "local", "sinks"]),
    ("linear:favor,feature=3", "feature", ["map", "features", "chunk", "seed"]),
    ("window:8,sinks", "sinks", ["left", "right", "sinks", "block"]),
    ("vslash:32", "vslash", ["vertical", "slash", "last", "sinks", "local", "block"]),
    ("window:abc", "abc", ["whole number"]),
    ("window:1.5", "1.5", ["whole number"]),
    ("topk:blocks=eight", "eight", ["whole number"]),
    ("window:-1", "-1", [">= 0"]),
    ("topk:blocks=0", "0", ["positive"]),
    ("linear:elu,chunk=0", "0", ["positive"]),
    ("topk:mass=1.5", "1.5", ["(0, 1]"]),
    ("topk:mass=-0.1", "-0.1", ["(0, 1]"]),
    ("topk:mass=lots", "lots", ["(0, 1]"]),
    ("neighborhood:4x4", "4x4", ["odd"]),
    ("neighborhood:7x6", "7x6", ["odd"]),
    ("neighborhood:7by7", "7by7", ["ROWSxCOLS"]),
    ("hybrid:map=elu", "elu", ["favor", "taylor"]),
    ("hybrid:8,map=relu", "relu", ["favor", "taylor"]),
    ("linear:gelu", "gelu", ["elu", "relu", "favor", "taylor"]),
    ("fused:3", "fused", ["no parameters"]),
    ("sinks:4", "sinks", ["window:256,sinks:4"]),
    ("heads[0]=linear:elu; heads[*]=fused", "linear:elu", ["fused and sparse", "whole sites"]),
    ("heads[0-1]=hybrid:8; heads[*]=fused", "hybrid:8", ["fused and sparse"]),
    ("heads[0-2]=fused; heads[2-3]=window:4", "[2]", ["two groups"]),
    ("heads[*]=fused; heads[*]=window:4", "heads[*]", ["given twice"]),
    ("heads[a]=fused; heads[*]=window:4", "'a'", ["heads[0-3,8]", "heads[*]"]),
    ("heads[3-1]=window:4", "3-1", ["empty head range"]),
    ("heads0=fused; heads[*]=window:4", "heads0=fused", ["heads[LIST]=VARIANT"]),
    ("heads[0]=windo:4; heads[*]=fused", "windo", VARIANT_NAMES),
])
def test_bad_variant_names_token_and_choices(text, token, choices):
    with pytest.raises(PolicyError) as e:
        parse_variant(text)
    msg = str(e.value)
    assert "\n" not in msg
    if token is not None:
        assert token in msg, msg
    for c in choices:
        assert c in msg, (c, msg)
    # the same error through a policy, as a string and as a dict value
    with pytest.raises(PolicyError, match=re.escape(msg)):
        parse_policy(text)
    with pytest.raises(PolicyError, match=re.escape(msg)):
        parse_policy({"*": "fused", "attn.0": text})


@pytest.mark.parametrize("spec,pattern", [
    ({"*": "auto"}, "'auto' applies to a whole model"),
    ({"attn.0": "AUTO"}, "'auto' applies to a whole model"),
    ({"": "fused"}, "non-empty string"),
    ({"  ": "fused"}, "non-empty string"),
    ({3: "fused"}, "non-empty string"),
    ({"attn.0": 5}, "a variant is a string, not int; valid variants: fused, dense, window"),
    ({"attn.0": None}, "a variant is a string, not NoneType"),
    ({"attn.0": {"head[0]": "fused"}}, "keys are heads\\[LIST\\], not 'head\\[0\\]'"),
    ({"attn.0": {"heads[0]": "linear:elu", "heads[*]": "fused"}}, "whole sites"),
    (3, "a policy is a string or a dict, not int"),
    (["fused"], "a policy is a string or a dict, not list"),
])
def test_bad_policies(spec, pattern):
    with pytest.raises(PolicyError, match=pattern):
        parse_policy(spec)


# ----------------------------------------------------------------------------- selectors


def site(n: int, module: str, layer, **kw) -> AttentionSite:
    base = dict(module_type="Attention", form="sdpa", batch=2, num_heads=4, num_kv_heads=4, head_dim=8, value_dim=8,
                seq_q=16, seq_k=16, scale=0.35, causal=False, mask_kind="none")
    base.update(kw)
    return AttentionSite(id=f"attn.{n}", module=module, layer=layer, **base)


SITES = [site(i, f"encoder.layer.{i}.attention.self", i) for i in range(6)] + [site(6, "pooler.attn", None)]


def _chosen(policy) -> list[str]:
    pol = parse_policy(policy)
    return [pol.variant_for(s).text for s in SITES]


def test_single_string_applies_everywhere():
    w = parse_variant("window:8").text
    assert _chosen("window:8") == [w] * 7
    assert _chosen(None) == ["fused"] * 7
    assert _chosen(" fused ") == ["fused"] * 7
    pol = parse_policy("auto")
    assert pol.auto and pol.text == "auto"
    assert parse_policy(pol) is pol


def test_selectors_star_first_later_overrides():
    w, t, lin = parse_variant("window:8").text, parse_variant("topk:blocks=2").text, parse_variant("linear:elu").text
    got = _chosen({
        "layers.0-1": "window:8",  # a layer range
        "encoder.layer.3.*": "dense",  # a module glob
        "*": "fused",  # "*" applies first wherever it is written
        "attn.2": "topk:blocks=2",  # a site id
        "layer.4": "linear:elu",  # "layer.N" as well as "layers.N"
    })
    assert got == [w, w, t, "dense", lin, "fused", "fused"]
    # later entries override earlier ones
    assert _chosen({"*": "fused", "attn.1": "window:8", "layers.0-2": "topk:blocks=2"})[:4] == [t, t, t, "fused"]
    assert _chosen({"*": "fused", "layers.0-2": "topk:blocks=2", "attn.1": "window:8"})[:4] == [t, w, t, "fused"]


def test_selector_forms():
    s1, pooler = SITES[1], SITES[6]
    assert selects("*", pooler)
    assert selects("attn.1", s1) and not selects("attn.10", s1) and not selects("attn.1", SITES[0])
    assert selects("layers.1", s1) and selects("layers.0-3", s1) and not selects("layers.2-3", s1)
    assert not selects("layers.0-9", pooler)  # no layer number in its path
    assert selects("encoder.layer.1", s1)  # a module prefix selects what is inside it
    assert selects("encoder.layer.1.attention.self", s1)
    assert selects("*.attention.self", s1) and not selects("*.attention.self", pooler)
    assert selects("encoder.layer.[12].*", s1) and not selects("encoder.layer.[23].*", s1)
    assert not selects("encoder.layer.1.attention.self.extra", s1)
    assert selects("pooler.*", pooler)


def test_unmatched_site_without_star_is_left_dense():
    assert _chosen({"attn.0": "window:8"})[1:] == ["dense"] * 6


def test_selector_matching_no_site_is_an_error():
    pol = parse_policy({"*": "fused", "layers.9": "window:8"})
    with pytest.raises(PolicyError, match=r"'layers.9' matches no attention site; sites: attn.0 \(encoder.layer.0"):
        pol.check_selectors(SITES)
    parse_policy({"*": "fused", "layers.5": "window:8"}).check_selectors(SITES)


def test_head_mix_dict_value():
    want = parse_variant("heads[0-3]=fused; heads[*]=window:256")
    pol = parse_policy({"*": "fused", "attn.1": {"heads[0-3]": "fused", "heads[*]": "window:256"}})
    assert pol.variant_for(SITES[1]) == want
    assert want.pattern == HeadMix((((0, 1, 2, 3), FUSED), (None, sparse(Window(left=256)))))
    assert pol.variant_for(SITES[0]) == FUSED


# ----------------------------------------------------------------------------- variants that cannot apply to a site


@pytest.mark.parametrize("variant,kw,pattern", [
    ("neighborhood:3x3", dict(causal=True), "attn.3 .*causal"),
    ("neighborhood:3x3", dict(seq_q=1, seq_k=16), "attn.3 .*as many queries as keys"),
    ("neighborhood:3x3", dict(seq_q=7, seq_k=7), "attn.3 .*not a square grid"),
    ("neighborhood:3x3,grid=4x4", dict(seq_q=14, seq_k=14), "attn.3 .*does not cover"),
    ("neighborhood:3x3,grid=3x4,prefix=0", dict(seq_q=14, seq_k=14), "attn.3 .*does not cover"),
    ("heads[9]=fused; heads[*]=window:4", {}, r"attn.3 .*heads \[9\].*4 heads"),
    ("heads[0-1]=window:4", {}, r"attn.3 .*leaves heads \[2, 3\]"),
    ("linear:elu", dict(softcap=30.0), "attn.3 .*softcap"),
])
def test_check_variant_names_the_site(variant, kw, pattern):
    s = site(3, "encoder.layer.3.attention.self", 3, **kw)
    with pytest.raises(PolicyError, match=pattern):
        check_variant(s, parse_variant(variant))


def test_check_variant_linear_needs_a_key_mask():
    s = site(2, "encoder.layer.2.attention.self", 2)
    with pytest.raises(PolicyError, match="attn.2 .*varies per query"):
        check_variant(s, parse_variant("linear:elu"), mask_shape=[2, 1, 16, 16])
    check_variant(s, parse_variant("linear:elu"), mask_shape=[2, 1, 1, 16])
    check_variant(s, parse_variant("window:4"), mask_shape=[2, 1, 16, 16])
    check_variant(s, parse_variant("neighborhood:3x3"))  # 16 tokens: a 4x4 grid
    check_variant(site(2, "m", 2, seq_q=17, seq_k=17), parse_variant("neighborhood:3x3"))  # CLS + 4x4


# ----------------------------------------------------------------------------- on zoo models


def _compile(kind, impl, policy):
    z = hf_model(kind, impl)
    return z, compiler.compile(z.model, z.args, policy, example_kwargs=z.kwargs)


@pytest.mark.parametrize("kind,policy,pattern", [
    ("llama", "neighborhood:3x3", r"site attn.0 \(layers.0.self_attn\).*causal"),
    ("bert", "neighborhood:3x3", r"site attn.0 \(encoder.layer.0.attention.self\).*7 tokens is not a square grid"),
    ("bert", "heads[9]=fused; heads[*]=window:2", r"site attn.0 .*heads \[9\], but the site has 4 heads"),
    ("bert", {"*": "fused", "attn.1": {"heads[0-5]": "fused", "heads[*]": "window:2"}},
     r"site attn.1 .*heads \[4, 5\]"),
    ("bert", {"*": "fused", "layers.5": "window:2"},
     r"'layers.5' matches no attention site; sites: attn.0 \(encoder.layer.0.attention.self, layer 0\)"),
    ("llama", {"*": "fused", "attn.7": "window:2"}, r"'attn.7' matches no attention site"),
    ("llama", {"decoder.*": "window:2"}, r"'decoder.\*' matches no attention site"),
])
def test_zoo_policy_errors(kind, policy, pattern):
    with pytest.raises(PolicyError, match=pattern):
        _compile(kind, "eager", policy)


class _QueryMask(torch.nn.Module):
    def forward(self, q, k, v, bias):
        return torch.softmax(q @ k.transpose(-2, -1) * 0.3 + bias, -1) @ v


def test_linear_on_a_query_dependent_mask_is_a_site_error():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 4, 7, 8, generator=g) for _ in range(3))
    with pytest.raises(PolicyError, match=r"site attn.0 .*varies per query \(shape \[2, 1, 7, 7\]\)"):
        compiler.compile(_QueryMask(), (q, k, v, torch.randn(2, 1, 7, 7, generator=g)), "linear:elu")
    # a key mask is fine
    cm = compiler.compile(_QueryMask(), (q, k, v, torch.randn(2, 1, 1, 7, generator=g)), "linear:elu")
    assert [s.variant for s in cm.report.sites] == [parse_variant("linear:elu").text]


def _ops(cm):
    return [n for n in cm.exported_program.graph.nodes if n.target in (ATTN, SPARSE, LINEAR)]


def test_per_site_targeting_on_bert():
    z, cm = _compile("bert", "eager", {"*": "fused", "attn.1": "window:2,block=4"})
    w = parse_variant("window:2,block=4").text
    s0, s1 = cm.report.sites
    assert (s0.id, s0.variant, s0.status, s0.density, s0.cosine_similarity) == ("attn.0", "fused", "rewritten", 1.0,
                                                                                None)
    assert (s1.id, s1.variant, s1.status) == ("attn.1", w, "rewritten")
    # seq 7 in blocks of 4: both query blocks read both key blocks, 4 * 16 scores for 49 pairs
    assert s1.density == pytest.approx(64 / 49)
    assert 0.5 < s1.cosine_similarity < 1.0 - 1e-6
    assert s1.kept_mass is not None and 0 < s1.kept_mass < 1
    ops = _ops(cm)
    assert [n.target for n in ops] == [ATTN, SPARSE]
    assert ops[1].args[-1] == w
    assert cm.report.fidelity.passed is None  # approximate, no budget to hold it to
    assert cm.report.totals["sites_approximate"] == 1


def test_selectors_by_layer_glob_and_head_mix_dict_on_bert():
    mix = {"heads[0-1]": "fused", "heads[*]": "window:2,block=4"}
    z, cm = _compile("bert", "eager", {"encoder.layer.0": "linear:elu", "*": "fused", "layers.1": mix})
    s0, s1 = cm.report.sites
    assert s0.variant == parse_variant("linear:elu").text and s0.status == "rewritten"
    assert s1.variant == "heads[0-1]=fused; heads[*]=window:left=2,right=auto,sinks=0,block=4"
    assert [n.target for n in _ops(cm)] == [LINEAR, SPARSE]


def test_dense_selector_keeps_a_site_as_written():
    z, cm = _compile("bert", "eager", {"*": "fused", "layers.1": "dense"})
    assert [(s.variant, s.status) for s in cm.report.sites] == [("fused", "rewritten"), ("dense", "kept")]
    assert [n.target for n in _ops(cm)] == [ATTN]
    assert cm.report.fidelity.passed
