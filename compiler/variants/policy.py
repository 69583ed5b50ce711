"""Which variant each attention site becomes.

A policy is a variant for every site (``"fused"``, ``"window:256,sinks:4"``; the text form is
in ``compiler.variants.language``), ``"auto"`` (chosen per site under a fidelity budget, see
``compiler.driver.auto``), or a dict from selectors to variants, later entries overriding earlier
ones and ``"*"`` applying first::

    {"*": "topk:blocks=8,block=64", "layers.0-3": "fused", "encoder.layer.5.*": "dense",
     "attn.7": {"heads[0-3]": "fused", "heads[*]": "window:256,sinks:4"}}

Selectors: ``*``; a layer range ``layers.A-B`` / ``layers.N`` (the first integer in the
site's module path); a glob over the module path; a site id ``attn.N``. A selector that
matches no site is an error, so a typo cannot silently leave a model dense.
"""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass, field
from typing import Union

from compiler.ir.errors import PolicyError
from compiler.ir.site import AttentionSite
from compiler.variants.language import FUSED, VALID, Variant, parse_variant

PolicySpec = Union[str, dict, "Policy", None]


@dataclass
class Policy:
    rules: list[tuple[str, Variant]] = field(default_factory=lambda: [("*", FUSED)])
    text: str = "fused"
    auto: bool = False  # choose per site under a budget (compiler.driver.auto)

    def variant_for(self, site: AttentionSite) -> Variant:
        chosen = Variant("dense")
        for selector, variant in self.rules:
            if selects(selector, site):
                chosen = variant
        return chosen

    def check_selectors(self, sites: list[AttentionSite]) -> None:
        for selector, _ in self.rules:
            if selector != "*" and not any(selects(selector, s) for s in sites):
                known = ", ".join(f"{s.id} ({s.module}, layer {s.layer})" for s in sites[:8])
                raise PolicyError(f"policy selector {selector!r} matches no attention site; sites: {known}"
                                  + (" ..." if len(sites) > 8 else ""))


_RANGE = re.compile(r"^(?:layers?)\.(\d+)(?:-(\d+))?$")
_SITE_ID = re.compile(r"^attn\.\d+$")


def selects(selector: str, site: AttentionSite) -> bool:
    if selector == "*":
        return True
    if _SITE_ID.match(selector):
        return site.id == selector
    m = _RANGE.match(selector)
    if m:
        if site.layer is None:
            return False
        lo = int(m.group(1))
        hi = int(m.group(2)) if m.group(2) else lo
        return lo <= site.layer <= hi
    return fnmatch.fnmatchcase(site.module, selector) or fnmatch.fnmatchcase(site.module, selector + ".*")


def _variant(value) -> Variant:
    if isinstance(value, Variant):
        return value
    if isinstance(value, dict):  # {"heads[0-3]": "fused", "heads[*]": "window:256"}
        parts = []
        for heads, var in value.items():
            if not (isinstance(heads, str) and heads.strip().startswith("heads[")):
                raise PolicyError(f"in a head mix dict, keys are heads[LIST], not {heads!r}")
            parts.append(f"{heads}={var}")
        return parse_variant("; ".join(parts))
    if not isinstance(value, str):
        raise PolicyError(f"a variant is a string, not {type(value).__name__}; valid variants: {VALID}")
    if value.strip().lower() == "auto":
        raise PolicyError("'auto' applies to a whole model (policy='auto'), not to one selector")
    return parse_variant(value)


def parse_policy(spec: PolicySpec) -> Policy:
    if spec is None:
        return Policy()
    if isinstance(spec, Policy):
        return spec
    if isinstance(spec, str):
        if spec.strip().lower() == "auto":
            return Policy([("*", FUSED)], text="auto", auto=True)
        return Policy([("*", _variant(spec))], text=spec.strip())
    if isinstance(spec, dict):
        rules = []
        for selector, variant in spec.items():
            if not isinstance(selector, str) or not selector.strip():
                raise PolicyError(f"policy selector {selector!r} must be a non-empty string")
            rules.append((selector.strip(), _variant(variant)))
        # "*" first so that more specific selectors override it.
        rules.sort(key=lambda r: r[0] != "*")
        return Policy(rules, text=str(spec))
    raise PolicyError(f"a policy is a string or a dict, not {type(spec).__name__}")
