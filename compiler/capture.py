"""Capture a model with torch.export at ATen level."""

from __future__ import annotations

import inspect
import re
from typing import Any, Optional

import torch
from torch.export import Dim, ExportedProgram

from compiler.errors import CaptureError


def hf_defaults(model: torch.nn.Module, kwargs: dict) -> dict:
    """Hugging Face models capture only without a KV cache (DynamicCache is not a pytree)."""
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return kwargs
    if "use_cache" in params and "use_cache" not in kwargs:
        kwargs = {**kwargs, "use_cache": False}
    return kwargs


def _auto_dynamic(args: tuple, kwargs: dict):
    """Every dim of every tensor input may vary (torch decides which really do)."""

    def spec(x):
        if isinstance(x, torch.Tensor):
            return {i: Dim.AUTO for i in range(x.dim())}
        return None

    return tuple(spec(a) for a in args), {k: spec(v) for k, v in kwargs.items()}


def _one_line(e: BaseException, model: torch.nn.Module) -> str:
    text = str(e).strip()
    first = next((ln.strip() for ln in text.splitlines() if ln.strip()), type(e).__name__)
    where = re.findall(r'File "([^"]+)", line (\d+), in (\w+)', text)
    loc = f" (at {where[-1][0].rsplit('/', 1)[-1]}:{where[-1][1]} in {where[-1][2]})" if where else ""
    first = first if len(first) <= 240 else first[:237] + "..."
    return f"torch.export could not capture {type(model).__name__}{loc}: {type(e).__name__}: {first}"


def capture(
    model: torch.nn.Module,
    example_inputs: tuple = (),
    dynamic_shapes: Any = None,
    example_kwargs: Optional[dict] = None,
    strict: bool = False,
) -> ExportedProgram:
    """``torch.export`` the model in eval mode. ``dynamic_shapes`` is torch's spec, or "auto"."""
    if isinstance(model, ExportedProgram):
        return model
    if not isinstance(model, torch.nn.Module):
        raise CaptureError(f"expected a torch.nn.Module or ExportedProgram, got {type(model).__name__}")
    if not isinstance(example_inputs, tuple):
        example_inputs = (example_inputs,)
    given = dict(example_kwargs or {})
    kwargs = hf_defaults(model, given)
    if dynamic_shapes == "auto":
        dynamic_shapes = _auto_dynamic(example_inputs, kwargs)
    elif isinstance(dynamic_shapes, dict):
        # The keyword arguments we added (use_cache) are static.
        dynamic_shapes = {**dynamic_shapes, **{k: None for k in kwargs if k not in given and k not in dynamic_shapes}}
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            return torch.export.export(model, example_inputs, kwargs, dynamic_shapes=dynamic_shapes, strict=strict)
    except CaptureError:
        raise
    except Exception as e:
        raise CaptureError(_one_line(e, model)) from None
    finally:
        model.train(was_training)
