"""policy="auto" on the real all-MiniLM-L6-v2 at its maximum length, for several budgets.

    python tools/bench_minilm_budget.py [--budgets 0.999 0.99 0.95] [--length 256]

Texts are pairs of the long paragraphs shipped in compiler.minilm (no padding at 256 tokens).
Calibration: two batches of two texts; held out: two other texts. For each min_cosine budget we
report the attention FLOPs saved, each site's variant, the fidelity on the calibration batches
and on the held-out batch (hidden states: max abs error, KL, cosine; sentence embeddings: lowest
cosine), and the compile time. Writes docs/minilm_budget.csv.
"""

from __future__ import annotations

import argparse
import time

import torch

import compiler
from compiler.minilm import PARAGRAPHS, load_minilm, sentence_embeddings
from compiler.variants.language import compact_text
from compiler.driver.verify import compare
from benchlib import write_csv


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--budgets", type=float, nargs="+", default=[0.999, 0.99, 0.95])
    ap.add_argument("--length", type=int, default=256)
    ap.add_argument("--out", default="docs/minilm_budget.csv")
    a = ap.parse_args()
    mini = load_minilm("eager")
    texts = [PARAGRAPHS[i] + " " + PARAGRAPHS[(i + 1) % len(PARAGRAPHS)] for i in range(len(PARAGRAPHS))]

    def batch(ts):
        enc = mini.encode_inputs(ts, max_length=a.length)
        assert enc["input_ids"].shape[1] == a.length and bool(enc["attention_mask"].all()), "texts too short"
        return enc

    cal = [batch(texts[0:2]), batch(texts[2:4])]
    held = batch(texts[4:6])
    with torch.no_grad():
        ref = mini.model(**held).last_hidden_state
    ref_emb = sentence_embeddings(ref, held["attention_mask"])
    rows = []
    for c in a.budgets:
        t0 = time.perf_counter()
        cm = compiler.compile(mini.model, (), "auto", example_kwargs=cal[0], calibration=cal,
                              budget=compiler.Fidelity(min_cosine=c))
        secs = time.perf_counter() - t0
        got = cm(**held)["last_hidden_state"]
        h = compare(ref, got)
        emb = torch.nn.functional.cosine_similarity(ref_emb, sentence_embeddings(got, held["attention_mask"]), dim=-1)
        calf = cm.report.auto["verified_calibration_fidelity"]
        rows.append({
            "min_cosine": c, "flops_saved_pct": cm.report.totals["attention_flops_saved_pct"],
            "variants": " | ".join(compact_text(s.variant) for s in cm.report.sites),
            "calibration_cosine": round(calf["cosine_similarity"], 6),
            "heldout_cosine": round(h["cosine_similarity"], 6), "heldout_kl": f"{h['kl_divergence']:.2e}",
            "heldout_max_abs": round(h["max_abs_error"], 4), "heldout_embedding_cosine_min": round(float(emb.min()), 6),
            "trials": len(cm.report.auto["trials"]), "compile_s": round(secs, 1),
        })
        print(rows[-1], flush=True)
    write_csv(rows, a.out)


if __name__ == "__main__":
    main()
