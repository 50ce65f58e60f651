"""parallel.py: the context-parallel checks and shards (fast), and (slow, 2 gloo ranks) the Ulysses
attention against one process: forward and backward in float64 for odd head counts per rank, GQA,
T not a power of two, S²-Attn, and inside the trainer's checkpointing policies."""
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import parallel
import shift_attn
from errors import UserError
from helpers import free_port
from model import MemoryOptions, ModelConfig, Transformer


@pytest.mark.parametrize("cp,heads,kv,needle", [
    (4, 4, 2, "--cp may be 1, 2$"),
    (2, 9, 3, "--cp may be 1, 3$"),
    (3, 32, 8, "8 kv heads .32 query heads.; --cp may be 1, 2, 4, 8$"),
])
def test_context_parallel_head_counts_are_checked(cp, heads, kv, needle):
    with pytest.raises(UserError, match=needle):
        parallel.check_context_parallel(cp, heads, kv)
    parallel.check_context_parallel(1, heads, kv)


def test_shards_are_contiguous_and_cover_the_sequence():
    x = torch.arange(12)
    shards = [parallel.shard_sequence(x, parallel.Mesh(1, 3, 0, r)) for r in range(3)]
    assert torch.equal(torch.cat(shards), x) and torch.equal(shards[1], torch.arange(4, 8))
    assert parallel.shard_sequence(x, parallel.Mesh(2, 1, 0, 0)) is x


# ----------------------------------------------------------------------------- slow: 2 gloo ranks

CASES = [  # (H, Hkv, T, S²-Attn group ratio or None); H / 2 = 3 heads per rank: odd
    (6, 2, 30, None),
    (6, 6, 30, 0.25),
    (4, 2, 42, 0.25),
    (6, 2, 46, 0.5),
]


def test_process_group_gets_the_nccl_timeout(monkeypatch):
    """--nccl-timeout reaches init_process_group as a timedelta (the default: parallel.TIMEOUT_MINUTES); a
    value that is not > 0 is one UserError naming the flag, before any group is made."""
    import datetime
    seen = []
    monkeypatch.setattr(dist, "init_process_group", lambda backend, **kw: seen.append((backend, kw)))
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    d = parallel.init_distributed(90)
    assert (d.rank, d.world) == (1, 2) and seen == [("gloo", {"timeout": datetime.timedelta(minutes=90)})]
    parallel.init_distributed()
    assert seen[-1][1]["timeout"] == datetime.timedelta(minutes=parallel.TIMEOUT_MINUTES) > datetime.timedelta(minutes=10)
    for bad in (0, -5, float("inf")):
        with pytest.raises(UserError, match=r"^--nccl-timeout must be"):
            parallel.init_distributed(bad)
    assert len(seen) == 2


def _inner(H: int, ratio, rank: int, n: int):
    """The attention rank `rank` runs on its head shard (S²-Attn told where its heads sit)."""
    if ratio is None:
        return shift_attn.causal_attention
    return shift_attn.make_attention(group_ratio=ratio, border=H // 2 - rank * (H // n))


def _attention_cases(rank: int, n: int, group) -> list[float]:
    errs = []
    for H, Hkv, T, ratio in CASES:
        g = torch.Generator().manual_seed(H * 100 + T)
        q, k, v, dout = (torch.randn(1, h, T, 8, generator=g, dtype=torch.float64) for h in (H, Hkv, Hkv, H))
        ref_fn = shift_attn.causal_attention if ratio is None else shift_attn.make_attention(group_ratio=ratio)
        leaves = [x.clone().requires_grad_() for x in (q, k, v)]
        ref = ref_fn(*leaves)
        ref.backward(dout)
        shards = [parallel.shard_sequence(x, parallel.Mesh(1, n, 0, rank), dim=2).clone().requires_grad_()
                  for x in (q, k, v)]
        cp_fn = parallel.context_parallel_attention(_inner(H, ratio, rank, n), group)
        for checkpointed in (False, True):
            for x in shards:
                x.grad = None
            if checkpointed:
                out = torch.utils.checkpoint.checkpoint(cp_fn, *shards, use_reentrant=False)
            else:
                out = cp_fn(*shards)
            out.backward(parallel.shard_sequence(dout, parallel.Mesh(1, n, 0, rank), dim=2))
            errs.append((out - parallel.shard_sequence(ref, parallel.Mesh(1, n, 0, rank), dim=2)).abs().max().item())
            for x, leaf in zip(shards, leaves):
                errs.append((x.grad - parallel.shard_sequence(leaf.grad, parallel.Mesh(1, n, 0, rank), dim=2))
                            .abs().max().item())
    return errs


def _model_cases(rank: int, n: int, group) -> tuple[list[float], list[float]]:
    """A tiny float64 model, checkpointed with and without the saved-attention policy: the cp=2 NLL of
    each shard and the summed parameter gradients against one process on the whole sequence."""
    nll_errs, errs = [], []
    cfg = ModelConfig.from_name("tiny", n_heads=6, n_kv_heads=2, dim=48)
    T = 46
    tokens = torch.randint(0, cfg.vocab_size, (1, T), generator=torch.Generator().manual_seed(1))
    for save_attention in (False, True):
        torch.manual_seed(0)
        net = Transformer(cfg, MemoryOptions(checkpointing=True, save_attention=save_attention))
        net.init_weights(seed=3).double().train()
        for ratio in (None, 0.25):
            net.zero_grad()
            full = None if ratio is None else shift_attn.make_attention(group_ratio=ratio)
            ref = net(tokens, attn_fn=full, labels=tokens)
            ref.backward()
            ref_grads = [p.grad.clone() for p in net.parameters()]
            net.zero_grad()
            mesh = parallel.Mesh(1, n, 0, rank)
            x, pos = parallel.shard_sequence(tokens, mesh), parallel.shard_sequence(torch.arange(T), mesh)
            nll = net(x, pos, attn_fn=parallel.context_parallel_attention(_inner(6, ratio, rank, n), group), labels=x)
            nll.backward()
            total = nll.detach().clone()
            dist.all_reduce(total, group=group)
            nll_errs.append(((total - ref) / ref).abs().item())
            for p, r in zip(net.parameters(), ref_grads):
                dist.all_reduce(p.grad, group=group)
                errs.append((p.grad - r).abs().max().item())
    return nll_errs, errs


def _worker(rank: int, n: int, port: int, queue):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=n)
    try:
        queue.put((rank, _attention_cases(rank, n, dist.group.WORLD), *_model_cases(rank, n, dist.group.WORLD)))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_ulysses_attention_equals_one_process():
    """Reference: the same attention (causal SDPA or S²-Attn) and the same float64 model on the whole
    sequence in one process. Tolerance 1e-10 in float64: only the order of the summed gradients differs;
    the NLL, which loss.py sums in float32, is held to a relative 1e-6 (float32 rounding of a sum)."""
    n, ctx = 2, mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(r, n, port, queue)) for r in range(n)]
    for p in procs:
        p.start()
    results = [queue.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    for rank, attn_errs, nll_errs, grad_errs in results:
        assert len(attn_errs) == len(CASES) * 2 * 4 and max(attn_errs) < 1e-10, (rank, attn_errs)
        assert max(nll_errs) < 1e-6 and max(grad_errs) < 1e-10, (rank, nll_errs, grad_errs)
