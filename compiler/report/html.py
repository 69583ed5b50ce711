"""The report as one self-contained HTML page: tables, matplotlib charts inlined as PNG data.

``attnforge inspect report.json --html report.html``, or ``write_html(report, path)``.
Nothing on the page is fetched from a network: the styles are inline, every image is a
``data:`` URI and there is no script. The charts are drawn on matplotlib ``Figure`` objects
with the Agg canvas directly, so rendering does not touch pyplot's global state.

The page, top to bottom: a verdict banner and summary cards; the passes (table and a chart
of their times); the attention sites (one row each); for ``policy="auto"`` the search (every
end-to-end trial as fidelity against savings, and each site's candidates); then one
collapsed section per site with its attention maps (the exact attention per head, the pairs
its sparse variant drops greyed out) and drawings of its subgraph before and after the
rewrite; last, the softmax nodes that were left alone.
"""

from __future__ import annotations

from pathlib import Path

from compiler.ir.errors import InputError
from compiler.report.html_parts import (
    BLUE,
    CSS,
    anchor,
    budget_text,
    cos_cell,
    esc,
    fmt_cos,
    fmt_flops,
    html_table,
    new_figure,
    num_cell,
    png_img,
    wrap,
)
from compiler.report.charts import candidates_chart, site_order, trials_chart
from compiler.report.site_figures import maps_figure, maps_legend, subgraphs
from compiler.variants.language import compact_text



def _verdict(r) -> str:
    f = r.fidelity
    measured = []
    if f.cosine_similarity is not None:
        measured.append(f"cosine {fmt_cos(f.cosine_similarity)}")
    if f.kl_divergence is not None:
        measured.append(f"KL {f.kl_divergence:.2e}")
    if f.max_abs_error is not None:
        measured.append(f"max abs error {f.max_abs_error:.2e}")
    against = (f"budget {budget_text(r.budget)}" if r.budget else
               f"exact tolerance {f.tolerance:.1e}" if f.tolerance is not None else "")
    detail = "; ".join(measured) + (f" — against {against}" if against else "")
    if f.checked_inputs:
        detail += f" (on {'; '.join(f.checked_inputs)})"
    if f.passed is True:
        cls, head = "pass", "✓ Fidelity check passed"
    elif f.passed is False:
        cls, head = "fail", "✗ Fidelity check FAILED"
    else:
        cls, head = "none", "Fidelity not checked"
    return (f'<div class="verdict {cls}"><b>{esc(head)}</b>rewritten program vs the original'
            f'<span class="detail">{esc(detail) or "no end-to-end comparison in this report"}</span></div>')


def _summary(r) -> str:
    t, f = r.totals, r.fidelity
    cards = [
        (f"{t['sites_rewritten']} / {t['sites_found']}", "sites rewritten / found"),
        (str(t["sites_approximate"]), "approximate (sparse / linear)"),
        (str(t["sites_rolled_back"]), "rolled back"),
        (f"{t['attention_flops_saved_pct']:g}%", f"attention FLOPs saved: {fmt_flops(t['attention_flops_before'])}"
                                                 f" → {fmt_flops(t['attention_flops_after'])}"),
        (f"{t['nodes_before']} → {t['nodes_after']}", "graph nodes"),
        (f"{t['compile_seconds']:.2f} s", "compile time"),
    ]
    out = _verdict(r)
    out += '<div class="cards">' + "".join(f'<div class="card"><b>{esc(a)}</b><span>{esc(b)}</span></div>'
                                           for a, b in cards) + "</div>"
    passed = {True: '<span class="badge b-ok">passed</span>', False: '<span class="badge b-bad">FAILED</span>'}
    out += "<h3>End-to-end fidelity (rewritten vs original)</h3>"
    out += html_table(["max abs error", "KL divergence", "cosine", "exact tolerance", "budget", "result",
                   "inputs compared"],
                  [[num_cell(f.max_abs_error), num_cell(f.kl_divergence), num_cell(f.cosine_similarity, "{:.8f}"),
                    num_cell(f.tolerance), esc(budget_text(r.budget) or "none"),
                    passed.get(f.passed, '<span class="badge b-na">not checked</span>'),
                    esc("; ".join(f.checked_inputs) or "–")]],
                  {0, 1, 2, 3})
    return out


def _passes(r) -> str:
    rows = [[str(i), esc(p.name), num_cell(p.seconds * 1e3, "{:.1f}"), str(p.nodes_before), str(p.nodes_after),
             str(p.sites_found or ""), str(p.sites_rewritten or "")] for i, p in enumerate(r.passes)]
    table = html_table(["#", "pass", "ms", "nodes before", "nodes after", "sites found", "sites rewritten"], rows,
                   {0, 2, 3, 4, 5, 6}, "compact")
    if not r.passes:
        return "<p>No passes recorded.</p>"
    n = len(r.passes)
    fig = new_figure(4.3, 0.31 * n + 1.0)
    ax = fig.add_subplot()
    ms = [p.seconds * 1e3 for p in r.passes]
    ax.barh(range(n), ms, color=BLUE, height=0.7)
    ax.set_yticks(range(n), [f"{i}. {p.name}" for i, p in enumerate(r.passes)], fontsize=9)
    ax.invert_yaxis()
    for i, v in enumerate(ms):
        ax.text(v, i, f" {v:.1f}", va="center", fontsize=8.5, color="#30384a")
    ax.set_xlim(0, max(ms) * 1.15 if max(ms) > 0 else 1)
    ax.set_xlabel("milliseconds")
    ax.set_title(f"Time per pass (total {sum(ms):.0f} ms)", fontsize=11)
    ax.grid(axis="x", alpha=0.3)
    ax.spines[["top", "right"]].set_visible(False)
    return f'<div class="row"><div>{table}</div><div class="fig">{png_img(fig, "Time per pass")}</div></div>'


_STATUS_BADGE = {"rewritten": "b-ok", "rolled_back": "b-bad"}


def _status(s) -> str:
    out = f'<span class="badge {_STATUS_BADGE.get(s.status, "b-na")}">{esc(s.status.replace("_", " "))}</span>'
    if s.reason:
        out += f'<span class="reason">{esc(s.reason)}</span>'
    return out


def _sites(r) -> str:
    if not r.sites:
        return "<p>No attention found.</p>"
    rows = []
    for s in r.sites:
        after = s.flops_after if s.status == "rewritten" else s.flops_before
        saved = s.flops_before - after
        pct = f'<span class="pct">{100 * saved / s.flops_before:.1f}%</span>' if s.flops_before and saved else ""
        site = f'<a href="#{anchor(s.id)}">{esc(s.id)}</a><span class=mod>{wrap(s.module or "top level")}</span>'
        rows.append([site,
                     f"<code>{wrap(compact_text(s.variant))}</code>", _status(s),
                     f"{s.num_heads}/{s.num_kv_heads}", f"{s.seq_q}×{s.seq_k}", "yes" if s.causal else "no",
                     esc(s.mask_kind), f"{s.density:.3f}",
                     f"{esc(fmt_flops(s.flops_before))} → {esc(fmt_flops(after))}",
                     esc(fmt_flops(saved)) + pct, num_cell(s.max_abs_error), cos_cell(s.cosine_similarity),
                     num_cell(s.kept_mass, "{:.4f}")])
    return html_table(["site / module", "variant", "status", "heads q/kv", "seq q×k", "causal", "mask", "density",
                   "FLOPs before → after", "saved", "site max err", "site cosine", "kept mass"],
                  rows, {3, 4, 7, 8, 9, 10, 11, 12}, "compact")




def _auto(r) -> str:
    a = r.auto
    cal = a.get("verified_calibration_fidelity") or a.get("calibration_fidelity") or {}
    text = (f"{len(a.get('trials', []))} end-to-end trials on {a.get('calibration_batches', '?')} calibration "
            f"batch(es). Budget <code>{wrap(budget_text(a.get('budget')) or '–')}</code>; the search held itself to "
            f"<code>{wrap(budget_text(a.get('search_budget')) or '–')}</code>")
    if a.get("margin") is not None:
        text += f" (margin {esc(a['margin'])})"
    text += " so that inputs it has not seen keep some slack."
    if cal:
        text += (f" Chosen assignment on the calibration inputs: cosine {cos_cell(cal.get('cosine_similarity'))}, "
                 f"KL {num_cell(cal.get('kl_divergence'))}, max abs error {num_cell(cal.get('max_abs_error'))}.")
    out = f"<p>{text}</p>"
    chart = trials_chart(r)
    if chart:
        out += (f"{chart}<p class=legend>Each point is one end-to-end trial of an assignment of variants to sites, "
                "measured on the calibration inputs. Accepted trials met the searched-within budget; the star is the "
                "assignment that was kept.</p>")
    cands = a.get("candidates", {})
    if cands:
        out += "<h3>Candidates per site</h3>" + candidates_chart(r)
        out += ("<p class=legend>Each site's candidates (its Pareto front, measured on that site alone): density "
                "against the cosine of the site's output with exact attention. Star: the variant chosen.</p>")
        rows = []
        for sid in site_order(r, cands):
            chosen = a.get("chosen", {}).get(sid)
            for c in sorted(cands[sid], key=lambda c: c["density"]):
                mark = ' <span class="badge b-ok">chosen</span>' if c["variant"] == chosen else ""
                rows.append([esc(sid), f"<code>{wrap(compact_text(c['variant']))}</code>{mark}",
                             f"{c['density']:.3f}", esc(fmt_flops(c["flops"])), cos_cell(c["site_cosine"]),
                             num_cell(c.get("kept_mass"), "{:.4f}")])
        out += ("<details><summary>All candidates as a table</summary>"
                + html_table(["site", "variant", "density", "FLOPs", "site cosine", "kept mass"], rows, {2, 3, 4, 5})
                + "</details>")
    return out




def _drawn(draw, s, what: str) -> str:
    """``draw(s)``, or a note where the report's picture data is malformed (a hand-edited or
    truncated JSON file should still give a page)."""
    try:
        return draw(s)
    except (KeyError, IndexError, TypeError, ValueError, RuntimeError) as e:
        return f"<p class=legend>{esc(what)} not drawn: the report's data is malformed ({esc(type(e).__name__)}).</p>"


def _site_details(s, attention_maps: bool) -> str:
    body = ""
    if attention_maps and s.attention_map and s.attention_map.get("probs"):
        body += "<h3>Attention maps</h3>" + _drawn(lambda s: maps_figure(s) + maps_legend(s), s, "attention maps")
    body += _drawn(subgraphs, s, "subgraphs")
    if s.notes:
        body += "<p>" + "<br>".join(esc(n) for n in s.notes) + "</p>"
    if not body:
        return ""
    meta = [compact_text(s.variant), s.status.replace("_", " "), f"density {s.density:.3f}"]
    if s.cosine_similarity is not None:
        meta.append(f"site cosine {fmt_cos(s.cosine_similarity)}")
    return (f'<details id="{anchor(s.id)}"><summary>{esc(s.id)} <span class="meta">· {esc(s.module or "top level")}'
            f' · {" · ".join(esc(x) for x in meta)}</span></summary>{body}</details>')


def _plan(r) -> str:
    """The plan as the terminal shows it (``compiler.ir.plan.plan_lines``), and the lowering it ran."""
    from compiler.ir.plan import plan_lines
    from compiler.report.terminal import lowering_verdict

    low = r.lowering or {}
    lowered = ""
    if low.get("format"):
        err = low.get("max_abs_error_vs_torch")
        against = "the reference ops" if low["format"] == "torch" else "the torch backend"
        checked = (f"; checked end to end against the original (the fidelity above){esc(lowering_verdict(low))}"
                   if low.get("checked_against") == "the original" else
                   f"; max abs error vs {against} {num_cell(err)}{esc(lowering_verdict(low))}" if err is not None else "")
        lowered = f"<p>Lowered to <code>{wrap(low['format'])}</code>{checked}.</p>"
    return (f"<p class=legend>How the {esc(r.plan.get('backend', r.backend))} backend runs the program: segments "
            "by backend, the transitions between them, and memory planned against export order.</p>"
            f"<pre class=plan>{esc(chr(10).join(plan_lines(r.plan)))}</pre>{lowered}")


def render_html(report, attention_maps: bool = True) -> str:
    """The report as one HTML page (a string); ``attention_maps=False`` leaves out the
    attention map pictures even where the report stores them."""
    r = report
    t = r.totals
    sections = [("summary", "Summary", _summary(r)), ("passes", "Passes", _passes(r)),
                ("sites", f"Attention sites ({t['sites_found']})", _sites(r))]
    if r.plan:
        sections.append(("plan", "Execution plan", _plan(r)))
    if r.auto:
        sections.append(("auto", "Automatic selection", _drawn(_auto, r, "automatic selection")))
    detail = "".join(_site_details(s, attention_maps) for s in r.sites)
    if detail:
        has_maps = any(s.attention_map for s in r.sites)
        if has_maps and attention_maps:
            hint = "open it for the attention maps and the subgraph before and after the rewrite."
        elif has_maps:
            hint = "open it for the subgraph before and after the rewrite (attention maps left out)."
        else:
            hint = ("open it for the subgraph before and after the rewrite. This report stores no attention maps: "
                    "compile with <code>attention_maps=True</code> (<code>attnforge rewrite --attention-maps</code>) "
                    "to see them.")
        sections.append(("details", "Sites in detail", f"<p class=legend>One section per site: {hint}</p>" + detail))
    if r.rejected:
        sections.append(("rejected", f"Softmax nodes left alone ({len(r.rejected)})",
                         "<p class=legend>Softmax nodes that did not match attention, and why.</p>"
                         + html_table(["node", "module", "reason"],
                                  [[f"<code>{wrap(x.get('node', '?'))}</code>",
                                    f"<code>{wrap(x.get('module') or 'top level')}</code>",
                                    esc(x.get("reason", ""))] for x in r.rejected])))
    nav = "<nav>" + "".join(f'<a href="#{k}">{esc(title)}</a>' for k, title, _ in sections) + "</nav>"
    body = "".join(f'<section id="{k}"><h2>{esc(title)}</h2>{content}</section>' for k, title, content in sections)
    head = (f"<h1>attnforge report: {esc(r.model)}</h1>"
            f'<div class="sub">policy <code>{wrap(r.policy)}</code> · backend <code>{wrap(r.backend)}</code> · '
            f"compiled in {t['compile_seconds']:.2f} s</div>")
    return ("<!DOCTYPE html>\n<html lang=en><head><meta charset=utf-8>"
            '<meta name=viewport content="width=device-width,initial-scale=1">'
            f"<title>attnforge report: {esc(r.model)}</title><style>{CSS}</style></head>"
            f"<body><main>{head}{nav}{body}<footer>attnforge pass report ({esc(r.schema)})</footer>"
            "</main></body></html>\n")


def write_html(report, path, attention_maps: bool = True) -> Path:
    """Write ``render_html(report)`` to ``path``; an unwritable path is an InputError."""
    return save_html(render_html(report, attention_maps), path)


def save_html(text: str, path) -> Path:
    """Write a rendered page to ``path``; an unwritable path is an InputError."""
    path = Path(path)
    if path.is_dir():
        raise InputError(f"{path}: is a directory; give a file name for the HTML report")
    try:
        path.write_text(text, encoding="utf-8")
    except OSError as e:
        raise InputError(f"{path}: cannot write the HTML report ({e.strerror or e})") from None
    return path
