"""Fully sharded data parallelism (--fsdp): the 4-bit base, the trained tensors, their gradients and
optimizer state cut over every rank of the run, applied to a built model from outside.

ZeRO stage 3 (Rajbhandari et al. 2020, "ZeRO: Memory Optimizations Toward Training Trillion Parameter
Models", Sec. 5) as PyTorch FSDP (Zhao et al. 2023, "PyTorch FSDP: Experiences on Scaling Fully Sharded
Data Parallel", Sec. 3) in its per-parameter form FSDP2 (`torch.distributed.fsdp.fully_shard`); with a
QLoRA base as in Answer.AI's FSDP+QLoRA (2024). Over W = world ranks, rank r keeps chunk r of dim 0 of
every Parameter (torch.chunk's split, the last chunks padded or empty):
    per-rank weights + trained state = (base + trained + 2 Adam moments) / W   (+ buffers, whole)
Each unit (one transformer block, then the root: embeddings, final norm, head) all-gathers its Parameters
before its forward and again before its backward, frees them after, and reduce-scatters its gradients:
    dL/dtheta_r = (1 / world) sum_{ranks} dL_rank/dtheta   restricted to chunk r
(the trainer scales each rank's loss by world / N_sup, so the mean over ranks is the step's gradient).

Note: 4-bit bytes. quant4.Linear4bit keeps its packed NF4 codes and block scales as frozen Parameters;
    with MixedPrecisionPolicy(param_dtype=None) FSDP2 casts no stored Parameter (integer ones never) and
    all-gathers a unit whose dtypes differ as one uint8 buffer of their bytes (torch 2.13,
    _fsdp_collectives.foreach_all_gather), so the base travels at 4.127 bits a weight. A flat code vector
    of n bytes is cut into ceil(n / W)-byte chunks; the tail chunks are zero-padded to that size for the
    collective and the padding is dropped after the gather, so the gathered codes equal the stored ones
    bit for bit. Gradients (LoRA's float32 masters) are reduced in float32 (reduce_dtype).

Note: the mesh with --cp. Every rank, cp ranks included, holds the same model, so the shards are cut
    over the whole world (a 1-D mesh of all W ranks, as ZeRO-3 under Ulysses sequence parallelism in
    Arctic Long Sequence Training, Bekman et al. 2025): with cp = W (one sequence over a node) the base is
    still divided by W, which sharding over dp = W / cp alone would not do. The cp ranks' gradients are
    partial sums of one sequence's and the dp ranks' of different sequences'; the reduce-scatter over all
    W ranks adds both and divides by W, the same mean DDP takes over the world, inside FSDP2's own
    post-backward and its no-sync switch.

Note: files. A checkpoint gathers the trained tensors and their Adam moments whole on every rank (`whole`)
    and rank 0 writes the files an unsharded run writes: the trained state is small (LoRA r=8 on
    Llama-3-70B's q, k, v, o: 80 layers x 409,600 = 33 M values, 0.13 GB float32 per tensor kind), one
    file format serves both (eval.py, generate.py, PEFT read the adapter unchanged), and a resume cuts
    the same chunks again, bit-identically. torch.distributed.checkpoint would write per-rank shards of
    its own format and need a conversion for PEFT. --merge loads the base afresh on rank 0 at the end and merges the
    gathered trained tensors into it (`plain`): the merge and cast of an unsharded run, on a plain model.
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
import torch.nn as nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor, distribute_tensor

import lora
import parallel
from parallel import Dist


def device_mesh(d: Dist) -> DeviceMesh:
    """The FSDP mesh: 1-D over every rank of the run, dp and cp alike (module note)."""
    return init_device_mesh(d.device.type, (d.world,), mesh_dim_names=("fsdp",))


def shard_model(net: nn.Module, mesh: parallel.Mesh, d: Dist) -> nn.Module:
    """fully_shard each transformer block (one unit each), then the root; in place, returns `net`.
    Build the optimizer afterwards: sharding replaces every Parameter with a DTensor of this rank's chunk."""
    if d.world < 2:  # train_config.resolve refuses such a run in one line
        raise ValueError(f"shard_model: {d.world} rank; FSDP needs at least 2 to shard over")
    dm, before = device_mesh(d), local_bytes(net)["parameters"]
    policy = MixedPrecisionPolicy(param_dtype=None, reduce_dtype=torch.float32)
    for layer in net.model.layers:
        fully_shard(layer, mesh=dm, mp_policy=policy)
    fully_shard(net, mesh=dm, mp_policy=policy)
    where = f"{d.world} ranks (dp {mesh.dp} x cp {mesh.cp})"
    parallel.log0(d, f"fsdp: {len(net.model.layers)} blocks and the root sharded over {where}; parameters per rank "
                     f"{local_bytes(net)['parameters'] / 2**20:.2f} MiB of {before / 2**20:.2f} MiB")
    return net


def wrap(net: nn.Module, mesh: parallel.Mesh, d: Dist, fsdp: bool) -> nn.Module:
    """What the trainer calls forward on: with fsdp, `net` itself, sharded in place (shard_model); else
    parallel.wrap_ddp's DDP (or `net` for one process)."""
    return shard_model(net, mesh, d) if fsdp else parallel.wrap_ddp(net, d)


def accumulate(net: nn.Module, last: bool):
    """A micro-step's context: on all but the step's last one, gradients accumulate unreduced (DDP's
    no_sync, FSDP2's gradient-sync switch); nothing to do for one process."""
    if last or not isinstance(net, (FSDPModule, nn.parallel.DistributedDataParallel)):
        return contextlib.nullcontext()
    return net.no_sync() if isinstance(net, nn.parallel.DistributedDataParallel) else _fsdp_no_sync(net)


@contextlib.contextmanager
def _fsdp_no_sync(net: FSDPModule) -> Iterator[None]:
    net.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        net.set_requires_gradient_sync(True)


def plain(net: nn.Module, build: Callable[[], nn.Module]) -> nn.Module:
    """`net` itself, or for a sharded net a plain model from build() (the same base, freshly loaded) holding
    net's trained tensors, which must be whole (inside `whole`): what --merge merges and casts, which
    FSDP2's Parameter bookkeeping would not let it do to a sharded model."""
    if not isinstance(net, FSDPModule):
        return net
    out = build()
    lora.load_lora_state_dict(out, lora.lora_state_dict(net).items(), "the sharded model's trained tensors")
    return out


def clip_grad_norm(params: list[torch.Tensor], clip: float) -> torch.Tensor:
    """The gradients' global 2-norm, the gradients scaled to at most `clip` (0: norm only), as a plain
    tensor: over sharded gradients torch's clip_grad_norm_ sums the chunks' squares over the mesh and
    returns a DTensor, gathered here."""
    norm = torch.nn.utils.clip_grad_norm_(params, clip if clip > 0 else float("inf"))
    return norm.full_tensor() if isinstance(norm, DTensor) else norm


def _trained(net: nn.Module) -> Iterator[tuple[nn.Module, str, DTensor]]:
    """(owner, attribute, Parameter) of each trained sharded Parameter, in module order: the same order on
    every rank."""
    for m in net.modules():
        for name, p in m.named_parameters(recurse=False):
            if isinstance(p, DTensor) and p.requires_grad:
                yield m, name, p


@contextlib.contextmanager
def whole(net: nn.Module, opt: torch.optim.Optimizer | None = None) -> Iterator[None]:
    """Inside the block, net's trained Parameters are whole tensors and `opt` is keyed by them with whole
    Adam moments, as in an unsharded run, so the ordinary adapter and optimizer code reads and loads them;
    on exit the trained values and moments are cut back into this rank's chunks (what a resume loaded
    stays). A no-op for a model without sharded Parameters. Collective: every rank enters it, at the same
    point."""
    owners = list(_trained(net))
    full: dict[int, nn.Parameter] = {}
    for m, name, p in owners:
        if id(p) not in full:  # tied Parameters stay tied
            full[id(p)] = nn.Parameter(p.full_tensor(), requires_grad=p.requires_grad)
        setattr(m, name, full[id(p)])
    back = {id(full[id(p)]): p for _, _, p in owners}
    if opt is not None and owners:
        _move_optimizer(opt, {id(p): full[id(p)] for _, _, p in owners}, _gathered)
    try:
        yield
    finally:
        if opt is not None and owners:
            _move_optimizer(opt, back, _cut_like)
        with torch.no_grad():
            for m, name, p in owners:
                f = full[id(p)]
                p.copy_(_cut_like(f.detach(), p, f))
                setattr(m, name, p)


def _gathered(v, p: DTensor, f: torch.Tensor):
    """A sharded state tensor whole (collective); others unchanged."""
    return v.full_tensor() if isinstance(v, DTensor) else v


def _cut_like(v, p: DTensor, f: torch.Tensor):
    """A whole tensor shaped like f, as this rank's chunk of it with p's placement; others unchanged."""
    if not isinstance(v, torch.Tensor) or isinstance(v, DTensor) or v.shape != f.shape:
        return v
    return distribute_tensor(v.to(p.device), p.device_mesh, p.placements, src_data_rank=None)


def _move_optimizer(opt: torch.optim.Optimizer, to: dict[int, torch.Tensor], convert) -> None:
    """Re-key opt's groups and state from each Parameter p to to[id(p)], converting each state value with
    convert(value, the sharded Parameter, the whole one)."""
    for g in opt.param_groups:
        g["params"] = [to.get(id(p), p) for p in g["params"]]
    moved = {}
    for p, st in list(opt.state.items()):
        q = to.get(id(p), p)
        sharded, whole_p = (p, q) if isinstance(p, DTensor) else (q, p)
        moved[q] = {k: convert(v, sharded, whole_p) for k, v in st.items()}
    opt.state.clear()
    opt.state.update(moved)


def local_bytes(net: nn.Module, opt: torch.optim.Optimizer | None = None) -> dict[str, int]:
    """Bytes this rank holds (a sharded tensor counts its local chunk): Parameters, buffers (whole on every
    rank), gradients present now, optimizer state tensors."""
    def size(ts) -> int:
        return sum(t.numel() * t.element_size() for t in (t.to_local() if isinstance(t, DTensor) else t for t in ts))
    return {"parameters": size(net.parameters()), "buffers": size(net.buffers()),
            "gradients": size(p.grad for p in net.parameters() if p.grad is not None),
            "optimizer": size(v for st in opt.state.values() for v in st.values() if torch.is_tensor(v)) if opt else 0}
