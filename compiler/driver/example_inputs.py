"""Example inputs given on the command line, held against what a program was captured with.

A program from ``torch.export`` fixes each input's rank and dtype, and each size either to a
number or to a symbol with bounds. Saying which input disagrees, and what the program expects,
is worth more than the guard failure torch would raise halfway through a compile.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch.export import ExportedProgram
from torch.export.graph_signature import ConstantArgument, InputKind

from compiler.driver.capture import finite_bound
from compiler.ir.errors import InputError


def _expected(ep: ExportedProgram) -> Optional[tuple[list, list]]:
    """(positional, keyword) inputs as (name, value or fake tensor); None if an input is nested."""
    spec = ep.call_spec.in_spec
    if spec is None or spec.num_children != 2:
        return None
    n_args = spec.child(0).num_children
    kw_names = list(spec.child(1).context)
    user = [s for s in ep.graph_signature.input_specs if s.kind == InputKind.USER_INPUT]
    if len(user) != n_args + len(kw_names) or any(not spec.child(0).child(i).is_leaf() for i in range(n_args)):
        return None
    placeholders = {n.name: n for n in ep.graph.nodes if n.op == "placeholder"}
    values = []
    for s in user:
        if isinstance(s.arg, ConstantArgument):
            values.append((s.arg.name, s.arg.value))
        else:
            values.append((s.arg.name, placeholders[s.arg.name].meta.get("val")))
    kw = [(name, v) for name, (_, v) in zip(kw_names, values[n_args:])]
    return values[:n_args], kw


def _dim_text(d, ranges: dict) -> str:
    if isinstance(d, int):
        return str(d)
    rng = ranges.get(d.node.expr)
    if rng is None:
        return str(d.node.expr)
    lo, hi = finite_bound(rng.lower), finite_bound(rng.upper)
    return f"({lo}..{hi if hi is not None else ''})"


def describe(val, ranges: dict) -> str:
    """``int64 2x(2..60)``: dtype, then each size as a number or its bounds."""
    dims = "x".join(_dim_text(d, ranges) for d in val.shape)
    return f"{str(val.dtype).replace('torch.', '')} {dims or 'scalar'}"


def _check_one(name: str, got: torch.Tensor, want, ranges: dict) -> None:
    expect = f"the program expects {name} as {describe(want, ranges)}"
    given = f"--example-shape gives {'x'.join(map(str, got.shape))} {str(got.dtype).replace('torch.', '')}"
    if got.dim() != want.dim() or got.dtype != want.dtype:
        raise InputError(f"{expect}; {given}")
    for i, (g, w) in enumerate(zip(got.shape, want.shape)):
        if isinstance(w, int):
            if g != w:
                raise InputError(f"{expect} (dim {i} is fixed at {w}); {given}")
            continue
        rng = ranges.get(w.node.expr)
        if rng is not None:
            lo, hi = finite_bound(rng.lower), finite_bound(rng.upper)
            if (lo is not None and g < lo) or (hi is not None and g > hi):
                raise InputError(f"{expect} (dim {i} between {lo} and {hi if hi is not None else 'any'}); {given}")


def fit_example(ep: ExportedProgram, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """``args``/``kwargs`` arranged as the program takes them (a name that is a positional input
    moves there; captured constants such as ``use_cache`` are filled in), or an InputError that
    names the input and what the program expects."""
    expected = _expected(ep)
    if expected is None:
        return args, kwargs
    positional, keyword = expected
    ranges = dict(ep.range_constraints)
    pos_names = [n for n, _ in positional]
    kw_names = [n for n, _ in keyword]
    known = pos_names + kw_names
    for name in kwargs:
        if name not in known:
            raise InputError(f"--example-shape names {name!r}, but the program's inputs are {', '.join(known)}")
    args = list(args)
    if len(args) > len(positional):
        raise InputError(f"{len(args)} unnamed --example-shape given, but the program takes {len(positional)} "
                         f"positional input(s) ({', '.join(pos_names) or 'none'}); name them (NAME=2x16:int64)")
    for i, (name, want) in enumerate(positional):
        if i >= len(args):
            if name not in kwargs and isinstance(want, torch.Tensor):
                raise InputError(f"the program also needs {name} ({describe(want, ranges)}); add --example-shape "
                                 f"{name}=...")
            args.append(kwargs.pop(name) if name in kwargs else want)
        elif name in kwargs:
            raise InputError(f"--example-shape gives {name} both by position and by name")
    out_kw = {}
    for name, want in keyword:
        if name in kwargs:
            out_kw[name] = kwargs[name]
        elif isinstance(want, torch.Tensor):
            raise InputError(f"the program also needs {name} ({describe(want, ranges)}); add --example-shape "
                             f"{name}=...")
        else:
            out_kw[name] = want  # a constant fixed at capture (use_cache=False)
    for (name, want), got in zip(positional, args):
        if isinstance(want, torch.Tensor):
            if not isinstance(got, torch.Tensor):
                raise InputError(f"the program expects {name} as a tensor ({describe(want, ranges)})")
            _check_one(name, got, want, ranges)
    for name, want in keyword:
        if isinstance(want, torch.Tensor):
            _check_one(name, out_kw[name], want, ranges)
    return tuple(args), out_kw
