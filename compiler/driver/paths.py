"""Where a command may write: checked before any work starts, so a slow compile never ends in a
path that cannot be written, and an input file is never written over."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Optional

from compiler.ir.errors import InputError


def _same(a: Path, b: Path) -> bool:
    if os.path.realpath(a) == os.path.realpath(b):
        return True
    try:
        return a.exists() and b.exists() and os.path.samefile(a, b)  # hard links
    except OSError:
        return False


def _folder_problem(path: Path) -> Optional[str]:
    """Why no file can be created at ``path``'s place, or None."""
    parent = path.parent
    for p in (parent, *parent.parents):
        if p.exists():
            if not p.is_dir():
                return f"{p} is a file, not a folder"
            if p != parent:
                return f"the folder {parent} does not exist; create it first"
            break
    else:
        return f"the folder {parent} does not exist; create it first"
    try:
        # Ask the file system itself: permissions, read-only mounts and /proc all answer here.
        fd, probe = tempfile.mkstemp(dir=parent, prefix=".attnforge-probe-")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        return f"cannot write in {parent} ({e.strerror or type(e).__name__})"
    return None


def check_outputs(inputs: dict, outputs: dict) -> None:
    """``inputs`` and ``outputs``: what the user calls each path (``-o``, ``--report``) -> path.

    Every output must be creatable, not a folder, not an input, and not another output.
    """
    outs = {flag: Path(p) for flag, p in outputs.items() if p is not None}
    for flag, path in outs.items():
        for in_flag, src in inputs.items():
            if src is not None and _same(path, Path(src)):
                raise InputError(f"{flag} {path} is the {in_flag} file; refusing to write over an input, choose "
                                 "another name")
        if path.is_dir():
            raise InputError(f"{flag} {path} is a folder; give a file name inside it")
        problem = _folder_problem(path)
        if problem:
            raise InputError(f"{flag} {path}: {problem}")
        if path.exists() and not os.access(path, os.W_OK):
            raise InputError(f"{flag} {path}: the file exists and cannot be written")
    flags = list(outs)
    for i, a in enumerate(flags):
        for b in flags[i + 1:]:
            if _same(outs[a], outs[b]):
                raise InputError(f"{a} and {b} name the same file {outs[a]}; give each its own")


def check_input(path, what: str = "input") -> Path:
    """An existing file, not a folder."""
    path = Path(path)
    if path.is_dir():
        raise InputError(f"{path}: is a folder; give the {what} file")
    if not path.exists():
        raise InputError(f"{path}: no such file")
    return path
