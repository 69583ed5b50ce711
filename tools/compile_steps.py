"""Where ``compile()``'s time goes: each step's wall time next to one forward pass of the original.

    python tools/compile_steps.py [--seq 16384] [--policy fused] [--backend onnxruntime] [--threads 2]

The Llama-shaped model of tools/bench_e2e.py. One eager forward is timed first, then one
``compile()`` with the driver's steps timed where they are called (the functions are wrapped in
their modules for this run only; no profiler, which inflates Python-heavy steps such as the ONNX
export's rewrite rules many times). Steps nest: the reference run and the site checks happen
inside ``_fuse_exact``, the export inside ``backends.load``; "rest" is what no step covers.
"""

from __future__ import annotations

import argparse
import functools
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import backends  # noqa: E402
import compiler  # noqa: E402
import compiler.api as api  # noqa: E402
from backends import onnx_export  # noqa: E402
from bench_e2e import llama  # noqa: E402
from benchlib import markdown_table  # noqa: E402
from compiler.driver import verify  # noqa: E402

# (owner, attribute, label, top level: counted in the sum that "rest" is taken from)
STEPS = (
    (api, "capture", "capture (torch.export)", True),
    (api, "_fuse_exact", "passes and per-site checks (_fuse_exact)", True),
    (verify.OriginalRuns, "get", "└ reference runs of the original (asks; one run per input set)", False),
    (verify, "forced_run", "└ forced-sites run", False),
    (verify, "run", "└ torch program end to end", False),
    (api, "record_site_run", "approximate program's run (site inputs)", True),
    (api, "site_effect", "site measurement", True),
    (backends, "load", "backend load (export, session)", True),
    (torch.onnx, "export", "└ torch.onnx.export", False),
    (onnx_export, "optimize", "└ the exported graph's optimizer", False),
    (api, "_check_lowered", "backend's program checked vs the original", True),
    (api, "_record_lowering", "backend's program checked vs the torch program", True),
    (verify, "compare", "└ output comparisons", False),
)


def timed_steps():
    """Wrap every step; returns (seconds, calls) dicts filled as compile() runs, and an undo."""
    seconds, calls, undo = defaultdict(float), Counter(), []
    for owner, name, label, _ in STEPS:
        original = getattr(owner, name)

        @functools.wraps(original)
        def step(*a, _f=original, _label=label, **k):
            t0 = time.perf_counter()
            try:
                return _f(*a, **k)
            finally:
                seconds[_label] += time.perf_counter() - t0
                calls[_label] += 1

        setattr(owner, name, step)
        undo.append((owner, name, original))
    return seconds, calls, lambda: [setattr(o, n, f) for o, n, f in undo]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seq", type=int, default=16384)
    p.add_argument("--policy", default="fused")
    p.add_argument("--backend", default="onnxruntime", choices=backends.AVAILABLE)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--tiny", action="store_true", help="a 2-layer, width-64 model (a smoke test)")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    model, kwargs = llama(a.seq, tiny=a.tiny)
    with torch.no_grad():
        t0 = time.perf_counter()
        model(**kwargs)
        forward = time.perf_counter() - t0
    options = {"intra_op_num_threads": a.threads} if a.backend == "onnxruntime" else None
    seconds, calls, undo = timed_steps()
    try:
        t0 = time.perf_counter()
        compiler.compile(model, (), a.policy, a.backend, example_kwargs=kwargs, backend_options=options,
                         show_progress=False)
        total = time.perf_counter() - t0
    finally:
        undo()
    rows = [{"step": label, "calls": calls[label], "seconds": round(seconds[label], 2),
             "forwards": round(seconds[label] / forward, 2)} for _, _, label, _ in STEPS if calls[label]]
    rest = total - sum(seconds[label] for _, _, label, top in STEPS if top)
    rows += [{"step": "rest", "seconds": round(rest, 2), "forwards": round(rest / forward, 2)},
             {"step": "compile() in all", "calls": 1, "seconds": round(total, 2), "forwards": round(total / forward, 2)}]
    print(f"seq {a.seq}, policy {a.policy}, backend {a.backend}, {a.threads} threads; one eager forward "
          f"{forward:.2f} s")
    print(markdown_table(rows, ["step", "calls", "seconds", "forwards"], ["step", "calls", "seconds", "× one forward"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
