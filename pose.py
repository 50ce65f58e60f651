"""PoSE position ids: train in a window of L tokens whose positions are spread over a target length.

PoSE (Zhu et al. 2023, "PoSE: Efficient Context Window Extension of LLMs via Positional Skip-wise
Training", Sec. 3.2) keeps the training window at L tokens of contiguous text and gives them positions
that reach a target length L_t > L. The window is cut into N chunks c_0 .. c_{N-1} of lengths l_i
(sum l_i = L); chunk i gets the positions

    pos(c_i) = { st_i, st_i + 1, ..., st_i + l_i - 1 },   st_i = sum_{j<i} l_j + u_i,
    u_0 = 0,   u_i ~ U{u_{i-1}, ..., L_t - L}            (skipping biases, non-decreasing),

so positions start at 0, increase strictly (st_{i+1} >= st_i + l_i), and stay below
L - 1 + u_{N-1} + 1 <= L_t. Relative distances up to L_t - 1 occur between chunks, while every step
costs L tokens. The paper trains with N = 2 (the default here); the chunk borders are N - 1 distinct cut
points drawn uniformly from {1, ..., L - 1}. The text inside the chunks is
contiguous (the paper's text-skipping bias v_i = 0).

Seeding: `pose_positions` takes a `random.Random`; the trainer seeds one per sample from
(--seed, global sample index), so a resumed or re-sharded run draws the same positions.

Notation: L window length (tokens), L_t target length, N chunks.
"""
from __future__ import annotations

import random

import torch

# ----------------------------------------------------------------------------- pure functions


def pose_positions(length: int, target: int, rng: random.Random, chunks: int = 2) -> torch.Tensor:
    """Positions (L,) int64 for a window of `length` tokens spread over [0, target) (module docstring)."""
    if length < 1 or target < length:
        raise ValueError(f"pose_positions: need 1 <= length <= target, got length {length}, target {target}")
    if chunks < 1:
        raise ValueError(f"pose_positions: chunks must be >= 1, got {chunks}")
    n = min(chunks, length)
    cuts = sorted(rng.sample(range(1, length), n - 1))  # chunk borders
    starts, ends = [0, *cuts], [*cuts, length]
    out = torch.empty(length, dtype=torch.long)
    u = 0
    for i, (a, b) in enumerate(zip(starts, ends)):
        if i:
            u = rng.randint(u, target - length)  # u_i ~ U{u_{i-1}, ..., L_t - L}
        out[a:b] = torch.arange(a + u, b + u)  # st_i = a + u_i
    return out


def sample_rng(seed: int, index: int) -> random.Random:
    """The generator of global sample `index` in a run seeded `seed` (string seeds hash deterministically)."""
    return random.Random(f"pose:{seed}:{index}")
