"""The ``onnxruntime`` backend: the rewritten program exported to ONNX, run by an InferenceSession.

Torch tensors go in and come out with the program's output structure. Contiguous CPU inputs
are bound to the session in place (IO binding), so ORT reads the caller's memory and the
outputs are handed back through DLPack without a copy.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path
from typing import Optional

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch.export import ExportedProgram
from torch.export.graph_signature import InputKind, OutputKind, TensorArgument
from torch.utils import _pytree as pytree

from backends.onnx_export import OnnxExport, export_onnx, save_onnx
from backends.protocol import LoweringSummary
from compiler.ir.errors import BackendError, InputError, first_line
from compiler.ir.plan import Plan

_LEVELS = {
    "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}


@dataclass(frozen=True)
class OrtOptions:
    """How the session runs; ``compile(..., backend_options={...})`` takes these keys."""

    providers: tuple = ("CPUExecutionProvider",)
    intra_op_num_threads: int = 0  # 0: ORT's default (one per physical core)
    inter_op_num_threads: int = 0
    graph_optimization_level: str = "all"
    optimized_model_path: Optional[str] = None  # where ORT writes the model it optimized
    io_binding: bool = True
    fused_lowering: Optional[str] = None  # force "attention", "gqa" or "mha" where a site allows it
    # ORT keeps freed memory in its arena and preallocates by its own plan; off, every tensor is
    # its own allocation, freed after last use (what the plan predicts and what memory tests measure).
    enable_cpu_mem_arena: bool = True
    # None: on, unless a site is lowered ``chunked``. ORT's memory pattern lays the first run's
    # tensors out in one block for the next runs; the blocks' many sizes defeat it (four causal
    # sites at 32k: second call 62 s after 32 s, 7.7 GiB; without it 24-26 s, 4.2 GiB).
    enable_mem_pattern: Optional[bool] = None

    @classmethod
    def from_dict(cls, options: Optional[dict]) -> "OrtOptions":
        options = dict(options or {})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise BackendError(f"unknown onnxruntime option(s) {', '.join(unknown)}; valid: {', '.join(sorted(known))}")
        if "providers" in options:
            p = options["providers"]
            options["providers"] = (p,) if isinstance(p, str) else tuple(p)
            missing = [x for x in options["providers"] if x not in ort.get_available_providers()]
            if missing:
                raise BackendError(f"execution provider(s) {', '.join(missing)} not available here; available: "
                                   f"{', '.join(ort.get_available_providers())}")
        level = options.get("graph_optimization_level", "all")
        if level not in _LEVELS:
            raise BackendError(f"graph_optimization_level {level!r} is not one of {', '.join(_LEVELS)}")
        return cls(**options)

    def session_options(self, chunked: bool = False) -> ort.SessionOptions:
        """``chunked``: the model has a site lowered in query blocks (see ``enable_mem_pattern``)."""
        so = ort.SessionOptions()
        so.intra_op_num_threads = self.intra_op_num_threads
        so.inter_op_num_threads = self.inter_op_num_threads
        so.graph_optimization_level = _LEVELS[self.graph_optimization_level]
        if self.optimized_model_path:
            so.optimized_model_filepath = str(self.optimized_model_path)
        so.enable_cpu_mem_arena = self.enable_cpu_mem_arena
        so.enable_mem_pattern = not chunked if self.enable_mem_pattern is None else self.enable_mem_pattern
        so.log_severity_level = 3  # errors only: ORT's warnings are about its own fusions
        return so


def make_session(model: onnx.ModelProto, options: OrtOptions, chunked: bool = False) -> ort.InferenceSession:
    try:
        return ort.InferenceSession(model.SerializeToString(), options.session_options(chunked),
                                    providers=list(options.providers))
    except Exception as e:
        first = first_line(e, 300, "?")
        raise BackendError(f"onnxruntime cannot load the exported model ({first})") from None


def _numpy_dtype(t: torch.Tensor):
    try:
        return torch.empty((), dtype=t.dtype).numpy().dtype
    except TypeError:  # bfloat16 has no numpy type
        return None


class OrtProgram:
    """Calls an ExportedProgram's ONNX export the way ``ep.module()`` is called."""

    def __init__(self, ep: ExportedProgram, options: OrtOptions, exported: Optional[OnnxExport] = None,
                 plan: Optional[Plan] = None):
        self.options = options
        self.plan = plan  # the whole program on onnxruntime; None for a segment of a planned program
        self.exported = exported or export_onnx(ep, options.providers[0], options.fused_lowering)
        self.session = make_session(self.exported.model, options, "chunked" in self.exported.lowerings.values())
        self.in_spec, self.out_spec = ep.call_spec.in_spec, ep.call_spec.out_spec
        user_in = [s for s in ep.graph_signature.input_specs if s.kind == InputKind.USER_INPUT]
        self.input_specs = user_in
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_specs = [s for s in ep.graph_signature.output_specs if s.kind == OutputKind.USER_OUTPUT]
        self.output_names = [o.name for o in self.session.get_outputs()]
        # DLPack has no bool: ORT hands bool outputs over as uint8, viewed back without a copy.
        self._bool_outputs = [o.type == "tensor(bool)" for o in self.session.get_outputs()]
        tensor_inputs = [s for s in user_in if isinstance(s.arg, TensorArgument)]
        if len(tensor_inputs) != len(self.input_names):
            raise BackendError(f"the ONNX model has {len(self.input_names)} inputs but the program takes "
                               f"{len(tensor_inputs)} tensors")

    def _flat_inputs(self, args, kwargs) -> list:
        kw_spec = self.in_spec.child(1)
        keys = list(kw_spec.context) if kw_spec.context else []
        extra = sorted(set(kwargs) - set(keys))
        missing = [k for k in keys if k not in kwargs]
        if extra or missing:
            raise InputError(f"the compiled model takes keyword arguments {keys}; got unexpected {extra} and "
                             f"missing {missing}")
        flat, spec = pytree.tree_flatten((tuple(args), {k: kwargs[k] for k in keys}))
        if spec != self.in_spec:
            raise InputError("the inputs are not structured like the example inputs the model was compiled with "
                             f"(expected {self.in_spec}, got {spec})")
        tensors = []
        for value, s in zip(flat, self.input_specs):
            if isinstance(s.arg, TensorArgument):
                if not isinstance(value, torch.Tensor):
                    raise InputError(f"input {s.arg.name} must be a tensor, not {type(value).__name__}")
                tensors.append(value)
            elif value != s.arg.value:
                raise InputError(f"input {s.arg.name} was fixed to {s.arg.value!r} when the model was compiled; "
                                 f"got {value!r}")
        return tensors

    def run_ort(self, tensors: list) -> list:
        feeds = [t.detach() for t in tensors]
        if self.options.io_binding and all(t.device.type == "cpu" and _numpy_dtype(t) is not None for t in feeds):
            binding = self.session.io_binding()
            feeds = [t.contiguous() for t in feeds]  # bound by pointer: keep these alive until run returns
            for name, t in zip(self.input_names, feeds):
                binding.bind_input(name, "cpu", 0, _numpy_dtype(t), list(t.shape), t.data_ptr())
            for name in self.output_names:
                binding.bind_output(name, "cpu")
            self.session.run_with_iobinding(binding)
            outs = [torch.from_dlpack(v._ortvalue) if v.has_value() else None for v in binding.get_outputs()]
            return [o.view(torch.bool) if o is not None and is_bool and o.dtype == torch.uint8 else o
                    for o, is_bool in zip(outs, self._bool_outputs)]
        arrays = {n: t.cpu().numpy() if _numpy_dtype(t) is not None else t.float().cpu().numpy()
                  for n, t in zip(self.input_names, feeds)}
        return [torch.from_numpy(np.asarray(o)) for o in self.session.run(None, arrays)]

    def __call__(self, *args, **kwargs):
        tensors = self._flat_inputs(args, kwargs)
        try:
            outs = iter(self.run_ort(tensors))
        except (InputError, BackendError):
            raise
        except Exception as e:
            first = first_line(e, 300, "?")
            raise InputError(f"onnxruntime could not run these inputs ({first}); check their shapes and dtypes "
                             "against the example inputs") from None
        values = [next(outs) if isinstance(s.arg, TensorArgument) else s.arg.value for s in self.output_specs]
        return pytree.tree_unflatten(values, self.out_spec)

    def save(self, path) -> Path:
        return save_onnx(self.exported.model, path)

    def lowering_summary(self) -> LoweringSummary:
        return onnx_summary([self.exported], self.options)


def onnx_summary(exports: list[OnnxExport], options: OrtOptions) -> LoweringSummary:
    """What the ONNX exports of one program (whole, or its planned segments) lowered each site to."""
    return LoweringSummary("onnx", {k: v for e in exports for k, v in e.lowerings.items()},
                           {"opset": exports[0].opset, "providers": list(options.providers),
                            "export_seconds": round(sum(e.seconds for e in exports), 4),
                            "onnx_segments": len(exports)})
