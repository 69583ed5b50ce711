"""Data for the pictures in a report: a site's subgraph before and after the rewrite, and its
attention maps with the pairs its variant keeps.

Stored in the JSON report (small and plain: names, edges, 8-bit images in base64) so that
``attnforge inspect --html`` can draw them later without the model.
"""

from __future__ import annotations

from typing import Iterable, Optional

import torch
import torch.nn.functional as F
from torch import fx

from compiler.driver.measure import MEASURE_ROWS, SiteInputs, exact_probabilities
from compiler.reference.sparse_ops import sparse_keep_rows
from compiler.report.maps import encode_map
from compiler.variants.language import Variant

MAP_SIZE = 64  # attention maps are pooled to at most this many rows and columns
MAX_HEADS = 16


def _op_name(n: fx.Node) -> str:
    if n.op == "call_function":
        t = n.target
        name = getattr(t, "__name__", str(t))
        pkt = getattr(t, "_overloadpacket", None)
        if pkt is not None:
            ns = getattr(t, "namespace", "aten")
            name = f"{ns}.{pkt.__name__}" if ns != "aten" else pkt.__name__
        return name
    return n.op


def subgraph(nodes: Iterable[fx.Node]) -> dict:
    """The nodes, their ops, the outside nodes they read, and the edges from both."""
    nodes = list(dict.fromkeys(nodes))
    inside = set(nodes)
    edges, inputs = [], []
    for n in nodes:
        for a in n.all_input_nodes:
            edges.append([a.name, n.name])
            if a not in inside and a.name not in inputs:
                inputs.append(a.name)
    return {"nodes": [{"name": n.name, "op": _op_name(n)} for n in nodes], "edges": edges, "inputs": inputs}


def rewritten_subgraph(node: fx.Node, stop_names: set[str], depth: int = 6) -> dict:
    """``node`` and the nodes the rewrite created to feed it, back to nodes named in
    ``stop_names`` (those that existed before the rewrite) or ``depth`` steps."""
    seen, frontier = [node], [node]
    for _ in range(depth):
        nxt = []
        for n in frontier:
            for a in n.all_input_nodes:
                if a in seen or a.name in stop_names or a.op in ("placeholder", "get_attr"):
                    continue
                seen.append(a)
                nxt.append(a)
        frontier = nxt
    return subgraph(reversed(seen))


def _bins(n: int, size: int) -> list[tuple[int, int]]:
    """The row ranges adaptive pooling of ``n`` rows to ``size`` uses."""
    return [(r * n // size, -(-(r + 1) * n // size)) for r in range(size)]


def attention_maps(x: SiteInputs, variant: Optional[Variant] = None) -> Optional[dict]:
    """Exact attention probabilities of batch 0 per head, pooled to at most MAP_SIZE², and,
    for a sparse variant, the share of each pooled cell the variant keeps.

    Pooled a band of query rows at a time (max and mean pool separably over a rectangle), so a
    long site never holds its square. Above ``MEASURE_ROWS`` queries each band is represented
    by a stripe of its rows (``sampled_rows`` says how many in all)."""
    mask = x.mask if x.mask is None or x.mask.dim() < 4 or x.mask.shape[0] == 1 else x.mask[:1]
    one = SiteInputs(x.q[:1], x.k[:1], x.v[:1], mask, x.scale, x.causal, x.softcap)
    exact = exact_probabilities(one)
    sq, sk = x.q.shape[2], x.k.shape[2]
    heads = min(x.q.shape[1], MAX_HEADS)
    size = (min(sq, MAP_SIZE), min(sk, MAP_SIZE))
    keep_rows = None
    if variant is not None and variant.kind == "sparse":
        keep_rows = sparse_keep_rows(one.q, one.k, variant.text, x.scale, x.causal)
    per_band = max(1, MEASURE_ROWS // size[0])
    prob_rows, keep_rows_out, sampled = [], [], 0
    for a, z in _bins(sq, size[0]):
        if z - a > per_band and sq > MEASURE_ROWS:
            mid = (a + z - per_band) // 2
            a, z = mid, mid + per_band
        sampled += z - a
        band = torch.full((heads, size[1]), 0.0)
        kept = torch.zeros(heads, size[1])
        for r0, r1 in exact.blocks([(a, z)]):
            p = exact.probs(r0, r1)[0, :heads]  # [H, n, Sk]
            band = torch.maximum(band, F.adaptive_max_pool1d(p, size[1]).amax(1))
            if keep_rows is not None:
                kept += F.adaptive_avg_pool1d(keep_rows(r0, r1)[0, :heads].float(), size[1]).sum(1)
        prob_rows.append(band)
        keep_rows_out.append(kept / (z - a))
    pooled = torch.stack(prob_rows, 1)  # [H, rows, cols]
    # Pooled by max so a few strong keys stay visible; each head scaled to its own peak.
    peak = pooled.amax((-2, -1), keepdim=True).clamp_min(1e-12)
    out = {"heads": list(range(heads)), "shape": list(size), "seq": [sq, sk],
           "probs": [encode_map(m) for m in (pooled / peak).sqrt()], "keep": None}
    if sampled < sq:
        out["sampled_rows"] = sampled
    if keep_rows is not None:
        out["keep"] = [encode_map(m) for m in torch.stack(keep_rows_out, 1)]
    return out
