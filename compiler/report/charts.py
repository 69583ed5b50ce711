"""The report's charts of ``policy="auto"``'s search: every end-to-end trial as fidelity
against savings, and each site's candidates."""

from __future__ import annotations

from compiler.report.html_parts import (
    BLUE,
    FAMILY_COLORS,
    GREY,
    ORANGE,
    RED,
    cos_axis,
    cos_y,
    family_of,
    fmt_cos,
    new_figure,
    png_img,
)
from compiler.variants.language import compact_text


def chosen_trial(a: dict):
    """The trial that measured the final assignment (trials list only approximate sites)."""
    chosen = a.get("chosen", {})
    trials = a.get("trials", [])
    approx = {k: v for k, v in chosen.items() if v not in ("fused", "dense")}
    for t in reversed(trials):
        if t.get("accepted") and t.get("assignment") == approx:
            return t
    accepted = [t for t in trials if t.get("accepted")]
    return accepted[-1] if accepted else None


def trials_chart(r) -> str:
    a = r.auto
    trials = a.get("trials", [])
    if not trials:
        return ""
    fig = new_figure(8.6, 4.6)
    ax = fig.add_subplot()
    xs = [100 * t["flops_saved"] for t in trials]
    cos = [t["cosine_similarity"] for t in trials]
    rej = [i for i, t in enumerate(trials) if not t["accepted"]]
    acc = [i for i, t in enumerate(trials) if t["accepted"]]
    if rej:
        ax.scatter([xs[i] for i in rej], [cos_y(cos[i]) for i in rej], marker="x", s=34, c=GREY, linewidths=1.4,
                   label=f"rejected trial ({len(rej)})", zorder=2)
    if acc:
        ax.scatter([xs[i] for i in acc], [cos_y(cos[i]) for i in acc], marker="o", s=46, c=BLUE,
                   label=f"accepted trial ({len(acc)})", zorder=3)
    lines = list(cos)
    b, sb = a.get("budget") or {}, a.get("search_budget") or {}
    if "min_cosine" in b:
        ax.axhline(cos_y(b["min_cosine"]), color=RED, ls="--", lw=1.3,
                   label=f"budget (cosine ≥ {b['min_cosine']:g})")
        lines.append(b["min_cosine"])
    if "min_cosine" in sb and sb["min_cosine"] != b.get("min_cosine"):
        ax.axhline(cos_y(sb["min_cosine"]), color=RED, ls=":", lw=1.2,
                   label=f"searched within (≥ {sb['min_cosine']:g})")
        lines.append(sb["min_cosine"])
    best = chosen_trial(a)
    if best is not None:
        bx, by = 100 * best["flops_saved"], best["cosine_similarity"]
        ax.scatter([bx], [cos_y(by)], marker="*", s=340, c=ORANGE, edgecolors="#7a2e05", linewidths=0.8,
                   label="chosen", zorder=4)
        right_half = bx > (min(xs) + max(xs)) / 2
        ax.annotate(f"chosen: {bx:.1f}% saved, cosine {fmt_cos(by)}", (bx, cos_y(by)),
                    xytext=(-24 if right_half else 24, 26), ha="right" if right_half else "left",
                    textcoords="offset points", fontsize=9, color="#7a2e05", zorder=5,
                    bbox=dict(boxstyle="round,pad=0.3", fc="white", ec="#e8590c", lw=0.8, alpha=0.95),
                    arrowprops=dict(arrowstyle="-", color="#7a2e05", lw=0.8))
    cos_axis(ax, lines, "end-to-end cosine (log scale in 1 − cosine)")
    ax.set_xlabel("attention FLOPs saved on the calibration inputs (%)")
    ax.set_title("Trials: fidelity vs savings", fontsize=11)
    ax.grid(alpha=0.3)
    ax.spines[["top", "right"]].set_visible(False)
    ax.legend(fontsize=8.5, loc="best", framealpha=0.9)
    return png_img(fig, "Trials: fidelity vs savings")


def site_order(r, ids) -> list:
    order = {s.id: i for i, s in enumerate(r.sites)}
    return sorted(ids, key=lambda k: (order.get(k, len(order)), k))


def candidates_chart(r) -> str:
    a = r.auto
    cands = a.get("candidates", {})
    sids = [k for k in site_order(r, cands) if cands[k]]
    if not sids:
        return ""
    cols = min(3, len(sids))
    rows = -(-len(sids) // cols)
    fig = new_figure(3.6 * cols, 2.7 * rows + 0.5)
    axes = fig.subplots(rows, cols, squeeze=False)
    families = {}
    for ax in axes.flat[len(sids):]:
        ax.axis("off")
    for ax, sid in zip(axes.flat, sids):
        chosen = a.get("chosen", {}).get(sid)
        cs = cands[sid]
        for c in cs:
            fam = family_of(c["variant"])
            color = FAMILY_COLORS.get(fam, "#495057")
            families[fam] = color
            is_chosen = c["variant"] == chosen
            ax.scatter([c["density"]], [cos_y(c["site_cosine"])], s=170 if is_chosen else 34,
                       marker="*" if is_chosen else "o", c=color,
                       edgecolors="black" if is_chosen else "none", linewidths=1.0, zorder=3 if is_chosen else 2)
        cos_axis(ax, [c["site_cosine"] for c in cs], "site cosine")
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
    return png_img(fig, "Candidates per site: site cosine vs density")
