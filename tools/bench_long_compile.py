"""``compile()`` at long context: wall time and peak memory next to one forward of the original.

    python tools/bench_long_compile.py site 32768 [POLICY [BACKEND]]   # one causal site, B=1 H=8 D=64
    python tools/bench_long_compile.py llama 8192 [POLICY [BACKEND]]   # the Llama-shaped model of bench_e2e

Prints one JSON line: forward and compile seconds, their ratio, peak memory growth of each
(VmHWM), the compiled model's first and second call, what the sites were checked on, each
site's variant, density and the query rows it was measured on, and the load average before
and after (the machine may be shared: read the ratios). Default policy ``window:256,sinks:4``,
backend ``torch``.
"""
import os
import json
import resource
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import compiler  # noqa: E402
from bench_e2e import Causal, _hidden, llama, measured_compile  # noqa: E402

torch.set_num_threads(2)
what, S = sys.argv[1], int(sys.argv[2])
pol = sys.argv[3] if len(sys.argv) > 3 else "window:256,sinks:4"
backend = sys.argv[4] if len(sys.argv) > 4 else "torch"
load_before = os.getloadavg()
if what == "site":
    g = torch.Generator().manual_seed(0)
    args = tuple(torch.randn(1, 8, S, 64, generator=g) for _ in range(3))
    model = Causal()
    fwd_fn = lambda: model(*args)
    comp = lambda: compiler.compile(model, args, pol, backend)
    run = lambda cm: cm(*args)
else:
    model, kw = llama(S)
    ids = kw["input_ids"]
    fwd_fn = lambda: _hidden(model(input_ids=ids, use_cache=False))
    comp = lambda: compiler.compile(model, (), pol, backend, example_kwargs={"input_ids": ids})
    run = lambda cm: _hidden(cm(input_ids=ids))
with torch.no_grad():
    _, fwd, fwd_peak = measured_compile(fwd_fn)
cm, dt, peak = measured_compile(comp)
with torch.no_grad():
    t0 = time.perf_counter(); run(cm); first = time.perf_counter() - t0
    t0 = time.perf_counter(); run(cm); second = time.perf_counter() - t0
print(json.dumps({"what": what, "seq": S, "policy": pol, "backend": backend, "forward_s": round(fwd, 2), "forward_peak_MiB": round(fwd_peak),
                  "compile_s": round(dt, 1), "compile_over_forward": round(dt / fwd, 1), "compile_peak_MiB": round(peak),
                  "first_call_s": round(first, 2), "call_s": round(second, 2), "speedup_vs_forward": round(fwd / second, 2),
                  "maxrss_MiB": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
                  "checked_inputs": cm.report.fidelity.checked_inputs,
                  "sites": [(s.status, s.variant, round(s.density, 4), s.measured_rows) for s in cm.report.sites],
                  "loadavg_before": [round(x, 1) for x in load_before],
                  "loadavg_after": [round(x, 1) for x in os.getloadavg()]}))
