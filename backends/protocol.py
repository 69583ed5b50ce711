"""One contract for every backend, so the driver never probes a backend object for what it has.

A ``Backend`` names itself, parses its options into a dataclass (a bad key is one line that
lists the valid ones), says in one line why it cannot run here, and loads a rewritten program
into a ``Runner``: a callable that holds the plan it runs and reports what it made of each site
as a ``LoweringSummary``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional, Protocol, runtime_checkable

from torch.export import ExportedProgram

from compiler.ir.plan import Plan


@dataclass(frozen=True)
class LoweringSummary:
    """What a backend lowered the program to: the report's ``lowering`` section and each site's lowering."""

    format: str  # "onnx", "triton"
    lowerings: dict[str, str] = field(default_factory=dict)  # site id -> what it runs as
    facts: dict[str, Any] = field(default_factory=dict)  # format-specific (opset, providers, device...)

    def report(self) -> dict:
        """The report's ``lowering`` section before the driver checks the program: against the
        original end to end, or against the rewritten torch program (``checked_against``; only
        then are the ``*_vs_torch`` numbers measured); ``rounding_of_original``: the backend's
        own error on the original program, measured only where the exact tolerance was exceeded
        (the tolerance then allows twice it)."""
        return {"format": self.format, **self.facts, "checked_against": None, "max_abs_error_vs_torch": None,
                "tolerance_vs_torch": None, "matches_torch": None, "rounding_of_original": None}


@runtime_checkable
class Runner(Protocol):
    """A loaded program, called like ``ep.module()``."""

    plan: Plan

    def __call__(self, *args, **kwargs): ...

    def lowering_summary(self) -> Optional[LoweringSummary]:
        """None when the program runs as the torch backend's reference (nothing lowered)."""


@runtime_checkable
class Backend(Protocol):
    name: str
    options_type: type
    # compile() checks an exact rewrite end to end as this backend runs it, against the original,
    # instead of running the rewritten torch program first and then comparing the two: one
    # forward pass fewer, and the program checked is the one the user calls.
    checks_its_program: bool

    def unavailable_reason(self) -> Optional[str]:
        """Why the backend cannot run here, in one line, or None."""

    def parse_options(self, options: Optional[dict]) -> Any:
        """``backend_options`` as ``options_type``; an unknown key or bad value is a ``BackendError``."""

    def load(self, ep: ExportedProgram, options: Any, plan: Optional[Plan] = None) -> Runner:
        """``plan``: a saved plan to run instead of planning again (it must fit the program)."""
