"""Lowering backends. ``load(name, ep, options)`` returns a callable running an ExportedProgram
by its execution plan (``backends.planner``); the plan is the callable's ``plan`` attribute."""

from __future__ import annotations

from compiler.errors import BackendError

AVAILABLE = ("torch", "onnxruntime")
PLANNED = ("triton",)


def load(name: str, ep, options=None, plan=None):
    """``plan``: a saved plan to run instead of planning again (it must fit the program)."""
    if name == "torch":
        from backends.torch_backend import load as load_torch

        if options:
            raise BackendError(f"backend 'torch' takes no options; got {', '.join(sorted(options))}")
        return load_torch(ep, plan)
    if name == "onnxruntime":
        from backends.plan_executor import load_onnxruntime

        return load_onnxruntime(ep, options, plan)
    if name in PLANNED:
        raise BackendError(f"backend {name!r} is not available in this version; use backend='torch' or "
                           "backend='onnxruntime'")
    raise BackendError(f"unknown backend {name!r}; valid backends: {', '.join(AVAILABLE)}")
