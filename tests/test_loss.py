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
