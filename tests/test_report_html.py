"""The HTML report: self-contained, parseable, and showing every pass and site."""

import base64
import subprocess
import sys
from html.parser import HTMLParser

import pytest

import compiler
from compiler.report_html import render_html
from zoo import hf_model


class _Page(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags, self.attrs, self.text = [], [], []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        self.attrs += [(tag, k, v or "") for k, v in attrs]

    def handle_data(self, data):
        self.text.append(data)


def _parse(text: str) -> _Page:
    p = _Page()
    p.feed(text)
    p.close()
    return p


def _check_self_contained(page: _Page):
    imgs = [v for t, k, v in page.attrs if t == "img" and k == "src"]
    assert imgs
    for src in imgs:
        assert src.startswith("data:image/png;base64,")
        assert base64.b64decode(src.split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n"
    for _, _, v in page.attrs:
        assert not v.startswith(("http://", "https://", "//")), v
    assert not any(t in ("script", "link", "iframe") for t in page.tags)


@pytest.fixture(scope="module")
def reports():
    out = {}
    z = hf_model("llama", "eager")
    out["llama"] = compiler.compile(z.model, z.args, "window:3,block=4", example_kwargs=z.kwargs,
                                    attention_maps=True).report
    z = hf_model("bert", "eager")
    out["bert"] = compiler.compile(z.model, z.args, "fused", example_kwargs=z.kwargs).report
    z = hf_model("vit", "sdpa")
    out["vit-auto"] = compiler.compile(z.model, z.args, "auto", example_kwargs=z.kwargs,
                                       budget=compiler.Fidelity(min_cosine=0.9)).report
    return out


@pytest.mark.parametrize("name", ["llama", "bert", "vit-auto"])
def test_page_is_self_contained_and_complete(reports, name):
    r = reports[name]
    page = _parse(render_html(r))
    _check_self_contained(page)
    text = " ".join(page.text)
    for s in r.sites:
        assert s.id in text
    for p in r.passes:
        assert p.name in text
    assert "End-to-end fidelity" in text


def test_maps_and_auto_sections(reports):
    llama = " ".join(_parse(render_html(reports["llama"])).text)
    assert "Grey: pairs the variant drops" in llama  # sparse sites draw their kept pairs over the map
    assert "Grey" not in " ".join(_parse(render_html(reports["llama"], attention_maps=False)).text)
    auto = " ".join(_parse(render_html(reports["vit-auto"])).text)
    assert "Automatic selection" in auto and "Candidates per site" in auto


def test_cli_writes_html_and_refuses_bad_reports(reports, tmp_path):
    rep, out = tmp_path / "r.json", tmp_path / "r.html"
    reports["llama"].save(rep)
    r = subprocess.run([sys.executable, "-m", "compiler.cli", "inspect", str(rep), "--html", str(out), "-q"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    _check_self_contained(_parse(out.read_text()))
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    r = subprocess.run([sys.executable, "-m", "compiler.cli", "inspect", str(bad), "--html", str(out)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1
