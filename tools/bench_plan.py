"""The execution plan vs the naive one: buffers, peak memory, segments, transitions, latency.

    python tools/bench_plan.py [--quick]

1. Memory, predicted: on every zoo model (tests/zoo.py) and all-MiniLM-L6-v2 (real weights,
   batch 8 x 128 tokens), for the torch and onnxruntime backends: peak live bytes and buffer
   count of the naive plan (export order, one buffer per value) and of ours (memory-aware
   order, linear-scan buffers).
2. Memory, measured (MiniLM): the peak a call allocates (backends/memory_probe.py: VmHWM with
   malloc's mmap threshold pinned), planned execution vs ``ep.module()`` in export order (torch),
   and our onnxruntime session with ORT's arena and memory pattern off, against the prediction.
3. Segments and transitions: a Llama-shaped model (hidden 256, 4 layers, 256 tokens) whose
   ``rotate_half`` is a custom op with no ONNX translation (a custom kernel the exporter does
   not know), on onnxruntime: our plan vs the greedy "first unsupported op splits" partition,
   in segments, transitions and latency, with the torch backend for context.
4. Latency of plan execution vs the backend alone: torch planned module vs ``ep.module()``.

fp32, CPU, 2 threads; medians over interleaved repeats. Writes docs/plan.csv and prints a
markdown snippet for docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

import compiler
from backends import memory_probe
from backends.capabilities import prepare
from backends.plan_executor import PlannedProgram
from backends.planner import make_plan
from benchlib import (Contender, command_line, machine, markdown_table, print_table, time_interleaved, today,
                      versions, write_csv)

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from zoo import HF_CASES, TORCH_CASES, hf_model, torch_model  # noqa: E402

THREADS = 2
ORT = {"intra_op_num_threads": THREADS, "inter_op_num_threads": 1}
ORT_MEASURE = {**ORT, "enable_cpu_mem_arena": False, "enable_mem_pattern": False}
MIB = 2 ** 20



def memory_row(name: str, backend: str, plan) -> dict:
    n, p = plan.naive, plan.planned
    return {"model": name, "backend": backend, "steps": len(plan.steps),
            "naive_peak_MiB": round(n.peak_live_bytes / MIB, 3), "planned_peak_MiB": round(p.peak_live_bytes / MIB, 3),
            "peak_saved_pct": round(100 * (1 - p.peak_live_bytes / n.peak_live_bytes), 1) if n.peak_live_bytes else 0.0,
            "naive_buffers": n.buffer_count, "planned_buffers": p.buffer_count,
            "buffers_saved_pct": round(100 * (1 - p.buffer_count / n.buffer_count), 1) if n.buffer_count else 0.0,
            "planned_buffer_MiB": round(p.buffer_bytes / MIB, 3)}


def plans_for(cm) -> dict:
    return {b: make_plan(prepare(cm.exported_program, b).module(), b) for b in ("torch", "onnxruntime")}


def zoo_rows() -> list:
    rows = []
    for case in HF_CASES + TORCH_CASES:
        z = hf_model(*case) if isinstance(case, tuple) else torch_model(case)
        cm = compiler.compile(z.model, z.args, example_kwargs=z.kwargs, policy="fused", show_progress=False,
                              verify=False)
        for backend, plan in plans_for(cm).items():
            rows.append(memory_row(z.name, backend, plan))
    return rows


def minilm(batch: int, length: int):
    from compiler.minilm import PARAGRAPHS, load_minilm

    mini = load_minilm("eager")
    texts = [PARAGRAPHS[i % len(PARAGRAPHS)] for i in range(batch)]
    enc = mini.tokenizer(texts, padding="max_length", truncation=True, max_length=length, return_tensors="pt")
    return mini.model, (), {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


MEASURED_RUNS = ("torch, planned order", "onnxruntime (arena off)", "torch, export order (ep.module())")


def measure_one(run: str, batch: int, length: int) -> dict:
    """One run's predicted and measured peak, in this (fresh) process."""
    model, args, kwargs = minilm(batch, length)
    backend = "onnxruntime" if run.startswith("onnxruntime") else "torch"
    cm = compiler.compile(model, args, example_kwargs=kwargs, policy="fused", backend=backend,
                          backend_options=ORT_MEASURE if backend == "onnxruntime" else None, show_progress=False,
                          verify=False)
    full = {**cm.default_kwargs, **kwargs}
    export_order = "export order" in run
    runner = cm.exported_program.module() if export_order else cm
    predicted = cm.plan.naive.peak_live_bytes if export_order else cm.plan.planned.peak_live_bytes

    def fn():
        with torch.no_grad():
            return runner(*args, **full)
    fn()
    measured = min(memory_probe.peak_bytes(fn)[0] for _ in range(3))
    return {"run": run, "predicted_MiB": round(predicted / MIB, 2), "measured_MiB": round(measured / MIB, 2),
            "error_pct": round(100 * (predicted - measured) / measured, 1)}


def measured_rows(batch: int, length: int) -> list:
    """Predicted vs measured peak for MiniLM, each run in a fresh process: a process that has
    already allocated and freed a lot keeps heap pages a new measurement would count."""
    import json
    import subprocess

    if not memory_probe.available():
        return []
    rows = []
    for run in MEASURED_RUNS:
        code = (f"import sys; sys.path.insert(0, 'tools'); import json, bench_plan as b; "
                f"print(json.dumps(b.measure_one({run!r}, {batch}, {length})))")
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                             env={**os.environ, "OMP_NUM_THREADS": str(THREADS)})
        lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
        rows.append(json.loads(lines[-1]) if lines else {"run": run, "predicted_MiB": None, "measured_MiB": None,
                                                          "error_pct": None})
    return rows


def llama_with_custom_rope(seq: int):
    import transformers as tf
    from transformers.models.llama import modeling_llama

    modeling_llama.rotate_half = torch.ops.attnforge_zoo.rotate_half
    torch.manual_seed(0)
    cfg = tf.LlamaConfig(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=8,
                         num_key_value_heads=2, vocab_size=1000, max_position_embeddings=seq,
                         attn_implementation="sdpa")
    model = tf.LlamaModel(cfg).eval()
    ids = torch.randint(0, 1000, (1, seq), generator=torch.Generator().manual_seed(1))
    return model, (), {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def segment_rows(model, args, kwargs, a) -> list:
    cm = compiler.compile(model, args, example_kwargs=kwargs, policy="fused", backend="onnxruntime",
                          backend_options=ORT, show_progress=False, verify=False)
    torch_cm = compiler.compile(model, args, example_kwargs=kwargs, policy="fused", show_progress=False,
                                verify=False)
    gm = prepare(cm.exported_program, "onnxruntime").module()
    greedy_plan = make_plan(gm, "onnxruntime", strategy="greedy")
    greedy = PlannedProgram(gm, greedy_plan, cm._run.options)
    full = {**cm.default_kwargs, **kwargs}
    contenders = [Contender("ours (planned)", lambda: cm(*args, **full)),
                  Contender("greedy split", lambda: greedy(*args, **full)),
                  Contender("torch backend", lambda: torch_cm(*args, **full))]
    time_interleaved(contenders, min_repeats=a.min_repeats, max_repeats=a.max_repeats, budget_s=a.budget_s,
                     label="llama + custom rotate_half")
    ref = contenders[2].output.last_hidden_state
    plans = {"ours (planned)": cm.plan, "greedy split": greedy_plan, "torch backend": torch_cm.plan}
    rows = []
    for c in contenders:
        p = plans[c.name]
        rows.append({"contender": c.name, "segments": len(p.segments), "transitions": p.switches,
                     "crossing_registers": len(p.transitions), "crossing_MiB": round(p.transition_bytes / MIB, 2),
                     "ms": round(c.ms, 2) if c.ms else None, "status": c.status,
                     "max_abs_err_vs_torch": float((c.output.last_hidden_state - ref).abs().max())
                     if c.output is not None else None})
    return rows


def latency_rows(model, args, kwargs, a) -> list:
    """Plan execution vs the backend alone: the torch plan's reordered module vs ep.module()."""
    cm = compiler.compile(model, args, example_kwargs=kwargs, policy="fused", show_progress=False, verify=False)
    plain = cm.exported_program.module()
    full = {**cm.default_kwargs, **kwargs}

    def run_plain():
        with torch.no_grad():
            return plain(*args, **full)

    contenders = [Contender("torch: planned module", lambda: cm(*args, **full)),
                  Contender("torch: ep.module()", run_plain)]
    time_interleaved(contenders, min_repeats=a.min_repeats, max_repeats=a.max_repeats, budget_s=a.budget_s,
                     label="plan vs backend alone")
    base = contenders[1].ms
    return [{"contender": c.name, "ms": round(c.ms, 2) if c.ms else None,
             "time_vs_backend_alone": round(c.ms / base, 3) if c.ms and base else None} for c in contenders]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer repeats, shorter sequences")
    ap.add_argument("--min-repeats", type=int, default=5)
    ap.add_argument("--max-repeats", type=int, default=20)
    ap.add_argument("--budget-s", type=float, default=10.0)
    ap.add_argument("--out", default="docs/plan.csv")
    a = ap.parse_args()
    if a.quick:
        a.min_repeats, a.max_repeats, a.budget_s = 3, 5, 3.0
    torch.set_num_threads(THREADS)
    import logging
    import warnings

    warnings.filterwarnings("ignore")
    for name in ("torch", "transformers", "onnxscript", "onnx_ir", "torch.onnx"):
        logging.getLogger(name).setLevel(logging.ERROR)
    t0 = time.perf_counter()
    memory = zoo_rows()
    model, args, kwargs = minilm(8, 64 if a.quick else 128)
    cm = compiler.compile(model, args, example_kwargs=kwargs, policy="fused", show_progress=False, verify=False)
    for backend, plan in plans_for(cm).items():
        memory.append(memory_row("all-MiniLM-L6-v2 8x128", backend, plan))
    print_table(memory, list(memory[0]), "predicted memory: naive vs planned")
    measured = measured_rows(8, 64 if a.quick else 128)
    if measured:
        print_table(measured, list(measured[0]), "MiniLM: predicted vs measured peak")
    latency = latency_rows(model, args, kwargs, a)
    print_table(latency, list(latency[0]), "MiniLM: plan execution vs the backend alone")
    llama = llama_with_custom_rope(128 if a.quick else 256)
    segments = segment_rows(*llama, a)
    print_table(segments, list(segments[0]), "Llama-shaped, custom rotate_half: segments and transitions")
    rows = [{"table": "memory", **r} for r in memory] + [{"table": "measured", **r} for r in measured] \
        + [{"table": "latency", **r} for r in latency] + [{"table": "segments", **r} for r in segments]
    columns = list(dict.fromkeys(k for r in rows for k in r))
    write_csv([{k: r.get(k) for k in columns} for r in rows], a.out)
    print(f"\ntotal {time.perf_counter() - t0:.0f} s\n")
    lines = ["## Execution plan: memory, segments, transitions",
             "", f"Command: `{command_line()}` (writes `{a.out}`).",
             f"Machine: {machine()}, no GPU; {versions('torch', 'onnxruntime', 'transformers')}. Date: {today()}.",
             f"fp32, CPU, {THREADS} threads; medians over interleaved repeats.", "",
             "### Predicted peak live bytes and buffers, naive (export order, one buffer per value) vs planned", "",
             markdown_table(memory, list(memory[0]))]
    if measured:
        lines += ["", "### Predicted vs measured peak (all-MiniLM-L6-v2, batch 8)", "",
                  "Measured: peak resident set the call adds (VmHWM reset through /proc/self/clear_refs, glibc's "
                  "mmap threshold pinned at 64 KiB so freed tensors leave the resident set), least of 3 calls.", "",
                  markdown_table(measured, list(measured[0]))]
    lines += ["", "### Plan execution vs the backend alone (all-MiniLM-L6-v2)", "",
              markdown_table(latency, list(latency[0])),
              "", "### Segments and transitions: Llama-shaped model with a custom rotate_half, onnxruntime", "",
              markdown_table(segments, list(segments[0]))]
    print("\n".join(lines))


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
