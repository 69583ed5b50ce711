"""Attention maps as a report stores them: 8-bit images, base64 in the JSON."""

from __future__ import annotations

import base64

import torch


def encode_map(x: torch.Tensor) -> str:
    """A [H, W] map in [0, 1] as base64 of its 8-bit values (row-major)."""
    q = (x.clamp(0, 1) * 255).round().to(torch.uint8).contiguous()
    return base64.b64encode(q.numpy().tobytes()).decode("ascii")


def decode_map(data: str, shape: list) -> "torch.Tensor":
    raw = base64.b64decode(data)
    return torch.frombuffer(bytearray(raw), dtype=torch.uint8).view(*shape).float() / 255.0
