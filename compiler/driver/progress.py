"""Progress bars for long steps: shown on a terminal, silent when piped or asked to be quiet."""

from __future__ import annotations

import contextlib
import sys
from typing import Callable, Iterator, Optional


@contextlib.contextmanager
def progress(description: str, total: int, enabled: Optional[bool] = None) -> Iterator[Callable[[], None]]:
    """Yields ``advance()``. ``enabled=None`` shows the bar only when stderr is a terminal."""
    if enabled is None:
        enabled = sys.stderr.isatty()
    if not enabled:
        yield lambda: None
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task(description, total=total)
        yield lambda: bar.advance(task)


@contextlib.contextmanager
def status(description: str, enabled: Optional[bool] = None) -> Iterator[None]:
    """A spinner for one long step of unknown length (capture, loading)."""
    if enabled is None:
        enabled = sys.stderr.isatty()
    if not enabled:
        yield
        return
    from rich.console import Console

    with Console(stderr=True).status(description):
        yield


@contextlib.contextmanager
def quiet_dependencies() -> Iterator[None]:
    """Warnings our dependencies raise about their own internals, which a user cannot act on.

    torch 2.13 warns about its own deprecated ``LeafSpec`` on every deep copy of a program's input
    spec, which every compile makes.
    """
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)", category=FutureWarning)
        yield
