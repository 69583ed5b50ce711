"""ONNX attention fusion: every dense attention subgraph of an ONNX model becomes one standard
``Attention`` node (ai.onnx, opset 23). The pass lives in the ``passes.onnx`` package, split by
concern (common, evaluation, builder, masks, fuser, fused_op_rules); this name stays importable."""

from passes.onnx import MAX_IR_VERSION, TARGET_OPSET, OnnxFusionResult, OnnxSite, fuse_onnx_attention

__all__ = ["MAX_IR_VERSION", "TARGET_OPSET", "OnnxFusionResult", "OnnxSite", "fuse_onnx_attention"]
