"""Typed lowering: a graph module -> steps over virtual registers with dtype, shape, device, bytes.

Every tensor a node defines is a register. Views do not own storage: they are aliases of the
register that does, and keep it alive. Which ops are views depends on where they run: PyTorch
returns views for everything its schema marks as aliasing, ONNX Runtime copies on Transpose,
Expand and Slice and aliases only reshapes.
"""

from __future__ import annotations

import operator
from typing import Optional

import torch
from torch.fx import GraphModule, Node

from backends.capabilities import CAPABILITIES, numel_hint, op_name, workspace_bytes
from compiler.ir.graph import finite_bound
from compiler.ir.plan import Register, Step, storage_owner

# Aliasing in ONNX Runtime's CPU kernels (they reuse the input buffer).
_ORT_ALIASES = {"view", "_unsafe_view", "reshape", "squeeze", "unsqueeze", "alias", "detach", "flatten",
                "lift_fresh_copy"}
GUARDS = "_guards_fn"
# ONNX Runtime's allocation planner lets these write their output over an input that dies at
# them (its kernels declare MayInplace); PyTorch's functional ops never do.
_ORT_INPLACE = {"relu", "add", "sub", "mul", "div", "sigmoid", "tanh", "neg", "abs", "exp", "log", "sqrt", "rsqrt",
                "erf", "gelu", "silu", "pow", "clamp", "reciprocal", "softmax", "_softmax"}
_EXTRA_TORCH_ALIASES = {"_unsafe_view"}  # schema says fresh, but it reuses its input's storage


def _dim_text(d) -> object:
    return d if isinstance(d, int) else str(d)


def _bounds(shape) -> dict:
    out = {}
    for d in shape:
        node = getattr(d, "node", None)
        if node is None or isinstance(d, int):
            continue
        env = node.shape_env
        for sym in node.expr.free_symbols:
            rng = env.var_to_range.get(sym)
            if rng is not None:
                out[str(sym)] = [finite_bound(rng.lower), finite_bound(rng.upper)]
    return out


def register_for(name: str, val, kind: str, device: Optional[str] = None) -> Register:
    return Register(name=name, dtype=str(val.dtype).replace("torch.", ""), shape=[_dim_text(d) for d in val.shape],
                    device=device or val.device.type, nbytes=int(numel_hint(val.shape) * val.element_size()),
                    kind=kind, bounds=_bounds(val.shape))


def is_tuple_read(node: Node) -> bool:
    """``getitem(x, i)`` on a node's tuple result: names a value, computes nothing."""
    return node.op == "call_function" and node.target is operator.getitem and isinstance(node.args[0], Node) \
        and isinstance(node.args[1], int)


def step_nodes(gm: GraphModule) -> list:
    """The nodes the typed lowering makes steps of (not tuple reads, not ep.module()'s input guards)."""
    return [n for n in gm.graph.nodes
            if (n.op == "call_function" and not is_tuple_read(n)) or (n.op == "call_module" and n.target != GUARDS)]


def is_alias(node: Node, backend: str) -> bool:
    target = node.target
    if not isinstance(target, torch._ops.OpOverload):
        return False
    base = op_name(node)
    if backend == "onnxruntime":
        return base in _ORT_ALIASES
    if base in _EXTRA_TORCH_ALIASES:
        return True
    returns = target._schema.returns
    return bool(returns) and returns[0].alias_info is not None and not returns[0].alias_info.is_write


def _value(node: Node, gm: GraphModule):
    val = node.meta.get("val")
    if val is None and node.op == "get_attr":
        obj = gm
        for part in str(node.target).split("."):
            obj = getattr(obj, part)
        val = obj
    return val


def lower(gm: GraphModule, backend_of: dict) -> tuple[dict, list, list]:
    """(registers by name, steps in graph order, output register names).

    ``backend_of``: node name -> the backend its step runs on.
    """
    registers: dict = {}
    regs_of: dict = {}  # node name -> register names it defines (or picks, for getitem)
    steps: list = []
    outputs: list = []
    step_of: dict = {}  # node name -> the step that computes it (getitem: its source's)

    for node in gm.graph.nodes:
        val = _value(node, gm)
        if node.op in ("placeholder", "get_attr"):
            if isinstance(val, torch.Tensor):
                kind = "input" if node.op == "placeholder" else "constant"
                registers[node.name] = register_for(node.name, val, kind)
                regs_of[node.name] = [node.name]
            else:
                regs_of[node.name] = []
            continue
        if node.op == "call_module" and node.target == GUARDS:
            continue  # input checks ep.module() runs first; not part of the computation
        if node.op == "output":
            for a in _flat_nodes(node.args):
                outputs += regs_of.get(a.name, [])
            continue
        if is_tuple_read(node):
            src = regs_of.get(node.args[0].name, [])
            picked = f"{node.args[0].name}.{node.args[1]}"
            regs_of[node.name] = [picked] if picked in src else []
            step_of[node.name] = step_of.get(node.args[0].name)
            continue
        backend = backend_of.get(node.name, "torch")
        inputs = []
        for a in _flat_nodes((node.args, node.kwargs)):
            for r in regs_of.get(a.name, []):
                if r not in inputs:
                    inputs.append(r)
        outs = []
        if isinstance(val, torch.Tensor):
            reg = register_for(node.name, val, "value", CAPABILITIES[backend].device)
            if backend == "onnxruntime" and inputs and all(registers[r].kind == "constant" for r in inputs):
                reg.kind = "constant"  # ORT folds ops on initializers when it loads the session
            elif is_alias(node, backend) and inputs:
                reg.kind, reg.alias_of = "alias", storage_owner(registers, inputs[0])
            registers[node.name] = reg
            outs = [node.name]
        elif isinstance(val, (tuple, list)):
            for i, v in enumerate(val):
                if isinstance(v, torch.Tensor):
                    name = f"{node.name}.{i}"
                    registers[name] = register_for(name, v, "value", CAPABILITIES[backend].device)
                    outs.append(name)
        regs_of[node.name] = outs
        op = str(node.target) if node.op == "call_function" else f"{node.op}:{node.target}"
        deps = []
        for a in _flat_nodes((node.args, node.kwargs)):
            src = step_of.get(a.name)
            if src is not None and src not in deps:
                deps.append(src)
        step_of[node.name] = node.name
        steps.append(Step(name=node.name, op=op, backend=backend, inputs=inputs, outputs=outs,
                          workspace_bytes=workspace_bytes(node, backend), deps=deps,
                          inplace=backend == "onnxruntime" and op_name(node) in _ORT_INPLACE))
    return registers, steps, outputs


def _flat_nodes(args) -> list:
    found: list = []
    torch.fx.node.map_arg(args, found.append)
    return found
