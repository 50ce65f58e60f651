"""loss.py: the chunked cross-entropy (checkpointed per chunk, or the frozen-head fused gradient) against
F.cross_entropy on the full float32 logits, value and gradients.

Tolerances: a float32 sum over ~80 NLLs of ~6 differs from the one-shot sum by reordering only, so 1e-3
on the loss; gradients of magnitude < 1, 1e-5.
"""
import torch

from checkpoint import load_model
from loss import chunked_cross_entropy


def tokens(n=24, vocab=512, batch=2, seed=0):
    return torch.randint(0, vocab, (batch, n), generator=torch.Generator().manual_seed(seed))


def test_chunked_cross_entropy_equals_full_and_its_gradient():
    model = load_model("tiny").train()
    x = tokens(50, vocab=512)
    labels = tokens(50, vocab=512, seed=1)
    labels[:, :7] = -100
    ref = torch.nn.functional.cross_entropy(model(x).float().flatten(0, 1), labels.flatten(), reduction="sum")
    ref.backward()
    g = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    got = model(x, labels=labels, loss_chunk=13)
    got.backward()
    assert abs(got.item() - ref.item()) < 1e-3  # a sum over ~86 tokens of float32 NLLs ~6: reordering only
    for a, p in zip(g, model.parameters()):
        assert torch.allclose(a, p.grad, atol=1e-5)


def test_frozen_head_loss_equals_full_cross_entropy_and_its_gradient():
    """The fused path (frozen lm_head: gradient formed in forward) against F.cross_entropy on full logits."""
    model = load_model("tiny").train()
    model.lm_head.weight.requires_grad_(False)
    x = tokens(50, vocab=512)
    labels = tokens(50, vocab=512, seed=2)
    labels[0, 10:30] = -100
    ref = torch.nn.functional.cross_entropy(model(x).float().flatten(0, 1), labels.flatten(), reduction="sum")
    ref.backward()
    g = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    got = model(x, labels=labels, loss_chunk=16)
    (got * 0.5).backward()  # a scaled loss checks the incoming gradient is applied
    assert abs(got.item() - ref.item()) < 1e-3  # float32 sums of ~80 NLLs of ~6: reordering only
    for n, p in model.named_parameters():
        if p.requires_grad:
            assert torch.allclose(2 * p.grad, g[n], atol=1e-5), n


def test_all_unsupervised_chunks_are_skipped():
    """A chunk with no supervised token adds nothing (and is never projected): the loss of labels that
    are -100 everywhere is exactly 0, and of one supervised token its NLL (tolerance 1e-5, float32)."""
    model = load_model("tiny").eval()
    x = tokens(20)
    with torch.no_grad():
        h = model.hidden(x)
        labels = torch.full_like(x, -100)
        assert chunked_cross_entropy(h, model.lm_head, labels, chunk=8).item() == 0.0
        labels[1, 13] = 7
        want = -torch.log_softmax(model.lm_head(h[1, 13]).float(), -1)[7]
        assert abs(chunked_cross_entropy(h, model.lm_head, labels, chunk=8).item() - want.item()) < 1e-5


def test_supervised_chunks_match_a_per_chunk_test():
    """supervised_chunks (one host copy) against `.any()` chunk by chunk, for lengths that do and do not
    divide by the chunk."""
    from loss import supervised_chunks
    g = torch.Generator().manual_seed(3)
    for n, chunk in [(20, 8), (24, 8), (5, 16), (1, 1), (33, 4)]:
        labels = torch.randint(0, 3, (n,), generator=g)
        labels[labels == 0] = -100
        labels[: n // 2] = -100
        want = [bool((labels[s:s + chunk] != -100).any()) for s in range(0, n, chunk)]
        assert supervised_chunks(labels, chunk) == want


def test_no_supervised_token_still_carries_the_graph():
    """Labels all -100 (a context-parallel shard made only of prompt tokens), trained head or frozen: the
    loss is exactly 0 and backward gives every trained parameter a gradient, all zeros (DDP needs one from
    every rank; the backward's collectives need every rank to run it)."""
    for head_trained in (True, False):
        model = load_model("tiny").train()
        model.lm_head.weight.requires_grad_(head_trained)
        x = tokens(20)
        loss = model(x, labels=torch.full_like(x, -100), loss_chunk=8)
        assert loss.item() == 0.0 and loss.requires_grad
        loss.backward()
        for n, p in model.named_parameters():
            if p.requires_grad:
                assert p.grad is not None and not p.grad.any(), n
