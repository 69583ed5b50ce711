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
    """The exception's type and first line; for ONNX Runtime, the message after its source-path prefix."""
    text = (str(e).strip().splitlines() or [""])[0]
    if "[ONNXRuntimeError]" in text:
        return text.rsplit("[ONNXRuntimeError] : ", 1)[-1].split(" : ", 2)[-1][:limit]
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
    error: Optional[float] = None  # max abs error of that output, where checked
    planned: int = 0
    group: int = 0  # which memory group it was timed in (time_in_memory_groups)

    @property
    def ok(self) -> bool:
        return self.status == "ok" and self.call is not None

    @property
    def ms(self) -> Optional[float]:
        return statistics.median(self.times) * 1e3 if self.times else None

    def fail(self, status: str) -> None:
        self.status, self.call, self.output = status, None, None


_last_call_s = 0.0


def _pause(gap_s: float) -> None:
    """Sleep ``gap_s``, longer after a long call (30% of it, up to 1 s): worker threads that spin
    after a run slow whatever runs next; see ``time_interleaved``."""
    time.sleep(max(gap_s, min(1.0, 0.3 * _last_call_s)) if gap_s > 0 else 0.0)


def _timed(call) -> tuple[Any, float]:
    global _last_call_s
    t0 = time.perf_counter()
    try:
        out = call()
    finally:
        _last_call_s = time.perf_counter() - t0
    return out, _last_call_s


class NotRun(Exception):
    """Raised by a contender's maker: it will not run, with this status ("n/a (...)") and note."""

    def __init__(self, status: str, note: str = ""):
        super().__init__(status)
        self.status, self.note = status, note


def warm_up(c: Contender, *, min_repeats: int, max_repeats: int, budget_s: float, keep_output: bool,
            gap_s: float) -> None:
    """One untimed call (its output kept in ``c.output``); its time sets ``c.planned``, the number of
    repeats that fit in ``budget_s``, between ``min_repeats`` and ``max_repeats``."""
    _pause(gap_s)
    try:
        out, dt = _timed(c.call)
    except Exception as e:  # noqa: BLE001 - a contender that cannot run is a result, not a crash
        c.fail(f"failed ({first_line(e)})")
        return
    c.output = out if keep_output else None
    c.planned = max(min_repeats, min(max_repeats, int(budget_s / max(dt, 1e-6))))


def time_repeats(live: list, *, label: str = "", gap_s: float = 0.1) -> None:
    """The timed calls, interleaved: repeats outside, contenders inside, so drift hits all alike."""
    from compiler.driver.progress import progress

    live = [c for c in live if c.ok]
    with progress(label or "timing", sum(c.planned for c in live)) as advance:
        for r in range(max((c.planned for c in live), default=0)):
            for c in live:
                if r >= c.planned or not c.ok:
                    continue
                _pause(gap_s)
                try:
                    c.times.append(_timed(c.call)[1])
                except Exception as e:  # noqa: BLE001
                    c.fail(f"failed ({first_line(e)})")
                advance()


def time_interleaved(contenders: list, *, min_repeats: int = 3, max_repeats: int = 10, budget_s: float = 20.0,
                     label: str = "", keep_outputs: bool = True, gap_s: float = 0.1) -> list:
    """Medians over interleaved repeats after one warm-up call each (see ``warm_up``, ``time_repeats``).

    ``gap_s``: an untimed pause before every call (longer after a long call: 30% of it, up to 1 s).
    ONNX Runtime's and OpenMP's worker threads spin for tens of ms after a run; on a small machine
    that spinning slows whichever contender runs next (by 20-40% on 2 cores), which interleaving
    would otherwise charge to its neighbour.
    """
    for c in contenders:
        if c.ok:
            warm_up(c, min_repeats=min_repeats, max_repeats=max_repeats, budget_s=budget_s,
                    keep_output=keep_outputs, gap_s=gap_s)
    time_repeats(contenders, label=label, gap_s=gap_s)
    gc.collect()
    return contenders


def time_in_memory_groups(contenders: list, makers: list, needs: Optional[list] = None, *,
                          on_group_done: Optional[Callable[[list], None]] = None, headroom: float = 0.9,
                          reserve_bytes: float = 1.5 * 2**30, min_repeats: int = 3, max_repeats: int = 10,
                          budget_s: float = 20.0, label: str = "", keep_outputs: bool = True,
                          gap_s: float = 0.1) -> int:
    """``time_interleaved`` for contenders that may not all fit in memory at once.

    ``makers[i]()`` builds contender i (returns its call, or (call, note); raises ``NotRun`` or
    fails) just before its warm-up. Sessions that keep their peak buffers (ONNX Runtime's CPU
    arena does, until the session is freed) add up, so before each build the next contender's
    need (``needs[i]`` in bytes, or the largest growth seen so far in this call) is checked
    against MemAvailable; when it does not fit, the group so far is timed interleaved, handed to
    ``on_group_done`` (outputs still there), its calls dropped and a new group started. Each
    contender's ``group`` is set; returns the number of groups.
    """
    group: list = []
    n_groups, biggest = 1, 0.0

    def finish() -> None:
        time_repeats(group, label=label + (f" (group {n_groups})" if n_groups > 1 else ""), gap_s=gap_s)
        if on_group_done is not None:
            on_group_done(list(group))
        for c in group:  # free the sessions (and their arenas) before the next group is built
            c.call, c.output = None, None
        group.clear()
        gc.collect()

    for i, c in enumerate(contenders):
        if c.status != "ok":
            continue
        need = needs[i] if needs is not None and needs[i] is not None else biggest
        if group and need > headroom * mem_available_bytes() - reserve_bytes:
            finish()
            n_groups += 1
        before = mem_available_bytes()
        try:
            made = makers[i]()
        except NotRun as e:
            c.status, c.note = e.status, "; ".join(x for x in (c.note, e.note) if x)
            continue
        except Exception as e:  # noqa: BLE001 - a contender that cannot be built is a result
            c.fail(f"failed ({first_line(e, 200)})")
            continue
        c.call, extra = made if isinstance(made, tuple) else (made, "")
        c.note = "; ".join(x for x in (c.note, extra) if x)
        warm_up(c, min_repeats=min_repeats, max_repeats=max_repeats, budget_s=budget_s, keep_output=keep_outputs,
                gap_s=gap_s)
        biggest = max(biggest, before - mem_available_bytes())
        c.group = n_groups
        if c.ok:
            group.append(c)
    finish()
    return n_groups


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
