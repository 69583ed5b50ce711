"""What an approximate variant costs and how far it moves one site, on real site inputs.

A site's inputs (q, k, v, mask, scale, causal, softcap) are recorded where the rewritten
program computes it; the exact attention on those same inputs is the reference, so each
site's error is its own, not the sum of every site upstream.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Optional

import torch
from torch import fx
from torch.export import ExportedProgram

from compiler.linear_ops import linear_attention_reference, linear_flops
from compiler.ops import attention_flops, attention_reference, causal_pairs
from compiler.sparse_ops import sparse_attention_reference, sparse_computed_pairs, sparse_keep_mask
from compiler.variants import Variant

_MASS_LIMIT = 1 << 26  # dense probabilities larger than this are not materialised for kept mass


@dataclass
class SiteInputs:
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    mask: Optional[torch.Tensor]
    scale: float
    causal: bool
    softcap: float


@dataclass
class SiteEffect:
    flops: int  # of the variant on these inputs
    dense_flops: int  # of exact attention (causal-aware)
    max_abs_error: float
    cosine_similarity: float
    kept_mass: Optional[float]

    @property
    def density(self) -> float:
        return self.flops / self.dense_flops if self.dense_flops else 1.0


def inputs_of(args: tuple) -> SiteInputs:
    """The site inputs of any attnforge attention op's evaluated arguments (the linear op has no
    softcap, its seventh argument is the spec)."""
    softcap = args[6] if len(args) > 6 and isinstance(args[6], float) else 0.0
    return SiteInputs(*args[:6], softcap)


class _InputRecorder(fx.Interpreter):
    def __init__(self, gm, names: set[str]):
        super().__init__(gm)
        self.names = names
        self.inputs: dict[str, SiteInputs] = {}

    def run_node(self, n):
        if n.name in self.names:
            args, _ = self.fetch_args_kwargs_from_env(n)
            self.inputs[n.name] = inputs_of(args)
        return super().run_node(n)


def record_site_inputs(ep: ExportedProgram, args: tuple, kwargs: dict, names: Iterable[str]) -> dict[str, SiteInputs]:
    """Inputs of the named attention nodes of ``ep`` when it runs on (args, kwargs)."""
    rec = _InputRecorder(ep.graph_module, set(names))
    with torch.no_grad():
        rec.run(*ep._graph_module_flat_inputs(args, kwargs))
    return rec.inputs


def run_variant(variant: Variant, x: SiteInputs) -> torch.Tensor:
    with torch.no_grad():
        if variant.kind == "sparse":
            return sparse_attention_reference(x.q, x.k, x.v, x.mask, x.scale, x.causal, x.softcap, variant.text)
        if variant.kind == "linear":
            return linear_attention_reference(x.q, x.k, x.v, x.mask, x.scale, x.causal, variant.text)
        return attention_reference(x.q, x.k, x.v, x.mask, x.scale, x.causal, x.softcap)


def variant_flops(variant: Variant, x: SiteInputs) -> tuple[int, int]:
    """(variant FLOPs, exact FLOPs) on these inputs."""
    b, hq, sq, d = x.q.shape
    sk, dv = x.k.shape[2], x.v.shape[-1]
    dense = attention_flops(b, hq, sq, sk, d, dv, causal_pairs(sq, sk) if x.causal else None)
    if variant.kind == "sparse":
        pairs = sparse_computed_pairs(x.q, x.k, variant.text, x.scale, x.causal)
        return attention_flops(b, hq, sq, sk, d, dv, pairs), dense
    if variant.kind == "linear":
        return linear_flops(variant.text, b, hq, sq, sk, d, dv, x.causal), dense
    return dense, dense


def _kept_mass(variant: Variant, x: SiteInputs, exact_probs: Optional[torch.Tensor]) -> Optional[float]:
    if variant.kind != "sparse" or exact_probs is None:
        return None
    keep = sparse_keep_mask(x.q, x.k, variant.text, x.scale, x.causal)
    rows = exact_probs.sum(-1)
    kept = (exact_probs * keep).sum(-1)
    live = rows > 0
    return float((kept[live] / rows[live]).mean()) if live.any() else 1.0


def exact_probabilities(x: SiteInputs) -> Optional[torch.Tensor]:
    b, hq, sq, _ = x.q.shape
    if b * hq * sq * x.k.shape[2] > _MASS_LIMIT:
        return None
    eye = torch.eye(x.k.shape[2], dtype=x.v.dtype, device=x.v.device).expand(b, x.k.shape[1], -1, -1)
    # Attention applied to the identity "values" is the probability matrix itself.
    return attention_reference(x.q, x.k, eye, x.mask, x.scale, x.causal, x.softcap).float()


def site_effect(variant: Variant, x: SiteInputs, exact: Optional[torch.Tensor] = None,
                exact_probs: Optional[torch.Tensor] = None) -> SiteEffect:
    if exact is None:
        exact = run_variant(Variant("fused"), x)
    out = run_variant(variant, x)
    ref, new = exact.double().flatten(), out.double().flatten()
    cos = float(torch.nn.functional.cosine_similarity(ref, new, dim=0)) if ref.numel() else 1.0
    if ref.abs().max() == 0 and new.abs().max() == 0:
        cos = 1.0
    flops, dense = variant_flops(variant, x)
    return SiteEffect(flops, dense, float((ref - new).abs().max()) if ref.numel() else 0.0, cos,
                      _kept_mass(variant, x, exact_probs))
