"""attnforge's Triton kernels vs PyTorch's own attention on one GPU, in one run.

    python tools/bench_triton.py [--quick] [--out docs]
    python tools/bench_triton.py --smoke      # no GPU: tiny sizes in Triton's interpreter

1. Fused, B=4, H=32, D=64 and 128, bf16, causal and not, seq 1k-32k: our kernel vs
   ``scaled_dot_product_attention`` restricted to the flash backend vs FlexAttention
   (``torch.compile(flex_attention)``, causal through its block mask). ms and TFLOP/s.
2. Sparse, causal, bf16, B=4, H=32, D=128, seq 8k-32k: windows 256-2048 and top-k (8 blocks of
   128): our block-sparse kernel vs FlexAttention given the same block mask (windows through
   ``create_block_mask``; top-k through ``BlockMask.from_kv_blocks`` on our kept-block lists, full
   and partial blocks separated as ours are), vs our dense kernel; "of ideal" is the speedup
   over our dense kernel divided by 1/density (density: kept block pairs over the causal pairs).
   Top-k is timed with its selection (pooling, scores, top-k: ours) and without (kernel only).
3. Decode, one query token, B=4, H=32 (8 kv heads), D=128, bf16, keys 8k-128k: our kernel with
   the scheduler's split count and with one split vs SDPA (flash backend).

Times are triton.testing.do_bench medians (CUDA events, L2 flushed between calls). Each
contender's output is checked against SDPA's at the first size of its table. Writes
``triton_bench.csv`` and ``triton_bench.png`` under --out and prints a markdown snippet for
docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

SMOKE = "--smoke" in sys.argv
if SMOKE and not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # before anything imports triton

from benchlib import first_line, machine, markdown_table, print_table, today, versions, write_csv  # noqa: E402


def bench(fn) -> float:
    import triton.testing

    if SMOKE and not torch.cuda.is_available():
        import time

        fn()
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3
    return float(triton.testing.do_bench(fn, warmup=10, rep=50))


def flops(b, h, sq, sk, d, causal) -> float:
    pairs = sq * sk / 2 if causal else sq * sk
    return 4.0 * b * h * pairs * d


def check(out, ref) -> float:
    return float((out.float() - ref.float()).abs().max())


def _sdpa_flash(q, k, v, causal):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backend = SDPBackend.FLASH_ATTENTION if q.is_cuda else SDPBackend.MATH
    enable_gqa = q.shape[1] != k.shape[1]
    with sdpa_kernel(backend):
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=enable_gqa)


def _flex():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False) if torch.cuda.is_available() else flex_attention


def run_contenders(contenders: dict, ref_name: str, check_now: bool, label: str = "") -> dict:
    """name -> (ms, error vs ref or None, status); each printed as it is measured, so a run cut
    short still leaves its numbers."""
    out, outputs = {}, {}
    for name, fn in contenders.items():
        try:
            res = fn()
            outputs[name] = res
            out[name] = [bench(fn), None, "ok"]
        except Exception as e:  # noqa: BLE001 - a peer that cannot run is a result
            out[name] = [None, None, f"failed ({first_line(e)})"]
    if check_now and ref_name in outputs:
        for name, res in outputs.items():
            if name != ref_name:
                out[name][1] = check(res, outputs[ref_name])
    for name, (ms, err, status) in out.items():
        print(f"  {label} {name}: {'-' if ms is None else f'{ms:.3f} ms'} err={err} {status}", flush=True)
    return out


def fused_rows(dev, dtype, sizes, b, h, head_dims) -> list:
    from backends.triton_attention import attention
    from torch.nn.attention.flex_attention import create_block_mask

    flex = _flex()
    rows = []
    for d in head_dims:
        for causal in (False, True):
            for i, s in enumerate(sizes):
                g = torch.Generator(device=dev).manual_seed(s)
                q, k, v = (torch.randn(b, h, s, d, device=dev, dtype=dtype, generator=g) for _ in range(3))
                scale = 1 / math.sqrt(d)
                bm = None
                if causal:
                    bm = create_block_mask(lambda b_, h_, qi, ki: qi >= ki, None, None, s, s, device=dev)
                res = run_contenders({
                    "sdpa-flash": lambda: _sdpa_flash(q, k, v, causal),
                    "attnforge": lambda: attention(q, k, v, None, scale, causal),
                    "flex": lambda: flex(q, k, v, block_mask=bm),
                }, "sdpa-flash", i == 0, f"fused d={d} causal={causal} seq={s}")
                base = res["sdpa-flash"][0]
                for name, (ms, err, status) in res.items():
                    rows.append(dict(table="fused", contender=name, d=d, causal=causal, seq=s, keys=s, pattern="dense",
                                     ms=ms, tflops=flops(b, h, s, s, d, causal) / ms / 1e9 if ms else None,
                                     vs_peer=base / ms if ms and base else None, err=err, status=status))
    return rows


def _flex_from_tables(t, s, dev):
    """Our kept-block lists as a FlexAttention BlockMask: full and partial blocks separated."""
    from backends.triton_attention import FULL_SLOT
    from torch.nn.attention.flex_attention import BlockMask

    valid = torch.arange(t.kv_blocks.shape[-1], device=dev) < t.counts.unsqueeze(-1)
    full = valid & (t.kinds == FULL_SLOT)
    part = valid & ~full

    nkb = -(-s // t.block)

    def lists(sel):
        # FlexAttention reads kv_indices as [.., nkb] wide: pad our shorter lists.
        order = torch.sort((~sel).to(torch.int8), dim=-1, stable=True).indices
        picked = torch.gather(t.kv_blocks, -1, order).to(torch.int32)
        return sel.sum(-1).to(torch.int32), torch.nn.functional.pad(picked, (0, nkb - picked.shape[-1]))

    pn, pi = lists(part)
    fn, fi = lists(full)
    return BlockMask.from_kv_blocks(pn, pi, fn, fi, BLOCK_SIZE=t.block, mask_mod=lambda b, h, q, k: q >= k,
                                    seq_lengths=(s, s))


def sparse_rows(dev, dtype, sizes, windows, b, h, d, block) -> list:
    from backends.triton_attention import attention, sparse_attention
    from backends.triton_layout import pattern_tables
    from backends.triton_ops import sparse_attention as sparse_op
    from backends.triton_schedule import SCHEDULER
    from compiler.ir.ops import causal_pairs
    from compiler.reference.sparse_ops import kv_head_map
    from compiler.variants.language import TopK, Window, parse_variant
    from torch.nn.attention.flex_attention import create_block_mask

    flex = _flex()
    rows = []
    for i, s in enumerate(sizes):
        g = torch.Generator(device=dev).manual_seed(s)
        q, k, v = (torch.randn(b, h, s, d, device=dev, dtype=dtype, generator=g) for _ in range(3))
        scale = 1 / math.sqrt(d)
        dense_ms = bench(lambda: attention(q, k, v, None, scale, True))
        patterns = [(f"window:{w},block={block}", Window(left=w, block=block)) for w in windows]
        patterns.append((f"topk:blocks=8,block={block}", TopK(blocks=8, block=block)))
        for text, pattern in patterns:
            spec = parse_variant(text).text
            t = pattern_tables(pattern, q, k, scale, True, kv_head_map(h, h, dev))
            kept = float(t.counts.double().sum(-1).mean()) * block * block
            density = kept / causal_pairs(s, s)
            if isinstance(pattern, Window):
                w = pattern.left
                bm = create_block_mask(lambda b_, h_, qi, ki: (qi >= ki) & (qi - ki <= w), None, None, s, s,
                                       device=dev, BLOCK_SIZE=block)
            else:
                bm = _flex_from_tables(t, s, dev)
            contenders = {
                "attnforge": lambda: sparse_op(q, k, v, None, scale, True, 0.0, spec),
                "flex": lambda: flex(q, k, v, block_mask=bm, scale=scale),
            }
            if isinstance(pattern, TopK):
                sparse_op(q, k, v, None, scale, True, 0.0, spec)  # let the scheduler choose, then reuse its choice
                tuned = next(c.config for key, c in SCHEDULER.chosen.items() if key.startswith(f"sparse|{spec}|"))
                contenders["attnforge kernel only"] = lambda: sparse_attention(q, k, v, t, None, scale, True, 0.0,
                                                                               tuned)
            res = run_contenders(contenders, "flex", i == 0, f"sparse {text} seq={s} (dense {dense_ms:.3f} ms)")
            flex_ms = res["flex"][0]
            for name, (ms, err, status) in res.items():
                speedup = dense_ms / ms if ms else None
                rows.append(dict(table="sparse", contender=name, d=d, causal=True, seq=s, keys=s, pattern=text,
                                 ms=ms, density=density, speedup_vs_dense=speedup,
                                 of_ideal=speedup * density if speedup else None,
                                 vs_peer=flex_ms / ms if ms and flex_ms else None, err=err, status=status))
    return rows


def decode_rows(dev, dtype, keys, b, h, hkv, d) -> list:
    from backends.triton_attention import attention

    rows = []
    for i, s in enumerate(keys):
        g = torch.Generator(device=dev).manual_seed(s)
        q = torch.randn(b, h, 1, d, device=dev, dtype=dtype, generator=g)
        k, v = (torch.randn(b, hkv, s, d, device=dev, dtype=dtype, generator=g) for _ in range(2))
        scale = 1 / math.sqrt(d)
        info: dict = {}
        attention(q, k, v, None, scale, False, record=info)
        res = run_contenders({
            "sdpa-flash": lambda: _sdpa_flash(q, k, v, False),
            "attnforge": lambda: attention(q, k, v, None, scale, False),
            "attnforge 1 split": lambda: attention(q, k, v, None, scale, False, splits=1),
        }, "sdpa-flash", i == 0, f"decode keys={s} splits={info.get('splits')}")
        base = res["sdpa-flash"][0]
        for name, (ms, err, status) in res.items():
            rows.append(dict(table="decode", contender=name, d=d, causal=False, seq=1, keys=s, pattern="dense",
                             ms=ms, splits=info.get("splits") if name == "attnforge" else (1 if "split" in name else None),
                             gbps=2 * b * hkv * s * d * q.element_size() / ms / 1e6 if ms else None,
                             vs_peer=base / ms if ms and base else None, err=err, status=status))
    return rows


def plot(rows, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(17, 4.5))
    for name in ("attnforge", "sdpa-flash", "flex"):
        for d, causal in ((128, True), (128, False)):
            pts = [(r["seq"], r["tflops"]) for r in rows if r["table"] == "fused" and r["contender"] == name
                   and r["d"] == d and r["causal"] == causal and r["tflops"]]
            if pts:
                axes[0].plot(*zip(*pts), marker="o", label=f"{name} {'causal' if causal else 'full'}")
    axes[0].set(xscale="log", xlabel="sequence", ylabel="TFLOP/s", title="fused, D=128")
    for name in ("attnforge", "flex"):
        pts = [(r["pattern"].split(",")[0] + f"@{r['seq'] // 1024}k", r["speedup_vs_dense"]) for r in rows
               if r["table"] == "sparse" and r["contender"] == name and r["speedup_vs_dense"]]
        if pts:
            axes[1].plot(range(len(pts)), [p[1] for p in pts], marker="o", label=name)
            axes[1].set_xticks(range(len(pts)), [p[0] for p in pts], rotation=70, fontsize=7)
    axes[1].set(ylabel="speedup over our dense kernel", title="sparse, causal", yscale="log")
    for name in ("attnforge", "attnforge 1 split", "sdpa-flash"):
        pts = [(r["keys"], r["ms"]) for r in rows if r["table"] == "decode" and r["contender"] == name and r["ms"]]
        if pts:
            axes[2].plot(*zip(*pts), marker="o", label=name)
    axes[2].set(xscale="log", yscale="log", xlabel="keys", ylabel="ms", title="decode, 1 query")
    for ax in axes:
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="fewer sizes")
    p.add_argument("--smoke", action="store_true", help="tiny sizes; runs in Triton's interpreter without a GPU")
    p.add_argument("--out", default="docs", help="folder for triton_bench.csv and triton_bench.png")
    p.add_argument("--seq", help="fused sequence lengths, e.g. 4096,16384 (default: 1k-32k)")
    p.add_argument("--head-dims", default="64,128")
    p.add_argument("--sparse-seq", help="sparse sequence lengths (default 8k,16k,32k)")
    p.add_argument("--windows", help="sparse windows (default 256,512,1024,2048)")
    p.add_argument("--decode-keys", help="decode key lengths (default 8k-128k)")
    a = p.parse_args(argv)
    if not torch.cuda.is_available() and not a.smoke:
        print("bench_triton: needs a CUDA GPU and none is visible; --smoke runs tiny sizes in Triton's interpreter "
              "to check this script", file=sys.stderr)
        return 2
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    if a.smoke:
        dtype = torch.bfloat16 if dev == "cuda" else torch.float32
        rows = (fused_rows(dev, dtype, [64, 96], 1, 2, [64, 128]) + sparse_rows(dev, dtype, [128], [32], 1, 2, 32, 16)
                + decode_rows(dev, dtype, [512], 1, 2, 1, 32))
    else:
        dtype = torch.bfloat16

        def ints(text, default):
            return [int(x) for x in text.split(",")] if text else default

        sizes = ints(a.seq, [1024, 4096, 16384] if a.quick else [1024, 2048, 4096, 8192, 16384, 32768])
        rows = fused_rows(dev, dtype, sizes, 4, 32, ints(a.head_dims, [64, 128]))
        rows += sparse_rows(dev, dtype, ints(a.sparse_seq, [8192, 32768] if a.quick else [8192, 16384, 32768]),
                            ints(a.windows, [256, 1024] if a.quick else [256, 512, 1024, 2048]), 4, 32, 128, 128)
        rows += decode_rows(dev, dtype, ints(a.decode_keys, [8192, 131072] if a.quick else
                                             [8192, 16384, 32768, 65536, 131072]), 4, 32, 8, 128)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    cols = ["table", "contender", "d", "causal", "seq", "keys", "pattern", "ms", "tflops", "density",
            "speedup_vs_dense", "of_ideal", "splits", "gbps", "vs_peer", "err", "status"]
    write_csv([{c: r.get(c) for c in cols} for r in rows], out / "triton_bench.csv")
    plot(rows, out / "triton_bench.png")
    gpu = torch.cuda.get_device_name() if dev == "cuda" else "no GPU (Triton interpreter on CPU)"
    print(f"\n## Triton kernels ({gpu}, {today()})\n")
    print(f"`{' '.join(['python', 'tools/bench_triton.py', *(argv or sys.argv[1:])])}`; {machine()}; "
          f"{versions('torch', 'triton')}. vs_peer: the peer's time over ours (> 1: ours faster).\n")
    for table, columns in (("fused", ["contender", "d", "causal", "seq", "ms", "tflops", "vs_peer", "err"]),
                           ("sparse", ["contender", "seq", "pattern", "ms", "density", "speedup_vs_dense",
                                       "of_ideal", "vs_peer", "err"]),
                           ("decode", ["contender", "keys", "ms", "splits", "gbps", "vs_peer", "err"])):
        sel = [r for r in rows if r["table"] == table]
        print_table(sel, columns + ["status"], title=table)
        print(markdown_table(sel, columns) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
