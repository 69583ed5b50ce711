"""The pattern registry: everything the compiler knows about one sparse or linear pattern, in
one record keyed by the pattern's dataclass.

A pattern declares here its text name and positional parameter (how ``compiler.variants.language``
parses it), a parse-time check, its block layout (the contract every sparse executor runs,
``compiler.variants.block_layout``), its legality on a site (``passes.attention_variants.check_variant``)
and the variants ``compiler.driver.auto`` should try. Backends keep their own per-pattern lowerings in
dicts keyed by the same class (``backends.onnx_sparse.BLOCK_MASKS``); the PyTorch reference and
the Triton tables are built from the block layout, so a static pattern needs nothing there.

A new pattern is one module that defines its dataclass and calls ``register`` (see
``compiler/variants/dilated.py``), plus its ONNX block mask; ``compiler/__init__`` imports the module.
This module imports nothing of attnforge, so every layer may read it.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable, Optional


@dataclass(frozen=True)
class PatternSpec:
    name: str  # the variant's text name: "window", "dilated", ...
    cls: type  # the frozen dataclass holding the parameters
    primary: Optional[str] = None  # the parameter a bare value sets ("window:256" sets left)
    kind: str = "sparse"  # "sparse" or "linear": which attnforge op runs it
    validate: Optional[Callable] = None  # (pattern, text) -> None; raises PolicyError on a bad combination
    # Static patterns (they depend on the shape only): (pattern, sq, sk, causal) ->
    # (block mask [nqb, nkb] bool, pair_keep or None); the executor adds causality and masks.
    block_mask: Optional[Callable] = None
    # Content-selected patterns: (pattern, q, k, scale, causal, kv_map) -> BlockLayout per (b, h);
    # ``kv_map[h]`` is query head h's kv head in ``k`` (None: ``k`` is at q's heads).
    layout: Optional[Callable] = None
    legal_on: Optional[Callable] = None  # (pattern, site) -> None, or why the site cannot take it
    candidates: Optional[Callable] = None  # (site, block) -> variant texts ``compiler.driver.auto`` measures
    # Decoding keeps a ring of the last ``left`` keys plus ``sinks`` first ones (``compiler.driver.generate``).
    decode_ring: bool = False
    # Linear patterns with an exact local window (hybrid): (pattern, causal) -> the window's pattern,
    # whose block layout the exact part runs; None for purely linear ones.
    exact_window: Optional[Callable] = None

    @property
    def static(self) -> bool:
        return self.layout is None


PATTERNS: dict[type, PatternSpec] = {}
BY_NAME: dict[str, PatternSpec] = {}


def register(spec: PatternSpec) -> PatternSpec:
    """Add a pattern; its name and class must be new."""
    for key, table in ((spec.cls, PATTERNS), (spec.name, BY_NAME)):
        old = table.get(key)
        if old is not None and old.cls is not spec.cls:
            raise ValueError(f"pattern {spec.name!r} ({spec.cls.__name__}) clashes with {old.name!r}")
    PATTERNS[spec.cls] = BY_NAME[spec.name] = spec
    return spec


def extend(cls: type, **fields) -> PatternSpec:
    """Fill in parts of a registered pattern that live in a higher layer (the built-in patterns'
    block layouts are in ``compiler.variants.block_layout``)."""
    return register(replace(PATTERNS[cls], **fields))


def feature(pattern, name: str):
    """A registered pattern's field ``name``; None for no pattern (fused, dense) or a head mix."""
    spec = PATTERNS.get(type(pattern))
    return None if spec is None else getattr(spec, name)


def spec_of(pattern) -> PatternSpec:
    try:
        return PATTERNS[type(pattern)]
    except KeyError:
        raise TypeError(f"{type(pattern).__name__} is not a registered attention pattern") from None
