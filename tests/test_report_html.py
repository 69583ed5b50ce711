"""The HTML report: one self-contained page that parses, shows every pass and site, draws
its charts as inline PNGs, and is written by ``attnforge inspect --html``."""

import base64
import copy
import subprocess
import sys
from html.parser import HTMLParser

import pytest

import compiler
from compiler.cli import main
from compiler.report.data import Report
from compiler.report.html import render_html, write_html
from zoo import hf_model

PNG = b"\x89PNG\r\n\x1a\n"


class _Page(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags, self.attrs, self.text = [], [], []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        self.attrs += [(tag, k, v or "") for k, v in attrs]

    def handle_data(self, data):
        self.text.append(data)

    def images(self) -> dict:
        """alt text -> src of every <img>."""
        out, alt, src = {}, None, None
        for tag, k, v in self.attrs:
            if tag != "img":
                continue
            if k == "alt":
                alt = v
            if k == "src":
                src = v
            if alt is not None and src is not None:
                out.setdefault(alt, src)
                alt = src = None
        return out


def _parse(text: str) -> _Page:
    p = _Page()
    p.feed(text)
    p.close()
    return p


def _check_self_contained(text: str) -> _Page:
    page = _parse(text)
    srcs = [v for t, k, v in page.attrs if t == "img" and k == "src"]
    assert srcs
    for src in srcs:
        assert src.startswith("data:image/png;base64,")
        assert base64.b64decode(src.split(",", 1)[1], validate=True)[:8] == PNG
    for tag, k, v in page.attrs:
        assert "http://" not in v and "https://" not in v and not v.strip().startswith("//"), (tag, k, v)
    assert "http://" not in text and "https://" not in text  # not in the CSS either
    assert not {"script", "link", "iframe", "object", "embed"} & set(page.tags)
    assert page.tags.count("html") == 1 and "style" in page.tags
    return page


@pytest.fixture(scope="module")
def reports():
    out = {}
    z = hf_model("llama", "eager")  # causal, grouped-query heads
    out["llama"] = compiler.compile(z.model, z.args, "window:3,block=4", example_kwargs=z.kwargs,
                                    attention_maps=True).report
    z = hf_model("bert", "eager")
    out["bert"] = compiler.compile(z.model, z.args, "fused", example_kwargs=z.kwargs).report
    z = hf_model("vit", "sdpa")
    out["vit-auto"] = compiler.compile(z.model, z.args, "auto", example_kwargs=z.kwargs, attention_maps=True,
                                       budget=compiler.Fidelity(min_cosine=0.9)).report
    return out


@pytest.fixture(scope="module")
def pages(reports):
    return {name: render_html(r) for name, r in reports.items()}


@pytest.mark.parametrize("name", ["llama", "bert", "vit-auto"])
def test_page_is_self_contained_and_complete(reports, pages, name):
    r = reports[name]
    page = _check_self_contained(pages[name])
    text = " ".join(page.text)
    assert r.sites and r.passes
    for s in r.sites:
        assert s.id in text and s.module in text
    for p in r.passes:
        assert p.name in text
    assert "End-to-end fidelity" in text and r.model in text
    imgs = page.images()
    assert "Time per pass" in imgs
    assert ("Trials: fidelity vs savings" in imgs) == (name == "vit-auto")
    # Every site with a matched subgraph gets its before/after drawing, inside its own <details>.
    assert sum(alt.startswith("before the rewrite") for alt in imgs) >= 1
    assert page.tags.count("details") >= len(r.sites)


def test_attention_maps_with_kept_pairs(reports, pages):
    llama = _parse(pages["llama"])
    imgs = llama.images()
    for s in reports["llama"].sites:
        assert s.attention_map and s.attention_map["keep"]
        assert f"{s.id}: attention maps per head" in imgs
    text = " ".join(llama.text)
    assert "dropped" in text and "future keys (causal mask)" in text
    # The caller can leave the maps out; the subgraphs stay.
    off = _parse(render_html(reports["llama"], attention_maps=False))
    assert not any("attention maps" in alt for alt in off.images())
    assert any(alt.startswith("after the rewrite") for alt in off.images())
    # A linear variant keeps no fixed pairs: the map is drawn without a kept region.
    vit = " ".join(_parse(pages["vit-auto"]).text)
    assert "keeps no fixed set of pairs" in vit


def test_auto_section(reports, pages):
    page = _parse(pages["vit-auto"])
    text = " ".join(page.text)
    a = reports["vit-auto"].auto
    assert "Automatic selection" in text and f"{len(a['trials'])} end-to-end trials" in text
    assert "Candidates per site: site cosine vs density" in page.images()
    assert "chosen" in text


def test_text_is_escaped_and_rejected_nodes_listed(reports):
    r = copy.deepcopy(reports["bert"])
    r.model = "<script>alert(1)</script>"
    r.sites[0].module = 'a"b<blink>'
    r.rejected = [{"node": "softmax_9", "module": "classifier<marquee>",
                   "reason": "reduces over a <weird> axis & more"}]
    text = render_html(r)
    page = _check_self_contained(text)
    assert not {"script", "blink", "marquee", "weird"} & set(page.tags)
    joined = " ".join(page.text)
    assert "<script>alert(1)</script>" in joined  # shown as text
    assert "softmax_9" in joined and "reduces over a <weird> axis & more" in joined and "<marquee>" in joined
    assert "Softmax nodes left alone (1)" in joined


def test_empty_and_damaged_reports_still_render(reports):
    empty = Report(model="m", policy="fused", backend="torch")
    page = _parse(render_html(empty))
    assert "No attention found." in " ".join(page.text)
    r = copy.deepcopy(reports["llama"])
    r.sites[0].attention_map["probs"] = ["AAAA"]  # wrong size for its shape
    r.sites[1].subgraph_before = {"nodes": [{"name": "x"}], "edges": [], "inputs": []}
    text = " ".join(_check_self_contained(render_html(r)).text)
    assert "attention maps not drawn" in text and "subgraphs not drawn" in text


def test_write_html_and_cli(reports, tmp_path, capsys):
    rep, out = tmp_path / "r.json", tmp_path / "r.html"
    reports["llama"].save(rep)
    r = subprocess.run([sys.executable, "-m", "compiler.cli", "inspect", str(rep), "--html", str(out), "-q"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout == ""
    _check_self_contained(out.read_text(encoding="utf-8"))
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    r = subprocess.run([sys.executable, "-m", "compiler.cli", "inspect", str(bad), "--html", str(out)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert r.stderr.startswith("attnforge: error:")
    # Unwritable targets: one line, exit 2 (in-process, to keep the test quick).
    for target in (tmp_path / "missing" / "r.html", tmp_path):
        assert main(["inspect", str(rep), "--html", str(target), "-q"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("attnforge: error:") and str(target) in err[0]
    # The terminal view still prints without -q; --no-attention-maps gives a smaller page.
    small = tmp_path / "small.html"
    assert main(["inspect", str(rep), "--html", str(small), "--no-attention-maps"]) == 0
    assert f"wrote {small}" in capsys.readouterr().out
    assert small.stat().st_size < out.stat().st_size
    assert write_html(reports["bert"], tmp_path / "b.html").read_text(encoding="utf-8").startswith("<!DOCTYPE html>")
