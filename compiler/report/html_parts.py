"""Building blocks of the HTML report: the page's styles, escaped text and number cells,
tables, and matplotlib figures inlined as PNG ``data:`` URIs (drawn on ``Figure`` objects
with the Agg canvas, never through pyplot's global state), with a cosine axis that spreads
the region near 1."""

from __future__ import annotations

import base64
import html
import io
import math
import re

DPI = 90

CSS = """
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
FAMILY_COLORS = {"topk": "#3b6fd1", "window": "#2a9d8f", "blocksparse": "#e76f51", "vslash": "#c9a227",
           "neighborhood": "#6a994e", "linear": "#8e44ad", "hybrid": "#d6336c", "head mix": "#495057",
           "fused": "#868e96", "dense": "#868e96"}
BLUE, GREY, RED, ORANGE = "#3b6fd1", "#a3aab8", "#b42318", "#e8590c"




def esc(x) -> str:
    return html.escape(str(x))


def wrap(text: str) -> str:
    """Escaped code that may break after dots, commas and semicolons (module paths, variants) and
    nowhere else: a browser would otherwise break ``layers.0-3`` or ``all-MiniLM-L6-v2`` at the hyphen."""
    return "<wbr>".join(f"<span class=nb>{esc(part)}</span>" for part in re.split(r"(?<=[.,;])", str(text)) if part)


def fmt_flops(x) -> str:
    for unit, div in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(x) >= div:
            return f"{x / div:.2f} {unit}"
    return str(x)


def num_cell(x, fmt="{:.2e}") -> str:
    return '<span class="na">–</span>' if x is None else esc(fmt.format(x))


def fmt_cos(c: float) -> str:
    """A cosine with enough digits to tell it from 1 (0.99503, 0.99999910)."""
    gap = 1.0 - c
    digits = 5 if gap <= 0 or gap >= 1e-4 else min(10, math.ceil(-math.log10(gap)) + 1)
    return f"{c:.{digits}f}"


def cos_cell(c) -> str:
    return '<span class="na">–</span>' if c is None else esc(fmt_cos(c))


def budget_text(b) -> str:
    return ", ".join(f"{k}={v:g}" for k, v in (b or {}).items())


def html_table(head: list[str], rows: list[list[str]], numeric=frozenset(), cls: str = "") -> str:
    th = "".join(f'<th{" class=n" if i in numeric else ""}>{esc(h)}</th>' for i, h in enumerate(head))
    body = "".join("<tr>" + "".join(f'<td{" class=n" if i in numeric else ""}>{c}</td>' for i, c in enumerate(r))
                   + "</tr>" for r in rows)
    attr = f' class="{cls}"' if cls else ""
    return f'<div class="tw"><table{attr}><thead><tr>{th}</tr></thead><tbody>{body}</tbody></table></div>'


def anchor(site_id: str) -> str:
    return "site-" + "".join(c if c.isalnum() or c in "-_." else "_" for c in site_id)


def family_of(variant: str) -> str:
    if variant.startswith("heads["):
        return "head mix"
    return variant.split(":", 1)[0]


def new_figure(w: float, h: float):
    from matplotlib.figure import Figure

    return Figure(figsize=(w, h), dpi=DPI)


def png_img(fig, alt: str) -> str:
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
    return (f'<img alt="{esc(alt)}" src="data:image/png;base64,{base64.b64encode(data).decode("ascii")}">')


# A cosine axis that spreads the region near 1 (where budgets live): the chart plots
# -log10(1 - cosine) and labels its ticks with the cosine itself.
_COS_TICKS = [-1.0, 0.0, 0.5, 0.8, 0.9, 0.95, 0.98, 0.99, 0.995, 0.998, 0.999, 0.9995, 0.9999, 0.99995,
              0.99999, 0.999999, 0.9999999, 0.99999999]
_COS_FLOOR = 1e-8


def cos_y(c: float) -> float:
    return -math.log10(max(1.0 - c, _COS_FLOOR))


def cos_axis(ax, values: list[float], label: str) -> None:
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullLocator

    ys = [cos_y(v) for v in values]
    lo, hi = min(ys), max(ys)
    pad = max(0.2, 0.08 * (hi - lo))  # room for the markers at the ends
    ax.set_ylim(lo - pad, hi + pad)
    ticks = [t for t in _COS_TICKS if lo - pad <= cos_y(t) <= hi + pad]
    if len(ticks) > 7:  # keep the decades 0.9, 0.99, 0.999, ... and the ends
        dec = [t for t in ticks if t <= 0.0 or round(-math.log10(1 - t), 6).is_integer()]
        ticks = dec if len(dec) >= 2 else ticks[::2]
    ax.yaxis.set_major_locator(FixedLocator([cos_y(t) for t in ticks]))
    ax.yaxis.set_minor_locator(NullLocator())
    ax.yaxis.set_major_formatter(FuncFormatter(lambda y, _: f"{1 - 10 ** -y:.10g}"))
    ax.set_ylabel(label)


# ---------------------------------------------------------------------------- sections
