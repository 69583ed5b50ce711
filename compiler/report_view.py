"""Terminal view of a report (rich tables)."""

from __future__ import annotations

import io

from rich.console import Console
from rich.table import Table


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
    for col in ("id", "module", "form", "variant", "status", "heads (q/kv)", "head dim", "seq q×k",
                "causal", "mask", "FLOPs before→after", "site err"):
        sites.add_column(col)
    for s in report.sites:
        status = s.status if not s.reason else f"{s.status}: {s.reason}"
        sites.add_row(s.id, s.module or "-", s.form, s.variant, status, f"{s.num_heads}/{s.num_kv_heads}",
                      str(s.head_dim), f"{s.seq_q}×{s.seq_k}", "yes" if s.causal else "no", s.mask_kind,
                      f"{_fmt_flops(s.flops_before)}→{_fmt_flops(s.flops_after if s.status == 'rewritten' else s.flops_before)}",
                      _fmt_err(s.max_abs_error))
    console.print(sites)

    f = report.fidelity
    fid = Table(title="Fidelity (rewritten vs original)", title_justify="left")
    for col in ("max abs error", "KL divergence", "cosine", "tolerance", "passed", "inputs checked"):
        fid.add_column(col)
    fid.add_row(_fmt_err(f.max_abs_error), _fmt_err(f.kl_divergence),
                "-" if f.cosine_similarity is None else f"{f.cosine_similarity:.8f}",
                _fmt_err(f.tolerance), {True: "yes", False: "NO", None: "-"}[f.passed],
                "; ".join(f.checked_inputs) or "-")
    console.print(fid)
    console.print(
        f"sites found {t['sites_found']}, rewritten {t['sites_rewritten']}, rolled back {t['sites_rolled_back']}; "
        f"attention FLOPs {_fmt_flops(t['attention_flops_before'])} → {_fmt_flops(t['attention_flops_after'])} "
        f"({t['attention_flops_saved_pct']}% saved); nodes {t['nodes_before']} → {t['nodes_after']}"
    )
    if report.rejected:
        console.print(f"[dim]{len(report.rejected)} softmax node(s) left alone (not attention):[/dim]")
        for r in report.rejected:
            console.print(f"[dim]  {r['node']} ({r['module'] or 'top level'}): {r['reason']}[/dim]")


def render_text(report) -> str:
    buf = io.StringIO()
    render(report, Console(file=buf, width=160, force_terminal=False, color_system=None))
    return buf.getvalue()
