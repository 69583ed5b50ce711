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

import base64
import html
import io
import math
import re
from pathlib import Path

from compiler.errors import InputError
from compiler.variants import compact_text

DPI = 90

_CSS = """
*{box-sizing:border-box}
body{font:15px/1.5 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;color:#1d2330;margin:0;background:#eef0f3}
main{max-width:1240px;margin:0 auto;padding:22px 30px 60px;background:#fff;min-height:100vh}
h1{font-size:25px;margin:0 0 2px}
h2{font-size:20px;margin:34px 0 10px;padding-bottom:4px;border-bottom:2px solid #e3e6eb}
h3{font-size:16px;margin:20px 0 6px}
p{margin:6px 0 10px}
.sub{color:#4f586a;margin-bottom:10px}
nav{font-size:14px;margin:0 0 16px;color:#4f586a}nav a{color:#2456b8;text-decoration:none;margin-right:14px}
nav a:hover{text-decoration:underline}
a{color:#2456b8}
table{border-collapse:collapse;width:100%;font-size:14px;margin:6px 0 12px}
th,td{padding:5px 8px;border-bottom:1px solid #e3e6eb;text-align:left;vertical-align:top}
th{background:#f0f2f5;font-weight:600;font-size:13px;color:#30384a;line-height:1.25}
th.n{text-align:right}
td.n{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
table.compact{font-size:13.5px}table.compact th,table.compact td{padding:5px 6px}
.mod{display:block;color:#4f586a;font-size:12px;line-height:1.3;margin-top:1px;min-width:140px}
.tw{overflow-x:auto}.pct{display:block;color:#4f586a;font-size:12.5px}
tbody tr:hover{background:#f8f9fb}
code{font:13px/1.35 ui-monospace,"SFMono-Regular",Menlo,Consolas,monospace;background:#f0f2f5;
padding:1px 4px;border-radius:3px}
td code{background:none;padding:0}
.nb{white-space:nowrap}
pre.plan{font:13px/1.45 ui-monospace,"SFMono-Regular",Menlo,Consolas,monospace;background:#f0f2f5;padding:10px 14px;
border-radius:6px;overflow-x:auto}
.verdict{border-radius:8px;padding:12px 16px;margin:8px 0 14px;font-size:16px;border:1px solid}
.verdict b{font-size:18px;margin-right:8px}
.verdict.pass{background:#e8f6ec;border-color:#9ad3ab;color:#125c2b}
.verdict.fail{background:#fdecea;border-color:#f1a39b;color:#8c1d13}
.verdict.none{background:#f0f2f5;border-color:#d5d9e0;color:#30384a}
.verdict .detail{display:block;font-size:14px;margin-top:3px;color:inherit;opacity:.9}
.cards{display:flex;flex-wrap:wrap;gap:10px;margin:10px 0}
.card{flex:1 1 150px;border:1px solid #e3e6eb;border-radius:8px;padding:9px 14px}
.card b{display:block;font-size:21px;font-variant-numeric:tabular-nums}.card span{color:#4f586a;font-size:13px}
.row{display:flex;flex-wrap:wrap;gap:18px 26px;align-items:flex-start}
.row>div{flex:1 1 430px;min-width:0;overflow-x:auto}
.row>div.fig{flex:0 1 auto}
.badge{display:inline-block;padding:0 7px;border-radius:10px;font-size:12.5px;font-weight:600;white-space:nowrap}
.b-ok{background:#dcf2e3;color:#125c2b}.b-bad{background:#fbdad6;color:#8c1d13}.b-na{background:#e6e9ee;color:#30384a}
.ok{color:#17803d;font-weight:600}.bad{color:#b42318;font-weight:600}.na{color:#7a8294}
.reason{display:block;color:#4f586a;font-size:12.5px;max-width:260px}
img{max-width:100%;height:auto;display:block}
details{margin:10px 0;border:1px solid #e3e6eb;border-radius:8px;padding:8px 14px}
details[open]{padding-bottom:14px}
summary{cursor:pointer;font-weight:600;font-size:15px}
summary .meta{font-weight:400;color:#4f586a;font-size:14px}
.legend{color:#4f586a;font-size:13.5px;margin:4px 0 10px}
.swatch{display:inline-block;width:12px;height:12px;border:1px solid #888;vertical-align:-1px;margin:0 4px 0 10px}
.graphs{display:flex;flex-wrap:wrap;gap:10px 40px;align-items:flex-start}
.graphs figure{margin:0}.graphs figcaption{font-weight:600;font-size:14px;margin-bottom:4px}
footer{margin-top:40px;color:#7a8294;font-size:12.5px}
"""

# Colours per variant family (trials, candidates), and for the charts in general.
_FAMILY = {"topk": "#3b6fd1", "window": "#2a9d8f", "blocksparse": "#e76f51", "vslash": "#c9a227",
           "neighborhood": "#6a994e", "linear": "#8e44ad", "hybrid": "#d6336c", "head mix": "#495057",
           "fused": "#868e96", "dense": "#868e96"}
_BLUE, _GREY, _RED, _ORANGE = "#3b6fd1", "#a3aab8", "#b42318", "#e8590c"


# ---------------------------------------------------------------------------- small helpers


def _esc(x) -> str:
    return html.escape(str(x))


def _wrap(text: str) -> str:
    """Escaped code that may break after dots, commas and semicolons (module paths, variants) and
    nowhere else: a browser would otherwise break ``layers.0-3`` or ``all-MiniLM-L6-v2`` at the hyphen."""
    return "<wbr>".join(f"<span class=nb>{_esc(part)}</span>" for part in re.split(r"(?<=[.,;])", str(text)) if part)


def _fmt_flops(x) -> str:
    for unit, div in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(x) >= div:
            return f"{x / div:.2f} {unit}"
    return str(x)


def _num(x, fmt="{:.2e}") -> str:
    return '<span class="na">–</span>' if x is None else _esc(fmt.format(x))


def _fmt_cos(c: float) -> str:
    """A cosine with enough digits to tell it from 1 (0.99503, 0.99999910)."""
    gap = 1.0 - c
    digits = 5 if gap <= 0 or gap >= 1e-4 else min(10, math.ceil(-math.log10(gap)) + 1)
    return f"{c:.{digits}f}"


def _cos(c) -> str:
    return '<span class="na">–</span>' if c is None else _esc(_fmt_cos(c))


def _budget_text(b) -> str:
    return ", ".join(f"{k}={v:g}" for k, v in (b or {}).items())


def _table(head: list[str], rows: list[list[str]], numeric=frozenset(), cls: str = "") -> str:
    th = "".join(f'<th{" class=n" if i in numeric else ""}>{_esc(h)}</th>' for i, h in enumerate(head))
    body = "".join("<tr>" + "".join(f'<td{" class=n" if i in numeric else ""}>{c}</td>' for i, c in enumerate(r))
                   + "</tr>" for r in rows)
    attr = f' class="{cls}"' if cls else ""
    return f'<div class="tw"><table{attr}><thead><tr>{th}</tr></thead><tbody>{body}</tbody></table></div>'


def _anchor(site_id: str) -> str:
    return "site-" + "".join(c if c.isalnum() or c in "-_." else "_" for c in site_id)


def _family(variant: str) -> str:
    if variant.startswith("heads["):
        return "head mix"
    return variant.split(":", 1)[0]


def _figure(w: float, h: float):
    from matplotlib.figure import Figure

    return Figure(figsize=(w, h), dpi=DPI)


def _png(fig, alt: str) -> str:
    """The figure as an <img> with a base64 PNG, reduced to a 256-colour palette when that is
    smaller (it is for heatmaps and charts, with no visible change)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, bbox_inches="tight", pad_inches=0.06, facecolor="white")
    data = buf.getvalue()
    try:
        from PIL import Image

        im = Image.open(io.BytesIO(data)).convert("RGB").quantize(256)
        out = io.BytesIO()
        im.save(out, format="PNG", optimize=True)
        if len(out.getvalue()) < len(data):
            data = out.getvalue()
    except ImportError:  # matplotlib depends on Pillow, but the plain PNG is fine too
        pass
    return (f'<img alt="{_esc(alt)}" src="data:image/png;base64,{base64.b64encode(data).decode("ascii")}">')


# A cosine axis that spreads the region near 1 (where budgets live): the chart plots
# -log10(1 - cosine) and labels its ticks with the cosine itself.
_COS_TICKS = [-1.0, 0.0, 0.5, 0.8, 0.9, 0.95, 0.98, 0.99, 0.995, 0.998, 0.999, 0.9995, 0.9999, 0.99995,
              0.99999, 0.999999, 0.9999999, 0.99999999]
_COS_FLOOR = 1e-8


def _cos_y(c: float) -> float:
    return -math.log10(max(1.0 - c, _COS_FLOOR))


def _cos_axis(ax, values: list[float], label: str) -> None:
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullLocator

    ys = [_cos_y(v) for v in values]
    lo, hi = min(ys), max(ys)
    pad = max(0.2, 0.08 * (hi - lo))  # room for the markers at the ends
    ax.set_ylim(lo - pad, hi + pad)
    ticks = [t for t in _COS_TICKS if lo - pad <= _cos_y(t) <= hi + pad]
    if len(ticks) > 7:  # keep the decades 0.9, 0.99, 0.999, ... and the ends
        dec = [t for t in ticks if t <= 0.0 or round(-math.log10(1 - t), 6).is_integer()]
        ticks = dec if len(dec) >= 2 else ticks[::2]
    ax.yaxis.set_major_locator(FixedLocator([_cos_y(t) for t in ticks]))
    ax.yaxis.set_minor_locator(NullLocator())
    ax.yaxis.set_major_formatter(FuncFormatter(lambda y, _: f"{1 - 10 ** -y:.10g}"))
    ax.set_ylabel(label)


# ---------------------------------------------------------------------------- sections


def _verdict(r) -> str:
    f = r.fidelity
    measured = []
    if f.cosine_similarity is not None:
        measured.append(f"cosine {_fmt_cos(f.cosine_similarity)}")
    if f.kl_divergence is not None:
        measured.append(f"KL {f.kl_divergence:.2e}")
    if f.max_abs_error is not None:
        measured.append(f"max abs error {f.max_abs_error:.2e}")
    against = (f"budget {_budget_text(r.budget)}" if r.budget else
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
    return (f'<div class="verdict {cls}"><b>{_esc(head)}</b>rewritten program vs the original'
            f'<span class="detail">{_esc(detail) or "no end-to-end comparison in this report"}</span></div>')


def _summary(r) -> str:
    t, f = r.totals, r.fidelity
    cards = [
        (f"{t['sites_rewritten']} / {t['sites_found']}", "sites rewritten / found"),
        (str(t["sites_approximate"]), "approximate (sparse / linear)"),
        (str(t["sites_rolled_back"]), "rolled back"),
        (f"{t['attention_flops_saved_pct']:g}%", f"attention FLOPs saved: {_fmt_flops(t['attention_flops_before'])}"
                                                 f" → {_fmt_flops(t['attention_flops_after'])}"),
        (f"{t['nodes_before']} → {t['nodes_after']}", "graph nodes"),
        (f"{t['compile_seconds']:.2f} s", "compile time"),
    ]
    out = _verdict(r)
    out += '<div class="cards">' + "".join(f'<div class="card"><b>{_esc(a)}</b><span>{_esc(b)}</span></div>'
                                           for a, b in cards) + "</div>"
    passed = {True: '<span class="badge b-ok">passed</span>', False: '<span class="badge b-bad">FAILED</span>'}
    out += "<h3>End-to-end fidelity (rewritten vs original)</h3>"
    out += _table(["max abs error", "KL divergence", "cosine", "exact tolerance", "budget", "result",
                   "inputs compared"],
                  [[_num(f.max_abs_error), _num(f.kl_divergence), _num(f.cosine_similarity, "{:.8f}"),
                    _num(f.tolerance), _esc(_budget_text(r.budget) or "none"),
                    passed.get(f.passed, '<span class="badge b-na">not checked</span>'),
                    _esc("; ".join(f.checked_inputs) or "–")]],
                  {0, 1, 2, 3})
    return out


def _passes(r) -> str:
    rows = [[str(i), _esc(p.name), _num(p.seconds * 1e3, "{:.1f}"), str(p.nodes_before), str(p.nodes_after),
             str(p.sites_found or ""), str(p.sites_rewritten or "")] for i, p in enumerate(r.passes)]
    table = _table(["#", "pass", "ms", "nodes before", "nodes after", "sites found", "sites rewritten"], rows,
                   {0, 2, 3, 4, 5, 6}, "compact")
    if not r.passes:
        return "<p>No passes recorded.</p>"
    n = len(r.passes)
    fig = _figure(4.3, 0.31 * n + 1.0)
    ax = fig.add_subplot()
    ms = [p.seconds * 1e3 for p in r.passes]
    ax.barh(range(n), ms, color=_BLUE, height=0.7)
    ax.set_yticks(range(n), [f"{i}. {p.name}" for i, p in enumerate(r.passes)], fontsize=9)
    ax.invert_yaxis()
    for i, v in enumerate(ms):
        ax.text(v, i, f" {v:.1f}", va="center", fontsize=8.5, color="#30384a")
    ax.set_xlim(0, max(ms) * 1.15 if max(ms) > 0 else 1)
    ax.set_xlabel("milliseconds")
    ax.set_title(f"Time per pass (total {sum(ms):.0f} ms)", fontsize=11)
    ax.grid(axis="x", alpha=0.3)
    ax.spines[["top", "right"]].set_visible(False)
    return f'<div class="row"><div>{table}</div><div class="fig">{_png(fig, "Time per pass")}</div></div>'


_STATUS_BADGE = {"rewritten": "b-ok", "rolled_back": "b-bad"}


def _status(s) -> str:
    out = f'<span class="badge {_STATUS_BADGE.get(s.status, "b-na")}">{_esc(s.status.replace("_", " "))}</span>'
    if s.reason:
        out += f'<span class="reason">{_esc(s.reason)}</span>'
    return out


def _sites(r) -> str:
    if not r.sites:
        return "<p>No attention found.</p>"
    rows = []
    for s in r.sites:
        after = s.flops_after if s.status == "rewritten" else s.flops_before
        saved = s.flops_before - after
        pct = f'<span class="pct">{100 * saved / s.flops_before:.1f}%</span>' if s.flops_before and saved else ""
        site = f'<a href="#{_anchor(s.id)}">{_esc(s.id)}</a><span class=mod>{_wrap(s.module or "top level")}</span>'
        rows.append([site,
                     f"<code>{_wrap(compact_text(s.variant))}</code>", _status(s),
                     f"{s.num_heads}/{s.num_kv_heads}", f"{s.seq_q}×{s.seq_k}", "yes" if s.causal else "no",
                     _esc(s.mask_kind), f"{s.density:.3f}",
                     f"{_esc(_fmt_flops(s.flops_before))} → {_esc(_fmt_flops(after))}",
                     _esc(_fmt_flops(saved)) + pct, _num(s.max_abs_error), _cos(s.cosine_similarity),
                     _num(s.kept_mass, "{:.4f}")])
    return _table(["site / module", "variant", "status", "heads q/kv", "seq q×k", "causal", "mask", "density",
                   "FLOPs before → after", "saved", "site max err", "site cosine", "kept mass"],
                  rows, {3, 4, 7, 8, 9, 10, 11, 12}, "compact")


def _chosen_trial(a: dict):
    """The trial that measured the final assignment (trials list only approximate sites)."""
    chosen = a.get("chosen", {})
    trials = a.get("trials", [])
    approx = {k: v for k, v in chosen.items() if v not in ("fused", "dense")}
    for t in reversed(trials):
        if t.get("accepted") and t.get("assignment") == approx:
            return t
    accepted = [t for t in trials if t.get("accepted")]
    return accepted[-1] if accepted else None


def _trials_chart(r) -> str:
    a = r.auto
    trials = a.get("trials", [])
    if not trials:
        return ""
    fig = _figure(8.6, 4.6)
    ax = fig.add_subplot()
    xs = [100 * t["flops_saved"] for t in trials]
    cos = [t["cosine_similarity"] for t in trials]
    rej = [i for i, t in enumerate(trials) if not t["accepted"]]
    acc = [i for i, t in enumerate(trials) if t["accepted"]]
    if rej:
        ax.scatter([xs[i] for i in rej], [_cos_y(cos[i]) for i in rej], marker="x", s=34, c=_GREY, linewidths=1.4,
                   label=f"rejected trial ({len(rej)})", zorder=2)
    if acc:
        ax.scatter([xs[i] for i in acc], [_cos_y(cos[i]) for i in acc], marker="o", s=46, c=_BLUE,
                   label=f"accepted trial ({len(acc)})", zorder=3)
    lines = list(cos)
    b, sb = a.get("budget") or {}, a.get("search_budget") or {}
    if "min_cosine" in b:
        ax.axhline(_cos_y(b["min_cosine"]), color=_RED, ls="--", lw=1.3,
                   label=f"budget (cosine ≥ {b['min_cosine']:g})")
        lines.append(b["min_cosine"])
    if "min_cosine" in sb and sb["min_cosine"] != b.get("min_cosine"):
        ax.axhline(_cos_y(sb["min_cosine"]), color=_RED, ls=":", lw=1.2,
                   label=f"searched within (≥ {sb['min_cosine']:g})")
        lines.append(sb["min_cosine"])
    best = _chosen_trial(a)
    if best is not None:
        bx, by = 100 * best["flops_saved"], best["cosine_similarity"]
        ax.scatter([bx], [_cos_y(by)], marker="*", s=340, c=_ORANGE, edgecolors="#7a2e05", linewidths=0.8,
                   label="chosen", zorder=4)
        right_half = bx > (min(xs) + max(xs)) / 2
        ax.annotate(f"chosen: {bx:.1f}% saved, cosine {_fmt_cos(by)}", (bx, _cos_y(by)),
                    xytext=(-24 if right_half else 24, 26), ha="right" if right_half else "left",
                    textcoords="offset points", fontsize=9, color="#7a2e05", zorder=5,
                    bbox=dict(boxstyle="round,pad=0.3", fc="white", ec="#e8590c", lw=0.8, alpha=0.95),
                    arrowprops=dict(arrowstyle="-", color="#7a2e05", lw=0.8))
    _cos_axis(ax, lines, "end-to-end cosine (log scale in 1 − cosine)")
    ax.set_xlabel("attention FLOPs saved on the calibration inputs (%)")
    ax.set_title("Trials: fidelity vs savings", fontsize=11)
    ax.grid(alpha=0.3)
    ax.spines[["top", "right"]].set_visible(False)
    ax.legend(fontsize=8.5, loc="best", framealpha=0.9)
    return _png(fig, "Trials: fidelity vs savings")


def _site_order(r, ids) -> list:
    order = {s.id: i for i, s in enumerate(r.sites)}
    return sorted(ids, key=lambda k: (order.get(k, len(order)), k))


def _candidates_chart(r) -> str:
    a = r.auto
    cands = a.get("candidates", {})
    sids = [k for k in _site_order(r, cands) if cands[k]]
    if not sids:
        return ""
    cols = min(3, len(sids))
    rows = -(-len(sids) // cols)
    fig = _figure(3.6 * cols, 2.7 * rows + 0.5)
    axes = fig.subplots(rows, cols, squeeze=False)
    families = {}
    for ax in axes.flat[len(sids):]:
        ax.axis("off")
    for ax, sid in zip(axes.flat, sids):
        chosen = a.get("chosen", {}).get(sid)
        cs = cands[sid]
        for c in cs:
            fam = _family(c["variant"])
            color = _FAMILY.get(fam, "#495057")
            families[fam] = color
            is_chosen = c["variant"] == chosen
            ax.scatter([c["density"]], [_cos_y(c["site_cosine"])], s=170 if is_chosen else 34,
                       marker="*" if is_chosen else "o", c=color,
                       edgecolors="black" if is_chosen else "none", linewidths=1.0, zorder=3 if is_chosen else 2)
        _cos_axis(ax, [c["site_cosine"] for c in cs], "site cosine")
        ax.yaxis.label.set_fontsize(9)
        ax.tick_params(labelsize=8)
        ax.set_xlabel("density (share of scores computed)", fontsize=9)
        ax.set_title(f"{sid}: {compact_text(chosen) if chosen else '–'}", fontsize=9.5)
        ax.grid(alpha=0.3)
        ax.spines[["top", "right"]].set_visible(False)
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], ls="", marker="o", color=c, label=f) for f, c in families.items()]
    handles.append(Line2D([], [], ls="", marker="*", markersize=12, color="white", markeredgecolor="black",
                          label="chosen"))
    fig.legend(handles=handles, loc="upper center", ncol=len(handles), fontsize=9, frameon=False)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.45 / fig.get_size_inches()[1]))
    return _png(fig, "Candidates per site: site cosine vs density")


def _auto(r) -> str:
    a = r.auto
    cal = a.get("verified_calibration_fidelity") or a.get("calibration_fidelity") or {}
    text = (f"{len(a.get('trials', []))} end-to-end trials on {a.get('calibration_batches', '?')} calibration "
            f"batch(es). Budget <code>{_wrap(_budget_text(a.get('budget')) or '–')}</code>; the search held itself to "
            f"<code>{_wrap(_budget_text(a.get('search_budget')) or '–')}</code>")
    if a.get("margin") is not None:
        text += f" (margin {_esc(a['margin'])})"
    text += " so that inputs it has not seen keep some slack."
    if cal:
        text += (f" Chosen assignment on the calibration inputs: cosine {_cos(cal.get('cosine_similarity'))}, "
                 f"KL {_num(cal.get('kl_divergence'))}, max abs error {_num(cal.get('max_abs_error'))}.")
    out = f"<p>{text}</p>"
    chart = _trials_chart(r)
    if chart:
        out += (f"{chart}<p class=legend>Each point is one end-to-end trial of an assignment of variants to sites, "
                "measured on the calibration inputs. Accepted trials met the searched-within budget; the star is the "
                "assignment that was kept.</p>")
    cands = a.get("candidates", {})
    if cands:
        out += "<h3>Candidates per site</h3>" + _candidates_chart(r)
        out += ("<p class=legend>Each site's candidates (its Pareto front, measured on that site alone): density "
                "against the cosine of the site's output with exact attention. Star: the variant chosen.</p>")
        rows = []
        for sid in _site_order(r, cands):
            chosen = a.get("chosen", {}).get(sid)
            for c in sorted(cands[sid], key=lambda c: c["density"]):
                mark = ' <span class="badge b-ok">chosen</span>' if c["variant"] == chosen else ""
                rows.append([_esc(sid), f"<code>{_wrap(compact_text(c['variant']))}</code>{mark}",
                             f"{c['density']:.3f}", _esc(_fmt_flops(c["flops"])), _cos(c["site_cosine"]),
                             _num(c.get("kept_mass"), "{:.4f}")])
        out += ("<details><summary>All candidates as a table</summary>"
                + _table(["site", "variant", "density", "FLOPs", "site cosine", "kept mass"], rows, {2, 3, 4, 5})
                + "</details>")
    return out


def _future_cells(shape, seq):
    """[h, w] bool: pooled cells whose every pair is a future key under top-left causal
    masking (query i sees keys j <= i); the pooling bins are adaptive pooling's."""
    import numpy as np

    (h, w), (sq, sk) = shape, seq
    q_last = np.array([-(-(i + 1) * sq // h) - 1 for i in range(h)])  # last query row in each bin
    k_first = np.array([j * sk // w for j in range(w)])  # first key in each bin
    return k_first[None, :] > q_last[:, None]


def _map_images(s):
    """Per head, an RGB image: the exact map in colour where the variant keeps the pairs,
    light grey (darker where probability is) where it drops them, white where causal
    masking leaves no pair at all."""
    import matplotlib
    import numpy as np

    from compiler.explain import decode_map

    m = s.attention_map
    cmap = matplotlib.colormaps["magma"]
    future = _future_cells(m["shape"], m["seq"]) if s.causal else None
    out = []
    for n, h in enumerate(m["heads"]):
        p = np.clip(decode_map(m["probs"][n], m["shape"]).numpy(), 0, 1)
        rgb = cmap(p)[..., :3]
        if m.get("keep"):
            keep = np.clip(decode_map(m["keep"][n], m["shape"]).numpy(), 0, 1)[..., None]
            dropped = (0.86 - 0.62 * p)[..., None] * np.ones(3)
            rgb = keep * rgb + (1 - keep) * dropped
        if future is not None:
            rgb[future] = 1.0
        out.append((h, rgb))
    return out


def _maps(s) -> str:
    images = _map_images(s)
    n = len(images)
    cols = n if n <= 8 else 6 if n <= 12 else 8
    rows = -(-n // cols)
    size = 1.5 if cols > 6 else 2.0
    fig = _figure(size * cols, (size + 0.28) * rows)
    axes = fig.subplots(rows, cols, squeeze=False)
    for ax in axes.flat[n:]:
        ax.axis("off")
    for ax, (h, rgb) in zip(axes.flat, images):
        ax.imshow(rgb, interpolation="nearest")
        ax.set_xticks([])
        ax.set_yticks([])
        for sp in ax.spines.values():
            sp.set_color("#a3aab8")
            sp.set_linewidth(0.6)
        ax.set_title(f"head {h}", fontsize=10, pad=3)
    fig.subplots_adjust(left=0, right=1, bottom=0, top=1, wspace=0.06, hspace=0.16)
    return _png(fig, f"{s.id}: attention maps per head")


def _maps_legend(s) -> str:
    m = s.attention_map
    sq, sk = m["seq"]
    h, w = m["shape"]
    pooled = f", max-pooled to {h}×{w}" if (h, w) != (sq, sk) else ""
    out = (f"Exact attention on the example input (batch 0; {sq} queries top to bottom × {sk} keys left to right"
           f"{pooled}). Colour = √(probability / the head's peak): dark = little, bright = the head's "
           "strongest pairs.")
    out = _esc(out)
    if m.get("keep"):
        out += (f'<br><span class="swatch" style="background:#51127c"></span>kept by '
                f'<code>{_wrap(compact_text(s.variant))}</code><span class="swatch" style="background:#d6d6d6"></span>'
                "dropped (darker grey = probability the variant does not compute)")
    if s.causal:
        out += '<span class="swatch" style="background:#fff"></span>future keys (causal mask)'
    if m.get("keep"):
        out += ". A pattern fits a head when its bright pairs fall in the coloured region."
    elif compact_text(s.variant) in ("fused", "dense"):
        out += " Exact attention: every pair is kept."
    else:
        out += f" <code>{_wrap(compact_text(s.variant))}</code> keeps no fixed set of pairs."
    return f"<p class=legend>{out}</p>"


def _layers(g: dict):
    """Rows for a top-to-bottom drawing: ops by longest path from the inputs, each input one
    row above its first consumer (so the edge is short)."""
    import networkx as nx

    inputs = list(dict.fromkeys(g.get("inputs", [])))
    ops = {n["name"]: n["op"] for n in g.get("nodes", [])}
    dg = nx.DiGraph()
    dg.add_nodes_from(ops)
    dg.add_edges_from((a, b) for a, b in g.get("edges", []) if a in ops and b in ops)
    if not nx.is_directed_acyclic_graph(dg):
        layer = {name: i for i, name in enumerate(ops)}
    else:
        layer = {}
        for gen, names in enumerate(nx.topological_generations(dg)):
            for name in names:
                layer[name] = gen
    # Every input sits one row above its earliest consumer; push ops down to make room.
    consumers = {i: [b for a, b in g.get("edges", []) if a == i and b in ops] for i in inputs}
    shift = 1 if any(consumers[i] and min(layer[c] for c in consumers[i]) == 0 for i in inputs) else 0
    layer = {k: v + shift for k, v in layer.items()}
    for i in inputs:
        layer[i] = min((layer[c] for c in consumers[i]), default=1) - 1
    return inputs, ops, layer


def _draw_subgraph(g: dict, title: str) -> str:
    inputs, ops, layer = _layers(g)
    if not ops:
        return ""
    label = {**{i: i for i in inputs}, **ops}
    rows: dict[int, list[str]] = {}
    for name in [*ops, *inputs]:
        rows.setdefault(layer[name], []).append(name)
    # Within a row: ops centred (so a chain of ops stays one straight column), inputs to
    # either side of them. Widths in characters.
    gap = 3.0
    pos, width = {}, {}
    for y, names in rows.items():
        ins = [n for n in names if n in inputs]
        mid = [n for n in names if n in ops]
        for n in names:
            width[n] = len(label[n]) + 2.5
        total = sum(width[n] for n in mid) + gap * (len(mid) - 1)
        x = -total / 2
        for n in mid:
            pos[n] = (x + width[n] / 2, -y * 2.6)
            x += width[n] + gap
        right = total / 2 if mid else -gap / 2
        left = -right
        for k, n in enumerate(ins):
            if k % 2 == 0:
                pos[n] = (right + gap + width[n] / 2, -y * 2.6)
                right += gap + width[n]
            else:
                pos[n] = (left - gap - width[n] / 2, -y * 2.6)
                left -= gap + width[n]
    xmin = min(pos[n][0] - width[n] / 2 for n in pos)
    xmax = max(pos[n][0] + width[n] / 2 for n in pos)
    nrows = max(rows) - min(rows) + 1
    span = xmax - xmin
    fig = _figure(max(2.2, 0.092 * span + 0.4), 0.52 * nrows + 0.3)
    ax = fig.add_axes((0, 0, 1, 1))
    ax.set_xlim(xmin - 1, xmax + 1)
    ax.set_ylim(-(max(rows)) * 2.6 - 1.4, -min(rows) * 2.6 + 1.4)
    ax.axis("off")
    texts = {}
    for n, (x, y) in pos.items():
        if n in inputs:
            box = dict(boxstyle="square,pad=0.35", fc="#eef0f3", ec="#7a8294", lw=0.8, ls="--")
            texts[n] = ax.text(x, y, label[n], ha="center", va="center", fontsize=9, color="#4f586a",
                               style="italic", bbox=box, zorder=3)
        else:
            new = label[n].startswith("attnforge.")
            box = dict(boxstyle="round,pad=0.35", fc="#ffe8cc" if new else "#dbe6ff",
                       ec="#c05a00" if new else "#3b6fd1", lw=1.0)
            texts[n] = ax.text(x, y, label[n], ha="center", va="center", fontsize=9, color="#1d2330",
                               bbox=box, zorder=3)
    for a, b in g.get("edges", []):
        if a not in texts or b not in texts:
            continue
        skip = abs(layer[b] - layer[a]) > 1 and pos[a][0] == pos[b][0]
        ax.annotate("", xy=pos[b], xytext=pos[a],
                    arrowprops=dict(arrowstyle="-|>", color="#5b6475", lw=0.9, shrinkA=1, shrinkB=1,
                                    patchA=texts[a].get_bbox_patch(), patchB=texts[b].get_bbox_patch(),
                                    connectionstyle="arc3,rad=0.35" if skip else "arc3"),
                    zorder=4)  # after the boxes, whose patches clip it, are placed
    return f"<figure><figcaption>{_esc(title)}</figcaption>{_png(fig, title)}</figure>"


def _subgraphs(s) -> str:
    parts = []
    for when, g in (("before", s.subgraph_before), ("after", s.subgraph_after)):
        if g and g.get("nodes"):
            n = len(g["nodes"])
            parts.append(_draw_subgraph(g, f"{when} the rewrite ({n} node{'s' * (n != 1)})"))
    parts = [p for p in parts if p]
    if not parts:
        return ""
    return ('<h3>Matched subgraph</h3><div class="graphs">' + "".join(parts) + "</div><p class=legend>"
            "Rounded boxes: operations (orange: inserted by attnforge); dashed boxes: the nodes outside the "
            "subgraph that feed it.</p>")


def _drawn(draw, s, what: str) -> str:
    """``draw(s)``, or a note where the report's picture data is malformed (a hand-edited or
    truncated JSON file should still give a page)."""
    try:
        return draw(s)
    except (KeyError, IndexError, TypeError, ValueError, RuntimeError) as e:
        return f"<p class=legend>{_esc(what)} not drawn: the report's data is malformed ({_esc(type(e).__name__)}).</p>"


def _site_details(s, attention_maps: bool) -> str:
    body = ""
    if attention_maps and s.attention_map and s.attention_map.get("probs"):
        body += "<h3>Attention maps</h3>" + _drawn(lambda s: _maps(s) + _maps_legend(s), s, "attention maps")
    body += _drawn(_subgraphs, s, "subgraphs")
    if s.notes:
        body += "<p>" + "<br>".join(_esc(n) for n in s.notes) + "</p>"
    if not body:
        return ""
    meta = [compact_text(s.variant), s.status.replace("_", " "), f"density {s.density:.3f}"]
    if s.cosine_similarity is not None:
        meta.append(f"site cosine {_fmt_cos(s.cosine_similarity)}")
    return (f'<details id="{_anchor(s.id)}"><summary>{_esc(s.id)} <span class="meta">· {_esc(s.module or "top level")}'
            f' · {" · ".join(_esc(x) for x in meta)}</span></summary>{body}</details>')


def _plan(r) -> str:
    """The plan as the terminal shows it (``compiler.plan.plan_lines``), and the lowering it ran."""
    from compiler.plan import plan_lines
    from compiler.report_view import lowering_verdict

    low = r.lowering or {}
    lowered = ""
    if low.get("format"):
        err = low.get("max_abs_error_vs_torch")
        lowered = (f"<p>Lowered to <code>{_wrap(low['format'])}</code>"
                   + (f"; max abs error vs the torch backend {_num(err)}{_esc(lowering_verdict(low))}"
                      if err is not None else "") + ".</p>")
    return (f"<p class=legend>How the {_esc(r.plan.get('backend', r.backend))} backend runs the program: segments "
            "by backend, the transitions between them, and memory planned against export order.</p>"
            f"<pre class=plan>{_esc(chr(10).join(plan_lines(r.plan)))}</pre>{lowered}")


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
                         + _table(["node", "module", "reason"],
                                  [[f"<code>{_wrap(x.get('node', '?'))}</code>",
                                    f"<code>{_wrap(x.get('module') or 'top level')}</code>",
                                    _esc(x.get("reason", ""))] for x in r.rejected])))
    nav = "<nav>" + "".join(f'<a href="#{k}">{_esc(title)}</a>' for k, title, _ in sections) + "</nav>"
    body = "".join(f'<section id="{k}"><h2>{_esc(title)}</h2>{content}</section>' for k, title, content in sections)
    head = (f"<h1>attnforge report: {_esc(r.model)}</h1>"
            f'<div class="sub">policy <code>{_wrap(r.policy)}</code> · backend <code>{_wrap(r.backend)}</code> · '
            f"compiled in {t['compile_seconds']:.2f} s</div>")
    return ("<!DOCTYPE html>\n<html lang=en><head><meta charset=utf-8>"
            '<meta name=viewport content="width=device-width,initial-scale=1">'
            f"<title>attnforge report: {_esc(r.model)}</title><style>{_CSS}</style></head>"
            f"<body><main>{head}{nav}{body}<footer>attnforge pass report ({_esc(r.schema)})</footer>"
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
