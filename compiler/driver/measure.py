"""What an approximate variant costs and how far it moves one site, on real site inputs.

A site's inputs (q, k, v, mask, scale, causal, softcap) are recorded where the rewritten
program computes it; the exact attention on those same inputs is the reference, so each
site's error is its own, not the sum of every site upstream.

Exact attention is computed a block of query rows at a time (``compiler.ir.ops.BLOCK_BYTES``),
never as a dense [Sq, Sk] tensor. A site with more than ``MEASURE_ROWS`` queries is measured
on evenly spread stripes of rows (first and last included) instead of all of them: error,
cosine and kept mass are then estimates over ``measured_rows`` rows, as the report says; the
end-to-end verification still compares every output.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Iterable, Optional

import torch
from torch import fx
from torch.export import ExportedProgram

from compiler.reference.linear_ops import linear_attention_reference, linear_flops
from compiler.ir.ops import (apply_probabilities, attention_flops, attention_probabilities, attention_reference,
                          causal_pairs, mask_rows, query_block)
from compiler.reference.sparse_ops import sparse_attention_reference, sparse_computed_pairs, sparse_keep_rows
from compiler.variants.language import Variant

# Sites with more queries than this are measured on sampled stripes of rows.
MEASURE_ROWS = int(os.environ.get("ATTNFORGE_MEASURE_ROWS", 1024))
_STRIPE = 64  # rows per sampled stripe


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
    measured_rows: Optional[int] = None  # query rows the error, cosine and mass were measured on; None = all

    @property
    def density(self) -> float:
        return self.flops / self.dense_flops if self.dense_flops else 1.0


def inputs_of(args: tuple) -> SiteInputs:
    """The site inputs of any attnforge attention op's evaluated arguments (the linear op has no
    softcap, its seventh argument is the spec)."""
    softcap = args[6] if len(args) > 6 and isinstance(args[6], float) else 0.0
    return SiteInputs(*args[:6], softcap)


class _InputRecorder(fx.Interpreter):
    def __init__(self, gm, names: set[str], keep_outputs: bool = False):
        super().__init__(gm)
        self.names = names
        self.keep_outputs = keep_outputs
        self.inputs: dict[str, SiteInputs] = {}
        self.outputs: dict[str, torch.Tensor] = {}

    def run_node(self, n):
        if n.name in self.names:
            args, _ = self.fetch_args_kwargs_from_env(n)
            self.inputs[n.name] = inputs_of(args)
        out = super().run_node(n)
        if self.keep_outputs and n.name in self.names:
            self.outputs[n.name] = out
        return out


def record_site_inputs(ep: ExportedProgram, args: tuple, kwargs: dict, names: Iterable[str]) -> dict[str, SiteInputs]:
    """Inputs of the named attention nodes of ``ep`` when it runs on (args, kwargs)."""
    return record_site_run(ep, args, kwargs, names, keep_outputs=False)[0]


def record_site_run(ep: ExportedProgram, args: tuple, kwargs: dict, names: Iterable[str], keep_outputs: bool = True):
    """One run of ``ep`` on (args, kwargs): ({node: its SiteInputs}, {node: its output} when
    ``keep_outputs``, the program's outputs as ``ep.module()`` returns them). The site outputs
    are what the program's own op computed, so measurement need not run the variant again."""
    from compiler.driver.verify import program_outputs

    rec = _InputRecorder(ep.graph_module, set(names), keep_outputs)
    with torch.no_grad():
        out = rec.run(*ep._graph_module_flat_inputs(args, kwargs))
    return rec.inputs, rec.outputs, program_outputs(ep, out)


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


def measured_ranges(sq: int) -> list[tuple[int, int]]:
    """The query row ranges a site is measured on: all rows, or evenly spread stripes."""
    if sq <= MEASURE_ROWS:
        return [(0, sq)]
    n = max(2, MEASURE_ROWS // _STRIPE)
    starts = sorted({round(i * (sq - _STRIPE) / (n - 1)) for i in range(n)})
    out = []
    for s0 in starts:  # merge overlaps so no row counts twice
        if out and s0 <= out[-1][1]:
            out[-1] = (out[-1][0], s0 + _STRIPE)
        else:
            out.append((s0, s0 + _STRIPE))
    return out


class ExactRows:
    """Exact attention of one site on demand, a block of query rows at a time: probabilities
    and outputs of rows ``r0:r1`` without the whole [Sq, Sk] square."""

    def __init__(self, x: SiteInputs):
        self.x = x
        b, hq, self.sq, _ = x.q.shape
        self.step = query_block(b, hq, x.k.shape[2])

    def blocks(self, ranges=None):
        """(r0, r1) blocks covering ``ranges`` (default: the measured rows)."""
        for a, z in ranges or measured_ranges(self.sq):
            for r0 in range(a, z, self.step):
                yield r0, min(z, r0 + self.step)

    def probs(self, r0: int, r1: int) -> torch.Tensor:
        """[B, Hq, r1 - r0, Sk] probabilities of rows ``r0:r1``."""
        p, kend = self.causal_probs(r0, r1)
        return p if kend == self.x.k.shape[2] else torch.nn.functional.pad(p, (0, self.x.k.shape[2] - kend))

    def causal_probs(self, r0: int, r1: int) -> tuple[torch.Tensor, int]:
        """(probabilities of rows ``r0:r1`` over keys ``:kend``, kend): a causal site's rows
        attend no key at or past ``r1`` (top-left aligned), so those columns, all zeros, are
        never computed; a row block then costs what the causal triangle holds."""
        x = self.x
        sk = x.k.shape[2]
        kend = min(sk, r1) if x.causal else sk
        k, mask = x.k, mask_rows(x.mask, r0, r1)
        if kend < sk:
            k = k[:, :, :kend]
            if mask is not None and mask.dim() >= 1 and mask.shape[-1] == sk:
                mask = mask[..., :kend]
        with torch.no_grad():
            return attention_probabilities(x.q[:, :, r0:r1], k, mask, x.scale, x.causal, x.softcap, r0), kend

    def output(self, r0: int, r1: int) -> torch.Tensor:
        x = self.x
        if x.mask is None and x.softcap == 0.0:
            # No user mask: PyTorch's fused kernel on the rows, causality as an explicit
            # [n, kend] mask (rows r0.. see keys <= their own index); same math, no [n, Sk] temporaries.
            kend = min(x.k.shape[2], r1) if x.causal else x.k.shape[2]
            keep = torch.ones(r1 - r0, kend, dtype=torch.bool, device=x.q.device).tril(r0) if x.causal else None
            with torch.no_grad():
                return torch.nn.functional.scaled_dot_product_attention(
                    x.q[:, :, r0:r1], x.k[:, :, :kend], x.v[:, :, :kend], attn_mask=keep, scale=x.scale,
                    enable_gqa=x.k.shape[1] != x.q.shape[1])
        p, kend = self.causal_probs(r0, r1)
        return apply_probabilities(p, x.v[:, :, :kend])


def exact_rows_output(x: SiteInputs, ranges) -> torch.Tensor:
    """Exact attention output of the query rows in ``ranges``, concatenated: [B, Hq, rows, Dv]."""
    exact = ExactRows(x)
    with torch.no_grad():
        return torch.cat([exact.output(r0, r1) for r0, r1 in exact.blocks(ranges)], 2)


def exact_probabilities(x: SiteInputs) -> ExactRows:
    """The exact attention of a site, rows on demand (``ExactRows``)."""
    return ExactRows(x)


def _exact_rows(variant: Variant, x: SiteInputs, exact: ExactRows, ranges, want_output: bool):
    """One pass over the measured rows' exact probabilities: their outputs (when wanted) and the
    share of each live row's probability the variant keeps, averaged (sparse variants)."""
    keep_rows = sparse_keep_rows(x.q, x.k, variant.text, x.scale, x.causal) if variant.kind == "sparse" else None
    if keep_rows is None and not want_output:
        return None, None
    outs, total, live = [], 0.0, 0
    for r0, r1 in exact.blocks(ranges):
        p, kend = exact.causal_probs(r0, r1)
        if want_output:
            outs.append(apply_probabilities(p, x.v[:, :, :kend]))
        if keep_rows is not None:
            rows = p.sum(-1)
            kept = (p * keep_rows(r0, r1)[..., :kend]).sum(-1)
            ok = rows > 0
            total += float((kept[ok].double() / rows[ok].double()).sum())
            live += int(ok.sum())
    mass = None if keep_rows is None else (total / live if live else 1.0)
    return (torch.cat(outs, 2) if want_output else None), mass


def site_effect(variant: Variant, x: SiteInputs, exact: Optional[torch.Tensor] = None,
                exact_probs: Optional[ExactRows] = None, output: Optional[torch.Tensor] = None) -> SiteEffect:
    """``exact``: the exact output of the whole site, when the caller has it; otherwise the
    exact rows are computed on the measured rows only. ``output``: the variant's output on
    ``x`` when the program already computed it (else it is run here)."""
    exact_probs = exact_probs or ExactRows(x)
    ranges = measured_ranges(x.q.shape[2])
    out = run_variant(variant, x) if output is None else output
    ref, mass = _exact_rows(variant, x, exact_probs, ranges, want_output=exact is None)
    if exact is not None:
        ref = torch.cat([exact[:, :, a:z] for a, z in ranges], 2)
    new = torch.cat([out[:, :, a:z] for a, z in ranges], 2)
    ref, new = ref.double().flatten(), new.double().flatten()
    cos = float(torch.nn.functional.cosine_similarity(ref, new, dim=0)) if ref.numel() else 1.0
    if ref.abs().max() == 0 and new.abs().max() == 0:
        cos = 1.0
    flops, dense = variant_flops(variant, x)
    measured = sum(z - a for a, z in ranges)
    return SiteEffect(flops, dense, float((ref - new).abs().max()) if ref.numel() else 0.0, cos, mass,
                      None if measured == x.q.shape[2] else measured)
