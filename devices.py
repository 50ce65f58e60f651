"""The device and dtype every entry point runs in: CUDA when present, else the CPU; bfloat16 on GPUs that
have its kernels, float32 elsewhere.

Note: bfloat16 needs compute capability 8.0. SDPA's fused kernels take bfloat16 only from sm_80 on and
training allows only fused kernels on CUDA (shift_attn.training_backends), so below sm_80 the default is
float32 and --dtype bfloat16 is refused before any weight loads. Not float16: its 5-bit exponent overflows
Llama activations and flushes small gradients to zero without loss scaling.
"""
from __future__ import annotations

import argparse

import torch

from errors import UserError

BF16_CAPABILITY = (8, 0)  # Ampere: the first CUDA compute capability with bfloat16 SDPA kernels

# ----------------------------------------------------------------------------- choices


def choose_device(name: str | None = None) -> torch.device:
    """--device, else CUDA when present and the CPU otherwise; a CUDA device on a machine without one is a
    UserError. The one place entry points pick a device (the trainer's comes from parallel.init_distributed)."""
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"--device {name!r}: not a device (cpu, cuda, cuda:1, ...)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name}: CUDA is not available on this machine")
    return device


def choose_dtype(name: str | None, device: torch.device) -> torch.dtype:
    """--dtype, else bfloat16 on a CUDA device of compute capability >= 8.0 and float32 on the CPU and on
    older GPUs; --dtype bfloat16 on an older GPU is a UserError (the module's note). A CUDA device on a
    machine without CUDA (what --dry-run plans for) counts as Ampere or newer."""
    if device.type != "cuda":
        return torch.float32 if name is None else getattr(torch, name)
    cap = torch.cuda.get_device_capability(device) if torch.cuda.is_available() else BF16_CAPABILITY
    if cap < BF16_CAPABILITY:
        if name == "bfloat16":
            raise UserError(f"--dtype bfloat16: {device} has compute capability {cap[0]}.{cap[1]}, and SDPA's "
                            f"bfloat16 kernels need 8.0 (Ampere) or newer; use --dtype float32")
        return torch.float32 if name is None else getattr(torch, name)
    return torch.bfloat16 if name is None else getattr(torch, name)


# ----------------------------------------------------------------------------- command line


def add_device_flags(ap: argparse.ArgumentParser) -> None:
    """--device and --dtype, as eval.py and generate.py take them (read back with `device_and_dtype`)."""
    ap.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default: cuda when available, else cpu)")
    ap.add_argument("--dtype", choices=("float32", "bfloat16"), default=None,
                    help="weights and compute (default: bfloat16 on CUDA from compute capability 8.0, else float32)")


def device_and_dtype(device: str | None, dtype: str | None) -> tuple[torch.device, torch.dtype]:
    """The --device and --dtype flags resolved: choose_device, then choose_dtype on that device."""
    d = choose_device(device)
    return d, choose_dtype(dtype, d)
