"""attnforge: find attention in captured PyTorch graphs and rewrite it.

Importing this package registers the ``attnforge::*`` ops, which programs saved by attnforge
need before ``torch.export.load``, and lets it rebuild Hugging Face output classes.

The public API (``compile``, ``load``, ``capture``, ...) is loaded on first use (PEP 562), so
``passes`` and ``backends``, which build on the vocabulary modules here, never pull in the
driver (api, pipeline, auto, capture, cli, generate): imports flow one way, and
``lint-imports`` holds them to it (see ``[tool.importlinter]`` in pyproject.toml).
"""

from __future__ import annotations

import importlib
import importlib.util

from compiler.ir import ops, pytree_types
from compiler.reference import linear_ops, sparse_ops  # noqa: F401  (registers torch.ops.attnforge.*)
from compiler.variants import dilated  # noqa: F401  (registers its pattern; one import per pattern module)
from compiler.ir.errors import AttnforgeError, BackendError, CaptureError, InputError, PolicyError, VerificationError

pytree_types.install()

__version__ = "0.1.0"

# Public name -> the module that defines it, imported when the name is first read.
_LAZY = {
    "CompiledModel": "compiler.api", "compile": "compiler.api", "compile_program": "compiler.api",
    "load": "compiler.api",
    "Fidelity": "compiler.driver.budget",
    "capture": "compiler.driver.capture",
    "Generator": "compiler.driver.generate", "compile_generator": "compiler.driver.generate",
    "Policy": "compiler.variants.policy", "parse_policy": "compiler.variants.policy",
    "Report": "compiler.report.data",
    "AttentionSite": "compiler.ir.site",
}

__all__ = [
    "AttentionSite", "AttnforgeError", "BackendError", "CaptureError", "CompiledModel", "Fidelity", "InputError",
    "Policy", "PolicyError", "Report", "VerificationError", "capture", "compile", "compile_program", "load",
    "parse_policy",
    "Generator", "compile_generator",
]


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        if importlib.util.find_spec(f"compiler.{name}") is None:
            raise AttributeError(f"module 'compiler' has no attribute {name!r}")
        return importlib.import_module(f"compiler.{name}")  # ``compiler.driver.verify`` after ``import compiler``
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later reads skip this hook
    return value


def __dir__():
    return sorted({*globals(), *_LAZY})
