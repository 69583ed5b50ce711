"""The real all-MiniLM-L6-v2 weights: embeddings after the rewrite equal those before."""

import subprocess
import sys

import pytest
import torch

import compiler
from compiler.minilm import SENTENCES, load_minilm, sentence_embeddings


@pytest.fixture(scope="module")
def mini():
    return load_minilm("eager")


def test_embeddings_unchanged(mini):
    inputs = mini.encode_inputs(SENTENCES)
    cm = compiler.compile(mini.model, (), example_kwargs=inputs)
    assert [s.status for s in cm.report.sites] == ["rewritten"] * 6
    assert all(s.num_heads == 12 and s.head_dim == 32 and not s.causal for s in cm.report.sites)
    with torch.no_grad():
        before = sentence_embeddings(mini.model(**inputs).last_hidden_state, inputs["attention_mask"])
    # Other sentences than the ones compiled with, same padded length.
    other = mini.encode_inputs(["short", "a somewhat longer sentence about graphs", "x y z", "attention"],
                               max_length=inputs["input_ids"].shape[1])
    other = {k: torch.nn.functional.pad(v, (0, inputs["input_ids"].shape[1] - v.shape[1])) for k, v in other.items()}
    after = sentence_embeddings(cm(**inputs)["last_hidden_state"], inputs["attention_mask"])
    assert float((before - after).abs().max()) <= 1e-5
    with torch.no_grad():
        ref_o = sentence_embeddings(mini.model(**other).last_hidden_state, other["attention_mask"])
    got_o = sentence_embeddings(cm(**other)["last_hidden_state"], other["attention_mask"])
    assert float((ref_o - got_o).abs().max()) <= 1e-5


def test_demo_prints_report():
    r = subprocess.run([sys.executable, "-m", "compiler.cli", "demo"], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "attention_discovery" in r.stdout and "attn.5" in r.stdout
    assert "sites found 6, rewritten 6" in r.stdout


def test_onnxruntime_rounding_is_told_apart_from_a_wrong_lowering(mini, monkeypatch):
    # onnxruntime's kernels round this 6-layer model beyond the exact 1e-5 relative tolerance even
    # unrewritten; compile() measures that rounding on the original program and allows twice it.
    inputs = mini.encode_inputs(SENTENCES)
    cm = compiler.compile(mini.model, (), "fused", "onnxruntime", example_kwargs=inputs,
                          backend_options={"intra_op_num_threads": 1})
    low, fid = cm.report.lowering, cm.report.fidelity
    with torch.no_grad():
        ref = mini.model(**inputs).last_hidden_state
    err = float((cm(**inputs)["last_hidden_state"] - ref).abs().max())
    exact = 1e-5 * float(ref.abs().max())
    assert fid.passed is True and fid.max_abs_error == pytest.approx(err, rel=1e-6)
    assert err > exact  # the case this is about: over the exact tolerance
    rounding = low["rounding_of_original"]
    assert rounding is not None and exact < rounding < 1e-3
    assert err <= fid.tolerance == pytest.approx(exact + 2 * rounding, rel=1e-6)
    # Where the original's dense attention would not fit the probe's budget, the rounding is not
    # measured, and the difference is reported as it is: one line, nothing returned.
    from compiler import api
    from compiler.ir.errors import VerificationError

    monkeypatch.setattr(api, "ROUNDING_PROBE_BYTES", 0)
    with pytest.raises(VerificationError, match="own rounding of the original model could not be measured"):
        compiler.compile(mini.model, (), "fused", "onnxruntime", example_kwargs=inputs,
                         backend_options={"intra_op_num_threads": 1})
