"""One site's report record, for both front ends: the PyTorch path (``compiler.api``) and the ONNX
path (``compiler.driver.onnx_program``) describe a site by the same ``AttentionSite`` and measure a
variant by the same ``SiteEffect``, so its record (costs, fidelity, notes) is written here once.
"""

from __future__ import annotations

from typing import Optional

from compiler.driver.measure import SiteEffect
from compiler.ir.ops import attention_flops, causal_pairs
from compiler.report.data import SiteRecord
from compiler.ir.site import AttentionSite


def site_record(s: AttentionSite, variant_text: str, status: str, *, intermediate_bytes: int,
                exact_after: bool, reason: str = "", max_abs_error: Optional[float] = None,
                effect: Optional[SiteEffect] = None, lowering: Optional[str] = None) -> SiteRecord:
    """``exact_after``: the site computes exact attention afterwards (fused, or normalized to one
    attention op), so it costs the exact flops; otherwise it still computes the dense square."""
    before = attention_flops(s.batch, s.num_heads, s.seq_q, s.seq_k, s.head_dim, s.value_dim)
    kept = causal_pairs(s.seq_q, s.seq_k) if s.causal else None
    exact = attention_flops(s.batch, s.num_heads, s.seq_q, s.seq_k, s.head_dim, s.value_dim, kept)
    rec = SiteRecord(
        id=s.id, module=s.module, module_type=s.module_type, form=s.form, variant=variant_text, status=status,
        causal=s.causal, mask_kind=s.mask_kind, batch=s.batch, num_heads=s.num_heads,
        num_kv_heads=s.num_kv_heads, head_dim=s.head_dim, value_dim=s.value_dim,
        seq_q=s.seq_q, seq_k=s.seq_k, scale=s.scale, flops_before=before,
        flops_after=exact if exact_after else before,
        intermediate_bytes=intermediate_bytes, reason=reason, max_abs_error=max_abs_error,
        layer=s.layer, notes=list(s.notes), flops_exact=exact, lowering=lowering,
    )
    if effect is not None:
        rec.flops_after = effect.flops
        rec.density = effect.density
        rec.max_abs_error = effect.max_abs_error
        rec.cosine_similarity = effect.cosine_similarity
        rec.kept_mass = effect.kept_mass
        rec.measured_rows = effect.measured_rows
        if effect.flops >= effect.dense_flops:
            rec.over_exact = True
            rec.notes.append(f"{rec.variant} computes {effect.density:.2f}x what exact attention needs here; "
                             "it saves nothing over fused")
        if effect.measured_rows is not None:
            rec.notes.append(f"site error, cosine and kept mass measured on {effect.measured_rows} of "
                             f"{s.seq_q} query rows")
    return rec
