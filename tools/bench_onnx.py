"""attnforge's ONNX Runtime backend vs ORT's own attention ops and optimizers, on CPU.

    python tools/bench_onnx.py [--quick] [--peers-only] [--only attention|e2e] [--budget-s 15]

Everything fp32 on CPU: ORT with intra_op_num_threads=2, inter_op_num_threads=1, sequential
execution, ORT_ENABLE_ALL; torch with set_num_threads(2). Times are medians over interleaved
repeats (repeats outside, contenders inside) after one untimed warm-up call each; each contender
gets as many repeats as fit in --budget-s per cell (at least --min-repeats).

1. Attention alone, B=1, H=8, D=64, seq 1k/4k/16k, causal and not. Peers are ONNX graphs built
   here: ``unfused`` (MatMul, Mul, causal -inf bias from Trilu, Softmax, MatMul), ``onnx-attention``
   (ai.onnx Attention-23), ``mha`` (com.microsoft MultiHeadAttention, causal via unidirectional=1),
   ``gqa`` (com.microsoft GroupQueryAttention, prefill form; non-causal via causal=0) and
   ``gqa-window256``; ``torch-sdpa`` is context. Ours: compiler.compile(SDPA module,
   backend="onnxruntime") with policy "fused" and "window:256". Outputs are checked at 1k against
   scaled_dot_product_attention (dense, or with the window's boolean mask).
2. End to end: all-MiniLM-L6-v2 (real weights) at batch 8 padded to its maximum length, and a
   GPT-2-small-sized GPT2Model (random weights, eager attention) at 1k/2k/4k tokens: torch eager,
   ORT on the dynamo export, after onnxscript's ort_fusions, after onnxruntime.transformers'
   optimizer (on the legacy and the dynamo export), and ours.

Writes docs/onnx_attention.csv and docs/onnx_e2e.csv, prints rich tables and a markdown snippet
for docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import torch
import torch.nn.functional as F

import compiler
from benchlib import (Contender, NotRun, command_line, first_line, machine, markdown_table, mem_available_bytes,
                      print_table, time_in_memory_groups, today, versions, write_csv)
from onnx_attention_peers import (B, D, H, SDPA, WINDOW, build_gqa, build_mha, build_onnx_attention, build_unfused,
                                  gqa_local_window, window_mask)
from onnx_exports import INPUT_NAMES, PEER_KINDS, Exports, LastHidden
from ort_session import ORT_OPTIONS, THREADS, attention_ops, ort_call, quiet, session

DENSE_PEERS = ("unfused", "onnx-attention", "mha", "gqa")
# What each contender holds at its peak (ORT's arena keeps it until the session is freed), in units
# of one fp32 score tensor B*H*S*S*4, (causal, bidirectional): peak RSS over the inputs, one
# subprocess per contender, measured at S=4096 and 8192 on ORT 1.31.1 with --measure-memory (the
# factor is the same at both), plus ~5%. ours-fused takes the larger of its lowerings' (gqa, mha).
SCORE_FACTORS = {"unfused": (4.1, 2.2), "onnx-attention": (2.2, 1.1), "mha": (2.4, 0.1), "gqa": (1.16, 1.16),
                 "gqa-window256": (1.16, 1.16), "ours-fused": (1.16, 1.16), "ours-window256": (0.3, 0.45),
                 "torch-sdpa": (0.02, 0.02)}
MEMORY_HEADROOM = 0.6  # use at most this share of MemAvailable (at 0.9, S=16384 was OOM-killed on 24 GiB)


def compile_ours(module, inputs, policy: str, tmp: Path, tag: str, *, kwargs=None):
    """(callable, note) or raises: compiler.compile on the onnxruntime backend, saved to read its ops."""
    with quiet():
        cm = compiler.compile(module, inputs, policy=policy, backend="onnxruntime", backend_options=dict(ORT_OPTIONS),
                              verify=False, example_kwargs=kwargs, show_progress=False)
    note = ""
    try:
        path = tmp / f"ours-{tag}.onnx"
        cm.save(path)
        note = attention_ops(onnx.load(str(path), load_external_data=False))
    except Exception as e:  # noqa: BLE001 - the timing does not need the file
        note = f"save failed ({first_line(e, 80)})"
    return cm, note


def score_bytes(s: int, batch: int = B, heads: int = H) -> int:
    return batch * heads * s * s * 4


def memory_need(name: str, s: int, causal: bool) -> float:
    factors = SCORE_FACTORS.get(name, (0.0, 0.0))
    return factors[0 if causal else 1] * score_bytes(s)


def attention_cell(s: int, causal: bool, a, tmp: Path) -> list[dict]:
    g = torch.Generator().manual_seed(s)
    q, k, v = (torch.randn(B, H, s, D, generator=g) for _ in range(3))
    arrays = [q.numpy(), k.numpy(), v.numpy()]

    def peer(build):
        return lambda: ort_call(session(build()), arrays)

    def ours(policy, tag):
        def make():
            try:
                cm, note = compile_ours(SDPA(causal), (q, k, v), policy, tmp, tag)
            except Exception as e:  # noqa: BLE001 - the backend is being written: report and go on
                raise NotRun("n/a (backend unavailable)", first_line(e, 120)) from None
            return (lambda: cm(q, k, v)), note
        return make

    specs = [("torch-sdpa", lambda: (lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal)),
              "context, not a peer"),
             ("unfused", peer(lambda: build_unfused(s, causal)), "causal: Trilu -inf bias" if causal else ""),
             ("onnx-attention", peer(lambda: build_onnx_attention(s, causal)), ""),
             ("mha", peer(lambda: build_mha(s, causal)), "unidirectional=1" if causal else ""),
             ("gqa", peer(lambda: build_gqa(s, causal)), "prefill form" if causal else "causal=0")]
    if causal:
        specs.append((f"gqa-window{WINDOW}", peer(lambda: build_gqa(s, True, WINDOW)),
                      f"local_window_size={gqa_local_window(WINDOW)} (= window:{WINDOW})"))
    if not a.peers_only:
        specs += [("ours-fused", ours("fused", f"fused-{s}-{int(causal)}"), ""),
                  (f"ours-window{WINDOW}", ours(f"window:{WINDOW}", f"window-{s}-{int(causal)}"), "")]

    capacity = a.memory_headroom * mem_available_bytes()
    contenders, needs = [], []
    for name, _, note in specs:
        c = Contender(name, note=note)
        need = memory_need(name, s, causal)
        if need > capacity:
            c.status = "skipped (memory)"
            c.note = f"needs ~{need / 2**30:.0f} GiB, {capacity / 2**30:.0f} GiB usable"
        contenders.append(c)
        needs.append(need)
    check = s == a.check_seq

    def errors(group):
        if not check:
            return
        dense_ref = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        win_ref = F.scaled_dot_product_attention(q, k, v, attn_mask=window_mask(s, causal))
        for c in group:
            if c.output is not None:
                c.error = max_abs_error(c.output, win_ref if "window" in c.name else dense_ref)

    groups = time_in_memory_groups(
        contenders, [make for _, make, _ in specs], needs, on_group_done=errors, headroom=a.memory_headroom,
        min_repeats=a.min_repeats, max_repeats=a.max_repeats, budget_s=a.budget_s, keep_outputs=check,
        gap_s=a.gap_s, label=f"attention S={s} {'causal' if causal else 'bidirectional'}")

    by = {c.name: c for c in contenders}
    dense = [(by[n].ms, n) for n in DENSE_PEERS if n in by and by[n].ms is not None]
    best_ms, best = min(dense) if dense else (None, "")
    attn_ms = by["onnx-attention"].ms
    gqaw_ms = by[f"gqa-window{WINDOW}"].ms if f"gqa-window{WINDOW}" in by else None
    rows = []
    for c in contenders:
        ms = c.ms
        note = c.note
        if groups > 1 and c.group:
            note = "; ".join(x for x in (note, f"memory group {c.group}/{groups}") if x)
        rows.append({
            "seq": s, "causal": causal, "contender": c.name, "status": c.status, "ms": round(ms, 2) if ms else None,
            "repeats": len(c.times), "max_abs_err": c.error,
            "best_dense_peer": best, "time_vs_best_dense_peer": round(ms / best_ms, 3) if ms and best_ms else None,
            "speedup_vs_onnx_attention": round(attn_ms / ms, 2) if ms and attn_ms else None,
            "speedup_vs_gqa_window256": round(gqaw_ms / ms, 2) if ms and gqaw_ms and "window" in c.name else None,
            "notes": note,
        })
    return rows


def max_abs_error(out, ref: torch.Tensor) -> float:
    out = out if isinstance(out, torch.Tensor) else torch.from_numpy(np.asarray(out))
    return float((out.float() - ref.float()).abs().max())


def run_attention(a, tmp: Path) -> list[dict]:
    rows = []
    for s in a.seqs:
        for causal in (True, False):
            t0 = time.perf_counter()
            cell = attention_cell(s, causal, a, tmp)
            rows += cell
            print_table(cell, ATTN_COLUMNS, f"attention alone, S={s}, {'causal' if causal else 'bidirectional'} "
                                            f"({time.perf_counter() - t0:.0f} s)")
    return rows


ATTN_COLUMNS = ["seq", "causal", "contender", "status", "ms", "repeats", "max_abs_err", "best_dense_peer",
                "time_vs_best_dense_peer", "speedup_vs_onnx_attention", "speedup_vs_gqa_window256", "notes"]


# --- end to end -----------------------------------------------------------------------------




def e2e_cell(title: str, seq: int, batch: int, model, args: tuple, exports: Exports, policies: list, a,
             tmp: Path) -> list[dict]:
    arrays = [t.numpy() for t in args]

    def eager():
        with torch.no_grad():
            return model(*args)

    def ort_peer(kind):
        def make():
            path, note = exports.get(kind)
            try:
                return ort_call(session(path), arrays, INPUT_NAMES), note
            except Exception as e:  # noqa: BLE001 - a peer that cannot load is a finding
                raise NotRun(f"failed ({first_line(e, 200)})", note) from None
        return make

    def ours(policy):
        def make():
            try:
                cm, note = compile_ours(model, args, policy, tmp, f"{title}-{seq}-{policy.replace(':', '')}")
            except Exception as e:  # noqa: BLE001 - the backend is being written: report and go on
                raise NotRun("n/a (backend unavailable)", first_line(e, 120)) from None
            return (lambda: cm(*args)), note
        return make

    specs = [("torch-eager", lambda: eager, "")]
    specs += [(f"ort-{kind}", ort_peer(kind), "dynamic seq axis" if exports.dynamic else "") for kind in PEER_KINDS]
    if not a.peers_only:
        specs += [(name, ours(policy), "") for name, policy in policies]
    contenders = [Contender(name, note=note) for name, _, note in specs]
    ref: list = []

    def errors(group):
        for c in group:
            if c.name == "torch-eager" and c.output is not None:
                ref.append(c.output)
        for c in group:
            if c.output is not None and ref:
                c.error = max_abs_error(c.output, ref[0])

    groups = time_in_memory_groups(
        contenders, [make for _, make, _ in specs], on_group_done=errors, headroom=a.memory_headroom,
        min_repeats=a.min_repeats, max_repeats=a.max_repeats, budget_s=a.budget_s, gap_s=a.gap_s,
        label=f"{title} seq {seq}")
    by = {c.name: c for c in contenders}
    eager_ms = by["torch-eager"].ms
    peer_ms = [(c.ms, c.name) for c in contenders if c.name.startswith("ort-") and c.ms is not None]
    best_ms, best = min(peer_ms) if peer_ms else (None, "")
    rows = []
    for c in contenders:
        ms = c.ms
        note = c.note
        if groups > 1 and c.group:
            note = "; ".join(x for x in (note, f"memory group {c.group}/{groups}") if x)
        rows.append({
            "model": title, "batch": batch, "seq": seq, "contender": c.name, "status": c.status,
            "ms": round(ms, 1) if ms else None, "repeats": len(c.times), "max_abs_err": c.error,
            "speedup_vs_eager": round(eager_ms / ms, 2) if ms and eager_ms else None,
            "best_ort_peer": best, "time_vs_best_ort_peer": round(ms / best_ms, 3) if ms and best_ms else None,
            "notes": note,
        })
    return rows


E2E_COLUMNS = ["model", "batch", "seq", "contender", "status", "ms", "repeats", "max_abs_err", "speedup_vs_eager",
               "best_ort_peer", "time_vs_best_ort_peer", "notes"]


def clear(tmp: Path) -> None:
    """Drop a cell's exported models (GPT-2's are ~0.5 GB each)."""
    for p in tmp.iterdir():
        shutil.rmtree(p) if p.is_dir() else p.unlink()


def minilm_texts(n: int) -> list[str]:
    from compiler.minilm import PARAGRAPHS, SENTENCES

    texts = [PARAGRAPHS[i] + " " + PARAGRAPHS[(i + 1) % len(PARAGRAPHS)] for i in range(len(PARAGRAPHS))]
    texts += [" ".join(PARAGRAPHS[:3]), SENTENCES[0]]  # one fills the window, one is mostly padding
    return texts[:n]


def run_minilm(a, tmp: Path) -> list[dict]:
    from compiler.minilm import load_minilm

    with quiet():
        mini = load_minilm("eager")
    cfg = mini.model.config
    length = a.minilm_length or min(int(mini.tokenizer.model_max_length), int(cfg.max_position_embeddings))
    enc = mini.tokenizer(minilm_texts(a.minilm_batch), padding="max_length", truncation=True, max_length=length,
                         return_tensors="pt")
    args = (enc["input_ids"], enc["attention_mask"])
    model = LastHidden(mini.model).eval()
    exports = Exports(model, args, tmp, "minilm", "bert", cfg.num_attention_heads, cfg.hidden_size)
    t0 = time.perf_counter()
    rows = e2e_cell("all-MiniLM-L6-v2", length, a.minilm_batch, model, args, exports, [("ours-fused", "fused")], a,
                    tmp)
    print_table(rows, E2E_COLUMNS, f"all-MiniLM-L6-v2, batch {a.minilm_batch} x {length} "
                                   f"({int(enc['attention_mask'].sum())} real tokens; {time.perf_counter() - t0:.0f} s)")
    clear(tmp)
    return rows


def run_gpt2(a, tmp: Path) -> list[dict]:
    from transformers import GPT2Config, GPT2Model

    torch.manual_seed(0)
    cfg = GPT2Config(n_embd=768, n_layer=12, n_head=12, n_positions=max(a.gpt2_seqs), use_cache=False)
    with quiet():
        gpt2 = GPT2Model._from_config(cfg, attn_implementation="eager").eval()
    model = LastHidden(gpt2).eval()
    policies = [("ours-fused", "fused"), ("ours-window256-sinks4 (approx)", "window:256,sinks:4")]

    def inputs(seq):
        ids = torch.randint(0, cfg.vocab_size, (1, seq), generator=torch.Generator().manual_seed(seq))
        return ids, torch.ones_like(ids)

    # One export per exporter with a dynamic sequence axis (traced at 256 tokens, cheap), reused at
    # every length: the legacy exporter runs the model to trace it, 30 s at 4k on 2 cores.
    exports = Exports(model, inputs(256), tmp, "gpt2", "gpt2", cfg.n_head, cfg.n_embd, dynamic=True)
    rows = []
    for seq in a.gpt2_seqs:
        t0 = time.perf_counter()
        cell = e2e_cell("gpt2-small-random", seq, 1, model, inputs(seq), exports, policies, a, tmp)
        print_table(cell, E2E_COLUMNS, f"GPT-2-small-sized (random weights), batch 1 x {seq} "
                                       f"({time.perf_counter() - t0:.0f} s)")
        rows += cell
        for p in tmp.glob("ours-*"):
            p.unlink()
    clear(tmp)
    return rows


# --- output ----------------------------------------------------------------------------------


def snippet(a, attn_rows: list, e2e_rows: list) -> str:
    lines = [
        "## attnforge's ONNX Runtime backend vs ORT's attention ops and optimizers",
        "",
        f"Command: `{command_line()}` (writes `{a.attention_out}` and `{a.e2e_out}`).",
        f"Machine: {machine()}, no GPU; "
        f"{versions('torch', 'onnxruntime', 'onnx', 'onnxscript', 'transformers')}. Date: {today()}.",
        f"fp32; ORT CPUExecutionProvider, intra_op_num_threads={THREADS}, inter_op_num_threads=1, sequential, "
        f"ORT_ENABLE_ALL; torch set_num_threads({THREADS}). Medians over interleaved repeats after a warm-up call, "
        f"at least {a.min_repeats} repeats, as many as fit in {a.budget_s:g} s per contender per cell (at most "
        f"{a.max_repeats}), an untimed pause before each call ({a.gap_s:g} s, or 30% of the previous call up to 1 s: "
        "ORT's and OpenMP's worker threads spin after a run and would slow the next contender).",
    ]
    if a.peers_only:
        lines.append("attnforge's own rows were left out (--peers-only).")
    if attn_rows:
        lines += [
            "",
            f"### Attention alone (B={B}, H={H}, D={D})",
            "",
            f"Max abs error vs scaled_dot_product_attention (window rows: with the window's mask) at S={a.check_seq}. "
            "time vs best = ms / the fastest of unfused, onnx-attention, mha, gqa in that cell (< 1: faster). "
            "\"skipped (memory)\": its dense score buffers would not fit in MemAvailable.",
            "",
            markdown_table(attn_rows, ["seq", "causal", "contender", "status", "ms", "max_abs_err", "best_dense_peer",
                                       "time_vs_best_dense_peer", "speedup_vs_onnx_attention",
                                       "speedup_vs_gqa_window256", "notes"],
                           ["seq", "causal", "contender", "status", "ms", "max abs err", "best dense peer",
                            "time vs best", "speedup vs onnx-attention", "speedup vs gqa-window256", "notes"]),
        ]
    if e2e_rows:
        mini = next((r for r in e2e_rows if r["model"].startswith("all-MiniLM")), None)
        lines += [
            "",
            "### End to end",
            "",
            (f"all-MiniLM-L6-v2 with its real weights, batch {mini['batch']} padded to {mini['seq']} tokens (the shipped "
             "tokenizer's model_max_length and the config's max_position_embeddings; sentence-transformers itself "
             "truncates at 256): pairs of the paragraphs in compiler/minilm.py, one longer text and one short "
             "sentence, so most rows carry padding. " if mini else "")
            + "GPT-2-small-sized: GPT2Model(n_embd=768, n_layer=12, n_head=12), random weights, eager attention, "
            "use_cache=False, batch 1, all-ones attention mask; its ORT peers come from one export per exporter "
            "with a dynamic sequence axis, reused at every length (ours is compiled per length). "
            "Peers: `ort-dynamo` = ORT on `torch.onnx.export(dynamo=True)`; `+ort_fusions` = after "
            "`onnxscript.rewriter.ort_fusions.optimize_for_ort`; `+transformers_opt` = after "
            "`onnxruntime.transformers.optimizer.optimize_model` (model_type bert / gpt2) on the legacy "
            "(`dynamo=False`, opset 17) or the dynamo export; notes give what each fused. "
            "Max abs error: last hidden state vs torch eager (the window+sinks row is an approximation, not exact). "
            "time vs best = ms / the fastest ORT peer in that cell.",
            "",
            markdown_table(e2e_rows, E2E_COLUMNS,
                           ["model", "batch", "seq", "contender", "status", "ms", "repeats", "max abs err",
                            "speedup vs eager", "best ORT peer", "time vs best", "notes"]),
        ]
    return "\n".join(lines)


def measure_memory(a) -> None:
    """Peak RSS of each dense contender at --seqs[0], one per subprocess: where SCORE_FACTORS come from."""
    import subprocess

    s = a.seqs[0]
    for name in SCORE_FACTORS:
        for causal in (True, False):
            if name == "gqa-window256" and not causal:
                continue
            code = (f"import sys; sys.path.insert(0, 'tools'); import bench_onnx as b; "
                    f"b.measure_one({name!r}, {s}, {causal})")
            out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
            last = (out.stdout.strip().splitlines() or [out.stderr.strip()[-200:]])[-1]
            print(f"{name:15s} causal={causal!s:5s} S={s}: {last}", flush=True)


def measure_one(name: str, s: int, causal: bool) -> None:
    import resource

    torch.set_num_threads(THREADS)
    q, k, v = (torch.randn(B, H, s, D) for _ in range(3))
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    if name == "torch-sdpa":
        fn = lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal)  # noqa: E731
    elif name.startswith("ours-"):
        policy = "fused" if name == "ours-fused" else f"window:{WINDOW}"
        cm, _ = compile_ours(SDPA(causal), (q, k, v), policy, Path(tempfile.mkdtemp()), "m")
        fn = lambda: cm(q, k, v)  # noqa: E731
    else:
        build = {"unfused": build_unfused, "onnx-attention": build_onnx_attention, "mha": build_mha,
                 "gqa": build_gqa, "gqa-window256": lambda s, c: build_gqa(s, c, WINDOW)}[name]
        fn = ort_call(session(build(s, causal)), [q.numpy(), k.numpy(), v.numpy()])
    base = max(base, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    fn()
    fn()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(f"peak - base = {(peak - base) / 2**20:.0f} MiB = {(peak - base) / score_bytes(s):.2f} x scores")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="smoke run: attention at 1k and 4k, MiniLM, GPT-2 at 1k; "
                    "fewer repeats")
    ap.add_argument("--peers-only", action="store_true", help="leave out attnforge's rows")
    ap.add_argument("--only", choices=("attention", "e2e"), help="run one part")
    ap.add_argument("--seqs", type=int, nargs="+", help="attention lengths (default 1024 4096 16384)")
    ap.add_argument("--gpt2-seqs", type=int, nargs="+", help="GPT-2 lengths (default 1024 2048 4096)")
    ap.add_argument("--minilm-batch", type=int, default=8)
    ap.add_argument("--minilm-length", type=int, help="default: the shipped tokenizer's / config's maximum")
    ap.add_argument("--min-repeats", type=int, default=3)
    ap.add_argument("--max-repeats", type=int, help="default 10, --quick 5")
    ap.add_argument("--budget-s", type=float, help="time per contender per cell (default 15, --quick 4)")
    ap.add_argument("--gap-s", type=float, default=0.1, help="untimed pause before each call (at least; 30%% of "
                    "the previous call up to 1 s), so its spinning worker threads do not slow the next (default 0.1)")
    ap.add_argument("--memory-headroom", type=float, default=MEMORY_HEADROOM,
                    help=f"share of MemAvailable the contenders of one group may need together (default {MEMORY_HEADROOM})")
    ap.add_argument("--attention-out", default="docs/onnx_attention.csv")
    ap.add_argument("--e2e-out", default="docs/onnx_e2e.csv")
    ap.add_argument("--measure-memory", action="store_true", help="print each dense contender's peak memory at "
                    "--seqs[0] (to set SCORE_FACTORS) and exit")
    a = ap.parse_args()
    a.seqs = a.seqs or ([1024, 4096] if a.quick else [1024, 4096, 16384])
    a.gpt2_seqs = a.gpt2_seqs or ([1024] if a.quick else [1024, 2048, 4096])
    a.max_repeats = a.max_repeats or (5 if a.quick else 10)
    a.budget_s = a.budget_s if a.budget_s is not None else (4.0 if a.quick else 15.0)
    a.check_seq = 1024 if 1024 in a.seqs else a.seqs[0]

    torch.set_num_threads(THREADS)
    logging.basicConfig(level=logging.WARNING)
    for name in ("onnxscript", "onnx_ir", "onnxruntime", "torch.onnx", "transformers", "fusion_base", "onnx_model"):
        logging.getLogger(name).setLevel(logging.ERROR)
    if a.measure_memory:
        measure_memory(a)
        return
    print(f"{machine()}; {versions('torch', 'onnxruntime', 'onnx', 'onnxscript', 'transformers')}", flush=True)
    started = time.perf_counter()
    attn_rows, e2e_rows = [], []
    with tempfile.TemporaryDirectory(prefix="bench_onnx_") as d:
        tmp = Path(d)
        if a.only in (None, "attention"):
            attn_rows = run_attention(a, tmp)
            write_csv(attn_rows, a.attention_out)
        if a.only in (None, "e2e"):
            e2e_rows = run_minilm(a, tmp)
            e2e_rows += run_gpt2(a, tmp)
            write_csv(e2e_rows, a.e2e_out)
    print(f"\ntotal {time.perf_counter() - started:.0f} s\n")
    print(snippet(a, attn_rows, e2e_rows))


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
