"""The contract every pass keeps: what it returns and how it fails.

Modelled on torch.fx's pass infrastructure (``torch.fx.passes.infra.pass_base.PassResult``) and
onnx-ir's pass contracts: a pass takes a program, rewrites it in place (or returns a new one) and
answers with a typed ``PassResult``; the manager (``compiler.driver.pipeline``) times it, checks the
program before and after, and re-raises anything unexpected as a ``PassError`` naming the pass.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, is_dataclass
from typing import Any, Optional

from compiler.ir.errors import first_line


@dataclass
class PassResult:
    """What one pass did.

    ``counts`` are the pass's integer statistics (``removed_nodes``, ``merged_nodes``...);
    ``details`` is a pass-specific dataclass (``None`` when counts say it all). Both land in the
    report's ``PassRecord.details``; ``sites_found``/``sites_rewritten`` in its own fields.
    ``program`` is set when the pass replaced the program instead of rewriting it in place.
    """

    changed: bool
    counts: dict[str, int] = field(default_factory=dict)
    details: Any = None
    sites_found: int = 0
    sites_rewritten: int = 0
    program: Optional[Any] = None  # an ExportedProgram, or an onnx.ModelProto on the ONNX front end

    def record_details(self) -> dict:
        """The JSON-ready ``details`` of the pass's report record: counts, then typed details."""
        extra = asdict(self.details) if is_dataclass(self.details) else dict(self.details or {})
        return {**self.counts, **extra}


def counted(counts: dict[str, int], **kw) -> PassResult:
    """A result whose pass changed the program exactly when one of its counts is non-zero."""
    return PassResult(changed=any(counts.values()), counts=counts, **kw)


class PassError(RuntimeError):
    """A pass failed on a program; ``pass_name`` says which, ``__cause__`` why.

    An internal error, not an ``AttnforgeError``: a user's mistake raised inside a pass (a policy
    naming a head the site lacks) passes through the manager unchanged.
    """

    def __init__(self, pass_name: str, cause: BaseException):
        self.pass_name = pass_name
        self.cause = cause
        first = first_line(cause)
        super().__init__(f"pass {pass_name!r} failed: {type(cause).__name__}: {first}".rstrip(": "))


class PassConditionError(PassError):
    """The program broke a condition every pass must keep (graph lint, output specs in sync)."""

    def __init__(self, pass_name: str, condition: str, cause: BaseException):
        self.condition = condition
        super().__init__(pass_name, cause)
        self.args = (f"after pass {pass_name!r} the program breaks {condition!r}: {cause}",)
