"""Inserting nodes into an exported graph with the metadata later passes rely on."""

from __future__ import annotations

import contextlib

import torch
from torch import fx
from torch._guards import detect_fake_mode

_META_KEYS = ("nn_module_stack", "stack_trace", "source_fn_stack", "from_node")


class Builder:
    """Creates ``call_function`` nodes before ``at``, computing each node's fake value."""

    def __init__(self, graph: fx.Graph, at: fx.Node, meta_from: fx.Node | None = None):
        self.graph = graph
        self.at = at
        self.meta_from = meta_from or at
        vals = [n.meta.get("val") for n in graph.nodes if isinstance(n.meta.get("val"), torch.Tensor)]
        self.fake_mode = detect_fake_mode(vals)

    def __call__(self, target, *args, **kwargs) -> fx.Node:
        with self.graph.inserting_before(self.at):
            node = self.graph.call_function(target, tuple(args), kwargs)
        fargs = fx.node.map_arg(args, lambda n: n.meta["val"])
        fkwargs = fx.node.map_arg(kwargs, lambda n: n.meta["val"])
        ctx = self.fake_mode if self.fake_mode is not None else contextlib.nullcontext()
        with ctx:
            node.meta["val"] = target(*fargs, **fkwargs)
        for k in _META_KEYS:
            if k in self.meta_from.meta:
                node.meta[k] = self.meta_from.meta[k]
        return node

    def size(self, x: fx.Node, dim: int):
        """``x.shape[dim]`` as a node argument: an int when static, else a ``sym_size`` node (a
        SymInt written into an argument would be frozen at its example value)."""
        d = x.meta["val"].shape[dim]
        return d if isinstance(d, int) else self(torch.ops.aten.sym_size.int, x, dim % x.meta["val"].dim())

    def sizes(self, x: fx.Node) -> list:
        return [self.size(x, i) for i in range(x.meta["val"].dim())]
