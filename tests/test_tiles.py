"""tiles.py: token tiles give the untiled results (forward and gradients), recompute with the forward's
dropout masks, and hand each trained parameter one gradient."""
import pytest
import torch
import torch.nn.functional as F

import model
import rope
import tiles


@pytest.fixture
def small_tiles(monkeypatch):
    """Tiles of 64 values, so inputs of a few rows already span several tiles (one of them ragged)."""
    monkeypatch.setattr(tiles, "TILE_ELEMENTS", 64)


@pytest.mark.parametrize("tiled", [False, True])
def test_rotary_equals_autograd_through_apply_rope(monkeypatch, tiled):
    """Rotary's forward and its closed-form backward apply_rope(dy, cos, -sin) against autograd through
    rope.apply_rope, in float32, one pass and tiles of 4 tokens (x of 4 heads x 16 dims per token, 13
    tokens: a ragged last tile). Tolerance: bit-equal (the same products, summed in the same pairs)."""
    if tiled:
        monkeypatch.setattr(tiles, "TILE_ELEMENTS", 4 * 2 * 4 * 16)  # 4 tokens of (B, H, D) = (2, 4, 16)
    g = torch.Generator().manual_seed(0)
    B, H, T, D = 2, 4, 13, 16
    inv_freq, _ = rope.rope_frequencies(D, 10000.0, None, seq_len=T)
    cos, sin = rope.rope_cos_sin(inv_freq, torch.arange(T))
    x0, dy = torch.randn(B, H, T, D, generator=g), torch.randn(B, H, T, D, generator=g)
    out = []
    for f in (rope.apply_rope, tiles.Rotary.apply):
        x = x0.clone().requires_grad_()
        y = f(x, cos, sin)
        y.backward(dy)
        out.append((y, x.grad))
    for a, b in zip(*out):
        assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_in_row_tiles_equals_one_pass(small_tiles, dtype):
    """RMSNormFunction over tiles of 1 row (width 64, 2 x 7 rows) against one pass: output and dx
    bit-equal (each row's arithmetic is the same); the trained gain's gradient, summed per tile in x's
    dtype and accumulated in float32, within 1e-6 relative in float32 and one bf16 rounding (2^-8) in bf16."""
    g = torch.Generator().manual_seed(0)
    x0, w0 = torch.randn(2, 7, 64, generator=g).to(dtype) * 3, torch.randn(64, generator=g)
    dy = torch.randn(2, 7, 64, generator=g).to(dtype)
    out = []
    for elements in (2**24, 64):
        tiles.TILE_ELEMENTS = elements  # restored by the fixture
        x, w = x0.clone().requires_grad_(), w0.clone().requires_grad_()
        y = model.RMSNormFunction.apply(x, w, 1e-5)
        y.backward(dy)
        out.append((y, x.grad, w.grad))
    (y1, dx1, dw1), (y2, dx2, dw2) = out
    assert torch.equal(y1, y2) and torch.equal(dx1, dx2)
    tol = 1e-6 if dtype == torch.float32 else 2**-7
    assert (dw1 - dw2).abs().max() <= tol * dw1.abs().max()


def test_token_tiles_recompute_draws_the_forward_dropout_masks():
    """fn = dropout(x) * w over tiles of 3 tokens: backward recomputes each tile after restoring the RNG
    state, so dx is 2 w dy exactly where the forward kept a value (y != 0) and 0 elsewhere."""
    torch.manual_seed(0)
    x = torch.randn(1, 10, 8, dtype=torch.float64, requires_grad=True)
    w = torch.randn(8, dtype=torch.float64, requires_grad=True)
    y = tiles.TokenTiles.apply(lambda xt, s: (F.dropout(xt, 0.5) * w,), 3, 1, x, w)[0]
    dy = torch.randn_like(y)
    torch.randn(100)  # the global RNG moves on between forward and backward
    y.backward(dy)
    kept = y != 0
    assert 0 < kept.sum() < kept.numel()
    torch.testing.assert_close(x.grad, torch.where(kept, 2 * w * dy, 0.0), rtol=0, atol=0)
    torch.testing.assert_close(w.grad, (y / w * dy).sum((0, 1)), rtol=1e-12, atol=1e-12)


def test_token_tiles_hand_each_parameter_one_gradient():
    """Two inputs, tiles of 4 over 11 tokens (3 tiles): the parameter's gradient arrives once (DDP and
    FSDP2 hook the accumulation), equal to autograd through the untiled fn (float64, 1e-12)."""
    g = torch.Generator().manual_seed(0)
    a0, b0 = torch.randn(2, 11, 5, generator=g, dtype=torch.float64), torch.randn(2, 11, 5, generator=g, dtype=torch.float64)
    lin = torch.nn.Linear(5, 5, dtype=torch.float64)
    calls = []
    lin.weight.register_post_accumulate_grad_hook(lambda p: calls.append(1))

    def fn(at, bt, s):
        return torch.tanh(lin(at)) * bt, at + bt

    grads = []
    for tiled in (False, True):
        lin.zero_grad()
        a, b = a0.clone().requires_grad_(), b0.clone().requires_grad_()
        outs = tiles.token_tiled(fn, (a, b), 4, (lin,)) if tiled else fn(a, b, 0)
        sum(o.sum() * (i + 1) for i, o in enumerate(outs)).backward()
        grads.append((a.grad, b.grad, lin.weight.grad.clone(), lin.bias.grad.clone()))
    assert len(calls) == 2  # once per backward
    for u, v in zip(*grads):
        torch.testing.assert_close(u, v, rtol=0, atol=1e-12)
