"""The rewritten program does the rewritten work and nothing of what it replaced.

A rewrite that leaves the replaced ``scaled_dot_product_attention`` (or softmax and score
matmuls) in the graph still computes the dense attention on every call; the numbers stay right,
so only the graph and a FLOP count can tell.
"""

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

import compiler
from compiler.driver.capture import hf_defaults
from compiler.ir.graph import count_nodes
from compiler.reference.linear_ops import LINEAR_ATTENTION, linear_attention_reference
from compiler.ir.ops import attention_reference
from compiler.reference.sparse_ops import SPARSE_ATTENTION, sparse_attention_reference
from passes.attention_fusion import ATTENTION
from zoo import hf_model, torch_model

# Ops that are the dense attention itself: none may survive from a rewritten site.
_DENSE = {"scaled_dot_product_attention", "softmax", "_softmax", "matmul", "bmm", "baddbmm", "einsum",
          "_scaled_dot_product_flash_attention_for_cpu", "_safe_softmax"}

POLICIES = {"fused": "fused", "window": "window:3,sinks:1,block=2", "topk": "topk:blocks=1,block=2",
            "linear": "linear:elu"}

# (zoo model, the policies it takes): linear attention applies key masks only, so the padded
# causal models (a mask that varies per query) are left to the others.
MODELS = {
    "llama-sdpa": ("fused", "window", "topk"),
    "llama-eager": ("fused", "window", "topk"),
    "bert-sdpa": ("fused", "window", "topk", "linear"),
    "bert-eager": ("fused", "window", "topk", "linear"),
    "encoder-causal": ("fused", "window", "topk", "linear"),
    "mha": ("fused", "window", "linear"),
    "gpt2-sdpa": ("fused",),
    "gpt2-eager": ("fused",),
}


def _zoo(name):
    if "-" in name and name.split("-")[0] in ("llama", "bert", "gpt2", "vit"):
        return hf_model(*name.split("-"))
    return torch_model(name)


@pytest.fixture(scope="module")
def exports(one_thread):
    cache = {}

    def get(name):
        if name not in cache:
            z = _zoo(name)
            kwargs = hf_defaults(z.model, dict(z.kwargs))
            cache[name] = (z, compiler.capture(z.model, z.args, example_kwargs=z.kwargs), kwargs)
        return cache[name]

    return get


def _op(n) -> str:
    pkt = getattr(n.target, "_overloadpacket", None)
    return getattr(pkt, "__name__", str(n.target))


@pytest.mark.parametrize("name,policy", [(m, p) for m, ps in MODELS.items() for p in ps])
def test_nothing_of_a_rewritten_site_survives(exports, name, policy):
    z, ep, kwargs = exports(name)
    cm = compiler.compile_program(ep, z.args, kwargs, policy=POLICIES[policy], model_name=name)
    rewritten = [s for s in cm.report.sites if s.status == "rewritten"]
    assert len(rewritten) == z.attention_blocks, [(s.id, s.status, s.reason) for s in cm.report.sites]
    graph = cm.exported_program.graph
    left = {n.name: _op(n) for n in graph.nodes if n.op == "call_function"}
    for s in rewritten:
        dense = [n["name"] for n in s.subgraph_before["nodes"] if n["op"].split(".")[-1] in _DENSE]
        assert dense, s.subgraph_before  # the site did compute dense attention
        assert not [d for d in dense if d in left], (s.id, [d for d in dense if d in left])
    # Every attention op in the program is one of ours now.
    assert not [n for n, op in left.items() if op in _DENSE - {"matmul", "bmm", "einsum", "baddbmm"}], left
    assert count_nodes(cm.exported_program.graph_module) == cm.report.totals["nodes_after"]
    ref = compiler.driver.verify.run(ep, z.args, kwargs)
    got = cm(*z.args, **kwargs)
    if policy == "fused":
        assert compiler.driver.verify.compare(ref, got)["passed"]


class _SdpaStack(torch.nn.Module):
    """Two causal SDPA layers, long enough for a window to skip most of the triangle."""

    def __init__(self, dim=64, heads=4):
        super().__init__()
        self.heads = heads
        self.qkv = torch.nn.ModuleList(torch.nn.Linear(dim, 3 * dim) for _ in range(2))

    def forward(self, x):
        b, s, d = x.shape
        for proj in self.qkv:
            q, k, v = proj(x).view(b, s, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
            y = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
            x = x + y.transpose(1, 2).reshape(b, s, d)
        return x


def _sdpa_cpu_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    # torch counts its CUDA SDPA kernels (the full square, causal or not) but not the CPU one.
    return sdpa_flop_count(query_shape, key_shape, value_shape)


_REFERENCES = {ATTENTION: attention_reference, SPARSE_ATTENTION: sparse_attention_reference,
               LINEAR_ATTENTION: linear_attention_reference}


class _Transparent(torch.fx.Interpreter):
    """Runs our ops' PyTorch implementations as plain Python, so the counter sees their matmuls
    (a dispatch mode sees a custom op as one opaque call)."""

    def call_function(self, target, args, kwargs):
        return _REFERENCES.get(target, target)(*args, **kwargs)


def _flops(program, *args) -> int:
    mapping = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _sdpa_cpu_flops}
    with FlopCounterMode(display=False, custom_mapping=mapping) as counter, torch.no_grad():
        if isinstance(program, torch.export.ExportedProgram):
            _Transparent(program.module()).run(*args)
        else:
            program(*args)
    return counter.get_total_flops()


def test_window_policy_does_less_work_than_the_original(one_thread):
    model = _SdpaStack().eval()
    x = torch.randn(1, 512, 64, generator=torch.Generator().manual_seed(0))
    original = _flops(model, x)
    linears = 2 * 2 * 512 * 64 * 192
    assert original > 2 * linears  # the original's attention is counted
    fused = compiler.compile(model, (x,), "fused").exported_program
    window = compiler.compile(model, (x,), "window:32,sinks:4,block=32").exported_program
    assert _flops(fused, x) <= original
    # 512 queries read at most 3 blocks of 32 keys (sinks, window, diagonal): under 1/5 of the square.
    assert _flops(window, x) - linears < 0.25 * (original - linears)
