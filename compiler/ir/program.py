"""ExportedProgram surgery shared by passes: copying, pruning and adding lifted state."""

from __future__ import annotations

import copy

import torch
from torch import fx
from torch.export import ExportedProgram
from torch.export.graph_signature import ConstantArgument, InputKind, InputSpec, TensorArgument


def clone_program(ep: ExportedProgram) -> ExportedProgram:
    """A copy whose graph can be rewritten; weights are shared, not copied."""
    gm = copy.deepcopy(ep.graph_module)
    # Copying may rename nodes that shadow builtins (a placeholder called "input"); the
    # signature refers to nodes by name, so follow the renames.
    renames = {a.name: b.name for a, b in zip(ep.graph.nodes, gm.graph.nodes) if a.name != b.name}
    signature = copy.deepcopy(ep.graph_signature)
    for spec in (*signature.input_specs, *signature.output_specs):
        if isinstance(spec.arg, TensorArgument) and spec.arg.name in renames:
            spec.arg = TensorArgument(name=renames[spec.arg.name])
    return ExportedProgram(
        root=gm,
        graph=gm.graph,
        graph_signature=signature,
        state_dict=dict(ep.state_dict),
        range_constraints=dict(ep.range_constraints),
        module_call_graph=copy.deepcopy(ep.module_call_graph),
        example_inputs=ep.example_inputs,
        constants=dict(ep.constants),
        verifiers=[ep.verifier],
    )


def prune_unused_state(ep: ExportedProgram) -> list[str]:
    """Drop parameters, buffers and constants no node reads any more (e.g. a causal mask buffer)."""
    sig = ep.graph_signature
    mutated = {s.target for s in sig.output_specs if s.target is not None}
    placeholders = {n.name: n for n in ep.graph.nodes if n.op == "placeholder"}
    removed = []
    for spec in list(sig.input_specs):
        if spec.kind == InputKind.USER_INPUT or not isinstance(spec.arg, TensorArgument):
            continue
        node = placeholders.get(spec.arg.name)
        if node is None or node.users or spec.target in mutated:
            continue
        ep.graph.erase_node(node)
        sig.input_specs.remove(spec)
        still_used = any(s.target == spec.target for s in sig.input_specs)
        if not still_used:
            ep.state_dict.pop(spec.target, None)
            ep.constants.pop(spec.target, None)
        removed.append(spec.target)
    ep.graph_module.recompile()
    return removed


def add_constant(ep: ExportedProgram, name: str, value: torch.Tensor, like: fx.Node) -> fx.Node:
    """Lift ``value`` as a new constant input and return its placeholder."""
    sig = ep.graph_signature
    taken = {s.target for s in sig.input_specs} | {n.name for n in ep.graph.nodes}
    base, i = name, 0
    while name in taken:
        i += 1
        name = f"{base}_{i}"
    first_user = next(
        (n for n in ep.graph.nodes if n.op == "placeholder" and _kind(sig, n.name) == InputKind.USER_INPUT),
        None,
    )
    anchor = first_user if first_user is not None else next(n for n in ep.graph.nodes if n.op != "placeholder")
    with ep.graph.inserting_before(anchor):
        node = ep.graph.placeholder(name)
    node.meta.update({k: v for k, v in like.meta.items() if k in ("val", "tensor_meta")})
    fake = like.meta.get("val")
    if fake is not None:
        node.meta["val"] = fake
    index = next((i for i, s in enumerate(sig.input_specs) if s.kind == InputKind.USER_INPUT), len(sig.input_specs))
    sig.input_specs.insert(index, InputSpec(InputKind.CONSTANT_TENSOR, TensorArgument(name=node.name), target=name))
    ep.constants[name] = value
    return node


def _kind(sig, name):
    for s in sig.input_specs:
        if not isinstance(s.arg, ConstantArgument) and s.arg.name == name:
            return s.kind
    return None


def sync_output_specs(ep: ExportedProgram) -> None:
    """Point output specs at the nodes the graph returns now (a pass may have replaced them)."""
    out = next(n for n in reversed(ep.graph.nodes) if n.op == "output")
    for spec, node in zip(ep.graph_signature.output_specs, out.args[0]):
        if isinstance(spec.arg, TensorArgument) and isinstance(node, fx.Node) and spec.arg.name != node.name:
            spec.arg = TensorArgument(name=node.name)
