"""Rotary position embeddings (RoPE) and their context-extension variants.

RoPE (Su et al., 2021, "RoFormer") rotates each pair of channels (i, i + D/2) of a query or key at
position m by the angle m * theta_i, with theta_i = base^(-2i/D). The dot product q_m . k_n then
depends only on m - n.

Notation: B batch, H heads, T tokens, D head dim.

Note: why the tables are built in float64 and kept in float32.
    At position m ~ 1e6 a float32 product m * theta_i carries an absolute angle error up to
    ulp(1e6) / 2 = 0.03 rad, and a bf16 table is off by whole radians. The angles are therefore
    formed in float64 and only cos/sin are rounded to float32; the rotation itself runs in float32
    whatever the model dtype, then casts back.
"""
from __future__ import annotations

import torch

# ----------------------------------------------------------------------------- pure functions


def default_inv_freq(head_dim: int, base: float) -> torch.Tensor:
    """theta_i = base^(-2i/D) for i in [0, D/2), float32, shape (D/2,)."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim
    return 1.0 / (base ** exponents)


def rope_cos_sin(inv_freq: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables for integer `positions` (T,), float32, shape (T, D) in rotate-half layout.

    angle[t, i] = positions[t] * inv_freq[i], formed in float64 (see the module note).
    """
    angles = positions.to(torch.float64)[:, None] * inv_freq.to(torch.float64)[None, :]  # (T, D/2)
    angles = torch.cat((angles, angles), dim=-1)  # (T, D)
    return angles.cos().float(), angles.sin().float()


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """(x1, x2) -> (-x2, x1) on the two halves of the last dimension."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x * cos + rotate_half(x) * sin, in float32, cast back to x's dtype.

    x: (B, H, T, D); cos, sin: (T, D) float32. This is the rotate-half convention of Hugging Face
    Llama checkpoints (channel i pairs with channel i + D/2).
    """
    xf = x.float()
    return (xf * cos + rotate_half(xf) * sin).to(x.dtype)
