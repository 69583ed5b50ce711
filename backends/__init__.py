"""Lowering backends. ``load(name, ep, options)`` returns a callable running an ExportedProgram
by its execution plan (``backends.planner``); the plan is the callable's ``plan`` attribute."""

from __future__ import annotations

from compiler.errors import BackendError

AVAILABLE = ("torch", "onnxruntime", "triton")


def check(name: str) -> None:
    """Raise the one-line reason ``name`` cannot run here (unknown, or needs what is missing)."""
    if name not in AVAILABLE:
        raise BackendError(f"unknown backend {name!r}; valid backends: {', '.join(AVAILABLE)}")
    if name == "triton":
        from backends.triton_backend import unavailable_reason

        reason = unavailable_reason()
        if reason:
            raise BackendError(reason)


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
    if name == "triton":
        from backends.triton_backend import load as load_triton

        return load_triton(ep, options, plan)
    check(name)
