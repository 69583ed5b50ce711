"""End to end through ``compile()``: what a user gets, against the original and the best peer.

    python tools/bench_e2e.py [--quick] [--seqs 8192 16384] [--model-seqs 8192] [--threads 2]

1. Attention alone, causal, B=1 H=8 D=64 fp32: dense SDPA vs compiled FlexAttention on the
   same mask (its own default blocks) vs ``compile(..., backend="torch")`` vs
   ``compile(..., backend="onnxruntime")``, for window 256 and sinks 4 + window 256. Ratios are
   over dense SDPA in the same run; "of ideal" is the speedup times the variant's density
   (scores computed / causal pairs, as the report says).
2. A Llama-shaped model (transformers LlamaModel, random weights, 4 layers, 8 heads, head dim
   64, GQA 2, SDPA attention) end to end: the original eager and ``torch.compile``d vs
   ``compile(model, ...)`` with ``fused``, a window and a top-k policy, on both CPU backends.
3. ``compile()`` itself: wall time and peak memory (VmHWM growth) next to one forward pass of
   the original.

Medians over interleaved repeats (tools/benchlib.py). Prints markdown for docs/benchmarks.md and
writes docs/e2e.csv. ``--quick`` runs tiny sizes once (a CI smoke test, numbers meaningless).
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import compiler  # noqa: E402
from backends import memory_probe  # noqa: E402
from benchlib import (Contender, command_line, machine, markdown_table, print_table, time_interleaved, today,  # noqa: E402
                      versions, write_csv)

ATTN_POLICIES = ("window:256", "window:256,sinks:4")
MODEL_POLICIES = ("fused", "window:256,sinks:4", "topk:blocks=4,block=64")


def measured_compile(fn):
    """(result, seconds, peak memory growth in MiB or None)."""
    gc.collect()
    ok = memory_probe._reset_peak()  # noqa: SLF001 - the probe's VmHWM reset, without its malloc pinning
    base = memory_probe._status("VmHWM:") if ok else 0  # noqa: SLF001
    t0 = time.perf_counter()
    out = fn()
    dt = time.perf_counter() - t0
    return out, dt, ((memory_probe._status("VmHWM:") - base) / 2**20 if ok else None)  # noqa: SLF001


class Causal(torch.nn.Module):
    def forward(self, q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)


def _flex(seq: int, window: int, sinks: int):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    def mask_mod(b, h, i, j):
        return (j <= i) & ((i - j <= window) | (j < sinks))

    bm = create_block_mask(mask_mod, None, None, seq, seq, device="cpu")
    fn = torch.compile(flex_attention, dynamic=False)

    def run(q, k, v):
        # Every mask and length recompiles flex_attention's one frame; past dynamo's limit (8)
        # torch would run flex's unfused fallback (the whole score matrix: killed at 16k).
        with torch.no_grad(), torch._dynamo.config.patch(recompile_limit=64):
            return fn(q, k, v, block_mask=bm, scale=0.125)

    return run


def _window_of(policy: str):
    """(left, sinks) of a window policy, None for the others (no same-mask Flex peer)."""
    from compiler.variants.language import Window, parse_variant

    p = parse_variant(policy).pattern
    return (p.left, p.sinks) if isinstance(p, Window) else None


def attention_alone(seqs, threads, budget_s, max_repeats, policies=ATTN_POLICIES,
                    backends=("torch", "onnxruntime")) -> list[dict]:
    rows = []
    ort = {"intra_op_num_threads": threads, "inter_op_num_threads": 1}
    for s in seqs:
        g = torch.Generator().manual_seed(0)
        q, k, v = (torch.randn(1, 8, s, 64, generator=g) for _ in range(3))
        args = (q, k, v)
        for pol in policies:
            window = _window_of(pol)
            cs, notes = [Contender("dense SDPA", lambda: Causal()(*args))], {}
            try:
                if window is None:
                    raise LookupError("no closed-form mask for this policy")
                flex, dt, _ = measured_compile(lambda: _flex(s, *window))
                flex(*args)  # compiles
                cs.append(Contender("FlexAttention (compiled, same mask)", lambda: flex(*args)))
            except Exception as e:  # noqa: BLE001
                cs.append(Contender("FlexAttention (compiled, same mask)", status=f"skipped ({type(e).__name__}: {e})"))
            density = None
            for backend in backends:
                name = f"compile(..., backend={backend!r})"
                try:
                    cm, dt, peak = measured_compile(
                        lambda: compiler.compile(Causal(), args, pol, backend,
                                                 backend_options=ort if backend == "onnxruntime" else None))
                    density = cm.report.sites[0].density
                    notes[name] = f"compile {dt:.1f}s, peak +{peak:.0f} MiB" if peak is not None else f"compile {dt:.1f}s"
                    cs.append(Contender(name, (lambda cm=cm: cm(*args))))
                except Exception as e:  # noqa: BLE001
                    cs.append(Contender(name, status=f"failed ({type(e).__name__}: {str(e)[:80]})"))
            with torch.no_grad():
                time_interleaved(cs, min_repeats=min(3, max_repeats), max_repeats=max_repeats,
                                 budget_s=budget_s, label=f"attention {s} {pol}", keep_outputs=False)
            dense = cs[0].ms
            flex_ms = cs[1].ms if cs[1].ok else None
            for c in cs:
                speed = dense / c.ms if c.ms and dense else None
                rows.append({"part": "attention", "seq": s, "policy": pol, "contender": c.name,
                             "ms": round(c.ms, 1) if c.ms else None, "vs_dense": round(speed, 2) if speed else None,
                             "of_ideal": round(speed * density, 2) if speed and density and c.name.startswith("compile")
                             else None,
                             "vs_flex": round(flex_ms / c.ms, 2) if flex_ms and c.ms else None,
                             "density": round(density, 4) if density else None,
                             "note": notes.get(c.name, "") if c.ok else c.status})
            print_table(rows[-len(cs):], ["seq", "policy", "contender", "ms", "vs_dense", "of_ideal", "vs_flex", "note"])
            del cs
            gc.collect()
    return rows


def llama(seq: int, tiny: bool = False):
    import transformers as tf

    torch.manual_seed(0)
    width = 64 if tiny else 512
    cfg = tf.LlamaConfig(hidden_size=width, intermediate_size=2 * width, num_hidden_layers=2 if tiny else 4,
                         num_attention_heads=8, num_key_value_heads=4, vocab_size=1000,
                         max_position_embeddings=max(seq, 2048), attn_implementation="sdpa")
    model = tf.LlamaModel(cfg).eval()
    ids = torch.randint(0, 1000, (1, seq), generator=torch.Generator().manual_seed(1))
    return model, {"input_ids": ids, "use_cache": False}


def _hidden(out):
    return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]


def model_end_to_end(seqs, threads, budget_s, max_repeats, backends, policies=MODEL_POLICIES,
                     quick: bool = False, tc_max_bytes: float = 12 * 2**30) -> list[dict]:
    rows = []
    ort = {"intra_op_num_threads": threads, "inter_op_num_threads": 1}
    for s in seqs:
        model, kw = llama(s, tiny=quick)
        with torch.no_grad():
            _, fwd, fwd_peak = measured_compile(lambda: model(**kw))
        cs = [Contender("original (eager)", lambda: _hidden(model(**kw)))]
        compiled_orig = torch.compile(model, dynamic=False)
        # Inductor runs this model's masked SDPA on its math path, [8, S, S] fp32 scores per layer
        # (0.41x eager and an 11.8 GB process at 16k): at 32k that is 32 GiB, past this machine.
        too_big = 8 * s * s * 4 > tc_max_bytes
        cs.append(Contender("original, torch.compile", lambda: _hidden(compiled_orig(**kw)),
                            status="skipped (--quick)" if quick else
                            f"skipped (its math-path scores, {8 * s * s * 4 / 2**30:.0f} GiB, exceed --torch-compile-max-gib)"
                            if too_big else "ok"))
        notes = {}
        for pol in policies:
            for backend in backends:
                name = f"compile {pol} ({backend})"
                try:
                    cm, dt, peak = measured_compile(
                        lambda: compiler.compile(model, (), pol, backend, example_kwargs={"input_ids": kw["input_ids"]},
                                                 backend_options=ort if backend == "onnxruntime" else None))
                    rewritten = sum(x.status == "rewritten" for x in cm.report.sites)
                    notes[name] = (f"{rewritten}/{len(cm.report.sites)} sites; compile {dt:.1f}s = {dt / fwd:.1f}x "
                                   f"one forward ({fwd:.2f}s)" + (f", peak +{peak:.0f} MiB (forward +{fwd_peak:.0f})"
                                                                  if peak is not None else ""))
                    cs.append(Contender(name, (lambda cm=cm: _hidden(cm(input_ids=kw["input_ids"])))))
                except Exception as e:  # noqa: BLE001
                    cs.append(Contender(name, status=f"failed ({type(e).__name__}: {str(e)[:100]})"))
                print(f"  {s} {name}: {notes.get(name) or cs[-1].status}", flush=True)  # kept if a later step is killed
                gc.collect()
        with torch.no_grad():
            time_interleaved(cs, min_repeats=min(3, max_repeats), max_repeats=max_repeats,
                             budget_s=budget_s, label=f"llama {s}", keep_outputs=False)
        eager = cs[0].ms
        tc = cs[1].ms
        for c in cs:
            rows.append({"part": "model", "seq": s, "contender": c.name, "ms": round(c.ms, 1) if c.ms else None,
                         "vs_eager": round(eager / c.ms, 2) if eager and c.ms else None,
                         "vs_torch_compile": round(tc / c.ms, 2) if tc and c.ms else None,
                         "note": notes.get(c.name, "") if c.ok else c.status})
        print_table(rows[-len(cs):], ["seq", "contender", "ms", "vs_eager", "vs_torch_compile", "note"])
        del cs, compiled_orig
        gc.collect()
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="tiny sizes, one repeat: a smoke test")
    ap.add_argument("--seqs", type=int, nargs="+", default=[8192, 16384, 32768])
    ap.add_argument("--model-seqs", type=int, nargs="+", default=[8192, 16384, 32768])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--backends", nargs="+", default=["torch", "onnxruntime"])
    ap.add_argument("--policies", nargs="+", default=list(ATTN_POLICIES),
                    help="policies for the attention-alone part (a window, sinks, top-k or linear policy)")
    ap.add_argument("--skip", nargs="*", default=[], choices=["attention", "model"])
    ap.add_argument("--model-policies", nargs="+", default=list(MODEL_POLICIES),
                    help="policies for the model part (each on every backend)")
    ap.add_argument("--torch-compile-max-gib", type=float, default=12.0,
                    help="skip the torch.compile'd original where its [8, S, S] fp32 scores would exceed this")
    ap.add_argument("--repeats", type=int, default=5, help="most timed calls per contender (at least 3, or 1 if 1)")
    ap.add_argument("--out", default="docs/e2e.csv")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    attn_pols, model_pols, model_backends = tuple(a.policies), tuple(a.model_policies), a.backends
    if a.quick:  # every code path once, on tiny sizes
        a.seqs, a.model_seqs, budget, reps = [256], [64], 1.0, 1
        attn_pols, model_pols, model_backends = ("window:64,sinks:4,block=32",), ("fused", "window:16,sinks:4,block=16"), ["torch"]
    else:
        budget, reps = 20.0, a.repeats
    rows = []
    if "attention" not in a.skip:
        rows += attention_alone(a.seqs, a.threads, budget, reps, attn_pols, a.backends)
    if "model" not in a.skip:
        rows += model_end_to_end(a.model_seqs, a.threads, budget, reps, model_backends, model_pols, a.quick,
                                 a.torch_compile_max_gib * 2**30)
    if not a.quick:
        write_csv(rows, a.out)
    print(f"\n{command_line()}; {machine()}; {today()}; {versions('torch', 'onnxruntime', 'transformers')}; "
          f"{a.threads} threads\n")
    att = [r for r in rows if r["part"] == "attention"]
    if att:
        print(markdown_table(att, ["seq", "policy", "contender", "ms", "vs_dense", "of_ideal", "vs_flex", "note"]))
    mod = [r for r in rows if r["part"] == "model"]
    if mod:
        print()
        print(markdown_table(mod, ["seq", "contender", "ms", "vs_eager", "vs_torch_compile", "note"]))


if __name__ == "__main__":
    main()
