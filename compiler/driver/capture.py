"""Capture a model with torch.export at ATen level."""

from __future__ import annotations

import inspect
import re
from typing import Any, Optional

import torch
from torch.export import Dim, ExportedProgram
from torch.export.dynamic_shapes import _combine_args
from torch.utils import _pytree as pytree

from compiler.ir.errors import CaptureError
from compiler.ir.graph import finite_bound  # noqa: F401  (re-exported: example_inputs reads it here)


def hf_defaults(model: torch.nn.Module, kwargs: dict) -> dict:
    """Hugging Face models capture only without a KV cache (DynamicCache is not a pytree)."""
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return kwargs
    if "use_cache" in params and "use_cache" not in kwargs:
        kwargs = {**kwargs, "use_cache": False}
    return kwargs


def _argument_names(model: torch.nn.Module, args: tuple, kwargs: dict) -> Optional[list]:
    """The names torch.export gives the inputs (signature order), or None if they cannot be bound."""
    try:
        return list(_combine_args(model, args, kwargs))
    except (TypeError, ValueError):
        return None


def _auto_dynamic(model: torch.nn.Module, args: tuple, kwargs: dict):
    """Every dim of every tensor input may vary (torch decides which really do), keyed by argument name."""

    def spec(x):
        return {i: Dim.AUTO for i in range(x.dim())} if isinstance(x, torch.Tensor) else None

    combined = _combine_args(model, args, kwargs)
    return {k: pytree.tree_map(spec, v) for k, v in combined.items()}


def _by_name(model: torch.nn.Module, args: tuple, given: dict, kwargs: dict, dynamic_shapes: Any) -> Any:
    """The user's spec, keyed by argument name, with the keywords we added (``use_cache``) static.

    torch reads a tuple spec as one entry per argument in signature order, so a keyword we add
    behind the user's back would shift it: name the entries first.
    """
    added = [k for k in kwargs if k not in given]
    if isinstance(dynamic_shapes, (tuple, list)):
        names = _argument_names(model, args, given)
        if names is None or len(names) != len(dynamic_shapes) or not added:
            return dynamic_shapes  # torch's own message says what does not fit
        dynamic_shapes = dict(zip(names, dynamic_shapes))
    if isinstance(dynamic_shapes, dict):
        dynamic_shapes = {**dynamic_shapes, **{k: None for k in added if k not in dynamic_shapes}}
    return dynamic_shapes


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
    if isinstance(dynamic_shapes, str) and dynamic_shapes == "auto":
        try:
            dynamic_shapes = _auto_dynamic(model, example_inputs, kwargs)
        except TypeError as e:
            raise CaptureError(f"the example inputs do not fit {type(model).__name__}.forward: {e}") from None
    elif isinstance(dynamic_shapes, str):
        raise CaptureError(f"dynamic_shapes={dynamic_shapes!r}: give \"auto\", a dict by argument name or a tuple "
                           "(torch.export's spec), or None for static shapes")
    else:
        dynamic_shapes = _by_name(model, example_inputs, given, kwargs, dynamic_shapes)
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


def model_class_name(ep: ExportedProgram) -> Optional[str]:
    """The class name of the module ``ep`` was captured from (``BertModel``), from node metadata."""
    for n in ep.graph.nodes:
        for path, kind in (n.meta.get("nn_module_stack") or {}).values():
            if path == "":
                return str(kind).rsplit(".", 1)[-1]
    return None
