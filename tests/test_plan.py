"""The execution plan: validity on the zoo and on random graphs, mixed-backend execution with the
fewest switches, predicted vs measured peak memory, and the plan's trip through save/load and CLI."""

from __future__ import annotations

import json

import networkx as nx
import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch.fx import Graph, GraphModule

import compiler
from backends import memory_probe
from backends.capabilities import prepare
from backends.memory_plan import intervals, linear_scan
from backends.planner import make_plan
from compiler.ir.plan import Plan, plan_lines
from zoo import HF_CASES, TORCH_CASES, hf_model, torch_model


@torch.library.custom_op("attnforge_plan_test::halve", mutates_args=())
def halve(x: torch.Tensor) -> torch.Tensor:
    return x / 2


@halve.register_fake
def _(x):
    return torch.empty_like(x)


HALVE = torch.ops.attnforge_plan_test.halve.default



def check_plan(plan: Plan) -> None:
    """The invariants every plan must hold."""
    position = {s.name: i for i, s in enumerate(plan.steps)}
    for i, s in enumerate(plan.steps):
        assert all(position[d] < i for d in s.deps), f"{s.name} runs before a step it depends on"
        for r in s.inputs:
            reg = plan.registers[r]
            assert reg.kind in ("input", "constant") or any(r in p.outputs or plan.registers[r].alias_of in p.outputs
                                                            for p in plan.steps[:i]), f"{r} read before written"
    ivs = {iv.register: iv for iv in intervals(plan.registers, plan.steps, plan.outputs)}
    assert set(plan.buffers) == set(ivs)
    by_buffer: dict = {}
    for reg, buf in plan.buffers.items():
        assert plan.buffer_sizes[buf] >= ivs[reg].nbytes, f"{reg} does not fit buffer {buf}"
        by_buffer.setdefault(buf, []).append(ivs[reg])
    for buf, regs in by_buffer.items():
        assert len({iv.dtype for iv in regs}) == 1
        regs.sort(key=lambda iv: iv.start)
        for a, b in zip(regs, regs[1:]):
            assert a.end < b.start, f"{a.register} and {b.register} share buffer {buf} while both live"
    # Segments: consecutive runs of the order, one backend each, alternating.
    flat = [name for seg in plan.segments for name in seg.steps]
    assert flat == [s.name for s in plan.steps]
    for a, b in zip(plan.segments, plan.segments[1:]):
        assert a.backend != b.backend
    seg_of = {name: seg.index for seg in plan.segments for name in seg.steps}
    dag = nx.DiGraph()
    dag.add_nodes_from(range(len(plan.segments)))
    dag.add_edges_from((seg_of[d], seg_of[s.name]) for s in plan.steps for d in s.deps if seg_of[d] != seg_of[s.name])
    assert nx.is_directed_acyclic_graph(dag)
    assert plan.planned.buffer_count <= plan.naive.buffer_count
    if len(plan.segments) <= 1:
        assert plan.planned.peak_live_bytes <= plan.naive.peak_live_bytes
    workspace = max((s.workspace_bytes for s in plan.steps), default=0)
    assert plan.planned.peak_live_bytes <= plan.planned.buffer_bytes + workspace


def min_switches(plan: Plan) -> int:
    """Brute force: the fewest backend changes over every topological order of the steps."""
    g = nx.DiGraph()
    g.add_nodes_from(s.name for s in plan.steps)
    g.add_edges_from((d, s.name) for s in plan.steps for d in s.deps)
    backend = {s.name: s.backend for s in plan.steps}
    return min(sum(backend[a] != backend[b] for a, b in zip(order, order[1:]))
               for order in nx.all_topological_sorts(g))


# --- the zoo ---------------------------------------------------------------------------------


def _zoo(case):
    return hf_model(*case) if isinstance(case, tuple) else torch_model(case)


@pytest.mark.parametrize("case", HF_CASES[::2] + TORCH_CASES, ids=str)
@pytest.mark.parametrize("backend", ["torch", "onnxruntime"])
def test_zoo_plans_are_valid(case, backend):
    z = _zoo(case)
    cm = compiler.compile(z.model, z.args, example_kwargs=z.kwargs, policy="fused", show_progress=False)
    plan = make_plan(prepare(cm.exported_program, backend).module(), backend)
    check_plan(plan)
    assert [s.backend for s in plan.segments] == [backend]  # the zoo needs no fallback
    assert plan.planned.buffer_count < plan.naive.buffer_count


def test_torch_backend_runs_the_plan_in_its_order():
    z = torch_model("encoder")
    cm = compiler.compile(z.model, z.args, policy="fused", show_progress=False)
    code = cm._run.module.code
    steps = [s.name for s in cm.plan.steps]
    assert [n.name for n in cm._run.module.graph.nodes if n.name in set(steps)] == steps
    assert "_guards_fn" in code
    torch.testing.assert_close(cm(*z.args), z.model(*z.args), atol=1e-5, rtol=1e-5)
    assert cm.report.plan["planned"]["buffer_count"] == cm.plan.planned.buffer_count


# --- random graphs ---------------------------------------------------------------------------


@st.composite
def random_graphs(draw):
    """A random DAG of aten ops on [4, 8] float tensors with some unsupported (custom) ops; cat makes
    bigger values so buffers differ in size."""
    n = draw(st.integers(2, 8))
    ops = []
    for i in range(n):
        kind = draw(st.sampled_from(["add", "relu", "halve", "cat", "mul"]))
        a = draw(st.integers(0, i))
        b = draw(st.integers(0, i))
        ops.append((kind, a, b))
    outs = draw(st.lists(st.integers(1, n), min_size=1, max_size=3, unique=True))
    return ops, outs


def build(ops, outs) -> GraphModule:
    g = Graph()
    x = g.placeholder("x")
    vals, shapes = [x], [(4, 8)]
    for kind, a, b in ops:
        if kind in ("add", "mul") and shapes[a] != shapes[b]:
            kind = "relu"
        if kind == "cat":
            node = g.call_function(torch.ops.aten.cat.default, ([vals[a], vals[b]],))
            shape = (shapes[a][0] + shapes[b][0], 8)
        elif kind in ("add", "mul"):
            node = g.call_function(getattr(torch.ops.aten, kind).Tensor, (vals[a], vals[b]))
            shape = shapes[a]
        else:
            node = g.call_function(HALVE if kind == "halve" else torch.ops.aten.relu.default, (vals[a],))
            shape = shapes[a]
        vals.append(node)
        shapes.append(shape)
    g.output(tuple(vals[i] for i in outs))
    gm = GraphModule(torch.nn.Module(), g)
    # Real values stand in for the traced ones.
    env = {}
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            env[node] = torch.randn(4, 8)
        elif node.op == "call_function":
            env[node] = node.target(*torch.fx.node.map_arg(node.args, env.__getitem__))
        else:
            continue
        node.meta["val"] = env[node]
    return gm


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(random_graphs(), st.sampled_from(["torch", "onnxruntime"]))
def test_random_graph_plans_are_valid_with_fewest_switches(graph, backend):
    gm = build(*graph)
    plan = make_plan(gm, backend)
    check_plan(plan)
    compute = [n for n in gm.graph.nodes if n.op == "call_function"]
    assert len(plan.steps) == len(compute)
    if backend == "onnxruntime":
        assert all(s.backend == ("torch" if "halve" in s.op else "onnxruntime") for s in plan.steps)
    assert plan.switches == min_switches(plan)
    assert plan.switches <= plan.greedy_transitions


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 20), st.integers(0, 20), st.integers(1, 4096),
                          st.sampled_from(["float32", "int64"])), min_size=1, max_size=30))
def test_linear_scan_never_shares_a_live_buffer(raw):
    from backends.memory_plan import Interval

    ivs = [Interval(f"r{i}", min(a, b), max(a, b), n, dt) for i, (a, b, n, dt) in enumerate(raw)]
    assignment, sizes = linear_scan(ivs)
    by = {iv.register: iv for iv in ivs}
    for r, buf in assignment.items():
        assert sizes[buf] >= by[r].nbytes
    for r1, b1 in assignment.items():
        for r2, b2 in assignment.items():
            if r1 < r2 and b1 == b2:
                x, y = by[r1], by[r2]
                assert x.dtype == y.dtype
                assert x.end < y.start or y.end < x.start
    # Never more buffers than the most registers of one dtype alive at once.
    for dt in {iv.dtype for iv in ivs}:
        live = max(sum(iv.start <= t <= iv.end for iv in ivs if iv.dtype == dt) for t in range(21))
        assert len({assignment[iv.register] for iv in ivs if iv.dtype == dt}) <= live


# --- mixed backends --------------------------------------------------------------------------


class WithCustomOp(torch.nn.Module):
    """Attention, a projection, an op ONNX cannot express, and a residual around it."""

    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(16, 16)
        self.out = torch.nn.Linear(16, 16)

    def forward(self, q, k, v):
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        h = torch.ops.attnforge_plan_test.halve(self.proj(a))
        return self.out(torch.relu(h)) + a


def _qkv(seq=8):
    g = torch.Generator().manual_seed(0)
    return tuple(torch.randn(2, 4, seq, 16, generator=g) for _ in range(3))


def test_unsupported_op_runs_in_a_torch_segment_with_fewest_switches():
    model, x = WithCustomOp().eval(), _qkv()
    ort = compiler.compile(model, x, backend="onnxruntime", show_progress=False)
    ref = compiler.compile(model, x, backend="torch", show_progress=False)
    torch.testing.assert_close(ort(*x), ref(*x), atol=1e-4, rtol=0)
    torch.testing.assert_close(ort(*x), model(*x), atol=1e-4, rtol=0)
    plan = ort.plan
    check_plan(plan)
    assert [s.backend for s in plan.segments] == ["onnxruntime", "torch", "onnxruntime"]
    assert plan.switches == min_switches(plan) == 2
    assert plan.fallbacks == {"attnforge_plan_test.halve.default": "no onnxruntime lowering"}
    assert len(ort._run.segments) == 2  # two ONNX Runtime sessions
    assert ort.report.lowering["onnx_segments"] == 2
    assert ort.report.sites[0].lowering in ("attention", "gqa")
    # Crossings: halve's input leaves ORT, its output comes back, and the residual skips over it.
    assert {t.register for t in plan.transitions} >= {"halve"}
    with pytest.raises(compiler.BackendError, match="3 segments.*halve.*save it as .pt2"):
        ort.save("unused.onnx")


def test_hf_llama_with_a_custom_kernel_groups_work_around_it(monkeypatch):
    """Llama's rotate_half as a custom op ONNX cannot express: per layer, export order would switch
    backend four times (q*cos, rotate q, k*cos, rotate k, ...); the plan runs both rotations in
    one torch segment, two switches per layer. A bool mask crosses segments too."""
    from transformers.models.llama import modeling_llama

    monkeypatch.setattr(modeling_llama, "rotate_half", torch.ops.attnforge_zoo.rotate_half)
    z = hf_model("llama", "sdpa")
    cm = compiler.compile(z.model, z.args, example_kwargs=z.kwargs, backend="onnxruntime", show_progress=False)
    with torch.no_grad():
        ref = z.model(**z.kwargs).last_hidden_state
    torch.testing.assert_close(cm(**z.kwargs).last_hidden_state, ref, atol=1e-4, rtol=0)
    plan = cm.plan
    check_plan(plan)
    layers = z.model.config.num_hidden_layers
    assert plan.switches == 2 * layers
    assert plan.greedy_transitions == 4 * layers
    assert {s.backend for s in plan.segments} == {"onnxruntime", "torch"}
    assert any(plan.registers[t.register].dtype == "bool" for t in plan.transitions) or \
        any(plan.registers[r].dtype == "bool" for seg in plan.segments[1:] for r in seg.inputs)


def test_mixed_plan_keeps_dynamic_sequence_length():
    model, x = WithCustomOp().eval(), _qkv(8)
    seq = torch.export.Dim("seq", min=2, max=64)
    cm = compiler.compile(model, x, backend="onnxruntime", dynamic_shapes=({2: seq}, {2: seq}, {2: seq}),
                          show_progress=False)
    assert len(cm.plan.segments) == 3
    for n in (5, 13):
        y = _qkv(n)
        torch.testing.assert_close(cm(*y), model(*y), atol=1e-4, rtol=0)


def test_plan_is_saved_next_to_the_model_and_reloaded(tmp_path):
    model, x = WithCustomOp().eval(), _qkv()
    cm = compiler.compile(model, x, backend="onnxruntime", show_progress=False)
    path = cm.save(tmp_path / "m.pt2")
    sidecar = tmp_path / "m.pt2.plan.json"
    saved = json.loads(sidecar.read_text())
    assert saved["schema"] == "attnforge.plan/1" and len(saved["segments"]) == 3
    back = compiler.load(path, backend="onnxruntime")
    assert [s.name for s in back.plan.steps] == [s.name for s in cm.plan.steps]
    assert back.plan.to_dict() == Plan.from_dict(saved).to_dict()
    torch.testing.assert_close(back(*x), cm(*x), atol=1e-5, rtol=0)
    assert back.report.plan["transitions"] == 2


# --- predicted vs measured memory ------------------------------------------------------------


class Block(torch.nn.Module):
    """Attention and an MLP on activations large enough that the allocator's rounding is noise."""

    def __init__(self, causal: bool):
        super().__init__()
        self.causal = causal
        self.up = torch.nn.Linear(256, 1024)
        self.down = torch.nn.Linear(1024, 256)

    def forward(self, x):
        b, s, _ = x.shape
        q = x.view(b, s, 4, 64).transpose(1, 2)
        h = F.scaled_dot_product_attention(q, q, q, is_causal=self.causal).transpose(1, 2).reshape(b, s, 256)
        return self.down(torch.relu(self.up(h))) + x


@pytest.mark.skipif(not memory_probe.available(), reason="needs Linux /proc/self/clear_refs and glibc")
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("backend", ["torch", "onnxruntime"])
def test_predicted_peak_within_10_percent_of_measured(backend, causal):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        x = torch.randn(4, 512, 256, generator=torch.Generator().manual_seed(0))
        options = {"intra_op_num_threads": 1, "enable_cpu_mem_arena": False, "enable_mem_pattern": False} \
            if backend == "onnxruntime" else None
        cm = compiler.compile(Block(causal).eval(), (x,), backend=backend, backend_options=options,
                              show_progress=False)
        cm(x)
        measured = min(memory_probe.peak_bytes(lambda: cm(x))[0] for _ in range(3))
        predicted = cm.plan.planned.peak_live_bytes
        assert abs(measured - predicted) <= 0.10 * measured, (measured, predicted)
    finally:
        torch.set_num_threads(threads)


# --- report and CLI --------------------------------------------------------------------------


def test_report_and_cli_show_the_plan(tmp_path, capsys):
    from compiler.cli import main

    model, x = WithCustomOp().eval(), _qkv()
    ep = torch.export.export(model, x)
    src = tmp_path / "m.pt2"
    torch.export.save(ep, src)
    assert main(["plan", str(src), "--backend", "onnxruntime", "--json", str(tmp_path / "plan.json")]) == 0
    out = capsys.readouterr().out
    assert "3 segment(s), 2 transition(s)" in out and "halve" in out
    saved = Plan.load(tmp_path / "plan.json")
    check_plan(saved)
    lines = plan_lines(saved.summary())
    assert "segment 1: torch on cpu" in "\n".join(lines)
    cm = compiler.compile(model, x, backend="onnxruntime", show_progress=False)
    cm.report.save(tmp_path / "r.json")
    assert main(["inspect", str(tmp_path / "r.json")]) == 0
    assert "plan for backend onnxruntime: 3 segment(s)" in capsys.readouterr().out


def test_plan_command_bad_input(tmp_path, capsys):
    from compiler.cli import main

    bad = tmp_path / "x.pt2"
    bad.write_bytes(b"not a zip")
    assert main(["plan", str(bad)]) != 0
    err = capsys.readouterr().err
    assert "x.pt2" in err and "Traceback" not in err
