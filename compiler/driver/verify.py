"""Numerical verification: the rewritten program against the original, end to end and per site."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Iterable, Optional

import torch
from torch import fx
from torch.export import ExportedProgram
from torch.utils import _pytree as pytree

from compiler.ir.errors import first_line
from compiler.ir.masks import mask_pattern

_TOLERANCE = {torch.float32: 1e-5, torch.float64: 1e-7, torch.float16: 1e-2, torch.bfloat16: 2e-2}


def tolerance(dtype: torch.dtype, magnitude: float = 1.0) -> float:
    """Allowed max abs error for an exact rewrite, scaled for values larger than 1."""
    return _TOLERANCE.get(dtype, 1e-5) * max(1.0, magnitude)


def max_abs_error(ref: torch.Tensor, new: torch.Tensor, nan_is_undefined: bool = False) -> float:
    """Max abs difference; NaN only matches NaN, unless ``nan_is_undefined`` (the reference's
    NaN positions, e.g. softmax over a row of -inf, then accept any value)."""
    ref, new = ref.detach().double(), new.detach().double().reshape(ref.shape)
    both_nan = torch.isnan(ref) & (torch.isnan(new) | nan_is_undefined)
    diff = (ref - new).abs().masked_fill(both_nan, 0.0)
    if torch.isnan(diff).any():
        return math.inf
    return float(diff.max()) if diff.numel() else 0.0


# Elements per slice ``compare`` measures at a time: its float64 temporaries stay a few MiB.
# Whole, a [1, 16k, 512] output made ~17 temporaries of 64 MiB, each mapped fresh and faulted
# in page by page (1.1 GiB of page faults a compare, 0.4-5.7 s at 16k depending on the machine's
# state after a large run).
_SLICE = 1 << 19


def _float_leaf(r: torch.Tensor, n: torch.Tensor) -> tuple[float, Optional[float], float, float]:
    """(max abs error, KL divergence or None, cosine, magnitude) of one float leaf, over slices
    of whole rows (the KL's softmax is over the last axis); as if measured at once."""
    r, n = r.detach(), n.detach().reshape(r.shape)
    width = r.shape[-1] if r.dim() >= 1 and r.shape[-1] > 0 else 1
    r2, n2 = r.reshape(-1, width), n.reshape(-1, width)
    err, magnitude = 0.0, r.new_zeros((), dtype=torch.float64)
    kl_sum, finite = 0.0, r.dim() >= 1 and width > 1
    dot, rr, nn_ = (r.new_zeros((), dtype=torch.float64) for _ in range(3))
    step = max(1, _SLICE // width)
    for a in range(0, r2.shape[0], step):
        x, y = r2[a:a + step].double(), n2[a:a + step].double()
        err = max(err, max_abs_error(x, y))
        magnitude = torch.maximum(magnitude, x.abs().max())  # NaN stays NaN, as r.abs().max() would
        if finite and torch.isfinite(x).all() and torch.isfinite(y).all():
            p, q = torch.log_softmax(x, -1), torch.log_softmax(y, -1)
            kl_sum += float((p.exp() * (p - q)).sum())
        else:
            finite = False
        dot, rr, nn_ = dot + (x * y).sum(), rr + (x * x).sum(), nn_ + (y * y).sum()
    eps = 1e-8  # torch.nn.functional.cosine_similarity's
    cos = float(dot / (rr.sqrt().clamp_min(eps) * nn_.sqrt().clamp_min(eps)))
    return err, (kl_sum / r2.shape[0] if finite else None), cos, float(magnitude)


def compare(ref_out: Any, new_out: Any) -> dict:
    """max abs error, KL divergence (softmax over the last axis) and cosine over all float leaves."""
    ref_leaves = pytree.tree_leaves(ref_out)
    new_leaves = pytree.tree_leaves(new_out)
    if len(ref_leaves) != len(new_leaves):
        raise AssertionError(f"output structure changed: {len(ref_leaves)} leaves vs {len(new_leaves)}")
    err, kl, cos = 0.0, 0.0, 1.0
    tol_ok = True
    worst_tol = 0.0
    for r, n in zip(ref_leaves, new_leaves):
        if not isinstance(r, torch.Tensor):
            continue
        magnitude = 1.0
        if not r.is_floating_point():
            e = 0.0 if torch.equal(r, n) else math.inf
        elif r.numel():
            e, leaf_kl, c, magnitude = _float_leaf(r, n)
            kl = kl if leaf_kl is None else max(kl, leaf_kl)
            cos = min(cos, c)
        else:
            e = max_abs_error(r, n)
        t = tolerance(r.dtype, magnitude)
        worst_tol = max(worst_tol, t)
        tol_ok &= e <= t
        err = max(err, e)
    return {"max_abs_error": err, "kl_divergence": kl, "cosine_similarity": cos, "tolerance": worst_tol, "passed": tol_ok}


def run(ep: ExportedProgram, args: tuple, kwargs: dict):
    with torch.no_grad():
        return ep.module()(*args, **kwargs)


class RunFailure(Exception):
    """Running a program raised at ``node`` (a name in its graph)."""

    def __init__(self, node: str, error: Exception):
        first = first_line(error)
        super().__init__(f"{type(error).__name__} at {node}: {first}")
        self.node = node


class _Recorder(fx.Interpreter):
    def __init__(self, gm, names: set[str]):
        super().__init__(gm)
        self.names = names
        self.values: dict[str, torch.Tensor] = {}

    def run_node(self, n):
        try:
            out = super().run_node(n)
        except RunFailure:
            raise
        except Exception as e:  # noqa: BLE001 - reported with the node it happened at
            raise RunFailure(n.name, e) from e
        if n.name in self.names:
            self.values[n.name] = out
        return out


_SDPA = torch.ops.aten.scaled_dot_product_attention.default
_SDPA_OPERANDS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal")


class _Reference(_Recorder):
    """``_Recorder`` for the reference runs, of the original program. An attention op whose mask
    *value* in this run keeps exactly the causal triangle runs with ``is_causal`` instead (one
    that keeps every key, with no mask): the same weights, a masked key's exactly zero either
    way, but the fused kernel then skips the masked half. With the [S, S] mask transformers
    exports it computed the whole square: the reference cost two forward passes at long
    context. Decided on the values this run computed, so it rests on nothing the passes read
    from the graph; the programs under test run their own ops as they are (``_Forcing``)."""

    def __init__(self, gm, names: set[str]):
        super().__init__(gm, names)
        self._patterns: dict[int, tuple[torch.Tensor, Optional[str]]] = {}  # id(mask) -> (mask, its pattern)

    def call_function(self, target, args, kwargs):
        if target is _SDPA:
            args, kwargs = self._without_mask(args, kwargs)
        return super().call_function(target, args, kwargs)

    def _without_mask(self, args, kwargs):
        bound = {**dict(zip(_SDPA_OPERANDS, args)), **kwargs}
        mask = bound.get("attn_mask")
        if not isinstance(mask, torch.Tensor) or bound.get("dropout_p") or bound.get("is_causal"):
            return args, kwargs
        seen = self._patterns.get(id(mask))
        if seen is None or seen[0] is not mask:  # the layers of a model share one mask: checked once
            q, k = bound["query"], bound["key"]
            seen = self._patterns[id(mask)] = (mask, mask_pattern(mask, q.shape[-2], k.shape[-2]))
        if seen[1] is None:
            return args, kwargs
        bound.update(attn_mask=None, is_causal=seen[1] == "causal")
        return tuple(bound.pop(n) for n in ("query", "key", "value")), bound


class _Forcing(_Recorder):
    """Records the named nodes, then continues from ``forced`` values in their place: each site
    is checked on the inputs the original program gives it, so one wrong site upstream does
    not make every site after it differ."""

    def __init__(self, gm, forced: dict[str, torch.Tensor]):
        super().__init__(gm, set(forced))
        self.forced = forced

    def run_node(self, n):
        out = super().run_node(n)
        ref = self.forced.get(n.name)
        if ref is not None and isinstance(out, torch.Tensor):
            if tuple(ref.shape) != tuple(out.shape):
                ref = ref.reshape(out.shape)
            return ref.to(out.dtype)
        return out


def forced_values(ep: ExportedProgram, args: tuple, kwargs: dict, forced: dict[str, torch.Tensor]) -> dict:
    """Values of the nodes named in ``forced`` when ``ep`` runs on (args, kwargs) with each of
    them replaced, for its consumers, by the given value. Raises ``RunFailure``."""
    return forced_run(ep, args, kwargs, forced).values


def program_outputs(ep: ExportedProgram, flat_out) -> Any:
    """What ``ep.module()`` returns, from its graph module's flat outputs (mutated buffers dropped,
    the user outputs in the program's output structure)."""
    from torch.export.graph_signature import OutputKind

    specs = ep.graph_signature.output_specs
    user = [o for o, s in zip(flat_out, specs) if s.kind == OutputKind.USER_OUTPUT]
    return pytree.tree_unflatten(user, ep.call_spec.out_spec) if ep.call_spec.out_spec is not None else user


@dataclass
class ForcedRun:
    values: dict[str, torch.Tensor]  # the forced nodes' own values (only ``rows`` of a sampled one)
    outputs: Any  # the program's outputs with every forced node replaced
    rows: dict[str, list[tuple[int, int]]] = field(default_factory=dict)  # sampled node -> its query rows


class _SampledForcing(_Forcing):
    """``_Forcing`` where a forced exact attention op of a long site computes only the query rows
    measurement samples (``compiler.driver.measure.measured_ranges``): its consumers get the forced value
    anyway, and attention rows are independent of each other, so the rows it computes are the
    rows it would give."""

    def __init__(self, gm, forced: dict[str, torch.Tensor]):
        super().__init__(gm, forced)
        self.rows: dict[str, list[tuple[int, int]]] = {}

    def run_node(self, n):
        from compiler.driver.measure import exact_rows_output, inputs_of, measured_ranges
        from compiler.ir.ops import ATTENTION_OPS

        if n.name in self.forced and n.op == "call_function" and n.target in ATTENTION_OPS:
            args, _ = self.fetch_args_kwargs_from_env(n)
            x = inputs_of(args)
            ranges = measured_ranges(x.q.shape[2])
            if ranges != [(0, x.q.shape[2])]:
                try:
                    self.values[n.name] = exact_rows_output(x, ranges)
                except Exception as e:  # noqa: BLE001 - reported with the node it happened at
                    raise RunFailure(n.name, e) from e
                self.rows[n.name] = ranges
                ref = self.forced[n.name]
                return ref.reshape(*x.q.shape[:-1], x.v.shape[-1]).to(x.v.dtype)
        return super().run_node(n)


def forced_run(ep: ExportedProgram, args: tuple, kwargs: dict, forced: dict[str, torch.Tensor],
               sample_rows: bool = False) -> ForcedRun:
    """Run ``ep`` on (args, kwargs) with each node named in ``forced`` replaced, for its consumers,
    by the given value: the forced nodes' own values and the program's outputs. With
    ``sample_rows``, a forced exact attention op of a long site computes only sampled query rows
    (``ForcedRun.rows``). Raises ``RunFailure``."""
    flat = ep._graph_module_flat_inputs(args, kwargs)
    rec = (_SampledForcing if sample_rows else _Forcing)(ep.graph_module, forced)
    with torch.no_grad():
        out = rec.run(*flat)
    return ForcedRun(rec.values, program_outputs(ep, out), getattr(rec, "rows", {}))


class OriginalRuns:
    """The original program on each input set of ``checks``, run once per set however often it
    is asked: its outputs and the values of named nodes (the sites' outputs, copied as recorded)
    come from the same run, so the end-to-end reference and the per-site references cost one
    forward pass. A later ask for names not recorded yet runs the set again."""

    def __init__(self, ep: ExportedProgram, checks: list):
        self.ep, self.checks = ep, checks
        self._runs: dict[int, tuple[frozenset, dict, Any]] = {}

    def get(self, i: int, names: Iterable[str] = ()) -> tuple[dict[str, torch.Tensor], Any]:
        """({name: value}, outputs) of input set ``i``. Raises ``RunFailure``."""
        names = frozenset(names)
        have = self._runs.get(i)
        if have is None or not names <= have[0]:
            want = names | (have[0] if have else frozenset())
            _, args, kwargs = self.checks[i]
            try:
                flat = self.ep._graph_module_flat_inputs(args, kwargs)
            except Exception as e:  # noqa: BLE001 - inputs that do not fit the program
                raise RunFailure("<inputs>", e) from e
            rec = _Reference(self.ep.graph_module, set(want))
            with torch.no_grad():
                out = rec.run(*flat)
            # A value is copied: an in-place op later in the program must not change what was recorded.
            values = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in rec.values.items()}
            have = self._runs[i] = (want, values, program_outputs(self.ep, out))
        return {n: have[1][n] for n in names if n in have[1]}, have[2]


def node_values(ep: ExportedProgram, args: tuple, kwargs: dict, names: Iterable[str]) -> dict[str, torch.Tensor]:
    """Values of the named nodes of ``ep``'s graph when run on (args, kwargs)."""
    flat = ep._graph_module_flat_inputs(args, kwargs)
    rec = _Reference(ep.graph_module, set(names))
    with torch.no_grad():
        rec.run(*flat)
    return rec.values


# ----------------------------------------------------------------------------- inputs the example did not cover


def _mask_fill_value(x: torch.Tensor):
    """For an input that looks like a mask, the value of a masked position; else None.

    Bool and 0/1 integer tensors are keep-masks (masked = 0/False); a float tensor holding
    only 0 and one value that acts as -inf is an additive mask, one holding only 0 and 1 a
    keep-mask. (Elementwise tests only: a sort of a large input would change the allocator's
    thresholds for the rest of the process.)
    """
    from compiler.ir.masks import acts_as_neg_inf

    if x.dim() == 0 or x.numel() < 2:
        return None
    if x.dtype == torch.bool:
        return False if bool(x.any()) else None
    if x.is_complex():
        return None
    zero_one = bool(((x == 0) | (x == 1)).all())
    if not x.is_floating_point():
        # all zeros is an id tensor (token_type_ids), not a mask that keeps nothing
        return 0 if zero_one and bool((x == 1).any()) else None
    if zero_one:
        return 0.0 if bool((x == 1).any()) else None
    low = float(x.min())
    if acts_as_neg_inf(low, x.dtype) and bool(((x == 0) | (x == low)).all()):
        return low
    return None


def _padded(x: torch.Tensor, masked, side: str, full_row: bool) -> torch.Tensor:
    """``x`` with padding along its last dim: more per batch row, optionally one row fully masked."""
    if x.dtype == torch.bool:
        keep = True
    elif x.is_floating_point():
        keep = 1.0 if masked == 0.0 else 0.0  # a 0/1 keep-mask, or an additive 0/fill mask
    else:
        keep = 1
    out = torch.full_like(x, keep)
    n, rows = x.shape[-1], x.shape[0] if x.dim() > 1 else 1
    for b in range(rows):
        k = n if (full_row and b == rows - 1) else max(1, min(n - 1, (b + 1) * n // (rows + 1)))
        sl = (b,) if x.dim() > 1 else ()
        if side == "left":
            out[sl + (..., slice(0, k))] = masked
        else:
            out[sl + (..., slice(n - k, n))] = masked
    return out


def _fresh(x: torch.Tensor, g: torch.Generator, shape=None) -> torch.Tensor:
    shape = tuple(x.shape) if shape is None else tuple(shape)
    if x.is_floating_point():
        # No temporaries larger than the input (a float64 copy would change the allocator's
        # thresholds for the rest of the process).
        wide = torch.float64 if x.dtype == torch.float64 else torch.float32
        mean = float(x.detach().mean(dtype=wide)) if x.numel() else 0.0
        std = float(x.detach().to(wide).std()) if x.numel() > 1 else 1.0
        r = torch.randn(shape, generator=g, dtype=wide).mul_(std if std > 0 else 1.0).add_(mean)
        return r.to(dtype=x.dtype, device=x.device)
    if x.dtype == torch.bool:
        return torch.rand(shape, generator=g) < 0.5
    if x.numel():
        lo, hi = int(x.min()), int(x.max())
        return torch.randint(lo, hi + 1, shape, generator=g, dtype=x.dtype).to(x.device)
    return torch.zeros(shape, dtype=x.dtype, device=x.device)


def _other_sizes(ep: ExportedProgram, fakes: list) -> Optional[dict]:
    """A different valid value for every symbolic size of the user inputs, or None if there is none."""
    import sympy

    from compiler.driver.capture import finite_bound

    symbols = {}
    for f in fakes:
        for d in f.shape:
            if isinstance(d, torch.SymInt) and isinstance(d.node.expr, sympy.Symbol):
                symbols[d.node.expr] = int(d.node.hint)
    if not symbols:
        return None
    new = {}
    for sym, h in symbols.items():
        r = ep.range_constraints.get(sym)
        lo = max(2, finite_bound(r.lower) or 2) if r is not None else 2
        hi = finite_bound(r.upper) if r is not None else None
        hi = hi if hi is not None else 1 << 30  # unbounded: torch's int_oo claims is_finite
        new[sym] = next((c for c in (h + 3, h - 2, h + 1, h - 1) if lo <= c <= hi and c != h), h)
    return new


def verification_inputs(ep: ExportedProgram, args: tuple, kwargs: dict,
                        validate: bool = True) -> list[tuple[str, tuple, dict]]:
    """(label, args, kwargs) to check a rewrite on: the example, then inputs it did not cover.

    Masks (bool, 0/1 integer or 0/-inf-like float inputs) get left padding, and right padding
    with one batch row fully masked; floats get fresh values; dynamic dims another length. A set
    that changes nothing (no float or mask input, same sizes) is no check and is left out. With
    ``validate``, sets the original program does not accept are dropped (one run of the original
    each); without, the caller must treat a set the original rejects as no check.
    """
    out = [("example inputs", args, kwargs)]
    try:
        return out + _uncovered_inputs(ep, args, kwargs, validate)
    except Exception:  # noqa: BLE001 - inputs we cannot build are not checks; the example still is
        return out


def _uncovered_inputs(ep: ExportedProgram, args: tuple, kwargs: dict,
                      validate: bool = True) -> list[tuple[str, tuple, dict]]:
    from torch.export._tree_utils import reorder_kwargs

    out = []
    flat, _ = ep._get_flat_args_with_check(args, kwargs)
    users = [s for s in ep.graph_signature.input_specs if s.kind.name == "USER_INPUT"]
    nodes = {n.name: n for n in ep.graph.nodes if n.op == "placeholder"}
    fake_of = {}
    for spec, x in zip(users, flat):
        node = nodes.get(getattr(spec.arg, "name", None))
        if isinstance(x, torch.Tensor) and node is not None and isinstance(node.meta.get("val"), torch.Tensor):
            fake_of[id(x)] = node.meta["val"]
    tree = (args, reorder_kwargs(kwargs, ep.call_spec.in_spec) if kwargs else kwargs)
    leaves, spec = pytree.tree_flatten(tree)
    masks = {i: _mask_fill_value(x) for i, x in enumerate(leaves) if isinstance(x, torch.Tensor)}
    has_mask = any(v is not None for v in masks.values())
    g = torch.Generator().manual_seed(0)

    def build(kind: str, sizes=None):
        new, changed = [], False
        for i, x in enumerate(leaves):
            if not isinstance(x, torch.Tensor) or id(x) not in fake_of:
                new.append(x)
                continue
            shape = None
            if sizes is not None:
                shape = [sizes.get(d.node.expr, d.node.hint) if isinstance(d, torch.SymInt) else d
                         for d in fake_of[id(x)].shape]
                shape = [int(s) for s in shape]
            if masks[i] is not None:
                y = _padded(x.new_empty(shape) if shape else x, masks[i], "left" if kind != "right" else "right",
                            full_row=kind == "right")
            elif x.is_floating_point() or sizes is not None:
                y = _fresh(x, g, shape)
            else:
                y = x
            changed |= y is not x
            new.append(y)
        a, kw = pytree.tree_unflatten(new, spec)
        return a, dict(kw), changed

    candidates = []
    if has_mask:
        candidates += [("left-padded masks", "left", None), ("right-padded masks, one row fully masked", "right", None)]
    else:
        candidates.append(("fresh values", "fresh", None))
    sizes = _other_sizes(ep, list(fake_of.values()))
    if sizes:
        candidates.append(("another length", "left", sizes))
    for label, kind, sz in candidates:
        try:
            a, kw, changed = build(kind, sz)
            if not changed:
                continue  # the example again: not a check
            if validate:
                run(ep, a, kw)
        except Exception:
            continue  # the original does not accept these inputs: not a check
        out.append((label, a, kw))
    return out
