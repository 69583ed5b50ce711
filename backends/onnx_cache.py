"""Generation on ONNX Runtime: the decode step (and prefill) in one session, the KV cache kept
in place across steps.

The rewritten step program (``passes.cache_rewrite``) attends with ``attnforge::cache_attention``,
which writes its cache buffers in place. For ONNX the caches become explicit inputs ("past")
and outputs ("present") of the step graph, and the op its functional twin
``attnforge::cache_attention_step`` (out, updated caches), lowered here to standard ONNX ops:

* the kept history is sliced from the past cache (a full cache: the filled ``[0, p0)``; a ring:
  its filled slots, with the position each slot holds, ``compiler.reference.kv_cache.ring_slot_positions``);
* ``Attention`` over history + the new keys under the keep mask of the site's cache group
  (offset causality, and sinks / window for a ring), native GQA;
* ``ScatterElements`` writes the new keys and values at their slots (``p`` in a full cache,
  ``S + (p - S) mod W`` in a ring) and is the present output.

The session binds each cache's past input and present output to the same ``OrtValue`` (IO
binding), which wraps the generator's own cache tensor: ORT's scatter writes the new slots in
place (its kernels skip the copy when input and output are one buffer), so no cache is copied per
token and ``Generator.cache_bytes`` counts the real memory. Because the write aliases the read,
the write is made to depend on the sliced history (a zero added to its indices), so ORT always
reads the history before it overwrites a ring slot.

Every chunk the generator feeds is at most the narrowest window long, so a chunk's ring slots are
distinct and all of its tokens stay in the ring.
"""

from __future__ import annotations

import copy
import operator

import numpy as np
import torch
from onnxscript import opset23 as op
from torch import Tensor, fx

from backends.onnx_build import arange, dim, ints
from compiler.ir.errors import BackendError
from compiler.reference.kv_cache import cache_attention_eager, parse_layout


@torch.library.custom_op("attnforge::cache_attention_step", mutates_args=())
def cache_attention_step(q: Tensor, k: Tensor, v: Tensor, positions: Tensor, k_caches: list[Tensor],
                         v_caches: list[Tensor], layout: str, scale: float) -> list[Tensor]:
    """``cache_attention`` without mutation: [out, *updated k caches, *updated v caches]."""
    ks, vs = [c.clone() for c in k_caches], [c.clone() for c in v_caches]
    return [cache_attention_eager(q, k, v, positions, ks, vs, layout, scale), *ks, *vs]


@cache_attention_step.register_fake
def _step_fake(q, k, v, positions, k_caches, v_caches, layout, scale):
    return [q.new_empty((*q.shape[:-1], v.shape[-1])), *[torch.empty_like(c) for c in k_caches],
            *[torch.empty_like(c) for c in v_caches]]


CACHE_ATTENTION_STEP = torch.ops.attnforge.cache_attention_step.default


# ---------------------------------------------------------------------------- ONNX lowering


def _group_step(q, k, v, positions, kc, vc, sinks: int, window, scale: float):
    """One cache group: (attention output, present k, present v); ``window``: a ring's rolling
    slots (``CacheGroup.ring``), None for a full cache."""
    p0 = op.Slice(positions, ints(0), ints(1))
    if window is None:
        filled = p0
        slots = positions
        hist_pos = arange(filled)
    else:
        filled = op.Min(p0, ints(sinks + window))
        off = op.Sub(positions, ints(sinks))
        slots = op.Where(op.Less(positions, ints(sinks)), positions, op.Add(ints(sinks), op.Mod(off, ints(window))))
        r = op.Sub(arange(filled), ints(sinks))  # slot - sinks; the newest position a ring slot holds:
        latest = op.Add(op.Add(ints(sinks), r),
                        op.Mul(ints(window), op.Div(op.Sub(op.Sub(p0, ints(1 + sinks)), r), ints(window))))
        hist_pos = op.Where(op.Less(r, ints(0)), op.Add(r, ints(sinks)), latest)
    hist_k = op.Slice(kc, ints(0), filled, ints(2))
    hist_v = op.Slice(vc, ints(0), filled, ints(2))
    keys, values = op.Concat(hist_k, k, axis=2), op.Concat(hist_v, v, axis=2)
    k_pos = op.Unsqueeze(op.Concat(hist_pos, positions, axis=0), ints(0))
    q_pos = op.Unsqueeze(positions, ints(1))
    keep = op.LessOrEqual(k_pos, q_pos)
    if window is not None:
        keep = op.And(keep, op.Or(op.Less(k_pos, ints(sinks)), op.Greater(k_pos, op.Sub(q_pos, ints(window)))))
    out = op.Attention(q, keys, values, op.Unsqueeze(keep, ints(0, 1)), scale=scale)[0]
    # The write aliases the history it overwrites: make it wait for the slices (a zero from their size).
    after = op.Mul(dim(hist_k, 2), ints(0))
    idx = op.Reshape(op.Add(slots, after), ints(1, 1, -1, 1))
    pk = op.ScatterElements(kc, op.Expand(idx, op.Shape(k)), k, axis=2)
    pv = op.ScatterElements(vc, op.Expand(idx, op.Shape(v)), v, axis=2)
    return out, pk, pv


def cache_step_translation(q, k, v, positions, k_caches, v_caches, layout: str, scale: float):
    groups = parse_layout(layout)
    if len(groups) == 1:
        out, pk, pv = _group_step(q, k, v, positions, k_caches[0], v_caches[0], groups[0].sinks, groups[0].ring,
                                  scale)
        return [out, pk, pv]
    hq, hkv = q.shape[1], k.shape[1]
    rep = hq // hkv
    outs, pks, pvs, order = [], [], [], []
    for g, kc, vc in zip(groups, k_caches, v_caches):
        qh = [h * rep + i for h in g.kv_heads for i in range(rep)]
        o, pk, pv = _group_step(op.Gather(q, ints(*qh), axis=1), op.Gather(k, ints(*g.kv_heads), axis=1),
                                op.Gather(v, ints(*g.kv_heads), axis=1), positions, kc, vc, g.sinks, g.ring,
                                scale)
        outs.append(o)
        pks.append(pk)
        pvs.append(pv)
        order += qh
    out = op.Concat(*outs, axis=1)
    if order != sorted(order):
        out = op.Gather(out, ints(*np.argsort(order).tolist()), axis=1)
    return [out, *pks, *pvs]


# ---------------------------------------------------------------------------- the step program


def step_program(gm: fx.GraphModule, ids_name: str, pos_name: str) -> tuple[fx.GraphModule, list[str]]:
    """The rewritten module with its cache buffers as inputs after (ids, positions) and the updated
    caches as outputs after the logits; returns it and the buffer names in input order."""
    gm = copy.deepcopy(gm)
    g = gm.graph
    places = [n for n in g.nodes if n.op == "placeholder"]
    by_name = {n.name: n for n in places}
    ids, pos = by_name[ids_name], by_name[pos_name]
    registered = [name for name, _ in gm.named_buffers()]  # the generator's order: site by site, k then v
    cache_nodes = sorted((n for n in g.nodes if n.op == "get_attr" and n.target.startswith("attnforge_kv_")),
                         key=lambda n: registered.index(n.target))
    names = [n.target for n in cache_nodes]
    new_inputs = []
    with g.inserting_after(places[-1]):
        for n in reversed(cache_nodes):
            p = g.placeholder("past_" + n.target)
            p.meta = dict(n.meta)
            n.replace_all_uses_with(p)
            g.erase_node(n)
            new_inputs.insert(0, p)
    presents = {}
    for n in list(g.nodes):
        if n.op == "call_function" and n.target is torch.ops.attnforge.cache_attention.default:
            kcs, vcs = n.args[4], n.args[5]
            with g.inserting_after(n):
                step = g.call_function(CACHE_ATTENTION_STEP, n.args)
                with g.inserting_after(step):
                    items = [g.call_function(operator.getitem, (step, i))
                             for i in range(1 + len(kcs) + len(vcs))]
            n.replace_all_uses_with(items[0])
            g.erase_node(n)
            for past, item in zip([*kcs, *vcs], items[1:]):
                presents[past.name] = item
    out = next(n for n in g.nodes if n.op == "output")
    first = out.args[0][0] if isinstance(out.args[0], (tuple, list)) else out.args[0]
    out.args = ((first, *[presents[p.name] for p in new_inputs]),)
    # Plain positional inputs and a flat output tuple (the export's pytree codegen is dropped).
    g._codegen = fx.graph.CodeGen()
    if places != [ids, pos]:
        raise BackendError(f"the step program takes {[p.name for p in places]}, not ({ids_name}, {pos_name}); "
                           "export it with transformers.integrations.executorch")
    for target in names:
        owner, _, attr = target.rpartition(".")
        delattr(gm.get_submodule(owner) if owner else gm, attr)
    g.eliminate_dead_code()
    gm.recompile()
    return gm, names


class OrtStepSession:
    """The step program in one ONNX Runtime session; caches bound in place across calls."""

    def __init__(self, gm: fx.GraphModule, ids_name: str, pos_name: str, provider: str = "CPUExecutionProvider"):
        import onnxruntime as ort

        from backends.onnx_export import export_onnx

        step, names = step_program(gm, ids_name, pos_name)
        self.caches = [gm.get_buffer(n) for n in names]  # the generator's own tensors, written in place
        ids_val = next(n for n in step.graph.nodes if n.name == ids_name).meta["val"]
        example = (torch.zeros(1, 2, dtype=torch.long), torch.arange(2)) if not isinstance(ids_val.shape[1], int) \
            else (torch.zeros(1, ids_val.shape[1], dtype=torch.long), torch.arange(ids_val.shape[1]))
        dynamic = None
        if not isinstance(ids_val.shape[1], int):
            seq = torch.export.Dim.DYNAMIC
            dynamic = ({1: seq}, {0: seq}, *[None] * len(names))
        with torch.no_grad():
            ep = torch.export.export(step, (*example, *[c.clone() for c in self.caches]), dynamic_shapes=dynamic)
        self.onnx = export_onnx(ep, provider).model
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        self.session = ort.InferenceSession(self.onnx.SerializeToString(), opts, providers=[provider])
        ins = [i.name for i in self.session.get_inputs()]
        outs = [o.name for o in self.session.get_outputs()]
        self._ids, self._pos = ins[0], ins[1]
        self._logits = outs[0]
        self.binding = self.session.io_binding()
        self.binding.bind_output(self._logits, "cpu")
        # One OrtValue per cache over the torch tensor's memory, bound as past and present.
        self._values = [ort.OrtValue.ortvalue_from_numpy(c.numpy()) for c in self.caches]
        for name_in, name_out, val in zip(ins[2:], outs[1:], self._values):
            self.binding.bind_ortvalue_input(name_in, val)
            self.binding.bind_ortvalue_output(name_out, val)

    def run(self, ids: Tensor, start: int) -> Tensor:
        self.binding.bind_cpu_input(self._ids, ids.numpy())
        self.binding.bind_cpu_input(self._pos, np.arange(start, start + ids.shape[1], dtype=np.int64))
        self.binding.bind_output(self._logits, "cpu")  # rebound: ORT allocates it per run
        self.session.run_with_iobinding(self.binding)
        return torch.from_numpy(self.binding.get_outputs()[0].numpy())  # bound first, so first
