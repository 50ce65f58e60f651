"""Tests for shift_attn.py: S2-Attn against a float64 naive reference, causality, window isolation,
argument errors and the O(T G) memory claim.

The reference (helpers.reference_mask) is written from S²-Attn's window lists (Chen et al., 2024, LongLoRA:
plain heads [0, G), [G, 2G), ...; shifted heads [0, G/2), [G/2, 3G/2), ...), not from shift_attn's own
helpers, and applied as an explicit (T, T) mask.
"""
from __future__ import annotations


import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.profiler import ProfilerActivity, profile

from helpers import naive_attention, random_qkv, reference_mask
from shift_attn import (causal_attention, group_size_for, head_pieces, make_attention, s2_mask,
                        shifted_sparse_attention)

# (B, H, Hkv, T, G)
CASES = [
    (2, 4, 2, 32, 8),  # T divisible by G
    (1, 9, 3, 37, 8),  # SmolLM2 heads (odd H, border inside a kv group), ragged tail
    (2, 9, 3, 5, 8),  # G/2 < T < G
    (1, 4, 4, 3, 8),  # T < G/2
    (1, 6, 2, 20, 40),  # G >= 2T: full causal attention
    (1, 4, 1, 30, 6),  # MQA
    (2, 8, 8, 33, 2),  # MHA, smallest window
    (1, 1, 1, 17, 4),  # one head: it is a shifted head (0 >= 1 // 2)
    (1, 5, 5, 24, 12),  # odd MHA
]


def out_and_grads(fn, q, k, v, weight):
    out = fn(q, k, v)
    return (out, *torch.autograd.grad((out * weight).sum(), (q, k, v)))


def check_against_reference(B, H, Hkv, T, G, seed=0):
    q, k, v = random_qkv(B, H, Hkv, T, seed=seed)
    weight = torch.randn(q.shape, dtype=q.dtype, generator=torch.Generator().manual_seed(seed + 1))
    mask = reference_mask(H, T, G)
    got = out_and_grads(lambda *x: shifted_sparse_attention(*x, group_size=G), q, k, v, weight)
    want = out_and_grads(lambda *x: naive_attention(*x, mask), q, k, v, weight)
    # Reference: naive float64 softmax attention. Tolerance 1e-10: both sides are float64 (unit roundoff
    # 1.1e-16) on O(1) values; only the summation order differs (online vs. one-shot softmax).
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, want):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-10, msg=lambda m: f"{name}: {m}")


# ----------------------------------------------------------------------------- semantics


@pytest.mark.parametrize("case", CASES)
def test_mask_matches_window_lists(case):
    _, H, _, T, G = case
    assert torch.equal(s2_mask(H, T, G), reference_mask(H, T, G))


@pytest.mark.parametrize("case", CASES)
def test_matches_naive_reference(case):
    check_against_reference(*case)


@settings(max_examples=40, deadline=None, database=None)  # no .hypothesis writes
@given(B=st.integers(1, 2), Hkv=st.integers(1, 3), rep=st.integers(1, 4), T=st.integers(1, 40),
       half_g=st.integers(1, 24), seed=st.integers(0, 2**16))
def test_matches_naive_reference_property(B, Hkv, rep, T, half_g, seed):
    """Property: for any shapes, output and gradients equal the float64 masked reference."""
    check_against_reference(B, Hkv * rep, Hkv, T, 2 * half_g, seed=seed)


def test_large_group_is_full_causal():
    q, k, v = random_qkv(1, 6, 2, 20)
    full = naive_attention(q, k, v, torch.ones(20, 20, dtype=torch.bool).tril())
    # Reference: naive float64 causal attention; 1e-10 as in check_against_reference.
    torch.testing.assert_close(shifted_sparse_attention(q, k, v, 40), full, rtol=0, atol=1e-10)
    torch.testing.assert_close(causal_attention(q, k, v), full, rtol=0, atol=1e-10)
    torch.testing.assert_close(make_attention()(q, k, v), full, rtol=0, atol=1e-10)


@pytest.mark.parametrize("dtype, atol", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)])
def test_low_precision_keeps_dtype(dtype, atol):
    q, k, v = random_qkv(1, 9, 3, 37, seed=3)
    want = naive_attention(q, k, v, reference_mask(9, 37, 8))
    got = shifted_sparse_attention(q.to(dtype), k.to(dtype), v.to(dtype), 8)
    assert got.dtype == dtype
    # Reference: float64 naive attention on the same (rounded-from-float64) inputs. Tolerance: float32 eps
    # 1.2e-7 times score magnitudes ~10 and accumulation over <= 8 keys -> 1e-5; bf16 eps 7.8e-3 on inputs
    # and output of magnitude <= ~2 -> 3e-2.
    torch.testing.assert_close(got.double(), want, rtol=0, atol=atol)


def test_head_pieces_cover_heads_with_uniform_kv_map():
    for H, Hkv in [(9, 3), (8, 2), (4, 1), (1, 1), (3, 3), (12, 4), (10, 5), (6, 2)]:
        rep = H // Hkv
        pieces = head_pieces(H, Hkv)
        assert [h for a, b, _ in pieces for h in range(a, b)] == list(range(H))
        for a, b, shifted in pieces:
            assert all((h >= H // 2) == shifted for h in range(a, b))
            kv = [h // rep for h in range(a, b)]
            n_kv = kv[-1] - kv[0] + 1
            assert (b - a) % n_kv == 0 and kv == [kv[0] + i // ((b - a) // n_kv) for i in range(b - a)]


# ----------------------------------------------------------------------------- gradient structure


@pytest.mark.parametrize("attn_fn, mask", [
    (make_attention(group_size=4), reference_mask(9, 13, 4)),
    (make_attention(group_ratio=0.5), reference_mask(9, 13, group_size_for(13, 0.5))),
    (causal_attention, torch.ones(9, 13, 13, dtype=torch.bool).tril()),
])
def test_gradient_support_is_the_mask(attn_fn, mask):
    """Causality and window isolation: d out[h, t] / d x[s] is exactly zero unless query t of head h sees s.

    Checked for every head and every position with autograd. d out / d v[s] = p(t, s) > 0 for every
    key seen, so for v the support must equal the mask, not just lie inside it.
    """
    H, T, _ = mask.shape
    Hkv, rep = 3, 3
    q, k, v = random_qkv(1, H, Hkv, T, D=4, seed=7)
    out = attn_fn(q, k, v)
    weight = torch.randn(4, dtype=torch.float64, generator=torch.Generator().manual_seed(8))
    for h in range(H):
        for t in range(T):
            dq, dk, dv = torch.autograd.grad((out[0, h, t] * weight).sum(), (q, k, v), retain_graph=True)
            own_q = torch.zeros(H, T, dtype=torch.bool)
            own_q[h, t] = True
            assert (dq[0].abs().sum(-1)[~own_q] == 0).all(), f"head {h} pos {t}: dq leaks"
            seen = torch.zeros(Hkv, T, dtype=torch.bool)
            seen[h // rep] = mask[h, t]
            assert (dk[0].abs().sum(-1)[~seen] == 0).all(), f"head {h} pos {t}: dk outside its window"
            assert torch.equal(dv[0].abs().sum(-1) != 0, seen), f"head {h} pos {t}: dv support"


# ----------------------------------------------------------------------------- make_attention, errors


def test_group_ratio_reads_t_at_call_time():
    cases = [(4096, 0.25), (100, 0.25), (10, 0.25), (4, 0.1), (64, 1.0)]
    assert [group_size_for(T, r) for T, r in cases] == [1024, 24, 2, 2, 64]
    attn = make_attention(group_ratio=0.25)
    for T in (24, 50):
        q, k, v = random_qkv(1, 4, 2, T, seed=T)
        G = group_size_for(T, 0.25)
        # Same code path with the G it should pick: equal to the last bit.
        assert torch.equal(attn(q, k, v), shifted_sparse_attention(q, k, v, G))
        # Reference: float64 naive attention, 1e-10 as in check_against_reference.
        want = naive_attention(q, k, v, reference_mask(4, T, G))
        torch.testing.assert_close(attn(q, k, v), want, rtol=0, atol=1e-10)


@pytest.mark.parametrize("group_size", [3, 1, 0, -2, 2.0, 7])
def test_bad_group_size(group_size):
    q, k, v = random_qkv(1, 2, 1, 8)
    with pytest.raises(ValueError, match="group_size"):
        shifted_sparse_attention(q, k, v, group_size)
    with pytest.raises(ValueError, match="group_size"):
        make_attention(group_size=group_size)


@pytest.mark.parametrize("ratio", [0.0, -0.25, 1.5, float("nan")])
def test_bad_group_ratio(ratio):
    with pytest.raises(ValueError, match="group_ratio"):
        make_attention(group_ratio=ratio)


def test_both_group_size_and_ratio():
    with pytest.raises(ValueError, match="not both"):
        make_attention(group_size=8, group_ratio=0.25)


@pytest.mark.parametrize("shapes", [
    ((1, 4, 8, 8), (1, 3, 8, 8)),  # H not a multiple of Hkv
    ((1, 4, 8, 8), (1, 2, 9, 8)),  # T differs
    ((4, 8, 8), (2, 8, 8)),  # not 4-D
])
def test_bad_shapes(shapes):
    q, kv = torch.randn(*shapes[0]), torch.randn(*shapes[1])
    for fn in (causal_attention, make_attention(group_size=4)):
        with pytest.raises(ValueError, match="attention"):
            fn(q, kv, kv)


# ----------------------------------------------------------------------------- cost


def test_no_quadratic_allocation():
    """At T = 8192 + 300, G = 512 no allocation exceeds 4x the size of q (forward and backward).

    Every tensor the fast path needs is (B, H, T, D)-sized (outputs, gradients, the concatenations); one
    window's score block for all windows would be G / D = 32x q, the (T, T) mask 4000x. The bound 4x
    leaves room for the SDPA kernel's per-thread scratch.
    """
    B, H, Hkv, T, D, G = 1, 2, 1, 8192 + 300, 16, 512
    q, k, v = random_qkv(B, H, Hkv, T, D=D, dtype=torch.float32)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        shifted_sparse_attention(q, k, v, G).sum().backward()
    biggest = max(event.self_cpu_memory_usage for event in prof.events())
    assert 0 < biggest <= 4 * q.nbytes, f"largest allocation {biggest} bytes, q is {q.nbytes}"


def test_training_backends_policy_for_cuda_shaped_calls():
    """The SDPA backends training may use (by construction: torch's CUDA kernel constraints, see the
    function's docstring). 16-bit: the three fused kernels; float32 without GQA: memory-efficient only;
    float32 with GQA: the math kernel up to MATH_MAX_CTX, then a UserError; CPU: no restriction."""
    from torch.nn.attention import SDPBackend

    from errors import UserError
    from shift_attn import FUSED_BACKENDS, MATH_MAX_CTX, training_backends

    fused = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION]
    for dt in (torch.bfloat16, torch.float16):
        assert training_backends(dt, "cuda", gqa=True, ctx=81920) == fused == list(FUSED_BACKENDS)
        assert training_backends(dt, "cuda", gqa=False, ctx=81920) == fused
    assert SDPBackend.MATH not in fused
    assert training_backends(torch.float32, "cuda", gqa=False, ctx=81920) == [SDPBackend.EFFICIENT_ATTENTION]
    assert training_backends(torch.float32, "cuda", gqa=True, ctx=MATH_MAX_CTX) is None
    with pytest.raises(UserError, match="--dtype bfloat16"):
        training_backends(torch.float32, "cuda", gqa=True, ctx=MATH_MAX_CTX + 1)
    for dt in (torch.float32, torch.bfloat16):
        assert training_backends(dt, "cpu", gqa=True, ctx=81920) is None


def test_training_kernels_set_the_priority_flash_first_cudnn_last():
    """Starting from cuDNN first (torch's own order on Hopper with a recent cuDNN), inside training_kernels
    for a CUDA bf16 run torch's SDPA priority order (read back from torch; the flags are global, so any
    build shows them) is flash, memory-efficient, then cuDNN, nothing else enabled; on leaving it the
    previous order returns. CPU runs get no restriction."""
    from torch.nn.attention import SDPBackend, _cur_sdpa_kernel_backends, sdpa_kernel

    from shift_attn import training_kernels

    hopper = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
    with sdpa_kernel(hopper, set_priority=True):
        assert _cur_sdpa_kernel_backends(with_priority=True) == hopper
        with training_kernels(torch.bfloat16, "cuda", gqa=True, ctx=81920):
            order = _cur_sdpa_kernel_backends(with_priority=True)
        assert order == [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION]
        assert _cur_sdpa_kernel_backends(with_priority=True) == hopper
        with training_kernels(torch.bfloat16, "cpu", gqa=True, ctx=81920):
            assert _cur_sdpa_kernel_backends(with_priority=True) == hopper


@pytest.mark.slow
def test_compiled_block_with_s2_does_not_recompile_per_length():
    """A block compiled as train.py --compile does, run with S²-Attn (G = T/4) at ten irregular lengths
    (ragged tails, T/8 rounding both ways): S²-Attn
    stays eager (torch.compiler.disable), so the pieces around it recompile once for the second length and
    are then dynamic in T: no compile after that, instead of one per length until dynamo's limit (8).
    Counted with CompileCounter; outputs equal the eager block within 1e-6 (same ops, float32)."""
    import torch._dynamo
    from torch._dynamo.testing import CompileCounter

    from model import ModelConfig, Transformer

    torch._dynamo.reset()
    net = Transformer(ModelConfig.from_name("tiny")).init_weights(0)
    block = net.model.layers[0]
    attn = make_attention(group_ratio=0.25)
    cnt = CompileCounter()
    compiled = torch.compile(block, backend=cnt)
    counts = []
    for T in (32, 40, 36, 44, 61, 50, 64, 97, 104, 77):
        x = torch.randn(1, T, 64)
        cos, sin = net.rope_tables(torch.arange(T))
        torch.testing.assert_close(compiled(x, cos, sin, attn), block(x, cos, sin, attn), rtol=0, atol=1e-6)
        counts.append(cnt.frame_count)
    assert counts[2:] == [counts[1]] * 8, counts  # nothing compiled after the second length
