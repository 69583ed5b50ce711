"""The execution plan, as data: typed registers, steps, segments, transitions and buffers.

Made by ``backends.planner`` from a rewritten program; run by ``backends.plan_executor``;
shown in the report and by ``attnforge plan`` / ``attnforge inspect``. A plan is plain data so
it can be saved next to a compiled model and read back with it.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

from compiler.ir.errors import InputError

SCHEMA = "attnforge.plan/1"


@dataclass
class Register:
    """One value of the program: a virtual register of the typed lowering."""

    name: str
    dtype: str
    shape: list  # ints, or symbol names ("s0") where the program is dynamic
    device: str
    nbytes: int  # at the example sizes (symbols take their example value)
    kind: str = "value"  # "input", "constant", "value", or "alias" (a view: no storage of its own)
    alias_of: Optional[str] = None  # for aliases: the register that owns the storage
    bounds: dict = field(default_factory=dict)  # symbol -> [min, max] from export


def storage_owner(registers: dict, name: str) -> str:
    """The register that owns ``name``'s storage: itself, or the base of a view."""
    r = registers[name]
    return r.alias_of if r.kind == "alias" and r.alias_of else name


@dataclass
class Step:
    """One op: reads registers, defines registers, runs on one backend."""

    name: str
    op: str
    backend: str
    inputs: list
    outputs: list
    workspace_bytes: int = 0  # transient memory inside the op (score tensors of an attention kernel)
    deps: list = field(default_factory=list)  # steps that must run first (tensor and shape values)
    inplace: bool = False  # may write its output over an input of the same size that dies here


@dataclass
class Segment:
    """Consecutive steps on one backend, run as one unit (an ORT session, an FX submodule)."""

    index: int
    backend: str
    device: str
    steps: list  # step names, in execution order
    inputs: list  # registers read from outside the segment
    outputs: list  # registers read after the segment


@dataclass
class Transition:
    """A register crossing from one segment to another on a different backend or device."""

    register: str
    src: int
    dst: int
    nbytes: int
    cost_us: float


@dataclass
class MemoryStats:
    order: str  # "export" or "planned"
    peak_live_bytes: int  # activations alive at once (inputs and constants excluded)
    buffer_count: int
    buffer_bytes: int  # sum of the buffers' sizes


@dataclass
class Plan:
    backend: str
    registers: dict  # name -> Register
    steps: list  # Step, in planned execution order
    outputs: list  # registers the program returns
    segments: list  # Segment
    transitions: list  # Transition
    buffers: dict  # register -> buffer index (values only; aliases share their base's)
    buffer_sizes: list  # bytes per buffer
    naive: MemoryStats
    planned: MemoryStats
    greedy_segments: int = 0  # the "first unsupported op splits" partition, for comparison
    greedy_transitions: int = 0
    fallbacks: dict = field(default_factory=dict)  # op -> why it is not on the requested backend
    seconds: float = 0.0

    @property
    def switches(self) -> int:
        """Backend changes along the execution: adjacent segments always differ in backend."""
        return max(len(self.segments) - 1, 0)

    @property
    def transition_bytes(self) -> int:
        return sum(t.nbytes for t in self.transitions)

    def summary(self) -> dict:
        """The part the report keeps: small, no per-register detail."""
        return {
            "backend": self.backend,
            "segments": [{"index": s.index, "backend": s.backend, "device": s.device, "steps": len(s.steps),
                          "inputs": len(s.inputs), "outputs": len(s.outputs)} for s in self.segments],
            "transitions": self.switches,
            "crossings": len(self.transitions),
            "transition_bytes": self.transition_bytes,
            "transition_cost_us": round(sum(t.cost_us for t in self.transitions), 1),
            "greedy_segments": self.greedy_segments,
            "greedy_transitions": self.greedy_transitions,
            "registers": len(self.registers),
            "steps": len(self.steps),
            "naive": asdict(self.naive),
            "planned": asdict(self.planned),
            "fallbacks": dict(self.fallbacks),
            "seconds": round(self.seconds, 4),
        }

    def to_dict(self) -> dict:
        return {"schema": SCHEMA, **asdict(self)}

    @classmethod
    def from_dict(cls, d: dict) -> "Plan":
        if d.get("schema") != SCHEMA:
            raise InputError(f"not an attnforge plan (schema {d.get('schema')!r}, expected {SCHEMA!r})")
        return cls(
            backend=d["backend"],
            registers={k: Register(**v) for k, v in d["registers"].items()},
            steps=[Step(**s) for s in d["steps"]],
            outputs=list(d["outputs"]),
            segments=[Segment(**s) for s in d["segments"]],
            transitions=[Transition(**t) for t in d["transitions"]],
            buffers=dict(d["buffers"]),
            buffer_sizes=list(d["buffer_sizes"]),
            naive=MemoryStats(**d["naive"]),
            planned=MemoryStats(**d["planned"]),
            greedy_segments=d.get("greedy_segments", 0),
            greedy_transitions=d.get("greedy_transitions", 0),
            fallbacks=dict(d.get("fallbacks", {})),
            seconds=d.get("seconds", 0.0),
        )

    def save(self, path) -> Path:
        path = Path(path)
        path.write_text(json.dumps(self.to_dict(), indent=1))
        return path

    @classmethod
    def load(cls, path) -> "Plan":
        try:
            return cls.from_dict(json.loads(Path(path).read_text()))
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise InputError(f"cannot read the plan {path} ({type(e).__name__}: {e})") from None


def plan_lines(summary: dict) -> list[str]:
    """A plan summary (``Plan.summary()``, as kept in a report) as lines of text."""
    naive, planned = summary["naive"], summary["planned"]
    segs = summary["segments"]
    lines = [f"plan for backend {summary['backend']}: {len(segs)} segment(s), {summary['transitions']} transition(s) "
             f"({summary['crossings']} register(s), {summary['transition_bytes'] / 2**20:.2f} MiB crossing); "
             f"greedy split: "
             f"{summary['greedy_segments']} segment(s), {summary['greedy_transitions']} transition(s)"]
    for s in segs:
        lines.append(f"  segment {s['index']}: {s['backend']} on {s['device']}, {s['steps']} steps, "
                     f"{s['inputs']} in / {s['outputs']} out")
    for op, why in summary.get("fallbacks", {}).items():
        lines.append(f"  {op} runs on torch: {why}")

    def ratio(a, b):
        if not b:
            return "n/a"
        change = (1 - a / b) * 100
        return f"{change:.0f}% less" if change >= 0.5 else ("same" if change > -0.5 else f"{-change:.0f}% more")

    lines.append(f"  peak live bytes: {planned['peak_live_bytes'] / 2**20:.2f} MiB planned vs "
                 f"{naive['peak_live_bytes'] / 2**20:.2f} MiB in export order ({ratio(planned['peak_live_bytes'], naive['peak_live_bytes'])})")
    lines.append(f"  buffers: {planned['buffer_count']} ({planned['buffer_bytes'] / 2**20:.2f} MiB) planned vs "
                 f"{naive['buffer_count']} ({naive['buffer_bytes'] / 2**20:.2f} MiB) one per value "
                 f"({ratio(planned['buffer_count'], naive['buffer_count'])})")
    return lines
