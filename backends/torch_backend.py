"""The ``torch`` backend: eager PyTorch, attnforge ops running their reference implementation."""

from __future__ import annotations

import torch
from torch.export import ExportedProgram


def load(ep: ExportedProgram):
    module = ep.module()

    def run(*args, **kwargs):
        with torch.no_grad():
            return module(*args, **kwargs)

    return run
