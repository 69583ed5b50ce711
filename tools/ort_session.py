"""ONNX Runtime sessions as the ONNX benchmarks run them: CPU, 2 intra-op threads, sequential,
ORT_ENABLE_ALL; a call by input names; the attention ops a model holds; quiet exporters."""

from __future__ import annotations

import collections
import contextlib
import io
import warnings
from typing import Optional

import onnx
import onnxruntime as ort

THREADS = 2
ORT_OPTIONS = {"intra_op_num_threads": THREADS, "inter_op_num_threads": 1}
ATTN_OPS = ("Attention", "MultiHeadAttention", "GroupQueryAttention", "PackedAttention", "PackedMultiHeadAttention",
            "SparseAttention", "Softmax")


def session_options() -> ort.SessionOptions:
    so = ort.SessionOptions()
    so.intra_op_num_threads = THREADS
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 4  # failures come back as exceptions, reported in the table
    return so


def session(model) -> ort.InferenceSession:
    """``model``: a ModelProto or a path to an .onnx file."""
    data = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    return ort.InferenceSession(data, session_options(), providers=["CPUExecutionProvider"])


def ort_call(sess: ort.InferenceSession, arrays: list, names: Optional[list] = None):
    """A zero-argument call running ``sess`` on ``arrays``: by ``names`` where given (an optimizer may
    drop an input it found unused), else in the order of the session's inputs."""
    wanted = [i.name for i in sess.get_inputs()]
    if names:
        given = dict(zip(names, arrays))
        missing = [n for n in wanted if n not in given]
        if missing:
            raise ValueError(f"the model wants inputs {missing} that the benchmark does not have")
        feeds = {n: given[n] for n in wanted}
    else:
        feeds = dict(zip(wanted, arrays))
    return lambda: sess.run(None, feeds)[0]


def op_counts(model: onnx.ModelProto) -> collections.Counter:
    c = collections.Counter(n.op_type for n in model.graph.node)
    for f in model.functions:
        c.update(n.op_type for n in f.node)
    return c


def attention_ops(model: onnx.ModelProto) -> str:
    c = op_counts(model)
    found = [f"{op}x{c[op]}" for op in ATTN_OPS if c[op]]
    return " ".join(found) if found else "no attention op"


@contextlib.contextmanager
def quiet():
    """Exporters and optimizers print progress and warnings; keep the benchmark's output readable."""
    buf = io.StringIO()
    with warnings.catch_warnings(), contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
        warnings.simplefilter("ignore")
        yield buf
