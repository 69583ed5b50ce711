"""Which variant each attention site becomes.

A policy is a string naming one variant for every site (``"fused"``), or a dict from
selectors to variants, most specific last wins::

    {"*": "fused", "layers.0-3": "dense", "encoder.layer.5.*": "dense", "attn.7": "fused"}

Selectors: ``*``; a layer range ``layers.A-B`` / ``layers.N`` (matched against the first
integer in the site's module path); a glob over the module path; a site id ``attn.N``.
"""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass, field
from typing import Union

from compiler.errors import PolicyError
from compiler.site import AttentionSite

EXACT_VARIANTS = {
    "fused": "exact attention as one attnforge::attention op",
    "dense": "leave the site as the model wrote it",
}
ALIASES = {"none": "dense", "off": "dense", "exact": "fused"}

PolicySpec = Union[str, dict, "Policy", None]


@dataclass
class Policy:
    rules: list[tuple[str, str]] = field(default_factory=lambda: [("*", "fused")])
    text: str = "fused"

    def variant_for(self, site: AttentionSite) -> str:
        chosen = "dense"
        for selector, variant in self.rules:
            if _selects(selector, site):
                chosen = variant
        return chosen


_RANGE = re.compile(r"^(?:layers?)\.(\d+)(?:-(\d+))?$")
_SITE_ID = re.compile(r"^attn\.\d+$")


def _selects(selector: str, site: AttentionSite) -> bool:
    if selector == "*":
        return True
    if _SITE_ID.match(selector):
        return site.id == selector
    m = _RANGE.match(selector)
    if m and site.layer is not None:
        lo = int(m.group(1))
        hi = int(m.group(2)) if m.group(2) else lo
        return lo <= site.layer <= hi
    return fnmatch.fnmatchcase(site.module, selector) or fnmatch.fnmatchcase(site.module, selector + ".*")


def _variant(token: str) -> str:
    t = token.strip().lower()
    t = ALIASES.get(t, t)
    if t not in EXACT_VARIANTS:
        valid = ", ".join(sorted(EXACT_VARIANTS))
        raise PolicyError(f"unknown attention variant {token.strip()!r}; valid variants: {valid}")
    return t


def parse_policy(spec: PolicySpec) -> Policy:
    if spec is None:
        return Policy()
    if isinstance(spec, Policy):
        return spec
    if isinstance(spec, str):
        if not spec.strip():
            raise PolicyError("empty policy; valid variants: " + ", ".join(sorted(EXACT_VARIANTS)))
        return Policy([("*", _variant(spec))], text=spec.strip())
    if isinstance(spec, dict):
        rules = []
        for selector, variant in spec.items():
            if not isinstance(selector, str) or not selector:
                raise PolicyError(f"policy selector {selector!r} must be a non-empty string")
            rules.append((selector, _variant(variant)))
        # "*" first so that more specific selectors override it.
        rules.sort(key=lambda r: r[0] != "*")
        return Policy(rules, text=str(spec))
    raise PolicyError(f"a policy is a string or a dict, not {type(spec).__name__}")
