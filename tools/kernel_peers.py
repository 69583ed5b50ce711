"""The kernels a window site's blocked attention is made of, in torch and in ONNX Runtime.

    python tools/kernel_peers.py [--threads 2] [--heads 8] [--blocks 32] [--block 64] [--window 256]
                                 [--inductor] [--quick]

Both CPU backends run a window site as products over gathered key blocks: per query block of
``block`` rows, ``window + block`` keys (the kept 64-blocks of ``window:256``). The torch backend
runs them inside FlexAttention's C++ kernel, built on torch's GEMMs; the onnxruntime backend as
MatMul, Softmax and MatMul nodes, on MLAS. This times those three steps alone, batched over a
group of query blocks ([heads x blocks, block, keys]) as the onnxruntime lowering groups them,
interleaved in one process: torch's batched GEMM (MKL) and softmax, with ``--inductor`` also
Inductor's C++ GEMM template (max-autotune), against ONNX Runtime's (outputs bound once, so no
allocation is timed). It says how fast each backend's building blocks run on this machine, which
bounds what a lowering built on them can reach. Every torch output is compared with ONNX
Runtime's (exit 1 past 1e-4).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchlib import Contender, machine, markdown_table, print_table, time_interleaved, today, versions  # noqa: E402


def _ort_step(node_type: str, inputs: dict, out_shape: tuple, threads: int, **attrs):
    """One ONNX node as a session with its inputs and output bound once: run() times the kernel."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    f = TensorProto.FLOAT
    graph = helper.make_graph([helper.make_node(node_type, list(inputs), ["y"], **attrs)], node_type,
                              [helper.make_tensor_value_info(n, f, list(a.shape)) for n, a in inputs.items()],
                              [helper.make_tensor_value_info("y", f, list(out_shape))])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    so = ort.SessionOptions()
    so.intra_op_num_threads, so.inter_op_num_threads = threads, 1
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    out = np.empty(out_shape, np.float32)
    binding = sess.io_binding()
    for name, arr in inputs.items():
        binding.bind_cpu_input(name, arr)
    binding.bind_output("y", "cpu", 0, np.float32, list(out_shape), out.ctypes.data)

    def run():
        sess.run_with_iobinding(binding)
        return out

    return run


def _inductor_bmm(a: torch.Tensor, b: torch.Tensor):
    """Inductor's C++ GEMM template for a @ b (max-autotune, that backend alone)."""
    import torch._inductor.config as cfg

    with cfg.patch(max_autotune=True, max_autotune_gemm_backends="CPP"):
        fn = torch.compile(torch.bmm, dynamic=False)
        fn(a, b)
    return lambda: fn(a, b)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--blocks", type=int, default=32, help="query blocks a group")
    ap.add_argument("--block", type=int, default=64)
    ap.add_argument("--window", type=int, default=256)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--inductor", action="store_true", help="also Inductor's C++ GEMM template (compiles)")
    ap.add_argument("--quick", action="store_true", help="tiny sizes, one repeat: a smoke test")
    a = ap.parse_args(argv)
    if a.quick:
        a.heads, a.blocks, a.block, a.window, a.dim = 2, 2, 8, 16, 8
    torch.set_num_threads(a.threads)
    n, bs, keys, d = a.heads * a.blocks, a.block, a.window + a.block, a.dim
    g = torch.Generator().manual_seed(0)
    q, kt, v = torch.randn(n, bs, d, generator=g), torch.randn(n, d, keys, generator=g), torch.randn(n, keys, d, generator=g)
    scores = torch.bmm(q, kt)
    probs = torch.softmax(scores, -1)
    steps = [  # (step, FLOPs or None, torch call, onnxruntime call)
        ("scores q @ k^T", 2 * n * bs * d * keys, torch.empty(n, bs, keys), lambda out: torch.bmm(q, kt, out=out),
         _ort_step("MatMul", {"a": q.numpy(), "b": kt.numpy()}, (n, bs, keys), a.threads)),
        ("softmax over keys", None, torch.empty(n, bs, keys),
         lambda out: torch.ops.aten._softmax.out(scores, -1, False, out=out),
         _ort_step("Softmax", {"x": scores.numpy()}, (n, bs, keys), a.threads, axis=-1)),
        ("values p @ v", 2 * n * bs * keys * d, torch.empty(n, bs, d), lambda out: torch.bmm(probs, v, out=out),
         _ort_step("MatMul", {"a": probs.numpy(), "b": v.numpy()}, (n, bs, d), a.threads)),
    ]
    rows, worst = [], 0.0
    for name, flops, buf, torch_call, ort_call in steps:
        cs = [Contender("torch", lambda f=torch_call, b=buf: f(b)), Contender("onnxruntime", ort_call)]
        if a.inductor and flops is not None:
            cs.append(Contender("inductor", _inductor_bmm(q, kt) if name.startswith("scores") else _inductor_bmm(probs, v)))
        with torch.no_grad():
            time_interleaved(cs, min_repeats=1 if a.quick else 20, max_repeats=1 if a.quick else 200,
                             budget_s=0.5 if a.quick else 5.0, label=name, gap_s=0.0)
        want = torch.from_numpy(np.array(cs[1].output))
        for c in cs:
            err = (torch.as_tensor(np.asarray(c.output)) - want).abs().max().item()
            worst = max(worst, err)
            row = {"step": name, "kernel": c.name, "us": c.ms * 1e3, "vs onnxruntime": cs[1].ms / c.ms, "max abs diff": err}
            if flops is not None:
                row["GFLOP/s"] = flops / (c.ms * 1e-3) / 1e9
            rows.append(row)
    cols = ["step", "kernel", "us", "GFLOP/s", "vs onnxruntime", "max abs diff"]
    title = (f"[{n}, {bs}, {keys}] scores (heads {a.heads} x query blocks {a.blocks}, block {bs}, keys {keys}, "
             f"head dim {d}), {a.threads} threads, fp32")
    print_table(rows, cols, title)
    print(f"\n{machine()}; {versions('torch', 'onnxruntime')}; {today()}\n")
    print(markdown_table(rows, cols))
    if worst > 1e-4:
        print(f"kernel_peers: torch and ONNX Runtime outputs differ by {worst:.2e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
