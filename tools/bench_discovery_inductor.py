"""Sites found by attnforge vs Inductor's fuse_attention on Inductor's own attention patterns.

    python tools/bench_discovery_inductor.py [--out docs/discovery_inductor.csv]

The patterns are tests/inductor_patterns.py: torch 2.13's ``_sfdp_pattern_1..30`` and the cases
of its test_fused_attention.py, as small modules at tiny sizes, in eval mode, on CPU. For each:
sites attnforge rewrites (compile() with verification) and its max error against eager, and the
sites Inductor fuses (``counters["inductor"]["fuse_attention"]`` after a torch.compile first call),
in one run.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import compiler  # noqa: E402
from bench_discovery import inductor_sites  # noqa: E402
from benchlib import write_csv  # noqa: E402
from compare import max_err  # noqa: E402
from inductor_patterns import BEYOND, NEGATIVE, PATTERNS, module_for  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="docs/discovery_inductor.csv")
    a = ap.parse_args()
    rows = []
    for kind, group in (("pattern", PATTERNS), ("negative", NEGATIVE), ("inductor-refuses", BEYOND)):
        for p in group:
            model, x = module_for(p), p.inputs()
            cm = compiler.compile(model, x, show_progress=False)
            with torch.no_grad():
                err = max_err(model(*x), cm(*x))
            try:
                ind, _ = inductor_sites(model, dict(zip("abcd", x)))
            except Exception as e:  # noqa: BLE001 - a peer failure is a data point, not our crash
                print(f"{p.name}: inductor failed: {type(e).__name__}: {str(e)[:120]}", flush=True)
                ind = None
            rows.append({"pattern": p.name, "kind": kind, "attnforge_sites": cm.report.totals["sites_rewritten"],
                         "attnforge_max_abs_error": f"{err:.1e}", "inductor_sites": ind})
            print(rows[-1], flush=True)
    for kind in ("pattern", "negative", "inductor-refuses"):
        sel = [r for r in rows if r["kind"] == kind]
        print(f"{kind}: {len(sel)} cases, attnforge {sum(r['attnforge_sites'] for r in sel)}, "
              f"inductor {sum(r['inductor_sites'] or 0 for r in sel)}")
    write_csv(rows, a.out)


if __name__ == "__main__":
    main()
