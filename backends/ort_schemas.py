"""onnx.defs schemas for the ONNX Runtime contrib ops our lowerings emit.

onnxscript builds a node from its op's schema, and the onnx package ships none for the
com.microsoft domain; ONNX Runtime has them. Copying ORT's own schema (inputs, outputs, type
constraints, attribute types) keeps the two in step with the installed runtime.
"""

from __future__ import annotations

from functools import lru_cache

import onnx.defs
from onnxruntime.capi import onnxruntime_pybind11_state as ortc

OpSchema = onnx.defs.OpSchema


def _param(p) -> OpSchema.FormalParameter:
    option = OpSchema.FormalParameterOption(int(p.option))
    return OpSchema.FormalParameter(p.name, p.typeStr, p.description, param_option=option,
                                    is_homogeneous=p.isHomogeneous)


@lru_cache(maxsize=None)
def register(name: str, domain: str = "com.microsoft") -> None:
    """Register ORT's schema of ``domain::name`` with onnx.defs, once per process."""
    try:
        onnx.defs.get_schema(name, domain=domain)
        return
    except onnx.defs.SchemaError:
        pass
    found = [s for s in ortc.get_all_operator_schema() if s.domain == domain and s.name == name]
    if not found:
        raise KeyError(f"onnxruntime has no op {domain}::{name}")
    s = max(found, key=lambda x: x.since_version)
    attrs = [OpSchema.Attribute(a.name, OpSchema.AttrType(int(a.type)), a.description, required=a.required)
             for a in s.attributes.values()]
    schema = OpSchema(
        s.name, s.domain, s.since_version, s.doc or "",
        inputs=[_param(p) for p in s.inputs],
        outputs=[_param(p) for p in s.outputs],
        type_constraints=[(c.type_param_str, list(c.allowed_type_strs), c.description) for c in s.type_constraints],
        attributes=attrs,
    )
    onnx.defs.register_schema(schema)
