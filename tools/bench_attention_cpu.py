"""Sparse and linear attention alone on CPU vs dense scaled_dot_product_attention.

    python tools/bench_attention_cpu.py [--seqs 2048 8192 16384] [--repeats 5] [--threads 2]

fp32, B=1, H=8, D=64, causal. Each repeat runs dense SDPA and then every variant (interleaved,
so machine noise hits all alike); we report medians, the speedup over dense, the variant's density
(scores computed / causal pairs; FLOPs ratio for linear) and how close the speedup comes to the
ideal 1/density. Writes docs/attention_cpu.csv.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

import compiler  # noqa: F401  (registers the ops)
from compiler.reference.linear_ops import linear_density
from compiler.ir.ops import causal_pairs
from compiler.driver.progress import progress
from compiler.reference.sparse_ops import sparse_computed_pairs
from compiler.variants.language import parse_variant
from benchlib import write_csv

VARIANTS = ("window:256", "window:256,sinks:4", "topk:blocks=4,block=64", "linear:elu")


def _op(text: str):
    v = parse_variant(text)
    if v.kind == "sparse":
        return lambda q, k, v_: torch.ops.attnforge.sparse_attention(q, k, v_, None, 0.125, True, 0.0, v.text)
    return lambda q, k, v_: torch.ops.attnforge.linear_attention(q, k, v_, None, 0.125, True, v.text)


def _density(text: str, q, k) -> float:
    v = parse_variant(text)
    s, d = q.shape[2], q.shape[3]
    if v.kind == "sparse":
        return sparse_computed_pairs(q, k, v.text, 0.125, True) / causal_pairs(s, s)
    return linear_density(v.text, s, s, d, d, True)


def _time(fn, *args) -> float:
    t0 = time.perf_counter()
    with torch.no_grad():
        fn(*args)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seqs", type=int, nargs="+", default=[2048, 8192, 16384])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="docs/attention_cpu.csv")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    dense = lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True)  # noqa: E731
    rows = []
    for s in a.seqs:
        g = torch.Generator().manual_seed(0)
        q, k, v = (torch.randn(1, 8, s, 64, generator=g) for _ in range(3))
        fns = {"dense": dense, **{t: _op(t) for t in VARIANTS}}
        for fn in fns.values():
            _time(fn, q, k, v)  # warm-up: caches static layouts
        reps = a.repeats if s < 16384 else max(2, a.repeats // 2)
        times = {name: [] for name in fns}
        with progress(f"seq {s}", reps) as advance:
            for _ in range(reps):
                for name, fn in fns.items():
                    times[name].append(_time(fn, q, k, v))
                advance()
        dense_ms = statistics.median(times["dense"]) * 1e3
        for t in VARIANTS:
            ms = statistics.median(times[t]) * 1e3
            dens = _density(t, q, k)
            speed = dense_ms / ms
            rows.append({"seq": s, "variant": t, "ms": round(ms, 1), "dense_sdpa_ms": round(dense_ms, 1),
                         "speedup": round(speed, 2), "density": round(dens, 4), "ideal_speedup": round(1 / dens, 2),
                         "speedup_vs_ideal": round(speed * dens, 3)})
            print(",".join(str(x) for x in rows[-1].values()), flush=True)
    write_csv(rows, a.out)


if __name__ == "__main__":
    main()
