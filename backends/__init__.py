"""Lowering backends, each a ``backends.protocol.Backend``: ``load(name, ep, options)`` returns a
``Runner`` that runs an ExportedProgram by its execution plan (``backends.planner``, the runner's
``plan``) and reports what it lowered each site to (``lowering_summary()``)."""

from __future__ import annotations

from importlib import import_module

from compiler.ir.errors import BackendError

# Each module holds its backend as ``BACKEND``; imported on first use, so naming one costs nothing.
_MODULES = {"torch": "backends.torch_backend", "onnxruntime": "backends.plan_executor",
            "triton": "backends.triton_backend"}
AVAILABLE = tuple(_MODULES)


def get(name: str):
    """The ``Backend`` called ``name``."""
    if name not in _MODULES:
        raise BackendError(f"unknown backend {name!r}; valid backends: {', '.join(AVAILABLE)}")
    return import_module(_MODULES[name]).BACKEND


def check(name: str) -> None:
    """Raise the one-line reason ``name`` cannot run here (unknown, or needs what is missing)."""
    reason = get(name).unavailable_reason()
    if reason:
        raise BackendError(reason)


def load(name: str, ep, options=None, plan=None):
    """``plan``: a saved plan to run instead of planning again (it must fit the program)."""
    backend = get(name)
    reason = backend.unavailable_reason()
    if reason:
        raise BackendError(reason)
    return backend.load(ep, backend.parse_options(options), plan)
