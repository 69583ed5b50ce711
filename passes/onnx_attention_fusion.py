"""ONNX front end: find dense attention in an ONNX model and rewrite each site into one
standard ``Attention`` node (ai.onnx, opset 23).

Two kinds of anchors are handled:

* ``Softmax`` over the last axis. The scores are read back as
  ``softcap·tanh(scale·(q@kᵀ)/softcap) + bias`` through float casts, scalar ``Mul``/``Div``
  (on the scores, on q, on k, or √scale on both), additive biases (``Add``/``Sub``) and
  ``Where`` masks, to a ``MatMul`` of two activations; the probabilities are followed
  through casts, ``Identity``, inference ``Dropout`` and the safe-softmax
  ``Where(IsNaN(p), 0, p)`` to a ``MatMul`` with V. Anything else on the way means the
  softmax is not (rewritable) attention and it is left alone, with the reason.
* Already-fused nodes: ai.onnx ``Attention`` (3-D or 4-D), and the onnxruntime contrib ops
  ``MultiHeadAttention``, ``Attention`` (packed QKV weights) and ``GroupQueryAttention``
  (prefill form), which are re-expressed with 4-D Q/K/V and an explicit mask.

Masks are split into AND (bool) or sum (float) parts. Parts computable from constants and
shapes are evaluated (with a symbolic sequence length, at two lengths), and a top-left
lower-triangular part becomes ``is_causal=1``, while input-dependent parts (padding) stay
as ``attn_mask``, bool where the model filled with -inf or the dtype minimum. The mask is
made explicit over the query axis, which onnxruntime's Attention does not broadcast.
Repeated K/V (``repeat_kv``) are fed un-repeated, so GQA stays native.

Every rewrite keeps the numbers of the original graph, with one documented exception: a
query row whose keys are *all* masked. The Attention op gives a zero row there (ORT 1.31
does so even for a float mask filled with the dtype's minimum), where the unfused graph
gives NaN (``-inf`` fill), the mean of V (finite fill) or zeros (safe softmax).

The pass only rewrites; it does not verify numerics (tests compare against onnxruntime).
"""

from __future__ import annotations

import ast
import math
import time
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import onnx
import onnx_ir as ir
from onnx_ir.passes.common import ShapeInferencePass
from onnxscript import version_converter

from compiler.errors import InputError
from compiler.masks import neg_inf_threshold

TARGET_OPSET = 23
# onnx.helper writes the newest IR version; onnxruntime 1.31 loads up to 13 and callers
# asked for <= 10, which still carries every type this pass emits.
MAX_IR_VERSION = 10
# Bigger constant masks are not evaluated (memory); they stay masks.
_MAX_EVAL_ELEMENTS = 1 << 24
_LAYOUT_OPS = {"Transpose", "Reshape", "Unsqueeze", "Squeeze", "Identity", "Flatten"}
_NONDETERMINISTIC = {"RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike",
                     "Multinomial", "Bernoulli", "Dropout"}
_MS = "com.microsoft"


@dataclass
class OnnxSite:
    """One rewritten site. ``source`` is "matmul-softmax" for an unfused subgraph, else the
    fused op it came from ("ai.onnx.Attention", "com.microsoft.MultiHeadAttention", ...);
    ``mask`` is "none", "bool" or "float"; ``scale`` multiplies q@kᵀ."""

    id: str
    node: str
    source: str
    removed_nodes: list[str] = field(default_factory=list)
    module: str = ""  # module path of the anchor, "" when the file does not record one
    q_heads: Optional[int] = None
    kv_heads: Optional[int] = None
    head_dim: Optional[int] = None
    is_causal: bool = False
    mask: str = "none"
    scale: float = float("nan")
    softcap: float = 0.0


@dataclass
class OnnxFusionResult:
    """Sites in graph order; ``rejected`` holds (node name, reason) for each Softmax or
    fused node that was left alone."""

    sites: list[OnnxSite] = field(default_factory=list)
    rejected: list[tuple[str, str]] = field(default_factory=list)
    seconds: float = 0.0


def _module_path(node: ir.Node) -> str:
    """The PyTorch module an exported node came from: the dynamo exporter records the name scopes
    (``['', 'encoder', 'encoder.layer.0', ..., 'softmax']``), the TorchScript exporter names nodes
    by scope (``/encoder/layer.0/attention/self/Softmax``)."""
    scopes = node.metadata_props.get("pkg.torch.onnx.name_scopes")
    if scopes:
        try:
            names = ast.literal_eval(scopes)
        except (ValueError, SyntaxError):
            names = []
        if len(names) >= 2 and isinstance(names[-2], str):
            return names[-2]
    name = node.name or ""
    if name.startswith("/"):
        return ".".join(p for p in name.split("/")[:-1] if p)
    return ""


class _Reject(Exception):
    """Raised inside a matcher with the reason a node is not (rewritable) attention."""


# ----------------------------------------------------------------------------------------
# small helpers on onnx_ir values


def _shape(v: Optional[ir.Value]):
    return None if v is None or v.shape is None else list(v.shape)


def _rank(v: Optional[ir.Value]) -> Optional[int]:
    s = _shape(v)
    return None if s is None else len(s)


def _int_dim(v: Optional[ir.Value], i: int) -> Optional[int]:
    s = _shape(v)
    if s is None or not -len(s) <= i < len(s):
        return None
    d = s[i]
    return d if isinstance(d, int) else None


def _same_dim(a, b) -> bool:
    if isinstance(a, int) and isinstance(b, int):
        return a == b
    if isinstance(a, ir.SymbolicDim) and isinstance(b, ir.SymbolicDim):
        return a.value is not None and a.value == b.value
    return False


def _static_shape(v: Optional[ir.Value]) -> Optional[list[int]]:
    s = _shape(v)
    if s is None or not all(isinstance(d, int) for d in s):
        return None
    return s


def _present(v: Optional[ir.Value]) -> bool:
    return v is not None and (v.name is None or v.name != "")


def _used(v: Optional[ir.Value]) -> bool:
    return v is not None and (bool(list(v.uses())) or v.is_graph_output())


def _producer(v: Optional[ir.Value], *ops: str) -> Optional[ir.Node]:
    """The node producing ``v`` if it is one of the standard ``ops``."""
    if v is None:
        return None
    p = v.producer()
    if p is None or p.domain not in ("", "ai.onnx") or (ops and p.op_type not in ops):
        return None
    return p


def _input(node: ir.Node, i: int) -> Optional[ir.Value]:
    if i >= len(node.inputs):
        return None
    v = node.inputs[i]
    return v if _present(v) else None


def _compose(p: list[int], q: list[int]) -> list[int]:
    """Transpose(Transpose(x, p), q) == Transpose(x, _compose(p, q))."""
    return [p[i] for i in q]


def _swap_last(rank: int) -> list[int]:
    return list(range(rank - 2)) + [rank - 1, rank - 2]


def _neg_threshold(dtype: Optional[ir.DataType]) -> float:
    """Fill values at or below this act as -inf (compiler.masks, shared with the PyTorch front end)."""
    try:
        return neg_inf_threshold(dtype.numpy())
    except Exception:
        return neg_inf_threshold(np.float32)


# ----------------------------------------------------------------------------------------
# values computable from constants and static shapes


class _Constants:
    """Decides which values depend only on constants and shapes, and evaluates them.

    Evaluation runs the value's cone with onnx's reference evaluator, with ``Shape``/``Size``
    of activations replaced by their numbers. A value is *static* when those shapes are
    static; it is *shape-only* when they have symbolic dims, and is then evaluated under a
    ``binding`` of each symbol to a number.
    """

    def __init__(self, model: ir.Model):
        self.model = model
        self._memo: dict[tuple[int, bool], bool] = {}
        self._values: dict[tuple[int, tuple], Optional[np.ndarray]] = {}

    @staticmethod
    def _shape_leaf(node: Optional[ir.Node], binding=None) -> Optional[np.ndarray]:
        """Numbers for Shape/Size of an activation: static dims, or symbols in ``binding``."""
        if node is None or node.op_type not in ("Shape", "Size") or node.domain not in ("", "ai.onnx"):
            return None
        dims = _shape(node.inputs[0])
        if dims is None:
            return None
        binding = binding if binding is not None else {}
        dims = [d if isinstance(d, int) else binding.get(d.value) for d in dims]
        if node.op_type == "Size":
            return None if None in dims else np.array(int(np.prod(dims)), dtype=np.int64)
        start = node.attributes.get_int("start", 0)
        end = node.attributes.get_int("end", None)
        dims = dims[start:end]
        return None if None in dims else np.array(dims, dtype=np.int64)

    @staticmethod
    def _symbolic_leaf(node: Optional[ir.Node]) -> bool:
        """Shape/Size whose needed dims are ints or named symbols."""
        if node is None or node.op_type not in ("Shape", "Size") or node.domain not in ("", "ai.onnx"):
            return False
        dims = _shape(node.inputs[0])
        if dims is None:
            return False
        if node.op_type == "Shape":
            dims = dims[node.attributes.get_int("start", 0):node.attributes.get_int("end", None)]
        # Named input dims only: an expression ("s0 + 1") or an unknown that shape inference
        # made up ("unk__3") need not equal the sequence length it would be bound to.
        return all(isinstance(d, int) or (d.value and d.value.isidentifier() and not d.value.startswith("unk__"))
                   for d in dims)

    def is_static(self, v: Optional[ir.Value]) -> bool:
        return self._depends_only_on_constants(v, symbolic=False)

    def is_shape_only(self, v: Optional[ir.Value]) -> bool:
        return self._depends_only_on_constants(v, symbolic=True)

    def _depends_only_on_constants(self, v: Optional[ir.Value], symbolic: bool) -> bool:
        if v is None or not _present(v):
            return True
        memo = self._memo
        todo = [v]
        while todo:
            cur = todo[-1]
            key = (id(cur), symbolic)
            if key in memo:
                todo.pop()
                continue
            node = cur.producer()
            if cur.is_graph_input() or (cur.const_value is None and node is None):
                memo[key] = False
            elif cur.const_value is not None:
                memo[key] = True
            elif self._shape_leaf(node) is not None or node.op_type == "Constant" or (
                    symbolic and self._symbolic_leaf(node)):
                memo[key] = node.domain in ("", "ai.onnx")
            elif (node.domain not in ("", "ai.onnx") or node.op_type in _NONDETERMINISTIC
                  or any(a.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS)
                         for a in node.attributes.values())):
                memo[key] = False
            else:
                pending = [i for i in node.inputs if _present(i) and (id(i), symbolic) not in memo]
                if pending:
                    todo.extend(pending)
                    continue
                memo[key] = all(memo[(id(i), symbolic)] for i in node.inputs if _present(i))
            todo.pop()
        return memo[(id(v), symbolic)]

    def value(self, v: Optional[ir.Value], binding=None) -> Optional[np.ndarray]:
        if v is None or not (self.is_static(v) or (binding is not None and self.is_shape_only(v))):
            return None
        key = (id(v), tuple(binding.items()) if binding is not None else ())
        if key not in self._values:
            try:
                self._values[key] = (v.const_value.numpy() if v.const_value is not None
                                     else self._evaluate(v, binding))
            except Exception:  # e.g. external data that was not loaded
                self._values[key] = None
        return self._values[key]

    def scalar(self, v: Optional[ir.Value]) -> Optional[float]:
        if v is None:
            return None
        s = _static_shape(v)
        if s is not None and int(np.prod(s)) != 1:
            return None
        a = self.value(v)
        if a is None or a.size != 1 or a.dtype.kind not in "fiub":
            return None
        return float(a.reshape(-1)[0])

    def _evaluate(self, v: ir.Value, binding) -> Optional[np.ndarray]:
        s = _static_shape(v)
        if s is not None and int(np.prod(s)) > _MAX_EVAL_ELEMENTS:
            return None
        nodes: list[ir.Node] = []
        inits: dict[str, np.ndarray] = {}
        seen: set[int] = set()
        todo = [v]
        while todo:
            cur = todo.pop()
            if cur is None or not _present(cur) or id(cur) in seen:
                continue
            seen.add(id(cur))
            if cur.const_value is not None:
                inits[cur.name] = cur.const_value.numpy()
                continue
            node = cur.producer()
            leaf = self._shape_leaf(node, binding)
            if leaf is not None:
                inits[cur.name] = leaf
                continue
            if node is None:
                return None
            if id(node) in seen:
                continue
            seen.add(id(node))
            nodes.append(node)
            todo.extend(node.inputs)
        order = {id(n): i for i, n in enumerate(self.model.graph)}
        nodes.sort(key=lambda n: order.get(id(n), 0))
        graph = onnx.helper.make_graph(
            [ir.serde.serialize_node(n) for n in nodes], "cone", [],
            [onnx.helper.make_empty_tensor_value_info(v.name)],
            initializer=[onnx.numpy_helper.from_array(np.asarray(a), name) for name, a in inits.items()],
        )
        proto = onnx.helper.make_model(
            graph, opset_imports=[onnx.helper.make_opsetid(d, ver)
                                  for d, ver in self.model.opset_imports.items()])
        try:
            from onnx.reference import ReferenceEvaluator

            out = np.asarray(ReferenceEvaluator(proto).run(None, {})[0])
        except Exception:
            return None
        return out if out.size <= _MAX_EVAL_ELEMENTS else None


# ----------------------------------------------------------------------------------------
# building new nodes


class _Builder:
    """Collects new nodes for one site; they are inserted before ``anchor`` on commit."""

    def __init__(self, graph: ir.Graph, anchor: ir.Node):
        self.graph = graph
        self.anchor = anchor
        self.nodes: list[ir.Node] = []

    def op(self, op_type: str, inputs, num_outputs: int = 1, name: Optional[str] = None, **attrs):
        node = ir.Node("", op_type, inputs, ir.convenience.convert_attributes(attrs),
                       num_outputs=num_outputs, name=name)
        self.nodes.append(node)
        return node.outputs[0] if num_outputs == 1 else tuple(node.outputs)

    def const(self, array) -> ir.Value:
        return self.op("Constant", [], value=ir.tensor(np.asarray(array)))

    def ints(self, values) -> ir.Value:
        return self.const(np.asarray(values, dtype=np.int64))

    def scalar_like(self, value: float, dtype: Optional[ir.DataType]) -> ir.Value:
        np_dtype = dtype.numpy() if dtype is not None else np.float32
        return self.const(np.asarray(value, dtype=np_dtype))

    def split_heads(self, x: ir.Value, heads: int) -> ir.Value:
        """[B, S, H*D] -> [B, H, S, D]."""
        y = self.op("Reshape", [x, self.ints([0, 0, heads, -1])])
        return self.op("Transpose", [y], perm=[0, 2, 1, 3])

    def merge_heads(self, y: ir.Value) -> ir.Value:
        """[B, H, S, D] -> [B, S, H*D]."""
        t = self.op("Transpose", [y], perm=[0, 2, 1, 3])
        return self.op("Reshape", [t, self.ints([0, 0, -1])])

    def seq_len(self, x4: ir.Value) -> ir.Value:
        """Length of axis 2 of a 4-D value, as a 1-element int64 tensor."""
        d = _int_dim(x4, 2)
        if d is not None:
            return self.ints([d])
        return self.op("Shape", [x4], start=2, end=3)

    def discard(self):
        """Forget the nodes of a site that was rejected half-way: their inputs must not keep
        counting them as uses."""
        for node in self.nodes:
            for i in range(len(node.inputs)):
                node.replace_input_with(i, None)
        self.nodes = []

    def commit(self) -> list[ir.Node]:
        """Insert the nodes whose outputs are used; drop the rest (e.g. a layout copy that a
        later transpose folding made redundant)."""
        keep = []
        for node in reversed(self.nodes):
            if any(_used(o) for o in node.outputs) or node.op_type == "Attention":
                keep.append(node)
            else:
                for i in range(len(node.inputs)):
                    node.replace_input_with(i, None)
        keep.reverse()
        if keep:
            self.graph.insert_before(self.anchor, keep)
        self.nodes = []
        return keep


# ----------------------------------------------------------------------------------------
# masks


class _AllSymbols:
    """A binding of every symbolic dim to one number."""

    def __init__(self, n: int):
        self.n = n

    def get(self, key, default=None):
        return self.n

    def items(self):
        return [("*", self.n)]


@dataclass
class _Term:
    """One part of the bias added to the scores: ``kind`` is "keep" (bool, True attends),
    "drop" (bool, True is masked) or "add" (float, ``coeff * value`` is added)."""

    kind: str
    value: ir.Value
    coeff: float = 1.0


class _Masks:
    """Splits mask terms, turns their constant top-left triangular part into is_causal,
    and assembles what remains into one ``attn_mask``."""

    def __init__(self, consts: _Constants):
        self.consts = consts

    def _leaves(self, term: _Term, shape_safe: bool) -> list[_Term]:
        """Flatten And (keep), Or (drop) or Add (add) trees into their parts. Expand is looked
        through only when the scores keep their shape (``shape_safe``): the Attention op
        broadcasts the mask itself."""
        joins = {"keep": "And", "drop": "Or", "add": "Add"}
        out: list[_Term] = []
        todo = [term]
        while todo:
            t = todo.pop()
            p = _producer(t.value)
            if p is not None and p.op_type == joins[t.kind]:
                todo.extend(_Term(t.kind, i, t.coeff) for i in reversed(p.inputs))
            elif p is not None and p.op_type == "Expand" and shape_safe:
                todo.append(_Term(t.kind, p.inputs[0], t.coeff))
            elif t.kind == "add" and p is not None and p.op_type == "Where":
                leaf = self._where_leaf(t, p)
                if leaf is t:
                    out.append(t)
                else:
                    todo.append(leaf)  # a bool condition: split its And/Or too
            else:
                out.append(t)
        return out

    def _where_leaf(self, t: _Term, where: ir.Node) -> _Term:
        """``Where(c, 0, -inf)`` added to scores is a bool mask; keep other Wheres as floats.
        Only fills that act as -inf convert (dtype minimum or below), so the float and the
        bool form give the same numbers."""
        cond, a, b = where.inputs
        ca, cb = self.consts.scalar(a), self.consts.scalar(b)
        thr = _neg_threshold(t.value.dtype)
        if t.coeff > 0 and ca == 0.0 and cb is not None and cb <= thr:
            return _Term("keep", cond)
        if t.coeff > 0 and cb == 0.0 and ca is not None and ca <= thr:
            return _Term("drop", cond)
        return t

    def _classify(self, leaves: list[_Term], sq: int, sk: int, thr: float,
                  binding=None) -> Optional[str]:
        """'causal', 'none' (attends everywhere) or None for the combined constant leaves."""
        masked = np.zeros((sq, sk), dtype=bool)
        residual = np.zeros((sq, sk), dtype=np.float64)
        for t in leaves:
            a = self.consts.value(t.value, binding)
            if a is None or a.ndim > 4:
                return None
            try:
                a = np.broadcast_to(a, np.broadcast_shapes(a.shape, (sq, sk)))
            except ValueError:
                return None
            if a.shape[-2:] != (sq, sk):
                return None
            if t.kind == "keep":
                m = ~a.astype(bool)
                r = np.zeros(a.shape)
            elif t.kind == "drop":
                m = a.astype(bool)
                r = np.zeros(a.shape)
            else:
                f = t.coeff * a.astype(np.float64)
                m = f <= thr
                r = np.where(m, 0.0, f)
            masked = masked | m
            residual = residual + r
        if not np.all(residual[~np.broadcast_to(masked, residual.shape)] == 0):
            return None
        masked = masked.reshape(-1, sq, sk)
        if not masked.any():
            return "none"
        tri = np.tril(np.ones((sq, sk), dtype=bool))
        if all(np.array_equal(m, ~tri) for m in masked):
            return "causal"
        return None

    def _classify_any(self, leaves: list[_Term], sq, sk, thr: float) -> Optional[str]:
        """Classify at the static sizes; with a dynamic length, at two bindings of every
        symbol to one number. That is only done for self-attention (Sq and Sk the same
        symbol): there top-left and bottom-right causal coincide, so no binding can make a
        different mask look like is_causal."""
        if isinstance(sq, int) and isinstance(sk, int):
            if all(self.consts.is_static(t.value) for t in leaves):
                return self._classify(leaves, sq, sk, thr)
            return None
        if not (isinstance(sq, ir.SymbolicDim) and _same_dim(sq, sk)):
            return None
        kinds = set()
        for n in (5, 8):
            binding = _AllSymbols(n)
            kinds.add(self._classify(leaves, n, n, thr, binding))
        return kinds.pop() if len(kinds) == 1 else None

    def simplify(self, terms: list[_Term], sq, sk,
                 shape_safe: bool) -> tuple[bool, list[_Term]]:
        """Drop constant causal / all-attend parts. Returns (is_causal, remaining terms)."""
        causal = False
        out: list[_Term] = []
        for term in terms:
            leaves = self._leaves(term, shape_safe)
            static = [t for t in leaves if self.consts.is_shape_only(t.value)]
            dynamic = [t for t in leaves if not self.consts.is_shape_only(t.value)]
            kind = self._classify_any(static, sq, sk, _neg_threshold(term.value.dtype)) if static else None
            if kind is None:
                out.extend(leaves)  # the same mask, with -inf-filled float parts as bools
                continue
            causal = causal or kind == "causal"
            out.extend(dynamic)
        return causal, out

    @staticmethod
    def assemble(b: _Builder, terms: list[_Term], dtype: Optional[ir.DataType],
                 q4: ir.Value, k4: ir.Value, scores_rank: int) -> tuple[Optional[ir.Value], str]:
        """One attn_mask from the remaining terms: bool when all parts are bool, else float
        in the query dtype. Made explicit over the query axis, which ORT does not
        broadcast."""
        if not terms:
            return None, "none"
        bools, floats = [], []
        for t in terms:
            if scores_rank == 3:
                # 3-D scores became [N, 1, Sq, Sk]: a 3-D mask part needs that head axis too.
                r = _rank(t.value)
                if r is None:
                    raise _Reject("mask rank unknown for 3-D scores")
                if r == 3:
                    t = _Term(t.kind, b.op("Unsqueeze", [t.value, b.ints([1])]), t.coeff)
            if t.kind == "keep":
                bools.append(t.value if t.value.dtype == ir.DataType.BOOL
                             else b.op("Cast", [t.value], to=ir.DataType.BOOL))
            elif t.kind == "drop":
                c = t.value if t.value.dtype == ir.DataType.BOOL else b.op("Cast", [t.value], to=ir.DataType.BOOL)
                bools.append(b.op("Not", [c]))
            else:
                v = t.value
                if dtype is not None and v.dtype != dtype:
                    v = b.op("Cast", [v], to=dtype)
                if t.coeff != 1.0:
                    v = b.op("Mul", [v, b.scalar_like(t.coeff, dtype)])
                floats.append(v)
        if floats:
            kind = "float"
            parts = floats + [b.op("Where", [c, b.scalar_like(0.0, dtype), b.scalar_like(-math.inf, dtype)])
                              for c in bools]
            join = "Add"
        else:
            kind, parts, join = "bool", bools, "And"
        mask = parts[0]
        for p in parts[1:]:
            mask = b.op(join, [mask, p])
        s = _shape(mask) if len(parts) == 1 and scores_rank == 4 else None
        sq, sk = _shape(q4)[2] if _shape(q4) else None, _shape(k4)[2] if _shape(k4) else None
        explicit = s is not None and len(s) >= 2 and _same_dim(s[-2], sq) and _same_dim(s[-1], sk)
        if not explicit:
            target = b.op("Concat", [b.seq_len(q4), b.seq_len(k4)], axis=0)
            mask = b.op("Expand", [mask, target])
        return mask, kind


# ----------------------------------------------------------------------------------------
# the pass


class _Fuser:
    def __init__(self, model: ir.Model):
        self.model = model
        self.graph = model.graph
        self.consts = _Constants(model)
        self.masks = _Masks(self.consts)
        self.result = OnnxFusionResult()
        self._builder: Optional[_Builder] = None

    def _new_builder(self, anchor: ir.Node) -> _Builder:
        self._builder = _Builder(self.graph, anchor)
        return self._builder

    # -- bookkeeping ----------------------------------------------------------------------

    def _finish(self, b: _Builder, old_outputs: list[tuple[ir.Value, ir.Value]], attn: ir.Node,
                source: str, q4, k4, causal: bool, mask_kind: str, scale: float, softcap: float,
                seeds: list[ir.Node]) -> OnnxSite:
        site_id = f"attn.{len(self.result.sites)}"
        attn.metadata_props["attnforge.site"] = site_id
        # Uses move to the new outputs before the commit, so it sees them as used.
        names = []
        for old, new in old_outputs:
            names.append(old.name)
            old.replace_all_uses_with(new, replace_graph_outputs=True)
        created = {id(n) for n in b.commit()}
        removed = self._remove_dead(seeds)
        # A new output takes the replaced output's name, so graph outputs keep theirs.
        for (old, new), name in zip(old_outputs, names):
            p = new.producer()
            if p is not None and id(p) in created and old.producer().graph is None:
                old.name = None
                new.name = name
        site = OnnxSite(
            id=site_id, node=attn.name, source=source, removed_nodes=removed, module=_module_path(b.anchor),
            q_heads=_int_dim(q4, 1), kv_heads=_int_dim(k4, 1), head_dim=_int_dim(q4, 3),
            is_causal=causal, mask=mask_kind, scale=scale, softcap=softcap,
        )
        self.result.sites.append(site)
        return site

    def _remove_dead(self, seeds: list[ir.Node]) -> list[str]:
        removed: list[str] = []
        todo = list(seeds)
        while todo:
            n = todo.pop()
            if n.graph is not self.graph or any(_used(o) for o in n.outputs):
                continue
            inputs = list(n.inputs)  # safe removal detaches them
            self.graph.remove(n, safe=True)
            removed.append(n.name or n.op_type)
            for i in inputs:
                if i is None:
                    continue
                p = i.producer()
                if p is not None:
                    todo.append(p)
                elif (i.is_initializer() and not i.is_graph_input() and not _used(i)
                      and i.name in self.graph.initializers):
                    del self.graph.initializers[i.name]
        return removed

    def _attention(self, b: _Builder, q4, k4, v4, mask, scale: Optional[float], causal: bool,
                   softcap: float = 0.0, extra: Optional[dict] = None) -> ir.Node:
        idx = len(self.result.sites)
        inputs = [q4, k4, v4] + ([mask] if mask is not None else [])
        attrs = [ir.AttrInt64("is_causal", int(causal))]
        if scale is not None:
            attrs.append(ir.AttrFloat32("scale", float(scale)))
        if softcap:
            attrs.append(ir.AttrFloat32("softcap", float(softcap)))
        for k, v in (extra or {}).items():
            attrs.append(ir.AttrInt64(k, v))
        node = ir.Node("", "Attention", inputs, attrs, num_outputs=1, name=f"attnforge_attn_{idx}")
        b.nodes.append(node)
        return node

    # -- driver ---------------------------------------------------------------------------

    def run(self):
        for node in list(self.graph):
            if node.graph is not self.graph:
                continue  # consumed by an earlier site
            key = (node.domain or "", node.op_type)
            handler = {
                ("", "Softmax"): self.softmax,
                ("ai.onnx", "Softmax"): self.softmax,
                ("", "Attention"): self.onnx_attention,
                ("ai.onnx", "Attention"): self.onnx_attention,
                (_MS, "MultiHeadAttention"): self.ms_multihead,
                (_MS, "Attention"): self.ms_attention,
                (_MS, "GroupQueryAttention"): self.ms_gqa,
            }.get(key)
            if handler is None:
                continue
            self._builder = None
            try:
                handler(node)
            except _Reject as e:
                if self._builder is not None:
                    self._builder.discard()
                self.result.rejected.append((node.name or node.op_type, str(e)))

    # -- Softmax anchors ------------------------------------------------------------------

    def softmax(self, sm: ir.Node):
        x = sm.inputs[0]
        rank = _rank(x)
        if rank is None:
            raise _Reject("softmax input rank unknown")
        axis = sm.attributes.get_int("axis", -1)
        if axis not in (-1, rank - 1):
            raise _Reject(f"softmax over axis {axis}, not the last axis")
        alpha, terms, softcap, qk, upcast = self._walk_scores(x)
        pv, prob_nodes = self._walk_probs(sm)
        if rank not in (3, 4):
            raise _Reject(f"scores have rank {rank}; expected 3 or 4")
        q, kt = qk.inputs
        v = pv.inputs[1]
        for name, t in (("q", q), ("k", kt), ("v", v)):
            if _rank(t) != rank:
                raise _Reject(f"{name} operand rank {_rank(t)} does not match the scores rank {rank}")
        # A mask may broadcast into the scores but not enlarge them: the op's output has the
        # shape q/k/v give. Only a static 1 in the product can be enlarged.
        xs, ss = _shape(x), _shape(qk.outputs[0])
        shape_safe = xs is not None and ss is not None and len(xs) == len(ss) and all(
            not (d == 1 and e != 1) for e, d in zip(xs, ss))
        if terms and not shape_safe:
            raise _Reject("cannot prove the mask keeps the shape of the scores")

        b = self._new_builder(pv)
        q, fq = self._peel_scale(b, q)
        kt, fk = self._peel_scale(b, kt)
        alpha *= fq * fk
        if not alpha > 0:
            raise _Reject(f"scale {alpha} is not positive")
        k = self._untranspose(b, kt)
        # repeat_kv is undone on both k and v or neither: the op has one q-to-kv head map.
        rk, rv = self._unrepeat(k), self._unrepeat(v)
        if rk is not None and rv is not None and rk[1] == rv[1]:
            k, v = rk[0], rv[0]
        if rank == 3:
            q4, k4, v4 = (b.op("Unsqueeze", [t, b.ints([1])]) for t in (q, k, v))
            for t4, t in ((q4, q), (k4, k), (v4, v)):
                s = _shape(t)
                if s is not None:
                    t4.type, t4.shape = t.type, ir.Shape([s[0], 1, *s[1:]])
        else:
            q4, k4, v4 = q, k, v
        self._check_heads(q4, k4, v4)

        causal, terms = self.masks.simplify(terms, xs[-2] if xs else None, xs[-1] if xs else None, shape_safe)
        mask, mask_kind = self.masks.assemble(b, terms, q.dtype, q4, k4, rank)
        # A softmax the model ran in fp32 on half-precision scores stays in fp32.
        low = q.dtype in (ir.DataType.FLOAT16, ir.DataType.BFLOAT16)
        extra = {"softmax_precision": int(ir.DataType.FLOAT)} if upcast and low else None
        attn = self._attention(b, q4, k4, v4, mask, alpha, causal, softcap, extra)
        y = attn.outputs[0]
        old = pv.outputs[0]
        if rank == 3:
            y = b.op("Squeeze", [y, b.ints([1])])
        if old.dtype is not None and q.dtype is not None and old.dtype != q.dtype:
            y = b.op("Cast", [y], to=old.dtype)
        y.type, y.shape = old.type, old.shape
        self._finish(b, [(old, y)], attn, "matmul-softmax", q4, k4, causal, mask_kind, alpha,
                     softcap, [pv, sm, *prob_nodes])

    def _walk_probs(self, sm: ir.Node):
        """Softmax forward to the MatMul with V; returns (pv node, nodes on the way)."""
        cur = sm.outputs[0]
        nodes: list[ir.Node] = []
        while True:
            if cur.is_graph_output():
                raise _Reject("attention probabilities are a graph output")
            uses = list(cur.uses())
            users = {id(n): n for n, _ in uses}
            if len(users) == 2:
                safe = self._safe_softmax_where(cur, list(users.values()))
                if safe is not None:
                    nodes.extend(safe[1])
                    cur = safe[0]
                    continue
            if not uses:
                raise _Reject("attention probabilities are unused")
            if len(uses) != 1:
                raise _Reject("attention probabilities are used elsewhere (e.g. returned as weights)")
            node, idx = uses[0]
            op = node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}.{node.op_type}"
            if op == "MatMul" and idx == 0:
                return node, nodes
            if op == "MatMul":
                raise _Reject("probabilities are the right operand of a MatMul (weights, not values)")
            if op == "Cast" and ir.DataType(node.attributes.get_int("to", 0)).is_floating_point():
                pass
            elif op == "Identity":
                pass
            elif op == "Dropout":
                if not self._dropout_inactive(node):
                    raise _Reject("dropout on attention probabilities may be active (training mode)")
            else:
                raise _Reject(f"probabilities pass through {op}, not a MatMul with values")
            nodes.append(node)
            cur = node.outputs[0]

    def _safe_softmax_where(self, p: ir.Value, users: list[ir.Node]):
        """``Where(IsNaN(p), 0, p)``: torch's safe softmax (zeros for fully masked rows)."""
        isnan = next((u for u in users if u.op_type == "IsNaN"), None)
        where = next((u for u in users if u.op_type == "Where"), None)
        if isnan is None or where is None or len(list(p.uses())) != 2:
            return None
        if where.inputs[0] is not isnan.outputs[0] or where.inputs[2] is not p:
            return None
        if self.consts.scalar(where.inputs[1]) != 0.0 or len(list(isnan.outputs[0].uses())) != 1:
            return None
        if isnan.outputs[0].is_graph_output():
            return None
        return where.outputs[0], [isnan, where]

    def _dropout_inactive(self, node: ir.Node) -> bool:
        """Dropout is the identity unless training_mode is (or may be) true."""
        if len(node.outputs) > 1 and _used(node.outputs[1]):
            return False
        training = _input(node, 2)
        if training is None:
            return True
        t = self.consts.scalar(training)
        return t is not None and t == 0

    def _reaches_qk(self, v: ir.Value, depth: int = 24) -> bool:
        """Does ``v`` lead back, through the ops the scores walk allows, to a MatMul of two
        activations? Used to tell scores from bias at an Add/Sub/Where."""
        todo = [(v, 0)]
        while todo:
            cur, d = todo.pop()
            p = _producer(cur)
            if p is None or d > depth:
                continue
            op = p.op_type
            if op == "MatMul":
                if not self.consts.is_static(p.inputs[0]) and not self.consts.is_static(p.inputs[1]):
                    return True
            elif op in ("Cast", "Identity", "Tanh"):
                todo.append((p.inputs[0], d + 1))
            elif op in ("Mul", "Div"):
                todo.extend((i, d + 1) for i in p.inputs if not self.consts.is_static(i))
            elif op in ("Add", "Sub"):
                todo.extend((i, d + 1) for i in p.inputs)
            elif op == "Where":
                todo.extend((i, d + 1) for i in p.inputs[1:])
        return False

    def _walk_scores(self, x: ir.Value):
        """Softmax input back to q@kᵀ, as ``softmax_in = softcap·tanh(alpha·qk/softcap) + Σ terms``.

        ``alpha`` accumulates every scalar multiplier between the product and the softmax;
        each bias is recorded with the multiplier that applies to it. Returns
        (alpha, terms, softcap, product node, whether the scores were cast to fp32)."""
        alpha = 1.0
        terms: list[_Term] = []
        softcap = 0.0
        upcast = False
        v = x
        for _ in range(64):
            p = v.producer()
            if p is None or p.domain not in ("", "ai.onnx"):
                what = "a graph input" if p is None else f"{p.domain}.{p.op_type}"
                raise _Reject(f"scores come from {what}, not a MatMul")
            op = p.op_type
            if op == "MatMul":
                a, c = p.inputs
                if self.consts.is_static(a) or self.consts.is_static(c):
                    raise _Reject("scores are a product with a constant (a projection, not q@kᵀ)")
                return alpha, terms, softcap, p, upcast
            if op == "Cast":
                to = ir.DataType(p.attributes.get_int("to", 0))
                if not to.is_floating_point():
                    raise _Reject("scores are cast to a non-float type")
                upcast = upcast or to == ir.DataType.FLOAT
                v = p.inputs[0]
            elif op == "Identity":
                v = p.inputs[0]
            elif op in ("Mul", "Div"):
                a, c = p.inputs
                ca, cc = self.consts.scalar(a), self.consts.scalar(c)
                if cc is not None and cc != 0:
                    alpha = alpha * cc if op == "Mul" else alpha / cc
                    v = a
                elif op == "Mul" and ca is not None:
                    alpha *= ca
                    v = c
                else:
                    raise _Reject(f"scores pass through {op} by a non-scalar or non-constant tensor")
            elif op == "Tanh":
                # softcap·tanh(z): everything already collected multiplies tanh.
                if softcap:
                    raise _Reject("two tanh soft-caps on the scores")
                softcap = alpha
                v = p.inputs[0]
            elif op in ("Add", "Sub"):
                if softcap:
                    raise _Reject("a bias inside the tanh soft-cap is not expressible")
                a, c = p.inputs
                ra, rc = self._reaches_qk(a), self._reaches_qk(c)
                if ra == rc:
                    raise _Reject("cannot tell scores from bias at " + op)
                if op == "Sub" and rc:
                    raise _Reject("scores are subtracted (negated)")
                scores, bias = (a, c) if ra else (c, a)
                terms.append(_Term("add", bias, alpha if op == "Add" else -alpha))
                v = scores
            elif op == "Where":
                if softcap:
                    raise _Reject("a mask inside the tanh soft-cap is not expressible")
                cond, a, c = p.inputs
                ca, cc = self.consts.scalar(a), self.consts.scalar(c)
                # masked_fill with a finite fill attends nowhere else either, as long as the
                # fill is far below any score; only fully masked rows differ (documented).
                thr = _neg_threshold(p.outputs[0].dtype)
                if cc is not None and cc <= thr and not self.consts.is_static(a):
                    terms.append(_Term("keep", cond))
                    v = a
                elif ca is not None and ca <= thr and not self.consts.is_static(c):
                    terms.append(_Term("drop", cond))
                    v = c
                else:
                    raise _Reject("Where on the scores is not a mask with a large negative fill")
            else:
                raise _Reject(f"scores pass through {op}")
        raise _Reject("scores chain too long")

    def _peel_scale(self, b: _Builder, v: ir.Value) -> tuple[ir.Value, float]:
        """Move scalar Mul/Div on an operand into the scale, also from below layout ops
        (Transpose/Reshape/...), which are re-applied to the unscaled value."""
        factor = 1.0
        chain: list[ir.Node] = []  # layout nodes between v and cur, innermost first
        cur = v
        best = (v, [], 1.0)
        for _ in range(16):
            p = _producer(cur)
            if p is None:
                break
            if p.op_type in ("Mul", "Div"):
                a, c = p.inputs
                ca, cc = self.consts.scalar(a), self.consts.scalar(c)
                if cc is not None and cc != 0:
                    factor = factor * cc if p.op_type == "Mul" else factor / cc
                    cur = a
                elif p.op_type == "Mul" and ca is not None:
                    factor *= ca
                    cur = c
                else:
                    break
                best = (cur, list(chain), factor)
            elif p.op_type in _LAYOUT_OPS and all(self.consts.is_static(i) for i in p.inputs[1:]):
                chain.insert(0, p)
                cur = p.inputs[0]
            else:
                break
        base, chain, factor = best
        if base is v:
            return v, 1.0
        out = base
        for node in chain:
            out = b.op(node.op_type, [out, *node.inputs[1:]],
                       **{k: a.value for k, a in node.attributes.items()})
            out.type, out.shape = node.outputs[0].type, node.outputs[0].shape
        return out, factor

    def _untranspose(self, b: _Builder, kt: ir.Value) -> ir.Value:
        """K from the product's right operand kᵀ (…, D, Sk), folding away the transposes that
        produced it: a Transpose, or the SDPA decomposition's Reshape·Transpose·Reshape."""
        rank = _rank(kt)
        swap = _swap_last(rank)
        p = _producer(kt, "Transpose")
        if p is not None:
            perm = list(p.attributes.get_ints("perm", list(range(rank))[::-1]))
            full = _compose(perm, swap)
            src = p.inputs[0]
            if full == list(range(rank)):
                return src
            out = b.op("Transpose", [src], perm=full)
            s = _shape(src)
            if s is not None:
                out.shape = ir.Shape([s[i] for i in full])
                out.type = src.type
            return out
        k4 = self._sdpa_untranspose(b, kt)
        if k4 is not None:
            return k4
        out = b.op("Transpose", [kt], perm=swap)
        s = _shape(kt)
        if s is not None:
            out.shape = ir.Shape([s[i] for i in swap])
            out.type = kt.type
        return out

    @staticmethod
    def _sdpa_untranspose(b: _Builder, kt: ir.Value) -> Optional[ir.Value]:
        """Reshape(Transpose(Reshape(k, [B*H, S, D]), (0, 2, 1)), [B, H, D, S]) is kᵀ of k
        [B, H, S, D]. When the flattened k is not itself a value (torch merges the repeat_kv
        view into the flattening), k is re-formed with one Reshape of the same source."""
        r2 = _producer(kt, "Reshape")
        t = _producer(r2.inputs[0], "Transpose") if r2 else None
        if t is None or list(t.attributes.get_ints("perm", [])) != [0, 2, 1]:
            return None
        r1 = _producer(t.inputs[0], "Reshape")
        if r1 is None:
            return None
        k, flat, out = r1.inputs[0], _shape(r1.outputs[0]), _shape(kt)
        if flat is None or out is None or len(out) != 4 or len(flat) != 3:
            return None
        if not (_same_dim(flat[1], out[3]) and _same_dim(flat[2], out[2])):
            return None
        ks = _shape(k)
        if ks is not None and len(ks) == 4 and all(_same_dim(a, c) for a, c in
                                                  ((ks[0], out[0]), (ks[1], out[1]), (ks[2], out[3]), (ks[3], out[2]))):
            return k
        dims = [out[0], out[1], out[3], out[2]]
        if not all(isinstance(d, int) for d in dims):
            return None
        k4 = b.op("Reshape", [k, b.ints(dims)])
        k4.type, k4.shape = kt.type, ir.Shape(dims)
        return k4

    def _unrepeat(self, x: ir.Value):
        """repeat_kv: Reshape(Expand(Unsqueeze(k, 2), [B, Hkv, n, S, D]), [B, Hkv*n, S, D]).
        Returns (k, Hkv), or None when ``x`` is not such a repeat."""
        r = _producer(x, "Reshape")
        e = _producer(r.inputs[0], "Expand") if r else None
        u = _producer(e.inputs[0], "Unsqueeze") if e else None
        if u is None:
            return None
        axes = self.consts.value(u.inputs[1]) if len(u.inputs) > 1 else None
        axes = axes.tolist() if axes is not None else list(u.attributes.get_ints("axes", []))
        k = u.inputs[0]
        ks, xs = _shape(k), _shape(x)
        if axes not in ([2], 2) or ks is None or xs is None or len(ks) != 4 or len(xs) != 4:
            return None
        # The expanded shape: from shape inference, or from the constant target shape.
        es = _shape(e.outputs[0])
        target = self.consts.value(e.inputs[1])
        if target is not None and target.size == 5:
            es = [t if t != 1 else d for t, d in zip(target.tolist(), [ks[0], ks[1], 1, ks[2], ks[3]])]
        if es is None or len(es) != 5:
            return None
        hkv, n, hq = ks[1], es[2], xs[1]
        if not (isinstance(hkv, int) and isinstance(n, int) and isinstance(hq, int) and hq == hkv * n):
            return None
        if not all(_same_dim(a, c) for a, c in ((ks[0], xs[0]), (ks[2], xs[2]), (ks[3], xs[3]))):
            return None
        return k, hkv

    @staticmethod
    def _check_heads(q4, k4, v4):
        """The op maps q head h to kv head h // (Hq/Hkv) and needs one batch for all three;
        MatMul broadcasting that does anything else is not expressible."""
        qs, ks, vs = _shape(q4), _shape(k4), _shape(v4)
        if qs is None or ks is None or vs is None:
            return
        for a, c, what in ((qs[0], ks[0], "k batch"), (qs[0], vs[0], "v batch"), (ks[1], vs[1], "k/v heads"),
                           (ks[2], vs[2], "k/v length"), (qs[3], ks[3], "q/k head size")):
            if isinstance(a, int) and isinstance(c, int) and a != c:
                raise _Reject(f"{what} broadcast ({a} vs {c}) is not expressible")
        hq, hkv = qs[1], ks[1]
        if isinstance(hq, int) and isinstance(hkv, int) and hq % hkv:
            raise _Reject(f"{hq} query heads are not a multiple of {hkv} key/value heads")

    # -- fused anchors --------------------------------------------------------------------

    def _head_inputs(self, b: _Builder, x: ir.Value, heads: Optional[int], what: str) -> ir.Value:
        r = _rank(x)
        if r == 4:
            return x
        if r == 3:
            if not heads:
                raise _Reject(f"3-D {what} needs a head count")
            out = b.op("Reshape", [x, b.ints([0, 0, heads, -1])])
            out = b.op("Transpose", [out], perm=[0, 2, 1, 3])
            s = _shape(x)
            if s is not None:
                d = s[2] // heads if isinstance(s[2], int) else None
                out.shape = ir.Shape([s[0], heads, s[1], d])
                out.type = x.type
            return out
        raise _Reject(f"{what} has rank {r}; expected 3 or 4")

    @staticmethod
    def _default_scale(q4) -> Optional[float]:
        d = _int_dim(q4, 3)
        return 1.0 / math.sqrt(d) if d else None

    def _emit_fused(self, node: ir.Node, source: str, b: _Builder, q4, k4, v4, terms: list[_Term],
                    causal: bool, scale: Optional[float], softcap: float, out3: bool,
                    extra_outputs: list[tuple[ir.Value, ir.Value]] = (), extra_attrs=None):
        qs, ks = _shape(q4), _shape(k4)
        found, terms = self.masks.simplify(terms, qs[2] if qs else None, ks[2] if ks else None, True)
        causal = causal or found
        dtype = q4.dtype
        mask, kind = self.masks.assemble(b, terms, dtype, q4, k4, 4)
        if scale is None:
            scale = self._default_scale(q4)
        attn = self._attention(b, q4, k4, v4, mask, scale, causal, softcap, extra_attrs)
        y = attn.outputs[0]
        old = node.outputs[0]
        if out3:
            y = b.merge_heads(y)
        y.type, y.shape = old.type, old.shape
        self._finish(b, [(old, y), *extra_outputs], attn, source, q4, k4, causal, kind,
                     scale if scale is not None else float("nan"), softcap, [node])

    def onnx_attention(self, node: ir.Node):
        if any(_input(node, i) is not None for i in (4, 5)):
            raise _Reject("past_key/past_value (KV cache) are not normalized")
        if any(_input(node, i) is not None for i in range(6, len(node.inputs))):
            raise _Reject("nonpad_kv_seqlen is not normalized")
        if any(_used(o) for o in node.outputs[1:]):
            raise _Reject("present_key/present_value/qk_matmul_output are used")
        q, k, v, m = (_input(node, i) for i in range(4))
        attrs = node.attributes
        hq, hkv = attrs.get_int("q_num_heads", 0), attrs.get_int("kv_num_heads", 0)
        b = self._new_builder(node)
        out3 = _rank(q) == 3
        q4 = self._head_inputs(b, q, hq, "Q")
        k4 = self._head_inputs(b, k, hkv, "K")
        v4 = self._head_inputs(b, v, hkv, "V")
        rk, rv = self._unrepeat(k4), self._unrepeat(v4)
        if rk is not None and rv is not None and rk[1] == rv[1]:
            k4, v4 = rk[0], rv[0]  # the exporter's repeat_kv: the op does GQA natively
        terms = []
        if m is not None:
            terms.append(_Term("keep", m) if m.dtype == ir.DataType.BOOL else _Term("add", m))
        scale = attrs.get_float("scale", 0.0) if "scale" in attrs else None
        extra = {"softmax_precision": attrs.get_int("softmax_precision", 0)} \
            if attrs.get_int("softmax_precision", 0) else None
        self._emit_fused(node, "ai.onnx.Attention", b, q4, k4, v4, terms, bool(attrs.get_int("is_causal", 0)),
                         scale, attrs.get_float("softcap", 0.0), out3, extra_attrs=extra)

    def _padding_term(self, b: _Builder, mask: ir.Value, fill: float, dtype, batch, k4, q3,
                      what: str) -> _Term:
        """onnxruntime's key padding / mask_index (1 attends, 0 adds ``fill``) as a float term,
        so the numbers match the contrib op exactly."""
        r = _rank(mask)
        zero, neg = b.scalar_like(0.0, dtype), b.scalar_like(fill, dtype)
        if r == 1:
            n = _int_dim(mask, 0)
            if n is None or batch is None or n != batch:
                raise _Reject(f"{what} of shape {_shape(mask)} (start/end positions) is not normalized")
            # [B] lengths: keys at or past the length are masked
            t = b.op("Squeeze", [b.seq_len(k4), b.ints([0])])
            pos = b.op("Range", [b.ints(0), t, b.ints(1)])
            lens = b.op("Unsqueeze", [b.op("Cast", [mask], to=ir.DataType.INT64), b.ints([1])])
            keep = b.op("Less", [pos, lens])
            add = b.op("Where", [keep, zero, neg])
            return _Term("add", b.op("Unsqueeze", [add, b.ints([1, 2])]))
        if r in (2, 3):
            masked = b.op("Equal", [mask, b.const(np.zeros((), dtype=mask.dtype.numpy()))])
            add = b.op("Where", [masked, neg, zero])
            return _Term("add", b.op("Unsqueeze", [add, b.ints([1, 2] if r == 2 else [1])]))
        raise _Reject(f"{what} of rank {r} is not normalized")

    def ms_multihead(self, node: ir.Node):
        if any(_input(node, i) is not None for i in range(6, len(node.inputs))):
            raise _Reject("past key/value or cache inputs (decoding form) are not normalized")
        if any(_used(o) for o in node.outputs[1:]):
            raise _Reject("present key/value or qk outputs are used")
        q, k, v, bias, kpm, ab = (_input(node, i) for i in range(6))
        attrs = node.attributes
        heads = attrs.get_int("num_heads", 0)
        if k is None or v is None:
            raise _Reject("packed QKV query is not normalized")
        if _rank(q) != 3 or _rank(k) not in (3, 4) or _rank(v) not in (3, 4):
            raise _Reject(f"query/key/value ranks {_rank(q)}/{_rank(k)}/{_rank(v)} are not the 3-D separate form")
        b = self._new_builder(node)
        if bias is not None:
            if _rank(k) != 3:
                raise _Reject("bias with 4-D key is not normalized")
            sizes = [_int_dim(t, 2) for t in (q, k, v)]
            if None in sizes:
                raise _Reject("bias needs static hidden sizes")
            bq, bk, bv = b.op("Split", [bias, b.ints(sizes)], num_outputs=3, axis=0)
            q, k, v = b.op("Add", [q, bq]), b.op("Add", [k, bk]), b.op("Add", [v, bv])
            for new, old in ((q, node.inputs[0]), (k, node.inputs[1]), (v, node.inputs[2])):
                new.type, new.shape = old.type, old.shape
        q4 = self._head_inputs(b, q, heads, "query")
        k4 = self._head_inputs(b, k, heads, "key")
        v4 = self._head_inputs(b, v, heads, "value")
        fill = attrs.get_float("mask_filter_value", -10000.0)
        terms = []
        if kpm is not None:
            terms.append(self._padding_term(b, kpm, fill, q.dtype, _int_dim(q, 0), k4, q, "key_padding_mask"))
        if ab is not None:
            terms.append(_Term("add", ab))
        scale = attrs.get_float("scale", 0.0) or None
        self._emit_fused(node, f"{_MS}.MultiHeadAttention", b, q4, k4, v4, terms,
                         bool(attrs.get_int("unidirectional", 0)), scale, 0.0, True)

    def ms_attention(self, node: ir.Node):
        attrs = node.attributes
        if _input(node, 4) is not None or _input(node, 6) is not None:
            raise _Reject("past state (decoding form) is not normalized")
        if any(_used(o) for o in node.outputs[1:]):
            raise _Reject("present state output is used")
        if attrs.get_int("do_rotary", 0):
            raise _Reject("do_rotary=1 is not normalized")
        x, w, bias, mask, ab = (_input(node, i) for i in (0, 1, 2, 3, 5))
        heads = attrs.get_int("num_heads", 0)
        if _rank(x) != 3:
            raise _Reject(f"input of rank {_rank(x)} is not normalized")
        sizes = list(attrs.get_ints("qkv_hidden_sizes", []))
        if not sizes:
            total = _int_dim(w, 1)
            if total is None or total % 3:
                raise _Reject("weights width unknown; cannot split Q/K/V")
            sizes = [total // 3] * 3
        b = self._new_builder(node)
        # Packed projection as the contrib op computes it: x @ W + bias, then Q|K|V.
        qkv = b.op("MatMul", [x, w])
        if bias is not None:
            qkv = b.op("Add", [qkv, bias])
        q, k, v = b.op("Split", [qkv, b.ints(sizes)], num_outputs=3, axis=2)
        xs = _shape(x)
        for t, d in zip((q, k, v), sizes):
            t.type = x.type
            if xs is not None:
                t.shape = ir.Shape([xs[0], xs[1], d])
        q4 = self._head_inputs(b, q, heads, "Q")
        k4 = self._head_inputs(b, k, heads, "K")
        v4 = self._head_inputs(b, v, heads, "V")
        terms = []
        if mask is not None:
            if _rank(mask) == 4:
                raise _Reject("4-D (Megatron) mask_index is not normalized")
            terms.append(self._padding_term(b, mask, attrs.get_float("mask_filter_value", -10000.0),
                                            x.dtype, _int_dim(x, 0), k4, x, "mask_index"))
        if ab is not None:
            terms.append(_Term("add", ab))
        scale = attrs.get_float("scale", 0.0) or None
        self._emit_fused(node, f"{_MS}.Attention", b, q4, k4, v4, terms,
                         bool(attrs.get_int("unidirectional", 0)), scale, 0.0, True)

    def ms_gqa(self, node: ir.Node):
        attrs = node.attributes
        if _input(node, 3) is not None or _input(node, 4) is not None:
            raise _Reject("past_key/past_value (decoding form) are not normalized")
        if attrs.get_int("do_rotary", 0):
            raise _Reject("do_rotary=1 is not normalized")
        if attrs.get_int("local_window_size", -1) != -1:
            raise _Reject("local_window_size (sliding window) is not normalized")
        if attrs.get_int("smooth_softmax", 0) or _input(node, 11) is not None:
            raise _Reject("smooth softmax / head_sink is not normalized")
        if attrs.get_int("qk_output", 0) or (len(node.outputs) > 3 and _used(node.outputs[3])):
            raise _Reject("qk output is used")
        q, k, v, seqlens, total, ab = (_input(node, i) for i in (0, 1, 2, 5, 6, 10))
        if any(_input(node, i) is not None for i in (7, 8, 9)):
            raise _Reject("rotary inputs are not normalized")
        hq, hkv = attrs.get_int("num_heads", 0), attrs.get_int("kv_num_heads", 0)
        if _rank(q) != 3:
            raise _Reject(f"query of rank {_rank(q)} is not normalized")
        b = self._new_builder(node)
        if k is None:
            width = _int_dim(q, 2)
            if width is None or not hq or not hkv or width % (hq + 2 * hkv):
                raise _Reject("packed QKV of unknown width")
            d = width // (hq + 2 * hkv)
            q, k, v = b.op("Split", [q, b.ints([hq * d, hkv * d, hkv * d])], num_outputs=3, axis=2)
            qs = _shape(node.inputs[0])
            for t, n in zip((q, k, v), (hq, hkv, hkv)):
                t.type, t.shape = node.inputs[0].type, ir.Shape([qs[0], qs[1], n * d])
        q4 = self._head_inputs(b, q, hq, "query")
        k4 = self._head_inputs(b, k, hkv, "key")
        v4 = self._head_inputs(b, v, hkv, "value")
        s = _int_dim(q, 1)
        extra = []
        present = [o for o in node.outputs[1:3] if _used(o)]
        if present:
            # Without past, present key/value are the new K/V, if the cache is not longer.
            tot = self.consts.scalar(total)
            if tot is None or s is None or int(tot) != s:
                raise _Reject("present_key/present_value are used and total_sequence_length is not the input length")
            extra = [(o, t) for o, t in zip(node.outputs[1:3], (k4, v4)) if _used(o)]
            for o, t in extra:
                t.type, t.shape = o.type or t.type, o.shape or t.shape
        terms = []
        lens = self.consts.value(seqlens)
        if lens is None or s is None or not np.all(lens == s - 1):
            # keys past seqlens_k[b] are padding: keep[b, j] = j <= seqlens_k[b]
            t = b.op("Squeeze", [b.seq_len(k4), b.ints([0])])
            pos = b.op("Range", [b.ints(0), t, b.ints(1)])
            ends = b.op("Unsqueeze", [b.op("Cast", [seqlens], to=ir.DataType.INT64), b.ints([1, 2, 3])])
            terms.append(_Term("keep", b.op("LessOrEqual", [pos, ends])))
        if ab is not None:
            terms.append(_Term("add", ab))
        scale = attrs.get_float("scale", 0.0) or None
        self._emit_fused(node, f"{_MS}.GroupQueryAttention", b, q4, k4, v4, terms, True, scale,
                         attrs.get_float("softcap", 0.0), True, extra_outputs=extra)


# ----------------------------------------------------------------------------------------
# entry point


def _load(model: onnx.ModelProto) -> ir.Model:
    if not isinstance(model, onnx.ModelProto):
        raise InputError(f"fuse_onnx_attention expects an onnx.ModelProto, got {type(model).__name__}")
    try:
        m = ir.serde.deserialize_model(model)
    except Exception as e:
        raise InputError(f"the ONNX model could not be read: {str(e).splitlines()[0]}") from None
    # Shapes tell layouts, head counts and mask broadcasting apart; a model onnx cannot
    # infer still goes through, with fewer sites proven.
    try:
        m = ShapeInferencePass(strict_mode=False)(m).model
    except Exception:
        pass
    return m


def _to_target_opset(m: ir.Model):
    current = m.opset_imports.get("", m.opset_imports.get("ai.onnx"))
    if current is None:
        m.opset_imports[""] = TARGET_OPSET
        return
    if current >= TARGET_OPSET:
        return
    try:
        version_converter.convert_version(m, TARGET_OPSET, fallback=True)
    except Exception as e:
        raise InputError(f"cannot convert the model from opset {current} to {TARGET_OPSET}: "
                         f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    if m.opset_imports.get("", 0) < TARGET_OPSET:
        raise InputError(f"cannot convert the model from opset {current} to {TARGET_OPSET}")


def fuse_onnx_attention(model: onnx.ModelProto) -> tuple[onnx.ModelProto, OnnxFusionResult]:
    """Rewrite every dense attention subgraph of ``model`` into one ai.onnx ``Attention``
    (opset 23) node. The input model is not modified."""
    t0 = time.perf_counter()
    m = _load(model)
    _to_target_opset(m)
    fuser = _Fuser(m)
    fuser.run()
    out = ir.serde.serialize_model(m)
    out.ir_version = MAX_IR_VERSION
    fuser.result.seconds = time.perf_counter() - t0
    return out, fuser.result
