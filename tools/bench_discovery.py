"""Sites found by attnforge vs Inductor's fuse_attention, and compile() time vs torch.compile.

    python tools/bench_discovery.py [--out docs/discovery.csv]

Eager-attention models from the test zoo and MiniLM with real weights, on CPU. For each model:
attention blocks, sites attnforge rewrites, sites Inductor's pattern matcher fuses (from
torch._dynamo.utils.counters["inductor"]["fuse_attention"] after a torch.compile first call),
and the wall time of attnforge.compile vs that torch.compile first call, in one run.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import compiler  # noqa: E402
from compiler.driver.capture import hf_defaults  # noqa: E402
from compiler.minilm import SENTENCES, load_minilm  # noqa: E402
from zoo import hf_model  # noqa: E402

from benchlib import write_csv  # noqa: E402


def inductor_sites(model, kwargs) -> tuple[int, float]:
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(model, backend="inductor")
    t0 = time.perf_counter()
    with torch.no_grad():
        compiled(**kwargs)
    return int(counters["inductor"]["fuse_attention"]), time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="docs/discovery.csv")
    a = ap.parse_args()
    models = [(f"{k}-eager", hf_model(k, "eager")) for k in ("gpt2", "llama", "bert", "vit")]
    mini = load_minilm("eager")
    rows = []
    for name, z in models + [("all-MiniLM-L6-v2", None)]:
        if z is None:
            model, kwargs, blocks = mini.model, mini.encode_inputs(SENTENCES), 6
        else:
            model, kwargs, blocks = z.model, dict(z.kwargs), z.attention_blocks
        t0 = time.perf_counter()
        cm = compiler.compile(model, (), example_kwargs=kwargs)
        ours_s = time.perf_counter() - t0
        found = cm.report.totals["sites_rewritten"]
        ind, ind_s = inductor_sites(model, hf_defaults(model, dict(kwargs)))
        rows.append({"model": name, "attention_blocks": blocks, "attnforge_sites": found, "inductor_sites": ind,
                     "attnforge_compile_s": round(ours_s, 3), "torch_compile_first_call_s": round(ind_s, 3),
                     "time_ratio": round(ours_s / ind_s, 3)})
        print(rows[-1], flush=True)
    write_csv(rows, a.out)


if __name__ == "__main__":
    main()
