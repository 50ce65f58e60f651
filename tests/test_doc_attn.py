"""Tests for doc_attn.py: document-masked attention against a float64 naive reference (with and without
S2 windows), a packed model against each document alone (logits and gradients), and the claim that a
32K packed step forms no (T, T) tensor.

References: `naive_attention` (explicit (T, T) mask, float64) from helpers.py; for the model, the
same model run on each document alone.
"""
from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from helpers import naive_attention, random_qkv, reference_mask
from doc_attn import document_attention, document_bounds, document_mask
from model import ModelConfig, Transformer
from shift_attn import make_attention


def restarting(lengths: list[int]) -> torch.Tensor:
    """Positions (T,) that restart at 0 at each document: lengths [3, 2] -> [0 1 2 0 1]."""
    return torch.cat([torch.arange(n) for n in lengths])


# ----------------------------------------------------------------------------- bounds and mask


def test_bounds_and_mask_follow_the_convention():
    p = torch.tensor([0, 1, 2, 3, 0, 1, 0, 1, 2])
    assert document_bounds(p) == [[0, 4, 6, 9]]
    assert document_bounds(torch.tensor([5, 6, 0, 1])) == [[0, 2, 4]]  # a row's first token starts a document
    assert document_bounds(torch.stack([p, torch.arange(9)])) == [[0, 4, 6, 9], [0, 9]]
    m = document_mask(p)[0]
    for t in range(9):
        for s in range(9):
            same = sum(p[1:t + 1] == 0) == sum(p[1:s + 1] == 0)
            assert bool(m[t, s]) == (s <= t and bool(same)), (t, s)


# ----------------------------------------------------------------------------- attention


@pytest.mark.parametrize("H,Hkv", [(4, 2), (9, 3), (4, 1), (3, 3)])
def test_matches_the_naive_masked_reference_with_different_rows(H, Hkv):
    """Two rows with different odd document lengths; float64, so 1e-12 is rounding only."""
    pos = torch.stack([restarting([7, 1, 13, 4]), restarting([25])])  # (B, T), T = 25
    q, k, v = random_qkv(2, H, Hkv, 25)
    out = document_attention(pos)(q, k, v)
    ref = naive_attention(q, k, v, document_mask(pos)[:, None])  # (B, 1, T, T) broadcast over heads
    assert (out - ref).abs().max() < 1e-12
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), g)
    ref_grads = torch.autograd.grad(ref, (q, k, v), g)
    for a, b in zip(grads, ref_grads):
        assert (a - b).abs().max() < 1e-12


def test_same_bounds_for_every_row_from_1d_positions():
    pos = restarting([5, 11, 3])
    q, k, v = random_qkv(3, 4, 2, 19)
    out = document_attention(pos)(q, k, v)
    ref = naive_attention(q, k, v, document_mask(pos)[:, None])
    assert (out - ref).abs().max() < 1e-12


@pytest.mark.parametrize("H,Hkv,G", [(4, 2, 8), (9, 3, 4)])
def test_s2_windows_inside_documents(H, Hkv, G):
    """inner = S2-Attn of window G: each document gets the (H, L, L) S2 pattern of a sequence of its own
    length (reference_mask, written from the window lists), and no other document."""
    lengths = [13, 4, 20, 1]
    pos, T = restarting(lengths), sum(lengths)
    mask = torch.zeros(H, T, T, dtype=torch.bool)
    a = 0
    for n in lengths:
        mask[:, a:a + n, a:a + n] = reference_mask(H, n, G)
        a += n
    q, k, v = random_qkv(1, H, Hkv, T)
    out = document_attention(pos, inner=make_attention(group_size=G))(q, k, v)
    assert (out - naive_attention(q, k, v, mask)).abs().max() < 1e-12


def test_rejects_positions_of_another_shape():
    q, k, v = random_qkv(1, 4, 2, 10)
    with pytest.raises(ValueError, match="positions"):
        document_attention(torch.arange(9))(q, k, v)


# ----------------------------------------------------------------------------- the model


def tiny_model(**kw) -> Transformer:
    return Transformer(ModelConfig.from_name("tiny", **kw)).init_weights(seed=3).float()


def test_packed_documents_give_the_logits_and_gradients_of_each_document_alone():
    """tiny preset (GQA 4 -> 2 heads), odd lengths; float32, atol 1e-5 (summation order only differs).

    Loss: over the packed row, the targets that cross a document border are -100 (as Packer(doc_mask=True)
    writes them); it must equal, value and gradient, the sum of each document's loss alone."""
    torch.manual_seed(0)
    net = tiny_model()
    lengths = [7, 13, 1, 20, 3]
    docs = [torch.randint(3, 512, (n,)) for n in lengths]
    tokens, pos = torch.cat(docs)[None], restarting(lengths)[None]  # (1, T)
    attn = document_attention(pos)
    packed = net(tokens, pos, attn_fn=attn)  # (1, T, V)
    alone = torch.cat([net(d[None]) for d in docs], dim=1)
    assert (packed - alone).abs().max() < 1e-5

    def labels_of(d):
        return torch.cat([d[1:], torch.tensor([-100])])  # the last token's target is outside the document

    net.zero_grad()
    loss_packed = net(tokens, pos, attn_fn=attn, labels=torch.cat([labels_of(d) for d in docs])[None])
    loss_packed.backward()
    g_packed = {n: p.grad.clone() for n, p in net.named_parameters()}
    net.zero_grad()
    loss_alone = sum(net(d[None], labels=labels_of(d)[None]) for d in docs)
    loss_alone.backward()
    assert abs(loss_packed.item() - loss_alone.item()) < 1e-4 * loss_alone.item()
    for n, p in net.named_parameters():
        assert (g_packed[n] - p.grad).abs().max() < 1e-5, n
    # and without the document mask the packed row differs (the test can fail)
    assert (net(tokens, pos) - alone).abs().max() > 1e-2


class LargestShapes(TorchDispatchMode):
    """Records every op whose output has two dimensions >= `big`."""

    def __init__(self, big: int):
        super().__init__()
        self.big, self.hits = big, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor) and sum(s >= self.big for s in t.shape) >= 2:
                self.hits.append((str(func), tuple(t.shape)))
        return out


def test_the_checker_sees_a_dense_mask():
    """A dense masked attention at T = 256 is caught, so the 32K test below can fail."""
    pos = restarting([100, 156])
    q, k, v = random_qkv(1, 2, 1, 256, dtype=torch.float32)
    with LargestShapes(256) as mode:
        naive_attention(q, k, v, document_mask(pos)[:, None]).sum().backward()
    assert mode.hits


def test_a_32k_packed_step_forms_no_t_by_t_tensor():
    """T = 32768, 8 documents, 1 layer of dim 32: forward and backward record no op output with two dims
    >= T (SDPA's flash kernels work in blocks; a mask or a score matrix would be (T, T))."""
    torch.manual_seed(0)
    net = tiny_model(dim=32, n_layers=1, n_heads=2, n_kv_heads=1, ffn_dim=64, max_seq_len=32768)
    lengths = [5000, 3000, 4096, 2769, 6000, 4000, 3903, 4000]
    T = sum(lengths)
    assert T == 32768
    tokens, pos = torch.randint(3, 512, (1, T)), restarting(lengths)[None]
    with LargestShapes(T) as mode:
        net(tokens, pos, attn_fn=document_attention(pos), labels=tokens).backward()
    assert not mode.hits, mode.hits[:5]
