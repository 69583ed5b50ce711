"""The ``triton`` backend: every attention site runs in attnforge's Triton kernels, the rest of
the program in PyTorch, or through ``torch.compile`` with ``compile_rest`` (our kernels stay
opaque ops inside the compiled graph).

It needs a CUDA GPU. With ``TRITON_INTERPRET=1`` set before anything imports Triton, the same
kernels run on CPU tensors in Triton's interpreter: that is how the tests check them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

import torch
from torch.export import ExportedProgram
from torch.fx import GraphModule

from backends.capabilities import interpreting
from backends.planner import fitting_plan
from backends.protocol import LoweringSummary
from backends.torch_backend import TorchProgram
from compiler.ir.errors import BackendError
from compiler.ir.plan import Plan
from compiler.ir.site import SITE_META

OPTIONS = ("compile_rest",)


def unavailable_reason() -> Optional[str]:
    """Why the backend cannot run here, in one line, or None."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return "backend 'triton' needs the triton package: pip install triton"
    if interpreting():
        return None
    if not torch.cuda.is_available():
        return ("backend 'triton' needs a CUDA GPU and none is visible; use backend='torch' or "
                "backend='onnxruntime' (TRITON_INTERPRET=1 runs the kernels in Triton's CPU interpreter, "
                "for testing)")
    return None


def swap_ops(gm: GraphModule, records) -> dict:
    """Point our reference ops at their Triton versions, each told where to record what it ran
    as (``records``, a ``KernelRecords``); site -> node name."""
    from backends.triton_ops import SWAP

    sites = {}
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target in SWAP:
            site = node.meta.get(SITE_META, node.name)
            node.target = SWAP[node.target]
            node.kwargs = {**node.kwargs, "site": records.site_arg(site)}
            sites[site] = node.name
    gm.recompile()
    return sites


class TritonProgram(TorchProgram):
    def __init__(self, gm: GraphModule, plan: Plan, compile_rest=False):
        from backends.triton_ops import KernelRecords

        super().__init__(gm, plan)
        self.records = KernelRecords()  # this program's own: filled by its kernels as they run
        self.sites = swap_ops(self.module, self.records)
        self.compile_rest = compile_rest
        if compile_rest:
            backend = compile_rest if isinstance(compile_rest, str) else "inductor"
            self.module = torch.compile(self.module, backend=backend, dynamic=None)

    @property
    def lowerings(self) -> dict:
        """Site id -> what its last call ran as (kernel, configuration, split count)."""
        out = {}
        for site in self.sites:
            rec = self.records.entries.get(site)
            if rec is not None:
                out[site] = " ".join(f"{k}={v}" if k != "kernel" else str(v) for k, v in rec.items())
        return out

    def lowering_summary(self) -> LoweringSummary:
        """What each site's last call ran as: call the program first (kernels record their choices as they run)."""
        from backends.triton_schedule import SCHEDULER

        dev = "interpreter (CPU)" if interpreting() else torch.cuda.get_device_name()
        return LoweringSummary("triton", self.lowerings, {"device": dev, "compile_rest": self.compile_rest or False,
                                                          "config_cache": str(SCHEDULER.cache.path)})


@dataclass(frozen=True)
class TritonOptions:
    compile_rest: Union[bool, str] = False  # torch.compile the rest of the program (True: inductor, or a backend name)

    @classmethod
    def from_dict(cls, options: Optional[dict]) -> "TritonOptions":
        options = dict(options or {})
        unknown = sorted(set(options) - set(OPTIONS))
        if unknown:
            raise BackendError(f"backend 'triton' does not take {', '.join(unknown)}; options: {', '.join(OPTIONS)}")
        compile_rest = options.get("compile_rest", False)
        if not isinstance(compile_rest, (bool, str)):
            raise BackendError("compile_rest must be True, False or a torch.compile backend name")
        return cls(compile_rest)


def load(ep: ExportedProgram, options: Optional[dict] = None, plan: Optional[Plan] = None) -> TritonProgram:
    reason = unavailable_reason()
    if reason:
        raise BackendError(reason)
    opts = options if isinstance(options, TritonOptions) else TritonOptions.from_dict(options)
    gm = ep.module()
    return TritonProgram(gm, fitting_plan(gm, "triton", plan), opts.compile_rest)


class TritonBackend:
    name = "triton"
    options_type = TritonOptions
    checks_its_program = False  # kernels chosen at the first call, checked against the torch program

    def unavailable_reason(self) -> Optional[str]:
        return unavailable_reason()

    def parse_options(self, options: Optional[dict]) -> TritonOptions:
        return TritonOptions.from_dict(options)

    def load(self, ep: ExportedProgram, options: TritonOptions, plan: Optional[Plan] = None) -> TritonProgram:
        return load(ep, options, plan)


BACKEND = TritonBackend()
