"""Numerical verification: the rewritten program against the original, end to end and per site."""

from __future__ import annotations

import math
from typing import Any, Iterable

import torch
from torch import fx
from torch.export import ExportedProgram
from torch.utils import _pytree as pytree

_TOLERANCE = {torch.float32: 1e-5, torch.float64: 1e-7, torch.float16: 1e-2, torch.bfloat16: 2e-2}


def tolerance(dtype: torch.dtype, magnitude: float = 1.0) -> float:
    """Allowed max abs error for an exact rewrite, scaled for values larger than 1."""
    return _TOLERANCE.get(dtype, 1e-5) * max(1.0, magnitude)


def max_abs_error(ref: torch.Tensor, new: torch.Tensor) -> float:
    ref, new = ref.detach().double(), new.detach().double().reshape(ref.shape)
    both_nan = torch.isnan(ref) & torch.isnan(new)
    diff = (ref - new).abs().masked_fill(both_nan, 0.0)
    if torch.isnan(diff).any():
        return math.inf
    return float(diff.max()) if diff.numel() else 0.0


def compare(ref_out: Any, new_out: Any) -> dict:
    """max abs error, KL divergence (softmax over the last axis) and cosine over all float leaves."""
    ref_leaves = pytree.tree_leaves(ref_out)
    new_leaves = pytree.tree_leaves(new_out)
    if len(ref_leaves) != len(new_leaves):
        raise AssertionError(f"output structure changed: {len(ref_leaves)} leaves vs {len(new_leaves)}")
    err, kl, cos = 0.0, 0.0, 1.0
    tol_ok = True
    worst_tol = 0.0
    for r, n in zip(ref_leaves, new_leaves):
        if not isinstance(r, torch.Tensor):
            continue
        if not r.is_floating_point():
            e = 0.0 if torch.equal(r, n) else math.inf
        else:
            e = max_abs_error(r, n)
            rr, nn_ = r.detach().double(), n.detach().double()
            if rr.dim() >= 1 and rr.shape[-1] > 1 and torch.isfinite(rr).all() and torch.isfinite(nn_).all():
                p = torch.log_softmax(rr, -1)
                q = torch.log_softmax(nn_, -1)
                kl = max(kl, float((p.exp() * (p - q)).sum(-1).mean()))
            if rr.numel():
                c = torch.nn.functional.cosine_similarity(rr.flatten(), nn_.flatten(), dim=0)
                cos = min(cos, float(c))
        t = tolerance(r.dtype, float(r.detach().abs().max()) if r.numel() and r.is_floating_point() else 1.0)
        worst_tol = max(worst_tol, t)
        tol_ok &= e <= t
        err = max(err, e)
    return {"max_abs_error": err, "kl_divergence": kl, "cosine_similarity": cos, "tolerance": worst_tol, "passed": tol_ok}


def run(ep: ExportedProgram, args: tuple, kwargs: dict):
    with torch.no_grad():
        return ep.module()(*args, **kwargs)


class _Recorder(fx.Interpreter):
    def __init__(self, gm, names: set[str]):
        super().__init__(gm)
        self.names = names
        self.values: dict[str, torch.Tensor] = {}

    def run_node(self, n):
        out = super().run_node(n)
        if n.name in self.names:
            self.values[n.name] = out
        return out


def node_values(ep: ExportedProgram, args: tuple, kwargs: dict, names: Iterable[str]) -> dict[str, torch.Tensor]:
    """Values of the named nodes of ``ep``'s graph when run on (args, kwargs)."""
    flat = ep._graph_module_flat_inputs(args, kwargs)
    rec = _Recorder(ep.graph_module, set(names))
    with torch.no_grad():
        rec.run(*flat)
    return rec.values
