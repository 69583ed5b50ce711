"""Terminal view of a report (rich tables)."""

from __future__ import annotations

import io

from rich.console import Console
from rich.table import Table

from compiler.ir.plan import plan_lines
from compiler.variants.language import compact_text


def _fmt_flops(x: int) -> str:
    for unit, div in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(x) >= div:
            return f"{x / div:.2f}{unit}"
    return str(x)


def _fmt_err(x) -> str:
    return "-" if x is None else f"{x:.2e}"


def render(report, console: Console | None = None) -> None:
    if console is None:
        console = Console()
        if not console.is_terminal:
            console = Console(width=200)  # piped output: do not wrap tables at 80 columns
    t = report.totals
    console.print(
        f"[bold]attnforge report[/bold]  model=[cyan]{report.model}[/cyan]  policy=[cyan]{report.policy}[/cyan]"
        f"  backend=[cyan]{report.backend}[/cyan]  compile {t['compile_seconds']:.2f}s"
    )
    passes = Table(title="Passes", title_justify="left")
    for col in ("pass", "seconds", "nodes before", "nodes after", "sites found", "sites rewritten"):
        passes.add_column(col, justify="right" if col != "pass" else "left")
    for p in report.passes:
        passes.add_row(p.name, f"{p.seconds:.4f}", str(p.nodes_before), str(p.nodes_after),
                       str(p.sites_found or ""), str(p.sites_rewritten or ""))
    console.print(passes)

    sites = Table(title="Attention sites", title_justify="left")
    for col in ("id", "module", "variant", "status", "heads (q/kv)", "seq q×k",
                "causal", "mask", "FLOPs before→after", "density", "site err", "site cos", "kept mass"):
        sites.add_column(col, overflow="fold")
    for s in report.sites:
        status = s.status if not s.reason else f"{s.status}: {s.reason}"
        sites.add_row(s.id, s.module or "-", compact_text(s.variant), status, f"{s.num_heads}/{s.num_kv_heads}",
                      f"{s.seq_q}×{s.seq_k}", "yes" if s.causal else "no", s.mask_kind,
                      f"{_fmt_flops(s.flops_before)}→{_fmt_flops(s.flops_after if s.status == 'rewritten' else s.flops_before)}",
                      f"{s.density:.3f}", _fmt_err(s.max_abs_error),
                      "-" if s.cosine_similarity is None else f"{s.cosine_similarity:.5f}",
                      "-" if s.kept_mass is None else f"{s.kept_mass:.4f}")
    console.print(sites)
    for s in report.sites:
        if s.status == "rewritten" and s.over_exact:
            console.print(f"[yellow]{s.id}: {compact_text(s.variant)} computes {s.density:.2f}x the FLOPs exact "
                          "attention needs (density >= 1): approximate and no cheaper; use fused[/yellow]")

    f = report.fidelity
    fid = Table(title="Fidelity (rewritten vs original)", title_justify="left")
    for col in ("max abs error", "KL divergence", "cosine", "tolerance", "budget", "passed", "inputs checked"):
        fid.add_column(col)
    budget = ", ".join(f"{k}={v:g}" for k, v in (report.budget or {}).items()) or "-"
    fid.add_row(_fmt_err(f.max_abs_error), _fmt_err(f.kl_divergence),
                "-" if f.cosine_similarity is None else f"{f.cosine_similarity:.8f}",
                _fmt_err(f.tolerance), budget, {True: "yes", False: "NO", None: "-"}[f.passed],
                "; ".join(f.checked_inputs) or "-")
    console.print(fid)
    if report.lowering:
        low = report.lowering
        per_site = ", ".join(f"{s.id}={s.lowering}" for s in report.sites if s.lowering)
        err = low.get("max_abs_error_vs_torch")
        against = "the torch backend"
        if low.get("format") == "triton":
            where = f"Triton kernels on {low.get('device')}" + (", the rest torch.compile'd" if low.get("compile_rest") else "")
        elif low.get("format") == "torch":
            where, against = f"torch (sparse sites: {low.get('sparse')})", "the reference ops"
        else:
            where = (f"{low.get('format')} (opset {low.get('opset')}, {', '.join(low.get('providers', []))}) "
                     f"in {low.get('export_seconds', 0.0):.2f}s")
        checked = (f"checked end to end against the original{lowering_verdict(low)}"
                   if low.get("checked_against") == "the original"
                   else f"max abs error vs {against} {_fmt_err(err)}{lowering_verdict(low)}")
        console.print(f"lowered to {where}; sites: {per_site or '-'}; {checked}")
    if report.plan:
        for line in plan_lines(report.plan):
            console.print(line)
    if report.auto:
        a = report.auto
        cal = a.get("verified_calibration_fidelity") or a.get("calibration_fidelity") or {}
        search = ", ".join(f"{k}={v:g}" for k, v in a.get("search_budget", {}).items())
        console.print(f"auto: {len(a.get('trials', []))} end-to-end trials on {a.get('calibration_batches')} "
                      f"calibration batch(es), searched within {search}; calibration cosine "
                      f"{cal.get('cosine_similarity', float('nan')):.6f}, KL {cal.get('kl_divergence', float('nan')):.2e}")
    console.print(
        f"sites found {t['sites_found']}, rewritten {t['sites_rewritten']}, rolled back {t['sites_rolled_back']}; "
        f"attention FLOPs {_fmt_flops(t['attention_flops_before'])} → {_fmt_flops(t['attention_flops_after'])} "
        f"({t['attention_flops_saved_pct']}% saved); nodes {t['nodes_before']} → {t['nodes_after']}"
    )
    if report.rejected:
        console.print(f"[dim]{len(report.rejected)} softmax node(s) left alone (not attention):[/dim]")
        for r in report.rejected:
            console.print(f"[dim]  {r['node']} ({r['module'] or 'top level'}): {r['reason']}[/dim]")


def lowering_verdict(low: dict) -> str:
    """Whether the backend's outputs agree with the torch backend's, within the exact tolerance,
    or within it plus the backend's own rounding of the original model."""
    rounding = low.get("rounding_of_original")
    if rounding is not None:
        return f" (within twice the backend's own rounding of the original model, {rounding:.1e})"
    tol, ok = low.get("tolerance_vs_torch"), low.get("matches_torch")
    if tol is None or ok is None:
        return ""
    return (f" (within the {tol:.0e} tolerance: agrees)" if ok else
            f" (OVER the {tol:.0e} tolerance: the backend's kernels round differently; compare with backend='torch')")


def render_text(report) -> str:
    buf = io.StringIO()
    render(report, Console(file=buf, width=160, force_terminal=False, color_system=None))
    return buf.getvalue()
