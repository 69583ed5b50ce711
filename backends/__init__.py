"""Lowering backends. Each exposes ``load(ep) -> callable`` running an ExportedProgram."""

from __future__ import annotations

from compiler.errors import BackendError

AVAILABLE = ("torch",)
PLANNED = ("triton", "onnxruntime")


def load(name: str, ep):
    if name == "torch":
        from backends.torch_backend import load as load_torch

        return load_torch(ep)
    if name in PLANNED:
        raise BackendError(f"backend {name!r} is not available in this version; use backend='torch'")
    raise BackendError(f"unknown backend {name!r}; valid backends: {', '.join(AVAILABLE)}")
