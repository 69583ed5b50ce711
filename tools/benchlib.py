"""Shared by the benchmark scripts in tools/ (each runs as ``python tools/NAME.py``)."""

from __future__ import annotations

import csv
import datetime
import gc
import importlib.metadata
import os
import shlex
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional


def write_csv(rows: list[dict], path) -> Path:
    path = Path(path)
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    print(f"wrote {path}")
    return path


# --- the machine -----------------------------------------------------------------------------


def mem_available_bytes() -> int:
    """MemAvailable from /proc/meminfo (what can be allocated without swapping); 0 if unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def machine() -> str:
    """``lscpu``'s model name and core count, and the memory: "AMD EPYC, 2 cores, 23 GiB"."""
    model, cpus = "unknown CPU", os.cpu_count()
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        for line in out.splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "Model name":
                model = value.strip()
            elif key.strip() == "CPU(s)":
                cpus = int(value.strip())
    except (OSError, ValueError, subprocess.SubprocessError):
        pass
    mem = ""
    try:
        with open("/proc/meminfo") as f:
            kb = int(f.readline().split()[1])
        mem = f", {kb / 2**20:.0f} GiB"
    except (OSError, ValueError, IndexError):
        pass
    return f"{model}, {cpus} cores{mem}"


def versions(*packages: str) -> str:
    out = []
    for p in packages:
        try:
            out.append(f"{p} {importlib.metadata.version(p)}")
        except importlib.metadata.PackageNotFoundError:
            out.append(f"{p} (not installed)")
    return ", ".join(out)


def command_line() -> str:
    return "python " + " ".join(shlex.quote(a) for a in sys.argv)


def today() -> str:
    return datetime.date.today().isoformat()


def first_line(e: BaseException, limit: int = 160) -> str:
    text = (str(e).strip().splitlines() or [""])[0]
    return f"{type(e).__name__}: {text}"[:limit]


# --- timing ----------------------------------------------------------------------------------


@dataclass
class Contender:
    """One thing to time. ``call`` runs it once and returns its output; ``status`` is "ok" or why not."""

    name: str
    call: Optional[Callable[[], Any]] = None
    status: str = "ok"
    note: str = ""
    times: list = field(default_factory=list)
    output: Any = None  # the warm-up call's output, for checking
    planned: int = 0

    @property
    def ok(self) -> bool:
        return self.status == "ok" and self.call is not None

    @property
    def ms(self) -> Optional[float]:
        return statistics.median(self.times) * 1e3 if self.times else None

    def fail(self, status: str) -> None:
        self.status, self.call, self.output = status, None, None


def time_interleaved(contenders: list, *, min_repeats: int = 3, max_repeats: int = 10, budget_s: float = 20.0,
                     label: str = "", keep_outputs: bool = True) -> list:
    """Medians over interleaved repeats: repeats outside, contenders inside, so drift hits all alike.

    One untimed warm-up call each first (its output kept in ``c.output``); its time sets how many
    repeats fit in ``budget_s`` for that contender, between ``min_repeats`` and ``max_repeats``.
    A contender whose call raises is marked failed and the rest go on.
    """
    from compiler.progress import progress

    for c in contenders:
        if not c.ok:
            continue
        try:
            t0 = time.perf_counter()
            out = c.call()
            dt = time.perf_counter() - t0
        except Exception as e:  # noqa: BLE001 - a contender that cannot run is a result, not a crash
            c.fail(f"failed ({first_line(e)})")
            continue
        c.output = out if keep_outputs else None
        c.planned = max(min_repeats, min(max_repeats, int(budget_s / max(dt, 1e-6))))
    live = [c for c in contenders if c.ok]
    rounds = max((c.planned for c in live), default=0)
    with progress(label or "timing", sum(c.planned for c in live)) as advance:
        for r in range(rounds):
            for c in live:
                if r >= c.planned or not c.ok:
                    continue
                try:
                    t0 = time.perf_counter()
                    c.call()
                    c.times.append(time.perf_counter() - t0)
                except Exception as e:  # noqa: BLE001
                    c.fail(f"failed ({first_line(e)})")
                advance()
    gc.collect()
    return contenders


# --- tables ----------------------------------------------------------------------------------


def fmt(value, digits: int = 3) -> str:
    if value is None or value == "":
        return ""
    if isinstance(value, float):
        if value != 0 and (abs(value) < 10 ** -(digits - 1) or abs(value) >= 1e6):
            return f"{value:.1e}"
        return f"{value:.{digits}g}" if abs(value) < 10 ** digits else f"{value:.0f}"
    return str(value)


def print_table(rows: list[dict], columns: list[str], title: str = "") -> None:
    """A rich table on stdout (plain text when stdout is not a terminal)."""
    from rich.console import Console
    from rich.table import Table

    t = Table(title=title or None, show_lines=False)
    for col in columns:
        t.add_column(col, overflow="fold")
    for r in rows:
        t.add_row(*(fmt(r.get(c)) for c in columns))
    Console(width=max(160, len(columns) * 14)).print(t)


def markdown_table(rows: list[dict], columns: list[str], headers: Optional[list[str]] = None) -> str:
    head = headers or columns
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        lines.append("| " + " | ".join(fmt(r.get(c)).replace("|", "\\|") for c in columns) + " |")
    return "\n".join(lines)
