"""``torch.compile(model, backend="attnforge", options={...})``.

Dynamo hands each captured graph (torch-level ops, real example inputs) to ``attnforge_backend``.
We export it to ATen with ``torch.export``, run the same passes as ``compiler.compile`` (discover,
fuse, apply the policy, verify on the example inputs) and return the rewritten program; with
``compile_rest=True`` Inductor compiles it, our attention ops staying opaque calls. Graph breaks
behave as with any backend: each piece arrives here on its own.

Options: ``policy`` (default ``"fused"``), ``backend`` (``"torch"``), ``compile_rest`` (False),
``budget`` (a ``compiler.Fidelity``), ``verify`` (True). ``reports`` keeps one report per
compiled graph, so callers can see what was rewritten.
"""

from __future__ import annotations

import logging
from typing import Optional

import torch
from torch import fx

from compiler.ir.errors import PolicyError

log = logging.getLogger(__name__)

reports: list = []  # compiler.report.data.Report of every graph compiled, in order
_OPTIONS = ("policy", "backend", "compile_rest", "budget", "verify")


def _passthrough(gm: fx.GraphModule, reason: str):
    log.info("attnforge: graph left as captured (%s)", reason)
    return gm.forward


def attnforge_backend(gm: fx.GraphModule, example_inputs: list, options: Optional[dict] = None):
    from compiler.api import compile_program

    opts = dict(options or {})
    unknown = set(opts) - set(_OPTIONS)
    if unknown:
        raise PolicyError(f"unknown attnforge option(s) {sorted(unknown)}; valid options: {', '.join(_OPTIONS)}")
    if not all(isinstance(x, torch.Tensor) for x in example_inputs):
        # Symbolic sizes arrive as ints after a dynamic recompile; we capture static shapes only.
        return _passthrough(gm, "symbolic sizes among the inputs")
    try:
        ep = torch.export.export(gm, tuple(example_inputs), strict=False)
    except Exception as e:  # an unexportable piece still runs, as captured
        return _passthrough(gm, f"torch.export failed: {type(e).__name__}")
    cm = compile_program(ep, tuple(example_inputs), {}, policy=opts.get("policy", "fused"),
                         backend=opts.get("backend", "torch"), verify_outputs=opts.get("verify", True),
                         model_name=f"dynamo graph {len(reports)}", budget=opts.get("budget"), show_progress=False)
    reports.append(cm.report)
    if cm.report.totals["sites_rewritten"] == 0:
        return _passthrough(gm, "no attention rewritten")
    if opts.get("compile_rest"):
        # Inductor compiles everything around our ops, which stay opaque calls. The lifted
        # graph takes parameters and constants as inputs, so Inductor sees no real tensors
        # inside it.
        from torch._inductor.compile_fx import compile_fx

        ep = cm.exported_program
        compiled = compile_fx(ep.graph_module, list(ep._graph_module_flat_inputs(tuple(example_inputs), {})))

        def run(*args):
            with torch.no_grad():
                return compiled(*ep._graph_module_flat_inputs(args, {}))

        return run
    return cm._run
