"""A trainer's resumable state: named tensors (safetensors holds tensors only; nothing is pickled) in
checkpoint folders OUT/ckpt-STEP, which a resumed run finds, checks against its settings and reads.

    rng.safetensors        rank{i}: rank i's CPU generator state, rank{i}.cuda its CUDA one (uint8)
    optimizer.safetensors  "{parameter name}::{field}": AdamW's exp_avg, exp_avg_sq and step per parameter
    trainer_state.json     step, scheduler, data cursors, settings; present only in a complete checkpoint
"""
from __future__ import annotations

from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

import train_config
from errors import UserError
from parallel import Dist
from train_config import TrainConfig
from train_guards import CKPT_PREFIX


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


# ----------------------------------------------------------------------------- checkpoint folders


def newest_checkpoint(out: Path) -> Path | None:
    """The newest complete checkpoint (temporary `.tmp-*` directories are never picked)."""
    done = [p for p in sorted(out.glob(CKPT_PREFIX + "*")) if (p / "trainer_state.json").is_file()]
    return done[-1] if done else None


def check_same_run(saved: dict, cfg: TrainConfig, where: Path):
    """The settings that must match on resume (train_config.IDENTITY); a key an older checkpoint lacks reads
    as its default."""
    for k in train_config.IDENTITY:
        if saved.get(k, train_config.DEFAULTS.get(k)) != getattr(cfg, k):
            raise UserError(f"{where}: checkpoint was trained with {k}={saved.get(k)!r}, this run has "
                            f"{getattr(cfg, k)!r}; use a new --out or the same flags")


def previous_checkpoint(ckpt: Path) -> Path | None:
    """The newest complete checkpoint beside `ckpt` and older than it."""
    older = [p for p in sorted(ckpt.parent.glob(CKPT_PREFIX + "*")) if p.name < ckpt.name
             and (p / "trainer_state.json").is_file()]
    return older[-1] if older else None


def read_tensors(path: Path, ckpt: Path) -> dict:
    """A checkpoint's safetensors file, or one UserError naming it and the older checkpoint to use."""
    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise UserError(f"{path}: unreadable ({e}){fallback_hint(ckpt)}") from None


def fallback_hint(ckpt: Path) -> str:
    """The tail of an error about a damaged checkpoint: the older intact one to resume from, if any."""
    prev = previous_checkpoint(ckpt)
    return f"; resume from the previous intact checkpoint with --resume-from {prev}" if prev else ""


def changed_settings(saved: dict, cfg: TrainConfig) -> list[str]:
    """'key old -> new' for the settings (not train_config.IDENTITY) a resumed run changes."""
    skip = set(train_config.IDENTITY) | {"resume", "resume_from", "recipe", "out"}
    return [f"{train_config.flag(k)} {saved.get(k)!r} -> {v!r}" for k, v in cfg.to_dict().items()
            if k not in skip and k in saved and saved[k] != v]
