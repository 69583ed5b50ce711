"""attnforge: find attention in captured PyTorch graphs and rewrite it.

Importing this package registers the ``attnforge::*`` ops, which programs saved by attnforge
need before ``torch.export.load``, and lets it rebuild Hugging Face output classes.
"""

from compiler import linear_ops, ops, pytree_types, sparse_ops  # noqa: F401  (registers torch.ops.attnforge.*)
from compiler.api import CompiledModel, compile, compile_program, load
from compiler.budget import Fidelity
from compiler.capture import capture
from compiler.errors import AttnforgeError, BackendError, CaptureError, InputError, PolicyError, VerificationError
from compiler.generate import Generator, compile_generator
from compiler.policy import Policy, parse_policy
from compiler.report import Report
from compiler.site import AttentionSite

pytree_types.install()

__version__ = "0.1.0"

__all__ = [
    "AttentionSite", "AttnforgeError", "BackendError", "CaptureError", "CompiledModel", "Fidelity", "InputError",
    "Policy", "PolicyError", "Report", "VerificationError", "capture", "compile", "compile_program", "load",
    "parse_policy",
    "Generator", "compile_generator",
]
