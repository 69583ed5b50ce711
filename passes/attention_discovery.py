"""Find every dense attention site in an ATen graph.

Anchors are softmax nodes (``softmax``, ``_softmax``, ``_safe_softmax`` or the decomposed
``exp / sum(exp)``) and ``scaled_dot_product_attention``. From a softmax we walk the scores
back as ``a * x + sum(bias)`` through scalar mul/div, adds, ``where``/``masked_fill`` masks,
dtype casts and batch reshapes until a ``matmul``/``bmm``/``baddbmm`` whose two operands both
carry activations, then walk the probabilities forward to a matmul that contracts the key
axis. Anything else on the way means this softmax is not attention (a classifier head, a
router, a softmax over weights) and it is left alone.

The pass only describes; ``attention_fusion`` rewrites.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import fx
from torch.export import ExportedProgram

from compiler.ir import views as L
from compiler.ir.errors import first_line
from compiler.ir.graph import dtype, is_op, module_path, module_type, shape, sym_shape
from compiler.ir.ops import default_scale
from compiler.ir.site import AttentionSite, SiteMatch, layer_of
from passes.mask_resolution import MaskResolver
from passes.score_walk import ChainWalker
from passes.softmax_forms import BADDBMM, MATMUL, SDPA, SOFTMAX, NotAttention, softmax_input


@dataclass
class Discovery:
    matches: list[SiteMatch] = field(default_factory=list)
    rejected: list[dict] = field(default_factory=list)  # {"node", "module", "reason"}



class _Matcher(ChainWalker, MaskResolver):
    """Assembles an ``AttentionSite`` from the walks (``ChainWalker``) and masks (``MaskResolver``)."""

    # -- site assembly ---------------------------------------------------------------

    def match_softmax(self, sm: fx.Node, idx: int) -> SiteMatch:
        x = softmax_input(sm)
        if x is None:
            raise NotAttention("softmax is not over the last axis")
        sshape = sym_shape(x)
        if len(sshape) < 2 or len(sshape) > 5:
            raise NotAttention("scores are not 2-5 dimensional")
        product, const, tfs, terms, keeps, sc_steps, internal, softcap = self.walk_scores(x, sshape)
        # Queries may be learned (Perceiver latents, attention pooling); keys must be activations.
        if not all(isinstance(a, fx.Node) for a in product.args[-2:]) or not self.activation(product.args[-1]):
            raise NotAttention("the keys of the score product are a weight, not an activation")
        pv, pr_steps, pr_internal = self.walk_probs(sm, x)
        xv = pv.args[1]
        if not isinstance(xv, fx.Node) or not self.activation(xv):
            raise NotAttention("the probabilities multiply a weight, not values")

        hs = shape(x)
        b, hq = _batch_heads(hs[:-2])
        sq, sk = hs[-2], hs[-1]
        # The scores and probabilities must keep the product's flat batch order.
        ident = torch.arange(b * hq)
        m = L.batch_map(product, sc_steps)
        if m is None or not torch.equal(m, ident):
            raise NotAttention("score layout not recognised")
        m = L.batch_map(sm, pr_steps)
        if m is None or not torch.equal(m, ident):
            raise NotAttention("probability layout not recognised")

        alpha, beta = 1.0, 1.0
        if is_op(product, BADDBMM):
            beta = float(product.kwargs.get("beta", 1.0))
            alpha = float(product.kwargs.get("alpha", 1.0))
            if beta != 0.0:  # beta == 0: baddbmm never reads its input (often torch.empty)
                terms.append((product.args[0], const * beta, list(tfs)))
        xq, xk = product.args[-2], product.args[-1]
        qk_batch = shape(product)[:-2]
        fb = qk_batch if is_op(product, MATMUL) else None
        q_op, hq_root, q_tr = self.operand(xq, False, (b, hq), fb)
        if hq_root != hq:
            raise NotAttention("query heads repeat")
        k_op, hkv, k_tr = self.operand(xk, True, (b, hq), fb)
        fbv = shape(pv)[:-2] if is_op(pv, MATMUL) else None
        v_op, hkv_v, _ = self.operand(xv, False, (b, hq), fbv, allow_scale=False)
        if hkv_v != hkv:
            raise NotAttention("keys and values have different head counts")

        scale = const * alpha
        for c, kind in q_tr.factors + k_tr.factors:
            if isinstance(c, float):
                scale = scale * c if kind == "mul" else scale / c
            else:
                tfs.append((c, kind))
        d = shape(q_op.node)[-1] if not q_op.transpose_last else shape(q_op.node)[-2]
        dv = shape(v_op.node)[-1] if not v_op.transpose_last else shape(v_op.node)[-2]
        return self._finish(sm, pv, idx, "matmul-softmax-matmul", q_op, k_op, v_op, scale, tfs, terms, keeps,
                            (b, hq), hkv, sq, sk, d, dv, False, internal + [sm] + pr_internal, softcap)

    def match_sdpa(self, node: fx.Node, idx: int) -> SiteMatch:
        args = list(node.args) + [None] * (8 - len(node.args))
        q, k, v, mask, dropout_p, is_causal, scale, gqa = args[:8]
        mask = node.kwargs.get("attn_mask", mask)
        dropout_p = node.kwargs.get("dropout_p", dropout_p) or 0.0
        is_causal = bool(node.kwargs.get("is_causal", is_causal) or False)
        scale = node.kwargs.get("scale", scale)
        gqa = bool(node.kwargs.get("enable_gqa", gqa) or False)
        if dropout_p:
            raise NotAttention("dropout_p > 0 (training mode)")
        qs, ks = shape(q), shape(k)
        if len(qs) != 4 or len(ks) != 4:
            raise NotAttention("scaled_dot_product_attention with non 4-D inputs")
        b, hq, sq, d = qs
        sk = ks[-2]
        # SDPA repeats kv heads itself under enable_gqa: compose that index with any
        # repeat found upstream of its k/v inputs.
        pre = L.gqa_map(b, hq, ks[1]) if gqa and ks[1] != hq else None
        q_op, hq_root, q_tr = self.operand(q, False, (b, hq), None)
        if hq_root != hq:
            raise NotAttention("query heads repeat")
        k_op, hkv, k_tr = self.operand(k, False, (b, hq), None, pre_map=pre)
        v_op, hkv_v, _ = self.operand(v, False, (b, hq), None, allow_scale=False, pre_map=pre)
        if hkv != hkv_v:
            raise NotAttention("keys and values have different head counts")
        s = default_scale(d) if scale is None else float(scale)
        tfs: list = []
        for c, kind in q_tr.factors + k_tr.factors:
            if isinstance(c, float):
                s = s * c if kind == "mul" else s / c
            else:
                tfs.append((c, kind))
        terms, keeps = [], []
        if isinstance(mask, fx.Node):
            if dtype(mask) == torch.bool:
                keeps.append((mask, False))
            else:
                terms.append((mask, 1.0, []))
        dv = shape(v_op.node)[-1]
        site = self._finish(node, node, idx, "sdpa", q_op, k_op, v_op, s, tfs, terms, keeps,
                            (b, hq), hkv, sq, sk, d, dv, is_causal, [node])
        return site

    def _finish(self, anchor, output, idx, form, q_op, k_op, v_op, scale, tfs, terms, keeps,
                batch_heads, hkv, sq, sk, d, dv, causal, internal, softcap=0.0) -> SiteMatch:
        b, hq = batch_heads
        notes: list[str] = []
        full_rows: list = []
        found_causal, terms, keeps, kind = self.resolve_masks(terms, keeps, sq, sk, notes, full_rows)
        causal = causal or found_causal
        if (terms or keeps or tfs) and len(sym_shape(softmax_input(anchor) if form != "sdpa" else q_op.node)) > 4:
            raise NotAttention("a mask or tensor scale on 5-D grouped scores")
        q_op.reshape_to = [b, hq]
        k_op.reshape_to = [b, hkv]
        v_op.reshape_to = [b, hkv]
        path = module_path(anchor)
        site = AttentionSite(
            id=f"attn.{idx}",
            module=path,
            module_type=module_type(anchor),
            form=form,
            batch=b,
            num_heads=hq,
            num_kv_heads=hkv,
            head_dim=d,
            value_dim=dv,
            seq_q=sq,
            seq_k=sk,
            scale=None if tfs else scale,
            causal=causal,
            mask_kind=kind,
            softcap=softcap,
            dtype=str(dtype(q_op.node)).replace("torch.", ""),
            layer=layer_of(path),
            notes=notes,
        )
        return SiteMatch(site, anchor, output, q_op, k_op, v_op, scale, tfs, terms, keeps, (b, hq), internal,
                         full_rows=full_rows)


def _batch_heads(batch: list[int]) -> tuple[int, int]:
    if len(batch) == 0:
        return 1, 1
    if len(batch) == 1:
        return 1, batch[0]
    return batch[0], math.prod(batch[1:])  # [B, Hkv, group] scores: the group is part of the heads


def discover(ep: ExportedProgram) -> Discovery:
    """Describe every attention site of ``ep`` (graph order); reasons for softmaxes left alone."""
    m = _Matcher(ep)
    out = Discovery()
    idx = 0
    for node in list(ep.graph_module.graph.nodes):
        if node.op != "call_function":
            continue
        try:
            if node.target in SDPA:
                out.matches.append(m.match_sdpa(node, idx))
                idx += 1
            elif softmax_input(node) is not None or node.target in SOFTMAX:
                out.matches.append(m.match_softmax(node, idx))
                idx += 1
        except NotAttention as e:
            out.rejected.append({"node": node.name, "module": module_path(node), "reason": str(e)})
        except Exception as e:  # noqa: BLE001 - a form the matcher trips on stays dense, with why
            first = first_line(e)
            out.rejected.append({"node": node.name, "module": module_path(node),
                                 "reason": f"matcher failed ({type(e).__name__}: {first}); left dense"})
    return out
