"""policy="auto" for generation on the benchmark's Llama-shaped model: which KV heads it makes
streaming at a few budgets, each head's measured effect, and the cache bytes saved.

    python tools/bench_generate_auto.py [--prompt 2048] [--prompts 2] [--tokens 32] [--streaming sinks:4,window:256]
                                        [--budgets 0,0.001,0.01] [--threads 1]

Calibration: ``--prompts`` random prompts of ``--prompt`` tokens, ``--tokens`` decode steps each
(compiler.driver.generate_auto). Budgets are ``max_kl`` (the search holds half of each).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import compiler  # noqa: E402
from compiler.driver.generate import capture_for_generation, compile_generator  # noqa: E402
from tools.bench_generate import make_model  # noqa: E402
from tools.benchlib import command_line, machine, today, versions  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompt", type=int, default=2048)
    ap.add_argument("--prompts", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--streaming", default="sinks:4,window:256")
    ap.add_argument("--budgets", default="0,0.001,0.01")
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    model = make_model()
    torch.manual_seed(1)
    calibration = [torch.randint(1, model.config.vocab_size, (1, a.prompt)) for _ in range(a.prompts)]
    ep = capture_for_generation(model, calibration[0][:, :16], a.prompt + 2 * a.tokens)
    print("| max_kl | streaming KV heads | calibration KL | KV MiB | full MiB | saved MiB | search s | chosen |")
    print("|---|---|---|---|---|---|---|---|")
    effects = None
    for kl in (float(x) for x in a.budgets.split(",")):
        t0 = time.perf_counter()
        gen = compile_generator(ep, policy="auto", calibration=calibration, budget=compiler.Fidelity(max_kl=kl),
                                streaming=a.streaming, calibration_tokens=a.tokens)
        r = gen.report.auto
        effects = r["heads"]
        chosen = {k: v for k, v in r["chosen"].items() if k != "*"} or "all fused"
        print(f"| {kl:g} | {r['streaming_kv_heads']} / {r['kv_heads']} | {r['calibration_fidelity']['kl_divergence']:.2e} "
              f"| {r['cache_bytes'] / 2**20:.2f} | {r['full_cache_bytes'] / 2**20:.2f} | {r['bytes_saved'] / 2**20:.2f} "
              f"| {time.perf_counter() - t0:.0f} | {chosen} |")
    print("\n| site | layer | KV head | KL alone | total variation alone |\n|---|---|---|---|---|")
    for h in effects:
        print(f"| {h['site']} | {h['layer']} | {h['kv_head']} | {h['kl_divergence']:.2e} | {h['total_variation']:.3f} |")
    print(f"\n{command_line()}\n{today()}, {machine()}, {a.threads} threads; {versions('torch', 'transformers')}; "
          f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
