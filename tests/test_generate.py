"""Generation with a KV cache (compiler.driver.generate): exact fused decode against the model's own
``generate()``, StreamingLLM and DuoAttention caches against a reference written here (the
model recomputing the whole history every step, its attention replaced by dense masked
attention over the same keep set), cache memory, and bad input."""

import copy
import json

import pytest
import torch
import transformers
from transformers import AttentionInterface

import compiler
from compiler.driver.generate import capture_for_generation, compile_generator

MAX_LEN = 64
VOCAB = 128


def _llama():
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    return transformers.LlamaForCausalLM(cfg)


def _gpt2():
    cfg = transformers.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=2, n_positions=256,
                                  bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(cfg)


def _qwen3():
    cfg = transformers.Qwen3Config(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                   max_position_embeddings=256)
    return transformers.Qwen3ForCausalLM(cfg)


def _qwen2_eager():
    """Eager attention: matmul, an additive where(keep, 0, finfo.min) mask, softmax, matmul."""
    cfg = transformers.Qwen2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                   attn_implementation="eager")
    return transformers.Qwen2ForCausalLM(cfg)


def llama_case():
    """The tiny Llama with a prompt, its own greedy generation of 32 tokens and its captured program
    (the other backends' test modules build their fixtures from this)."""
    torch.manual_seed(0)
    model = _llama().eval()
    ids = torch.randint(1, VOCAB, (1, 9))
    return model, ids, _hf_generate(model, ids, 32), capture_for_generation(model, ids, MAX_LEN)


FAMILIES = {"llama": _llama, "gpt2": _gpt2, "qwen3": _qwen3, "qwen2-eager": _qwen2_eager}


def _hf_generate(model, ids, n):
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, output_logits=True,
                             return_dict_in_generate=True, eos_token_id=None, pad_token_id=0)
    return out.sequences, torch.cat(out.logits).float()


@pytest.fixture(scope="module")
def families(one_thread):
    """Per family: model, prompt, the model's own greedy generation (taken before capture), the
    captured program."""
    out = {}
    for i, (name, make) in enumerate(FAMILIES.items()):
        torch.manual_seed(i)
        model = make().eval()
        ids = torch.randint(1, VOCAB, (1, 9))
        ref = _hf_generate(model, ids, 32)
        out[name] = (model, ids, ref, capture_for_generation(model, ids, MAX_LEN))
    return out


@pytest.mark.parametrize("family", list(FAMILIES))
def test_fused_equals_model_generate(families, family):
    model, ids, (ref_tokens, ref_logits), ep = families[family]
    gen = compile_generator(ep, policy="fused")
    out = gen.generate(ids, max_new_tokens=32)
    assert torch.equal(out, ref_tokens)
    assert (gen.last_logits - ref_logits).abs().max().item() < 1e-4
    assert all(s.layout.endswith(":full") for s in gen.report.sites) and len(gen.report.sites) == 2
    assert gen.last_position_logits  # the prefill projects only the last position to the vocabulary
    assert all(s.valid_keys.endswith(f"of {MAX_LEN}") for s in gen.report.sites)


def test_dense_site_keeps_the_exported_cache(families):
    """A site the policy leaves dense attends over the exported static cache under its own mask."""
    _, ids, (ref_tokens, ref_logits), ep = families["llama"]
    gen = compile_generator(ep, policy={"*": "fused", "layers.1": "dense"})
    assert [s.layout for s in gen.report.sites] == ["0-1:full", "as exported"]
    assert torch.equal(gen.generate(ids, max_new_tokens=32), ref_tokens)
    assert (gen.last_logits - ref_logits).abs().max().item() < 1e-4


@pytest.fixture(scope="module")
def user_pt2(families, tmp_path_factory):
    """transformers' own recipe at its default one-token shape, saved by the user."""
    from transformers.integrations.executorch import TorchExportableModuleForDecoderOnlyLM

    m = copy.deepcopy(families["llama"][0])
    m.generation_config.use_cache, m.generation_config.cache_implementation = True, "static"
    ep = TorchExportableModuleForDecoderOnlyLM(m, batch_size=1, max_cache_len=MAX_LEN).export(
        input_ids=torch.tensor([[1]]), cache_position=torch.tensor([0]))
    path = tmp_path_factory.mktemp("gen") / "llama_static.pt2"
    torch.export.save(ep, path)
    return path


def test_fused_from_user_exported_pt2(families, user_pt2):
    """A one-token program prefills token by token."""
    _, ids, (ref_tokens, ref_logits), _ = families["llama"]
    gen = compile_generator(str(user_pt2), policy="fused")
    out = gen.generate(ids, max_new_tokens=32)
    assert torch.equal(out, ref_tokens)
    assert (gen.last_logits - ref_logits).abs().max().item() < 1e-4


def test_cli_generate(families, user_pt2, capsys, tmp_path):
    from compiler.cli import main

    _, ids, (ref_tokens, _), _ = families["llama"]
    prompt = ",".join(map(str, ids[0].tolist()))
    report = tmp_path / "gen.json"
    assert main(["generate", str(user_pt2), "--prompt-ids", prompt, "--policy", "sinks:4,window:40",
                 "--max-new-tokens", "16", "--report", str(report)]) == 0
    first = capsys.readouterr().out.splitlines()[0]
    assert first == ",".join(map(str, ref_tokens[0, 9:25].tolist()))  # 25 tokens fit the window: exact
    assert json.loads(report.read_text())["cache_bytes"] == 2 * 2 * (1 * 2 * 45 * 16 * 4)  # 4 + 40 + 1 slots
    assert main(["generate", str(user_pt2), "--prompt", "hello"]) == 2
    assert capsys.readouterr().err.strip().endswith("no tokenizer to read --prompt with; give --prompt-ids 1,2,3")
    assert main(["generate", str(tmp_path / "missing.pt2"), "--prompt-ids", "1"]) == 2
    assert "no such file" in capsys.readouterr().err


# ---------------------------------------------------------------------------- reference for bounded caches


def _keep(pos, sinks, window):
    """[S, S] keep set of a full-history pass: query i sees j <= i that are sinks or in i - window .. i
    (compile()'s window:left)."""
    i, j = pos[:, None], pos[None, :]
    return (j <= i) & ((j < sinks) | (j >= i - window))


def _reference_model(model, head_rules):
    """A copy of ``model`` whose attention is dense masked attention with, per layer and query
    head, the keep set ``head_rules(layer, head) -> (sinks, window) or None`` (None: causal)."""
    name = f"keepset_ref_{id(head_rules)}"

    def attend(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        b, h, s, d = query.shape
        rep = h // key.shape[1]
        k = key.repeat_interleave(rep, dim=1)
        v = value.repeat_interleave(rep, dim=1)
        pos = torch.arange(s)
        keep = torch.stack([_keep(pos, *(head_rules(module.layer_idx, hh) or (0, s + 1))) for hh in range(h)])
        scores = (query @ k.transpose(-1, -2)) * scaling
        probs = scores.masked_fill(~keep, float("-inf")).softmax(-1)
        return (probs @ v).transpose(1, 2).contiguous(), None

    AttentionInterface.register(name, attend)
    ref = copy.deepcopy(model)
    ref.set_attn_implementation(name)
    return ref


def _reference_generate(ref, ids, n):
    logits = []
    with torch.no_grad():
        for _ in range(n):
            step = ref(ids, use_cache=False).logits[:, -1].float()
            logits.append(step)
            ids = torch.cat([ids, step.argmax(-1, keepdim=True)], dim=1)
    return ids, torch.cat(logits)


def _cache_buffers(gen):
    return {k: b for k, b in gen.module.named_buffers() if k.startswith("attnforge_kv_")}


@pytest.fixture(scope="module")
def streaming(families):
    model, _, _, ep = families["llama"]
    torch.manual_seed(5)
    ids = torch.randint(1, VOCAB, (1, 10))
    ref = _reference_model(model, lambda layer, head: (4, 16))
    return model, ep, ids, _reference_generate(ref, ids, 90)


def test_window_means_what_it_means_in_compile():
    """window:16 in generation keeps keys i-16 .. i, as compile()'s window:16 does (17 keys)."""
    from compiler.reference.kv_cache import CacheGroup, keep_mask

    pos = torch.arange(40)
    assert torch.equal(keep_mask(pos, pos, 4, CacheGroup((0,), 4, 16).ring), _keep(pos, 4, 16))
    assert int(_keep(pos, 4, 16)[39].sum()) == 4 + 17 and CacheGroup((0,), 4, 16).slots(64) == 21


def test_sinks_window_equals_reference(streaming):
    _, ep, ids, (ref_tokens, ref_logits) = streaming
    gen = compile_generator(ep, policy="sinks:4,window:16")
    before = {k: (b.shape, b.data_ptr()) for k, b in _cache_buffers(gen).items()}
    out = gen.generate(ids, max_new_tokens=90)  # 84 steps past the window filling
    assert torch.equal(out, ref_tokens)
    assert (gen.last_logits - ref_logits).abs().max().item() < 1e-4
    # Constant memory: the same 4 + 16 + 1 slots, never reallocated, and that is what is reported.
    after = {k: (b.shape, b.data_ptr()) for k, b in _cache_buffers(gen).items()}
    assert after == before and all(shape[2] == 21 for shape, _ in after.values())
    real = sum(b.nbytes for b in _cache_buffers(gen).values())
    assert gen.cache_bytes == real == gen.report.cache_bytes == 2 * 2 * (1 * 2 * 21 * 16 * 4)
    assert gen.report.full_cache_bytes == 2 * 2 * (1 * 2 * MAX_LEN * 16 * 4)


def test_sinks_window_prompt_longer_than_cache(streaming):
    """A bounded cache prefills a prompt longer than max_cache_len in chunks (ring history + new keys)."""
    model, ep, _, _ = streaming
    torch.manual_seed(6)
    ids = torch.randint(1, VOCAB, (1, MAX_LEN + 12))
    ref_tokens, ref_logits = _reference_generate(_reference_model(model, lambda layer, head: (4, 16)), ids, 8)
    gen = compile_generator(ep, policy="sinks:4,window:16")
    assert torch.equal(gen.generate(ids, max_new_tokens=8), ref_tokens)
    assert (gen.last_logits - ref_logits).abs().max().item() < 1e-4


def test_window_covering_everything_equals_fused(families):
    model, ids, (ref_tokens, ref_logits), ep = families["llama"]
    gen = compile_generator(ep, policy="sinks:4,window:60")  # 9 + 32 tokens never leave the window
    out = gen.generate(ids, max_new_tokens=32)
    assert torch.equal(out, ref_tokens)
    assert (gen.last_logits - ref_logits).abs().max().item() < 1e-4


def test_head_mix_equals_reference_head_by_head(streaming):
    """DuoAttention: query heads 0-1 (KV head 0) keep the full cache, heads 2-3 (KV head 1) stream."""
    model, ep, ids, _ = streaming
    ref = _reference_model(model, lambda layer, head: None if head < 2 else (4, 16))
    ref_tokens, ref_logits = _reference_generate(ref, ids, 40)
    gen = compile_generator(ep, policy="heads[0-1]=fused; heads[*]=sinks:4,window:16")
    out = gen.generate(ids, max_new_tokens=40)
    assert torch.equal(out, ref_tokens)
    assert (gen.last_logits - ref_logits).abs().max().item() < 1e-4
    # A reference where every head streams gives other logits: the mix really is per head.
    stream_only = _reference_generate(_reference_model(model, lambda layer, head: (4, 16)), ids, 40)[1]
    assert (gen.last_logits - stream_only).abs().max().item() > 1e-3
    bufs = _cache_buffers(gen)
    assert sorted(b.shape[2] for b in bufs.values()) == [21] * 4 + [MAX_LEN] * 4
    assert gen.cache_bytes == sum(b.nbytes for b in bufs.values()) == gen.report.cache_bytes
    assert [s.layout for s in gen.report.sites] == ["0:full|1:sinks=4,window=16"] * 2


def test_sampling(families):
    _, ids, (ref_tokens, _), ep = families["llama"]
    gen = compile_generator(ep, policy="fused")
    assert torch.equal(gen.generate(ids, 16, do_sample=True, top_k=1, seed=0), ref_tokens[:, :25])
    assert torch.equal(gen.generate(ids, 16, do_sample=True, top_p=1e-6, seed=0), ref_tokens[:, :25])
    a = gen.generate(ids, 16, do_sample=True, temperature=1.5, top_k=50, top_p=0.9, seed=3)
    b = gen.generate(ids, 16, do_sample=True, temperature=1.5, top_k=50, top_p=0.9, seed=3)
    assert torch.equal(a, b) and not torch.equal(a, ref_tokens[:, :25])


# ---------------------------------------------------------------------------- bad input


def test_prompt_longer_than_full_cache(families):
    _, _, _, ep = families["llama"]
    gen = compile_generator(ep, policy="fused")
    with pytest.raises(compiler.InputError, match=r"exceeds max_cache_len=64 .*raise max_cache_len or use a bounded"):
        gen.generate(torch.ones(1, 60, dtype=torch.long), max_new_tokens=8)


@pytest.mark.parametrize("policy, message", [
    ("blocksparse:block=16,local=1,global=1", r"blocksparse.* has no KV-cache form for generation; use fused"),
    ("auto", r"policy='auto' needs a budget"),
    ("heads[0]=fused; heads[*]=sinks:4,window:16", r"query heads \[0, 1\] share KV head 0.*same heads"),
    ("window:16,right:4", r"looks at future keys"),
])
def test_policy_that_cannot_express_a_site(families, policy, message):
    _, _, _, ep = families["llama"]
    with pytest.raises(compiler.PolicyError, match=message):
        compile_generator(ep, policy=policy)


def test_models_that_cannot_be_captured_with_a_cache(families):
    with pytest.raises(compiler.CaptureError, match="cannot be captured with a KV cache"):
        compile_generator(torch.nn.Linear(4, 4), torch.ones(1, 4, dtype=torch.long))
    attn = torch.nn.MultiheadAttention(16, 2, batch_first=True).eval()

    class Encoder(torch.nn.Module):
        def forward(self, x):
            return attn(x, x, x, need_weights=False)[0]

    ep = compiler.capture(Encoder(), (torch.randn(1, 8, 16),))
    with pytest.raises(compiler.CaptureError, match="not a static KV cache"):
        compile_generator(ep)
    with pytest.raises(compiler.PolicyError, match=r"linear.* has no KV-cache form"):  # before any capture
        compile_generator(torch.nn.Linear(4, 4), policy="linear:elu")
    with pytest.raises(compiler.BackendError, match="unknown backend 'tvm'; valid backends: torch, onnxruntime, triton"):
        compile_generator(families["llama"][3], backend="tvm")


def test_sliding_window_model_is_refused(one_thread):
    """The exported mask is evaluated, not trusted: a sliding-window mask is not offset causality."""
    cfg = transformers.MistralConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                     num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                                     sliding_window=8)
    model = transformers.MistralForCausalLM(cfg).eval()
    with pytest.raises(compiler.CaptureError, match=r"attn.0 .*not masked causally in cache_position"):
        compile_generator(model, torch.ones(1, 4, dtype=torch.long), max_cache_len=32)


def test_passes_import_on_their_own():
    """compiler imports the generator, which needs passes: importing a pass first must still work."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    for mod in ("passes.cache_rewrite", "passes.attention_discovery"):
        r = subprocess.run([sys.executable, "-c", f"import {mod}"], cwd=root, capture_output=True, text=True,
                           env={**os.environ, "PYTHONPATH": str(root)})
        assert r.returncode == 0, r.stderr.strip().splitlines()[-1:]
