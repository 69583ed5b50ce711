"""``policy="auto"`` for generation: which KV heads may keep only a streaming cache.

DuoAttention trains a gate per KV head to tell retrieval heads (full cache) from streaming
heads (sinks + window). Here the same split is found by search, on calibration prompts:

1. The exact (``fused``) generator continues each calibration prompt greedily; the prompt plus
   its continuation is the calibration sequence. Its reference is the exact generator's
   next-token logits at every decode step, teacher-forced on that sequence.
2. Each KV head alone is made streaming (the ``streaming`` variant, e.g. ``sinks:4,window:1024``)
   and the same teacher-forced decode is measured against the reference: KL divergence,
   total variation and max abs error of the next-token distributions (``compiler.driver.verify.compare``,
   the vocabulary of ``compiler.driver.budget.Fidelity``).
3. Least harmful head first (ties: site order, then head), heads are added to the streaming set
   while the whole set's measured divergence stays within the budget, tightened to ``margin``
   of each allowance (as ``compiler.driver.auto`` does) so prompts the search has not seen keep slack.

Teacher forcing makes every candidate see the same tokens, so a head's effect is the change of
the distributions alone, not of a diverged continuation. The result is an ordinary policy (a
dict of site ids to head mixes) that the caller compiles; the record says each head's effect,
the trials and the cache bytes the choice saves.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Optional

import torch
from torch.export import ExportedProgram

from compiler.driver import verify
from compiler.driver.budget import Fidelity
from compiler.ir.errors import InputError, PolicyError
from compiler.variants.registry import feature
from compiler.variants.language import Variant, parse_variant


@dataclass
class HeadEffect:
    site: str
    module: str
    layer: Optional[int]
    kv_head: int
    query_heads: list
    kl_divergence: float
    total_variation: float  # max over steps of half the L1 distance of the next-token distributions
    max_abs_error: float  # of the logits
    streaming: bool = False


def streaming_variant(text: str) -> Variant:
    v = parse_variant(text) if isinstance(text, str) else None
    if v is None or not feature(v.pattern, "decode_ring") or v.pattern.left is None or v.pattern.right not in (None, 0):
        raise PolicyError(f"streaming={text!r}: give the streaming heads' cache as sinks:S,window:W, "
                          "e.g. sinks:4,window:1024")
    return v


def calibration_prompts(calibration, example: Optional[torch.Tensor]) -> list[torch.Tensor]:
    if calibration is None:
        if example is None:
            raise PolicyError("policy='auto' needs calibration prompts: give calibration=[ids, ...] "
                              "(each a [1, n] tensor of token ids) or example_input_ids")
        calibration = [example]
    if isinstance(calibration, torch.Tensor):
        calibration = [calibration]
    if not isinstance(calibration, (list, tuple)) or not calibration:
        raise PolicyError("calibration must be a non-empty list of [1, n] token-id tensors")
    for i, p in enumerate(calibration):
        if not isinstance(p, torch.Tensor) or p.dim() != 2 or p.dtype != torch.long or p.shape[1] < 1:
            raise InputError(f"calibration prompt {i} must be a [1, n] tensor of token ids (torch.long)")
    return list(calibration)


def _total_variation(ref: torch.Tensor, new: torch.Tensor) -> float:
    p, q = ref.double().softmax(-1), new.double().softmax(-1)
    return float(0.5 * (p - q).abs().sum(-1).max())


def _measure(refs: list[torch.Tensor], outs: list[torch.Tensor]) -> dict:
    m = verify.compare(refs, outs)
    return {"kl_divergence": m["kl_divergence"], "total_variation": max(map(_total_variation, refs, outs)),
            "max_abs_error": m["max_abs_error"], "cosine_similarity": m["cosine_similarity"]}


def policy_for(streaming: dict[str, set], num_heads: dict[str, int], num_kv: dict[str, int], variant: str) -> dict:
    """A policy giving the KV heads in ``streaming[site]`` the streaming cache, the rest the full one."""
    pol: dict = {"*": "fused"}
    for sid, kvs in streaming.items():
        if not kvs:
            continue
        rep = num_heads[sid] // num_kv[sid]
        if len(kvs) == num_kv[sid]:
            pol[sid] = variant
            continue
        qs = ",".join(f"{kv * rep}-{kv * rep + rep - 1}" if rep > 1 else str(kv) for kv in sorted(kvs))
        pol[sid] = f"heads[{qs}]={variant}; heads[*]=fused"
    return pol


def choose_streaming_heads(ep: ExportedProgram, prompts: list[torch.Tensor], budget: Fidelity, streaming: str,
                           new_tokens: int = 32, margin: float = 0.5) -> tuple[dict, dict]:
    """(policy, record): the largest streaming set the greedy search keeps within ``budget``."""
    from compiler.driver.generate import Generator

    streaming_variant(streaming)
    variant = streaming.strip()
    target = budget.tightened(margin)
    exact = Generator(ep, "fused")
    seqs = []
    for p in prompts:
        n = min(new_tokens, exact.max_cache_len - p.shape[1])
        if n < 2:
            raise InputError(f"calibration prompt of {p.shape[1]} tokens leaves no room to decode in "
                             f"max_cache_len={exact.max_cache_len}; give shorter prompts or a larger max_cache_len")
        seqs.append((exact.generate(p, n), p.shape[1]))
    refs = [exact.score(s, n) for s, n in seqs]
    sites = [cs.site for cs in exact.sites]
    num_heads = {s.id: s.num_heads for s in sites}
    num_kv = {s.id: s.num_kv_heads for s in sites}

    def run(stream: dict[str, set]) -> dict:
        g = Generator(ep, policy_for(stream, num_heads, num_kv, variant))
        return _measure(refs, [g.score(s, n) for s, n in seqs])

    effects = []
    for s in sites:
        rep = s.num_heads // s.num_kv_heads
        for kv in range(s.num_kv_heads):
            m = run({s.id: {kv}})
            effects.append(HeadEffect(s.id, s.module, s.layer, kv, list(range(kv * rep, (kv + 1) * rep)),
                                      m["kl_divergence"], m["total_variation"], m["max_abs_error"]))
    order = sorted(range(len(effects)), key=lambda i: (effects[i].kl_divergence, effects[i].total_variation, i))
    chosen: dict[str, set] = {s.id: set() for s in sites}
    trials, fidelity = [], _measure(refs, refs)
    for i in order:
        e = effects[i]
        trial = {sid: set(kvs) for sid, kvs in chosen.items()}
        trial[e.site].add(e.kv_head)
        m = run(trial)
        ok = target.holds(m)
        trials.append({"add": f"{e.site} kv head {e.kv_head}", **m, "accepted": ok})
        if ok:
            chosen, fidelity, e.streaming = trial, m, True
    policy = policy_for(chosen, num_heads, num_kv, variant)
    record = {
        "budget": budget.to_dict(),
        "search_budget": target.to_dict(),
        "margin": margin,
        "streaming": variant,
        "calibration_prompts": len(prompts),
        "calibration_decode_steps": sum(s.shape[1] - n for s, n in seqs),
        "heads": [asdict(e) for e in effects],
        "trials": trials,
        "chosen": policy,
        "streaming_kv_heads": sum(e.streaming for e in effects),
        "kv_heads": len(effects),
        "calibration_fidelity": fidelity,
    }
    return policy, record
