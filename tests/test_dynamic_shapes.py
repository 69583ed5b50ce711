"""Dynamic shapes: every spec form torch accepts, compiled, then run at other lengths against eager."""

import subprocess
import sys
import warnings

import pytest
import torch
from torch.export import Dim

import compiler
from compiler.driver import verify
from zoo import _ids, hf_model


class TinyAttention(torch.nn.Module):
    """A plain module: one hand-written attention over (batch, seq, 16)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.qkv = torch.nn.Linear(16, 48)

    def forward(self, x):
        b, s, _ = x.shape
        q, k, v = self.qkv(x).view(b, s, 3, 2, 8).permute(2, 0, 3, 1, 4)
        a = (q @ k.transpose(-1, -2) / 8 ** 0.5).softmax(-1)
        return (a @ v).transpose(1, 2).reshape(b, s, 16)


def _x(s, b=2):
    return torch.randn(b, s, 16, generator=torch.Generator().manual_seed(s))


S = Dim("s", max=60)
PLAIN_SPECS = {
    "auto": "auto",
    "unbounded": ({1: Dim("s")},),
    "Dim.AUTO": ({1: Dim.AUTO},),
    "tuple": ({1: S},),
    "dict": {"x": {1: S}},
}
HF_SPECS = {
    "auto": "auto",
    "unbounded": {"input_ids": {1: Dim("s")}, "attention_mask": {1: Dim("s")}},
    "Dim.AUTO": {"input_ids": {1: Dim.AUTO}, "attention_mask": {1: Dim.AUTO}},
    # input_ids positional, attention_mask by keyword: torch reads the tuple in signature order,
    # and the use_cache=False we add must not shift it.
    "tuple": ({1: S}, {1: S}),
    "dict": {"input_ids": {1: S}, "attention_mask": {1: S}},
}


@pytest.fixture(scope="module")
def plain():
    return TinyAttention().eval()


@pytest.fixture(scope="module")
def gpt2():
    return hf_model("gpt2", "eager")


@pytest.mark.parametrize("name", PLAIN_SPECS)
def test_plain_module(plain, name, one_thread):
    cm = compiler.compile(plain, (_x(7),), dynamic_shapes=PLAIN_SPECS[name], show_progress=False)
    assert cm.report.totals["sites_rewritten"] == 1
    assert "another length (end to end)" in cm.report.fidelity.checked_inputs, cm.report.fidelity.checked_inputs
    for s in (4, 13):
        with torch.no_grad():
            ref = plain(_x(s))
        assert (cm(_x(s)) - ref).abs().max() <= 1e-5


@pytest.mark.parametrize("name", HF_SPECS)
def test_hugging_face_model(gpt2, name, one_thread):
    ids, mask = gpt2.kwargs["input_ids"], gpt2.kwargs["attention_mask"]
    spec = HF_SPECS[name]
    if isinstance(spec, tuple):
        cm = compiler.compile(gpt2.model, (ids,), example_kwargs={"attention_mask": mask}, dynamic_shapes=spec,
                              show_progress=False)
    else:
        cm = compiler.compile(gpt2.model, (), example_kwargs=gpt2.kwargs, dynamic_shapes=spec, show_progress=False)
    assert cm.report.totals["sites_rewritten"] == 2
    assert "another length (end to end)" in cm.report.fidelity.checked_inputs, cm.report.fidelity.checked_inputs
    for s in (4, 12):
        ids, mask = _ids(2, s)
        with torch.no_grad():
            ref = gpt2.model(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
        got = cm(ids, attention_mask=mask) if isinstance(spec, tuple) else cm(input_ids=ids, attention_mask=mask)
        assert (got["last_hidden_state"] - ref).abs().max() <= 1e-5


def _other_lengths(ep, x):
    return [a[0].shape[1] for label, a, _ in verify.verification_inputs(ep, (x,), {}) if label == "another length"]


def test_another_length_stays_inside_bounds(plain):
    x = _x(7)
    assert all(5 <= s <= 9 and s != 7 for s in _other_lengths(compiler.capture(plain, (x,), {"x": {1: Dim("s", min=5, max=9)}}), x))
    assert _other_lengths(compiler.capture(plain, (x,), {"x": {1: Dim("s", min=5, max=9)}}), x)
    # Unbounded (torch's int_oo says it is finite) still gets another length.
    assert _other_lengths(compiler.capture(plain, (x,), ({1: Dim("s")},)), x)
    assert _other_lengths(compiler.capture(plain, (x,)), x) == []


class LengthSensitive(torch.nn.Module):
    """Equal to TinyAttention at length 7 only: what a rewrite that froze the example's length would do."""

    def __init__(self, base):
        super().__init__()
        self.base = base

    def forward(self, x):
        off = (x.new_full((), x.shape[1]) - 7).abs().clamp(max=1)
        return self.base(x) + off


def test_a_difference_at_another_size_is_not_returned(plain):
    from compiler.api import _check_other_size
    from compiler.report.data import FidelityRecord

    spec = {"x": {1: Dim("s", max=60)}}
    ep = compiler.capture(plain, (_x(7),), spec)
    wrong = compiler.capture(LengthSensitive(plain), (_x(7),), spec)
    fid = FidelityRecord(max_abs_error=0.0, kl_divergence=0.0, cosine_similarity=1.0, passed=True)
    with pytest.raises(compiler.VerificationError, match="not at another length"):
        _check_other_size(ep, wrong, (_x(7),), {}, fid, exact=True, budget=None)
    fid = FidelityRecord(max_abs_error=0.0, kl_divergence=0.0, cosine_similarity=1.0, passed=None)
    _check_other_size(ep, wrong, (_x(7),), {}, fid, exact=False, budget=compiler.Fidelity(max_abs_error=0.1))
    assert fid.passed is False and fid.max_abs_error >= 0.5


def test_saved_hugging_face_program_reloads_in_a_fresh_process(tmp_path, one_thread):
    import transformers as tf

    torch.manual_seed(0)
    cfg = tf.GPT2Config(n_embd=32, n_layer=1, n_head=4, vocab_size=100, n_positions=64, bos_token_id=0,
                        eos_token_id=0, attn_implementation="eager")
    model = tf.GPT2LMHeadModel(cfg).eval()
    ids = torch.randint(0, 100, (1, 8))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cm = compiler.compile(model, (ids,), show_progress=False)
        cm.save(tmp_path / "lm.pt2")
    assert not [w for w in caught if "LeafSpec" in str(w.message)]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lm.pt2", "lm.pt2.plan.json"]
    torch.save(ids, tmp_path / "ids.pt")
    code = (f"import compiler, torch; ep = torch.export.load({str(tmp_path / 'lm.pt2')!r}); "
            f"out = ep.module()(torch.load({str(tmp_path / 'ids.pt')!r}), use_cache=False); "
            "print(type(out).__name__); torch.save(out['logits'], " + repr(str(tmp_path / "logits.pt")) + ")")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.split() == ["CausalLMOutputWithCrossAttentions"]
    with torch.no_grad():
        ref = model(ids, use_cache=False).logits
    assert (torch.load(tmp_path / "logits.pt") - ref).abs().max() <= 1e-5
    assert (compiler.load(tmp_path / "lm.pt2")(ids)["logits"] - ref).abs().max() <= 1e-5


def test_load_names_the_real_cause(tmp_path):
    bad = tmp_path / "x.pt2"
    bad.write_text("not a zip")
    with pytest.raises(compiler.InputError, match="not a zip file"):
        compiler.load(bad)
    with pytest.raises(compiler.InputError, match="is a folder"):
        compiler.load(tmp_path)
