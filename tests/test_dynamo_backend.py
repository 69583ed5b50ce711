"""torch.compile(model, backend="attnforge"): each Dynamo graph gets discovered and rewritten."""

import pytest
import torch

from compiler import dynamo_backend
from compare import max_err
from zoo import hf_model


def _compiled_outputs(z, options):
    torch._dynamo.reset()
    dynamo_backend.reports.clear()
    f = torch.compile(z.model, backend="attnforge", options=options)  # found through the entry point
    kwargs = dict(z.kwargs, use_cache=False) if "llama" in z.name or "gpt2" in z.name else z.kwargs
    with torch.no_grad():
        ref = z.model(*z.args, **kwargs)
        got = f(*z.args, **kwargs)
    return ref, got


@pytest.mark.parametrize("kind", ["llama", "bert"])
def test_rewrites_every_site_and_matches_eager(kind):
    z = hf_model(kind, "eager")
    ref, got = _compiled_outputs(z, {"policy": "fused"})
    assert max_err(ref, got) <= 1e-5
    found = sum(r.totals["sites_found"] for r in dynamo_backend.reports)
    rewritten = sum(r.totals["sites_rewritten"] for r in dynamo_backend.reports)
    assert found == rewritten == z.attention_blocks


def test_inductor_compiles_the_rest():
    from torch._dynamo.utils import counters

    z = hf_model("bert", "eager")
    counters.clear()
    ref, got = _compiled_outputs(z, {"policy": "fused", "compile_rest": True})
    assert max_err(ref, got) <= 1e-5
    assert sum(r.totals["sites_rewritten"] for r in dynamo_backend.reports) == 2
    assert counters["inductor"]["fxgraph_cache_miss"] + counters["inductor"]["fxgraph_cache_hit"] >= 1


def test_approximate_policy_through_torch_compile():
    z = hf_model("bert", "eager")
    ref, got = _compiled_outputs(z, {"policy": "window:64"})  # covers the whole sequence: exact
    assert max_err(ref, got) <= 1e-5
    assert all(s.variant.startswith("window:") for r in dynamo_backend.reports for s in r.sites)


def test_unknown_option_is_named():
    z = hf_model("bert", "eager")
    torch._dynamo.reset()
    f = torch.compile(z.model, backend="attnforge", options={"polcy": "fused"})
    with pytest.raises(Exception, match="polcy"):
        f(*z.args, **z.kwargs)
