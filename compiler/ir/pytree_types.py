"""Programs whose inputs or outputs are Hugging Face ``ModelOutput`` classes load after ``import compiler``.

``torch.export.load`` rebuilds a program's output structure from the type names stored in the
archive (``transformers.modeling_outputs.CausalLMOutputWithPast``); transformers registers each
class with torch's pytree when the module that defines it is imported. Importing every such module
up front costs most of a second on each ``import compiler``, so the lookup imports the one module a
stored name needs, when torch first asks for it.
"""

from __future__ import annotations

import importlib
import importlib.util

from torch.utils import _pytree as pytree

# Packages whose classes register themselves with torch's pytree when their module is imported.
# Only these are imported on a name read from a file; any other name is left to torch's message.
SELF_REGISTERING = ("transformers",)


def import_defining_module(serialized_name: str) -> bool:
    """Import the module a stored type name points into, if it belongs to a self-registering
    package; True if the name is registered afterwards."""
    module = serialized_name.rsplit(".", 1)[0]
    top = module.split(".", 1)[0]
    if top in SELF_REGISTERING and "." in serialized_name and importlib.util.find_spec(top) is not None:
        try:
            importlib.import_module(module)
        except Exception:  # noqa: BLE001 - torch then says which type it cannot rebuild
            return False
    return dict.__contains__(pytree.SERIALIZED_TYPE_TO_PYTHON_TYPE, serialized_name)


class _ImportOnLookup(dict):
    """torch's table of pytree types by stored name, importing a missing name's module on lookup."""

    def __contains__(self, name) -> bool:
        return dict.__contains__(self, name) or (isinstance(name, str) and import_defining_module(name))


def install() -> None:
    table = pytree.SERIALIZED_TYPE_TO_PYTHON_TYPE
    if not isinstance(table, _ImportOnLookup):
        # Registration writes through the module global, so replacing it keeps every entry current.
        pytree.SERIALIZED_TYPE_TO_PYTHON_TYPE = _ImportOnLookup(table)
