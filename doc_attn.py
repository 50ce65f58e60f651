"""Document-masked attention for packed sequences: a token attends only to earlier tokens of its document.

Convention (transformers' padding-free packing, `DataCollatorWithFlattening`): the positions of a packed
row restart at 0 at each document start, and the first token of a row always starts a document.

    doc(t) = #{ s in (0, t] : p[s] == 0 }                 (document index of token t in its row)
    query t attends key s  <=>  s <= t  and  doc(s) == doc(t)
    out[t] = inner attention over the keys of doc(t)    (causal by default; S2-Attn from shift_attn.py)

    p = 0 1 2 3 0 1 0 1 2     docs [0 0 0 0|1 1|2 2 2]    bounds [0, 4, 6, 9]

With an inner S2-Attn of window G (`inner=make_attention(group_size=G)`), the windows are counted from
each document's first token: window(h, t) is shift_attn's rule applied to t - start(doc(t)). So
documents never see each other and S2's pattern inside a document is the one it has alone.

Because RoPE scores depend on p[t] - p[s] only, a document gives, position by position, the outputs it
gives alone (tests/test_doc_attn.py compares logits and gradients).

Notation: B batch, T tokens, H query heads, Hkv kv heads, D head dim, N documents in a row.

Note: per-document calls, not a mask. A (T, T) block-diagonal mask costs O(T^2) memory and sends SDPA to a
    kernel that scores every pair; cutting q, k, v at the bounds (`split`) and calling causal SDPA per
    document costs sum_i L_i^2 / 2 and forms nothing of size (T, T). FlexAttention has no backward on
    CPU and torch's varlen attention runs on CUDA only.

Note: with --compile the bounds are part of the traced block, so a new number of documents in a row
    recompiles it (past dynamo's limit it runs eager); results are the same either way.
"""
from __future__ import annotations

import functools

import torch

from shift_attn import AttnFn, causal_attention

# ----------------------------------------------------------------------------- pure functions


def document_bounds(positions: torch.Tensor) -> list[list[int]]:
    """Per row, the document bounds [0, s_1, ..., s_{N-1}, T] of positions (T,) or (B, T).

    s_i are the indices > 0 where the position is 0; documents are [bounds[i], bounds[i + 1]).
    """
    if positions.dim() not in (1, 2):
        raise ValueError(f"positions must be (T,) or (B, T), got shape {tuple(positions.shape)}")
    rows = positions.detach().reshape(-1, positions.shape[-1]).cpu()  # (B, T)
    T = rows.shape[1]
    out = []
    for row in rows:
        starts = (row[1:] == 0).nonzero().flatten().add(1).tolist()
        out.append([0, *starts, T])
    return out


def document_mask(positions: torch.Tensor) -> torch.Tensor:
    """The rule of the module docstring as an explicit boolean mask (B, T, T), True where query t sees key s.

    O(T^2): for tests and pictures, never the fast path.
    """
    rows = positions.reshape(-1, positions.shape[-1])  # (B, T)
    doc = torch.cumsum((rows == 0) & (torch.arange(rows.shape[1], device=rows.device) > 0), dim=1)  # (B, T)
    T = rows.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool, device=rows.device).tril()  # (T, T)
    return causal & (doc[:, :, None] == doc[:, None, :])  # (B, T, T)


def _per_document(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bounds: list[int],
                  inner: AttnFn) -> torch.Tensor:
    """inner() on each document [bounds[i], bounds[i + 1]) of rows sharing `bounds`; (B, H, T, D)."""
    sizes = [b - a for a, b in zip(bounds, bounds[1:])]
    if len(sizes) == 1:
        return inner(q, k, v)
    pieces = zip(*(x.split(sizes, dim=2) for x in (q, k, v)))  # (B, H|Hkv, L_i, D) each
    return torch.cat([inner(qi, ki, vi) for qi, ki, vi in pieces], dim=2)  # (B, H, T, D)


def _document_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bounds: list[list[int]],
                        inner: AttnFn) -> torch.Tensor:
    B, T = q.shape[0], q.shape[2]
    if any(row[-1] != T for row in bounds) or len(bounds) not in (1, B):
        raise ValueError(f"document attention: positions for {len(bounds)} rows of {bounds[0][-1]} tokens, "
                         f"q has {B} rows of {T}")
    if all(row == bounds[0] for row in bounds):
        return _per_document(q, k, v, bounds[0], inner)
    rows = [_per_document(q[b:b + 1], k[b:b + 1], v[b:b + 1], bounds[b], inner) for b in range(B)]
    return torch.cat(rows, dim=0)  # (B, H, T, D)


# ----------------------------------------------------------------------------- public entry points


def document_attention(positions: torch.Tensor, inner: AttnFn | None = None) -> AttnFn:
    """An `attn_fn(q, k, v) -> out` for the model's seam that attends within the documents of `positions`.

    positions: (T,) or (B, T), restarting at 0 at each document start (module docstring); read once here
    (one host copy), so the returned function does no device-to-host sync of its own.
    inner: the attention inside a document (default full causal; e.g. shift_attn.make_attention(
    group_size=G) for S2 windows counted from each document start). q (B, H, T, D), k, v (B, Hkv, T, D).
    """
    return functools.partial(_document_attention, bounds=document_bounds(positions),
                             inner=inner or causal_attention)
