"""Chunked cross-entropy: the summed next-token NLL without ever forming the (T, V) logits.

    NLL = sum_t -log softmax(h_t W^T)[y_t]      over supervised t (y_t != -100)

The LM head is applied to `chunk` tokens at a time and each chunk is reduced to its NLL sum in float32.
A frozen bias-free nn.Linear head (the usual LoRA case) takes `_FrozenHeadNLL`, which forms dNLL/dh
during the forward pass; any other head is checkpointed per chunk. Chunks without a supervised token are
skipped, found with one device-to-host copy per call (`supervised_chunks`), not one sync per chunk.

Note: a sequence with no supervised token (a --cp shard of a chat prompt) still returns 0 with a graph
through the head and hidden states, so its rank joins the backward's collectives (the all-to-alls, DDP's
reduction of every trained parameter) like the others.

Note: why chunked. At T = 80K and V = 128K the float32 logits alone take 80K x 128K x 4 B = 41 GB; one
1024-token chunk's take 0.5 GB.

Notation: B batch, T tokens, N = B * T rows, C model dim, V vocab.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

IGNORE_INDEX = -100  # label of an unsupervised position (F.cross_entropy's default)

# ----------------------------------------------------------------------------- pure functions


def supervised_chunks(labels: torch.Tensor, chunk: int) -> list[bool]:
    """For each chunk [s, s + chunk) of the flat labels (N,): whether it holds a label != IGNORE_INDEX.
    One (ceil(N / chunk),) copy to the host instead of one `.any()` sync per chunk."""
    keep = labels != IGNORE_INDEX  # (N,)
    keep = torch.cat([keep, keep.new_zeros(-keep.numel() % chunk)])  # padded to a multiple of chunk
    return keep.view(-1, chunk).any(1).tolist()


def _chunk_nll(h: torch.Tensor, head: nn.Module, labels: torch.Tensor) -> torch.Tensor:
    logits = head(h).float()  # (N, V) for one chunk only
    return F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX, reduction="sum")


class _FrozenHeadNLL(torch.autograd.Function):
    """sum NLL through a frozen linear head, with d/dh formed chunk by chunk during the forward pass.

    For logits z = h W^T:  dNLL/dz = softmax(z) - onehot(y)  (0 on unsupervised rows),  dNLL/dh = (dNLL/dz) W.
    Only one chunk's float32 logits exist at a time and backward just scales the stored (N, C) gradient,
    so the head costs two matmuls per chunk instead of three (forward, recompute, backward). The
    log-sum-exp and the softmax share one in-place exp(z - max) pass over the chunk.
    """

    @staticmethod
    def forward(ctx, h, weight, labels, chunk):  # h (N, C), weight (V, C), labels (N,)
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        grad_h = torch.zeros_like(h) if ctx.needs_input_grad[0] else None
        for s, supervised in zip(range(0, h.shape[0], chunk), supervised_chunks(labels, chunk)):
            if not supervised:
                continue
            y = labels[s:s + chunk]
            keep = y != IGNORE_INDEX  # (c,)
            z = (h[s:s + chunk] @ weight.T).float()  # (c, V)
            rows = torch.arange(z.shape[0], device=z.device)
            yc = y.clamp(min=0)
            z_y = z[rows, yc]  # (c,) target logits, before z is overwritten
            top = z.amax(-1, keepdim=True)  # (c, 1)
            z.sub_(top).exp_()  # exp(z - max), in place: one (c, V) buffer for the whole chunk
            denom = z.sum(-1, keepdim=True)  # (c, 1)
            total += ((top[:, 0] + denom[:, 0].log() - z_y) * keep).sum()  # logsumexp - z_y
            if grad_h is not None:
                z.div_(denom)  # softmax
                z[rows, yc] -= 1.0
                z.masked_fill_(~keep[:, None], 0.0)  # unsupervised rows: no gradient (no host sync to test for them)
                grad_h[s:s + chunk] = (z.to(weight.dtype) @ weight)  # (c, C)
            del z  # else the next chunk's logits are allocated while these are still referenced
        ctx.save_for_backward(grad_h)
        return total

    @staticmethod
    def backward(ctx, g):
        (grad_h,) = ctx.saved_tensors
        return grad_h * g.to(grad_h.dtype), None, None, None


# ----------------------------------------------------------------------------- entry points


def chunked_cross_entropy(h: torch.Tensor, head: nn.Module, labels: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
    """sum_t -log softmax(head(h_t))[labels_t] over supervised t, never forming a (T, V) tensor.

    h (B, T, C), labels (B, T). Each chunk of `chunk` tokens is projected to float32 logits and reduced to
    its NLL sum. A frozen bias-free nn.Linear head (the usual LoRA case) takes `_FrozenHeadNLL`, which
    forms the gradient during the forward pass; any other head (trained, or wrapped by LoRA) is
    checkpointed per chunk, so backward recomputes that chunk's logits instead of keeping all of them.
    """
    h, labels = h.reshape(-1, h.shape[-1]), labels.reshape(-1)  # (B*T, C), (B*T,)
    if type(head) is nn.Linear and head.bias is None and not head.weight.requires_grad:
        return _FrozenHeadNLL.apply(h, head.weight, labels, chunk)
    total, kept = h.new_zeros((), dtype=torch.float32), supervised_chunks(labels, chunk)
    grad = torch.is_grad_enabled() and (h.requires_grad or any(p.requires_grad for p in head.parameters()))
    for s, supervised in zip(range(0, h.shape[0], chunk), kept):
        hs, ls = h[s:s + chunk], labels[s:s + chunk]
        if not supervised:
            continue
        if grad:
            total = total + checkpoint(_chunk_nll, hs, head, ls, use_reentrant=False)
        else:
            total = total + _chunk_nll(hs, head, ls)
    if grad and not any(kept):  # no target here: a zero that carries the graph (the module's note)
        total = total + _chunk_nll(h[:1], head, labels[:1])  # (1, V) logits, label -100: exactly 0
    return total
