"""``compile()``: capture, rewrite, verify, report."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
from torch.export import ExportedProgram

import backends
from compiler import verify
from compiler.capture import capture, hf_defaults
from compiler.errors import InputError
from compiler.graph import shape
from compiler.ops import attention_flops, causal_pairs
from compiler.pipeline import PassContext, default_pipeline
from compiler.policy import PolicySpec, parse_policy
from compiler.program import clone_program
from compiler.report import Fidelity, Report, SiteRecord
from passes.attention_discovery import Discovery

_VIEWLIKE = {"view", "reshape", "_unsafe_view", "expand", "alias", "unsqueeze", "permute", "transpose", "detach"}


class CompiledModel:
    """The rewritten program, runnable on a backend, with the report of how it was made."""

    def __init__(self, exported_program: ExportedProgram, report: Report, backend: str = "torch",
                 default_kwargs: Optional[dict] = None):
        self.exported_program = exported_program
        self.report = report
        self.backend = backend
        # Keyword arguments fixed at capture (use_cache=False for Hugging Face models).
        self.default_kwargs = dict(default_kwargs or {})
        self._run = backends.load(backend, exported_program)

    def __call__(self, *args, **kwargs):
        return self._run(*args, **{**self.default_kwargs, **kwargs})

    def save(self, path) -> Path:
        """Write the rewritten program with ``torch.export.save`` (load it after ``import compiler``)."""
        path = Path(path)
        tmp = path.with_name(path.name + ".partial")
        try:
            torch.export.save(self.exported_program, tmp)
            tmp.replace(path)
        finally:
            tmp.unlink(missing_ok=True)
        return path


def _intermediate_bytes(nodes) -> int:
    total = 0
    for n in nodes:
        v = n.meta.get("val")
        name = getattr(getattr(n.target, "_overloadpacket", None), "__name__", "")
        if isinstance(v, torch.Tensor) and name not in _VIEWLIKE:
            s = shape(n)
            total += int(torch.Size(s).numel()) * v.element_size()
    return total


def _site_record(m, status: str, reason: str = "", err: Optional[float] = None) -> SiteRecord:
    s = m.site
    before = attention_flops(s.batch, s.num_heads, s.seq_q, s.seq_k, s.head_dim, s.value_dim)
    kept = causal_pairs(s.seq_q, s.seq_k) if s.causal else None
    after = attention_flops(s.batch, s.num_heads, s.seq_q, s.seq_k, s.head_dim, s.value_dim, kept)
    return SiteRecord(
        id=s.id, module=s.module, module_type=s.module_type, form=s.form,
        variant="fused" if status == "rewritten" else "dense", status=status,
        causal=s.causal, mask_kind=s.mask_kind, batch=s.batch, num_heads=s.num_heads,
        num_kv_heads=s.num_kv_heads, head_dim=s.head_dim, value_dim=s.value_dim,
        seq_q=s.seq_q, seq_k=s.seq_k, scale=s.scale, flops_before=before,
        flops_after=after if status == "rewritten" else before,
        intermediate_bytes=_intermediate_bytes(m.internal), reason=reason, max_abs_error=err,
        layer=s.layer, notes=list(s.notes),
    )


def _site_errors(ctx: PassContext, args, kwargs) -> dict[str, tuple[float, float]]:
    """(max abs error, max |reference|) of each rewritten site's output against the same site
    in the program before fusion."""
    f = ctx.fusion
    if not f.rewritten:
        return {}
    ref = verify.node_values(ctx.before_fusion, args, kwargs, f.output_nodes.values())
    new = verify.node_values(ctx.ep, args, kwargs, f.fused_nodes.values())
    errs = {}
    for sid in f.rewritten:
        r, n = ref.get(f.output_nodes[sid]), new.get(f.fused_nodes[sid])
        if r is None or n is None:
            errs[sid] = (float("inf"), 1.0)
            continue
        errs[sid] = (verify.max_abs_error(r, n), float(r.detach().abs().max()) if r.numel() else 1.0)
    return errs


def compile_program(
    ep: ExportedProgram,
    example_inputs: tuple = (),
    example_kwargs: Optional[dict] = None,
    policy: PolicySpec = "fused",
    backend: str = "torch",
    verify_outputs: bool = True,
    model_name: Optional[str] = None,
) -> CompiledModel:
    t0 = time.perf_counter()
    pol = parse_policy(policy)
    kwargs = dict(example_kwargs or {})
    reference = verify.run(ep, example_inputs, kwargs) if verify_outputs else None
    excluded: dict[str, str] = {}
    while True:
        ctx = PassContext(clone_program(ep), pol, exclude=set(excluded))
        records = default_pipeline().run(ctx)
        if not verify_outputs:
            fid = Fidelity()
            break
        site_err = _site_errors(ctx, example_inputs, kwargs)
        bad = {}
        for m in ctx.discovery.matches:
            sid = m.site.id
            if sid in site_err:
                err, magnitude = site_err[sid]
                t = verify.tolerance(getattr(torch, m.site.dtype, torch.float32), magnitude)
                if not err <= t:
                    bad[sid] = f"site output differs by {err:.2e} (> {t:.1e}); rolled back"
        if bad:
            excluded.update(bad)
            continue
        got = verify.run(ctx.ep, example_inputs, kwargs)
        cmp = verify.compare(reference, got)
        if not cmp["passed"] and ctx.fusion.rewritten:
            for sid in ctx.fusion.rewritten:
                excluded[sid] = f"end-to-end error {cmp['max_abs_error']:.2e} over tolerance; rolled back"
            continue
        fid = Fidelity(**cmp, checked_inputs=["example inputs"])
        break

    report = Report(
        model=model_name or "ExportedProgram",
        policy=pol.text,
        backend=backend,
        passes=records,
        rejected=ctx.discovery.rejected,
        fidelity=fid,
    )
    fused = set(ctx.fusion.rewritten)
    for m in ctx.discovery.matches:
        sid = m.site.id
        if sid in fused:
            report.sites.append(_site_record(m, "rewritten", err=site_err[sid][0] if verify_outputs else None))
        elif sid in excluded:
            report.sites.append(_site_record(m, "rolled_back", excluded[sid]))
        elif sid in ctx.fusion.skipped:
            report.sites.append(_site_record(m, "skipped", ctx.fusion.skipped[sid]))
        else:
            report.sites.append(_site_record(m, "kept", "policy keeps this site dense"))
    report.compile_seconds = time.perf_counter() - t0
    return CompiledModel(ctx.ep, report, backend)


def compile(
    model: torch.nn.Module | ExportedProgram,
    example_inputs: tuple = (),
    policy: PolicySpec = "fused",
    backend: str = "torch",
    *,
    example_kwargs: Optional[dict] = None,
    dynamic_shapes: Any = None,
    verify: bool = True,
) -> CompiledModel:
    """Capture ``model``, rewrite its attention by ``policy`` and return a runnable model.

    ``cm(*inputs)`` gives the model's outputs with the same structure; ``cm.report`` says what
    every pass did; ``cm.exported_program`` is the rewritten program; ``cm.save(path)``.
    """
    if backend not in backends.AVAILABLE:
        backends.load(backend, None)  # raises the one-line reason
    t0 = time.perf_counter()
    if not isinstance(example_inputs, tuple):
        example_inputs = (example_inputs,)
    ep = capture(model, example_inputs, dynamic_shapes, example_kwargs)
    kwargs = dict(example_kwargs or {})
    if isinstance(model, torch.nn.Module):
        kwargs = hf_defaults(model, kwargs)
    name = type(model).__name__
    cm = compile_program(ep, example_inputs, kwargs, policy, backend, verify, name)
    cm.default_kwargs = {k: v for k, v in kwargs.items() if k not in (example_kwargs or {})}
    cm.report.compile_seconds = time.perf_counter() - t0
    return cm
