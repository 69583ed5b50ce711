"""The ``torch`` backend: eager PyTorch, attnforge ops running their reference implementation,
in the plan's memory-aware order."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from torch.export import ExportedProgram

from backends.plan_executor import PlannedProgram
from backends.planner import fitting_plan
from backends.protocol import LoweringSummary
from backends.torch_flex import FLEX_MIN_PAIRS, FLEX_SPARSE
from compiler.ir.site import SITE_META
from compiler.ir.errors import BackendError, InputError
from compiler.ir.plan import Plan


class TorchProgram(PlannedProgram):
    """The program with its sparse sites on FlexAttention (``lower_sparse``): the one thing this
    backend runs differently from the exported program's reference ops."""

    def __init__(self, gm, plan: Plan, flex_sites: Optional[dict[str, str]] = None):
        super().__init__(gm, plan)
        self.flex_sites = flex_sites or {}  # site id -> "flex"

    def lowering_summary(self) -> Optional[LoweringSummary]:
        if not self.flex_sites:
            return None
        return LoweringSummary("torch", dict(self.flex_sites),
                               {"sparse": "FlexAttention compiled by Inductor, the reference below "
                                          f"{FLEX_MIN_PAIRS} query-key pairs per head"})

    def __call__(self, *args, **kwargs):
        try:
            return super().__call__(*args, **kwargs)
        except AssertionError as e:
            if "Guard failed" not in str(e):
                raise
            # The program was captured for other shapes; say which, not where in the guards.
            raise InputError(f"the inputs do not fit the captured program ({str(e).strip()}); "
                             "call it with the shapes it was compiled for, or compile with "
                             "dynamic_shapes") from None


def load(ep: ExportedProgram, plan=None) -> TorchProgram:
    gm = ep.module()
    sites = lower_sparse(gm)
    return TorchProgram(gm, fitting_plan(gm, "torch", plan), sites)


@dataclass(frozen=True)
class TorchOptions:
    """The torch backend takes no options."""


class TorchBackend:
    name = "torch"
    options_type = TorchOptions
    checks_its_program = False  # its program is the verified one, sparse sites aside

    def unavailable_reason(self) -> Optional[str]:
        return None

    def parse_options(self, options: Optional[dict]) -> TorchOptions:
        if options:
            raise BackendError(f"backend 'torch' takes no options; got {', '.join(sorted(options))}")
        return TorchOptions()

    def load(self, ep: ExportedProgram, options: TorchOptions, plan: Optional[Plan] = None) -> TorchProgram:
        return load(ep, plan)


BACKEND = TorchBackend()


def lower_sparse(gm) -> dict[str, str]:
    """Sparse sites run ``attnforge_flex::sparse_attention`` (FlexAttention compiled by Inductor
    for large sites, the reference otherwise); the exported program keeps the reference op.
    Returns site id -> "flex" for each site lowered."""
    from compiler.reference.sparse_ops import SPARSE_ATTENTION

    sites = {}
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target is SPARSE_ATTENTION:
            node.target = FLEX_SPARSE
            sites[node.meta.get(SITE_META, node.name)] = "flex"
    if sites:
        gm.recompile()
    return sites
