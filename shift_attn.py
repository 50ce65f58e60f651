"""Shifted sparse attention (S2-Attn) for training at long context, and the plain causal attention.

S2-Attn (Chen et al., 2023, "LongLoRA", Sec. 3.2) splits the sequence into windows of G tokens and
lets each query attend causally only inside its own window. Half of the heads use windows shifted by
G/2, so information flows across window borders from one layer to the next. Cost is O(T G) instead
of O(T^2). It is a training-time approximation: inference uses full causal attention (LongLoRA's
models are evaluated with standard attention).

Semantics, for query head h of H (kv head h // (H / Hkv), grouped-query attention):

    window(h, t) = t // G                for h <  H // 2   (windows [0, G), [G, 2G), ...)
    window(h, t) = (t + G/2) // G        for h >= H // 2   (windows [0, G/2), [G/2, 3G/2), ...)
    query t attends key s  <=>  s <= t  and  window(h, s) == window(h, t)
    out[h, t] = softmax_s(q[h, t] . k[s] / sqrt(D)) v[s]   over the attended keys

    T = 10, G = 4:  positions 0 1 2 3 4 5 6 7 8 9
    h <  H//2       windows  [0 0 0 0|1 1 1 1|2 2]       last window may be shorter than G
    h >= H//2       windows  [0 0|1 1 1 1|2 2 2 2]       first window is G/2 long
                                                          (no wrap-around: the tail is not mixed
                                                           with the head)

For odd H the rule "h < H // 2" holds as written (9 heads: 4 plain, 5 shifted). LongLoRA's eager
path rolls the shifted heads' sequence by G/2, so its last window mixes the tail with the head; its
flash-attention path does not. We follow the flash path. When G >= 2T every window covers the whole
sequence and S2-Attn equals full causal attention.

Notation: B batch, T tokens, H query heads, Hkv kv heads, D head dim, G group (window) size,
N number of full windows in a piece of the sequence.

Note: why the windows are cut, not masked. A (T, T) mask costs O(T^2) memory and sends SDPA to its math
    kernel. Runs of full windows are reshaped into the batch, (B, H, N G, D) -> (B N, H, G, D), for causal
    SDPA; the ragged pieces (the shifted heads' first half-window, a short last window) are causal calls of
    their own length, since zero padding would add work (about 20% at G = T/4). Inputs are cut with
    `split`, whose backward is one concatenation, not a zero-filled full-size gradient per slice.

Note: why heads are cut into up to four pieces. SDPA's `enable_gqa` needs a uniform query-to-kv map, so
    when the border H // 2 falls inside a kv group (SmolLM2: H = 9, Hkv = 3) that group is split into a
    plain and a shifted piece over the one kv head; kv heads are never copied per query head.

Note: a single kv head is broadcast by a stride-0 `expand`, not passed with `enable_gqa`: SDPA's CPU
    backward is much slower on the latter (docs/design.md). The cost is one (B, H, L, D) gradient buffer
    for k and v inside SDPA's backward, the size of q's gradient.

Note: no compiled path, no FlexAttention. Compiling leaves SDPA the same ATen kernel (only reshapes are
    left to fuse), and FlexAttention has no backward on CPU, so it cannot serve training here.

Precision: the flash kernels keep the softmax statistics in float32 for bf16/fp16 inputs and work
in float64 for float64 inputs; the output is in q's dtype.
"""
from __future__ import annotations

import contextlib
import functools
import numbers
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from errors import UserError

# ----------------------------------------------------------------------------- constants

AttnFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]  # attn_fn(q, k, v) -> out
FUSED_BACKENDS = (SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION)  # priority
MATH_MAX_CTX = 4096  # float32 + GQA on CUDA runs SDPA's math kernel: (H, T, T) float32 scores, 2 GiB/layer at 4096

# ----------------------------------------------------------------------------- pure functions


def group_size_for(seq_len: int, group_ratio: float) -> int:
    """G = the even number nearest T * ratio (ties as Python's round), at least 2."""
    return max(2, 2 * round(seq_len * group_ratio / 2))


def window_ids(seq_len: int, group_size: int, shifted: bool) -> torch.Tensor:
    """Window index of each position, (T,) int64: t // G, or (t + G/2) // G for shifted heads."""
    positions = torch.arange(seq_len)
    return (positions + (group_size // 2 if shifted else 0)) // group_size


def s2_mask(n_heads: int, seq_len: int, group_size: int) -> torch.Tensor:
    """The S2-Attn pattern as an explicit boolean mask, (H, T, T), True where query t sees key s.

    This is the definition in the module docstring written out; it costs O(H T^2) and exists for
    tests and pictures, never for the fast path.
    """
    _check_group_size(group_size)
    causal = torch.ones(seq_len, seq_len, dtype=torch.bool).tril()  # (T, T)
    masks = []
    for h in range(n_heads):
        ids = window_ids(seq_len, group_size, shifted=h >= n_heads // 2)  # (T,)
        masks.append(causal & (ids[:, None] == ids[None, :]))
    return torch.stack(masks)  # (H, T, T)


def training_backends(dtype: torch.dtype, device_type: str, gqa: bool, ctx: int) -> list[SDPBackend] | None:
    """The SDPA backends training attention may use (torch.nn.attention.sdpa_kernel), None for no limit.

    On CUDA the fused kernels never form (T, T) scores; restricting SDPA to them turns a silent fallback
    to the math kernel (O(T^2) memory: 26 GB of float32 scores per head at T = 80K) into an error.
    What each fused kernel takes (torch 2.13, aten/src/ATen/native/transformers/cuda/sdp_utils.cpp):
    flash and cuDNN fp16/bf16 only; memory-efficient fp32 too, but not `enable_gqa` with fewer kv heads.
    So float32 with GQA reaches only the math kernel: allowed (None) up to MATH_MAX_CTX tokens, a
    UserError above (use --dtype bfloat16, the CUDA default). Off CUDA: None (CPU has one flash kernel).

    The list is a priority order (`training_kernels` passes set_priority=True): flash, then memory-efficient,
    cuDNN last. Without it, torch on Hopper with a recent cuDNN tries cuDNN attention first, and the
    model's q, k, v are strided views of one projection (and GQA's k, v stride-0 expansions), layouts
    cuDNN's SDPA has had bugs with; a failing cuDNN call is an error, not a fallback. Last, it still
    serves a call the other two refuse.
    """
    if device_type != "cuda":
        return None
    if dtype in (torch.float16, torch.bfloat16):
        return list(FUSED_BACKENDS)
    if not gqa:
        return [SDPBackend.EFFICIENT_ATTENTION]
    if ctx <= MATH_MAX_CTX:
        return None
    raise UserError(f"--dtype {str(dtype).removeprefix('torch.')} with grouped-query attention on CUDA reaches "
                    f"only SDPA's math kernel ((T, T) scores); --ctx {ctx} > {MATH_MAX_CTX} needs --dtype bfloat16")


def training_kernels(dtype: torch.dtype, device_type: str, gqa: bool, ctx: int):
    """The context training attention runs in: SDPA limited to `training_backends`, tried in that order
    (sdpa_kernel with set_priority=True); a null context where they are None. Forward and backward both
    (a checkpointed block's backward reruns attention)."""
    backends = training_backends(dtype, device_type, gqa, ctx)
    return contextlib.nullcontext() if backends is None else sdpa_kernel(backends, set_priority=True)


def head_pieces(n_heads: int, n_kv_heads: int, border: int | None = None) -> list[tuple[int, int, bool]]:
    """Cut heads [0, H) into runs (start, end, shifted) that each map uniformly onto kv heads.

    Cuts are at the border (plain | shifted; default H // 2) and at the kv-group borders either side of
    it, so every run is either a whole number of kv groups or lies inside one kv group (see the module
    note). A border outside [0, H] is clamped: all heads plain (border >= H) or all shifted (<= 0).
    """
    rep = n_heads // n_kv_heads
    border = n_heads // 2 if border is None else min(max(border, 0), n_heads)
    cuts = sorted({0, n_heads, border, border // rep * rep, -(-border // rep) * rep})
    return [(a, b, a >= border) for a, b in zip(cuts, cuts[1:]) if b > a]


def _check_group_size(group_size: int) -> None:
    if isinstance(group_size, bool) or not isinstance(group_size, numbers.Integral) or group_size < 2 \
            or group_size % 2:
        raise ValueError(f"group_size must be an even integer >= 2 (the shifted heads move by G/2), "
                         f"got {group_size!r}")


def _check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    if q.dim() != 4 or k.shape != v.shape or k.dim() != 4:
        raise ValueError(f"attention expects q (B, H, T, D) and k, v (B, Hkv, T, D), got "
                         f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    (b, h, t, d), (bk, hkv, tk, dk) = q.shape, k.shape
    if (b, t, d) != (bk, tk, dk) or h % hkv:
        raise ValueError(f"attention: q {tuple(q.shape)} and k/v {tuple(k.shape)} must share B, T, D "
                         f"and query heads must be a multiple of kv heads")


def _causal(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Causal SDPA with grouped-query heads; q (B, H, L, D), k, v (B, Hkv, L, D).

    One kv head is broadcast with a stride-0 `expand` instead of `enable_gqa` (see the module note).
    """
    H, Hkv = q.shape[1], k.shape[1]
    if Hkv == 1 and H > 1:
        k, v = k.expand(-1, H, -1, -1), v.expand(-1, H, -1, -1)  # (B, H, L, D), a view
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=k.shape[1] != H)


def _windows_causal(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, group_size: int,
                    offset: int) -> torch.Tensor:
    """Causal attention inside windows [0, offset), [offset, offset + G), ..., the last one ragged.

    q (B, H, T, D), k, v (B, Hkv, T, D) with a uniform GQA map; returns (B, H, T, D).
    """
    B, _, T, _ = q.shape
    G = group_size
    head_len = min(offset, T)
    n_full = (T - head_len) // G
    sizes = [head_len, n_full * G, T - head_len - n_full * G]  # half-window, full windows, ragged tail
    (q0, q1, q2), (k0, k1, k2), (v0, v1, v2) = (x.split(sizes, dim=2) for x in (q, k, v))
    outs = []
    if sizes[0]:
        outs.append(_causal(q0, k0, v0))
    if sizes[1]:

        def to_windows(x: torch.Tensor) -> torch.Tensor:  # (B, h, N G, D) -> (B N, h, G, D)
            x = x.unflatten(2, (n_full, G))  # (B, h, N, G, D)
            return x.transpose(1, 2).flatten(0, 1)  # (B N, h, G, D)

        out = _causal(to_windows(q1), to_windows(k1), to_windows(v1))  # (B N, H, G, D)
        outs.append(out.unflatten(0, (B, n_full)).transpose(1, 2).flatten(2, 3))  # (B, H, N G, D)
    if sizes[2]:
        outs.append(_causal(q2, k2, v2))
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)  # (B, H, T, D)


# ----------------------------------------------------------------------------- public entry points


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Full causal attention, the model's default `attn_fn(q, k, v)`.

    q (B, H, T, D), k, v (B, Hkv, T, D); query head h uses kv head h // (H / Hkv). Scale 1/sqrt(D).
    """
    _check_qkv(q, k, v)
    return _causal(q, k, v)


def shifted_sparse_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                             group_size: int, border: int | None = None) -> torch.Tensor:
    """S2-Attn (module docstring) with window size G = group_size; q (B, H, T, D), k, v (B, Hkv, T, D).

    border: the first shifted head of this call, default H // 2. A call that holds heads [h0, h0 + H) of
    a model with Hm heads (one head shard of context parallelism) passes Hm // 2 - h0, so each head keeps
    its model-wide plain/shifted role. RoPE must already be applied with the true positions. Returns
    (B, H, T, D) in q's dtype.
    """
    _check_qkv(q, k, v)
    _check_group_size(group_size)
    H, Hkv = q.shape[1], k.shape[1]
    rep = H // Hkv
    pieces = head_pieces(H, Hkv, border)
    outs = []
    q_pieces = q.split([end - start for start, end, _ in pieces], dim=1)  # (B, end - start, T, D) each
    for (start, end, shifted), q_piece in zip(pieces, q_pieces):
        kv = slice(start // rep, (end - 1) // rep + 1)
        outs.append(_windows_causal(q_piece, k[:, kv], v[:, kv], group_size,
                                    offset=group_size // 2 if shifted else 0))  # (B, end - start, T, D)
    return torch.cat(outs, dim=1)  # (B, H, T, D)


@torch.compiler.disable
def _ratio_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, group_ratio: float,
                     border: int | None = None) -> torch.Tensor:
    """S2-Attn with G = group_size_for(T, group_ratio), T read from q at call time.

    Note: eager inside a compiled block (torch.compiler.disable). G and the window cuts are Python ints
    of T; traced, they put guards on T (is there a ragged tail, how T * ratio rounds), so new lengths kept
    recompiling the block (6 graphs over 10 irregular lengths in the test, still rising) until dynamo's
    recompile limit, after which it runs eagerly without a word. Left out of the graph, the block compiles
    into the pieces around attention, dynamic in T after the second length; the attention itself loses
    nothing (the module note: SDPA is the same ATen kernel compiled or not).
    """
    return shifted_sparse_attention(q, k, v, group_size_for(q.shape[2], group_ratio), border)


def make_attention(group_size: int | None = None, group_ratio: float | None = None,
                   border: int | None = None) -> AttnFn:
    """An `attn_fn(q, k, v) -> out` for the model's attention seam.

    group_size: S2-Attn with a fixed window G (even, >= 2).
    group_ratio: S2-Attn with G = group_size_for(T, ratio), the even number nearest T * ratio, at least 2,
        from T at call time
        (LongLoRA trains with ratio 1/4); ratio in (0, 1].
    border: the first shifted head of each call (see shifted_sparse_attention), default H // 2.
    Neither size nor ratio: full causal attention. Both: ValueError.
    """
    if group_size is not None and group_ratio is not None:
        raise ValueError("make_attention: give group_size or group_ratio, not both")
    if group_size is not None:
        _check_group_size(group_size)
        return functools.partial(shifted_sparse_attention, group_size=int(group_size), border=border)
    if group_ratio is not None:
        if not 0.0 < group_ratio <= 1.0:
            raise ValueError(f"group_ratio must be in (0, 1] (LongLoRA uses 0.25), got {group_ratio!r}")
        return functools.partial(_ratio_attention, group_ratio=group_ratio, border=border)
    return causal_attention
