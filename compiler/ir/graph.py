"""Small helpers over torch.fx graphs of an ExportedProgram (ATen level)."""

from __future__ import annotations

from typing import Any, Callable, Iterable, Optional, Sequence

import torch
from torch import fx
from torch.export import ExportedProgram
from torch.export.graph_signature import InputKind

aten = torch.ops.aten


def overloads(*packets) -> frozenset:
    """All overloads of the given op packets, so passes match training IR and core ATen alike."""
    out = set()
    for p in packets:
        if isinstance(p, torch._ops.OpOverloadPacket):
            out.update(getattr(p, name) for name in p.overloads())
        else:
            out.add(p)
    return frozenset(out)


def is_op(node: Any, ops: frozenset) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_function" and node.target in ops


def val(node: Any):
    """The fake tensor (or symint) recorded for ``node`` by export, or None."""
    return node.meta.get("val") if isinstance(node, fx.Node) else None


def hint(x) -> int:
    """A concrete int for an int or SymInt (its example value)."""
    if isinstance(x, int):
        return x
    if isinstance(x, torch.SymInt):
        h = x.node.hint
        if h is None:
            raise ValueError(f"symbolic size {x} has no example value")
        return int(h)
    return int(x)


def shape(node: Any) -> Optional[list[int]]:
    v = val(node)
    if not isinstance(v, torch.Tensor):
        return None
    return [hint(s) for s in v.shape]


def sym_shape(node: Any) -> Optional[tuple]:
    v = val(node)
    return tuple(v.shape) if isinstance(v, torch.Tensor) else None


def same_size(a, b) -> bool:
    """Sizes equal for every value of the symbols (not only the example)."""
    if isinstance(a, int) and isinstance(b, int):
        return a == b
    from torch.fx.experimental.symbolic_shapes import statically_known_true

    return bool(statically_known_true(a == b))


def same_shape(a: Sequence, b: Sequence) -> bool:
    return len(a) == len(b) and all(same_size(x, y) for x, y in zip(a, b))


def dtype(node: Any) -> Optional[torch.dtype]:
    v = val(node)
    return v.dtype if isinstance(v, torch.Tensor) else None


def module_path(node: fx.Node) -> str:
    """Innermost module path from ``nn_module_stack`` ("" at the top level)."""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return ""
    path = list(stack.values())[-1][0]
    # export prefixes paths with "L['self']." in some versions; strip such wrappers.
    for prefix in ("L['self'].", "L__self__."):
        if path.startswith(prefix):
            path = path[len(prefix):]
    return path


def module_type(node: fx.Node) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return ""
    t = list(stack.values())[-1][1]
    return getattr(t, "__name__", str(t)).rsplit(".", 1)[-1]


def count_nodes(gm: fx.GraphModule) -> int:
    return sum(1 for n in gm.graph.nodes if n.op not in ("placeholder", "output"))


def user_input_names(ep: ExportedProgram) -> set[str]:
    return {s.arg.name for s in ep.graph_signature.input_specs if s.kind == InputKind.USER_INPUT}


def state_value(ep: ExportedProgram, node: fx.Node) -> Optional[torch.Tensor]:
    """Value of a parameter / buffer / constant placeholder, else None."""
    for spec in ep.graph_signature.input_specs:
        if spec.arg.name != node.name or spec.kind == InputKind.USER_INPUT:
            continue
        if spec.target in ep.state_dict:
            return ep.state_dict[spec.target]
        if spec.target in ep.constants:
            c = ep.constants[spec.target]
            return c if isinstance(c, torch.Tensor) else None
    return None


def ancestors(node: fx.Node, stop: Iterable[fx.Node] = ()) -> set[fx.Node]:
    """Every node ``node`` depends on (inclusive), not walking past ``stop``."""
    stop = set(stop)
    seen: set[fx.Node] = set()
    todo = [node]
    while todo:
        n = todo.pop()
        if n in seen:
            continue
        seen.add(n)
        if n in stop:
            continue
        todo.extend(n.all_input_nodes)
    return seen


def depends_on_user_values(node: fx.Node, user_inputs: set[str]) -> bool:
    """True when ``node``'s value depends on the *values* of user inputs.

    Shapes of user inputs (``sym_size``) do not count: a mask built from ``arange(seq_len)``
    is a function of the shape only.
    """
    seen: set[fx.Node] = set()
    todo = [node]
    while todo:
        n = todo.pop()
        if n in seen:
            continue
        seen.add(n)
        if n.op == "placeholder" and n.name in user_inputs:
            return True
        if n.op == "call_function" and n.target in SHAPE_ONLY:
            continue
        todo.extend(n.all_input_nodes)
    return False


SHAPE_ONLY = overloads(aten.sym_size, aten.sym_numel, aten.sym_stride)  # read a shape, not values


def reaches(node: fx.Node, pred, budget: int = 64) -> bool:
    """Whether ``node`` or one of its first ``budget`` ancestors satisfies ``pred`` (size reads
    are not followed: a tensor's shape is not its value)."""
    todo, seen = [node], set()
    while todo and len(seen) < budget:
        n = todo.pop()
        if n in seen:
            continue
        seen.add(n)
        if pred(n):
            return True
        if n.op == "call_function" and n.target not in SHAPE_ONLY:
            todo.extend(n.all_input_nodes)
    return False


class ConeEvaluator:
    """Evaluates nodes that do not depend on user input values.

    Parameters, buffers and constants take their stored values; symbolic sizes take their
    example values. Used to look at what mask-building code computes (is it causal?).
    """

    def __init__(self, ep: ExportedProgram):
        self.ep = ep
        self.env: dict[fx.Node, Any] = {}
        self._derived: dict[Any, Any] = {}

    def derived(self, key, compute: Callable[[], Any]) -> Any:
        """``compute()``, once per ``key``: a fact about evaluated values (a mask's pattern) that
        every site sharing those values asks for."""
        if key not in self._derived:
            self._derived[key] = compute()
        return self._derived[key]

    def __call__(self, node: fx.Node) -> Any:
        if node in self.env:
            return self.env[node]
        # A size read (sym_size of a user input) takes its example value: do not walk into the input.
        cone = ancestors(node, stop=[n for n in node.graph.nodes if n.op == "call_function" and n.target in SHAPE_ONLY])
        order = [n for n in node.graph.nodes if n in cone]
        for n in order:
            if n in self.env:
                continue
            self.env[n] = self._eval(n)
        return self.env[node]

    def _eval(self, n: fx.Node) -> Any:
        if n.op == "placeholder":
            v = state_value(self.ep, n)
            if v is None:
                raise ValueError(f"{n.name} is a user input")
            return v
        if n.op == "call_function" and n.target in SHAPE_ONLY:
            return hint(val(n))
        if n.op != "call_function":
            raise ValueError(f"cannot evaluate {n.op} {n.name}")
        args = fx.node.map_arg(n.args, lambda a: self.env[a])
        kwargs = fx.node.map_arg(n.kwargs, lambda a: self.env[a])
        args = fx.node.map_aggregate(args, lambda a: hint(a) if isinstance(a, torch.SymInt) else a)
        with torch.no_grad():
            return n.target(*args, **kwargs)


def finite_bound(b) -> Optional[int]:
    """A range bound from export as an int, or None where unbounded (torch's ``int_oo`` claims
    ``is_finite``, so it is compared with both infinities)."""
    from torch.utils._sympy.numbers import int_oo

    return None if b in (int_oo, -int_oo) or not b.is_finite else int(b)
