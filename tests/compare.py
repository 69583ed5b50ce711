"""Comparing a rewritten program's outputs with the original model's."""

import torch
from torch.utils import _pytree as pytree


def max_err(a, b) -> float:
    """Max abs difference over all tensor leaves; the two outputs must have the same structure."""
    la, lb = pytree.tree_leaves(a), pytree.tree_leaves(b)
    assert len(la) == len(lb)
    errs = [float((x - y).abs().max()) for x, y in zip(la, lb) if isinstance(x, torch.Tensor)]
    assert errs
    return max(errs)
