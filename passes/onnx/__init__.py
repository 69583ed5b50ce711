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

from passes.onnx.common import MAX_IR_VERSION, TARGET_OPSET, OnnxFusionResult, OnnxSite
from passes.onnx.fuser import fuse_onnx_attention

__all__ = ["MAX_IR_VERSION", "TARGET_OPSET", "OnnxFusionResult", "OnnxSite", "fuse_onnx_attention"]
