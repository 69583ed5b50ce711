"""What each backend can run, where, and what moving a value between backends costs.

The planner asks ``supports(backend, node)`` per node of the rewritten program. A node a
backend cannot run goes to ``torch``, which runs everything (the reference ops included).
"""

from __future__ import annotations

import functools
import operator
import os
from dataclasses import dataclass

import torch

from compiler.reference.linear_ops import LINEAR_ATTENTION
from compiler.ir.ops import ATTENTION_OPS, runs_fused_kernel
from compiler.reference.sparse_ops import SPARSE_ATTENTION

OUR_OPS = (ATTENTION_OPS[0], SPARSE_ATTENTION, LINEAR_ATTENTION)


@dataclass(frozen=True)
class Capability:
    backend: str
    device: str
    runs_everything: bool = False
    shares_torch_memory: bool = False  # values cross to and from torch without a copy
    attention_only: bool = False  # runs our attention ops by design; the rest on torch is no fallback


CAPABILITIES = {
    "torch": Capability("torch", "cpu", runs_everything=True),
    "onnxruntime": Capability("onnxruntime", "cpu"),
    "triton": Capability("triton", "cuda", shares_torch_memory=True, attention_only=True),
}

# A value moving between backends on one host: a copy at memory bandwidth plus a fixed cost for
# leaving one runtime and entering the other (session.run / kernel launch and synchronisation).
COPY_BYTES_PER_US = 5_000.0  # ~5 GB/s: a conservative single-stream host memcpy
SWITCH_US = 30.0


def interpreting() -> bool:
    """Whether Triton kernels run in Triton's CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def segment_device(segment_backend: str, plan_backend: str) -> str:
    """Where a segment's values live: torch runs beside Triton on its GPU, and Triton's
    interpreter runs on the host."""
    if plan_backend == "triton":
        return "cpu" if interpreting() else "cuda"
    return CAPABILITIES[segment_backend].device


def transition_cost_us(nbytes: int, src: str, dst: str) -> float:
    copies = not (CAPABILITIES[src].shares_torch_memory or CAPABILITIES[dst].shares_torch_memory)
    return SWITCH_US + (nbytes / COPY_BYTES_PER_US if copies else 0.0)


@functools.lru_cache(maxsize=1)
def _onnx_registry():
    """The dynamo exporter's own table of ATen ops with an ONNX translation (torchlib)."""
    import logging

    from torch.onnx._internal.exporter import _registration

    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    return _registration.ONNXRegistry.from_torchlib()


@functools.lru_cache(maxsize=1)
def _assertions() -> frozenset:
    a = torch.ops.aten
    return frozenset({a.sym_constrain_range_for_size.default, a._assert_async.default, a._assert_async.msg,
                      a._assert_scalar.default, a._assert_tensor_metadata.default})


def prepare(ep, backend: str):
    """The program as the backend's lowering will see it: for ONNX, decomposed by the exporter's own
    table first, so placement judges the ops the exporter translates, not the ones it decomposes."""
    if backend != "onnxruntime":
        return ep
    from torch.onnx._internal.exporter import _fx_passes

    from backends.onnx_export import carry_site_ids

    out = _fx_passes.decompose_with_registry(ep, _onnx_registry())
    carry_site_ids(ep.graph, out.graph)
    return out


def _onnx_translates(target) -> bool:
    if target in OUR_OPS or target in _assertions():
        return True  # the exporter drops assertions
    if getattr(target, "__module__", None) in ("_operator", "operator") or target is operator.getitem:
        return True  # shape arithmetic and tuple access: the exporter handles them itself
    try:
        return bool(_onnx_registry().is_registered(target))
    except Exception:  # noqa: BLE001 - a private table that moved: assume nothing, the export decides
        return False


def supports(backend: str, node: torch.fx.Node, extra_unsupported: frozenset = frozenset()) -> bool:
    """Whether ``backend`` can run ``node`` (a call_function of the rewritten program).

    ``extra_unsupported``: targets an attempted lowering already refused, by name.
    """
    cap = CAPABILITIES[backend]
    if cap.runs_everything:
        return True
    if node.op != "call_function" or str(node.target) in extra_unsupported:
        return False
    if backend == "onnxruntime":
        return _onnx_translates(node.target)
    if backend == "triton":
        return node.target in OUR_OPS
    return False


def _argument(node: torch.fx.Node, name: str):
    """An argument of an OpOverload call by its schema name, positional or keyword."""
    for i, a in enumerate(node.target._schema.arguments):
        if a.name == name:
            return node.args[i] if i < len(node.args) else node.kwargs.get(name, a.default_value)
    return None


def _score_bytes(node: torch.fx.Node) -> int:
    q, k = node.args[0].meta.get("val"), node.args[1].meta.get("val")
    if q is None or k is None:
        return 0
    b, h, sq, sk = (int(size_hint(x)) for x in (q.shape[0], q.shape[1], q.shape[2], k.shape[2]))
    return b * h * sq * sk * 4


def size_hint(x) -> int:
    """A size, symbolic or not, at its example value."""
    if isinstance(x, int):
        return x
    node = getattr(x, "node", None)
    if node is not None and node.hint is not None:
        return int(node.hint)
    return int(node.shape_env.size_hint(node.expr))


def numel_hint(shape) -> int:
    numel = 1
    for d in shape:
        numel *= size_hint(d)
    return numel


def op_name(node) -> str:
    """The ATen (or custom) op's name without namespace or overload ("permute"), or "" if none."""
    schema = getattr(getattr(node, "target", None), "_schema", None)
    return schema.name.split("::")[-1] if schema is not None else ""


def _ort_fused_lowering(node: torch.fx.Node) -> str:
    """The lowering the ONNX export will choose for an exact site on CPU (same table)."""
    from backends.onnx_attention import FusedFeatures, choose_fused

    q, k = node.args[0].meta["val"], node.args[1].meta["val"]
    mask = _argument(node, "mask")
    mask_val = mask.meta.get("val") if isinstance(mask, torch.fx.Node) else None
    feats = FusedFeatures(
        causal=bool(_argument(node, "is_causal")),
        mask="none" if mask_val is None else ("bool" if mask_val.dtype == torch.bool else "float"),
        softcap=float(_argument(node, "softcap") or 0.0) > 0.0,
        grouped=q.shape[1] != k.shape[1],
        square=q.shape[2] == k.shape[2],
        dtype=str(q.dtype).replace("torch.", ""),
        head_dim=q.shape[3] if isinstance(q.shape[3], int) else None)
    return choose_fused(feats, "CPUExecutionProvider")


# Memory ORT's CPU attention kernels hold while they run, beyond inputs and output, in fp32
# score tensors (B*H*Sq*Sk*4 bytes), (causal, bidirectional); measured on ORT 1.31.1 with
# ``backends.memory_probe`` (B=8, H=12, S=512, D=32). The contrib ops also hold packed
# [B, S, H*D] copies of q, k, v and of their output.
ORT_WORKSPACE = {"attention": (2.2, 1.06), "gqa": (1.12, 1.12), "mha": (2.4, 0.1)}
PACKED_LOWERINGS = {"gqa", "mha"}


_TRANSPOSES = {"permute", "transpose"}


def _is_transpose(node) -> bool:
    return isinstance(node, torch.fx.Node) and node.op == "call_function" and op_name(node) in _TRANSPOSES


def _packing_copies(node: torch.fx.Node) -> int:
    """Packed [B, S, H*D] copies a contrib-op lowering makes: one per distinct q/k/v and one for the
    output, except where the value is itself a transpose of that layout (ORT cancels the pair)."""
    inputs = {a for a in node.args[:3] if isinstance(a, torch.fx.Node)}
    copies = sum(not _is_transpose(a) for a in inputs)
    if not node.users or not all(_is_transpose(u) for u in node.users):
        copies += 1
    return copies


def workspace_bytes(node: torch.fx.Node, backend: str) -> int:
    """Memory an attention op holds only while it runs.

    torch runs our reference ops, which materialise the fp32 scores and the probabilities (and
    a masked copy when there is a mask or causality), except exact attention with no mask or
    softcap: PyTorch's fused kernel, whose only temporary is its output in a transposed layout
    before the contiguous copy. On ORT, exact sites take their
    lowering's measured factor; sparse and linear lowerings hold only the kept scores, which
    the plan leaves out (they are small next to the values around them).
    """
    if node.op != "call_function" or node.target not in OUR_OPS:
        return 0
    causal = bool(_argument(node, "is_causal"))
    masked = _argument(node, "mask") is not None
    scores = _score_bytes(node)
    if backend != "onnxruntime":
        if node.target == ATTENTION_OPS[0] and runs_fused_kernel(_argument(node, "mask"), _argument(node, "softcap")):
            q = node.args[0].meta["val"]
            return numel_hint(q.shape) * q.element_size()
        return int((3.0 if causal or masked else 2.0) * scores)
    if node.target != ATTENTION_OPS[0]:
        return 0
    lowering = _ort_fused_lowering(node)
    q = node.args[0].meta["val"]
    packed = _packing_copies(node) * numel_hint(q.shape) * q.element_size() if lowering in PACKED_LOWERINGS else 0
    # GQA takes a mask as a float attention_bias with a row per query: one score tensor per head.
    bias = scores // size_hint(q.shape[1]) if lowering == "gqa" and masked else 0
    return int(ORT_WORKSPACE[lowering][0 if causal else 1] * scores) + packed + bias
