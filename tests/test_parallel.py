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
    (3, 4, 2, "--cp 3 is above the model's 2 kv heads but not a multiple of them .4 query heads, 2 kv heads.; "
              "--cp may be 1, 2, 4$"),
    (8, 4, 2, "--cp 8 does not divide the model's 4 query heads .* --cp may be 1, 2, 4$"),
    (2, 9, 3, "--cp 2 does not divide the model's 3 kv heads .*; --cp may be 1, 3, 9$"),
    (3, 32, 8, "does not divide the model's 8 kv heads .32 query heads, 8 kv heads.; "
               "--cp may be 1, 2, 4, 8, 16, 32$"),
    (12, 32, 8, "--cp 12 is above the model's 8 kv heads but not a multiple of them .*; --cp may be 1, 2, 4, 8, 16, 32$"),
])
def test_context_parallel_head_counts_are_checked(cp, heads, kv, needle):
    """N must divide H and either divide Hkv or be a multiple of it (kv heads replicated past Hkv)."""
    with pytest.raises(UserError, match=needle):
        parallel.check_context_parallel(cp, heads, kv)
    for ok in (1, kv, heads):
        parallel.check_context_parallel(ok, heads, kv)


@pytest.mark.parametrize("H,Hkv,N", [(4, 2, 1), (4, 2, 2), (4, 2, 4), (8, 2, 4), (32, 8, 4), (32, 8, 16), (32, 8, 32),
                                     (9, 3, 9), (6, 1, 3), (6, 6, 3)])
def test_ranks_receive_the_kv_heads_their_query_heads_use(H, Hkv, N):
    """The N ranks' exchange simulated in one process: each rank's k shard (B, Hkv, T/N, D), every entry
    its kv head's index, after replicate_kv is cut into N pieces along heads, piece r going to rank r
    (the all-to-all's rule). Rank r must receive the kv heads rank_heads names, and those must be
    {h // (H/Hkv) : h in its query heads}; the query heads of all ranks cover [0, H) once."""
    T, D = 2 * N, 3
    k = torch.arange(Hkv, dtype=torch.float64)[None, :, None, None].expand(1, Hkv, T, D)  # (B, Hkv, T, D)
    shards = [parallel.replicate_kv(x, N) for x in k.chunk(N, dim=2)]  # (B, max(Hkv, N), T/N, D) each
    covered = []
    for r in range(N):
        received = torch.cat([s.chunk(N, dim=1)[r] for s in shards], dim=2)  # (B, heads of rank r, T, D)
        q_heads, kv_heads = parallel.rank_heads(r, N, H, Hkv)
        assert received[0, :, 0, 0].tolist() == list(kv_heads)
        assert sorted({h // (H // Hkv) for h in q_heads}) == list(kv_heads)
        covered += list(q_heads)
    assert covered == list(range(H))
    assert parallel.replicate_kv(k, N) is k or N > Hkv


@pytest.mark.parametrize("H,Hkv,N,ratio", [(4, 2, 4, None), (4, 2, 4, 0.25), (8, 2, 4, 0.5), (8, 2, 8, 0.25),
                                           (6, 1, 3, 0.25), (6, 2, 2, 0.25)])  # (6, 1, 3): border inside rank 1
def test_simulated_exchange_past_the_kv_heads_equals_one_process(H, Hkv, N, ratio):
    """Ulysses with N > Hkv in float64, the N ranks' two all-to-alls simulated in one process with the
    all-to-all's rule (piece r of the scatter dim to rank r, pieces concatenated in rank order), each rank
    running attention on its heads with the border train.py gives S²-Attn (rank_heads). Reference: the same
    attention over all heads and the whole sequence; outputs and the q, k, v gradients (repeat_interleave's
    backward sums the copies) within 1e-12: only the summation order of the kv gradients differs."""
    T, D = 8 * N, 4
    g = torch.Generator().manual_seed(H * 10 + N)
    q, k, v, dout = (torch.randn(1, h, T, D, generator=g, dtype=torch.float64) for h in (H, Hkv, Hkv, H))
    ref_fn = shift_attn.causal_attention if ratio is None else shift_attn.make_attention(group_ratio=ratio)
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    ref_fn(*leaves).backward(dout)

    def exchange(xs, scatter, gather):  # N ranks' tensors -> N ranks' tensors, as the all-to-all sends them
        return [torch.cat([x.chunk(N, dim=scatter)[r] for x in xs], dim=gather) for r in range(N)]

    shards = [[s.clone().requires_grad_() for s in x.chunk(N, dim=2)] for x in (q, k, v)]  # (B, h, T/N, D)
    qs = exchange(shards[0], 1, 2)  # (B, H/N, T, D) per rank
    ks, vs = (exchange([parallel.replicate_kv(s, N) for s in x], 1, 2) for x in shards[1:])  # (B, 1 or Hkv/N, T, D)
    outs = [_inner(H, Hkv, ratio, r, N)(qs[r], ks[r], vs[r]) for r in range(N)]  # (B, H/N, T, D)
    out = torch.cat(exchange(outs, 2, 1), dim=2)  # (B, H, T, D)
    out.backward(dout)
    assert (out - ref_fn(q, k, v)).abs().max() < 1e-12
    for x, leaf in zip(shards, leaves):
        assert (torch.cat([s.grad for s in x], dim=2) - leaf.grad).abs().max() < 1e-12


def test_shards_are_contiguous_and_cover_the_sequence():
    x = torch.arange(12)
    shards = [parallel.shard_sequence(x, parallel.Mesh(1, 3, 0, r)) for r in range(3)]
    assert torch.equal(torch.cat(shards), x) and torch.equal(shards[1], torch.arange(4, 8))
    assert parallel.shard_sequence(x, parallel.Mesh(2, 1, 0, 0)) is x


# ----------------------------------------------------------------------------- slow: 2 gloo ranks

CASES = {  # ranks: [(H, Hkv, T, S²-Attn group ratio or None)]
    2: [(6, 2, 30, None), (6, 6, 30, 0.25), (4, 2, 42, 0.25), (6, 2, 46, 0.5)],  # H / 2 = 3 heads per rank: odd
    4: [(4, 2, 44, None), (4, 2, 44, 0.25), (8, 2, 36, 0.5), (4, 4, 28, 0.25)],  # N > Hkv: kv heads replicated
}
MODEL_HEADS = {2: (6, 2, 46), 4: (8, 2, 44)}  # ranks: (H, Hkv, T) of the float64 model


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


def _inner(H: int, Hkv: int, ratio, rank: int, n: int):
    """The attention rank `rank` runs on its head shard (S²-Attn told where its heads sit, as train.py does)."""
    if ratio is None:
        return shift_attn.causal_attention
    return shift_attn.make_attention(group_ratio=ratio, border=H // 2 - parallel.rank_heads(rank, n, H, Hkv)[0].start)


def _attention_cases(rank: int, n: int, group) -> list[float]:
    errs = []
    for H, Hkv, T, ratio in CASES[n]:
        g = torch.Generator().manual_seed(H * 100 + T)
        q, k, v, dout = (torch.randn(1, h, T, 8, generator=g, dtype=torch.float64) for h in (H, Hkv, Hkv, H))
        ref_fn = shift_attn.causal_attention if ratio is None else shift_attn.make_attention(group_ratio=ratio)
        leaves = [x.clone().requires_grad_() for x in (q, k, v)]
        ref = ref_fn(*leaves)
        ref.backward(dout)
        shards = [parallel.shard_sequence(x, parallel.Mesh(1, n, 0, rank), dim=2).clone().requires_grad_()
                  for x in (q, k, v)]
        cp_fn = parallel.context_parallel_attention(_inner(H, Hkv, ratio, rank, n), group)
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
    """A tiny float64 model, checkpointed with and without the saved-attention policy: the cp=n NLL of
    each shard and the summed parameter gradients against one process on the whole sequence."""
    nll_errs, errs = [], []
    H, Hkv, T = MODEL_HEADS[n]
    cfg = ModelConfig.from_name("tiny", n_heads=H, n_kv_heads=Hkv, dim=48)
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
            cp_fn = parallel.context_parallel_attention(_inner(H, Hkv, ratio, rank, n), group)
            nll = net(x, pos, attn_fn=cp_fn, labels=x)
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
@pytest.mark.parametrize("n", sorted(CASES))
def test_ulysses_attention_equals_one_process(n):
    """n gloo ranks (4: past the kv heads, replicated). Reference: the same attention (causal SDPA or
    S²-Attn) and the same float64 model on the whole sequence in one process. Tolerance 1e-10 in float64:
    only the order of the summed gradients differs; the NLL, which loss.py sums in float32, is held to a
    relative 1e-6 (float32 rounding of a sum)."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(r, n, port, queue)) for r in range(n)]
    for p in procs:
        p.start()
    results = [queue.get(timeout=180) for _ in procs]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    for rank, attn_errs, nll_errs, grad_errs in results:
        assert len(attn_errs) == len(CASES[n]) * 2 * 4 and max(attn_errs) < 1e-10, (rank, attn_errs)
        assert max(nll_errs) < 1e-6 and max(grad_errs) < 1e-10, (rank, nll_errs, grad_errs)
