"""A trainer's resumable state as named tensors (safetensors holds tensors only; nothing is pickled).

    rng.safetensors        rank{i}: rank i's CPU generator state, rank{i}.cuda its CUDA one (uint8)
    optimizer.safetensors  "{parameter name}::{field}": AdamW's exp_avg, exp_avg_sq and step per parameter
"""
from __future__ import annotations

import torch

from errors import UserError
from parallel import Dist


def rng_state(d: Dist) -> dict[str, torch.Tensor]:
    """This rank's RNG states by device type, uint8 tensors: "cpu", and "cuda" on a CUDA rank."""
    s = {"cpu": torch.get_rng_state()}
    if d.device.type == "cuda":
        s["cuda"] = torch.cuda.get_rng_state(d.device)
    return s


def rng_tensors(rngs: dict[str, list[torch.Tensor]]) -> dict[str, torch.Tensor]:
    """rng.safetensors: rank{i} the CPU state, rank{i}.cuda the CUDA one (when the run had it)."""
    return {f"rank{i}" if kind == "cpu" else f"rank{i}.{kind}": t for kind, ts in rngs.items() for i, t in enumerate(ts)}


def set_rng_state(tensors: dict[str, torch.Tensor], d: Dist):
    """Restore this rank's states from rng.safetensors; a state of a device type this run lacks is skipped
    (a CPU checkpoint resumed on CUDA keeps the CUDA generator of --seed, and the reverse drops it).
    A CPU+CUDA state concatenated in rank{i} (the earlier layout) is split at the CPU state's size."""
    cpu, n = tensors[f"rank{d.rank}"], torch.get_rng_state().numel()
    torch.set_rng_state(cpu[:n].clone())
    cuda = tensors.get(f"rank{d.rank}.cuda", cpu[n:] if cpu.numel() > n else None)
    if d.device.type == "cuda" and cuda is not None:
        torch.cuda.set_rng_state(cuda.clone(), d.device)


def optimizer_tensors(opt: torch.optim.Optimizer, names: dict) -> dict[str, torch.Tensor]:
    """AdamW state as named tensors (safetensors holds tensors only; no pickle)."""
    out = {}
    for p, st in opt.state.items():
        for k, v in st.items():
            out[f"{names[p]}::{k}"] = v.detach().cpu().contiguous() if torch.is_tensor(v) else torch.tensor(v)
    return out


def load_optimizer_tensors(opt: torch.optim.Optimizer, names: dict, tensors: dict):
    """Put optimizer_tensors' state back into `opt` (names: parameter -> name, as when it was saved)."""
    by_name = {n: p for p, n in names.items()}
    for key, v in tensors.items():
        name, _, field = key.partition("::")
        if name not in by_name:
            raise UserError(f"checkpoint optimizer state names {name!r}, which this model does not train")
        p = by_name[name]
        opt.state[p][field] = v.to(p.device) if field != "step" else v
    return opt
