"""Long inputs in tiles of tokens: the per-token work of a block computed a tile at a time, so its
temporaries and intermediates are one tile's, not the sequence's (Arctic Long Sequence Training's
sequence tiling, Bekman et al. 2025).

    TokenTiles   fn over token tiles, recomputed tile by tile in backward (model.Block under --mlp-chunk)
    Rotary       RoPE (rope.apply_rope) over token tiles, with its closed-form backward
    rows_per_tile   the tile height for a row width: TILE_ELEMENTS values (model.RMSNormFunction's tiles)

Notation: B batch, T tokens, t tokens of one tile, H heads, D head dim.
"""
from __future__ import annotations

import torch
from torch.utils.checkpoint import get_device_states, set_device_states

import rope

TILE_ELEMENTS = 2**24  # values per tile of a float32 temporary of RMSNorm and RoPE over long inputs (64 MiB)

# ----------------------------------------------------------------------------- pure functions


def rows_per_tile(width: int) -> int:
    """Rows of `width` values in one tile of TILE_ELEMENTS (at least 1)."""
    return max(1, TILE_ELEMENTS // width)


def token_slice(t: torch.Tensor, s: int, e: int) -> torch.Tensor:
    """Tokens [s, e) of a RoPE table, (T, D) or (B, 1, T, D): tokens are dim -2 in both."""
    return t[..., s:e, :]


# ----------------------------------------------------------------------------- autograd functions


class TokenTiles(torch.autograd.Function):
    """outs = fn(*[x[:, s:s + tile] for x in xs], s) over tiles of the tokens of inputs xs (B, T, ...): fn is
    position-wise along T and returns tensors (B, t, ...) for the tile's t tokens, written into
    preallocated (B, T, ...) outputs. Forward keeps only the inputs; backward recomputes each tile under
    gradient and writes its input gradients into preallocated (B, T, ...) ones, while the trained
    parameters `params` (fn's own) get the sum of the tiles' gradients, returned once (so DDP's and
    FSDP's hooks fire once per parameter). Dropout draws the same masks in the recompute (the RNG state
    is restored, as torch.utils.checkpoint does).

    Note: why. With per-block checkpointing the largest live tensors at long context are the recomputed
    block's per-token intermediates and their gradients, ~6 F values per token in the MLP (F = 14336 for
    Llama-3-8B: 13.8 GB at T = 80K in bf16), plus the normalised inputs, the residual stream and the float32
    RoPE and LoRA temporaries of the projections. Tiling caps them at one tile's (Arctic Long Sequence
    Training's TiledMLP, Bekman et al. 2025), for one more forward of the tiled parts per step; writing
    into preallocated buffers avoids the concatenations (a T-long output and gradient each) that
    checkpointing each tile separately pays.
    """

    @staticmethod
    def forward(ctx, fn, tile: int, n_inputs: int, *tensors):
        xs, ctx.params = tensors[:n_inputs], tensors[n_inputs:]
        ctx.fn, ctx.tile, ctx.rng = fn, tile, (torch.get_rng_state(), get_device_states(*xs))
        ctx.save_for_backward(*xs)
        outs, T = None, xs[0].shape[1]
        for s in range(0, T, tile):
            pieces = fn(*(x[:, s:s + tile] for x in xs), s)
            if outs is None:
                outs = [p.new_empty(p.shape[0], T, *p.shape[2:]) for p in pieces]  # (B, T, ...)
            for out, piece in zip(outs, pieces):
                out[:, s:s + tile] = piece
        return tuple(outs)

    @staticmethod
    def backward(ctx, *grads):
        xs, tile = ctx.saved_tensors, ctx.tile  # read once: checkpointing unpacks each saved tensor once
        n = len(xs)
        wanted = [i for i in range(n + len(ctx.params)) if ctx.needs_input_grad[3 + i]]
        dxs = [torch.empty_like(x) if i in wanted else None for i, x in enumerate(xs)]
        dparams = [None] * len(ctx.params)
        devices, states = ctx.rng[1]
        with torch.random.fork_rng(devices=devices), torch.enable_grad():
            torch.set_rng_state(ctx.rng[0])
            set_device_states(devices, states)
            for s in range(0, xs[0].shape[1], tile):
                parts = [x[:, s:s + tile].detach().requires_grad_(i in wanted) for i, x in enumerate(xs)]
                pairs = [(o, g[:, s:s + tile]) for o, g in zip(ctx.fn(*parts, s), grads) if g is not None]
                inputs = [parts[i] if i < n else ctx.params[i - n] for i in wanted]
                got = torch.autograd.grad([o for o, _ in pairs], inputs, [g for _, g in pairs], allow_unused=True)
                for i, g in zip(wanted, got):
                    if i < n:
                        dxs[i][:, s:s + tile] = 0 if g is None else g
                    elif g is not None:
                        dparams[i - n] = g if dparams[i - n] is None else dparams[i - n] + g
        return (None, None, None, *dxs, *dparams)


class Rotary(torch.autograd.Function):
    """rope.apply_rope over tiles of tokens, and its backward dx = apply_rope(dy, cos, -sin).

    The rotation y = x cos + R(x) sin (R the rotate-half map) is linear in x with R^T = -R, so
    dx = dy cos - R(dy sin) = dy cos + R(dy) (-sin): sin's two halves are equal in the rotate-half layout
    (rope.rope_cos_sin), so the product commutes with R. Nothing is saved but the tables (one pair serves
    every block); the float32 temporaries are one tile's, not the (B, H, T, D) tensor's four float32 copies.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(cos, sin)
        return Rotary.tiled(x, cos, sin, 1)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        cos, sin = ctx.saved_tensors
        return Rotary.tiled(dy, cos, sin, -1), None, None

    @staticmethod
    def tiled(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, sign: int) -> torch.Tensor:
        T = x.shape[-2]
        rows = rows_per_tile(x[..., 0, :].numel())
        if T <= rows:
            return rope.apply_rope(x, cos, sin if sign > 0 else -sin)
        out = torch.empty_like(x, memory_format=torch.contiguous_format)
        for s in range(0, T, rows):
            c, n = token_slice(cos, s, s + rows), token_slice(sin, s, s + rows)
            out[..., s:s + rows, :] = rope.apply_rope(x[..., s:s + rows, :], c, n if sign > 0 else -n)
        return out


# ----------------------------------------------------------------------------- entry points


def token_tiled(fn, xs: tuple[torch.Tensor, ...], tile: int, modules) -> tuple[torch.Tensor, ...]:
    """TokenTiles over the tokens of xs; `modules` are those fn runs, whose trained parameters it differentiates."""
    params = [p for m in modules for p in m.parameters() if p.requires_grad]
    return TokenTiles.apply(fn, tile, len(xs), *xs, *params)
