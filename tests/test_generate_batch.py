"""Generation of several equal-length prompts at once (batch > 1, torch backend): fused equals the
model's own batched generate(); a bounded cache gives each row what it gives that prompt alone
(itself checked against a keep-set reference in tests/test_generate.py)."""

import pytest
import torch

import compiler
from compiler.driver.generate import compile_generator
from test_generate import MAX_LEN, VOCAB, _hf_generate, _llama


@pytest.fixture(scope="module")
def batch(one_thread):
    torch.manual_seed(0)
    model = _llama().eval()
    ids = torch.randint(1, VOCAB, (3, 9))
    return model, ids, _hf_generate(model, ids, 32)


def test_fused_batch_equals_model_generate(batch):
    model, ids, (ref_tokens, ref_logits) = batch
    gen = compile_generator(model, ids, policy="fused", max_cache_len=MAX_LEN)
    out = gen.generate(ids, max_new_tokens=32)
    assert out.shape == (3, 41) and torch.equal(out, ref_tokens)
    assert (gen.last_logits - ref_logits).abs().max().item() < 1e-4
    assert gen.cache_bytes == 2 * 2 * (3 * 2 * MAX_LEN * 16 * 4)  # the cache holds all three rows
    with pytest.raises(compiler.InputError, match=r"captured for 3 prompts of equal length .*shape \[3, n\]"):
        gen.generate(ids[:1], max_new_tokens=4)


def test_bounded_cache_batch_rows_equal_single_prompts(batch):
    model, ids, _ = batch
    policy = "heads[0-1]=fused; heads[*]=sinks:4,window:8"
    rows = compile_generator(model, ids, policy=policy, max_cache_len=MAX_LEN).generate(ids, max_new_tokens=40)
    one = compile_generator(model, ids[:1], policy=policy, max_cache_len=MAX_LEN)
    for r in range(3):
        assert torch.equal(rows[r:r + 1], one.generate(ids[r:r + 1], max_new_tokens=40))


class _Spy(torch.nn.Module):
    """Stands in for the step program: records the devices of what it is called with and returns
    logits on the device it was given (meta: shapes only)."""

    def __init__(self, vocab):
        super().__init__()
        self.vocab, self.calls = vocab, []

    def forward(self, input_ids, cache_position):
        self.calls.append((input_ids.device, cache_position.device))
        return torch.zeros(*input_ids.shape, self.vocab, device=input_ids.device)


def test_generator_follows_the_module_device(batch):
    """Positions, prompts and the sampler are made on the device of the module's cache buffers (CUDA
    when the model is there): checked on the meta device, which runs shapes only."""
    model, ids, _ = batch
    gen = compile_generator(model, ids, policy="fused", max_cache_len=MAX_LEN)
    assert gen.device == gen.module.get_buffer(next(n for n, _ in gen.module.named_buffers()
                                                     if n.startswith("attnforge_kv_"))).device
    gen.module, gen.device = _Spy(VOCAB), torch.device("meta")
    out = gen.generate(ids, max_new_tokens=3)
    assert out.device.type == "meta" and out.shape == (3, 12)
    assert gen.module.calls and all(d.type == "meta" and p.type == "meta" for d, p in gen.module.calls)
