"""policy="auto": per-site variants chosen under an end-to-end fidelity budget."""

import json
import subprocess
import sys

import pytest
import torch

import compiler
from compiler.minilm import load_minilm
from compiler.driver.verify import compare
from zoo import hf_model

LENGTH = 80  # five 16-token blocks: long enough for sparse patterns to save work

CALIBRATION = (
    "The lighthouse keeper climbed the stairs every evening at dusk, carrying a can of oil and a cloth to clean "
    "the great lens. From the lamp room he could see the whole bay, the fishing boats coming home, the gulls "
    "settling on the rocks, and far out the dark line where the sea met the sky. He wrote the weather in a "
    "logbook, the wind and the swell and the colour of the clouds, and in forty years he had never missed a night.",
    "Matrix multiplication is the workhorse of deep learning. A transformer layer multiplies its input by weight "
    "matrices to form queries, keys and values, multiplies queries by keys to score every pair of positions, "
    "and multiplies the normalised scores by the values to mix information across the sequence. Making these "
    "products fast, and skipping the ones that do not matter, is most of what an inference compiler does.",
    "In the spring the orchard filled with blossom, white and pale pink, and the air hummed with bees from the "
    "hives at the edge of the field. The farmer walked between the rows each morning, checking the buds for "
    "frost and the leaves for the first signs of disease. By midsummer the branches bent under green fruit, and "
    "by autumn the whole village came to help with the harvest, filling crates that were stacked in the barn.",
    "A city's transport network is a graph: stations are nodes, and lines between them are edges with travel "
    "times as weights. Planners simulate millions of journeys to find where trains are overcrowded and where a "
    "new connection would save the most time. Small changes, such as a faster transfer at one busy station, can "
    "shorten thousands of trips, while a new line in the wrong place may carry almost nobody at all.",
)
HELD_OUT = (
    "The museum's oldest map shows the coast as sailors saw it five centuries ago, with headlands drawn too "
    "large and rivers that do not exist. Sea monsters swim in the empty ocean, and the edges of the known world "
    "are decorated with winds blowing from the mouths of painted faces. Historians study such maps not for their "
    "accuracy but for what they reveal about the people who made them and what they feared and hoped to find.",
    "Caching stores the result of an expensive computation so that the next request for the same result can be "
    "answered quickly. The hard part is knowing when a cached value is no longer valid. A stale cache returns "
    "wrong answers silently, which is worse than being slow, so good systems track what each cached value "
    "depends on and throw it away as soon as any of those inputs change, even if that costs some speed.",
)


@pytest.fixture(scope="module")
def mini():
    return load_minilm("eager")


def _batch(mini, texts):
    enc = mini.encode_inputs(texts, max_length=LENGTH)
    assert enc["input_ids"].shape == (len(texts), LENGTH) and bool(enc["attention_mask"].all())
    return enc


@pytest.mark.parametrize("min_cosine", [0.99, pytest.param(0.95, marks=pytest.mark.slow)])
def test_minilm_budget_holds_on_held_out_text(mini, min_cosine):
    cal = [_batch(mini, CALIBRATION[:2]), _batch(mini, CALIBRATION[2:])]
    held = _batch(mini, HELD_OUT)
    budget = compiler.Fidelity(min_cosine=min_cosine)
    cm = compiler.compile(mini.model, (), "auto", example_kwargs=cal[0], calibration=cal, budget=budget)
    rep = cm.report
    assert [s.status for s in rep.sites] == ["rewritten"] * 6
    # The report names each site's choice and the fidelity measured on calibration data.
    assert rep.auto["chosen"] == {s.id: s.variant for s in rep.sites}
    assert rep.auto["verified_calibration_fidelity"]["cosine_similarity"] >= min_cosine
    assert rep.budget == {"min_cosine": min_cosine} and rep.fidelity.passed
    with torch.no_grad():
        ref = mini.model(**held).last_hidden_state
    got = cm(**held)["last_hidden_state"]
    assert compare(ref, got)["cosine_similarity"] >= min_cosine
    if min_cosine == 0.95:
        assert rep.totals["attention_flops_saved_pct"] > 0
        approx = [s for s in rep.sites if s.variant != "fused"]
        assert approx and all(s.density < 1.0 and s.cosine_similarity is not None for s in approx)


def test_unreachable_budget_keeps_every_site_exact():
    z = hf_model("llama", "eager")
    cm = compiler.compile(z.model, z.args, "auto", example_kwargs=z.kwargs,
                          budget=compiler.Fidelity(max_abs_error=0.0))
    assert [s.variant for s in cm.report.sites] == ["fused", "fused"]
    fused = compiler.compile(z.model, z.args, "fused", example_kwargs=z.kwargs)
    assert cm.report.totals["attention_flops_after"] == fused.report.totals["attention_flops_after"]


def test_auto_needs_a_budget():
    z = hf_model("bert", "eager")
    with pytest.raises(compiler.PolicyError, match="needs a budget"):
        compiler.compile(z.model, z.args, "auto", example_kwargs=z.kwargs)
    with pytest.raises(compiler.PolicyError, match="at least one"):
        compiler.Fidelity()


def test_calibration_batch_of_another_shape_is_a_clear_error():
    z = hf_model("bert", "eager")
    other = {k: v[:, :5] for k, v in z.kwargs.items()}
    with pytest.raises(compiler.InputError, match="calibration batch 1 does not fit"):
        compiler.compile(z.model, z.args, "auto", example_kwargs=z.kwargs, calibration=[z.kwargs, other],
                         budget=compiler.Fidelity(min_cosine=0.9))


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "compiler.cli", *args], capture_output=True, text=True, timeout=600)


def test_cli_auto_with_calibration_file(tmp_path):
    z = hf_model("bert", "eager")
    ep = compiler.capture(z.model, (), example_kwargs=z.kwargs)
    src, out, rep, calib = tmp_path / "m.pt2", tmp_path / "o.pt2", tmp_path / "r.json", tmp_path / "c.pt"
    torch.export.save(ep, src)
    g = torch.Generator().manual_seed(5)
    batches = [dict(z.kwargs), {"input_ids": torch.randint(0, 100, z.kwargs["input_ids"].shape, generator=g),
                                "attention_mask": z.kwargs["attention_mask"]}]
    torch.save(batches, calib)
    r = _cli("rewrite", str(src), "-o", str(out), "--policy", "auto", "--calibration", str(calib),
             "--min-cosine", "0.9", "--report", str(rep), "-q")
    assert r.returncode == 0, r.stderr
    d = json.loads(rep.read_text())
    assert d["budget"] == {"min_cosine": 0.9} and d["auto"]["calibration_batches"] == 2
    assert d["auto"]["verified_calibration_fidelity"]["cosine_similarity"] >= 0.9
    assert out.exists()

    r = _cli("rewrite", str(src), "-o", str(tmp_path / "x.pt2"), "--policy", "auto")
    assert r.returncode == 2 and "needs a budget" in r.stderr and not (tmp_path / "x.pt2").exists()
    # An explicit approximate policy that misses an explicit budget writes nothing.
    r = _cli("rewrite", str(src), "-o", str(tmp_path / "y.pt2"), "--policy", "linear:relu", "--min-cosine", "0.99999")
    assert r.returncode == 2 and "misses the budget" in r.stderr and not (tmp_path / "y.pt2").exists()
