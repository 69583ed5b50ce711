"""``attnforge generate`` and ``attnforge demo --generate``."""

from __future__ import annotations

from pathlib import Path

from compiler.ir.errors import InputError

DEMO_POLICY = "heads[0-3]=fused; heads[*]=sinks:4,window:64"


def add_generate_parser(sub) -> None:
    g = sub.add_parser("generate", help="generate text with a KV cache shaped by a policy (fused, sinks+window, "
                                        "head mixes)")
    g.add_argument("model", help="a Hugging Face causal LM directory, or a .pt2 exported with "
                                 "transformers.integrations.executorch (static cache)")
    g.add_argument("--prompt", help="text (needs the model directory's tokenizer)")
    g.add_argument("--prompt-ids", help="token ids, comma-separated (for a .pt2 or a directory without tokenizer)")
    g.add_argument("--policy", default="fused",
                   help="fused, sinks:4,window:1024, or a head mix 'heads[0-3]=fused; heads[*]=sinks:4,window:256'")
    g.add_argument("--max-new-tokens", type=int, default=32)
    g.add_argument("--max-kl", type=float, default=None,
                   help="with --policy auto: the budget, KL divergence of the next-token distributions on the "
                        "prompt's continuation (the prompt is the calibration)")
    g.add_argument("--streaming", default="sinks:4,window:1024",
                   help="with --policy auto: the cache of the heads it makes streaming")
    g.add_argument("--backend", default="torch", choices=["torch", "onnxruntime", "triton"],
                   help="run each step in PyTorch, in one onnxruntime session with the cache bound in place, or "
                        "with the attention over the cache in the Triton kernel (CUDA GPU)")
    g.add_argument("--max-cache-len", type=int, default=None, help="full-cache length (default: min(4096, "
                                                                   "the model's max positions))")
    g.add_argument("--do-sample", action="store_true")
    g.add_argument("--temperature", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=None)
    g.add_argument("--top-p", type=float, default=None)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--report", help="also write the generation report as JSON here")
    g.set_defaults(func=cmd_generate)


def _prompt_ids(a, tokenizer):
    import torch

    if a.prompt_ids:
        try:
            ids = [int(x) for x in a.prompt_ids.split(",") if x.strip()]
        except ValueError:
            raise InputError(f"--prompt-ids {a.prompt_ids!r}: give comma-separated integers, e.g. 1,2,3") from None
        return torch.tensor([ids], dtype=torch.long)
    if a.prompt is None:
        raise InputError("give --prompt TEXT or --prompt-ids 1,2,3")
    if tokenizer is None:
        raise InputError(f"{a.model}: no tokenizer to read --prompt with; give --prompt-ids 1,2,3")
    return tokenizer(a.prompt, return_tensors="pt")["input_ids"]


def cmd_generate(a) -> int:
    import json

    import compiler

    auto = {}
    if a.policy.strip().lower() == "auto":
        if a.max_kl is None:
            raise InputError("--policy auto needs a budget: give --max-kl, e.g. --max-kl 0.01")
        auto = dict(budget=compiler.Fidelity(max_kl=a.max_kl), streaming=a.streaming)

    path = Path(a.model)
    tokenizer = None
    if path.is_dir():
        import transformers

        try:
            model = transformers.AutoModelForCausalLM.from_pretrained(path)
        except Exception as e:  # noqa: BLE001
            raise InputError(f"{path}: not a Hugging Face causal LM directory ({type(e).__name__})") from None
        try:
            tokenizer = transformers.AutoTokenizer.from_pretrained(path)
        except Exception:  # noqa: BLE001 - a directory without tokenizer still takes --prompt-ids
            tokenizer = None
        ids = _prompt_ids(a, tokenizer)
        gen = compiler.compile_generator(model, ids, policy=a.policy, max_cache_len=a.max_cache_len,
                                         backend=a.backend, **auto)
    elif path.suffix == ".pt2":
        ids = _prompt_ids(a, None)
        gen = compiler.compile_generator(path, ids, policy=a.policy, backend=a.backend, **auto)
    else:
        raise InputError(f"{path}: give a Hugging Face model directory or a .pt2 file")
    out = gen.generate(ids, a.max_new_tokens, do_sample=a.do_sample, temperature=a.temperature, top_k=a.top_k,
                       top_p=a.top_p, seed=a.seed)
    new = out[0, ids.shape[1]:].tolist()
    print(tokenizer.decode(new) if tokenizer is not None else ",".join(map(str, new)))
    print(gen.report)
    if a.report:
        Path(a.report).write_text(json.dumps(gen.report.to_dict(), indent=1))
    return 0


def cmd_demo_generate(a) -> int:
    """A small random-weight Llama (GQA): fused generation against the model's own generate(), then a
    DuoAttention mix (half the KV heads streaming) and its cache savings."""
    import torch
    import transformers

    import compiler

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=1024, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                                   num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=4096)
    model = transformers.LlamaForCausalLM(cfg).eval()
    ids = torch.randint(1, cfg.vocab_size, (1, 256))
    new = 64
    with torch.no_grad():
        ref = model.generate(ids, max_new_tokens=new, min_new_tokens=new, do_sample=False, eos_token_id=None,
                             pad_token_id=0)
    ep = compiler.driver.generate.capture_for_generation(model, ids, 512)
    fused = compiler.compile_generator(ep, policy="fused")
    same = bool(torch.equal(fused.generate(ids, new), ref))
    fused.report.model = "LlamaForCausalLM (random weights, 4 layers, 8 heads / 4 KV heads)"
    print(fused.report)
    print(f"fused: {new} greedy tokens {'equal' if same else 'DIFFER from'} model.generate()\n")
    mix = compiler.compile_generator(ep, policy=a.policy if a.policy != "fused" else DEMO_POLICY)
    mix.generate(ids, new)
    mix.report.model = fused.report.model
    print(mix.report)
    return 0 if same else 1
