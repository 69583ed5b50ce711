"""Lowering backends. Each exposes ``load(ep, options) -> callable`` running an ExportedProgram."""

from __future__ import annotations

from compiler.errors import BackendError

AVAILABLE = ("torch", "onnxruntime")
PLANNED = ("triton",)


def load(name: str, ep, options=None):
    if name == "torch":
        from backends.torch_backend import load as load_torch

        if options:
            raise BackendError(f"backend 'torch' takes no options; got {', '.join(sorted(options))}")
        return load_torch(ep)
    if name == "onnxruntime":
        from backends.onnxruntime_backend import load as load_ort

        return load_ort(ep, options)
    if name in PLANNED:
        raise BackendError(f"backend {name!r} is not available in this version; use backend='torch' or "
                           "backend='onnxruntime'")
    raise BackendError(f"unknown backend {name!r}; valid backends: {', '.join(AVAILABLE)}")
