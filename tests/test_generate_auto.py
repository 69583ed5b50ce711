"""policy="auto" for generation (compiler.driver.generate_auto): which KV heads stream, under a budget.

References are computed here from the model itself: its own full-history forward (exact), and
the same with dense masked attention over a head's sinks + window keep set (test_generate's
reference model), teacher-forced on the same sequences."""

import pytest
import torch

import compiler
from compiler.driver.generate import compile_generator
from test_generate import VOCAB, _hf_generate, _reference_model, llama_case

STREAMING = "sinks:2,window:8"
SINKS, WINDOW = 2, 8
NEW = 24


@pytest.fixture(scope="module")
def llama(one_thread):
    model, _, _, ep = llama_case()
    torch.manual_seed(11)
    calibration = [torch.randint(1, VOCAB, (1, 20)) for _ in range(2)]
    held_out = [torch.randint(1, VOCAB, (1, 20)) for _ in range(3)]
    return model, ep, calibration, held_out


def _auto(ep, calibration, **budget):
    return compile_generator(ep, policy="auto", calibration=calibration, budget=compiler.Fidelity(**budget),
                             streaming=STREAMING, calibration_tokens=NEW)


@pytest.fixture(scope="module")
def searched(llama):
    """The search at a zero and a loose budget, shared by the tests that read them."""
    _, ep, calibration, _ = llama
    return {kl: _auto(ep, calibration, max_kl=kl) for kl in (0.0, 0.05)}


def _teacher_forced(model, seq, prompt_len):
    """Next-token logits of a full-history forward at the decode steps after ``prompt_len``."""
    with torch.no_grad():
        return model(seq, use_cache=False).logits[0, prompt_len - 1:-1].float()


def _kl(ref, new):
    p, q = ref.double().log_softmax(-1), new.double().log_softmax(-1)
    return float((p.exp() * (p - q)).sum(-1).mean())


def _streaming_heads(gen):
    """{(layer, query head)} the generator's layouts give a ring."""
    out = set()
    for rec in gen.report.sites:
        rep = rec.num_heads // rec.num_kv_heads
        for part in rec.layout.split("|"):
            heads, kind = part.split(":", 1)
            if kind != "full":
                lo, _, hi = heads.partition("-")
                for kv in range(int(lo), int(hi or lo) + 1):
                    out |= {(rec.layer, h) for h in range(kv * rep, (kv + 1) * rep)}
    return out


def test_zero_budget_keeps_every_head_full(llama, searched):
    model, ep, calibration, held_out = llama
    gen = searched[0.0]
    assert gen.report.auto["chosen"] == {"*": "fused"} and gen.report.auto["streaming_kv_heads"] == 0
    assert all(s.layout == "0-1:full" for s in gen.report.sites)
    ref_tokens, ref_logits = _hf_generate(model, held_out[0], 32)
    assert torch.equal(gen.generate(held_out[0], 32), ref_tokens)
    assert (gen.last_logits - ref_logits).abs().max().item() < 1e-4
    # Every head was measured, and each one alone changes the distributions (the window is short).
    assert len(gen.report.auto["heads"]) == 4 and all(h["kl_divergence"] > 0 for h in gen.report.auto["heads"])


def test_loose_budget_streams_heads_and_holds_on_held_out_prompts(llama, searched):
    model, ep, calibration, held_out = llama
    budget = 0.05
    gen = searched[budget]
    rec = gen.report.auto
    streaming = _streaming_heads(gen)
    assert rec["streaming_kv_heads"] >= 2 and len(streaming) == 2 * rec["streaming_kv_heads"]
    assert rec["calibration_fidelity"]["kl_divergence"] <= budget * rec["margin"]
    # Cache bytes: what the buffers hold, and what the report says was saved.
    real = sum(b.nbytes for k, b in gen.module.named_buffers() if k.startswith("attnforge_kv_"))
    assert gen.cache_bytes == real == rec["cache_bytes"] < rec["full_cache_bytes"]
    assert rec["bytes_saved"] == rec["full_cache_bytes"] - real
    # The chosen generator is the reference model with those heads streaming, on held-out prompts,
    # and its divergence from the exact model there stays within the budget.
    ref = _reference_model(model, lambda layer, head: (SINKS, WINDOW) if (layer, head) in streaming else None)
    for p in held_out:
        seq = _hf_generate(model, p, NEW)[0]
        ours = gen.score(seq, p.shape[1])
        assert (ours - _teacher_forced(ref, seq, p.shape[1])).abs().max().item() < 1e-4
        assert _kl(_teacher_forced(model, seq, p.shape[1]), ours) <= budget


def test_reported_head_effect_is_the_measured_one(llama, searched):
    """Each head's reported KL is the reference model's with that head alone streaming, teacher-forced
    on the calibration continuations (worst prompt, mean over steps)."""
    model, ep, calibration, _ = llama
    rec = searched[0.0].report.auto
    seqs = [(_hf_generate(model, p, NEW)[0], p.shape[1]) for p in calibration]
    for h in rec["heads"][:2]:
        qs = set(h["query_heads"])
        ref = _reference_model(model, lambda layer, head: (SINKS, WINDOW) if (layer == h["layer"] and head in qs)
                               else None)
        kl = max(_kl(_teacher_forced(model, s, n), _teacher_forced(ref, s, n)) for s, n in seqs)
        assert kl == pytest.approx(h["kl_divergence"], rel=1e-3, abs=1e-7)


def test_choice_is_deterministic_and_follows_the_budget(llama, searched):
    _, ep, calibration, _ = llama
    a = searched[0.05].report.auto
    b = _auto(ep, calibration, max_kl=0.05).report.auto
    assert a["chosen"] == b["chosen"] and a["heads"] == b["heads"]
    # A budget between the least harmful head's effect and what two heads cost keeps some heads
    # full, and the least harmful head is among the streaming ones.
    assert a["streaming_kv_heads"] == 4
    least = min(a["heads"], key=lambda h: h["kl_divergence"])
    tight = _auto(ep, calibration, max_kl=2 * least["kl_divergence"] * 1.01).report.auto
    streaming = [(h["site"], h["kv_head"]) for h in tight["heads"] if h["streaming"]]
    assert 1 <= len(streaming) < 4 and (least["site"], least["kv_head"]) in streaming
    assert tight["calibration_fidelity"]["kl_divergence"] <= least["kl_divergence"] * 1.01


@pytest.mark.parametrize("kwargs, error, message", [
    ({}, compiler.PolicyError, r"policy='auto' needs a budget"),
    ({"budget": compiler.Fidelity(max_kl=0.1), "streaming": "topk:blocks=2"}, compiler.PolicyError,
     r"streaming='topk:blocks=2': give the streaming heads' cache as sinks:S,window:W"),
    ({"budget": compiler.Fidelity(max_kl=0.1), "calibration": [torch.ones(4)]}, compiler.InputError,
     r"calibration prompt 0 must be a \[1, n\] tensor"),
])
def test_auto_bad_input(llama, kwargs, error, message):
    _, ep, _, _ = llama
    with pytest.raises(error, match=message):
        compile_generator(ep, policy="auto", **kwargs)


def test_cli_generate_auto(llama, tmp_path, capsys):
    import json

    from compiler.cli import main

    model, ep, _, held_out = llama
    path = tmp_path / "llama.pt2"
    torch.export.save(ep, path)
    prompt = ",".join(map(str, held_out[1][0].tolist()))
    report = tmp_path / "gen.json"
    assert main(["generate", str(path), "--prompt-ids", prompt, "--policy", "auto", "--max-kl", "0",
                 "--streaming", STREAMING, "--max-new-tokens", "16", "--report", str(report)]) == 0
    ref_tokens = _hf_generate(model, held_out[1], 16)[0]
    assert capsys.readouterr().out.splitlines()[0] == ",".join(map(str, ref_tokens[0, 20:].tolist()))
    rec = json.loads(report.read_text())["auto"]
    assert rec["chosen"] == {"*": "fused"} and len(rec["heads"]) == 4 and rec["budget"] == {"max_kl": 0.0}
    assert main(["generate", str(path), "--prompt-ids", prompt, "--policy", "auto"]) == 2
    assert capsys.readouterr().err.strip().endswith("--policy auto needs a budget: give --max-kl, e.g. --max-kl 0.01")
