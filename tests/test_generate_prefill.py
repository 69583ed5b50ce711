"""Sparse prefill in generation: top-k blocks and vertical-slash on the prompt, then decode over
the full cache. The reference is written here: the model's own generate() with its attention
replaced by dense masked attention, over the keep set the pattern selects in prefill (the pairs
``attnforge::sparse_attention`` computes, as a dense mask) and every cached key in decode."""

import copy

import pytest
import torch
from transformers import AttentionInterface

import compiler
from compiler.driver.generate import compile_generator
from compiler.reference.sparse_ops import sparse_keep_mask
from compiler.variants.language import parse_variant
from test_generate import VOCAB, _hf_generate, llama_case

POLICIES = ["topk:blocks=1,block=8", "vslash:vertical=4,slash=4,last=16,local=16,block=16"]


def _sparse_prefill_reference(model, spec):
    name = f"sparse_prefill_ref_{abs(hash(spec))}"

    def attend(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        b, h, sq, d = query.shape
        sk = key.shape[2]
        k = key.repeat_interleave(h // key.shape[1], dim=1)
        v = value.repeat_interleave(h // key.shape[1], dim=1)
        scores = (query @ k.transpose(-1, -2)) * scaling
        if sq > 1:  # the prompt: causal, and only the pairs the pattern keeps
            keep = torch.ones(sq, sk, dtype=torch.bool).tril(sk - sq)
            keep = keep & sparse_keep_mask(query, key, spec, scaling, True)
            scores = scores.masked_fill(~keep, float("-inf"))
        return (scores.softmax(-1) @ v).transpose(1, 2).contiguous(), None

    AttentionInterface.register(name, attend)
    ref = copy.deepcopy(model)
    ref.set_attn_implementation(name)
    return ref


@pytest.fixture(scope="module")
def llama(one_thread):
    model, _, _, ep = llama_case()
    torch.manual_seed(21)
    return model, ep, torch.randint(1, VOCAB, (1, 48))


@pytest.mark.parametrize("policy", POLICIES)
def test_sparse_prefill_then_full_decode_equals_reference(llama, policy):
    model, ep, ids = llama
    gen = compile_generator(ep, policy=policy)
    out = gen.generate(ids, max_new_tokens=16)
    spec = parse_variant(policy).text
    ref_tokens, ref_logits = _hf_generate(_sparse_prefill_reference(model, spec), ids, 16)
    assert torch.equal(out, ref_tokens)
    assert (gen.last_logits - ref_logits).abs().max().item() < 1e-4
    # The prefill really is sparse: exact attention gives other logits.
    exact_logits = _hf_generate(model, ids, 16)[1]
    assert (gen.last_logits - exact_logits).abs().max().item() > 1e-3
    # Decode sees the full cache.
    assert all(s.layout == f"0-1:full#{spec}" for s in gen.report.sites)
    assert gen.cache_bytes == gen.report.full_cache_bytes


def test_sparse_prefill_bad_input(llama):
    _, ep, _ = llama
    with pytest.raises(compiler.PolicyError, match=r"topk.* has no KV-cache form for generation"):
        compile_generator(ep, policy="heads[0-1]=topk:blocks=1,block=8; heads[*]=fused")
    with pytest.raises(compiler.BackendError, match=r"sparse prefill; backend='onnxruntime' prefills exactly"):
        compile_generator(ep, policy=POLICIES[0], backend="onnxruntime")
