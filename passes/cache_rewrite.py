"""Attention over a static KV cache: recognise it, then rewrite it to read the cache a policy keeps.

A decoder exported with a static cache (``transformers.integrations.executorch``) writes each
layer's new keys and values into buffers with ``aten.index_copy_(cache, 2, positions, new)``
and attends over the whole buffer with a mask built from ``cache_position``. The discovery
pass finds the attention; here a site is a *cache site* when its keys and values are such
writes into buffers at the same positions, and its keep mask is offset causality over the
cache (query at position ``p`` sees slots ``j <= p``), checked by evaluating the mask's
construction at two fresh positions rather than by its form. ``q_offset`` (the first query's
position) and the valid key range ``[0, q_offset + seq_q)`` are runtime values: the site
records where they come from (the ``positions`` node).

The rewrite replaces ``index_copy_``s + attention by one ``attnforge::cache_attention`` node
over cache buffers shaped by the policy (``compiler.reference.kv_cache``), on the unlifted module, where
buffers are attributes that can be swapped for bounded ones.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import fx
from torch.export import ExportedProgram
from torch.export.graph_signature import InputKind

from compiler.ir.errors import CaptureError
from compiler.ir.graph import ancestors, is_op, overloads
from compiler.reference.kv_cache import CacheGroup, layout_text
from compiler.ir.site import AttentionSite
from passes.attention_discovery import discover
from passes.dce import eliminate_dead_code

INDEX_COPY = overloads(torch.ops.aten.index_copy_)


@dataclass
class CacheSite:
    site: AttentionSite
    anchor: str  # attention node name
    output: str  # node whose uses the op takes over
    q: str
    k_write: str  # the index_copy_ nodes
    v_write: str
    k_new: str
    v_new: str
    positions: str  # node holding the positions written (q_offset = positions[0])
    k_buffer: str  # buffer targets (ExportedProgram state names)
    v_buffer: str
    max_cache_len: int
    mask: Optional[str] = None
    notes: list = field(default_factory=list)

    @property
    def q_offset(self) -> str:
        """Where the first query's position comes from at run time."""
        return f"{self.positions}[0]"

    @property
    def valid_keys(self) -> str:
        """The key slots a query may see: offset causality over what has been written."""
        return f"[0, {self.positions}[-1] + 1) of {self.max_cache_len}"


def _buffer_target(ep: ExportedProgram, node: fx.Node) -> Optional[str]:
    if node.op != "placeholder":
        return None
    for spec in ep.graph_signature.input_specs:
        if spec.arg.name == node.name and spec.kind in (InputKind.BUFFER, InputKind.CONSTANT_TENSOR):
            return spec.target
    return None


def _cache_write(ep: ExportedProgram, node: fx.Node):
    """(buffer target, positions node, new-values node) when ``node`` is ``index_copy_`` of new
    values into a buffer along the sequence dim; else None."""
    if not is_op(node, INDEX_COPY) or node.args[1] not in (2, -2):
        return None
    target = _buffer_target(ep, node.args[0])
    return (target, node.args[2], node.args[3]) if target else None


def _eval_cone(node: fx.Node, inputs: dict, state: dict):
    """The value of ``node`` given user inputs by placeholder name, state cloned (the cone may
    write buffers, e.g. a running cache length)."""
    cone = ancestors(node) | {node}
    env = {}
    for n in node.graph.nodes:
        if n not in cone:
            continue
        if n.op == "placeholder":
            env[n] = inputs[n.name] if n.name in inputs else state[n.name].clone()
        elif n.op == "call_function":
            args = fx.node.map_arg(n.args, lambda a: env[a])
            kwargs = fx.node.map_arg(n.kwargs, lambda a: env[a])
            env[n] = n.target(*args, **kwargs)
        else:
            raise ValueError(n.op)
    return env[node]


def _state_by_placeholder(ep: ExportedProgram) -> dict:
    out = {}
    for spec in ep.graph_signature.input_specs:
        if spec.target is None:
            continue
        if spec.target in ep.state_dict:
            out[spec.arg.name] = ep.state_dict[spec.target]
        elif spec.target in ep.constants:
            out[spec.arg.name] = ep.constants[spec.target]
    return out


def step_inputs(ep: ExportedProgram) -> tuple[str, str]:
    """Names of the program's token-ids input and its cache-position input (transformers' recipe:
    ``input_ids`` / ``cache_position``)."""
    names = [s.arg.name for s in ep.graph_signature.input_specs if s.kind == InputKind.USER_INPUT]
    ids = next((n for n in names if "ids" in n), None)
    pos = next((n for n in names if "position" in n), None)
    if ids is None or pos is None:
        raise CaptureError(f"the program takes {names}, not token ids and a cache position; export it with "
                           "transformers.integrations.executorch.TorchExportableModuleForDecoderOnlyLM")
    return ids, pos


def _offset_causal(ep: ExportedProgram, mask: fx.Node, negate: bool, max_len: int, state: dict) -> bool:
    """Whether ``mask`` keeps exactly slots ``j <= p`` for queries at positions ``p``, evaluated at a
    prefill from 0 and a chunk from 5 (one-token programs: positions 0 and 7)."""
    ids_name, pos_name = step_inputs(ep)
    batch, static_len = next(n for n in ep.graph.nodes if n.name == ids_name).meta["val"].shape[:2]
    probes = [(0, 1), (7, 1)] if isinstance(static_len, int) and static_len == 1 else [(0, 3), (5, 2)]
    for p0, n in probes:
        dev = next(iter(state.values())).device if state else None  # the program's (a model on CUDA)
        inputs = {ids_name: torch.zeros(int(batch), n, dtype=torch.long, device=dev),
                  pos_name: torch.arange(p0, p0 + n, device=dev)}
        try:
            m = _eval_cone(mask, inputs, state)
        except Exception:  # noqa: BLE001 - a mask we cannot evaluate is not one we can trust
            return False
        if m.dtype != torch.bool:
            return False
        if negate:
            m = ~m
        want = torch.arange(max_len)[None, :] <= torch.arange(p0, p0 + n)[:, None]
        if tuple(m.shape[-2:]) != (n, max_len) or not bool((m == want.to(m.device)).all()):
            return False
    return True


def _relaid(op) -> bool:
    """The operand needs a transpose or a batch reshape before attention: not a plain [B, H, S, D]."""
    own = list(op.node.meta["val"].shape[:2])
    return op.transpose_last or (op.reshape_to is not None and list(op.reshape_to) != own)


def _keep_masks(m) -> tuple[list, list]:
    """The site's keep masks as (node, negate), counting an additive ``where(keep, 0, -inf or
    finfo.min)`` term (eager attention's form of the same mask) as its keep mask; other bias terms."""
    keeps, bias = list(m.keep_masks), []
    for term in m.bias_terms:
        what, coef, factors = term
        if isinstance(what, tuple) and what[0] == "where-all" and len(what[1]) == 1 and coef > 0 and not factors:
            cond = what[1][0]
            keeps.append(cond if isinstance(cond, tuple) else (cond, False))
        else:
            bias.append(term)
    return keeps, bias


def find_cache_sites(ep: ExportedProgram) -> list[CacheSite]:
    """Every attention site of a program exported with a static KV cache. A program with no
    such site, or with attention that is not over the cache, cannot generate with our caches."""
    found = discover(ep)
    state = _state_by_placeholder(ep)
    sites = []
    for m in found.matches:
        sid = m.site.id
        kw, vw = _cache_write(ep, m.k.node), _cache_write(ep, m.v.node)
        if kw is None or vw is None:
            raise CaptureError(f"{sid} ({m.site.module}): keys/values are not a static KV cache; export the model "
                               "with transformers.integrations.executorch.TorchExportableModuleForDecoderOnlyLM, "
                               "or pass the Hugging Face model itself")
        if kw[1] is not vw[1] or any(_relaid(op) for op in (m.q, m.k, m.v)):
            raise CaptureError(f"{sid} ({m.site.module}): cache keys and values are laid out in a way the cache "
                               "rewrite does not follow; export with transformers' static-cache recipe")
        keeps, bias = _keep_masks(m)
        if bias or m.scale_tensors or m.site.softcap:
            raise CaptureError(f"{sid} ({m.site.module}): attention has a bias, a runtime scale or a softcap; "
                               "generation supports plain softmax attention over the cache")
        max_len = m.k.node.meta["val"].shape[2]
        if len(keeps) != 1 or not _offset_causal(ep, *keeps[0], max_len, state):
            raise CaptureError(f"{sid} ({m.site.module}): attention over the cache is not masked causally in "
                               "cache_position (a sliding-window or padded model?); generation supports causal "
                               "decoders")
        mask = keeps[0][0].name
        site = m.site
        site.notes.append("keys/values from a static KV cache; mask: offset causal in cache_position")
        sites.append(CacheSite(site, m.anchor.name, m.output.name, m.q.node.name, m.k.node.name, m.v.node.name,
                               kw[2].name, vw[2].name, kw[1].name, kw[0], vw[0], int(max_len), mask))
    if not sites:
        raise CaptureError("no attention over a KV cache found; give a decoder-only causal LM exported with "
                           "transformers.integrations.executorch (static cache), or the Hugging Face model itself")
    return sites


def _dead_code(graph: fx.Graph) -> None:
    """The replaced attention out of the graph: fx's own elimination keeps it alive through the
    export's checks on its probabilities and inference-mode dropout (passes.dce), and an eager-attention
    model would compute scores over the whole static cache, beside the op, at every step."""
    eliminate_dead_code(graph, {n.name for n in graph.nodes if n.op == "placeholder"})


def rewrite_cache_sites(gm: fx.GraphModule, sites: list[CacheSite], layouts: dict[str, list[CacheGroup]],
                        dtype: torch.dtype) -> dict[str, list[tuple[torch.Tensor, torch.Tensor]]]:
    """Rewrite the unlifted module ``gm`` in place: each site in ``layouts`` attends with
    ``attnforge::cache_attention`` over new buffers (one K and one V per cache group). Returns
    the buffers by site id. Sites not in ``layouts`` stay as exported."""
    nodes = {n.name: n for n in gm.graph.nodes}
    made: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}
    dead_buffers = set()
    for cs in sites:
        groups = layouts.get(cs.site.id)
        if groups is None:
            continue
        old_k = gm.get_buffer(cs.k_buffer)
        b, _, max_len, d = old_k.shape
        dv = gm.get_buffer(cs.v_buffer).shape[-1]
        out, kw, vw = nodes[cs.output], nodes[cs.k_write], nodes[cs.v_write]
        bufs, k_attrs, v_attrs = [], [], []
        for i, g in enumerate(groups):
            kt = torch.zeros(b, len(g.kv_heads), g.slots(max_len), d, dtype=dtype, device=old_k.device)
            vt = torch.zeros(b, len(g.kv_heads), g.slots(max_len), dv, dtype=dtype, device=old_k.device)
            kname, vname = f"attnforge_kv_{cs.site.id.replace('.', '_')}_k{i}", \
                f"attnforge_kv_{cs.site.id.replace('.', '_')}_v{i}"
            gm.register_buffer(kname, kt, persistent=False)
            gm.register_buffer(vname, vt, persistent=False)
            bufs.append((kt, vt))
            k_attrs.append(kname)
            v_attrs.append(vname)
        with gm.graph.inserting_before(out):
            ks = [gm.graph.get_attr(a) for a in k_attrs]
            vs = [gm.graph.get_attr(a) for a in v_attrs]
            new = gm.graph.call_function(
                torch.ops.attnforge.cache_attention.default,
                (nodes[cs.q], nodes[cs.k_new], nodes[cs.v_new], nodes[cs.positions], ks, vs,
                 layout_text(groups), float(cs.site.scale if cs.site.scale is not None else d ** -0.5)))
        new.meta = dict(out.meta)
        out.replace_all_uses_with(new)
        anchor = nodes[cs.anchor]
        gm.graph.erase_node(out)
        if anchor is not out and not anchor.users:
            gm.graph.erase_node(anchor)
        _dead_code(gm.graph)
        for w in (kw, vw):
            if not w.users:
                gm.graph.erase_node(w)
        dead_buffers |= {cs.k_buffer, cs.v_buffer}
        made[cs.site.id] = bufs
    _dead_code(gm.graph)
    used = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    for target in dead_buffers - used:  # the static max_cache_len buffers no site reads any more
        owner, _, name = target.rpartition(".")
        mod = gm.get_submodule(owner) if owner else gm
        delattr(mod, name)
    gm.recompile()
    return made


LINEAR = overloads(torch.ops.aten.linear)


def keep_last_logits(gm: fx.GraphModule) -> bool:
    """Project only the last position to the vocabulary: a generation step reads nothing else,
    and a prompt's full ``[S, vocab]`` logits are the largest tensor a prefill would make.
    Applies when the program's first output is ``linear(hidden [B, S, H])``; returns whether it did."""
    out = next(n for n in gm.graph.nodes if n.op == "output")
    first = out.args[0][0] if isinstance(out.args[0], (tuple, list)) else out.args[0]
    if not is_op(first, LINEAR) or len(first.args[0].meta.get("val", torch.empty(0)).shape) != 3:
        return False
    with gm.graph.inserting_before(first):
        last = gm.graph.call_function(torch.ops.aten.slice.Tensor, (first.args[0], 1, -1, None))
    first.args = (last, *first.args[1:])
    gm.recompile()
    return True
