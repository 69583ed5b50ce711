"""Values computable from constants and static shapes, evaluated (at symbolic lengths too)."""

from __future__ import annotations

from typing import Optional

import numpy as np
import onnx
import onnx_ir as ir

from passes.onnx.common import _MAX_EVAL_ELEMENTS, _NONDETERMINISTIC, _present, _shape, _static_shape


class _Constants:
    """Decides which values depend only on constants and shapes, and evaluates them.

    Evaluation runs the value's cone with onnx's reference evaluator, with ``Shape``/``Size``
    of activations replaced by their numbers. A value is *static* when those shapes are
    static; it is *shape-only* when they have symbolic dims, and is then evaluated under a
    ``binding`` of each symbol to a number.
    """

    def __init__(self, model: ir.Model):
        self.model = model
        self._memo: dict[tuple[int, bool], bool] = {}
        self._values: dict[tuple[int, tuple], Optional[np.ndarray]] = {}

    @staticmethod
    def _shape_leaf(node: Optional[ir.Node], binding=None) -> Optional[np.ndarray]:
        """Numbers for Shape/Size of an activation: static dims, or symbols in ``binding``."""
        if node is None or node.op_type not in ("Shape", "Size") or node.domain not in ("", "ai.onnx"):
            return None
        dims = _shape(node.inputs[0])
        if dims is None:
            return None
        binding = binding if binding is not None else {}
        dims = [d if isinstance(d, int) else binding.get(d.value) for d in dims]
        if node.op_type == "Size":
            return None if None in dims else np.array(int(np.prod(dims)), dtype=np.int64)
        start = node.attributes.get_int("start", 0)
        end = node.attributes.get_int("end", None)
        dims = dims[start:end]
        return None if None in dims else np.array(dims, dtype=np.int64)

    @staticmethod
    def _symbolic_leaf(node: Optional[ir.Node]) -> bool:
        """Shape/Size whose needed dims are ints or named symbols."""
        if node is None or node.op_type not in ("Shape", "Size") or node.domain not in ("", "ai.onnx"):
            return False
        dims = _shape(node.inputs[0])
        if dims is None:
            return False
        if node.op_type == "Shape":
            dims = dims[node.attributes.get_int("start", 0):node.attributes.get_int("end", None)]
        # Named input dims only: an expression ("s0 + 1") or an unknown that shape inference
        # made up ("unk__3") need not equal the sequence length it would be bound to.
        return all(isinstance(d, int) or (d.value and d.value.isidentifier() and not d.value.startswith("unk__"))
                   for d in dims)

    def is_static(self, v: Optional[ir.Value]) -> bool:
        return self._depends_only_on_constants(v, symbolic=False)

    def is_shape_only(self, v: Optional[ir.Value]) -> bool:
        return self._depends_only_on_constants(v, symbolic=True)

    def _depends_only_on_constants(self, v: Optional[ir.Value], symbolic: bool) -> bool:
        if v is None or not _present(v):
            return True
        memo = self._memo
        todo = [v]
        while todo:
            cur = todo[-1]
            key = (id(cur), symbolic)
            if key in memo:
                todo.pop()
                continue
            node = cur.producer()
            if cur.is_graph_input() or (cur.const_value is None and node is None):
                memo[key] = False
            elif cur.const_value is not None:
                memo[key] = True
            elif self._shape_leaf(node) is not None or node.op_type == "Constant" or (
                    symbolic and self._symbolic_leaf(node)):
                memo[key] = node.domain in ("", "ai.onnx")
            elif (node.domain not in ("", "ai.onnx") or node.op_type in _NONDETERMINISTIC
                  or any(a.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS)
                         for a in node.attributes.values())):
                memo[key] = False
            else:
                pending = [i for i in node.inputs if _present(i) and (id(i), symbolic) not in memo]
                if pending:
                    todo.extend(pending)
                    continue
                memo[key] = all(memo[(id(i), symbolic)] for i in node.inputs if _present(i))
            todo.pop()
        return memo[(id(v), symbolic)]

    def value(self, v: Optional[ir.Value], binding=None) -> Optional[np.ndarray]:
        if v is None or not (self.is_static(v) or (binding is not None and self.is_shape_only(v))):
            return None
        key = (id(v), tuple(binding.items()) if binding is not None else ())
        if key not in self._values:
            try:
                self._values[key] = (v.const_value.numpy() if v.const_value is not None
                                     else self._evaluate(v, binding))
            except Exception:  # e.g. external data that was not loaded
                self._values[key] = None
        return self._values[key]

    def scalar(self, v: Optional[ir.Value]) -> Optional[float]:
        if v is None:
            return None
        s = _static_shape(v)
        if s is not None and int(np.prod(s)) != 1:
            return None
        a = self.value(v)
        if a is None or a.size != 1 or a.dtype.kind not in "fiub":
            return None
        return float(a.reshape(-1)[0])

    def _evaluate(self, v: ir.Value, binding) -> Optional[np.ndarray]:
        s = _static_shape(v)
        if s is not None and int(np.prod(s)) > _MAX_EVAL_ELEMENTS:
            return None
        nodes: list[ir.Node] = []
        inits: dict[str, np.ndarray] = {}
        seen: set[int] = set()
        todo = [v]
        while todo:
            cur = todo.pop()
            if cur is None or not _present(cur) or id(cur) in seen:
                continue
            seen.add(id(cur))
            if cur.const_value is not None:
                inits[cur.name] = cur.const_value.numpy()
                continue
            node = cur.producer()
            leaf = self._shape_leaf(node, binding)
            if leaf is not None:
                inits[cur.name] = leaf
                continue
            if node is None:
                return None
            if id(node) in seen:
                continue
            seen.add(id(node))
            nodes.append(node)
            todo.extend(node.inputs)
        order = {id(n): i for i, n in enumerate(self.model.graph)}
        nodes.sort(key=lambda n: order.get(id(n), 0))
        graph = onnx.helper.make_graph(
            [ir.serde.serialize_node(n) for n in nodes], "cone", [],
            [onnx.helper.make_empty_tensor_value_info(v.name)],
            initializer=[onnx.numpy_helper.from_array(np.asarray(a), name) for name, a in inits.items()],
        )
        proto = onnx.helper.make_model(
            graph, opset_imports=[onnx.helper.make_opsetid(d, ver)
                                  for d, ver in self.model.opset_imports.items()])
        try:
            from onnx.reference import ReferenceEvaluator

            out = np.asarray(ReferenceEvaluator(proto).run(None, {})[0])
        except Exception:
            return None
        return out if out.size <= _MAX_EVAL_ELEMENTS else None
