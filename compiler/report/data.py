"""What every pass did, as data: saved as JSON, shown as rich tables."""

from __future__ import annotations

import json
import types
import typing
from dataclasses import MISSING, asdict, dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, Optional

from compiler.ir.errors import InputError

SCHEMA = "attnforge.report/1"


@dataclass
class PassRecord:
    name: str
    seconds: float
    nodes_before: int
    nodes_after: int
    sites_found: int = 0
    sites_rewritten: int = 0
    details: dict = field(default_factory=dict)


@dataclass
class SiteRecord:
    id: str
    module: str
    module_type: str
    form: str
    variant: str  # "fused", "dense" (left as written), or a sparse / linear variant's text
    status: str  # "rewritten", "rolled_back", "skipped", "kept"
    causal: bool
    mask_kind: str
    batch: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    value_dim: int
    seq_q: int
    seq_k: int
    scale: Optional[float]
    flops_before: int
    flops_after: int
    intermediate_bytes: int  # score/probability tensors the original materialises
    reason: str = ""
    max_abs_error: Optional[float] = None
    layer: Optional[int] = None
    notes: list[str] = field(default_factory=list)
    density: float = 1.0  # scores computed / scores exact attention needs (causal-aware)
    cosine_similarity: Optional[float] = None  # site output vs exact attention on the same inputs
    kept_mass: Optional[float] = None  # share of exact attention probability the pattern keeps
    subgraph_before: Optional[dict] = None  # compiler.driver.explain.subgraph of the matched nodes
    subgraph_after: Optional[dict] = None  # the op that replaced them and what feeds it
    attention_map: Optional[dict] = None  # compiler.driver.explain.attention_maps, when asked for
    lowering: Optional[str] = None  # what the backend ran the site as (e.g. ONNX "attention", "block-gather")
    # Three costs: flops_before is the dense square the original computes, flops_exact what
    # exact attention needs (the causal triangle where causal), flops_after what the variant
    # computes. "saved" is against flops_before, density is flops_after / flops_exact.
    flops_exact: Optional[int] = None
    over_exact: bool = False  # an approximate variant that computes as much as exact attention or more
    measured_rows: Optional[int] = None  # query rows site error/cosine/mass were measured on; None = all


@dataclass
class FidelityRecord:
    """End-to-end fidelity as measured (the budget it was held to is ``Report.budget``)."""

    max_abs_error: Optional[float] = None
    kl_divergence: Optional[float] = None
    cosine_similarity: Optional[float] = None
    tolerance: Optional[float] = None
    passed: Optional[bool] = None
    checked_inputs: list[str] = field(default_factory=list)  # descriptions of the inputs compared


@dataclass
class Report:
    model: str
    policy: str
    backend: str
    passes: list[PassRecord] = field(default_factory=list)
    sites: list[SiteRecord] = field(default_factory=list)
    rejected: list[dict] = field(default_factory=list)
    fidelity: FidelityRecord = field(default_factory=FidelityRecord)
    compile_seconds: float = 0.0
    budget: Optional[dict] = None  # the Fidelity budget, when one was given
    auto: Optional[dict] = None  # policy="auto": candidates measured per site, choices, trials
    lowering: Optional[dict] = None  # backend details: format, providers, export time, error vs torch
    plan: Optional[dict] = None  # the execution plan's summary (compiler.ir.plan.Plan.summary)
    schema: str = SCHEMA

    # ------------------------------------------------------------------ derived

    @property
    def totals(self) -> dict:
        rewritten = [s for s in self.sites if s.status == "rewritten"]
        fb = sum(s.flops_before for s in self.sites)
        fa = sum(s.flops_after if s.status == "rewritten" else s.flops_before for s in self.sites)
        nodes_before = self.passes[0].nodes_before if self.passes else 0
        nodes_after = self.passes[-1].nodes_after if self.passes else 0
        return {
            "sites_found": len(self.sites),
            "sites_rewritten": len(rewritten),
            "sites_rolled_back": sum(s.status == "rolled_back" for s in self.sites),
            "attention_flops_before": fb,
            "attention_flops_after": fa,
            "attention_flops_saved_pct": round(100.0 * (fb - fa) / fb, 2) if fb else 0.0,
            "attention_flops_exact": sum(s.flops_exact if s.flops_exact is not None else s.flops_before
                                         for s in self.sites),
            "sites_over_exact": sum(s.status == "rewritten" and s.over_exact for s in self.sites),
            "sites_approximate": sum(s.status == "rewritten" and s.variant not in ("fused", "dense")
                                     for s in self.sites),
            "intermediate_bytes_removed": sum(s.intermediate_bytes for s in rewritten),
            "nodes_before": nodes_before,
            "nodes_after": nodes_after,
            "compile_seconds": round(self.compile_seconds, 4),
        }

    # ------------------------------------------------------------------ io

    def to_dict(self) -> dict:
        d = asdict(self)
        d["totals"] = self.totals
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, default=_json_default)

    def save(self, path) -> Path:
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(self.to_json())
        tmp.replace(path)
        return path

    @classmethod
    def from_dict(cls, d: dict) -> "Report":
        if d.get("schema") != SCHEMA:
            raise InputError(f"not an attnforge report (schema {d.get('schema')!r}, expected {SCHEMA!r})")
        _check_fields(cls, {k: v for k, v in d.items() if k != "totals"}, "report")
        for key, record in (("passes", PassRecord), ("sites", SiteRecord)):
            for i, item in enumerate(d.get(key, [])):
                _check_fields(record, item, f"{key}[{i}]")
        _check_fields(FidelityRecord, d.get("fidelity", {}), "fidelity")
        return cls(
            model=d["model"],
            policy=d["policy"],
            backend=d["backend"],
            passes=[PassRecord(**p) for p in d.get("passes", [])],
            sites=[SiteRecord(**s) for s in d.get("sites", [])],
            rejected=d.get("rejected", []),
            fidelity=FidelityRecord(**d.get("fidelity", {})),
            compile_seconds=d.get("compile_seconds", 0.0),
            budget=d.get("budget"),
            auto=d.get("auto"),
            lowering=d.get("lowering"),
            plan=d.get("plan"),
        )

    @classmethod
    def load(cls, path) -> "Report":
        path = Path(path)
        try:
            d = json.loads(path.read_text())
        except FileNotFoundError:
            raise InputError(f"{path}: no such file") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise InputError(f"{path}: not a JSON report ({e.__class__.__name__}: {e})") from None
        if not isinstance(d, dict):
            raise InputError(f"{path}: not an attnforge report")
        try:
            return cls.from_dict(d)
        except InputError as e:
            raise InputError(f"{path}: {e}") from None

    # ------------------------------------------------------------------ text

    def render(self, console=None) -> None:
        from compiler.report.terminal import render

        render(self, console)

    def __str__(self) -> str:
        from compiler.report.terminal import render_text

        return render_text(self)


_JSON_TYPES = {str: "a string", int: "a whole number", float: "a number", bool: "true or false", list: "a list",
               dict: "an object"}


def _fits(value, hint) -> bool:
    """Whether a JSON value has the type a report field is declared with."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_fits(value, a) for a in args)
    if hint is type(None):
        return value is None
    if origin is list and args and not is_dataclass(args[0]):
        return isinstance(value, list) and all(_fits(v, args[0]) for v in value)
    if origin is not None:
        hint = origin
    if is_dataclass(hint):
        return isinstance(value, dict)
    if hint in (int, float) and isinstance(value, bool):
        return False
    if hint is float:
        return isinstance(value, (int, float))
    return isinstance(value, hint)


def _describe(hint) -> str:
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in args) + (" or null" if type(None) in typing.get_args(hint) else "")
    hint = typing.get_origin(hint) or hint
    if hint is list and typing.get_args(hint):
        return f"a list (each {_describe(typing.get_args(hint)[0])})"
    return "an object" if is_dataclass(hint) else _JSON_TYPES.get(hint, getattr(hint, "__name__", str(hint)))


def _check_fields(cls, d, where: str) -> None:
    """``d`` has every required field of dataclass ``cls``, no unknown field, and each of the declared type."""
    if not isinstance(d, dict):
        raise InputError(f"malformed attnforge report: {where} should be an object, not {type(d).__name__}")
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in fields(cls)}
    for name in d:
        if name not in known:
            raise InputError(f"malformed attnforge report: {where} has an unknown field {name!r}")
    for name, f in known.items():
        if name not in d:
            if f.default is MISSING and f.default_factory is MISSING:
                raise InputError(f"malformed attnforge report: {where} lacks the field {name!r}")
            continue
        if not _fits(d[name], hints[name]):
            raise InputError(f"malformed attnforge report: {where}.{name} should be {_describe(hints[name])}, "
                             f"not {json.dumps(d[name])[:40]}")


def _json_default(o: Any):
    if hasattr(o, "item"):
        return o.item()
    return str(o)
