"""The end-to-end peers of tools/bench_onnx.py: a model exported with torch's dynamo and legacy
exporters, then optimized by onnxscript's ort_fusions or onnxruntime.transformers' optimizer;
each file built once per model and kept, failures too."""

from __future__ import annotations

from pathlib import Path

import torch

from ort_session import quiet

INPUT_NAMES = ["input_ids", "attention_mask"]


class LastHidden(torch.nn.Module):
    """(input_ids, attention_mask) -> last_hidden_state: one tensor in, one out, for every exporter."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask):
        return self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state


def export_dynamo(model, args, path: Path, dynamic: bool = False) -> Path:
    shapes = None
    if dynamic:
        seq = torch.export.Dim("seq", min=2, max=1 << 16)
        shapes = ({1: seq}, {1: seq})
    with quiet():
        prog = torch.onnx.export(model, args, dynamo=True, verbose=False, input_names=INPUT_NAMES,
                                 output_names=["last_hidden_state"], dynamic_shapes=shapes)
        prog.save(str(path))
    model.eval()
    return path


def export_legacy(model, args, path: Path, dynamic: bool = False) -> Path:
    axes = {n: {1: "seq"} for n in (*INPUT_NAMES, "last_hidden_state")} if dynamic else None
    with quiet():
        torch.onnx.export(model, args, str(path), dynamo=False, opset_version=17, input_names=INPUT_NAMES,
                          output_names=["last_hidden_state"], dynamic_axes=axes)
    model.eval()  # the legacy exporter puts back the top module's mode with train(), on every submodule
    return path


def ort_fusions(src: Path, dst: Path) -> tuple[Path, str]:
    import onnx_ir as ir
    from onnxscript.rewriter.ort_fusions import optimize_for_ort

    with quiet():
        model, counts = optimize_for_ort(ir.load(str(src)))
        ir.save(model, str(dst))
    found = " ".join(f"{k}={v}" for k, v in counts.items() if v) or "no fusions"
    return dst, f"ort_fusions: {found}"


def transformers_optimizer(src: Path, dst: Path, model_type: str, num_heads: int, hidden: int) -> tuple[Path, str]:
    from onnxruntime.transformers import optimizer

    with quiet():
        opt = optimizer.optimize_model(str(src), model_type=model_type, num_heads=num_heads, hidden_size=hidden)
        opt.save_model_to_file(str(dst))
    stats = opt.get_fused_operator_statistics()
    attn = sum(v for k, v in stats.items() if "Attention" in k)
    others = " ".join(f"{k}={v}" for k, v in stats.items() if v and "Attention" not in k)
    return dst, f"fused attention nodes={attn}; {others}"


class Exports:
    """One model's ONNX files for the ORT peers, each built on first use and kept (failures too).

    ``dynamic``: exported once with a dynamic sequence axis (from ``args``) and reused at every length."""

    def __init__(self, model, args: tuple, tmp: Path, tag: str, model_type: str, heads: int, hidden: int,
                 dynamic: bool = False):
        self.model, self.args, self.tmp, self.tag, self.dynamic = model, args, tmp, tag, dynamic
        self.model_type, self.heads, self.hidden = model_type, heads, hidden
        self.done: dict = {}

    def _path(self, kind: str) -> Path:
        return self.tmp / f"{self.tag}-{kind}.onnx"

    def _build(self, kind: str) -> tuple[Path, str]:
        if kind == "dynamo":
            return export_dynamo(self.model, self.args, self._path(kind), self.dynamic), ""
        if kind == "legacy":
            return export_legacy(self.model, self.args, self._path(kind), self.dynamic), ""
        if kind == "dynamo+ort_fusions":
            return ort_fusions(self.get("dynamo")[0], self._path("fusions"))
        if kind in ("legacy+transformers_opt", "dynamo+transformers_opt"):
            src = self.get(kind.split("+")[0])[0]
            return transformers_optimizer(src, self._path(kind.replace("+", "-")), self.model_type, self.heads,
                                          self.hidden)
        raise KeyError(kind)

    def get(self, kind: str) -> tuple[Path, str]:
        if kind not in self.done:
            try:
                self.done[kind] = (self._build(kind), None)
            except Exception as e:  # noqa: BLE001 - kept, so a failed export fails every cell the same way
                self.done[kind] = (None, e)
        value, err = self.done[kind]
        if err is not None:
            raise err
        return value


PEER_KINDS = ("dynamo", "dynamo+ort_fusions", "legacy+transformers_opt", "dynamo+transformers_opt")
