"""Generation on the Triton backend (compiler.driver.generate, backends.triton_cache): the attention over
the cache runs in the Triton kernel (Triton's interpreter on CPU, set by conftest), and generates
what the model's own generate() does (fused) and what the torch backend does (sinks + window)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from compiler.driver.generate import compile_generator
from test_generate import VOCAB, llama_case

# The generator runs on the CPU model here, so the kernels run in Triton's interpreter.
needs_interpreter = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                       reason="CPU tensors: runs in Triton's interpreter")


@pytest.fixture(scope="module")
def llama(one_thread):
    return llama_case()


@needs_interpreter
def test_fused_triton_equals_model_generate(llama, monkeypatch):
    from backends import triton_cache

    calls = []
    real = triton_cache.attention
    monkeypatch.setattr(triton_cache, "attention", lambda *a, **k: calls.append(a[0].shape) or real(*a, **k))
    _, ids, (ref_tokens, ref_logits), ep = llama
    gen = compile_generator(ep, policy="fused", backend="triton")
    out = gen.generate(ids, max_new_tokens=32)
    assert torch.equal(out, ref_tokens)
    assert (gen.last_logits - ref_logits).abs().max().item() < 1e-4
    assert len(calls) == 2 * 32 and gen.report.backend == "triton"  # every site, every step, in the kernel


@needs_interpreter
def test_sinks_window_triton_equals_torch_backend(llama):
    _, _, _, ep = llama
    torch.manual_seed(5)
    ids = torch.randint(1, VOCAB, (1, 10))
    want = compile_generator(ep, policy="sinks:4,window:16")
    ref = want.generate(ids, max_new_tokens=50)  # 44 steps past the window filling
    gen = compile_generator(ep, policy="sinks:4,window:16", backend="triton")
    assert torch.equal(gen.generate(ids, max_new_tokens=50), ref)
    assert (gen.last_logits - want.last_logits).abs().max().item() < 1e-4
    assert gen.cache_bytes == want.cache_bytes


def test_triton_refused_without_cuda_or_interpreter():
    """Like compile(): one line, a BackendError, before any capture."""
    root = Path(__file__).resolve().parents[1]
    code = ("import torch, compiler\n"
            "try:\n    compiler.compile_generator(torch.nn.Linear(2, 2), backend='triton')\n"
            "except compiler.BackendError as e:\n    print(e)\n")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True,
                       env={**env, "PYTHONPATH": str(root), "CUDA_VISIBLE_DEVICES": ""})
    assert r.stdout.strip().startswith("backend 'triton' needs a CUDA GPU and none is visible"), r.stderr[-300:]
    assert len(r.stdout.strip().splitlines()) == 1
