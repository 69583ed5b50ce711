"""Shared by the benchmark scripts in tools/ (each runs as ``python tools/NAME.py``)."""

from __future__ import annotations

import csv
from pathlib import Path


def write_csv(rows: list[dict], path) -> Path:
    path = Path(path)
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    print(f"wrote {path}")
    return path
