"""What ``compile()`` runs to verify and measure, and that running less proves as much.

At long context compile time is the number of whole-program runs times one forward pass: the
original runs once per input set (the end-to-end reference and every site's reference come
from that one run), a forced exact site computes only the query rows measurement samples, and
when every site gets an approximate variant the exact program is not run end to end (the forced
run, every site given the original's value, must give the original's outputs instead).
"""

import pytest
import torch
import torch.nn.functional as F
from torch import fx, nn

import compiler
from compare import max_err
from compiler.driver import measure
from test_soundness import QuantizedProjection, _double_output, _qkv


class IdsAttention(nn.Module):
    """Token ids in, one causal SDPA site, like a decoder without an attention mask."""

    def __init__(self, vocab=50, c=16, h=2):
        super().__init__()
        self.emb, self.qkv, self.out, self.h = nn.Embedding(vocab, c), nn.Linear(c, 3 * c), nn.Linear(c, c), h

    def forward(self, ids):
        x = self.emb(ids)
        b, t, c = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.h, c // self.h).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out(y.transpose(1, 2).reshape(b, t, c))


class Causal(nn.Module):
    def forward(self, q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)


def _count_runs(monkeypatch) -> dict:
    """Whole-program runs by kind: interpreted by compile()'s checks (an fx.Interpreter of ours;
    the ONNX exporter interprets the program too, without running its ops) and through ep.module()."""
    from compiler.driver import verify

    n = {"interpreted": 0, "module": 0}
    run, module_run = fx.Interpreter.run, verify.run

    def counted(self, *a, **k):
        n["interpreted"] += type(self).__module__.startswith("compiler.")
        return run(self, *a, **k)

    def counted_module(*a, **k):
        n["module"] += 1
        return module_run(*a, **k)

    monkeypatch.setattr(fx.Interpreter, "run", counted)
    monkeypatch.setattr(verify, "run", counted_module)
    return n


@pytest.mark.parametrize("policy,backend,runs", [
    # original (reference + site references), forced (sites given the original's values), final program
    ("window:8,sinks:2,block=8", "torch", {"interpreted": 3, "module": 0}),
    # original, forced, the exact program end to end (it is the one returned: its outputs are reused)
    ("fused", "torch", {"interpreted": 2, "module": 1}),
    # original, forced; the exact program is checked end to end as onnxruntime runs it
    ("fused", "onnxruntime", {"interpreted": 2, "module": 0}),
])
def test_compile_runs_the_model_a_bounded_number_of_times(monkeypatch, policy, backend, runs):
    m = IdsAttention().eval()
    ids = torch.randint(0, 50, (1, 64), generator=torch.Generator().manual_seed(0))
    n = _count_runs(monkeypatch)
    cm = compiler.compile(m, (ids,), policy, backend)
    assert [s.status for s in cm.report.sites] == ["rewritten"]
    # Integer ids only and no mask: a "fresh values" set would be the example again; none is claimed.
    assert cm.report.fidelity.checked_inputs[0].startswith("example inputs")
    assert len(cm.report.fidelity.checked_inputs) == 1
    assert n == runs
    monkeypatch.undo()
    with torch.no_grad():
        assert max_err(m(ids), cm(ids)) <= (1e-5 if policy == "fused" else 10.0)


def test_an_approximate_policy_still_catches_a_broken_pass(monkeypatch):
    # Every site approximate: the exact program is never run end to end, so the forced run must
    # catch a pass that breaks the program around the sites.
    import passes.layout

    monkeypatch.setattr(passes.layout, "layout_cleanup", _double_output)
    m = QuantizedProjection()
    q, k, v = _qkv()
    cm = compiler.compile(m, (q, k, v), "window:8,sinks:1,block=4")  # covers all 6 tokens: exact values
    (cleanup,) = [p for p in cm.report.passes if p.name == "layout_cleanup"]
    assert "left_out" in cleanup.details
    assert [s.status for s in cm.report.sites] == ["rewritten"]
    with torch.no_grad():
        assert max_err(m(q, k, v), cm(q, k, v)) <= 1e-5


def test_a_long_site_is_checked_on_sampled_rows_and_the_report_says_so(monkeypatch):
    monkeypatch.setattr(measure, "MEASURE_ROWS", 64)  # 300 queries: two stripes of 64 rows
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 300, 8, generator=g) for _ in range(3))
    cm = compiler.compile(Causal(), (q, k, v), "fused")
    assert cm.report.sites[0].status == "rewritten"
    assert cm.report.fidelity.checked_inputs == ["example inputs", "fresh values (each site, 128 sampled query rows)"]
    assert max_err(Causal()(q, k, v), cm(q, k, v)) <= 1e-5


@pytest.mark.parametrize("policy", ["fused", "window:32,sinks:4,block=16"])
def test_a_wrong_site_is_caught_on_sampled_rows(monkeypatch, policy):
    import passes.attention_fusion as fusion

    monkeypatch.setattr(measure, "MEASURE_ROWS", 64)
    rewrite = fusion.rewrite_site

    def wrong_scale(gm, m):
        m.scale = m.scale * 1.5
        return rewrite(gm, m)

    monkeypatch.setattr(fusion, "rewrite_site", wrong_scale)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 300, 8, generator=g) for _ in range(3))
    cm = compiler.compile(Causal(), (q, k, v), policy)
    site = cm.report.sites[0]
    assert site.status == "rolled_back" and "site output differs" in site.reason, (site.status, site.reason)
    assert max_err(Causal()(q, k, v), cm(q, k, v)) <= 1e-5


# ----------------------------------------------------------------------------- the reference run


class MaterializedMask(nn.Module):
    """SDPA given the causal rule as a mask built from positions, as transformers exports it:
    bool, or additive with ``fill`` where masked. ``offset`` shifts the triangle (not causal)."""

    def __init__(self, fill=None, offset=0):
        super().__init__()
        self.fill, self.offset = fill, offset

    def forward(self, q, k, v):
        i = torch.arange(q.shape[-2]).view(-1, 1)
        keep = (torch.arange(k.shape[-2]).view(1, -1) <= i + self.offset).view(1, 1, q.shape[-2], k.shape[-2])
        mask = keep if self.fill is None else torch.zeros(keep.shape).masked_fill(~keep, self.fill)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


class _FlashCalls(torch.utils._python_dispatch.TorchDispatchMode):
    """How each CPU attention kernel call was made: (is_causal, with a mask)."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if "scaled_dot_product" in str(func):
            named = dict(zip(("query", "key", "value", "dropout_p", "is_causal", "attn_mask"), args)) | kwargs
            self.calls.append((bool(named.get("is_causal")), named.get("attn_mask") is not None))
        return func(*args, **kwargs)


@pytest.mark.parametrize("fill,offset,fast", [
    (None, 0, True), (float("-inf"), 0, True), (torch.finfo(torch.float32).min, 0, True),
    (-1e4, 0, False),  # a finite fill that does not act as -inf: a bias, kept
    (None, 3, False),  # the triangle shifted (bottom-right for 8 queries over 11 keys): not is_causal
])
def test_the_reference_runs_a_causal_mask_value_as_is_causal(fill, offset, fast):
    from compiler.driver import verify

    m = MaterializedMask(fill, offset)
    g = torch.Generator().manual_seed(0)
    q, k, v = torch.randn(1, 2, 8, 4, generator=g), torch.randn(1, 2, 11, 4, generator=g), torch.randn(1, 2, 11, 4, generator=g)
    ep = torch.export.export(m, (q, k, v))
    with torch.no_grad():
        want = m(q, k, v)
    with _FlashCalls() as calls:
        _, got = verify.OriginalRuns(ep, [("example inputs", (q, k, v), {})]).get(0)
    assert max_err(want, got[0] if isinstance(got, (tuple, list)) else got) <= 1e-6
    assert calls.calls == ([(True, False)] if fast else [(False, True)])


def test_mask_patterns_read_the_values():
    from compiler.ir.masks import mask_pattern

    tril = torch.ones(7, 7, dtype=torch.bool).tril()
    assert mask_pattern(tril, 7, 7) == "causal"
    assert mask_pattern(tril.view(1, 1, 7, 7).expand(2, 3, 7, 7), 7, 7) == "causal"
    assert mask_pattern(torch.ones(1, 7, dtype=torch.bool), 7, 7) == "all"
    assert mask_pattern(torch.zeros(7, 7).masked_fill(~tril, float("-inf")), 7, 7) == "causal"
    assert mask_pattern(torch.zeros(7, 7).masked_fill(~tril, -3.0), 7, 7) is None  # a bias
    holed = tril.clone()
    holed[5, 2] = False
    assert mask_pattern(holed, 7, 7) is None
    assert mask_pattern(tril[:, :5], 7, 5) == "causal" and mask_pattern(tril[:4], 4, 7) == "causal"
    # Checked a block of rows at a time: a difference in a later block is found too.
    big = torch.ones(5000, 5000, dtype=torch.bool).tril()
    assert mask_pattern(big, 5000, 5000) == "causal"
    big[4000, 4500] = True
    assert mask_pattern(big, 5000, 5000) is None


def _whole_compare(r, n):
    """The oracle: each measure over the whole tensor at once, in float64."""
    r, n = r.double(), n.double()
    p, q = torch.log_softmax(r, -1), torch.log_softmax(n, -1)
    return {"max_abs_error": float((r - n).abs().max()),
            "kl_divergence": float((p.exp() * (p - q)).sum(-1).mean()),
            "cosine_similarity": float(F.cosine_similarity(r.flatten(), n.flatten(), dim=0))}


@pytest.mark.parametrize("shape", [(3, 700, 33), (1, 300, 4096)])
def test_compare_measures_in_slices_as_if_at_once(monkeypatch, shape):
    from compiler.driver import verify

    monkeypatch.setattr(verify, "_SLICE", 5000)  # several slices of whole rows
    g = torch.Generator().manual_seed(0)
    r = torch.randn(shape, generator=g)
    n = r + 1e-3 * torch.randn(shape, generator=g)
    got, want = verify.compare(r, n), _whole_compare(r, n)
    for key, value in want.items():
        assert got[key] == pytest.approx(value, rel=1e-9, abs=1e-15), key
    n[-1, -1, -1] = float("nan")  # one NaN anywhere: no match, and no KL from a leaf that is not finite
    got = verify.compare(r, n)
    assert got["max_abs_error"] == float("inf") and got["passed"] is False and got["kl_divergence"] == 0.0
