"""Generation on ONNX Runtime (compiler.driver.generate, backends.onnx_cache): the step program in one
session whose cache inputs and outputs are bound to the same buffers. Fused generates what the
model's own generate() does; sinks + window and a DuoAttention head mix generate what the torch
backend does (itself checked against an independent reference in tests/test_generate.py), far past
the window, with the cache memory never reallocated."""

import pytest
import torch

from compiler.driver.generate import compile_generator
from test_generate import MAX_LEN, VOCAB, _cache_buffers, llama_case


@pytest.fixture(scope="module")
def llama(one_thread):
    return llama_case()


def _buffers(gen):
    return [(c.shape, c.data_ptr()) for c in gen._session.caches]


def test_fused_onnxruntime_equals_model_generate(llama):
    _, ids, (ref_tokens, ref_logits), ep = llama
    gen = compile_generator(ep, policy="fused", backend="onnxruntime")
    out = gen.generate(ids, max_new_tokens=32)
    assert torch.equal(out, ref_tokens)
    assert (gen.last_logits - ref_logits).abs().max().item() < 1e-4
    assert gen.report.backend == "onnxruntime"
    ops = {n.op_type for n in gen._session.onnx.graph.node}
    assert {"Attention", "ScatterElements"} <= ops  # attention and the in-place write run in ORT
    inputs = [i.name for i in gen._session.onnx.graph.input]
    assert len(inputs) == 2 + 4 and len(gen._session.onnx.graph.output) == 1 + 4  # past in, present out


@pytest.mark.parametrize("policy, prompt, new", [
    ("sinks:4,window:16", 10, 50),  # 44 steps past the window filling
    ("sinks:4,window:16", 40, 24),  # a prompt in chunks of 16 over the ring's history
    ("heads[0-1]=fused; heads[*]=sinks:4,window:16", 10, 40),
])
def test_bounded_onnxruntime_equals_torch_backend(llama, policy, prompt, new):
    _, _, _, ep = llama
    torch.manual_seed(5)
    ids = torch.randint(1, VOCAB, (1, prompt))
    want = compile_generator(ep, policy=policy)
    ref = want.generate(ids, max_new_tokens=new)
    gen = compile_generator(ep, policy=policy, backend="onnxruntime")
    before = _buffers(gen)
    assert torch.equal(gen.generate(ids, max_new_tokens=new), ref)
    assert (gen.last_logits - want.last_logits).abs().max().item() < 1e-4
    # Constant memory: the session wrote the generator's own buffers in place, never reallocated,
    # and they hold what the torch backend's buffers hold.
    assert _buffers(gen) == before
    assert gen.cache_bytes == want.cache_bytes == sum(c.nbytes for c in gen._session.caches)
    for mine, theirs in zip(gen._session.caches, _cache_buffers(want).values()):
        assert (mine - theirs).abs().max().item() < 1e-5


def test_user_exported_one_token_program_on_onnxruntime(llama):
    """transformers' recipe at its default one-token shape: a static step program, prefilled token by token."""
    import copy

    from transformers.integrations.executorch import TorchExportableModuleForDecoderOnlyLM

    model, ids, (ref_tokens, ref_logits), _ = llama
    m = copy.deepcopy(model)
    m.generation_config.use_cache, m.generation_config.cache_implementation = True, "static"
    ep = TorchExportableModuleForDecoderOnlyLM(m, batch_size=1, max_cache_len=MAX_LEN).export(
        input_ids=torch.tensor([[1]]), cache_position=torch.tensor([0]))
    gen = compile_generator(ep, policy="fused", backend="onnxruntime")
    assert torch.equal(gen.generate(ids, max_new_tokens=16), ref_tokens[:, :25])
    assert (gen.last_logits - ref_logits[:16]).abs().max().item() < 1e-4


def test_dense_site_refused_on_onnxruntime(llama):
    import compiler

    with pytest.raises(compiler.BackendError, match=r"sites attn.1 are left dense .*use backend='torch'"):
        compile_generator(llama[3], policy={"*": "fused", "layers.1": "dense"}, backend="onnxruntime")


def test_cli_generate_backend(llama, tmp_path, capsys):
    from compiler.cli import main

    _, ids, (ref_tokens, _), ep = llama
    path = tmp_path / "llama.pt2"
    torch.export.save(ep, path)
    prompt = ",".join(map(str, ids[0].tolist()))
    assert main(["generate", str(path), "--prompt-ids", prompt, "--max-new-tokens", "8",
                 "--backend", "onnxruntime"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == ",".join(map(str, ref_tokens[0, 9:17].tolist())) and "backend onnxruntime" in out[1]
    assert main(["generate", str(path), "--prompt-ids", prompt, "--backend", "tvm"]) == 2
    assert "invalid choice: 'tvm'" in capsys.readouterr().err
