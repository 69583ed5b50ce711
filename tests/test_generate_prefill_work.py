"""The fused generator's prefill does no more work than the model's own: no tensor sized by
``max_cache_len`` except the cache buffers (no mask over the static cache survives the rewrite),
the prompt goes in one call, and each attention reads exactly the filled keys, causal, with no
explicit mask (prefill: the prompt's keys; decode: every key written so far)."""

import pytest
import torch
import torch.nn.functional as F

from compiler.driver.generate import capture_for_generation, compile_generator
from test_generate import FAMILIES, VOCAB

MAX_LEN = 97  # a size no other dimension of the tiny models has


@pytest.fixture(scope="module")
def generators(one_thread):
    out = {}
    for family in ("llama", "qwen2-eager"):  # SDPA attention, and eager attention with an additive mask
        torch.manual_seed(0)
        model = FAMILIES[family]().eval()
        ep = capture_for_generation(model, torch.randint(1, VOCAB, (1, 9)), MAX_LEN)
        out[family] = ep, compile_generator(ep, policy="fused")
    return out


@pytest.mark.parametrize("family", ["llama", "qwen2-eager"])
def test_no_tensor_over_the_static_cache(generators, family):
    ep, gen = generators[family]
    assert _over_cache(gen.module.graph) == []
    # The exported program has them (its mask over the static cache, the cache writes): the check can fail.
    assert _over_cache(ep.graph)


def _over_cache(graph):
    return [n.name for n in graph.nodes if n.op == "call_function" and isinstance(n.meta.get("val"), torch.Tensor)
            and MAX_LEN in tuple(n.meta["val"].shape)]


@pytest.mark.parametrize("family", ["llama", "qwen2-eager"])
def test_attention_reads_only_the_filled_keys(generators, family, monkeypatch):
    gen = generators[family][1]
    calls = []
    sdpa = F.scaled_dot_product_attention

    def spy(q, k, v, *args, **kwargs):
        calls.append((q.shape[2], k.shape[2], kwargs.get("is_causal", False), kwargs.get("attn_mask")))
        return sdpa(q, k, v, *args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    n, new = 23, 4
    torch.manual_seed(1)
    gen.generate(torch.randint(1, VOCAB, (1, n)), max_new_tokens=new)
    layers = len(gen.sites)
    prefill, decode = calls[:layers], calls[layers:]
    assert prefill == [(n, n, True, None)] * layers  # one call per layer over the prompt, causal, no mask
    assert decode == [(1, n + i + 1, False, None) for i in range(new - 1) for _ in range(layers)]
