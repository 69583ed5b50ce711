"""Generation with a KV cache: compile_generator against the model's own generate().

    python tools/bench_generate.py [--quick] [--prompts 1024,4096] [--new-tokens 128] [--threads 2]

A Llama-shaped model with random weights (4 layers, hidden 512, 8 heads, 2 KV heads, fp32) on
CPU. For each prompt length, in one run: the model's own ``generate()`` (dynamic cache, eager,
SDPA attention), and ``compiler.compile_generator`` with ``fused`` (exact, full static cache
read up to the filled length) and ``sinks:4,window:1024`` (StreamingLLM ring). Greedy, same
prompt. Columns: prefill time (prompt -> first token), decode tokens/s over the remaining
tokens (best of --repeats runs), the peak resident memory ``generate`` adds above what was live before it
(backends/memory_probe: VmHWM reset through /proc/self/clear_refs), KV-cache bytes (what the
cache holds at the end: DynamicCache's tensors for the peer, our buffers), and whether the
tokens equal the peer's. ``--quick``: prompts 256 and 1024, 64 new tokens.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import transformers  # noqa: E402

from backends import memory_probe  # noqa: E402
from compiler.generate import capture_for_generation, compile_generator  # noqa: E402
from tools.benchlib import command_line, machine, markdown_table, print_table, today, versions  # noqa: E402

POLICIES = ("fused", "sinks:4,window:1024")


def make_model(layers=4, hidden=512, heads=8, kv_heads=2, vocab=32000):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=hidden * 3,
                                   num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                                   max_position_embeddings=1 << 17)
    return transformers.LlamaForCausalLM(cfg).eval()


def peer(model, ids, new_tokens, repeats):
    """The model's own greedy generate(): (tokens, prefill s, decode tokens/s, peak bytes, KV bytes), best of
    ``repeats``."""
    kw = dict(do_sample=False, eos_token_id=None, pad_token_id=0, return_dict_in_generate=True)
    prefill, total = [], []
    with torch.no_grad():
        model.generate(ids[:, :8], max_new_tokens=2, **kw)  # warm-up
        for _ in range(repeats):
            t0 = time.perf_counter()
            model.generate(ids, max_new_tokens=1, min_new_tokens=1, **kw)
            prefill.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            peak, out = memory_probe.peak_bytes(
                lambda: model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, **kw))
            total.append(time.perf_counter() - t0)
    kv = sum(t.nbytes for layer in out.past_key_values.layers for t in (layer.keys, layer.values))
    decode = min(t - p for t, p in zip(total, prefill))
    return out.sequences, min(prefill), (new_tokens - 1) / max(1e-9, decode), peak, kv


def ours(ep, policy, ids, new_tokens, repeats):
    gen = compile_generator(ep, policy=policy)
    gen.generate(ids[:, :8], max_new_tokens=2)  # warm-up
    prefill, decode = [], []
    for _ in range(repeats):
        peak, out = memory_probe.peak_bytes(lambda: gen.generate(ids, max_new_tokens=new_tokens))
        prefill.append(gen.report.prefill_seconds)
        decode.append(gen.report.decode_seconds)
    return out, min(prefill), (new_tokens - 1) / max(1e-9, min(decode)), peak, gen.cache_bytes


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--prompts", default=None, help="comma-separated prompt lengths (default 1024,4096)")
    ap.add_argument("--new-tokens", type=int, default=None)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=2, help="best of this many runs per method")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    prompts = [int(x) for x in (a.prompts or ("256,1024" if a.quick else "1024,4096")).split(",")]
    new = a.new_tokens or (64 if a.quick else 128)
    model = make_model()
    rows = []
    for n in prompts:
        torch.manual_seed(n)
        ids = torch.randint(1, model.config.vocab_size, (1, n))
        ref, *m = peer(model, ids, new, a.repeats)
        rows.append(dict(prompt=n, method="model.generate (dynamic cache)", prefill_s=m[0], decode_tok_s=m[1],
                         peak_mib=m[2] / 2**20, kv_mib=m[3] / 2**20, same_tokens="-"))
        ep = capture_for_generation(model, ids[:, :16], n + new)
        for pol in POLICIES:
            out, *m = ours(ep, pol, ids, new, a.repeats)
            rows.append(dict(prompt=n, method=f"attnforge {pol}", prefill_s=m[0], decode_tok_s=m[1],
                             peak_mib=m[2] / 2**20, kv_mib=m[3] / 2**20,
                             same_tokens=str(bool(torch.equal(out, ref)))))
        del ep
        peer_row = rows[-len(POLICIES) - 1]
        for r in rows[-len(POLICIES):]:
            r["decode_vs_peer"] = r["decode_tok_s"] / peer_row["decode_tok_s"]
            r["kv_smaller"] = peer_row["kv_mib"] / r["kv_mib"]
    cols = ["prompt", "method", "prefill_s", "decode_tok_s", "decode_vs_peer", "peak_mib", "kv_mib", "kv_smaller",
            "same_tokens"]
    print_table(rows, cols, "generation, Llama-shaped 4x512, 8 heads / 2 KV heads, fp32")
    print(f"\n{command_line()}\n{today()}, {machine()}, {a.threads} threads; "
          f"{versions('torch', 'transformers')}; {new} new tokens, greedy\n")
    print(markdown_table(rows, cols, ["prompt", "method", "prefill s", "decode tok/s", "decode vs peer",
                                      "peak MiB", "KV MiB", "KV smaller", "same tokens"]))


if __name__ == "__main__":
    main()
