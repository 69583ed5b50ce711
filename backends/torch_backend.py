"""The ``torch`` backend: eager PyTorch, attnforge ops running their reference implementation."""

from __future__ import annotations

import torch
from torch.export import ExportedProgram

from compiler.errors import InputError


def load(ep: ExportedProgram):
    module = ep.module()

    def run(*args, **kwargs):
        with torch.no_grad():
            try:
                return module(*args, **kwargs)
            except AssertionError as e:
                if "Guard failed" not in str(e):
                    raise
                # The program was captured for other shapes; say which, not where in the guards.
                raise InputError(f"the inputs do not fit the captured program ({str(e).strip()}); "
                                 "call it with the shapes it was compiled for, or compile with "
                                 "dynamic_shapes") from None

    return run
