"""A fidelity budget: how far a rewritten model may drift from the original.

``Fidelity(max_abs_error=..., max_kl=..., min_cosine=...)``; unset bounds are not checked.
Measured on the model's float outputs, all leaves together (``compiler.driver.verify.compare``):
max abs error, KL divergence of the softmax over the last axis, cosine similarity of the
flattened outputs.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Optional

from compiler.ir.errors import PolicyError


@dataclass(frozen=True)
class Fidelity:
    max_abs_error: Optional[float] = None
    max_kl: Optional[float] = None
    min_cosine: Optional[float] = None

    def __post_init__(self):
        if self.max_abs_error is None and self.max_kl is None and self.min_cosine is None:
            raise PolicyError("a fidelity budget needs at least one of max_abs_error, max_kl, min_cosine")
        for name in ("max_abs_error", "max_kl"):
            x = getattr(self, name)
            if x is not None and not x >= 0:
                raise PolicyError(f"budget {name}={x}: must be >= 0")
        if self.min_cosine is not None and not -1.0 <= self.min_cosine <= 1.0:
            raise PolicyError(f"budget min_cosine={self.min_cosine}: must be in [-1, 1]")

    def holds(self, measured: dict) -> bool:
        """``measured`` as returned by ``verify.compare``."""
        if self.max_abs_error is not None and not measured["max_abs_error"] <= self.max_abs_error:
            return False
        if self.max_kl is not None and not measured["kl_divergence"] <= self.max_kl:
            return False
        if self.min_cosine is not None and not measured["cosine_similarity"] >= self.min_cosine:
            return False
        return True

    def tightened(self, share: float) -> "Fidelity":
        """The budget with only ``share`` of each allowance, a margin for unseen inputs."""
        return Fidelity(
            None if self.max_abs_error is None else self.max_abs_error * share,
            None if self.max_kl is None else self.max_kl * share,
            None if self.min_cosine is None else 1.0 - (1.0 - self.min_cosine) * share,
        )

    def to_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v is not None}

    def __str__(self) -> str:
        return ", ".join(f"{k}={v:g}" for k, v in self.to_dict().items())
