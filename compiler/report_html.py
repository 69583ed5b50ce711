"""The report as one self-contained HTML page: tables, matplotlib charts inlined as PNG data.

``attnforge inspect report.json --html report.html``. Nothing on the page is fetched from a
network: styles are inline and every image is a ``data:`` URI.
"""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path

from compiler.errors import InputError
from compiler.variants import compact_text

_CSS = """
body{font:15px/1.45 system-ui,-apple-system,"Segoe UI",sans-serif;color:#1d2330;margin:0;background:#f4f5f7}
main{max-width:1180px;margin:0 auto;padding:24px 28px 60px;background:#fff}
h1{font-size:24px;margin:0 0 4px}h2{font-size:19px;margin:32px 0 10px;border-bottom:2px solid #e3e6eb;padding-bottom:4px}
h3{font-size:16px;margin:18px 0 6px}.sub{color:#5b6475;margin-bottom:18px}
table{border-collapse:collapse;width:100%;font-size:13.5px;margin:6px 0 12px}
th,td{padding:5px 8px;border-bottom:1px solid #e3e6eb;text-align:left;vertical-align:top}
th{background:#f0f2f5;font-weight:600}td.n{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
.cards{display:flex;flex-wrap:wrap;gap:10px}.card{flex:1 1 140px;border:1px solid #e3e6eb;border-radius:8px;padding:10px 14px}
.card b{display:block;font-size:20px}.card span{color:#5b6475;font-size:13px}
.ok{color:#17803d;font-weight:600}.bad{color:#b42318;font-weight:600}.na{color:#5b6475}
code{font-size:12.5px;background:#f0f2f5;padding:1px 4px;border-radius:3px;word-break:break-all}
img{max-width:100%;height:auto}details{margin:8px 0;border:1px solid #e3e6eb;border-radius:6px;padding:6px 10px}
summary{cursor:pointer;font-weight:600}.legend{color:#5b6475;font-size:13px}
"""


def _esc(x) -> str:
    return html.escape(str(x))


def _png(fig) -> str:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    plt.close(fig)
    return f'<img alt="chart" src="data:image/png;base64,{base64.b64encode(buf.getvalue()).decode("ascii")}">'


def _fmt_flops(x) -> str:
    for unit, div in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(x) >= div:
            return f"{x / div:.2f} {unit}"
    return str(x)


def _num(x, fmt="{:.2e}") -> str:
    return '<span class="na">–</span>' if x is None else _esc(fmt.format(x))


def _table(head: list[str], rows: list[list[str]], numeric: set[int] = frozenset()) -> str:
    th = "".join(f"<th>{_esc(h)}</th>" for h in head)
    body = "".join("<tr>" + "".join(f'<td{" class=n" if i in numeric else ""}>{c}</td>' for i, c in enumerate(r))
                   + "</tr>" for r in rows)
    return f"<table><thead><tr>{th}</tr></thead><tbody>{body}</tbody></table>"


def _passed(p) -> str:
    return {True: '<span class="ok">yes</span>', False: '<span class="bad">NO</span>'}.get(p, '<span class="na">–</span>')


def _summary(r) -> str:
    t, f = r.totals, r.fidelity
    budget = ", ".join(f"{k}={v:g}" for k, v in (r.budget or {}).items()) or "none"
    cards = [
        (f"{t['sites_rewritten']} / {t['sites_found']}", "sites rewritten / found"),
        (str(t["sites_approximate"]), "approximate sites"),
        (str(t["sites_rolled_back"]), "rolled back"),
        (f"{t['attention_flops_saved_pct']}%", f"attention FLOPs saved ({_fmt_flops(t['attention_flops_before'])} → "
                                               f"{_fmt_flops(t['attention_flops_after'])})"),
        (f"{t['nodes_before']} → {t['nodes_after']}", "graph nodes"),
        (f"{t['compile_seconds']:.2f} s", "compile time"),
    ]
    out = '<div class="cards">' + "".join(f'<div class="card"><b>{_esc(a)}</b><span>{_esc(b)}</span></div>'
                                          for a, b in cards) + "</div>"
    out += "<h3>End-to-end fidelity (rewritten vs original)</h3>"
    out += _table(["max abs error", "KL divergence", "cosine", "exact tolerance", "budget", "passed", "inputs"],
                  [[_num(f.max_abs_error), _num(f.kl_divergence), _num(f.cosine_similarity, "{:.8f}"),
                    _num(f.tolerance), _esc(budget), _passed(f.passed), _esc("; ".join(f.checked_inputs) or "–")]],
                  {0, 1, 2, 3})
    return out


def _passes(r) -> str:
    import matplotlib.pyplot as plt

    rows = [[_esc(p.name), _num(p.seconds, "{:.4f}"), str(p.nodes_before), str(p.nodes_after),
             str(p.sites_found or ""), str(p.sites_rewritten or "")] for p in r.passes]
    out = _table(["pass", "seconds", "nodes before", "nodes after", "sites found", "sites rewritten"], rows,
                 {1, 2, 3, 4, 5})
    if r.passes:
        fig, ax = plt.subplots(figsize=(8, 0.32 * len(r.passes) + 0.8))
        names = [f"{i}. {p.name}" for i, p in enumerate(r.passes)]
        ax.barh(names[::-1], [p.seconds * 1e3 for p in r.passes][::-1], color="#3b6fd1")
        ax.set_xlabel("milliseconds")
        ax.set_title("Time per pass")
        ax.grid(axis="x", alpha=0.3)
        out += _png(fig)
    return out


def _sites(r) -> str:
    rows = []
    for s in r.sites:
        status = _esc(s.status) + (f'<br><span class="legend">{_esc(s.reason)}</span>' if s.reason else "")
        saved = s.flops_before - s.flops_after if s.status == "rewritten" else 0
        rows.append([_esc(s.id), f"<code>{_esc(s.module or '–')}</code>", f"<code>{_esc(compact_text(s.variant))}</code>",
                     status, f"{s.num_heads}/{s.num_kv_heads}", f"{s.seq_q}×{s.seq_k}", "yes" if s.causal else "no",
                     _esc(s.mask_kind), f"{s.density:.3f}", _esc(_fmt_flops(s.flops_before)),
                     _esc(_fmt_flops(saved)), _num(s.max_abs_error), _num(s.cosine_similarity, "{:.5f}"),
                     _num(s.kept_mass, "{:.4f}")])
    return _table(["site", "module", "variant", "status", "heads q/kv", "seq q×k", "causal", "mask", "density",
                   "FLOPs", "saved", "site max err", "site cosine", "kept mass"], rows, {8, 9, 10, 11, 12, 13})


def _maps(s) -> str:
    import matplotlib.pyplot as plt

    from compiler.explain import decode_map

    m = s.attention_map
    heads = m["heads"]
    cols = min(6, len(heads))
    rows = -(-len(heads) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(2.1 * cols, 2.2 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for n, h in enumerate(heads):
        ax = axes.flat[n]
        ax.imshow(decode_map(m["probs"][n], m["shape"]).numpy(), cmap="magma", interpolation="nearest")
        if m.get("keep"):
            keep = decode_map(m["keep"][n], m["shape"]).numpy()
            # Dim what the variant drops, outline what it keeps.
            ax.imshow((keep < 0.5).astype(float), cmap="Greys", alpha=0.45 * (keep < 0.5), interpolation="nearest")
            ax.contour(keep, levels=[0.5], colors="#35d0ff", linewidths=0.8)
        ax.set_title(f"head {h}", fontsize=10)
    fig.suptitle(f"{s.id}: attention on the example input (batch 0, {m['seq'][0]}×{m['seq'][1]})", fontsize=11)
    return _png(fig)


def _subgraphs(s) -> str:
    import matplotlib.pyplot as plt

    parts = [(t, g) for t, g in (("before", s.subgraph_before), ("after", s.subgraph_after)) if g]
    if not parts:
        return ""
    fig, axes = plt.subplots(1, len(parts), figsize=(5.2 * len(parts), 3.6), squeeze=False)
    for ax, (title, g) in zip(axes.flat, parts):
        _draw_subgraph(ax, g)
        ax.set_title(f"{title} ({len(g['nodes'])} nodes)", fontsize=11)
    return _png(fig)


def _draw_subgraph(ax, g: dict) -> None:
    import networkx as nx

    dg = nx.DiGraph()
    for name in g["inputs"]:
        dg.add_node(name, label=name, kind="input")
    for n in g["nodes"]:
        dg.add_node(n["name"], label=n["op"], kind="op")
    dg.add_edges_from(tuple(e) for e in g["edges"])
    for gen, layer in enumerate(nx.topological_generations(dg)):
        for name in layer:
            dg.nodes[name]["layer"] = gen
    # Layers top to bottom in data-flow order.
    pos = {k: (v[1], -v[0]) for k, v in nx.multipartite_layout(dg, subset_key="layer").items()}
    kinds = nx.get_node_attributes(dg, "kind")
    nx.draw_networkx_edges(dg, pos, ax=ax, arrows=True, arrowsize=10, edge_color="#8a93a5", node_size=900)
    for kind, color in (("input", "#e3e6eb"), ("op", "#cfe0ff")):
        nodes = [n for n in dg if kinds.get(n) == kind]
        nx.draw_networkx_nodes(dg, pos, nodelist=nodes, ax=ax, node_color=color, node_size=900,
                               node_shape="s" if kind == "input" else "o", edgecolors="#5b6475")
    nx.draw_networkx_labels(dg, pos, labels=nx.get_node_attributes(dg, "label"), ax=ax, font_size=7)
    ax.axis("off")


def _auto(r) -> str:
    import matplotlib.pyplot as plt

    a = r.auto
    trials = a.get("trials", [])
    out = ""
    if trials:
        fig, ax = plt.subplots(figsize=(7.5, 4))
        for ok, color, label in ((False, "#c0c6d0", "rejected trial"), (True, "#3b6fd1", "accepted trial")):
            pts = [t for t in trials if t["accepted"] == ok]
            ax.scatter([100 * t["flops_saved"] for t in pts], [t["cosine_similarity"] for t in pts], c=color,
                       s=28, label=label, edgecolors="none")
        accepted = [t for t in trials if t["accepted"]]
        if accepted:
            best = accepted[-1]
            ax.scatter([100 * best["flops_saved"]], [best["cosine_similarity"]], marker="*", s=260, c="#e8590c",
                       label="chosen", zorder=3)
        b = a.get("budget", {})
        if "min_cosine" in b:
            ax.axhline(b["min_cosine"], color="#b42318", ls="--", lw=1, label="budget")
        sb = a.get("search_budget", {})
        if "min_cosine" in sb:
            ax.axhline(sb["min_cosine"], color="#b42318", ls=":", lw=1, label="searched within")
        ax.set_xlabel("attention FLOPs saved on calibration (%)")
        ax.set_ylabel("end-to-end cosine")
        ax.set_title("Candidates tried: fidelity vs savings")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="lower left")
        out += _png(fig)
    rows = []
    for sid, cands in a.get("candidates", {}).items():
        chosen = a.get("chosen", {}).get(sid)
        for c in cands:
            mark = " ★" if c["variant"] == chosen else ""
            rows.append([_esc(sid), f"<code>{_esc(compact_text(c['variant']))}</code>{mark}", f"{c['density']:.3f}",
                         f"{c['site_cosine']:.5f}", _num(c["kept_mass"], "{:.4f}")])
    if rows:
        out += "<details><summary>Candidates per site (Pareto front; ★ chosen)</summary>"
        out += _table(["site", "variant", "density", "site cosine", "kept mass"], rows, {2, 3, 4}) + "</details>"
    return out


def render_html(report, attention_maps: bool = True) -> str:
    import matplotlib

    matplotlib.use("Agg")
    r = report
    parts = [f"<h1>attnforge report: {_esc(r.model)}</h1>",
             f'<div class="sub">policy <code>{_esc(r.policy)}</code> · backend <code>{_esc(r.backend)}</code></div>',
             "<h2>Summary</h2>", _summary(r), "<h2>Passes</h2>", _passes(r), "<h2>Attention sites</h2>", _sites(r)]
    if r.auto:
        parts += ["<h2>Automatic selection</h2>", _auto(r)]
    detail = []
    for s in r.sites:
        body = ""
        if attention_maps and s.attention_map:
            body += _maps(s) + ('<p class="legend">Colour: √(probability / the head\'s peak). Grey: pairs the '
                                'variant drops; blue outline: the kept region.</p>' if s.attention_map.get("keep")
                                else '<p class="legend">Colour: √(probability / the head\'s peak).</p>')
        body += _subgraphs(s)
        if body:
            detail.append(f"<details><summary>{_esc(s.id)} · <code>{_esc(s.module)}</code> · "
                          f"{_esc(compact_text(s.variant))}</summary>{body}</details>")
    if detail:
        parts += ["<h2>Sites in detail</h2>", "".join(detail)]
    if r.rejected:
        parts += ["<h2>Softmax nodes left alone</h2>",
                  _table(["node", "module", "reason"], [[_esc(x["node"]), _esc(x["module"] or "top level"),
                                                         _esc(x["reason"])] for x in r.rejected])]
    return ("<!DOCTYPE html><html lang=en><head><meta charset=utf-8><title>attnforge report: "
            f"{_esc(r.model)}</title><style>{_CSS}</style></head><body><main>{''.join(parts)}</main></body></html>")


def write_html(report, path, attention_maps: bool = True) -> Path:
    path = Path(path)
    text = render_html(report, attention_maps)
    try:
        path.write_text(text, encoding="utf-8")
    except OSError as e:
        raise InputError(f"{path}: cannot write the HTML report ({e.strerror})") from None
    return path
