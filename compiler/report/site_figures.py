"""The report's pictures of one site: its attention maps per head (the pairs its sparse
variant drops greyed out) and drawings of its subgraph before and after the rewrite."""

from __future__ import annotations

from compiler.report.html_parts import esc, new_figure, png_img, wrap
from compiler.variants.language import compact_text


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

    from compiler.report.maps import decode_map

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


def maps_figure(s) -> str:
    images = _map_images(s)
    n = len(images)
    cols = n if n <= 8 else 6 if n <= 12 else 8
    rows = -(-n // cols)
    size = 1.5 if cols > 6 else 2.0
    fig = new_figure(size * cols, (size + 0.28) * rows)
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
    return png_img(fig, f"{s.id}: attention maps per head")


def maps_legend(s) -> str:
    m = s.attention_map
    sq, sk = m["seq"]
    h, w = m["shape"]
    pooled = f", max-pooled to {h}×{w}" if (h, w) != (sq, sk) else ""
    out = (f"Exact attention on the example input (batch 0; {sq} queries top to bottom × {sk} keys left to right"
           f"{pooled}). Colour = √(probability / the head's peak): dark = little, bright = the head's "
           "strongest pairs.")
    out = esc(out)
    if m.get("keep"):
        out += (f'<br><span class="swatch" style="background:#51127c"></span>kept by '
                f'<code>{wrap(compact_text(s.variant))}</code><span class="swatch" style="background:#d6d6d6"></span>'
                "dropped (darker grey = probability the variant does not compute)")
    if s.causal:
        out += '<span class="swatch" style="background:#fff"></span>future keys (causal mask)'
    if m.get("keep"):
        out += ". A pattern fits a head when its bright pairs fall in the coloured region."
    elif compact_text(s.variant) in ("fused", "dense"):
        out += " Exact attention: every pair is kept."
    else:
        out += f" <code>{wrap(compact_text(s.variant))}</code> keeps no fixed set of pairs."
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
    fig = new_figure(max(2.2, 0.092 * span + 0.4), 0.52 * nrows + 0.3)
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
    return f"<figure><figcaption>{esc(title)}</figcaption>{png_img(fig, title)}</figure>"


def subgraphs(s) -> str:
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
