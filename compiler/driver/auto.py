"""``policy="auto"``: choose each site's variant under an end-to-end fidelity budget.

1. Run the exactly-fused program on the calibration batches and record every site's inputs.
2. For each site, build candidates (windows, sinks, top-k blocks, mass thresholds,
   vertical-slash for causal sites, 2-D neighborhoods where the sequence is a grid, linear and
   hybrid maps), measure each on the recorded inputs (FLOPs, kept attention mass, the site's
   output cosine against exact attention) and keep the Pareto front of cost vs site error.
3. Bisect one threshold on site cosine shared by all sites (each site takes its cheapest
   candidate above it) for the lowest threshold whose whole-model outputs meet the budget on
   all calibration batches; then, least sensitive site first, move single sites to cheaper
   candidates while the budget still holds. Trials run the program with the candidate ops
   substituted at the sites, no rewrite needed.

The search holds a tightened budget (``margin`` of each allowance) so that inputs it has not
seen keep some slack; the caller rewrites the program with the chosen variants and verifies
the result end to end.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import fx
from torch.export import ExportedProgram

from compiler.driver import verify
from compiler.variants.block_layout import grid_of
from compiler.driver.budget import Fidelity
from compiler.ir.errors import PolicyError
from compiler.driver.measure import SiteInputs, exact_probabilities, inputs_of, record_site_inputs, run_variant, site_effect
from compiler.variants.registry import PATTERNS
from compiler.driver.progress import progress
from compiler.ir.site import AttentionSite
from compiler.variants.language import FUSED, Neighborhood, Variant, parse_variant

Batch = tuple  # (args tuple, kwargs dict)


def calibration_batches(calibration, example: Batch) -> list[Batch]:
    """Accepts a list of batches, each a tuple of args, a dict of kwargs, an (args, kwargs) pair
    or a single tensor; ``None`` means the example inputs."""
    if calibration is None:
        return [example]
    if isinstance(calibration, (torch.Tensor, dict)):
        calibration = [calibration]
    if not isinstance(calibration, (list, tuple)) or not calibration:
        raise PolicyError("calibration must be a non-empty list of batches (tuples of args or dicts of kwargs)")
    out = []
    for i, b in enumerate(calibration):
        if isinstance(b, torch.Tensor):
            out.append(((b,), {}))
        elif isinstance(b, dict):
            out.append(((), dict(b)))
        elif isinstance(b, tuple) and len(b) == 2 and isinstance(b[0], tuple) and isinstance(b[1], dict):
            out.append((b[0], dict(b[1])))
        elif isinstance(b, (tuple, list)):
            out.append((tuple(b), {}))
        else:
            raise PolicyError(f"calibration batch {i} is a {type(b).__name__}; give a tuple of args or a dict of kwargs")
    return out


def _block_for(seq: int) -> int:
    return 16 if seq <= 256 else 32 if seq <= 1024 else 64


def candidates(site: AttentionSite, key_mask_only: bool = True) -> list[Variant]:
    """Variants worth measuring for this site; linear ones only where the site's mask (if any)
    is a key mask, which is all linear attention can apply."""
    s, bs = site.seq_k, _block_for(site.seq_k)
    nkb = -(-s // bs)
    texts = []
    for frac in (16, 8, 4, 2):
        w = max(bs, (s // frac) // bs * bs)
        if w < s:
            texts.append(f"window:{w},sinks:4,block={bs}")
    texts += [f"topk:blocks={k},block={bs}" for k in (1, 2, 4, 8) if k + 2 < nkb]
    texts += [f"topk:mass={m},block={bs}" for m in (0.8, 0.9, 0.95)]
    texts.append(f"blocksparse:block={bs},local=1,global=1")
    if site.causal and s >= 4 * bs:
        texts.append(f"vslash:vertical={max(4, s // 8)},slash={max(4, s // 8)},last={min(64, s)},local={bs},block={bs}")
    if not site.causal and site.seq_q == site.seq_k:
        try:
            grid_of(Neighborhood(), s)
            texts += [f"neighborhood:{n}x{n},block={bs}" for n in (3, 5, 7)]
        except ValueError:
            pass
    for spec in PATTERNS.values():  # patterns registered with their own candidates (compiler.variants.registry)
        if spec.candidates is not None:
            texts += spec.candidates(site, bs)
    if site.softcap == 0 and key_mask_only:
        texts += ["linear:elu", f"linear:favor,features={2 * site.head_dim}", f"hybrid:window={max(bs, s // 8)}"]
    return [parse_variant(t) for t in dict.fromkeys(texts)]


@dataclass
class Candidate:
    variant: Variant
    flops: int
    dense_flops: int
    cosine: float  # worst over calibration batches, site output vs exact
    kept_mass: Optional[float]


@dataclass
class Choice:
    assignment: dict[str, Variant]
    record: dict = field(default_factory=dict)


class _Substituted(fx.Interpreter):
    """Runs a program with some attention nodes computed by another variant."""

    def __init__(self, gm, subs: dict[str, Variant]):
        super().__init__(gm)
        self.subs = subs

    def run_node(self, n):
        if n.name in self.subs:
            args, _ = self.fetch_args_kwargs_from_env(n)
            return run_variant(self.subs[n.name], inputs_of(args))
        return super().run_node(n)


def _flat_outputs(ep: ExportedProgram, batch: Batch, subs: dict[str, Variant]):
    with torch.no_grad():
        return _Substituted(ep.graph_module, subs).run(*ep._graph_module_flat_inputs(*batch))


def _worst(measures: list[dict]) -> dict:
    return {
        "max_abs_error": max(m["max_abs_error"] for m in measures),
        "kl_divergence": max(m["kl_divergence"] for m in measures),
        "cosine_similarity": min(m["cosine_similarity"] for m in measures),
    }


def _pareto(cands: list[Candidate]) -> list[Candidate]:
    """Cheapest first, each one strictly more accurate than every cheaper one kept."""
    front, best = [], -math.inf
    for c in sorted(cands, key=lambda c: (c.flops, -c.cosine)):
        if c.cosine > best:
            front.append(c)
            best = c.cosine
    return front


def measure_candidates(site: AttentionSite, inputs: list[SiteInputs]) -> list[Candidate]:
    exact = [run_variant(FUSED, x) for x in inputs]
    probs = [exact_probabilities(x) for x in inputs]
    key_only = all(x.mask is None or x.mask.dim() < 2 or x.mask.shape[-2] == 1 for x in inputs)
    out = []
    for var in candidates(site, key_only):
        effects = [site_effect(var, x, e, p) for x, e, p in zip(inputs, exact, probs)]
        masses = [e.kept_mass for e in effects if e.kept_mass is not None]
        out.append(Candidate(var, sum(e.flops for e in effects), sum(e.dense_flops for e in effects),
                             min(e.cosine_similarity for e in effects), sum(masses) / len(masses) if masses else None))
    return [c for c in out if c.flops < 0.9 * c.dense_flops]


def choose(original: ExportedProgram, fused: ExportedProgram, sites: dict[str, AttentionSite],
           nodes: dict[str, str], batches: list[Batch], budget: Fidelity, margin: float = 0.5,
           show_progress: Optional[bool] = None) -> Choice:
    """Per-site variants for ``fused`` (every site an ``attnforge::attention`` node, ``nodes``
    maps site ids to them) so that the outputs stay within ``budget`` of ``original``."""
    target = budget.tightened(margin)
    references = [_flat_outputs(original, b, {}) for b in batches]
    recorded = [record_site_inputs(fused, *b, nodes.values()) for b in batches]
    per_site: dict[str, list[Candidate]] = {}
    with progress("calibrating: measuring candidates", len(nodes), show_progress) as advance:
        for sid, name in nodes.items():
            per_site[sid] = _pareto(measure_candidates(sites[sid], [r[name] for r in recorded]))
            advance()

    def evaluate(assign: dict[str, Variant]) -> dict:
        subs = {nodes[s]: v for s, v in assign.items() if not v.exact}
        return _worst([verify.compare(ref, _flat_outputs(fused, b, subs)) for ref, b in zip(references, batches)])

    trials = []

    def trial(assign: dict[str, Variant], step: str) -> bool:
        measured = evaluate(assign)
        ok = target.holds(measured)
        trials.append({"step": step, "assignment": {s: v.text for s, v in assign.items() if not v.exact},
                       "flops_saved": _saved(assign, per_site), **measured, "accepted": ok})
        advance()
        return ok

    def at_threshold(tau: float) -> dict[str, Variant]:
        """Each site's cheapest candidate whose own output cosine is at least ``tau``."""
        return {sid: next((c.variant for c in per_site.get(sid, []) if c.cosine >= tau), FUSED) for sid in nodes}

    # 1. One threshold on site fidelity for all sites, bisected: the budget is spread over the
    #    sites in proportion to how much each tolerates, in a few end-to-end runs.
    taus = sorted({c.cosine for cands in per_site.values() for c in cands})
    assignment = {sid: FUSED for sid in nodes}
    refinements = sum(len(c) for c in per_site.values())
    with progress("calibrating: end-to-end trials", math.ceil(math.log2(len(taus) + 1)) + refinements,
                  show_progress) as advance:
        lo, hi = 0, len(taus)  # taus[hi:] all hold (hi == len: nothing assigned)
        while lo < hi:
            mid = (lo + hi) // 2
            if trial(at_threshold(taus[mid]), f"threshold {taus[mid]:.6f}"):
                hi = mid
            else:
                lo = mid + 1
        if hi < len(taus):
            assignment = at_threshold(taus[hi])
        # 2. Then, least sensitive site first, any cheaper candidate the remaining budget allows.
        order = sorted(per_site, key=lambda s: -(per_site[s][0].cosine if per_site[s] else -2.0))
        for sid in order:
            current = next((c.flops for c in per_site[sid] if c.variant == assignment[sid]), math.inf)
            for cand in per_site[sid]:
                if cand.flops >= current:
                    break
                if trial({**assignment, sid: cand.variant}, f"refine {sid}"):
                    assignment = {**assignment, sid: cand.variant}
                    break
    record = {
        "budget": budget.to_dict(),
        "search_budget": target.to_dict(),
        "margin": margin,
        "calibration_batches": len(batches),
        "candidates": {sid: [_cand_dict(c) for c in per_site[sid]] for sid in order},
        "trials": trials,
        "chosen": {sid: v.text for sid, v in assignment.items()},
        "calibration_fidelity": evaluate(assignment),
    }
    return Choice(assignment, record)


def _saved(assign: dict[str, Variant], per_site: dict[str, list[Candidate]]) -> float:
    """Share of the chosen sites' exact FLOPs that ``assign`` removes (calibration inputs)."""
    before = after = 0
    for sid, cands in per_site.items():
        if not cands:
            continue
        dense = cands[0].dense_flops
        before += dense
        chosen = next((c.flops for c in cands if c.variant == assign.get(sid)), dense)
        after += chosen
    return 1.0 - after / before if before else 0.0


def _cand_dict(c: Candidate) -> dict:
    return {"variant": c.variant.text, "flops": c.flops, "dense_flops": c.dense_flops,
            "density": c.flops / c.dense_flops if c.dense_flops else 1.0, "site_cosine": c.cosine,
            "kept_mass": c.kept_mass}
