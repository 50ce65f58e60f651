"""Processes and devices: the torchrun preamble, the collectives the trainer uses, and DDP applied to a
built model from outside.

torchrun sets RANK (global process index), LOCAL_RANK (index on this node, = the GPU) and WORLD_SIZE; a
plain `python` run is world 1 and never creates a process group. On CUDA the group is
"cpu:gloo,cuda:nccl": NCCL takes CUDA tensors only, while the trainer's token counts, data cursors and
RNG states are CPU tensors or Python objects, which go through gloo.
"""
from __future__ import annotations

import gc
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


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


def init_distributed() -> Dist:
    """torchrun's environment or a single process; sets this rank's CUDA device when there is one."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if world > 1:
        dist.init_process_group("cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo")
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
