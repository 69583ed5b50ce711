"""The benchmarks in tools/ at tiny sizes: each runs every contender and prints numbers that hold together."""

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_tool(script: str, *args: str) -> subprocess.CompletedProcess:
    """``python tools/<script> args`` from the checkout, one thread; fails the test on a non-zero exit."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, f"tools/{script}", *args, "--threads", "1"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return out


def test_bench_e2e_quick():
    out = run_tool("bench_e2e.py", "--quick")
    rows = [line for line in out.stdout.splitlines() if line.startswith("| ")]
    timed = {r.split("|")[3].strip(): r for r in rows if re.match(r"\| \d+ \| window", r)}
    for name in ("dense SDPA", "FlexAttention (compiled, same mask)", "compile(..., backend='torch')",
                 "compile(..., backend='onnxruntime')"):
        cells = [c.strip() for c in timed[name].split("|")]
        assert float(cells[4]) > 0 and float(cells[5]) > 0, timed[name]  # ms and the ratio to dense SDPA
    model = [r for r in rows if re.match(r"\| \d+ \| (original|compile)", r)]
    assert any("compile window" in r and "2/2 sites" in r for r in model), model
    assert any("compile fused" in r and "2/2 sites" in r for r in model), model


def test_compile_steps_accounts_for_compile():
    # Fused on onnxruntime: no run of the torch program end to end, one check of the ONNX program
    # against the original; the steps never add up to more than the whole.
    out = run_tool("compile_steps.py", "--tiny", "--seq", "64")
    rows = {cells[1]: cells[2:] for cells in
            ([c.strip() for c in line.split("|")] for line in out.stdout.splitlines() if line.startswith("| "))}
    assert rows["backend's program checked vs the original"][0] == "1"
    assert "└ torch program end to end" not in rows
    assert float(rows["rest"][1]) >= -0.01 and float(rows["compile() in all"][1]) > 0
    # One export, optimized once by our optimizer (not the exporter's), inside the backend's load.
    export, optimizer = rows["└ torch.onnx.export"], rows["└ the exported graph's optimizer"]
    assert export[0] == optimizer[0] == "1"
    assert float(export[1]) + float(optimizer[1]) <= float(rows["backend load (export, session)"][1]) + 0.01


def test_kernel_peers_quick():
    """tools/kernel_peers.py: each step's torch and ONNX Runtime kernels are timed and agree."""
    out = run_tool("kernel_peers.py", "--quick")
    rows = [[c.strip() for c in line.split("|")[1:-1]] for line in out.stdout.splitlines()
            if line.startswith("| ") and not line.startswith("| step")]
    timed = {(r[0], r[1]): r for r in rows}
    for step in ("scores q @ k^T", "softmax over keys", "values p @ v"):
        for kernel in ("torch", "onnxruntime"):
            r = timed[(step, kernel)]
            assert float(r[2]) > 0, r  # microseconds a call
            assert float(r[5]) < 1e-4, r  # max abs difference to ONNX Runtime's output
    assert float(timed[("scores q @ k^T", "torch")][3]) > 0  # GFLOP/s where the step has FLOPs
