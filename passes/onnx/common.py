"""The ONNX front end's vocabulary: target opset, site records, small helpers on onnx_ir values."""

from __future__ import annotations

import ast
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import onnx_ir as ir

from compiler.ir.masks import neg_inf_threshold


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
    """Fill values at or below this act as -inf (compiler.ir.masks, shared with the PyTorch front end)."""
    try:
        return neg_inf_threshold(dtype.numpy())
    except Exception:
        return neg_inf_threshold(np.float32)
