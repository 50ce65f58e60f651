"""Processes and devices: the torchrun preamble, the collectives the trainer uses, and DDP applied to a
built model from outside.

torchrun sets RANK (global process index), LOCAL_RANK (index on this node, = the GPU) and WORLD_SIZE; a
plain `python` run is world 1 and never creates a process group. On CUDA the group is
"cpu:gloo,cuda:nccl": NCCL takes CUDA tensors only, while the trainer's token counts, data cursors and
RNG states are CPU tensors or Python objects, which go through gloo.

Context parallelism (DeepSpeed-Ulysses, Jacobs et al. 2023, "DeepSpeed Ulysses: System Optimizations for
Enabling Training of Extreme Long Sequence Transformer Models", Sec. 3): the world is a 2-D mesh
dp x cp (`Mesh`); the N = cp ranks of one row hold one sequence, rank i its tokens [i T/N, (i+1) T/N)
with their true positions. Everything but attention is position-wise and runs on the shard. Attention
(`context_parallel_attention`) exchanges sequence shards for head shards with one all-to-all,
    (B, H, T/N, D) on each rank  ->  (B, H/N, T, D) on each rank,
runs the ordinary attention on whole sequences, and turns the output back with a second all-to-all.
N may exceed the kv heads (Arctic Long Sequence Training, Bekman et al. 2025, Snowflake): each kv head is
then sent to the N/Hkv ranks whose query heads use it (`replicate_kv`, `rank_heads`).
Per layer and rank the forward exchanges q, k, v and the output, (2 H + 2 max(Hkv, N)) T D / N values, of
which (N - 1)/N leave the rank; the backward moves as much again (and a checkpointed block's recompute
repeats the forward's three input exchanges).

Notation: B batch, T tokens of the whole sequence, N context-parallel ranks, H query heads, Hkv kv heads,
D head dim.
"""
from __future__ import annotations

import datetime
import gc
import math
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from errors import UserError


# Collectives wait this long for the slowest rank (torch's NCCL default is 10 minutes, gloo's 30). Ranks wait
# in one while rank 0 alone writes a checkpoint: for llama3-80k on Llama-3-8B the trained embedding and its
# two Adam moments, 3 x 128,256 x 4,096 float32 values = 6.3 GB, 2 minutes at 50 MB/s and 10 at 10 MB/s (a
# slow network filesystem). An hour leaves room for that and still ends a run whose rank died.
TIMEOUT_MINUTES = 60.0


@dataclass
class Dist:
    """This process's place in the run."""

    rank: int
    local_rank: int
    world: int
    device: torch.device

    @property
    def main(self) -> bool:
        """Rank 0: the one that logs and writes files."""
        return self.rank == 0


def init_distributed(timeout_minutes: float | None = None) -> Dist:
    """torchrun's environment or a single process; sets this rank's CUDA device when there is one.
    `timeout_minutes` (--nccl-timeout, default TIMEOUT_MINUTES): how long a collective waits for the other
    ranks before the run is aborted (NCCL's watchdog and gloo's timeout alike)."""
    timeout_minutes = TIMEOUT_MINUTES if timeout_minutes is None else timeout_minutes
    if not (math.isfinite(timeout_minutes) and timeout_minutes > 0):
        raise UserError(f"--nccl-timeout must be a finite number of minutes > 0, got {timeout_minutes}")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if world > 1:
        dist.init_process_group("cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo",
                                timeout=datetime.timedelta(minutes=timeout_minutes))
    return Dist(rank, local, world, device)


def destroy(d: Dist | None) -> None:
    """Tear the process group down (a no-op for one process).

    A DDP wrapper is cyclic garbage (its hooks refer back to it), so after `train()` returns it, its
    reducer and their hold on the gloo group live on until the cycle collector runs, possibly at
    interpreter exit, after the group was destroyed: gloo's worker thread is then torn down joinable and
    the process aborts ("terminate called without an active exception", about one exit in five on two
    CPU ranks). Collecting first frees them while the group still exists.
    """
    if d is not None and d.world > 1 and dist.is_initialized():
        gc.collect()
        dist.destroy_process_group()


def barrier(d: Dist) -> None:
    """Wait for every rank (a no-op for one process)."""
    if d.world > 1:
        dist.barrier()


def all_reduce_sum(x: torch.Tensor, d: Dist) -> torch.Tensor:
    """Sum `x` over ranks in place; returns it."""
    if d.world > 1:
        dist.all_reduce(x)
    return x


def gather_objects(obj, d: Dist) -> list:
    """Every rank's picklable `obj`, in rank order, on every rank."""
    if d.world == 1:
        return [obj]
    out = [None] * d.world
    dist.all_gather_object(out, obj)
    return out


def gather_tensors(t: torch.Tensor, d: Dist) -> list[torch.Tensor]:
    """Every rank's `t` (same shape and dtype on all ranks), in rank order, on every rank."""
    if d.world == 1:
        return [t]
    out = [torch.empty_like(t) for _ in range(d.world)]
    dist.all_gather(out, t)
    return out


def wrap_ddp(net: torch.nn.Module, d: Dist) -> torch.nn.Module:
    """DistributedDataParallel over `net` when world > 1, else `net` itself.

    broadcast_buffers=False: the buffers (frozen NF4 codes and scales) are loaded identically on every rank
    and never change, so there is nothing to broadcast before each forward.
    """
    if d.world == 1:
        return net
    return torch.nn.parallel.DistributedDataParallel(net, device_ids=[d.device] if d.device.type == "cuda" else None,
                                                     broadcast_buffers=False)


def log0(d: Dist, *msg) -> None:
    """print on rank 0 only, flushed."""
    if d.main:
        print(*msg, flush=True)


# ----------------------------------------------------------------------------- context parallelism


@dataclass
class Mesh:
    """This rank's place in the dp x cp mesh: rank = dp_rank * cp + cp_rank (row-major, as
    init_device_mesh lays it out). cp_group is the process group of this rank's row (None for cp 1)."""

    dp: int
    cp: int
    dp_rank: int
    cp_rank: int
    cp_group: object = None


def check_context_parallel(cp: int, n_heads: int, n_kv_heads: int) -> None:
    """The model shapes --cp N allows: N divides the query heads H, and either divides the kv heads (each
    rank takes Hkv/N of them) or is a multiple of them (each kv head replicated to N/Hkv ranks, see
    context_parallel_attention). One-line UserError naming the values that work; train_config.resolve
    checks the world size and ctx."""
    ok = [n for n in range(1, n_heads + 1) if n_heads % n == 0 and (n_kv_heads % n == 0 or n % n_kv_heads == 0)]
    if cp in ok:
        return
    if cp < n_kv_heads:
        why = f"does not divide the model's {n_kv_heads} kv heads"
    elif cp % n_kv_heads:
        why = f"is above the model's {n_kv_heads} kv heads but not a multiple of them"
    else:
        why = f"does not divide the model's {n_heads} query heads"
    raise UserError(f"--cp {cp} {why} ({n_heads} query heads, {n_kv_heads} kv heads); "
                    f"--cp may be {', '.join(map(str, ok))}")


def rank_heads(cp_rank: int, cp: int, n_heads: int, n_kv_heads: int) -> tuple[range, range]:
    """(query heads, kv heads) of the model that cp rank r holds after the exchange:
        query heads [r H/N, (r+1) H/N);
        kv heads    [r Hkv/N, (r+1) Hkv/N)           for N <= Hkv,
                    the one kv head r // (N/Hkv)      for N > Hkv (a copy; N/Hkv ranks hold it).
    These are exactly the kv heads the rank's query heads use (query head h uses kv head h // (H/Hkv)).
    Assumes check_context_parallel's shapes."""
    q = range(cp_rank * (n_heads // cp), (cp_rank + 1) * (n_heads // cp))
    if cp > n_kv_heads:
        return q, range(cp_rank // (cp // n_kv_heads), cp_rank // (cp // n_kv_heads) + 1)
    return q, range(cp_rank * (n_kv_heads // cp), (cp_rank + 1) * (n_kv_heads // cp))


def replicate_kv(x: torch.Tensor, cp: int) -> torch.Tensor:
    """k or v (B, Hkv, T/N, D) as the all-to-all must split it: for N > Hkv each kv head repeated N/Hkv
    times in place, (B, N, T/N, D), so piece r of the head dim is kv head r // (N/Hkv) (rank_heads); for
    N <= Hkv x itself. repeat_interleave's backward sums the copies' gradients: exact."""
    return x.repeat_interleave(cp // x.shape[1], dim=1) if cp > x.shape[1] else x  # (B, max(Hkv, N), T/N, D)


def init_mesh(d: Dist, cp: int) -> Mesh:
    """The dp x cp mesh of the run (torch.distributed.device_mesh, dims named "dp" and "cp"); world 1 or
    cp 1 needs no mesh and creates no group."""
    if cp == 1:
        return Mesh(d.world, 1, d.rank, 0)
    from torch.distributed.device_mesh import init_device_mesh
    mesh = init_device_mesh(d.device.type, (d.world // cp, cp), mesh_dim_names=("dp", "cp"))
    return Mesh(d.world // cp, cp, mesh.get_local_rank("dp"), mesh.get_local_rank("cp"), mesh.get_group("cp"))


def shard_sequence(x: torch.Tensor, mesh: Mesh, dim: int = -1) -> torch.Tensor:
    """This cp rank's contiguous piece [i T/N, (i+1) T/N) of x along `dim` (T divisible by N)."""
    return x.chunk(mesh.cp, dim=dim)[mesh.cp_rank] if mesh.cp > 1 else x


class _AllToAll(torch.autograd.Function):
    """Split x into N pieces along scatter_dim, send piece j to rank j of the group, concatenate what
    arrives (in rank order) along gather_dim. The backward is the transposed exchange: the same call with
    the two dims swapped."""

    @staticmethod
    def forward(ctx, x, scatter_dim: int, gather_dim: int, group):
        ctx.dims, ctx.group = (scatter_dim, gather_dim), group
        return exchange(x, scatter_dim, gather_dim, group)

    @staticmethod
    def backward(ctx, grad):
        scatter_dim, gather_dim = ctx.dims
        return all_to_all(grad, gather_dim, scatter_dim, ctx.group), None, None, None


def exchange(x: torch.Tensor, scatter_dim: int, gather_dim: int, group) -> torch.Tensor:
    """The all-to-all of `_AllToAll` without autograd: one all_to_all_single over a contiguous buffer
    whose leading dim is the N pieces."""
    n = dist.get_world_size(group)
    send = torch.stack(x.chunk(n, dim=scatter_dim)).contiguous()  # (N, ..., size / N along scatter_dim, ...)
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=group)
    return torch.cat(recv.unbind(0), dim=gather_dim)


def all_to_all(x: torch.Tensor, scatter_dim: int, gather_dim: int, group) -> torch.Tensor:
    """Autograd-aware all-to-all (see `_AllToAll`); gloo on CPU, NCCL on CUDA."""
    return _AllToAll.apply(x, scatter_dim, gather_dim, group)


def context_parallel_attention(attn_fn, group):
    """attn_fn(q, k, v) on whole sequences, for a model whose ranks hold sequence shards.

    Takes q (B, H, T/N, D), k/v (B, Hkv, T/N, D) on each of the N ranks of `group` (rank i holding tokens
    [i T/N, (i+1) T/N), RoPE already applied with their true positions) and returns this rank's rows of
    attn_fn's output, (B, H, T/N, D):
        q (B, H, T/N, D) --all-to-all--> (B, H/N, T, D)   heads [r H/N, (r+1) H/N) of rank r
        k, v (B, Hkv, T/N, D) ---------> (B, Hkv/N, T, D)  their kv heads (query head h uses h // (H/Hkv))
        out = attn_fn(q, k, v)          (B, H/N, T, D)    the whole sequence: causal masks, S²-Attn windows
        out --all-to-all--> (B, H, T/N, D)
    N > Hkv (Bekman et al. 2025, ALST; DeepSpeed's UlyssesSPAttentionHF): k, v are first repeated to
    (B, N, T/N, D) (`replicate_kv`), so rank r receives (B, 1, T, D), the one kv head r // (N/Hkv) its
    query heads use (`rank_heads`); the backward sums the N/Hkv copies' gradients. Cost per rank and
    layer: k and v hold 2 (T/N) N D = 2 T D values, not 2 T Hkv D / N, N/Hkv times as many, three times:
    the repeated copies before the exchange (transient), the head-layout k, v kept for backward (counted
    by memory_plan.all_to_all_bytes), and what the exchange moves.
    Exact for any attention that treats heads alike (causal SDPA); one whose rule depends on the model-wide
    head index (S²-Attn's shifted half) must be built for rank r's heads (shift_attn.make_attention's
    border). check_context_parallel gives the head counts N allows.
    """
    def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        n = dist.get_world_size(group)
        k, v = replicate_kv(k, n), replicate_kv(v, n)  # (B, max(Hkv, N), T/N, D)
        q, k, v = (all_to_all(x, 1, 2, group) for x in (q, k, v))  # (B, H/N, T, D), (B, max(Hkv/N, 1), T, D) x 2
        return all_to_all(attn_fn(q, k, v), 2, 1, group)  # (B, H/N, T, D) -> (B, H, T/N, D)
    return attention
