"""The attention variants a site can become, and their text form.

A variant is written ``name:primary,key=value,...`` (``key:value`` is accepted too, so
``window:256,sinks:4`` reads naturally). The canonical text (``Variant.text``) lists every
parameter; it is what the sparse and linear ops receive as their ``spec`` argument, so a saved
program carries its pattern without any tensor.

=============  ============================================  ===============================
name           parameters (default)                          meaning
=============  ============================================  ===============================
fused          -                                             exact attention, one op
dense          -                                             leave the site as written
window         left (primary), right (0 causal / = left),    keys ``i-left <= j <= i+right``
               sinks (0), block (64)                         plus the first ``sinks`` keys
blocksparse    block (64), local (1), global (1), stride (0) Longformer/BigBird blocks
topk           blocks (primary, 8), block (64), mass (0 =    top-k key blocks per query block
               off), local (1), sinks (1)                    from mean-pooled q and k
vslash         vertical (64), slash (64), last (64),         MInference vertical + slash lines
               sinks (4), local (64), block (64)
neighborhood   size (primary, 7x7), grid (from the site),    2-D windows over an image grid
               prefix (from the site), block (64)
linear         map (primary: elu, relu, favor, taylor),      kernelized attention
               features (64), chunk (64), seed (0)
hybrid         window (primary, 64), map (taylor), features  exact window + linear outside it
               (64), chunk (64), seed (0)
=============  ============================================  ===============================

A head mix gives heads of one site different variants, groups separated by ``;``::

    heads[0-3]=fused; heads[*]=window:256,sinks:4

``heads[*]`` takes every head no earlier group named. Head mixes combine exact and sparse
variants (DuoAttention's retrieval and streaming heads).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, fields
from functools import lru_cache
from typing import Optional

from compiler.ir.errors import PolicyError
from compiler.variants.registry import BY_NAME, PatternSpec, register, spec_of

FEATURE_MAPS = ("elu", "relu", "favor", "taylor")
SOFTMAX_KERNEL_MAPS = ("favor", "taylor")  # estimate exp(q.k), so they can share a softmax normalizer


# ---------------------------------------------------------------------------- patterns


@dataclass(frozen=True)
class Window:
    left: int = 256
    right: Optional[int] = None  # None: 0 for a causal site, ``left`` otherwise
    sinks: int = 0
    block: int = 64


@dataclass(frozen=True)
class BlockSparse:
    block: int = 64
    local: int = 1  # neighbouring key blocks on each side
    global_: int = 1  # leading blocks every query sees, and whose queries see everything
    stride: int = 0  # also keep key blocks at distances that are multiples of stride (dilated)


@dataclass(frozen=True)
class TopK:
    blocks: int = 8
    block: int = 64
    mass: float = 0.0  # > 0: keep blocks until this share of pooled mass instead of a fixed k
    local: int = 1  # diagonal block plus this many earlier ones, always kept
    sinks: int = 1  # leading key blocks always kept


@dataclass(frozen=True)
class VerticalSlash:
    vertical: int = 64
    slash: int = 64
    last: int = 64  # queries the estimate is taken from
    sinks: int = 4  # leading columns always among the verticals
    local: int = 64  # nearest diagonals always among the slashes
    block: int = 64


@dataclass(frozen=True)
class Neighborhood:
    size: tuple = (7, 7)
    grid: Optional[tuple] = None  # (rows, cols); None: taken from the site's sequence length
    prefix: Optional[int] = None  # leading non-grid tokens (CLS), global; None: inferred
    block: int = 64


@dataclass(frozen=True)
class Linear:
    map: str = "elu"
    features: int = 64  # random features of favor
    chunk: int = 64
    seed: int = 0


@dataclass(frozen=True)
class Hybrid:
    window: int = 64
    map: str = "taylor"
    features: int = 64
    chunk: int = 64
    seed: int = 0


@dataclass(frozen=True)
class HeadMix:
    groups: tuple  # ((heads or None for "*", Variant), ...)


def _softmax_map(p: "Hybrid", text: str) -> None:
    if p.map not in SOFTMAX_KERNEL_MAPS:
        raise PolicyError(f"{text!r}: a hybrid shares the softmax normalizer, so its map must estimate exp(q.k): "
                          f"{', '.join(SOFTMAX_KERNEL_MAPS)}")


def _odd_size(p: "Neighborhood", text: str) -> None:
    if any(s % 2 == 0 for s in p.size):
        raise PolicyError(f"{text!r}: neighborhood size must be odd in each dimension (e.g. 7x7)")


# The built-in patterns' text forms; their block layouts join them in compiler.variants.block_layout.
for _spec in (PatternSpec("window", Window, "left", decode_ring=True), PatternSpec("blocksparse", BlockSparse, "block"),
              PatternSpec("topk", TopK, "blocks"), PatternSpec("vslash", VerticalSlash, None),
              PatternSpec("neighborhood", Neighborhood, "size", validate=_odd_size),
              PatternSpec("linear", Linear, "map", kind="linear"),
              PatternSpec("hybrid", Hybrid, "window", kind="linear", validate=_softmax_map)):
    register(_spec)
_EXACT = {"fused": "exact attention as one attnforge::attention op", "dense": "leave the site as the model wrote it"}
ALIASES = {"none": "dense", "off": "dense", "exact": "fused", "sinks": "window"}


def valid_names() -> str:
    """Every variant name, patterns registered later included (for error messages)."""
    return ", ".join([*_EXACT, *BY_NAME, "heads[...]=... (head mix)"])


def __getattr__(name: str):
    if name == "VALID":  # computed on read, so patterns registered after this module are listed
        return valid_names()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@dataclass(frozen=True)
class Variant:
    kind: str  # "fused", "dense", "sparse", "linear"
    pattern: object = None  # a pattern dataclass for sparse and linear variants

    @property
    def text(self) -> str:
        return format_pattern(self.pattern) if self.pattern is not None else self.kind

    @property
    def exact(self) -> bool:
        return self.kind in ("fused", "dense")

    def __str__(self) -> str:
        return self.text


FUSED = Variant("fused")
DENSE = Variant("dense")


# ---------------------------------------------------------------------------- text form


def _field_name(f) -> str:
    return f.name.rstrip("_")


def _fmt_value(v) -> str:
    if isinstance(v, tuple):
        return "x".join(str(x) for x in v)
    if isinstance(v, float):
        return repr(v)  # the shortest text that reads back as the same float
    return "auto" if v is None else str(v)


def format_pattern(p) -> str:
    if isinstance(p, HeadMix):
        parts = []
        for heads, var in p.groups:
            sel = "*" if heads is None else _fmt_heads(heads)
            parts.append(f"heads[{sel}]={var.text}")
        return "; ".join(parts)
    name = spec_of(p).name
    return name + ":" + ",".join(f"{_field_name(f)}={_fmt_value(getattr(p, f.name))}" for f in fields(p))


def compact_text(text: str) -> str:
    """A variant's text with only the parameters that differ from their defaults (for display)."""
    try:
        v = parse_variant(text)
    except PolicyError:
        return text
    return _compact(v)


def _compact(v: "Variant") -> str:
    p = v.pattern
    if p is None:
        return v.kind
    if isinstance(p, HeadMix):
        return "; ".join(f"heads[{'*' if h is None else _fmt_heads(h)}]={_compact(var)}" for h, var in p.groups)
    changed = [f"{_field_name(f)}={_fmt_value(getattr(p, f.name))}" for f in fields(p) if getattr(p, f.name) != f.default]
    return spec_of(p).name + (":" + ",".join(changed) if changed else "")


def _fmt_heads(heads: tuple) -> str:
    out, i = [], 0
    while i < len(heads):
        j = i
        while j + 1 < len(heads) and heads[j + 1] == heads[j] + 1:
            j += 1
        out.append(str(heads[i]) if i == j else f"{heads[i]}-{heads[j]}")
        i = j + 1
    return ",".join(out)


_MAX_PARAM = 2**31 - 1


def _convert(name: str, key: str, raw: str):
    raw = raw.strip()
    what = f"{name}: {key}={raw!r}"
    if raw in ("auto", "none") and key in ("grid", "prefix", "right"):
        return None
    if key in ("size", "grid"):
        m = re.fullmatch(r"(\d+)(?:x(\d+))?", raw)
        if not m:
            raise PolicyError(f"{what}: expected ROWSxCOLS, e.g. 7x7")
        a = int(m.group(1))
        return (a, int(m.group(2)) if m.group(2) else a)
    if key == "map":
        if raw not in FEATURE_MAPS:
            raise PolicyError(f"{what}: unknown feature map; valid maps: {', '.join(FEATURE_MAPS)}")
        return raw
    if key == "mass":
        try:
            x = float(raw)
        except ValueError:
            raise PolicyError(f"{what}: expected a number in (0, 1]") from None
        if not 0.0 <= x <= 1.0:
            raise PolicyError(f"{what}: expected a number in (0, 1]")
        return x
    try:
        x = int(raw)
    except ValueError:
        raise PolicyError(f"{what}: expected a whole number") from None
    positive = key in ("block", "chunk", "features", "blocks", "last", "window")
    if x > _MAX_PARAM:  # sizes feed int32 kernels and tensor shapes
        raise PolicyError(f"{what}: too large (at most {_MAX_PARAM})")
    if x < (1 if positive else 0):
        raise PolicyError(f"{what}: must be {'positive' if positive else '>= 0'}")
    return x


def _parse_single(text: str) -> Variant:
    if not text.isprintable():
        raise PolicyError(f"{text!r}: a policy is one line of printable text; remove the line break or control "
                          "character")
    tokens = [t.strip() for t in text.split(",")]
    if not tokens[0] or any(not t for t in tokens):
        raise PolicyError(f"empty item in {text!r}; valid variants: {valid_names()}")
    head, rest = re.fullmatch(r"([^:=]*)(?:[:=](.*))?", tokens[0]).groups()
    rest = (rest or "").strip()
    name = ALIASES.get(head.strip().lower(), head.strip().lower())
    if name in _EXACT:
        if rest or len(tokens) > 1:
            raise PolicyError(f"{text!r}: {name!r} takes no parameters")
        return Variant(name)
    if name not in BY_NAME:
        raise PolicyError(f"unknown attention variant {head.strip()!r}; valid variants: {valid_names()}")
    spec = BY_NAME[name]
    cls, primary = spec.cls, spec.primary
    keys = {_field_name(f): f for f in fields(cls)}
    items: list[tuple[str, str]] = []
    if head.strip().lower() == "sinks":  # "sinks:4,window:256"
        items.append(("sinks", rest))
    elif rest:
        if re.search(r"[:=]", rest):
            k, _, v = re.split(r"([:=])", rest, maxsplit=1)
            items.append((k.strip().lower(), v))
        elif primary is None:
            raise PolicyError(f"{text!r}: {name} has no positional parameter; write key=value "
                              f"(valid keys: {', '.join(keys)})")
        else:
            items.append((primary, rest))
    for t in tokens[1:]:
        parts = re.split(r"[:=]", t, maxsplit=1)
        if len(parts) != 2:
            raise PolicyError(f"{text!r}: parameter {t!r} needs a value (key=value); valid keys for {name}: "
                              f"{', '.join(keys)}")
        items.append((parts[0].strip().lower(), parts[1]))
    values = {}
    for k, v in items:
        if k == name and primary:  # "sinks:4,window:256"
            k = primary
        if k not in keys:
            raise PolicyError(f"{text!r}: unknown parameter {k!r} for {name}; valid keys: {', '.join(keys)}")
        values[keys[k].name] = _convert(name, k, v)
    if name == "window" and "left" not in values:
        raise PolicyError(f"{text!r}: sinks need a window, e.g. window:256,sinks:4")
    p = cls(**values)
    if spec.validate is not None:
        spec.validate(p, text)
    return Variant(spec.kind, p)


def _parse_heads(sel: str, text: str) -> Optional[tuple]:
    sel = sel.strip()
    if sel == "*":
        return None
    heads = []
    for part in sel.split(","):
        m = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+))?\s*", part)
        if not m:
            raise PolicyError(f"{text!r}: bad head list {sel!r}; write heads[0-3,8] or heads[*]")
        lo, hi = int(m.group(1)), int(m.group(2) or m.group(1))
        if hi < lo:
            raise PolicyError(f"{text!r}: empty head range {part.strip()!r}")
        heads.extend(range(lo, hi + 1))
    return tuple(sorted(set(heads)))


def _parse_mix(text: str) -> Variant:
    groups, seen, star = [], set(), False
    for part in [p.strip() for p in text.split(";") if p.strip()]:
        m = re.fullmatch(r"heads\[([^\]]*)\]\s*[=:]\s*(.+)", part)
        if not m:
            raise PolicyError(f"{part!r}: a head group is heads[LIST]=VARIANT, e.g. heads[0-3]=fused")
        heads = _parse_heads(m.group(1), part)
        var = _parse_single(m.group(2))
        if var.kind == "dense":
            var = FUSED  # inside one op, "leave as written" heads are exact heads
        if var.kind == "linear":
            raise PolicyError(f"{part!r}: head mixes combine fused and sparse variants; "
                              "give linear variants to whole sites")
        if heads is None:
            if star:
                raise PolicyError(f"{text!r}: heads[*] given twice")
            star = True
        else:
            if seen & set(heads):
                raise PolicyError(f"{text!r}: heads {sorted(seen & set(heads))} are in two groups")
            seen |= set(heads)
        groups.append((heads, var))
    if not groups:
        raise PolicyError(f"empty head mix {text!r}")
    if all(v.kind == "fused" for _, v in groups):
        return FUSED
    return Variant("sparse", HeadMix(tuple(groups)))


def parse_variant(text: str) -> Variant:
    """One variant from its text form; raises PolicyError naming the bad token."""
    if not isinstance(text, str):
        raise PolicyError(f"a variant is a string, not {type(text).__name__}; valid variants: {valid_names()}")
    return _parse_cached(text)


@lru_cache(maxsize=256)
def _parse_cached(text: str) -> Variant:
    t = text.strip()
    if not t:
        raise PolicyError(f"empty variant; valid variants: {valid_names()}")
    if t.lower().startswith("heads[") or ";" in t:
        return _parse_mix(t)
    return _parse_single(t)


def resolve_right(p: Window, causal: bool) -> int:
    if p.right is not None:
        return p.right
    return 0 if causal else p.left

