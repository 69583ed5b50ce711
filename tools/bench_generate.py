"""Generation with a KV cache: compile_generator against the model's own generate().

    python tools/bench_generate.py [--quick] [--prompts 1024,4096] [--new-tokens 128] [--threads 2] [--repeats 2]
                                   ['--policies=fused|sinks:4,window:1024'] [--no-static]

A Llama-shaped model with random weights (4 layers, hidden 512, 8 heads, 2 KV heads, fp32) on
CPU. For each prompt length, in one run: the model's own ``generate()`` (dynamic cache, eager,
SDPA attention), the model's own ``generate()`` with its static cache and the decode step under
``torch.compile`` (transformers' auto-compile, ``CompileConfig(mode="default")``, enabled on CPU;
the prefill runs eagerly, as transformers does; the compile happens in a warm-up on a short
prompt with the same cache object), and ``compiler.compile_generator`` with ``fused`` (exact, full static cache
read up to the filled length), ``sinks:4,window:1024`` (StreamingLLM ring) and half the KV heads
streaming (``heads[0-3]=fused; heads[*]=sinks:4,window:1024``, DuoAttention). Greedy, same
prompt. Columns: prefill time (prompt -> first token; the peer's from a streamer's
timestamps), decode tokens/s over the remaining tokens (best of --repeats interleaved rounds),
the peak resident memory ``generate`` adds above what was live before it
(backends/memory_probe: VmHWM reset through /proc/self/clear_refs), KV-cache bytes (what the
cache holds at the end: DynamicCache's tensors for the peer, our buffers), and whether the
tokens equal the peer's. ``--quick``: prompts 256 and 1024, 64 new tokens.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import transformers  # noqa: E402

from backends import memory_probe  # noqa: E402
from compiler.driver.generate import capture_for_generation, compile_generator  # noqa: E402
from tools.benchlib import command_line, machine, markdown_table, print_table, today, versions  # noqa: E402

STATIC = "model.generate (static cache, torch.compile)"
POLICIES = ("fused", "sinks:4,window:1024", "heads[0-3]=fused; heads[*]=sinks:4,window:1024")


def make_model(layers=4, hidden=512, heads=8, kv_heads=2, vocab=32000):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=hidden * 3,
                                   num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                                   max_position_embeddings=1 << 17)
    return transformers.LlamaForCausalLM(cfg).eval()


class _Clock:
    """A generate() streamer that stamps each put(): the prompt first, then every new token."""

    def __init__(self):
        self.stamps = []

    def put(self, value):
        self.stamps.append(time.perf_counter())

    def end(self):
        pass


def peer_run(model, ids, new_tokens):
    """One greedy model.generate(): (tokens, prefill s, decode s, peak bytes, KV bytes); prefill is
    the time to the first new token, decode the time from it to the last."""
    clock = _Clock()
    kw = dict(do_sample=False, eos_token_id=None, pad_token_id=0, return_dict_in_generate=True, streamer=clock)
    with torch.no_grad():
        t0 = time.perf_counter()
        peak, out = memory_probe.peak_bytes(
            lambda: model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, **kw))
    kv = sum(t.nbytes for layer in out.past_key_values.layers for t in (layer.keys, layer.values))
    return out.sequences, clock.stamps[1] - t0, clock.stamps[-1] - clock.stamps[1], peak, kv


def static_peer(model, n, new_tokens):
    """model.generate() with a StaticCache of ``n + new_tokens`` slots and its decode step under
    torch.compile; the same cache object is reset and reused so the warm-up's compile serves."""
    cache = transformers.StaticCache(config=model.config, max_cache_len=n + new_tokens)
    cc = transformers.CompileConfig(mode="default")
    cc._compile_all_devices = True  # transformers' switch to auto-compile on CPU

    def run(ids, new):
        cache.reset()
        clock = _Clock()
        kw = dict(do_sample=False, eos_token_id=None, pad_token_id=0, return_dict_in_generate=True, streamer=clock,
                  cache=cache, compile_config=cc)
        with torch.no_grad():
            t0 = time.perf_counter()
            peak, out = memory_probe.peak_bytes(
                lambda: model.generate(ids, max_new_tokens=new, min_new_tokens=new, **kw))
        kv = sum(t.nbytes for layer in cache.layers for t in (layer.keys, layer.values))
        return out.sequences, clock.stamps[1] - t0, clock.stamps[-1] - clock.stamps[1], peak, kv

    return run


def ours_run(gen, ids, new_tokens):
    peak, out = memory_probe.peak_bytes(lambda: gen.generate(ids, max_new_tokens=new_tokens))
    return out, gen.report.prefill_seconds, gen.report.decode_seconds, peak, gen.cache_bytes


def measure(contenders: dict, repeats: int) -> dict:
    """Interleaved repeats (every method once per round, so load drifts hit all alike); best of each."""
    best = {}
    for _ in range(repeats):
        for name, run in contenders.items():
            out, prefill, decode, peak, kv = run()
            b = best.setdefault(name, [out, prefill, decode, peak, kv])
            b[1], b[2], b[3] = min(b[1], prefill), min(b[2], decode), max(b[3], peak)
    return best


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--prompts", default=None, help="comma-separated prompt lengths (default 1024,4096)")
    ap.add_argument("--new-tokens", type=int, default=None)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=2, help="best of this many runs per method")
    ap.add_argument("--policies", default="|".join(POLICIES), help="policies separated by '|', e.g. "
                                                                   "'fused|sinks:4,window:1024'")
    ap.add_argument("--no-static", action="store_true", help="leave out the static-cache torch.compile peer")
    ap.add_argument("--backends", default="torch", help="comma-separated generation backends (torch, onnxruntime, "
                                                        "triton)")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    prompts = [int(x) for x in (a.prompts or ("256,1024" if a.quick else "1024,4096")).split(",")]
    new = a.new_tokens or (64 if a.quick else 128)
    model = make_model()
    rows = []
    for n in prompts:
        torch.manual_seed(n)
        ids = torch.randint(1, model.config.vocab_size, (1, n))
        ep = capture_for_generation(model, ids[:, :16], n + new)
        backends = a.backends.split(",")
        gens = {f"attnforge {pol}" + ("" if b == "torch" else f" [{b}]"): compile_generator(ep, policy=pol, backend=b)
                for b in backends for pol in [p.strip() for p in a.policies.split("|")]}
        with torch.no_grad():  # warm-up
            model.generate(ids[:, :8], max_new_tokens=2, do_sample=False, eos_token_id=None, pad_token_id=0)
        for g in gens.values():
            g.generate(ids[:, :8], max_new_tokens=2)
        contenders = {"model.generate (dynamic cache)": lambda: peer_run(model, ids, new)}
        if not a.no_static:
            static = static_peer(model, n, new)
            t0 = time.perf_counter()
            static(ids[:, :8], 4)  # compiles the decode step for this cache's shapes
            print(f"static-cache peer: warm-up with torch.compile {time.perf_counter() - t0:.1f} s", flush=True)
            contenders[STATIC] = lambda: static(ids, new)
        contenders = {**contenders,
                      **{name: (lambda g=g: ours_run(g, ids, new)) for name, g in gens.items()}}
        best = measure(contenders, a.repeats)
        ref = best["model.generate (dynamic cache)"][0]
        # The best peer's decode: the faster of the dynamic cache and the compiled static cache.
        peers = [b for name, b in best.items() if not name.startswith("attnforge")]
        peer_decode, peer_kv = min(b[2] for b in peers), best["model.generate (dynamic cache)"][4]
        for name, (out, prefill, decode, peak, kv) in best.items():
            row = dict(prompt=n, method=name, prefill_s=prefill, decode_tok_s=(new - 1) / decode,
                       peak_mib=peak / 2**20, kv_mib=kv / 2**20)
            if name != "model.generate (dynamic cache)":
                row.update(same_tokens=str(bool(torch.equal(out, ref))))
            if name.startswith("attnforge"):
                row.update(decode_vs_peer=peer_decode / decode, kv_smaller=peer_kv / kv)
                if "attnforge fused" in best:  # a bounded cache against our own full one
                    row.update(decode_vs_fused=best["attnforge fused"][2] / decode,
                               kv_vs_fused=best["attnforge fused"][4] / kv)
            rows.append(row)
        del ep, gens, contenders
    cols = ["prompt", "method", "prefill_s", "decode_tok_s", "decode_vs_peer", "decode_vs_fused", "peak_mib", "kv_mib",
            "kv_smaller", "kv_vs_fused", "same_tokens"]
    print_table(rows, cols, "generation, Llama-shaped 4x512, 8 heads / 2 KV heads, fp32")
    print(f"\n{command_line()}\n{today()}, {machine()}, {a.threads} threads; "
          f"{versions('torch', 'transformers')}; {new} new tokens, greedy\n")
    print(f"load average at the end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print(markdown_table(rows, cols, ["prompt", "method", "prefill s", "decode tok/s", "decode vs best peer",
                                      "decode vs fused", "peak MiB", "KV MiB", "KV smaller (vs dynamic)",
                                      "KV vs fused", "same tokens"]))


if __name__ == "__main__":
    main()
